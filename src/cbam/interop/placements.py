"""Where attention goes, read from a `Trace`: the three placements `attach` offers.

- "residual" (the paper's): on each residual branch, at the module that returns the branch's
  feature map before the add (a block's last BN, or its drop-path), so attention sees the
  branch and not the skip. The branch is the operand with more layers on its path.
- "replace-se": in place of each module that multiplies its input by an N x C x 1 x 1 gate
  (torchvision's SqueezeExcitation, timm's SqueezeExcite/SEModule/EffectiveSEModule, ...).
- "stage": once per stage, on the last feature map at each spatial resolution; for networks
  without residual adds (VGG, DenseNet, GoogLeNet/Inception, SqueezeNet, ShuffleNet V2).
"""

from __future__ import annotations

from dataclasses import dataclass

from cbam.interop.trace import MAP_DIMS, ModuleCall, Trace

PLACEMENTS = ("auto", "residual", "replace-se", "stage")

# The small override table: module names whose feature maps are not the backbone's, where
# the structure alone cannot tell. Each entry says why.
HEAD_NAMES = {
    "classifier": "SqueezeNet's classifier is a 1x1 conv at the last feature resolution: its "
    "maps are class scores, not features",
    "head": "timm's heads (ConvNeXt's norm + pool, NFNet's, ...) come after the features",
    "fc": "a classification layer",
    "aux1": "GoogLeNet's auxiliary classifiers only run in training",
    "aux2": "GoogLeNet's auxiliary classifiers only run in training",
    "AuxLogits": "Inception v3's auxiliary classifier only runs in training",
}


@dataclass(frozen=True)
class Site:
    """One module whose output gets attention (or, for replace-se, that attention replaces)."""

    path: str
    channels: int
    placement: str
    note: str = ""
    spatial_dims: int = 2  # of its feature map: 1 (N x C x L), 2 or 3 (N x C x D x H x W)


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def in_head(path: str) -> bool:
    return any(part in HEAD_NAMES for part in path.split("."))


def residual_sites(trace: Trace) -> tuple[list[Site], list[Skipped]]:
    sites: dict[str, Site] = {}
    skipped: list[Skipped] = []
    for add in trace.adds:
        if in_head(add.block):
            continue
        (da, db), (pa, pb) = add.depths, add.producers
        if da == db:
            skipped.append(Skipped(add.block, f"an add of two maps with {da} layers each: "
                                   "no way to tell the branch from the skip"))  # fmt: skip
            continue
        producers = pa if da > db else pb
        inside = [p for p in producers if p and _inside(p, add.block) and p != add.block]
        if not inside:
            skipped.append(Skipped(add.block, "the residual branch ends in a tensor operation, "
                                   "not a module, so there is nothing to wrap"))  # fmt: skip
            continue
        # The outermost module that returns the branch, but before a drop-path (which has
        # no parameters): attention then sees the whole branch, and drop-path drops it too.
        weighted = [p for p in inside if trace.calls[p].has_parameters]
        path = (weighted or inside)[-1]
        sites.setdefault(path, Site(path, add.shape[1], "residual", "", len(add.shape) - 2))
    return list(sites.values()), skipped


def se_sites(trace: Trace) -> list[Site]:
    sites: dict[str, Site] = {}
    for gate in trace.gates:
        if not in_head(gate.path) and gate.path:
            site = Site(gate.path, gate.channels, "replace-se", "", gate.spatial_dims)
            sites.setdefault(gate.path, site)
    nested = {p for p in sites if any(_inside(p, q) and p != q for q in sites)}
    return [s for p, s in sites.items() if p not in nested]


def stage_sites(trace: Trace) -> list[Site]:
    """The last feature map at each resolution, from the outermost modules that keep the
    resolution (a downsampling module is no stage output; its insides may be)."""
    keep = [
        c
        for c in trace.calls.values()
        if c.path
        and not in_head(c.path)
        and c.input_shape is not None
        and c.output_shape is not None
        and len(c.input_shape) == len(c.output_shape) in MAP_DIMS
        and c.input_shape[2:] == c.output_shape[2:]
    ]
    paths = {c.path for c in keep}
    outer = [c for c in keep if not any(_inside(c.path, q) for q in _ancestors(c.path, paths))]
    outer.sort(key=lambda c: c.order)
    groups: dict[tuple[int, ...], list[ModuleCall]] = {}
    for call in outer:
        assert call.output_shape is not None
        groups.setdefault(call.output_shape[2:], []).append(call)
    chosen = []
    for group in groups.values():
        shallowest = min(c.path.count(".") for c in group)
        chosen.append([c for c in group if c.path.count(".") == shallowest][-1])
    chosen.sort(key=lambda c: c.order)
    return [
        Site(trace.outermost.get(c.path, c.path), c.output_shape[1], "stage", "",
             len(c.output_shape) - 2)
        for c in chosen
        if c.output_shape
    ]  # fmt: skip


def _inside(path: str, block: str) -> bool:
    return block == "" or path == block or path.startswith(block + ".")


def _ancestors(path: str, paths: set[str]) -> list[str]:
    parts = path.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in paths]
