"""A crowd on one server: streaming /v1 clients (the `openai` package) and page users
(`gradio_client`) at once, against the real app on 127.0.0.1.

    python -m benchmarks.loadtest                  # starts `app.py --tiny-random --slots 16` itself
    python -m benchmarks.loadtest --url http://127.0.0.1:7860/ --api-clients 64 --page-users 16 --rounds 3

Every client holds a conversation of `rounds` turns (greedy, so each answer has one right value).
In each round a random third of the clients disconnect right after their first text; that turn
does not enter their history. First every turn that will complete is run alone, one request at a
time, to get the expected answers; then all clients run together, round by round. Reported:
failed turns, answers that differ from their alone run (mixed up or lost), p95 time to first
token, and the p95 / max latency of `/health`, polled every 50 ms throughout the crowded phase.
The tiny model computes in float32; where MKL's float32 GEMM sums a row differently for other
batch sizes (some Intel CPUs), start a server of your own with MKL_CBWR=AUTO,STRICT, as this
script and the tests do, or a near-tie may flip a greedy token and count as "differ".
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field

MAX_TOKENS = 24  # answer tokens per turn (/v1); the page's max_length is the prompt plus this
PAGE_MAX_LENGTH = 200
HEALTH_EVERY_S = 0.05


def question(client: int, turn: int) -> str:
    topics = ["天气", "weather", "代码", "北京", "a story", "数学"]
    return f"第{client}位用户的第{turn + 1}个问题：{topics[(client + turn) % len(topics)]}?"


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (0 for no values), in milliseconds rounded to 0.1."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(share * len(ordered)) - 1)] * 1000, 1)


class ApiUser:
    """A /v1 client: streams each turn; `disconnect` closes the stream after the first text."""

    kind = "api"

    def __init__(self, url: str, api_key: str):
        from openai import OpenAI

        self.client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0,
                             timeout=300)
        self.model = self.client.models.list().data[0].id

    def ask(self, query: str, history: list, disconnect: bool) -> tuple[str | None, float | None]:
        messages = []
        for user_text, answer in history:
            messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": query})
        start = time.perf_counter()
        stream = self.client.chat.completions.create(model=self.model, messages=messages, stream=True, temperature=0,
                                                     max_tokens=MAX_TOKENS)
        text, first, finish = "", None, None
        with stream:
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        first = first or time.perf_counter() - start
                        text += choice.delta.content
                        if disconnect:
                            return None, first
                    finish = choice.finish_reason or finish
        if finish not in ("stop", "length"):
            raise RuntimeError(f"the stream ended without a finish reason ({finish!r})")
        return text, first

    def close(self) -> None:
        self.client.close()


class PageUser:
    """A page user through the page's `/chat` API; `disconnect` cancels after the first text."""

    kind = "page"

    def __init__(self, url: str, api_key: str):
        from gradio_client import Client

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.client = Client(url, verbose=False, headers=headers)

    def ask(self, query: str, history: list, disconnect: bool) -> tuple[str | None, float | None]:
        start = time.perf_counter()
        job = self.client.submit(query, [list(pair) for pair in history], PAGE_MAX_LENGTH, 0.7, 0.0,
                                 api_name="/chat")
        first = None
        while not job.done():
            if first is None and any(job.outputs()):
                first = time.perf_counter() - start
                if disconnect:
                    job.cancel()
                    return None, first
            time.sleep(0.002)
        answer = job.result(timeout=300)
        return answer, first or time.perf_counter() - start

    def close(self) -> None:
        self.client.close()


@dataclass
class LoadReport:
    api_clients: int
    page_users: int
    rounds: int
    disconnected_turns: int = 0
    completed_turns: int = 0
    failed: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    ttft_p95_ms: dict = field(default_factory=dict)
    health_p95_ms: float = 0.0
    health_max_ms: float = 0.0
    health_failures: int = 0
    alone_seconds: float = 0.0
    together_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.mismatched and not self.health_failures


