"""Run fairseq's command-line tools inside this process.

Each call prints the equivalent shell command first (``+ fairseq-train ...``), so a recipe's
log shows exactly what ran and can be replayed by hand. Running in-process instead of as a
subprocess saves fairseq's import time (seconds per call on small machines).
"""
import logging
import shlex
import sys
from typing import Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)


class ToolFailed(RuntimeError):
    """A command-line tool returned a failure status, having printed its reason."""


def _announce(tool: str, argv: Sequence[str]) -> None:
    print("+ " + shlex.join([tool, *argv]), file=sys.stderr, flush=True)


def preprocess(argv: Sequence[str]) -> None:
    """``fairseq-preprocess ARGV``."""
    from fairseq import options
    from fairseq_cli import preprocess as cli

    _announce("fairseq-preprocess", argv)
    args = options.get_preprocessing_parser().parse_args(list(argv))
    cli.main(args)


def _reset_run_state(train_cli) -> None:
    """Forget the best validation loss of an earlier training in this process: fairseq keeps
    it on function attributes, which would otherwise carry over to the next run's best
    checkpoint and early stopping (``--patience``)."""
    from fairseq import checkpoint_utils

    for fn, names in ((checkpoint_utils.save_checkpoint, ("best",)),
                      (train_cli.should_stop_early, ("best", "num_runs"))):
        for name in names:
            if hasattr(fn, name):
                delattr(fn, name)


def train(argv: Sequence[str], log_path: Optional[str] = None) -> None:
    """``fairseq-train ARGV`` (spawns one process per GPU when asked to, as fairseq does).

    With ``log_path``, everything logged during training is appended to that file too.
    (fairseq's own ``--log-file`` adds a new handler every epoch, so its file repeats
    lines; this handler is added once and removed afterwards.)
    """
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train as cli

    _announce("fairseq-train", argv)
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=list(argv))
    _reset_run_state(cli)
    handler = None
    if log_path is not None:
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        distributed_utils.call_main(convert_namespace_to_omegaconf(args), cli.main)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def generate(argv: Sequence[str]) -> None:
    """``fairseq-generate ARGV`` (give ``--results-path`` to get the output in a file)."""
    from fairseq import options
    from fairseq_cli import generate as cli

    _announce("fairseq-generate", argv)
    args = options.parse_args_and_arch(options.get_generation_parser(), input_args=list(argv))
    cli.main(args)


def eval_lm(argv: Sequence[str]) -> Dict[str, float]:
    """``fairseq-eval-lm ARGV``; returns its results (``loss`` in base 2, ``perplexity``)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm as cli

    _announce("fairseq-eval-lm", argv)
    args = options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=list(argv))
    results = cli.main(convert_namespace_to_omegaconf(args))
    return {"loss": float(results["loss"]), "perplexity": float(results["perplexity"])}


def average_checkpoints(argv: List[str]) -> None:
    """``python -m powernorm_plugin.cli.average_checkpoints ARGV``."""
    from powernorm_plugin.cli import average_checkpoints as cli

    print("+ " + shlex.join(["python", "-m", "powernorm_plugin.cli.average_checkpoints", *argv]),
          file=sys.stderr, flush=True)
    rc = cli.main(argv)
    if rc:  # the tool has printed why
        raise ToolFailed(f"averaging checkpoints failed (exit status {rc})")
