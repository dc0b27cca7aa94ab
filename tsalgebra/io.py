"""Loading checkpoints into tsalgebra models, and saving them.

Formats, recognized by their first bytes (not their names):

- safetensors (``.safetensors``): read with safetensors' numpy reader (its
  torch reader for dtypes numpy lacks, such as bfloat16);
- torch checkpoints (``torch.save``, zip or legacy): read with
  ``torch.load(..., weights_only=True)``, which unpickles tensors and plain
  containers only and refuses every other Python object.

A checkpoint is a state dict (names -> tensors).  A dict that also holds
other entries is accepted when exactly one of its entries, whatever its name,
is a mapping of tensors (the usual ``{"step": ..., "model": state_dict,
"optimizer": ...}`` training checkpoint); several such entries (a model and
an EMA, metrics saved as tensors) are chosen between with ``state_key``.

The architecture comes from one of two places:

- ``template=``: a torch module, or a function with no arguments building one.
  A float64 copy is put in eval mode, loaded with the state dict (strict by
  default), and converted with :func:`~tsalgebra.adapters.from_torch`; the
  template itself is never modified.
- the native layout (no template needed): the state dict of an
  ``nn.Sequential`` of tsalgebra's torch twins, one index per layer:

  =====================================  ==========================================
  keys of layer k                        layer
  =====================================  ==========================================
  ``k.weight`` [, ``k.bias``]            Linear (weight: out x in)
  ``k.left.weight``, ``k.right.weight``, Bilinear ``down((left x) * (right x))``;
  ``k.down.weight`` [+ their ``.bias``]  left/right: hidden x in, down: out x hidden
  ``k.inner.`` + the above               residual: ``x + layer(x)``
  =====================================  ==========================================

  Layers are numbered 0, 1, 2, ... without gaps; a one-layer model may omit
  the ``k.`` prefix (the state dict of a single :class:`BilinearLayer`).
  :func:`save` writes this layout (float64 safetensors), so
  ``load(save(model, p))`` round-trips exactly.  Native safetensors files
  are read and converted without importing torch.

Directories load every checkpoint file inside (``.safetensors``, ``.pt``,
``.pth``, ``.ckpt``, ``.bin``) in natural order of their stems: ``step_2``
before ``step_10``, ``run`` before ``run2``;
hidden files (a name starting with ".": macOS's ``._step_2.pt`` companions)
are not checkpoints and are skipped.
Every failure to read or interpret a file raises :class:`LoadError` (a
ValueError) whose message starts with the file's path; a missing path raises
FileNotFoundError.
"""

from __future__ import annotations

import copy
import io
import math
import numbers
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, Union

if TYPE_CHECKING:  # torch is imported only where a torch file or a template needs it
    import torch

import numpy as np

from .arrays import exact_float64, is_torch, no_real_values
from .layouts import SIZES, attention_lm, is_run_directory, missing_sizes, read_config
from .components import Bilinear, Component, Linear, Sequential
from .messages import counted, raised, warn_at_caller

