"""Draw the quality benchmark's PNG plots: coreset length distributions and relevance at 5%."""

from __future__ import annotations

from pathlib import Path

from benchmarks.quality.pipeline import DOWNSTREAM_BUDGET


def write_plots(results: dict, folder: Path) -> dict[str, Path]:
    """Write lengths.png and relevance.png into ``folder``; return the path of each plot."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    return {"lengths": _lengths(results, folder / "lengths.png"),
            "relevance": _relevance(results, folder / "relevance.png")}


def _lengths(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    targets = list(next(iter(results["coreset_lengths"].values())))
    labels = list(results["coreset_lengths"])
    figure, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), sharey=True, squeeze=False)
    for axis, target in zip(axes[0], targets):
        data = [results["pool_lengths"]] + [results["coreset_lengths"][label][target] for label in labels]
        axis.boxplot(data, showfliers=False)
        axis.set_xticks(range(1, len(data) + 1), ["pool", *labels], rotation=45, ha="right", fontsize=8)
        axis.set_title(f"{target}: {DOWNSTREAM_BUDGET:.0%} coresets")
        axis.set_ylabel("tokens per sample")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _relevance(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    relevance = results["relevance"]
    labels = list(relevance)
    targets = list(next(iter(relevance.values())))
    width = 0.8 / len(labels)
    figure, axis = plt.subplots(figsize=(2.5 * len(targets) + 3, 4))
    for index, label in enumerate(labels):
        shares = [relevance[label][t][str(DOWNSTREAM_BUDGET)]["share"] for t in targets]
        axis.bar(np.arange(len(targets)) + index * width, shares, width, label=label)
    base = [relevance[labels[0]][t][str(DOWNSTREAM_BUDGET)]["base_rate"] for t in targets]
    axis.scatter(np.arange(len(targets)) + 0.4 - width / 2, base, color="black", marker="_", s=600,
                 label="pool base rate", zorder=3)
    axis.set_xticks(np.arange(len(targets)) + 0.4 - width / 2, targets)
    axis.set_ylabel(f"related share of the {DOWNSTREAM_BUDGET:.0%} coreset")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
