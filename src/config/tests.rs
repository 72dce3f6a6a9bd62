//! The validation rules of the whole file, on TOML text.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    from_toml_str(text, Vec::new(), Path::new("."))
}

const MINIMAL: &str = r#"
    [admin]
    token = "0123456789abcdef"
    [[profiles]]
    name = "local"
    type = "maildir"
    [[mailboxes]]
    name = "support"
    profile = "local"
    email = "support@example.test"
    path = "fixtures/demo-maildir"
"#;

#[test]
fn minimal_config_gets_documented_defaults() {
    let cfg = parse(MINIMAL).unwrap();
    assert_eq!(cfg.admin.listen.to_string(), "127.0.0.1:8025");
    assert_eq!(cfg.profiles[0].max_concurrent_connections, 10);
    assert_eq!(cfg.profiles[0].poll_interval, Duration::from_secs(60));
    assert_eq!(cfg.mailboxes[0].approval, ApprovalStatus::Empty);
    assert!(cfg.process_only_approved);
    assert_eq!(cfg.daemon.state_dir, PathBuf::from("./data"));
}

const IMAP_SMTP: &str = r#"
    [admin]
    token = "0123456789abcdef"
    [[profiles]]
    name = "mail"
    type = "imap_smtp"
    host = "mail.example.test"
    username = "u"
    password = "p"
"#;

fn with_imap_profile(profile_extra: &str, rest: &str) -> String {
    format!(
        "{IMAP_SMTP}{profile_extra}\n[[mailboxes]]\nname = \"m\"\nprofile = \"mail\"\nemail = \"m@example.test\"\n{rest}"
    )
}

#[test]
fn smtp_settings_get_documented_defaults_per_profile_type() {
    let cfg = parse(&with_imap_profile("", "")).unwrap();
    let smtp = cfg.profiles[0].smtp.clone().unwrap();
    assert_eq!(smtp.host, "mail.example.test");
    assert_eq!((smtp.port, smtp.tls), (587, TlsMode::StartTls));
    assert_eq!(smtp.sent_folder.as_deref(), Some("Sent"));
    assert_eq!(smtp.sent_copy, SentCopyMode::Append);
    assert_eq!(smtp.unknown_delivery, UnknownDelivery::Fail);
    assert_eq!(smtp.retry_for, Duration::from_secs(3600));
    assert_eq!(cfg.mailboxes[0].send_rate_per_minute, 60);
    assert_eq!(cfg.outgoing, OutgoingSettings::default());
    // Maildir profiles do not send.
    assert!(parse(MINIMAL).unwrap().profiles[0].smtp.is_none());
    let set = with_imap_profile(
        "smtp_host = \"smtp.example.test\"\nsmtp_tls = \"implicit\"\nsent_copy = \"server\"\nsent_folder = \"Sent Items\"\nunknown_delivery = \"resend\"\nsend_retry_for = \"10m\"",
        "send_rate_per_minute = 5\n[outgoing]\nmax_attachment_size = \"5MB\"\nblocked_extensions = [\".EXE\", \"js\"]\n",
    );
    let cfg = parse(&set).unwrap();
    let smtp = cfg.profiles[0].smtp.clone().unwrap();
    assert_eq!((smtp.host.as_str(), smtp.port), ("smtp.example.test", 465));
    assert_eq!(smtp.sent_copy, SentCopyMode::Server);
    assert_eq!(smtp.sent_folder.as_deref(), Some("Sent Items"));
    assert_eq!(smtp.unknown_delivery, UnknownDelivery::Resend);
    assert_eq!(smtp.retry_for, Duration::from_secs(600));
    assert_eq!(cfg.mailboxes[0].send_rate_per_minute, 5);
    assert_eq!(cfg.outgoing.max_attachment_bytes, 5 << 20);
    assert_eq!(cfg.outgoing.blocked_extensions, vec!["exe", "js"]);
}

