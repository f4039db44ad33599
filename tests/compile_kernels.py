"""Compile every Triton kernel of nf4lora ahead of time for a CUDA architecture, on a machine without a GPU.

The kernel tests run the kernels in Triton's interpreter, which accepts programs the GPU compiler rejects (layout
conversions, reshapes, dot shapes) and knows nothing of registers or shared memory. Triton's compiler itself runs
without a GPU (ptxas ships in the triton wheel), so this script compiles each kernel to PTX and cubin for the
target arch, over the launch variants the launchers produce:

- _dequantize_kernel: output dtype, double quantization, blocksize (64, and the smallest and largest allowed), n a
  whole number of words or odd, and each of dequant.LAUNCH_SETTINGS (elements per program, warps);
- _matmul_kernel, _grad_input_kernel: every matmul.CONFIGS (GRAD_INPUT_CONFIGS) entry, activation dtype and dot
  precision (tf32 only for float32, as the launcher picks it), M (which sets BLOCK_M and split-K), bias (forward
  only) and a blocksize on each side of BLOCK_K (the kernels take K a multiple of the blocksize only), plus their
  helpers (the block-scale decoder, the split-K sum);
- the decoder's kernels (rmsnorm.py, rope.py, glu.py, cross_entropy.py) at TinyLlama-1.1B's sizes, per dtype and
  variant (LLaMA/Gemma norm, forward/backward, SiLU/GELU, soft-capping, vocabulary tile);
- _gemv_kernel: the launch of each batch size (gemv.DEFAULT_CONFIGS) and the other gemv.CANDIDATES at M = 1, x's
  dtype, double quantization, bias, and K a multiple of the blocksize or only of 8 (odd K does not take it).

Each variant is specialized as a launch with those arguments would be (Triton specializes runtime arguments: an
int equal to 1 becomes a constant, a multiple of 16 gets a divisibility hint that enables wide loads), and
compiled with the launchers' options (num_warps, num_stages, enable_fp_fusion=False). Failures:
- a variant does not compile;
- a launch none of whose configs fits the arch's shared memory per block (Triton raises OutOfResources when it
  launches a kernel that needs more; the autotuner skips such a config, so one that does not fit is listed but
  fails only when no candidate of the launch fits);
- a fused multiply-add (fma.rn.f32) in the dequantization's PTX: the double-quantization scale must be a float32
  multiply then a separately rounded add, bit for bit as nf4/ (dequant.py);
- a failed speed gate (tests/sass_gates.py) of a dequantization or GEMV launch, read off its SASS: shared memory
  or barriers where outputs or a K loop must stay in registers, narrow stores, loads waiting on loads, SASS per
  output or weight over budget, registers that leave room for fewer than two programs per SM. Each gate is
  first shown able to fail: compiled with the hint or the path the kernel avoids, it must fail.
Registers and spills per variant (what Triton reports as n_regs and n_spills on a GPU, read from the cubin with
the bundled cuobjdump) are printed and summarized per config, for tuning, and the gates' numbers per variant.

    python tests/compile_kernels.py [--arch 90] [--quick] [--jobs N]

--quick compiles a baseline variant per kernel and, from it, each other value of each axis changed alone (every
config, dtype, layout, ... appears once), and the gates' self-checks; tests/test_kernels_compile.py runs it.
Without --quick every combination is compiled. Exit status 1 lists every failure with its error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

# triton.jit reads TRITON_INTERPRET when a kernel is defined: with it set, the kernel modules would hold
# interpreted functions, which cannot be compiled. (tests/conftest.py sets it for the CPU test run.)
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import sass_gates  # noqa: E402  (tests/, the script's own folder)

from nf4lora.kernels import cross_entropy, dequant, gemv, glu, matmul, rmsnorm, rope, rowwise  # noqa: E402
from nf4lora.nf4.codebooks import BLOCKSIZES, NESTED_BLOCKSIZE  # noqa: E402

DEFAULT_BLOCKSIZE = 64  # quantize_4bit's default and what HF/bitsandbytes checkpoints use
DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # first is the baseline: the usual training dtype
TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8", torch.int64: "i64",
}  # fmt: skip

# (M, N, K) of the launches in each weight layout: everything a multiple of 16 (divisibility hints, EVEN_K,
# K_ALIGNED); K a multiple of 16 but of no blocksize (EVEN_K only); everything odd (no hints, rows start mid-byte).
SHAPES = {"aligned": (512, 4096, 4096), "k-unaligned": (512, 4096, 4112), "odd": (509, 4093, 4095)}

# Largest dynamic shared memory one block may use, in bytes (CUDA C++ Programming Guide, compute capabilities
# table, opt-in maximum per block). Triton refuses to launch a kernel that needs more.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

# Kernels whose float arithmetic must not be contracted: their PTX must hold no fma.rn.f32 at all. (The GEMV
# need not match bit for bit and is compiled with fusion; a tl.dot on float32 operands is itself a chain of FMAs.)
FMA_FREE = {"dequant", "block_scales", "rope"}
MODULES = {m.__name__.rsplit(".", 1)[1]: m for m in (cross_entropy, dequant, gemv, glu, matmul, rmsnorm, rope)}


@dataclass(frozen=True)
class Variant:
    """One compilation of `fn_name` ("module.function"): a launch (the arguments, as a label) with one autotune
    config (a label; "" for the dequantization kernel, which has none). args are the runtime arguments (a torch
    dtype stands for a 16-byte-aligned tensor of that dtype, an int for itself), meta the constexprs."""

    kernel: str
    config: str
    launch: str
    fn_name: str
    args: tuple
    meta: dict
    options: dict
    gate: dict | None = None  # the sass_gates check's arguments (besides the SASS); None: no gate
    hint_every_pointer: bool = False  # ignore do_not_specialize_on_alignment (the gates' self-check)

    @property
    def label(self) -> str:
        return f"{self.config} {self.launch}".strip()


@dataclass
class Result:
    variant: Variant
    seconds: float
    error: str | None = None  # compile error or a failed check
    n_regs: int | None = None
    n_spills: int | None = None
    shared: int | None = None  # bytes of dynamic shared memory per block
    fits: bool = True  # shared fits the arch's per-block limit
    numbers: dict | None = None  # the gate's measurements


# -- the launch variants ------------------------------------------------------------------------------------------
def precisions(dtype: torch.dtype) -> list[str]:
    """The tl.dot input precisions matmul's launcher picks for `dtype`, under both torch fp32 matmul settings."""
    saved = torch.get_float32_matmul_precision()
    try:
        found = []
        for setting in ("highest", "high"):
            torch.set_float32_matmul_precision(setting)
            found.append(matmul._input_precision(dtype))
    finally:
        torch.set_float32_matmul_precision(saved)
    return list(dict.fromkeys(found))


