"""``triton_xent.integrations.transformers`` against the models' own losses and gradients.

Tiny randomly initialised models are built from configs here (no downloads; the other
``test_hf_*.py`` files import ``make_model``/``make_batch``). Each comparison deep-copies one
model, patches the copy and checks loss and every parameter's gradient against the unpatched
model on the same batch (fp32; the oracle is transformers' own forward and ``ForCausalLMLoss``),
or against ``triton_xent.reference`` in float64 for the loss options transformers lacks. The
batch has left padding, ignored labels and an odd vocabulary. The dense-family test runs the
default backend (the Triton kernel: on the CPU through the interpreter, which conftest.py turns
on); the others pin the torch backend, whose speed does not depend on the interpreter.
"""

from __future__ import annotations

import copy
import inspect
import io
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from triton_xent.integrations import _hf_patching as hp  # noqa: E402
from triton_xent.integrations import transformers as tx  # noqa: E402
from triton_xent.reference import cross_entropy_reference  # noqa: E402

VOCAB = 257
B, T = 2, 10
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
MOE = dict(output_router_logits=True, router_aux_loss_coef=0.05)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: several CPU threads only add contention (10-50x slower on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("TRITON_XENT_BACKEND", "torch")


@pytest.fixture
def default_backend(monkeypatch):
    """Runs after ``torch_backend`` (autouse fixtures come first) and undoes it."""
    monkeypatch.delenv("TRITON_XENT_BACKEND")


# ---------------------------------------------------------------------------------------------
# Tiny models of each family and their batches
# ---------------------------------------------------------------------------------------------


def _specs():
    V = VOCAB
    mrope = dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=10000.0)
    qwen_vl_ids = dict(image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3,
                       vision_end_token_id=V - 4)
    return {
        # name: (class, config class, config keywords, batch kind)
        "llama": ("LlamaForCausalLM", "LlamaConfig", TEXT, "text"),
        "mistral": ("MistralForCausalLM", "MistralConfig", TEXT, "text"),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", TEXT, "text"),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(TEXT, head_dim=8), "text"),
        "phi-bias": ("PhiForCausalLM", "PhiConfig", TEXT, "text"),  # lm_head has a bias
        # soft-caps small enough to change the loss of a random model (checked below)
        "gemma2-softcap": ("Gemma2ForCausalLM", "Gemma2Config",
                           dict(TEXT, head_dim=8, final_logit_softcapping=0.5), "text"),
        "gemma3-softcap": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                           dict(TEXT, head_dim=8, final_logit_softcapping=0.5), "text"),
        # MoE: the model adds router_aux_loss_coef * its load-balancing loss
        "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                    dict(TEXT, num_local_experts=4, num_experts_per_tok=2, **MOE), "text"),
        "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                      dict(TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32, **MOE), "text"),
        "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                      dict(TEXT, head_dim=8, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, **MOE), "text"),
        "olmoe": ("OlmoeForCausalLM", "OlmoeConfig",
                  dict(TEXT, num_experts=4, num_experts_per_tok=2, eos_token_id=1, **MOE), "text"),
        "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                        dict(TEXT, num_key_value_heads=4, moe_intermediate_size=32,
                             n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                             n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                             q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
                             qk_nope_head_dim=8), "text"),
        "gpt_oss": ("GptOssForCausalLM", "GptOssConfig",
                    dict(TEXT, head_dim=8, num_local_experts=4, num_experts_per_tok=2, **MOE),
                    "text"),
        # logit-scaled heads: Cohere multiplies by logit_scale, Granite divides by logits_scaling
        "cohere": ("CohereForCausalLM", "CohereConfig", dict(TEXT, logit_scale=4.0, eos_token_id=1),
                   "text"),
        "granite": ("GraniteForCausalLM", "GraniteConfig", dict(TEXT, logits_scaling=4.0), "text"),
        "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig",
                       dict(TEXT, logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2,
                            **MOE), "text"),
        # multimodal: the text head of a vision-language model, with images in the batch
        "llava": ("LlavaForConditionalGeneration", "LlavaConfig", dict(
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=37,
                               num_hidden_layers=2, num_attention_heads=4, image_size=12,
                               patch_size=4),
            text_config=dict(model_type="llama", **TEXT), image_token_index=V - 1,
            vision_feature_layer=-1), "llava"),
        "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig", dict(
            text_config=dict(model_type="qwen2_vl_text", **TEXT, rope_parameters=mrope),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                               patch_size=2, spatial_merge_size=2, temporal_patch_size=2),
            **qwen_vl_ids), "qwen_vl"),
        "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", dict(
            text_config=dict(model_type="qwen2_5_vl_text", **TEXT, rope_parameters=mrope),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, out_hidden_size=32,
                               num_heads=4, patch_size=2, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=8, fullatt_block_indexes=[0]),
            **qwen_vl_ids), "qwen_vl"),
        "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Config", dict(
            text_config=dict(model_type="gemma3_text", **TEXT, head_dim=8),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                               intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                               image_size=16, patch_size=4),
            mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 2,
            eoi_token_index=V - 3), "gemma3"),
        "mllama": ("MllamaForConditionalGeneration", "MllamaConfig", dict(
            text_config=dict(model_type="mllama_text_model", **TEXT, cross_attention_layers=[1],
                             pad_token_id=0),
            vision_config=dict(image_size=8, patch_size=4, hidden_size=16,
                               intermediate_layers_indices=[0], vision_output_dim=32,
                               num_hidden_layers=1, num_global_layers=1, num_attention_heads=4,
                               intermediate_size=37, supported_aspect_ratios=[[1, 1], [1, 2]],
                               max_num_tiles=2),
            image_token_index=V - 1), "mllama"),
    }


