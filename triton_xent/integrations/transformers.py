"""Hugging Face ``transformers``: train a causal LM with triton_xent's loss.

Three ways in, one mechanism:

* ``patch(model, ...)``: one model instance (a PEFT model is unwrapped to its base model).
* ``apply("llama", ...)`` / ``apply(LlamaForCausalLM, ...)``: every instance of the class, also
  those that ``from_pretrained``, ``from_config``, the ``Trainer``'s ``model_init`` or another
  library create later; ``revert()`` undoes it.
* ``AutoTritonXentForCausalLM.from_pretrained(name, ...)`` (and ``from_config``): load with
  ``AutoModelForCausalLM``, then :func:`patch`.

How it works. The patched ``forward`` is the model's own. Its ``loss_function`` (the hook
transformers offers) becomes :func:`causal_lm_loss`, which computes transformers'
``ForCausalLMLoss`` (shift, ``ignore_index``, mean over kept tokens or sum divided by
``num_items_in_batch``) with :func:`triton_xent.cross_entropy`. In fused mode, a training call
with labels also never builds the logits: a pre-hook on the LM head records the head's input
and hands the head zero rows, and the loss function passes the recorded hidden states with the
head's weight and bias, the model's logit scale and soft-cap to
:func:`triton_xent.linear_cross_entropy`. Everything else is the model's own code: the base
model, multimodal inputs, the MoE router loss it adds, its output class (``logits`` is
``None``). Which models qualify is read from each class's forward (see ``_hf_forward.py``):
the steps between the head and the loss must be ones the fused op reproduces (none, a logit
scale such as Cohere's and Granite's, Gemma 2's soft-cap, an fp32 upcast).

Fused mode fuses only while ``model.training`` and labels are given; in evaluation the model
builds its logits (``compute_metrics``, ``predict``) and the loss comes from them, unless
``eval_logits=False``. A head that is no longer a plain ``nn.Linear`` at call time (a LoRA
adapter on ``lm_head``, a quantized head) is run as a module and the loss computed from its
logits, with a warning: an adapter is never skipped.

transformers is imported only by these functions. Tested with transformers 5.24.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as V
from ..functional import cross_entropy
from ._hf_forward import HeadLayout, analyze, defining_forward

__all__ = [
    "AutoTritonXentForCausalLM",
    "AutoTritonXentForImageTextToText",
    "apply",
    "causal_lm_loss",
    "patch",
    "revert",
    "unpatch",
]

_OPTIONS = "_triton_xent_options"  # an instance's or a class's LossOptions (None: unpatched)
_CAPTURE = "_triton_xent_capture"  # on the LM head during a fused call
_ORIGINAL = "_triton_xent_original"  # on a patched forward: the forward it wraps
_HOOKED = "_triton_xent_hooked"  # on an LM head that carries the capture pre-hook


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The options of a patch; see :func:`patch`."""

    fused: bool = True
    eval_logits: bool = True
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    reduction: str = "mean"
    chunk_size: int | None = None
    accum_dtype: torch.dtype | None = None
    backend: str | None = None


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))


