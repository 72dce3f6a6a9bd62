//! Unit tests of the SMTP client, most against the scripted stand-in.

use super::smtp_stub::{Action, Script, SmtpStub, Stage};
use super::*;

fn endpoint(port: u16, tls: TlsMode) -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port,
        tls,
        tls_server_name: None,
        ca_file: None,
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
    }
}

fn target(port: u16) -> SmtpTarget {
    SmtpTarget {
        endpoint: endpoint(port, TlsMode::Plain),
        allow_insecure: true,
        credentials: Credentials::Password {
            user: "alice".into(),
            pass: "hunter2".into(),
        },
        token_provider: None,
        pool_size: 2,
        hello_name: Some("client.test".into()),
    }
}

const MSG: &[u8] =
    b"From: a@example.test\r\nTo: b@example.test\r\nSubject: t\r\n\r\nHi\r\n.dot line\r\n";

async fn send_to(stub: &SmtpStub) -> Result<SmtpReply, SmtpError> {
    let client = SmtpClient::new(target(stub.port)).unwrap();
    client
        .send("a@example.test", &["b@example.test".into()], MSG)
        .await
}

#[test]
fn replies_and_failures_are_classified() {
    use Disposition::*;
    let cases = [
        (
            SmtpError::Rejected {
                code: 550,
                text: "no".into(),
            },
            Permanent,
        ),
        (
            SmtpError::Deferred {
                code: 451,
                text: "later".into(),
            },
            Transient,
        ),
        (SmtpError::Network("x".into()), Transient),
        (SmtpError::Timeout("x".into()), Transient),
        (SmtpError::Tls("x".into()), Permanent),
        (SmtpError::Auth("x".into()), Permanent),
        (SmtpError::AuthRetry("x".into()), Transient),
        (SmtpError::Config("x".into()), Permanent),
    ];
    for (e, want) in cases {
        assert_eq!(e.disposition(), want, "{e}");
    }
    let e = SmtpError::Rejected {
        code: 550,
        text: "5.1.1 user unknown".into(),
    };
    assert_eq!(e.server_text(), "550 5.1.1 user unknown");
    assert_eq!(
        SmtpError::Network("down".into()).server_text(),
        "SMTP connection failed: down"
    );
}

#[test]
fn tls_mode_selection() {
    // Plaintext needs allow_insecure; the TLS modes build with the system roots.
    let mut t = target(25);
    t.allow_insecure = false;
    let e = SmtpClient::new(t.clone()).unwrap_err();
    assert!(
        matches!(e, SmtpError::Config(_)) && e.to_string().contains("allow_insecure"),
        "{e}"
    );
    assert_eq!(e.disposition(), Disposition::Permanent);
    for mode in [TlsMode::StartTls, TlsMode::Implicit] {
        t.endpoint.tls = mode;
        let c = SmtpClient::new(t.clone()).unwrap();
        // STARTTLS is lettre's upgrade; implicit TLS is ours before the greeting.
        assert_eq!(c.shared.starttls.is_some(), mode == TlsMode::StartTls);
    }
    t.endpoint.tls = TlsMode::Plain;
    t.allow_insecure = true;
    assert!(SmtpClient::new(t.clone())
        .unwrap()
        .shared
        .starttls
        .is_none());
    // A CA file that is not there is a configuration error, not a send failure.
    t.endpoint.tls = TlsMode::Implicit;
    t.endpoint.ca_file = Some("/nonexistent/ca.pem".into());
    let e = SmtpClient::new(t).unwrap_err();
    assert!(
        matches!(e, SmtpError::Config(_)) && e.to_string().contains("ca.pem"),
        "{e}"
    );
}

#[test]
fn deadline_grows_with_recipients_and_size() {
    let c = SmtpClient::new(target(25)).unwrap();
    let base = c.deadline(1, 10);
    assert_eq!(base, Duration::from_secs(5 * 2 + 5 * 11));
    assert!(c.deadline(10, 10) > base);
    assert!(c.deadline(1, 50 << 20) > c.deadline(1, 10));
}

