"""The examples run, in their ``--quick`` mode, as a user runs them: separate processes.

The children get the environment without ``TRITON_INTERPRET`` (conftest.py turns the Triton
interpreter on for the kernel tests; the examples show what a CPU user sees) and one CPU thread
(the shapes are tiny; more threads only contend on a busy machine).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, timeout: float = 120) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_XENT_BACKEND")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_quickstart():
    out = run_example("quickstart.py")
    assert "backend   torch: input is on cpu" in out or "backend   triton" in out
    assert "OK: triton_xent matches PyTorch." in out


def test_train_tiny_lm(tmp_path):
    png = tmp_path / "curves.png"
    out = run_example("train_tiny_lm.py", "--out", str(png))
    assert "max |difference| over the curve" in out
    assert "peak memory" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0
        assert f"curves written to {png}" in out


def test_tensor_parallel():
    """2 CPU ranks (gloo, started by the example through torchrun), the LM head a DTensor sharded
    on the vocabulary, the step compiled: the loss matches the single-process run."""
    out = run_example("tensor_parallel.py", timeout=300)
    assert "the vocabulary of 1001 sharded [501, 500]" in out
    assert "OK: the tensor-parallel loss matches the single-process one" in out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_hf_patch():
    out = run_example("hf_patch.py")
    assert "OK: same loss and gradients with and without the patch." in out


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers' Trainer needs accelerate, which is not installed")
def test_hf_trainer():
    out = run_example("hf_trainer.py", timeout=300)
    assert "OK: the Trainer trains the patched model like the model." in out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_hf_memory():
    out = run_example("hf_memory.py", timeout=300)
    assert "OK: the same loss three ways." in out
    assert "patch(model)  (fused)" in out


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_hf_trl_sft():
    out = run_example("hf_trl_sft.py", timeout=300)
    assert "OK: triton_xent's SFTTrainer trains like TRL's." in out


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_grpo():
    out = run_example("grpo.py", timeout=300)
    assert "OK: triton_xent's GRPOTrainer trains like TRL's." in out
    assert "peak memory of one policy-loss step" in out
