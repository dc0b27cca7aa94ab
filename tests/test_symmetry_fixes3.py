"""Symmetry checks relative to the transform's own scale, and argument messages.

1. map_query_key's rotary commutation test was absolute (1e-12): 1e-13 times a
   random matrix was accepted as a Symmetry and changed a model's outputs by
   74 %.  Now |A R - R A| / |A| is tested, the same at every scale of A; the
   other range checks (inverse, rescaling factors, transformed weights) too.
2. Argument-type errors say what is wrong: a torch module is not a tsalgebra
   model (convert it with ts.from_torch); an index argument must be an integer.
"""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.attention import rotary_matrices
from tsalgebra.invariance import check_invariance
from tsalgebra.symmetries import (ROTARY_COMMUTATOR_TOL, _rotary_commutator, change_wire_basis, map_query_key,
                                  map_value_output, permute_heads, permute_hidden, random_symmetry, rescale_hidden,
                                  swap_left_right, swap_query_key_factors, unfold_residual)

SCALES = (1e-13, 1e-5, 1.0, 1e5, 1e13)
EPS = np.finfo(float).eps


def _rot2(t: float) -> np.ndarray:
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _rotary_attention(rng, dh=4, d=4, n=3):
    """One rotary attention layer (2 heads, biases on q1 and v)."""
    return ts.BilinearAttention(*(rng.normal(size=(2, dh, d)) for _ in range(5)), rng.normal(size=(2, d, dh)),
                                rotary_base=10000.0, causal=True, n_ctx=n, q1_bias=rng.normal(size=(2, dh)),
                                v_bias=rng.normal(size=(2, dh)))