#[tokio::test]
async fn accepted_message_reports_the_reply_and_reuses_the_pool() {
    let stub = SmtpStub::start(Script::default()).await;
    let client = SmtpClient::new(target(stub.port)).unwrap();
    let to = vec!["b@example.test".to_string(), "c@example.test".to_string()];
    let reply = client.send("a@example.test", &to, MSG).await.unwrap();
    assert_eq!(reply.code, 250);
    assert!(reply.text.contains("queued as STUB1"), "{reply:?}");
    let reply = client.send("a@example.test", &to, MSG).await.unwrap();
    assert!(reply.text.contains("STUB2"), "{reply:?}");
    assert_eq!(stub.connections(), 1, "the pooled connection is reused");
    assert_eq!(
        stub.messages()[0],
        MSG,
        "exact bytes, dot-stuffing undone by the server"
    );
    let cmds = stub.commands();
    assert!(
        cmds.iter().any(|c| c.starts_with("AUTH PLAIN ")),
        "{cmds:?}"
    );
    assert!(cmds.iter().any(|c| c == "EHLO client.test"), "{cmds:?}");
    assert_eq!(cmds.iter().filter(|c| c.starts_with("RCPT TO:")).count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_stay_within_the_pool_size() {
    let stub = SmtpStub::start(Script::default()).await;
    let client = SmtpClient::new(target(stub.port)).unwrap();
    let sends = (0..24).map(|_| {
        let c = client.clone();
        tokio::spawn(async move {
            c.send("a@example.test", &["b@example.test".into()], MSG)
                .await
        })
    });
    for r in futures::future::join_all(sends).await {
        r.unwrap().unwrap();
    }
    assert_eq!(stub.messages().len(), 24);
    // Two transactions at a time; a third connection can be opening while
    // lettre's recycle task still parks a finished one (then it is closed).
    assert!(
        stub.max_open() <= 3,
        "{} connections at once",
        stub.max_open()
    );
}

#[tokio::test]
async fn rejection_at_rcpt_is_permanent_with_the_server_text() {
    let stub = SmtpStub::start(Script::reply(
        Stage::Rcpt,
        550,
        "5.1.1 <b@example.test>: Recipient address rejected",
    ))
    .await;
    let e = send_to(&stub).await.unwrap_err();
    assert_eq!(
        e,
        SmtpError::Rejected {
            code: 550,
            text: "5.1.1 <b@example.test>: Recipient address rejected".into()
        }
    );
    assert_eq!(e.disposition(), Disposition::Permanent);
    assert!(stub.messages().is_empty());
    assert!(!stub.commands().iter().any(|c| c == "DATA"));
}

#[tokio::test]
async fn deferral_at_data_is_transient_with_the_server_text() {
    let stub = SmtpStub::start(Script::reply(Stage::Data, 451, "4.3.0 Try again later")).await;
    let e = send_to(&stub).await.unwrap_err();
    assert_eq!(
        e,
        SmtpError::Deferred {
            code: 451,
            text: "4.3.0 Try again later".into()
        }
    );
    assert_eq!(e.disposition(), Disposition::Transient);
    assert_eq!(e.server_text(), "451 4.3.0 Try again later");
}

#[tokio::test]
async fn rejection_after_the_body_is_permanent() {
    let stub = SmtpStub::start(Script::reply(
        Stage::Dot,
        554,
        "5.7.1 Message refused as spam",
    ))
    .await;
    let e = send_to(&stub).await.unwrap_err();
    assert!(
        matches!(&e, SmtpError::Rejected { code: 554, text } if text.contains("spam")),
        "{e}"
    );
}

#[tokio::test]
async fn dropped_connection_is_transient() {
    for stage in [Stage::Greeting, Stage::Mail, Stage::Dot] {
        let stub = SmtpStub::start(Script::fault(stage, Action::Drop)).await;
        let e = send_to(&stub).await.unwrap_err();
        assert!(matches!(e, SmtpError::Network(_)), "{stage:?}: {e:?}");
        assert_eq!(e.disposition(), Disposition::Transient);
    }
    // Nobody listening at all.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = SmtpClient::new(target(port)).unwrap();
    let e = client
        .send("a@example.test", &["b@example.test".into()], MSG)
        .await
        .unwrap_err();
    assert_eq!(e.disposition(), Disposition::Transient, "{e:?}");
}

#[tokio::test]
async fn silent_server_times_out_and_the_pool_is_dropped() {
    let stub = SmtpStub::start(Script::fault(Stage::Dot, Action::Hang)).await;
    let mut t = target(stub.port);
    t.endpoint.io_timeout = Duration::from_millis(100);
    t.endpoint.connect_timeout = Duration::from_millis(100);
    let client = SmtpClient::new(t).unwrap();
    let started = std::time::Instant::now();
    let e = client
        .send("a@example.test", &["b@example.test".into()], MSG)
        .await
        .unwrap_err();
    assert!(matches!(e, SmtpError::Timeout(_)), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Transient);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        client.shared.idle.lock().unwrap().is_empty(),
        "the timed-out connection is not kept"
    );
    // The next attempt opens a new connection instead of reusing the stuck one.
    let _ = client
        .send("a@example.test", &["b@example.test".into()], MSG)
        .await;
    assert_eq!(stub.connections(), 2);
}

#[tokio::test]
async fn refused_login_is_permanent_unless_the_token_rotates() {
    let stub = SmtpStub::start(Script::reply(
        Stage::Auth,
        535,
        "5.7.8 Authentication credentials invalid",
    ))
    .await;
    let e = send_to(&stub).await.unwrap_err();
    assert!(
        matches!(&e, SmtpError::Auth(t) if t.contains("535 5.7.8")),
        "{e:?}"
    );
    assert_eq!(e.disposition(), Disposition::Permanent);
    assert!(!e.to_string().contains("hunter2"));
    assert!(!stub.commands().iter().any(|c| c.starts_with("MAIL")));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "tok-one\n").unwrap();
    let mut t = target(stub.port);
    t.credentials = Credentials::OAuth2 {
        user: "alice".into(),
        token: String::new(),
    };
    t.token_provider = Some(Arc::new(crate::connector::oauth::TokenFile::new(
        &file, None,
    )));
    let client = SmtpClient::new(t).unwrap();
    let e = client
        .send("a@example.test", &["b@example.test".into()], MSG)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SmtpError::AuthRetry(t) if t.contains("token file")),
        "{e:?}"
    );
    assert_eq!(e.disposition(), Disposition::Transient);
    assert!(!e.to_string().contains("tok-one"));
    // No token at all right now: also worth a retry.
    std::fs::remove_file(&file).unwrap();
    let e = client
        .send("a@example.test", &["b@example.test".into()], MSG)
        .await
        .unwrap_err();
    assert!(matches!(e, SmtpError::AuthRetry(_)), "{e:?}");
}

