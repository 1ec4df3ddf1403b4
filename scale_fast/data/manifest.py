"""The on-disk format for real data: a JSONL manifest plus memory-mapped .npy feature arrays.

See docs/data_format.md.  ManifestDataset validates the whole manifest and every
array it references when it is opened (an error names the file, the line and the
field, and no dataset is returned), then reads products lazily: each access seeks to
its manifest line and slices the memory-mapped arrays.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional

import numpy as np

from ..argtypes import UsageError
from ..model.config import SCALEConfig

FEATURE_KEYS = {"image": ("features", "boxes", "classes"), "video": ("features",), "audio": ("features",)}
KNOWN_FIELDS = {"id", "text", "table", "image", "video", "audio"}


class DataFormatError(UsageError, ValueError):
    """A malformed manifest or array: .file, .line (1-based, None for a whole file) and .field
    (on the command line: a usage error, one line and exit status 2)."""

    def __init__(self, file: str, line: Optional[int], field: Optional[str], message: str):
        self.file, self.line, self.field = file, line, field
        where = file if line is None else f"{file}, line {line}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class ManifestDataset:
    """Map-style dataset over DIR/manifest.jsonl (or a .jsonl path) and its .npy arrays.

    config: the model's SCALEConfig (vocabulary sizes, feature sizes, box size,
    region classes), default SCALEConfig().  dataset[i] returns a sample dict in
    scale_fast.data.collate's format; feature rows are copied out of the mmaps.
    """

    def __init__(self, path: str, config: Optional[SCALEConfig] = None):
        self.config = config or SCALEConfig()
        self.path = os.path.join(path, "manifest.jsonl") if os.path.isdir(path) else path
        if not os.path.isfile(self.path):
            raise DataFormatError(self.path, None, None, "no such manifest file")
        self.root = os.path.dirname(os.path.abspath(self.path))
        self._arrays: Dict[str, np.ndarray] = {}
        self._offsets: List[int] = []
        self._fh = None
        self._fh_pid = None
        self._validate()

    # ------------------------------------------------------------------ validation
    def _array(self, name, line: int, field: str) -> np.ndarray:
        if not isinstance(name, str) or not name:
            raise DataFormatError(self.path, line, field, f"must be a file name (string), got {name!r}")
        full = os.path.normpath(os.path.join(self.root, name))
        if full not in self._arrays:
            if not os.path.isfile(full):
                raise DataFormatError(self.path, line, field, f"array file {full} does not exist")
            try:
                arr = np.load(full, mmap_mode="r", allow_pickle=False)
            except Exception as e:  # not a .npy file, truncated, pickled objects...
                raise DataFormatError(self.path, line, field, f"cannot read {full} as a .npy array: {e}") from None
            if arr.ndim != 2:
                raise DataFormatError(self.path, line, field, f"{full} must be a 2-D array [rows, dim], got shape {arr.shape}")
            if arr.dtype.kind != "f":
                raise DataFormatError(self.path, line, field, f"{full} must hold floats, got dtype {arr.dtype}")
            self._arrays[full] = arr
        return self._arrays[full]

    @staticmethod
    def _int(value, line, field, path, low=0):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataFormatError(path, line, field, f"must be an integer >= {low}, got {value!r}")
        return value

    def _ids(self, value, line, field, vocab):
        if not isinstance(value, list):
            raise DataFormatError(self.path, line, field, f"must be a list of token ids, got {type(value).__name__}")
        for k, t in enumerate(value):
            if isinstance(t, bool) or not isinstance(t, int):
                raise DataFormatError(self.path, line, f"{field}[{k}]", f"must be an integer token id, got {t!r}")
            if not 0 <= t < vocab:
                raise DataFormatError(self.path, line, f"{field}[{k}]", f"token id {t} outside [0, {vocab})")
        return value

    def _check_record(self, rec, line: int) -> None:
        cfg, path = self.config, self.path
        if not isinstance(rec, dict):
            raise DataFormatError(path, line, None, f"each line must be a JSON object, got {type(rec).__name__}")
        unknown = set(rec) - KNOWN_FIELDS
        if unknown:
            raise DataFormatError(path, line, sorted(unknown)[0], f"unknown field (known: {sorted(KNOWN_FIELDS)})")
        if "id" in rec and not isinstance(rec["id"], (str, int)):
            raise DataFormatError(path, line, "id", f"must be a string or an integer, got {rec['id']!r}")
        if rec.get("text") is not None:
            self._ids(rec["text"], line, "text", cfg.text_vocab_size)
        if rec.get("table") is not None:
            table = rec["table"]
            if not isinstance(table, list):
                raise DataFormatError(path, line, "table", "must be a list of [property ids, value ids] pairs")
            for k, pair in enumerate(table):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise DataFormatError(path, line, f"table[{k}]", f"must be a pair [property ids, value ids], got {pair!r}")
                self._ids(pair[0], line, f"table[{k}][0]", cfg.table_vocab_size)
                self._ids(pair[1], line, f"table[{k}][1]", cfg.table_vocab_size)
        for m, keys in FEATURE_KEYS.items():
            entry = rec.get(m)
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise DataFormatError(path, line, m, 'must be an object {"features": FILE, "offset": INT, "count": INT, ...}')
            unknown = set(entry) - set(keys) - {"offset", "count"}
            if unknown:
                raise DataFormatError(path, line, f"{m}.{sorted(unknown)[0]}", f"unknown field (known: {sorted(keys) + ['count', 'offset']})")
            if "features" not in entry:
                raise DataFormatError(path, line, f"{m}.features", "is required")
            for key in ("offset", "count"):
                if key not in entry:
                    raise DataFormatError(path, line, f"{m}.{key}", "is required")
            offset = self._int(entry["offset"], line, f"{m}.offset", path)
            count = self._int(entry["count"], line, f"{m}.count", path)
            feats = self._array(entry["features"], line, f"{m}.features")
            if feats.shape[1] != cfg.feature_dim(m):
                raise DataFormatError(path, line, f"{m}.features",
                                      f"rows of {entry['features']} have {feats.shape[1]} features, the config expects {cfg.feature_dim(m)}")
            if offset + count > feats.shape[0]:
                raise DataFormatError(path, line, f"{m}.count",
                                      f"rows [{offset}, {offset + count}) exceed the {feats.shape[0]} rows of {entry['features']}")
            if m == "image":
                for key, width in (("boxes", (4, 5)), ("classes", (cfg.num_region_classes,))):
                    if entry.get(key) is None:
                        continue
                    arr = self._array(entry[key], line, f"image.{key}")
                    if arr.shape[1] not in width:
                        raise DataFormatError(path, line, f"image.{key}",
                                              f"rows of {entry[key]} must have {' or '.join(map(str, width))} columns, got {arr.shape[1]}")
                    if arr.shape[0] < offset + count:
                        raise DataFormatError(path, line, f"image.{key}",
                                              f"rows [{offset}, {offset + count}) exceed the {arr.shape[0]} rows of {entry[key]}")

    def _validate(self) -> None:
        offsets = []
        with open(self.path, "rb") as f:
            pos = 0
            for line_no, raw in enumerate(f, start=1):
                start, pos = pos, pos + len(raw)
                text = raw.strip()
                if not text:
                    continue
                try:
                    rec = json.loads(text)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataFormatError(self.path, line_no, None, f"invalid JSON: {e}") from None
                self._check_record(rec, line_no)
                offsets.append((start, line_no))
        if not offsets:
            raise DataFormatError(self.path, None, None, "the manifest holds no product")
        self._offsets = offsets

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._offsets)

    def _handle(self):
        if self._fh is None or self._fh_pid != os.getpid():  # one handle per process (DataLoader workers)
            self._fh = open(self.path, "rb")
            self._fh_pid = os.getpid()
        return self._fh

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

    def record(self, i: int) -> dict:
        start, _ = self._offsets[i]
        fh = self._handle()
        fh.seek(start)
        return json.loads(fh.readline())

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} products")
        i = int(i) % len(self)
        rec = self.record(i)
        sample = {"id": rec.get("id", self._offsets[i][1])}
        if rec.get("text"):
            sample["text"] = np.asarray(rec["text"], dtype=np.int64)
        if rec.get("table"):
            sample["table"] = [(np.asarray(p, dtype=np.int64), np.asarray(v, dtype=np.int64)) for p, v in rec["table"]]
        for m, keys in FEATURE_KEYS.items():
            entry = rec.get(m)
            if entry is None or entry["count"] == 0:
                continue
            lo, hi = entry["offset"], entry["offset"] + entry["count"]
            out = {}
            for key in keys:
                if entry.get(key) is not None:
                    arr = self._arrays[os.path.normpath(os.path.join(self.root, entry[key]))]
                    out[key] = np.asarray(arr[lo:hi], dtype=np.float32)
            sample[m] = out
        return sample

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_manifest(samples: Iterable[dict], directory: str, *, dtype=np.float16) -> str:
    """Write samples (collate's dict format) as DIR/manifest.jsonl plus one .npy array per
    feature kind (image_features.npy, image_boxes.npy, image_classes.npy,
    video_features.npy, audio_features.npy).  Returns the manifest path."""
    os.makedirs(directory, exist_ok=True)
    chunks: Dict[str, list] = {}
    rows: Dict[str, int] = {}
    lines = []
    for k, s in enumerate(samples):
        rec = {"id": s.get("id", k)}
        if s.get("text") is not None and len(s["text"]):
            rec["text"] = [int(t) for t in s["text"]]
        if s.get("table"):
            rec["table"] = [[[int(t) for t in p], [int(t) for t in v]] for p, v in s["table"]]
        for m, keys in FEATURE_KEYS.items():
            e = s.get(m)
            if e is None:
                continue
            n = len(e["features"])
            entry = {"offset": rows.get(m, 0), "count": n}
            for key in keys:
                if e.get(key) is not None:
                    name = f"{m}_{key}.npy"
                    chunks.setdefault(name, []).append(np.asarray(e[key]))
                    entry[key] = name
            rows[m] = rows.get(m, 0) + n
            rec[m] = entry
        lines.append(json.dumps(rec))
    for name, parts in chunks.items():
        np.save(os.path.join(directory, name), np.concatenate(parts).astype(dtype))
    path = os.path.join(directory, "manifest.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def manifest_feature_dims(path: str) -> Dict[str, int]:
    """{modality: row size} of the feature arrays a manifest references (the first product that has
    the modality decides; ManifestDataset checks every line against the config afterwards)."""
    path = os.path.join(path, "manifest.jsonl") if os.path.isdir(path) else path
    root = os.path.dirname(os.path.abspath(path))
    dims: Dict[str, int] = {}
    try:
        with open(path) as f:
            for raw in f:
                rec = json.loads(raw) if raw.strip() else {}
                for m in FEATURE_KEYS:
                    entry = rec.get(m) if isinstance(rec, dict) else None
                    if m not in dims and isinstance(entry, dict) and isinstance(entry.get("features"), str):
                        arr = np.load(os.path.join(root, entry["features"]), mmap_mode="r")
                        if arr.ndim == 2:
                            dims[m] = int(arr.shape[1])
                if len(dims) == len(FEATURE_KEYS):
                    break
    except (OSError, ValueError):  # a broken manifest: ManifestDataset reports it with its line and field
        pass
    return dims


def split_indices(n: int, val_fraction: float, seed: int = 0):
    """(train, held-out) index lists: a seeded permutation of range(n), the last round(n * val_fraction)
    held out (at least 1, at most n - 1)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"a held-out split needs at least 2 products, got {n}")
    perm = np.random.default_rng([seed, 4242]).permutation(n)
    k = min(n - 1, max(1, int(round(n * val_fraction))))
    return sorted(perm[: n - k].tolist()), sorted(perm[n - k:].tolist())
