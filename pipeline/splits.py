"""Deterministic, class-mixed parts of a split: the validation hold-out and limits.

A prepared split is stored in shards whose examples were written in an order
that has nothing to do with the class, but "the first N" of a split still
depends on how many shards there are and on which shard comes first, and a
dataset prepared by an older version of the Beam job is class-sorted inside
each shard.  So every subset the trainer takes is chosen by a keyed hash of
the example's stable id instead:

* the *validation hold-out* of a split is the ``holdout`` examples with the
  smallest hashes; the *rest* is every other example;
* a *limit* keeps the ``limit`` smallest hashes of the part it limits.

The hash is independent of the class, the shard layout and the reading
order, so the parts are class-mixed samples, identical on every run, every
machine and every input pipeline.  Choosing a part costs one extra read of
the ids of the split (cached per process); taking a whole split costs nothing.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from pipeline.prepared_dataset import read_ids

# SipHash key of the selection hash (any fixed pair of integers; changing it
# changes which examples every hold-out and limit contains).
SELECTION_KEY = (0x6173636C, 0x73706C74)
_HASH_BUCKETS = 2 ** 63 - 1
PARTS = ("all", "rest", "holdout")
_hash_cache = {}


def selection_hash(ids):
    """The keyed hash (int64 in ``[0, 2**63 - 1)``) of a string tensor of example ids."""
    return tf.strings.to_hash_bucket_strong(ids, _HASH_BUCKETS, key=list(SELECTION_KEY))


def sorted_hashes(manifest, split):
    """The selection hashes of every example of ``split``, sorted (read once per process)."""
    cache_key = (manifest["directory"], split)
    if cache_key not in _hash_cache:
        chunks = [selection_hash(batch).numpy() for batch in read_ids(manifest, split).batch(8192)]
        _hash_cache[cache_key] = np.sort(np.concatenate(chunks)) if chunks else np.zeros(
            [0], np.int64)
    return _hash_cache[cache_key]


def holdout_count(validation_size, num_examples, *, name="data.validation_size"):
    """How many examples a ``validation_size`` holds out of a split of ``num_examples``.

    ``validation_size`` >= 1 is a count, in (0, 1) a fraction of the split, 0 none.
    """
    if validation_size >= 1:
        count = int(validation_size)
    else:
        count = int(round(validation_size * num_examples))
    if count >= num_examples:
        raise ValueError(f"{name} ({validation_size}) holds out {count} of the {num_examples} "
                         f"training examples: nothing would be left to train on")
    return count


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which examples of ``split`` to read.

    Attributes:
      split: the split's name in the manifest.
      holdout: how many examples of the split form its validation hold-out.
      part: ``all`` (the whole split), ``rest`` (all but the hold-out) or
        ``holdout`` (the hold-out only).
      limit: keep only this many of the part (0: all of it).
    """

    split: str
    holdout: int = 0
    part: str = "all"
    limit: int = 0

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, received {self.part!r}")
        if self.part == "holdout" and not self.holdout:
            raise ValueError(f"the holdout part of split {self.split!r} is empty (holdout=0)")

    @property
    def description(self):
        """Words for reports: which examples these are."""
        text = {"all": self.split,
                "rest": f"{self.split} without its {self.holdout}-example validation hold-out",
                "holdout": f"validation: {self.holdout} examples held out of {self.split}"}[
                    self.part if self.holdout else "all"]
        return f"{text} (limited to {self.limit})" if self.limit else text

    def bounds(self, manifest):
        """``(low, high, count)``: the part is the examples whose hash ``h`` has
        ``low < h <= high``; ``None`` bounds mean the whole split, unfiltered."""
        total = manifest["splits"][self.split]["num_examples"]
        holdout = self.holdout if self.part != "all" else 0
        if not holdout and not (self.limit and self.limit < total):
            return None, None, total
        hashes = sorted_hashes(manifest, self.split)
        start, stop = {"all": (0, total), "rest": (holdout, total),
                       "holdout": (0, holdout)}[self.part if holdout else "all"]
        if self.limit:
            stop = min(stop, start + self.limit)
        low = hashes[start - 1] if start > 0 else np.int64(-1)
        high = hashes[stop - 1]
        count = int(np.sum((hashes > low) & (hashes <= high)))
        return int(low), int(high), count

    def count(self, manifest):
        return self.bounds(manifest)[2]

    def count_in(self, manifest, shards):
        """How many examples of this part the given ``[(path, num_examples)]`` shards of the
        split hold (an input pipeline's share when sharding by file)."""
        low, high, _ = self.bounds(manifest)
        if low is None:
            return sum(count for _, count in shards)
        hashes = np.concatenate([selection_hash(batch).numpy() for batch in read_ids(
            manifest, self.split, [path for path, _ in shards]).batch(8192)] or [
                np.zeros([0], np.int64)])
        return int(np.count_nonzero((hashes > low) & (hashes <= high)))


def as_selection(split_or_selection):
    """A ``Selection`` for a split name (the whole split) or a ``Selection`` as it is."""
    if isinstance(split_or_selection, Selection):
        return split_or_selection
    return Selection(split_or_selection)
