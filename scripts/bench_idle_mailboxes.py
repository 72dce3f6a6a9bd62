#!/usr/bin/env python3
"""Cost of many idle mailboxes, as an operator gets it: the daemon binary with
its defaults runs N Maildir mailboxes that receive no mail; after a warm-up,
RSS and CPU time are sampled from /proc every few seconds for --minutes.

Reports peak and final RSS (MB) and CPU as a share of one core per minute,
besides the same figures for the daemon with a single mailbox in the same run
(the baseline), so the per-mailbox cost is visible as a ratio.

usage: bench_idle_mailboxes.py --bin target/release/crm-mailsync
       [--mailboxes 10000] [--minutes 5] [--poll 60s] [--warmup 60]
       [--baseline-minutes M] [--store-cache-mb MB]

--store-cache-mb sets [daemon] store_cache_mb (left out: the daemon's default)
for both runs, to see how much of the RSS is sled's page cache.
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, time, urllib.request

TOKEN = "bench-idle-mailboxes-token"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_config(root, n, poll, port, cache_mb):
    maildirs = os.path.join(root, "maildirs")
    lines = [
        "[daemon]",
        f'state_dir = "{root}/state"',
        'log_format = "json"',
        'log_level = "warn"',
    ]
    if cache_mb is not None:
        lines.append(f"store_cache_mb = {cache_mb}")
    lines += [
        "[admin]",
        f'listen = "127.0.0.1:{port}"',
        f'token = "{TOKEN}"',
        "[[profiles]]",
        'name = "local"',
        'type = "maildir"',
        f'poll_interval = "{poll}"',
    ]
    for i in range(n):
        md = os.path.join(maildirs, f"m{i:05}")
        for d in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(md, d), exist_ok=True)
        lines += [
            "[[mailboxes]]",
            f'name = "m{i:05}"',
            'profile = "local"',
            f'email = "m{i:05}@example.test"',
            'approval = "approved"',
            f'path = "{md}"',
        ]
    path = os.path.join(root, "config.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def api(port, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def proc_sample(pid):
    """(cpu seconds, rss MB) of a process from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return cpu, rss_kb / 1024


def run(a, n, minutes):
    root = tempfile.mkdtemp(prefix=f"idle-{n}-")
    try:
        port = free_port()
        cfg = write_config(root, n, a.poll, port, a.store_cache_mb)
        t0 = time.monotonic()
        p = subprocess.Popen([a.bin, "run", "--config", cfg],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(root, "log"), "w"))
        # Every mailbox through its first cycle (Test & Enable + a sync).
        while True:
            if p.poll() is not None:
                sys.exit(f"daemon exited ({p.returncode}); log in {root}/log")
            try:
                boxes = api(port, "/api/v1/mailboxes")
                boxes = boxes.get("mailboxes", boxes) if isinstance(boxes, dict) else boxes
                synced = sum(1 for b in boxes if (b.get("state") or {}).get("last_success_at"))
                if len(boxes) == n and synced == n:
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > a.start_timeout:
                sys.exit(f"{n} mailboxes not all synced after {a.start_timeout} s")
            time.sleep(1)
        ready = time.monotonic() - t0
        time.sleep(a.warmup)
        cpu0, _ = proc_sample(p.pid)
        w0 = time.monotonic()
        peak = 0.0
        minute = 0
        while time.monotonic() - w0 < minutes * 60:
            time.sleep(5)
            cpu, rss = proc_sample(p.pid)
            peak = max(peak, rss)
            # One row a minute (to stderr), so growth shows from a plateau.
            if (time.monotonic() - w0) // 60 > minute:
                minute += 1
                print(json.dumps({"mailboxes": n, "minute": minute, "rss_mb": round(rss, 1),
                                  "cpu_seconds_so_far": round(cpu - cpu0, 2)}),
                      file=sys.stderr, flush=True)
        cpu1, rss = proc_sample(p.pid)
        wall = time.monotonic() - w0
        p.terminate()
        p.wait(timeout=60)
        share = (cpu1 - cpu0) / wall
        return {"mailboxes": n, "all_synced_after_s": round(ready, 1),
                "rss_mb_final": round(rss, 1), "rss_mb_peak": round(peak, 1),
                "cpu_core_share": round(share, 4),
                "cpu_seconds_per_minute": round(share * 60, 2)}
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/crm-mailsync")
    ap.add_argument("--mailboxes", type=int, default=10_000)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--poll", default="60s", help="profile poll_interval (the default)")
    ap.add_argument("--warmup", type=float, default=60)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--baseline-minutes", type=float,
                    help="sampling window of the 1-mailbox baseline (default: --minutes)")
    ap.add_argument("--store-cache-mb", type=int)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    base_minutes = a.minutes if a.baseline_minutes is None else a.baseline_minutes
    base = run(a, 1, base_minutes)
    print(json.dumps({"baseline": base, "minutes": base_minutes}), flush=True)
    many = run(a, a.mailboxes, a.minutes)
    print(json.dumps({"run": many, "minutes": a.minutes,
                      "store_cache_mb": a.store_cache_mb or "default"}), flush=True)
    extra_rss = many["rss_mb_final"] - base["rss_mb_final"]
    print(json.dumps({
        "rss_ratio": round(many["rss_mb_final"] / base["rss_mb_final"], 2),
        "rss_kb_per_mailbox": round(extra_rss * 1024 / a.mailboxes, 1),
        "cpu_ratio": round(many["cpu_core_share"] / max(base["cpu_core_share"], 1e-6), 1),
        "goal": "rss < 256 MB, cpu < 5 % of a core",
        "met": many["rss_mb_peak"] < 256 and many["cpu_core_share"] < 0.05,
    }))


if __name__ == "__main__":
    main()
