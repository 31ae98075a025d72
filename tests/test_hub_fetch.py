"""hub/: references, downloads, verification and the messages users get, against real local servers.

tests/hub_server.py speaks the Hub's resolve protocol to the real huggingface_hub client (HF_ENDPOINT points at it;
plain HTTP on 127.0.0.1, with LFS-style 302s to a CDN host name) and serves plain files over TLS with a
self-signed certificate that requests trusts through REQUESTS_CA_BUNDLE. No client is mocked; faults (cut
transfers, stalls, missing lengths, error statuses) are real behaviour of the server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from calibatt.hub import errors as E
from calibatt.hub.errors import HubError
from calibatt.hub.fetch import PLAIN_CHUNK, fetch, fetch_bundle, local_path, sha256_file
from calibatt.hub.reference import parse
from calibatt.masks import save_bundle
from helpers_core import make_bundle
from hub_server import Fault, HubServer, TOKEN, self_signed_cert

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20
REPO = "calibatt-test/bundles"


def _bundle_bytes(tmp_path_factory, **kw) -> bytes:
    path = tmp_path_factory.mktemp("bundle") / "b.safetensors"
    save_bundle(make_bundle(**kw), path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def bundle_bytes(tmp_path_factory):
    return _bundle_bytes(tmp_path_factory)


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    cert = self_signed_cert(tmp_path_factory.mktemp("tls"))
    if cert is None:
        pytest.skip("the openssl command is needed to make the test server's certificate")
    return cert


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
                 "CALIBATT_HUB_MAX_MB", "CALIBATT_HUB_TIMEOUT", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def hub(clean_env, bundle_bytes):
    """The Hub-protocol server with one public repository holding the bundle; HF_ENDPOINT points at it."""
    server = HubServer().start()
    server.commit = server.add_repo(REPO, {"tiny.safetensors": bundle_bytes, "dir/other.safetensors": bundle_bytes})
    clean_env.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


@pytest.fixture
def web(clean_env, tls_cert):
    """The plain file server over TLS, trusted through REQUESTS_CA_BUNDLE."""
    server = HubServer(tls=tls_cert).start()
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(tls_cert[0]))
    yield server
    server.stop()


def _leftovers(root: Path) -> list:
    """Files that are not huggingface_hub's own bookkeeping (its .metadata records, lock files, cache tags)."""
    keep = (".metadata", ".lock", ".gitignore", "CACHEDIR.TAG")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(keep))


def _fails(kind, fn, *args, **kwargs) -> str:
    with pytest.raises(HubError) as info:
        fn(*args, **kwargs)
    assert info.value.kind == kind, f"{info.value.kind}: {info.value}"
    return str(info.value)


# ------------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("text, relpath, canonical, pins", [
    ("hf://o/r/dir/f.safetensors@main", "hub/o/r/dir/f.safetensors", "hf://o/r/dir/f.safetensors@main", False),
    ("hf://o/r@" + "a" * 40 + "/f.safetensors", "hub/o/r/f.safetensors", "hf://o/r/f.safetensors@" + "a" * 40, True),
    ("hf://o/r/f.safetensors#sha256=" + "AB" * 32, "hub/o/r/f.safetensors", "hf://o/r/f.safetensors#sha256="
     + "ab" * 32, False),
    ("hf://datasets/o/r/f.safetensors@refs/pr/3", "hub/datasets/o/r/f.safetensors",
     "hf://datasets/o/r/f.safetensors@refs/pr/3", False),
    ("https://huggingface.co/o/r/resolve/v1/a/f.safetensors", "hub/o/r/a/f.safetensors",
     "hf://o/r/a/f.safetensors@v1", False),
    ("https://huggingface.co/o/r/blob/main/f.safetensors", "hub/o/r/f.safetensors", "hf://o/r/f.safetensors@main",
     False),
    ("https://example.org:8443/x/my%20bundle.safetensors?sig=1", "hub/_url/example.org_8443/x/my bundle.safetensors",
     "https://example.org:8443/x/my%20bundle.safetensors?sig=1", False),
])
def test_reference_forms_and_their_local_paths(text, relpath, canonical, pins):
    ref = parse(text)
    assert str(ref.relpath()) == relpath
    assert ref.canonical() == canonical
    assert ref.pins_commit == pins
    assert parse(ref.canonical()) == ref  # the canonical form reads back the same


