"""4-bit kernel benchmarks: nf4lora vs bitsandbytes, and vs a 16-bit matmul with the weight already dequantized.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--out DIR] [--quick] [--repeat N] [--peak-gbps X]
                                       [--only SECTIONS]

Same weights, same inputs, same run. Ratios are peer time / ours (> 1: ours faster).
- CPU: the torch path (what nf4lora.kernels runs for CPU tensors) vs bitsandbytes' CPU dequantize_4bit (to bf16)
  and matmul_4bit (its AVX-512 dequantize, then F.linear) in the compute dtype "auto" picks for this CPU
  (nf4lora.kernels.precision: bf16 with native bf16, else float32), the same on both sides.
- CUDA: GPU time of the kernels with L2 flushed before every call (CUDA-graph replay, Timer), in sections (--only
  picks some): dequant: dequantize vs bitsandbytes dequantize_4bit and vs a device copy of as many bytes
  (copy_ceiling), on 4096x4096, 4096x11008 and 8192x28672, and each of dequant.LAUNCH_SETTINGS; decode:
  matmul_4bit at M = 1, 2, 4, 8 (the GEMV) on the LLaMA-7B shapes vs bitsandbytes matmul_4bit and the copy
  ceiling; matmul: M = 16..4096 vs bitsandbytes and F.linear with the dequantized bf16 weight, the grad-input
  product, the fused kernel alone; host: per-call cost of 200 eager calls (what a Python caller pays) and a
  cProfile of 1000 host-side matmul_4bit calls at M = 1; crossover: fused vs GEMV vs dequantize + cuBLAS for
  M = 1..16, and which config autotuning chose per key.
- CPU --only host (TRITON_INTERPRET unset): the host cost of matmul_4bit at M = 1 and of the launchers with
  Triton's CUDA driver stubbed (host_cost_without_gpu): the Python side of a decode call, without a GPU.
Writes kernels-<device>.md and .json into DIR (default benchmarks/results/). --quick uses tiny shapes (the dry run
of gpu_check.sh). Targets are in docs/benchmarking.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import environment_block, fmt_time, markdown_table, time_fn, write_results, write_results_in

from nf4lora.kernels import dequantize, matmul_4bit
from nf4lora.kernels.dispatch import state_args
from nf4lora.kernels.precision import auto_compute_dtype
from nf4lora.nf4 import quantize_4bit

# (out_features N, in_features K) of LLaMA-7B's projections: q/k/v/o, gate/up, down.
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(512, 512), (768, 512)]
TARGETS = {
    "cpu": "dequantize NF4+DQ -> bf16 >= 1.0x bitsandbytes (CPU); Linear4bit forward+backward >= 1.3x bitsandbytes + "
    "PEFT is measured by bench_lora_cpu.py.",
    "cuda": "dequantize >= 90% of a device copy of as many bytes and >= 1.3x bitsandbytes (4096x11008, 8192x28672); "
    "GEMV M = 1 >= 1.5x bitsandbytes and >= 60% of HBM bandwidth (stretch 80%), M = 2..8 >= 1.3x bitsandbytes; "
    "matmul_4bit at M = 1 per call <= bitsandbytes'; small-M matmul (M = 16..512) >= 1.2x dequantize + cuBLAS; at "
    "M >= 2048 time <= 1.1x the dense bf16 matmul (dense / ours >= 0.91).",
}
SHORT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # HBM, vendor data sheets


def import_bitsandbytes():
    """bitsandbytes' functional module and matmul_4bit, or None (the run then says the peer is missing)."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_f
    except Exception as e:  # noqa: BLE001 - any import failure means "no peer", reported in the results
        print(f"bitsandbytes unavailable ({type(e).__name__}: {e}); peer columns stay empty", file=sys.stderr)
        return None
    return bnb_f, bitsandbytes.matmul_4bit


