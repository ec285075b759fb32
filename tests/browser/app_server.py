"""Run the real `python app.py --tiny-random` on a free local port for a test module."""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """`python app.py --tiny-random ...` in a subprocess; `url` once it answers HTTP.

    program: other arguments for Python in place of `app.py --tiny-random` (a script that takes
    --host and --port too); env: more environment variables; log_dir: where the log goes;
    port: a given port (a restarted server on the same origin sees the same browser storage);
    open_files: the server's RLIMIT_NOFILE (soft and hard), like `ulimit -n` before starting it."""

    def __init__(self, *flags: str, startup_timeout: float = 180.0, program: tuple[str, ...] = ("app.py", "--tiny-random"),
                 env: Optional[dict] = None, log_dir: Optional[Path] = None, headers: Optional[dict] = None,
                 port: Optional[int] = None, open_files: Optional[int] = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"chatglm-webdemo-test-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, *program, "--host", "127.0.0.1", "--port", str(self.port), *flags],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=None if open_files is None else
            lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files)))
        self._client = None
        self.headers = headers  # sent by `client` (e.g. the API key of --require-api-key)
        self._wait_until_up(startup_timeout)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"app.py did not answer within {timeout} s:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    @property
    def client(self):
        if self._client is None:
            from gradio_client import Client

            self._client = Client(self.url, headers=self.headers, verbose=False)
        return self._client

    def stats(self) -> dict:
        """The engine's counters through the app's /stats endpoint."""
        return self.client.predict(api_name="/stats")

    def wait_idle(self, timeout: float = 5.0) -> dict:
        """Stats once no sequence is being decoded (fails the test if that takes longer)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["active_sequences"] == 0 and stats["queue_length"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine is still generating after {timeout} s: {stats}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
