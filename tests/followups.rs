//! Follow-ups (IMAP keyword, move to the failed-mail folder, forward-mailbox
//! delete, Maildir delete) happen at least once, and one email delivered to
//! several mailboxes is one activity, against the real Dovecot.
//! Users: user00190 … user00194, alice, queue-support.
#![cfg(feature = "real-servers")]

mod common;
mod servers;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use crm_mailsync::connector::imap::{Credentials, ImapConnector, ImapSettings};
use crm_mailsync::connector::{Ack, AckKind, Connector};
use crm_mailsync::model::SourceKey;
use crm_mailsync::net::{Endpoint, TlsMode};
use crm_mailsync::store::{SledStore, Store};
use servers::*;

const KEYWORD: &str = "$CRMTracked";

/// A minimal IMAP client for the test's own view of the server: counts over
/// one plaintext connection (far quicker than a doveadm process per look,
/// which keeps the rounds short).
struct Imap {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    tag: u32,
}

impl Imap {
    fn login(env: &Env, user: &str) -> Self {
        let stream = TcpStream::connect((env.host.as_str(), env.imap)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut imap = Imap {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            tag: 0,
        };
        imap.line();
        imap.cmd(&format!("LOGIN {user} {PASSWORD}"));
        imap
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "IMAP connection closed");
        l
    }

    /// Sends a command; returns the untagged lines. Panics unless OK.
    fn cmd(&mut self, command: &str) -> Vec<String> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        write!(self.writer, "{tag} {command}\r\n").unwrap();
        self.finish(&tag)
    }

    fn finish(&mut self, tag: &str) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line();
            if let Some(rest) = l.strip_prefix(&format!("{tag} ")) {
                assert!(rest.starts_with("OK"), "{tag}: {l}");
                return out;
            }
            out.push(l);
        }
    }

    /// Messages in a folder (0 if it does not exist).
    fn count(&mut self, folder: &str) -> usize {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        write!(self.writer, "{tag} STATUS \"{folder}\" (MESSAGES)\r\n").unwrap();
        let mut n = 0;
        loop {
            let l = self.line();
            if l.starts_with(&format!("{tag} ")) {
                return n;
            }
            if let Some(i) = l.find("MESSAGES ") {
                n = l[i + 9..]
                    .trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .unwrap();
            }
        }
    }

    /// Messages of a folder that carry `keyword`.
    fn with_keyword(&mut self, folder: &str, keyword: &str) -> usize {
        self.cmd(&format!("EXAMINE \"{folder}\""));
        let lines = self.cmd(&format!("UID SEARCH KEYWORD {keyword}"));
        let found = lines
            .iter()
            .find_map(|l| l.strip_prefix("* SEARCH"))
            .map(|rest| rest.split_whitespace().count())
            .unwrap_or(0);
        self.cmd("CLOSE");
        found
    }
}

/// A message with a unique Message-ID.
fn unique(tag: &str) -> Vec<u8> {
    message(tag)
}

/// A message sent to bob and redirected to the forward mailbox.
fn forwarded(tag: &str) -> Vec<u8> {
    let mut m = b"X-Original-To: bob@example.test\r\n".to_vec();
    m.extend_from_slice(&unique(tag));
    m
}

/// Delivers messages into a user's INBOX with one deliver.sh run.
fn deliver_all(dir: &Path, user: &str, messages: &[Vec<u8>]) {
    let spool = dir.join(format!("spool-{user}"));
    let _ = std::fs::remove_dir_all(&spool);
    std::fs::create_dir_all(&spool).unwrap();
    let files: Vec<String> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let f = spool.join(format!("{i}.eml"));
            std::fs::write(&f, m).unwrap();
            f.display().to_string()
        })
        .collect();
    let mut args = vec![user];
    args.extend(files.iter().map(String::as_str));
    let out = script("deliver.sh", &args);
    assert_eq!(out.lines().count(), messages.len(), "{out}");
}

/// The state a killed or stopped daemon left behind.
fn store_of(cfg: &Path) -> SledStore {
    let config = crm_mailsync::config::load(cfg).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The lock of a process that just died or stopped may linger a moment.
        match SledStore::open(&config.store_path()) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("store: {e}"),
        }
    }
}

