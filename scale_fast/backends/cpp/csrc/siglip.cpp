// SigLIP's sigmoid loss tiles: sum_r sum_c softplus(-y_rc x_rc), x_rc = rs_r q_r . k_c + bias,
// y_rc = +1 where c == pos[r] (the row's positive), else -1.  As in contrastive.cpp, each
// [TILE, TILE] tile of q k^T is formed by one GEMM into a thread's tile buffer, and every
// elementwise step (softplus and its row sums in forward; sigmoid, the row and bias sums and
// the gradient tile, formed in place, in backward) runs in ONE sweep while the tile is in
// cache.  The positive of a row is handled by itself (its row is split around it), so
// softplus(-x) and sigmoid(x) - 1 = -sigmoid(-x) are exact there, with no cancellation.
// Tiles are split over threads with at::parallel_for: the forward's sum goes to per-thread
// double accumulators added in thread order; the backward runs in rounds whose tasks write
// disjoint rows (make_rounds, common.h), so its gradients need no per-thread copies.
#include "common.h"

namespace sf {
namespace {

// Numerically stable softplus(x) = max(x, 0) + log1p(exp(-|x|)) and sigmoid.
template <typename T>
inline T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(sexp(-std::abs(x)));
}

template <typename T>
inline T sigmoid(T x) {
  const T t = sexp(-std::abs(x));
  return (x >= T(0) ? T(1) : t) / (T(1) + t);
}

#ifdef SF_AVX2
// log1p(t) for t in [0, 1]: 2 atanh(s), s = t / (2 + t) in [0, 1/3], as its odd series up to
// s^15 (the next term is below 2e-9 relative); exact in relative terms for tiny t, where
// log(1 + t) would lose t's digits to the rounding of 1 + t.
inline __m256 log1p_unit_ps(__m256 t) {
  const __m256 s = _mm256_div_ps(t, _mm256_add_ps(_mm256_set1_ps(2.0f), t));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 p = _mm256_set1_ps(1.0f / 15.0f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 13.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 11.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 9.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 7.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 5.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 3.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(_mm256_add_ps(s, s), p);
}

inline __m256 abs_ps(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

inline __m256 softplus_ps(__m256 x) {
  const __m256 t = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), abs_ps(x)));
  return _mm256_add_ps(_mm256_max_ps(x, _mm256_setzero_ps()), log1p_unit_ps(t));
}

inline __m256 sigmoid_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), abs_ps(x)));
  const __m256 num = _mm256_blendv_ps(one, t, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_div_ps(num, _mm256_add_ps(one, t));
}
#endif

// Forward row: sum_c softplus(a g[c] + b) over g[c0:n].
template <typename T>
inline T softplus_row_scalar(const T* g, int64_t c0, int64_t n, T a, T b) {
  T s = 0;
  for (int64_t c = c0; c < n; ++c) s += softplus(a * g[c] + b);
  return s;
}

template <typename T>
inline T softplus_row(const T* g, int64_t n, T a, T b) {
  return softplus_row_scalar<T>(g, 0, n, a, b);
}

#ifdef SF_AVX2
template <>
inline float softplus_row<float>(const float* g, int64_t n, float a, float b) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) acc = _mm256_add_ps(acc, softplus_ps(_mm256_fmadd_ps(va, _mm256_loadu_ps(g + c), vb)));
  return hsum(acc) + softplus_row_scalar<float>(g, c, n, a, b);
}
#endif

// Backward row over g[c0:n]: p = sigmoid(a g + b) (d loss / d x of a negative), sp += p,
// spg += p g, and g <- ca p (ca = coef * a: the gradient tile's entry).
template <typename T>
inline void sigmoid_row_scalar(T* g, int64_t c0, int64_t n, T a, T b, T ca, T& sp, T& spg) {
  for (int64_t c = c0; c < n; ++c) {
    const T x = g[c];
    const T p = sigmoid(a * x + b);
    sp += p;
    spg += p * x;
    g[c] = ca * p;
  }
}

