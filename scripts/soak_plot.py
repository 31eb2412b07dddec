#!/usr/bin/env python3
"""Plot a soak run's samples.csv (written by scripts/soak.sh) to a PNG.

    python scripts/soak_plot.py soak-out/<run>/samples.csv soak-out/<run>/soak.png

Three panels over elapsed minutes: worker RSS (one line per worker) with
tansu's RSS dotted; Redis used_memory with the key count on a second axis;
input and consumption rates (spans/s per interval) with the input lag (spans
produced but not yet consumed) on a second axis. The drain phase (producing
stopped) is shaded. Needs matplotlib (soak.sh installs it into .tools/soak-venv).
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(rows, name, scale=1.0):
    xs, ys = [], []
    for r in rows:
        if r.get(name) not in (None, ""):
            xs.append(float(r["elapsed_s"]) / 60)
            ys.append(float(r[name]) / scale)
    return xs, ys


def rate(rows, name):
    xs, ys = [], []
    for a, b in zip(rows, rows[1:]):
        dt = float(b["elapsed_s"]) - float(a["elapsed_s"])
        if dt > 0 and a[name] != "" and b[name] != "":
            xs.append(float(b["elapsed_s"]) / 60)
            ys.append((float(b[name]) - float(a[name])) / dt)
    return xs, ys


def main(src, dst):
    with open(src) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"soak_plot: no samples in {src}")
    workers = [k for k in rows[0] if k.startswith("worker") and k.endswith("_rss_kb")]
    drain = [float(r["elapsed_s"]) / 60 for r in rows if r["phase"] == "drain"]
    end = float(rows[-1]["elapsed_s"]) / 60

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    for ax in (ax1, ax2, ax3):
        if drain:
            ax.axvspan(drain[0], end, color="0.92", label="_drain")
        ax.grid(alpha=0.3)

    for k in workers:
        ax1.plot(*series(rows, k, 1024), label=k.replace("_rss_kb", " RSS"))
    ax1.plot(*series(rows, "tansu_rss_kb", 1024), ":", color="0.4", label="tansu RSS")
    ax1.set_ylabel("MiB")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_title("spanbuf soak: memory and input (grey = draining)")

    ax2.plot(*series(rows, "redis_used_memory", 2**20), color="tab:red", label="redis used_memory")
    ax2.set_ylabel("Redis used_memory, MiB")
    ax2.set_ylim(bottom=0)
    ax2b = ax2.twinx()
    ax2b.plot(*series(rows, "redis_keys"), color="tab:blue", alpha=0.7, label="keys (DBSIZE)")
    ax2b.set_ylabel("keys")
    ax2b.set_ylim(bottom=0)
    lines = ax2.get_legend_handles_labels()
    lines_b = ax2b.get_legend_handles_labels()
    ax2.legend(lines[0] + lines_b[0], lines[1] + lines_b[1], loc="upper left", fontsize=8)

    produced = "input_topic_messages" if rows[-1].get("input_topic_messages") else "produced_spans"
    ax3.plot(*rate(rows, produced), color="0.5", label="produced spans/s")
    ax3.plot(*rate(rows, "consumed_messages"), color="tab:green", label="consumed spans/s")
    ax3.set_ylabel("spans/s")
    ax3.set_ylim(bottom=0)
    ax3b = ax3.twinx()
    ax3b.plot(*series(rows, "lag_spans"), color="tab:purple", alpha=0.7, label="input lag (spans)")
    ax3b.set_ylabel("lag, spans")
    lines = ax3.get_legend_handles_labels()
    lines_b = ax3b.get_legend_handles_labels()
    ax3.legend(lines[0] + lines_b[0], lines[1] + lines_b[1], loc="upper left", fontsize=8)
    ax3.set_xlabel("minutes")

    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: soak_plot.py SAMPLES_CSV OUT_PNG")
    main(sys.argv[1], sys.argv[2])
