// Fused linear cross-entropy: one sweep over the rows in blocks; each [rows, K] logits block
// is formed by one GEMM and then scaled, reduced and turned into its gradient in place while
// in cache.  Work is split over row blocks with at::parallel_for; the weight and bias
// gradients are accumulated in thread-local buffers and reduced at the end.
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
// dt[k] = (lse - z) c (d soft target), x[k] <- gs sc c (d raw logits), db[k] += x[k].
template <typename T>
inline T lce_grad_row(T* x, int64_t K, T sc, T lse, T lw, T c, const T* q, T* dt, T* db) {
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
      if (db) _mm256_storeu_ps(db + k, _mm256_add_ps(_mm256_loadu_ps(db + k), out));
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
    if (db) db[k] += out;
  }
  return dsc;
}

// One pass over the rows of (hidden, target) in blocks of `block_rows`: per-row losses
// (without reduction) and log-sum-exp; with `coef` also the gradients of every input in
// needs = (hidden, weight, bias, scale, target), for the loss sum_n coef[n] * loss_n.
// hidden: [N, H] (any float dtype, converted per block); weight: [K, H] accumulation dtype;
// bias: [K]; scale: [N]; target: [N] int64 class ids or [N, K] probabilities (any float
// dtype); lse_saved: [N] (skips the log-sum-exp reduction, e.g. in a recomputing backward).
// Returns [losses, lse, d hidden, d weight, d bias, d scale, d target] (None where not needed).
template <typename T>
std::vector<Tensor> lce_sweep_impl(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                                   const c10::optional<Tensor>& scale, const Tensor& target, int64_t ignore_index,
                                   const c10::optional<Tensor>& lse_saved, const c10::optional<Tensor>& coef,
                                   const std::vector<bool>& needs, int64_t block_rows) {
  const int64_t N = hidden.size(0), K = weight.size(0), H = weight.size(1);
  const auto opt = weight.options();
  const bool soft = target.is_floating_point();
  const bool grads = coef.has_value() && coef->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_scale = scale.has_value() && scale->defined();
  const bool has_lse = lse_saved.has_value() && lse_saved->defined();
  const bool need_h = grads && needs[0], need_w = grads && needs[1], need_b = grads && needs[2] && has_bias,
             need_s = grads && needs[3] && has_scale, need_t = grads && needs[4] && soft;
  Tensor losses = at::zeros({N}, opt);
  Tensor lse = has_lse ? lse_saved->clone() : at::empty({N}, opt);
  Tensor dh = need_h ? at::empty({N, H}, opt) : Tensor();
  Tensor dw = need_w ? at::zeros({K, H}, opt) : Tensor();
  Tensor dsc = need_s ? at::zeros({N}, opt) : Tensor();
  Tensor dtg = need_t ? at::empty({N, K}, opt) : Tensor();
  const Slots slots;
  const int nt = slots.count;
  Tensor db_t = need_b ? at::zeros({nt, K}, opt) : Tensor();
  const int64_t rows_per_block = std::max<int64_t>(1, std::min<int64_t>(N, block_rows));
  Tensor buf = at::empty({N > 0 ? rows_per_block * K : 0}, opt);
  const T* pb = has_bias ? bias->data_ptr<T>() : nullptr;
  const T* ps = has_scale ? scale->data_ptr<T>() : nullptr;
  const T* pc = grads ? coef->data_ptr<T>() : nullptr;
  const int64_t* pt = soft ? nullptr : target.data_ptr<int64_t>();
  T* pl = losses.data_ptr<T>();
  T* plse = lse.data_ptr<T>();
  T* pdsc = need_s ? dsc.data_ptr<T>() : nullptr;

  for (int64_t r0 = 0; r0 < N; r0 += rows_per_block) {
    const int64_t R = std::min(rows_per_block, N - r0);
    Tensor h = hidden.narrow(0, r0, R).to(weight.scalar_type()).contiguous();
    Tensor L = buf.narrow(0, 0, R * K).view({R, K});
    at::mm_out(L, h, weight.t());
    Tensor q = soft ? target.narrow(0, r0, R).to(weight.scalar_type()).contiguous() : Tensor();
    T* pL = L.data_ptr<T>();
    const T* pq = soft ? q.data_ptr<T>() : nullptr;
    T* pdt = need_t ? dtg.data_ptr<T>() + r0 * K : nullptr;
    at::parallel_for(0, R, 4, [&](int64_t begin, int64_t end) {
      T* db = need_b ? db_t[slots.id()].data_ptr<T>() : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = r0 + i;
        T* x = pL + i * K;
        const T sc = ps ? ps[n] : T(1);
        T lse_n;
        if (has_lse) {
          if (pb) {
            T mn = std::numeric_limits<T>::infinity(), mx = -mn;
            lce_prepare_row<T>(x, K, pb, mn, mx);
          }
          lse_n = plse[n];
        } else {
          T mn = std::numeric_limits<T>::infinity(), mx = -mn;
          lce_prepare_row<T>(x, K, pb, mn, mx);
          const T m = sc >= 0 ? sc * mx : sc * mn;
          lse_n = m + std::log(fwd_row<T>(x, K, sc, m, nullptr, nullptr, nullptr));
          plse[n] = lse_n;
        }
        const T* qn = soft ? pq + i * K : nullptr;
        T lw, t_raw = 0;
        int64_t t = -1;
        if (soft) {
          auto ds = dot_sum<T>(qn, x, K);
          lw = ds.second;
          pl[n] = lse_n * lw - sc * ds.first;
        } else {
          t = pt[n];
          const bool valid = t != ignore_index;
          lw = valid ? T(1) : T(0);
          if (valid) {
            t_raw = x[t];
            pl[n] = lse_n - sc * t_raw;
          } else {
            t = -1;
            pl[n] = 0;
          }
        }
        if (!grads) continue;
        const T c = pc[n];
        if (!soft && t < 0) {  // ignored row: no gradient at all
          std::memset(x, 0, sizeof(T) * K);
          continue;
        }
        T d = lce_grad_row<T>(x, K, sc, lse_n, lw, c, qn, pdt ? pdt + i * K : nullptr, db);
        if (t >= 0) {  // the one-hot target of a class-id row
          d -= t_raw;
          x[t] -= sc * c;
          if (db) db[t] -= sc * c;
        }
        if (pdsc) pdsc[n] = d * c;
      }
    });
    if (need_h) {
      Tensor dh_rows = dh.narrow(0, r0, R);
      at::mm_out(dh_rows, L, weight);
    }
    if (need_w) dw.addmm_(L.t(), h);
  }
  Tensor db = need_b ? db_t.sum(0) : Tensor();
  return {losses, lse, dh, dw, db, dsc, dtg};
}

}  // namespace