#[test]
fn smtp_errors_are_all_reported_with_their_key_paths() {
    let bad = with_imap_profile(
        "smtp_tls = \"plain\"\nsent_copy = \"sometimes\"\nsmtp_pool_size = 0",
        "send_rate_per_minute = 0\n[outgoing]\nmax_attachment_size = \"lots\"\n",
    );
    let errs = parse(&bad).unwrap_err();
    let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "profiles[0].smtp_tls",
        "profiles[0].sent_copy",
        "profiles[0].smtp_pool_size",
        "mailboxes[0].send_rate_per_minute",
        "outgoing.max_attachment_size",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    let misplaced = MINIMAL.replace(
        "type = \"maildir\"",
        "type = \"maildir\"\nsmtp_host = \"x\"",
    );
    let errs = parse(&misplaced).unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs:?}");
    assert!(errs.0[0].message.contains("only imap_smtp"), "{errs:?}");
}

#[test]
fn automatic_mail_actions_are_read_with_defaults_and_key_paths() {
    use crate::filter::{AutomaticAction, AutomaticMailPolicy};
    let cfg = parse(MINIMAL).unwrap();
    assert_eq!(
        cfg.mailboxes[0].automatic_mail,
        AutomaticMailPolicy::default()
    );
    let ok = format!(
        "{MINIMAL}\nautomatic_mail = {{ auto_reply = \"track_no_reply\", list = \"track\", loop_limit = 3, loop_window = \"10m\" }}\n"
    );
    let a = parse(&ok).unwrap().mailboxes[0].automatic_mail.clone();
    assert_eq!(a.auto_reply, AutomaticAction::TrackNoReply);
    assert_eq!(a.list, AutomaticAction::Track);
    assert_eq!(
        (a.bounce, a.bulk),
        (AutomaticAction::Skip, AutomaticAction::Skip)
    );
    assert_eq!((a.loop_limit, a.loop_window), (3, 600));
    let bad = format!(
        "{MINIMAL}\nautomatic_mail = {{ bulk = \"drop\", loop_limit = 0, loop_window = \"1s\", spam = \"skip\" }}\n"
    );
    let errs = parse(&bad).unwrap_err();
    let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "mailboxes[0].automatic_mail.bulk",
        "mailboxes[0].automatic_mail.loop_limit",
        "mailboxes[0].automatic_mail.loop_window",
        "mailboxes[0].automatic_mail.spam",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    assert!(
        errs.0[0].message.contains("track, track_no_reply, skip"),
        "{errs:?}"
    );
}

#[test]
fn correlation_tables_are_read_and_every_error_has_its_key_path() {
    let ok = format!(
        "{MINIMAL}\n[correlation.smart_matching]\nenabled = true\nmode = \"dynamics\"\nhash_min_address_count = 3\n[correlation.tracking_token]\nprefix = \"TKT-\"\nuser_digits = 4\nprevious_prefixes = [\"CRM:\"]\n"
    );
    let cfg = parse(&ok).unwrap();
    assert!(cfg.correlation.smart_matching);
    assert_eq!(cfg.correlation.smart.mode, SmartMode::Dynamics);
    assert_eq!(cfg.correlation.smart.hash_min_address_count, 3);
    assert_eq!(cfg.correlation.token.prefix, "TKT-");
    assert_eq!(cfg.correlation.token.user_digits, 4);
    // The short form still works.
    let short = format!("{MINIMAL}\n[correlation]\nsmart_matching = true\n");
    assert!(parse(&short).unwrap().correlation.smart_matching);

    let bad = format!(
        "{MINIMAL}\n[correlation.smart_matching]\nmode = \"fuzzy\"\nthreshold = 1.5\nwindow_days = 0\n[correlation.tracking_token]\nprefix = \"\"\ncounter_digits = 12\nbase_number = -1\nprevious_prefixes = [\"X1\"]\nrequire_signature = true\nsigning_key_file = \"/nonexistent/key\"\ntypo = 1\n"
    );
    let errs = parse(&bad).unwrap_err();
    let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "correlation.smart_matching.mode",
        "correlation.smart_matching.threshold",
        "correlation.smart_matching.window_days",
        "correlation.tracking_token.prefix",
        "correlation.tracking_token.counter_digits",
        "correlation.tracking_token.base_number",
        "correlation.tracking_token.previous_prefixes[0]",
        "correlation.tracking_token.signing_key_file",
        "correlation.tracking_token.require_signature",
        "correlation.tracking_token.typo",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
}

