//! Parse: raw bytes → [`ParsedMessage`] (mail-parser underneath).
//!
//! mail-parser accepts almost anything, so this stage also decides what is too
//! broken to be an email at all. Such input is not an error of the mailbox: it is
//! a [`Malformed`] verdict with a reason, and the pipeline quarantines it.

use std::borrow::Cow;

use mail_parser::decoders::html::html_to_text;
use mail_parser::{Address, HeaderName, HeaderValue, MessageParser, PartType};

use crate::correlate::MessageFeatures;

/// Why a message cannot be processed; the bytes are quarantined with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("empty message")]
    Empty,
    #[error("message of {size} bytes exceeds the {cap}-byte limit")]
    TooLarge { size: u64, cap: u64 },
    #[error("no header section: the message does not start with a header field (first line {first_line:?})")]
    NoHeaders { first_line: String },
    #[error("NUL byte in the header section at offset {offset}")]
    NulInHeaders { offset: usize },
    #[error("not an email: none of From, Date or Message-ID is present")]
    NotAnEmail,
    #[error("the MIME parser rejected the message")]
    Unparseable,
    #[error("the MIME parser failed on the message: {0}")]
    ParserFailed(String),
}

/// Runs a mail-parser call so that a panic inside it (mail-parser 0.11 has
/// `debug_assert!`s that malformed MIME reaches, found by fuzzing) becomes a
/// [`Malformed::ParserFailed`] for the message instead of taking down the
/// mailbox task: bad mail is quarantined with a reason, never a crash.
pub(crate) fn guarded<T>(parse: impl FnOnce() -> T) -> Result<T, Malformed> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).map_err(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        Malformed::ParserFailed(what)
    })
}

/// mail-parser configured to parse only the header fields parse reads as
/// typed values and the MIME fields body parsing needs; every other field
/// (`Received:` above all: real mail carries several, and mail-parser's
/// structured `Received` parser was about 8 % of a message's parse) is
/// skipped. Their raw values stay readable through their offsets
/// ([`value_str`]).
static LEAN_PARSER: std::sync::LazyLock<MessageParser> = std::sync::LazyLock::new(|| {
    MessageParser::new()
        .header_content_type(HeaderName::ContentType)
        .header_content_type(HeaderName::ContentDisposition)
        .header_text(HeaderName::ContentTransferEncoding)
        .header_text(HeaderName::Subject)
        .header_address(HeaderName::From)
        .header_address(HeaderName::To)
        .header_address(HeaderName::Cc)
        .header_date(HeaderName::Date)
        .header_id(HeaderName::MessageId)
        .header_id(HeaderName::InReplyTo)
        .header_id(HeaderName::References)
        .default_header_ignore()
});

/// Markers of automatically generated mail, used by the loop filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoMarkers {
    /// `Auto-Submitted` other than `no` (RFC 3834).
    pub auto_submitted: Option<String>,
    /// `Precedence: bulk | junk | list | auto_reply`.
    pub precedence: Option<String>,
    /// `X-Autoreply`, `X-Autorespond`, `X-Auto-Response-Suppress: All|OOF|AutoReply`.
    pub vendor_auto_reply: bool,
    /// `List-Id` present: mailing-list traffic.
    pub list_id: Option<String>,
}

/// Everything later stages need from one message; it may borrow the body
/// text from the raw bytes it was parsed from.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedMessage<'r> {
    pub features: MessageFeatures,
    /// Stable hash of the message's identity (see [`content_hash`]).
    pub content_hash: String,
    pub size: u64,
    pub auto: AutoMarkers,
    /// First text body, decoded; used by smart matching's quoted-text
    /// fingerprint. Borrowed from the raw bytes when no decoding changed it
    /// (7/8-bit UTF-8 text, most mail), so it is not copied per message.
    pub body_text: Cow<'r, str>,
    /// `X-CRM-Forwarded-By`, as the forward-mailbox connector prepends it.
    /// Only trusted by the pipeline for forward mailboxes.
    pub forwarded_by: Option<String>,
}

