"""The VQ shapes every runner shares, declared once: benchmarks/vq_kernel.py times them,
benchmarks/vq_compile.py compiles them, `lapo-fast selftest` checks them on the GPU."""

from __future__ import annotations

from typing import NamedTuple


class VQCase(NamedTuple):
    name: str
    layout: str   # "lapo" (B, G*d*L) or "grouped"
    B: int        # rows (batch entries)
    G: int        # codebooks
    K: int        # codes per codebook
    d: int        # code dimensions
    L: int        # latents per codebook per row (lapo layout)


VQ_CASES = [
    VQCase("LAPO B=128", "lapo", 128, 2, 64, 16, 4),
    VQCase("LAPO B=4096", "lapo", 4096, 2, 64, 16, 4),
    VQCase("LAPO B=65536", "lapo", 65536, 2, 64, 16, 4),
    VQCase("K64 d16 N=65536", "grouped", 65536, 1, 64, 16, 1),
    VQCase("K1024 d64 N=8192", "grouped", 8192, 1, 1024, 64, 1),
    VQCase("K8192 d256 N=1024", "grouped", 1024, 1, 8192, 256, 1),
]

# VQ-VAE tokenizers' codebooks (one codebook, K codes of d dims): rows up to 65,536, fewer where
# K x d is large, so that a row tile of the PyTorch reference stays a few GFLOP on a CPU.
TOKENIZER_CASES = [VQCase(f"tokenizer K{K} d{d}", "grouped", min(65536, max(1024, 2**31 // (K * d))), 1, K, d, 1)
                   for K in (1024, 8192, 16384) for d in (8, 32, 64, 256)]

# The selftest's: LAPO's shape at three batches, and a tokenizer's at 4,096 rows.
SELFTEST_CASES = VQ_CASES[:3] + [VQCase("tokenizer K=1024 d=64", "grouped", 4096, 1, 1024, 64, 1)]
