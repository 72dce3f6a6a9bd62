//! Reloading the configuration of the running daemon: `crm-mailsync reload`,
//! `POST /api/v1/reload` and SIGHUP. New mailboxes start, removed ones stop,
//! changed ones restart, and the others keep running undisturbed (same task,
//! same IMAP session); Test & Enable jobs survive; a change to `[crm]`
//! restarts everything; an invalid file is refused with every error and
//! nothing changes.

mod common;
#[cfg(feature = "real-servers")]
mod servers;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A config with Maildir mailboxes `(name, path)`; `extra` is appended.
fn write_config(
    dir: &Path,
    port: u16,
    mailboxes: &[(&str, &Path)],
    extra: &str,
) -> std::path::PathBuf {
    let mut cfg = format!(
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
"#,
        state = dir.join("state").display(),
    );
    for (name, path) in mailboxes {
        cfg.push_str(&format!(
            "\n[[mailboxes]]\nname = \"{name}\"\nprofile = \"local\"\nemail = \"{name}@example.test\"\napproval = \"approved\"\npath = \"{}\"\n",
            path.display()
        ));
    }
    cfg.push_str(extra);
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn mailbox_names(port: u16) -> Option<Vec<String>> {
    let (status, body) = get(port, "/api/v1/mailboxes", Some(TOKEN))?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    Some(
        v["mailboxes"]
            .as_array()?
            .iter()
            .map(|m| m["name"].as_str().unwrap_or("").to_string())
            .collect(),
    )
}

fn wait_total(port: u16, n: u64) {
    wait_for(Duration::from_secs(30), &format!("{n} activities"), || {
        (activity_total(port) == Some(n)).then_some(())
    });
}

fn one_more(maildir: &Path, tag: &str) {
    std::fs::write(
        maildir.join("new").join(format!("1769000000.{tag}.gen")),
        format!("Message-ID: <{tag}@example.test>\nFrom: x@customer.example\nTo: y@example.test\nSubject: {tag}\n\nhello\n"),
    )
    .unwrap();
}

fn cli_reload(cfg: &Path) -> std::process::Output {
    daemon_command()
        .args(["reload", "--config"])
        .arg(cfg)
        .output()
        .unwrap()
}

#[test]
fn reload_starts_new_mailboxes_stops_removed_ones_and_refuses_an_invalid_file() {
    let dir = tempfile::tempdir().unwrap();
    let support = dir.path().join("support");
    let sales = dir.path().join("sales");
    generate_messages(&support, 3);
    make_maildir(&sales);
    one_more(&sales, "sales-1");
    one_more(&sales, "sales-2");
    let port = free_port();
    let cfg = write_config(dir.path(), port, &[("support", &support)], "");
    let mut daemon = Running(Some(start(&cfg)));
    wait_total(port, 3);

    // A new mailbox, through the CLI.
    write_config(
        dir.path(),
        port,
        &[("support", &support), ("sales", &sales)],
        "",
    );
    let out = cli_reload(&cfg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("added sales"), "{stdout}");
    assert!(stdout.contains("unchanged 1"), "{stdout}");
    assert!(
        stdout.contains("restarted none, left running 1"),
        "{stdout}"
    );
    wait_total(port, 5);
    assert_eq!(
        mailbox_names(port),
        Some(vec!["sales".to_string(), "support".to_string()])
    );

    // An invalid file: every error, nothing changes, an Error alert.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("type = \"maildir\"", "type = \"nonsense\""),
    )
    .unwrap();
    let (status, body) = request(port, "POST", "/api/v1/reload", None);
    assert_eq!(status, 422, "{body}");
    let errors = body["errors"].as_array().unwrap();
    assert!(
        errors.len() >= 3,
        "the profile type and both mailboxes' profile: {body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("nothing was changed"),
        "{body}"
    );
    let out = cli_reload(&cfg);
    assert_eq!(out.status.code(), Some(64), "the CLI checks the file first");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nonsense"), "{stderr}");
    one_more(&sales, "sales-3");
    wait_total(port, 6);
    let alerts = get_json(port, "/api/v1/alerts?state=open&level=error");
    let refused: Vec<&Value> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "daemon")
        .collect();
    assert_eq!(refused.len(), 1, "{alerts}");
    assert!(
        refused[0]["text"]
            .as_str()
            .unwrap()
            .contains("was not reloaded"),
        "{alerts}"
    );

    // support removed, by SIGHUP: it stops; the refused-reload alert resolves.
    write_config(dir.path(), port, &[("sales", &sales)], "");
    let pid = daemon.0.as_ref().unwrap().id();
    assert!(Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    wait_for(Duration::from_secs(30), "support to be gone", || {
        (mailbox_names(port)? == vec!["sales".to_string()]).then_some(())
    });
    one_more(&support, "support-late");
    one_more(&sales, "sales-4");
    wait_total(port, 7);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        activity_total(port),
        Some(7),
        "the removed mailbox reads nothing"
    );
    let open = get_json(port, "/api/v1/alerts?state=open&level=error");
    assert!(
        !open["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "daemon"),
        "{open}"
    );
    daemon.stop();
}

