//! `[crm]`: which CRM the daemon syncs with, how events reach it, how
//! parties are resolved.

use super::*;

/// The CRM adapter (`[crm] type`).
#[derive(Debug, Clone, PartialEq)]
pub enum CrmKind {
    /// Embedded default: records from import and the API; activities stay in
    /// the store and the pull feed.
    Builtin,
    Webhook(WebhookSettings),
    Dataverse(DataverseSettings),
}

impl CrmKind {
    /// The adapter's name (also the outbox consumer key); `None` for builtin,
    /// which has no outbox consumer.
    pub fn consumer(&self) -> Option<&'static str> {
        match self {
            CrmKind::Builtin => None,
            CrmKind::Webhook(_) => Some("webhook"),
            CrmKind::Dataverse(_) => Some("dataverse"),
        }
    }
}

/// `[crm] type = "webhook"`.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSettings {
    /// Where events are POSTed.
    pub url: String,
    /// `whsec_…` signing secrets, one per line of `secret_file`; every one
    /// signs (rotation: add the new one, later drop the old).
    pub secrets: Vec<Secret>,
    pub secret_file: PathBuf,
    /// Optional `GET` endpoint returning records as JSON lines.
    pub records_url: Option<String>,
    /// `http://` to a host other than loopback.
    pub allow_insecure: bool,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    /// How long a mailbox's Error alert waits before it goes out as an
    /// event: a profile alert raised meanwhile covers it (the storm rule
    /// for outages the mailboxes notice one after the other).
    pub alert_group_wait: Duration,
}

/// Default [`WebhookSettings::alert_group_wait`].
pub const DEFAULT_ALERT_GROUP_WAIT: Duration = Duration::from_secs(60);

/// `[crm] type = "dataverse"` (Dynamics 365 Web API v9.2).
#[derive(Debug, Clone, PartialEq)]
pub struct DataverseSettings {
    /// Environment URL, e.g. `https://contoso.crm.dynamics.com`.
    pub url: String,
    /// OAuth2 token endpoint (client credentials), e.g.
    /// `https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`.
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Default `<url>/.default`.
    pub scope: String,
    pub allow_insecure: bool,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    /// `Prefer: odata.maxpagesize` for record pulls.
    pub page_size: u32,
}

/// Outbox delivery policy (`[crm.delivery]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeliverySettings {
    /// Waits after the 1st, 2nd, … failure; the last one repeats. Default
    /// as Dynamics' own retry: 0, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h.
    pub retry_schedule: Vec<Duration>,
    /// An event undelivered this long goes to the dead-letter list (Error alert).
    pub dead_letter_after: Duration,
    /// `/readyz` fails when the oldest undelivered event is older than this.
    pub stuck_after: Duration,
}

/// Party resolution (`[crm.parties]`).
#[derive(Debug, Clone, PartialEq)]
pub struct PartySettings {
    /// Kinds tried in order; the first kind with exactly one match wins.
    pub order: Vec<String>,
    /// More matches than this (over all kinds) → unresolved.
    pub max_matches: usize,
    /// Create a record of this kind (`contact` or `lead`) for an unknown
    /// sender; `None` (default): never.
    pub auto_create: Option<String>,
}

/// The whole `[crm]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct CrmSettings {
    pub kind: CrmKind,
    /// How often records are pulled from the adapter.
    pub record_sync_interval: Duration,
    pub delivery: DeliverySettings,
    pub parties: PartySettings,
}

