"""Regression tests for defects in symmetries, check_invariance and verify:
each is checked against an independent computation (direct numpy
evaluation, brute-force Gaussian moments, sympy)."""

from __future__ import annotations

from fractions import Fraction as Fr

import numpy as np
import pytest
import sympy

import oracles as O
import tsalgebra as ts
from helpers import spec_of
from tsalgebra.cli import main
from tsalgebra.invariance import check_invariance, compare_layers
from tsalgebra.symmetries import (change_wire_basis, map_query_key, map_value_output, permute_heads, permute_hidden,
                                  random_generators, random_symmetry, rescale_hidden, swap_left_right)


def F(*rows):
    return np.array(rows, dtype=object)


# --------------------------------------- 1. symmetric product at one degree


def test_check_invariance_symmetric_uses_common_degree():
    """A Linear (degree 1) and a Bilinear (degree 2) computing the same
    function: <f,f>, <g,g>, <f,g> once came at different Bombieri degrees and
    the 'exact' distance was 0.26."""
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(2, 2)), rng.normal(size=2)
    f = ts.Linear(W, b)
    g = ts.Bilinear(W, np.zeros((2, 2)), np.eye(2), left_bias=b, right_bias=np.ones(2))
    x = rng.normal(size=(50, 2))
    assert np.allclose(x @ W.T + b, ((x @ W.T + b) * 1.0) @ np.eye(2).T)  # the same function, by hand
    r = check_invariance(f, g, inner="symmetric")
    assert r.invariant and abs(r.relative_distance) < 1e-12 and "degree 2" in r.method
    # and a genuine change is still seen at the common degree
    h = ts.Bilinear(W, np.zeros((2, 2)), np.eye(2), left_bias=b, right_bias=np.array([1.0, 1.5]))
    assert not check_invariance(f, h, inner="symmetric").invariant


# ------------------------------------- 2. eigen-circuit curve vs component


def _cosine(a, b):
    """Gaussian cosine by brute-force moment tensors (tests/oracles.py)."""
    ab = O.gaussian_inner_bruteforce(spec_of(a), spec_of(b))
    return ab / np.sqrt(O.gaussian_inner_bruteforce(spec_of(a), spec_of(a))
                        * O.gaussian_inner_bruteforce(spec_of(b), spec_of(b)))


@pytest.mark.parametrize("other_layer", [False, True])
def test_eigen_curve_is_measured_against_the_component(other_layer):
    rng = np.random.default_rng(0)
    layer = ts.Bilinear(rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(3, 6)),
                        left_bias=rng.normal(size=6))
    other = ts.Bilinear(rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(3, 6)))
    component = ts.circuits.project(other, 1) if other_layer else ts.circuits.project(layer, 0)
    r = ts.verify(ts.circuits.top_eigen(layer, output=1, k=5), component)
    assert len(r.faithfulness) == 5
    for k, sim, _ in r.faithfulness:
        assert sim == pytest.approx(_cosine(component, ts.circuits.top_eigen(layer, 1, k)), abs=1e-9)
    assert r.faithfulness[-1][1] == pytest.approx(r.similarity, abs=1e-9)  # all d+1 eigenvectors
    assert abs(r.faithfulness[-1][1]) < 0.9  # not the circuit's own projection (which gives 1)


# --------------------------------------- 3. attention maps: int matrices


def _attention(rng, H=2, dh=2, d=3, n=2):
    return ts.BilinearAttention(*(rng.normal(size=(H, dh, d)) for _ in range(5)), rng.normal(size=(H, d, dh)),
                                n_ctx=n, v_bias=rng.normal(size=(H, dh)), q1_bias=rng.normal(size=(H, dh)))


def test_attention_maps_take_integer_matrices_on_float_layers():
    rng = np.random.default_rng(0)
    a = _attention(rng)
    A = np.array([[2, 1], [0, 1]])
    x = rng.normal(size=(20, a.in_features))
    for s in (map_query_key(0, 1, 0, A), map_query_key(0, 2, 1, A), map_value_output(0, 0, A)):
        b = s(a)
        assert compare_layers(a, b)[0] == (0,)  # the weights moved ...
        fa, fb = a.evaluate_flat(x), b.evaluate_flat(x)  # ... the function did not
        assert np.abs(fa - fb).max() <= 1e-10 * np.abs(fa).max()
    # the query map by hand: q -> A q, k -> A^-T k
    b = map_query_key(0, 1, 0, A)(a)
    assert np.allclose(b.q1[0], A @ a.q1[0]) and np.allclose(b.k1[0], np.linalg.inv(A).T @ a.k1[0])


