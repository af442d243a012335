"""How a Hugging Face model class is patched: the wrapped forward, the head capture, the bound
loss function, the patched subclasses of ``patch()`` and the classes of ``apply()``.

A patched class gets three attributes (``INSTALLED``): ``forward`` (the model's own, fused while
training with labels: see :func:`make_forward`), ``loss_function`` (a property giving
triton_xent's loss bound to the model) and ``__setattr__`` (notices TRL replacing the forward);
``patch()``'s subclasses also ``__reduce_ex__`` (pickled as "the patched subclass of
<class>"). The options live in the instance's or the class's ``OPTIONS`` attribute. Nothing is
put on the head module: a fused call shadows it with a stub for the call's duration.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

from torch import nn

from ._hf_forward import analyze, defining_forward
from ._hf_loss import DEFAULT_OPTIONS, causal_lm_loss, check_weight, fused_loss

OPTIONS = "_triton_xent_options"  # an instance's or a class's LossOptions (None: unpatched)
CAPTURE = "_triton_xent_capture"  # on the model during a fused call
ORIGINAL = "_triton_xent_original"  # on a patched forward: the forward it wraps
INSTALLED = ("forward", "loss_function", "__setattr__")

APPLIED: dict[type, dict] = {}  # class -> what apply() replaced in it
_SUBCLASSES: dict[type, type] = {}  # class -> patch()'s subclass of it
SUBCLASS_BASE: dict[type, type] = {}  # patch()'s subclass -> its class
ALLOW_TRL_HEAD = [0]  # > 0 while triton_xent's own TRL trainer sets up (it removes TRL's head)


def make_forward(original):
    """The patched forward around ``original`` (a class's own forward)."""
    sig = inspect.signature(original)
    names = list(sig.parameters)
    labels_at = names.index("labels") - 1 if "labels" in names else None  # after self
    takes_return_dict = "return_dict" in names or any(
        p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    layout = analyze(original).layout  # read once here: nothing to trace per call

    # wraps() keeps the original's signature visible (inspect follows __wrapped__): the
    # Trainer looks there for **kwargs to pass num_items_in_batch, generate() for its inputs.
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        options = getattr(self, OPTIONS, None)
        if options is None or not options.fused or (options.eval_logits and not self.training):
            return original(self, *args, **kwargs)
        labels = kwargs.get("labels")
        if labels is None and labels_at is not None and len(args) > labels_at:
            labels = args[labels_at]
        if labels is None:
            return original(self, *args, **kwargs)
        return _fused_call(self, original, layout, args, kwargs, takes_return_dict)

    setattr(forward, ORIGINAL, original)
    return forward


def _fused_call(model, original, layout, args, kwargs, takes_return_dict):
    """The model's forward with the LM head replaced, for this call, by a stub that records its
    input: the head module never runs, so a sharding library's hooks on it (FSDP2's unshard and
    reshard, transformers' tensor-parallel gathers) never run either, and the loss reads the
    weight as the library leaves it outside the head's forward (see ``check_weight``)."""
    head = getattr(model, layout.head, None)
    problem = head_problem(head)
    if problem is not None:
        warnings.warn(
            f"triton_xent: {type(model).__name__}.{layout.head} is not a plain nn.Linear: "
            f"{problem}. This call builds the logits through the module and computes the loss "
            "from them (no fusion, nothing skipped).", stacklevel=3,
        )
        return original(model, *args, **kwargs)
    if not is_zero3(head.weight):  # ZeRO-3 gathers it when the forward reads it: checked there
        check_weight(model, layout.head, head.weight, head.in_features)
    if "_loss_function" in vars(model):
        raise RuntimeError(
            f"{type(model).__name__}.loss_function was replaced after triton_xent patched the "
            "model; the fused path cannot honour another loss. unpatch(model) to use yours."
        )
    want_dict = kwargs.get("return_dict")
    if want_dict is None:
        want_dict = getattr(model.config, "return_dict", True)
    if takes_return_dict:
        kwargs = {**kwargs, "return_dict": True}
    capture = _Capture(layout, head)
    # An instance attribute shadows the registered module for ``self.<head>`` (nn.Module looks
    # in _modules only when the attribute is not found): parameters, state dict and hooks stay.
    own = vars(model)
    own[layout.head] = _HeadStub(capture)
    setattr(model, CAPTURE, capture)
    try:
        out = original(model, *args, **kwargs)
    finally:
        own.pop(layout.head, None)
        setattr(model, CAPTURE, None)
    if capture.hidden is None or not capture.loss_done:
        raise RuntimeError(
            f"{type(model).__name__}'s forward did not "
            + ("call self." + layout.head if capture.hidden is None else "call self.loss_function")
            + " with the labels given: triton_xent cannot fuse it; use fused=False."
        )
    if isinstance(out, tuple):
        raise RuntimeError(f"{type(model).__name__}'s forward returned a tuple with return_dict=True")
    fields = {k: v for k, v in out.items() if k != "logits"}
    if want_dict:
        return type(out)(**fields)
    # The model's tuple, with None where the logits were (ModelOutput.to_tuple drops Nones).
    return tuple(None if k == "logits" else v for k, v in out.items())


class _Capture:
    """One fused call: the head's input, once the stub got it, and whether the loss was taken."""

    __slots__ = ("layout", "head", "hidden", "loss_done")

    def __init__(self, layout, head):
        self.layout, self.head = layout, head
        self.hidden = None
        self.loss_done = False


class _HeadStub:
    """Stands in for the LM head during a fused call: keeps its input and returns zero rows of
    logits (``(..., 0, vocab)``), which the model's steps up to its loss function pass along.
    Other attributes are the head's."""

    def __init__(self, capture):
        self._capture = capture

    def __getattr__(self, name):
        return getattr(self._capture.head, name)

    def __call__(self, *args, **kwargs):
        capture = self._capture
        if capture.hidden is not None:
            raise RuntimeError("triton_xent: the LM head ran twice in one fused forward; use "
                               "fused=False")
        hidden = args[0] if args else kwargs["input"]
        capture.hidden = hidden
        return hidden.new_empty((*hidden.shape[:-2], 0, capture.head.out_features))


def is_zero3(weight):
    """A parameter DeepSpeed ZeRO-3 partitions (it carries DeepSpeed's ``ds_id``): outside the
    forward it is empty; DeepSpeed gathers it when a module's forward reads it (the loss does)."""
    return getattr(weight, "ds_id", None) is not None


def head_problem(head):
    """None when the head computes exactly ``F.linear(x, weight, bias)`` over its whole weight
    (what the fused op does; the weight may be sharded by FSDP2 or by transformers' tensor
    parallelism), else what it is instead, in words."""
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return _describe(head)
    if not head.weight.is_floating_point():
        return f"its weight is {head.weight.dtype} (a quantized head)"
    own = vars(head).get("forward")
    if own is None:
        return None
    # accelerate's device-placement hook (device_map) wraps forward; the math stays the Linear's
    if getattr(getattr(head, "_old_forward", None), "__func__", None) is nn.Linear.forward:
        return None
    tp = _tp_style(own)
    if tp is not None:
        return _tp_problem(head, *tp)
    return (f"its forward is replaced by {getattr(own, '__qualname__', own)!r}, which the fused "
            "head cannot read")


def _describe(head):
    cls = type(head)
    where = f"{cls.__module__}.{cls.__qualname__}"
    low = where.lower()
    if "peft" in low or "lora" in low:
        return (f"it is {where}, a PEFT adapter on the head (an adapter is never skipped; put "
                "adapters on other modules, or merge_and_unload(), to keep the fused head)")
    if any(k in low for k in ("bitsandbytes", "quant", "gptq", "awq", "hqq", "torchao", "fp8")):
        return f"it is {where}, a quantized layer"
    return f"it is {where}, whose forward is not nn.Linear's"


def _tp_style(forward):
    """(style, original forward) of a head whose forward transformers' tensor parallelism
    replaced (``TensorParallelLayer.install_forward``), else None."""
    code = getattr(forward, "__code__", None)
    if code is None or code.co_name != "tp_forward" or "transformers" not in code.co_filename:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in forward.__closure__ or ())))
    if "self" not in cells or "original_forward" not in cells:
        return None
    return cells["self"], cells["original_forward"]


