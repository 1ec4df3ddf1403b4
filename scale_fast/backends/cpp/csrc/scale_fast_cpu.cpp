// scale_fast compiled CPU kernels (backend="cpp"): one translation unit, JIT-built by
// scale_fast/cpp_backend through torch.utils.cpp_extension.load (ninja + pybind11).
//
// Same tiling idea as the Triton kernels: logits are formed one tile at a time (the tile
// GEMM is the BLAS torch links -- MKL on x86 wheels -- called on raw pointers, or at::mm
// where torch exports no BLAS symbols) and everything around the GEMM -- scale, shift, exp,
// row/column sums, gradient-tile formation -- is fused into ONE pass over the tile while it
// is in cache (a 256 x 256 float32 tile and its operands fit in L2).  Work is split over
// tiles (contrastive), rows (linear cross-entropy, whose chunk loop and GEMMs are in Python) or samples (scores) with
// at::parallel_for; gradients and row statistics are accumulated in thread-local buffers
// and reduced at the end.
//
// Arithmetic is in the accumulation dtype of the caller: float32 (float32 / bf16 / fp16
// inputs, converted by the Python side) or float64.  exp() of float32 uses an AVX2+FMA
// Cephes-style polynomial (about 1 ulp) when the build has AVX2, std::exp otherwise.
//
// Contracts (all tensors contiguous, in the accumulation dtype T unless said otherwise):
//   ntxent_forward(u[2n,D], rs[2n], tile)               -> lse[2n]
//   ntxent_backward(u, rs, lse, coef, tile)             -> (du[2n,D], dot_p[2n], p_sum[2n])
//   cross_forward(a[n,D], b[n,D], rs[n], both, tile)    -> (lse_rows[n], lse_cols[n] or None)
//   cross_backward(a, b, rs, lse_r, lse_c?, coef, tile) -> (da, db, dot_p[dirs,n], p_sum[dirs,n])
//   lce_rows(x[R,K], ...)                                -> see lce_rows below (in place)
//   sample_gram_forward(e[M,B,D], present[M,B])          -> (G[B,M,M], inv[M,B])
//   sample_gram_backward(e, present, inv, grad[B,M,M])   -> de[M,B,D]
// where rs[r] = logit_scale * w_r, lse are log-sum-exp of the rows' logits (self excluded
// for NT-Xent), dot_p[r] = sum_c P[r,c] G[r,c] and p_sum[r] = sum_c P[r,c] (P = softmax of
// row r, G the Gram matrix), so that d loss / d rs can be formed as in the torch backend.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

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

namespace {

using at::Tensor;

bool g_use_blas = true;

// Thread-local accumulator slots: one per intra-op thread.  Called from inside a parallel
// region (the op nested in someone's at::parallel_for) at::parallel_for runs inline on the
// caller's thread, whose id may exceed our slot count: use a single slot then.
struct Slots {
  bool nested = at::in_parallel_region();
  int count = nested ? 1 : std::max(1, at::get_num_threads());
  int id() const { return nested ? 0 : std::min(at::get_thread_num(), count - 1); }
};  // set_direct_blas(False) forces the at::mm path (tests)

template <typename T>
bool fortran_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
                  T* c, int ldc) {
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
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             bool accumulate, T* C, int64_t ldc) {
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

// ------------------------------------------------------------------------------------------
// Row kernels: each processes one row of a tile (length n) in one pass.
// ------------------------------------------------------------------------------------------

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

// min and max of g[0:n]; when colmin: colmin[c] = min(colmin[c], g[c]) (same for colmax).
template <typename T>
inline void minmax_row_scalar(const T* g, int64_t c0, int64_t n, T& mn, T& mx, T* colmin, T* colmax) {
  for (int64_t c = c0; c < n; ++c) {
    const T x = g[c];
    mn = std::min(mn, x);
    mx = std::max(mx, x);
    if (colmin) {
      colmin[c] = std::min(colmin[c], x);
      colmax[c] = std::max(colmax[c], x);
    }
  }
}

template <typename T>
inline void minmax_row(const T* g, int64_t n, T& mn, T& mx, T* colmin, T* colmax) {
  minmax_row_scalar<T>(g, 0, n, mn, mx, colmin, colmax);
}

#ifdef SF_AVX2
template <>
inline void minmax_row<float>(const float* g, int64_t n, float& mn, float& mx, float* colmin, float* colmax) {
  __m256 vmn = _mm256_set1_ps(mn), vmx = _mm256_set1_ps(mx);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 x = _mm256_loadu_ps(g + c);
    vmn = _mm256_min_ps(vmn, x);
    vmx = _mm256_max_ps(vmx, x);
    if (colmin) {
      _mm256_storeu_ps(colmin + c, _mm256_min_ps(_mm256_loadu_ps(colmin + c), x));
      _mm256_storeu_ps(colmax + c, _mm256_max_ps(_mm256_loadu_ps(colmax + c), x));
    }
  }
  mn = hmin(vmn);
  mx = hmax(vmx);
  minmax_row_scalar<float>(g, c, n, mn, mx, colmin, colmax);
}
#endif

