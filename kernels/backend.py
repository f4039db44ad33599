"""Which implementation runs: the Triton kernels or the torch path. One rule, read when each op runs.

CUDA tensors use Triton, CPU tensors the torch path. NF4LORA_BACKEND=auto|triton|torch forces a choice: with
TRITON_INTERPRET=1 and NF4LORA_BACKEND=triton, CPU tensors run the real Triton kernels in the interpreter (how
the kernel tests run without a GPU); NF4LORA_BACKEND=torch runs the torch path on any device.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "NF4LORA_BACKEND"


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for work on tensor `t`, honouring NF4LORA_BACKEND."""
    choice = os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if t.is_cuda else "torch"
    return choice
