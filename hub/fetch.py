"""Get the file a reference names into models/sparse_attention/hub/, verified, and load it as a bundle.

- hf:// references go through huggingface_hub's `hf_hub_download` with `local_dir` = the repository's folder
  under hub/: its token (HF_TOKEN or `hf auth login`) for private and gated repositories, HF_ENDPOINT, its
  up-to-date check (ETag, X-Repo-Commit), its resume of a transfer cut mid-way (Range, a few retries), its
  temp file + rename, and its fallback to the file already there when the Hub cannot be reached.
  HF_HUB_OFFLINE=1 skips the network. Its own timeouts apply (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT);
  the metadata request also gets ours.
- Other https:// links go through requests: a hidden temp file in the target folder, a resume (Range + If-Range)
  when a transfer is cut, fsync and rename; connect and read timeouts.

Both paths report progress to a callback (bytes done, total) which may raise to abort (ComfyUI's interrupt): the
exception passes through unchanged and no partial file is left. The size cap applies to the advertised size
before the body is read and to the bytes read (the transfer is cut once it passes the cap). The sha256 pin is
checked before the file is parsed, then load_bundle validates everything; a file failing either is deleted.
A pinned reference whose file is already there and matches needs no network at all.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..version import __version__
from . import errors as E
from .errors import HubError
from .reference import Reference, parse

log = logging.getLogger("calibatt")

DEFAULT_MAX_MB = 512
DEFAULT_TIMEOUT_S = 30.0
PLAIN_CHUNK = 256 << 10
PLAIN_RETRIES = 5  # consecutive cut transfers without new bytes before giving up (huggingface_hub also uses 5)

Progress = Callable[[int, Optional[int]], None]


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


def default_max_bytes() -> int:
    return int(_env_float("CALIBATT_HUB_MAX_MB", DEFAULT_MAX_MB) * (1 << 20))


def default_timeout() -> float:
    return _env_float("CALIBATT_HUB_TIMEOUT", DEFAULT_TIMEOUT_S)


def offline_mode() -> bool:
    from huggingface_hub import constants

    flag = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> Optional[str]:
    """HF_ENDPOINT as set now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


@dataclass(frozen=True)
class Fetched:
    reference: Reference
    path: Path
    sha256: str
    size: int
    downloaded: bool  # False when the file already there was used


# ------------------------------------------------------------------------------------------------- helpers
def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


def local_path(root, ref: Reference) -> Path:
    """The file's place under `root` (models/sparse_attention/), checked to stay inside root/hub/."""
    root = Path(root).resolve()
    path = root.joinpath(*ref.relpath().parts)
    hub = root / "hub"
    if os.path.commonpath([str(hub), str(path.resolve())]) != str(hub):
        raise HubError(E.BAD_REFERENCE, f"resolves outside {hub} (a link in the folder?); refused",
                       reference=ref.canonical())
    return path


def _hf_metadata_path(local_dir: Path, filename: str) -> Optional[Path]:
    try:
        from huggingface_hub._local_folder import get_local_download_paths

        return Path(get_local_download_paths(local_dir, filename).metadata_path)
    except Exception:  # a huggingface_hub without this layout: nothing to tidy
        return None


def discard(path: Path, ref: Reference, root=None):
    """Delete a file that failed verification, and huggingface_hub's record of having downloaded it."""
    path.unlink(missing_ok=True)
    if ref.kind == "hf" and root is not None:
        meta = _hf_metadata_path(Path(root).resolve().joinpath(*ref.repo_dir.parts), ref.filename)
        if meta is not None:
            meta.unlink(missing_ok=True)


class _Transfer:
    """Byte accounting shared by both download paths: the size cap, free disk space, the progress callback."""

    def __init__(self, ref: Reference, dest: Path, max_bytes: int, progress: Progress):
        self.ref, self.dest, self.max_bytes, self.progress = ref, dest, max_bytes, progress
        self.total: Optional[int] = None
        self.started = False  # a transfer began (False when the copy already there was used)

    def _too_large(self, n: int, advertised: bool) -> HubError:
        what = "the server announces" if advertised else "the transfer passed"
        return HubError(E.TOO_LARGE, f"file too large: {what} {_mb(n)}, over the cap of {_mb(self.max_bytes)}; the "
                                     "download was stopped and nothing was kept. Mask bundles are a few MB; check "
                                     "the reference, or raise CALIBATT_HUB_MAX_MB if you trust this file",
                        reference=self.ref.canonical())

    def begin(self, total: Optional[int]):
        self.total, self.started = total, True
        if total is not None:
            if total > self.max_bytes:
                raise self._too_large(total, True)
            free = shutil.disk_usage(self.dest.parent).free
            if free < total:
                raise _disk_full(self.ref, self.dest, total, free)
        self.progress(0, total)

    def advance(self, done: int):
        if done > self.max_bytes:
            raise self._too_large(done, False)
        self.progress(done, self.total)


