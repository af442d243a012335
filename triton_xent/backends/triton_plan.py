"""The launch plan of the Triton backend: one function, :func:`plan`, decides every launch
parameter of a call from the shape, the dtype, the options' register needs and the device, by the
knob table below; :func:`scale_grid` is the in-place scale's grid. Tests, the traffic meter and
the compile report (``python -m bench --compile-report``) import them; nothing here launches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from .protocol import Options

# ----------------------------------------------------------------------------------------------
# The launch plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """What the plan needs to know of a GPU."""

    name: str
    sms: int
    l2_bytes: int


# Off CUDA (the interpreter, the traffic meter) the plan is made for this GPU, so that the CPU runs
# and counts exactly what an H100 would launch.
H100 = DeviceSpec("H100 SXM (planning model)", 132, 50 << 20)


@functools.lru_cache(maxsize=64)
def cuda_spec(device: torch.device) -> DeviceSpec:
    """The plan's view of a CUDA device (the launcher's ``device_spec`` asks it)."""
    props = torch.cuda.get_device_properties(device)  # cached by torch, no sync
    return DeviceSpec(props.name, props.multi_processor_count,
                      int(getattr(props, "L2_cache_size", H100.l2_bytes)))


class Plan(NamedTuple):
    """Launch parameters of one call. ``path``: ``"fused"`` (grid ``programs``, persistent over
    rows) or ``"split"`` (grid ``N * splits`` of ``chunk`` columns each)."""

    path: str
    block_v: int
    num_warps: int
    single_block: bool
    programs: int
    splits: int
    chunk: int


# The knobs, in one table. UNTUNED: no GPU has measured them yet; each value follows a rule of
# thumb stated here, and a GPU session replaces them with measurements (bench/gpu_check.sh).
#
#   knob                  | value                         | why
#   ----------------------+-------------------------------+----------------------------------------
#   SINGLE_BLOCK_MAX      | 16384 columns, 32 per thread  | the whole row in registers, read once (4
#   (one read per logit)  | (16 warps); 8192 with options | B/logit bf16 with the gradient). No
#                         | that need registers, 16 per   | spill (bench/compile_report.py): 32 fp32
#                         | thread (16 warps)             | values per thread plus the working set
#                         |                               | take 80-128 registers; 32768 columns
#                         |                               | would need 32 per thread at 32 warps,
#                         |                               | where a thread has 64 registers: it
#                         |                               | spills 150 B (plain) to 4.4 KB (every
#                         |                               | option) per thread. Longer rows: two
#                         |                               | sweeps, the second from L2
#   BLOCK_V (two sweeps)  | 32768 at 32 warps (16-bit;    |
#                         | fp32: 16384 at 16, the same   |
#                         | 64 KB); 8192 at 8 (forward    | bytes in flight: one program per SM (the
#                         | only: 16) warps with options  | L2 rule below) must keep >= 32 KB of
#                         | that need registers (smooth-  | loads in flight to near the copy
#                         | ing, z-loss, logit transform, | bandwidth (Little's law: ~3 TB/s x ~1 us
#                         | weights, argmax)              | / 132 SMs ~ 23 KB): 32768 bf16 = 64 KB
#                         |                               | (56 registers, no spill); with options
#                         |                               | it spills above 8192 (16 KB in flight:
#                         |                               | the model says ~2.2 TB/s at most).
#                         |                               | Not done: loads one block ahead (a
#                         |                               | tl.range(num_stages=2) sweep: cp.async
#                         |                               | into 64 KB of shared memory, 128 KB in
#                         |                               | flight) compiles clean without options
#                         |                               | but spills 16 B in the finish with
#                         |                               | every option (triton 3.9); a GPU run
#                         |                               | should decide
#   BLOCK_V (split path)  | 8192 at 8 warps               | chunks of 8-17K columns
#   BLOCK_V (backward     | at most 16384 (16 warps)      | 32768 at 32 warps spills 80 B per thread
#   recompute, "none")    |                               | under triton 3.6 (64 registers)
#   programs per SM       | what the registers allow:     | a persistent grid must fit one wave, or
#   (persistent grids)    | 64K / (block threads x        | its last programs run alone after the
#                         | PLAN_REGS), PLAN_REGS = 128   | others (twice the time). The compiled
#                         | (64 at 1024 threads): 1 at    | kernels use 58-128 registers per thread
#                         | 16-32 warps, 2 at 8, 4 at 4;  | (bench/compile_report.py checks each
#                         | two sweeps: also as many rows | launch: no grid above what fits). Two
#                         | as half the L2 holds (1..2)   | sweeps: the rows in flight (programs x
#                         |                               | row bytes) stay under half the L2, so the
#                         |                               | second sweep hits L2 (evict_last, then
#                         |                               | evict_first). Where they outgrow it
#                         |                               | (V=262144: 132 x 512 KB = 69 MB) the
#                         |                               | gradient sweep runs backwards, from what
#                         |                               | is likeliest still cached. Forward only
#                         |                               | reads once (the L2 rule does not bind);
#                         |                               | the registers hold every two-sweep
#                         |                               | block to one program per SM anyway, so
#                         |                               | the plan needs no gradient flag
#   split path            | rows > SINGLE_BLOCK_MAX and   | too few rows to fill the SMs; between
#                         | N < SMs, or N < 2 x SMs with  | SMs and 2 x SMs rows the split path's
#                         | N x V bytes <= half the L2    | re-read (N x V live) must hit L2, else
#                         |                               | the fused path (132 rows live) is used
#   splits S              | ceil(2 x SMs / N), capped at  | about two waves of programs; a chunk
#                         | V / 8192 and 64               | keeps >= 8192 columns (fixed costs small)
#   chunk                 | multiple of 16 columns        | aligned vector loads (Triton's divisibility
#                         |                               | specialization sees CHUNK % 16 == 0)
#   finish grid           | min(N x S, SMs x threads per  | persistent: the backward at upstream 1
#   (merge + gradient)    | SM / block threads)           | is one launch of a few programs per SM,
#                         |                               | each reading its items' g in one vector
#                         |                               | load and stopping (no program per row)
#   scale_ grid           | min(units, SMs x 4), 8 warps; | persistent: g read once per unit, one
#                         | a unit = a row, or a share of | launch of <= 4 programs per SM whatever
#                         | one (rows < programs)         | the size (dW is V x D)
SINGLE_BLOCK_MAX = 16384
SINGLE_BLOCK_MAX_HEAVY = 8192
BLOCK_V_TWO_SWEEPS = 32768
BLOCK_V_TWO_SWEEPS_HEAVY = 8192
SPLIT_BLOCK_V = 8192
FINISH_BLOCK_V = 16384
SPLIT_MIN_CHUNK = 8192
SPLIT_MAX = 64
CHUNK_ALIGN = 16
THREADS_PER_SM = 2048
REGS_PER_SM = 65536
PLAN_REGS = 128  # registers per thread the plan assumes a kernel may use (checked offline)
PLAN_REGS_HEAVY = 176  # the same with a logit transform, class weights or argmax
BLOCK_N = 1024  # targets per step of the denominators' and the finalize's loops


def _warps_for_block(block: int, per_thread: int = 32) -> int:
    return max(4, min(32, block // (32 * per_thread)))


@functools.lru_cache(maxsize=256)
def programs_per_sm(num_warps: int, heavy: bool = False) -> int:
    """Programs of ``num_warps`` warps that fit one SM at once, by threads and by registers at
    ``PLAN_REGS`` (``heavy``: ``PLAN_REGS_HEAVY``) per thread (a 1024-thread program may use at
    most 64)."""
    threads = 32 * num_warps
    regs = min(PLAN_REGS_HEAVY if heavy else PLAN_REGS, REGS_PER_SM // threads)
    return max(1, min(THREADS_PER_SM // threads, REGS_PER_SM // (threads * regs)))


@functools.lru_cache(maxsize=1024)
def persistent_programs(work: int, num_warps: int, spec: DeviceSpec = H100,
                        heavy: bool = False) -> int:
    """Programs of a persistent grid over ``work`` items: as many as fit the SMs at once (one
    wave), never more than the items."""
    return max(1, min(work, spec.sms * programs_per_sm(num_warps, heavy)))


@functools.lru_cache(maxsize=256)
def kernel_flags(opts: Options, has_weight: bool) -> dict:
    """The kernels' feature flags (constexprs) of a call's options: the logit transform as the
    backends apply it, the temperature folded in (``Options.transform``)."""
    scale, softcap = opts.transform()
    return dict(
        HAS_WEIGHT=has_weight,
        HAS_SMOOTHING=opts.label_smoothing > 0.0,
        HAS_SCALE=scale is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_ARGMAX=bool(opts.argmax),
        HAS_ENTROPY=bool(opts.entropy),
    )


@functools.lru_cache(maxsize=256)
def heavy_features(opts: Options, has_weight: bool) -> bool:
    """Whether the kernels run with a feature whose code needs more registers: any flag of
    :func:`kernel_flags`, or the z-loss (bench/compile_report.py: 141-175 per thread at 8 warps
    with every feature, 48-111 without; a 32768-column block spills with any of them)."""
    return opts.z_loss > 0.0 or any(kernel_flags(opts, has_weight).values())


@functools.lru_cache(maxsize=1024)
def plan(N: int, V: int, dtype: torch.dtype, spec: DeviceSpec = H100, *,
         block_v: int | None = None, num_splits: int | None = None,
         heavy: bool = False, grad: bool = True) -> Plan:
    """The launch plan of one call (see the table above). ``block_v`` / ``num_splits`` force a
    block size (a power of two) or a number of chunks per row (1 = fused path), for tests;
    ``heavy``: the options need more registers (:func:`heavy_features`); ``grad``: the
    gradient is computed in this call (the plan picks warps by what compiles without spills)."""
    elt = torch.empty((), dtype=dtype).element_size()
    V = max(V, 1)
    forced = block_v
    if block_v is None:
        full = triton.next_power_of_2(V)
        single = full <= (SINGLE_BLOCK_MAX_HEAVY if heavy else SINGLE_BLOCK_MAX)
        # two sweeps may use one block as wide as the row (V <= 32768): read twice, not held
        block_v = full if single else min(full, BLOCK_V_TWO_SWEEPS_HEAVY if heavy
                                          else BLOCK_V_TWO_SWEEPS * 2 // elt)
    else:
        single = block_v >= V
    # values per thread: 32, or 16 with heavy options (on two sweeps with the gradient 8 warps:
    # at 16 they spill 56 B under triton 3.6, at 8 without the gradient 16-68 B)
    warps = _warps_for_block(block_v, 16 if heavy and (single or not grad) else 32)
    if num_splits is None:
        num_splits = 1
        # few long rows: split them, unless the SMs are filled anyway (N >= SMs) and the
        # partials -> finish re-read would miss L2 (the whole N x V live between the two)
        if not single and (N < spec.sms or (N < 2 * spec.sms
                                            and N * V * elt <= spec.l2_bytes // 2)):
            want = triton.cdiv(2 * spec.sms, max(N, 1))
            num_splits = max(1, min(want, V // SPLIT_MIN_CHUNK, SPLIT_MAX))
    chunk = triton.cdiv(triton.cdiv(V, num_splits), CHUNK_ALIGN) * CHUNK_ALIGN
    splits = triton.cdiv(V, chunk)
    if splits > 1:
        if forced is None:
            block_v = min(block_v, SPLIT_BLOCK_V)
            warps = _warps_for_block(block_v)
        return Plan("split", block_v, warps, False, N * splits, splits, chunk)
    per_sm = programs_per_sm(warps, heavy)
    if not single:
        per_sm = max(1, min(per_sm, 2, spec.l2_bytes // 2 // max(1, spec.sms * V * elt)))
    return Plan("fused", block_v, warps, single, max(1, min(N, spec.sms * per_sm)), 1, V)


SCALE_BLOCK = 4096
SCALE_WARPS = 8
SCALE_PER_SM = 4


@functools.lru_cache(maxsize=1024)
def scale_grid(rows: int, row_len: int, spec: DeviceSpec = H100) -> tuple[int, int, int]:
    """``(programs, parts, blocks)`` of :func:`scale_`: ``blocks`` of ``SCALE_BLOCK`` per row,
    each row cut into ``parts`` units (several when there are fewer rows than programs), and a
    persistent grid of at most ``SCALE_PER_SM`` programs per SM over the units."""
    target = spec.sms * SCALE_PER_SM
    blocks = triton.cdiv(row_len, SCALE_BLOCK)
    parts = max(1, min(blocks, triton.cdiv(target, max(rows, 1))))
    return max(1, min(rows * parts, target)), parts, blocks
