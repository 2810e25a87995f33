"""A folder of images as --data: found recursively, decoded by PIL, preprocessed for the model.

The preprocessing is the evaluation transform of timm and torchvision (resize the shorter side
to size / crop_pct, center crop, scale to [0, 1], normalise by mean and std), written with PIL
and numpy so that it needs neither torchvision nor timm. With `--model timm:NAME` its numbers
come from timm's data config for that model; otherwise from `DEFAULTS` and the options.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnaudit.core.errors import DataError, describe

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# The first bytes of the image formats above, to recognise an image whatever its name.
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# BN-NOTES: 10³–10⁴ samples estimate population statistics well; auditing more costs CPU
# time without changing a verdict. A larger folder is sampled (seeded) down to this.
DEFAULT_MAX_IMAGES = 1024


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input: [C, H, W] float32."""

    size: tuple[int, int]  # H, W of the center crop
    crop_pct: float  # the crop covers this fraction of the resized image
    interpolation: str  # a PIL resampling filter by name: bilinear, bicubic, ...
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3  # 3: RGB, 1: grayscale
    crop_mode: str = "center"  # timm's: "center" keeps the aspect ratio, "squash" does not
    source: str = "defaults"  # where the numbers came from, for the report's note

    def describe(self) -> str:
        h, w = self.size
        scale = self.resize_to()
        if self.crop_mode == "squash":
            resize = f"to {scale[0]}x{scale[1]}"
        elif h == w:
            resize = f"shorter side to {scale[0]}"
        else:
            resize = f"to cover {scale[0]}x{scale[1]}"
        mean = ", ".join(f"{v:.3g}" for v in self.mean)
        std = ", ".join(f"{v:.3g}" for v in self.std)
        return (
            f"resize {resize} ({self.interpolation}), center crop {h}x{w}, "
            f"mean ({mean}), std ({std}) ({self.source})"
        )

    def resize_to(self) -> tuple[int, int]:
        """The (H, W) the image is resized to (shorter side, for a square crop) before the crop."""
        return tuple(math.floor(s / self.crop_pct) for s in self.size)  # type: ignore[return-value]


