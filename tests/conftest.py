"""Test-wide setup. (It does not touch sys.path: everything imports as the installed nf4lora.<part>.)"""

import os

import torch

# Without CUDA the Triton kernels can only run in the interpreter. Set it before any test module imports a
# kernel: Triton reads TRITON_INTERPRET when a @triton.jit function is defined, so setting it later would be
# too late for kernels already imported. Tests of the torch path are unaffected (they never call Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
