// Shared by the compiled CPU kernels (contrastive.cpp, siglip.cpp, linear_ce.cpp, scores.cpp, bindings.cpp):
// the BLAS tile GEMM, the AVX2 exp / horizontal reductions, thread-local slots, the tile list,
// argument checks, and the declarations of the entry points that bindings.cpp exposes.
//
// Arithmetic is in the accumulation dtype of the caller: float32 (float32 / bf16 / fp16
// inputs, converted by the Python side) or float64.  exp() of float32 uses an AVX2+FMA
// Cephes-style polynomial (about 1 ulp) when the build has AVX2, std::exp otherwise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && !defined(SF_NO_SIMD)
#include <immintrin.h>
#define SF_AVX2 1
#endif

// The Fortran BLAS that torch links (MKL on x86 wheels, OpenBLAS elsewhere) usually exports
// sgemm_/dgemm_: calling it on raw pointers skips ATen's per-call dispatch (several narrow /
// view / mm dispatches per tile).  Weak references: where torch exports no BLAS the pointers
// are null and the tile GEMMs go through at::mm instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace sf {

using at::Tensor;

// set_direct_blas(False) forces the at::mm path (tests)
inline bool g_use_blas = true;

// Thread-local accumulator slots: one per intra-op thread.  Called from inside a parallel
// region (the op nested in someone's at::parallel_for) at::parallel_for runs inline on the
// caller's thread, whose id may exceed our slot count: use a single slot then.
struct Slots {
  bool nested = at::in_parallel_region();
  int count = nested ? 1 : std::max(1, at::get_num_threads());
  int id() const { return nested ? 0 : std::min(at::get_thread_num(), count - 1); }
};

template <typename T>
inline bool fortran_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
                         T beta, T* c, int ldc) {
  if (!g_use_blas) return false;
  if constexpr (std::is_same<T, float>::value) {
    if (sgemm_ == nullptr) return false;
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
    return true;
  } else {
    if (dgemm_ == nullptr) return false;
    dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
    return true;
  }
}

// Row-major C[m, n] = op(A) op(B) (+ C when accumulate), op(A) [m, k], op(B) [k, n]; A, B
// and C row-major with leading dimensions lda, ldb, ldc (ta / tb: A / B stored transposed).
template <typename T>
inline void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
                    int64_t ldb, bool accumulate, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const T beta = accumulate ? T(1) : T(0);
  const int64_t big = std::numeric_limits<int>::max();
  if (m < big && n < big && k < big && lda < big && ldb < big && ldc < big && k > 0) {
    // column-major view: C^T = op(B)^T op(A)^T
    if (fortran_gemm<T>(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(n), static_cast<int>(m),
                        static_cast<int>(k), T(1), B, static_cast<int>(ldb), A, static_cast<int>(lda), beta, C,
                        static_cast<int>(ldc)))
      return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = ta ? at::from_blob(const_cast<T*>(A), {k, m}, {lda, 1}, opt).t()
                : at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opt);
  Tensor b = tb ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opt).t()
                : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opt);
  Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// ------------------------------------------------------------------------------------------
