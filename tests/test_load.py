"""A smaller run of benchmarks/loadtest.py: concurrent sessions through gradio_client against the
real app, a third of them disconnecting mid-answer; every other answer equals its alone run."""
import pytest

from benchmarks.loadtest import run_load
from tests.browser.app_server import AppServer

pytest.importorskip("gradio_client")


def test_concurrent_sessions_get_their_own_complete_answers():
    server = AppServer("--slots", "8")
    try:
        report = run_load(server.url, sessions=9, turns=3, seed=1)
        stats = server.wait_idle(timeout=10)
    finally:
        server.stop()
    assert report.failed == [] and report.mismatched == []
    assert len(report.disconnected) == 3
    assert report.completed_answers >= 6 * 3  # the sessions that stayed got every answer
    assert stats["requests_failed"] == 0 and stats["active_sequences"] == 0
    assert "Traceback" not in server.log(tail=10**7)