/// The live view of one mailbox (`None` when it is not listed).
fn live(port: u16, name: &str) -> Option<Value> {
    let (status, body) = get(port, &format!("/api/v1/mailboxes/{name}"), Some(TOKEN))?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Which task serves the mailbox now: (task_id, started_at).
fn task_of(port: u16, name: &str) -> (u64, i64) {
    let m = live(port, name).unwrap_or_else(|| panic!("no mailbox {name}"));
    (
        m["task_id"].as_u64().unwrap(),
        m["started_at"].as_i64().unwrap(),
    )
}

/// Activities of one mailbox.
fn activities_of(port: u16, mailbox: &str) -> usize {
    all_activities(port)
        .iter()
        .filter(|a| a["mailbox"] == mailbox)
        .count()
}

fn reload_api(port: u16) -> Value {
    let (status, body) = request(port, "POST", "/api/v1/reload", None);
    assert_eq!(status, 200, "{body}");
    body
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

/// (2), (3), (4): a Test & Enable job from before a reload is still there
/// after it; a removed mailbox stops (its new mail is not read, it is no
/// longer listed) and an added one starts, while the others keep their task.
#[test]
fn a_reload_removes_and_adds_mailboxes_and_leaves_the_rest_and_the_jobs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    for m in [&a, &b, &c] {
        make_maildir(m);
    }
    one_more(&a, "a-1");
    one_more(&b, "b-1");
    one_more(&c, "c-1");
    let port = free_port();
    let cfg = write_config(dir.path(), port, &[("a", &a), ("b", &b)], "");
    let mut daemon = Running(Some(start(&cfg)));
    wait_total(port, 2);

    // A Test & Enable job, done before the reload.
    let (status, started) = request(port, "POST", "/api/v1/mailboxes/a/test", None);
    assert_eq!(status, 202, "{started}");
    let job_id = started["job"].as_str().unwrap().to_string();
    let job = wait_for(Duration::from_secs(30), "the job to finish", || {
        let job = get_json(port, &format!("/api/v1/jobs/{job_id}"));
        (job["state"] == "done").then_some(job)
    });
    let a_before = task_of(port, "a");

    // b removed, c added.
    write_config(dir.path(), port, &[("a", &a), ("c", &c)], "");
    let report = reload_api(port);
    assert_eq!(names(&report["removed"]), vec!["b"], "{report}");
    assert_eq!(names(&report["added"]), vec!["c"], "{report}");
    assert_eq!(names(&report["left_running"]), vec!["a"], "{report}");
    assert_eq!(report["restarted"], serde_json::json!([]), "{report}");
    assert_eq!(report["full_restart"], serde_json::json!([]), "{report}");
    // Answered once applied: b is gone and c listed at once.
    assert_eq!(
        mailbox_names(port),
        Some(vec!["a".to_string(), "c".to_string()])
    );
    assert!(
        live(port, "b").is_none(),
        "the removed mailbox is not listed"
    );
    wait_total(port, 3);
    assert_eq!(activities_of(port, "c"), 1);

    // The job from before is still there, as it was.
    assert_eq!(
        get_json(port, &format!("/api/v1/jobs/{job_id}")),
        job,
        "the job survives the reload"
    );
    // a kept its task: not restarted, no new Test & Enable.
    assert_eq!(task_of(port, "a"), a_before, "a was left running");

    // b's new mail is not read: written before two of a's and c's, which
    // are read (b polled as often as they do while it ran).
    one_more(&b, "b-late");
    one_more(&a, "a-2");
    wait_total(port, 4);
    one_more(&c, "c-2");
    wait_total(port, 5);
    one_more(&a, "a-3");
    wait_total(port, 6);
    assert_eq!(
        activities_of(port, "b"),
        1,
        "the removed mailbox reads nothing"
    );
    assert_eq!(activities_of(port, "a"), 3);
    assert_eq!(activities_of(port, "c"), 2);
    assert_eq!(task_of(port, "a"), a_before);
    daemon.stop();
}

/// A change to `[crm]` cannot be applied to running tasks: every task
/// drains and starts again (the answer says why), and the daemon runs on.
#[test]
fn a_crm_change_restarts_every_task() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    make_maildir(&a);
    one_more(&a, "a-1");
    let port = free_port();
    let cfg = write_config(dir.path(), port, &[("a", &a)], "");
    let mut daemon = Running(Some(start(&cfg)));
    wait_total(port, 1);
    let before = task_of(port, "a");
    // A Test & Enable job, done before the reload: it outlives it too.
    let (status, started) = request(port, "POST", "/api/v1/mailboxes/a/test", None);
    assert_eq!(status, 202, "{started}");
    let job_id = started["job"].as_str().unwrap().to_string();
    let job = wait_for(Duration::from_secs(30), "the job to finish", || {
        let job = get_json(port, &format!("/api/v1/jobs/{job_id}"));
        (job["state"] == "done").then_some(job)
    });
    write_config(
        dir.path(),
        port,
        &[("a", &a)],
        "\n[crm]\ntype = \"builtin\"\n[crm.parties]\nmax_matches = 3\n",
    );
    let report = reload_api(port);
    assert!(
        report["full_restart"][0]
            .as_str()
            .unwrap()
            .contains("[crm]"),
        "{report}"
    );
    assert_eq!(names(&report["restarted"]), vec!["a"], "{report}");
    assert_eq!(report["left_running"], serde_json::json!([]), "{report}");
    // The API comes back on the same address, with a new task for a.
    wait_for(Duration::from_secs(30), "a restarted", || {
        let (status, body) = get(port, "/api/v1/mailboxes/a", Some(TOKEN))?;
        let m: Value = serde_json::from_str(&body).ok()?;
        (status == 200 && m["task_id"].as_u64()? != before.0).then_some(())
    });
    assert_eq!(
        get_json(port, &format!("/api/v1/jobs/{job_id}")),
        job,
        "the job survives a full reload"
    );
    one_more(&a, "a-2");
    wait_total(port, 2);
    daemon.stop();
}

