//! Helpers for tests against the private Dovecot of ../shared/testservers:
//! environment, delivery and bulk loading, daemon configs for server profiles.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The testservers scripts (the project sees them at ../shared/testservers).
pub const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/testservers");
pub const PASSWORD: &str = "secret";

/// What `up.sh`/`env.sh` exported.
#[derive(Debug, Clone)]
pub struct Env {
    pub host: String,
    pub imap: u16,
    pub imaps: u16,
    pub pop3: u16,
    pub pop3s: u16,
    pub ca: PathBuf,
    pub server_name: String,
    pub token: String,
    pub dir: PathBuf,
}

/// Reads the exports; the `real-servers` feature promises the servers, so a
/// missing variable is a failure, not a skip.
pub fn env() -> Env {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} unset: start ../shared/testservers/up.sh and source its env.sh before `cargo test --features real-servers`")
        })
    };
    let port = |k: &str| var(k).parse::<u16>().unwrap_or_else(|e| panic!("{k}: {e}"));
    Env {
        host: var("IMAP_HOST"),
        imap: port("IMAP_PORT"),
        imaps: port("IMAPS_PORT"),
        pop3: port("POP3_PORT"),
        pop3s: port("POP3S_PORT"),
        ca: PathBuf::from(var("TESTSERVERS_CA_CERT")),
        server_name: var("TESTSERVERS_TLS_SERVER_NAME"),
        token: var("TESTSERVERS_OAUTH_TOKEN"),
        dir: PathBuf::from(var("TESTSERVERS_DIR")),
    }
}

/// Runs a helper script; returns stdout. Panics on failure.
pub fn script(name: &str, args: &[&str]) -> String {
    let out = Command::new(format!("{SCRIPTS}/{name}"))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `key=value` from a helper script's output.
pub fn field(out: &str, key: &str) -> Option<String> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// doveadm against the instance (as the mail user).
pub fn doveadm(args: &str) -> bool {
    Command::new("bash")
        .arg("-c")
        .arg(format!("source {SCRIPTS}/lib.sh && ts_doveadm {args}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// doveadm's stdout (empty on failure).
pub fn doveadm_out(args: &str) -> String {
    Command::new("bash")
        .arg("-c")
        .arg(format!("source {SCRIPTS}/lib.sh && ts_doveadm {args}"))
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Empties every folder of a user and deletes its non-default folders, so a
/// test starts from a known state whatever an earlier run left behind.
pub fn reset_user(user: &str) {
    doveadm(&format!("expunge -u {user} mailbox '*' all"));
    for f in ["INBOX/T1", "INBOX/T2", "INBOX/T3", "Undeliverable"] {
        doveadm(&format!("mailbox delete -u {user} -s '{f}'"));
    }
}

/// Generates `n` messages into a folder with bulk-load.sh; returns its output.
pub fn bulk_generate(user: &str, folder: &str, n: usize, seed: u32) -> String {
    script(
        "bulk-load.sh",
        &[
            "-f",
            folder,
            user,
            "--generate",
            &n.to_string(),
            "--seed",
            &seed.to_string(),
        ],
    )
}

/// A small message with a unique Message-ID.
pub fn message(tag: &str) -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "From: Customer <c@customer.example>\r\nTo: user@example.test\r\nSubject: {tag}\r\nDate: Thu, 01 Jan 2026 10:00:00 +0000\r\nMessage-ID: <{nanos}.{tag}.{}@test.example>\r\n\r\nHello {tag}.\r\n",
        std::process::id()
    )
    .into_bytes()
}

/// deliver.sh of one message; returns its UID.
pub fn deliver(user: &str, folder: &str, msg: &[u8]) -> u32 {
    use std::io::Write;
    let mut child = Command::new(format!("{SCRIPTS}/deliver.sh"))
        .args(["-f", folder, user, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("deliver.sh");
    child.stdin.take().unwrap().write_all(msg).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "deliver.sh failed");
    let out = String::from_utf8_lossy(&out.stdout);
    field(&out, "uid").expect("uid=").parse().unwrap()
}

/// One server mailbox in a daemon config.
pub struct ServerMailbox<'a> {
    pub kind: &'a str,
    pub port: u16,
    pub tls: &'a str,
    pub user: &'a str,
    pub password: &'a str,
    pub auth: &'a str,
    pub extra_profile: &'a str,
    pub extra_mailbox: &'a str,
}

/// Writes a daemon config for one IMAP/POP3 mailbox; returns its path.
pub fn server_config(env: &Env, dir: &Path, admin_port: u16, m: &ServerMailbox<'_>) -> PathBuf {
    let cfg = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "warn"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:{admin_port}"
token = "integration-test-token"

[[profiles]]
name = "srv"
type = "{kind}"
host = "{host}"
port = {port}
tls = "{tls}"
allow_insecure = true
ca_file = "{ca}"
tls_server_name = "{sn}"
auth = "{auth}"
poll_interval = "1s"
connect_timeout = "5s"
io_timeout = "30s"
max_transient_failures = 1000
{extra_profile}

[[mailboxes]]
name = "mb"
profile = "srv"
email = "{user}@example.test"
approval = "approved"
username = "{user}"
{password}
{extra_mailbox}
"#,
        state = dir.join("state").display(),
        kind = m.kind,
        host = env.host,
        port = m.port,
        tls = m.tls,
        ca = env.ca.display(),
        sn = env.server_name,
        auth = m.auth,
        user = m.user,
        // Empty: the mailbox brings its own credential (token_file) in extra_mailbox.
        password = if m.password.is_empty() {
            String::new()
        } else {
            format!("password = \"{}\"", m.password)
        },
        extra_profile = m.extra_profile,
        extra_mailbox = m.extra_mailbox,
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// The file of message `uid` in a user's INBOX (Maildir++), from
/// dovecot-uidlist; to make one message unreadable behind Dovecot's back.
pub fn inbox_message_file(env: &Env, user: &str, uid: u32) -> PathBuf {
    let dir = env.dir.join("mail").join(user).join("Maildir");
    let uidlist = std::fs::read_to_string(dir.join("dovecot-uidlist")).unwrap();
    let base = uidlist
        .lines()
        .skip(1)
        .find_map(|line| {
            let (head, base) = line.split_once(':')?;
            (head.split_whitespace().next()? == uid.to_string()).then(|| base.to_string())
        })
        .unwrap_or_else(|| panic!("UID {uid} not in {}", dir.display()));
    for sub in ["cur", "new"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.split(':').next() == Some(base.as_str()) {
                return p;
            }
        }
    }
    panic!("no file for UID {uid} ({base}) in {}", dir.display());
}

/// Sets a file's permission bits (Dovecot runs as `nobody`, so 0 makes a
/// message unreadable to it).
pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
