"""ASGI middleware that caps a request body in bytes, counting as it arrives (for ``littune serve``).

A declared Content-Length over the limit is refused with 413 before the app runs; a chunked body is
counted and refused the moment it passes the limit, so a huge upload is never stored.
"""

from __future__ import annotations

import json

MB = 1024 * 1024


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, counting as they arrive.

    A declared Content-Length over the limit is refused before the app runs. A chunked body is
    counted: past the limit the 413 goes out at once and the app sees the client disconnect (what it
    tries to send after that is dropped), so the rest of the body is never stored.
    """

    def __init__(self, app, limit: int, message: str | None = None):
        self.app = app
        self.limit = limit
        self.message = message or f"request body too large: the limit is {human_size(limit)}"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, self._message())
        seen = 0
        state = {"started": False, "refused": False}

        async def counting_receive():
            nonlocal seen
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not state["started"]:
                    state["refused"] = True
                    await _send_json(send, 413, self._message())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            if not state["refused"]:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    def _message(self) -> str:
        return self.message


def human_size(n: int) -> str:
    """Bytes for people: "10 MB", "200 KB"."""
    return f"{round(n / MB, 1):g} MB" if n >= MB else f"{round(n / 1024):g} KB"


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