class HealthPoller:
    """GET /health every 50 ms in its own thread; latencies and failures (non-200, errors)."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=10)
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(HEALTH_EVERY_S):
            start = time.perf_counter()
            try:
                ok = self.http.get("/health").status_code == 200
            except Exception:
                ok = False
            self.latencies.append(time.perf_counter() - start)
            self.failures += not ok

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.http.close()


def run_load(url: str, api_clients: int, page_users: int, rounds: int, disconnect_share: float = 1 / 3,
             seed: int = 0, api_key: str = "") -> LoadReport:
    report = LoadReport(api_clients, page_users, rounds)
    users = [ApiUser(url, api_key) for _ in range(api_clients)] + [PageUser(url, api_key) for _ in range(page_users)]
    chooser = random.Random(seed)
    leaving = [set(chooser.sample(range(len(users)), round(len(users) * disconnect_share))) for _ in range(rounds)]

    # The expected answers: every turn that will complete, alone, with the history it will have.
    start = time.perf_counter()
    expected = [[None] * rounds for _ in users]
    for number, user in enumerate(users):
        history = []
        for turn in range(rounds):
            if number in leaving[turn]:
                continue
            expected[number][turn], _ = user.ask(question(number, turn), history, disconnect=False)
            history.append((question(number, turn), expected[number][turn]))
    report.alone_seconds = round(time.perf_counter() - start, 1)

    histories: list[list] = [[] for _ in users]
    first_token: dict[str, list[float]] = {"api": [], "page": []}

    def turn_of(number: int, turn: int) -> None:
        user, leaves = users[number], number in leaving[turn]
        try:
            answer, first = user.ask(question(number, turn), histories[number], disconnect=leaves)
        except Exception as error:  # counted, not a crash of the load test
            report.failed.append((user.kind, number, turn, repr(error)[:300]))
            return
        if first is not None:
            first_token[user.kind].append(first)
        if leaves:
            report.disconnected_turns += 1
            return
        report.completed_turns += 1
        if answer != expected[number][turn]:
            report.mismatched.append((user.kind, number, turn))
        histories[number].append((question(number, turn), answer))

    health = HealthPoller(url)
    start = time.perf_counter()
    try:
        for turn in range(rounds):
            threads = [threading.Thread(target=turn_of, args=(n, turn)) for n in range(len(users))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        health.stop()
        for user in users:
            user.close()
    report.together_seconds = round(time.perf_counter() - start, 1)
    report.ttft_p95_ms = {kind: percentile(values, 0.95) for kind, values in first_token.items()}
    report.health_p95_ms = percentile(health.latencies, 0.95)
    report.health_max_ms = percentile(health.latencies, 1.0)
    report.health_failures = health.failures
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running app; default: start app.py --tiny-random on a free port")
    parser.add_argument("--api-key", default="", help="the server's --require-api-key, if it has one")
    parser.add_argument("--api-clients", type=int, default=64)
    parser.add_argument("--page-users", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = None
    if args.url is None:
        from tests.browser.app_server import AppServer
        server = AppServer("--slots", "16", "--concurrency", "128", "--max-per-client", "256",  # all users share 127.0.0.1
                           env={"MKL_CBWR": "AUTO,STRICT"})
        args.url = server.url
    try:
        report = run_load(args.url, args.api_clients, args.page_users, args.rounds, seed=args.seed,
                          api_key=args.api_key)
    finally:
        if server:
            server.stop()
    from benchmarks.common import report as write_report

    row = {"clients": f"{args.api_clients} api + {args.page_users} page", "rounds": args.rounds,
           "completed": report.completed_turns, "disconnected": report.disconnected_turns,
           "failed": len(report.failed), "mixed": len(report.mismatched),
           "ttft_p95_ms_api": report.ttft_p95_ms["api"], "ttft_p95_ms_page": report.ttft_p95_ms["page"],
           "health_p95_ms": report.health_p95_ms, "health_max_ms": report.health_max_ms,
           "health_failures": report.health_failures, "alone_s": report.alone_seconds,
           "together_s": report.together_seconds}
    write_report("loadtest", [row], {"ok": report.ok, "failed": report.failed, "mismatched": report.mismatched})
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