// SIMD helpers (float32 only; float64 runs the scalar templates)
// ------------------------------------------------------------------------------------------
#ifdef SF_AVX2
inline __m256 exp_ps(__m256 x) {
  // Cephes expf: exp(x) = 2^k * exp(r), r = x - k ln2, |r| <= ln2/2; inputs below
  // ln(FLT_MIN) give exactly 0 (our arguments are always <= ~0: shifted logits).
  const __m256 lo = _mm256_set1_ps(-87.33654475f);
  const __m256 hi = _mm256_set1_ps(88.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i k = _mm256_cvttps_epi32(fx);
  k = _mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(k));
  return _mm256_andnot_ps(under, y);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmin(__m256 v) {
  __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_min_ps(s, _mm_movehl_ps(s, s));
  s = _mm_min_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

template <typename T>
inline T sexp(T x) {
  return std::exp(x);
}

// Row kernel shared by the contrastive tiles and the linear cross-entropy blocks:
// sum_c exp(a * g[c] - b); when colsum: colsum[c] += exp(rs_c[c] * g[c] - sh_c[c]).
template <typename T>
inline T fwd_row_scalar(const T* g, int64_t c0, int64_t n, T a, T b, const T* rs_c, const T* sh_c, T* colsum) {
  T s = 0;
  for (int64_t c = c0; c < n; ++c) {
    s += sexp(a * g[c] - b);
    if (colsum) colsum[c] += sexp(rs_c[c] * g[c] - sh_c[c]);
  }
  return s;
}

template <typename T>
inline T fwd_row(const T* g, int64_t n, T a, T b, const T* rs_c, const T* sh_c, T* colsum) {
  return fwd_row_scalar<T>(g, 0, n, a, b, rs_c, sh_c, colsum);
}

#ifdef SF_AVX2
template <>
inline float fwd_row<float>(const float* g, int64_t n, float a, float b, const float* rs_c, const float* sh_c,
                            float* colsum) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  if (colsum) {
    for (; c + 8 <= n; c += 8) {
      __m256 x = _mm256_loadu_ps(g + c);
      acc = _mm256_add_ps(acc, exp_ps(_mm256_fmsub_ps(va, x, vb)));
      __m256 e = exp_ps(_mm256_fmsub_ps(_mm256_loadu_ps(rs_c + c), x, _mm256_loadu_ps(sh_c + c)));
      _mm256_storeu_ps(colsum + c, _mm256_add_ps(_mm256_loadu_ps(colsum + c), e));
    }
  } else {
    for (; c + 8 <= n; c += 8) {
      acc = _mm256_add_ps(acc, exp_ps(_mm256_fmsub_ps(va, _mm256_loadu_ps(g + c), vb)));
    }
  }
  return hsum(acc) + fwd_row_scalar<float>(g, c, n, a, b, rs_c, sh_c, colsum);
}
#endif

// One [nr, nc] tile of a row space against a column space, rows r0.. and columns c0..;
// diag: the tile on the diagonal of a triangular (self-similarity) sweep.
struct TileTask {
  int64_t r0, nr, c0, nc;
  bool diag;
};

// The tiles of an [nx, ny] logit matrix, row-block major (every tile, or c0 >= r0 when triangular).
inline std::vector<TileTask> make_tasks(int64_t nx, int64_t ny, int64_t tile, bool triangular) {
  std::vector<TileTask> tasks;
  for (int64_t r0 = 0; r0 < nx; r0 += tile) {
    for (int64_t c0 = triangular ? r0 : 0; c0 < ny; c0 += tile) {
      tasks.push_back({r0, std::min(tile, nx - r0), c0, std::min(tile, ny - c0), triangular && c0 == r0});
    }
  }
  return tasks;
}

// Backward tiles grouped so that no two threads ever write the same rows: the rows of X [nx]
// and of Y [ny] are each cut into P panels of whole tiles, a "match" (p, q) holds the tiles of
// rows in panel p of X against columns in panel q of Y, and a "round" holds matches that touch
// disjoint panels (triangular, X = Y: a round-robin tournament, a tile writing both panels of
// one space; otherwise a Latin square, a tile writing panel p of X and panel q of Y).  Rounds
// run one after the other, the matches of a round in parallel, each writing its gradient rows
// and row statistics straight into the results: no per-thread [n, D] buffers, so the memory
// does not grow with the thread count.  One thread: one match holding every tile in
// make_tasks' order.
using Match = std::vector<TileTask>;
using Round = std::vector<Match>;

inline std::vector<Round> make_rounds(int64_t nx, int64_t ny, int64_t tile, bool triangular, int threads) {
  const int64_t tx = (nx + tile - 1) / tile, ty = (ny + tile - 1) / tile;
  const int64_t P = std::max<int64_t>(1, std::min({tx, ty, threads <= 1 ? int64_t(1) : int64_t(4) * threads}));
  auto first = [&](int64_t tiles, int64_t p) { return p * tiles / P; };
  auto match = [&](int64_t p, int64_t q) {
    Match m;
    for (int64_t r = first(tx, p); r < first(tx, p + 1); ++r) {
      for (int64_t c = (triangular && p == q) ? r : first(ty, q); c < first(ty, q + 1); ++c) {
        const int64_t r0 = r * tile, c0 = c * tile;
        m.push_back({r0, std::min(tile, nx - r0), c0, std::min(tile, ny - c0), triangular && c == r});
      }
    }
    return m;
  };
  std::vector<Round> rounds;
  if (!triangular) {
    for (int64_t k = 0; k < P; ++k) {
      Round round;
      for (int64_t p = 0; p < P; ++p) round.push_back(match(p, (p + k) % P));
      rounds.push_back(std::move(round));
    }
    return rounds;
  }
  // circle method over the panels (a "bye" -1 when P is odd): every pair p < q meets once
  std::vector<int64_t> seat(P + (P % 2));
  for (int64_t p = 0; p < static_cast<int64_t>(seat.size()); ++p) seat[p] = p < P ? p : -1;
  const int64_t S = static_cast<int64_t>(seat.size());
  for (int64_t k = 0; k + 1 < S; ++k) {
    Round round;
    for (int64_t i = 0; i < S / 2; ++i) {
      const int64_t p = seat[i], q = seat[S - 1 - i];
      if (p >= 0 && q >= 0) round.push_back(match(std::min(p, q), std::max(p, q)));
    }
    if (!round.empty()) rounds.push_back(std::move(round));
    std::rotate(seat.begin() + 1, seat.end() - 1, seat.end());
  }
  Round diagonal;
  for (int64_t p = 0; p < P; ++p) diagonal.push_back(match(p, p));
  rounds.push_back(std::move(diagonal));
  return rounds;
}

inline void check_2d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, " must be float32 or float64");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

