"""Download one input file: resumable, verified, atomic.

The paper-scale inputs are large (the GEO GCTX alone is 11.5 GB), so a broken
connection must not cost the whole transfer.  :func:`download` writes into
``<output>.part`` (kept across runs), resumes it with an HTTP ``Range``
request, verifies size and SHA-256, and only then renames it onto ``output``.
A file at ``output`` is therefore always complete and verified.

Beside the partial file lives ``<output>.part.json`` (the source URL and the
server's validator), so a partial from another URL is never spliced onto, and
``If-Range`` makes the server send the whole file again if it changed.

Every failure is a :class:`~dgex.errors.DownloadError` with a one-line message
(problem + fix), which the CLI prints as ``dgex: error: ...``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3
from tqdm import tqdm

from . import __version__
from .errors import ConfigError, DownloadError
from .io import ensure_dir, storage_error, write_json, write_text
from .settings import AcquireSettings

log = logging.getLogger(__name__)

#: Seconds before the first retry; doubled for each further one (tests set it to 0).
BACKOFF_S = 1.0
#: Upper bound of one retry delay.
MAX_BACKOFF_S = 30.0
#: Restarts from byte 0 (server ignored or mangled a Range request) allowed per call.
MAX_RESTARTS = 3
#: HTTP statuses worth retrying: the server is busy or briefly broken, the URL is fine.
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


class _Transient(Exception):
    """A failure worth retrying (connection lost, timeout, short body, 5xx)."""


class _Restart(Exception):
    """The partial file cannot be resumed; it was discarded, start again from byte 0."""


@dataclass
class _State:
    """What one :func:`download` call carries from attempt to attempt."""

    hasher: Any = None  # sha256 over exactly the first `hashed` bytes of the partial, or None
    hashed: int = 0
    total: int | None = None  # size announced by the source, when known
    restarts: int = 0
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
def download(
    url: str,
    output: str | os.PathLike,
    *,
    sha256: str | None = None,
    size: int | None = None,
    timeout: float = 60.0,
    retries: int = 5,
    progress: bool = True,
    chunk_bytes: int = 1 << 20,
) -> dict:
    """Download ``url`` to ``output``, resuming ``<output>.part`` and verifying the result.

    Parameters
    ----------
    url
        ``http://``, ``https://`` or ``file://`` URL, or a plain local path
        (a local source is copied with the same resume and verification).
    output
        Destination file.  It appears only once complete and verified.
    sha256
        Expected SHA-256 hex digest; ``None`` skips the check (the digest is
        still computed and recorded).
    size
        Expected size in bytes; ``None`` checks against the size the server
        announces, when it announces one.
    timeout
        Connect and read timeout of each network operation, in seconds.
    retries
        Further attempts after a connection error, timeout, short read or 5xx
        answer; each resumes from the partial file.  ``0`` means one attempt.
    progress
        Show a byte progress bar on stderr.
    chunk_bytes
        Read/write block size.

    Returns
    -------
    dict
        ``path`` (str), ``bytes`` (int), ``sha256`` (hex str) and
        ``resumed_from`` (bytes of ``<output>.part`` reused from an earlier
        run; 0 for a fresh download or an output that was already present).
        The digest is also written to ``<output>.sha256`` in ``sha256sum`` format.

    Raises
    ------
    DownloadError
        The source cannot be reached or read, or the file does not verify.
    ConfigError
        ``sha256`` is not a 64-digit hex string, or another setting is out of range
        (:class:`~dgex.settings.AcquireSettings`).
    """
    output = Path(output)
    expected = _check_sha256(sha256)  # blank: no check; case and surrounding spaces do not matter
    AcquireSettings.check({**locals(), "sha256": expected})
    if output.is_dir():
        raise DownloadError(f"{output}: is a directory; give a file name as the download output")
    if output.exists():
        return _already_present(output, expected, size)

    source = _parse_source(url)
    part = output.with_name(output.name + ".part")
    meta_path = output.with_name(output.name + ".part.json")
    ensure_dir(output.parent)
    resumed_from = _reusable_partial(part, meta_path, url, size)
    if resumed_from:
        log.info("resuming %s from %d bytes (%s)", output.name, resumed_from, part)
    else:
        log.debug("downloading %s -> %s", url, output)

    state = _State()
    failures = 0
    session = requests.Session() if isinstance(source, str) else None
    try:
        while True:
            try:
                if session is not None:
                    _fetch_http(
                        session,
                        source,
                        part,
                        meta_path,
                        state,
                        size=size,
                        timeout=timeout,
                        chunk_bytes=chunk_bytes,
                        progress=progress,
                    )
                else:
                    _fetch_file(
                        source, url, part, meta_path, state, size=size, chunk_bytes=chunk_bytes, progress=progress
                    )
                break
            except _Restart as exc:
                state.restarts += 1
                if state.restarts > MAX_RESTARTS:
                    raise DownloadError(
                        f"{url}: could not resume ({exc}) {MAX_RESTARTS} times in a row; "
                        f"delete {part} and rerun, or download the file by hand"
                    ) from None
                log.info("%s; starting again from byte 0", exc)
            except _Transient as exc:
                have = _size_of(part)
                if failures >= retries:
                    fix = (
                        f"rerun the same command to resume from byte {have} (kept in {part})"
                        if have
                        else "check the network and the URL, then rerun"
                    )
                    raise DownloadError(
                        f"{url}: download failed after {failures + 1} attempt(s) ({exc}); {fix}"
                    ) from None
                failures += 1
                delay = min(BACKOFF_S * 2 ** (failures - 1), MAX_BACKOFF_S)
                log.warning(
                    "%s: %s; retry %d/%d in %.0f s from byte %d", output.name, exc, failures, retries, delay, have
                )
                time.sleep(delay)
    finally:
        if session is not None:
            session.close()

    got = _size_of(part)
    want, announced_by = (size, "the configured size") if size is not None else (state.total, "the server")
    if want is not None and got != want:
        _discard(part, meta_path)
        fix = (
            "check the size in the config (or delete it to skip the check)"
            if size is not None
            else "rerun to download it again"
        )
        raise DownloadError(f"{output}: downloaded {got} bytes but {announced_by} says {want}; {fix}")
    if state.hasher is not None and state.hashed == got:
        digest = state.hasher.hexdigest()
    else:  # resumed from an earlier run: the first bytes were never hashed in this process
        digest = _hash_file(part, chunk_bytes)
    if expected is not None and digest != expected:
        _discard(part, meta_path)
        raise DownloadError(
            f"{output}: sha256 mismatch for {url} (expected {expected}, got {digest}); "
            f"check the sha256 in the config or delete it to skip verification"
        )
    try:
        os.replace(part, output)
    except OSError as exc:
        raise storage_error(exc, output) from None
    with contextlib.suppress(FileNotFoundError):
        meta_path.unlink()
    _write_sidecar(output, digest)
    log.info(
        "downloaded %s (%d bytes, sha256 %s%s)",
        output,
        got,
        digest,
        ", verified" if expected else ", not verified: no sha256 given",
    )
    return {"path": str(output), "bytes": got, "sha256": digest, "resumed_from": resumed_from}


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in blocks."""
    return _hash_file(Path(path), chunk_bytes)


