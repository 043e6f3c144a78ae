"""NaP optimizers inside fairseq: registration, flags, hydra, precision wrappers, and
real ``fairseq-train`` runs (norms kept, logged effective LR, exact resume)."""
import json
import math
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

fairseq = pytest.importorskip("fairseq")

from fairseq import optim, options  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.models.transformer import TransformerModel  # noqa: E402

import powernorm_plugin  # noqa: E402,F401  (registers nap_*)
from powernorm_plugin.optim import NaPOptimizer, make_nap_optimizer, param_names_context  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "powernorm_plugin")

TINY = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]  # fmt: skip


def parse(extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/nonexistent-data"] + TINY + extra)
    return args, convert_namespace_to_omegaconf(args)


def tiny_model(args, seed=0):
    torch.manual_seed(seed)
    d = Dictionary()
    for i in range(20):
        d.add_symbol(f"w{i}")
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    return TransformerModel.build_model(args, task)


def fake_backward(opt, params, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((p.float() * torch.randn(p.shape, generator=g)).sum() for p in params)
    loss = loss + sum((p.float() ** 2).sum() for p in params) * 0.1
    opt.backward(loss)


def group_norms(projector, tensors_by_name):
    out = []
    for name in projector.names:
        members = name  # single-tensor groups in these tests
        out.append(tensors_by_name[members].detach().float().norm())
    return torch.stack(out)


# --------------------------------------------------------------- registration
def test_every_registered_optimizer_has_a_nap_variant():
    bases = [n for n in optim.OPTIMIZER_REGISTRY if not n.startswith("nap_")]
    for b in ("adam", "sgd", "nag", "adafactor", "adagrad", "adadelta"):
        assert b in bases
    for b in bases:
        assert "nap_" + b in optim.OPTIMIZER_REGISTRY, b
        assert "nap_" + b in optim.OPTIMIZER_DATACLASS_REGISTRY, b
        assert issubclass(optim.OPTIMIZER_REGISTRY["nap_" + b], NaPOptimizer)


def test_unknown_base_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown base optimizer 'adamw_nonexistent'"):
        make_nap_optimizer("adamw_nonexistent")


@pytest.mark.parametrize(
    "name, flags, expect",
    [
        ("adam", ["--adam-betas", "(0.9, 0.98)", "--adam-eps", "1e-6"], {"betas": (0.9, 0.98), "eps": 1e-6}),
        ("sgd", ["--momentum", "0.9", "--weight-decay", "0.01"], {"momentum": 0.9, "weight_decay": 0.01}),
        ("nag", ["--momentum", "0.5"], {"momentum": 0.5}),
        ("adagrad", ["--weight-decay", "0.1"], {"weight_decay": 0.1}),
        ("adadelta", ["--adadelta-rho", "0.8"], {"rho": 0.8}),
        ("adafactor", ["--decay-rate", "-0.7"], {"decay_rate": -0.7}),
        ("adamax", ["--adamax-eps", "1e-7"], {"eps": 1e-7}),
    ],
)
def test_cli_flags_of_the_base_optimizer_are_unchanged(name, flags, expect):
    """``--optimizer X <X's flags>`` becomes ``--optimizer nap_X <X's flags>``."""
    base_args, base_cfg = parse(["--optimizer", name, "--lr", "0.01"] + flags)
    args, cfg = parse(["--optimizer", "nap_" + name, "--lr", "0.01", "--nap-every", "2"] + flags)
    assert cfg.optimizer._name == "nap_" + name
    assert cfg.optimizer.nap_every == 2
    model = tiny_model(args)
    params = list(model.parameters())
    with param_names_context(model):
        nap = optim.build_optimizer(cfg.optimizer, params)
    plain = optim.build_optimizer(base_cfg.optimizer, params)
    assert type(nap.base) is type(plain)
    assert nap.optimizer_config == plain.optimizer_config
    for k, v in expect.items():
        got = nap.optimizer_config[k]
        assert (tuple(got) if isinstance(v, tuple) else got) == pytest.approx(v)


def test_hydra_config():
    from hydra import compose, initialize_config_dir
    from fairseq.dataclass.initialize import add_defaults, hydra_init

    hydra_init("config")
    cfg_dir = os.path.join(os.path.dirname(fairseq.__file__), "config")
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.1"):
        cfg = compose(
            "config",
            overrides=[
                "optimizer=nap_adam",
                "optimizer.adam_betas=[0.9,0.98]",
                "optimizer.nap_norm_params=joint",
                "optimizer.nap_exclude=fc2",
                "optimization.lr=[0.002]",
            ],
        )
        add_defaults(cfg)
    assert cfg.optimizer._name == "nap_adam"
    args, _ = parse(["--optimizer", "adam"])
    model = tiny_model(args)
    with param_names_context(model):
        opt = optim.build_optimizer(cfg.optimizer, list(model.parameters()))
    assert opt.get_lr() == 0.002
    assert tuple(opt.optimizer_config["betas"]) == (0.9, 0.98)
    names = opt.nap_group_names
    assert not any("fc2" in n for n in names)
    assert "encoder.layers.0.final_layer_norm.{weight+bias}" in names


def test_default_selection_on_a_fairseq_transformer():
    args, cfg = parse(["--optimizer", "nap_adam"])
    model = tiny_model(args)
    with param_names_context(model):
        opt = optim.build_optimizer(cfg.optimizer, list(model.parameters()))
    names = opt.nap_group_names
    assert "encoder.layers.0.fc1.weight" in names
    assert "decoder.layers.0.encoder_attn.out_proj.weight" in names
    assert not any("embed" in n for n in names)
    assert not any("output_projection" in n for n in names)
    assert not any(n.endswith(".bias") or "layer_norm" in n for n in names)
    assert opt._mode == "identity"


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--nap-include", "no_such_param"], "matches no parameter name"),
        (["--nap-exclude", "(unclosed"], "invalid regular expression"),
        (["--nap-every", "0"], "--nap-every must be a positive integer"),
        (["--nap-exclude", "."], "no parameter to project"),
    ],
)
def test_bad_nap_flags_are_clear_errors(flags, msg):
    args, cfg = parse(["--optimizer", "nap_adam"] + flags)
    model = tiny_model(args)
    with pytest.raises(ValueError, match=msg), param_names_context(model):
        optim.build_optimizer(cfg.optimizer, list(model.parameters()))


