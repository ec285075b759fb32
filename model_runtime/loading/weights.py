"""A checkpoint's tensors into a model, shard by shard, tensor by tensor, straight into a model
already allocated in the target dtype on the target device: peak memory stays close to the final
model size (shards are memory-mapped, never loaded whole as float32).
"""
from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import Optional

import torch

from ..models.base import GLMModel
from ..models.config import CheckpointError
from ..quant.convert import quantized_linears
from ..quant.linear import QuantizedLinear
from ..quant.memory import libc, trim_heap
from .adapters import Adapter
from .checkpoint import read_shard

IGNORED_TENSORS = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")  # recomputed
TIED_HEAD = "lm_head.weight"  # ChatGLM-6B, and transformers' tied models: the embeddings' matrix


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path` (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    target = str(path.resolve())
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _release_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Drop the pages of a consumed tensor that is a view of a memory-mapped shard from this
    process's memory, so that a shard never sits in RSS whole (only pages inside a file mapping
    are touched, and they stay valid: a later read would fault them in from the file again)."""
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, (start + size) // page * page
    if last <= first or not any(low <= first and last <= high for low, high in ranges):
        return
    libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


class _Stacker:
    """Holds the checkpoint's parts of a stacked layer (`GLMModel.stacked_parts`) until all have
    arrived, then hands them over as one tensor under the stacked layer's name. A waiting part is
    a view of its memory-mapped shard (a LoRA-merged one its float copy); published shards list a
    layer's tensors together, so few wait at once."""

    def __init__(self, model: GLMModel):
        self.model = model
        self.parts = {layer: (stacked, index, rows, len(layers))
                      for stacked, layers in model.checkpoint_parts.items()
                      for index, (layer, _, rows) in enumerate(layers)}
        self.waiting: dict[str, dict[int, torch.Tensor]] = {}

    def names(self, name: str) -> list[str]:
        """The checkpoint's names of a model tensor (its parts' when it is stacked)."""
        parts = self.model.tensor_parts(name)
        return [name] if parts is None else [part for part, _, _ in parts]

    def take(self, name: str, tensor: torch.Tensor, path: Path) -> Optional[tuple[str, torch.Tensor]]:
        """(name, tensor) to load now: the tensor itself, the stacked one once its last part is in
        (a copy), or None while parts are missing."""
        owner, _, leaf = name.rpartition(".")
        if owner not in self.parts:
            return name, tensor
        stacked, index, rows, count = self.parts[owner]
        if tensor.dim() == 0 or tensor.shape[0] != rows:
            raise CheckpointError(f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                                  f"{rows} rows")
        key = f"{stacked}.{leaf}"
        parts = self.waiting.setdefault(key, {})
        parts[index] = tensor
        if len(parts) < count:
            return None
        del self.waiting[key]
        try:
            return key, torch.cat([parts[i] for i in range(count)])
        except RuntimeError:
            shapes = ", ".join(str(tuple(parts[i].shape)) for i in range(count))
            raise CheckpointError(f"{path.name}: the parts of {key!r} do not stack (shapes {shapes})") from None


def load_weights(model: GLMModel, files: list[Path], adapter: Optional[Adapter] = None,
                 provided_elsewhere: tuple[str, ...] = ()) -> None:
    """Copy every shard's tensors into the model, converting dtype on the way (a stacked layer's
    parts are stacked as they arrive: `_Stacker`).

    adapter: a LoRA adapter merged into each tensor as it arrives (before it is quantized).
    provided_elsewhere: name prefixes the files need not hold (a P-tuning checkpoint's prefix encoder)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = quantized_linears(model)  # filled through load_tensor: float weights quantized on arrival
    stacker = _Stacker(model)
    own_head = not model.tied_lm_head and (TIED_HEAD in params or "lm_head" in quantized)
    expected = {name for name in params if (name != TIED_HEAD or own_head) and not name.startswith(provided_elsewhere)} \
        | {f"{name}.weight" for name in quantized}
    expected = {part for name in expected for part in stacker.names(name)}
    seen: set[str] = set()
    release = hasattr(mmap, "MADV_DONTNEED")
    consumed: list[tuple[torch.Tensor, list[tuple[int, int]]]] = []  # views of mapped shards, read once loaded

    def load_one(name: str, tensor: torch.Tensor, path: Path) -> None:
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf in QuantizedLinear.STORED:
            try:
                quantized[owner].load_tensor(leaf, tensor)
            except ValueError as error:
                raise CheckpointError(f"{path.name}: tensor {name!r} {error}") from None
            trim_heap()  # quantizing/repacking temporaries leave heap holes glibc would keep
            return
        if name not in params:
            raise CheckpointError(f"{path.name}: unexpected tensor {name!r} (is this a ChatGLM-6B checkpoint?)")
        target = params[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)

    for path in files:
        ranges = None
        for name, tensor in read_shard(path):
            if name.endswith(IGNORED_TENSORS) or (name == TIED_HEAD and not own_head):
                continue
            if release and ranges is None:
                ranges = _mapped_ranges(path)  # the shard is mapped by now (if it is at all)
            if ranges:
                consumed.append((tensor, ranges))
            if adapter is not None:
                tensor = adapter.merged(name, tensor, path)
            seen.add(name)
            taken = stacker.take(name, tensor, path)
            if taken is None:
                continue  # a part of a stacked layer: its pages go once the stack is copied
            name, tensor = taken
            load_one(name, tensor, path)
            for stored, mapped in consumed:
                _release_pages(stored, mapped)
            consumed.clear()
    missing = sorted(expected - seen) + [part for name, module in quantized.items()
                                         if not module.ready and set(stacker.names(f"{name}.weight")) <= seen
                                         for part in stacker.names(f"{name}.weight_scale")]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{files[0].parent}: the weight files lack {shown}")
