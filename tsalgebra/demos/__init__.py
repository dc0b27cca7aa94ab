"""Demonstrations that run from nothing but this package (and, for the
backdoor, scikit-learn's bundled digits):

- :mod:`tsalgebra.demos.grokking`: a one-layer bilinear model groks modular
  addition; tensor similarity over its checkpoints against logit cosine on
  all inputs and flattened-weight cosine.
- :mod:`tsalgebra.demos.backdoor`: a bilinear digit classifier fine-tuned
  with a trigger; which class changed, seen from the weights alone.
- :mod:`tsalgebra.demos.language`: a two-layer bilinear-attention language
  model learns induction; its checkpoints (in the papers' layout) compared
  under the token and Gaussian measures, layer by layer, by behaviour and by
  weights.

Each is run by ``tsalgebra demo grokking|backdoor|language`` and write a figure, a
text summary and a JSON file of the numbers into their output directory.
"""

DEMOS = ("grokking", "backdoor", "language")

__all__ = ["DEMOS"]
