"""A local HTTP server for the hub tests (test-only; the real clients talk to it, nothing is mocked).

It speaks the Hugging Face Hub's file protocol as far as huggingface_hub's `hf_hub_download` uses it:
`HEAD/GET /<owner>/<repo>/resolve/<revision>/<path>` with `X-Repo-Commit`, `ETag`, and for LFS-style files a 302
to a CDN host (the same server reached as "localhost", another host name, so the client neither follows it in
its metadata request nor sends its token there) carrying `X-Linked-Etag` / `X-Linked-Size`; Range requests (206,
Content-Range, 416); Bearer-token access to private repositories; the Hub's error codes (`X-Error-Code`
RepoNotFound / RevisionNotFound / EntryNotFound / GatedRepo, with the Hub's 401-vs-404 and 401-vs-403 habits); a
307 for a renamed repository. `/files/<path>` serves plain files with ETag / If-Range, optionally over TLS with a
self-signed certificate (`self_signed_cert`, made with the openssl command).

Faults, per CDN blob (by sha256) or plain path: cut the body at a byte offset (once, or every time), omit the
length (the body ends when the connection closes), stall before answering, throttle, answer a fixed status.
Every request is logged (method, path, Range, If-Range, Authorization, body bytes sent).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

TOKEN = "hf_calibatt_test_token"


@dataclass
class Repo:
    files: dict  # commit (40 hex) -> {path: bytes}
    refs: dict  # branch / tag -> commit
    private: bool = False
    gated: bool = False
    lfs: bool = True  # 302 to the CDN host (LFS / Xet style) rather than the body from the resolve URL


@dataclass
class Fault:
    cut_at: Optional[int] = None  # stop the body at this absolute byte offset and drop the connection
    cut_times: Optional[int] = None  # how many responses are cut (None: every one that reaches cut_at)
    no_length: bool = False  # no Content-Length / X-Linked-Size; the body ends when the connection closes
    stall: float = 0.0  # seconds before the answer starts
    rate: Optional[float] = None  # bytes per second
    status: Optional[int] = None  # answer this status (no body) instead of the file
    cuts_done: int = 0


@dataclass
class Logged:
    method: str
    path: str
    host: str
    range: Optional[str]
    if_range: Optional[str]
    auth: Optional[str]
    status: int = 0
    sent: int = 0


def commit_id(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


def self_signed_cert(folder: Path):
    """(cert, key) for 127.0.0.1 / localhost, made by the openssl command; None when openssl is missing."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return cert, key


