"""Loading and conversion defects a probe found: a forward check that was
absolute for small outputs, a float32 template rounding float64 weights, a
language-model checkpoint missing an optional key, and library exceptions or
vague messages where a named error belongs."""

from __future__ import annotations

import json
import re
import struct
import warnings

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.io import LoadError

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from layout_twins import PaperLM  # noqa: E402
from tsalgebra.adapters import AdapterError, BilinearLayer  # noqa: E402


def lm_run(root, sd_hook=None, config=None, n_layers=2, bias_qk=True):
    """A language-model run in the papers' layout (config.json, checkpoints/step_00000.pt)."""
    cfg = dict(vocab_size=7, d_model=8, n_head=2, n_layers=n_layers, attn_scale=0.5, use_bias_qk=bias_qk)
    cfg.update(config or {})
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    torch.manual_seed(0)
    lm = PaperLM(7, 8, 2, n_layers, 0.5, bias_qk).double().eval()
    sd = lm.state_dict()
    path = root / "checkpoints" / "step_00000.pt"
    torch.save({"model_state_dict": sd_hook(sd) if sd_hook else sd}, path)
    return lm, path


# --- 1: the forward check is relative to the outputs' own size


class _GLUrelu(nn.Module):
    """Bilinear attribute names, a ReLU in the forward, a small output layer."""

    def __init__(self):
        super().__init__()
        self.left, self.right, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
        with torch.no_grad():
            for p in self.down.parameters():
                p.mul_(1e-7)

    def forward(self, x):
        return self.down(torch.relu(self.left(x)) * self.right(x))


def test_a_hidden_relu_is_refused_however_small_the_outputs():
    """max(1, |out|) made the 1e-6 tolerance absolute below 1: the ReLU module
    scaled by 1e-7 was accepted as a plain Bilinear."""
    torch.manual_seed(0)
    with pytest.raises(AdapterError, match=r"<root>: _GLUrelu .* forward differs \(max relative error"):
        ts.from_torch(_GLUrelu().double())


def test_small_and_zero_outputs_of_a_true_conversion_are_accepted():
    torch.manual_seed(0)
    small = BilinearLayer(4, 6, 3)
    with torch.no_grad():
        small.down.weight.mul_(1e-9)
    assert ts.from_torch(small).down.max() < 1e-8  # small outputs, computed exactly: accepted (float32 module)
    zero = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        zero.weight.zero_()
    assert not ts.from_torch(zero).weight.any()  # zero against zero is a match


def test_zero_outputs_against_nonzero_ones_are_refused():
    from tsalgebra.adapters import _forward_mismatch

    zero = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        zero.weight.zero_()
    assert _forward_mismatch(zero, ts.Linear(np.ones((3, 4))))[0] == float("inf")
    assert _forward_mismatch(nn.Linear(4, 3), ts.Linear(np.zeros((3, 4))))[0] == 1.0  # all of it differs


def test_a_forward_that_fails_in_float64_is_named():
    """It was 'max relative error inf', hiding the module's own exception."""
    class Float32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 3)

        def forward(self, x):
            return self.inner(x.float())  # float32 input against the float64 weights of the check

    with pytest.raises(AdapterError, match=r"its forward raised RuntimeError in float64: .*dtype"):
        ts.from_torch(Float32Only())


# --- 2: a float32 template does not round float64 weights


def test_a_float32_template_loads_float64_weights_exactly(tmp_path):
    def build():
        return nn.Sequential(nn.Linear(4, 6), BilinearLayer(6, 8, 3))

    torch.manual_seed(0)
    src = build().double()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1e-9 * torch.randn_like(p))  # below float32's resolution
    path = tmp_path / "ck64.pt"
    torch.save(src.state_dict(), path)
    via_template = ts.load(path, template=build)
    assert via_template.same_weights(ts.from_torch(src))
    assert via_template.same_weights(ts.load(path))
    torch.save({k: torch.full_like(v, 2**24 + 1, dtype=torch.int64) for k, v in build().state_dict().items()},
               tmp_path / "int.pt")
    assert ts.load(tmp_path / "int.pt", template=build).layers[0].weight[0, 0] == 2**24 + 1
    template = build()
    ts.load(path, template=template)
    assert next(template.parameters()).dtype == torch.float32  # the template itself is not modified


# --- 3: optional keys of the language-model layout


@pytest.mark.parametrize("case,missing", [
    ("layers.1.v.bias", "layers.1.v.bias"),
    ("layers.1.o.bias", "layers.0.o.bias"),
    ("layers.0.q2.bias", "layers.0.q2.bias"),
])
def test_a_language_model_key_missing_from_part_of_the_model_is_refused(tmp_path, case, missing):
    """A bias present in one layer but not another loaded as another
    function (the final norm's gain or scale alone is one of the layout's
    variants: it loads)."""
    def hook(sd):
        if case == "layers.1.v.bias":
            sd["layers.0.v.bias"] = torch.ones(8, dtype=torch.float64)
        elif case == "layers.1.o.bias":
            sd["layers.1.o.bias"] = torch.ones(8, dtype=torch.float64)
        else:
            del sd[case]
        return sd

    config = {"use_bias_qk": None} if case == "layers.0.q2.bias" else {}  # unsaid: the biases present are used
    _, path = lm_run(tmp_path, hook, config)
    with pytest.raises(LoadError, match=re.escape(f"{path}: {missing} is missing, but the state dict has")):
        ts.load(tmp_path, n_ctx=4)