/// Parses raw bytes. `folder` is where the message was found.
pub fn parse<'r>(
    raw: &'r [u8],
    folder: &str,
    max_size: u64,
) -> Result<ParsedMessage<'r>, Malformed> {
    let mut p = parse_without_hash(raw, folder, max_size)?;
    p.content_hash = dedupe_hash(raw, &p.features);
    Ok(p)
}

/// [`content_hash`] of raw bytes as [`parse`] sees them (mbox `From ` line
/// removed).
pub fn dedupe_hash(raw: &[u8], f: &MessageFeatures) -> String {
    let raw = strip_mbox_from_line(raw);
    content_hash(raw, header_section_end(raw), f)
}

/// [`parse`] without the content hash (left empty): the hash serves
/// deduplication, not correlation, and the bench measures it on its own.
pub fn parse_without_hash<'r>(
    raw: &'r [u8],
    folder: &str,
    max_size: u64,
) -> Result<ParsedMessage<'r>, Malformed> {
    parse_for(raw, folder, max_size, true)
}

/// [`parse_without_hash`], parsing the body only when `with_body`: only
/// scored smart matching reads it. Otherwise only the top-level header
/// section is parsed (MIME parts, transfer decoding and charsets are most of
/// the cost per message); everything else read is the same either way.
pub fn parse_for<'r>(
    raw: &'r [u8],
    folder: &str,
    max_size: u64,
    with_body: bool,
) -> Result<ParsedMessage<'r>, Malformed> {
    let raw = strip_mbox_from_line(raw);
    if raw.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Malformed::Empty);
    }
    if raw.len() as u64 > max_size {
        return Err(Malformed::TooLarge {
            size: raw.len() as u64,
            cap: max_size,
        });
    }
    if !starts_with_header_field(raw) {
        let first = raw.split(|b| *b == b'\n').next().unwrap_or_default();
        let first_line = String::from_utf8_lossy(&first[..first.len().min(60)])
            .trim_end()
            .to_string();
        return Err(Malformed::NoHeaders { first_line });
    }
    // Without the body, only the top-level header section is parsed: MIME
    // parts, transfer decoding and charset conversion are most of a
    // message's parse, and nothing but the body fingerprint reads them.
    let msg = guarded(|| {
        if with_body {
            LEAN_PARSER.parse(raw)
        } else {
            LEAN_PARSER.parse_headers(raw)
        }
    })?;
    let mut msg = msg.ok_or(Malformed::Unparseable)?;
    // Where the last header field mail-parser read ends, the same whether
    // or not the body was parsed (a headers-only parse reports no body
    // offset); one SIMD scan up to there, no line-by-line search.
    let header_end = msg
        .parts
        .first()
        .and_then(|p| p.headers.iter().map(|h| h.offset_end as usize).max())
        .unwrap_or(0)
        .min(raw.len());
    if let Some(offset) = memchr::memchr(0, &raw[..header_end]) {
        return Err(Malformed::NulInHeaders { offset });
    }

    // One forward pass over the header list instead of a `header_raw`
    // lookup (a reverse linear scan each) per header we care about.
    let extra = ExtraHeaders::collect(&msg);
    let mut message_ids = Vec::new();
    if let Some(id) = extra.message_id.and_then(HeaderValue::as_text) {
        push_id(&mut message_ids, id);
    }
    for v in [extra.ms_original_id, extra.exchange_original_id]
        .into_iter()
        .flatten()
    {
        for id in split_msg_ids(v) {
            push_id(&mut message_ids, &id);
        }
    }
    let from = addresses(extra.from.and_then(HeaderValue::as_address));
    let date = extra
        .date
        .and_then(HeaderValue::as_datetime)
        .map(|d| d.to_timestamp());
    if message_ids.is_empty() && from.is_empty() && date.is_none() {
        return Err(Malformed::NotAnEmail);
    }

    let features = MessageFeatures {
        message_ids,
        in_reply_to: extra.in_reply_to.map(text_list).unwrap_or_default(),
        references: extra.references.map(text_list).unwrap_or_default(),
        subject: extra
            .subject
            .and_then(HeaderValue::as_text)
            .unwrap_or_default()
            .to_string(),
        from,
        to: addresses(extra.to.and_then(HeaderValue::as_address)),
        cc: addresses(extra.cc.and_then(HeaderValue::as_address)),
        sent_at: date,
        thread_index: extra
            .thread_index
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        folder: folder.to_string(),
        // Filled by the pipeline: they depend on the mailbox and the settings.
        outgoing: false,
        body_shingles: Vec::new(),
        quoted_shingles: Vec::new(),
    };
    let auto = extra.auto_markers();
    let forwarded_by = extra
        .forwarded_by
        .flatten()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_ascii_lowercase);
    let body_text = if with_body {
        take_body_text(&mut msg)
    } else {
        Cow::Borrowed("")
    };
    Ok(ParsedMessage {
        features,
        content_hash: String::new(),
        size: raw.len() as u64,
        auto,
        body_text,
        forwarded_by,
    })
}

