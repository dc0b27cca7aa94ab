"""Code defects a comparison of the documents with the behaviour found.

- A refusal no budget answers (the network product of attention layers or of
  a Polynomial, the symmetric product of a two-layer language model) named
  no way forward: its alternatives were empty, though docs/refusals.md
  promised another inner product.  It now names the models' functional
  question (their token measure where they read tokens, else the Gaussian),
  where that has a plan within the memory bound, as the other suggestions.
- ``matrix/results.py`` imported ``plots`` at load time, against the layer
  map of docs/architecture.md (whose table also left out ``matrix/costs.py``
  and the lazy import of ``progress.py``).
- ``--help`` left out the defaults of ``verify --tol``, ``summary --batch``,
  ``matrix --tile``, ``--method``, ``--route`` and every ``--seed``.
- The command line kept its own copy of the per-CPU worker bound of
  ``workers=``; ``matrix --json`` left out the matrix's ``algorithms`` and
  ``log_norms`` (a norm beyond float64 is NaN, its log the only record).
- ``benchmarks/closure_table.py`` tested an algorithm name no longer
  registered ("pairing orbits"), so it printed another table than the docs.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import sympy

import tsalgebra as ts
from helpers import TINY_LM_TEMPLATE, exit_code, template_checkpoints, tiny_lm
from tsalgebra.problem import CostError, MemoryBoundError, NotApplicableError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tsalgebra"
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()


# ------------------------------------------------------------ 1. the other inner product


def _offered(err: CostError) -> list[tuple[str, object]]:
    return [(alt.option, alt.value) for alt in err.alternatives]


@pytest.mark.parametrize("inner, kind", [("network", NotApplicableError), ("symmetric", CostError)])
def test_a_language_models_refusal_names_its_token_question(inner, kind):
    a, b = tiny_lm(0), tiny_lm(1)
    with pytest.raises(kind) as info:
        ts.similarity(a, b, inner)
    assert ("inner", "tokens") in _offered(info.value), info.value
    assert "inner='tokens' (the functional product under the models' token measure, tokens(5 x 3" in str(info.value)
    assert "--inner tokens (" in info.value.explain(cli=True)
    r = ts.similarity(a, b, inner="tokens")  # taken, it answers
    assert r.exact and np.isfinite(r.value)


def test_a_polynomials_network_refusal_names_the_gaussian_question():
    x1, x2 = sympy.symbols("x1 x2")
    rng = np.random.default_rng(0)
    model = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
    poly = ts.from_sympy([x1 * x2, x1], [x1, x2])
    with pytest.raises(NotApplicableError) as info:
        ts.similarity(model, poly, "network")
    assert _offered(info.value) == [("inner", "gaussian")], info.value
    assert np.isfinite(float(ts.similarity(model, poly, inner="gaussian").value))


def test_the_other_inner_product_is_offered_only_within_the_memory_bound():
    a, b = tiny_lm(0), tiny_lm(1)
    need = max(plan.peak_bytes for _, plan in ts.plan_similarity(a, b, inner="tokens").products)
    with pytest.raises(NotApplicableError) as info:
        ts.similarity(a, b, "network", max_memory=need // 2)
    assert not _offered(info.value), info.value
    assert f"the token inner product, the least of them, needs {need:.3g} bytes" in str(info.value)
    with pytest.raises(MemoryBoundError):  # what is not offered would not run
        ts.similarity(a, b, "tokens", max_memory=need // 2)
    with pytest.raises(NotApplicableError) as info:
        ts.similarity(a, b, "network", max_memory=need)
    assert _offered(info.value) == [("inner", "tokens")], info.value
    assert np.isfinite(ts.similarity(a, b, "tokens", max_memory=need).value)


def test_a_functional_refusal_suggests_no_other_inner_product():
    """The functional question suggests the network product, as before, and
    never itself."""
    rng = np.random.default_rng(0)
    a, b = (ts.Bilinear(rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(3, 6))) for _ in range(2))
    with pytest.raises(CostError) as info:
        ts.similarity(a, b, budget=1)
    assert [v for o, v in _offered(info.value) if o == "inner"] == ["network"], info.value


def test_the_command_line_spells_the_other_inner_product(tmp_path, capsys):
    template, (a, b) = template_checkpoints(tmp_path, "tinylm_docs", TINY_LM_TEMPLATE)
    code, out, err = exit_code(capsys, "similarity", a, b, "--template", template, "--inner", "network", "--json")
    refused = json.loads(out)
    assert code == 2 and refused["exit_code"] == 2, err
    assert [x.split(" (")[0] for x in refused["alternatives"]] == ["--inner tokens"], refused
    assert "Alternatives: --inner tokens (" in refused["error"]
    code, out, err = exit_code(capsys, "similarity", a, b, "--template", template, "--inner", "tokens")
    assert code == 0 and "similarity = " in out, err


# ------------------------------------------------------------ 2. the layer map


LAYERS = [  # docs/architecture.md's table, top to bottom
    ["expr", "arrays", "threads", "heap", "progress", "messages"], ["planner", "engine"],
    ["components", "attention", "symbolic", "rescale"], ["measure"], ["problem"],
    ["pairings", "pairing_sum", "folding", "form_moments", "node_sums"], ["algorithms"], ["inner", "cosine"],
    ["matrix"], ["invariance", "verify", "formulas", "circuits", "symmetries", "baselines", "testing"],
    ["adapters", "io", "layouts", "jsonable", "plots"], ["cli", "demos"]]
RANK = {m: k for k, layer in enumerate(LAYERS) for m in layer}
# the lazy upward imports the map names, each inside a function
EXCEPTIONS = {("components", "measure"), ("matrix", "plots"), ("progress", "algorithms")}


def _upward_imports() -> tuple[set[tuple[str, str, bool]], list[str]]:
    """(importer's top module, imported top module, lazy) of every upward
    relative import in the package, and the modules placed in no layer."""
    found: set[tuple[str, str, bool]] = set()
    unplaced = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        me = parts[0]
        if me in ("__init__", "__main__"):
            continue
        if me not in RANK:
            unplaced.append(str(path))
            continue

        def visit(node: ast.AST, lazy: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inside = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, ast.ImportFrom) and child.level:
                    target = parts[:len(parts) - child.level] + (child.module.split(".") if child.module else [])
                    for top in [target[0]] if target else [a.name for a in child.names]:
                        if top in RANK and RANK[top] > RANK[me]:
                            found.add((me, top, inside))
                visit(child, inside)

        visit(ast.parse(path.read_text()), False)
    return found, unplaced


def test_every_upward_import_is_lazy_and_named_by_the_map():
    found, unplaced = _upward_imports()
    assert not unplaced, unplaced
    assert not [f for f in found if not f[2]], found  # none at load time (matrix/results.py imported plots)
    assert {(a, b) for a, b, _ in found} == EXCEPTIONS, found
    for module in ("components.py", "matrix/results.py", "progress.py"):
        assert f"`{module}`" in ARCHITECTURE.split("| layer |")[0], module  # named among the exceptions


def test_the_map_names_every_module():
    mentioned = set(re.findall(r"`([\w/]+\.py)`", ARCHITECTURE))
    names = {p.split("/")[-1] for p in mentioned}
    for path in sorted(PACKAGE.glob("*.py")) + sorted((PACKAGE / "matrix").glob("*.py")):
        if path.stem not in ("__init__", "__main__"):
            assert path.name in names, path  # matrix/costs.py was left out
    braces = re.search(r"`algorithms/\{([\w,]+)\}\.py`", ARCHITECTURE)
    assert braces is not None
    listed = set(braces.group(1).split(",")) | {"registry"}
    assert listed == {p.stem for p in (PACKAGE / "algorithms").glob("*.py")} - {"__init__"}


def test_a_matrix_title_still_says_when_its_cells_are_written():
    rng = np.random.default_rng(0)
    ms = [ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3))) for _ in range(2)]
    m = ts.similarity_matrix(ms, progress=False, method="sampled", samples=100, seed=0)
    assert "(each under its cosine)" in m.title()  # 2 x 2: annotated, as the renderer's size says


# ------------------------------------------------------------ 3. the command line


def _options(parser: argparse.ArgumentParser, name: str = "tsalgebra"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _options(p, f"{name} {sub}")
        elif action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                                                argparse._StoreTrueAction)):
            yield name, action


def test_help_states_every_default():
    from tsalgebra.cli import build_parser

    seen = {}
    for command, action in _options(build_parser()):
        flag = action.option_strings[-1]
        seen[(command, flag)] = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in (action.help or ""), (command, flag, action.default)
    assert "default 1e-09" in seen[("tsalgebra verify", "--tol")]
    assert "default 32" in seen[("tsalgebra summary", "--batch")]
    assert "tiles per worker" in seen[("tsalgebra matrix", "--tile")]
    for command in ("similarity", "plan", "verify", "matrix", "demo grokking", "demo backdoor", "demo language"):
        assert "default" in seen[(f"tsalgebra {command}", "--seed")], command


def test_workers_are_bounded_by_the_clusters_own_figure(monkeypatch, capsys):
    import os

    from tsalgebra.matrix import cluster

    monkeypatch.setattr(cluster, "WORKERS_PER_CPU", 1)
    too_many = str((os.cpu_count() or 1) + 1)
    code, _, err = exit_code(capsys, "matrix", "a.safetensors", "b.safetensors", "--workers", too_many)
    assert code == 2 and "(1 per CPU of this machine's" in err, err


def test_matrix_json_gives_the_algorithms_and_the_logs_of_the_norms(tmp_path, capsys):
    rng = np.random.default_rng(0)
    files = []
    for k, scale in enumerate((1e200, 1.0, 1.0)):  # model 0's norm, about 10^601, beyond float64
        files.append(tmp_path / f"m{k}.safetensors")
        ts.save(ts.Bilinear(*(rng.normal(size=s) * scale for s in ((4, 3), (4, 3), (2, 4)))), files[-1])
    code, out, err = exit_code(capsys, "matrix", *files, "--out", tmp_path / "m.png", "--route", "pairwise",
                               "--json", "--no-progress")
    assert code == 0, err
    got = json.loads(out)
    assert got["algorithms"] == ["pairings"]
    assert got["norms"][0] is None and all(np.isfinite(got["norms"][1:]))
    assert got["log_norms"][0] == pytest.approx(601 * np.log(10), rel=1e-3)
    np.testing.assert_allclose(np.exp(got["log_norms"][1:]), got["norms"][1:], rtol=1e-12)
    assert "col_log_norms" not in got  # one list of models: a symmetric matrix
    assert any("NaN (null in JSON) in norms, its natural log in log_norms" in n for n in got["notes"])
    assert any(n.startswith(f"the norm of {files[0]}, 10^601") for n in got["notes"])  # the file, as the text says


# ------------------------------------------------------------ 4. the benchmark's algorithm names


def test_the_closure_benchmark_tests_registered_algorithm_names():
    source = (ROOT / "benchmarks" / "closure_table.py").read_text()
    names = set(re.findall(r"\.algorithm == \"([^\"]+)\"", source))
    assert names and names <= {alg.name for alg in ts.algorithms.registered()}, names
