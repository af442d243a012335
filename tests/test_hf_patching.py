"""``triton_xent.integrations.transformers``: what patching does to a model besides its loss:
evaluation, outputs and generation; patch / unpatch / apply / revert, the Auto class, pickling,
subclasses; and what cannot be done raising a clear error naming the fix. Losses and gradients:
test_transformers_integration.py.

The tiny models come from hf_models.py; the torch backend is pinned (conftest.py's
``torch_backend``).
"""

from __future__ import annotations

import copy
import inspect
import io
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    LOSS_TOL,
    MODES,
    VOCAB,
    assert_grads_close,
    make_batch,
    make_config,
    make_model,
    run,
)

from triton_xent.integrations import _hf_patching as hp  # noqa: E402
from triton_xent.integrations import transformers as tx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "torch_backend")


# ---------------------------------------------------------------------------------------------
# Evaluation, outputs, generation (issue 12, item 1 and 5)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", MODES)
def test_evaluation_returns_the_logits(fused):
    """model.eval() with labels: the model's logits (for compute_metrics, predict) and its loss."""
    ref = make_model("llama").eval()
    model = tx.patch(copy.deepcopy(ref), fused=fused).eval()
    with torch.no_grad():
        out, out_ref = model(**make_batch()), ref(**make_batch())
    torch.testing.assert_close(out.logits, out_ref.logits)
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)


def test_eval_logits_false_fuses_evaluation_too():
    ref = make_model("llama").eval()
    model = tx.patch(copy.deepcopy(ref), eval_logits=False).eval()
    with torch.no_grad():
        out, out_ref = model(**make_batch()), ref(**make_batch())
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    batch = make_batch()
    del batch["labels"]
    with torch.no_grad():  # without labels there is no loss to fuse: logits as always
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits)


@pytest.mark.parametrize("fused", MODES)
def test_without_labels_the_model_returns_its_logits(fused):
    ref = make_model("llama").train()
    model = tx.patch(copy.deepcopy(ref), fused=fused).train()
    batch = make_batch()
    del batch["labels"]
    with torch.no_grad():
        out, out_ref = model(**batch), ref(**batch)
    assert out.loss is None
    torch.testing.assert_close(out.logits, out_ref.logits)


@pytest.mark.parametrize("model_name", ["llama", "mixtral"])
def test_return_dict_false_keeps_the_positions(model_name):
    """The model's tuple, with None in the logits' place (not one position shorter)."""
    ref = make_model(model_name).train()
    model = tx.patch(copy.deepcopy(ref)).train()
    kw = dict(return_dict=False)
    with torch.no_grad():
        out, out_ref = model(**make_batch(model_name), **kw), ref(**make_batch(model_name), **kw)
    assert isinstance(out, tuple) and len(out) == len(out_ref)
    logits_at = 2 if model_name == "mixtral" else 1  # (loss, aux_loss, logits, ...)
    assert out[logits_at] is None and out_ref[logits_at].shape[-1] == VOCAB
    for i, (a, b) in enumerate(zip(out, out_ref)):
        if i != logits_at and isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, **LOSS_TOL)


@pytest.mark.parametrize("fused", MODES)
def test_output_hidden_states_pass_through(fused):
    ref = make_model("llama")
    model = tx.patch(copy.deepcopy(ref), fused=fused)
    with torch.no_grad():
        out = model(**make_batch(), output_hidden_states=True)
        out_ref = ref(**make_batch(), output_hidden_states=True)
    assert len(out.hidden_states) == len(out_ref.hidden_states) == 3
    for h, h_ref in zip(out.hidden_states, out_ref.hidden_states):
        torch.testing.assert_close(h, h_ref)


@pytest.mark.parametrize("fused", MODES)
def test_generate_still_works(fused):
    ref = make_model("llama").eval()
    model = tx.patch(copy.deepcopy(ref), fused=fused)
    ids = make_batch()["input_ids"][:1, :4]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


