"""Batched, differentiable ``RandomResizedCrop`` + ``RandomHorizontalFlip`` on image tensors (N, C, H, W).

IntraQ applies ``RHF(RRC(size, scale=(augMargin, 1)))`` per sample, both while synthesising images (with
probability 0.5 per step, gradients flowing back to the pixels) and while fine-tuning on the synthetic set
(IntraQ ``data_generate/distill_data.py`` and ``main_direct.py: direct_dataset``). The official code loops
over the batch calling torchvision on each image; here the same transform is one ``grid_sample`` call:

- crop box per sample as in torchvision's ``RandomResizedCrop.get_params``: area fraction s ~ U(scale),
  log aspect ratio ~ U(log 3/4, log 4/3), w = round(sqrt(s*H*W*r)), h = round(sqrt(s*H*W/r)); up to 10
  draws, the first one that fits is used, else the whole image (torchvision's fallback for square images);
  top-left corner uniform over the integer positions;
- resize of the crop back to H x W with bilinear interpolation, ``align_corners=False``, no antialiasing:
  the sampling grid reproduces ``F.interpolate(crop, (H, W), mode="bilinear")`` exactly (source coordinate
  (dst + 0.5) * h / H - 0.5 clamped to [0, h - 1]), i.e. torchvision's tensor resize of the PyTorch 1.x era;
- horizontal flip with probability 0.5 per sample (reverses the sampling grid).

All randomness comes from the CPU ``torch.Generator`` passed in, so runs are repeatable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rrc_params(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    gen: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop boxes (top, left, h, w), each a float tensor of ``n`` integer values (torchvision's sampler)."""
    area = height * width
    target = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=gen) * area
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(log_r)
    cw = torch.round(torch.sqrt(target * r))
    ch = torch.round(torch.sqrt(target / r))
    ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # index of the first box that fits
    has = ok.any(1)
    cw = torch.where(has, cw.gather(1, first)[:, 0], torch.tensor(float(width)))
    ch = torch.where(has, ch.gather(1, first)[:, 0], torch.tensor(float(height)))
    top = torch.floor(torch.rand(n, generator=gen) * (height - ch + 1))
    left = torch.floor(torch.rand(n, generator=gen) * (width - cw + 1))
    return top, left, ch, cw


def _source_coords(start: torch.Tensor, size: torch.Tensor, out: int) -> torch.Tensor:
    """(n, out) source pixel coordinates of a bilinear resize of [start, start + size) to ``out`` pixels."""
    dst = torch.arange(out, dtype=torch.float32)[None, :]
    src = (dst + 0.5) * (size[:, None] / out) - 0.5
    src = torch.minimum(src.clamp(min=0.0), size[:, None] - 1)
    return src + start[:, None]


def resized_crop(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop box i of image i, resized (bilinear) to the input size, optionally flipped; differentiable."""
    n, _, h, w = images.shape
    sx = _source_coords(left.float(), width.float(), w)  # (n, w)
    sy = _source_coords(top.float(), height.float(), h)  # (n, h)
    if flip is not None:
        sx = torch.where(flip[:, None], sx.flip(1), sx)
    gx = (2 * sx + 1) / w - 1  # grid_sample, align_corners=False: pixel p sits at (2p + 1) / size - 1
    gy = (2 * sy + 1) / h - 1
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=-1)
    grid = grid.to(device=images.device, dtype=images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop_flip(
    images: torch.Tensor, scale: tuple[float, float], gen: torch.Generator, flip: bool = True
) -> torch.Tensor:
    """``RHF(RRC(size=H, scale))`` applied independently to every image of the batch."""
    n, _, h, w = images.shape
    top, left, ch, cw = rrc_params(n, h, w, scale, gen)
    mask = torch.rand(n, generator=gen) < 0.5 if flip else None
    return resized_crop(images, top, left, ch, cw, mask)