__all__ = ["LoadError", "TemplateError", "load", "save", "checkpoint_paths", "read_state_dict", "model_from_state_dict",
           "run_of", "natural_key", "is_checkpoint", "CHECKPOINT_SUFFIXES", "NATIVE_FORMAT"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
NATIVE_FORMAT = "tsalgebra-native-v1"
_NESTED = ("state_dict", "model_state_dict", "model", "module", "weights")

Template = Union["torch.nn.Module", Callable[[], "torch.nn.Module"], None]


class LoadError(ValueError):
    """A file that cannot be read or interpreted; the message starts with its path."""

    def __init__(self, path: Any, message: str) -> None:
        self.path, self.message = str(path), message
        super().__init__(f"{self.path}: {message}")


class TemplateError(LoadError):
    """The template given cannot read the file: it is not a torch module (or
    a function building one), or its state dict's keys or shapes are not the
    checkpoint's.  ``problem``: what is wrong, without the file."""

    def __init__(self, path: Any, problem: str) -> None:
        self.problem = problem
        super().__init__(path, problem)


def _mismatch(sd: Mapping[str, Any], target: Mapping[str, Any], strict: bool) -> str | None:
    """How the checkpoint's state dict ``sd`` and the template's ``target``
    differ (the keys torch's load_state_dict would refuse), in words: the
    keys whose shapes differ, the template's keys the checkpoint lacks and
    the checkpoint's keys the template lacks (those two with ``strict``
    only, as torch ignores them without); None where they fit."""

    def listed(keys: list[str], n: int = 6) -> str:
        return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")

    def shape(v: Any) -> tuple[int, ...] | None:
        s = getattr(v, "shape", None)
        return None if s is None else tuple(int(x) for x in s)

    parts = []
    sized = [k for k in sd if k in target and shape(sd[k]) is not None and shape(target[k]) is not None
             and shape(sd[k]) != shape(target[k])]
    if sized:
        shown = "; ".join(f"{k} is {shape(sd[k])} in the checkpoint, {shape(target[k])} in the template"
                          for k in sized[:6]) + (f"; and {len(sized) - 6} more" if len(sized) > 6 else "")
        parts.append(f"size mismatch for {len(sized)} of the keys: {shown}")
    if strict:
        missing = [k for k in target if k not in sd]
        extra = [k for k in sd if k not in target]
        if missing:
            parts.append(f"{counted(len(missing), 'key')} of the template missing from the checkpoint: "
                         f"{listed(missing)}")
        if extra:
            parts.append(f"{counted(len(extra), 'key')} of the checkpoint not in the template: {listed(extra)}")
    if not parts:
        return None
    return "the checkpoint's state dict does not fit the template: " + "; ".join(parts)


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: "step_2" < "step_10"."""
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p != "")


def checkpoint_paths(path: str | Path) -> list[Path]:
    """The checkpoint files under ``path`` in natural order (a file: itself).
    Raises FileNotFoundError for a missing path and LoadError for a directory
    without checkpoint files."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise LoadError(p, "not a regular file (a device, a pipe or a socket?)")
    # hidden files are no checkpoints: macOS's AppleDouble companions ("._step_1.pt") failed the whole folder
    files = [f for f in p.iterdir()
             if f.is_file() and f.suffix.lower() in CHECKPOINT_SUFFIXES and not f.name.startswith(".")]
    if not files:
        hint = ""
        if (p / "checkpoints").is_dir():  # a run folder: say where its checkpoints are, and why not as a run
            if run_of(p) is not None:  # a run, read by a template: only its checkpoints/ folder is
                hint = (f"; it loads as the language-model run in the papers' layout that its config.json names, "
                        f"without a template (no template= / --template), or from {p / 'checkpoints'} with a "
                        "template whose module converts (the papers' own modules need the run's layout instead)")
            else:
                hint = f"; they load from {p / 'checkpoints'}"
                if (p / "config.json").is_file():
                    hint += (f" (its config.json does not name {', '.join(missing_sizes(p) or SIZES)}, so it is not a "
                             "language-model run in the papers' layout)")
        raise LoadError(p, f"directory holds no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}){hint}")
    # by the stem (the model's name): "run" before "run2" before "run10" (on the whole file name the
    # suffix's "." sorted "run.pt" after "run10.pt"); the whole name breaks a tie (step_2.pt, step_2.safetensors)
    return sorted(files, key=lambda f: (natural_key(f.stem), natural_key(f.name)))


MAX_CHECKPOINT_BYTES = 2**32  # 4 GiB of tensors: far above the field's checkpoints; raise with max_bytes=
MAX_LEGACY_PICKLE = 2**26  # the pickles before a legacy file's data; longer ones go unchecked to torch
MAX_INFLATION = 50  # a torch zip is stored uncompressed; a deflated one inflating 50x is a zip bomb
# what parsing corrupted bytes raises (zipfile: BadZipFile, NotImplementedError for an unknown version,
# UnicodeDecodeError, a ValueError, for a bad name; struct.error, EOFError); a programming error stays itself
_MALFORMED = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
              struct.error, OverflowError, KeyError, IndexError)


def _sniff(path: Path) -> str:
    if not path.is_file():
        raise LoadError(path, "not a regular file (a device, a pipe or a socket?)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise LoadError(path, f"cannot read: {exc.strerror or exc}") from None
    if size == 0:
        raise LoadError(path, "file is empty")
    torch_magic = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # zip, or pickle protocol >= 2 (legacy)
    # safetensors first: its header length can begin with the byte 0x80 too (a 128-byte header), while a
    # torch file never has '{' at byte 8 (a zip has its compression method there, a legacy file the pickled
    # magic number): a short file with '{' there is a truncated safetensors file, not a torch one
    if len(head) == 9 and head[8:9] == b"{" and head[:4] != b"PK\x03\x04":
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= size:
            return "safetensors"
        raise LoadError(path, f"truncated safetensors file: header claims {n:,} bytes, file has {size:,}")
    if torch_magic:
        return "torch"
    raise LoadError(path, "not a safetensors file or a torch checkpoint (unrecognized first bytes)")


def is_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a file whose first bytes are those of a
    safetensors file or a torch checkpoint (nothing is unpickled)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        _sniff(p)
    except LoadError:
        return False
    return True


def _is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) or is_torch(v) and hasattr(v, "shape")


