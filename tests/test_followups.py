"""Follow-ups: a dead output channel said once (where the cosine is formed,
and once in the command line's JSON); a formula file's division by zero in
words; --max-memory of any finite size; a question no algorithm answers is a
NotApplicableError (exit 2 by its class, not by its text); counts agree with
their nouns; a native checkpoint of wrong shapes is malformed (exit 1, no
template suggested); cell numbers legible under any colour scale."""

from __future__ import annotations

import importlib
import json
import pickle
import warnings

import numpy as np
import pytest
import sympy
from safetensors.numpy import save_file

import tsalgebra as ts
from helpers import dead_channel_pair, exit_code, saved_bilinears
from tsalgebra.io import NATIVE_FORMAT, LoadError, model_from_state_dict
from tsalgebra.messages import counted
from tsalgebra.problem import DEAD_CHANNELS, DEAD_ESTIMATED, CostError, InnerResult, NotApplicableError

X1, X2 = sympy.symbols("x1 x2")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return saved_bilinears(tmp_path_factory.mktemp("ck"))  # 3 -> 4 -> 2


# ------------------------------------------------------------ 1: dead channels


@pytest.mark.parametrize("kw, note", [({}, DEAD_CHANNELS),
                                      ({"method": "sampled", "samples": 300, "seed": 0}, DEAD_ESTIMATED)])
def test_a_dead_channel_is_one_warning_and_one_note_of_the_same_text(kw, note):
    a, b = dead_channel_pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = ts.similarity(a, b, per_output=True, **kw)
    assert [str(c.message) for c in caught if "NaN" in str(c.message)] == [note]
    assert r.notes.count(note) == 1 and np.isnan(r.value[1])


def test_a_result_made_by_hand_is_not_given_notes():
    """The note is said where the cosine is formed, not by InnerResult."""
    r = InnerResult(np.array([0.5, np.nan]), "similarity", "gaussian", "exact", True, "pairings", per_output=True)
    assert r.notes == ()


def test_the_json_says_a_dead_channel_once(tmp_path, capsys):
    a, b = dead_channel_pair()
    ts.save(a, tmp_path / "a.safetensors")
    ts.save(b, tmp_path / "dead.safetensors")
    code, out, err = exit_code(capsys, "similarity", tmp_path / "a.safetensors", tmp_path / "dead.safetensors",
                               "--per-output", "--json")
    assert code == 0, err
    assert json.loads(out)["notes"].count(DEAD_CHANNELS) == 1


# --------------------------------------------------- 2: a formula file's 3/0


@pytest.mark.parametrize("line, said", [("x1 + 3/0", "'x1 + 3/0' divides by zero"),
                                        ("0/0 + x2", "'0/0 + x2' is undefined (0/0")])
def test_a_formula_files_division_by_zero_is_said_in_words(files, tmp_path, capsys, line, said):
    (tmp_path / "c.txt").write_text(f"x1*x2\n{line}  # the second output\n")
    code, _, err = exit_code(capsys, "verify", tmp_path / "c.txt", files[0])
    assert code == 1 and f"c.txt:2: {said}" in err, err
    assert "zoo" not in err and "nan" not in err.replace("0/0", ""), err


# ------------------------------------------------------- 3: --max-memory


def test_max_memory_takes_any_finite_size(files, capsys):
    code, _, err = exit_code(capsys, "similarity", *files[:2], "--max-memory", "1e300")
    assert code == 0, err
    for bad in ("inf", "nan", "0", "1e400"):
        code, _, err = exit_code(capsys, "similarity", *files[:2], "--max-memory", bad)
        assert code == 2 and "argument --max-memory:" in err, err


# ------------------------------------------------------ 4: not applicable


def test_a_question_no_algorithm_supports_is_not_applicable():
    rng = np.random.default_rng(0)
    model = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
    poly = ts.from_sympy([X1 * X2, X1], [X1, X2])
    for call in (ts.inner, ts.similarity):
        with pytest.raises(NotApplicableError, match="no exact algorithm applies") as err:
            call(model, poly, "network")
        assert isinstance(err.value, CostError) and err.value.flops == float("inf")
        again = pickle.loads(pickle.dumps(err.value))
        assert type(again) is NotApplicableError and again.reason == err.value.reason
    with pytest.raises(CostError) as err:  # over the budget: a refusal, not this
        ts.inner(model, model, budget=1)
    assert not isinstance(err.value, NotApplicableError)


