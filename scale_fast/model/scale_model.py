"""SCALEModel: modality encoders, projection heads, the JCT, the masked-task heads and the SCALE loss."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..modules import SCALELoss
from ..types import MaskedTask, SCALELossOutput
from .config import MODALITIES, MODALITY_TASK, SCALEConfig
from .encoders import FeatureEncoder, TokenEncoder
from .jct import JointCoTransformer


class MaskedHead(nn.Module):
    """BERT-style prediction head: transform (Linear, GELU, LayerNorm), then a decoder
    Linear(H, K) whose weight and bias go to the fused masked-task loss (never applied here)."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.decoder = nn.Linear(dim, out)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


@dataclass
class SCALEOutput:
    """loss: SCALELossOutput (None without masks or when compute_loss=False);
    embeddings [M, B, D] contrastive embeddings; present [M, B] (as given to the loss);
    task_embeddings [M, B, H] the JCT's CLS outputs; tasks {modality: MaskedTask}."""

    loss: Optional[SCALELossOutput]
    embeddings: torch.Tensor
    present: torch.Tensor
    task_embeddings: Optional[torch.Tensor]
    tasks: Dict[str, MaskedTask]


def unmask(batch, masks: Dict[str, object]):
    """The batch before masking: every masked position gets its target back (the masks hold the
    original token ids and feature rows), so this is exact for any masking scheme."""
    changes = {}
    for m, rows in masks.items():
        name = f"{m}_ids" if m in ("text", "table") else f"{m}_feats"
        values = getattr(batch, name).clone()
        values[rows.sample, rows.position] = rows.target.to(values.dtype)
        changes[name] = values
    return replace(batch, **changes)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically: a temp file in the same folder, fsync, os.replace, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - folders cannot be fsynced on some systems
        pass