def _tp_problem(head, style, original):
    """transformers' ``ColwiseParallel`` on an nn.Linear head computes ``F.linear`` with the
    whole (vocabulary-sharded) weight on replicated inputs: the fused op does that directly."""
    from torch.distributed.tensor import Replicate
    from transformers.distributed.tensor_parallel import ColwiseParallel

    name = type(style).__name__
    if (type(style) is ColwiseParallel and style.input_layouts == Replicate()
            and style.output_layouts == Replicate()
            and getattr(original, "__func__", None) is nn.Linear.forward
            and not getattr(head, "_hf_quantized_needs_local_tp", False)):
        return None
    return (f"transformers' tensor parallelism runs it as {name}(input_layouts="
            f"{getattr(style, 'input_layouts', '?')}, output_layouts="
            f"{getattr(style, 'output_layouts', '?')}); the fused head reproduces only the LM "
            "head's 'colwise_gather_output' (ColwiseParallel with replicated input and output)")


def _loss_property(self):
    """``loss_function`` of a patched class: triton_xent's, bound to the model."""
    own = vars(self).get("_loss_function")
    if own is not None:
        return own
    if getattr(self, OPTIONS, None) is None:
        return _hf_loss_function(self)
    return functools.partial(_model_loss, self)


def _set_loss_function(self, value):
    self._loss_function = value


