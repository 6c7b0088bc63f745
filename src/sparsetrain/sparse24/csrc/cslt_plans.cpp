// cuSPARSELt 2:4 products with cached plans.
//
// torch._cslt_sparse_mm builds the matrix descriptors, the algorithm selection
// and the plan on every call and destroys them afterwards; that host time,
// paid by every product, makes small or compiled 2:4 steps host-bound
// (bench/results/cslt_plans_d20_h200.json). A plan depends only on the problem (shapes,
// layouts, dtype) and the configuration (algorithm, split-K), not on the data,
// so it is built once per problem here and reused; a call then costs an output
// allocation and one cusparseLtMatmul.
//
// The operand conventions are torch's, so the same packed tensors work with
// either: A is a 2:4 matrix [m, k] compressed in cuSPARSELt's layout (row-major
// before compression, m*k*9/16 elements for 16-bit types), B is [k, n] dense,
// row- or column-major, and the result is [m, n] row-major, or [n, m] when
// transpose_result is set (written column-major by the kernel).

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusparseLt.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

namespace {

void check(cusparseStatus_t status, const char* call) {
  TORCH_CHECK(status == CUSPARSE_STATUS_SUCCESS, "sparsetrain cslt_plans: ", call, " failed: ",
              cusparseLtGetErrorString(status));
}

struct Plan {
  cusparseLtMatDescriptor_t a{}, b{}, d{};
  cusparseLtMatmulDescriptor_t matmul{};
  cusparseLtMatmulAlgSelection_t alg{};
  cusparseLtMatmulPlan_t plan{};
  size_t workspace = 0;
};

// (device, m, k, n, b row-major, transpose_result, 16-bit dtype, alg, split_k, split_k_mode)
using Key = std::tuple<int, int64_t, int64_t, int64_t, bool, bool, int, int64_t, int64_t, int64_t>;

std::mutex cache_mutex;
std::map<int, std::unique_ptr<cusparseLtHandle_t>> handles;  // one per device
std::map<Key, std::unique_ptr<Plan>> plans;                  // kept for the life of the process

const cusparseLtHandle_t* handle_for(int device) {
  auto& h = handles[device];
  if (!h) {
    auto fresh = std::make_unique<cusparseLtHandle_t>();
    check(cusparseLtInit(fresh.get()), "cusparseLtInit");
    h = std::move(fresh);
  }
  return h.get();
}

Plan* plan_for(const cusparseLtHandle_t* handle, const Key& key, cudaDataType type) {
  auto it = plans.find(key);
  if (it != plans.end()) return it->second.get();
  const auto [device, m, k, n, b_row_major, transpose_result, dtype, alg_id, split_k, split_k_mode] = key;
  (void)device;
  (void)dtype;
  auto p = std::make_unique<Plan>();
  check(cusparseLtStructuredDescriptorInit(handle, &p->a, m, k, k, 16, type, CUSPARSE_ORDER_ROW,
                                           CUSPARSELT_SPARSITY_50_PERCENT),
        "cusparseLtStructuredDescriptorInit");
  // A column-major B is described as its row-major transpose, multiplied transposed.
  check(cusparseLtDenseDescriptorInit(handle, &p->b, b_row_major ? k : n, b_row_major ? n : k,
                                      b_row_major ? n : k, 16, type, CUSPARSE_ORDER_ROW),
        "cusparseLtDenseDescriptorInit(B)");
  check(cusparseLtDenseDescriptorInit(handle, &p->d, m, n, transpose_result ? m : n, 16, type,
                                      transpose_result ? CUSPARSE_ORDER_COL : CUSPARSE_ORDER_ROW),
        "cusparseLtDenseDescriptorInit(D)");
  check(cusparseLtMatmulDescriptorInit(handle, &p->matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                       b_row_major ? CUSPARSE_OPERATION_NON_TRANSPOSE : CUSPARSE_OPERATION_TRANSPOSE,
                                       &p->a, &p->b, &p->d, &p->d, CUSPARSE_COMPUTE_32F),
        "cusparseLtMatmulDescriptorInit");
  check(cusparseLtMatmulAlgSelectionInit(handle, &p->alg, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT),
        "cusparseLtMatmulAlgSelectionInit");
  int alg = static_cast<int>(alg_id);
  check(cusparseLtMatmulAlgSetAttribute(handle, &p->alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg, sizeof(alg)),
        "cusparseLtMatmulAlgSetAttribute(CONFIG_ID)");
  if (split_k != 1) {
    int sk = static_cast<int>(split_k);
    check(cusparseLtMatmulAlgSetAttribute(handle, &p->alg, CUSPARSELT_MATMUL_SPLIT_K, &sk, sizeof(sk)),
          "cusparseLtMatmulAlgSetAttribute(SPLIT_K)");
    if (split_k_mode > 0) {
      auto mode = static_cast<cusparseLtSplitKMode_t>(split_k_mode);
      check(cusparseLtMatmulAlgSetAttribute(handle, &p->alg, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode, sizeof(mode)),
            "cusparseLtMatmulAlgSetAttribute(SPLIT_K_MODE)");
    }
  }
  check(cusparseLtMatmulPlanInit(handle, &p->plan, &p->matmul, &p->alg), "cusparseLtMatmulPlanInit");
  check(cusparseLtMatmulGetWorkspace(handle, &p->plan, &p->workspace), "cusparseLtMatmulGetWorkspace");
  Plan* raw = p.get();
  plans.emplace(key, std::move(p));
  return raw;
}

}  // namespace

