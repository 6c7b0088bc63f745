"""Which kernels run: what this machine can run (decided once per process) and
the dispatch policy (what to run where several kernels could).

Availability::

    kernels.triton_available()            # Triton importable
    kernels.cusparselt_available()        # torch's cuSPARSELt 2:4 products (CUDA, sm80+)
    kernels.cudnn_attention_available()   # aten's cuDNN SDPA op on a CUDA device

The policy is one frozen :class:`KernelPolicy`, read by the modules that
dispatch (:func:`sparsetrain.cross_entropy.cross_entropy`, the ``relu2_24`` FFN,
:func:`sparsetrain.sparse24.cslt_plans.sparse_mm`, Collider's attention and
kept-query kernel, :mod:`sparsetrain.hyper_mixing`). A module that is given a
policy uses it; one that is not reads :func:`current`. The trainer builds its
run's policy from the config's ``[kernels]`` section (:meth:`KernelPolicy.from_config`),
hands it to the modules that take one and runs every step under it
(:func:`using`), so runs with different policies in one process stay apart.
Outside a trainer, :func:`current` is the library default: the ``[kernels]``
defaults, the environment's (``SPARSETRAIN_CSLT_PLANS``,
``SPARSETRAIN_ATTENTION_IMPL``, read by :func:`sparsetrain.config.env_default`)
read at its first call (to torch.compile a constant, so a first read inside a compiled
call adds no guard and no recompile). To change it, for a benchmark or a test::

    with kernels.using(fused_cross_entropy=False, cusparselt_min_width=0):
        ...                        # every module without its own policy sees these values
    kernels.set_policy(kernels.KernelPolicy(attention_impl="flash"))  # for the rest of the process

Nearly a leaf: it imports only :mod:`sparsetrain.config` (a leaf but for
:mod:`sparsetrain.errors`), so every other module may import it; the policy's
values are checked by the config's own check of its ``[kernels]`` section.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .config import ENV_DEFAULTS, TrainConfig, check_kernels, env_default


# Each answer is computed once and cached in a module global. assume_constant_result:
# under torch.compile, dynamo runs the function eagerly once and treats the answer as
# a constant (it will not trace torch.backends.*.is_available()). Not functools.cache:
# dynamo looks through an lru_cache wrapper and traces the function inside it, marker
# and all, which is the graph break this avoids.
_AVAILABLE: dict[str, bool] = {}


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _probe_cusparselt() -> bool:
    try:
        return bool(torch.cuda.is_available() and torch.backends.cusparselt.is_available()
                    and torch.cuda.get_device_capability() >= (8, 0) and hasattr(torch, "_cslt_sparse_mm"))
    except (AttributeError, RuntimeError):
        return False


def _probe_cudnn_attention() -> bool:
    return bool(torch.cuda.is_available() and torch.backends.cudnn.is_available()
                and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"))


def _available(name: str, probe) -> bool:
    if name not in _AVAILABLE:
        _AVAILABLE[name] = probe()
    return _AVAILABLE[name]


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Is Triton importable here (on the GPU, or through its CPU interpreter in tests)?"""
    return _available("triton", _probe_triton)


@torch.compiler.assume_constant_result
def cusparselt_available() -> bool:
    """Can torch's cuSPARSELt 2:4 products run here (CUDA, sm80+, cuSPARSELt built in)?"""
    return _available("cusparselt", _probe_cusparselt)


@torch.compiler.assume_constant_result
def cudnn_attention_available() -> bool:
    """Does this torch have aten's cuDNN attention op, with CUDA and cuDNN present?
    (A given shape may still be refused at its first call; callers fall back then.)"""
    return _available("cudnn_attention", _probe_cudnn_attention)