def patch(
    model: nn.Module,
    fused: bool = True,
    *,
    eval_logits: bool = True,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Make a transformers causal LM compute its loss with triton_xent.

    Losses and gradients equal the model's own (within fp32 rounding) with the default options.
    Patching again replaces the options; :func:`unpatch` undoes it. The patch changes the
    instance's class to a subclass of the same name, so it survives ``copy.deepcopy`` and
    ``torch.save``/``torch.load`` (where triton_xent is importable) and ``save_pretrained``
    writes the original architecture. Patch before ``torch.compile``; before or after
    ``get_peft_model`` (a PEFT model is unwrapped).

    Args:
        model: a ``*ForCausalLM`` or a multimodal ``*ForConditionalGeneration`` whose forward
            computes its loss with ``self.loss_function`` (transformers' ``ForCausalLMLoss``),
            or a PEFT model around one.
        fused: ``True``: training calls with labels never build the ``(tokens, vocab)`` logits
            (``output.logits`` is ``None``). ``False``: keep the logits, replace only the loss.
        eval_logits: fused mode only. ``True`` (default): outside training the model builds
            its logits (for ``compute_metrics``, ``predict``, generation) and the loss comes
            from them. ``False``: evaluation with labels is fused too and returns no logits
            (for ``Trainer(..., args=TrainingArguments(prediction_loss_only=True))``).
        z_loss: coefficient of ``lse**2`` per kept token (PaLM), reduced like the loss.
        label_smoothing: in ``[0, 1]``.
        reduction: ``"mean"`` (transformers': mean over kept tokens, or the sum divided by
            ``num_items_in_batch`` when the Trainer passes it), ``"sum"`` or ``"none"`` (per
            token, shaped like the labels, 0 where ignored); the last two refuse
            ``num_items_in_batch``.
        chunk_size: fused head: rows per chunk (see :func:`triton_xent.linear_cross_entropy`).
        accum_dtype: fused head: dtype of the weight-gradient accumulator.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the cross-entropy step.

    Returns:
        ``model`` itself (the PEFT wrapper when given one), patched.

    Raises:
        ValueError: the model cannot be patched in this mode; the message says why and what
            to use instead.

    Examples::

        >>> from triton_xent.integrations.transformers import patch
        >>> model = patch(AutoModelForCausalLM.from_pretrained(name), z_loss=1e-4)
        >>> model.train()(input_ids=ids, labels=ids).loss.backward()
    """
    options = _options(fused, eval_logits, z_loss, label_smoothing, reduction, chunk_size,
                       accum_dtype, backend)
    base = _unwrap(model)
    if "_loss_function" in vars(base):
        raise ValueError(
            f"{type(base).__name__} has its own loss_function: triton_xent replaces "
            "transformers' ForCausalLMLoss only; remove it (del model._loss_function) first."
        )
    cls = _SUBCLASS_BASE.get(type(base), type(base))
    _check_class(cls, options)
    if type(base) is not _patched_subclass(cls):
        base.__class__ = _patched_subclass(cls)
    vars(base)[_OPTIONS] = options
    layout = analyze(defining_forward(cls)[1]).layout
    head = getattr(base, layout.head, None) if options.fused else None
    if _plain_linear(head):  # now rather than in the first (maybe compiled) call
        _ensure_hook(head)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (a no-op on a model it did not patch); returns ``model``.

    A model whose class :func:`apply` patched stays patched through its class; see
    :func:`revert`.
    """
    base = _unwrap(model)
    vars(base).pop(_OPTIONS, None)
    original = _SUBCLASS_BASE.get(type(base))
    if original is not None:
        base.__class__ = original
    for module in base.modules():
        if getattr(module, _HOOKED, False):
            _remove_hook(module)
    return model


def apply(*targets, fused: bool = True, **options) -> list[type]:
    """Patch model classes, so that every instance, also one loaded later, is patched.

    Use before ``from_pretrained``, in a ``Trainer``'s ``model_init``, or before a library
    that loads the model itself. The options are those of :func:`patch`. Per process: call it
    again where a pickled model is loaded.

    Args:
        *targets: model types (``"llama"``, ``"qwen2_vl"``, ``"gemma3"``: the classes the
            ``AutoModelForCausalLM`` / ``AutoModelForImageTextToText`` mappings name for them)
            or classes (``LlamaForCausalLM``).
        fused, **options: as in :func:`patch`.

    Returns:
        The patched classes.

    Examples::

        >>> from triton_xent.integrations.transformers import apply, revert
        >>> apply("llama", "qwen2")
        >>> model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")  # patched
        >>> revert()
    """
    if not targets:
        raise ValueError('apply() needs model types or classes, e.g. apply("llama")')
    unknown = set(options) - set(_OPTION_NAMES)
    if unknown:
        raise TypeError(f"apply() got unexpected keyword arguments {sorted(unknown)}")
    opts = _options(**{**dataclasses.asdict(_DEFAULT), **options, "fused": fused})
    classes = [c for t in targets for c in _resolve(t)]
    for cls in classes:
        _check_class(cls, opts)
    for cls in classes:
        if cls not in _APPLIED:
            _APPLIED[cls] = {k: vars(cls)[k] for k in _INSTALLED if k in vars(cls)}
            _, original = defining_forward(cls)
            _install(cls, original, set_reduce=False)
        setattr(cls, _OPTIONS, opts)
    return classes


def revert(*targets) -> None:
    """Undo :func:`apply` for these model types or classes (all of them when none is given)."""
    classes = [c for t in targets for c in _resolve(t)] if targets else list(_APPLIED)
    for cls in classes:
        saved = _APPLIED.pop(cls, None)
        if saved is None:
            continue
        for key in _INSTALLED + (_OPTIONS,):
            if key in vars(cls):
                delattr(cls, key)
        for key, value in saved.items():
            setattr(cls, key, value)


class AutoTritonXentForCausalLM:
    """``AutoModelForCausalLM`` whose models come back patched by :func:`patch`.

    The options of :func:`patch` are taken from the keyword arguments; the others go to
    transformers. Examples::

        >>> model = AutoTritonXentForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B", z_loss=1e-4)
        >>> trainer = Trainer(model_init=lambda: AutoTritonXentForCausalLM.from_config(cfg), ...)
    """

    _auto_class = "AutoModelForCausalLM"

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        options = {k: kwargs.pop(k) for k in _OPTION_NAMES if k in kwargs}
        return patch(cls._auto().from_pretrained(*args, **kwargs), **options)

    @classmethod
    def from_config(cls, *args, **kwargs):
        options = {k: kwargs.pop(k) for k in _OPTION_NAMES if k in kwargs}
        return patch(cls._auto().from_config(*args, **kwargs), **options)

    @classmethod
    def _auto(cls):
        import transformers

        return getattr(transformers, cls._auto_class)


class AutoTritonXentForImageTextToText(AutoTritonXentForCausalLM):
    """``AutoModelForImageTextToText`` (Llava, Qwen2-VL, Gemma 3, Mllama, ...), patched."""

    _auto_class = "AutoModelForImageTextToText"


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    *,
    options: LossOptions | None = None,
    **kwargs,
) -> torch.Tensor:
    """``transformers``' ``ForCausalLMLoss`` computed by :func:`triton_xent.cross_entropy`.

    Same signature and result; the other keyword arguments a model forwards are ignored, as
    transformers does. ``options`` (default: none) adds z-loss, label smoothing, another
    reduction or backend. Usable directly as ``model.loss_function``.
    """
    options = options or _DEFAULT
    target, shape = _targets(labels, shift_labels, ignore_index)
    target = target.to(logits.device)
    loss = cross_entropy(
        logits.reshape(-1, vocab_size), target, ignore_index=ignore_index,
        reduction=_op_reduction(options, num_items_in_batch), label_smoothing=options.label_smoothing,
        z_loss=options.z_loss, backend=options.backend, loss_dtype=torch.float32,
        divisor=_divisor(num_items_in_batch, logits.device),
    )
    return loss.view(shape) if options.reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# The patched forward and loss function
# --------------------------------------------------------------------------------------------

_DEFAULT = LossOptions()


def _make_forward(original):
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
        options = getattr(self, _OPTIONS, None)
        if options is None or not options.fused or (options.eval_logits and not self.training):
            return original(self, *args, **kwargs)
        labels = kwargs.get("labels")
        if labels is None and labels_at is not None and len(args) > labels_at:
            labels = args[labels_at]
        if labels is None:
            return original(self, *args, **kwargs)
        return _fused_call(self, original, layout, args, kwargs, takes_return_dict)

    setattr(forward, _ORIGINAL, original)
    return forward


def _fused_call(model, original, layout, args, kwargs, takes_return_dict):
    """The model's forward with the LM head handing over its input instead of the logits."""
    head = getattr(model, layout.head, None)
    if not _plain_linear(head):
        warnings.warn(
            f"triton_xent: {type(model).__name__}.{layout.head} is a "
            f"{type(head).__module__}.{type(head).__qualname__}, not a "
            "plain nn.Linear (a LoRA adapter or a quantized head?): this call builds the logits "
            "through the module and computes the loss from them (no fusion, nothing skipped). "
            "Put adapters on other modules to keep the fused head.", stacklevel=3,
        )
        return original(model, *args, **kwargs)
    _check_weight(model, layout.head, head.weight, head.in_features)
    if "_loss_function" in vars(model):
        raise RuntimeError(
            f"{type(model).__name__}.loss_function was replaced after triton_xent patched the "
            "model; the fused path cannot honour another loss. unpatch(model) to use yours."
        )
    _ensure_hook(head)
    want_dict = kwargs.get("return_dict")
    if want_dict is None:
        want_dict = getattr(model.config, "return_dict", True)
    if takes_return_dict:
        kwargs = {**kwargs, "return_dict": True}
    capture = _Capture(layout, head)
    setattr(head, _CAPTURE, capture)
    setattr(model, _CAPTURE, capture)
    try:
        out = original(model, *args, **kwargs)
    finally:
        setattr(head, _CAPTURE, None)
        setattr(model, _CAPTURE, None)
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
    """One fused call: the head's input, once the head has run, and whether the loss was taken."""

    __slots__ = ("layout", "head", "hidden", "loss_done")

    def __init__(self, layout, head):
        self.layout, self.head = layout, head
        self.hidden = None
        self.loss_done = False


def _capture_hook(module, args):
    """Forward pre-hook on the LM head: during a fused call, keep the input, compute no logits."""
    capture = getattr(module, _CAPTURE, None)
    if capture is None:
        return None
    if capture.hidden is not None:
        raise RuntimeError("triton_xent: the LM head ran twice in one fused forward; use fused=False")
    hidden = args[0]
    capture.hidden = hidden
    return (hidden[..., :0, :],) + tuple(args[1:])


def _ensure_hook(head):
    if not getattr(head, _HOOKED, False):
        head.register_forward_pre_hook(_capture_hook)
        setattr(head, _HOOKED, True)


def _remove_hook(head):
    for key, hook in list(head._forward_pre_hooks.items()):
        if hook is _capture_hook:
            del head._forward_pre_hooks[key]
    vars(head).pop(_HOOKED, None)
    vars(head).pop(_CAPTURE, None)


def _loss_property(self):
    """``loss_function`` of a patched class: triton_xent's, bound to the model."""
    own = vars(self).get("_loss_function")
    if own is not None:
        return own
    if getattr(self, _OPTIONS, None) is None:
        return _hf_loss_function(self)
    return functools.partial(_model_loss, self)


def _set_loss_function(self, value):
    self._loss_function = value


def _hf_loss_function(model):
    from transformers import PreTrainedModel

    return PreTrainedModel.loss_function.fget(model)


def _model_loss(model, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                shift_labels=None, **kwargs):
    options = getattr(model, _OPTIONS)
    capture = getattr(model, _CAPTURE, None)
    if capture is None:
        return causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                              shift_labels, options=options)
    if capture.hidden is None or logits.numel() != 0 or capture.loss_done:
        raise RuntimeError("triton_xent: the loss got logits that did not come from the fused head")
    loss = _fused_loss(model, capture.layout, capture.head, capture.hidden, labels, vocab_size,
                       num_items_in_batch, ignore_index, shift_labels, options)
    capture.loss_done = True
    return loss


