//! Dynamics-compatible tracking tokens.
//!
//! A token is `{prefix}{designator}{user}{counter}` appended to the END of
//! the subject, e.g. `Invoice 7781 CRM:0001001` (user 1, counter 1), as in
//! Dynamics CRM 2011+:
//! * `designator` = one digit, `0` online / `1` offline (Dynamics Outlook
//!   offline client). A server always issues `0`; both parse;
//! * `user` = `(base_number + user_number) mod 10^user_digits`, zero-padded to
//!   `user_digits` (Dynamics adds the base number to the user number; we
//!   reduce modulo the width so the digit count is always exact);
//! * `counter` = `counter mod 10^counter_digits`, zero-padded to
//!   `counter_digits` (the counter wraps, as in Dynamics).
//!
//! Optional signed tokens (our extension) append `-` and 8 lower-case
//! base32 characters: `CRM:0001001-k7q2m9ab`. The first 4 characters are an
//! HMAC-SHA256 over (digits, record); the last 4 over (digits, record,
//! counterpart domain). Splitting the MAC lets [`verify`] tell a forged token
//! ([`TokenRejection::BadSignature`]) from a genuine token that travelled to
//! another domain ([`TokenRejection::WrongDomain`]). The prefix is not
//! covered so renaming the prefix keeps old signed tokens valid.
//!
//! Parsing ([`find_tokens`]) tolerates the mangling that mail clients and
//! gateways apply: case changes, spaces around the colon, a full-width colon,
//! brackets around the token, the token moved elsewhere in the subject.

#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::fmt;
use std::ops::Range;

use ring::hmac;
use serde::{Deserialize, Serialize};

/// Largest base number Dynamics accepts (2^31 - 1).
pub const MAX_BASE_NUMBER: u32 = 2_147_483_647;

/// Number of base32 characters in a token signature.
pub const SIGNATURE_LEN: usize = 8;

/// Minimum signing key length in bytes; shorter keys are guessable.
pub const MIN_KEY_LEN: usize = 16;

/// Maximum prefix length in characters (Dynamics limit).
pub const MAX_PREFIX_CHARS: usize = 20;

/// Lower-case RFC 4648 base32 alphabet: no `0`/`1`/`8`/`9`, so a signature
/// never extends the digit run and survives case changes.
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// HMAC keys for signed tokens. `current` signs; `current` and `previous`
/// all verify, so keys can be rotated without breaking open threads.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKey {
    /// Key used to sign new tokens (at least [`MIN_KEY_LEN`] bytes).
    pub current: Vec<u8>,
    /// Retired keys still accepted when verifying.
    #[serde(default)]
    pub previous: Vec<Vec<u8>>,
}

// Manual Debug so key material never reaches logs.
impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("current", &format_args!("<{} bytes>", self.current.len()))
            .field("previous", &format_args!("<{} keys>", self.previous.len()))
            .finish()
    }
}

/// Tracking-token configuration (mirrors the Dynamics organization settings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenSettings {
    /// Token prefix, 1–20 characters, default `CRM:`.
    pub prefix: String,
    /// Added to the user number, 0..=2^31-1, default 0.
    pub base_number: u32,
    /// Digits for the (base + user) number, 1–10, default 3.
    pub user_digits: u8,
    /// Digits for the per-user counter, 1–9, default 3.
    pub counter_digits: u8,
    /// Former prefixes; tokens using them still resolve (same digit widths).
    pub previous_prefixes: Vec<String>,
    /// When set, new tokens are signed and [`verify`] requires a valid MAC.
    pub signing: Option<SigningKey>,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            prefix: "CRM:".to_owned(),
            base_number: 0,
            user_digits: 3,
            counter_digits: 3,
            previous_prefixes: Vec::new(),
            signing: None,
        }
    }
}

impl TokenSettings {
    /// Returns every configuration problem as a human-readable message that
    /// names the field; empty means valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        check_prefix("prefix", &self.prefix, &mut problems);
        for (i, p) in self.previous_prefixes.iter().enumerate() {
            let field = format!("previous_prefixes[{i}]");
            check_prefix(&field, p, &mut problems);
            if p.to_lowercase() == self.prefix.to_lowercase() {
                problems.push(format!("{field}: duplicates the current prefix {p:?}"));
            }
        }
        if self.base_number > MAX_BASE_NUMBER {
            problems.push(format!(
                "base_number: {} exceeds the maximum {MAX_BASE_NUMBER}",
                self.base_number
            ));
        }
        if !(1..=10).contains(&self.user_digits) {
            problems.push(format!(
                "user_digits: {} is outside 1..=10",
                self.user_digits
            ));
        }
        if !(1..=9).contains(&self.counter_digits) {
            problems.push(format!(
                "counter_digits: {} is outside 1..=9",
                self.counter_digits
            ));
        }
        if let Some(key) = &self.signing {
            if key.current.len() < MIN_KEY_LEN {
                problems.push(format!(
                    "signing.current: key is {} bytes, at least {MIN_KEY_LEN} required",
                    key.current.len()
                ));
            }
            for (i, k) in key.previous.iter().enumerate() {
                if k.len() < MIN_KEY_LEN {
                    problems.push(format!(
                        "signing.previous[{i}]: key is {} bytes, at least {MIN_KEY_LEN} required",
                        k.len()
                    ));
                }
            }
        }
        problems
    }

    /// Digit widths clamped to their valid ranges, so an unvalidated
    /// configuration can never make formatting or parsing misbehave.
    fn widths(&self) -> (u8, u8) {
        (
            self.user_digits.clamp(1, 10),
            self.counter_digits.clamp(1, 9),
        )
    }
}

fn check_prefix(field: &str, prefix: &str, problems: &mut Vec<String>) {
    let n = prefix.chars().count();
    if n == 0 {
        problems.push(format!("{field}: must not be empty"));
        return;
    }
    if n > MAX_PREFIX_CHARS {
        problems.push(format!(
            "{field}: {n} characters, at most {MAX_PREFIX_CHARS} allowed"
        ));
    }
    if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        problems.push(format!(
            "{field}: must not contain whitespace or control characters"
        ));
    }
    // A trailing digit would merge with the token digits and make parsing ambiguous.
    if prefix.chars().last().is_some_and(|c| c.is_ascii_digit()) {
        problems.push(format!("{field}: must not end with a digit"));
    }
}

