"""Weight-space symmetries: every tensor similarity is blind to them, the
flattened-weight cosine is not, and non-symmetries are caught (float64)."""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, reject
from hypothesis import strategies as st

import oracles as O
import tsalgebra as ts
from helpers import model_of, spec_of
from tsalgebra import symmetries as S
from tsalgebra.baselines import weight_cosine
from tsalgebra.invariance import check_invariance, compare_layers
from tsalgebra.folding import fold
from tsalgebra.testing import linear_layers, perturbations, stacks, symmetry_elements

INNERS = ["gaussian", "symmetric", "network"]

# exact gaussian/symmetric enumeration: degree <= 4 per model; network: any depth
shallow = st.integers(1, 3).flatmap(lambda d: stacks(max_depth=2, max_width=3, in_features=d, max_degree=4))
deep = st.integers(1, 4).flatmap(lambda d: stacks(max_depth=3, max_width=4, in_features=d))


def models_for(inner: str) -> st.SearchStrategy:
    return deep if inner == "network" else shallow


def with_symmetry(models: st.SearchStrategy, full: bool | None = None) -> st.SearchStrategy:
    return models.flatmap(lambda m: st.tuples(st.just(m), symmetry_elements(m, full=full)))


def similarity(a: ts.Component, b: ts.Component, inner: str) -> float:
    """The cosine; a zero model (refused by ts.similarity) is not an example."""
    try:
        return ts.similarity(a, b, inner).value
    except ValueError as exc:
        if "zero norm" not in str(exc):
            raise
        reject()


def outputs_close(a: ts.Component, b: ts.Component, rtol: float = 1e-10, seed: int = 0) -> bool:
    x = np.random.default_rng(seed).normal(size=(32, a.in_features))
    fa, fb = O.forward_numpy(spec_of(a), x), O.forward_numpy(spec_of(b), x)
    return bool(np.abs(fa - fb).max() <= rtol * max(np.abs(fa).max(), 1e-300))


def has_symmetries(model: ts.Component) -> bool:
    """False only for a lone Linear layer, whose weight-space group is trivial."""
    return len(model.layers) > 1 or isinstance(model.layers[0], ts.Bilinear)


# ------------------------------------------------- similarities are blind


@pytest.mark.parametrize("inner", INNERS)
@given(data=st.data())
def test_similarity_to_a_symmetric_copy_is_one(inner, data):
    model, sym = data.draw(with_symmetry(models_for(inner)))
    assert similarity(model, sym(model), inner) == pytest.approx(1, abs=1e-10)


def _same_blocks(a: ts.Component, b: ts.Component) -> bool:
    return len(fold(a)[0]) == len(fold(b)[0])


@pytest.mark.parametrize("inner", INNERS)
@given(data=st.data())
def test_similarity_is_unchanged_by_symmetries_of_either_side(inner, data):
    models = models_for(inner)
    a = data.draw(models)
    if data.draw(st.booleans()):
        b = copy.deepcopy(a)
    else:
        b = data.draw(stacks(max_depth=3 if inner == "network" else 2, max_width=3, in_features=a.in_features,
                             max_degree=None if inner == "network" else 4))
        if b.out_features != a.out_features:  # line the outputs up without raising the degree
            b = ts.Sequential(b, data.draw(linear_layers(b.out_features, a.out_features)))
    if inner == "network":
        assume(_same_blocks(a, b))
    s1, s2 = data.draw(symmetry_elements(a)), data.draw(symmetry_elements(b))
    before = similarity(a, b, inner)
    after = similarity(s1(a), s2(b), inner)
    assert abs(after - before) <= 1e-9


# ------------------------------------------------------ negative controls


