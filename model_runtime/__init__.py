"""Native PyTorch runtime for the ChatGLM family: load a checkpoint, chat, serve many users.

    models/      the networks: one base class, one file per family, the static KV cache
    tokenizers/  text <-> ids per family
    chat/        chat formats, prompt planning, streamed answer text, model.chat / stream_chat
    serving/     the decode batch (KV cache slots), sampling, the continuous-batching engine
    quant/       INT8 / INT4 weights: storage format, kernels per device, QuantizedLinear, saving
    loading/     checkpoint files, family detection, device and dtype, load_model
    tiny/        tiny random checkpoints for tests and offline demos
    cli.py       `python -m model_runtime chat` and `make-tiny`
    protocol.py  the engine interface the web demo talks to (no torch)

The names below are imported on first use: `model_runtime.protocol` must import without torch
(the web demo imports it, and importing it runs this file first).
"""
from importlib import import_module

_EXPORTS = {
    "load_model": "loading.loader",
    "CheckpointError": "models.config",
    "GLMModel": "models.base",
    "GLMConfig": "models.glm6b",
    "ChatGLMModel": "models.glm6b",
    "ChatGLM2Model": "models.glm2",  # ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat
    "GLM2Config": "models.glm2",
    "ChatGLMTokenizer": "tokenizers.glm6b",
    "stream_chat": "chat.stream",
    "Engine": "serving.engine",
    "start_engine": "serving.launch",
    "save_quantized": "quant.saving",
    "write_tiny_checkpoint": "tiny.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model_runtime' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
