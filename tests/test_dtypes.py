"""fovea/oip.py's one table of datatypes agrees with NumPy, ONNX and ONNX Runtime, which it names."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from fovea import oip


def test_sizes_and_numpy_types_agree() -> None:
    for d in oip.DTYPES:
        if d.numpy is not None:
            assert np.dtype(d.numpy).itemsize == d.size, d
            assert oip.oip_dtype(np.zeros(1, d.numpy)) == d.name
    assert oip.ELEMENT_BYTES["BYTES"] == 0 and oip.ELEMENT_BYTES["BF16"] == 2


def test_onnx_element_types_agree() -> None:
    for d in oip.DTYPES:
        name = TensorProto.DataType.Name(d.onnx)
        if d.numpy is not None:
            assert helper.tensor_dtype_to_np_dtype(d.onnx) == np.dtype(d.numpy), (d, name)
    assert oip.ONNX_TO_OIP[TensorProto.UINT32] == "UINT32" and oip.ONNX_TO_OIP[TensorProto.STRING] == "BYTES"


def test_onnx_runtime_type_strings_agree() -> None:
    """A model with one input of each type: ONNX Runtime's names for them are the table's."""
    for d in oip.DTYPES:
        if d.name == "BF16":
            continue  # ONNX Runtime's CPU provider has no Identity kernel for bfloat16
        x = helper.make_tensor_value_info("x", d.onnx, [1])
        y = helper.make_tensor_value_info("y", d.onnx, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == d.ort, d
        onnx.checker.check_model(model)


def test_the_native_parts_table_is_generated_from_this_one() -> None:
    """fovea/oip_dtypes.h, which the gateway's and the worker's native code read, is what `python -m fovea.oip`
    writes from DTYPES: an edit to either alone fails here."""
    header = pathlib.Path(oip.__file__).with_name(oip.HEADER)
    assert header.read_text() == oip.c_header(), "fovea/oip_dtypes.h is stale: run `python -m fovea.oip`"