// Backward row of a contrastive tile: p = exp(a g - l), dp += p g, ps += p; with columns
// (dpc != nullptr): pt = exp(rs_c g - lse_c), dpc += pt g, psc += pt; g <- ca p + crs_c pt
// (ca = coef a, crs_c = coef rs_c), else g <- ca p.
template <typename T>
inline void bwd_row_scalar(T* g, int64_t c0, int64_t n, T a, T l, T ca, const T* rs_c, const T* lse_c,
                           const T* crs_c, T* dpc, T* psc, T& dp, T& ps) {
  for (int64_t c = c0; c < n; ++c) {
    const T x = g[c];
    const T p = sexp(a * x - l);
    dp += p * x;
    ps += p;
    if (dpc) {
      const T pt = sexp(rs_c[c] * x - lse_c[c]);
      dpc[c] += pt * x;
      psc[c] += pt;
      g[c] = ca * p + crs_c[c] * pt;
    } else {
      g[c] = ca * p;
    }
  }
}

template <typename T>
inline void bwd_row(T* g, int64_t n, T a, T l, T ca, const T* rs_c, const T* lse_c, const T* crs_c, T* dpc, T* psc,
                    T& dp, T& ps) {
  bwd_row_scalar<T>(g, 0, n, a, l, ca, rs_c, lse_c, crs_c, dpc, psc, dp, ps);
}

#ifdef SF_AVX2
template <>
inline void bwd_row<float>(float* g, int64_t n, float a, float l, float ca, const float* rs_c, const float* lse_c,
                           const float* crs_c, float* dpc, float* psc, float& dp, float& ps) {
  const __m256 va = _mm256_set1_ps(a), vl = _mm256_set1_ps(l), vca = _mm256_set1_ps(ca);
  __m256 vdp = _mm256_setzero_ps(), vps = _mm256_setzero_ps();
  int64_t c = 0;
  if (dpc) {
    for (; c + 8 <= n; c += 8) {
      __m256 x = _mm256_loadu_ps(g + c);
      __m256 p = exp_ps(_mm256_fmsub_ps(va, x, vl));
      vdp = _mm256_fmadd_ps(p, x, vdp);
      vps = _mm256_add_ps(vps, p);
      __m256 pt = exp_ps(_mm256_fmsub_ps(_mm256_loadu_ps(rs_c + c), x, _mm256_loadu_ps(lse_c + c)));
      _mm256_storeu_ps(dpc + c, _mm256_fmadd_ps(pt, x, _mm256_loadu_ps(dpc + c)));
      _mm256_storeu_ps(psc + c, _mm256_add_ps(_mm256_loadu_ps(psc + c), pt));
      _mm256_storeu_ps(g + c, _mm256_fmadd_ps(vca, p, _mm256_mul_ps(_mm256_loadu_ps(crs_c + c), pt)));
    }
  } else {
    for (; c + 8 <= n; c += 8) {
      __m256 x = _mm256_loadu_ps(g + c);
      __m256 p = exp_ps(_mm256_fmsub_ps(va, x, vl));
      vdp = _mm256_fmadd_ps(p, x, vdp);
      vps = _mm256_add_ps(vps, p);
      _mm256_storeu_ps(g + c, _mm256_mul_ps(vca, p));
    }
  }
  dp += hsum(vdp);
  ps += hsum(vps);
  bwd_row_scalar<float>(g, c, n, a, l, ca, rs_c, lse_c, crs_c, dpc, psc, dp, ps);
}
#endif

// ------------------------------------------------------------------------------------------
// Contrastive tile engine
// ------------------------------------------------------------------------------------------
// A "space" is a set of rows with their scales rs (logits of row r: rs[r] * G[r, :]).  A
// tile (R, C) pairs rows R of space X with rows C of space Y; the tile G = X[R] Y[C]^T
// gives the row-direction terms of R and, when `cols`, the column-direction terms of C.
// NT-Xent: X = Y = u, tiles R <= C, diagonal tiles exclude c == r and give rows only.
// CLIP: X = a, Y = b, every tile, columns when both directions are wanted.
struct TileTask {
  int64_t r0, nr, c0, nc;
  bool diag;
};

