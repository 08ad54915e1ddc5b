"""Export: a trained model out of littune, for programs that do not import it.

In: a :class:`~littune.model.LiTModel` (and, for the web page, a search index of :mod:`littune.search`).
Out: ONNX graphs plus tokenizer and pre-processing JSON that onnxruntime runs alone, a static search page that
runs in the browser, or the model answering open_clip's calls.

* :mod:`~littune.export.onnx` -- ``littune export``: the image and text graphs, each checked against torch.
* :mod:`~littune.export.onnx_join` -- an ``onnx:`` tower's own graph joined to the head in one file.
* :mod:`~littune.export.web` -- ``littune export --format web``: the page in ``web_demo/`` plus the index.
* :mod:`~littune.export.openclip` -- ``create_model_and_transforms``/``get_tokenizer``, open_clip's convention.
"""
