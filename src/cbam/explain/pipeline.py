"""`explain()`: the Grad-CAM comparison figure, its numbers, and the gates, in one call."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cbam._errors import unknown_choice
from cbam.explain.figures import Panel, save_cam_grid, save_gate_figure
from cbam.explain.gates import GateStats, capture_gates, channel_gate_stats, has_gates
from cbam.explain.gradcam import (
    cam_class,
    check_feature_layer,
    compute_cams,
    default_layer,
    peak,
    resolve_layer,
)
from cbam.explain.images import Sample
from cbam.explain.models import ExplainModel, check_compatible
from cbam.explain.regions import MaskSpec, peak_in_region, regions_for
from cbam.explain.report import (
    ModelSummary,
    Record,
    summarise,
    write_gate_stats,
    write_records,
    write_summary,
)

TARGETS = ("true", "predicted")


@dataclass
class ExplainResult:
    """What `explain` computed and where it wrote it."""

    records: list[Record]
    summary: list[ModelSummary]
    figures: list[Path]  # the Grad-CAM grid, one PNG per page
    gate_figures: dict[str, list[Path]] = field(default_factory=dict)  # per gated model
    gate_stats: dict[str, list[GateStats]] = field(default_factory=dict)
    tables: list[Path] = field(default_factory=list)  # the CSV files
    notes: list[str] = field(default_factory=list)


def page_paths(folder: Path, stem: str, pages: int) -> list[Path]:
    """stem.png for one page; stem_001.png, stem_002.png, ... for several."""
    if pages == 1:
        return [folder / f"{stem}.png"]
    return [folder / f"{stem}_{k:03d}.png" for k in range(1, pages + 1)]


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def _predict(model: ExplainModel, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Softmax probabilities from a plain forward pass (no hooks anywhere)."""
    with torch.no_grad():
        logits = [
            model.model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)
        ]
    return torch.cat(logits).float().softmax(dim=1).cpu()


def explain(
    models: Sequence[ExplainModel],
    samples: Sequence[Sample],
    output: str | Path,
    method: str = "gradcam",
    layer: str | None = None,
    target: str = "true",
    box: Sequence[int] | None = None,
    mask: MaskSpec | None = None,
    per_page: int = 8,
    gates: bool = True,
    figures: bool = True,
    name: str = "explain",
    display_size: int | None = None,
    gate_scale: str = "block",
    log: Callable[[str], None] | None = print,
) -> ExplainResult:
    """Grad-CAM (or `method`) of every model on the same images, as the paper's figure.

    Writes to `output`: `{name}.png` (paged into `{name}_001.png`, ... beyond `per_page`
    images): the input, then one overlay per model titled with the model, its prediction and
    the true class's softmax probability; `probabilities.csv` (one row per image and model);
    `summary.csv` (per model: accuracy, mean true-class probability, and with a `box` or
    `mask` the share of maps whose peak lies inside it, beside the chance rate); and for models
    with CBAM/SE gates, `gates_{model}.png` pages and `gates_{model}.csv` (channel-gate mean
    and spread per block and stage, over all the images).

    `layer` defaults to each model's last stage; `target` "true" explains the true class
    where it is known (the paper's choice), "predicted" the predicted one. Models are put in
    eval mode. `gate_scale` colours the spatial gates by each block's range ("block") or
    on 0..1 ("fixed"). `figures=False` writes the CSV files only (numbers over many images).
    Maps are computed page by page, so memory does not grow with the
    number of images beyond the (small) gate tensors.
    """
    models, samples = list(models), list(samples)
    layers = _check(models, samples, method, layer, target, per_page)
    classes = models[0].classes
    regions = regions_for(samples, models[0].image_size, box, mask)
    folder = Path(output)
    pages = math.ceil(len(samples) / per_page)
    result = ExplainResult([], [], page_paths(folder, name, pages) if figures else [])

    gated = [m for m in models if gates and has_gates(m.model)]
    captured = {m.name: capture_gates(m.model, m.inputs(samples))[1] for m in gated}
    for m in gated:
        result.gate_stats[m.name] = channel_gate_stats(captured[m.name])
        if figures:
            result.gate_figures[m.name] = page_paths(folder, f"gates_{file_safe(m.name)}", pages)

    records: dict[str, list[Record]] = {m.name: [] for m in models}
    title = f"{method} at {', '.join(sorted(set(layers)))}, {target} class"
    for k in range(pages):
        rows = slice(k * per_page, (k + 1) * per_page)
        page, page_regions = samples[rows], regions[rows]
        display = models[0].display(page).numpy()  # what the first model sees, as RGB
        row_titles = _row_titles(page, classes)
        panels: list[list[Panel]] = [[] for _ in page]
        for m, layer_name in zip(models, layers, strict=True):
            rows_k, panels_k = _explain_page(
                m, page, page_regions, k + 1, method, layer_name, target
            )
            records[m.name] += rows_k
            for i, panel in enumerate(panels_k):
                panels[i].append(panel)
        if not figures:
            continue
        more = f" (page {k + 1} of {pages})" if pages > 1 else ""
        save_cam_grid(result.figures[k], display, row_titles, panels, page_regions,
                      title + more, display_size)  # fmt: skip
        for m in gated:
            page_gates = [g.select(rows) for g in captured[m.name]]
            save_gate_figure(result.gate_figures[m.name][k], m.name, display, row_titles,
                             page_gates, result.gate_stats[m.name], gate_scale)  # fmt: skip

    result.records = [r for m in models for r in records[m.name]]
    result.summary = summarise(result.records, [m.name for m in models])
    result.tables = [
        write_records(folder / "probabilities.csv", result.records),
        write_summary(folder / "summary.csv", result.summary),
    ]
    for m in gated:
        path = folder / f"gates_{file_safe(m.name)}.csv"
        result.tables.append(write_gate_stats(path, result.gate_stats[m.name]))
    if pages > 1 and figures:
        result.notes.append(
            f"{len(samples)} images at {per_page} per page: the figure is split into {pages} "
            f"PNGs, {result.figures[0].name} to {result.figures[-1].name} (set the page size "
            f"with per_page / --per-page)"
        )
    if log is not None:
        for note in result.notes:
            log(f"note: {note}")
    return result


