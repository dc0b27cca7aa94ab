"""Loading defects a probe found (third round): config.json settings dropped
or defaulted without a word, a forward check against the largest output of
all, ts.save truncating to an integer dtype, a template skipping the value
checks, a config's n_layers building tables before the checkpoint is read,
verify quoting a whole line, the loader's float64 copies doubling its peak,
and messages naming the wrong cause."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
import warnings

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.io import LoadError

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from layout_twins import PaperLM  # noqa: E402
from tsalgebra.adapters import AdapterError, BilinearLayer  # noqa: E402

V, D, H = 7, 8, 2


def lm_run(root, config, n_layers=1):
    """A language-model run (config.json: the sizes, then ``config``) of a
    float64 PaperLM with attn_scale 0.5; returns the torch model."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(
        {**dict(vocab_size=V, d_model=D, n_head=H, n_layers=n_layers), **config}))
    torch.manual_seed(0)
    lm = PaperLM(V, D, H, n_layers, 0.5, True).double().eval()
    torch.save({"model_state_dict": lm.state_dict()}, root / "checkpoints" / "step_00000.pt")
    return lm


def max_rel_error(model, lm):
    ids = torch.randint(0, V, (5, 4), generator=torch.Generator().manual_seed(0))
    want = lm(ids).detach().numpy()
    return float(np.abs(np.asarray(model(ids.numpy())) - want).max() / np.abs(want).max())


# --- 1: every setting of config.json is read or refused


@pytest.mark.parametrize("config, says", [
    ({"attn_scaling": 0.5}, r"settings the language-model layout does not read: \['attn_scaling'\]; it reads "
                            r"\[.*'attn_scale'"),
    ({"attn_scale": 0.5, "causal": False}, r"causal=false: this layout computes causal=true only"),
    ({"attn_scale": 0.5, "rope_theta": 500.0}, r"settings the language-model layout does not read: "
                                               r"\['rope_theta'\]; it reads \[.*'rotary_base'"),
    ({"attn_scale": 0.5, "attn_type": "quadratic"}, r"attn_type=\"quadratic\": this layout computes attn_type="),
    ({}, r"attn_scale is not given .* no default here"),
    ({"attn_scale": 0.5, "rotary_base": 10000, "rope_base": 500}, r"rotary_base 10000 and rope_base 500 .* differ"),
])
def test_a_config_setting_the_layout_does_not_read_is_refused(tmp_path, config, says):
    """A misspelt or unknown setting, or a missing attn_scale, loaded as
    another function (attn_scale 1.0, a causal model, rotary base 10,000)."""
    lm_run(tmp_path, config)
    with pytest.raises(LoadError, match=str(tmp_path / "config.json").replace("\\", "\\\\") + ": " + says):
        ts.load(tmp_path, n_ctx=4)


def test_the_papers_own_config_loads_and_rope_base_is_read(tmp_path):
    """The papers' code's config.json ("model" with its own settings at the
    values this layout computes, "init" and "train" beside it) loads as the
    torch model; rope_base is its name for rotary_base, read (it was dropped)."""
    lm = lm_run(tmp_path, {})
    (tmp_path / "config.json").write_text(json.dumps({
        "model": dict(vocab_size=V, n_ctx=256, d_model=D, n_head=H, n_layers=1, attn_scale=0.5, rope_base=10000,
                      use_rmsnorm_qk=False, use_bias_qk=True, attn_type="bilinear", norm_type="rmsnorm",
                      norm_places=[]),
        "init": {"std_embed": 0.02}, "train": {"lr": 1e-3, "seed": 0}}))
    assert max_rel_error(ts.load(tmp_path, n_ctx=4)[0], lm) < 1e-10
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["rope_base"] = 500
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ts.load(tmp_path, n_ctx=4)[0].layers[1].rotary_base == 500.0


# --- 2: the forward check compares each output with its own size


