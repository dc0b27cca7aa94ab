"""PyTorch adapters, checkpoint loading and saving, and the matrix helper.

Every conversion is checked against the torch module's own forward in
float64 (the independent twin), never against tsalgebra's own evaluation
of something else."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tsalgebra as ts
from tsalgebra.adapters import (
    DOWN_NAMES,
    FUSED_NAMES,
    LEFT_NAMES,
    RIGHT_NAMES,
    AdapterError,
    BilinearLayer,
    Residual,
    fold_linear,
    from_torch,
    register_adapter,
    to_torch,
    unregister_adapter,
)
from tsalgebra.io import LoadError, checkpoint_paths, load, natural_key, read_state_dict, save
from tsalgebra.matrix import similarity_matrix


def forward64(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """The module's own forward, in float64, on a copy."""
    import copy

    m = copy.deepcopy(module).double()
    with torch.no_grad():
        return m(torch.as_tensor(x)).numpy()


def assert_same_function(module: nn.Module, model: ts.Component, d: int, seed: int = 0) -> None:
    x = np.random.default_rng(seed).normal(size=(7, d))
    want = forward64(module, x)
    got = model(x)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(want).max()))


class Fused(nn.Module):
    """The one-Linear-for-both-factors layout."""

    def __init__(self, d: int, h: int, o: int, fused: str = "w", down: str = "p", bias: bool = True) -> None:
        super().__init__()
        setattr(self, fused, nn.Linear(d, 2 * h, bias=bias))
        setattr(self, down, nn.Linear(h, o, bias=bias))
        self._f, self._d = fused, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = getattr(self, self._f)(x).chunk(2, dim=-1)
        return getattr(self, self._d)(left * right)


class Separate(nn.Module):
    def __init__(self, d: int, h: int, o: int, names: tuple[str, str, str], act: nn.Module | None = None) -> None:
        super().__init__()
        self.names = names
        for n, (i, j) in zip(names, ((d, h), (d, h), (h, o))):
            setattr(self, n, nn.Linear(i, j))
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l, r, dn = (getattr(self, n) for n in self.names)
        return dn(self.act(l(x)) * r(x))


class LinearProduct(nn.Linear):
    """The `Bilinear(nn.Linear)` idiom: l * r of the two output halves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = super().forward(x).chunk(2, dim=-1)
        return left * right


class Block(nn.Module):
    """A residual block by attribute convention: x + mlp(x)."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.mlp = Fused(d, h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


# ------------------------------------------------------------- conversions


def test_sequential_of_everything_matches_forward():
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(4, 5), BilinearLayer(5, 6, 5, bias=True), Residual(BilinearLayer(5, 3, 5)),
        nn.Dropout(0.3).eval(), nn.Identity(), Block(5, 4), nn.Linear(5, 2),
    )
    model = from_torch(module)
    assert isinstance(model, ts.Sequential) and len(model.layers) == 5
    assert_same_function(module, model, 4)
    assert module[3].training is False  # from_torch leaves modes alone


@pytest.mark.parametrize("names", [("left", "right", "down"), ("w_l", "w_r", "proj"), ("l", "r", "d"),
                                   ("left_proj", "right_proj", "down_proj"), ("w1", "w2", "w3")])
def test_separate_layouts(names):
    torch.manual_seed(1)
    m = Separate(3, 5, 2, names)
    model = from_torch(m)
    assert isinstance(model, ts.Bilinear) and model.hidden == 5
    assert_same_function(m, model, 3)


@pytest.mark.parametrize("fused,down", [("w", "p"), ("in_proj", "out_proj"), ("w_in", "down"), ("up", "proj")])
def test_fused_layouts(fused, down):
    torch.manual_seed(2)
    m = Fused(4, 3, 2, fused, down)
    assert_same_function(m, from_torch(m), 4)


def test_documented_names_are_disjoint_enough():
    assert not set(LEFT_NAMES) & set(RIGHT_NAMES)
    assert "w" in FUSED_NAMES and "down" in DOWN_NAMES


def test_linear_subclass_idiom_and_residual_conventions():
    torch.manual_seed(3)
    lp = LinearProduct(4, 6)
    model = from_torch(lp)
    assert isinstance(model, ts.Bilinear) and model.out_features == 3
    assert_same_function(lp, model, 4)
    blk = Block(4, 3)
    model = from_torch(blk)
    assert isinstance(model, ts.Bilinear) and model.residual
    assert_same_function(blk, model, 4)


