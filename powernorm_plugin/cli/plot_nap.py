"""Plot NaP's logged weight-norm ratio and effective learning rate from fairseq logs.

Usage::

    python -m powernorm_plugin.cli.plot_nap RUN1.log RUN2.log --label nap_adam \\
        --label adam -o docs/nap_norms_elr.png

Each LOG is the output of ``fairseq-train ... --log-format json`` with a NaP optimizer
(``nap_<name>``, or ``nap_<name> --nap-monitor-only`` for an ordinary run): the
``train_inner`` lines are read (or, in a file of bare JSON lines, every line that has
``num_updates``). Top panel: ||W|| / ||W_0|| (mean line, min-max band). Bottom panel:
the effective learning rate lr / ||W||^2 (mean over projected weights, log scale) with
the learning-rate schedule, scaled to meet the first run at its first point, dashed.

No plotting library needed: the PNG is drawn by :mod:`powernorm_plugin.cli._png`.
"""
import argparse
import json
import math
import os
import sys
from typing import Dict, List

from ._paths import check_output
from ._png import Canvas

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]
KEYS = ("num_updates", "lr", "nap_elr_mean", "nap_elr_min", "nap_elr_max",
        "nap_ratio_mean", "nap_ratio_min", "nap_ratio_max")  # fmt: skip


def read_log(path: str, tag: str = "train_inner") -> List[Dict[str, float]]:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            marker = f"| {tag} | "
            if marker in line:
                blob = line.split(marker, 1)[1]
            elif line.startswith("{"):
                blob = line
            else:
                continue
            try:
                rec = json.loads(blob)
            except json.JSONDecodeError:
                continue
            # (with --nap-every N > 1, an interval without a projection logs the NaP values
            # as null)
            if "num_updates" not in rec or rec.get("nap_elr_mean") is None:
                continue
            rows.append({k: float(rec[k]) for k in KEYS if rec.get(k) is not None})
    rows.sort(key=lambda r: r["num_updates"])
    return rows


def _nice_ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-3
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi + 1e-12 * abs(hi):
        out.append(t)
        t += step
    return out


def _fmt(v, digits=6):
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e5:
        return f"{v:.{digits}g}"
    return f"{v:.{max(digits - 6, 0)}e}".replace("e-0", "E-").replace(
        "e+0", "E").replace("e", "E")


