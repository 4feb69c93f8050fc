"""The demo's deliberately bad release: a signed model that is worse in the field.

It is the serving model with its output layer's columns (and bias) rotated by one class:
class c's logit becomes class c+1's, so confidences are unchanged and every prediction
moves to the next class. It is signed with the release key like any release, so it passes
every check a device makes (signature, manifest, target); only the field can tell it is
bad, which is what the rollout judge is for. No gate would pass it (its holdout accuracy
is near 0), so the demo releases it with `edgeloop models release --override-gate`, the
operator's override, which is logged and recorded in the release's `reason`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from edgeloop.artifacts.signing import load_private_key, sign_artifact
from edgeloop.artifacts.store import DirectoryStore
from edgeloop.demo.supervisor import DemoError

MODEL_FILE = "model.onnx"
CARD_FILE = "model-card.json"


def build_bad_release(store_root: Path, model: str, base_version: int, private_key: Path) -> int:
    """Write version `max(store) + 1` of `model`: `base_version` with rotated outputs.

    Args:
        store_root: the trainer's DirectoryStore root (`<home>/trainer/store`).
        model: model name, e.g. "digits-student".
        base_version: the version whose weights are rotated (the one serving now).
        private_key: the release signing key (`<home>/keys/release.key`).

    Returns:
        The new version number.

    Raises:
        DemoError: the base artifact is missing, or its graph has no output layer whose
            weights and bias have one column per class.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    store = DirectoryStore(store_root)
    base = store_root / model / str(base_version)
    if not (base / MODEL_FILE).is_file():
        raise DemoError(f"no artifact {base / MODEL_FILE}: cannot build the bad release")
    version = max(store.versions(model), default=base_version) + 1
    graph = onnx.load(str(base / MODEL_FILE))
    classes = _classes(graph)
    rotated = 0
    for init in graph.graph.initializer:
        arr = numpy_helper.to_array(init)
        # The output layer: the only parameters whose last axis is the class count and
        # that feed the graph's output (the bias and the (quantized) weight matrix).
        if arr.ndim >= 1 and arr.shape[-1] == classes and _feeds_output(graph, init.name):
            init.CopyFrom(numpy_helper.from_array(np.roll(arr, 1, axis=-1), init.name))
            rotated += 1
    if rotated == 0:
        raise DemoError(f"{base / MODEL_FILE}: found no output layer with {classes} columns")
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        onnx.save(graph, str(stage / MODEL_FILE))
        files = [MODEL_FILE]
        if (base / CARD_FILE).is_file():
            shutil.copy2(base / CARD_FILE, stage / CARD_FILE)
            files.append(CARD_FILE)
        sign_artifact(
            stage, load_private_key(private_key), model_name=model, version=version, files=files
        )
        store.put(stage)
    return version


def _classes(graph: object) -> int:
    out = graph.graph.output[0]  # type: ignore[attr-defined]
    dims = out.type.tensor_type.shape.dim
    if not dims or not dims[-1].dim_value:
        raise DemoError("the model's output has no static class dimension")
    return int(dims[-1].dim_value)


def _feeds_output(graph: object, name: str) -> bool:
    """Whether initializer `name` is an input of a node on the path to the last output.

    Walks back from the graph's output through the nodes (the tail of a classifier is a
    few nodes: Gemm or MatMul + Add, perhaps DequantizeLinear in front of them).
    """
    g = graph.graph  # type: ignore[attr-defined]
    producers = {o: n for n in g.node for o in n.output}
    frontier = [g.output[0].name]
    seen: set[str] = set()
    depth = 0
    while frontier and depth < 6:
        nxt: list[str] = []
        for tensor in frontier:
            node = producers.get(tensor)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if name in node.input:
                return True
            # Stop at the previous layer's activation: only the last layer is rotated.
            if node.op_type in ("Relu", "Gelu", "Sigmoid", "Tanh"):
                continue
            nxt.extend(node.input)
        frontier = nxt
        depth += 1
    return False
