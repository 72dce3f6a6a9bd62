//! Exactly once across crashes (issue 19): 500 queued emails, the daemon
//! SIGKILLed 20 times at random moments while it sends them, then the
//! person's part (every "delivery unknown" checked against the recipient's
//! side, the undelivered ones retried). No email reaches the SMTP sink twice,
//! none is lost, and the sink, the Sent folder and the statuses agree.
//! User: user00150 (its own Sent folder, so other tests on alice are not
//! disturbed). `CRASH_SEED=N` repeats a run's kill times.
//!
//! Most "delivery unknown" emails turn out delivered while lettre (0.11.23)
//! leaves Nagle on: the end-of-data line waits ~40 ms in the kernel for the
//! server's delayed ACK, and the kernel still sends it after the SIGKILL.
#![cfg(feature = "real-servers")]

mod common;
mod servers;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use servers::*;

const USER: &str = "user00150";
const MAILBOX: &str = "crash";
const EMAILS: usize = 500;
const KILLS: usize = 20;
/// Kills after which some idempotency keys are posted again.
const REPOST_AFTER: [usize; 2] = [5, 13];
const REPOSTS: usize = 25;

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} unset: start ../shared/testservers/up.sh"))
}

/// The daemon's config; `smtp_port` is a closed port while the queue is
/// filled, so nothing is sent before the first kill round.
fn config(dir: &Path, admin: u16, smtp_port: u16) -> PathBuf {
    let env = env();
    let cfg = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "info"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:{admin}"
token = "{TOKEN}"

[[profiles]]
name = "srv"
type = "imap_smtp"
host = "{host}"
port = {imap}
tls = "starttls"
ca_file = "{ca}"
tls_server_name = "{sn}"
smtp_port = {smtp_port}
smtp_tls = "starttls"
# Two in flight, not four: the 500 then last through the 20 kill rounds
# (with four, the last rounds often find nothing left to send).
smtp_pool_size = 2
poll_interval = "2s"

[[mailboxes]]
name = "{MAILBOX}"
profile = "srv"
email = "{USER}@example.test"
approval = "approved"
outgoing = "server_side_sync"
username = "{USER}"
password = "{PASSWORD}"
send_rate_per_minute = 100000
"#,
        state = dir.join("state").display(),
        host = env.host,
        imap = env.imap,
        ca = env.ca.display(),
        sn = env.server_name,
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// `crm-mailsync run` with its log appended to `log` (a pipe nobody reads
/// would block the daemon once full); killed on drop if the test fails first.
fn spawn(config: &Path, log: &Path) -> Running {
    let log = File::options().create(true).append(true).open(log).unwrap();
    Running(Some(
        daemon_command()
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    ))
}

/// Minimal HTTP/1.1 POST with a JSON body: (status, parsed body). None
/// while nothing listens or the daemon dies mid-request.
fn post(port: u16, path: &str, body: &str) -> Option<(u16, serde_json::Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some((status, serde_json::from_str(body).ok()?))
}

fn api_up(port: u16) -> bool {
    get(port, "/api/v1/outgoing?limit=1", Some(TOKEN)).is_some_and(|(s, _)| s == 200)
}

fn request(i: usize) -> String {
    serde_json::json!({
        "mailbox": MAILBOX,
        "regarding": format!("case:{}", i % 17 + 1),
        "to": [format!("customer{i}@customer.example")],
        "subject": format!("Crash test email {i}"),
        "text": format!("Hello,\n\nthis is email {i} of the crash test.\n"),
        "idempotency_key": format!("crash-{i}"),
    })
    .to_string()
}

/// Every queue row of the mailbox, all pages.
fn all_rows(port: u16) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/api/v1/outgoing?mailbox={MAILBOX}&limit=200&before={b}"),
            None => format!("/api/v1/outgoing?mailbox={MAILBOX}&limit=200"),
        };
        let page = get_json(port, &path);
        out.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => return out,
        }
    }
}

