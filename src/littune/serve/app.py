"""The local web app behind ``littune serve``: a JSON API and a small page, in one process.

:func:`create_app` turns a loaded model (and optionally an opened :class:`~littune.search.SearchIndex`)
into a FastAPI application::

    GET  /                  the page (static files shipped in ``littune/serve/static/``, no build step)
    GET  /api/health        model name and setting, whether an index is loaded and its size, the limits
    POST /api/classify      multipart: ``image`` (file), ``labels`` ("cat, dog, horse"), ``templates``
    POST /api/heatmap       the same form: where each label matches, a small map per label
                            (:mod:`littune.serve.heatmap`)
    GET  /api/search        ``q=TEXT`` or ``image_id=N`` (a row of the index), ``k`` (1..max_k)
    GET  /api/image/{id}    a JPEG preview of the index's image at integer row ``id``
    GET  /openapi.json      the OpenAPI schema (FastAPI's /docs and /redoc pages load their scripts
                            from a CDN, a broken page offline: they are not served)

Safe by default. An upload is capped in bytes (the request body is counted as it arrives, so a
huge or chunked body is refused with 413 before it is stored) and in pixels (checked from the image
header before any pixel is decoded: a decompression bomb costs nothing); a file that is not an image
gets 415, a truncated one 400. An SVG is drawn at the model's resize size, as ``littune embed`` draws
it; one with an external entity gets 400 and no file it names is read (:mod:`littune.data.svg`).
Labels are bounded in count and length, prompts (labels x templates)
per request so that one request holds the model for about a second at most (422 before any prompt
is embedded), ``k`` in range, and the template set must be one of the built-in names (never a
path). Only the host names it was started for are answered, and other sites' pages are refused
(:mod:`littune.serve.webguard`). Search answers only with rows of the
index, and images are served by integer row id only, re-encoded from pixels, so no parameter names a
file: a preview is decoded from the index's source through its own records
(:meth:`~littune.search.SearchIndex.open_image`), so a file, a member of a plain or compressed tar
shard, or a stem repeated across shards shows the image that was indexed. Every error is JSON
``{"detail": "..."}`` and the server keeps serving.

The model and index are loaded once, by the caller (the index's source is re-opened at the first
preview). :class:`Service` holds what the endpoints share, and each group of routes is added by its
own function. Endpoints are plain functions that FastAPI runs in its thread pool; a lock lets one
request at a time use the model, under ``torch.no_grad`` (the model's own inference methods run in
eval mode without gradients). FastAPI is imported here only, so the rest of littune does not need
the ``serve`` extra.
"""


import contextlib
import io
import threading
import time
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from .bodylimit import MB, BodyLimit, human_size
from ..data.decode import SIZE_INFO
from ..errors import LittuneError

DEFAULT_MAX_UPLOAD_BYTES = 10 * MB
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_LABELS = 100
DEFAULT_MAX_LABEL_CHARS = 200
#: labels x templates per classify request: 8,000 prompts held the model 4.0 s (issue 23), so 2,000 is
#: about a second; every request of the default limits with short or imagenet7 templates fits (100 x 7)
DEFAULT_MAX_PROMPTS = 2000
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
    return Path(str(resources.files("littune.serve").joinpath("static")))


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
    from ..inference.mixin import repeated_label

    twice = repeated_label(labels)
    if twice is not None:
        raise ValueError(f"label {twice!r} is given twice")
    return labels


def _model_info(model, name: str | None) -> dict:
    cfg = model.config
    text = cfg.text_tower if isinstance(cfg.text_tower, dict) else {}
    return {"name": name or "model", "setting": str(cfg.setting), "image_tower": getattr(model.image_tower, "name", ""),
            "text_tower": str(text.get("path") or text.get("type") or ""), "embed_dim": int(cfg.embed_dim),
            "loss": cfg.loss}


def fail(status: int, detail: str):
    """Answer the request with ``status`` and ``{"detail": detail}``."""
    from fastapi.exceptions import HTTPException

    raise HTTPException(status_code=status, detail=detail)


