//! Exchange Online wiring: one [`GraphApp`] per `exchange_online` profile (its
//! token cache and request budget are the app's, shared by every mailbox of
//! the profile) and one [`GraphMailbox`] per mailbox, shared by the
//! mailbox's connector and its sender so both stay within Graph's four
//! requests in flight per mailbox.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, GraphCredential, GraphProfile, Mailbox, Profile};
use crate::connector::graph::{GraphApp, GraphMailbox, GraphSettings};
use crate::entra::{Credential, TokenSource};

/// The scope of an app-only Graph token.
const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// Graph clients by mailbox name; `Err` says why one could not be built
/// (the mailbox task reports it and waits to be re-enabled).
pub(super) type GraphMailboxes = HashMap<String, Result<Arc<GraphMailbox>, String>>;

/// The Entra apps of the `exchange_online` profiles, by profile name.
pub(super) type GraphApps = HashMap<String, Result<Arc<GraphApp>, String>>;

/// Builds the clients of every mailbox on an `exchange_online` profile.
pub(super) fn graph_mailboxes(config: &Config) -> (GraphMailboxes, GraphApps) {
    graph_mailboxes_keeping(config, &GraphMailboxes::new(), &GraphApps::new())
}

/// As [`graph_mailboxes`] after a reload: `keep_mailboxes` are the clients
/// of mailboxes left running (they stay theirs) and `keep_apps` the apps of
/// profiles that did not change (their token cache and request budget stay
/// shared with the new mailboxes of the profile).
pub(super) fn graph_mailboxes_keeping(
    config: &Config,
    keep_mailboxes: &GraphMailboxes,
    keep_apps: &GraphApps,
) -> (GraphMailboxes, GraphApps) {
    let mut apps = GraphApps::new();
    let mut out = GraphMailboxes::new();
    for mailbox in &config.mailboxes {
        let Some(profile) = config.profile_of(mailbox) else {
            continue;
        };
        let Some(graph) = &profile.graph else {
            continue;
        };
        let app = apps
            .entry(profile.name.clone())
            .or_insert_with(|| match keep_apps.get(&profile.name) {
                Some(app) => app.clone(),
                None => graph_app(profile, graph).map(Arc::new),
            })
            .clone();
        let client = match keep_mailboxes.get(&mailbox.name) {
            Some(client) => client.clone(),
            None => app.map(|app| GraphMailbox::new(app, &graph_settings(profile, mailbox))),
        };
        out.insert(mailbox.name.clone(), client);
    }
    (out, apps)
}

/// The Entra app of a profile: HTTPS with certificate verification (system
/// roots plus `ca_file`); plaintext only where the config allowed it.
fn graph_app(profile: &Profile, graph: &GraphProfile) -> Result<GraphApp, String> {
    let http = GraphApp::http_client(
        profile.ca_file.as_deref(),
        profile.connect_timeout,
        profile.io_timeout,
    )
    .map_err(|e| format!("profile {:?}: {e}", profile.name))?;
    let credential = match (&graph.credential, &graph.client_secret_file) {
        // Read again at every token request: a renewed secret needs no restart.
        (GraphCredential::Secret(_), Some(file)) => Credential::SecretFile(file.clone()),
        (GraphCredential::Secret(s), None) => Credential::Secret(s.clone()),
        (
            GraphCredential::Certificate {
                cert_file,
                key_file,
            },
            _,
        ) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| {
                    format!(
                        "profile {:?}: cannot read {}: {e}",
                        profile.name,
                        p.display()
                    )
                })
            };
            Credential::Certificate {
                cert_pem: read(cert_file)?,
                key_pem: read(key_file)?,
            }
        }
    };
    let token = TokenSource::new(
        http.clone(),
        graph.token_url.clone(),
        graph.client_id.clone(),
        credential,
        GRAPH_SCOPE.to_string(),
    );
    Ok(GraphApp::new(http, token, graph.requests_per_minute))
}

