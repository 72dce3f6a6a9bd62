//! What the outgoing side needs from IMAP: `APPEND` (with the APPENDUID of
//! UIDPLUS) for the Sent copy, and header searches to find that copy again.

use async_imap::imap_proto::{
    rfc4315::UidSetMember, AttributeValue, Response, ResponseCode, Status,
};
use tokio::io::AsyncWriteExt;

use super::codec::{self, mutf7_encode, quote};
use super::error::{code_name, split_code};
use super::{note_untagged, ImapClient, ImapError};

impl ImapClient {
    /// `APPEND` of `message` to `folder` with `flags` (`\Seen`, keywords).
    /// Returns the new message's UID when the server reports APPENDUID
    /// (UIDPLUS). Uses a non-synchronizing literal where LITERAL+ is offered,
    /// else waits for the server's go-ahead. Works with or without a
    /// selected folder.
    pub async fn append(
        &mut self,
        folder: &str,
        flags: &[&str],
        message: &[u8],
    ) -> Result<Option<u32>, ImapError> {
        for flag in flags {
            let name = flag.strip_prefix('\\').unwrap_or(flag);
            if !codec::is_keyword_atom(name) {
                return Err(ImapError::InvalidInput(format!(
                    "{flag:?} is not a valid flag"
                )));
            }
        }
        let mailbox = quote(&mutf7_encode(&self.names.server_name(folder)))?;
        let literal_plus = self.has_cap("LITERAL+");
        let flag_list = if flags.is_empty() {
            String::new()
        } else {
            format!(" ({})", flags.join(" "))
        };
        let line = format!(
            "APPEND {mailbox}{flag_list} {{{}{}}}",
            message.len(),
            if literal_plus { "+" } else { "" }
        );

        self.begin_command()?;
        let Some(session) = self.session.as_mut() else {
            return Err(ImapError::ConnectionLost("connection closed".into()));
        };
        let events = &mut self.events;
        let bye = &mut self.bye;
        let result = async {
            let id = session
                .run_command(&line)
                .await
                .map_err(|e| ImapError::from_async("APPEND", e))?;
            let mut go_ahead = literal_plus;
            let mut sent = false;
            loop {
                if go_ahead && !sent {
                    let stream = session.get_mut();
                    let io = |e| ImapError::io("APPEND", e);
                    stream.write_all(message).await.map_err(io)?;
                    stream.write_all(b"\r\n").await.map_err(io)?;
                    stream.flush().await.map_err(io)?;
                    sent = true;
                }
                let resp = match session.read_response().await {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        return Err(match bye.take() {
                            Some(text) => ImapError::Bye { text },
                            None => ImapError::ConnectionLost("during APPEND".into()),
                        })
                    }
                    Err(e) => return Err(ImapError::io("APPEND", e)),
                };
                match resp.parsed() {
                    Response::Continue { .. } if !go_ahead => go_ahead = true,
                    Response::Done {
                        tag,
                        status,
                        outcome,
                    } if *tag == id => {
                        let uid = match &outcome.code {
                            Some(ResponseCode::AppendUid(_, uids)) => {
                                uids.last().map(|m| match m {
                                    UidSetMember::Uid(u) => *u,
                                    UidSetMember::UidRange(r) => *r.end(),
                                })
                            }
                            _ => None,
                        };
                        let known = outcome.code.as_ref().map(code_name);
                        let (code, text) =
                            split_code(known, outcome.information.as_deref().unwrap_or(""));
                        return match status {
                            Status::Ok => Ok(uid),
                            Status::No => Err(ImapError::No {
                                command: "APPEND",
                                code,
                                text,
                            }),
                            Status::Bad => Err(ImapError::Bad {
                                command: "APPEND",
                                code,
                                text,
                            }),
                            other => Err(ImapError::Protocol(format!(
                                "APPEND: unexpected tagged status {other:?}"
                            ))),
                        };
                    }
                    other => note_untagged(events, bye, other),
                }
            }
        }
        .await;
        self.end_command(&result);
        result.map_err(|e| e.folder_context(folder))
    }

    /// UIDs in the selected folder whose header `header` contains `value`
    /// (`UID SEARCH HEADER`, a case-insensitive substring match on the
    /// server: check the hits with [`Self::fetch_header`] when an exact
    /// value matters). Ascending.
    pub async fn search_header(
        &mut self,
        header: &str,
        value: &str,
    ) -> Result<Vec<u32>, ImapError> {
        check_header_name(header)?;
        if value.is_empty() {
            return Err(ImapError::InvalidInput(
                "an empty HEADER search matches every message with the header".into(),
            ));
        }
        if !value.is_ascii() {
            // A quoted string is 7-bit; non-ASCII would need CHARSET and a literal.
            return Err(ImapError::InvalidInput(format!(
                "header search value {:?} is not ASCII",
                codec::truncate(value, 80)
            )));
        }
        let criteria = format!("HEADER {} {}", quote(header)?, quote(value)?);
        self.uid_search(&criteria).await
    }

    /// The (unfolded, trimmed) value of header `name` of each UID
    /// (`BODY.PEEK[HEADER.FIELDS (name)]`), sorted by UID; `None` where the
    /// message has no such header.
    pub async fn fetch_header(
        &mut self,
        uids: &[u32],
        name: &str,
    ) -> Result<Vec<(u32, Option<String>)>, ImapError> {
        check_header_name(name)?;
        let item = format!("BODY.PEEK[HEADER.FIELDS ({})]", name.to_ascii_uppercase());
        self.fetch_attribute(uids, &item, |a| match a {
            AttributeValue::BodySection { data, .. } => {
                Some(data.as_deref().and_then(|d| codec::header_value(d, name)))
            }
            _ => None,
        })
        .await
    }
}

/// A header field name (RFC 5322 ftext) that is also a safe IMAP atom.
fn check_header_name(name: &str) -> Result<(), ImapError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ImapError::InvalidInput(format!(
            "{:?} is not a header name",
            codec::truncate(name, 80)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_unfolded_and_matched_by_name() {
        let block = b"X-CRM-Mailsync-Id: 42\r\n\r\n";
        assert_eq!(
            codec::header_value(block, "x-crm-mailsync-id").as_deref(),
            Some("42")
        );
        let block = b"Subject: a\r\n b\r\nX-Other: 1\r\n";
        assert_eq!(
            codec::header_value(block, "Subject").as_deref(),
            Some("a b")
        );
        assert_eq!(codec::header_value(block, "X-Missing"), None);
        assert_eq!(codec::header_value(b"X-E:   \r\n", "X-E"), None);
    }

    #[test]
    fn header_names_must_be_atoms() {
        assert!(check_header_name("Message-ID").is_ok());
        assert!(check_header_name("X-CRM-Mailsync-Id").is_ok());
        for bad in ["", "A B", "A)", "X\r\n", "Sub:ject", "\"x\""] {
            assert!(check_header_name(bad).is_err(), "{bad:?}");
        }
    }
}