/// The default retry schedule (see [`DeliverySettings::retry_schedule`]).
pub fn default_retry_schedule() -> Vec<Duration> {
    [0, 5, 300, 1800, 7200, 18_000, 36_000]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

impl Default for CrmSettings {
    fn default() -> Self {
        CrmSettings {
            kind: CrmKind::Builtin,
            record_sync_interval: Duration::from_secs(300),
            delivery: DeliverySettings {
                retry_schedule: default_retry_schedule(),
                dead_letter_after: Duration::from_secs(7 * 86_400),
                stuck_after: Duration::from_secs(3600),
            },
            parties: PartySettings {
                order: ["user", "contact", "account", "lead", "queue"]
                    .map(String::from)
                    .to_vec(),
                max_matches: 10,
                auto_create: None,
            },
        }
    }
}

fn url_setting(
    t: &mut Table<'_>,
    key: &'static str,
    allow_insecure: bool,
    errs: &mut Errors,
) -> Option<String> {
    let url = t.nonempty_string(key, errs)?;
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        errs.push(t.key(key), format!("{url:?} is not an http(s) URL"));
        return None;
    }
    match reqwest::Url::parse(&url) {
        Ok(u) if crate::net::plaintext_off_loopback(&u) && !allow_insecure => errs.push(
            t.key(key),
            "plaintext http:// is allowed only to loopback; use https:// or set allow_insecure = true",
        ),
        Ok(_) => {}
        Err(e) => errs.push(t.key(key), format!("{url:?} is not a URL: {e}")),
    }
    Some(url)
}

