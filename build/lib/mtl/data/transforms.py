"""Batch preprocessing on tensors (CPU or CUDA): uint8 (B, H, W, 3) images -> normalised float.

The reference pipeline (torchvision on PIL images, one image at a time) is
  eval:  Resize(92) -> CenterCrop(80) -> Normalize
  train: Resize(92) -> RandomResizedCrop(88) -> CenterCrop(80) -> RandomHorizontalFlip -> Normalize
for 80-pixel inputs. For an input size S we scale those numbers by S/80 (resize to
round(S*92/80), random crop to round(S*88/80)), and do the work on whole batches on the training
device so the data loader only has to slice uint8 arrays. Random crops and flips are drawn per
image from a ``torch.Generator`` on the CPU, so results do not depend on the device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
DEFAULT_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

RESIZE_RATIO = 92 / 80  # reference Resize(92) before the 80-pixel crop
RANDOM_CROP_RATIO = 88 / 80  # reference RandomResizedCrop(88) before CenterCrop(80)
CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10


def resize_size(size: int) -> int:
    """Shorter side after the reference's pre-crop resize, e.g. 80 -> 92, 84 -> 97."""
    return int(round(size * RESIZE_RATIO))


def to_float_nchw(images, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) numpy array or tensor -> float32 (B, 3, H, W) in [0, 1] on ``device``.

    The uint8 batch is moved first (4x less to copy than floats), then converted on the device.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected images of shape (B, H, W, 3), got {tuple(tensor.shape)}")
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after `resize_shorter` to ``size``."""
    if min(height, width) == size:
        return height, width
    if height <= width:
        return size, max(1, int(size * width / height))
    return max(1, int(size * height / width)), size


def resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, C, H, W) so the shorter side is ``size`` (bilinear, antialiased like PIL)."""
    new_hw = resized_shape(*x.shape[-2:], size)
    if new_hw == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=new_hw, mode="bilinear", align_corners=False, antialias=True)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``size`` x ``size`` window, offsets rounded as torchvision's ``center_crop`` does."""
    height, width = x.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {size} pixels from an image of {height}x{width}")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return x[..., top:top + size, left:left + size]