def _disk_full(ref: Reference, dest: Path, need: Optional[int] = None, free: Optional[int] = None) -> HubError:
    amount = f" ({_mb(need)} needed, {_mb(free)} free)" if need is not None and free is not None else ""
    return HubError(E.DISK_FULL, f"disk full: no space left in {dest.parent}{amount}; nothing was kept. Free space "
                                 "on that disk, or point ComfyUI's models at a larger one (extra_model_paths.yaml)",
                    reference=ref.canonical())


def _progress_class(transfer: _Transfer):
    """A class with the part of tqdm's interface huggingface_hub's downloader calls (constructor keywords,
    update, context manager, close), feeding `transfer`. Not a tqdm subclass, so huggingface_hub passes it
    only the keywords below and draws no console bar of its own."""

    class _HubProgress:
        def __init__(self, *args, total=None, initial=0, **kwargs):
            self.n = int(initial or 0)
            self.total = total
            transfer.begin(total)
            if self.n:
                transfer.advance(self.n)

        def update(self, n=1):
            self.n += int(n)
            if n > 0:
                transfer.advance(self.n)

        def update_transfer(self, n=1):  # huggingface_hub reports wire bytes separately when it can
            pass

        def set_description(self, *args, **kwargs):
            pass

        def refresh(self, *args, **kwargs):
            pass

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return _HubProgress


# ---------------------------------------------------------------------------------------- error classification
def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _host(ref: Reference, endpoint: Optional[str]) -> str:
    if ref.kind == "hf":
        from huggingface_hub import constants

        return endpoint or constants.ENDPOINT
    from urllib.parse import urlsplit

    return urlsplit(ref.url).netloc


def _network_error(exc: BaseException, ref: Reference, host: str) -> Optional[HubError]:
    """Connection-level failures, recognised by the exception types and errnos in the chain (huggingface_hub
    raises httpx2 errors, requests urllib3 ones; both wrap the socket's own)."""
    text = " | ".join(f"{type(e).__name__}: {e}" for e in _chain(exc))
    names = {type(e).__name__ for e in _chain(exc)}
    ref_text = ref.canonical()
    dns_words = ("Name or service not known", "Temporary failure in name resolution", "nodename nor servname",
                 "getaddrinfo failed", "NameResolutionError", "Failed to resolve", "No address associated")
    if any(isinstance(e, socket.gaierror) for e in _chain(exc)) or any(w in text for w in dns_words):
        return HubError(E.DNS, f"DNS failure: the host {host} could not be resolved. Check the address in the "
                               "reference (and HF_ENDPOINT if you set it), your internet connection and DNS",
                        reference=ref_text)
    if any(isinstance(e, ssl.SSLError) for e in _chain(exc)) or "CERTIFICATE_VERIFY_FAILED" in text:
        return HubError(E.TLS, f"the TLS certificate of {host} could not be verified ({_last_line(exc)}). Check "
                               "the system clock; behind an HTTPS-inspecting proxy set REQUESTS_CA_BUNDLE and "
                               "SSL_CERT_FILE to its CA file", reference=ref_text)
    if any(isinstance(e, TimeoutError) for e in _chain(exc)) or any("Timeout" in n for n in names):
        return HubError(E.TIMEOUT, f"{host} did not answer in time. Retry later; on a slow connection raise "
                                   "CALIBATT_HUB_TIMEOUT (and HF_HUB_DOWNLOAD_TIMEOUT for hf:// references)",
                        reference=ref_text)
    if {"RemoteProtocolError", "ChunkedEncodingError", "IncompleteRead", "ProtocolError", "ReadError"} & names or \
            "Consistency check failed" in text:
        return HubError(E.CUT, f"the download from {host} was cut off before the end and could not be resumed; "
                               "nothing was kept. Run the workflow again to retry", reference=ref_text)
    refused = any(isinstance(e, (ConnectionRefusedError, ConnectionResetError)) for e in _chain(exc))
    unreachable = any(isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH,
                                                                errno.ECONNREFUSED)
                      for e in _chain(exc))
    if refused or unreachable or {"ConnectError", "ConnectionError", "NewConnectionError", "NetworkError",
                                  "OfflineModeIsEnabled"} & names:
        return HubError(E.NO_NETWORK, f"no network: cannot connect to {host} ({_last_line(exc)}). Check your "
                                      "internet connection and proxy settings (HTTPS_PROXY); a bundle downloaded "
                                      "once loads without network after that", reference=ref_text)
    return None