def blocksizes_for(block_k: int) -> list[int]:
    """64, and the blocksize nearest to it on the other side of BLOCK_K: the fused kernels' decode has one branch
    for a step inside one block (blocksize >= BLOCK_K) and one for whole blocks inside a step."""
    other = [b for b in BLOCKSIZES if (b >= block_k) != (DEFAULT_BLOCKSIZE >= block_k)]
    return [DEFAULT_BLOCKSIZE] + ([min(other, key=lambda b: abs(math.log2(b / DEFAULT_BLOCKSIZE)))] if other else [])


def state_dtypes(double_quant: bool) -> tuple:
    """Stand-ins for the launchers' absmax, offset, nested absmax and nested map: absmax holds uint8 codes into
    the nested map with double quantization, float32 scales without (and the other three are then None)."""
    if double_quant:
        return torch.uint8, torch.float32, torch.float32, torch.float32
    return torch.float32, None, None, None


def config_label(config: triton.Config) -> str:
    """Tile sizes, warps, the compiler's num_stages, and the GEMV's own pipelining depth (p, its STAGES)."""
    sizes = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
    stages = f" p{config.kwargs['STAGES']}" if "STAGES" in config.kwargs else ""
    return f"{sizes} w{config.num_warps} s{config.num_stages}{stages}"


