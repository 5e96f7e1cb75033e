"""The fused CBAM's CPU kernels (`csrc/cbam_cpu.cpp`): one pass over the map per step.

Compiled on first use with torch's C++ extension loader (g++ and ninja; ~30 s on 2 cores, then
cached under ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR). Where they cannot be built
(no compiler), the fused path runs its ATen implementation instead, after one warning.
`CBAM_NATIVE=0` in the environment (read at import) or `set_enabled(False)` turns them off.

They cover the paper's variant on CPU (avg and/or max pooling, channel pooling, channel then
spatial) in float32, float64, bfloat16 and float16, NCHW and channels_last. Under
`torch.compile` (in training; see `fused_cbam._native_applies`) the training forward and
backward run as two torch ops, `cbam::forward_train` (which updates the BatchNorms' running
statistics, declared as mutated arguments) and `cbam::backward_train`: a graph cannot call a
pybind function, but it can call a registered op, whose fake implementation gives its outputs'
sizes, dtypes and strides without running it. Eager calls go to the extension directly (an
op's dispatch costs ~10 us). The eval forward (`forward_eval`) has no op: compiled inference
runs the ATen path, which Inductor fuses.
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
# An op that updates its arguments (the running statistics) returns a fixed number of tensors:
# functionalization (torch.compile) does not take a list from it.
Outputs11 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                  Tensor]  # fmt: skip


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x: Tensor, rows: int, *size: int, dtype: torch.dtype) -> Tensor:
    return x.new_empty((rows, *size), dtype=dtype)


@torch.library.custom_op(
    "cbam::forward_train",
    mutates_args=("block_rm", "block_rv", "spatial_rm", "spatial_rv"),
    tags=_LAYOUT,
)
def _forward_train(
    x: Tensor,
    identity: OptTensor,
    block_w: OptTensor,
    block_b: OptTensor,
    block_rm: OptTensor,
    block_rv: OptTensor,
    block_batch: bool,
    block_momentum: float,
    block_eps: float,
    w1: Tensor,
    b1: OptTensor,
    w2: Tensor,
    b2: OptTensor,
    pools: str,
    conv_w: Tensor,
    padding: int,
    spatial_w: OptTensor,
    spatial_b: OptTensor,
    spatial_rm: OptTensor,
    spatial_rv: OptTensor,
    spatial_batch: bool,
    spatial_momentum: float,
    spatial_eps: float,
) -> Outputs11:
    return tuple(_extension().forward_train(
        x, identity, block_w, block_b, block_rm, block_rv, block_batch, block_momentum,
        block_eps, w1, b1, w2, b2, pools, conv_w, padding, spatial_w, spatial_b, spatial_rm,
        spatial_rv, spatial_batch, spatial_momentum, spatial_eps,
    ))  # fmt: skip


@_forward_train.register_fake
def _(x: Tensor, identity: OptTensor, block_w: OptTensor, block_b: OptTensor,
      block_rm: OptTensor, block_rv: OptTensor, block_batch: bool, block_momentum: float,
      block_eps: float, w1: Tensor, b1: OptTensor, w2: Tensor, b2: OptTensor,
      pools: str, conv_w: Tensor, padding: int, spatial_w: OptTensor,
      spatial_b: OptTensor, spatial_rm: OptTensor, spatial_rv: OptTensor,
      spatial_batch: bool, spatial_momentum: float, spatial_eps: float) -> Outputs11:  # fmt: skip
    n, c, h, w = x.shape
    acc, mlp = _acc(x), w1.dtype
    # [mean, invstd] used in training (native_batch_norm's dtype: the weight's), else
    # [running mean, running var]
    stats_dtype = x.dtype if spatial_w is None else spatial_w.dtype
    spatial_stats = _rows(x, 2, dtype=stats_dtype if spatial_batch else spatial_rm.dtype)
    return (
        torch.empty_like(x),  # out
        _rows(x, n, c, dtype=mlp),  # mc
        _rows(x, len(pools.split(",")), n, w1.shape[0], dtype=mlp),  # hidden
        _rows(x, n, 1, h, w, dtype=x.dtype),  # ms
        _rows(x, n, 2, h, w, dtype=x.dtype),  # compressed
        _rows(x, n, 1, h, w, dtype=x.dtype),  # s
        _rows(x, n, 1, h, w, dtype=torch.int32),  # idx_c
        _rows(x, n if "max" in pools.split(",") else 0, c, dtype=torch.int32),  # idx_hw
        spatial_stats,
        _rows(x, n, c, dtype=acc),  # means
        _rows(x, 2 if identity is not None else 0, c, dtype=acc),  # block_stats
    )


@torch.library.custom_op("cbam::backward_train", mutates_args=(), tags=_LAYOUT)
def _backward_train(
    g_out: Tensor,
    out: OptTensor,
    x: Tensor,
    mc: Tensor,
    hidden: Tensor,
    ms: Tensor,
    compressed: Tensor,
    s: Tensor,
    idx_c: Tensor,
    idx_hw: Tensor,
    spatial_stats: Tensor,
    means: Tensor,
    block_stats: Tensor,
    block_w: OptTensor,
    block_b: OptTensor,
    block_batch: bool,
    w1: Tensor,
    b1: OptTensor,
    w2: Tensor,
    b2: OptTensor,
    pools: str,
    conv_w: Tensor,
    padding: int,
    spatial_w: OptTensor,
    spatial_b: OptTensor,
    spatial_batch: bool,
    spatial_eps: float,
) -> list[Tensor]:
    return _extension().backward_train(
        g_out, out, x, mc, hidden, ms, compressed, s, idx_c, idx_hw, spatial_stats, means,
        block_stats, block_w, block_b, block_batch, w1, b1, w2, b2, pools, conv_w, padding,
        spatial_w, spatial_b, spatial_batch, spatial_eps,
    )  # fmt: skip


@_backward_train.register_fake
def _(g_out: Tensor, out: OptTensor, x: Tensor, mc: Tensor, hidden: Tensor, ms: Tensor,
      compressed: Tensor, s: Tensor, idx_c: Tensor, idx_hw: Tensor, spatial_stats: Tensor,
      means: Tensor, block_stats: Tensor, block_w: OptTensor, block_b: OptTensor,
      block_batch: bool, w1: Tensor, b1: OptTensor, w2: Tensor, b2: OptTensor,
      pools: str, conv_w: Tensor, padding: int, spatial_w: OptTensor,
      spatial_b: OptTensor, spatial_batch: bool, spatial_eps: float) -> list[Tensor]:  # fmt: skip
    c = x.shape[1]
    block = out is not None

    def grad(param: OptTensor, size: int, dtype: torch.dtype, present: bool = True) -> Tensor:
        return _rows(x, size if param is not None and present else 0, dtype=dtype)

    return [
        torch.empty_like(x),  # the grad of x
        torch.empty_like(x) if block else _rows(x, 0, dtype=x.dtype),  # g_y
        grad(block_w, c, _acc(x), block),
        grad(block_b, c, _acc(x), block),
        w1.new_empty(w1.shape),
        grad(b1, w1.shape[0], w1.dtype),
        w2.new_empty(w2.shape, dtype=mc.dtype),
        grad(b2, c, w2.dtype),
        conv_w.new_empty(conv_w.shape),
        grad(spatial_w, 1, s.dtype if spatial_w is None else spatial_w.dtype),
        grad(spatial_b, 1, s.dtype if spatial_b is None else spatial_b.dtype),
    ]


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
