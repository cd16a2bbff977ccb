"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no websocket,
no download): open a page, wait for a condition, evaluate JavaScript, take a screenshot. Used by the gallery and
dashboard tests and by ``monitoring.snapshot``; needs Debian's ``chromium`` (``apt-get install -y chromium``).

    with Browser() as b:
        b.open("file:///.../index.html")
        b.wait_for("document.querySelectorAll('tbody tr').length > 0", timeout_s=30)
        n = b.evaluate("document.images.length"); b.screenshot("out.png")
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, BINARIES) if p), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page; every wait has a deadline, and ``close`` ends the process group it
    started (also from ``__exit__``)."""

    def __init__(self, width: int = 1400, height: int = 900, timeout_s: float = 60.0, binary: str | None = None):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise BrowserError("no Chromium found (apt-get install -y chromium)")
        self.timeout_s = timeout_s
        self.size = (width, height)
        self._profile = tempfile.mkdtemp(prefix="uniar-chromium-")
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self._closed = False
        self._start()

    # -- process and pipe ------------------------------------------------------------------------------------------
    def _start(self) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # the child's ends above any fd it may have, so that moving them onto 3 and 4 cannot clobber one another
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (to_chrome_r, from_chrome_w)]
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds():
            os.dup2(high[0], 3)  # Chromium reads commands from fd 3 and writes replies to fd 4
            os.dup2(high[1], 4)

        args = [self.binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
                "--mute-audio", "--hide-scrollbars", f"--user-data-dir={self._profile}",
                f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(3, 4), preexec_fn=child_fds,
                                     start_new_session=True)
        for fd in high:
            os.close(fd)
        self._out = os.fdopen(to_chrome_w, "wb", buffering=0)
        self._in = os.fdopen(from_chrome_r, "rb", buffering=0)
        threading.Thread(target=self._read, name="chromium-pipe", daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._in.read(65536)
            if not chunk:
                break
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self._events.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def call(self, method: str, session: bool = False, timeout_s: float | None = None, **params) -> dict[str, Any]:
        """One DevTools command; ``session``: to the page (else to the browser). Raises on an error reply."""
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params, **({"sessionId": self.session} if session else {})}
        self._out.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise BrowserError(f"{method}: no reply from Chromium" + (" (it exited)" if self._closed else
                                                                              f" within {timeout_s or self.timeout_s:.0f} s"))
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}".strip())
        return reply.get("result", {})

    # -- pages -----------------------------------------------------------------------------------------------------
    def open(self, url: str, timeout_s: float | None = None) -> None:
        """Navigate and wait for the page's load event (its images included); a change of the #fragment alone
        loads nothing (the page sees a hashchange event)."""
        with self._cond:
            self._events.clear()
        result = self.call("Page.navigate", session=True, url=url)
        if result.get("errorText"):
            raise BrowserError(f"could not open {url}: {result['errorText']}")
        if "loaderId" not in result:  # same document, another #fragment: nothing loads
            return
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        with self._cond:
            while not any(e.get("method") == "Page.loadEventFired" for e in self._events):
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise BrowserError(f"{url}: no load event within {timeout_s or self.timeout_s:.0f} s")
                self._cond.wait(left)

    def evaluate(self, expression: str, timeout_s: float | None = None) -> Any:
        """The value of a JavaScript expression (a promise is awaited); a thrown exception raises BrowserError."""
        r = self.call("Runtime.evaluate", session=True, timeout_s=timeout_s, expression=expression,
                      returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(f"JavaScript error: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60.0, poll_s: float = 0.25) -> Any:
        """Poll until the expression is truthy; its value. Single-page apps fill the DOM after the load event."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"still false after {timeout_s:.0f} s: {expression}")
            time.sleep(poll_s)

    def set_cookie(self, url: str, name: str, value: str) -> None:
        self.call("Network.setCookie", session=True, url=url, name=name, value=value)

    def screenshot(self, path: str | Path, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            w, h = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": w, "height": h, "scale": 1})
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    # -- lifetime --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout_s=10)
            except BrowserError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:  # helpers left behind (renderer, zygote): the group this object started, nothing else
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=15)
        for f in (self._out, self._in):
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
