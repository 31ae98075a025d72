"""Bundle references: what users paste into Load Mask Bundle, and where the referenced file lives on disk.

Accepted forms (each may end in `#sha256=<64 hex>`, which pins the file's content):

    hf://owner/repo/path/file.safetensors[@revision]     Hugging Face Hub; a 40-hex revision pins a commit
    hf://owner/repo@revision/path/file.safetensors       huggingface_hub's own URI form
    hf://datasets/owner/repo/...                         a dataset repository (models are the default)
    https://huggingface.co/owner/repo/resolve/rev/path   a Hub file link (also /blob/); read as the hf:// form
    https://host/path/file.safetensors                   any other HTTPS server

A referenced file is stored under models/sparse_attention/: `hub/<owner>/<repo>/<path>` for Hub files,
`hub/_url/<host>/<path>` for other links (Hub account names cannot start with "_"). Every path segment is checked
before anything touches the disk: no `..`, no absolute or empty segments, no hidden names, no (encoded)
separators, no characters Windows forbids; the file must be a `.safetensors` bundle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Optional
from urllib.parse import unquote, urlsplit

from .errors import BAD_REFERENCE, HubError

HUB_DIR = "hub"
URL_DIR = "_url"
SUFFIX = ".safetensors"
PUBLIC_HUB = "https://huggingface.co"

FORMS = ("hf://owner/repo/path/file.safetensors[@revision][#sha256=<64 hex>] or "
         "https://host/path/file.safetensors[#sha256=<64 hex>]")

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REVISION = re.compile(r"[A-Za-z0-9._/-]+")
_ISSUE_FORM = re.compile(re.escape(SUFFIX) + "@", re.IGNORECASE)
# Characters no path segment may hold: separators, and what Windows file names cannot contain.
_FORBIDDEN = set('/\\:*?"<>|')


def _bad(text: str, why: str) -> HubError:
    return HubError(BAD_REFERENCE, f"{why}. A reference looks like {FORMS}", reference=text)


@dataclass(frozen=True)
class Reference:
    kind: str  # "hf" or "https"
    path: tuple  # file path segments: inside the repository (hf) or of the URL, decoded (https)
    repo_id: str = ""  # hf: "owner/repo"
    repo_type: str = "model"  # hf: "model" or "dataset"
    revision: Optional[str] = None  # hf: branch, tag or commit; None = the repository's default branch
    url: str = ""  # https: the link as given (without the #sha256 part)
    host: str = ""  # https: the folder name for the host (with _<port> when one is given)
    sha256: Optional[str] = None  # lower-case hex pin, or None

    # ---- facts ---------------------------------------------------------------------------------------------
    @property
    def filename(self) -> str:
        """Path of the file inside its repository (hf) or URL path (https), '/'-separated."""
        return "/".join(self.path)

    @property
    def pins_commit(self) -> bool:
        return self.kind == "hf" and self.revision is not None and bool(_COMMIT.fullmatch(self.revision))

    @property
    def repo_dir(self) -> PurePosixPath:
        """hf: the repository's folder relative to models/sparse_attention/ (huggingface_hub's local_dir)."""
        owner, name = self.repo_id.split("/")
        return PurePosixPath(HUB_DIR, *(("datasets",) if self.repo_type == "dataset" else ()), owner, name)

    def relpath(self) -> PurePosixPath:
        """Where the file lives, relative to models/sparse_attention/ (also its name in Load Mask Bundle's list)."""
        if self.kind == "hf":
            return self.repo_dir.joinpath(*self.path)
        return PurePosixPath(HUB_DIR, URL_DIR, self.host, *self.path)

    # ---- renderings ------------------------------------------------------------------------------------------
    def canonical(self, with_sha256: bool = True) -> str:
        """The hf:// form with the revision after the file name (or the https link), plus the pin if any."""
        if self.kind == "hf":
            prefix = "datasets/" if self.repo_type == "dataset" else ""
            text = f"hf://{prefix}{self.repo_id}/{self.filename}" + (f"@{self.revision}" if self.revision else "")
        else:
            text = self.url
        return text + (f"#sha256={self.sha256}" if with_sha256 and self.sha256 else "")

    def web_url(self) -> str:
        """A direct download link: the public Hub's resolve URL for hf:// (what ComfyUI's frontend offers to
        download for a workflow's missing model), else the link itself."""
        if self.kind != "hf":
            return self.url
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, self.filename, repo_type=self.repo_type, revision=self.revision or "main",
                          endpoint=PUBLIC_HUB)

    def with_sha256(self, sha256: str) -> "Reference":
        return replace(self, sha256=sha256.lower())

    def __str__(self) -> str:
        return self.canonical()


# ------------------------------------------------------------------------------------------------------ parsing
def _check_segments(text: str, segments, what: str):
    if not segments:
        raise _bad(text, f"it names no file ({what} is empty)")
    for s in segments:
        if s in ("", ".", ".."):
            raise _bad(text, f"the {what} has an empty, '.' or '..' segment: a reference may only name a file "
                             "inside its repository or site")
        if s.startswith("."):
            raise _bad(text, f"the {what} has a hidden name '{s}' (starting with '.')")
        bad = sorted({c for c in s if c in _FORBIDDEN or ord(c) < 32})
        if bad:
            raise _bad(text, f"the {what} segment '{s}' contains {' '.join(repr(c) for c in bad)} "
                             "(separators and characters file names cannot hold are refused)")


