"""The local web app behind ``littune serve``: a JSON API and a small page, in one process.

:func:`create_app` turns a loaded model (and optionally an opened :class:`~littune.search.SearchIndex`)
into a FastAPI application::

    GET  /                  the page (static files shipped in ``littune/static/``, no build step)
    GET  /api/health        model name and setting, whether an index is loaded and its size, the limits
    POST /api/classify      multipart: ``image`` (file), ``labels`` ("cat, dog, horse"), ``templates``
    GET  /api/search        ``q=TEXT`` or ``image_id=N`` (a row of the index), ``k`` (1..max_k)
    GET  /api/image/{id}    a JPEG preview of the index's image at integer row ``id``
    GET  /openapi.json, /docs   the OpenAPI schema and its interactive page (FastAPI's own)

Safe by default. An upload is capped in bytes (the request body is counted as it arrives, so a
huge or chunked body is refused with 413 before it is stored) and in pixels (checked from the image
header before any pixel is decoded: a decompression bomb costs nothing); a file that is not an image
gets 415, a truncated one 400. Labels are bounded in count and length, ``k`` in range, and the
template set must be one of the built-in names (never a path). Search answers only with rows of the
index, and images are served by integer row id only, re-encoded from pixels, so no parameter names a
file. Every error is JSON ``{"detail": "..."}`` and the server keeps serving.

The model and index are loaded once, by the caller. Endpoints are plain functions that FastAPI runs
in its thread pool; a lock lets one request at a time use the model, under ``torch.no_grad`` (the
model's own inference methods run in eval mode without gradients). FastAPI is imported here only,
so the rest of littune does not need the ``serve`` extra.
"""


import contextlib
import io
import os
import tarfile
import threading
import time
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import LittuneError

MB = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 10 * MB
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_LABELS = 100
DEFAULT_MAX_LABEL_CHARS = 200
DEFAULT_MAX_K = 100
MAX_QUERY_CHARS = 500
PREVIEW_SIDE = 384  # longest side of the JPEG previews /api/image serves
FORM_OVERHEAD = 64 * 1024  # room for the labels, template name and multipart framing around the file