def _last_line(exc: BaseException) -> str:
    deepest = list(_chain(exc))[-1]
    msg = str(deepest).strip().splitlines()
    return (msg[-1] if msg else type(deepest).__name__)[:200]


def _disk_error(exc: BaseException, ref: Reference, dest: Path) -> Optional[HubError]:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _disk_full(ref, dest)
    return None


def _hf_error(exc: BaseException, ref: Reference, host: str, offline: bool) -> Optional[HubError]:
    from huggingface_hub import errors as hfe

    ref_text, repo = ref.canonical(), ref.repo_id
    page = f"{host.rstrip('/')}/{'datasets/' if ref.repo_type == 'dataset' else ''}{repo}"
    login = "log in with `hf auth login` (or set HF_TOKEN to a token with read access)"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hfe.GatedRepoError):
        return HubError(E.UNAUTHORIZED, f"{repo} is a gated repository ({status}): open {page}, accept its "
                                        f"conditions, then {login}", reference=ref_text)
    if isinstance(exc, hfe.RepositoryNotFoundError):
        if status == 401:
            return HubError(E.UNAUTHORIZED, f"repository {repo} was not found, or it is private and no valid token "
                                            f"was sent (401). Check the name; for a private repository {login}",
                            reference=ref_text)
        return HubError(E.NOT_FOUND, f"repository {repo} was not found ({status or 404}), or your token cannot see "
                                     "it. Check the name and that your account has access", reference=ref_text)
    if isinstance(exc, hfe.RevisionNotFoundError):
        return HubError(E.NOT_FOUND, f"revision '{ref.revision}' does not exist in {repo} (404). Check the branch, "
                                     "tag or commit after '@'", reference=ref_text)
    if isinstance(exc, hfe.RemoteEntryNotFoundError):
        return HubError(E.NOT_FOUND, f"file '{ref.filename}' does not exist in {repo} at revision "
                                     f"{ref.revision or 'main'} (404). Check the path (letter case matters)",
                        reference=ref_text)
    if isinstance(exc, hfe.DisabledRepoError):
        return HubError(E.UNAUTHORIZED, f"access to {repo} has been disabled on the Hub ({status}); ask its owner "
                                        "for another copy", reference=ref_text)
    if isinstance(exc, hfe.FileMetadataError):
        return HubError(E.SERVER, f"{host} answered without the Hub's file headers ({_last_line(exc)}); if you set "
                                  "HF_ENDPOINT, check that it points at a Hugging Face Hub or mirror, else check "
                                  "proxy and firewall settings", reference=ref_text)
    if isinstance(exc, hfe.HfHubHTTPError):
        return _status_error(status, ref, host, login=login)
    if isinstance(exc, (hfe.OfflineModeIsEnabled, hfe.LocalEntryNotFoundError)) and offline:
        return HubError(E.OFFLINE, "HF_HUB_OFFLINE is set and this bundle has not been downloaded yet. Unset "
                                   "HF_HUB_OFFLINE once to download it (it then loads offline), or copy the file "
                                   f"to models/sparse_attention/{ref.relpath()}", reference=ref_text)
    if isinstance(exc, hfe.LocalEntryNotFoundError):
        # Raised after the metadata request failed and no copy exists: the reason is in the chain.
        return _network_error(exc, ref, host) or HubError(
            E.NO_NETWORK, f"no network: {host} could not be reached ({_last_line(exc)}) and the bundle is not "
                          "downloaded yet. Check your internet connection and proxy settings", reference=ref_text)
    return None


