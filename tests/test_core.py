"""Core: expressions, components, planner and engine against independent twins."""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oracles as O
import tsalgebra as ts
from helpers import model_of, spec_of
from tsalgebra.engine import contract
from tsalgebra.testing import stacks


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ------------------------------------------------------------- evaluation


@given(stacks(max_depth=3, max_width=16), st.integers(0, 2**31))
def test_stack_evaluation_matches_direct_torch(model, seed):
    x = torch.tensor(np.random.default_rng(seed).normal(size=(7, model.in_features)))
    got = model(x)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    want = O.forward_torch(spec_of(model), x)
    assert rel_err(got.numpy(), want.numpy()) < 1e-12


@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch_linear(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3, bias=bias, dtype=torch.float64)
    model = ts.Linear(lin.weight, lin.bias)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert rel_err(model(x), lin(x).detach()) < 1e-12


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("biases", [False, True])
def test_bilinear_matches_formula(residual, biases):
    rng = np.random.default_rng(1)
    d, h = 4, 6
    L, R, D = rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(d, h))
    lb, rb, db = (rng.normal(size=h), rng.normal(size=h), rng.normal(size=d)) if biases else (None,) * 3
    model = ts.Bilinear(torch.tensor(L), torch.tensor(R), torch.tensor(D), lb, rb, db, residual=residual)
    x = rng.normal(size=(9, d))
    z = lambda b: 0 if b is None else b  # noqa: E731
    want = ((x @ L.T + z(lb)) * (x @ R.T + z(rb))) @ D.T + z(db) + (x if residual else 0)
    got = model(x)
    assert isinstance(got, np.ndarray)
    assert rel_err(got, want) < 1e-12


def test_single_sample_and_float32():
    model = model_of(O.random_spec(np.random.default_rng(2), [3, 4, 2], ["bilinear", "linear"]))
    x = np.random.default_rng(3).normal(size=3)
    assert model(x).shape == (2,)
    assert rel_err(model(x), model(x[None])[0]) < 1e-15
    y32 = model(torch.tensor(x, dtype=torch.float32))
    assert y32.dtype == torch.float32
    assert rel_err(y32.numpy(), model(x)) < 1e-5


def test_exact_fraction_weights_evaluate_exactly():
    W = np.array([[Fraction(1, 3), Fraction(-2, 7)], [Fraction(5, 2), Fraction(0)]], dtype=object)
    L = np.array([[Fraction(1, 2), Fraction(1)]], dtype=object)
    R = np.array([[Fraction(-1, 3), Fraction(2)]], dtype=object)
    D = np.array([[Fraction(3)], [Fraction(1, 5)]], dtype=object)
    model = ts.Sequential(ts.Linear(W, bias=np.array([Fraction(1, 11), Fraction(0)], dtype=object)), ts.Bilinear(L, R, D))
    assert model.exact
    x = np.array([[Fraction(2, 3), Fraction(-5, 4)]], dtype=object)
    y = W @ x[0] + np.array([Fraction(1, 11), 0], dtype=object)
    want = D[:, 0] * (L[0] @ y) * (R[0] @ y)
    got = model(x)[0]
    assert all(isinstance(v, Fraction) for v in got)
    assert list(got) == list(want)


# --------------------------------------------------------- composition


def test_composition_duplicates_inputs():
    rng = np.random.default_rng(0)
    b1 = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
    b2 = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(1, 3)))
    two = ts.Sequential(b1, b2)
    assert two.degree == 4 and len(two.expression.inputs) == 4
    assert ts.Sequential(two, ts.Sequential(b2.__class__(*(rng.normal(size=s) for s in [(2, 1), (2, 1), (1, 2)])))).degree == 8
    lin = ts.Linear(rng.normal(size=(2, 2)))
    assert ts.Sequential(lin, b1).degree == 2 and ts.Sequential(b1, lin).degree == 2
    # every input leg has the padded input width; the output leg the padded output width
    net = two.expression
    assert {net.sizes[l] for l in net.inputs} == {3}
    assert net.sizes[net.outputs[0]] == 2


def test_materialized_expression_equals_padded_tensor():
    spec = O.random_spec(np.random.default_rng(4), [3, 3, 2], ["bilinear", "bilinear"], hidden=3, residual=True)
    model = model_of(spec)
    T, _ = contract(model.expression)
    assert rel_err(T, O.padded_tensor(spec)) < 1e-12


