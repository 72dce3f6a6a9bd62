#!/usr/bin/env python3
"""Outgoing throughput as users get it: queue N emails through the running
daemon's admin API (POST /api/v1/outgoing), then wait until every one is
`sent`; reports queue rate, queued → sent throughput, and the sink's count.

usage: bench_outgoing.py --port 8025 --token T --mailbox alice --count 5000
       [--sink-dir $TESTSERVERS_SMTP_OUT] [--threads 8]
"""
import argparse, json, os, sys, time, threading, urllib.request


def call(port, token, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def baseline(a):
    """Bare SMTP submission of the same number of similar messages with the
    same connection count: what the sink takes without the daemon."""
    import smtplib, ssl
    from email.message import EmailMessage
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.check_hostname = False

    def worker(k):
        c = smtplib.SMTP("127.0.0.1", a.baseline_smtp_port, timeout=60)
        c.starttls(context=ctx)
        c.login("alice", "secret")
        for i in range(k, a.count, a.threads):
            m = EmailMessage()
            m["From"] = "alice@example.test"
            m["To"] = f"customer{i % 50}@customer.example"
            m["Subject"] = f"Baseline #{i}"
            m.set_content(f"Body of email {i}\n" * 20)
            c.send_message(m)
        c.quit()

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(a.threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    return time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--mailbox", required=True)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--sink-dir", default=os.environ.get("TESTSERVERS_SMTP_OUT"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--baseline-smtp-port", type=int,
                    help="also send --count messages straight to this SMTP port "
                         "(STARTTLS, python smtplib, --threads connections) as the baseline")
    ap.add_argument("--ca", default=os.environ.get("TESTSERVERS_CA_CERT"))
    a = ap.parse_args()
    ids, lock = {}, threading.Lock()
    run = f"{os.getpid()}-{int(time.time())}"

    def worker(k):
        for i in range(k, a.count, a.threads):
            q = call(a.port, a.token, "POST", "/api/v1/outgoing", {
                "mailbox": a.mailbox, "regarding": f"case:{i % 97}",
                "to": [f"customer{i % 50}@customer.example"],
                "subject": f"Bench {run} #{i}", "text": f"Body of email {i}\n" * 20,
                "idempotency_key": f"bench-{run}-{i}"})
            with lock:
                ids[q["message_id"]] = q["id"]

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(a.threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    t_queued = time.monotonic() - t0
    pending = set(ids.values())
    while pending and time.monotonic() - t0 < a.timeout:
        before = None
        page = call(a.port, a.token, "GET", f"/api/v1/outgoing?mailbox={a.mailbox}&status=sent&limit=1000")
        # Newest first; page until nothing of ours is left unseen.
        while True:
            for r in page["items"]:
                pending.discard(r["id"])
            nb = page.get("next_before")
            if not nb or not pending or min(pending) > nb:
                break
            page = call(a.port, a.token, "GET", f"/api/v1/outgoing?mailbox={a.mailbox}&status=sent&limit=1000&before={nb}")
        if pending:
            time.sleep(0.2)
    t_sent = time.monotonic() - t0
    sink = None
    if a.sink_dir:
        sink = 0
        for f in os.listdir(a.sink_dir):
            if f.endswith(".eml"):
                with open(os.path.join(a.sink_dir, f), "rb") as fh:
                    head = fh.read(4096).decode("ascii", "replace")
                if f"Bench {run} #" in head:
                    sink += 1
    base = baseline(a) if a.baseline_smtp_port else None
    print(json.dumps({
        "baseline_smtp_s": round(base, 2) if base else None,
        "baseline_per_s": round(a.count / base, 1) if base else None,
        "daemon_vs_baseline": round((a.count - len(pending)) / t_sent / (a.count / base), 2) if base else None,
        "emails": a.count, "queued_s": round(t_queued, 2),
        "queue_per_s": round(a.count / t_queued, 1),
        "queued_to_sent_s": round(t_sent, 2),
        "sent_per_s": round((a.count - len(pending)) / t_sent, 1),
        "not_sent": len(pending), "sink_files": sink}))
    return 0 if not pending else 1


if __name__ == "__main__":
    sys.exit(main())
