"""Datasets and transforms: the built-in digits set, torchvision's datasets and ImageNet-layout folders.

Every dataset yields RGB images through timm's transforms (random-resized crop and flip for training, optional
RandAugment and random erasing; resize and center crop for evaluation), so a grayscale set feeds the same 3-channel
supernet as ImageNet.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset

from .errors import UserError

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder")
NEEDS_DATA_DIR = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder")
FLIP_SAFE = ("cifar10", "cifar100", "fashion-mnist", "imagefolder")  # digits and MNIST change meaning when mirrored


@dataclass
class DataOptions:
    """The data keys of a run's config (their names there are the same)."""

    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    img_size: int = 224
    crop_scale_min: float = 0.08  # random-resized crop keeps at least this fraction of the image
    crop_pct: float | None = None  # evaluation: resize to img_size / crop_pct, then center-crop (None: timm's)
    hflip: float | None = None  # None: 0.5 where mirroring keeps the label, else 0
    randaugment: str | None = None  # timm RandAugment spec, e.g. "rand-m9-mstd0.5"
    reprob: float = 0.0  # random erasing probability
    color_jitter: float = 0.0
    skip_bad_images: bool = False  # image folders: replace an undecodable file by the next one instead of stopping

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DataOptions":
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})


class DigitsDataset(Dataset):
    """scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes) with a fixed stratified split:
    1,437 training and 360 validation images. Nothing is downloaded."""

    num_classes = 10

    def __init__(self, train: bool, transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0,
                                              stratify=digits.target)
        idx = train_idx if train else val_idx
        self.images = images[idx]
        self.targets = digits.target[idx].astype(np.int64).tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L").convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


class _ToRGB:
    """Wraps a transform so grayscale images enter it as RGB (picklable for data-loader workers)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img: Image.Image):
        return self.transform(img.convert("RGB"))


class BadImageError(UserError):
    """An image file that cannot be decoded, named in a one-line message, also when a data-loader worker raises it.

    torch re-raises a worker's exception in the main process as `type(text)`, `text` being "Caught … in DataLoader
    worker process N." and the worker's whole traceback, whose last line is this error's own: that line is kept."""

    def __init__(self, message: str):
        own = f"{type(self).__module__}.{type(self).__qualname__}: "
        lines = [line[len(own):] for line in message.splitlines() if line.startswith(own)]
        super().__init__(lines[-1] if lines else message)


def load_rgb(path: str) -> Image.Image:
    """torchvision's image loader, but a file PIL cannot decode (truncated, not an image) is a BadImageError."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Image.UnidentifiedImageError:  # its own message names the file object, not the file
        raise BadImageError(f"cannot read image {path!r}: not an image format PIL recognizes") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImageError(f"cannot read image {path!r}: {reason}") from None


_bad_files: set[str] = set()  # the image files this process found undecodable, each warned about once


class ImageFolder(tvd.ImageFolder):
    """torchvision's ImageFolder, but a file that cannot be decoded is an error naming it or, with `skip_bad_images`,
    a warning naming it (once in each loading process) and the next readable file in the folder's order in its place,
    as timm's ImageDataset does. The length stays, so batches stay full, distributed shards stay equal and an epoch
    yields as many images as before, the substitute twice; which file replaces which does not depend on the workers
    or the shuffle."""

    def __init__(self, root: str, transform=None, skip_bad_images: bool = False):
        super().__init__(root, transform=transform, loader=load_rgb)
        self.skip_bad_images = skip_bad_images

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            if self.skip_bad_images and path in _bad_files:
                continue
            try:
                image = self.loader(path)
            except BadImageError as exc:
                if not self.skip_bad_images:
                    raise
                _bad_files.add(path)
                print(f"warning: {exc}; the next image replaces it", file=sys.stderr, flush=True)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise BadImageError(f"no image in {self.root!r} can be read")


def build_transform(opts: DataOptions, train: bool):
    if train:
        hflip = opts.hflip if opts.hflip is not None else (0.5 if opts.data in FLIP_SAFE else 0.0)
        return create_transform(opts.img_size, is_training=True, scale=(opts.crop_scale_min, 1.0), hflip=hflip,
                                color_jitter=opts.color_jitter, auto_augment=opts.randaugment, re_prob=opts.reprob,
                                interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return create_transform(opts.img_size, is_training=False, crop_pct=opts.crop_pct, interpolation="bilinear",
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def build_dataset(opts: DataOptions, train: bool, transform=None) -> Dataset:
    """The training or validation split of `opts.data`; `transform` defaults to the split's own."""
    name = opts.data
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if transform is None:
        transform = build_transform(opts, train)
    if name == "digits":
        return DigitsDataset(train, transform)
    if not opts.data_dir:
        raise UserError(f"dataset {name!r} needs --data-dir")
    root = opts.data_dir
    if not os.path.isdir(root) and not (opts.download and name != "imagefolder"):
        raise UserError(f"data directory {root!r} does not exist")
    try:
        if name == "imagefolder":
            split = os.path.join(root, "train" if train else "val")
            if not os.path.isdir(split):
                raise UserError(f"image folder {split!r} does not exist (expected {root}/train/<class>/… and "
                                f"{root}/val/<class>/…)")
            return ImageFolder(split, transform=transform, skip_bad_images=opts.skip_bad_images)
        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
               "fashion-mnist": tvd.FashionMNIST}[name]
        if name in ("mnist", "fashion-mnist"):
            transform = _ToRGB(transform)
        return cls(root, train=train, transform=transform, download=opts.download)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise UserError(f"cannot read {name} from {root!r}: {str(exc).splitlines()[0]}") from None


def num_classes_of(dataset: Dataset) -> int:
    if hasattr(dataset, "num_classes"):
        return dataset.num_classes
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    raise UserError("cannot tell the number of classes of this dataset; set num_classes")


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, sampler=None,
                 seed: int = 0, drop_last: bool | None = None) -> DataLoader:
    """A data loader; training loaders shuffle (unless `sampler` orders them) with a generator of their own seeded by
    `seed`, which also seeds the workers, so that iterating them never draws from the global generators."""
    generator = None
    if train:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), generator=generator,
                      drop_last=train if drop_last is None else drop_last, persistent_workers=False)


def calibration_batches(opts: DataOptions, num_batches: int, batch_size: int = 64, seed: int = 0) -> list:
    """`num_batches` training batches for BN recalibration: a seeded shuffle of the training split, evaluation
    transforms (deterministic, so two recalibrations give the same statistics)."""
    if num_batches < 1:
        raise UserError(f"BN recalibration needs at least one batch, got {num_batches}")
    dataset = build_dataset(opts, train=True, transform=build_transform(opts, train=False))
    loader = build_loader(dataset, batch_size, train=True, seed=seed, drop_last=False)
    batches = []
    for images, _ in loader:
        batches.append(images)
        if len(batches) == num_batches:
            break
    return batches