# ---------------------------------------------------------------------------------------------
# Patch, unpatch, apply, revert, the Auto class, pickling (items 5 and 7)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", MODES)
def test_patch_returns_the_model_and_unpatch_restores_it(fused):
    model = make_model("llama")
    cls = type(model)
    assert tx.patch(model, fused=fused) is model
    assert tx.patch(model, fused=fused, z_loss=1e-3) is model  # patching again replaces options
    assert type(model) is not cls and isinstance(model, cls)
    assert type(model).__name__ == cls.__name__ and type(model).__qualname__ == cls.__qualname__
    assert tx.options_of(model).z_loss == 1e-3
    assert tx.unpatch(model) is model
    assert type(model) is cls
    assert model.loss_function is transformers.loss.loss_utils.LOSS_MAPPING["ForCausalLM"]
    assert not model.lm_head._forward_pre_hooks and hp.OPTIONS not in vars(model)
    tx.unpatch(model)  # no-op


def test_patch_keeps_the_signature():
    """The Trainer looks for **kwargs (to pass num_items_in_batch), generate() for its inputs."""
    model = make_model("llama")
    before = inspect.signature(model.forward)
    tx.patch(model)
    assert inspect.signature(model.forward) == before
    params = inspect.signature(model.forward).parameters
    assert "labels" in params and "logits_to_keep" in params
    assert any(p.kind is p.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("fused", MODES)
def test_patch_survives_deepcopy_and_torch_save(fused, tmp_path):
    ref = make_model("llama").train()
    model = tx.patch(copy.deepcopy(ref), fused=fused, z_loss=1e-3)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(clone) is type(model) and tx.options_of(clone) == tx.options_of(model)
        clone.train()
        out, out_model = clone(**make_batch()), model(**make_batch())
        assert (out.logits is None) == fused
        torch.testing.assert_close(out.loss, out_model.loss, **LOSS_TOL)
    # save_pretrained writes the original architecture, so from_pretrained finds the class
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM


def test_patch_of_a_class_is_a_clear_error():
    with pytest.raises(ValueError, match="apply"):
        tx.patch(transformers.LlamaForCausalLM)


def test_apply_patches_the_class_before_loading(tmp_path):
    cls, cfg = make_config("llama")
    forward = vars(cls)["forward"]
    make_model("llama").save_pretrained(tmp_path)
    try:
        assert tx.apply("llama", z_loss=1e-3) == [cls]
        for model in (cls(cfg), transformers.AutoModelForCausalLM.from_config(cfg),
                      transformers.AutoModelForCausalLM.from_pretrained(tmp_path)):
            assert type(model) is cls  # the class itself is patched
            assert tx.options_of(model).z_loss == 1e-3
            assert model.train()(**make_batch()).logits is None
        tx.apply(cls, fused=False)  # again, by class: new options
        assert model.train()(**make_batch()).logits is not None
    finally:
        tx.revert()
    assert vars(cls)["forward"] is forward and hp.OPTIONS not in vars(cls)
    model = cls(cfg).train()
    assert model.loss_function is transformers.loss.loss_utils.LOSS_MAPPING["ForCausalLM"]
    assert model(**make_batch()).logits is not None


def test_apply_losses_and_gradients_match():
    ref = make_model("llama").train()
    try:
        tx.apply("LlamaForCausalLM")
        model = make_model("llama").train()
        out_ref, grads_ref = run(ref, **make_batch())
        out, grads = run(model, **make_batch())
    finally:
        tx.revert("llama")
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)


def test_apply_refuses_unknown_types_and_unsupported_classes():
    with pytest.raises(ValueError, match="did you mean"):
        tx.apply("lama")
    with pytest.raises(ValueError, match="encoder-decoder"):
        tx.apply("t5")
    with pytest.raises(TypeError, match="z_los"):
        tx.apply("llama", z_los=1e-4)
    assert not hp.APPLIED


