"""train/allocator.py: keep_freed_memory() makes glibc serve blocks of up to 32 MiB from the heap and keep them
there when freed, so the next allocation reuses pages already faulted in (the speed-up it buys is measured in
benchmarks/results/qlora-step-cpu.md). Checked on the process's memory map, which is deterministic: page-fault
counts are not (OpenMP's thread start-up and the VM's page reclaim move them from run to run)."""

import subprocess
import sys

import pytest

PROBE = r"""
import sys
import torch
if sys.argv[1] == "tuned":
    from nf4lora.train.allocator import keep_freed_memory
    assert keep_freed_memory(), "mallopt refused the settings"

def heap():
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[heap]"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                return start, end
    return 0, 0

block = torch.empty(20 << 20, dtype=torch.uint8).fill_(1)  # a 20 MiB activation, every page touched
start, end = heap()
in_heap = start <= block.data_ptr() < end
del block
start, end = heap()
print(int(in_heap), (end - start) >> 20)
"""


def probe(mode: str) -> tuple[bool, int]:
    """(was the 20 MiB block in the heap, heap size in MiB after freeing it) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    in_heap, heap_mib = out.stdout.split()
    return bool(int(in_heap)), int(heap_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_stay_in_the_heap():
    in_heap, _ = probe("default")
    assert not in_heap  # glibc's defaults: a fresh process maps blocks this large with mmap, unmapped on free
    in_heap, heap_mib = probe("tuned")
    assert in_heap and heap_mib >= 20  # served from the heap, and the heap was not trimmed when it was freed
