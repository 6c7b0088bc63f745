"""BK-Core: the diagonal of the resolvent of a tridiagonal operator, in O(N).

``H`` is the N x N tridiagonal matrix with diagonal ``a_i = -2 + v_i`` and ones
on both off-diagonals (a discrete Laplacian plus a potential ``v``). For a
complex shift ``z`` with ``Im z != 0`` the op returns the real features
``(Re G_ii, Im G_ii)`` of ``G = (H - zI)^-1``.

Why ratios instead of the textbook theta/phi recursions. The determinants
``theta_i`` of the leading blocks (and ``phi_i`` of the trailing ones) grow like
``|a|^i`` and overflow float32 after a few hundred positions. Their ratios

    r_i = theta_i / theta_{i-1} = (a_i - z) - 1 / r_{i-1}          (left to right)
    s_i = phi_i / phi_{i+1}     = (a_i - z) - 1 / s_{i+1}          (right to left)

do not: by induction ``Im r_i <= -Im z`` (for ``Im z > 0``), so ``|r_i| >= |Im z|``
and every ``1/r`` is bounded by ``1/|Im z|``. In these terms

    G_ii  = theta_{i-1} phi_{i+1} / theta_N = 1 / (r_i + s_i - (a_i - z))
    G^(i)_ii = theta_{i-1} / theta_i = 1 / r_i      (resolvent of the leading i x i block)

The second line is the **causal** mode: it uses ``v_1..v_i`` only, so it is the
one a language model may use. The first (bidirectional) reads the whole
sequence, future included, and is refused by the LM.

Backward (vector-Jacobian product, O(N) time and memory). With upstream
gradients ``g_re, g_im`` let ``w_i = g_re_i - 1j g_im_i`` so the loss is
``Re sum_i w_i G_ii``. ``dG_ii/dv_j = -G_ij G_ji = -G_ij^2`` (H is symmetric) and
the off-diagonal entries follow from the diagonal by products of the ratios,
``G_ij = G_jj prod_{k=i}^{j-1} (-1/r_k)`` for ``i <= j`` and
``G_ij = G_jj prod_{k=j+1}^{i} (-1/s_k)`` for ``i >= j``. Hence

    grad v_j = Re( -G_jj^2 (A_j + B_j) ),
    A_j = w_j + A_{j-1} / r_{j-1}^2,   B_j = (w_{j+1} + B_{j+1}) / s_{j+1}^2

two contracting linear recurrences. Causal mode is reverse mode through the
``r`` recursion: ``lam_j = (lam_{j+1} - w_j) / r_j^2``, ``grad v_j = Re lam_j``.

Layout. Inputs are ``v[..., N]`` (any leading dims, float32/float64; half
precision is upcast to float32). The recursions run over ``[N, R]`` tensors
(R = rows = product of leading dims) so every step touches one contiguous row.
The torch path below is the reference and the CPU fallback; ``triton_core``
runs the same recurrences on the GPU, one lane per row.
"""

from __future__ import annotations

import math

import torch

from ..errors import SparsetrainError
from ..triton_util import interpreting

DEFAULT_Z = 1j


class BKCoreError(SparsetrainError, ValueError):
    """A potential or shift the recursions cannot handle (non-finite or overflowing)."""


def _limit(dtype: torch.dtype) -> float:
    """Largest |v| whose squared ratios stay finite: |r|^2 must not overflow."""
    return 1e150 if dtype == torch.float64 else 1e18


