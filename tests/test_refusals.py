"""What tsalgebra refuses, and never returns silently wrong (issue classes of
docs/refusals.md): each class stated as a property over bad inputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import tsalgebra as ts


def bilinear(seed, d=64, h=32, o=10):
    rng = np.random.default_rng(seed)
    return ts.Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)))


# ------------------------------------------------------------ concurrency


def test_overlapping_matrix_calls_leave_blas_threads_as_they_were():
    """Two similarity matrices computed at once (started at a barrier): the
    one-thread BLAS limit of their worker pools is held by a count, so the
    last to leave restores the original, and both results are right."""
    from tsalgebra.threads import _current_threads, blas_threads

    before = _current_threads()
    models = [bilinear(s) for s in range(24)]
    serial = np.asarray(ts.similarity_matrix(models, progress=False).values)
    barrier = threading.Barrier(2)
    out: list = [None, None]
    threads_seen: list[int] = []

    def work(k):
        barrier.wait()
        out[k] = np.asarray(ts.similarity_matrix(models, progress=False).values)
        threads_seen.append(blas_threads())

    workers = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert _current_threads() == before and blas_threads() == before
    assert threads_seen == [before, before]  # a call inside another's limit sees the count to restore
    for m in out:
        np.testing.assert_allclose(m, serial, atol=1e-12)


# ------------------------------------------------------------ formula files


@pytest.mark.parametrize("formula, why", [
    ("1e999999*x1*x2", "beyond float64"),
    ("x1^999999999", "exceeds"),
    ("x1/x2", "division by a polynomial"),
    ("(x1+x2+1)^400", "exceeds"),
    ("(x1+x2+x3+x4+1)^30*(x1+1)^30", "monomials"),
    ("x1^x2", "integer literal"),
    ("1" * 200 + "*x1", "digits"),
    ("((x1+x2)", "parentheses"),
])
def test_hostile_formulas_refused_at_once_naming_file_and_line(formula, why):
    from tsalgebra.cli import parse_formulas

    with pytest.raises(ValueError, match=why) as err:
        parse_formulas(f"# a circuit\nx1*x2\n{formula}\n", ["x1", "x2", "x3", "x4"], "circuit.txt")
    assert "circuit.txt:3" in str(err.value)  # refused by the bound, before sympy sees the line


def test_ordinary_formulas_still_parse():
    from tsalgebra.cli import parse_formulas

    exprs = parse_formulas("x1*x2/2 + 3e-2*x1^2\n(x1 + 1)**3 - x2\n", ["x1", "x2"])
    assert str(exprs[0].expand()) == "0.03*x1**2 + x1*x2/2" and exprs[1].expand().coeff("x2") == -1


# ------------------------------------------------------------ scales

from hypothesis import given, settings, strategies as st  # noqa: E402


def _stack(depth, residual, seed):
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    layers = [ts.Bilinear(w(4, 3), w(4, 3), w(3, 4), left_bias=w(4), right_bias=w(4), down_bias=w(3),
                          residual=residual) for _ in range(depth)]
    return ts.Sequential(*layers, ts.Linear(w(2, 3), w(2)))


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 3), residual=st.booleans(), k=st.integers(-200, 200), hidden=st.booleans())
def test_similarity_blind_to_scales_and_rescalings_to_1e200(depth, residual, k, hidden):
    """The output scaled by 10^k, or a hidden unit rescaled by 10^k (left x
    10^k, down / 10^k: the same function): the cosine is unchanged to 1e-9
    (it gave NaN or "zero norm" beyond 1e52 at depth 1, 1e8 at depth 3)."""
    a, b = _stack(depth, residual, 1), _stack(depth, residual, 2)
    if hidden:
        L = a.layers[0]
        left, lb, down = L.left.copy(), L.left_bias.copy(), L.down.copy()
        left[1], lb[1], down[:, 1] = left[1] * 10.0**k, lb[1] * 10.0**k, down[:, 1] / 10.0**k
        moved = a.replace(**{"0.left": left, "0.left_bias": lb, "0.down": down})
    else:
        n = len(a.layers) - 1
        moved = a.replace(**{f"{n}.weight": a.layers[-1].weight * 10.0**k, f"{n}.bias": a.layers[-1].bias * 10.0**k})
    assert abs(ts.similarity(moved, b).value - ts.similarity(a, b).value) < 1e-9


def test_log_rms_against_the_direct_formula_and_beyond_float64():
    """The output scale of canonical(): log of the root-mean-square row norm
    of blocks [x e^f, b], against the direct formula at ordinary sizes, and
    shifted exactly by log(1e300) when every entry is (no overflow)."""
    from tsalgebra.rescale import _log_rms

    rng = np.random.default_rng(3)
    x, b, f = rng.normal(size=(5, 7)), rng.normal(size=5), rng.normal(size=(1, 7))
    direct = lambda fx: 0.5 * np.log((np.sum((x * np.exp(fx)) ** 2) + np.sum(b ** 2)) / 5)  # noqa: E731
    for fx in (0.7, f):  # one scale for the block, or one per column
        assert _log_rms([(x, fx), (b, 0.0)], 5) == pytest.approx(direct(fx), rel=1e-13)
        assert _log_rms([(x * 1e300, fx), (b * 1e300, 0.0)], 5) == pytest.approx(direct(fx) + np.log(1e300), rel=1e-13)
    assert _log_rms([(x * 1e-300, 0.7), (None, 0.0)], 5) == pytest.approx(
        0.5 * np.log(np.sum((x * np.exp(0.7)) ** 2) / 5) + np.log(1e-300), rel=1e-13)
    assert _log_rms([(np.zeros((2, 3)), 0.0), (np.zeros(2), 0.0)], 2) == 0.0  # an all-zero map
    assert _log_rms([(np.array([[1.0, np.inf]]), 0.0)], 1) == 0.0


def test_products_beyond_float64_raise_naming_the_cause():
    a = _stack(1, False, 1)
    big = a.replace(**{"1.weight": a.layers[-1].weight * 1e200, "1.bias": a.layers[-1].bias * 1e200})
    with pytest.raises(OverflowError, match="overflows float64"):
        ts.inner(big, big)
    assert ts.norm(big).value == pytest.approx(ts.norm(a).value * 1e200, rel=1e-12)
    tiny = a.replace(**{"1.weight": a.layers[-1].weight * 1e-200, "1.bias": a.layers[-1].bias * 1e-200})
    assert ts.norm(tiny).value == pytest.approx(ts.norm(a).value * 1e-200, rel=1e-12)  # not "zero norm"


@pytest.mark.parametrize("bad, error, match", [
    (np.array([[1.0, np.nan]]), ValueError, "NaN or Inf"),
    (np.array([[0.5, "a"]], dtype=object), TypeError, "str entries"),
    (np.array([[0.5, float("inf")]], dtype=object), ValueError, "NaN or Inf"),
])
def test_non_finite_or_non_numeric_weights_refused_naming_the_layer(bad, error, match):
    with pytest.raises(error, match=match) as err:
        ts.Linear(bad, name="probe")
    assert "probe" in str(err.value)


def test_torch_tensors_without_values_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="meta"):
        ts.Linear(torch.empty(2, 2, device="meta"))
    assert ts.Linear(torch.ones(2, 2, dtype=torch.bfloat16)).weight.dtype == np.float64
    complex_layer = torch.nn.Linear(3, 2)
    complex_layer.weight.data = complex_layer.weight.data.to(torch.complex64)  # a cast kept the real part
    with pytest.raises(ts.AdapterError, match=r"^1: Linear: dtype torch.complex64 is complex"):
        ts.from_torch(torch.nn.Sequential(torch.nn.Linear(3, 3), complex_layer))


# ------------------------------------------------------------ files


def test_unreadable_files_are_load_errors_naming_them(tmp_path):
    import os

    from tsalgebra.io import LoadError

    with pytest.raises(LoadError, match="not a regular file"):
        ts.load("/dev/zero")
    locked = tmp_path / "locked.safetensors"
    ts.save(bilinear(0, 4, 3, 2), locked)
    os.chmod(locked, 0)
    try:
        if os.access(locked, os.R_OK):  # root reads anything: nothing to refuse
            pytest.skip("running as a user who can read a mode-000 file")
        with pytest.raises(LoadError, match=str(locked)):
            ts.load(locked)
    finally:
        os.chmod(locked, 0o644)


def test_checkpoints_bounded_before_they_are_inflated(tmp_path):
    """A deflated zip whose entries inflate far beyond their size is refused
    from its directory; a file over max_bytes too, and max_bytes raises it."""
    import zipfile

    from tsalgebra.io import LoadError

    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data/0", b"\0" * (64 * 2**20))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(LoadError, match="inflate"):
        ts.load(bomb)
    path = tmp_path / "m.safetensors"
    ts.save(bilinear(0, 4, 3, 2), path)
    with pytest.raises(LoadError, match="max_bytes"):
        ts.load(path, max_bytes=100)
    assert ts.load(path, max_bytes=10**6).in_features == 4


# ------------------------------------------------------------ conversions


def test_hooks_refused_and_adapters_checked_against_the_forward():
    torch = pytest.importorskip("torch")
    from torch import nn

    from tsalgebra.adapters import AdapterError, register_adapter, unregister_adapter

    lin = nn.Linear(3, 2).double()
    handle = lin.register_forward_hook(lambda m, i, o: torch.relu(o))
    with pytest.raises(AdapterError, match="hooks"):
        ts.from_torch(nn.Sequential(lin))
    handle.remove()
    assert ts.from_torch(nn.Sequential(lin)).out_features == 2

    class Doubled(nn.Module):  # an adapter wrong by a factor 2 used to be accepted
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 2)

        def forward(self, x):
            return 2 * self.inner(x)

    register_adapter(Doubled, lambda m, p: ts.Linear(m.inner.weight, m.inner.bias))
    try:
        with pytest.raises(AdapterError, match="differs from Doubled's own forward"):
            ts.from_torch(Doubled())
        assert ts.from_torch(Doubled(), check=False).out_features == 2  # the opt-out
    finally:
        unregister_adapter(Doubled)


# ------------------------------------------------------------ matrices


def test_matrix_memory_and_flops_bounded_before_preparation():
    """max_memory is honoured before the models are copied (a refusal with
    the estimate and the alternatives), and the flop budget per product
    applies to the batched routes as to ts.similarity."""
    models = [bilinear(s, 64, 32, 10) for s in range(40)]
    with pytest.raises(ts.CostError, match="preparing 40 models") as err:  # a route asked for by name
        ts.similarity_matrix(models, max_memory=200_000, route="materialize", progress=False)  # a pair fits
    assert "max_memory=" in str(err.value) and "route='pairwise'" in str(err.value)
    with pytest.raises(ts.CostError, match="per inner product"):
        ts.similarity_matrix(models, budget=10.0, progress=False)
    full = ts.similarity_matrix(models, progress=False)
    # auto: pair by pair, saying why (each pair's own plan within the bound: 1.84e5 bytes at its peak)
    paired = ts.similarity_matrix(models[:6], max_memory=200_000, progress=False)
    assert paired.route == "pairwise" and any("max_memory" in n for n in paired.notes)
    np.testing.assert_allclose(np.asarray(paired.values), np.asarray(full.values)[:6, :6], atol=1e-12)
    tight = ts.similarity_matrix(models[:4], max_memory=200_000, progress=False)  # the prepared models fit
    np.testing.assert_allclose(np.asarray(tight.values), np.asarray(full.values)[:4, :4], atol=1e-12)


@pytest.mark.parametrize("budget", [float("nan"), -1.0, "1e9", True])
def test_bad_budgets_refused_everywhere(budget):
    a, b = bilinear(0, 4, 3, 2), bilinear(1, 4, 3, 2)
    with pytest.raises(ValueError, match="budget"):
        ts.similarity(a, b, budget=budget)
    with pytest.raises(ValueError, match="budget"):
        ts.similarity_matrix([a, b], budget=budget, progress=False)


@pytest.mark.parametrize("budget", [np.int64(10**9), np.float32(1e9), 10**9])
def test_numpy_budgets_accepted(budget):
    a, b = bilinear(0, 4, 3, 2), bilinear(1, 4, 3, 2)
    assert ts.similarity(a, b, budget=budget).value == ts.similarity(a, b).value
    assert ts.similarity_matrix([a, b], budget=budget, progress=False).values[0, 1] == pytest.approx(
        ts.similarity(a, b).value, rel=1e-12)


def test_python_lists_are_inputs_too():
    a = bilinear(0, 4, 3, 2)
    np.testing.assert_allclose(a([[1.0, 2.0, 3.0, 4.0]]), a(np.array([[1.0, 2.0, 3.0, 4.0]])))
    with pytest.raises(TypeError, match="numpy array"):
        a(3.0)


def test_devices_that_are_not_here_are_named():
    torch = pytest.importorskip("torch")
    a, b = bilinear(0, 4, 3, 2), bilinear(1, 4, 3, 2)
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match="device="):
        ts.similarity_matrix([a, b], device=missing, progress=False)
    with pytest.raises(ValueError, match="device="):
        ts.similarity(a, b, method="sampled", device=missing)
    with pytest.raises(ValueError, match="not a torch device"):
        ts.similarity_matrix([a, b], device="gpu7", progress=False)


@pytest.mark.parametrize("inner", ["gaussian", "network", "symmetric"])
def test_matrix_and_pairwise_agree_at_tiny_scales(inner):
    """Depth 3 at weights 1e-30 (outputs near 1e-600): the matrix engine said
    "zero norm"; cosines and norms now agree with the pairwise API."""
    rng = np.random.default_rng(3)
    w = lambda *s: 1e-30 * rng.normal(size=s)  # noqa: E731
    ms = [ts.Sequential(*[ts.Bilinear(w(4, 4), w(4, 4), w(4, 4)) for _ in range(3)]) for _ in range(3)]
    m = ts.similarity_matrix(ms, inner=inner, progress=False)
    pair = np.array([[ts.similarity(a, b, inner=inner).value for b in ms] for a in ms])
    np.testing.assert_allclose(np.asarray(m.values), pair, atol=1e-12)
    with pytest.raises(FloatingPointError, match="underflows float64"):  # not a silent 0.0
        ts.norm(ms[0], inner=inner)


def test_deep_plain_stack_under_the_network_product():
    """Eight bias-free bilinear layers at standard initialisation: the
    network Gram shrinks by squaring at every layer (it gave NaN, then a
    false "zero norm"); pairwise and matrix now agree."""
    rng = np.random.default_rng(0)
    w = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    a, b = (ts.Sequential(*[ts.Bilinear(w(4, 4), w(4, 4), w(4, 4)) for _ in range(8)]) for _ in range(2))
    pair = ts.similarity(a, b, inner="network").value
    matrix = ts.similarity_matrix([a, b], inner="network", progress=False).values[0, 1]
    assert np.isfinite(pair) and pair == pytest.approx(matrix, rel=1e-9, abs=1e-300)


def test_weights_are_the_layers_own_and_masks_are_not_dropped():
    """Exact weights were shared with the caller's array (a later change to it
    changed the model); a masked array's hidden values were read; a NaN
    written into a weight in place gave weight_cosine nan."""
    from fractions import Fraction

    L = np.array([[Fraction(1, 3), Fraction(1)]], dtype=object)
    layer = ts.Bilinear(L, L.copy(), np.array([[Fraction(1)]], dtype=object))
    before = ts.inner(layer, layer, "symmetric").value
    L[0, 0] = Fraction(5)
    assert ts.inner(layer, layer, "symmetric").value == before
    with pytest.raises(TypeError, match="masked array"):
        ts.Linear(np.ma.masked_array([[1.0, 2.0]], mask=[[False, True]]))
    a, b = bilinear(0, 4, 3, 2), bilinear(1, 4, 3, 2)
    b.left[0, 0] = np.nan
    with pytest.raises(ValueError, match="model b has NaN or Inf weights"):
        ts.weight_cosine(a, b)


def test_subnormal_weights_are_balanced_without_overflow():
    """Bringing a layer of 5e-324 weights to unit scale multiplied them by
    e^744, which overflowed alone: 'left contains NaN or Inf entries' for a
    model whose similarities are defined (a cosine ignores the scale)."""
    import warnings

    from tsalgebra.rescale import _log_rms

    rng = np.random.default_rng(0)
    a = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
    right, down = rng.normal(size=(3, 2)), rng.normal(size=(2, 3))
    tiny, unit = (ts.Bilinear(np.full((3, 2), s), right, down) for s in (5e-324, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning on the way either
        assert ts.similarity(a, tiny).value == pytest.approx(ts.similarity(a, unit).value, rel=1e-12)
        assert ts.similarity(tiny, tiny).value == pytest.approx(1.0, rel=1e-12)
        assert _log_rms([(np.array([[1.0, np.inf]]), 0.0)], 1) == 0.0
