"""TFRecord framing, written through Beam's filesystems.

The preparation job chooses each example's shard itself (by a hash of its
id) and orders examples within a shard, which ``beam.io.WriteToTFRecord``
does not allow, so shards are written by a DoFn with this framing:

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian; the format ``tf.data.TFRecordDataset`` reads).
"""

import struct

import google_crc32c

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data):
    """TFRecord's masked CRC32-C of ``data``."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def encode_record(data):
    """One framed TFRecord holding ``data`` (bytes)."""
    length = struct.pack("<Q", len(data))
    return b"".join([length, struct.pack("<I", masked_crc32c(length)), data,
                     struct.pack("<I", masked_crc32c(data))])