def test_residual_folds_linear_and_nested_residuals():
    torch.manual_seed(4)
    m = Residual(nn.Sequential(nn.Linear(4, 4), Residual(BilinearLayer(4, 3, 4, bias=True)), nn.Linear(4, 4)))
    model = from_torch(m)
    assert isinstance(model, ts.Bilinear)
    assert_same_function(m, model, 4)
    lin = Residual(nn.Linear(3, 3))
    assert isinstance(from_torch(lin), ts.Linear)
    assert_same_function(lin, from_torch(lin), 3)


def test_fold_linear_and_to_torch_round_trip():
    torch.manual_seed(5)
    module = nn.Sequential(nn.Linear(3, 4), BilinearLayer(4, 5, 4, bias=True), nn.Linear(4, 2))
    model = from_torch(module)
    folded = fold_linear(model)
    assert isinstance(folded, ts.Bilinear)
    x = np.random.default_rng(0).normal(size=(6, 3))
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-10, atol=1e-10)
    back = from_torch(to_torch(model, dtype=torch.float64))
    assert back.same_weights(model) or np.allclose(back(x), model(x))


@given(d=st.integers(1, 5), h=st.integers(1, 5), o=st.integers(1, 4), bias=st.booleans(), seed=st.integers(0, 99))
def test_bilinear_layer_converts_exactly(d, h, o, bias, seed):
    torch.manual_seed(seed)
    m = BilinearLayer(d, h, o, bias=bias)
    model = from_torch(m)
    np.testing.assert_array_equal(model.left, m.left.weight.detach().double().numpy())
    assert (model.left_bias is None) == (not bias)
    assert_same_function(m, model, d, seed)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("module,path,words", [
    (nn.Sequential(nn.Linear(3, 3), nn.ReLU()), "1", "ReLU"),
    (nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2)), "1", "train mode"),
    (nn.LayerNorm(3), "<root>", "normalization"),
    (nn.Sequential(nn.Linear(3, 3), nn.MultiheadAttention(3, 1)), "1", "softmax attention"),
    (nn.Sequential(nn.Linear(3, 3), nn.Softmax(-1)), "1", "softmax"),
    (nn.Sequential(nn.Conv1d(1, 1, 1)), "0", "register_adapter"),
    (nn.Identity(), "<root>", "identity"),
])
def test_refusals_name_the_module_path(module, path, words):
    with pytest.raises(AdapterError) as err:
        from_torch(module)
    assert err.value.path == path
    assert str(err.value).startswith(f"{path}: ")
    assert words in str(err.value)


def test_convention_with_a_hidden_nonlinearity_is_refused():
    bad = nn.Sequential(nn.Linear(3, 3), nn.Sequential(Separate(3, 4, 2, ("left", "right", "down"), nn.ReLU())))
    with pytest.raises(AdapterError) as err:
        from_torch(bad)
    assert err.value.path == "1.0"
    assert "1.0.act (ReLU)" in str(err.value) and "forward" in str(err.value)


def test_residual_around_two_layers_is_refused():
    with pytest.raises(AdapterError, match="Wrap each bilinear block"):
        from_torch(Residual(nn.Sequential(BilinearLayer(3, 2, 3), BilinearLayer(3, 2, 3))))


def test_dropout_p0_in_train_mode_is_the_identity():
    m = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.0))
    assert isinstance(from_torch(m), ts.Linear)


# ---------------------------------------------------------------- registry


