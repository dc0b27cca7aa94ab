"""Similarity matrices of many models at once.

:func:`similarity_matrix` (N x N) and :func:`cross_similarity_matrix` (N x M)
compute every model's norm once and every pair's inner product in batch,
from stacked weights, with batched matrix products.  The whole computation
is one tensor network with a model leg per side, e.g. for one bilinear layer

    'ahi,ahj,aoh,bki,bkj,bok->ab'   (L, R, D of model a; L, R, D of model b)

and two of its contraction orders are executed as *routes* (plus the
pairwise fallback), one module each:

- ``"pairwise-gram"`` (:mod:`.pairwise_gram`): the cross Grams of every
  pair's factors, one big matrix product per block of models, then the
  Hadamard core (for stacks: the Gram recursion batched over pairs).  About
  8 h^2 d + 2 h^2 o flops per pair.
- ``"materialize"`` (:mod:`.materialize`, one bilinear layer): each model's
  symmetric tensor formed once (about 2 o h d^2 flops per model), then one
  Gram of those (about o d^2 per pair).  Wins by a wide margin when h^2 > o d.
- ``"pairwise"`` (:mod:`.pairwise`): each norm once with
  :func:`tsalgebra.inner` and each pair with it, for anything the batched
  routes do not cover (deeper models under the gaussian or symmetric product,
  Polynomial models, exact weights (taken as floats; symbolic ones refused),
  ``method="closure"``, another ``degree``).

The flops of the batched routes are counted by the planner
(:func:`tsalgebra.planner.plan_equation`, one plan per einsum step) for the
block sizes that fit the memory bound ``max_memory``; ``route="auto"`` takes
the cheaper route that fits, and the result says which route ran and what
each candidate would have cost.  Every route follows one interface
(:class:`.job.Route`: ``applies``, ``layout``, ``run`` returning a
:class:`.job.Gram`), and :data:`.api.REGISTRY` lists them.

Modules: :mod:`.api` (the public functions), :mod:`.results` (what they
return), :mod:`.job` (the route interface), :mod:`.prepare` (models as
normalized chains; the Gaussian measure), :mod:`.ops` (numpy/torch arrays,
worker threads, the clock), :mod:`.costs` (planner flop counts), and the
routes.

Engines: with ``device=None`` the inputs and the result are numpy and the
routes compute in numpy, where large ones run one worker thread per BLAS
thread, each with a single BLAS thread (materialize: groups of models and of
features; pairwise-gram: block pairs in turn); stacks on a single BLAS thread
compute in torch on the CPU.  ``device="numpy"`` forces numpy throughout.  A
torch device (``"cpu"``, ``"cuda"``...) computes everything in torch there.

Scale: each factor is divided by its Frobenius norm before anything is
formed, and in stacks each intermediate Gram G[a, b] by sqrt(|G[a,a]| |G[b,b]|);
the cosine is invariant to both, the norms are rebuilt in float64 logarithms.
So float32 and vocabulary-scale outputs do not overflow.
"""

from .api import ROUTES, cross_similarity_matrix, similarity_matrix
from .results import RouteCost, SimilarityMatrix, StepTime

__all__ = ["SimilarityMatrix", "RouteCost", "StepTime", "similarity_matrix", "cross_similarity_matrix", "ROUTES"]