/// A tracking token, as generated or as parsed back from a subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TrackingToken {
    /// The configured prefix (canonical spelling, not the mangled text).
    pub prefix: String,
    /// Dynamics online/offline designator digit: `false` = `0` (online,
    /// what we issue), `true` = `1` (created by an offline Outlook client).
    pub offline: bool,
    /// The encoded user number: `(base + user) mod 10^user_digits`.
    pub user_number: u64,
    /// The counter, already reduced modulo `10^counter_digits`.
    pub counter: u64,
    /// Zero-padding width of `user_number`.
    pub user_digits: u8,
    /// Zero-padding width of `counter`.
    pub counter_digits: u8,
    /// Lower-case base32 signature when the token is signed.
    pub signature: Option<String>,
}

impl TrackingToken {
    /// The digit run, e.g. `0001001` (designator, user, counter); this, not
    /// the prefix, is what a signature covers and what tokens are indexed by.
    pub fn digits(&self) -> String {
        let mut buf = [0u8; MAX_DIGITS];
        match self.digits_in(&mut buf) {
            Some(d) => d.to_owned(),
            // Widths beyond any valid setting (hand-built tokens).
            None => {
                let mut out = String::new();
                out.push(if self.offline { '1' } else { '0' });
                push_padded(&mut out, self.user_number, usize::from(self.user_digits));
                push_padded(&mut out, self.counter, usize::from(self.counter_digits));
                out
            }
        }
    }

    /// [`Self::digits`] written into `buf`, without allocating: correlation
    /// asks for it per token per message (built by hand rather than with
    /// `format!`, whose machinery dominated). Same text as
    /// `{designator}{user:0uw$}{counter:0cw$}`. `None` when the widths are
    /// wider than any valid setting and the run might not fit.
    pub fn digits_in<'b>(&self, buf: &'b mut [u8; MAX_DIGITS]) -> Option<&'b str> {
        if self.user_digits > 20 || self.counter_digits > 20 {
            return None;
        }
        buf[0] = if self.offline { b'1' } else { b'0' };
        let len = write_padded(buf, 1, self.user_number, usize::from(self.user_digits))?;
        let len = write_padded(buf, len, self.counter, usize::from(self.counter_digits))?;
        std::str::from_utf8(buf.get(..len)?).ok()
    }
}

/// Longest digit run [`TrackingToken::digits_in`] writes: the designator and
/// two numbers of at most 20 digits each (a `u64` has at most 20, and the
/// widths it accepts are at most 20).
pub const MAX_DIGITS: usize = 41;

/// The decimal digits of `n`, written at the end of `tmp`.
fn decimal(n: u64, tmp: &mut [u8; 20]) -> &[u8] {
    let mut len = 0;
    let mut v = n;
    // 20 slots hold every u64 (at most 20 digits).
    for slot in tmp.iter_mut().rev() {
        // `v % 10` < 10, so the cast cannot truncate.
        *slot = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    tmp.get(tmp.len() - len..).unwrap_or_default()
}

/// Writes `n` in decimal at `buf[at..]`, zero-padded on the left to `width`
/// (never truncated, as `{:0width$}`); returns the end, `None` if it does not fit.
fn write_padded(buf: &mut [u8; MAX_DIGITS], at: usize, n: u64, width: usize) -> Option<usize> {
    let mut tmp = [0u8; 20];
    let digits = decimal(n, &mut tmp);
    let pad = width.saturating_sub(digits.len());
    let end = at + pad + digits.len();
    let (zeros, rest) = buf.get_mut(at..end)?.split_at_mut_checked(pad)?;
    zeros.fill(b'0');
    rest.copy_from_slice(digits);
    Some(end)
}

/// Appends `n` in decimal, zero-padded on the left to `width` (never
/// truncated, as `{:0width$}`).
fn push_padded(out: &mut String, n: u64, width: usize) {
    let mut tmp = [0u8; 20];
    let digits = decimal(n, &mut tmp);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.extend(digits.iter().map(|b| char::from(*b)));
}

impl fmt::Display for TrackingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.prefix, self.digits())?;
        if let Some(sig) = &self.signature {
            write!(f, "-{sig}")?;
        }
        Ok(())
    }
}

/// Which configured prefix a found token used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrefixMatch {
    /// `TokenSettings::prefix`.
    Current,
    /// `TokenSettings::previous_prefixes[i]`.
    Previous(usize),
}

/// A token located in a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundToken {
    /// The parsed token (canonical prefix, lower-case signature).
    pub token: TrackingToken,
    /// Which prefix matched.
    pub prefix: PrefixMatch,
    /// Byte span in the subject, including enclosing brackets if any.
    pub span: Range<usize>,
    /// What was repaired: any of `"case"`, `"spacing"`, `"fullwidth-colon"`,
    /// `"brackets"`, `"not-at-end"`, `"signature-case"`.
    pub mangled: Vec<&'static str>,
}

/// Why [`verify`] rejected a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRejection {
    /// Signing is required but the token carries no signature.
    Unsigned,
    /// The signature does not match this record under any key (forged,
    /// corrupted, or bound to another record).
    BadSignature,
    /// Genuine token for this record, but bound to another counterpart domain.
    WrongDomain {
        /// The (normalised) domain the message came from.
        domain: String,
    },
}

impl fmt::Display for TokenRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsigned => {
                f.write_str("tracking token is unsigned but signed tokens are required")
            }
            Self::BadSignature => {
                f.write_str("tracking token signature is invalid for this record")
            }
            Self::WrongDomain { domain } => write!(
                f,
                "tracking token is valid but not issued for correspondents at {domain:?}"
            ),
        }
    }
}

impl std::error::Error for TokenRejection {}

fn pow10(n: u8) -> u64 {
    10u64.pow(u32::from(n))
}

