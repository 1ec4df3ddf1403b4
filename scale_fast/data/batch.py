"""Batches: `collate(samples)` pads a list of products into a Batch; `mask_batch` adds the masked tasks.

A sample (what SyntheticProducts and ManifestDataset return) is a dict:

    {"id": str | int,
     "text":  int64 [Lt] token ids (no CLS: the model prepends its own) or None,
     "table": list of (property ids int64 [p], value ids int64 [v]) pairs, or None,
     "image": {"features": float [R, 2048], "boxes": float [R, 4 or 5],
               "classes": float [R, K] (optional, region class distributions)} or None,
     "video": {"features": float [F, 1024]} or None,
     "audio": {"features": float [A, 751]} or None}

None (or a missing key, or zero tokens/rows) means the product lacks that modality.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..model.config import FEATURE_MODALITIES, MODALITIES, MODALITY_TASK, SCALEConfig

TABLE_PROPERTY, TABLE_VALUE = 0, 1


@dataclass
class Batch:
    """A padded batch.  B samples; every *_valid is True on real tokens/rows.

    present [M, B] bool in MODALITIES order (text, image, table, video, audio).
    text_ids [B, Lt]; table_ids, table_types (0 property, 1 value), table_spans
    (index of the property or value span inside the sample, -1 on padding) [B, Lb];
    image_feats [B, R, F_img], image_boxes [B, R, box_dim], image_classes
    [B, R, K] or None; video_feats [B, Fv, F_vid]; audio_feats [B, Fa, F_aud].
    Absent modalities hold zeros (pad ids) and all-False valid rows.
    """

    present: torch.Tensor
    text_ids: torch.Tensor
    text_valid: torch.Tensor
    table_ids: torch.Tensor
    table_types: torch.Tensor
    table_spans: torch.Tensor
    table_valid: torch.Tensor
    image_feats: torch.Tensor
    image_boxes: torch.Tensor
    image_valid: torch.Tensor
    video_feats: torch.Tensor
    video_valid: torch.Tensor
    audio_feats: torch.Tensor
    audio_valid: torch.Tensor
    image_classes: Optional[torch.Tensor] = None
    ids: Optional[list] = None

    @property
    def size(self) -> int:
        return self.present.shape[1]

    def valid(self, modality: str) -> torch.Tensor:
        return getattr(self, f"{modality}_valid")

    def to(self, device, non_blocking: bool = False) -> "Batch":
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                changes[f.name] = v.to(device, non_blocking=non_blocking)
        return replace(self, **changes)

    def select(self, rows: torch.Tensor) -> "Batch":
        """The sub-batch of the given sample indices."""
        changes = {"present": self.present[:, rows]}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "present" and isinstance(v, torch.Tensor):
                changes[f.name] = v[rows]
        if self.ids is not None:
            changes["ids"] = [self.ids[int(i)] for i in rows]
        return replace(self, **changes)

    def num_tokens(self) -> Dict[str, int]:
        return {m: int(self.valid(m).sum()) for m in MODALITIES}


def _max_lengths(config: Optional[SCALEConfig]) -> Dict[str, int]:
    config = config or SCALEConfig()
    return {m: config.seq_len(m) - 1 for m in MODALITIES}  # minus the CLS position


def _rows(sample: dict, key: str):
    value = sample.get(key)
    if value is None:
        return None
    if key in FEATURE_MODALITIES:
        feats = value.get("features") if isinstance(value, dict) else value
        if feats is None or len(feats) == 0:
            return None
        return value
    if len(value) == 0:
        return None
    return value


class _Rows:
    """The [B, L, F] float32 buffer of one feature modality, filled one sample at a time.

    Rows are appended packed (sample after sample) into one zero-filled allocation of B x max_len
    rows, of which the pages never written stay out of memory; `padded` spreads them in place to
    [B, L, F] with L the batch's longest (what padding to the longest sample gives) and returns
    the rest of the allocation.  So a batch's features exist once, never also as a list of samples.
    """

    def __init__(self, B: int, max_len: int, dim: Optional[int], keep: bool = True):
        self.B, self.max_len, self.dim, self.keep = B, max_len, dim, keep
        self.flat: Optional[np.ndarray] = None
        self.spans: List[tuple] = []          # (sample, first packed row, rows)
        self.used = 0
        self.seen = False                     # some sample had rows (kept or not)

    def add(self, b: int, rows: Optional[np.ndarray], n: int) -> None:
        """Sample b's n rows: `rows` fill their first columns (None: zeros)."""
        if rows is not None:
            self.seen = True
            if self.dim is None:
                self.dim = int(rows.shape[1])
            if not self.keep:
                return
            if self.flat is None:
                self.flat = np.zeros(self.B * self.max_len * self.dim, dtype=np.float32)
            packed = self.flat[: (self.used + n) * self.dim].reshape(-1, self.dim)
            packed[self.used: self.used + n, : rows.shape[1]] = rows
        self.spans.append((b, self.used, n))
        self.used += n

    def padded(self, L: int, default_dim: int) -> np.ndarray:
        F = self.dim if self.dim is not None else default_dim
        if not self.keep:
            return np.zeros((self.B, L, 0), dtype=np.float32)
        if self.flat is None:
            return np.zeros((self.B, L, F), dtype=np.float32)
        flat, self.flat = self.flat, None
        out = flat[: self.B * L * F].reshape(self.B, L, F)
        filled = {b: (start, n) for b, start, n in self.spans}
        rows = None
        # last sample first: its slot [b*L, b*L + L) lies at or after every row still unread
        for b in range(self.B - 1, -1, -1):
            start, n = filled.get(b, (0, 0))
            if n:
                rows = flat[start * F: (start + n) * F].reshape(n, F)
                out[b, :n] = rows.copy() if start + n > b * L else rows
            out[b, n:] = 0.0
        del out, rows
        flat.resize(self.B * L * F, refcheck=False)  # hands the unused tail back to the allocator
        return flat.reshape(self.B, L, F)


