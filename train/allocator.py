"""glibc malloc settings for CPU training: keep freed memory for reuse instead of returning it to the OS.

A training step allocates and frees its activations afresh (hundreds of MiB on the 135M default model). With
glibc's defaults, large blocks come from mmap and the heap top is trimmed when freed, so the next step touches
new pages: 80-100 thousand minor page faults per step, each zeroing 4 KiB with a trip through the hypervisor on
a VM. With the settings below: 13 per step, at the same peak RSS (1633 MiB; memory already used at the peak is
reused rather than handed back and faulted in again). Measured on the 2-core CI VM (SmolLM2-135M, 4 x 256
tokens), the step got 3-18% faster depending on the VM's state (3.45 -> 2.84 s and 3.30 -> 3.26 s in two
rounds); in benchmarks/results/qlora-step-cpu.md ours went from 340 to 351 tokens/s and the HF + PEFT +
bitsandbytes peer, given the same settings, from 315 to 347.

Since then the torch path dequantizes into reused per-thread buffers (kernels/torch_path.py), which removed most
of those faults, and the setting stopped paying for nf4lora: in the step benchmark's ablation of 2026-12-05 (idle
machine, benchmarks/results/qlora-step-cpu.md) ours ran at 354 tokens/s with glibc's defaults and 353 with it,
while the HF + PEFT + bitsandbytes peer went from 307 to 352. As it changes malloc for the whole process, the
training loop applies it only when asked (`--keep-freed-memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap (reused), larger ones from mmap (returned on free). 32 MiB is the
# largest value glibc's own dynamic threshold reaches; bigger tensors are rare and big enough to amortise faults.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap is returned to the OS only beyond this.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; False (nothing changed) where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
