"""The benchmark (cbam.bench): statistics helpers, memory measurement, a --quick smoke run."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from cbam.bench.memory import peak_memory_bytes, tensor_bytes
from cbam.bench.overhead import (
    BenchConfig,
    build_model,
    config_from_args,
    format_report,
    main,
    run_overhead,
    stage_shapes,
)
from cbam.bench.stats import paired_ratios, quantile, rotations, summarize
from cbam.cli import bench as bench_command


def test_quantile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert quantile(values, 0.5) == 2.5
    assert quantile(values, 0.0) == 1.0 and quantile(values, 1.0) == 4.0
    assert quantile(values, 0.25) == pytest.approx(1.75)
    assert quantile([7.0], 0.3) == 7.0
    with pytest.raises(ValueError):
        quantile([], 0.5)
    with pytest.raises(ValueError):
        quantile(values, 1.5)


def test_summary_and_paired_ratios():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.median, s.q1, s.q3, s.n) == (3.0, 2.0, 4.0, 5)
    assert s.spread == pytest.approx(2 / 3)
    # a slow round hits both variants: the paired ratio is unaffected by it
    fast, slow = [1.0, 1.0, 5.0, 1.0], [1.2, 1.2, 6.0, 1.2]
    assert paired_ratios(slow, fast) == pytest.approx([1.2] * 4)
    with pytest.raises(ValueError, match="unpaired"):
        paired_ratios([1.0], [1.0, 2.0])


def test_rotations_put_every_variant_in_every_position():
    orders = rotations(["a", "b", "c"], 6)
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)
    for position in range(3):
        firsts = [o[position] for o in orders]
        assert {v: firsts.count(v) for v in "abc"} == {"a": 2, "b": 2, "c": 2}


def test_peak_memory_follows_allocations_and_frees():
    def allocate():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB, 12 MB live
        del a
        c = torch.empty(500_000)  # 2 MB, 10 MB live
        return b, c

    peak = peak_memory_bytes(allocate)
    assert 12_000_000 <= peak < 12_100_000


def test_tensor_bytes_counts_each_storage_once():
    t = torch.zeros(1000)
    state = {"a": [t, t[10:], t.view(10, 100)], "b": (torch.zeros(10, dtype=torch.float64),)}
    assert tensor_bytes([state, t, None, 3]) == 4000 + 80


def test_stage_shapes_are_resnet50s_feature_maps():
    assert stage_shapes("resnet50", 16, 112) == [
        (16, 256, 28, 28), (16, 512, 14, 14), (16, 1024, 7, 7), (16, 2048, 4, 4),
    ]  # fmt: skip


def test_variants_build_the_models_they_name():
    from cbam import CBAM

    fused = build_model("cbam-fused", "resnet18")
    reference = build_model("cbam-reference", "resnet18")
    assert {m.impl for m in fused.modules() if isinstance(m, CBAM)} == {"fused"}
    assert {m.impl for m in reference.modules() if isinstance(m, CBAM)} == {"reference"}
    assert not any(isinstance(m, CBAM) for m in build_model("plain", "resnet18").modules())
    with pytest.raises(ValueError, match="unknown variant"):
        build_model("cbam-fast")


def test_quick_run_reports_every_group():
    pytest.importorskip("timm")
    config = BenchConfig.quick(model="resnet18", batch_size=2, image_size=32)
    result = run_overhead(config)
    parts = {(r.part, r.variant) for r in result.rows}
    for variant in ("plain", "se", "cbam-reference", "cbam-fused", "cbam-fused-aten", "timm-cbam"):
        assert ("train", variant) in parts and ("inference", variant) in parts
    assert len([r for r in result.rows if r.part == "module"]) == 4 * 5  # stages x variants
    for row in result.rows:
        assert len(row.times) == config.repeats and all(t > 0 for t in row.times)
        assert row.peak_bytes is not None and row.peak_bytes >= row.state_bytes > 0
    # The training step frees the old gradients before it allocates new ones: the state
    # counts weights and SGD momentum (~2x the weights), not the gradients a third time.
    plain = build_model("plain", "resnet18", in_chans=3, num_classes=config.num_classes)
    weights = sum(p.numel() * p.element_size() for p in plain.parameters())
    train_state = result.row("train", "plain").state_bytes
    assert 2 * weights <= train_state < 2.1 * weights
    assert result.row("train", "plain").ratio.median == 1.0
    assert result.row("module", "timm-cbam", size="64x8x8").ratio.median == 1.0
    report = format_report(result)
    assert "### resnet18 2x3x32x32: train (eager, nchw)" in report
    assert "| cbam-fused |" in report and "Machine:" in report
    assert result.machine["keep_freed_memory"] is sys.platform.startswith("linux")
    assert "malloc keeps freed memory" in report
    json.dumps(result.to_dict())


FREE_AND_ALLOCATE_AGAIN = """
import resource, sys, torch
from cbam.bench.overhead import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for i in range(6):
    if i == 1:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = torch.ones(5 << 20), torch.ones(5 << 20)  # 20 MB each, written
    del b, a  # a 40 MB free block at the heap's top: glibc hands it back by default
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keeping_freed_memory_stops_the_page_faults_of_allocating_again():
    faults = {}
    for arm in ("default", "keep"):
        run = subprocess.run(
            [sys.executable, "-c", FREE_AND_ALLOCATE_AGAIN, arm], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        faults[arm] = int(run.stdout)
    # Ten 20 MB allocations are 51,200 pages: kept, at most the heap's growth once.
    assert faults["keep"] <= 6000 and faults["default"] >= 2 * faults["keep"], faults


def test_command_line_quick_run(capsys, tmp_path):
    path = tmp_path / "bench.json"
    args = ["--quick", "--model", "resnet18", "--image-size", "32", "--parts", "module",
            "--variants", "se", "cbam-fused", "--no-memory", "--json", str(path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Module alone, forward + backward (eager, nchw)" in out
    assert json.loads(path.read_text())["config"]["batch_size"] == 2


def test_input_channels_and_classes_follow_the_recipe(capsys):
    args = ["--quick", "--model", "resnet20", "--in-chans", "1", "--num-classes", "10",
            "--image-size", "28", "--parts", "model", "--variants", "plain", "cbam-fused",
            "--no-memory"]  # fmt: skip
    assert main(args) == 0
    assert "### resnet20 2x1x28x28: train (eager, nchw)" in capsys.readouterr().out


def test_bench_subcommand_registers_its_options():
    parser = argparse.ArgumentParser()
    bench_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--repeats", "30", "--modes", "eager", "compiled",
                              "--memory-formats", "channels_last"])  # fmt: skip
    assert args.run is bench_command.cmd_bench
    assert (args.repeats, args.modes, args.memory_formats) == (30, ["eager", "compiled"],
                                                               ["channels_last"])  # fmt: skip
    assert config_from_args(args).keep_freed_memory
    args = parser.parse_args(["bench", "--return-freed-memory"])
    assert not config_from_args(args).keep_freed_memory
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--modes", "jit"])


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown mode 'jit'"):
        run_overhead(BenchConfig(modes=("jit",)))


def test_data_pipeline_benchmark_reports_both_paths(tmp_path, capsys):
    """A tiny run of `python -m cbam.bench.data_pipeline`: every row measured, ratios the
    quotient of the figures they come from, evaluation timed on the images asked for."""
    from cbam.bench import data_pipeline

    out = tmp_path / "figures.json"
    args = ["--images", "256", "--test-images", "64", "--batch-size", "64", "--rounds", "1",
            "--attention", "none", "--eval-images", "128", "--json", str(out)]  # fmt: skip
    assert data_pipeline.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["data_path"] for row in rows] == ["tensor", "per-sample"]
    for row in rows:
        assert row["eval_images"] == 128 and row["eval_s"] > 0
        assert row["ratio"] == pytest.approx(row["train_img_s"] / row["bare_step_img_s"])
    printed = capsys.readouterr().out
    assert "| none | tensor |" in printed and "(128 images) |" in printed