@pytest.mark.parametrize("kinds", [["bilinear"], ["bilinear", "bilinear"], ["linear", "bilinear", "linear"]])
def test_declared_symmetries_hold(kinds):
    """The symmetric form declares input swaps; each must leave the tensor unchanged,
    and it must compute the same function as the plain form."""
    widths = [3] * (len(kinds) + 1)
    model = model_of(O.random_spec(np.random.default_rng(5), widths, kinds, hidden=2, residual=True))
    plain, sym = model.network(), model.network(symmetric=True)
    assert plain.symmetries == ()  # L != R: no swap may be declared on the plain form
    # one swap per copy of each bilinear layer; layer k is copied once per input of what follows it
    copies = [int(np.prod([2 if k == "bilinear" else 1 for k in kinds[i + 1:]])) for i in range(len(kinds))]
    assert len(sym.symmetries) == sum(c for c, k in zip(copies, kinds) if k == "bilinear")
    T, _ = contract(sym)
    T0, _ = contract(plain)
    assert rel_err(O.symmetrize(T), O.symmetrize(T0)) < 1e-12
    for p in sym.symmetries:
        Tp, _ = contract(sym.permute_inputs(p))
        assert rel_err(Tp, T) < 1e-12


def test_equal_left_right_declares_swap():
    rng = np.random.default_rng(6)
    L = rng.normal(size=(3, 2))
    assert ts.Bilinear(L, L, rng.normal(size=(2, 3))).expression.symmetries == ((1, 0),)
    assert ts.Bilinear(L, L, rng.normal(size=(2, 3)), left_bias=np.ones(3)).expression.symmetries == ()


# ----------------------------------------------------------- expressions


def test_expression_operations():
    a = ts.Network((ts.Tensor("A", ("i", "j"), (2, 3)),), inputs=("j",), outputs=("i",))
    b = ts.Network((ts.Tensor("B", ("k", "l"), (3, 4)),), inputs=("l",), outputs=("k",))
    j = a.join(b, {"j": "k"})
    assert j.inputs == ("l",) and j.outputs == ("i",) and j.inner_legs == ("j",)
    assert j.open_legs == ("i", "l") and j.degree == 1 and j.symbolic
    assert str(j) == "A[i,j] B[j,l] -> out[i] x~[l]"
    r = j.relabel({"i": "out"}, prefix="p.")
    assert r.outputs == ("out",) and r.tensors[0].name == "p.A"
    assert r.same_topology(j)
    other = ts.Network((ts.Tensor("C", ("x", "y"), (5, 7)), ts.Tensor("D", ("y", "z"), (7, 1))), ("z",), ("x",))
    assert other.same_topology(j)  # sizes and names differ, wiring is the same
    assert not ts.Network((ts.Tensor("C", ("x", "y"), (5, 7)),), ("y",), ("x",)).same_topology(j)
    clash = ts.Network((ts.Tensor("C", ("m", "i"), (3, 2)),), ("i",), ("m",))
    with pytest.raises(ValueError, match="occur in both"):
        a.join(clash, {"j": "m"})
    with pytest.raises(ValueError, match="not an open leg"):
        j.join(b.fresh("q."), {"j": "q.k"})
    with pytest.raises(ValueError, match="size"):
        ts.Network((ts.Tensor("A", ("i",), (2,)), ts.Tensor("B", ("i",), (3,))))


def test_sum_checks_outputs():
    n1 = ts.Network((ts.Tensor("A", ("o", "i"), (2, 3)),), ("i",), ("o",))
    n2 = ts.Network((ts.Tensor("B", ("o", "i", "j"), (2, 3, 3)),), ("i", "j"), ("o",))
    s = ts.Sum.of([n1, (0.5, n2)]) * 2
    assert [c for c, _ in s.terms] == [2, 1.0]
    with pytest.raises(ValueError, match="output sizes"):
        ts.Sum.of([n1, ts.Network((ts.Tensor("C", ("o",), (5,)),), (), ("o",))])


def test_tensor_checks():
    with pytest.raises(ValueError, match="2 legs"):
        ts.Tensor("A", ("i", "j"), (2,))
    with pytest.raises(ValueError, match="data of shape"):
        ts.Tensor("A", ("i",), (2,), np.zeros(3))


# ------------------------------------------------------- planner / engine


def _einsum_direct(network, operands):
    eq, _ = network.einsum()
    return np.einsum(eq, *operands, optimize="greedy")


@given(stacks(max_depth=3, max_width=6))
def test_plan_execution_matches_einsum(model):
    net = model.expression
    p = ts.plan(net)
    ops = [t.data for t in net.tensors]
    assert rel_err(p.execute(*ops), _einsum_direct(net, ops)) < 1e-12


def test_plan_runs_on_torch_and_object():
    model = model_of(O.random_spec(np.random.default_rng(7), [2, 2, 2], ["bilinear", "linear"]))
    net = model.expression
    p = ts.plan(net)
    ops = [t.data for t in net.tensors]
    ref = p.execute(*ops)
    got = p.execute(*[torch.tensor(o) for o in ops])
    assert isinstance(got, torch.Tensor) and rel_err(got.numpy(), ref) < 1e-14
    exact = p.execute(*[np.vectorize(Fraction, otypes=[object])(o) for o in ops])
    assert exact.dtype == object and rel_err(exact.astype(float), ref) < 1e-14
    with pytest.raises(ValueError, match="shapes"):
        p.execute(*ops[:-1], np.zeros((9, 9)))


