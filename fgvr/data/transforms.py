"""albumentations pipelines. They return uint8 CHW tensors (the model normalises them on the device)
and carry the ground-truth box (pascal_voc pixels, clipped to the image) through every op."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

from fgvr.runtime.config import AugmentConfig

BBOX = A.BboxParams(format="pascal_voc", clip=True)


def trivial_augment() -> A.BaseCompose:
    """TrivialAugment-style: one op chosen uniformly per image, with a random magnitude."""
    ops = [
        A.NoOp(),
        A.Affine(rotate=(-30, 30), p=1.0),
        A.Affine(shear={"x": (-17, 17), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-17, 17)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.3, 0.3), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.3, 0.3)}, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.9, contrast_limit=0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.9, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=0.9, hue=0, p=1.0),
        A.Sharpen(alpha=(0.1, 0.9), p=1.0),
        A.Posterize(num_bits=(2, 8), p=1.0),
        A.Solarize(threshold_range=(0.0, 1.0), p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
    ]
    return A.OneOf(ops, p=1.0)


def _resize(img_size: int, resize_ratio: float, resized: bool) -> list:
    """The square resize to resize_ratio * S, unless the images come resized (data.cache=decoded).
    Shrinking averages pixel areas: bilinear sampling alone would alias detail finer than the
    output can hold into false coarse patterns."""
    side = round(img_size * resize_ratio)
    return [] if resized else [A.Resize(side, side, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")]


def train_transform(img_size: int, resize_ratio: float, aug: AugmentConfig, resized: bool = False) -> A.Compose:
    """Square resize to resize_ratio * S, random crop S, flip, TrivialAugment, random erasing."""
    ops: list = [*_resize(img_size, resize_ratio, resized), A.RandomCrop(img_size, img_size)]
    if aug.hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if aug.trivial_augment:
        ops.append(trivial_augment())
    if aug.random_erasing > 0:
        ops.append(A.Erasing(fill="random", p=aug.random_erasing))
    return A.Compose(ops, bbox_params=BBOX)


def eval_transform(img_size: int, resize_ratio: float, resized: bool = False) -> A.Compose:
    """Square resize to resize_ratio * S, centre crop S."""
    return A.Compose([*_resize(img_size, resize_ratio, resized), A.CenterCrop(img_size, img_size)], bbox_params=BBOX)


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

