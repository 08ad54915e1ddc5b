"""ASGI middleware that keeps ``littune serve`` to the hosts it was started for and to its own page.

Two attacks reach a server on 127.0.0.1 from a web page the user opens elsewhere:

* **DNS rebinding**: a page on ``evil.example`` re-points its own name at 127.0.0.1 and reads the
  answers as same-origin (the index, its previews). The browser still sends ``Host: evil.example``,
  so every request whose ``Host`` is not an allowed name (any port) gets 400. On a loopback bind the
  allowed names are ``localhost``, ``127.0.0.1`` and ``[::1]``; ``--allow-host NAME`` adds more (``*``:
  any, for deliberate exposure).
* **Cross-site requests**: a page may POST a multipart form (or fetch) to the server without reading
  the answer. A request that uses the server's state -- any method but GET/HEAD/OPTIONS, and every
  ``/api/`` request -- whose ``Origin`` is another origin than its ``Host`` (or ``null``), or whose
  ``Sec-Fetch-Site`` is ``cross-site`` or ``same-site``, gets 403. The page's own requests are
  same-origin; requests without these headers (curl, scripts) pass.

Every refusal is JSON ``{"detail": "..."}``, one line, as the rest of the API.
"""

from __future__ import annotations

import ipaddress
import json
import re
from urllib.parse import urlsplit

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_HOST = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]@]+)(?::(?P<port>\d{1,5}))?")


def host_name(value: str | None) -> str | None:
    """The host of a ``Host`` header (``name[:port]``, ``[v6][:port]``), lower-cased; None if malformed."""
    m = _HOST.fullmatch((value or "").strip())
    if m is None:
        return None
    host = m["host"].lower()
    if host.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1])}]"  # one spelling: [0:0:0:0:0:0:0:1] is [::1]
        except ValueError:
            return None
    return host


def normalize_host(name: str) -> str:
    """An allowed host as the guard compares it: lower-case, an IPv6 address in brackets; ``ValueError``
    (one line) for anything that is not a bare host name (a port, a scheme, a path)."""
    text = name.strip().lower()
    if text == "*":
        return text
    try:
        return f"[{ipaddress.IPv6Address(text.strip('[]'))}]"
    except ValueError:
        pass
    m = _HOST.fullmatch(text)
    if m is None or m["port"] is not None:
        raise ValueError(f"--allow-host {name!r}: give a host name or address without scheme, port or path "
                         "(every port of it is allowed), e.g. --allow-host photos.lan")
    return m["host"]


class HostGuard:
    """ASGI middleware: 400 for a ``Host`` not in ``allowed_hosts``, 403 for a cross-site request that uses
    the server's state (see the module docstring)."""

    def __init__(self, app, allowed_hosts=LOOPBACK_HOSTS):
        self.app = app
        self.allowed = tuple(dict.fromkeys(normalize_host(h) for h in allowed_hosts))
        self.any_host = "*" in self.allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "")
        name = host_name(host)
        if not self.any_host and name not in self.allowed:
            shown = json.dumps(host[:80])
            return await _refuse(scope, send, 400, f"host {shown} is not served: this server answers "
                                            f"{', '.join(self.allowed)} (any port); start littune serve with "
                                            "--allow-host NAME to answer another name")
        why = _cross_site(scope, headers, host)
        if why:
            return await _refuse(scope, send, 403, f"cross-site request refused ({why}): littune serve answers its own "
                                            "page and clients that send no Origin")
        await self.app(scope, receive, send)


def _cross_site(scope, headers: dict, host: str) -> str | None:
    """Why a request that uses the server's state comes from another site (None: it does not, or it uses none)."""
    if scope.get("method", "GET") in SAFE_METHODS and not scope.get("path", "").startswith("/api/"):
        return None
    site = headers.get("sec-fetch-site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site: {site}"
    origin = headers.get("origin")
    if origin is None:
        return None
    if origin.strip().lower() == "null" or urlsplit(origin.strip()).netloc.lower() != host.strip().lower():
        return f"Origin {json.dumps(origin[:80])} is not this server's {json.dumps(host[:80])}"
    return None


async def _refuse(scope, send, status: int, detail: str) -> None:
    if scope["type"] == "websocket":  # closed before it is accepted: the client sees the handshake refused
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        return
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
