"""ONNX export, int8 quantization and validation with onnxruntime.

Opset is pinned (`OPSET`) so a device's onnxruntime version is a known quantity. The
exported graph has a dynamic batch axis; the edge runs batch 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from edgeloop.core.errors import EdgeloopError

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
QuantMode = Literal["static", "dynamic"]


class ExportError(EdgeloopError):
    """Export or quantization produced a model that does not run or does not match."""


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    model = model.to("cpu").eval()
    # The TorchScript exporter: stable output names and no onnxscript rewrite surprises for
    # these small convnets; dynamo=True is the future but changes graphs between releases.
    torch.onnx.export(
        model,
        (example[:1].cpu(),),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=OPSET,
        dynamo=False,
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return path


class _Calibration(CalibrationDataReader):  # type: ignore[misc]  # untyped base (onnxruntime)
    """Feeds clean training samples one at a time (the edge's batch size)."""

    def __init__(self, x: npt.NDArray[np.float32]) -> None:
        self._it = iter(x[i : i + 1] for i in range(len(x)))

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize(
    fp32: Path, out: Path, mode: QuantMode, calibration: npt.NDArray[np.float32] | None = None
) -> Path:
    if mode == "static" and calibration is None:
        raise ExportError("static quantization needs calibration data")
    static_calibration = calibration if mode == "static" else None
    prepped = fp32.with_name(fp32.stem + ".prep.onnx")
    # onnxruntime's quantizer logs one INFO line per tensor on the root logger; the trainer
    # is synchronous, so muting INFO for the duration hides nobody else's logs for long.
    logging.disable(logging.INFO)
    try:
        quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
        if static_calibration is not None:
            # QDQ, per-channel int8 weights: what ORT's CPU EP fuses into integer kernels.
            quantize_static(
                str(prepped),
                str(out),
                _Calibration(static_calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )
        else:
            quantize_dynamic(str(prepped), str(out), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
        prepped.unlink(missing_ok=True)
    return out


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(path: Path, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    sess = session(path, threads=2)
    return np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0], dtype=np.float32)


def validate_fp32(
    model: nn.Module, path: Path, x: npt.NDArray[np.float32], atol: float = 1e-3
) -> float:
    """The exported graph must reproduce torch's logits; returns the max abs difference."""
    with torch.no_grad():
        ref = model.to("cpu").eval()(torch.from_numpy(x)).numpy()
    diff = float(np.abs(onnx_logits(path, x) - ref).max())
    if diff > atol:
        raise ExportError(f"{path}: ONNX logits differ from torch by {diff:.2e} > {atol:.0e}")
    return diff
