"""VQ-EMA forward + EMA update: lapo_fast.ops (fused) vs the PyTorch reference vs
vector-quantize-pytorch, same inputs, same run. CPU always; CUDA too when present.

    python benchmarks/vq_kernel.py [--quick] [--threads N] [--repeats R] [--tokenizer] [--json out.json]
    python benchmarks/vq_kernel.py --compile-only [--arch 80 90] [--json out.json]

--compile-only needs no GPU: it compiles every Triton variant the dispatcher launches to cubin
(benchmarks.vq_compile) and prints registers, spills, shared memory, warps per SM and a
roofline prediction against the bandwidth floor; exit 1 on a compile error, shared memory over a
target's limit, or a spill or fewer than 16 warps/SM at the LAPO shape.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

if __package__ in (None, ""):  # `python benchmarks/vq_kernel.py`: the repository root on the path, not benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import dump_json, median_time, print_table
from lapo_fast.ops.vq_cases import TOKENIZER_CASES, VQ_CASES

warnings.filterwarnings("ignore")



def fresh_state(G, K, d, device):
    cb = (torch.rand(G, K, d, device=device) * 2 - 1) * (5.0 / K)
    return cb, torch.zeros(G, K, device=device), cb.clone()


def ours(case, x, device, threads):
    from lapo_fast.ops import vq_ema

    _, layout, B, G, K, d, L = case
    state = fresh_state(G, K, d, device)
    return lambda: vq_ema(x, *state, layout=layout, num_latents=L, training=True, num_threads=threads)


def reference(case, x, device, threads):
    from lapo_fast.ops import Layout, vq_ema_reference

    _, layout, B, G, K, d, L = case
    state = fresh_state(G, K, d, device)
    lay = Layout.of(x, G, d, layout, L)
    return lambda: vq_ema_reference(x, *state, lay, training=True, decay=0.999, eps=1e-5, commitment=0.05)


def vector_quantize_pytorch(case, x, device, threads):
    from vector_quantize_pytorch import VectorQuantize

    _, layout, B, G, K, d, L = case
    vq = VectorQuantize(dim=G * d, codebook_size=K, heads=G, separate_codebook_per_head=G > 1,
                        decay=0.999, commitment_weight=0.05, kmeans_init=False).to(device).train()
    # LAPO: (B, G*d*L) -> L tokens of G*d per sample; generic: one token of G*d per row.
    tokens = x.view(B, G * d, L).transpose(1, 2) if layout == "lapo" else x.view(B, 1, G * d)

    def run():
        with torch.no_grad():
            return vq(tokens)

    return run


CONTENDERS = [("ours", ours), ("reference", reference), ("vector-quantize-pytorch", vector_quantize_pytorch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every contender")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda if present")
    p.add_argument("--cases", nargs="+", default=None, help="substring filter on case names")
    p.add_argument("--tokenizer", action="store_true", help="the tokenizer shapes (K 1024-16384, d 8-256) instead")
    p.add_argument("--json", default=None)
    p.add_argument("--compile-only", action="store_true", help="AOT-compile the Triton kernels for --arch; no timing")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities for --compile-only")
    p.add_argument("--quick", action="store_true",
                   help="seconds, not minutes: the cases up to 4,096 rows, 3 repeats (--compile-only: its cases only)")
    p.add_argument("--dump", default=None, metavar="DIR",
                   help="--compile-only: write each cubin as <kernel>.<target>.<case>.<dtype>.cubin")
    args = p.parse_args()
    if args.compile_only:
        sys.exit(compile_only(args))
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    rows = []
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else None
        for case in TOKENIZER_CASES if args.tokenizer else VQ_CASES:
            name, layout, B, G, K, d, L = case
            if (args.cases and not any(c in name for c in args.cases)) or (args.quick and B * K * d > 2**23):
                continue
            x = torch.randn(B, G * d * L, device=device) * 0.1
            bytes_moved = 2 * x.numel() * 4 + B * G * L * 8  # read x, write q, write indices
            times = {}
            for cname, make in CONTENDERS:
                try:
                    fn = make(case, x, device, args.threads)
                except ImportError as e:
                    print(f"# {cname} unavailable: {e}", file=sys.stderr)
                    continue
                reps = args.repeats if B * K * d < 2**28 else max(3, args.repeats // 2)
                times[cname] = median_time(fn, reps, warmup=2, sync=sync)
            if "reference" not in times:  # a ratio without its anchor is no result
                sys.exit(f"vq_kernel: the PyTorch reference did not run for {name} on {device}")
            for cname, t in times.items():
                rows.append({"device": device, "case": name, "impl": cname, "ms": t * 1e3,
                             "gb_per_s": bytes_moved / t / 1e9, "ours_speedup": t / times["ours"]})
            print(f"{device:>4} {name:<18} ours {times['ours'] * 1e3:9.3f} ms   "
                  + "   ".join(f"x{times[c] / times['ours']:.1f} vs {c}" for c in times if c != "ours"),
                  flush=True)

    print()
    print_table(rows, [("device", "device", ""), ("case", "case", ""), ("impl", "implementation", ""),
                       ("ms", "median ms", ".3f"), ("gb_per_s", "GB/s", ".2f"),
                       ("ours_speedup", "it / ours", ".1f")])
    if args.json:
        dump_json(args.json, {"benchmark": "vq_kernel", "threads": args.threads, "rows": rows})


def compile_only(args) -> int:
    from benchmarks import vq_compile

    result = vq_compile.run(tuple(args.arch), quick=args.quick, dump=args.dump)
    step_rows = [r for r in result["rows"] if r["kernel"] == "step"]
    kernel_rows = {}
    for r in result["rows"]:  # one line per (kernel, target, variant figures): the cases share variants
        if r["kernel"] != "step":
            kernel_rows.setdefault((r["kernel"], r["target"], r["dtype"], r["registers"], r["spill_bytes"],
                                    r["shared_bytes"], r["warps_per_sm"], r.get("sass_loop_instructions")), r)
    print_table(list(kernel_rows.values()), [
        ("kernel", "kernel", ""), ("target", "target", ""), ("dtype", "dtype", ""), ("case", "first case", ""),
        ("registers", "regs", "d"), ("spill_bytes", "spill B", "d"), ("shared_bytes", "smem B", "d"),
        ("warps_per_sm", "warps/SM", "d"), ("warps", "warps", "d"), ("sass_instructions", "SASS", "d"),
        ("sass_loop_instructions", "loop SASS", "d")])
    print()
    for r in step_rows:
        r["ratio"] = r["predicted_us"] / r["floor_us"] if r["floor_us"] else None
    print_table([r for r in step_rows if r["case"].endswith(" train")], [
        ("target", "target", ""), ("case", "search + finalize + backward", ""), ("dtype", "dtype", ""),
        ("issue_us", "issue us", ".1f"), ("memory_us", "memory us", ".1f"), ("mma_us", "mma us", ".1f"),
        ("launch_us", "launches us", ".1f"), ("predicted_us", "predicted us", ".1f"),
        ("floor_us", "floor us", ".1f"), ("ratio", "x floor", ".2f")])
    print(f"\n{result['variants']} variants compiled with triton {result['triton']}; "
          f"{len(result['failures'])} failure(s)")
    for f in result["failures"]:
        print("FAIL", f)
    if args.json:
        dump_json(args.json, {"benchmark": "vq_kernel --compile-only", "triton": result["triton"],
                              "constants": result["constants"], "rows": result["rows"],
                              "failures": result["failures"]})
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    main()
