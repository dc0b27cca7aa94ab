"""Checkpoints as the field writes them: wrapper prefixes, several state
dicts in one file, run directories with their names (issue: the field's
checkpoint layouts)."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from layout_twins import FusedAttention, GatedMLP, HeldFactors, ImageModel, PaperLM  # noqa: E402
from tsalgebra.adapters import BilinearLayer  # noqa: E402


def net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(BilinearLayer(4, 6, 3)).double()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    m = net(0)
    path = tmp_path / "ck.pt"
    torch.save({prefix + k: v for k, v in m.state_dict().items()}, path)
    loaded = ts.load(path, template=lambda: net(1))
    x = np.random.default_rng(0).normal(size=(5, 4))
    np.testing.assert_allclose(loaded(x), m(torch.as_tensor(x)).detach().numpy(), atol=1e-12)


def test_several_state_dicts_need_a_choice(tmp_path):
    m, ema = net(0), net(1)
    path = tmp_path / "ck.pt"
    torch.save({"model": m.state_dict(), "ema": ema.state_dict(), "step": 3}, path)
    with pytest.raises(ts.LoadError, match="several state dicts .*state_key="):
        ts.load(path, template=lambda: net(2))
    x = np.random.default_rng(0).normal(size=(5, 4))
    got = ts.load(path, template=lambda: net(2), state_key="ema")
    np.testing.assert_allclose(got(x), ema(torch.as_tensor(x)).detach().numpy(), atol=1e-12)
    with pytest.raises(ts.LoadError, match="state_key='nope'"):
        ts.load(path, template=lambda: net(2), state_key="nope")


def test_a_run_directory_loads_with_names_and_steps(tmp_path):
    for step in (10, 2, 100):
        ts.save(ts.from_torch(net(step)), tmp_path / f"step_{step:05d}.safetensors")
    models = ts.load(tmp_path)
    assert isinstance(models, ts.Checkpoints) and isinstance(models, list) and len(models) == 3
    assert models.names == ("step_00002", "step_00010", "step_00100") and models.steps == (2, 10, 100)
    m = ts.similarity_matrix(models, progress=False)
    assert m.labels == models.names  # the names label the matrix


def test_state_key_from_the_command_line(tmp_path, capsys):
    import json

    from tsalgebra.cli import main

    (tmp_path / "arch.py").write_text("from tsalgebra.adapters import BilinearLayer\nfrom torch import nn\n"
                                      "def build():\n    return nn.Sequential(BilinearLayer(4, 6, 3))\n")
    for s in (1, 2):
        torch.save({"model": net(s).float().state_dict(), "ema": net(s + 5).float().state_dict()},
                   tmp_path / f"c{s}.pt")
    args = [str(tmp_path / "c1.pt"), str(tmp_path / "c2.pt"), "--template", f"{tmp_path / 'arch.py'}:build"]
    assert main(["similarity", *args, "--json"]) == 2 and "--state-key" in capsys.readouterr().err  # a usage error
    assert main(["similarity", *args, "--state-key", "ema", "--json"]) == 0
    assert -1 <= json.loads(capsys.readouterr().out)["value"] <= 1


def test_hf_style_gate_up_down_converts():
    torch.manual_seed(0)
    m = GatedMLP().double()
    x = np.random.default_rng(0).normal(size=(5, 4))
    np.testing.assert_allclose(ts.from_torch(m)(x), m(torch.as_tensor(x)).detach().numpy(), atol=1e-12)


# ------------------------------------------------ the papers' language models


def paper_run(tmp_path, nested_config=False, steps=(0, 50, 100), interleaved=False):
    import json

    cfg = dict(vocab_size=11, d_model=8, n_head=2, n_layers=2, attn_scale=0.35, use_bias_qk=True)
    if interleaved:  # the one-line hint for runs rotating consecutive pairs
        cfg["rotary"] = "interleaved"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg} if nested_config else cfg))
    models = []
    for s in steps:
        torch.manual_seed(s)
        m = PaperLM(11, 8, 2, 2, 0.35, True, interleaved).double().eval()
        torch.save({"step": s, "model_state_dict": m.state_dict(), "optimizer_state_dict": {"state": {}}},
                   tmp_path / "checkpoints" / f"step_{s:05d}.pt")
        models.append(m)
    return models


@pytest.mark.parametrize("nested,interleaved", [(False, False), (True, False), (False, True)])
def test_a_language_model_run_loads_without_a_template(tmp_path, nested, interleaved):
    twins = paper_run(tmp_path, nested, interleaved=interleaved)
    models = ts.load(tmp_path, n_ctx=4)
    assert models.steps == (0, 50, 100) and len(models) == 3
    ids = torch.randint(0, 11, (6, 4), generator=torch.Generator().manual_seed(0))
    for m, twin in zip(models, twins):
        want = twin(ids).detach().numpy()  # (batch, positions, vocab): the converted model answers in that shape too
        got = np.asarray(m(ids.numpy()))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    assert m.default_measure is not None  # the models read tokens: the token measure by default
    with pytest.raises(ts.LoadError, match="n_ctx="):
        ts.load(tmp_path)


def test_language_model_run_from_the_command_line(tmp_path, capsys):
    import json

    from tsalgebra.cli import main

    run = tmp_path / "run"
    run.mkdir()
    paper_run(run)
    assert main(["matrix", str(run), "--out", str(tmp_path / "m.png"), "--no-progress"]) == 2
    assert "--n-ctx" in capsys.readouterr().err
    code = main(["matrix", str(run), "--n-ctx", "3", "--out", str(tmp_path / "m.png"), "--csv", "--no-progress",
                 "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0 and rep["labels"] == ["step_00000", "step_00050", "step_00100"]
    models = ts.load(run, n_ctx=3)
    np.testing.assert_allclose(rep["values"], ts.similarity_matrix(models, progress=False).values, atol=1e-12)


def test_norm_qk_is_refused(tmp_path):
    paper_run(tmp_path, steps=(0,))
    path = tmp_path / "checkpoints" / "step_00000.pt"
    sd = torch.load(path, weights_only=True)
    sd["model_state_dict"]["layers.0.norm_qk.weight"] = torch.ones(4)
    torch.save(sd, path)
    with pytest.raises(ts.LoadError, match="norm_qk"):
        ts.load(tmp_path, n_ctx=4)


@pytest.mark.parametrize("stored", ["out_in", "in_out"])
def test_factors_held_as_parameters(stored):
    torch.manual_seed(0)
    m = HeldFactors(stored).double()
    x = np.random.default_rng(0).normal(size=(5, 4))
    np.testing.assert_allclose(ts.from_torch(m)(x), m(torch.as_tensor(x)).detach().numpy(), atol=1e-10)


def test_matrix_command_offers_the_rungs_its_refusals_name(tmp_path, capsys):
    """A refused matrix names --budget and --method: the matrix command has them."""
    import json

    from tsalgebra.cli import main

    run = tmp_path / "run"
    run.mkdir()
    paper_run(run, steps=(0, 50))
    args = ["matrix", str(run), "--n-ctx", "3", "--inner", "gaussian", "--out", str(tmp_path / "m.png"),
            "--no-progress"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "--method sampled" in err and "--budget" in err
    assert main(args + ["--method", "sampled", "--samples", "300", "--seed", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["method"] == "sampled" and rep["exact"] is False and -1 <= rep["values"][0][1] <= 1


def test_one_checkpoint_of_a_run_from_the_command_line(tmp_path, capsys):
    import json

    from tsalgebra.cli import main

    paper_run(tmp_path, steps=(0, 50))
    a, b = (str(tmp_path / "checkpoints" / f"step_{s:05d}.pt") for s in (0, 50))
    assert main(["similarity", a, b, "--json"]) == 2 and "--n-ctx" in capsys.readouterr().err  # as matrix says it
    assert main(["similarity", a, b, "--n-ctx", "3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["inner"] == "tokens" and rep["exact"]
    assert main(["plan", a, b, "--n-ctx", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["within_budget"]


@pytest.mark.parametrize("residual", [True, False])
def test_blocks_in_a_module_list_with_the_residual_written_in_forward(residual):
    """The image models' layout: embed, blocks[i] (a bilinear MLP whose
    fused projection is chunked, then p), head; the residual written in the
    forward. Both readings are tried; the one matching the forward is kept."""

    torch.manual_seed(0)
    m = ImageModel(residual).double()
    x = np.random.default_rng(0).normal(size=(5, 6))
    got = ts.from_torch(m)
    np.testing.assert_allclose(got(x), m(torch.as_tensor(x)).detach().numpy(), atol=1e-10)
    assert sum(getattr(l, "residual", False) for l in got.layers) == (2 if residual else 0)


@pytest.mark.parametrize("rotary", [None, "interleaved", "rotate_half"])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_qkv_attention_converts(rotary, causal):
    """A fused projection qkv: nn.Linear(d, 5 d) split into q1, k1, q2, k2, v
    per head, each score divided by sqrt(d_head), then o, with a residual."""

    torch.manual_seed(0)
    m = FusedAttention(rotary=rotary, causal=causal).double()
    layer = ts.from_torch(m)
    x = np.random.default_rng(0).normal(size=(3, 4, 8))
    np.testing.assert_allclose(layer(x), m(torch.as_tensor(x)).detach().numpy(), atol=1e-10)
    assert layer.causal == causal and layer.residual


@pytest.mark.parametrize("builder,n_ctx", [("image_model", None), ("fused_attention", 3), ("gated_mlp", None),
                                           ("held_factors", None)])
def test_every_layout_twin_from_disk_through_the_command_line(tmp_path, capsys, builder, n_ctx):
    """Each twin saved as the field saves it (a wrapper prefix on one), then
    read back by the CLI with --template: similarity, matrix and plan agree
    with the Python API, and the loaded model is the module's forward."""
    import json
    from pathlib import Path

    import layout_twins
    from tsalgebra.cli import main

    spec = f"{Path(layout_twins.__file__)}:{builder}"
    run = tmp_path / "run"
    run.mkdir()
    modules = []
    for k, prefix in enumerate(("", "module.", "_orig_mod.")):
        torch.manual_seed(k)
        m = getattr(layout_twins, builder)().eval()
        torch.save({prefix + key: v for key, v in m.state_dict().items()}, run / f"step_{k}.pt")
        modules.append(m)
    files = [str(run / f"step_{k}.pt") for k in range(3)]
    pos = ["--n-ctx", str(n_ctx)] if n_ctx else []
    loaded = ts.load(run, template=getattr(layout_twins, builder), n_ctx=n_ctx)
    x = np.random.default_rng(0).normal(size=(4, n_ctx, 8) if n_ctx else (4, modules[0].state_dict()[
        next(iter(modules[0].state_dict()))].shape[-1]))
    for m, got in zip(modules, loaded):
        want = m.double()(torch.as_tensor(x)).detach().numpy()
        np.testing.assert_allclose(np.asarray(got(x)).reshape(want.shape), want, rtol=1e-6, atol=1e-6)

    assert main(["similarity", files[0], files[1], "--template", spec, *pos, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["exact"] and rep["value"] == pytest.approx(ts.similarity(loaded[0], loaded[1]).value, abs=1e-12)
    assert main(["matrix", str(run), "--template", spec, *pos, "--out", str(tmp_path / "m.png"), "--no-progress",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["labels"] == ["step_0", "step_1", "step_2"]
    np.testing.assert_allclose(rep["values"], ts.similarity_matrix(loaded, progress=False).values, atol=1e-12)
    assert main(["plan", files[1], files[2], "--template", spec, *pos, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["within_budget"]


def _break(sd, cfg, case):
    """One way a checkpoint or its config.json disagrees with the layout."""
    d = cfg["d_model"]
    if case == "fewer layers in the config":
        cfg["n_layers"] = 1
    elif case == "unknown key":
        sd["layers.0.mlp.weight"] = torch.ones(d, d)
    elif case == "unembed rows":
        sd["unembed.weight"] = torch.ones(cfg["vocab_size"] - 1, d)
    elif case == "q1 columns":
        sd["layers.0.q1.weight"] = torch.ones(d, d - 2)
    elif case == "o columns":
        sd["layers.1.o.weight"] = torch.ones(d, d - 2)
    elif case == "q1 bias":
        sd["layers.0.q1.bias"] = torch.ones(d - 2)
    elif case == "final norm":
        sd["final_norm.weight"] = torch.ones(d - 3)
    elif case == "NaN":
        sd["layers.0.k2.weight"][0, 0] = float("nan")
    elif case == "vocab_size a word":
        cfg["vocab_size"] = "eleven"
    elif case == "attn_scale a word":
        cfg["attn_scale"] = "x"
    elif case == "query-key biases unsaid":
        cfg["use_bias_qk"] = False
    elif case == "a key bias missing":
        del sd["layers.1.k2.bias"]


@pytest.mark.parametrize("case,file,match", [
    ("fewer layers in the config", "ckpt", r"keys the language-model layout does not use \(n_layers=1 .*'layers\.1\.k1\.bias'"),
    ("unknown key", "ckpt", r"keys the language-model layout does not use .*\['layers\.0\.mlp\.weight'\]"),
    ("unembed rows", "ckpt", r"unembed\.weight has shape \(10, 8\), .* gives \(11, 8\)"),
    ("q1 columns", "ckpt", r"layers\.0\.q1\.weight has shape \(8, 6\)"),
    ("o columns", "ckpt", r"layers\.1\.o\.weight has shape \(8, 6\)"),
    ("q1 bias", "ckpt", r"layers\.0\.q1\.bias has shape \(6,\)"),
    ("final norm", "ckpt", r"final_norm\.weight has shape \(5,\)"),
    ("NaN", "ckpt", r"layers\.0\.k2\.weight contains NaN"),
    ("vocab_size a word", "config", r"vocab_size must be a positive integer, got 'eleven'"),
    ("attn_scale a word", "config", r"attn_scale must be a finite number, got 'x'"),
    ("query-key biases unsaid", "ckpt", r"layers\.0\.q1\.bias is present, but the configuration says use_bias_qk=false"),
    ("a key bias missing", "ckpt", r"layers\.1\.k2\.bias is missing, but the configuration says use_bias_qk=true"),
])
def test_language_model_checkpoints_are_read_whole_with_the_config_shapes(tmp_path, case, file, match):
    """Every key of the state dict is used, with the shape config.json gives
    it, or the load is a LoadError naming the file (and the key): never a
    model of part of the checkpoint."""
    import json
    import re

    paper_run(tmp_path, steps=(0,))
    path, cfg_path = tmp_path / "checkpoints" / "step_00000.pt", tmp_path / "config.json"
    ck, cfg = torch.load(path, weights_only=True), json.loads(cfg_path.read_text())
    _break(ck["model_state_dict"], cfg, case)
    torch.save(ck, path)
    cfg_path.write_text(json.dumps(cfg))
    named = path if file == "ckpt" else cfg_path
    with pytest.raises(ts.LoadError, match=re.escape(str(named)) + ": " + match):
        ts.load(tmp_path, n_ctx=3)
    with pytest.raises(ts.LoadError, match=re.escape(str(named)) + ": " + match):
        ts.load(path, n_ctx=3)


def test_a_truncated_config_json_is_named_not_read_as_another_layout(tmp_path):
    """A config.json cut short (not JSON) that names the model's sizes made the
    run 'not a language-model run' and its checkpoints 'not the native
    layout'; the load now says config.json cannot be read."""
    paper_run(tmp_path, steps=(0,))
    text = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(text[: len(text) // 2])
    for path in (tmp_path, tmp_path / "checkpoints" / "step_00000.pt"):
        with pytest.raises(ts.LoadError, match=r"config\.json: cannot read the run's configuration"):
            ts.load(path, n_ctx=3)


def test_a_circuit_file_beside_a_language_model_on_the_command_line(tmp_path, capsys):
    """--n-ctx is the language model's analysis length; the native circuit
    file (no token positions) refused it, so no such pair could be compared."""
    import json

    from tsalgebra.cli import main

    paper_run(tmp_path, steps=(0,))
    lm_file = tmp_path / "checkpoints" / "step_00000.pt"
    circuit = ts.Linear(np.random.default_rng(0).normal(size=(33, 33)))  # on the one-hot tokens of 3 positions
    circuit_file = ts.save(circuit, tmp_path / "circuit.safetensors")
    assert main(["similarity", str(circuit_file), str(lm_file), "--n-ctx", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = ts.similarity(circuit, ts.load(lm_file, n_ctx=3))
    assert got["value"] == pytest.approx(want.value, rel=1e-12) and want.inner == "tokens"