def launch_options(config: triton.Config) -> dict:
    """What an autotuned launch passes to the compiler besides the config's constexprs."""
    options = {k: v for k, v in config.all_kwargs().items() if k not in config.kwargs}
    return {**options, "enable_fp_fusion": False}


def axes(kernel: str) -> dict[str, list]:
    """The values each launch axis of `kernel` takes; the first of each is the quick sweep's baseline."""
    if kernel == "dequant":
        return {
            "dtype": list(DTYPES),
            "double_quant": [True, False],
            "layout": [("aligned", DEFAULT_BLOCKSIZE), ("aligned", min(BLOCKSIZES)), ("aligned", max(BLOCKSIZES)),
                       ("odd", DEFAULT_BLOCKSIZE)],
            "launch": [(dequant.ELEMENTS_PER_PROGRAM, dequant.NUM_WARPS)]
            + [s for s in dequant.LAUNCH_SETTINGS if s != (dequant.ELEMENTS_PER_PROGRAM, dequant.NUM_WARPS)],
        }  # fmt: skip
    if kernel == "gemv":
        defaults = [(m, config) for m, config in sorted(gemv.DEFAULT_CONFIGS.items())]
        others = [(1, c) for c in gemv.CANDIDATES if c not in gemv.DEFAULT_CONFIGS.values()]
        return {
            "launch": defaults + others,  # (rows of x, config)
            "dtype": list(DTYPES),
            "double_quant": [True, False],
            "layout": [("aligned", DEFAULT_BLOCKSIZE), ("aligned", min(BLOCKSIZES)), ("k-unaligned", DEFAULT_BLOCKSIZE)],
            "bias": [False, True],
        }  # fmt: skip
    if kernel in LAYER_KERNELS:
        return LAYER_KERNELS[kernel][1]
    # The fused kernels take aligned K only (matmul.supports); the block constants are decoded before them, so
    # double quantization does not reach them. Rows: M and the split-K an H200 (132 SMs) gets for N = 4096.
    fused = {
        "config": matmul.CONFIGS if kernel == "matmul" else matmul.GRAD_INPUT_CONFIGS,
        "dtype": [(dtype, p) for dtype in DTYPES for p in precisions(dtype)],
        "rows": [(16, 2), (64, 2), (512, 1)],
        "blocksize": [0, 1],  # an index into blocksizes_for(BLOCK_K): 64 and one on the other side of BLOCK_K
    }
    return {**fused, "bias": [True, False]} if kernel == "matmul" else fused


