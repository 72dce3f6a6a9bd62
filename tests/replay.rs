//! `crm-mailsync replay` end to end: the real binary, a config file, seeds
//! relative to the current directory, JSON lines out, and the live store untouched.

use std::path::Path;
use std::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_crm-mailsync")
}

#[test]
fn replay_writes_one_decision_per_message_and_leaves_the_live_store_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scenario = root.join("fixtures/correlation/01-headers");
    let state = tmp.path().join("state");
    let config = tmp.path().join("replay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[daemon]
state_dir = "{state}"
[admin]
enabled = false
[[profiles]]
name = "local"
type = "maildir"
[[mailboxes]]
name = "support"
profile = "local"
email = "support@us.test"
path = "{maildir}"
"#,
            state = state.display(),
            maildir = root.join("fixtures/demo-maildir").display()
        ),
    )
    .unwrap();
    let seeds = tmp.path().join("seeds.jsonl");
    std::fs::write(
        &seeds,
        "{\"file\": \"seeds/parent.eml\", \"regarding\": \"case:1\", \"note\": \"extra keys are ignored\"}\n\n",
    )
    .unwrap();
    let output = tmp.path().join("decisions.jsonl");
    let run = Command::new(bin())
        .current_dir(&scenario)
        .args(["replay", "--config"])
        .arg(&config)
        .arg("--seeds")
        .arg(&seeds)
        .arg("mail")
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[0]["file"], "mail/01-in-reply-to.eml");
    assert_eq!(lines[0]["message_id"], "r1@us.test");
    assert_eq!(lines[0]["regarding"], "case:1");
    assert_eq!(lines[0]["method"], "in_reply_to");
    assert_eq!(lines[0]["score"], 1.0);
    assert!(lines[0]["reasons"][0]
        .as_str()
        .unwrap()
        .starts_with("In-Reply-To <p1@contoso.test>"));
    // The reply chain works through replayed messages, not only seeds.
    assert_eq!(lines[1]["regarding"], "case:1");
    // Not seeded here, so the sent-copy replies stay unmatched.
    assert!(lines[2]["regarding"].is_null());
    assert!(!state.exists(), "replay touched the live state dir");

    // A bad seeds line is reported with its line number.
    std::fs::write(&seeds, "{\"file\": \"seeds/parent.eml\"}\n").unwrap();
    let bad = Command::new(bin())
        .current_dir(&scenario)
        .args(["replay", "--config"])
        .arg(&config)
        .arg("--seeds")
        .arg(&seeds)
        .args(["mail", "--output", "-"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("seeds.jsonl:1:"));
}
