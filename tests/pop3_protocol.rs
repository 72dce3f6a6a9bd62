#![cfg(feature = "real-servers")]
//! POP3 client against the real Dovecot from shared/testservers (no mocks).
//!
//! Needs `source /tmp/crm-mailsync-testservers/env.sh` (or `eval "$(up.sh)"`); without
//! `POP3_PORT` every test fails (the real-servers feature promises the servers). Each test owns one
//! mailbox among user00081..user00090 so the tests can run in parallel.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crm_mailsync::connector::pop3::{Credentials, Pop3Client, Pop3Error};
use crm_mailsync::error::{Classify, Disposition};
use crm_mailsync::net::{Endpoint, NetError, TlsMode};

struct Env {
    host: String,
    port: u16,
    pop3s_port: u16,
    ca: PathBuf,
    server_name: String,
    password: String,
    token: String,
    scripts: PathBuf,
}

fn env() -> Option<Env> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let port = var("POP3_PORT")?
        .parse()
        .expect("POP3_PORT is a port number");
    Some(Env {
        host: var("POP3_HOST").unwrap_or_else(|| "127.0.0.1".into()),
        port,
        pop3s_port: var("POP3S_PORT")
            .expect("POP3S_PORT set with POP3_PORT")
            .parse()
            .expect("POP3S_PORT"),
        ca: var("TESTSERVERS_CA_CERT")
            .expect("TESTSERVERS_CA_CERT set")
            .into(),
        server_name: var("TESTSERVERS_TLS_SERVER_NAME").unwrap_or_else(|| "localhost".into()),
        password: var("TESTSERVERS_PASSWORD").unwrap_or_else(|| "secret".into()),
        token: var("TESTSERVERS_OAUTH_TOKEN").unwrap_or_else(|| "test-token".into()),
        scripts: scripts_dir(),
    })
}

/// shared/testservers: `$TESTSERVERS_SCRIPTS`, else next to the project (main crate:
/// `../shared`, this scratch crate: `../../shared`).
fn scripts_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TESTSERVERS_SCRIPTS") {
        return dir.into();
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        manifest.join("../shared/testservers"),
        manifest.join("../../shared/testservers"),
    ]
    .into_iter()
    .find(|p| p.join("deliver.sh").exists())
    .expect("shared/testservers not found; set TESTSERVERS_SCRIPTS")
}

macro_rules! env_or_skip {
    () => {
        match env() {
            Some(e) => e,
            None => {
                panic!("POP3_PORT not set: start ../shared/testservers/up.sh and source its env.sh (feature real-servers needs the servers)");
            }
        }
    };
}

