"""glibc malloc thresholds for the serving process, so that a request's large buffers are reused, not mapped anew.

Why: glibc serves an allocation above ``M_MMAP_THRESHOLD`` (128 KiB at start) with a fresh ``mmap`` and unmaps it
when it is freed, so the kernel faults in and zeroes every page of such a buffer each time one is used. glibc
raises the threshold by itself after a large free; in the served process most of a request's large buffers were
still mapped anew each time (why glibc's rule did not settle there was not established). Measured with the
``small`` demo and 512x512 images, one request at a time:

* the served process took 4,500-11,800 page faults per image request, almost all in the engine's two compute
  threads; the same requests driven through the engine in one plain process took about 40;
* with the thresholds below, the served process took 0-400.

Two servers side by side, one with the thresholds and one without, driven in interleaved rounds of 8 image requests
(2026-12-07, this project's 2-core CPU machine): medians of 1.054x the tokens per second and 0.94x the time to first
token over 6 rounds (thresholds set through ``GLIBC_TUNABLES``), then, through this module, 1.00x and 0.87x over 6
rounds and 1.093x and 0.84x over 10 (9 of those 10 rounds faster).

The values are the top of glibc's own dynamic range, where its rule would end up: 32 MiB, the most
``M_MMAP_THRESHOLD`` may be, and a trim threshold of twice that. Allocations above 32 MiB (weights, the KV pool,
CT volumes) are still mapped and go back to the system when freed, and free heap above 64 MiB is still returned.
An operator's own malloc settings in ``GLIBC_TUNABLES`` win: then nothing is changed. Off glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES


def tune() -> bool:
    """Set the thresholds in this process; True when glibc accepted both."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        log.info("malloc thresholds left as GLIBC_TUNABLES sets them")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (macOS, Windows)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if ok:
        log.info("malloc: buffers up to %d MiB are reused from the heap", MMAP_THRESHOLD_BYTES // 2**20)
    return ok
