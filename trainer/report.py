"""Machine-readable JSON and a PNG of accuracies for every bootstrap and retrain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(
    doc: dict[str, Any],
    json_path: Path,
    png_path: Path,
    bars: dict[str, dict[str, float]],
    title: str,
) -> None:
    """`bars`: model label -> {holdout name: accuracy}."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    import matplotlib

    matplotlib.use("Agg")  # headless: trainers run without a display
    import matplotlib.pyplot as plt

    labels = list(bars)
    holdouts = sorted({h for scores in bars.values() for h in scores})
    width = 0.8 / max(1, len(holdouts))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    for i, holdout in enumerate(holdouts):
        xs = [j + i * width for j in range(len(labels))]
        ys = [bars[m].get(holdout, 0.0) for m in labels]
        rects = ax.bar(xs, ys, width, label=holdout)
        ax.bar_label(rects, fmt="%.3f", fontsize=7)
    ax.set_xticks(
        [j + width * (len(holdouts) - 1) / 2 for j in range(len(labels))], labels, fontsize=8
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