/// Builds an unsigned token. `user_number` gets `base_number` added and is
/// reduced modulo `10^user_digits`; `counter` wraps modulo
/// `10^counter_digits`. Use [`generate_signed`] when signing is configured.
pub fn generate(settings: &TokenSettings, user_number: u32, counter: u64) -> TrackingToken {
    let (uw, cw) = settings.widths();
    let user = (u64::from(settings.base_number) + u64::from(user_number)) % pow10(uw);
    TrackingToken {
        prefix: settings.prefix.clone(),
        offline: false,
        user_number: user,
        counter: counter % pow10(cw),
        user_digits: uw,
        counter_digits: cw,
        signature: None,
    }
}

/// Like [`generate`], and signs the token when `settings.signing` is set,
/// binding it to `record` (e.g. `case:42`) and `counterpart_domain` (or an
/// address, whose part after `@` is used; compared lower-case).
pub fn generate_signed(
    settings: &TokenSettings,
    user_number: u32,
    counter: u64,
    record: &str,
    counterpart_domain: &str,
) -> TrackingToken {
    let mut token = generate(settings, user_number, counter);
    if let Some(key) = &settings.signing {
        let domain = normalize_domain(counterpart_domain);
        token.signature = Some(signature(&key.current, &token.digits(), record, &domain));
    }
    token
}

/// Checks a token against the record it resolved to and the domain of the
/// message's counterpart (sender of an incoming mail).
///
/// Without `settings.signing` every token is accepted. With it, the token
/// must be signed by the current or a previous key for `record`, and bound to
/// `counterpart_domain` or one of its parent domains (so mail from
/// `eu.example.com` matches a token bound to `example.com`).
pub fn verify(
    settings: &TokenSettings,
    token: &TrackingToken,
    record: &str,
    counterpart_domain: &str,
) -> Result<(), TokenRejection> {
    let Some(key) = &settings.signing else {
        return Ok(());
    };
    let Some(sig) = &token.signature else {
        return Err(TokenRejection::Unsigned);
    };
    let sig = sig.to_ascii_lowercase();
    if sig.len() != SIGNATURE_LEN || !sig.is_ascii() {
        return Err(TokenRejection::BadSignature);
    }
    let (rec_part, dom_part) = sig.split_at(SIGNATURE_LEN / 2);
    let digits = token.digits();
    let domain = normalize_domain(counterpart_domain);
    let keys = std::iter::once(&key.current).chain(key.previous.iter());
    let mut record_ok = false;
    for k in keys {
        let full_rec = signature(k, &digits, record, "");
        // Always 8 bytes; a shorter one would just not be equal.
        let rec_sig = full_rec
            .as_bytes()
            .get(..SIGNATURE_LEN / 2)
            .unwrap_or_default();
        if !ct_eq(rec_sig, rec_part.as_bytes()) {
            continue;
        }
        record_ok = true;
        for candidate in domain_and_parents(&domain) {
            let full = signature(k, &digits, record, candidate);
            let dom_sig = full.as_bytes().get(SIGNATURE_LEN / 2..).unwrap_or_default();
            if ct_eq(dom_sig, dom_part.as_bytes()) {
                return Ok(());
            }
        }
    }
    if record_ok {
        Err(TokenRejection::WrongDomain { domain })
    } else {
        Err(TokenRejection::BadSignature)
    }
}

/// Lower-cases, trims, takes the part after the last `@` and drops a
/// trailing dot, so `Bob@Example.COM.` and `example.com` bind the same.
fn normalize_domain(d: &str) -> String {
    let d = d.trim();
    let d = d.rsplit('@').next().unwrap_or(d);
    d.trim_end_matches('>').trim_end_matches('.').to_lowercase()
}

/// `a.b.example.com`, `b.example.com`, `example.com`, `com`.
fn domain_and_parents(domain: &str) -> impl Iterator<Item = &str> {
    std::iter::once(domain).chain(
        domain
            .match_indices('.')
            .filter_map(|(i, _)| domain.get(i + 1..)),
    )
}