def _fused_loss(model, layout: HeadLayout, head, hidden, labels, vocab_size, num_items_in_batch,
                ignore_index, shift_labels, options):
    from ..linear import linear_cross_entropy

    weight, bias = head.weight, head.bias
    _check_weight(model, layout.head, weight, hidden.shape[-1])
    if isinstance(vocab_size, int) and vocab_size != weight.shape[0]:
        raise ValueError(
            f"{type(model).__name__}.{layout.head} has {weight.shape[0]} outputs but the model's "
            f"loss reads vocab_size={vocab_size}; triton_xent cannot fuse it (use fused=False)."
        )
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)
    target, shape = _targets(labels, shift_labels, ignore_index)
    target = target.to(weight.device)
    if hidden.shape[0] != target.numel():
        raise ValueError(
            f"{hidden.shape[0]} positions of hidden states (after logits_to_keep) but "
            f"{target.numel()} labels: they must match, as for the logits."
        )
    scale, softcap = _head_values(model, layout)
    loss = linear_cross_entropy(
        hidden, weight, target, linear_bias=bias, ignore_index=ignore_index,
        reduction=_op_reduction(options, num_items_in_batch), softcap=softcap,
        logit_scale=None if scale == 1.0 else scale, label_smoothing=options.label_smoothing,
        z_loss=options.z_loss, chunk_size=options.chunk_size, accum_dtype=options.accum_dtype,
        backend=options.backend,
        loss_dtype=torch.float32,  # as transformers: an fp32 loss, not a bf16-rounded sum
        # the Trainer's normaliser divides inside the op: the loss's upstream gradient stays 1
        divisor=_divisor(num_items_in_batch, weight.device),
    )
    return loss.view(shape) if options.reduction == "none" else loss


