"""Training, resume, DDP and evaluation on tiny Fashion-MNIST subsets (CPU, seconds each)."""

import csv
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbam.training import TrainingDiverged, load_config, train
from cbam.training.config import TrainConfig
from cbam.training.eval_run import evaluate_source
from cbam.training.trainer import lr_factor

TINY = dict(train_subset=192, test_subset=96, batch_size=32, epochs=2, log_every=1, warmup_epochs=0)


def tiny(tmp_path: Path, name: str = "run", **kwargs) -> TrainConfig:
    return load_config("small", {**TINY, "output": str(tmp_path / name), **kwargs})


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]


def test_training_lowers_the_loss_and_writes_the_run_folder(tmp_path):
    result = train(tiny(tmp_path, epochs=3, lr=0.05))
    run = result.run_dir
    for name in ("config.yaml", "metrics.csv", "last.safetensors", "best.safetensors"):
        assert (run / name).is_file(), name
    # the newest two epoch-end checkpoints; last.safetensors is the newest's weights
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    names = ("json", "pt", "safetensors")
    assert kept == [f"step{s:09d}-epoch{e:04d}-batch000000.{x}" for s, e in ((12, 2), (18, 3))
                    for x in names]  # fmt: skip
    assert (run / "last.safetensors").read_bytes() == (run / "checkpoints" / kept[-1]).read_bytes()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    metrics = rows(run)
    assert [int(r["epoch"]) for r in metrics] == [1, 2, 3]
    assert float(metrics[-1]["train_loss"]) < float(metrics[0]["train_loss"])
    assert float(metrics[-1]["test_loss"]) < math.log(10)  # better than chance
    assert result.best_top1_err == min(float(r["test_top1_err"]) for r in metrics)
    assert int(metrics[0]["params"]) == sum(p.numel() for p in result.model.parameters())


def interrupt_at(when: int, signum: int):
    def on_step(step: int, model: torch.nn.Module) -> None:
        if step == when:
            os.kill(os.getpid(), signum)

    return on_step


@pytest.mark.parametrize("data_path", ["tensor", "per-sample"])
def test_resume_after_interrupt_is_bit_identical(tmp_path, data_path):
    reference = train(tiny(tmp_path, "straight", data_path=data_path))
    # Ctrl-C mid-epoch 1 (6 steps per epoch), then SIGTERM mid-epoch 2 of the resumed run.
    stopped = train(
        tiny(tmp_path, "stopped", data_path=data_path), on_step=interrupt_at(4, signal.SIGINT)
    )
    assert stopped.interrupted and not (stopped.run_dir / "metrics.csv").exists()
    stopped = train(
        load_config(None), resume=stopped.run_dir, on_step=interrupt_at(9, signal.SIGTERM)
    )
    assert stopped.interrupted and len(rows(stopped.run_dir)) == 1
    resumed = train(load_config(None), resume=stopped.run_dir)
    assert not resumed.interrupted
    assert_same_weights(
        reference.run_dir / "last.safetensors", resumed.run_dir / "last.safetensors"
    )
    columns = ("epoch", "step", "lr", "train_loss", "train_top1_err", "test_loss", "test_top1_err")
    expected = [[r[c] for c in columns] for r in rows(reference.run_dir)]
    assert [[r[c] for c in columns] for r in rows(resumed.run_dir)] == expected


def test_eval_reproduces_the_logged_test_error(tmp_path):
    result = train(tiny(tmp_path, epochs=1))
    logged = rows(result.run_dir)[-1]
    metrics, classes, _ = evaluate_source(result.run_dir, "last")
    assert metrics.top1_err == pytest.approx(float(logged["test_top1_err"]), abs=1e-9)
    assert metrics.top5_err == pytest.approx(float(logged["test_top5_err"]), abs=1e-9)
    assert metrics.images == 96 and len(metrics.per_class_acc) == len(classes) == 10
    # A bare weights file evaluates the same with the model named explicitly.
    bare, _, _ = evaluate_source(
        result.run_dir / "last.safetensors", overrides={"model": "resnet20", "test_subset": 96,
                                                         "batch_size": 32})  # fmt: skip
    assert bare.top1_err == pytest.approx(metrics.top1_err)


