#!/usr/bin/env python3
"""Draws docs/observability.png: the panels of docs/grafana-dashboard.json, computed the same
way from a real run of examples/observability.rs, scraped once a second.

    cargo build --features metrics --example observability
    python3 tools/plot_dashboard.py            # needs matplotlib; takes about 40 s
"""
import re
import subprocess
import time
import urllib.request
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXAMPLE = "target/debug/examples/observability"
URL = "http://127.0.0.1:3000/metrics"
SECONDS = 30
WINDOW = 5  # seconds, as a rate() window
LINE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


def scrape():
    text = urllib.request.urlopen(URL, timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            name, labels, value = match.groups()
            samples[(name, labels or "")] = float(value)
    return samples


def total(samples, name, **wanted):
    want = [f'{k}="{v}"' for k, v in wanted.items()]
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(w in labels for w in want))


def quantile(q, before, after):
    """histogram_quantile over the bucket increase between two scrapes (mode=wait)."""
    buckets = defaultdict(float)
    for (name, labels), value in after.items():
        if name == "distributed_lock_acquire_wait_seconds_bucket" and 'mode="wait"' in labels:
            le = re.search(r'le="([^"]+)"', labels).group(1)
            buckets[float("inf") if le == "+Inf" else float(le)] += value - before.get((name, labels), 0.0)
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank, previous_bound, previous_count = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return previous_bound
            share = (rank - previous_count) / max(buckets[bound] - previous_count, 1e-9)
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, buckets[bound]
    return None


def main():
    server = subprocess.Popen([EXAMPLE, "--serve", "--load-secs", str(SECONDS)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        scrapes = []
        for _ in range(SECONDS + 2):
            scrapes.append((time.time(), scrape()))
            time.sleep(1)
    finally:
        server.terminate()
    start = scrapes[0][0]
    t, p50, p99, conflicts, held, waiting, requests = [], [], [], [], [], [], defaultdict(list)
    for i in range(WINDOW, len(scrapes)):
        (t0, before), (t1, after) = scrapes[i - WINDOW], scrapes[i]
        span = t1 - t0
        t.append(t1 - start)
        p50.append((quantile(0.5, before, after) or 0) * 1000)
        p99.append((quantile(0.99, before, after) or 0) * 1000)
        refused = sum(total(after, "distributed_lock_acquire_total", outcome=o)
                      - total(before, "distributed_lock_acquire_total", outcome=o)
                      for o in ("conflict", "timeout"))
        conflicts.append(refused / span)
        held.append(total(after, "distributed_lock_held"))
        waiting.append(total(after, "distributed_lock_waiting"))
        for outcome in ("locked", "conflict", "unlocked", "backend_error"):
            name = "distributed_lock_layer_requests_total"
            requests[outcome].append((total(after, name, outcome=outcome)
                                      - total(before, name, outcome=outcome)) / span)
    lost = total(scrapes[-1][1], "distributed_lock_lost_total")
    errors = total(scrapes[-1][1], "distributed_lock_backend_errors_total")

    figure, axes = plt.subplots(2, 2, figsize=(12, 7))
    figure.suptitle("examples/observability.rs under its load generator (in-memory backend, "
                    f"16 clients): {lost:.0f} lost locks, {errors:.0f} backend errors")
    axes[0][0].plot(t, p50, label="p50")
    axes[0][0].plot(t, p99, label="p99")
    axes[0][0].set_title("Lock waits (acquire, wait mode), ms")
    axes[0][1].plot(t, conflicts, color="tab:red")
    axes[0][1].set_title("Conflicts per second (refused or timed out)")
    axes[1][0].plot(t, held, label="held")
    axes[1][0].plot(t, waiting, label="waiting")
    axes[1][0].set_title("Locks held, callers waiting (gauges)")
    for outcome, values in requests.items():
        axes[1][1].plot(t, values, label=outcome)
    axes[1][1].set_title("LockLayer requests per second, by outcome")
    for row in axes:
        for axis in row:
            axis.set_xlabel("seconds")
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend()
    figure.tight_layout()
    figure.savefig("docs/observability.png", dpi=80)


if __name__ == "__main__":
    main()
