// Per-sample Gram matrices of the normalised modality rows (the "scores" op): work is split
// over samples with at::parallel_for.
#include "common.h"

namespace sf {
namespace {

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  int64_t k = 0;
  T s = 0;
#ifdef SF_AVX2
  if constexpr (std::is_same<T, float>::value) {
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
    for (; k + 16 <= n; k += 16) {
      v0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), v0);
      v1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), v1);
    }
    for (; k + 8 <= n; k += 8) v0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), v0);
    s = hsum(_mm256_add_ps(v0, v1));
  }
#endif
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += a[k] * b[k];
    s1 += a[k + 1] * b[k + 1];
    s2 += a[k + 2] * b[k + 2];
    s3 += a[k + 3] * b[k + 3];
  }
  for (; k < n; ++k) s0 += a[k] * b[k];
  return s + ((s0 + s1) + (s2 + s3));
}

}  // namespace

// e [M, B, D] contiguous (accumulation dtype), present [M, B] bool contiguous.
// Returns (G [B, M, M]: z_i . z_j for present i, j, else 0;  inv [M, B]: 1 / max(||e||, 1e-12),
// 0 for absent rows).  Absent rows are never read (they may hold NaN).
std::vector<Tensor> sample_gram_forward(const Tensor& e, const Tensor& present) {
  TORCH_CHECK(e.dim() == 3 && e.is_contiguous(), "e must be a contiguous [M, B, D] tensor");
  TORCH_CHECK(e.scalar_type() == at::kFloat || e.scalar_type() == at::kDouble, "e must be float32 or float64");
  TORCH_CHECK(present.scalar_type() == at::kBool && present.is_contiguous() && present.dim() == 2 &&
                  present.size(0) == e.size(0) && present.size(1) == e.size(1),
              "present must be a contiguous bool [M, B] tensor");
  const int64_t M = e.size(0), B = e.size(1), D = e.size(2);
  Tensor G = at::zeros({B, M, M}, e.options());
  Tensor inv = at::zeros({M, B}, e.options());
  const bool* pp = present.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "sample_gram_forward", [&] {
    using T = scalar_t;
    const T* pe = e.data_ptr<T>();
    T* pg = G.data_ptr<T>();
    T* pi = inv.data_ptr<T>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t i = 0; i < M; ++i) {
          if (!pp[i * B + b]) continue;
          const T* ei = pe + (i * B + b) * D;
          const T nrm = std::sqrt(dot<T>(ei, ei, D));
          pi[i * B + b] = T(1) / std::max(nrm, T(1e-12));
        }
        T* g = pg + b * M * M;
        for (int64_t i = 0; i < M; ++i) {
          if (!pp[i * B + b]) continue;
          const T* ei = pe + (i * B + b) * D;
          const T ii = pi[i * B + b];
          for (int64_t j = i; j < M; ++j) {
            if (!pp[j * B + b]) continue;
            const T v = dot<T>(ei, pe + (j * B + b) * D, D) * ii * pi[j * B + b];
            g[i * M + j] = v;
            g[j * M + i] = v;
          }
        }
      }
    });
  });
  return {G, inv};
}

// d e [M, B, D] of sum(grad * G), grad [B, M, M]: with z = e inv, dz_i = sum_j (grad_ij + grad_ji) z_j
// over present j, de_i = inv_i (dz_i - z_i (z_i . dz_i)) (the projection only above the 1e-12
// clamp); absent rows get exactly 0.
Tensor sample_gram_backward(const Tensor& e, const Tensor& present, const Tensor& inv, const Tensor& grad) {
  TORCH_CHECK(e.dim() == 3 && e.is_contiguous(), "e must be a contiguous [M, B, D] tensor");
  const int64_t M = e.size(0), B = e.size(1), D = e.size(2);
  TORCH_CHECK(grad.is_contiguous() && grad.dim() == 3 && grad.size(0) == B && grad.size(1) == M &&
                  grad.size(2) == M && grad.scalar_type() == e.scalar_type(),
              "grad must be a contiguous [B, M, M] tensor of e's dtype");
  TORCH_CHECK(inv.is_contiguous() && inv.scalar_type() == e.scalar_type(), "inv must match e");
  Tensor de = at::zeros_like(e);
  const bool* pp = present.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "sample_gram_backward", [&] {
    using T = scalar_t;
    const T* pe = e.data_ptr<T>();
    const T* pgr = grad.data_ptr<T>();
    const T* pi = inv.data_ptr<T>();
    T* pd = de.data_ptr<T>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      std::vector<T> dz(D), zi(D);
      for (int64_t b = b0; b < b1; ++b) {
        const T* g = pgr + b * M * M;
        for (int64_t i = 0; i < M; ++i) {
          if (!pp[i * B + b]) continue;
          std::fill(dz.begin(), dz.end(), T(0));
          for (int64_t j = 0; j < M; ++j) {
            if (!pp[j * B + b]) continue;
            const T c = (g[i * M + j] + g[j * M + i]) * pi[j * B + b];
            if (c == T(0)) continue;
            const T* ej = pe + (j * B + b) * D;
            for (int64_t k = 0; k < D; ++k) dz[k] += c * ej[k];
          }
          const T ii = pi[i * B + b];
          const T* ei = pe + (i * B + b) * D;
          const T nrm = std::sqrt(dot<T>(ei, ei, D));
          T* out = pd + (i * B + b) * D;
          if (nrm > T(1e-12)) {
            for (int64_t k = 0; k < D; ++k) zi[k] = ei[k] * ii;
            const T along = dot<T>(zi.data(), dz.data(), D);
            for (int64_t k = 0; k < D; ++k) out[k] = (dz[k] - zi[k] * along) * ii;
          } else {
            for (int64_t k = 0; k < D; ++k) out[k] = dz[k] * ii;
          }
        }
      }
    });
  });
  return de;
}

}  // namespace sf