def test_monitor_only_trains_exactly_like_the_base_optimizer():
    args, cfg = parse(["--optimizer", "nap_adam", "--nap-monitor-only", "--lr", "0.01"])
    _, base_cfg = parse(["--optimizer", "adam", "--lr", "0.01"])
    m1, m2 = tiny_model(args), tiny_model(args)
    with param_names_context(m1):
        o1 = optim.build_optimizer(cfg.optimizer, list(m1.parameters()))
    o2 = optim.build_optimizer(base_cfg.optimizer, list(m2.parameters()))
    for step in range(5):
        for o, m in ((o1, m1), (o2, m2)):
            o.zero_grad()
            fake_backward(o, list(m.parameters()), step)
            o.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert o1.nap_norm_ratios().max() > 1.0 + 1e-4  # measured, not projected


# ------------------------------------------------------- precision wrappers
def _build(kind, extra, monkeypatch):
    """The optimizer fairseq's trainer would build for ``kind``, on CPU."""
    flags = {
        "fp32": [],
        "fp16": ["--fp16"],
        "fp16-no-flatten": ["--fp16", "--fp16-no-flatten-grads"],
        "bf16": ["--bf16"],
        "memory-efficient-fp16": ["--memory-efficient-fp16"],
        "amp": ["--amp"],
    }[kind]
    args, cfg = parse(["--optimizer", "nap_adam", "--lr", "0.01", "--use-old-adam"] + flags + extra)
    model = tiny_model(args)
    if kind in ("fp16", "fp16-no-flatten", "memory-efficient-fp16"):
        model = model.half()
    elif kind == "bf16":
        model = model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    # FP16Optimizer keys its flat master buffer by CUDA device index; on CPU that is None
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    with param_names_context(model):
        if kind == "fp32":
            opt = optim.build_optimizer(cfg.optimizer, params)
        elif kind == "memory-efficient-fp16":
            opt = optim.MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
        elif kind == "amp":
            opt = optim.AMPOptimizer.build_optimizer(cfg, params)
        else:
            opt = optim.FP16Optimizer.build_optimizer(cfg, params)
    nap = getattr(opt, "fp32_optimizer", None) or getattr(opt, "wrapped_optimizer", None) or opt
    assert isinstance(nap, NaPOptimizer)
    return model, params, opt, nap


