"""Shared checks for the attach tests: identity at attach time, then learning."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torchvision
from torch import nn

from cbam import CBAM, attach
from cbam.interop.attach import plan_attach

# Classification models out of attach's scope: they attend over tokens. Each is expected to be
# refused with a message naming transformers, not skipped.
TRANSFORMER_PREFIXES = ("vit_", "swin_", "swin3d", "maxvit")
# Built without auxiliary heads: they only run in training and need larger inputs.
BUILD_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}
SIZES = {"inception_v3": 96}


def torchvision_classifiers() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def build_torchvision(name: str) -> nn.Module:
    return torchvision.models.get_model(name, num_classes=10, **BUILD_KWARGS.get(name, {}))


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and scales and non-zero layer scales, so that every branch
    contributes (timm zero-inits each block's last BN; ConvNeXt scales branches by 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d) and m.weight is not None:
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith(("layer_scale", "gamma")) and p.dim() >= 1:
                p.fill_(0.5)
    return model.eval()


def logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]


def run(model: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # dropout / drop-path draw the same in both models
    with torch.no_grad():
        return logits(model(x))


def check_attach_keeps_then_learns(
    model: nn.Module, size: int = 64, steps: int = 3, **attach_kwargs: Any
) -> int:
    """Attach CBAM with identity init and check: at least one inserted; logits equal the plain
    model's within 1e-6 in eval and train mode; after `steps` SGD steps every CBAM's
    parameters have had a gradient and the outputs have moved. Returns how many CBAMs."""
    plain = randomise_norms(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    attached = attach(copy.deepcopy(plain), "cbam", identity_init=True, **attach_kwargs)
    layers = [m for m in attached.modules() if isinstance(m, CBAM)]
    assert layers, "no CBAM inserted"
    for mode in (False, True):
        plain.train(mode)
        attached.train(mode)
        torch.testing.assert_close(run(attached, x), run(plain, x), rtol=0, atol=1e-6)
    attached.eval()
    before = run(attached, x)
    attached.train()
    no_drop_path(attached)
    optimiser = torch.optim.SGD(attached.parameters(), lr=0.05)
    touched: dict[int, bool] = {}
    target = torch.tensor([1, 2])
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(logits(attached(x)), target).backward()
        for layer in layers:
            for p in layer.parameters():
                if p.grad is not None and p.grad.abs().max() > 0:
                    touched[id(p)] = True
        optimiser.step()
    untouched = [p.shape for layer in layers for p in _must_learn(layer) if id(p) not in touched]
    assert not untouched, f"CBAM parameters without gradient: {untouched[:5]}"
    attached.eval()
    assert not torch.equal(run(attached, x), before), "training did not change the outputs"
    return len(layers)


def _must_learn(layer: CBAM) -> list[nn.Parameter]:
    """All of a CBAM's parameters, except the hidden layer of a channel MLP with fewer than 4
    ReLU units (C/16 < 4 for C < 64): every such unit can be off for a batch of two images,
    and an off ReLU passes no gradient. The gate's output bias still trains."""
    mlp = layer.channel.mlp
    if mlp[0].out_features >= 4:
        return list(layer.parameters())
    hidden = {id(mlp[0].weight), id(mlp[0].bias), id(mlp[2].weight)}
    return [p for p in layer.parameters() if id(p) not in hidden]


def no_drop_path(model: nn.Module) -> None:
    """Drop-path off for the few training steps: with a batch of 2 it can drop a block's
    branch for both images at every step, and then that block's CBAM sees no gradient."""
    for m in model.modules():
        if "StochasticDepth" in type(m).__name__:
            m.p = 0.0
        elif type(m).__name__ == "DropPath":
            m.drop_prob = 0.0


def cbam_count(model: nn.Module, **kwargs: object) -> int:
    return len(plan_attach(model, **kwargs).sites)  # type: ignore[arg-type]
