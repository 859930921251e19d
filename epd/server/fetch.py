"""Fetching http(s) image URLs without becoming a proxy into the private network (SSRF).

Every hop (the URL and each redirect) is resolved here, and refused unless every address
the name resolves to is public; the connection then goes to the address we checked, not to
a second lookup an attacker's DNS could answer differently (rebinding). TLS still verifies
the certificate against the host name.

    url --resolve--> addresses --all public?--> connect(checked address) --> status
        3xx: next hop (at most max_redirects)   200: body, at most max_bytes, by the deadline

Runs in the input-processing thread, so it may block; one deadline bounds the whole fetch.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from epd.inputs.errors import InvalidInputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 << 10


def is_public_address(ip: IPAddress) -> bool:
    """Globally routable unicast: not private, loopback, link-local, multicast, reserved or unspecified."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback)


@dataclass(frozen=True)
class RemoteMediaFetcher:
    """`fetcher(url, max_bytes) -> bytes` for `InputLimits.remote_fetcher`.

    Raises InvalidInputError for every failure (refused address, HTTP error, too large, too
    slow, too many redirects): the URL is the client's, so the problem is theirs.
    `allow_address` is the address policy; tests swap it to reach a loopback server.
    """

    timeout_s: float = 10.0
    max_redirects: int = 3
    default_max_bytes: int = 32 << 20
    allow_address: Callable[[IPAddress], bool] = field(default=is_public_address)

    def __call__(self, url: str, max_bytes: int | None = None) -> bytes:
        limit = self.default_max_bytes if max_bytes is None else max_bytes
        deadline = time.monotonic() + self.timeout_s
        try:
            for _ in range(self.max_redirects + 1):
                status, location, body = self._get(url, limit, deadline)
                if status not in _REDIRECTS:
                    if status != 200:
                        raise InvalidInputError(f"fetching image {_short(url)} failed: HTTP {status}")
                    return body
                if not location:
                    raise InvalidInputError(f"image URL {_short(url)} redirected without a Location")
                url = urllib.parse.urljoin(url, location)
        except TimeoutError:
            raise InvalidInputError(
                f"fetching image {_short(url)} timed out after {self.timeout_s:g} s"
            ) from None
        except (OSError, http.client.HTTPException, UnicodeError) as e:
            raise InvalidInputError(f"cannot fetch image {_short(url)}: {e}") from None
        raise InvalidInputError(f"image URL {_short(url)} redirected more than {self.max_redirects} times")

    def _get(self, url: str, limit: int, deadline: float) -> tuple[int, str | None, bytes]:
        """(status, Location, body) of one GET; the body only for a 200."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInputError(f"image URL {_short(url)} must be http(s)://host/...")
        port = parts.port or (443 if scheme == "https" else 80)
        address = self._resolve(parts.hostname, port)
        conn = _PinnedConnection.open(scheme, parts.hostname, port, address, _remaining(deadline))
        try:
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            conn.request("GET", path, headers={"Accept": "image/*", "Accept-Encoding": "identity"})
            response = conn.getresponse()
            if response.status != 200:
                return response.status, response.getheader("Location"), b""
            return 200, None, _read_limited(conn, response, limit, deadline)
        finally:
            conn.close()

    def _resolve(self, host: str, port: int) -> str:
        """One address to connect to, after checking every address the name has."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise InvalidInputError(f"cannot resolve image host {host!r}: {e.strerror}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        refused = [a for a in addresses if not self.allow_address(a)]
        if not addresses or refused:
            raise InvalidInputError(
                f"image host {host!r} resolves to a private, loopback or otherwise non-public address; "
                "remote media may only come from public addresses"
            )
        return str(addresses[0])


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTP(S) to a checked address, with Host header and TLS name check for the real host."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: bool) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address, self._tls = address, tls
        self.default_port = 443 if tls else 80  # the Host header names the port only when unusual

    @classmethod
    def open(cls, scheme: str, host: str, port: int, address: str, timeout: float) -> _PinnedConnection:
        return cls(host, port, address, timeout, tls=scheme == "https")

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host) if self._tls else sock
        # http.client drops `self.sock` when the server says "Connection: close"; the response
        # still reads from this socket, whose timeout we keep adjusting.
        self.raw_sock = self.sock


def _read_limited(
    conn: _PinnedConnection, response: http.client.HTTPResponse, limit: int, deadline: float
) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise InvalidInputError(f"remote image is too large: {length} bytes > limit {limit}")
    chunks, total = [], 0
    while True:
        conn.raw_sock.settimeout(_remaining(deadline))  # a slow trickle cannot outlast the deadline
        # read1: at most one recv, so a trickle of bytes returns here and meets the deadline
        # (read() would keep filling its buffer, each recv well within the socket timeout).
        chunk = response.read1(min(_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise InvalidInputError(f"remote image is too large: more than {limit} bytes")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _short(url: str, keep: int = 100) -> str:
    return url if len(url) <= keep else url[:keep] + "..."
