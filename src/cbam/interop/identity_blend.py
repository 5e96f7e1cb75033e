"""An attention layer that starts as the identity, for adding attention to a trained network.

CBAM's and SE's gates are sigmoids, so they can never equal 1: a freshly inserted CBAM
multiplies every residual branch by about 0.5 x 0.5 (its spatial gate starts at exactly
sigmoid(0) = 0.5, its channel gate near 0.5), which changes a pretrained network's outputs
before any fine-tuning. Pushing the gates towards 1 with large biases saturates the sigmoids
and starves them of gradient. Instead, the layer is blended with the identity:

    y = x + alpha * (attention(x) - x),    alpha a learnable scalar, initialised to 0

At alpha = 0 the output is x exactly (bit for bit), so the network computes what it computed
before; at alpha = 1 it is exactly the paper's module. alpha gets a gradient at once
(dL/dalpha = sum dL/dy * (attention(x) - x)), and the attention's own parameters start
receiving gradients, scaled by alpha, as soon as alpha moves away from 0 (the first
optimiser step). This is the ReZero / zero-init-residual idea applied to the attention
branch x * (gate - 1).
"""

from __future__ import annotations

import torch
from torch import nn


class IdentityBlend(nn.Module):
    """`x + alpha * (layer(x) - x)` with a learnable scalar `alpha` that starts at `init`
    (0: the identity). Exclude `alpha` from weight decay, which would pull it back to 0."""

    def __init__(self, layer: nn.Module, init: float = 0.0) -> None:
        super().__init__()
        self.layer = layer
        self.alpha = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * (self.layer(x) - x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha.item():.4g}" if self.alpha.device.type != "meta" else ""
