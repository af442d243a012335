"""Launcher of the Triton cross-entropy kernels: checks, allocation, grid and block sizes.

A plain torch function (no autograd) so that it can be tested alone; the autograd layer calls
``ce_forward`` once per forward and keeps the gradient it returns for the backward.
"""

from __future__ import annotations

import contextlib

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from triton_xent.kernels.cross_entropy import (
    _ce_fwd_kernel,
    _ce_split_grad_kernel,
    _ce_split_merge_kernel,
    _ce_split_stats_kernel,
)

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Under TRITON_INTERPRET=1, @triton.jit returns interpreted functions that run on CPU tensors.
_INTERPRETED = isinstance(_ce_fwd_kernel, InterpretedFunction)

# Block size and warps, keyed on the vocabulary size and the logits' element size. UNTUNED: this
# session had no GPU; the values follow the usual rules of thumb, to be replaced by measurements.
#
#   V bucket          | BLOCK_V         | num_warps        | why
#   ------------------+-----------------+------------------+------------------------------------
#   V <= 2048         | next_pow2(V)    | 4                | one block holds the row
#   2048 < V <= 8192  | next_pow2(V)    | 8                | one block, <= 32 elements per thread
#   V > 8192, fp32    | 8192            | 16               | 16 elements (64 B) per thread per load
#   V > 8192, 16-bit  | 8192            | 8                | 32 elements (64 B) per thread per load
#
# The gradient sweep keeps ~6 fp32 values per element live, so elements per thread stay <= 32 (at
# 8 warps a thread may use 255 registers, at 16 warps 128). Under the interpreter (CPU tensors)
# the block is only a cost in Python steps: take the whole row up to 4096.
_MAX_BLOCK_V_CUDA = 8192
_MAX_BLOCK_V_INTERPRETER = 4096

# Split-vocabulary heuristic (CUDA, num_splits=None). UNMEASURED as well.
#
#   condition                     | num_splits S
#   ------------------------------+--------------------------------------------------------------
#   N >= 2 * SMs                  | 1: the rows alone fill every SM at least twice
#   otherwise                     | ceil(4 * SMs / N): about 4 programs per SM ...
#                                 | ... capped at V // 16384 (a chunk keeps >= 16k columns, so the
#                                 | per-program fixed cost and the merge stay small) and at 64
#   CPU / interpreter             | 1 unless forced
#
# e.g. H100 (132 SMs), V = 128k: N = 1 -> 8 splits, N = 64 -> 8, N = 256 -> 3, N = 512 -> 1.
_SPLIT_PROGRAMS_PER_SM = 4
_SPLIT_MIN_CHUNK = 16384
_SPLIT_MAX = 64
# Chunks start on multiples of 16 columns: with an aligned row, vector loads stay aligned (the
# compiler sees CHUNK % 16 == 0 through Triton's integer specialization).
_CHUNK_ALIGN = 16


def _block_v_and_warps(V: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int]:
    """The heuristic table above."""
    if interpreted:
        return min(triton.next_power_of_2(V), _MAX_BLOCK_V_INTERPRETER), 4
    if V <= 2048:
        return triton.next_power_of_2(V), 4
    if V <= 8192:
        return triton.next_power_of_2(V), 8
    return _MAX_BLOCK_V_CUDA, (16 if dtype == torch.float32 else 8)


