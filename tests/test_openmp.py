"""One OpenMP pool for the engine (model_runtime/serving/openmp.py): the thread that loaded the
model hands its OpenMP workers back when an engine starts computing on its own thread. Asserted on
the OS threads of a fresh process (pytest's own may hold pools of any thread)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc (no such OS here)")

PRELUDE = """
import json, os, torch
from model_runtime.serving.openmp import release_workers
def threads():
    return len(os.listdir("/proc/self/task"))
torch.set_num_threads(2)
torch.ones(1 << 22).mul_(2)  # a parallel region on this thread: it now has a pool (one worker for 2 threads)
"""


def run(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PRELUDE + script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_release_workers_joins_the_calling_threads_openmp_workers():
    seen = run("""
before = threads()
released = release_workers()
after = threads()
torch.ones(1 << 22).mul_(2)  # the thread may compute again: a new pool
print(json.dumps({"before": before, "released": released, "after": after, "again": threads()}))
""")
    assert seen["released"] and seen["after"] == seen["before"] - 1 and seen["again"] == seen["before"]


def test_an_engine_on_the_cpu_leaves_the_loading_thread_without_workers(tiny_checkpoint):
    seen = run(f"""
from model_runtime.loading.loader import load_model
from model_runtime.protocol import ChatRequest, Message, SamplingParams
from model_runtime.serving.engine import Engine
tokenizer, model = load_model({str(tiny_checkpoint)!r}, device="cpu", dtype="float32")
torch.ones(1 << 22).mul_(2)
before = threads()
engine = Engine(tokenizer, model, slots=1)
idle = threads()  # its thread is waiting for work: it has started no parallel region yet
events = list(engine.submit(ChatRequest(messages=(Message("user", "你好"),),
                                        sampling=SamplingParams(max_new_tokens=3))))
engine.close()
print(json.dumps({{"before": before, "idle": idle, "finish": events[-1].finish_reason}}))
""")
    # the engine's thread came, the loading thread's one worker went
    assert seen["idle"] == seen["before"] and seen["finish"] in ("stop", "length")
