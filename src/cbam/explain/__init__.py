"""See what the attention does: Grad-CAM comparisons of trained models (the paper's figure,
REFERENCE.md section 6) and CBAM's spatial and channel gates.

    from cbam.explain import load_models, dataset_samples, explain
    models = load_models(["runs/none", "runs/se", "runs/cbam"])
    samples = dataset_samples(models[0].splits.test.dataset, 8, per_class=True)
    result = explain(models, samples, "explain/", method="gradcam")

Needs the `explain` extra (pytorch-grad-cam and matplotlib): pip install 'cbam[explain]'.
"""

from cbam.explain.gates import (
    BlockGates,
    GateRecorder,
    GateStats,
    attention_modules,
    capture_gates,
    channel_gate_stats,
    has_gates,
)
from cbam.explain.gradcam import (
    CAM_METHODS,
    cam_class,
    compute_cams,
    default_layer,
    layer_choices,
    peak,
    resolve_layer,
)
from cbam.explain.images import Sample, dataset_samples, load_images, read_image
from cbam.explain.models import ExplainModel, load_models
from cbam.explain.pipeline import TARGETS, ExplainResult, explain, page_paths, peak_rate
from cbam.explain.regions import box_mask, peak_in_region, regions_for
from cbam.explain.report import ModelSummary, Record, format_summary

__all__ = [
    "CAM_METHODS",
    "TARGETS",
    "BlockGates",
    "ExplainModel",
    "ExplainResult",
    "GateRecorder",
    "GateStats",
    "ModelSummary",
    "Record",
    "Sample",
    "attention_modules",
    "box_mask",
    "cam_class",
    "capture_gates",
    "channel_gate_stats",
    "compute_cams",
    "dataset_samples",
    "default_layer",
    "explain",
    "format_summary",
    "has_gates",
    "layer_choices",
    "load_images",
    "load_models",
    "page_paths",
    "peak",
    "peak_in_region",
    "peak_rate",
    "read_image",
    "regions_for",
    "resolve_layer",
]
