"""check_invariance across condition numbers: genuine symmetries stay
invariant, small real changes do not, and the argument messages.

1. A genuine map_value_output / map_query_key of condition 1e8 and more was
   called NOT INVARIANT: the inner products of the ill-conditioned weights
   cancel far more than the outputs do (distance 1e-5 .. 1e3, of either
   sign, where the outputs agree to 1e-10 .. 1e-6).  The distance's own round-off is now
   measured (every weight of both models moved by an ulp) and allowed for.
2. A 0.1 % change of one output after a wire change of condition 1e10 (a
   10 % change at 1e12) was called INVARIANT: the other model's round-off
   inflated the scale of both witnesses, and the allowance was 2^10 times it.
   Now it is an allowance on the differences (2^8 times), never a scale.
3. check_invariance(torch module) named it "Linear" (tsalgebra has a Linear
   too): now its full type and the conversion, ts.from_torch(module).

Oracles: the pure symmetry's sampled error (the model and its transform
evaluated on the same inputs) and the change built by scaling one output
channel by 1.001 (or 1.1), whose size on the samples is measured directly.
"""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.invariance as inv
from tsalgebra.invariance import DISTANCE_ROUNDOFF_FACTOR, ROUNDOFF_FACTOR, check_invariance
from tsalgebra.symmetries import MAX_CONDITION, change_wire_basis, map_query_key, map_value_output, rescale_hidden

CONDITIONS = (1.0, 1e4, 1e8, 1e10, 0.99 * MAX_CONDITION)  # the last: just inside what symmetries accept


def _matrix(rng, n, cond):
    """U diag(s) V^T, singular values log-spaced from 1 down to 1 / cond."""
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (u * np.logspace(0, -np.log10(cond), n)) @ v.T


def _attention(rng, d=4, dh=4, heads=2):
    w = lambda: rng.normal(size=(heads, dh, d)) / np.sqrt(d)  # noqa: E731
    return ts.BilinearAttention(w(), w(), w(), w(), w(), rng.normal(size=(heads, d, dh)) / np.sqrt(dh), causal=True,
                                n_ctx=3, q1_bias=rng.normal(size=(heads, dh)) * 0.3,
                                v_bias=rng.normal(size=(heads, dh)) * 0.3, o_bias=rng.normal(size=d) * 0.3)


def _stack(rng, d=4, h=5):
    return ts.Sequential(*(ts.Bilinear(rng.normal(size=(h, d)) / np.sqrt(d), rng.normal(size=(h, d)) / np.sqrt(d),
                                       rng.normal(size=(d, h)) / np.sqrt(h), rng.normal(size=h) * 0.5,
                                       rng.normal(size=h) * 0.5, rng.normal(size=d) * 0.5) for _ in range(2)))


def _case(kind, cond, seed):
    """(model, a genuine symmetry of it whose matrix or factors span ``cond``)."""
    rng = np.random.default_rng(seed)
    if kind == "value_output":
        return _attention(rng), map_value_output(0, 1, _matrix(rng, 4, cond))
    if kind == "query_key":
        return _attention(rng), map_query_key(0, 1, 0, _matrix(rng, 4, cond))
    if kind == "wire_basis":
        return _stack(rng), change_wire_basis(0, _matrix(rng, 4, cond), rng.normal(size=4))
    m = _stack(rng)
    return m, rescale_hidden(1, np.logspace(0, np.log10(cond), 5) * rng.choice([-1, 1], 5), 1.0)


def _scaled_output(model, factor, out=0):
    """``model`` with output channel ``out`` (weights and bias) scaled by ``factor``."""
    last = model.layers[-1] if isinstance(model, ts.Sequential) else model
    if isinstance(last, ts.Bilinear):
        D, db = last.down.copy(), last.down_bias.copy()
        D[out] *= factor
        db[out] *= factor
        new = last.replace(down=D, down_bias=db)
    else:
        o, ob = last.o.copy(), last.o_bias.copy()
        o[:, out] *= factor
        ob[out] *= factor
        new = last.replace(o=o, o_bias=ob)
    return ts.Sequential(*model.layers[:-1], new) if isinstance(model, ts.Sequential) else new


def _sampled(f, g, seed=0):
    """max |f - g| / max |f| on standard normal inputs."""
    x = np.random.default_rng(seed).normal(size=(256, f.in_features))
    fx = f.evaluate_flat(x)
    return float(np.abs(fx - g.evaluate_flat(x)).max() / np.abs(fx).max())


# ---------------------------------------- 1. genuine symmetries stay invariant


@pytest.mark.parametrize("kind", ["value_output", "query_key"])
def test_genuine_attention_maps_are_invariant_at_every_accepted_condition(kind):
    """Failed before from condition 1e8: NOT INVARIANT (distance 1.7e-4 ..
    0.26 against tol 1e-9) while the outputs agreed to 1e-9 .. 1e-7."""
    for cond in CONDITIONS:
        for seed in (0, 1):
            model, sym = _case(kind, cond, seed)
            r = check_invariance(model, sym)
            assert r.invariant, (cond, seed, r)
            assert not r.changed_outputs
            if abs(r.relative_distance) > r.tol:  # then the distance is round-off, and measured as such
                assert r.distance_roundoff is not None
                assert r.relative_distance <= r.distance_allowance == DISTANCE_ROUNDOFF_FACTOR * r.distance_roundoff


