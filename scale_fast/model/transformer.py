"""Pre-LN transformer stacks whose absent tokens are either masked out of attention or removed.

Two layouts of the same computation:

* ``drop=False`` — the tokens stay [B, T, H]; attention gets a boolean key mask
  (True = attend) and every token-wise layer runs on all B * T tokens.
* ``drop=True`` — only the kept tokens exist: token-wise layers (LayerNorm, MLP,
  the q/k/v and output projections) run on the packed [N, H] kept tokens; for
  attention the packed q/k/v are padded per sample to the longest kept length with
  a boolean key mask (SDPA), or handed to xformers' ``memory_efficient_attention``
  with a block-diagonal mask on the packed tokens (varlen, CUDA only).

Both give the same outputs at the kept positions (tests/test_model.py); dropped
positions come back as zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: xformers' memory-efficient attention (CUDA only)
    from xformers import ops as _xops  # type: ignore
    from xformers.ops import fmha as _fmha  # type: ignore
except Exception:  # pragma: no cover - xformers is not a dependency
    _xops = None
    _fmha = None


def xformers_available() -> bool:
    return _xops is not None


def resolve_attention(attention: str, device: torch.device) -> str:
    """"sdpa" or "xformers" for tensors on `device` ("auto": xformers on CUDA when installed)."""
    if attention == "auto":
        return "xformers" if (_xops is not None and device.type == "cuda") else "sdpa"
    if attention == "xformers":
        if _xops is None:
            raise RuntimeError("attention='xformers' needs the xformers package (pip install xformers)")
        if device.type != "cuda":
            raise RuntimeError("attention='xformers' runs on CUDA tensors only; use 'sdpa' or 'auto' on CPU")
        return "xformers"
    if attention != "sdpa":
        raise ValueError(f"attention must be 'auto', 'sdpa' or 'xformers', got {attention!r}")
    return "sdpa"


@dataclass
class Group:
    """Samples of similar kept length attended together: their kept tokens `tokens` [n]
    (indices into the packed tokens) go to slots `slots` [n] of a [size * max_len] buffer."""

    tokens: torch.Tensor
    slots: torch.Tensor
    size: int
    max_len: int
    key_mask: torch.Tensor


@dataclass
class Layout:
    """Where the tokens are and which keys each query may see.

    padded layout (packed=False): x is [B, T, H]; key_mask [B, T] (None = all keys).
    packed layout (packed=True): x is [N, H], the kept tokens in (sample, position)
    order; for SDPA the samples are sorted by kept length and cut into `groups`, each
    padded to its own longest sample (a boolean key mask marks the real slots), so
    little attention work goes to padding; seqlens (the kept count per sample) feed
    xformers' block-diagonal mask.
    """

    packed: bool
    key_mask: Optional[torch.Tensor]
    groups: Optional[list] = None
    seqlens: Optional[list] = None
    _xbias: object = None

    def xformers_bias(self):
        if self._xbias is None:
            self._xbias = _fmha.attn_bias.BlockDiagonalMask.from_seqlens([int(n) for n in self.seqlens])
        return self._xbias


def _safe_key_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """A row with no key to attend would give NaN: let it attend everything (its output is unused)."""
    empty = ~key_mask.any(dim=1, keepdim=True)
    return key_mask | empty


def padded_layout(key_mask: Optional[torch.Tensor]) -> Layout:
    return Layout(packed=False, key_mask=None if key_mask is None else _safe_key_mask(key_mask))


def packed_layout(keep: torch.Tensor, need_seqlens: bool = False, max_groups: int = 4) -> tuple:
    """(Layout, flat index [N] of the kept tokens in keep.view(-1)).

    Samples are sorted by their kept length and split into up to `max_groups` groups of
    equal size; each group is padded to its own longest sample for attention.
    """
    B, T = keep.shape
    device = keep.device
    flat = keep.reshape(-1).nonzero().squeeze(1)
    counts = keep.sum(dim=1)
    N = flat.numel()
    sample_of = flat // T                                          # sample of each kept token
    starts = counts.cumsum(0) - counts
    pos = torch.arange(N, device=device) - starts[sample_of]       # position among its sample's kept tokens
    order = torch.argsort(counts, stable=True)
    n_groups = max(1, min(max_groups, B))
    bounds = [round(g * B / n_groups) for g in range(n_groups + 1)]
    group_of = torch.empty(B, dtype=torch.long, device=device)
    rank = torch.empty(B, dtype=torch.long, device=device)
    groups = []
    maxima = counts[order].tolist()
    for g in range(n_groups):
        lo, hi = bounds[g], bounds[g + 1]
        if hi <= lo:
            continue
        members = order[lo:hi]
        group_of[members] = len(groups)
        rank[members] = torch.arange(hi - lo, device=device)
        groups.append([hi - lo, max(int(maxima[hi - 1]), 1), members])
    tok_group = group_of[sample_of]
    out = []
    for g, (size, L, members) in enumerate(groups):
        tokens = (tok_group == g).nonzero().squeeze(1)
        slots = rank[sample_of[tokens]] * L + pos[tokens]
        key_mask = torch.arange(L, device=device)[None, :] < counts[members][:, None]
        out.append(Group(tokens, slots, size, L, _safe_key_mask(key_mask)))
    layout = Layout(packed=True, key_mask=None, groups=out, seqlens=counts.tolist() if need_seqlens else None)
    return layout, flat


class Attention(nn.Module):
    """Multi-head self-attention over a padded or packed layout."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, attention: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.attention = attention

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        backend = resolve_attention(self.attention, x.device)
        p = self.dropout if self.training else 0.0
        qkv = self.qkv(x)
        if layout.packed:
            out = self._packed(qkv, layout, backend, p)
        else:
            out = self._padded(qkv, layout, backend, p)
        return self.proj(out)

    def _padded(self, qkv, layout, backend, p):
        B, T, _ = qkv.shape
        h, d = self.heads, self.head_dim
        if backend == "xformers" and layout.key_mask is None:
            q, k, v = qkv.view(B, T, 3, h, d).unbind(2)
            return _xops.memory_efficient_attention(q, k, v, p=p).reshape(B, T, h * d)
        if backend == "xformers":  # padded tokens with a key mask: packed varlen on the kept keys is not
            # equivalent for the masked queries, so use an additive bias (xformers wants it 8-aligned)
            q, k, v = qkv.view(B, T, 3, h, d).unbind(2)
            T8 = (T + 7) // 8 * 8
            bias = torch.zeros(B, h, T, T8, dtype=q.dtype, device=q.device)
            bias[..., :T].masked_fill_(~layout.key_mask[:, None, None, :], float("-inf"))
            out = _xops.memory_efficient_attention(q, k, v, attn_bias=bias[..., :T], p=p)
            return out.reshape(B, T, h * d)
        q, k, v = qkv.view(B, T, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if layout.key_mask is None else layout.key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).reshape(B, T, h * d)

    def _packed(self, qkv, layout, backend, p):
        N = qkv.shape[0]
        h, d = self.heads, self.head_dim
        if backend == "xformers":
            q, k, v = qkv.view(1, N, 3, h, d).unbind(2)
            out = _xops.memory_efficient_attention(q, k, v, attn_bias=layout.xformers_bias(), p=p)
            return out.reshape(N, h * d)
        out = qkv.new_empty(N, h * d)
        for g in layout.groups:
            part = qkv.index_select(0, g.tokens) if len(layout.groups) > 1 else qkv
            buf = qkv.new_zeros(g.size * g.max_len, 3 * h * d).index_copy(0, g.slots, part)
            q, k, v = buf.view(g.size, g.max_len, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.key_mask[:, None, None, :], dropout_p=p)
            o = o.transpose(1, 2).reshape(g.size * g.max_len, h * d).index_select(0, g.slots)
            out = out.index_copy(0, g.tokens, o) if len(layout.groups) > 1 else o
        return out


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, attention: str = "auto"):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, attention)
        self.ln2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), layout))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerStack(nn.Module):
    """`depth` pre-LN blocks and a final LayerNorm.

    forward(x [B, T, H], keep [B, T] bool or None, drop=False) -> [B, T, H]:
    keep marks the tokens that exist (False: padding, absent modality). With
    drop=False they are masked out of attention as keys; with drop=True they are
    removed (outputs there are 0).
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 attention: str = "auto"):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, attention) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def set_attention(self, attention: str) -> None:
        for block in self.blocks:
            block.attn.attention = attention

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None, drop: bool = False) -> torch.Tensor:
        if not drop or keep is None:
            layout = padded_layout(keep)
            for block in self.blocks:
                x = block(x, layout)
            return self.norm(x)
        B, T, H = x.shape
        backend = resolve_attention(self.blocks[0].attn.attention, x.device) if len(self.blocks) else "sdpa"
        layout, flat = packed_layout(keep, need_seqlens=backend == "xformers")
        y = x.reshape(B * T, H).index_select(0, flat)
        for block in self.blocks:
            y = block(y, layout)
        y = self.norm(y)
        return y.new_zeros(B * T, H).index_copy(0, flat, y).view(B, T, H)

    def forward_packed(self, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The kept tokens y [N, H] (in keep's row-major order) -> outputs [N, H]."""
        backend = resolve_attention(self.blocks[0].attn.attention, y.device) if len(self.blocks) else "sdpa"
        layout, _ = packed_layout(keep, need_seqlens=backend == "xformers")
        for block in self.blocks:
            y = block(y, layout)
        return self.norm(y)
