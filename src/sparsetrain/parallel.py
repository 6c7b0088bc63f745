"""Data parallelism for a :class:`~sparsetrain.model.CausalLM`: DDP or FSDP2, plus
activation checkpointing, gradient accumulation and gradient clipping that work
the same for a plain, a DDP-wrapped and a sharded model.

Order of application (torchtitan's): activation checkpointing wraps each block,
then ``torch.compile`` (each block under FSDP, the whole model under DDP), then
the data-parallel wrapper. ``fully_shard`` goes on each ``model.blocks[i]``
first and on the root last, so the root's group holds what no block holds --
the embedding, the final norm and the LM head -- and a tied embedding/LM-head
weight, used at both ends of the forward, stays in one group.

Under FSDP the optimizer must be built *after* :func:`shard_model`: sharding
replaces every parameter with a sharded ``DTensor`` parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from . import distributed as D
from .config import PARALLEL_KINDS


def mixed_precision_policy(param_dtype: torch.dtype | None, cast_forward_inputs: bool = True) -> MixedPrecisionPolicy:
    """FSDP2's policy: parameters all-gathered and computed in ``param_dtype``
    (``None``: their own dtype, no mixed precision), gradients reduced in float32."""
    if param_dtype is None:
        return MixedPrecisionPolicy(cast_forward_inputs=cast_forward_inputs)
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=cast_forward_inputs)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward instead of keeping
    them (in place: ``model.blocks[i]`` becomes a checkpoint wrapper).

    Non-reentrant checkpointing, the kind that composes with ``fully_shard``
    and ``torch.compile``. The RNG state is saved and replayed, because some
    blocks draw random numbers in the forward (ResNet-BK's Gumbel noise), and
    the recomputation must see the same draws. State-dict keys do not change."""
    blocks = model.blocks
    for i, block in enumerate(blocks):
        if not isinstance(block, CheckpointWrapper):
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def compile_blocks(model: nn.Module, mode: str | None = None) -> None:
    """``torch.compile`` each block in place (``Module.compile``: parameter names
    do not change). Under FSDP the blocks are compiled and the sharding hooks
    around them stay eager."""
    for block in model.blocks:
        block.compile(mode=mode)


def shard_model(model: nn.Module, device: torch.device, world_size: int, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: each block its own group, the root (embedding, final norm,
    LM head and any other root parameters) the last group. Returns ``model``.

    Blocks do not cast their inputs to ``param_dtype``: the RoPE tables they
    receive stay float32 (bfloat16 cos and sin values would lose digits);
    the residual stream reaches them in the dtype the previous group computed."""
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mixed_precision_policy(param_dtype, cast_forward_inputs=False))
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision_policy(param_dtype))
    return model


def wrap_ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over ``module``, registered so that
    :func:`~sparsetrain.distributed.shutdown_distributed` frees its reducer in order."""
    ids = [device.index] if device.type == "cuda" else None
    return D.track_ddp(DistributedDataParallel(module, device_ids=ids))


def parallelize(
    model: nn.Module,
    kind: str,
    info: D.DistInfo,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    compile_mode: str | None = None,
    compile_model: bool = False,
    forward_module: nn.Module | None = None,
) -> nn.Module:
    """Everything above in order; returns the module to call for training.

    ``kind``: ``"ddp"`` or ``"fsdp"``; with one process neither wraps. ``model``
    must have ``blocks``. FSDP shards ``model`` in place (the returned module is
    ``model``); DDP returns the wrapper. ``param_dtype``: FSDP's compute dtype
    (bfloat16 on CUDA; ``None`` keeps the parameters' dtype). ``compile_model``:
    ``torch.compile`` with ``compile_mode`` (``None`` = the default mode).
    ``forward_module``: what DDP wraps and compile compiles instead of ``model``
    (a wrapper around it such as ``ColliderModel``); FSDP refuses one."""
    if kind not in PARALLEL_KINDS:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_KINDS)}, got {kind!r}")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if kind == "fsdp" and info.enabled:
        if forward_module is not None and forward_module is not model:
            raise ValueError(f"parallel = fsdp shards the model itself; it cannot wrap a {type(forward_module).__name__}")
        if compile_model:
            compile_blocks(model, compile_mode)
        return shard_model(model, device, info.world_size, param_dtype)
    module = model if forward_module is None else forward_module
    if compile_model:
        module = torch.compile(module, mode=compile_mode)
    return wrap_ddp(module, device) if info.enabled else module


def _outermost(model: nn.Module) -> nn.Module:
    """``model`` without a ``torch.compile`` wrapper."""
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally for the micro-steps run inside; the first
    backward outside synchronises the sum. DDP: ``no_sync()``; FSDP2: gradient
    reduction off (``set_requires_gradient_sync``), unsharded gradients kept;
    a plain model: nothing to do."""
    target = _outermost(model)
    if isinstance(target, DistributedDataParallel):
        with target.no_sync():
            yield
    elif isinstance(target, FSDPModule):
        target.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            target.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for plain or sharded (DTensor) gradients; returns the
    total norm over all ranks' shards as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def all_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every element of ``params`` is finite (one host sync). Sharded
    (DTensor) parameters are checked shard by shard and the verdict is agreed
    over all ranks, so every rank must call it (a collective)."""
    params = list(params)
    if not params:
        return True
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    ok = torch.stack([torch.isfinite(t).all() for t in local]).all().to(torch.int32)
    if any(isinstance(p, DTensor) for p in params) and torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or its compiled original) went through :func:`shard_model`."""
    return isinstance(_outermost(model), FSDPModule)