SPECS = _specs()


def make_config(name):
    cls_name, cfg_name, kwargs, kind = SPECS[name]
    cls, cfg = getattr(transformers, cls_name, None), getattr(transformers, cfg_name, None)
    if cls is None or cfg is None:
        pytest.fail(f"transformers {transformers.__version__} has no {cls_name}")
    return cls, cfg(**copy.deepcopy(kwargs))


def make_model(name, seed=0):
    cls, cfg = make_config(name)
    torch.manual_seed(seed)
    model = cls(cfg)
    if "softcap" in name:  # logits of a few units, so that the soft-cap matters
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
    return model


def make_batch(name="llama", seed=1, batch=B, length=T):
    """input_ids, attention_mask (left padding), labels (-100 on padding, one more ignored, and
    on the image tokens) and the image inputs the model's family expects."""
    kind = SPECS[name][3]
    V = VOCAB
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 8, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    extra = {}
    if kind == "llava":
        length = max(length, 12)
        ids = torch.randint(0, V - 8, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, :2] = 0
        ids[:, 2:11] = V - 1  # 9 patches of a 12x12 image with 4x4 patches
        extra = dict(pixel_values=torch.randn(batch, 3, 12, 12, generator=g))
    elif kind == "qwen_vl":
        ids[:, 2], ids[:, 3:7], ids[:, 7] = V - 3, V - 1, V - 4  # 4x4 patches merged 2x2: 4 tokens
        extra = dict(pixel_values=torch.randn(batch * 16, 3 * 2 * 2 * 2, generator=g),
                     image_grid_thw=torch.tensor([[1, 4, 4]] * batch),
                     mm_token_type_ids=(ids == V - 1).long())
    elif kind == "gemma3":
        ids[:, 2], ids[:, 3:7], ids[:, 7] = V - 2, V - 1, V - 3
        extra = dict(pixel_values=torch.randn(batch, 3, 16, 16, generator=g),
                     token_type_ids=(ids == V - 1).long())
    elif kind == "mllama":
        ids[:, 2] = V - 1
        extra = dict(pixel_values=torch.randn(batch, 1, 2, 3, 8, 8, generator=g),
                     aspect_ratio_ids=torch.tensor([[2]] * batch),
                     aspect_ratio_mask=torch.ones(batch, 1, 2, dtype=torch.long),
                     cross_attention_mask=torch.ones(batch, length, 1, 2, dtype=torch.long))
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids >= V - 8, -100)
    labels[1, 5] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels, **extra)


def run(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(grads, grads_ref):
    """Elementwise within GRAD_TOL, the absolute part scaled by the gradient's largest entry
    (fp32 rounding of a sum is relative to its largest terms, not to each small result)."""
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(grads[name], ref, rtol=GRAD_TOL["rtol"],
                                   atol=GRAD_TOL["atol"] * scale, msg=name)


def assert_same(model_name, fused, patched_kwargs=None, ref_kwargs=None, batch=None, **options):
    ref = make_model(model_name)
    patched = tx.patch(copy.deepcopy(ref), fused=fused, **options)
    batch = make_batch(model_name) if batch is None else batch
    out_ref, grads_ref = run(ref, **batch, **(ref_kwargs or {}))
    out, grads = run(patched, **batch, **(patched_kwargs or {}))
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)
    return out, out_ref


MODES = [pytest.param(True, id="fused"), pytest.param(False, id="unfused")]
DENSE = ["llama", "mistral", "qwen2", "qwen3", "phi-bias", "gemma2-softcap", "gemma3-softcap"]


