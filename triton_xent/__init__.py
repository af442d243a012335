"""triton_xent: exact, fast, memory-lean cross-entropy for huge vocabularies.

``cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy``; Triton kernels run on
CUDA/ROCm tensors and a lean pure-torch backend everywhere else. Triton is imported lazily.
"""

from ._validation import CrossEntropyInputError
from .diagnostics import Diagnosis, diagnose
from .dispatch import BackendChoice, BackendUnavailableError
from .functional import CrossEntropyAux, cross_entropy, explain
from .linear import linear_cross_entropy
from .logprobs import LogProbs, linear_logprobs
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss
from .policy import PolicyLossMetrics, linear_policy_loss

__version__ = "0.1.0"

__all__ = [
    "BackendChoice",
    "BackendUnavailableError",
    "CrossEntropyAux",
    "CrossEntropyInputError",
    "CrossEntropyLoss",
    "Diagnosis",
    "LinearCrossEntropyLoss",
    "LogProbs",
    "PolicyLossMetrics",
    "cross_entropy",
    "diagnose",
    "explain",
    "linear_cross_entropy",
    "linear_logprobs",
    "linear_policy_loss",
]
