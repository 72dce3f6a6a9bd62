//! The pull feed (`GET /api/v1/events`) end to end: a client long-polls
//! from cursor 0 while mail arrives, the daemon is stopped gracefully and
//! SIGKILLed in the middle, the client resumes with its cursor and sees
//! every event exactly once, in order.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// What the client keeps of one event.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    seq: u64,
    id: String,
    kind: String,
    activity_id: u64,
    changes: Vec<String>,
}

fn seen(e: &serde_json::Value) -> Seen {
    Seen {
        seq: e["seq"].as_u64().unwrap(),
        id: e["id"].as_str().unwrap().to_string(),
        kind: e["kind"].as_str().unwrap().to_string(),
        activity_id: e["activity_id"].as_u64().unwrap(),
        changes: e["changes"]
            .as_array()
            .map(|c| c.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default(),
    }
}

/// What the client thread shares with the test.
#[derive(Default)]
struct ClientLog {
    events: Vec<Seen>,
    cursor: u64,
    /// A long-poll is in flight (sent, not answered).
    polling: bool,
    /// Answers that failed (daemon down, killed mid-request).
    failures: u64,
}

/// Writes one message into a Maildir the way an MDA delivers: into `tmp`,
/// then renamed into `new`, so the daemon never reads half a file.
fn deliver(maildir: &Path, i: usize) {
    let text = format!(
        "Message-ID: <feed-{i}@example.test>\nDate: Tue, 06 Jan 2026 09:{:02}:{:02} +0000\nFrom: Customer {i} <c{i}@customer.example>\nTo: support@example.test\nSubject: Feed question {i}\n\nHello, this is question {i}.\n",
        (i / 60) % 60,
        i % 60
    );
    let name = format!("{}.M{i:06}P1.feed", 1_767_100_000 + i);
    let tmp = maildir.join("tmp").join(&name);
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, maildir.join("new").join(&name)).unwrap();
}

/// Runs the feed client on its own thread until `stop` is sent: long-polls
/// from cursor 0, resumes from its cursor after every failure.
fn spawn_client(
    port: u16,
    log: Arc<Mutex<ClientLog>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(client_loop(port, log, stop));
    })
}

async fn client_loop(
    port: u16,
    log: Arc<Mutex<ClientLog>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    loop {
        let cursor = {
            let mut l = log.lock().unwrap();
            l.polling = true;
            l.cursor
        };
        // An odd page size, so pages end mid-burst.
        let url = format!("http://127.0.0.1:{port}/api/v1/events?after={cursor}&limit=37&wait=55s");
        let request = async {
            let resp = http.get(&url).bearer_auth(TOKEN).send().await?;
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await?;
            Ok::<_, reqwest::Error>((status, body))
        };
        let answer = tokio::select! {
            a = request => a,
            _ = stop.changed() => return,
        };
        let failed = {
            let mut l = log.lock().unwrap();
            l.polling = false;
            record_answer(&mut l, cursor, answer)
        };
        if failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Applies one answer to the client's log; true when the request failed.
fn record_answer(
    l: &mut ClientLog,
    cursor: u64,
    answer: Result<(u16, serde_json::Value), reqwest::Error>,
) -> bool {
    match answer {
        Ok((200, body)) => {
            let events = body["events"].as_array().unwrap();
            for e in events {
                l.events.push(seen(e));
            }
            let next = body["next_cursor"].as_u64().unwrap();
            match events.last() {
                Some(e) => assert_eq!(next, e["seq"].as_u64().unwrap(), "{body}"),
                None => assert_eq!(next, cursor, "{body}"),
            }
            l.cursor = next;
            false
        }
        Ok((status, body)) => panic!("feed answered {status}: {body}"),
        Err(_) => {
            l.failures += 1;
            true
        }
    }
}

/// Reads the whole event log without waiting, page by page.
fn full_log(port: u16) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut cursor = 0;
    loop {
        let page = get_json(port, &format!("/api/v1/events?after={cursor}&limit=1000"));
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            assert_eq!(page["next_cursor"], cursor);
            return out;
        }
        out.extend(events.iter().map(seen));
        cursor = page["next_cursor"].as_u64().unwrap();
    }
}

fn wait_ready(port: u16) {
    wait_for(Duration::from_secs(30), "daemon ready", || {
        get(port, "/readyz", None).filter(|(s, _)| *s == 200)
    });
}

fn wait_total(port: u16, n: u64) {
    wait_for(Duration::from_secs(60), &format!("{n} activities"), || {
        activity_total(port).filter(|t| *t >= n)
    });
}