std::vector<TileTask> make_tasks(int64_t nx, int64_t ny, int64_t tile, bool triangular) {
  std::vector<TileTask> tasks;
  for (int64_t r0 = 0; r0 < nx; r0 += tile) {
    for (int64_t c0 = triangular ? r0 : 0; c0 < ny; c0 += tile) {
      tasks.push_back({r0, std::min(tile, nx - r0), c0, std::min(tile, ny - c0), triangular && c0 == r0});
    }
  }
  return tasks;
}

template <typename T>
constexpr T fixed_shift_range() {
  // Largest |logit| range for which exp(x - bound) neither under- nor overflows.
  return std::is_same<T, float>::value ? T(60) : T(600);
}

// Running log-sum-exp state of one thread over one space: with a fixed shift only `sum`
// (shift = |rs|); otherwise an online max `mx` per row, as in flash attention.
template <typename T>
struct LSEState {
  T* sum;
  T* mx;  // nullptr with a fixed shift
};

// Merge a tile's maxima into the running max of rows [r0, r0+n) and rescale their sums.
template <typename T>
inline void merge_max(LSEState<T> st, int64_t r0, int64_t n, const T* tile_max) {
  for (int64_t i = 0; i < n; ++i) {
    const T old = st.mx[r0 + i];
    const T nw = std::max(old, tile_max[i]);
    if (nw > old) {
      if (old != -std::numeric_limits<T>::infinity()) st.sum[r0 + i] *= std::exp(old - nw);
      st.mx[r0 + i] = nw;
    }
  }
}

template <typename T>
inline T scaled_max(T rs, T gmin, T gmax) {
  // max_c rs * g[c], exactly (multiplication by a scalar is monotone, rounding too)
  if (gmax < gmin) return -std::numeric_limits<T>::infinity();  // no entry
  return rs >= 0 ? rs * gmax : rs * gmin;
}

