"""The SCALE model: shapes, gradients, drop == masked attention, persistence, retrieval metric."""
from __future__ import annotations

import pytest
import torch

from scale_fast.data import SyntheticProducts, collate, mask_batch
from scale_fast.eval import masked_accuracy, retrieval
from scale_fast.model import MODALITIES, JointCoTransformer, SCALEConfig, SCALEModel, TransformerStack
from scale_fast.model.scale_model import unmask
from scale_fast.model.transformer import resolve_attention, xformers_available

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**kw) -> SCALEConfig:
    base = dict(hidden_size=32, jct_hidden_size=32, embed_dim=16, encoder_heads=2, jct_heads=2)
    base.update(kw)
    return SCALEConfig.tiny(**base)


def make_batch(cfg, n=12, seed=0, present_rates=None):
    data = SyntheticProducts(n, seed=seed, config=cfg, present_rates=present_rates)
    batch = collate([data[i] for i in range(n)], cfg)
    return mask_batch(batch, cfg, torch.Generator().manual_seed(seed))


def test_config_defaults_are_scales():
    c = SCALEConfig()
    assert [c.seq_len(m) for m in ("text", "table", "image", "video", "audio")] == [36, 64, 37, 13, 81]
    assert (c.hidden_size, c.jct_layers, c.jct_heads, c.image_feature_dim, c.video_feature_dim,
            c.audio_feature_dim) == (768, 6, 8, 2048, 1024, 751)
    t = SCALEConfig.tiny()
    assert t.lengths == c.lengths and t.audio_feature_dim == 128
    assert SCALEConfig.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="missing"):
        SCALEConfig(missing="impute")


def test_forward_shapes_and_gradients():
    torch.manual_seed(0)
    cfg = small_config()
    model = SCALEModel(cfg)
    batch, masks = make_batch(cfg)
    out = model(batch, masks)
    B = batch.size
    assert out.embeddings.shape == (5, B, cfg.embed_dim)
    assert out.task_embeddings.shape == (5, B, cfg.jct_hidden_size)
    assert out.present.shape == (5, B) and out.present[0].all()
    assert out.loss.total.ndim == 0 and torch.isfinite(out.loss.total)
    assert out.loss.weights.shape == (B, 5, 5)
    assert set(out.tasks) == set(MODALITIES)
    for m, task in out.tasks.items():  # masked rows only from samples that hold the modality
        assert batch.present[MODALITIES.index(m), task.sample_index].all()
    out.loss.total.backward()
    for name in ("encoders.text.token.weight", "encoders.image.proj.weight", "encoders.table.stack.blocks.0.attn.qkv.weight",
                 "jct.stack.blocks.1.mlp.0.weight", "heads.mlm.decoder.weight", "heads.mrp.decoder.weight",
                 "projections.audio.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    emb, present = model.encode(batch)
    assert emb.shape == (5, B, cfg.embed_dim) and torch.equal(present, batch.present)


@pytest.mark.parametrize("attention", ["sdpa", "auto"])
def test_jct_drop_equals_masked_attention(attention):
    torch.manual_seed(1)
    lengths = [6, 9, 5, 4, 7]
    jct = JointCoTransformer(32, 2, 4, lengths, attention=attention)
    B = 7
    tokens = [torch.randn(B, L, 32, requires_grad=True) for L in lengths]
    valid = []
    for L in lengths:
        n = torch.randint(1, L + 1, (B,))
        valid.append(torch.arange(L)[None] < n[:, None])
    present = torch.rand(5, B) < 0.6
    present[0] = True
    present[:, 3] = False  # a sample with one modality only
    present[0, 3] = True
    outs = {}
    for missing in ("mask", "drop"):
        for t in tokens:
            t.grad = None
        jct.zero_grad()
        o = jct(tokens, valid, present, missing=missing)
        keep = o.keep
        flat = torch.cat(o.tokens, dim=1)[keep]
        w = torch.randn(flat.shape, generator=torch.Generator().manual_seed(5))
        (flat * w).sum().backward()
        outs[missing] = (flat.detach(), o.cls.detach(), [t.grad.clone() for t in tokens],
                         [p.grad.clone() for p in jct.parameters()])
    (a, ca, ga, pa), (b, cb, gb, pb) = outs["mask"], outs["drop"]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for m in range(5):
        torch.testing.assert_close(cb[m][present[m]], ca[m][present[m]], rtol=1e-5, atol=1e-5)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    for x, y in zip(pb, pa):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    # the paper's zero imputation attends the absent tokens: different outputs
    z = jct(tokens, valid, present, missing="zero")
    assert not torch.allclose(torch.cat(z.tokens, 1)[outs_keep(jct, valid, present)], a, atol=1e-4)


def outs_keep(jct, valid, present):
    return jct.keep_mask(valid, present, "drop")


def test_stack_drop_equals_mask_and_zeroes_dropped():
    torch.manual_seed(2)
    stack = TransformerStack(16, 2, 2)
    x = torch.randn(5, 11, 16)
    keep = torch.rand(5, 11) < 0.5
    keep[:, 0] = True
    keep[4] = False  # a sample with no token at all
    a = stack(x, keep, drop=False)
    b = stack(x, keep, drop=True)
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-5, atol=1e-5)
    assert (b[~keep] == 0).all()


