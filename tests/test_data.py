"""Synthetic world, batching, masking, and the on-disk format's errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scale_fast.data import DataFormatError, ManifestDataset, SyntheticProducts, collate, mask_batch, mask_features
from scale_fast.data.manifest import write_manifest
from scale_fast.model import MODALITIES, SCALEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = SCALEConfig.tiny()


def same_sample(a, b, atol=0.0):
    assert set(a) == set(b)
    for k in a:
        if k == "id":
            continue
        if k == "text":
            np.testing.assert_array_equal(a[k], b[k])
        elif k == "table":
            assert len(a[k]) == len(b[k])
            for (p1, v1), (p2, v2) in zip(a[k], b[k]):
                np.testing.assert_array_equal(p1, p2)
                np.testing.assert_array_equal(v1, v2)
        else:
            assert set(a[k]) == set(b[k])
            for key in a[k]:
                np.testing.assert_allclose(a[k][key], b[k][key], atol=atol, rtol=atol)


def test_synthetic_is_deterministic_and_one_world():
    a, b = SyntheticProducts(50, seed=0), SyntheticProducts(50, seed=0)
    same_sample(a[7], b[7])
    assert len(a) == 50 and a[-1]["id"] == a[49]["id"]
    held = SyntheticProducts(50, seed=1)
    assert not np.array_equal(held[7]["text"], a[7]["text"]) or held[7].keys() != a[7].keys()
    # one world: the same maps and vocabulary for every seed; another world_seed changes them
    assert np.array_equal(held.world.attr_maps, a.world.attr_maps)
    assert not np.array_equal(SyntheticProducts(5, world_seed=1).world.attr_maps, a.world.attr_maps)
    with pytest.raises(IndexError):
        a[50]


def test_synthetic_missing_rates_are_long_tailed():
    data = SyntheticProducts(300, seed=2)
    batch = collate([data[i] for i in range(300)], CFG)
    rate = batch.present.float().mean(1)
    assert rate[0] == 1.0                                  # text always
    assert 0.75 < rate[1] < 0.95 and 0.7 < rate[2] < 0.9   # image, table: most
    assert rate[3] < 0.4 and rate[4] < 0.3                 # video, audio: a minority


def test_collate_shapes_and_truncation():
    data = SyntheticProducts(6, seed=3)
    samples = [data[i] for i in range(6)]
    samples[0]["text"] = np.arange(4, 100)               # longer than SCALE's 35 text tokens
    samples[1]["video"] = None
    b = collate(samples, CFG)
    assert b.text_ids.shape[1] == CFG.text_len - 1 and b.text_valid[0].all()
    assert not b.present[3, 1] and not b.video_valid[1].any()
    assert b.image_feats.shape[-1] == 2048 and b.image_boxes.shape[-1] == 5
    assert b.audio_feats.shape[-1] == 128
    for i, m in enumerate(MODALITIES):
        assert torch.equal(b.valid(m).any(1), b.present[i])
    # without a config the feature sizes come from the samples
    b2 = collate(samples)
    assert b2.audio_feats.shape[-1] == 128
    with pytest.raises(ValueError, match="audio features have size"):
        collate(samples, SCALEConfig())


def test_masking_follows_scale():
    cfg = SCALEConfig.tiny(mask_prob=0.3)
    data = SyntheticProducts(200, seed=4)
    batch = collate([data[i] for i in range(200)], cfg)
    masked, masks = mask_batch(batch, cfg, torch.Generator().manual_seed(0))
    for i, m in enumerate(MODALITIES):  # rows only from samples holding the modality, on real tokens
        rows = masks[m]
        assert len(rows) > 0
        assert batch.present[i, rows.sample].all() and batch.valid(m)[rows.sample, rows.position].all()
    # MLM: 80% [MASK], ~10% random, ~10% unchanged, targets the original ids
    t = masks["text"]
    assert torch.equal(t.target, batch.text_ids[t.sample, t.position])
    new = masked.text_ids[t.sample, t.position]
    frac_mask = (new == cfg.mask_token_id).float().mean()
    frac_same = (new == t.target).float().mean()
    assert 0.74 < frac_mask < 0.86 and 0.05 < frac_same < 0.16
    assert (masked.text_ids != batch.text_ids).sum() <= len(t)
    # MEM: whole property or whole value spans
    tb = masks["table"]
    span_masked = torch.zeros_like(batch.table_valid)
    span_masked[tb.sample, tb.position] = True
    for b in range(200):
        for s in batch.table_spans[b].unique():
            if s < 0:
                continue
            sel = batch.table_spans[b] == s
            assert span_masked[b][sel].all() or not span_masked[b][sel].any()
    assert (masked.table_ids[tb.sample, tb.position] == cfg.mask_token_id).all()
    # features zeroed at the masked rows, targets the originals
    im = masks["image"]
    assert (masked.image_feats[im.sample, im.position] == 0).all()
    assert torch.equal(im.target, batch.image_feats[im.sample, im.position])
    # deterministic in the generator
    _, again = mask_batch(batch, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(again["text"].position, t.position)


def padded(arrays, L, F):
    """Plain padding of per-sample row arrays (None: absent) to [B, L, F]."""
    out = np.zeros((len(arrays), L, F), np.float32)
    for b, a in enumerate(arrays):
        if a is not None:
            out[b, : len(a), : a.shape[1]] = a
    return out


@pytest.mark.parametrize("n", [1, 5, 40])
def test_collate_reads_each_sample_once_and_pads_exactly(n):
    """Samples are copied into the batch as they are read (a lazy Subset is read once, in order);
    the features equal plain padding to the batch's longest sample, also when rows are cut."""
    from torch.utils.data import Subset

    cfg = SCALEConfig.tiny(image_len=11, audio_len=9, mrp_loss="kl")
    data = SyntheticProducts(n, seed=6, region_classes=True, config=cfg)
    reads = []

    class Counted:
        def __getitem__(self, i):
            reads.append(i)
            return data[i]

    b = collate(Subset(Counted(), list(range(n))), cfg)
    assert reads == list(range(n))
    samples = [data[i] for i in range(n)]
    for s in samples[:2]:  # 4-number boxes fill the first 4 of 5 columns
        if s.get("image"):
            s["image"]["boxes"] = s["image"]["boxes"][:, :4]
    b2 = collate(samples, cfg)
    for m, limit in (("image", 10), ("video", 12), ("audio", 8)):
        rows = [None if s.get(m) is None else s[m]["features"][:limit] for s in samples]
        L = max([1] + [len(r) for r in rows if r is not None])
        assert torch.equal(getattr(b2, f"{m}_feats"), torch.from_numpy(padded(rows, L, cfg.feature_dim(m))))
        if m == "image":
            boxes = [None if s.get(m) is None else s[m]["boxes"][:limit] for s in samples]
            classes = [None if s.get(m) is None else s[m]["classes"][:limit] for s in samples]
            assert torch.equal(b2.image_boxes, torch.from_numpy(padded(boxes, L, 5)))
            assert torch.equal(b2.image_classes, torch.from_numpy(padded(classes, L, cfg.num_region_classes)))
    for name in ("text_ids", "table_ids", "video_feats", "audio_valid", "present"):
        assert torch.equal(getattr(b, name), getattr(b2, name))


