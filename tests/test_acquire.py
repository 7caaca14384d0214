"""`dgex acquire`: resumable, verified, atomic downloads against a local HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading

import pytest

from dgex import acquire
from dgex.acquire import download
from dgex.errors import DownloadError

PAYLOAD_BYTES = 300_000
DROP_AFTER = 100_000
WRONG_SHA = "0" * 64


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with Range support, plus failure switches set on the server."""

    server: _Server

    def do_GET(self):  # noqa: N802 (http.server naming)
        srv = self.server
        with srv.lock:
            srv.log.append({"path": self.path, "range": self.headers.get("Range")})
            n_request = len(srv.log)
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        chunk = body[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if n_request <= srv.drop_first:
            # announce the full length, send part of it, hang up: a dropped connection
            self.wfile.write(chunk[: srv.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)

    def log_message(self, *args):  # keep pytest output clean
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.drop_first = 0  # requests (counted from the first) that are cut short
        self.drop_after = DROP_AFTER  # body bytes those requests send before hanging up
        self.ignore_range = False  # answer 200 + whole file to Range requests

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(acquire, "BACKOFF_S", 0.0)


@pytest.fixture
def payload():
    data = os.urandom(PAYLOAD_BYTES)
    return data, hashlib.sha256(data).hexdigest()


def _get(url, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("timeout", 5.0)
    return download(url=url, output=out, **kw)


def _part(out):
    return out.with_name(out.name + ".part")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_plain_download_verifies_and_writes_sidecar(server, payload, tmp_path):
    data, digest = payload
    server.files["/f.bin"] = data
    out = tmp_path / "sub" / "f.bin"
    res = _get(server.url("/f.bin"), out, sha256=digest.upper(), size=len(data))
    assert out.read_bytes() == data
    assert res == {"path": str(out), "bytes": len(data), "sha256": digest, "resumed_from": 0}
    assert (tmp_path / "sub" / "f.bin.sha256").read_text() == f"{digest}  f.bin\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.bin", "f.bin.sha256"]  # no .part left
    assert server.log == [{"path": "/f.bin", "range": None}]


def test_resume_after_dropped_connection(server, payload, tmp_path):
    data, digest = payload
    server.files["/f.bin"] = data
    server.drop_first = 1
    out = tmp_path / "f.bin"
    res = _get(server.url("/f.bin"), out, sha256=digest, retries=2)
    assert out.read_bytes() == data and res["sha256"] == digest
    assert [r["range"] for r in server.log] == [None, f"bytes={DROP_AFTER}-"]
    assert not _part(out).exists()


def test_server_ignoring_range_restarts_from_zero(server, payload, tmp_path):
    data, digest = payload
    server.files["/f.bin"] = data
    server.drop_first, server.ignore_range = 1, True
    out = tmp_path / "f.bin"
    res = _get(server.url("/f.bin"), out, sha256=digest, retries=2)
    assert out.read_bytes() == data and res["sha256"] == digest
    assert server.log[1]["range"] == f"bytes={DROP_AFTER}-"  # asked to resume, got the whole file: no splice


def test_partial_is_resumed_by_a_later_call(server, payload, tmp_path):
    data, digest = payload
    server.files["/f.bin"] = data
    server.drop_first = 1
    out = tmp_path / "f.bin"
    with pytest.raises(DownloadError) as exc:
        _get(server.url("/f.bin"), out, sha256=digest, retries=0)
    msg = _one_line(exc)
    assert server.url("/f.bin") in msg and "rerun" in msg
    assert not out.exists() and _part(out).read_bytes() == data[:DROP_AFTER]

    res = _get(server.url("/f.bin"), out, sha256=digest, retries=0)
    assert out.read_bytes() == data
    assert res["resumed_from"] == DROP_AFTER and res["sha256"] == digest  # digest over the whole file
    assert server.log[-1]["range"] == f"bytes={DROP_AFTER}-"


def test_complete_partial_is_finished_on_416(server, payload, tmp_path):
    data, digest = payload
    server.files["/f.bin"] = data
    out = tmp_path / "f.bin"
    _part(out).write_bytes(data)  # e.g. killed between the last byte and the rename
    res = _get(server.url("/f.bin"), out, sha256=digest)
    assert out.read_bytes() == data and res["resumed_from"] == len(data)
    assert server.log[-1]["range"] == f"bytes={len(data)}-"


def test_partial_from_another_url_is_not_spliced(server, payload, tmp_path):
    data, digest = payload
    server.files["/a.bin"] = os.urandom(PAYLOAD_BYTES)
    server.files["/b.bin"] = data
    server.drop_first = 1
    out = tmp_path / "f.bin"
    with pytest.raises(DownloadError):
        _get(server.url("/a.bin"), out, retries=0)
    assert _part(out).stat().st_size == DROP_AFTER
    res = _get(server.url("/b.bin"), out, sha256=digest)
    assert out.read_bytes() == data and res["resumed_from"] == 0
    assert server.log[-1] == {"path": "/b.bin", "range": None}


def test_checksum_mismatch_leaves_nothing(server, payload, tmp_path):
    data, digest = payload
    server.files["/f.bin"] = data
    out = tmp_path / "f.bin"
    with pytest.raises(DownloadError) as exc:
        _get(server.url("/f.bin"), out, sha256=WRONG_SHA)
    msg = _one_line(exc)
    assert "sha256" in msg and WRONG_SHA in msg and digest in msg and str(out) in msg
    assert list(tmp_path.iterdir()) == []  # no output, no .part, no sidecar


def test_size_mismatch(server, payload, tmp_path):
    data, _ = payload
    server.files["/f.bin"] = data
    out = tmp_path / "f.bin"
    with pytest.raises(DownloadError) as exc:
        _get(server.url("/f.bin"), out, size=len(data) + 1)
    msg = _one_line(exc)
    assert str(len(data)) in msg and str(len(data) + 1) in msg and "size" in msg
    assert list(tmp_path.iterdir()) == []


def test_http_404(server, tmp_path):
    out = tmp_path / "f.bin"
    with pytest.raises(DownloadError) as exc:
        _get(server.url("/missing.bin"), out, retries=3)
    msg = _one_line(exc)
    assert "404" in msg and server.url("/missing.bin") in msg and "check the URL" in msg
    assert len(server.log) == 1  # not retried
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_is_retried_then_fails(tmp_path):
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as exc:
        _get(f"http://127.0.0.1:{port}/f.bin", tmp_path / "f.bin", retries=2)
    msg = _one_line(exc)
    assert "3 attempt(s)" in msg and "check the network" in msg


def test_file_url_and_plain_path(payload, tmp_path):
    data, digest = payload
    src = tmp_path / "src dir" / "f.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    for i, url in enumerate([src.as_uri(), str(src)]):
        out = tmp_path / f"out{i}.bin"
        res = _get(url, out, sha256=digest, size=len(data), chunk_bytes=65536)
        assert out.read_bytes() == data and res["sha256"] == digest
    out = tmp_path / "bad.bin"
    with pytest.raises(DownloadError):
        _get(src.as_uri(), out, sha256=WRONG_SHA)
    assert not out.exists() and not _part(out).exists()
    with pytest.raises(DownloadError) as exc:
        _get((tmp_path / "nope.bin").as_uri(), out)
    assert "not found" in _one_line(exc)


def test_already_present_is_not_downloaded_again(server, payload, tmp_path):
    data, digest = payload
    out = tmp_path / "f.bin"
    out.write_bytes(data)
    res = _get(server.url("/f.bin"), out, sha256=digest, size=len(data))
    assert res["sha256"] == digest and res["bytes"] == len(data)
    assert server.log == []
    assert (tmp_path / "f.bin.sha256").read_text() == f"{digest}  f.bin\n"


def test_existing_corrupt_output_is_an_error(server, payload, tmp_path):
    data, _ = payload
    out = tmp_path / "f.bin"
    out.write_bytes(data)
    with pytest.raises(DownloadError) as exc:
        _get(server.url("/f.bin"), out, sha256=WRONG_SHA)
    msg = _one_line(exc)
    assert "delete it" in msg and str(out) in msg
    with pytest.raises(DownloadError) as exc:
        _get(server.url("/f.bin"), out, size=len(data) - 1)
    assert "delete it" in _one_line(exc)
    assert out.read_bytes() == data and server.log == []


def test_cli_checksum_mismatch_is_one_line(server, payload, tmp_path):
    data, _ = payload
    server.files["/f.bin"] = data
    out = tmp_path / "f.bin"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "dgex",
            "acquire",
            "--url",
            server.url("/f.bin"),
            "--output",
            str(out),
            "--sha256",
            WRONG_SHA,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgex: error:") and "sha256" in lines[0], res.stderr
    assert not out.exists() and not _part(out).exists()