template <typename T>
inline void sigmoid_row(T* g, int64_t n, T a, T b, T ca, T& sp, T& spg) {
  sigmoid_row_scalar<T>(g, 0, n, a, b, ca, sp, spg);
}

#ifdef SF_AVX2
template <>
inline void sigmoid_row<float>(float* g, int64_t n, float a, float b, float ca, float& sp, float& spg) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vca = _mm256_set1_ps(ca);
  __m256 vsp = _mm256_setzero_ps(), vspg = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 x = _mm256_loadu_ps(g + c);
    const __m256 p = sigmoid_ps(_mm256_fmadd_ps(va, x, vb));
    vsp = _mm256_add_ps(vsp, p);
    vspg = _mm256_fmadd_ps(p, x, vspg);
    _mm256_storeu_ps(g + c, _mm256_mul_ps(vca, p));
  }
  sp += hsum(vsp);
  spg += hsum(vspg);
  sigmoid_row_scalar<float>(g, c, n, a, b, ca, sp, spg);
}
#endif

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& rs, const Tensor& pos, int64_t tile) {
  check_2d(q, "q");
  check_2d(k, "k");
  TORCH_CHECK(q.size(1) == k.size(1) && q.scalar_type() == k.scalar_type(), "q and k must have the same D and dtype");
  check_1d(rs, q, q.size(0), "rs");
  TORCH_CHECK(pos.dim() == 1 && pos.is_contiguous() && pos.size(0) == q.size(0) && pos.scalar_type() == at::kLong,
              "pos must be a contiguous int64 [", q.size(0), "] tensor");
  if (pos.numel() > 0) {
    TORCH_CHECK(pos.min().item<int64_t>() >= 0 && pos.max().item<int64_t>() < k.size(0),
                "pos must index the rows of k");
  }
  TORCH_CHECK(tile > 0, "tile must be positive");
}

// The column of row `row`'s positive inside tile tk, or -1 when it lies in another tile.
inline int64_t positive_in_tile(const int64_t* pos, int64_t row, const TileTask& tk) {
  const int64_t p = pos[row] - tk.c0;
  return (p >= 0 && p < tk.nc) ? p : -1;
}

template <typename T>
double tiles_forward(const Tensor& q, const Tensor& k, const Tensor& rs, const Tensor& pos, T bias, int64_t tile) {
  const int64_t R = q.size(0), C = k.size(0), D = q.size(1);
  const auto tasks = make_tasks(R, C, tile, false);
  const Slots slots;
  std::vector<double> total(slots.count, 0.0);  // per thread; summed in thread order
  const T* pq = q.data_ptr<T>();
  const T* pk = k.data_ptr<T>();
  const T* prs = rs.data_ptr<T>();
  const int64_t* ppos = pos.data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> gbuf(tile * tile);
    T* g = gbuf.data();
    double sum = 0.0;
    for (int64_t t = begin; t < end; ++t) {
      const TileTask& tk = tasks[t];
      gemm_rm<T>(false, true, tk.nr, tk.nc, D, pq + tk.r0 * D, D, pk + tk.c0 * D, D, false, g, tk.nc);
      for (int64_t r = 0; r < tk.nr; ++r) {
        const int64_t row = tk.r0 + r;
        const T a = prs[row];
        const T* gr = g + r * tk.nc;
        const int64_t p = positive_in_tile(ppos, row, tk);
        T s;
        if (p < 0) {
          s = softplus_row<T>(gr, tk.nc, a, bias);
        } else {
          s = softplus_row<T>(gr, p, a, bias) + softplus_row<T>(gr + p + 1, tk.nc - p - 1, a, bias) +
              softplus(-(a * gr[p] + bias));
        }
        sum += static_cast<double>(s);
      }
    }
    total[slots.id()] += sum;
  });
  double out = 0.0;
  for (double s : total) out += s;
  return out;
}

