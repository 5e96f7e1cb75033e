"""What 1-D and 3-D CBAM cost: the fused kernels are 2-D only, so other dims run the
reference path. Times one training step of the module alone (forward + backward) for each
dimensionality on maps of about the same size, beside the conv + BatchNorm it would follow,
and for 2-D also the fused path; variants interleaved, medians of `repeats` rounds.

    python -m cbam.bench.nd [--repeats 30]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from cbam._argtypes import positive_int
from cbam._checks import BATCH_NORM, CONV
from cbam.layers import CBAM

# Spatial sizes of about 800 positions in each dimensionality.
SIZES = {1: (784,), 2: (28, 28), 3: (8, 10, 10)}


def _step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        x.grad = None
        module(x).sum().backward()

    return call


def measure(channels: int = 64, batch: int = 8, repeats: int = 30) -> list[dict[str, object]]:
    torch.manual_seed(0)
    calls: dict[tuple[int, str], Callable[[], None]] = {}
    for dims, size in SIZES.items():
        x = torch.randn(batch, channels, *size, requires_grad=True)
        conv = nn.Sequential(CONV[dims](channels, channels, 3, padding=1, bias=False),
                             BATCH_NORM[dims](channels))  # fmt: skip
        calls[dims, "conv3 + BN"] = _step(conv.train(), x)
        calls[dims, "CBAM reference"] = _step(
            CBAM(channels, spatial_dims=dims, impl="reference"), x
        )
        if dims == 2:
            calls[dims, "CBAM fused"] = _step(CBAM(channels, impl="fused"), x)
    for call in calls.values():  # warm-up, and the CPU kernels' first build
        call()
    times: dict[tuple[int, str], list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    rows = []
    for (dims, variant), values in times.items():
        median = sorted(values)[len(values) // 2]
        conv = sorted(times[dims, "conv3 + BN"])[repeats // 2]
        rows.append({"dims": dims, "size": " x ".join(map(str, SIZES[dims])),
                     "variant": variant, "ms": 1e3 * median, "x conv": median / conv})  # fmt: skip
    return rows


def markdown(rows: Sequence[dict[str, object]], channels: int, batch: int) -> str:
    lines = [
        f"N = {batch}, C = {channels}, forward + backward, median ms",
        "",
        "| dims | map | variant | ms | x conv3 + BN |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['dims']}-D | {r['size']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['x conv']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbam.bench.nd", description=__doc__)
    parser.add_argument("--channels", type=positive_int, default=64, help="at least 16")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=30)
    args = parser.parse_args(argv)
    try:
        rows = measure(args.channels, args.batch, args.repeats)
    except ValueError as error:  # e.g. fewer channels than CBAM's reduction of 16
        parser.error(str(error))
    print(markdown(rows, args.channels, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