#[tokio::test]
async fn a_rotated_token_gets_a_new_connection() {
    use base64::Engine as _;
    let stub = SmtpStub::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "tok-one\n").unwrap();
    let mut t = target(stub.port);
    t.credentials = Credentials::OAuth2 {
        user: "alice".into(),
        token: String::new(),
    };
    t.token_provider = Some(Arc::new(crate::connector::oauth::TokenFile::new(
        &file, None,
    )));
    let client = SmtpClient::new(t).unwrap();
    let to = ["b@example.test".to_string()];
    client.send("a@example.test", &to, MSG).await.unwrap();
    client.send("a@example.test", &to, MSG).await.unwrap();
    assert_eq!(stub.connections(), 1);
    std::fs::write(&file, "tok-two\n").unwrap();
    client.send("a@example.test", &to, MSG).await.unwrap();
    assert_eq!(stub.connections(), 2, "a changed token means a new login");
    let logins: Vec<String> = stub
        .commands()
        .iter()
        .filter_map(|c| c.strip_prefix("AUTH XOAUTH2 "))
        .map(|b| {
            let raw = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
            String::from_utf8(raw).unwrap()
        })
        .collect();
    assert_eq!(
        logins,
        vec![
            "user=alice\x01auth=Bearer tok-one\x01\x01".to_string(),
            "user=alice\x01auth=Bearer tok-two\x01\x01".to_string()
        ]
    );
}