std::vector<Tensor> lce_sweep(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                              const c10::optional<Tensor>& scale, const Tensor& target, int64_t ignore_index,
                              const c10::optional<Tensor>& lse_saved, const c10::optional<Tensor>& coef,
                              std::vector<bool> needs, int64_t block_rows) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_floating_point() && hidden.device().is_cpu(), "hidden must be [N, H]");
  check_2d(weight, "weight");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden and weight disagree on H");
  TORCH_CHECK(needs.size() == 5, "needs must hold 5 flags");
  const int64_t N = hidden.size(0), K = weight.size(0);
  if (bias.has_value() && bias->defined()) check_1d(*bias, weight, K, "bias");
  if (scale.has_value() && scale->defined()) check_1d(*scale, weight, N, "scale");
  if (lse_saved.has_value() && lse_saved->defined()) check_1d(*lse_saved, weight, N, "lse_saved");
  if (coef.has_value() && coef->defined()) check_1d(*coef, weight, N, "coef");
  if (target.is_floating_point()) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == K, "soft target must be [N, K]");
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == N && target.scalar_type() == at::kLong &&
                    target.is_contiguous(),
                "class target must be a contiguous int64 [N] tensor");
  }
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "lce_sweep", [&] {
    out = lce_sweep_impl<scalar_t>(hidden, weight, bias, scale, target, ignore_index, lse_saved, coef, needs,
                                   block_rows);
  });
  return out;
}

}  // namespace sf
