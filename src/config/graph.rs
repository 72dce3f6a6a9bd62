//! The Microsoft Graph keys of an `exchange_online` profile: the Entra app
//! (tenant, client id, secret or certificate), the Graph and login
//! endpoints, the processed category and the request limits.

use super::*;

/// How the Entra app proves who it is at the token endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum GraphCredential {
    /// A client secret (`client_secret`, `client_secret_file`, `client_secret_env`).
    Secret(Secret),
    /// A certificate uploaded to the app registration: a signed client
    /// assertion (RS256 JWT) replaces the secret. Both files are PEM.
    Certificate {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

/// The Graph part of an `exchange_online` profile.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphProfile {
    /// Directory (tenant) id or a verified domain, e.g. `contoso.onmicrosoft.com`.
    pub tenant_id: String,
    /// The app registration's Application (client) id.
    pub client_id: String,
    pub credential: GraphCredential,
    /// The file the client secret came from: re-read before every token
    /// request and watched, so a renewed secret is picked up without a restart.
    pub client_secret_file: Option<PathBuf>,
    /// When the client secret expires (from the app registration), for the
    /// Warning ahead of it (`token_expiry_warning` before).
    pub client_secret_expires_at: Option<crate::model::UnixTime>,
    /// Graph's base, default `https://graph.microsoft.com/v1.0`.
    pub graph_url: String,
    /// `{login_url}/{tenant_id}/oauth2/v2.0/token`.
    pub token_url: String,
    /// Category added to processed messages (Dynamics: "Tracked to Dynamics
    /// 365"); `None` when `processed_category = ""`.
    pub processed_category: Option<String>,
    /// `Prefer: odata.maxpagesize` for delta rounds.
    pub page_size: u32,
    /// Requests in flight per mailbox (Graph allows 4).
    pub max_concurrent_requests: u32,
    /// The app's request budget over all its mailboxes, per minute: a
    /// safety net far below Graph's global 130,000 per 10 seconds per app
    /// (the per-mailbox limit is what binds).
    pub requests_per_minute: u32,
    /// Graph's limit per app and mailbox: this many requests per
    /// `mailbox_request_window` (10,000 per 10 minutes).
    pub mailbox_request_limit: u32,
    pub mailbox_request_window: Duration,
    /// After `sendMail`'s 202, how long the sent item may take to appear in
    /// Sent Items before the email is `failed`.
    pub confirm_sent_within: Duration,
    /// Transient send failures are retried (with back-off) this long.
    pub send_retry_for: Duration,
    pub unknown_delivery: UnknownDelivery,
}

/// The default Microsoft Graph endpoint.
pub const GRAPH_URL: &str = "https://graph.microsoft.com/v1.0";
/// The default Entra ID login endpoint.
pub const LOGIN_URL: &str = "https://login.microsoftonline.com";
/// The category Dynamics' own server-side sync would set, in our words.
pub const DEFAULT_CATEGORY: &str = "Tracked to CRM";

/// Keys that only an `exchange_online` profile has.
const KEYS: &[&str] = &[
    "tenant_id",
    "client_id",
    "client_secret",
    "client_secret_file",
    "client_secret_env",
    "client_secret_expires_at",
    "client_certificate_file",
    "client_key_file",
    "graph_url",
    "login_url",
    "processed_category",
    "page_size",
    "max_concurrent_requests",
    "requests_per_minute",
    "mailbox_request_limit",
    "mailbox_request_window",
    "confirm_sent_within",
];

/// Keys of server profiles that mean nothing to Graph.
const NOT_FOR_GRAPH: &[&str] = &[
    "host",
    "port",
    "tls",
    "tls_server_name",
    "auth",
    "username",
    "password",
    "password_file",
    "password_env",
    "token_file",
    "token_expires_at",
    "processed_keyword",
    "idle",
];

