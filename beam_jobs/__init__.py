"""Apache Beam jobs: dataset preparation and batch embedding.

Knows nothing about training; the contract with ``pipeline`` is the
``manifest.json`` a preparation job writes.
"""
