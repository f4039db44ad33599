"""Batch-1 (decode) kernel: y (M, N) = x (M, K) @ W.T + bias for M <= MAX_M, W (N, K) packed 4-bit.

At M = 1 a tl.dot tile would be at least 16 rows of padding; this kernel instead spreads the weight over many
programs (BLOCK_N rows of W each), multiplies elementwise in float32 and reduces over K once at the end. The
weight is read once for all M rows of x, so small M costs little more than M = 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import INTERPRETED, check_triton_device, load_weight_tile, round_to, tile_launch_args

# Batches up to MAX_M rows take this kernel; larger ones take the fused tl.dot kernel (matmul.py). The crossover
# has not been measured on a GPU yet: bench_kernels.py times both at M = 1, 2, 4, 8 so gpu_check.sh can settle it.
MAX_M = 4

# Candidates: few rows x long K slices keep each program's loads contiguous (BLOCK_K // 2 bytes per row). On an
# H200 autotuning picked 8x256 for every LLaMA-7B shape and M, at 8-9% of HBM bandwidth: each K slice waits on a
# chain of dependent loads (codes, then their table values and block constants), and its sm_90 code moves the W
# tile (and x) through shared memory for the (M, N, K) product (8 barriers per slice at 8x256), so time grows
# with the number of slices per program. Two answers, both left to autotuning until a GPU run has timed them:
# - longer slices, fewer of them (the 1024- and 2048-long candidates: 2-4 slices for K = 4096);
# - STAGES > 1: the K loop is software-pipelined, later slices' loads issued (cp.async into shared memory) while
#   this one is computed. Triton 3.6 and 3.9 pipeline a loop without tl.dot only when it is a tl.range with
#   num_stages: a config's num_stages leaves it unpipelined (sm_90 PTX: no cp.async with STAGES = 1). STAGES = 1
#   keeps the loop as it was measured. Shared memory per program at 8x256: 4 KB unpipelined, 24 KB at 3 stages.
CONFIGS = [
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 512, "STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 256, "STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_N": 2, "BLOCK_K": 1024, "STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_N": 2, "BLOCK_K": 2048, "STAGES": 1}, num_warps=8),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 512, "STAGES": 3}, num_warps=4),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 256, "STAGES": 3}, num_warps=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 3}, num_warps=8),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024, "STAGES": 2}, num_warps=8),
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 8, "BLOCK_K": 32, "STAGES": 1})


@triton.jit
def _gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_xk, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N outputs of all M (<= BLOCK_M) rows. acc is (BLOCK_M, BLOCK_N, BLOCK_K) float32;
    the K loop is pipelined STAGES deep (1: not at all)."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = load_weight_tile(
            packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, rn, rk, k0, N, K,
            BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, EVEN_K, K_ALIGNED, BLOCK_K,
        )  # fmt: skip
        # Round W to the activation dtype first: the product F.linear(x, dequantize_4bit(...)) computes.
        w = round_to(w, x_ptr.dtype.element_ty).to(tl.float32)  # (BLOCK_N, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0,
        ).to(tl.float32)  # fmt: skip
        acc += x[:, None, :] * w[None, :, :]
    y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], round_to(y, y_ptr.dtype.element_ty), mask=mask)


_gemv_tuned = triton.autotune(configs=CONFIGS, key=["N", "K", "BLOCK_M", "BLOCKSIZE", "DOUBLE_QUANT"])(_gemv_kernel)


def gemv(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    packed, absmax, code, offset, nested_absmax, nested_code, blocksize: int, nested_blocksize: int,
    shape: list[int],
    config: triton.Config | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launcher: x (..., K) with at most MAX_M rows @ W.T + bias -> (..., N) in x.dtype."""
    check_triton_device(x, "x")
    N, K = shape
    x2 = x.reshape(-1, K)  # (M, K); any strides
    M = x2.shape[0]
    if M > MAX_M:
        raise ValueError(f"gemv takes at most MAX_M={MAX_M} rows of x, got {M}: use matmul.matmul")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    pointers, meta = tile_launch_args(absmax, offset, nested_absmax, nested_code, blocksize, nested_blocksize, K)
    args = (
        x2, packed, absmax, code, *pointers, bias if bias is not None else y, y,
        M, N, K, x2.stride(0), x2.stride(1), y.stride(0),
    )  # fmt: skip
    meta.update(HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(M))
    if config is None and not INTERPRETED:
        _gemv_tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]),)](*args, **meta, enable_fp_fusion=False)
    else:
        kw = {"STAGES": 1, **(config or INTERPRETER_CONFIG).all_kwargs()}  # a config without STAGES: unpipelined
        _gemv_kernel[(triton.cdiv(N, kw["BLOCK_N"]),)](*args, **meta, **kw, enable_fp_fusion=False)
    return y.view(*x.shape[:-1], N)
