"""torchvision's ResNet blocks with an attention layer before the residual addition.

torchvision's blocks have no slot for attention, so `attach` changes an existing block's
class to one of these subclasses (the block keeps its modules and weights) and gives it an
`attention` module. The forward is torchvision's, line for line, plus that one call, so a
block with identity attention computes exactly what it did before. Parameter names stay
torchvision's, plus `attention.*`: the same names as cbam's own ResNets.

Kept in its own module so that `import cbam` does not import torchvision.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv


class BasicBlockWithAttention(tv.BasicBlock):
    attention: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attention(self.bn2(self.conv2(out)))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class BottleneckWithAttention(tv.Bottleneck):
    attention: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attention(self.bn3(self.conv3(out)))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


WITH_ATTENTION: dict[type[nn.Module], type[nn.Module]] = {
    tv.BasicBlock: BasicBlockWithAttention,
    tv.Bottleneck: BottleneckWithAttention,
}
