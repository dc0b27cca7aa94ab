"""The inner-product algorithms, one module each, in one registry.

Registry order is the order in which :func:`choose` plans the candidates
(cheap plans first, so that the pairing enumeration, whose planning walks
every orbit, is planned against the best estimate so far):

- ``moments`` (exact): attention layers under a per-position Gaussian, by
  Isserlis over Gram blocks (polynomial in every width);
- ``hermite`` (exact): the same models by Hermite coefficients, for small
  per-position ranks (its independent twin);
- ``gram`` (exact): the network inner product;
- ``closure`` (approximate beyond the first nonlinear layer);
- ``quadrature`` (exact): Gauss-Hermite nodes, exponential in the input rank;
- ``token-moments`` (exact): one attention layer under the token measure,
  polynomial in the vocabulary;
- ``enumeration`` (exact): every token sequence of the token measure;
- ``pairings`` (exact): pairing orbits, exponential in the input copies;
- ``sampled`` (estimated): Monte Carlo with standard errors, for every
  model; only when ``method="sampled"`` asks for it.

A new algorithm is a module with an :class:`Algorithm` subclass and a
:func:`register` call (see docs/architecture.md).
"""

from .closure import GaussianClosure
from .enumeration import Enumeration
from .gram import GramRecursion
from .hermite import HermiteMoments
from .moments import AttentionMoments
from .pairings import PairingOrbits
from .quadrature import Quadrature
from .sampled import Sampled
from .token_moments import TokenMoments
from .registry import Algorithm, Triple, choose, describe, register, registered, run, solve, unregister

__all__ = ["Algorithm", "Triple", "choose", "describe", "register", "registered", "run", "solve", "unregister"]

for _algorithm in (AttentionMoments(), HermiteMoments(), GramRecursion(), GaussianClosure(), Quadrature(),
                   TokenMoments(), Enumeration(), PairingOrbits(), Sampled()):
    register(_algorithm)