/// Three mailboxes whose processed mail gets a follow-up: "kw" (IMAP, the
/// keyword, unparsable mail moved to Undeliverable), "fwd" (IMAP forward
/// mailbox: copies deleted), "md" (Maildir, files deleted).
fn three_mailbox_config(
    env: &Env,
    dir: &Path,
    admin: u16,
    maildir: &Path,
    with_forward: bool,
) -> std::path::PathBuf {
    let cfg = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "warn"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:{admin}"
token = "{TOKEN}"

[[profiles]]
name = "srv"
type = "imap_smtp"
host = "{host}"
port = {port}
tls = "plain"
allow_insecure = true
poll_interval = "1s"
batch_size = 2
max_transient_failures = 1000
processed_keyword = "{KEYWORD}"
move_failed_to = "Undeliverable"

[[profiles]]
name = "local"
type = "maildir"
poll_interval = "1s"
batch_size = 2

[[mailboxes]]
name = "kw"
profile = "srv"
email = "{kw_user}@example.test"
approval = "approved"
username = "{kw_user}"
password = "{PASSWORD}"

{forward}
[[mailboxes]]
name = "md"
profile = "local"
email = "md@example.test"
approval = "approved"
path = "{maildir}"
delete_after_processing = true
"#,
        state = dir.join("state").display(),
        host = env.host,
        port = env.imap,
        maildir = maildir.display(),
        kw_user = kw_user(with_forward),
        forward = if with_forward {
            format!(
                "[[mailboxes]]\nname = \"fwd\"\nprofile = \"srv\"\nemail = \"user00191@example.test\"\napproval = \"approved\"\nusername = \"user00191\"\npassword = \"{PASSWORD}\"\nincoming = \"forward_mailbox\"\n"
            )
        } else {
            String::new()
        },
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// The keyword mailbox's user: each variant of the SIGKILL test has its own,
/// as the two run in parallel.
fn kw_user(with_forward: bool) -> &'static str {
    if with_forward {
        "user00194"
    } else {
        "user00190"
    }
}

/// Files left in a Maildir inbox.
fn maildir_files(root: &Path) -> usize {
    ["new", "cur"]
        .iter()
        .map(|d| std::fs::read_dir(root.join(d)).unwrap().count())
        .sum()
}

/// Waits for a process to exit by itself; panics after `timeout`.
fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon did not kill itself within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The keyword, the move to the failed-mail folder and the Maildir delete
/// used to happen after the commit that had already advanced the position:
/// a crash in between lost them for good. Twenty rounds: new mail in two
/// mailboxes, the daemon SIGKILLs itself right after a random commit that
/// owes follow-ups (before any of them), a restart; then every processed
/// message carries its keyword or is deleted or moved, and nothing is
/// recorded twice.
#[test]
fn sigkill_between_commit_and_follow_up_20_rounds() {
    sigkill_rounds(false);
}

/// The same with a forward mailbox (IMAP delete) as a third mailbox.
#[test]
fn sigkill_between_commit_and_follow_up_20_rounds_with_a_forward_mailbox() {
    sigkill_rounds(true);
}