class Timer:
    """Median and spread in seconds. On CUDA, two clocks:

    - `timer.row(*fns)`: GPU time of the kernels alone, each call starting with a cold L2 (the weight comes from
      HBM, as in a model whose other layers ran in between). Each fn is captured CALLS_PER_GRAPH times in a CUDA
      graph, every call preceded by a write of a FLUSH_BYTES buffer (larger than any L2); a graph of the writes
      alone is replayed after each replay, and per call = (graph - writes-only graph) / CALLS_PER_GRAPH, median
      and p20..p80 over REPLAYS such pairs. A graph has no Python or launch gaps between kernels. All fns of a
      row are timed the same way: if one cannot be captured, every fn of the row is timed with
      triton.testing.do_bench instead (CUDA events around each eager call, L2 flushed before each) and its
      results say so (method FALLBACK). What the bandwidth and FLOP/s targets are about.
    - `timer.per_call(fn)`: wall time per call of 200 back-to-back eager calls (then one synchronize): what a
      Python caller pays, the larger of the host-side cost (argument checks, dispatch, launch) and the GPU time.
    On the CPU both are harness.time_fn. `timer(fn)` is `timer.row(fn)` for a single fn.
    """

    FLUSH_BYTES = 256 * 2**20  # H200's L2 is 50 MB; triton.testing.do_bench flushes with the same 256 MB
    CALLS_PER_GRAPH = 10
    REPLAYS = 25
    GRAPH = "CUDA graph, L2 flushed"
    FALLBACK = "do_bench, L2 flushed (CUDA graph capture failed in this row)"

    def __init__(self, device: str, repeat: int):
        self.device, self.repeat = device, repeat
        self._flush = self._flush_only = None  # made on first CUDA use

    def __call__(self, fn) -> dict:
        return self.row(fn)[0]

    def row(self, *fns) -> list[dict | None]:
        """One timing per fn (None for a fn that is None), all taken the same way."""
        if self.device != "cuda":
            return [None if fn is None else time_fn(fn, warmup=1, repeat=self.repeat) for fn in fns]
        try:
            graphs = [None if fn is None else self._capture(fn) for fn in fns]
        except Exception as e:  # noqa: BLE001 - reported, then the whole row is timed without graphs
            print(f"CUDA graph capture failed ({type(e).__name__}: {e}); this row is timed with do_bench",
                  file=sys.stderr)  # fmt: skip
            return [None if fn is None else self._do_bench(fn) for fn in fns]
        return [None if g is None else self._replay(g) for g in graphs]

    def _capture(self, fn):
        """A CUDA graph of CALLS_PER_GRAPH x [flush L2, fn()]; fn runs once eagerly first (compile, autotune)."""
        if self._flush is None:
            self._flush = torch.empty(self.FLUSH_BYTES, dtype=torch.int8, device="cuda")
            self._flush_only = self._capture_calls(lambda: None)
        return self._capture_calls(fn)

    def _capture_calls(self, fn):
        with torch.cuda.stream(torch.cuda.Stream()):  # warm-up and capture off the default stream, as triton's
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(self.CALLS_PER_GRAPH):
                    self._flush.zero_()
                    fn()
        torch.cuda.synchronize()
        return graph

    def _replay(self, graph) -> dict:
        per_call = []
        for _ in range(self.REPLAYS):  # paired with a writes-only replay each time, so drift cancels
            per_call.append((self._time(graph) - self._time(self._flush_only)) / self.CALLS_PER_GRAPH)
        p20, _, _, p80 = statistics.quantiles(per_call, n=5)
        return {"median": statistics.median(per_call), "min": p20, "max": p80, "method": self.GRAPH}

    @staticmethod
    def _time(graph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def _do_bench(self, fn) -> dict:
        import triton.testing

        median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median": median / 1e3, "min": low / 1e3, "max": high / 1e3, "method": self.FALLBACK}

    def per_call(self, fn, calls: int = 200) -> dict:
        if self.device != "cuda":
            return time_fn(fn, warmup=1, repeat=self.repeat)
        times = []
        for _ in range(5):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / calls)
        times.sort()
        return {"median": times[2], "min": times[0], "max": times[-1]}


