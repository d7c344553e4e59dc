"""The served process's malloc thresholds: a 16 MiB buffer comes from the heap (reused), not from a fresh mmap."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and mallinfo2")

PROBE = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
tuned = None
if sys.argv[2] == "tune":
    from medgemma import malloc
    tuned = malloc.tune()
before = libc.mallinfo2().hblkhd
p = libc.malloc(16 * 2**20)
print(tuned, libc.mallinfo2().hblkhd - before)
libc.free(p)
"""


def probe(mode: str, **env: str) -> tuple[str, int]:
    """(what tune() returned, bytes of fresh mmap regions one 16 MiB malloc added) in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), mode],
        env={**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0], int(out[1])


def test_without_tuning_a_16_mib_buffer_is_a_fresh_mapping():
    tuned, mapped = probe("plain")
    assert tuned == "None" and mapped >= 16 * 2**20


def test_tuned_a_16_mib_buffer_comes_from_the_heap():
    assert probe("tune") == ("True", 0)


def test_an_operators_glibc_tunables_win():
    tuned, mapped = probe("tune", GLIBC_TUNABLES="glibc.malloc.check=0")
    assert tuned == "False" and mapped >= 16 * 2**20
