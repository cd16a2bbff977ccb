"""Fixtures for the reward tests: tiny seeded reward models written once per session, text rendered by PIL."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from rewards.tiny import tiny_spec_paths

    return tiny_spec_paths(tmp_path_factory.mktemp("tiny_rewards"))


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """``model_path: tiny`` resolves under a per-session folder, not the machine's temp folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("UNIAR_TINY_DIR", str(tmp_path_factory.mktemp("tiny_cache")))
    yield
    mp.undo()


def _font_path() -> str | None:
    try:
        out = subprocess.run(["fc-list", ":lang=en", "file"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    paths = [line.split(":")[0].strip() for line in out.splitlines() if line.strip().endswith((".ttf", ".ttf:"))]
    preferred = [p for p in paths if "DejaVuSans.ttf" in p] + [p for p in paths if "Sans" in p] + paths
    return next((p for p in preferred if Path(p).exists()), None)


@pytest.fixture(scope="session")
def render_text():
    """render_text("Hello") -> [H, W, 3] uint8: black text on white, a TrueType font if the machine has one,
    else PIL's built-in scalable font."""
    from PIL import Image, ImageDraw, ImageFont

    path = _font_path()
    font = ImageFont.truetype(path, 44) if path else ImageFont.load_default(size=44)

    def render(text: str, size=(512, 256)) -> np.ndarray:
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).text((24, size[1] // 2 - 28), text, fill="black", font=font)
        return np.asarray(img)

    return render


class RewardServer:
    """A reward server on 127.0.0.1 speaking the JSON protocol of rewards/http.py, for the tests. ``mode``:
    ok (score = mean pixel / 255, details with the prompt and task), http500, wrong_count, not_json, hang (answers
    only when the test ends: a client must time out), fail_first (503 on the first ``fail_first`` requests, then ok).
    ``barrier``: every request waits for that many in flight (a concurrency check that needs no timing)."""

    def __init__(self):
        import threading

        self.mode, self.fail_first, self.barrier = "ok", 0, None
        self.requests: list[dict] = []
        self.lock, self.release = threading.Lock(), threading.Event()
        self.in_flight = self.max_in_flight = 0

    def answer(self, body: dict) -> tuple[int, bytes]:
        import base64
        import io
        import json

        from PIL import Image

        with self.lock:
            count = len(self.requests)
        if self.mode == "hang":
            self.release.wait(120)
        if self.mode == "http500" or (self.mode == "fail_first" and count <= self.fail_first):
            return (500 if self.mode == "http500" else 503), b"Traceback: boom\nline 2"
        if self.mode == "not_json":
            return 200, b"<html>oops</html>"
        means = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")).mean() / 255
                 for b in body["images"]]
        scores = [None if t == "skip" else m for m, t in zip(means, body["tasks"])]
        details = [{"prompt": p, "task": t, "format": base64.b64decode(b)[:4].hex()}
                   for p, t, b in zip(body["prompts"], body["tasks"], body["images"])]
        if self.mode == "wrong_count":
            scores = scores[:-1]
        return 200, json.dumps({"scores": scores, "details": details}).encode()


@pytest.fixture
def reward_server():
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = RewardServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append({"body": body, "auth": self.headers.get("Authorization"),
                                       "path": self.path})
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                if state.barrier is not None:
                    state.barrier.wait(30)
                code, payload = state.answer(body)
            finally:
                with state.lock:
                    state.in_flight -= 1
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/score"
    yield state
    state.release.set()
    if state.barrier is not None:
        state.barrier.abort()
    server.shutdown()
    server.server_close()


@pytest.fixture
def dead_url():
    """A URL on 127.0.0.1 where nothing listens (the port was just free)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/score"
