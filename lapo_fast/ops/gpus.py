"""GPUs' public data-sheet figures (SXM parts), declared once: the selftest's memory floor reads
their bandwidth, the compile-time model (benchmarks/vq_compile.py) all of them for sm_80/sm_90."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    bandwidth: float          # HBM bytes/s
    fp32: float = 0.0         # FP32 lane-instructions/s (FMA or simple op): SMs x 128 lanes x clock
    tf32: float = 0.0         # dense TF32 tensor-core flop/s
    atomics: float = 0.0      # L2 reductions/s (about one per clock per L2 slice)
    launch_s: float = 0.0     # GPU time of a back-to-back small kernel
    clock: float = 1.41e9     # boost clock, Hz
    regs: int = 65536         # registers per SM
    smem_sm: int = 0          # shared memory per SM
    smem_block: int = 0       # the most one program may ask for (the launch fails above it)
    warps: int = 64
    blocks: int = 32


# By the name torch.cuda.get_device_name contains; 0: not modelled (only A100/H100 are, by the compile model).
GPUS: dict[str, Gpu] = {
    "A100": Gpu("A100", 108, 2.04e12, 108 * 128 * 1.41e9, 156e12, 80 * 1.41e9, 2.5e-6, clock=1.41e9,
                smem_sm=164 * 1024, smem_block=166912),
    "H100": Gpu("H100", 132, 3.35e12, 132 * 128 * 1.98e9, 495e12, 96 * 1.75e9, 2.0e-6, clock=1.98e9,
                smem_sm=228 * 1024, smem_block=232448),
    "H200": Gpu("H200", 132, 4.8e12),
    "L40S": Gpu("L40S", 142, 0.864e12),
    "B200": Gpu("B200", 148, 8.0e12),
}


def gpu_named(device_name: str) -> Gpu | None:
    """The GPU whose name `device_name` (e.g. 'NVIDIA H100 80GB HBM3') contains, or None."""
    return next((g for key, g in GPUS.items() if key in device_name), None)