/// Reads the Graph keys; `None` for other profile types (whose Graph keys
/// are reported as misplaced) or when a required key is missing.
pub(super) fn graph_profile(
    t: &mut Table<'_>,
    kind: Option<ProfileType>,
    allow_insecure: bool,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<GraphProfile> {
    if kind != Some(ProfileType::ExchangeOnline) {
        for &k in KEYS {
            if t.raw(k).is_some() {
                errs.push(
                    t.key(k),
                    "only exchange_online profiles use Microsoft Graph; remove it",
                );
            }
        }
        return None;
    }
    for &k in NOT_FOR_GRAPH {
        if t.raw(k).is_some() {
            errs.push(
                t.key(k),
                "an exchange_online profile talks to Microsoft Graph with the app's credentials (tenant_id, client_id, client_secret_file or client_certificate_file); remove it",
            );
        }
    }
    let tenant_id = t.required_string("tenant_id", errs);
    let client_id = t.required_string("client_id", errs);
    let secret = secret(
        t,
        "client_secret",
        "client_secret_file",
        "client_secret_env",
        base_dir,
        errs,
    );
    let client_secret_file = secret_file_of(t, "client_secret_file", base_dir);
    let cert_file = t.nonempty_string("client_certificate_file", errs);
    let key_file = t.nonempty_string("client_key_file", errs);
    let credential = match (secret, cert_file, key_file) {
        (Some(s), None, None) => Some(GraphCredential::Secret(s)),
        (None, Some(c), Some(k)) => {
            let cert_file = secret_path(&c, base_dir);
            let key_file = secret_path(&k, base_dir);
            for (key, p) in [
                ("client_certificate_file", &cert_file),
                ("client_key_file", &key_file),
            ] {
                if let Err(e) = std::fs::metadata(p) {
                    errs.push(t.key(key), format!("cannot read {}: {e}", p.display()));
                }
            }
            Some(GraphCredential::Certificate {
                cert_file,
                key_file,
            })
        }
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            errs.push(
                t.key("client_certificate_file"),
                "give either a client secret or a certificate, not both",
            );
            None
        }
        (None, Some(_), None) => {
            errs.push(
                t.key("client_key_file"),
                "is required with client_certificate_file (the certificate's private key, PEM)",
            );
            None
        }
        (None, None, Some(_)) => {
            errs.push(
                t.key("client_certificate_file"),
                "is required with client_key_file (the certificate uploaded to the app registration, PEM)",
            );
            None
        }
        (None, None, None) => {
            // `secret` already reported a file or variable it could not read.
            if ["client_secret", "client_secret_file", "client_secret_env"]
                .iter()
                .all(|k| t.raw(k).is_none())
            {
                errs.push(
                    t.key("client_secret_file"),
                    "the app's credential is required: client_secret_file, client_secret_env or client_certificate_file + client_key_file",
                );
            }
            None
        }
    };
    let client_secret_expires_at = t.string("client_secret_expires_at", errs).and_then(|s| {
        let parsed = chrono::DateTime::parse_from_rfc3339(&s)
            .map(|d| d.timestamp())
            .ok()
            .or_else(|| {
                chrono::NaiveDate::parse_from_str(&s, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|d| d.and_utc().timestamp())
            });
        if parsed.is_none() {
            errs.push(
                t.key("client_secret_expires_at"),
                format!("{s:?} is not a date like 2027-01-31 or an RFC 3339 time"),
            );
        }
        parsed
    });
    let graph_url = endpoint(t, "graph_url", GRAPH_URL, allow_insecure, errs);
    let login_url = endpoint(t, "login_url", LOGIN_URL, allow_insecure, errs);
    let processed_category = match t.string("processed_category", errs) {
        None => Some(DEFAULT_CATEGORY.to_string()),
        Some(c) if c.trim().is_empty() => None,
        Some(c) if c.len() > 255 => {
            errs.push(
                t.key("processed_category"),
                "is longer than 255 characters (Exchange's limit for a category name)",
            );
            None
        }
        Some(c) => Some(c),
    };
    let page_size = t.int("page_size", 100, 1, 1000, errs) as u32;
    let max_concurrent_requests = t.int("max_concurrent_requests", 4, 1, 4, errs) as u32;
    let requests_per_minute = t.int("requests_per_minute", 60_000, 1, 1_000_000, errs) as u32;
    let mailbox_request_limit =
        t.int("mailbox_request_limit", 10_000, 10, 100_000_000, errs) as u32;
    let mailbox_request_window = t.duration(
        "mailbox_request_window",
        Duration::from_secs(600),
        Duration::from_secs(1),
        Duration::from_secs(86_400),
        errs,
    );
    let confirm_sent_within = t.duration(
        "confirm_sent_within",
        Duration::from_secs(600),
        Duration::from_secs(1),
        Duration::from_secs(86_400),
        errs,
    );
    let send_retry_for = t.duration(
        "send_retry_for",
        Duration::from_secs(3600),
        Duration::from_secs(1),
        Duration::from_secs(7 * 86_400),
        errs,
    );
    let unknown_delivery = t.choice(
        "unknown_delivery",
        UnknownDelivery::Fail,
        &[
            ("fail", UnknownDelivery::Fail),
            ("resend", UnknownDelivery::Resend),
        ],
        errs,
    );
    let tenant_id = tenant_id?;
    Some(GraphProfile {
        token_url: format!("{login_url}/{tenant_id}/oauth2/v2.0/token"),
        tenant_id,
        client_id: client_id?,
        credential: credential?,
        client_secret_file,
        client_secret_expires_at,
        graph_url,
        processed_category,
        page_size,
        max_concurrent_requests,
        requests_per_minute,
        mailbox_request_limit,
        mailbox_request_window,
        confirm_sent_within,
        send_retry_for,
        unknown_delivery,
    })
}