class _LRU:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class Service:
    """What the endpoints share: the model (one request at a time), the index, the limits, the caches."""

    def __init__(self, model, index, model_name: str | None, limits: dict, backend: str):
        from ..eval.templates import builtin_sets, load_templates

        self.model, self.index, self.limits = model, index, limits
        self.search_backend = index.backend(backend) if index is not None else None
        self.template_sets = builtin_sets()
        self.template_counts = {name: len(load_templates(name)) for name in self.template_sets}
        self.info = _model_info(model, model_name)
        self.too_large = f"upload too large: images up to {human_size(limits['max_upload_bytes'])} are accepted"
        self._lock = threading.Lock()
        self._weights = _LRU(32)
        self._previews = _LRU(512)

    @contextlib.contextmanager
    def model_turn(self):
        """One request at a time uses the model, without gradients."""
        with self._lock, torch.no_grad():
            yield

    def class_weights(self, labels: list[str], templates: str) -> torch.Tensor:
        """The zero-shot classifier of ``labels`` (cached; call inside :meth:`model_turn`)."""
        from ..eval.templates import load_templates

        key = (tuple(labels), templates)
        weights = self._weights.get(key)
        if weights is None:
            weights = self.model.zeroshot_weights(labels, load_templates(templates))
            self._weights.put(key, weights)
        return weights

    def labelled_upload(self, image, labels: str | list[str], templates: str) -> tuple[list[str], str, Any]:
        """``(labels, template set, decoded image)`` of a classify or heat-map request, within the limits
        (a 4xx otherwise, before any prompt is embedded or pixel decoded). ``labels``: the form's text, or
        a list already parsed (a heat map's one query)."""
        try:
            names = labels if isinstance(labels, list) else parse_label_text(labels, self.limits["max_labels"],
                                                                             self.limits["max_label_chars"])
        except ValueError as e:
            fail(422, str(e))
        templates = templates.strip() or "short"
        if templates not in self.template_sets:
            fail(400, f"unknown template set {templates[:60]!r}: use one of {', '.join(self.template_sets)}")
        _check_prompts(self, len(names), templates)
        return names, templates, _upload_image(image, self)

    def index_row(self, image_id: int, what: str = "") -> int:
        """``image_id`` if the index has that row; else a 404 saying what is there."""
        if self.index is None:
            fail(404, "no index loaded: start littune serve with --index INDEX" + what)
        if not 0 <= image_id < len(self.index):
            fail(404, f"no image {image_id}: the index holds rows 0..{len(self.index) - 1}")
        return image_id

    def preview(self, image_id: int) -> bytes:
        """A JPEG of row ``image_id``, re-encoded from the pixels its source's record decodes to."""
        from ..data.decode import BadImage

        data = self._previews.get(image_id)
        if data is None:
            try:
                img = self.index.open_image(image_id, max_pixels=self.limits["max_pixels"])
            except (OSError, BadImage, LittuneError):
                fail(404, f"image {image_id} is in the index but can no longer be read")
            img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            data = buf.getvalue()
            self._previews.put(image_id, data)
        return data


def create_app(model, index=None, *, model_name: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_labels: int = DEFAULT_MAX_LABELS, max_label_chars: int = DEFAULT_MAX_LABEL_CHARS,
               max_k: int = DEFAULT_MAX_K, max_prompts: int = DEFAULT_MAX_PROMPTS, backend: str = "auto",
               allowed_hosts: Sequence[str] | None = None):
    """The FastAPI app serving ``model`` (a :class:`~littune.model.LiTModel`) and, if given, ``index``.

    ``index`` must have been built with ``model`` (its embedding fingerprint is checked). Limits:
    ``max_upload_bytes`` per uploaded image, ``max_pixels`` per decoded image, ``max_labels`` labels
    of at most ``max_label_chars`` characters and at most ``max_prompts`` prompts (labels x templates) per
    request, ``k`` from 1 to ``max_k``. ``allowed_hosts``: the host
    names answered, any port (default the loopback names; ``*``: any), and cross-site requests that
    use the server are refused (:mod:`littune.serve.webguard`).
    """
    require_fastapi()
    from fastapi import FastAPI

    from .heatmap import add_heatmap
    from .webguard import LOOPBACK_HOSTS, HostGuard

    if index is not None:
        index.check_model(model)
    limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_labels": max_labels,
              "max_label_chars": max_label_chars, "max_prompts": max_prompts, "max_k": max_k}
    svc = Service(model, index, model_name, limits, backend)
    app = FastAPI(title="littune", version=_version(), docs_url=None, redoc_url=None,  # CDN pages: not served
                  description="Zero-shot classification and text-to-image search with a LiT model.")
    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD, message=svc.too_large)
    app.add_middleware(HostGuard, allowed_hosts=LOOPBACK_HOSTS if allowed_hosts is None else allowed_hosts)  # outermost
    _add_error_handlers(app)
    _add_page(app)
    _add_health(app, svc)
    _add_classify(app, svc)
    add_heatmap(app, svc)
    _add_search(app, svc)
    _add_image(app, svc)
    return app


def _add_error_handlers(app) -> None:
    """Every error is JSON ``{"detail": ...}``: littune's own as 400, invalid parameters as 422."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

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


def _add_page(app) -> None:
    """``/``: the page; ``/static``: its script and style."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(static_dir() / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=static_dir()), name="static")


