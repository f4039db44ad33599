"""Quantize and dequantize time on the CPU: nf4lora vs bitsandbytes, same tensors, same run.

    python benchmarks/bench_quant_cpu.py [--repeat 7]

Writes benchmarks/results/quant-cpu.md and .json. Ratios are bitsandbytes time / ours (> 1: ours faster).
Dequantization is timed for nf4lora.kernels.dequantize (the dispatching fast path users call; the byte-pair
gather of the torch path on the CPU), alternating call by call with bitsandbytes, to bf16 and to float32 (what
an AVX2-only machine computes in), and for nf4lora.nf4.dequantize_4bit (the readable specification).

torch's kernels follow ATEN_CPU_CAPABILITY (ATEN_CPU_CAPABILITY=avx2 makes torch behave like an AVX2-only
machine); bitsandbytes' C kernel picks its instruction set from cpuid, so under that setting it still runs its
AVX-512 code: compare ours across settings, and against bitsandbytes only on the real instruction set.
"""

import argparse
import gc
import statistics
import time

import bitsandbytes.functional as bnbF
import torch
from harness import environment_block, fmt_time, markdown_table, time_fn, write_results

from nf4lora.kernels import dequantize
from nf4lora.nf4 import dequantize_4bit, quantize_4bit

SHAPES = [(4096, 4096), (4096, 11008)]
CASES = [("nf4", True), ("nf4", False), ("fp4", True)]


def time_alternating(fns: dict, *, warmup: int = 2, repeat: int = 7) -> dict[str, dict[str, float]]:
    """time_fn's statistics for each of `fns`, called in turn within every repetition: on a shared machine a
    noisy minute then hits all sides alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t), "n": len(t)}
            for name, t in times.items()}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    rows, data = [], []
    for shape in SHAPES:
        w = torch.randn(*shape, dtype=torch.bfloat16)
        for quant_type, dq in CASES:
            ours_q = time_fn(lambda: quantize_4bit(w, quant_type=quant_type, double_quant=dq), repeat=args.repeat)
            bnb_q = time_fn(
                lambda: bnbF.quantize_4bit(w, quant_type=quant_type, compress_statistics=dq), repeat=args.repeat
            )
            packed, state = quantize_4bit(w, quant_type=quant_type, double_quant=dq)
            bnb_packed, bnb_state = bnbF.quantize_4bit(w, quant_type=quant_type, compress_statistics=dq)
            bf16 = time_alternating({"ours": lambda: dequantize(packed, state),
                                     "bnb": lambda: bnbF.dequantize_4bit(bnb_packed, bnb_state)}, repeat=args.repeat)
            spec_d = time_fn(lambda: dequantize_4bit(packed, state), repeat=args.repeat)
            # float32 output: both sides quantize the float32 weight, so both dequantize to float32 by default
            packed32, state32 = quantize_4bit(w.float(), quant_type=quant_type, double_quant=dq)
            bnb_packed32, bnb_state32 = bnbF.quantize_4bit(w.float(), quant_type=quant_type, compress_statistics=dq)
            fp32 = time_alternating({"ours": lambda: dequantize(packed32, state32),
                                     "bnb": lambda: bnbF.dequantize_4bit(bnb_packed32, bnb_state32)},
                                    repeat=args.repeat)  # fmt: skip
            name = f"{quant_type}{'+DQ' if dq else ''}"
            for op, ours, bnb in (("quantize", ours_q, bnb_q),
                                  ("dequantize->bf16 (kernels)", bf16["ours"], bf16["bnb"]),
                                  ("dequantize->bf16 (nf4 spec)", spec_d, bf16["bnb"]),
                                  ("dequantize->float32 (kernels)", fp32["ours"], fp32["bnb"])):  # fmt: skip
                ratio = bnb["median"] / ours["median"]
                rows.append([f"{shape[0]}x{shape[1]}", name, op, fmt_time(ours["median"]),
                             f"{fmt_time(ours['min'])}..{fmt_time(ours['max'])}", fmt_time(bnb["median"]),
                             f"{fmt_time(bnb['min'])}..{fmt_time(bnb['max'])}", f"{ratio:.2f}x"])  # fmt: skip
                data.append({"shape": shape, "case": name, "op": op, "ours_s": ours, "bitsandbytes_s": bnb,
                             "speedup": ratio})  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)

    header = ["shape (bf16 weight)", "format", "op", "nf4lora median", "range", "bitsandbytes median", "range",
              "speedup (bnb / ours)"]  # fmt: skip
    md = "\n".join([
        "# Quantize / dequantize on the CPU: nf4lora vs bitsandbytes",
        "",
        environment_block("bitsandbytes"),
        "bitsandbytes' C kernel picks its own instruction set from cpuid: a capped `isa` above caps nf4lora only.",
        "",
        f"Median of {args.repeat} runs after 2 warm-up runs (range = min..max). Both run in the same process on the",
        "same tensors; the kernels' dequantization alternates call by call with bitsandbytes'. Target",
        "(docs/benchmarking.md): quantize NF4+DQ >= 1.5x, dequantize >= 1.0x.",
        "",
        markdown_table(header, rows),
    ])  # fmt: skip
    print(write_results("quant-cpu", md, {"results": data}))


if __name__ == "__main__":
    main()
