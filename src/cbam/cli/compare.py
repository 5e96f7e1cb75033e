"""`cbam compare`: the same recipe with and without attention, test errors side by side.
`make main` runs it on Fashion-MNIST."""

from __future__ import annotations

import argparse

from cbam.cli.train import add_training_options, overrides_from


def cmd_compare(args: argparse.Namespace) -> int:
    from cbam.training import load_config
    from cbam.training.compare import compare_attentions

    overrides = overrides_from(args, skip=("attentions",))
    output = overrides.pop("output", "runs/compare")
    config = load_config(args.config, overrides)
    rows = compare_attentions(config, args.attentions, output)
    if rows:
        print(f"\n{config.model} on {config.dataset}, {config.epochs} epochs, seed {config.seed}:")
        print("| attention | params (M) | test top-1 err % | test top-5 err % | best top-1 err % "
              "| train img/s | minutes | run folder |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r.attention} | {r.params / 1e6:.3f} | {r.test_top1_err:.2f} | "
                f"{r.test_top5_err:.2f} | {r.best_top1_err:.2f} | {r.train_images_per_s:.0f} | "
                f"{r.minutes:.1f} | {r.run_dir} |"
            )
    if len(rows) < len(args.attentions):
        print("interrupted: run the same command again to resume")
        return 130
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare", help="train one recipe with several attentions, report side by side"
    )
    add_training_options(parser)
    parser.add_argument("--attentions", nargs="+", default=["none", "cbam"],
                        help="default: none cbam")  # fmt: skip
    parser.set_defaults(run=cmd_compare)
