"""The chat page on a tiny GLM-Z1 (`--tiny-random z1`'s checkpoint) whose answers
tests.test_tools_api.ScriptedModel scripts: thinking, </think>, then a reply, streamed a token
per step, so that a browser test sees both parts arrive (a random model rarely ends its thinking).
Same --host/--port as app.py."""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile

from model_runtime.loading.loader import load_model
from model_runtime.serving.engine import Engine
from model_runtime.tiny.glm_hf import write_tiny_hf_checkpoint
from tests.test_tools_api import ScriptedModel
from webdemo.ui import build_page

THINKING = "先想一想：the user says hello, so I greet them back. 然后再检查一遍，确认没有问题。"
REPLY = "Hello from Z1!"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds through the finally below
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, model = load_model(write_tiny_hf_checkpoint(folder, "z1"), device="cpu", dtype="float32")
    fake = ScriptedModel(tokenizer, model)
    answer = (tokenizer.encode_with_specials("\n<think>") + tokenizer.encode_text(f"\n{THINKING}\n</think>\n\n{REPLY}")
              + [tokenizer.eos_token_id])
    fake.script = lambda prompt: answer
    engine = Engine(tokenizer, fake, slots=2, name="glm-z1-9b-0414-scripted", step_delay=0.05)
    page = build_page(engine, concurrency_limit=4)
    try:
        page.launch(server_name=args.host, server_port=args.port, quiet=True)
    finally:
        page.close()
        engine.close()


if __name__ == "__main__":
    main()