def _status_error(status: Optional[int], ref: Reference, host: str, login: str = "") -> HubError:
    ref_text = ref.canonical()
    if status == 404:
        return HubError(E.NOT_FOUND, f"{host} has no such file (404). Check the link", reference=ref_text)
    if status in (401, 403):
        fix = (login if ref.kind == "hf" else "this link needs credentials the node does not send: download it "
               f"in a browser and put it in models/sparse_attention/, or ask for a public link")
        return HubError(E.UNAUTHORIZED, f"access denied by {host} ({status}): {fix}", reference=ref_text)
    if status is not None and status >= 500:
        return HubError(E.SERVER, f"{host} failed with a server error ({status}). Retry later", reference=ref_text)
    return HubError(E.SERVER, f"{host} answered HTTP {status}, not the file. Check the link", reference=ref_text)


def classify(exc: BaseException, ref: Reference, dest: Path, endpoint: Optional[str], offline: bool):
    """HubError for a failure users can act on, or None (the exception is then re-raised as it is)."""
    host = _host(ref, endpoint)
    err = None
    if ref.kind == "hf":
        err = _hf_error(exc, ref, host, offline)
    if err is None:
        err = _disk_error(exc, ref, dest) or _network_error(exc, ref, host)
    if err is None and isinstance(exc, ValueError) and "too large to be downloaded" in str(exc):
        err = HubError(E.TOO_LARGE, "file too large for a plain download (over 50 GB); this is not a mask bundle",
                       reference=ref.canonical())
    return err


# ------------------------------------------------------------------------------------------------- hf://
def _fetch_hf(ref: Reference, root: Path, dest: Path, transfer: _Transfer, timeout: float,
              endpoint: Optional[str], offline: bool) -> Path:
    from huggingface_hub import hf_hub_download

    local_dir = Path(root).resolve().joinpath(*ref.repo_dir.parts)
    local_dir.mkdir(parents=True, exist_ok=True)
    got = hf_hub_download(ref.repo_id, ref.filename, repo_type=ref.repo_type, revision=ref.revision,
                          local_dir=local_dir, endpoint=endpoint, etag_timeout=timeout, local_files_only=offline,
                          tqdm_class=_progress_class(transfer), library_name="calibatt",
                          library_version=__version__)
    got = Path(got)
    if got.resolve() != dest.resolve():  # huggingface_hub places it at local_dir/filename; anything else is a bug
        raise HubError(E.BAD_REFERENCE, f"huggingface_hub stored the file at {got}, not {dest}; refused",
                       reference=ref.canonical())
    return got


# ------------------------------------------------------------------------------------------------ https://
def _fetch_https(ref: Reference, dest: Path, transfer: _Transfer, timeout: float, offline: bool) -> Path:
    if dest.is_file():
        return dest  # links are taken as immutable: delete the local copy to fetch a changed file again
    if offline:
        raise HubError(E.OFFLINE, "HF_HUB_OFFLINE is set and this file has not been downloaded yet. Unset it once "
                                  f"to download, or copy the file to models/sparse_attention/{ref.relpath()}",
                       reference=ref.canonical())
    try:
        import requests
    except ImportError:
        raise HubError(E.SERVER, "https:// links need the 'requests' package (ComfyUI normally installs it): "
                                 "pip install requests, or use an hf:// reference", reference=ref.canonical())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.partial"
    done, validator, quiet, begun = 0, None, 0, False
    cut_errors = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)
    try:
        with requests.Session() as session, open(tmp, "wb") as f:
            while True:
                headers = {"Accept-Encoding": "identity"}
                if done:
                    headers["Range"] = f"bytes={done}-"
                    if validator:
                        headers["If-Range"] = validator
                started = False
                try:
                    with session.get(ref.url, headers=headers, stream=True, timeout=(timeout, timeout)) as r:
                        started = True
                        if any(h.url.lower().startswith("http://") for h in (*r.history, r)):
                            raise HubError(E.BAD_REFERENCE, "the server redirected to plain http://; refused",
                                           reference=ref.canonical())
                        resumed = r.status_code == 206 and done and r.headers.get("Content-Range", "").startswith(
                            f"bytes {done}-")
                        if not resumed and done and r.status_code in (206, 416):
                            done, validator = 0, None  # the server cannot continue this file: start over
                            f.seek(0)
                            f.truncate()
                            continue
                        if r.status_code == 200:
                            f.seek(0)
                            f.truncate()
                            done = 0
                        elif not resumed:
                            raise _status_error(r.status_code, ref, _host(ref, None))
                        length = r.headers.get("Content-Length")
                        total = done + int(length) if length is not None and length.isdigit() else None
                        validator = r.headers.get("ETag") or r.headers.get("Last-Modified")
                        if not begun:
                            transfer.begin(total)
                            begun = True
                        elif total is not None:
                            transfer.total = total
                        for chunk in r.iter_content(PLAIN_CHUNK):
                            if chunk:
                                f.write(chunk)
                                done += len(chunk)
                                quiet = 0
                                transfer.advance(done)
                        if total is not None and done != total:
                            raise requests.exceptions.ChunkedEncodingError(
                                f"connection closed after {done} of {total} bytes")
                        break
                except cut_errors as e:
                    connect_failure = isinstance(e, requests.exceptions.ConnectionError) and not started
                    quiet += 1
                    if connect_failure or quiet > PLAIN_RETRIES:
                        raise
                    log.warning("download of %s was cut after %d bytes (%s); resuming", ref.canonical(), done,
                                type(e).__name__)
                    time.sleep(min(quiet, 3) * 0.5)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------------------------------------- fetch
