"""`cbam reproduce`: statistics on known inputs, the tables' layer configs, the grid's reuse and
resume, the report files, and the whole command end to end on tiny subsets."""

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from cbam.cli import main
from cbam.layers import CBAM
from cbam.layers.pooling import ChannelPool
from cbam.models import create_model
from cbam.reproduce import grid, tables
from cbam.reproduce.report import CellRuns, markdown, summarize, write_report
from cbam.reproduce.stats import describe, paired_difference, t_quantile_975
from cbam.training import runs
from cbam.training.checkpoint import save_checkpoint
from cbam.training.config import load_config, save_config
from cbam.training.runs import RunSummary

TINY = ["--train-subset", "64", "--test-subset", "64", "--batch-size", "32", "--epochs", "1"]

# ----------------------------------------------------------------------------- statistics


def test_mean_and_sample_std():
    e = describe([1.0, 2.0, 3.0, 4.0])
    assert (e.mean, e.n) == (2.5, 4)
    assert e.std == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, n - 1 = 3
    one = describe([7.0])
    assert one.mean == 7.0 and math.isnan(one.std) and one.n == 1
    assert describe([]).n == 0


def test_paired_difference_by_hand():
    values = {0: 10.0, 1: 12.0, 2: 11.0}
    baseline = {0: 11.0, 1: 12.5, 2: 13.0}  # differences -1, -0.5, -2
    d = paired_difference(values, baseline)
    mean = -3.5 / 3
    std = math.sqrt(((-1 - mean) ** 2 + (-0.5 - mean) ** 2 + (-2 - mean) ** 2) / 2)
    half = 4.302653 * std / math.sqrt(3)  # t_{0.975, 2}
    assert d.n == 3
    assert d.mean == pytest.approx(mean)
    assert d.std == pytest.approx(std)
    assert d.low == pytest.approx(mean - half, abs=1e-5)
    assert d.high == pytest.approx(mean + half, abs=1e-5)
    assert not d.excludes_zero  # -3.06 .. +0.73


def test_pairing_uses_shared_seeds_only_and_one_seed_has_no_interval():
    d = paired_difference({0: 5.0, 1: 6.0, 2: 9.0}, {1: 4.0, 2: 8.5, 3: 0.0})
    assert d.n == 2 and d.mean == pytest.approx(1.25)  # differences 2 and 0.5
    assert d.std == pytest.approx(1.5 / math.sqrt(2))
    assert d.high - d.mean == pytest.approx(12.706205 * 0.75, abs=1e-5)  # t_{0.975,1} s/sqrt(2)
    single = paired_difference({4: 3.0}, {4: 1.0})
    assert single.mean == 2.0 and single.n == 1 and single.low is None and single.high is None
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_t_quantiles():
    assert t_quantile_975(2) == pytest.approx(4.302653, abs=1e-6)
    assert t_quantile_975(1) == pytest.approx(12.706205, abs=1e-6)
    assert t_quantile_975(10_000) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 61), 100, 1000]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-7), df


# --------------------------------------------------------------------------------- tables


def first_attention(cell: tables.Cell) -> nn.Module:
    config = cell.configure(load_config("small"), seed=0)
    model = create_model(
        config.model, attention=config.attention, attention_kwargs=config.attention_kwargs,
        num_classes=10, in_chans=1, **config.model_kwargs,
    )  # fmt: skip
    return model.layer1[0].attention


def cells_by_label(table: tables.Table) -> dict[str, tables.Cell]:
    return {c.label: c for c in table.cells}


def test_channel_pooling_cells():
    cells = cells_by_label(tables.CHANNEL_POOLING)
    assert isinstance(first_attention(cells["no attention (baseline)"]), nn.Identity)
    for label, pools in (("avg", ["avg"]), ("max", ["max"]), ("avg & max", ["avg", "max"])):
        layer = first_attention(cells[label])
        assert isinstance(layer, CBAM) and layer.spatial is None
        assert layer.channel.pool_types == pools
    assert cells["avg"].paper.top1_err == 23.14 and cells["max"].paper.top5_err == 6.83