def _unwrap(obj: Any, path: Path, state_key: str | None = None) -> dict[str, Any]:
    """The state dict in a loaded object: the object itself when it maps names
    to tensors, else the one entry that does.  ``state_key`` picks one set of
    weights: the entry of that name holding tensors, else the keys prefixed
    ``state_key + "."`` (the prefix removed) in a state dict, looked for after
    the wrappers' prefixes (``module.ema.x`` under DDP, an ``ema.`` beside
    ``model.`` in a Lightning ``state_dict``).  Several state dicts with such
    keys are an error naming them, never a silent pick; a file that is itself a state dict with
    no such keys is read as it is, with a warning that the key was not used
    (the command line passes one key to files of both kinds)."""
    if not isinstance(obj, Mapping):
        raise LoadError(path, f"holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    flat = bool(obj) and all(_is_array(v) for v in obj.values())
    holders = {None: obj} if flat else {
        str(k): v for k, v in obj.items() if isinstance(v, Mapping) and v and all(_is_array(x) for x in v.values())}
    if state_key is not None:
        if state_key in holders:  # the entry of that name: the checkpoint's own name for it (an EMA wrapper
            return {str(k): v for k, v in holders[state_key].items()}  # beside it may keep "model.*" keys)
        prefix = f"{state_key}."
        found = {}
        for name, sd in holders.items():
            # keep=: a wrapper's prefix that state_key names ("model") is the choice, not stripped
            keys = strip_prefixes({str(k): v for k, v in sd.items()}, keep=[prefix])
            chosen = {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}
            if chosen:
                found[f"keys {prefix}* in " + (f"entry {name!r}" if name else "the file")] = chosen
        if len(found) > 1:
            raise LoadError(path, f"state_key={state_key!r} is ambiguous: it names {' and '.join(found)}; "
                                  "pass the one you mean to model_from_state_dict (after torch.load)")
        if found:
            return {str(k): v for k, v in next(iter(found.values())).items()}
        if not flat:
            raise LoadError(path, f"state_key={state_key!r}: no state dict there, nor keys prefixed {prefix!r} in "
                                  f"one; the entries holding tensors are {list(holders) or 'none'}")
        warn_at_caller(f"{path}: state_key={state_key!r} not used: the file is one state dict, with no key "
                       f"prefixed {prefix!r}; read as it is")
    if len(holders) == 1:
        return {str(k): v for k, v in next(iter(holders.values())).items()}
    if holders:
        raise LoadError(path, f"holds several state dicts ({', '.join(holders)}); choose one with state_key= "
                              f"(--state-key on the command line)")
    keys = ", ".join(map(str, list(obj)[:8]))
    raise LoadError(path, f"holds no state dict: top-level keys are [{keys}]; expected tensors, or an entry "
                          f"(such as {', '.join(_NESTED)}) holding them")


PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning


def strip_prefixes(sd: Mapping[str, Any], keep: Iterable[str] = ()) -> dict[str, Any]:
    """The state dict without the wrappers' key prefixes (DDP's ``module.``,
    torch.compile's ``_orig_mod.``, Lightning's ``model.``), each removed while
    every key carries it and the expected keys ``keep`` do not."""
    keep = list(keep)
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in out) and not any(k.startswith(prefix) for k in keep):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


class Checkpoints(list):
    """The models of a run directory in natural step order: a list, with
    ``names`` (the file stems, the labels of matrices and figures), ``steps``
    (the last integer of each name, None where there is none) and ``paths``."""

    def __init__(self, models: Iterable[Component], paths: Sequence[Path]) -> None:
        super().__init__(models)
        self.paths = tuple(Path(p) for p in paths)
        self.names = tuple(p.stem for p in self.paths)
        self.steps = tuple(int(m[-1]) if (m := re.findall(r"\d+", n)) else None for n in self.names)

    def items(self) -> list[tuple[str, Component]]:
        return list(zip(self.names, self))


def _check_size(p: Path, kind: str, max_bytes: int) -> None:
    """Refuse before anything is inflated: the bytes a file will occupy,
    read from its own directory (a torch zip's entries, a safetensors header)."""
    size = p.stat().st_size
    try:
        infos = None
        if kind == "torch" and zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                infos = z.infolist()
    except _MALFORMED as exc:  # zipfile's parse of a corrupted directory (names, versions, disks)
        raise LoadError(p, f"malformed torch checkpoint (zip directory): {str(exc) or type(exc).__name__}") from None
    if infos is not None:
        inflated = sum(i.file_size for i in infos)
        packed = sum(i.compress_size for i in infos)
        if inflated > MAX_INFLATION * max(packed, 1) and inflated > 2**20:
            raise LoadError(p, f"refused: its entries inflate {packed:,} bytes to {inflated:,} (a zip bomb?); "
                               "torch.save stores tensors uncompressed")
        size = inflated
    elif kind == "torch":
        _check_legacy_storages(p, size)
    if size > max_bytes:
        raise LoadError(p, f"refused: {size:,} bytes of tensors exceed the bound of {max_bytes:,} "
                           "(raise it with max_bytes=...)")


