"""Every component kind declares its fields once: named_weights, settings,
replace, map_weights, same_weights and the residual unfolding built on them."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import tsalgebra as ts
from tsalgebra.arrays import is_torch, torch_to_numpy
from tsalgebra.circuits import top_eigen
from tsalgebra.components import postcompose, precompose
from tsalgebra.symbolic import Polynomial


def _layers(rng: np.random.Generator) -> dict[str, ts.Component]:
    """One layer of each kind, every bias present, each named 'probe'."""
    W = lambda *s: rng.normal(size=s)  # noqa: E731
    d, h, o, H, dh = 3, 4, 2, 2, 2
    return {
        "linear": ts.Linear(W(o, d), W(o), name="probe"),
        "bilinear": ts.Bilinear(W(h, d), W(h, d), W(d, h), W(h), W(h), W(d), residual=True, name="probe"),
        "attention": ts.BilinearAttention(W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d),
                                          W(H, d, dh), causal=True, n_ctx=2, q1_bias=W(H, dh), k1_bias=W(H, dh),
                                          q2_bias=W(H, dh), k2_bias=W(H, dh), v_bias=W(H, dh), o_bias=W(d),
                                          name="probe"),
        "polynomial": Polynomial(W(o + 1, d + 1, d + 1), name="probe"),
    }


KINDS = ["linear", "bilinear", "attention", "polynomial"]
ORDER = {
    "linear": ["weight", "bias"],
    "bilinear": ["left", "right", "down", "left_bias", "right_bias", "down_bias"],
    "attention": ["q1", "k1", "q2", "k2", "v", "o", "q1_bias", "k1_bias", "q2_bias", "k2_bias", "v_bias", "o_bias"],
    "polynomial": ["tensor"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_named_weights_lists_every_field_in_the_documented_order(kind):
    layer = _layers(np.random.default_rng(0))[kind]
    named = layer.named_weights()
    assert list(named) == ORDER[kind] == list(type(layer).weight_fields)
    assert all(named[k] is getattr(layer, k) for k in named)
    assert [w for w in named.values() if w is not None] == layer.weights()
    assert list(layer.bias_shapes()) == [k for k in ORDER[kind] if k.endswith("bias")]
    assert all(named[k].shape == s for k, s in layer.bias_shapes().items())


def test_absent_biases_are_none():
    bare = ts.Bilinear(np.ones((2, 3)), np.ones((2, 3)), np.ones((1, 2)))
    assert bare.named_weights()["left_bias"] is None and len(bare.weights()) == 3
    assert bare.bias_shapes() == {"left_bias": (2,), "right_bias": (2,), "down_bias": (1,)}
    att = ts.BilinearAttention(*(np.ones((1, 2, 2)),) * 6)
    assert all(att.named_weights()[k] is None for k in att.bias_shapes())


@pytest.mark.parametrize("kind", KINDS)
def test_replace_with_the_same_fields_gives_the_same_weights(kind):
    layer = _layers(np.random.default_rng(1))[kind]
    for copy in (layer.replace(), layer.replace(**layer.named_weights()), layer.map_weights(lambda w: w.copy())):
        assert copy is not layer and type(copy) is type(layer)
        assert copy.same_weights(layer) and copy.settings() == layer.settings() and copy.name == "probe"
        x = np.random.default_rng(2).normal(size=(3, layer.in_features))
        if isinstance(layer, ts.BilinearAttention):  # it reads sequences
            x = x.reshape(3, layer.n_ctx, layer.d_model)
        np.testing.assert_array_equal(copy(x), layer(x))


@pytest.mark.parametrize("kind", KINDS)
def test_replacing_one_field_changes_only_that_field(kind):
    layer = _layers(np.random.default_rng(3))[kind]
    before = layer.named_weights()
    for field, w in before.items():
        new = layer.replace(**{field: w + 1})
        after = new.named_weights()
        np.testing.assert_array_equal(after[field], w + 1)
        for other, v in before.items():
            if other != field:
                np.testing.assert_array_equal(after[other], v)
        assert new.settings() == layer.settings()
        assert not new.same_weights(layer)
        assert layer.named_weights()[field] is w  # the original is untouched


@pytest.mark.parametrize("kind", KINDS)
def test_bad_shapes_raise_naming_the_layer(kind):
    layer = _layers(np.random.default_rng(4))[kind]
    for field, w in layer.named_weights().items():
        # a polynomial of another degree is a tensor of another rank: only its axis sizes are checked
        with pytest.raises(ValueError, match="^probe: " + ("" if kind == "polynomial" else f"{field} has rank")):
            layer.replace(**{field: w[..., None]})
        # one entry fewer along an axis another field also has: inconsistent with that field
        axis = 1 if kind == "polynomial" else 0
        short = np.delete(w, 0, axis=axis)
        with pytest.raises(ValueError, match="^probe: "):
            layer.replace(**{field: short})


def test_replace_settings_and_unknown_fields():
    rng = np.random.default_rng(5)
    layers = _layers(rng)
    flat = layers["bilinear"].replace(residual=False, name="other")
    assert not flat.residual and flat.name == "other" and flat.left is not None
    assert not flat.same_weights(layers["bilinear"])  # same arrays, another function
    att = layers["attention"].replace(causal=False, n_ctx=4)
    assert not att.causal and att.n_ctx == 4 and att.settings()["rotary_base"] is None
    unbound = ts.BilinearAttention(*(np.ones((1, 2, 2)),) * 6)
    assert unbound.settings()["n_ctx"] is None and unbound.replace().n_ctx == 0
    with pytest.raises(TypeError, match=r"no fields \['hidden'\]"):
        layers["bilinear"].replace(hidden=3)
    with pytest.raises(ValueError, match="probe: a residual needs out == in"):
        layers["linear"].replace(weight=rng.normal(size=(2, 3))).with_residual()


def test_same_weights_compares_fields_by_name():
    L, D, b = np.ones((2, 3)), np.ones((3, 2)), np.arange(2.0)
    left, right = ts.Bilinear(L, L, D, left_bias=b), ts.Bilinear(L, L, D, right_bias=b)
    assert not left.same_weights(right)  # the same arrays in other fields
    assert not ts.Bilinear(L, L, D).same_weights(ts.Bilinear(L, L, D, residual=True))
    assert ts.Bilinear(L, L, D, name="a").same_weights(ts.Bilinear(L, L, D, name="b"))  # the name is no weight


def test_sequential_fields_are_named_by_layer():
    rng = np.random.default_rng(6)
    model = ts.Sequential(ts.Linear(rng.normal(size=(3, 2))), ts.Bilinear(*(rng.normal(size=s) for s in
                                                                             ((4, 3), (4, 3), (2, 4)))))
    named = model.named_weights()
    assert list(named)[:3] == ["0.weight", "0.bias", "1.left"] and len(named) == 8
    assert model.weights() == [w for layer in model.layers for w in layer.weights()]
    assert model.bias_shapes()["1.down_bias"] == (2,) and model.settings()["1.residual"] is False
    assert model.replace(**named).same_weights(model)
    new = model.replace(**{"1.down": named["1.down"] * 2, "0.name": "first"})
    np.testing.assert_array_equal(new.layers[1].down, 2 * named["1.down"])
    assert new.layers[0].name == "first" and new.layers[0].weight is not None
    np.testing.assert_array_equal(new.layers[1].left, named["1.left"])
    with pytest.raises(TypeError, match="no field '2.left'"):
        model.replace(**{"2.left": named["1.left"]})
    with pytest.raises(TypeError, match="no field 'left'"):
        model.replace(left=named["1.left"])
    with pytest.raises(ValueError, match="Bilinear: down has 3 columns"):
        model.replace(**{"1.down": rng.normal(size=(2, 3))})


def test_a_subclass_with_its_own_constructor_comes_back_as_its_layer_kind():
    rng = np.random.default_rng(7)
    layer = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
    circuit = top_eigen(layer, 0, 2)
    copy = circuit.replace()
    assert type(copy) is ts.Bilinear
    x = rng.normal(size=(4, 2))
    np.testing.assert_allclose(copy(x), circuit(x), rtol=1e-14)


def test_unfolded_residual_keeps_exact_weights_and_absent_biases():
    F = Fraction
    L = np.array([[F(1), F(-2)], [F(1, 3), F(1)]], dtype=object)
    res = ts.Bilinear(L, L.T.copy(), L * 2, down_bias=np.array([F(1, 2), F(0)], dtype=object), residual=True)
    flat = res.unfolded()
    assert flat.exact and not flat.residual and flat.hidden == 4 and flat.left_bias is None
    np.testing.assert_array_equal(flat.right_bias, np.array([0, 0, 1, 1], dtype=object))
    np.testing.assert_array_equal(flat.down_bias, res.down_bias)
    for x, y in zip(res.padded(), flat.padded()):
        np.testing.assert_array_equal(x, y)
    x = np.array([[F(1, 2), F(-3)]], dtype=object)
    np.testing.assert_array_equal(flat(x), res(x))
    assert flat.unfolded() is flat


def test_with_residual_adds_the_input():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 3))
    lin = ts.Linear(rng.normal(size=(3, 3)), rng.normal(size=3))
    np.testing.assert_allclose(lin.with_residual()(x), x + lin(x), rtol=1e-13)
    res = ts.Bilinear(rng.normal(size=(2, 3)), rng.normal(size=(2, 3)), rng.normal(size=(3, 2)), residual=True)
    twice = res.with_residual()  # x + (x + f(x)): the layer's own skip is unfolded first
    assert twice.residual and twice.hidden == 5
    np.testing.assert_allclose(twice(x), x + res(x), rtol=1e-13)


def test_torch_helpers():
    t = torch.arange(3, dtype=torch.bfloat16)
    assert is_torch(t) and is_torch(t.dtype) and not is_torch(np.zeros(2)) and not is_torch(3.0)
    arr = torch_to_numpy(t)
    assert arr.dtype == np.float64 and arr.tolist() == [0.0, 1.0, 2.0]
    assert torch_to_numpy(torch.arange(3)).dtype == np.int64
    w = torch.ones(2, 2, requires_grad=True)
    out = torch_to_numpy(w)
    out[0, 0] = 5.0  # a copy: the tensor is not written through
    assert w[0, 0].item() == 1.0
    layer = ts.Linear(torch.ones(2, 3, dtype=torch.bfloat16))  # numpy has no bfloat16: converted through float64
    assert layer.weight.dtype == np.float64 and layer.weight.sum() == 6


@pytest.mark.parametrize("exact", [False, True])
def test_affine_maps_compose_into_the_layer(exact):
    rng = np.random.default_rng(9)
    quarters = np.vectorize(lambda v: Fraction(round(4 * v), 4), otypes=[object])
    num = (lambda a: quarters(a)) if exact else (lambda a: a)  # noqa: E731
    W, b = num(rng.normal(size=(3, 2))), num(rng.normal(size=3))  # x (2) -> y (3)
    M = W @ W.T  # y (3) -> 3
    lin = ts.Linear(num(rng.normal(size=(3, 3))), num(rng.normal(size=3)))
    res = ts.Bilinear(num(rng.normal(size=(2, 3))), num(rng.normal(size=(2, 3))), num(rng.normal(size=(3, 2))),
                      left_bias=num(rng.normal(size=2)), residual=True)
    x = num(rng.normal(size=(4, 2)))
    y = x @ W.T + b

    def check(got, want):
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12)

    for layer in (lin, res):
        before = precompose(layer, W, b)
        assert before.exact == exact and not getattr(before, "residual", False)
        check(before(x), layer(y))
        after = postcompose(layer, M, b)
        assert after.exact == exact and not getattr(after, "residual", False)
        check(after(y), layer(y) @ M.T + b)
    mixed = precompose(lin, W.astype(float), None)  # one float operand: float64 throughout
    assert not mixed.exact and mixed.weight.dtype == np.float64
