"""keep_freed_memory: blocks of a few MiB come from the heap, where glibc's defaults map each afresh.

Run in fresh interpreters (this one has set the thresholds already, through the clients of other
tests); glibc's ``mallinfo2`` counts the blocks that have a mapping of their own.
"""

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, sys
from farmesh_core.malloc import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
mapped = []
for mib in (1, 4, 20, 40):
    before = libc.mallinfo2().hblks
    block = libc.malloc(mib << 20)
    mapped.append(libc.mallinfo2().hblks - before)
    libc.free(block)
print(kept, *mapped)
"""


def mapped_blocks(mode: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    ).stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")
def test_freed_blocks_up_to_32_mib_are_kept_for_reuse():
    assert mapped_blocks("default") == ["None", "1", "1", "1", "1"]  # glibc maps each of these on its own
    assert mapped_blocks("keep") == ["True", "0", "0", "0", "1"]  # only the 40 MiB block still is
