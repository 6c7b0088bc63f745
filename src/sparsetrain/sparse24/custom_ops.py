"""The 2:4 FFN's fast paths as torch custom ops, so torch.compile keeps them
in its graph as opaque nodes instead of breaking the graph at every FFN.

:func:`ffn_op` registers a forward ``(x, w_up, w_down) -> (y, *saved)`` and its
backward ``(dy, x, w_up, w_down, *saved) -> (dx, d_w_up, d_w_down)`` as
``sparsetrain::<name>`` and ``sparsetrain::<name>_backward``, tied together with
``register_autograd``. The saved tensors are outputs of the forward op (a
custom op cannot keep state), and the weights are cast to ``x``'s dtype again
in the backward (the bf16 copies are not outputs: an output may not alias an
input, which a cast to the same dtype would).
"""

from __future__ import annotations

from typing import Callable

import torch

Saved = tuple[torch.Tensor, ...]


def ffn_op(name: str, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
           backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           fake_saved: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Saved]
           ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Register the op pair (see the module docstring); return ``f(x, w_up, w_down) -> y``.

    ``fake_saved(x, w_up, w_down)``: empty tensors shaped like the saved ones
    (what torch.compile traces with)."""
    n_saved = len(fake_saved(torch.empty(64, 64, device="meta"), torch.empty(64, 64, device="meta"),
                             torch.empty(64, 64, device="meta")))
    saved_args = "".join(f", Tensor s{i}" for i in range(n_saved))
    fwd = torch.library.custom_op(f"sparsetrain::{name}", forward, mutates_args=(),
                                  schema=f"(Tensor x, Tensor w_up, Tensor w_down) -> ({', '.join(['Tensor'] * (1 + n_saved))})")
    bwd = torch.library.custom_op(f"sparsetrain::{name}_backward", backward, mutates_args=(),
                                  schema=f"(Tensor dy, Tensor x, Tensor w_up, Tensor w_down{saved_args}) -> (Tensor, Tensor, Tensor)")

    @fwd.register_fake
    def _(x, w_up, w_down):
        return (x.new_empty(x.shape[0], w_down.shape[0]), *fake_saved(x, w_up, w_down))

    @bwd.register_fake
    def _(dy, x, w_up, w_down, *saved):
        return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output[1:])

    def grad(ctx, dy, *_unused):
        return bwd(dy, *ctx.saved_tensors)

    fwd.register_autograd(grad, setup_context=setup_context)

    def apply(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        return fwd(x, w_up, w_down)[0]

    apply.op = fwd  # type: ignore[attr-defined]  # for torch.library.opcheck
    return apply
