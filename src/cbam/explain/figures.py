"""Figures drawn with matplotlib's Agg renderer (no display needed): the paper's Grad-CAM
grid (REFERENCE.md section 6) and CBAM's gates. Small images are upsampled for display:
pixels stay square (nearest), maps are smooth (bilinear), grey inputs are shown as RGB."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cbam._errors import unknown_choice
from cbam.explain.gates import BlockGates, GateStats

PANEL_INCHES = 1.75
DPI = 90


@dataclass
class Panel:
    """One model's map on one image, with the text printed above it."""

    cam: np.ndarray  # H x W in [0, 1], the model input's size
    title: str
    correct: bool | None  # a wrong prediction's title is drawn in red
    peak: tuple[int, int] | None  # (y, x) in model-input pixels


def _figure(width: float, height: float, layout: str | None = None):  # -> Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)  # the Agg renderer, whatever backend pyplot would pick
    return fig


def display_scale(size: int, display_size: int | None) -> int:
    """Integer upsampling factor that brings `size` pixels to about `display_size` (at least
    112: a 28-pixel Fashion-MNIST image is drawn 4x)."""
    return max(1, math.ceil((display_size or 112) / size))


def upsample_image(image: np.ndarray, scale: int) -> np.ndarray:
    """H x W x 3 -> (H*scale) x (W*scale) x 3, each pixel a square block."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def upsample_map(values: np.ndarray, size: int) -> np.ndarray:
    """A 2-D map resized (bilinear) to size x size; values stay within the map's range."""
    t = torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float32)[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(image: np.ndarray, cam: np.ndarray, scale: int) -> np.ndarray:
    """The CAM as a jet heatmap over the (upsampled) image, via pytorch-grad-cam's
    `show_cam_on_image`."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    big = upsample_image(image, scale).astype(np.float32)
    heat = np.clip(upsample_map(cam, big.shape[0]), 0, 1)
    return show_cam_on_image(big, heat, use_rgb=True, image_weight=0.5)


def _mark(ax, peak: tuple[int, int] | None, region: np.ndarray | None, scale: int) -> None:
    """The region's outline (white) and the map's peak (a white +)."""
    if region is not None:
        big = upsample_image(region[..., None].astype(np.float32), scale)[..., 0]
        ax.contour(big, levels=[0.5], colors="white", linewidths=1.0)
    if peak is not None:
        y, x = ((v + 0.5) * scale - 0.5 for v in peak)
        ax.plot([x], [y], marker="+", color="white", markersize=9, markeredgewidth=2)
        ax.plot([x], [y], marker="+", color="black", markersize=7, markeredgewidth=1)


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def save_cam_grid(
    path: str | Path,
    images: np.ndarray,
    row_titles: Sequence[str],
    panels: Sequence[Sequence[Panel]],
    regions: Sequence[np.ndarray | None] | None = None,
    title: str = "",
    display_size: int | None = None,
) -> Path:
    """One row per image: the input, then one CAM overlay per model (`panels[i][j]` is
    model j on image i). Boxes/masks are outlined in white; each map's peak is a +."""
    n, size = len(images), images.shape[1]
    columns = 1 + (len(panels[0]) if n else 0)
    scale = display_scale(size, display_size)
    fig = _figure(PANEL_INCHES * columns, (PANEL_INCHES + 0.45) * n + 0.5)
    axes = fig.subplots(n, columns, squeeze=False)
    for i in range(n):
        region = regions[i] if regions is not None else None
        ax = axes[i, 0]
        ax.imshow(upsample_image(images[i], scale), interpolation="nearest")
        _mark(ax, None, region, scale)
        ax.set_title(row_titles[i], fontsize=8)
        _clean(ax)
        for j, panel in enumerate(panels[i]):
            ax = axes[i, j + 1]
            ax.imshow(overlay(images[i], panel.cam, scale), interpolation="nearest")
            _mark(ax, panel.peak, region, scale)
            ax.set_title(
                panel.title, fontsize=8, color="firebrick" if panel.correct is False else "black"
            )
            _clean(ax)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def short_block_name(name: str) -> str:
    """'layer2.1.attention' -> 'layer2.1'; 'stages.3.0.attention_dw' -> 'stages.3.0.dw'."""
    return name.replace(".attention_", ".").removesuffix(".attention")


GATE_SCALES = ("block", "fixed")


def save_gate_figure(
    path: str | Path,
    model_name: str,
    images: np.ndarray,
    row_titles: Sequence[str],
    gates: Sequence[BlockGates],
    stats: Sequence[GateStats],
    scale: str = "block",
    max_spatial: int = 16,
) -> Path:
    """Top: every block's spatial gate, upsampled (bilinear) to the image's pixels and drawn
    with square pixels, for each image (its range is printed below it). `scale` "block"
    colours each block's column by its own range on this page (trained gates often stay near
    0.5, which a fixed scale shows as flat); "fixed" uses 0..1 for all. Bottom: the channel
    gate of each stage's last block (images x channels, 0..1) and the mean +- std of every
    block's channel gate (`stats`)."""
    if scale not in GATE_SCALES:
        raise unknown_choice("gate colour scale", scale, GATE_SCALES)
    n, size = len(images), images.shape[1]
    spatial = [g for g in gates if g.spatial is not None]
    note = ""
    if len(spatial) > max_spatial:  # MobileNet has 26 gates: show each stage's last one
        last = {g.stage: g for g in spatial}
        spatial = [g for g in spatial if last[g.stage] is g]
        note = ", last block of each stage"
    channel_last = list({g.stage: g for g in gates if g.channel is not None}.values())
    columns = 1 + len(spatial)
    panel = PANEL_INCHES * 0.8
    top_h = (panel + 0.3) * n + 0.4 if spatial else 0.0
    bottom_h = 2.9 if channel_last else 0.0
    fig = _figure(max(panel * columns + 0.9, 8.0), top_h + bottom_h + 0.3, layout="constrained")
    fig.suptitle(f"{model_name}: attention gates", fontsize=10)
    if spatial and channel_last:
        top, bottom = fig.subfigures(2, 1, height_ratios=[top_h, bottom_h])
    else:
        top, bottom = (fig, None) if spatial else (None, fig)
    if top is not None:
        axes = top.subplots(n, columns, squeeze=False)
        mapped = None
        for j, g in enumerate(spatial):
            maps = g.spatial_at((size, size))[:n].numpy()  # at the image's own resolution
            low, high = (0.0, 1.0) if scale == "fixed" else (float(maps.min()), float(maps.max()))
            if high - low < 1e-3:  # a flat gate: show it flat, not amplified noise
                low, high = low - 5e-4, high + 5e-4
            for i in range(n):
                mapped = axes[i, j + 1].imshow(
                    maps[i], cmap="viridis", vmin=low, vmax=high, interpolation="nearest"
                )
                axes[i, j + 1].set_xlabel(
                    f"{maps[i].min():.2f}-{maps[i].max():.2f}", fontsize=6, labelpad=1
                )
            axes[0, j + 1].set_title(short_block_name(g.name), fontsize=7)
        for i in range(n):
            axes[i, 0].imshow(images[i], interpolation="nearest")
            axes[i, 0].set_ylabel(row_titles[i], fontsize=7)
            for ax in axes[i]:
                _clean(ax)
        axes[0, 0].set_title("input", fontsize=8)
        how = "colour: 0 to 1" if scale == "fixed" else "colour: each block's range on this page"
        top.suptitle(f"spatial gates ({how}; each map's range below it{note})", fontsize=8)
        if scale == "fixed" and mapped is not None:
            top.colorbar(mapped, ax=axes, fraction=0.02, pad=0.01)
    if bottom is not None:
        _channel_panels(bottom, channel_last, stats, n)
    return _save(fig, path)


def _channel_panels(fig, last: Sequence[BlockGates], stats: Sequence[GateStats], n: int) -> None:
    """Each stage's last channel gate (images x channels) and the per-block statistics."""
    axes = fig.subplots(1, len(last) + 1, width_ratios=[1] * len(last) + [max(2, len(last))])
    mapped = None
    for ax, g in zip(axes[:-1], last, strict=True):
        values = g.channel[:n].numpy()  # type: ignore[index]
        mapped = ax.imshow(
            values, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest"
        )
        ax.set_title(short_block_name(g.name), fontsize=7)
        ax.set_xlabel(f"channel (0-{values.shape[1] - 1})", fontsize=7)
        ax.set_yticks(range(len(values)))
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("image (row of the grid)", fontsize=7)
    if mapped is not None:
        fig.colorbar(mapped, ax=list(axes[:-1]), fraction=0.03, pad=0.02)
    fig.suptitle("channel gates: each stage's last block (left), every block (right)", fontsize=8)
    ax = axes[-1]
    blocks = [s for s in stats if s.block]
    x = np.arange(len(blocks))
    ax.vlines(x, [s.min for s in blocks], [s.max for s in blocks], color="0.7", linewidth=1)
    ax.errorbar(x, [s.mean for s in blocks], yerr=[s.std for s in blocks], fmt="o",
                markersize=3, capsize=2)  # fmt: skip
    stages = [s for s in stats if not s.block]
    for s in stages:  # the stage's pooled mean, across its blocks
        members = [k for k, b in enumerate(blocks) if b.stage == s.stage]
        ax.hlines(s.mean, members[0] - 0.4, members[-1] + 0.4, color="firebrick", linewidth=1)
    rotation = 90 if len(blocks) > 12 else 60
    names = [short_block_name(s.block) for s in blocks]
    ax.set_xticks(
        x, names, rotation=rotation, fontsize=6, ha="right" if rotation < 90 else "center"
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("gate value", fontsize=7)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_title("mean \u00b1 std per block (grey: min to max; red: stage mean)", fontsize=7)
    parts = [f"{s.stage or 'all'} {s.mean:.2f}\u00b1{s.std:.2f}" for s in stages]
    lines = [", ".join(parts[i : i + 3]) for i in range(0, len(parts), 3)]
    ax.set_xlabel("stage mean \u00b1 std: " + "\n".join(lines), fontsize=6)
