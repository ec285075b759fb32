"""One pool of OpenMP workers for the engine's thread, not two.

torch's CPU kernels run in OpenMP parallel regions, and GNU OpenMP (libgomp, shipped with torch's
Linux wheels) keeps a pool of worker threads for each thread that starts regions. The thread that
loads a model gets one; the engine's own thread (engine.py) gets a second. Once libgomp manages
more threads than the machine has CPUs it "throttles" them: between regions its workers spin 100
times instead of 300,000 (GCC's documentation of GOMP_SPINCOUNT), then sleep, so every region has
to wake them through the kernel. On 2 cores of an AMD EPYC Zen 5 a small batched matmul took
43-62 us on the engine's thread against 14 on the loading thread, and a mid-size model's 4-answer
decode step 10.7 ms in the engine against 6.5 ms on the thread that loaded it (torch 2.13).

`release_workers` hands the calling thread's pool back (OpenMP 5's `omp_pause_resource_all`, which
in libgomp joins only the caller's own workers), so the engine's pool is the only one and keeps
spinning between the many small regions of a decode step. A later parallel region on that thread
makes a new pool (correct, only slower again). Other OpenMP runtimes (Intel's, LLVM's) neither
throttle this way nor pause per thread, so nothing is done there."""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: release the threads, keep the settings


@functools.lru_cache(maxsize=1)
def _libgomp() -> Optional[ctypes.CDLL]:
    """torch's GNU OpenMP runtime, or None (not Linux, or another runtime). Other packages bring
    private copies under hashed names (sentencepiece's `libgomp-6a29c32d.so.1.0.0`) with pools of
    their own: torch's is the one in its package (its wheel's `torch/lib` or `torch.libs`), else
    the system's `libgomp.so.1` (a distribution's torch)."""
    try:
        mapped = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    torch_folder = Path(torch.__file__).resolve().parent
    for line in mapped.splitlines():
        path = Path(line.split()[-1])
        if path.name.startswith("libgomp") and (torch_folder in path.parents or path.parent.name == "torch.libs"
                                                or path.name == "libgomp.so.1"):
            runtime = ctypes.CDLL(str(path))  # the copy already loaded: dlopen returns its handle
            return runtime if hasattr(runtime, "omp_pause_resource_all") else None
    return None


def release_workers() -> bool:
    """Join the OpenMP workers of the calling thread (call it outside any parallel region, before
    another thread takes over the computing); True if a pool was handed back or none existed."""
    runtime = _libgomp()
    if runtime is None:
        return False
    released = runtime.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    if not released:
        log.info("OpenMP kept this thread's workers (omp_pause_resource_all refused)")
    return released
