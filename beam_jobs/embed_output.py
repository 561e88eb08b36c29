"""The names of an ``ascl embed`` output folder: the embed job writes them, galleries read them.

    OUTPUT/embeddings-SSSSS-of-NNNNN.tfrecord   tf.train.Example: id, label, class_name,
                                                source_path, embedding (float list)
    OUTPUT/embeddings-SSSSS-of-NNNNN.parquet    the same columns (with --parquet)
    OUTPUT/embed_info.json                      written last: the export and weights that
                                                made the embeddings
"""

EMBEDDINGS_PREFIX = "embeddings"
TFRECORD_PATTERN = f"{EMBEDDINGS_PREFIX}-*.tfrecord"
PARQUET_PATTERN = f"{EMBEDDINGS_PREFIX}-*.parquet"
EMBED_INFO_NAME = "embed_info.json"
