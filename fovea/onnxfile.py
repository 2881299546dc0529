"""Checks on an ONNX file that both the registry (at registration) and workers (at load) make.

External-data tensors name files beside the model (`location` in the tensor's external_data)
that ONNX and ONNX Runtime read when they load it: from a registry or worker, that is a path
on the service's own disk (`../../etc/...`). Fovea stores and ships one self-contained file, so
such models are refused before any loader sees them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fovea.errors import InvalidArgument

EXTERNAL_DATA_REFUSED = "model uses external data tensors; export with external_data=False"


def _node_tensors(nodes: Iterable[Any]) -> Iterator[Any]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for graph in attr.graphs:
                yield from _graph_tensors(graph)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def all_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of an onnx.ModelProto: initializers, constants and attributes, in
    subgraphs (If, Loop, Scan) and local functions too."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def external_data_tensors(model: Any) -> list[str]:
    """Names of the tensors whose data lives outside the file."""
    import onnx

    return [t.name for t in all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data]


def refuse_external_data(model: Any) -> None:
    names = external_data_tensors(model)
    if names:
        shown = ", ".join(repr(n) for n in names[:5])
        raise InvalidArgument(f"{EXTERNAL_DATA_REFUSED} ({len(names)} tensor(s): {shown})")


def refuse_external_data_bytes(data: bytes) -> Any:
    """refuse_external_data of a serialized model, which it returns parsed (onnx.ModelProto); InvalidArgument too
    when it does not parse."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - a file that does not parse is refused, with the parser's reason
        raise InvalidArgument(f"not a valid ONNX model: {str(exc)[:300]}") from None
    refuse_external_data(model)
    return model