@dataclass(frozen=True)
class KernelPolicy:
    """Which kernel a module runs where several could. Frozen: a changed policy
    is a new object (:meth:`replace`), so no module sees half a change."""

    fused_cross_entropy: bool = True
    """Mean cross-entropy and the Collider kept-rows loss by the Triton kernels on CUDA (else plain torch)."""
    cached_cslt_plans: bool = True
    """cuSPARSELt 2:4 products on sparsetrain's cached plans where the extension builds (else torch's op)."""
    cusparselt_min_width: int = 1280
    """``relu2_24`` transposable FFN on cuSPARSELt from this d_model up; below it the masked Triton
    kernel on dense GEMMs. Measured crossing: bench/results/sparse24_steps_relu_squared_h200.json."""
    attention_impl: str = "auto"
    """Collider's attention: auto (cuDNN, else flash), cudnn, flash or recompute (plain SDPA, recomputed in backward)."""
    fused_hyper_mixing: bool = True
    """Hyper-connection stream mixing by the Triton kernels on CUDA outside torch.compile (else plain torch)."""
    fused_hyper_mixing_compiled: bool = True
    """The same kernels inside torch.compile, as the ``sparsetrain::hyper_mix`` custom ops (else plain
    torch, which inductor fuses with its neighbours). Faster than inductor's fusion at n = 2 and 4:
    bench/results/steps/hyper_nano-125m_compiled_kernels_h100.json and hyper_d20_compiled_kernels_h100.json."""
    kept_kernel_max_keep: float = 0.65
    """Collider's kept-query attention backward kernel up to this kept fraction (auto mode);
    measured in bench/results/collider_step_sync_free_h200.json."""

    def __post_init__(self) -> None:
        check_kernels(self)  # the config's own check of its [kernels] section

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelPolicy:
        """The default policy with the environment's overrides (``environ``, default
        ``os.environ``): ``SPARSETRAIN_CSLT_PLANS=0`` (torch's cuSPARSELt op, no cached
        plans) and ``SPARSETRAIN_ATTENTION_IMPL``, as a config's defaults take them
        (:func:`sparsetrain.config.env_default`)."""
        return cls(**{name: env_default(name, environ) for name in ENV_DEFAULTS})

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> KernelPolicy:
        """The policy of a :class:`~sparsetrain.config.TrainConfig`'s ``[kernels]`` section
        (its fields carry this class's names)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def replace(self, **changes) -> KernelPolicy:
        """A copy with ``changes`` (field names as above)."""
        return dataclasses.replace(self, **changes)


_current: KernelPolicy | None = None  # set by set_policy or using; None: the default, _default()
_DEFAULT: KernelPolicy | None = None  # the library default, read from the environment at its first use


# assume_constant_result: the default is read once and is a constant of the process, so
# torch.compile runs this eagerly and takes its answer as a constant. Without it the
# first read, often inside a compiled model's first call (cross_entropy's), was traced:
# its graph was guarded on the default being unread, and the next call recompiled.
# Only ``_current`` (None until set_policy or using) is a guard of compiled code: a
# changed policy still reaches it, with a recompile.
@torch.compiler.assume_constant_result
def _default() -> KernelPolicy:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = KernelPolicy.from_env()
    return _DEFAULT


def current() -> KernelPolicy:
    """The process's policy, for code run outside a trainer (or a :func:`using` block): the
    defaults with the environment's overrides, read at the first call, unless set since."""
    return _default() if _current is None else _current


def set_policy(policy: KernelPolicy) -> KernelPolicy:
    """Make ``policy`` the process's; returns the one it replaces."""
    global _current
    previous = current()
    _current = policy
    return previous


@contextlib.contextmanager
def using(policy: KernelPolicy | None = None, **changes) -> Iterator[KernelPolicy]:
    """``policy`` (default: the current one), with ``changes``, as the process's
    policy inside the block; the previous one is restored after it."""
    global _current
    new = (policy or current()).replace(**changes) if changes else (policy or current())
    previous, _current = _current, new  # as it was: the default (None) stays the default
    try:
        yield new
    finally:
        _current = previous