/// (1): with two Maildir mailboxes and one IMAP mailbox on the private
/// Dovecot, a reload that changes only one Maildir mailbox restarts only
/// it: the others keep their task and the IMAP mailbox its session (Dovecot
/// logs no new login), and mail delivered after the reload reaches all
/// three, the changed one from its new place.
#[cfg(feature = "real-servers")]
#[test]
fn a_reload_that_changes_one_mailbox_restarts_only_that_one() {
    use servers::*;
    let env = servers::env();
    let user = "alice";
    reset_user(user);
    let dir = tempfile::tempdir().unwrap();
    let (a, a2, b) = (
        dir.path().join("a"),
        dir.path().join("a2"),
        dir.path().join("b"),
    );
    for m in [&a, &a2, &b] {
        make_maildir(m);
    }
    one_more(&a, "a-1");
    one_more(&b, "b-1");
    deliver(user, "INBOX", &message("imap-1"));
    let port = free_port();
    let imap = format!(
        r#"
[[profiles]]
name = "srv"
type = "imap_smtp"
host = "{host}"
port = {port}
tls = "starttls"
ca_file = "{ca}"
tls_server_name = "{sn}"
poll_interval = "1s"
idle = true

[[mailboxes]]
name = "imap"
profile = "srv"
email = "{user}@example.test"
approval = "approved"
username = "{user}"
password = "{PASSWORD}"
"#,
        host = env.host,
        port = env.imap,
        ca = env.ca.display(),
        sn = env.server_name,
    );
    let cfg = write_config(dir.path(), port, &[("a", &a), ("b", &b)], &imap);
    let mut daemon = Running(Some(start(&cfg)));
    wait_total(port, 3);
    let logins = || {
        std::fs::read_to_string(env.dir.join("log").join("dovecot.log"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("imap-login: Info: Login: user=<alice>"))
            .count()
    };
    let logins_before = logins();
    assert!(logins_before >= 1, "the IMAP mailbox logged in");
    let (a_before, b_before, imap_before) = (
        task_of(port, "a"),
        task_of(port, "b"),
        task_of(port, "imap"),
    );
    let tested = |name: &str| live(port, name).unwrap()["state"]["incoming_test"].clone();
    let (b_tested, imap_tested) = (tested("b"), tested("imap"));

    // Only a changes: it reads another Maildir now.
    write_config(dir.path(), port, &[("a", &a2), ("b", &b)], &imap);
    let out = cli_reload(&cfg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("changed a,"), "{stdout}");
    assert!(stdout.contains("restarted a, left running 2"), "{stdout}");

    // a runs on a new task; b and imap on the ones from before, with the
    // Test & Enable result from before.
    let a_after = task_of(port, "a");
    assert_ne!(a_after.0, a_before.0, "a was restarted");
    assert!(a_after.1 >= a_before.1);
    assert_eq!(task_of(port, "b"), b_before, "b was left running");
    assert_eq!(task_of(port, "imap"), imap_before, "imap was left running");
    assert_eq!(tested("b"), b_tested);
    assert_eq!(tested("imap"), imap_tested);

    // Mail after the reload reaches all three; a's from its new Maildir.
    one_more(&a, "a-old-place");
    one_more(&a2, "a-2");
    one_more(&b, "b-2");
    deliver(user, "INBOX", &message("imap-2"));
    wait_total(port, 6);
    assert_eq!(activities_of(port, "imap"), 2);
    assert_eq!(activities_of(port, "b"), 2);
    let subjects: Vec<String> = all_activities(port)
        .iter()
        .filter(|x| x["mailbox"] == "a")
        .map(|x| x["subject"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(subjects.contains(&"a-2".to_string()), "{subjects:?}");
    assert!(
        !subjects.contains(&"a-old-place".to_string()),
        "{subjects:?}"
    );
    // The IMAP mailbox read imap-2 on the session it had: no new login.
    assert_eq!(
        logins(),
        logins_before,
        "the IMAP mailbox did not log in again"
    );
    assert_eq!(task_of(port, "imap"), imap_before);
    daemon.stop();
}
