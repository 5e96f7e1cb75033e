"""MobileNet v1 (Howard et al., 2017) with attention after every conv unit.

Placement: in each depthwise-separable block, after the depthwise conv-BN-ReLU and after the
pointwise conv-BN-ReLU (26 gates; none on the stem). With widths rounded to the nearest
integer this is the placement that reproduces the CBAM paper's counts for width 0.7:
2.30M baseline, 2.71M with SE and with CBAM (attention after the pointwise convs alone gives
2.53M). BAM goes at the end of each resolution stage but the last.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cbam._errors import check_positive_int
from cbam.layers.create_attention import AttentionSpec
from cbam.models._common import (
    AttentionBuilder,
    ClassifierMixin,
    attention_builders,
    check_image_batch,
    init_weights,
)
from cbam.models._registry import register_model

# (output channels, stride) of the 13 depthwise-separable blocks, grouped by resolution.
STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1),),
    ((128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2),) + ((512, 1),) * 5,
    ((1024, 2), (1024, 1)),
)


def conv_bn_relu(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    def __init__(
        self, in_ch: int, out_ch: int, stride: int, attention: AttentionBuilder | None = None
    ) -> None:
        super().__init__()
        self.depthwise = conv_bn_relu(in_ch, in_ch, 3, stride, groups=in_ch)
        self.attention_dw = attention(in_ch) if attention else nn.Identity()
        self.pointwise = conv_bn_relu(in_ch, out_ch, 1)
        self.attention_pw = attention(out_ch) if attention else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_dw(self.depthwise(x))
        return self.attention_pw(self.pointwise(x))


class MobileNetV1(ClassifierMixin, nn.Module):
    """MobileNet v1. `width_mult` scales every width (rounded to nearest, at least 1);
    `small_input` makes the first conv stride 1 for 28-64 px images."""

    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        attention: AttentionSpec = None,
        attention_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if (
            isinstance(width_mult, bool)
            or not isinstance(width_mult, int | float)
            or width_mult <= 0
        ):
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        check_positive_int("in_chans", in_chans)
        self.in_chans = in_chans
        block_attention, stage_attention = attention_builders(attention, attention_kwargs)

        def width(channels: int) -> int:
            return max(1, int(channels * width_mult + 0.5))

        in_ch = width(32)
        self.stem = conv_bn_relu(in_chans, in_ch, 3, stride=1 if small_input else 2)
        reduction = 1 if small_input else 2
        stages: list[nn.Module] = []
        self.feature_info: list[dict[str, Any]] = []
        for i, stage in enumerate(STAGES):
            blocks: list[nn.Module] = []
            for out_channels, stride in stage:
                blocks.append(
                    DepthwiseSeparable(in_ch, width(out_channels), stride, block_attention)
                )
                in_ch = width(out_channels)
                reduction *= stride
            if stage_attention is not None and i < len(STAGES) - 1:
                blocks.append(stage_attention(in_ch))
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(
                {"num_chs": in_ch, "reduction": reduction, "module": f"stages.{i}"}
            )
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        self.reset_classifier(num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_chans, type(self).__name__)
        return self.stages(self.stem(x))


@register_model(MobileNetV1)
def mobilenet_v1(**kwargs: Any) -> MobileNetV1:
    return MobileNetV1(**kwargs)
