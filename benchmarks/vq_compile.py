"""Ahead-of-time compile of every Triton VQ kernel variant the dispatcher launches, for sm_80 and
sm_90, without a GPU; per variant: registers, spills, shared memory, occupancy, and a prediction
of its time on the target's flagship GPU (A100 for sm_80, H100 for sm_90) from what the compiler
produced: the SASS of the cubin (nvdisasm from the Triton wheel), its hot loop's instructions x
the loop's iterations x warps over the issue rate, beside the bytes at 90% of peak bandwidth and
the tensor-core time; predicted = the largest, plus the launch.

How: the real dispatcher (lapo_fast.ops.vq_ema, backend "triton", forward and backward) runs on
CPU tensors with each kernel swapped for a recorder and the GPU's facts (132 or 108
multiprocessors) standing in, so it makes the launches a CUDA run makes. Triton's own binder
then specialises each launch for a CUDA target (dtypes, divisibility by 16, ints equal to 1) and
triton.compile goes to cubin with the ptxas that ships in the Triton wheel.

Used by `python benchmarks/vq_kernel.py --compile-only [--json OUT]` and by tests/test_vq_compile.py.
Must run without TRITON_INTERPRET (the kernels must be JITFunctions): it clears it at import.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="lapo-fast-aot-"))
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: registers and spills
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import lapo_fast.kernels.vq as KV  # noqa: E402
from lapo_fast.ops import vq as vq_op  # noqa: E402
if __package__ in (None, ""):  # `python benchmarks/vq_compile.py`: the repository root on the path, not benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lapo_fast.ops.gpus import GPUS as BY_NAME  # noqa: E402
from lapo_fast.ops.gpus import Gpu  # noqa: E402
from lapo_fast.ops.vq_cases import TOKENIZER_CASES  # noqa: E402
from lapo_fast.ops.vq_cases import VQ_CASES as BENCH_CASES  # noqa: E402

KERNELS = ("vq_search_resident_kernel", "vq_search_kernel", "vq_code_norms_kernel", "vq_search_gemm_kernel",
           "vq_gemm_rows_kernel", "vq_finalize_kernel", "vq_backward_kernel")


GPUS = {80: BY_NAME["A100"], 90: BY_NAME["H100"]}  # the compile targets' GPUs (lapo_fast/ops/gpus.py)
SCHEDULERS = 4     # warp schedulers per SM: at most one warp-instruction each per clock
SUSTAINED = 0.9    # of the data-sheet bandwidth that streaming kernels reach on these parts
MIN_WARPS_PER_SM = 16

# Beside the benchmark's cases (BENCH_CASES), shapes that reach every block configuration the
# dispatcher can pick (for the shared-memory check on all accepted layouts).
COVERAGE_CASES = [
    ("K128 d16 N=1000", "grouped", 1000, 1, 128, 16, 1),   # resident, widest codebook
    ("K32 d64 N=1000", "grouped", 1000, 1, 32, 64, 1),     # resident, widest rows
    ("lapo layout d32 B=500", "lapo", 500, 2, 64, 32, 4),  # resident, LAPO view with d=32
    ("K8 d4 N=1", "grouped", 1, 1, 8, 4, 1),               # resident, padded: strided rows
    ("K100 d33 N=1000", "grouped", 1000, 3, 100, 33, 1),   # general, masked codes and dims
    ("K64 d512 N=256", "grouped", 256, 1, 64, 512, 1),     # general, d in 16 chunks
]
MODES = ("train", "eval", "train-det", "train-nocheck")


def cases(quick: bool = False) -> list[dict]:
    out = []
    for name, *shape in BENCH_CASES:
        lapo = name.startswith("LAPO")
        for dtype in ((torch.float32, torch.bfloat16, torch.float16) if lapo else (torch.float32, torch.bfloat16)):
            # (the deterministic mode of a large codebook: the general search, not the GEMM one)
            for mode in (MODES if lapo else ("train", "eval", "train-det")):
                out.append(dict(name=name, shape=tuple(shape), dtype=dtype, mode=mode, lapo=lapo))
    if not quick:
        for name, *shape in COVERAGE_CASES:
            out.append(dict(name=name, shape=tuple(shape), dtype=torch.float32, mode="train", lapo=False))
        for name, *shape in TOKENIZER_CASES:  # VQ-VAE codebooks: the general search, K up to 16,384
            for dtype in (torch.float32, torch.bfloat16):
                out.append(dict(name=name, shape=tuple(shape), dtype=dtype, mode="train", lapo=False))
    return out


# -- 0. the SASS of a cubin ------------------------------------------------------------------------

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+`\((\.L_x_\d+)\)")
COUNTED = ("SHFL", "LDS", "STS", "BAR", "HMMA", "LDG", "STG", "RED", "ATOM", "CALL")  # CALL: its body is not counted


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout


def sass_loops(text: str) -> dict:
    """The instructions of a kernel's SASS (NOPs left out) and its loops, one per backward branch:
    [start address, branch address, instructions], outermost (longest) first, and the opcodes
    counted in the outermost."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        if m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.match(line):
            addr = int(m.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            instrs.append((addr, m.group(2)))
    body = [(a, t) for a, t in instrs if not t.endswith("NOP") and t.split()[0] != "NOP"]
    loops = []
    for addr, t in instrs:
        if (m := _BRANCH.search(t)) and labels[m.group(1)] < addr:
            start = labels[m.group(1)]
            loops.append([start, addr, sum(1 for a, _ in body if start <= a <= addr)])
    loops.sort(key=lambda lp: lp[0] - lp[1])
    ops = {}
    if loops:
        inside = [t for a, t in body if loops[0][0] <= a <= loops[0][1]]
        ops = {op: sum(1 for t in inside if re.search(rf"\b{op}(\.|\b)", t)) for op in COUNTED}
    return {"instructions": len(body), "loops": loops, "loop_ops": ops}


# -- 1. the dispatcher's launches ------------------------------------------------------------------

class _Recorder:
    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.fn, tuple(grid), args, kwargs))


