"""Quantize and dequantize time on the CPU: nf4lora vs bitsandbytes, same tensors, same run.

    python benchmarks/bench_quant_cpu.py [--repeat 7]

Writes benchmarks/results/quant-cpu.md and .json. Ratios are bitsandbytes time / ours (> 1: ours faster).
Dequantization is timed for nf4lora.kernels.dequantize (the dispatching fast path users call; the chunked
byte-LUT torch path on the CPU) and for nf4lora.nf4.dequantize_4bit (the readable specification).
"""

import argparse

import bitsandbytes.functional as bnbF
import torch
from harness import environment_block, fmt_time, markdown_table, time_fn, write_results

from nf4lora.kernels import dequantize
from nf4lora.nf4 import dequantize_4bit, quantize_4bit

SHAPES = [(4096, 4096), (4096, 11008)]
CASES = [("nf4", True), ("nf4", False), ("fp4", True)]


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
            ours_d = time_fn(lambda: dequantize(packed, state), repeat=args.repeat)
            spec_d = time_fn(lambda: dequantize_4bit(packed, state), repeat=args.repeat)
            bnb_d = time_fn(lambda: bnbF.dequantize_4bit(bnb_packed, bnb_state), repeat=args.repeat)
            name = f"{quant_type}{'+DQ' if dq else ''}"
            for op, ours, bnb in (("quantize", ours_q, bnb_q), ("dequantize->bf16 (kernels)", ours_d, bnb_d),
                                  ("dequantize->bf16 (nf4 spec)", spec_d, bnb_d)):  # fmt: skip
                ratio = bnb["median"] / ours["median"]
                rows.append([f"{shape[0]}x{shape[1]}", name, op, fmt_time(ours["median"]),
                             f"{fmt_time(ours['min'])}..{fmt_time(ours['max'])}", fmt_time(bnb["median"]),
                             f"{fmt_time(bnb['min'])}..{fmt_time(bnb['max'])}", f"{ratio:.2f}x"])  # fmt: skip
                data.append({"shape": shape, "case": name, "op": op, "ours_s": ours, "bitsandbytes_s": bnb,
                             "speedup": ratio})  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)

    header = ["shape (bf16)", "format", "op", "nf4lora median", "range", "bitsandbytes median", "range",
              "speedup (bnb / ours)"]  # fmt: skip
    md = "\n".join([
        "# Quantize / dequantize on the CPU: nf4lora vs bitsandbytes",
        "",
        environment_block("bitsandbytes"),
        f"Median of {args.repeat} runs after 2 warm-up runs (range = min..max). Both run in the same process on the",
        "same tensors. Target (docs/benchmarking.md): quantize NF4+DQ >= 1.5x, dequantize >= 1.0x.",
        "",
        markdown_table(header, rows),
    ])  # fmt: skip
    print(write_results("quant-cpu", md, {"results": data}))


if __name__ == "__main__":
    main()
