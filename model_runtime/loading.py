"""Checkpoint directory or Hugging Face id -> (tokenizer, model) on a device.

Weights are copied shard by shard, tensor by tensor, straight into a model already allocated in
the target dtype on the target device: peak memory stays close to the final model size (shards
are memory-mapped, never loaded whole as float32).
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import mmap
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from .config import CheckpointError, GLMConfig
from .model import ChatGLMModel
from .family import load_tokenizer, model_class, read_config
from .quant import QuantizedLinear, quantized_linears, resolve_quantization, trim_heap
from .quant import quantize_lm_head as quantize_lm_head_of  # the name load_model's flag would shadow
from .tokenizer import ChatGLMTokenizer

log = logging.getLogger(__name__)

WEIGHT_FORMATS = {
    # format: (index file, single-file name)
    "safetensors": ("model.safetensors.index.json", "model.safetensors"),
    "bin": ("pytorch_model.bin.index.json", "pytorch_model.bin"),
}
IGNORED_TENSORS = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq",  # recomputed
                   "lm_head.weight")  # ChatGLM-6B: tied to the embeddings
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def pick_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """'auto' is CUDA, then Apple MPS, then CPU."""
    if str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError("--device cuda was asked for, but PyTorch sees no CUDA GPU here "
                                  "(use --device cpu, or install a CUDA build of torch)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise CheckpointError("--device mps was asked for, but Apple MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """CUDA and MPS default to float16, CPU to bfloat16."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def resolve_checkpoint(name_or_path: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local directory as is; otherwise a Hugging Face id, fetched into the hub's normal cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name}: no such checkpoint directory (expected a folder with config.json, "
                              "tokenizer files and weight shards, or a Hugging Face id like THUDM/chatglm-6b)")
    return _download(name, revision)


def _download(repo_id: str, revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download

    def fetch(patterns):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))

    try:
        folder = fetch(["*.json", "*.model", "*.txt"])
        chosen = _weight_format(folder, None)
        return fetch(["*.json", "*.model", "*.safetensors" if chosen == "safetensors" else "*.bin"])
    except CheckpointError:
        raise
    except Exception as error:  # offline, unknown id, gated repo, disk full...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face Hub, and it is not in the local cache "
            f"({reason}). Download it where there is internet access (`huggingface-cli download "
            f"{repo_id}`) or pass a local checkpoint directory instead: --model /path/to/checkpoint"
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
            from safetensors import safe_open

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


def check_fits(config: GLMConfig, device: torch.device, dtype: torch.dtype,
               quantize: Optional[int] = None) -> None:
    """Refuse up front, with advice, a model larger than the memory left on the device."""
    element = torch.empty((), dtype=dtype).element_size()
    h, f, layers = config.hidden_size, config.inner_hidden_size, config.num_layers
    linear_bytes = quantize / 8 if quantize else element
    needed = config.vocab_size * h * element + layers * (4 * h * h + 2 * h * f) * linear_bytes
    if hasattr(config, "parameter_counts"):  # ChatGLM2/3, GLM-4: grouped KV, SwiGLU, untied output
        other, block_linear = config.parameter_counts()
        needed = other * element + block_linear * linear_bytes
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        import psutil
        free = psutil.virtual_memory().available
    else:
        return
    if needed > free:
        raise CheckpointError(
            f"the model needs about {needed / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} but only "
            f"{free / 2**30:.1f} GiB is free on {device}: load it quantized (--quantize 8 or 4) or on "
            "another device")


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
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


@functools.lru_cache(maxsize=None)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def load_weights(model: ChatGLMModel, files: list[Path]) -> None:
    """Copy every shard's tensors into the model, converting dtype on the way."""
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = quantized_linears(model)  # filled through load_tensor: float weights quantized on arrival
    expected = {name for name in params if name != "lm_head.weight"} | {f"{name}.weight" for name in quantized}
    seen: set[str] = set()
    release = hasattr(mmap, "MADV_DONTNEED")
    for path in files:
        ranges = None
        for name, tensor in read_shard(path):
            if name.endswith(IGNORED_TENSORS):
                continue
            if release and ranges is None:
                ranges = _mapped_ranges(path)  # the shard is mapped by now (if it is at all)
            owner, _, leaf = name.rpartition(".")
            if owner in quantized and leaf in QuantizedLinear.STORED:
                try:
                    quantized[owner].load_tensor(leaf, tensor)
                except ValueError as error:
                    raise CheckpointError(f"{path.name}: tensor {name!r} {error}") from None
                seen.add(name)
                if ranges:
                    _release_pages(tensor, ranges)
                trim_heap()  # quantizing/repacking temporaries leave heap holes glibc would keep
                continue
            if name not in params:
                raise CheckpointError(f"{path.name}: unexpected tensor {name!r} (is this a ChatGLM-6B checkpoint?)")
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"config.json implies {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
            seen.add(name)
            if ranges:
                _release_pages(tensor, ranges)
    missing = sorted(expected - seen) + [f"{name}.weight_scale" for name, module in quantized.items()
                                         if f"{name}.weight" in seen and not module.ready]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{files[0].parent}: the weight files lack {shown}")


def load_model(name_or_path: Union[str, Path], device: Union[str, torch.device] = "auto",
               dtype: Union[None, str, torch.dtype] = None, weight_format: Optional[str] = None,
               revision: Optional[str] = None, quantize: Optional[int] = None,
               quant_backend: str = "auto", quantize_lm_head: bool = False) -> tuple[ChatGLMTokenizer, ChatGLMModel]:
    """Load a GLM checkpoint (local directory or Hugging Face id) for inference: ChatGLM-6B,
    ChatGLM2-6B, ChatGLM3-6B or GLM-4-9B-chat, as its own files say (family.py).

    device: "auto" | "cuda" | "cpu" | "mps"; dtype: None picks float16 on GPUs, bfloat16 on CPU;
    weight_format: "safetensors" or "bin" (default: whichever the folder has, safetensors first).
    quantize: 4 or 8 quantizes the blocks' Linear layers while loading, shard by shard (the float
    model never sits in memory whole); checkpoints with config quantization_bit load as stored.
    quant_backend: "auto" or a name from quant.KERNELS (the matmul kernel of quantized layers).
    quantize_lm_head: opt-in, ChatGLM-6B only: compute the logits from an INT8 copy of the tied
    embedding (quant.QuantizedOutputLayer): faster decode, +0.5 GiB, logits off by the INT8 error.
    Raises CheckpointError with a message that names the file (and tensor) at fault.
    """
    folder = resolve_checkpoint(name_or_path, revision)
    config = read_config(folder)  # ChatGLM-6B, ChatGLM2/3 or GLM-4: see family.py
    tokenizer = load_tokenizer(folder, config)
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    files = weight_files(folder, weight_format)
    bits = resolve_quantization(config, quantize)
    check_fits(config, device, dtype, bits)
    model = model_class(config).empty(config, device, dtype, quantize=bits, quant_backend=quant_backend)
    load_weights(model, files)
    if getattr(config, "pre_seq_len", None):
        model.refresh_prefix()  # P-tuning v2: prefix keys and values from the loaded prefix encoder
    if quantize_lm_head:
        quantize_lm_head_of(model)
    log.info("loaded %s on %s in %s%s", folder, device, dtype, f", INT{bits}" if bits else "")
    return tokenizer, model
