"""Checkpoints that must not load as they stand: sizes declared beyond the
bound, weights without real values, and a config.json that is not the
papers' layout beside native checkpoints (docs/refusals.md, Files)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.io import LoadError, model_from_state_dict, read_state_dict

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tsalgebra.adapters import BilinearLayer  # noqa: E402


def test_declared_shapes_are_bounded_before_conversion(tmp_path):
    """A stride-0 view stores one number and declares 3000 x 3000: the bound
    counts the declared entries as float64, not the stored bytes."""
    path = tmp_path / "expand.pt"
    torch.save({"weight": torch.ones(1).expand(3000, 3000)}, path)
    assert path.stat().st_size < 10_000
    for read in (lambda: ts.load(path, max_bytes=10**6), lambda: read_state_dict(path, max_bytes=10**6),
                 lambda: ts.load(path, template=nn.Linear(3000, 3000, bias=False), max_bytes=10**6)):
        with pytest.raises(LoadError, match=r"expand\.pt: refused: its tensors declare 72,000,000 bytes as float64 "
                                            r".*'weight'.*\(3000, 3000\).*max_bytes="):
            read()
    assert ts.load(path, max_bytes=72_000_000).out_features == 3000


def test_legacy_storages_declared_beyond_the_file_are_refused_before_torch_allocates(tmp_path):
    """A legacy (non-zip) torch file declares its storage sizes in its pickle;
    one declaring 10^8 entries in 4 KB is refused from the pickle, which is
    walked without running anything in it."""
    n = 300_007
    src = tmp_path / "src.pt"
    torch.save({"weight": torch.ones(n, 1)}, src, _use_new_zipfile_serialization=False)
    data = src.read_bytes()
    old = b"J" + struct.pack("<i", n)  # the storage's entry count and the shape's, BININTs in the pickle
    assert data.count(old) == 2
    forged = tmp_path / "forged.pt"
    forged.write_bytes(data.replace(old, b"J" + struct.pack("<i", 10**8))[:4096])
    with pytest.raises(LoadError, match=r"forged\.pt: refused: its storages declare 100,000,000 entries but the "
                                        r"file holds 4,096 bytes"):
        ts.load(forged)
    assert ts.load(src, template=nn.Linear(1, n, bias=False)).out_features == n  # an honest legacy file loads

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("the walk ran code",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "evil": Evil()}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(LoadError, match="Python objects other than tensors"):
        ts.load(evil)
    assert not marker.exists()


def test_complex_weights_are_refused_not_reduced_to_their_real_part(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "complex.safetensors"
    save_file({"0.weight": torch.full((3, 4), 1 + 2j, dtype=torch.complex64)}, path)
    with pytest.raises(LoadError, match=r"complex\.safetensors: 0\.weight: dtype .*complex"):
        ts.load(path)
    pt = tmp_path / "complex.pt"
    torch.save({"weight": torch.full((3, 4), 1 + 2j, dtype=torch.complex64)}, pt)
    with pytest.raises(LoadError, match=r"complex\.pt: weight: dtype .*complex"):
        ts.load(pt, template=nn.Linear(4, 3, bias=False))  # torch's copy would keep the real part
    with pytest.raises(LoadError, match=r"<state dict>: weight: dtype complex128 is complex"):
        model_from_state_dict({"weight": np.full((3, 4), 1 + 2j)})


def test_meta_tensors_are_load_errors_naming_the_file_and_key(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"left.weight": torch.empty(6, 4, device="meta"), "right.weight": torch.ones(6, 4),
                "down.weight": torch.ones(3, 6)}, path)
    with pytest.raises(LoadError, match=r"meta\.pt: left\.weight: a torch tensor without readable values "
                                        r"\(device meta\)"):
        ts.load(path)
    with pytest.raises(LoadError, match=r"<state dict>: left\.weight: .*device meta"):
        model_from_state_dict({"left.weight": torch.empty(6, 4, device="meta"), "right.weight": torch.ones(6, 4),
                               "down.weight": torch.ones(3, 6)})


def test_native_weights_without_finite_values_name_the_key(tmp_path):
    from safetensors.numpy import save_file

    w = np.ones((3, 4))
    w[1, 2] = np.nan
    path = tmp_path / "nan.safetensors"
    save_file({"0.weight": np.ones((4, 4)), "1.weight": w}, path)
    with pytest.raises(LoadError, match=r"nan\.safetensors: 1\.weight contains NaN or Inf entries"):
        ts.load(path)


@pytest.mark.parametrize("config", [{"lr": 0.01, "steps": 300}, {"model": {"d_model": 8}}, "not json"])
def test_a_config_json_of_another_kind_leaves_checkpoints_to_the_native_layout(tmp_path, config, capsys):
    """Only a config.json naming vocab_size, d_model, n_head and n_layers makes
    checkpoints/ a language-model run; beside any other, native checkpoints load."""
    run = tmp_path / "myrun"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    torch.manual_seed(0)
    model = ts.from_torch(nn.Sequential(BilinearLayer(4, 6, 3)).double())
    path = ts.save(model, run / "checkpoints" / "step_0.safetensors")
    assert ts.load(path).same_weights(model)
    assert ts.load(run / "checkpoints")[0].same_weights(model)
    said = r"myrun: directory holds no checkpoint files .*they load from .*myrun/checkpoints \(its config\.json"
    with pytest.raises(LoadError, match=said):
        ts.load(run)
    from tsalgebra.cli import main

    assert main(["matrix", str(run)]) == 1  # the command line says the same (it said only "holds no checkpoint files")
    assert "they load from" in capsys.readouterr().err


def test_a_model_that_cannot_take_other_positions_is_a_load_error(tmp_path):
    """A readout after nn.Flatten reads a fixed number of positions: rebinding
    it with n_ctx= raised a bare ValueError without the file."""
    from tsalgebra.adapters import BilinearAttentionModule

    def build():
        return nn.Sequential(nn.Embedding(3, 4), BilinearAttentionModule(2, 2, 4, n_ctx=3), nn.Flatten(),
                             nn.Linear(12, 5))

    path = tmp_path / "flat.pt"
    torch.save(build().state_dict(), path)
    assert ts.load(path, build, n_ctx=3).in_features == 9
    with pytest.raises(LoadError, match=r"flat\.pt: n_ctx=4: the model cannot be rebound to 4 positions"):
        ts.load(path, build, n_ctx=4)