// Forward pass over a list of tiles: log-sum-exp of every row of X (and of Y when cols).
// Returns lse_x (and lse_y, undefined when !cols).
template <typename T>
std::pair<Tensor, Tensor> tiles_forward(const Tensor& X, const Tensor& Y, const Tensor& rsx, const Tensor& rsy,
                                         const std::vector<TileTask>& tasks, bool cols, bool same_space, int64_t tile) {
  const int64_t nx = X.size(0), ny = Y.size(0), D = X.size(1);
  const T max_abs = std::max(nx ? rsx.abs().max().item<T>() : T(0), ny ? rsy.abs().max().item<T>() : T(0));
  const bool fixed = 2 * max_abs <= fixed_shift_range<T>();
  const Slots slots;
  const int nt = slots.count;
  const auto opt = X.options();
  // thread-local sums (and maxima): [nt, n] per space
  Tensor sx = at::zeros({nt, nx}, opt);
  Tensor sy = (cols && !same_space) ? at::zeros({nt, ny}, opt) : Tensor();
  Tensor mxx, mxy;
  if (!fixed) {
    mxx = at::full({nt, nx}, -std::numeric_limits<T>::infinity(), opt);
    if (cols && !same_space) mxy = at::full({nt, ny}, -std::numeric_limits<T>::infinity(), opt);
  }
  Tensor absx = rsx.abs(), absy = same_space ? absx : rsy.abs();
  const T* prsx = rsx.data_ptr<T>();
  const T* prsy = rsy.data_ptr<T>();
  const T* pabsx = absx.data_ptr<T>();
  const T* pabsy = absy.data_ptr<T>();

  const T* px = X.data_ptr<T>();
  const T* py = Y.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    const int tid = slots.id();
    std::vector<T> gbuf(tile * tile);
    std::vector<T> colsum(tile), colmin(tile), colmax(tile), rmax(tile), cmax(tile);
    LSEState<T> stx{sx[tid].data_ptr<T>(), fixed ? nullptr : mxx[tid].data_ptr<T>()};
    LSEState<T> sty = stx;
    if (cols && !same_space) sty = {sy[tid].data_ptr<T>(), fixed ? nullptr : mxy[tid].data_ptr<T>()};
    for (int64_t t = begin; t < end; ++t) {
      const TileTask& tk = tasks[t];
      const int64_t nr = tk.nr, nc = tk.nc;
      T* g = gbuf.data();
      gemm_rm<T>(false, true, nr, nc, D, px + tk.r0 * D, D, py + tk.c0 * D, D, false, g, nc);
      const bool do_cols = cols && !tk.diag;
      const T* rs_c = prsy + tk.c0;
      const T* shift_c = pabsy + tk.c0;  // fixed: |rs_c|; online: the merged column max (below)
      if (!fixed) {
        // pass 1: row and column maxima of the tile's logits, merged into the running state
        if (do_cols) {
          std::fill(colmin.begin(), colmin.begin() + nc, std::numeric_limits<T>::infinity());
          std::fill(colmax.begin(), colmax.begin() + nc, -std::numeric_limits<T>::infinity());
        }
        for (int64_t r = 0; r < nr; ++r) {
          T mn = std::numeric_limits<T>::infinity(), mx = -std::numeric_limits<T>::infinity();
          const T* gr = g + r * nc;
          if (tk.diag) {
            minmax_row<T>(gr, r, mn, mx, nullptr, nullptr);
            minmax_row<T>(gr + r + 1, nc - r - 1, mn, mx, nullptr, nullptr);
          } else {
            minmax_row<T>(gr, nc, mn, mx, do_cols ? colmin.data() : nullptr, do_cols ? colmax.data() : nullptr);
          }
          rmax[r] = scaled_max(prsx[tk.r0 + r], mn, mx);
        }
        merge_max(stx, tk.r0, nr, rmax.data());
        if (do_cols) {
          for (int64_t c = 0; c < nc; ++c) cmax[c] = scaled_max(rs_c[c], colmin[c], colmax[c]);
          merge_max(sty, tk.c0, nc, cmax.data());
          shift_c = sty.mx + tk.c0;
        }
      }
      // pass 2: the exponentials, row sums (and column sums) in one sweep
      if (do_cols) std::fill(colsum.begin(), colsum.begin() + nc, T(0));
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = tk.r0 + r;
        const T a = prsx[row];
        const T b = fixed ? pabsx[row] : stx.mx[row];
        if (b == -std::numeric_limits<T>::infinity()) continue;  // no entry yet (online)
        const T* gr = g + r * nc;
        T s;
        if (tk.diag) {
          s = fwd_row<T>(gr, r, a, b, nullptr, nullptr, nullptr) +
              fwd_row<T>(gr + r + 1, nc - r - 1, a, b, nullptr, nullptr, nullptr);
        } else {
          s = fwd_row<T>(gr, nc, a, b, rs_c, shift_c, do_cols ? colsum.data() : nullptr);
        }
        stx.sum[row] += s;
      }
      if (do_cols) {
        T* dst = sty.sum + tk.c0;
        for (int64_t c = 0; c < nc; ++c) dst[c] += colsum[c];
      }
    }
  });

  auto finish = [&](const Tensor& s, const Tensor& mx, const Tensor& absrs) -> Tensor {
    if (fixed) return absrs + at::log(s.sum(0));
    // combine the threads' (max, sum) pairs
    Tensor m = std::get<0>(mx.max(0));
    Tensor safe = at::where(at::isfinite(m), m, at::zeros_like(m));
    Tensor total = (s * at::exp(mx - safe.unsqueeze(0))).sum(0);
    return safe + at::log(total);
  };
  Tensor lse_x = finish(sx, mxx, absx);
  Tensor lse_y;
  if (cols && !same_space) lse_y = finish(sy, mxy, absy);
  return {lse_x, lse_y};
}