def fetch(reference, root, *, max_bytes: Optional[int] = None, timeout: Optional[float] = None,
          progress: Optional[Progress] = None, endpoint: Optional[str] = None) -> Fetched:
    """Make the referenced file present under `root` (models/sparse_attention/) and check it against the
    reference's pin. `progress(done, total)` is called as bytes arrive; an exception it raises stops the
    download, leaves no partial file and propagates unchanged. Raises HubError for every failure users meet."""
    endpoint = endpoint or hub_endpoint()
    ref = reference if isinstance(reference, Reference) else parse(reference, endpoint=endpoint)
    max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
    timeout = default_timeout() if timeout is None else float(timeout)
    progress = progress or (lambda done, total: None)
    offline = offline_mode()
    dest = local_path(root, ref)
    ref_text = ref.canonical()

    if ref.sha256 and dest.is_file():
        if sha256_file(dest) == ref.sha256:
            return Fetched(ref, dest, ref.sha256, dest.stat().st_size, False)
        log.warning("%s: the copy in %s does not match the pinned sha256; downloading it again", ref_text, dest)
        discard(dest, ref, root)
    progress(0, None)  # lets an interrupt pressed before the download stop it
    dest.parent.mkdir(parents=True, exist_ok=True)
    transfer = _Transfer(ref, dest, max_bytes, progress)
    try:
        if ref.kind == "hf":
            path = _fetch_hf(ref, root, dest, transfer, timeout, endpoint, offline)
        else:
            path = _fetch_https(ref, dest, transfer, timeout, offline)
    except HubError:
        raise
    except Exception as e:
        err = classify(e, ref, dest, endpoint, offline)
        if err is None:
            raise
        raise err from e

    size = path.stat().st_size
    if size > max_bytes:  # a path that reported no progress (e.g. huggingface_hub's Xet transfer)
        discard(path, ref, root)
        raise transfer._too_large(size, False)
    digest = sha256_file(path)
    if ref.sha256 and digest != ref.sha256:
        discard(path, ref, root)
        raise HubError(E.CHECKSUM, f"checksum mismatch: the downloaded file has sha256 {digest}, the reference "
                                   f"pins {ref.sha256}; it was deleted. The file was changed or damaged: ask the "
                                   "bundle's author for the current reference (pin a commit with @<commit>)",
                       reference=ref_text)
    return Fetched(ref, path, digest, size, transfer.started)


def fetch_bundle(reference, root, **kwargs):
    """fetch(), then full bundle validation. -> (MaskBundle, Fetched). A file that is not a valid bundle is
    deleted (so the next run downloads it again) and reported as HubError(NOT_BUNDLE)."""
    from ..masks import BundleError, load_bundle

    got = fetch(reference, root, **kwargs)
    try:
        bundle = load_bundle(got.path)
    except BundleError as e:
        discard(got.path, got.reference, root)
        raise HubError(E.NOT_BUNDLE, f"the downloaded file is not a valid mask bundle ({e}); it was deleted. "
                                     "Check that the reference names a CalibAtt mask bundle",
                       reference=got.reference.canonical()) from e
    return bundle, got