class HubServer:
    def __init__(self, tls: Optional[tuple] = None):
        self.repos: dict = {}  # "owner/repo" or "datasets/owner/repo" -> Repo
        self.renamed: dict = {}  # old "owner/repo" -> new "owner/repo"
        self.plain: dict = {}  # "/files/<path>" -> bytes
        self.faults: dict = {}  # blob sha256 or plain path -> Fault
        self.log: list = []
        self.connections: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        owner = self

        class Handler(_Handler):
            server_state = owner

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.cdn = f"{self.scheme}://localhost:{self.port}"
        self._thread = None

    # ---- content ------------------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict, *, private=False, gated=False, lfs=True, branch="main") -> str:
        """Files at a new commit on `branch` (a new repo, or a new commit of an existing one). -> commit id."""
        repo = self.repos.get(repo_id)
        commit = commit_id(f"{repo_id}:{len(repo.files) if repo else 0}:{sorted(files)}")
        if repo is None:
            repo = self.repos[repo_id] = Repo({}, {}, private=private, gated=gated, lfs=lfs)
        repo.files[commit] = dict(files)
        repo.refs[branch] = commit
        return commit

    def blobs(self) -> dict:
        out = {}
        for repo in self.repos.values():
            for files in repo.files.values():
                for data in files.values():
                    out[hashlib.sha256(data).hexdigest()] = data
        return out

    def requests(self, method=None, contains=None) -> list:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (contains is None or contains in r.path)]

    # ---- process --------------------------------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop answering and close the port (a later connection is refused)."""
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:  # kept-alive client connections too, so no request is answered after this
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: HubServer = None

    def log_message(self, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        with self.server_state._lock:
            self.server_state.connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server_state._lock:
                self.server_state.connections.discard(self.connection)

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def _record(self) -> Logged:
        s = self.server_state
        entry = Logged(self.command, self.path, self.headers.get("Host", ""), self.headers.get("Range"),
                       self.headers.get("If-Range"), self.headers.get("Authorization"))
        with s._lock:
            s.log.append(entry)
        return entry

    def _reply(self, entry: Logged, status: int, headers: dict, body: bytes = b""):
        entry.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
            entry.sent += len(body)

    def _hub_error(self, entry, status, code, message, extra=None):
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        headers.update(extra or {})
        self._reply(entry, status, headers, json.dumps({"error": message}).encode())

    def _route(self, head: bool):
        entry = self._record()
        s = self.server_state
        path = urlsplit(self.path).path
        try:
            if path.startswith("/cdn/"):
                blob = s.blobs().get(path[len("/cdn/"):])
                if blob is None:
                    return self._reply(entry, 404, {}, b"no such blob")
                return self._send_file(entry, blob, path[len("/cdn/"):], hashlib.sha256(blob).hexdigest())
            if path.startswith("/files/"):
                data = s.plain.get(path)
                if data is None:
                    return self._reply(entry, 404, {}, b"not found")
                return self._send_file(entry, data, path, hashlib.md5(data).hexdigest())
            if "/resolve/" in path:
                return self._resolve(entry, path)
            self._reply(entry, 404, {}, b"unknown route")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True

    # ---- the Hub's resolve route ---------------------------------------------------------------------------------
    def _resolve(self, entry: Logged, path: str):
        s = self.server_state
        repo_part, _, rest = path.lstrip("/").partition("/resolve/")
        rev_raw, _, file_path = rest.partition("/")
        revision, file_path = unquote(rev_raw), unquote(file_path)
        if repo_part in s.renamed:
            target = "/" + s.renamed[repo_part] + "/resolve/" + rest
            return self._reply(entry, 307, {"Location": target})
        repo = s.repos.get(repo_part)
        auth = self.headers.get("Authorization")
        authorized = auth == f"Bearer {TOKEN}"
        if repo is None or (repo.private and not authorized):
            return self._hub_error(entry, 404 if auth else 401, "RepoNotFound", "Repository not found")
        if repo.gated:
            return self._hub_error(entry, 403 if auth else 401, "GatedRepo",
                                   f"Access to model {repo_part} is restricted. You must have access to it and be "
                                   "authenticated to access it. Please log in.")
        commit = repo.refs.get(revision) or (revision if revision in repo.files else None)
        if commit is None:
            return self._hub_error(entry, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = repo.files[commit].get(file_path)
        if data is None:
            return self._hub_error(entry, 404, "EntryNotFound", f"{file_path} does not exist on \"{revision}\"",
                                   {"X-Repo-Commit": commit})
        sha = hashlib.sha256(data).hexdigest()
        if repo.lfs:
            fault = s.faults.get(sha) or Fault()
            headers = {"Location": f"{s.cdn}/cdn/{sha}", "X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"',
                       "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            if not fault.no_length:
                headers["X-Linked-Size"] = len(data)
            return self._reply(entry, 302, headers)
        git_sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return self._send_file(entry, data, sha, git_sha, {"X-Repo-Commit": commit})

    # ---- bodies, ranges and faults -------------------------------------------------------------------------------
    def _send_file(self, entry: Logged, data: bytes, fault_key: str, etag: str, extra: Optional[dict] = None):
        s = self.server_state
        fault = s.faults.get(fault_key) or Fault()
        if fault.stall:
            s._stop.wait(fault.stall)
        if fault.status is not None:
            return self._reply(entry, fault.status, {}, b"fault")
        headers = {"ETag": f'"{etag}"', "Accept-Ranges": "bytes", "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}
        headers.update(extra or {})
        start, status = 0, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and (if_range is None or if_range == f'"{etag}"'):
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._reply(entry, 416, headers)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        cut = fault.cut_at is not None and (fault.cut_times is None or fault.cuts_done < fault.cut_times) \
            and start <= fault.cut_at < len(data)
        if fault.no_length or cut:
            headers["Connection"] = "close"
            self.close_connection = True
        if not fault.no_length:
            headers["Content-Length"] = len(data) - start
        entry.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.end_headers()
        if self.command == "HEAD":
            return
        end = fault.cut_at if cut else len(data)
        if cut:
            fault.cuts_done += 1
        pos = start
        step = 64 << 10
        while pos < end and not s._stop.is_set():
            chunk = data[pos:min(end, pos + step)]
            self.wfile.write(chunk)
            entry.sent += len(chunk)
            pos += len(chunk)
            if fault.rate:
                time.sleep(len(chunk) / fault.rate)
        self.wfile.flush()
        if cut:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