// Backward pass over the tiles: dX (and dY), and per-row dot_p / p_sum of both directions.
// The gradient tile dG[r, c] = coef (rs_r P[r, c] + rs_c P^T[r, c]) is formed in place of G
// and multiplied out with two GEMMs into thread-local gradient buffers.
template <typename T>
std::vector<Tensor> tiles_backward(const Tensor& X, const Tensor& Y, const Tensor& rsx, const Tensor& rsy,
                                   const Tensor& lse_x, const Tensor& lse_y, double coef,
                                   const std::vector<TileTask>& tasks, bool cols, bool same_space, int64_t tile) {
  const int64_t nx = X.size(0), ny = Y.size(0), D = X.size(1);
  const Slots slots;
  const int nt = slots.count;
  const auto opt = X.options();
  // thread-local accumulators; thread 0 writes straight into the results
  Tensor dX = at::zeros({nx, D}, opt);
  Tensor dY = same_space ? dX : at::zeros({ny, D}, opt);
  std::vector<Tensor> dXt(nt), dYt(nt);
  dXt[0] = dX;
  dYt[0] = dY;
  const int64_t ncol_space = same_space ? 0 : ny;
  Tensor stats = at::zeros({nt, 2, nx + ncol_space}, opt);  // [thread, (dot_p, p_sum), rows of X then Y]
  const T c = static_cast<T>(coef);
  Tensor crsy = rsy * c;
  const T* prsx = rsx.data_ptr<T>();
  const T* prsy = rsy.data_ptr<T>();
  const T* plx = lse_x.data_ptr<T>();
  const T* ply = cols ? (same_space ? plx : lse_y.data_ptr<T>()) : nullptr;
  const T* pcrsy = crsy.data_ptr<T>();
  const int64_t yoff = same_space ? 0 : nx;  // offset of Y's rows in the stats arrays

  const T* px = X.data_ptr<T>();
  const T* py = Y.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    const int tid = slots.id();
    if (tid > 0 && !dXt[tid].defined()) {
      dXt[tid] = at::zeros({nx, D}, opt);
      dYt[tid] = same_space ? dXt[tid] : at::zeros({ny, D}, opt);
    }
    T* dx = dXt[tid].data_ptr<T>();
    T* dy = dYt[tid].data_ptr<T>();
    std::vector<T> gbuf(tile * tile);
    T* dp = stats[tid][0].data_ptr<T>();
    T* ps = stats[tid][1].data_ptr<T>();
    for (int64_t t = begin; t < end; ++t) {
      const TileTask& tk = tasks[t];
      const int64_t nr = tk.nr, nc = tk.nc;
      const T* xr = px + tk.r0 * D;
      const T* yc = py + tk.c0 * D;
      T* g = gbuf.data();
      gemm_rm<T>(false, true, nr, nc, D, xr, D, yc, D, false, g, nc);
      const bool do_cols = cols && !tk.diag;
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = tk.r0 + r;
        const T a = prsx[row];
        T* gr = g + r * nc;
        T dpr = 0, psr = 0;
        if (tk.diag) {
          bwd_row<T>(gr, r, a, plx[row], c * a, nullptr, nullptr, nullptr, nullptr, nullptr, dpr, psr);
          gr[r] = 0;
          bwd_row<T>(gr + r + 1, nc - r - 1, a, plx[row], c * a, nullptr, nullptr, nullptr, nullptr, nullptr, dpr,
                     psr);
        } else if (do_cols) {
          bwd_row<T>(gr, nc, a, plx[row], c * a, prsy + tk.c0, ply + tk.c0, pcrsy + tk.c0, dp + yoff + tk.c0,
                     ps + yoff + tk.c0, dpr, psr);
        } else {
          bwd_row<T>(gr, nc, a, plx[row], c * a, nullptr, nullptr, nullptr, nullptr, nullptr, dpr, psr);
        }
        dp[row] += dpr;
        ps[row] += psr;
      }
      if (tk.diag) {
        // dG = A + A^T (both rows of a pair see each other through the same Gram entry)
        for (int64_t i = 0; i < nr; ++i) {
          for (int64_t j = i + 1; j < nc; ++j) {
            const T s = g[i * nc + j] + g[j * nc + i];
            g[i * nc + j] = s;
            g[j * nc + i] = s;
          }
        }
        gemm_rm<T>(false, false, nr, D, nc, g, nc, xr, D, true, dx + tk.r0 * D, D);
      } else {
        gemm_rm<T>(false, false, nr, D, nc, g, nc, yc, D, true, dx + tk.r0 * D, D);   // dX[R] += dG Y[C]
        gemm_rm<T>(true, false, nc, D, nr, g, nc, xr, D, true, dy + tk.c0 * D, D);    // dY[C] += dG^T X[R]
      }
    }
  });
  for (int t = 1; t < nt; ++t) {
    if (!dXt[t].defined()) continue;
    dX.add_(dXt[t]);
    if (!same_space) dY.add_(dYt[t]);
  }
  Tensor st = stats.sum(0);  // [2, nx + ny']
  return {dX, dY, st};
}

void check_2d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, " must be float32 or float64");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

void check_1d(const Tensor& t, const Tensor& like, int64_t n, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.size(0) == n, name, " must be a contiguous [", n, "] tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of the rows");
}

