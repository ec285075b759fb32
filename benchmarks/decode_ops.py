"""What one decode step launches: aten ops per layer and host syncs per step, for every GLM family,
at tiny and at full-size layer shapes, batch 1 and batch 4, through the engine's own decode step
(`DecodeBatch.step`).

    python -m benchmarks.decode_ops                 # every family, tiny and full shapes (about a minute)
    python -m benchmarks.decode_ops --shapes tiny   # tiny shapes only (seconds)

A step runs on the CPU the path a GPU runs: no CPU kernel of ours (native/), no CPU-only
attention kernel, bfloat16 weights. Every aten op below autograd is counted (a `TorchDispatchMode`
sees each one, as a GPU would launch it); `kernels` leaves out what launches nothing on a GPU
(views and bare allocations). Per layer is the difference between the same step of the same
network with two blocks and with one (so exact, whatever the step does besides); `other` is
what is left per step (embedding, rotary tables, final norm, logits, sampling). A host sync is an
op whose result the host must wait for: `.item()` / `int()` / `bool()` on a tensor
(`_local_scalar_dense`), `.tolist()`, and ops whose output size depends on the data (nonzero,
masked_select, unique, ...). Counts, not times: they are the same on any machine.
Writes benchmarks/results/decode_ops.json (`--label` names the set of rows, e.g. before/after).
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import CHATGLM_6B, RESULTS, print_table, randomize
from benchmarks.family import FULL, HF_FULL
from model_runtime import native
from model_runtime.loading.family import model_class
from model_runtime.models.glm2 import GLM2Config
from model_runtime.models.glm6b import GLMConfig
from model_runtime.models.glm_hf import HFGLMConfig
from model_runtime.protocol import SamplingParams
from model_runtime.serving.decode_batch import DecodeBatch, new_sequence

FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4", "glm4-0414", "glm4-hf")
SHAPES = ("tiny", "full")
BATCHES = (1, 4)
VOCAB = 1024  # the output layer's width does not change the ops a layer launches
SPECIAL = dict(bos_token_id=1000, eos_token_id=1001, mask_token_id=1002, gmask_token_id=1003, pad_token_id=3)
TINY_GLM6B = dict(hidden_size=64, num_attention_heads=4, inner_hidden_size=256, max_sequence_length=2048)
TINY_GLM2 = dict(hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                 ffn_hidden_size=128, seq_length=2048)
TINY_HF = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
               max_position_embeddings=2048, rms_norm_eps=1e-5)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "repeat_interleave", "is_nonzero", "equal", "allclose", "_assert_async"}
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}


def config(family: str, shape: str, layers: int):
    """A config of `family` with `layers` blocks at tiny or full-size widths (vocabulary VOCAB)."""
    if family == "chatglm":
        sizes = TINY_GLM6B if shape == "tiny" else {k: v for k, v in CHATGLM_6B.items() if k != "num_layers"}
        return GLMConfig(**dict(sizes, vocab_size=VOCAB, num_layers=layers), **SPECIAL)
    if family in ("glm4-0414", "glm4-hf"):
        sizes = TINY_HF if shape == "tiny" else HF_FULL["glm4-0414"]
        return HFGLMConfig(**dict(sizes, vocab_size=VOCAB, num_hidden_layers=layers), family=family,
                           eos_token_id=(SPECIAL["eos_token_id"],), pad_token_id=SPECIAL["pad_token_id"])
    sizes = TINY_GLM2 if shape == "tiny" else {k: v for k, v in FULL[family].items() if k != "num_layers"}
    return GLM2Config(**dict(sizes, padded_vocab_size=VOCAB, num_layers=layers), family=family,
                      eos_token_id=SPECIAL["eos_token_id"], pad_token_id=SPECIAL["pad_token_id"])


def build(family: str, shape: str, layers: int, dtype=torch.bfloat16):
    """Random weights on the CPU, with none of our CPU kernels: the network a GPU runs."""
    cfg = config(family, shape, layers)
    with native.switched_off("counting what a GPU launches"):
        model = model_class(cfg).empty(cfg, torch.device("cpu"), dtype)
    randomize(model, "cpu")
    return model.eval()


@dataclass
class OpCount:
    ops: int = 0  # every aten op below autograd
    kernels: int = 0  # those that launch work on a GPU (no views, no bare allocations)
    syncs: int = 0  # those the host waits for


class CountOps(TorchDispatchMode):
    """Counts the aten ops run inside it, as a backend sees them (composite ops decomposed), and
    `.tolist()`, which reads a tensor without one."""

    def __init__(self):
        super().__init__()
        self.count = OpCount()
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with self:  # a composite op (linear, layer_norm, SDPA, to, ...) counts as the ops it runs
            decomposed = func.decompose(*args, **kwargs)
        if decomposed is not NotImplemented:
            return decomposed
        name = func.overloadpacket.__name__
        self.count.ops += 1
        self.names[name] = self.names.get(name, 0) + 1
        if not func.is_view and name not in NO_LAUNCH:
            self.count.kernels += 1
        if name in SYNC_OPS:
            self.count.syncs += 1
        return func(*args, **kwargs)

    @contextmanager
    def counting_tolist(self):
        original = torch.Tensor.tolist

        def tolist(tensor):
            self.count.ops += 1
            self.count.syncs += 1
            self.names["tolist"] = self.names.get("tolist", 0) + 1
            return original(tensor)

        torch.Tensor.tolist = tolist
        try:
            yield
        finally:
            torch.Tensor.tolist = original


def gpu_path(batch: DecodeBatch) -> DecodeBatch:
    """A GPU's KV cache has no float32 scratch of the CPU-only attention kernel (kv_cache.py)."""
    for layer in batch.cache.layers:
        layer.scratch = None
    return batch


