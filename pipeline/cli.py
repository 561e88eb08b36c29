"""The ``ascl`` command line: thin glue over the pipeline's functions.

Each subcommand's work lives in its own module; this one builds the parser,
dispatches, and turns the errors users can fix (``beam_jobs.errors.InputError``: a bad
config or flag, a missing dataset or run, an existing output) into one-line messages and
exit status 2, and a training that cannot finish into exit status 1.  Any other exception
is a bug and keeps its traceback.
"""

import argparse
import json
import os
import re
import sys
import tempfile

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
    "embed": ("beam_jobs.embed", "embed a dataset with an exported SavedModel through Beam "
                                 "RunInference (see `ascl embed --help`)"),
}


def _train(args):
    from pipeline.config import load_config
    from pipeline.train import train

    sets = list(args.set)
    for flag, key in (("strategy", "train.strategy"), ("mixed_precision", "train.mixed_precision"),
                      ("jit_compile", "train.jit_compile"), ("epochs", "train.epochs")):
        if getattr(args, flag) is not None:
            sets.append(f"{key}={getattr(args, flag)}")
    config = load_config(args.config, sets)
    summary = train(config, args.run_dir, allow_config_change=args.allow_config_change)
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args):
    from pipeline.evaluate import evaluate_run

    report = evaluate_run(args.run_dir, checkpoint=args.checkpoint, output=args.output,
                          linear=not args.no_linear, verbose=1)
    print(json.dumps(report, indent=2))
    return 0


def _export(args):
    from pipeline.export import export_run

    path = export_run(args.run_dir, name=args.name, checkpoint=args.checkpoint,
                      version=args.version, base_dir=args.base_dir, gallery=args.gallery,
                      k=args.k, gallery_dtype=args.gallery_dtype, max_pixels=args.max_pixels,
                      precision=args.precision)
    signatures = "serving_default, embed_pixels" + (
        f", neighbors and neighbors_of_embedding (top {args.k})" if args.gallery else "")
    print(f"exported {path} ({args.precision}; signatures: {signatures})")
    return 0


def _search(args):
    from pipeline.search import draw_contact_sheet, format_rows, search_image

    rows, image_bytes = search_image(args.model, args.image, k=args.k)
    print(format_rows(rows))
    if args.sheet:
        print(f"contact sheet: {draw_contact_sheet(image_bytes, rows, args.sheet)}")
    return 0


def _demo(args):
    from pipeline.demo import run_demo

    run_demo(args.workdir, epochs=args.epochs, overrides=args.set)
    return 0


def _run_dir_parent():
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--run-dir", required=True,
                        help="the run folder (`ascl train` writes checkpoints, logs and history "
                             "there)")
    return parent


def _checkpoint_parent():
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--checkpoint", default="last",
                        help="last (default), best (by kNN on the validation hold-out) or a "
                             "weights path")
    return parent


def _add_train_arguments(train):
    from pipeline.config import choices_of  # TensorFlow: only when the command is train

    train.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set optimizer.lr=0.03 (repeatable)")
    train.add_argument("--strategy", choices=choices_of("train.strategy"),
                       help="distribution strategy (default: the config's train.strategy)")
    train.add_argument("--mixed-precision", choices=choices_of("train.mixed_precision"),
                       help="auto (the default): mixed_bfloat16 on CPUs with AVX512_BF16 or AMX "
                            "and GPUs of compute capability >= 8.0, float32 elsewhere")
    train.add_argument("--jit-compile", choices=choices_of("train.jit_compile"), help="XLA")
    train.add_argument("--epochs", type=int, help="shorthand for --set train.epochs=N")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume a run although its settings changed (recorded in "
                            "RUN/config_changes.jsonl); without it only a larger "
                            "train.epochs is accepted")


def _add_export_arguments(export):
    from pipeline.export import EXPORT_PRECISIONS  # TensorFlow: only when the command is export
    from pipeline.gallery import STORAGE_DTYPES

    export.add_argument("--name", required=True, help="model name (saved_models/NAME/VERSION)")
    export.add_argument("--version", type=int, help="default: the next integer")
    export.add_argument("--base-dir", default="saved_models")
    export.add_argument("--gallery", metavar="EMBED_OUTPUT",
                        help="an `ascl embed` output folder, embedded with an export of the same "
                             "run and checkpoint: adds the `neighbors` and "
                             "`neighbors_of_embedding` signatures (similar-image search)")
    export.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    export.add_argument("--gallery-dtype", default="float32", choices=list(STORAGE_DTYPES),
                        help="how the gallery is stored and searched (bfloat16: half the "
                             "memory; see BENCHMARKS.md for its recall)")
    export.add_argument("--precision", default="float32", choices=list(EXPORT_PRECISIONS),
                        help="compute of the backbone and projector in the serving graph "
                             "(bfloat16: faster only on CPUs with AVX512_BF16 or AMX, and "
                             "GPUs; outputs stay float32 and unit-norm; see BENCHMARKS.md)")
    export.add_argument("--max-pixels", type=int, default=40_000_000,
                        help="largest image (width x height, read from its header before "
                             "decoding) that the serving graph accepts; larger ones are "
                             "refused, so that one image cannot take the server's memory "
                             "(default 40,000,000)")


