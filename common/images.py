"""Robust image reading: every file that cannot be used raises ImageError naming it. Used by the
datasets (common/data.py) and the pair tools (common/pairs.py), which import it and not each other."""
import warnings

import numpy as np
from PIL import Image

# Images above this many pixels are refused instead of decoded (decompression-bomb guard).
Image.MAX_IMAGE_PIXELS = 178_956_970


class ImageError(Exception):
    """An image that cannot be used; the message names the file."""


def open_image(path):
    """Opens an image lazily (header only), turning every failure into an ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None


def load_rgb(path):
    """Decodes an image to 8-bit RGB: CMYK, grayscale, palette, alpha and 16-bit images included."""
    img = open_image(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16/32-bit integer images: PIL's convert("RGB") would clip, so rescale to 8 bits.
            a = np.asarray(img, dtype=np.float64)
            hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
            img = Image.fromarray((a * (255.0 / hi)).round().astype(np.uint8), "L")
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"cannot decode image {path}: {e}") from None
    finally:
        img.close()
