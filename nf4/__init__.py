"""The specification: NF4/FP4 blockwise quantization with double quantization, in plain torch.

Everything else in nf4lora (Triton kernels, Linear4bit, loaders) is tested against these functions.
"""

from .codebooks import BLOCKSIZES, DYNAMIC_MAP, FP4_CODE, NF4_CODE, QUANT_TYPES
from .metrics import bits_per_parameter, error_report, max_abs_error, mse, relative_error, sqnr_db
from .quantize import dequantize_4bit, quantize_4bit
from .state import NestedState, QuantState

__all__ = [
    "NF4_CODE", "FP4_CODE", "DYNAMIC_MAP", "BLOCKSIZES", "QUANT_TYPES",
    "quantize_4bit", "dequantize_4bit", "QuantState", "NestedState",
    "mse", "max_abs_error", "sqnr_db", "relative_error", "bits_per_parameter", "error_report",
]  # fmt: skip
