"""Tiny stand-ins for the published checkpoints (tests, benchmarks' tokenizer files, and
`--tiny-random` demos without the 13 GB download): `checkpoint.write_tiny_checkpoint` writes one
for any family; `glm6b`, `glm2` and `glm4` train each family's tokenizer and draw its weights.

    python -m model_runtime make-tiny DIR [--family chatglm|chatglm2|chatglm3|glm4]
"""
