"""train/allocator.py: with keep_freed_memory() a freed block is reused by the next allocation of its size
instead of being faulted in afresh, as glibc's defaults do for blocks of a few MiB and up."""

import statistics
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import torch
if sys.argv[1] == "tuned":
    from nf4lora.train.allocator import keep_freed_memory
    assert keep_freed_memory(), "mallopt refused the settings"
mib = int(sys.argv[2])
faults = []
for _ in range(9):  # allocate, touch every page, free: what a training step does with its activations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(mib << 20, dtype=torch.uint8)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(" ".join(map(str, faults)))
"""


def minor_faults(mode: str, mib: int) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(mib)], capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize("mib", [8, 20])
def test_freed_blocks_are_reused_without_page_faults(mib):
    pages = (mib << 20) // 4096
    default, tuned = minor_faults("default", mib), minor_faults("tuned", mib)
    # Medians over the cycles after the first: the VM's kernel (DAMON) now and then reclaims idle pages of any
    # process, so a kept block can still fault in once in a while. glibc's defaults fault it in again on most
    # cycles; the first cycle faults it in everywhere.
    assert tuned[0] > pages // 2, tuned
    assert statistics.median(default[1:]) > pages // 2, default
    assert statistics.median(tuned[1:]) < pages // 100, tuned