#[test]
fn reports_every_error_with_its_key_path() {
    let text = r#"
        [admin]
        token = "0123456789abcdef"
        listen = "0.0.0.0:8025"
        [[profiles]]
        name = "imap"
        type = "imap_smtp"
        host = "mail.example.test"
        max_concurrent_connections = 500
        [[mailboxes]]
        name = "a"
        profile = "nope"
        email = "a@example.test"
        pasword = "typo"
    "#;
    let errs = parse(text).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"admin.listen"), "{errs:?}");
    assert!(
        paths.contains(&"profiles[0].max_concurrent_connections"),
        "{errs:?}"
    );
    assert!(paths.contains(&"mailboxes[0].profile"), "{errs:?}");
    assert!(paths.contains(&"mailboxes[0].pasword"), "{errs:?}");
    assert_eq!(errs.len(), 4, "{errs:?}");
}

#[test]
fn unreadable_secret_is_reported_once() {
    let text = MINIMAL
        .replace(
            "type = \"maildir\"",
            "type = \"imap_smtp\"\nhost = \"h.example\"",
        )
        .replace(
            "path = \"fixtures/demo-maildir\"",
            "username = \"u\"\npassword_env = \"CRM_MAILSYNC_TEST_SURELY_UNSET\"",
        );
    let errs = parse(&text).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, "mailboxes[0].password_env");
}

/// Regression (#17 §7): documented as defaulting to `$CRMTracked`, but
/// without the key no keyword was set.
#[test]
fn processed_keyword_defaults_to_crm_tracked_for_imap_and_empty_turns_it_off() {
    let imap = |extra: &str| {
        MINIMAL
            .replace(
                "type = \"maildir\"",
                &format!("type = \"imap_smtp\"\nhost = \"h.example\"\n{extra}"),
            )
            .replace(
                "path = \"fixtures/demo-maildir\"",
                "username = \"u\"\npassword = \"p\"",
            )
    };
    let keyword = |text: &str| parse(text).unwrap().profiles[0].processed_keyword.clone();
    assert_eq!(keyword(&imap("")).as_deref(), Some("$CRMTracked"));
    assert_eq!(keyword(&imap("processed_keyword = \"\"")), None);
    assert_eq!(
        keyword(&imap("processed_keyword = \"$Done\"")).as_deref(),
        Some("$Done")
    );
    // Profiles without keywords get none by default, and may say "" too.
    assert_eq!(keyword(MINIMAL), None);
    let pop3 = imap("").replace("imap_smtp", "pop3_smtp");
    assert_eq!(keyword(&pop3), None);
    assert_eq!(
        keyword(&pop3.replace("host =", "processed_keyword = \"\"\nhost =")),
        None
    );
}

#[test]
fn toml_syntax_error_is_a_config_error() {
    let errs = parse("[admin\ntoken = 1").unwrap_err().0;
    assert_eq!(errs.len(), 1);
    assert!(errs[0].message.contains("TOML"), "{errs:?}");
}

#[test]
fn environment_overrides_file_values() {
    let env = vec![
        (
            "CRM_MAILSYNC__ADMIN__LISTEN".to_string(),
            "127.0.0.1:9999".to_string(),
        ),
        (
            "CRM_MAILSYNC__MAILBOXES__0__APPROVAL".to_string(),
            "approved".to_string(),
        ),
        ("OTHER".to_string(), "x".to_string()),
    ];
    let cfg = from_toml_str(MINIMAL, env, Path::new(".")).unwrap();
    assert_eq!(cfg.admin.listen.port(), 9999);
    assert_eq!(cfg.mailboxes[0].approval, ApprovalStatus::Approved);
}

