"""Long runs at a high learning rate, and what a diverging run does.

* ``test_long_run_stays_finite``: the real fairseq model class (``powernorm_transformer_iwslt_de_en``,
  tiny) trained in a plain Adam loop on the reverse task's batches (fairseq's criterion, padding
  and dropout included) for LONG_RUN_STEPS steps at lr LONG_RUN_LR, constant, in the six
  configurations {paper, official, PN-V} x {group scaling (2 groups), none}. Every loss,
  parameter and PowerNorm buffer must stay finite and the model must learn; a run may only
  stop early through PowerNorm's FloatingPointError naming the layer (allowed only without
  group scaling, where the authors report NaN), never by a silent NaN. The steps default to
  500 per configuration to keep CI within about a minute on 2 cores;
  ``POWERNORM_LONG_RUN_STEPS=3000`` runs the long version.
* ``test_diverging_fairseq_train_stops_naming_the_layer``: fairseq-train with a huge learning
  rate and no group scaling: the run stops with PowerNorm's error naming the layer, exits
  non-zero, and every checkpoint it wrote (fairseq's crash.pt included) is finite.
"""
import json
import math
import os
import time

import pytest
import torch

from conftest import RELIABILITY_TRANSLATION_FLAGS, train_argv

LONG_RUN_STEPS = int(os.environ.get("POWERNORM_LONG_RUN_STEPS", "500"))
LONG_RUN_LR = 0.02  # 13x the paper's peak lr (0.0015), constant, no warm-up of the lr
CONFIGS = [  # (name, norm kind, --powernorm-mode, --powernorm-groups)
    (f"{label}-{'groups' if groups else 'nogroups'}", kind, mode, groups)
    for label, kind, mode in (("paper", "power", "paper"), ("official", "power", "official"),
                              ("vanilla", "power_vanilla", "paper"))
    for groups in (2, 0)
]


def long_run(data, kind, mode, groups, steps, lr, out):
    """Train a tiny plugin translation model with Adam for ``steps`` steps; write a JSON summary.

    Called in a forked child of the fairseq fork server (see conftest).
    """
    from fairseq import options, tasks

    import powernorm_plugin  # noqa: F401  (registers the architectures)

    torch.set_num_threads(1)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        data, *RELIABILITY_TRANSLATION_FLAGS, "--encoder-norm-self", kind, "--encoder-norm-ff", kind,
        "--powernorm-mode", mode, "--powernorm-groups", str(groups), "--powernorm-warmup", "100",
        "--dropout", "0.1", "--max-tokens", "300", "--seed", "1",
    ])
    task = tasks.setup_task(args)
    task.load_dataset("train")
    torch.manual_seed(1)
    model, criterion = task.build_model(args), task.build_criterion(args)
    batches = list(task.get_batch_iterator(task.dataset("train"), max_tokens=300, seed=1,
                                           num_workers=0).next_epoch_itr(shuffle=True))
    optimizer = torch.optim.Adam(model.parameters(), lr=float(lr), betas=(0.9, 0.98))
    model.train()
    summary = {"steps": 0, "losses": [], "error": None, "nonfinite_loss": False}
    start = time.perf_counter()
    for step in range(int(steps)):
        sample = batches[step % len(batches)]
        try:
            loss, sample_size, _ = criterion(model, sample)
            loss = loss / sample_size
            optimizer.zero_grad()
            loss.backward()
        except FloatingPointError as e:
            summary["error"] = str(e)
            break
        if not math.isfinite(loss.item()):
            summary["nonfinite_loss"] = True
            break
        optimizer.step()
        summary["steps"] = step + 1
        summary["losses"].append(loss.item())
    summary["steps_per_s"] = summary["steps"] / (time.perf_counter() - start)
    summary["nonfinite_tensors"] = [
        k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    summary["running_phi_max"] = max(
        v.max().item() for k, v in model.state_dict().items() if k.endswith("running_phi")
    )
    with open(out, "w") as f:
        json.dump(summary, f)


@pytest.mark.slow
def test_long_run_stays_finite(fairseq_fork, reverse_task, tmp_path):
    jobs = [
        dict(call="test_long_run:long_run", log=tmp_path / f"{name}.log",
             argv=[reverse_task["data"], kind, mode, groups, LONG_RUN_STEPS, LONG_RUN_LR,
                   tmp_path / f"{name}.json"])
        for name, kind, mode, groups in CONFIGS
    ]
    fairseq_fork.run_ok(jobs, parallel=2, timeout=600)
    report = []
    for name, *_ in CONFIGS:
        with open(tmp_path / f"{name}.json") as f:
            s = json.load(f)
        report.append(f"{name}: {s['steps']} steps at {s['steps_per_s']:.1f}/s, "
                      f"loss {s['losses'][0]:.2f} -> {sum(s['losses'][-50:]) / 50:.2f}, "
                      f"max psi^2 {s['running_phi_max']:.3g}, error {s['error']}")
        assert not s["nonfinite_loss"], f"{name}: silent non-finite loss at step {s['steps'] + 1}"
        assert s["nonfinite_tensors"] == [], f"{name}: non-finite {s['nonfinite_tensors']}"
        if s["error"] is not None:
            # only without group scaling may a run diverge, and then it must name the layer
            assert name.endswith("nogroups"), f"{name} diverged: {s['error']}"
            assert s["error"].startswith("encoder."), s["error"]
            continue
        assert s["steps"] == LONG_RUN_STEPS
        assert sum(s["losses"][-50:]) / 50 < 0.5 * s["losses"][0], f"{name} did not learn"
    print("\n".join(report))


@pytest.mark.slow
def test_diverging_fairseq_train_stops_naming_the_layer(fairseq_fork, reverse_task, tmp_path):
    save = tmp_path / "ckpt"
    argv = train_argv(
        reverse_task["data"], save, *RELIABILITY_TRANSLATION_FLAGS, "--powernorm-groups", "0",
        "--lr", "1e5", "--warmup-updates", "1", "--dropout", "0.1", "--save-interval-updates", "1",
        max_update=50,
    )
    [(code, log)] = fairseq_fork.run([dict(tool="train", argv=argv, log=tmp_path / "train.log")])
    assert code != 0, "fairseq-train with lr 1e5 finished: no divergence to check"
    last = log.strip().splitlines()[-1]
    assert last.startswith("FloatingPointError: encoder."), log[-3000:]
    assert "psi_B^2 is not finite" in last
    import powernorm_plugin  # noqa: F401
    from fairseq import checkpoint_utils

    written = sorted(p.name for p in save.glob("*.pt"))
    assert "crash.pt" in written, written
    for name in written:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(save / name))
        bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert bad == [], f"{name} holds non-finite {bad}"
