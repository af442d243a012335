"""``triton_xent.integrations.transformers.patch`` against the models' own losses.

Tiny randomly initialised models are built here (no downloads). Each test deep-copies one model,
patches the copy and checks that loss and every parameter's gradient equal the unpatched
model's on the same batch (fp32; the oracle is transformers' ``ForCausalLMLoss`` itself). The
batch has left padding, ignored labels and an odd vocabulary. The per-model tests run the default
backend (the Triton kernel: on the CPU through the interpreter, which conftest.py turns on); the
others pin the torch backend, whose speed does not depend on the interpreter.
"""

from __future__ import annotations

import copy
import inspect
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from triton_xent.integrations import transformers as tx  # noqa: E402

try:
    import triton_xent.linear  # noqa: F401

    HAS_LINEAR = True
except ImportError:
    HAS_LINEAR = False

needs_linear = pytest.mark.skipif(
    not HAS_LINEAR, reason="triton_xent.linear_cross_entropy (triton_xent/linear.py) is missing"
)

VOCAB = 257
B, T = 2, 10
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


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


def _config(name):
    """(model class, config) of a tiny random model; ``None`` where transformers lacks it."""
    specs = {
        "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
        "mistral": ("MistralForCausalLM", "MistralConfig", {}),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=8)),
        "phi-bias": ("PhiForCausalLM", "PhiConfig", {}),  # lm_head has a bias
        # a soft-cap small enough to change the loss of a random model (checked below)
        "gemma2-softcap": ("Gemma2ForCausalLM", "Gemma2Config",
                           dict(head_dim=8, final_logit_softcapping=0.5)),
        "gemma3-softcap": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                           dict(head_dim=8, final_logit_softcapping=0.5)),
        "mixtral-moe": ("MixtralForCausalLM", "MixtralConfig",
                        dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)),
    }
    cls_name, cfg_name, extra = specs[name]
    cls, cfg = getattr(transformers, cls_name, None), getattr(transformers, cfg_name, None)
    if cls is None or cfg is None:
        return None
    return cls, cfg(**SMALL, **extra)


def make_model(name, seed=0):
    spec = _config(name)
    if spec is None:
        pytest.skip(f"this transformers has no {name} model")
    cls, cfg = spec
    torch.manual_seed(seed)
    model = cls(cfg)
    if "softcap" in name:  # logits of a few units, so that the soft-cap matters
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
    return model


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 4] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def run(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model_name, fused, patched_kwargs=None, ref_kwargs=None, **batch):
    ref = make_model(model_name)
    patched = tx.patch(copy.deepcopy(ref), fused=fused)
    out_ref, grads_ref = run(ref, **batch, **(ref_kwargs or {}))
    out, grads = run(patched, **batch, **(patched_kwargs or {}))
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, out_ref.loss, **LOSS_TOL)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], **GRAD_TOL, msg=name)
    return out, out_ref


MODES = [pytest.param(True, id="fused", marks=needs_linear), pytest.param(False, id="unfused")]
LLAMA_LAYOUT = ["llama", "mistral", "qwen2", "qwen3", "phi-bias", "gemma2-softcap",
                "gemma3-softcap"]


@pytest.mark.parametrize("fused", MODES)
@pytest.mark.parametrize("model_name", LLAMA_LAYOUT)
def test_loss_and_grads_match_the_model(model_name, fused, default_backend):
    out, _ = assert_same(model_name, fused, **make_batch())
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
    batch = make_batch()
    if num_items == "tensor":
        num_items = torch.tensor(7)
    kw = dict(num_items_in_batch=num_items)
    assert_same("llama", fused, patched_kwargs=kw, ref_kwargs=kw, **batch)


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
    batch = make_batch()
    g = torch.Generator().manual_seed(5)
    shift = torch.randint(0, VOCAB, (B, T), generator=g)
    shift[0, :2] = -100
    kw = dict(shift_labels=shift)
    assert_same("qwen2", fused, patched_kwargs=kw, ref_kwargs=kw, **batch)


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
    assert_same("llama", fused, patched_kwargs=kw, ref_kwargs=kw, **batch)


