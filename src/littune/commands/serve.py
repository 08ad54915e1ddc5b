"""Serve a local web app: zero-shot classification and, with --index, text-to-image search.

One process serves the page and a JSON API (its OpenAPI schema at http://HOST:PORT/openapi.json;
FastAPI's /docs and /redoc pages are not served: they load their scripts from a CDN). The model and
the index are loaded once, at start. With --index alone the model recorded in the index is used.
By default it listens on 127.0.0.1 only and answers only requests naming localhost, 127.0.0.1 or
[::1] (any port: a web page that re-points its own name at this machine, DNS rebinding, is refused),
and refuses requests from other sites' pages (a foreign Origin or Sec-Fetch-Site: 403). --host
0.0.0.0 opens it to the network (there is no authentication): name the host names or addresses
clients use with --allow-host (repeatable; '*' answers any). Uploads are capped in bytes and pixels,
labels in count and length, prompts (labels x templates) per request (--max-prompts: one request
holds the model for about a second at most), results in k.
Needs the serve extra: pip install 'littune[serve]'.
"""

from __future__ import annotations

import argparse
import sys

from . import add_trust_code

HELP = "a local web app: classify and search in the browser"
EXAMPLE = "littune serve --model runs/lu/model --index photos.index --port 8000"

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..serve.app import (DEFAULT_MAX_K, DEFAULT_MAX_LABELS, DEFAULT_MAX_PIXELS, DEFAULT_MAX_PROMPTS,
                         DEFAULT_MAX_UPLOAD_BYTES, MB)

    p.add_argument("--model", "-m", metavar="DIR", help="a model directory (default with --index: the index's model)")
    p.add_argument("--index", "-i", metavar="INDEX", help="an index directory from littune index, for search")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests naming this host name or address, any port (repeatable; '*': any "
                        "name). Default: localhost, 127.0.0.1, [::1], and the --host address")
    p.add_argument("--port", "-p", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / MB,
                   help=f"largest image upload in MB (default {DEFAULT_MAX_UPLOAD_BYTES // MB})")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image in pixels (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-labels", type=int, default=DEFAULT_MAX_LABELS,
                   help=f"most labels per request (default {DEFAULT_MAX_LABELS})")
    p.add_argument("--max-prompts", type=int, default=DEFAULT_MAX_PROMPTS,
                   help=f"most prompts (labels x templates) per classify request (default {DEFAULT_MAX_PROMPTS:,}: "
                        "about a second of the model; imagenet's 80 templates take 25 labels)")
    p.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help=f"most search results (default {DEFAULT_MAX_K})")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    add_trust_code(p)


def allowed_hosts(host: str, allow: list[str]) -> list[str]:
    """The host names ``littune serve --host HOST --allow-host ...`` answers: the loopback names, the bound
    address unless it is every interface, and ``allow``. Every interface without ``allow`` is an error
    that says what would be answered."""
    from ..errors import LittuneError
    from ..serve.webguard import LOOPBACK_HOSTS, normalize_host

    try:
        extra = [normalize_host(h) for h in allow]
    except ValueError as e:
        raise LittuneError(str(e)) from None
    if host.strip("[]") in WILDCARDS:
        if not extra:
            raise LittuneError(f"--host {host} listens on every interface, but only requests naming "
                               f"{', '.join(LOOPBACK_HOSTS)} would be answered: add --allow-host NAME for each host "
                               "name or address clients use (e.g. --allow-host 192.168.1.20), or --allow-host '*' "
                               "to answer any name")
    elif host not in LOOPBACK:
        extra.insert(0, normalize_host(host))
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *extra]))


def listening_socket(host: str, port: int):
    """A socket bound to ``host:port`` and listening, as uvicorn would bind it, made before the model is
    loaded: a busy port (or an address not of this machine) is one line at once, and uvicorn serves on it."""
    import errno
    import socket

    from ..errors import LittuneError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise LittuneError(f"{where} is in use (another littune serve?): stop what listens there or give "
                               "another --port") from None
        raise LittuneError(f"cannot listen on {where}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    from ..errors import LittuneError

    if not args.model and not args.index:
        raise LittuneError("give --model DIR (and --index INDEX to search a collection)")
    if not 0 < args.port < 65536:
        raise LittuneError(f"--port must be 1..65535, not {args.port}")
    for name in ("max_upload_mb", "max_pixels", "max_labels", "max_prompts", "max_k"):
        if getattr(args, name) <= 0:
            raise LittuneError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    allowed = allowed_hosts(args.host, args.allow_host)
    uvicorn = _uvicorn()
    sock = listening_socket(args.host, args.port)  # before the model: a busy port is an error at once
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        app = _app(args, allowed)
    except BaseException:
        sock.close()
        raise
    if args.host not in LOOPBACK:
        print(f"littune serve: listening on {args.host}: anyone who can reach this machine can use the app "
              f"(there is no authentication); answering requests for {', '.join(allowed)}", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"littune serve: http://{shown}:{args.port}/  (API schema at /openapi.json; Ctrl-C stops)", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info")).run(sockets=[sock])
    return 0


def _uvicorn():
    from ..errors import LittuneError
    from ..serve.app import require_fastapi

    require_fastapi()
    try:
        import uvicorn
    except ImportError:
        raise LittuneError("the web app needs uvicorn: pip install 'littune[serve]'") from None
    return uvicorn


def _app(args, allowed: list[str]):
    """The model (and index) loaded, in the app."""
    from pathlib import Path

    from ..serve.app import MB, create_app

    index = None
    if args.index:
        from ..search import SearchIndex

        index = SearchIndex.open(args.index)
        model = index.load_model(args.model, trust_code=args.trust_code)
        name = Path(args.model or index.model_dir).name
    else:
        from ..model.two_towers import LiTModel

        model = LiTModel.from_pretrained(args.model, trust_code=args.trust_code)
        name = Path(args.model).name
    return create_app(model, index, model_name=name, max_upload_bytes=int(args.max_upload_mb * MB),
                      max_pixels=args.max_pixels, max_labels=args.max_labels, max_k=args.max_k,
                      max_prompts=args.max_prompts, allowed_hosts=allowed)
