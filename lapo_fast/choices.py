"""The settings' named choices, declared once as types: config fields are these Literals (tyro lists
and validates them; the configs check them when built), and the code that acts on a choice reads
its values from here (`values(FdmArch)`). No imports beyond typing: importing the config stays light."""

from __future__ import annotations

from typing import Literal, get_args

FdmArch = Literal["lapo", "unet"]                     # models.fdm: the reference's U-Net, or ours
FdmNorm = Literal["group", "batch"]                   # the 'unet' FDM's normalisation
FdmAction = Literal["latent", "true"]                 # what the FDM is given (true: the ablation)
Precision = Literal["fp32", "tf32", "bf16"]           # runtime.distributed.autocast
Loader = Literal["auto", "resident", "cache", "compressed"]  # data.planner
DistributionMode = Literal["easy", "hard", "extreme", "memory"]  # envs.games (libenv codes there)


def values(choice) -> tuple[str, ...]:
    """The values of a choice type, in declaration order."""
    return get_args(choice)
