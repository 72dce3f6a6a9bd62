//! The deployment marker of an IMAP mailbox (see [`crate::deployment`]):
//! a server annotation (RFC 5464 METADATA) where the server has it, else
//! the newest message of a dedicated folder that is created unsubscribed, so
//! mail clients do not show it by default.

use async_imap::imap_proto::{MailboxDatum, Response};

use super::codec::{self, mutf7_encode, quote};
use super::{ImapClient, ImapError};
use crate::deployment::{Marker, MarkerSlot, MARKER_HEADER};

/// The server annotation holding the marker (a private vendor entry).
pub const METADATA_ENTRY: &str = "/private/vendor/crm-mailsync/deployment";

/// The folder holding the marker message on servers without METADATA.
pub const MARKER_FOLDER: &str = "CRM-Mailsync";

const HOST_HEADER: &str = "X-CRM-Mailsync-Host";
const CLAIMED_HEADER: &str = "X-CRM-Mailsync-Claimed-At";

impl ImapClient {
    /// Whether the server keeps server annotations (RFC 5464).
    pub fn has_server_metadata(&self) -> bool {
        self.has_cap("METADATA") || self.has_cap("METADATA-SERVER")
    }

    /// The marker this mailbox holds.
    pub async fn read_marker(&mut self) -> Result<MarkerSlot, ImapError> {
        if self.has_server_metadata() {
            let value = self.get_server_metadata(METADATA_ENTRY).await?;
            return Ok(value
                .as_deref()
                .and_then(Marker::from_annotation)
                .map_or(MarkerSlot::Empty, MarkerSlot::Held));
        }
        match self.examine(MARKER_FOLDER).await {
            Ok(_) => {}
            Err(ImapError::FolderMissing { .. }) => return Ok(MarkerSlot::Empty),
            Err(e) => return Err(e),
        }
        let Some(&newest) = self.uids_from(1).await?.iter().max() else {
            return Ok(MarkerSlot::Empty);
        };
        let mail = self.fetch_messages(&[newest]).await?;
        let Some(raw) = mail.first().map(|m| m.raw.as_slice()) else {
            return Ok(MarkerSlot::Empty);
        };
        let header = |name| codec::header_value(raw, name);
        Ok(header(MARKER_HEADER)
            .and_then(|id| {
                Marker::from_headers(
                    &id,
                    header(HOST_HEADER).as_deref(),
                    header(CLAIMED_HEADER).as_deref(),
                )
            })
            .map_or(MarkerSlot::Empty, MarkerSlot::Held))
    }

    /// Replaces the mailbox's marker with `marker`. In the folder, the new
    /// message is appended first and the older ones deleted after, so there
    /// is a marker at every moment (see [`superseded`]).
    pub async fn write_marker(&mut self, marker: &Marker) -> Result<(), ImapError> {
        if self.has_server_metadata() {
            return self
                .set_server_metadata(METADATA_ENTRY, &marker.to_annotation())
                .await;
        }
        self.create_hidden_folder(MARKER_FOLDER).await?;
        let appended = self
            .append(MARKER_FOLDER, &["\\Seen"], &marker.to_message())
            .await?;
        self.select(MARKER_FOLDER).await?;
        let uids = self.uids_from(1).await?;
        // Without APPENDUID the newest is the one just appended.
        let keep = appended.or_else(|| uids.iter().max().copied());
        let old = superseded(uids, keep);
        if !old.is_empty() {
            self.delete(&old).await?;
        }
        Ok(())
    }

    /// `GETMETADATA "" entry`: the server annotation's value, `None` (NIL)
    /// when it has none.
    pub async fn get_server_metadata(&mut self, entry: &str) -> Result<Option<String>, ImapError> {
        let line = format!("GETMETADATA \"\" {}", quote(entry)?);
        let mut value = None;
        self.exec("GETMETADATA", &line, |r| match r {
            Response::MailboxData(MailboxDatum::MetadataSolicited { values, .. }) => {
                if let Some(m) = values.iter().find(|m| m.entry.eq_ignore_ascii_case(entry)) {
                    value = m.value.clone();
                }
                true
            }
            _ => false,
        })
        .await?;
        Ok(value)
    }

    /// `SETMETADATA "" (entry value)`.
    pub async fn set_server_metadata(&mut self, entry: &str, value: &str) -> Result<(), ImapError> {
        let line = format!("SETMETADATA \"\" ({} {})", quote(entry)?, quote(value)?);
        self.exec("SETMETADATA", &line, |_| false).await?;
        Ok(())
    }

    /// `CREATE` without `SUBSCRIBE`; succeeds if the folder exists.
    pub async fn create_hidden_folder(&mut self, name: &str) -> Result<(), ImapError> {
        let q = quote(&mutf7_encode(&self.names.server_name(name)))?;
        match self.exec("CREATE", &format!("CREATE {q}"), |_| false).await {
            Ok(_) => Ok(()),
            Err(ImapError::No {
                code: Some(code), ..
            }) if code == "ALREADYEXISTS" => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The marker messages a write that appended `keep` deletes: only those
/// older (lower UID). One appended after ours is a concurrent write (the
/// mailbox task's start-up test and an on-demand one claim at once): it is
/// the newest, so the marker that counts, and deleting it too would leave
/// the folder empty when that write deletes ours.
fn superseded(uids: Vec<u32>, keep: Option<u32>) -> Vec<u32> {
    let Some(keep) = keep else {
        return Vec::new();
    };
    uids.into_iter().filter(|u| *u < keep).collect()
}

#[cfg(test)]
mod tests {
    use super::superseded;

    #[test]
    fn a_write_deletes_the_older_markers_and_keeps_a_newer_concurrent_one() {
        assert_eq!(superseded(vec![3, 5, 7], Some(7)), vec![3, 5]);
        // Another write appended 8 after ours (7): both stay here; that
        // write deletes ours, and 8 is the marker.
        assert_eq!(superseded(vec![3, 7, 8], Some(7)), vec![3]);
        assert_eq!(superseded(vec![7], Some(7)), Vec::<u32>::new());
        assert!(superseded(Vec::new(), None).is_empty());
    }
}