// ------------------------------------------------------------------------------------------
// Public contrastive entry points
// ------------------------------------------------------------------------------------------
Tensor ntxent_forward(const Tensor& u, const Tensor& rs, int64_t tile) {
  check_2d(u, "u");
  check_1d(rs, u, u.size(0), "rs");
  TORCH_CHECK(tile > 0, "tile must be positive");
  auto tasks = make_tasks(u.size(0), u.size(0), tile, true);
  Tensor lse;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "ntxent_forward", [&] {
    lse = tiles_forward<scalar_t>(u, u, rs, rs, tasks, true, true, tile).first;
  });
  return lse;
}

std::vector<Tensor> ntxent_backward(const Tensor& u, const Tensor& rs, const Tensor& lse, double coef, int64_t tile) {
  check_2d(u, "u");
  check_1d(rs, u, u.size(0), "rs");
  check_1d(lse, u, u.size(0), "lse");
  auto tasks = make_tasks(u.size(0), u.size(0), tile, true);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "ntxent_backward", [&] {
    out = tiles_backward<scalar_t>(u, u, rs, rs, lse, lse, coef, tasks, true, true, tile);
  });
  return {out[0], out[2][0], out[2][1]};
}

std::vector<Tensor> cross_forward(const Tensor& a, const Tensor& b, const Tensor& rs, bool both, int64_t tile) {
  check_2d(a, "a");
  check_2d(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "a and b must match");
  check_1d(rs, a, a.size(0), "rs");
  TORCH_CHECK(tile > 0, "tile must be positive");
  auto tasks = make_tasks(a.size(0), b.size(0), tile, false);
  std::pair<Tensor, Tensor> r;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cross_forward", [&] {
    r = tiles_forward<scalar_t>(a, b, rs, rs, tasks, both, false, tile);
  });
  return {r.first, r.second};
}

std::vector<Tensor> cross_backward(const Tensor& a, const Tensor& b, const Tensor& rs, const Tensor& lse_r,
                                   const c10::optional<Tensor>& lse_c, double coef, int64_t tile) {
  check_2d(a, "a");
  check_2d(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "a and b must match");
  const int64_t n = a.size(0);
  check_1d(rs, a, n, "rs");
  check_1d(lse_r, a, n, "lse_r");
  const bool both = lse_c.has_value() && lse_c->defined();
  if (both) check_1d(*lse_c, a, n, "lse_c");
  auto tasks = make_tasks(n, n, tile, false);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cross_backward", [&] {
    out = tiles_backward<scalar_t>(a, b, rs, rs, lse_r, both ? *lse_c : Tensor(), coef, tasks, both, false, tile);
  });
  // stats [2, n + n]: rows of a (direction a->b) then rows of b (direction b->a)
  Tensor st = out[2];
  Tensor dot_p = both ? st[0].view({2, n}) : st[0].narrow(0, 0, n).unsqueeze(0);
  Tensor p_sum = both ? st[1].view({2, n}) : st[1].narrow(0, 0, n).unsqueeze(0);
  return {out[0], out[1], dot_p, p_sum};
}

// ------------------------------------------------------------------------------------------
// Linear cross-entropy
// ------------------------------------------------------------------------------------------
// Row kernels of a [rows, K] logits block (row x, in place).

// x[k] += bias[k] (when bias) and the row's min / max.
template <typename T>
inline void lce_prepare_row(T* x, int64_t K, const T* bias, T& mn, T& mx) {
  int64_t k = 0;
#ifdef SF_AVX2
  if constexpr (std::is_same<T, float>::value) {
    __m256 vmn = _mm256_set1_ps(mn), vmx = _mm256_set1_ps(mx);
    for (; k + 8 <= K; k += 8) {
      __m256 v = _mm256_loadu_ps(x + k);
      if (bias) {
        v = _mm256_add_ps(v, _mm256_loadu_ps(bias + k));
        _mm256_storeu_ps(x + k, v);
      }
      vmn = _mm256_min_ps(vmn, v);
      vmx = _mm256_max_ps(vmx, v);
    }
    mn = hmin(vmn);
    mx = hmax(vmx);
  }
#endif
  for (; k < K; ++k) {
    if (bias) x[k] += bias[k];
    mn = std::min(mn, x[k]);
    mx = std::max(mx, x[k]);
  }
}

