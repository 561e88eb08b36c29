"""Benchmark: what the in-process DirectRunner charges for the steps the preparation job uses.

    python bench/beam_runner_costs.py [--repeats 2]

60,000 synthetic elements (the size of the CIFAR-10 tree), alternating the cases within every
repeat, wall time of each whole pipeline (the fixed cost is in every case; compare with
``listing``):

* ``listing``: one element fanned out to 60,000 paths, nothing else;
* ``five_maps``: the same plus five chained identity ``Map`` steps;
* ``count``: the same plus ``Count.Globally``;
* ``group_by_key``: each path keyed onto 32 keys with a 2.5 KB payload (about an encoded
  CIFAR-10 example), then ``GroupByKey``, as the job groups examples by shard;
* ``group_per_bundle``: the same bytes combined per bundle first, so that only one element per
  key and bundle reaches the ``GroupByKey``;
* ``group_small``: the same keys and elements with no payload (the control: what grouping
  60,000 elements costs without the bytes).

Used to tell whether the job's cost over a plain loop is per step and element or per byte.
"""

import argparse
import logging
import os
import statistics
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindows

ELEMENTS, KEYS = 60_000, 32
PAYLOAD = os.urandom(2500)


class _GroupPerBundle(beam.DoFn):
    def start_bundle(self):
        self._groups = {}

    def process(self, keyed):
        self._groups.setdefault(keyed[0], []).append(keyed[1])

    def finish_bundle(self):
        for key, values in self._groups.items():
            yield GlobalWindows.windowed_value((key, values))


def _keyed(paths, payload=PAYLOAD):
    return paths | "Key" >> beam.Map(lambda path: (hash(path) % KEYS, (path, payload)))


CASES = {
    "listing": lambda paths: paths,
    "five_maps": lambda paths: (paths | "M1" >> beam.Map(lambda x: x)
                                | "M2" >> beam.Map(lambda x: x) | "M3" >> beam.Map(lambda x: x)
                                | "M4" >> beam.Map(lambda x: x) | "M5" >> beam.Map(lambda x: x)),
    "count": lambda paths: paths | beam.combiners.Count.Globally(),
    "group_by_key": lambda paths: (_keyed(paths) | beam.GroupByKey()
                                   | beam.Map(lambda group: len(group[1]))),
    "group_per_bundle": lambda paths: (_keyed(paths) | beam.ParDo(_GroupPerBundle())
                                       | beam.GroupByKey()
                                       | beam.Map(lambda group: sum(map(len, group[1])))),
    "group_small": lambda paths: (_keyed(paths, b"") | beam.GroupByKey()
                                  | beam.Map(lambda group: len(group[1]))),
}


def seconds(case):
    start = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner", "DirectRunner"])) as pipeline:
        paths = (pipeline | beam.Create([None])
                 | beam.FlatMap(lambda _: (f"train/c/{i:05d}.jpg" for i in range(ELEMENTS))))
        CASES[case](paths)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    times = {case: [] for case in CASES}
    for _ in range(args.repeats):
        for case in CASES:
            times[case].append(seconds(case))
    for case, values in times.items():
        print(f"{case:>17}: median {statistics.median(values):.2f} s  "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    if args.json:
        from beam_jobs.atomic_json import write_json  # imports TensorFlow

        write_json(args.json, {
            "command": "python bench/beam_runner_costs.py " + " ".join(sys.argv[1:]),
            "elements": ELEMENTS, "keys": KEYS, "payload_bytes": len(PAYLOAD),
            "seconds": {case: [round(v, 3) for v in values] for case, values in times.items()},
            "median_seconds": {case: round(statistics.median(values), 3)
                               for case, values in times.items()}}, indent=2)


if __name__ == "__main__":
    main()