def _ddp_worker(rank: int, world: int, port: int, config: TrainConfig, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    result = train(config)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))


@pytest.mark.parametrize("data_path", ["tensor", "per-sample"])
def test_two_process_gloo_training_agrees_across_ranks(tmp_path, data_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tiny(tmp_path, "ddp", epochs=1, data_path=data_path)
    mp.spawn(_ddp_worker, args=(2, port, config, str(tmp_path)), nprocs=2, join=True)
    run = tmp_path / "ddp"
    assert_same_weights(run / "last.safetensors", tmp_path / "rank0.safetensors")
    assert_same_weights(run / "last.safetensors", tmp_path / "rank1.safetensors")
    metrics = rows(run)
    assert len(metrics) == 1 and int(metrics[0]["step"]) == 6  # 192 images / batch 32
    evaluated, _, _ = evaluate_source(run, "last")
    assert evaluated.top1_err == pytest.approx(float(metrics[0]["test_top1_err"]), abs=1e-9)


def test_lr_schedule():
    config = load_config("small", {"epochs": 10, "warmup_epochs": 1, "schedule": "cosine"})
    assert lr_factor(0, 10, config) == pytest.approx(0.1)
    assert lr_factor(9, 10, config) == pytest.approx(1.0)
    assert lr_factor(10, 10, config) == pytest.approx(1.0)
    assert lr_factor(55, 10, config) == pytest.approx(0.5)
    assert lr_factor(100, 10, config) == pytest.approx(0.0)
    step = load_config("imagenet", {"epochs": 90})
    assert [lr_factor(e * 10, 10, step) for e in (0, 29, 30, 60, 89)] == pytest.approx(
        [1, 1, 0.1, 0.01, 0.01]
    )
    assert step.scaled_lr == pytest.approx(0.1)
    assert load_config("imagenet", {"batch_size": 1024}).scaled_lr == pytest.approx(0.4)


# ---- bad input: each a clear message, nothing lost ------------------------------------


def test_unknown_config_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'epoch'.*did you mean 'epochs'"):
        load_config("small", {"epoch": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet20\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'learning_rate'"):
        load_config(bad)


def test_missing_and_empty_data_folders(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist"):
        train(tiny(tmp_path, data_dir=str(tmp_path / "nowhere")))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ValueError, match=r"no images found in .*train"):
        train(tiny(tmp_path, dataset="imagefolder", data_dir=str(tmp_path / "empty")))
    assert not (tmp_path / "run").exists()


def test_corrupt_image_is_skipped_and_counted_or_stops_with_strict(tmp_path, image_tree):
    image_tree(tmp_path / "images", broken=True)
    options = dict(dataset="imagefolder", data_dir=str(tmp_path / "images"), image_size=16,
                   batch_size=3, epochs=1, train_subset=None, test_subset=None)  # fmt: skip
    with pytest.warns(UserWarning, match=r"broken.png"):
        result = train(tiny(tmp_path, "lenient", **options))
    assert int(rows(result.run_dir)[0]["skipped_images"]) == 1
    with pytest.raises(ValueError, match=r"unreadable image .*broken.png.*strict"):
        train(tiny(tmp_path, "strict", strict_data=True, **options))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    first = train(tiny(tmp_path, epochs=1))
    good = (first.run_dir / "last.safetensors").read_bytes()

    def poison(step: int, model: torch.nn.Module) -> None:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss is nan.*last good checkpoint"):
        train(load_config(None), resume=first.run_dir, overrides={"epochs": 2}, on_step=poison)
    assert (first.run_dir / "last.safetensors").read_bytes() == good


def test_resume_refusals(tmp_path):
    done = train(tiny(tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"already finished all 1 epochs"):
        train(load_config(None), resume=done.run_dir)
    with pytest.raises(ValueError, match=r"already holds a run.*--resume"):
        train(tiny(tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"only .*may change, not \['lr'\]"):
        train(load_config(None), resume=done.run_dir, overrides={"lr": 1.0, "epochs": 2})
    with pytest.raises(ValueError, match=r"nothing to resume"):
        train(load_config(None), resume=tmp_path / "nothing")


def test_checkpoint_from_another_model(tmp_path):
    done = train(tiny(tmp_path, epochs=1))
    fits = r"(?s)does not fit.*missing key.*layer1\.3.*fits create_model\('resnet20'"
    with pytest.raises(ValueError, match=fits):
        evaluate_source(done.run_dir / "best.safetensors", overrides={"model": "resnet32"})
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((done.run_dir / "best.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut.safetensors"):
        evaluate_source(truncated, overrides={"model": "resnet20"})


def test_amp_channels_last_accumulation_and_ema(tmp_path):
    config = tiny(tmp_path, epochs=1, amp="bf16", channels_last=True, accumulate=2,
                  ema_decay=0.9, optimizer="adamw", lr=0.002, label_smoothing=0.1)  # fmt: skip
    result = train(config)
    metrics = rows(result.run_dir)
    assert int(metrics[0]["step"]) == 3  # 6 batches, 2 per optimizer step
    assert math.isfinite(float(metrics[0]["test_loss"]))
    state = torch.load(next((result.run_dir / "checkpoints").glob("*.pt")), weights_only=True)
    assert state["ema"] is not None and state["optimizer"]["state"]
    # best.safetensors holds the EMA weights the test error was measured with.
    evaluated, _, _ = evaluate_source(result.run_dir, "best")
    assert evaluated.top1_err == pytest.approx(float(metrics[0]["test_top1_err"]), abs=1e-9)


@pytest.mark.slow
def test_compiled_training_matches_eager_closely(tmp_path):
    eager = train(tiny(tmp_path, "eager", epochs=1))
    compiled = train(tiny(tmp_path, "compiled", epochs=1, compile=True))
    we = weights(eager.run_dir / "last.safetensors")
    wc = weights(compiled.run_dir / "last.safetensors")
    # inductor reorders float sums; six SGD steps amplify that to a few 1e-4 on some weights
    for key in we:
        torch.testing.assert_close(wc[key], we[key], rtol=1e-3, atol=5e-4)


def test_eval_reads_an_authors_format_checkpoint(tmp_path):
    """Our weights renamed to the CBAM authors' keys and wrapped as their training script
    saves them (REFERENCE.md section 1) evaluate exactly like the run itself."""
    done = train(tiny(tmp_path, epochs=1))
    renames = {
        "attention.channel.mlp.0.": "cbam.ChannelGate.mlp.1.",
        "attention.channel.mlp.2.": "cbam.ChannelGate.mlp.3.",
        "attention.spatial.conv.": "cbam.SpatialGate.spatial.conv.",
        "attention.spatial.bn.": "cbam.SpatialGate.spatial.bn.",
    }
    official = {}
    for key, value in weights(done.run_dir / "best.safetensors").items():
        for ours, theirs in renames.items():
            key = key.replace(ours, theirs)
        official[f"module.{key}"] = value
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet", "state_dict": official, "best_prec1": 0.0}, path)
    run_metrics, _, _ = evaluate_source(done.run_dir, "best")
    official_metrics, _, _ = evaluate_source(
        path, overrides={"model": "resnet20", "test_subset": 96, "batch_size": 32}
    )
    assert official_metrics.top1_err == pytest.approx(run_metrics.top1_err, abs=1e-9)
    assert official_metrics.loss == pytest.approx(run_metrics.loss, rel=1e-6)
