"""A slimmed model runs under torch.compile and exports to ONNX with matching outputs."""
from __future__ import annotations

import io

import pytest
import torch

import nasprune.graph as G
import nasprune.slim as S
from zoo import build, random_keep


@pytest.fixture(scope="module")
def slimmed():
    model, x = build("cifar_resnet20A")
    graph = G.trace(model, x)
    return S.apply(model, graph, random_keep(graph, 1)).eval(), x


def test_torch_compile_matches_eager(slimmed):
    model, x = slimmed
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_onnx_export_matches_eager(slimmed):
    ort = pytest.importorskip("onnxruntime")
    model, x = slimmed
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-5)
