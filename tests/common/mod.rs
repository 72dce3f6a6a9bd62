//! Helpers shared by the integration tests: running the real binary, a tiny
//! HTTP client for the admin API, and generated Maildir content.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "integration-test-token";

/// Path of the compiled daemon.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_crm-mailsync"))
}

/// A TCP port that is free right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Writes a config for one Maildir mailbox.
pub fn maildir_config(
    dir: &Path,
    maildir: &Path,
    port: u16,
    batch_size: usize,
    extra_mailbox: &str,
) -> PathBuf {
    let cfg = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "warn"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"

[[profiles]]
name = "local"
type = "maildir"
poll_interval = "1s"
batch_size = {batch_size}

[[mailboxes]]
name = "support"
profile = "local"
email = "support@example.test"
approval = "approved"
path = "{maildir}"
{extra_mailbox}
"#,
        state = dir.join("state").display(),
        maildir = maildir.display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// The deployment id every test daemon runs as (through the environment,
/// which overrides the file): test binaries share the Dovecot users, and a
/// fresh state directory per test would otherwise be a new deployment that
/// the marker an earlier test left refuses. tests/deployment_marker.rs sets
/// its own ids.
pub const TEST_DEPLOYMENT_ID: &str = "crm-mailsync-integration-tests";

/// The environment variable that sets `[daemon] deployment_id`.
pub const DEPLOYMENT_ID_ENV: &str = "CRM_MAILSYNC__DAEMON__DEPLOYMENT_ID";

/// A `crm-mailsync` command as the tests run it (see [`TEST_DEPLOYMENT_ID`]).
pub fn daemon_command() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env(DEPLOYMENT_ID_ENV, TEST_DEPLOYMENT_ID);
    cmd
}

/// Starts `crm-mailsync run`.
pub fn start(config: &Path) -> Child {
    daemon_command()
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A daemon started by a test: `stop` ends it with SIGTERM (asserting a
/// clean exit); a test that fails first kills it on drop, so no daemon is
/// left syncing (and deleting from) its mailboxes.
pub struct Running(pub Option<Child>);

impl Running {
    pub fn stop(&mut self) {
        if let Some(child) = self.0.take() {
            stop(child);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends SIGTERM and waits for a clean exit.
pub fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "daemon exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Minimal HTTP/1.1 GET: (status, body). None while nothing listens.
pub fn get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // The admin API answers small bodies; undo chunked encoding if used.
    Some((status, dechunk(&body)))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size_line, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(size) = usize::from_str_radix(size_line.trim(), 16) else {
            return body.to_string();
        };
        if size == 0 {
            return out;
        }
        if after.len() < size {
            return body.to_string();
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

/// GET returning parsed JSON (panics on non-200).
pub fn get_json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) =
        get(port, path, Some(TOKEN)).unwrap_or_else(|| panic!("no answer for {path}"));
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Waits until `f` returns Some, or panics after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Total activities according to the API, if it answers.
pub fn activity_total(port: u16) -> Option<u64> {
    let (status, body) = get(port, "/api/v1/activities?limit=1", Some(TOKEN))?;
    if status != 200 {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(&body).ok()?["total"].as_u64()
}

/// Creates an empty Maildir.
pub fn make_maildir(root: &Path) {
    for d in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
}

/// Writes `n` generated messages into `root/new`: threads of up to 5, replies
/// carrying In-Reply-To/References and quoting their parent.
pub fn generate_messages(root: &Path, n: usize) {
    make_maildir(root);
    for i in 0..n {
        let thread = i / 5;
        let pos = i % 5;
        let mut headers = format!(
            "Message-ID: <gen-{i}@example.test>\nDate: Mon, 05 Jan 2026 10:{:02}:{:02} +0000\nFrom: Person {thread} <p{thread}@customer.example>\nTo: support@example.test\nSubject: {}Order {thread} question\n",
            (i / 60) % 60,
            i % 60,
            if pos > 0 { "Re: " } else { "" }
        );
        if pos > 0 {
            let parent = i - 1;
            let refs: Vec<String> = (i - pos..i)
                .map(|k| format!("<gen-{k}@example.test>"))
                .collect();
            headers.push_str(&format!(
                "In-Reply-To: <gen-{parent}@example.test>\nReferences: {}\n",
                refs.join(" ")
            ));
        }
        let body = format!("Hello,\n\nthis is message {i} of thread {thread}.\nLorem ipsum dolor sit amet, consectetur adipiscing elit.\n\n> quoted text of message {}\n", i.saturating_sub(1));
        let name = format!("{}.M{:06}P1.gen", 1_767_000_000 + i, i);
        std::fs::write(root.join("new").join(name), format!("{headers}\n{body}")).unwrap();
    }
}

/// Runs `crm-mailsync activities list --json` and returns the parsed lines.
pub fn offline_activities(config: &Path) -> Vec<serde_json::Value> {
    let out = daemon_command()
        .args(["activities", "list", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "activities list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The admin port a config listens on (`listen = "127.0.0.1:<port>"`).
pub fn admin_port(cfg: &Path) -> u16 {
    let text = std::fs::read_to_string(cfg).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("listen = \"127.0.0.1:"))
        .unwrap();
    line.trim_end_matches('"')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Minimal HTTP/1.1 request with the admin token and a JSON body:
/// (status, JSON; `Null` when the body is not JSON).
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Every activity, newest first, through the API's pages.
pub fn all_activities(port: u16) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/api/v1/activities?limit=1000&before={b}"),
            None => "/api/v1/activities?limit=1000".to_string(),
        };
        let page = get_json(port, &path);
        out.extend(page["activities"].as_array().unwrap().iter().cloned());
        match page["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => return out,
        }
    }
}