// (sum_k q[k] x[k], sum_k q[k])
template <typename T>
inline std::pair<T, T> dot_sum(const T* q, const T* x, int64_t K) {
  T d = 0, s = 0;
  int64_t k = 0;
#ifdef SF_AVX2
  if constexpr (std::is_same<T, float>::value) {
    __m256 vd = _mm256_setzero_ps(), vs = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      __m256 vq = _mm256_loadu_ps(q + k);
      vd = _mm256_fmadd_ps(vq, _mm256_loadu_ps(x + k), vd);
      vs = _mm256_add_ps(vs, vq);
    }
    d = hsum(vd);
    s = hsum(vs);
  }
#endif
  for (; k < K; ++k) {
    d += q[k] * x[k];
    s += q[k];
  }
  return {d, s};
}

// One fused gradient pass over a row: with z = sc x[k], p = exp(z - lse) lw, gs = p - q[k]
// (q: soft targets or none); returns sum_k gs x[k] (for d scale); writes
// dt[k] = (lse - z) c (d soft target), x[k] <- gs sc c (d raw logits).
template <typename T>
inline T lce_grad_row(T* x, int64_t K, T sc, T lse, T lw, T c, const T* q, T* dt) {
  T dsc = 0;
  const T f = sc * c;
  int64_t k = 0;
#ifdef SF_AVX2
  if constexpr (std::is_same<T, float>::value) {
    const __m256 vsc = _mm256_set1_ps(sc), vlse = _mm256_set1_ps(lse), vlw = _mm256_set1_ps(lw),
                 vc = _mm256_set1_ps(c), vf = _mm256_set1_ps(f);
    __m256 vdsc = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      __m256 raw = _mm256_loadu_ps(x + k);
      __m256 p = _mm256_mul_ps(exp_ps(_mm256_fmsub_ps(vsc, raw, vlse)), vlw);
      if (q) p = _mm256_sub_ps(p, _mm256_loadu_ps(q + k));
      vdsc = _mm256_fmadd_ps(p, raw, vdsc);
      if (dt) _mm256_storeu_ps(dt + k, _mm256_mul_ps(_mm256_fnmadd_ps(vsc, raw, vlse), vc));
      __m256 out = _mm256_mul_ps(p, vf);
      _mm256_storeu_ps(x + k, out);
    }
    dsc = hsum(vdsc);
  }
#endif
  for (; k < K; ++k) {
    const T raw = x[k];
    T p = sexp(sc * raw - lse) * lw;
    if (q) p -= q[k];
    dsc += p * raw;
    if (dt) dt[k] = (lse - sc * raw) * c;
    const T out = p * f;
    x[k] = out;
  }
  return dsc;
}

// The row pass of the chunked linear cross-entropy loop (scale_fast/backends/_lce_driver.py),
// rows in parallel, in place on a [R, K] block x of raw logits (without bias): ONE fused pass
// per row adds the bias and finds the max, one sums the exponentials (skipped with lse_in),
// and with coef one overwrites the row with d loss / d raw logits times coef[r] (with
// d scale and d soft target on the way).  target: [R] int64 class ids or [R, K] probabilities
// (contiguous, dtype T); bias [K]; scale, lse_in, coef, loss, lse, dscale [R]; dtarget [R, K]
// (all optional).  An ignored row gets loss 0, lse 0 and a zero gradient row.
template <typename T>
void lce_rows_impl(Tensor& x, const T* pb, const T* ps, const Tensor& target, int64_t ignore_index,
                   const T* plse_in, const T* pc, T* pl, T* plse, T* pds, T* pdt) {
  const int64_t R = x.size(0), K = x.size(1);
  const bool soft = target.is_floating_point();
  const int64_t* pt = soft ? nullptr : target.data_ptr<int64_t>();
  const T* pq = soft ? target.data_ptr<T>() : nullptr;
  T* pL = x.data_ptr<T>();
  at::parallel_for(0, R, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* xr = pL + i * K;
      const T sc = ps ? ps[i] : T(1);
      const T* qn = soft ? pq + i * K : nullptr;
      const int64_t t = soft ? -1 : pt[i];
      if (!soft && t == ignore_index) {
        if (pl) pl[i] = 0;
        if (plse) plse[i] = 0;
        if (pds) pds[i] = 0;
        if (pc) std::memset(xr, 0, sizeof(T) * K);
        continue;
      }
      T lse_n;
      if (plse_in) {
        if (pb) {
          T mn = std::numeric_limits<T>::infinity(), mx = -mn;
          lce_prepare_row<T>(xr, K, pb, mn, mx);
        }
        lse_n = plse_in[i];
      } else {
        T mn = std::numeric_limits<T>::infinity(), mx = -mn;
        lce_prepare_row<T>(xr, K, pb, mn, mx);
        const T m = sc >= 0 ? sc * mx : sc * mn;
        lse_n = m + std::log(fwd_row<T>(xr, K, sc, m, nullptr, nullptr, nullptr));
        plse[i] = lse_n;
      }
      T lw = 1, t_raw = 0;
      if (soft) {
        auto ds = dot_sum<T>(qn, xr, K);
        lw = ds.second;
        if (pl) pl[i] = lse_n * lw - sc * ds.first;
      } else {
        t_raw = xr[t];
        if (pl) pl[i] = lse_n - sc * t_raw;
      }
      if (!pc) continue;
      const T c = pc[i];
      T d = lce_grad_row<T>(xr, K, sc, lse_n, lw, c, qn, pdt ? pdt + i * K : nullptr);
      if (!soft) {  // the one-hot target of a class-id row
        d -= t_raw;
        xr[t] -= sc * c;
      }
      if (pds) pds[i] = d * c;
    }
  });
}