def test_auto_class_patches_what_it_loads(tmp_path):
    _, cfg = make_config("qwen2")
    model = tx.AutoTritonXentForCausalLM.from_config(cfg, label_smoothing=0.1)
    assert isinstance(model, transformers.Qwen2ForCausalLM)
    assert tx.options_of(model).label_smoothing == 0.1
    model.save_pretrained(tmp_path)
    loaded = tx.AutoTritonXentForCausalLM.from_pretrained(tmp_path, fused=False, dtype=torch.float32)
    assert tx.options_of(loaded).fused is False and loaded.dtype == torch.float32
    assert loaded.train()(**make_batch()).logits is not None


@pytest.mark.parametrize("fused", MODES)
def test_subclass_keeping_the_forward_is_accepted(fused):
    class MyLlama(transformers.LlamaForCausalLM):
        pass

    ref = make_model("llama")
    model = MyLlama(ref.config)
    model.load_state_dict(ref.state_dict())
    tx.patch(model, fused=fused)
    torch.testing.assert_close(model(**make_batch()).loss, ref(**make_batch()).loss, **LOSS_TOL)


# ---------------------------------------------------------------------------------------------
# What cannot be done raises, naming the fix (items 3, 4, 5)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", MODES)
def test_models_that_compute_their_own_loss_are_refused(fused):
    """T5 never calls self.loss_function: replacing it would silently change nothing."""
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                num_heads=4, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg)
    with pytest.raises(ValueError, match="without self.loss_function"):
        tx.patch(model, fused=fused)
    assert type(model) is transformers.T5ForConditionalGeneration


def test_fused_refuses_a_forward_it_cannot_reproduce():
    """A step on the logits that the fused head does not do: refused, with the line; unfused works."""

    class ClippedLlama(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.lm_head(hidden)
            logits = logits.clamp(-1, 1)
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    ref = ClippedLlama(make_model("llama").config)
    with pytest.raises(ValueError, match=r"logits\.clamp\(-1, 1\).*fused=False"):
        tx.patch(ref)
    model = tx.patch(copy.deepcopy(ref), fused=False)
    out_ref, grads_ref = run(ref, **make_batch())
    out, grads = run(model, **make_batch())
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)


def test_custom_forward_with_a_keyword_head_call():
    """A forward of one's own that passes the head's input by keyword, scales the logits by a
    number and upcasts them: fused, with the model's loss and gradients."""

    class MyLlama(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.lm_head(input=hidden).float()
            logits *= 3.0
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    ref = MyLlama(make_model("llama").config).train()
    model = tx.patch(copy.deepcopy(ref)).train()
    out_ref, grads_ref = run(ref, **make_batch())
    out, grads = run(model, **make_batch())
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)


def test_patch_refuses_a_custom_loss_function():
    model = make_model("llama")
    model.loss_function = lambda *a, **k: 0.0
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        tx.patch(model, fused=False)


def test_a_loss_function_set_after_patching_is_not_ignored():
    model = tx.patch(make_model("llama")).train()
    model.loss_function = lambda *a, **k: torch.zeros(())
    with pytest.raises(RuntimeError, match="loss_function was replaced"):
        model(**make_batch())


def test_partitioned_lm_head_weight_is_a_clear_error():
    """What DeepSpeed ZeRO-3 leaves in lm_head.weight outside the module's own forward."""
    model = tx.patch(make_model("llama")).train()
    model.lm_head.weight = torch.nn.Parameter(torch.empty(0))
    with pytest.raises(RuntimeError, match="partitioned"):
        model(**make_batch())


def test_peft_wrapper_is_unwrapped_without_peft():
    """Anything with get_base_model() (PEFT's models) is patched inside; the wrapper comes back."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_base_model(self):
            return self.inner

    model = make_model("llama")
    wrapper = Wrapper(model)
    assert tx.patch(wrapper) is wrapper
    assert tx.options_of(model) is not None
    tx.unpatch(wrapper)
    assert type(model) is transformers.LlamaForCausalLM


def test_compiled_or_wrapped_models_are_a_clear_error():
    with pytest.raises(ValueError, match="before torch.compile"):
        tx.patch(torch.compile(make_model("llama")))