/// What mail-parser's `body_text(0)` gives (the first text body part, an
/// HTML one converted to text), taken out of the message with the raw
/// bytes' lifetime: a part mail-parser did not have to decode stays a
/// slice of them.
fn take_body_text<'x>(msg: &mut mail_parser::Message<'x>) -> Cow<'x, str> {
    let part = msg
        .text_body
        .first()
        .and_then(|&i| msg.parts.get_mut(i as usize));
    match part.map(|p| &mut p.body) {
        Some(PartType::Text(text)) => std::mem::take(text),
        Some(PartType::Html(html)) => Cow::Owned(html_to_text(html)),
        _ => Cow::Borrowed(""),
    }
}

/// Raw values of the headers parse reads beyond mail-parser's typed ones.
/// Each is the LAST occurrence (what `Message::header_raw` returns), except
/// `forwarded_by`, which is the FIRST: the forward-mailbox connector prepends
/// its attribution header, so a copy forged further down is ignored.
#[derive(Default)]
struct ExtraHeaders<'m> {
    ms_original_id: Option<&'m str>,
    exchange_original_id: Option<&'m str>,
    thread_index: Option<&'m str>,
    auto_submitted: Option<&'m str>,
    precedence: Option<&'m str>,
    response_suppress: Option<&'m str>,
    x_autoreply: Option<&'m str>,
    x_autorespond: Option<&'m str>,
    list_id: Option<&'m str>,
    /// Outer `Some`: the header was seen (its first value decided, even if
    /// it is not UTF-8).
    forwarded_by: Option<Option<&'m str>>,
    /// Parsed values of the typed headers features read, last occurrence
    /// each: what `Message::from()`, `to()`, … return, taken in this same
    /// pass instead of one reverse scan of the header list per accessor.
    message_id: Option<&'m HeaderValue<'m>>,
    in_reply_to: Option<&'m HeaderValue<'m>>,
    references: Option<&'m HeaderValue<'m>>,
    subject: Option<&'m HeaderValue<'m>>,
    from: Option<&'m HeaderValue<'m>>,
    to: Option<&'m HeaderValue<'m>>,
    cc: Option<&'m HeaderValue<'m>>,
    date: Option<&'m HeaderValue<'m>>,
}

impl<'m> ExtraHeaders<'m> {
    fn collect(msg: &'m mail_parser::Message<'_>) -> Self {
        let raw = msg.raw_message();
        let mut x = ExtraHeaders::default();
        for h in msg.headers() {
            let typed = match h.name {
                HeaderName::MessageId => Some(&mut x.message_id),
                HeaderName::InReplyTo => Some(&mut x.in_reply_to),
                HeaderName::References => Some(&mut x.references),
                HeaderName::Subject => Some(&mut x.subject),
                HeaderName::From => Some(&mut x.from),
                HeaderName::To => Some(&mut x.to),
                HeaderName::Cc => Some(&mut x.cc),
                HeaderName::Date => Some(&mut x.date),
                _ => None,
            };
            if let Some(slot) = typed {
                // Later occurrences overwrite: the last one wins, as in
                // mail-parser's accessors.
                *slot = Some(&h.value);
                continue;
            }
            let name = h.name.as_str();
            // Distinct lengths: one comparison per header at most.
            let (want, slot) = match name.len() {
                31 => ("X-Microsoft-Original-Message-Id", &mut x.ms_original_id),
                45 => (
                    "X-MS-Exchange-Organization-Original-Message-Id",
                    &mut x.exchange_original_id,
                ),
                12 => ("Thread-Index", &mut x.thread_index),
                14 => ("Auto-Submitted", &mut x.auto_submitted),
                10 => ("Precedence", &mut x.precedence),
                24 => ("X-Auto-Response-Suppress", &mut x.response_suppress),
                11 => ("X-Autoreply", &mut x.x_autoreply),
                13 => ("X-Autorespond", &mut x.x_autorespond),
                7 => ("List-Id", &mut x.list_id),
                n if n == crate::connector::forward::FORWARDED_BY_HEADER.len() => {
                    if x.forwarded_by.is_none()
                        && name.eq_ignore_ascii_case(crate::connector::forward::FORWARDED_BY_HEADER)
                    {
                        x.forwarded_by = Some(value_str(raw, h));
                    }
                    continue;
                }
                _ => continue,
            };
            if name.eq_ignore_ascii_case(want) {
                *slot = value_str(raw, h);
            }
        }
        x
    }

