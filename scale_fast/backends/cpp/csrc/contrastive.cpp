// Contrastive tiles (NT-Xent and cross-modal InfoNCE): logits are formed one tile at a time
// (the tile GEMM is the BLAS torch links -- MKL on x86 wheels -- called on raw pointers, or
// at::mm where torch exports no BLAS symbols) and everything around the GEMM -- scale, shift,
// exp, row/column sums, gradient-tile formation -- is fused into ONE pass over the tile while
// it is in cache (a 256 x 256 float32 tile and its operands fit in L2).  Work is split over
// tiles with at::parallel_for: the forward's row statistics are summed in thread-local [n]
// buffers and reduced at the end; the backward's tiles run in rounds whose tasks write
// disjoint rows (make_rounds), so gradients go straight into the results.
#include "common.h"

namespace sf {
namespace {

// ------------------------------------------------------------------------------------------
// Row kernels: each processes one row of a tile (length n) in one pass.
// ------------------------------------------------------------------------------------------

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

// Backward row of a contrastive tile: p = exp(a g - l), dp += p (g - gp), ps += p; with columns
// (dpc != nullptr): pt = exp(rs_c g - lse_c), dpc += pt (g - gp_c), psc += pt; g <- ca p + crs_c pt
// (ca = coef a, crs_c = coef rs_c), else g <- ca p.  gp, gp_c: the positives' cosines of the row
// and of the columns (dp and dpc are sums of P (G - G_pos): no cancellation, see tiles_backward).
template <typename T>
inline void bwd_row_scalar(T* g, int64_t c0, int64_t n, T a, T l, T ca, T gp, const T* rs_c, const T* lse_c,
                           const T* crs_c, const T* gp_c, T* dpc, T* psc, T& dp, T& ps) {
  for (int64_t c = c0; c < n; ++c) {
    const T x = g[c];
    const T p = sexp(a * x - l);
    dp += p * (x - gp);
    ps += p;
    if (dpc) {
      const T pt = sexp(rs_c[c] * x - lse_c[c]);
      dpc[c] += pt * (x - gp_c[c]);
      psc[c] += pt;
      g[c] = ca * p + crs_c[c] * pt;
    } else {
      g[c] = ca * p;
    }
  }
}

template <typename T>
inline void bwd_row(T* g, int64_t n, T a, T l, T ca, T gp, const T* rs_c, const T* lse_c, const T* crs_c,
                    const T* gp_c, T* dpc, T* psc, T& dp, T& ps) {
  bwd_row_scalar<T>(g, 0, n, a, l, ca, gp, rs_c, lse_c, crs_c, gp_c, dpc, psc, dp, ps);
}

#ifdef SF_AVX2
template <>
inline void bwd_row<float>(float* g, int64_t n, float a, float l, float ca, float gp, const float* rs_c,
                           const float* lse_c, const float* crs_c, const float* gp_c, float* dpc, float* psc,
                           float& dp, float& ps) {
  const __m256 va = _mm256_set1_ps(a), vl = _mm256_set1_ps(l), vca = _mm256_set1_ps(ca), vgp = _mm256_set1_ps(gp);
  __m256 vdp = _mm256_setzero_ps(), vps = _mm256_setzero_ps();
  int64_t c = 0;
  if (dpc) {
    for (; c + 8 <= n; c += 8) {
      __m256 x = _mm256_loadu_ps(g + c);
      __m256 p = exp_ps(_mm256_fmsub_ps(va, x, vl));
      vdp = _mm256_fmadd_ps(p, _mm256_sub_ps(x, vgp), vdp);
      vps = _mm256_add_ps(vps, p);
      __m256 pt = exp_ps(_mm256_fmsub_ps(_mm256_loadu_ps(rs_c + c), x, _mm256_loadu_ps(lse_c + c)));
      __m256 xc = _mm256_sub_ps(x, _mm256_loadu_ps(gp_c + c));
      _mm256_storeu_ps(dpc + c, _mm256_fmadd_ps(pt, xc, _mm256_loadu_ps(dpc + c)));
      _mm256_storeu_ps(psc + c, _mm256_add_ps(_mm256_loadu_ps(psc + c), pt));
      _mm256_storeu_ps(g + c, _mm256_fmadd_ps(vca, p, _mm256_mul_ps(_mm256_loadu_ps(crs_c + c), pt)));
    }
  } else {
    for (; c + 8 <= n; c += 8) {
      __m256 x = _mm256_loadu_ps(g + c);
      __m256 p = exp_ps(_mm256_fmsub_ps(va, x, vl));
      vdp = _mm256_fmadd_ps(p, _mm256_sub_ps(x, vgp), vdp);
      vps = _mm256_add_ps(vps, p);
      _mm256_storeu_ps(g + c, _mm256_mul_ps(vca, p));
    }
  }
  dp += hsum(vdp);
  ps += hsum(vps);
  bwd_row_scalar<float>(g, c, n, a, l, ca, gp, rs_c, lse_c, crs_c, gp_c, dpc, psc, dp, ps);
}
#endif

// ------------------------------------------------------------------------------------------
// Contrastive tile engine
// ------------------------------------------------------------------------------------------
// A "space" is a set of rows with their scales rs (logits of row r: rs[r] * G[r, :]).  A
// tile (R, C) pairs rows R of space X with rows C of space Y; the tile G = X[R] Y[C]^T
// gives the row-direction terms of R and, when `cols`, the column-direction terms of C.
// NT-Xent: X = Y = u, tiles R <= C, diagonal tiles exclude c == r and give rows only.
// CLIP: X = a, Y = b, every tile, columns when both directions are wanted.  (TileTask, make_tasks: common.h)
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
// and multiplied out with two GEMMs into the gradient rows of its match (see make_rounds).
// dot_p[r] = sum_{c != pos(r)} P[r, c] (G[r, c] - gx[r]), gx (gy) the positives' cosines of the
// rows of X (Y): every term is added as it comes, and the positive's own term, P (G - gx) with a
// G rounded unlike gx, is taken off again (its row reads it before the tile is overwritten).
// The positive of row r is r (CLIP) or r +- n (NT-Xent: same_space, 2n rows).
template <typename T>
std::vector<Tensor> tiles_backward(const Tensor& X, const Tensor& Y, const Tensor& rsx, const Tensor& rsy,
                                   const Tensor& lse_x, const Tensor& lse_y, const Tensor& gx, const Tensor& gy,
                                   double coef, const std::vector<Round>& rounds, bool cols, bool same_space,
                                   int64_t tile) {
  const int64_t nx = X.size(0), ny = Y.size(0), D = X.size(1);
  const auto opt = X.options();
  Tensor dX = at::zeros({nx, D}, opt);
  Tensor dY = same_space ? dX : at::zeros({ny, D}, opt);
  const int64_t ncol_space = same_space ? 0 : ny;
  Tensor stats = at::zeros({2, nx + ncol_space}, opt);  // [(dot_p, p_sum), rows of X then Y]
  const T c = static_cast<T>(coef);
  Tensor crsy = rsy * c;
  const T* prsx = rsx.data_ptr<T>();
  const T* prsy = rsy.data_ptr<T>();
  const T* plx = lse_x.data_ptr<T>();
  const T* ply = cols ? (same_space ? plx : lse_y.data_ptr<T>()) : nullptr;
  const T* pcrsy = crsy.data_ptr<T>();
  const T* pgx = gx.data_ptr<T>();
  const T* pgy = same_space ? pgx : gy.data_ptr<T>();
  const int64_t yoff = same_space ? 0 : nx;  // offset of Y's rows in the stats arrays
  const int64_t half = nx / 2;

  const T* px = X.data_ptr<T>();
  const T* py = Y.data_ptr<T>();
  T* dx = dX.data_ptr<T>();
  T* dy = dY.data_ptr<T>();
  T* dp = stats[0].data_ptr<T>();
  T* ps = stats[1].data_ptr<T>();
  for (const Round& round : rounds) {
    at::parallel_for(0, static_cast<int64_t>(round.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<T> gbuf(tile * tile);
      for (int64_t m = begin; m < end; ++m) {
        for (const TileTask& tk : round[m]) {
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
            const T gxr = pgx[row];
            const int64_t pc = (same_space ? (row < half ? row + half : row - half) : row) - tk.c0;
            const bool has_pos = pc >= 0 && pc < nc;  // the positive's column in this tile
            const T xp = has_pos ? gr[pc] : T(0);
            if (tk.diag) {
              bwd_row<T>(gr, r, a, plx[row], c * a, gxr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, dpr,
                         psr);
              gr[r] = 0;
              bwd_row<T>(gr + r + 1, nc - r - 1, a, plx[row], c * a, gxr, nullptr, nullptr, nullptr, nullptr, nullptr,
                         nullptr, dpr, psr);
            } else if (do_cols) {
              bwd_row<T>(gr, nc, a, plx[row], c * a, gxr, prsy + tk.c0, ply + tk.c0, pcrsy + tk.c0, pgy + tk.c0,
                         dp + yoff + tk.c0, ps + yoff + tk.c0, dpr, psr);
            } else {
              bwd_row<T>(gr, nc, a, plx[row], c * a, gxr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, dpr,
                         psr);
            }
            if (has_pos) {  // the positive's entry (r, pos(r)) is the column pos(r)'s positive too
              dpr -= sexp(a * xp - plx[row]) * (xp - gxr);
              if (do_cols) {
                const int64_t col = tk.c0 + pc;
                dp[yoff + col] -= sexp(prsy[col] * xp - ply[col]) * (xp - pgy[col]);
              }
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
      }
    });
  }
  return {dX, dY, stats};
}

}  // namespace

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

std::vector<Tensor> ntxent_backward(const Tensor& u, const Tensor& rs, const Tensor& lse, const Tensor& pos,
                                    double coef, int64_t tile) {
  check_2d(u, "u");
  check_1d(rs, u, u.size(0), "rs");
  check_1d(lse, u, u.size(0), "lse");
  check_1d(pos, u, u.size(0), "pos");
  TORCH_CHECK(u.size(0) % 2 == 0, "u must hold 2n rows");
  TORCH_CHECK(tile > 0, "tile must be positive");
  auto rounds = make_rounds(u.size(0), u.size(0), tile, true, Slots().count);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "ntxent_backward", [&] {
    out = tiles_backward<scalar_t>(u, u, rs, rs, lse, lse, pos, pos, coef, rounds, true, true, tile);
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
                                   const c10::optional<Tensor>& lse_c, const Tensor& pos, double coef, int64_t tile) {
  check_2d(a, "a");
  check_2d(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "a and b must match");
  const int64_t n = a.size(0);
  check_1d(rs, a, n, "rs");
  check_1d(lse_r, a, n, "lse_r");
  check_1d(pos, a, n, "pos");
  const bool both = lse_c.has_value() && lse_c->defined();
  if (both) check_1d(*lse_c, a, n, "lse_c");
  TORCH_CHECK(tile > 0, "tile must be positive");
  auto rounds = make_rounds(n, n, tile, false, Slots().count);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cross_backward", [&] {
    out = tiles_backward<scalar_t>(a, b, rs, rs, lse_r, both ? *lse_c : Tensor(), pos, pos, coef, rounds, both, false,
                                   tile);
  });
  // stats [2, n + n]: rows of a (direction a->b) then rows of b (direction b->a)
  Tensor st = out[2];
  Tensor dot_p = both ? st[0].view({2, n}) : st[0].narrow(0, 0, n).unsqueeze(0);
  Tensor p_sum = both ? st[1].view({2, n}) : st[1].narrow(0, 0, n).unsqueeze(0);
  return {out[0], out[1], dot_p, p_sum};
}

}  // namespace sf
