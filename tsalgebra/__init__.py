"""tsalgebra: exact, symmetry-blind similarity of tensor-based neural networks.

Models and circuits are tensor networks over the padded input x~ = [1; x];
a planner picks contraction orders and a numeric engine executes them.

    import tsalgebra as ts
    ts.similarity(a, b)                     # Gaussian, exact, labelled
    ts.similarity(a, b, inner="symmetric")  # Bombieri product at a common degree
    ts.verify(circuit, component)           # is this circuit that component?
"""

from . import algorithms, baselines, circuits, symmetries
from .attention import BilinearAttention, Transformer, position_wise
from .baselines import weight_cosine
from .matrix import cross_similarity_matrix, similarity_matrix
from .components import Bilinear, Component, Embedding, Linear, PositionWise, Sequential
from .engine import contract, evaluate
from .expr import Network, Sum, Tensor
from .inner import SimilarityPlan, inner, norm, plan_inner, plan_similarity, similarity
from .invariance import InvarianceReport, check_invariance
from .measure import Gaussian, Measure, Tokens, sequence_measure
from .planner import ContractionPlan, ContractionStep, plan, plan_cache
from .problem import CostError, InnerProblem, InnerResult, MemoryBoundError, NotApplicableError, Plan, RoundingError
from .symbolic import Polynomial, from_sympy, to_sympy
from .symmetries import Symmetry, random_symmetry
from .verify import Verification, exactify, verify

__version__ = "0.1.0"

# PyTorch adapters and checkpoints load on first use (PEP 562): they import
# torch, and `import tsalgebra` stays fast for users who never touch a module.
_TORCH_SIDE = {
    "AdapterError": "adapters", "from_torch": "adapters", "register_adapter": "adapters", "to_torch": "adapters",
    "Checkpoints": "io", "LoadError": "io", "load": "io", "save": "io",
}


def __getattr__(name: str):  # noqa: ANN201
    if name in _TORCH_SIDE:
        import importlib

        value = getattr(importlib.import_module(f".{_TORCH_SIDE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Bilinear", "BilinearAttention", "Component", "ContractionPlan", "ContractionStep", "CostError", "Embedding", "MemoryBoundError", "NotApplicableError",
    "Gaussian",
    "InnerProblem", "InnerResult", "InvarianceReport", "Linear", "Measure", "Network", "Plan", "Polynomial", "PositionWise",
    "RoundingError",
    "Sequential", "SimilarityPlan", "Sum", "Symmetry", "Tensor", "Tokens", "Transformer", "Verification", "algorithms",
    "baselines", "check_invariance", "circuits", "contract", "cross_similarity_matrix", "evaluate", "exactify",
    "from_sympy", "inner", "norm", "plan", "plan_cache", "plan_inner", "plan_similarity", "position_wise",
    "random_symmetry", "sequence_measure", "similarity", "similarity_matrix", "symmetries", "to_sympy", "verify",
    "weight_cosine",
] + list(_TORCH_SIDE)