@contextlib.contextmanager
def _recording(sms: int, arch: int):
    launches: list = []
    saved = {k: getattr(KV, k) for k in KERNELS}
    facts = vq_op._launch_facts
    env = os.environ.get("TRITON_INTERPRET")
    for k in KERNELS:
        setattr(KV, k, _Recorder(saved[k], launches))
    vq_op._launch_facts = lambda device: (sms, arch)
    os.environ["TRITON_INTERPRET"] = "1"  # only so that the dispatcher takes CPU tensors for "triton"
    try:
        yield launches
    finally:
        for k, v in saved.items():
            setattr(KV, k, v)
        vq_op._launch_facts = facts
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


def launches_of(case: dict, arch: int) -> list:
    layout, B, G, K, d, L = case["shape"]
    gen = torch.Generator().manual_seed(0)
    cb = (torch.rand(G, K, d, generator=gen) * 2 - 1) * (5.0 / K)
    state = [cb, torch.zeros(G, K), cb.clone()]
    x = (0.1 * torch.randn(B, G * d * L, generator=gen)).to(case["dtype"])
    training = case["mode"] != "eval"
    x.requires_grad_(training)
    with _recording(GPUS[arch].sms, arch) as launches:
        out = vq_op.vq_ema(x, *state, layout=layout, num_latents=L, backend="triton", training=training,
                           deterministic=case["mode"] == "train-det",
                           check_finite=case["mode"] != "train-nocheck", raise_nonfinite=False)
        if training:
            (out.quantized.float().sum() + out.loss).backward()
    return launches


# -- 2. specialise and compile ---------------------------------------------------------------------