/// Reads `[crm]` (absent: builtin with defaults).
pub(super) fn crm_settings(mut t: Table<'_>, base_dir: &Path, errs: &mut Errors) -> CrmSettings {
    let d = CrmSettings::default();
    let kind_s = t.string("type", errs).unwrap_or_else(|| "builtin".into());
    let allow_insecure = t.bool("allow_insecure", false, errs);
    let ca_file = t.string("ca_file", errs).map(|f| secret_path(&f, base_dir));
    if let Some(ca) = &ca_file {
        if !ca.exists() {
            errs.push(t.key("ca_file"), format!("{} does not exist", ca.display()));
        }
    }
    let timeout = t.duration(
        "timeout",
        Duration::from_secs(30),
        Duration::from_secs(1),
        Duration::from_secs(600),
        errs,
    );
    let record_sync_interval = t.duration(
        "record_sync_interval",
        d.record_sync_interval,
        Duration::from_secs(1),
        Duration::from_secs(7 * 86_400),
        errs,
    );
    let kind = match kind_s.as_str() {
        "builtin" => CrmKind::Builtin,
        "webhook" => {
            let url = url_setting(&mut t, "url", allow_insecure, errs);
            let records_url = t
                .raw("records_url")
                .is_some()
                .then(|| url_setting(&mut t, "records_url", allow_insecure, errs))
                .flatten();
            let secret_file = t.required_string("secret_file", errs);
            let alert_group_wait = t.duration(
                "alert_group_wait",
                DEFAULT_ALERT_GROUP_WAIT,
                Duration::ZERO,
                Duration::from_secs(3600),
                errs,
            );
            let mut secrets = Vec::new();
            let mut secret_path_buf = PathBuf::new();
            if let Some(f) = &secret_file {
                secret_path_buf = secret_path(f, base_dir);
                match read_secret_file(&secret_path_buf) {
                    Ok(s) => {
                        for line in s.expose().lines().map(str::trim).filter(|l| !l.is_empty()) {
                            if !line.starts_with("whsec_") {
                                errs.push(
                                    t.key("secret_file"),
                                    "every line must be a secret starting with whsec_ (base64 after the prefix)",
                                );
                            } else if base64::Engine::decode(
                                &base64::engine::general_purpose::STANDARD,
                                &line["whsec_".len()..],
                            )
                            .is_err()
                            {
                                errs.push(
                                    t.key("secret_file"),
                                    "a whsec_ secret is not valid base64 after the prefix",
                                );
                            } else {
                                secrets.push(Secret::new(line.to_string()));
                            }
                        }
                        if secrets.is_empty()
                            && errs.0.iter().all(|e| e.path != t.key("secret_file"))
                        {
                            errs.push(t.key("secret_file"), "holds no whsec_ secret");
                        }
                    }
                    Err(e) => errs.push(t.key("secret_file"), e),
                }
            }
            match url {
                Some(url) => CrmKind::Webhook(WebhookSettings {
                    url,
                    secrets,
                    secret_file: secret_path_buf,
                    records_url,
                    allow_insecure,
                    ca_file: ca_file.clone(),
                    timeout,
                    alert_group_wait,
                }),
                None => {
                    if t.raw("url").is_none() {
                        errs.push(t.key("url"), "is required for type = \"webhook\"");
                    }
                    CrmKind::Builtin
                }
            }
        }
        "dataverse" => {
            let url = url_setting(&mut t, "url", allow_insecure, errs);
            let token_url = url_setting(&mut t, "token_url", allow_insecure, errs);
            let client_id = t.required_string("client_id", errs);
            let client_secret = secret(
                &mut t,
                "client_secret",
                "client_secret_file",
                "client_secret_env",
                base_dir,
                errs,
            );
            if client_secret.is_none() {
                errs.push(
                    t.key("client_secret_file"),
                    "a client secret is required (client_secret_file or client_secret_env)",
                );
            }
            let scope = t.nonempty_string("scope", errs);
            let page_size = t.int("page_size", 500, 1, 5000, errs) as u32;
            match (url, token_url, client_id, client_secret) {
                (Some(url), Some(token_url), Some(client_id), Some(client_secret)) => {
                    let url = url.trim_end_matches('/').to_string();
                    CrmKind::Dataverse(DataverseSettings {
                        scope: scope.unwrap_or_else(|| format!("{url}/.default")),
                        url,
                        token_url,
                        client_id,
                        client_secret,
                        allow_insecure,
                        ca_file: ca_file.clone(),
                        timeout,
                        page_size,
                    })
                }
                (url, token_url, _, _) => {
                    for (k, v) in [("url", url.is_some()), ("token_url", token_url.is_some())] {
                        if !v && t.raw(k).is_none() {
                            errs.push(t.key(k), "is required for type = \"dataverse\"");
                        }
                    }
                    CrmKind::Builtin
                }
            }
        }
        other => {
            errs.push(
                t.key("type"),
                format!("unknown CRM type {other:?}; expected one of builtin, webhook, dataverse"),
            );
            CrmKind::Builtin
        }
    };

    let mut dt = t.sub("delivery", errs);
    let retry_schedule = {
        let raw = dt.string_list("retry_schedule", errs);
        if raw.is_empty() {
            d.delivery.retry_schedule.clone()
        } else {
            let mut out = Vec::new();
            for (i, s) in raw.iter().enumerate() {
                match humantime::parse_duration(s.trim()) {
                    Ok(v) => out.push(v),
                    Err(e) => errs.push(
                        format!("{}[{i}]", dt.key("retry_schedule")),
                        format!("invalid duration {s:?} ({e}); use e.g. \"0s\", \"5s\", \"5m\""),
                    ),
                }
            }
            out
        }
    };
    let dead_letter_after = dt.duration(
        "dead_letter_after",
        d.delivery.dead_letter_after,
        Duration::from_secs(1),
        Duration::from_secs(365 * 86_400),
        errs,
    );
    let stuck_after = dt.duration(
        "stuck_after",
        d.delivery.stuck_after,
        Duration::from_secs(1),
        Duration::from_secs(365 * 86_400),
        errs,
    );
    dt.finish(errs);

    let mut pt = t.sub("parties", errs);
    let order = {
        let o = pt.string_list("order", errs);
        if o.is_empty() {
            d.parties.order.clone()
        } else {
            let mut seen = HashSet::new();
            for (i, k) in o.iter().enumerate() {
                let valid = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !valid {
                    errs.push(
                        format!("{}[{i}]", pt.key("order")),
                        format!("{k:?} is not a record kind (lower case letters, digits, _)"),
                    );
                } else if !seen.insert(k.clone()) {
                    errs.push(
                        format!("{}[{i}]", pt.key("order")),
                        format!("{k:?} is listed twice"),
                    );
                }
            }
            o
        }
    };
    let max_matches = pt.int("max_matches", 10, 1, 1000, errs) as usize;
    let auto_create = match pt.string("auto_create", errs).as_deref() {
        None | Some("none") => None,
        Some(k @ ("contact" | "lead")) => Some(k.to_string()),
        Some(other) => {
            errs.push(
                pt.key("auto_create"),
                format!("{other:?} is not one of none, contact, lead"),
            );
            None
        }
    };
    pt.finish(errs);
    t.finish(errs);

    CrmSettings {
        kind,
        record_sync_interval,
        delivery: DeliverySettings {
            retry_schedule,
            dead_letter_after,
            stuck_after,
        },
        parties: PartySettings {
            order,
            max_matches,
            auto_create,
        },
    }
}
