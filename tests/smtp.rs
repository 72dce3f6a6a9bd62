//! SMTP submission and the Sent folder against the private test servers:
//! the sink over STARTTLS and implicit TLS (PLAIN and XOAUTH2), TLS and
//! plaintext policy, the scripted stand-in's 550/451, and APPEND/search on
//! alice's `Sent` folder (one copy however often it is filed).
#![cfg(feature = "real-servers")]

mod servers;
#[path = "support/smtp_stub.rs"]
mod smtp_stub;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_mailsync::config::Secret;
use crm_mailsync::connector::imap::{Credentials, ImapClient};
use crm_mailsync::connector::oauth::StaticToken;
use crm_mailsync::error::{Classify, Disposition};
use crm_mailsync::net::{Endpoint, TlsMode};
use crm_mailsync::outgoing::sent_copy::{SentFolder, MARKER_HEADER};
use crm_mailsync::outgoing::smtp::{SmtpClient, SmtpError, SmtpTarget};
use servers::*;
use smtp_stub::{Script, SmtpStub, Stage};

const USER: &str = "alice";
const SENT: &str = "Sent";

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} unset: start ../shared/testservers/up.sh"))
}

fn smtp_port(k: &str) -> u16 {
    var(k).parse().unwrap()
}

fn endpoint(port: u16, tls: TlsMode) -> Endpoint {
    let env = env();
    Endpoint {
        host: env.host.clone(),
        port,
        tls,
        tls_server_name: Some(env.server_name.clone()),
        ca_file: Some(env.ca.clone()),
        connect_timeout: Duration::from_secs(10),
        io_timeout: Duration::from_secs(20),
    }
}

fn password() -> Credentials {
    Credentials::Password {
        user: USER.into(),
        pass: PASSWORD.into(),
    }
}

fn target(endpoint: Endpoint, credentials: Credentials) -> SmtpTarget {
    SmtpTarget {
        endpoint,
        allow_insecure: false,
        credentials,
        token_provider: None,
        pool_size: 2,
        hello_name: Some("crm-mailsync.test".into()),
    }
}

/// Unique per call (tests run in parallel on one user).
fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{nanos}-{}", std::process::id())
}

/// A small message with our marker header; Message-ID without brackets returned.
fn outgoing_message(marker: &str, message_id: &str) -> Vec<u8> {
    format!(
        "From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: test {marker}\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{message_id}>\r\n{MARKER_HEADER}: {marker}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nHello from the CRM.\r\n.leading dot\r\n"
    )
    .into_bytes()
}

/// The sink's (.eml, .json) for the message with `message_id`.
fn sink_file(message_id: &str) -> (Vec<u8>, serde_json::Value) {
    let dir = PathBuf::from(var("TESTSERVERS_SMTP_OUT"));
    let needle = format!("<{message_id}>");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("eml") {
                continue;
            }
            let Ok(raw) = std::fs::read(&path) else {
                continue;
            };
            if String::from_utf8_lossy(&raw).contains(&needle) {
                let json = std::fs::read_to_string(path.with_extension("json")).unwrap();
                return (raw, serde_json::from_str(&json).unwrap());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{message_id} never reached the sink"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn send_and_check(client: &SmtpClient, listener: &str, tls: bool) {
    let id = unique("send");
    let message_id = format!("{id}@example.test");
    let message = outgoing_message(&id, &message_id);
    let to = vec![
        "bob@example.test".to_string(),
        "carol@example.test".to_string(),
    ];
    let reply = client
        .send("alice@example.test", &to, &message)
        .await
        .unwrap();
    assert_eq!(reply.code, 250, "{reply:?}");
    let (raw, json) = sink_file(&message_id);
    assert_eq!(raw, message, "the sink stores exactly our bytes");
    assert_eq!(json["mail_from"], "alice@example.test");
    assert_eq!(
        json["rcpt_tos"],
        serde_json::json!(["bob@example.test", "carol@example.test"])
    );
    assert_eq!(json["tls"], tls, "{json}");
    assert_eq!(json["listener"], listener, "{json}");
    assert_eq!(json["auth_login"], USER, "{json}");
}

#[tokio::test]
async fn starttls_with_password() {
    let client = SmtpClient::new(target(
        endpoint(smtp_port("SMTP_PORT"), TlsMode::StartTls),
        password(),
    ))
    .unwrap();
    send_and_check(&client, "smtp", true).await;
    // Pooled: a second message on the same client.
    send_and_check(&client, "smtp", true).await;
    client.test_connection().await.unwrap();
}

#[tokio::test]
async fn starttls_with_xoauth2_from_a_provider() {
    let mut t = target(
        endpoint(smtp_port("SMTP_PORT"), TlsMode::StartTls),
        Credentials::OAuth2 {
            user: USER.into(),
            token: String::new(),
        },
    );
    t.token_provider = Some(Arc::new(StaticToken::new(Secret::new(env().token), None)));
    let client = SmtpClient::new(t).unwrap();
    send_and_check(&client, "smtp", true).await;
}

#[tokio::test]
async fn implicit_tls_with_password_and_xoauth2() {
    let ep = endpoint(smtp_port("SMTPS_PORT"), TlsMode::Implicit);
    let client = SmtpClient::new(target(ep.clone(), password())).unwrap();
    send_and_check(&client, "smtps", true).await;
    let oauth = Credentials::OAuth2 {
        user: USER.into(),
        token: env().token,
    };
    let client = SmtpClient::new(target(ep, oauth)).unwrap();
    send_and_check(&client, "smtps", true).await;
    client.test_connection().await.unwrap();
}

#[tokio::test]
async fn untrusted_or_misnamed_certificate_is_permanent() {
    let msg = outgoing_message("x", "never@example.test");
    let to = ["bob@example.test".to_string()];
    for tls in [TlsMode::Implicit, TlsMode::StartTls] {
        let port = match tls {
            TlsMode::Implicit => smtp_port("SMTPS_PORT"),
            _ => smtp_port("SMTP_PORT"),
        };
        // System roots only: the test CA is unknown.
        let mut ep = endpoint(port, tls);
        ep.ca_file = None;
        let e = SmtpClient::new(target(ep, password()))
            .unwrap()
            .send("alice@example.test", &to, &msg)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SmtpError::Tls(t) if t.contains("ca_file")),
            "{e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Permanent);
        // Trusted CA, but the certificate is not for this name.
        let mut ep = endpoint(port, tls);
        ep.tls_server_name = Some("mail.example.invalid".into());
        let e = SmtpClient::new(target(ep, password()))
            .unwrap()
            .send("alice@example.test", &to, &msg)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SmtpError::Tls(t) if t.contains("mail.example.invalid")),
            "{e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Permanent);
    }
}