def _check_file(text: str, segments):
    if not segments[-1].lower().endswith(SUFFIX) or segments[-1].lower() == SUFFIX:
        raise _bad(text, f"'{segments[-1]}' is not a mask bundle file: references name a {SUFFIX} file")


def _split_pin(text: str):
    body, sep, fragment = text.partition("#")
    if not sep:
        return body, None
    key, eq, value = fragment.partition("=")
    if key.lower() != "sha256" or not eq or not _SHA256.fullmatch(value):
        raise _bad(text, "the part after '#' must be sha256= and the file's 64-digit hex SHA-256")
    return body, value.lower()


def _endpoint_origin(endpoint: Optional[str]):
    if not endpoint:
        return None
    u = urlsplit(endpoint)
    return (u.scheme.lower(), (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme))


def _is_hub_link(u, endpoint: Optional[str]) -> bool:
    from huggingface_hub import constants

    origin = (u.scheme.lower(), (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme))
    public = u.scheme == "https" and origin[1] in {h for h in constants.HF_URL_HOSTS} and u.port in (None, 443)
    return public or origin == _endpoint_origin(endpoint)


def _from_hf_uri(text: str, uri_text: str, endpoint: Optional[str], revision: Optional[str], sha256):
    from huggingface_hub.errors import HfUriError
    from huggingface_hub.utils import parse_hf_uri

    try:
        uri = parse_hf_uri(uri_text, endpoint=endpoint)
    except HfUriError as e:
        raise _bad(text, f"not a Hugging Face file reference ({str(e).strip()})") from None
    if uri.type not in ("model", "dataset"):
        raise _bad(text, f"bundles are read from model or dataset repositories, not a {uri.type}")
    if revision is not None and uri.revision is not None:
        raise _bad(text, "it gives two revisions (one after the repository, one after the file name)")
    rev = revision if revision is not None else uri.revision
    if rev is not None and (not _REVISION.fullmatch(rev) or ".." in rev or rev.startswith("/")
                            or rev.endswith("/")):
        raise _bad(text, f"revision '{rev}' is not a branch, tag or commit name")
    if "%" in uri.path_in_repo and uri_text.startswith("hf://"):
        raise _bad(text, "percent-encoded characters are refused in hf:// paths; write the file name as the "
                         "repository shows it")
    owner, name = uri.id.split("/")
    _check_segments(text, [owner, name], "repository id")
    segments = uri.path_in_repo.split("/") if uri.path_in_repo else []
    _check_segments(text, segments, "file path")
    _check_file(text, segments)
    return Reference("hf", tuple(segments), repo_id=uri.id, repo_type=uri.type, revision=rev, sha256=sha256)


def parse(text: str, endpoint: Optional[str] = None) -> Reference:
    """Parse and check a reference. `endpoint`: the Hub endpoint in use (HF_ENDPOINT), whose file links are read
    as hf:// references like huggingface.co's. Raises HubError(BAD_REFERENCE) saying what is wrong."""
    raw = text
    text = (text or "").strip()
    if not text:
        raise _bad(raw, "the reference is empty")
    if any(c.isspace() for c in text):
        raise _bad(text, "it contains spaces")
    body, sha256 = _split_pin(text)
    lower = body.lower()
    if lower.startswith("hf://"):
        m = None
        for m in _ISSUE_FORM.finditer(body):
            pass  # the last "<file>.safetensors@" starts the revision
        if m is not None:
            return _from_hf_uri(text, body[:m.end() - 1], endpoint, body[m.end():], sha256)
        return _from_hf_uri(text, body, endpoint, None, sha256)
    if lower.startswith(("https://", "http://")):
        u = urlsplit(body)
        if u.username is not None or u.password is not None:
            raise _bad(text, "links with a user name or password are refused")
        if not u.hostname:
            raise _bad(text, "the link has no host")
        if re.search(r"%(2f|5c)", u.path, re.IGNORECASE):
            raise _bad(text, "the link's path contains an encoded separator (%2F or %5C)")
        if _is_hub_link(u, endpoint):
            return _from_hf_uri(text, body, endpoint, None, sha256)
        if u.scheme.lower() != "https":
            raise _bad(text, "plain http:// is refused (the file could be altered on the way); use https://")
        segments = [unquote(s) for s in u.path.split("/")[1:]]
        _check_segments(text, segments, "link path")
        _check_file(text, segments)
        host = u.hostname.lower()
        if not re.fullmatch(r"[a-z0-9.-]+", host):
            host = re.sub(r"[^a-z0-9.-]", "_", host)
        folder = host + (f"_{u.port}" if u.port else "")
        _check_segments(text, [folder], "host")
        return Reference("https", tuple(segments), url=body, host=folder, sha256=sha256)
    raise _bad(text, "it is neither an hf:// reference nor an https:// link")