def test_spatial_cells():
    cells = cells_by_label(tables.SPATIAL)
    expected = {
        "1x1 conv, k = 3": (nn.Conv2d, 3, 22.96),
        "1x1 conv, k = 7": (nn.Conv2d, 7, 22.90),
        "channel pooling, k = 3": (ChannelPool, 3, 22.68),
        "channel pooling, k = 7 (CBAM)": (ChannelPool, 7, 22.66),
    }
    for label, (compress, k, paper_top1) in expected.items():
        layer = first_attention(cells[label])
        assert isinstance(layer.spatial.compress, compress), label
        assert layer.spatial.conv.kernel_size == (k, k), label
        assert layer.channel.pool_types == ["avg", "max"] and layer.order == "channel_spatial"
        assert cells[label].paper.top1_err == paper_top1
    assert first_attention(cells["channel attention only (avg & max)"]).spatial is None


def test_arrangement_cells():
    orders = {c.label: first_attention(c).order for c in tables.ARRANGEMENT.cells[1:]}
    assert orders == {
        "channel -> spatial (CBAM)": "channel_spatial",
        "spatial -> channel": "spatial_channel",
        "channel + spatial in parallel": "parallel",
    }


def test_architectures_table_and_model_specs():
    table = tables.architectures(["resnet20", "wide_resnet18(widen=1.5)"])
    assert [(c.model, c.attention) for c in table.cells] == [
        ("resnet20", None), ("resnet20", "se"), ("resnet20", "cbam"),
        ("wide_resnet18", None), ("wide_resnet18", "se"), ("wide_resnet18", "cbam"),
    ]  # fmt: skip
    assert table.cells[0].paper is None  # the paper has no CIFAR ResNets
    wide_cbam = table.cells[5]
    assert wide_cbam.model_kwargs == {"widen": 1.5}
    assert (wide_cbam.paper.params_m, wide_cbam.paper.gflops) == (26.08, 3.868)
    config = wide_cbam.configure(load_config("small"), seed=2)
    assert (config.model, config.model_kwargs, config.seed) == ("wide_resnet18", {"widen": 1.5}, 2)
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        tables.parse_model("resnet5")
    with pytest.raises(ValueError, match="NAME"):
        tables.parse_model("resnet20(widen")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        tables.parse_model("wide_resnet18(1.5)")


def test_get_tables_and_errors():
    assert [t.name for t in tables.get_tables(["all"])] == list(tables.TABLE_NAMES)
    assert tables.get_tables(["spatial", "all"])[0].name == "spatial"
    with pytest.raises(ValueError, match=r"unknown table 'spatal'.*did you mean 'spatial'"):
        tables.get_tables(["spatal"])


def test_cells_merge_recipe_attention_kwargs_but_baseline_has_none():
    base = load_config("small", {"attention_kwargs": {"reduction": 4}})
    cells = cells_by_label(tables.SPATIAL)
    assert cells["1x1 conv, k = 3"].configure(base, 0).attention_kwargs == {
        "reduction": 4, "spatial": "conv1x1", "kernel_size": 3,
    }  # fmt: skip
    assert cells["no attention (baseline)"].configure(base, 0).attention_kwargs == {}


# ----------------------------------------------------------------------------------- grid


def test_run_folders_are_shared_between_tables_and_distinct_per_seed(tmp_path):
    base = load_config("small")
    spatial_cbam = grid.cell_config(base, tables.SPATIAL.cells[-1], 0, tmp_path)
    arrangement_cbam = grid.cell_config(base, tables.ARRANGEMENT.cells[1], 0, tmp_path)
    assert spatial_cbam.output == arrangement_cbam.output
    assert Path(spatial_cbam.output).parent == tmp_path / "runs"
    other_seed = grid.cell_config(base, tables.SPATIAL.cells[-1], 1, tmp_path)
    conv = grid.cell_config(base, tables.SPATIAL.cells[2], 0, tmp_path)
    assert len({spatial_cbam.output, other_seed.output, conv.output}) == 3
    assert Path(conv.output).name.startswith("resnet20-cbam-kernel_size=3-spatial=conv1x1-seed0-")
    # execution-only settings do not change the folder; anything else does
    quiet = load_config("small", {"workers": 2, "log_every": 7})
    assert grid.cell_config(quiet, tables.SPATIAL.cells[2], 0, tmp_path).output == conv.output
    longer = load_config("small", {"epochs": 5})
    assert grid.cell_config(longer, tables.SPATIAL.cells[2], 0, tmp_path).output != conv.output