def test_model_drop_equals_mask_loss_and_grads():
    torch.manual_seed(3)
    cfg = small_config()
    model = SCALEModel(cfg)
    batch, masks = make_batch(cfg, n=10, seed=3)
    results = {}
    for missing in ("mask", "drop"):
        model.zero_grad()
        out = model(batch, masks, missing=missing)
        out.loss.total.backward()
        results[missing] = (out.loss.total.detach(), out.loss.masked.detach(),
                            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (la, ma, ga), (lb, mb, gb) = results["mask"], results["drop"]
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mb, ma, rtol=1e-5, atol=1e-6)
    for name, g in ga.items():
        torch.testing.assert_close(gb[name], g, rtol=1e-3, atol=1e-6, msg=name)


def test_zero_mode_runs_and_absent_in_loss():
    torch.manual_seed(4)
    cfg = small_config(missing="zero", absent_in_loss=True)
    model = SCALEModel(cfg)
    batch, masks = make_batch(cfg, n=8, seed=4)
    out = model(batch, masks)
    assert out.present.all() and torch.isfinite(out.loss.total)
    out.loss.total.backward()


def test_kl_and_nce_heads():
    torch.manual_seed(5)
    cfg = small_config(mrp_loss="kl", mfp_loss="nce", mam_loss="nce")
    model = SCALEModel(cfg)
    batch, masks = make_batch(cfg, n=12, seed=5, present_rates={"video": 1.0, "audio": 1.0})
    assert batch.image_classes is not None and masks["image"].classes is not None
    out = model(batch, masks)
    assert out.tasks["image"].kind == "kl" and out.tasks["video"].kind == "nce"
    assert torch.isfinite(out.loss.masked).all() and (out.loss.masked > 0).all()
    out.loss.total.backward()
    acc = masked_accuracy(model, batch, masks)
    assert {"mlm_acc", "mem_acc", "mrp_acc", "mfp_acc", "mam_acc"} <= set(acc)
    assert all(0.0 <= v <= 1.0 for v in acc.values())


def test_attention_backends():
    assert resolve_attention("sdpa", torch.device("cpu")) == "sdpa"
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(RuntimeError, match="xformers"):
        resolve_attention("xformers", torch.device("cpu"))
    with pytest.raises(ValueError):
        resolve_attention("flash", torch.device("cpu"))
    if not xformers_available():
        assert resolve_attention("auto", torch.device("cuda")) == "sdpa"


def test_save_and_from_checkpoint(tmp_path):
    torch.manual_seed(6)
    cfg = small_config()
    model = SCALEModel(cfg).eval()
    batch, _ = make_batch(cfg, n=6, seed=6)
    model.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.pt"]  # no temp file left
    loaded = SCALEModel.from_checkpoint(str(tmp_path)).eval()
    assert loaded.config == cfg
    torch.testing.assert_close(loaded.encode(batch)[0], model.encode(batch)[0], rtol=0, atol=0)


def test_retrieval_metric():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 50, 8, generator=g)
    emb = base.expand(3, 50, 8) + 0.01 * torch.randn(3, 50, 8, generator=g)
    present = torch.ones(3, 50, dtype=torch.bool)
    present[2, 10:] = False
    r = retrieval(emb, present, modalities=["a", "b", "c"])
    assert r["R@1"] == 1.0 and len(r["pairs"]) == 6 and r["pairs"]["a->c"]["n"] == 10
    noise = retrieval(torch.randn(2, 400, 8, generator=g), modalities=["a", "b"])
    assert noise["R@1"] < 0.03 and noise["R@10"] < 0.08
    # a pair nobody holds is skipped
    present[1] = False
    r = retrieval(emb, present, modalities=["a", "b", "c"])
    assert set(r["pairs"]) == {"a->c", "c->a"}


