"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``: no websocket, no extra package."""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Chromium:
    """Headless Chromium driven through fds 3 (commands in) and 4 (answers out), NUL-separated JSON messages."""

    def __init__(self, browser: str, url: str, profile: Path, width: int = 1400, height: int = 1000):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        # a small trampoline moves the pipe ends to fds 3 and 4, as the protocol expects, then becomes Chromium
        trampoline = (
            f"import os, sys; os.dup2({to_browser}, 3); os.dup2({from_browser}, 4); "
            "os.execvp(sys.argv[1], sys.argv[1:])"
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                trampoline,
                browser,
                *FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                url,
            ],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []
        self.width = width
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.page("Runtime.enable")

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        """Send one command and wait for its answer; events that arrive meanwhile go to ``events``."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data) :]
        deadline = time.monotonic() + timeout
        while True:
            answer = self._next(deadline, method)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def page(self, method: str, timeout: float = 30, **params) -> dict:
        return self.call(method, self.session, timeout, **params)

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page."""
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.2):
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"{expression} stayed false for {timeout} s")

    def set_files(self, selector: str, files: list[Path]) -> None:
        """Give a file input these files and fire its change event, as a person choosing them would."""
        root = self.page("DOM.getDocument")["root"]["nodeId"]
        node = self.page("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.page("DOM.setFileInputFiles", nodeId=node, files=[str(f) for f in files])

    def screenshot(self, path: Path) -> Path:
        """The whole page as a PNG."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self.page(
            "Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1, mobile=False
        )
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))
        return path

    def errors(self) -> list[str]:
        """Uncaught exceptions and console errors seen so far."""
        out = [
            e["params"]["exceptionDetails"].get("text", "")
            + " "
            + str(e["params"]["exceptionDetails"].get("exception", {}).get("description", ""))
            for e in self.events
            if e.get("method") == "Runtime.exceptionThrown"
        ]
        out += [
            " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
            for e in self.events
            if e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error"
        ]
        return out

    def _next(self, deadline: float, method: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from Chromium to {method}")
            if select.select([self._from_browser], [], [], left)[0]:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed its pipe during {method} (exit code {self.proc.poll()})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