/// An endpoint URL without its trailing slash; `http://` only to loopback
/// unless `allow_insecure`.
fn endpoint(
    t: &mut Table<'_>,
    key: &'static str,
    default: &str,
    allow_insecure: bool,
    errs: &mut Errors,
) -> String {
    let Some(url) = t.nonempty_string(key, errs) else {
        return default.to_string();
    };
    match reqwest::Url::parse(&url) {
        Ok(u) if !matches!(u.scheme(), "https" | "http") => {
            errs.push(t.key(key), format!("{url:?} is not an http(s) URL"));
        }
        Ok(u) if crate::net::plaintext_off_loopback(&u) && !allow_insecure => errs.push(
            t.key(key),
            "plaintext http:// is allowed only to loopback; use https:// or set allow_insecure = true",
        ),
        Ok(_) => {}
        Err(e) => errs.push(t.key(key), format!("{url:?} is not a URL: {e}")),
    }
    url.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(profile_extra: &str, mailbox_extra: &str) -> Result<Config, ConfigErrors> {
        let text = format!(
            r#"
            [admin]
            token = "0123456789abcdef"
            [[profiles]]
            name = "m365"
            type = "exchange_online"
            tenant_id = "contoso.onmicrosoft.com"
            client_id = "11111111-2222-3333-4444-555555555555"
            {profile_extra}
            [[mailboxes]]
            name = "sales"
            profile = "m365"
            email = "sales@contoso.test"
            {mailbox_extra}
            "#
        );
        from_toml_str(&text, Vec::new(), Path::new("."))
    }

    fn errors(r: Result<Config, ConfigErrors>) -> String {
        match r {
            Ok(_) => panic!("the config was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn exchange_online_profile_gets_documented_defaults() {
        let cfg = parse("client_secret = \"s3cret\"", "").unwrap();
        let g = cfg.profiles[0].graph.clone().unwrap();
        assert_eq!(g.graph_url, GRAPH_URL);
        assert_eq!(
            g.token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(g.credential, GraphCredential::Secret(Secret::new("s3cret")));
        assert_eq!(g.processed_category.as_deref(), Some(DEFAULT_CATEGORY));
        assert_eq!((g.page_size, g.max_concurrent_requests), (100, 4));
        assert_eq!(g.confirm_sent_within, Duration::from_secs(600));
        assert_eq!(g.unknown_delivery, UnknownDelivery::Fail);
        assert!(cfg.profiles[0].smtp.is_none());
        assert!(cfg.profiles[0].host.is_none());
        // No password needed on the mailbox: the app signs in.
        assert!(cfg.mailboxes[0].secret.is_none());
    }

    #[test]
    fn graph_endpoints_secret_file_and_expiry_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("client-secret");
        std::fs::write(&secret, "from-file\n").unwrap();
        let cfg = parse(
            &format!(
                "client_secret_file = {:?}\nclient_secret_expires_at = \"2027-01-31\"\ngraph_url = \"http://127.0.0.1:9/v1.0/\"\nlogin_url = \"http://127.0.0.1:9\"\nprocessed_category = \"\"\npage_size = 10",
                secret.display().to_string()
            ),
            "",
        )
        .unwrap();
        let g = cfg.profiles[0].graph.clone().unwrap();
        assert_eq!(g.graph_url, "http://127.0.0.1:9/v1.0");
        assert_eq!(
            g.token_url,
            "http://127.0.0.1:9/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            g.credential,
            GraphCredential::Secret(Secret::new("from-file"))
        );
        assert_eq!(g.client_secret_file.as_deref(), Some(secret.as_path()));
        assert_eq!(g.client_secret_expires_at, Some(1_801_353_600));
        assert_eq!(g.processed_category, None);
        assert_eq!(g.page_size, 10);
    }

    #[test]
    fn every_graph_mistake_is_reported_at_once() {
        let text = errors(parse(
            "host = \"outlook.office365.com\"\nusername = \"x\"\nmax_concurrent_requests = 9\nclient_secret_expires_at = \"soon\"\ngraph_url = \"http://graph.example.test/v1.0\"\nclient_key_file = \"key.pem\"",
            "password = \"p\"\nact = \"server_side_sync\"",
        ));
        for expected in [
            "profiles[0].host",
            "profiles[0].username",
            "profiles[0].max_concurrent_requests",
            "profiles[0].client_secret_expires_at",
            "profiles[0].graph_url: plaintext http:// is allowed only to loopback",
            "profiles[0].client_certificate_file: is required with client_key_file",
            "mailboxes[0].password: an exchange_online mailbox has no password",
            "mailboxes[0].act",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn a_credential_is_required_and_only_one() {
        let text = errors(parse("", ""));
        assert!(text.contains("the app's credential is required"), "{text}");
        let text = errors(parse(
            "client_secret = \"s\"\nclient_certificate_file = \"c.pem\"\nclient_key_file = \"k.pem\"",
            "",
        ));
        assert!(text.contains("not both"), "{text}");
    }

    #[test]
    fn graph_keys_on_an_imap_profile_are_misplaced() {
        let text = String::from(
            r#"
            [admin]
            token = "0123456789abcdef"
            [[profiles]]
            name = "mail"
            type = "imap_smtp"
            host = "mail.example.test"
            username = "u"
            password = "p"
            tenant_id = "t"
            "#,
        );
        let text = errors(from_toml_str(&text, Vec::new(), Path::new(".")));
        assert!(
            text.contains("profiles[0].tenant_id: only exchange_online profiles"),
            "{text}"
        );
    }

    #[test]
    fn exchange_server_points_to_imap_or_graph() {
        let text = String::from(
            r#"
            [admin]
            token = "0123456789abcdef"
            [[profiles]]
            name = "onprem"
            type = "exchange_server"
            host = "exchange.example.test"
            "#,
        );
        let text = errors(from_toml_str(&text, Vec::new(), Path::new(".")));
        assert!(text.contains("use an imap_smtp profile"), "{text}");
        assert!(text.contains("exchange_online (Microsoft Graph)"), "{text}");
    }
}
