"""Bad inputs raise ValueError/TypeError naming the offending argument (docs/contract.md §5, §7)."""
from __future__ import annotations

import pytest
import torch

import scale_fast as sf
from conftest import BACKENDS, DEVICE

ERR = (ValueError, TypeError)
pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def _emb(M=3, B=4, D=5, dtype=torch.float32):
    return torch.randn(M, B, D, dtype=dtype, device=DEVICE)


def _ce_task(N=3, H=6, K=7, sample_index=(0, 1, 2), target=None, **kw):
    hidden = torch.randn(N, H, device=DEVICE)
    weight = torch.randn(K, H, device=DEVICE)
    target = torch.tensor(target if target is not None else [0, 1, 2][:N], device=DEVICE)
    si = torch.tensor(sample_index, device=DEVICE) if sample_index is not None else None
    return sf.MaskedTask("ce", hidden, target, weight=weight, sample_index=si, **kw)


# ----------------------------------------------------------------- embeddings
def test_embeddings_wrong_ndim(backend):
    with pytest.raises(ERR, match="embeddings"):
        sf.scale_loss(torch.randn(3, 4, device=DEVICE), backend=backend)
    with pytest.raises(ERR, match="embeddings"):
        sf.multi_pair_info_nce(torch.randn(2, 3, 4, 5, device=DEVICE), backend=backend)
    with pytest.raises(ERR, match="embeddings"):
        sf.inter_modality_scores(torch.randn(3, device=DEVICE))


def test_embeddings_fewer_than_two_modalities(backend):
    with pytest.raises(ERR, match="embeddings"):
        sf.scale_loss(_emb(M=1), backend=backend)
    with pytest.raises(ERR, match="embeddings"):
        sf.multi_pair_info_nce(_emb(M=1), backend=backend)


def test_embeddings_empty_dims(backend):
    with pytest.raises(ERR, match="embeddings"):
        sf.multi_pair_info_nce(torch.randn(3, 4, 0, device=DEVICE), backend=backend)


def test_embeddings_not_float(backend):
    with pytest.raises(ERR, match="embeddings"):
        sf.scale_loss(torch.ones(3, 4, 5, dtype=torch.long, device=DEVICE), backend=backend)
    with pytest.raises(ERR, match="embeddings"):
        sf.multi_pair_info_nce(torch.ones(3, 4, 5, dtype=torch.int32, device=DEVICE), backend=backend)


def test_embeddings_list_mismatched_shapes(backend):
    bad = [torch.randn(4, 5, device=DEVICE), torch.randn(4, 6, device=DEVICE)]
    with pytest.raises(ERR, match="embeddings"):
        sf.scale_loss(bad, backend=backend)
    bad = [torch.randn(4, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)]
    with pytest.raises(ERR, match="embeddings"):
        sf.multi_pair_info_nce(bad, backend=backend)


def test_embeddings_not_a_tensor(backend):
    with pytest.raises(ERR, match="embeddings"):
        sf.scale_loss("not a tensor", backend=backend)


# ----------------------------------------------------------------- present
def test_present_wrong_shape(backend):
    with pytest.raises(ERR, match="present"):
        sf.scale_loss(_emb(), torch.ones(3, 5, dtype=torch.bool, device=DEVICE), backend=backend)
    with pytest.raises(ERR, match="present"):
        sf.multi_pair_info_nce(_emb(), torch.ones(4, dtype=torch.bool, device=DEVICE), backend=backend)
    with pytest.raises(ERR, match="present"):
        sf.inter_modality_scores(_emb(), torch.ones(2, 4, dtype=torch.bool, device=DEVICE))


def test_present_not_bool(backend):
    with pytest.raises(ERR, match="present"):
        sf.scale_loss(_emb(), torch.ones(3, 4, device=DEVICE), backend=backend)
    with pytest.raises(ERR, match="present"):
        sf.multi_pair_info_nce(_emb(), torch.ones(3, 4, dtype=torch.long, device=DEVICE), backend=backend)


# ----------------------------------------------------------------- options
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_logit_scale_not_positive(backend, bad):
    with pytest.raises(ERR, match="logit_scale"):
        sf.scale_loss(_emb(), logit_scale=bad, backend=backend)
    with pytest.raises(ERR, match="logit_scale"):
        sf.multi_pair_info_nce(_emb(), logit_scale=torch.tensor(bad, device=DEVICE), backend=backend)


def test_logit_scale_not_scalar(backend):
    with pytest.raises(ERR, match="logit_scale"):
        sf.multi_pair_info_nce(_emb(), logit_scale=torch.ones(2, device=DEVICE), backend=backend)


def test_unknown_mode(backend):
    with pytest.raises(ERR, match="mode"):
        sf.scale_loss(_emb(), mode="global", backend=backend)
    with pytest.raises(ERR, match="mode"):
        sf.inter_modality_scores(_emb(), mode="pairs")