inline void check_1d(const Tensor& t, const Tensor& like, int64_t n, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.size(0) == n, name, " must be a contiguous [", n, "] tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of the rows");
}

// ------------------------------------------------------------------------------------------
// Entry points (bindings.cpp exposes them; contracts there)
// ------------------------------------------------------------------------------------------
Tensor ntxent_forward(const Tensor& u, const Tensor& rs, int64_t tile);
std::vector<Tensor> ntxent_backward(const Tensor& u, const Tensor& rs, const Tensor& lse, const Tensor& pos,
                                    double coef, int64_t tile);
std::vector<Tensor> cross_forward(const Tensor& a, const Tensor& b, const Tensor& rs, bool both, int64_t tile);
std::vector<Tensor> cross_backward(const Tensor& a, const Tensor& b, const Tensor& rs, const Tensor& lse_r,
                                   const c10::optional<Tensor>& lse_c, const Tensor& pos, double coef, int64_t tile);
Tensor siglip_forward(const Tensor& q, const Tensor& k, const Tensor& rs, const Tensor& pos, double bias,
                      int64_t tile);
std::vector<Tensor> siglip_backward(const Tensor& q, const Tensor& k, const Tensor& rs, const Tensor& pos, double bias,
                                    double coef, int64_t tile);
void lce_rows(Tensor x, const c10::optional<Tensor>& bias, const c10::optional<Tensor>& scale, const Tensor& target,
              int64_t ignore_index, const c10::optional<Tensor>& lse_in, const c10::optional<Tensor>& coef,
              const c10::optional<Tensor>& loss, const c10::optional<Tensor>& lse,
              const c10::optional<Tensor>& dscale, const c10::optional<Tensor>& dtarget);
std::vector<Tensor> sample_gram_forward(const Tensor& e, const Tensor& present);
Tensor sample_gram_backward(const Tensor& e, const Tensor& present, const Tensor& inv, const Tensor& grad);

}  // namespace sf
