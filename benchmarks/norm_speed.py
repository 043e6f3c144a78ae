"""Forward+backward time and peak memory of PowerNorm vs torch.nn.LayerNorm and MaskedBatchNorm.

Training mode, (T, B, C) inputs with ~10% padding (as in fairseq batches; ``--padding``),
measured side by side in one process: the layers are timed in interleaved rounds and the
median per layer is kept, so the ratios are robust to machine noise. Each layer's median and fastest round are shown.

On the CPU, glibc's malloc returns freed heap memory to the kernel once enough of it is free
at the top of the heap, and the next large tensor then page-faults its memory back in. Which
layer pays for that depends on the sequence of allocations in the process, not on the layer
(on the development machine it added up to ~1,900 page faults, about 2 ms, to a LayerNorm
step in one run and to a PowerNorm step in another). By default the benchmark therefore
keeps freed memory mapped (``--malloc steady``, glibc's M_TRIM_THRESHOLD and
M_MMAP_THRESHOLD, as a caching allocator would), and the page faults per step are reported
beside each time; ``--malloc default`` leaves glibc as it is. Run:

    python benchmarks/norm_speed.py                 # CPU, and CUDA when available
    python benchmarks/norm_speed.py --device cpu --shapes 64x64x512 32x128x1024
    python benchmarks/norm_speed.py --device cuda --backends native compiled eager --launches

On a GPU at these shapes a layer's time is mostly the host's: launching kernels and running
the Python around them. ``--launches`` adds, per layer, the CUDA kernels one step launches,
their summed GPU time, the host-device synchronizations torch detects in one step, and the
host's time to queue a step against the wall time of a step.
"""
import argparse
import ctypes
import ctypes.util
import logging
import os
import resource
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
        for mode in ("paper", "official", "vanilla"):
            yield f"PowerNorm[{mode}] {backend}", PowerNorm(C, mode=mode, backend=backend), True
        yield (f"PowerNorm[paper,group_num={heads}] {backend}",
               PowerNorm(C, group_num=heads, backend=backend), True)


def keep_freed_memory_mapped():
    """Make glibc keep freed heap memory, and serve tensors up to 32 MiB from the heap."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)):
        sys.exit("--malloc steady: mallopt failed (not glibc?); use --malloc default")


def page_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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


def launch_profile(step, steps=50):
    """(kernels per step, their GPU ms, synchronizations per step, host ms, wall ms per step)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    torch.cuda.set_sync_debug_mode("warn")  # warns on each synchronizing call it can see
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return (len(kernels), sum(e.device_time for e in kernels) / 1e3, syncs,
            host / steps * 1e3, wall / steps * 1e3)


def bench(shape, device, dtype, rounds, iters, heads, backends, timer=time.perf_counter,
          launch=False, padding=0.1):
    T, B, C = shape
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(T, B, C, generator=gen) + 0.3).to(device, dtype).requires_grad_(True)
    dy = torch.randn(T, B, C, generator=gen).to(device, dtype)
    pad = padding_mask(T, B, device, padding)
    steps = {}
    for name, layer, takes_mask in layers(C, heads, backends, device):
        steps[name] = step_fn(layer.to(device, dtype).train(), x, dy, pad, takes_mask)
    times = {name: [] for name in steps}
    faults = {name: 0 for name in steps}
    for step in steps.values():  # warm-up, and the compiled kernels' one-off compilation
        for _ in range(3):
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            f0, t0 = page_faults(), timer()
            for _ in range(iters):
                step()
            sync(device)
            times[name].append((timer() - t0) / iters * 1e3)
            faults[name] += page_faults() - f0
    mem = {name: (peak_memory_mb(s, device) if device.type == "cuda" else cpu_peak_memory_mb(s))
           for name, s in steps.items()}
    launches = {name: launch_profile(s) for name, s in steps.items()} if launch else None
    return times, {name: f / (rounds * iters) for name, f in faults.items()}, mem, launches


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--shapes", nargs="+", default=["64x64x512", "32x128x1024"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--heads", type=int, default=8, help="group_num for the group-scaled variant")
    p.add_argument("--backends", nargs="+", default=["native", "compiled", "eager"],
                   choices=["native", "compiled", "eager"],
                   help="PowerNorm backends to measure")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (CPU device only), which other load on "
                   "a shared machine disturbs less; use it with --threads 1")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--padding", type=float, default=0.1,
                   help="mean fraction of padding positions (0: none, 0.5 at most)")
    p.add_argument("--launches", action="store_true",
                   help="CUDA: also report kernels, synchronizations and host time per step")
    p.add_argument("--malloc", choices=["steady", "default"], default="steady",
                   help="steady: glibc keeps freed memory mapped, so no layer's time includes "
                   "page faults caused by the allocations before it (see the module docstring)")
    args = p.parse_args()
    if not 0.0 <= args.padding <= 0.5:
        p.error(f"--padding must lie in [0, 0.5], got {args.padding}")
    logging.getLogger("filelock").setLevel(logging.WARNING)  # torch.compile's lock chatter
    if args.malloc == "steady":
        keep_freed_memory_mapped()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    timer = time.process_time if args.timer == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, dtype {args.dtype}, "
          f"{args.timer} time, malloc {args.malloc}, load average {os.getloadavg()[0]:.1f}")
    for dev in devices:
        device = torch.device(dev)
        name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
        if dev == "cuda" and args.timer == "cpu":
            sys.exit("--timer cpu measures the CPU only")
        if dev != "cuda" and args.launches:
            sys.exit("--launches profiles CUDA kernels; use it with --device cuda")
        for s in args.shapes:
            shape = tuple(int(v) for v in s.split("x"))
            times, faults, mem, launches = bench(shape, device, getattr(torch, args.dtype),
                                                 args.rounds, args.iters, args.heads,
                                                 args.backends, timer, args.launches,
                                                 args.padding)
            med = {layer: statistics.median(v) for layer, v in times.items()}
            best = {layer: min(v) for layer, v in times.items()}
            print(f"\n{name}  (T, B, C) = {shape}, fwd+bwd, training mode, "
                  f"~{args.padding:.0%} padding")
            print("| layer | median ms | x LayerNorm | fastest ms | x LayerNorm "
                  "| page faults / step | peak MB |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for layer in times:
                print(f"| {layer} | {med[layer]:.2f} | {med[layer] / med['LayerNorm']:.2f} | "
                      f"{best[layer]:.2f} | {best[layer] / best['LayerNorm']:.2f} | "
                      f"{faults[layer]:.0f} | {mem[layer]:.1f} |")
            if launches:
                print("\n| layer | CUDA kernels / step | their GPU ms | syncs / step "
                      "| host ms to queue a step | wall ms / step |")
                print("|---|---:|---:|---:|---:|---:|")
                for layer, (n, gpu, syncs, host, wall) in launches.items():
                    print(f"| {layer} | {n} | {gpu:.3f} | {syncs} | {host:.3f} | {wall:.3f} |")


if __name__ == "__main__":
    main()