def require_fastapi():
    """Import FastAPI, or raise a :class:`LittuneError` that says how to install it."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: FastAPI's form parser)
    except ImportError as e:
        raise LittuneError(f"the web app needs the serve extra ({e.name} is missing): "
                           "pip install 'littune[serve]'") from None
    return fastapi


def static_dir() -> Path:
    """The folder of the page's files, shipped inside the package."""
    return Path(str(resources.files("littune").joinpath("static")))


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, counting as they arrive.

    A declared Content-Length over the limit is refused before the app runs. A chunked body is
    counted: past the limit the 413 goes out at once and the app sees the client disconnect (what it
    tries to send after that is dropped), so the rest of the body is never stored.
    """

    def __init__(self, app, limit: int, message: str | None = None):
        self.app = app
        self.limit = limit
        self.message = message or f"request body too large: the limit is {_size(limit)}"

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


def _size(n: int) -> str:
    """Bytes for people: "10 MB", "200 KB"."""
    return f"{round(n / MB, 1):g} MB" if n >= MB else f"{round(n / 1024):g} KB"


async def _send_json(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def parse_label_text(text: str, max_labels: int = DEFAULT_MAX_LABELS,
                     max_chars: int = DEFAULT_MAX_LABEL_CHARS) -> list[str]:
    """Labels from "cat, dog, horse" (commas or new lines); raises ValueError with a clear message."""
    labels = [x.strip() for line in text.splitlines() for x in line.split(",")]
    labels = [x for x in labels if x]
    if not labels:
        raise ValueError('no labels: give at least one, comma separated, e.g. "cat, dog, horse"')
    if len(labels) > max_labels:
        raise ValueError(f"too many labels: {len(labels)} given, at most {max_labels}")
    long = next((x for x in labels if len(x) > max_chars), None)
    if long is not None:
        raise ValueError(f"label {long[:40]!r}... is {len(long)} characters long, at most {max_chars}")
    from .inference import repeated_label

    twice = repeated_label(labels)
    if twice is not None:
        raise ValueError(f"label {twice!r} is given twice")
    return labels


def _image_bytes(where: str) -> bytes:
    """The encoded image an index row points at: a file, or ``shard.tar:key`` inside a tar shard."""
    from .data.decode import IMAGE_EXTENSIONS

    if os.path.isfile(where):
        with open(where, "rb") as f:
            return f.read()
    shard, sep, key = where.rpartition(":")
    if sep and shard.endswith(".tar") and os.path.isfile(shard):
        with tarfile.open(shard) as tar:
            for member in tar:
                name, dot, ext = member.name.partition(".")
                if member.isfile() and name == key and dot and f".{ext.lower()}" in IMAGE_EXTENSIONS:
                    return tar.extractfile(member).read()
    raise FileNotFoundError(where)


def _model_info(model, name: str | None) -> dict:
    cfg = model.config
    text = cfg.text_tower if isinstance(cfg.text_tower, dict) else {}
    return {"name": name or "model", "setting": str(cfg.setting), "image_tower": getattr(model.image_tower, "name", ""),
            "text_tower": str(text.get("path") or text.get("type") or ""), "embed_dim": int(cfg.embed_dim),
            "loss": cfg.loss}


def create_app(model, index=None, *, model_name: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_labels: int = DEFAULT_MAX_LABELS, max_label_chars: int = DEFAULT_MAX_LABEL_CHARS,
               max_k: int = DEFAULT_MAX_K, backend: str = "auto"):
    """The FastAPI app serving ``model`` (a :class:`~littune.model.LiTModel`) and, if given, ``index``.

    ``index`` must have been built with ``model`` (its embedding fingerprint is checked). Limits:
    ``max_upload_bytes`` per uploaded image, ``max_pixels`` per decoded image, ``max_labels`` labels
    of at most ``max_label_chars`` characters, ``k`` from 1 to ``max_k``.
    """
    require_fastapi()
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import HTTPException, RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    from .data.decode import BadImage, load_image
    from .eval.templates import builtin_sets, load_templates

    if index is not None:
        index.check_model(model)
        search_backend = index.backend(backend)
    template_sets = builtin_sets()
    lock = threading.Lock()

    @contextlib.contextmanager
    def model_turn():
        """One request at a time uses the model, without gradients."""
        with lock, torch.no_grad():
            yield

    weights_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
    preview_cache: OrderedDict[int, bytes] = OrderedDict()
    preview_lock = threading.Lock()
    info = _model_info(model, model_name)
    limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_labels": max_labels,
              "max_label_chars": max_label_chars, "max_k": max_k}

    app = FastAPI(title="littune", version=_version(),
                  description="Zero-shot classification and text-to-image search with a LiT model.")
    too_large = f"upload too large: images up to {_size(max_upload_bytes)} are accepted"
    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD, message=too_large)

    def fail(status: int, detail: str):
        raise HTTPException(status_code=status, detail=detail)

    @app.exception_handler(LittuneError)
    async def _littune_error(request: Request, exc: LittuneError):
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "path"))
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts) or "invalid request",
                                                      "errors": _plain(exc.errors())})

    # -- the page ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(static_dir() / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=static_dir()), name="static")

    # -- the API ---------------------------------------------------------------------------------
    @app.get("/api/health", summary="Model, index and limits")
    def health() -> dict:
        return {"status": "ok", "model": info, "index": {"loaded": index is not None,
                                                          "size": len(index) if index is not None else 0},
                "template_sets": template_sets, "limits": limits}

    def class_weights(labels: list[str], templates: str) -> torch.Tensor:
        key = (tuple(labels), templates)
        if key in weights_cache:
            weights_cache.move_to_end(key)
            return weights_cache[key]
        weights = model.zeroshot_weights(labels, load_templates(templates))
        weights_cache[key] = weights
        while len(weights_cache) > 32:
            weights_cache.popitem(last=False)
        return weights

    @app.post("/api/classify", summary="Zero-shot classify one image against your labels")
    def classify(image: UploadFile = File(..., description="an image file (JPEG, PNG, WebP, GIF, BMP, TIFF)"),
                 labels: str = Form("", description='comma separated, e.g. "cat, dog, horse"'),
                 templates: str = Form("short", description="a template set: " + ", ".join(template_sets))) -> dict:
        t0 = time.perf_counter()
        try:
            names = parse_label_text(labels, max_labels, max_label_chars)
        except ValueError as e:
            fail(422, str(e))
        templates = templates.strip() or "short"
        if templates not in template_sets:
            fail(400, f"unknown template set {templates[:60]!r}: use one of {', '.join(template_sets)}")
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            fail(413, too_large)
        try:
            img = load_image(data, max_pixels=max_pixels)
        except BadImage as e:
            status = {"not an image": 415, "too many pixels": 413}.get(e.reason, 400)
            fail(status, f"{e.reason}: {e.detail}" if e.detail else e.reason)
        with model_turn():
            weights = class_weights(names, templates)
            probs = model.label_probabilities(model.encode_images([img]), weights)[0]
        order = sorted(range(len(names)), key=lambda c: (-float(probs[c]), c))
        return {"labels": [{"label": names[c], "probability": float(probs[c])} for c in order],
                "templates": templates, "image": {"width": img.width, "height": img.height},
                "elapsed_ms": round(1000 * (time.perf_counter() - t0), 1)}

    @app.get("/api/search", summary="The indexed images closest to a text or to an indexed image")
    def search(q: str | None = Query(None, min_length=1, max_length=MAX_QUERY_CHARS, description="a text query"),
               image_id: int | None = Query(None, ge=0, description="search by the image at this index row"),
               k: int = Query(12, ge=1, le=max_k, description=f"results (1..{max_k})")) -> dict:
        if index is None:
            fail(404, "no index loaded: start littune serve with --index INDEX to search")
        if (q is None) == (image_id is None):
            fail(400, "give exactly one of q (a text query) or image_id (an index row)")
        if q is not None:
            if not q.strip():
                fail(422, "the text query is empty")
            with model_turn():
                emb = model.encode_texts([q.strip()])
            query: dict[str, Any] = {"text": q.strip()}
        else:
            if image_id >= len(index):
                fail(404, f"no image {image_id}: the index holds rows 0..{len(index) - 1}")
            emb = torch.from_numpy(index.embeddings[image_id:image_id + 1].astype("float32"))
            query = {"image_id": image_id, "key": index.keys[image_id]}
        with model_turn():
            hits = index.hits(*index.search(emb, k=k, backend=search_backend))[0]
        return {"query": query, "k": k, "hits": [{"rank": h.rank, "score": round(h.score, 6), "id": h.index,
                                                  "key": h.key, "url": f"/api/image/{h.index}"} for h in hits]}

    @app.get("/api/image/{image_id}", summary="A JPEG preview of an indexed image, by row id",
             responses={200: {"content": {"image/jpeg": {}}}})
    def image(image_id: int):
        if index is None:
            fail(404, "no index loaded: start littune serve with --index INDEX")
        if not 0 <= image_id < len(index):
            fail(404, f"no image {image_id}: the index holds rows 0..{len(index) - 1}")
        with preview_lock:
            preview = preview_cache.get(image_id)
        if preview is None:
            try:
                img = load_image(_image_bytes(index.where[image_id]), max_pixels=max_pixels)
            except (OSError, BadImage):
                fail(404, f"image {image_id} is in the index but can no longer be read")
            img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            preview = buf.getvalue()
            with preview_lock:
                preview_cache[image_id] = preview
                while len(preview_cache) > 512:
                    preview_cache.popitem(last=False)
        return Response(preview, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600"})

    return app


def _plain(errors: list[dict]) -> list[dict]:
    """Validation errors as plain JSON (pydantic may put exception objects in ``ctx``)."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors]


def _version() -> str:
    from . import __version__

    return __version__