#[tokio::test]
async fn plaintext_only_with_allow_insecure() {
    let mut t = target(endpoint(smtp_port("SMTP_PORT"), TlsMode::Plain), password());
    let e = SmtpClient::new(t.clone()).unwrap_err();
    assert!(matches!(e, SmtpError::Config(_)), "{e:?}");
    assert!(e.to_string().contains("allow_insecure"), "{e}");
    t.allow_insecure = true;
    let client = SmtpClient::new(t).unwrap();
    send_and_check(&client, "smtp", false).await;
}

#[tokio::test]
async fn stand_in_rejections_and_deferrals_keep_the_server_text() {
    let msg = outgoing_message("x", "stub@example.test");
    let to = ["bob@example.test".to_string()];
    let plain = |port| {
        let mut ep = endpoint(port, TlsMode::Plain);
        ep.host = "127.0.0.1".into();
        let mut t = target(ep, password());
        t.allow_insecure = true;
        SmtpClient::new(t).unwrap()
    };
    let stub = SmtpStub::start(Script::reply(
        Stage::Rcpt,
        550,
        "5.1.1 <bob@example.test>: Recipient address rejected: User unknown",
    ))
    .await;
    let e = plain(stub.port)
        .send("alice@example.test", &to, &msg)
        .await
        .unwrap_err();
    assert_eq!(e.disposition(), Disposition::Permanent);
    assert_eq!(
        e.server_text(),
        "550 5.1.1 <bob@example.test>: Recipient address rejected: User unknown"
    );
    assert!(stub.messages().is_empty());

    let stub = SmtpStub::start(Script::reply(
        Stage::Data,
        451,
        "4.7.1 Greylisted, try again in 5 minutes",
    ))
    .await;
    let e = plain(stub.port)
        .send("alice@example.test", &to, &msg)
        .await
        .unwrap_err();
    assert!(matches!(e, SmtpError::Deferred { code: 451, .. }), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Transient);
    assert!(e.server_text().contains("Greylisted"), "{e}");
}

fn imap_endpoint() -> Endpoint {
    endpoint(env().imaps, TlsMode::Implicit)
}

fn sent_folder() -> SentFolder {
    SentFolder::new(imap_endpoint(), password(), None, SENT.into())
}

async fn imap() -> ImapClient {
    ImapClient::connect_and_authenticate(&imap_endpoint(), &password())
        .await
        .unwrap()
}

/// UIDs in Sent whose Message-ID is exactly `<message_id>`.
async fn copies(message_id: &str) -> Vec<u32> {
    let mut c = imap().await;
    c.examine(SENT).await.unwrap();
    let wanted = format!("<{message_id}>");
    let hits = c.search_header("Message-ID", &wanted).await.unwrap();
    let ids = c.fetch_message_ids(&hits).await.unwrap();
    ids.into_iter()
        .filter(|(_, m)| m.as_deref() == Some(wanted.as_str()))
        .map(|(u, _)| u)
        .collect()
}

