//! The Sent folder over IMAP: find the copy of a sent email (crash
//! recovery: was it delivered?) and file it there exactly once.
//!
//! A copy is recognised by its `X-CRM-Mailsync-Id` marker header (compose
//! puts the activity id there), which survives providers that rewrite the
//! Message-ID; failing that, by the Message-ID we generated. Both searches
//! are substring matches on the server, so every hit is checked for the
//! exact value. [`SentFolder::file`] searches before it APPENDs, so a retry
//! after a lost answer finds the first copy instead of adding a second.

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::connector::imap::{FolderNames, ImapClient, ImapError};
use crate::connector::oauth::TokenProvider;
use crate::connector::Credentials;
use crate::net::Endpoint;

/// Header that carries the activity id in every message we send.
pub const MARKER_HEADER: &str = "X-CRM-Mailsync-Id";

/// A copy in the Sent folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentCopyFound {
    /// UID in the Sent folder.
    pub uid: u32,
    /// The Message-ID the server stored (no angle brackets), if any.
    pub message_id: Option<String>,
}

/// One mailbox's Sent folder, with one logged-in connection kept between calls.
pub struct SentFolder {
    endpoint: Endpoint,
    credentials: Credentials,
    token_provider: Option<Arc<dyn TokenProvider>>,
    folder: String,
    client: Mutex<Option<ImapClient>>,
}

impl std::fmt::Debug for SentFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentFolder")
            .field("host", &self.endpoint.host)
            .field("folder", &self.folder)
            .finish()
    }
}

/// What one call does once connected.
#[derive(Clone, Copy)]
enum Op<'a> {
    Find,
    /// The message, and whether an earlier attempt may have filed it
    /// (then it is looked for first).
    File(&'a [u8], bool),
}

impl SentFolder {
    /// Prepares access to `folder`; connects on first use.
    pub fn new(
        endpoint: Endpoint,
        credentials: Credentials,
        token_provider: Option<Arc<dyn TokenProvider>>,
        folder: String,
    ) -> Self {
        SentFolder {
            endpoint,
            credentials,
            token_provider,
            folder,
            client: Mutex::new(None),
        }
    }

    /// The folder's name as configured.
    pub fn folder(&self) -> &str {
        &self.folder
    }

    /// A copy whose `X-CRM-Mailsync-Id` header is `marker` (else whose
    /// Message-ID is `message_id`, with or without angle brackets).
    pub async fn find(
        &self,
        marker: &str,
        message_id: &str,
    ) -> Result<Option<SentCopyFound>, ImapError> {
        self.run(marker, message_id, Op::Find).await
    }

    /// [`Self::find`], else APPEND `message` with `\Seen` and read back
    /// what the server stored: never two copies. `first_attempt`: nothing
    /// can have filed it yet (no earlier try, no crash since it was sent),
    /// so the search before the APPEND — a header scan of the whole folder
    /// on most servers — is skipped.
    pub async fn file(
        &self,
        marker: &str,
        message_id: &str,
        message: &[u8],
        first_attempt: bool,
    ) -> Result<SentCopyFound, ImapError> {
        match self
            .run(marker, message_id, Op::File(message, !first_attempt))
            .await?
        {
            Some(found) => Ok(found),
            None => Err(ImapError::Protocol(format!(
                "the message appended to {:?} cannot be found there",
                self.folder
            ))),
        }
    }

    /// Logs out the kept connection, if any.
    pub async fn close(&self) {
        if let Some(client) = self.client.lock().await.take() {
            let _ = client.logout().await;
        }
    }