class Normalize:
    """Per-channel ``(x - mean) / std`` on (B, 3, H, W) tensors of any device."""

    def __init__(self, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"normalize needs 3 means and 3 positive stds, got mean={mean}, std={std}")
        self.mean = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class EvalTransform:
    """Deterministic eval preprocessing: resize to round(S*92/80), centre-crop S, normalise."""

    def __init__(self, size: int, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
        self.size = int(size)
        self.normalize = Normalize(mean, std)

    def __call__(self, images, device: torch.device | str | None = None) -> torch.Tensor:
        x = to_float_nchw(images, device)
        x = center_crop(resize_shorter(x, resize_size(self.size)), self.size)
        return self.normalize(x).contiguous()

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


@dataclass(frozen=True)
class CropsAndFlips:
    """The random draws of `TrainTransform` for a batch: crop boxes (B, 4) and flips (B,).

    Slicing gives the draws of a part of the batch (``draws[start:stop]``): a training process
    that holds part of a batch draws for the whole batch and keeps its part, so its images get
    exactly the crops they would get in one process.
    """

    boxes: torch.Tensor
    flips: torch.Tensor

    def __getitem__(self, part: slice) -> CropsAndFlips:
        return CropsAndFlips(self.boxes[part], self.flips[part])

    def __len__(self) -> int:
        return len(self.flips)


class TrainTransform:
    """Reference training augmentation, per image random, on whole batches.

    Resize(round(S*92/80)) -> RandomResizedCrop(round(S*88/80), scale (0.08, 1), ratio (3/4, 4/3))
    -> CenterCrop(S) -> RandomHorizontalFlip -> Normalize. The random crop, the centre crop and the
    flip are one affine map per image, applied in a single bilinear ``grid_sample`` call.
    Randomness comes from ``generator`` (CPU ``torch.Generator``; the global RNG when None), or
    from ``draws`` made beforehand with `draw`.
    """

    def __init__(self, size: int, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                 *, generator: torch.Generator | None = None):
        self.size = int(size)
        self.crop_size = int(round(self.size * RANDOM_CROP_RATIO))
        self.normalize = Normalize(mean, std)
        self.generator = generator

    def __call__(self, images, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None, draws: CropsAndFlips | None = None) -> torch.Tensor:
        x = resize_shorter(to_float_nchw(images, device), resize_size(self.size))
        if draws is None:
            draws = self.draw(len(x), *images.shape[1:3], generator)
        if len(draws) != len(x):
            raise ValueError(f"draws are for {len(draws)} images, the batch has {len(x)}")
        grid = self._sampling_grid(draws.boxes, draws.flips, x.shape[-2], x.shape[-1]).to(x.device)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.normalize(out).contiguous()

    def draw(self, count: int, height: int, width: int, generator: torch.Generator | None = None) -> CropsAndFlips:
        """Random crops and flips for ``count`` images of ``height`` x ``width`` input pixels,
        drawn as `__call__` draws them (the same generator state gives the same draws)."""
        generator = generator if generator is not None else self.generator
        boxes = random_crop_boxes(count, *resized_shape(height, width, resize_size(self.size)), generator)
        flips = torch.rand(count, generator=generator) < 0.5
        return CropsAndFlips(boxes, flips)

    def _sampling_grid(self, boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, S, S, 2) source coordinates in grid_sample's [-1, 1] convention.

        Output pixel k (0..S-1) is pixel k + offset of the crop resized to C x C, whose centre is
        the fraction (k + offset + 0.5) / C of the crop box; a flip mirrors k to S - 1 - k.
        """
        offset = int(round((self.crop_size - self.size) / 2.0))
        k = torch.arange(self.size, dtype=torch.float64)
        frac = (k + offset + 0.5) / self.crop_size  # (S,)
        frac_x = torch.where(flips[:, None], frac.flip(0)[None, :], frac[None, :])  # (B, S)
        top, left, box_h, box_w = (boxes[:, i:i + 1].double() for i in range(4))
        src_x = 2.0 * (left + frac_x * box_w) / width - 1.0  # (B, S)
        src_y = 2.0 * (top + frac[None, :] * box_h) / height - 1.0  # (B, S)
        grid = torch.stack(torch.broadcast_tensors(src_x[:, None, :], src_y[:, :, None]), dim=-1)
        return grid.float()

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, crop={self.crop_size})"


def random_crop_boxes(batch: int, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per-image RandomResizedCrop boxes (top, left, h, w) as int64 (B, 4), vectorised.

    Same rule as torchvision: up to 10 tries of a random area fraction and log-uniform aspect
    ratio; the first box that fits wins; otherwise a central box with the ratio clamped.
    """
    area = height * width
    scale = torch.empty(batch, CROP_ATTEMPTS, dtype=torch.float64).uniform_(*CROP_SCALE, generator=generator)
    log_ratio = torch.empty(batch, CROP_ATTEMPTS, dtype=torch.float64).uniform_(
        math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator)
    pos = torch.rand(batch, CROP_ATTEMPTS, 2, dtype=torch.float64, generator=generator)
    ratio = torch.exp(log_ratio)
    box_w = torch.round(torch.sqrt(area * scale * ratio))
    box_h = torch.round(torch.sqrt(area * scale / ratio))
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    top = torch.floor(pos[..., 0] * (height - box_h + 1).clamp(min=1))
    left = torch.floor(pos[..., 1] * (width - box_w + 1).clamp(min=1))
    first = torch.argmax(fits.int(), dim=1)  # index of the first fitting try (0 when none fits)
    pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
    boxes = torch.stack([pick(top), pick(left), pick(box_h), pick(box_w)], dim=1)
    fallback = torch.tensor(_central_box(height, width), dtype=torch.float64)
    boxes = torch.where(fits.any(dim=1)[:, None], boxes, fallback[None, :])
    return boxes.long()


def _central_box(height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's fallback: the whole image, its aspect ratio clamped into CROP_RATIO."""
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
