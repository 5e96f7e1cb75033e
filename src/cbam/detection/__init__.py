"""Object detection with CBAM backbones: torchvision's Faster R-CNN + FPN over our ResNets,
COCO / VOC / synthetic data checked up front, COCOeval and VOC07 metrics, and a training
engine with the classification trainer's checkpoints, resume, logs and DDP.

Needs pycocotools (`pip install 'cbam[detect]'`).
"""

from cbam.detection.backbone import ResNetFPN, build_backbone, freeze_batchnorm, resnet_backbones
from cbam.detection.config import RECIPES, DetectConfig, load_detect_config
from cbam.detection.data import (
    CocoDetection,
    DataReport,
    DetectionData,
    build_detection_data,
    clean_coco,
    collate_detection,
    read_coco_json,
    voc_as_coco,
)
from cbam.detection.engine import (
    DetectionResult,
    LoadedDetector,
    detector_from_config,
    evaluate_detection_run,
    load_detection_run,
    train_detector,
)
from cbam.detection.evaluate import (
    COCO_STATS,
    DetectionMetrics,
    coco_metrics,
    evaluate_detector,
    voc07_map,
)
from cbam.detection.model import build_detector
from cbam.detection.synthetic import SyntheticSpec, ensure_synthetic

__all__ = [
    "COCO_STATS",
    "RECIPES",
    "CocoDetection",
    "DataReport",
    "DetectConfig",
    "DetectionData",
    "DetectionMetrics",
    "DetectionResult",
    "LoadedDetector",
    "ResNetFPN",
    "SyntheticSpec",
    "build_backbone",
    "build_detection_data",
    "build_detector",
    "clean_coco",
    "coco_metrics",
    "collate_detection",
    "detector_from_config",
    "ensure_synthetic",
    "evaluate_detection_run",
    "evaluate_detector",
    "freeze_batchnorm",
    "load_detect_config",
    "load_detection_run",
    "read_coco_json",
    "resnet_backbones",
    "train_detector",
    "voc07_map",
    "voc_as_coco",
]
