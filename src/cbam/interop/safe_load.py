"""Read checkpoint files without running code from them.

`.pth`/`.pth.tar` files are pickles; unpickling can call any function the file names, so
they are read with `torch.load(weights_only=True)`, which only rebuilds tensors and plain
containers. When that refuses a file, the file is inspected (never executed) to tell a
pickle that needs code apart from a truncated or foreign file, and the error says which.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cbam.interop.errors import CheckpointError

# Top-level keys under which training scripts nest the weights, tried in this order.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by wrappers: nn.DataParallel / DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

CheckpointSource = str | os.PathLike[str] | Mapping[str, Any]

_ZIP_MAGIC = b"PK\x03\x04"
_CONVERT_RECIPE = """\
    ckpt = torch.load(PATH, map_location="cpu", weights_only=False)  # runs the file's code
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt.state_dict()
    sd = {k: v.contiguous() for k, v in sd.items()}
    safetensors.torch.save_file(sd, "weights.safetensors")  # then load this file"""
_STRING_OPS = {
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8",
}  # fmt: skip


@dataclass
class Checkpoint:
    """Tensors by name, with wrapper prefixes removed, and what else the file held."""

    state_dict: dict[str, torch.Tensor]
    origin: str  # the file, or "<state dict>" when a mapping was passed in
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. epoch, arch, best_prec1
    original_names: dict[str, str] = field(default_factory=dict)  # our name -> name in file

    def original(self, key: str) -> str:
        return self.original_names.get(key, key)


def read_checkpoint(source: CheckpointSource) -> Checkpoint:
    """Load a `.pth`/`.pth.tar`/`.safetensors` file (or take a mapping) as a flat state dict.

    Nested weights ({'state_dict': ...} as the CBAM authors' script saves them, or
    {'model': ...}) are unwrapped and `module.` / `_orig_mod.` prefixes removed.
    Raises CheckpointError for files that are missing, truncated, not checkpoints, or need
    code execution to load.
    """
    if isinstance(source, Mapping):
        return _unwrap(source, "<state dict>")
    path = Path(source)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not found"
        raise CheckpointError(f"checkpoint {str(path)!r}: {what}; pass a .pth or .safetensors file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is an empty file (0 bytes)")
    with path.open("rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(path, head) or path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _unwrap(_torch_load(path, head), str(path))


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len <= path.stat().st_size


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable safetensors file (truncated or "
            f"corrupt?): {error}"
        ) from None
    return _unwrap(tensors, str(path), metadata)


def _torch_load(path: Path, head: bytes) -> Any:
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(b"\x80")):
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint: a PyTorch file is a zip archive or a pickle "
            f"and a safetensors file starts with its header length, but this one starts with "
            f"{head[:8]!r}"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols, then fails anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # diagnosed below; torch raises many types for bad files
        raise _diagnose(path, head, error) from None


def _diagnose(path: Path, head: bytes, error: Exception) -> CheckpointError:
    """Why torch.load(weights_only=True) failed, from the file's structure (nothing is run)."""
    name = repr(str(path))
    try:
        pickles = _pickle_bytes(path, head)
        needed = [g for data in pickles for g in _pickle_globals(data)]
    except (ValueError, zipfile.BadZipFile, KeyError, EOFError, struct.error) as scan_error:
        return CheckpointError(
            f"{name} is truncated or is not a PyTorch checkpoint: its "
            f"{'zip archive' if head.startswith(_ZIP_MAGIC) else 'pickle data'} ends early "
            f"or is malformed ({_first_line(scan_error)})"
        )
    refused = [g for g in needed if not _safe_global(g)]
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if match and not refused:  # the scan missed what torch saw: trust torch
        refused.append(match.group(1))
    if refused:
        return CheckpointError(
            f"{name} was refused: loading it would run code it names "
            f"({', '.join(dict.fromkeys(refused))}), and cbam only reads checkpoints with "
            f"torch.load(weights_only=True), which never runs code from a file. If you trust "
            f"the file, convert it once to a plain state dict and load that instead:\n"
            f"{_CONVERT_RECIPE}"
        )
    return CheckpointError(
        f"{name} could not be read as a checkpoint; it may be truncated or corrupt, or use "
        f"pickle features torch.load(weights_only=True) does not support ({type(error).__name__}"
        f": {_first_line(error)}); re-save it with torch.save(state_dict, path)"
    )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:  # torch's long preamble hides the actual reason
        text = text.split(marker, 1)[1].strip()
    return text.splitlines()[0][:300] if text else "no message"


