// scale_fast compiled CPU kernels (backend="cpp"), JIT-built by scale_fast/backends/cpp/_build.py
// through torch.utils.cpp_extension.load (ninja + pybind11) from the files of this folder:
//   common.h         shared helpers (BLAS tile GEMM, AVX2 exp, thread slots, checks)
//   contrastive.cpp  NT-Xent and cross-modal InfoNCE tiles
//   siglip.cpp       SigLIP's sigmoid-loss tiles
//   linear_ce.cpp    the fused linear cross-entropy sweep
//   scores.cpp       per-sample Gram matrices
//   bindings.cpp     this module
//
// Contracts (all tensors contiguous, in the accumulation dtype T unless said otherwise):
//   ntxent_forward(u[2n,D], rs[2n], tile)               -> lse[2n]
//   ntxent_backward(u, rs, lse, pos[2n], coef, tile)    -> (du[2n,D], dot_p[2n], p_sum[2n])
//   cross_forward(a[n,D], b[n,D], rs[n], both, tile)    -> (lse_rows[n], lse_cols[n] or None)
//   cross_backward(a, b, rs, lse_r, lse_c?, pos[n], coef, tile) -> (da, db, dot_p[dirs,n], p_sum[dirs,n])
//   siglip_forward(q[R,D], k[C,D], rs[R], pos[R], bias, tile)       -> sum (0-dim)
//   siglip_backward(q, k, rs, pos, bias, coef, tile)                -> (dq, dk, d_rs[R], d_bias (0-dim))
//   lce_rows(x[R,K], ...)                                -> see lce_rows in linear_ce.cpp (in place)
//   sample_gram_forward(e[M,B,D], present[M,B])          -> (G[B,M,M], inv[M,B])
//   sample_gram_backward(e, present, inv, grad[B,M,M])   -> de[M,B,D]
// where rs[r] = logit_scale * w_r, lse are log-sum-exp of the rows' logits (self excluded
// for NT-Xent), pos[r] the cosine of row r with its positive, dot_p[r] = sum_{c != pos(r)} P[r,c]
// (G[r,c] - pos[r]) and p_sum[r] = sum_c P[r,c] (P = softmax of row r, G the Gram matrix), so
// that d loss / d rs = dot_p / p_sum as in the torch backend.
// The siglip sum is sum_r sum_c softplus(-y_rc (rs_r q_r . k_c + bias)), y_rc = +1 where
// c == pos[r] (int64) and -1 elsewhere; its backward gives the gradients of coef * sum.
#include <torch/csrc/utils/pybind.h>

#include "common.h"

namespace sf {
namespace {

void set_direct_blas(bool on) { g_use_blas = on; }

bool direct_blas_available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

bool has_avx2() {
#ifdef SF_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace sf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace sf;
  m.doc() = "scale_fast compiled CPU kernels (fused contrastive, SigLIP and linear cross-entropy)";
  m.def("ntxent_forward", &ntxent_forward, "NT-Xent row log-sum-exp (self excluded)", pybind11::arg("u"),
        pybind11::arg("rs"), pybind11::arg("tile"));
  m.def("ntxent_backward", &ntxent_backward, "NT-Xent gradient of the LSE terms: (du, dot_p, p_sum)",
        pybind11::arg("u"), pybind11::arg("rs"), pybind11::arg("lse"), pybind11::arg("pos"), pybind11::arg("coef"),
        pybind11::arg("tile"));
  m.def("cross_forward", &cross_forward, "cross-modal InfoNCE log-sum-exp (rows, and columns when both)",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("rs"), pybind11::arg("both"), pybind11::arg("tile"));
  m.def("cross_backward", &cross_backward, "cross-modal InfoNCE gradient of the LSE terms: (da, db, dot_p, p_sum)",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("rs"), pybind11::arg("lse_r"), pybind11::arg("lse_c"),
        pybind11::arg("pos"), pybind11::arg("coef"), pybind11::arg("tile"));
  m.def("siglip_forward", &siglip_forward, "SigLIP sigmoid-loss sum of rows q against every row of k",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("rs"), pybind11::arg("pos"), pybind11::arg("bias"),
        pybind11::arg("tile"));
  m.def("siglip_backward", &siglip_backward, "SigLIP gradient of coef * sum: (dq, dk, d_rs, d_bias)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("rs"), pybind11::arg("pos"), pybind11::arg("bias"),
        pybind11::arg("coef"), pybind11::arg("tile"));
  m.def("lce_rows", &lce_rows, "linear cross-entropy row pass in place on a block of logits",
        pybind11::arg("x"), pybind11::arg("bias"), pybind11::arg("scale"), pybind11::arg("target"),
        pybind11::arg("ignore_index"), pybind11::arg("lse_in"), pybind11::arg("coef"), pybind11::arg("loss"),
        pybind11::arg("lse"), pybind11::arg("dscale"), pybind11::arg("dtarget"));
  m.def("sample_gram_forward", &sample_gram_forward, "per-sample Gram of normalised rows: (G [B,M,M], inv [M,B])",
        pybind11::arg("e"), pybind11::arg("present"));
  m.def("sample_gram_backward", &sample_gram_backward, "d e of sum(grad * G)", pybind11::arg("e"),
        pybind11::arg("present"), pybind11::arg("inv"), pybind11::arg("grad"));
  m.def("has_avx2", &has_avx2, "whether the build uses the AVX2+FMA kernels");
  m.def("set_direct_blas", &set_direct_blas, "call the BLAS sgemm_/dgemm_ directly (True) or at::mm (False)");
  m.def("direct_blas_available", &direct_blas_available, "whether torch exports sgemm_/dgemm_");
}
