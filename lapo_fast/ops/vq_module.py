"""VectorQuantizerEMA: the nn.Module around vq_ema, owning the codebook state."""

from __future__ import annotations

import torch
from torch import nn

from .vq import NonFiniteError, VQOutput, _check_scalars, vq_ema
from .vq_layout import Layout


class VectorQuantizerEMA(nn.Module):
    """EMA vector quantiser with LAPO's defaults (2 codebooks x 64 codes x 16 dims, 4 latents).

    layout="lapo" takes x of shape (B, num_codebooks * dim * num_latents) viewed as the reference
    LAPO code does; layout="grouped" takes x (..., num_codebooks * dim).

    dead_code_threshold > 0: after each update, codes whose EMA count fell below it are refilled
    with random rows of the batch (count set to the threshold, weight to row * threshold), on the
    device with no host read; under DDP the state is then broadcast from rank 0 every step.
    kmeans_init: the first training batch initialises the codebook by k-means (kmeans_iters).
    """

    def __init__(
        self,
        num_codebooks: int = 2,
        codebook_size: int = 64,
        dim: int = 16,
        num_latents: int = 4,
        *,
        layout: str = "lapo",
        decay: float = 0.999,
        eps: float = 1e-5,
        commitment: float = 0.05,
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        backend: str = "auto",
        deterministic: bool = False,
        seed: int = 0,
        sync: str = "auto",
    ):
        super().__init__()
        _check_scalars(decay, eps, commitment)
        if not 0.0 <= dead_code_threshold < float("inf") or kmeans_iters < 1:
            raise ValueError(f"VectorQuantizerEMA: dead_code_threshold must be a finite number >= 0 and kmeans_iters "
                             f">= 1, got {dead_code_threshold} and {kmeans_iters}")
        if min(num_codebooks, codebook_size, dim, num_latents) < 1:
            raise ValueError("num_codebooks, codebook_size, dim and num_latents must be >= 1")
        if layout == "grouped" and num_latents != 1:
            raise ValueError("num_latents applies to the 'lapo' layout only; use 1 with 'grouped'")
        self.num_codebooks, self.codebook_size, self.dim = num_codebooks, codebook_size, dim
        self.num_latents, self.layout = num_latents, layout
        self.decay, self.eps, self.commitment = decay, eps, commitment
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_iters = kmeans_iters
        self.backend, self.deterministic, self.sync = backend, deterministic, sync
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

        # The reference LAPO initialisation: uniform(-5/K, 5/K), zero counts, weight = codes.
        codebook = (torch.rand(num_codebooks, codebook_size, dim, generator=self._generator) * 2 - 1)
        codebook *= 5.0 / codebook_size
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.zeros(num_codebooks, codebook_size))
        self.register_buffer("ema_weight", codebook.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._init_known = not kmeans_init  # the flag is read from the device once, not every step
        # Refill rows are picked by a hash of (seed, training calls so far, code): the count is in
        # the state dict, so a resumed run refills exactly as an uninterrupted one.
        self.register_buffer("refills", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> VQOutput:
        if self.training and not self._init_known:
            if not bool(self.initialized):
                self._kmeans_init(x)
            self._init_known = True
        out = vq_ema(
            x, self.codebook, self.ema_count, self.ema_weight, layout=self.layout,
            num_latents=self.num_latents, training=self.training, decay=self.decay, eps=self.eps,
            commitment=self.commitment, backend=self.backend, deterministic=self.deterministic, sync=self.sync,
        )
        if self.training and self.dead_code_threshold > 0:
            self._replace_dead_codes(x, torch.isfinite(out.loss))
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # Read once here, not in forward (where a host read would stall the step and break a compiled graph).
        self._init_known = bool(self.initialized)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Latents for given indices, in this module's layout (e.g. to decode a sampled code)."""
        G, d, L = self.num_codebooks, self.dim, self.num_latents
        if self.layout == "lapo":
            B = indices.shape[0]
            if tuple(indices.shape) != (B, G, L):
                raise ValueError(f"indices must be (B, {G}, {L}), got {tuple(indices.shape)}")
            flat = indices.transpose(0, 1).reshape(G, -1)
        else:
            if indices.shape[-1] != G:
                raise ValueError(f"indices must be (..., {G}), got {tuple(indices.shape)}")
            flat = indices.reshape(-1, G).transpose(0, 1)
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size})")
        q = torch.gather(self.codebook, 1, flat.unsqueeze(-1).expand(-1, -1, d))
        layout = Layout("lapo", (indices.shape[0],), G, d, L) if self.layout == "lapo" else \
            Layout("grouped", tuple(indices.shape[:-1]), G, d, 1)
        return layout.from_groups(q)

    # -- state refills (rare; plain torch) -------------------------------------------------------

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        lay = Layout.of(x, self.num_codebooks, self.dim, self.layout, self.num_latents)
        return lay.to_groups(x.detach()).float()  # (G, N, d)

    @torch.no_grad()
    def _kmeans_init(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if not torch.isfinite(rows).all():  # checked before any state is written, as the update path does
            raise NonFiniteError()
        G, N, d = rows.shape
        K = self.codebook_size
        for g in range(G):
            pick = torch.randint(N, (K,), generator=self._generator).to(rows.device)
            centroids = rows[g, pick].clone()
            sizes = torch.zeros(K, device=rows.device)
            for _ in range(max(1, self.kmeans_iters)):
                assign = torch.cdist(rows[g], centroids).argmin(-1)
                sizes = torch.bincount(assign, minlength=K).float()
                sums = torch.zeros_like(centroids).index_add_(0, assign, rows[g])
                used = sizes > 0
                centroids[used] = sums[used] / sizes[used, None]
            sizes = sizes.clamp(min=1.0)
            self.codebook[g] = centroids
            self.ema_count[g] = sizes
            self.ema_weight[g] = centroids * sizes[:, None]
        self._broadcast_state()
        self.initialized.fill_(True)

    @torch.no_grad()
    def _replace_dead_codes(self, x: torch.Tensor, batch_ok: torch.Tensor) -> None:
        """Every dead code takes a row of the batch, all on the device: no host read per step. A
        batch the update skipped (non-finite: its loss is NaN on CUDA) refills nothing, and no code
        takes a non-finite row (check_finite=False)."""
        rows = self._rows(x)  # (G, N, d)
        G, N, _ = rows.shape
        if N == 0:
            return
        pick = _mix(self.seed * 1_000_003 + self.refills * (G * self.codebook_size)
                    + torch.arange(G * self.codebook_size, device=rows.device)).remainder(N).view(G, -1)
        chosen = torch.gather(rows, 1, pick[..., None].expand(-1, -1, rows.shape[2]))  # (G, K, d)
        dead = (self.ema_count < self.dead_code_threshold)[..., None] & batch_ok \
            & torch.isfinite(chosen).all(-1, keepdim=True)  # (G, K, 1)
        self.refills += 1
        self.codebook.copy_(torch.where(dead, chosen, self.codebook))
        self.ema_count.copy_(torch.where(dead[..., 0], torch.full_like(self.ema_count, self.dead_code_threshold),
                                         self.ema_count))
        self.ema_weight.copy_(torch.where(dead, chosen * self.dead_code_threshold, self.ema_weight))
        self._broadcast_state()  # under DDP every call: rank 0's rows win (small: G x K x d)

    def _broadcast_state(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.codebook, self.ema_count, self.ema_weight):
                dist.broadcast(t, src=0)

    def extra_repr(self) -> str:
        return (f"codebooks={self.num_codebooks}, size={self.codebook_size}, dim={self.dim}, "
                f"latents={self.num_latents}, layout={self.layout!r}, decay={self.decay}, "
                f"commitment={self.commitment}, backend={self.backend!r}")


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash, >= 0: splitmix64's finaliser in torch's wrapping int64 arithmetic
    (its shifts are arithmetic, not logical: a different hash, as good a mix for picking rows)."""
    h = h.to(torch.int64)
    h = (h ^ (h >> 30)) * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    h = (h ^ (h >> 27)) * -7723592293110705685  # 0x94d049bb133111eb
    return (h ^ (h >> 31)) & 0x7FFFFFFFFFFFFFFF