@pytest.mark.parametrize("kind", ["wire_basis", "rescale"])
def test_genuine_wire_changes_and_rescalings_are_invariant_at_every_accepted_condition(kind):
    for cond in CONDITIONS:
        for seed in (0, 1):
            model, sym = _case(kind, cond, seed)
            assert check_invariance(model, sym).invariant, (kind, cond, seed)


def test_the_distance_round_off_is_measured_and_reported():
    model, sym = _case("value_output", 1e8, 0)
    r = check_invariance(model, sym)
    assert r.invariant and r.relative_distance > r.tol  # a float distance of 1.7e-4: round-off
    assert r.distance_roundoff > 0 and r.relative_distance <= r.distance_allowance
    assert "float64 resolves the distance only down to" in " ".join(r.notes)
    assert "allowance" in repr(r).splitlines()[2]
    # a well-conditioned pair within tol: nothing to measure
    clean = check_invariance(*_case("value_output", 1.0, 0))
    assert clean.invariant and clean.distance_roundoff is None and clean.distance_allowance == 0.0


# ---------------------------------------- 2. small real changes are caught


@pytest.mark.parametrize("kind, cond", [("wire_basis", 1e10), ("value_output", 1e10), ("query_key", 1e10),
                                        ("value_output", 1e8)])
def test_a_small_change_after_an_ill_conditioned_transform_is_caught(kind, cond):
    """Failed before for the wire change: a 0.1 % change of one output
    INVARIANT (relative distance 9e-12 after rescaling, samples 7e-9 of an
    inflated scale)."""
    for seed in (0, 1, 2):
        model, sym = _case(kind, cond, seed)
        moved = sym(model)
        changed = _scaled_output(moved, 1.001)
        size, error = _sampled(model, changed), _sampled(model, moved)
        assert error < 1e-2 * size  # the samples resolve the change by orders of magnitude
        r = check_invariance(model, changed)
        assert not r.invariant and 0 in r.changed_outputs, (seed, r)
        # differences are relative to the outputs, not to an inflated scale
        assert r.max_sample_difference == pytest.approx(size, rel=1e-6)


@pytest.mark.parametrize("kind", ["wire_basis", "value_output", "query_key"])
def test_a_ten_percent_change_is_caught_at_the_largest_accepted_condition(kind):
    """Failed before for the wire change: a 10 % change of one output INVARIANT at condition 1e12."""
    model, sym = _case(kind, 0.99 * MAX_CONDITION, 0)
    r = check_invariance(model, _scaled_output(sym(model), 1.1))
    # channel 0 of every position (an attention layer's outputs are n_ctx blocks of 4)
    assert not r.invariant and r.changed_outputs == tuple(range(0, model.out_features, 4))


def test_the_ill_conditioned_model_may_come_first():
    # the transformed model as the original: its round-off is an allowance, not a reason to rescale
    model, sym = _case("wire_basis", 1e10, 1)
    moved = sym(model)
    assert check_invariance(moved, model).invariant
    r = check_invariance(moved, _scaled_output(moved, 1.001))
    assert not r.invariant and not any("own round-off allowance" in n for n in r.notes)
    assert r.max_sample_difference == pytest.approx(_sampled(moved, _scaled_output(moved, 1.001)), rel=1e-6)


def test_the_sample_allowance_is_the_measured_round_off_times_the_factor():
    model, sym = _case("value_output", 1e10, 0)
    r = check_invariance(model, sym)
    x = np.random.default_rng(0).normal(size=(256, model.in_features))  # the samples check_invariance draws
    top = float(np.abs(model.evaluate_flat(x)).max())
    assert r.sample_allowance == pytest.approx(ROUNDOFF_FACTOR * r.output_roundoff / top, rel=1e-12)
    assert r.max_sample_difference <= r.sample_allowance and r.sample_allowance > r.sample_tol
    strict = check_invariance(model, sym, sample_tol=0.0)  # sample_tol 0: every difference counts
    assert strict.sample_allowance == 0.0 and not strict.invariant


def test_the_distance_round_off_costs_one_draw_when_the_verdict_is_clear(monkeypatch):
    """Measured only where a distance exceeds tol, and after one draw when
    every such distance is far beyond the allowance (a plain change)."""
    calls = []
    products = inv._products

    def counting(*args, **kwargs):
        calls.append(1)
        return products(*args, **kwargs)

    monkeypatch.setattr(inv, "_products", counting)
    model, sym = _case("wire_basis", 1.0, 0)
    assert check_invariance(model, sym).invariant and len(calls) == 1  # within tol: no draw
    calls.clear()
    assert not check_invariance(model, _scaled_output(model, 1.001)).invariant and len(calls) == 2  # one draw
    calls.clear()
    assert check_invariance(*_case("value_output", 1e8, 0)).invariant and len(calls) == 1 + inv.ROUNDOFF_DRAWS


# ------------------------------------------------------------- 3. messages


def test_a_torch_module_is_named_with_the_conversion():
    torch = pytest.importorskip("torch")
    model = _stack(np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear, which is not a tsalgebra model; "
                                        r"convert a torch module first: ts\.from_torch\(module\)"):
        check_invariance(torch.nn.Linear(4, 4), lambda m: m)
    with pytest.raises(TypeError, match=r"transform must be .*torch\.nn\.modules\.linear\.Linear.*ts\.from_torch"):
        check_invariance(model, torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="must return a tsalgebra model .*got int, which is not a tsalgebra model$"):
        check_invariance(model, lambda m: 3)