def test_plan_cache_is_hit_for_same_shapes_only():
    rng = np.random.default_rng(8)
    spec = lambda: O.random_spec(rng, [5, 7, 4], ["bilinear", "bilinear"], hidden=9)  # noqa: E731
    first, second = model_of(spec()), model_of(spec())  # same shapes, other weights
    ts.plan_cache.clear()
    p1 = ts.plan(first.expression)
    assert ts.plan_cache.info() == {"hits": 0, "misses": 1, "size": 1}
    p2 = ts.plan(second.expression)
    assert ts.plan_cache.info() == {"hits": 1, "misses": 1, "size": 1} and p2 is p1
    small = model_of(O.random_spec(rng, [2, 3, 2], ["bilinear", "bilinear"], hidden=2))
    p3 = ts.plan(small.expression)  # other sizes: searched afresh, as in a fresh process
    assert ts.plan_cache.info() == {"hits": 1, "misses": 2, "size": 2}
    assert p3 == ts.plan(small.expression, cache=False) and p3.equation == p1.equation
    ops = [t.data for t in second.expression.tensors]
    assert rel_err(p2.execute(*ops), _einsum_direct(second.expression, ops)) < 1e-12


def test_plan_json_round_trip():
    model = model_of(O.random_spec(np.random.default_rng(9), [3, 3, 2], ["bilinear", "bilinear"]))
    p = ts.plan(model.expression)
    q = ts.ContractionPlan.from_json(p.to_json())
    assert q == p
    ops = [t.data for t in model.expression.tensors]
    assert np.array_equal(q.execute(*ops), p.execute(*ops))
    assert len(p.steps) == len(model.expression.tensors) - 1
    assert p.flops > 0 and p.largest_intermediate >= max(np.prod(s) for s in p.shapes[:1])


def test_optimizer_choice_by_size_and_cost():
    small = model_of(O.random_spec(np.random.default_rng(0), [2, 2], ["bilinear"]))
    assert ts.plan(small.expression).optimizer == "optimal"  # few tensors: exhaustive
    cheap = model_of(O.random_spec(np.random.default_rng(0), [2, 2, 2, 2], ["bilinear"] * 3))
    assert len(cheap.expression.tensors) == 21
    ts.plan_cache.clear()
    assert ts.plan(cheap.expression).optimizer == "greedy"  # search cannot pay for itself
    costly = model_of(O.random_spec(np.random.default_rng(0), [6, 6, 6, 6], ["bilinear"] * 3, hidden=8))
    ts.plan_cache.clear()
    p = ts.plan(costly.expression)
    assert p.optimizer == "random-greedy-128" and p.flops > 1e6


# ------------------------------------------------------------- bad input


def test_bad_input_names_layer_and_problem():
    rng = np.random.default_rng(0)
    L, R, D = rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(4, 3))
    with pytest.raises(ValueError, match=r"layer 1 \(Bilinear.*takes 2 inputs.*layer 0 \(Bilinear.*gives 4"):
        ts.Sequential(ts.Bilinear(L, R, D), ts.Bilinear(L, R, D))
    with pytest.raises(ValueError, match="Bilinear: left has rank 3"):
        ts.Bilinear(L[None], R, D)
    with pytest.raises(ValueError, match="Linear: weight has rank 1"):
        ts.Linear(np.ones(3))
    bad = D.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="Bilinear: down contains NaN or Inf"):
        ts.Bilinear(L, R, bad)
    with pytest.raises(ValueError, match="Linear: weight contains NaN or Inf"):
        ts.Linear(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="Bilinear: left_bias has length 2, expected 3"):
        ts.Bilinear(L, R, D, left_bias=np.ones(2))
    with pytest.raises(ValueError, match="Linear: bias has length 1, expected 2"):
        ts.Linear(np.ones((2, 2)), np.ones(1))
    with pytest.raises(ValueError, match="right has shape"):
        ts.Bilinear(L, R[:, :1], D)
    with pytest.raises(ValueError, match="down has 2 columns"):
        ts.Bilinear(L, R, D[:, :2])
    with pytest.raises(ValueError, match="residual needs out == in"):
        ts.Bilinear(L, R, D, residual=True)
    with pytest.raises(TypeError, match="layer 1 is str"):
        ts.Sequential(ts.Linear(np.ones((2, 2))), "relu")
    with pytest.raises(ValueError, match=r"inputs of shape \(n, 2\)"):
        ts.Bilinear(L, R, D)(np.ones((3, 5)))


def test_deep_copy_keeps_weights():
    model = model_of(O.random_spec(np.random.default_rng(1), [2, 3], ["bilinear"]))
    clone = copy.deepcopy(model)
    assert clone.same_weights(model) and clone is not model
    x = np.ones((1, 2))
    assert np.array_equal(clone(x), model(x))
