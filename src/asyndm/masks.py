"""Cross-attention maps to region masks: threshold, priority, resize.

A subject's region is every pixel whose attention to the subject's tokens is at least
``threshold`` times that map's spatial mean. A pixel claimed by several subjects goes to
the subject with the larger ``k`` (ties: the earlier subject). Regions are carried as one
integer *label map*: ``-1`` for background, ``s`` for subject ``s``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKGROUND = -1


def region_labels(
    attention: torch.Tensor, k: torch.Tensor, threshold: float = 1.0
) -> torch.Tensor:
    """Threshold attention maps into one label map.

    Args:
        attention: ``(B, S, hm, wm)`` non-negative attention of each subject.
        k: ``(B, S)`` curve strength per subject; ``0`` marks a padded (absent) subject,
            which never claims a pixel.
        threshold: multiple of the spatial mean a pixel must reach.

    Returns:
        ``(B, hm, wm)`` int64 labels, :data:`BACKGROUND` where no subject claims the pixel.
    """
    if attention.ndim != 4 or k.shape != attention.shape[:2]:
        raise ValueError(
            f"attention must be (B, S, h, w) and k (B, S); got {tuple(attention.shape)}, "
            f"{tuple(k.shape)}"
        )
    attn = attention.float()
    mean = attn.mean(dim=(2, 3), keepdim=True)  # (B, S, 1, 1)
    claimed = attn >= (mean if threshold == 1.0 else threshold * mean)  # (B, S, hm, wm)
    # Priority: the claiming subject with the largest k; max takes the first on ties. A
    # pixel's score is its subject's k where claimed, else 0, so unclaimed pixels and padded
    # subjects (k = 0) never win.
    best_score, best = (claimed * k.float()[:, :, None, None]).max(dim=1)  # (B, hm, wm)
    return best.masked_fill(best_score <= 0, BACKGROUND)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``(B, hm, wm)`` labels to ``(B, *size)`` (non-square ok)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    up = F.interpolate(labels[:, None].float(), size=size, mode="nearest")  # (B, 1, h, w)
    return up[:, 0].long()  # (B, h, w)


def k_map_from_labels(labels: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-pixel curve strength: ``k[b, labels[b, y, x]]``, ``0`` on background.

    Args:
        labels: ``(B, h, w)`` int64 label map.
        k: ``(B, S)`` strengths.

    Returns:
        ``(B, h, w)`` float32.
    """
    bsz, h, w = labels.shape
    k0 = F.pad(k.float(), (1, 0))  # (B, S + 1): 0 = background
    idx = (labels + 1).reshape(bsz, h * w)  # (B, h*w)
    return k0.gather(1, idx).reshape(bsz, h, w)  # (B, h, w)


def initial_labels(
    token_positions: torch.Tensor, k: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The first step of dynamic masks: every pixel belongs to the *last* subject.

    As in the reference, "last" is the subject with the largest token position.

    Args:
        token_positions: ``(B, S)`` first token position of each subject (any value for
            padded subjects, which are skipped through ``k == 0``).
        k: ``(B, S)`` strengths.
        size: latent ``(h, w)``.

    Returns:
        ``(B, h, w)`` int64 labels.
    """
    pos = torch.where(k > 0, token_positions, torch.full_like(token_positions, -1))
    last = pos.argmax(dim=1)  # (B,)
    return last[:, None, None].expand(-1, *size).clone()  # (B, h, w)
