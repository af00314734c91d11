"""How a latent tensor maps onto (group, row, dim) for vector quantisation.

Two layouts:
- "grouped": x (..., G*d); the last dim is G contiguous groups of d, one codebook each.
  Indices come back as (..., G).
- "lapo": x (B, G*d*L), viewed as the reference LAPO code does: (B, G, d, L), so latent l of
  group g is x[b, g*d*L + k*L + l] for k < d (the d values are strided by L). Indices: (B, G, L).

The fused kernels read and write x in place through the strides below (no permuted copies):
row n of group g is (b, l) = divmod(n, L), element k is at
    b*stride_b + g*stride_g + k*stride_k + l*stride_l
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    kind: str           # "grouped" or "lapo"
    lead_shape: tuple   # leading dims of x (grouped) or (B,) (lapo)
    G: int
    d: int
    L: int

    @staticmethod
    def of(x: torch.Tensor, G: int, d: int, kind: str, num_latents: int = 1) -> "Layout":
        return Layout.for_shape(tuple(x.shape), G, d, kind, num_latents)

    @staticmethod
    def for_shape(shape: tuple, G: int, d: int, kind: str, num_latents: int = 1) -> "Layout":
        """The layout of x's shape, checked; cached per shape (the op calls it every step), except
        for symbolic shapes (torch.compile's dynamic batch sizes), which are not hashable."""
        if all(type(s) is int for s in shape):
            return _cached_layout(shape, G, d, kind, num_latents)
        return _layout(shape, G, d, kind, num_latents)

    @property
    def batch(self) -> int:
        return math.prod(self.lead_shape)

    @property
    def rows(self) -> int:
        return self.batch * self.L

    def strides(self) -> tuple[int, int, int, int]:
        """(stride_b, stride_g, stride_k, stride_l) of a contiguous x, in elements."""
        if self.kind == "grouped":
            return self.G * self.d, self.d, 1, 0
        return self.G * self.d * self.L, self.d * self.L, self.L, 1

    @property
    def indices_shape(self) -> tuple:
        return (*self.lead_shape, self.G) if self.kind == "grouped" else (self.batch, self.G, self.L)

    # The reference path works on explicit (G, N, d) copies.
    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "grouped":
            return x.reshape(-1, self.G, self.d).transpose(0, 1)
        return x.reshape(self.batch, self.G, self.d, self.L).permute(1, 0, 3, 2).reshape(self.G, -1, self.d)

    def from_groups(self, q: torch.Tensor) -> torch.Tensor:
        if self.kind == "grouped":
            return q.transpose(0, 1).reshape(*self.lead_shape, self.G * self.d)
        return q.reshape(self.G, self.batch, self.L, self.d).permute(1, 0, 3, 2).reshape(self.batch, -1)

    def indices_from_groups(self, idx: torch.Tensor) -> torch.Tensor:
        if self.kind == "grouped":
            return idx.transpose(0, 1).reshape(self.indices_shape)
        return idx.reshape(self.G, self.batch, self.L).transpose(0, 1).contiguous()


def _layout(shape: tuple, G: int, d: int, kind: str, num_latents: int = 1) -> Layout:
    if kind == "grouped":
        if len(shape) < 1 or shape[-1] != G * d:
            raise ValueError(f"grouped layout wants x of shape (..., {G * d}) for {G} codebooks of dim {d}, "
                             f"got {shape}")
        return Layout("grouped", tuple(shape[:-1]), G, d, 1)
    if kind == "lapo":
        L = num_latents
        if len(shape) != 2 or shape[1] != G * d * L:
            raise ValueError(f"lapo layout wants x of shape (B, {G * d * L}) = (B, codebooks*dim*latents = "
                             f"{G}*{d}*{L}), got {shape}")
        return Layout("lapo", (shape[0],), G, d, L)
    raise ValueError(f"unknown layout {kind!r}; use 'grouped' or 'lapo'")


_cached_layout = functools.lru_cache(maxsize=256)(_layout)  # checked and built once per shape
