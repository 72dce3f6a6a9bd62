//! Forward mailbox over IMAP against the real Dovecot: the ORIGINAL messages
//! become activities and the forwarded copies are deleted afterwards.
#![cfg(feature = "real-servers")]

mod common;
mod servers;

use std::time::Duration;

use common::*;
use servers::*;

#[test]
fn forward_mailbox_processes_originals_and_deletes() {
    let env = env();
    let user = "user00096";
    reset_user(user);
    let tag = std::process::id();
    let attached = format!(
        "From: Alice <alice@example.test>\r\nTo: crm-forward@example.test\r\nSubject: Fwd: Order {tag}\r\nMessage-ID: <wrap-{tag}@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nFYI\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: Customer <c@customer.example>\r\nTo: alice@example.test\r\nSubject: Order {tag}\r\nDate: Thu, 01 Jan 2026 10:00:00 +0000\r\nMessage-ID: <orig-a-{tag}@customer.example>\r\n\r\nPlease quote.\r\n--b--\r\n"
    );
    let redirected = format!(
        "X-Original-To: bob@example.test\r\nDelivered-To: crm-forward@example.test\r\nFrom: Other <o@customer.example>\r\nTo: bob@example.test\r\nSubject: Invoice {tag}\r\nDate: Thu, 01 Jan 2026 11:00:00 +0000\r\nMessage-ID: <orig-b-{tag}@customer.example>\r\n\r\nInvoice attached.\r\n"
    );
    deliver(user, "INBOX", attached.as_bytes());
    deliver(user, "INBOX", redirected.as_bytes());
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
            extra_profile: "",
            extra_mailbox: "incoming = \"forward_mailbox\"",
        },
    );
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "2 activities", || {
        activity_total(admin).filter(|n| *n >= 2)
    });
    wait_for(Duration::from_secs(30), "forwarded copies deleted", || {
        doveadm_out(&format!("search -u {user} mailbox INBOX all"))
            .trim()
            .is_empty()
            .then_some(())
    });
    stop(child);
    let all = offline_activities(&cfg);
    let mut ids: Vec<String> = all
        .iter()
        .map(|a| a["message_ids"][0].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            format!("orig-a-{tag}@customer.example"),
            format!("orig-b-{tag}@customer.example")
        ],
        "{all:?}"
    );
}

/// Each original is attributed to the user whose rule forwarded it, and a
/// sender cannot fake that attribution by writing the header into a mail sent
/// to an ordinary mailbox.
#[test]
fn forwarded_originals_are_attributed_to_the_forwarding_user() {
    let env = env();
    let user = "user00097";
    reset_user(user);
    let tag = std::process::id();
    let redirected = format!(
        "X-Original-To: carol@example.test\r\nDelivered-To: crm-forward@example.test\r\nFrom: Other <o@customer.example>\r\nTo: carol@example.test\r\nSubject: Attributed {tag}\r\nDate: Thu, 01 Jan 2026 11:00:00 +0000\r\nMessage-ID: <attr-{tag}@customer.example>\r\n\r\nHello.\r\n"
    );
    deliver(user, "INBOX", redirected.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let mailbox = |forward: bool| ServerMailbox {
        kind: "imap_smtp",
        port: env.imap,
        tls: "starttls",
        user,
        password: PASSWORD,
        auth: "password",
        extra_profile: "",
        extra_mailbox: if forward {
            "incoming = \"forward_mailbox\""
        } else {
            ""
        },
    };
    let cfg = server_config(&env, dir.path(), admin, &mailbox(true));
    let child = start(&cfg);
    wait_for(Duration::from_secs(30), "1 activity", || {
        activity_total(admin).filter(|n| *n >= 1)
    });
    stop(child);
    let all = offline_activities(&cfg);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["forwarded_by"], "carol@example.test", "{all:?}");

    // An ordinary mailbox ignores a forged header.
    let forged = format!(
        "X-CRM-Forwarded-By: mallory@evil.example\r\nFrom: Mallory <m@evil.example>\r\nTo: {user}@example.test\r\nSubject: Forged {tag}\r\nDate: Thu, 01 Jan 2026 12:00:00 +0000\r\nMessage-ID: <forged-{tag}@evil.example>\r\n\r\nHi.\r\n"
    );
    deliver(user, "INBOX", forged.as_bytes());
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = server_config(&env, dir2.path(), admin, &mailbox(false));
    let child = start(&cfg2);
    wait_for(Duration::from_secs(30), "forged activity", || {
        activity_total(admin).filter(|n| *n >= 1)
    });
    stop(child);
    let all = offline_activities(&cfg2);
    let forged = all
        .iter()
        .find(|a| a["subject"].as_str().unwrap().starts_with("Forged"))
        .unwrap();
    assert!(forged["forwarded_by"].is_null(), "{forged}");
}
