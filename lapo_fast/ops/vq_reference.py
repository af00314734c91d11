"""Pure-PyTorch reference of the EMA vector quantiser, with the reference LAPO code's semantics.

Kept deliberately plain (materialises the N x K distance matrix and one-hot encodings): it is the
specification the fused kernels are tested against, and the fallback on devices they don't cover.

Semantics, per codebook group g with K codes:
  index      = argmin_k ||x - c_k||^2 (on the codebook before this step's update)
  quantized  = c_index, returned with the straight-through gradient (x + (q - x).detach())
  loss       = commitment * mean((x - q)^2)
  perplexity = sum over groups of exp(entropy of the batch's code-usage frequencies)
  training:  count  <- decay * count + (1 - decay) * batch_counts
             count  <- (count + eps) / (sum(count) + K * eps) * sum(count)     (Laplace smoothing)
             weight <- decay * weight + (1 - decay) * batch_sums
             codes  <- weight / count
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .vq_layout import Layout


def perplexity_of(counts: torch.Tensor) -> torch.Tensor:
    """Sum over groups of exp(entropy) of per-code usage counts (G, K)."""
    probs = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return torch.exp(-(probs * torch.log(probs + 1e-10)).sum(-1)).sum()


def vq_ema_reference(
    x: torch.Tensor,
    codebook: torch.Tensor,
    ema_count: torch.Tensor,
    ema_weight: torch.Tensor,
    layout: Layout,
    *,
    training: bool,
    decay: float,
    eps: float,
    commitment: float,
    all_reduce=None,
):
    """Returns (quantized, indices, loss, perplexity); updates the EMA state in place if training.

    `all_reduce`, if given, is applied to the batch counts and sums before the update (DDP).
    """
    G, K, d = codebook.shape
    xf = layout.to_groups(x).float()                      # (G, N, d)
    distances = torch.baddbmm(
        (codebook**2).sum(-1).unsqueeze(1) + (xf**2).sum(-1, keepdim=True),
        xf, codebook.transpose(1, 2), alpha=-2.0, beta=1.0,
    )                                                      # (G, N, K)
    indices = distances.argmin(-1)                         # (G, N)
    encodings = F.one_hot(indices, K).float()
    q = torch.gather(codebook, 1, indices.unsqueeze(-1).expand(-1, -1, d))

    batch_counts = encodings.sum(1)                        # (G, K)
    if training:
        with torch.no_grad():
            batch_sums = torch.bmm(encodings.transpose(1, 2), xf.detach())
            if all_reduce is not None:
                batch_counts, batch_sums = all_reduce(batch_counts.clone(), batch_sums)
            count = decay * ema_count + (1 - decay) * batch_counts
            total = count.sum(-1, keepdim=True)
            ema_count.copy_((count + eps) / (total + K * eps) * total)
            ema_weight.mul_(decay).add_((1 - decay) * batch_sums)
            codebook.copy_(ema_weight / ema_count.unsqueeze(-1))

    loss = commitment * F.mse_loss(xf, q.detach())
    perplexity = perplexity_of(encodings.sum(1))
    q_st = xf + (q - xf).detach()
    quantized = layout.from_groups(q_st).to(x.dtype)
    return quantized, layout.indices_from_groups(indices), loss, perplexity
