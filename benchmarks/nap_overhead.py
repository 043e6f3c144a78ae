"""Time per training update with and without NaP, on the same model and batch.

    python benchmarks/nap_overhead.py                       # CPU, small transformer
    python benchmarks/nap_overhead.py --device cuda --fp16  # GPU, transformer-base sized

Both runs build fairseq's ``transformer`` with the same seed and train it on the same
random batch: ``--optimizer adam`` against ``--optimizer nap_adam`` (every update:
one multi-tensor norm and one multi-tensor rescale of every projected weight, plus
logging through fairseq's metrics). Timing alternates blocks of updates between the
two optimizers and reports the median block, so drift in machine load cancels. It
also times the projection alone (``NormProjector.project_``).
"""
import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch


def build(args, optimizer, extra):
    from fairseq import optim, options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models.transformer import TransformerModel

    from powernorm_plugin.optim import param_names_context

    d = args.embed_dim
    cli = [
        "/nonexistent", "--arch", "transformer", "--optimizer", optimizer, "--lr", "1e-4",
        "--adam-betas", "(0.9, 0.98)",
        "--encoder-layers", str(args.layers), "--decoder-layers", str(args.layers),
        "--encoder-embed-dim", str(d), "--decoder-embed-dim", str(d),
        "--encoder-ffn-embed-dim", str(4 * d), "--decoder-ffn-embed-dim", str(4 * d),
        "--encoder-attention-heads", str(max(1, d // 64)), "--decoder-attention-heads", str(max(1, d // 64)),
        "--dropout", "0.1", *extra,
    ]  # fmt: skip
    if args.fp16:
        cli.append("--fp16")
    if args.device == "cpu":
        cli.append("--cpu")
    ns = options.parse_args_and_arch(options.get_training_parser(), cli)
    cfg = convert_namespace_to_omegaconf(ns)
    torch.manual_seed(0)
    dic = Dictionary()
    for i in range(args.vocab):
        dic.add_symbol(f"w{i}")
    model = TransformerModel.build_model(ns, SimpleNamespace(source_dictionary=dic, target_dictionary=dic))
    if args.fp16:
        model = model.half()
    model = model.to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    with param_names_context(model):
        if args.fp16:
            opt = optim.FP16Optimizer.build_optimizer(cfg, params)
        else:
            opt = optim.build_optimizer(cfg.optimizer, params)
    return model, opt, len(dic)


def make_batch(args, vocab):
    g = torch.Generator().manual_seed(1)
    bsz = max(1, args.tokens // args.seq_len)
    src = torch.randint(4, vocab, (bsz, args.seq_len), generator=g)
    tgt = torch.randint(4, vocab, (bsz, args.seq_len), generator=g)
    lengths = torch.full((bsz,), args.seq_len, dtype=torch.long)
    return [t.to(args.device) for t in (src, lengths, tgt)]


def update(model, opt, batch):
    src, lengths, tgt = batch
    opt.zero_grad()
    out, _ = model(src, lengths, tgt)
    loss = torch.nn.functional.cross_entropy(out.float().view(-1, out.size(-1)), tgt.view(-1))
    opt.backward(loss)
    opt.clip_grad_norm(0.0)
    opt.step()


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--embed-dim", type=int, default=None, help="default 512 on GPU, 128 on CPU")
    p.add_argument("--layers", type=int, default=None, help="default 6 on GPU, 2 on CPU")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 8192 GPU, 1024 CPU)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--block", type=int, default=None, help="updates per timed block")
    p.add_argument("--blocks", type=int, default=6, help="timed blocks per optimizer")
    p.add_argument("--nap-args", default="", help="extra NaP flags, e.g. '--nap-every 4'")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.embed_dim = a.embed_dim or (512 if gpu else 128)
    a.layers = a.layers or (6 if gpu else 2)
    a.tokens = a.tokens or (8192 if gpu else 1024)
    a.block = a.block or (20 if gpu else 5)

    import powernorm_plugin  # noqa: F401  (registers nap_*)
    from fairseq.logging import metrics

    runs = {
        "adam": build(a, "adam", []),
        "nap_adam": build(a, "nap_adam", a.nap_args.split()),
    }
    batch = make_batch(a, runs["adam"][2])
    times = {k: [] for k in runs}
    with metrics.aggregate("bench"):
        for k, (m, o, _) in runs.items():  # warm-up
            for _ in range(3):
                update(m, o, batch)
        sync(a)
        for _ in range(a.blocks):
            for k, (m, o, _) in runs.items():
                sync(a)
                t0 = time.perf_counter()
                for _ in range(a.block):
                    update(m, o, batch)
                sync(a)
                times[k].append((time.perf_counter() - t0) / a.block)
    nap = runs["nap_adam"][1]
    nap = getattr(nap, "fp32_optimizer", nap)
    proj = nap.projector
    sync(a)
    t0 = time.perf_counter()
    for _ in range(50):
        proj.project_()
    sync(a)
    t_proj = (time.perf_counter() - t0) / 50
    base, with_nap = statistics.median(times["adam"]), statistics.median(times["nap_adam"])
    res = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "fp16": a.fp16,
        "params": sum(p.numel() for p in runs["adam"][0].parameters()),
        "projected_groups": len(proj),
        "ms_per_update_adam": round(base * 1e3, 3),
        "ms_per_update_nap_adam": round(with_nap * 1e3, 3),
        "overhead_percent": round(100 * (with_nap - base) / base, 2),
        "ms_projection_alone": round(t_proj * 1e3, 3),
        "projection_percent_of_update": round(100 * t_proj / base, 2),
    }
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
