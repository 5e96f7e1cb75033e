"""The 1-D / 3-D example (`python -m cbam.reproduce.nd`, docs/nd.md) at a tiny scale: its data
are reproducible from the seed, its models are of the task's dimensionality with CBAM on
every block, and a grid writes its report with the paired difference."""

import torch

from cbam import CBAM
from cbam.reproduce import nd


def test_data_follow_the_seed_and_hold_every_class():
    for make, shape in ((nd.signals, (50, 2, 256)), (nd.volumes, (50, 1, 16, 16, 16))):
        x1, y1 = make(50, torch.Generator().manual_seed(3))
        x2, y2 = make(50, torch.Generator().manual_seed(3))
        assert x1.shape == shape and torch.equal(x1, x2) and torch.equal(y1, y2)
        assert set(y1.tolist()) == set(range(nd.CLASSES))


def test_models_have_cbam_of_their_dimensionality():
    for task, spec in nd.SPECS.items():
        model = nd.SmallResNet(spec, "cbam")
        layers = [m for m in model.modules() if isinstance(m, CBAM)]
        assert len(layers) == 6 and {m.spatial_dims for m in layers} == {spec.dims}, task
        assert not any(isinstance(m, CBAM) for m in nd.SmallResNet(spec, "none").modules())


def test_a_tiny_grid_writes_its_report(tmp_path, monkeypatch):
    real_run = nd.run
    monkeypatch.setattr(nd, "run", lambda task, attention, seed: real_run(task, attention, seed,
                                                                        scale=0.03))  # fmt: skip
    assert nd.main(["--output", str(tmp_path), "--seeds", "2", "--tasks", "signal"]) == 0
    text = (tmp_path / "nd.md").read_text()
    assert "| signal (1-D) | none |" in text and "| signal (1-D) | cbam |" in text
    assert "(n=2)" in text  # the paired difference over both seeds
    rows = (tmp_path / "nd.csv").read_text().splitlines()
    assert len(rows) == 1 + 4


def test_the_nd_benchmark_measures_every_row():
    from cbam.bench import nd as bench_nd

    rows = bench_nd.measure(channels=16, batch=2, repeats=2)
    variants = {(r["dims"], r["variant"]) for r in rows}
    assert variants == {(d, v) for d in (1, 2, 3) for v in ("conv3 + BN", "CBAM reference")} | {
        (2, "CBAM fused")
    }
    assert all(r["ms"] > 0 for r in rows)
    assert "| 3-D | 8 x 10 x 10 | CBAM reference |" in bench_nd.markdown(rows, 16, 2)
