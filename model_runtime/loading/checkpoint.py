"""Where a checkpoint's files are: a local directory, or a Hugging Face id fetched into the hub's
cache; its weight shards (safetensors or .bin, from their index); and reading one shard."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open

from ..models.config import CheckpointError

WEIGHT_FORMATS = {
    # format: (index file, single-file name)
    "safetensors": ("model.safetensors.index.json", "model.safetensors"),
    "bin": ("pytorch_model.bin.index.json", "pytorch_model.bin"),
}


def resolve_checkpoint(name_or_path: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local directory as is; otherwise a Hugging Face id, fetched into the hub's normal cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or not is_hub_id(name):
        raise CheckpointError(f"{name}: no such checkpoint directory (expected a folder with config.json, "
                              "tokenizer files and weight shards, or a Hugging Face id like THUDM/chatglm-6b)")
    folder = hub_snapshot(name, revision, ["*.json", "*.model", "*.txt"])
    chosen = _weight_format(folder, None)
    return hub_snapshot(name, revision, ["*.json", "*.model", "*.safetensors" if chosen == "safetensors" else "*.bin"])


def is_hub_id(name: str) -> bool:
    """Whether a name that is not a local folder can be a Hugging Face id ("owner/name")."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def hub_snapshot(repo_id: str, revision: Optional[str], patterns: list[str],
                 local_flag: str = "--model /path/to/checkpoint") -> Path:
    """The files of a Hugging Face repository that match `patterns`, fetched into the hub's cache
    (or found there offline); one clear CheckpointError, which suggests `local_flag`, when that fails."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:  # offline, unknown id, gated repo, disk full...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face Hub, and it is not in the local cache "
            f"({reason}). Download it where there is internet access (`hf download "
            f"{repo_id}`) or pass a local directory instead: {local_flag}"
        ) from None


def _weight_format(folder: Path, weight_format: Optional[str]) -> str:
    formats = [weight_format] if weight_format else list(WEIGHT_FORMATS)
    if weight_format and weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")
    for fmt in formats:
        index, single = WEIGHT_FORMATS[fmt]
        if (folder / index).exists() or (folder / single).exists():
            return fmt
    wanted = " or ".join(f"{i} / {s}" for i, s in (WEIGHT_FORMATS[f] for f in formats))
    raise CheckpointError(f"{folder}: no weights found (looked for {wanted})")


def weight_files(folder: Path, weight_format: Optional[str] = None) -> list[Path]:
    """The shard files of a checkpoint, from its index when there is one."""
    fmt = _weight_format(folder, weight_format)
    index_name, single = WEIGHT_FORMATS[fmt]
    index = folder / index_name
    if not index.exists():
        return [folder / single]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index}: not a valid weight index ({error})") from None
    files = [folder / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}; "
                              "download the checkpoint again")
    return files


def read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one shard, memory-mapped where the format allows."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as shard:
                for name in shard.keys():
                    yield name, shard.get_tensor(name)
            return
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (pre-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file is missing") from None
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read this weight shard, it looks corrupt or truncated "
                              f"({type(error).__name__}: {error}); download it again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    yield from state.items()
