"""Benchmarks for triton_xent: ``python -m bench`` (see bench/README.md).

Layers: ``cases`` (what is measured: shapes, inputs, minimal bytes and FLOPs), ``providers``
(one small builder per implementation, the same inputs for all), ``measure`` (timers, peak
memory, the copy and matmul rates of the same run), ``report`` (CSV, PNG, stdout table) and
``cli`` (the sweep and its flags).
"""