# --------------------------------------------------------------------------- #
# checks before any transfer
# --------------------------------------------------------------------------- #
def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None or not str(sha256).strip():
        return None
    digest = str(sha256).strip().lower()
    if not _SHA256_RE.match(digest):
        raise ConfigError(
            f"sha256 must be 64 hexadecimal digits, got {_one_line(digest, 80)!r}; "
            f"fix it in the config or leave it empty to skip verification"
        )
    return digest


def _already_present(output: Path, expected: str | None, size: int | None) -> dict:
    """Verify an existing ``output`` instead of downloading it again."""
    got = output.stat().st_size
    if size is not None and got != size:
        raise DownloadError(
            f"{output}: already exists but has {got} bytes, expected {size}; "
            f"delete it to download it again (or fix the size in the config)"
        )
    digest = _hash_file(output)
    if expected is not None and digest != expected:
        raise DownloadError(
            f"{output}: already exists but its sha256 is {digest}, expected {expected}; "
            f"delete it to download it again (or fix the sha256 in the config)"
        )
    _write_sidecar(output, digest)
    log.info("%s already present (%d bytes, sha256 %s); not downloading", output, got, digest)
    return {"path": str(output), "bytes": got, "sha256": digest, "resumed_from": 0}


def _parse_source(url: str) -> str | Path:
    """An http(s) URL stays a string; ``file://`` URLs and plain paths become a :class:`Path`."""
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not parsed.netloc:
            raise DownloadError(f"{url}: URL has no host; check the URL in the config")
        return url
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DownloadError(
                f"{url}: file:// URLs must name a local file (file:///path); check the URL in the config"
            )
        return Path(urllib.request.url2pathname(parsed.path))
    if scheme == "":
        return Path(url)
    raise DownloadError(f"{url}: unsupported URL scheme {scheme!r}; use http(s)://, file:// or a local path")