class Doubled(nn.Module):
    """A custom layer: 2 * down(l * r), which no convention guesses."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.c(self.a(x) * self.b(x))


def test_register_adapter_for_a_custom_class():
    torch.manual_seed(6)
    m = nn.Sequential(Doubled(), nn.Linear(2, 2))
    with pytest.raises(AdapterError, match=r"^0: .*register_adapter\(Doubled"):
        from_torch(m)

    def adapt(mod: Doubled, path: str) -> ts.Bilinear:
        w = lambda t: t.detach().double().numpy()  # noqa: E731
        return ts.Bilinear(w(mod.a.weight), w(mod.b.weight), 2 * w(mod.c.weight), w(mod.a.bias), w(mod.b.bias),
                           2 * w(mod.c.bias), name=f"Doubled[{path}]")

    register_adapter(Doubled, adapt)
    try:
        model = from_torch(m)
        assert_same_function(m, model, 3)
        assert "Doubled[0]" in repr(model)
    finally:
        unregister_adapter(Doubled)


def test_register_adapter_as_decorator_and_forward_overrides():
    class Base(nn.Linear):
        pass

    class Other(Base):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # a different function: must not inherit
            return super().forward(x) ** 2

    calls = []

    @register_adapter(Base)
    def adapt(mod: nn.Module, path: str) -> ts.Linear:
        calls.append(path)
        return ts.Linear(mod.weight.detach().numpy(), mod.bias.detach().numpy())

    try:
        from_torch(nn.Sequential(Base(2, 2)))
        assert calls == ["0"]
        with pytest.raises(AdapterError):
            from_torch(Other(2, 2))
    finally:
        unregister_adapter(Base)


def test_adapter_returning_garbage_is_reported():
    class Odd(nn.Module):
        def forward(self, x):
            return x

    register_adapter(Odd, lambda m, p: "not a model")
    try:
        with pytest.raises(AdapterError, match="returned str"):
            from_torch(nn.Sequential(Odd()))
    finally:
        unregister_adapter(Odd)


# -------------------------------------------------------------------- io


def _native(tmp_path, name="m.safetensors", seed=0):
    rng = np.random.default_rng(seed)
    model = ts.Sequential(
        ts.Linear(rng.normal(size=(5, 4))),
        ts.Bilinear(rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), rng.normal(size=(5, 6)),
                    left_bias=rng.normal(size=6), residual=True),
        ts.Linear(rng.normal(size=(2, 5)), rng.normal(size=2)),
    )
    return model, save(model, tmp_path / name)


def test_save_load_round_trip_is_exact(tmp_path):
    model, path = _native(tmp_path)
    back = load(path)
    assert back.same_weights(model)
    x = np.random.default_rng(1).normal(size=(3, 4))
    np.testing.assert_array_equal(back(x), model(x))


def test_single_layer_native_layout_without_index(tmp_path):
    from safetensors.torch import save_file

    m = BilinearLayer(3, 4, 2, bias=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "one.safetensors"))
    model = load(tmp_path / "one.safetensors")
    assert_same_function(m, model, 3)


def test_directory_in_natural_order_with_training_dicts(tmp_path):
    for s in (10, 2, 100, 1):
        torch.manual_seed(s)
        torch.save({"step": s, "model": BilinearLayer(3, 2, 2).state_dict(), "note": "x"}, tmp_path / f"step_{s}.pt")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step_1.pt", "step_2.pt", "step_10.pt", "step_100.pt"]
    models = load(tmp_path)
    assert len(models) == 4
    torch.manual_seed(2)
    assert_same_function(BilinearLayer(3, 2, 2), models[1], 3)
    assert natural_key("step_2") < natural_key("step_10")


def test_template_module_and_builder(tmp_path):
    torch.manual_seed(7)
    src = nn.Sequential(Fused(4, 3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    torch.save(src.state_dict(), tmp_path / "ck.pt")
    template = nn.Sequential(Fused(4, 3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in template.state_dict().items()}
    model = load(tmp_path / "ck.pt", template=template)
    src.eval()
    assert_same_function(src, model, 4)
    assert all(torch.equal(before[k], v) for k, v in template.state_dict().items())  # not mutated
    assert template.training  # mode untouched too
    model2 = load(tmp_path / "ck.pt", template=lambda: nn.Sequential(Fused(4, 3, 4), nn.Dropout(0.5), nn.Linear(4, 2)))
    assert model2.same_weights(model)
    with pytest.raises(LoadError, match=r"ck\.pt: .*size mismatch"):
        load(tmp_path / "ck.pt", template=nn.Sequential(Fused(4, 5, 4), nn.Dropout(0.5), nn.Linear(4, 2)))


def test_refuses_pickled_objects(tmp_path):
    torch.save(BilinearLayer(3, 2, 2), tmp_path / "whole.pt")  # a module object, not a state dict
    with pytest.raises(LoadError, match=r"whole\.pt: refused: the torch file holds Python objects .*weights_only=True") as err:
        load(tmp_path / "whole.pt")
    assert "malformed" not in str(err.value)  # the reason is known: no guess beside it


def test_malformed_and_truncated_files_name_the_file(tmp_path):
    _, good = _native(tmp_path)
    raw = good.read_bytes()
    torch.save(BilinearLayer(3, 2, 2).state_dict(), tmp_path / "ok.pt")
    cases = {
        "head.safetensors": raw[:40],  # header cut
        "data.safetensors": raw[:-16],  # tensor data cut
        "zip.pt": (tmp_path / "ok.pt").read_bytes()[:200],
        "empty.pt": b"",
        "junk.bin": b"hello, not a checkpoint",
        "badjson.safetensors": struct.pack("<Q", 4) + b"{xx}",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LoadError) as err:
            load(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)), str(err.value)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(LoadError, match="no checkpoint files"):
        load(empty)


def test_native_layout_errors(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(3)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(LoadError, match="native layout"):
        load(tmp_path / "odd.safetensors")
    save_file({"0.weight": torch.zeros(2, 2), "2.weight": torch.zeros(2, 2)}, str(tmp_path / "gap.safetensors"))
    # its header is 128 bytes: the first byte, 0x80, is also a pickle's; still read as safetensors (numpy arrays)
    assert (tmp_path / "gap.safetensors").read_bytes()[0] == 0x80
    assert isinstance(read_state_dict(tmp_path / "gap.safetensors")["0.weight"], np.ndarray)
    with pytest.raises(LoadError, match="not 0..1"):
        load(tmp_path / "gap.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(LoadError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_half_precision_checkpoints_load_as_float64(tmp_path):
    from safetensors.torch import save_file

    m = BilinearLayer(3, 2, 2).to(torch.bfloat16)
    save_file({f"0.{k}": v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "bf16.safetensors"))
    model = load(tmp_path / "bf16.safetensors")
    assert model.left.dtype == np.float64
    np.testing.assert_array_equal(model.left, m.left.weight.detach().float().numpy())


def test_save_refuses_exact_weights(tmp_path):
    from fractions import Fraction

    obj = np.array([[Fraction(1)]], dtype=object)
    with pytest.raises(TypeError, match="exact"):
        save(ts.Linear(obj), tmp_path / "x.safetensors")


# --------------------------------------------------------- matrix, pair by pair


def test_pairwise_route_matches_similarity_and_plots(tmp_path):
    rng = np.random.default_rng(3)
    models = [ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))) for _ in range(3)]
    res = similarity_matrix(models, "symmetric", route="pairwise", progress=False)
    assert res.values.shape == (3, 3) and np.allclose(np.diag(res.values), 1)
    assert np.isclose(res.values[0, 2], ts.similarity(models[0], models[2], "symmetric").value, rtol=1e-12)
    assert res.exact and res.inner == "symmetric" and res.flops > 0
    auto = similarity_matrix(models, inner="symmetric", progress=False)
    np.testing.assert_allclose(np.asarray(auto.values), res.values, rtol=1e-9, atol=1e-12)
    res.plot(tmp_path / "m.png", labels=["a", "b", "c"])
    assert (tmp_path / "m.png").stat().st_size > 0
    zero = ts.Bilinear(np.zeros((3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3)))
    with pytest.raises(ValueError, match="zero norm"):
        similarity_matrix([models[0], zero], "symmetric", route="pairwise", progress=False)


@pytest.mark.parametrize("flags", [{}, {"causal": True, "rotary_base": 10.0, "residual": True, "bias": True}])
def test_attention_module_converts(flags):
    from tsalgebra.adapters import BilinearAttentionModule

    torch.manual_seed(0)
    module = BilinearAttentionModule(2, 2, 3, n_ctx=4, scale=0.5, **flags).double()
    model = ts.from_torch(module)
    assert isinstance(model, ts.BilinearAttention) and model.n_ctx == 4
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    np.testing.assert_allclose(model(x.numpy()), module(x).detach().numpy(), rtol=1e-12, atol=1e-12)
    assert ts.similarity(model, ts.from_torch(module), "symmetric").value == pytest.approx(1, abs=1e-12)