def quantized_pair(n: int, k: int, device: str, bnb, quant_type="nf4", double_quant=True, dtype=torch.bfloat16):
    """The same weight in `dtype` quantized by nf4lora and by bitsandbytes (blocksize 64; bitsandbytes then
    dequantizes to `dtype`, its quant_state.dtype)."""
    w = torch.randn(n, k, dtype=dtype, device=device)
    ours = quantize_4bit(w, 64, quant_type, double_quant)
    peer = None
    if bnb is not None:
        peer = bnb[0].quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    return w, ours, peer


def dequant_bytes(n: int, k: int, double_quant: bool, out_bytes: int = 2) -> int:
    """Bytes a dequantization moves: codes, block constants (8-bit + nested with DQ), output."""
    blocks = -(-n * k // 64)
    constants = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return (n * k + 1) // 2 + constants + out_bytes * n * k


def row(results: list, rows: list, what: str, shape, m, ours: dict, peers: dict[str, dict | None], extra=None):
    """Append one result (JSON) and its table row: our median and spread, each peer's median and ratio."""
    entry = {"what": what, "shape": list(shape), "m": m, "ours_s": ours, **(extra or {})}
    if any(t is not None and t.get("method") == Timer.FALLBACK for t in (ours, *peers.values())):
        what += " ‡"  # every timing of this row came from do_bench (see Timer)
    cells = [what, f"{shape[0]}x{shape[1]}", "" if m is None else m, fmt_time(ours["median"]),
             f"{fmt_time(ours['min'])}..{fmt_time(ours['max'])}"]  # fmt: skip
    for name, peer in peers.items():
        entry[f"{name}_s"] = peer
        if peer is None:
            cells += ["n/a", "n/a"]
        else:
            entry[f"ratio_{name}"] = peer["median"] / ours["median"]
            cells += [fmt_time(peer["median"]), f"{peer['median'] / ours['median']:.2f}x"]
    if extra:
        cells.append(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()))
    results.append(entry)
    rows.append(cells)
    print(" | ".join(str(c) for c in cells), flush=True)  # the log keeps every row even if the run is cut short


def bench_cpu(args, bnb, timer, results, sections):
    """The CPU tables: dequant, matmul (the torch path), and host: the host cost of the GPU launchers with
    Triton's driver stubbed (of SECTIONS, as --only names them; host only when named)."""
    shapes = QUICK_SHAPES if args.quick else LLAMA_SHAPES[:2]
    only = set(args.only or ("dequant", "matmul"))
    if "dequant" in only:
        bench_cpu_dequant(args, bnb, timer, results, sections, shapes)
    if "matmul" in only:
        bench_cpu_matmul(args, bnb, timer, results, sections, shapes)
    if "host" in only:
        host_cost_without_gpu(timer, results, sections)


def bench_cpu_dequant(args, bnb, timer, results, sections, shapes):
    rows = []
    for n, k in shapes:
        for quant_type, dq in (("nf4", True), ("nf4", False), ("fp4", True)):
            _, (packed, state), peer = quantized_pair(n, k, "cpu", bnb, quant_type, dq)
            ours = timer(lambda: dequantize(packed, state, torch.bfloat16))
            theirs = timer(lambda: bnb[0].dequantize_4bit(*peer)) if bnb else None
            row(results, rows, f"dequantize {quant_type}{'+DQ' if dq else ''} -> bf16", (n, k), None, ours,
                {"bitsandbytes": theirs})  # fmt: skip
    sections.append(("Dequantize (CPU torch path)", ["op", "weight NxK", "M", "nf4lora", "range",
                     "bitsandbytes", "bnb / ours"], rows))  # fmt: skip