def _hf_loss_function(model):
    from transformers import PreTrainedModel

    return PreTrainedModel.loss_function.fget(model)


def _model_loss(model, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                shift_labels=None, **kwargs):
    options = getattr(model, OPTIONS)
    capture = getattr(model, CAPTURE, None)
    if capture is None:
        return causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                              shift_labels, options=options)
    if capture.hidden is None or logits.numel() != 0 or capture.loss_done:
        raise RuntimeError("triton_xent: the loss got logits that did not come from the fused head")
    loss = fused_loss(model, capture.layout, capture.head, capture.hidden, labels, vocab_size,
                      num_items_in_batch, ignore_index, shift_labels, options)
    capture.loss_done = True
    return loss


def unwrap(model):
    """The transformers model to patch: ``model``, or the base model inside a PEFT model."""
    from transformers import PreTrainedModel

    if isinstance(model, type):
        raise ValueError(f"patch() takes a model instance, not the class {model.__name__}: use "
                         f"apply({model.__name__}) to patch the class (every instance, also those "
                         "loaded later)")
    seen = model
    while not isinstance(model, PreTrainedModel) and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()  # PEFT: PeftModel -> the transformers model inside
    if isinstance(model, PreTrainedModel):
        return model
    hint = ""
    if hasattr(seen, "_orig_mod"):
        hint = " (a torch.compile'd module: patch the model before torch.compile)"
    elif hasattr(seen, "module"):
        hint = " (a DDP/FSDP wrapper: patch the model before wrapping it)"
    raise ValueError(f"triton_xent patches transformers models, not {type(seen).__name__}{hint}.")


def check_class(cls, options):
    """Raise (with the reason and the fix) if ``cls`` cannot be patched in this mode."""
    import transformers

    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{cls!r} is not a transformers model class")
    name = cls.__name__
    loss = _class_loss(cls)
    if loss is not transformers.loss.loss_utils.LOSS_MAPPING["ForCausalLM"]:
        raise ValueError(f"{name}'s loss is not transformers' ForCausalLMLoss (loss type of "
                         "the class name): triton_xent patches causal LMs only.")
    owner, fn = defining_forward(cls)
    info = analyze(fn)
    if not info.calls_loss_function:
        raise ValueError(
            f"{name}'s forward ({owner.__name__}.forward) {info.reason}: triton_xent replaces "
            "self.loss_function, so it would change nothing. It supports causal LMs whose "
            "forward calls self.loss_function (not T5 or other encoder-decoders that compute "
            "their loss themselves)."
        )
    if options.fused and info.layout is None:
        raise ValueError(
            f"patch(fused=True) cannot fuse {name}: in {owner.__name__}.forward, {info.reason}. "
            "Use fused=False to keep the model's logits and replace only its loss."
        )


