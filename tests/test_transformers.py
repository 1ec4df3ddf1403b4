"""scale_fast.integrations.transformers against the unpatched transformers models.

Tiny models built from configs (no hub). Every patched model is compared with a deep copy of
itself left unpatched: the loss, the outputs and the gradient of every parameter, in float64
and float32, on every backend of the suite (torch, cpp, triton).
"""
from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

from conftest import BACKENDS, LOW_RTOL  # noqa: E402
from scale_fast.integrations import liger  # noqa: E402
from scale_fast.integrations import transformers as sft  # noqa: E402

hf_logging.set_verbosity_error()
HF_BACKENDS = BACKENDS   # torch, cpp, triton (interpreted on CPU: the shapes here are tiny)
DTYPES = [torch.float64, torch.float32]
VOCAB = 101
TOWER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
DECODER = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64, head_dim=8)
CAUSAL = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),               # tied lm_head and embedding
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.37}),     # logits * logit_scale
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 3.0}),  # logits / logits_scaling
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                        "output_router_logits": True, "router_aux_loss_coef": 0.1}),
}


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_same_grads(model, ref, tol):
    """Every parameter: a gradient in both or in neither, and the same one (relative to its norm, or to
    1e-3 of the whole gradient's norm for a parameter whose gradient is 0 but for rounding)."""
    named_ref = dict(ref.named_parameters())
    total = sum(float(r.grad.norm()) ** 2 for r in named_ref.values() if r.grad is not None) ** 0.5
    assert total > 0
    for name, p in model.named_parameters():
        r = named_ref[name]
        assert (p.grad is None) == (r.grad is None), name
        if p.grad is not None:
            err = float((p.grad.double() - r.grad.double()).norm())
            assert err <= tol * max(float(r.grad.norm()), 1e-3 * total), (name, err, float(r.grad.norm()))


def _towers(vocab=50):
    text = dict(TOWER, vocab_size=vocab, max_position_embeddings=16)
    vision = dict(TOWER, image_size=8, patch_size=4)
    return text, vision


def _contrastive(name, dtype):
    torch.manual_seed(0)
    text, vision = _towers()
    if name == "CLIPModel":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    else:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
    model = getattr(transformers, name)(config).to(dtype).train()
    with torch.no_grad():
        if name == "SiglipModel":  # the random init of scale and bias: use SigLIP's own start
            model.logit_scale.fill_(2.3)
            model.logit_bias.fill_(-10.0)
    return model, copy.deepcopy(model)


def _pair_inputs(dtype, B=5):
    g = torch.Generator().manual_seed(1)
    return dict(input_ids=torch.randint(0, 50, (B, 6), generator=g),
                pixel_values=torch.randn(B, 3, 8, 8, generator=g, dtype=dtype))


def _causal(kind, dtype, **overrides):
    config_name, model_name, extra = CAUSAL[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**DECODER, **extra, **overrides})
    model = getattr(transformers, model_name)(config).to(dtype).train()
    return model, copy.deepcopy(model)


