"""Pictures of a training run: the per-epoch curves and the test-set confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_training_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="loss")
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation"), ("test_accuracy", "test")):
        ax_err.plot(epochs, [100 * (1 - h[key]) for h in history], "o-", label=label)
    ax_err.set(xlabel="epoch", ylabel="error (%)", yscale="log", title="error rate")
    percent = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax_err.yaxis.set_major_formatter(percent)
    ax_err.yaxis.set_minor_formatter(percent)
    for ax in (ax_loss, ax_err):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_xticks(epochs)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrix(matrix: np.ndarray, path: Path, title: str) -> None:
    """Rows are true digits, columns predictions; the diagonal is hidden in the colour scale to show errors."""
    errors = matrix.astype(float).copy()
    np.fill_diagonal(errors, 0)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(errors, cmap="Reds")
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="black" if i != j else "tab:green")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit", title=title)
    fig.colorbar(image, ax=ax, label="misclassified images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
