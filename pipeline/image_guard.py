"""The serving graph's guard against decompression bombs: image size from the header first.

A PNG of one colour compresses about a thousandfold, so a request of a few
megabytes can decode to tens of gigabytes, and TF Serving has no pixel limit
of its own.  ``guarded_decode`` reads the width and height from the image's
header, in the graph and without decoding, and refuses the image with an
``InvalidArgumentError`` naming its size and the limit when width x height is
over ``max_pixels`` (``ascl export --max-pixels``).  Only then is it decoded.

Headers read: PNG's IHDR, JPEG's SOF (``tf.image.extract_jpeg_shape``), BMP's
info header (24- and 32-bit uncompressed files only, the form TensorFlow's
decoder reads right), and WebP's ``VP8 ``, ``VP8L`` and ``VP8X`` chunks.  Any other bytes
are refused with a message naming these formats.  That includes JPEG XL, which
TensorFlow could decode but the preparation job (PIL) cannot, so that serving
never accepts an image training could not have seen, and GIF: TensorFlow
decodes a GIF onto a canvas as large as its largest frame, and frame sizes are
in per-frame descriptors that only a walk over the whole file finds, so its
logical-screen header does not bound the memory (a 16 x 16 screen can carry a
20,000 x 20,000 frame).  A header that lies about the size makes
the decoder fail on the data (an ``InvalidArgumentError``), and the decoded
image is checked against the limit once more, so a header and a decoder that
disagree cannot get past it either.
"""

import tensorflow as tf

from beam_jobs.images import SERVED_FORMAT_NAMES as SERVING_FORMATS

DEFAULT_MAX_PIXELS = 40_000_000  # about 7,300 x 5,500: larger than any camera photo we serve
_HEAD = 34  # bytes of the header that the non-JPEG formats' sizes are read from


def _head_bytes(image_bytes):
    """The first ``_HEAD`` bytes as ``int64 [_HEAD]``, zero-padded when the input is shorter."""
    head = tf.strings.substr(image_bytes, 0, _HEAD)
    padded = tf.strings.substr(tf.strings.join([head, tf.constant(b"\0" * _HEAD)]), 0, _HEAD)
    return tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)


def _little(head, offset, count):
    return sum(head[offset + i] * (256 ** i) for i in range(count))


def _big(head, offset, count):
    return sum(head[offset + i] * (256 ** (count - 1 - i)) for i in range(count))


def _starts_with(head, offset, signature):
    return tf.reduce_all(tf.equal(head[offset:offset + len(signature)],
                                  tf.constant(list(signature), tf.int64)))


def header_size(image_bytes):
    """``(width, height, known)`` from the header of one image's bytes (``int64``, ``int64``,
    ``bool``); ``known`` is false for a format the serving graph does not accept."""
    head = _head_bytes(image_bytes)
    is_png = _starts_with(head, 0, b"\x89PNG\r\n\x1a\n") & _starts_with(head, 12, b"IHDR")
    # the one BMP form TensorFlow decodes right (beam_jobs.images.served_bmp): an info header,
    # 24 or 32 bits per pixel, uncompressed; palette BMPs would come out as grey indices
    is_bmp = (_starts_with(head, 0, b"BM") & (_little(head, 14, 4) >= 40)
              & ((_little(head, 28, 2) == 24) | (_little(head, 28, 2) == 32))
              & tf.equal(_little(head, 30, 4), 0))
    bmp_height = _little(head, 22, 4)
    bmp_height = tf.where(bmp_height >= 2 ** 31, 2 ** 32 - bmp_height, bmp_height)  # top-down
    is_webp = _starts_with(head, 0, b"RIFF") & _starts_with(head, 8, b"WEBP")
    lossy = is_webp & _starts_with(head, 12, b"VP8 ")
    lossless = is_webp & _starts_with(head, 12, b"VP8L")
    extended = is_webp & _starts_with(head, 12, b"VP8X")
    bits = _little(head, 21, 4)
    is_jpeg = _starts_with(head, 0, b"\xff\xd8\xff")
    jpeg = tf.cond(is_jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64),
                   lambda: tf.zeros([3], tf.int64))
    cases = [  # (condition, width, height), first match wins
        (is_jpeg, jpeg[1], jpeg[0]),
        (is_png, _big(head, 16, 4), _big(head, 20, 4)),
        # TensorFlow's BMP decoder reads these two int32 fields whatever the header's form
        (is_bmp, _little(head, 18, 4), bmp_height),
        (lossy, _little(head, 26, 2) % 16384, _little(head, 28, 2) % 16384),
        (lossless, bits % 16384 + 1, (bits // 16384) % 16384 + 1),
        (extended, _little(head, 24, 3) + 1, _little(head, 27, 3) + 1),
    ]
    width = height = tf.constant(0, tf.int64)
    known = tf.constant(False)
    for condition, case_width, case_height in reversed(cases):
        width = tf.where(condition, case_width, width)
        height = tf.where(condition, case_height, height)
        known = known | condition
    return width, height, known


MAX_PIXELS_LIMIT = 2 ** 31  # keeps the bounded product of two sides inside int64


def guarded_decode(image_bytes, max_pixels):
    """``uint8 [H, W, 3]`` pixels of one image, refusing (``InvalidArgumentError``) formats
    the serving graph does not accept and images of more than ``max_pixels`` pixels, before
    anything is decoded."""
    width, height, known = header_size(image_bytes)
    formats = ", ".join(SERVING_FORMATS)
    accepted = tf.debugging.Assert(known, [
        f"image format not accepted: the serving graph decodes {formats} (first bytes:",
        tf.strings.substr(image_bytes, 0, 8), ")"])
    with tf.control_dependencies([accepted]):
        # each side is bounded first, so that the product cannot overflow int64
        pixels = tf.minimum(width, max_pixels + 1) * tf.minimum(height, max_pixels + 1)
    shown = tf.where((width < 2 ** 31) & (height < 2 ** 31),
                     tf.strings.as_string(width * height), "over 2^62")
    within = tf.debugging.Assert(
        (pixels <= max_pixels) & (width > 0) & (height > 0),
        [tf.strings.join(["image of ", tf.strings.as_string(width), " x ",
                          tf.strings.as_string(height), " pixels (", shown, " pixels) refused: "
                          f"this export accepts images of at most {max_pixels} pixels (ascl "
                          "export --max-pixels), and a width and height of at least 1"])])
    with tf.control_dependencies([within]):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    decoded = tf.cast(tf.shape(image)[0], tf.int64) * tf.cast(tf.shape(image)[1], tf.int64)
    agreed = tf.debugging.Assert(decoded <= max_pixels, [
        "decoded image is larger than its header said and over the limit:", decoded])
    with tf.control_dependencies([agreed]):
        return tf.identity(image)