def bench_cpu_matmul(args, bnb, timer, results, sections, shapes):
    rows = []
    n, k = shapes[0]
    chosen = auto_compute_dtype("cpu")  # both sides compute in it
    dtype, short = chosen.dtype, SHORT_NAMES[chosen.dtype]
    w, (packed, state), peer = quantized_pair(n, k, "cpu", bnb, dtype=dtype)
    w_dense = dequantize(packed, state, dtype)
    for m in (1, 16) if args.quick else (1, 16, 512):
        x = torch.randn(m, k, dtype=dtype)
        with torch.no_grad():
            ours = timer(lambda: matmul_4bit(x, packed, state))
            theirs = timer(lambda: bnb[1](x, peer[0].t(), peer[1])) if bnb else None
            dense = timer(lambda: F.linear(x, w_dense))
        row(results, rows, "forward (no grad)", (n, k), m, ours, {"bitsandbytes": theirs, f"dense_{short}": dense})

        xg = x.clone().requires_grad_()
        dy = torch.randn(m, n, dtype=dtype)
        ours = timer(lambda: matmul_4bit(xg, packed, state).backward(dy))
        theirs = timer(lambda: bnb[1](xg, peer[0].t(), peer[1]).backward(dy)) if bnb else None
        dense = timer(lambda: F.linear(xg, w_dense).backward(dy))
        row(results, rows, "forward + grad-input", (n, k), m, ours, {"bitsandbytes": theirs, f"dense_{short}": dense})
    sections.append((f"matmul_4bit (CPU torch path), {short} (compute dtype auto: {chosen})", ["op", "weight NxK",
                     "M", "nf4lora", "range", "bitsandbytes", "bnb / ours", f"dense {short} (W pre-dequantized)",
                     "dense / ours"], rows))  # fmt: skip


