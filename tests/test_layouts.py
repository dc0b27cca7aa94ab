"""Checkpoints as the field writes them: wrapper prefixes, several state
dicts in one file, run directories with their names (issue: the field's
checkpoint layouts)."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

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
    assert main(["similarity", *args, "--json"]) == 1 and "state_key" in capsys.readouterr().err
    assert main(["similarity", *args, "--state-key", "ema", "--json"]) == 0
    assert -1 <= json.loads(capsys.readouterr().out)["value"] <= 1


def test_hf_style_gate_up_down_converts():
    class GatedMLP(nn.Module):  # transformers' LlamaMLP without the activation: a bilinear layer
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
            self.down_proj = nn.Linear(6, 4, bias=False)

        def forward(self, x):
            return self.down_proj(self.gate_proj(x) * self.up_proj(x))

    torch.manual_seed(0)
    m = GatedMLP().double()
    x = np.random.default_rng(0).normal(size=(5, 4))
    np.testing.assert_allclose(ts.from_torch(m)(x), m(torch.as_tensor(x)).detach().numpy(), atol=1e-12)


# ------------------------------------------------ the papers' language models


class RotateHalfAttention(nn.Module):
    """A twin of the papers' bilinear attention, written from its description:
    q1, k1, q2, k2, v, o nn.Linear(d, d), heads by reshape, scores
    (q1.k1)(q2.k2) / d_head^2, causal, rotary (rotate-half), out = x +
    attn_scale * o(z)."""

    def __init__(self, d, n_head, attn_scale, bias_qk):
        super().__init__()
        self.n_head, self.dh, self.attn_scale = n_head, d // n_head, attn_scale
        for name in ("q1", "k1", "q2", "k2"):
            setattr(self, name, nn.Linear(d, d, bias=bias_qk))
        self.v, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def rope(self, t):  # (b, n, h, dh), rotate-half
        n, dh = t.shape[1], self.dh
        inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=t.dtype) / dh)
        ang = torch.arange(n, dtype=t.dtype)[:, None] * inv[None]  # (n, dh/2)
        cos, sin = torch.cat([ang.cos()] * 2, -1)[None, :, None], torch.cat([ang.sin()] * 2, -1)[None, :, None]
        rot = torch.cat([-t[..., dh // 2:], t[..., : dh // 2]], -1)
        return t * cos + rot * sin

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.n_head, self.dh)  # noqa: E731
        q1, k1, q2, k2 = (self.rope(split(getattr(self, m)(x))) for m in ("q1", "k1", "q2", "k2"))
        s = torch.einsum("bihe,bjhe->bhij", q1, k1) * torch.einsum("bihe,bjhe->bhij", q2, k2) / self.dh**2
        s = s * torch.tril(torch.ones(n, n, dtype=x.dtype))
        z = torch.einsum("bhij,bjhe->bihe", s, split(self.v(x))).reshape(b, n, d)
        return x + self.attn_scale * self.o(z)


class FinalNorm(nn.Module):  # an eval-time gain with an input-independent scale buffer
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.register_buffer("scale", torch.tensor(1.7))

    def forward(self, x):
        return x * self.weight / self.scale


class PaperLM(nn.Module):
    def __init__(self, vocab, d, n_head, n_layers, attn_scale, bias_qk):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(RotateHalfAttention(d, n_head, attn_scale, bias_qk) for _ in range(n_layers))
        self.final_norm = FinalNorm(d)
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.unembed(self.final_norm(x))


def paper_run(tmp_path, nested_config=False, steps=(0, 50, 100)):
    import json

    cfg = dict(vocab_size=11, d_model=8, n_head=2, n_layers=2, attn_scale=0.35, use_bias_qk=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg} if nested_config else cfg))
    models = []
    for s in steps:
        torch.manual_seed(s)
        m = PaperLM(11, 8, 2, 2, 0.35, True).double().eval()
        torch.save({"step": s, "model_state_dict": m.state_dict(), "optimizer_state_dict": {"state": {}}},
                   tmp_path / "checkpoints" / f"step_{s:05d}.pt")
        models.append(m)
    return models


@pytest.mark.parametrize("nested", [False, True])
def test_a_language_model_run_loads_without_a_template(tmp_path, nested):
    twins = paper_run(tmp_path, nested)
    models = ts.load(tmp_path, n_ctx=4)
    assert models.steps == (0, 50, 100) and len(models) == 3
    ids = torch.randint(0, 11, (6, 4), generator=torch.Generator().manual_seed(0))
    for m, twin in zip(models, twins):
        want = twin(ids).detach().numpy().reshape(6, -1)
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
    class Held(nn.Module):
        def __init__(self):
            super().__init__()
            shape = (lambda o, i: (o, i)) if stored == "out_in" else (lambda o, i: (i, o))
            self.left, self.right = nn.Parameter(torch.randn(*shape(6, 4))), nn.Parameter(torch.randn(*shape(6, 4)))
            self.left_bias = nn.Parameter(torch.randn(6))
            self.down = nn.Parameter(torch.randn(*shape(3, 6)))

        def forward(self, x):
            lin = (lambda W, x: x @ W.T) if stored == "out_in" else (lambda W, x: x @ W)  # noqa: E731
            return lin(self.down, (lin(self.left, x) + self.left_bias) * lin(self.right, x))

    torch.manual_seed(0)
    m = Held().double()
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
    assert main(["similarity", a, b, "--json"]) == 1 and "--n-ctx" in capsys.readouterr().err
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

    class MLP(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.w, self.p = nn.Linear(d, 2 * h), nn.Linear(h, d)

        def forward(self, x):
            left, right = self.w(x).chunk(2, -1)
            return self.p(left * right)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 4)
            self.blocks = nn.ModuleList(MLP(4, 5) for _ in range(2))
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = x + block(x) if residual else block(x)
            return self.head(x)

    torch.manual_seed(0)
    m = Net().double()
    x = np.random.default_rng(0).normal(size=(5, 6))
    got = ts.from_torch(m)
    np.testing.assert_allclose(got(x), m(torch.as_tensor(x)).detach().numpy(), atol=1e-10)
    assert sum(getattr(l, "residual", False) for l in got.layers) == (2 if residual else 0)


@pytest.mark.parametrize("rotary", [None, "interleaved", "rotate_half"])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_qkv_attention_converts(rotary, causal):
    """A fused projection qkv: nn.Linear(d, 5 d) split into q1, k1, q2, k2, v
    per head, each score divided by sqrt(d_head), then o, with a residual."""

    class Fused(nn.Module):
        def __init__(self, d=8, n_head=2):
            super().__init__()
            self.n_head, self.dh = n_head, d // n_head
            self.qkv, self.o = nn.Linear(d, 5 * d), nn.Linear(d, d)

        def rope(self, t):
            if rotary is None:
                return t
            n, dh = t.shape[1], self.dh
            inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=t.dtype) / dh)
            ang = torch.arange(n, dtype=t.dtype)[:, None] * inv[None]
            c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
            if rotary == "rotate_half":
                x0, x1 = t[..., : dh // 2], t[..., dh // 2:]
                return torch.cat([x0 * c - x1 * s, x1 * c + x0 * s], -1)
            x0, x1 = t[..., 0::2], t[..., 1::2]
            return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)

        def forward(self, x):
            b, n, d = x.shape
            q1, k1, q2, k2, v = (t.view(b, n, self.n_head, self.dh) for t in self.qkv(x).chunk(5, -1))
            q1, k1, q2, k2 = map(self.rope, (q1, k1, q2, k2))
            s = (torch.einsum("bihe,bjhe->bhij", q1, k1) / self.dh**0.5) * \
                (torch.einsum("bihe,bjhe->bhij", q2, k2) / self.dh**0.5)
            if causal:
                s = s * torch.tril(torch.ones(n, n, dtype=x.dtype))
            z = torch.einsum("bhij,bjhe->bihe", s, v).reshape(b, n, d)
            return x + self.o(z)

    torch.manual_seed(0)
    m = Fused().double()
    layer = ts.from_torch(m)
    x = np.random.default_rng(0).normal(size=(3, 4, 8))
    np.testing.assert_allclose(layer(x), m(torch.as_tensor(x)).detach().numpy(), atol=1e-10)
    assert layer.causal == causal and layer.residual
