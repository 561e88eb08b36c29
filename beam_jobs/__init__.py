"""Apache Beam jobs: dataset preparation and batch embedding.

Knows nothing about training; the contract with ``pipeline`` is the prepared-dataset
format (its file names, records and ``manifest.json``), whose one owner is
``beam_jobs.dataset_format``.
"""