    fn auto_markers(&self) -> AutoMarkers {
        let lower = |v: Option<&str>| v.map(|s| s.trim().to_ascii_lowercase());
        let auto_submitted = lower(self.auto_submitted).filter(|v| !v.starts_with("no"));
        let precedence = lower(self.precedence).filter(|v| {
            ["bulk", "junk", "list", "auto_reply"]
                .iter()
                .any(|p| v.starts_with(p))
        });
        let suppress = self.response_suppress.unwrap_or_default();
        let vendor_auto_reply = self.x_autoreply.is_some()
            || self.x_autorespond.is_some()
            || suppress.split(',').any(|p| {
                let p = p.trim();
                ["all", "oof", "autoreply"]
                    .iter()
                    .any(|k| p.eq_ignore_ascii_case(k))
            });
        AutoMarkers {
            auto_submitted,
            precedence,
            vendor_auto_reply,
            list_id: lower(self.list_id),
        }
    }
}

/// A header's raw value as `Message::header_raw` gives it (`None` if not UTF-8).
fn value_str<'m>(raw: &'m [u8], h: &mail_parser::Header<'_>) -> Option<&'m str> {
    let bytes = raw.get(h.offset_start as usize..h.offset_end as usize)?;
    std::str::from_utf8(bytes).ok()
}

/// A message saved from an mbox may start with a `From ` separator line.
fn strip_mbox_from_line(raw: &[u8]) -> &[u8] {
    if raw.starts_with(b"From ") {
        if let Some(nl) = raw.iter().position(|b| *b == b'\n') {
            return &raw[nl + 1..];
        }
    }
    raw
}

/// Offset of the blank line that ends the header section (or the end of input).
fn header_section_end(raw: &[u8]) -> usize {
    let blank = |i: usize| raw[i..].starts_with(b"\n") || raw[i..].starts_with(b"\r\n");
    if blank(0) {
        return 0;
    }
    // memchr over the line ends: this runs on every message before parsing.
    memchr::memchr_iter(b'\n', raw)
        .map(|nl| nl + 1)
        .find(|&start| blank(start))
        .unwrap_or(raw.len())
}

/// RFC 5322 field name: printable ASCII except colon, then a colon.
fn starts_with_header_field(raw: &[u8]) -> bool {
    let name_len = raw
        .iter()
        .take_while(|b| (33..=126).contains(*b) && **b != b':')
        .count();
    if name_len == 0 {
        return false;
    }
    // Tolerate "Name : value" (obsolete syntax) by skipping blanks before the colon.
    let rest = &raw[name_len..];
    let blanks = rest
        .iter()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count();
    rest.get(blanks) == Some(&b':')
}

fn push_id(ids: &mut Vec<String>, id: &str) {
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    if !id.is_empty() && !ids.iter().any(|x| x.eq_ignore_ascii_case(id)) {
        ids.push(id.to_string());
    }
}

/// Splits a raw header value holding `<id>` tokens (possibly folded, possibly bare).
fn split_msg_ids(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = v;
    while let Some(start) = rest.find('<') {
        match rest[start..].find('>') {
            Some(end) => {
                out.push(rest[start + 1..start + end].trim().to_string());
                rest = &rest[start + end + 1..];
            }
            None => break,
        }
    }
    if out.is_empty() {
        out.extend(v.split_whitespace().map(str::to_string));
    }
    out
}

