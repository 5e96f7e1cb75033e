"""CBAM beyond images, as a runnable example: a 1-D signal task and a 3-D volume task, each
trained with and without CBAM over seeds, offline on a CPU in minutes.

Both data sets are synthetic, generated from the seed (nothing to download), and built so that
where to look matters: the class is in a small, randomly placed part of the input and the
rest is noise and distractors.

- signal (1-D): 2 x 256 samples of noise plus a low sinusoid of a random frequency all along;
  somewhere a short windowed burst of one of 4 frequencies on both channels: the class.
- volume (3-D): 1 x 16 x 16 x 16 voxels of noise with a small solid cube, sphere, cross or
  hollow cube (the class) at a random place, and a bright random blob as a distractor.

The network is a small residual CNN of the task's dimensionality (stem, 3 stages of 2 blocks,
global average pooling), with CBAM (`spatial_dims=1` or `3`) on each block's residual branch
or without attention; same seed, data, and recipe for both. Run:

    python -m cbam.reproduce.nd --output docs/results/nd

which writes nd.md (test error per seed, mean +- std, the paired difference with its 95%
interval, seconds per run) and nd.csv.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cbam._argtypes import output_folder, positive_int
from cbam._checks import BATCH_NORM, CONV
from cbam.layers import create_attention
from cbam.reproduce.stats import describe, paired_difference

TASKS = ("signal", "volume")
CLASSES = 4


@dataclass(frozen=True)
class TaskSpec:
    dims: int
    in_chans: int
    train: int  # training examples
    test: int
    epochs: int
    width: int  # channels of the first stage


SPECS = {
    "signal": TaskSpec(dims=1, in_chans=2, train=4000, test=2000, epochs=8, width=16),
    "volume": TaskSpec(dims=3, in_chans=1, train=2000, test=1000, epochs=4, width=8),
}


def signals(n: int, g: torch.Generator, length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    t = torch.arange(length, dtype=torch.float32)
    x = torch.randn(n, 2, length, generator=g) * 0.5
    drift = torch.rand(n, 1, 1, generator=g) * 0.2 + 0.02  # a distractor along the whole signal
    x += 0.6 * torch.sin(drift * t + torch.rand(n, 2, 1, generator=g) * 6.3)
    width = 24
    start = torch.randint(0, length - width, (n,), generator=g)
    window = torch.hann_window(width, periodic=False)
    frequency = (0.25 + 0.35 * labels.float())[:, None]  # 4 well-separated burst frequencies
    burst = torch.sin(frequency * torch.arange(width)) * window  # n x width
    for i in range(n):
        x[i, :, start[i] : start[i] + width] += 0.9 * burst[i]
    return x, labels


def volumes(n: int, g: torch.Generator, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 1, side, side, side, generator=g) * 0.6
    r = torch.arange(-2, 3, dtype=torch.float32)
    dz, dy, dx = torch.meshgrid(r, r, r, indexing="ij")
    shapes = [
        torch.ones(5, 5, 5),  # cube
        ((dz**2 + dy**2 + dx**2) <= 5.0).float(),  # sphere
        ((dz == 0) & (dy == 0) | (dz == 0) & (dx == 0) | (dy == 0) & (dx == 0)).float(),  # cross
        1 - ((dz.abs() <= 1) & (dy.abs() <= 1) & (dx.abs() <= 1)).float(),  # hollow cube
    ]
    corner = torch.randint(0, side - 5, (n, 3), generator=g)
    blob = torch.randint(0, side - 3, (n, 3), generator=g)
    for i in range(n):
        z, y, w = corner[i].tolist()
        x[i, 0, z : z + 5, y : y + 5, w : w + 5] += 1.5 * shapes[int(labels[i])]
        z, y, w = blob[i].tolist()
        x[i, 0, z : z + 3, y : y + 3, w : w + 3] += 2.5  # bright, but not the class
    return x, labels


class Block(nn.Module):
    """A basic residual block of any dimensionality, attention on the residual branch."""

    def __init__(self, cin: int, cout: int, stride: int, dims: int, attention: str) -> None:
        super().__init__()
        conv, bn = CONV[dims], BATCH_NORM[dims]
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn(cout)
        reduction = min(16, cout)
        self.attention = create_attention(attention, cout, reduction=reduction, spatial_dims=dims)
        self.shortcut = (
            nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), bn(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.attention is not None:
            out = self.attention(out)
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, spec: TaskSpec, attention: str) -> None:
        super().__init__()
        conv, bn, w = CONV[spec.dims], BATCH_NORM[spec.dims], spec.width
        self.stem = nn.Sequential(conv(spec.in_chans, w, 3, padding=1, bias=False), bn(w))
        blocks, cin = [], w
        for stage, cout in enumerate((w, 2 * w, 4 * w)):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Block(cin, cout, stride, spec.dims, attention))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(torch.relu(self.stem(x)))
        return self.fc(features.mean(dim=list(range(2, features.dim()))))


@dataclass
class RunResult:
    task: str
    attention: str
    seed: int
    test_error: float  # %
    seconds: float
    params: int


def run(task: str, attention: str, seed: int, scale: float = 1.0) -> RunResult:
    """Train one model (data and initialisation from `seed`; `scale` shrinks the data set
    and epochs, for tests) and return its final test error."""
    spec = SPECS[task]
    make = signals if task == "signal" else volumes
    g = torch.Generator().manual_seed(seed)
    n_train, n_test = max(64, int(spec.train * scale)), max(64, int(spec.test * scale))
    x_train, y_train = make(n_train, g)
    x_test, y_test = make(n_test, g)
    torch.manual_seed(seed)
    model = SmallResNet(spec, attention)
    epochs = max(1, round(spec.epochs * scale)) if scale < 1 else spec.epochs
    batch = 64
    steps = epochs * (n_train // batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                                nesterov=True)  # fmt: skip
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=steps)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=g)
        for i in range(n_train // batch):
            index = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{task}/{attention}/seed {seed}: loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(x).argmax(1) for x in x_test.split(256)])
    error = 100.0 * (predicted != y_test).float().mean().item()
    params = sum(p.numel() for p in model.parameters())
    return RunResult(task, attention, seed, error, time.perf_counter() - started, params)


def report(results: Sequence[RunResult]) -> str:
    """nd.md: per task, the test error per seed, mean +- std, and CBAM - none paired by seed."""
    lines = [
        "| task | attention | params | test error % per seed | mean +- std | CBAM - none "
        "(paired, 95% CI) | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        by = {a: {r.seed: r for r in results if r.task == task and r.attention == a}
              for a in ("none", "cbam")}  # fmt: skip
        if not by["none"] and not by["cbam"]:
            continue
        for attention, runs in by.items():
            if not runs:
                continue
            errors = {s: r.test_error for s, r in sorted(runs.items())}
            estimate = describe(list(errors.values()))
            diff = ""
            if attention == "cbam" and by["none"]:
                d = paired_difference(errors, {s: r.test_error for s, r in by["none"].items()})
                interval = "" if d.low is None else f" [{d.low:+.2f}, {d.high:+.2f}]"
                diff = f"{d.mean:+.2f}{interval} (n={d.n})"
            seconds = sum(r.seconds for r in runs.values()) / len(runs)
            per_seed = ", ".join(f"{e:.2f}" for e in errors.values())
            params = next(iter(runs.values())).params
            lines.append(
                f"| {task} ({SPECS[task].dims}-D) | {attention} | {params:,} | {per_seed} | "
                f"{estimate.mean:.2f} +- {estimate.std:.2f} | {diff} | {seconds:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbam.reproduce.nd", description=__doc__)
    parser.add_argument("--output", type=output_folder, default="runs/nd",
                        help="folder for nd.md and nd.csv")  # fmt: skip
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    output = args.output
    if args.threads:
        torch.set_num_threads(args.threads)
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for task in args.tasks:
        for seed in range(args.seeds):
            for attention in ("none", "cbam"):
                result = run(task, attention, seed)
                print(f"{task} {attention} seed {seed}: {result.test_error:.2f}% "
                      f"({result.seconds:.0f} s)", flush=True)  # fmt: skip
                results.append(result)
                with open(output / "nd.csv", "w", newline="") as f:
                    writer = csv.writer(f)
                    writer.writerow(["task", "attention", "seed", "test_error", "seconds",
                                     "params"])  # fmt: skip
                    for r in results:
                        writer.writerow([r.task, r.attention, r.seed, f"{r.test_error:.2f}",
                                         f"{r.seconds:.1f}", r.params])  # fmt: skip
    text = report(results)
    (output / "nd.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
