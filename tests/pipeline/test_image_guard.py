"""The serving graph reads an image's size from its header and refuses bombs before decoding."""

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline.image_guard import guarded_decode, header_size

PIXELS = np.random.default_rng(0).integers(0, 256, (21, 37, 3), dtype=np.uint8)


def _encoded(format_name, pixels=PIXELS, mode=None, **options):
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(buffer, format=format_name, **options)
    return buffer.getvalue()


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width, height, rows=None, row_bytes=None):
    """A PNG whose IHDR says ``width x height`` (8-bit RGB) and whose data holds ``rows`` rows
    of ``row_bytes`` zero bytes (default: what the header says), compressed as a stream."""
    rows = height if rows is None else rows
    row = b"\0" * (1 + (3 * width if row_bytes is None else row_bytes))
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                               0, 0, 0))
            + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))


@pytest.mark.parametrize("name, data", [
    ("png", _encoded("PNG")), ("png_palette", _encoded("PNG", mode="P")),
    ("png_alpha", _encoded("PNG", mode="RGBA")), ("jpeg", _encoded("JPEG")),
    ("jpeg_grey_progressive", _encoded("JPEG", mode="L", progressive=True)),
    ("bmp", _encoded("BMP")),
    ("webp_lossy", _encoded("WEBP", quality=80)),
    ("webp_lossless", _encoded("WEBP", lossless=True)),
    ("webp_extended", _encoded("WEBP", mode="RGBA", quality=80)),
])
def test_header_size_is_the_decoded_size_for_every_served_format(name, data):
    width, height, known = header_size(tf.constant(data))
    assert bool(known) and (int(width), int(height)) == (37, 21)
    assert guarded_decode(tf.constant(data), 37 * 21).shape == (21, 37, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="37 x 21 pixels \\(777 pixels\\)"):
        guarded_decode(tf.constant(data), 37 * 21 - 1)


def test_a_top_down_bmp_has_a_positive_height():
    data = bytearray(_encoded("BMP"))
    (height,) = struct.unpack_from("<i", data, 22)
    struct.pack_into("<i", data, 22, -height)
    _, decoded_height, _ = header_size(tf.constant(bytes(data)))
    assert int(decoded_height) == 21


def test_formats_the_serving_graph_does_not_accept_are_named():
    for data in (_encoded("TIFF"), _encoded("GIF"), b"\xff\x0a" + b"\0" * 40, b"",
                 b"not an image"):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="image format not accepted: the serving graph decodes JPEG, "
                                 "PNG, BMP, WebP"):
            guarded_decode(tf.constant(data), 10 ** 6)


def _lying_headers():
    jpeg = bytearray(_encoded("JPEG"))
    sof = next(i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC2))
    struct.pack_into(">HH", jpeg, sof + 5, 30000, 30000)  # SOF: height, width
    bmp = bytearray(_encoded("BMP"))
    struct.pack_into("<ii", bmp, 18, 50000, 50000)
    return {"jpeg_claims_more": bytes(jpeg),
            "bmp_claims_more": bytes(bmp),
            "png_claims_more_than_its_data": _png(100, 100, rows=16, row_bytes=48),
            "png_claims_fewer_than_its_data": _png(8, 8, rows=16, row_bytes=48),
            "png_claims_a_bomb": _png(30000, 30000, rows=4, row_bytes=48)}