def prompts(model, rows: int) -> list[list[int]]:
    """Prompts of different lengths (the rows' keys end in different columns)."""
    texts = [[5 + (i + j) % 90 for j in range(6 + 3 * i)] for i in range(rows)]
    if not model.causal:  # ChatGLM-6B: [gMASK] <sop> end the bidirectional prefix
        texts = [t + [SPECIAL["gmask_token_id"], SPECIAL["bos_token_id"]] for t in texts]
    return texts


def step_count(model, rows: int, warm_steps: int = 2) -> CountOps:
    """The ops of one decode step of `rows` sequences (after their prefill and warm_steps steps)."""
    params = SamplingParams(max_length=64, temperature=0)
    seqs = [new_sequence(model, prompt, params) for prompt in prompts(model, rows)]
    for seq in seqs:
        seq.stop_ids = frozenset()
    with native.switched_off("counting what a GPU launches"):
        batch = gpu_path(DecodeBatch(model, slots=rows, max_len=64))
    for seq in seqs:
        batch.admit(seq)
    batch.prefill(seqs)
    for _ in range(warm_steps):
        batch.step(seqs)
    counter = CountOps()
    with counter, counter.counting_tolist():
        batch.step(seqs)
    return counter


def per_layer(family: str, shape: str, rows: int) -> dict:
    """Ops per layer per step (two blocks minus one) and the rest of the step."""
    one, two = (step_count(build(family, shape, layers), rows) for layers in (1, 2))
    layer = {key: getattr(two.count, key) - getattr(one.count, key) for key in ("ops", "kernels", "syncs")}
    layer_names = {name: two.names[name] - one.names.get(name, 0) for name in two.names
                   if two.names[name] != one.names.get(name, 0)}
    return {"family": family, "shape": shape, "batch": rows,
            "ops_per_layer": layer["ops"], "kernels_per_layer": layer["kernels"],
            "kernels_other": one.count.kernels - layer["kernels"], "syncs_per_step": two.count.syncs,
            "syncs_per_layer": layer["syncs"], "layer_ops": dict(sorted(layer_names.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, choices=SHAPES)
    parser.add_argument("--label", default="after", help="the name of this set of rows in the JSON (before/after)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [per_layer(family, shape, batch) for shape in args.shapes for family in args.families for batch in BATCHES]
    print_table([{k: v for k, v in row.items() if k != "layer_ops"} for row in rows])
    path = RESULTS / "decode_ops.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["torch"] = torch.__version__
    results[args.label] = rows
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {path} ({args.label})")


if __name__ == "__main__":
    main()