class FakeTrain:
    """Stands in for the trainer: writes what a run writes, optionally stopping once."""

    def __init__(self, interrupt: set[str] = frozenset()):
        self.calls: list[tuple[str, object]] = []
        self.interrupt = set(interrupt)

    def __call__(self, config, resume=None, overrides=None):
        self.calls.append((config.output, resume))
        run_dir = Path(config.output if resume in (None, "auto") else resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        if config.output in self.interrupt:
            self.interrupt.discard(config.output)
            save_checkpoint(run_dir, nn.Linear(1, 1), {"step": 1, "epoch": 0, "batch_in_epoch": 1})
            return SimpleNamespace(interrupted=True)
        with open(run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["test_top1_err", "test_top5_err", "train_images_per_s",
                             "epoch_seconds", "params"])  # fmt: skip
            for _ in range(config.epochs):
                writer.writerow([10 + config.seed, 1, 100, 6, 1000])
        done = {"step": 2, "epoch": config.epochs, "batch_in_epoch": 0}
        save_checkpoint(run_dir, nn.Linear(1, 1), done)
        return SimpleNamespace(interrupted=False)


def test_grid_reuses_finished_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch):
    base = load_config("small", {"epochs": 2})
    configs = [grid.cell_config(base, c, s, tmp_path) for s in (0, 1) for c in tables.SPATIAL.cells]
    fake = FakeTrain(interrupt={configs[3].output})
    monkeypatch.setattr(runs, "train", fake)

    first = grid.run_grid(configs, log=lambda line: None)
    assert first.interrupted and len(first.finished) == 3 and len(fake.calls) == 4

    second = grid.run_grid(configs, log=lambda line: None)
    assert second.complete and len(second.finished) == len(configs)
    assert fake.calls[4] == (configs[3].output, "auto")  # resumed
    assert len(fake.calls) == len(configs) + 1  # the three finished runs were not retrained

    third = grid.run_grid(configs, log=lambda line: None)
    assert third.complete and len(fake.calls) == len(configs) + 1

    record = json.loads((Path(configs[3].output) / "cell.json").read_text())
    assert record["config"]["attention_kwargs"] == {"spatial": "conv1x1"}
    assert record["config"]["seed"] == 0
    assert len(record["trained_with"]) == 2  # started, then resumed
    assert {"cbam", "torch", "torchvision", "python"} <= set(record["trained_with"][0])
    assert record["rerun_alone"].startswith("cbam train --config ")


