//! Pure IMAP encoding helpers: quoting, UID sets, modified UTF-7 folder names, dates,
//! `Message-ID` extraction. No I/O here, so all of it is unit-tested.

#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

use super::error::ImapError;

/// RFC 3501 §5.1.3 modified BASE64: `,` instead of `/`, no padding.
const MUTF7: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::IMAP_MUTF7,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone),
);

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Quotes `s` as an IMAP quoted string. CR, LF and NUL cannot be quoted (they would
/// need a literal, and never occur in folder names or keywords we send).
pub(crate) fn quote(s: &str) -> Result<String, ImapError> {
    if s.contains(['\r', '\n', '\0']) {
        return Err(ImapError::InvalidInput(format!(
            "{:?} contains CR, LF or NUL",
            truncate(s, 80)
        )));
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// Encodes a folder name for the wire (RFC 3501 §5.1.3 modified UTF-7).
pub(crate) fn mutf7_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        out.push_str(&MUTF7.encode(bytes));
        out.push('-');
        pending.clear();
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// Decodes a modified UTF-7 folder name; `None` if it is not valid mUTF-7.
pub(crate) fn mutf7_decode(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some((before, after)) = rest.split_once('&') {
        out.push_str(before);
        let (b64, next) = after.split_once('-')?;
        if b64.is_empty() {
            out.push('&');
        } else {
            let bytes = MUTF7.decode(b64).ok()?;
            if bytes.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .filter_map(|p| p.try_into().ok().map(u16::from_be_bytes))
                .collect();
            out.push_str(&String::from_utf16(&units).ok()?);
        }
        rest = next;
    }
    out.push_str(rest);
    Some(out)
}

/// Builds compact UID sets (`1:5,7,9:12`) from UIDs, split so that no set is longer
/// than `max_len` characters (servers limit the command line length).
pub(crate) fn uid_sets(uids: &[u32], max_len: usize) -> Vec<String> {
    let mut sorted: Vec<u32> = uids.iter().copied().filter(|&u| u != 0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut sets = Vec::new();
    let mut current = String::new();
    let mut rest = sorted.as_slice();
    while let Some((&start, tail)) = rest.split_first() {
        let mut end = start;
        rest = tail;
        while let Some((&next, tail)) = rest.split_first() {
            if end.checked_add(1) != Some(next) {
                break;
            }
            end = next;
            rest = tail;
        }
        let piece = if start == end {
            start.to_string()
        } else {
            format!("{start}:{end}")
        };
        if !current.is_empty() && current.len() + 1 + piece.len() > max_len {
            sets.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(',');
        }
        current.push_str(&piece);
    }
    if !current.is_empty() {
        sets.push(current);
    }
    sets
}

/// True if `kw` can be sent as a flag keyword (an IMAP atom, not a `\` system flag).
pub(crate) fn is_keyword_atom(kw: &str) -> bool {
    !kw.is_empty()
        && kw.len() <= 200
        && !kw.starts_with('\\')
        && kw
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\]".contains(&b))
}

/// A calendar date for `SEARCH SINCE` (no time zone: IMAP compares dates in the
/// server's zone, RFC 3501 §6.4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImapDate {
    year: i32,
    month: u8,
    day: u8,
}

impl ImapDate {
    /// A valid Gregorian date, or `None`.
    pub fn new(year: i32, month: u8, day: u8) -> Option<Self> {
        if !(1..=9999).contains(&year) || !(1..=12).contains(&month) || day == 0 {
            return None;
        }
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        (day <= days).then_some(Self { year, month, day })
    }

    /// The UTC date of a Unix time stamp (seconds).
    pub fn from_unix(secs: i64) -> Self {
        let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
        Self { year, month, day }
    }

    /// Today in UTC.
    pub fn today_utc() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Self::from_unix(secs)
    }

    /// Year.
    pub fn year(&self) -> i32 {
        self.year
    }
    /// Month, 1–12.
    pub fn month(&self) -> u8 {
        self.month
    }
    /// Day of month, 1–31.
    pub fn day(&self) -> u8 {
        self.day
    }

    /// Unix time of 00:00:00 UTC on this date.
    pub fn unix_midnight_utc(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
    }
}

impl fmt::Display for ImapDate {
    /// IMAP `date` syntax: `1-Feb-2026`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mon = MONTHS
            .get(usize::from(self.month).wrapping_sub(1))
            .copied()
            .unwrap_or("???");
        write!(f, "{}-{}-{:04}", self.day, mon, self.year)
    }
}

