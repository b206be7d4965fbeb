"""Image files in and out under the COCO-30k zero-shot protocol of DMD2 / SwiftBrush (and GigaGAN before them).

Every image, generated or real, is cropped to its centred square and resized to 256×256 with PIL's LANCZOS
filter before the feature extractor sees it (the extractor then applies its own resize, e.g. Inception's
bilinear resize to 299). Generated images are written as PNG (lossless) first and scored from the files, so the
score is of exactly the images a user would share. JPEG in a folder is allowed but recorded, since its
compression moves FID.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import atomic_path

__all__ = ["IMAGE_SUFFIXES", "PROTOCOL_SIZE", "list_images", "skipped_files", "read_image", "protocol_image",
           "protocol_batches", "save_pngs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PROTOCOL_SIZE = 256


def list_images(folder: str | Path, what: str = "image folder") -> list[Path]:
    """The image files of ``folder`` (not recursive), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WadiInputError(f"the {what} {folder} does not exist or is not a folder.")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def skipped_files(folder: str | Path) -> str | None:
    """A note on the files of ``folder`` that :func:`list_images` leaves out (other suffixes), or None: nothing is
    skipped silently."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return None
    others = Counter(p.suffix.lower() or p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES)
    if not others:
        return None
    total = sum(others.values())
    kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(others.items()))
    return (f"skipped {total} file{'s' if total != 1 else ''} in {folder} that {'are' if total != 1 else 'is'} not "
            f"{'images' if total != 1 else 'an image'} ({kinds}); images are {', '.join(IMAGE_SUFFIXES)}.")


def read_image(path: str | Path, mode: str | None = None):
    """The image file ``path`` decoded in full (converted to ``mode`` when given), or one sentence naming the file:
    unreadable, truncated, or larger than PIL's decompression-bomb limit (a small file that would expand to gigabytes)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert(mode) if mode is not None else opened.copy()
    except Image.DecompressionBombError as exc:
        raise WadiInputError(f"{path} declares more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, so it is refused as a "
                             "possible decompression bomb (a small file that would expand to gigabytes).") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise WadiInputError(f"{path} is not a readable image ({exc}).") from exc
    return image


def protocol_image(image, size: int | None = PROTOCOL_SIZE):
    """RGB, centred square crop, LANCZOS resize to ``size`` (None: crop only). ``image`` is a PIL image."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if size is not None and side != size:
        image = image.resize((size, size), Image.LANCZOS)
    return image


def protocol_batches(paths: list[Path], batch_size: int, size: int | None = PROTOCOL_SIZE) -> Iterator[tuple[torch.Tensor, list]]:
    """(uint8 tensor (B, 3, S, S), the PIL images) per batch of ``paths``, each image through :func:`protocol_image`."""
    for start in range(0, len(paths), batch_size):
        images = [protocol_image(read_image(path, "RGB"), size) for path in paths[start:start + batch_size]]
        shapes = {image.size for image in images}
        if len(shapes) > 1:
            raise WadiInputError(f"the images of one batch have different sizes {sorted(shapes)}; pass a resize size.")
        array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
        yield torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(), images


def save_pngs(images: torch.Tensor, folder: Path, start: int) -> list[Path]:
    """Write images (B, C, H, W) in [0, 1] as ``folder/{index:06d}.png`` (8-bit, grayscale for one channel)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    array = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, picture in enumerate(array):
        path = folder / f"{start + i:06d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(picture[:, :, 0] if picture.shape[2] == 1 else picture).save(tmp, format="PNG")
        paths.append(path)
    return paths
