//! Parse: raw bytes → [`ParsedMessage`] (mail-parser underneath).
//!
//! mail-parser accepts almost anything, so this stage also decides what is too
//! broken to be an email at all. Such input is not an error of the mailbox: it is
//! a [`Malformed`] verdict with a reason, and the pipeline quarantines it.
//!
//! Nothing past the header section is read except the first text body (the
//! quoted-text fingerprint's input), so only that is parsed: with
//! mail-parser's own stream, header parser and decoders where the MIME
//! structure makes its choice of that part plain, with mail-parser's full
//! parse otherwise. Attachments and HTML alternatives, most of a full
//! parse's work, are never decoded.

use std::borrow::Cow;

use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::html::html_to_text;
use mail_parser::parsers::MessageStream;
use mail_parser::{Address, Header, HeaderName, HeaderValue, MessageParser, PartType};

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
        .header_address(HeaderName::Bcc)
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
    /// `List-Unsubscribe` present: list or bulk mail.
    pub list_unsubscribe: bool,
    /// `report-type` of a top-level `multipart/report` (RFC 6522), lower
    /// case: `delivery-status` (a DSN), `disposition-notification` (a read
    /// receipt), ...
    pub report_type: Option<String>,
    /// What a delivery status notification says; read only for messages
    /// whose `report_type` is a delivery status, so ordinary mail keeps the
    /// header-only parse.
    pub delivery_report: Option<DeliveryReport>,
}

/// The parts of a delivery status notification (RFC 3464) that link it to
/// the message it returns and say what failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Message-IDs of the returned message (its `message/rfc822` or
    /// `text/rfc822-headers` part), normalised (no angle brackets).
    pub returned_message_ids: Vec<String>,
    /// Per-recipient fields of recipients that were not delivered.
    pub recipients: Vec<FailedRecipient>,
}

/// One recipient of a delivery status notification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedRecipient {
    /// `Final-Recipient` (else `Original-Recipient`), address type removed.
    pub recipient: String,
    /// `Action`: `failed`, `delayed`, ...
    pub action: Option<String>,
    /// `Status`, e.g. `5.1.1`.
    pub status: Option<String>,
    /// `Diagnostic-Code`, diagnostic type removed (`550 5.1.1 User unknown`).
    pub diagnostic: Option<String>,
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
    /// `Bcc` addresses (lower-cased): only a sender's own copy carries
    /// them; party resolution reads them, correlation does not.
    pub bcc: Vec<String>,
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
    // The top-level header section first, as mail-parser's own parse
    // starts. MIME parts, transfer decoding and charsets are most of a
    // message's parse, and only the first text body is ever read: that one
    // part is decoded alone when the structure allows (see
    // [`first_text_body`]), else the whole message is parsed.
    let (headers, body) = guarded(|| read_message(raw, with_body))?;
    if headers.is_empty() {
        return Err(Malformed::Unparseable);
    }
    let body_text = match body {
        Some(text) => text,
        None => body_by_full_parse(raw)?,
    };
    // Where the last header field mail-parser read ends; one SIMD scan up
    // to there, no line-by-line search.
    let header_end = headers
        .iter()
        .map(|h| h.offset_end as usize)
        .max()
        .unwrap_or(0)
        .min(raw.len());
    if let Some(offset) = memchr::memchr(0, &raw[..header_end]) {
        return Err(Malformed::NulInHeaders { offset });
    }

    // One forward pass over the header list instead of a `header_raw`
    // lookup (a reverse linear scan each) per header we care about.
    let extra = ExtraHeaders::collect(&headers, raw);
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
    let mut auto = extra.auto_markers();
    // Reports are rare: only they pay for a full parse of their parts.
    if auto
        .report_type
        .as_deref()
        .is_some_and(|t| t.contains("delivery-status"))
    {
        auto.delivery_report = Some(delivery_report(raw)?);
    }
    let forwarded_by = extra
        .forwarded_by
        .flatten()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_ascii_lowercase);
    Ok(ParsedMessage {
        features,
        content_hash: String::new(),
        size: raw.len() as u64,
        auto,
        body_text,
        forwarded_by,
        bcc: addresses(extra.bcc.and_then(HeaderValue::as_address)),
    })
}

