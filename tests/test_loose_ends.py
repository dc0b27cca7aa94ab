"""Fixes: a matrix's over-budget refusal suggests only the methods that fit
its memory bound; ts.load (and --template) passes n_ctx to from_torch, so a
template ending in nn.Flatten loads; every refusal of an existing store is a
usage error on the command line (exit 2), other models too; the default
memory bound sees the memory cgroup's limit (a container's)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.problem as problem
from helpers import exit_code, saved_bilinears
from tsalgebra.io import LoadError
from tsalgebra.problem import CostError, MemoryBoundError

torch = pytest.importorskip("torch")
nn = torch.nn


# ------------------------------------------------ 1. the matrix's memory bound in its budget refusal


def _bilinears(n: int = 4) -> list[ts.Sequential]:
    rng = np.random.default_rng(0)
    return [ts.Sequential(ts.Bilinear(rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(3, 6))))
            for _ in range(n)]


def _refusal(models, **kw) -> CostError:
    with pytest.raises(CostError, match="the materialize route plans") as info:  # the batched route, over budget
        ts.similarity_matrix(models, budget=1, progress=False, **kw)
    return info.value


def test_an_over_budget_matrix_suggests_only_the_methods_that_fit_its_memory_bound():
    """At max_memory=20000 the materialize route fits and is over budget=1;
    its refusal suggested method='sampled' (built without the bound), whose
    plan needs about 1.5e5 bytes: taking it was refused for memory."""
    models = _bilinears()
    methods = [a.value for a in _refusal(models).alternatives if a.option == "method"]
    assert methods == ["closure", "sampled"]  # the default bound holds both
    refused = _refusal(models, max_memory=20_000)
    methods = [a.value for a in refused.alternatives if a.option == "method"]
    assert methods == ["closure"], refused
    for method in methods:  # what is suggested runs under the same bound
        m = ts.similarity_matrix(models, method=method, max_memory=20_000, progress=False)
        assert m.route == "pairwise" and m.method == method
    with pytest.raises(MemoryBoundError):  # what was left out would not have
        ts.similarity_matrix(models, method="sampled", max_memory=20_000, progress=False)
    refused = _refusal(models, max_memory=5_000)  # closure needs about 1.9e4 bytes: neither is suggested
    assert [a.option for a in refused.alternatives] == ["budget"], refused


# ------------------------------------------------ 2. ts.load's n_ctx reaches from_torch


def _flat() -> nn.Module:
    return nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.Flatten())


@pytest.fixture(scope="module")
def flat_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flat")
    (folder / "tpl.py").write_text("from torch import nn\n\n\ndef build():\n"
                                   "    return nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.Flatten())\n")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        paths.append(folder / f"m{seed}.pt")
        torch.save(_flat().state_dict(), paths[-1])
    return folder, paths


def test_load_passes_n_ctx_to_from_torch(flat_checkpoints):
    """An nn.Embedding -> per-position layers -> nn.Flatten template, which
    from_torch(module, n_ctx=3) converts, was refused by ts.load(..., n_ctx=3)."""
    _, paths = flat_checkpoints
    module = _flat()
    module.load_state_dict(torch.load(paths[0], weights_only=True))
    model = ts.load(paths[0], _flat, n_ctx=3)
    assert model.same_weights(ts.from_torch(module, n_ctx=3)) and model.token_input == (5, 3)
    with pytest.raises(LoadError, match=r"m0\.pt: the template reads tokens at positions its weights do not fix.*"
                                        r"pass n_ctx="):
        ts.load(paths[0], _flat)

def test_a_template_without_positions_still_refuses_n_ctx(tmp_path):
    path = tmp_path / "lin.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(LoadError, match=r"lin\.pt: n_ctx=3 was given, but .* has no token positions"):
        ts.load(path, lambda: nn.Linear(3, 2), n_ctx=3)


def test_the_command_lines_template_takes_n_ctx(flat_checkpoints, capsys):
    folder, paths = flat_checkpoints
    template = f"{folder / 'tpl.py'}:build"
    code, out, err = exit_code(capsys, "similarity", paths[0], paths[1], "--template", template, "--n-ctx", 3, "--json")
    assert code == 0, err
    want = ts.similarity(ts.load(paths[0], _flat, n_ctx=3), ts.load(paths[1], _flat, n_ctx=3)).value
    assert json.loads(out)["value"] == pytest.approx(want, rel=1e-12)
    code, out, err = exit_code(capsys, "similarity", paths[0], paths[1], "--template", template)
    assert code == 2 and "pass --n-ctx N" in err and "n_ctx" not in err and "from_torch" not in err, err


# ------------------------------------------------ 3. a store of other models is a usage error


def test_a_store_of_other_models_is_a_usage_error_naming_the_file(tmp_path, capsys):
    """It exited 1 ("use a new directory"), where a store of other options
    or another version exits 2."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, other = saved_bilinears(tmp_path / "a", seed=0), saved_bilinears(tmp_path / "b", seed=1)
    store = tmp_path / "st"
    base = ["--store", store, "--out", tmp_path / "m.png", "--no-progress"]
    assert exit_code(capsys, "matrix", *first, *base)[0] == 0
    code, out, err = exit_code(capsys, "matrix", *other, *base, "--json")
    assert code == 2, err
    said = json.loads(out)["error"]
    assert json.loads(out)["exit_code"] == 2
    assert f"store {store} holds tiles of other models (rows: {other[0]} differs" in said
    assert "give --store DIR a new directory, or the models it was written for" in said and "store=" not in said
    code, _, err = exit_code(capsys, "matrix", *first[:2], *base)  # fewer models
    assert code == 2 and "2 models against" not in err and "3 models against 2" in err, err
    with pytest.raises(ValueError, match=r"other models \(rows: model 0 differs .*give store= a new directory"):
        ts.similarity_matrix([ts.load(f) for f in other], store=store, progress=False)


