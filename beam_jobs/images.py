"""Decoding, validating, converting and resizing one image; no Beam here.

Every failure is an ``InvalidImage`` whose message is the reason written to
the dead-letter output.  Images that are readable but not 8-bit RGB
(grayscale, palette, CMYK, 16-bit, with alpha) are converted, not rejected.
"""

import io
import re

import numpy as np
from PIL import Image, ImageFile

from beam_jobs.dataset_format import square_crop_and_resize

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not grey pixels
_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB",
                      "HSV", "I;16", "I;16B", "I;16L", "I;16N", "I"}


# The formats the serving graph decodes (``pipeline.image_guard`` reads their headers), by
# PIL's name for them (MPO: a camera's multi-picture JPEG, which starts as a JPEG).  Anything
# else, TIFF for one, would train and then be refused by every export, so it is a dead letter.
# GIF is not served: TensorFlow decodes every frame onto a canvas of the largest frame's size,
# which no fixed header field bounds (a 16 x 16 screen may hold a 20,000 x 20,000 frame), so
# the pixel guard could not bound its memory.
SERVED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "BMP": "BMP", "WEBP": "WebP"}
SERVED_FORMAT_NAMES = ("JPEG", "PNG", "BMP", "WebP")


def served_bmp(data):
    """Whether a BMP is of the one form TensorFlow's decoder reads right: a Windows info
    header (40 bytes or more) with 24 or 32 bits per pixel and no compression.  The serving
    graph's guard checks the same fields (``pipeline.image_guard``)."""
    return (len(data) >= 34 and int.from_bytes(data[14:18], "little") >= 40
            and int.from_bytes(data[28:30], "little") in (24, 32)
            and int.from_bytes(data[30:34], "little") == 0)


class InvalidImage(ValueError):
    """An input that cannot become a training image; the message says why."""


def _stable(error):
    """An error's text without object addresses ("<_io.BytesIO object at 0x7f...>"), so the
    dead letters of two runs on the same input are byte-identical."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(error))


def _sixteen_bit_to_rgb(image):
    pixels = np.asarray(image, dtype=np.uint32)
    if pixels.max(initial=0) > 0xFFFF:
        raise InvalidImage(f"unsupported mode {image.mode}: values above 16 bits")
    eight_bit = np.round(pixels / 257.0).astype(np.uint8)
    return np.repeat(eight_bit[..., None], 3, axis=-1)


def decode_image(data):
    """RGB uint8 ``[H, W, 3]`` pixels from encoded bytes in a format the serving graph also
    decodes (``SERVED_FORMATS``)."""
    if not data:
        raise InvalidImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as error:
        raise InvalidImage(f"too large: {_stable(error)}") from error
    except Exception as error:  # PIL raises many types for corrupt bytes
        raise InvalidImage(
            f"undecodable bytes: {type(error).__name__}: {_stable(error)}") from error
    if image.format not in SERVED_FORMATS:
        raise InvalidImage(f"format {image.format} is not one the serving graph decodes "
                           f"({', '.join(SERVED_FORMAT_NAMES)}): convert it first")
    if image.format == "BMP" and not served_bmp(data):
        raise InvalidImage("BMP that is not 24- or 32-bit uncompressed (palette, 1/4/8-bit, RLE "
                           "or OS/2 forms): the serving graph's BMP decoder reads only those, "
                           "and palette files as grey indices; convert it first")
    if image.mode not in _CONVERTIBLE_MODES:
        raise InvalidImage(f"unsupported mode {image.mode}")
    if image.mode.startswith("I"):
        return _sixteen_bit_to_rgb(image)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def validate_pixels(pixels, *, min_size):
    """Checks an in-memory image and returns it as RGB uint8 ``[H, W, 3]``."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
        raise InvalidImage(f"unsupported array shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise InvalidImage(f"unsupported array dtype {pixels.dtype} (expected uint8)")
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    elif pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    height, width = pixels.shape[:2]
    if min(height, width) < min_size:
        raise InvalidImage(f"too small: {height}x{width} is under the minimum side {min_size}")
    return np.ascontiguousarray(pixels)


def square_and_resize(pixels, size=None):
    """The project's one resize policy (``beam_jobs.dataset_format.square_crop_and_resize``):
    the largest centred square, resized to ``size`` x ``size`` when given.  Images already
    square and at size are returned as they are, without calling TensorFlow."""
    height, width = pixels.shape[:2]
    if height == width and size in (None, height):
        return pixels
    return np.ascontiguousarray(square_crop_and_resize(pixels, size).numpy())


def encode_png(pixels, compress_level=3):
    """Lossless PNG bytes of RGB uint8 pixels (deterministic for equal pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
