"""Review fixes: similarity_matrix checks its flags and degree= as
ts.similarity does, on every route; a refusal suggests max_memory only for
the question asked (a bound that fits only another question was refused
when taken alone), stating the others' needs in its text."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts
from helpers import exit_code
from tsalgebra.io import save
from tsalgebra.problem import CostError, MemoryBoundError


def _bilinears(n: int = 3, seed: int = 0) -> list[ts.Bilinear]:
    rng = np.random.default_rng(seed)
    return [ts.Bilinear(rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(3, 6))) for _ in range(n)]


def _message(call) -> tuple[type, str]:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return type(info.value), str(info.value)


# ------------------------------------------------------------ A: the same checks on every route


@pytest.mark.parametrize("kw", [dict(centered="yes"), dict(centered=0), dict(per_output=1),
                                dict(degree=4), dict(degree=0), dict(degree=True)])
def test_the_matrix_checks_as_similarity_does_on_every_route(kw):
    models = _bilinears()
    expected = _message(lambda: ts.similarity(models[0], models[1], "gaussian", **kw))
    for route in ("auto", "materialize", "pairwise"):
        got = _message(lambda: ts.similarity_matrix(models, inner="gaussian", route=route, progress=False, **kw))
        assert got == expected, (route, got, expected)


def test_a_numpy_bool_is_still_taken_and_stored_as_a_bool():
    models = _bilinears()
    r = ts.similarity_matrix(models, inner="gaussian", centered=np.bool_(True), progress=False)
    assert r.centered is True


# ------------------------------------------------------------ B: max_memory only for the question asked


def _stack(rng, depth: int, width: int) -> ts.Sequential:
    def w(*s):
        return rng.normal(size=s) / np.sqrt(s[-1])
    return ts.Sequential(*[ts.Bilinear(w(width, width), w(width, width), w(width, width)) for _ in range(depth)])


def test_a_budget_refusal_suggests_no_bound_that_fits_only_another_question():
    a, b = _bilinears(2)
    with pytest.raises(CostError) as info:
        ts.similarity(a, b, budget=1, max_memory=3000)
    refused = info.value
    assert not isinstance(refused, MemoryBoundError)
    assert not [alt for alt in refused.alternatives if alt.option in ("max_memory", "inner", "method")], refused
    assert "no other question fits the bound: the network inner product" in str(refused)


def test_every_max_memory_suggested_taken_alone_plans():
    """The brief's stack (depth 2, width 16) at max_memory=3000: a max_memory
    suggested, taken with the rest as asked, plans (it used to be offered
    for the network product alone, and taken alone stayed refused)."""
    rng = np.random.default_rng(0)
    a, b = _stack(rng, 2, 16), _stack(rng, 2, 16)
    for budget in (1, 1e15):
        with pytest.raises(CostError) as info:
            ts.plan_inner(a, b, budget=budget, max_memory=3000)
        for alt in info.value.alternatives:
            if alt.option == "max_memory":
                ts.plan_inner(a, b, budget=budget, max_memory=alt.value)


def test_verify_suggests_no_max_memory_for_an_inner_it_cannot_ask(tmp_path, capsys):
    rng = np.random.default_rng(0)
    c = ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 4)))
    d = ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 4)))
    save(c, tmp_path / "c.safetensors")
    save(d, tmp_path / "d.safetensors")
    code, out, err = exit_code(capsys, "verify", tmp_path / "d.safetensors", tmp_path / "c.safetensors",
                               "--budget", "1", "--max-memory", "300")
    text = out + err
    assert code != 0 and "Alternatives" in text, text
    alternatives = text[text.index("Alternatives"):]
    assert "--max-memory" not in alternatives and "--inner network" not in alternatives, alternatives
