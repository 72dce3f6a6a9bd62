//! Secrets never reach the log, whatever the log filter says: IMAP, POP3 and
//! SMTP logins at `trace` against the real Dovecot and SMTP sink, every log
//! line searched for the password, the token and their wire encodings.
#![cfg(feature = "real-servers")]

mod common;
mod servers;

use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use servers::*;

/// What must never appear in a log line: the secrets themselves and every
/// encoding a login sends them in (SASL PLAIN, LOGIN, XOAUTH2, OAUTHBEARER).
fn forbidden(users: &[&str], token: &str) -> Vec<String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut out = vec![
        PASSWORD.to_string(),
        token.to_string(),
        b64(PASSWORD),
        b64(token),
    ];
    for u in users {
        out.push(b64(&format!("\0{u}\0{PASSWORD}")));
        out.push(b64(&format!("{u}\0{u}\0{PASSWORD}")));
        out.push(b64(&format!("user={u}\x01auth=Bearer {token}\x01\x01")));
        out.push(format!("LOGIN {u} {PASSWORD}"));
        out.push(format!("LOGIN \"{u}\" \"{PASSWORD}\""));
    }
    out
}

/// `needle` in `line` as a word of its own: the password `secret` is also
/// part of identifiers such as rustls' `extended_master_secret_request`.
fn contains_word(line: &str, needle: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    line.match_indices(needle).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + needle.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

fn assert_no_secret(log: &str, forbidden: &[String]) {
    for (n, line) in log.lines().enumerate() {
        for f in forbidden {
            let found = if f == PASSWORD {
                contains_word(line, f)
            } else {
                line.contains(f.as_str())
            };
            assert!(!found, "log line {} contains {f:?}:\n{line}", n + 1);
        }
    }
}

fn mailbox(name: &str, profile: &str, user: &str, secret: &str) -> String {
    format!(
        r#"
[[mailboxes]]
name = "{name}"
profile = "{profile}"
email = "{user}@example.test"
approval = "approved"
username = "{user}"
password = "{secret}"
"#
    )
}

fn profile(name: &str, kind: &str, port: u16, auth: &str, env: &Env) -> String {
    format!(
        r#"
[[profiles]]
name = "{name}"
type = "{kind}"
host = "{host}"
port = {port}
tls = "plain"
allow_insecure = true
ca_file = "{ca}"
tls_server_name = "{sn}"
auth = "{auth}"
poll_interval = "1s"
connect_timeout = "5s"
io_timeout = "30s"
"#,
        host = env.host,
        ca = env.ca.display(),
        sn = env.server_name,
    )
}

/// The daemon with `log_level = "trace"` and `RUST_LOG=trace`: IMAP
/// AUTHENTICATE PLAIN and XOAUTH2, POP3 SASL PLAIN and XOAUTH2 (async-imap
/// used to log every command it sends at trace level, LOGIN and AUTHENTICATE
/// included).
#[test]
fn daemon_logins_at_trace_log_no_password_or_token() {
    let env = env();
    let users = ["alice", "bob", "carol", "queue-support"];
    for u in users {
        reset_user(u);
        deliver(u, "INBOX", &message(&format!("log-secrets-{u}")));
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let mut cfg = format!(
        r#"
[daemon]
state_dir = "{state}"
log_format = "json"
log_level = "trace"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:{admin}"
token = "integration-test-token"
"#,
        state = dir.path().join("state").display(),
    );
    cfg += &profile("imap-pw", "imap_smtp", env.imap, "password", &env);
    cfg += &profile("imap-oauth", "imap_smtp", env.imap, "oauth2", &env);
    cfg += &profile("pop-pw", "pop3_smtp", env.pop3, "password", &env);
    cfg += &profile("pop-oauth", "pop3_smtp", env.pop3, "oauth2", &env);
    cfg += &mailbox("a", "imap-pw", "alice", PASSWORD);
    cfg += &mailbox("b", "imap-oauth", "bob", &env.token);
    cfg += &mailbox("c", "pop-pw", "carol", PASSWORD);
    cfg += &mailbox("q", "pop-oauth", "queue-support", &env.token);
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log_path = dir.path().join("stderr.log");
    let child = daemon_command()
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    // One message per mailbox: all four logged in and synced.
    wait_for(Duration::from_secs(60), "4 activities", || {
        activity_total(admin).filter(|n| *n >= 4)
    });
    stop(child);
    let log = std::fs::read_to_string(&log_path).unwrap();
    // The filter really was `trace`: our own trace events are there.
    assert!(
        log.contains("\"level\":\"TRACE\""),
        "no trace lines:\n{log}"
    );
    assert!(log.contains("POP3 >"), "no POP3 trace lines:\n{log}");
    assert_no_secret(&log, &forbidden(&users, &env.token));
}

/// The library's own logins plus lettre's SMTP AUTH, under the subscriber
/// the daemon installs (`telemetry::init_logging`), with the filter at
/// `trace`. Run in a child process (a subscriber is global) whose stderr is
/// the log; the child is [`logins_under_our_subscriber`].
#[test]
fn library_and_smtp_logins_at_trace_log_no_password_or_token() {
    let env = env();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "logins_under_our_subscriber",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LOG_SECRETS_CHILD", "1")
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "child failed:\n{}\n{log}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("logins done"),
        "the child did not run its logins"
    );
    assert!(
        log.contains("\"level\":\"TRACE\""),
        "no trace lines:\n{log}"
    );
    assert_no_secret(&log, &forbidden(&["alice", "bob"], &env.token));
}

/// Child of the test above; does nothing unless `LOG_SECRETS_CHILD` is set.
#[test]
fn logins_under_our_subscriber() {
    if std::env::var_os("LOG_SECRETS_CHILD").is_none() {
        return;
    }
    use crm_mailsync::config::LogFormat;
    use crm_mailsync::connector::imap::ImapClient;
    use crm_mailsync::net::{Endpoint, TlsMode};
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    crm_mailsync::telemetry::init_logging(LogFormat::Json, "trace");
    let env = env();
    let smtp_port: u16 = std::env::var("SMTP_PORT").unwrap().parse().unwrap();
    let ep = Endpoint {
        host: env.host.clone(),
        port: env.imap,
        tls: TlsMode::Plain,
        tls_server_name: Some(env.server_name.clone()),
        ca_file: Some(env.ca.clone()),
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(30),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // IMAP LOGIN, AUTHENTICATE PLAIN, AUTHENTICATE XOAUTH2 and OAUTHBEARER.
        let c = ImapClient::connect(&ep).await.unwrap();
        c.login("alice", PASSWORD)
            .await
            .unwrap()
            .logout()
            .await
            .unwrap();
        let c = ImapClient::connect(&ep).await.unwrap();
        let s = c.authenticate_plain("alice", PASSWORD).await.unwrap();
        s.logout().await.unwrap();
        let c = ImapClient::connect(&ep).await.unwrap();
        let s = c.authenticate_xoauth2("bob", &env.token).await.unwrap();
        s.logout().await.unwrap();
        let c = ImapClient::connect(&ep).await.unwrap();
        let s = c.authenticate_oauthbearer("bob", &env.token).await.unwrap();
        s.logout().await.unwrap();

        // SMTP AUTH PLAIN, LOGIN and XOAUTH2 through lettre, as the outgoing side will
        // (STARTTLS: the sink accepts AUTH only under TLS).
        let ca = std::fs::read(&env.ca).unwrap();
        let tls = TlsParameters::builder(env.server_name.clone())
            .add_root_certificate(Certificate::from_pem(&ca).unwrap())
            .build_rustls()
            .unwrap();
        for (mech, user, secret) in [
            (Mechanism::Plain, "alice", PASSWORD),
            (Mechanism::Login, "alice", PASSWORD),
            (Mechanism::Xoauth2, "bob", env.token.as_str()),
        ] {
            let smtp = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(env.host.as_str())
                .port(smtp_port)
                .tls(Tls::Required(tls.clone()))
                .credentials(Credentials::new(user.into(), secret.into()))
                .authentication(vec![mech])
                .build();
            let msg = Message::builder()
                .from("alice@example.test".parse().unwrap())
                .to("customer@customer.example".parse().unwrap())
                .subject(format!("log-secrets {mech:?}"))
                .body(String::from("hello"))
                .unwrap();
            smtp.send(msg).await.unwrap();
        }
    });
    println!("logins done");
}