// s @ dense for s packed by torch._cslt_compress (or sparsetrain's packing kernel).
torch::Tensor sparse_mm(const torch::Tensor& packed, const torch::Tensor& dense, bool transpose_result,
                        int64_t alg_id, int64_t split_k, int64_t split_k_mode) {
  TORCH_CHECK(packed.is_cuda() && dense.is_cuda() && packed.device() == dense.device(),
              "cslt_plans.sparse_mm: operands must be on one CUDA device");
  TORCH_CHECK(packed.scalar_type() == dense.scalar_type(), "cslt_plans.sparse_mm: dtypes differ (",
              packed.scalar_type(), " vs ", dense.scalar_type(), ")");
  cudaDataType type;
  if (dense.scalar_type() == at::kBFloat16) {
    type = CUDA_R_16BF;
  } else if (dense.scalar_type() == at::kHalf) {
    type = CUDA_R_16F;
  } else {
    TORCH_CHECK(false, "cslt_plans.sparse_mm: bf16 or fp16 only, got ", dense.scalar_type());
  }
  TORCH_CHECK(packed.is_contiguous(), "cslt_plans.sparse_mm: the packed operand must be contiguous");
  // Numbers go into messages through std::to_string, never an ostream: with g++ 13 and torch 2.11,
  // streaming an integer from this extension can crash the process (the extension's own
  // std::ostream::_M_insert<long> calls a wrong virtual), so a TORCH_CHECK that printed a size
  // would segfault instead of raising.
  TORCH_CHECK(dense.dim() == 2, "cslt_plans.sparse_mm: the dense operand must be 2-D, got " +
                                   std::to_string(dense.dim()) + "-D");
  const bool b_row_major = dense.is_contiguous();
  TORCH_CHECK(b_row_major || dense.t().is_contiguous(),
              "cslt_plans.sparse_mm: the dense operand must be row- or column-major");
  const int64_t k = dense.size(0), n = dense.size(1);
  TORCH_CHECK(k > 0 && (packed.numel() * 16) % (9 * k) == 0,
              "cslt_plans.sparse_mm: " + std::to_string(packed.numel()) +
                  " packed elements do not hold a 2:4 matrix with " + std::to_string(k) + " columns");
  const int64_t m = packed.numel() * 16 / (9 * k);

  const int device = packed.get_device();
  c10::cuda::CUDAGuard guard(device);
  const Key key{device, m, k, n, b_row_major, transpose_result, static_cast<int>(dense.scalar_type()),
                alg_id, split_k, split_k_mode};
  const cusparseLtHandle_t* handle;
  Plan* plan;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    handle = handle_for(device);
    plan = plan_for(handle, key, type);
  }
  auto out = transpose_result ? at::empty({n, m}, dense.options()) : at::empty({m, n}, dense.options());
  at::Tensor workspace;
  void* workspace_ptr = nullptr;
  if (plan->workspace > 0) {
    workspace = at::empty({static_cast<int64_t>(plan->workspace)}, dense.options().dtype(at::kByte));
    workspace_ptr = workspace.data_ptr();
  }
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  check(cusparseLtMatmul(handle, &plan->plan, &alpha, packed.data_ptr(), dense.data_ptr(), &beta, out.data_ptr(),
                         out.data_ptr(), workspace_ptr, &stream, 1),
        "cusparseLtMatmul");
  return out;
}

int64_t num_plans() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return static_cast<int64_t>(plans.size());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_mm", &sparse_mm, "2:4 product on a cached cuSPARSELt plan");
  m.def("num_plans", &num_plans, "plans built so far in this process");
}
