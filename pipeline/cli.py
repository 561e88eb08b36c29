"""The ``ascl`` command line: thin glue over the pipeline's functions.

Each subcommand lives in its own module and registers itself through
``SUBCOMMANDS``; this module only builds the parser and dispatches.
"""

import argparse
import sys

from pipeline import __doc__ as _pipeline_doc  # noqa: F401  (package import check)

VERSION = "0.1.0"


def _version(args):
    import keras
    import tensorflow as tf

    print(f"ascl {VERSION} (tensorflow {tf.__version__}, keras {keras.__version__}, "
          f"backend {keras.backend.backend()})")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ascl",
        description="Adaptive Soft Contrastive Learning (Feng & Patras, ICPR 2022) in "
                    "TensorFlow/Keras: prepare data with Beam, train with model.fit, export "
                    "for TF Serving.")
    parser.add_argument("--version", action="version", version=f"ascl {VERSION}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = subcommands.add_parser("version", help="print the versions of ascl, TF and Keras")
    version.set_defaults(handler=_version)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
