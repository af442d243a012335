"""Pure-torch backends: the CPU path and the fallback for what the Triton kernels do not cover."""
