"""The ``eat`` command. Each sub-command lives in its own module, imported only when chosen, so that
``eat serve``, and ``eat predict``/``eat extract`` on ONNX files, never import torch.

A command module provides ``add_arguments(parser)`` and ``run(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("training.convert", "convert an official fairseq .pt or Hugging Face EAT folder to our format"),
    "pretrain": ("training.pretrain", "self-supervised EAT pre-training (single process or torchrun)"),
    "finetune": ("training.finetune", "fine-tune a classifier on a labelled dataset"),
    "evaluate": ("training.evaluate", "mAP / accuracy of a checkpoint on a labelled dataset"),
    "export": ("training.export", "export a checkpoint to one self-describing ONNX file, verified"),
    "data": ("training.data.pack", "data tools: `eat data pack` writes a split into EAT's HDF5 shards (AS-2M)"),
    "demo": ("training.demo", "synthetic data -> pre-train -> fine-tune -> evaluate -> export, on CPU"),
    "serve": ("service.server", "serve an ONNX model over HTTP (settings from EAT_* variables)"),
    "predict": ("eat.predict_cli", "print the top labels of audio files (ONNX file or checkpoint)"),
    "extract": ("eat.extract", "save embeddings of a file, folder or manifest as .npy/.npz/Parquet, resumable"),
}

# Errors a user can cause (bad path, bad file, bad config) print one line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, PermissionError, KeyError)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eat", description="EAT, the Efficient Audio Transformer")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # Find the command without importing every module: only the chosen one is imported.
    command = next((a for a in argv if a in COMMANDS), None)
    if command is None:
        parser.parse_args(argv)  # prints help / errors for unknown commands
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    module.add_arguments(sub.add_parser(command, help=COMMANDS[command][1]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"eat {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
