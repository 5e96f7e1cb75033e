"""The fused CBAM's CPU kernels (`csrc/cbam_cpu.cpp`): one pass over the map per step.

Compiled on first use with torch's C++ extension loader (g++ and ninja; ~30 s on 2 cores, then
cached under ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR). Where they cannot be built
(no compiler), the fused path runs its ATen implementation instead, after one warning.
`CBAM_NATIVE=0` in the environment (read at import) or `set_enabled(False)` turns them off.

They cover the paper's variant on CPU (avg and/or max pooling, channel pooling, channel then
spatial) in float32, float64, bfloat16 and float16, NCHW and channels_last, in eager mode;
under `torch.compile` the ATen implementation runs, so that Inductor can fuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

_SOURCE = Path(__file__).with_name("csrc") / "cbam_cpu.cpp"
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_enabled = os.environ.get("CBAM_NATIVE", "1") != "0"
_module: ModuleType | None = None
_failed = False


def set_enabled(enabled: bool) -> None:
    """Use the compiled kernels where they apply (on by default)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the fused CBAM's ATen path inside this block (for comparisons)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def load() -> ModuleType | None:
    """The compiled kernels, building them on the first call; None where that fails."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    # Importing the loader logs that no CUDA runtime is found on CPU-only machines: not news.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    try:  # pip's ninja lives beside the interpreter, which need not be on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    try:
        cpp_extension.verify_ninja_availability()
        name = _build_name()
        build_dir = _build_root(cpp_extension.get_default_build_root()) / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            print("cbam: compiling the CPU kernels (once, ~30 s)...", file=sys.stderr)
        _module = cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            build_directory=str(build_dir),
            extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError, FileNotFoundError) as error:
        _failed = True
        warnings.warn(
            f"cbam: could not build the CPU kernels ({str(error).strip().splitlines()[-1]}); "
            "the fused CBAM runs its slower ATen path. Install g++ and ninja "
            "(`pip install ninja`) to build them, or set CBAM_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
    return _module


def _build_root(default: str) -> Path:
    """$TORCH_EXTENSIONS_DIR or torch's default, per Python and torch version: the build links
    against both, and torch's loader only notices changed sources and flags."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or default
    version = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    return Path(root) / version.replace("+", "_")


def _build_name() -> str:
    """The build's name, per CPU: it is compiled for the machine's own instruction set
    (-march=native), so a home directory shared with other machines keeps one build each."""
    try:
        cpu = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith(("flags", "Features"))
        )  # fmt: skip
    except (OSError, StopIteration):
        cpu = platform.machine() + platform.processor()
    return "cbam_cpu_" + hashlib.sha1(cpu.encode()).hexdigest()[:10]


def applies(x: torch.Tensor, p: dict[str, Any]) -> bool:
    """Whether the kernels compute this call: the paper's variant on a CPU map, in eager mode."""
    return (
        not torch.compiler.is_compiling()  # first: Dynamo then never reads the flags below
        and _enabled
        and not _failed
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.dim() == 4
        and p["conv_w"] is not None
        and p["compress_w"] is None
        and not p["parallel"]
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and load() is not None
    )


def kernels() -> Any:
    """The loaded extension module (call `applies` first)."""
    assert _module is not None
    return _module