@pytest.mark.parametrize(
    "kind, mode, model_tol",
    [
        ("fp32", "identity", 1e-6),
        ("fp16", "flat", 2e-3),
        ("fp16-no-flatten", "position", 2e-3),
        ("bf16", "position", 1e-2),
        ("memory-efficient-fp16", "identity", 2e-3),
        ("amp", "identity", 1e-6),
    ],
)
def test_projection_under_every_precision_mode(kind, mode, model_tol, monkeypatch):
    import warnings

    warnings.filterwarnings("ignore", message=".*GradScaler.*")
    model, params, opt, nap = _build(kind, [], monkeypatch)
    assert nap._mode == mode
    named = dict(model.named_parameters())
    targets0 = nap.projector.targets.clone()
    w0 = group_norms(nap.projector, named)
    fc1_before = model.encoder.layers[0].fc1.weight.float().clone()
    assert torch.allclose(targets0, w0, rtol=1e-6)
    for step in range(4):
        opt.zero_grad()
        fake_backward(opt, params, step)
        opt.clip_grad_norm(0.0)
        opt.step()
    # the tensors NaP projects (fp32 master copy under --fp16/--bf16) hold their targets;
    # --memory-efficient-fp16 keeps no fp32 copy: fp16 weights hold them to fp16 precision
    tol = 2e-3 if kind == "memory-efficient-fp16" else 1e-5
    assert (nap.nap_norm_ratios() - 1).abs().max().item() < tol
    assert torch.equal(nap.projector.targets, targets0)
    # ... and the weights the next forward pass uses follow, to their precision
    wn = group_norms(nap.projector, named)
    assert ((wn / targets0) - 1).abs().max().item() < model_tol
    # the model did move: NaP did not just freeze it, nor skip the inner step
    moved = (model.encoder.layers[0].fc1.weight.float() - fc1_before).abs().max().item()
    assert moved > 1e-3


@pytest.mark.parametrize("kind", ["fp32", "fp16", "fp16-no-flatten", "memory-efficient-fp16",
                                  "amp"])
