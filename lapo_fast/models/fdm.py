"""The forward dynamics model: a U-Net predicting o_{t+1} from (o_{t-k}..o_t) and a latent action."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    groups = math.gcd(8, cout)  # GroupNorm needs groups | channels, for any width
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
    )


class UNetFDM(nn.Module):
    """(B, C_in, 64, 64) frames + (B, latent_dim) action -> (B, 3, 64, 64) in [-0.5, 0.5].

    Five encoder stages (width w, 2w, 4w, 8w, 12w; 64 -> 2 px), the latent action projected and
    concatenated at the 2x2 bottleneck (the only path from the action to the output, so the
    prediction must use it), and a mirrored decoder with skip connections. w=24 gives ~8M params.
    """

    def __init__(self, in_channels: int, latent_dim: int = 128, width: int = 24, out_channels: int = 3):
        super().__init__()
        widths = [width * m for m in (1, 2, 4, 8, 12)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_double_conv(cin, w))
            cin = w
        self.action = nn.Linear(latent_dim, widths[-1])
        self.bottleneck = _double_conv(2 * widths[-1], widths[-1])
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        prev = widths[-1]
        for w in reversed(widths):  # 2 -> 4 -> ... -> 64 px, each joined with its encoder skip
            self.up.append(nn.ConvTranspose2d(prev, w, 2, stride=2))
            self.fuse.append(_double_conv(2 * w, w))
            prev = w
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, frames: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        skips, x = [], frames
        for stage in self.down:
            x = stage(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        a = self.action(action)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        x = self.bottleneck(torch.cat([x, a], dim=1))
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips)):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return torch.tanh(self.head(x)) / 2