def test_train_or_reuse_trains_an_unfinished_run_and_refuses_another(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(runs, "train", fake)
    config = load_config("small", {"output": str(tmp_path / "run"), "epochs": 1})
    (tmp_path / "run").mkdir()
    save_config(config, tmp_path / "run" / "config.yaml")  # killed before its first checkpoint
    assert runs.train_or_reuse(config)
    assert fake.calls == [(config.output, "auto")]  # the trainer starts it afresh
    assert runs.train_or_reuse(config) and len(fake.calls) == 1  # finished: reused
    other = load_config("small", {"output": str(tmp_path / "run"), "epochs": 1, "lr": 0.05})
    with pytest.raises(ValueError, match=r"another config.*lr: 0\.1 there, 0\.05 now"):
        runs.train_or_reuse(other)


def test_jobs_are_checked_against_the_cores():
    cores = grid.available_cores()
    assert grid.check_jobs(cores) == cores
    for jobs in (0, cores + 1):
        with pytest.raises(ValueError, match=f"--jobs {jobs}: .*{cores} CPU core"):
            grid.check_jobs(jobs)


# --------------------------------------------------------------------------------- report


def summary(seed_err: float, top5: float = 1.0) -> RunSummary:
    return RunSummary(Path("run"), 1, 1000, seed_err, top5, seed_err, 100.0, 1.0)


def test_report_rows_markdown_csv_and_chart(tmp_path):
    table = tables.CHANNEL_POOLING
    base, avg, most, both = table.cells
    cells = [
        CellRuns(base, "resnet20", {0: summary(10.0), 1: summary(12.0), 2: summary(11.0)}, 1000,
                 40_000_000),
        CellRuns(avg, "resnet20", {0: summary(9.0), 1: summary(11.5), 2: summary(9.0)}, 1100,
                 40_100_000),
        CellRuns(most, "resnet20", {1: summary(13.0)}, 1100, 40_100_000),
        CellRuns(both, "resnet20", {}, 1100, 40_100_000),
    ]  # fmt: skip
    rows = summarize(cells)
    assert rows[0].d_top1 is None and rows[0].is_baseline
    assert rows[1].d_top1.mean == pytest.approx(-3.5 / 3)
    assert rows[1].paper_d_top1 == pytest.approx(23.14 - 24.56)
    assert rows[2].d_top1.n == 1 and rows[3].d_top1 is None

    text = markdown(table, rows, "setup line")
    assert "| resnet20 | no attention (baseline) | 3 | 11.00 ± 1.00 |" in text
    assert "-1.17 [-3.06, +0.73]" in text
    assert "13.00 (1 seed)" in text and "+1.00 (1 seed: no interval)" in text
    assert "| avg & max | 0 | not run | not run | not run | not run |" in text
    assert "| 24.56 / 7.50 | baseline | 25.56 / 3.858 |" in text
    assert "| 23.14 / 6.70 | -1.42 | 28.09 / 3.860 |" in text

    files, skipped = write_report(table, rows, "setup line", tmp_path, ["a note"])
    names = {p.name for p in files}
    assert {"channel-pooling.md", "channel-pooling.csv", "channel-pooling_runs.csv"} <= names
    if skipped is None:
        assert (tmp_path / "channel-pooling.png").stat().st_size > 1000
    with open(tmp_path / "channel-pooling.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert float(lines[1]["d_top1_err_low"]) == pytest.approx(rows[1].d_top1.low, abs=1e-4)
    assert lines[0]["top1_err_std"] == "1" and lines[0]["gflops"] == "0.04"
    assert lines[1]["attention_kwargs"] == '{"pool_types": ["avg"], "spatial": null}'
    with open(tmp_path / "channel-pooling_runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 7  # every finished run, seed by seed


# ----------------------------------------------------------------------------- end to end


def test_reproduce_command_end_to_end_then_reused(tmp_path, capsys):
    args = ["reproduce", "arrangement", "--quick", *TINY, "--output", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "## Arrangement" in out and "| resnet20 | spatial -> channel | 2 |" in out
    for suffix in (".md", ".csv", "_runs.csv", ".png"):
        assert (tmp_path / f"arrangement{suffix}").is_file()
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 8  # 4 cells x 2 seeds
    record = json.loads((run_dirs[0] / "cell.json").read_text())
    assert record["config"]["train_subset"] == 64 and record["config"]["epochs"] == 1

    assert main(args) == 0  # everything finished: nothing is trained again
    out = capsys.readouterr().out
    assert "epoch 1/1" not in out and "reusing 8 finished run(s); 0 to train" in out


def test_reproduce_rejects_bad_options(capsys):
    assert main(["reproduce", "architectures", "--models", "resnet5", *TINY]) == 2
    assert "unknown model 'resnet5'" in capsys.readouterr().err
    assert main(["reproduce", "spatial", "--jobs", "1000", *TINY]) == 2
    assert "--jobs 1000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "spatal"])
    assert "invalid choice: 'spatal'" in capsys.readouterr().err


@pytest.mark.skipif(grid.available_cores() < 2, reason="needs 2 cores for 2 workers")
def test_parallel_workers(tmp_path, capsys):
    args = ["reproduce", "channel-pooling", *TINY, "--seeds", "1", "--jobs", "2"]
    assert main([*args, "--output", str(tmp_path)]) == 0
    logs = list((tmp_path / "runs").glob("*/train.log"))
    assert len(logs) == 4 and all("epoch 1/1" in p.read_text() for p in logs)
    record = json.loads((logs[0].parent / "cell.json").read_text())
    assert record["trained_with"][0]["jobs"] == 2
    assert record["trained_with"][0]["torch_threads"] == grid.available_cores() // 2


@pytest.mark.slow
def test_quick_spatial(tmp_path):
    assert main(["reproduce", "spatial", "--quick", "--output", str(tmp_path)]) == 0
    with open(tmp_path / "spatial.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["seeds"] == "2" for r in rows)
    assert all(r["d_top1_err_low"] for r in rows[1:])  # an interval for every non-baseline row