def test_a_file_link_on_the_configured_endpoint_is_a_hub_reference():
    ref = parse("http://127.0.0.1:9999/o/r/resolve/main/f.safetensors", endpoint="http://127.0.0.1:9999")
    assert (ref.kind, ref.repo_id, ref.filename, ref.revision) == ("hf", "o/r", "f.safetensors", "main")
    with pytest.raises(HubError):  # the same link without that endpoint is plain http: refused
        parse("http://127.0.0.1:9999/o/r/resolve/main/f.safetensors")


@pytest.mark.parametrize("text, words", [
    ("hf://o/r/../f.safetensors", "'..'"),
    ("hf://o/r/a/./f.safetensors", "'..'"),
    ("hf:///etc/f.safetensors", "names no file"),
    ("hf://o/r//f.safetensors", "empty segments"),
    ("hf://../r/f.safetensors", "Repo id"),
    ("hf://o/r/a%2Ff.safetensors", "percent-encoded"),
    ("hf://o/r/a%2e%2e/f.safetensors", "percent-encoded"),
    ("hf://o/r/a\\..\\f.safetensors", "'\\\\'"),
    ("hf://o/r/.cache/f.safetensors", "hidden"),
    ("https://example.org/a%2F..%2Ff.safetensors", "encoded separator"),
    ("https://example.org/a%5c..%5cf.safetensors", "encoded separator"),
    ("https://example.org/a/%2e%2e/f.safetensors", "'..'"),
    ("https://example.org/C:/f.safetensors", "':'"),
    ("https://example.org//etc/f.safetensors", "'..'"),
    ("http://example.org/f.safetensors", "plain http"),
    ("https://user:pw@example.org/f.safetensors", "user name"),
    ("hf://o/r/f.bin", "not a mask bundle"),
    ("hf://o/r/f.safetensors#sha256=1234", "64-digit"),
    ("hf://o/r@main/f.safetensors@dev", "two revisions"),
    ("hf://o/r/f.safetensors@../x", "revision"),
    ("hf://spaces/o/r/f.safetensors", "not a space"),
    ("ftp://example.org/f.safetensors", "neither"),
    ("", "empty"),
])
def test_references_that_would_escape_or_are_malformed_are_refused(text, words):
    msg = _fails(E.BAD_REFERENCE, parse, text)
    assert words in msg, msg
    assert "hf://owner/repo/path/file.safetensors" in msg  # says what a reference looks like


def test_a_link_in_the_hub_folder_cannot_lead_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "models"
    (root / "hub").mkdir(parents=True)
    (root / "hub" / "evil").symlink_to(outside, target_is_directory=True)
    msg = _fails(E.BAD_REFERENCE, local_path, root, parse("hf://evil/r/f.safetensors"))
    assert "outside" in msg


