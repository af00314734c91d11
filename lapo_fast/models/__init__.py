"""The networks of LAPO: IMPALA-CNN trunk, U-Net world model, latent IDM, policies, decoder."""

from .fdm import LapoFDM, UNetFDM
from .impala import ImpalaEncoder
from .lam import IDMOutput, LatentActionModel, LatentIDM, build_lam, stack_frames
from .policy import ActionDecoder, DecodedPolicy, LatentPolicy

__all__ = ["ActionDecoder", "DecodedPolicy", "IDMOutput", "ImpalaEncoder", "LatentActionModel", "LatentIDM",
           "LatentPolicy", "LapoFDM",
           "UNetFDM", "build_lam", "stack_frames"]
