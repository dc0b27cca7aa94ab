"""Loading defects: state_key inside a Lightning checkpoint or under DDP's
prefix, its warning pointing into the library, a forward returning float16
refused as a plain mismatch, and a template builder's GeneratorExit or
unprintable exception escaping as a traceback."""

from __future__ import annotations

import re
import warnings

import pytest

import tsalgebra as ts
from tsalgebra.io import LoadError, read_state_dict

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tsalgebra.adapters import AdapterError, BilinearLayer, register_adapter, unregister_adapter  # noqa: E402


def nets():
    torch.manual_seed(0)
    return nn.Sequential(BilinearLayer(4, 6, 3)), nn.Sequential(BilinearLayer(4, 6, 3))


def prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


# --- 1: state_key finds the keys it prefixes in the state dict found, after the wrappers' prefixes


@pytest.mark.parametrize("layout", ["lightning", "lightning, model. beside ema.", "ddp flat", "lightning under ddp"])
def test_state_key_takes_its_prefixed_keys_in_a_wrapped_state_dict(tmp_path, layout):
    m, ema = nets()
    both = {**m.state_dict(), **prefixed("ema.", ema.state_dict())}
    obj = {"lightning": {"state_dict": both, "epoch": 3, "optimizer_states": [{}]},
           "lightning, model. beside ema.": {"state_dict": {**prefixed("model.", m.state_dict()),
                                                           **prefixed("ema.", ema.state_dict())}, "epoch": 3},
           "ddp flat": prefixed("module.", both),
           "lightning under ddp": {"state_dict": prefixed("module.", both), "global_step": 7}}[layout]
    torch.save(obj, tmp_path / "ck.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read as one state dict, the ema's keys were silently dropped
        assert ts.load(tmp_path / "ck.pt", state_key="ema").same_weights(ts.from_torch(ema))


def test_state_key_naming_a_wrapper_prefix_is_the_choice(tmp_path):
    m, _ = nets()
    torch.save(prefixed("model.", m.state_dict()), tmp_path / "ck.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ts.load(tmp_path / "ck.pt", state_key="model").same_weights(ts.from_torch(m))


def test_two_readings_of_state_key_are_an_error_naming_both(tmp_path):
    m, ema = nets()
    torch.save({"first": prefixed("ema.", ema.state_dict()), "second": prefixed("ema.", m.state_dict())},
               tmp_path / "ck.pt")
    with pytest.raises(LoadError, match=r"ck\.pt: state_key='ema' is ambiguous: it names keys ema\.\* in entry "
                                        r"'first' and keys ema\.\* in entry 'second'"):
        ts.load(tmp_path / "ck.pt", state_key="ema")


def test_an_entry_named_by_state_key_wins_over_prefixed_keys_elsewhere(tmp_path):
    # an EMA wrapper keeps its copy under an attribute "model": its keys read "model.*" beside the entry
    # "model" (this was called ambiguous, and the file could not be loaded at all)
    m, ema = nets()
    torch.save({"model": m.state_dict(), "ema": prefixed("model.", ema.state_dict())}, tmp_path / "ck.pt")
    assert ts.load(tmp_path / "ck.pt", state_key="model").same_weights(ts.from_torch(m))
    assert ts.load(tmp_path / "ck.pt", state_key="ema").same_weights(ts.from_torch(ema))


def test_state_key_found_nowhere_in_a_lightning_checkpoint_names_what_is_there(tmp_path):
    m, _ = nets()
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "ck.pt")
    with pytest.raises(LoadError, match=r"state_key='ema': no state dict there, nor keys prefixed 'ema\.' .*"
                                        r"\['state_dict'\]"):
        ts.load(tmp_path / "ck.pt", state_key="ema")


# --- 2: the warning that state_key was not used points at the user's call


def test_the_unused_state_key_warning_points_at_the_callers_line(tmp_path):
    m, _ = nets()
    torch.save(m.state_dict(), tmp_path / "plain.pt")
    (tmp_path / "run").mkdir()
    torch.save(m.state_dict(), tmp_path / "run" / "step_1.pt")
    calls = [lambda: ts.load(tmp_path / "plain.pt", state_key="ema"),
             lambda: ts.load(tmp_path / "run", state_key="ema"),
             lambda: read_state_dict(tmp_path / "plain.pt", state_key="ema")]
    for call in calls:
        with pytest.warns(UserWarning, match="state_key='ema' not used") as record:
            call()
        assert [(w.filename, w.lineno) for w in record] == [(__file__, call.__code__.co_firstlineno)]


# --- 3: a forward returning float16 or bfloat16 is named as the cause


class CastsDown(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype
        self.left, self.right, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.down(self.left(x) * self.right(x)).to(self.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_forward_returning_half_precision_is_refused_saying_so(dtype):
    torch.manual_seed(0)
    said = re.escape(f"<root>: CastsDown's forward returns {dtype} outputs") + ".*" + re.escape(
        "convert the module to float32 or float64 first (module.double())")
    with pytest.raises(AdapterError, match=said):
        ts.from_torch(CastsDown(dtype))
    # in a child, the child is named; a registered adapter is checked by from_torch at the root
    with pytest.raises(AdapterError, match=re.escape(f"1: CastsDown's forward returns {dtype}")):
        ts.from_torch(nn.Sequential(nn.Linear(4, 4), CastsDown(dtype)))
    register_adapter(CastsDown, lambda mod, path: ts.Linear(torch.ones(3, 4).numpy()))
    try:
        with pytest.raises(AdapterError, match=re.escape(f"<root>: CastsDown's forward returns {dtype}")):
            ts.from_torch(CastsDown(dtype))
    finally:
        unregister_adapter(CastsDown)
    ts.from_torch(CastsDown(torch.float64))  # the check itself is as before


# --- 4: a template builder's GeneratorExit, or an exception that cannot be printed, is a LoadError naming it


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("secondary")


@pytest.mark.parametrize("exc", [GeneratorExit("closed"), Unprintable()])
def test_a_builder_raising_generatorexit_or_an_unprintable_error_is_a_load_error(tmp_path, exc):
    torch.save({"0.weight": torch.randn(3, 4)}, tmp_path / "a.pt")

    def build():
        raise exc

    text = ": closed" if isinstance(exc, GeneratorExit) else " (its message cannot be printed)"
    with pytest.raises(LoadError, match=re.escape(f"{tmp_path / 'a.pt'}: the template builder ") + r".*build\(\) "
                       + re.escape(f"raised {type(exc).__name__}{text}")):
        ts.load(tmp_path / "a.pt", template=build)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
def test_a_builder_asking_to_stop_still_stops(tmp_path, exc):
    torch.save({"0.weight": torch.randn(3, 4)}, tmp_path / "a.pt")

    def build():
        raise exc

    with pytest.raises(type(exc)):
        ts.load(tmp_path / "a.pt", template=build)
