"""Text <-> token ids for each GLM family, on `sentencepiece` and `tiktoken` alone (no
transformers): `glm6b` (ChatGLM-6B's ice_text.model), `glm2` (ChatGLM2/3's tokenizer.model),
`glm4` (GLM-4's tiktoken-format BPE); `special_tokens` is what the later two share."""
