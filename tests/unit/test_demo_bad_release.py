"""The demo's bad release: signed like any release, every prediction one class off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop.artifacts.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_artifact,
)
from edgeloop.artifacts.store import DirectoryStore
from edgeloop.artifacts.verify import verify_artifact
from edgeloop.demo.bad_release import build_bad_release
from edgeloop.demo.supervisor import DemoError

MODEL = "toy"


def toy_model(weights: np.ndarray) -> onnx.ModelProto:
    """x (N, 4) -> x @ W.T (N, 10), W stored (out, in) as the static-int8 export stores
    the output layer (the layout a weight-rotating bad release once missed)."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["logits"], transB=1)],
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def predict(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    out: np.ndarray = session.run(None, {"x": x})[0]
    return out


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Path, Path]:
    priv, pub = generate_keypair(tmp_path / "keys")
    stage = tmp_path / "stage"
    stage.mkdir()
    rng = np.random.default_rng(0)
    onnx.save(toy_model(rng.normal(size=(10, 4))), str(stage / "model.onnx"))
    sign_artifact(stage, load_private_key(priv), model_name=MODEL, version=1,
                  files=["model.onnx"])  # fmt: skip
    root = tmp_path / "store"
    DirectoryStore(root).put(stage)
    return root, priv, pub


def test_bad_release_is_signed_and_moves_every_prediction_to_the_next_class(
    store: tuple[Path, Path, Path],
) -> None:
    root, priv, pub = store
    version = build_bad_release(root, MODEL, 1, priv)
    assert version == 2
    bad = root / MODEL / "2"
    # A device accepts it: signature, manifest hashes, newer than what it runs.
    manifest = verify_artifact(bad, load_public_key(pub), min_version=1)
    assert (manifest.model_name, manifest.version) == (MODEL, 2)
    x = np.random.default_rng(1).normal(size=(200, 4)).astype(np.float32)
    good_logits, bad_logits = (
        predict(root / MODEL / "1" / "model.onnx", x),
        predict(bad / "model.onnx", x),
    )
    assert (bad_logits.argmax(-1) == (good_logits.argmax(-1) + 1) % 10).all()
    # Confidences are unchanged: the same logits, one class further on.
    np.testing.assert_allclose(np.sort(bad_logits, -1), np.sort(good_logits, -1))


def test_a_missing_base_version_is_named(store: tuple[Path, Path, Path]) -> None:
    root, priv, _ = store
    with pytest.raises(DemoError, match=r"toy/7/model.onnx"):
        build_bad_release(root, MODEL, 7, priv)
