"""No client value reaches the file system: hostile session hashes through the heartbeat route
and every Gradio event of the real page, with canaries around the export root, with and
without a login; plus the helpers that own every file the page writes (exports.py) and the
browser-storage secret (storage_key.py)."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import stat
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from torch.utils import cpp_extension

from tests.browser.app_server import AppServer
from webdemo.exports import (DEFAULT_STEM, HTML_NAME, JSON_NAME, MAX_STEM_CHARS, FileRoot, OutsideRoot,
                             SessionExports, file_stem)
from webdemo.storage_key import ENV_SECRET, secret_file, storage_secret

HOSTILE_SESSIONS = ["..", "../x", "/abs/dir", "a/../../b", "nul\x00byte", "s" * 4096, ".", "../../../../../../tmp"]
USER, PASSWORD = "tester", "a-long-test-password"
EVENT_TIMEOUT_S = 60  # one event of the tiny model, answers of at most 24 tokens
HISTORY = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def snapshot(folder: Path, skip: set[Path]) -> dict[str, str]:
    """Every path under `folder` (but the `skip` subtrees) with a digest of each file's bytes."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        seen[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
                                               else "dir")
    return seen


def extensions_folder() -> str:
    """This run's CPU-kernel build folder, so that the sandboxed servers load the kernels built
    once rather than each compiling its own (test_native_matmul checks what a build writes)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()


SERVERS = {  # name: (Python arguments, flags, logs in)
    "page": (("-m", "tests.browser.page_server"), (), False),  # build_page alone: hostile hashes reach the page
    "app": (("app.py", "--tiny-random"), (), False),  # the whole server: the access gate refuses them
    "app-auth": (("app.py", "--tiny-random"), ("--auth", f"{USER}:{PASSWORD}"), True),
}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def sandbox(request, tmp_path_factory):
    """The page in its own process, with TMPDIR, Gradio's cache and the cache folder in a
    sandbox full of canaries; the export root is the folder it makes in TMPDIR."""
    program, flags, login = SERVERS[request.param]
    root = tmp_path_factory.mktemp(f"sandbox-{request.param}")
    tmp, logs = root / "tmp", root / "logs"
    for folder in (tmp, logs):
        folder.mkdir()
    canaries = {tmp / "keep.txt": "top", tmp / "x" / "keep.txt": "x", tmp / "b" / "keep.txt": "b",
                tmp / "abs-canary" / "keep.txt": "abs", root / "keep.txt": "root"}
    for path, text in canaries.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    server = AppServer(*flags, program=program, log_dir=logs,
                       env={"TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(root / "gradio"),
                            "XDG_CACHE_HOME": str(root / "cache"), "TORCH_EXTENSIONS_DIR": extensions_folder()})
    try:
        (export_root,) = tmp.glob("chatglm-webdemo-*")
        skip = {export_root, root / "gradio", logs, root / "cache", *tmp.glob("torchinductor_*")}
        yield dict(server=server, root=root, tmp=tmp, export_root=export_root, canaries=canaries,
                   login=login, skip=skip, gated=program[0] == "app.py")
    finally:
        server.stop()
    assert not export_root.exists(), "the export root outlived the server"


def client_for(box) -> httpx.Client:
    client = httpx.Client(base_url=box["server"].url, timeout=60)
    if box["login"]:
        response = client.post("/login", data={"username": USER, "password": PASSWORD})
        assert response.status_code == 200, response.text
    return client


def event_inputs(config: dict, dependency: dict) -> list:
    """Plausible inputs for one event: a stored chat, a message, small settings."""
    components = {c["id"]: c for c in config["components"]}
    values = []
    for component_id in dependency["inputs"]:
        component = components[component_id]
        elem_id = component.get("props", {}).get("elem_id")
        if component["type"] == "browserstate":
            values.append(HISTORY)
        elif elem_id == "message":
            values.append("hello")
        elif elem_id == "max-length":
            values.append(24)
        else:
            values.append(component.get("props", {}).get("value"))
    if dependency.get("api_name") == "chat":
        values = ["hello", [["q", "a"]], 24, 0.7, 0.95, ""]
    return values


def run_event(client: httpx.Client, dependency: dict, data: list, session: str) -> list:
    """queue/join with this session hash, then read queue/data until the event completes;
    a queue=False event also through run/predict. The messages received."""
    trigger = (dependency.get("targets") or [[None]])[0][0]
    body = {"data": data, "fn_index": dependency["id"], "trigger_id": trigger, "session_hash": session,
            "event_data": None}
    messages = []
    if not dependency.get("queue", True):
        messages.append(client.post("/gradio_api/run/predict", json=body).status_code)
    joined = client.post("/gradio_api/queue/join", json=body)
    if joined.status_code != 200:
        return messages + [joined.status_code]
    event_id = joined.json()["event_id"]
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            assert time.monotonic() < deadline, f"event {dependency['id']} did not complete: {messages[-3:]}"
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            messages.append(message)
            if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                break
    return messages


def assert_untouched(box: dict, before: dict[str, str]) -> None:
    """Nothing in the sandbox outside the export root (and Gradio's cache) was created, changed
    or deleted, and the canaries are intact."""
    assert snapshot(box["root"], box["skip"]) == before
    for path, text in box["canaries"].items():
        assert path.read_text() == text


def download_url(messages: list) -> str | None:
    """The URL of the HTML download in an event's completed outputs, if there is one."""
    for message in messages:
        if isinstance(message, dict) and message.get("msg") == "process_completed":
            for output in (message.get("output") or {}).get("data") or []:
                value = output.get("value") if isinstance(output, dict) else None
                if isinstance(value, dict) and str(value.get("orig_name")).endswith(".html"):
                    return value["url"]
    return None


def heartbeat_and_leave(url: str, session: str, login_cookie: str = "") -> int:
    """Open /gradio_api/heartbeat/{session} (the path as a client may send it: no
    normalisation), read its first beat and hang up, which makes Gradio run the unload event."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    try:
        raw = "".join(c if c.isalnum() or c in "-._/" else urllib.parse.quote(c, safe="") for c in session)
        connection.putrequest("GET", f"/gradio_api/heartbeat/{raw}", skip_accept_encoding=True)
        if login_cookie:
            connection.putheader("Cookie", login_cookie)
        connection.endheaders()
        response = connection.getresponse()
        if response.status == 200:
            response.read1(64)
        return response.status
    finally:
        connection.close()


def test_hostile_session_hashes_touch_nothing_outside_the_export_root(sandbox):
    box, tmp = sandbox, sandbox["tmp"]
    hostile = HOSTILE_SESSIONS + [str(tmp / "abs-canary"), str(box["export_root"]), str(tmp)]
    before = snapshot(box["root"], box["skip"])
    client = client_for(box)
    cookies = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    config = client.get("/config").json()
    dependencies = [d for d in config["dependencies"] if d.get("backend_fn")]
    assert len(dependencies) >= 10, "every event of the page, the API's /chat and /stats"
    unload = [d for d in dependencies if any(target[1] == "unload" for target in d["targets"])]
    sessions = ["plain-session-1"] + hostile
    if box["gated"]:  # behind app.py's access gate every hostile hash stops at the door
        for session in hostile:
            for dependency in dependencies:
                assert run_event(client, dependency, event_inputs(config, dependency), session)[-1] == 400
            assert heartbeat_and_leave(box["server"].url, session, cookies) == 400
        assert_untouched(box, before)
        assert not any(box["export_root"].iterdir())
        sessions = sessions[:1]
    served = None
    for session in sessions:
        for dependency in dependencies:
            if dependency not in unload:
                messages = run_event(client, dependency, event_inputs(config, dependency), session)
                served = served or download_url(messages)
    assert served, "no event returned the HTML download"
    download = client.get(served)
    assert download.status_code == 200 and b"<html" in download.content.lower()
    assert_untouched(box, before)
    assert len(list(box["export_root"].iterdir())) == len(sessions)  # one folder per session, in the root
    for session in sessions:  # the heartbeat cannot end a session with a slash (no route) or a NUL (Gradio
        if "/" in session or "\x00" in session:  # fails on it before the unload event): end those directly
            run_event(client, unload[0], [], session)
    for session in sessions + ["%2E%2E", "..%2Fx"]:
        heartbeat_and_leave(box["server"].url, session)  # no login needed for this route
        heartbeat_and_leave(box["server"].url, session, cookies)
    deadline = time.monotonic() + 20  # unload runs in a background task after the hang-up
    while any(box["export_root"].iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert box["export_root"].is_dir() and not any(box["export_root"].iterdir()), \
        "each closed session's folder is deleted, and only that"
    assert_untouched(box, before)
    assert client.get("/config").status_code == 200  # still serving
    client.close()


def test_file_root_refuses_every_path_outside_it(tmp_path):
    root = FileRoot()
    try:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "keep.txt").write_text("keep")
        (root.path / "link").symlink_to(outside)
        for path in (root.path, root.path / "..", root.path / ".." / "x", outside, root.path / "link",
                     root.path / "link" / "keep.txt", Path("/")):
            with pytest.raises(OutsideRoot):
                root.inside(path)
        with pytest.raises(OutsideRoot):
            root.remove_folder(root.path / "link")
        with pytest.raises(OutsideRoot):
            root.write_text(root.path / "link", "keep.txt", "overwritten")
        folder = root.make_folder()
        with pytest.raises(OutsideRoot):
            root.write_text(folder, "../escape.txt", "x")
        assert (outside / "keep.txt").read_text() == "keep" and not (root.path / "escape.txt").exists()
        assert root.write_text(folder, "ok.txt", "lone \ud800 surrogate").read_bytes() == b"lone ? surrogate"
    finally:
        root.remove()
    assert not root.path.exists() and (outside / "keep.txt").exists()


def test_session_exports_are_bounded_and_named_by_the_server():
    exports = SessionExports(max_sessions=3)
    try:
        paths = {session: exports.write(session, "<html>", "{}") for session in ("..", "/etc", "a", "b")}
        assert exports.count() == 3 and not paths[".."][0].exists()  # the oldest folder went first
        for html_path, json_path in list(paths.values())[1:]:
            assert html_path.name == HTML_NAME and json_path.name == JSON_NAME
            assert html_path.parent.parent == exports.root.path and len(html_path.parent.name) == 32
        exports.forget("/etc")
        assert not paths["/etc"][0].parent.exists() and exports.count() == 2
        exports.forget("never-seen")
    finally:
        exports.close()
    assert not exports.root.path.exists()


def test_exports_are_named_after_the_title_inside_the_server_folder():
    """The title comes from the client: it names a file in the session's folder, never a path,
    and the session's previous pair is replaced."""
    exports = SessionExports()
    try:
        for title, stem in (("../../etc/passwd", "etc-passwd"), ("问候 greetings", "问候-greetings"),
                            ("/", DEFAULT_STEM), (".hidden", "hidden"), ("a\\b:c*?\x00", "a-b-c"), ("", DEFAULT_STEM)):
            html_path, json_path = exports.write("s", "<html>", "{}", title)
            assert (html_path.name, json_path.name) == (f"{stem}.html", f"{stem}.json"), title
            assert html_path.parent.parent == exports.root.path
            assert sorted(path.name for path in html_path.parent.iterdir()) == sorted([html_path.name, json_path.name])
        assert file_stem("x" * 500) == "x" * MAX_STEM_CHARS
    finally:
        exports.close()


def test_concurrent_writes_of_one_session_never_leave_half_a_file():
    exports = SessionExports()
    texts = [f"<html>{'x' * 100_000}{n}</html>" for n in range(8)]
    seen = []

    def write(text):
        for _ in range(20):
            seen.append(exports.write("s", text, "{}")[0].read_text())

    threads = [threading.Thread(target=write, args=(text,)) for text in texts]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert set(seen) <= set(texts) and len(seen) == 160
    finally:
        exports.close()


def test_storage_secret_is_random_kept_and_private(tmp_path):
    environ = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = storage_secret(environ)
    path = secret_file(environ)
    assert path == tmp_path / "cache" / "chatglm-webdemo" / "storage-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 32
    assert storage_secret(environ) == first  # kept across restarts
    assert storage_secret({"XDG_CACHE_HOME": str(tmp_path / "other")}) != first  # random, not a constant
    assert storage_secret({**environ, ENV_SECRET: "from-the-environment"}) == "from-the-environment"
    path.write_text("")  # a damaged file is replaced, not used
    replaced = storage_secret(environ)
    assert replaced != first and len(replaced) >= 32 and storage_secret(environ) == replaced


def test_storage_secret_without_a_writable_cache_is_still_random(tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    environ = {"XDG_CACHE_HOME": str(blocked)}
    assert storage_secret(environ) != storage_secret(environ)
