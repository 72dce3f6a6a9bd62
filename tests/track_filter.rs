//! Track filters (one test per value) and the approval rule, against the
//! real Dovecot: a handful of messages each, records imported through
//! `records import`, the daemon syncing over IMAP. Users: user00161 …
//! user00166. Config-only checks (queue mailboxes, the deprecated
//! spelling) need no server.

mod common;
#[cfg(feature = "real-servers")]
mod servers;

use std::path::Path;

use common::*;

fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let out = daemon_command()
        .args(["check-config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn maildir_mailbox(extra: &str) -> String {
    format!(
        r#"
[daemon]
state_dir = "/tmp/unused-track-filter-state"
[admin]
enabled = false
[[profiles]]
name = "local"
type = "maildir"
[[mailboxes]]
name = "m"
profile = "local"
email = "m@example.test"
path = "/tmp/unused-track-filter-maildir"
{extra}
"#
    )
}

#[test]
fn queues_allow_only_all_and_responses() {
    for track in ["from_crm_records", "from_email_enabled_records", "none"] {
        let (ok, text) = check_config(&maildir_mailbox(&format!(
            "owner_kind = \"queue\"\ntrack = \"{track}\""
        )));
        assert!(!ok, "{track}: {text}");
        assert!(text.contains("mailboxes[0].track"), "{text}");
        assert!(
            text.contains("allowed: all, responses_to_crm_email"),
            "{text}"
        );
    }
    for track in ["all", "responses_to_crm_email", "responses_only"] {
        let (ok, text) = check_config(&maildir_mailbox(&format!(
            "owner_kind = \"queue\"\ntrack = \"{track}\""
        )));
        assert!(ok, "{track}: {text}");
    }
    let (ok, text) = check_config(&maildir_mailbox("track = \"from_contacts\""));
    assert!(!ok && text.contains("from_crm_records"), "{text}");
}

/// Imports a records file through the binary.
fn import(config: &Path, file: &Path) -> String {
    let out = daemon_command()
        .args(["records", "import", "--config"])
        .arg(config)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "records import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(feature = "real-servers")]
mod with_dovecot {
    use super::*;
    use servers::*;
    use std::collections::HashMap;
    use std::time::Duration;

    /// The messages of every filter test, by tag: what they are.
    /// P: parent, in the tracked folder, unknown sender.
    /// R: reply to P, unknown sender.
    /// C: from a contact. U: from a user. M: from a contact that is not
    /// email-enabled. X: from nobody known. T: from an address two
    /// contacts share (a tie: unresolved, still "from a contact").
    const TAGS: [&str; 7] = ["P", "R", "C", "U", "M", "X", "T"];

    const RECORDS: &str = r#"{"kind":"contact","id":"c1","name":"Carla","email":"carla@customer.example"}
{"kind":"user","id":"u1","name":"Uwe","emails":["uwe@example.test"],"user_number":7}
{"kind":"contact","id":"m1","name":"Mute","emails":["mute@customer.example"],"email_enabled":false}
{"kind":"contact","id":"t1","name":"Tie 1","emails":["tie@customer.example"]}
{"kind":"contact","id":"t2","name":"Tie 2","emails":["TIE@customer.example"]}
"#;

    fn sender(tag: &str) -> &'static str {
        match tag {
            "C" => "Carla <Carla@Customer.Example>",
            "U" => "uwe@example.test",
            "M" => "mute@customer.example",
            "T" => "tie@customer.example",
            _ => "stranger@nowhere.example",
        }
    }

    fn message(user: &str, run: &str, tag: &str) -> Vec<u8> {
        let reply = if tag == "R" {
            format!("In-Reply-To: <P-{run}@x.example>\r\nReferences: <P-{run}@x.example>\r\nSubject: Re: Offer {run}\r\n")
        } else {
            format!("Subject: Note {tag} {run}\r\n")
        };
        format!(
            "From: {}\r\nTo: {user}@example.test\r\nDate: Thu, 01 Jan 2026 10:00:00 +0000\r\nMessage-ID: <{tag}-{run}@x.example>\r\n{reply}\r\nHello {tag}.\r\n",
            sender(tag)
        )
        .into_bytes()
    }

    /// Delivers the seven messages, imports the records, syncs; returns
    /// tag → activity.
    fn sync_with(user: &str, mailbox_extra: &str) -> HashMap<String, serde_json::Value> {
        let env = env();
        reset_user(user);
        let run = format!("{}-{}", std::process::id(), fastrand::u32(..));
        deliver(user, "INBOX/T1", &message(user, &run, "P"));
        // INTERNALDATE has one-second resolution: the reply comes later.
        std::thread::sleep(Duration::from_millis(1100));
        for tag in &TAGS[1..] {
            deliver(user, "INBOX", &message(user, &run, tag));
        }
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
                extra_mailbox: &format!(
                    "tracked_folders = [{{ folder = \"INBOX/T1\", regarding = \"account:t1\" }}]\n{mailbox_extra}"
                ),
            },
        );
        let records = dir.path().join("records.jsonl");
        std::fs::write(&records, RECORDS).unwrap();
        let out = import(&cfg, &records);
        assert!(out.contains("inserted=5"), "{out}");
        let child = start(&cfg);
        wait_for(Duration::from_secs(60), "7 activities", || {
            activity_total(admin).filter(|n| *n >= 7)
        });
        stop(child);
        let all = offline_activities(&cfg);
        assert_eq!(all.len(), 7, "{all:?}");
        all.into_iter()
            .map(|a| {
                let mid = a["message_ids"][0].as_str().unwrap().to_string();
                (mid.split('-').next().unwrap().to_string(), a)
            })
            .collect()
    }

    /// Syncs under `track` and checks which tags were skipped, and that each
    /// skipped one says why, naming the filter.
    fn check(user: &str, track: &str, skipped: &[&str]) -> HashMap<String, serde_json::Value> {
        let got = sync_with(user, &format!("track = \"{track}\""));
        for tag in TAGS {
            let a = &got[tag];
            let was_skipped = a["method"] == "skipped";
            assert_eq!(
                was_skipped,
                skipped.contains(&tag),
                "{track}: message {tag}: {a}"
            );
            if was_skipped {
                let why = a["reasons"][0].as_str().unwrap();
                assert!(
                    why.starts_with(&format!("track filter is {track}")),
                    "{why}"
                );
                assert!(a["regarding"].is_null());
            }
            // Every activity says how its sender resolved.
            let reasons: Vec<&str> = a["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect();
            assert!(
                reasons.iter().any(|r| r.starts_with("sender ")),
                "{reasons:?}"
            );
        }
        // Folder tracking wins under every filter; the reply follows it
        // unless nothing is tracked.
        assert_eq!(got["P"]["method"], "folder");
        assert_eq!(got["P"]["regarding"], "account:t1");
        if track != "none" {
            assert_eq!(got["R"]["method"], "in_reply_to", "{}", got["R"]);
            assert_eq!(got["R"]["regarding"], "account:t1");
        }
        // Parties are stored whatever the filter decided.
        assert_eq!(got["C"]["parties"][0]["record"], "contact:c1");
        assert!(got["T"]["parties"][0]["record"].is_null());
        assert!(got["T"]["parties"][0]["note"]
            .as_str()
            .unwrap()
            .contains("contact:t1, contact:t2"));
        got
    }

    #[test]
    fn track_all() {
        check("user00161", "all", &[]);
    }

    #[test]
    fn track_responses_to_crm_email() {
        check(
            "user00162",
            "responses_to_crm_email",
            &["C", "U", "M", "X", "T"],
        );
    }

    #[test]
    fn track_from_crm_records() {
        let got = check("user00163", "from_crm_records", &["U", "X"]);
        let why = got["U"]["reasons"][0].as_str().unwrap();
        assert!(why.contains("uwe@example.test is user:u1"), "{why}");
    }

    #[test]
    fn track_from_email_enabled_records() {
        let got = check("user00164", "from_email_enabled_records", &["M", "X"]);
        let why = got["M"]["reasons"][0].as_str().unwrap();
        assert!(why.contains("mute@customer.example is contact:m1"), "{why}");
    }

    #[test]
    fn track_none() {
        check("user00165", "none", &["R", "C", "U", "M", "X", "T"]);
    }

    /// `process_only_approved` (default on): a mailbox whose address is not
    /// approved processes none of its mail; the API shows why, and one
    /// Information alert says so, aggregated across restarts. Approved, the
    /// same mail syncs and the alert is resolved.
    #[test]
    fn unapproved_mailbox_processes_nothing() {
        let env = env();
        let user = "user00166";
        reset_user(user);
        let run = format!("{}-{}", std::process::id(), fastrand::u32(..));
        for tag in ["C", "X"] {
            deliver(user, "INBOX", &message(user, &run, tag));
        }
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
                extra_mailbox: "",
            },
        );
        let approved = std::fs::read_to_string(&cfg).unwrap();
        let pending = approved.replace("approval = \"approved\"", "approval = \"pending\"");
        assert_ne!(approved, pending);
        std::fs::write(&cfg, &pending).unwrap();
        for round in 1..=2u64 {
            let child = start(&cfg);
            let mb = wait_for(Duration::from_secs(20), "mailbox view", || {
                let (status, body) = get(admin, "/api/v1/mailboxes/mb", Some(TOKEN))?;
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                (status == 200 && v["phase"] == "not_approved").then_some(v)
            });
            let why = mb["not_processing_reason"].as_str().unwrap();
            assert!(
                why.contains(&format!("{user}@example.test is not approved")),
                "{mb}"
            );
            assert!(why.contains("pending") && why.contains("process_only_approved"));
            // Well past a poll interval: still nothing processed.
            std::thread::sleep(Duration::from_secs(3));
            assert_eq!(activity_total(admin), Some(0));
            let alerts = get_json(admin, "/api/v1/alerts");
            let about: Vec<&serde_json::Value> = alerts["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["text"].as_str().unwrap().contains("is not approved"))
                .collect();
            assert_eq!(about.len(), 1, "{alerts}");
            assert_eq!(about[0]["level"], "information");
            assert_eq!(about[0]["count"], round, "{alerts}");
            stop(child);
        }
        std::fs::write(&cfg, &approved).unwrap();
        let child = start(&cfg);
        wait_for(Duration::from_secs(30), "2 activities", || {
            activity_total(admin).filter(|n| *n >= 2)
        });
        let mb = get_json(admin, "/api/v1/mailboxes/mb");
        assert!(mb["not_processing_reason"].is_null(), "{mb}");
        let alerts = get_json(admin, "/api/v1/alerts");
        let open = alerts["alerts"].as_array().unwrap().iter().any(|a| {
            a["text"].as_str().unwrap().contains("is not approved") && a["resolved_at"].is_null()
        });
        assert!(!open, "{alerts}");
        stop(child);
    }
}
