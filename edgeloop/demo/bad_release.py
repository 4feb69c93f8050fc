"""The demo's deliberately bad release: a signed model that is worse in the field.

It is the serving model with its outputs rotated by one class (a Gather after the last
node): class c's logit becomes class c+1's, so confidences are unchanged and every
prediction moves to the next class. It is signed with the release key like any release, so it passes
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
        DemoError: the base artifact is missing, or its output has no static class axis.
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
    # A Gather over the class axis after the last node, whatever the layers' layout
    # (quantized weights are stored (out, in) or (in, out) depending on the export):
    # new[j] = old[(j - 1) mod classes], i.e. class c's logit becomes class c+1's.
    out = graph.graph.output[0]
    before = f"{out.name}__before_rotation"
    for node in graph.graph.node:
        node.output[:] = [before if o == out.name else o for o in node.output]
    indices = np.roll(np.arange(classes, dtype=np.int64), 1)
    graph.graph.initializer.append(numpy_helper.from_array(indices, "demo_rotated_classes"))
    graph.graph.node.append(
        onnx.helper.make_node(
            "Gather", [before, "demo_rotated_classes"], [out.name], axis=-1,
            name="demo_rotate_classes",
        )
    )  # fmt: skip
    onnx.checker.check_model(graph)
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
