"""The fused CBAM's CPU kernels (`csrc/cbam_cpu.cpp`): one pass over the map per step.

Compiled on first use with torch's C++ extension loader (g++ and ninja; ~30 s on 2 cores, then
cached under ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR). Where they cannot be built
(no compiler), the fused path runs its ATen implementation instead, after one warning.
`CBAM_NATIVE=0` in the environment (read at import) or `set_enabled(False)` turns them off.

They cover the paper's variant on CPU (avg and/or max pooling, channel pooling, channel then
spatial) in float32, float64, bfloat16 and float16, NCHW and channels_last. Under
`torch.compile` (in training; see `fused_cbam._native_applies`) they run as torch ops
(`cbam::hw_stats`, ...): a graph cannot call a pybind function, but it can call a registered
op, whose fake implementation gives its outputs' shapes without running it. Eager calls go to
the extension directly (an op's dispatch costs ~10 us). The one-call eval forward
(`forward_eval`) has no op: compiled inference runs the ATen path, which Inductor fuses.
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


@torch.compiler.assume_constant_result
def _built() -> bool:
    """Whether the kernels are built, building them on the first call. Under torch.compile it
    runs while the graph is traced, and its answer is a constant of the graph."""
    return load() is not None


def applies(x: torch.Tensor, p: dict[str, Any]) -> bool:
    """Whether the kernels compute this call: the paper's variant on a CPU map."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.dim() == 4
        and p["conv_w"] is not None
        and p["compress_w"] is None
        and not p["parallel"]
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and _built()
    )


def kernels() -> Any:
    """The kernels (call `applies` first): the extension's functions, or under torch.compile
    the same functions as torch ops (`torch.ops.cbam`)."""
    if torch.compiler.is_compiling():
        return torch.ops.cbam
    assert _module is not None
    return _module


# --------------------------------------------------------------------------- torch ops
# Each op calls the extension's function of the same name and signature; its fake computes
# the outputs' sizes, dtypes and layouts as the C++ does. Small outputs (per channel, per
# position) are in the accumulation type: float64 for float64 maps, else float32. None
# arguments are undefined tensors there; outputs never are (what is not asked for has no rows).
Tensor = torch.Tensor
OptTensor = torch.Tensor | None
# The maps may come in either layout (each kernel handles NCHW and channels_last): without
# this, Inductor, which keeps conv outputs channels_last, copies each map to NCHW for the op.
_LAYOUT = (torch.Tag.flexible_layout,)


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x: Tensor, rows: int, *size: int, dtype: torch.dtype) -> Tensor:
    return x.new_empty((rows, *size), dtype=dtype)


@torch.library.custom_op("cbam::hw_stats", mutates_args=(), tags=_LAYOUT)
def _hw_stats(x: Tensor, with_index: bool, with_variance: bool) -> list[Tensor]:
    return _extension().hw_stats(x, with_index, with_variance)


@_hw_stats.register_fake
def _(x: Tensor, with_index: bool, with_variance: bool) -> list[Tensor]:
    n, c = x.shape[:2]
    acc, index = _acc(x), torch.int32
    mean, top, low = (_rows(x, n, c, dtype=acc) for _ in range(3))
    m2 = _rows(x, n if with_variance else 0, c, dtype=acc)
    top_at, low_at = (_rows(x, n if with_index else 0, c, dtype=index) for _ in range(2))
    return [mean, m2, top, top_at, low, low_at]


@torch.library.custom_op("cbam::channel_pool", mutates_args=(), tags=_LAYOUT)
def _channel_pool(
    x: Tensor, alpha: OptTensor, beta: OptTensor, mc: Tensor, with_index: bool
) -> list[Tensor]:
    return _extension().channel_pool(x, alpha, beta, mc, with_index)


@_channel_pool.register_fake
def _(x: Tensor, alpha: OptTensor, beta: OptTensor, mc: Tensor, with_index: bool) -> list[Tensor]:
    n, _, h, w = x.shape
    index = _rows(x, n if with_index else 0, 1, h, w, dtype=torch.int32)
    return [_rows(x, n, 2, h, w, dtype=x.dtype), index]


