"""Many chat sessions at once through gradio_client against the real app on 127.0.0.1.

    python benchmarks/loadtest.py                       # starts `app.py --tiny-random` itself
    python benchmarks/loadtest.py --url http://127.0.0.1:7860/ --sessions 32 --turns 3

First every session's conversation is run alone, one request at a time (greedy), to get the
expected answers. Then all sessions run at once, each turn carrying the session's own history;
a random share of the sessions disconnect in the middle of one answer and stop there. Every
answer of the others must be complete and equal to its alone run: none lost, none mixed up.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_LENGTH = 160  # prompt plus answer: room for three short turns of the tiny model


def question(session: int, turn: int) -> str:
    topics = ["天气", "weather", "代码", "北京", "a story", "数学"]
    return f"第{session}位用户的第{turn + 1}个问题：{topics[(session + turn) % len(topics)]}?"


def conversation(client, session: int, turns: int, stop_in_turn: int = -1) -> list:
    """Ask the session's turns in order; in turn `stop_in_turn` disconnect after the first text."""
    history, answers = [], []
    for turn in range(turns):
        job = client.submit(question(session, turn), history, MAX_LENGTH, 0.7, 0.0, api_name="/chat")
        if turn == stop_in_turn:
            while not job.outputs() and not job.done():
                time.sleep(0.005)
            job.cancel()
            answers.append(None)
            return answers
        answer = job.result(timeout=300)
        answers.append(answer)
        history = history + [[question(session, turn), answer]]
    return answers


@dataclass
class LoadReport:
    sessions: int
    turns: int
    disconnected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    completed_answers: int = 0
    alone_seconds: float = 0.0
    together_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.failed


def run_load(url: str, sessions: int, turns: int, disconnect_share: float = 1 / 3, seed: int = 0) -> LoadReport:
    from gradio_client import Client

    report = LoadReport(sessions, turns)
    start = time.perf_counter()
    reference = Client(url, verbose=False)
    expected = [conversation(reference, s, turns) for s in range(sessions)]
    report.alone_seconds = round(time.perf_counter() - start, 1)

    chooser = random.Random(seed)
    report.disconnected = sorted(chooser.sample(range(sessions), round(sessions * disconnect_share)))
    clients = [Client(url, verbose=False) for _ in range(sessions)]
    results: list = [None] * sessions

    def run(s):
        stop_turn = chooser_turns[s]
        try:
            results[s] = conversation(clients[s], s, turns, stop_turn)
        except Exception as error:  # counted as a failure, not a crash of the load test
            results[s] = error

    chooser_turns = {s: (chooser.randrange(turns) if s in report.disconnected else -1) for s in range(sessions)}
    threads = [threading.Thread(target=run, args=(s,)) for s in range(sessions)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.together_seconds = round(time.perf_counter() - start, 1)
    for s, got in enumerate(results):
        if isinstance(got, Exception):
            report.failed.append((s, repr(got)))
            continue
        for turn, answer in enumerate(got):
            if answer is None:
                continue
            report.completed_answers += 1
            if answer != expected[s][turn]:
                report.mismatched.append((s, turn))
    for client in clients + [reference]:
        client.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running app; default: start app.py --tiny-random on a free port")
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = None
    if args.url is None:
        from tests.browser.app_server import AppServer
        server = AppServer("--slots", "16")
        args.url = server.url
    try:
        report = run_load(args.url, args.sessions, args.turns, seed=args.seed)
        stats = (server.stats() if server else {})
    finally:
        if server:
            server.stop()
    print(json.dumps({**report.__dict__, "ok": report.ok, "engine": stats}, indent=2, default=str))
    out = Path(__file__).resolve().parent / "results" / "loadtest.json"
    out.write_text(json.dumps({**report.__dict__, "ok": report.ok}, indent=2, default=str) + "\n")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
