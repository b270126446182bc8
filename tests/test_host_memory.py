"""pixelflow.host_memory: large freed tensors stay in the heap for reuse instead of going back to the OS."""

import json
import subprocess
import sys

import pytest

from pixelflow.host_memory import keep_freed_memory

# Three 16 MiB tensors, then freed; glibc's own counters (mallinfo2) say where they lived:
# ``mapped`` is memory in mmap'd blocks (returned to the OS on free), ``heap`` the main heap.
CHILD = """
import ctypes, json, sys, torch
from pixelflow.host_memory import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def state():
    info = mallinfo2()
    return {"heap": info.arena, "mapped": info.hblkhd}
start = state()
tensors = [torch.ones(1 << 22) for _ in range(3)]
allocated = state()
del tensors
print(json.dumps({"applied": applied, "start": start, "allocated": allocated, "freed": state()}))
"""
MIB = 1 << 20


def malloc_states(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_large_tensors_come_from_the_heap_and_stay_there_when_freed():
    default = malloc_states("default")
    assert default["allocated"]["mapped"] - default["start"]["mapped"] >= 48 * MIB  # glibc maps each 16 MiB block
    kept = malloc_states("keep")
    assert kept["applied"]
    assert kept["allocated"]["mapped"] - kept["start"]["mapped"] < MIB  # served from the heap instead
    assert kept["allocated"]["heap"] - kept["start"]["heap"] >= 48 * MIB
    assert kept["freed"]["heap"] >= kept["allocated"]["heap"]  # and not trimmed away when freed


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("PIXELFLOW_DEFAULT_MALLOC", "1")
    assert keep_freed_memory() is False
