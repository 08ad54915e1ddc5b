"""``POST /api/heatmap`` in ``littune serve``: where in an uploaded image each label matches.

The request is ``/api/classify``'s multipart form (``image``, ``labels``, ``templates``) under the same
limits and guards (bytes, pixels, labels, prompts, built-in template sets only: :meth:`Service.labelled_upload
<littune.serve.app.Service.labelled_upload>`), and the answer gives, for each label in the order given, its
probability (a softmax over the labels of the pooled embedding, as classify) and its map: the cosine of
each location's embedding with the label's (:mod:`littune.inference.heatmap`), a list of ``h`` rows of ``w``
floats at the map's own resolution (7 x 7 for EfficientNet-Lite0; rounded to 4 decimals)::

    {"labels": [{"label": "cat", "probability": 0.91, "map": [[0.12, ...], ...]}, ...],
     "shape": [7, 7], "range": [min, max], "crop": [left, top, right, bottom], "box": [x0, y0, x1, y1],
     "image": {"width": W, "height": H}, "exact": true, "how": "...", "templates": "short", "elapsed_ms": 85.0}

``crop`` is the area the map covers in the image's pixels (the tower's centre crop), ``box`` the whole
image in map cells; ``exact`` is false where the map only approximates the pooled embedding (a
CLS-pooled ViT). The image tower runs once on the image in torch, inside the model's one-request-at-a-
time turn. A tower with no spatial features (ONNX, timm) answers 400 with one line starting
"this model draws no heat maps: " and saying why. Instead of
``labels``, the form may give ``query``: one text taken whole, commas and all ("a red handle, on the
left"), bounded as a label is; giving both is a 422. The web page draws these maps over the image
(``static/heatmap.js``).
"""

import time  # no ``from __future__ import annotations``: FastAPI reads the endpoint's annotations at run time

from ..errors import LittuneError

#: the start of the one-line 400 when the model's tower gives no map (the web page shows it as it is)
NO_MAPS = "this model draws no heat maps"


def query_label(query: str, labels: str, max_chars: int) -> list[str] | None:
    """``[query]`` (stripped) when the form gives a query, None when it gives none; ``ValueError`` (one line)
    for a query given with labels or one longer than ``max_chars``."""
    text = query.strip()
    if not text:
        return None
    if labels.strip():
        raise ValueError("give labels or a query, not both")
    if len(text) > max_chars:
        raise ValueError(f"the query is {len(text)} characters long, at most {max_chars}")
    return [text]


def add_heatmap(app, svc) -> None:
    """Add ``POST /api/heatmap`` to ``app`` for the :class:`~littune.serve.app.Service` ``svc``."""
    from fastapi import File, Form, UploadFile
    from fastapi.exceptions import HTTPException

    from ..inference.heatmap import heatmap

    sets = svc.template_sets

    @app.post("/api/heatmap", summary="Where in one image each of your labels matches: a small map per label")
    def heatmap_endpoint(image: UploadFile = File(..., description="an image file (JPEG, PNG, WebP, GIF, BMP, TIFF)"),
                         labels: str = Form("", description='comma separated, e.g. "cat, dog, horse"'),
                         templates: str = Form("short", description="a template set: " + ", ".join(sets)),
                         query: str = Form("", description="one text instead of labels, commas kept: "
                                                           '"a red handle, on the left"')) -> dict:
        t0 = time.perf_counter()
        try:
            one = query_label(query, labels, svc.limits["max_label_chars"])
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        names, templates, img = svc.labelled_upload(image, labels if one is None else one, templates)
        with svc.model_turn():
            weights = svc.class_weights(names, templates)
            try:
                hm = heatmap(svc.model, img, names, weights=weights)
            except LittuneError as e:  # the image is decoded and the texts embedded: it is the model's tower
                raise HTTPException(status_code=400, detail=f"{NO_MAPS}: {e}") from None
        rows = hm.maps.round(4).tolist()
        return {"labels": [{"label": n, "probability": float(p), "map": m}
                           for n, p, m in zip(names, hm.probabilities, rows)],
                "shape": list(hm.shape), "range": [float(hm.maps.min()), float(hm.maps.max())],
                "crop": [round(v, 3) for v in hm.crop], "box": [round(v, 4) for v in hm.box],
                "image": dict(zip(("width", "height"), hm.image_size)), "exact": hm.exact, "how": hm.how,
                "templates": templates, "elapsed_ms": round(1000 * (time.perf_counter() - t0), 1)}
