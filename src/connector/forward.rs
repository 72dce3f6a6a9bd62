//! Forward mailbox: a shared mailbox that receives mail forwarded by users'
//! server-side rules (Dynamics "Forward Mailbox").
//!
//! Before the pipeline sees a message, [`unwrap_forwarded`] replaces it by the
//! ORIGINAL message (the attached `message/rfc822` of a forward-as-attachment;
//! a redirect already is the original) and records who forwarded it in an
//! `X-CRM-Forwarded-By` header at the top. The source key stays the one of the
//! wrapper, so acknowledging (deleting) it still works; dedupe by Message-ID +
//! content hash then applies to the original.

use mail_parser::{HeaderValue, MessageParser, PartType};

use super::RawMessage;

/// Header added to the original message naming the forwarding user.
pub const FORWARDED_BY_HEADER: &str = "X-CRM-Forwarded-By";

/// The user a forwarded message is attributed to, from the envelope-like
/// headers a server-side rule leaves behind, most specific first.
pub fn forwarding_user(raw: &[u8]) -> Option<String> {
    let msg = crate::parse::guarded(|| MessageParser::default().parse_headers(raw)).ok()??;
    for name in [
        "X-Original-To",
        "Resent-From",
        "Resent-Sender",
        "Delivered-To",
    ] {
        let Some(v) = msg.header(name) else {
            continue;
        };
        let found = match v {
            HeaderValue::Address(a) => a.first().and_then(|a| a.address()).map(|s| s.to_string()),
            HeaderValue::Text(t) => Some(t.trim().to_string()),
            HeaderValue::TextList(l) => l.first().map(|t| t.trim().to_string()),
            _ => None,
        };
        if let Some(f) = found.filter(|f| !f.is_empty() && !f.contains(['\r', '\n'])) {
            return Some(f.trim_matches(['<', '>']).to_string());
        }
    }
    None
}

/// The original message of a forward-as-attachment, if there is one.
fn attached_original(raw: &[u8]) -> Option<(Vec<u8>, Option<String>)> {
    let msg = crate::parse::guarded(|| MessageParser::default().parse(raw)).ok()??;
    let sender = msg
        .from()
        .and_then(|f| f.first())
        .and_then(|a| a.address())
        .map(|s| s.to_string());
    for part in msg.parts.iter() {
        if let PartType::Message(inner) = &part.body {
            let bytes = inner.raw_message().to_vec();
            if !bytes.is_empty() {
                return Some((bytes, sender));
            }
        }
    }
    None
}

/// Replaces a forwarded message by its original, attributed to the forwarding user.
pub fn unwrap_forwarded(mut msg: RawMessage) -> RawMessage {
    let (original, user) = match attached_original(&msg.raw) {
        // Forward-as-attachment: the forwarding user is the wrapper's envelope
        // recipient alias, else its sender.
        Some((inner, sender)) => (Some(inner), forwarding_user(&msg.raw).or(sender)),
        None => (None, forwarding_user(&msg.raw)),
    };
    if let Some(inner) = original {
        msg.raw = inner;
    }
    if let Some(user) = user {
        let crlf = msg.raw.windows(2).any(|w| w == b"\r\n");
        let mut out = format!(
            "{FORWARDED_BY_HEADER}: {user}{}",
            if crlf { "\r\n" } else { "\n" }
        )
        .into_bytes();
        out.extend_from_slice(&msg.raw);
        msg.raw = out;
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SourceKey;

    fn raw(b: &str) -> RawMessage {
        RawMessage {
            source: SourceKey {
                mailbox: "fwd".into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: "1".into(),
            },
            raw: b.as_bytes().to_vec(),
            received_at: None,
            too_large: None,
            unfetchable: None,
        }
    }

    #[test]
    fn attachment_forward_yields_original_attributed_to_forwarder() {
        let m = "From: Alice <alice@example.test>\r\nTo: crm-forward@example.test\r\nSubject: Fwd: Order\r\nMessage-ID: <wrap@x>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: Customer <c@customer.example>\r\nTo: alice@example.test\r\nSubject: Order\r\nMessage-ID: <orig@customer.example>\r\n\r\nHello\r\n--b--\r\n";
        let out = unwrap_forwarded(raw(m));
        let text = String::from_utf8(out.raw).unwrap();
        assert!(
            text.starts_with("X-CRM-Forwarded-By: alice@example.test\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Message-ID: <orig@customer.example>"),
            "{text}"
        );
        assert!(!text.contains("<wrap@x>"), "{text}");
    }

    #[test]
    fn redirect_is_kept_and_attributed_by_envelope_header() {
        let m = "X-Original-To: bob@example.test\nDelivered-To: crm-forward@example.test\nFrom: c@customer.example\nTo: bob@example.test\nSubject: Hi\nMessage-ID: <r@x>\n\nbody\n";
        let out = unwrap_forwarded(raw(m));
        let text = String::from_utf8(out.raw).unwrap();
        assert!(
            text.starts_with("X-CRM-Forwarded-By: bob@example.test\n"),
            "{text}"
        );
        assert!(text.ends_with(m), "{text}");
    }

    #[test]
    fn unattributable_message_passes_unchanged() {
        let m = "From: c@customer.example\nSubject: Hi\n\nbody\n";
        assert_eq!(unwrap_forwarded(raw(m)).raw, m.as_bytes());
    }
}