def test_unknown_form(backend):
    with pytest.raises(ERR, match="form"):
        sf.scale_loss(_emb(), form="sigmoid", backend=backend)
    with pytest.raises(ERR, match="form"):
        sf.multi_pair_info_nce(_emb(), form="infonce", backend=backend)


def test_unknown_backend(backend):
    with pytest.raises(ERR, match="backend"):
        sf.scale_loss(_emb(), backend="cuda-magic")
    with pytest.raises(ERR, match="backend"):
        sf.multi_pair_info_nce(_emb(), backend="tpu")
    with pytest.raises(ERR, match="backend"):
        sf.linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), backend="xla")


@pytest.mark.parametrize("shape", [(3,), (2, 3), (3, 2), (5, 3, 3), (4, 3, 2), (4, 3, 3, 1)])
def test_weights_wrong_shape(backend, shape):
    with pytest.raises(ERR, match="weights"):
        sf.multi_pair_info_nce(_emb(M=3, B=4), weights=torch.ones(shape, device=DEVICE), backend=backend)


# ----------------------------------------------------------------- tasks
@pytest.mark.parametrize("m", [3, -4, 7])
def test_task_modality_out_of_range(backend, m):
    with pytest.raises(ERR, match="tasks|modality"):
        sf.scale_loss(_emb(M=3), tasks={m: _ce_task()}, backend=backend)


def test_task_unknown_kind(backend):
    with pytest.raises(ERR, match="kind"):
        task = sf.MaskedTask("focal", torch.randn(3, 6, device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE),
                             sample_index=torch.tensor([0, 1, 2], device=DEVICE))
        sf.scale_loss(_emb(), tasks={0: task}, backend=backend)


@pytest.mark.parametrize("bad", [7, 100, -1, -5])
def test_task_ce_target_out_of_range(backend, bad):
    with pytest.raises(ERR, match="target"):
        sf.scale_loss(_emb(), tasks={0: _ce_task(target=[0, bad, 2])}, backend=backend)


def test_task_ce_target_out_of_range_without_head(backend):
    task = sf.MaskedTask("ce", torch.randn(3, 6, device=DEVICE), torch.tensor([0, 6, 2], device=DEVICE),
                         sample_index=torch.tensor([0, 1, 2], device=DEVICE))
    with pytest.raises(ERR, match="target"):
        sf.scale_loss(_emb(), tasks={0: task}, backend=backend)


@pytest.mark.parametrize("mode", ["sample", "batch"])
@pytest.mark.parametrize("bad", [4, -1, 99])
def test_task_sample_index_out_of_range(backend, bad, mode):
    with pytest.raises(ERR, match="sample_index"):
        sf.scale_loss(_emb(B=4), tasks={1: _ce_task(sample_index=(0, bad, 2))}, mode=mode, backend=backend)


@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_task_row_of_sample_lacking_modality(backend, mode):
    present = torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    present[1, 2] = False
    with pytest.raises(ERR, match="sample_index|present"):
        sf.scale_loss(_emb(), present, tasks={1: _ce_task(sample_index=(0, 1, 2))}, mode=mode, backend=backend)


def test_task_sample_mode_without_sample_index(backend):
    with pytest.raises(ERR, match="sample_index"):
        sf.scale_loss(_emb(), tasks={0: _ce_task(sample_index=None)}, mode="sample", harmonize=True,
                      backend=backend)


def test_task_sample_index_wrong_length(backend):
    with pytest.raises(ERR, match="sample_index"):
        sf.scale_loss(_emb(), tasks={0: _ce_task(sample_index=(0, 1))}, backend=backend)


def test_task_hidden_weight_mismatch(backend):
    with pytest.raises(ERR, match="hidden|weight"):  # at construction (MaskedTask checks its shapes)
        task = sf.MaskedTask("ce", torch.randn(3, 6, device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE),
                             weight=torch.randn(7, 5, device=DEVICE), sample_index=torch.tensor([0, 1, 2], device=DEVICE))
        sf.scale_loss(_emb(), tasks={0: task}, backend=backend)


def test_task_target_rows_mismatch(backend):
    with pytest.raises(ERR, match="target|hidden"):
        sf.scale_loss(_emb(), tasks={0: _ce_task(target=[0, 1])}, backend=backend)


def test_task_bias_wrong_shape(backend):
    with pytest.raises(ERR, match="bias"):
        sf.scale_loss(_emb(), tasks={0: _ce_task(bias=torch.randn(5, device=DEVICE))}, backend=backend)


@pytest.mark.parametrize("kind", ["mse", "nce", "kl"])
def test_task_feature_target_wrong_shape(backend, kind):
    with pytest.raises(ERR, match="target"):  # at construction (MaskedTask checks its shapes)
        task = sf.MaskedTask(kind, torch.randn(3, 6, device=DEVICE), torch.randn(3, 5, device=DEVICE),
                             sample_index=torch.tensor([0, 1, 2], device=DEVICE))
        sf.scale_loss(_emb(), tasks={0: task}, backend=backend)


