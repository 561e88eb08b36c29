"""TFRecord framing written by the Beam job reads back with tf.data."""

import tensorflow as tf

from beam_jobs.tfrecord import encode_record


def test_framed_records_read_back_with_tf_data(tmp_path):
    payloads = [b"", b"x", bytes(range(256)) * 40]
    path = tmp_path / "data.tfrecord"
    path.write_bytes(b"".join(encode_record(p) for p in payloads))
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == payloads


def test_corrupted_record_fails_the_checksum(tmp_path):
    data = bytearray(encode_record(b"hello world"))
    data[14] ^= 0xFF
    path = tmp_path / "bad.tfrecord"
    path.write_bytes(bytes(data))
    try:
        list(tf.data.TFRecordDataset(str(path)))
    except tf.errors.DataLossError:
        return
    raise AssertionError("a flipped byte was not detected")
