"""Fixes: a store of another store version is a usage error naming both
versions (and a short store name is no part of "store=" in the message); a
matrix's heavy-tail label sits in its "(estimated, ...)" parenthesis as
ts.similarity's; overflow warnings are not printed beside the named
FloatingPointError; an exception whose __str__ fails is still one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.cli as cli
from helpers import exit_code, saved_bilinears
from tsalgebra.matrix.cluster import STORE_VERSION


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return saved_bilinears(tmp_path_factory.mktemp("ck"))


@pytest.fixture(scope="module")
def heavy_files(tmp_path_factory):
    """Three residual stacks of three bilinear layers (3 -> 4 -> 3) and a
    readout, saved: their products are heavy-tailed at the default samples
    (the one-layer models of ``files`` are not, by the flag's kurtosis test)."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.normal(size=shape) / np.sqrt(shape[-1])

    folder = tmp_path_factory.mktemp("heavy")
    paths = []
    for i in range(3):
        layers = [ts.Bilinear(w(4, 3), w(4, 3), w(3, 4), residual=True) for _ in range(3)]
        ts.save(ts.Sequential(*layers, ts.Linear(w(2, 3))), folder / f"m{i}.safetensors")
        paths.append(folder / f"m{i}.safetensors")
    return paths


def _old_store(capsys, tmp_path, files, name, version):
    """A store written by this version, then its manifest set to ``version``."""
    store = tmp_path / name
    assert exit_code(capsys, "matrix", *files, "--store", store, "--out", tmp_path)[0] == 0
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["version"] = version
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store


@pytest.mark.parametrize("name", ["st", "old-store"])  # "st" is a part of "store="
def test_a_store_of_an_older_version_is_a_usage_error_naming_both_versions(tmp_path, files, capsys, name):
    store = _old_store(capsys, tmp_path, files, name, STORE_VERSION - 1)
    code, out, err = exit_code(capsys, "matrix", *files, "--store", store, "--out", tmp_path, "--json")
    assert code == 2, err
    said = json.loads(out)["error"]
    assert f"store version {STORE_VERSION - 1} (an older tsalgebra)" in said
    assert f"reads store version {STORE_VERSION} only" in said and "give --store DIR a new directory" in said
    assert str(store) in said and "store=" not in said
    models = [ts.load(f) for f in files]
    with pytest.raises(ValueError, match=rf"store version {STORE_VERSION - 1} .*give store= a new directory"):
        ts.similarity_matrix(models, store=store, progress=False)


def test_a_store_of_a_newer_version_or_none_is_named_so(tmp_path, files, capsys):
    store = _old_store(capsys, tmp_path, files, "new", STORE_VERSION + 1)
    code, _, err = exit_code(capsys, "matrix", *files, "--store", store, "--out", tmp_path)
    assert code == 2 and f"store version {STORE_VERSION + 1} (a newer tsalgebra)" in err
    (store / "manifest.json").write_text("[1]")
    code, _, err = exit_code(capsys, "matrix", *files, "--store", store, "--out", tmp_path)
    assert code == 2 and "has no store version" in err


def test_a_short_path_is_kept_only_where_it_stands_alone():
    text, usage = cli._cli_spelling("store st: give store= a new directory (st/tiles)", ["st"])
    assert text == "store st: give --store DIR a new directory (st/tiles)" and usage
    text, usage = cli._cli_spelling("samples=5.pt: not a checkpoint", ["samples=5.pt"])
    assert text == "samples=5.pt: not a checkpoint" and not usage


def test_a_heavy_tailed_matrix_says_so_inside_its_estimated_parenthesis(heavy_files):
    models = [ts.load(f) for f in heavy_files]
    kw = dict(method="sampled", seed=0, progress=False)
    m = ts.similarity_matrix(models, **kw)
    assert m.heavy_tailed.any()
    one = ts.similarity(models[0], models[1], **kw)
    assert one.estimate.heavy_tailed
    label = "sampled (estimated, heavy tails: the error bar is doubtful)"
    assert label in repr(one) and label in repr(m)
    assert repr(m).count("heavy tails") == 1


def _huge_before_residual(seed, scale=1e200):
    r = np.random.default_rng(seed)
    return ts.Sequential(ts.Linear(r.normal(size=(3, 3)) * scale),
                         ts.Bilinear(r.normal(size=(4, 3)), r.normal(size=(4, 3)), r.normal(size=(3, 4)), residual=True))


@pytest.mark.parametrize("call", [
    lambda a, b: ts.similarity(a, b), lambda a, b: ts.inner(a, b), lambda a, b: ts.norm(a),
    lambda a, b: ts.similarity(a, b, per_output=True), lambda a, b: ts.similarity(a, b, method="sampled", seed=0),
])
def test_an_overflow_named_as_floatingpointerror_prints_no_numpy_warning(call):
    a, b = _huge_before_residual(1), _huge_before_residual(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FloatingPointError, match="not finite .* although the models were rescaled"):
            call(a, b)
    assert [str(w.message) for w in caught] == []
    assert np.geterr()["over"] == "warn" and np.geterrcall() is None  # the scope left as it was


def test_an_overflow_named_at_the_command_line_has_no_notes(tmp_path, capsys):
    for side, seed in (("a", 1), ("b", 2)):
        ts.save(_huge_before_residual(seed), tmp_path / f"{side}.safetensors")
    code, out, err = exit_code(capsys, "similarity", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert code == 1 and "not finite" in json.loads(out)["error"]
    assert "notes" not in json.loads(out) and "note:" not in err


def test_an_overflow_that_left_finite_numbers_is_still_warned():
    """Held back only where the named error says it: here nothing does."""
    from tsalgebra.inner import _overflow_named

    with pytest.warns(RuntimeWarning, match="overflow encountered in the inner products"):
        with _overflow_named():
            np.array([1e300]) * 1e300


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("its __str__ fails")


class _UnprintableValue(ValueError):
    def __str__(self):
        raise RuntimeError("its __str__ fails")


@pytest.mark.parametrize("kind", [_Unprintable, _UnprintableValue])
def test_an_exception_whose_message_fails_is_still_one_line(monkeypatch, capsys, kind):
    def broken(args):
        raise kind("x")

    monkeypatch.setattr(cli, "cmd_summary", broken)
    code, out, err = exit_code(capsys, "summary", "--json")
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"unexpected {kind.__name__} (its message cannot be printed)" in lines[0]
    assert json.loads(out)["exit_code"] == 1


def test_similarity_json_carries_the_heavy_tail_flag(files, heavy_files, capsys):
    # the repr said "heavy tails: the error bar is doubtful"; the JSON had no field for it
    for pair, heavy in ((heavy_files[:2], True), (files[:2], False)):
        a, b = (ts.load(f) for f in pair)
        want = ts.similarity(a, b, method="sampled", seed=0)
        assert want.estimate.heavy_tailed is heavy  # deep stacks' products are heavy-tailed at the default samples
        assert cli.main(["similarity", str(pair[0]), str(pair[1]), "--method", "sampled", "--seed", "0",
                         "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["heavy_tailed"] is heavy and out["value"] == pytest.approx(want.value, rel=1e-12)
    assert cli.main(["similarity", str(files[0]), str(files[1]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["heavy_tailed"] is None  # exact: no estimate


def test_plan_says_a_sampled_product_is_estimated(files, capsys):
    # plan --method sampled labelled the Monte Carlo plan "approximate"
    assert cli.main(["plan", str(files[0]), str(files[1]), "--method", "sampled", "--samples", "100"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("<a,b>"))
    assert ", estimated (" in line and "approximate" not in line
    assert cli.main(["plan", str(files[0]), str(files[1]), "--method", "closure"]) == 0
    out = capsys.readouterr().out
    assert "<a,b>: closure" in out and ", estimated" not in out


def test_a_keyword_ending_a_sentence_is_said_as_its_flag():
    # a refusal's reason ends before ". Alternatives: ...": max_memory=1,000 was left in Python spelling
    assert cli._cli_spelling("over max_memory=1,000. Alternatives: x") == ("over --max-memory 1000. Alternatives: x",
                                                                           True)
    assert cli._cli_spelling("the budget=2e+11.") == ("the --budget 2e+11.", True)