@pytest.mark.parametrize("error, code", [
    (NotApplicableError("<a,b>: network inner product refused: no exact algorithm applies (gram: ...)"), 2),
    # the same words in a plain refusal: the class decides, not the text
    (CostError("<a,b>: network inner product refused: no exact algorithm applies (gram: ...)"), 3)])
def test_the_command_line_tells_them_apart_by_class(files, capsys, monkeypatch, error, code):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(importlib.import_module("tsalgebra.inner"), "similarity", refuse)  # (ts.inner: the function)
    got, out, err = exit_code(capsys, "similarity", *files[:2], "--json")
    assert got == code and json.loads(out)["exit_code"] == code, err


# ------------------------------------------------------------- 5: grammar


def test_counts_of_one_take_the_singular():
    assert counted(1, "output") == "1 output" and counted(0, "layer") == "0 layers"
    rng = np.random.default_rng(0)
    one = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(1, 3)))
    with pytest.raises(ValueError, match=r"the circuit has 2 outputs, the component 1$"):
        ts.verify(["x1*x2", "x1"], one)
    with pytest.raises(ValueError, match="out of range for 1 output$"):
        ts.circuits.project(one, 3)
    with pytest.raises(IndexError, match="out of range for a model of 1 layer$"):
        ts.symmetries.permute_hidden(2, [0, 1, 2])(one)
    with pytest.raises(IndexError, match="a model of 1 layer has no wires"):
        ts.symmetries.change_wire_basis(0, np.eye(2))(one)
    from tsalgebra.pairing_sum import _refusal

    assert "(the 1 costliest orbit searched," in str(_refusal("gaussian", 5, 20, (1e9, 1e8, 1), True))
    assert "(the 3 costliest orbits searched," in str(_refusal("gaussian", 5, 20, (1e9, 1e8, 3), True))


# ------------------------------------------------- 6: malformed native files


def _native(path, sd, native=True):
    save_file({k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}, str(path),
              metadata={"format": "pt", **({"tsalgebra": NATIVE_FORMAT} if native else {})})
    return path


def test_a_native_file_of_wrong_shapes_is_malformed_not_another_layout(files, tmp_path, capsys):
    rng = np.random.default_rng(0)
    bad = _native(tmp_path / "bad.safetensors", {"0.left.weight": rng.normal(size=(5, 4)),
                                                 "0.right.weight": rng.normal(size=(5, 4)),
                                                 "0.down.weight": rng.normal(size=(3, 6))})
    with pytest.raises(LoadError, match=r"malformed checkpoint .* layer 0 \(.*0\.down\.weight \(3, 6\)") as err:
        ts.load(bad)
    assert "template" not in str(err.value)
    unchained = {"0.weight": rng.normal(size=(5, 4)), "1.weight": rng.normal(size=(2, 6))}
    with pytest.raises(LoadError, match="malformed checkpoint.*layer 1") as err:
        model_from_state_dict(unchained)
    assert "template" not in str(err.value)
    code, _, err = exit_code(capsys, "similarity", bad, files[0])
    assert code == 1 and "malformed checkpoint" in err and "--template" not in err, err
    # keys of another layout: a template is what reads them (a usage error)
    other = _native(tmp_path / "other.safetensors", {"0.foo.weight": rng.normal(size=(5, 4))}, native=False)
    code, _, err = exit_code(capsys, "similarity", other, files[0])
    assert code == 2 and "--template" in err, err


# ------------------------------------------------------ 7: legible numbers


def _inks(fig):
    return {t.get_text(): t.get_color() for t in fig.axes[0].texts}


def test_cell_numbers_follow_the_cells_colour_under_any_scale():
    from tsalgebra.plots import plot_matrix

    # on [0, 0.2] (white at 0.1): 0.19 is dark red, 0.01 dark blue, 0.12 pale; NaN is not drawn
    inks = _inks(plot_matrix(np.array([[0.01, 0.19], [0.12, np.nan]]), vmin=0.0, vmax=0.2))
    assert inks == {"0.01": "white", "0.19": "white", "0.12": "black", "nan": "black"}
    inks = _inks(plot_matrix(np.array([[1.0, -1.0, 0.0]])))  # the default cosine scale
    assert inks == {"1.00": "white", "-1.00": "white", "0.00": "black"}


