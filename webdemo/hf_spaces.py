"""Hugging Face Spaces: where the app runs, and ZeroGPU through the `spaces` package.

Spaces sets SPACE_ID (and SYSTEM=spaces) and expects the app on 0.0.0.0:7860. On ZeroGPU
hardware (SPACES_ZERO_GPU is set, which is what `spaces` reads) a GPU is attached only while a
function decorated with `spaces.GPU` runs, in a forked worker process. The app then serves with
model_runtime's per-call backend, and `zerogpu_call` is its host wrapper: each answer becomes one
`spaces.GPU` generator call with the duration the backend computed for it.
"""
from __future__ import annotations

import os

# Why /v1/chat/completions answers 503 on ZeroGPU (README "Deploy on Hugging Face Spaces").
ZEROGPU_API_MESSAGE = (
    "this server runs on ZeroGPU, which lends a GPU per visitor of the page through Gradio's queue and "
    "charges it to that visitor's quota; the OpenAI API has no such visitor, so it serves no answers here. "
    "Use the page, or its Gradio API with gradio_client (endpoint /chat), which ZeroGPU meters per caller")


def running_on_spaces() -> bool:
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("SYSTEM") == "spaces"


def zero_gpu() -> bool:
    return running_on_spaces() and os.environ.get("SPACES_ZERO_GPU", "0").lower() not in ("", "0", "false", "no")


def zerogpu_call():
    """The host wrapper for model_runtime's PerCallBackend: `spaces.GPU(duration=...)`.

    `spaces` is imported only here, at start-up, before the model loads: on ZeroGPU it patches
    torch so that the main process never initialises CUDA. It comes with every Space; elsewhere
    an ImportError says to install it."""
    import spaces  # optional dependency: only ZeroGPU mode needs it

    def wrap(run, duration):
        return spaces.GPU(duration=duration)(run)

    return wrap