@pytest.mark.parametrize("make", [lambda M: map_query_key(0, 1, 0, M), lambda M: map_value_output(0, 0, M)])
def test_attention_maps_refuse_singular_matrices(make):
    for M in (np.zeros((2, 2)), np.array([[1.0, 2.0], [2.0, 4.0 + 1e-15]]), np.array([[1, 1], [1, 1]])):
        with pytest.raises(ValueError, match="singular"):
            make(M)(_attention(np.random.default_rng(1)))


# --------------------------------------------------------- 4. Transformer


def _transformer(rng, n=2, d=3):
    att = ts.BilinearAttention(*(rng.normal(size=(1, 2, d)) for _ in range(5)), rng.normal(size=(1, d, 2)),
                               residual=True)
    mlp = ts.Bilinear(rng.normal(size=(2, d)), rng.normal(size=(2, d)), rng.normal(size=(d, 2)),
                      left_bias=rng.normal(size=2), residual=True)
    return ts.Transformer(ts.Linear(rng.normal(size=(d, 2))), [(att, mlp)],
                          ts.Linear(rng.normal(size=(2, d)), rng.normal(size=2)), n_ctx=n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_symmetries_of_a_transformer(seed):
    rng = np.random.default_rng(seed)
    T = _transformer(rng)
    x = rng.normal(size=(8, 2, 2))  # (batch, n_ctx, d_in): what a Transformer takes
    for s in (random_symmetry(T, seed), permute_heads(1, [0]), permute_hidden(2, [1, 0]), swap_left_right(2),
              rescale_hidden(2, [2.0, -0.5], 3), change_wire_basis(2, np.diag([2.0, 1.0, 0.5]), [1.0, 0.0, -1.0])):
        T2 = s(T)
        assert type(T2) is ts.Transformer and T2.n_ctx == T.n_ctx
        assert np.abs(T2(x) - T(x)).max() <= 1e-9 * np.abs(T(x)).max()
        assert check_invariance(T, s).invariant
    changed, _ = compare_layers(T, change_wire_basis(2, np.diag([2.0, 1.0, 0.5]))(T))
    assert changed == (2, 3)  # the MLP and the unembedding, position by position
    moved = random_symmetry(T, seed)(T)
    assert set(compare_layers(T, moved)[0]) == {1, 2, 3}  # the embedding's wire leads into attention


def test_wire_between_position_wise_and_flat_layers_is_refused():
    rng = np.random.default_rng(0)
    m = ts.Sequential(ts.PositionWise(ts.Linear(rng.normal(size=(2, 2))), 2), ts.Linear(rng.normal(size=(1, 4))))
    with pytest.raises(TypeError, match="position-wise layer and a layer on the whole sequence"):
        change_wire_basis(0, np.eye(2))(m)
    assert check_invariance(m, random_symmetry(m, 0)).invariant  # no such wire is drawn


def test_embedding_wire_has_no_shift():
    rng = np.random.default_rng(0)
    m = ts.Sequential(ts.Embedding(rng.normal(size=(3, 5))),
                      ts.Bilinear(rng.normal(size=(2, 3)), rng.normal(size=(2, 3)), rng.normal(size=(2, 2))))
    r = check_invariance(m, random_symmetry(m, 0))
    assert r.invariant and r.changed_layers == (0, 1)
    with pytest.raises(ValueError, match="no output bias"):
        change_wire_basis(0, np.eye(3), [1, 0, 0])(m)


# ------------------------------------------------ 5. the zero function


def _zero_model():
    return ts.Sequential(
        ts.Bilinear(F([Fr(-1)], [Fr(0)]), F([Fr(-1, 2)], [Fr(1)]), F([Fr(3, 2), Fr(-3, 2)], [Fr(-3, 2), Fr(0)]),
                    left_bias=F(Fr(1, 2), Fr(0)), right_bias=F(Fr(1, 2), Fr(-3, 2))),
        ts.Linear(F([Fr(3, 2), Fr(3, 2)])))


@pytest.mark.parametrize("exact", [True, False])
def test_symmetry_of_the_zero_function_is_invariant(exact):
    m = _zero_model()
    x1 = sympy.Symbol("x1")
    # by hand: 3/2 [(3/2)(-x+1/2)(-x/2+1/2) - (3/2)(1/2)(-3/2)... ] expands to 0
    lb, rb = [-x1 + sympy.Rational(1, 2), sympy.Integer(0)], [-x1 / 2 + sympy.Rational(1, 2), x1 - sympy.Rational(3, 2)]
    h = [lb[k] * rb[k] for k in range(2)]
    y = [sympy.Rational(3, 2) * h[0] - sympy.Rational(3, 2) * h[1], -sympy.Rational(3, 2) * h[0]]
    assert sympy.expand(sympy.Rational(3, 2) * (y[0] + y[1])) == 0
    if not exact:
        m = m.map_weights(lambda w: w.astype(float))
    for seed in (148318, 0, 1, 2, 3):
        assert check_invariance(m, random_symmetry(m, seed)).invariant
    # a real change of the zero function is still caught
    g = ts.Sequential(m.layers[0], ts.Linear(F([Fr(3, 2), Fr(1)]) if exact else np.array([[1.5, 1.0]])))
    assert not check_invariance(m, g).invariant


# -------------------------------------------- 6. no identity wire changes


def test_random_symmetry_with_exact_weights_changes_every_layer():
    m = ts.Sequential(ts.Bilinear(F([Fr(1), Fr(2)]), F([Fr(-1), Fr(1)]), F([Fr(1)]), left_bias=F(Fr(1, 2))),
                      ts.Linear(F([Fr(3)]), F(Fr(1))))
    lone = ts.Bilinear(F([Fr(1), Fr(2)]), F([Fr(-1), Fr(1)]), F([Fr(1)]))
    for seed in range(200):
        assert compare_layers(m, random_symmetry(m, seed)(m))[0] == (0, 1), seed
        assert compare_layers(lone, random_symmetry(lone, seed)(lone))[0] == (0,), seed
        wire = random_generators(m, seed)[-1]
        assert wire.name == "change_wire_basis"
    assert "with shift" not in change_wire_basis(0, [[2]], [0]).description
    assert "with shift" in change_wire_basis(0, [[2]], [1]).description


# ------------------------------------------------ 7. malformed circuits

x1, x2 = sympy.symbols("x1 x2")
xr1, xr2 = sympy.symbols("x1 x2", real=True)


@pytest.mark.parametrize("circuit, kw, error, match", [
    ([xr1 * xr2, xr2], {}, ValueError, "assumptions"),
    ([x1 * x2, x2], {"symbols": ["x1", "x2"]}, TypeError, "symbols must be sympy Symbols"),
    ([x1 * x2, x2], {"symbols": [x1, x1]}, ValueError, "more than once"),
    ([x1 * x2, x2], {"symbols": [x1]}, ValueError, "symbols names 1 input,"),
    ([sympy.sin(x1), x2], {}, ValueError, "not a polynomial"),
    ([1 / x1, x2], {}, ValueError, "not a polynomial"),
    ([sympy.I * x1, x2], {}, ValueError, "not a finite real number"),
    ([sympy.oo * x1, x2], {}, ValueError, "infinite or undefined"),
    ([sympy.nan, x2], {}, ValueError, "infinite or undefined"),
    (["x1*", "x2"], {}, ValueError, "cannot read"),
    ([sympy.Eq(x1, x2), x2], {}, ValueError, "not a formula"),
    ([x1, x2], {"tol": float("nan")}, ValueError, "tol"),
    ([x1, x2], {"tol": -1}, ValueError, "tol"),
])
def test_verify_refuses_malformed_circuits(circuit, kw, error, match):
    rng = np.random.default_rng(0)
    layer = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
    with pytest.raises(error, match=match):
        ts.verify(circuit, layer, **kw)


def test_verify_refuses_a_component_that_is_not_a_model():
    with pytest.raises(TypeError, match="component must be a tsalgebra model"):
        ts.verify([x1, x2], "layer.safetensors")


def test_verify_still_takes_its_own_symbols_with_assumptions():
    layer = ts.Bilinear(F([Fr(1), Fr(1)]), F([Fr(1), Fr(-1)]), F([Fr(1)]), down_bias=F(Fr(3)))
    assert ts.verify(xr1**2 - xr2**2 + 3, layer, symbols=[xr1, xr2]).verdict == "equal"


# ------------------------------------------------ 8. generator arguments


def _seq(rng):
    return ts.Sequential(ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3))),
                         ts.Linear(rng.normal(size=(2, 2))))


