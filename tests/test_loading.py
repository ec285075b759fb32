"""Checkpoint loading: formats, devices, and clear errors naming the file and tensor."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_runtime.loading.checkpoint import resolve_checkpoint
from model_runtime.loading.device import pick_dtype
from model_runtime.loading.loader import load_model
from model_runtime.models.config import CheckpointError
from model_runtime.tiny.glm_hf import write_tiny_hf_checkpoint


def copy_checkpoint(source, tmp_path, weight_format):
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    for path in target.iterdir():
        other = "model" if weight_format == "bin" else "pytorch_model"
        if path.name.startswith(other):
            path.unlink()
    return target


def test_bin_and_safetensors_load_identically(tiny_checkpoint):
    _, from_bin = load_model(tiny_checkpoint, device="cpu", dtype="float32", weight_format="bin")
    _, from_st = load_model(tiny_checkpoint, device="cpu", dtype="float32", weight_format="safetensors")
    state_bin, state_st = from_bin.state_dict(), from_st.state_dict()
    assert state_bin.keys() == state_st.keys()
    for name in state_bin:
        assert torch.equal(state_bin[name], state_st[name]), name
    assert from_bin.lm_head.weight is from_bin.transformer.word_embeddings.weight


@pytest.mark.parametrize("family", ["chatglm", "glm4", "glm4-0414"])
def test_loading_never_imports_torch_dynamo(tiny_checkpoint, tiny_family_checkpoints, tmp_path, family):
    """A model made on the meta device, as the loader makes it, through a torch op that has only a
    Python reference there (an Embedding's normal_, arange) imports torch._dynamo: 1.5 s of every
    start on 2 cores, for nothing. Loaded in a fresh process, in bfloat16 and quantized."""
    folder = {"chatglm": tiny_checkpoint, "glm4": tiny_family_checkpoints["glm4"]}.get(family) \
        or write_tiny_hf_checkpoint(tmp_path)
    script = ("import sys\nfrom model_runtime.loading.loader import load_model\n"
              f"load_model({str(folder)!r}, device='cpu', dtype='bfloat16')\n"
              f"load_model({str(folder)!r}, device='cpu', dtype='bfloat16', quantize=4)\n"
              "print(sorted(name for name in sys.modules if name.startswith('torch._dynamo'))[:3])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_default_dtype_per_device(tiny_checkpoint, monkeypatch):
    _, model = load_model(tiny_checkpoint, device="cpu")
    assert model.dtype == torch.bfloat16
    for capability, expected in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)  # the GPU asked
        assert pick_dtype(torch.device("cuda"), None) == expected
    assert pick_dtype(torch.device("mps"), None) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        pick_dtype(torch.device("cpu"), "int3")


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path, "bin")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        load_model(folder, device="cpu")


def test_corrupt_shard_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path, "safetensors")
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*corrupt"):
        load_model(folder, device="cpu")
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "b", "bin")
    shard = folder / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00002.bin.*corrupt"):
        load_model(folder, device="cpu")


def test_wrong_shape_names_file_and_tensor(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path, "bin")
    config = json.loads((folder / "config.json").read_text())
    config["inner_hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"pytorch_model-0000\d-of-00002.bin: tensor 'transformer.layers.\d.mlp"):
        load_model(folder, device="cpu")


def test_bad_config_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path, "bin")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps({"model_type": "chatglm", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="config.json: missing required field"):
        load_model(folder, device="cpu")


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path, "safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file, save_file
    shard = folder / index["weight_map"]["transformer.final_layernorm.bias"]
    tensors = load_file(shard)
    del tensors["transformer.final_layernorm.bias"]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="lack transformer.final_layernorm.bias"):
        load_model(folder, device="cpu")


def test_unknown_directory_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint(tmp_path / "nothing-here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint("THUDM/chatglm-6b")
    message = str(error.value)
    assert "THUDM/chatglm-6b" in message and "--model /path/to/checkpoint" in message


def test_cuda_requested_without_gpu_is_clear(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(CheckpointError, match="no CUDA GPU"):
        load_model(tiny_checkpoint, device="cuda")