def check_inputs(v: torch.Tensor, z: complex) -> None:
    """Raise :class:`BKCoreError` for a shift on the real axis or a potential
    that is non-finite or large enough to overflow ``|r|^2`` in ``v``'s precision."""
    z = complex(z)
    if z.imag == 0 or not math.isfinite(z.real) or not math.isfinite(z.imag):
        raise BKCoreError(f"BK-Core shift z must be finite with a nonzero imaginary part, got {z}")
    if v.numel() == 0:
        return
    limit = _limit(v.dtype)
    vmax = v.detach().abs().amax()
    if not bool(torch.isfinite(vmax) & (vmax < limit)):  # one host sync for both checks
        bad = ~torch.isfinite(v.detach()) | (v.detach().abs() >= limit)
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise BKCoreError(
            f"BK-Core potential v{list(idx)} = {v.detach()[idx].item()} would overflow the "
            f"{str(v.dtype).replace('torch.', '')} recursions (need finite |v| < {limit:g})"
        )


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _ratios(a_z: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``r_i = a_z[i] - 1/r_{i-1}`` along dim 0 (``reverse``: from the end). ``[N, R]``."""
    N = a_z.shape[0]
    out = torch.empty_like(a_z)
    order = range(N - 1, -1, -1) if reverse else range(N)
    prev = None
    for i in order:
        prev = a_z[i] if prev is None else a_z[i] - 1.0 / prev
        out[i] = prev
    return out


def forward_torch(v_nr: torch.Tensor, z: complex, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reference recursions on ``v[N, R]``: returns ``(G, r, s)`` complex ``[N, R]``
    (``s`` is None in causal mode). A Python loop over positions: the fallback,
    and the baseline the GPU kernel is benchmarked against."""
    a_z = (v_nr - 2.0).to(_complex_dtype(v_nr.dtype)) - z
    r = _ratios(a_z, reverse=False)
    if causal:
        return 1.0 / r, r, None
    s = _ratios(a_z, reverse=True)
    return 1.0 / (r + s - a_z), r, s


def backward_torch(w: torch.Tensor, G: torch.Tensor, r: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """Real gradient w.r.t. ``v[N, R]`` of ``Re sum w * G`` (see the module docstring)."""
    N = w.shape[0]
    q_r = (1.0 / r) ** 2
    grad = torch.empty(w.shape, dtype=w.real.dtype, device=w.device)
    if s is None:
        lam = torch.zeros_like(w[0])
        for j in range(N - 1, -1, -1):
            lam = (lam - w[j]) * q_r[j]
            grad[j] = lam.real
        return grad
    q_s = (1.0 / s) ** 2
    A = torch.empty_like(w)
    acc = w[0]
    A[0] = acc
    for j in range(1, N):
        acc = w[j] + acc * q_r[j - 1]
        A[j] = acc
    B = torch.zeros_like(w[0])
    for j in range(N - 1, -1, -1):
        if j < N - 1:
            B = (w[j + 1] + B) * q_s[j + 1]
        grad[j] = (-(G[j] ** 2) * (A[j] + B)).real
    return grad


def _use_triton(v: torch.Tensor, impl: str) -> bool:
    if impl == "torch":
        return False
    from .triton_core import triton_available

    ok = triton_available() and v.dtype == torch.float32 and (v.is_cuda or interpreting())
    if impl == "triton" and not ok:
        raise BKCoreError("impl='triton' needs Triton and a float32 CUDA tensor (or TRITON_INTERPRET=1)")
    return ok and (impl == "triton" or v.is_cuda)


class BKCoreFunction(torch.autograd.Function):
    """Autograd op on ``v[N, R]`` (already laid out); returns ``(Re G, Im G)`` ``[N, R]`` each."""

    @staticmethod
    def forward(ctx, v_nr: torch.Tensor, z: complex, causal: bool, use_triton: bool):  # type: ignore[override]
        if use_triton:
            from .triton_core import forward_triton

            G, r, s = forward_triton(v_nr, z, causal)
        else:
            G, r, s = forward_torch(v_nr, z, causal)
        ctx.causal, ctx.use_triton = causal, use_triton
        ctx.save_for_backward(G, r, s) if s is not None else ctx.save_for_backward(G, r)
        return G.real.contiguous(), G.imag.contiguous()

    @staticmethod
    def backward(ctx, g_re: torch.Tensor, g_im: torch.Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        G, r, s = (saved[0], saved[1], None) if ctx.causal else saved
        dtype = G.real.dtype
        g_re = torch.zeros_like(G.real) if g_re is None else g_re.to(dtype)
        g_im = torch.zeros_like(G.real) if g_im is None else g_im.to(dtype)
        if ctx.use_triton:
            from .triton_core import backward_triton

            grad = backward_triton(g_re, g_im, G, r, s)
        else:
            grad = backward_torch(torch.complex(g_re, -g_im), G, r, s)
        return grad, None, None, None


@torch.compiler.disable
def _apply(v_nr: torch.Tensor, z: complex, causal: bool, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`BKCoreFunction` kept opaque to torch.compile: inductor would
    recompile its Triton scan kernels itself and fails on their complex
    associative scan; around it, a compiled model fuses everything else."""
    return BKCoreFunction.apply(v_nr, z, causal, triton)


def bk_core(v: torch.Tensor, z: complex = DEFAULT_Z, causal: bool = True, impl: str = "auto",
            check: bool = True) -> torch.Tensor:
    """Resolvent-diagonal features ``[..., N, 2]`` = ``(Re, Im)`` of ``G_ii`` for potentials ``v[..., N]``.

    ``causal=True`` (the default, and the only mode a language model may use)
    returns ``G^(i)_ii``, the resolvent of the leading ``i x i`` block: position
    ``i`` depends on ``v_1..v_i`` only. ``causal=False`` returns the full
    resolvent's diagonal, which depends on every position (future included).

    ``impl``: ``auto`` (Triton on CUDA float32, else the torch loop), ``triton``
    or ``torch``. Computation is float32 (complex64), or float64 for float64
    input; half-precision input is upcast and the output cast back.
    Raises :class:`BKCoreError` for non-finite/overflowing ``v`` or real ``z``;
    ``check=False`` skips the value check (one host sync) for callers whose ``v``
    is bounded by construction.
    """
    if impl not in ("auto", "triton", "torch"):
        raise BKCoreError(f"impl must be auto, triton or torch, got {impl!r}")
    if v.dim() < 1:
        raise BKCoreError(f"v must have a sequence dimension, got shape {tuple(v.shape)}")
    out_dtype = v.dtype
    work = v if v.dtype in (torch.float32, torch.float64) else v.float()
    if check:
        check_inputs(work, z)
    elif complex(z).imag == 0:
        raise BKCoreError(f"BK-Core shift z must have a nonzero imaginary part, got {z}")
    lead, N = work.shape[:-1], work.shape[-1]
    v_nr = work.reshape(-1, N).t().contiguous()
    re, im = _apply(v_nr, complex(z), bool(causal), _use_triton(work, impl))
    feats = torch.stack((re.t(), im.t()), dim=-1).reshape(*lead, N, 2)
    return feats.to(out_dtype)


def resolvent_dense(v: torch.Tensor, z: complex = DEFAULT_Z, causal: bool = False) -> torch.Tensor:
    """Naive O(N^3) reference with ``torch.linalg.inv`` (tests only): complex ``G_ii``
    ``[..., N]``; causal mode inverts every leading block (O(N^4), keep N small)."""
    N = v.shape[-1]
    cdt = _complex_dtype(v.dtype)
    eye = torch.eye(N, dtype=cdt, device=v.device)
    off = torch.diag(torch.ones(N - 1, dtype=cdt, device=v.device), 1)
    H = torch.diag_embed((v - 2.0).to(cdt)) + off + off.T
    M = H - z * eye
    if not causal:
        # one matrix per call: a batched LU on the CPU can fail inside MKL once torch's
        # thread count has been changed and changed back (torch 2.13's CPU wheel)
        flat = M.reshape(-1, N, N)
        inv = torch.stack([torch.linalg.inv(m) for m in flat]) if flat.shape[0] else flat
        return inv.diagonal(dim1=-2, dim2=-1).reshape(*v.shape[:-1], N)
    return torch.stack([torch.linalg.inv(M[..., : i + 1, : i + 1])[..., i, i] for i in range(N)], dim=-1)