# --------------------------------------------------------------------------------------------- hub protocol
def test_hub_download_checks_and_loads_then_needs_no_network(hub, bundle_bytes, tmp_path):
    sha = hashlib.sha256(bundle_bytes).hexdigest()
    ref = f"hf://{REPO}/tiny.safetensors@{hub.commit}#sha256={sha}"
    seen = []
    bundle, got = fetch_bundle(ref, tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert got.path == tmp_path / "hub" / REPO / "tiny.safetensors" and got.downloaded
    assert got.sha256 == sha and got.path.read_bytes() == bundle_bytes
    assert bundle.summary() == make_bundle().summary()
    assert seen[0] == (0, None) and seen[-1] == (len(bundle_bytes), len(bundle_bytes))
    head = hub.requests("HEAD", "/resolve/")
    cdn = hub.requests("GET", "/cdn/")
    assert len(head) == 1 and head[0].host.startswith("127.0.0.1") and head[0].status == 302
    assert len(cdn) == 1 and cdn[0].host.startswith("localhost") and cdn[0].sent == len(bundle_bytes)
    assert _leftovers(tmp_path) == [f"hub/{REPO}/tiny.safetensors"]

    before = len(hub.log)
    again, got2 = fetch_bundle(ref, tmp_path)
    assert not got2.downloaded and len(hub.log) == before  # pinned and present: no request at all
    assert again.content_hash() == bundle.content_hash()


def test_hub_cache_hit_with_the_server_stopped(hub, bundle_bytes, tmp_path, clean_env):
    fetch(f"hf://{REPO}/tiny.safetensors", tmp_path)  # the main branch, unpinned
    fetch(f"hf://{REPO}/dir/other.safetensors@{hub.commit}", tmp_path)
    hub.stop()
    # huggingface_hub cannot reach the Hub and falls back to the file it placed there
    got = fetch(f"hf://{REPO}/tiny.safetensors", tmp_path)
    assert got.path.read_bytes() == bundle_bytes and not got.downloaded
    # a commit revision that was downloaded needs no request
    assert fetch(f"hf://{REPO}/dir/other.safetensors@{hub.commit}", tmp_path).path.is_file()
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    assert fetch(f"hf://{REPO}/tiny.safetensors", tmp_path).path.read_bytes() == bundle_bytes
    msg = _fails(E.OFFLINE, fetch, f"hf://{REPO}/never.safetensors", tmp_path)
    assert "HF_HUB_OFFLINE is set" in msg and f"hub/{REPO}/never.safetensors" in msg


def test_renamed_repository_redirect_is_followed(hub, bundle_bytes, tmp_path):
    hub.renamed["old-name/bundles"] = REPO
    got = fetch("hf://old-name/bundles/tiny.safetensors", tmp_path)
    assert got.path == tmp_path / "hub/old-name/bundles/tiny.safetensors"
    assert got.path.read_bytes() == bundle_bytes
    assert [r.status for r in hub.requests("HEAD")] == [307, 302]


def test_private_repository_needs_a_token(hub, bundle_bytes, tmp_path, clean_env):
    hub.add_repo("calibatt-test/private", {"p.safetensors": bundle_bytes}, private=True)
    msg = _fails(E.UNAUTHORIZED, fetch, "hf://calibatt-test/private/p.safetensors", tmp_path)
    assert "(401)" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    assert _leftovers(tmp_path) == []
    clean_env.setenv("HF_TOKEN", TOKEN)
    got = fetch("hf://calibatt-test/private/p.safetensors", tmp_path)
    assert got.path.read_bytes() == bundle_bytes
    assert hub.requests("HEAD")[-1].auth == f"Bearer {TOKEN}"
    assert hub.requests("GET", "/cdn/")[-1].auth is None  # the token never goes to the CDN host


def test_gated_repository_says_how_to_get_access(hub, bundle_bytes, tmp_path, clean_env):
    hub.add_repo("calibatt-test/gated", {"g.safetensors": bundle_bytes}, gated=True)
    msg = _fails(E.UNAUTHORIZED, fetch, "hf://calibatt-test/gated/g.safetensors", tmp_path)
    assert "gated" in msg and "(401)" in msg and "accept its conditions" in msg
    clean_env.setenv("HF_TOKEN", TOKEN)
    msg = _fails(E.UNAUTHORIZED, fetch, "hf://calibatt-test/gated/g.safetensors", tmp_path)
    assert "(403)" in msg and f"{hub.url}/calibatt-test/gated" in msg


@pytest.mark.parametrize("ref, words", [
    (f"hf://{REPO}/missing.safetensors", "file 'missing.safetensors' does not exist"),
    (f"hf://{REPO}/tiny.safetensors@v9", "revision 'v9' does not exist"),
])
def test_not_found(hub, tmp_path, ref, words):
    msg = _fails(E.NOT_FOUND, fetch, ref, tmp_path)
    assert words in msg and "(404)" in msg


def test_missing_repository_with_a_token_is_a_404(hub, tmp_path, clean_env):
    clean_env.setenv("HF_TOKEN", TOKEN)
    msg = _fails(E.NOT_FOUND, fetch, "hf://calibatt-test/nope/x.safetensors", tmp_path)
    assert "repository calibatt-test/nope was not found (404)" in msg


def test_checksum_mismatch_keeps_nothing(hub, tmp_path):
    ref = f"hf://{REPO}/tiny.safetensors#sha256={'0' * 64}"
    msg = _fails(E.CHECKSUM, fetch, ref, tmp_path)
    assert "checksum mismatch" in msg and "0" * 64 in msg and "deleted" in msg
    assert _leftovers(tmp_path) == []
    assert not list(tmp_path.rglob("*.metadata"))  # huggingface_hub's record of it is gone too


def test_a_damaged_local_copy_is_downloaded_again(hub, bundle_bytes, tmp_path):
    sha = hashlib.sha256(bundle_bytes).hexdigest()
    ref = f"hf://{REPO}/tiny.safetensors#sha256={sha}"
    path = fetch(ref, tmp_path).path
    path.write_bytes(b"damaged")
    got = fetch(ref, tmp_path)
    assert got.downloaded and path.read_bytes() == bundle_bytes


def test_too_large_is_refused_before_the_body(hub, bundle_bytes, tmp_path):
    msg = _fails(E.TOO_LARGE, fetch, f"hf://{REPO}/tiny.safetensors", tmp_path, max_bytes=len(bundle_bytes) - 1)
    assert "announces" in msg and "CALIBATT_HUB_MAX_MB" in msg
    assert _leftovers(tmp_path) == []


def test_oversized_body_without_a_length_is_cut_at_the_cap(hub, tmp_path):
    big = bytes(48 * MB)
    hub.add_repo("calibatt-test/huge", {"huge.safetensors": big})
    hub.faults[hashlib.sha256(big).hexdigest()] = Fault(no_length=True)
    msg = _fails(E.TOO_LARGE, fetch, "hf://calibatt-test/huge/huge.safetensors", tmp_path, max_bytes=MB)
    assert "the transfer passed" in msg
    # huggingface_hub reads in 10 MB blocks: the cut comes within one block past the cap, long before the end
    assert hub.requests("GET", "/cdn/")[0].sent < 32 * MB
    assert _leftovers(tmp_path) == []


def test_a_file_that_is_not_a_bundle_is_deleted(hub, tmp_path):
    hub.add_repo("calibatt-test/junk", {"junk.safetensors": os.urandom(4096)})
    msg = _fails(E.NOT_BUNDLE, fetch_bundle, "hf://calibatt-test/junk/junk.safetensors", tmp_path)
    assert "not a valid mask bundle" in msg and "junk.safetensors" in msg
    assert _leftovers(tmp_path) == []


def test_a_transfer_cut_every_time_leaves_nothing(hub, bundle_bytes, tmp_path):
    hub.faults[hashlib.sha256(bundle_bytes).hexdigest()] = Fault(cut_at=len(bundle_bytes) // 2)
    msg = _fails(E.CUT, fetch, f"hf://{REPO}/tiny.safetensors", tmp_path)
    assert "cut off before the end" in msg and "Run the workflow again" in msg
    assert len(hub.requests("GET", "/cdn/")) > 1  # huggingface_hub retried
    assert _leftovers(tmp_path) == []


def test_resume_after_a_cut(hub, tmp_path):
    data = os.urandom(12 * MB)
    sha = hashlib.sha256(data).hexdigest()
    hub.add_repo("calibatt-test/large", {"large.safetensors": data})
    hub.faults[sha] = Fault(cut_at=11 * MB, cut_times=1)
    got = fetch(f"hf://calibatt-test/large/large.safetensors#sha256={sha}", tmp_path)
    assert got.sha256 == sha
    gets = hub.requests("GET", "/cdn/")
    # huggingface_hub keeps what it wrote (whole 10 MB blocks) and asks for the rest
    assert [g.range for g in gets] == [None, f"bytes={10 * MB}-"] and gets[1].status == 206
    assert gets[0].sent == 11 * MB and gets[1].sent == 2 * MB


class _Stop(Exception):
    pass


def _stop_on_bytes(done, total):
    if done > 0:
        raise _Stop()


def test_an_interrupt_stops_the_hub_download_and_leaves_nothing(hub, tmp_path):
    with pytest.raises(_Stop):  # the caller's exception, unchanged (ComfyUI reports it as an interrupt)
        fetch(f"hf://{REPO}/tiny.safetensors", tmp_path, progress=_stop_on_bytes)
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_no_network(hub, tmp_path, clean_env):
    hub.stop()  # nothing listens on its port any more
    msg = _fails(E.NO_NETWORK, fetch, f"hf://{REPO}/tiny.safetensors", tmp_path)
    assert "no network" in msg and "Connection refused" in msg and "internet connection" in msg


@pytest.mark.slow
def test_dns_failure(clean_env, tmp_path):
    clean_env.setenv("HF_ENDPOINT", "http://calibatt-test.invalid")
    msg = _fails(E.DNS, fetch, f"hf://{REPO}/tiny.safetensors", tmp_path)
    assert "calibatt-test.invalid could not be resolved" in msg and "HF_ENDPOINT" in msg


# -------------------------------------------------------------------------------------------- https links
def _serve(web, name, data, fault=None) -> str:
    web.plain[f"/files/{name}"] = data
    if fault is not None:
        web.faults[f"/files/{name}"] = fault
    return f"{web.url}/files/{name}"


def test_https_download(web, bundle_bytes, tmp_path):
    sha = hashlib.sha256(bundle_bytes).hexdigest()
    bundle, got = fetch_bundle(_serve(web, "b.safetensors", bundle_bytes) + f"#sha256={sha}", tmp_path)
    assert got.path == tmp_path / f"hub/_url/127.0.0.1_{web.port}/files/b.safetensors"
    assert got.sha256 == sha and bundle.summary() == make_bundle().summary()
    assert _leftovers(tmp_path) == [f"hub/_url/127.0.0.1_{web.port}/files/b.safetensors"]


def test_https_resume_after_a_cut(web, tmp_path):
    data = os.urandom(3 * MB)
    url = _serve(web, "r.safetensors", data, Fault(cut_at=MB + 123, cut_times=1))
    got = fetch(url, tmp_path)
    assert got.path.read_bytes() == data
    gets = web.requests("GET")
    kept = (MB + 123) // PLAIN_CHUNK * PLAIN_CHUNK  # the whole blocks read before the cut
    assert [g.range for g in gets] == [None, f"bytes={kept}-"] and gets[1].status == 206
    assert gets[1].if_range is not None  # resumes only the same file


def test_https_cut_every_time_leaves_nothing(web, tmp_path):
    url = _serve(web, "c.safetensors", os.urandom(2 * MB), Fault(cut_at=MB))
    msg = _fails(E.CUT, fetch, url, tmp_path)
    assert "cut off" in msg
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("status, kind, words", [
    (404, E.NOT_FOUND, "(404)"), (403, E.UNAUTHORIZED, "needs credentials"), (500, E.SERVER, "server error (500)")])
def test_https_errors(web, tmp_path, status, kind, words):
    url = _serve(web, "e.safetensors", b"x", Fault(status=status))
    assert words in _fails(kind, fetch, url, tmp_path)
    assert _leftovers(tmp_path) == []


def test_https_oversized_body_is_cut_at_the_cap(web, tmp_path):
    url = _serve(web, "huge.safetensors", bytes(48 * MB), Fault(no_length=True))
    msg = _fails(E.TOO_LARGE, fetch, url, tmp_path, max_bytes=MB)
    assert "the transfer passed" in msg and "over the cap of 1.0 MB" in msg  # stopped at the first read past it
    assert web.requests("GET")[0].sent < 32 * MB
    assert _leftovers(tmp_path) == []
    url = _serve(web, "big.safetensors", bytes(2 * MB))
    assert "announces 2.0 MB" in _fails(E.TOO_LARGE, fetch, url, tmp_path, max_bytes=MB)


def test_https_timeout(web, tmp_path):
    url = _serve(web, "slow.safetensors", b"x", Fault(stall=20))
    msg = _fails(E.TIMEOUT, fetch, url, tmp_path, timeout=1)
    assert "did not answer in time" in msg and "CALIBATT_HUB_TIMEOUT" in msg


def test_https_untrusted_certificate(web, tmp_path, clean_env):
    url = _serve(web, "t.safetensors", b"x")
    clean_env.delenv("REQUESTS_CA_BUNDLE")
    msg = _fails(E.TLS, fetch, url, tmp_path)
    assert "certificate" in msg and "REQUESTS_CA_BUNDLE" in msg


def test_https_no_network_and_dns(clean_env, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "Connection refused" in _fails(E.NO_NETWORK, fetch, f"https://127.0.0.1:{port}/b.safetensors", tmp_path)
    assert "could not be resolved" in _fails(E.DNS, fetch, "https://calibatt-test.invalid/b.safetensors", tmp_path)


def test_an_interrupt_stops_the_https_download_and_leaves_nothing(web, tmp_path):
    url = _serve(web, "i.safetensors", os.urandom(2 * MB))
    with pytest.raises(_Stop):
        fetch(url, tmp_path, progress=_stop_on_bytes)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- disk full
_DISK_FULL_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[2] + "/scripts")
import _pkg
_pkg.load_package()
from calibatt.hub.fetch import fetch
from calibatt.hub.errors import HubError
for ref in sys.argv[3:]:
    try:
        fetch(ref, sys.argv[1])
        print("ok")
    except HubError as e:
        print(e.kind, "|", e)
import os
print("files", sorted(f for _, _, fs in os.walk(sys.argv[1]) for f in fs if not f.endswith((".lock", ".gitignore",
      "CACHEDIR.TAG"))))
"""


def test_disk_full(hub, web, tmp_path):
    """A 256 KB file system (tmpfs in a private mount namespace): a known size is refused before writing, an
    unknown one fails when the disk fills; the message is the same and nothing is left."""
    if shutil.which("unshare") is None:
        pytest.skip("needs the unshare command (util-linux) for a private small file system")
    data = os.urandom(MB)
    hub.add_repo("calibatt-test/disk", {"d.safetensors": data})
    refs = ["hf://calibatt-test/disk/d.safetensors", _serve(web, "d.safetensors", data),
            _serve(web, "n.safetensors", data, Fault(no_length=True))]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = ["sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$1" && shift && exec "$@"', "sh", str(mnt),
           sys.executable, "-c", _DISK_FULL_SCRIPT, str(mnt), str(ROOT), *refs]
    env = dict(os.environ)
    out = None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        out = subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=300, env=env)
        if out.returncode == 0:
            break
    if out.returncode != 0 and "mount" in out.stderr:
        pytest.skip(f"cannot mount a small file system here: {out.stderr.strip()[-200:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert [line.split(" |")[0] for line in lines[:3]] == [E.DISK_FULL] * 3, out.stdout
    assert "1.0 MB needed" in lines[0] and "1.0 MB needed" in lines[1]  # refused before writing
    assert "no space left in" in lines[2] and "extra_model_paths.yaml" in lines[2]
    assert lines[3] == "files []", lines[3]


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_fetch(hub, bundle_bytes, tmp_path):
    out = subprocess.run([sys.executable, "-m", "hub", "fetch", f"hf://{REPO}/tiny.safetensors", "--models",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert f"hub/{REPO}/tiny.safetensors (downloaded" in out.stdout and "wan21: 2 layers" in out.stdout
    assert sha256_file(tmp_path / "hub" / REPO / "tiny.safetensors") == hashlib.sha256(bundle_bytes).hexdigest()
    out = subprocess.run([sys.executable, "-m", "hub", "fetch", f"hf://{REPO}/nope.safetensors", "--models",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 2 and "error: " in out.stderr and "does not exist" in out.stderr
