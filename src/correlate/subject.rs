//! Subject normalisation for correlation.
//!
//! * [`base_subject`]: RFC 5256 §2.1 base subject, extended with localised
//!   reply/forward prefixes and security-gateway tags, lower-cased.
//! * [`base_subject_without_tokens`]: the same with tracking tokens removed,
//!   the key for "same conversation" comparisons.
//! * [`dynamics_strip_keywords`], [`subject_word_hashes`],
//!   [`address_hashes`]: the pieces of Dynamics "smart matching".

use std::sync::LazyLock;

use regex::Regex;

use super::token::{find_tokens, remove_spans, TokenSettings};

/// Reply/forward abbreviations used by mail clients in many languages
/// (English, German, Nordic, Dutch, French, Spanish, Portuguese, Italian,
/// Polish, Turkish, Baltic, Croatian, Greek, Russian, Chinese, Japanese,
/// Korean). Matched case-insensitively and only when followed by a colon.
const REPLY_FORWARD_WORDS: &str =
    "re|fwd?|aw|wg|sv|vs|vb|vl|tr|rép|antw|antwort|doorst|rv|enc|res|\
rif|r|i|odp|pd|ynt|ilt|atb|ats|pārs|odg|fwd|απ|σχετ|πρθ|ответ|отв|пересл|\
回复|回覆|答复|答覆|转发|轉寄|转寄|轉發|件名|返信|転送|회신|답장|전달|\
external|extern|ext";

/// Tags that security gateways put in subjects.
const TAG_WORDS: &str = "external|ext|extern|externe|external email|external sender|\
caution|warning|spam|suspicious|phish|phishing|suspected spam";

/// One leading reply/forward prefix, optionally numbered (`Re[2]:`,
/// `RE^2:`, `Re(2):`) or with an RFC 5256 blob before the colon, then an
/// ASCII or full-width colon.
static LEADER: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?i)^(?:{REPLY_FORWARD_WORDS})\s*(?:\[[^\[\]]*\]|\^\s*\d+|\(\d+\))?\s*[:：]\s*"
    ))
    .ok()
});

/// A leading RFC 5256 subj-blob: `[anything without brackets]`.
static BLOB: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"^\[[^\[\]]*\]\s*").ok());

/// Gateway tags anywhere: `[EXTERNAL]`, `*EXTERNAL*`, `(External)`.
static TAG: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?i)(?:\[\s*(?:{TAG_WORDS})\s*\]|\*+\s*(?:{TAG_WORDS})\s*\*+|\(\s*(?:{TAG_WORDS})\s*\))"
    ))
    .ok()
});

/// RFC 5256 subj-fwd: `[fwd: ...]` wrapping the whole subject.
static FWD_WRAP: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"(?is)^\[fwd:\s*(.*)\]$").ok());

/// The documented Dynamics smart-matching keyword regex, verbatim.
static DYNAMICS_KEYWORDS: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"^[\s]*([\w]+\s?:[\s]*)+").ok());

/// Client placeholders for an empty subject; they carry no information.
const NO_SUBJECT: &[&str] = &[
    "(no subject)",
    "(kein betreff)",
    "(sans objet)",
    "(sin asunto)",
    "(senza oggetto)",
    "(sem assunto)",
    "(geen onderwerp)",
    "(без темы)",
    "(无主题)",
    "(件名なし)",
    "no subject",
];

/// Regexes are compiled once; a `None` (impossible for these constant
/// patterns, and asserted by a test) degrades to "no match" instead of
/// panicking.
fn find<'a>(re: &LazyLock<Option<Regex>>, s: &'a str) -> Option<regex::Match<'a>> {
    re.as_ref().and_then(|r| r.find(s))
}

/// [`find`] only when the cheap precondition `worth_it` holds.
fn find_if<'a>(
    worth_it: bool,
    re: &LazyLock<Option<Regex>>,
    s: &'a str,
) -> Option<regex::Match<'a>> {
    if worth_it {
        find(re, s)
    } else {
        None
    }
}

/// Collapses every whitespace run to one space and trims.
fn collapse_ws(s: &str) -> String {
    // Most subjects are already collapsed ASCII: copy them as they are
    // (non-ASCII may hide Unicode white space, so it takes the long way).
    let b = s.as_bytes();
    let collapsed = b.first().is_some_and(|&c| c != b' ')
        && b.last().is_some_and(|&c| c != b' ')
        && b.iter()
            .all(|&c| c.is_ascii() && (c == b' ' || !c.is_ascii_whitespace()))
        && !b.windows(2).any(|w| w == b"  ");
    if collapsed {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    for w in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(w);
    }
    out
}

