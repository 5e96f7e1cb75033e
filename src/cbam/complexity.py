"""Parameter and multiply-accumulate counts, the paper's "Params" and "GFLOPs" columns.

Convention: MACs = FLOPs / 2 as counted by `torch.utils.flop_counter.FlopCounterMode`, which
counts convolutions and matrix multiplications (so the attention MLPs and the spatial conv)
and nothing else: pooling, BatchNorm, activations and the gate multiplies are free. The
models are built and run on the meta device, so counting a ResNet-152 takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cbam.models import create_model, list_models, model_entry
from cbam.paper import PaperResult, config_label, paper_result

# Variants the paper reports beside each model's default configuration.
PAPER_VARIANTS: dict[str, list[dict[str, Any]]] = {
    "wide_resnet18": [{"widen": 1.5}, {"widen": 2.0}],
    "mobilenet_v1": [{"width_mult": 1.0}, {"width_mult": 0.7}],
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a 1 x in_chans x size x size input."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class ComplexityRow:
    label: str
    attention: str
    input_size: int
    num_classes: int
    params: int
    macs: int
    baseline_macs: int
    paper: PaperResult | None
    paper_baseline: PaperResult | None

    @property
    def macs_increment(self) -> int:
        return self.macs - self.baseline_macs


def measure(
    model: str, attention: str | None = None, input_size: int | None = None, **kwargs: Any
) -> tuple[int, int]:
    """(parameters, MACs) of a registered model at its paper's input size and head."""
    entry = model_entry(model)
    kwargs.setdefault("num_classes", entry.num_classes)
    with torch.device("meta"):
        net = create_model(model, attention=attention, **kwargs)
    return count_parameters(net), count_macs(net, input_size or entry.input_size)


def complexity_table(
    models: Iterable[str] | None = None, attentions: Iterable[str] = ("none", "se", "cbam")
) -> list[ComplexityRow]:
    """One row per model configuration x attention; MAC increments are against "none"."""
    rows = []
    for name in models if models is not None else list_models():
        entry = model_entry(name)
        for variant in PAPER_VARIANTS.get(name, [{}]):
            label = config_label(name, variant)
            _, baseline_macs = measure(name, None, **variant)
            for attention in attentions:
                params, macs = measure(name, attention, **variant)
                rows.append(
                    ComplexityRow(
                        label=label,
                        attention=attention,
                        input_size=entry.input_size,
                        num_classes=entry.num_classes,
                        params=params,
                        macs=macs,
                        baseline_macs=baseline_macs,
                        paper=paper_result(label, attention),
                        paper_baseline=paper_result(label, "none"),
                    )
                )
    return rows
