"""Per-modality encoders: a small pre-LN stack over [CLS] + the modality's tokens.

Text and table: token + position (+ property/value type) embeddings, and a learned
CLS vector at position 0.  Image, video and audio: a linear projection of the
features (+ the projected box for image regions) and learned positions; the CLS is,
as in SCALE's released code, the projected mean of the sample's valid features
(plus a learned CLS offset), or a learned vector with cls_mode="learned".  With
positional=True (rows whose position carries meaning, e.g. one descriptor cut into
fixed rows) the CLS is instead a projection of the concatenated rows: a mean would
mix columns that mean different things.

Every encoder returns [B, 1 + L, H] and the [B, 1 + L] mask of its real tokens.
With drop=True the padding tokens are removed inside the stack (packed).
"""
from __future__ import annotations

import torch
from torch import nn

from .transformer import TransformerStack


def _init_embedding(e: nn.Embedding) -> nn.Embedding:
    nn.init.normal_(e.weight, std=0.02)
    if e.padding_idx is not None:
        with torch.no_grad():
            e.weight[e.padding_idx].zero_()
    return e


class _Encoder(nn.Module):
    """What every encoder shares: the CLS vector, LayerNorm, dropout and the stack after the
    modality's own input layers (built first, so parameters are created in the same order)."""

    def _build_stack(self, dim: int, length: int, depth: int, heads: int, mlp_ratio: float, dropout: float,
                     attention: str, cls_mode: str):
        self.cls = nn.Parameter(torch.randn(dim) * 0.02)
        self.cls_mode = cls_mode
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.stack = TransformerStack(dim, depth, heads, mlp_ratio, dropout, attention)
        self.length = length

    def _check_length(self, L: int, what: str):
        if L + 1 > self.length:
            raise ValueError(f"{L} {what} exceed the encoder's length {self.length} (CLS included)")

    def _encode(self, x: torch.Tensor, cls: torch.Tensor, valid: torch.Tensor, drop: bool):
        """[CLS] + x with positions, normed, through the stack: ([B, 1 + L, H], keep [B, 1 + L])."""
        B, L = valid.shape
        x = torch.cat([cls[:, None], x], dim=1)
        x = self.drop(self.norm(x + self.position.weight[: L + 1]))
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=valid.device), valid], dim=1)
        return self.stack(x, keep, drop=drop), keep


class TokenEncoder(_Encoder):
    def __init__(self, vocab_size: int, dim: int, length: int, depth: int, heads: int, *, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, attention: str = "auto", num_types: int = 1, pad_token_id: int = 0,
                 cls_mode: str = "learned"):
        super().__init__()
        self.token = _init_embedding(nn.Embedding(vocab_size, dim, padding_idx=pad_token_id))
        self.position = _init_embedding(nn.Embedding(length, dim))
        self.types = _init_embedding(nn.Embedding(num_types, dim)) if num_types > 1 else None
        self._build_stack(dim, length, depth, heads, mlp_ratio, dropout, attention, cls_mode)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, types: torch.Tensor | None = None,
                drop: bool = False):
        B, L = ids.shape
        self._check_length(L, "tokens")
        x = self.token(ids)
        if self.types is not None and types is not None:
            x = x + self.types(types)
        cls = self.cls.to(x.dtype).expand(B, -1)
        if self.cls_mode == "mean":
            w = valid.to(x.dtype)[..., None]
            cls = cls + (x * w).sum(1) / w.sum(1).clamp(min=1)
        return self._encode(x, cls, valid, drop)


class FeatureEncoder(_Encoder):
    def __init__(self, feature_dim: int, dim: int, length: int, depth: int, heads: int, *, box_dim: int = 0,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, attention: str = "auto", cls_mode: str = "mean",
                 positional: bool = False):
        super().__init__()
        self.proj = nn.Linear(feature_dim, dim)
        # positional rows: CLS input = W [row_1; ...; row_{length-1}] (absent rows as zeros)
        self.rows_proj = nn.Linear((length - 1) * feature_dim, dim) if positional else None
        self.box = nn.Linear(box_dim, dim) if box_dim else None
        self.position = _init_embedding(nn.Embedding(length, dim))
        self._build_stack(dim, length, depth, heads, mlp_ratio, dropout, attention, cls_mode)

    def forward(self, feats: torch.Tensor, valid: torch.Tensor, boxes: torch.Tensor | None = None,
                drop: bool = False):
        B, L, F = feats.shape
        self._check_length(L, "rows")
        H = self.proj.out_features
        if drop:  # project only the real rows
            flat = valid.reshape(-1).nonzero().squeeze(1)
            rows = self.proj(feats.reshape(B * L, F).index_select(0, flat))
            if self.box is not None and boxes is not None:
                rows = rows + self.box(boxes.reshape(B * L, -1).index_select(0, flat).to(rows.dtype))
            x = rows.new_zeros(B * L, H).index_copy(0, flat, rows).view(B, L, H)
        else:
            x = self.proj(feats)
            if self.box is not None and boxes is not None:
                x = x + self.box(boxes.to(x.dtype))
        if self.rows_proj is not None:
            rows = feats.masked_fill(~valid[..., None], 0.0)
            rows = torch.nn.functional.pad(rows, (0, 0, 0, self.length - 1 - L)).reshape(B, -1)
            cls = self.rows_proj(rows.to(x.dtype)) + self.cls.to(x.dtype)
        elif self.cls_mode == "mean":
            w = valid.to(feats.dtype)[..., None]
            mean = (feats * w).sum(1) / w.sum(1).clamp(min=1)
            cls = self.proj(mean) + self.cls.to(x.dtype)
        else:
            cls = self.cls.to(x.dtype).expand(B, -1)
        return self._encode(x, cls, valid, drop)
