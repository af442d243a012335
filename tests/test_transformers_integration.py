"""``triton_xent.integrations.transformers`` against the models' own losses and gradients: the
Llama-layout families, the loss arguments transformers passes (num_items_in_batch, shift_labels,
logits_to_keep, ignore_index), bf16, gradient checkpointing, torch.compile, and the loss options
of the patch against ``triton_xent.reference`` in float64. Patching itself, evaluation and the
refusals: test_hf_patching.py; the other families: test_hf_families.py.

The tiny models come from hf_models.py. Each comparison deep-copies one model, patches the copy
and checks loss and every parameter's gradient against the unpatched model on the same batch
(fp32; the oracle is transformers' own forward and ``ForCausalLMLoss``). The dense-family test
runs the default backend (the Triton kernel: on the CPU through the interpreter, which
conftest.py turns on); the others pin the torch backend, whose speed does not depend on the
interpreter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    DENSE,
    GRAD_TOL,
    LOSS_TOL,
    MODES,
    VOCAB,
    B,
    T,
    assert_grads_close,
    assert_same,
    make_batch,
    make_model,
    run,
)

from triton_xent.integrations import transformers as tx  # noqa: E402
from triton_xent.reference import cross_entropy_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "torch_backend")


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