@pytest.mark.parametrize("call, error, match", [
    (lambda a, m: map_query_key(0, 3, 0, np.eye(2))(a), ValueError, "factor must be 1 or 2"),
    (lambda a, m: map_query_key(0, 1, 5, np.eye(2))(a), IndexError, "head 5 is out of range"),
    (lambda a, m: map_query_key(0, 1, -1, np.eye(2))(a), IndexError, "head -1 is out of range"),
    (lambda a, m: map_value_output(0, 0, np.eye(3))(a), ValueError, r"expected \(2, 2\)"),
    (lambda a, m: map_value_output(0, 9, np.eye(2))(a), IndexError, "head 9"),
    (lambda a, m: permute_heads(0, [1.0, 0.0])(a), TypeError, "integer indices"),
    (lambda a, m: permute_hidden(0, [1.0, 0.0, 2.0])(m), TypeError, "integer indices"),
    (lambda a, m: rescale_hidden(0, None, 1)(m), TypeError, "rescale_hidden left"),
    (lambda a, m: rescale_hidden(0, [1, "a", 2], 1)(m), TypeError, "rescale_hidden left"),
    (lambda a, m: rescale_hidden(0, 1e-200, 1e-200)(m), ValueError, "beyond float64"),
    (lambda a, m: rescale_hidden(0, 1e200, 1e200)(m), ValueError, "beyond float64"),
    (lambda a, m: change_wire_basis(0, [[1.0, 1.0], [1.0, 1.0]]), ValueError, "singular"),
    (lambda a, m: check_invariance(m, swap_left_right(0), n_samples=0), ValueError, "n_samples"),
    (lambda a, m: check_invariance(m, swap_left_right(0), n_samples=2.5), ValueError, "n_samples"),
    (lambda a, m: check_invariance(m, swap_left_right(0), tol=float("nan")), ValueError, "tol"),
    (lambda a, m: check_invariance(m, swap_left_right(0), sample_tol=-1.0), ValueError, "sample_tol"),
])
def test_generator_arguments_are_checked(call, error, match):
    rng = np.random.default_rng(0)
    with pytest.raises(error, match=match):
        call(_attention(rng), _seq(rng))