def test_a_loaded_export_refuses_a_bomb_quickly_without_the_memory(exported, digits16, tmp_path):
    """The issue's acceptance, in a clean process through the SavedModel: a 20,000 x 20,000
    PNG of about 1 MB is refused in under 100 ms and under 100 MB of resident-memory growth
    (without the guard it took 1.2 GB and 7 s); headers that lie fail cleanly; the model then
    answers a normal request exactly as before."""
    from pipeline.prepared_dataset import read_split

    _, _, model_dir = exported
    bomb = _png(20000, 20000)
    assert len(bomb) < 1.5e6
    (tmp_path / "bomb.png").write_bytes(bomb)
    lies = _lying_headers()
    for name, data in lies.items():
        (tmp_path / f"{name}.bin").write_bytes(data)
    image = next(read_split(digits16, "test").take(1).as_numpy_iterator())[0]
    (tmp_path / "normal.png").write_bytes(tf.io.encode_png(image).numpy())
    script = f"""
import json, sys, time
import numpy as np, tensorflow as tf
def status(key):
    with open("/proc/self/status") as handle:
        return next(int(l.split()[1]) / 1024 for l in handle if l.startswith(key))
serve = tf.saved_model.load({model_dir!r}).signatures["serving_default"]
normal = open({str(tmp_path / 'normal.png')!r}, "rb").read()
before = serve(image_bytes=tf.constant([normal]))["embedding"].numpy()
bomb = open({str(tmp_path / 'bomb.png')!r}, "rb").read()
try:  # a first refusal, so that the timed one measures the guard, not tracing
    serve(image_bytes=tf.constant([bomb]))
except tf.errors.InvalidArgumentError:
    pass
rss, start = status("VmRSS:"), time.perf_counter()
try:
    serve(image_bytes=tf.constant([bomb]))
    message = None
except tf.errors.InvalidArgumentError as error:
    message = error.message
seconds, growth = time.perf_counter() - start, status("VmHWM:") - rss
lies = {{}}
for name in {sorted(lies)!r}:
    try:
        shape = serve(image_bytes=tf.constant([open({str(tmp_path)!r} + f"/{{name}}.bin",
                                                    "rb").read()]))["embedding"].shape
        lies[name] = "answered " + str(shape)
    except tf.errors.InvalidArgumentError as error:
        lies[name] = "refused: " + error.message[:3000]
after = serve(image_bytes=tf.constant([normal]))["embedding"].numpy()
assert not any(m.split(".")[0] in ("models", "pipeline", "beam_jobs") for m in sys.modules)
print(json.dumps({{"message": message, "seconds": seconds, "growth_mb": growth,
                  "lies": lies, "unchanged": bool(np.array_equal(before, after))}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"bomb refused in {1000 * out['seconds']:.1f} ms, resident memory "
          f"+{out['growth_mb']:.1f} MB")
    assert out["message"] and "image of 20000 x 20000 pixels (400000000 pixels) refused" in \
        out["message"] and "at most 40000000 pixels" in out["message"]
    assert out["seconds"] < 0.1 and out["growth_mb"] < 100, out
    for name in ("jpeg_claims_more", "bmp_claims_more", "png_claims_a_bomb"):
        assert out["lies"][name].startswith("refused: ") and "pixels) refused" in \
            out["lies"][name], (name, out["lies"][name])
    assert out["lies"]["png_claims_more_than_its_data"].startswith("refused: ")
    # fewer pixels than its data: decoded at the header's size or refused, never more
    assert out["lies"]["png_claims_fewer_than_its_data"] in ("answered (1, 128)",) or \
        out["lies"]["png_claims_fewer_than_its_data"].startswith("refused: ")
    assert out["unchanged"]


def test_max_pixels_is_set_at_export_and_recorded(exported, digits16, tmp_path):
    from pipeline.export import export_run
    from pipeline.prepared_dataset import read_split

    run_dir, _, _ = exported
    path = export_run(run_dir, name="small_limit", base_dir=str(tmp_path), max_pixels=255)
    info = json.load(open(f"{path}/assets.extra/ascl_export.json"))
    assert info["max_pixels"] == 255
    image = next(read_split(digits16, "test").take(1).as_numpy_iterator())[0]  # 16 x 16 = 256
    serve = tf.saved_model.load(path).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="at most 255 pixels"):
        serve(image_bytes=tf.constant([tf.io.encode_png(image).numpy()]))
    with pytest.raises(ValueError, match="--max-pixels must be between 1 and 2147483648, "
                                         "received 0"):
        export_run(run_dir, name="x", base_dir=str(tmp_path), max_pixels=0)


def _format_cases():
    rng = np.random.default_rng(1)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
                        .resize((40, 30), Image.BICUBIC))
    base = Image.fromarray(smooth)
    sixteen = Image.fromarray((smooth[..., 0].astype(np.uint16) * 257 + 100).astype(np.uint16))

    def encode(image, format_name, **options):
        buffer = io.BytesIO()
        image.save(buffer, format=format_name, **options)
        return buffer.getvalue()

    cases = {  # name: (bytes, largest pixel difference allowed between the two decoders)
        "jpeg_rgb": (encode(base, "JPEG"), 8), "jpeg_grey": (encode(base.convert("L"), "JPEG"), 8),
        "jpeg_cmyk": (encode(base.convert("CMYK"), "JPEG"), 8),
        "png_8bit": (encode(base, "PNG"), 0), "png_16bit": (encode(sixteen, "PNG"), 1),
        "png_palette": (encode(base.convert("P"), "PNG"), 0),
        "png_alpha": (encode(base.convert("RGBA"), "PNG"), 0),
        "png_grey_alpha": (encode(base.convert("LA"), "PNG"), 0),
        "bmp": (encode(base, "BMP"), 0), "bmp_32bit": (encode(base.convert("RGBA"), "BMP"), 0),
        # TensorFlow reads a palette BMP's indices as grey levels: refused by both
        "bmp_palette": (encode(base.convert("P"), "BMP"), None),
        "bmp_grey_8bit": (encode(base.convert("L"), "BMP"), None),
        "bmp_1bit": (encode(base.convert("1"), "BMP"), None),
        "gif": (encode(base, "GIF"), None),
        "webp_lossless": (encode(base, "WEBP", lossless=True), 0),
        "webp_lossy": (encode(base, "WEBP", quality=90), 8),
        "tiff": (encode(base, "TIFF"), None),
    }
    Image.init()
    if "JXL" in Image.SAVE:  # only where this PIL can write JPEG XL (not in the pinned one)
        cases["jpeg_xl"] = (encode(base, "JXL"), None)
    return cases


@pytest.mark.parametrize("name", sorted(_format_cases()))
def test_preparation_and_serving_accept_the_same_formats_with_the_same_pixels(name):
    """Each format is accepted by both decoders with the same pixels (JPEG: within decoder
    differences) or refused by both: nothing trains that no export can serve."""
    from beam_jobs.images import InvalidImage, decode_image

    data, tolerance = _format_cases()[name]
    try:
        prepared, prepare_error = decode_image(data), None
    except InvalidImage as error:
        prepared, prepare_error = None, str(error)
    try:
        served, serve_error = guarded_decode(tf.constant(data), 10 ** 7).numpy(), None
    except tf.errors.InvalidArgumentError as error:
        served, serve_error = None, error.message
    if tolerance is None:  # a format outside the served set: refused by both, saying so
        assert prepare_error and ("is not one the serving graph decodes (JPEG, PNG, BMP, "
                                  "WebP)" in prepare_error or "BMP that is not 24- or 32-bit"
                                  in prepare_error), prepare_error
        assert serve_error and "image format not accepted" in serve_error
        return
    assert prepare_error is None and serve_error is None, (prepare_error, serve_error)
    assert prepared.shape == served.shape == (30, 40, 3)
    assert np.abs(prepared.astype(int) - served.astype(int)).max() <= tolerance


def test_sides_whose_product_overflows_are_still_refused():
    """4,294,967,295 x 4,294,967,295 would wrap around in int64 if multiplied as read."""
    data = _png(0xFFFFFFFF, 0xFFFFFFFF, rows=1, row_bytes=3)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="4294967295 x 4294967295 pixels \\(over 2\\^62 pixels\\)"):
        guarded_decode(tf.constant(data), 40_000_000)