def _torch_rotary_model():
    """The probe's model: Embedding -> rotary attention -> Linear, from torch."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from tsalgebra.adapters import BilinearAttentionModule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(8, 8), BilinearAttentionModule(2, 4, 8, n_ctx=3, bias=True, causal=True,
                        rotary_base=10000.0, residual=True), nn.Linear(8, 8, bias=False)).double().eval()
    return ts.from_torch(net)


def _genuine(rng, dh, scale, ulps=4):
    """A map commuting with every rotation in exact arithmetic (a scaled 2x2
    rotation per pair, the odd last dimension scaled), times ``scale``, with
    ``ulps`` ulps of relative round-off in every entry."""
    A = np.zeros((dh, dh))
    for k in range(0, dh - 1, 2):
        A[k:k + 2, k:k + 2] = np.exp(rng.normal(0.0, 1.0)) * _rot2(rng.uniform(0, 2 * np.pi))
    if dh % 2:
        A[-1, -1] = np.exp(rng.normal(0.0, 1.0))
    return scale * A * (1 + ulps * EPS * rng.uniform(-1, 1, A.shape))


# ------------------------------------------------ 1. rotary commutation


@pytest.mark.parametrize("scale", [1e-13, 1.0, 1e13])
def test_a_scaled_non_commuting_matrix_is_refused_at_every_scale(scale):
    m = _torch_rotary_model()
    A = scale * np.random.default_rng(0).normal(size=(4, 4))  # far from commuting (|AR - RA| ~ |A|)
    with pytest.raises(ValueError, match="must commute with the rotations"):
        map_query_key(1, 1, 0, A)(m)


@pytest.mark.parametrize("scale", SCALES)
def test_a_nearly_commuting_matrix_is_refused_at_every_scale(scale):
    # a genuine map moved by 1e-10 of its size: a change 1e4 times round-off
    rng = np.random.default_rng(1)
    a = _rotary_attention(rng)
    G = _genuine(rng, 4, scale, ulps=0)
    with pytest.raises(ValueError, match="must commute"):
        map_query_key(0, 2, 1, G + 1e-10 * np.linalg.norm(G) * rng.normal(size=(4, 4)))(a)


@pytest.mark.parametrize("scale", SCALES)
def test_a_genuine_rotary_map_with_round_off_is_accepted_and_invariant(scale):
    rng = np.random.default_rng(2)
    m = _torch_rotary_model()
    A = _genuine(rng, 4, scale)
    assert _rotary_commutator(m.layers[1], A) > 0  # the round-off is really there
    s = map_query_key(1, 1, 0, A)
    moved = s(m)
    ids = rng.integers(0, 8, size=(64, 3))
    assert np.abs(moved(ids) - m(ids)).max() <= 1e-12 * np.abs(m(ids)).max()
    assert check_invariance(m, s).invariant
    # both factors and both heads of a bare layer, with Gaussian inputs
    a = _rotary_attention(rng)
    for factor, head in ((1, 0), (2, 1)):
        assert check_invariance(a, map_query_key(0, factor, head, _genuine(rng, 4, scale))).invariant


@pytest.mark.parametrize("dh", [1, 2, 3, 5, 8])
def test_the_pairwise_commutator_equals_the_dense_one(dh):
    # the check works pair by pair (O(n dh^2)); it must agree with A R - R A
    rng = np.random.default_rng(dh)
    a = _rotary_attention(rng, dh=dh, n=11)
    for A in (rng.normal(size=(dh, dh)), _genuine(rng, dh, 1.0)):
        dense = max(np.linalg.norm(A @ r - r @ A) for r in rotary_matrices(11, dh, 10000.0)) / np.linalg.norm(A)
        assert _rotary_commutator(a, A) == pytest.approx(dense, rel=1e-9, abs=1e-15)
    assert _rotary_commutator(a, _genuine(rng, dh, 1e13)) <= ROTARY_COMMUTATOR_TOL


def test_the_commutator_check_is_fast_for_wide_heads_and_long_contexts():
    # dh = 64 over 1024 positions: dense products took seconds per call
    import time

    rng = np.random.default_rng(3)
    a = ts.BilinearAttention(*(rng.normal(size=(1, 64, 8)) for _ in range(5)), rng.normal(size=(1, 8, 64)),
                             rotary_base=10000.0, n_ctx=1024)
    t = time.perf_counter()
    assert _rotary_commutator(a, _genuine(rng, 64, 1.0)) <= ROTARY_COMMUTATOR_TOL
    assert time.perf_counter() - t < 10.0


# ------------------------------------------- other checks, at any scale


@pytest.mark.parametrize("scale", SCALES)
def test_well_conditioned_maps_are_accepted_at_every_scale(scale):
    rng = np.random.default_rng(4)
    model = ts.Sequential(ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(3, 4)),
                                      down_bias=rng.normal(size=3)), ts.Linear(rng.normal(size=(2, 3))))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    assert check_invariance(model, change_wire_basis(0, scale * q, rng.normal(size=3))).invariant
    a = _rotary_attention(rng)
    assert check_invariance(a, map_value_output(0, 1, scale * rng.normal(size=(4, 4)))).invariant


@pytest.mark.parametrize("scale", SCALES)
def test_singular_maps_are_refused_at_every_scale(scale):
    rng = np.random.default_rng(5)
    S = rng.normal(size=(3, 3))
    S[2] = S[0] + S[1] + 1e-15 * rng.normal(size=3)  # singular but for round-off
    with pytest.raises(ValueError, match="singular or ill-conditioned"):
        change_wire_basis(0, scale * S)
    with pytest.raises(ValueError, match="singular or ill-conditioned"):
        map_value_output(0, 0, scale * np.pad(S, ((0, 1), (0, 1))))


def test_maps_beyond_float64_are_refused_by_name():
    rng = np.random.default_rng(6)
    model = ts.Sequential(ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(3, 4))),
                          ts.Linear(rng.normal(size=(2, 3))))
    # 1e-310 * I: its inverse is inf (the consumer failed on "left contains NaN or Inf")
    with pytest.raises(ValueError, match="beyond float64"):
        change_wire_basis(0, 1e-310 * np.eye(3))
    # in range itself, but the weights it multiplies leave float64
    big = ts.Sequential(ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 1e200 * rng.normal(size=(3, 4))),
                        ts.Linear(rng.normal(size=(2, 3))))
    with pytest.raises(ValueError, match="layer 0's down beyond float64"):
        change_wire_basis(0, 1e200 * np.eye(3))(big)
    a = _rotary_attention(rng)
    with pytest.raises(ValueError, match="beyond float64"):
        map_value_output(0, 0, 1e-300 * np.eye(4))(a.map_weights(lambda w: 1e-20 * np.asarray(w, dtype=float)))
    # a scaling that stays in range is a symmetry
    assert check_invariance(model, change_wire_basis(0, 1e-300 * np.eye(3))).invariant


def test_rescaling_keeps_every_unit_in_float64():
    rng = np.random.default_rng(7)
    model = ts.Sequential(ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(3, 4))),
                          ts.Linear(rng.normal(size=(2, 3))))
    # left 1e-320 (subnormal), right 1e300: products 1e-20 are in range, but
    # the left rows became subnormal and the outputs moved by 1.8e-4
    with pytest.raises(ValueError, match="beyond float64"):
        rescale_hidden(0, [1.0, 1e-320, 1.0, 1.0], [1.0, 1e300, 1.0, 1.0])(model)
    with pytest.raises(ValueError, match="beyond float64"):
        rescale_hidden(0, 1e-160, 1e-160)(model)  # products 1e-320
    assert check_invariance(model, rescale_hidden(0, [1e-300, 1, 1, 1e100], [1e150, 1, -1, 1e-200])).invariant


@pytest.mark.parametrize("tiny", [1e-8, 1e-17])
def test_random_symmetry_on_a_wire_with_a_nearly_dead_coordinate(tiny):
    # a coordinate tiny times the others was taken as its own size: the
    # random change of basis had condition number 1e16 and was refused
    rng = np.random.default_rng(8)
    W = rng.normal(size=(3, 4))
    W[1] *= tiny
    model = ts.Sequential(ts.Linear(W, rng.normal(size=3) * np.array([1.0, tiny, 1.0])),
                          ts.Linear(rng.normal(size=(2, 3))))
    assert check_invariance(model, random_symmetry(model, 0)).invariant


# ------------------------------------------------------------ 2. messages


def test_a_torch_module_is_named_as_one_with_the_conversion():
    torch = pytest.importorskip("torch")
    module = torch.nn.Linear(2, 2)
    for call in (lambda: permute_hidden(0, [0, 1])(module), lambda: random_symmetry(module),
                 lambda: unfold_residual(module)):
        with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear, which is not a tsalgebra model"
                                            r".*ts\.from_torch\(module\)"):
            call()
    with pytest.raises(TypeError, match="got list, which is not a tsalgebra model$"):
        swap_left_right(0)([1, 2])


@pytest.mark.parametrize("call, match", [
    (lambda: permute_hidden("0", [0, 1, 2, 3]), r"permute_hidden: argument layer \(the layer index\) must be an "
                                                r"integer, got '0' \(str\)"),
    (lambda: permute_hidden(True, [0, 1]), r"argument layer .* got True \(bool\)"),
    (lambda: swap_left_right(0.0), r"swap_left_right: argument layer .* got 0.0 \(float\)"),
    (lambda: rescale_hidden("1", 1.0, 1.0), "rescale_hidden: argument layer"),
    (lambda: change_wire_basis("0", np.eye(2)), r"change_wire_basis: argument wire \(the wire index\)"),
    (lambda: permute_heads(None, [0, 1]), "permute_heads: argument layer"),
    (lambda: swap_query_key_factors("1"), "swap_query_key_factors: argument layer"),
    (lambda: map_query_key(0, 1.0, 0, np.eye(2)), "argument factor must be the integer 1 or 2"),
    (lambda: map_query_key(0, 1, "0", np.eye(2)), r"map_query_key\(layer 0, factor 1\): argument head"),
    (lambda: map_value_output(0, 0.0, np.eye(2)), r"map_value_output\(layer 0\): argument head"),
])
def test_index_arguments_must_be_integers(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_integer_kinds_are_still_taken():
    rng = np.random.default_rng(9)
    model = ts.Sequential(ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3))),
                          ts.Linear(rng.normal(size=(2, 2))))
    s = permute_hidden(np.int64(0), [2, 0, 1]).then(change_wire_basis(np.int32(0), 2 * np.eye(2)))
    assert check_invariance(model, s).invariant
    a = _rotary_attention(rng)
    assert check_invariance(a, map_query_key(np.int64(0), np.int64(2), np.int8(1), 3 * np.eye(4))).invariant
    with pytest.raises(IndexError, match="layer 5 is out of range"):
        swap_left_right(5)(model)