def _check(
    models: list[ExplainModel],
    samples: list[Sample],
    method: str,
    layer: str | None,
    target: str,
    per_page: int,
) -> list[str]:
    """Every argument checked before any work; returns each model's CAM layer."""
    check_compatible(models)
    if not samples:
        raise ValueError("no images to explain")
    if isinstance(per_page, bool) or not isinstance(per_page, int) or per_page < 1:
        raise ValueError(f"per_page must be a positive integer, got {per_page!r}")
    if target not in TARGETS:
        raise unknown_choice("CAM target", target, TARGETS)
    cam_class(method)
    classes = models[0].classes
    for s in samples:
        if s.label is not None and not 0 <= s.label < len(classes):
            raise ValueError(
                f"image {s.name!r} has label {s.label}, outside the models' {len(classes)} classes"
            )
    layers = []
    for m in models:
        m.model.eval()
        chosen = layer or default_layer(m.model)
        module = resolve_layer(m.model, chosen, repr(m.name))
        check_feature_layer(m.model, module, chosen, m.inputs(samples[:1]))
        layers.append(chosen)
    return layers


def _explain_page(
    m: ExplainModel,
    samples: list[Sample],
    regions: list[np.ndarray | None],
    page: int,
    method: str,
    layer: str,
    target: str,
) -> tuple[list[Record], list[Panel]]:
    """One model on one page of images: its records and its column of the figure."""
    classes = m.classes
    inputs = m.inputs(samples)
    probs = _predict(m, inputs)
    predicted = probs.argmax(dim=1).tolist()
    wanted = [
        s.label if target == "true" and s.label is not None else p
        for s, p in zip(samples, predicted, strict=True)
    ]
    cams = compute_cams(m.model, inputs, wanted, method, layer)
    records, panels = [], []
    for i, s in enumerate(samples):
        top = peak(cams[i])
        p_true = None if s.label is None else float(probs[i, s.label])
        p_predicted = float(probs[i, predicted[i]])
        correct = None if s.label is None else predicted[i] == s.label
        records.append(
            Record(
                image=s.name, page=page, model=m.name,
                true_class="" if s.label is None else classes[s.label],
                predicted_class=classes[predicted[i]], p_true=p_true, p_predicted=p_predicted,
                correct=correct, cam_method=method, cam_layer=layer,
                cam_target=classes[wanted[i]],
                peak_x=None if top is None else top[1], peak_y=None if top is None else top[0],
                peak_in_region=peak_in_region(top, regions[i]),
                region_fraction=None if regions[i] is None else float(regions[i].mean()),
            )
        )  # fmt: skip
        probability = f"P(true)={p_true:.3f}" if p_true is not None else f"P={p_predicted:.3f}"
        text = f"{m.name}\npred: {classes[predicted[i]]}\n{probability}"
        panels.append(Panel(cams[i], text, correct, top))
    return records, panels


def _row_titles(samples: Sequence[Sample], classes: Sequence[str]) -> list[str]:
    return [s.name if s.label is None else f"{s.name}\ntrue: {classes[s.label]}" for s in samples]


def peak_rate(result: ExplainResult, model: str) -> tuple[float | None, float | None]:
    """(peak-in-region rate, chance rate) of one model, from the summary."""
    for s in result.summary:
        if s.model == model:
            return s.peak_in_region_rate, s.chance_rate
    raise ValueError(
        f"no model {model!r} in the result; models: {[s.model for s in result.summary]}"
    )
