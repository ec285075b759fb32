"""Hugging Face Spaces: where the app runs, and ZeroGPU through the `spaces` package.

Spaces sets SPACE_ID (and SYSTEM=spaces) and expects the app on 0.0.0.0:7860. On ZeroGPU
hardware (SPACES_ZERO_GPU is set) a GPU is attached only while a function decorated with
`spaces.GPU` runs; `gpu_task` applies that decorator there and is a no-op everywhere else,
including when the package is not installed.
"""
from __future__ import annotations

import os

GPU_DURATION_S = int(os.environ.get("CHATGLM_GPU_DURATION", "120"))


def running_on_spaces() -> bool:
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("SYSTEM") == "spaces"


def zero_gpu() -> bool:
    return running_on_spaces() and os.environ.get("SPACES_ZERO_GPU", "0").lower() not in ("0", "false", "no")


def gpu_task(fn):
    """`spaces.GPU(duration=...)(fn)` on ZeroGPU, else `fn` unchanged."""
    if not zero_gpu():
        return fn
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=GPU_DURATION_S)(fn)