# ---------------------------------------------------------------------------------------------
# Losses and gradients of the Llama-layout families and the loss arguments transformers passes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", MODES)
@pytest.mark.parametrize("model_name", DENSE)
def test_loss_and_grads_match_the_model(model_name, fused, default_backend):
    out, _ = assert_same(model_name, fused)
    assert (out.logits is None) == fused  # the fused path never builds the logits


def test_softcap_changes_the_loss():
    """Guards the Gemma cases above: without the soft-cap the loss would differ."""
    model = make_model("gemma2-softcap")
    with torch.no_grad():
        capped = model(**make_batch()).loss
        model.config.final_logit_softcapping = None
        uncapped = model(**make_batch()).loss
    assert abs(capped - uncapped) > 1e-2


@pytest.mark.parametrize("fused", MODES)
@pytest.mark.parametrize("num_items", [pytest.param(7, id="int"), pytest.param("tensor", id="tensor")])
def test_num_items_in_batch(fused, num_items):
    if num_items == "tensor":
        num_items = torch.tensor(7)
    kw = dict(num_items_in_batch=num_items)
    assert_same("llama", fused, patched_kwargs=kw, ref_kwargs=kw)


@pytest.mark.parametrize("fused", MODES)
def test_num_items_in_batch_divides_inside_the_op(fused, monkeypatch):
    """The model's loss is the op's own output (the sum divided by num_items_in_batch inside
    the op): no division after it, so the Trainer's backward starts with a gradient of 1."""
    from triton_xent import linear
    from triton_xent.integrations import _hf_loss

    name, module = ("linear_cross_entropy", linear) if fused else ("cross_entropy", _hf_loss)
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((kwargs, real(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(module, name, spy)
    model = tx.patch(make_model("llama"), fused=fused).train()
    out = model(**make_batch(), num_items_in_batch=torch.tensor(7))
    (kwargs, loss), = calls
    assert kwargs["reduction"] == "sum" and int(kwargs["divisor"]) == 7
    assert out.loss is loss


@pytest.mark.parametrize("fused", MODES)
def test_gradient_accumulation_equals_full_batch(fused):
    """Two micro-batches, each divided by the tokens of both: their sum is the full batch's mean."""
    model = tx.patch(make_model("llama"), fused=fused)
    batch = make_batch()
    full = model(**batch).loss
    n_items = (batch["labels"][:, 1:] != -100).sum()
    parts = [model(**{k: v[i:i + 1] for k, v in batch.items()}, num_items_in_batch=n_items).loss
             for i in range(B)]
    torch.testing.assert_close(parts[0] + parts[1], full, **LOSS_TOL)


@pytest.mark.parametrize("fused", MODES)
def test_shift_labels(fused):
    g = torch.Generator().manual_seed(5)
    shift = torch.randint(0, VOCAB, (B, T), generator=g)
    shift[0, :2] = -100
    kw = dict(shift_labels=shift)
    assert_same("qwen2", fused, patched_kwargs=kw, ref_kwargs=kw)


@pytest.mark.parametrize("fused", MODES)
@pytest.mark.parametrize("keep", [pytest.param(4, id="int"), pytest.param("positions", id="tensor")])
def test_logits_to_keep(fused, keep):
    batch = make_batch()
    positions = torch.tensor([1, 5, 6, 9])
    if keep == "positions":
        keep = positions
        batch["labels"] = batch["labels"][:, positions]
    else:
        batch["labels"] = batch["labels"][:, -keep:]
    kw = dict(logits_to_keep=keep)
    assert_same("llama", fused, patched_kwargs=kw, ref_kwargs=kw, batch=batch)


def test_logits_to_keep_label_mismatch_is_a_clear_error():
    model = tx.patch(make_model("llama"))
    with pytest.raises(ValueError, match="must match"):
        model(**make_batch(), logits_to_keep=4)


@pytest.mark.parametrize("fused", MODES)
def test_ignore_index_keyword(fused):
    batch = make_batch()
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, 3)
    kw = dict(ignore_index=3)
    assert_same("llama", fused, patched_kwargs=kw, ref_kwargs=kw, batch=batch)


@pytest.mark.parametrize("fused", MODES)
def test_bf16_model(fused):
    """bf16 weights: the loss comes back as fp32 (as transformers' upcast gives) and agrees with
    the model's own within bf16 rounding."""
    ref = make_model("llama").to(torch.bfloat16)
    patched = tx.patch(copy.deepcopy(ref), fused=fused)
    batch = make_batch()
    out_ref, grads_ref = run(ref, **batch)
    out, grads = run(patched, **batch)
    assert out.loss.dtype == out_ref.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=2**-8, atol=0)  # half a bf16 ulp
    for name in grads_ref:
        err = (grads[name].float() - grads_ref[name].float()).abs().max()
        assert err <= 1e-2 * grads_ref[name].float().abs().max(), name


def test_gradient_checkpointing():
    ref = make_model("llama")
    patched = tx.patch(copy.deepcopy(ref))
    for model in (ref, patched):
        model.gradient_checkpointing_enable()
        model.train()
    out_ref, grads_ref = run(ref, **make_batch())
    out, grads = run(patched, **make_batch())
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)


