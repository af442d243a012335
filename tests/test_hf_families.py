"""Fused coverage beyond the Llama layout, and PEFT, against the models' own losses and gradients.

MoE models whose forward adds a router auxiliary loss, logit-scaled heads (Cohere multiplies the
logits by ``logit_scale``, Granite divides them by ``logits_scaling``) and the text heads of
multimodal models (with images in the batch), each in training (fused: no logits) and in
evaluation (the model's logits; and ``eval_logits=False``), then with LoRA adapters from PEFT:
on the attention (patched before and after ``get_peft_model``) and on ``lm_head`` (run through
the module, never skipped). Tiny random models built from configs; CPU, fp32, torch backend.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    DENSE,
    GRAD_TOL,
    LOSS_TOL,
    assert_grads_close,
    make_batch,
    make_model,
    run,
)

from triton_xent.integrations import transformers as tx  # noqa: E402

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe"]
SCALED = ["cohere", "granite"]
MULTIMODAL = ["llava", "qwen2_vl", "qwen2_5_vl", "gemma3", "mllama"]
FAMILIES = MOE + SCALED + MULTIMODAL

pytestmark = pytest.mark.usefixtures("one_thread", "torch_backend")


@pytest.mark.parametrize("fused", [pytest.param(True, id="fused"), pytest.param(False, id="unfused")])
@pytest.mark.parametrize("name", FAMILIES)
def test_training_matches_the_model(name, fused):
    ref = make_model(name).train()
    model = tx.patch(copy.deepcopy(ref), fused=fused).train()
    batch = make_batch(name)
    out_ref, grads_ref = run(ref, **batch)
    out, grads = run(model, **batch)
    assert (out.logits is None) == fused
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)
    if name in MOE and name != "deepseek_v3":  # DeepSeek-V3's forward adds no router loss
        assert out_ref.aux_loss is not None  # the router loss is part of the loss compared above
        torch.testing.assert_close(out.aux_loss, out_ref.aux_loss)


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluation_matches_the_model(name):
    ref = make_model(name).eval()
    batch = make_batch(name)
    with torch.no_grad():
        out_ref = ref(**batch)
        out = tx.patch(copy.deepcopy(ref)).eval()(**batch)
        lean = tx.patch(copy.deepcopy(ref), eval_logits=False).eval()(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits)
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, out_ref.loss, **LOSS_TOL)


@pytest.mark.parametrize("name, attr, value", [
    ("cohere", "logit_scale", 1.0), ("granite", "logits_scaling", 1.0),
])
def test_the_logit_scale_changes_the_loss(name, attr, value):
    """Guards the scaled cases above: without the scale the loss would differ. The fused path
    reads the value from the model at each call, as the model's forward does."""
    ref = make_model(name).train()
    model = tx.patch(copy.deepcopy(ref)).train()
    batch = make_batch(name)
    with torch.no_grad():
        scaled = model(**batch).loss
        if name == "cohere":
            ref.logit_scale = model.logit_scale = value
        else:
            ref.config.logits_scaling = model.config.logits_scaling = value
        unscaled, unscaled_ref = model(**batch).loss, ref(**batch).loss
    assert abs(scaled - unscaled) > 1e-2
    torch.testing.assert_close(unscaled, unscaled_ref, **LOSS_TOL)


# ---------------------------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------------------------


def _lora(model, targets):
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)  # init_lora_weights=False: random B too, so the adapters matter
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                             init_lora_weights=False)
    return peft.get_peft_model(model, config)


ATTENTION = ["q_proj", "o_proj"]  # present in every family here (DeepSeek-V3's MLA included)
PEFT_CASES = [(name, "patch-then-peft" if i % 2 else "peft-then-patch")
              for i, name in enumerate(DENSE + FAMILIES)]


@pytest.mark.parametrize("name, order", PEFT_CASES)
def test_lora_on_attention(name, order):
    base = make_model(name)
    ref = _lora(copy.deepcopy(base), ATTENTION).train()
    if order == "patch-then-peft":
        model = _lora(tx.patch(copy.deepcopy(base)), ATTENTION)
    else:
        model = _lora(copy.deepcopy(base), ATTENTION)
        assert tx.patch(model) is model  # the PEFT wrapper comes back, its base model patched
    model.train()
    assert tx.options_of(model.get_base_model()) is not None
    batch = make_batch(name)
    out_ref, grads_ref = run(ref, **batch)
    out, grads = run(model, **batch)
    assert out.logits is None and grads.keys() == grads_ref.keys()
    assert all("lora_" in n for n in grads)
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref.eval()(**batch).logits)


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen2_vl"])
def test_lora_unfused(name):
    """fused=False through a PEFT wrapper: the base model's loss_function is replaced (before,
    it was set on the wrapper and changed nothing)."""
    base = make_model(name)
    ref = _lora(copy.deepcopy(base), ATTENTION).train()
    model = tx.patch(_lora(copy.deepcopy(base), ATTENTION), fused=False, z_loss=1e-2).train()
    batch = make_batch(name)
    out_ref, _ = run(ref, **batch)
    out, grads = run(model, **batch)
    assert out.logits is not None and grads
    assert out.loss > out_ref.loss + 1e-4  # the z-loss is in: triton_xent's loss ran
    tx.patch(model, fused=False)  # without options: the model's own loss and gradients
    out, grads = run(model, **batch)
    _, grads_ref = run(ref, **batch)
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)


@pytest.mark.parametrize("order", ["patch-then-peft", "peft-then-patch"])
@pytest.mark.parametrize("name", ["llama", "gemma2-softcap", "cohere", "mixtral", "llava"])
def test_lora_on_lm_head_is_never_skipped(name, order):
    """The adapter replaces lm_head by a LoRA layer: that call runs the head as a module (the
    logits are built) and says so; its gradients are the model's own."""
    targets = ["q_proj", "lm_head"]
    base = make_model(name)
    ref = _lora(copy.deepcopy(base), targets).train()
    if order == "patch-then-peft":
        model = _lora(tx.patch(copy.deepcopy(base)), targets).train()
    else:
        model = tx.patch(_lora(copy.deepcopy(base), targets)).train()
    batch = make_batch(name)
    out_ref, grads_ref = run(ref, **batch)
    with pytest.warns(UserWarning, match="not a plain nn.Linear"):
        out, grads = run(model, **batch)
    assert out.logits is not None
    assert any("lm_head.lora_A" in n for n in grads) and grads.keys() == grads_ref.keys()
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)


def test_lora_merged_back_fuses_again():
    """merge_and_unload() leaves a plain lm_head: the fused path is back, no warning."""
    base = make_model("llama")
    model = _lora(tx.patch(copy.deepcopy(base)), ["q_proj", "lm_head"])
    merged = model.merge_and_unload().train().requires_grad_(True)
    ref = copy.deepcopy(merged)
    tx.unpatch(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, grads = run(merged, **make_batch())
    out_ref, grads_ref = run(ref, **make_batch())
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], **GRAD_TOL, msg=name)
