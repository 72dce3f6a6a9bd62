#![cfg(feature = "real-servers")]
//! Integration tests against the real Dovecot from ../shared/testservers.
//!
//! Run after `source /tmp/crm-mailsync-testservers/env.sh`; the `real-servers` feature
//! promises the servers, so a missing `IMAP_PORT` fails the tests. Each test that changes mail owns one of the
//! users user00051 … user00062, so tests can run in parallel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crm_mailsync::connector::imap::{
    Credentials, IdleOutcome, ImapClient, ImapDate, ImapError, ImapEvent, SpecialUse, CRM_KEYWORD,
};
use crm_mailsync::error::{Classify, Disposition};
use crm_mailsync::net::{Endpoint, NetError, TlsMode};

mod servers;
// The helper scripts and their output format are the shared ones of tests/servers.
use servers::{deliver, doveadm, field, PASSWORD, SCRIPTS};

struct Env {
    host: String,
    port: u16,
    imaps_port: u16,
    ca: PathBuf,
    server_name: String,
    token: String,
    state: PathBuf,
}

fn env() -> Option<Env> {
    let Ok(port) = std::env::var("IMAP_PORT") else {
        panic!("IMAP_PORT unset: start ../shared/testservers/up.sh and source its env.sh (feature real-servers needs the servers)");
    };
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    Some(Env {
        host: var("IMAP_HOST", "127.0.0.1"),
        port: port.parse().expect("IMAP_PORT"),
        imaps_port: var("IMAPS_PORT", "10993").parse().expect("IMAPS_PORT"),
        ca: PathBuf::from(var(
            "TESTSERVERS_CA_CERT",
            "/tmp/crm-mailsync-testservers/tls/ca.pem",
        )),
        server_name: var("TESTSERVERS_TLS_SERVER_NAME", "localhost"),
        token: var("TESTSERVERS_OAUTH_TOKEN", "test-token"),
        state: PathBuf::from(var("TESTSERVERS_DIR", "/tmp/crm-mailsync-testservers")),
    })
}

impl Env {
    fn endpoint(&self, tls: TlsMode) -> Endpoint {
        Endpoint {
            host: self.host.clone(),
            port: if tls == TlsMode::Implicit {
                self.imaps_port
            } else {
                self.port
            },
            tls,
            tls_server_name: Some(self.server_name.clone()),
            ca_file: Some(self.ca.clone()),
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
        }
    }

