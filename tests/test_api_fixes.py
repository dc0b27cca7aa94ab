"""Python API arguments and notes found by probing as a user (each test fails before its fix)."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts


@pytest.mark.parametrize("bad,says", [("tokens", "got 'tokens'"), (ts.Tokens, "the class Tokens, not an instance"),
                                      (3, "got 3")])
def test_a_measure_of_the_wrong_type_is_named(bad, says):
    """It was blamed on inner='gaussian', which the user never gave ('leave
    inner out')."""
    m = ts.Linear(np.ones((1, 4)))
    for call in (lambda: ts.similarity(m, m, measure=bad), lambda: ts.check_invariance(m, m, measure=bad),
                 lambda: ts.similarity_matrix([m, m], measure=bad, progress=False)):
        with pytest.raises(TypeError, match="measure must be a ts.Gaussian.* or ts.Tokens") as err:
            call()
        assert says in str(err.value) and "inner=" not in str(err.value)


def test_a_dtype_a_route_does_not_compute_in_is_said():
    """float32 asked of the node-gram and pairwise routes (float64 only) was
    dropped without a word."""
    rng = np.random.default_rng(0)
    models = [ts.Bilinear(rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(2, 3))) for _ in range(3)]
    for route in ("node-gram", "pairwise"):
        m = ts.similarity_matrix(models, measure=ts.Tokens(3, 2), dtype="float32", route=route, progress=False)
        assert m.values.dtype == np.float64 and m.exact
        assert f"dtype float32 does not apply to the {route} route: computed in float64" in m.notes
    m = ts.similarity_matrix(models, measure=ts.Tokens(3, 2), route="pairwise", progress=False)
    assert not any("dtype" in n for n in m.notes)


def test_an_unseeded_estimate_reports_the_seed_it_drew():
    """'300 samples (seed None)': an unseeded estimate could not be rerun."""
    rng = np.random.default_rng(0)
    a, b = (ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))) for _ in range(2))
    r = ts.similarity(a, b, method="sampled", samples=300)
    seed = r.estimate.seed
    assert isinstance(seed, int) and f"300 samples (seed {seed})" in r.notes
    again = ts.similarity(a, b, method="sampled", samples=300, seed=seed)
    assert again.value == r.value and again.stderr == r.stderr


def test_exact_weights_give_exact_values_per_output_too():
    """Per output, the norm and the similarity of Fraction weights came out as
    float64, labelled exact, where the whole model's are sympy numbers."""
    import sympy
    from fractions import Fraction as F

    def o(*rows):
        return np.array(rows, dtype=object)

    m = ts.Bilinear(o([F(1), F(0)], [F(0), F(1)]), o([F(1), F(0)], [F(1), F(1)]), o([F(1), F(0)], [F(0), F(2)]))
    c = ts.Bilinear(o([F(1), F(0)], [F(0), F(1)]), o([F(1), F(0)], [F(1), F(2)]), o([F(1), F(0)], [F(0), F(1)]))
    norms = ts.norm(m, per_output=True)
    assert norms.exact and list(norms.value) == [sympy.sqrt(3), 4]
    sims = ts.similarity(m, c, per_output=True)
    assert sims.exact and list(sims.value) == [1, 7 * sympy.sqrt(13) / 26]
    floats = ts.similarity(*(x.map_weights(lambda w: np.asarray(w, dtype=float)) for x in (m, c)), per_output=True)
    np.testing.assert_allclose(np.asarray(sims.value, dtype=float), floats.value, rtol=1e-14)
    dead = c.replace(down=o([F(1), F(0)], [F(0), F(0)]))
    with pytest.warns(RuntimeWarning, match="zero norm"):
        r = ts.similarity(m, dead, per_output=True)
    assert r.value[0] == 1 and np.isnan(float(r.value[1]))
