"""keep_freed_memory: freed blocks are reused, not faulted in again (checked in a fresh process,
since the setting is process-wide)."""

import subprocess
import sys

import pytest

FAULTS_OF_A_REUSED_BUFFER = """
import resource, sys, torch
from llmfn.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults_of_a_fresh_64mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MB, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, *[faults_of_a_fresh_64mb_tensor() for _ in range(16)])
"""


def faults(mode: str) -> tuple[str, list[int]]:
    """(whether keep_freed_memory applied, page faults of each of 16 rounds) in a new process."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_REUSED_BUFFER, mode],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return out[0], [int(n) for n in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_rather_than_faulted_in_again():
    applied, kept = faults("keep")
    _, default = faults("default")
    assert applied == "True"
    assert min(default) > 10_000  # 64 MB is mmap'd and unmapped: 16k pages every time
    # Kept on the heap, the freed block is reused. Small allocations may split it in the first
    # rounds (a fresh 64 MB is then faulted in once more), so only the steady state counts.
    assert sum(kept[-4:]) < 100, kept
