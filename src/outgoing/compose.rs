//! Composition: the MIME of an outgoing email, built with lettre.
//!
//! Everything that must be known before the SMTP transaction is decided
//! here and stored with the queue row: the Message-ID (so a crash can be
//! resolved by looking for it), the marker header (so a copy whose
//! Message-ID a provider rewrote is still found), the subject with its
//! tracking token, the envelope.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox as Address, MultiPart, SinglePart};

use crate::config::OutgoingSettings;
use crate::model::UnixTime;

/// Header carrying the marker every outgoing message gets; the Sent-folder
/// search looks for it first (see `sent_copy`).
pub const MARKER_HEADER: &str = "X-CRM-Mailsync-Id";

/// An attachment, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentPart {
    pub filename: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// What goes into one message.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    /// The mailbox's address (`From`, envelope sender).
    pub from: String,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    /// Subject as sent (token already appended).
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<AttachmentPart>,
    /// Message-ID without `<>`; see [`new_message_id`].
    pub message_id: String,
    /// Parent's Message-ID (no `<>`) when this answers a tracked email.
    pub in_reply_to: Option<String>,
    /// Parent's References then the parent itself (no `<>`).
    pub references: Vec<String>,
    /// Sent by a CRM workflow rather than a person: `Auto-Submitted:
    /// auto-generated` (RFC 3834) and `X-Auto-Response-Suppress`, so
    /// out-of-office replies do not answer it and no loop starts.
    pub automated: bool,
    pub date: UnixTime,
}

/// A composed message, ready for the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composed {
    /// The bytes sent (CRLF lines, 7-bit: lettre encodes non-ASCII text).
    pub mime: String,
    /// Envelope sender.
    pub envelope_from: String,
    /// Envelope recipients: to, cc, bcc (Bcc is not in the headers).
    pub recipients: Vec<String>,
}

/// A fresh Message-ID `<random>@<domain of from>` (no `<>`): 128 random bits,
/// so the marker (the part before `@`) is unique without coordination.
pub fn new_message_id(from: &str) -> String {
    let domain = from
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('>'))
        .filter(|d| !d.is_empty())
        .unwrap_or("crm-mailsync.invalid");
    format!(
        "{:016x}{:016x}.crm@{}",
        fastrand::u64(..),
        fastrand::u64(..),
        domain
    )
}

/// The marker of a Message-ID made by [`new_message_id`]: its local part.
pub fn marker_of(message_id: &str) -> &str {
    message_id
        .split_once('@')
        .map_or(message_id, |(local, _)| local)
}

/// Parses one address (`a@b.example` or `Name <a@b.example>`).
pub fn parse_address(s: &str) -> Result<Address, String> {
    s.trim()
        .parse::<Address>()
        .map_err(|e| format!("{s:?} is not an email address ({e})"))
}

/// Decodes and checks attachments against the `[outgoing]` policy; every
/// problem is listed.
pub fn decode_attachments(
    attachments: &[super::AttachmentRequest],
    policy: &OutgoingSettings,
) -> (Vec<AttachmentPart>, Vec<String>) {
    let mut parts = Vec::new();
    let mut problems = Vec::new();
    for (i, a) in attachments.iter().enumerate() {
        let name = a.filename.trim();
        if name.is_empty() || name.contains(['/', '\\', '\r', '\n']) {
            problems.push(format!(
                "attachments[{i}]: file name {:?} is empty or contains a path",
                a.filename
            ));
            continue;
        }
        let ext = name
            .rsplit_once('.')
            .map(|(_, e)| e.to_ascii_lowercase())
            .unwrap_or_default();
        if !ext.is_empty() && policy.blocked_extensions.contains(&ext) {
            problems.push(format!(
                "attachments[{i}]: {name:?}: .{ext} files are blocked ([outgoing] blocked_extensions)"
            ));
            continue;
        }
        let compact: String = a
            .content_base64
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let bytes = match base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!(
                    "attachments[{i}]: {name:?}: content_base64 is not base64 ({e})"
                ));
                continue;
            }
        };
        if bytes.len() as u64 > policy.max_attachment_bytes {
            problems.push(format!(
                "attachments[{i}]: {name:?} is {} bytes, more than the {} allowed ([outgoing] max_attachment_size)",
                bytes.len(),
                policy.max_attachment_bytes
            ));
            continue;
        }
        let content_type = match &a.content_type {
            Some(t) if ContentType::parse(t).is_err() => {
                problems.push(format!(
                    "attachments[{i}]: {name:?}: {t:?} is not a MIME type"
                ));
                continue;
            }
            Some(t) => t.clone(),
            None => guess_content_type(&ext).to_owned(),
        };
        parts.push(AttachmentPart {
            filename: name.to_owned(),
            content_type,
            bytes,
        });
    }
    (parts, problems)
}