/// Strips one layer of leading/trailing noise; returns the new text.
///
/// Every pattern needs a character most subjects lack (`[`, `(`, `*` for
/// tags, `)` at the end for the trailer, a colon for leaders, `[` first for
/// blobs); the regexes run only when it is there (every message's subject
/// goes through here).
fn strip_once(s: &str) -> String {
    let mut s = match TAG.as_ref() {
        Some(tag) if s.contains(['[', '(', '*']) => collapse_ws(&tag.replace_all(s, " ")),
        _ => collapse_ws(s),
    };
    // subj-trailer: "(fwd)" at the end.
    while s.ends_with(')') {
        let lower = s.to_lowercase();
        if lower.ends_with("(fwd)") {
            // "(fwd)" is ASCII, so its lower-case form has the same byte length.
            let cut = s.len().saturating_sub(5);
            match s.get(..cut) {
                Some(head) => s = head.trim_end().to_owned(),
                None => break,
            }
        } else {
            break;
        }
    }
    // subj-leader: prefixes and blobs, as long as something remains.
    loop {
        if let Some(m) = find_if(s.contains([':', '：']), &LEADER, &s) {
            s = s[m.end()..].to_owned();
            continue;
        }
        if let Some(m) = find_if(s.starts_with('['), &BLOB, &s) {
            if m.end() < s.len() {
                s = s[m.end()..].to_owned();
                continue;
            }
        }
        break;
    }
    // subj-fwd: "[fwd: X]" → "X".
    if let Some(c) = FWD_WRAP
        .as_ref()
        .filter(|_| s.starts_with('['))
        .and_then(|r| r.captures(&s))
        .and_then(|c| c.get(1))
    {
        s = c.as_str().to_owned();
    }
    collapse_ws(&s)
}

/// RFC 5256 §2.1 base subject plus localised prefixes (`AW:`, `SV:`,
/// `回复：`, `Ответ:`, numbered `Re[2]:`), gateway tags (`[EXTERNAL]`,
/// `*EXT*`), lower-cased with whitespace collapsed. Empty-subject
/// placeholders such as `(no subject)` give `""`. Tokens are NOT removed;
/// see [`base_subject_without_tokens`].
pub fn base_subject(s: &str) -> String {
    simple_base_subject(s).unwrap_or_else(|| regex_base_subject(s))
}

/// [`base_subject`] the general way (any subject).
fn regex_base_subject(s: &str) -> String {
    let mut cur = collapse_ws(s);
    // Every pass removes at least one character or stops, so this ends.
    loop {
        let next = strip_once(&cur);
        if next == cur {
            break;
        }
        cur = next;
    }
    let lower = cur.to_lowercase();
    if NO_SUBJECT.contains(&lower.as_str()) {
        return String::new();
    }
    lower
}

/// The ASCII words of [`REPLY_FORWARD_WORDS`] (the rest only occur in
/// non-ASCII subjects, which take the regex way).
const ASCII_REPLY_FORWARD_WORDS: &[&str] = &[
    "re", "fw", "fwd", "aw", "wg", "sv", "vs", "vb", "vl", "tr", "antw", "antwort", "doorst", "rv",
    "enc", "res", "rif", "r", "i", "odp", "pd", "ynt", "ilt", "atb", "ats", "odg", "external",
    "extern", "ext",
];

/// Subjects the regexes are not needed for: printable ASCII, without the
/// characters tags, blobs, numbered prefixes and the `(fwd)` trailer need,
/// except `[…]` groups that are exactly a gateway tag (`[EXTERNAL]`).
fn is_simple_subject(s: &str) -> bool {
    simple_tag_groups(s).is_some()
}

/// For a subject [`is_simple_subject`] accepts, its tag groups
/// ([`tag_groups`]; empty without brackets); `None` for the others.
fn simple_tag_groups(s: &str) -> Option<Vec<std::ops::Range<usize>>> {
    // One pass over the bytes (every message's subject comes through here).
    let mut brackets = false;
    for b in s.bytes() {
        if !(b == b' ' || b.is_ascii_graphic()) || matches!(b, b'(' | b')' | b'*' | b'^') {
            return None;
        }
        brackets |= matches!(b, b'[' | b']');
    }
    if brackets {
        tag_groups(s)
    } else {
        Some(Vec::new())
    }
}