def _tokens(B=3, T=11, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100                 # a prompt not trained on
    labels[1, -3:] = -100                # padding
    return ids, labels


# transformers' ForCausalLMLoss upcasts the logits with .float(): for a float64 model its loss is float32
# arithmetic, so the unpatched reference is float32-exact in both dtypes (the float64 check is separate)
CAUSAL_RTOL = 2e-5


@pytest.mark.parametrize("backend", HF_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_contrastive_loss_outputs_and_grads(name, dtype, backend):
    model, ref = _contrastive(name, dtype)
    assert sft.apply(model, backend=backend) is model
    inputs = _pair_inputs(dtype)
    out = model(**inputs, return_loss=True)
    want = ref(**inputs, return_loss=True)
    assert out.loss.dtype == want.loss.dtype
    assert abs(out.loss.item() - want.loss.item()) <= _tol(dtype) * abs(want.loss.item())
    assert out.logits_per_text is None and out.logits_per_image is None
    for key in ("text_embeds", "image_embeds"):
        torch.testing.assert_close(out[key], want[key], rtol=_tol(dtype), atol=0)
    assert out.keys() == want.keys() - {"logits_per_text", "logits_per_image"}
    out.loss.backward()
    want.loss.backward()
    _assert_same_grads(model, ref, 10 * _tol(dtype))
    assert model.logit_scale.grad.abs() > 0


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_contrastive_original_forward_when_not_training_a_loss(name):
    model, ref = _contrastive(name, torch.float64)
    sft.apply(model, backend="torch")
    inputs = _pair_inputs(torch.float64)
    kept = model(**inputs, return_loss=True, keep_logits=True)      # asked: the logits, the original loss
    want = ref(**inputs, return_loss=True)
    torch.testing.assert_close(kept.logits_per_text, want.logits_per_text)
    torch.testing.assert_close(kept.loss, want.loss)
    no_loss = model(**inputs)
    assert no_loss.loss is None and no_loss.logits_per_image is not None
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(**inputs, return_loss=True).loss, ref(**inputs, return_loss=True).loss)
    model.train()
    as_tuple = model(**inputs, return_loss=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 5          # loss, 2 embeds, 2 tower outputs
    torch.testing.assert_close(as_tuple[0], want.loss, rtol=1e-10, atol=0)


# llama and qwen2 on every backend; the others (a tied head: gemma; logit scaling through
# linear_cross_entropy's scale: cohere multiplies, granite divides) on torch
CAUSAL_CASES = [(k, b) for k in ("llama", "qwen2") for b in HF_BACKENDS] + [
    (k, "torch") for k in ("mistral", "gemma", "phi3", "cohere", "granite")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,backend", CAUSAL_CASES)
def test_causal_lm_loss_and_grads(kind, backend, dtype):
    model, ref = _causal(kind, dtype)
    sft.apply(model, backend=backend)
    ids, labels = _tokens()
    out = model(input_ids=ids, labels=labels)
    want = ref(input_ids=ids, labels=labels)
    assert out.logits is None and want.logits is not None
    assert abs(out.loss.item() - want.loss.item()) <= CAUSAL_RTOL * want.loss.item()
    out.loss.backward()
    want.loss.backward()
    _assert_same_grads(model, ref, 10 * CAUSAL_RTOL)
    if dtype == torch.float64:  # float64 all through: the unpatched model's logits, cross entropy in float64
        logits = ref(input_ids=ids).logits
        exact = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, exact, rtol=1e-12, atol=0)


def test_mixture_of_experts_router_loss_kept():
    """Mixtral adds its router loss to the loss_function's (its experts run in float32 only)."""
    model, ref = _causal("mixtral", torch.float32)
    liger.apply_scale_fast_to_mixtral(model=model, backend="torch")
    ids, labels = _tokens()
    out, want = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert out.logits is None and out.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, want.aux_loss)
    assert abs(out.loss.item() - want.loss.item()) <= 2e-5 * want.loss.item()
    out.loss.backward()
    want.loss.backward()
    _assert_same_grads(model, ref, 2e-4)


@pytest.mark.parametrize("kind", ["llama", "CLIPModel"])
def test_bfloat16(kind):
    """The loss in transformers' dtype; close to the original, which rounds its logits to bfloat16."""
    model, ref = _contrastive(kind, torch.bfloat16) if kind == "CLIPModel" else _causal(kind, torch.bfloat16)
    sft.apply(model, backend="torch")
    if kind == "CLIPModel":
        inputs = dict(_pair_inputs(torch.bfloat16), return_loss=True)
    else:
        ids, labels = _tokens()
        inputs = dict(input_ids=ids, labels=labels)
    out, want = model(**inputs), ref(**inputs)
    assert out.loss.dtype == want.loss.dtype
    assert abs(out.loss.item() - want.loss.item()) <= LOW_RTOL * want.loss.item()
    out.loss.backward()
    want.loss.backward()
    _assert_same_grads(model, ref, 3 * LOW_RTOL)


@pytest.mark.parametrize("backend", HF_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_causal_lm_gradient_accumulation(kind, dtype, backend):
    """Two micro-batches, each loss summed and divided by the tokens of both (num_items_in_batch)."""
    model, ref = _causal(kind, dtype)
    sft.apply(model, backend=backend)
    batches = [_tokens(B=2, T=9, seed=s) for s in (3, 4)]
    n_items = sum(int((labels[:, 1:] != -100).sum()) for _, labels in batches)
    for i, (ids, labels) in enumerate(batches):
        items = torch.tensor(n_items) if i else n_items      # a tensor (Trainer) or an int (custom loops)
        out = model(input_ids=ids, labels=labels, num_items_in_batch=items)
        want = ref(input_ids=ids, labels=labels, num_items_in_batch=items)
        assert abs(out.loss.item() - want.loss.item()) <= CAUSAL_RTOL * want.loss.item()
        out.loss.backward()
        want.loss.backward()
    _assert_same_grads(model, ref, 10 * CAUSAL_RTOL)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_causal_lm_logits_to_keep_and_shift_labels(kind):
    model, ref = _causal(kind, torch.float32)
    sft.apply(model, backend="torch")
    ids, labels = _tokens()
    out = model(input_ids=ids, labels=labels[:, -5:], logits_to_keep=5)
    want = ref(input_ids=ids, labels=labels[:, -5:], logits_to_keep=5)
    torch.testing.assert_close(out.loss, want.loss, rtol=2e-5, atol=0)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    out = model(input_ids=ids, labels=labels, shift_labels=shifted)
    want = ref(input_ids=ids, labels=labels, shift_labels=shifted)
    torch.testing.assert_close(out.loss, want.loss, rtol=2e-5, atol=0)
    with pytest.raises(ValueError, match="labels hold 33 positions but the model's logits 15"):
        model(input_ids=ids, labels=labels, logits_to_keep=5)


def test_causal_lm_original_forward_outside_training_with_labels():
    model, ref = _causal("llama", torch.float64)
    sft.apply(model, backend="torch")
    ids, labels = _tokens()
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    kept = model(input_ids=ids, labels=labels, keep_logits=True)
    want = ref(input_ids=ids, labels=labels)
    torch.testing.assert_close(kept.logits, want.logits)
    torch.testing.assert_close(kept.loss, want.loss)
    model.eval()
    ref.eval()
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref(input_ids=ids, labels=labels).loss)
    assert out.logits is not None
    model.train()
    as_tuple = model(ids, None, None, None, None, labels, return_dict=False)   # labels positionally
    want = ref(ids, None, None, None, None, labels, return_dict=False)
    assert len(as_tuple) == len(want) - 1                                      # no logits
    assert abs(as_tuple[0].item() - want[0].item()) <= 2e-5 * want[0].item()


def test_apply_is_per_instance_and_revert_restores():
    model, ref = _causal("llama", torch.float32)
    other = copy.deepcopy(ref)
    sft.apply(model, backend="torch")
    # transformers' Trainer picks the dataset columns (and num_items_in_batch) from this signature
    assert inspect.signature(model.forward) == inspect.signature(ref.forward)
    ids, labels = _tokens()
    assert other(input_ids=ids, labels=labels).logits is not None            # another instance untouched
    assert model(input_ids=ids, labels=labels).logits is None
    copied = copy.deepcopy(model)                                             # the patch travels with the copy
    assert copied(input_ids=ids, labels=labels).logits is None
    sft.apply(model, backend="cpp" if "cpp" in HF_BACKENDS else "torch")     # again: a new backend, not stacked
    assert model._scale_fast.backend in HF_BACKENDS
    sft.revert(model)
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert "_loss_function" not in model.__dict__
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref(input_ids=ids, labels=labels).logits)
    with pytest.raises(ValueError, match="not patched by scale_fast"):
        sft.revert(model)
    with pytest.raises(RuntimeError, match="inside"), sft.patched(model, backend="torch"):
        assert model(input_ids=ids, labels=labels).logits is None
        raise RuntimeError("inside")
    assert model(input_ids=ids, labels=labels).logits is not None              # reverted on the way out
    clip, clip_ref = _contrastive("CLIPModel", torch.float32)
    assert inspect.signature(sft.apply(clip).forward) == inspect.signature(clip_ref.forward)
    sft.revert(clip)
    assert "forward" not in clip.__dict__