def _sampled_turn(f: ts.Component, g: ts.Component) -> float:
    """||g_perp|| / ||f|| on samples: the part of g orthogonal to f (as vectors
    of outputs), relative to f.  It bounds the sine of the angle between f and
    g from below by half of it when ||g|| <= 2 ||f||, and ignores round-off
    in a g that is nearly zero."""
    x = np.random.default_rng(1).normal(size=(256, f.in_features))
    fx, gx = O.forward_numpy(spec_of(f), x).ravel(), O.forward_numpy(spec_of(g), x).ravel()
    nf = np.linalg.norm(fx)
    if nf == 0:
        return 0.0
    return float(np.linalg.norm(gx - (fx @ gx) / nf**2 * fx) / nf)


@pytest.mark.parametrize("inner", ["gaussian", "symmetric"])
@given(data=st.data())
def test_perturbation_lowers_similarity_and_is_reported(inner, data):
    model = data.draw(shallow)
    changed = data.draw(perturbations(model, min_size=0.05))
    # a change along f itself (g = c f) is a different function with cosine 1: not a control
    assume(_sampled_turn(model, changed) > 2e-2)
    assert similarity(model, changed, inner) < 1 - 1e-6
    report = check_invariance(model, changed, inner=inner)
    assert not report.invariant
    assert report.relative_distance > report.tol
    assert report.changed_layers == (len(model.layers) - 1,)
    moved = np.array(report.per_output_sample_difference)
    assert int(np.argmax(moved)) in report.changed_outputs
    untouched = {o for o, d in enumerate(moved) if d == 0}
    assert not untouched & set(report.changed_outputs)
    assert "NOT INVARIANT" in repr(report)


@given(st.integers(1, 3).flatmap(lambda d: stacks(max_depth=3, max_width=3, in_features=d)), st.data())
def test_weight_cosine_is_not_invariant(model, data):
    """The flattened-weight cosine moves under the very symmetries the tensor
    similarities ignore.  One random element almost always moves it below
    1 - 1e-3 (see the next test); when one layer's weights dwarf the others,
    a single element close to the identity may not, so the smallest of four
    independent elements is asserted."""
    assume(has_symmetries(model))
    cosines = []
    for _ in range(4):
        moved = data.draw(symmetry_elements(model, full=True))(model)
        assert similarity(model, moved, "network") == pytest.approx(1, abs=1e-10)
        assert outputs_close(model, moved)
        cosines.append(weight_cosine(model, moved))
    assert min(cosines) < 1 - 1e-3


def test_weight_cosine_moves_on_record():
    """Seeded record of the contrast: 200 random (model, symmetry) pairs."""
    rng = np.random.default_rng(2024)
    cosines = []
    while len(cosines) < 200:
        depth = int(rng.integers(1, 4))
        kinds = list(rng.choice(["linear", "bilinear"], depth))
        widths = [int(w) for w in rng.integers(1, 4, depth + 1)]
        model = model_of(O.random_spec(rng, widths, kinds, hidden=int(rng.integers(1, 4)),
                                       bias=bool(rng.random() < 0.5), residual=bool(rng.random() < 0.5)))
        if not has_symmetries(model):
            continue
        moved = S.random_symmetry(model, rng)(model)
        assert ts.similarity(model, moved, "network").value == pytest.approx(1, abs=1e-10)
        cosines.append(weight_cosine(model, moved))
    cosines = np.array(cosines)
    assert np.median(cosines) < 0.5
    assert np.mean(cosines < 1 - 1e-3) >= 0.95


def test_weight_cosine_needs_identical_architectures():
    rng = np.random.default_rng(0)
    a = model_of(O.random_spec(rng, [3, 2], ["bilinear"], hidden=2))
    b = model_of(O.random_spec(rng, [3, 2], ["bilinear"], hidden=3))
    assert weight_cosine(a, a) == pytest.approx(1, abs=1e-15)
    with pytest.raises(ValueError, match="identical architectures: layer 0"):
        weight_cosine(a, b)
    with pytest.raises(ValueError, match="2 layers against 1"):
        weight_cosine(ts.Sequential(a, ts.Linear(np.eye(2))), a)
    res = model_of(O.random_spec(rng, [2, 2], ["bilinear"], hidden=2, residual=True))
    assert weight_cosine(res, S.unfold_residual(res)) == pytest.approx(1, abs=1e-15)