def make_variant(kernel: str, point: dict) -> Variant | None:
    """The arguments, constexprs and options of `kernel`'s launch at `point` (one value per axis), built as its
    launcher builds them; None where the point names a blocksize that does not exist for this config."""
    if kernel == "dequant":
        dtype, (shape, blocksize) = point["dtype"], point["layout"]
        _, n_rows, n_cols = SHAPES[shape]
        dq = point["double_quant"]
        absmax, *nested = state_dtypes(dq)
        # As dequant.dequantize passes them: without double quantization absmax stands in for the nested pointers.
        n = n_rows * n_cols
        n_bytes = (n + 1) // 2
        args = (torch.uint8, absmax, torch.float32, *(nested if dq else [absmax] * 3), dtype, n, n_bytes, n_bytes // 4)
        per_program, warps = point["launch"]
        meta = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, WORDS=per_program // 8,
                    WHOLE_WORDS=n_bytes % 4 == 0, WIDE=False)  # fmt: skip
        launch = f"{TRITON_DTYPES[dtype]} {'dq' if dq else 'no-dq'} {shape} bs{blocksize} {per_program}x{warps}"
        options = {"num_warps": warps, "enable_fp_fusion": False}  # as dequant.dequantize launches
        gate = None
        if n_bytes % 4 == 0:  # the speed gates hold for whole words; odd sizes take a slower tail
            default = point["launch"] == (dequant.ELEMENTS_PER_PROGRAM, dequant.NUM_WARPS)
            gate = dict(outputs_per_thread=per_program // (32 * warps), double_quant=dq,
                        budget=sass_gates.DEQUANT_SASS_PER_OUTPUT if default and dtype != torch.float32 else None)
        return Variant(kernel, "", launch, "dequant._dequantize_kernel", args, meta, options, gate)

    if kernel == "gemv":
        (M, config), dtype, dq = point["launch"], point["dtype"], point["double_quant"]
        shape, blocksize = point["layout"]
        _, N, K = SHAPES[shape]
        absmax, *nested = state_dtypes(dq)
        meta = dict(gemv._constexprs(M, K, blocksize, NESTED_BLOCKSIZE, dq, point["bias"], config))
        options = {name: meta.pop(name) for name in ("num_warps", "enable_fp_fusion")}
        # As gemv.gemv passes them: x (M, K) and y (M, N) contiguous; absmax stands in for absent pointers.
        args = (dtype, torch.uint8, absmax, torch.float32, *(nested if dq else [absmax] * 3), dtype, dtype, M, N, K, N)
        default = gemv.DEFAULT_CONFIGS[M] == config
        gate = dict(num_warps=options["num_warps"], weights_per_step=config.block_n * config.words * 8,
                    budget=sass_gates.GEMV_SASS_PER_WEIGHT[M] if default and shape == "aligned" else None)
        label = f"{config.block_n}x{config.words} w{config.num_warps}{'' if config.lanes else ' loads'}"
        launch = " ".join([f"M{M}", TRITON_DTYPES[dtype], "dq" if dq else "no-dq", "bias" if point["bias"] else
                           "no-bias", shape, f"bs{blocksize}"])  # fmt: skip
        return Variant(kernel, label, launch, "gemv._gemv_kernel", args, meta, options, gate if default else None)

    if kernel in LAYER_KERNELS:
        fn_name, _, build = LAYER_KERNELS[kernel]
        launch, args, meta, options = build(**point)
        return Variant(kernel, "", launch, fn_name, args, meta, options)
    return fused_variant(kernel, point)


def fused_variant(kernel: str, point: dict) -> Variant | None:
    """matmul.py's forward or grad-input kernel as its launcher calls it: (M, N, K) = (rows, 4096, 4096), x (or
    dy) contiguous, the output rounded (SPLIT_K = 1) or float32 partials; None where the blocksize index names
    no blocksize for this config."""
    config, (dtype, precision), (M, split) = point["config"], point["dtype"], point["rows"]
    sizes = blocksizes_for(config.kwargs["BLOCK_K"])
    if point["blocksize"] >= len(sizes):
        return None
    blocksize = sizes[point["blocksize"]]
    _, N, K = SHAPES["aligned"]
    out = dtype if split == 1 else torch.float32
    m_bucket = min(triton.next_power_of_2(M), matmul.M_BUCKET_CAP)
    per_split = matmul.split_ranges(K if kernel == "matmul" else N, split)[0]
    state = (torch.uint8, torch.float32, torch.float32)  # packed, the decoded scales, the code table
    meta = dict(BLOCKSIZE=blocksize, INPUT_PRECISION=precision, EVEN_K=K % matmul.K_TILE_ALIGN == 0, LANES=True,
                SPLIT_K=split, BLOCK_M=matmul.rows_for_m(M), **config.kwargs)  # fmt: skip
    if kernel == "matmul":
        args = (dtype, *state, dtype, out, M, N, K, m_bucket, per_split, K, N, M * N)  # x, ..., bias, out
        meta["HAS_BIAS"] = point["bias"]
    else:
        args = (dtype, *state, out, M, N, K, m_bucket, per_split, N, K, M * K)
    bias = {True: "bias", False: "no-bias", None: ""}[point.get("bias")]
    parts = (f"M{M}", f"split{split}", TRITON_DTYPES[dtype], precision, bias, f"bs{blocksize}")
    launch = " ".join(p for p in parts if p)
    fn_name = f"matmul.{'_matmul_kernel' if kernel == 'matmul' else '_grad_input_kernel'}"
    return Variant(kernel, config_label(config), launch, fn_name, args, meta, launch_options(config))