def test_an_instance_forward_of_the_head_is_kept_and_restored():
    """A forward set on the lm_head instance before apply (as accelerate's device hooks do) still runs
    outside the patched training loss and is put back by revert."""
    model, ref = _causal("llama", torch.float32)
    calls = []
    own = model.lm_head.forward

    def hooked(hidden):
        calls.append(hidden.shape)
        return own(hidden)

    model.lm_head.forward = hooked
    sft.apply(model, backend="torch")
    ids, labels = _tokens()
    assert model(input_ids=ids, labels=labels).logits is None and not calls   # the loss: no head call
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)
    assert len(calls) == 1                                                    # eval: the hooked head ran
    sft.revert(model)
    assert model.lm_head.__dict__["forward"] is hooked


class _TanhLlama(transformers.LlamaForCausalLM):
    """A model that transforms its logits before the loss in a way the config does not say."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = torch.tanh(self.lm_head(self.model(input_ids=input_ids).last_hidden_state))
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def test_unsupported_models_raise():
    gemma2, _ = _causal("gemma", torch.float32)
    config = transformers.Gemma2Config(**DECODER)
    assert config.final_logit_softcapping
    with pytest.raises(TypeError, match="final-logit softcapping"):
        sft.apply(transformers.Gemma2ForCausalLM(config))
    with pytest.raises(TypeError, match="z-loss"):
        sft.apply(transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER, z_loss_coefficient=1e-4)))
    text, _ = _towers()
    with pytest.raises(TypeError, match="no loss for CLIPTextModelWithProjection"):
        sft.apply(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text)))
    with pytest.raises(TypeError, match="model must be a transformers model"):
        sft.apply("llama")
    with pytest.raises(ValueError, match="backend"):
        sft.apply(gemma2, backend="no-such-backend")
    custom, _ = _causal("llama", torch.float32)
    custom.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(TypeError, match="not transformers' ForCausalLMLoss"):
        sft.apply(custom)
    tanh = _TanhLlama(transformers.LlamaConfig(**DECODER)).train()
    sft.apply(tanh, backend="torch")
    ids, labels = _tokens()
    with pytest.raises(TypeError, match="applies torch.tanh to its logits"):
        tanh(input_ids=ids, labels=labels)
    assert tanh(input_ids=ids).logits.shape == (3, 11, VOCAB)                  # no labels: untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_names(dtype):
    model, ref = _causal("qwen2", dtype)
    assert liger.apply_scale_fast_to_qwen2(model=model, backend="torch") is model
    ids, labels = _tokens()
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss,
                               rtol=2e-5, atol=0, check_dtype=False)   # float64 models: transformers' is float32
    with pytest.raises(TypeError, match="model_type 'qwen2'"):
        liger.apply_scale_fast_to_llama(model=copy.deepcopy(ref))
    with pytest.raises(TypeError, match="pass model="):
        liger.apply_scale_fast_to_llama()
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(13, 16, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(VOCAB, generator=g, dtype=dtype, requires_grad=True)
    target = torch.randint(0, VOCAB, (13,), generator=g)
    target[2] = -100
    for reduction in ("mean", "sum", "none"):
        loss = liger.FusedLinearCrossEntropyLoss(reduction=reduction)(weight, hidden, target, bias)
        want = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, target, reduction=reduction)
        if reduction == "none":
            want = want.masked_fill(target == -100, 0)
        torch.testing.assert_close(loss, want, rtol=_tol(dtype), atol=1e-6)
        grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
        for got, exp in zip(grads, torch.autograd.grad(want.sum(), (hidden, weight, bias))):
            assert _rel(got, exp) <= 10 * _tol(dtype)
    for kwargs, why in (({"label_smoothing": 0.1}, "label smoothing"), ({"lse_square_scale": 1e-4}, "z-loss"),
                        ({"softcap": 30.0}, "softcapping"), ({"ce_weight": torch.ones(VOCAB)}, "class weights")):
        with pytest.raises(TypeError, match=why):
            liger.FusedLinearCrossEntropyLoss(**kwargs)