def test_a_language_model_without_any_final_norm_still_loads(tmp_path):
    """Absent throughout: a model without a final norm (the demo's), read exactly."""
    lm, _ = lm_run(tmp_path, lambda sd: {k: v for k, v in sd.items() if not k.startswith("final_norm.")})
    lm.final_norm = nn.Identity()
    ids = torch.randint(0, 7, (5, 4), generator=torch.Generator().manual_seed(0))
    got = np.asarray(ts.load(tmp_path, n_ctx=4)[0](ids.numpy()))
    np.testing.assert_allclose(got, lm(ids).detach().numpy(), rtol=1e-10, atol=1e-12)


def test_a_zero_final_norm_scale_is_named_without_a_warning(tmp_path):
    lm_run(tmp_path, lambda sd: {**sd, "final_norm.scale": torch.tensor(0.0, dtype=torch.float64)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's divide-by-zero warning leaked before the error
        with pytest.raises(LoadError, match=r"step_00000\.pt: final_norm\.scale is zero"):
            ts.load(tmp_path, n_ctx=4)


# --- 4: corrupted torch zips


def _corrupt(raw: bytes, how: str) -> bytes:
    b = bytearray(raw)
    cd = raw.rfind(b"PK\x01\x02")  # the last central-directory entry
    if how == "name":
        b[cd + 46] = 0xFF  # a non-UTF-8 byte in a name flagged UTF-8
    elif how == "version":
        b[cd + 6 : cd + 8] = struct.pack("<H", 182)
    else:  # a zip64 end-of-directory locator counting several disks
        loc = raw.rfind(b"PK\x06\x07")
        assert loc >= 0
        b[loc + 16 : loc + 20] = struct.pack("<I", 5)
    return bytes(b)


@pytest.mark.parametrize("how", ["name", "version", "disks"])
def test_a_corrupted_zip_directory_is_a_load_error_naming_the_file(tmp_path, how):
    """UnicodeDecodeError, NotImplementedError and BadZipFile escaped."""
    ok = tmp_path / "ok.pt"
    torch.save({"0.weight": torch.randn(3, 4)}, ok)
    path = tmp_path / f"bad_{how}.pt"
    path.write_bytes(_corrupt(ok.read_bytes(), how))
    with pytest.raises(LoadError, match=re.escape(f"{path}: malformed torch checkpoint")):
        ts.load(path)


# --- 5: a template builder that raises


@pytest.mark.parametrize("error", [AttributeError, ZeroDivisionError])
def test_a_template_builder_that_raises_is_a_load_error_naming_it(tmp_path, error):
    path = tmp_path / "a.pt"
    torch.save({"0.weight": torch.randn(3, 4)}, path)

    def build():
        raise error("typo in the model code")

    with pytest.raises(LoadError, match=re.escape(f"{path}: the template builder ") + r".*build\(\) raised "
                       + error.__name__ + ": typo in the model code"):
        ts.load(path, template=build)


# --- 6: state_key on a file that is itself a state dict


def test_state_key_reads_a_plain_state_dict_as_it_is(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(BilinearLayer(4, 6, 3))
    ema = nn.Sequential(BilinearLayer(4, 6, 3))
    torch.save(m.state_dict(), tmp_path / "plain.pt")
    torch.save({"model": m.state_dict(), "ema": ema.state_dict()}, tmp_path / "both.pt")
    with pytest.warns(UserWarning, match=r"plain\.pt: state_key='ema' not used: the file is one state dict"):
        assert ts.load(tmp_path / "plain.pt", state_key="ema").same_weights(ts.from_torch(m))
    assert ts.load(tmp_path / "both.pt", state_key="ema").same_weights(ts.from_torch(ema))
    # one flat dict holding both, the ema's keys prefixed: the key picks them (it read the model's silently)
    flat = {**m.state_dict(), **{f"ema.{k}": v for k, v in ema.state_dict().items()}}
    torch.save(flat, tmp_path / "flat.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ts.load(tmp_path / "flat.pt", state_key="ema", strict=False).same_weights(ts.from_torch(ema))
    with pytest.raises(LoadError, match=r"both\.pt: state_key='best': no state dict there"):
        ts.load(tmp_path / "both.pt", state_key="best")


# --- 7, 8, 9: messages


def test_a_runs_checkpoints_folder_loads_as_the_run(tmp_path):
    lm_run(tmp_path)
    models = ts.load(tmp_path / "checkpoints", n_ctx=4)
    assert models.names == ("step_00000",) and models[0].same_weights(ts.load(tmp_path, n_ctx=4)[0])


def test_a_config_naming_some_sizes_names_the_missing_one(tmp_path):
    _, path = lm_run(tmp_path, config={"n_head": None, "n_heads": 2})
    with pytest.raises(LoadError, match=re.escape(f"{path}: not read as a language-model checkpoint: "
                                                  f"{tmp_path / 'config.json'} is missing ['n_head']")):
        ts.load(path, n_ctx=4)


@pytest.mark.parametrize("n_ctx", ["4", 0, 2.5, True])
def test_n_ctx_of_the_wrong_kind_is_named(tmp_path, n_ctx):
    lm_run(tmp_path)
    with pytest.raises(LoadError, match=re.escape(f"n_ctx={n_ctx!r}: the analysis length must be a positive")):
        ts.load(tmp_path, n_ctx=n_ctx)


def test_a_safetensors_entry_without_dtype_is_named(tmp_path):
    h = json.dumps({"w": {"shape": [1, 1], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "nodtype.safetensors"
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 8)
    with pytest.raises(LoadError, match=re.escape(f"{path}: malformed safetensors header: entry 'w' has no dtype")):
        ts.load(path)


def test_an_embedding_after_another_layer_is_named():
    with pytest.raises(AdapterError, match=r"<root>: Embedding\[1\].* must be the first layer"):
        ts.from_torch(nn.Sequential(nn.Linear(4, 5), nn.Embedding(5, 4)))


def test_an_uninitialised_lazy_module_is_named():
    with pytest.raises(AdapterError, match=r"^1: LazyLinear is uninitialised"):
        ts.from_torch(nn.Sequential(nn.Linear(2, 4), nn.LazyLinear(3)))


def test_integer_weights_are_refused_by_name():
    lin = nn.Linear(3, 2)
    lin.weight = nn.Parameter(torch.randint(-3, 3, (2, 3)), requires_grad=False)
    with pytest.raises(AdapterError, match=r"<root>: Linear: integer weights \(dtype torch\.int64\) are not supported"):
        ts.from_torch(lin)


def test_a_nan_message_names_the_layer_once():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(AdapterError, match=r"^<root>: Linear: weight contains NaN") as info:
        ts.from_torch(lin)
    assert "Linear: Linear" not in str(info.value)


def test_integer_weights_beyond_float64s_integers_are_refused():
    """An int64 weight of 2**53 + 1 became 2**53 without a word."""
    from tsalgebra.arrays import real_float64

    exact = [2**53, -(2**53), 2**60, -(2**62)]  # float64 holds these: kept
    assert real_float64(np.array(exact, dtype=np.int64)).tolist() == [float(v) for v in exact]
    with pytest.raises(TypeError, match=r"integer weight 9007199254740993 \(dtype int64\) is not a float64"):
        real_float64(np.array([1, 2**53 + 1], dtype=np.int64))
    with pytest.raises(TypeError, match=r"Linear: weight: integer weight -4611686018427387903 .* would be rounded"):
        ts.Linear(np.array([[-(2**62) + 1]], dtype=np.int64))


@pytest.mark.parametrize("std", [0.02, 1e-3])
@pytest.mark.parametrize("rotary,causal", [("rotate_half", True), ("interleaved", True), ("rotate_half", False)])
def test_a_fused_attention_at_small_init_is_read_as_it_computes(rotary, causal, std):
    """At GPT-style init (weights 0.02) the residual dominates the outputs
    and the first reading tried (no rotary, causal) was within 1e-6 of the
    largest output for every true setting: the attention then read 59-87 %
    wrong. The closest reading is kept, of all (at 1e-3 a wrong one is
    within 1e-14)."""
    from layout_twins import FusedAttention

    torch.manual_seed(0)
    m = FusedAttention(d=16, n_head=2, rotary=rotary, causal=causal).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=std) if p.dim() > 1 else torch.nn.init.zeros_(p)
    model = ts.from_torch(m)
    assert (model.settings()["causal"], model.settings()["rotary_base"]) == (causal, 10000.0)
    x = torch.randn(3, model.settings()["n_ctx"], 16, dtype=torch.float64)
    want = (m(x) - x).detach().numpy()  # the attention's part alone
    got = np.asarray(model(x.numpy())).reshape(want.shape) - x.numpy()
    if std >= 0.02:  # at 1e-3 the attention's part is 1e-14 of x: below x's rounding, only the settings tell
        assert np.abs(got - want).max() <= 1e-8 * np.abs(want).max()


def test_a_stack_without_residuals_is_not_read_with_them():
    """ImageModel(residual=False) at torch's default init: read as residual
    blocks, 13.2 off, when a floor from the forward on |weights| passed every
    reading (that floor is gone)."""
    from layout_twins import ImageModel

    torch.manual_seed(0)
    m = ImageModel(residual=False, d=16, h=16, n_blocks=4).double().eval()
    model = ts.from_torch(m)
    x = torch.randn(64, model.in_features, dtype=torch.float64)
    want = m(x).detach().numpy()
    got = np.asarray(model(x.numpy()))
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()
