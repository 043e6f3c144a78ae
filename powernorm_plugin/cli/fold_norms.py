"""Fold the PowerNorm/BatchNorm layers of a trained checkpoint into the following linear layers.

    python -m powernorm_plugin.cli.fold_norms --input checkpoint_best.pt --output folded.pt

The folded checkpoint gives the same outputs at inference with fewer norm operations: each
folded norm leaves only its parameter-free part (PowerNorm's group scaling, or nothing).
Which norms fold where: :mod:`powernorm_plugin.models.folding` (the decoder's final norm and
LayerNorm/RMSNorm sites stay). Load it as any checkpoint (``fairseq-generate --user-dir
.../powernorm_plugin --path folded.pt``); it cannot be trained further, and it carries no
optimizer state. The input is loaded weights-only; the output is written next to its final
path and renamed into place.
"""
import argparse
import logging
import os
import sys

from powernorm_plugin.checkpoint.atomic_save import save_atomically
from powernorm_plugin.checkpoint.safe_load import (
    UnreadableCheckpointError, UnsafeCheckpointError, safe_load,
)
from powernorm_plugin.cli._paths import check_output
from powernorm_plugin.models.folding import FoldError, fold_checkpoint_state

logger = logging.getLogger("powernorm_plugin.cli.fold_norms")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m powernorm_plugin.cli.fold_norms",
        description="Fold eval-mode PowerNorm/BatchNorm of a powernorm_transformer(_lm) "
        "checkpoint into the linear layers that read them.",
    )
    parser.add_argument("--input", required=True, help="fairseq checkpoint to fold")
    parser.add_argument("--output", required=True, help="where to write the folded checkpoint")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    if not os.path.isfile(args.input):
        print(f"fold_norms: --input {args.input}: no such file", file=sys.stderr)
        return 2
    check_output(parser, args.output, [args.input])
    try:
        checkpoint = safe_load(args.input)
        folded = fold_checkpoint_state(checkpoint)
    except (FoldError, UnsafeCheckpointError, UnreadableCheckpointError) as e:
        print(f"fold_norms: --input {args.input}: {e}", file=sys.stderr)
        return 1
    save_atomically(checkpoint, args.output)
    logger.info("folded %d norms into their linear layers: %s -> %s",
                len(folded), args.input, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
