"""Serving: ``littune serve``, a local web app that classifies uploads and searches an index in the browser.

In: a loaded :class:`~littune.model.LiTModel` and, optionally, a :class:`~littune.search.SearchIndex`; it
answers through the model's inference methods (:mod:`littune.inference`). Out: a FastAPI app (a JSON API and
the page in ``static/``) that only the host names it was started for may use.

* :mod:`~littune.serve.app` -- :func:`create_app`: the routes, the upload and prompt limits.
* :mod:`~littune.serve.heatmap` -- ``POST /api/heatmap``.
* :mod:`~littune.serve.webguard` -- the Host / Origin / Fetch-Metadata checks against other sites' pages.
* :mod:`~littune.serve.bodylimit` -- the request body counted as it arrives (413 before it is stored).

FastAPI is imported by :mod:`~littune.serve.app` only, so the rest of littune needs no ``serve`` extra.
"""
