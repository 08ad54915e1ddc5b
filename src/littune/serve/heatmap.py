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
time turn. A tower with no spatial features (ONNX, timm) answers 400 with one line. The web page does
not draw these maps yet.
"""

import time  # no ``from __future__ import annotations``: FastAPI reads the endpoint's annotations at run time


def add_heatmap(app, svc) -> None:
    """Add ``POST /api/heatmap`` to ``app`` for the :class:`~littune.serve.app.Service` ``svc``."""
    from fastapi import File, Form, UploadFile

    from ..inference.heatmap import heatmap

    sets = svc.template_sets

    @app.post("/api/heatmap", summary="Where in one image each of your labels matches: a small map per label")
    def heatmap_endpoint(image: UploadFile = File(..., description="an image file (JPEG, PNG, WebP, GIF, BMP, TIFF)"),
                         labels: str = Form("", description='comma separated, e.g. "cat, dog, horse"'),
                         templates: str = Form("short", description="a template set: " + ", ".join(sets))) -> dict:
        t0 = time.perf_counter()
        names, templates, img = svc.labelled_upload(image, labels, templates)
        with svc.model_turn():
            hm = heatmap(svc.model, img, names, weights=svc.class_weights(names, templates))
        rows = hm.maps.round(4).tolist()
        return {"labels": [{"label": n, "probability": float(p), "map": m}
                           for n, p, m in zip(names, hm.probabilities, rows)],
                "shape": list(hm.shape), "range": [float(hm.maps.min()), float(hm.maps.max())],
                "crop": [round(v, 3) for v in hm.crop], "box": [round(v, 4) for v in hm.box],
                "image": dict(zip(("width", "height"), hm.image_size)), "exact": hm.exact, "how": hm.how,
                "templates": templates, "elapsed_ms": round(1000 * (time.perf_counter() - t0), 1)}
