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
with labels also never builds the logits and never runs the LM head module: for the call, a
stub stands in for the head, records its input and returns zero rows, and the loss function
passes the recorded hidden states with the head's weight and bias, the model's logit scale and
soft-cap to :func:`triton_xent.linear_cross_entropy`. The weight is read as the training stack
leaves it outside the head's forward: whole (single process, DDP, FSDP2 with the head in a unit
that ran), a DTensor that FSDP2 shards (gathered for the call, its gradient averaged and
reduce-scattered as FSDP2 does), or transformers' tensor-parallel head sharded on the
vocabulary (the vocabulary-parallel path, no logits anywhere), or a DeepSpeed ZeRO-3 parameter
(which DeepSpeed gathers when the forward reads it). Everything else is the model's own code: the base
model, multimodal inputs, the MoE router loss it adds, its output class (``logits`` is
``None``). Which models qualify is read from each class's forward (see ``_hf_forward.py``):
the steps between the head and the loss must be ones the fused op reproduces (none, a logit
scale such as Cohere's and Granite's, Gemma 2's soft-cap, an fp32 upcast).

Fused mode fuses only while ``model.training`` and labels are given; in evaluation the model
builds its logits (``compute_metrics``, ``predict``) and the loss comes from them, unless
``eval_logits=False``. A head that is no longer a plain ``nn.Linear`` at call time (a LoRA
adapter on ``lm_head``, a quantized head, a tensor-parallel style other than
``colwise_gather_output``) is run as a module and the loss computed from its logits, with a
warning naming what it is: an adapter is never skipped.

Files: this one holds the public API; ``_hf_patching.py`` the patched forward, the head capture
and the patched classes; ``_hf_loss.py`` the loss (fused and from logits); ``_hf_forward.py``
the reading of a model's forward. transformers is imported only by these functions. Tested
with transformers 5.24, PEFT 0.21, TRL 1.16.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import _hf_loss as L
from . import _hf_patching as P
from ._hf_forward import defining_forward
from ._hf_loss import LossOptions, causal_lm_loss

__all__ = [
    "AutoTritonXentForCausalLM",
    "AutoTritonXentForImageTextToText",
    "LossOptions",
    "apply",
    "causal_lm_loss",
    "options_of",
    "patch",
    "revert",
    "unpatch",
]


def options_of(model: nn.Module) -> LossOptions | None:
    """The options a model (or the PEFT model around it) is patched with, or None."""
    return getattr(P.unwrap(model), P.OPTIONS, None)


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
    fsdp_schedule: str = "gathered",
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
        fsdp_schedule: fused head sharded by FSDP2 (its unit not run: ``lm_head`` alone):
            ``"gathered"`` all-gathers the head for the call; ``"sharded"`` never gathers it
            (the group's hidden states and targets are gathered instead); ``"auto"`` picks
            whichever sends fewer bytes per call. See :mod:`triton_xent.fsdp`.

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
    options = L.make_options(fused, eval_logits, z_loss, label_smoothing, reduction, chunk_size,
                             accum_dtype, backend, fsdp_schedule)
    base = P.unwrap(model)
    if "_loss_function" in vars(base):
        raise ValueError(
            f"{type(base).__name__} has its own loss_function: triton_xent replaces "
            "transformers' ForCausalLMLoss only; remove it (del model._loss_function) first."
        )
    cls = P.SUBCLASS_BASE.get(type(base), type(base))
    P.check_class(cls, options)
    if type(base) is not P.patched_subclass(cls):
        base.__class__ = P.patched_subclass(cls)
    vars(base)[P.OPTIONS] = options
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (a no-op on a model it did not patch); returns ``model``.

    A model whose class :func:`apply` patched stays patched through its class; see
    :func:`revert`.
    """
    base = P.unwrap(model)
    vars(base).pop(P.OPTIONS, None)
    original = P.SUBCLASS_BASE.get(type(base))
    if original is not None:
        base.__class__ = original
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
    unknown = set(options) - set(L.OPTION_NAMES)
    if unknown:
        raise TypeError(f"apply() got unexpected keyword arguments {sorted(unknown)}")
    opts = L.make_options(**{**dataclasses.asdict(L.DEFAULT_OPTIONS), **options, "fused": fused})
    classes = [c for t in targets for c in P.resolve(t)]
    for cls in classes:
        P.check_class(cls, opts)
    for cls in classes:
        if cls not in P.APPLIED:
            P.APPLIED[cls] = {k: vars(cls)[k] for k in P.INSTALLED if k in vars(cls)}
            _, original = defining_forward(cls)
            P.install(cls, original, set_reduce=False)
        setattr(cls, P.OPTIONS, opts)
    return classes


def revert(*targets) -> None:
    """Undo :func:`apply` for these model types or classes (all of them when none is given)."""
    classes = [c for t in targets for c in P.resolve(t)] if targets else list(P.APPLIED)
    for cls in classes:
        saved = P.APPLIED.pop(cls, None)
        if saved is None:
            continue
        for key in P.INSTALLED + (P.OPTIONS,):
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
        options = {k: kwargs.pop(k) for k in L.OPTION_NAMES if k in kwargs}
        return patch(cls._auto().from_pretrained(*args, **kwargs), **options)

    @classmethod
    def from_config(cls, *args, **kwargs):
        options = {k: kwargs.pop(k) for k in L.OPTION_NAMES if k in kwargs}
        return patch(cls._auto().from_config(*args, **kwargs), **options)

    @classmethod
    def _auto(cls):
        import transformers

        return getattr(transformers, cls._auto_class)


class AutoTritonXentForImageTextToText(AutoTritonXentForCausalLM):
    """``AutoModelForImageTextToText`` (Llava, Qwen2-VL, Gemma 3, Mllama, ...), patched."""

    _auto_class = "AutoModelForImageTextToText"
