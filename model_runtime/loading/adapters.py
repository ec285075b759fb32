"""LoRA adapters in PEFT's format, merged into the base model's float weights as they load.

An adapter folder (or Hugging Face id) holds `adapter_config.json` and `adapter_model.safetensors`
(or `adapter_model.bin`), as peft's `save_pretrained` writes them for LLaMA-Factory and most other
tuners. Its tensors, named after the base model's modules behind peft's `base_model.model.`:

  <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r]     a Linear layer's low-rank update
  <module>.lora_B.bias [out]                                          its bias update (lora_bias)
  <module>.lora_embedding_A [r, rows], <module>.lora_embedding_B [dim, r]   an Embedding's update
  <module>.base_layer.bias (or <module>.bias)                         a bias trained with bias "all"/"lora_only"
  <module>.<parameter>                                                a whole module of modules_to_save

Each weight becomes what peft's `merge_and_unload` makes of it: W + scale * B @ A (transposed for
an embedding), scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, r and lora_alpha
per module from rank_pattern / alpha_pattern. fan_in_fan_out needs nothing: peft turns it off for
torch.nn.Linear targets, and every GLM target is one. The merge happens in float32 on each tensor
as its shard is read, before quantization (`--quantize`), so no float copy of the model is kept.

What cannot be merged is refused before any weight loads, naming the file and the tensor or field:
DoRA, other PEFT methods, targets the base model does not have (an adapter of another model family,
or names no GLM uses), shapes that do not fit, a base model the adapter does not name.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..models.config import CheckpointError, read_config_json
from .checkpoint import hub_snapshot, is_hub_id, read_shard
from .family import model_class

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
BIAS_MODES = ("none", "all", "lora_only")
# adapter_config.json fields whose adapters a plain merge would get wrong, with the reason.
UNMERGEABLE = {
    "use_dora": "DoRA rescales every merged weight by a learnt magnitude vector",
    "layer_replication": "it duplicates layers of the base model",
    "target_parameters": "it adapts raw parameters rather than modules",
    "alora_invocation_tokens": "an activated LoRA only applies after its invocation tokens",
    "trainable_token_indices": "it retrains single rows of the embedding",
}
# The module names of each GLM layout, to tell an adapter of another family from a broken one.
LAYOUTS = {"ChatGLM-6B": ("transformer.layers.", "transformer.word_embeddings."),
           "ChatGLM2/ChatGLM3/GLM-4": ("transformer.encoder.", "transformer.embedding.", "transformer.output_layer."),
           "transformers' GLM (GLM-4-0414, glm-4-9b-chat-hf)": ("model.layers.", "model.embed_tokens.")}
# Family names in a model id or path, most specific first.
FAMILY_NAMES = (("glm4-0414", r"glm-?(4|z1)-.*0414"), ("glm4-hf", r"glm-?4-9b-chat-hf"), ("glm4", r"glm-?4"),
                ("chatglm3", r"chatglm3"), ("chatglm2", r"chatglm2"), ("chatglm", r"chatglm-6b"))


@dataclass(frozen=True)
class LowRank:
    """One module's LoRA update: scale * B @ A (transposed for an embedding)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight it updates ([out, in]; an embedding's [rows, dim])."""
        rows, columns = self.b.shape[0], self.a.shape[1]
        return (columns, rows) if self.embedding else (rows, columns)

    def delta(self) -> torch.Tensor:
        product = self.scale * (self.b.float() @ self.a.float())
        return product.T if self.embedding else product


@dataclass
class Adapter:
    """A LoRA adapter ready to merge: per parameter name of the base model, its update or its
    replacement tensor."""

    name: str
    file: Path
    rank: int
    updates: dict[str, LowRank] = field(default_factory=dict)
    bias_updates: dict[str, torch.Tensor] = field(default_factory=dict)  # scale * lora_B.bias
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: str = ""

    @property
    def description(self) -> str:
        return f"LoRA adapter {self.name} (r {self.rank})"

    def check_fits(self, config) -> None:
        """Refuse, before anything loads, an adapter for another family, or an update for a
        parameter the base model (of this config) lacks or whose shape differs."""
        with torch.device("meta"):  # names and shapes only: no memory
            model = model_class(config)(config)
            shapes = {name: tuple(p.shape) for name, p in model.checkpoint_tensors(model.named_parameters())}
        family = config.family
        hinted = family_named(self.base_model)
        if hinted and hinted != family:
            raise CheckpointError(f"{self.file.parent / CONFIG_FILE}: base_model_name_or_path {self.base_model!r} "
                                  f"is a {hinted} model, but the base model loaded is {family}: load the adapter "
                                  "on the model it was trained on")
        wanted = {name: update.shape for name, update in self.updates.items()}
        wanted.update({name: tuple(t.shape) for group in (self.bias_updates, self.replacements)
                       for name, t in group.items()})
        for name, shape in wanted.items():
            if name not in shapes:
                raise CheckpointError(f"{self.file}: tensor for {name!r} targets a parameter this {family} model "
                                      f"does not have{_layout_hint(name, shapes)}")
            if tuple(shape) != tuple(shapes[name]):
                raise CheckpointError(f"{self.file}: the update of {name!r} has shape {tuple(shape)}, but the base "
                                      f"model's is {tuple(shapes[name])}: the adapter was trained on a model of "
                                      "another size")

    def merged(self, name: str, tensor: torch.Tensor, path: Path) -> torch.Tensor:
        """The base tensor `name` (read from shard `path`) with this adapter merged in."""
        update, bias = self.updates.get(name), self.bias_updates.get(name)
        tensor = self.replacements.get(name, tensor)
        if update is None and bias is None:
            return tensor
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path.name}: tensor {name!r} is stored quantized ({tensor.dtype}), and the "
                                  f"adapter {self.file.name} can only be merged into float weights: load the float "
                                  "checkpoint instead (with --quantize 8 or 4 if memory is short)")
        return tensor.float() + (update.delta() if update is not None else bias.float())


def family_named(name: str) -> Optional[str]:
    """The GLM family a model id or path names, if any (e.g. "THUDM/chatglm3-6b" -> "chatglm3")."""
    lowered = (name or "").lower()
    return next((family for family, pattern in FAMILY_NAMES if re.search(pattern, lowered)), None)


def _layout_hint(name: str, shapes: dict) -> str:
    """Why a parameter name is unknown: another GLM layout's name, or no GLM name at all."""
    ours = next((layout for layout, prefixes in LAYOUTS.items() if any(n.startswith(prefixes) for n in shapes)), None)
    theirs = next((layout for layout, prefixes in LAYOUTS.items() if name.startswith(prefixes)), None)
    if theirs and theirs != ours:
        return f" (it is named like a {theirs} parameter: an adapter for another model family)"
    return " (an adapter for another model, or one whose target_modules name no GLM module)"