fn text_list(v: &HeaderValue<'_>) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        HeaderValue::Text(t) => push_id(&mut out, t),
        HeaderValue::TextList(list) => {
            for t in list {
                push_id(&mut out, t);
            }
        }
        _ => {}
    }
    out
}

fn addresses(a: Option<&Address<'_>>) -> Vec<String> {
    a.map(|a| {
        a.iter()
            .filter_map(|addr| addr.address())
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

/// Hash of what makes two copies "the same email": Message-ID(s), Date, From,
/// Subject and the body bytes with line endings normalised. Transport headers
/// (Received, Delivered-To, Return-Path) are left out so a copy delivered to two
/// mailboxes, or re-numbered after a UIDVALIDITY reset, hashes the same.
pub fn content_hash(raw: &[u8], header_end: usize, f: &MessageFeatures) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for id in &f.message_ids {
        ctx.update(id.to_ascii_lowercase().as_bytes());
        ctx.update(b"\n");
    }
    ctx.update(format!("{:?}\n{:?}\n{}\n", f.sent_at, f.from, f.subject).as_bytes());
    let body = &raw[header_end.min(raw.len())..];
    // Normalise CRLF → LF and ignore trailing white space, which servers add or drop.
    let mut last = 0;
    for (i, b) in body.iter().enumerate() {
        if *b == b'\r' && body.get(i + 1) == Some(&b'\n') {
            ctx.update(&body[last..i]);
            last = i + 1;
        }
    }
    let tail = &body[last..];
    let trimmed_len = tail
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map(|p| p + 1)
        .unwrap_or(0);
    ctx.update(&tail[..trimmed_len]);
    let digest = ctx.finish();
    digest
        .as_ref()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"Message-ID: <abc@example.test>\r\nFrom: Ann <Ann@Example.test>\r\nTo: b@example.test, c@example.test\r\nSubject: Hello\r\nDate: Mon, 5 Jan 2026 10:00:00 +0000\r\nIn-Reply-To: <p@x>\r\nReferences: <r1@x> <p@x>\r\nAuto-Submitted: auto-replied\r\n\r\nBody\r\n";

    /// Found by `cargo fuzz run correlate` (minimised): a message/rfc822
    /// part directly inside another one trips a `debug_assert!` in
    /// mail-parser 0.11.9 ("Invalid part ID, could not find multipart").
    /// In builds with debug assertions that panicked through `parse`.
    #[test]
    fn fuzz_nested_rfc822_parts_that_trip_a_mail_parser_assertion_do_not_panic() {
        let raw = b"Content-Type: multipart; boundary=42\n\n--42.0\nContent-Type:message/rfc822\n\nContent-Type: message/rfc822\n\n\n--42--";
        let got = parse(raw, "INBOX", 1 << 20);
        if cfg!(debug_assertions) {
            match got {
                Err(Malformed::ParserFailed(why)) => {
                    assert!(why.contains("Invalid part ID"), "{why}")
                }
                other => panic!("{other:?}"),
            }
        } else {
            // Without the assertion mail-parser copes; the message has no
            // From, Date or Message-ID.
            assert!(matches!(got, Err(Malformed::NotAnEmail)), "{got:?}");
        }
    }

    #[test]
    fn extracts_features() {
        let p = parse(MSG, "INBOX", 1 << 20).unwrap();
        assert_eq!(p.features.message_ids, vec!["abc@example.test"]);
        assert_eq!(p.features.from, vec!["ann@example.test"]);
        assert_eq!(p.features.to.len(), 2);
        assert_eq!(p.features.in_reply_to, vec!["p@x"]);
        assert_eq!(p.features.references, vec!["r1@x", "p@x"]);
        assert_eq!(p.features.sent_at, Some(1_767_607_200));
        assert_eq!(p.auto.auto_submitted.as_deref(), Some("auto-replied"));
        assert_eq!(p.body_text.trim(), "Body");
    }

    #[test]
    fn same_email_with_other_transport_headers_and_line_endings_hashes_the_same() {
        let lf: Vec<u8> = MSG.iter().copied().filter(|b| *b != b'\r').collect();
        let mut delivered = b"Delivered-To: other@example.test\nReceived: from x by y\n".to_vec();
        delivered.extend_from_slice(&lf);
        let a = parse(MSG, "INBOX", 1 << 20).unwrap();
        let b = parse(&delivered, "INBOX", 1 << 20).unwrap();
        assert_eq!(a.content_hash, b.content_hash);
        let changed = String::from_utf8_lossy(MSG).replace("Body", "Other body");
        assert_ne!(
            a.content_hash,
            parse(changed.as_bytes(), "INBOX", 1 << 20)
                .unwrap()
                .content_hash
        );
    }

    #[test]
    fn malformed_inputs_get_reasons_not_panics() {
        assert_eq!(parse(b"", "INBOX", 100), Err(Malformed::Empty));
        assert_eq!(parse(b" \r\n\r\n", "INBOX", 100), Err(Malformed::Empty));
        assert!(matches!(
            parse(b"this is not an email\n\nat all", "INBOX", 1000),
            Err(Malformed::NoHeaders { .. })
        ));
        assert!(matches!(
            parse(b"\x00\x01\x02binary", "INBOX", 1000),
            Err(Malformed::NoHeaders { .. })
        ));
        assert!(matches!(
            parse(b"X-Foo: a\0b\n\nbody", "INBOX", 1000),
            Err(Malformed::NulInHeaders { .. })
        ));
        // A NUL further down the header section counts, one in the body does not.
        assert_eq!(
            parse(
                b"From: a@b.test\nX-Foo: a\0b\nSubject: s\n\nbody\0",
                "INBOX",
                1000
            ),
            Err(Malformed::NulInHeaders { offset: 23 })
        );
        assert!(parse(b"From: a@b.test\nSubject: s\n\nbo\0dy", "INBOX", 1000).is_ok());
        assert_eq!(
            parse(b"X-Foo: bar\n\nbody", "INBOX", 1000),
            Err(Malformed::NotAnEmail)
        );
        assert!(matches!(
            parse(MSG, "INBOX", 10),
            Err(Malformed::TooLarge { .. })
        ));
    }

    #[test]
    fn body_is_decoded_only_when_asked() {
        assert_eq!(
            parse_for(MSG, "INBOX", 1 << 20, true)
                .unwrap()
                .body_text
                .trim(),
            "Body"
        );
        let headers_only = parse_for(MSG, "INBOX", 1 << 20, false).unwrap();
        assert!(headers_only.body_text.is_empty());
        assert_eq!(
            headers_only.features,
            parse(MSG, "INBOX", 1 << 20).unwrap().features
        );
    }

    #[test]
    fn forwarded_by_is_the_first_header_not_a_forged_later_one() {
        let m = b"X-CRM-Forwarded-By: Alice@example.test\r\nFrom: a@x.test\r\nX-CRM-Forwarded-By: mallory@evil.example\r\n\r\nbody";
        let p = parse(m, "INBOX", 1 << 20).unwrap();
        assert_eq!(p.forwarded_by.as_deref(), Some("alice@example.test"));
    }

    #[test]
    fn header_pass_keeps_last_occurrence_and_case_insensitive_names() {
        let m = b"From: a@x.test\r\nprecedence: bulk\r\nPRECEDENCE: normal\r\nx-auto-response-suppress: DR, OOF\r\nLIST-ID: <Dev.Example>\r\nthread-index: AQHZ\r\nX-Microsoft-Original-Message-Id: <orig@x>\r\n\r\nbody";
        let p = parse(m, "INBOX", 1 << 20).unwrap();
        // The last Precedence ("normal") is not a bulk marker.
        assert_eq!(p.auto.precedence, None);
        assert!(p.auto.vendor_auto_reply);
        assert_eq!(p.auto.list_id.as_deref(), Some("<dev.example>"));
        assert_eq!(p.features.thread_index.as_deref(), Some("AQHZ"));
        assert_eq!(p.features.message_ids, vec!["orig@x"]);
    }

    #[test]
    fn mbox_separator_line_is_tolerated() {
        let mut m = b"From someone@example.test Mon Jan  5 10:00:00 2026\n".to_vec();
        m.extend_from_slice(MSG);
        assert_eq!(
            parse(&m, "INBOX", 1 << 20).unwrap().features.message_ids,
            vec!["abc@example.test"]
        );
    }

    /// `parse_for` without the body parses the header section alone; what
    /// it returns must be what a full parse returns, body aside. A full
    /// parse that panics inside mail-parser's body code (see the fuzz case
    /// above, debug builds) is the one allowed difference.
    fn headers_only_agrees(raw: &[u8]) -> Result<(), String> {
        let full = parse_for(raw, "INBOX", 1 << 20, true);
        let headers_only = parse_for(raw, "INBOX", 1 << 20, false);
        if matches!(full, Err(Malformed::ParserFailed(_))) {
            return Ok(());
        }
        let full = full.map(|p| ParsedMessage {
            body_text: Cow::Borrowed(""),
            ..p
        });
        if full == headers_only {
            Ok(())
        } else {
            Err(format!("full {full:?}\nheaders only {headers_only:?}"))
        }
    }

    #[test]
    fn headers_only_parse_reads_what_a_full_parse_reads() {
        let mut inputs: Vec<Vec<u8>> = vec![
            MSG.to_vec(),
            b"X-Foo: a\0b\n\nbody".to_vec(),
            b"From: a@b.test\nX-Foo: a\0b\nSubject: s\n\nbody\0".to_vec(),
            b"From: a@b.test\nSubject: s\n\nbo\0dy".to_vec(),
            b"From: a@b.test\nSubject: s\n".to_vec(),
            b"From: a@b.test\nSubject: s".to_vec(),
            b"X-Foo: bar\n\nbody".to_vec(),
            // A NUL after a line mail-parser does not read as a header field.
            b"From: a@b.test\nnot a header\nX-Foo: a\0b\n\nbody".to_vec(),
            b"From: a@b.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\nSubject: inner\r\n\r\ntext\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: x@y.test\r\nSubject: nested\r\n\r\nhi\r\n--b--\r\n".to_vec(),
        ];
        for dir in ["fixtures/correlation", "fixtures/demo-maildir"] {
            let mut stack = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_none_or(|x| x == "eml") {
                        inputs.push(std::fs::read(&p).unwrap());
                    }
                }
            }
        }
        assert!(inputs.len() > 50, "fixtures found: {}", inputs.len());
        for raw in &inputs {
            if let Err(why) = headers_only_agrees(raw) {
                panic!("{}\n{why}", String::from_utf8_lossy(raw));
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2000)) {
            let _ = parse(&bytes, "INBOX", 1 << 20);
        }

        #[test]
        fn headers_only_agrees_on_arbitrary_bytes(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)
        ) {
            headers_only_agrees(&bytes).map_err(proptest::test_runner::TestCaseError::fail)?;
        }

        /// Arbitrary bytes rarely look like a header section; these do,
        /// with NULs, folds, bare LFs and MIME fields mixed in.
        #[test]
        fn headers_only_agrees_on_header_like_input(
            lines in proptest::collection::vec(
                proptest::sample::select(vec![
                    "From: a@b.test", "To: c@d.test, e@f.test", "Subject: re: x",
                    "Message-ID: <m@x>", "In-Reply-To: <p@x>", "References: <r@x> <p@x>",
                    "Date: Mon, 5 Jan 2026 10:00:00 +0000", "X-Foo: a\0b", " folded",
                    "\tfolded", "no colon here", "", "\r", "Content-Type: multipart/mixed; boundary=b",
                    "--b", "--b--", "Content-Type: message/rfc822", "Content-Transfer-Encoding: base64",
                    "Thread-Index: AQHZ", "Auto-Submitted: auto-replied", "body \0 text", ":",
                ]),
                0..24,
            ),
            crlf in proptest::bool::ANY,
        ) {
            let raw = lines.join(if crlf { "\r\n" } else { "\n" });
            headers_only_agrees(raw.as_bytes()).map_err(proptest::test_runner::TestCaseError::fail)?;
        }
    }
}