/// The value of a header (unfolded), from the header block of `raw`.
fn header(raw: &str, name: &str) -> Option<String> {
    let head = raw
        .split("\r\n\r\n")
        .next()
        .unwrap_or(raw)
        .split("\n\n")
        .next()
        .unwrap_or(raw);
    let mut value: Option<String> = None;
    for line in head.lines() {
        if let Some(v) = value.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case(name) {
                value = Some(v.trim().to_string());
            }
        }
    }
    value
}

fn message_id_of(raw: &str) -> Option<String> {
    header(raw, "Message-ID").map(|v| v.trim_matches(['<', '>', ' ']).to_string())
}

/// What the test needs of one sink file.
struct SinkFile {
    id: Option<String>,
    from_us: bool,
    /// The Test & Enable message every start sends.
    test: bool,
}

/// Message-ID → number of sink files, over the files not in `skip`.
struct Sink {
    dir: PathBuf,
    skip: HashSet<PathBuf>,
    seen: HashMap<PathBuf, SinkFile>,
}

impl Sink {
    fn new() -> Self {
        let dir = PathBuf::from(var("TESTSERVERS_SMTP_OUT"));
        let skip = Self::files(&dir).into_iter().collect();
        Sink {
            dir,
            skip,
            seen: HashMap::new(),
        }
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Counts per Message-ID of the files the test's run produced.
    fn counts(&mut self) -> HashMap<String, usize> {
        for p in Self::files(&self.dir) {
            if self.skip.contains(&p) || self.seen.contains_key(&p) {
                continue;
            }
            // The sink renames a complete .eml into place.
            let raw = std::fs::read(&p).unwrap();
            let raw = String::from_utf8_lossy(&raw);
            let file = SinkFile {
                id: message_id_of(&raw),
                from_us: header(&raw, "From").is_some_and(|f| f.contains(USER)),
                test: header(&raw, "Subject")
                    .is_some_and(|s| s.starts_with("crm-mailsync outgoing test")),
            };
            self.seen.insert(p, file);
        }
        let mut counts = HashMap::new();
        for id in self.seen.values().filter_map(|f| f.id.as_ref()) {
            *counts.entry(id.clone()).or_insert(0) += 1;
        }
        counts
    }
}

/// Message-ID (or marker header) → copies in the user's Sent folder.
fn sent_folder_counts(dir: &Path) -> HashMap<String, usize> {
    let sent = dir.join("mail").join(USER).join("Maildir").join(".Sent");
    let mut counts = HashMap::new();
    for sub in ["cur", "new"] {
        let Ok(rd) = std::fs::read_dir(sent.join(sub)) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(raw) = std::fs::read(e.path()) else {
                continue; // expunged meanwhile
            };
            let raw = String::from_utf8_lossy(&raw);
            let key = message_id_of(&raw)
                .or_else(|| header(&raw, "X-CRM-Mailsync-Id"))
                .unwrap_or_default();
            *counts.entry(key).or_insert(0) += 1;
        }
    }
    counts
}

fn kill(mut child: Child, log: &Path) {
    if let Some(status) = child.try_wait().unwrap() {
        panic!(
            "the daemon exited by itself ({status}) before its kill; log {}",
            log.display()
        );
    }
    // SIGKILL: no shutdown path runs.
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(!status.success(), "daemon exited on its own: {status}");
}