@torch.library.custom_op("cbam::spatial_conv", mutates_args=(), tags=_LAYOUT)
def _spatial_conv(compressed: Tensor, weight: Tensor, padding: int) -> Tensor:
    return _extension().spatial_conv(compressed, weight, padding)


@_spatial_conv.register_fake
def _(compressed: Tensor, weight: Tensor, padding: int) -> Tensor:
    n, _, h, w = compressed.shape
    return _rows(compressed, n, 1, h, w, dtype=compressed.dtype)


@torch.library.custom_op("cbam::spatial_conv_backward", mutates_args=(), tags=_LAYOUT)
def _spatial_conv_backward(
    g_s: Tensor, compressed: Tensor, weight: Tensor, padding: int
) -> list[Tensor]:
    return _extension().spatial_conv_backward(g_s, compressed, weight, padding)


@_spatial_conv_backward.register_fake
def _(g_s: Tensor, compressed: Tensor, weight: Tensor, padding: int) -> list[Tensor]:
    return [compressed.new_empty(compressed.shape), weight.new_empty(weight.shape)]  # contiguous


@torch.library.custom_op("cbam::gate", mutates_args=(), tags=_LAYOUT)
def _gate(
    x: Tensor,
    alpha: OptTensor,
    beta: OptTensor,
    mc: Tensor,
    ms: Tensor,
    identity: OptTensor,
    in_place: bool,
) -> Tensor:
    _not_in_place(in_place)
    return _extension().gate(x, alpha, beta, mc, ms, identity, False)


@_gate.register_fake
def _(x: Tensor, alpha: OptTensor, beta: OptTensor, mc: Tensor, ms: Tensor,
      identity: OptTensor, in_place: bool) -> Tensor:  # fmt: skip
    return torch.empty_like(x)


@torch.library.custom_op("cbam::backward_reduce", mutates_args=(), tags=_LAYOUT)
def _backward_reduce(
    g_out: Tensor,
    out: OptTensor,
    x: Tensor,
    alpha: OptTensor,
    beta: OptTensor,
    mc: Tensor,
    ms: Tensor,
) -> list[Tensor]:
    return _extension().backward_reduce(g_out, out, x, alpha, beta, mc, ms)


@_backward_reduce.register_fake
def _(g_out: Tensor, out: OptTensor, x: Tensor, alpha: OptTensor, beta: OptTensor,
      mc: Tensor, ms: Tensor) -> list[Tensor]:  # fmt: skip
    n, c, h, w = x.shape
    g_y = torch.empty_like(x) if out is not None else _rows(x, 0, dtype=x.dtype)
    acc = _acc(x)
    return [g_y, _rows(x, n, 1, h, w, dtype=acc), _rows(x, n, c, dtype=acc),
            _rows(x, n, c, dtype=acc)]  # fmt: skip


@torch.library.custom_op("cbam::grad_input", mutates_args=(), tags=_LAYOUT)
def _grad_input(
    g_y: Tensor,
    x: Tensor,
    ms: Tensor,
    g_mean: Tensor,
    scale: Tensor,
    k2: OptTensor,
    shift: Tensor,
) -> Tensor:
    return _extension().grad_input(g_y, x, ms, g_mean, scale, k2, shift)


@_grad_input.register_fake
def _(g_y: Tensor, x: Tensor, ms: Tensor, g_mean: Tensor, scale: Tensor, k2: OptTensor,
      shift: Tensor) -> Tensor:  # fmt: skip
    return torch.empty_like(x)


def _extension() -> ModuleType:
    """The extension behind an op's call, built if need be (an op may be called directly, not
    after `applies`), or an error that says what to do where it cannot be built."""
    module = load()
    if module is None:
        raise RuntimeError(
            "cbam's CPU kernels could not be built (see the warning above), so the torch ops "
            "cbam::* cannot run. Install g++ and ninja (`pip install ninja`), or set "
            "CBAM_NATIVE=0 before compiling so that the graph uses the ATen path."
        )
    return module


def _not_in_place(in_place: bool) -> None:
    if in_place:  # an op's output may not alias its input
        raise ValueError("cbam's torch ops do not write over their input: pass in_place=False")