def _class_loss(cls):
    """The loss function transformers gives instances of ``cls`` (PreTrainedModel.__init__)."""
    import re

    from transformers.loss.loss_utils import LOSS_MAPPING

    loss_type = cls.__name__
    if loss_type not in LOSS_MAPPING:
        found = re.findall(f"({'|'.join(LOSS_MAPPING)})", cls.__name__)
        loss_type = found[0] if found else "ForCausalLM"  # the property's own fallback
    return LOSS_MAPPING[loss_type]


def install(cls, original, set_reduce):
    """Put the patched attributes (module docstring) on ``cls`` around its forward ``original``."""
    cls.forward = make_forward(original)
    cls.loss_function = property(_loss_property, _set_loss_function)
    cls.__setattr__ = _make_setattr(cls)
    if set_reduce:
        cls.__reduce_ex__ = _reduce_ex


def patched_subclass(base):
    """patch()'s subclass of ``base`` (one per class, made on first use)."""
    sub = _SUBCLASSES.get(base)
    if sub is None:
        # Same name, module and qualified name: save_pretrained writes the class name into the
        # config's architectures, and logs show it.
        sub = type(base.__name__, (base,), {"__module__": base.__module__,
                                            "__qualname__": base.__qualname__})
        install(sub, defining_forward(base)[1], set_reduce=True)
        _SUBCLASSES[base], SUBCLASS_BASE[sub] = sub, base
    return sub


def _reduce_ex(self, protocol):
    # Pickle (torch.save, copy.deepcopy) as "the patched subclass of <base>", rebuilt on load.
    rv = object.__reduce_ex__(self, max(protocol, 2))
    if type(self) not in SUBCLASS_BASE:  # a further subclass (FSDP2's): pickled as it is
        return rv
    return (_new_patched, (SUBCLASS_BASE[type(self)],)) + tuple(rv[2:])


def _new_patched(base):
    sub = patched_subclass(base)
    return sub.__new__(sub)


def _make_setattr(cls):
    parent = vars(cls).get("__setattr__")

    def __setattr__(self, name, value):
        if name == "forward" and getattr(self, OPTIONS, None) is not None:
            _check_foreign_forward(self, value)
        if parent is not None:
            parent(self, name, value)
        else:
            super(cls, self).__setattr__(name, value)

    return __setattr__


def _check_foreign_forward(model, value):
    """TRL's trainers replace the forward with their own fused LM head: say so, loudly."""
    if not is_trl_fused_head(value) or ALLOW_TRL_HEAD[0]:
        return
    options = getattr(model, OPTIONS)
    message = (
        f"TRL's add_fused_lm_head is replacing the forward of this triton_xent-patched "
        f"{type(model).__name__}: TRL's trainers then compute their loss with their own head "
        "and triton_xent's loss is not used. For supervised fine-tuning use "
        "triton_xent.integrations.trl.SFTTrainer (same arguments); for DPO/GRPO/KTO (their own "
        "losses) unpatch(model) first."
    )
    changed = {k: v for k, v in dataclasses.asdict(options).items()
               if k in ("z_loss", "label_smoothing", "reduction")
               and v != getattr(DEFAULT_OPTIONS, k)}
    if changed:
        raise RuntimeError(message + f" The options {changed} would be silently dropped.")
    warnings.warn(message, stacklevel=3)


def is_trl_fused_head(forward):
    """Whether ``forward`` is the one ``trl.trainer.utils.add_fused_lm_head`` installs (it copies
    the model's name and signature with functools.wraps; its code object tells)."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename


def resolve(target):
    """The classes a model type (``"llama"``), a class name or a class stands for."""
    import transformers

    if isinstance(target, type):
        return [SUBCLASS_BASE.get(target, target)]
    if not isinstance(target, str):
        raise TypeError(f"expected a model type, class name or class, not {target!r}")
    if hasattr(transformers, target) and target[:1].isupper():
        return [getattr(transformers, target)]
    from transformers.models.auto import modeling_auto as auto

    names = []
    mappings = (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    for mapping in mappings:
        found = mapping.get(target)
        for name in (found,) if isinstance(found, str) else (found or ()):
            if name not in names:
                names.append(name)
    if not names:
        import difflib

        known = {name for mapping in mappings for name in mapping}
        close = difflib.get_close_matches(target, known, n=3)
        raise ValueError(f"unknown model type {target!r}" + (f"; did you mean {close}?" if close else ""))
    return [getattr(transformers, n) for n in names]
