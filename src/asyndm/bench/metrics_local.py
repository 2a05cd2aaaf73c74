"""Shared pieces of the metrics that read local weights: path checks, image preprocessing.

Every such metric takes its weights from a local path given by the user (``MetricOptions.paths``
/ the ``--metric-path NAME=PATH`` style options); nothing is downloaded (``local_files_only``)
and nothing is unpickled (safetensors only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "clip_pixels", "require_folder"]

# CLIP's published normalisation, used by OpenCLIP's ViT-H-14 and by ImageReward's BLIP
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def require_folder(metric: str, path: str | None, option: str,
                   needs: Sequence[str | tuple[str, ...]] = ()) -> Path:
    """The folder ``path`` of ``metric``, checked to hold each of ``needs``.

    An entry of ``needs`` that is a tuple is satisfied by any one of its names. Raises a
    one-line ``ValueError`` naming the path (and the option that sets it) otherwise.
    """
    if path is None:
        raise ValueError(f"the {metric} metric needs its local weights folder ({option})")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"the {metric} metric's weights folder {folder} does not exist "
                         f"(set by {option})")
    for need in needs:
        names = (need,) if isinstance(need, str) else need
        if not any((folder / n).is_file() for n in names):
            raise ValueError(f"the {metric} metric's weights folder {folder} has no "
                             f"{' or '.join(names)} (set by {option})")
    return folder


def clip_pixels(images: Sequence[Image.Image], size: int, mean: Sequence[float] = OPENAI_MEAN,
                std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """CLIP-style preprocessing: shorter side to ``size`` (bicubic), centre crop, normalise.

    The rounding follows torchvision's ``Resize(size)`` and ``CenterCrop(size)`` on PIL
    images (long side ``int(size * long / short)``, crop offset ``round((h - size) / 2)``),
    which OpenCLIP and ImageReward use, without needing torchvision.

    Returns:
        ``(B, 3, size, size)`` float32.
    """
    out = []
    for image in images:
        im = image.convert("RGB")
        w, h = im.size
        if w <= h:
            new = (size, int(size * h / w))
        else:
            new = (int(size * w / h), size)
        if new != (w, h):
            im = im.resize(new, Image.BICUBIC)
        w, h = im.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        out.append(np.asarray(im, dtype=np.float32) / 255.0)  # (S, S, 3)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # (B, 3, S, S)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