def test_unmask_restores_the_original_batch():
    cfg = small_config()
    data = SyntheticProducts(10, seed=7, config=cfg)
    clean = collate([data[i] for i in range(10)], cfg)
    masked, masks = mask_batch(clean, cfg, torch.Generator().manual_seed(7))
    assert not torch.equal(masked.text_ids, clean.text_ids) and not torch.equal(masked.image_feats, clean.image_feats)
    restored = unmask(masked, masks)
    for name in ("text_ids", "table_ids", "image_feats", "video_feats", "audio_feats"):
        assert torch.equal(getattr(restored, name), getattr(clean, name)), name


@pytest.mark.parametrize("inputs", ["clean", "masked"])
def test_contrastive_embeddings_clean_or_masked(inputs):
    torch.manual_seed(8)
    cfg = small_config(contrastive_inputs=inputs)
    model = SCALEModel(cfg)
    data = SyntheticProducts(10, seed=8, config=cfg)
    clean = collate([data[i] for i in range(10)], cfg)
    masked, masks = mask_batch(clean, cfg, torch.Generator().manual_seed(8))
    out = model(masked, masks)
    want = model.encode(clean if inputs == "clean" else masked)[0]
    other = model.encode(masked if inputs == "clean" else clean)[0]
    torch.testing.assert_close(out.embeddings, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.embeddings, other, atol=1e-4)
    out.loss.total.backward()  # both passes reach the encoders
    assert model.encoders["text"].token.weight.grad.abs().sum() > 0


def test_task_weights_reach_the_total():
    torch.manual_seed(9)
    batch, masks = make_batch(small_config(), n=10, seed=9)
    weights = {"mlm_weight": 0.5, "mem_weight": 0.0, "mrp_weight": 2.0, "mfp_weight": 1.0, "mam_weight": 0.25}
    base = SCALEModel(small_config(**{k: 1.0 for k in weights}))  # SCALE's sum (the tiny default weighs 0.1)
    model = SCALEModel(small_config(**weights))
    model.load_state_dict(base.state_dict())
    a, b = base(batch, masks).loss, model(batch, masks).loss
    torch.testing.assert_close(b.masked, a.masked)  # the task losses themselves are unchanged
    contrastive = a.contrastive.sum() / a.active.triu(1).sum()
    torch.testing.assert_close(a.total, contrastive + a.masked.sum())
    w = torch.tensor([weights[f"{t}_weight"] for t in ("mlm", "mrp", "mem", "mfp", "mam")])  # MODALITIES order
    torch.testing.assert_close(b.total, contrastive + (w * a.masked).sum())
    b.total.backward()  # weight 0: the table head learns nothing
    assert model.heads["mem"].decoder.weight.grad.abs().sum() == 0
    assert model.heads["mlm"].decoder.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mlm_weight"):
        small_config(mlm_weight=-1.0)


def test_positional_rows_encoder_shapes_and_masks():
    from scale_fast.model.encoders import FeatureEncoder

    torch.manual_seed(10)
    enc = FeatureEncoder(6, 16, length=5, depth=1, heads=2, positional=True)
    feats = torch.randn(3, 4, 6)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    y, keep = enc(feats, valid)
    assert y.shape == (3, 5, 16) and keep.shape == (3, 5) and keep[:, 0].all()
    assert torch.equal(keep[:, 1:], valid)
    junk = feats.clone()
    junk[~valid] = 100.0  # padding rows never reach the outputs that are kept
    torch.testing.assert_close(enc(junk, valid)[0][keep], y[keep])
    torch.testing.assert_close(enc(feats, valid, drop=True)[0][keep], y[keep], rtol=1e-5, atol=1e-5)
    short, _ = enc(feats[:, :2], valid[:, :2])  # fewer rows than the length: the rest count as zeros
    assert short.shape == (3, 3, 16)
    swapped = feats[:, [1, 0, 2, 3]]  # the CLS sees which row is where; a mean would not
    both = torch.ones(3, 4, dtype=torch.bool)
    assert not torch.allclose(enc(swapped, both)[0][:, 0], enc(feats, both)[0][:, 0], atol=1e-4)
    mean = FeatureEncoder(6, 16, length=5, depth=0, heads=2)
    torch.testing.assert_close(mean(swapped, both)[0][:, 0], mean(feats, both)[0][:, 0])
    cfg = small_config(positional_rows=["image", "audio"])
    model = SCALEModel(cfg)
    assert model.encoders["image"].rows_proj.in_features == (cfg.image_len - 1) * cfg.image_feature_dim
    assert model.encoders["video"].rows_proj is None
    batch, masks = make_batch(cfg, n=8, seed=10)
    out = model(batch, masks)
    out.loss.total.backward()
    assert model.encoders["image"].rows_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="positional_rows"):
        small_config(positional_rows=["text"])