def test_task_embeddings_wrong_shape(backend):
    with pytest.raises(ERR, match="task_embeddings"):
        sf.scale_loss(_emb(M=3, B=4), tasks={0: _ce_task()}, task_embeddings=_emb(M=3, B=5), backend=backend)


# ----------------------------------------------------------------- linear_cross_entropy
def test_lce_hidden_weight_mismatch(backend):
    with pytest.raises(ERR, match="hidden|weight"):
        sf.linear_cross_entropy(torch.randn(4, 6, device=DEVICE), torch.randn(9, 5, device=DEVICE),
                                torch.tensor([0, 1, 2, 3], device=DEVICE), backend=backend)


def test_lce_hidden_not_2d(backend):
    with pytest.raises(ERR, match="hidden"):
        sf.linear_cross_entropy(torch.randn(4, device=DEVICE), torch.randn(9, 4, device=DEVICE),
                                torch.tensor([0], device=DEVICE), backend=backend)


def test_lce_target_rows_mismatch(backend):
    with pytest.raises(ERR, match="target"):
        sf.linear_cross_entropy(torch.randn(4, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE),
                                torch.tensor([0, 1, 2], device=DEVICE), backend=backend)


def test_lce_soft_target_wrong_classes(backend):
    with pytest.raises(ERR, match="target"):
        sf.linear_cross_entropy(torch.randn(4, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE),
                                torch.rand(4, 8, device=DEVICE), backend=backend)


def test_lce_float_class_ids_named(backend):
    """Class ids given as a float tensor are read as probabilities: the message says ids must be integers."""
    with pytest.raises(ERR, match="class ids must be an integer tensor"):
        sf.linear_cross_entropy(torch.randn(4, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE),
                                torch.zeros(4, device=DEVICE), backend=backend)


@pytest.mark.parametrize("bad", [9, 50, -2])
def test_lce_target_out_of_range(backend, bad):
    with pytest.raises(ERR, match="target"):
        sf.linear_cross_entropy(torch.randn(3, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE),
                                torch.tensor([0, bad, 1], device=DEVICE), backend=backend)


@pytest.mark.parametrize("bad", [9, -2])
def test_lce_target_out_of_range_beside_ignored_rows(backend, bad):
    """A bad id among ignored rows is named; ignored rows themselves may hold any value."""
    h, W = torch.randn(4, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE)
    with pytest.raises(ERR, match="target"):
        sf.linear_cross_entropy(h, W, torch.tensor([-100, bad, 8, -100], device=DEVICE), backend=backend)
    sf.linear_cross_entropy(h, W, torch.tensor([-100, 3, 8, -100], device=DEVICE), backend=backend)
    sf.linear_cross_entropy(h, W, torch.tensor([50, 3, 8, 50], device=DEVICE), ignore_index=50, backend=backend)


def test_lce_bias_wrong_shape(backend):
    with pytest.raises(ERR, match="bias"):
        sf.linear_cross_entropy(torch.randn(3, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE),
                                torch.tensor([0, 1, 2], device=DEVICE), torch.randn(8, device=DEVICE),
                                backend=backend)


def test_lce_scale_wrong_shape(backend):
    with pytest.raises(ERR, match="scale"):
        sf.linear_cross_entropy(torch.randn(3, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE),
                                torch.tensor([0, 1, 2], device=DEVICE), scale=torch.ones(4, device=DEVICE),
                                backend=backend)


@pytest.mark.parametrize("bad", ["avg", "batchmean", None])
def test_lce_unknown_reduction(backend, bad):
    with pytest.raises(ERR, match="reduction"):
        sf.linear_cross_entropy(torch.randn(3, 6, device=DEVICE), torch.randn(9, 6, device=DEVICE),
                                torch.tensor([0, 1, 2], device=DEVICE), reduction=bad, backend=backend)


def test_lce_integer_hidden(backend):
    with pytest.raises(ERR, match="hidden"):
        sf.linear_cross_entropy(torch.ones(3, 6, dtype=torch.long, device=DEVICE), torch.randn(9, 6, device=DEVICE),
                                torch.tensor([0, 1, 2], device=DEVICE), backend=backend)


# ----------------------------------------------------------------- SCALE_FAST_BACKEND
def test_env_backend_unknown(backend, monkeypatch):
    monkeypatch.setenv("SCALE_FAST_BACKEND", "quantum")
    with pytest.raises(ERR, match="SCALE_FAST_BACKEND"):
        sf.multi_pair_info_nce(_emb())


def test_env_backend_override(backend, monkeypatch):
    """SCALE_FAST_BACKEND=<backend> makes backend='auto' run that backend (same values as naming it)."""
    e = _emb(M=2, B=6, D=7)
    want = sf.multi_pair_info_nce(e, backend=backend)
    monkeypatch.setenv("SCALE_FAST_BACKEND", backend)
    got = sf.multi_pair_info_nce(e)
    assert torch.equal(got, want)
