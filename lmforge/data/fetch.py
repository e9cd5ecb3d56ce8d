"""Fetching URL sources politely and safely.

`UrlFetcher` reads robots.txt once per host, retries timeouts, connection errors and 5xx
answers with backoff, and caps the body size. It fetches over http(s) only (redirects
included), never from private, loopback, link-local or metadata addresses unless
`FetchConfig.allow_private_addresses` (checked on the address actually connected to, so DNS
rebinding and redirects are caught too), and within one deadline for connect, headers and
body together, so a server that trickles bytes cannot hold a fetch past `timeout_s`.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.robotparser
from typing import TYPE_CHECKING

from lmforge.config import FetchConfig

if TYPE_CHECKING:
    from lmforge.data.collect import CollectStats

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