// Backward: the tiles in rounds of matches that write disjoint rows of dq, dk and d_rs
// (make_rounds), straight into the results; sum_rc dx_rc is kept in double per match and
// added in round and match order, so the result is deterministic for a given thread count.
template <typename T>
std::vector<Tensor> tiles_backward(const Tensor& q, const Tensor& k, const Tensor& rs, const Tensor& pos, T bias,
                                   T coef, int64_t tile) {
  const int64_t R = q.size(0), C = k.size(0), D = q.size(1);
  const auto rounds = make_rounds(R, C, tile, false, Slots().count);
  const auto opt = q.options();
  Tensor dq = at::zeros({R, D}, opt), dk = at::zeros({C, D}, opt);
  Tensor spg = at::zeros({R}, opt);  // sum_c dx_rc g_rc per row
  const T* pq = q.data_ptr<T>();
  const T* pk = k.data_ptr<T>();
  const T* prs = rs.data_ptr<T>();
  const int64_t* ppos = pos.data_ptr<int64_t>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* spgp = spg.data_ptr<T>();
  double sp_all = 0.0;  // sum_rc dx_rc
  for (const Round& round : rounds) {
    std::vector<double> sp(round.size(), 0.0);
    at::parallel_for(0, static_cast<int64_t>(round.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<T> gbuf(tile * tile);
      T* g = gbuf.data();
      for (int64_t m = begin; m < end; ++m) {
        double sp_m = 0.0;
        for (const TileTask& tk : round[m]) {
          const T* qr = pq + tk.r0 * D;
          const T* kc = pk + tk.c0 * D;
          gemm_rm<T>(false, true, tk.nr, tk.nc, D, qr, D, kc, D, false, g, tk.nc);
          for (int64_t r = 0; r < tk.nr; ++r) {
            const int64_t row = tk.r0 + r;
            const T a = prs[row], ca = coef * a;
            T* gr = g + r * tk.nc;
            const int64_t p = positive_in_tile(ppos, row, tk);
            T s = 0, sg = 0;
            if (p < 0) {
              sigmoid_row<T>(gr, tk.nc, a, bias, ca, s, sg);
            } else {
              sigmoid_row<T>(gr, p, a, bias, ca, s, sg);
              sigmoid_row<T>(gr + p + 1, tk.nc - p - 1, a, bias, ca, s, sg);
              const T x = gr[p];
              const T dx = -sigmoid(-(a * x + bias));  // sigmoid(x) - 1 without cancellation
              s += dx;
              sg += dx * x;
              gr[p] = ca * dx;
            }
            sp_m += static_cast<double>(s);
            spgp[row] += sg;
          }
          gemm_rm<T>(false, false, tk.nr, D, tk.nc, g, tk.nc, kc, D, true, dqp + tk.r0 * D, D);  // dq[R] += dG k[C]
          gemm_rm<T>(true, false, tk.nc, D, tk.nr, g, tk.nc, qr, D, true, dkp + tk.c0 * D, D);   // dk[C] += dG^T q[R]
        }
        sp[m] = sp_m;
      }
    });
    for (double v : sp) sp_all += v;
  }
  Tensor d_rs = spg.mul_(coef);
  Tensor d_bias = at::scalar_tensor(static_cast<double>(coef) * sp_all, opt);
  return {dq, dk, d_rs, d_bias};
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Public entry points
// ------------------------------------------------------------------------------------------
Tensor siglip_forward(const Tensor& q, const Tensor& k, const Tensor& rs, const Tensor& pos, double bias,
                      int64_t tile) {
  check_inputs(q, k, rs, pos, tile);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "siglip_forward", [&] {
    total = tiles_forward<scalar_t>(q, k, rs, pos, static_cast<scalar_t>(bias), tile);
  });
  return at::scalar_tensor(total, q.options());
}

std::vector<Tensor> siglip_backward(const Tensor& q, const Tensor& k, const Tensor& rs, const Tensor& pos, double bias,
                                    double coef, int64_t tile) {
  check_inputs(q, k, rs, pos, tile);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "siglip_backward", [&] {
    out = tiles_backward<scalar_t>(q, k, rs, pos, static_cast<scalar_t>(bias), static_cast<scalar_t>(coef), tile);
  });
  return out;
}

}  // namespace sf
