#!/usr/bin/env python3
"""Initial sync of an Exchange Online mailbox through Microsoft Graph, as an
operator gets it: the daemon binary with an exchange_online profile and its
defaults (page_size, batch_size, four requests in flight, the processed
category) against the Graph stand-in (examples/graph_standin.rs) seeded with
--messages messages in the Inbox.

Reports messages per second from the daemon's start until the API counts every
activity, and, measured alone in the same run, what the stand-in itself
sustains for the same request mix (delta pages, $value, category read and
PATCH per message, four in flight): the daemon's rate as a share of it says
how much of the time is ours.

usage: bench_graph.py --bin target/release/crm-mailsync
       --standin target/release/examples/graph_standin [--messages 10000]
"""
import argparse, json, os, socket, subprocess, sys, tempfile, time, urllib.request

TOKEN = "bench-graph-token"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def activity_total(port):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/activities?limit=1",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)["total"]
    except Exception:
        return None


def selfbench(standin, n):
    out = subprocess.run(
        [standin, "--messages", str(n), "--selfbench"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def daemon_run(binary, standin, n, timeout):
    si = subprocess.Popen(
        [standin, "--messages", str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    info = json.loads(si.stdout.readline())
    with tempfile.TemporaryDirectory() as root:
        secret = os.path.join(root, "client.secret")
        with open(secret, "w") as f:
            f.write(info["client_secret"])
        port = free_port()
        cfg = os.path.join(root, "config.toml")
        with open(cfg, "w") as f:
            f.write(f"""
[daemon]
state_dir = "{root}/state"
log_format = "json"
log_level = "warn"

[admin]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"

[[profiles]]
name = "m365"
type = "exchange_online"
tenant_id = "{info['tenant']}"
client_id = "{info['client_id']}"
client_secret_file = "{secret}"
graph_url = "{info['graph_url']}"
login_url = "{info['login_url']}"

[[mailboxes]]
name = "bench"
profile = "m365"
email = "{info['mailbox']}"
approval = "approved"
""")
        t0 = time.monotonic()
        d = subprocess.Popen([binary, "run", "--config", cfg],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while True:
                total = activity_total(port)
                if total is not None and total >= n:
                    break
                if d.poll() is not None:
                    sys.exit(f"daemon exited: {d.stderr.read().decode()[-2000:]}")
                if time.monotonic() - t0 > timeout:
                    sys.exit(f"timed out at {total} of {n} activities")
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
        finally:
            d.terminate()
            d.wait(timeout=30)
    si.stdin.close()
    counters = json.loads(si.stdout.readline())
    si.wait(timeout=30)
    return elapsed, counters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/crm-mailsync")
    ap.add_argument("--standin", default="target/release/examples/graph_standin")
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    alone = selfbench(a.standin, a.messages)
    elapsed, counters = daemon_run(a.bin, a.standin, a.messages, a.timeout)
    rate = a.messages / elapsed
    print(json.dumps({
        "messages": a.messages,
        "daemon_seconds": round(elapsed, 2),
        "daemon_messages_per_s": round(rate, 1),
        "standin_alone_messages_per_s": round(alone["messages_per_s"], 1),
        "daemon_share_of_standin_rate": round(rate / alone["messages_per_s"], 3),
        "graph_requests": counters["requests"],
        "requests_per_message": round(counters["requests"] / a.messages, 2),
        "peak_in_flight": counters["peak_in_flight"],
        "concurrency_violations": counters["concurrency_violations"],
    }, indent=2))


if __name__ == "__main__":
    main()