/// The byte ranges of the `[…]` groups of `s` when every one of them is a
/// gateway tag ([`TAG_WORDS`], case-insensitive, inner spaces trimmed) and
/// brackets neither nest nor stray; `None` otherwise.
fn tag_groups(s: &str) -> Option<Vec<std::ops::Range<usize>>> {
    let mut groups = Vec::new();
    let mut rest = 0;
    let bracket =
        |from: usize| memchr::memchr2(b'[', b']', &s.as_bytes()[from..]).map(|i| from + i);
    while let Some(open) = bracket(rest) {
        if s.as_bytes()[open] == b']' {
            return None;
        }
        let close = bracket(open + 1)?;
        if s.as_bytes()[close] == b'[' {
            return None;
        }
        let inner = s[open + 1..close].trim_matches(|c: char| c.is_ascii_whitespace());
        if !TAG_WORDS.split('|').any(|w| w.eq_ignore_ascii_case(inner)) {
            return None;
        }
        // `Re [EXTERNAL]:` is a prefix with a blob (the regex way's business).
        if s[close + 1..].trim_start().starts_with(':') {
            return None;
        }
        groups.push(open..close + 1);
        rest = close + 1;
    }
    Some(groups)
}

/// A leading `word:` prefix of a simple subject (`Re:`, `AW :`, `fwd:`),
/// and the text after it; `None` when the subject does not start with one.
fn simple_leader(s: &str) -> Option<(&str, &str)> {
    let word_len = s.bytes().take_while(u8::is_ascii_alphabetic).count();
    let (word, rest) = s.split_at(word_len);
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let rest = rest.strip_prefix(':')?;
    ASCII_REPLY_FORWARD_WORDS
        .iter()
        .any(|w| w.eq_ignore_ascii_case(word))
        .then_some((word, rest))
}

/// [`base_subject`] of a simple subject without the regexes (every message's
/// subject comes through here); `None` for the others.
fn simple_base_subject(s: &str) -> Option<String> {
    let groups = simple_tag_groups(s)?;
    // Tags go first, wherever they are, each leaving a space (as the regex
    // way's `replace_all`).
    let untagged;
    let s = if groups.is_empty() {
        s
    } else {
        let mut out = String::with_capacity(s.len());
        let mut last = 0;
        for g in groups {
            out.push_str(&s[last..g.start]);
            out.push(' ');
            last = g.end;
        }
        out.push_str(&s[last..]);
        untagged = out;
        untagged.as_str()
    };
    let mut rest = s.trim_matches(|c: char| c.is_ascii_whitespace());
    while let Some((_, after)) = simple_leader(rest) {
        rest = after.trim_start_matches(|c: char| c.is_ascii_whitespace());
    }
    let mut out = String::with_capacity(rest.len());
    for w in rest.split_ascii_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(w.bytes().map(|b| char::from(b.to_ascii_lowercase())));
    }
    if NO_SUBJECT.contains(&out.as_str()) {
        out.clear();
    }
    Some(out)
}

/// Whether the subject starts (after gateway tags and `[list]` blobs) with a
/// reply or forward prefix in any supported language: the sender declares
/// the message a response, which smart matching weighs.
pub fn is_reply_or_forward(s: &str) -> bool {
    // Every prefix ends in a colon.
    if !s.contains([':', '：']) {
        return false;
    }
    if is_simple_subject(s) {
        let mut rest = s.trim_start();
        loop {
            // Leading tags (all `[…]` groups of a simple subject are tags).
            if rest.starts_with('[') {
                match rest.find(']') {
                    Some(close) => {
                        rest = rest[close + 1..].trim_start();
                        continue;
                    }
                    None => return regex_is_reply(s),
                }
            }
            match simple_leader(rest) {
                // `EXT:` is a gateway tag, not a reply marker: look past it.
                Some((word, after))
                    if word.len() >= 3 && word.as_bytes()[..3].eq_ignore_ascii_case(b"ext") =>
                {
                    rest = after.trim_start();
                }
                Some(_) => return true,
                None => return false,
            }
        }
    }
    regex_is_reply(s)
}

/// [`is_reply_or_forward`] the general way (any subject).
fn regex_is_reply(s: &str) -> bool {
    let mut rest = s.trim_start();
    // Every pass consumes at least one character or returns, so this ends.
    loop {
        if let Some(m) = find(&TAG, rest).filter(|m| m.start() == 0 && m.end() > 0) {
            rest = rest[m.end()..].trim_start();
            continue;
        }
        if let Some(m) = find(&BLOB, rest).filter(|m| m.end() > 0) {
            rest = rest[m.end()..].trim_start();
            continue;
        }
        match find(&LEADER, rest).filter(|m| m.end() > 0) {
            Some(m) => {
                let word = rest[..m.end()].to_lowercase();
                if word.starts_with("ext") {
                    // `EXT:` is a gateway tag, not a reply marker.
                    rest = rest[m.end()..].trim_start();
                    continue;
                }
                return true;
            }
            None => return false,
        }
    }
}

