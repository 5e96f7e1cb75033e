"""`cbam train`: a YAML recipe plus command-line overrides -> a run folder."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cbam.training.config import DATA_PATHS, RECIPES, parse_value


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The options shared by `train` and `compare`; each is a config override when given."""
    parser.add_argument(
        "--config", default="small", metavar="RECIPE",
        help=f"a recipe ({', '.join(RECIPES)}) or a YAML file (default: small)",
    )  # fmt: skip
    options: list[tuple[str, Any, str]] = [
        ("--model", str, "registered model name (cbam.list_models())"),
        ("--dataset", str, "fashion-mnist, cifar10, cifar100 or imagefolder"),
        ("--data-dir", str, "data folder (Fashion-MNIST: found automatically)"),
        ("--image-size", int, "side in pixels (default: the data set's, or the images' own)"),
        ("--epochs", int, "number of epochs"),
        ("--batch-size", int, "global batch size (split over processes)"),
        ("--lr", float, "learning rate per base_batch_size images (scaled linearly)"),
        ("--seed", int, "seed for initialisation, data order and augmentation"),
        ("--output", str, "run folder"),
        ("--train-subset", int, "use the first N training images"),
        ("--test-subset", int, "use the first N test images"),
        ("--device", str, "auto, cpu, cuda, cuda:1, ..."),
        ("--workers", int, "data-loader worker processes"),
        ("--checkpoint-every", int, "also checkpoint every N optimizer steps"),
        ("--checkpoint-minutes", float, "also checkpoint every M minutes of training"),
        ("--attach", str, "torchvision:/timm: models: attention to attach (e.g. cbam)"),
        ("--attach-placement", str, "auto, residual, replace-se or stage (default: auto)"),
        ("--pretrained", str, "torchvision:/timm: models: local weights file to start from"),
    ]
    for flag, kind, text in options:
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], help="mixed precision")
    parser.add_argument(
        "--data-path", choices=DATA_PATHS,
        help="tensor: the data set as one tensor on the device, augmented a batch at a time; "
        "per-sample: torchvision transforms per image; auto (default): tensor when it fits",
    )  # fmt: skip
    for flag, text in (
        ("--channels-last", "channels_last memory format"),
        ("--compile", "torch.compile the model"),
        ("--sync-bn", "SyncBatchNorm under DDP"),
        ("--strict-data", "stop at an unreadable image instead of skipping it"),
        ("--deterministic", "torch.use_deterministic_algorithms(True)"),
    ):
        parser.add_argument(flag, action="store_true", default=None, help=text)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any config key, value in YAML syntax (e.g. --set ema_decay=0.999 "
        "--set 'attention_kwargs={kernel_size: 3}'); repeatable",
    )  # fmt: skip


def overrides_from(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Config overrides from the options the user gave (None means not given)."""
    reserved = {"config", "set", "run", "command", "resume", *skip}
    values = {k: v for k, v in vars(args).items() if k not in reserved and v is not None}
    if values.get("amp") == "off":
        values["amp"] = None
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        key = key.strip().replace("-", "_")
        values[key] = parse_value(text, f"--set {key}")
    return values


def cmd_train(args: argparse.Namespace) -> int:
    from cbam.training import TrainingDiverged, load_config, train
    from cbam.training.distributed import PeersLost
    from cbam.training.trainer import AUTO, RunFinished

    overrides = overrides_from(args)
    try:
        if args.resume == AUTO:
            result = train(load_config(args.config, overrides), resume=AUTO)
        elif args.resume:
            result = train(load_config(None), resume=args.resume, overrides=overrides)
        else:
            result = train(load_config(args.config, overrides))
    except RunFinished as done:
        if args.resume != AUTO:
            raise
        print(f"cbam train: nothing to do: {done}")
        return 0
    except TrainingDiverged as error:
        print(f"cbam train: {error}", file=sys.stderr)
        return 3
    except PeersLost as error:
        print(f"cbam train: {error}", file=sys.stderr)
        return 4
    return 130 if result.interrupted else 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="train a model (single process, or many under torchrun)"
    )
    add_training_options(parser)
    parser.add_argument("--attention", help="none, se, bam or cbam")
    parser.add_argument(
        "--resume", metavar="RUN_DIR|auto",
        help="continue the run in RUN_DIR; `auto`: continue the one in --output from its "
        "newest complete checkpoint, or start it when there is none (for restart loops)",
    )  # fmt: skip
    parser.set_defaults(run=cmd_train)
