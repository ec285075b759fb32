"""The CUDA paths, where a GPU is present (skipped elsewhere; run on a lent GPU machine):
the engine with CUDA graphs answers as the eager engine does, and ZeroGPU's per-call backend
moves a model loaded on the CPU to the GPU inside its call (INT4 layers re-packed for CUDA)."""
import tempfile

import pytest
import torch
from torch._dynamo.utils import counters

from model_runtime.loading.loader import load_model
from model_runtime.protocol import ChatRequest, Message, SamplingParams
from model_runtime.quant.convert import quantized_linears
from model_runtime.serving.engine import Engine
from model_runtime.serving.per_call import PerCallBackend
from model_runtime.tiny.checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QUERIES = ["你好", "How is the weather in Shanghai today?", "写一个 Python 函数"]


def tiny(family="glm4", **load_options):
    with tempfile.TemporaryDirectory() as folder:
        return load_model(write_tiny_checkpoint(folder, family=family), **load_options)


def answers(engine) -> list[str]:
    streams = [engine.submit(ChatRequest((Message("user", q),), SamplingParams(max_length=80, temperature=0)))
               for q in QUERIES]  # decoded together
    try:
        return [list(stream)[-1].text for stream in streams]
    finally:
        engine.close()


def test_the_engine_with_cuda_graphs_answers_as_the_eager_engine():
    """Compiled by default on CUDA, at start-up: the answers compile nothing more."""
    tokenizer, model = tiny(device="cuda", dtype="float32")
    eager = answers(Engine(tokenizer, model, slots=4, cuda_graphs=False))
    torch._dynamo.reset()
    counters.clear()
    default = Engine(tokenizer, model, slots=4)
    compiled_at_start = counters["stats"]["unique_graphs"]
    assert default.batch.whole_decode and compiled_at_start >= 1
    assert answers(default) == eager and all(eager)
    assert counters["stats"]["unique_graphs"] == compiled_at_start


def test_a_per_call_answer_moves_the_model_to_the_gpu():
    tokenizer, model = tiny("chatglm", device="cpu", dtype="bfloat16", quantize=4)
    request = ChatRequest((Message("user", "你好"),), SamplingParams(max_length=64, temperature=0))
    last = list(PerCallBackend(tokenizer, model, device="cuda").submit(request))[-1]
    assert last.finish_reason in ("stop", "length") and last.text
    assert model.device.type == "cuda"
    assert "cuda-torch" in {layer.kernel.name for layer in quantized_linears(model).values()}