def build_parser(command=None):
    """The ``ascl`` parser.  ``command``: the subcommand about to be parsed, when known; the
    flags of train and export take their choices from modules that import TensorFlow, so
    they are added only for that command (or for every command when None), which keeps
    ``ascl --help`` and the other commands' help instant."""
    # Long but flat: one block per subcommand, in the order `ascl --help` lists them.
    parser = argparse.ArgumentParser(
        prog="ascl",
        description="Adaptive Soft Contrastive Learning (Feng & Patras, ICPR 2022) in "
                    "TensorFlow/Keras: prepare data with Beam, train with model.fit, export "
                    "for TF Serving.")
    parser.add_argument("--version", action="version", version=f"ascl {VERSION}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in PASSTHROUGH.items():
        subcommands.add_parser(name, help=help_text, add_help=False)
    run_dir, checkpoint = _run_dir_parent(), _checkpoint_parent()
    train = subcommands.add_parser(
        "train", parents=[run_dir],
        help="pre-train an ASCL encoder on a prepared dataset (resumes if interrupted)",
        description="Pre-train with model.fit. Rerunning the same command after an "
                    "interruption resumes from the last epoch backup.")
    if command in (None, "train"):
        _add_train_arguments(train)
    train.set_defaults(handler=_train)

    evaluate = subcommands.add_parser(
        "evaluate", parents=[run_dir, checkpoint],
        help="kNN, linear probe and raw-pixel baseline for a trained run")
    evaluate.add_argument("--output", help="report path (default RUN/evaluation.json)")
    evaluate.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    evaluate.set_defaults(handler=_evaluate)

    export = subcommands.add_parser(
        "export", parents=[run_dir, checkpoint],
        help="export a run's encoder as a SavedModel for TF Serving")
    if command in (None, "export"):
        _add_export_arguments(export)
    export.set_defaults(handler=_export)

    search = subcommands.add_parser(
        "search", help="the gallery neighbours of an image, through an export's `neighbors`",
        description="Prints the nearest gallery images of --image (id, score, label, path), "
                    "calling the SavedModel's `neighbors` signature as TF Serving does.")
    search.add_argument("--model", required=True, help="an export with a gallery: "
                                                       "saved_models/NAME/VERSION")
    search.add_argument("--image", required=True, help="the query image file")
    search.add_argument("--k", type=int, help="neighbours to show (default 8, or the export's "
                                              "k if smaller; at most the export's k)")
    search.add_argument("--sheet", metavar="OUT.png",
                        help="also draw a contact sheet: the query beside its neighbours")
    search.set_defaults(handler=_search)

    demo = subcommands.add_parser(
        "demo", help="end to end on the bundled digits: prepare, train, evaluate, export")
    demo.add_argument("--workdir", default="runs/demo",
                      help="replaced if an earlier demo made it; any other folder is refused")
    demo.add_argument("--epochs", type=int, help="pre-training epochs (default: the config's)")
    demo.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a value of configs/digits_small.yaml, e.g. --set "
                           "ascl.framework=byol (repeatable)")
    demo.set_defaults(handler=_demo)

    version = subcommands.add_parser("version", help="print the versions of ascl, TF and Keras")
    version.set_defaults(handler=_version)
    return parser


# TensorFlow's start-up chatter on stderr: absl's pre-initialisation INFO lines (oneDNN,
# "could not find cuda drivers", CPU feature notices) and the cuInit failure of a GPU-less
# machine.  TF_CPP_MIN_LOG_LEVEL does not reach the absl lines, so they are filtered.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|I0000 |"
    r"E0000 .*(cuInit|cuda_platform)|To enable the following instructions|"
    r"This TensorFlow binary is optimized)")


def quiet_tensorflow_startup():
    """Imports TensorFlow with its start-up logs filtered out, unless the user set
    ``TF_CPP_MIN_LOG_LEVEL`` (then everything is shown, as they asked).

    Finding the devices here does not initialise TensorFlow's context, so strategies
    and device settings made later still work.  Lines that are not start-up noise
    (real warnings and errors) are written through to stderr.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        for line in captured.read().decode("utf-8", "replace").splitlines():
            if line.strip() and not _STARTUP_NOISE.match(line):
                print(line, file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else ""
    if command in ("train", "export", *PASSTHROUGH) or (
            argv and not {"-h", "--help", "--version"} & set(argv)):
        quiet_tensorflow_startup()  # even for --help: these commands' parsers import it
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        from beam_jobs.errors import InputError

        try:
            return importlib.import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:])
        except InputError as error:
            print(f"ascl {argv[0]}: error: {error}", file=sys.stderr)
            return 2
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    from beam_jobs.errors import InputError
    from pipeline.train import TrainingError

    try:
        return args.handler(args)
    except InputError as error:  # what the user can fix; anything else shows its traceback
        print(f"ascl {args.command}: error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"ascl {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
