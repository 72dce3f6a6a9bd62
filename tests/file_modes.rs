//! Files holding mail are private whatever the umask the daemon starts with.
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn store_dir_is_0700_and_quarantine_files_0600_under_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    make_maildir(&maildir);
    std::fs::write(
        maildir.join("new/1767000000.M1P1.good"),
        "Message-ID: <ok@example.test>\nFrom: a@customer.example\nTo: support@example.test\nSubject: fine\n\nhello\n",
    )
    .unwrap();
    // Not an email: quarantined with its bytes kept.
    std::fs::write(maildir.join("new/1767000001.M2P1.bad"), "garbage\0\0\n").unwrap();
    let port = free_port();
    let cfg = maildir_config(dir.path(), &maildir, port, 10, "");
    let child = Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" run --config \"$1\"")
        .arg(bin())
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let saved = wait_for(Duration::from_secs(30), "a quarantine entry", || {
        let (status, body) = get(port, "/api/v1/quarantine", Some(TOKEN))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let path = v["quarantine"].get(0)?["saved_as"].as_str()?.to_string();
        (status == 200).then_some(path)
    });
    stop(child);

    let state = dir.path().join("state");
    assert_eq!(mode(&state.join("store")), 0o700, "store directory");
    let saved = Path::new(&saved);
    assert_eq!(mode(saved), 0o600, "{}", saved.display());
    assert_eq!(mode(saved.parent().unwrap()), 0o700, "quarantine directory");
}
