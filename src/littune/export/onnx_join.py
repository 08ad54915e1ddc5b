"""One ``image.onnx`` for an ``onnx:`` image tower: the tower's own graph, then littune's image side.

torch cannot trace through a tower that already is an ONNX graph, so its export is put together from
two graphs joined at the output the tower reads (``onnx.compose.merge_models``):

* the tower's graph cut down to its input and that output (:meth:`~littune.towers.onnx.ONNXTower.graph`:
  what a feature layer inside a larger graph does not need, such as the classifier after it, is left out);
* what littune computes on that output, exported from torch on its own (:func:`littune.towers.runtime.onnx_bytes`)
  at the tower graph's opset (the dynamo exporter writes opset 18 and up: a tower graph below it is converted
  up to 18 first, ``onnx.version_converter``, and the joined graph is checked against littune's embeddings as
  every export is): the tower's pooling (:meth:`~littune.towers.onnx.ONNXTower.pool`), the
  image head and the L2 normalisation -- what ``LiTModel.encode_image`` does after the tower.

The head's names are prefixed so that none clashes with the tower's, and the joined graph reads
``pixels`` and writes ``image_embeddings`` (through Identity nodes), as the export of a torch tower does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..towers.exporters import OPSETS, onnx_bytes

PREFIX = "littune_head/"


class _PooledHead(nn.Module):
    """The tower's read output -> pooled -> image head -> L2-normalised image embeddings."""

    def __init__(self, model):
        super().__init__()
        self.pool, self.head = model.image_tower.pool, model.image_head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.pool(features)), dim=-1)


def _opset(graph) -> int:
    return next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 17)


def _head_graph(model, example: torch.Tensor, opset: int, exporter: str):
    import onnx

    axes = {"features": {0: "batch"}, "image_embeddings": {0: "batch"}}
    data = onnx_bytes(_PooledHead(model).eval(), (example,), ["features"], "image_embeddings", axes, opset=opset,
                      exporter=exporter)
    return onnx.load_from_string(data)


def _renamed_io(graph, old: str, new: str, *, output: bool) -> None:
    """Expose the graph input or output ``old`` as ``new`` through an Identity node."""
    import onnx

    ends = graph.output if output else graph.input
    (info,) = [v for v in ends if v.name == old]
    renamed = onnx.ValueInfoProto()
    renamed.CopyFrom(info)
    renamed.name = new
    ends.remove(info)
    ends.append(renamed)
    node = onnx.helper.make_node("Identity", [old] if output else [new], [new] if output else [old],
                                 name=f"{PREFIX}{'output' if output else 'input'}")
    if output:
        graph.node.append(node)
    else:
        graph.node.insert(0, node)


def joined_image_graph(model, exporter: str = "torchscript") -> bytes:
    """The bytes of ``image.onnx`` for ``model``, whose image tower is an ``onnx:`` tower; the head exported
    with ``exporter`` (:data:`littune.towers.exporters.EXPORTERS`)."""
    import onnx

    tower = model.image_tower
    graph = tower.graph()
    if exporter == "dynamo" and _opset(graph) < OPSETS["dynamo"]:
        graph = onnx.version_converter.convert_version(graph, OPSETS["dynamo"])
    size = model.preprocess.size
    example = tower.read(torch.zeros(2, 3, size, size))
    head = _head_graph(model, example, _opset(graph), exporter)
    graph.ir_version = head.ir_version = max(graph.ir_version, head.ir_version)
    joined = onnx.compose.merge_models(graph, head, io_map=[(tower.output_name, "features")], prefix2=PREFIX)
    if tower.input_name != "pixels":
        _renamed_io(joined.graph, tower.input_name, "pixels", output=False)
    _renamed_io(joined.graph, f"{PREFIX}image_embeddings", "image_embeddings", output=True)
    opsets = {o.domain: o.version for o in joined.opset_import}  # merge_models lists a shared domain twice
    del joined.opset_import[:]
    joined.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
    onnx.checker.check_model(joined)
    return joined.SerializeToString()
