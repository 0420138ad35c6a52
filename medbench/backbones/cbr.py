"""The CBR networks (torch modules); layouts and the parameter-count discussion are in
:mod:`medbench.backbones.cbr_spec`."""

from __future__ import annotations

import torch
from torch import nn

from medbench.backbones.cbr_spec import CBR_LAYOUTS, CBRLayout

__all__ = ["CBR_LAYOUTS", "CBRLayout", "CBRBlock", "CBRNet", "build_cbr", "paper_convention_params"]


class CBRBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride=1, padding=kernel // 2, bias=True),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )


class CBRNet(nn.Module):
    """A CBR net with a linear head; ``blocks`` are the units transfusion counts."""

    def __init__(self, layout: CBRLayout, num_classes: int, in_chans: int = 1):
        super().__init__()
        self.layout = layout
        chans = (in_chans, *layout.channels)
        self.blocks = nn.Sequential(*[CBRBlock(a, b, layout.kernel) for a, b in zip(chans, chans[1:])])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = layout.channels[-1]
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


def paper_convention_params(model: CBRNet) -> int:
    """Conv weights + conv biases: the convention of RZ19 Table 1."""
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())


def build_cbr(name: str, *, num_classes: int, in_chans: int) -> CBRNet:
    return CBRNet(CBR_LAYOUTS[name], num_classes=num_classes, in_chans=in_chans)
