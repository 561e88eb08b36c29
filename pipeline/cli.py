"""The ``ascl`` command line: thin glue over the pipeline's functions.

Each subcommand lives in its own module and registers itself through
``SUBCOMMANDS``; this module only builds the parser and dispatches.
"""

import argparse
import sys

VERSION = "0.1.0"


def _version(args):
    import keras
    import tensorflow as tf

    print(f"ascl {VERSION} (tensorflow {tf.__version__}, keras {keras.__version__}, "
          f"backend {keras.backend.backend()})")
    return 0


# Commands whose flags belong to another module's parser (Beam jobs also take
# PipelineOptions flags); the rest of argv is handed over untouched.
PASSTHROUGH = {
    "prepare": ("beam_jobs.prepare", "prepare a dataset with Beam: raw images -> TFRecord shards "
                                     "+ manifest (see `ascl prepare --help`)"),
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ascl",
        description="Adaptive Soft Contrastive Learning (Feng & Patras, ICPR 2022) in "
                    "TensorFlow/Keras: prepare data with Beam, train with model.fit, export "
                    "for TF Serving.")
    parser.add_argument("--version", action="version", version=f"ascl {VERSION}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in PASSTHROUGH.items():
        subcommands.add_parser(name, help=help_text, add_help=False)
    version = subcommands.add_parser("version", help="print the versions of ascl, TF and Keras")
    version.set_defaults(handler=_version)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        return importlib.import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