# ------------------------------------------------------------- generators


@given(deep)
def test_each_generator_preserves_the_function(model):
    rng = np.random.default_rng(0)
    before = copy.deepcopy(model)
    for gen in S.random_generators(model, rng):
        moved = gen(model)
        assert type(moved) is type(model)
        assert outputs_close(model, moved), gen
    assert model.same_weights(before)  # nothing was mutated


@given(deep, st.integers(0, 2**32 - 1))
def test_random_symmetry_touches_every_layer(model, seed):
    sym = S.random_symmetry(model, seed)
    moved = sym(model)
    assert outputs_close(model, moved)
    changed, _ = compare_layers(model, moved)
    if has_symmetries(model):
        assert changed == tuple(range(len(model.layers)))
    else:
        assert changed == () and sym.name == "identity"


@given(with_symmetry(shallow))
def test_check_invariance_accepts_symmetries(pair):
    model, sym = pair
    report = check_invariance(model, sym)
    assert report.invariant, report
    assert report.exact_available and report.method == "gaussian (exact)"
    assert report.changed_outputs == ()
    assert "INVARIANT" in repr(report) and "NOT" not in repr(report)


def _layer(rng, d, h, o, residual=False, bias=True):
    return model_of(O.random_spec(rng, [d, o], ["bilinear"], hidden=h, residual=residual, bias=bias)).layers[0]


def test_generators_on_a_bare_layer_keep_its_kind():
    rng = np.random.default_rng(1)
    layer = _layer(rng, 3, 4, 2)
    for gen in (S.permute_hidden(0, [2, 0, 3, 1]), S.swap_left_right(0), S.rescale_hidden(0, 2.0, [1, -1, 3, 0.5])):
        out = gen(layer)
        assert isinstance(out, ts.Bilinear) and outputs_close(layer, out)
    moved = S.permute_hidden(0, [1, 2, 3, 0])(layer)
    np.testing.assert_array_equal(moved.left[0], layer.left[1])
    np.testing.assert_array_equal(moved.down[:, 0], layer.down[:, 1])
    swapped = S.swap_left_right(0)(layer)
    np.testing.assert_array_equal(swapped.left_bias, layer.right_bias)
    lin = ts.Linear(rng.normal(size=(2, 3)))
    assert S.random_symmetry(lin, 0)(lin).same_weights(lin)


def test_wire_change_is_the_documented_formula():
    rng = np.random.default_rng(2)
    first, second = _layer(rng, 3, 2, 3, residual=True), ts.Linear(rng.normal(size=(2, 3)), rng.normal(size=2))
    model = ts.Sequential(first, second)
    M, c = rng.normal(size=(3, 3)) + 2 * np.eye(3), rng.normal(size=3)
    moved = S.change_wire_basis(0, M, c)(model)
    a, b = moved.layers
    assert first.residual and not a.residual and a.hidden == first.hidden + 3  # unfolded first
    unf = S.unfold_residual(first)
    np.testing.assert_allclose(a.down, M @ unf.down)
    np.testing.assert_allclose(a.down_bias, M @ unf.down_bias + c)
    Mi = np.linalg.inv(M)
    np.testing.assert_allclose(b.weight, second.weight @ Mi)
    np.testing.assert_allclose(b.bias, second.bias - second.weight @ Mi @ c)
    assert outputs_close(model, moved)