#[test]
fn feed_client_sees_every_event_once_in_order_across_restarts_and_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let support = dir.path().join("support");
    let sales = dir.path().join("sales");
    make_maildir(&support);
    make_maildir(&sales);
    let port = free_port();
    // A second mailbox receives copies of some messages: each copy grows the
    // activity's also_seen_as, an `activity.updated` event.
    let second = format!(
        "\n[[mailboxes]]\nname = \"sales\"\nprofile = \"local\"\nemail = \"sales@example.test\"\napproval = \"approved\"\npath = \"{}\"\n",
        sales.display()
    );
    let cfg = maildir_config(dir.path(), &support, port, 10, &second);
    // A shutdown that waited for a held long-poll would take its whole wait.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("shutdown_grace = \"10s\"", "shutdown_grace = \"60s\""),
    )
    .unwrap();

    const WAVE: usize = 50;
    let mut delivered = 0;
    let mut copies = 0;
    let mut wave = |n: usize| {
        for _ in 0..n {
            deliver(&support, delivered);
            if delivered % 10 == 3 {
                deliver(&sales, delivered);
                copies += 1;
            }
            delivered += 1;
        }
        (delivered, copies)
    };

    let log = Arc::new(Mutex::new(ClientLog::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let client = spawn_client(port, log.clone(), stop_rx);

    let daemon = start(&cfg);
    wait_ready(port);
    let (total, _) = wave(WAVE);
    wait_total(port, total as u64);

    // The client catches up and long-polls; one new message answers its held
    // request well before the 55 s wait is over.
    let caught_up = |log: &Arc<Mutex<ClientLog>>, port: u16| {
        wait_for(Duration::from_secs(60), "client caught up", || {
            let last = full_log(port).last().map_or(0, |e| e.seq);
            let l = log.lock().unwrap();
            (l.cursor == last && l.polling).then_some(last)
        })
    };
    let before = caught_up(&log, port);
    std::thread::sleep(Duration::from_millis(300));
    let (total, _) = wave(1);
    let woke = Instant::now();
    wait_for(Duration::from_secs(30), "long-poll answered", || {
        (log.lock().unwrap().cursor > before).then_some(())
    });
    assert!(
        woke.elapsed() < Duration::from_secs(20),
        "a held long-poll took {:?} to deliver a new event",
        woke.elapsed()
    );
    wait_total(port, total as u64);

    // Graceful stop while the client holds a long-poll: the daemon ends it
    // instead of waiting for it.
    caught_up(&log, port);
    let stopping = Instant::now();
    stop(daemon);
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "shutdown took {:?} with a long-poll held",
        stopping.elapsed()
    );
    // Mail arrives while the daemon is down.
    wave(WAVE);
    let daemon = start(&cfg);
    wait_ready(port);
    let (total, _) = wave(WAVE);
    wait_total(port, total as u64);

    // SIGKILL in the middle of bursts, five times, at a random point.
    let mut daemon = daemon;
    let mut kills_mid_burst = 0;
    for _ in 0..5 {
        let (total, _) = wave(WAVE);
        let mark = total as u64 - fastrand::u64(1..WAVE as u64);
        let at_kill = wait_for(Duration::from_secs(60), "progress mark", || {
            activity_total(port).filter(|t| *t >= mark)
        });
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        if at_kill < total as u64 {
            kills_mid_burst += 1;
        }
        daemon = start(&cfg);
        wait_ready(port);
        wait_total(port, total as u64);
    }
    eprintln!("{kills_mid_burst} of 5 SIGKILLs landed mid-burst");
    assert!(
        kills_mid_burst >= 1,
        "no SIGKILL landed in the middle of a burst"
    );
    let (total, copies) = wave(WAVE);
    wait_total(port, total as u64);

    // Every copy's update is in before the log is read as the truth.
    let truth = wait_for(Duration::from_secs(60), "every copy seen", || {
        let log = full_log(port);
        let updates = log
            .iter()
            .filter(|e| e.changes.contains(&"also_seen_as".to_string()))
            .count();
        (updates >= copies && log.len() >= total + copies).then_some(log)
    });
    let last = truth.last().unwrap().seq;
    wait_for(Duration::from_secs(60), "client at the end", || {
        (log.lock().unwrap().cursor == last).then_some(())
    });
    stop_tx.send(true).unwrap();
    client.join().unwrap();
    let log = Arc::try_unwrap(log).ok().unwrap().into_inner().unwrap();

    // Once, in order, nothing missing: seqs 1..N without gaps, the same
    // events the log holds.
    let seqs: Vec<u64> = log.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    assert_eq!(log.events, truth);
    for e in &log.events {
        assert_eq!(e.id, format!("evt_{}", e.seq));
    }
    // One activity.created per activity, and only the copies updated them.
    let mut created: HashMap<u64, usize> = HashMap::new();
    for e in log.events.iter().filter(|e| e.kind == "activity.created") {
        *created.entry(e.activity_id).or_default() += 1;
    }
    assert!(created.values().all(|n| *n == 1), "{created:?}");
    assert_eq!(created.len(), total, "one activity per message");
    assert_eq!(activity_total(port), Some(total as u64));
    let updated: Vec<&Seen> = log
        .events
        .iter()
        .filter(|e| e.kind == "activity.updated")
        .collect();
    assert_eq!(updated.len(), copies, "{updated:?}");
    for u in &updated {
        assert!(created.contains_key(&u.activity_id), "{u:?}");
        let first = log
            .events
            .iter()
            .position(|e| e.activity_id == u.activity_id)
            .unwrap();
        assert_eq!(log.events[first].kind, "activity.created", "{u:?}");
    }
    assert_eq!(log.events.len(), total + copies);
    // The client really was cut off by the restarts and resumed.
    assert!(log.failures >= 2, "{} failed requests", log.failures);

    // The log's end, as the API reports it: one event by seq, none past it.
    let one = get_json(port, &format!("/api/v1/events/{last}"));
    assert_eq!(one["seq"], last);
    assert_eq!(
        get(port, &format!("/api/v1/events/{}", last + 1), Some(TOKEN))
            .unwrap()
            .0,
        404
    );
    let after_end = get_json(port, &format!("/api/v1/events?after={last}"));
    assert_eq!(after_end["events"].as_array().unwrap().len(), 0);
    assert_eq!(after_end["next_cursor"], last);
    stop(daemon);
}
