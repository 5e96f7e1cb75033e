"""The GPU check (`make gpu-check`, cbam.bench.gpu_check) in its CPU dry-run, so that the script
a rare GPU loan depends on cannot rot; and the fused path's freedom from host syncs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbam import kernels
from cbam.bench.gpu_check import BY_NAME
from cbam.bench.kernel_checks import host_syncs, sync_free_modules

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_part_and_writes_both_reports(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--output", str(tmp_path),
         "--dry-run"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = {part["name"]: part for part in report["parts"]}
    assert list(parts) == list(BY_NAME)
    for name, part in parts.items():
        assert part["status"] == "passed", (name, part["failures"])
    assert report["ok"] and report["dry_run"] and report["machine"]["torch"] == torch.__version__
    cases = parts["correctness"]["figures"]["cases"]
    assert sum(group["cases"] for group in cases.values()) >= 50
    assert set(parts["correctness"]["figures"]["deterministic"].values()) == {"fused"}  # CPU
    if parts["correctness"]["skipped"]:  # only where triton is missing
        assert "triton is not installed" in parts["correctness"]["skipped"][0]
    else:
        assert sum(group["triton"] for group in cases.values()) > 0
    eager = parts["bench-eager"]["figures"]
    assert len(eager["runs"]) == 4 and "aten::" in eager["profile"]
    variants = {m["variant"] for m in eager["runs"][0]["summary"]["models"]}
    assert {"plain", "se", "cbam-reference", "cbam-fused"} <= variants
    assert all(m["train_img_s"] > 0 for m in eager["runs"][0]["summary"]["models"])
    assert parts["bench-compiled"]["figures"]["runs"][0]["summary"]["models"]
    for name in ("train", "torchrun"):
        figures = parts[name]["figures"]
        epochs = figures["epochs"] if name == "train" else figures["train"]["epochs"]
        assert all(float(e["train_images_per_s"]) > 0 for e in epochs)
    assert parts["torchrun"]["figures"]["backend"] == "gloo"  # NCCL on the GPU
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.startswith("# GPU check: passed") and "**Dry run on CPU**" in markdown
    for name in BY_NAME:
        assert f"\n## {name}: passed" in markdown
    assert "## Targets" in markdown


class _SyncInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * g.sum().item()


def test_the_sync_detector_sees_host_syncs_forward_and_backward():
    x = torch.ones(3, requires_grad=True)
    assert "Tensor.item" in host_syncs(lambda: _SyncInBackward.apply(x).sum().backward())
    assert host_syncs(lambda: x.detach().cpu()) == ["Tensor.cpu"]
    assert host_syncs(lambda: bool(x.sum() > 0)) == ["aten._local_scalar_dense"]
    assert host_syncs(lambda: x.to("cpu")) == ["Tensor.to"]
    assert host_syncs(lambda: x.to(torch.float64)) == []
    assert host_syncs(lambda: torch.nonzero(x)) == ["aten.nonzero"]


@pytest.mark.parametrize("kind", ["module", "block"])
def test_fused_path_makes_no_host_sync(kind):
    """What CUDA runs with Triton off (the ATen path, kernels off here) syncs nowhere in the
    forward, the backward or inference: the GPU never waits for the host inside CBAM, and a
    CUDA graph can capture it. The GPU check repeats this under CUDA's sync debug mode."""
    with kernels.disabled():
        step = sync_free_modules(torch.device("cpu"))[kind]
        assert host_syncs(step) == []
