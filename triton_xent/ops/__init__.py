"""Launchers: plain torch functions that check, allocate, pick block sizes and launch kernels."""
