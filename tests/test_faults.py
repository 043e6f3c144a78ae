"""A fairseq-train process killed with SIGKILL, during training or while a checkpoint is being
written, leaves a loadable ``checkpoint_last.pt``, and the same command resumes from it.

The kills are injected in forked fairseq-train processes by test-side hooks (conftest):
the process writes half of the file it is producing, then sends itself SIGKILL —

* in the copy that produces ``checkpoint_last.pt`` from the save's first checkpoint (with
  ``--save-interval-updates``): stock fairseq truncates checkpoint_last.pt in place there
  (shown by the control run, which undoes the plugin's atomic copy); the plugin's copy
  leaves the previous checkpoint_last.pt intact;
* in the ``torch.save`` writing ``checkpoint_last.pt`` directly (end-of-epoch saves);
* at a random time after training starts (seeded, the seed is in the failure message).
"""
import random

import pytest

from conftest import RELIABILITY_TRANSLATION_FLAGS, train_argv

SIGKILLED = -9


def _load(path):
    import powernorm_plugin  # noqa: F401  (safe weights-only loading of fairseq checkpoints)
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(str(path))


def _updates(path):
    return _load(path)["optimizer_history"][-1]["num_updates"]


def _argv(data, save_dir, *extra, max_update):
    return train_argv(data, save_dir, *RELIABILITY_TRANSLATION_FLAGS, "--lr", "0.005",
                      "--warmup-updates", "5", "--dropout", "0.1", *extra, max_update=max_update)


@pytest.mark.slow
def test_sigkill_leaves_a_loadable_checkpoint_and_resumes(fairseq_fork, reverse_task, tmp_path):
    data = reverse_task["data"]
    seed = random.randrange(10**6)
    runs = {
        # checkpoints at 5, 10, ... updates: each writes checkpoint_1_N.pt, then copies it to
        # checkpoint_last.pt; the kill comes in the second copy (10 updates)
        "copy": (_argv(data, tmp_path / "copy", "--save-interval-updates", "5", max_update=30),
                 ["kill_in_copy:2"]),
        "stock_copy": (_argv(data, tmp_path / "stock_copy", "--save-interval-updates", "5", max_update=30),
                       ["stock_copy", "kill_in_copy:2"]),
        # end-of-epoch saves (12 batches an epoch) write checkpoint_last.pt directly; the kill
        # comes in the second (24 updates)
        "torch_save": (_argv(data, tmp_path / "torch_save", max_update=30), ["kill_in_torch_save:2"]),
        # a checkpoint every 2 updates, SIGKILL 0.8-1.6 s into training
        "random": (_argv(data, tmp_path / "random", "--save-interval-updates", "2", max_update=120),
                   [f"kill_randomly:{seed},0.8,1.6"]),
    }
    results = fairseq_fork.run(
        [dict(tool="train", argv=argv, log=tmp_path / f"{name}-killed.log", hooks=hooks)
         for name, (argv, hooks) in runs.items()]
    )
    for (name, _), (code, log) in zip(runs.items(), results):
        assert code == SIGKILLED, f"{name} (seed {seed}): exit {code}, not killed:\n{log[-3000:]}"

    # the kill came in the middle of the copy: half a temporary file, the old checkpoint intact
    assert (tmp_path / "copy" / "checkpoint_last.pt.tmp").exists()
    assert _updates(tmp_path / "copy" / "checkpoint_last.pt") == 5
    assert _updates(tmp_path / "torch_save" / "checkpoint_last.pt") == 12
    random_last = _updates(tmp_path / "random" / "checkpoint_last.pt")
    assert 2 <= random_last < 120, (seed, random_last)
    # control: fairseq's own copy truncates checkpoint_last.pt in place
    with pytest.raises(Exception):
        _load(tmp_path / "stock_copy" / "checkpoint_last.pt")

    # the same commands resume from checkpoint_last.pt and finish
    resumed = ("copy", "torch_save", "random")
    logs = fairseq_fork.run_ok(
        [dict(tool="train", argv=runs[name][0], log=tmp_path / f"{name}-resumed.log") for name in resumed]
    )
    starts = {"copy": 5, "torch_save": 12, "random": random_last}
    for name, log in zip(resumed, logs):
        assert f"Loaded checkpoint {tmp_path / name / 'checkpoint_last.pt'}" in log, log[-3000:]
        assert f"@ {starts[name]} updates)" in log, (name, seed, log[-3000:])
        assert _updates(tmp_path / name / "checkpoint_last.pt") == (120 if name == "random" else 30)
