"""Fused ops, usable from any project.

    from lapo_fast.ops import vq_ema, vq_ema_reference, VectorQuantizerEMA
"""

from .vq import BACKENDS, NonFiniteError, VQOutput, vq_ema
from .vq_layout import Layout
from .vq_module import VectorQuantizerEMA
from .vq_reference import vq_ema_reference

__all__ = ["BACKENDS", "Layout", "NonFiniteError", "VQOutput", "VectorQuantizerEMA", "vq_ema", "vq_ema_reference"]