def _add_health(app, svc: Service) -> None:
    @app.get("/api/health", summary="Model, index and limits")
    def health() -> dict:
        index = svc.index
        return {"status": "ok", "model": svc.info, "index": {"loaded": index is not None,
                                                              "size": len(index) if index is not None else 0},
                "template_sets": svc.template_sets, "limits": svc.limits}


def _upload_image(image, svc: Service):
    """The uploaded file decoded, within the byte and pixel limits (413, 415 or 400 otherwise)."""
    from ..data.decode import BadImage, load_image

    max_bytes = svc.limits["max_upload_bytes"]
    data = image.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        fail(413, svc.too_large)
    try:  # a model embedded with fast decoding (a JPEG drafted to its resize size) sees the same pixels here
        p = svc.model.preprocess  # an SVG is drawn at the resize size, as littune embed draws it
        return load_image(data, max_pixels=svc.limits["max_pixels"], reduce_to=p.draft_to, render_to=p.resize_to)
    except BadImage as e:
        status = {"not an image": 415, "no renderer": 415, "too many pixels": 413, "too large": 413}.get(e.reason, 400)
        fail(status, f"{e.reason}: {e.detail}" if e.detail else e.reason)


def _add_classify(app, svc: Service) -> None:
    from fastapi import File, Form, UploadFile

    sets = svc.template_sets

    @app.post("/api/classify", summary="Zero-shot classify one image against your labels")
    def classify(image: UploadFile = File(..., description="an image file (JPEG, PNG, WebP, GIF, BMP, TIFF, SVG)"),
                 labels: str = Form("", description='comma separated, e.g. "cat, dog, horse"'),
                 templates: str = Form("short", description="a template set: " + ", ".join(sets))) -> dict:
        t0 = time.perf_counter()
        names, templates, img = svc.labelled_upload(image, labels, templates)
        with svc.model_turn():
            weights = svc.class_weights(names, templates)
            probs = svc.model.label_probabilities(svc.model.encode_images([img]), weights)[0]
        order = sorted(range(len(names)), key=lambda c: (-float(probs[c]), c))
        return {"labels": [{"label": names[c], "probability": float(probs[c])} for c in order],
                "templates": templates, "image": dict(zip(("width", "height"), img.info.get(SIZE_INFO, img.size))),
                "elapsed_ms": round(1000 * (time.perf_counter() - t0), 1)}


def _check_prompts(svc: Service, labels: int, templates: str) -> None:
    """422 when ``labels`` x the set's templates is more prompts than one request may embed."""
    per, most = svc.template_counts[templates], svc.limits["max_prompts"]
    if labels * per > most:
        fail(422, f"too many prompts: {labels} labels x {per} templates ({templates}) = {labels * per:,} prompts, "
                  f"at most {most:,} per request: give fewer labels or a smaller template set")


def _add_search(app, svc: Service) -> None:
    from fastapi import Query

    max_k = svc.limits["max_k"]

    @app.get("/api/search", summary="The indexed images closest to a text or to an indexed image")
    def search(q: str | None = Query(None, min_length=1, max_length=MAX_QUERY_CHARS, description="a text query"),
               image_id: int | None = Query(None, ge=0, description="search by the image at this index row"),
               k: int = Query(12, ge=1, le=max_k, description=f"results (1..{max_k})")) -> dict:
        index = svc.index
        if index is None:
            fail(404, "no index loaded: start littune serve with --index INDEX to search")
        if (q is None) == (image_id is None):
            fail(400, "give exactly one of q (a text query) or image_id (an index row)")
        if q is not None:
            if not q.strip():
                fail(422, "the text query is empty")
            with svc.model_turn():
                emb = svc.model.encode_texts([q.strip()])
            query: dict[str, Any] = {"text": q.strip()}
        else:
            svc.index_row(image_id)
            emb = torch.from_numpy(index.embeddings[image_id:image_id + 1].astype("float32"))
            query = {"image_id": image_id, "key": index.keys[image_id]}
        with svc.model_turn():
            hits = index.hits(*index.search(emb, k=k, backend=svc.search_backend))[0]
        return {"query": query, "k": k, "hits": [{"rank": h.rank, "score": round(h.score, 6), "id": h.index,
                                                  "key": h.key, "url": f"/api/image/{h.index}"} for h in hits]}


def _add_image(app, svc: Service) -> None:
    from fastapi.responses import Response

    @app.get("/api/image/{image_id}", summary="A JPEG preview of an indexed image, by row id",
             responses={200: {"content": {"image/jpeg": {}}}})
    def image(image_id: int):
        preview = svc.preview(svc.index_row(image_id))
        return Response(preview, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


def _plain(errors: list[dict]) -> list[dict]:
    """Validation errors as plain JSON (pydantic may put exception objects in ``ctx``)."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors]


def _version() -> str:
    from .. import __version__

    return __version__
