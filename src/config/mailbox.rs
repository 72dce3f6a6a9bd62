//! `[[mailboxes]]`: mailboxes, their tracked folders and automatic-mail policy.

use super::*;

pub(super) fn mailbox(
    mut t: Table<'_>,
    profiles: &[Profile],
    corr: &CorrelationSettings,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<Mailbox> {
    let name = t.required_string("name", errs);
    let profile_name = t.required_string("profile", errs);
    let profile = profile_name.as_ref().and_then(|n| {
        let p = profiles.iter().find(|p| &p.name == n);
        if p.is_none() {
            let known: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
            errs.push(
                t.key("profile"),
                format!(
                    "no profile named {n:?} (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        p
    });
    let email = t.required_string("email", errs);
    if let Some(e) = &email {
        if !looks_like_email(e) {
            errs.push(t.key("email"), format!("{e:?} is not an email address"));
        }
    }
    let owner_kind = t.choice(
        "owner_kind",
        OwnerKind::User,
        &[("user", OwnerKind::User), ("queue", OwnerKind::Queue)],
        errs,
    );
    let owner_id = t
        .string("owner_id", errs)
        .or_else(|| name.clone())
        .unwrap_or_default();
    let user_number = t.int("user_number", 0, 0, i64::from(u32::MAX), errs) as u32;
    let incoming = t.choice(
        "incoming",
        IncomingDelivery::ServerSideSync,
        &[
            ("none", IncomingDelivery::None),
            ("server_side_sync", IncomingDelivery::ServerSideSync),
            ("forward_mailbox", IncomingDelivery::ForwardMailbox),
        ],
        errs,
    );
    let deliveries = [
        ("none", Delivery::None),
        ("server_side_sync", Delivery::ServerSideSync),
    ];
    let outgoing = t.choice("outgoing", Delivery::None, &deliveries, errs);
    let act = t.choice("act", Delivery::None, &deliveries, errs);
    let approval = t.choice(
        "approval",
        ApprovalStatus::Empty,
        &[
            ("empty", ApprovalStatus::Empty),
            ("approved", ApprovalStatus::Approved),
            ("pending", ApprovalStatus::Pending),
            ("rejected", ApprovalStatus::Rejected),
        ],
        errs,
    );
    let enabled = t.bool("enabled", true, errs);
    // Dynamics has no such limit; a runaway workflow then mails customers
    // until someone notices. 60 a minute is far above a person's pace.
    let send_rate_per_minute = t.int("send_rate_per_minute", 60, 1, 100_000, errs) as u32;
    let path = t.string("path", errs).map(PathBuf::from);
    let username = t.nonempty_string("username", errs);
    let errors_before_secret = errs.0.len();
    let secret = secret(
        &mut t,
        "password",
        "password_file",
        "password_env",
        base_dir,
        errs,
    );
    // A secret that was given but could not be read is already reported;
    // "a password is required" on top of it would only be noise.
    let secret_reported = errs.0.len() > errors_before_secret;
    let password_file = secret_file_of(&mut t, "password_file", base_dir);
    let (token_file, token_expires_at) = token_source(&mut t, secret.is_some(), base_dir, errs);
    if let Some(p) = profile.filter(|p| p.auth != AuthKind::OAuth2) {
        if token_file.is_some() || token_expires_at.is_some() {
            errs.push(
                t.key(if token_file.is_some() {
                    "token_file"
                } else {
                    "token_expires_at"
                }),
                format!(
                    "is for OAuth2 tokens; profile {:?} has auth = \"password\"",
                    p.name
                ),
            );
        }
    }
    let delete_after_processing = t.bool(
        "delete_after_processing",
        incoming == IncomingDelivery::ForwardMailbox,
        errs,
    );
    let track = t.choice(
        "track",
        TrackFilter::All,
        &[
            ("all", TrackFilter::All),
            ("responses_to_crm_email", TrackFilter::ResponsesToCrmEmail),
            // Deprecated spelling of responses_to_crm_email, still accepted.
            ("responses_only", TrackFilter::ResponsesToCrmEmail),
            ("from_crm_records", TrackFilter::FromCrmRecords),
            (
                "from_email_enabled_records",
                TrackFilter::FromEmailEnabledRecords,
            ),
            ("none", TrackFilter::None),
        ],
        errs,
    );
    // Dynamics offers queues only these two (a queue has no personal
    // "from my contacts" notion).
    if owner_kind == OwnerKind::Queue
        && !matches!(track, TrackFilter::All | TrackFilter::ResponsesToCrmEmail)
    {
        errs.push(
            t.key("track"),
            format!(
                "{:?} is not allowed for a queue mailbox (owner_kind = \"queue\"); allowed: all, responses_to_crm_email",
                track.as_str()
            ),
        );
    }
    let extra_folders = t.string_list("folders", errs);
    let automatic_mail = automatic_mail(t.sub("automatic_mail", errs), errs);

    let mut tracked_folders = Vec::new();
    let tf_path = t.key("tracked_folders");
    for (i, v) in t.array("tracked_folders", errs).into_iter().enumerate() {
        let mut ft = Table::new(format!("{tf_path}[{i}]"), Some(v), errs);
        let folder = ft.required_string("folder", errs);
        let regarding =
            ft.required_string("regarding", errs)
                .and_then(|r| match r.parse::<RecordRef>() {
                    Ok(r) => Some(r),
                    Err(m) => {
                        errs.push(ft.key("regarding"), m);
                        None
                    }
                });
        ft.finish(errs);
        if let (Some(folder), Some(regarding)) = (folder, regarding) {
            if tracked_folders
                .iter()
                .any(|r: &FolderRule| r.folder == folder)
            {
                errs.push(
                    format!("{tf_path}[{i}].folder"),
                    format!("folder {folder:?} is tracked twice"),
                );
            }
            tracked_folders.push(FolderRule { folder, regarding });
        }
    }
    if tracked_folders.len() > corr.max_tracked_folders {
        errs.push(
            tf_path.clone(),
            format!(
                "{} tracked folders exceed the limit of {} (correlation.max_tracked_folders)",
                tracked_folders.len(),
                corr.max_tracked_folders
            ),
        );
    }

    if let Some(p) = profile {
        match p.kind {
            ProfileType::Maildir => {
                if path.is_none() {
                    errs.push(
                        t.key("path"),
                        "is required for a mailbox on a maildir profile",
                    );
                }
            }
            ProfileType::ExchangeOnline => {
                if path.is_some() {
                    errs.push(t.key("path"), "only maildir mailboxes have a path");
                }
                // Graph authenticates as the app, not as the mailbox's user.
                if secret.is_some() || token_file.is_some() {
                    errs.push(
                        t.key("password"),
                        format!(
                            "an exchange_online mailbox has no password or token of its own: profile {:?} signs in as its Entra app; remove it",
                            p.name
                        ),
                    );
                }
            }
            _ => {
                if path.is_some() {
                    errs.push(t.key("path"), "only maildir mailboxes have a path");
                }
                if username.is_none() && p.username.is_none() {
                    errs.push(
                        t.key("username"),
                        format!("is required (or set it on profile {:?})", p.name),
                    );
                }
                if secret.is_none()
                    && !secret_reported
                    && p.secret.is_none()
                    && token_file.is_none()
                    && p.token_file.is_none()
                {
                    let what = if p.auth == AuthKind::OAuth2 {
                        "an OAuth2 access token"
                    } else {
                        "a password"
                    };
                    let keys = if p.auth == AuthKind::OAuth2 {
                        "token_file, password, password_file or password_env"
                    } else {
                        "password, password_file or password_env"
                    };
                    errs.push(
                        t.key("password"),
                        format!(
                            "{what} is required: {keys} (here or on profile {:?})",
                            p.name
                        ),
                    );
                }
            }
        }
        if !p.kind.has_folders() {
            if !tracked_folders.is_empty() {
                errs.push(
                    tf_path.clone(),
                    "POP3 is email-only: folder tracking needs an IMAP or Exchange profile",
                );
            }
            if !extra_folders.is_empty() {
                errs.push(t.key("folders"), "POP3 has only the inbox: remove folders");
            }
        }
        if p.kind.supports_act() && act != Delivery::None {
            errs.push(
                t.key("act"),
                "appointments, contacts and tasks are not synchronized in this version (email only); set act = \"none\"",
            );
        }
        if !p.kind.supports_act() && act != Delivery::None {
            errs.push(
                t.key("act"),
                format!(
                    "appointments, contacts and tasks need an Exchange profile; {:?} is email-only",
                    p.name
                ),
            );
        }
    }
    if owner_kind == OwnerKind::Queue && !tracked_folders.is_empty() {
        errs.push(tf_path, "folder tracking is for user mailboxes, not queues");
    }
    t.finish(errs);
    Some(Mailbox {
        name: name?,
        profile: profile_name?,
        email: email?,
        owner_kind,
        owner_id,
        user_number,
        incoming,
        outgoing,
        act,
        approval,
        enabled,
        path,
        username,
        secret,
        token_file,
        token_expires_at,
        password_file,
        tracked_folders,
        extra_folders,
        delete_after_processing,
        track,
        automatic_mail,
        send_rate_per_minute,
    })
}

/// `mailboxes[i].automatic_mail`: the action per class of automatic mail
/// that correlates to nothing, and the loop detector.
pub(super) fn automatic_mail(
    mut t: Table<'_>,
    errs: &mut Errors,
) -> crate::filter::AutomaticMailPolicy {
    use crate::filter::{AutomaticAction, AutomaticMailPolicy};
    let d = AutomaticMailPolicy::default();
    let actions = [
        ("track", AutomaticAction::Track),
        ("track_no_reply", AutomaticAction::TrackNoReply),
        ("skip", AutomaticAction::Skip),
    ];
    let policy = AutomaticMailPolicy {
        auto_reply: t.choice("auto_reply", d.auto_reply, &actions, errs),
        bounce: t.choice("bounce", d.bounce, &actions, errs),
        bulk: t.choice("bulk", d.bulk, &actions, errs),
        list: t.choice("list", d.list, &actions, errs),
        loop_limit: t.int("loop_limit", i64::from(d.loop_limit), 1, 10_000, errs) as u32,
        loop_window: t
            .duration(
                "loop_window",
                Duration::from_secs(d.loop_window as u64),
                Duration::from_secs(60),
                Duration::from_secs(7 * 24 * 3600),
                errs,
            )
            .as_secs() as i64,
    };
    t.finish(errs);
    policy
}

/// A local part, `@` and a domain. A domain without a dot (`alice@localhost`,
/// `sales@crm`) is legal on internal networks.
pub(super) fn looks_like_email(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !s.contains(char::is_whitespace)
        }
        None => false,
    }
}