def test_a_store_of_another_measure_names_its_label_and_is_a_usage_error(tmp_path, flat_checkpoints, capsys):
    """The measure, an option without a flag of its own, was named by its
    manifest record (a dict) and exited 1."""
    folder, paths = flat_checkpoints
    probs = tmp_path / "probs.txt"
    probs.write_text("0.1 0.2 0.3 0.2 0.2\n")
    base = ["matrix", *paths, "--template", f"{folder / 'tpl.py'}:build", "--n-ctx", 3, "--store", tmp_path / "st",
            "--out", tmp_path / "m.png", "--no-progress"]
    assert exit_code(capsys, *base)[0] == 0
    code, _, err = exit_code(capsys, *base, "--token-probs", probs)
    assert code == 2, err
    assert ("written with measure='tokens(5 x 3, uniform)', this call has measure='tokens(5 x 3, given "
            "frequencies)'; give --store DIR a new directory, or the same options") in err
    models = _bilinears(3)
    law = ts.Gaussian(mean=np.ones(4))
    ts.similarity_matrix(models, measure=law, store=tmp_path / "py", progress=False)
    with pytest.raises(ValueError, match=r"written with measure='N\(mean, cov\)' \(fields digest \w{12}\.\.\.\), "
                                         r"this call has measure='N\(mean, cov\)' \(fields digest"):
        ts.similarity_matrix(models, measure=ts.Gaussian(mean=2 * np.ones(4)), store=tmp_path / "py",
                             progress=False)


# ------------------------------------------------ 4. the memory cgroup's limit


GiB = 2**30


def _fake(monkeypatch, root, own="0::/\n"):
    """Point the cgroup reader at ``root``, with ``own`` as /proc/self/cgroup."""
    (root / "self").write_text(own)
    monkeypatch.setattr(problem, "CGROUP_ROOT", root, raising=False)
    monkeypatch.setattr(problem, "SELF_CGROUP", root / "self", raising=False)


def test_the_default_bound_is_within_a_cgroup_v2_limit(tmp_path, monkeypatch):
    """MemAvailable is the host's: in a container limited to 64 MiB the
    default bound (half the available memory) could exceed the limit."""
    _fake(monkeypatch, tmp_path)
    (tmp_path / "memory.max").write_text(f"{64 * 2**20}\n")
    (tmp_path / "memory.current").write_text(f"{16 * 2**20}\n")
    assert problem.available_memory() == 48 * 2**20
    assert problem.default_max_memory() == 24 * 2**20
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the host's figure
    assert problem.cgroup_memory() is None and problem.available_memory() > 48 * 2**20


def test_a_cgroup_v1_limit_and_the_smaller_of_both(tmp_path, monkeypatch):
    _fake(monkeypatch, tmp_path, "4:memory:/\n0::/\n")
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the kernel's "no limit"
    (v1 / "memory.usage_in_bytes").write_text(f"{GiB}\n")
    assert problem.cgroup_memory(tmp_path) is None
    (v1 / "memory.limit_in_bytes").write_text(f"{3 * GiB}\n")
    assert problem.cgroup_memory(tmp_path) == 2 * GiB
    (v1 / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {GiB // 2}\n")  # reclaimable: counted free
    assert problem.cgroup_memory(tmp_path) == 2 * GiB + GiB // 2
    (tmp_path / "memory.max").write_text(f"{2 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{GiB}\n")
    assert problem.cgroup_memory(tmp_path) == GiB  # v2's is smaller
    (tmp_path / "memory.current").write_text("not a number\n")  # unreadable: no limit from it
    assert problem.cgroup_memory(tmp_path) == 2 * GiB + GiB // 2


def test_a_limit_above_the_process_cgroup_binds_it(tmp_path, monkeypatch):
    """Without a cgroup namespace the process's cgroup is a folder under the
    root (a systemd slice): its limit and its parents' are read."""
    _fake(monkeypatch, tmp_path, "0::/slice/job\n")
    job = tmp_path / "slice" / "job"
    job.mkdir(parents=True)
    for d, limit, used in ((job, "max", 5 * GiB), (job.parent, str(4 * GiB), 3 * GiB)):
        (d / "memory.max").write_text(limit + "\n")
        (d / "memory.current").write_text(f"{used}\n")
    assert problem.cgroup_memory() == GiB
    (job / "memory.max").write_text(f"{GiB // 4 + 5 * GiB}\n")  # its own, smaller
    assert problem.cgroup_memory() == GiB // 4