/// Days since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
fn days_from_civil(y: i32, m: u8, d: u8) -> i64 {
    let (m, d) = (i64::from(m), i64::from(d));
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

/// Parses an INTERNALDATE (`17-Jul-1996 02:44:25 -0700`, day may be space-padded)
/// into Unix seconds.
pub(crate) fn parse_internal_date(s: &str) -> Option<i64> {
    let mut parts = s.split_whitespace();
    let (date, time, zone) = (parts.next()?, parts.next()?, parts.next()?);
    let mut d = date.split('-');
    let day: u8 = d.next()?.parse().ok()?;
    let mon = d.next()?;
    let month = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(mon))? as u8 + 1;
    let year: i32 = d.next()?.parse().ok()?;
    let date = ImapDate::new(year, month, day)?;
    let mut t = time.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let sec: i64 = t.next()?.parse().ok()?;
    // Bytes, not a `str` slice: the zone comes from the server and a non-ASCII
    // byte there must not panic (it used to, slicing inside a UTF-8 char).
    let (sign, zh1, zh2, zm1, zm2) = match *zone.as_bytes() {
        [b'+', a, b, c, d] => (1, a, b, c, d),
        [b'-', a, b, c, d] => (-1, a, b, c, d),
        _ => return None,
    };
    let zh = two_digits(zh1, zh2)?;
    let zm = two_digits(zm1, zm2)?;
    let offset = sign * (zh * 3600 + zm * 60);
    Some(date.unix_midnight_utc() + h * 3600 + mi * 60 + sec - offset)
}

/// Two ASCII digits as a number.
fn two_digits(a: u8, b: u8) -> Option<i64> {
    (a.is_ascii_digit() && b.is_ascii_digit())
        .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
}

/// The first `name:` field of a header block, continuation lines unfolded
/// (a byte-order mark before the first field name is ignored). `None` if
/// absent or empty.
pub(crate) fn header_value(block: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(block);
    let mut value: Option<String> = None;
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        match value.as_mut() {
            Some(v) if line.starts_with([' ', '\t']) => {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            Some(_) => break,
            None => {}
        }
        if let Some((field, rest)) = line.split_once(':') {
            if field
                .trim()
                .trim_start_matches('\u{feff}')
                .eq_ignore_ascii_case(name)
            {
                value = Some(rest.trim().to_string());
            }
        }
    }
    value.filter(|v| !v.is_empty())
}

/// Extracts the `Message-ID` value (angle brackets kept) from a header block,
/// unfolding continuation lines. `None` if absent or empty.
pub(crate) fn extract_message_id(header: &[u8]) -> Option<String> {
    let value = header_value(header, "message-id");
    let v = value?;
    let v = match (v.find('<'), v.find('>')) {
        // Both indices are at ASCII bytes, so `get` always succeeds here.
        (Some(a), Some(b)) if a < b => v.get(a..=b).unwrap_or(&v).to_string(),
        _ => v.trim().to_string(),
    };
    (!v.is_empty()).then_some(v)
}

/// Cuts `s` to at most `max` bytes on a char boundary, marking the cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s.get(..end).unwrap_or_default())
}

