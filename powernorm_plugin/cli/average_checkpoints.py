"""Average the model weights of fairseq checkpoints into one checkpoint.

    python -m powernorm_plugin.cli.average_checkpoints --inputs a.pt b.pt c.pt --output avg.pt
    python -m powernorm_plugin.cli.average_checkpoints --inputs CKPT_DIR \\
        --num-epoch-checkpoints 5 --output CKPT_DIR/checkpoint.avg5.pt

With a directory, the last N epoch checkpoints (``checkpointE.pt``) or update
checkpoints (``checkpoint_E_U.pt``) by number are averaged, optionally only those numbered
at most ``--checkpoint-upper-bound``. Floating-point weights and buffers are averaged;
integer buffers (step counters) come from the last checkpoint; see
:mod:`powernorm_plugin.checkpoint.average`. The output keeps the last checkpoint's
``cfg``/``args`` and training state, without optimizer state, so fairseq-generate and
fairseq-eval-lm load it (with ``--user-dir`` for the plugin's architectures). Every input
is loaded weights-only (:mod:`powernorm_plugin.checkpoint.safe_load`); the output is
written to a temporary file next to it and renamed into place.
"""
import argparse
import logging
import os
import re
import sys
from typing import List, Optional

from powernorm_plugin.checkpoint.atomic_save import save_atomically
from powernorm_plugin.checkpoint.average import StateDictAverager, StateDictMismatchError
from powernorm_plugin.checkpoint.safe_load import (
    UnreadableCheckpointError, UnsafeCheckpointError, safe_load,
)
from powernorm_plugin.cli._paths import check_output

logger = logging.getLogger("powernorm_plugin.cli.average_checkpoints")

_PATTERNS = {
    "epoch": (re.compile(r"^checkpoint(\d+)\.pt$"), "checkpointEPOCH.pt"),
    "update": (re.compile(r"^checkpoint_\d+_(\d+)\.pt$"), "checkpoint_EPOCH_UPDATES.pt"),
}


class CheckpointSelectionError(ValueError):
    """The inputs given do not name the checkpoints to average."""


def last_checkpoints(
    directory: str, count: int, kind: str, upper_bound: Optional[int] = None
) -> List[str]:
    """The ``count`` highest-numbered ``kind`` ("epoch" or "update") checkpoints in
    ``directory`` numbered at most ``upper_bound``, oldest first."""
    pattern, spelling = _PATTERNS[kind]
    numbered = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match is None:
            continue
        number = int(match.group(1))
        if upper_bound is None or number <= upper_bound:
            numbered.append((number, name))
    numbered.sort()
    if len(numbered) < count:
        bound = f" numbered <= {upper_bound}" if upper_bound is not None else ""
        raise CheckpointSelectionError(
            f"--inputs {directory} holds {len(numbered)} {kind} checkpoints ({spelling}){bound}, "
            f"but --num-{kind}-checkpoints asks for {count}"
        )
    return [os.path.join(directory, name) for _, name in numbered[-count:]]


def select_inputs(args: argparse.Namespace) -> List[str]:
    """The checkpoint files named by ``--inputs`` and the selection flags, oldest first."""
    kind = (
        "epoch"
        if args.num_epoch_checkpoints is not None
        else "update"
        if args.num_update_checkpoints is not None
        else None
    )
    if kind is not None:
        count = args.num_epoch_checkpoints if kind == "epoch" else args.num_update_checkpoints
        if count < 1:
            raise CheckpointSelectionError(f"--num-{kind}-checkpoints must be >= 1, got {count}")
        if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
            raise CheckpointSelectionError(
                f"--num-{kind}-checkpoints needs --inputs to be one directory, "
                f"got {' '.join(args.inputs)}"
            )
        return last_checkpoints(args.inputs[0], count, kind, args.checkpoint_upper_bound)
    if args.checkpoint_upper_bound is not None:
        raise CheckpointSelectionError(
            "--checkpoint-upper-bound needs --num-epoch-checkpoints or --num-update-checkpoints"
        )
    seen = set()
    for path in args.inputs:
        if os.path.isdir(path):
            raise CheckpointSelectionError(
                f"--inputs {path} is a directory: add --num-epoch-checkpoints N or "
                f"--num-update-checkpoints N, or list checkpoint files"
            )
        if not os.path.isfile(path):
            raise CheckpointSelectionError(f"--inputs {path}: no such file")
        real = os.path.realpath(path)
        if real in seen:
            raise CheckpointSelectionError(f"--inputs {path} is listed twice")
        seen.add(real)
    return list(args.inputs)


def average_checkpoints(inputs: List[str]) -> dict:
    """Load ``inputs`` one at a time and return the last one's state with averaged weights.

    ``last_optimizer_state`` is set to None: no optimizer state matches averaged weights.
    """
    averager = StateDictAverager()
    last_state = None
    for path in inputs:
        state = safe_load(path)
        if not isinstance(state, dict) or "model" not in state:
            raise CheckpointSelectionError(
                f"--inputs {path} is not a fairseq checkpoint: it has no 'model' entry"
            )
        averager.add(state["model"], path)
        last_state = state
    last_state["model"] = averager.average()
    last_state["last_optimizer_state"] = None
    return last_state


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m powernorm_plugin.cli.average_checkpoints",
        description="Average the weights of fairseq checkpoints (float weights and buffers "
        "averaged, integer buffers from the last checkpoint) into one checkpoint.",
    )
    parser.add_argument(
        "--inputs",
        nargs="+",
        required=True,
        metavar="PATH",
        help="checkpoint files to average (the last one's cfg is kept), or one directory "
        "with --num-epoch-checkpoints / --num-update-checkpoints",
    )
    parser.add_argument(
        "--output", required=True, metavar="FILE", help="averaged checkpoint to write"
    )
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument(
        "--num-epoch-checkpoints",
        type=int,
        metavar="N",
        help="average the last N checkpointEPOCH.pt files in the --inputs directory",
    )
    selection.add_argument(
        "--num-update-checkpoints",
        type=int,
        metavar="N",
        help="average the last N checkpoint_EPOCH_UPDATES.pt files in the --inputs directory",
    )
    parser.add_argument(
        "--checkpoint-upper-bound",
        type=int,
        metavar="NUM",
        help="with --num-*-checkpoints, consider only checkpoints whose epoch (or update) "
        "number is at most NUM",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    check_output(parser, args.output)
    try:
        inputs = select_inputs(args)
        check_output(parser, args.output, inputs)
        logger.info("averaging %d checkpoints: %s", len(inputs), " ".join(inputs))
        state = average_checkpoints(inputs)
    except (CheckpointSelectionError, StateDictMismatchError, UnsafeCheckpointError,
            UnreadableCheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    save_atomically(state, args.output)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
