"""Collection: every file format, compression, bad input counted (not crashing), and URL
fetching against a local HTTP server on 127.0.0.1 (200, 404, timeout, robots, oversized,
schemes other than http(s), private addresses, one deadline for a trickled download)."""

from __future__ import annotations

import gzip
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.common import LmforgeError
from lmforge.config import FetchConfig, SourceConfig
from lmforge.data.collect import CollectStats, iter_documents


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

    def _trickle(self, data: bytes) -> None:
        try:
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the client gave up: what a deadline is for
            pass

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
        elif self.path.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(self.path[len("/redirect?") :]))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/trickle-body":  # a byte every 0.1 s: 3 s for the whole body
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "30")
            self.end_headers()
            self._trickle(b"x" * 30)
        elif self.path == "/trickle-headers":  # the same, before the headers are even complete
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._trickle(b"X-Slow: " + b"y" * 20 + b"\r\nContent-Length: 2\r\n\r\nok")
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
    fetch = FetchConfig(timeout_s=0.5, retries=1, max_bytes=100_000, allow_private_addresses=True)
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


LOCAL = FetchConfig(timeout_s=2.0, retries=0, allow_private_addresses=True)


def test_url_lists_fetch_only_http_and_https(tmp_path, server):
    secret = tmp_path / "secret.txt"
    secret.write_text("local file", encoding="utf-8")
    others = [
        secret.as_uri(),
        "file:///etc/passwd",
        "ftp://127.0.0.1:9/x",
        "data:,hello",
        "ok.html",
    ]
    urls = tmp_path / "list.urls"
    urls.write_text("\n".join([*others, server + "/ok.html"]) + "\n", encoding="utf-8")
    docs, stats = collect([urls], fetch=LOCAL)
    assert [d.text for d in docs] == [PAGE.decode()]
    assert [u["outcome"] for u in stats.urls] == ["bad_scheme"] * 5 + ["ok"]
    assert stats.counts["url_bad_scheme"] == 5 and stats.counts["url_ok"] == 1


def test_redirects_to_other_schemes_are_refused(server):
    targets = ["file:///etc/passwd", "ftp://127.0.0.1:9/x", "data:,hello", "/ok.html"]
    urls = [f"{server}/redirect?{urllib.parse.quote(t, safe='')}" for t in targets]
    docs, stats = collect(urls, fetch=LOCAL)
    assert [u["outcome"] for u in stats.urls] == ["bad_redirect"] * 3 + ["ok"]
    assert [d.text for d in docs] == [PAGE.decode()]  # a same-server redirect still works


def test_blocked_ip_classes():
    from lmforge.data.fetch import _blocked_ip

    blocked = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0"]
    blocked += ["224.0.0.1", "240.0.0.1", "100.100.100.200", "::1", "::", "fe80::1%eth0"]
    blocked += ["fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254"]
    assert [a for a in blocked if not _blocked_ip(a)] == []
    assert not any(_blocked_ip(a) for a in ["93.184.216.34", "2606:2800:220:1::1", "8.8.8.8"])


def test_private_addresses_are_blocked_unless_allowed(server):
    port = server.rsplit(":", 1)[1]
    hosts = ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0"]  # localhost: after DNS
    urls = [f"http://{h}:{port}/ok.html" for h in hosts]
    docs, stats = collect(urls, fetch=FetchConfig(timeout_s=2.0, retries=0))
    assert docs == [] and [u["outcome"] for u in stats.urls] == ["blocked_address"] * 4
    assert Handler.hits == {}  # not even robots.txt was asked for
    docs, stats = collect(urls[:2], fetch=LOCAL)
    assert [u["outcome"] for u in stats.urls] == ["ok", "ok"] and len(docs) == 2


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_one_deadline_covers_the_whole_download(server, path):
    fetch = FetchConfig(timeout_s=0.5, retries=0, allow_private_addresses=True)
    t0 = time.monotonic()
    docs, stats = collect([server + path], fetch=fetch)
    elapsed = time.monotonic() - t0
    assert [u["outcome"] for u in stats.urls] == ["timeout"] and docs == []
    assert elapsed < 1.5, f"a trickling server held the fetch for {elapsed:.1f} s"


def test_collect_and_read_utf8_text_share_one_binary_sniffer(tmp_path):
    from lmforge.fileio import SNIFF_BYTES, looks_binary, read_utf8_text

    inside = tmp_path / "inside.txt"
    inside.write_bytes(b"a" * (SNIFF_BYTES - 1) + b"\x00")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"a" * SNIFF_BYTES + b"\x00")
    assert looks_binary(inside.read_bytes()) and not looks_binary(outside.read_bytes())
    docs, stats = collect([inside])
    assert docs == [] and stats.counts["skipped_binary"] == 1
    with pytest.raises(LmforgeError, match="looks binary"):
        read_utf8_text(inside)
    docs, stats = collect([outside])
    assert len(docs) == 1 and stats.counts["skipped_binary"] == 0
    assert read_utf8_text(outside).endswith("\x00")


def test_a_record_slice_keeps_held_out_records_out(tmp_path):
    (tmp_path / "r.jsonl").write_text(
        "".join(json.dumps({"text": f"r{i}"}) + "\n" for i in range(10))
    )
    (tmp_path / "r.json").write_text(json.dumps([{"text": f"r{i}"} for i in range(10)]))
    for name in ("r.jsonl", "r.json"):
        docs, _ = collect([tmp_path / name], records=":7")
        assert [d.text for d in docs] == [f"r{i}" for i in range(7)]
        docs, _ = collect([tmp_path / name], records="8:")
        assert [d.text for d in docs] == ["r8", "r9"]
    with pytest.raises(LmforgeError, match="records"):
        collect([tmp_path / "r.json"], records="-1:")