/// Removes every tracking token (current or previous prefix, with any
/// brackets around it) from `s`, leaving the rest untouched.
pub fn strip_tokens(s: &str, settings: &TokenSettings) -> String {
    let spans: Vec<_> = find_tokens(settings, s)
        .into_iter()
        .map(|f| f.span)
        .collect();
    remove_spans(s, &spans)
}

/// [`base_subject`] after removing tracking tokens:
/// `"RE: AW: [EXTERNAL] Invoice 7781 CRM:0001001"` → `"invoice 7781"`.
pub fn base_subject_without_tokens(s: &str, settings: &TokenSettings) -> String {
    base_subject(&strip_tokens(s, settings))
}

/// Applies exactly the documented Dynamics smart-matching regex
/// `^[\s]*([\w]+\s?:[\s]*)+` and returns the rest. `\w` is Unicode-aware
/// (as in .NET); note that a full-width colon `：` is not stripped, and that
/// any leading `word:` is (e.g. `Meeting: Tuesday` → `Tuesday`), as in
/// Dynamics.
pub fn dynamics_strip_keywords(s: &str) -> &str {
    match find(&DYNAMICS_KEYWORDS, s) {
        Some(m) => &s[m.end()..],
        None => s,
    }
}

/// A patch-series marker in a subject: `[PATCH v2 3/7]`, `[RFC PATCH 1/2]`,
/// `[PATCHv3 0/4]`, `(2/5)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesMarker {
    /// `vN` in the bracket group; 1 when absent (v1 is rarely written).
    pub version: u32,
    /// k of k/N (0: the cover letter).
    pub part: u32,
    /// N of k/N.
    pub total: u32,
}

/// The first series marker of a subject: a `[...]` group holding a `k/N`
/// word (its other words may be anything: `PATCH`, `RFC`, `net-next`,
/// `v2`), or a `(k/N)` group. `0 <= k <= N`, `1 <= N <= 999`.
pub fn series_marker(subject: &str) -> Option<SeriesMarker> {
    let bytes = subject.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let close = match bytes[i] {
            b'[' => b']',
            b'(' => b')',
            _ => {
                i += 1;
                continue;
            }
        };
        let len = bytes[i + 1..].iter().position(|b| *b == close)?;
        let group = subject.get(i + 1..i + 1 + len).unwrap_or_default();
        let words: Vec<&str> = group.split_whitespace().collect();
        // A parenthesised marker is the fraction alone, so "(see 1/2)" in
        // prose is not one.
        if close == b']' || words.len() == 1 {
            if let Some((part, total)) = words.iter().find_map(|w| fraction(w)) {
                let version = words.iter().find_map(|w| version_word(w)).unwrap_or(1);
                return Some(SeriesMarker {
                    version,
                    part,
                    total,
                });
            }
        }
        i += 1 + len;
    }
    None
}