class ReluOnSmallOutput(nn.Module):
    """Bilinear attribute names; a ReLU on output 1, output 0 1e7 times larger."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
        self.down = nn.Linear(6, 2, bias=False)
        with torch.no_grad():
            self.down.weight[0] *= 1e7

    def forward(self, x):
        y = self.down(self.left(x) * self.right(x))
        return torch.stack([y[..., 0], torch.relu(y[..., 1])], -1)


def test_a_wrong_small_output_beside_a_large_one_is_refused():
    """Against the largest output of all, the ReLU's error was 4e-8 and the
    module converted as a plain Bilinear."""
    torch.manual_seed(0)
    with pytest.raises(AdapterError, match=r"forward differs \(max relative error .* at output 1\)"):
        ts.from_torch(ReluOnSmallOutput().double())


def test_round_off_on_an_output_that_cancels_to_zero_is_not_a_mismatch():
    """Output 1 is 0.1 v + 0.2 v - 0.3 v of three equal hidden units: zero
    but for round-off, computed in another order by each side."""
    torch.manual_seed(0)
    m = BilinearLayer(4, 3, 2).double()
    with torch.no_grad():
        m.left.weight[1:] = m.left.weight[0]
        m.right.weight[1:] = m.right.weight[0]
        m.down.weight[1] = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    assert ts.from_torch(m).out_features == 2


# --- 3: ts.save refuses a dtype that is not a float it can write


@pytest.mark.parametrize("dtype", [np.int64, np.complex128, "bool", np.longdouble])
def test_save_refuses_a_dtype_that_would_truncate_the_weights(tmp_path, dtype):
    m = ts.Linear(np.array([[0.377, -1.5]]))
    with pytest.raises(ValueError, match=r"save: dtype=.* is not one of float64, float32, float16"):
        ts.save(m, tmp_path / "m.safetensors", dtype=dtype)
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(ValueError, match=r"overflows float16"):
        ts.save(ts.Linear(np.array([[1e6]])), tmp_path / "m.safetensors", dtype=np.float16)
    back = ts.load(ts.save(m, tmp_path / "m.safetensors", dtype=np.float32))
    assert np.allclose(back.weight, m.weight, rtol=1e-7)


# --- 4: a template gets the native path's value checks


@pytest.mark.parametrize("value, says", [
    (torch.full((6, 4), 2**60 + 1, dtype=torch.int64), r"0\.left\.weight: integer weight 1152921504606846977"),
    (torch.ones(6, 4, dtype=torch.bool), r"0\.left\.weight: dtype bool"),
    (torch.full((6, 4), float("nan")), r"0\.left\.weight contains NaN"),
])
def test_a_template_load_checks_values_as_the_native_one(tmp_path, value, says):
    """load_state_dict cast 2**60 + 1 to 1.152921504606847e18 and bool to
    0/1 in the float64 copy, and the load went on."""
    build = lambda: nn.Sequential(BilinearLayer(4, 6, 3))  # noqa: E731
    sd = build().state_dict()
    sd["0.left.weight"] = value
    torch.save(sd, tmp_path / "w.pt")
    for template in (None, build):
        with pytest.raises(LoadError, match=r"w\.pt: " + says):
            ts.load(tmp_path / "w.pt", template=template)


def test_a_bool_buffer_of_the_template_still_loads(tmp_path):
    class Masked(nn.Module):  # a bool buffer (a mask) beside the weights: copied bool into bool
        def __init__(self):
            super().__init__()
            self.left, self.right, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)
            self.register_buffer("mask", torch.ones(3, dtype=torch.bool))

        def forward(self, x):
            return self.down(self.left(x) * self.right(x))

    torch.save(Masked().state_dict(), tmp_path / "m.pt")
    assert ts.load(tmp_path / "m.pt", template=Masked).out_features == 3


# --- 5: config sizes against the checkpoint before anything is built


def test_a_layer_count_that_disagrees_is_named_as_such(tmp_path):
    """It was blamed on use_bias_qk ('layers.1.q1.bias is missing')."""
    lm_run(tmp_path, {"attn_scale": 0.5, "use_bias_qk": True, "n_layers": 2})
    with pytest.raises(LoadError, match=r"step_00000\.pt: the configuration says n_layers=2, but the checkpoint "
                                        r"holds 1 layer \(layers\.0\): no key of layers\.1"):
        ts.load(tmp_path, n_ctx=4)


@pytest.mark.parametrize("sizes", [{"n_layers": 10**6}, {"d_model": 10**12, "n_head": 1}])
def test_huge_config_sizes_are_checked_against_the_checkpoint_first(tmp_path, sizes):
    """n_layers=10**6 built per-layer tables for 25 s; a d_model of 10**12
    allocated its rotary permutation before the weights' shapes were read."""
    lm_run(tmp_path, {"attn_scale": 0.5, **sizes})
    start = time.perf_counter()
    with pytest.raises(LoadError, match=r"the configuration says n_layers|embed\.weight has shape \(7, 8\)"):
        ts.load(tmp_path, n_ctx=4)
    assert time.perf_counter() - start < 2


# --- 6: verify quotes a short prefix of a line and bounds the file


def test_a_long_line_is_quoted_by_its_prefix_only():
    from tsalgebra.cli import parse_formulas

    for line in ("\x00" * 100_000, "x1 + " + "y " * 50_000):
        with pytest.raises(ValueError) as err:
            parse_formulas(line, ["x1", "x2"], "c.txt")
        assert len(str(err.value)) < 400 and "c.txt:1:" in str(err.value)