DEFAULTS = Preprocess((224, 224), 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


def from_timm(config: dict[str, Any], name: str) -> Preprocess:
    """The preprocessing of timm's data config (`timm.data.resolve_data_config`)."""
    try:
        channels, h, w = (int(v) for v in config["input_size"])
        return Preprocess(
            (h, w),
            float(config.get("crop_pct") or 1.0),
            str(config.get("interpolation") or "bilinear"),
            tuple(float(v) for v in config["mean"]),
            tuple(float(v) for v in config["std"]),
            channels,
            str(config.get("crop_mode") or "center"),
            f"timm's data config for {name}",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"timm's data config for {name} is not usable: {describe(exc)}") from exc


def with_options(
    p: Preprocess, image_size: int | None, mean: str | None, std: str | None
) -> Preprocess:
    """`p` with what --image-size, --mean and --std set."""
    changed = []
    if image_size is not None:
        if image_size < 1:
            raise DataError(f"--image-size must be at least 1, got {image_size}")
        p, changed = replace(p, size=(image_size, image_size)), [*changed, "--image-size"]
    for option, text in (("--mean", mean), ("--std", std)):
        if text is not None:
            values = _floats(option, text, p.channels)
            p = replace(p, **{option[2:]: values})
            changed.append(option)
    if any(v <= 0 or not math.isfinite(v) for v in p.std):
        raise DataError(f"--std {p.std}: every value must be positive and finite")
    if changed:
        p = replace(p, source=f"{p.source}, {' '.join(changed)} from the command line")
    return p


def _floats(option: str, text: str, channels: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise DataError(
            f"{option} {text!r}: give {channels} numbers, one per channel, e.g. "
            f"{option} {','.join(str(v) for v in IMAGENET_MEAN[:channels])}"
        )
    return values


def is_image(path: Path) -> bool:
    """Whether `path` is an image file, by its name or its first bytes."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def find_images(folder: Path, limit: int | None, seed: int) -> tuple[list[Path], int]:
    """The image files under `folder` (recursively, sorted), sampled down to `limit` with
    `seed` when there are more; and how many there were."""
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        found = sorted({p.suffix.lower() or p.name for p in folder.rglob("*") if p.is_file()})
        what = f"it holds {', '.join(found[:8])} files" if found else "it is empty"
        raise DataError(
            f"--data {folder}: no image under this folder ({what}); expected "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} files, or a .pt/.npy file of batches"
        )
    total = len(files)
    if limit is not None and total > limit:
        # A seeded sample, not the first names: class folders sort together.
        files = sorted(random.Random(seed).sample(files, limit))
    return files, total


class ImageFolder:
    """Batches [B, C, H, W] of images, decoded when iterated.

    The audit iterates its batches several times (one per pass) and needs the same batches
    each time: the file order is fixed, and nothing is kept decoded between passes. A last batch
    of one image is dropped: BN cannot normalise a single value per channel in train mode.
    """

    def __init__(
        self,
        files: Sequence[Path],
        batch_size: int,
        preprocess: Preprocess,
        total: int | None = None,  # images found before sampling; None: all of them
    ) -> None:
        if batch_size < 1:
            raise DataError(f"--batch-size must be at least 1, got {batch_size}")
        _pil()  # a missing Pillow fails here, before the audit starts
        self.files, self.batch_size, self.preprocess = list(files), batch_size, preprocess
        self.total = len(self.files) if total is None else total
        self.chunks = [
            self.files[i : i + batch_size] for i in range(0, len(self.files), batch_size)
        ]
        if len(self.chunks) > 1 and len(self.chunks[-1]) == 1:
            self.chunks.pop()
        if len(self.files) < 2 or len(self.chunks[0]) < 2:
            raise DataError(
                f"--data: {len(self.files)} image(s) at --batch-size {batch_size}: BN needs at "
                "least 2 images per batch; add images or raise --batch-size"
            )

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Tensor]:
        for chunk in self.chunks:
            yield torch.stack([load_image(f, self.preprocess) for f in chunk])


def load_image(path: Path, p: Preprocess) -> Tensor:
    """One image as the model input [C, H, W] (float32, normalised)."""
    import numpy as np

    image_module = _pil()
    try:
        with image_module.open(path) as opened:
            image = opened.convert("RGB" if p.channels == 3 else "L")
    except Exception as exc:
        raise DataError(
            f"--data: {path}: PIL cannot decode it ({describe(exc)}); remove or replace the file"
        ) from exc
    image = _resize(image, p, image_module)
    image = _center_crop(image, p.size, image_module)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    x = torch.from_numpy(array.transpose(2, 0, 1).copy())
    mean = torch.tensor(p.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(p.std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


def _resize(image: Any, p: Preprocess, image_module: Any) -> Any:
    """timm's evaluation resize: "squash" resizes to the target exactly; otherwise the aspect
    ratio is kept: for a square crop the shorter side becomes the target (torchvision's
    Resize(int)), else the image is scaled to just cover the target (timm's ResizeKeepRatio)."""
    resample = _filter(p.interpolation, image_module)
    target_h, target_w = p.resize_to()
    w, h = image.size
    if p.crop_mode == "squash":
        new = (target_w, target_h)
    elif target_h == target_w:
        short = target_h
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    else:
        ratio = min(h / target_h, w / target_w)
        new = (round(w / ratio), round(h / ratio))
    return image if new == (w, h) else image.resize(new, resample)


def _center_crop(image: Any, size: tuple[int, int], image_module: Any) -> Any:
    """torchvision's CenterCrop; an image smaller than the crop is padded with zeros."""
    crop_h, crop_w = size
    w, h = image.size
    if w < crop_w or h < crop_h:
        canvas = image_module.new(image.mode, (max(w, crop_w), max(h, crop_h)))
        canvas.paste(image, ((max(w, crop_w) - w) // 2, (max(h, crop_h) - h) // 2))
        image, (w, h) = canvas, canvas.size
    top = round((h - crop_h) / 2.0)
    left = round((w - crop_w) / 2.0)
    return image.crop((left, top, left + crop_w, top + crop_h))


def _filter(name: str, image_module: Any) -> Any:
    filters = image_module.Resampling
    table = {
        "nearest": filters.NEAREST,
        "bilinear": filters.BILINEAR,
        "bicubic": filters.BICUBIC,
        "lanczos": filters.LANCZOS,
        "box": filters.BOX,
        "hamming": filters.HAMMING,
    }
    # timm's "random" picks a filter per image for training; evaluation uses bilinear.
    return table.get(name.lower(), filters.BILINEAR)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(
            "--data: a folder of images needs Pillow to decode them: pip install "
            "'bnaudit[images]' (or pip install pillow)"
        ) from exc
    return Image
