"""Collection: every file format, compression, bad input counted (not crashing), and URL
fetching against a local HTTP server on 127.0.0.1 (200, 404, timeout, robots, oversized)."""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.common import LmforgeError
from lmforge.data.collect import CollectStats, FetchConfig, SourceConfig, iter_documents


def collect(paths, fetch=None, **kw):
    stats = CollectStats()
    docs = list(
        iter_documents(SourceConfig(name="s", paths=[str(p) for p in paths], **kw), stats, fetch)
    )
    return docs, stats


def test_every_format_plain_and_compressed(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file", encoding="utf-8")
    (tmp_path / "b.md").write_text("# markdown", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    (tmp_path / "d.json").write_text(
        json.dumps([{"text": "three"}, {"text": "four"}]), encoding="utf-8"
    )
    (tmp_path / "e.csv").write_text('id,text\n1,"five, with comma"\n', encoding="utf-8")
    (tmp_path / "f.html").write_text("<p>six</p>", encoding="utf-8")
    pq.write_table(pa.table({"text": ["seven", "eight"], "n": [1, 2]}), tmp_path / "g.parquet")
    with gzip.open(tmp_path / "h.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "nine"}\n')
    (tmp_path / "i.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"ten"))
    (tmp_path / ".hidden").write_text("never read", encoding="utf-8")
    docs, stats = collect([tmp_path])
    texts = sorted(d.text for d in docs)
    assert texts == sorted(
        [
            "plain text file",
            "# markdown",
            "one",
            "two",
            "three",
            "four",
            "five, with comma",
            "<p>six</p>",
            "seven",
            "eight",
            "nine",
            "ten",
        ]
    )
    assert next(d for d in docs if d.text == "<p>six</p>").kind == "html"
    assert stats.counts["files"] == 9


def test_text_fields_are_configurable_and_joined(tmp_path):
    path = tmp_path / "inst.json"
    path.write_text(
        json.dumps([{"instruction": "Add", "input": "", "output": "2"}, {"other": 1}]),
        encoding="utf-8",
    )
    docs, stats = collect([path], text_field=["instruction", "input", "output"])
    assert [d.text for d in docs] == ["Add\n\n2"]
    assert stats.counts["skipped_missing_field"] == 1


def test_splitting_plain_text_into_documents(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("para one\nstill one\n\npara two\n\n\npara three\n", encoding="utf-8")
    assert [d.text for d in collect([path], split="blank_lines")[0]] == [
        "para one\nstill one\n",
        "para two\n",
        "para three\n",
    ]
    assert len(collect([path], split="lines")[0]) == 4
    assert [len(d.text) for d in collect([path], chunk_bytes=10)[0]] == [
        19,
        10,
        13,
    ]  # cut at line ends


def test_bad_inputs_are_counted_skips(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "latin1.txt").write_bytes("café ok".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    docs, stats = collect([tmp_path])
    assert [d.text for d in docs] == ["fine", "caf\ufffd ok"]
    c = stats.counts
    assert (
        c["skipped_binary"] == 1 and c["invalid_utf8_replaced"] == 1 and c["skipped_bad_json"] == 1
    )
    assert c["skipped_missing_column"] == 1 and c["skipped_unreadable"] == 1
    assert any(
        "nocol.parquet: missing_column (no column text; columns: body)" in w for w in stats.warnings
    )
    docs, stats = collect([tmp_path / "latin1.txt"], on_invalid_utf8="skip")
    assert docs == [] and stats.counts["skipped_invalid_utf8"] == 1


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="input not found: .*nope"):
        collect([tmp_path / "nope"])
    with pytest.raises(LmforgeError, match="no files match"):
        collect([tmp_path / "*.txt"])


# ---------------------------------------------------------------- URLs

PAGE = b"<html><body><article><p>Hello from the local server.</p></article></body></html>"


class Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "text/html") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path == "/robots.txt":
            self._send(200, b"User-agent: *\nDisallow: /private/\n", "text/plain")
        elif self.path in ("/ok.html", "/private/secret.html"):
            self._send(200, PAGE)
        elif self.path == "/plain":
            self._send(200, b"just text", "text/plain")
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, PAGE)
        elif self.path == "/big":
            self._send(200, b"x" * 200_000, "text/plain")
        elif self.path == "/flaky":
            code = 503 if Handler.hits[self.path] == 1 else 200
            self._send(code, PAGE)
        else:
            self._send(404, b"not found")


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    Handler.hits = {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_outcomes_against_a_local_server(tmp_path, server):
    urls = tmp_path / "list.urls"
    paths = ["/ok.html", "/plain", "/missing", "/slow", "/private/secret.html", "/big", "/flaky"]
    urls.write_text("# comment\n" + "\n".join(server + p for p in paths) + "\n", encoding="utf-8")
    fetch = FetchConfig(timeout_s=0.5, retries=1, max_bytes=100_000)
    t0 = time.monotonic()
    docs, stats = collect([urls], fetch=fetch)
    assert time.monotonic() - t0 < 10
    outcomes = {u["url"][len(server) :]: u["outcome"] for u in stats.urls}
    assert outcomes == {
        "/ok.html": "ok",
        "/plain": "ok",
        "/missing": "http_404",
        "/slow": "timeout",
        "/private/secret.html": "robots_disallowed",
        "/big": "too_large",
        "/flaky": "ok",
    }
    assert [(d.kind, d.text) for d in docs] == [
        ("html", PAGE.decode()),
        ("text", "just text"),
        ("html", PAGE.decode()),
    ]
    assert Handler.hits["/robots.txt"] == 1 and Handler.hits["/missing"] == 1  # no retry on 4xx
    assert "/private/secret.html" not in Handler.hits and Handler.hits["/flaky"] == 2
