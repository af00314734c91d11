"""The forward dynamics model: a U-Net predicting o_{t+1} from (o_{t-k}..o_t) and a latent action."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lapo_fast.choices import FdmArch, FdmNorm, values


NORMS = values(FdmNorm)
ARCHS = values(FdmArch)  # LapoFDM (the reference's), UNetFDM (ours)


class _DoubleConv(nn.Module):
    """(conv 3x3 -> norm -> ReLU) x 2; with `action_dim`, the action shifts each channel after the
    first norm. After, not before: GroupNorm with few channels per group subtracts a per-sample,
    spatially constant shift, so an action concatenated or added before it barely reaches the
    output, the FDM learns to ignore it, and the IDM collapses to a constant latent."""

    def __init__(self, cin: int, cout: int, action_dim: int = 0, norm: str = "batch"):
        super().__init__()
        self.conv0, self.norm0 = nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout)
        self.conv1, self.norm1 = nn.Conv2d(cout, cout, 3, padding=1), _norm(norm, cout)
        self.action = nn.Linear(action_dim, cout) if action_dim else None

    def forward(self, x: torch.Tensor, action: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm0(self.conv0(x))
        if self.action is not None:
            x = x + self.action(action)[:, :, None, None]
        x = F.relu(x, inplace=True)
        return F.relu(self.norm1(self.conv1(x)), inplace=True)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(8, channels), channels)  # groups must divide the channels, for any width


class UNetFDM(nn.Module):
    """(B, C_in, 64, 64) frames + (B, latent_dim) action -> (B, 3, 64, 64) in [-0.5, 0.5].

    Five encoder stages (width w, 2w, 4w, 8w, 12w; 64 -> 2 px), a 2x2 bottleneck, and a mirrored
    decoder with skip connections. The latent action enters twice, as in LAPO: at the first stage
    (full resolution, whose skip feeds the output directly: a short path the gradient to the IDM
    can use from the first steps) and at the bottleneck. w=24 gives ~8M params.

    The output head sees the input frames themselves beside the decoder's features, as LAPO's
    does, so copying what did not change need not pass through the U-Net.

    `norm`: "batch" (BatchNorm, LAPO's) or "group" (GroupNorm). GroupNorm removes each sample's
    mean and scale at every layer, so the features lose the frame's palette and the IDM may pass
    o_{t+1}'s colours through the latent instead. docs/experiments.md has the runs behind both.
    """

    def __init__(self, in_channels: int, latent_dim: int = 128, width: int = 24, out_channels: int = 3,
                 norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"UNetFDM: norm must be one of {NORMS}, got {norm!r}")
        widths = [width * m for m in (1, 2, 4, 8, 12)]
        self.down = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(widths):
            self.down.append(_DoubleConv(cin, w, latent_dim if i == 0 else 0, norm))
            cin = w
        self.bottleneck = _DoubleConv(widths[-1], widths[-1], latent_dim, norm)
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        prev = widths[-1]
        for w in reversed(widths):  # 2 -> 4 -> ... -> 64 px, each joined with its encoder skip
            self.up.append(nn.ConvTranspose2d(prev, w, 2, stride=2))
            self.fuse.append(_DoubleConv(2 * w, w, norm=norm))
            prev = w
        self.head = nn.Sequential(nn.Conv2d(width + in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, out_channels, 1))

    def forward(self, frames: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        skips, x = [], frames
        for stage in self.down:
            x = stage(x, action)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x, action)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips)):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return torch.tanh(self.head(torch.cat([x, frames], dim=1))) / 2


class _Residual(nn.Module):
    """x + conv(relu(conv(relu(x)))), the inner width half of the outer (LAPO's residual layer)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.res_block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(hidden, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_block(x)


class _Down(nn.Module):
    """conv 3x3 -> BatchNorm -> residual -> max-pool 2 -> ReLU: halves the resolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.res = _Residual(cout, cout // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.max_pool2d(self.res(self.norm(self.conv(x))), 2))


class _Up(nn.Module):
    """transposed conv 2x2/2 -> BatchNorm -> residual -> ReLU: doubles the resolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv, self.norm = nn.ConvTranspose2d(cin, cout, 2, stride=2), nn.BatchNorm2d(cout)
        self.res = _Residual(cout, cout // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.res(self.norm(self.conv(x))))


class LapoFDM(nn.Module):
    """LAPO's own world model (its code's `WorldModel`), parameter for parameter: the paper preset's.

    The latent action is tiled over the image as extra input channels, and enters again at the
    1x1 bottleneck in place of the deepest skip. Widths b, 2b, ..., 32b (b = `width`; 24 gives
    7,814,139 params); five BatchNorm down blocks (64 -> 2 px), a 2x2 conv to 1x1, six up blocks
    joined with the skips, and a head over the decoder's features and the input frames. Parameter
    names are the reference's, so its checkpoints load unchanged."""

    def __init__(self, in_channels: int, latent_dim: int = 128, width: int = 24, out_channels: int = 3):
        super().__init__()
        if width < 2:
            raise ValueError(f"LapoFDM: width must be >= 2 (its residual layers halve it), got {width}")
        b = width
        down = [in_channels + latent_dim, b, 2 * b, 4 * b, 8 * b, 16 * b, 32 * b]
        self.down = nn.ModuleList([_Down(i, o) for i, o in zip(down[:-2], down[1:-1])])
        self.down.append(nn.Conv2d(down[-2], down[-1], 2))  # 2x2 -> 1x1
        up = [32 * b, 16 * b, 8 * b, 4 * b, 2 * b, b, b]
        skips = [latent_dim] + down[-2:0:-1]  # what each up block is joined with: the action, then the skips
        self.up = nn.ModuleList([_Up(i + s, o) for i, s, o in zip(up[:-1], skips, up[1:])])
        self.final_conv = nn.Sequential(nn.Conv2d(b + in_channels, b, 3, padding=1), _Residual(b, b // 2), nn.ReLU(),
                                        nn.Conv2d(b, out_channels, 1))

    def forward(self, frames: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """frames (B, C_in, H, W), action (B, latent_dim) -> (B, 3, H, W) in [-0.5, 0.5]."""
        a = action[:, :, None, None]
        x = torch.cat([frames, a.expand(-1, -1, *frames.shape[2:])], dim=1)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips[-1] = a  # the bottleneck is joined with the action instead of itself
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([x, skip], dim=1))
        return torch.tanh(self.final_conv(torch.cat([x, frames], dim=1))) / 2