/// What one mailbox's connector needs from its profile and its own settings.
pub(super) fn graph_settings(profile: &Profile, mailbox: &Mailbox) -> GraphSettings {
    let graph = profile.graph.as_ref();
    let mut folders = vec!["Inbox".to_string()];
    for f in mailbox
        .tracked_folders
        .iter()
        .map(|r| &r.folder)
        .chain(&mailbox.extra_folders)
    {
        let f = graph_folder_path(f);
        if !folders.contains(&f) {
            folders.push(f);
        }
    }
    GraphSettings {
        mailbox: mailbox.name.clone(),
        user: mailbox
            .username
            .clone()
            .unwrap_or_else(|| mailbox.email.clone()),
        graph_url: graph.map_or_else(
            || crate::config::GRAPH_URL.to_string(),
            |g| g.graph_url.clone(),
        ),
        folders,
        page_size: graph.map_or(100, |g| g.page_size),
        batch_size: profile.batch_size,
        max_message_size: profile.max_message_size,
        processed_category: graph.and_then(|g| g.processed_category.clone()),
        delete_after_processing: mailbox.delete_after_processing,
        move_failed_to: profile.move_failed_to.as_deref().map(graph_folder_path),
        request_timeout: profile.io_timeout,
        connect_timeout: profile.connect_timeout,
        max_in_flight: graph.map_or(crate::connector::graph::MAX_IN_FLIGHT, |g| {
            g.max_concurrent_requests as usize
        }),
        client_secret_expires_at: graph.and_then(|g| g.client_secret_expires_at),
        request_limit: graph.map_or((10_000, std::time::Duration::from_secs(600)), |g| {
            (g.mailbox_request_limit, g.mailbox_request_window)
        }),
        process_email_from: profile.process_email_from,
    }
}

/// A configured folder as a Graph display path: IMAP habits (`INBOX/x`)
/// name the same folder as `Inbox/x`; the levels are kept as written.
fn graph_folder_path(folder: &str) -> String {
    let trimmed = folder.trim_matches('/');
    match trimmed.split_once('/') {
        Some((first, rest)) if first.eq_ignore_ascii_case("inbox") => format!("Inbox/{rest}"),
        None if trimmed.eq_ignore_ascii_case("inbox") => "Inbox".to_string(),
        _ => trimmed.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mailboxes: &[&str], page_size: u32) -> Config {
        let mut text = format!(
            "[admin]\ntoken = \"0123456789abcdef\"\n[[profiles]]\nname = \"m365\"\ntype = \"exchange_online\"\ntenant_id = \"contoso.onmicrosoft.com\"\nclient_id = \"11111111-2222-3333-4444-555555555555\"\nclient_secret = \"s3cret\"\npage_size = {page_size}\n"
        );
        for m in mailboxes {
            text.push_str(&format!(
                "[[mailboxes]]\nname = \"{m}\"\nprofile = \"m365\"\nemail = \"{m}@contoso.test\"\n"
            ));
        }
        crate::config::from_toml_str(&text, Vec::new(), std::path::Path::new(".")).unwrap()
    }

    fn same<T>(a: &Result<Arc<T>, String>, b: &Result<Arc<T>, String>) -> bool {
        matches!((a, b), (Ok(a), Ok(b)) if Arc::ptr_eq(a, b))
    }

    #[test]
    fn a_reload_keeps_the_clients_left_running_and_the_apps_of_unchanged_profiles() {
        let (clients, apps) = graph_mailboxes(&config(&["a", "b"], 100));
        assert_eq!(apps.len(), 1);
        // b left running, c added, the profile unchanged: b keeps its
        // client, and c's is built on the profile's app, kept (one token
        // cache and request budget for both).
        let keep: GraphMailboxes = [("b".to_string(), clients["b"].clone())].into();
        let (after, after_apps) = graph_mailboxes_keeping(&config(&["b", "c"], 100), &keep, &apps);
        assert!(same(&after["b"], &clients["b"]));
        assert!(after["c"].is_ok());
        assert!(same(&after_apps["m365"], &apps["m365"]));
        // The profile changed: nothing is kept, a new app.
        let (_, changed_apps) = graph_mailboxes_keeping(
            &config(&["b"], 50),
            &GraphMailboxes::new(),
            &GraphApps::new(),
        );
        assert!(!same(&changed_apps["m365"], &apps["m365"]));
    }

    #[test]
    fn imap_style_inbox_names_become_graph_display_paths() {
        assert_eq!(
            graph_folder_path("INBOX/Customers/Contoso"),
            "Inbox/Customers/Contoso"
        );
        assert_eq!(graph_folder_path("inbox"), "Inbox");
        assert_eq!(graph_folder_path("/Inbox/Orders/"), "Inbox/Orders");
        assert_eq!(graph_folder_path("Undeliverable"), "Undeliverable");
    }
}
