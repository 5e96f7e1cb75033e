"""What a checkpoint costs: seconds per save of a model's weights and SGD state, and the
share of training time a periodic interval spends on it.

    python -m cbam.bench.checkpoint_cost --model resnet50 --attention cbam --minutes 30
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cbam.models import create_model
from cbam.training import checkpoint as ckpt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--attention", default="cbam")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=30.0, help="the periodic interval")
    args = parser.parse_args(argv)
    try:
        model = create_model(args.model, attention=args.attention, num_classes=1000)
    except ValueError as error:
        parser.error(str(error))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # momentum buffers, as after a first step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seconds = []
    with tempfile.TemporaryDirectory() as run_dir:
        for step in range(1, args.repeats + 1):
            state = {"step": step, "epoch": 0, "batch_in_epoch": step,
                     **ckpt.loop_state(optimizer, scheduler, scaler)}  # fmt: skip
            start = time.perf_counter()
            manifest = ckpt.save_checkpoint(Path(run_dir), model, state)
            seconds.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in manifest.parent.glob(f"{manifest.stem}.*"))
    per_save = statistics.median(seconds)
    print(
        f"{args.model} + {args.attention or 'none'}: {size / 1e6:.0f} MB per checkpoint, "
        f"{per_save:.2f} s per save (median of {args.repeats}; min {min(seconds):.2f}, max "
        f"{max(seconds):.2f}); every {args.minutes:g} min that is "
        f"{100 * per_save / (60 * args.minutes):.3f}% of training time"
    )


if __name__ == "__main__":
    main()
