"""The nn.Modules of quantized layers: `QuantizedLinear` (a block's Linear, in the published
format, computed by the kernel chosen for its device) and the INT8 output layer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .backends import choose_kernel
from .format import QuantizationError, check_bits, quantize_weight
from .kernel import LinearKernel
from .memory import trim_heap


class QuantizedLinear(nn.Module):
    """A Linear layer with an INT8 / INT4 weight in the published format, computed by the backend
    kernel chosen for its device and compute dtype. `weight` and `weight_scale` read back the
    published tensors (the kernel may keep another layout); `state_dict()` and `load_state_dict()`
    use the published names, and `model.to(device / dtype)` re-prepares the kernel."""

    STORED = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, *,
                 device=None, dtype: Optional[torch.dtype] = None, backend: str = "auto"):
        super().__init__()
        self.bits = check_bits(bits)
        if self.bits == 4 and in_features % 2:
            raise QuantizationError(f"INT4 needs an even number of input features, got {in_features}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        dtype = dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        # Follows the module through .to()/to_empty(): where and in which dtype the kernel must run.
        self.register_buffer("_anchor", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.kernel: Optional[LinearKernel] = None
        self._pending: dict[str, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, backend: str = "auto") -> "QuantizedLinear":
        """Quantize a float nn.Linear (its weight is not kept)."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, bits, linear.bias is not None,
                     device=weight.device, dtype=weight.dtype, backend=backend)
        with torch.no_grad():
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
            module.load_tensor("weight", weight.detach())
        return module

    @property
    def ready(self) -> bool:
        return self.kernel is not None

    def load_tensor(self, leaf: str, tensor: torch.Tensor) -> None:
        """Take one checkpoint tensor: a float `weight` [out, in] (quantized here, on the spot), or
        a published-format `weight` / `weight_scale`. Raises ValueError when it does not fit."""
        device = self._anchor.device
        if leaf == "weight" and tensor.is_floating_point():
            if tuple(tensor.shape) != (self.out_features, self.in_features):
                raise ValueError(f"has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{(self.out_features, self.in_features)}")
            source = tensor.to(device) if device.type == "cuda" else tensor  # quantize where it is fast
            self._prepare(*(t.to(device) for t in quantize_weight(source, self.bits)))
            return
        if leaf == "weight":
            shape = (self.out_features, self.in_features * self.bits // 8)
            if tensor.dtype not in (torch.int8, torch.uint8) or tuple(tensor.shape) != shape:
                found = f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"
                raise ValueError(f"is {found}, an INT{self.bits} weight of this layer is int8 {shape} (or a float weight "
                                 f"{(self.out_features, self.in_features)} to quantize)")
            self._pending["weight"] = tensor.view(torch.int8).to(device, copy=True)
        elif leaf == "weight_scale":
            if not tensor.is_floating_point() or tuple(tensor.shape) != (self.out_features,):
                raise ValueError(f"is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, expected "
                                 f"float16 ({self.out_features},)")
            self._pending["weight_scale"] = tensor.to(device, torch.float16, copy=True)
        else:
            raise ValueError(f"is not a tensor of a quantized Linear (expected {' or '.join(self.STORED)})")
        if len(self._pending) == 2:
            self._prepare(self._pending.pop("weight"), self._pending.pop("weight_scale"))

    def _prepare(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        kernel_class = choose_kernel(self._anchor.device, self.bits, self._anchor.dtype, self.backend)
        self.kernel = None  # drop an old kernel before building the new one
        self.kernel = kernel_class.prepare(weight, scale, self.bits)

    @property
    def weight(self) -> torch.Tensor:
        return self._published()[0]

    @property
    def weight_scale(self) -> torch.Tensor:
        return self._published()[1]

    def _published(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernel is None:
            raise RuntimeError(f"{self}: its weights were never loaded")
        return self.kernel.published()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError(f"{self}: its weights were never loaded")
        return self.kernel(x, self.bias)

    def _apply(self, fn, recurse=True):
        before = (self._anchor.device, self._anchor.dtype)
        super()._apply(fn, recurse)
        if self.kernel is not None and (self._anchor.device, self._anchor.dtype) != before:
            weight, scale = self.kernel.published()
            self._prepare(weight.to(self._anchor.device), scale.to(self._anchor.device))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel is not None:
            weight, scale = self.kernel.published()
            destination[prefix + "weight"], destination[prefix + "weight_scale"] = weight, scale

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = {prefix + leaf for leaf in self.STORED}
        rest = {key: value for key, value in state_dict.items() if key not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for leaf in self.STORED:
            if prefix + leaf in state_dict:
                try:
                    self.load_tensor(leaf, state_dict[prefix + leaf])
                except ValueError as error:
                    error_msgs.append(f"{prefix + leaf} {error}")
        if strict and self.kernel is None:
            missing_keys.extend(prefix + leaf for leaf in self.STORED if prefix + leaf not in state_dict)

    def extra_repr(self) -> str:
        kernel = self.kernel.name if self.kernel is not None else "not loaded"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}, kernel={kernel}")


class QuantizedOutputLayer(QuantizedLinear):
    """The output layer (logits) in INT8, per-row scales: by default whenever the blocks are
    quantized and a fused int8 kernel runs here (`quant.convert.output_layer_in_int8`). A decode
    step reads half the bytes there (ChatGLM-6B: 0.53 GB instead of 1.07 GB of bfloat16), always
    through the fused kernel: its "many rows" path would dequantize all 130k rows into a 1 GiB
    scratch buffer, and logits are only ever asked for one row per sequence.

    Two ways in, one layer:
      - ChatGLM-6B (`tied_to(embedding)`): an INT8 copy of the tied embedding, made after loading
        (+0.5 GiB); the embedding lookup keeps the exact float rows. Derived, so never saved (its
        state_dict is empty; checkpoints keep the tied float weight).
      - ChatGLM2/3, GLM-4: the untied `output_layer` itself, quantized as its float weight arrives
        (no float copy kept: 0.27 GB less for ChatGLM2/3, 0.62 GB less for GLM-4) and saved like the
        blocks' layers (int8 `weight` + float16 `weight_scale`; config.json `output_layer_bit: 8`).

    Error (only the logits change; tests/test_lm_head.py bounds it):
      full size, random weights (std 1/64) and unit hidden states, bfloat16, 4096x130528
      (ChatGLM-6B) and 4096x151552 (GLM-4) alike: logits 0.90% from the exact float64 ones (the
      float bfloat16 head: 0.17%), 0.91% from the float head's; the argmax agrees with the float
      head's on 95-96% of 512 rows (random logits have small top-2 gaps: a floor, not an estimate);
      tiny models of every family, teacher-forced along 8 greedy answers of 32 tokens: 97-99.6%
      of argmax tokens agree, logits within 0.63-0.66% (the same on CUDA, H200: 0.64-0.69%)."""

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__(in_features, out_features, 8, bias=False, device=device, dtype=dtype)
        self.tied = False

    @classmethod
    def tied_to(cls, embedding: nn.Embedding) -> "QuantizedOutputLayer":
        """ChatGLM-6B's lm_head computed from an INT8 copy of the (kept) embedding matrix."""
        weight = embedding.weight
        layer = cls(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        layer.tied = True
        with torch.no_grad():
            layer.load_tensor("weight", weight.detach())
        trim_heap()
        return layer

    def _prepare(self, weight, scale):
        super()._prepare(weight, scale)
        self.kernel.gemm_above = float("inf")  # always the fused kernel (see the class docstring)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.tied:  # a tied one is derived from the embedding, which the state_dict holds
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if not self.tied:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