def atomic_torch_save(obj, path: str) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class SCALEModel(nn.Module):
    """The SCALE model (M5Product, CVPR 2022) at any size; see SCALEConfig.

    forward(batch, masks=None) -> SCALEOutput: encoders -> CLS -> contrastive
        embeddings; all tokens -> JCT -> masked-task rows; and, with masks, the SCALE
        loss (contrastive weights from the encoders' CLS, task weights from the JCT's
        CLS) in out.loss.total = contrastive term + sum of config.<task>_weight * task
        loss.  `batch` is the masked batch; with contrastive_inputs="clean" the
        contrastive embeddings come from a second encoder pass over the original
        inputs (restored from the masks' targets), so [MASK] tokens and zeroed rows
        never reach the contrastive CLS; "masked" is SCALE's single pass.
    encode(batch) -> (embeddings [M, B, D], present [M, B]): the encoders only.
    """

    def __init__(self, config: Optional[SCALEConfig] = None, *, backend: str = "auto"):
        super().__init__()
        self.config = config = config or SCALEConfig()
        H, c = config.hidden_size, config
        common = dict(mlp_ratio=c.mlp_ratio, dropout=c.dropout, attention=c.attention)
        self.encoders = nn.ModuleDict({
            "text": TokenEncoder(c.text_vocab_size, H, c.text_len, c.encoder_layers, c.encoder_heads,
                                 pad_token_id=c.pad_token_id, cls_mode=c.token_cls, **common),
            "image": FeatureEncoder(c.image_feature_dim, H, c.image_len, c.encoder_layers, c.encoder_heads,
                                    box_dim=c.box_dim, cls_mode=c.cls_mode,
                                    positional="image" in c.positional_rows, **common),
            "table": TokenEncoder(c.table_vocab_size, H, c.table_len, c.encoder_layers, c.encoder_heads,
                                  num_types=2, pad_token_id=c.pad_token_id, cls_mode=c.token_cls, **common),
            "video": FeatureEncoder(c.video_feature_dim, H, c.video_len, c.encoder_layers, c.encoder_heads,
                                    cls_mode=c.cls_mode, positional="video" in c.positional_rows, **common),
            "audio": FeatureEncoder(c.audio_feature_dim, H, c.audio_len, c.encoder_layers, c.encoder_heads,
                                    cls_mode=c.cls_mode, positional="audio" in c.positional_rows, **common),
        })
        act = nn.ReLU() if c.pooler == "relu" else nn.Identity()
        self.projections = nn.ModuleDict({m: nn.Sequential(nn.Linear(H, c.embed_dim), act) for m in MODALITIES})
        self.to_jct = nn.Identity() if H == c.jct_hidden_size else nn.Linear(H, c.jct_hidden_size)
        self.jct = JointCoTransformer(c.jct_hidden_size, c.jct_layers, c.jct_heads,
                                      [c.seq_len(m) for m in MODALITIES], missing=c.missing, **common)
        J = c.jct_hidden_size
        outs = {
            "mlm": c.text_vocab_size, "mem": c.table_vocab_size,
            "mrp": c.num_region_classes if c.mrp_loss == "kl" else c.image_feature_dim,
            "mfp": c.video_feature_dim, "mam": c.audio_feature_dim,
        }
        self.heads = nn.ModuleDict({t: MaskedHead(J, outs[t]) for t in c.tasks})
        self.loss_fn = SCALELoss(MODALITIES, logit_scale=c.logit_scale, learnable_logit_scale=c.learnable_logit_scale,
                                 mode=c.loss_mode, form=c.loss_form, harmonize=c.harmonize,
                                 detach_weights=c.detach_weights, backend=backend)

    # ------------------------------------------------------------------ options
    def set_attention(self, attention: str) -> None:
        """Switch every stack to "sdpa", "xformers" or "auto"."""
        self.config.attention = attention
        for module in self.modules():
            if hasattr(module, "blocks"):
                module.set_attention(attention)

    def set_backend(self, backend: str) -> None:
        """The scale_fast loss backend ("auto", "torch", "triton", "cpp")."""
        self.loss_fn.backend = backend

    # ------------------------------------------------------------------ encoders
    def _inputs(self, m: str, batch, rows: Optional[torch.Tensor]):
        pick = (lambda t: t) if rows is None else (lambda t: None if t is None else t.index_select(0, rows))
        if m in ("text", "table"):
            return (pick(getattr(batch, f"{m}_ids")), pick(batch.valid(m)),
                    pick(batch.table_types) if m == "table" else None)
        return (pick(getattr(batch, f"{m}_feats")), pick(batch.valid(m)),
                pick(batch.image_boxes) if m == "image" else None)

    def encode_modality(self, m: str, batch, missing: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, 1 + L, H], keep [B, 1 + L]) of modality m (position 0 = CLS)."""
        missing = missing or self.config.missing
        i = MODALITIES.index(m)
        present = batch.present[i]
        enc = self.encoders[m]
        if missing == "drop":  # only the samples that hold the modality, only their real tokens
            rows = present.nonzero().squeeze(1)
            x, valid, extra = self._inputs(m, batch, rows)
            B, L = batch.size, valid.shape[1]
            out = x.new_zeros((B, L + 1, enc.norm.normalized_shape[0]), dtype=enc.cls.dtype)
            keep = torch.zeros(B, L + 1, dtype=torch.bool, device=present.device)
            if rows.numel():
                y, k = enc(x, valid, extra, drop=True)
                out = out.to(y.dtype).index_copy(0, rows, y)
                keep = keep.index_copy(0, rows, k)
            return out, keep
        x, valid, extra = self._inputs(m, batch, None)
        if missing == "zero":  # the paper: absent modalities are zero inputs, attended
            valid = valid | ~present[:, None]
        return enc(x, valid, extra, drop=False)

    def _encode_all(self, batch, missing: Optional[str] = None):
        tokens, keeps, cls = [], [], []
        for m in MODALITIES:
            y, keep = self.encode_modality(m, batch, missing)
            tokens.append(y)
            keeps.append(keep)
            cls.append(self.projections[m](y[:, 0]))
        return tokens, keeps, torch.stack(cls)

    def loss_present(self, batch) -> torch.Tensor:
        if self.config.missing == "zero" and self.config.absent_in_loss:
            return torch.ones_like(batch.present)
        return batch.present

    @torch.no_grad()
    def encode(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [M, B, D], present [M, B]): the contrastive embeddings (encoders only, no grad)."""
        _, _, emb = self._encode_all(batch)
        return emb, batch.present

    # ------------------------------------------------------------------ pretraining
    def task_weights(self, device=None) -> torch.Tensor:
        """[M] the masked-task weights in MODALITIES order (config.<task>_weight)."""
        return torch.tensor([self.config.task_weight(MODALITY_TASK[m]) for m in MODALITIES], device=device)

    def loss(self, embeddings, present, tasks: Dict[str, MaskedTask], task_embeddings) -> SCALELossOutput:
        """The SCALE loss (self.loss_fn) with total = contrastive term + sum of the weighted task losses."""
        loss = self.loss_fn(embeddings, present, tasks=tasks, task_embeddings=task_embeddings)
        contrastive = loss.contrastive.sum() / loss.active.triu(1).sum().clamp(min=1).to(loss.contrastive.dtype)
        weights = self.task_weights(loss.masked.device).to(loss.masked.dtype)
        return replace(loss, total=contrastive + (weights * loss.masked).sum())

    def forward(self, batch, masks: Optional[dict] = None, *, compute_loss: bool = True,
                missing: Optional[str] = None) -> SCALEOutput:
        missing = missing or self.config.missing
        tokens, keeps, emb = self._encode_all(batch, missing)
        if masks and self.config.contrastive_inputs == "clean":
            _, _, emb = self._encode_all(unmask(batch, masks), missing)
        present = self.loss_present(batch)
        jct = self.jct([self.to_jct(t) for t in tokens], keeps, batch.present, missing=missing)
        tasks: Dict[str, MaskedTask] = {}
        for m, rows in (masks or {}).items():
            task_name = MODALITY_TASK[m]
            if task_name not in self.heads:
                continue
            head = self.heads[task_name]
            i = MODALITIES.index(m)
            hidden = head.transform(jct.tokens[i][rows.sample, rows.position + 1])
            kind, target = "mse", rows.target
            if task_name in ("mlm", "mem"):
                kind = "ce"
            elif task_name == "mrp" and self.config.mrp_loss == "kl":
                if rows.classes is None:
                    raise ValueError("mrp_loss='kl' needs region class distributions (image 'classes') in the batch")
                kind, target = "kl", rows.classes
            elif task_name == "mfp" and self.config.mfp_loss == "nce":
                kind = "nce"
            elif task_name == "mam" and self.config.mam_loss == "nce":
                kind = "nce"
            if kind != "ce":
                target = target.to(hidden.dtype if hidden.dtype != torch.bfloat16 else torch.float32)
            tasks[m] = MaskedTask(kind, hidden, target, weight=head.decoder.weight, bias=head.decoder.bias,
                                  sample_index=rows.sample)
        loss = None
        if compute_loss and masks is not None:
            loss = self.loss(emb, present, tasks, jct.cls)
        return SCALEOutput(loss, emb, present, jct.cls, tasks)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str) -> None:
        """Write config.json and model.pt into `directory` (atomically)."""
        atomic_write_bytes(os.path.join(directory, "config.json"), self.config.to_json().encode())
        atomic_torch_save(self.state_dict(), os.path.join(directory, "model.pt"))

    @classmethod
    def from_checkpoint(cls, directory: str, map_location="cpu", **kwargs) -> "SCALEModel":
        """Load a model saved by `save` or by `scale-fast pretrain --out DIR` (config.json plus
        model.pt or checkpoint.pt)."""
        with open(os.path.join(directory, "config.json")) as f:
            config = SCALEConfig.from_dict(json.load(f))
        model = cls(config, **kwargs)
        path = os.path.join(directory, "model.pt")
        if os.path.exists(path):
            state = torch.load(path, map_location=map_location, weights_only=True)
        else:
            ckpt = torch.load(os.path.join(directory, "checkpoint.pt"), map_location=map_location, weights_only=False)
            state = ckpt["model"]
        model.load_state_dict(state)
        return model
