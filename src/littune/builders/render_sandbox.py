"""Draw untrusted SVGs in a child process, within a memory limit and a time limit.

resvg and cairosvg are native code, and a hostile drawing can take a process down with them: resvg
allocates a pattern tile or a filter region at its size on the page before drawing it (a one-pixel
pattern scaled 10,000 times asks for 262 GB, and Rust aborts the process when an allocation fails), and
cairosvg spends minutes on a chain of ``<use>`` references that resvg refuses. :func:`render_fitted` runs
:func:`littune.builders.render.render_fitted` in a helper process (``python -c``, importing the renderers
only), whose address space is capped at :data:`MEMORY_BYTES` above what it uses at rest and that is
killed after :data:`SECONDS`: a drawing that crashes it, exhausts it or takes too long is an error for
that drawing, never for the caller. Helpers are started when first needed (about a second), one per
drawing drawn at the same time (at most :data:`MAX_HELPERS`; other threads wait), and reused; a process
forked from the caller starts its own. Their messages (resvg's panics) are not shown.

On Windows (no ``select`` on pipes, no ``RLIMIT_AS``) the drawing is made in the calling process.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

from .render import RenderError

#: the most address space a helper may add to what it uses at rest (Linux; a failed allocation ends it)
MEMORY_BYTES = 2 * 2**30
#: the most seconds one drawing may take
SECONDS = 30.0
#: the most helpers at once (threads that draw beyond this wait for one)
MAX_HELPERS = max(1, min(8, os.cpu_count() or 1))
_START_SECONDS = 120.0  # importing the renderers on a busy machine


class RenderLimit(RenderError):
    """A drawing that crashed its helper, ran out of its memory or time: ``why`` says which."""

    def __init__(self, why: str):
        self.why = why
        super().__init__(why)


class NoHelper(RenderError):
    """The helper process could not be started (the message says why)."""


def render_fitted(svg: str, shorter: int, longest: int, fonts: bool, aspect: float | None,
                  renderers: list[str]) -> tuple[Image.Image, str]:
    """:func:`littune.builders.render.render_fitted` in a helper process (module doc)."""
    if os.name == "nt":
        from .render import render_fitted as draw

        return draw(svg, shorter, longest, fonts=fonts, aspect=aspect, renderers=renderers)
    job = {"shorter": shorter, "longest": longest, "fonts": fonts, "aspect": aspect, "renderers": renderers}
    helper = _POOL.take()
    try:
        reply, pixels = helper.ask(job, svg.encode("utf-8"))
    except BaseException:
        helper.close()
        _POOL.drop()
        raise
    _POOL.give(helper)
    if not reply["ok"]:
        raise RenderError(reply["error"])
    return Image.frombytes("RGB", tuple(reply["size"]), pixels), reply["renderer"]


class _Helper:
    """One helper process and its pipes."""

    def __init__(self):
        import littune

        env = dict(os.environ)
        root = str(Path(littune.__file__).resolve().parent.parent)  # the caller's littune, wherever it is
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        code = f"from littune.builders.render_sandbox import _serve; _serve({MEMORY_BYTES})"
        self.buf = bytearray()  # what the helper sent and was not taken yet
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, env=env, bufsize=0)
        except OSError as e:
            raise NoHelper(f"the SVG renderer process did not start ({sys.executable!r}: {e.strerror or e})") from None
        try:  # a picture in one piece (224 x 224 RGB is 147 kB; a pipe holds 64 kB by default)
            import fcntl

            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass
        try:
            ready = self._line(time.monotonic() + _START_SECONDS) == {"ready": True}
        except (RenderError, ValueError):
            ready = False
        if not ready:
            self.close()
            raise NoHelper(f"the SVG renderer process did not start ({sys.executable} -c ...; exit status "
                           f"{self.proc.returncode})")

    def ask(self, job: dict, svg: bytes) -> tuple[dict, bytes]:
        try:
            self.proc.stdin.write(json.dumps({**job, "n": len(svg)}).encode() + b"\n" + svg)
        except OSError:
            raise self._ended() from None
        deadline = time.monotonic() + SECONDS
        reply = self._line(deadline)
        return reply, (self._take(reply.get("n", 0), deadline) if reply.get("ok") else b"")

    def _line(self, deadline: float) -> dict:
        return json.loads(self._take(None, deadline))

    def _take(self, n: int | None, deadline: float) -> bytes:
        """The next ``n`` bytes the helper sends (None: its next line), waiting until ``deadline``."""
        while True:
            end = self.buf.find(b"\n") + 1 if n is None else (n if len(self.buf) >= n else 0)
            if end or n == 0:
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            left, fd = deadline - time.monotonic(), self.proc.stdout.fileno()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.close()
                raise RenderLimit(f"drawing it took longer than {SECONDS:.0f} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise self._ended()
            self.buf += chunk

    def _ended(self) -> RenderLimit:
        code = self.proc.wait()
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return RenderLimit(f"the renderer ended while drawing it ({how}: a crash, or more memory than its "
                           f"{MEMORY_BYTES >> 30} GiB limit)")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class _Pool:
    """Idle helpers, shared by the threads of one process."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:  # also in a forked child: the parent's helpers are not its own
        self.lock, self.idle, self.count = threading.Condition(), [], 0

    def take(self) -> _Helper:
        with self.lock:
            while not self.idle and self.count >= MAX_HELPERS:
                self.lock.wait()
            while self.idle:
                helper = self.idle.pop()
                if helper.alive():
                    return helper
                self.count -= 1
            self.count += 1
        try:
            return _Helper()
        except BaseException:
            self.drop()
            raise

    def give(self, helper: _Helper) -> None:
        with self.lock:
            self.idle.append(helper)
            self.lock.notify()

    def drop(self) -> None:
        with self.lock:
            self.count -= 1
            self.lock.notify()

    def close(self) -> None:
        """End the idle helpers (at exit; a later drawing starts a new one)."""
        with self.lock:
            for helper in self.idle:
                helper.close()
            self.count -= len(self.idle)
            self.idle = []
            self.lock.notify_all()


_POOL = _Pool()
atexit.register(_POOL.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.reset)


def _serve(memory: int) -> None:
    """The helper: read jobs from stdin, draw each, answer on stdout, until stdin closes."""
    import resource

    from . import render

    render.available_renderers()  # import the renderers before the limit
    try:
        with open("/proc/self/statm") as f:
            at_rest = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (at_rest + memory, at_rest + memory))
    except (OSError, ValueError):  # no /proc (macOS, which does not enforce RLIMIT_AS anyway)
        pass
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")  # the answers' own copy of stdout:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what a renderer prints goes nowhere
    sys.stdout = sys.stderr
    stdout.write(b'{"ready": true}\n')
    stdout.flush()
    for line in iter(stdin.readline, b""):
        job = json.loads(line)
        svg = stdin.read(job.pop("n")).decode("utf-8")
        try:
            img, name = render.render_fitted(svg, **job)
            data = img.tobytes()
            reply = {"ok": True, "size": list(img.size), "renderer": name, "n": len(data)}
        except Exception as e:  # RenderError, MemoryError...
            data, reply = b"", {"ok": False, "error": str(e) or type(e).__name__}
        stdout.write(json.dumps(reply).encode() + b"\n" + data)
        stdout.flush()