def _head_values(model, layout: HeadLayout):
    """(logit scale, soft-cap) of the model now, as its forward reads them."""
    scale = 1.0
    if layout.scale is not None:
        path, invert = layout.scale
        value = _read_path(model, path, optional=layout.scale_optional)
        if value is not None:
            value = _number(model, path, value)
            scale = 1.0 / value if invert else value
    softcap = None
    if layout.softcap is not None:
        value = _read_path(model, layout.softcap, optional=layout.softcap_optional)
        softcap = None if value is None else _number(model, layout.softcap, value)
    return scale, softcap


def _read_path(model, path, optional):
    if len(path) == 1 and isinstance(path[0], float):
        return path[0]
    obj = model
    for step in path:
        if isinstance(step, str):
            obj = getattr(obj, step)
        elif step[0] == "getattr":
            obj = getattr(obj, *step[1])
        else:
            name, args, kwargs = step
            obj = getattr(obj, name)(*args, **dict(kwargs))
    if obj is None and not optional:
        raise ValueError(f"{type(model).__name__}: {_path_str(path)} is None but the model's "
                         "forward uses it unconditionally")
    return obj


def _number(model, path, value):
    if isinstance(value, torch.Tensor):
        raise ValueError(
            f"{type(model).__name__}: {_path_str(path)} is a tensor; the fused head takes it as "
            "a Python number. Use fused=False (or set it to a float)."
        )
    return float(value)