/// The first text body as a full parse of `raw` (mbox `From ` line removed)
/// reads it.
fn body_by_full_parse(raw: &[u8]) -> Result<Cow<'_, str>, Malformed> {
    let msg = guarded(|| LEAN_PARSER.parse(raw))?;
    Ok(take_body_text(&mut msg.ok_or(Malformed::Unparseable)?))
}

/// The first text body as mail-parser's full parse reads it (what
/// [`parse_for`] falls back to), for tests and benches to compare with.
#[doc(hidden)]
pub fn first_text_body_by_full_parse(raw: &[u8]) -> Result<String, Malformed> {
    body_by_full_parse(strip_mbox_from_line(raw)).map(Cow::into_owned)
}

/// The first text body by [`first_text_body`] alone: `None` where it
/// leaves the message to a full parse. For tests and benches.
#[doc(hidden)]
pub fn first_text_body_without_full_parse(raw: &[u8]) -> Option<String> {
    let raw = strip_mbox_from_line(raw);
    let (headers, body) = guarded(|| read_message(raw, true)).ok()?;
    // Without a header field parse_for rejects the input.
    body.filter(|_| !headers.is_empty()).map(Cow::into_owned)
}

/// The top-level header fields, parsed as mail-parser's `parse` starts, and
/// (when `with_body`) the first text body: `Some("")` without a body,
/// `None` when [`first_text_body`] leaves it to a full parse.
fn read_message(raw: &[u8], with_body: bool) -> (Vec<Header<'_>>, Option<Cow<'_, str>>) {
    let mut stream = MessageStream::new(raw);
    // Real mail has 10 to 40 fields: start where most end instead of
    // growing 4 → 8 → 16 (each step a copy of 120-byte headers).
    let mut headers = Vec::with_capacity(16);
    // `false`: the header section runs to the end, there is no body.
    if !stream.parse_headers(&LEAN_PARSER, &mut headers) || !with_body {
        return (headers, Some(Cow::Borrowed("")));
    }
    let body = first_text_body(&mut stream, &headers, Container::Message, None, 0);
    (headers, body)
}

/// How many nested multiparts [`first_text_body`] follows (it recurses;
/// real mail nests two or three).
const MAX_FOLLOWED_DEPTH: usize = 8;

/// What holds a MIME part, as far as [`first_text_body`] follows it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Container {
    /// The message itself (its only part).
    Message,
    MultipartMixed,
    MultipartAlternative,
}

