"""A smaller run of benchmarks/loadtest.py: streaming /v1 clients and page users at once against
the real app, a third of each round disconnecting mid-answer; every other answer equals its alone
run, nothing fails, and /health stays up throughout."""
import pytest

from benchmarks.loadtest import run_load
from tests.browser.app_server import AppServer



def test_a_crowd_of_api_and_page_users_gets_their_own_complete_answers():
    # every simulated user comes from 127.0.0.1: one address, so its per-client share is lifted here
    server = AppServer("--slots", "8", "--max-per-client", "64")
    try:
        report = run_load(server.url, api_clients=6, page_users=3, rounds=2, seed=1)
        stats = server.wait_idle(timeout=10)
    finally:
        server.stop()
    assert report.failed == [] and report.mismatched == []
    assert report.disconnected_turns == 2 * 3
    assert report.completed_turns == 2 * 6  # everyone who stayed got every answer
    assert report.health_failures == 0 and report.health_p95_ms > 0
    assert report.ttft_p95_ms["api"] > 0 and report.ttft_p95_ms["page"] > 0
    assert stats["requests_failed"] == 0 and stats["active_sequences"] == 0
    assert "Traceback" not in server.log(tail=10**7)
