"""Small in-notebook views: sample grids with boxes and training curves (paper figures live in plots.py)."""
from __future__ import annotations

import matplotlib.pyplot as plt

COLOURS = ("tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:pink", "tab:olive")


def sample_grid(dataset, n: int = 8, cols: int = 4, title: str = ""):
    """The first `n` images of a `CocoDetectionSet` with their boxes coloured by class."""
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, range(n)):
        image, target = dataset[i]
        ax.imshow(image.permute(1, 2, 0).numpy())
        for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1,
                                       color=COLOURS[(label - 1) % len(COLOURS)]))
    handles = [plt.Line2D([], [], color=COLOURS[i % len(COLOURS)], label=name) for i, name in enumerate(dataset.classes)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    plt.close(fig)  # returned, not left open: the cell shows it once, whatever the backend (nbval, papermill)
    return fig


def training_curves(log: list[dict], title: str = ""):
    """Training loss per epoch and, where evaluated, validation mAP."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    epochs = [r["epoch"] + 1 for r in log]
    ax.plot(epochs, [r["loss"] for r in log], "o-", label="train loss (cls + box)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    evaluated = [r for r in log if "val_AP" in r]
    if evaluated:
        ax2 = ax.twinx()
        ax2.plot([r["epoch"] + 1 for r in evaluated], [r["val_AP"] for r in evaluated], "s--", color="tab:green",
                 label="val mAP@[.5:.95]")
        ax2.set_ylabel("val mAP")
        ax2.legend(loc="upper center", frameon=False)
    ax.legend(loc="upper right", frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    plt.close(fig)  # returned, not left open: the cell shows it once, whatever the backend (nbval, papermill)
    return fig


def distillation_curve(curves: dict, title: str = ""):
    """Formula 2 loss per iteration (mean over images), with its mean and std terms (paper Fig. 2c/2d)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(curves["iteration"], curves["loss"], label="total")
    ax.plot(curves["iteration"], curves["mean_term"], "--", label="mean term")
    if any(curves["std_term"]):
        ax.plot(curves["iteration"], curves["std_term"], ":", label="std term")
    ax.set_yscale("log")
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("BN-statistics loss (log)")
    ax.legend(frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    plt.close(fig)  # returned, not left open: the cell shows it once, whatever the backend (nbval, papermill)
    return fig


def distilled_grid(snapshots: dict, to_pixels, n: int = 4, title: str = ""):
    """The first `n` distilled images at each stored iteration (rows), shown as [0, 1] pixels (paper Fig. 4)."""
    iterations = sorted(snapshots)
    fig, axes = plt.subplots(len(iterations), n, figsize=(1.9 * n, 1.6 * len(iterations)), squeeze=False)
    for row, it in zip(axes, iterations):
        pixels = to_pixels(snapshots[it][:n].float()).clamp(0, 1)
        for ax, image in zip(row, pixels):
            ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"iter {it}")
    fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)  # returned, not left open: the cell shows it once, whatever the backend (nbval, papermill)
    return fig
