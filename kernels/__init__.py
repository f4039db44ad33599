"""4-bit kernels: Triton on CUDA, plain torch on the CPU, one dispatch point (dispatch.py)."""

from .dispatch import backend_for, dequantize, matmul_4bit

__all__ = ["dequantize", "matmul_4bit", "backend_for"]
