"""The chat page alone: build_page on the tiny random engine, for tests that need it in a
process of its own (its own TMPDIR, a signal to stop it). Same --host/--port as app.py."""
from __future__ import annotations

import argparse
import signal
import sys

from model_runtime.serving.launch import start_engine
from webdemo.ui import build_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--auth", help="USER:PASSWORD for Gradio's login page")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds through the finally below
    engine = start_engine(tiny_random=True, slots=2)
    page = build_page(engine, concurrency_limit=4)
    try:
        page.launch(server_name=args.host, server_port=args.port, quiet=True,
                    auth=tuple(args.auth.split(":", 1)) if args.auth else None)
    finally:
        page.close()
        engine.close()


if __name__ == "__main__":
    main()