_BINDERS: dict = {}
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def specialise(fn, args, kwargs, arch: int):
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    if (fn.__name__, arch) not in _BINDERS:
        _BINDERS[fn.__name__, arch] = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, spec, opts = _BINDERS[fn.__name__, arch](*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return target, options, signature, constexprs, attrs


def compile_variant(job) -> dict:
    """job: (kernel name, arch, options, signature, constexprs, attrs) -> its resource figures."""
    name, arch, options, sig, cx, attrs = job
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(getattr(KV, name), sig, cx, attrs), target=GPUTarget("cuda", arch, 32),
                               options=options.__dict__)
    except Exception as e:  # every failure is reported, not just the first
        first = str(e).strip().splitlines()
        return dict(ok=False, error=f"{type(e).__name__}: {first[0][:300] if first else ''}")
    text = log.getvalue()
    regs, spill = _REGS.search(text), _SPILL.search(text)
    r = dict(ok=True, registers=int(regs.group(1)) if regs else None,
             spill_bytes=(int(spill.group(1)) + int(spill.group(2))) if spill else 0,
             shared_bytes=k.metadata.shared, warps=k.metadata.num_warps,
             tensor_core_ops=len(re.findall(r"\b(w?gmma|mma)\.", k.asm["ptx"])))
    r["warps_per_sm"] = warps_per_sm(GPUS[arch], r["registers"], r["shared_bytes"], r["warps"])
    r["sass"] = sass_loops(disassemble(k.asm["cubin"]))
    r["cubin"] = k.asm["cubin"]
    gpu = GPUS[arch]
    if r["shared_bytes"] > gpu.smem_block:
        r.update(ok=False,
                 error=f"{r['shared_bytes']} B of shared memory per program > {gpu.smem_block} B on sm_{arch}")
    return r