#[test]
fn sigkill_20_times_during_500_sends_delivers_each_once() {
    let started = Instant::now();
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed} (CRASH_SEED={seed} repeats these kill times)");
    let mut rng = fastrand::Rng::with_seed(seed);

    let env = env();
    reset_user(USER);
    let tmp = tempfile::tempdir().unwrap();
    // Outside the temporary directory, so a failure leaves it to read.
    let log = std::env::temp_dir().join(format!("outgoing_crash-{seed}.log"));
    let _ = std::fs::remove_file(&log);
    let admin = free_port();
    let smtp_port: u16 = var("SMTP_PORT").parse().unwrap();
    let mut sink = Sink::new();

    // 1. Queue 500 while the SMTP side is unreachable (Test & Enable fails,
    // queued email waits), so every send happens in the kill rounds.
    let closed = free_port();
    let cfg = config(tmp.path(), admin, closed);
    let mut daemon = spawn(&cfg, &log);
    wait_for(Duration::from_secs(30), "the admin API", || {
        api_up(admin).then_some(())
    });
    let mut ids: Vec<(u64, String)> = Vec::with_capacity(EMAILS);
    for i in 0..EMAILS {
        let (status, body) = post(admin, "/api/v1/outgoing", &request(i)).unwrap();
        assert_eq!(status, 202, "email {i}: {body}");
        ids.push((
            body["id"].as_u64().unwrap(),
            body["message_id"].as_str().unwrap().to_string(),
        ));
    }
    daemon.stop();
    let by_id: HashMap<u64, String> = ids.iter().cloned().collect();
    let ours: HashSet<String> = ids.iter().map(|(_, m)| m.clone()).collect();
    assert_eq!(ours.len(), EMAILS, "Message-IDs are unique");
    println!(
        "queued {EMAILS} in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // 2. Twenty SIGKILLs at random moments of a sending daemon.
    let cfg = config(tmp.path(), admin, smtp_port);
    let mut reposted = 0;
    // Rounds in which the sink received some of ours: kills that hit a
    // sending daemon (on a fast machine the last rounds find nothing left).
    let (mut delivered_before, mut kills_while_sending) = (0, 0);
    for k in 1..=KILLS {
        let wait = Duration::from_millis(rng.u64(100..=1500));
        let t0 = Instant::now();
        let mut daemon = spawn(&cfg, &log);
        if REPOST_AFTER.contains(&(k - 1)) {
            // After a kill: the same keys name the same emails, nothing new.
            wait_for(Duration::from_secs(30), "the admin API", || {
                api_up(admin).then_some(())
            });
            for i in (0..EMAILS).step_by(EMAILS / REPOSTS).take(REPOSTS) {
                let (status, body) =
                    wait_for(Duration::from_secs(10), "a re-POST answered", || {
                        post(admin, "/api/v1/outgoing", &request(i))
                    });
                assert_eq!(status, 200, "re-POST of key crash-{i}: {body}");
                assert_eq!(body["existing"], true, "{body}");
                assert_eq!(body["id"].as_u64(), Some(ids[i].0), "{body}");
                assert_eq!(body["message_id"].as_str(), Some(ids[i].1.as_str()));
                reposted += 1;
            }
        }
        // Kill mid-run: once the sink shows this daemon sending (more of
        // ours than before), after a random few milliseconds more; the
        // random wait alone when nothing is left to send.
        let sending = Instant::now() + Duration::from_secs(10);
        let mut caught = false;
        while delivered_before < EMAILS && Instant::now() < sending {
            let now_in_sink = sink.counts().keys().filter(|m| ours.contains(*m)).count();
            if now_in_sink > delivered_before {
                caught = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if caught {
            std::thread::sleep(Duration::from_millis(rng.u64(0..=30)));
        } else if let Some(left) = wait.checked_sub(t0.elapsed()) {
            std::thread::sleep(left);
        }
        kill(daemon.0.take().unwrap(), &log);
        let delivered = sink.counts().keys().filter(|m| ours.contains(*m)).count();
        if delivered > delivered_before {
            kills_while_sending += 1;
        }
        delivered_before = delivered;
        println!(
            "kill {k:2} after {:4} ms: {delivered} of ours in the sink",
            t0.elapsed().as_millis()
        );
    }

    // 3. Runs to the end: nothing pending or sending any more.
    let mut daemon = spawn(&cfg, &log);
    wait_for(Duration::from_secs(30), "the admin API", || {
        api_up(admin).then_some(())
    });
    let settled = |what: &str| {
        wait_for(Duration::from_secs(90), what, || {
            // Polling 500 rows must not starve the daemon on two cores.
            std::thread::sleep(Duration::from_millis(250));
            let rows = all_rows(admin);
            rows.iter()
                .all(|r| {
                    !matches!(r["status"].as_str(), Some("pending_send" | "sending"))
                        && r["sent_copy"] != "owed"
                })
                .then_some(rows)
        })
    };
    let rows = settled("every email sent or failed");

    // 4. The person's part: a "delivery unknown" is checked at the
    // recipient's (the sink); delivered → left failed, else retried.
    let counts = sink.counts();
    let mut unknown = 0;
    let mut unknown_delivered: HashSet<u64> = HashSet::new();
    for r in &rows {
        if r["status"] != "failed" {
            continue;
        }
        let id = r["id"].as_u64().unwrap();
        let reason = r["last_error"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("delivery unknown"),
            "email {id} failed for another reason: {reason}"
        );
        unknown += 1;
        if counts.contains_key(&by_id[&id]) {
            unknown_delivered.insert(id);
        } else {
            let (status, body) = post(admin, &format!("/api/v1/outgoing/{id}/retry"), "").unwrap();
            assert_eq!(status, 200, "retry of {id}: {body}");
        }
    }
    let rows = settled("the retried emails sent");
    daemon.stop();

    // 5. Sink, Sent folder and statuses agree.
    let counts = sink.counts();
    let sent_copies = sent_folder_counts(&env.dir);
    assert_eq!(rows.len(), EMAILS, "rows of the mailbox");
    let mut problems = Vec::new();
    for r in &rows {
        let id = r["id"].as_u64().unwrap();
        let mid = &by_id[&id];
        let in_sink = counts.get(mid).copied().unwrap_or(0);
        let copies = sent_copies.get(mid).copied().unwrap_or(0);
        let status = r["status"].as_str().unwrap_or_default();
        if in_sink != 1 {
            problems.push(format!(
                "email {id} <{mid}> is in the sink {in_sink} times (status {status})"
            ));
        }
        let expected = if unknown_delivered.contains(&id) {
            "failed"
        } else {
            "sent"
        };
        if status != expected {
            problems.push(format!(
                "email {id} is {status}, expected {expected}: {}",
                r["last_error"]
            ));
        }
        // A copy proves delivery, so a delivery-unknown email has none.
        let expected_copies = usize::from(expected == "sent");
        if copies != expected_copies {
            problems.push(format!(
                "email {id} ({status}) has {copies} Sent copies, expected {expected_copies}"
            ));
        }
    }
    // Nothing else left this mailbox (a resend under a new Message-ID
    // would show here), besides the Test & Enable message of each start.
    for (file, m) in &sink.seen {
        if m.from_us && !m.test && !m.id.as_ref().is_some_and(|id| ours.contains(id)) {
            problems.push(format!(
                "stray message from {USER} in the sink: {}",
                file.display()
            ));
        }
    }
    let sent = rows.iter().filter(|r| r["status"] == "sent").count();
    println!(
        "kills {KILLS} ({kills_while_sending} while sending), re-POSTed keys {reposted}, delivery unknown {unknown}, of which delivered {}, retried {}, sent {sent}, in {:.1} s",
        unknown_delivered.len(),
        unknown - unknown_delivered.len(),
        started.elapsed().as_secs_f64()
    );
    // What the daemons complained about, for whoever reads the CI log.
    let mut complaints: HashMap<String, usize> = HashMap::new();
    for line in std::fs::read_to_string(&log).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
            let text = v["fields"]["message"]
                .as_str()
                .or(v["message"].as_str())
                .unwrap_or_default();
            let what = v["alert"].as_str().unwrap_or(text);
            // Numbers (ids, ports) differ line by line; the kind does not.
            let mut head = String::new();
            for c in what.chars() {
                if !(c.is_ascii_digit() && head.ends_with('N')) {
                    head.push(if c.is_ascii_digit() { 'N' } else { c });
                }
            }
            let head: String = head.chars().take(60).collect();
            *complaints
                .entry(format!("{} {head}", v["level"]))
                .or_insert(0) += 1;
        }
    }
    let mut complaints: Vec<_> = complaints.into_iter().collect();
    complaints.sort();
    for (what, n) in complaints {
        println!("  log: {n:3} × {what}");
    }
    assert!(
        problems.is_empty(),
        "{} problems (log {}):\n{}",
        problems.len(),
        log.display(),
        problems.join("\n")
    );
    let _ = std::fs::remove_file(&log);
}
