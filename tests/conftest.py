import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def reference_file(name: str) -> Path:
    """A file of ../shared/reference, or skip the test where that folder is absent (a user's clone)."""
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not found: the reference outputs live in the team's shared/ folder")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random ChatGLM-6B checkpoint in the official layout (.bin and safetensors)."""
    from model_runtime.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chatglm"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(tokenizer, model) in float32, loaded through load_model like the real checkpoint."""
    from model_runtime.loading import load_model

    return load_model(tiny_checkpoint, device="cpu", dtype="float32")