def test_state_dict_saves_and_restores_targets(kind, monkeypatch):
    # (AMPOptimizer saves and loads the torch optimizer's state dict directly, past NaP's)
    import warnings

    warnings.filterwarnings("ignore", message=".*GradScaler.*")
    model, params, opt, nap = _build(kind, ["--nap-every", "2"], monkeypatch)
    for step in range(3):
        opt.zero_grad()
        fake_backward(opt, params, step)
        opt.clip_grad_norm(0.0)
        opt.step()
    sd = opt.state_dict()
    assert "nap" in sd and sd["nap"]["num_steps"] == 3
    saved_targets = sd["nap"]["projector"]["targets"].clone()
    # a "resumed" optimizer, built from the (now changed) weights, gets the saved targets
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with param_names_context(model):
        if kind == "fp32":
            opt2 = optim.build_optimizer(opt.cfg, params)
        elif kind == "memory-efficient-fp16":
            _, cfg = parse(["--optimizer", "nap_adam", "--lr", "0.01", "--use-old-adam", "--memory-efficient-fp16", "--nap-every", "2"])
            opt2 = optim.MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
        elif kind == "amp":
            _, cfg = parse(["--optimizer", "nap_adam", "--lr", "0.01", "--use-old-adam", "--amp", "--nap-every", "2"])
            opt2 = optim.AMPOptimizer.build_optimizer(cfg, params)
        else:
            extra = ["--fp16"] + (["--fp16-no-flatten-grads"] if kind == "fp16-no-flatten" else [])
            _, cfg = parse(["--optimizer", "nap_adam", "--lr", "0.01", "--use-old-adam", "--nap-every", "2"] + extra)
            opt2 = optim.FP16Optimizer.build_optimizer(cfg, params)
    nap2 = getattr(opt2, "fp32_optimizer", None) or getattr(opt2, "wrapped_optimizer", None) or opt2
    assert not torch.equal(nap2.projector.targets, saved_targets)
    opt2.load_state_dict(sd)
    assert torch.equal(nap2.projector.targets.cpu(), saved_targets)
    assert nap2._num_steps == 3
    assert "nap" in sd  # the caller's dict is left intact


# ------------------------------------------------------ fairseq-train runs
def _write_corpus(d, n_train=1000, n_valid=20, seed=0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(30)]
    for split, n in (("train", n_train), ("valid", n_valid)):
        with open(os.path.join(d, f"{split}.src"), "w") as fs, open(os.path.join(d, f"{split}.tgt"), "w") as ft:
            for _ in range(n):
                s = [rng.choice(vocab) for _ in range(rng.randint(3, 8))]
                fs.write(" ".join(s) + "\n")
                ft.write(" ".join(reversed(s)) + "\n")


def _run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fairseq_cli." + args[0]] + args[1:]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    d = tmp_path_factory.mktemp("nap_data")
    _write_corpus(str(d))
    _run(
        ["preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", "train",
         "--validpref", "valid", "--destdir", "bin", "--joined-dictionary", "--workers", "1"],
        str(d),
    )  # fmt: skip
    return str(d / "bin")


def train_cmd(data, save_dir, optimizer, max_update, extra=()):
    return [
        "train", data, "--user-dir", USER_DIR, *TINY,
        "--optimizer", optimizer, "--adam-betas", "(0.9, 0.98)", "--lr", "0.005",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20",
        "--criterion", "cross_entropy", "--max-tokens", "400", "--max-update", str(max_update),
        "--dropout", "0.1", "--seed", "3", "--cpu", "--num-workers", "0",
        "--log-format", "json", "--log-interval", "10", "--save-dir", save_dir,
        "--no-epoch-checkpoints", "--save-interval", "1000", "--disable-validation", *extra,
    ]  # fmt: skip


def json_logs(text, tag="train_inner"):
    out = []
    for line in text.splitlines():
        if f"| {tag} |" in line:
            out.append(json.loads(line.split(f"| {tag} | ", 1)[1]))
    return out


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def nap_vs_adam(data_bin, tmp_path_factory):
    """300 updates of nap_adam, and the same run measured only (adam)."""
    d = tmp_path_factory.mktemp("nap_runs")
    logs = {}
    for name, opt, extra in (("nap", "nap_adam", []), ("adam", "nap_adam", ["--nap-monitor-only"])):
        save = str(d / name)
        out = _run(train_cmd(data_bin, save, opt, 300, extra), str(d))
        logs[name] = out
        with open(str(d / f"{name}.log"), "w") as f:
            f.write(out)
        keep = os.environ.get("NAP_KEEP_LOGS")  # e.g. NAP_KEEP_LOGS=docs to refresh the docs plot
        if keep:
            os.makedirs(keep, exist_ok=True)
            with open(os.path.join(keep, f"nap_demo_{name}.log"), "w") as f:
                f.write("\n".join(l for l in out.splitlines() if "| train_inner |" in l) + "\n")
    return d, logs