@pytest.mark.parametrize("how", ["patch", "apply"])
def test_torch_compile(how):
    """The patched forward traces into one graph, without breaks (aot_eager: no C++ build)."""
    import torch._dynamo

    ref = make_model("llama").train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        if how == "patch":
            patched = tx.patch(copy.deepcopy(ref))
        else:
            tx.apply("llama")
            patched = make_model("llama")
        compiled = torch.compile(patched.train(), backend="aot_eager")
        out_ref, grads_ref = run(ref, **make_batch())
        for _ in range(2):
            out, _ = run(compiled, **make_batch())
    finally:
        tx.revert()
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    grads = {n: p.grad for n, p in patched.named_parameters()}
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert_grads_close(grads, grads_ref)


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


# ---------------------------------------------------------------------------------------------
# Loss options through the patch (item 8), against the float64 reference
# ---------------------------------------------------------------------------------------------


def _reference_loss(model, batch, num_items=None, **options):
    """triton_xent.reference on the unpatched model's logits, in float64."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    target = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    reduction = options.pop("reduction", "mean")
    op_reduction = "sum" if num_items is not None else reduction
    loss = cross_entropy_reference(logits.reshape(-1, VOCAB), target.reshape(-1),
                                   reduction=op_reduction, **options)
    if num_items is not None:
        loss = loss / num_items
    return loss.view(target.shape) if reduction == "none" else loss


OPTION_CASES = [
    pytest.param(dict(z_loss=1e-2), id="z_loss"),
    pytest.param(dict(label_smoothing=0.1), id="smoothing"),
    pytest.param(dict(z_loss=1e-3, label_smoothing=0.2, num_items=9), id="both-num_items"),
    pytest.param(dict(reduction="sum"), id="sum"),
    pytest.param(dict(reduction="none"), id="none"),
]


@pytest.mark.parametrize("fused", MODES)
@pytest.mark.parametrize("case", OPTION_CASES)
def test_loss_options_match_the_reference(case, fused):
    case = dict(case)
    num_items = case.pop("num_items", None)
    ref = make_model("llama").train()
    model = tx.patch(copy.deepcopy(ref), fused=fused, **case).train()
    batch = make_batch()
    g = torch.Generator().manual_seed(3)
    kw = {} if num_items is None else dict(num_items_in_batch=num_items)
    out = model(**batch, **kw)
    expected = _reference_loss(ref, batch, num_items, **case)
    assert out.loss.dtype == torch.float32 and out.loss.shape == expected.shape
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    # gradients with a random upstream gradient, through the reference in float64
    upstream = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    (out.loss.double() * upstream).sum().backward()
    ((expected * upstream).sum()).backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **GRAD_TOL, msg=name)
    if case.get("reduction") == "none":  # ignored positions (and the last) add nothing
        ignored = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:] == -100
        assert torch.all(out.loss[ignored] == 0) and ignored.any()


@pytest.mark.parametrize("option", [dict(chunk_size=3), dict(accum_dtype=torch.float32),
                                    dict(backend="triton")], ids=["chunk", "accum", "triton"])
def test_fused_head_options(option):
    """chunk_size / accum_dtype / backend reach the fused op: same loss and gradients."""
    out, _ = assert_same("llama", True, **option)
    assert out.logits is None


def test_fused_head_options_reach_the_op(monkeypatch):
    """A break-proof check that the options are passed on (a chunk size does not change results)."""
    from triton_xent import linear

    seen = {}
    real = linear.linear_cross_entropy

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(linear, "linear_cross_entropy", spy)
    model = tx.patch(make_model("llama"), chunk_size=3, accum_dtype=torch.float32, backend="torch",
                     z_loss=1e-4, label_smoothing=0.1).train()
    model(**make_batch())
    assert seen["chunk_size"] == 3 and seen["accum_dtype"] is torch.float32
    assert seen["backend"] == "torch" and seen["z_loss"] == 1e-4 and seen["label_smoothing"] == 0.1


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_unnormalised_reductions_refuse_num_items_in_batch(reduction):
    model = tx.patch(make_model("llama"), reduction=reduction).train()
    with pytest.raises(ValueError, match="reduction='mean'"):
        model(**make_batch(), num_items_in_batch=7)


@pytest.mark.parametrize("bad, match", [
    (dict(reduction="avg"), "reduction"), (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"), (dict(fused=False, chunk_size=8), "fused head"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        tx.patch(make_model("llama"), **bad)
