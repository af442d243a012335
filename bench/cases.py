"""What is measured: one point (a :class:`Case`), the curves it belongs to (a :class:`Series`),
and the seeded inputs of a case."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

OPS = ("cross_entropy", "linear_cross_entropy")
MODES = ("fwd", "fwd_bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 1234


@dataclass(frozen=True)
class Case:
    """One point of the sweep. ``D`` is 0 for ``cross_entropy`` (logits are the input);
    ``softcap`` 0 means none (else logits become ``softcap * tanh(logits / softcap)``)."""

    op: str
    mode: str
    dtype: str
    N: int
    V: int
    D: int
    device: str
    softcap: float = 0.0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def cap(self) -> float | None:
        return self.softcap or None

    def shape(self) -> str:
        """The sizes alone, e.g. ``N=8192 D=4096 V=128256 softcap=30``."""
        d = f" D={self.D}" if self.op == "linear_cross_entropy" else ""
        cap = f" softcap={self.softcap:g}" if self.softcap else ""
        return f"N={self.N}{d} V={self.V}{cap}"

    def label(self) -> str:
        return f"{self.op} {self.mode} {self.dtype} {self.shape()}"

    def to_dict(self) -> dict:
        return asdict(self)

    def min_bytes(self) -> int:
        """Least traffic of a cross-entropy over (N, V) logits: read once, gradient written once.

        The targets (N int64) are negligible next to N*V and left out.
        """
        reads = self.N * self.V * self.elt
        return reads if self.mode == "fwd" else 2 * reads

    def flops(self) -> int:
        """2*N*D*V per GEMM: logits in forward; d_input and d_weight in backward."""
        gemms = 1 if self.mode == "fwd" else 3
        return gemms * 2 * self.N * self.D * self.V


@dataclass(frozen=True)
class Series:
    """One curve per provider: cases that differ in one size, ``x_name`` (``"V"`` or ``"N"``),
    or a list of named shapes (``x_name="shape"``, a categorical axis)."""

    x_name: str
    cases: tuple[Case, ...]

    def x(self, case: Case):
        """The case's position on this series' axis (an int, or its shape for ``"shape"``)."""
        return case.shape() if self.x_name == "shape" else getattr(case, self.x_name)

    def fixed(self) -> str:
        """The sizes shared by every case of the series, e.g. ``N=8192`` for a curve against V."""
        c = self.cases[0]
        if self.x_name == "shape":
            return " ".join(w for w in c.shape().split()
                            if all(w in o.shape().split() for o in self.cases))
        return " ".join(w for w in c.shape().split() if not w.startswith(self.x_name + "="))


@dataclass
class Inputs:
    """The tensors of one case. ``leaves`` get their ``.grad`` dropped between calls."""

    tensors: dict[str, torch.Tensor]
    leaves: list[torch.Tensor]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def clone(self) -> Inputs:
        """Fresh copies, for providers that overwrite their input (Liger writes the gradient
        over the logits)."""
        out = {}
        for k, t in self.tensors.items():
            c = t.detach().clone()
            c.requires_grad_(t.requires_grad)
            out[k] = c
        return Inputs(out, [t for t in out.values() if t.requires_grad])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def make_inputs(case: Case) -> Inputs:
    """Seeded inputs, identical for every provider.

    Logits are N(0, 1); for the linear op the hidden states are N(0, 1) and the classifier
    N(0, 1/D), so the logits again have unit variance. Targets are uniform over the vocabulary.
    """
    dev, dt = torch.device(case.device), case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(SEED)  # generated where they live: fast on GPU

    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, device=dev, dtype=dt)
        if scale != 1.0:
            t.mul_(scale)
        # fwd is timed as in training: inputs require grad and the graph is recorded
        return t.requires_grad_(True)

    target = torch.randint(0, case.V, (case.N,), generator=g, device=dev)
    if case.op == "cross_entropy":
        tensors = {"logits": randn(case.N, case.V), "target": target}
    else:
        tensors = {
            "x": randn(case.N, case.D),
            "w": randn(case.V, case.D, scale=case.D ** -0.5),
            "target": target,
        }
    return Inputs(tensors, [t for t in tensors.values() if t.requires_grad])