def _check_legacy_storages(p: Path, size: int) -> None:
    """A legacy (non-zip) torch file declares its storages' sizes in its
    pickle and torch allocates them before reading their bytes, which follow
    in the file: storages declaring more entries than the file has bytes are
    refused before torch allocates.  The pickles are walked with every class
    replaced by an inert stub, so nothing in the file runs."""

    class Inert:
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def __setstate__(self, state: Any) -> None: ...
        def __setitem__(self, key: Any, value: Any) -> None: ...
        def append(self, value: Any) -> None: ...
        def extend(self, values: Any) -> None: ...

    declared = 0

    class Declared(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return Inert

        def persistent_load(self, pid: Any) -> Any:
            nonlocal declared
            if isinstance(pid, tuple) and len(pid) > 4 and pid[0] in ("storage", b"storage"):
                declared += pid[4] if isinstance(pid[4], int) else 0
            return Inert()

    try:
        with open(p, "rb") as fh:  # from memory: a forged length in a pickle reads to the end, allocating nothing
            reader = Declared(io.BytesIO(fh.read(MAX_LEGACY_PICKLE)))
        for _ in range(4):  # magic number, protocol version, system info, the object
            reader.load()
    except Exception:  # noqa: BLE001 - not a pickle stream this walk reads: torch reports it
        return
    if declared > size:
        raise LoadError(p, f"refused: its storages declare {declared:,} entries but the file holds {size:,} bytes "
                           "(a truncated or forged legacy torch file)")


def _check_max_bytes(max_bytes: Any) -> None:
    """``max_bytes`` is a positive integer, or a ValueError naming it (a
    comparison with None raised a bare TypeError)."""
    if not (isinstance(max_bytes, numbers.Integral) and not isinstance(max_bytes, bool) and max_bytes > 0):
        raise ValueError(f"max_bytes={max_bytes!r}: the bound on a file's tensors must be a positive integer "
                         f"(bytes; the default is {MAX_CHECKPOINT_BYTES:,})")


def _torchscript(p: Path) -> bool:
    """Whether ``p`` is a TorchScript archive (``torch.jit.save``): a torch
    zip holding ``constants.pkl``, as torch.load itself tells them apart."""
    try:
        with zipfile.ZipFile(p) as z:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except _MALFORMED:  # not a zip (legacy), or one torch reports as malformed
        return False


def _check_declared(sd: Mapping[str, Any], p: Path, max_bytes: int) -> None:
    """Refuse before any conversion: the bytes the tensors will occupy as
    float64, from their declared shapes (a stride-0 view of one stored
    number may declare billions of entries)."""
    entries = {k: math.prod(int(n) for n in v.shape) for k, v in sd.items()}
    total = 8 * sum(entries.values())
    if total > max_bytes:
        big = max(entries, key=entries.get)
        raise LoadError(p, f"refused: its tensors declare {total:,} bytes as float64 (the largest, {big!r}, has "
                           f"shape {tuple(sd[big].shape)}), over the bound of {max_bytes:,} "
                           "(raise it with max_bytes=...)")


def _untied(module: Any, tensors: Mapping[str, Any], source: Any) -> None:
    """A template whose parameters are tied (one tensor under two names, an
    embedding shared with the unembedding) reads one value for them: a
    checkpoint holding different values under those names is refused (torch
    copied both into the one tensor, the later winning: the loaded model was
    another function, with no error)."""
    import torch

    shared: dict[int, list[str]] = {}
    for name, p in list(module.named_parameters(remove_duplicate=False)) + \
            list(module.named_buffers(remove_duplicate=False)):
        shared.setdefault(id(p), []).append(name)
    for names in shared.values():
        given = [n for n in names if n in tensors]
        first = given[0] if given else None
        for other in given[1:]:
            a, b = tensors[first], tensors[other]
            if a.shape != b.shape or not torch.equal(a.to(torch.float64), b.to(torch.float64)):
                raise TemplateError(source, f"the template ties {first!r} and {other!r} (one tensor), and the "
                                            "checkpoint holds different values under the two names: a template "
                                            "with them untied reads it")


def read_state_dict(path: str | Path, *, max_bytes: int = MAX_CHECKPOINT_BYTES,
                    state_key: str | None = None) -> dict[str, Any]:
    """The state dict stored in one file, never unpickling anything but
    tensors and plain containers: numpy arrays from safetensors files (torch
    tensors for dtypes numpy lacks), torch tensors from torch files.  Files
    whose tensors would exceed ``max_bytes`` are refused before they are read,
    and state dicts whose declared shapes would exceed it as float64 before
    they are converted."""
    _check_max_bytes(max_bytes)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_dir():
        raise LoadError(p, "is a directory; load it with tsalgebra.load(dir) for a list of models")
    kind = _sniff(p)
    _check_size(p, kind, max_bytes)
    if kind == "torch" and _torchscript(p):  # torch.load would call it malformed, and warn
        raise LoadError(p, "a TorchScript archive (torch.jit.save): a program, not a state dict; save the "
                           "module's weights with torch.save(module.state_dict(), path)")
    try:
        if kind == "safetensors":
            obj = _read_safetensors(p)
        else:
            import torch

            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one clear error
        if re.search("unsupported global", str(exc), re.IGNORECASE):  # "Unsupported global", "unsupported GLOBAL os.system"
            found = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
            if found and found.group(1).startswith("numpy."):  # a state dict of numpy arrays: saved as asked
                raise LoadError(p, f"refused: the {kind} file holds numpy arrays ({found.group(1)}), which "
                                   "torch.load(weights_only=True) does not read; save torch tensors "
                                   "(torch.from_numpy) or a safetensors file") from None
            raise LoadError(p, f"refused: the {kind} file holds Python objects other than tensors"
                               f"{f' ({found.group(1)})' if found else ''}, and tsalgebra loads with "
                               "weights_only=True (save model.state_dict() instead of the model object)") from None
        # the unpickler's own complaint where it gives one: a corrupted pickle is no object refused
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
        msg = detail.group(1) if detail else str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(p, f"cannot read {kind} file (malformed or truncated?): {msg}") from None
    sd = _unwrap(obj, p, state_key)
    _check_declared(sd, p, max_bytes)
    return sd


def _read_safetensors(p: Path) -> dict[str, Any]:
    import json as _json

    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = _json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise LoadError(p, f"malformed safetensors header: a JSON {type(header).__name__}, not an object")
    for k, v in header.items():  # named here: the reader would say only "'dtype'"
        if k != "__metadata__" and not (isinstance(v, dict) and isinstance(v.get("dtype"), str)):
            raise LoadError(p, f"malformed safetensors header: entry {k!r} has no dtype")
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    if dtypes <= {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}:
        from safetensors.numpy import load_file

        return load_file(str(p))
    from safetensors.torch import load_file as load_torch

    return load_torch(str(p), device="cpu")


def _values(v: Any, key: str, source: Any) -> np.ndarray:
    """The weight ``key`` (numpy or torch) as numpy in its stored dtype,
    checked as float64 weights are: real, finite, integers float64 holds
    exactly, no bool; else a LoadError naming ``source`` and ``key``.  No
    float64 copy is made (a view where numpy has the dtype; bfloat16 and
    float8 as float32, which holds them exactly): the layer's constructor
    makes the one float64 copy kept (a conversion here first doubled the
    peak memory of loading)."""
    if (why := no_real_values(v)) is not None:
        raise LoadError(source, f"{key}: {why}")
    if is_torch(v):
        try:
            t = v.detach().to("cpu").resolve_conj().resolve_neg()
            try:
                v = t.numpy()
            except TypeError:  # a dtype numpy lacks
                if not t.is_floating_point():
                    raise
                v = t.float().numpy()
        except (RuntimeError, TypeError) as exc:  # sparse, quantized: torch names the layout or dtype
            raise LoadError(source, f"{key}: a torch tensor numpy cannot read ({exc})") from None
    arr = np.asarray(v)
    if np.issubdtype(arr.dtype, np.integer):
        try:
            exact_float64(arr)  # refuses an integer float64 would round
        except TypeError as exc:
            raise LoadError(source, f"{key}: {exc}") from None
    elif not np.issubdtype(arr.dtype, np.floating):
        raise LoadError(source, f"{key}: dtype {arr.dtype}: weights are real numbers")
    elif not np.isfinite(arr).all():
        raise LoadError(source, f"{key} contains NaN or Inf entries")
    return arr


def _native_key(field: str) -> str:
    """The native state-dict key of a Linear or Bilinear weight field, as
    nn.Linear names its parameters: "weight" -> "weight", "left" ->
    "left.weight", "left_bias" -> "left.bias"."""
    if field in ("weight", "bias"):
        return field
    part, _, bias = field.partition("_")
    return f"{part}.{'bias' if bias else 'weight'}"


def _native_layer(keys: dict[str, Any], where: str, name: str, source: Any) -> Linear | Bilinear:
    """One layer of the native layout (sub-keys without the index)."""
    if all(k.startswith("inner.") for k in keys):
        inner = _native_layer({k[len("inner."):]: v for k, v in keys.items()}, where + "inner.", name, source)
        if isinstance(inner, Bilinear) and inner.residual:
            raise ValueError(f"{where}inner: nested residuals are not part of the native layout")
        try:
            return inner.with_residual()
        except ValueError as exc:
            raise _malformed(source, name, where, keys, exc) from None
    names = set(keys)
    for kind in (Linear, Bilinear):
        native = {_native_key(f): f for f in kind.weight_fields}
        matrices = {k for k in native if k.endswith("weight")}  # required; the biases are optional
        if names and names <= set(native) and matrices <= names:
            # as stored: the constructor's float64 copy is the only one
            weights = {native[k]: _values(v, where + k, source) for k, v in keys.items()}
            try:
                return kind(**weights, name=f"{kind.__name__}[{name}]")
            except (ValueError, TypeError) as exc:
                raise _malformed(source, name, where, keys, exc) from None
    raise ValueError(f"keys {sorted(where + k for k in names)[:6]} are not a native layer "
                     "(weight[/bias], or left/right/down.weight[/bias], optionally under inner.)")


def _malformed(source: Any, name: str, where: str, keys: dict[str, Any], exc: Exception) -> LoadError:
    """A layer whose keys are the native layout's but whose shapes make no
    layer: a malformed checkpoint, named with its shapes (no template would
    read it, so none is suggested)."""
    shapes = ", ".join(f"{where}{k} {tuple(np.shape(v))}" for k, v in sorted(keys.items()))
    return LoadError(source, f"malformed checkpoint in tsalgebra's native layout: layer {name} ({shapes}): {exc}")


def _native_model(sd: Mapping[str, Any], source: Any) -> Component:
    if all(re.match(r"^\d+\.", k) for k in sd):
        groups: dict[int, dict[str, Any]] = {}
        for k, v in sd.items():
            idx, rest = k.split(".", 1)
            groups.setdefault(int(idx), {})[rest] = v
        if sorted(groups) != list(range(len(groups))):
            raise ValueError(f"layer indices {sorted(groups)} are not 0..{len(groups) - 1}")
        layers = [_native_layer(groups[i], f"{i}.", str(i), source) for i in range(len(groups))]
        try:
            return layers[0] if len(layers) == 1 else Sequential(*layers)
        except ValueError as exc:  # each layer is one; their widths do not chain
            raise LoadError(source, f"malformed checkpoint in tsalgebra's native layout: {exc}") from None
    return _native_layer(dict(sd), "", "0", source)


def model_from_state_dict(sd: Mapping[str, Any], template: Template = None,
                          *, strict: bool = True, source: Any = "<state dict>",
                          n_ctx: int | None = None) -> Component:
    """Convert a state dict: through ``template`` (a torch module or a
    builder; a copy in eval mode is loaded, then :func:`from_torch`), or by
    the native layout (no torch needed).  ``n_ctx``: the token positions, as
    :func:`from_torch`'s ``n_ctx`` with a template (the conversion of an
    ``nn.Embedding`` -> per-position layers -> ``nn.Flatten`` model needs
    it), a rebinding of the native model's positions without.  Errors are
    :class:`LoadError` naming ``source``."""
    _check_n_ctx(n_ctx, source)
    for k, v in sd.items():  # before either layout: torch's copy into a template keeps a complex tensor's real part
        if (why := no_real_values(v)) is not None:
            raise LoadError(source, f"{k}: {why}")
    if template is None:
        try:
            return _at_positions(_native_model(strip_prefixes(sd), source), n_ctx, source)
        except LoadError:  # a weight without real, finite values: named by its key
            raise
        except (ValueError, TypeError) as exc:
            msg = str(exc).strip().replace("\n", " ")
            raise LoadError(source, "cannot interpret the state dict by tsalgebra's native layout (keys like "
                                    f"0.left.weight); pass template=... for other layouts: {msg}") from None
    import torch
    from torch import nn

    from .adapters import AdapterError, from_torch

    module = template
    if not isinstance(template, nn.Module) and callable(template):
        try:
            module = template()
        # the user's code: what it raised, named, never a traceback.  GeneratorExit too (a bug there, as no
        # generator is closed); SystemExit and KeyboardInterrupt are requests to stop, and propagate
        except (Exception, GeneratorExit) as exc:  # noqa: BLE001
            name = getattr(template, "__qualname__", None)
            what = f"{getattr(template, '__module__', None) or '?'}.{name}()" if name else repr(template)
            raise LoadError(source, f"the template builder {what} raised {raised(exc)}") from None
    if not isinstance(module, nn.Module):
        got = f"its builder returned {type(module).__name__}" if module is not template else \
            f"it is {type(module).__name__}"
        raise TemplateError(source, f"the template is not an nn.Module or a function returning one ({got})")
    try:
        # float64, as the conversion is: a float32 template would round the checkpoint's values on the copy in
        module = copy.deepcopy(module).double()
        target = module.state_dict()
        stripped = strip_prefixes(sd, target)
        if (mismatch := _mismatch(stripped, target, strict)) is not None:  # said in words, not torch's text
            raise TemplateError(source, mismatch)
        for k, v in stripped.items():  # the native path's checks where load_state_dict casts into a float: it
            if isinstance(target.get(k), torch.Tensor) and target[k].is_floating_point():  # would round 2**60 + 1,
                _values(v, k, source)  # read bool as 0/1, keep a NaN (a bool or integer buffer takes them as they are)
        tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
                   for k, v in stripped.items()}
        _untied(module, tensors, source)
        module.load_state_dict(tensors, strict=strict)
        module.eval()
    except LoadError:
        raise
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:  # what the checks above did not foresee
        msg = " ".join(str(exc).split())
        raise TemplateError(source, f"the template cannot read the checkpoint's state dict: {msg}") from None
    try:
        return from_torch(module, n_ctx=n_ctx)
    except AdapterError as exc:
        if n_ctx is not None:
            _refused_at(module, n_ctx, exc, source)
        elif _needs_positions(module):  # said as load's n_ctx= (--n-ctx on the command line), not from_torch's
            why = str(exc).split(" Pass from_torch(")[0].rstrip(". ")  # its own advice is from_torch's spelling
            raise LoadError(source, f"the template reads tokens at positions its weights do not fix ({why}); pass "
                                    "n_ctx= (the number of token positions to read)") from None
        raise LoadError(source, f"cannot convert the loaded module: {exc}") from None


