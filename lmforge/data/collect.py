"""Sources -> a stream of raw documents.

Reads files, folders (recursive), globs and URL lists; `.txt .md .jsonl .json .parquet .csv
.html/.htm`, each optionally `.gz`/`.zst`, any other file as plain text. Everything streams
(files a line, a record or a parquet batch at a time), so memory stays bounded whatever the
corpus size. Nothing here raises on bad content: binary files, invalid UTF-8, bad JSON lines,
missing columns and failed URLs are counted in `CollectStats` (and per URL in `urls`).
URLs are fetched by `fetch.UrlFetcher` (http(s) only, no private addresses, one deadline).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lmforge.common import LmforgeError
from lmforge.config import FetchConfig, SourceConfig, record_slice
from lmforge.data.fetch import UrlFetcher
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
            records = None
            if fmt == ".parquet":
                records = _parquet(path, compression, src, stats)
            elif fmt == ".jsonl":
                records = _jsonl(stream, src, stats, where)
            elif fmt == ".json":
                records = _json(stream, src, stats, where)
            elif fmt == ".csv":
                records = _csv(stream, src, stats, where)
            if records is not None:
                wanted = record_slice(src.records, f"source {src.name!r}: records")
                yield from itertools.islice(records, wanted.start, wanted.stop)
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
