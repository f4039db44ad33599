"""Candidate kernel launches, checked and timed beside the one in use (llm.c's dev/cuda pattern): a candidate
becomes the default only when a GPU run of this script shows it winning there, and the losers are deleted.

    python benchmarks/kernel_versions.py [--device cuda|cpu] [--out DIR]

The decode GEMV (kernels/gemv.py) at M = 1, 2, 4, 8 rows of x, NF4 + double quantization, blocksize 64, bf16, on
the LLaMA-7B shapes:
- "in use": gemv.DEFAULT_CONFIGS[M], the launch each batch size takes;
- every other gemv.CANDIDATES launch (rows per program, words per thread and step, warps; "loads" looks the table
  up with loads instead of lanes), at every M it fits (registers for two programs per SM: tests/sass_gates.py);
- dequantize + F.linear, what larger batches take (and what bitsandbytes does for M > 1).
Every candidate is first checked against F.linear(x, dequantize(W)) on the same device within the GEMV's error
bound (tests/test_kernels_triton.py); on the CPU (Triton's interpreter, tiny shapes) that check is all that runs:
CI runs it. GPU time with L2 flushed before every call (bench_kernels.Timer); GB/s counts the packed weight, its
block constants, x and y, and "of copy" compares with a device copy of the same number of bytes (bench_kernels.
copy_ceiling). Writes kernel-versions-<device>.md and .json into DIR (default benchmarks/results/).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_kernels import LLAMA_SHAPES, Timer, copy_ceiling, gemv_bytes
from harness import RESULTS, environment_block, fmt_time, markdown_table, write_results_in

from nf4lora.kernels import dequantize, gemv, ops
from nf4lora.kernels.dispatch import state_args
from nf4lora.nf4 import quantize_4bit

MS = (1, 2, 4, 8)
CPU_MS = (1, 5)  # the interpreter: one row, and rows padded to 8
CPU_SHAPES = [(40, 512), (33, 264)]  # N leaving a partial program; K a whole step, and a step plus one word
UNIT_ROUNDOFF = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}


def fits(config: gemv.Config, m: int) -> bool:
    """Whether the launch is a candidate at m rows of x: a thread keeps m x BLOCK_N x words accumulators, and past
    16 the sm_90 code needs more than 128 registers (tests/compile_kernels.py), too many for two programs of 8
    warps per SM."""
    return m * config.block_n * config.words <= 16


def versions(m: int) -> dict[str, object]:
    """{label: fn(x, *state_args)} of the launch in use at m rows, every other fitting candidate, and dequantize +
    F.linear."""
    in_use = gemv.DEFAULT_CONFIGS[gemv._pow2(m)]
    found = {f"in use {label(in_use)}": lambda x, *state: gemv.gemv(x, None, *state)}
    for config in gemv.CANDIDATES:
        if config != in_use and fits(config, m):
            found[label(config)] = lambda x, *state, config=config: gemv.gemv(x, None, *state, config=config)
    found["dequantize + F.linear"] = lambda x, *state: F.linear(x, ops.dequantize_impl(*state, x.dtype))
    return found


def label(config: gemv.Config) -> str:
    return f"{config.block_n} rows x {config.words} word, {config.num_warps} warps{'' if config.lanes else ', loads'}"


def check(device: str, shapes, m: int, fns: dict) -> list[list]:
    """Each version against F.linear(x, dequantize(W, bf16)) in float64 within the GEMV's per-element bound (u|y|
    + (u + K 2**-24) |x| @ |W|.T, u the unit roundoff of bf16); raises on a mismatch. Table rows."""
    rows = []
    for n, k in shapes:
        packed, state = quantize_4bit(torch.randn(n, k, device=device), 64, "nf4", True)
        args = state_args(packed, state)
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        w = dequantize(packed, state, torch.bfloat16).double()
        ref = F.linear(x.double(), w)
        u = UNIT_ROUNDOFF[torch.bfloat16]
        bound = u * ref.abs() + (u + k * 2**-24) * F.linear(x.double().abs(), w.abs())
        for name, fn in fns.items():
            excess = ((fn(x, *args).double() - ref).abs() / bound).max().item()
            assert excess <= 1, f"{name} M={m} {n}x{k}: error {excess:.2f}x the bound"
            rows.append([name, m, f"{n}x{k}", f"within the bound (max {excess:.2f}x)"])
    return rows


def timed(device: str, shapes, m: int, fns: dict, timer, ceiling) -> tuple[list[list], list[dict]]:
    """(table rows, JSON records) of every version on every shape, timed one row at a time (timer.row).
    ceiling(nbytes): a device copy's time for as many bytes, or None."""
    rows, records = [], []
    for n, k in shapes:
        packed, state = quantize_4bit(torch.randn(n, k, device=device), 64, "nf4", True)
        args = state_args(packed, state)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        labels = list(fns)
        times = timer.row(*[lambda fn=fns[name]: fn(x, *args) for name in labels])
        nbytes = gemv_bytes(n, k, m)
        copy = ceiling(nbytes)
        for name, t in zip(labels, times):
            gbps = nbytes / t["median"] / 1e9
            share = f"{100 * copy['median'] / t['median']:.0f}%" if copy else "n/a"
            rows.append([name, m, f"{n}x{k}", fmt_time(t["median"]), f"{fmt_time(t['min'])}..{fmt_time(t['max'])}",
                         f"{gbps:.0f}", share, f"{times[0]['median'] / t['median']:.2f}x"])  # fmt: skip
            records.append({"version": name, "m": m, "shape": [n, k], "time_s": t, "GB/s": gbps})
    return rows, records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    checked, rows, records = [], [], []
    timer = Timer("cuda", repeat=0) if cuda else None
    ceiling = copy_ceiling(timer) if cuda else None
    for m in MS if cuda else CPU_MS:
        fns = versions(m)
        checked += check(args.device, LLAMA_SHAPES if cuda else CPU_SHAPES, m, fns)
        if cuda:
            more_rows, more_records = timed("cuda", LLAMA_SHAPES, m, fns, timer, ceiling)
            rows += more_rows
            records += more_records
    sections = [f"# Kernel versions: decode GEMV, M = 1..8 ({args.device})\n", environment_block(),
                __doc__.split("\n\n")[2], "## Checked against F.linear (the GEMV's error bound)\n",
                markdown_table(["version", "M", "weight NxK", "result"], checked)]  # fmt: skip
    if cuda:
        sections += ["## GPU time, L2 flushed before every call\n",
                     markdown_table(["version", "M", "weight NxK", "median", "p20..p80", "GB/s", "of copy",
                                     "in use / this"], rows)]  # fmt: skip
    print(write_results_in(args.out, f"kernel-versions-{args.device}", "\n".join(sections),
                           {"checked": checked, "timed": records}))  # fmt: skip


if __name__ == "__main__":
    main()