#[tokio::test]
async fn filing_twice_leaves_one_seen_copy_found_by_marker_and_message_id() {
    let marker = unique("file");
    let message_id = format!("{marker}@example.test");
    let message = outgoing_message(&marker, &message_id);
    let sent = sent_folder();
    assert_eq!(sent.find(&marker, &message_id).await.unwrap(), None);
    // The first filing of a fresh email skips the search; a retry looks first.
    let first = sent
        .file(&marker, &message_id, &message, true)
        .await
        .unwrap();
    assert_eq!(first.message_id.as_deref(), Some(message_id.as_str()));
    let second = sent
        .file(&marker, &message_id, &message, false)
        .await
        .unwrap();
    assert_eq!(first, second);
    // Another connection (another process) files it again: still one.
    let third = sent_folder()
        .file(&marker, &message_id, &message, false)
        .await
        .unwrap();
    assert_eq!(first, third);
    assert_eq!(copies(&message_id).await, vec![first.uid]);

    let mut c = imap().await;
    c.examine(SENT).await.unwrap();
    let got = c.fetch_messages(&[first.uid]).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(got[0].flags.iter().any(|f| f == "\\Seen"), "{:?}", got[0]);
    assert_eq!(got[0].raw, message);

    // Found by either key alone, with or without brackets; not by a prefix.
    let fresh = sent_folder();
    assert_eq!(fresh.find(&marker, "").await.unwrap(), Some(first.clone()));
    assert_eq!(
        fresh.find("", &message_id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        fresh.find("", &format!("<{message_id}>")).await.unwrap(),
        Some(first.clone())
    );
    let prefix = &marker[..marker.len() - 1];
    assert_eq!(fresh.find(prefix, "").await.unwrap(), None);
    assert_eq!(
        fresh
            .find("no-such-marker", "no-such@example.test")
            .await
            .unwrap(),
        None
    );
    sent.close().await;
    fresh.close().await;
}

#[tokio::test]
async fn a_rewritten_message_id_is_read_back_through_the_marker() {
    let marker = unique("rewrite");
    let ours = format!("{marker}@example.test");
    let theirs = format!("{marker}.rewritten@provider.example");
    // The provider stored our message under its own Message-ID.
    let mut c = imap().await;
    let uid = c
        .append(SENT, &["\\Seen"], &outgoing_message(&marker, &theirs))
        .await
        .unwrap()
        .expect("Dovecot has UIDPLUS");
    let sent = sent_folder();
    let found = sent.find(&marker, &ours).await.unwrap().unwrap();
    assert_eq!(found.uid, uid);
    assert_eq!(found.message_id.as_deref(), Some(theirs.as_str()));
    // Filing it finds that copy instead of adding ours.
    let filed = sent
        .file(&marker, &ours, &outgoing_message(&marker, &ours), false)
        .await
        .unwrap();
    assert_eq!(filed, found);
    assert!(copies(&ours).await.is_empty());
}

#[tokio::test]
async fn append_with_and_without_literal_plus() {
    for disable in [false, true] {
        let mut c = imap().await;
        if disable {
            c.disable_capability("LITERAL+");
        }
        let marker = unique("append");
        let message_id = format!("{marker}@example.test");
        let message = outgoing_message(&marker, &message_id);
        let uid = c.append(SENT, &[], &message).await.unwrap().unwrap();
        c.examine(SENT).await.unwrap();
        assert_eq!(
            c.search_header(MARKER_HEADER, &marker).await.unwrap(),
            vec![uid]
        );
        let header = c.fetch_header(&[uid], MARKER_HEADER).await.unwrap();
        assert_eq!(header, vec![(uid, Some(marker.clone()))]);
        let got = c.fetch_messages(&[uid]).await.unwrap();
        assert_eq!(got[0].raw, message);
        assert!(!got[0].flags.iter().any(|f| f == "\\Seen"));
        // The connection is in step afterwards.
        c.noop().await.unwrap();
        c.logout().await.unwrap();
    }
    // A folder that does not exist: a permanent, named error.
    let mut c = imap().await;
    let e = c
        .append("No/Such/Folder", &[], b"Subject: x\r\n\r\nx\r\n")
        .await
        .unwrap_err();
    assert_eq!(e.disposition(), Disposition::Permanent, "{e:?}");
    // Quoting: a value with a quote and a backslash is searched, not a syntax error.
    c.examine(SENT).await.unwrap();
    assert!(c
        .search_header("Subject", "a \"quoted\" \\ value")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_dropped_connection_is_replaced_once() {
    let marker = unique("kick");
    let message_id = format!("{marker}@example.test");
    // bob, so the kick does not cut the other tests' sessions of alice.
    let bob = Credentials::Password {
        user: "bob".into(),
        pass: PASSWORD.into(),
    };
    let sent = SentFolder::new(imap_endpoint(), bob, None, SENT.into());
    let filed = sent
        .file(
            &marker,
            &message_id,
            &outgoing_message(&marker, &message_id),
            true,
        )
        .await
        .unwrap();
    // The server ends every session of the user (as an idle timeout would).
    // Dovecot lists a session a moment after login: kick until it is gone.
    let listed = || doveadm_out("who bob").contains("bob");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !listed() {
        assert!(Instant::now() < deadline, "bob's session never listed");
        std::thread::sleep(Duration::from_millis(50));
    }
    while listed() {
        assert!(Instant::now() < deadline, "bob's session not kicked");
        doveadm("kick bob");
        std::thread::sleep(Duration::from_millis(100));
    }
    let found = sent.find(&marker, &message_id).await.unwrap();
    assert_eq!(found, Some(filed));
}