def test_unfold_residual_keeps_function_and_padded_form():
    rng = np.random.default_rng(3)
    res = _layer(rng, 3, 2, 3, residual=True)
    flat = S.unfold_residual(res)
    assert not flat.residual and flat.hidden == 5 and outputs_close(res, flat)
    for x, y in zip(res.padded(), flat.padded()):
        np.testing.assert_array_equal(x, y)
    assert S.unfold_residual(flat) is flat
    seq = ts.Sequential(res, ts.Linear(np.eye(3)))
    assert not S.unfold_residual(seq).layers[0].residual


def test_compose_applies_left_to_right():
    rng = np.random.default_rng(4)
    layer = _layer(rng, 2, 3, 2)
    p, q = S.permute_hidden(0, [1, 2, 0]), S.permute_hidden(0, [2, 1, 0])
    both = S.compose(p, q)
    assert both.name == "composite" and both.parts == (p, q)
    assert both(layer).same_weights(q(p(layer)))
    assert p.then(q)(layer).same_weights(both(layer))
    assert S.compose(both, S.swap_left_right(0)).parts[:2] == (p, q)
    assert S.compose()(layer).same_weights(layer)
    assert "permute hidden units of layer 0" in repr(both)


def test_exact_weights_stay_exact():
    F = Fraction
    L = np.array([[F(1), F(-1, 2)], [F(2, 3), F(1)]], dtype=object)
    R = np.array([[F(1, 2), F(1)], [F(-1), F(1, 3)]], dtype=object)
    D = np.array([[F(3, 4), F(-2)], [F(1), F(1, 5)]], dtype=object)
    model = ts.Sequential(ts.Bilinear(L, R, D, left_bias=np.array([F(1, 5), F(0)], dtype=object), residual=True),
                          ts.Linear(np.array([[F(1), F(2)]], dtype=object)))
    sym = S.random_symmetry(model, 5)
    moved = sym(model)
    assert moved.exact and all(w.dtype == object for w in moved.weights())
    report = check_invariance(model, sym)
    assert report.relative_distance == 0 and isinstance(report.relative_distance, Fraction)
    assert report.invariant
    rational = S.change_wire_basis(0, np.array([[2, 1], [0, F(1, 3)]], dtype=object), [F(1, 2), -1])(model)
    assert rational.exact and check_invariance(model, rational).relative_distance == 0
    floated = S.rescale_hidden(0, 0.5, 2.0)(model)
    assert not floated.exact and all(w.dtype == np.float64 for w in floated.weights())


def test_generator_errors_name_the_problem():
    rng = np.random.default_rng(6)
    model = ts.Sequential(_layer(rng, 2, 3, 2), ts.Linear(rng.normal(size=(2, 2))))
    with pytest.raises(ValueError, match="not a permutation of the layer's 3 hidden units"):
        S.permute_hidden(0, [0, 0, 1])(model)
    with pytest.raises(TypeError, match="layer 1 is Linear"):
        S.swap_left_right(1)(model)
    with pytest.raises(IndexError, match="out of range"):
        S.swap_left_right(2)(model)
    with pytest.raises(IndexError, match="wires 0..0"):
        S.change_wire_basis(1, np.eye(2))(model)
    with pytest.raises(ValueError, match="singular"):
        S.change_wire_basis(0, np.ones((2, 2)))
    with pytest.raises(ValueError, match="singular"):
        S.change_wire_basis(0, np.array([[1, 2], [2, 4]], dtype=object))
    with pytest.raises(ValueError, match="width 2"):
        S.change_wire_basis(0, np.eye(3))(model)
    with pytest.raises(ValueError, match="nonzero"):
        S.rescale_hidden(0, [1, 0, 1], 1.0)
    with pytest.raises(ValueError, match="need 3 factors"):
        S.rescale_hidden(0, [1, 2], 1.0)(model)


# ------------------------------------------------------- check_invariance


