"""The runs behind the tables: one folder per (cell, seed), trained one or several at a time.

A run folder is named by what it trains plus a hash of its resolved config (execution-only
settings aside), so the same cell in two tables, or in two invocations, is one run: finished
runs are reused, interrupted ones resume. Each folder's cell.json records the config and the
versions that trained it, so any cell can be re-run alone.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cbam.paper import config_label
from cbam.reproduce.tables import Cell
from cbam.training.checkpoint import atomic_write
from cbam.training.config import TrainConfig, load_config
from cbam.training.runs import experiment, is_finished, train_or_reuse
from cbam.training.trainer import TrainingDiverged

RECORD = "cell.json"
LOG = "train.log"  # a worker process's output, when trainings run in parallel
INTERRUPTED = 130  # exit status of a worker stopped by a signal (resumable)
DIVERGED = 3


def experiment_hash(config: TrainConfig) -> str:
    text = json.dumps(experiment(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _slug_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return "none" if value is None else str(value)


def run_name(config: TrainConfig) -> str:
    """resnet20-cbam-kernel_size=3-spatial=conv1x1-seed0-<hash>: readable, and unique per
    experiment."""
    parts = [
        config.model,
        *(f"{k}={_slug_value(v)}" for k, v in sorted(config.model_kwargs.items())),
    ]
    parts.append(config.attention or "none")
    parts += [f"{k}={_slug_value(v)}" for k, v in sorted(config.attention_kwargs.items())]
    parts += [f"seed{config.seed}", experiment_hash(config)]
    return re.sub(r"[^\w.=+-]", "_", "-".join(parts))


def cell_config(base: TrainConfig, cell: Cell, seed: int, root: str | Path) -> TrainConfig:
    """The resolved config of `cell` at `seed`, its output a run folder under root/runs/."""
    config = cell.configure(base, seed).validate()
    return replace(config, output=str(Path(root) / "runs" / run_name(config)))


def run_label(config: TrainConfig) -> str:
    """resnet20 + cbam(kernel_size=3) seed 1: a run in one line of a log."""
    model = config_label(config.model, config.model_kwargs)
    attention = config_label(config.attention or "none", config.attention_kwargs)
    return f"{model} + {attention} seed {config.seed}"


def versions() -> dict[str, str]:
    import torchvision

    from cbam import __version__

    return {
        "cbam": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's cell.json ({} when it has none)."""
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(config: TrainConfig, jobs: int, threads: int) -> None:
    """cell.json: the config, how to re-run it alone, and one entry per (re)start of its
    training with the versions, parallelism and time."""
    run_dir = Path(config.output)
    record = read_record(run_dir)
    started = record.get("trained_with", [])
    started.append(
        {
            **versions(),
            "jobs": jobs,
            "torch_threads": threads,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
    )
    record.update(
        run=run_label(config),
        experiment_hash=experiment_hash(config),
        config=config.to_dict(),
        rerun_alone=f"cbam train --config {run_dir / 'config.yaml'} --output NEW_FOLDER",
        resume=f"cbam train --resume {run_dir}",
        trained_with=started,
    )
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(run_dir / RECORD, lambda tmp: Path(tmp).write_text(text))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_jobs(jobs: int) -> int:
    """Trainings at once must be 1..cores: each needs a core, and more would thrash."""
    cores = available_cores()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= cores:
        raise ValueError(
            f"--jobs {jobs}: this machine has {cores} CPU core(s) available and each "
            f"training needs at least one; use --jobs 1 to {cores}"
        )
    return jobs


@dataclass
class GridOutcome:
    finished: list[Path] = field(default_factory=list)  # run folders with every epoch done
    failed: dict[Path, str] = field(default_factory=dict)  # run folder -> why
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return not self.failed and not self.interrupted


def run_grid(
    configs: Sequence[TrainConfig], jobs: int = 1, log: Callable[[str], None] = print
) -> GridOutcome:
    """Train every config that has not finished; `jobs` > 1 runs that many worker processes
    at once, with the cores split between them. Ctrl-C (or SIGTERM) stops every training at
    its next step with a resumable checkpoint: the same call then continues where it was."""
    check_jobs(jobs)
    outcome = GridOutcome()
    todo = []
    for config in configs:
        if is_finished(config):
            outcome.finished.append(Path(config.output))
        else:
            todo.append(config)
    if outcome.finished:
        log(f"reusing {len(outcome.finished)} finished run(s); {len(todo)} to train")
    if jobs == 1:
        _run_here(todo, outcome, log)
    else:
        _run_workers(todo, jobs, outcome, log)
    return outcome


def _run_here(
    todo: Sequence[TrainConfig], outcome: GridOutcome, log: Callable[[str], None]
) -> None:
    """One training after another in this process (its output goes to the terminal)."""
    for i, config in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {run_label(config)}: {config.output}")
        try:
            write_record(config, jobs=1, threads=torch.get_num_threads())
            done = train_or_reuse(config)
        except TrainingDiverged as error:
            outcome.failed[Path(config.output)] = str(error)
            log(f"failed: {run_label(config)}: {error}")
            continue
        except KeyboardInterrupt:  # outside the trainer's own handler, or a second Ctrl-C
            done = False
        if not done:
            outcome.interrupted = True
            return
        outcome.finished.append(Path(config.output))


WORKER = (
    "import sys; from cbam.reproduce.grid import run_worker; "
    "sys.exit(run_worker(sys.argv[1], int(sys.argv[2])))"
)


def run_worker(run_dir: str, threads: int) -> int:
    """A worker process's entry point: train the config in run_dir/cell.json."""
    torch.set_num_threads(threads)
    config = load_config(None, read_record(run_dir)["config"])
    try:
        return 0 if train_or_reuse(config) else INTERRUPTED
    except TrainingDiverged as error:
        print(error, file=sys.stderr)
        return DIVERGED


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the grid as Ctrl-C does, so the workers are stopped cleanly too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_workers(
    todo: Sequence[TrainConfig], jobs: int, outcome: GridOutcome, log: Callable[[str], None]
) -> None:
    """Up to `jobs` worker processes at once, each with cores // jobs threads and its output
    in its run folder's train.log. The workers run in their own sessions, so a Ctrl-C reaches
    only this process, which passes one SIGINT to each: each saves a checkpoint and exits."""
    threads = max(1, available_cores() // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONUNBUFFERED"] = "1"  # train.log follows the run as it goes
    pending = list(todo)
    running: dict[subprocess.Popen[bytes], TrainConfig] = {}
    started = 0
    with _sigterm_as_interrupt():
        try:
            while pending or running:
                while pending and len(running) < jobs and not outcome.interrupted:
                    config = pending.pop(0)
                    run_dir = Path(config.output)
                    write_record(config, jobs=jobs, threads=threads)
                    started += 1
                    log(f"[{started}/{len(todo)}] {run_label(config)}: {run_dir / LOG}")
                    with open(run_dir / LOG, "ab") as out:
                        process = subprocess.Popen(
                            [sys.executable, "-c", WORKER, str(run_dir), str(threads)],
                            stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True,
                        )  # fmt: skip
                    running[process] = config
                if not running:
                    return
                time.sleep(0.2)
                for process in [p for p in running if p.poll() is not None]:
                    _finish(process, running.pop(process), outcome, log)
        except KeyboardInterrupt:
            outcome.interrupted = True
            log(f"stopping {len(running)} training(s) at their next step (resumable)")
            _stop(running)
            for process, config in running.items():
                _finish(process, config, outcome, log)


def _finish(
    process: subprocess.Popen[bytes],
    config: TrainConfig,
    outcome: GridOutcome,
    log: Callable[[str], None],
) -> None:
    run_dir = Path(config.output)
    if process.returncode == 0:
        outcome.finished.append(run_dir)
        log(f"finished {run_label(config)}")
    elif process.returncode == INTERRUPTED or outcome.interrupted:
        outcome.interrupted = True
    else:
        why = _log_tail(run_dir / LOG)
        outcome.failed[run_dir] = why or f"exit status {process.returncode}"
        log(f"failed: {run_label(config)} (exit {process.returncode}); see {run_dir / LOG}:\n{why}")


def _stop(running: dict[subprocess.Popen[bytes], TrainConfig]) -> None:
    """One SIGINT each (checkpoint and stop), then wait; a second Ctrl-C sends another,
    which makes the trainers stop without saving (their last checkpoint stays)."""
    for process in running:
        process.send_signal(signal.SIGINT)
    try:
        for process in running:
            process.wait()
    except KeyboardInterrupt:
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in running:
            process.wait()
