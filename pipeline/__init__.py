"""The glue: input pipelines, training, evaluation, export and the ``ascl`` CLI.

The only package that reads configuration.
"""