def _reusable_partial(part: Path, meta_path: Path, url: str, size: int | None) -> int:
    """Bytes of ``part`` that may be resumed; discard a partial that cannot belong to this download."""
    have = _size_of(part)
    if not have:
        return 0
    meta = _read_meta(meta_path)
    if meta.get("url") not in (None, url):
        log.info("discarding %s: it was downloaded from %s, not %s", part, meta["url"], url)
        _discard(part, meta_path)
        return 0
    if size is not None and have > size:
        log.info("discarding %s: %d bytes is more than the expected %d", part, have, size)
        _discard(part, meta_path)
        return 0
    return have


# --------------------------------------------------------------------------- #
# one attempt
# --------------------------------------------------------------------------- #
def _fetch_http(
    session: requests.Session,
    url: str,
    part: Path,
    meta_path: Path,
    state: _State,
    *,
    size: int | None,
    timeout: float,
    chunk_bytes: int,
    progress: bool,
) -> None:
    """One HTTP request that appends the rest of the file to ``part``.

    Returns when the body is complete; raises :class:`_Transient` or
    :class:`_Restart` for the caller's retry loop, :class:`DownloadError` when
    retrying cannot help.
    """
    have = _size_of(part)
    # identity: the bytes on disk must be the file's bytes (a .gz stays gzipped),
    # and Range offsets then count those bytes.
    headers = {"Accept-Encoding": "identity", "User-Agent": f"dgex/{__version__} (+requests)"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = _read_meta(meta_path).get("validator")
        if validator:  # the server answers 200 (whole file) if it changed since
            headers["If-Range"] = validator
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except (
        requests.exceptions.InvalidURL,
        requests.exceptions.InvalidSchema,
        requests.exceptions.MissingSchema,
        requests.exceptions.TooManyRedirects,
    ) as exc:
        raise DownloadError(f"{url}: {_one_line(exc)}; check the URL in the config") from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise _Transient(_reason(exc)) from None

    with resp:
        status = resp.status_code
        if status == 416 and have:
            # Nothing left after byte `have`: complete if that is the whole file.
            total = _content_range(resp.headers.get("Content-Range"))[2]
            if have == (total if total is not None else size):
                state.total = total
                return
            _discard(part, meta_path)
            raise _Restart(f"server refused to resume {part.name} at byte {have} (HTTP 416)")
        if status in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {status} {resp.reason or ''}".strip())
        if status >= 400:
            reason = f" {resp.reason}" if resp.reason else ""
            raise DownloadError(f"HTTP {status}{reason} for {url}; check the URL in the config")
        if status not in (200, 206):
            raise DownloadError(f"unexpected HTTP {status} for {url}; check the URL in the config")

        if status == 206:
            start, _end, total = _content_range(resp.headers.get("Content-Range"))
            if start != have:
                _discard(part, meta_path)
                raise _Restart(f"server answered a request for byte {have} with byte {start}")
        else:
            if have:
                log.info(
                    "%s: server sent the whole file instead of resuming at byte %d; starting again from 0", url, have
                )
            start, total = 0, _int_or_none(resp.headers.get("Content-Length"))
            if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                total = None  # Content-Length counts encoded bytes; we store them, but don't trust the count

        _check_announced(total, size, url, part, meta_path)
        state.total = total
        if start == 0:
            validator = resp.headers.get("ETag")
            if not validator or validator.startswith("W/"):  # If-Range needs a strong validator
                validator = resp.headers.get("Last-Modified")
            write_json(meta_path, {"url": url, "validator": validator})
        _write_body(_http_chunks(resp, chunk_bytes), part, start, total, state, progress)


def _fetch_file(
    src: Path,
    url: str,
    part: Path,
    meta_path: Path,
    state: _State,
    *,
    size: int | None,
    chunk_bytes: int,
    progress: bool,
) -> None:
    """Copy a local file into ``part``, resuming like an HTTP Range request."""
    if not src.is_file():
        raise DownloadError(f"{src}: source file not found; check the URL in the config")
    total = src.stat().st_size
    _check_announced(total, size, url, part, meta_path)
    have = _size_of(part)
    if have > total:
        _discard(part, meta_path)
        have = 0
    state.total = total
    if have == 0:
        write_json(meta_path, {"url": url, "validator": None})
    try:
        fh = open(src, "rb")  # noqa: SIM115 -- entered below: only the open itself gets this error message
    except OSError as exc:
        raise DownloadError(f"{src}: cannot read the source ({_one_line(exc)}); check the URL in the config") from None
    with fh:
        fh.seek(have)
        _write_body(_file_chunks(fh, src, chunk_bytes), part, have, total, state, progress)


def _check_announced(total: int | None, size: int | None, url: str, part: Path, meta_path: Path) -> None:
    """Fail before transferring gigabytes when the source's size already contradicts the config."""
    if total is not None and size is not None and total != size:
        _discard(part, meta_path)
        raise DownloadError(
            f"{url}: the source has {total} bytes but the configured size is {size}; "
            f"check the size and URL in the config (or delete the size to skip the check)"
        )


def _write_body(
    chunks: Iterable[bytes], part: Path, start: int, total: int | None, state: _State, progress: bool
) -> None:
    """Write ``chunks`` into ``part`` from byte ``start``, hashing and showing progress."""
    if start == 0:
        state.hasher, state.hashed = hashlib.sha256(), 0
    elif state.hasher is not None and state.hashed != start:
        state.hasher = None  # out of step with the file: hash the whole file at the end instead
    got = start
    bar = tqdm(
        total=total,
        initial=start,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        desc=part.name.removesuffix(".part"),
        disable=not progress,
        leave=False,
    )
    try:
        with bar, open(part, "r+b" if start else "wb") as fh:
            fh.seek(start)
            fh.truncate()  # a resumed partial must end exactly where the new bytes begin
            for chunk in chunks:
                fh.write(chunk)
                if state.hasher is not None:
                    state.hasher.update(chunk)
                    state.hashed += len(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    except OSError as exc:  # network errors were turned into _Transient by `chunks`
        output = part.with_name(part.name.removesuffix(".part"))
        raise storage_error(exc, output, what=f"the partial download {part.name}, kept to resume from") from None
    if total is not None and got < total:
        raise _Transient(f"connection closed after {got} of {total} bytes")
    if total is not None and got > total:
        part.unlink()
        raise _Restart(f"received {got} bytes, more than the {total} announced")


def _http_chunks(resp: requests.Response, chunk_bytes: int) -> Iterator[bytes]:
    """Raw body bytes (no content decoding); network failures become :class:`_Transient`."""
    try:
        yield from resp.raw.stream(chunk_bytes, decode_content=False)
    except (
        urllib3.exceptions.HTTPError,
        requests.exceptions.RequestException,
        http.client.HTTPException,
        OSError,
    ) as exc:
        raise _Transient(_reason(exc)) from None


def _file_chunks(fh, src: Path, chunk_bytes: int) -> Iterator[bytes]:
    while True:
        try:
            chunk = fh.read(chunk_bytes)
        except OSError as exc:
            raise DownloadError(f"{src}: read error ({_one_line(exc)}); check the source file") from None
        if not chunk:
            return
        yield chunk


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #
def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``(start, end, total)`` of a ``Content-Range`` header; ``None`` for parts that are absent or ``*``."""
    m = _CONTENT_RANGE_RE.match(value or "")
    if not m:
        return None, None, None
    start, end, total = m.groups()
    return (_int_or_none(start), _int_or_none(end), _int_or_none(total))


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _discard(part: Path, meta_path: Path) -> None:
    for path in (part, meta_path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _hash_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _write_sidecar(output: Path, digest: str) -> None:
    """``<output>.sha256`` in ``sha256sum -c`` format, so the run records what it used."""
    sidecar = output.with_name(output.name + ".sha256")
    text = f"{digest}  {output.name}\n"
    with contextlib.suppress(OSError):
        if sidecar.read_text() == text:
            return
    write_text(sidecar, text)


def _reason(exc: BaseException) -> str:
    """Readable reason of a network exception (urllib3 wraps a message and the cause in a tuple)."""
    first = exc.args[0] if exc.args else None
    text = first if isinstance(first, str) else str(exc)
    if isinstance(first, BaseException) and not str(exc).strip():
        text = str(first)
    return _one_line(text) or type(exc).__name__


def _one_line(value: object, limit: int = 300) -> str:
    """Collapse an exception or text to one short line (error messages must stay one line)."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
