"""The reading of a model's forward (``integrations/_hf_forward.py``) on the spellings found in
transformers, on what it must refuse, and over every causal LM class of the installed
transformers (the figure the README gives)."""

from __future__ import annotations

import re

import pytest
import torch

from triton_xent.integrations._hf_forward import HeadLayout, analyze, defining_forward
from triton_xent.integrations._hf_loss import head_values as _head_values

CAP = ("config", "final_logit_softcapping")

# The spellings of transformers 5.24's forwards, reduced to the lines that matter.


def plain(self, h, labels):
    logits = self.lm_head(h)
    loss = self.loss_function(logits, labels, self.vocab_size)
    return Out(loss=loss, logits=logits)


def gemma2(self, h, labels, **kwargs):
    logits = self.lm_head(h)
    if self.config.final_logit_softcapping is not None:
        logits = logits / self.config.final_logit_softcapping
        logits = torch.tanh(logits)
        logits = logits * self.config.final_logit_softcapping
    loss = None
    if labels is not None:
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)
    return Out(loss=loss, logits=logits)


def walrus(self, h, labels):  # Gemma 4
    logits = self.lm_head(h)
    if (final_logit_softcapping := self.config.get_text_config().final_logit_softcapping) is not None:
        logits = logits / final_logit_softcapping
        logits = torch.tanh(logits)
        logits = logits * final_logit_softcapping
    return self.loss_function(logits, labels, 7)


def getattr_alias(self, h, labels):  # PaliGemma
    logits = self.lm_head(h)
    cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return self.loss_function(logits, labels, 7)


def one_expression(self, h, labels):  # RecurrentGemma
    logits = self.lm_head(h)
    cap = self.config.logits_soft_cap
    logits = nn.functional.tanh(logits / cap) * cap  # noqa: F821
    return self.loss_function(logits, labels, 7)


def cohere(self, h, labels):
    logits = self.lm_head(h)
    logits = logits * self.logit_scale  # main diff from Llama
    return self.loss_function(logits=logits, labels=labels, vocab_size=7)


def granite_inplace_and_upcast(self, h, labels):
    logits = self.lm_head(h).float()
    logits /= self.config.logits_scaling
    return self.loss_function(logits, labels, 7)


def scale_then_cap(self, h, labels):  # MuseGlimmer
    logits = self.lm_head(h) * self.config.text_config.output_multiplier
    logits = logits / self.config.text_config.final_logit_softcapping
    logits = torch.tanh(logits)
    logits = logits * self.config.text_config.final_logit_softcapping
    return self.loss_function(logits, labels, 7)


@pytest.mark.parametrize("fn, layout", [
    (plain, HeadLayout("lm_head")),
    (gemma2, HeadLayout("lm_head", softcap=CAP, softcap_optional=True)),
    (walrus, HeadLayout("lm_head", softcap=("config", ("get_text_config", (), ()),
                                            "final_logit_softcapping"), softcap_optional=True)),
    (getattr_alias, HeadLayout("lm_head", softcap=(
        "config", ("get_text_config", (), ()), ("getattr", ("final_logit_softcapping", None), ())),
        softcap_optional=True)),
    (one_expression, HeadLayout("lm_head", softcap=("config", "logits_soft_cap"))),
    (cohere, HeadLayout("lm_head", scale=(("logit_scale",), False))),
    (granite_inplace_and_upcast, HeadLayout("lm_head", scale=(("config", "logits_scaling"), True))),
    (scale_then_cap, HeadLayout("lm_head", scale=(("config", "text_config", "output_multiplier"), False),
                                softcap=("config", "text_config", "final_logit_softcapping"))),
], ids=lambda v: getattr(v, "__name__", ""))
def test_spellings_are_read(fn, layout):
    info = analyze(fn)
    assert info.calls_loss_function and info.reason is None
    assert info.layout == layout


def cap_then_scale(self, h, labels):
    logits = self.lm_head(h)
    logits = logits / self.config.cap
    logits = torch.tanh(logits)
    logits = logits * self.config.cap
    logits = logits * self.logit_scale
    return self.loss_function(logits, labels, 7)


