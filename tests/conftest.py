"""Test-wide setup. (It does not touch sys.path: everything imports as the installed nf4lora.<part>.)"""

import os
import random
import zlib

import numpy as np
import pytest
import torch

# Without CUDA the Triton kernels can only run in the interpreter. Set it before any test module imports a
# kernel: Triton reads TRITON_INTERPRET when a @triton.jit function is defined, so setting it later would be
# too late for kernels already imported. Tests of the torch path are unaffected (they never call Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One torch thread for the test (modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")):
    tiny matmuls gain nothing from threads, and on a shared 2-core machine OpenMP spinning slows them ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def seed_global_rngs(request):
    """Seed Python's, NumPy's and torch's global RNGs (CPU and CUDA) before every test.

    The seed is the CRC-32 of the test's node id: each test (and each parametrized case) draws its own inputs,
    the same on every run and whatever ran before it or was deselected, so a failure reproduces with `-k`.
    Tests whose inputs matter take their own torch.Generator as well; this catches every draw that does not.
    """
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
