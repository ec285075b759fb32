"""The GLM networks in plain PyTorch: one base class (`base.GLMModel`), one config base
(`config.ModelConfig`), the static KV cache they write to (`kv_cache`), and one file per family:
`glm6b` (ChatGLM-6B) and `glm2` (ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat, one network)."""
