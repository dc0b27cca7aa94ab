"""Fixes: an nn.Embedding followed by layers that all act per position and
an nn.Flatten converted to a model of ONE token (torch runs it on any
number: its (batch, 3) ids were refused, its (batch, 1) ids gave (batch, d)
where the guide promises (batch, positions, d)); now it is refused without
from_torch's new n_ctx=, and converts at n_ctx positions with it, checked
against the torch module's own forward.  A similarity-matrix store whose
manifest.json cannot be read (not JSON, truncated, a directory, not UTF-8)
was a failure (exit 1, "use a new directory"); now it is the usage error a
store of another version is: store= (--store DIR), naming the file and why."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import tsalgebra as ts
from helpers import exit_code, saved_bilinears
from tsalgebra.adapters import AdapterError, BilinearAttentionModule, BilinearLayer, attention_adapter

V, D, H = 4, 3, 5


def _flat_end(seed, flatten=True):
    torch.manual_seed(seed)
    mods = [nn.Embedding(V, D), BilinearLayer(D, H, D)] + ([nn.Flatten()] if flatten else [])
    return nn.Sequential(*mods).double().eval()


def _torch(net, ids):
    with torch.no_grad():
        return net(torch.as_tensor(np.asarray(ids), dtype=torch.long)).numpy()


def _enumerated(na, nb, n, probs):
    """<a, b>, <a, a>, <b, b> over every sequence of n tokens, by the torch
    modules' own forwards (position k's token drawn from probs[k])."""
    ids = np.array(list(itertools.product(range(V), repeat=n)))
    w = np.prod([probs[k, ids[:, k]] for k in range(n)], axis=0)
    fa, fb = (_torch(net, ids).reshape(len(ids), -1) for net in (na, nb))
    return tuple(float(w @ (x * y).sum(1)) for x, y in ((fa, fb), (fa, fa), (fb, fb)))


# ------------------------------------------------------ Flatten ending an embedding model


def test_a_flatten_ending_a_per_position_token_model_needs_n_ctx():
    """Was: a one-token model, though torch takes (batch, n) ids for any n."""
    net = _flat_end(0)
    assert _torch(net, [[0, 1, 2], [3, 2, 1]]).shape == (2, 3 * D)  # torch reads three tokens
    with pytest.raises(AdapterError, match=r"^<root>: the nn.Flatten at 2 flattens the token positions .*"
                                           r"Pass from_torch\(module, n_ctx=N\)"):
        ts.from_torch(net)
    torch.manual_seed(1)  # an embedding alone, and a Flatten inside a nested Sequential: named by its path
    for bad, where in ((nn.Sequential(nn.Embedding(V, D), nn.Flatten()), "1"),
                       (nn.Sequential(nn.Embedding(V, D), nn.Sequential(nn.Linear(D, 2), nn.Flatten())), "1.1")):
        with pytest.raises(AdapterError, match=rf"the nn.Flatten at {where} flattens the token positions"):
            ts.from_torch(bad.double())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_n_ctx_converts_it_at_that_many_tokens_as_torch_computes_it(n):
    na, nb = _flat_end(0), _flat_end(1)
    a, b = ts.from_torch(na, n_ctx=n), ts.from_torch(nb, n_ctx=n)
    assert a.token_input == (V, n) and a.default_measure.n_ctx == n
    ids = np.random.default_rng(n).integers(0, V, size=(6, n))
    got = np.asarray(a(ids))
    assert got.shape == (6, n, D)  # per position, as the guide says; torch's numbers flattened
    np.testing.assert_allclose(got.reshape(6, -1), _torch(na, ids), rtol=1e-12, atol=1e-14)
    # a similarity over n tokens of other frequencies at each position: the number depends on n
    probs = np.random.default_rng(10 + n).dirichlet(np.ones(V), size=n)
    ab, aa, bb = _enumerated(na, nb, n, probs)
    s = ts.similarity(a, b, measure=ts.Tokens(V, n, probs))
    assert s.value == pytest.approx(ab / np.sqrt(aa * bb), rel=1e-10)
    assert ts.inner(a, b, measure=ts.Tokens(V, n, probs)).value == pytest.approx(ab, rel=1e-10)


def test_n_ctx_without_a_flatten_and_on_a_bare_embedding():
    """Without a Flatten the default stays one token; n_ctx= gives torch's
    (batch, n, d) for n tokens."""
    net = _flat_end(2, flatten=False)
    assert ts.from_torch(net).token_input == (V, 1)
    m = ts.from_torch(net, n_ctx=3)
    ids = np.array([[0, 1, 2], [3, 3, 0]])
    np.testing.assert_allclose(np.asarray(m(ids)), _torch(net, ids), rtol=1e-12, atol=1e-14)
    emb = nn.Embedding(V, D).double()
    e = ts.from_torch(emb, n_ctx=3)
    np.testing.assert_allclose(np.asarray(e(ids)), _torch(emb, ids), rtol=0, atol=0)


def test_n_ctx_binds_attention_layers():
    """An attention module without n_ctx of its own (was refused: set the
    number of positions first) or with another is read at n_ctx."""
    torch.manual_seed(3)
    for own in (None, 3):
        net = nn.Sequential(nn.Embedding(V, 4), BilinearAttentionModule(2, 2, 4, n_ctx=own, causal=True, bias=True,
                                                                        rotary_base=10_000.0),
                            nn.Linear(4, 2), nn.Flatten()).double().eval()
        m = ts.from_torch(net, n_ctx=5)
        ids = np.random.default_rng(4).integers(0, V, size=(3, 5))
        np.testing.assert_allclose(np.asarray(m(ids)).reshape(3, -1), _torch(net, ids), rtol=1e-10, atol=1e-13)


def test_n_ctx_is_refused_where_the_weights_fix_another_or_there_are_no_tokens():
    torch.manual_seed(5)
    grok = nn.Sequential(nn.Embedding(V, D), nn.Flatten(), BilinearLayer(2 * D, H, V)).double().eval()
    assert ts.from_torch(grok, n_ctx=2).token_input == (V, 2)
    with pytest.raises(AdapterError, match=r"n_ctx=3 was given, but Bilinear\[2\].* after the nn.Flatten at 1 reads "
                                           r"6 features: 2 token positions of 3, fixed by its weights"):
        ts.from_torch(grok, n_ctx=3)
    read = nn.Sequential(nn.Embedding(V, 4), BilinearAttentionModule(1, 2, 4, n_ctx=3), nn.Flatten(),
                         nn.Linear(12, 2)).double().eval()
    with pytest.raises(AdapterError, match=r"n_ctx=5 was given, but Linear\[3\].* reads 12 features: 3 token "
                                           r"positions of 4"):
        ts.from_torch(read, n_ctx=5)
    with pytest.raises(AdapterError, match=r"n_ctx=2 was given, but .* reads no token positions"):
        ts.from_torch(nn.Linear(3, 2), n_ctx=2)
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(AdapterError, match=r"the number of token positions must be a positive integer"):
            ts.from_torch(_flat_end(0), n_ctx=bad)
    with pytest.raises(AdapterError, match=r"returned as is; rebind its positions"):
        ts.from_torch(ts.Linear(np.eye(2)), n_ctx=2)
    assert ts.from_torch(_flat_end(0), n_ctx=np.int64(2)).token_input == (V, 2)


# ------------------------------------------------------ an unreadable store manifest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return saved_bilinears(tmp_path_factory.mktemp("ck"))


def _damage(manifest, how):
    text = manifest.read_text()
    if how == "directory":
        manifest.unlink()
        manifest.mkdir()
    else:
        manifest.write_bytes({"not JSON": b"{not json", "truncated": text[: len(text) // 2].encode(),
                              "not UTF-8": b"\xff\xfe{}"}[how])


@pytest.mark.parametrize("how, why", [("not JSON", r"not JSON: Expecting"), ("truncated", r"not JSON: "),
                                      ("directory", r"Is a directory"), ("not UTF-8", r"not UTF-8 text")])
def test_an_unreadable_manifest_is_a_usage_error_naming_the_file(tmp_path, files, capsys, how, why):
    """Was: exit 1, "use a new directory" (a store of another version: exit 2)."""
    store = tmp_path / "st"
    assert exit_code(capsys, "matrix", *files, "--store", store, "--out", tmp_path)[0] == 0
    manifest = store / "manifest.json"
    _damage(manifest, how)
    code, out, err = exit_code(capsys, "matrix", *files, "--store", store, "--out", tmp_path, "--json")
    assert code == 2, err
    said = json.loads(out)["error"]
    assert f"its manifest {manifest} is unreadable (" in said and "give --store DIR a new directory" in said
    assert "store=" not in said
    models = [ts.load(f) for f in files]
    with pytest.raises(ValueError, match=rf"manifest .*manifest.json is unreadable \({why}.*give store= a new "
                                         r"directory"):
        ts.similarity_matrix(models, store=store, progress=False)


def test_a_module_outside_the_attention_layout_is_an_adapter_error_naming_it():
    # the error was built with one argument: a TypeError in place of the refusal
    with pytest.raises(AdapterError, match=r"^blocks\.0: not in the bilinear-attention layout"):
        attention_adapter(nn.Linear(2, 2), "blocks.0")


@pytest.mark.parametrize("field,value,why", [("rows", 5, "rows or cols are not lists"), ("rows", [1, 2, 3], "rows or"),
                                             ("cols", "x", "rows or cols"), ("options", [], "options are not")])
def test_an_edited_manifest_is_unreadable_not_a_python_error(tmp_path, files, capsys, field, value, why):
    """A manifest whose rows were edited to 5 gave exit 1, "object of type 'int' has no len()"."""
    store = tmp_path / "st"
    assert exit_code(capsys, "matrix", *files, "--store", store, "--out", tmp_path)[0] == 0
    manifest = store / "manifest.json"
    data = json.loads(manifest.read_text())
    data[field] = value
    manifest.write_text(json.dumps(data))
    code, out, err = exit_code(capsys, "matrix", *files, "--store", store, "--out", tmp_path, "--json")
    said = json.loads(out)["error"]
    assert code == 2 and f"its manifest {manifest} is unreadable (" in said and why in said, said


def test_a_truncated_tile_leaves_no_file_open(tmp_path):
    """numpy's np.load(path) kept the file open where the zip was truncated:
    one descriptor per damaged tile over a long resume."""
    import gc
    import warnings

    rng = np.random.default_rng(0)
    models = [ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))) for _ in range(4)]
    want = ts.similarity_matrix(models, store=tmp_path / "st", tile=2, progress=False).values
    tile = next((tmp_path / "st" / "tiles").glob("*.npz"))
    data = tile.read_bytes()
    tile.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ts.similarity_matrix(models, store=tmp_path / "st", progress=False).values
        gc.collect()
    assert np.allclose(got, want, rtol=1e-12)
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and tile.name in str(w.message)]