def _needs_positions(module: Any) -> bool:
    """Whether ``module``, refused by from_torch without ``n_ctx``, converts
    with it (tried at 2 positions): then the missing n_ctx is the cause."""
    from .adapters import from_torch

    try:
        from_torch(module, n_ctx=2)
    except Exception:  # noqa: BLE001 - a probe: whatever it raises, the first refusal is the one reported
        return False
    return True


def _refused_at(module: Any, n_ctx: int, exc: Exception, source: Any) -> None:
    """Raise the LoadError of a module that from_torch refused at ``n_ctx``
    positions but converts without it: the positions are the cause, and are
    named as a rebinding names them.  Returns where it does not convert
    without ``n_ctx`` either (the caller reports the first error)."""
    from .adapters import from_torch

    try:
        model = from_torch(module)
    except Exception:  # noqa: BLE001 - a probe: whatever it raises, the first refusal is the one reported
        return
    _at_positions(model, n_ctx, source)  # no positions, or a readout fixing others: named there
    raise LoadError(source, f"n_ctx={n_ctx}: the model cannot be converted at {n_ctx} positions ({exc})")


def _check_n_ctx(n_ctx: Any, source: Any) -> None:
    if n_ctx is not None and not (isinstance(n_ctx, numbers.Integral) and not isinstance(n_ctx, bool) and n_ctx > 0):
        raise LoadError(source, f"n_ctx={n_ctx!r}: the analysis length must be a positive integer (token positions)")