@needs_linear
def test_logits_to_keep_label_mismatch_is_a_clear_error():
    model = tx.patch(make_model("llama"))
    with pytest.raises(ValueError, match="must match"):
        model(**make_batch(), logits_to_keep=4)


@pytest.mark.parametrize("fused", MODES)
def test_ignore_index_keyword(fused):
    batch = make_batch()
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, 3)
    kw = dict(ignore_index=3)
    assert_same("llama", fused, patched_kwargs=kw, ref_kwargs=kw, **batch)


@pytest.mark.parametrize("fused", MODES)
def test_without_labels_the_model_returns_its_logits(fused):
    ref = make_model("llama")
    model = tx.patch(copy.deepcopy(ref), fused=fused)
    batch = make_batch()
    del batch["labels"]
    with torch.no_grad():
        out, out_ref = model(**batch), ref(**batch)
    assert out.loss is None
    torch.testing.assert_close(out.logits, out_ref.logits)


@pytest.mark.parametrize("fused", MODES)
def test_return_dict_false_gives_a_tuple_with_the_loss_first(fused):
    ref = make_model("llama")
    model = tx.patch(copy.deepcopy(ref), fused=fused)
    with torch.no_grad():
        out = model(**make_batch(), return_dict=False)
        out_ref = ref(**make_batch(), return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], out_ref[0], **LOSS_TOL)


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


@pytest.mark.parametrize("fused", MODES)
def test_patch_returns_the_model_and_unpatch_restores_it(fused):
    model = make_model("llama")
    forward, loss_function = model.forward, model.loss_function
    assert tx.patch(model, fused=fused) is model
    assert tx.patch(model, fused=fused) is model  # patching twice replaces the first patch
    assert (model.forward != forward) == fused
    assert (model.loss_function is not loss_function) == (not fused)
    assert tx.unpatch(model) is model
    assert model.forward == forward and model.loss_function is loss_function
    assert "forward" not in vars(model) and "_loss_function" not in vars(model)
    tx.unpatch(model)  # no-op


@needs_linear
def test_fused_forward_keeps_the_signature():
    """The Trainer looks for **kwargs (to pass num_items_in_batch), generate() for logits_to_keep."""
    model = make_model("llama")
    before = inspect.signature(model.forward)
    tx.patch(model)
    assert inspect.signature(model.forward) == before
    params = inspect.signature(model.forward).parameters
    assert "labels" in params and "logits_to_keep" in params
    assert any(p.kind is p.VAR_KEYWORD for p in params.values())


def test_unfused_covers_moe_models_with_their_router_loss():
    assert_same("mixtral-moe", False, **make_batch())


@needs_linear
def test_fused_refuses_models_outside_the_llama_layout():
    model = make_model("mixtral-moe")
    with pytest.raises(ValueError, match="fused=False"):
        tx.patch(model)
    assert "forward" not in vars(model)


@needs_linear
def test_subclass_keeping_the_forward_is_accepted():
    class MyLlama(transformers.LlamaForCausalLM):
        pass

    ref = make_model("llama")
    model = MyLlama(ref.config)
    model.load_state_dict(ref.state_dict())
    tx.patch(model)
    batch = make_batch()
    torch.testing.assert_close(model(**batch).loss, ref(**batch).loss, **LOSS_TOL)


def test_patch_refuses_a_custom_loss_function():
    model = make_model("llama")
    model.loss_function = lambda *a, **k: 0.0
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        tx.patch(model, fused=False)


@needs_linear
def test_partitioned_lm_head_weight_is_a_clear_error():
    """What DeepSpeed ZeRO-3 leaves in lm_head.weight outside the module's own forward."""
    model = tx.patch(make_model("llama"))
    model.lm_head.weight = torch.nn.Parameter(torch.empty(0))
    with pytest.raises(RuntimeError, match="partitioned"):
        model(**make_batch())


def test_fused_without_linear_cross_entropy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_xent.linear", None)  # makes the import fail
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="fused=False"):
        tx.patch(model)
    assert "forward" not in vars(model)


@pytest.mark.parametrize("fused", MODES)
def test_bf16_model(fused):
    """bf16 weights: the loss comes back as fp32 (as transformers' upcast gives) and agrees with
    the model's own within bf16 rounding (triton_xent rounds the loss to the logits' dtype)."""
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