# -- the kernels without autotuning besides the 4-bit ones: the fused kernels' helpers and the decoder's ops --------
# Each: (function, axes with the baseline first, builder of (launch label, args, constexprs, options)), with the
# arguments as its launcher passes them at TinyLlama-1.1B's sizes (hidden 2048, 32 heads of 64, intermediate 5632,
# vocabulary 32000, 4096 tokens).
H, HEADS, HEAD_DIM, INTER, VOCAB, TOKENS = 2048, 32, 64, 5632, 32000, 4096


def _scales(**_):
    n_blocks = 4096 * 4096 // DEFAULT_BLOCKSIZE
    args = (torch.uint8, torch.float32, torch.float32, torch.float32, torch.float32, n_blocks)
    meta = dict(NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, BLOCK=matmul.SCALES_PER_PROGRAM)
    return "dq", args, meta, {"enable_fp_fusion": False}


def _sum_splits(dtype, bias):
    n = 16 * 4096
    args = (torch.float32, dtype, dtype, n, 4096)
    meta = dict(SPLIT_K=2, HAS_BIAS=bias, BLOCK=matmul.SUM_BLOCK)
    return f"{TRITON_DTYPES[dtype]} {'bias' if bias else 'no-bias'}", args, meta, {}


def _rmsnorm(dtype, unit_offset, backward):
    warps = {"num_warps": rowwise.warps_for(H)}
    label = f"{TRITON_DTYPES[dtype]} {'gemma' if unit_offset else 'llama'}"
    if backward:
        args = (dtype, dtype, dtype, torch.float32, dtype, torch.float32, H, H, H, TOKENS, TOKENS // 264, H)
    else:
        args = (dtype, dtype, dtype, torch.float32, H, H, H, 1e-5)
    return label, args, dict(UNIT_OFFSET=unit_offset, BLOCK_H=H), warps


def _rope(dtype, backward):
    # q as the model makes it: a (B, heads, T, hd) view of a (B, T, heads * hd) projection; cos (B, T, hd)
    T = 2048
    x_strides = (T * HEADS * HEAD_DIM, HEAD_DIM, HEADS * HEAD_DIM, 1)
    args = (dtype, dtype, dtype, dtype, T, HEADS, HEAD_DIM // 2, *x_strides, *x_strides, T * HEAD_DIM, HEAD_DIM, 1)
    meta = dict(BACKWARD=backward, BLOCK_HEADS=HEADS, BLOCK_HALF=HEAD_DIM // 2)
    options = {"num_warps": rowwise.warps_for(HEADS * HEAD_DIM // 2), "enable_fp_fusion": False}
    return f"{TRITON_DTYPES[dtype]} {'backward' if backward else 'forward'}", args, meta, options


def _glu(dtype, activation, backward):
    args = (dtype,) * (5 if backward else 3) + (TOKENS * INTER,)
    return f"{TRITON_DTYPES[dtype]} {activation}", args, dict(ACTIVATION=activation, BLOCK=glu.BLOCK), {}


def _cross_entropy(dtype, softcap, block_v):
    args = (dtype, torch.int64, torch.float32, VOCAB, VOCAB, 30.0 if softcap else 1.0, -100)
    options = {"num_warps": rowwise.warps_for(block_v)}
    label = f"{TRITON_DTYPES[dtype]} {'softcap' if softcap else 'no-softcap'} V-tile {block_v}"
    return label, args, dict(HAS_SOFTCAP=softcap, BLOCK_V=block_v), options


LAYER_KERNELS = {
    "block_scales": ("matmul._block_scales_kernel", {"none": [None]}, _scales),
    "sum_splits": ("matmul._sum_splits_kernel", {"dtype": list(DTYPES), "bias": [True, False]}, _sum_splits),
    "rmsnorm": ("rmsnorm._rmsnorm_forward_kernel", {"dtype": list(DTYPES), "unit_offset": [False, True]},
                lambda **p: _rmsnorm(**p, backward=False)),
    "rmsnorm_bwd": ("rmsnorm._rmsnorm_backward_kernel", {"dtype": list(DTYPES), "unit_offset": [False, True]},
                    lambda **p: _rmsnorm(**p, backward=True)),
    "rope": ("rope._rope_kernel", {"dtype": list(DTYPES), "backward": [False, True]}, _rope),
    "glu": ("glu._glu_forward_kernel", {"dtype": list(DTYPES), "activation": list(glu.ACTIVATIONS)},
            lambda **p: _glu(**p, backward=False)),
    "glu_bwd": ("glu._glu_backward_kernel", {"dtype": list(DTYPES), "activation": list(glu.ACTIVATIONS)},
                lambda **p: _glu(**p, backward=True)),
    "cross_entropy": ("cross_entropy._cross_entropy_kernel",
                      {"dtype": list(DTYPES), "softcap": [False, True], "block_v": [cross_entropy.MAX_BLOCK_V, 4096]},
                      _cross_entropy),
}  # fmt: skip
KERNELS = ("dequant", "matmul", "grad_input", "gemv", *LAYER_KERNELS)


def variants(kernel: str, quick: bool) -> list[Variant]:
    """Every combination of `kernel`'s axes, or (quick) the baseline and each other axis value changed alone."""
    ax = axes(kernel)
    baseline = {name: values[0] for name, values in ax.items()}
    if quick:
        points = [baseline] + [{**baseline, name: v} for name, values in ax.items() for v in values[1:]]
    else:
        points = [dict(zip(ax, combo)) for combo in itertools.product(*ax.values())]
    found = [make_variant(kernel, p) for p in points]
    return [v for v in found if v is not None]


# -- compiling -----------------------------------------------------------------------------------------------------
def specialize(fn, args: tuple, meta: dict, target: GPUTarget, hint_every_pointer: bool = False) -> ASTSource:
    """The source Triton's launcher would compile for these arguments. Its specialization rules: a tensor is a
    typed pointer, with a divisibility-16 hint when its address is 16-byte aligned (torch's allocations are); an
    int equal to 1 becomes a constexpr; another int is i32, hinted when a multiple of 16; parameters marked
    do_not_specialize get neither hint nor constant, pointers marked do_not_specialize_on_alignment no hint."""
    assert len(args) + len(meta) == len(fn.params), f"{fn.__name__}: arguments do not match its parameters"
    divisible = triton.compiler.make_backend(target).parse_attr("D")  # [["tt.divisibility", 16]]
    signature, constexprs, attrs = {}, dict(meta), {}
    for i, (param, value) in enumerate(zip(fn.params, args)):
        name = param.name
        if isinstance(value, torch.dtype):
            signature[name] = "*" + TRITON_DTYPES[value]
            if hint_every_pointer or not param.do_not_specialize_on_alignment:
                attrs[(i,)] = divisible
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            assert -(2**31) <= value < 2**31, (name, value)
            signature[name] = "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = divisible
    signature.update({name: "constexpr" for name in meta})
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spilled 32-bit words) per thread of a one-kernel cubin, read with the cuobjdump bundled in
    triton. Spills are the stack frame (where ptxas spills) plus local memory, in words: the driver's local size
    per thread, which Triton divides by 4 for its n_spills."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    usage = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", out)
    return int(usage[1]), (int(usage[2]) + int(usage[3])) // 4


def shorten(error: str, lines: int = 20) -> str:
    """The first `lines` lines of an error (a ptxas failure repeats one message per PTX line)."""
    head = error.splitlines()[:lines]
    more = len(error.splitlines()) - len(head)
    return "\n".join(head) + (f"\n... ({more} more lines)" if more else "")


def compile_variant(v: Variant, arch: int) -> Result:
    """Compile one variant and check it; a compile error becomes the result's error."""
    target = GPUTarget("cuda", arch, 32)
    module, name = v.fn_name.split(".")
    fn = getattr(MODULES[module], name)
    t0 = time.perf_counter()
    try:
        # On a ptxas error Triton prints the whole PTX to stdout; the exception already holds ptxas' messages.
        with contextlib.redirect_stdout(io.StringIO()):
            source = specialize(fn, v.args, v.meta, target, v.hint_every_pointer)
            compiled = triton.compile(source, target=target, options=v.options)
    except Exception as e:  # noqa: BLE001: the error is the result, reported with the variant
        return Result(v, time.perf_counter() - t0, error=shorten(f"{type(e).__name__}: {e}"))
    result = Result(v, time.perf_counter() - t0, shared=compiled.metadata.shared)
    result.n_regs, result.n_spills = resource_usage(compiled.asm["cubin"])
    result.fits = result.shared <= MAX_SHARED.get(arch, math.inf)
    failures = []
    if v.kernel in FMA_FREE and "fma.rn.f32" in compiled.asm["ptx"]:
        failures.append("fma.rn.f32 in the PTX: a multiply and an add were fused despite enable_fp_fusion=False")
    if v.gate is not None:
        sass = sass_gates.disassemble(compiled.asm["cubin"])
        if v.kernel == "dequant":
            result.numbers, gate_failures = sass_gates.dequant_gate(sass, result.shared, **v.gate)
        else:
            result.numbers, gate_failures = sass_gates.gemv_gate(sass, result.n_regs, result.n_spills, **v.gate)
        failures += gate_failures
    result.error = "; ".join(failures) or None
    return result


def gates_are_blind(arch: int) -> list[str]:
    """Each speed gate must be able to fail on the code it exists to keep out (messages for those that do not):
    - dequantize with packed_ptr's alignment hinted: Triton gives each thread 4 words (16-byte code loads) and
      moves the 32 outputs through shared memory to store them coalesced (the no-shared-memory gate);
    - the GEMV with its table lookups as loads (LANES off): each lookup's address is a loaded word's nibble (the
      loads-feeding-addresses gate)."""
    found = []
    dq = next(v for v in variants("dequant", quick=True) if v.gate)
    result = compile_variant(replace(dq, hint_every_pointer=True), arch)
    if result.error is None or "shared memory" not in result.error:
        found.append(f"the dequantize shared-memory gate is blind: with packed_ptr hinted it reports {result.error}")
    gv = next(v for v in variants("gemv", quick=True) if v.gate)
    result = compile_variant(replace(gv, meta={**gv.meta, "LANES": False}), arch)
    if result.error is None or "wait for another load" not in result.error:
        found.append(f"the GEMV load-chain gate is blind: with loaded lookups it reports {result.error}")
    return found


def fma_check_is_blind(arch: int) -> str | None:
    """The FMA check must be able to fail: the double-quantization dequantization compiled with fp fusion
    allowed contracts the scale's multiply and add into fma.rn.f32. An error message if that is not seen
    (nothing if the kernel does not compile at all: the sweep reports that)."""
    v = variants("dequant", quick=True)[0]
    assert v.meta["DOUBLE_QUANT"]
    result = compile_variant(replace(v, options={**v.options, "enable_fp_fusion": True}), arch)
    if result.error is None:
        return "the FMA check is blind: with enable_fp_fusion=True the dequantization PTX has no fma.rn.f32 either"
    return None


def compile_all(todo: list[Variant], arch: int, jobs: int):
    """compile_variant over `todo`, results in order; in `jobs` worker processes when jobs > 1 (spawned, not
    forked: forking a process whose torch thread pools are running can hang)."""
    if jobs == 1:
        yield from map(compile_variant, todo, itertools.repeat(arch))
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(compile_variant, todo, itertools.repeat(arch))


def unlaunchable(results: list[Result]) -> list[str]:
    """Launches none of whose compiled configs fits in shared memory: the autotuner skips a config that does not
    fit (OutOfResources at launch), so a launch fails on the GPU only when no candidate fits."""
    fitting: dict[tuple[str, str], bool] = {}
    for r in results:
        if r.shared is not None:  # compiled (a compile error is a failure of its own)
            key = (r.variant.kernel, r.variant.launch)
            fitting[key] = fitting.get(key, False) or r.fits
    return [f"{kernel} {launch}" for (kernel, launch), fits in fitting.items() if not fits]


def print_by_config(title: str, results: list[Result], value) -> None:
    """One line per (kernel, config) of `results`: how many of its variants, and the range of value(r)."""
    groups: dict[tuple[str, str], list] = {}
    for r in results:
        groups.setdefault((r.variant.kernel, r.variant.config), []).append(value(r))
    print(f"{title}: {len(results)} variants" + ("" if results else " (none)"))
    for (kernel, config), values in groups.items():
        print(f"  {kernel:10s} {config:22s} {len(values):4d} variants, {min(values)}..{max(values)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="each axis value once instead of every combination")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    limit = MAX_SHARED.get(args.arch)
    print(f"triton {triton.__version__}, target sm_{args.arch}, {'quick' if args.quick else 'full'} sweep, "
          f"shared memory limit {limit if limit else 'unknown (not checked)'}")  # fmt: skip

    t0 = time.perf_counter()
    todo = [v for kernel in KERNELS for v in variants(kernel, args.quick)]
    results = []
    for r in compile_all(todo, args.arch, args.jobs):
        results.append(r)
        status = "FAIL" if r.error else "ok" if r.fits else "SMEM"
        usage = "" if r.n_regs is None else f"regs {r.n_regs:3d} spills {r.n_spills:4d} shared {r.shared:6d}"
        print(f"{status:4s} {r.variant.kernel:13s} {r.variant.label:52s} {r.seconds:5.1f}s {usage}", flush=True)

    failures = [(f"{r.variant.kernel} {r.variant.label}", r.error) for r in results if r.error]
    failures += [(launch, f"no config fits in {limit} bytes of shared memory") for launch in unlaunchable(results)]
    blind = fma_check_is_blind(args.arch)
    if blind:
        failures.append(("FMA check", blind))
    failures += [("speed gate", message) for message in gates_are_blind(args.arch)]

    print(f"\n{len(results)} variants compiled for sm_{args.arch} in {time.perf_counter() - t0:.0f}s, "
          f"{len(failures)} failures")  # fmt: skip
    print_by_config("Too large for shared memory (SMEM; the autotuner skips them), shared bytes",
                    [r for r in results if not r.fits], lambda r: r.shared)  # fmt: skip
    print_by_config("Spilling registers, spilled words per thread", [r for r in results if r.n_spills],
                    lambda r: r.n_spills)  # fmt: skip
    print("Speed gates (tests/sass_gates.py), per gated variant:")
    for r in results:
        if r.numbers is not None:
            print(f"  {'FAIL' if r.error else 'ok':4s} {r.variant.kernel:8s} {r.variant.label:52s} {r.numbers}")
    for what, error in failures:
        print(f"\nFAILED {what}:\n{error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