    async fn login(&self, user: &str) -> ImapClient {
        ImapClient::connect(&self.endpoint(TlsMode::StartTls))
            .await
            .expect("connect")
            .login(user, PASSWORD)
            .await
            .expect("login")
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("spawn helper script");
    assert!(out.status.success(), "{cmd:?} failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A small unique message; returns (bytes, Message-ID).
fn message(subject: &str) -> (Vec<u8>, String) {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let id = format!("<{nanos}.{n}.{}@imap-test.example>", std::process::id());
    let body = format!(
        "From: Test <test@example.com>\r\nTo: user@example.test\r\nSubject: {subject}\r\n\
         Date: Thu, 01 Jan 2026 10:00:00 +0000\r\nMessage-ID: {id}\r\n\r\nHello {subject}.\r\n"
    );
    (body.into_bytes(), id)
}

/// Empties a folder (ignores a missing one).
fn clear(user: &str, folder: &str) {
    doveadm(&format!("expunge -u {user} mailbox '{folder}' all"));
}

fn assert_permanent(e: &ImapError) {
    assert_eq!(e.disposition(), Disposition::Permanent, "{e}");
}

fn assert_transient(e: &ImapError) {
    assert_eq!(e.disposition(), Disposition::Transient, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_login_select_list() {
    let Some(env) = env() else { return };
    let user = "user00051";
    deliver(user, "INBOX", &message("select").0);
    let pre = ImapClient::connect(&env.endpoint(TlsMode::StartTls))
        .await
        .unwrap();
    assert!(pre.capabilities().has("AUTH=PLAIN"));
    // Capabilities were re-read over TLS; Dovecot no longer offers STARTTLS there.
    assert!(!pre.capabilities().has("STARTTLS"));
    let mut c = pre.login(user, PASSWORD).await.unwrap();
    let caps = c.capabilities().await.unwrap();
    for cap in ["IDLE", "CONDSTORE", "MOVE", "UIDPLUS"] {
        assert!(caps.has(cap), "{cap} missing");
    }
    let st = c.select("INBOX").await.unwrap();
    assert!(st.uidvalidity > 0);
    assert!(st.uidnext.unwrap() > 1);
    assert!(st.highest_modseq.unwrap() > 0);
    assert!(st.exists >= 1);
    assert!(!st.read_only);
    assert_eq!(c.selected_folder(), Some("INBOX"));

    let folders = c.list_folders().await.unwrap();
    let names: Vec<&str> = folders.iter().map(|f| f.name.as_str()).collect();
    assert!(names.contains(&"INBOX"), "{names:?}");
    for su in [
        SpecialUse::Sent,
        SpecialUse::Trash,
        SpecialUse::Drafts,
        SpecialUse::Junk,
        SpecialUse::Archive,
    ] {
        assert!(
            folders.iter().any(|f| f.special_use == Some(su)),
            "{su:?} missing in {folders:?}"
        );
    }
    assert!(folders.iter().all(|f| f.delimiter.as_deref() == Some("/")));
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_and_plain_mode() {
    let Some(env) = env() else { return };
    let creds = Credentials::Password {
        user: "user00051".into(),
        pass: PASSWORD.into(),
    };
    let t = Instant::now();
    let mut c = ImapClient::connect_and_authenticate(&env.endpoint(TlsMode::Implicit), &creds)
        .await
        .unwrap();
    println!(
        "IMAPS connect + AUTHENTICATE PLAIN + CAPABILITY: {:.1?}",
        t.elapsed()
    );
    let t = Instant::now();
    for _ in 0..5 {
        crm_mailsync::net::client_config(Some(&env.ca)).unwrap();
    }
    println!(
        "net::client_config (system roots + CA file): {:.1?} per call",
        t.elapsed() / 5
    );
    let st = c.examine("INBOX").await.unwrap();
    assert!(st.read_only);
    c.logout().await.unwrap();

    // Plaintext only when asked for; Dovecot's test config allows it on 10143.
    let pre = ImapClient::connect(&env.endpoint(TlsMode::Plain))
        .await
        .unwrap();
    assert!(pre.capabilities().has("STARTTLS"));
    let mut c = pre.authenticate(&creds).await.unwrap();
    c.noop().await.unwrap();
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_mechanisms() {
    let Some(env) = env() else { return };
    let user = "user00054";
    let ep = env.endpoint(TlsMode::StartTls);
    let pre = ImapClient::connect(&ep).await.unwrap();
    let mut c = pre.authenticate_xoauth2(user, &env.token).await.unwrap();
    c.select("INBOX").await.unwrap();
    c.logout().await.unwrap();

    let pre = ImapClient::connect(&ep).await.unwrap();
    let c = pre
        .authenticate_oauthbearer(user, &env.token)
        .await
        .unwrap();
    c.logout().await.unwrap();

    let creds = Credentials::OAuth2 {
        user: user.into(),
        token: env.token.clone(),
    };
    let c = ImapClient::connect_and_authenticate(&ep, &creds)
        .await
        .unwrap();
    c.logout().await.unwrap();

    for (mech, bad) in [
        ("XOAUTH2", "wrong-token-123"),
        ("OAUTHBEARER", "wrong-token-456"),
        ("XOAUTH2", PASSWORD),
    ] {
        let pre = ImapClient::connect(&ep).await.unwrap();
        let err = if mech == "XOAUTH2" {
            pre.authenticate_xoauth2(user, bad).await.unwrap_err()
        } else {
            pre.authenticate_oauthbearer(user, bad).await.unwrap_err()
        };
        assert!(matches!(err, ImapError::AuthFailed { .. }), "{mech}: {err}");
        assert_permanent(&err);
        let text = err.to_string();
        assert!(!text.contains(bad), "secret leaked: {text}");
        assert!(text.contains(mech), "{text}");
        println!("{mech} wrong token: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_permanent() {
    let Some(env) = env() else { return };
    let ep = env.endpoint(TlsMode::StartTls);
    let bad = "not-the-password-789";
    let err = ImapClient::connect(&ep)
        .await
        .unwrap()
        .login("user00054", bad)
        .await
        .unwrap_err();
    assert_permanent(&err);
    assert_eq!(err.response_code(), Some("AUTHENTICATIONFAILED"));
    let text = err.to_string();
    assert!(text.to_lowercase().contains("authentication"), "{text}");
    assert!(!text.contains(bad), "{text}");
    println!("LOGIN wrong password: {text}");

    let err = ImapClient::connect(&ep)
        .await
        .unwrap()
        .authenticate_plain("user00054", bad)
        .await
        .unwrap_err();
    assert_permanent(&err);
    assert!(!err.to_string().contains(bad));
}

#[tokio::test]
async fn nothing_listening_is_transient() {
    // Reserve a port, then free it: nobody listens there afterwards.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ep = Endpoint {
        host: "127.0.0.1".into(),
        port,
        tls: TlsMode::StartTls,
        tls_server_name: None,
        ca_file: None,
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
    };
    let err = ImapClient::connect(&ep).await.unwrap_err();
    assert!(
        matches!(err, ImapError::Net(NetError::Connect { .. })),
        "{err}"
    );
    assert_transient(&err);
}

#[tokio::test]
async fn silent_server_times_out_transient() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(sock);
    });
    let ep = Endpoint {
        host: "127.0.0.1".into(),
        port,
        tls: TlsMode::Plain,
        tls_server_name: None,
        ca_file: None,
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_millis(500),
    };
    let t = Instant::now();
    let err = ImapClient::connect(&ep).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_transient(&err);
    assert!(t.elapsed() < Duration::from_secs(3));
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_test_ca_is_certificate_error() {
    let Some(env) = env() else { return };
    for mode in [TlsMode::Implicit, TlsMode::StartTls] {
        let mut ep = env.endpoint(mode);
        ep.ca_file = None;
        let err = ImapClient::connect(&ep).await.unwrap_err();
        assert!(
            matches!(err, ImapError::Net(NetError::Certificate { .. })),
            "{mode:?}: {err}"
        );
        assert_permanent(&err);
        let text = err.to_string();
        // Regression (#17 §7): the raw rustls name `UnknownIssuer` told an
        // operator nothing; say what is wrong and which key fixes it.
        assert!(
            text.contains("not signed by a trusted CA") && text.contains("ca_file"),
            "{text}"
        );
        assert!(!text.contains("UnknownIssuer"), "{text}");
        println!("{mode:?} without CA: {text}");
    }
    // Right CA, wrong name: by an SNI override, and by an address the
    // certificate does not list (it is for localhost and 127.0.0.1; Dovecot
    // listens on 127.0.0.1 only, so the address goes in as the checked name).
    let mut by_name = env.endpoint(TlsMode::Implicit);
    by_name.tls_server_name = Some("imap.wrong.example".into());
    let mut by_address = env.endpoint(TlsMode::Implicit);
    by_address.tls_server_name = Some("127.0.0.2".into());
    for (ep, expected) in [(by_name, "imap.wrong.example"), (by_address, "127.0.0.2")] {
        let err = ImapClient::connect(&ep).await.unwrap_err();
        assert!(
            matches!(err, ImapError::Net(NetError::Certificate { .. })),
            "{err}"
        );
        assert_permanent(&err);
        let text = err.to_string();
        // Regression (#17 §7): this was a debug dump `NotValidForNameContext { … }`.
        assert!(
            !text.contains("NotValidForNameContext") && !text.contains("DnsName("),
            "{text}"
        );
        assert!(text.contains(&format!("{expected:?}")), "{text}");
        assert!(text.contains("it is for localhost, 127.0.0.1"), "{text}");
        assert!(text.contains("tls_server_name"), "{text}");
        println!("wrong name: {text}");
    }
}

/// UID → message file (LF line ends as stored) for a Maildir++ folder, from dovecot-uidlist.
fn maildir_files(dir: &Path) -> HashMap<u32, PathBuf> {
    let mut by_base: HashMap<String, PathBuf> = HashMap::new();
    for sub in ["cur", "new"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let base = name.split(':').next().unwrap().to_string();
            by_base.insert(base, p);
        }
    }
    let uidlist = std::fs::read_to_string(dir.join("dovecot-uidlist")).unwrap();
    let mut out = HashMap::new();
    for line in uidlist.lines().skip(1) {
        let Some((head, base)) = line.split_once(':') else {
            continue;
        };
        let uid: u32 = head.split_whitespace().next().unwrap().parse().unwrap();
        if let Some(p) = by_base.get(base) {
            out.insert(uid, p.clone());
        }
    }
    out
}

fn to_crlf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + b.len() / 30);
    for (i, &c) in b.iter().enumerate() {
        if c == b'\n' && (i == 0 || b[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_fetch_2000_in_batches_of_200() {
    let Some(env) = env() else { return };
    let (user, folder) = ("user00052", "INBOX/Big");
    clear(user, folder);
    let out = run(Command::new(format!("{SCRIPTS}/bulk-load.sh")).args([
        "-f",
        folder,
        user,
        "--generate",
        "2000",
    ]));
    let first: u32 = field(&out, "first_uid").unwrap().parse().unwrap();
    let last: u32 = field(&out, "last_uid").unwrap().parse().unwrap();
    assert_eq!(last - first + 1, 2000, "{out}");

    let mut c = env.login(user).await;
    let st = c.select(folder).await.unwrap();
    assert_eq!(st.exists, 2000);
    let uids = c.uids_from(first).await.unwrap();
    assert_eq!(uids, (first..=last).collect::<Vec<_>>());

    let t = Instant::now();
    let mut mails = Vec::new();
    for batch in uids.chunks(200) {
        let got = c.fetch_messages(batch).await.unwrap();
        assert_eq!(got.len(), batch.len());
        mails.extend(got);
    }
    let fetch_time = t.elapsed();
    let total: usize = mails.iter().map(|m| m.raw.len()).sum();
    println!(
        "fetched 2000 messages ({:.1} MB) in {:.2?} ({:.0} msg/s)",
        total as f64 / 1e6,
        fetch_time,
        2000.0 / fetch_time.as_secs_f64()
    );

    let files = maildir_files(&env.state.join("mail").join(user).join("Maildir/.INBOX.Big"));
    for m in &mails {
        let path = files
            .get(&m.uid)
            .unwrap_or_else(|| panic!("no file for uid {}", m.uid));
        let stored = to_crlf(&std::fs::read(path).unwrap());
        assert_eq!(m.raw.len(), m.size as usize, "uid {} RFC822.SIZE", m.uid);
        assert!(
            m.raw == stored,
            "uid {}: bytes differ from {}",
            m.uid,
            path.display()
        );
        assert!(m.internal_date.is_some());
        assert!(
            m.flags.iter().all(|f| f != "\\Seen"),
            "BODY.PEEK must not set \\Seen"
        );
    }

    let t = Instant::now();
    let ids = c.fetch_message_ids(&uids[..200]).await.unwrap();
    println!("fetched 200 Message-IDs in {:.2?}", t.elapsed());
    assert_eq!(ids.len(), 200);
    for ((uid, id), m) in ids.iter().zip(&mails) {
        assert_eq!(*uid, m.uid);
        let expected = String::from_utf8_lossy(&m.raw)
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: ").map(|v| v.trim().to_string()));
        assert_eq!(id.as_ref(), expected.as_ref(), "uid {uid}");
        assert!(id.is_some());
    }

    // SINCE is a date in the server's zone: allow a day either side of the cut.
    let cut = ImapDate::new(2025, 12, 1).unwrap();
    let since = c.search_since(cut).await.unwrap();
    assert!(!since.is_empty() && since.len() < 2000, "{}", since.len());
    for m in &mails {
        let d = m.internal_date.unwrap();
        if d >= cut.unix_midnight_utc() + 86_400 {
            assert!(since.binary_search(&m.uid).is_ok(), "uid {} missing", m.uid);
        }
        if d < cut.unix_midnight_utc() - 86_400 {
            assert!(
                since.binary_search(&m.uid).is_err(),
                "uid {} unexpected",
                m.uid
            );
        }
    }
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uids_from_returns_only_new() {
    let Some(env) = env() else { return };
    let user = "user00055";
    clear(user, "INBOX");
    deliver(user, "INBOX", &message("a").0);
    let second = deliver(user, "INBOX", &message("b").0);
    let mut c = env.login(user).await;
    let st = c.select("INBOX").await.unwrap();
    let next = st.uidnext.unwrap();
    assert_eq!(next, second + 1);
    // `UID next:*` matches the last message (UID `second`): must be filtered out.
    assert_eq!(c.uids_from(next).await.unwrap(), Vec::<u32>::new());
    assert_eq!(c.uids_from(second).await.unwrap(), vec![second]);

    let third = deliver(user, "INBOX", &message("c").0);
    let events = c.noop().await.unwrap();
    assert!(events.contains(&ImapEvent::Exists(3)), "{events:?}");
    assert_eq!(c.uids_from(next).await.unwrap(), vec![third]);
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uidvalidity_changes_after_reset() {
    let Some(env) = env() else { return };
    let user = "user00053";
    deliver(user, "INBOX", &message("reset").0);
    let mut c = env.login(user).await;
    let before = c.select("INBOX").await.unwrap();
    c.logout().await.unwrap();

    let out = run(Command::new(format!("{SCRIPTS}/reset-uidvalidity.sh")).arg(user));
    let mut c = env.login(user).await;
    let after = c.select("INBOX").await.unwrap();
    assert_ne!(after.uidvalidity, before.uidvalidity, "{out}");
    assert_eq!(after.exists, before.exists);
    let uids = c.uids_from(1).await.unwrap();
    assert!(
        uids.iter().all(|&u| u >= before.uidnext.unwrap()),
        "{uids:?}"
    );
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reports_new_mail_quickly() {
    let Some(env) = env() else { return };
    let user = "user00056";
    let mut ep = env.endpoint(TlsMode::StartTls);
    // Shorter than the IDLE waits below: proves IDLE does not trip the read time-out.
    ep.io_timeout = Duration::from_secs(1);
    let mut c = ImapClient::connect(&ep)
        .await
        .unwrap()
        .login(user, PASSWORD)
        .await
        .unwrap();
    let st = c.select("INBOX").await.unwrap();

    let t = Instant::now();
    assert_eq!(
        c.idle_wait(Duration::from_millis(2500)).await.unwrap(),
        IdleOutcome::Timeout
    );
    assert!(
        t.elapsed() >= Duration::from_millis(2400),
        "{:?}",
        t.elapsed()
    );
    assert!(c.noop().await.unwrap().is_empty());

    let msg = message("idle").0;
    let delivery = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        deliver(user, "INBOX", &msg);
        (start, Instant::now())
    });
    let outcome = c.idle_wait(Duration::from_secs(30)).await.unwrap();
    let notified = Instant::now();
    let (started, finished) = delivery.await.unwrap();
    assert_eq!(outcome, IdleOutcome::NewData);
    let latency = notified.saturating_duration_since(started);
    println!(
        "IDLE: notified {:.0?} after deliver.sh started ({:.0?} after it exited; deliver.sh took {:.0?})",
        latency,
        notified.saturating_duration_since(finished),
        finished - started
    );
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    let events = c.take_events();
    assert!(
        events.contains(&ImapEvent::Exists(st.exists + 1)),
        "{events:?}"
    );
    c.noop().await.unwrap();
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyword_is_stored() {
    let Some(env) = env() else { return };
    let user = "user00057";
    clear(user, "INBOX");
    let uid = deliver(user, "INBOX", &message("keyword").0);
    let mut c = env.login(user).await;

    c.examine("INBOX").await.unwrap();
    assert!(matches!(
        c.add_keyword(&[uid], CRM_KEYWORD).await,
        Err(ImapError::InvalidInput(_))
    ));

    let st = c.select("INBOX").await.unwrap();
    assert!(
        st.permanent_flags.iter().any(|f| f == "\\*"),
        "{:?}",
        st.permanent_flags
    );
    assert!(c.can_set_keywords());
    c.add_keyword(&[uid], CRM_KEYWORD).await.unwrap();
    let m = c.fetch_messages(&[uid]).await.unwrap();
    assert!(
        m[0].flags.iter().any(|f| f == CRM_KEYWORD),
        "{:?}",
        m[0].flags
    );
    assert!(matches!(
        c.add_keyword(&[uid], "bad keyword").await,
        Err(ImapError::InvalidInput(_))
    ));
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_between_folders_all_strategies() {
    let Some(env) = env() else { return };
    let (user, src, dst) = ("user00058", "INBOX/MoveSrc", "INBOX/MoveDst");
    clear(user, src);
    clear(user, dst);
    let mut sent = Vec::new();
    for i in 0..3 {
        let (bytes, id) = message(&format!("move {i}"));
        sent.push((deliver(user, src, &bytes), id));
    }
    let mut c = env.login(user).await;
    c.create_folder(dst).await.unwrap();
    c.create_folder(dst).await.unwrap(); // idempotent
    c.select(src).await.unwrap();

    let err = c
        .move_to(&[sent[0].0], "INBOX/NoSuchTarget")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImapError::FolderMissing { folder, .. } if folder == "INBOX/NoSuchTarget"),
        "{err}"
    );
    assert_permanent(&err);

    // 1: UID MOVE
    let out = c.move_to(&[sent[0].0], dst).await.unwrap();
    assert_eq!(out.uid_map.len(), 1, "{out:?}");
    // 2: UID COPY + STORE \Deleted + UID EXPUNGE
    c.disable_capability("MOVE");
    let out = c.move_to(&[sent[1].0], dst).await.unwrap();
    assert_eq!(out.uid_map.len(), 1, "{out:?}");
    // 3: without UIDPLUS: plain EXPUNGE
    c.disable_capability("UIDPLUS");
    c.move_to(&[sent[2].0], dst).await.unwrap();

    let expunges = c
        .take_events()
        .iter()
        .filter(|e| matches!(e, ImapEvent::Expunge(_)))
        .count();
    assert_eq!(expunges, 3);
    assert_eq!(c.uids_from(1).await.unwrap(), Vec::<u32>::new());
    c.select(dst).await.unwrap();
    let uids = c.uids_from(1).await.unwrap();
    let ids: Vec<String> = c
        .fetch_message_ids(&uids)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(_, id)| id)
        .collect();
    for (_, id) in &sent {
        assert!(ids.contains(id), "{id} not in {ids:?}");
    }
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selecting_missing_folder_is_permanent() {
    let Some(env) = env() else { return };
    let mut c = env.login("user00051").await;
    let err = c.select("INBOX/Does-Not-Exist").await.unwrap_err();
    assert!(matches!(&err, ImapError::FolderMissing { .. }), "{err}");
    assert_permanent(&err);
    assert!(err.to_string().contains("INBOX/Does-Not-Exist"), "{err}");
    assert_eq!(c.selected_folder(), None);
    // The connection survives a NO.
    c.select("INBOX").await.unwrap();
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expunge_and_vanished_events() {
    let Some(env) = env() else { return };
    for (user, qresync) in [("user00061", true), ("user00062", false)] {
        clear(user, "INBOX");
        let a = deliver(user, "INBOX", &message("x1").0);
        deliver(user, "INBOX", &message("x2").0);
        let mut c = env.login(user).await;
        if qresync {
            assert!(c.enable_qresync().await.unwrap());
        }
        c.select("INBOX").await.unwrap();
        assert!(doveadm(&format!("expunge -u {user} mailbox INBOX uid {a}")));
        let events = c.noop().await.unwrap();
        if qresync {
            assert!(
                events.iter().any(|e| matches!(e, ImapEvent::Vanished { earlier: false, uids } if uids.iter().any(|r| r.contains(&a)))),
                "{events:?}"
            );
        } else {
            assert!(events.contains(&ImapEvent::Expunge(1)), "{events:?}");
        }
        c.logout().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_folder_round_trip() {
    let Some(env) = env() else { return };
    let name = "INBOX/Entwürfe & Ideen";
    let mut c = env.login("user00059").await;
    c.create_folder(name).await.unwrap();
    let folders = c.list_folders().await.unwrap();
    assert!(folders.iter().any(|f| f.name == name), "{folders:?}");
    let st = c.select(name).await.unwrap();
    assert!(st.uidvalidity > 0);
    c.logout().await.unwrap();
    // Dovecot stores it in mUTF-7 on disk as well.
    assert!(env
        .state
        .join("mail/user00059/Maildir/.INBOX.Entw&APw-rfe &- Ideen")
        .is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_command_poisons_connection() {
    let Some(env) = env() else { return };
    let (user, folder) = ("user00060", "INBOX/Cancel");
    clear(user, folder);
    run(Command::new(format!("{SCRIPTS}/bulk-load.sh")).args([
        "-f",
        folder,
        user,
        "--generate",
        "300",
    ]));
    let mut c = env.login(user).await;
    c.select(folder).await.unwrap();
    let uids = c.uids_from(1).await.unwrap();
    assert_eq!(uids.len(), 300);
    let cut = tokio::time::timeout(Duration::from_millis(3), c.fetch_messages(&uids)).await;
    assert!(
        cut.is_err(),
        "fetch of 300 messages finished within 3 ms; test cannot cancel it"
    );
    // The stream is now mid-response: the client must refuse, not misread it.
    let err = c.noop().await.unwrap_err();
    assert!(matches!(err, ImapError::ConnectionLost(_)), "{err}");
    assert_transient(&err);
}
