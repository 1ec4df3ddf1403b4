"""The Joint Co-Transformer (JCT): one pre-LN stack over the concatenated tokens of every modality."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from .config import MISSING_MODES
from .transformer import TransformerStack


@dataclass
class JCTOutput:
    """tokens: M tensors [B, L_m, H] (position 0 of each is the modality's CLS; dropped
    positions are 0); cls: [M, B, H], the outputs at each modality's CLS position
    (SCALE's task embeddings); keep: [B, T] bool, the tokens that took part."""

    tokens: List[torch.Tensor]
    cls: torch.Tensor
    keep: torch.Tensor


class JointCoTransformer(nn.Module):
    """Single-stream pre-LN transformer over the concatenated modality tokens (SCALE's JCT).

    Args:
        dim, depth, heads, mlp_ratio, dropout: the stack.
        lengths: the maximum length of each modality (CLS included), in modality
            order; learned positions run over their concatenation (SCALE: 36, 64,
            37, 13, 81 for text, image... in the config's order).
        attention: "sdpa" (torch.nn.functional.scaled_dot_product_attention),
            "xformers" (memory_efficient_attention, CUDA) or "auto" (xformers on
            CUDA when installed, else SDPA).
        missing: how absent modalities are handled (overridable per call):
            "zero"  the paper's zero imputation: their (zero-input) tokens are attended;
            "mask"  their tokens stay in the tensors but are masked out of attention;
            "drop"  their tokens are removed: token-wise layers run on the kept tokens
                    only and attention keeps samples apart. Same outputs as "mask".
            Padding inside a present modality is masked ("zero", "mask") or removed ("drop").

    forward(tokens, valid, present, missing=None) -> JCTOutput
        tokens: M tensors [B, L_m, H] (L_m <= lengths[m]); valid: M bool tensors
        [B, L_m] (False = padding); present: [M, B] bool.
    """

    def __init__(self, dim: int, depth: int, heads: int, lengths: Sequence[int], *, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, attention: str = "auto", missing: str = "drop"):
        super().__init__()
        if missing not in MISSING_MODES:
            raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
        self.lengths = tuple(int(n) for n in lengths)
        offsets = [0]
        for n in self.lengths[:-1]:
            offsets.append(offsets[-1] + n)
        self.offsets = tuple(offsets)
        self.missing = missing
        self.modality_embed = nn.Parameter(torch.zeros(len(self.lengths), dim))
        self.position_embed = nn.Parameter(torch.zeros(sum(self.lengths), dim))
        nn.init.normal_(self.modality_embed, std=0.02)
        nn.init.normal_(self.position_embed, std=0.02)
        self.stack = TransformerStack(dim, depth, heads, mlp_ratio, dropout, attention)

    @property
    def attention(self) -> str:
        return self.stack.blocks[0].attn.attention if len(self.stack.blocks) else "sdpa"

    def set_attention(self, attention: str) -> None:
        self.stack.set_attention(attention)

    def keep_mask(self, valid: Sequence[torch.Tensor], present: torch.Tensor, missing: str) -> torch.Tensor:
        """[B, T] bool: the tokens attended ("zero": absent modalities included)."""
        parts = []
        for m, v in enumerate(valid):
            if missing == "zero":
                parts.append(v | ~present[m][:, None])
            else:
                parts.append(v & present[m][:, None])
        return torch.cat(parts, dim=1)

    def forward(self, tokens: Sequence[torch.Tensor], valid: Sequence[torch.Tensor], present: torch.Tensor,
                missing: Optional[str] = None) -> JCTOutput:
        missing = self.missing if missing is None else missing
        if missing not in MISSING_MODES:
            raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
        M = len(self.lengths)
        if len(tokens) != M or len(valid) != M or present.shape[0] != M:
            raise ValueError(f"JointCoTransformer expects {M} modalities, got {len(tokens)} token tensors, "
                             f"{len(valid)} valid masks and present of shape {tuple(present.shape)}")
        xs, sizes = [], []
        for m, x in enumerate(tokens):
            L = x.shape[1]
            if L > self.lengths[m]:
                raise ValueError(f"modality {m} has {L} tokens, more than its length {self.lengths[m]}")
            pos = self.position_embed[self.offsets[m]:self.offsets[m] + L]
            xs.append(x + (pos + self.modality_embed[m]).to(x.dtype))
            sizes.append(L)
        x = torch.cat(xs, dim=1)
        keep = self.keep_mask(valid, present, missing)
        y = self.stack(x, keep, drop=(missing == "drop"))
        outs = list(torch.split(y, sizes, dim=1))
        cls = torch.stack([o[:, 0] for o in outs])
        return JCTOutput(outs, cls, keep)
