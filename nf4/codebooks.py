"""The code tables: NF4, FP4 and the signed 8-bit dynamic map used by double quantization.

Each table is defined once here, at full precision; everything else (sorted orders, midpoints, byte LUTs, the
tensors handed to kernels) is derived from these. See docs/formats.md sections 1 and 3.
"""

import functools

import torch

# NF4: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA, sec. 3), indexed by the 4-bit code.
# Use the values as written: recomputing them from the normal quantile function differs in the 7th digit.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip

# FP4 (the E2M1 variant bitsandbytes uses): bit 3 is the sign, the low three bits index these magnitudes
# (subnormal 0 and 0.0625, then 8, 12, 4, 6, 2, 3), all divided by 12 so the largest is 1.0. Code 8 ("-0") is
# +0.0, as in bitsandbytes' table (its quant_map, and its CPU dequantization at every practical size; its CUDA
# kernel alone gives -0.0 there).
_FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4_CODE = torch.tensor([m / 12 for m in _FP4_MAGNITUDES] + [-m / 12 if m else 0.0 for m in _FP4_MAGNITUDES],
                        dtype=torch.float32)  # fmt: skip

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # double quantization always quantizes absmax in blocks of 256 (bitsandbytes, HF)


def _signed_dynamic_map() -> torch.Tensor:
    """The 256-value signed dynamic 8-bit map (Dettmers 2015), built with float32 arithmetic as bitsandbytes does.

    For exponent i in 0..6 the fraction bits left give 2**i + 1 boundaries in [0.1, 1]; their midpoints, scaled
    by 10**(i - 6), and their negatives are codes; 0 and 1.0 complete the 256. Index 127 is 0.0, 255 is 1.0.
    """
    values = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        m = (b[:-1] + b[1:]) / 2
        values += (10 ** (i - 6) * m).tolist() + (-(10 ** (i - 6)) * m).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = _signed_dynamic_map()


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 float32 values indexed by the 4-bit code (a copy: callers may move or modify it)."""
    check_quant_type(quant_type)
    return (NF4_CODE if quant_type == "nf4" else FP4_CODE).clone()


@functools.lru_cache(maxsize=None)
def quantize_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints, order) for quantizing to `quant_type` (CPU tensors; do not modify).

    A scaled value s gets code `order[bucketize(s, midpoints, right=False)]`: the nearest table value, ties to
    the lower value. Midpoints are float32 means of adjacent sorted values. For NF4 the order is the identity.
    """
    table = NF4_CODE if quant_type == "nf4" else FP4_CODE
    # FP4 holds 0.0 twice (code 0, and code 8, the "-0"); the stable sort keeps code 0 first, so s in
    # (-0.0026, 0] gets code 0 and s in (0, 0.0026] code 8: the same choice as bitsandbytes' CPU quantizer.
    sorted_values, order = torch.sort(table, stable=True)
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2
    return midpoints, order.to(torch.uint8)


def zero_code(quant_type: str) -> int:
    """The 4-bit code of 0.0: what pads the low nibble of an odd-length tensor (7 for NF4, 0 for FP4)."""
    return 7 if quant_type == "nf4" else 0


def check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_blocksize(blocksize) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
