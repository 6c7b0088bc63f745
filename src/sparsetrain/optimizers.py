"""Optimizer construction: AdamW, Muon (+ AdamW or Lion for the rest), Lion,
8-bit AdamW and GaLore-AdamW, chosen by ``[training] optimizer``.

Every parameter gets one *role* (:func:`parameter_roles`), decided by the
module that owns it rather than by its number of dimensions alone:

- ``hidden``: a matrix of a hidden layer -- the weight of an ``nn.Linear``
  inside the network (attention qkv/proj, FFN up/gate/down, MTP head
  projections, ResNet-BK routers and projections) and each expert of a
  ResNet-BK ``[E, out, in]`` expert stack. Muon takes these; GaLore takes
  the 2-D ones and refuses ResNet-BK, whose expert stacks it cannot project.
- ``embedding``: an ``nn.Embedding`` table (a tied LM head is this too).
- ``head``: the ``lm_head`` weight of a :class:`~sparsetrain.model.CausalLM`;
  its rows are per-token classifiers, like the embedding's, so Muon's
  whole-matrix orthogonalisation does not suit it (nanochat, modded-nanogpt).
- ``other_matrix``: any other parameter of 2+ dimensions -- a linear map with
  one input or one output (ResNet-BK's potential ``v_proj``, the sparsity
  predictor's read-out; orthogonalising a vector only normalises it) and
  convolution kernels.
- ``vector``: 0-D and 1-D parameters -- norm gains, biases, scalars,
  hyper-connection logits.

AdamW (and Lion, 8-bit AdamW) decays ``hidden``, ``head`` and ``other_matrix``
and never ``embedding`` or ``vector``: decaying rare tokens' embedding rows
between their rare updates hurts at small scale for no gain.

With ``optimizer = "muon"`` the ``hidden`` parameters go to
:class:`torch.optim.Muon` (torch >= 2.9) and the rest to AdamW or Lion
(``muon_fallback``); :class:`CombinedOptimizer` drives both as one optimizer.

Per-group learning rates: every group carries ``lr_scale``; a training loop
that sets a scheduled ``lr`` writes ``group["lr"] = lr * group.get("lr_scale", 1.0)``
(``.get``: checkpoints written before ``lr_scale`` existed have groups without it).
The Muon group's scale is ``muon_lr / lr``, so the schedule's peak reaches
``muon_lr`` there and ``lr`` everywhere else.

Peak memory of one training step per optimizer (CUDA), e.g.::

    import torch
    from sparsetrain.config import build_config
    from sparsetrain.build import build_model
    from sparsetrain.optimizers import OPTIMIZERS, build_optimizer, state_bytes

    for kind in OPTIMIZERS:
        cfg = build_config("d20", overrides={"optimizer": kind, "device": "cuda"})
        model = build_model(cfg.model).cuda()
        opt = build_optimizer(model, cfg, "cuda")
        x = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.model.seq_len), device="cuda")
        for _ in range(2):  # the second step runs with the optimizer state allocated
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        print(kind, state_bytes(opt), torch.cuda.max_memory_allocated())
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn as nn

from .config import OPTIMIZERS, register_train_check, require
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig

ROLES = ("hidden", "embedding", "head", "other_matrix", "vector")
DECAYED_ROLES = ("hidden", "head", "other_matrix")

# import name -> (PyPI name, sparsetrain extra) of the optional optimizer packages
_PACKAGES = {
    "lion_pytorch": ("lion-pytorch", "lion"),
    "bitsandbytes": ("bitsandbytes", "adamw8bit"),
    "galore_torch": ("galore-torch", "galore"),
    # galore_torch imports transformers (galore-torch 1.0 declares it, with bitsandbytes): named here
    # for an install that lacks it all the same (pip --no-deps), which then gets the extra's hint
    "transformers": ("transformers", "galore"),
}

# one line: refused when the config is validated (check_config) and again by build_optimizer
GALORE_BK_REFUSAL = ("optimizer = galore_adamw with model.arch = resnet_bk is not available: galore-torch projects "
                     "2-D gradients only, and ResNet-BK's [E, out, in] expert stacks would silently get plain AdamW; "
                     "use optimizer = muon (which orthogonalises each expert) or adamw")


def resume_fixed_fields(optimizer: str) -> tuple[str, ...]:
    """The ``[training]`` settings ``optimizer``'s saved state carries in its param
    groups: a resume restores them, so a resumed config must keep them (the lr
    schedule's are checked with the schedule)."""
    own = {"muon": ("muon_fallback", "muon_lr", "muon_momentum", "muon_weight_decay", "muon_adjust_lr"),
           "galore_adamw": ("galore_rank", "galore_update_proj_gap", "galore_scale")}.get(optimizer, ())
    return ("weight_decay", "beta1", "beta2", *own)


def check_config(cfg: TrainConfig) -> None:
    """The optimizer's own refusals, run by every :meth:`TrainConfig.validate`
    (registered below; the package's ``__init__`` imports this module)."""
    require(not (cfg.optimizer == "galore_adamw" and cfg.model.arch == "resnet_bk"), GALORE_BK_REFUSAL)


register_train_check("optimizer", check_config)


# ----------------------------------------------------------------------------- roles


def parameter_roles(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """``(name, parameter, role)`` for every trainable parameter of ``model``,
    each once (a tied weight under its first name), in ``named_parameters`` order.
    The roles are explained in the module docstring."""
    # imported here: config validation imports this module for its name lists alone
    from .bk.layers import MoEFFN
    from .model import CausalLM

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {id(m.lm_head.weight) for m in model.modules() if isinstance(m, CausalLM)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    stacks = {id(p) for m in model.modules() if isinstance(m, MoEFFN) for p in (m.up, m.down)}
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            role = "embedding"
        elif id(p) in heads:
            role = "head"
        elif p.dim() < 2:
            role = "vector"
        elif (id(p) in linear and p.dim() == 2 or id(p) in stacks and p.dim() == 3) and min(p.shape[-2:]) > 1:
            role = "hidden"
        else:
            role = "other_matrix"
        out.append((name, p, role))
    return out


def _split(model: nn.Module, special_roles: tuple[str, ...] = ()) -> tuple[list, list, list]:
    """(parameters whose role is in ``special_roles``, other decayed ones, undecayed ones)."""
    special, decay, no_decay = [], [], []
    for _, p, role in parameter_roles(model):
        if role in special_roles:
            special.append(p)
        elif role in DECAYED_ROLES:
            decay.append(p)
        else:
            no_decay.append(p)
    return special, decay, no_decay


def _groups(kind: str, decay: list, no_decay: list, weight_decay: float) -> list[dict[str, Any]]:
    """The decayed and undecayed groups (empty ones left out)."""
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [dict(g, lr_scale=1.0, kind=kind) for g in groups if g["params"]]


# ----------------------------------------------------------------------------- building


def make_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
               device_type: str) -> torch.optim.AdamW:
    """AdamW over every trainable parameter: decay on ``hidden``, ``head`` and
    ``other_matrix`` roles (all matrices but embeddings), none on the rest."""
    _, decay, no_decay = _split(model)
    # The fused kernel is the fastest on CUDA; it does not exist for CPU tensors on older torch.
    opt = torch.optim.AdamW(_groups("adamw", decay, no_decay, weight_decay), lr=lr, betas=betas,
                            fused=device_type == "cuda")
    return _tagged(opt, "adamw")


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer | CombinedOptimizer:
    """The optimizer ``cfg.optimizer`` names, over the trainable parameters of
    ``model`` (pass the model and any extra heads together, e.g. an
    ``nn.ModuleList``). Raises :class:`ConfigError` with one line when the
    optimizer's package (or torch's Muon) is missing."""
    kind = cfg.optimizer
    betas = (cfg.beta1, cfg.beta2)
    if kind == "adamw":
        return make_adamw(model, cfg.lr, cfg.weight_decay, betas, device_type)
    if kind == "lion":
        _, decay, no_decay = _split(model)
        return _make_lion(_groups("lion", decay, no_decay, cfg.weight_decay), cfg.lr, betas, "optimizer = lion")
    if kind == "adamw8bit":
        _, decay, no_decay = _split(model)
        return _adamw8bit_class()(_groups(kind, decay, no_decay, cfg.weight_decay), lr=cfg.lr, betas=betas)
    if kind == "galore_adamw":
        low_rank, decay, no_decay = _split(model, special_roles=("hidden",))
        # GaLore projects 2-D gradients only: expert stacks are refused, not quietly handed to plain AdamW
        # (also for a ResNet-BK model passed with a config of another arch)
        if any(p.dim() != 2 for p in low_rank):
            raise ConfigError(GALORE_BK_REFUSAL)
        cls = _galore_adamw_class()
        groups = _groups(kind, decay, no_decay, cfg.weight_decay)
        if low_rank:
            groups.insert(0, {"params": low_rank, "weight_decay": cfg.weight_decay, "lr_scale": 1.0, "kind": kind,
                              "rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_proj_gap,
                              "scale": cfg.galore_scale, "proj_type": "std"})
        return _tagged(cls(groups, lr=cfg.lr, betas=betas, eps=1e-8, no_deprecation_warning=True), kind)
    if kind == "muon":
        return _make_muon_combined(model, cfg, device_type)
    raise ConfigError(f"training.optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")


def _make_muon_combined(model: nn.Module, cfg: TrainConfig, device_type: str) -> CombinedOptimizer:
    muon_cls = _muon_class()
    matrices, decay, no_decay = _split(model, special_roles=("hidden",))
    betas = (cfg.beta1, cfg.beta2)
    fallback_groups = _groups(cfg.muon_fallback, decay, no_decay, cfg.weight_decay)
    parts: dict[str, torch.optim.Optimizer] = {}
    if cfg.muon_fallback == "lion":
        # checked even when no parameter needs Lion: a missing package fails alike for every model
        _require_module("lion_pytorch", "training.muon_fallback = lion")
    if fallback_groups:
        parts[cfg.muon_fallback] = (
            _make_lion(fallback_groups, cfg.lr, betas, "training.muon_fallback = lion") if cfg.muon_fallback == "lion"
            else _tagged(torch.optim.AdamW(fallback_groups, lr=cfg.lr, betas=betas, fused=device_type == "cuda"), "adamw"))
    if matrices:
        group = {"params": matrices, "lr_scale": cfg.muon_lr / cfg.lr, "kind": "muon"}
        parts["muon"] = _tagged(muon_cls([group], lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True,
                                         weight_decay=cfg.muon_weight_decay, adjust_lr_fn=cfg.muon_adjust_lr), "muon")
    return CombinedOptimizer(parts)


def require_packages(cfg: TrainConfig) -> None:
    """Import the optional packages ``cfg``'s optimizer needs, or raise one
    :class:`ConfigError` line naming the missing one: what :func:`build_optimizer`
    would find only once the model is built, for callers that check before running
    anything (a race checks every arm before its first)."""
    if cfg.optimizer == "lion":
        _require_module("lion_pytorch", "optimizer = lion")
    elif cfg.optimizer == "adamw8bit":
        _require_module("bitsandbytes", "optimizer = adamw8bit")
    elif cfg.optimizer == "galore_adamw":
        _require_module("galore_torch", "optimizer = galore_adamw")
        _require_module("galore_torch.galore_projector", "optimizer = galore_adamw")
    elif cfg.optimizer == "muon":
        _muon_class()
        if cfg.muon_fallback == "lion":
            _require_module("lion_pytorch", "training.muon_fallback = lion")


def _require_module(module: str, what: str) -> Any:
    """Import an optional package, or raise one line naming the missing one."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or module).split(".")[0]
        pip_name, extra = _PACKAGES.get(missing, (missing, None))
        hint = f"pip install {pip_name}" + (f", or the sparsetrain[{extra}] extra" if extra else "")
        raise ConfigError(f"{what} needs the {pip_name} package, which is not installed ({hint})") from None


def _make_lion(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], what: str) -> torch.optim.Optimizer:
    lion = _require_module("lion_pytorch", what)
    return _tagged(lion.Lion(groups, lr=lr, betas=betas), "lion")


# ----------------------------------------------------------------------------- Muon


def _muon_adjust_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-shape lr scale (``original``: ``sqrt(max(1, rows / cols))``;
    ``match_rms_adamw``: ``0.2 sqrt(max(rows, cols))``)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def _closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """What an optimizer's ``step(closure)`` returns: the loss the closure re-evaluates
    (with gradients on, inside a ``no_grad`` step), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


_MUON_CLASS: type | None = None


def newton_schulz(updates: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype = torch.bfloat16, *, use_addmm: bool = True) -> torch.Tensor:
    """torch.optim.Muon's Newton–Schulz orthogonalisation
    (``torch.optim._muon._zeropower_via_newtonschulz``) of a batch
    ``[k, rows, cols]`` of matrices at once, each on its own: cast to ``dtype``,
    tall matrices (rows > cols) transposed, each divided by its own Frobenius
    norm clamped at ``eps``, then ``steps`` times ``G = X Xᵀ; U = bG + cG²;
    X = aX + UX`` (as ``baddbmm``, like torch's ``addmm``; ``use_addmm=False``:
    torch's unfused form, which torch versions with a ``use_addmm`` option run
    by default). Returns ``[k, rows, cols]`` in ``dtype``."""
    if updates.dim() != 3:
        raise ValueError(f"newton_schulz takes a [k, rows, cols] batch, got shape {tuple(updates.shape)}")
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")  # torch's check
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = x.size(1) > x.size(2)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # a new tensor: never writes `updates`
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        if use_addmm:
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            x = a * x + (b * gram + c * gram @ gram) @ x  # torch's expression, association included
    return x.mT if tall else x


def _muon_class() -> type:
    """:class:`torch.optim.Muon`, extended to ``[E, out, in]`` expert stacks
    (each of the E matrices orthogonalised, scaled and decayed on its own,
    exactly as if it were a separate 2-D parameter) and batched: a step runs
    torch's per-matrix update over the matrices of a group shape by shape --
    momentum with ``_foreach`` ops, one :func:`newton_schulz` per shape, decay
    and update with ``_foreach`` ops -- instead of ~10 kernels per matrix. The
    arithmetic is torch's (tests hold it to torch's Muon); the state
    (``momentum_buffer`` a parameter, torch's group options) is torch's, so
    checkpoints move between the two."""
    global _MUON_CLASS
    if _MUON_CLASS is not None:
        return _MUON_CLASS
    base = getattr(torch.optim, "Muon", None)
    if base is None:
        raise ConfigError(f"optimizer = muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
    # the per-shape lr scale: torch's own (torch.optim._muon), or the same formulas where a torch lacks the helper
    adjust_lr = base.__init__.__globals__.get("_adjust_lr", _muon_adjust_lr)
    torch_sig = inspect.signature(base.__init__).parameters
    # torch versions with a use_addmm option run the fused NS only when it is on; the others always
    has_use_addmm = "use_addmm" in torch_sig

    class StackedMuon(base):  # type: ignore[misc, valid-type]
        __doc__ = _muon_class.__doc__
        ns_dtype: torch.dtype = torch.bfloat16  # what torch's Muon orthogonalises in (a test sets float64)

        def __init__(self, params: Any, **hyper: Any) -> None:
            # torch's constructor refuses anything but 2-D parameters; its defaults
            # (whatever this torch version's Muon has) are read off its signature.
            unknown = set(hyper) - set(torch_sig)
            if unknown:
                raise TypeError(f"torch.optim.Muon of torch {torch.__version__} has no option {sorted(unknown)}")
            defaults = {n: p.default for n, p in torch_sig.items() if n not in ("self", "params")}
            defaults.update(hyper)
            torch.optim.Optimizer.__init__(self, params, defaults)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.dim() not in (2, 3):
                        raise ValueError(f"Muon takes matrices and [E, out, in] stacks, got a parameter of shape {tuple(p.shape)}")

        def __setstate__(self, state: dict[str, Any]) -> None:
            # load_state_dict ends here: a state saved by a torch whose Muon had fewer
            # options (use_addmm came and went between versions) gets this one's defaults
            super().__setstate__(state)
            for group in self.param_groups:
                for key, value in self.defaults.items():
                    group.setdefault(key, value)

        def _init_group(self, group, params_with_grad, grads, momentum_bufs):  # type: ignore[override]
            ps: list[torch.Tensor] = []
            gs: list[torch.Tensor] = []
            bs: list[torch.Tensor] = []
            has_complex = super()._init_group(group, ps, gs, bs)  # torch's checks; creates the momentum buffers
            for p, g, b in zip(ps, gs, bs):
                # views: an in-place update of a slice writes the stack (and its momentum)
                params_with_grad.extend(p.unbind(0) if p.dim() == 3 else [p])
                grads.extend(g.unbind(0) if g.dim() == 3 else [g])
                momentum_bufs.extend(b.unbind(0) if b.dim() == 3 else [b])
            return has_complex

        @torch.no_grad()
        def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
            """torch's ``_single_tensor_muon``, shape group by shape group."""
            loss = _closure_loss(closure)
            for group in self.param_groups:
                params: list[torch.Tensor] = []
                grads: list[torch.Tensor] = []
                bufs: list[torch.Tensor] = []
                if self._init_group(group, params, grads, bufs):
                    raise ValueError("Complex parameters are not supported")
                by_shape: dict[tuple, list[int]] = {}
                for i, (p, g) in enumerate(zip(params, grads)):
                    by_shape.setdefault((p.shape, p.dtype, g.dtype, p.device), []).append(i)
                for idx in by_shape.values():
                    self._step_shape([params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx], group)
            return loss

        def _step_shape(self, params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                        group: dict[str, Any]) -> None:
            """Per matrix, as torch: ``buf.lerp_(grad, 1 - μ)``; update =
            ``grad.lerp(buf, μ)`` (Nesterov) or ``buf``; NS; ``param.mul_(1 - lr·wd)``;
            ``param.add_(update, alpha=-adjusted_lr)`` -- for matrices of one shape."""
            lr = group["lr"]
            lr = float(lr.item()) if isinstance(lr, torch.Tensor) else lr  # torch's _to_scalar
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            use_addmm = group.get("use_addmm", False) if has_use_addmm else True
            ortho = newton_schulz(torch.stack(updates), group["ns_steps"], group["ns_coefficients"], group["eps"],
                                  self.ns_dtype, use_addmm=use_addmm)
            # torch adds the bf16 update to the parameter in their promoted dtype (float32 for a
            # float32 parameter: exact from bf16); converting once (a tall batch comes back
            # transposed: laid out like the parameters here) keeps _foreach on its fused path
            ortho = ortho.to(torch.promote_types(params[0].dtype, ortho.dtype), memory_format=torch.contiguous_format)
            decay = 1 - lr * group["weight_decay"]
            if decay != 1:  # torch multiplies by 1.0 too: a no-op
                torch._foreach_mul_(params, decay)
            torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-adjust_lr(lr, group["adjust_lr_fn"], params[0].shape))

    _MUON_CLASS = StackedMuon
    return StackedMuon


# ----------------------------------------------------------------------------- 8-bit AdamW, GaLore


def _adamw8bit_class() -> type:
    """bitsandbytes' AdamW8bit, refusing another optimizer's state (its
    ``load_state_dict`` does not run torch's load hooks)."""
    bnb = _require_module("bitsandbytes", "optimizer = adamw8bit")

    class CheckedAdamW8bit(bnb.optim.AdamW8bit):
        def load_state_dict(self, state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            check_kind(state_dict, "adamw8bit")
            super().load_state_dict(state_dict, *args, **kwargs)

    return CheckedAdamW8bit



def _galore_adamw_class() -> type:
    """galore-torch's AdamW whose ``state_dict`` holds tensors only: its
    projector (a Python object) is saved as its projection matrix and rebuilt
    on load, so checkpoints load with ``torch.load(weights_only=True)`` and a
    resumed run keeps the projection it had."""
    galore = _require_module("galore_torch", "optimizer = galore_adamw")
    from galore_torch.galore_projector import GaLoreProjector

    class TensorStateGaLoreAdamW(galore.GaLoreAdamW):
        def state_dict(self) -> dict[str, Any]:
            sd = super().state_dict()
            state = {}
            for k, s in sd["state"].items():
                s = dict(s)  # torch hands out the live per-parameter dicts
                projector = s.pop("projector", None)
                if projector is not None and projector.ortho_matrix is not None:
                    s["galore_ortho_matrix"] = projector.ortho_matrix
                state[k] = s
            return {"state": state, "param_groups": sd["param_groups"]}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                for p in group["params"]:
                    s = self.state.get(p)
                    if s and "galore_ortho_matrix" in s:
                        proj = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                               scale=group["scale"], proj_type=group["proj_type"])
                        proj.ortho_matrix = s.pop("galore_ortho_matrix")
                        s["projector"] = proj

    return TensorStateGaLoreAdamW


# ----------------------------------------------------------------------------- one optimizer


def _tagged(opt: torch.optim.Optimizer, kind: str) -> torch.optim.Optimizer:
    """Refuse, with one line, to load another optimizer's state into ``opt``
    (a run resumed with a different ``optimizer``): torch would take it and
    step with the wrong moments."""
    opt.register_load_state_dict_pre_hook(lambda _opt, state_dict: check_kind(state_dict, kind))
    return opt


def check_kind(state_dict: dict[str, Any], kind: str) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` is the state of a
    ``kind`` optimizer. Groups carry ``kind``; states saved before it existed
    were AdamW's."""
    if "combined" in state_dict:
        saved = {"+".join(state_dict["combined"])}
    else:
        saved = {g.get("kind", "adamw") for g in state_dict.get("param_groups", [])}
    if saved != {kind}:
        raise CheckpointError(f"the checkpoint's optimizer state is {', '.join(sorted(saved)) or 'empty'}, "
                              f"this run's optimizer is {kind}; resume with the optimizer it was trained with")


class _CombinedState(collections.abc.MutableMapping):
    """The parts' ``state`` mappings seen as one (``clear()`` clears them all)."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        self._parts = parts

    def _owner(self, p: torch.Tensor) -> torch.optim.Optimizer:
        for opt in self._parts.values():
            if any(q is p for g in opt.param_groups for q in g["params"]):
                return opt
        raise KeyError(p)

    def __getitem__(self, p: torch.Tensor) -> Any:
        return self._owner(p).state[p]

    def __setitem__(self, p: torch.Tensor, value: Any) -> None:
        self._owner(p).state[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self._owner(p).state[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for opt in self._parts.values():
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._parts.values())

    def clear(self) -> None:
        for opt in self._parts.values():
            opt.state.clear()


class CombinedOptimizer:
    """Several optimizers over disjoint parameters, driven as one: what a
    training loop uses of an optimizer -- ``param_groups`` (the parts' live
    group dicts, so writing ``group["lr"]`` reaches them), ``state``,
    ``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` -- works
    on the whole. ``parts`` maps a name to each optimizer; group order is the
    parts' order."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        if not parts:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        seen: set[int] = set()
        for opt in parts.values():
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError("a parameter is in two of the combined optimizers")
                    seen.add(id(p))
        self.parts = dict(parts)
        self.defaults: dict[str, Any] = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # rebuilt on every read: torch's load_state_dict replaces a part's group dicts
        return [g for opt in self.parts.values() for g in opt.param_groups]

    @property
    def state(self) -> _CombinedState:
        return _CombinedState(self.parts)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One step of every part; ``closure`` (re-evaluating the loss) runs once."""
        loss = _closure_loss(closure)
        for opt in self.parts.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"combined": {name: opt.state_dict() for name, opt in self.parts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_kind(state_dict, "+".join(self.parts))
        for name, opt in self.parts.items():
            opt.load_state_dict(state_dict["combined"][name])

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(f'{n}={type(o).__name__}' for n, o in self.parts.items())})"


def state_bytes(optimizer: torch.optim.Optimizer | CombinedOptimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, momentum buffers,
    8-bit quantisation maps, GaLore projections); what the optimizer adds to
    the memory of the parameters and their gradients."""
    total = 0
    for s in optimizer.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and isinstance(v.ortho_matrix, torch.Tensor):  # a GaLore projector
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total
