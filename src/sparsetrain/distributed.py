"""torch.distributed set-up and teardown for ``torchrun`` (NCCL on GPU, gloo on CPU).

Teardown order matters with gloo. ``ProcessGroupGloo``'s destructor joins its
worker threads; a worker that is still dropping the last reference to a
finished collective's tensors may need the GIL (a tensor whose Python object
C++ keeps alive is freed through a Python decref). Destroyed through its Python
handle, the group releases the GIL first, so the worker finishes and the join
returns. Destroyed by a C++ owner that holds the GIL -- DDP's ``Reducer``, whose
binding keeps the GIL in its destructor -- the join and the worker wait for
each other forever. :func:`shutdown_distributed` therefore waits until every
rank's collectives are done, frees every DDP reducer while the process group
still has its Python owners, and only then destroys the group.

Two things keep a group alive past ``destroy_process_group`` and hand its
destruction to such an owner or to interpreter shutdown:

* ``torch.distributed.nn.functional`` evaluates ``group=group.WORLD`` as default
  arguments when it is first imported; DDP's constructor imports it through
  ``torch._dynamo``. Imported after ``init_process_group``, its functions hold
  the default group for the life of the process, so :func:`init_distributed`
  imports it first (the defaults are then ``None``: "the default group").
* a live DDP wrapper: its C++ reducer (the dangerous owner) and its Python
  ``process_group`` attribute; :func:`track_ddp` registers wrappers whose
  reducer, logger and group :func:`shutdown_distributed` releases.

FSDP2's sharded parameters (DTensors) and DTensor's sharding caches hold the
group through Python references only; those release the GIL when they go.
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_DDP_WRAPPERS: weakref.WeakSet[DistributedDataParallel] = weakref.WeakSet()


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``world_size`` 1: a single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that ``torchrun`` described in the environment.

    Without ``WORLD_SIZE`` (or with 1) this is a no-op single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world)
    if not dist.is_initialized():
        # before the group exists, so that its default arguments do not pin it (module docstring)
        import torch.distributed.nn.functional  # noqa: F401

        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def track_ddp(wrapper: DistributedDataParallel) -> DistributedDataParallel:
    """Register a DDP wrapper whose reducer :func:`shutdown_distributed` frees
    before it destroys the process group (weakly: a wrapper freed earlier is
    simply gone). Returns ``wrapper``."""
    _DDP_WRAPPERS.add(wrapper)
    return wrapper


def release_ddp(wrapper: DistributedDataParallel) -> None:
    """Free ``wrapper``'s reducer and logger and drop its process group now; the
    wrapper cannot run a forward or backward afterwards."""
    for name in ("reducer", "logger", "process_group"):
        if name in wrapper.__dict__:
            delattr(wrapper, name)
    _DDP_WRAPPERS.discard(wrapper)


def shutdown_distributed(synchronize: bool = True) -> None:
    """Tear the process group down in an order that cannot deadlock (module docstring).

    ``synchronize``: wait at a barrier first, so that no rank destroys the group
    while a peer's collective still involves it, and gloo has finished this
    rank's queued work. Pass ``False`` when leaving on an error, where a peer
    may never reach the barrier. A barrier that fails (a peer already gone)
    is reported with a warning and the teardown goes on."""
    if not dist.is_initialized():
        return
    if synchronize:
        try:
            barrier_all()
        except RuntimeError as e:  # DistBackendError and gloo's connection errors are RuntimeErrors
            warnings.warn(f"rank {dist.get_rank()}: the barrier before destroying the process group failed "
                          f"({str(e).splitlines()[0][:200]}); tearing down anyway", RuntimeWarning, stacklevel=2)
    for wrapper in list(_DDP_WRAPPERS):
        release_ddp(wrapper)
    gc.collect()  # unreachable wrappers (reference cycles) free their reducers now, not at exit
    dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if info.enabled:
        barrier_all()


def barrier_all() -> None:
    """Wait for every rank of the default group, if there is one with several ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":  # NCCL's barrier needs this rank's device
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``t`` over ranks (a copy; ``t`` itself is unchanged)."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t
