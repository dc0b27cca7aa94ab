"""Long token contexts, huge numeric arguments, the Monte Carlo refusal's
suggestions, per-output estimates and dead channels, division by zero in
formulas and measures: each a defect a probe found."""

from __future__ import annotations

import math
import time
import types
import warnings

import numpy as np
import pytest
import sympy

import tsalgebra as ts
from helpers import dead_channel_pair
from tsalgebra.algorithms.enumeration import Enumeration
from tsalgebra.algorithms.sampled import Sampled
from tsalgebra import measure as measures
from tsalgebra.problem import Alternative, check_sampling, checked_budget, checked_memory, format_count


def w(rng, *shape, scale=1.0):
    return scale * rng.normal(size=shape) / np.sqrt(shape[-1])


def bilinear_pair(seed=0, d=3, out=2):
    rng = np.random.default_rng(seed)
    return tuple(ts.Bilinear(w(rng, 4, d), w(rng, 4, d), w(rng, out, 4)) for _ in range(2))


def stack_pair(seed=5):
    """Two residual bilinear layers: a model with a control variate."""
    rng = np.random.default_rng(seed)

    def model():
        return ts.Sequential(ts.Bilinear(w(rng, 4, 3), w(rng, 4, 3), w(rng, 3, 4), residual=True),
                             ts.Bilinear(w(rng, 4, 3, scale=0.2), w(rng, 4, 3), w(rng, 3, 4), residual=True),
                             ts.Linear(w(rng, 2, 3)))

    return model(), model()


# ------------------------------------------------------------ long contexts


def test_the_count_of_token_sequences_is_compared_in_log_space():
    """vocab**n_ctx was formed exactly to be compared with 1e9: 2.9 s at
    n_ctx = 1e5, minutes at 3e6 (plan printed nothing)."""
    t = time.perf_counter()
    measure = ts.Tokens(32, 100_000)
    assert measure.log10_sequences == pytest.approx(100_000 * math.log10(32))
    with pytest.raises(ts.CostError, match=r"would visit about 10\^150514 token sequences") as err:
        Enumeration().plan(types.SimpleNamespace(measure=measure), 2e11)
    assert "e150514.5" not in str(err.value)
    with pytest.raises(ValueError, match=r"about 10\^150514 token sequences, too many to count exactly"):
        measure.sequences
    assert time.perf_counter() - t < 1.0
    # small counts stay exact, with each position's support
    assert ts.Tokens(3, 4).sequences == 81
    probs = np.array([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]])
    assert ts.Tokens(3, probs=probs).sequences == 6
    assert ts.Tokens(3, 5, probs=[0.5, 0.0, 0.5]).sequences == 32
    assert ts.Tokens(3, 5, probs=[0.5, 0.0, 0.5]).log10_sequences == pytest.approx(5 * math.log10(2))


def test_huge_counts_print_as_powers_of_ten():
    assert format_count(32**30000) == "3.16e+45154"  # was 1e45154.5
    assert format_count(-(10**400)) == "-1e+400" and format_count(10**400 - 1) == "1e+400"
    assert measures.format_power(150.5) == "about 3.16e+150" and measures.format_power(150515.4) == "about 10^150515"


