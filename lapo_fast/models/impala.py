"""IMPALA-CNN encoder (Espeholt et al. 2018), the trunk of LAPO's IDM and policies."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lapo_fast.envs.games import OBS_SHAPE


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class _Stage(nn.Module):
    """conv 3x3 -> max-pool 3x3/2 -> two residual blocks: halves the resolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.res = nn.Sequential(_Residual(cout), _Residual(cout))

    def forward(self, x):
        return self.res(F.max_pool2d(self.conv(x), 3, stride=2, padding=1))


class ImpalaEncoder(nn.Module):
    """(B, C, 64, 64) float -> (B, features). `scale` multiplies the (16, 32, 32) channels (LAPO: 4)."""

    def __init__(self, in_channels: int, scale: int = 4, channels=(16, 32, 32), features: int = 256,
                 image_size: int = OBS_SHAPE[0]):
        super().__init__()
        stages, cin, size = [], in_channels, image_size
        for c in channels:
            stages.append(_Stage(cin, c * scale))
            cin, size = c * scale, (size + 1) // 2
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin * size * size, features)
        self.out_features = features

    def conv_features(self, x):
        """The conv stack's output, flattened and rectified: what `fc` reads."""
        return F.relu(torch.flatten(self.stages(x), 1))

    def forward(self, x):
        return F.relu(self.fc(self.conv_features(x)))
