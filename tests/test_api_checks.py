"""Python API checks made where the mistake is made: non-finite present rows, modality names as task
keys, MaskedTask checked at construction, embeddings passed as [B, M, D]."""
from __future__ import annotations

import pytest
import torch

import scale_fast as sf
from scale_fast._validate import SKIP_FINITE_ENV

NAMES = ("text", "image", "table", "video", "audio")


def _task(rows=(0, 1, 2), n_classes=7, H=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sf.MaskedTask("ce", torch.randn(len(rows), H, generator=g), torch.randint(0, n_classes, (len(rows),), generator=g),
                         weight=torch.randn(n_classes, H, generator=g), sample_index=torch.tensor(rows))


# ----------------------------------------------------------------- non-finite present rows
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_present_row_not_finite_names_modality_and_sample(bad):
    e = torch.randn(5, 4, 3)
    e[1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"embeddings\[1, 2\] \(modality 1 \('image'\), sample 2\) is present but not finite"):
        sf.scale_loss(e)
    with pytest.raises(ValueError, match=r"modality 1, sample 2"):
        sf.multi_pair_info_nce(e[:3])
    with pytest.raises(ValueError, match=r"modality 0 \('a'\), sample 2"):
        sf.scale_loss(e[1:3], modalities=["a", "b"])


def test_absent_row_may_hold_nan_and_the_check_can_be_skipped(monkeypatch):
    e = torch.randn(3, 4, 5)
    e[2, 1] = float("nan")
    present = torch.ones(3, 4, dtype=torch.bool)
    present[2, 1] = False
    assert torch.isfinite(sf.scale_loss(e, present).total)  # absent: no error, no NaN
    present[2, 1] = True
    monkeypatch.setenv(SKIP_FINITE_ENV, "1")
    assert torch.isnan(sf.scale_loss(e, present).total)  # skipped: the NaN flows through


# ----------------------------------------------------------------- modality names as task keys
def test_task_names_equal_indices_in_scale_loss_and_scale_loss_module():
    e = torch.randn(5, 4, 6)
    by_index = sf.scale_loss(e, tasks={0: _task(), 1: _task(seed=1)}).total
    by_name = sf.scale_loss(e, tasks={"text": _task(), "image": _task(seed=1)}).total
    mixed = sf.scale_loss(e, tasks={"text": _task(), 1: _task(seed=1)}).total
    module = sf.SCALELoss()(e, tasks={"text": _task(), "image": _task(seed=1)}).total
    assert by_index.item() == by_name.item() == mixed.item() == module.item()
    custom = sf.scale_loss(e[:2], tasks={"txt": _task(seed=1)}, modalities=["img", "txt"]).total
    assert custom.item() == sf.scale_loss(e[:2], tasks={1: _task(seed=1)}).total.item()


def test_task_name_errors():
    e = torch.randn(3, 4, 6)
    with pytest.raises(ValueError, match="modality name.*pass modalities="):
        sf.scale_loss(e, tasks={"text": _task()})  # M=3: no default names
    with pytest.raises(ValueError, match="'video' is not one of the modalities"):
        sf.scale_loss(e, tasks={"video": _task()}, modalities=["text", "image", "table"])
    with pytest.raises(ValueError, match="two entries for modality 0 \\('text'\\)"):
        sf.scale_loss(e, tasks={"text": _task(), 0: _task()}, modalities=["text", "image", "table"])
    with pytest.raises(ValueError, match="modalities must be M=3 distinct names"):
        sf.scale_loss(e, modalities=["text", "image"])
    with pytest.raises(TypeError, match="modalities"):
        sf.scale_loss(e, modalities="text")


# ----------------------------------------------------------------- MaskedTask at construction
def test_masked_task_checked_at_construction():
    h, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"MaskedTask\.kind must be one of"):
        sf.MaskedTask("xent", h, y)
    with pytest.raises(TypeError, match=r"MaskedTask\.hidden must be a torch\.Tensor"):
        sf.MaskedTask("ce", [[0.0]], y)
    with pytest.raises(ValueError, match=r"MaskedTask\.weight must have shape \[K, H\] with H = 6"):
        sf.MaskedTask("ce", h, y, weight=torch.randn(7, 5))
    with pytest.raises(ValueError, match=r"MaskedTask\.target must have shape \[N\] = \(3,\)"):
        sf.MaskedTask("ce", h, y[:2])
    with pytest.raises(ValueError, match=r"MaskedTask\.target must have shape \[N, K\] = \(3, 6\)"):
        sf.MaskedTask("mse", h, torch.randn(3, 5))
    with pytest.raises(TypeError, match=r"MaskedTask\.target must be an integer tensor"):
        sf.MaskedTask("ce", h, y.float())
    with pytest.raises(ValueError, match=r"MaskedTask\.sample_index must have one entry per row \(3\)"):
        sf.MaskedTask("ce", h, y, sample_index=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"MaskedTask\.ignore_index must be an int"):
        sf.MaskedTask("ce", h, y, ignore_index=-100.0)
    sf.MaskedTask("ce", h, y, weight=torch.randn(7, 6), sample_index=torch.tensor([0, 1, 2]))  # a good one


# ----------------------------------------------------------------- [B, M, D] embeddings
def test_embeddings_batch_first_are_named_as_such():
    e = torch.randn(5, 3, 8)  # [M=5, B=3, D]
    present = torch.ones(5, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"embeddings must be \[M, B, D\].*look like \[B, M, D\].*transpose\(0, 1\)"):
        sf.scale_loss(e.transpose(0, 1), present)
    with pytest.raises(ValueError, match=r"present must have shape"):  # a plain shape mismatch still blames present
        sf.scale_loss(e, present[:, :2])
