"""Backbones with attention, built by name through `create_model`."""

from cbam.models._registry import ModelEntry, create_model, list_models, model_entry, register_model
from cbam.models.mobilenet import MobileNetV1
from cbam.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "MobileNetV1",
    "ModelEntry",
    "ResNet",
    "create_model",
    "list_models",
    "model_entry",
    "register_model",
]
