"""Fused dequantize-matmul kernels: y = x @ W.T (+ bias) and the grad-input product dx = dy @ W.

W (N, K) stays packed in global memory (0.5 B per weight plus block constants); each program dequantizes
(BLOCK_N, BLOCK_K) tiles of it into registers with dequant.load_weight_tile, rounds them to the activation dtype
(what F.linear(x, dequantize_4bit(...)) multiplies with) and feeds tl.dot. The 16-bit W never reaches global
memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import INTERPRETED, check_triton_device, load_weight_tile, round_to, tile_launch_args

# Autotune candidates, kept few so first calls stay short. Small BLOCK_M serves decode-sized batches (the weight
# read dominates); 128x128 and 128x256 tiles serve training shapes (compute bound). BLOCK_K = 64 keeps one scale
# per row and tile for the default blocksize 64 (load_weight_tile's fast case). Not yet tuned on a GPU: the
# benchmark (benchmarks/bench_kernels.py) reports which config wins per shape.
CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
# The grad-input kernel stages a (BLOCK_M, BLOCK_N) tile of dy per pipeline stage where the forward stages
# (BLOCK_M, BLOCK_K) of x: at 128x256 with 3 stages it needs 234-832 KB of shared memory in every variant
# tests/compile_kernels.py compiles for sm_90 (the H100/H200 limit is 227 KB per block), so it could never launch.
GRAD_INPUT_CONFIGS = [c for c in CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (128, 256)]
# The interpreter runs one config, small enough to be quick and to leave partial tiles in the test shapes.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})

# Autotuning is keyed on M rounded up to a power of two (capped), not M itself: a training or generation loop
# that sees many different M would otherwise re-tune for each.
M_BUCKET_CAP = 4096
_KEY = ["M_BUCKET", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT"]


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M rows of output tiles at a time so weight tiles are reused from L2."""
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["M_BUCKET"])
def _matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET, stride_xm, stride_xk, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y (M, N) = x (M, K) @ W.T + bias, one (BLOCK_M, BLOCK_N) output tile per program, fp32 accumulation."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0,
        )  # fmt: skip
        w = load_weight_tile(
            packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, rn, rk, k0, N, K,
            BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, EVEN_K, K_ALIGNED, BLOCK_K,
        )  # fmt: skip
        acc = tl.dot(x, tl.trans(round_to(w, x_ptr.dtype.element_ty)), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], round_to(acc, y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _grad_input_kernel(
    dy_ptr, packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, dx_ptr,
    M, N, K, M_BUCKET, stride_dym, stride_dyn, stride_dxm,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dx (M, K) = dy (M, N) @ W, one (BLOCK_M, BLOCK_K) output tile per program, looping over N."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :] * stride_dyn,
            mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0,
        )  # fmt: skip
        w = load_weight_tile(
            packed_ptr, absmax_ptr, code_ptr, offset_ptr, nested_absmax_ptr, nested_code_ptr, rn, rk, k0, N, K,
            BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, EVEN_K, K_ALIGNED, BLOCK_K,
        )  # fmt: skip
        acc = tl.dot(dy, round_to(w, dy_ptr.dtype.element_ty), acc, input_precision=INPUT_PRECISION)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * stride_dxm + rk[None, :], round_to(acc, dx_ptr.dtype.element_ty), mask=mask)


_matmul_tuned = triton.autotune(configs=CONFIGS, key=_KEY)(_matmul_kernel)
_grad_input_tuned = triton.autotune(configs=GRAD_INPUT_CONFIGS, key=_KEY)(_grad_input_kernel)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 operands follow torch's matmul precision setting (TF32 only when torch would use it too)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _launch(tuned, plain, grid_fn, args: tuple, meta: dict, config: triton.Config | None) -> None:
    """Autotuned on a GPU; one fixed config in the interpreter (it cannot time candidates) or when given."""
    if config is None and not INTERPRETED:
        tuned[lambda m: grid_fn(m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"])](*args, **meta, enable_fp_fusion=False)
        return
    config = config or INTERPRETER_CONFIG
    kw = config.all_kwargs()
    grid = grid_fn(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"])
    plain[grid](*args, **meta, **kw, enable_fp_fusion=False)


def matmul(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    packed, absmax, code, offset, nested_absmax, nested_code, blocksize: int, nested_blocksize: int,
    shape: list[int],
    config: triton.Config | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launcher: x (..., K) @ W.T + bias -> (..., N) in x.dtype. State arguments as torch_path.dequantize."""
    check_triton_device(x, "x")
    N, K = shape
    x2 = x.reshape(-1, K)  # (M, K); any strides
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    pointers, meta = tile_launch_args(absmax, offset, nested_absmax, nested_code, blocksize, nested_blocksize, K)
    args = (
        x2, packed, absmax, code, *pointers, bias if bias is not None else y, y,
        M, N, K, min(triton.next_power_of_2(M), M_BUCKET_CAP), x2.stride(0), x2.stride(1), y.stride(0),
    )  # fmt: skip
    meta.update(HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(x.dtype))

    def grid(block_m, block_n, block_k):
        return (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)

    _launch(_matmul_tuned, _matmul_kernel, grid, args, meta, config)
    return y.view(*x.shape[:-1], N)


def matmul_grad_input(
    dy: torch.Tensor,
    packed, absmax, code, offset, nested_absmax, nested_code, blocksize: int, nested_blocksize: int,
    shape: list[int],
    config: triton.Config | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launcher: dy (..., N) @ W -> (..., K) in dy.dtype. State arguments as torch_path.dequantize."""
    check_triton_device(dy, "dy")
    N, K = shape
    dy2 = dy.reshape(-1, N)  # (M, N); any strides
    M = dy2.shape[0]
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0:
        return dx.view(*dy.shape[:-1], K)
    pointers, meta = tile_launch_args(absmax, offset, nested_absmax, nested_code, blocksize, nested_blocksize, K)
    args = (
        dy2, packed, absmax, code, *pointers, dx,
        M, N, K, min(triton.next_power_of_2(M), M_BUCKET_CAP), dy2.stride(0), dy2.stride(1), dx.stride(0),
    )  # fmt: skip
    meta.update(INPUT_PRECISION=_input_precision(dy.dtype))

    def grid(block_m, block_n, block_k):
        return (triton.cdiv(M, block_m) * triton.cdiv(K, block_k),)

    _launch(_grad_input_tuned, _grad_input_kernel, grid, args, meta, config)
    return dx.view(*dy.shape[:-1], K)