/// Length-prefixes every field so distinct (digits, record, domain) tuples
/// can never produce the same MAC input.
fn mac_input(fields: &[&str]) -> Vec<u8> {
    let mut out = b"crm-mailsync/token/v1".to_vec();
    for f in fields {
        out.extend_from_slice(&(f.len() as u64).to_be_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
}

/// Full 8-character signature: 4 chars over (digits, record) then 4 chars
/// over (digits, record, domain). `domain` is already normalised.
fn signature(key: &[u8], digits: &str, record: &str, domain: &str) -> String {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let rec = hmac::sign(&k, &mac_input(&["record", digits, record]));
    let dom = hmac::sign(&k, &mac_input(&["domain", digits, record, domain]));
    let mut s = base32_20bits(rec.as_ref());
    s.push_str(&base32_20bits(dom.as_ref()));
    s
}

/// Encodes the first 20 bits of `tag` as 4 base32 characters.
fn base32_20bits(tag: &[u8]) -> String {
    let mut v: u32 = 0;
    for b in tag.iter().take(3) {
        v = (v << 8) | u32::from(*b);
    }
    let v = v >> 4; // keep the top 20 of 24 bits
    (0..4)
        .rev()
        .filter_map(|i| BASE32.get(((v >> (i * 5)) & 31) as usize))
        .map(|b| char::from(*b))
        .collect()
}

/// Constant-time equality so signature checks leak no timing information.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_colon(c: char) -> bool {
    c == ':' || c == '\u{FF1A}'
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Case-insensitive char comparison (full lower-case mapping).
fn eq_ignore_case(a: char, b: char) -> bool {
    // ASCII pairs (nearly every subject character against an ASCII prefix)
    // need no Unicode case tables; the result is the same.
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(&b);
    }
    a == b || a.to_lowercase().eq(b.to_lowercase())
}

/// Tries to match `prefix` at byte `start` of `s`; returns the end of the
/// match (before any digits) and notes repairs.
fn match_prefix(
    s: &str,
    start: usize,
    prefix: &str,
    notes: &mut Vec<&'static str>,
) -> Option<usize> {
    let rest = s.get(start..)?;
    let mut it = rest.char_indices().peekable();
    for p in prefix.chars() {
        if is_colon(p) {
            // Outlook/gateways insert spaces before the colon (`CRM :`).
            while let Some(&(_, c)) = it.peek() {
                if c.is_whitespace() {
                    push_note(notes, "spacing");
                    it.next();
                } else {
                    break;
                }
            }
            let (_, c) = it.next()?;
            if !is_colon(c) {
                return None;
            }
            if c != p {
                push_note(notes, "fullwidth-colon");
            }
            // ...and after it (`CRM: 0001001`).
            while let Some(&(_, c)) = it.peek() {
                if c.is_whitespace() {
                    push_note(notes, "spacing");
                    it.next();
                } else {
                    break;
                }
            }
        } else {
            let (_, c) = it.next()?;
            if !eq_ignore_case(c, p) {
                return None;
            }
            if c != p {
                push_note(notes, "case");
            }
        }
    }
    // Allow spaces between a colon-less prefix and the digits too.
    while let Some(&(_, c)) = it.peek() {
        if c.is_whitespace() {
            push_note(notes, "spacing");
            it.next();
        } else {
            break;
        }
    }
    Some(start + it.peek().map_or(rest.len(), |&(i, _)| i))
}

fn push_note(notes: &mut Vec<&'static str>, note: &'static str) {
    if !notes.contains(&note) {
        notes.push(note);
    }
}

/// Closing bracket for an opening one we unwrap around tokens.
fn closing_for(c: char) -> Option<char> {
    match c {
        '[' => Some(']'),
        '(' => Some(')'),
        '{' => Some('}'),
        '<' => Some('>'),
        '【' => Some('】'),
        '［' => Some('］'),
        '（' => Some('）'),
        _ => None,
    }
}

/// Finds every token (current or previous prefix) in `subject`, in order.
///
/// Strict on the number: exactly `1 + user_digits + counter_digits` ASCII
/// digits starting with the designator `0` or `1`, not followed by another
/// letter or digit, and the prefix must not continue
/// a word (`XCRM:0001001` is no token). Never panics.
pub fn find_tokens(settings: &TokenSettings, subject: &str) -> Vec<FoundToken> {
    let (uw, cw) = settings.widths();
    let n_digits = 1 + usize::from(uw) + usize::from(cw);
    // The prefixes to try, current first; an iterator, not a list: this
    // runs for every message's subject and must not allocate.
    let prefixes = || {
        std::iter::once((PrefixMatch::Current, settings.prefix.as_str()))
            .chain(
                settings
                    .previous_prefixes
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (PrefixMatch::Previous(i), p.as_str())),
            )
            .filter(|(_, p)| !p.is_empty())
    };
    // ASCII subject and prefixes starting with an ASCII non-colon: a match
    // can only start on a byte equal (ASCII case-insensitively) to a first
    // prefix character, so the loop jumps from one such byte to the next
    // instead of stepping char by char (the same positions are tried, with
    // the same preceding char, so the result is unchanged).
    let first_bytes = if subject.is_ascii() {
        FirstBytes::of(prefixes().map(|(_, p)| p))
    } else {
        None
    };
    // Without the jump above, rule out most subjects with a byte scan first
    // (with it, the jump already skips a token-free subject in one scan).
    if first_bytes.is_none() && prefixes().all(|(_, p)| cannot_occur(p, subject)) {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut pos = 0usize;
    let mut prev_char: Option<char> = None;
    while pos < subject.len() {
        if let Some(firsts) = &first_bytes {
            let bytes = subject.as_bytes();
            let rest = bytes.get(pos..).unwrap_or_default();
            let at = firsts.find_in(rest);
            let Some(next) = at.map(|i| pos + i) else {
                break;
            };
            if next > pos {
                // `next - 1` >= `pos`: in bounds, so this is always `Some`.
                prev_char = bytes.get(next - 1).map(|b| char::from(*b));
                pos = next;
            }
        }
        let Some(c) = subject.get(pos..).and_then(|r| r.chars().next()) else {
            break;
        };
        let boundary_ok = !prev_char.is_some_and(is_word_char);
        // Cheap pre-check: a prefix not starting with a colon (which may be
        // preceded by blanks) can only match where its first character is.
        let may_start = || {
            prefixes().any(|(_, p)| {
                p.chars()
                    .next()
                    .is_some_and(|p0| is_colon(p0) || eq_ignore_case(c, p0))
            })
        };
        if boundary_ok && may_start() {
            if let Some(ft) = prefixes()
                .find_map(|(which, p)| try_token_at(subject, pos, which, p, uw, cw, n_digits))
            {
                pos = ft.match_end;
                prev_char = subject.get(..pos).and_then(|s| s.chars().next_back());
                found.push(ft);
                continue;
            }
        }
        prev_char = Some(c);
        pos += c.len_utf8();
    }
    let mut out: Vec<FoundToken> = found.into_iter().map(|m| finish(subject, m)).collect();
    // Anything but whitespace/closing punctuation after the token means a
    // client moved it away from the end.
    for ft in &mut out {
        let tail = subject.get(ft.span.end..).unwrap_or("");
        if tail.chars().any(|c| c.is_alphanumeric()) {
            push_note(&mut ft.mangled, "not-at-end");
        }
    }
    out
}

/// The bytes a token can start on in an ASCII subject: the prefixes'
/// first characters, lower-cased (set membership for the byte loop, and the
/// one byte for a SIMD scan when there is only one, the usual case).
struct FirstBytes {
    set: [bool; 128],
    count: usize,
    one: u8,
}

impl FirstBytes {
    /// `None` when a prefix starts with a non-ASCII character or a colon
    /// (which may follow blanks): then the jump is not exact.
    fn of<'p>(prefixes: impl Iterator<Item = &'p str>) -> Option<FirstBytes> {
        let mut fb = FirstBytes {
            set: [false; 128],
            count: 0,
            one: 0,
        };
        for p in prefixes {
            let c = p.chars().next().filter(|c| c.is_ascii() && !is_colon(*c))?;
            let b = c.to_ascii_lowercase() as u8;
            if let Some(seen) = fb.set.get_mut(usize::from(b & 0x7f)) {
                if !*seen {
                    *seen = true;
                    fb.count += 1;
                    fb.one = b;
                }
            }
        }
        Some(fb)
    }

    /// Offset of the first byte of `rest` (ASCII) a token may start on.
    fn find_in(&self, rest: &[u8]) -> Option<usize> {
        match self.count {
            0 => None,
            1 => memchr::memchr2(self.one, self.one.to_ascii_uppercase(), rest),
            _ => rest.iter().position(|b| {
                self.set
                    .get(usize::from(b.to_ascii_lowercase() & 0x7f))
                    .is_some_and(|seen| *seen)
            }),
        }
    }
}

