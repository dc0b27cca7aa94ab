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
