"""The rounding scale of each parameter gradient of a sparsetrain GPT: the sum
of the absolute values of the terms it adds up.

A parameter's gradient is a sum over tokens (and features, and streams) of
products, ``sum_k a_k``. Computed in floating point with unit roundoff ``u``,
each term carries the relative rounding of the forward and backward that
produced it, and the sum that of its own additions, so the error is bounded
by a small multiple of ``u * sum_k |a_k|`` (Higham, Accuracy and Stability of
Numerical Algorithms, ch. 4) -- whatever the sum itself is. Where the terms
cancel, the relative error of the gradient means nothing: the first
hyper-connection read of a model sees streams that are all the embedding at
scales ``hyper_in``, so what it reads is ``c * embedding``, and the RMSNorm
after it is scale-invariant: ``blocks.0.hc_attn.pre_logits``' gradient is
exactly zero up to the norm's ``eps`` term, rounding noise in any precision.

:func:`recording` hooks the modules of a model for one forward and backward
and gives ``{parameter name: sum of |terms|}`` (shaped as the parameter) for
the parameters of ``nn.Linear``, ``RMSNorm`` and ``nn.Embedding`` modules,
the hyper-connection mixing logits and ``hyper_in`` / ``hyper_out``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from sparsetrain.hyper import HyperConnection
from sparsetrain.model import GPT, RMSNorm


def _abs(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().abs()


def _retained(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t.retain_grad()
    return t


class _Recorder:
    def __init__(self, model: GPT) -> None:
        self.model = model
        self.calls: list[tuple] = []  # (kind, module, tensors...) in forward order

    def linear(self, m: nn.Linear, args: tuple, y: torch.Tensor) -> None:
        if y.requires_grad:
            self.calls.append(("linear", m, args[0].detach(), _retained(y)))

    def norm(self, m: RMSNorm, args: tuple, y: torch.Tensor) -> None:
        if y.requires_grad:
            self.calls.append(("norm", m, args[0].detach(), _retained(y)))

    def embed(self, m: nn.Embedding, args: tuple, e: torch.Tensor) -> None:
        if e.requires_grad:
            self.calls.append(("embed", m, args[0], _retained(e)))

    def read(self, hc: HyperConnection, args: tuple, x_in: torch.Tensor) -> None:
        if x_in.requires_grad:
            self.calls.append(("read", hc, _retained(args[0]), _retained(x_in)))

    def head_input(self, m: RMSNorm, args: tuple) -> None:
        if args[0].requires_grad:
            self.calls.append(("head_input", m, _retained(args[0])))

    def wrap_write(self, hc: HyperConnection):
        write = hc.write  # the bound method

        def recorded(streams: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            y = write(streams, out)
            if y.requires_grad:
                self.calls.append(("write", hc, streams.detach(), out.detach(), _retained(y)))
            return y
        return recorded

    def magnitudes(self) -> dict[str, torch.Tensor]:
        model = self.model
        names = {id(p): n for n, p in model.named_parameters()}
        out: dict[int, torch.Tensor] = {}

        def add(p: torch.Tensor, m: torch.Tensor) -> None:
            if p.requires_grad:
                out[id(p)] = out[id(p)] + m if id(p) in out else m

        embedding = None
        first_streams = last_streams = None
        for kind, mod, *ts in self.calls:
            g = ts[-1].grad
            if g is None:
                continue
            G = _abs(g)
            if kind == "linear":
                x = _abs(ts[0])
                add(mod.weight, torch.einsum("...o,...i->oi", G, x))
                if mod.bias is not None:
                    add(mod.bias, G.flatten(0, -2).sum(0))
            elif kind == "norm":
                x = ts[0].detach().double()
                x_hat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + mod.eps)
                add(mod.weight, (G * x_hat.abs()).flatten(0, -2).sum(0))
            elif kind == "embed":
                embedding = _abs(ts[1])
                add(mod.weight, torch.zeros_like(mod.weight, dtype=torch.float64).index_add_(
                    0, ts[0].reshape(-1), G.flatten(0, -2)))
            elif kind == "read":
                streams = ts[0]
                first_streams = streams if first_streams is None else first_streams
                s = torch.sigmoid(mod.pre_logits.detach().double())
                add(mod.pre_logits, s * (1 - s) * torch.einsum("...d,...id->i", G, _abs(streams)))
            elif kind == "write":
                X, o = _abs(ts[0]), _abs(ts[1])
                last_streams = ts[2]
                s = torch.sigmoid(mod.post_logits.detach().double())
                add(mod.post_logits, 2 * s * (1 - s) * torch.einsum("...id,...d->i", G, o))
                # H_res = sum_k w_k P_k, w = softmax(z): dL/dz_k = w_k (dL/dw_k - sum_l w_l dL/dw_l)
                mw = torch.einsum("kij,ij->k", mod.perms.double(), torch.einsum("...id,...jd->ij", G, X))
                w = mod.perm_weights().detach().double()
                add(mod.res_logits, w * (mw + (w * mw).sum()))
            elif kind == "head_input" and model.hyper_out is not None:
                add(model.hyper_out, torch.einsum("...d,...id->i", G, _abs(last_streams)))
        if model.hyper_in is not None and first_streams is not None and first_streams.grad is not None:
            # the first read's streams are the embedding at scales hyper_in
            add(model.hyper_in, torch.einsum("...id,...d->i", _abs(first_streams.grad), embedding))
        return {names[k]: m for k, m in out.items()}


@contextlib.contextmanager
def recording(model: GPT) -> Iterator[dict[str, torch.Tensor]]:
    """Within: one forward and backward of ``model`` (any code that calls its
    modules); on exit the dict yielded is filled with each parameter's sum of
    absolute terms (:mod:`gradient_magnitudes`). Parameters of other modules
    (custom autograd functions) get no entry."""
    rec = _Recorder(model)
    result: dict[str, torch.Tensor] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(rec.linear))
        elif isinstance(m, RMSNorm):
            hooks.append(m.register_forward_hook(rec.norm))
        elif isinstance(m, nn.Embedding):
            hooks.append(m.register_forward_hook(rec.embed))
        elif isinstance(m, HyperConnection):
            hooks.append(m.register_forward_hook(rec.read))
            m.write = rec.wrap_write(m)
    hooks.append(model.norm.register_forward_pre_hook(rec.head_input))
    try:
        yield result
        result.update(rec.magnitudes())
    finally:
        for h in hooks:
            h.remove()
        for m in model.modules():
            if isinstance(m, HyperConnection) and "write" in m.__dict__:
                del m.write


# Every gradient stays within this many machine epsilons of the dtype, times the
# norm of its sum of |terms|, of the exact one. Besides the sum's own rounding,
# each term carries the forward's and backward's rounding amplified by the
# network's conditioning (it is the same in the plain float32 autograd
# reference, so no implementation does better). Over 500 random draws of the
# tests' models the largest seen is 37 (float32: the embedding's gradient,
# whose terms pass through every layer) and 7 (float64); the margin is for the
# draws' conditioning, which varies.
ROUNDING_MULTIPLE = 1024


def assert_within_rounding(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                           magnitudes: dict[str, torch.Tensor], dtype: torch.dtype,
                           rtol: float | None = None) -> None:
    """``||got - ref|| <= ROUNDING_MULTIPLE * eps(dtype) * ||sum of |terms|||`` for
    every parameter gradient with recorded magnitudes; the others (if ``rtol``
    is given) within ``rtol`` of ``||ref||``."""
    assert got.keys() == ref.keys(), set(got) ^ set(ref)
    assert rtol is not None or magnitudes.keys() == ref.keys(), set(ref) - set(magnitudes)
    bound = ROUNDING_MULTIPLE * torch.finfo(dtype).eps
    for n in ref:
        err = float((got[n].double() - ref[n].double()).norm())
        scale = float(magnitudes[n].norm()) * bound if n in magnitudes else rtol * float(ref[n].norm())
        assert err <= scale, (n, err, scale)