#[test]
fn environment_override_password_007_keeps_its_zeros() {
    let text = MINIMAL
        .replace(
            "type = \"maildir\"",
            "type = \"imap_smtp\"\nhost = \"h.example\"",
        )
        .replace(
            "path = \"fixtures/demo-maildir\"",
            "username = \"u\"\npassword = \"from-file\"",
        );
    let env = vec![
        (
            "CRM_MAILSYNC__MAILBOXES__0__PASSWORD".to_string(),
            "007".to_string(),
        ),
        (
            "CRM_MAILSYNC__MAILBOXES__0__USERNAME".to_string(),
            "0042".to_string(),
        ),
        // Typed keys still read their string overrides.
        (
            "CRM_MAILSYNC__PROFILES__0__MAX_CONCURRENT_CONNECTIONS".to_string(),
            "3".to_string(),
        ),
        (
            "CRM_MAILSYNC__ADMIN__ALLOW_REMOTE".to_string(),
            "false".to_string(),
        ),
        (
            "CRM_MAILSYNC__CORRELATION__SMART_MATCHING".to_string(),
            "true".to_string(),
        ),
        (
            "CRM_MAILSYNC__DAEMON__STORE_CACHE_MB".to_string(),
            "0128".to_string(),
        ),
    ];
    let cfg = from_toml_str(&text, env, Path::new(".")).unwrap();
    let mb = &cfg.mailboxes[0];
    assert_eq!(mb.secret.as_ref().map(Secret::expose), Some("007"));
    assert_eq!(mb.username.as_deref(), Some("0042"));
    assert_eq!(cfg.profiles[0].max_concurrent_connections, 3);
    assert!(cfg.correlation.smart_matching);
    assert_eq!(cfg.daemon.store_cache_mb, 128);
}

#[test]
fn environment_override_threshold_is_read_as_a_number() {
    let env = vec![(
        "CRM_MAILSYNC__CORRELATION__SMART_MATCHING__THRESHOLD".to_string(),
        "0.5".to_string(),
    )];
    let cfg = from_toml_str(MINIMAL, env, Path::new(".")).unwrap();
    assert_eq!(cfg.correlation.smart.threshold, 0.5);
}

#[test]
fn store_cache_defaults_small_and_is_validated() {
    assert_eq!(parse(MINIMAL).unwrap().daemon.store_cache_mb, 256);
    let text = format!("[daemon]\nstore_cache_mb = 512\n{MINIMAL}");
    assert_eq!(parse(&text).unwrap().daemon.store_cache_mb, 512);
    for bad in ["0", "1000000", "\"big\""] {
        let text = format!("[daemon]\nstore_cache_mb = {bad}\n{MINIMAL}");
        let errs = parse(&text).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert_eq!(errs[0].path, "daemon.store_cache_mb");
    }
}

#[test]
fn email_at_a_dotless_domain_like_localhost_is_accepted() {
    for email in ["alice@localhost", "sales@crm"] {
        let text = MINIMAL.replace("support@example.test", email);
        let cfg = parse(&text).unwrap_or_else(|e| panic!("{email}: {e}"));
        assert_eq!(cfg.mailboxes[0].email, email);
    }
    for bad in ["alice", "alice@", "@localhost", "a b@localhost"] {
        let text = MINIMAL.replace("support@example.test", bad);
        let errs = parse(&text).unwrap_err().0;
        assert_eq!(errs[0].path, "mailboxes[0].email", "{bad}: {errs:?}");
    }
}

#[test]
fn pop3_rejects_folder_tracking_and_act() {
    let text = r#"
        [admin]
        token = "0123456789abcdef"
        [[profiles]]
        name = "pop"
        type = "pop3_smtp"
        host = "pop.example.test"
        username = "u"
        password = "p"
        [[mailboxes]]
        name = "a"
        profile = "pop"
        email = "a@example.test"
        act = "server_side_sync"
        tracked_folders = [{ folder = "INBOX/Customers", regarding = "account:1" }]
    "#;
    let errs = parse(text).unwrap_err().0;
    assert!(
        errs.iter()
            .any(|e| e.path == "mailboxes[0].tracked_folders" && e.message.contains("POP3")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e.path == "mailboxes[0].act"),
        "{errs:?}"
    );
}