def collate(samples: Sequence[dict], config: Optional[SCALEConfig] = None, *,
            dtype: torch.dtype = torch.float32, lengths: Optional[Dict[str, int]] = None,
            features: bool = True) -> Batch:
    """Pad a list of samples into a Batch (longer sequences are truncated to the config's lengths).

    Each modality is padded to the longest sample of the batch (at least 1).
    config: supplies the lengths, pad id and feature sizes; without it the lengths and pad id
    are SCALEConfig()'s and the feature sizes are read from the samples.
    `samples` is read once, in order: a lazy sequence (e.g. torch.utils.data.Subset of a dataset)
    has one sample at a time in memory, copied into the batch's buffers as it is read.
    lengths: {modality: L} pads to exactly these instead (each at least the batch's longest), e.g. a
    micro-batch padded as the whole batch was.  features=False: the feature rows (image, video and
    audio features, region classes) are left out, as [B, L, 0] tensors; everything else is as usual.
    """
    cfg = config or SCALEConfig()
    maxlen = _max_lengths(cfg)
    B = len(samples)
    if B == 0:
        raise ValueError("collate needs at least one sample")
    present = torch.zeros(len(MODALITIES), B, dtype=torch.bool)
    feature_index = {"image": 1, "video": 3, "audio": 4}
    dims: Dict[str, set] = {m: set() for m in FEATURE_MODALITIES}
    feats = {m: _Rows(B, maxlen[m], cfg.feature_dim(m) if config is not None else None, keep=features)
             for m in FEATURE_MODALITIES}
    boxes = _Rows(B, maxlen["image"], cfg.box_dim if config is not None else None)
    classes = _Rows(B, maxlen["image"], cfg.num_region_classes if config is not None else None, keep=features)
    rows_of = {m: [0] * B for m in FEATURE_MODALITIES}

    def padded_length(m: str, longest: int) -> int:
        if lengths is None:
            return max(1, longest)
        if lengths[m] < longest:
            raise ValueError(f"collate: lengths[{m!r}] = {lengths[m]} is below the batch's longest {m} ({longest})")
        return lengths[m]
    texts, flat, ids = [], [], []

    for b, s in enumerate(samples):
        ids.append(s.get("id"))
        t = _rows(s, "text")
        texts.append(None if t is None else np.asarray(t, dtype=np.int64)[: maxlen["text"]])
        # table: property and value spans flattened
        pairs = _rows(s, "table")
        if pairs is None:
            flat.append(None)
        else:
            tids, types, spans = [], [], []
            for k, (prop, val) in enumerate(pairs):
                for kind, part in ((TABLE_PROPERTY, prop), (TABLE_VALUE, val)):
                    part = np.asarray(part, dtype=np.int64).reshape(-1)
                    tids.append(part)
                    types.append(np.full(len(part), kind, dtype=np.int64))
                    spans.append(np.full(len(part), 2 * k + kind, dtype=np.int64))
            tids = np.concatenate(tids)[: maxlen["table"]]
            flat.append((tids, np.concatenate(types)[: len(tids)], np.concatenate(spans)[: len(tids)]))
        for m in FEATURE_MODALITIES:
            e = _rows(s, m)
            if e is None:
                continue
            arr = e["features"] if isinstance(e, dict) else e
            dim = int(np.shape(arr)[1])
            dims[m].add(dim)
            if feats[m].dim is not None and dim != feats[m].dim:
                continue  # reported below, with every size seen
            arr = arr[: maxlen[m]]
            n = len(arr)
            feats[m].add(b, arr, n)
            rows_of[m][b] = n
            present[feature_index[m], b] = True
            if m == "image":
                bx = e.get("boxes") if isinstance(e, dict) else None
                if bx is not None:  # 4-number boxes fill the first 4 of 5 columns (area 0)
                    bx = np.asarray(bx[:n])
                    bx = bx[:, : boxes.dim] if boxes.dim is not None else bx
                boxes.add(b, bx, n)
                cl = e.get("classes") if isinstance(e, dict) else None
                classes.add(b, None if cl is None else cl[:n], n)

    for m in FEATURE_MODALITIES:
        if config is None and len(dims[m]) > 1:
            raise ValueError(f"collate: {m} features of different sizes {sorted(dims[m])} in one batch")
        if config is not None and dims[m] - {cfg.feature_dim(m)}:
            raise ValueError(f"collate: {m} features have size {sorted(dims[m])}, the config expects {cfg.feature_dim(m)}")

    # text
    Lt = padded_length("text", max([0] + [len(t) for t in texts if t is not None]))
    text_ids = np.full((B, Lt), cfg.pad_token_id, dtype=np.int64)
    text_valid = np.zeros((B, Lt), dtype=bool)
    for b, t in enumerate(texts):
        if t is not None:
            text_ids[b, : len(t)] = t
            text_valid[b, : len(t)] = True
            present[0, b] = True

    # table
    Lb = padded_length("table", max([0] + [len(f[0]) for f in flat if f is not None]))
    table_ids = np.full((B, Lb), cfg.pad_token_id, dtype=np.int64)
    table_types = np.zeros((B, Lb), dtype=np.int64)
    table_spans = np.full((B, Lb), -1, dtype=np.int64)
    table_valid = np.zeros((B, Lb), dtype=bool)
    for b, f in enumerate(flat):
        if f is not None and len(f[0]):
            n = len(f[0])
            table_ids[b, :n], table_types[b, :n], table_spans[b, :n] = f
            table_valid[b, :n] = True
            present[2, b] = True

    out = dict(text_ids=text_ids, text_valid=text_valid, table_ids=table_ids, table_types=table_types,
               table_spans=table_spans, table_valid=table_valid)

    # features
    image_classes = None
    for m in FEATURE_MODALITIES:
        L = padded_length(m, max(rows_of[m]))
        valid = np.zeros((B, L), dtype=bool)
        for b, n in enumerate(rows_of[m]):
            valid[b, :n] = True
        out[f"{m}_feats"] = feats[m].padded(L, cfg.feature_dim(m))
        out[f"{m}_valid"] = valid
        if m == "image":
            out["image_boxes"] = boxes.padded(L, cfg.box_dim)
            if classes.seen:
                image_classes = classes.padded(L, cfg.num_region_classes)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
    for k in ("image_feats", "image_boxes", "video_feats", "audio_feats"):
        tensors[k] = tensors[k].to(dtype)
    return Batch(present=present, image_classes=None if image_classes is None else torch.from_numpy(image_classes).to(dtype),
                 ids=ids, **tensors)


