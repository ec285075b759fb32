"""Native PyTorch runtime for the ChatGLM family: load a checkpoint, chat, serve many users.

Heavy modules (torch, transformers) load on first use, so that `model_runtime.protocol` (the
engine interface the web demo talks to) imports without them.
"""
from importlib import import_module

_EXPORTS = {
    "load_model": "loading",
    "CheckpointError": "config",
    "GLMConfig": "config",
    "ChatGLMModel": "model",
    "ChatGLMTokenizer": "tokenizer",
    "ChatGLM2Model": "glm2",  # ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat
    "GLM2Config": "glm2",
    "chat": "chat",
    "stream_chat": "chat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model_runtime' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
