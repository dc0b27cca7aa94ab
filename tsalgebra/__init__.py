"""tsalgebra: exact, symmetry-blind similarity of tensor-based neural networks.

Models and circuits are tensor networks over the padded input x~ = [1; x];
a planner picks contraction orders and a numeric engine executes them.
"""

from .components import Bilinear, Component, Linear, Sequential
from .engine import contract, evaluate
from .expr import Network, Sum, Tensor
from .planner import ContractionPlan, ContractionStep, plan, plan_cache

__all__ = [
    "Bilinear",
    "Component",
    "ContractionPlan",
    "ContractionStep",
    "Linear",
    "Network",
    "Sequential",
    "Sum",
    "Tensor",
    "contract",
    "evaluate",
    "plan",
    "plan_cache",
]

__version__ = "0.1.0"

from .inner import CostError, InnerResult, inner, norm, similarity  # noqa: E402

__all__ += ["CostError", "InnerResult", "inner", "norm", "similarity"]

from . import circuits  # noqa: E402
from .symbolic import Polynomial, from_sympy, to_sympy  # noqa: E402
from .verify import Verification, exactify, verify  # noqa: E402

__all__ += ["Polynomial", "Verification", "circuits", "exactify", "from_sympy", "to_sympy", "verify"]
