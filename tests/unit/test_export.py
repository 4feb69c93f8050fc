"""ONNX export and int8 quantization produce what the edge expects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeloop.tasks.digits import get_task
from edgeloop.trainer.budget import measure
from edgeloop.trainer.export import (
    OPSET,
    ExportError,
    export_onnx,
    onnx_logits,
    quantize,
    validate_fp32,
)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = get_task("digits").build_student().eval()
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx(model, torch.zeros(1, 1, 8, 8), path)
    return model, path


def test_export_pins_opset_and_matches_torch(fp32: tuple[torch.nn.Module, Path]) -> None:
    model, path = fp32
    opsets = {o.domain: o.version for o in onnx.load(path).opset_import}
    assert opsets[""] == OPSET
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    assert validate_fp32(model, path, x) < 1e-4
    assert onnx_logits(path, x).shape == (5, 10)


def test_static_is_qdq_and_dynamic_uses_integer_kernels(
    fp32: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    _, path = fp32
    calib = np.random.default_rng(1).random((20, 1, 8, 8), dtype=np.float32) - 0.5
    static = quantize(path, tmp_path / "s.onnx", "static", calib)
    dynamic = quantize(path, tmp_path / "d.onnx", "dynamic", calib)
    s_ops = {n.op_type for n in onnx.load(static).graph.node}
    d_ops = {n.op_type for n in onnx.load(dynamic).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= s_ops
    assert "ConvInteger" in d_ops
    assert static.stat().st_size < path.stat().st_size / 2
    budget = measure(static, calib, tmp_path)
    assert budget.size_bytes == static.stat().st_size
    assert budget.p99_ms >= budget.p50_ms > 0


def test_static_without_calibration_is_refused(
    fp32: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="calibration"):
        quantize(fp32[1], tmp_path / "s.onnx", "static")