/// The first text body of a message whose `stream` stands at the body of a
/// part with these `headers`, decoded exactly as mail-parser's full parse
/// decodes it for `body_text(0)`, with mail-parser's own primitives, but
/// without parsing or decoding any other part (an HTML alternative, the
/// attachments). Only the shapes where mail-parser's choice of that part is
/// plain are followed: a single text part; the first part of a
/// `multipart/mixed` when it is inline text or itself a mixed or alternative
/// multipart; the first part of a `multipart/alternative` when it is
/// `text/plain`. Anything else (a digest, an HTML-first alternative, an
/// attachment first, a part whose encoding mail-parser has to recover) gives
/// `None`: the caller parses the whole message.
fn first_text_body<'x>(
    stream: &mut MessageStream<'x>,
    headers: &[Header<'x>],
    container: Container,
    boundary: Option<&[u8]>,
    depth: usize,
) -> Option<Cow<'x, str>> {
    // mail-parser reads the last occurrence of a field.
    let last = |name: HeaderName<'static>| {
        headers
            .iter()
            .rev()
            .find(|h| h.name == name)
            .map(|h| &h.value)
    };
    let content_type = last(HeaderName::ContentType).and_then(HeaderValue::as_content_type);
    let (ctype, subtype) =
        content_type.map_or(("text", Some("plain")), |c| (c.ctype(), c.subtype()));
    let html = match (ctype, subtype) {
        ("multipart", sub) => {
            // Nested multiparts are followed inside a mixed one only, where
            // mail-parser's alternative bookkeeping has not started.
            let inner = match sub {
                Some("mixed") => Container::MultipartMixed,
                Some("alternative") => Container::MultipartAlternative,
                _ => return None,
            };
            if container == Container::MultipartAlternative || depth >= MAX_FOLLOWED_DEPTH {
                return None;
            }
            let inner_boundary = content_type?.attribute("boundary")?.as_bytes();
            if !stream.seek_next_part(inner_boundary) {
                return None;
            }
            stream.skip_crlf();
            let mut part_headers = Vec::new();
            if !stream.parse_headers(&LEAN_PARSER, &mut part_headers) {
                return None;
            }
            return first_text_body(
                stream,
                &part_headers,
                inner,
                Some(inner_boundary),
                depth + 1,
            );
        }
        ("text", Some("plain")) => false,
        ("text", Some("html")) if container != Container::MultipartAlternative => true,
        _ => return None,
    };
    let attachment = last(HeaderName::ContentDisposition)
        .and_then(HeaderValue::as_content_type)
        .is_some_and(|d| d.is_attachment());
    // In an alternative, text/plain is the text body whatever its
    // disposition; elsewhere only an inline part is.
    if attachment && container != Container::MultipartAlternative {
        return None;
    }
    let boundary = boundary.unwrap_or_default();
    let (offset_end, bytes) = match last(HeaderName::ContentTransferEncoding) {
        Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("base64") => {
            stream.decode_base64_mime(boundary)
        }
        Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("quoted-printable") => {
            stream.decode_quoted_printable_mime(boundary)
        }
        _ => stream.mime_part(boundary),
    };
    // mail-parser recovers such a part differently: leave it to it.
    if offset_end == usize::MAX {
        return None;
    }
    let decoder = content_type
        .and_then(|c| c.attribute("charset"))
        .and_then(|c| charset_decoder(c.as_bytes()));
    let text: Cow<'x, str> = match (bytes, decoder) {
        (Cow::Owned(vec), Some(decode)) => decode(&vec).into(),
        (Cow::Owned(vec), None) => String::from_utf8(vec)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
            .into(),
        (Cow::Borrowed(bytes), Some(decode)) => decode(bytes).into(),
        (Cow::Borrowed(bytes), None) => String::from_utf8_lossy(bytes),
    };
    Some(if html {
        Cow::Owned(html_to_text(&text))
    } else {
        text
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
    list_unsubscribe: Option<&'m str>,
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
    bcc: Option<&'m HeaderValue<'m>>,
    date: Option<&'m HeaderValue<'m>>,
    content_type: Option<&'m HeaderValue<'m>>,
}

impl<'m> ExtraHeaders<'m> {
    fn collect(headers: &'m [Header<'m>], raw: &'m [u8]) -> Self {
        let mut x = ExtraHeaders::default();
        for h in headers {
            let typed = match h.name {
                HeaderName::MessageId => Some(&mut x.message_id),
                HeaderName::InReplyTo => Some(&mut x.in_reply_to),
                HeaderName::References => Some(&mut x.references),
                HeaderName::Subject => Some(&mut x.subject),
                HeaderName::From => Some(&mut x.from),
                HeaderName::To => Some(&mut x.to),
                HeaderName::Cc => Some(&mut x.cc),
                HeaderName::Bcc => Some(&mut x.bcc),
                HeaderName::Date => Some(&mut x.date),
                HeaderName::ContentType => Some(&mut x.content_type),
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
                16 => ("List-Unsubscribe", &mut x.list_unsubscribe),
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
        let report_type = self
            .content_type
            .and_then(HeaderValue::as_content_type)
            .filter(|c| {
                c.ctype().eq_ignore_ascii_case("multipart")
                    && c.subtype()
                        .is_some_and(|s| s.eq_ignore_ascii_case("report"))
            })
            .map(|c| {
                c.attribute("report-type")
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        AutoMarkers {
            auto_submitted,
            precedence,
            vendor_auto_reply,
            list_id: lower(self.list_id),
            list_unsubscribe: self.list_unsubscribe.is_some(),
            report_type,
            delivery_report: None,
        }
    }
}

/// Reads a delivery status notification's returned Message-ID and
/// per-recipient fields with mail-parser's full parse (reports only).
fn delivery_report(raw: &[u8]) -> Result<DeliveryReport, Malformed> {
    use mail_parser::MimeHeaders;
    let msg = guarded(|| MessageParser::default().parse(raw))?;
    let mut report = DeliveryReport::default();
    let Some(msg) = msg else {
        return Ok(report);
    };
    for part in &msg.parts {
        if let PartType::Message(returned) = &part.body {
            if let Some(id) = returned.message_id() {
                push_id(&mut report.returned_message_ids, id);
            }
            continue;
        }
        let Some(ct) = part.content_type() else {
            continue;
        };
        let kind = (
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or_default().to_ascii_lowercase(),
        );
        match (kind.0.as_str(), kind.1.as_str()) {
            ("message", "delivery-status" | "global-delivery-status") => {
                report
                    .recipients
                    .extend(dsn_recipients(&String::from_utf8_lossy(part.contents())));
            }
            ("text", "rfc822-headers") | ("message", "global-headers" | "rfc822-headers") => {
                let headers = guarded(|| {
                    MessageParser::default()
                        .parse(part.contents())
                        .and_then(|m| m.message_id().map(str::to_string))
                })?;
                if let Some(id) = headers {
                    push_id(&mut report.returned_message_ids, &id);
                }
            }
            _ => {}
        }
    }
    Ok(report)
}

/// The per-recipient groups of a `message/delivery-status` body (RFC 3464
/// section 2.3) that report a failure or delay; `delivered`, `relayed` and
/// `expanded` recipients are left out.
fn dsn_recipients(text: &str) -> Vec<FailedRecipient> {
    // Field groups are separated by blank lines; folded lines continue a field.
    let mut groups: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            groups.push(Vec::new());
            continue;
        }
        let Some(group) = groups.last_mut() else {
            continue;
        };
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = group.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            group.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    // `rfc822; a@b` → `a@b`, `smtp; 550 ...` → `550 ...`.
    let typed = |v: &str| {
        v.split_once(';')
            .map_or(v, |(_, rest)| rest)
            .trim()
            .to_string()
    };
    let mut out = Vec::new();
    for g in groups {
        let field = |name: &str| g.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        let Some(recipient) = field("final-recipient").or_else(|| field("original-recipient"))
        else {
            continue;
        };
        let action = field("action").map(|a| a.to_ascii_lowercase());
        if action
            .as_deref()
            .is_some_and(|a| ["delivered", "relayed", "expanded"].contains(&a))
        {
            continue;
        }
        out.push(FailedRecipient {
            recipient: typed(recipient).to_ascii_lowercase(),
            action,
            status: field("status").map(str::to_string),
            diagnostic: field("diagnostic-code").map(typed),
        });
    }
    out
}

/// A header's raw value as `Message::header_raw` gives it (`None` if not UTF-8).
fn value_str<'m>(raw: &'m [u8], h: &mail_parser::Header<'_>) -> Option<&'m str> {
    let bytes = raw.get(h.offset_start as usize..h.offset_end as usize)?;
    std::str::from_utf8(bytes).ok()
}

/// A message saved from an mbox may start with a `From ` separator line.
fn strip_mbox_from_line(raw: &[u8]) -> &[u8] {
    let raw = strip_bom(raw);
    if raw.starts_with(b"From ") {
        if let Some(nl) = raw.iter().position(|b| *b == b'\n') {
            return strip_bom(&raw[nl + 1..]);
        }
    }
    raw
}

/// Drops a UTF-8 byte order mark before the first header field (editors and
/// some Windows tools write one); the message is parsed, not quarantined.
fn strip_bom(raw: &[u8]) -> &[u8] {
    raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw)
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
    fn utf8_bom_before_the_first_header_is_stripped_not_quarantined() {
        let plain = "From: Alice <alice@customer.example>\r\nSubject: Quote\r\nMessage-ID: <bom@customer.example>\r\n\r\nHello\r\n";
        let want = parse(plain.as_bytes(), "INBOX", 1 << 20).unwrap();
        for raw in [
            format!("\u{feff}{plain}"),
            format!("From alice@customer.example Mon Jan  5 10:00:00 2026\n\u{feff}{plain}"),
        ] {
            let got =
                parse(raw.as_bytes(), "INBOX", 1 << 20).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!(got.features.message_ids, vec!["bom@customer.example"]);
            assert_eq!(got.features.subject, "Quote");
            assert_eq!(got.features.from, want.features.from);
            // The same message with or without the BOM is one message.
            assert_eq!(got.content_hash, want.content_hash);
            assert_eq!(got.body_text.trim(), "Hello");
        }
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
    fn delivery_reports_name_the_returned_message_and_the_failed_recipients() {
        let dsn = b"From: MAILER-DAEMON@mx.test\r\nMessage-ID: <d@mx.test>\r\nContent-Type: multipart/report; report-type=\"delivery-status\"; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nfailed\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.test\r\n\r\nFinal-Recipient: rfc822; A@them.test\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 unknown\r\n\r\nFinal-Recipient: rfc822; b@them.test\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\n--B\r\nContent-Type: message/rfc822\r\n\r\nMessage-ID: <orig@us.test>\r\nFrom: me@us.test\r\n\r\nhello\r\n--B--\r\n";
        for with_body in [false, true] {
            let p = parse_for(dsn, "INBOX", 1 << 20, with_body).unwrap();
            assert_eq!(p.auto.report_type.as_deref(), Some("delivery-status"));
            let r = p.auto.delivery_report.unwrap();
            assert_eq!(r.returned_message_ids, vec!["orig@us.test"]);
            assert_eq!(
                r.recipients,
                vec![FailedRecipient {
                    recipient: "a@them.test".into(),
                    action: Some("failed".into()),
                    status: Some("5.1.1".into()),
                    diagnostic: Some("550 unknown".into()),
                }]
            );
        }
        // Ordinary mail, multipart or not, is not read for a report.
        let p = parse(MSG, "INBOX", 1 << 20).unwrap();
        assert_eq!((p.auto.report_type, p.auto.delivery_report), (None, None));
        let receipt = b"From: a@x.test\r\nContent-Type: multipart/report; report-type=disposition-notification; boundary=B\r\n\r\n--B--\r\n";
        let p = parse(receipt, "INBOX", 1 << 20).unwrap();
        assert_eq!(
            p.auto.report_type.as_deref(),
            Some("disposition-notification")
        );
        assert_eq!(p.auto.delivery_report, None);
        let list = parse(
            b"From: a@x.test\r\nList-Unsubscribe: <mailto:u@x>\r\n\r\nb",
            "INBOX",
            1 << 20,
        )
        .unwrap();
        assert!(list.auto.list_unsubscribe);
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

    /// Every file below these directories (relative to the crate; a
    /// missing one is skipped).
    fn files_under(dirs: &[&str]) -> Vec<std::path::PathBuf> {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut stack: Vec<_> = dirs.iter().map(|d| root.join(d)).collect();
        let mut files = Vec::new();
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        files
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
        for p in files_under(&["fixtures/correlation", "fixtures/demo-maildir"]) {
            if p.extension().is_none_or(|x| x == "eml") {
                inputs.push(std::fs::read(&p).unwrap());
            }
        }
        assert!(inputs.len() > 50, "fixtures found: {}", inputs.len());
        for raw in &inputs {
            if let Err(why) = headers_only_agrees(raw) {
                panic!("{}\n{why}", String::from_utf8_lossy(raw));
            }
        }
    }

    /// The header fields `read_message` reads are those of a full
    /// mail-parser parse's first part (it starts the same way).
    fn top_headers_agree(raw: &[u8]) -> Result<(), String> {
        let raw = strip_mbox_from_line(raw);
        let Ok(full) = guarded(|| LEAN_PARSER.parse(raw)) else {
            return Ok(());
        };
        let (headers, _) = read_message(raw, false);
        let full_headers = full
            .as_ref()
            .and_then(|m| m.parts.first())
            .map(|p| &p.headers);
        match full_headers {
            Some(h) if *h == headers => Ok(()),
            None if headers.is_empty() => Ok(()),
            other => Err(format!("full {other:?}\nread {headers:?}")),
        }
    }

    /// Every fixture, every corpus message (when `../shared/corpora` is
    /// there) and the malformed cases above.
    #[test]
    fn top_level_headers_are_what_a_full_parse_reads() {
        let files = files_under(&["fixtures", "../shared/corpora"]);
        let mut checked = 0;
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            for raw in crate::replay::split_mbox(&bytes) {
                if let Err(why) = top_headers_agree(&raw) {
                    panic!("{}\n{why}", f.display());
                }
                checked += 1;
            }
        }
        assert!(checked > 50, "{checked}");
        for raw in [
            &b"X-Foo: a\0b\n\nbody"[..],
            b"From: a@b.test\nnot a header\nX-Foo: a\0b\n\nbody",
            b"From: a",
        ] {
            top_headers_agree(raw).unwrap();
        }
    }

    /// Where [`first_text_body`] decodes the body on its own it must give
    /// what a full parse gives; returns whether it applied.
    fn fast_body_agrees(raw: &[u8]) -> Result<bool, String> {
        let Some(fast) = first_text_body_without_full_parse(raw) else {
            return Ok(false);
        };
        match first_text_body_by_full_parse(raw) {
            Ok(full) if full == fast => Ok(true),
            // A full parse that panics in mail-parser (debug assertions).
            Err(Malformed::ParserFailed(_)) => Ok(true),
            other => Err(format!("fast {fast:?}\nfull {other:?}")),
        }
    }

    fn mime(parts: &[&str]) -> Vec<u8> {
        parts.concat().into_bytes()
    }

    #[test]
    fn first_text_body_alone_reads_what_a_full_parse_reads() {
        let head = "From: a@b.test\nSubject: s\nMIME-Version: 1.0\n";
        let pdf = "--b\nContent-Type: application/pdf; name=x.pdf\nContent-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=x.pdf\n\nJVBERi0xLjQK\n";
        // (message, whether the body is decoded alone)
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (mime(&[head, "\nplain body\n"]), true),
            (mime(&[head, "Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\ncaf=E9 soft=\nbreak  \nlast=\n"]), true),
            (mime(&[head, "Content-Type: text/html\n\n<p>Hello <b>there</b></p>"]), true),
            (mime(&[head, "Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\naGVsbG8gd29ybGQ=\n"]), true),
            (mime(&[head, "Content-Type: multipart/alternative; boundary=b\n\npreamble\n--b\nContent-Type: text/plain; charset=utf-8\n\nplain \u{e9}\n--b\nContent-Type: text/html\n\n<p>html</p>\n--b--\n"]), true),
            // Quoted-printable up to the boundary: trailing blanks, a soft
            // break right before it, CRLF.
            (mime(&[head, "Content-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\nline=20\ntrailing   \nsoft=\n--b\nContent-Type: text/html\n\n<p>x</p>\n--b--\n"]), true),
            (mime(&[head, "Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\na=3Db  \r\nend\r\n--b--\r\n"]), true),
            (mime(&[head, "Content-Type: multipart/mixed; boundary=m\n\n--m\nContent-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\ncGxhaW4gdGV4dA==\n--b\nContent-Type: text/html\n\n<p>x</p>\n--b--\n--m\nContent-Type: application/pdf\n\n%PDF\n--m--\n"]), true),
            (mime(&[head, "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/html; charset=windows-1252\n\n<p>caf\u{e9}</p>\n", pdf, "--b--\n"]), true),
            // No headers in the first part: text/plain by default.
            (mime(&[head, "Content-Type: multipart/mixed; boundary=b\n\n--b\n\ndefault typed\n--b--\n"]), true),
            // The boundary found mid-line and as the prefix of a longer one,
            // as mail-parser finds it.
            (mime(&[head, "Content-Type: multipart/mixed; boundary=b\n\nx--b\nContent-Type: text/plain\n\nbody--b0 tail\n--b--\n"]), true),
            (mime(&[head, "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\n--b--\n"]), true),
            // In an alternative text/plain is the text body whatever its
            // disposition.
            (mime(&[head, "Content-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/plain\nContent-Disposition: attachment\n\nstill the body\n--b--\n"]), true),
            // Left to a full parse: HTML first in an alternative, an
            // attachment first, a digest, an unterminated part, a related
            // multipart, a missing boundary, text/calendar.
            (mime(&[head, "Content-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/html\n\n<p>x</p>\n--b\nContent-Type: text/plain\n\nplain\n--b--\n"]), false),
            (mime(&[head, "Content-Type: multipart/mixed; boundary=b\n\n", pdf, "--b\nContent-Type: text/plain\n\nplain\n--b--\n"]), false),
            (mime(&[head, "Content-Type: multipart/digest; boundary=b\n\n--b\n\nFrom: x@y.test\n\nhi\n--b--\n"]), false),
            (mime(&[head, "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nno end"]), false),
            (mime(&[head, "Content-Type: multipart/related; boundary=b\n\n--b\nContent-Type: text/html\n\n<p>x</p>\n--b--\n"]), false),
            (mime(&[head, "Content-Type: multipart/mixed\n\n--b\nContent-Type: text/plain\n\nplain\n--b--\n"]), false),
            (mime(&[head, "Content-Type: text/calendar\n\nBEGIN:VCALENDAR\n"]), false),
            // A multipart inside an alternative: there an inline HTML part
            // first is not the text body (mail-parser's alternative
            // bookkeeping), so none is followed.
            (mime(&[head, "Content-Type: multipart/alternative; boundary=a\n\n--a\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/html\n\n<p>html</p>\n--b\nContent-Type: text/plain\n\nplain\n--b--\n--a--\n"]), false),
            (mime(&[head, "Content-Type: text/plain\nContent-Disposition: attachment; filename=a.txt\n\nnot the body\n"]), false),
            // A header section without a body.
            (mime(&[head]), true),
        ];
        for (raw, alone) in &cases {
            let text = String::from_utf8_lossy(raw);
            match fast_body_agrees(raw) {
                Ok(applied) => assert_eq!(applied, *alone, "{text}"),
                Err(why) => panic!("{text}\n{why}"),
            }
        }
        // And through parse_for: the same body either way.
        for (raw, _) in &cases {
            let parsed = parse_for(raw, "INBOX", 1 << 20, true).unwrap();
            assert_eq!(
                parsed.body_text,
                first_text_body_by_full_parse(raw).unwrap(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn deeply_nested_mixed_multiparts_are_left_to_a_full_parse() {
        let mut raw = String::from("From: a@b.test\n");
        for level in 0..40 {
            raw.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=b{level}\n\n--b{level}\n"
            ));
        }
        raw.push_str("Content-Type: text/plain\n\ndeep\n");
        assert_eq!(first_text_body_without_full_parse(raw.as_bytes()), None);
        assert!(parse_for(raw.as_bytes(), "INBOX", 1 << 20, true).is_ok());
    }

    /// A MIME part for the proptest below: leaves of varied types,
    /// encodings, charsets and dispositions, multiparts of varied kinds.
    fn mime_part() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let text = proptest::sample::select(vec![
            "plain words",
            "caf=C3=A9 =\nsoft",
            "trailing  ",
            "=",
            "--",
            "a=3Db",
            "aGVsbG8=",
            "<p>html <b>x</b></p>",
            "",
            "caf\u{e9}",
            "=E9",
            "line\nline",
            "\r",
        ]);
        let leaf = (
            proptest::sample::select(vec![
                // The shapes followed most, weighted up.
                "",
                "",
                "Content-Type: text/plain\n",
                "Content-Type: text/plain\n",
                "Content-Type: text/plain\n",
                "Content-Type: text/plain; charset=iso-8859-1\n",
                "Content-Type: text/plain; charset=utf-8\n",
                "Content-Type: text/html\n",
                "Content-Type: text/html; charset=windows-1252\n",
                "Content-Type: application/pdf\n",
                "Content-Type: text/calendar\n",
                "Content-Type: message/rfc822\n",
                "Content-Type: text\n",
            ]),
            proptest::sample::select(vec![
                "",
                "Content-Transfer-Encoding: quoted-printable\n",
                "Content-Transfer-Encoding: base64\n",
                "Content-Transfer-Encoding: 8bit\n",
            ]),
            proptest::sample::select(vec![
                "",
                "Content-Disposition: attachment\n",
                "Content-Disposition: inline\n",
            ]),
            proptest::collection::vec(text, 0..4),
        )
            .prop_map(|(ct, cte, cd, body)| format!("{ct}{cte}{cd}\n{}", body.join("\n")));
        leaf.prop_recursive(3, 12, 4, |inner| {
            (
                proptest::sample::select(vec!["mixed", "alternative", "related", "digest"]),
                proptest::sample::select(vec!["b", "b1", "=_x"]),
                proptest::collection::vec(inner, 1..4),
                proptest::bool::ANY,
            )
                .prop_map(|(kind, boundary, parts, close)| {
                    let mut out = format!(
                        "Content-Type: multipart/{kind}; boundary=\"{boundary}\"\n\npreamble\n"
                    );
                    for p in parts {
                        out.push_str(&format!("--{boundary}\n{p}\n"));
                    }
                    if close {
                        out.push_str(&format!("--{boundary}--\n"));
                    }
                    out
                })
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]
        #[test]
        fn first_text_body_alone_agrees_on_generated_mime(
            part in mime_part(),
            crlf in proptest::bool::ANY,
        ) {
            let mut raw = format!("From: a@b.test\nSubject: s\n{part}");
            if crlf {
                raw = raw.replace('\n', "\r\n");
            }
            fast_body_agrees(raw.as_bytes()).map_err(proptest::test_runner::TestCaseError::fail)?;
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
            top_headers_agree(&bytes).map_err(proptest::test_runner::TestCaseError::fail)?;
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
            top_headers_agree(raw.as_bytes()).map_err(proptest::test_runner::TestCaseError::fail)?;
        }
    }
}