def _path_str(path):
    return "self." + ".".join(s if isinstance(s, str) else f"{s[0]}(...)" for s in path)


def _check_weight(model, name, weight, in_features):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        DTensor = ()
    if isinstance(weight, DTensor):
        raise RuntimeError(
            f"{type(model).__name__}.{name}.weight is a DTensor outside the head's forward (FSDP2 "
            f"with {name} sharded as its own unit, or tensor parallelism): the fused path reads "
            f"the whole weight there. Shard {name} together with its parent (do not call "
            f"fully_shard on model.{name} alone), or use patch(model, fused=False)."
        )
    if weight.dim() != 2 or weight.shape[1] != in_features or weight.is_meta:
        raise RuntimeError(
            f"{type(model).__name__}.{name}.weight has shape {tuple(weight.shape)} on "
            f"{weight.device} outside the head's forward, not (vocab, {in_features}): it "
            "looks partitioned or offloaded (DeepSpeed ZeRO-3, accelerate offloading?). The "
            "fused path reads the whole weight; use patch(model, fused=False)."
        )


def _plain_linear(head):
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return False
    if not head.weight.is_floating_point():
        return False
    own = vars(head).get("forward")
    # accelerate's device-placement hook (device_map) wraps forward; the math stays the Linear's
    return own is None or getattr(getattr(head, "_old_forward", None), "__func__", None) is (
        nn.Linear.forward)


# --------------------------------------------------------------------------------------------
# Loss arithmetic shared by the fused and unfused paths
# --------------------------------------------------------------------------------------------


