"""A minimal W3C WebDriver client over `requests`, for driving Debian's headless chromium through chromedriver.

Only what the browser test needs: open a page, run JavaScript, find and click elements, send a file to a file
input, take screenshots and read the browser console. No extra Python package (selenium, playwright) is needed in
ComfyUI's venv, and no browser is downloaded: it uses /usr/bin/chromium and /usr/bin/chromedriver
(`apt-get install chromium chromium-driver`).

Offline: the browser resolves no host name but 127.0.0.1 (`--host-resolver-rules`), so a page that reaches for
the internet fails at once instead of waiting or sending traffic anywhere.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver",)

# Headless, no first-run or background network, every host name but the loopback unresolvable.
OFFLINE_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--hide-scrollbars", "--lang=en-US",
)


def find_browser() -> tuple[str | None, str | None, str]:
    """(chromium, chromedriver, reason): paths of Debian's chromium and its driver, or None and why not."""
    chromium = os.environ.get("CALIBATT_CHROMIUM") or next(
        (p for p in CHROMIUM_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("chromium")
    driver = os.environ.get("CALIBATT_CHROMEDRIVER") or next(
        (p for p in DRIVER_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("chromedriver")
    if not chromium:
        return None, driver, "needs Debian's chromium (apt-get install chromium chromium-driver)"
    if not driver:
        return chromium, None, "needs chromedriver (apt-get install chromium-driver)"
    return chromium, driver, ""


class WebDriverError(RuntimeError):
    pass


class Browser:
    """One chromedriver process and one browser session."""

    def __init__(self, chromium: str, driver: str, *, port: int, width: int = 1600, height: int = 1000,
                 log_path: Path | None = None):
        import requests

        self.requests = requests
        self.chromium, self.driver, self.port = chromium, driver, port
        self.size = (width, height)
        self.log_path = log_path
        self.proc = None
        self.sid = None
        self.base = f"http://127.0.0.1:{port}"

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0):
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([self.driver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            try:
                if self.requests.get(self.base + "/status", timeout=2).json()["value"]["ready"]:
                    break
            except (self.requests.RequestException, ValueError, KeyError):
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise WebDriverError(f"chromedriver did not start (exit {self.proc.returncode})")
            time.sleep(0.2)
        w, h = self.size
        caps = {"browserName": "chrome",
                "goog:chromeOptions": {"binary": self.chromium, "args": [*OFFLINE_ARGS, f"--window-size={w},{h}"]},
                "goog:loggingPrefs": {"browser": "ALL"}}
        value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}}, timeout=timeout)
        self.sid = value["sessionId"]
        return self

    def stop(self):
        if self.sid is not None:
            try:
                self._call("DELETE", "", timeout=20)
            except Exception:  # the driver may already be gone; the process is ended below either way
                pass
            self.sid = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- protocol -------------------------------------------------------------------------------------------
    def _call(self, method: str, route: str, body: dict | None = None, timeout: float = 60.0):
        url = self.base + (route if route.startswith("/session") and self.sid is None
                           else f"/session/{self.sid}{route}")
        r = self.requests.request(method, url, json=body if body is not None else ({} if method == "POST" else None),
                                  timeout=timeout)
        try:
            data = r.json()
        except ValueError:
            raise WebDriverError(f"{method} {route}: HTTP {r.status_code}: {r.text[:500]}") from None
        value = data.get("value")
        if r.status_code != 200:
            err = value if isinstance(value, dict) else {}
            raise WebDriverError(f"{method} {route}: {err.get('error')}: {err.get('message', '')[:1500]}")
        return value

    def get(self, url: str):
        self._call("POST", "/url", {"url": url}, timeout=120)

    def js(self, script: str, *args, timeout: float = 60.0):
        """Run `script` as a function body (return a value); arguments as `arguments[i]`."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)}, timeout=timeout)

    def js_async(self, script: str, *args, timeout: float = 60.0):
        """Run `script`; it finishes by calling `arguments[arguments.length - 1](value)`."""
        self._call("POST", "/timeouts", {"script": int(timeout * 1000)})
        return self._call("POST", "/execute/async", {"script": script, "args": list(args)}, timeout=timeout + 10)

    def wait_for(self, script: str, *args, timeout: float = 60.0, what: str = "condition"):
        """Poll a JavaScript expression (a function body returning a value) until it is truthy; its value."""
        deadline = time.time() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.time() > deadline:
                raise WebDriverError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.25)

    def find(self, css: str):
        return self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css: str) -> list:
        return [e[ELEMENT] for e in self._call("POST", "/elements", {"using": "css selector", "value": css})]

    def click(self, element: str):
        self._call("POST", f"/element/{element}/click")

    def send_file(self, element: str, path: Path):
        """What a user's file pick does: the input gets the file and fires its change event."""
        self._call("POST", f"/element/{element}/value", {"text": str(Path(path).resolve())})

    def element_ref(self, element: str) -> dict:
        """An element reference to pass to js()."""
        return {ELEMENT: element}

    def screenshot(self, path: Path, element: str | None = None) -> Path:
        route = f"/element/{element}/screenshot" if element else "/screenshot"
        png = base64.b64decode(self._call("GET", route, timeout=120))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return path

    def console(self) -> list:
        """The browser console entries since the last call (chromedriver's log endpoint): dicts with level,
        message."""
        return self._call("POST", "/se/log", {"type": "browser"})
