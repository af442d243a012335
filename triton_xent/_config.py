"""Process-wide tuning overrides. ``None`` means: use the launcher's heuristic.

Tests set these to small values so that the multi-block, split-vocabulary and multi-chunk paths
run on small shapes; users normally leave them alone.
"""

TRITON_BLOCK_V: int | None = None  # vocabulary block of the Triton kernel
TRITON_NUM_SPLITS: int | None = None  # programs per row (split-vocabulary path)
TORCH_CHUNK_ROWS: int | None = None  # rows per chunk of the torch backend
