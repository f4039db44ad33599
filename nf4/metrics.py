"""Quantization-error metrics: how far a dequantized tensor is from the original.

All are computed in float64 so that the metric itself adds no error worth mentioning.
"""

from __future__ import annotations

import math

import torch

from .state import QuantState


def _pair(original: torch.Tensor, reconstructed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if original.shape != reconstructed.shape:
        raise ValueError(f"shapes differ: original {tuple(original.shape)} vs reconstructed {tuple(reconstructed.shape)}")
    return original.detach().double().reshape(-1), reconstructed.detach().double().reshape(-1)


def mse(original: torch.Tensor, reconstructed: torch.Tensor) -> float:
    """Mean squared error."""
    x, y = _pair(original, reconstructed)
    return (x - y).square().mean().item()


def max_abs_error(original: torch.Tensor, reconstructed: torch.Tensor) -> float:
    """Largest absolute elementwise error."""
    x, y = _pair(original, reconstructed)
    return (x - y).abs().max().item()


def sqnr_db(original: torch.Tensor, reconstructed: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (x - y)^2). inf when exact."""
    x, y = _pair(original, reconstructed)
    noise = (x - y).square().sum().item()
    signal = x.square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def relative_error(original: torch.Tensor, reconstructed: torch.Tensor) -> float:
    """Frobenius-norm relative error ||x - y|| / ||x|| (0 for an exact reconstruction, even of zeros)."""
    x, y = _pair(original, reconstructed)
    denom, noise = x.norm().item(), (x - y).norm().item()
    if noise == 0:
        return 0.0
    return noise / denom if denom > 0 else math.inf


def bits_per_parameter(state: QuantState) -> float:
    """Storage bits per weight, block constants included (NF4/64: 4.5 plain, 4.127 with double quantization)."""
    return state.bits_per_parameter()


def error_report(original: torch.Tensor, reconstructed: torch.Tensor, state: QuantState | None = None) -> dict:
    """All metrics in one dict (for tables and JSON)."""
    report = {
        "mse": mse(original, reconstructed),
        "max_abs_error": max_abs_error(original, reconstructed),
        "sqnr_db": sqnr_db(original, reconstructed),
        "relative_error": relative_error(original, reconstructed),
    }
    if state is not None:
        report["bits_per_parameter"] = bits_per_parameter(state)
    return report