def load(path: str | Path, template: Template = None, *, strict: bool = True,
         max_bytes: int = MAX_CHECKPOINT_BYTES, state_key: str | None = None,
         n_ctx: int | None = None) -> Component | Checkpoints:
    """Load a checkpoint file as a tsalgebra model, or a directory of them as
    :class:`Checkpoints` (a list in natural step order, with their names and
    steps, which matrices use as labels).  Keys prefixed by a wrapper
    (``module.``, ``_orig_mod.``, ``model.``) are read without the prefix;
    ``state_key`` picks one set of weights: the entry of that name
    (``"ema"`` beside ``"model"``), or the keys it prefixes (``ema.``) in the
    state dict, a Lightning ``state_dict`` included; a file that is itself a
    state dict without such keys is read as it is.  A training run of a bilinear-attention
    language model in the papers' layout (a ``config.json`` naming vocab_size,
    d_model, n_head and n_layers beside ``checkpoints/``:
    :mod:`tsalgebra.layouts`), its ``checkpoints/`` folder or one of its
    files loads without a template, at
    the analysis length ``n_ctx`` (the number of token positions).

    ``template``: a torch module or a no-argument function building one whose
    state dict the checkpoint holds (see the module docstring); without it the
    native layout is expected.  With a template, ``n_ctx`` is passed to
    :func:`~tsalgebra.adapters.from_torch` (``from_torch(module, n_ctx=...)``):
    attention is bound at that length, and a model whose weights fix no
    length (``nn.Embedding`` -> per-position layers -> ``nn.Flatten``) is
    read at it; without a template it rebinds the native model's positions.
    ``strict`` is passed to ``load_state_dict``.
    ``max_bytes`` bounds the tensors of one file (checked before reading),
    and their declared shapes as float64 (checked before converting, which
    holds about that much: each layer's own float64 copy, made from the
    values as read; a language-model run up to about 1.5 times, for its
    working copy of a layer or of the unembedding); a positive integer.
    Raises FileNotFoundError for a missing path and :class:`LoadError` (naming
    the file) for anything unreadable, malformed or of the wrong layout.
    """
    p = Path(path)
    _check_max_bytes(max_bytes)
    _check_n_ctx(n_ctx, p)
    run = run_of(p)
    if template is None and run is not None:  # a language-model run, its checkpoints/ folder, or one of its files
        if n_ctx is None:
            raise LoadError(p, "a language-model run loads at an analysis length: pass n_ctx= (token positions; "
                               "the weights do not depend on it; --n-ctx on the command line)")
        config = read_config(run)
        files = checkpoint_paths(run / "checkpoints" if p.is_dir() else p)
        models = [attention_lm(strip_prefixes(read_state_dict(f, max_bytes=max_bytes, state_key=state_key)), config,
                               n_ctx, f) for f in files]
        return Checkpoints(models, files) if p.is_dir() else models[0]
    files = checkpoint_paths(p)
    # with a template, from_torch converts at n_ctx (a model ending in nn.Flatten has no positions of its own
    # to rebind); a native model is rebound after the read, whose errors say why the file was not a run's
    models = [_at_positions(_from_file(f, template, strict, max_bytes, state_key, n_ctx),
                            n_ctx if template is None else None, f) for f in files]
    return Checkpoints(models, files) if p.is_dir() else models[0]