impl Env {
    fn endpoint(&self, tls: TlsMode) -> Endpoint {
        Endpoint {
            host: self.host.clone(),
            port: if tls == TlsMode::Implicit {
                self.pop3s_port
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

    fn password(&self, user: &str) -> Credentials {
        Credentials::Password {
            user: user.into(),
            pass: self.password.clone(),
        }
    }

    /// Connects with `tls` and logs in with USER/PASS.
    async fn login(&self, tls: TlsMode, user: &str) -> Pop3Client {
        let mut c = Pop3Client::connect(&self.endpoint(tls))
            .await
            .expect("connect");
        c.login_user_pass(user, &self.password)
            .await
            .expect("login");
        c
    }

    fn script(&self, name: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(self.scripts.join(name));
        cmd
    }

    /// Empties the user's INBOX.
    fn clean(&self, user: &str) {
        let lib = self.scripts.join("lib.sh");
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#"source "$1" && ts_doveadm expunge -u "$2" mailbox INBOX all"#)
            .arg("clean")
            .arg(&lib)
            .arg(user)
            .output()
            .expect("run doveadm expunge");
        // A user that never logged in or got mail has no INBOX yet: nothing to clean.
        if !out.status.success() {
            eprintln!(
                "expunge {user}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }

    /// Stores `message` in the user's INBOX with deliver.sh (doveadm save).
    fn deliver(&self, user: &str, message: &[u8]) {
        let mut child = self
            .script("deliver.sh")
            .args([user, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("run deliver.sh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(message)
            .expect("write message");
        assert!(
            child.wait().expect("deliver.sh").success(),
            "deliver.sh failed"
        );
    }

    fn bulk_generate(&self, user: &str, n: u32) {
        let out = self
            .script("bulk-load.sh")
            .args([user, "--generate", &n.to_string()])
            .output()
            .expect("bulk-load");
        assert!(
            out.status.success(),
            "bulk-load.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@example.test>\nTo: rcpt@example.test\nSubject: {subject}\n\
         Date: Mon, 1 Dec 2025 10:00:00 +0000\nMessage-ID: <{subject}@example.test>\n\n{body}"
    )
    .into_bytes()
}

#[tokio::test]
async fn stls_user_pass_uidl_retr_byte_equal() {
    let env = env_or_skip!();
    let user = "user00081";
    env.clean(user);
    let plain = message("plain-lf", "Hello,\nthis is line two.\n\n-- \nSig\n");
    // Lines that must be dot-stuffed on the wire, including a lone "." that would end
    // the response early if the server did not stuff or we did not unstuff.
    let dots = message(
        "dots",
        ".hidden line\n..two dots\n.\n...\n. space\nlast line\n",
    );
    let crlf =
        b"From: a@example.test\r\nSubject: crlf\r\n\r\nCRLF body\r\n.starts with dot\r\n".to_vec();
    let sent = [plain, dots, crlf];
    for m in &sent {
        env.deliver(user, m);
    }

    let mut c = Pop3Client::connect(&env.endpoint(TlsMode::StartTls))
        .await
        .expect("connect with STLS");
    assert!(c.is_tls());
    assert!(
        c.greeting().contains("ready"),
        "greeting {:?}",
        c.greeting()
    );
    // Capabilities were re-read after TLS: STLS is no longer offered, SASL is.
    assert!(!c.capabilities().has("STLS"), "{:?}", c.capabilities());
    assert!(c.capabilities().has_sasl("PLAIN"));
    c.login_user_pass(user, &env.password)
        .await
        .expect("USER/PASS");
    assert!(c.capabilities().has("UIDL"));

    let (count, total) = c.stat().await.unwrap();
    assert_eq!(count, 3);
    let list = c.list_all().await.unwrap();
    let uidl = c.uidl_all().await.unwrap().expect("Dovecot supports UIDL");
    assert_eq!(list.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(uidl.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(list.iter().map(|m| m.1).sum::<u64>(), total);

    for ((msgno, size), want) in list.iter().zip(&sent) {
        let got = c.retr(*msgno, 1 << 20).await.unwrap();
        assert_eq!(
            got.len() as u64,
            *size,
            "LIST size = RETR bytes for {msgno}"
        );
        assert!(
            got.ends_with(b"\r\n") && !got.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
            "served CRLF"
        );
        assert_eq!(
            lf(&got),
            lf(want),
            "message {msgno} differs:\n{}",
            String::from_utf8_lossy(&got)
        );
    }
    // TOP 0: the header block only.
    let top = c.top(2, 0).await.unwrap();
    let raw_dots = c.retr(2, 1 << 20).await.unwrap();
    let header_end = raw_dots.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(top, &raw_dots[..header_end]);
    c.quit().await.unwrap();

    // UIDLs are stable across sessions (and over implicit TLS).
    let mut c = env.login(TlsMode::Implicit, user).await;
    assert_eq!(c.uidl_all().await.unwrap().unwrap(), uidl);
    c.quit().await.unwrap();
}

#[tokio::test]
async fn implicit_tls_and_auth_plain() {
    let env = env_or_skip!();
    let user = "user00083";
    env.clean(user);
    env.deliver(user, &message("implicit", "body\n"));
    let mut c = Pop3Client::connect(&env.endpoint(TlsMode::Implicit))
        .await
        .expect("POP3S");
    assert!(c.is_tls());
    c.auth_plain(user, &env.password).await.expect("AUTH PLAIN");
    assert_eq!(c.stat().await.unwrap().0, 1);
    assert_eq!(
        lf(&c.retr(1, 1 << 20).await.unwrap()),
        message("implicit", "body\n")
    );
    c.noop().await.unwrap();
    c.quit().await.unwrap();

    // authenticate() picks SASL PLAIN (listed by Dovecot) and works on STLS too.
    let mut c = Pop3Client::connect(&env.endpoint(TlsMode::StartTls))
        .await
        .unwrap();
    c.authenticate(&env.password(user))
        .await
        .expect("authenticate");
    assert_eq!(c.stat().await.unwrap().0, 1);
    c.quit().await.unwrap();
}

#[tokio::test]
async fn plaintext_mode_works_when_configured() {
    let env = env_or_skip!();
    let user = "user00090";
    let mut c = Pop3Client::connect(&env.endpoint(TlsMode::Plain))
        .await
        .expect("plain connect");
    assert!(!c.is_tls());
    c.authenticate(&env.password(user))
        .await
        .expect("login over plaintext");
    c.stat().await.unwrap();
    c.quit().await.unwrap();
}

#[tokio::test]
async fn xoauth2_token() {
    let env = env_or_skip!();
    let user = "user00085";
    let mut c = Pop3Client::connect(&env.endpoint(TlsMode::Implicit))
        .await
        .unwrap();
    c.auth_xoauth2(user, &env.token)
        .await
        .expect("XOAUTH2 with the test token");
    c.stat().await.unwrap();
    c.quit().await.unwrap();

    let mut c = Pop3Client::connect(&env.endpoint(TlsMode::StartTls))
        .await
        .unwrap();
    c.authenticate(&Credentials::OAuth2 {
        user: user.into(),
        token: env.token.clone(),
    })
    .await
    .expect("authenticate");
    c.quit().await.unwrap();

    let wrong = "wrong-token-0123456789";
    let mut c = Pop3Client::connect(&env.endpoint(TlsMode::Implicit))
        .await
        .unwrap();
    let err = c
        .auth_xoauth2(user, wrong)
        .await
        .expect_err("wrong token must fail");
    eprintln!("wrong token: {err}");
    assert!(matches!(err, Pop3Error::Auth { .. }), "{err:?}");
    assert_eq!(err.disposition(), Disposition::Permanent);
    assert!(!format!("{err} {err:?}").contains(wrong));
    // The challenge was answered, so the session is still in step.
    assert!(err.connection_usable());
    // The password is not a token.
    let err = c
        .auth_xoauth2(user, &env.password)
        .await
        .expect_err("password as token");
    assert_eq!(err.disposition(), Disposition::Permanent);
    assert!(!format!("{err} {err:?}").contains(&env.password));
    // The right token still works on the same connection.
    c.auth_xoauth2(user, &env.token)
        .await
        .expect("right token after failures");
    c.stat().await.unwrap();
    c.quit().await.unwrap();
}

#[tokio::test]
async fn wrong_password_is_permanent() {
    let env = env_or_skip!();
    let user = "user00086";
    let wrong = "not-the-password-42";
    let mut c = Pop3Client::connect(&env.endpoint(TlsMode::StartTls))
        .await
        .unwrap();
    let err = c
        .login_user_pass(user, wrong)
        .await
        .expect_err("USER/PASS with a wrong password");
    eprintln!("wrong password: {err}");
    assert!(
        matches!(&err, Pop3Error::Auth { code: Some(code), .. } if code == "AUTH"),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::Permanent);
    assert!(!format!("{err} {err:?}").contains(wrong));

    let err = c
        .auth_plain(user, wrong)
        .await
        .expect_err("AUTH PLAIN with a wrong password");
    assert!(matches!(err, Pop3Error::Auth { .. }), "{err:?}");
    assert_eq!(err.disposition(), Disposition::Permanent);
    assert!(!format!("{err} {err:?}").contains(wrong));
    // And the right password still works on the same connection.
    c.auth_plain(user, &env.password)
        .await
        .expect("right password after failures");
    c.quit().await.unwrap();
}

#[tokio::test]
async fn tls_without_test_ca_is_certificate_error() {
    let env = env_or_skip!();
    for tls in [TlsMode::Implicit, TlsMode::StartTls] {
        let mut ep = env.endpoint(tls);
        ep.ca_file = None;
        let err = Pop3Client::connect(&ep)
            .await
            .expect_err("untrusted certificate must fail");
        eprintln!("{tls:?} without CA: {err}");
        assert!(
            matches!(&err, Pop3Error::Net(NetError::Certificate { .. })),
            "{err:?}"
        );
        assert_eq!(err.disposition(), Disposition::Permanent);
        let text = err.to_string();
        assert!(
            text.contains("certificate problem")
                && text.contains("not signed by a trusted CA")
                && text.contains("ca_file"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn nothing_listening_is_transient() {
    let env = env_or_skip!();
    let mut ep = env.endpoint(TlsMode::Plain);
    ep.port = 1;
    let err = Pop3Client::connect(&ep)
        .await
        .expect_err("port 1 has no server");
    assert!(
        matches!(&err, Pop3Error::Net(NetError::Connect { .. })),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::Transient);
}

#[tokio::test]
async fn dele_and_quit_removes_message() {
    let env = env_or_skip!();
    let user = "user00087";
    env.clean(user);
    env.deliver(user, &message("keep", "keep me\n"));
    env.deliver(user, &message("delete", "delete me\n"));
    let mut c = env.login(TlsMode::Implicit, user).await;
    let before = c.uidl_all().await.unwrap().unwrap();
    assert_eq!(before.len(), 2);
    c.dele(2).await.unwrap();
    // A deleted message is gone for the rest of the session.
    assert!(matches!(
        c.retr(2, 1 << 20).await,
        Err(Pop3Error::Server { .. })
    ));
    c.quit().await.expect("QUIT commits");

    let mut c = env.login(TlsMode::Implicit, user).await;
    assert_eq!(c.uidl_all().await.unwrap().unwrap(), before[..1]);
    assert_eq!(
        lf(&c.retr(1, 1 << 20).await.unwrap()),
        message("keep", "keep me\n")
    );
    c.quit().await.unwrap();
}

#[tokio::test]
async fn dele_without_quit_keeps_message() {
    let env = env_or_skip!();
    let user = "user00088";
    env.clean(user);
    env.deliver(user, &message("one", "1\n"));
    env.deliver(user, &message("two", "2\n"));
    let mut c = env.login(TlsMode::Implicit, user).await;
    let before = c.uidl_all().await.unwrap().unwrap();
    c.dele(1).await.unwrap();
    c.dele(2).await.unwrap();
    drop(c); // connection closed without QUIT

    let mut c = env.login(TlsMode::Implicit, user).await;
    assert_eq!(c.uidl_all().await.unwrap().unwrap(), before);
    // RSET undoes DELE within a session as well.
    c.dele(1).await.unwrap();
    c.rset().await.unwrap();
    c.quit().await.unwrap();
    let mut c = env.login(TlsMode::Implicit, user).await;
    assert_eq!(c.stat().await.unwrap().0, 2);
    c.quit().await.unwrap();
}

#[tokio::test]
async fn retr_size_cap_keeps_connection_usable() {
    let env = env_or_skip!();
    let user = "user00089";
    env.clean(user);
    let mut body = String::new();
    for i in 0..600 {
        body.push_str(&format!(
            "{}line {i} of a large message body\n",
            if i % 7 == 0 { "." } else { "" }
        ));
    }
    let big = message("big", &body);
    let small = message("small", "small\n");
    env.deliver(user, &big);
    env.deliver(user, &small);

    let mut c = env.login(TlsMode::StartTls, user).await;
    let list = c.list_all().await.unwrap();
    let err = c.retr(1, 1000).await.expect_err("over the cap");
    match &err {
        Pop3Error::TooLarge {
            msgno: 1,
            size,
            cap: 1000,
        } => assert_eq!(*size, list[0].1),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(err.connection_usable());
    c.noop().await.expect("next command after TooLarge");
    assert_eq!(lf(&c.retr(2, 1000).await.unwrap()), small);
    // The exact size is allowed.
    assert_eq!(lf(&c.retr(1, list[0].1).await.unwrap()), big);
    c.quit().await.unwrap();
}

#[tokio::test]
async fn fetch_500_messages_over_pop3s() {
    let env = env_or_skip!();
    let user = "user00082";
    env.clean(user);
    let t = Instant::now();
    env.bulk_generate(user, 500);
    eprintln!("bulk-load 500: {:?}", t.elapsed());

    let t = Instant::now();
    let mut c = env.login(TlsMode::Implicit, user).await;
    let (count, total) = c.stat().await.unwrap();
    assert_eq!(count, 500);
    let uidl = c.uidl_all().await.unwrap().unwrap();
    let list = c.list_all().await.unwrap();
    assert_eq!(uidl.len(), 500);
    let mut ids: Vec<&str> = uidl.iter().map(|u| u.1.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 500, "UIDLs are unique");

    let mut bytes = 0u64;
    let mut message_ids = std::collections::HashSet::new();
    for ((msgno, _), (_, size)) in uidl.iter().zip(&list) {
        let m = c.retr(*msgno, 64 << 20).await.unwrap();
        assert_eq!(m.len() as u64, *size);
        let text = String::from_utf8_lossy(&m);
        let mid = text
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
            .expect("Message-ID");
        message_ids.insert(mid.to_owned());
        bytes += m.len() as u64;
    }
    c.quit().await.unwrap();
    assert_eq!(bytes, total);
    assert_eq!(message_ids.len(), 500);
    let secs = t.elapsed().as_secs_f64();
    eprintln!("POP3S: login + UIDL + LIST + 500 RETR ({bytes} bytes) in {secs:.2}s");
}
