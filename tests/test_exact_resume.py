"""Exact resume through fairseq-train: "N updates, stop, resume with the same command, N more"
equals "2N updates" bit for bit on CPU — parameters, PowerNorm buffers, optimizer state
(NaP's projection targets included), learning-rate scheduler and data-iterator position.

A PowerNorm translation model and a PowerNorm language model, each with Adam and with
NaP-Adam; dropout on (so per-step RNG matters), the stop point mid-epoch in epoch 2 and the
end in a later epoch, and a PowerNorm warm-up that ends between the stop point and the end.
"""
import pytest
import torch

from conftest import RELIABILITY_LM_FLAGS, RELIABILITY_TRANSLATION_FLAGS, assert_same_state, train_argv

# (flags, N): stop after N updates, end after 2N; translation has 12 batches an epoch, the LM ~23.
CONFIGS = {
    "translation": (RELIABILITY_TRANSLATION_FLAGS, 17),
    "lm": (RELIABILITY_LM_FLAGS + ["--max-tokens", "512"], 30),
    # the trainer then seeds its iterator with seed + epoch
    "translation-seeded": (RELIABILITY_TRANSLATION_FLAGS + ["--update-ordered-indices-seed"], 17),
}
OPTIMIZERS = ("adam", "nap_adam")


def _load(path):
    import powernorm_plugin  # noqa: F401  (registers the types checkpoints hold)
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(str(path))


def _compared(state):
    """What must match: everything that determines the rest of training."""
    return {
        "model": state["model"],
        "optimizer": state["last_optimizer_state"],
        "lr_scheduler": state["optimizer_history"][-1]["lr_scheduler_state"],
        "num_updates": state["optimizer_history"][-1]["num_updates"],
        "train_iterator": state["extra_state"]["train_iterator"],
    }


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(fairseq_fork, reverse_task, counting_lm_task, tmp_path):
    data = {"translation": reverse_task["data"], "lm": counting_lm_task,
            "translation-seeded": reverse_task["data"]}
    runs = {}
    for kind, (flags, n) in CONFIGS.items():
        for opt in OPTIMIZERS if kind != "translation-seeded" else ("adam",):
            common = [*flags, "--lr", "0.005", "--warmup-updates", "8",
                      "--powernorm-warmup", str(n + 8), "--dropout", "0.1",
                      "--attention-dropout", "0.1"]
            name = f"{kind}-{opt}"
            runs[name] = {
                "full": train_argv(data[kind], tmp_path / name / "full", *common,
                                   max_update=2 * n, optimizer=opt),
                "half": train_argv(data[kind], tmp_path / name / "split", *common,
                                   max_update=n, optimizer=opt),
                "resume": train_argv(data[kind], tmp_path / name / "split", *common,
                                     max_update=2 * n, optimizer=opt),
                "n": n,
            }
    first = [dict(tool="train", argv=r[stage], log=tmp_path / f"{name}-{stage}.log")
             for name, r in runs.items() for stage in ("full", "half")]
    fairseq_fork.run_ok(first)
    halves = {name: _load(tmp_path / name / "split" / "checkpoint_last.pt") for name in runs}
    resumed = fairseq_fork.run_ok(
        [dict(tool="train", argv=r["resume"], log=tmp_path / f"{name}-resume.log") for name, r in runs.items()]
    )

    for (name, r), log in zip(runs.items(), resumed):
        n = r["n"]
        half = halves[name]
        itr = half["extra_state"]["train_iterator"]
        # the stop point lies mid-epoch, after the first epoch
        assert itr["epoch"] >= 2 and itr["iterations_in_epoch"] > 0, (name, itr)
        assert f"@ {n} updates" in log and "Loaded checkpoint" in log, log[-3000:]
        full = _load(tmp_path / name / "full" / "checkpoint_last.pt")
        split = _load(tmp_path / name / "split" / "checkpoint_last.pt")
        assert full["optimizer_history"][-1]["num_updates"] == 2 * n
        assert full["extra_state"]["train_iterator"]["epoch"] > itr["epoch"]
        # the PowerNorm warm-up (n + 8 forward passes) ends between the stop point and the end
        steps = [k for k in full["model"] if k.endswith("num_steps")]
        assert steps, f"{name}: no PowerNorm in the model"
        for k in steps:
            assert int(half["model"][k]) == n < n + 8 < int(full["model"][k]) == 2 * n, (k, name)
        if name.endswith("nap_adam"):
            assert "nap" in full["last_optimizer_state"], "NaP state missing from the checkpoint"
        # the runs really changed the state since the stop point
        assert not torch.equal(half["model"][steps[0].replace("num_steps", "running_phi")],
                               full["model"][steps[0].replace("num_steps", "running_phi")])
        assert_same_state(_compared(split), _compared(full), where=name)


@pytest.mark.slow
def test_reduce_lr_on_plateau_resumes_with_its_counts(fairseq_fork, reverse_task, tmp_path):
    # fairseq saves the scheduler's best loss, not how many epochs have not improved on it:
    # a run resumed between two such epochs reduced the learning rate an epoch later
    from conftest import USER_DIR

    def argv(save_dir, max_update):
        return [reverse_task["data"], "--user-dir", USER_DIR, "--cpu", "--optimizer", "adam",
                "--adam-betas", "(0.9,0.98)", "--lr", "0.005", "--lr-scheduler",
                "reduce_lr_on_plateau", "--lr-patience", "1", "--lr-threshold", "0.9",
                "--lr-shrink", "0.5", "--max-update", str(max_update), "--seed", "3",
                "--save-dir", str(save_dir), "--log-format", "simple", "--num-workers", "0",
                "--max-tokens-valid", "500", "--no-epoch-checkpoints", "--dropout", "0.1",
                *RELIABILITY_TRANSLATION_FLAGS]

    fairseq_fork.run_ok([dict(tool="train", argv=argv(tmp_path / "full", 48), log=tmp_path / "full.log"),
                         dict(tool="train", argv=argv(tmp_path / "split", 30), log=tmp_path / "half.log")])
    fairseq_fork.run_ok([dict(tool="train", argv=argv(tmp_path / "split", 48), log=tmp_path / "resume.log")])
    full = _load(tmp_path / "full" / "checkpoint_last.pt")
    split = _load(tmp_path / "split" / "checkpoint_last.pt")
    assert full["optimizer_history"][-1]["lr_scheduler_state"]["num_bad_epochs"] is not None
    assert full["last_optimizer_state"]["param_groups"][0]["lr"] < 0.005  # it did reduce
    assert_same_state(_compared(split), _compared(full), where="reduce_lr_on_plateau")
