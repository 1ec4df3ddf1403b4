// Linear cross-entropy row pass (lce_rows): given one chunk's [rows, K] logits block, formed by a
// GEMM in scale_fast/backends/_lce_driver.py, add the bias, compute each row's loss and
// log-sum-exp, and overwrite the block in place with its gradient.  The chunk loop and the
// GEMMs are the shared driver's; rows are split over threads with at::parallel_for.
#include "common.h"

namespace sf {
namespace {

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

}  // namespace

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

}  // namespace sf