template <typename T>
T* opt_ptr(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void lce_rows(Tensor x, const c10::optional<Tensor>& bias, const c10::optional<Tensor>& scale, const Tensor& target,
              int64_t ignore_index, const c10::optional<Tensor>& lse_in, const c10::optional<Tensor>& coef,
              const c10::optional<Tensor>& loss, const c10::optional<Tensor>& lse,
              const c10::optional<Tensor>& dscale, const c10::optional<Tensor>& dtarget) {
  check_2d(x, "x");
  const int64_t R = x.size(0), K = x.size(1);
  if (bias.has_value() && bias->defined()) check_1d(*bias, x, K, "bias");
  for (const auto* t : {&scale, &lse_in, &coef, &loss, &lse, &dscale})
    if (t->has_value() && (*t)->defined()) check_1d(**t, x, R, "row vector");
  if (dtarget.has_value() && dtarget->defined()) {
    check_2d(*dtarget, "dtarget");
    TORCH_CHECK(dtarget->size(0) == R && dtarget->size(1) == K && dtarget->scalar_type() == x.scalar_type(),
                "dtarget must be [R, K] like x");
  }
  if (target.is_floating_point()) {
    check_2d(target, "target");
    TORCH_CHECK(target.size(0) == R && target.size(1) == K && target.scalar_type() == x.scalar_type(),
                "soft target must be [R, K] like x");
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == R && target.scalar_type() == at::kLong &&
                    target.is_contiguous(),
                "class target must be a contiguous int64 [R] tensor");
  }
  TORCH_CHECK(lse_in.has_value() && lse_in->defined() || lse.has_value() && lse->defined(),
              "lse is required when lse_in is not given");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lce_rows", [&] {
    lce_rows_impl<scalar_t>(x, opt_ptr<scalar_t>(bias), opt_ptr<scalar_t>(scale), target, ignore_index,
                            opt_ptr<scalar_t>(lse_in), opt_ptr<scalar_t>(coef), opt_ptr<scalar_t>(loss),
                            opt_ptr<scalar_t>(lse), opt_ptr<scalar_t>(dscale), opt_ptr<scalar_t>(dtarget));
  });
}

void set_direct_blas(bool on) { g_use_blas = on; }

bool direct_blas_available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// ------------------------------------------------------------------------------------------
// Per-sample Gram matrices of the normalised modality rows (the "scores" op)
// ------------------------------------------------------------------------------------------
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

bool has_avx2() {
#ifdef SF_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "scale_fast compiled CPU kernels (fused contrastive and linear cross-entropy)";
  m.def("ntxent_forward", &ntxent_forward, "NT-Xent row log-sum-exp (self excluded)", pybind11::arg("u"),
        pybind11::arg("rs"), pybind11::arg("tile"));
  m.def("ntxent_backward", &ntxent_backward, "NT-Xent gradient of the LSE terms: (du, dot_p, p_sum)",
        pybind11::arg("u"), pybind11::arg("rs"), pybind11::arg("lse"), pybind11::arg("coef"), pybind11::arg("tile"));
  m.def("cross_forward", &cross_forward, "cross-modal InfoNCE log-sum-exp (rows, and columns when both)",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("rs"), pybind11::arg("both"), pybind11::arg("tile"));
  m.def("cross_backward", &cross_backward, "cross-modal InfoNCE gradient of the LSE terms: (da, db, dot_p, p_sum)",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("rs"), pybind11::arg("lse_r"), pybind11::arg("lse_c"),
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