def test_a_circuit_file_over_the_bound_is_refused_before_it_is_read(tmp_path, capsys, monkeypatch):
    from tsalgebra import cli

    component = ts.save(ts.Linear(np.ones((1, 2))), tmp_path / "m.safetensors")
    monkeypatch.setattr(cli, "MAX_CIRCUIT_BYTES", 100)
    circuit = tmp_path / "c.txt"
    circuit.write_text("x1 + x2\n" * 20)
    assert cli.main(["verify", str(circuit), str(component)]) == 1
    assert "c.txt: over 100 bytes, the limit for a text file of formulas" in capsys.readouterr().err
    circuit.write_text("x1 + x2\n" * 3)  # more formulas than outputs: said before sympy reads them
    assert cli.main(["verify", str(circuit), str(component)]) == 1
    assert "the circuit has 3 outputs (one formula a line), the component 1" in capsys.readouterr().err


# --- 7: the loader's peak stays near the declared float64 bytes


def test_loading_holds_about_the_declared_float64_bytes(tmp_path):
    """A stride-0 view declaring n x n: a float64 copy of it, then the
    layer's own copy, peaked at twice the bound (numpy's allocations,
    which tracemalloc counts)."""
    n = 400
    path = tmp_path / "tiny.pt"
    torch.save({"weight": torch.ones(1).expand(n, n)}, path)
    bound = 8 * n * n
    with pytest.raises(LoadError, match="max_bytes"):
        ts.load(path, max_bytes=bound - 1)
    tracemalloc.start()
    try:
        model = ts.load(path, max_bytes=bound)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert model.weight.shape == (n, n) and peak < 1.4 * bound, peak / bound


# --- 8: messages that named the wrong cause, and library errors


def test_a_torchscript_archive_is_named_without_torchs_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's own, on writing the archive
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(4, 3))), tmp_path / "s.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(LoadError, match=r"s\.pt: a TorchScript archive"):
            ts.load(tmp_path / "s.pt")


def test_a_state_dict_of_numpy_arrays_is_named(tmp_path):
    torch.save({"weight": np.ones((3, 4))}, tmp_path / "n.pt")
    with pytest.raises(LoadError, match=r"n\.pt: refused: the torch file holds numpy arrays"):
        ts.load(tmp_path / "n.pt")


def test_a_truncated_safetensors_file_with_a_128_byte_header_is_not_called_a_torch_file(tmp_path):
    header = json.dumps({"weight": {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 32]}}).encode().ljust(128)
    (tmp_path / "t.safetensors").write_bytes(struct.pack("<Q", 128) + header[:60])
    with pytest.raises(LoadError, match=r"t\.safetensors: truncated safetensors file: header claims 128 bytes"):
        ts.load(tmp_path / "t.safetensors")


def test_save_and_load_argument_errors_are_named(tmp_path):
    m = ts.Linear(np.ones((2, 3)))
    with pytest.raises(TypeError, match=r"save: metadata must map strings to strings .*'step': int"):
        ts.save(m, tmp_path / "a.safetensors", metadata={"step": 5})
    with pytest.raises(FileNotFoundError, match=r"nope: no such directory"):
        ts.save(m, tmp_path / "nope" / "a.safetensors")
    path = ts.save(m, tmp_path / "a.safetensors", metadata={"step": "5"})
    with pytest.raises(ValueError, match=r"max_bytes=None: the bound .* must be a positive integer"):
        ts.load(path, max_bytes=None)


def test_hidden_files_in_a_directory_are_skipped(tmp_path):
    """A macOS AppleDouble companion ('._step_1.safetensors') failed the whole folder."""
    m = ts.Linear(np.ones((2, 3)))
    ts.save(m, tmp_path / "step_1.safetensors")
    ts.save(m, tmp_path / "step_2.safetensors")
    (tmp_path / "._step_1.safetensors").write_bytes(b"\x00\x05\x16\x07" + b"\0" * 80)
    assert ts.load(tmp_path).names == ("step_1", "step_2")


def test_a_relu_acting_on_a_tenth_of_inputs_is_caught():
    """Failed before: the forward check ran 8 random inputs, all of which
    missed the region (about 10 % of inputs) where the ReLU acts, and the
    conversion was accepted 66 % wrong there; a narrow model now gets 64."""
    import torch
    from torch import nn

    class GLUHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.left, self.right, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)
            with torch.no_grad():
                self.down.weight[0] *= 1e7

        def forward(self, x):
            y = self.down(self.left(x) * self.right(x))
            return torch.stack([y[..., 0], torch.relu(y[..., 1])], -1)

    torch.manual_seed(0)
    with pytest.raises(ts.AdapterError, match="output 1"):
        ts.from_torch(GLUHead().double().eval())