/// `k/N` with ASCII digits, `0 <= k <= N`, `1 <= N <= 999`.
fn fraction(w: &str) -> Option<(u32, u32)> {
    let (k, n) = w.split_once('/')?;
    let digits = |s: &str| {
        (!s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    let (k, n) = (digits(k)?, digits(n)?);
    (n >= 1 && k <= n).then_some((k, n))
}

/// `v2`, `V3`, `PATCHv4`: the series version.
fn version_word(w: &str) -> Option<u32> {
    let lower = w.to_ascii_lowercase();
    let rest = lower.strip_prefix("patch").unwrap_or(&lower);
    let digits = rest.strip_prefix('v')?;
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// 64-bit FNV-1a: stable across runs, versions and platforms, unlike std's
/// `RandomState`, so hashes can be stored in the index.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_bytes(bytes.iter().copied())
}

pub(crate) fn fnv1a64_bytes(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Dynamics-style subject word hashes: [`dynamics_strip_keywords`], then
/// split on whitespace, lower-case each word, trim punctuation at the word's
/// ends (dropping words that are only punctuation), and FNV-1a-hash the
/// first `hash_max_count` words (Dynamics HashMaxCount, default 20). Order
/// and duplicates are kept: Dynamics compares the count of hashes too.
pub fn subject_word_hashes(s: &str, hash_max_count: usize) -> Vec<u64> {
    dynamics_strip_keywords(s)
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .take(hash_max_count)
        .map(|w| fnv1a64(w.as_bytes()))
        .collect()
}

/// Address hashes for smart matching: each address trimmed (also of `<>`),
/// lower-cased and FNV-1a-hashed; empty ones skipped; sorted and deduped so
/// callers can intersect two lists with a merge.
pub fn address_hashes<'a>(addrs: impl IntoIterator<Item = &'a str>) -> Vec<u64> {
    let mut out: Vec<u64> = addrs
        .into_iter()
        .map(|a| {
            a.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .trim()
        })
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a.is_ascii() {
                // Same hash as of the lower-cased copy, without the copy.
                fnv1a64_bytes(a.bytes().map(|b| b.to_ascii_lowercase()))
            } else {
                fnv1a64(a.to_lowercase().as_bytes())
            }
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn simple_subjects_take_the_fast_way_to_the_same_base() {
        use proptest::prelude::*;
        let piece = prop::sample::select(vec![
            "Re",
            "RE",
            "re",
            "Fwd",
            "AW",
            "aw",
            "Ext",
            "EXTERNAL",
            "Rex",
            "r",
            "i",
            "Invoice",
            "7781",
            ":",
            " :",
            ": ",
            "  ",
            " ",
            "\t",
            "No subject",
            "no",
            "subject",
            "Re2",
            "x:y",
            "é",
            "[",
            "]",
            "[EXTERNAL]",
            "[ ext ]",
            "[External Email]",
            "[notmuch]",
            "(fwd)",
            "[fwd: x]",
        ]);
        proptest!(ProptestConfig::with_cases(5000), |(parts in prop::collection::vec(piece, 0..8))| {
            let s: String = parts.concat();
            if let Some(fast) = simple_base_subject(&s) {
                prop_assert_eq!(&fast, &regex_base_subject(&s), "{:?}", s);
            }
            prop_assert_eq!(is_reply_or_forward(&s), regex_is_reply(&s), "{:?}", s);
        });
    }

    use super::*;

    #[test]
    fn reply_and_forward_prefixes_are_recognised_behind_tags() {
        for s in [
            "Re: x",
            "[EXTERNAL] AW: x",
            "EXT: RE: x",
            "[fedora-devel] Re: x",
            "回复: x",
            "Fwd: x",
            "Re[2]: x",
        ] {
            assert!(is_reply_or_forward(s), "{s}");
        }
        for s in ["x", "[PATCH] x", "Meeting: x", "EXT: x", "", "Regarding: x"] {
            assert!(!is_reply_or_forward(s), "{s}");
        }
    }
    use proptest::prelude::*;

    #[test]
    fn regexes_compile() {
        for r in [&LEADER, &BLOB, &TAG, &FWD_WRAP, &DYNAMICS_KEYWORDS] {
            assert!(r.is_some());
        }
    }

    #[test]
    fn rfc5256_basics() {
        assert_eq!(base_subject("Re: Hello"), "hello");
        assert_eq!(base_subject("Fwd: Re: Re[3]: Meeting"), "meeting");
        assert_eq!(
            base_subject("FW:  RE:   Quarterly\t report (fwd)"),
            "quarterly report"
        );
        assert_eq!(base_subject("[fwd: Budget] (fwd)"), "budget");
        assert_eq!(base_subject("Re: [list] Re: topic"), "topic");
        assert_eq!(base_subject("re : spaced colon"), "spaced colon");
        // A lone blob is the subject itself (RFC: only strip if text remains).
        assert_eq!(base_subject("[alone]"), "[alone]");
        // Words that merely start like a prefix stay.
        assert_eq!(base_subject("Results: Q3"), "results: q3");
        assert_eq!(base_subject("Reply needed"), "reply needed");
    }

    #[test]
    fn localised_prefixes_and_tags() {
        for (input, want) in [
            ("AW: WG: Angebot", "angebot"),
            ("SV: VS: Tilbud", "tilbud"),
            ("Antw: Doorst: Offerte", "offerte"),
            ("TR: RE: Devis", "devis"),
            ("RV: ENC: Presupuesto", "presupuesto"),
            ("Odp: Oferta", "oferta"),
            ("回复：报价单", "报价单"),
            ("回覆: 答复：转发：轉寄: 报价", "报价"),
            ("件名: 見積", "見積"),
            ("Ответ: Пересл: Счёт", "счёт"),
            ("RE^2: Re(4): Status", "status"),
            ("[EXTERNAL] RE: Order", "order"),
            ("*EXTERNAL* Order", "order"),
            ("RE: Order [EXT]", "order"),
            ("(External) Order", "order"),
        ] {
            assert_eq!(base_subject(input), want, "{input}");
        }
    }

    #[test]
    fn tokens_removed() {
        let s = TokenSettings::default();
        assert_eq!(
            base_subject_without_tokens("RE: AW: [EXTERNAL] Invoice 7781 CRM:0001001", &s),
            "invoice 7781"
        );
        assert_eq!(
            base_subject("RE: AW: [EXTERNAL] Invoice 7781 CRM:0001001"),
            "invoice 7781 crm:0001001"
        );
        assert_eq!(
            base_subject_without_tokens("[CRM:0001001] RE: Invoice", &s),
            "invoice"
        );
        assert_eq!(
            base_subject_without_tokens("Fwd: A crm : 0001001 B CRM:0001002", &s),
            "a b"
        );
        assert_eq!(
            strip_tokens("Invoice  7781 CRM:0001001", &s),
            "Invoice  7781"
        );
    }

    #[test]
    fn empty_and_placeholders() {
        assert_eq!(base_subject(""), "");
        assert_eq!(base_subject("   "), "");
        assert_eq!(base_subject("(no subject)"), "");
        assert_eq!(base_subject("RE: (No Subject)"), "");
        assert_eq!(base_subject("Re:"), "");
        assert_eq!(base_subject("(fwd)"), "");
    }

    #[test]
    fn dynamics_keywords_exactly() {
        assert_eq!(
            dynamics_strip_keywords("RE: FW: Invoice 7781"),
            "Invoice 7781"
        );
        assert_eq!(
            dynamics_strip_keywords("  re :  Meeting: Tuesday"),
            "Tuesday"
        );
        assert_eq!(dynamics_strip_keywords("Invoice 7781"), "Invoice 7781");
        // `\s?` allows one space only before the colon.
        assert_eq!(dynamics_strip_keywords("RE  : x"), "RE  : x");
        // Full-width colon is not `:`.
        assert_eq!(dynamics_strip_keywords("回复：报价单"), "回复：报价单");
        // `[` is not `\w`: tags stop the stripping.
        assert_eq!(dynamics_strip_keywords("RE: [EXT] x"), "[EXT] x");
        assert_eq!(dynamics_strip_keywords(""), "");
    }

    #[test]
    fn word_hashes() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        // Published FNV-1a 64 test vector.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let a = subject_word_hashes("RE: Invoice 7781 overdue", 20);
        let b = subject_word_hashes("invoice  7781, OVERDUE", 20);
        assert_eq!(a.len(), 3);
        assert_eq!(a, b);
        assert_eq!(a[0], fnv1a64(b"invoice"));
        assert_ne!(a, subject_word_hashes("Invoice 7782 overdue", 20));
        let long = "w ".repeat(50);
        assert_eq!(subject_word_hashes(&long, 20).len(), 20);
        assert!(subject_word_hashes("RE: - ", 20).is_empty());
    }

    #[test]
    fn address_hashes_normalise() {
        let a = address_hashes([" Bob@Example.com ", "<alice@x.org>", "", "bob@example.com"]);
        assert_eq!(a.len(), 2);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.contains(&fnv1a64(b"bob@example.com")));
        assert!(a.contains(&fnv1a64(b"alice@x.org")));
    }

    proptest! {
        #[test]
        fn base_subject_never_panics_and_is_idempotent(s in "\\PC{0,80}") {
            let b = base_subject(&s);
            prop_assert_eq!(base_subject(&b), b.clone());
            let _ = base_subject_without_tokens(&s, &TokenSettings::default());
            let _ = subject_word_hashes(&s, 20);
            let _ = dynamics_strip_keywords(&s);
        }

        #[test]
        fn prefixes_do_not_change_base(
            core in "[a-z]{1,8}( [a-z0-9]{1,8}){0,3}",
            prefixes in prop::collection::vec(
                prop::sample::select(vec!["RE: ", "Fwd: ", "AW:", "SV: ", "回复：", "Ответ: ", "Re[2]: ", "[EXTERNAL] ", "*EXT* "]),
                0..5),
        ) {
            let subject = format!("{}{core}", prefixes.concat());
            prop_assert_eq!(base_subject(&subject), base_subject(&core));
        }
    }
}
