"""A P-tuning v2 checkpoint on top of a base model, as the GLM repositories' `ptuning/` code saves it.

Their trainer saves only the trainable parameters, so the checkpoint folder's `pytorch_model.bin`
(or `model.safetensors`) holds `transformer.prefix_encoder.*` and nothing else; their web demo
loads the base model with `pre_seq_len` set, then those tensors into the prefix encoder. The
number of prefix rows and whether there is a projection MLP are read from the tensors themselves;
a `pre_seq_len` given by the user, or in the checkpoint's config.json, must agree with them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..models.base import GLMModel
from ..models.config import CheckpointError, read_config_json
from .adapters import family_named
from .checkpoint import read_shard, weight_files
from .family import model_class

PREFIX = "transformer.prefix_encoder."


@dataclass(frozen=True)
class PrefixCheckpoint:
    """The prefix encoder's tensors (names without PREFIX) and what they say about the prefix."""

    folder: Path
    tensors: dict[str, torch.Tensor]
    pre_seq_len: int
    prefix_projection: bool
    base_model: str = ""  # the model it was trained on, as its config.json names it (if it has one)

    @property
    def description(self) -> str:
        return f"P-tuning v2 prefix {self.folder.resolve().name} ({self.pre_seq_len} tokens)"


def read_ptuning_checkpoint(folder: Union[str, Path], pre_seq_len: Optional[int] = None) -> PrefixCheckpoint:
    """The prefix encoder of a P-tuning v2 checkpoint folder; CheckpointError naming the file (and
    tensor) when it is not one, or when pre_seq_len (if given) disagrees with it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such P-tuning checkpoint directory (expected the folder the "
                              "ptuning/ training wrote, with pytorch_model.bin holding transformer.prefix_encoder.*)")
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        for name, tensor in read_shard(path):
            if not name.startswith(PREFIX):
                raise CheckpointError(f"{path}: tensor {name!r} is not part of a P-tuning v2 prefix encoder "
                                      f"(expected only {PREFIX}*): is this a whole model rather than a P-tuning "
                                      "checkpoint?")
            tensors[name.removeprefix(PREFIX)] = tensor
    rows = tensors.get("embedding.weight")
    if rows is None or rows.dim() != 2:
        raise CheckpointError(f"{folder}: no 2-D tensor {PREFIX}embedding.weight, the prefix rows of P-tuning v2")
    found = rows.shape[0]
    saved = _saved_config(folder)  # the trainer saves the whole model's config.json next to the tensors
    for source, wanted in (("the pre_seq_len asked for", pre_seq_len),
                           (f"{folder / 'config.json'}'s pre_seq_len", saved.get("pre_seq_len"))):
        if wanted is not None and wanted != found:
            raise CheckpointError(f"{folder}: tensor {PREFIX}embedding.weight holds {found} prefix rows, "
                                  f"but {source} is {wanted}")
    return PrefixCheckpoint(folder, tensors, found, prefix_projection=any(n.startswith("trans.") for n in tensors),
                            base_model=str(saved.get("_name_or_path") or ""))


def _saved_config(folder: Path) -> dict:
    path = folder / "config.json"
    return read_config_json(path) if path.is_file() else {}


def with_prefix_config(config, checkpoint: PrefixCheckpoint):
    """The base model's config with the checkpoint's prefix. Refuses, before anything loads, a
    prefix whose config.json names a model of another family or whose tensors do not fit."""
    if not any(f.name == "pre_seq_len" for f in dataclasses.fields(config)):
        raise CheckpointError(f"{checkpoint.folder}: P-tuning v2 prefixes are for ChatGLM's own layouts; the base "
                              f"model loaded ({config.family}, transformers' layout) takes none")
    hinted = family_named(checkpoint.base_model)
    if hinted and hinted != config.family:
        raise CheckpointError(f"{checkpoint.folder / 'config.json'}: the prefix was trained on "
                              f"{checkpoint.base_model!r}, a {hinted} model, but the base model loaded is "
                              f"{config.family}")
    config = dataclasses.replace(config, pre_seq_len=checkpoint.pre_seq_len,
                                 prefix_projection=checkpoint.prefix_projection)
    with torch.device("meta"):  # names and shapes only: no memory
        params = dict(model_class(config)(config).transformer.prefix_encoder.named_parameters())
    for name, tensor in checkpoint.tensors.items():
        target = params.get(name)
        if target is None or tuple(tensor.shape) != tuple(target.shape):
            wanted = "no such tensor" if target is None else f"shape {tuple(target.shape)}"
            raise CheckpointError(
                f"{checkpoint.folder}: tensor {PREFIX}{name} has shape {tuple(tensor.shape)}, but this base model "
                f"({config.family}, {config.num_layers} layers) expects {wanted}: was the prefix trained for "
                "another model?")
    missing = sorted(set(params) - set(checkpoint.tensors))
    if missing:
        raise CheckpointError(f"{checkpoint.folder}: the prefix encoder lacks {', '.join(PREFIX + n for n in missing)}")
    return config


def load_prefix(model: GLMModel, checkpoint: PrefixCheckpoint) -> None:
    """Copy the checkpoint's tensors (checked by `with_prefix_config`) into the model's prefix
    encoder and compute the prefix."""
    with torch.no_grad():
        model.transformer.prefix_encoder.load_state_dict(checkpoint.tensors)
    model.refresh_prefix()