# ------------------------------------------------------------- 9. CLI


@pytest.fixture
def cli_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ts.save(ts.Bilinear(np.array([[1.0, 1]]), np.array([[1.0, -1]]), np.array([[1.0]]), down_bias=np.array([3.0])),
            "comp.safetensors")
    (tmp_path / "dup.txt").write_text("x^2 - x^2 + 3\n")
    (tmp_path / "divzero.txt").write_text("# a comment line\n\nx1^2 - x2^2 + 3/0\n")
    (tmp_path / "eq.txt").write_text("x1^2 - x2^2 + 3\n")
    return tmp_path


def test_cli_verify_input_errors(cli_files, capsys):
    assert main(["verify", "dup.txt", "comp.safetensors", "--symbols", "x x"]) == 2
    err = capsys.readouterr().err
    assert "--symbols" in err and "Traceback" not in err
    assert main(["verify", "divzero.txt", "comp.safetensors"]) == 1
    err = capsys.readouterr().err
    assert "divzero.txt:3" in err and "divides by zero" in err and "complex" not in err
    for tol in ("nan", "-1"):
        with pytest.raises(SystemExit) as exc:
            main(["verify", "eq.txt", "comp.safetensors", "--tol", tol])
        assert exc.value.code == 2 and "--tol" in capsys.readouterr().err
    assert main(["verify", "eq.txt", "comp.safetensors", "--tol", "1e-6"]) == 0
    assert "equal" in capsys.readouterr().out