class _StubDriver:
    """Triton's CUDA driver without a GPU, for timing host-side work: device 0, stream 0, sm_90 target; loading a
    kernel and launching it do nothing. Triton's compiler still compiles for real (it needs no GPU)."""

    class utils:
        @staticmethod
        def load_binary(*args):
            return 1, 1, 64, 0, 1024  # module, function, registers, spills, max threads

        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def __init__(self):
        self.launcher_cls = lambda src, metadata: (lambda *args: None)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def host_cost_without_gpu(timer, results, sections) -> None:
    """The Python cost of one decode-sized call on the host, measured on a machine without a GPU: Triton's driver
    is stubbed (_StubDriver), CPU tensors stand in for CUDA ones, and the launch itself does nothing, so each time
    is what a call costs before the GPU is involved. Rows: matmul_4bit at M = 1 through the dispatch (checks,
    autocast, ops, the GEMV launcher), the GEMV launcher alone, Triton's own dispatch of that launch
    (kernel[grid](...), which the launcher's cached launch replaces), and dequantize; F.linear of a 1x64 bf16
    row, a reference for this machine's speed. Needs TRITON_INTERPRET unset (compiled kernels, not interpreted)."""
    import os

    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise ValueError("the host cost without a GPU needs compiled kernels: unset TRITON_INTERPRET")
    os.environ["NF4LORA_BACKEND"] = "triton"  # CPU tensors through the Triton launchers
    driver.set_active(_StubDriver())
    from nf4lora.kernels import dequant, gemv

    for module in (dequant, gemv):  # the launchers accept CPU tensors only under the interpreter
        module.check_triton_device = lambda t, name: None
    n, k = LLAMA_SHAPES[0]
    packed, state = quantize_4bit(torch.randn(n, k), 64, "nf4", True)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    args_ = state_args(packed, state)
    constexprs = gemv._constexprs(1, k, 64, args_[7], True, False, gemv.DEFAULT_CONFIGS[1])
    y = torch.empty(1, n, dtype=torch.bfloat16)
    launch_args = (x, packed, *args_[1:6], y, y, 1, n, k, n)
    fns = {
        "matmul_4bit, M = 1 (no grad)": lambda: matmul_4bit(x, packed, state),
        "gemv launcher": lambda: gemv.gemv(x, None, *args_),
        "Triton's dispatch of that launch": lambda: gemv._gemv_kernel[(n // 8,)](*launch_args, **constexprs),
        "dequantize": lambda: dequant.dequantize(*args_, torch.bfloat16),
        "reference: F.linear, 1x64 bf16": lambda: F.linear(x[:, :64], x[:, :64]),
    }
    rows = []
    with torch.no_grad():
        for what, fn in fns.items():
            fn()  # compiles (for sm_90) on first use
            times = []
            for _ in range(15):  # the minimum of 15 rounds of 200 calls: this machine is shared and noisy
                t0 = time.perf_counter()
                for _ in range(200):
                    fn()
                times.append((time.perf_counter() - t0) / 200)
            t = {"median": statistics.median(times), "min": min(times), "max": max(times)}
            row(results, rows, what, (n, k), 1, t, {})
    sections.append(("Host cost per call without a GPU (Triton's driver stubbed: the launch does nothing; min of 15 "
                     "rounds of 200 calls is the number to compare)", ["op", "weight NxK", "M", "median",
                     "min..max"], rows))  # fmt: skip


def host_profile(fn, calls: int = 1000, top: int = 20) -> None:
    """Print where the host time of `calls` eager calls goes (cProfile, sorted by own time): the per-call table
    shows matmul_4bit at M = 1 costing more on the host than its kernel takes on the GPU."""
    import cProfile
    import pstats

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fn()
        profiler.disable()
        torch.cuda.synchronize()
    print(f"host profile of {calls} calls of matmul_4bit at M = 1 (cProfile, own time first):", flush=True)
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)
    sys.stdout.flush()


def gemv_bytes(n: int, k: int, m: int) -> int:
    """Bytes a GEMV moves: the packed weight and its block constants (NF4 + double quantization), x and y (bf16)."""
    return dequant_bytes(n, k, True, out_bytes=0) + 2 * m * (k + n)


def copy_ceiling(timer):
    """fn(nbytes) -> the timing of a device-to-device copy moving nbytes in all (nbytes / 2 read, as many written),
    timed as the kernels are (timer.row): the bandwidth a memory-bound kernel moving as many bytes can hope for.
    Cached per byte count."""
    found = {}

    def ceiling(nbytes: int):
        if nbytes not in found:
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            found[nbytes] = timer.row(lambda: dst.copy_(src))[0]
        return found[nbytes]

    return ceiling


SECTIONS = ("dequant", "decode", "matmul", "host", "crossover")
# Weights the memory-bound targets name (docs/benchmarking.md): LLaMA-7B's and a 70B-class MLP.
DEQUANT_SHAPES = [(4096, 4096), (4096, 11008), (8192, 28672)]
DECODE_MS = (1, 2, 4, 8)


def bench_cuda(args, bnb, timer, results, sections, device: str = "cuda"):
    """device: "cuda"; "cpu" only to smoke-test this function under TRITON_INTERPRET=1 with a stub timer (and no
    copy ceiling). args.only: the SECTIONS to run."""
    from nf4lora.kernels import dequant as dequant_kernel
    from nf4lora.kernels import gemv, matmul, ops

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = args.peak_gbps * 1e9 if args.peak_gbps else next((v for k, v in PEAK_BYTES_PER_S.items() if k in name), None)
    ceiling = copy_ceiling(timer) if device == "cuda" else (lambda nbytes: None)
    only = set(getattr(args, "only", None) or SECTIONS)

    def bandwidth(nbytes, t):
        gbps = nbytes / t["median"] / 1e9
        copy = ceiling(nbytes)
        return {"GB/s": gbps, "%peak": 100 * gbps * 1e9 / peak if peak else "n/a",
                "%copy": 100 * copy["median"] / t["median"] if copy else "n/a"}  # fmt: skip

    overhead = []
    if "dequant" in only:
        rows = []
        for n, k in QUICK_SHAPES if args.quick else DEQUANT_SHAPES:
            _, (packed, state), peer = quantized_pair(n, k, device, bnb)
            ours, theirs = timer.row(lambda: dequantize(packed, state, torch.bfloat16),
                                     (lambda: bnb[0].dequantize_4bit(*peer)) if bnb else None)  # fmt: skip
            row(results, rows, "dequantize nf4+DQ -> bf16", (n, k), None, ours, {"bitsandbytes": theirs},
                bandwidth(dequant_bytes(n, k, True), ours))  # fmt: skip
        sections.append(("Dequantize (Triton), GPU time; %copy: a device copy of as many bytes = 100", ["op",
                         "weight NxK", "M", "nf4lora", "p20..p80", "bitsandbytes", "bnb / ours", "bandwidth"], rows))

        # The launch settings (dequant.LAUNCH_SETTINGS) on the largest weight: the data to pick the default from.
        # Every setting writes the same bits (tests/test_kernels_triton.py) and passes the sm_90 gates.
        rows = []
        n, k = (QUICK_SHAPES if args.quick else DEQUANT_SHAPES)[-1]
        _, (packed, state), _ = quantized_pair(n, k, device, None)
        args_ = state_args(packed, state)
        for per_program, warps in dequant_kernel.LAUNCH_SETTINGS[:1] if args.quick else dequant_kernel.LAUNCH_SETTINGS:
            t, current = timer.row(  # the current setting timed again next to each, the same way
                lambda: dequant_kernel.dequantize(*args_, torch.bfloat16, elements_per_program=per_program,
                                                  num_warps=warps),
                lambda: dequant_kernel.dequantize(*args_, torch.bfloat16))  # fmt: skip
            row(results, rows, f"dequantize, {per_program} per program, {warps} warps", (n, k), None, t,
                {"current": current}, bandwidth(dequant_bytes(n, k, True), t))  # fmt: skip
        sections.append((f"Dequantize launch settings (current: {dequant_kernel.ELEMENTS_PER_PROGRAM} per program, "
                         f"{dequant_kernel.NUM_WARPS} warps), GPU time", ["op", "weight NxK", "M", "time", "p20..p80",
                         "current", "current / this", "bandwidth"], rows))  # fmt: skip

    if "decode" in only:  # the GEMV at decode batch sizes against bitsandbytes and the copy ceiling
        rows = []
        for n, k in QUICK_SHAPES if args.quick else LLAMA_SHAPES:
            w, (packed, state), peer = quantized_pair(n, k, device, bnb)
            for m in DECODE_MS:
                x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
                with torch.no_grad():
                    ours, theirs = timer.row(lambda: matmul_4bit(x, packed, state),
                                             (lambda: bnb[1](x, peer[0].t(), peer[1])) if bnb else None)  # fmt: skip
                row(results, rows, "forward", (n, k), m, ours, {"bitsandbytes": theirs},
                    {"path": ops.matmul_path(m), **bandwidth(gemv_bytes(n, k, m), ours)})  # fmt: skip
        sections.append(("Decode: matmul_4bit at M = 1..8 (the GEMV), bf16, GPU time; %copy: a device copy of as "
                         "many bytes = 100", ["op", "weight NxK", "M", "nf4lora", "p20..p80", "bitsandbytes",
                         "bnb / ours", "path, bandwidth"], rows))  # fmt: skip

    if "matmul" in only:
        rows, fused_rows = [], []
        for n, k in QUICK_SHAPES if args.quick else LLAMA_SHAPES:
            w, (packed, state), peer = quantized_pair(n, k, device, bnb)
            w_dense = dequantize(packed, state, torch.bfloat16)
            args_ = state_args(packed, state)
            for m in (16,) if args.quick else (16, 64, 512, 2048, 4096):
                x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
                with torch.no_grad():
                    ours, theirs, dense, fused = timer.row(
                        lambda: matmul_4bit(x, packed, state),
                        (lambda: bnb[1](x, peer[0].t(), peer[1])) if bnb else None,
                        lambda: F.linear(x, w_dense),
                        (lambda: matmul.matmul(x, None, *args_)) if m > gemv.MAX_M else None)  # fmt: skip
                extra = {"path": ops.matmul_path(m), "TFLOP/s": 2 * m * n * k / ours["median"] / 1e12}
                row(results, rows, "forward", (n, k), m, ours, {"bitsandbytes": theirs, "dense_bf16": dense}, extra)
                if fused is not None:
                    row(results, fused_rows, "fused forward kernel", (n, k), m, fused, {"dispatch": ours,
                        "dense_bf16": dense}, {"TFLOP/s": 2 * m * n * k / fused["median"] / 1e12})  # fmt: skip
            for m in (16,) if args.quick else (512, 2048, 4096):
                dy = torch.randn(m, n, dtype=torch.bfloat16, device=device)
                ours, fused, dense = timer.row(lambda: ops.grad_input_impl(dy, *args_),
                                               lambda: matmul.matmul_grad_input(dy, *args_), lambda: dy @ w_dense)
                row(results, rows, "grad-input dy @ W", (n, k), m, ours, {"bitsandbytes": None, "dense_bf16": dense},
                    {"TFLOP/s": 2 * m * n * k / ours["median"] / 1e12})  # fmt: skip
                row(results, fused_rows, "fused grad-input kernel", (n, k), m, fused, {"dispatch": ours,
                    "dense_bf16": dense}, {"TFLOP/s": 2 * m * n * k / fused["median"] / 1e12})  # fmt: skip
        sections.append(("matmul_4bit (the dispatch: fused or dequantize + cuBLAS), bf16, GPU time", ["op",
                         "weight NxK", "M", "nf4lora", "p20..p80", "bitsandbytes", "bnb / ours",
                         "dense bf16 (W pre-dequantized)", "dense / ours", "path, rate"], rows))  # fmt: skip
        sections.append(("The fused kernel alone (matmul.py), bf16, GPU time", ["op", "weight NxK", "M", "fused",
                         "p20..p80", "dispatch", "dispatch / fused", "dense bf16", "dense / fused", "rate"],
                         fused_rows))  # fmt: skip

    if "host" in only:  # what a Python caller pays per call, and where the host time goes
        n, k = (QUICK_SHAPES if args.quick else LLAMA_SHAPES)[0]
        _, (packed, state), peer = quantized_pair(n, k, device, bnb)
        ours = timer.per_call(lambda: dequantize(packed, state, torch.bfloat16))
        theirs = timer.per_call(lambda: bnb[0].dequantize_4bit(*peer)) if bnb else None
        row(results, overhead, "dequantize nf4+DQ -> bf16", (n, k), None, ours, {"bitsandbytes": theirs})
        x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            ours = timer.per_call(lambda: matmul_4bit(x, packed, state))
            theirs = timer.per_call(lambda: bnb[1](x, peer[0].t(), peer[1])) if bnb else None
        row(results, overhead, "forward (no grad)", (n, k), 1, ours, {"bitsandbytes": theirs})
        sections.append(("Per call from Python (200 eager calls back to back: host cost or GPU time, the larger)",
                         ["op", "weight NxK", "M", "nf4lora", "min..max", "bitsandbytes", "bnb / ours"], overhead))
        host_profile(lambda: matmul_4bit(x, packed, state))

    if "crossover" in only:
        rows = []
        n, k = (QUICK_SHAPES if args.quick else LLAMA_SHAPES)[0]
        _, (packed, state), _ = quantized_pair(n, k, device, None)
        args_ = state_args(packed, state)
        for m in (1, 8) if args.quick else (1, 2, 4, 8, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            fused, small, unfused = timer.row(lambda: matmul.matmul(x, None, *args_),
                                              (lambda: gemv.gemv(x, None, *args_)) if m <= gemv.MAX_M else None,
                                              lambda: F.linear(x, dequantize(packed, state, torch.bfloat16)))  # fmt: skip
            row(results, rows, "fused kernel vs GEMV kernel", (n, k), m, fused,
                {"gemv": small, "dequant_cublas": unfused})  # fmt: skip
        sections.append((f"Dispatch crossover, GPU time (GEMV used for M <= {gemv.MAX_M})", ["op", "weight NxK", "M",
                         "fused", "p20..p80", "gemv", "gemv / fused", "dequant + cuBLAS", "dequant+cuBLAS / fused"],
                         rows))  # fmt: skip
        for tuned in (matmul._matmul_tuned, matmul._grad_input_tuned):  # what autotuning chose
            print(f"{tuned.fn.__name__} autotune choices:", {str(k): str(c) for k, c in tuned.cache.items()}, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script runs, not speed")
    parser.add_argument("--repeat", type=int, default=7, help="CPU timing repeats (CUDA uses do_bench)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth for %% of peak")
    parser.add_argument("--only", type=lambda v: v.split(","), default=None,
                        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default all; the CPU has "
                             "dequant and matmul)")  # fmt: skip
    args = parser.parse_args()
    if args.only and not set(args.only) <= set(SECTIONS):
        parser.error(f"--only takes sections of {','.join(SECTIONS)}, got {','.join(args.only)}")
    torch.manual_seed(0)

    bnb = import_bitsandbytes()
    timer = Timer(args.device, args.repeat)
    results, sections = [], []
    stopped = None  # GPU time is scarce: a failure part-way still writes what was measured before it
    try:
        (bench_cuda if args.device == "cuda" else bench_cpu)(args, bnb, timer, results, sections)
    except Exception as e:  # noqa: BLE001 - reported in the results and by the exit status
        traceback.print_exc()
        stopped = f"{type(e).__name__}: {e}"

    how = (f"GPU time per call with L2 flushed before every call (median, p20..p80) unless a table says per call: "
           f"each fn captured {Timer.CALLS_PER_GRAPH} times in a CUDA graph, each call after a write of a "
           f"{Timer.FLUSH_BYTES // 2**20} MiB buffer (larger than L2, so the weight is read from HBM); a graph of the "
           f"writes alone is replayed after each replay and subtracted; {Timer.REPLAYS} such pairs. Rows marked ‡: "
           "a graph capture failed, so every entry of that row was timed with triton.testing.do_bench instead (CUDA "
           "events around each eager call, L2 flushed before each)"
           if args.device == "cuda"
           else f"median of {args.repeat} runs after a warm-up run (range = min..max)")  # fmt: skip
    parts = [
        f"# 4-bit kernels on {args.device.upper()}: nf4lora vs bitsandbytes{' (quick shapes)' if args.quick else ''}",
        "",
        environment_block("bitsandbytes"),
        f"Timing: {how}. Weights blocksize 64, NF4 + double quantization unless stated; ratios are peer / ours",
        "(> 1: ours faster). bitsandbytes " + ("was not available in this run." if bnb is None else "ran in the same process."),
        "",
        "Targets (docs/benchmarking.md): " + TARGETS[args.device],
    ]  # fmt: skip
    if stopped:
        parts += ["", f"**The run stopped part-way ({stopped}): the tables hold the sections it finished, the "
                  "JSON every row it measured.**"]  # fmt: skip
    for title, header, rows in sections:
        parts += ["", f"## {title}", "", markdown_table(header, rows)]
    name = f"kernels-{args.device}" + ("-quick" if args.quick else "") + ("-" + "-".join(args.only) if args.only else "")
    data = {"device": args.device, "quick": args.quick, "results": results, "stopped": stopped}
    if args.out is None:
        print(write_results(name, "\n".join(parts), data))
    else:
        print(write_results_in(args.out, name, "\n".join(parts), data))
    if stopped:
        sys.exit(1)


if __name__ == "__main__":
    main()
