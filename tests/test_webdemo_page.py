"""webdemo.ui.build_page in-process, on the real Engine with the tiny checkpoint."""
import json
import urllib.request

import pytest

from tests.browser.app_server import free_port


@pytest.fixture(scope="module")
def engine(tiny_model):
    from model_runtime.engine import Engine

    tokenizer, model = tiny_model
    engine = Engine(tokenizer, model, slots=2)
    yield engine
    engine.close()


def test_launch_can_add_routes_beside_the_page(engine):
    from webdemo.ui import build_page

    page = build_page(engine, concurrency_limit=4)

    def add_routes(app):
        @app.get("/health-test")
        def health():
            return {"model": engine.info.name}

    port = free_port()
    page.launch(add_routes=add_routes, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port,
                quiet=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health-test", timeout=10) as response:
            assert json.load(response) == {"model": engine.info.name}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        page.close()
    assert not page.export_dir.exists()