def _norms_vs_targets(ckpt):
    state = ckpt["last_optimizer_state"]["nap"]["projector"]
    model = ckpt["model"]
    names, targets = state["names"], state["targets"]

    def norm(name):  # "mod.{weight+bias}" is a joint group
        if name.endswith("}"):
            mod, leaves = name[:-1].split("{")
            return torch.sqrt(sum(model[mod + leaf].float().norm() ** 2 for leaf in leaves.split("+")))
        return model[name].float().norm()

    norms = torch.stack([norm(n) for n in names])
    return names, norms, targets


@pytest.mark.slow
def test_fairseq_train_nap_keeps_norms_adam_lets_them_grow(nap_vs_adam):
    d, logs = nap_vs_adam
    nap = load_ckpt(str(d / "nap" / "checkpoint_last.pt"))
    adam = load_ckpt(str(d / "adam" / "checkpoint_last.pt"))
    assert nap["optimizer_history"][-1]["num_updates"] == 300
    n_names, n_norms, n_targets = _norms_vs_targets(nap)
    a_names, a_norms, a_targets = _norms_vs_targets(adam)
    # same seed, same initialisation: the recorded targets are the initial norms of both runs
    assert n_names == a_names and torch.equal(n_targets, a_targets)
    assert len(n_names) >= 8
    rel = (n_norms / n_targets - 1).abs().max().item()
    assert rel < 1e-5, rel
    growth = (a_norms / a_targets).max().item()
    assert growth > 1.05, growth
    # the logged effective learning rate: tracks the schedule with NaP, decays without it
    ln, la = json_logs(logs["nap"]), json_logs(logs["adam"])
    assert len(ln) >= 25 and all("nap_elr_mean" in r for r in ln)
    rn = [r["nap_elr_mean"] / float(r["lr"]) for r in ln if int(r["num_updates"]) > 20]
    ra = [r["nap_elr_mean"] / float(r["lr"]) for r in la if int(r["num_updates"]) > 20]
    assert max(rn) / min(rn) - 1 < 1e-3  # lr is logged with 6 significant digits
    assert ra[-1] < 0.95 * ra[0]
    assert max(r["nap_ratio_max"] for r in ln) < 1.05  # one update moves norms only a little


