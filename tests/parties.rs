//! Party resolution end to end: a directory of 10,000+ records imported from
//! CSV through `records import`, 2,000 messages synced from Dovecot over
//! IMAP, every activity's parties compared with what the directory says
//! (the expectation is built with the directory, not computed by the
//! crate); records imported later resolve the parties left unknown, with
//! an `activity.updated` event each. User: user00160.
//!
//! The import command's own contract (every bad line reported, nothing
//! imported, exit 65; a locked store named) needs no server.

mod common;
#[cfg(feature = "real-servers")]
mod servers;

use std::path::Path;
use std::process::Output;

use common::*;

fn import(config: &Path, file: &Path, extra: &[&str]) -> Output {
    daemon_command()
        .args(["records", "import", "--config"])
        .arg(config)
        .args(extra)
        .arg(file)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn import_with_bad_lines_imports_nothing_and_lists_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("maildir");
    make_maildir(&maildir);
    let cfg = maildir_config(dir.path(), &maildir, free_port(), 10, "");
    let file = dir.path().join("records.csv");
    std::fs::write(
        &file,
        "kind,id,email,name\n\
contact,1,a@x.test,\"Doe, Jane\"\n\
Contact,2,b@x.test,B\n\
contact,3,c@x.test;nonsense,C\n\
lead,,d@x.test,D\n\
account,5,e@x.test,E\n",
    )
    .unwrap();
    let out = import(&cfg, &file, &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(65), "{stdout}{stderr}");
    for line in [3, 4, 5] {
        assert!(
            stderr.contains(&format!("records.csv:{line}: ")),
            "line {line}: {stderr}"
        );
    }
    assert!(
        stderr.contains("3 invalid line(s); nothing imported"),
        "{stderr}"
    );
    // Nothing imported: the valid lines count as new on the next import.
    let out = import(&cfg, &file, &["--skip-invalid"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("inserted=2 updated=0 unchanged=0 invalid_skipped=3"),
        "{stdout}"
    );
    // JSON lines too; the same records again are unchanged.
    let jsonl = dir.path().join("records.jsonl");
    std::fs::write(
        &jsonl,
        "{\"kind\":\"contact\",\"id\":\"1\",\"emails\":[\"a@x.test\"],\"name\":\"Doe, Jane\"}\n",
    )
    .unwrap();
    let out = import(&cfg, &jsonl, &[]);
    assert!(
        text(&out).0.contains("inserted=0 updated=0 unchanged=1"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn import_while_the_daemon_holds_the_store_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("maildir");
    make_maildir(&maildir);
    let admin = free_port();
    let cfg = maildir_config(dir.path(), &maildir, admin, 10, "");
    let file = dir.path().join("records.csv");
    std::fs::write(&file, "kind,id,email,name\ncontact,1,a@x.test,A\n").unwrap();
    let child = start(&cfg);
    wait_for(std::time::Duration::from_secs(20), "the daemon", || {
        activity_total(admin)
    });
    let out = import(&cfg, &file, &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("locked by a running daemon"), "{stderr}");
    assert!(
        stderr.contains("PUT /api/v1/records/{kind}/{id}"),
        "{stderr}"
    );
    stop(child);
}

#[cfg(feature = "real-servers")]
mod with_dovecot {
    use super::*;
    use crm_mailsync::model::EventKind;
    use crm_mailsync::store::{SledStore, Store};
    use servers::*;
    use std::collections::{BTreeMap, HashMap};
    use std::fmt::Write as _;
    use std::time::Duration;

    const USER: &str = "user00160";
    const CONTACTS: usize = 10_000;
    const MESSAGES: usize = 2_000;

    /// The directory as CSV, and what each address must resolve to
    /// (`None`: unresolved), decided here by construction.
    struct Directory {
        csv: String,
        expect: HashMap<String, Option<String>>,
        /// Address pools to draw messages from, by category.
        pools: Vec<Vec<String>>,
    }

    fn directory() -> Directory {
        let mut csv = String::from("kind,id,email,name,owner,email_enabled,user_number\n");
        let mut expect = HashMap::new();
        let mut pools: Vec<Vec<String>> = Vec::new();
        let mut pool = Vec::new();
        for i in 0..CONTACTS {
            let a = format!("contact{i}@customer.example");
            // Every 7th contact has a second address, given in mixed case.
            let emails = if i % 7 == 0 {
                let alt = format!("alt{i}@customer.example");
                expect.insert(alt.clone(), Some(format!("contact:c{i}")));
                pool.push(alt);
                format!("{a};Alt{i}@Customer.Example")
            } else {
                a.clone()
            };
            writeln!(
                csv,
                "contact,c{i},{emails},\"Contact {i}, Jr.\",u{},,",
                i % 20
            )
            .unwrap();
            expect.insert(a.clone(), Some(format!("contact:c{i}")));
            pool.push(a);
        }
        pools.push(pool);
        let mut users = Vec::new();
        for i in 0..20 {
            let a = format!("staff{i}@example.test");
            writeln!(csv, "user,u{i},{a},Staff {i},,true,{}", 100 + i).unwrap();
            expect.insert(a.clone(), Some(format!("user:u{i}")));
            users.push(a);
        }
        // A contact sharing a user's address: the user comes first.
        writeln!(csv, "contact,cs0,STAFF0@example.test,Staff twin,,,").unwrap();
        pools.push(users);
        let mut accounts = Vec::new();
        for i in 0..50 {
            let a = format!("info@acct{i}.example");
            writeln!(csv, "account,a{i},{a},\"Account \"\"{i}\"\"\",,,").unwrap();
            expect.insert(a.clone(), Some(format!("account:a{i}")));
            accounts.push(a);
        }
        // Accounts sharing a contact's address: the contact comes first.
        let mut shared = Vec::new();
        for i in 0..5 {
            writeln!(
                csv,
                "account,as{i},contact{i}@customer.example,Shared {i},,,"
            )
            .unwrap();
            shared.push(format!("contact{i}@customer.example"));
        }
        pools.push(accounts);
        pools.push(shared);
        let mut leads = Vec::new();
        for i in 0..100 {
            let a = format!("lead{i}@prospect.example");
            writeln!(csv, "lead,l{i},{a},Lead {i},,false,").unwrap();
            expect.insert(a.clone(), Some(format!("lead:l{i}")));
            leads.push(a);
        }
        pools.push(leads);
        writeln!(csv, "queue,q1,queue@example.test,Support queue,,,").unwrap();
        expect.insert("queue@example.test".into(), Some("queue:q1".into()));
        pools.push(vec!["queue@example.test".into()]);
        // Ties: two contacts with one address.
        let mut ties = Vec::new();
        for k in 0..5 {
            let a = format!("tie{k}@customer.example");
            writeln!(csv, "contact,tie{k}a,{a},Tie A,,,").unwrap();
            writeln!(csv, "contact,tie{k}b,{},Tie B,,,", a.to_uppercase()).unwrap();
            expect.insert(a.clone(), None);
            ties.push(a);
        }
        pools.push(ties);
        // More records on one address than max_matches (10).
        for j in 0..11 {
            writeln!(csv, "lead,lb{j},everyone@bulk.example,Bulk {j},,,").unwrap();
        }
        expect.insert("everyone@bulk.example".into(), None);
        // An address only a case carries: never a party.
        writeln!(csv, "case,k1,casebox@x.example,A case,,,").unwrap();
        expect.insert("casebox@x.example".into(), None);
        pools.push(vec![
            "everyone@bulk.example".into(),
            "casebox@x.example".into(),
        ]);
        let strangers: Vec<String> = (0..200)
            .map(|i| format!("stranger{i}@nowhere.example"))
            .collect();
        for s in &strangers {
            expect.insert(s.clone(), None);
        }
        pools.push(strangers);
        // Senders whose contacts are imported only after the sync.
        let late: Vec<String> = (0..20)
            .map(|i| format!("late{i}@customer.example"))
            .collect();
        for s in &late {
            expect.insert(s.clone(), None);
        }
        pools.push(late);
        expect.insert(format!("{USER}@example.test"), None);
        Directory { csv, expect, pools }
    }

    /// Weights of the pools above, in order.
    const WEIGHTS: [u32; 10] = [50, 8, 8, 3, 8, 2, 4, 3, 8, 3];

    fn pick(rng: &mut fastrand::Rng, d: &Directory) -> String {
        let total: u32 = WEIGHTS.iter().sum();
        let mut n = rng.u32(..total);
        let mut k = 0;
        while n >= WEIGHTS[k] {
            n -= WEIGHTS[k];
            k += 1;
        }
        let pool = &d.pools[k];
        let a = pool[rng.usize(..pool.len())].clone();
        // Case never matters.
        if rng.u8(..4) == 0 {
            a.to_uppercase()
        } else {
            a
        }
    }

    /// (role, address lower-cased) of one message, as the expectation.
    type Expected = Vec<(String, String)>;

    fn messages(d: &Directory) -> (String, BTreeMap<String, Expected>) {
        let mut rng = fastrand::Rng::with_seed(18);
        let mut mbox = String::new();
        let mut expected = BTreeMap::new();
        for i in 0..MESSAGES {
            let from = pick(&mut rng, d);
            let mut to = vec![format!("{USER}@example.test")];
            if rng.bool() {
                to.push(pick(&mut rng, d));
            }
            let cc: Vec<String> = (0..rng.usize(..3)).map(|_| pick(&mut rng, d)).collect();
            let mid = format!("party-{i}@test.example");
            let mut roles: Expected = Vec::new();
            for (role, list) in [
                ("from", std::slice::from_ref(&from)),
                ("to", &to[..]),
                ("cc", &cc[..]),
            ] {
                for a in list {
                    let entry = (role.to_string(), a.to_lowercase());
                    if !roles.contains(&entry) {
                        roles.push(entry);
                    }
                }
            }
            expected.insert(mid.clone(), roles);
            let name = if i % 3 == 0 { "Some One " } else { "" };
            let cc_line = if cc.is_empty() {
                String::new()
            } else {
                format!("Cc: {}\n", cc.join(", "))
            };
            write!(
                mbox,
                "From MAILER-DAEMON Thu Jan  1 10:00:00 2026\n\
From: {name}<{from}>\n\
To: {}\n\
{cc_line}\
Subject: Question {i}\n\
Date: Thu, 01 Jan 2026 10:{:02}:{:02} +0000\n\
Message-ID: <{mid}>\n\
\n\
Hello, message {i}.\n\
\n",
                to.join(", "),
                (i / 60) % 60,
                i % 60
            )
            .unwrap();
        }
        (mbox, expected)
    }

    fn parties_of(a: &serde_json::Value) -> Vec<(String, String, Option<String>)> {
        a["parties"]
            .as_array()
            .unwrap_or_else(|| panic!("no parties: {a}"))
            .iter()
            .map(|p| {
                (
                    p["role"].as_str().unwrap().to_string(),
                    p["address"].as_str().unwrap().to_string(),
                    p["record"].as_str().map(str::to_string),
                )
            })
            .collect()
    }

    #[test]
    fn two_thousand_messages_get_the_parties_the_directory_says() {
        let env = env();
        reset_user(USER);
        let d = directory();
        let (mbox, expected) = messages(&d);
        let dir = tempfile::tempdir().unwrap();
        let mbox_path = dir.path().join("mail.mbox");
        std::fs::write(&mbox_path, mbox).unwrap();
        let out = script(
            "bulk-load.sh",
            &["-f", "INBOX", USER, &mbox_path.display().to_string()],
        );
        assert_eq!(field(&out, "added").as_deref(), Some("2000"), "{out}");

        let admin = free_port();
        let cfg = server_config(
            &env,
            dir.path(),
            admin,
            &ServerMailbox {
                kind: "imap_smtp",
                port: env.imap,
                tls: "starttls",
                user: USER,
                password: PASSWORD,
                auth: "password",
                extra_profile: "batch_size = 250",
                extra_mailbox: "",
            },
        );
        let records = dir.path().join("directory.csv");
        std::fs::write(&records, &d.csv).unwrap();
        let out = import(&cfg, &records, &[]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let total_records = d.csv.lines().count() - 1;
        assert!(
            stdout.contains(&format!("inserted={total_records} updated=0 unchanged=0")),
            "{stdout}"
        );

        let child = start(&cfg);
        wait_for(Duration::from_secs(240), "2000 activities", || {
            activity_total(admin).filter(|n| *n >= MESSAGES as u64)
        });
        stop(child);
        let all = offline_activities(&cfg);
        assert_eq!(all.len(), MESSAGES);
        let mut late_ids = Vec::new();
        let mut checked = 0;
        for a in &all {
            let mid = a["message_ids"][0].as_str().unwrap();
            let want: Vec<(String, String, Option<String>)> = expected[mid]
                .iter()
                .map(|(role, addr)| (role.clone(), addr.clone(), d.expect[addr].clone()))
                .collect();
            let got = parties_of(a);
            assert_eq!(got, want, "{mid}: {a}");
            checked += got.len();
            // The reasons name the sender's resolution.
            let (_, sender, record) = &want[0];
            let line = format!(
                "sender {sender}: {}",
                record.clone().unwrap_or_else(|| "unresolved: ".into())
            );
            assert!(
                a["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r.as_str().unwrap().starts_with(&line)),
                "{line}: {a}"
            );
            // Unresolved parties say why, naming the candidates of a tie.
            for p in a["parties"].as_array().unwrap() {
                let addr = p["address"].as_str().unwrap();
                let note = p["note"].as_str().unwrap_or_default();
                if addr.starts_with("tie") {
                    let k = &addr[3..4];
                    assert!(
                        note.contains(&format!("contact:tie{k}a, contact:tie{k}b")),
                        "{note}"
                    );
                } else if addr == "everyone@bulk.example" {
                    assert!(note.contains("more than max_matches = 10"), "{note}");
                }
            }
            if want.iter().any(|(_, addr, _)| addr.starts_with("late")) {
                late_ids.push(a["id"].as_u64().unwrap());
            }
        }
        assert!(checked > 4_000, "only {checked} parties checked");
        assert!(!late_ids.is_empty());

        // Late resolution: the late senders' contacts arrive after the sync.
        let mut late_csv = String::from("kind,id,email,name\n");
        for i in 0..20 {
            writeln!(
                late_csv,
                "contact,late{i},LATE{i}@customer.example,Late {i}"
            )
            .unwrap();
        }
        let late_file = dir.path().join("late.csv");
        std::fs::write(&late_file, late_csv).unwrap();
        let out = import(&cfg, &late_file, &[]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stdout.contains(&format!("activities_resolved={}", late_ids.len())),
            "{stdout} (expected {})",
            late_ids.len()
        );
        let all = offline_activities(&cfg);
        for a in all
            .iter()
            .filter(|a| late_ids.contains(&a["id"].as_u64().unwrap()))
        {
            for (_, addr, record) in parties_of(a) {
                if let Some(i) = addr.strip_prefix("late") {
                    let i = i.split('@').next().unwrap();
                    assert_eq!(record, Some(format!("contact:late{i}")), "{a}");
                }
            }
        }
        // One activity.updated event with changes ["parties"] per activity.
        let store = SledStore::open(&dir.path().join("state").join("store")).unwrap_or_else(|e| {
            panic!("open the store: {e}");
        });
        let events = store.events_after(0, 0).unwrap();
        let mut updated: Vec<u64> = events
            .iter()
            .filter(|e| e.kind == EventKind::ActivityUpdated && e.changes == ["parties"])
            .map(|e| e.activity_id)
            .collect();
        updated.sort();
        late_ids.sort();
        assert_eq!(updated, late_ids);
    }
}