def test_check_invariance_forms_of_transform():
    rng = np.random.default_rng(7)
    model = model_of(O.random_spec(rng, [2, 2, 2], ["bilinear", "bilinear"], hidden=2))
    sym = S.random_symmetry(model, 1)
    for transform in (sym, lambda m: sym(m), sym(model)):
        assert check_invariance(model, transform).invariant
    assert "permute hidden units" in check_invariance(model, sym).transform
    sym_report = check_invariance(model, sym, inner="symmetric")
    assert sym_report.invariant and sym_report.method == "symmetric (exact, degree 4)"
    with pytest.raises(ValueError, match="function-level"):
        check_invariance(model, sym, inner="network")
    with pytest.raises(ValueError, match="cannot compute the same function"):
        check_invariance(model, ts.Sequential(*model.layers, ts.Linear(np.ones((1, 2)))))
    with pytest.raises(TypeError, match="not a tsalgebra model"):
        check_invariance(model, lambda m: 3)


def test_check_invariance_falls_back_when_exact_is_over_budget(monkeypatch):
    import tsalgebra.invariance as inv

    rng = np.random.default_rng(9)
    model = model_of(O.random_spec(rng, [2, 2, 2], ["bilinear", "linear"], hidden=2))
    sym = S.random_symmetry(model, 4)
    real = inv.relative_products

    def refuse(kinds):
        def inner(a, b, kind, **kw):
            if kind in kinds:
                raise ts.CostError(f"{kind} refused for the test")
            return real(a, b, kind, **kw)
        return inner

    monkeypatch.setattr(inv, "relative_products", refuse({"gaussian"}))
    r = check_invariance(model, sym)
    assert r.invariant and r.method == "symmetric (exact, degree 2); gaussian over budget"
    assert any("gaussian refused" in n for n in r.notes)
    monkeypatch.setattr(inv, "relative_products", refuse({"gaussian", "symmetric"}))
    r = check_invariance(model, sym)
    assert r.invariant and not r.exact_available and r.method == "samples only"
    assert "unavailable" in repr(r) and any("samples only" in n for n in r.notes)
    W = model.layers[1].weight.copy()
    W[0, 0] += 1e-3
    r_bad = check_invariance(model, ts.Sequential(model.layers[0], ts.Linear(W, model.layers[1].bias)))
    assert not r_bad.invariant and r_bad.changed_outputs == (0,) and r_bad.changed_layers == (1,)


def test_check_invariance_without_any_exact_method():
    """Degree 16 at width 8: pairing enumeration and quadrature (17^8 nodes) are both refused."""
    rng = np.random.default_rng(10)
    deep4 = model_of(O.random_spec(rng, [8] * 5, ["bilinear"] * 4, hidden=2))
    report = check_invariance(deep4, S.random_symmetry(deep4, 3))
    assert report.invariant and report.method == "samples only" and report.relative_distance is None
    last = deep4.layers[-1]
    down = last.down.copy()
    down[5] *= 1.001
    bad = ts.Sequential(*deep4.layers[:-1], ts.Bilinear(last.left, last.right, down, last.left_bias,
                                                        last.right_bias, last.down_bias))
    r_bad = check_invariance(deep4, bad)
    assert not r_bad.invariant and r_bad.changed_outputs == (5,) and r_bad.changed_layers == (3,)


def test_check_invariance_names_the_changed_output_and_layer():
    rng = np.random.default_rng(8)
    model = model_of(O.random_spec(rng, [3, 3, 3], ["bilinear", "linear"], hidden=3))
    W = model.layers[1].weight.copy()
    W[2, 1] += 0.1
    changed = ts.Sequential(model.layers[0], ts.Linear(W, model.layers[1].bias))
    report = check_invariance(model, changed)
    assert not report.invariant and report.changed_outputs == (2,) and report.changed_layers == (1,)
    assert report.per_output_distance[2] > 1e-6 and max(report.per_output_distance[:2]) < 1e-12
    assert "layer 1" in report.layer_changes[0] and "weight" in report.layer_changes[0]
    text = repr(report)
    assert "NOT INVARIANT" in text and "changed outputs: 2" in text
