"""Data-parallel training through fairseq-train itself: two CPU processes (gloo), one per rank.

A tiny PowerNorm translation model trained with NaP-Adam to completion, once with
``--powernorm-sync`` (every rank must end with the same PowerNorm statistics) and once
without (the run still completes; each rank's statistics come from its own batches only, so
they differ). fairseq writes checkpoints on rank 0 only, so each rank's final model state is
dumped by a test-side hook on ``checkpoint_utils.save_checkpoint`` (called on every rank).
"""
import socket

import pytest
import torch

from conftest import RELIABILITY_TRANSLATION_FLAGS, assert_same_state, train_argv

MAX_UPDATE = 20
STAT_SUFFIXES = ("running_phi", "running_nu", "num_steps")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_ranks(fairseq_fork, data, out, *extra, max_update=MAX_UPDATE):
    out.mkdir(exist_ok=True)
    port = _free_port()
    jobs = []
    for rank in (0, 1):
        argv = train_argv(
            data, out / "ckpt", *RELIABILITY_TRANSLATION_FLAGS, "--lr", "0.005",
            "--warmup-updates", "5", "--dropout", "0.1", *extra,
            "--distributed-backend", "gloo", "--distributed-world-size", "2",
            "--distributed-rank", str(rank), "--distributed-init-method", f"tcp://127.0.0.1:{port}",
            "--distributed-no-spawn", "--device-id", "0", "--ddp-backend", "legacy_ddp",
            max_update=max_update, optimizer="nap_adam",
        )
        jobs.append(dict(tool="train", argv=argv, log=out / f"rank{rank}.log",
                         hooks=[f"dump_state:{out}/state{{rank}}.pt"]))
    logs = fairseq_fork.run_ok(jobs, parallel=2, timeout=300)
    states = [torch.load(out / f"state{rank}.pt") for rank in (0, 1)]
    return logs, states


def _stats(model_state):
    return {k: v for k, v in model_state.items() if k.endswith(STAT_SUFFIXES)}


@pytest.mark.slow
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "no_sync"])
def test_two_gloo_ranks_train_powernorm_with_nap(fairseq_fork, reverse_task, tmp_path, sync):
    logs, states = _train_two_ranks(
        fairseq_fork, reverse_task["data"], tmp_path, *(["--powernorm-sync"] if sync else [])
    )
    # both ranks exited 0 (run_ok); fairseq logs training progress on rank 0 only
    assert "done training" in logs[0], logs[0][-3000:]
    assert "distributed init (rank 1)" in logs[1]
    # two workers: no "--powernorm-sync has no effect" warning (see test_cli_errors)
    assert "--powernorm-sync has no effect" not in logs[0]
    for state in states:
        assert state["num_updates"] == MAX_UPDATE
    a, b = (s["model"] for s in states)
    # data parallelism keeps the parameters (NaP's projection included) identical on both ranks
    for name in a:
        if not name.endswith(STAT_SUFFIXES):
            assert torch.equal(a[name], b[name]), f"parameter {name} differs between ranks"
    stats_a, stats_b = _stats(a), _stats(b)
    assert any(k.endswith("running_phi") for k in stats_a), "no PowerNorm in the model"
    for k in stats_a:
        assert torch.isfinite(stats_a[k].float()).all() and torch.isfinite(stats_b[k].float()).all()
        if k.endswith("num_steps"):
            assert int(stats_a[k]) == int(stats_b[k]) == MAX_UPDATE
    differing = [k for k in stats_a if not k.endswith("num_steps") and not torch.equal(stats_a[k], stats_b[k])]
    if sync:
        assert differing == [], f"--powernorm-sync: ranks hold different statistics in {differing}"
    else:
        # every rank normalizes by its own batches: all psi^2 and nu statistics diverge
        assert len(differing) == len([k for k in stats_a if not k.endswith("num_steps")]), differing
    # rank 0 wrote the checkpoint, with rank 0's statistics
    import powernorm_plugin  # noqa: F401
    from fairseq import checkpoint_utils

    ckpt = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "ckpt" / "checkpoint_last.pt"))
    for k, v in stats_a.items():
        assert torch.equal(ckpt["model"][k], v), k


@pytest.mark.slow
def test_two_gloo_ranks_resume_exactly_as_an_uninterrupted_run(fairseq_fork, reverse_task,
                                                                tmp_path):
    # Resuming, rank 0 loads the checkpoint and broadcasts it to rank 1 (a pickle that torch's
    # weights-only loader refused: omegaconf's DictConfig). --max-tokens 900 makes 11 batches
    # an epoch, so rank 1 ends each epoch on a dummy batch; the run stops and resumes at the
    # end of epoch 2 (6 updates an epoch); --store-ema averages a model with step counters.
    data, flags = reverse_task["data"], ("--powernorm-sync", "--store-ema", "--max-tokens", "900")
    logs, whole = _train_two_ranks(fairseq_fork, data, tmp_path / "whole", *flags)
    assert sum("begin training epoch" in line for line in logs[0].splitlines()) >= 2
    _train_two_ranks(fairseq_fork, data, tmp_path / "split", *flags, max_update=12)
    logs, split = _train_two_ranks(fairseq_fork, data, tmp_path / "split", *flags)
    assert "Loaded checkpoint" in logs[0] and "done training" in logs[0], logs[0][-3000:]
    for rank in (0, 1):
        assert split[rank]["num_updates"] == MAX_UPDATE
        assert_same_state(split[rank]["model"], whole[rank]["model"], f"rank {rank}'s model")