def _tick_labels(ticks):
    """Labels for ``ticks`` with as few digits as keep them apart (under NaP the norm ratio
    stays within 1e-6 of 1, where six digits would label every tick "1")."""
    for digits in range(6, 17):
        labels = [_fmt(t, digits) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


class Panel:
    def __init__(self, canvas, x0, y0, x1, y1, xlim, ylim, log=False):
        self.c, self.x0, self.y0, self.x1, self.y1 = canvas, x0, y0, x1, y1
        self.xlim, self.log = xlim, log
        self.ylim = tuple(math.log10(v) for v in ylim) if log else ylim

    def px(self, x, y):
        (a, b), (lo, hi) = self.xlim, self.ylim
        if self.log:
            y = math.log10(max(y, 1e-300))
        X = self.x0 + (x - a) / ((b - a) or 1) * (self.x1 - self.x0)
        Y = self.y1 - (y - lo) / ((hi - lo) or 1) * (self.y1 - self.y0)
        return X, Y

    def frame(self, title, xlabel):
        c = self.c
        grey, light = (0, 0, 0), (225, 225, 225)
        (a, b), (lo, hi) = self.xlim, self.ylim
        xt = _nice_ticks(a, b)
        for t, lab in zip(xt, _tick_labels(xt)):
            X, _ = self.px(t, 10**lo if self.log else lo)
            c.line(X, self.y0, X, self.y1, light, 1)
            c.text(X - c.text_width(lab) / 2, self.y1 + 8, lab)
        if self.log:
            yt = []
            for k in range(math.floor(lo), math.ceil(hi) + 1):
                for m in ((1, 2, 5) if hi - lo < 2.5 else (1,)):
                    v = m * 10.0**k
                    if lo - 1e-9 <= math.log10(v) <= hi + 1e-9:
                        yt.append(v)
        else:
            yt = _nice_ticks(lo, hi)
        for t, lab in zip(yt, _tick_labels(yt)):
            _, Y = self.px(a, t)
            c.line(self.x0, Y, self.x1, Y, light, 1)
            c.text(self.x0 - 8 - c.text_width(lab), Y - 7, lab)
        c.line(self.x0, self.y0, self.x1, self.y0, grey, 2)
        c.line(self.x0, self.y1, self.x1, self.y1, grey, 2)
        c.line(self.x0, self.y0, self.x0, self.y1, grey, 2)
        c.line(self.x1, self.y0, self.x1, self.y1, grey, 2)
        c.text(self.x0, self.y0 - 24, title)
        if xlabel:
            c.text((self.x0 + self.x1) / 2 - c.text_width(xlabel) / 2, self.y1 + 30, xlabel)

    def band(self, xs, lows, highs, color):
        tint = tuple(int(255 - (255 - v) * 0.25) for v in color)
        pts = [(self.px(x, l), self.px(x, h)) for x, l, h in zip(xs, lows, highs)]
        for ((xa, la), (_, ha)), ((xb, lb), (_, hb)) in zip(pts, pts[1:]):
            for X in range(int(xa), int(xb) + 1):
                f = (X - xa) / ((xb - xa) or 1)
                y_lo, y_hi = la + f * (lb - la), ha + f * (hb - ha)
                self.c.rect(X, max(y_hi, self.y0), X, min(y_lo, self.y1), tint)

    def curve(self, xs, ys, color, width=3, dash=None):
        self.c.polyline([self.px(x, y) for x, y in zip(xs, ys)], color, width, dash)


def plot(runs, labels, out, width=1000, height=860):
    c = Canvas(width, height)
    xs_all = [r["num_updates"] for run in runs for r in run]
    xlim = (0.0, max(xs_all))
    left, right = 130, width - 30
    # top: norm ratio
    rlo = min(r.get("nap_ratio_min", r["nap_ratio_mean"]) for run in runs for r in run)
    rhi = max(r.get("nap_ratio_max", r["nap_ratio_mean"]) for run in runs for r in run)
    pad = (rhi - rlo) * 0.05 or 0.01
    top = Panel(c, left, 60, right, 360, xlim, (min(rlo, 1.0) - pad, max(rhi, 1.0) + pad))
    top.frame("WEIGHT NORM RATIO ||W|| / ||W0||  (MEAN, MIN-MAX BAND)", None)
    # bottom: effective learning rate
    elr = [r["nap_elr_mean"] for run in runs for r in run]
    first = runs[0][0]
    scale = first["nap_elr_mean"] / first["lr"] if first.get("lr") else None
    sched = [(r["num_updates"], r["lr"] * scale) for r in runs[0] if scale and r.get("lr")]
    ys = elr + [v for _, v in sched]
    elo, ehi = min(ys), max(ys)
    bot = Panel(c, left, 500, right, height - 80, xlim, (elo / 1.3, ehi * 1.3), log=True)
    bot.frame("EFFECTIVE LR  LR / ||W||^2  (MEAN, LOG SCALE)", "UPDATES")
    for i, (run, label) in enumerate(zip(runs, labels)):
        col = COLORS[i % len(COLORS)]
        xs = [r["num_updates"] for r in run]
        if all("nap_ratio_min" in r and "nap_ratio_max" in r for r in run):
            top.band(xs, [r["nap_ratio_min"] for r in run], [r["nap_ratio_max"] for r in run], col)
    for i, (run, label) in enumerate(zip(runs, labels)):
        col = COLORS[i % len(COLORS)]
        xs = [r["num_updates"] for r in run]
        top.curve(xs, [r["nap_ratio_mean"] for r in run], col)
        bot.curve(xs, [r["nap_elr_mean"] for r in run], col)
    if sched:
        bot.curve([x for x, _ in sched], [y for _, y in sched], (0, 0, 0), 2, dash=5)
    # legend
    lx, ly = left, 400
    entries = [(COLORS[i % len(COLORS)], lab, None) for i, lab in enumerate(labels)]
    if sched:
        entries.append(((0, 0, 0), "LR SCHEDULE (SCALED)", 5))
    for col, lab, dash in entries:
        need = 50 + c.text_width(lab) + 30
        if lx + need > right and lx > left:
            lx, ly = left, ly + 24
        c.line(lx, ly + 7, lx + 40, ly + 7, col, 3, dash)
        lx += 50 + c.text(lx + 50, ly, lab) + 30
    c.save(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m powernorm_plugin.cli.plot_nap", description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="fairseq-train logs (--log-format json)")
    p.add_argument("--label", action="append", default=None, help="one per log (default: file name)")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--tag", default="train_inner", help="which log lines to read (default train_inner)")
    a = p.parse_args(argv)
    labels = a.label or [os.path.splitext(os.path.basename(x))[0] for x in a.logs]
    if len(labels) != len(a.logs):
        p.error("give one --label per log")
    check_output(p, a.output, a.logs)
    runs = []
    for path in a.logs:
        if not os.path.isfile(path):
            p.error(f"{path}: no such log file")
        rows = read_log(path, a.tag)
        if not rows:
            p.error(f"{path}: no '{a.tag}' JSON log line with nap_elr_mean (run with --log-format json and a nap_* optimizer)")
        runs.append(rows)
    plot(runs, labels, a.output)
    print(a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