/// Whether `prefix` certainly matches nowhere in `subject`: most subjects
/// carry no token, and this byte scan is far cheaper than the char-by-char
/// matcher. Only decided for an ASCII subject and a prefix starting with two
/// ASCII alphanumerics, which [`match_prefix`] needs adjacent (ASCII
/// case-insensitively; a non-ASCII subject char could case-fold to ASCII).
fn cannot_occur(prefix: &str, subject: &str) -> bool {
    let [p0, p1, ..] = *prefix.as_bytes() else {
        return false;
    };
    if !p0.is_ascii_alphanumeric() || !p1.is_ascii_alphanumeric() || !subject.is_ascii() {
        return false;
    }
    !subject.as_bytes().windows(2).any(|w| match *w {
        [a, b] => a.eq_ignore_ascii_case(&p0) && b.eq_ignore_ascii_case(&p1),
        _ => false,
    })
}

/// Intermediate match before bracket widening.
struct RawMatch {
    token: TrackingToken,
    which: PrefixMatch,
    start: usize,
    match_end: usize,
    notes: Vec<&'static str>,
}

fn try_token_at(
    s: &str,
    start: usize,
    which: PrefixMatch,
    prefix: &str,
    uw: u8,
    cw: u8,
    n_digits: usize,
) -> Option<RawMatch> {
    let mut notes = Vec::new();
    let digits_start = match_prefix(s, start, prefix, &mut notes)?;
    let rest = s.get(digits_start..)?;
    let run = rest.bytes().take_while(u8::is_ascii_digit).count();
    if run != n_digits {
        return None;
    }
    // `run` counts ASCII digits, so the split is on a char boundary.
    let (digits, after) = rest.split_at_checked(run)?;
    let mut end = digits_start + run;
    let mut signature = None;
    if let Some(sig) = after.strip_prefix('-').and_then(|a| a.get(..SIGNATURE_LEN)) {
        let valid = sig
            .bytes()
            .all(|b| BASE32.contains(&b.to_ascii_lowercase()));
        let next = after
            .get(1 + SIGNATURE_LEN..)
            .and_then(|t| t.chars().next());
        if valid && !next.is_some_and(is_word_char) {
            let lower = sig.to_ascii_lowercase();
            if lower != sig {
                notes.push("signature-case");
            }
            signature = Some(lower);
            end += 1 + SIGNATURE_LEN;
        }
    }
    if signature.is_none() && after.chars().next().is_some_and(is_word_char) {
        return None;
    }
    let (designator, rest_digits) = digits.split_at(1);
    let offline = match designator {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    let (user, counter) = rest_digits.split_at(usize::from(uw));
    let token = TrackingToken {
        prefix: prefix.to_owned(),
        offline,
        user_number: user.parse().ok()?,
        counter: counter.parse().ok()?,
        user_digits: uw,
        counter_digits: cw,
        signature,
    };
    Some(RawMatch {
        token,
        which,
        start,
        match_end: end,
        notes,
    })
}

/// Widens the span over enclosing brackets (`[CRM:0001001]`) so removing the
/// token leaves no empty brackets behind.
fn finish(s: &str, m: RawMatch) -> FoundToken {
    let mut notes = m.notes;
    let mut span = m.start..m.match_end;
    let before = s.get(..span.start).unwrap_or("");
    let after = s.get(span.end..).unwrap_or("");
    let before_trim = before.trim_end();
    let after_trim = after.trim_start();
    if let Some(open) = before_trim.chars().next_back() {
        if let Some(close) = closing_for(open) {
            if after_trim.starts_with(close) {
                span = (before_trim.len() - open.len_utf8())
                    ..(s.len() - after_trim.len() + close.len_utf8());
                notes.push("brackets");
            }
        }
    }
    FoundToken {
        token: m.token,
        prefix: m.which,
        span,
        mangled: notes,
    }
}

/// Removes the byte spans from `subject` (sorted, non-overlapping), joining
/// the pieces with single spaces.
pub(crate) fn remove_spans(subject: &str, spans: &[Range<usize>]) -> String {
    let mut pieces: Vec<&str> = Vec::new();
    let mut last = 0usize;
    for sp in spans {
        if sp.start < last || sp.end > subject.len() {
            continue;
        }
        pieces.push(subject.get(last..sp.start).unwrap_or(""));
        last = sp.end;
    }
    pieces.push(subject.get(last..).unwrap_or(""));
    let mut out = String::with_capacity(subject.len());
    let n = pieces.len();
    for (i, p) in pieces.into_iter().enumerate() {
        // Trim only at the cut points; the subject's own ends stay as they were.
        let p = if i > 0 { p.trim_start() } else { p };
        let p = if i + 1 < n { p.trim_end() } else { p };
        if p.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(p);
    }
    out
}

fn append_after_removing(subject: &str, found: &[FoundToken], token: &TrackingToken) -> String {
    let spans: Vec<Range<usize>> = found.iter().map(|f| f.span.clone()).collect();
    let stripped = remove_spans(subject, &spans);
    let stripped = stripped.trim_end();
    if stripped.is_empty() {
        token.to_string()
    } else {
        format!("{stripped} {token}")
    }
}

/// Puts `token` at the end of `subject`, first removing any token with the
/// same prefix and digit widths (so replies never stack tokens).
pub fn append_to_subject(subject: &str, token: &TrackingToken) -> String {
    let settings = TokenSettings {
        prefix: token.prefix.clone(),
        user_digits: token.user_digits,
        counter_digits: token.counter_digits,
        ..TokenSettings::default()
    };
    append_to_subject_with(&settings, subject, token)
}

/// Like [`append_to_subject`] but removes tokens of every prefix in
/// `settings` (current and previous).
pub fn append_to_subject_with(
    settings: &TokenSettings,
    subject: &str,
    token: &TrackingToken,
) -> String {
    let found = find_tokens(settings, subject);
    append_after_removing(subject, &found, token)
}

#[cfg(test)]
#[allow(clippy::string_slice, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SigningKey {
        SigningKey {
            current: b"0123456789abcdef0123456789abcdef".to_vec(),
            previous: vec![],
        }
    }

    fn signed_settings() -> TokenSettings {
        TokenSettings {
            signing: Some(key()),
            ..TokenSettings::default()
        }
    }

    fn tok(user: u32, counter: u64) -> TrackingToken {
        generate(&TokenSettings::default(), user, counter)
    }

    #[test]
    fn default_format_matches_dynamics() {
        // Designator 0 (online) + user 001 + counter 001.
        assert_eq!(tok(1, 1).to_string(), "CRM:0001001");
        assert_eq!(tok(12, 345).to_string(), "CRM:0012345");
        assert_eq!(tok(0, 0).to_string(), "CRM:0000000");
        let s = TokenSettings {
            base_number: 1000,
            user_digits: 4,
            counter_digits: 2,
            ..TokenSettings::default()
        };
        assert_eq!(generate(&s, 7, 5).to_string(), "CRM:0100705");
    }

    #[test]
    fn user_and_counter_wrap() {
        let s = TokenSettings {
            base_number: 990,
            ..TokenSettings::default()
        };
        // 990 + 15 = 1005 → 005; counter 1234 → 234.
        assert_eq!(generate(&s, 15, 1234).to_string(), "CRM:0005234");
        let big = TokenSettings {
            base_number: MAX_BASE_NUMBER,
            user_digits: 10,
            counter_digits: 9,
            ..TokenSettings::default()
        };
        let t = generate(&big, u32::MAX, u64::MAX);
        assert_eq!(t.user_number, 6_442_450_942);
        assert_eq!(t.digits().len(), 20);
    }

    #[test]
    fn validate_reports_every_problem() {
        assert!(TokenSettings::default().validate().is_empty());
        let bad = TokenSettings {
            prefix: String::new(),
            base_number: MAX_BASE_NUMBER + 1,
            user_digits: 0,
            counter_digits: 10,
            previous_prefixes: vec!["ABCDEFGHIJKLMNOPQRSTU".into(), "TK 1".into()],
            signing: Some(SigningKey {
                current: vec![1; 4],
                previous: vec![vec![2; 3]],
            }),
        };
        let p = bad.validate();
        for field in [
            "prefix:",
            "base_number",
            "user_digits",
            "counter_digits",
            "previous_prefixes[0]",
            "previous_prefixes[1]: must not contain whitespace",
            "previous_prefixes[1]: must not end with a digit",
            "signing.current",
            "signing.previous[0]",
        ] {
            assert!(
                p.iter().any(|m| m.contains(field)),
                "{field} missing in {p:?}"
            );
        }
        let dup = TokenSettings {
            previous_prefixes: vec!["crm:".into()],
            ..TokenSettings::default()
        };
        assert_eq!(dup.validate().len(), 1);
    }

    #[test]
    fn debug_hides_key() {
        let dbg = format!("{:?}", key());
        assert!(!dbg.contains("48"), "{dbg}");
        assert!(dbg.contains("32 bytes"));
    }

    #[test]
    fn append_replaces_existing_token() {
        let t = tok(1, 1);
        assert_eq!(
            append_to_subject("Invoice 7781", &t),
            "Invoice 7781 CRM:0001001"
        );
        assert_eq!(append_to_subject("", &t), "CRM:0001001");
        assert_eq!(
            append_to_subject("RE: Invoice 7781 CRM:0001000", &t),
            "RE: Invoice 7781 CRM:0001001"
        );
        assert_eq!(
            append_to_subject("[crm: 0001000] Invoice  7781 ", &t),
            "Invoice  7781 CRM:0001001"
        );
        assert_eq!(append_to_subject("A CRM:0001000 B", &t), "A B CRM:0001001");
        let s = TokenSettings {
            previous_prefixes: vec!["TKT#".into()],
            ..TokenSettings::default()
        };
        assert_eq!(
            append_to_subject_with(&s, "Hello TKT#0005001", &t),
            "Hello CRM:0001001"
        );
        // Without the settings the old prefix is not ours to remove.
        assert_eq!(
            append_to_subject("Hello TKT#0005001", &t),
            "Hello TKT#0005001 CRM:0001001"
        );
    }

    fn one(settings: &TokenSettings, subject: &str) -> FoundToken {
        let f = find_tokens(settings, subject);
        assert_eq!(f.len(), 1, "{subject:?} → {f:?}");
        f.into_iter().next().unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn quick_reject_only_decides_when_it_is_sure() {
        assert!(cannot_occur("CRM:", "Invoice 7781"));
        assert!(!cannot_occur("CRM:", "Invoice cRm 7781"));
        // Non-ASCII subjects and prefixes not starting with two ASCII
        // alphanumerics go through the full matcher.
        assert!(!cannot_occur("CRM:", "Überweisung 7781"));
        assert!(!cannot_occur(":X", "Invoice"));
        assert!(!cannot_occur("#", "Invoice"));
    }

    #[test]
    fn finds_mangled_tokens() {
        let s = TokenSettings::default();
        let want = tok(1, 1);
        for (subject, note) in [
            ("Invoice 7781 CRM:0001001", None),
            ("RE: AW: [EXTERNAL] Invoice 7781 CRM:0001001", None),
            ("Re[2]: Invoice CRM: 0001001", Some("spacing")),
            ("RE^2: Invoice CRM :0001001", Some("spacing")),
            ("Invoice crm:0001001", Some("case")),
            ("回复：Invoice CRM：0001001", Some("fullwidth-colon")),
            ("Invoice [CRM:0001001]", Some("brackets")),
            ("Invoice (CRM:0001001)", Some("brackets")),
            ("Invoice [ CRM:0001001 ]", Some("brackets")),
            ("CRM:0001001 Invoice", Some("not-at-end")),
            ("*EXTERNAL* Ответ: Invoice CRM:0001001.", None),
            ("RE:CRM:0001001 Invoice", Some("not-at-end")),
            ("AW:[CRM:0001001]Invoice", Some("brackets")),
            ("Invoice\u{a0}CRM\u{a0}:\u{a0}0001001", Some("spacing")),
            ("Invoice CRM:\t0001001", Some("spacing")),
        ] {
            let f = one(&s, subject);
            assert_eq!(f.token, want, "{subject}");
            assert_eq!(f.prefix, PrefixMatch::Current);
            if let Some(n) = note {
                assert!(f.mangled.contains(&n), "{subject}: {:?}", f.mangled);
            }
        }
        let f = one(&s, "Invoice [CRM:0001001]");
        assert_eq!(f.span, 8..21);
        assert_eq!(f.mangled, vec!["brackets"]);
        let f = one(&s, "Invoice 7781 CRM:0001001");
        assert!(f.mangled.is_empty());
        assert_eq!(&"Invoice 7781 CRM:0001001"[f.span], "CRM:0001001");
    }

    #[test]
    fn rejects_false_positives() {
        let s = TokenSettings::default();
        for subject in [
            "CRM:00010011234",
            "CRM:000100",
            "CRM:2001001",
            "CRM:001001",
            "XCRM:0001001",
            "crm_CRM:0001001",
            "CRM:0001001abc",
            "CRM;0001001",
            "C RM:0001001",
            "CRM:000100１",
            "",
            "CRM:",
        ] {
            assert!(find_tokens(&s, subject).is_empty(), "{subject}");
        }
    }

    #[test]
    fn previous_prefixes_and_chains() {
        let s = TokenSettings {
            prefix: "CASE#".into(),
            previous_prefixes: vec!["CRM:".into()],
            ..TokenSettings::default()
        };
        let f = find_tokens(&s, "FW: RE: Quote CRM:0001001 / Quote CASE#0002003");
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].prefix, PrefixMatch::Previous(0));
        assert_eq!(f[0].token.prefix, "CRM:");
        assert_eq!(f[0].token.counter, 1);
        assert_eq!(f[1].prefix, PrefixMatch::Current);
        assert_eq!(f[1].token.user_number, 2);
        assert_eq!(f[1].token.counter, 3);
        assert!(f[0].mangled.contains(&"not-at-end"));
        assert!(!f[1].mangled.contains(&"not-at-end"));
    }

    #[test]
    fn signed_tokens_round_trip_and_reject() {
        let s = signed_settings();
        let t = generate_signed(&s, 1, 1, "case:42", "Bob@Example.COM");
        let text = t.to_string();
        assert!(text.starts_with("CRM:0001001-"), "{text}");
        let sig = t.signature.clone().unwrap_or_default();
        assert_eq!(sig.len(), SIGNATURE_LEN);
        assert!(sig.bytes().all(|b| BASE32.contains(&b)));

        assert_eq!(verify(&s, &t, "case:42", "example.com"), Ok(()));
        assert_eq!(verify(&s, &t, "case:42", "EU.example.com."), Ok(()));
        assert_eq!(
            verify(&s, &t, "case:42", "evil.org"),
            Err(TokenRejection::WrongDomain {
                domain: "evil.org".into()
            })
        );
        assert_eq!(
            verify(&s, &t, "case:43", "example.com"),
            Err(TokenRejection::BadSignature)
        );
        let mut forged = t.clone();
        forged.counter = 2;
        assert_eq!(
            verify(&s, &forged, "case:42", "example.com"),
            Err(TokenRejection::BadSignature)
        );
        let unsigned = tok(1, 1);
        assert_eq!(
            verify(&s, &unsigned, "case:42", "example.com"),
            Err(TokenRejection::Unsigned)
        );
        // Not configured → nothing to check.
        assert_eq!(
            verify(&TokenSettings::default(), &unsigned, "x", "y"),
            Ok(())
        );
        for e in [
            TokenRejection::Unsigned,
            TokenRejection::BadSignature,
            TokenRejection::WrongDomain { domain: "d".into() },
        ] {
            assert!(e.to_string().len() > 10);
        }

        // Case-changed signature in a subject still parses and verifies.
        let subject = format!("RE: Quote {}", text.to_uppercase());
        let f = one(&s, &subject);
        assert!(f.mangled.contains(&"signature-case"));
        assert_eq!(f.token, t);
        assert_eq!(verify(&s, &f.token, "case:42", "example.com"), Ok(()));
    }

    #[test]
    fn rotated_keys_still_verify() {
        let old = signed_settings();
        let t = generate_signed(&old, 5, 6, "case:1", "example.com");
        let rotated = TokenSettings {
            signing: Some(SigningKey {
                current: vec![9; 32],
                previous: vec![key().current],
            }),
            ..TokenSettings::default()
        };
        assert_eq!(verify(&rotated, &t, "case:1", "example.com"), Ok(()));
        let dropped = TokenSettings {
            signing: Some(SigningKey {
                current: vec![9; 32],
                previous: vec![],
            }),
            ..TokenSettings::default()
        };
        assert_eq!(
            verify(&dropped, &t, "case:1", "example.com"),
            Err(TokenRejection::BadSignature)
        );
    }

    #[test]
    fn signature_vector_is_stable() {
        // Pins the MAC layout: changing it would break every open thread.
        let t = generate_signed(&signed_settings(), 1, 1, "case:42", "example.com");
        let again = generate_signed(&signed_settings(), 1, 1, "case:42", "example.com");
        assert_eq!(t, again);
        let other = generate_signed(&signed_settings(), 1, 1, "case:42", "example.org");
        let (a, b) = (
            t.signature.unwrap_or_default(),
            other.signature.unwrap_or_default(),
        );
        assert_eq!(a[..4], b[..4]);
        assert_ne!(a[4..], b[4..]);
    }

    #[test]
    fn settings_serde_defaults() {
        let s: TokenSettings = serde_json::from_str(r#"{"prefix":"TKT-"}"#).unwrap_or_default();
        assert_eq!(s.prefix, "TKT-");
        assert_eq!(s.user_digits, 3);
        assert_eq!(s.counter_digits, 3);
    }

    // ---- proptests ----

    const REPLY_PREFIXES: &[&str] = &[
        "RE:",
        "Re:",
        "AW:",
        "SV:",
        "FW:",
        "FWD:",
        "Fwd:",
        "WG:",
        "TR:",
        "Antw:",
        "Doorst:",
        "RV:",
        "ENC:",
        "VS:",
        "Odp:",
        "回复：",
        "回覆：",
        "答复：",
        "转发：",
        "轉寄：",
        "件名：",
        "Ответ:",
        "Re[2]:",
        "RE^2:",
        "R:",
        "I:",
    ];
    const TAGS: &[&str] = &["[EXTERNAL]", "[EXT]", "*EXTERNAL*", "[SPAM]"];

    fn arb_settings() -> impl Strategy<Value = TokenSettings> {
        (
            "[A-Za-zéЖ]{1,8}",
            prop::sample::select(vec!["", ":", "#", "-", "：", "!"]),
            0..=MAX_BASE_NUMBER,
            1u8..=10,
            1u8..=9,
            any::<bool>(),
        )
            .prop_map(|(head, tail, base, uw, cw, signed)| TokenSettings {
                prefix: format!("{head}{tail}"),
                base_number: base,
                user_digits: uw,
                counter_digits: cw,
                previous_prefixes: vec![],
                signing: signed.then(key),
            })
    }

    #[derive(Debug, Clone)]
    struct Mangling {
        reply: Vec<usize>,
        tag: Option<usize>,
        space_before_colon: bool,
        space_after_colon: bool,
        fullwidth: bool,
        brackets: u8,
        to_front: bool,
        case: u8,
    }

    fn arb_mangling() -> impl Strategy<Value = Mangling> {
        (
            prop::collection::vec(0..REPLY_PREFIXES.len(), 0..4),
            prop::option::of(0..TAGS.len()),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..3,
            any::<bool>(),
            0u8..3,
        )
            .prop_map(
                |(reply, tag, sb, sa, fullwidth, brackets, to_front, case)| Mangling {
                    reply,
                    tag,
                    space_before_colon: sb,
                    space_after_colon: sa,
                    fullwidth,
                    brackets,
                    to_front,
                    case,
                },
            )
    }

    fn mangle_token(text: &str, m: &Mangling) -> String {
        let mut out = String::new();
        for c in text.chars() {
            if c == ':' || c == '：' {
                if m.space_before_colon {
                    out.push(' ');
                }
                out.push(if m.fullwidth { '：' } else { ':' });
                if m.space_after_colon {
                    out.push(' ');
                }
            } else {
                out.push(c);
            }
        }
        match m.brackets {
            1 => format!("[{out}]"),
            2 => format!("({out})"),
            _ => out,
        }
    }

    fn apply_case(s: &str, case: u8) -> String {
        match case {
            1 => s.to_uppercase(),
            2 => s.to_lowercase(),
            _ => s.to_owned(),
        }
    }

    proptest! {
        #[test]
        fn mangled_tokens_are_found(
            settings in arb_settings(),
            user in any::<u32>(),
            counter in any::<u64>(),
            base in "[a-z]{1,10}( [a-z]{1,10}){0,4}",
            m in arb_mangling(),
        ) {
            let token = generate_signed(&settings, user, counter, "case:42", "example.com");
            let subject = append_to_subject(&base, &token);
            let text = token.to_string();
            prop_assert!(subject.ends_with(&text));
            let mangled_token = mangle_token(&text, &m);
            let mut body = if m.to_front {
                format!("{mangled_token} {base}")
            } else {
                format!("{base} {mangled_token}")
            };
            if let Some(t) = m.tag {
                body = format!("{} {body}", TAGS[t]);
            }
            for r in &m.reply {
                body = format!("{} {body}", REPLY_PREFIXES[*r]);
            }
            let body = apply_case(&body, m.case);
            let found = find_tokens(&settings, &body);
            prop_assert_eq!(found.len(), 1, "{} → {:?}", body, found);
            prop_assert_eq!(&found[0].token, &token);
            prop_assert_eq!(verify(&settings, &found[0].token, "case:42", "example.com"), Ok(()));
            // The span covers the token text, so removing it removes the token.
            let rest = remove_spans(&body, &[found[0].span.clone()]);
            prop_assert!(find_tokens(&settings, &rest).is_empty());
        }

        #[test]
        fn find_tokens_never_panics(
            settings in arb_settings(),
            prev in prop::collection::vec("\\PC{0,6}", 0..3),
            subject in "\\PC{0,60}",
        ) {
            let settings = TokenSettings { previous_prefixes: prev, ..settings };
            for f in find_tokens(&settings, &subject) {
                prop_assert!(subject.get(f.span.clone()).is_some());
            }
            let _ = append_to_subject_with(&settings, &subject, &generate(&settings, 1, 1));
        }

        #[test]
        fn digits_match_the_format_spelling(
            offline in any::<bool>(),
            user_number in any::<u64>(),
            counter in any::<u64>(),
            user_digits in 0u8..25,
            counter_digits in 0u8..25,
        ) {
            let t = TrackingToken {
                prefix: "CRM:".into(),
                offline,
                user_number,
                counter,
                user_digits,
                counter_digits,
                signature: None,
            };
            let expected = format!(
                "{}{:0uw$}{:0cw$}",
                u8::from(offline),
                user_number,
                counter,
                uw = usize::from(user_digits),
                cw = usize::from(counter_digits)
            );
            prop_assert_eq!(t.digits(), expected);
        }

        #[test]
        fn ascii_jump_finds_what_the_char_walk_finds(
            subject in "([\\[( ]{0,2}(CRM|crm|Crm|cr|xCRM|_crm)? ?[:：]? ?[01]?[0-9]{0,7}(-[a-z2-7]{0,8})?[\\])]? ?[a-z]{0,3}){0,5}",
        ) {
            let settings = TokenSettings::default();
            // A trailing non-ASCII, non-alphanumeric char turns the ASCII jump
            // off without changing what any position matches.
            let walked = find_tokens(&settings, &format!("{subject}…"));
            let jumped = find_tokens(&settings, &subject);
            prop_assert_eq!(jumped, walked);
        }

        #[test]
        fn find_tokens_never_panics_on_noise(subject in any::<String>()) {
            let _ = find_tokens(&TokenSettings::default(), &subject);
        }
    }
}