def clamp(self, h, labels):
    logits = self.lm_head(h)
    logits = logits.clamp(-1, 1)
    return self.loss_function(logits, labels, 7)


def used_elsewhere(self, h, labels):
    logits = self.lm_head(h)
    self.extra = logits.logsumexp(-1)
    return self.loss_function(logits, labels, 7)


def head_twice(self, h, labels):
    logits = self.lm_head(h)
    other = self.lm_head(h * 2)
    return self.loss_function(logits, labels, 7), other


def else_branch(self, h, labels):
    logits = self.lm_head(h)
    if self.config.cap is not None:
        pass
    else:
        logits = logits * 2.0
    return self.loss_function(logits, labels, 7)


def other_condition(self, h, labels):
    logits = self.lm_head(h)
    if self.training:
        logits = logits * self.logit_scale
    return self.loss_function(logits, labels, 7)


def temperature_argument(self, h, labels, temperature=1.0):
    logits = self.lm_head(h)
    logits = logits / temperature
    return self.loss_function(logits, labels, 7)


def own_loss(self, h, labels):
    logits = self.lm_head(h)
    return torch.nn.functional.cross_entropy(logits, labels), logits


@pytest.mark.parametrize("fn, reason", [
    (cap_then_scale, "after the soft-cap"),
    (clamp, r"logits\.clamp\(-1, 1\)"),
    (used_elsewhere, "also used in"),
    (head_twice, "more than once"),
    (else_branch, "else branch"),
    (other_condition, "condition"),
    (temperature_argument, "logits / temperature"),
    (own_loss, "without self.loss_function"),
], ids=lambda v: getattr(v, "__name__", ""))
def test_what_the_fused_op_cannot_reproduce_is_refused(fn, reason):
    info = analyze(fn)
    assert info.layout is None
    assert info.calls_loss_function == (fn is not own_loss)
    assert re.search(reason, info.reason), info.reason


def test_values_are_read_from_the_model_at_each_call():
    class Config:
        final_logit_softcapping = 30.0

        def get_text_config(self):
            return self

    class Model:
        config = Config()
        logit_scale = 0.25

    layout = analyze(walrus).layout
    assert _head_values(Model(), layout) == (1.0, 30.0)
    Model.config.final_logit_softcapping = None  # the forward skips the step: so do we
    assert _head_values(Model(), layout) == (1.0, None)
    assert _head_values(Model(), analyze(cohere).layout) == (0.25, None)
    Model.config.logits_scaling = 4.0
    assert _head_values(Model(), analyze(granite_inplace_and_upcast).layout) == (0.25, None)
    Model.logit_scale = torch.tensor(0.5)  # a tensor scale (learnable?) is not taken as a number
    with pytest.raises(ValueError, match="tensor"):
        _head_values(Model(), analyze(cohere).layout)


def test_every_causal_lm_class_of_transformers():
    """The analysis runs on every *ForCausalLM / *ForConditionalGeneration class; in
    transformers 5.24 it fuses 251 of 325 (the README's figure), the tested families among them."""
    transformers = pytest.importorskip("transformers")
    counts = {"fused": [], "loss_function only": [], "own loss": []}
    for name in dir(transformers):
        if not name.endswith(("ForCausalLM", "ForConditionalGeneration")) or name.startswith("Auto"):
            continue
        cls = getattr(transformers, name)
        if not hasattr(cls, "forward"):
            continue
        info = analyze(defining_forward(cls)[1])
        key = "fused" if info.layout else "loss_function only" if info.calls_loss_function else "own loss"
        counts[key].append(name)
    for name in ["LlamaForCausalLM", "MixtralForCausalLM", "CohereForCausalLM", "GraniteForCausalLM",
                 "Gemma2ForCausalLM", "LlavaForConditionalGeneration", "MllamaForConditionalGeneration",
                 "Qwen2VLForConditionalGeneration", "GptOssForCausalLM", "DeepseekV3ForCausalLM"]:
        assert name in counts["fused"], name
    assert "T5ForConditionalGeneration" in counts["own loss"]
    if transformers.__version__ == "5.24.0":
        assert (len(counts["fused"]), sum(map(len, counts.values()))) == (251, 325)


class Out(dict):
    pass
