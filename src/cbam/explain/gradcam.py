"""Class activation maps through pytorch-grad-cam (`grad-cam` on PyPI), on any layer."""

from __future__ import annotations

import contextlib
import difflib
import io
from typing import Any

import numpy as np
import torch
from torch import nn

from cbam._errors import unknown_choice

# name -> pytorch_grad_cam class name; GradCAM, GradCAM++ and ScoreCAM first (the issue's),
# then other methods the library offers with the same interface.
CAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "scorecam": "ScoreCAM",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
}
SCORECAM_BATCH = 64  # masked copies of the input per forward pass (the library's default: 16)


def _grad_cam() -> Any:
    try:
        import pytorch_grad_cam
    except ImportError as error:
        raise ImportError(
            f"cbam.explain needs pytorch-grad-cam and matplotlib ({error}); install them with "
            f"pip install 'cbam[explain]'"
        ) from None
    return pytorch_grad_cam


def cam_class(method: str) -> type:
    """The pytorch-grad-cam class for a method name ('gradcam', 'gradcam++', 'scorecam', ...)."""
    key = method.lower().replace("-", "").replace("_", "").replace("plusplus", "++")
    if key not in CAM_METHODS:
        raise unknown_choice("CAM method", method, CAM_METHODS)
    return getattr(_grad_cam(), CAM_METHODS[key])


def stage_names(model: nn.Module) -> list[str]:
    """The model's stages ('layer1'.. or 'stages.0'..), from its timm-style feature_info."""
    return [str(info["module"]) for info in getattr(model, "feature_info", [])]


def default_layer(model: nn.Module) -> str:
    """The last stage: where the paper takes its Grad-CAM maps (REFERENCE.md section 6)."""
    stages = stage_names(model)
    if not stages:
        raise ValueError(
            f"{type(model).__name__} has no feature_info to pick its last stage from; name a "
            f"layer (one of model.named_modules()) explicitly"
        )
    return stages[-1]


def layer_choices(model: nn.Module) -> list[str]:
    """Short list of useful layer names: each stage and each block inside it."""
    names = []
    for stage in stage_names(model):
        names.append(stage)
        names += [f"{stage}.{child}" for child, _ in model.get_submodule(stage).named_children()]
    return names


def resolve_layer(model: nn.Module, name: str, model_name: str = "the model") -> nn.Module:
    """The submodule called `name`, or a ValueError listing the valid names."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and "attention" not in n]
    example = f" such as {convs[-1]!r}" if convs else ""
    raise ValueError(
        f"{model_name} has no layer {name!r}{hint}; valid names: "
        f"{', '.join(layer_choices(model)) or '(no stages)'}, or any other name from "
        f"model.named_modules(){example}"
    )


def check_feature_layer(
    model: nn.Module, layer: nn.Module, name: str, sample: torch.Tensor
) -> tuple[int, int]:
    """The (H, W) the layer outputs for one input; a ValueError when it is not a feature map
    (a CAM weights an N x C x H x W activation)."""
    shapes: list[tuple[int, ...]] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        shapes.append(tuple(output.shape) if isinstance(output, torch.Tensor) else ())

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        handle.remove()
    if not shapes:
        raise ValueError(f"layer {name!r} is not used in the model's forward pass")
    if len(shapes[-1]) != 4:
        raise ValueError(
            f"layer {name!r} outputs shape {list(shapes[-1])}, not an N x C x H x W feature "
            f"map; a CAM needs a convolutional layer such as {default_layer(model)!r}"
        )
    return shapes[-1][2], shapes[-1][3]


def compute_cams(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: list[int],
    method: str = "gradcam",
    layer: str | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """N x H x W maps in [0, 1] at the input's size, one per image, for class `targets[i]`.

    The library scales each map to [0, 1] (an all-zero map stays 0: nothing positive
    for that class). Gradients land in the model's parameters and are cleared afterwards.
    """
    cls = cam_class(method)
    name = layer or default_layer(model)
    target_layer = resolve_layer(model, name)
    check_feature_layer(model, target_layer, name, inputs)
    output_target = _grad_cam().utils.model_targets.ClassifierOutputTarget
    was_training = model.training
    maps = []
    cam = cls(model=model, target_layers=[target_layer])
    quiet = cls.__name__ == "ScoreCAM"  # it prints a progress bar per image
    if quiet:
        cam.batch_size = SCORECAM_BATCH
    try:
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            wanted = [output_target(int(t)) for t in targets[start : start + batch_size]]
            with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                maps.append(cam(input_tensor=batch, targets=wanted))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return np.concatenate(maps).astype(np.float32)


def peak(cam: np.ndarray) -> tuple[int, int] | None:
    """(y, x) of a map's maximum (the first one on ties), or None for an all-zero map."""
    if not np.isfinite(cam).all() or cam.max() <= 0:
        return None
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(y), int(x)
