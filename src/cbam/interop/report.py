"""`attach_report`: where attention would go in a model, what it adds, and what was skipped."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cbam.complexity import count_macs, count_parameters
from cbam.interop.attach import apply_plan, layer_builder, plan_attach
from cbam.interop.placements import Site, Skipped

WHOLE = "(whole model)"


@dataclass
class AttachReport:
    model: str
    placement: str
    body: str
    sites: list[Site]
    skipped: list[Skipped]
    params: int  # of the plain model
    params_added: int
    macs: int | None = None  # of the plain body, one image at `input_size`
    macs_added: int | None = None
    input_size: int = 224
    notes: list[str] = field(default_factory=list)


def attach_report(
    model: nn.Module,
    attention: Any = "cbam",
    placement: str = "auto",
    *,
    name: str | None = None,
    input_size: int | None = 224,
    identity_init: bool = True,
    replace: bool = False,
    example_input: torch.Tensor | None = None,
    in_place: bool = False,
    **attention_kwargs: Any,
) -> AttachReport:
    """What `attach` does to `model`: on a copy (`model` is not changed) unless `in_place`,
    which is `attach(..., report=True)`. `input_size=None` skips MACs. Params and MACs are
    those of the model as given."""
    build = layer_builder(attention, attention_kwargs)  # a bad name fails before the trace
    target = model if in_place else copy.deepcopy(model)
    plan = plan_attach(target, placement, replace=replace, example_input=example_input)
    body = model.get_submodule(plan.body)
    in_chans = next((m.in_channels for m in body.modules() if isinstance(m, nn.Conv2d)), 3)
    params = count_parameters(model)
    macs, notes = None, []
    if input_size is not None:
        try:
            macs = count_macs(body, input_size, in_chans)
        except RuntimeError as error:  # SSD300's extra layers need more than 224 px
            notes.append(f"MACs not counted: the model does not run at {input_size} px "
                         f"({str(error).splitlines()[0]}); pass input_size=")  # fmt: skip
    attached = apply_plan(target, plan, build, attention, identity_init=identity_init,
                          replace=replace)  # fmt: skip
    report = AttachReport(
        name or type(model).__name__, plan.placement, plan.body or WHOLE,
        plan.sites, plan.skipped, params, count_parameters(attached) - params, notes=notes,
    )  # fmt: skip
    if input_size is not None and macs is not None:
        report.macs = macs
        report.macs_added = count_macs(attached.get_submodule(plan.body), input_size, in_chans)
        report.macs_added -= macs
        report.input_size = input_size
    return report


def format_report(report: AttachReport) -> str:
    lines = [
        f"{report.model}: {len(report.sites)} attention layer(s), placement {report.placement!r}"
        f", in {report.body}",
        f"params: {report.params / 1e6:.3f} M + {report.params_added / 1e6:.4f} M "
        f"({100 * report.params_added / max(report.params, 1):.2f}%)",
    ]
    if report.macs is not None and report.macs_added is not None:
        share = 100 * report.macs_added / max(report.macs, 1)
        lines.append(
            f"MACs at {report.input_size} px: {report.macs / 1e9:.3f} G + "
            f"{report.macs_added / 1e9:.4f} G ({share:.2f}%)"
        )
    prefix = "" if report.body == WHOLE else f"{report.body}."
    width = max((len(prefix + s.path) for s in report.sites), default=4)
    lines.append(f"  {'path':<{width}}  channels  placement")
    for site in report.sites:
        note = f"  ({site.note})" if site.note else ""
        path = prefix + site.path
        lines.append(f"  {path:<{width}}  {site.channels:>8}  {site.placement}{note}")
    for skip in report.skipped:
        lines.append(f"skipped {skip.path or '(model)'}: {skip.reason}")
    lines += report.notes
    return "\n".join(lines)