def test_collate_without_features_and_to_given_lengths():
    """features=False keeps everything but the feature rows; lengths= pads a part as its batch was."""
    cfg = SCALEConfig.tiny(mrp_loss="kl")
    data = SyntheticProducts(12, seed=8, region_classes=True, config=cfg)
    full = collate([data[i] for i in range(12)], cfg)
    bare = collate([data[i] for i in range(12)], cfg, features=False)
    for f in ("image_feats", "video_feats", "audio_feats", "image_classes"):
        assert getattr(bare, f).shape == getattr(full, f).shape[:2] + (0,)
    for f in ("present", "text_ids", "table_ids", "table_spans", "image_boxes", "image_valid", "audio_valid"):
        assert torch.equal(getattr(bare, f), getattr(full, f))
    lengths = {m: full.valid(m).shape[1] for m in MODALITIES}
    part = collate([data[i] for i in range(5, 8)], cfg, lengths=lengths)
    for f in ("image_feats", "image_boxes", "image_classes", "video_feats", "audio_feats", "text_ids", "table_valid"):
        assert torch.equal(getattr(part, f), getattr(full, f)[5:8])
    with pytest.raises(ValueError, match="lengths"):
        collate([data[i] for i in range(12)], cfg, lengths={**lengths, "image": 1})