def test_the_demos_colours_are_plot_matrixs_own():
    from tsalgebra.demos.common import colour_range, plot_cosines
    from tsalgebra.plots import plot_matrix, pyplot

    m = np.array([[1.0, 0.3, 0.05], [0.3, 1.0, 0.6], [0.05, 0.6, 1.0]])
    plt = pyplot()
    fig, ax = plt.subplots()
    try:
        plot_cosines(m, ax)
        assert ax.images[-1].norm.vmin == 0.0 and ax.images[-1].norm.vmax == 1.0  # their own range passed through
        vmin, vmax = colour_range(m)
        assert [t.get_color() for t in ax.texts] == [t.get_color() for t in
                                                     plot_matrix(m, vmin=vmin, vmax=vmax).axes[0].texts]
    finally:
        plt.close(fig)


def test_an_estimated_store_of_the_old_heavy_tail_rule_is_not_resumed(tmp_path):
    """Tiles keep their heavy-tail flags: a store written under the old rule
    (one sample's 5 % share: its manifest has no heavy_tails) was resumed and
    its flags reported under the new one (6 of 6 flagged, 0 of 6 computed
    afresh).  Exact stores carry no such record."""
    import json as _json

    rng = np.random.default_rng(0)
    models = [ts.Bilinear(rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(3, 6))) for _ in range(3)]
    kw = dict(method="sampled", samples=200, seed=1, tile=2, progress=False)
    ts.similarity_matrix(models, store=tmp_path / "est", **kw)
    manifest = tmp_path / "est" / "manifest.json"
    record = _json.loads(manifest.read_text())
    assert record["options"]["heavy_tails"].startswith("variance error over")
    del record["options"]["heavy_tails"]  # as the old rule's stores were written
    manifest.write_text(_json.dumps(record))
    with pytest.raises(ValueError, match="heavy_tails=None, this call has heavy_tails='variance error over"):
        ts.similarity_matrix(models, store=tmp_path / "est", **kw)
    ts.similarity_matrix(models, store=tmp_path / "exact", tile=2, progress=False)
    assert "heavy_tails" not in _json.loads((tmp_path / "exact" / "manifest.json").read_text())["options"]


def test_labels_nest_inside_a_matrix_pair():
    """The similarity's own product label replaced the matrix's pair label
    (every pair's bar read 'Monte Carlo estimate <a,b>')."""
    from tsalgebra import progress

    with progress.labelled("<0,1>"):
        with progress.labelled("<a,b>"):
            assert progress._LABEL.get() == "<0,1> <a,b>"
        assert progress._LABEL.get() == "<0,1>"
    assert not progress._LABEL.get()


def test_a_template_whose_attention_has_no_positions_is_named_when_loaded(tmp_path):
    """The message spoke of an nn.Flatten the template does not have; it now
    names the layer from_torch refused, and asks for n_ctx=."""
    import torch
    from torch import nn

    from tsalgebra.adapters import BilinearAttentionModule

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(6, 8), BilinearAttentionModule(2, 4, 8, causal=True), nn.Linear(8, 6))

    torch.save(build().state_dict(), tmp_path / "lm.pt")
    with pytest.raises(LoadError, match=r"BilinearAttention\[1\].*pass n_ctx=") as info:
        ts.load(tmp_path / "lm.pt", build)
    assert "Flatten" not in str(info.value)
    assert ts.load(tmp_path / "lm.pt", build, n_ctx=3).in_features == 3 * 6


def test_the_pairing_tables_are_shared_safely_by_threads(monkeypatch):
    """Lookups marked a key recently used after another thread could have
    evicted it (move_to_end: KeyError); the plan and refusal tables are now
    read and written under one lock, least recently used dropped first."""
    import threading
    from collections import OrderedDict

    from tsalgebra import pairing_sum as S

    monkeypatch.setattr(S, "_PLANS_MAX", 3)
    table: OrderedDict = OrderedDict()
    errors: list = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(3000):
                k = int(rng.integers(6))
                if S._looked_up(table, k) is None:
                    S._kept(table, k, k)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(table) <= 3
    for k in (1, 2, 3):
        S._kept(table, k, k)
    S._looked_up(table, 1)
    S._kept(table, 4, 4)  # 2, the least recently used, goes
    assert list(table) == [3, 1, 4]
