"""Expert maps: which expert each patch of an image goes to (top-1), per MoE layer, clean next to corrupted.

A layer's tokens are (prefix tokens +) a square patch grid in raster order: ViT-MoE's class token is dropped
(``model.num_prefix_tokens``) and the rest reshaped to its grid; a Swin-MoE stage's tokens are its own H x W map
(finer in early stages). The map is drawn over the model's input image, one colour per expert.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from ..metrics import RoutingRecorder  # noqa: E402

__all__ = ['expert_colormap', 'patch_grid', 'record_top1', 'save_expert_maps']


def patch_grid(top1: Tensor, num_prefix_tokens: int = 0) -> Tensor:
    """(images, tokens) top-1 experts -> (images, side, side), dropping ``num_prefix_tokens`` leading tokens.

    E.g. 17 ViT tokens with 1 class token -> a 4 x 4 grid; 64 Swin tokens -> 8 x 8.
    """
    patches = top1[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f'{patches.shape[1]} patch tokens (after {num_prefix_tokens} prefix tokens) do not form a '
                         'square grid')
    return patches.reshape(top1.shape[0], side, side)


def expert_colormap(num_experts: int) -> ListedColormap:
    """Distinct colours per expert: tab10 without its gray (which reads as 'no overlay' on the image's dark
    background) up to 9 experts, tab20 up to 20, then a sampled hsv wheel."""
    if num_experts <= 9:
        colors = [c for i, c in enumerate(plt.get_cmap('tab10').colors) if i != 7][:num_experts]
    elif num_experts <= 20:
        colors = plt.get_cmap('tab20').colors[:num_experts]
    else:
        colors = plt.get_cmap('hsv')(np.linspace(0, 1, num_experts, endpoint=False))
    return ListedColormap(colors)


@torch.no_grad()
def record_top1(model: nn.Module, images: Tensor, device: torch.device) -> Dict[str, Tensor]:
    """{layer: (images, tokens)} top-1 experts of one eval-mode forward pass."""
    was_training = model.training
    model.eval()
    try:
        with RoutingRecorder(model) as recorder:
            model(images.to(device))
    finally:
        model.train(was_training)
    return recorder.top1()


def _to_display(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (B, C, H, W) model inputs -> (B, H, W[, 3]) floats in [0, 1] for imshow."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images.float().cpu() * std_t + mean_t).clamp(0, 1)
    return pixels[:, 0].numpy() if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1).numpy()


def save_expert_maps(
        model: nn.Module,
        clean: Tensor,
        corrupted: Tensor,
        corrupted_title: str,
        data_config: Dict,
        num_experts: int,
        out_dir: Path,
        prefix: str,
        device: torch.device,
) -> list[str]:
    """One PNG per MoE layer: rows = sample images; columns = clean input, its expert map, corrupted input, its map.

    ``clean``/``corrupted`` are the same images as normalised model inputs (B, C, H, W). Returns the file paths.
    """
    num_prefix = int(getattr(model, 'num_prefix_tokens', 0))
    maps_clean = record_top1(model, clean, device)
    maps_corrupt = record_top1(model, corrupted, device)
    shown_clean = _to_display(clean, data_config['mean'], data_config['std'])
    shown_corrupt = _to_display(corrupted, data_config['mean'], data_config['std'])
    cmap = expert_colormap(num_experts)
    gray = shown_clean.ndim == 3
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer in maps_clean:
        grids = (patch_grid(maps_clean[layer], num_prefix).numpy(), patch_grid(maps_corrupt[layer], num_prefix).numpy())
        rows = clean.shape[0]
        fig, axes = plt.subplots(rows, 4, figsize=(8, 2.1 * rows + 0.9), squeeze=False)
        height, width = shown_clean.shape[1:3]
        for r in range(rows):
            for col, (shown, grid, title) in enumerate(((shown_clean, grids[0], 'clean'),
                                                         (shown_corrupt, grids[1], corrupted_title))):
                image_ax, map_ax = axes[r, 2 * col], axes[r, 2 * col + 1]
                image_ax.imshow(shown[r], cmap='gray' if gray else None, vmin=0, vmax=1)
                map_ax.imshow(shown[r], cmap='gray' if gray else None, vmin=0, vmax=1)
                map_ax.imshow(grid[r], cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5, alpha=0.55,
                              interpolation='nearest', extent=(-0.5, width - 0.5, height - 0.5, -0.5))
                if r == 0:
                    image_ax.set_title(title, fontsize=9)
                    map_ax.set_title(f'experts ({grid.shape[1]}x{grid.shape[2]} patches)', fontsize=9)
                for ax in (image_ax, map_ax):
                    ax.set_xticks([])
                    ax.set_yticks([])
        handles = [Patch(color=cmap(e), label=f'expert {e}') for e in range(num_experts)]
        fig.legend(handles=handles, loc='lower center', ncol=min(num_experts, 8), fontsize=8, frameon=False)
        fig.suptitle(f'{prefix}: top-1 expert per patch, {layer}', fontsize=10)
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (num_experts > 8), 1, 0.97))
        path = out_dir / f'{prefix}_{layer.replace(".", "-")}.png'
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths
