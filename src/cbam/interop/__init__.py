"""Interoperability: the CBAM authors' checkpoints, torchvision and timm backbones, export.

Imports go one way: layers <- models <- interop <- cli.
"""

from cbam.interop.attach import SUPPORTED as ATTACH_SUPPORTED
from cbam.interop.attach import attach, plan_attach
from cbam.interop.checkpoints import (
    LoadReport,
    load_checkpoint,
    load_official,
    load_torchvision,
)
from cbam.interop.errors import CheckpointError
from cbam.interop.export import (
    FORMATS,
    export_model,
    onnx_batch_axis,
    onnx_op_types,
    verify_export,
)
from cbam.interop.identify import guess_model
from cbam.interop.identity_blend import IdentityBlend
from cbam.interop.official import convert_official, is_official
from cbam.interop.placements import PLACEMENTS
from cbam.interop.report import AttachReport, attach_report, format_report
from cbam.interop.safe_load import Checkpoint, read_checkpoint

__all__ = [
    "ATTACH_SUPPORTED",
    "FORMATS",
    "PLACEMENTS",
    "AttachReport",
    "Checkpoint",
    "CheckpointError",
    "IdentityBlend",
    "LoadReport",
    "attach",
    "attach_report",
    "convert_official",
    "export_model",
    "format_report",
    "guess_model",
    "is_official",
    "load_checkpoint",
    "load_official",
    "load_torchvision",
    "onnx_batch_axis",
    "onnx_op_types",
    "plan_attach",
    "read_checkpoint",
    "verify_export",
]