#[tokio::test]
async fn required_starttls_is_never_skipped() {
    for offer in [false, true] {
        let stub = SmtpStub::start(Script {
            offer_starttls: offer,
            ..Script::default()
        })
        .await;
        let mut t = target(stub.port);
        t.endpoint.tls = TlsMode::StartTls;
        t.allow_insecure = false;
        let client = SmtpClient::new(t).unwrap();
        let e = client
            .send("a@example.test", &["b@example.test".into()], MSG)
            .await
            .unwrap_err();
        if offer {
            // The stub answers STARTTLS with 454.
            assert!(matches!(e, SmtpError::Deferred { code: 454, .. }), "{e:?}");
        } else {
            assert!(
                matches!(&e, SmtpError::Tls(t) if t.contains("STARTTLS")),
                "{e:?}"
            );
            assert_eq!(e.disposition(), Disposition::Permanent);
        }
        let cmds = stub.commands();
        assert!(
            !cmds
                .iter()
                .any(|c| c.starts_with("AUTH") || c.starts_with("MAIL")),
            "{cmds:?}"
        );
    }
}

#[tokio::test]
async fn implicit_tls_to_a_plaintext_server_fails_without_sending() {
    let stub = SmtpStub::start(Script::default()).await;
    let mut t = target(stub.port);
    t.endpoint.tls = TlsMode::Implicit;
    t.endpoint.io_timeout = Duration::from_millis(500);
    let client = SmtpClient::new(t).unwrap();
    let e = client
        .send("a@example.test", &["b@example.test".into()], MSG)
        .await
        .unwrap_err();
    assert!(
        matches!(e, SmtpError::Network(_) | SmtpError::Timeout(_)),
        "{e:?}"
    );
    assert!(stub.commands().is_empty());
}

#[tokio::test]
async fn no_usable_auth_mechanism_is_permanent() {
    let stub = SmtpStub::start(Script {
        no_auth: true,
        ..Script::default()
    })
    .await;
    let e = send_to(&stub).await.unwrap_err();
    assert!(
        matches!(&e, SmtpError::Auth(t) if t.contains("PLAIN or LOGIN")),
        "{e:?}"
    );
}

#[tokio::test]
async fn invalid_envelope_is_a_permanent_error_before_connecting() {
    let stub = SmtpStub::start(Script::default()).await;
    let client = SmtpClient::new(target(stub.port)).unwrap();
    for (from, to) in [
        ("not an address", "b@example.test"),
        ("a@example.test", "b@"),
    ] {
        let e = client.send(from, &[to.to_string()], MSG).await.unwrap_err();
        assert!(matches!(e, SmtpError::Config(_)), "{e:?}");
    }
    let e = client.send("a@example.test", &[], MSG).await.unwrap_err();
    assert!(matches!(e, SmtpError::Config(_)), "{e:?}");
    assert_eq!(stub.connections(), 0);
}

#[tokio::test]
async fn test_connection_logs_in_and_quits() {
    let stub = SmtpStub::start(Script::default()).await;
    let client = SmtpClient::new(target(stub.port)).unwrap();
    client.test_connection().await.unwrap();
    // The QUIT is sent by lettre's recycle task.
    for _ in 0..50 {
        if stub.commands().iter().any(|c| c == "QUIT") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cmds = stub.commands();
    assert!(cmds.iter().any(|c| c.starts_with("AUTH PLAIN")), "{cmds:?}");
    assert!(cmds.iter().any(|c| c == "QUIT"), "{cmds:?}");
    let stub = SmtpStub::start(Script::reply(Stage::Auth, 535, "5.7.8 nope")).await;
    let client = SmtpClient::new(target(stub.port)).unwrap();
    let e = client.test_connection().await.unwrap_err();
    assert!(matches!(e, SmtpError::Auth(_)), "{e:?}");
}