def _pickle_bytes(path: Path, head: bytes) -> list[bytes]:
    """The pickles that describe the checkpoint's objects (not its raw tensor bytes)."""
    if head.startswith(_ZIP_MAGIC):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                raise ValueError("no data.pkl in the archive")
            return [archive.read(names[0])]
    # Legacy format: magic number, protocol, system info and the object, one pickle each
    # (a bare pickle written with pickle.dump is one pickle and then the end of the file).
    data = path.read_bytes()
    stream, pickles = io.BytesIO(data), []
    while len(pickles) < 4 and stream.tell() < len(data):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        pickles.append(data[start : stream.tell()])
    return pickles


def _pickle_globals(data: bytes) -> list[str]:
    """Dotted names of the functions and classes a pickle refers to; ValueError if the pickle
    is incomplete. A static scan with pickletools: nothing in it is imported or called."""
    names: list[str] = []
    strings: list[str | None] = []
    memo: dict[int, str | None] = {}
    for op, arg, _pos in pickletools.genops(data):
        last = strings[-1] if strings else None
        if op.name == "GLOBAL":
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            module, qualname = (strings[-2:] if len(strings) >= 2 else [None, None])[:2]
            names.append(f"{module}.{qualname}" if module and qualname else "<unknown global>")
        elif op.name in _STRING_OPS:
            strings.append(str(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            strings.append(memo.get(int(arg)))
    return names


def _safe_global(name: str) -> bool:
    """Whether torch's weights-only unpickler would accept this global."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError):  # private API moved: fall back to torch's own names
        return name.startswith("torch.") or name == "collections.OrderedDict"
    user = {f"{g.__module__}.{g.__qualname__}" for g in _user_safe_globals()}
    return name in allowed or name in user


def _user_safe_globals() -> list[Any]:
    globs = torch.serialization.get_safe_globals()
    return [g[0] if isinstance(g, tuple) else g for g in globs if hasattr(g, "__module__")]


def _unwrap(obj: Any, origin: str, metadata: dict[str, Any] | None = None) -> Checkpoint:
    """Find the tensors in a loaded checkpoint and strip wrapper prefixes from their names."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {origin} holds a {type(obj).__name__}, not a mapping of names to "
            f"tensors; save model.state_dict() instead"
        )
    state, meta = obj, dict(metadata or {})
    if not _is_state_dict(obj):
        nested = [k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)]
        if nested:
            state = obj[nested[0]]
            meta.update({str(k): _plain(v) for k, v in obj.items() if _is_plain(v)})
        elif not any(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(
                f"checkpoint {origin} holds no state dict: expected a mapping of names to "
                f"tensors, or one under {' / '.join(repr(k) for k in STATE_DICT_KEYS)}; its "
                f"top-level keys are {sorted(map(str, obj))[:12]}"
            )
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise CheckpointError(
            f"checkpoint {origin}: a state dict maps names to tensors, but "
            + (f"entries {bad[:5]} are not tensors" if bad else "this one is empty")
        )
    names = {str(k): str(k) for k in state}
    for prefix in WRAPPER_PREFIXES:
        if names and all(k.startswith(prefix) for k in names):
            names = {k[len(prefix) :]: original for k, original in names.items()}
    tensors = {new: state[original] for new, original in names.items()}
    renamed = {new: original for new, original in names.items() if new != original}
    return Checkpoint(tensors, origin, meta, renamed)


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _is_plain(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, str | int | float | bool)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value