def resolve_adapter(name_or_path: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local adapter folder as is; otherwise a Hugging Face id, fetched into the hub's cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not is_hub_id(str(name_or_path)):
        raise CheckpointError(f"{name_or_path}: no such adapter directory (expected a folder with {CONFIG_FILE} "
                              f"and {' or '.join(WEIGHT_FILES)}, or a Hugging Face id like user/my-lora)")
    return hub_snapshot(str(name_or_path), revision, [CONFIG_FILE, *WEIGHT_FILES], "--adapter /path/to/adapter")


def read_adapter(name_or_path: Union[str, Path], revision: Optional[str] = None) -> Adapter:
    """Read and check a PEFT LoRA adapter (folder or Hugging Face id); CheckpointError naming the
    file and tensor or field when it cannot be merged."""
    folder = resolve_adapter(name_or_path, revision)
    config_path = folder / CONFIG_FILE
    config = read_config_json(config_path)
    _check_config(config, config_path)
    file = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if file is None:
        raise CheckpointError(f"{folder}: no adapter weights (looked for {' and '.join(WEIGHT_FILES)})")
    is_local = Path(name_or_path).expanduser().is_dir()
    adapter = Adapter(name=folder.resolve().name if is_local else str(name_or_path), file=file, rank=config["r"],
                      base_model=str(config.get("base_model_name_or_path") or ""))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    lora_biases: dict[str, torch.Tensor] = {}
    for key, tensor in read_shard(file):
        split = _split_key(key, file, config)
        if split is None:
            continue
        module, kind = split
        if kind in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"):
            halves.setdefault(module, {})[kind] = tensor
        elif kind == "lora_B.bias":
            lora_biases[module] = tensor
        else:  # a trained bias or a modules_to_save tensor: replaces the base's
            adapter.replacements[f"{module}.{kind}"] = tensor
    for module, pair in halves.items():
        update = _low_rank(module, pair, config, file)
        adapter.updates[f"{module}.weight"] = update
        if module in lora_biases:
            adapter.bias_updates[f"{module}.bias"] = update.scale * lora_biases.pop(module).float()
    if lora_biases:
        module = next(iter(lora_biases))
        raise CheckpointError(f"{file}: tensor {PEFT_PREFIX}{module}.lora_B.bias has no lora_A/lora_B weights")
    if not adapter.updates and not adapter.replacements:
        raise CheckpointError(f"{file}: holds no LoRA tensors")
    return adapter


def _check_config(config: dict, path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: peft_type {peft_type!r} is not LORA; only LoRA adapters can be merged")
    for name, reason in UNMERGEABLE.items():
        if config.get(name):
            raise CheckpointError(f"{path}: {name} is set, which cannot be merged into the weights ({reason})")
    if not isinstance(config.get("r"), int) or isinstance(config["r"], bool) or config["r"] <= 0:
        raise CheckpointError(f"{path}: r must be a positive integer, got {config.get('r')!r}")
    if not isinstance(config.get("lora_alpha"), (int, float)) or isinstance(config["lora_alpha"], bool):
        raise CheckpointError(f"{path}: lora_alpha must be a number, got {config.get('lora_alpha')!r}")
    if config.get("bias", "none") not in BIAS_MODES:
        raise CheckpointError(f"{path}: bias must be one of {', '.join(BIAS_MODES)}, got {config.get('bias')!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise CheckpointError(f"{path}: {name} must be an object")


def _split_key(key: str, file: Path, config: dict) -> Optional[tuple[str, str]]:
    """(module name in the base model, what the tensor is) for one adapter tensor name; None for
    a tensor that changes nothing (the base's own copy that peft saves beside a trained one)."""
    if not key.startswith(PEFT_PREFIX):
        raise CheckpointError(f"{file}: tensor {key!r} does not start with {PEFT_PREFIX!r}: not an adapter "
                              "written by peft")
    name = key.removeprefix(PEFT_PREFIX)
    if "lora_magnitude_vector" in name:
        raise CheckpointError(f"{file}: tensor {key!r} is a DoRA magnitude vector; DoRA adapters cannot be merged")
    for kind in ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B"):
        if name.endswith("." + kind):
            return name.removesuffix("." + kind), kind
    if "lora_" in name:
        raise CheckpointError(f"{file}: tensor {key!r} is not a LoRA tensor this runtime knows how to merge")
    module, _, leaf = name.rpartition(".")
    if module.endswith(".original_module"):  # the untouched original peft keeps beside a modules_to_save copy
        return None
    # A LoRA layer's base weights, and a modules_to_save copy (bias "all" saves its bias by that name too).
    module = module.removesuffix(".base_layer").removesuffix(".modules_to_save")
    saved = config.get("modules_to_save") or ()
    if leaf == "bias" and config.get("bias", "none") != "none":
        return module, leaf
    if any(module == entry or module.endswith("." + entry) for entry in saved):
        return module, leaf
    raise CheckpointError(f"{file}: tensor {key!r} is neither a LoRA tensor nor part of modules_to_save "
                          f"({list(saved)}) nor a bias trained with bias={config.get('bias', 'none')!r}")


def _low_rank(module: str, pair: dict[str, torch.Tensor], config: dict, file: Path) -> LowRank:
    embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
    a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    if set(pair) != {a_kind, b_kind}:
        lacking = ({a_kind, b_kind} - set(pair)) or (set(pair) - {a_kind, b_kind})
        raise CheckpointError(f"{file}: module {module!r} has no matching {' and '.join(sorted(lacking))}")
    a, b = pair[a_kind], pair[b_kind]
    rank = _pattern_value(config, "rank_pattern", module, config["r"], file)
    alpha = _pattern_value(config, "alpha_pattern", module, config["lora_alpha"], file)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise CheckpointError(f"{file}: tensors {PEFT_PREFIX}{module}.{a_kind} {tuple(a.shape)} and .{b_kind} "
                              f"{tuple(b.shape)} do not have rank r = {rank}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LowRank(a, b, scale, embedding)


def _pattern_value(config: dict, field_name: str, module: str, default, file: Path):
    """peft's per-module override (rank_pattern, alpha_pattern): the value of the first key that
    matches the end of the module's name, else the default."""
    for key, value in (config.get(field_name) or {}).items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module)
        except re.error as error:
            raise CheckpointError(f"{file.parent / CONFIG_FILE}: {field_name} key {key!r} is not a valid "
                                  f"pattern ({error})") from None
        if matched:
            return value
    return default