fn guess_content_type(ext: &str) -> &'static str {
    match ext {
        "pdf" => "application/pdf",
        "txt" | "log" => "text/plain",
        "csv" => "text/csv",
        "htm" | "html" => "text/html",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "zip" => "application/zip",
        "json" => "application/json",
        "xml" => "application/xml",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "ics" => "text/calendar",
        "eml" => "message/rfc822",
        _ => "application/octet-stream",
    }
}

fn header(name: &str, value: String) -> Result<HeaderValue, String> {
    let name = HeaderName::new_from_ascii(name.to_owned()).map_err(|e| e.to_string())?;
    Ok(HeaderValue::new(name, value))
}

fn system_time(at: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0))
}

fn angle(id: &str) -> String {
    format!("<{id}>")
}

/// Builds the message; `Err` lists every problem (bad addresses, too big).
pub fn compose(draft: &Draft, policy: &OutgoingSettings) -> Result<Composed, Vec<String>> {
    let mut problems = Vec::new();
    let from = match parse_address(&draft.from) {
        Ok(a) => Some(a),
        Err(e) => {
            problems.push(format!("from: {e}"));
            None
        }
    };
    let mut recipients = Vec::new();
    let mut lists: Vec<(&str, Vec<Address>)> = Vec::new();
    for (field, list) in [("to", &draft.to), ("cc", &draft.cc), ("bcc", &draft.bcc)] {
        let mut parsed = Vec::new();
        for (i, s) in list.iter().enumerate() {
            match parse_address(s) {
                Ok(a) => {
                    let email = a.email.to_string();
                    if !recipients.contains(&email) {
                        recipients.push(email);
                    }
                    parsed.push(a);
                }
                Err(e) => problems.push(format!("{field}[{i}]: {e}")),
            }
        }
        lists.push((field, parsed));
    }
    if draft.to.is_empty() && draft.cc.is_empty() && draft.bcc.is_empty() {
        problems.push("no recipient: give at least one address in to, cc or bcc".into());
    }
    let (Some(from), true) = (from, problems.is_empty()) else {
        return Err(problems);
    };
    let mut b = lettre::Message::builder()
        .from(from.clone())
        .subject(draft.subject.clone())
        .message_id(Some(angle(&draft.message_id)))
        .date(system_time(draft.date));
    for (field, list) in lists {
        for a in list {
            b = match field {
                "to" => b.to(a),
                "cc" => b.cc(a),
                _ => b.bcc(a),
            };
        }
    }
    if let Some(parent) = &draft.in_reply_to {
        b = b.in_reply_to(angle(parent));
    }
    if !draft.references.is_empty() {
        let refs: Vec<String> = draft.references.iter().map(|r| angle(r)).collect();
        b = b.references(refs.join(" "));
    }
    let mut extra = vec![header(
        MARKER_HEADER,
        marker_of(&draft.message_id).to_owned(),
    )];
    if draft.automated {
        extra.push(header("Auto-Submitted", "auto-generated".into()));
        // Exchange's switch for "no out-of-office, no delivery receipts".
        extra.push(header("X-Auto-Response-Suppress", "All".into()));
    }
    for h in extra {
        match h {
            Ok(h) => b = b.raw_header(h),
            Err(e) => return Err(vec![format!("header: {e}")]),
        }
    }
    let body = body_part(draft);
    let message = if draft.attachments.is_empty() {
        match body {
            Body::Single(p) => b.singlepart(p),
            Body::Multi(m) => b.multipart(m),
        }
    } else {
        let mut mixed = match body {
            Body::Single(p) => MultiPart::mixed().singlepart(p),
            Body::Multi(m) => MultiPart::mixed().multipart(m),
        };
        for a in &draft.attachments {
            let ct = ContentType::parse(&a.content_type).map_err(|e| {
                vec![format!(
                    "{}: {:?} is not a MIME type ({e})",
                    a.filename, a.content_type
                )]
            })?;
            mixed = mixed.singlepart(Attachment::new(a.filename.clone()).body(a.bytes.clone(), ct));
        }
        b.multipart(mixed)
    };
    let message = message.map_err(|e| vec![format!("cannot build the message: {e}")])?;
    let bytes = message.formatted();
    if bytes.len() as u64 > policy.max_message_bytes {
        return Err(vec![format!(
            "the message is {} bytes encoded, more than the {} allowed ([outgoing] max_message_size)",
            bytes.len(),
            policy.max_message_bytes
        )]);
    }
    let mime = String::from_utf8(bytes)
        .map_err(|_| vec!["the composed message is not 7-bit text".to_string()])?;
    Ok(Composed {
        mime,
        envelope_from: from.email.to_string(),
        recipients,
    })
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

fn body_part(draft: &Draft) -> Body {
    match (&draft.text, &draft.html) {
        (Some(t), Some(h)) => Body::Multi(MultiPart::alternative_plain_html(t.clone(), h.clone())),
        (None, Some(h)) => Body::Single(SinglePart::html(h.clone())),
        (Some(t), None) => Body::Single(SinglePart::plain(t.clone())),
        (None, None) => Body::Single(SinglePart::plain(String::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outgoing::AttachmentRequest;

    fn draft() -> Draft {
        Draft {
            from: "support@example.test".into(),
            to: vec!["Carol <carol@customer.example>".into()],
            cc: vec![],
            bcc: vec!["audit@example.test".into()],
            subject: "Your case CRM:0001001".into(),
            text: Some("Grüße, we are on it.".into()),
            html: Some("<p>Grüße, we are on it.</p>".into()),
            attachments: vec![],
            message_id: "abc.crm@example.test".into(),
            in_reply_to: Some("parent@customer.example".into()),
            references: vec![
                "root@customer.example".into(),
                "parent@customer.example".into(),
            ],
            automated: false,
            date: 1_790_000_000,
        }
    }

    #[test]
    fn composed_message_carries_ids_threading_marker_and_alternatives() {
        let c = compose(&draft(), &OutgoingSettings::default()).unwrap();
        let m = &c.mime;
        assert!(m.contains("Message-ID: <abc.crm@example.test>"), "{m}");
        assert!(m.contains("In-Reply-To: <parent@customer.example>"), "{m}");
        assert!(
            m.contains("References: <root@customer.example> <parent@customer.example>"),
            "{m}"
        );
        assert!(m.contains("X-CRM-Mailsync-Id: abc.crm"), "{m}");
        assert!(m.contains("multipart/alternative"), "{m}");
        assert!(
            !m.contains("Auto-Submitted"),
            "a person's email is not automatic"
        );
        assert!(
            !m.to_ascii_lowercase().contains("bcc:"),
            "Bcc stays out of the headers"
        );
        assert!(m.is_ascii());
        assert_eq!(
            c.recipients,
            vec!["carol@customer.example", "audit@example.test"]
        );
        assert_eq!(c.envelope_from, "support@example.test");
        // Our own parser reads back what the correlation engine will index.
        let p = crate::parse::parse(m.as_bytes(), "$outgoing", 1 << 20).unwrap();
        assert_eq!(p.features.message_ids, vec!["abc.crm@example.test"]);
        assert_eq!(p.features.subject, "Your case CRM:0001001");
        assert!(p.body_text.contains("Grüße"));
    }

    #[test]
    fn automated_email_is_marked_so_out_of_office_does_not_answer() {
        let mut d = draft();
        d.automated = true;
        let c = compose(&d, &OutgoingSettings::default()).unwrap();
        assert!(c.mime.contains("Auto-Submitted: auto-generated"));
        assert!(c.mime.contains("X-Auto-Response-Suppress: All"));
    }

    #[test]
    fn every_bad_address_is_listed() {
        let mut d = draft();
        d.to = vec!["not an address".into(), "ok@example.test".into()];
        d.cc = vec!["@broken".into()];
        let errs = compose(&d, &OutgoingSettings::default()).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("to[0]"), "{errs:?}");
        assert!(errs[1].starts_with("cc[0]"), "{errs:?}");
        let mut d = draft();
        d.to.clear();
        d.bcc.clear();
        let errs = compose(&d, &OutgoingSettings::default()).unwrap_err();
        assert!(errs[0].contains("no recipient"), "{errs:?}");
    }

    #[test]
    fn attachments_follow_the_blocked_extension_and_size_policy() {
        let policy = OutgoingSettings {
            max_attachment_bytes: 10,
            ..OutgoingSettings::default()
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let reqs = vec![
            AttachmentRequest {
                filename: "quote.pdf".into(),
                content_type: None,
                content_base64: b64("%PDF-1"),
            },
            AttachmentRequest {
                filename: "setup.EXE".into(),
                content_type: None,
                content_base64: b64("MZ"),
            },
            AttachmentRequest {
                filename: "big.txt".into(),
                content_type: None,
                content_base64: b64("0123456789abc"),
            },
            AttachmentRequest {
                filename: "x.txt".into(),
                content_type: None,
                content_base64: "***".into(),
            },
        ];
        let (parts, problems) = decode_attachments(&reqs, &policy);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].content_type, "application/pdf");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].contains(".exe files are blocked"),
            "{problems:?}"
        );
        assert!(problems[1].contains("max_attachment_size"), "{problems:?}");
        assert!(problems[2].contains("not base64"), "{problems:?}");
        let mut d = draft();
        d.attachments = parts;
        let c = compose(&d, &OutgoingSettings::default()).unwrap();
        assert!(c.mime.contains("multipart/mixed"));
        assert!(c.mime.contains("quote.pdf"));
        let tiny = OutgoingSettings {
            max_message_bytes: 100,
            ..OutgoingSettings::default()
        };
        let errs = compose(&d, &tiny).unwrap_err();
        assert!(errs[0].contains("max_message_size"), "{errs:?}");
    }

    #[test]
    fn message_ids_are_unique_and_their_marker_is_the_local_part() {
        let a = new_message_id("Support <support@example.test>");
        let b = new_message_id("support@example.test");
        assert_ne!(a, b);
        assert!(a.ends_with("@example.test"), "{a}");
        assert_eq!(marker_of(&a).len(), 36);
    }
}
