//! Reloading the configuration of the running daemon: `crm-mailsync reload`,
//! `POST /api/v1/reload` and SIGHUP. New mailboxes start, removed ones stop;
//! an invalid file is refused with every error and nothing changes.

mod common;

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
