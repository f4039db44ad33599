"""Candidate kernel versions, checked and timed beside the kernel in use (llm.c's dev/cuda pattern): a version
moves into kernels/ only when a GPU run of this script shows it winning there, and the loser is deleted.

    python benchmarks/kernel_versions.py [--device cuda|cpu] [--out DIR]

GEMV at M = 1 (decode), NF4 + double quantization, blocksize 64, bf16, on the LLaMA-7B shapes:
- v0, kernels.gemv.gemv: the kernel in use, autotuned over gemv.CONFIGS. Its (M, N, K) broadcast product makes the
  sm_90 code move the W tile through shared memory in every K slice (8 barriers per slice at 8x256).
- v1, _gemv_split_kernel below: for M = 1 only. A byte holds W[n, 2j] (high nibble) and W[n, 2j + 1] (low
  nibble); instead of interleaving the two halves into K order, the high ones multiply x[2j] and the low ones
  x[2j + 1], into a 2-D (BLOCK_N, BLOCK_K / 2) accumulator. The loop then needs no layout conversion (its sm_90
  PTX: no barrier inside it), at the cost of reading x element by element (two scalar loads per code byte, from
  L1). STAGES > 1 software-pipelines the K loop (tl.range), as for v0. Each config is timed on its own.
Every version is first checked against F.linear(x, dequantize(W)) on the same device; on the CPU (Triton's
interpreter, tiny shapes) that check is all that runs: CI runs it. GPU time with L2 flushed before every call
(bench_kernels.Timer); GB/s counts the packed weight, its block constants, x and y. Writes
kernel-versions-<device>.md and .json into DIR (default benchmarks/results/).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bench_kernels import LLAMA_SHAPES, PEAK_BYTES_PER_S, Timer, dequant_bytes
from harness import RESULTS, environment_block, fmt_time, markdown_table, write_results_in

from nf4lora.kernels import dequantize, gemv
from nf4lora.kernels.dequant import check_triton_device, load_scales, round_to, tile_launch_args
from nf4lora.kernels.dispatch import state_args
from nf4lora.nf4 import quantize_4bit

# (BLOCK_N, BLOCK_K, STAGES, num_warps) of v1.
SPLIT_CONFIGS = [(8, 256, 1, 4), (8, 256, 3, 4), (4, 512, 3, 4), (16, 256, 3, 8), (2, 1024, 1, 4), (4, 1024, 2, 8),
                 (2, 2048, 1, 8)]  # fmt: skip
CPU_SHAPES = [(40, 256), (33, 512)]  # N not a multiple of BLOCK_N; K a multiple of the interpreter's BLOCK_K
CPU_CONFIG = (8, 128, 1, 4)
TOL = dict(rtol=8e-3, atol=8e-3)  # bf16 output: half an ulp, plus float32 summation


@triton.jit
def _gemv_split_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, y_ptr, N, K,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """y[rn] = sum_k W[rn, k] * x[k] for one program's BLOCK_N rows; K even, a multiple of BLOCKSIZE, and
    BLOCK_K a multiple of BLOCKSIZE (the launcher checks)."""
    HALF: tl.constexpr = BLOCK_K // 2
    BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = rn[:, None].to(tl.int64) * K  # (BLOCK_N, 1) flat index of each row's first element
    rb = tl.arange(0, HALF)
    rblock = tl.arange(0, BLOCKS)[None, :]
    acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        cols = k0 // 2 + rb  # byte column within the row
        mask = (rn[:, None] < N) & (cols[None, :] < K // 2)
        byte = tl.load(packed_ptr + row // 2 + cols[None, :], mask=mask, other=0).to(tl.int32)
        scales = load_scales(
            absmax_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, (row + k0) // BLOCKSIZE + rblock,
            (rn[:, None] < N) & (k0 + rblock * BLOCKSIZE < K), DOUBLE_QUANT, NESTED_BLOCKSIZE,
        )[:, :, None]  # (BLOCK_N, BLOCKS, 1)  # fmt: skip
        high = tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0)
        low = tl.load(code_ptr + (byte & 15), mask=mask, other=0.0)
        # W rounded to x's dtype first, as F.linear(x, dequantize(W, x.dtype)) has it
        high = tl.reshape(tl.reshape(high, (BLOCK_N, BLOCKS, BLOCKSIZE // 2)) * scales, (BLOCK_N, HALF))
        low = tl.reshape(tl.reshape(low, (BLOCK_N, BLOCKS, BLOCKSIZE // 2)) * scales, (BLOCK_N, HALF))
        high = round_to(high, x_ptr.dtype.element_ty).to(tl.float32)
        low = round_to(low, x_ptr.dtype.element_ty).to(tl.float32)
        # x[2j] and x[2j + 1] for each byte column, loaded in the bytes' own layout (a row-invariant broadcast)
        k_even = 2 * cols[None, :] + 0 * rn[:, None]
        x_even = tl.load(x_ptr + k_even, mask=mask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + k_even + 1, mask=mask, other=0.0).to(tl.float32)
        acc += high * x_even + low * x_odd
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + rn, round_to(y, y_ptr.dtype.element_ty), mask=rn < N)


def gemv_split(x: torch.Tensor, packed, absmax, code, offset, nested_absmax, nested_code, blocksize: int,
               nested_blocksize: int, shape: list[int], config=(8, 256, 3, 4)) -> torch.Tensor:  # fmt: skip
    """v1's launcher: x (1, K) contiguous @ W.T -> (1, N) in x.dtype."""
    check_triton_device(x, "x")
    N, K = shape
    block_n, block_k, stages, warps = config
    if x.shape != (1, K) or not x.is_contiguous():
        raise ValueError(f"v1 takes one contiguous row of x, shape (1, {K}); got {tuple(x.shape)}")
    if K % 2 or K % blocksize or block_k % blocksize:
        raise ValueError(f"v1 needs K ({K}) even and a multiple of the blocksize ({blocksize}), which must divide "
                         f"BLOCK_K ({block_k})")  # fmt: skip
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    pointers, meta = tile_launch_args(absmax, offset, nested_absmax, nested_code, blocksize, nested_blocksize, K)
    _gemv_split_kernel[(triton.cdiv(N, block_n),)](
        x, packed, absmax, code, *pointers, y, N, K,
        BLOCKSIZE=blocksize, DOUBLE_QUANT=meta["DOUBLE_QUANT"], NESTED_BLOCKSIZE=nested_blocksize,
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return y


def versions() -> dict[str, object]:
    """{label: fn(x, *state_args)} of every version and config compared."""
    found = {"v0 kernels.gemv (autotuned)": lambda x, *state: gemv.gemv(x, None, *state)}
    for config in SPLIT_CONFIGS:
        block_n, block_k, stages, warps = config
        found[f"v1 split {block_n}x{block_k} p{stages} w{warps}"] = (
            lambda x, *state, config=config: gemv_split(x, *state, config=config)
        )
    return found


def check(device: str, shapes, fns: dict) -> list[list]:
    """Each version against F.linear(x, dequantize(W)) in float64; raises on a mismatch. Table rows."""
    rows = []
    for n, k in shapes:
        packed, state = quantize_4bit(torch.randn(n, k, device=device), 64, "nf4", True)
        args = state_args(packed, state)
        x = torch.randn(1, k, device=device).to(torch.bfloat16)
        ref = F.linear(x.double(), dequantize(packed, state, torch.bfloat16).double())
        for label, fn in fns.items():
            torch.testing.assert_close(fn(x, *args).double(), ref, **TOL, msg=lambda m: f"{label} {n}x{k}: {m}")
            rows.append([label, f"{n}x{k}", "matches F.linear"])
    return rows


def timed(device: str, shapes, fns: dict, timer, peak: float | None) -> tuple[list[list], list[dict]]:
    """(table rows, JSON records) of every version on every shape, timed one row at a time (timer.row)."""
    rows, records = [], []
    for n, k in shapes:
        packed, state = quantize_4bit(torch.randn(n, k, device=device), 64, "nf4", True)
        args = state_args(packed, state)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        labels = list(fns)
        times = timer.row(*[lambda fn=fns[label]: fn(x, *args) for label in labels])
        nbytes = dequant_bytes(n, k, True, out_bytes=0) + 2 * (k + n)  # codes, constants, x and y in bf16
        for label, t in zip(labels, times):
            gbps = nbytes / t["median"] / 1e9
            share = f"{100 * gbps * 1e9 / peak:.1f}%" if peak else "n/a"
            rows.append([label, f"{n}x{k}", fmt_time(t["median"]), f"{fmt_time(t['min'])}..{fmt_time(t['max'])}",
                         f"{gbps:.0f}", share, f"{times[0]['median'] / t['median']:.2f}x"])  # fmt: skip
            records.append({"version": label, "shape": [n, k], "time_s": t, "GB/s": gbps})
    return rows, records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    fns = versions()
    if not cuda:  # the interpreter: one small config of v1, checked only
        fns = {"v0 kernels.gemv": fns["v0 kernels.gemv (autotuned)"],
               "v1 split (interpreter config)": lambda x, *s: gemv_split(x, *s, config=CPU_CONFIG)}  # fmt: skip
    checked = check(args.device, LLAMA_SHAPES if cuda else CPU_SHAPES, fns)
    sections = [f"# Kernel versions: GEMV at M = 1 ({args.device})\n", environment_block(), __doc__.split("\n\n")[2],
                "## Checked against F.linear (bf16 tolerance)\n", markdown_table(["version", "weight NxK", "result"], checked)]  # fmt: skip
    results = {"checked": checked, "timed": []}
    if cuda:
        peak = next((v for k, v in PEAK_BYTES_PER_S.items() if k in torch.cuda.get_device_name()), None)
        rows, results["timed"] = timed("cuda", LLAMA_SHAPES, fns, Timer("cuda", repeat=0), peak)
        sections += ["## GPU time, L2 flushed before every call\n",
                     markdown_table(["version", "weight NxK", "median", "p20..p80", "GB/s", "of HBM peak", "v0 / this"], rows)]  # fmt: skip
    print(write_results_in(args.out, f"kernel-versions-{args.device}", "\n".join(sections), results))


if __name__ == "__main__":
    main()