    /// Runs `op` on the kept connection; a connection that turns out dead
    /// (the server closed it while idle) is replaced once.
    async fn run(
        &self,
        marker: &str,
        message_id: &str,
        op: Op<'_>,
    ) -> Result<Option<SentCopyFound>, ImapError> {
        let mut slot = self.client.lock().await;
        let mut may_retry = true;
        loop {
            let reused = slot.is_some();
            let client = match slot.as_mut() {
                Some(c) if c.is_connected() => c,
                _ => {
                    *slot = None;
                    slot.insert(self.connect().await?)
                }
            };
            let result = match op {
                Op::Find => find_in(client, &self.folder, marker, message_id).await,
                Op::File(message, look_first) => {
                    file_in(
                        client,
                        &self.folder,
                        marker,
                        message_id,
                        message,
                        look_first,
                    )
                    .await
                }
            };
            match result {
                Ok(found) => return Ok(found),
                Err(e) => {
                    let dead = !client.is_connected() || connection_error(&e);
                    if dead {
                        *slot = None;
                    }
                    if dead && reused && may_retry {
                        may_retry = false;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Connects and logs in (with a fresh OAuth token where configured).
    async fn connect(&self) -> Result<ImapClient, ImapError> {
        let creds = match (&self.token_provider, &self.credentials) {
            (Some(provider), Credentials::OAuth2 { user, .. }) => {
                let token = provider.token().await.map_err(|e| ImapError::Io {
                    // Transient like the connector's token errors: the
                    // renewing job may not have written the file yet.
                    context: "OAuth token",
                    source: std::io::Error::other(e.to_string()),
                })?;
                Credentials::OAuth2 {
                    user: user.clone(),
                    token: token.token.expose().to_string(),
                }
            }
            _ => self.credentials.clone(),
        };
        let mut client = ImapClient::connect_and_authenticate(&self.endpoint, &creds).await?;
        resolve_folder(&mut client, &self.folder).await?;
        Ok(client)
    }
}

fn connection_error(e: &ImapError) -> bool {
    matches!(
        e,
        ImapError::Io { .. } | ImapError::ConnectionLost(_) | ImapError::Bye { .. }
    )
}

/// Maps the configured name (`/` between levels) to the server's, as the
/// connector does: verbatim, with the server's delimiter, or ignoring case.
async fn resolve_folder(client: &mut ImapClient, folder: &str) -> Result<(), ImapError> {
    let listed = client.list_folders().await?;
    let mut names = FolderNames::from_listing(&listed);
    let wanted = names.server_name(folder);
    let hit = listed
        .iter()
        .find(|f| f.name == wanted)
        .or_else(|| listed.iter().find(|f| f.name.eq_ignore_ascii_case(&wanted)));
    if let Some(f) = hit {
        names.exact.insert(folder.to_string(), f.name.clone());
    }
    client.set_folder_names(names);
    Ok(())
}

async fn find_in(
    client: &mut ImapClient,
    folder: &str,
    marker: &str,
    message_id: &str,
) -> Result<Option<SentCopyFound>, ImapError> {
    client.examine(folder).await?;
    let mut uid = None;
    if !marker.is_empty() {
        let hits = client.search_header(MARKER_HEADER, marker).await?;
        if !hits.is_empty() {
            uid = client
                .fetch_header(&hits, MARKER_HEADER)
                .await?
                .into_iter()
                .find(|(_, v)| v.as_deref() == Some(marker))
                .map(|(u, _)| u);
        }
    }
    let bare = message_id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    if uid.is_none() && !bare.is_empty() {
        let wanted = format!("<{bare}>");
        let hits = client.search_header("Message-ID", &wanted).await?;
        if !hits.is_empty() {
            uid = client
                .fetch_message_ids(&hits)
                .await?
                .into_iter()
                .find(|(_, v)| v.as_deref() == Some(wanted.as_str()))
                .map(|(u, _)| u);
        }
    }
    let Some(uid) = uid else {
        return Ok(None);
    };
    found(client, uid).await.map(Some)
}

async fn file_in(
    client: &mut ImapClient,
    folder: &str,
    marker: &str,
    message_id: &str,
    message: &[u8],
    look_first: bool,
) -> Result<Option<SentCopyFound>, ImapError> {
    let searched = if look_first {
        find_in(client, folder, marker, message_id).await
    } else {
        client.examine(folder).await.map(|_| None)
    };
    match searched {
        Ok(Some(f)) => return Ok(Some(f)),
        Ok(None) => {}
        // A Sent folder that is not there yet is created, as mail clients do.
        Err(ImapError::FolderMissing { .. }) => client.create_folder(folder).await?,
        Err(e) => return Err(e),
    }
    let appended = client.append(folder, &["\\Seen"], message).await?;
    tracing::debug!(folder, uid = ?appended, "Sent copy appended");
    match appended {
        // APPENDUID names it: its stored Message-ID is read from it (a
        // fresh EXAMINE, so the session sees the new message).
        Some(uid) => {
            client.examine(folder).await?;
            found(client, uid).await.map(Some)
        }
        // Without UIDPLUS: found again by the same rules.
        None => find_in(client, folder, marker, message_id).await,
    }
}

/// The copy `uid` of the examined folder with its stored Message-ID.
async fn found(client: &mut ImapClient, uid: u32) -> Result<SentCopyFound, ImapError> {
    let message_id = client
        .fetch_message_ids(&[uid])
        .await?
        .into_iter()
        .find(|(u, _)| *u == uid)
        .and_then(|(_, m)| m)
        .map(|m| m.trim_start_matches('<').trim_end_matches('>').to_string())
        .filter(|m| !m.is_empty());
    Ok(SentCopyFound { uid, message_id })
}