fn sigkill_rounds(with_forward: bool) {
    use std::os::unix::process::ExitStatusExt;
    let env = env();
    for user in [kw_user(with_forward), "user00191"] {
        reset_user(user);
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let maildir = dir.join("Maildir");
    make_maildir(&maildir);
    let admin = free_port();
    let cfg = three_mailbox_config(&env, dir, admin, &maildir, with_forward);
    let mut kw = Imap::login(&env, kw_user(with_forward));
    let mut fwd = Imap::login(&env, "user00191");
    let (mut good, mut garbage, mut forwarded_total, mut files) = (0, 0, 0, 0);
    let mut owed_after_kill = 0;
    for round in 0..20 {
        // Per round: two batches of two in each mailbox, so four (six with
        // the forward mailbox) commits owe follow-ups; one of them is the
        // last the daemon lives through.
        let mut kw_mail = vec![b"garbage without any header section\r\n".to_vec()];
        let mut fwd_mail = Vec::new();
        for i in 0..3 {
            kw_mail.push(unique(&format!("kw-{round}-{i}")));
            fwd_mail.push(forwarded(&format!("fwd-{round}-{i}")));
            let name = format!("{}.M{round:02}{i}P1.gen", 1_767_000_000 + round * 10 + i);
            std::fs::write(
                maildir.join("new").join(name),
                unique(&format!("md-{round}-{i}")),
            )
            .unwrap();
        }
        deliver_all(dir, kw_user(with_forward), &kw_mail);
        if with_forward {
            deliver_all(dir, "user00191", &fwd_mail);
            forwarded_total += 3;
        }
        good += 3;
        garbage += 1;
        files += 3;

        let kill_after = fastrand::u32(1..=if with_forward { 6 } else { 4 });
        let mut child = daemon_command()
            .args(["run", "--config"])
            .arg(&cfg)
            .env(
                crm_mailsync::fault::KILL_AFTER_COMMIT,
                kill_after.to_string(),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(60));
        assert_eq!(status.signal(), Some(9), "round {round}: {status}");
        // The commit just before the kill owes follow-ups nobody carried out.
        let owed: usize = {
            let store = store_of(&cfg);
            ["kw", "fwd", "md"]
                .iter()
                .map(|m| store.follow_ups(m).unwrap().len())
                .sum()
        };
        assert!(owed >= 1, "round {round}: nothing owed after the kill");
        owed_after_kill += owed;

        let mut child = Running(Some(start(&cfg)));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = kw.with_keyword("INBOX", KEYWORD) == good
                && kw.count("INBOX") == good
                && kw.count("Undeliverable") == garbage
                && (!with_forward || fwd.count("INBOX") == 0)
                && maildir_files(&maildir) == 0;
            if done {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round} (killed after commit {kill_after}): keyword on {} of {good}, INBOX {}, Undeliverable {} of {garbage}, forward copies left {}, Maildir files left {}",
                kw.with_keyword("INBOX", KEYWORD),
                kw.count("INBOX"),
                kw.count("Undeliverable"),
                fwd.count("INBOX"),
                maildir_files(&maildir)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child.stop();
        let store = store_of(&cfg);
        for m in ["kw", "fwd", "md"] {
            assert_eq!(store.follow_ups(m).unwrap(), vec![], "round {round}: {m}");
        }
        let quarantined: Vec<String> = store
            .quarantined(1000)
            .unwrap()
            .into_iter()
            .map(|q| format!("{}: {}", q.source, q.reason))
            .collect();
        drop(store);
        // Nothing twice: one activity per message, each source once.
        let all = offline_activities(&cfg);
        let mut subjects: Vec<&str> = all.iter().map(|a| a["subject"].as_str().unwrap()).collect();
        subjects.sort_unstable();
        assert_eq!(
            all.len(),
            good + forwarded_total + files,
            "round {round} (killed after commit {kill_after}): {subjects:?}; quarantined: {quarantined:?}"
        );
        let sources: HashSet<String> = all.iter().map(|a| a["source"].to_string()).collect();
        assert_eq!(sources.len(), all.len(), "round {round}: a source twice");
        let ids: HashSet<&str> = all
            .iter()
            .map(|a| a["message_ids"][0].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), all.len(), "round {round}: a Message-ID twice");
    }
    eprintln!("follow-ups owed right after the 20 kills: {owed_after_kill}");
}

fn imap_settings(env: &Env, user: &str) -> ImapSettings {
    ImapSettings {
        mailbox: "mb".into(),
        endpoint: Endpoint {
            host: env.host.clone(),
            port: env.imap,
            tls: TlsMode::Plain,
            tls_server_name: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
        },
        credentials: Credentials::Password {
            user: user.into(),
            pass: PASSWORD.into(),
        },
        token_provider: None,
        max_message_size: 1 << 20,
        folders: Vec::new(),
        batch_size: 100,
        process_email_from: None,
        move_failed_to: Some("Undeliverable".into()),
        processed_keyword: Some(KEYWORD.into()),
        delete_after_processing: false,
        idle: false,
        transform: None,
        missing_message_retries: 3,
    }
}

