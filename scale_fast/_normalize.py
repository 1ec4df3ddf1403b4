"""L2 normalisation of embedding rows with a `present` mask (docs/contract.md §2).

z = e / max(||e||, 1e-12) for present rows, exactly 0 for absent ones: absent
rows never enter the arithmetic (NaN there cannot leak) and get a gradient of
exactly 0.  The row helpers let a backend normalise the rows it gathers on the
fly instead of keeping a normalised copy of the whole [M, B, D] tensor.
"""
from __future__ import annotations

import torch

EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(x: torch.Tensor):
    """(u, inv, projected) for rows x [..., D] in their dtype: u = x * inv, inv = 1 / max(||x||, EPS)."""
    inv, projected = _inverse_norm(x)
    return x * inv[..., None], inv, projected


def normalize_rows_(x: torch.Tensor):
    """normalize_rows(x) in place: x becomes u (same values, no second buffer)."""
    inv, projected = _inverse_norm(x)
    return x.mul_(inv[..., None]), inv, projected


def _inverse_norm(x: torch.Tensor):
    """(1 / max(||x||, EPS), ||x|| > EPS) per row of x."""
    norm = torch.linalg.vector_norm(x, dim=-1)
    return 1.0 / norm.clamp(min=EPS), norm > EPS


# Rows per block in normalize_rows_backward: its temporaries stay ~1 MiB instead of the
# size of du, whose freed copies the allocator would keep resident.
ROWS_PER_BLOCK = 1024


def normalize_rows_backward(u: torch.Tensor, du: torch.Tensor, inv: torch.Tensor, projected: torch.Tensor):
    """d x from d u: (du - u (u . du)) / ||x||; below the EPS clamp it is du / EPS.  Overwrites du.

    Rows are independent: a 2-D du is done in blocks of rows (same values, small temporaries).
    """
    if du.dim() == 2 and du.shape[0] > ROWS_PER_BLOCK:
        for start in range(0, du.shape[0], ROWS_PER_BLOCK):
            rows = slice(start, start + ROWS_PER_BLOCK)
            normalize_rows_backward(u[rows], du[rows], inv[rows], projected[rows])
        return du
    along = torch.einsum("...d,...d->...", u, du) * projected
    return du.sub_(u * along[..., None]).mul_(inv[..., None])


class NormalizePresent(torch.autograd.Function):
    """[M, B, D] -> unit rows where present, 0 elsewhere; saves only z and [M, B] statistics."""

    @staticmethod
    def forward(ctx, e, present):
        acc = accumulation_dtype(e.dtype)
        kept = torch.where(present[..., None], e, torch.zeros((), dtype=e.dtype, device=e.device)).to(acc)
        z, inv, projected = normalize_rows(kept)
        z = z.to(e.dtype)
        ctx.save_for_backward(z, inv * present, projected)
        return z

    @staticmethod
    def backward(ctx, dz):
        z, inv, projected = ctx.saved_tensors
        acc = inv.dtype
        # absent rows get exactly 0 (inv is 0 there): a consumer may still send them a gradient
        de = normalize_rows_backward(z.to(acc), dz.to(acc, copy=True), inv, projected)
        return de.to(dz.dtype), None


def normalize_present(e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """z [M, B, D]: unit rows for present entries, 0 for absent ones."""
    return NormalizePresent.apply(e, present)


def keep_present(e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """e [M, B, D] as given where present, exactly 0 (and 0 gradient) where absent: normalize=False."""
    return torch.where(present[..., None], e, torch.zeros((), dtype=e.dtype, device=e.device))


def within_unit_ball(e: torch.Tensor, present: torch.Tensor):
    """(keep_present(e) / R, R * R) with R the smallest power of two >= the largest present row norm.

    normalize=False: the pair kernels bound every logit by |s w| (true for rows of norm <= 1), so
    rows used as given are brought inside the unit ball and the logit scale multiplied by R^2:
    (s R^2) (x / R) . (y / R) = s x . y, and dividing by a power of two rounds nothing.  R is a
    constant (no gradient), so the gradients are exactly those of the rows as given.
    """
    kept = keep_present(e, present)
    if kept.numel() == 0:
        return kept, 1.0
    with torch.no_grad():  # tensors only (no host sync): torch.compile traces it whole
        top = torch.linalg.vector_norm(kept.to(accumulation_dtype(e.dtype)), dim=-1).amax()
        exp = torch.ceil(torch.log2(top))
        exp = torch.where(torch.isfinite(exp), exp, torch.zeros_like(exp))  # all rows 0 (or not finite)
    return kept * torch.exp2(-exp).to(e.dtype), torch.exp2(2 * exp)
