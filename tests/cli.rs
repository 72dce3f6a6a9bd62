//! The command line as an operator uses it.

mod common;

fn check_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = common::daemon_command()
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn check_config_reports_three_independent_mistakes_and_exits_64() {
    let (code, _, err) = check_config(
        r#"
[admin]
token = "0123456789abcdef"

[[profiles]]
name = "imap"
type = "imap_smtp"
host = "imap.example.test"
poll_interval = "every now and then"

[[mailboxes]]
name = "sales"
profile = "imap"
email = "sales-at-example.test"
username = "sales"
password = "secret"
approval = "maybe"
"#,
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("3 configuration error(s)"), "{err}");
    assert!(
        err.contains("profiles[0].poll_interval: invalid duration"),
        "{err}"
    );
    assert!(
        err.contains("mailboxes[0].email: \"sales-at-example.test\" is not an email address"),
        "{err}"
    );
    assert!(
        err.contains("mailboxes[0].approval: unknown value \"maybe\""),
        "{err}"
    );
    assert!(
        !err.contains("secret"),
        "secrets must not be printed: {err}"
    );
}

#[test]
fn toml_syntax_error_exits_64() {
    let (code, _, err) = check_config("[admin\ntoken = \"x\"\n");
    assert_eq!(code, 64);
    assert!(err.contains("TOML syntax error"), "{err}");
}

#[test]
fn daemon_refuses_to_start_on_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[mailboxes]]\nname = \"x\"\n").unwrap();
    let out = common::daemon_command()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mailboxes[0].profile: is required"), "{err}");
    assert!(err.contains("admin.token"), "{err}");
}

#[test]
fn bundled_configs_are_valid() {
    for file in ["config/demo.toml", "config/example.toml"] {
        let out = common::daemon_command()
            .arg("check-config")
            .arg(file)
            .env("EXAMPLE_IMAP_PASSWORD", "x")
            .env("EXAMPLE_GRAPH_SECRET", "y")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn version_and_help() {
    let out = common::daemon_command().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("crm-mailsync "));
    let out = common::daemon_command().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check-config", "activities"] {
        assert!(help.contains(cmd), "{help}");
    }
    // Regression: reload's help said what test-enable does, and
    // test-enable had none. Every command says what it does, on its own line.
    let line = |cmd: &str| {
        help.lines()
            .find(|l| l.trim_start().starts_with(&format!("{cmd} ")))
            .unwrap_or_else(|| panic!("no line for {cmd}: {help}"))
            .to_string()
    };
    assert!(
        line("reload").contains("read its configuration file again"),
        "{help}"
    );
    assert!(!line("reload").contains("Test & Enable"), "{help}");
    assert!(
        line("test-enable").contains("Test & Enable of one mailbox"),
        "{help}"
    );
    for l in help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
    {
        if l.trim().is_empty() {
            break;
        }
        assert!(
            l.split_whitespace().count() > 1,
            "a command without help: {l:?}"
        );
    }
}
