"""cbam.attach on torchvision's detection and segmentation models: attention in the backbone's
body only, the body's feature maps unchanged at attach time, every CBAM trained by the
model's own loss; frozen layers are left out, with a reason."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn

from _attach_checks import _must_learn, no_drop_path, randomise_norms
from cbam import CBAM, attach
from cbam.interop import attach_report, format_report
from cbam.interop.attach import plan_attach

DETECTORS = torchvision.models.list_models(module=torchvision.models.detection)
SEGMENTERS = torchvision.models.list_models(module=torchvision.models.segmentation)
FAST = ("fasterrcnn_mobilenet_v3_large_320_fpn", "lraspp_mobilenet_v3_large")
SIZE = 96
SIZES = {"ssd300_vgg16": 300}  # its VGG's extra layers need 300 px


def build(name: str) -> nn.Module:
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": 3}
    if name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn", "retinanet", "fcos")):
        kwargs.update(min_size=SIZE, max_size=SIZE)
    if name.startswith("keypointrcnn"):
        kwargs.update(num_classes=2, num_keypoints=3)
    return torchvision.models.get_model(name, **kwargs)


def body_of(model: nn.Module) -> str:
    return plan_attach(model).body


def feature_maps(body: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = body(x)
    return list(out.values()) if isinstance(out, dict) else [out]


def own_loss(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's training loss on two images with one object each."""
    if name in SEGMENTERS:
        target = torch.randint(0, 3, (len(x), *x.shape[2:]), generator=torch.Generator())
        return nn.functional.cross_entropy(model(x)["out"], target)
    targets = []
    for _ in range(len(x)):
        target = {"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0]]), "labels": torch.tensor([1])}
        if name.startswith("maskrcnn"):
            mask = torch.zeros(1, *x.shape[2:], dtype=torch.uint8)
            mask[:, 12:80, 10:70] = 1
            target["masks"] = mask
        if name.startswith("keypointrcnn"):
            target["keypoints"] = torch.tensor([[[20.0, 20.0, 1], [40, 50, 1], [60, 70, 1]]])
        targets.append(target)
    return sum(model(list(x), targets).values())  # type: ignore[return-value]


def check(name: str) -> int:
    torch.manual_seed(0)
    plain = randomise_norms(build(name))
    path = body_of(plain)
    size = SIZES.get(name, SIZE)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = attach(copy.deepcopy(plain), "cbam", identity_init=True)
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, CBAM)]
    assert layers and all(p.startswith(f"{path}.") for p, _ in layers), [p for p, _ in layers]
    with torch.no_grad():
        for mode in (False, True):
            plain.train(mode)
            model.train(mode)
            before = feature_maps(plain.get_submodule(path), x)
            after = feature_maps(model.get_submodule(path), x)
            for a, b in zip(after, before, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    model.train()
    no_drop_path(model)
    # SSD's VGG has no BN: at lr 0.01 (and 1e-3) its random-init loss overflows.
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-5 if name == "ssd300_vgg16" else 0.01)
    touched: set[int] = set()
    steps, fed = 3, Counter[int]()  # steps in which each CBAM's input was not all zeros
    hooks = [
        m.register_forward_pre_hook(lambda m, args: fed.update([id(m)] * bool(args[0].any())))
        for _, m in layers
    ]  # fmt: skip
    for _ in range(steps):
        optimiser.zero_grad()
        own_loss(name, model, x).backward()
        touched |= {
            id(p) for _, m in layers for p in m.parameters()
            if p.grad is not None and p.grad.abs().max() > 0
        }  # fmt: skip
        optimiser.step()
    for hook in hooks:
        hook.remove()
    # A CBAM fed zeros (dead ReLUs at random init) passes nothing back: its blend's alpha
    # multiplies CBAM(0) - 0 = 0, and the gates behind alpha need three steps of it. SSD300's
    # extra layers are such, mostly zeros at random init, for steps; all else must learn.
    alive = [
        path for path, m in layers
        if fed[id(m)] == steps and not (name == "ssd300_vgg16" and ".extra." in path)
    ]  # fmt: skip
    assert len(alive) >= (4 if name == "ssd300_vgg16" else len(layers)), (alive, len(layers))
    untouched = [
        (path, p.shape) for path, m in layers if path in alive
        for p in _must_learn(m) if id(p) not in touched
    ]  # fmt: skip
    assert not untouched, f"CBAM parameters without gradient: {untouched[:5]}"
    return len(layers)


@pytest.mark.parametrize("name", FAST)
def test_detector_and_segmenter_attach(name):
    assert check(name) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in DETECTORS + SEGMENTERS if n not in FAST])
def test_every_detector_and_segmenter(name):
    assert check(name) >= 1


def test_frozen_layers_are_left_out_with_a_reason():
    """torchvision freezes a pretrained detector's stem and layer1 (trainable layers 3):
    attention there is skipped and reported; a wholly frozen body is an error."""
    model = build("fasterrcnn_resnet50_fpn")
    body = model.backbone.body
    body.conv1.requires_grad_(False)
    body.layer1.requires_grad_(False)
    plan = plan_attach(model)
    assert [s.path for s in plan.skipped] == ["layer1.0", "layer1.1", "layer1.2"]
    assert all("frozen layers" in s.reason for s in plan.skipped)
    text = format_report(attach_report(model, input_size=None))
    assert "skipped layer1.0: in frozen layers (no parameter requires grad)" in text
    attach(model, "cbam", identity_init=True)
    inserted = [p for p, m in model.named_modules() if isinstance(m, CBAM)]
    assert len(inserted) == 13 and not any(".layer1." in p for p in inserted)
    frozen = build("fasterrcnn_mobilenet_v3_large_320_fpn")
    frozen.backbone.requires_grad_(False)
    with pytest.raises(ValueError, match=r"every place for attention .* frozen layers"):
        attach(frozen, "cbam")


def test_a_detector_without_a_backbone_is_refused():
    class Headless(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 8, 3)
            self.roi_heads = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.roi_heads(self.features(x).mean((2, 3)))

    with pytest.raises(ValueError, match=r"looks like a detector \(roi_heads\) but has no"):
        attach(Headless(), "cbam")
