#!/usr/bin/env python3
"""Initial sync of an Exchange Online mailbox through Microsoft Graph, as an
operator gets it: the daemon binary with an exchange_online profile and its
defaults (page_size, batch_size, four requests in flight, the processed
category) against the Graph stand-in (examples/graph_standin.rs) seeded with
--messages messages in the Inbox.

Reports messages per second from the daemon's start until the API counts every
activity, and, measured alone in the same run, what the stand-in itself
sustains for the same request mix (delta pages, $value and the category
PATCH per message, four in flight): the daemon's rate as a share of it says
how much of the time is ours.

usage: bench_graph.py --bin target/release/crm-mailsync
       --standin target/release/examples/graph_standin [--messages 10000]
       [--mailboxes 1]

One mailbox is bound by Graph's own limit (10,000 requests per 10 minutes
per app and mailbox; the daemon keeps under it: 1,000 requests at once,
then 900 a minute), and all mailboxes by the app's requests_per_minute
(default 10,000): spread the messages over mailboxes of fewer than 1,000
requests each (--mailboxes 40) and turn the app budget off
(--app-requests-per-minute 1000000) to see the daemon's own speed.
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


def selfbench(standin, n, mailboxes):
    out = subprocess.run(
        [standin, "--messages", str(n), "--mailboxes", str(mailboxes), "--selfbench"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def daemon_run(binary, standin, n, mailboxes, app_budget, timeout):
    si = subprocess.Popen(
        [standin, "--messages", str(n), "--mailboxes", str(mailboxes)],
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
""")
            if app_budget is not None:
                f.write(f"requests_per_minute = {app_budget}\n")
            for k, email in enumerate(info["mailboxes"]):
                f.write(f"""
[[mailboxes]]
name = "bench{k}"
profile = "m365"
email = "{email}"
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
    ap.add_argument("--mailboxes", type=int, default=1,
                    help="messages spread over this many mailboxes (Graph limits each "
                         "to 10,000 requests per 10 minutes)")
    ap.add_argument("--app-requests-per-minute", type=int, default=None,
                    help="the profile's requests_per_minute (default: the daemon's)")
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    alone = selfbench(a.standin, a.messages, a.mailboxes)
    elapsed, counters = daemon_run(a.bin, a.standin, a.messages, a.mailboxes,
                                   a.app_requests_per_minute, a.timeout)
    rate = a.messages / elapsed
    print(json.dumps({
        "messages": a.messages,
        "mailboxes": a.mailboxes,
        "app_requests_per_minute": a.app_requests_per_minute,
        "daemon_seconds": round(elapsed, 2),
        "daemon_messages_per_s": round(rate, 1),
        "standin_alone_messages_per_s": round(alone["messages_per_s"], 1),
        "daemon_share_of_standin_rate": round(rate / alone["messages_per_s"], 3),
        "graph_requests": counters["requests"],
        "requests_per_message": round(counters["requests"] / a.messages, 2),
        "peak_in_flight": counters["peak_in_flight"],
        "concurrency_violations": counters["concurrency_violations"],
        "over_mailbox_limit": counters["over_mailbox_limit"],
    }, indent=2))


if __name__ == "__main__":
    main()