def _from_file(f: Path, template: Template, strict: bool, max_bytes: int, state_key: str | None,
               n_ctx: int | None = None) -> Component:
    """One file by ``template`` (converted at ``n_ctx`` positions) or the
    native layout; a native failure beside a config.json naming some of the
    language model's sizes names the missing ones first (a misspelt "n_heads"
    is why the run was not read as one)."""
    try:
        return model_from_state_dict(read_state_dict(f, max_bytes=max_bytes, state_key=state_key), template,
                                     strict=strict, source=f, n_ctx=n_ctx if template is not None else None)
    except LoadError as exc:
        run = _run_candidate(f)
        if template is None and run is not None and (missing := missing_sizes(run)):
            raise LoadError(f, f"not read as a language-model checkpoint: {run / 'config.json'} is missing {missing} "
                               f"(it names the other sizes of {list(SIZES)}); by the native layout: {exc.message}"
                            ) from None
        raise


def _run_candidate(p: Path) -> Path | None:
    """The folder that would be the run of ``p``: ``p`` itself, or the parent
    (with a config.json) of its ``checkpoints/`` folder or checkpoint file."""
    if p.is_dir():
        return p.parent if p.name == "checkpoints" and (p.parent / "config.json").is_file() else p
    return p.parent.parent if p.parent.name == "checkpoints" else None


