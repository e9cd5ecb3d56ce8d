"""Sources -> a stream of raw documents.

Reads files, folders (recursive), globs and URL lists; `.txt .md .jsonl .json .parquet .csv
.html/.htm`, each optionally `.gz`/`.zst`, any other file as plain text. Everything streams
(files a line, a record or a parquet batch at a time), so memory stays bounded whatever the
corpus size. Nothing here raises on bad content: binary files, invalid UTF-8, bad JSON lines,
missing columns and failed URLs are counted in `CollectStats` (and per URL in `urls`).
URLs are fetched over http(s) only, never from private or loopback addresses unless
`FetchConfig.allow_private_addresses`, and within one deadline each (see `UrlFetcher`).
"""

from __future__ import annotations

import csv
import functools
import glob
import gzip
import http.client
import io
import ipaddress
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.robotparser
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lmforge.common import LmforgeError
from lmforge.config import FetchConfig, SourceConfig
from lmforge.fileio import SNIFF_BYTES, looks_binary

TEXT, HTML = "text", "html"
COMPRESSED = {".gz", ".zst"}
URL_LIST_SUFFIX = ".urls"


@dataclass
class Document:
    text: str
    source: str
    origin: str
    """The file or URL it came from (for reports and debugging)."""
    kind: str = TEXT
    """text, or html (main text still to be extracted by the cleaning stage)."""


@dataclass
class CollectStats:
    counts: Counter = field(default_factory=Counter)
    urls: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[f"skipped_{reason}"] += 1
        if len(self.warnings) < 100:
            self.warnings.append(f"{where}: {reason}{' (' + detail + ')' if detail else ''}")


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _suffixes(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix): a/b.jsonl.zst -> ('.jsonl', '.zst')."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSED:
        return Path(path.stem).suffix.lower(), suffix
    return suffix, ""