#[test]
fn oauth_token_file_and_expiry_are_checked_with_their_key_paths() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok.json");
    std::fs::write(&tok, r#"{"access_token":"t","expires_in":60}"#).unwrap();
    let base = |auth: &str, mailbox_extra: &str| {
        format!(
            r#"
            [admin]
            token = "0123456789abcdef"
            [[profiles]]
            name = "imap"
            type = "imap_smtp"
            host = "imap.example.test"
            auth = "{auth}"
            username = "u"
            token_expiry_warning = "3d"
            [[mailboxes]]
            name = "a"
            profile = "imap"
            email = "a@example.test"
            {mailbox_extra}
            "#
        )
    };
    let ok = base(
        "oauth2",
        &format!(
            "token_file = \"{}\"\ntoken_expires_at = \"2030-01-01T00:00:00Z\"",
            tok.display()
        ),
    );
    let cfg = parse(&ok).unwrap();
    assert_eq!(cfg.mailboxes[0].token_file.as_deref(), Some(tok.as_path()));
    assert_eq!(cfg.mailboxes[0].token_expires_at, Some(1_893_456_000));
    assert_eq!(
        cfg.profiles[0].token_expiry_warning,
        Duration::from_secs(3 * 86_400)
    );

    let cases = [
        (
            base(
                "password",
                &format!("token_file = \"{}\"\npassword = \"p\"", tok.display()),
            ),
            "mailboxes[0].token_file",
        ),
        (
            base("oauth2", "token_file = \"/nonexistent/tok\""),
            "mailboxes[0].token_file",
        ),
        (
            base(
                "oauth2",
                &format!("token_file = \"{}\"\npassword = \"p\"", tok.display()),
            ),
            "mailboxes[0].token_file",
        ),
        (
            base("oauth2", "password = \"p\"\ntoken_expires_at = \"soon\""),
            "mailboxes[0].token_expires_at",
        ),
        (base("oauth2", ""), "mailboxes[0].password"),
    ];
    for (text, path) in cases {
        let errs = parse(&text).unwrap_err().0;
        assert!(errs.iter().any(|e| e.path == path), "{path}: {errs:?}");
    }
}

#[test]
fn plaintext_needs_explicit_opt_in_and_secrets_are_not_printed() {
    let text = MINIMAL.replace("type = \"maildir\"", "type = \"imap_smtp\"\nhost = \"h.example\"\ntls = \"plain\"\npassword = \"hunter2-secret\"\nusername = \"u\"").replace("path = \"fixtures/demo-maildir\"", "");
    let errs = parse(&text).unwrap_err();
    assert!(
        errs.0.iter().any(|e| e.path == "profiles[0].tls"),
        "{errs:?}"
    );
    assert!(!format!("{errs} {errs:?}").contains("hunter2"));
}

#[test]
fn resolved_alert_retention_defaults_to_30_days_and_10000_and_both_are_validated() {
    let d = parse(MINIMAL).unwrap().daemon;
    assert_eq!(d.resolved_alert_retention, Duration::from_secs(30 * 86_400));
    assert_eq!(d.resolved_alerts_kept, 10_000);
    let text = format!(
        "[daemon]\nresolved_alert_retention = \"7d\"\nresolved_alerts_kept = 500\n{MINIMAL}"
    );
    let r = parse(&text).unwrap().daemon.alert_retention();
    assert_eq!((r.max_age, r.keep), (Duration::from_secs(7 * 86_400), 500));
    // Both wrong, with a wrong key beside them: every error, each at its key.
    let text = format!(
        "[daemon]\nresolved_alert_retention = \"1m\"\nresolved_alerts_kept = 5\nshutdown_grace = \"soon\"\n{MINIMAL}"
    );
    let errs = parse(&text).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "daemon.shutdown_grace",
            "daemon.resolved_alert_retention",
            "daemon.resolved_alerts_kept"
        ],
        "{errs:?}"
    );
    for bad in ["\"forever\"", "\"4000d\"", "true"] {
        let text = format!("[daemon]\nresolved_alert_retention = {bad}\n{MINIMAL}");
        let errs = parse(&text).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert_eq!(errs[0].path, "daemon.resolved_alert_retention");
    }
}