/// Follow-ups recorded by an earlier process are carried out by a connector
/// that never fetched those messages (from the source keys alone), and
/// carrying them out again changes nothing and reports no error: a keyword
/// set twice, a move or delete of a message already gone. A UIDVALIDITY
/// change or a vanished folder drops them with a reason.
#[tokio::test]
async fn imap_follow_ups_work_from_source_keys_and_are_idempotent() {
    let env = env();
    let user = "user00192";
    reset_user(user);
    let spool = tempfile::tempdir().unwrap();
    deliver_all(
        spool.path(),
        user,
        &[unique("one"), unique("two"), b"garbage\r\n".to_vec()],
    );
    let mut imap = Imap::login(&env, user);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let mut fetcher = ImapConnector::new(imap_settings(&env, user), store.clone());
    let batch = fetcher.fetch().await.unwrap();
    fetcher.close().await;
    let sources: Vec<SourceKey> = batch.messages.iter().map(|m| m.source.clone()).collect();
    assert_eq!(sources.len(), 3);
    let acks = |sources: &[SourceKey]| -> Vec<Ack> {
        sources
            .iter()
            .enumerate()
            .map(|(i, s)| Ack {
                source: s.clone(),
                kind: if i == 2 {
                    AckKind::Failed
                } else {
                    AckKind::Recorded
                },
            })
            .collect()
    };
    for attempt in 0..2 {
        // A fresh connector each time, as after a restart.
        let mut c = ImapConnector::new(imap_settings(&env, user), store.clone());
        let report = c.acknowledge(acks(&sources)).await.unwrap();
        c.close().await;
        assert!(report.failed.is_empty(), "attempt {attempt}: {report:?}");
        assert!(report.obsolete.is_empty(), "attempt {attempt}: {report:?}");
        assert_eq!(imap.with_keyword("INBOX", KEYWORD), 2, "attempt {attempt}");
        assert_eq!(imap.count("INBOX"), 2, "attempt {attempt}");
        assert_eq!(imap.count("Undeliverable"), 1, "attempt {attempt}");
    }
    // Deletes (forward mailbox), twice.
    for attempt in 0..2 {
        let mut settings = imap_settings(&env, user);
        settings.delete_after_processing = true;
        let mut c = ImapConnector::new(settings, store.clone());
        let report = c.acknowledge(acks(&sources[..2])).await.unwrap();
        c.close().await;
        assert!(report.failed.is_empty(), "delete {attempt}: {report:?}");
        assert_eq!(imap.count("INBOX"), 0, "delete {attempt}");
    }
    // Under another UIDVALIDITY the UIDs name other messages: dropped.
    let mut stale = sources[0].clone();
    stale.uidvalidity += 1;
    let mut gone = sources[1].clone();
    gone.folder = "INBOX/NoSuchFolder".into();
    let mut c = ImapConnector::new(imap_settings(&env, user), store.clone());
    let report = c
        .acknowledge(vec![
            Ack {
                source: stale.clone(),
                kind: AckKind::Recorded,
            },
            Ack {
                source: gone.clone(),
                kind: AckKind::Recorded,
            },
        ])
        .await
        .unwrap();
    c.close().await;
    assert!(report.failed.is_empty(), "{report:?}");
    let mut obsolete = report.obsolete;
    obsolete.sort_by(|a, b| a.0.folder.cmp(&b.0.folder));
    assert_eq!(obsolete.len(), 2, "{obsolete:?}");
    assert_eq!(obsolete[0].0, stale);
    assert!(obsolete[0].1.contains("UIDVALIDITY"), "{obsolete:?}");
    assert_eq!(obsolete[1].0, gone);
    assert!(obsolete[1].1.contains("no longer exists"), "{obsolete:?}");
}