def warps_per_sm(gpu: Gpu, regs, smem: int, warps: int) -> int | None:
    if regs is None:
        return None
    per_warp = -(-regs * 32 // 256) * 256  # register allocation granularity: 256 per warp
    by_regs = gpu.regs // (per_warp * warps)
    by_smem = gpu.smem_sm // (smem + 1024) if smem else gpu.blocks  # 1 KB reserved per block
    return min(by_regs, by_smem, gpu.blocks, gpu.warps // warps) * warps


# -- 3. roofline prediction ------------------------------------------------------------------------

def _arg(launch, name):
    fn, _grid, args, kwargs = launch
    names = [p.name for p in fn.params]
    return kwargs[name] if name in kwargs else args[names.index(name)]


def _trips(launch) -> tuple[int, list[int]]:
    """(iterations of the outermost loop over all programs, trips per parent iteration of each loop
    nested in it, in program order, as the kernel's source has them). The searches' persistent loop
    takes every row tile of every group once; inside it the general search walks the code tiles
    (and in them the dimension chunks), then the chunks for q, then the code tiles (and chunks) for
    the sums; the GEMM search the code tiles (chunks in them unless ONE_CHUNK), then the chunks."""
    fn, grid, args, kwargs = launch
    programs = math.prod(grid)
    if not fn.__name__.startswith(("vq_search", "vq_gemm_rows")):
        return programs, []
    chunks = -(-_arg(launch, "d") // kwargs["BLOCK_D"])
    if fn.__name__ == "vq_gemm_rows_kernel":  # every row tile once: the splits' partials (unrolled), the chunks
        return _arg(launch, "num_tiles") * grid[1], [chunks]
    tiles = _arg(launch, "num_tiles") * grid[1]
    codes = -(-_arg(launch, "K") // kwargs["BLOCK_K"])
    if fn.__name__ == "vq_search_kernel":
        return tiles, [codes, chunks, chunks, codes, chunks]
    if fn.__name__ == "vq_search_gemm_kernel":  # each row tile once per split, over the split's code tiles
        splits = grid[2] if len(grid) > 2 else 1
        per = -(-_arg(launch, "codes_per_split") // kwargs["BLOCK_K"]) if splits > 1 else codes
        inner = [per] if kwargs["ONE_CHUNK"] else [per, chunks]
        return tiles * splits, inner if kwargs["SPLIT_CODES"] else inner + [chunks]
    return tiles, []


def _bytes(launch) -> tuple[float, float]:
    """(bytes the launch moves, of them compulsory: the floor's)."""
    fn, grid, args, kwargs = launch
    name = fn.__name__
    if name == "vq_backward_kernel":
        nbytes = _arg(launch, "numel") * _arg(launch, "x_ptr").element_size() * 4  # grad_q, x, q in; grad_x out
        return nbytes, nbytes
    if name == "vq_finalize_kernel":
        K, d, G, P = (_arg(launch, k) for k in ("K", "d", "G", "P"))
        nbytes = 4 * (G * K * (3 * d + 3) + G * P)
        return nbytes, nbytes
    if name == "vq_gemm_rows_kernel":  # the splits' partials in, then as the search's end: x in, q and indices out
        x, G, rows = _arg(launch, "x_ptr"), _arg(launch, "G"), _arg(launch, "n_batch") * _arg(launch, "L")
        floor = rows * G * (_arg(launch, "d") * x.element_size() * 2 + 8)
        return floor + rows * G * 8 * kwargs["SPLITS"], floor
    if name == "vq_code_norms_kernel":  # the codebook in, its TF32 halves and norms out, old counts in, zeros out
        K, d, G = (_arg(launch, k) for k in ("K", "d", "G"))
        nbytes = 4 * G * K * (3 * d + 3 + (d if kwargs["ZERO_SUMS"] else 0))
        return nbytes, nbytes
    x = _arg(launch, "x_ptr")
    G, K, d, L = (_arg(launch, k) for k in ("G", "K", "d", "L"))
    rows = _arg(launch, "n_batch") * L
    floor = rows * G * d * x.element_size() * 2 + rows * G * 8  # x in, q out, indices out
    programs = grid[0] * grid[1]
    partials = programs * G * K * d * 4 * (2 if kwargs.get("DETERMINISTIC") else 0)
    code_tiles = -(-K // kwargs["BLOCK_K"])
    reloads = 0 if name == "vq_search_resident_kernel" else rows * G * d * x.element_size() * code_tiles
    if name == "vq_search_gemm_kernel":  # x once per row tile if it fits one chunk; c's halves per row tile
        reloads = (0 if kwargs["ONE_CHUNK"] else reloads) + _arg(launch, "num_tiles") * G * K * (2 * d + 1) * 4
        if kwargs["SPLIT_CODES"]:  # x read by every split; partials out; q and indices: vq_gemm_rows_kernel's
            splits = grid[2]
            xin = rows * G * d * x.element_size()
            return xin * splits + rows * G * 8 * splits + reloads / 4, 0
    return floor + partials + reloads / 4, floor  # L2 re-reads counted at a quarter of HBM's cost


def _mma_flops(launch) -> float:
    """Tensor-core work of a search, in TF32 products (a 16-bit product at twice the rate counts
    half): distances in TF32x3 (3 products) or 2 for 16-bit x, in the resident kernel 3 bf16 ones
    (1.5) for bf16 x; the resident kernel's sums 2 (fp32 x) or 1/2, and with NARROW its counts, one
    product with a 16-wide ones (half for 16-bit x); the general kernel's sums 3."""
    fn, grid, args, kwargs = launch
    if not fn.__name__.startswith("vq_search"):
        return 0.0
    x = _arg(launch, "x_ptr")
    K, d = _arg(launch, "K"), _arg(launch, "d")
    bn, bk, bd = (kwargs[k] for k in ("BLOCK_N", "BLOCK_K", "BLOCK_D"))
    tiles = _arg(launch, "num_tiles") * grid[1]
    resident, wide = fn.__name__ == "vq_search_resident_kernel", x.element_size() == 4
    products = 3 if wide or not resident else 1.5 if x.dtype == torch.bfloat16 else 2
    if fn.__name__ == "vq_search_gemm_kernel":  # distances only: the sums are atomics
        products = 3 if kwargs["SPLIT_X"] else 2
    elif kwargs["ACCUMULATE_SUMS"]:
        products += (2 if wide else 0.5) if resident else 3
    if resident and kwargs["NARROW"]:
        products += (1 if wide else 0.5) * 16 / bd
    return tiles * products * 2 * bn * bk * bd * -(-K // bk) * -(-d // bd)


def predict(launch, gpu: Gpu, r: dict) -> dict:
    """One launch's time from its compiled code: issue (the SASS's instructions as they execute:
    outside the outermost loop once per program, its body once per iteration, nested loops' bodies
    per their trips; times warps; the busiest SM's share of the programs, over 4 schedulers x
    clock), memory (bytes at 90% of peak), tensor cores (TF32 rate); predicted = the largest, plus
    a launch."""
    fn, grid, args, kwargs = launch
    programs = math.prod(grid)
    sass = r["sass"]
    iterations, inner_trips = _trips(launch)
    loops = sass["loops"]
    body = loops[0][2] if loops else 0
    executed = programs * (sass["instructions"] - body) + iterations * body
    if loops:  # loops nested in the outermost: their bodies again, (trips - 1) times per parent pass
        outer = loops[0]
        nested = sorted((lp for lp in loops[1:] if outer[0] <= lp[0] and lp[1] <= outer[1]), key=lambda lp: lp[0])
        if len(nested) != len(inner_trips):
            raise ValueError(f"{fn.__name__}: {len(nested)} loops in its SASS's persistent loop, the model knows "
                             f"{len(inner_trips)}: update _trips")
        for i, (start, end, n) in enumerate(nested):
            runs = 1  # passes of the loops around it
            for j, (s0, e0, _) in enumerate(nested):
                if j != i and s0 <= start and end <= e0:
                    runs *= inner_trips[j]
            executed += iterations * runs * (inner_trips[i] - 1) * n
    warps = r["warps"]
    nbytes, floor = _bytes(launch)
    # The busiest multiprocessor's share of the issue slots and tensor cores: programs are spread
    # evenly, so with fewer programs than multiprocessors (a few row tiles) the others idle and one
    # program's work is the time. (Bytes are not scaled: a few SMs still draw much of the bandwidth.)
    per_sm = -(-programs // gpu.sms)
    share = per_sm * gpu.sms / programs  # 1 when the programs fill every SM evenly
    out = {"sass_instructions": sass["instructions"], "sass_loop_instructions": body, "loop_iterations": iterations,
           "loop_ops": sass["loop_ops"], "warps": warps, "programs": programs,
           "issue_us": share * executed * warps / (gpu.sms * SCHEDULERS * gpu.clock) * 1e6,
           "memory_us": nbytes / (SUSTAINED * gpu.bandwidth) * 1e6,
           "mma_us": share * _mma_flops(launch) / gpu.tf32 * 1e6, "launch_us": gpu.launch_s * 1e6,
           "mma_floor_us": _mma_flops(launch) / gpu.tf32 * 1e6,  # every SM's tensor cores busy
           "floor_us": floor / (SUSTAINED * gpu.bandwidth) * 1e6}
    out["predicted_us"] = max(out["issue_us"], out["memory_us"], out["mma_us"]) + out["launch_us"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


# -- 4. everything ---------------------------------------------------------------------------------

def run(archs=(80, 90), quick: bool = False, jobs: int | None = None, dump: str | None = None) -> dict:
    """Compiles every variant and returns {"rows": [...], "failures": [...], "constants": ...}. A row
    per (case, kernel launch, target), plus a row per (case, target) with kernel "step" summing a
    training step's launches: search, finalize and backward (and the zero-fill, counted as one launch,
    where no vq_code_norms_kernel does its zeroing).
    dump: a folder for each cubin, <kernel>.<target>.<case slug>.<dtype>.cubin."""
    variants: dict = {}
    per_case = []
    for case in cases(quick):
        for arch in archs:
            gpu = GPUS[arch]
            for launch in launches_of(case, arch):
                fn, grid, args, kwargs = launch
                target, options, sig, cx, attrs = specialise(fn, args, kwargs, arch)
                key = (fn.__name__, arch, repr(sorted(sig.items())), repr(sorted(cx.items())),
                       repr(sorted(attrs.items())))
                variants.setdefault(key, (fn.__name__, arch, options, sig, cx, attrs))
                per_case.append((case, arch, launch, key))
    keys = list(variants)
    if (jobs or os.cpu_count() or 1) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=mp.get_context("fork")) as pool:
            results = dict(zip(keys, pool.map(compile_variant, [variants[k] for k in keys])))
    else:
        results = {k: compile_variant(variants[k]) for k in keys}

    rows, failures, steps = [], [], {}
    zeroed = {(f"{c['name']} {c['mode']}", str(c["dtype"]).replace("torch.", ""), a)
              for c, a, _, k in per_case if k[0] == "vq_code_norms_kernel"}  # no zero-fill launch there
    for case, arch, launch, key in per_case:
        r = results[key]
        label = f"{case['name']} {case['mode']}"
        dtype = str(case["dtype"]).replace("torch.", "")
        gpu = GPUS[arch]
        model = predict(launch, gpu, r) if r["ok"] else {"predicted_us": None, "floor_us": None}
        row = dict(kernel=key[0], target=f"sm_{arch}", case=label, dtype=dtype, registers=r.get("registers"),
                   spill_bytes=r.get("spill_bytes"), shared_bytes=r.get("shared_bytes"),
                   warps_per_sm=r.get("warps_per_sm"), **model)
        rows.append(row)
        if dump and r["ok"]:
            os.makedirs(dump, exist_ok=True)
            slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
            with open(os.path.join(dump, f"{key[0]}.sm_{arch}.{slug}.{dtype}.cubin"), "wb") as f:
                f.write(r["cubin"])
        if not r["ok"]:
            failures.append(f"{key[0]} sm_{arch} {label} {dtype}: {r['error']}")
            continue
        if case["lapo"] and r["spill_bytes"]:
            failures.append(f"{key[0]} sm_{arch} {label} {dtype}: spills {r['spill_bytes']} B at the LAPO shape")
        if case["lapo"] and key[0] != "vq_finalize_kernel" and (r["warps_per_sm"] or 0) < MIN_WARPS_PER_SM:
            failures.append(f"{key[0]} sm_{arch} {label} {dtype}: {r['warps_per_sm']} warps/SM < {MIN_WARPS_PER_SM}")
        fill = 0.0 if (label, dtype, arch) in zeroed else _us(gpu.launch_s)
        s = steps.setdefault((label, dtype, arch), dict(  # the step: search + finalize (+ backward)
            kernel="step", target=f"sm_{arch}", case=label, dtype=dtype, registers=None, spill_bytes=None,
            shared_bytes=None, warps_per_sm=None, predicted_us=fill, floor_us=0.0,
            issue_us=0.0, memory_us=0.0, mma_us=0.0, mma_floor_us=0.0, launch_us=fill))
        for k in ("predicted_us", "floor_us", "issue_us", "memory_us", "mma_us", "mma_floor_us", "launch_us"):
            s[k] = round(s[k] + row[k], 2)
    constants = {f"sm_{a}": {"gpu": GPUS[a].name, "sms": GPUS[a].sms, "schedulers": SCHEDULERS,
                             "clock_hz": GPUS[a].clock, "bandwidth": GPUS[a].bandwidth, "sustained": SUSTAINED,
                             "tf32_flops": GPUS[a].tf32, "launch_s": GPUS[a].launch_s} for a in archs}
    return {"rows": rows + list(steps.values()), "failures": failures, "variants": len(variants),
            "triton": triton.__version__, "constants": constants}


def _us(seconds):
    return None if seconds is None else round(seconds * 1e6, 2)


if __name__ == "__main__":  # the same as `python benchmarks/vq_kernel.py --compile-only ...`
    from benchmarks.vq_kernel import main

    sys.argv.insert(1, "--compile-only")
    main()
