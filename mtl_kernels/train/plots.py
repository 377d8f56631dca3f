"""Pictures of a run, with matplotlib (Agg: no display needed): loss curves and a prediction grid."""

from __future__ import annotations

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(history: list[dict], path: str) -> None:
    """One line per training loss (total and each task) over the epochs, log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = list(history[0]["train_loss"]) if history else []
    epochs = [r["epoch"] for r in history]
    for k in keys:
        ax.plot(epochs, [max(r["train_loss"].get(k, float("nan")), 1e-8) for r in history], label=k, marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _show(task: str, x: torch.Tensor, is_target: bool):
    """An image (H, W[, 3]) and its colormap for one task's prediction or target."""
    x = x.float().cpu()
    if task in ("semseg", "human_parts"):
        labels = x if is_target else x.argmax(0)
        labels = labels.reshape(labels.shape[-2:]).clone()
        labels[labels == 255] = -1
        return labels.numpy(), "tab20"
    if task == "normals":
        n = x / x.norm(dim=0, keepdim=True).clamp_min(1e-12)
        return ((n + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy(), None
    y = x.reshape(x.shape[-2:])
    if task in ("edge", "sal") and not is_target:
        y = torch.sigmoid(y)
    if task == "depth":
        y = torch.where(y == 255, torch.nan, y) if is_target else y
    return y.numpy(), "viridis" if task == "depth" else "gray"


@torch.no_grad()
def plot_predictions(trainer, path: str) -> None:
    """Rows: validation images; columns: the input, then each task's prediction and ground truth."""
    plt = _pyplot()
    n = min(trainer.cfg["num_images"], len(trainer.val_set))
    if n == 0:
        return
    items = [trainer.val_set[i] for i in range(n)]
    image = torch.stack([it["image"] for it in items]).to(trainer.device)
    trainer.model.eval()
    out = trainer.model(image)
    tasks = trainer.tasks
    cols = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols, 1.5 * n), squeeze=False)
    mean = torch.tensor(getattr(trainer.val_set, "mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
    std = torch.tensor(getattr(trainer.val_set, "std", (0.229, 0.224, 0.225))).view(3, 1, 1)
    for r, item in enumerate(items):
        img = (item["image"].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[r][0].imshow(img)
        for k, t in enumerate(tasks):
            for j, (x, is_target) in enumerate(((out[t][r], False), (item[t], True))):
                arr, cmap = _show(t, x, is_target)
                axes[r][1 + 2 * k + j].imshow(arr, cmap=cmap, interpolation="nearest")
    titles = ["input"] + [f"{t} {kind}" for t in tasks for kind in ("pred", "gt")]
    for c, title in enumerate(titles):
        axes[0][c].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