def resolve_paths(paths: list[str]) -> list[str]:
    """Expand folders and globs into sorted file lists (URLs pass through). A path that does
    not exist is a user error, raised before any work starts."""
    out: list[str] = []
    for p in paths:
        if _is_url(p):
            out.append(p)
        elif any(ch in p for ch in "*?["):
            matches = sorted(m for m in glob.glob(p, recursive=True) if Path(m).is_file())
            if not matches:
                raise LmforgeError(f"no files match {p}")
            out += matches
        elif Path(p).is_dir():
            out += sorted(
                str(f)
                for f in Path(p).rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif Path(p).is_file():
            out.append(p)
        else:
            raise LmforgeError(f"input not found: {p} (expected a file, folder, glob or URL)")
    return out


def _open_binary(path: Path, compression: str) -> IO[bytes]:
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _decode(raw: bytes, src: SourceConfig, where: str, stats: CollectStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if src.on_invalid_utf8 == "skip":
            stats.skip("invalid_utf8", where)
            return None
        stats.counts["invalid_utf8_replaced"] += 1
        return raw.decode("utf-8", errors="replace")


def _join_fields(record: Any, fields: list[str]) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    parts = [record.get(f) for f in fields]
    if all(p is None for p in parts):
        return None
    return "\n\n".join(str(p) for p in parts if p not in (None, ""))


def _plain_docs(stream: IO[bytes], src: SourceConfig) -> Iterator[bytes]:
    """Cut a byte stream into documents at the configured boundaries, one line at a time."""
    buf: list[bytes] = []
    size = 0
    for line in stream:
        if src.split == "lines":
            if line.strip():
                yield line
            continue
        if src.split == "blank_lines" and not line.strip():
            if buf:
                yield b"".join(buf)
            buf, size = [], 0
            continue
        buf.append(line)
        size += len(line)
        if src.chunk_bytes and size >= src.chunk_bytes:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


def _read_file(path: Path, src: SourceConfig, stats: CollectStats) -> Iterator[Document]:
    fmt, compression = _suffixes(path)
    where = str(path)
    try:
        with _open_binary(path, compression) as f:
            head = f.read(SNIFF_BYTES)
            if looks_binary(head) and fmt != ".parquet":
                stats.skip("binary", where)
                return
            stream = io.BufferedReader(_Prefixed(head, f)) if fmt != ".parquet" else None
            stats.counts["files"] += 1
            if fmt == ".parquet":
                yield from _parquet(path, compression, src, stats)
            elif fmt == ".jsonl":
                yield from _jsonl(stream, src, stats, where)
            elif fmt == ".json":
                yield from _json(stream, src, stats, where)
            elif fmt == ".csv":
                yield from _csv(stream, src, stats, where)
            elif fmt in (".html", ".htm"):
                text = _decode(stream.read(), src, where, stats)
                if text is not None:
                    yield Document(text, src.name, where, HTML)
            else:
                for raw in _plain_docs(stream, src):
                    text = _decode(raw, src, where, stats)
                    if text is not None:
                        yield Document(text, src.name, where)
    except (OSError, EOFError, ValueError) as e:
        # Truncated archives, unreadable files: count and keep going with the next file.
        stats.skip("unreadable", where, str(e).splitlines()[0] if str(e) else type(e).__name__)


class _Prefixed(io.RawIOBase):
    """A raw stream that replays the sniffed head before the rest of the file."""

    def __init__(self, head: bytes, rest: IO[bytes]):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(b))
        b[: len(data)] = data
        return len(data)


def _record_document(
    record: Any, src: SourceConfig, stats: CollectStats, where: str
) -> Document | None:
    """A JSON record's text fields as a Document, or None (counted) when they are missing."""
    text = _join_fields(record, src.text_field)
    if text is None:
        stats.skip("missing_field", where, f"no {'/'.join(src.text_field)}")
        return None
    return Document(text, src.name, where)


def _jsonl(
    stream: IO[bytes], src: SourceConfig, stats: CollectStats, where: str
) -> Iterator[Document]:
    for lineno, raw in enumerate(stream, 1):
        if not raw.strip():
            continue
        line = _decode(raw, src, f"{where}:{lineno}", stats)
        if line is None:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats.skip("bad_json", f"{where}:{lineno}")
            continue
        doc = _record_document(record, src, stats, f"{where}:{lineno}")
        if doc is not None:
            yield doc


def _json(
    stream: IO[bytes], src: SourceConfig, stats: CollectStats, where: str
) -> Iterator[Document]:
    text = _decode(stream.read(), src, where, stats)
    if text is None:
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        stats.skip("bad_json", where, str(e))
        return
    if isinstance(data, dict):  # {"data": [...]} and similar single-list wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        stats.skip("bad_json", where, "expected a list of records")
        return
    for i, record in enumerate(data):
        doc = _record_document(record, src, stats, f"{where}[{i}]")
        if doc is not None:
            yield doc


def _csv(
    stream: IO[bytes], src: SourceConfig, stats: CollectStats, where: str
) -> Iterator[Document]:
    errors = "replace" if src.on_invalid_utf8 == "replace" else "strict"
    reader = csv.DictReader(io.TextIOWrapper(stream, encoding="utf-8", errors=errors, newline=""))
    missing = [f for f in src.text_field if f not in (reader.fieldnames or [])]
    if len(missing) == len(src.text_field):
        stats.skip("missing_column", where, f"no {'/'.join(missing)}; columns: {reader.fieldnames}")
        return
    try:
        for row in reader:
            text = _join_fields(row, src.text_field)
            if text:
                yield Document(text, src.name, where)
    except UnicodeDecodeError:
        stats.skip("invalid_utf8", where, "rest of the file")


def _parquet(
    path: Path, compression: str, src: SourceConfig, stats: CollectStats
) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = str(path)
    try:
        pf = pq.ParquetFile(_open_binary(path, compression) if compression else path)
    except (pa.ArrowException, OSError) as e:
        stats.skip("unreadable", where, str(e).splitlines()[0])
        return
    names = pf.schema_arrow.names
    columns = [c for c in src.text_field if c in names]
    if not columns:
        stats.skip(
            "missing_column",
            where,
            f"no column {'/'.join(src.text_field)}; columns: {', '.join(names)}",
        )
        return
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            text = _join_fields(record, columns)
            if text:
                yield Document(text, src.name, where)


# ---------------------------------------------------------------- URLs

_SCHEMES = ("http", "https")


class _Refused(Exception):
    """A fetch refused on purpose; `outcome` is its line in `stats.urls`. Not an OSError, so
    urllib passes it through unwrapped and it is never retried."""

    def __init__(self, outcome: str):
        super().__init__(outcome)
        self.outcome = outcome


def _blocked_ip(addr: str) -> bool:
    """Whether an address is one a crawler must not reach: private, loopback, link-local (the
    cloud metadata address 169.254.169.254), unspecified, multicast, reserved or otherwise not
    global (e.g. 100.64/10, where some clouds put metadata), IPv4-mapped IPv6 included."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])  # fe80::1%eth0: drop the zone
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
        or not ip.is_global
    )


class _Guard:
    """What every connection of one UrlFetcher checks: the address it reached, and the
    deadline of the download in progress (one for connect + headers + body + redirects)."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self.deadline = float("inf")

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("download took too long")
        return left

    def check_address(self, addr: str) -> None:
        if not self.allow_private and _blocked_ip(addr):
            raise _Refused("blocked_address")

    def check_host(self, host: str) -> None:
        """Through a proxy the peer is the proxy, so the target's own DNS answers are checked."""
        if self.allow_private:
            return
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError:
            return  # the proxy reports the failure
        for info in infos:
            self.check_address(str(info[4][0]))


class _DeadlineIO(io.RawIOBase):
    """A response's socket stream that gives every read only the time left before the
    deadline, so a server trickling bytes (headers or body) cannot stretch a download."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, guard: _Guard):
        self.raw, self.sock, self.guard = raw, sock, guard

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:
        self.sock.settimeout(self.guard.remaining())
        return self.raw.readinto(b)

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, guard: _Guard, **kwargs):
        super().__init__(sock, *args, **kwargs)
        # Keep the socket file's own reference (urllib closes the connection's socket right
        # after the headers and the body is read through this file).
        self.fp = io.BufferedReader(_DeadlineIO(self.fp.detach(), sock, guard))


def _guarded(base: type, guard: _Guard, check_peer: bool):
    """A connection class of `base` that connects within the deadline and refuses a blocked
    peer right after connecting, before a byte is sent (catching DNS rebinding and redirects
    to private hosts, which a check of the name alone would miss)."""

    class Connection(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = self._connect_checked
            self.response_class = functools.partial(_DeadlineResponse, guard=guard)

        def _connect_checked(self, address, timeout=None, source_address=None):
            sock = socket.create_connection(address, guard.remaining(), source_address)
            try:
                if check_peer:
                    guard.check_address(str(sock.getpeername()[0]))
                sock.settimeout(guard.remaining())
            except BaseException:
                sock.close()
                raise
            return sock

    return Connection


def _check_target(req: urllib.request.Request, guard: _Guard) -> bool:
    """-> whether to check the peer; through a proxy, checks the target's name instead."""
    if req.has_proxy() or req._tunnel_host:
        guard.check_host(urllib.parse.urlsplit(req.full_url).hostname or "")
        return False
    return True


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: _Guard):
        super().__init__()
        self.guard = guard

    def http_open(self, req):
        check_peer = _check_target(req, self.guard)
        return self.do_open(_guarded(http.client.HTTPConnection, self.guard, check_peer), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: _Guard):
        super().__init__()
        self.guard = guard

    def https_open(self, req):
        check_peer = _check_target(req, self.guard)
        conn = _guarded(http.client.HTTPSConnection, self.guard, check_peer)
        return self.do_open(conn, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only; anything else (file:, ftp:, data:) is refused."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target is not None:
            scheme = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, target)).scheme
            if scheme.lower() not in _SCHEMES:
                fp.close()
                raise _Refused("bad_redirect")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener(guard: _Guard) -> urllib.request.OpenerDirector:
    """Only the http(s) handlers (ours) and the plumbing: no file:, ftp: or data: handler."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _HTTPHandler(guard),
        _HTTPSHandler(guard),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class UrlFetcher:
    """Fetch URLs politely and safely: http(s) only (redirects too), no private addresses
    unless allowed, robots.txt (one read per host), one deadline per download, retries with
    backoff, a size cap. Every URL gets an outcome line in `stats.urls`."""

    def __init__(self, cfg: FetchConfig, stats: CollectStats):
        self.cfg, self.stats = cfg, stats
        self._robots: dict[str, urllib.robotparser.RobotFileParser | None] = {}
        self._guard = _Guard(cfg.allow_private_addresses)
        self._opener = _opener(self._guard)

    def _get(self, url: str) -> tuple[int, str, bytes]:
        """One GET -> (status, content type, body); raises on network errors, ValueError when
        the body is over the cap, TimeoutError past the deadline, _Refused when refused."""
        req = urllib.request.Request(url, headers={"User-Agent": self.cfg.user_agent})
        self._guard.deadline = time.monotonic() + self.cfg.timeout_s
        try:
            try:
                resp = self._opener.open(req, timeout=self.cfg.timeout_s)
            except urllib.error.HTTPError as e:
                e.close()
                return e.code, "", b""
            with resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.cfg.max_bytes:
                    raise ValueError("too_large")
                chunks, size = [], 0
                while chunk := resp.read1(65536):  # whatever has arrived; _DeadlineIO times it
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > self.cfg.max_bytes:
                        raise ValueError("too_large")
                return resp.status, resp.headers.get_content_type(), b"".join(chunks)
        finally:
            self._guard.deadline = float("inf")

    def _allowed(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        host = f"{parts.scheme}://{parts.netloc}"
        if host not in self._robots:
            parser = None
            try:
                status, _, body = self._get(f"{host}/robots.txt")
                if status == 200:
                    parser = urllib.robotparser.RobotFileParser()
                    parser.parse(body.decode("utf-8", errors="replace").splitlines())
            except (OSError, ValueError, http.client.HTTPException):
                parser = None  # no readable robots.txt: allowed, as crawlers conventionally do
            self._robots[host] = parser
        parser = self._robots[host]
        return parser is None or parser.can_fetch(self.cfg.user_agent, url)

    def _precheck(self, url: str) -> str | None:
        """An outcome for a URL refused before any connection, else None."""
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
        except ValueError:
            return "bad_scheme"
        if parts.scheme.lower() not in _SCHEMES or not host:
            return "bad_scheme"
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None  # a name: checked at connect time, against the address reached
        if self.cfg.allow_private_addresses or not _blocked_ip(host):
            return None
        return "blocked_address"

    def fetch(self, url: str) -> tuple[str, str, bytes]:
        """-> (outcome, content type, body); outcome is ok, http_<code>, timeout, too_large,
        robots_disallowed, bad_scheme (not http/https), bad_redirect (to such a scheme),
        blocked_address (a private or otherwise non-global address) or error."""
        if refused := self._precheck(url):
            return refused, "", b""
        try:
            if self.cfg.respect_robots and not self._allowed(url):
                return "robots_disallowed", "", b""
        except _Refused as e:
            return e.outcome, "", b""
        outcome = "error"
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(0.25 * 2**attempt, 5.0))
            try:
                status, ctype, body = self._get(url)
            except _Refused as e:
                return e.outcome, "", b""
            except ValueError:
                return "too_large", "", b""
            except (TimeoutError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                outcome = (
                    "timeout"
                    if isinstance(reason, TimeoutError) or "timed out" in str(e)
                    else "error"
                )
                continue
            if status == 200:
                return "ok", ctype, body
            outcome = f"http_{status}"
            if status < 500:
                break
        return outcome, "", b""


def _url_docs(
    url: str, src: SourceConfig, fetcher: UrlFetcher, stats: CollectStats
) -> Iterator[Document]:
    outcome, ctype, body = fetcher.fetch(url)
    stats.urls.append({"url": url, "outcome": outcome, "bytes": len(body)})
    stats.counts[f"url_{outcome}"] += 1
    if outcome != "ok":
        return
    if looks_binary(body):
        stats.skip("binary", url)
        return
    text = _decode(body, src, url, stats)
    if text is not None:
        is_html = ctype in ("text/html", "application/xhtml+xml") or url.lower().endswith(
            (".html", ".htm")
        )
        yield Document(text, src.name, url, HTML if is_html else TEXT)


def _url_list(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def iter_documents(
    src: SourceConfig, stats: CollectStats, fetch: FetchConfig | None = None
) -> Iterator[Document]:
    """Every document of one source, in a fixed order (sorted files, then record order)."""
    fetcher = UrlFetcher(fetch or FetchConfig(), stats)
    for p in resolve_paths(src.paths):
        if _is_url(p):
            yield from _url_docs(p, src, fetcher, stats)
        elif Path(p).suffix.lower() == URL_LIST_SUFFIX:
            for url in _url_list(Path(p)):
                yield from _url_docs(url, src, fetcher, stats)
        else:
            yield from _read_file(Path(p), src, stats)