def _targets(labels, shift_labels, ignore_index):
    """The flat targets of ``ForCausalLMLoss`` (position t predicts label t + 1), and their shape."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1), shift_labels.shape


def _op_reduction(options, num_items_in_batch):
    if options.reduction != "mean" and num_items_in_batch is not None:
        raise ValueError(
            f"reduction={options.reduction!r} returns the loss without normalising it, but "
            "num_items_in_batch was passed (the Trainer does, to normalise the loss over "
            "gradient accumulation): use reduction='mean', which divides the sum by it."
        )
    if options.reduction == "mean" and num_items_in_batch is not None:
        return "sum"
    return options.reduction


def _divisor(num_items_in_batch, device):
    """num_items_in_batch as the op's divisor: a number, or a 0-d tensor on the loss's device."""
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device, non_blocking=True)
    return num_items_in_batch


# --------------------------------------------------------------------------------------------
# Classes: checks, patched subclasses, apply/revert
# --------------------------------------------------------------------------------------------

_INSTALLED = ("forward", "loss_function", "__setattr__", "post_init")
_APPLIED: dict[type, dict] = {}
_SUBCLASSES: dict[type, type] = {}
_SUBCLASS_BASE: dict[type, type] = {}


def _options(fused, eval_logits, z_loss, label_smoothing, reduction, chunk_size, accum_dtype,
             backend) -> LossOptions:
    V.check_options(reduction, label_smoothing, z_loss, None, -100)
    if not fused and (chunk_size is not None or accum_dtype is not None):
        raise ValueError("chunk_size and accum_dtype configure the fused head; fused=False "
                         "builds the logits and has no use for them")
    if backend not in (None, "auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', not {backend!r}")
    return LossOptions(bool(fused), bool(eval_logits), float(z_loss), float(label_smoothing),
                       reduction, chunk_size, accum_dtype, backend)


def _unwrap(model):
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


def _check_class(cls, options):
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


def _install(cls, original, set_reduce):
    cls.forward = _make_forward(original)
    cls.loss_function = property(_loss_property, _set_loss_function)
    cls.__setattr__ = _make_setattr(cls)
    if set_reduce:
        cls.__reduce_ex__ = _reduce_ex
    else:
        cls.post_init = _make_post_init(cls, analyze(original).layout)


def _make_post_init(cls, layout):
    """post_init of an applied class: also hook the new instance's head (transformers calls it
    at the end of every __init__, from_pretrained included), not in the first, maybe compiled,
    call, where registering a hook breaks the graph."""
    parent = vars(cls).get("post_init")

    def post_init(self, *args, **kwargs):
        if parent is not None:
            parent(self, *args, **kwargs)
        else:
            super(cls, self).post_init(*args, **kwargs)
        options = getattr(self, _OPTIONS, None)
        head = getattr(self, layout.head, None) if layout is not None else None
        if options is not None and options.fused and _plain_linear(head):
            _ensure_hook(head)

    return post_init


def _patched_subclass(base):
    sub = _SUBCLASSES.get(base)
    if sub is None:
        # Same name, module and qualified name: save_pretrained writes the class name into the
        # config's architectures, and logs show it.
        sub = type(base.__name__, (base,), {"__module__": base.__module__,
                                            "__qualname__": base.__qualname__})
        _install(sub, defining_forward(base)[1], set_reduce=True)
        _SUBCLASSES[base], _SUBCLASS_BASE[sub] = sub, base
    return sub


def _reduce_ex(self, protocol):
    # Pickle (torch.save, copy.deepcopy) as "the patched subclass of <base>", rebuilt on load.
    rv = object.__reduce_ex__(self, max(protocol, 2))
    if type(self) not in _SUBCLASS_BASE:  # a further subclass (FSDP2's): pickled as it is
        return rv
    return (_new_patched, (_SUBCLASS_BASE[type(self)],)) + tuple(rv[2:])


def _new_patched(base):
    sub = _patched_subclass(base)
    return sub.__new__(sub)


def _make_setattr(cls):
    parent = vars(cls).get("__setattr__")

    def __setattr__(self, name, value):
        if name == "forward" and getattr(self, _OPTIONS, None) is not None:
            _check_foreign_forward(self, value)
        if parent is not None:
            parent(self, name, value)
        else:
            super(cls, self).__setattr__(name, value)

    return __setattr__


_ALLOW_TRL_HEAD = [0]  # > 0 while triton_xent's own TRL trainer sets up (it removes TRL's head)


def _check_foreign_forward(model, value):
    """TRL's trainers replace the forward with their own fused LM head: say so, loudly."""
    if not _is_trl_fused_head(value) or _ALLOW_TRL_HEAD[0]:
        return
    options = getattr(model, _OPTIONS)
    message = (
        f"TRL's add_fused_lm_head is replacing the forward of this triton_xent-patched "
        f"{type(model).__name__}: TRL's trainers then compute their loss with their own head "
        "and triton_xent's loss is not used. For supervised fine-tuning use "
        "triton_xent.integrations.trl.SFTTrainer (same arguments); for DPO/GRPO/KTO (their own "
        "losses) unpatch(model) first."
    )
    changed = {k: v for k, v in dataclasses.asdict(options).items()
               if k in ("z_loss", "label_smoothing", "reduction")
               and v != getattr(_DEFAULT, k)}
    if changed:
        raise RuntimeError(message + f" The options {changed} would be silently dropped.")
    warnings.warn(message, stacklevel=3)


def _is_trl_fused_head(forward):
    """Whether ``forward`` is the one ``trl.trainer.utils.add_fused_lm_head`` installs (it copies
    the model's name and signature with functools.wraps; its code object tells)."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename


def _resolve(target):
    """The classes a model type (``"llama"``), a class name or a class stands for."""
    import transformers

    if isinstance(target, type):
        return [_SUBCLASS_BASE.get(target, target)]
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