@pytest.mark.slow
def test_plot_command_makes_a_png(nap_vs_adam, tmp_path):
    d, _ = nap_vs_adam
    out = str(tmp_path / "nap.png")
    r = subprocess.run(
        [sys.executable, "-m", "powernorm_plugin.cli.plot_nap", str(d / "nap.log"), str(d / "adam.log"),
         "--label", "nap_adam", "--label", "adam", "-o", out],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"


def test_plot_names_a_missing_log_or_output_folder_in_one_line(tmp_path, capsys):
    from powernorm_plugin.cli.plot_nap import main

    log = tmp_path / "train.log"
    log.write_text("")
    for log_path, output, message in (
            (tmp_path / "nope.log", tmp_path / "x.png", "nope.log: no such log file"),
            (log, tmp_path / "nodir" / "x.png", "nodir does not exist")):
        with pytest.raises(SystemExit) as exit_:
            main([str(log_path), "-o", str(output)])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_plot_reads_logs_whose_intervals_had_no_projection(tmp_path):
    # with --nap-every N > 1 an interval without a projection logs the NaP values as null
    from powernorm_plugin.cli.plot_nap import read_log

    log = tmp_path / "train.log"
    row = '{"num_updates": "%d", "lr": "0.001", "nap_elr_mean": %s, "nap_ratio_mean": %s}'
    log.write_text("\n".join(f"2026-11-28 | INFO | train_inner | {row % args}" for args in [
        (5, "null", "null"), (10, '"2.5"', '"1.0"')]) + "\n")
    assert read_log(str(log)) == [
        {"num_updates": 10.0, "lr": 0.001, "nap_elr_mean": 2.5, "nap_ratio_mean": 1.0}]


@pytest.mark.parametrize("lo, hi", [(1 - 3e-7, 1 + 2e-7), (0.9999, 1.00001), (0, 400),
                                     (2e-4, 9e-4), (1.0, 1.0)])
def test_plot_axis_labels_tell_the_ticks_apart(lo, hi):
    # under NaP the norm ratio stays within 1e-6 of 1: six digits would label every tick "1"
    from powernorm_plugin.cli.plot_nap import _nice_ticks, _tick_labels

    ticks = _nice_ticks(lo, hi)
    labels = _tick_labels(ticks)
    assert len(ticks) >= 2 and len(set(labels)) == len(labels)
    assert [float(label.replace("E", "e")) for label in labels] == pytest.approx(ticks, rel=1e-12)


@pytest.mark.slow
def test_fairseq_train_resume_restores_nap_state(data_bin, tmp_path):
    """2N updates in one run vs N updates, a checkpoint, and N more (with NaP).

    NaP's own state (target norms, step counter) and the model must continue exactly. With
    ``--nap-every 5`` and N = 36 the checkpointed weights are *not* at their target
    norms, so targets re-recorded from the loaded weights (instead of restored), or weights
    projected again as they load, would show. The attention output biases, included here,
    start at zero: both runs must leave them unprojected.
    """
    n = 36  # two epochs of 18 updates
    extra = ["--nap-norm-params", "joint", "--nap-every", "5", "--dropout", "0",
             "--nap-include", r"out_proj\.bias"]
    _run(train_cmd(data_bin, str(tmp_path / "one"), "nap_adam", 2 * n, extra), str(tmp_path))
    _run(train_cmd(data_bin, str(tmp_path / "two"), "nap_adam", n, extra), str(tmp_path))
    mid = load_ckpt(str(tmp_path / "two" / "checkpoint_last.pt"))
    out = _run(train_cmd(data_bin, str(tmp_path / "two"), "nap_adam", 2 * n, extra), str(tmp_path))
    assert "no NaP targets" not in out
    one = load_ckpt(str(tmp_path / "one" / "checkpoint_last.pt"))
    two = load_ckpt(str(tmp_path / "two" / "checkpoint_last.pt"))
    assert one["optimizer_history"][-1]["num_updates"] == 2 * n
    assert two["optimizer_history"][-1]["num_updates"] == 2 * n
    s1, s2, sm = (c["last_optimizer_state"]["nap"] for c in (one, two, mid))
    assert sm["num_steps"] == n and s1["num_steps"] == s2["num_steps"] == 2 * n
    assert s1["projector"]["names"] == s2["projector"]["names"]
    assert s1["projector"]["skipped"] == s2["projector"]["skipped"]
    assert s2["projector"]["skipped"] and all("out_proj.bias" in n for n in s2["projector"]["skipped"])
    assert torch.equal(s1["projector"]["targets"], s2["projector"]["targets"])
    assert torch.equal(sm["projector"]["targets"], s2["projector"]["targets"])
    assert one["model"].keys() == two["model"].keys()
    for name, value in one["model"].items():
        assert torch.equal(value, two["model"][name]), name
    # at the checkpoint (36 = 7*5 + 1 updates) the weights had left their targets
    _, mid_norms, mid_targets = _norms_vs_targets(mid)
    assert (mid_norms / mid_targets - 1).abs().max().item() > 1e-6
    # after 72 = 14*5 + 2 updates too; at the last projection they were exact: check the
    # logged pre-projection drift stays small in both runs
    for ck in (one, two):
        _, norms, targets = _norms_vs_targets(ck)
        assert (norms / targets - 1).abs().max().item() < 0.05