/// Fuzzing entry (`fuzz/fuzz_targets/imap_response.rs`): server bytes through
/// the response codec async-imap decodes with (imap-proto), response after
/// response as its stream does, and every decoder of ours that reads what
/// the server sent (greeting, status text, untagged events, COPYUID, LIST
/// names and attributes, INTERNALDATE, header Message-ID). Must never panic.
#[doc(hidden)]
pub fn fuzz_server_bytes(data: &[u8]) {
    use async_imap::imap_proto::{AttributeValue, MailboxDatum, Response};

    let first = data.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let _ = super::parse_greeting(first.trim_end_matches('\r'));
    let _ = super::error::parse_async_status(&first);

    let mut events = Vec::new();
    let mut bye = None;
    let mut rest = data;
    while !rest.is_empty() {
        // imap-proto 0.17 itself panics on some input (a non-ASCII byte right
        // after a `[CODE]`: it slices `&text[1..]` of the lossily decoded
        // text); that panic is upstream's, caught here so fuzzing goes on past
        // it (the fuzz target lets panics located in imap-proto through).
        let parsed = std::panic::catch_unwind(|| Response::parse(rest));
        let (next, response) = match parsed {
            Ok(Ok(parsed)) => parsed,
            Ok(Err(e)) if e.is_incomplete() => break,
            // Skip the line, as a reader that resynchronises would.
            Ok(Err(_)) | Err(_) => match memchr::memchr(b'\n', rest) {
                Some(nl) => {
                    rest = rest.get(nl + 1..).unwrap_or_default();
                    continue;
                }
                None => break,
            },
        };
        super::note_untagged(&mut events, &mut bye, &response);
        let outcome = match &response {
            Response::Done { outcome, .. }
            | Response::Data { outcome, .. }
            | Response::Continue(outcome) => Some(outcome),
            _ => None,
        };
        if let Some(code) = outcome.and_then(|o| o.code.as_ref()) {
            let _ = super::copy_uid_map(code);
            let _ = super::error::code_name(code);
        }
        if let Some(info) = outcome.and_then(|o| o.information.as_deref()) {
            let _ = super::error::split_code(None, info);
            let _ = truncate(info, 300);
        }
        match &response {
            Response::MailboxData(MailboxDatum::List(data)) => {
                let _ = mutf7_decode(data.name.as_ref());
                for a in &data.name_attributes {
                    let _ = super::name_attribute(a);
                }
            }
            Response::Fetch(_, attrs) => {
                for a in attrs {
                    match a {
                        AttributeValue::InternalDate(d) => {
                            let _ = parse_internal_date(d);
                        }
                        AttributeValue::BodySection { data: Some(d), .. }
                        | AttributeValue::Rfc822Header(Some(d))
                        | AttributeValue::Rfc822(Some(d)) => {
                            let _ = extract_message_id(d);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if next.len() >= rest.len() {
            break;
        }
        rest = next;
    }
}

#[cfg(test)]
#[allow(clippy::string_slice, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("INBOX").unwrap(), "\"INBOX\"");
        assert_eq!(quote(r#"a"b\c"#).unwrap(), r#""a\"b\\c""#);
        assert!(quote("a\r\nb").is_err());
    }

    #[test]
    fn mutf7_round_trip() {
        // RFC 3501 §5.1.3 example.
        assert_eq!(
            mutf7_encode("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(
            mutf7_decode("~peter/mail/&U,BTFw-/&ZeVnLIqe-").unwrap(),
            "~peter/mail/台北/日本語"
        );
        assert_eq!(mutf7_encode("A&B"), "A&-B");
        assert_eq!(mutf7_decode("A&-B").unwrap(), "A&B");
        assert_eq!(mutf7_encode("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(mutf7_decode("Entw&APw-rfe").unwrap(), "Entwürfe");
        for s in [
            "INBOX",
            "Gesendete Elemente",
            "Ünïcödé & 😀 mix",
            "&&",
            "😀",
        ] {
            assert_eq!(mutf7_decode(&mutf7_encode(s)).as_deref(), Some(s));
        }
        assert_eq!(mutf7_decode("bad&AB"), None);
    }

    #[test]
    fn uid_set_compaction() {
        assert_eq!(
            uid_sets(&[9, 1, 2, 3, 4, 5, 7, 10, 11, 12, 5], 1000),
            vec!["1:5,7,9:12"]
        );
        assert_eq!(uid_sets(&[], 1000), Vec::<String>::new());
        assert_eq!(uid_sets(&[42], 1000), vec!["42"]);
        let scattered: Vec<u32> = (1..=1000).map(|i| i * 2).collect();
        let sets = uid_sets(&scattered, 100);
        assert!(sets.len() > 1);
        assert!(sets.iter().all(|s| s.len() <= 100));
        let back: Vec<u32> = sets
            .iter()
            .flat_map(|s| {
                s.split(',')
                    .map(|p| p.parse::<u32>().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(back, scattered);
    }

    #[test]
    fn dates() {
        assert_eq!(ImapDate::new(2026, 1, 5).unwrap().to_string(), "5-Jan-2026");
        assert!(ImapDate::new(2025, 2, 29).is_none());
        assert!(ImapDate::new(2024, 2, 29).is_some());
        assert_eq!(ImapDate::from_unix(0), ImapDate::new(1970, 1, 1).unwrap());
        assert_eq!(
            ImapDate::from_unix(1_767_225_599),
            ImapDate::new(2025, 12, 31).unwrap()
        );
        assert_eq!(
            ImapDate::new(2026, 1, 1).unwrap().unix_midnight_utc(),
            1_767_225_600
        );
        assert_eq!(
            parse_internal_date("17-Jul-1996 02:44:25 -0700"),
            Some(837_596_665)
        );
        assert_eq!(
            parse_internal_date(" 1-Jan-2026 00:00:00 +0000"),
            Some(1_767_225_600)
        );
        assert_eq!(parse_internal_date("garbage"), None);
    }

    #[test]
    fn internal_date_with_a_non_ascii_zone_is_rejected_not_a_panic() {
        // A multi-byte char across the old `&digits[..2]` cut used to panic.
        for zone in ["+é00", "-0é0", "+00é", "+\u{1F600}", "+0000é"] {
            let s = format!("17-Jul-1996 02:44:25 {zone}");
            assert_eq!(parse_internal_date(&s), None, "{s}");
        }
        assert_eq!(parse_internal_date("17-Jul-1996 02:44:25 ++100"), None);
        assert_eq!(
            parse_internal_date("17-Jul-1996 09:44:25 +0000"),
            Some(837_596_665)
        );
    }

    #[test]
    fn fuzz_entry_reaches_the_decoders_without_panicking() {
        // The INTERNALDATE zone bug, as a server would send it.
        fuzz_server_bytes(
            "* 1 FETCH (UID 7 INTERNALDATE \"17-Jul-1996 02:44:25 +é00\")\r\n".as_bytes(),
        );
        fuzz_server_bytes(
            b"* OK [CAPABILITY IMAP4rev1] hi\r\n* LIST (\\HasNoChildren \\Sent) \"/\" \"Entw&APw-rfe\"\r\n\
              * 2 FETCH (BODY[HEADER] {30}\r\nMessage-ID: <a@b>\r\nX: y\r\n\r\n)\r\n\
              A1 OK [COPYUID 9 1:2 5:6] done\r\n* BYE bye\r\n",
        );
        fuzz_server_bytes(b"garbage\r\n\xff\xfe\r\n* 3 EXISTS\r\n");
    }

    #[test]
    fn uid_sets_reach_the_largest_uid() {
        assert_eq!(
            uid_sets(&[u32::MAX, u32::MAX - 1, 1], 1000),
            vec![format!("1,{}:{}", u32::MAX - 1, u32::MAX)]
        );
    }

    #[test]
    fn message_id() {
        let h = b"Subject: x\r\nMessage-ID: <abc@example.com>\r\n\r\n";
        assert_eq!(extract_message_id(h).as_deref(), Some("<abc@example.com>"));
        let folded = b"message-id:\r\n <folded@example.com>\r\nX: y\r\n";
        assert_eq!(
            extract_message_id(folded).as_deref(),
            Some("<folded@example.com>")
        );
        assert_eq!(extract_message_id(b"\r\n"), None);
        let bom = "\u{feff}Message-ID: <bom@example.com>\r\n\r\n";
        assert_eq!(
            extract_message_id(bom.as_bytes()).as_deref(),
            Some("<bom@example.com>")
        );
    }

    #[test]
    fn keywords() {
        assert!(is_keyword_atom("$CRMTracked"));
        assert!(!is_keyword_atom("\\Seen"));
        assert!(!is_keyword_atom("a b"));
        assert!(!is_keyword_atom(""));
    }
}