/// The same Message-ID delivered to a user and a queue became two
/// activities when one copy's bytes differed (a disclaimer footer, another
/// Received chain): it is one activity with both sources and both
/// mailboxes, and the counters say one email was processed, one duplicate.
#[test]
fn one_email_in_two_mailboxes_with_a_footer_is_one_activity() {
    let env = env();
    for user in ["alice", "queue-support"] {
        reset_user(user);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let original = format!(
        "Received: from mx1.example.test by imap.example.test\r\nFrom: Customer <c@customer.example>\r\nTo: alice@example.test\r\nCc: support@example.test\r\nSubject: Quote for 40 licences\r\nDate: Thu, 01 Jan 2026 10:00:00 +0000\r\nMessage-ID: <{nanos}.both@customer.example>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlease send a quote.\r\n"
    );
    // The queue's copy went through a gateway: another Received chain, a
    // re-encoded body and a disclaimer footer.
    let footer = format!(
        "Received: from gateway.example.test by mx2.example.test\r\nReceived: from mx1.example.test by gateway.example.test\r\nFrom: Customer <c@customer.example>\r\nTo: alice@example.test\r\nCc: support@example.test\r\nSubject: Quote for 40 licences\r\nDate: Thu, 01 Jan 2026 10:00:00 +0000\r\nMessage-ID: <{nanos}.both@customer.example>\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nPlease send a quote.\r\n\r\n-- \r\nThis e-mail was scanned. Confidential: if you are not the intended recipient, delete it.\r\n"
    );
    let dir = tempfile::tempdir().unwrap();
    deliver_all(dir.path(), "alice", &[original.into_bytes()]);
    deliver_all(dir.path(), "queue-support", &[footer.into_bytes()]);
    let admin = free_port();
    let cfg = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "warn"

[admin]
listen = "127.0.0.1:{admin}"
token = "{TOKEN}"

[[profiles]]
name = "srv"
type = "imap_smtp"
host = "{host}"
port = {port}
tls = "plain"
allow_insecure = true
poll_interval = "1s"

[[mailboxes]]
name = "alice"
profile = "srv"
email = "alice@example.test"
approval = "approved"
username = "alice"
password = "{PASSWORD}"

[[mailboxes]]
name = "support"
profile = "srv"
owner_kind = "queue"
email = "support@example.test"
approval = "approved"
username = "queue-support"
password = "{PASSWORD}"
"#,
        state = dir.path().join("state").display(),
        host = env.host,
        port = env.imap,
    );
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut child = Running(Some(start(&cfg_path)));
    // Both listed (the API is up a moment before the mailbox tasks register:
    // `all` over an empty list passed at once) and both synced.
    let synced = |m: &serde_json::Value| {
        let list = m["mailboxes"].as_array().unwrap();
        list.len() == 2
            && list
                .iter()
                .all(|b| b["state"]["last_success_at"].is_number())
    };
    wait_for(Duration::from_secs(30), "both mailboxes synced", || {
        get(admin, "/api/v1/mailboxes", Some(TOKEN))
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .filter(synced)
    });
    let list = get_json(admin, "/api/v1/activities");
    assert_eq!(list["total"], 1, "{list}");
    let a = &list["activities"][0];
    let mut mailboxes: Vec<&str> = a["mailboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    mailboxes.sort_unstable();
    assert_eq!(mailboxes, vec!["alice", "support"], "{a}");
    let sources: HashSet<&str> = std::iter::once(&a["source"])
        .chain(a["also_seen_as"].as_array().unwrap())
        .map(|s| s["mailbox"].as_str().unwrap())
        .collect();
    assert_eq!(sources, HashSet::from(["alice", "support"]), "{a}");
    for m in ["alice", "support"] {
        let per = get_json(admin, &format!("/api/v1/activities?mailbox={m}"));
        assert_eq!(per["total"], 1, "{m}: {per}");
    }
    // One email processed, one duplicate: the API's counters agree with the
    // metrics.
    let boxes = get_json(admin, "/api/v1/mailboxes");
    let processed: u64 = boxes["mailboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["state"]["items_processed"].as_u64().unwrap())
        .sum();
    assert_eq!(processed, 1, "{boxes}");
    let (_, metrics) = get(admin, "/metrics", None).unwrap();
    let total = |name: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(
        total("crm_mailsync_messages_processed_total{"),
        1,
        "{metrics}"
    );
    assert_eq!(
        total("crm_mailsync_messages_duplicate_total{"),
        1,
        "{metrics}"
    );
    child.stop();
}

/// `items_processed` counted re-scanned copies (after a UIDVALIDITY re-scan
/// it showed 2,324 with 1,314 stored): after a re-scan it equals the stored
/// activities and the processed metric.
#[test]
fn items_processed_after_a_uidvalidity_rescan_matches_store_and_metrics() {
    let env = env();
    let user = "user00193";
    reset_user(user);
    bulk_generate(user, "INBOX", 40, 23);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = server_config(
        &env,
        dir.path(),
        admin,
        &ServerMailbox {
            kind: "imap_smtp",
            port: env.imap,
            tls: "starttls",
            user,
            password: PASSWORD,
            auth: "password",
            extra_profile: "batch_size = 10",
            extra_mailbox: "",
        },
    );
    let mut child = Running(Some(start(&cfg)));
    let processed = || -> Option<u64> {
        let (_, body) = get(admin, "/api/v1/mailboxes", Some(TOKEN))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["mailboxes"][0]["state"]["items_processed"].as_u64()
    };
    wait_for(Duration::from_secs(60), "40 processed", || {
        processed().filter(|n| *n >= 40)
    });
    let out = script("reset-uidvalidity.sh", &[user]);
    assert_ne!(
        field(&out, "old_uidvalidity"),
        field(&out, "new_uidvalidity")
    );
    deliver(user, "INBOX", &unique("after-reset"));
    wait_for(Duration::from_secs(60), "41 activities", || {
        activity_total(admin).filter(|n| *n >= 41)
    });
    wait_for(Duration::from_secs(60), "the re-scan done", || {
        let (_, m) = get(admin, "/metrics", None)?;
        m.lines()
            .any(|l| l.starts_with("crm_mailsync_messages_duplicate_total") && l.ends_with(" 40"))
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(activity_total(admin), Some(41));
    assert_eq!(processed(), Some(41));
    let (_, metrics) = get(admin, "/metrics", None).unwrap();
    assert!(
        metrics.contains("crm_mailsync_messages_processed_total{mailbox=\"mb\"} 41"),
        "{metrics}"
    );
    child.stop();
}
