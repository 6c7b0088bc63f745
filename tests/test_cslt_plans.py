"""The cached-plan cuSPARSELt extension against torch's op and a float64 product (GPU), and how it finds cuSPARSELt (CPU)."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.sparse24 import cslt_plans
from sparsetrain.sparse24.cusparselt import cusparselt_available
from sparsetrain.sparse24.sparsify import naive_24


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available() or not cusparselt_available():
        pytest.skip("needs CUDA with cuSPARSELt")
    module = cslt_plans.load()
    if module is None:
        pytest.fail("the cslt_plans extension did not build on a machine with cuSPARSELt")
    return module


def _operands(m: int, k: int, n: int, column_major: bool, dtype: torch.dtype):
    a, _ = naive_24(torch.randn(m, k, device="cuda", dtype=dtype))
    b = torch.randn(n, k, device="cuda", dtype=dtype).t() if column_major else torch.randn(k, n, device="cuda", dtype=dtype)
    return a, torch._cslt_compress(a), b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("transpose_result", [False, True])
def test_cached_plan_product_matches_float64_and_torch(ext, dtype, column_major, transpose_result) -> None:
    torch.manual_seed(int(column_major) * 2 + int(transpose_result))
    m, k, n = 256, 320, 192
    a, packed, b = _operands(m, k, n, column_major, dtype)
    got = cslt_plans.sparse_mm(packed, b, transpose_result)
    want = a.double() @ b.double()
    if transpose_result:
        want = want.t()
    assert got.shape == want.shape and got.dtype == dtype
    assert float((got.double() - want).norm() / want.norm()) < 1e-2
    # same kernel as torch's op (default configuration): identical bits
    ref = torch._cslt_sparse_mm(packed, b, transpose_result=transpose_result)
    assert torch.equal(got, ref)


def test_plans_are_built_once_per_problem(ext) -> None:
    torch.manual_seed(1)
    _, packed, b = _operands(128, 256, 64, False, torch.bfloat16)
    cslt_plans.sparse_mm(packed, b)
    before = cslt_plans.num_plans()
    for _ in range(3):
        cslt_plans.sparse_mm(packed, torch.randn_like(b))
    assert cslt_plans.num_plans() == before
    cslt_plans.sparse_mm(packed, b, transpose_result=True)  # a new problem: one more plan
    _, packed2, b2 = _operands(192, 256, 64, False, torch.bfloat16)
    cslt_plans.sparse_mm(packed2, b2)
    assert cslt_plans.num_plans() == before + 2


def test_cached_plans_run_inside_a_cuda_graph(ext) -> None:
    torch.manual_seed(2)
    a, packed, b = _operands(128, 128, 128, True, torch.bfloat16)
    cslt_plans.sparse_mm(packed, b)  # plan built outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cslt_plans.sparse_mm(packed, b)
    b.copy_(torch.randn_like(b))
    graph.replay()
    want = a.double() @ b.double()
    assert float((out.double() - want).norm() / want.norm()) < 1e-2


def test_bad_operands_raise_clear_errors(ext) -> None:
    """The extension's own checks raise; none of them may crash the process (a
    size check that streamed an integer once segfaulted on the H200)."""
    _, packed, b = _operands(64, 64, 64, False, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"dtypes differ \(BFloat16 vs Half\)"):
        cslt_plans.sparse_mm(packed, b.half())
    with pytest.raises(RuntimeError, match="bf16 or fp16 only, got Float"):
        cslt_plans.sparse_mm(packed.float(), b.float())
    with pytest.raises(RuntimeError, match="row- or column-major"):
        cslt_plans.sparse_mm(packed, torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)[:, ::2])
    with pytest.raises(RuntimeError, match="must be 2-D, got 3-D"):
        cslt_plans.sparse_mm(packed, b[None])
    with pytest.raises(RuntimeError, match="one CUDA device"):
        cslt_plans.sparse_mm(packed, b.cpu())
    with pytest.raises(RuntimeError, match="2303 packed elements do not hold a 2:4 matrix with 64 columns"):
        cslt_plans.sparse_mm(packed.flatten()[:-1].contiguous(), b)
    # a size that fits a 2:4 matrix of another shape gets cuSPARSELt's own error, raised
    with pytest.raises(RuntimeError, match="cuSPARSELt|cusparseLt"):
        cslt_plans.sparse_mm(packed[:-1].contiguous(), b)


def test_cusparselt_dirs_are_found_in_the_nvidia_wheels(tmp_path, monkeypatch) -> None:
    """Runs on CPU: the header and library are found where the ``nvidia-cusparselt`` wheel puts them."""
    base = tmp_path / "site" / "nvidia" / "cusparselt"
    (base / "include").mkdir(parents=True)
    (base / "lib").mkdir()
    (base / "include" / "cusparseLt.h").touch()
    monkeypatch.setattr("sys.path", [str(tmp_path / "site")])
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    with pytest.raises(FileNotFoundError, match="cusparseLt.h with libcusparseLt.so"):
        cslt_plans._cusparselt_dirs()  # a header without its library is not enough
    (base / "lib" / "libcusparseLt.so.0").touch()
    assert cslt_plans._cusparselt_dirs() == (str(base / "include"), str(base / "lib"), "libcusparseLt.so.0")