def run_of(p: Path) -> Path | None:
    """The language-model run (:func:`is_run_directory`) that ``p`` is, or
    whose ``checkpoints/`` folder or checkpoint file it is; None otherwise."""
    run = _run_candidate(p)
    return run if run is not None and is_run_directory(run) else None


def _at_positions(model: Component, n_ctx: int | None, source: Any) -> Component:
    """``model`` over ``n_ctx`` positions (its attention and position-wise
    layers rebound); unchanged when ``n_ctx`` is None."""
    if n_ctx is None:
        return model
    keys = [k for k in model.settings() if k == "n_ctx" or k.endswith(".n_ctx")]
    if not keys:
        raise LoadError(source, f"n_ctx={n_ctx} was given, but {model!r} has no token positions")
    try:
        return model.replace(**{k: int(n_ctx) for k in keys})
    except ValueError as exc:  # a layer reading a fixed number of positions (after nn.Flatten)
        raise LoadError(source, f"n_ctx={n_ctx}: the model cannot be rebound to {n_ctx} positions ({exc})") from None


SAVE_DTYPES = (np.float64, np.float32, np.float16)  # the float dtypes safetensors writes from numpy


def save(model: Component, path: str | Path, *, dtype: Any = np.float64,
         metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` (Linear, Bilinear or a Sequential of them, float
    weights) as a safetensors file in the native layout, float64 unless
    ``dtype`` says otherwise (float32 or float16: rounded, and refused where
    a weight overflows it; a non-float dtype is a ValueError, as it would
    truncate the weights); ``metadata``: extra strings stored in the file.
    :func:`load` reads it back without a template.  Returns the path; the
    folder must exist."""
    if not isinstance(model, Component):
        raise TypeError(f"save expects a tsalgebra model, got {type(model).__name__}")
    if model.exact:
        raise TypeError("save: exact (object-array) weights have no safetensors form; convert to float first")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in SAVE_DTYPES:  # an integer dtype truncated every weight (0.377 saved as 0), and load read it back
        raise ValueError(f"save: dtype={dtype!r} is not one of float64, float32, float16 (weights are real numbers)")
    if metadata is not None and not (isinstance(metadata, Mapping)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        bad = (next((f"{k!r}: {type(v).__name__}" for k, v in metadata.items()
                     if not (isinstance(k, str) and isinstance(v, str))), "")
               if isinstance(metadata, Mapping) else type(metadata).__name__)
        raise TypeError(f"save: metadata must map strings to strings (safetensors stores text), got {bad}; "
                        "write numbers as str(value)")
    sd: dict[str, np.ndarray] = {}
    for k, layer in enumerate(model.layers):
        if type(layer) not in (Linear, Bilinear):
            raise TypeError(f"save: the native layout has no form for {layer!r}")
        pre = f"{k}.inner." if isinstance(layer, Bilinear) and layer.residual else f"{k}."
        for field, w in layer.named_weights().items():
            if w is not None:
                with np.errstate(over="ignore"):  # named below
                    arr = np.ascontiguousarray(np.asarray(w, dtype=dt))
                if not np.isfinite(arr).all():
                    raise ValueError(f"save: {layer.name}'s {field} overflows {dt} (largest magnitude "
                                     f"{np.abs(w).max():.3g}); save as float64")
                sd[pre + _native_key(field)] = arr
    meta = {"format": "pt", "tsalgebra": NATIVE_FORMAT, "model": repr(model)}
    meta.update(metadata or {})
    from safetensors.numpy import save_file

    p = Path(path)
    if not p.parent.is_dir():  # safetensors names a hidden temporary file there instead
        raise FileNotFoundError(f"{p.parent}: no such directory (save writes {p.name} into an existing folder)")
    try:
        save_file(sd, str(p), metadata=meta)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type: said as an OSError naming the file
        raise OSError(f"{p}: cannot write: {exc}") from None
    return p