def _auto_num_splits(N: int, V: int, device: torch.device) -> int:
    """The split heuristic above (1 off CUDA)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count  # cached, no sync
    if N >= 2 * sms:
        return 1
    want = triton.cdiv(_SPLIT_PROGRAMS_PER_SM * sms, N)
    return max(1, min(want, V // _SPLIT_MIN_CHUNK, _SPLIT_MAX))


def _check(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    scales: torch.Tensor,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    block_v: int | None,
    num_splits: int | None,
) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(getattr(logits, "shape", ()))
        raise ValueError(f"logits must be a 2-D (N, V) tensor, got shape {shape}.")
    N, V = logits.shape
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not supported: use float32, float16 or bfloat16.")
    if V < 1:
        raise ValueError("logits has V = 0 classes; cross-entropy needs at least one class.")
    if V >= 2**30:
        raise ValueError(f"V = {V} classes is too large for the kernel's int32 column offsets (< 2**30).")
    # The kernels step along a row with unit stride; the row stride itself is free (slices of a
    # wider buffer are fine).
    if V > 1 and logits.stride(1) != 1:
        raise ValueError(
            f"logits must be contiguous along the class dimension (stride(1) == 1), got strides "
            f"{logits.stride()}: pass logits.contiguous()."
        )
    if logits.device.type == "cpu" and not _INTERPRETED:
        raise ValueError(
            "logits is on the CPU: the Triton kernels need a GPU tensor, or TRITON_INTERPRET=1 set "
            "before triton is imported (interpreter, for tests)."
        )
    if target.dim() != 1 or target.shape[0] != N:
        raise ValueError(f"target must have shape ({N},), got {tuple(target.shape)}.")
    if target.dtype != torch.int64:
        raise ValueError(f"target must be int64 class indices, got {target.dtype}.")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}.")
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != V:
            raise ValueError(f"weight must have shape ({V},), got {tuple(weight.shape)}.")
        if weight.dtype != torch.float32:
            raise ValueError(f"weight must be float32, got {weight.dtype}.")
        if weight.device != logits.device:
            raise ValueError(f"weight is on {weight.device} but logits is on {logits.device}.")
    if scales.shape != (2,) or scales.dtype != torch.float32:
        raise ValueError(
            f"scales must be a float32 tensor of shape (2,) = [ce_scale, z_scale], got "
            f"{scales.dtype} {tuple(scales.shape)}."
        )
    if scales.device != logits.device:
        raise ValueError(f"scales is on {scales.device} but logits is on {logits.device}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}.")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}.")
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two, got {block_v}.")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}.")


def ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    scales: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    compute_grad: bool,
    inplace: bool,
    logit_scale: float | None = None,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row cross-entropy, z-loss and log-sum-exp, and optionally dL/dlogits, in one pass.

    Args:
        logits: ``(N, V)`` float32/float16/bfloat16, ``stride(1) == 1`` (any row stride).
        target: ``(N,)`` int64 class indices. A row whose target is ``ignore_index`` gives zeros;
            one outside ``[0, V)`` gives NaN (loss and gradient row), never a bad memory access.
        weight: ``(V,)`` float32 class weights, or None.
        scales: ``(2,)`` float32 on the logits' device, ``[ce_scale, z_scale]``: the gradient is
            that of ``sum_i ce_scale * ce_i + z_scale * z_i``. Read by the kernel (no host sync).
        ignore_index: target value of rows to skip.
        label_smoothing: ``eps`` in [0, 1] (PyTorch's definition, class weights included).
        z_loss: coefficient of ``lse**2`` (>= 0).
        softcap: ``softcap * tanh(x / softcap)`` is applied to the logits first, or None.
        logit_scale: the logits are multiplied by it first (before ``softcap``), or None.
        compute_grad: if False no gradient is computed and nothing of size N x V is written.
        inplace: with ``compute_grad``, write the gradient over ``logits`` and return it.
        block_v: force the vocabulary block (a power of two); None = heuristic table.
        num_splits: force the split-vocabulary path with this many chunks per row (fewer if a
            chunk would be empty; 1 = fused path); None = heuristic (1 off CUDA).

    Returns:
        ``(ce_rows, z_rows, lse)``, float32 ``(N,)`` each, and the gradient: ``(N, V)`` in the
        logits' dtype, ``logits`` itself when ``inplace``, or None without ``compute_grad``.
    """
    label_smoothing = float(label_smoothing)
    z_loss = float(z_loss)
    softcap = None if softcap is None else float(softcap)
    _check(logits, target, weight, scales, label_smoothing, z_loss, softcap, block_v, num_splits)
    N, V = logits.shape
    device = logits.device
    # Tiny (N,) / (V,) / (2,) tensors: the kernels index them with unit stride.
    target = target.contiguous()
    weight = None if weight is None else weight.contiguous()
    scales = scales.contiguous()

    ce = torch.empty(N, dtype=torch.float32, device=device)
    z = torch.empty(N, dtype=torch.float32, device=device)
    lse = torch.empty(N, dtype=torch.float32, device=device)
    grad = None
    if compute_grad:
        grad = logits if inplace else torch.empty((N, V), dtype=logits.dtype, device=device)
    if N == 0:
        return ce, z, lse, grad

    BLOCK_V, num_warps = _block_v_and_warps(V, logits.dtype, _INTERPRETED)
    if block_v is not None:
        BLOCK_V = block_v
    if num_splits is None:
        num_splits = _auto_num_splits(N, V, device)
    # Chunks of CHUNK columns (a multiple of 16); with few columns this may need fewer chunks than
    # asked for, never an empty one.
    CHUNK = triton.cdiv(triton.cdiv(V, num_splits), _CHUNK_ALIGN) * _CHUNK_ALIGN
    S = triton.cdiv(V, CHUNK)

    flags = dict(
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_Z_LOSS=z_loss > 0.0,
        HAS_SCALE=logit_scale is not None,
        HAS_SOFTCAP=softcap is not None,
    )
    scale_arg = 1.0 if logit_scale is None else float(logit_scale)
    weight_arg = weight if weight is not None else scales  # never read without HAS_WEIGHT
    grad_arg = grad if grad is not None else logits  # never written without COMPUTE_GRAD
    softcap_arg = softcap if softcap is not None else 1.0

    # Triton launches on the current CUDA device: make it the logits' one.
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        if S == 1:
            _ce_fwd_kernel[(N,)](
                logits, target, weight_arg, scales,
                ce, z, lse, grad_arg,
                V,
                logits.stride(0), grad_arg.stride(0),
                ignore_index, label_smoothing, z_loss, scale_arg, softcap_arg,
                BLOCK_V=BLOCK_V, COMPUTE_GRAD=grad is not None, **flags,
                num_warps=num_warps,
            )
            return ce, z, lse, grad

        # Split path: (N, S) fp32 partials, a few KB; smoothing sums only when they are used.
        def partials():
            return torch.empty((N, S), dtype=torch.float32, device=device)

        part_max, part_sum = partials(), partials()
        part_swx = partials() if flags["HAS_SMOOTHING"] else part_max  # unused otherwise
        part_w = partials() if flags["HAS_SMOOTHING"] and flags["HAS_WEIGHT"] else part_max
        SPLIT_BLOCK = triton.next_power_of_2(S)

        _ce_split_stats_kernel[(N, S)](
            logits, weight_arg,
            part_max, part_sum, part_swx, part_w,
            V, CHUNK,
            logits.stride(0), S,
            scale_arg, softcap_arg,
            BLOCK_V=BLOCK_V, HAS_WEIGHT=flags["HAS_WEIGHT"], HAS_SMOOTHING=flags["HAS_SMOOTHING"],
            HAS_SCALE=flags["HAS_SCALE"], HAS_SOFTCAP=flags["HAS_SOFTCAP"],
            num_warps=num_warps,
        )
        _ce_split_merge_kernel[(N,)](
            logits, target, weight_arg,
            part_max, part_sum, part_swx, part_w,
            ce, z, lse,
            V, S,
            logits.stride(0), S,
            ignore_index, label_smoothing, z_loss, scale_arg, softcap_arg,
            SPLIT_BLOCK=SPLIT_BLOCK, **flags,
            num_warps=1,
        )
        if grad is not None:
            _ce_split_grad_kernel[(N, S)](
                logits, target, weight_arg, scales, lse, part_w, grad,
                V, CHUNK, S,
                logits.stride(0), grad.stride(0), S,
                ignore_index, label_smoothing, z_loss, scale_arg, softcap_arg,
                BLOCK_V=BLOCK_V, SPLIT_BLOCK=SPLIT_BLOCK, **flags,
                num_warps=num_warps,
            )
    return ce, z, lse, grad