# ---------------------------------------------------------------------------------------------
# masking


@dataclass
class MaskedRows:
    """The masked positions of one modality: sample [N], position [N] (in the modality's
    sequence, without the CLS), target ([N] ids, or [N, F] features), and for MRP
    optionally classes [N, K]."""

    sample: torch.Tensor
    position: torch.Tensor
    target: torch.Tensor
    classes: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.sample.shape[0])

    def to(self, device) -> "MaskedRows":
        return MaskedRows(self.sample.to(device), self.position.to(device), self.target.to(device),
                          None if self.classes is None else self.classes.to(device))


def _bernoulli(shape, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) < p


FEATURE_MASKING = ("copy", "in_place", "defer")


def mask_batch(batch: Batch, config: SCALEConfig, generator: torch.Generator, *, features: str = "copy") -> tuple:
    """SCALE's masking of a CPU batch -> (masked Batch, {modality: MaskedRows}).

    MLM (text): each real token with probability mask_prob; of those 80% -> [MASK],
    10% -> a random non-special id, 10% kept (BERT).  MEM (table): each
    property-value pair with probability mask_prob; then its property or its value
    (even odds) has all its tokens replaced by [MASK].  MRP / MFP / MAM: each real
    region / frame with probability mask_prob is zeroed; targets are the original
    features (and the region class distributions when the batch has them).
    Only samples that hold a modality get rows for it.  Tasks not in config.tasks
    are skipped.  Deterministic given the generator's state.

    features: how the zeroed feature rows are made (the features are most of a batch's bytes):
    "copy" (new tensors; `batch` untouched), "in_place" (in `batch`'s own buffers), "defer"
    (left as they are: `mask_features` zeroes them later, e.g. one micro-batch at a time).
    The masks and token ids are the same in every case.
    """
    if features not in FEATURE_MASKING:
        raise ValueError(f"features must be one of {FEATURE_MASKING}, got {features!r}")
    p = config.mask_prob
    masks: Dict[str, MaskedRows] = {}
    changes = {}
    tasks = set(config.tasks)

    if "mlm" in tasks:
        ids = batch.text_ids.clone()
        chosen = _bernoulli(ids.shape, p, generator) & batch.text_valid & batch.present[0][:, None]
        action = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(config.num_special_tokens, config.text_vocab_size, ids.shape, generator=generator)
        b, pos = chosen.nonzero(as_tuple=True)
        masks["text"] = MaskedRows(b, pos, batch.text_ids[b, pos].clone())
        ids = torch.where(chosen & (action < 0.8), torch.full_like(ids, config.mask_token_id), ids)
        ids = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, ids)
        changes["text_ids"] = ids

    if "mem" in tasks:
        spans = batch.table_spans
        n_pairs = int(spans.max()) // 2 + 1 if spans.numel() and int(spans.max()) >= 0 else 0
        B = spans.shape[0]
        pick_pair = _bernoulli((B, max(n_pairs, 1)), p, generator)
        pick_value = torch.rand((B, max(n_pairs, 1)), generator=generator) < 0.5
        valid = batch.table_valid & batch.present[2][:, None]
        pair = spans.clamp(min=0) // 2
        kind = spans.clamp(min=0) % 2
        chosen = valid & pick_pair.gather(1, pair) & (pick_value.gather(1, pair).long() == kind)
        b, pos = chosen.nonzero(as_tuple=True)
        masks["table"] = MaskedRows(b, pos, batch.table_ids[b, pos].clone())
        changes["table_ids"] = torch.where(chosen, torch.full_like(batch.table_ids, config.mask_token_id),
                                           batch.table_ids)

    for m_index, m in ((1, "image"), (3, "video"), (4, "audio")):
        if MODALITY_TASK[m] not in tasks:
            continue
        feats = getattr(batch, f"{m}_feats")
        valid = batch.valid(m) & batch.present[m_index][:, None]
        chosen = _bernoulli(valid.shape, p, generator) & valid
        b, pos = chosen.nonzero(as_tuple=True)
        classes = None
        if m == "image" and batch.image_classes is not None:
            classes = batch.image_classes[b, pos].clone()
        masks[m] = MaskedRows(b, pos, feats[b, pos], classes)  # advanced indexing: already a copy
        if features == "copy":
            changes[f"{m}_feats"] = feats.masked_fill(chosen[..., None], 0.0)
        elif features == "in_place":
            feats.masked_fill_(chosen[..., None], 0.0)

    return replace(batch, **changes), masks


def mask_features(batch: Batch, masks: Dict[str, MaskedRows]) -> Batch:
    """The batch with its masked feature rows zeroed (new tensors for the masked modalities only):
    what `mask_batch(..., features="copy")` gives, from one made with features="defer" or any
    slice of one (e.g. `scale_fast.train.grad_cache.batch_rows`)."""
    changes = {}
    for m, rows in masks.items():
        if m in FEATURE_MODALITIES:
            feats = getattr(batch, f"{m}_feats").clone()
            feats[rows.sample, rows.position] = 0.0
            changes[f"{m}_feats"] = feats
    return replace(batch, **changes)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The masking generator of one training step (a function of (seed, step) and, under torchrun, the rank)."""
    key = [seed, step, 77] + ([rank] if rank else [])
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))

