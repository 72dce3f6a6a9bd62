//! `[[profiles]]`: email server profiles.

use super::*;

pub(super) fn profile(mut t: Table<'_>, base_dir: &Path, errs: &mut Errors) -> Option<Profile> {
    let name = t.required_string("name", errs);
    let kind_s = t.required_string("type", errs);
    let kind = kind_s.as_deref().and_then(|k| {
        let parsed = ProfileType::parse(k);
        if parsed.is_none() {
            errs.push(t.key("type"), format!("unknown profile type {k:?}; expected one of exchange_online, exchange_server, imap_smtp, pop3_smtp, maildir"));
        }
        parsed
    });
    let host = t.nonempty_string("host", errs);
    let port_i = t.int("port", 0, 0, 65_535, errs);
    let tls = t.choice(
        "tls",
        TlsMode::StartTls,
        &[
            ("implicit", TlsMode::Implicit),
            ("starttls", TlsMode::StartTls),
            ("plain", TlsMode::Plain),
        ],
        errs,
    );
    let allow_insecure = t.bool("allow_insecure", false, errs);
    if tls == TlsMode::Plain && !allow_insecure {
        errs.push(
            t.key("tls"),
            "\"plain\" sends passwords unencrypted; set allow_insecure = true to allow it",
        );
    }
    let ca_file = t.string("ca_file", errs).map(PathBuf::from);
    if let Some(ca) = &ca_file {
        if !ca.exists() {
            errs.push(t.key("ca_file"), format!("{} does not exist", ca.display()));
        }
    }
    let tls_server_name = t.nonempty_string("tls_server_name", errs);
    let auth = t.choice(
        "auth",
        AuthKind::Password,
        &[
            ("password", AuthKind::Password),
            ("oauth2", AuthKind::OAuth2),
        ],
        errs,
    );
    let username = t.nonempty_string("username", errs);
    let secret = secret(
        &mut t,
        "password",
        "password_file",
        "password_env",
        base_dir,
        errs,
    );
    let password_file = secret_file_of(&mut t, "password_file", base_dir);
    let (token_file, token_expires_at) = token_source(&mut t, secret.is_some(), base_dir, errs);
    if auth != AuthKind::OAuth2 && (token_file.is_some() || token_expires_at.is_some()) {
        errs.push(
            t.key(if token_file.is_some() {
                "token_file"
            } else {
                "token_expires_at"
            }),
            "is for OAuth2 tokens; set auth = \"oauth2\" or remove it",
        );
    }
    let token_expiry_warning = t.duration(
        "token_expiry_warning",
        SECS(7 * 86_400),
        SECS(0),
        SECS(365 * 86_400),
        errs,
    );
    let poll_interval = t.duration("poll_interval", SECS(60), SECS(1), SECS(1440 * 60), errs);
    let idle_backoff_cap = t.int("idle_backoff_cap", 4, 1, 60, errs) as u32;
    let max_conn = t.int("max_concurrent_connections", 10, 1, 300, errs) as u16;
    let connect_timeout = t.duration("connect_timeout", SECS(30), SECS(1), SECS(100), errs);
    let io_timeout = t.duration("io_timeout", SECS(120), SECS(1), SECS(3600), errs);
    let process_email_from = t.string("process_email_from", errs).and_then(|s| {
        let date_part = s.get(..10).unwrap_or(&s);
        match chrono::NaiveDate::parse_from_str(date_part, "%Y-%m-%d") {
            Ok(d) => Some(d),
            Err(_) => {
                errs.push(
                    t.key("process_email_from"),
                    format!("{s:?} is not a date like 2026-01-31"),
                );
                None
            }
        }
    });
    let move_failed_to = t.nonempty_string("move_failed_to", errs);
    let batch_size = t.int("batch_size", 200, 1, 10_000, errs) as usize;
    let max_message_size = t.int("max_message_size", 50 * 1024 * 1024, 1024, 1 << 34, errs) as u64;
    // Absent: the documented default for IMAP profiles (set below, once the
    // type is known); an empty string switches the keyword off.
    let keyword_given = t.raw("processed_keyword").is_some();
    let mut processed_keyword = t
        .string("processed_keyword", errs)
        .filter(|k| !k.trim().is_empty());
    if let Some(k) = &processed_keyword {
        if k.chars()
            .any(|c| c.is_whitespace() || "(){%*\"\\]".contains(c))
        {
            errs.push(
                t.key("processed_keyword"),
                format!("{k:?} is not a valid IMAP keyword"),
            );
        }
    }
    let idle = t.bool("idle", true, errs);
    let deployment_marker = t.bool("deployment_marker", true, errs);
    let retry_backoff_max = t.duration("retry_backoff_max", SECS(900), SECS(1), SECS(86_400), errs);
    // A duration, or "<N>x": N poll intervals.
    let stall_alert_after = match t.raw("stall_alert_after").and_then(Value::as_str) {
        Some(s) if s.trim().ends_with(['x', 'X']) => {
            let n = s.trim()[..s.trim().len() - 1].trim();
            match n.parse::<u32>() {
                Ok(n @ 1..=10_000) => poll_interval * n,
                _ => {
                    errs.push(
                        t.key("stall_alert_after"),
                        format!("{s:?}: a multiple of poll_interval is 1x..=10000x, e.g. \"20x\""),
                    );
                    SECS(3600)
                }
            }
        }
        _ => t.duration(
            "stall_alert_after",
            SECS(3600),
            SECS(1),
            SECS(30 * 86_400),
            errs,
        ),
    };
    // Deprecated: still range-checked so a typo is reported, then ignored.
    let max_transient_failures = t
        .raw("max_transient_failures")
        .is_some()
        .then(|| t.int("max_transient_failures", 10, 1, 1000, errs) as u32);
    let missing_message_retries = t.int("missing_message_retries", 3, 1, 1000, errs) as u32;

    if let Some(kind) = kind {
        let needs_server = matches!(kind, ProfileType::ImapSmtp | ProfileType::Pop3Smtp);
        if needs_server && host.is_none() {
            errs.push(
                t.key("host"),
                format!(
                    "is required for a {} profile",
                    kind_s.as_deref().unwrap_or("")
                ),
            );
        }
        if kind == ProfileType::Maildir && host.is_some() {
            errs.push(
                t.key("host"),
                "a maildir profile has no server; remove host",
            );
        }
        if kind == ProfileType::ExchangeServer {
            errs.push(t.key("type"), "Exchange Server (on-premises) is not supported directly: use an imap_smtp profile against the Exchange server's IMAP4 and SMTP endpoints, or exchange_online (Microsoft Graph) for a hybrid deployment whose mailboxes are in Exchange Online; EWS is not planned");
        }
        if kind == ProfileType::ImapSmtp && !keyword_given {
            processed_keyword = Some(crate::connector::imap::CRM_KEYWORD.to_string());
        }
        if kind == ProfileType::Pop3Smtp && processed_keyword.is_some() {
            errs.push(
                t.key("processed_keyword"),
                "POP3 has no keywords; remove processed_keyword",
            );
        }
        if kind == ProfileType::Pop3Smtp && move_failed_to.is_some() {
            errs.push(
                t.key("move_failed_to"),
                "POP3 is email-only with no folders; remove move_failed_to",
            );
        }
    }
    let smtp = super::smtp::smtp_settings(&mut t, kind, host.as_deref(), allow_insecure, errs);
    let graph = super::graph::graph_profile(&mut t, kind, allow_insecure, base_dir, errs);
    let port = match (port_i, kind) {
        (0, Some(ProfileType::ImapSmtp)) => Some(if tls == TlsMode::Implicit { 993 } else { 143 }),
        (0, Some(ProfileType::Pop3Smtp)) => Some(if tls == TlsMode::Implicit { 995 } else { 110 }),
        (0, _) => None,
        (p, _) => Some(p as u16),
    };
    t.finish(errs);
    Some(Profile {
        name: name?,
        kind: kind?,
        host,
        port,
        tls,
        allow_insecure,
        ca_file,
        tls_server_name,
        auth,
        username,
        secret,
        token_file,
        token_expires_at,
        token_expiry_warning,
        poll_interval,
        idle_backoff_cap,
        max_concurrent_connections: max_conn,
        connect_timeout,
        io_timeout,
        process_email_from,
        move_failed_to,
        batch_size,
        max_message_size,
        processed_keyword,
        idle,
        deployment_marker,
        retry_backoff_max,
        stall_alert_after,
        max_transient_failures,
        password_file,
        missing_message_retries,
        smtp,
        graph,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn profile_errors(extra: &str) -> Vec<(String, String)> {
        let text = format!(
            r#"
            [admin]
            token = "0123456789abcdef"
            [[profiles]]
            name = "local"
            type = "maildir"
            {extra}
            [[mailboxes]]
            name = "m"
            profile = "local"
            email = "m@example.test"
            path = "fixtures/demo-maildir"
            "#
        );
        match super::super::from_toml_str(&text, Vec::new(), Path::new(".")) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|e| (e.path, e.message)).collect(),
        }
    }

    /// `idle_backoff_cap` is range-checked with the other profile keys, and
    /// its error is reported beside theirs, not instead of them.
    #[test]
    fn idle_backoff_cap_is_validated_with_the_other_profile_keys() {
        assert!(profile_errors("idle_backoff_cap = 1").is_empty());
        assert!(profile_errors("idle_backoff_cap = 60").is_empty());
        for bad in ["0", "61", "\"often\""] {
            let errs = profile_errors(&format!(
                "idle_backoff_cap = {bad}\npoll_interval = \"soon\""
            ));
            let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
            assert_eq!(
                paths,
                ["profiles[0].poll_interval", "profiles[0].idle_backoff_cap"],
                "{bad}: {errs:?}"
            );
        }
        let errs = profile_errors("idle_backoff_cap = 0");
        assert_eq!(errs[0].1, "0 is out of range 1..=60", "{errs:?}");
    }

    fn profile(extra: &str) -> crate::config::Profile {
        let text = format!(
            "[admin]\ntoken = \"0123456789abcdef\"\n[[profiles]]\nname = \"local\"\ntype = \"maildir\"\n{extra}\n[[mailboxes]]\nname = \"m\"\nprofile = \"local\"\nemail = \"m@example.test\"\npath = \"fixtures/demo-maildir\"\n"
        );
        let cfg = super::super::from_toml_str(&text, Vec::new(), Path::new(".")).unwrap();
        cfg.profiles[0].clone()
    }

    /// The stall threshold as the issue puts it, N poll intervals, or as a
    /// duration; the default an hour.
    #[test]
    fn stall_alert_after_is_a_duration_or_a_multiple_of_the_poll_interval() {
        let p = profile("poll_interval = \"30s\"\nstall_alert_after = \"20x\"");
        assert_eq!(p.stall_alert_after, std::time::Duration::from_secs(600));
        let p = profile("poll_interval = \"30s\"\nstall_alert_after = \"45m\"");
        assert_eq!(p.stall_alert_after, std::time::Duration::from_secs(2700));
        assert_eq!(
            profile("").stall_alert_after,
            std::time::Duration::from_secs(3600)
        );
        for bad in ["\"0x\"", "\"manyx\"", "\"10001x\"", "\"soon\""] {
            let errs = profile_errors(&format!("stall_alert_after = {bad}"));
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert_eq!(errs[0].0, "profiles[0].stall_alert_after", "{bad}");
        }
    }
}