def test_feature_masking_modes_agree():
    cfg = SCALEConfig.tiny()
    data = SyntheticProducts(30, seed=7)
    batch = collate([data[i] for i in range(30)], cfg)
    kept = batch.image_feats.clone()
    copy, masks = mask_batch(batch, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(batch.image_feats, kept)  # "copy" leaves the batch as it was
    deferred, masks_d = mask_batch(batch, cfg, torch.Generator().manual_seed(3), features="defer")
    assert torch.equal(deferred.image_feats, kept) and torch.equal(deferred.text_ids, copy.text_ids)
    late = mask_features(deferred, masks_d)
    in_place, masks_i = mask_batch(batch, cfg, torch.Generator().manual_seed(3), features="in_place")
    assert in_place.image_feats.data_ptr() == batch.image_feats.data_ptr()
    for m in ("image", "video", "audio"):
        for other in (late, in_place):
            assert torch.equal(getattr(other, f"{m}_feats"), getattr(copy, f"{m}_feats"))
        for got in (masks_d, masks_i):
            assert torch.equal(got[m].target, masks[m].target) and torch.equal(got[m].position, masks[m].position)
    assert (copy.image_feats != kept).any()
    with pytest.raises(ValueError, match="features"):
        mask_batch(batch, cfg, torch.Generator(), features="lazy")


def test_manifest_roundtrip_is_lazy(tmp_path):
    data = SyntheticProducts(20, seed=5, region_classes=True, config=SCALEConfig.tiny(mrp_loss="kl"))
    samples = [data[i] for i in range(20)]
    write_manifest(samples, str(tmp_path), dtype=np.float32)
    ds = ManifestDataset(str(tmp_path), SCALEConfig.tiny(mrp_loss="kl"))
    assert len(ds) == 20
    for i in (0, 7, 19):
        same_sample(ds[i], samples[i], atol=1e-6)
    assert all(isinstance(a, np.memmap) for a in ds._arrays.values())
    b = collate([ds[i] for i in range(20)], ds.config)
    assert b.image_classes is not None and b.present.sum() == collate(samples, ds.config).present.sum()


def write_bad(tmp_path, lines, arrays=None):
    for name, arr in (arrays or {}).items():
        np.save(tmp_path / name, arr)
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"id": "a", "text": [5, 6, 7]})
IMG = {"img.npy": np.zeros((10, 2048), np.float16), "box.npy": np.zeros((10, 5), np.float32)}


@pytest.mark.parametrize("line, arrays, field, words", [
    ('{"text": [5, 6,', None, None, "invalid JSON"),
    ('[1, 2]', None, None, "JSON object"),
    ('{"text": [5, 600]}', None, "text[1]", "outside [0, 512)"),
    ('{"text": [5, "x"]}', None, "text[1]", "integer token id"),
    ('{"table": [[[5], [6]], [[7]]]}', None, "table[1]", "pair"),
    ('{"colour": 1}', None, "colour", "unknown field"),
    ('{"image": {"features": "nope.npy", "offset": 0, "count": 2}}', None, "image.features", "does not exist"),
    ('{"image": {"features": "img.npy", "offset": 8, "count": 4}}', IMG, "image.count", "exceed the 10 rows"),
    ('{"image": {"features": "img.npy", "offset": -1, "count": 4}}', IMG, "image.offset", "integer >= 0"),
    ('{"image": {"features": "img.npy", "count": 4}}', IMG, "image.offset", "required"),
    ('{"image": {"features": "box.npy", "offset": 0, "count": 4}}', IMG, "image.features", "2048"),
    ('{"image": {"features": "img.npy", "boxes": "img.npy", "offset": 0, "count": 4}}', IMG, "image.boxes", "4 or 5"),
    ('{"video": {"features": "bad.npy", "offset": 0, "count": 1}}', {"bad.npy": np.zeros((3, 4, 5), np.float32)},
     "video.features", "2-D"),
])
def test_manifest_errors_name_file_line_field(tmp_path, line, arrays, field, words):
    path = write_bad(tmp_path, [GOOD, GOOD, line, GOOD], arrays)
    with pytest.raises(DataFormatError) as info:
        ManifestDataset(path, CFG)
    err = info.value
    msg = str(err)
    assert path in msg and "line 3" in msg and words in msg
    assert err.line == 3 and err.file == path
    if field:
        assert f"field '{field}'" in msg and err.field == field


def test_manifest_file_errors(tmp_path):
    with pytest.raises(DataFormatError, match="no such manifest"):
        ManifestDataset(str(tmp_path / "missing.jsonl"), CFG)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    path = write_bad(tmp_path, [GOOD, '{"audio": {"features": "junk.npy", "offset": 0, "count": 1}}'])
    with pytest.raises(DataFormatError, match=r"line 2, field 'audio.features': cannot read"):
        ManifestDataset(path, CFG)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataFormatError, match="no product"):
        ManifestDataset(str(empty), CFG)
