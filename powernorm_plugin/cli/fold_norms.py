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
import tempfile

import torch

from powernorm_plugin.checkpoint.safe_load import UnsafeCheckpointError, safe_load
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    if not os.path.isfile(args.input):
        print(f"fold_norms: --input {args.input}: no such file", file=sys.stderr)
        return 2
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        print("fold_norms: --output must differ from --input (keep the trainable checkpoint)",
              file=sys.stderr)
        return 2
    try:
        checkpoint = safe_load(args.input)
        folded = fold_checkpoint_state(checkpoint)
    except (FoldError, UnsafeCheckpointError) as e:
        print(f"fold_norms: --input {args.input}: {e}", file=sys.stderr)
        return 1
    out_dir = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".fold_norms.", suffix=".pt")
    os.close(fd)
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("folded %d norms into their linear layers: %s -> %s",
                len(folded), args.input, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