def test_a_context_no_algorithm_could_use_is_refused_naming_n_ctx():
    """n_ctx = 3e6 at a vocabulary of 32: 96e6 one-hot features, one input
    768 MB; planning what would be refused took minutes."""
    with pytest.raises(ValueError, match=r"n_ctx=3000000: .* at most 524,288 tokens at this vocabulary"):
        ts.Tokens(32, 3_000_000)
    assert ts.Tokens(32, measures.MAX_TOKEN_FEATURES // 32).n_ctx == 524_288
    with pytest.raises(ValueError, match="n_ctx=2: .* one-hot features, more than"):
        ts.Tokens(measures.MAX_TOKEN_FEATURES, 2)
    with pytest.raises(ValueError, match="one-hot features, more than"):  # bound to a model's width
        ts.Tokens(32).at(32 * (measures.MAX_TOKEN_FEATURES // 32 + 1))


def test_monte_carlo_over_the_budget_is_refused_before_its_control_variate_is_planned(monkeypatch):
    """The control variate's exact plan (token moments at a long context:
    minutes) was made before the plain estimator's cost was compared."""
    a, b = stack_pair()

    def planned(*args):
        raise AssertionError("the control variate was planned")

    monkeypatch.setattr(Sampled, "_control", staticmethod(planned))
    with pytest.raises(ts.CostError, match="Monte Carlo with 10,000 samples would cost"):
        ts.plan_inner(a, b, method="sampled", budget=1e5, seed=0)


def test_a_budget_for_plain_monte_carlo_is_not_refused_for_its_control_variate():
    """A budget that affords the samples without the control variate ran
    nothing: the control variate is optional, and is dropped instead."""
    a, b = stack_pair()
    full = ts.plan_inner(a, b, method="sampled", samples=2000, seed=0)
    plan = full.plans[0] if hasattr(full, "plans") else full
    assert plan.facts["control_variate"]
    from tsalgebra.algorithms.sampled import PILOT
    from tsalgebra.node_sums import Forward

    batch = plan.facts["batch"]
    plain = (Forward(a).flops(batch) + Forward(b).flops(batch)) / batch + 4.0 * 3
    budget = (2000 + PILOT) * plain * 1.01
    assert budget < plan.flops
    r = ts.inner(a, b, method="sampled", samples=2000, seed=0, budget=budget)
    assert any("control variate: none (its exact products" in n for n in r.notes) and r.samples == 2000


# ------------------------------------------------------------ numeric arguments


@pytest.mark.parametrize("value", [1e20, 10**20, 1e300, 10**400, np.float64(1e20), np.uint64(2**64 - 1)])
def test_a_huge_max_memory_is_a_bound_no_plan_reaches(value):
    """max_memory >= 2**63 raised numpy's "ufunc 'isfinite' not supported"
    (the bound, converted to an int, was checked again)."""
    assert checked_memory(checked_memory(value)) == checked_memory(value) >= 10**19
    a, b = bilinear_pair()
    assert ts.similarity(a, b, max_memory=value).value == ts.similarity(a, b).value
    est = ts.similarity(a, b, max_memory=value, method="sampled", samples=100, seed=0)
    assert est.value == ts.similarity(a, b, method="sampled", samples=100, seed=0).value


@pytest.mark.parametrize("value", [float("inf"), float("nan"), np.float32("nan"), True, np.bool_(True), "1e9", 0,
                                   0.5, -1, [1e9]])
def test_a_bad_max_memory_is_named(value):
    with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
        checked_memory(value)


def test_the_budget_takes_any_magnitude_and_names_itself():
    assert checked_budget(10**400) == math.inf and checked_budget(np.int64(3)) == 3.0
    assert checked_budget(np.float32(1e12)) == pytest.approx(1e12)
    for bad in (float("nan"), True, np.bool_(False), "1e9", -1, None):
        with pytest.raises(ValueError, match="budget must be a non-negative number"):
            checked_budget(bad)


def test_options_of_the_wrong_kind_are_named():
    a, b = bilinear_pair()
    check_sampling("sampled", {"rel_error": np.float32(0.1)})  # numpy's float32 was refused
    for bad in (True, float("nan"), 1, "0.1"):
        with pytest.raises(ValueError, match="rel_error must be a number in"):
            check_sampling("sampled", {"rel_error": bad})
    for name, bad in (("per_output", "yes"), ("centered", 1), ("orbits", None)):
        with pytest.raises(ValueError, match=f"{name} must be True or False"):
            ts.inner(a, b, **{name: bad})
    assert ts.inner(a, b, centered=np.bool_(True)).centered is True
    with pytest.raises(ValueError, match="degree must be a positive integer"):
        ts.inner(a, b, inner="symmetric", degree=2.0)
    with pytest.raises(ValueError, match="degree= belongs to inner='symmetric'"):
        ts.inner(a, b, degree=3)  # silently ignored before
    assert ts.inner(a, b, inner="symmetric", degree=np.int64(3)).value == ts.inner(a, b, inner="symmetric",
                                                                                   degree=3).value


# ------------------------------------------------------------ Monte Carlo refusals


def test_the_refusals_suggested_samples_are_an_integer_the_option_accepts():
    """samples=3.09e+08 was suggested, and refused: "samples must be an integer"."""
    rng = np.random.default_rng(2)
    a, b = (ts.Sequential(ts.Bilinear(w(rng, 4, 3), w(rng, 4, 3), w(rng, 2, 4))) for _ in range(2))
    with pytest.raises(ts.CostError) as err:
        ts.similarity(a, b, method="sampled", rel_error=1e-9, budget=1e9, seed=0)
    alts = {alt.option: alt for alt in err.value.alternatives}
    samples = alts["samples"].value
    assert isinstance(samples, int) and alts["samples"].spelled() .startswith(f"samples={samples} (")
    assert alts["samples"].spelled(cli=True).startswith(f"--samples {samples} (")
    check_sampling("sampled", {"samples": int(alts["samples"].spelled().split("=")[1].split()[0])})
    # the budget and the target, as printed, still admit what they were made for
    needed_flops = err.value.flops
    assert float(alts["budget"].spelled().split("=")[1].split()[0]) >= needed_flops
    printed = float(alts["rel_error"].spelled().split("=")[1].split()[0])
    assert 0 < printed < 1 and printed >= alts["rel_error"].value * (1 - 1e-12)


def test_integers_are_spelled_as_digits_everywhere():
    assert Alternative("samples", 308959323).spelled() == "samples=308959323"
    assert Alternative("samples", np.int64(5)).spelled(cli=True) == "--samples 5"
    assert Alternative("budget", 1.43e15).spelled() == "budget=1.43e+15"
    assert Alternative("method", "closure").spelled() == "method='closure'"


# ------------------------------------------------------------ per-output results


def test_per_output_estimates_print_their_errors():
    a, b = bilinear_pair(out=3)
    for r in (ts.similarity(a, b, per_output=True, method="sampled", samples=200, seed=0),
              ts.inner(a, b, per_output=True, method="sampled", samples=200, seed=0)):
        text = repr(r)
        listed = text.split("  [")[0]
        assert listed.count("±") == 3, text
        for v, e in zip(r.value, r.stderr):
            assert f"{v:.6g} ± {e:.2g}" in listed
    many = ts.inner(*bilinear_pair(out=14), per_output=True, method="sampled", samples=100, seed=0)
    assert "... (14 outputs)" in repr(many) and repr(many).count("±") == 10
    assert "±" not in repr(ts.inner(a, b, per_output=True))  # exact: the array as it was


@pytest.mark.parametrize("kw, note", [({}, "some output channels have zero norm; their similarity is NaN"),
                                      ({"method": "sampled", "samples": 300, "seed": 0},
                                       "some output channels have a self-product estimated at or below 0")])
def test_a_dead_output_channel_is_said_in_the_notes_too(kw, note):
    a, b = dead_channel_pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = ts.similarity(a, b, per_output=True, **kw)
    assert np.isnan(r.value[1]) and not np.isnan(r.value[0])
    assert any(str(c.message).startswith(note) for c in caught)  # the warning stays
    assert sum(n.startswith(note) for n in r.notes) == 1
    from dataclasses import replace

    assert sum(n.startswith(note) for n in replace(r, flops=1).notes) == 1  # not repeated by a copy
    assert not any("NaN" in n for n in ts.similarity(a, a, per_output=True).notes)


# ------------------------------------------------------------ division by zero


@pytest.mark.parametrize("formula, match", [("3/0 + x1", r"'3/0 \+ x1' divides by zero"),
                                            ("x1*x2/(3-3)", "divides by zero"),
                                            ("0/0 + x2", r"is undefined \(0/0"),
                                            (sympy.zoo * sympy.Symbol("x1"), "output 0: divides by zero")])
def test_a_division_by_zero_is_said_in_words(formula, match):
    a, _ = bilinear_pair(d=2)
    with pytest.raises(ValueError, match=match) as err:
        ts.verify([formula, "x2"], a)
    assert "zoo" not in str(err.value) and "infinite or undefined" in str(err.value)


@pytest.mark.parametrize("value", [sympy.zoo, sympy.Integer(3) / 0, sympy.nan, -sympy.oo])
def test_a_measure_refuses_infinite_exact_entries(value):
    """sympy's zoo and nan were accepted as a mean (and its NaN passed on)."""
    with pytest.raises(ValueError, match="mean holds an infinite or undefined entry"):
        ts.Gaussian(mean=[value, 0])
    with pytest.raises(ValueError, match="probs holds an infinite or undefined entry"):
        ts.Tokens(2, 1, probs=[value, sympy.Integer(0)])
    with pytest.raises(TypeError, match="complex entry"):
        ts.Gaussian(mean=[sympy.I, 0])
    assert ts.Gaussian(mean=[sympy.Rational(1, 2), 0]).exact


@pytest.mark.parametrize("entry", ["zoo", "nan", "oo", "-oo", "I", "a + zoo", "Float('nan')"])
def test_an_exact_weight_that_is_not_a_finite_real_is_refused(entry):
    """sympy's zoo passed (.has was given one tuple) and the similarity came
    out nan labelled exact; oo and nan passed as numbers.Number; I as a number."""
    import sympy

    value = sympy.sympify(entry, locals={"Float": sympy.Float})
    with pytest.raises(ValueError, match="Linear: weight contains an? (infinite or undefined|non-real) entry"):
        ts.Linear(np.array([[value, 1]], dtype=object))


def test_exact_weights_of_finite_reals_and_symbols_are_kept():
    import sympy

    w = np.array([[sympy.Rational(1, 3), sympy.Symbol("a"), sympy.Integer(2), sympy.sqrt(2)]], dtype=object)
    assert ts.Linear(w).weight.shape == (1, 4)


@pytest.mark.parametrize("entry", [1 + 1j, np.complex128(1 + 2j), 1 + 0j])
def test_an_exact_weight_of_complex_type_is_refused(entry):
    """A Python or numpy complex in an object array passed (only finiteness
    was checked): the norm came out sqrt(0.25 + 2.0*I) labelled exact."""
    from fractions import Fraction

    with pytest.raises(TypeError, match="Linear: weight holds complex entries .*expected real numbers"):
        ts.Linear(np.array([[entry, Fraction(1, 2)]], dtype=object))


def test_a_token_measure_too_wide_to_build_does_not_refuse_the_gaussian_question():
    """Vocabulary 50,000 at 400 positions: beyond the token measure's one-hot
    features, which the models' default measure built even under
    inner='gaussian' (every Gaussian similarity of such models refused)."""
    rng = np.random.default_rng(0)
    vocab, d, n_ctx = 50_000, 4, 400
    w = lambda *s: rng.normal(size=s) * 0.1  # noqa: E731

    def lm():
        return ts.Sequential(ts.PositionWise(ts.Embedding(w(d, vocab)), n_ctx),
                             ts.BilinearAttention(w(1, 2, d), w(1, 2, d), w(1, 2, d), w(1, 2, d), w(1, 2, d),
                                                  w(1, d, 2), causal=True, residual=True, n_ctx=n_ctx))

    a, b = lm(), lm()
    ts.plan_similarity(a, b, "gaussian", budget=1e12)
    with pytest.raises(ValueError, match=r"n_ctx=400: .*; or the Gaussian question of these models: inner='gaussian'"):
        ts.plan_similarity(a, b)
