"""Forward+backward time and peak memory of PowerNorm vs torch.nn.LayerNorm and MaskedBatchNorm.

Training mode, (T, B, C) inputs with ~10% padding (as in fairseq batches), measured side by side
in one process: the layers are timed in interleaved rounds and the median per layer is kept,
so the ratios are robust to machine noise. Run:

    python benchmarks/norm_speed.py                 # CPU, and CUDA when available
    python benchmarks/norm_speed.py --device cpu --shapes 64x64x512 32x128x1024
"""
import argparse
import os
import statistics
import sys
import time

import torch

from powernorm_plugin.modules import MaskedBatchNorm, PowerNorm


def padding_mask(T, B, device, frac=0.1):
    gen = torch.Generator().manual_seed(0)
    lengths = T - (torch.rand(B, generator=gen) * 2 * frac * T).long()
    lengths[0] = T
    return (torch.arange(T)[None, :] >= lengths[:, None]).to(device)


def layers(C, heads, backends, device):
    yield "LayerNorm", torch.nn.LayerNorm(C), False
    yield "MaskedBatchNorm", MaskedBatchNorm(C), True
    for backend in backends:
        if backend == "native" and device.type != "cpu":
            continue  # the hand-written kernels are CPU-only
        for mode in ("paper", "official", "vanilla"):
            yield f"PowerNorm[{mode}] {backend}", PowerNorm(C, mode=mode, backend=backend), True
        yield (f"PowerNorm[paper,group_num={heads}] {backend}",
               PowerNorm(C, group_num=heads, backend=backend), True)


def step_fn(layer, x, dy, pad, takes_mask):
    def step():
        x.grad = None
        y = layer(x, pad) if takes_mask else layer(x)
        y.backward(dy)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(step, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_peak_memory_mb(step):
    """Bytes allocated by autograd-saved tensors and outputs, tracked with the CPU profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def bench(shape, device, dtype, rounds, iters, heads, backends, timer=time.perf_counter):
    T, B, C = shape
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(T, B, C, generator=gen) + 0.3).to(device, dtype).requires_grad_(True)
    dy = torch.randn(T, B, C, generator=gen).to(device, dtype)
    pad = padding_mask(T, B, device)
    steps = {}
    for name, layer, takes_mask in layers(C, heads, backends, device):
        steps[name] = step_fn(layer.to(device, dtype).train(), x, dy, pad, takes_mask)
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up, and the compiled kernels' one-off compilation
        for _ in range(3):
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            t0 = timer()
            for _ in range(iters):
                step()
            sync(device)
            times[name].append((timer() - t0) / iters * 1e3)
    med = {name: statistics.median(v) for name, v in times.items()}
    mem = {name: (peak_memory_mb(s, device) if device.type == "cuda" else cpu_peak_memory_mb(s))
           for name, s in steps.items()}
    return med, mem


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--shapes", nargs="+", default=["64x64x512", "32x128x1024"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--heads", type=int, default=8, help="group_num for the group-scaled variant")
    p.add_argument("--backends", nargs="+", default=["native", "compiled", "eager"],
                   choices=["native", "compiled", "eager"],
                   help="PowerNorm backends to measure (native: CPU only)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (CPU device only), which other load on "
                   "a shared machine disturbs less; use it with --threads 1")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    timer = time.process_time if args.timer == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, dtype {args.dtype}, "
          f"{args.timer} time, load average {os.getloadavg()[0]:.1f}")
    for dev in devices:
        device = torch.device(dev)
        name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
        if dev == "cuda" and args.timer == "cpu":
            sys.exit("--timer cpu measures the CPU only")
        for s in args.shapes:
            shape = tuple(int(v) for v in s.split("x"))
            med, mem = bench(shape, device, getattr(torch, args.dtype), args.rounds, args.iters, args.heads,
                             args.backends, timer)
            ln = med["LayerNorm"]
            print(f"\n{name}  (T, B, C) = {shape}, fwd+bwd, training mode, ~10% padding")
            print(f"| layer | ms / iter | x LayerNorm | peak MB |")
            print(f"|---|---:|---:|---:|")
            for layer, t in med.items():
                print(f"| {layer} | {t:.2f} | {t / ln:.2f} | {mem[layer]:.1f} |")


if __name__ == "__main__":
    main()
