//! Quoted-text fingerprints for smart matching: a reply usually quotes its
//! parent, so the parent's word shingles reappear in the reply's quoted part.
//!
//! Usage: index `body_shingles(parent_full_text)` per sent/received message
//! (the full text, because a reply quotes the parent's own text *and* the
//! history the parent quoted); for an incoming mail compute
//! `body_shingles(&split_quoted(text).1)` and compare with
//! [`quoted_overlap`].
//!
//! The sample is a bottom-k sketch (the [`SAMPLE_SIZE`] smallest distinct
//! shingle hashes): bounded per message, and consistent, so containment can
//! be estimated even when both sides were truncated.

use std::sync::LazyLock;

use regex::Regex;

/// Words per shingle.
pub const SHINGLE_WORDS: usize = 5;

/// Maximum number of hashes kept per text (8 bytes each in the index).
pub const SAMPLE_SIZE: usize = 128;

/// Localised "-----Original Message-----" style separators and forward
/// banners; everything after them is quoted.
static ORIGINAL_MESSAGE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r"(?i)^(?:-{2,}\s*(?:original message|ursprüngliche nachricht|originalnachricht|message d'origine|mensaje original|messaggio originale|mensagem original|oorspronkelijk bericht|originalmeddelande|oprindelig meddelelse|opprinnelig melding|alkuperäinen viesti|wiadomość oryginalna|původní zpráva|исходное сообщение|原始邮件|原始郵件|元のメッセージ|forwarded message|weitergeleitete nachricht|message transféré|mensaje reenviado|messaggio inoltrato)\s*-{2,}|begin forwarded message\s*:)$",
    )
    .ok()
});

/// Outlook's horizontal rule before a quoted header block.
static UNDERSCORES: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"^_{10,}$").ok());

/// First line of an Outlook header block (`From:`, `Von:`, `De :`, …),
/// optionally bold-marked (`*From:*`) by HTML-to-text conversion.
static FROM_LABEL: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r"(?i)^\*?(?:from|von|de|van|da|från|fra|od|от|lähettäjä|feladó|发件人|寄件者|差出人|보낸 사람)\s*\*?\s*[:：]",
    )
    .ok()
});

/// The "sent" line that must follow a `From:` line for it to count as a
/// header block (a lone `From:` in prose is not).
static SENT_LABEL: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r"(?i)^\*?(?:sent|date|gesendet|datum|envoyé|enviado|enviado el|verzonden|inviato|data|skickat|sendt|wysłano|odesláno|отправлено|lähetetty|elküldve|发送时间|日期|寄件日期|送信日時|보낸 날짜)\s*\*?\s*[:：]",
    )
    .ok()
});

/// Same-line flattened header (`From: A Sent: B To: C`).
static FLAT_HEADER: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"(?i)^\*?(?:from|von|de)\s*\*?\s*:.*\b(?:sent|gesendet|envoyé|date)\s*\*?\s*:").ok()
});

/// Attribution verbs ending an "On …, X wrote:" line, in many languages.
static ATTRIBUTION: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r"(?i)(?:\bwrote|\bwrites|\bschrieb|\ba écrit|\bescribió|\bescreveu|\bha scritto|\bschreef|\bskrev|\bnapisał\(a\)|\bnapisał|\bnapsal|\bнаписал\(а\)|\bнаписал|\bkirjoitti|írta|写道|寫道|のメッセージ|님이 작성)[^:：]{0,80}[:：]$",
    )
    .ok()
});

/// Regexes are compiled once; a `None` (impossible for these constant
/// patterns, and asserted by a test) degrades to "no match" instead of
/// panicking.
fn matches(re: &LazyLock<Option<Regex>>, s: &str) -> bool {
    re.as_ref().is_some_and(|r| r.is_match(s))
}

/// Openers of attribution lines that clients wrap over two lines.
const ATTRIBUTION_OPENERS: &[&str] = &[
    "On ", "Am ", "Le ", "El ", "Em ", "Il ", "Op ", "Den ", "Dne ", "W dniu ", "På ", "Pe ",
];

/// Longest line we treat as an attribution; longer ones are prose.
const MAX_ATTRIBUTION_CHARS: usize = 300;

/// Cheap test every attribution passes (the regex ends in a colon), so most
/// lines never reach the regex.
fn ends_with_colon(t: &str) -> bool {
    t.ends_with(':') || t.ends_with('：')
}

fn is_attribution(line: &str) -> bool {
    is_trimmed_attribution(line.trim())
}

/// [`is_attribution`] of a line trimmed already.
fn is_trimmed_attribution(t: &str) -> bool {
    ends_with_colon(t)
        && t.chars().count() <= MAX_ATTRIBUTION_CHARS
        && !t.starts_with('>')
        && matches(&ATTRIBUTION, t)
}

/// Number of lines (1 or 2) of an attribution starting at `i`, if any;
/// `trimmed` holds the lines trimmed.
fn attribution_len(lines: &[&str], trimmed: &[&str], i: usize) -> Option<usize> {
    let t = trimmed.get(i)?;
    if is_trimmed_attribution(t) {
        return Some(1);
    }
    let next = trimmed.get(i + 1)?;
    // Leading blanks go, trailing ones stay: an opener is matched with its
    // space (`On `), which a line cut right after it still carries.
    let opener = || {
        let line = lines.get(i).map_or("", |l| l.trim_start());
        ATTRIBUTION_OPENERS.iter().any(|o| line.starts_with(o))
    };
    if ends_with_colon(next) && opener() && is_attribution(&format!("{t} {next}")) {
        return Some(2);
    }
    None
}

/// Whether `t` contains `:` or the full-width `：` (U+FF1A, `EF BC 9A`),
/// in one SIMD scan for both (this runs on every line of a fingerprinted
/// body).
fn has_colon(t: &str) -> bool {
    let b = t.as_bytes();
    memchr::memchr2_iter(b':', 0xEF, b).any(|i| b[i] == b':' || b[i..].starts_with("：".as_bytes()))
}

/// Whether a trimmed line may start a header-label boundary
/// ([`FROM_LABEL`], [`FLAT_HEADER`]) or `begin forwarded message:`: after an
/// optional `*`, its first letter must be the first letter of a label
/// (ASCII case-insensitively), or not ASCII (the rest of the labels; no
/// non-ASCII letter case-folds to these). Most prose lines fail this before
/// their colon is searched for.
fn may_start_label(t: &str) -> bool {
    let t = t.strip_prefix('*').unwrap_or(t);
    match t.bytes().next() {
        Some(b) if !b.is_ascii() => true,
        Some(b) => matches!(
            b.to_ascii_lowercase(),
            b'b' | b'd' | b'f' | b'l' | b'o' | b'v'
        ),
        None => false,
    }
}

/// True when everything from line `i` on is a quoted earlier message;
/// `trimmed` holds the lines trimmed.
fn is_hard_boundary(trimmed: &[&str], i: usize) -> bool {
    let Some(t) = trimmed.get(i) else {
        return false;
    };
    // Every boundary pattern starts with `-` or `_`, or with a label (or
    // `begin`) and contains a colon; skipping the regexes for other lines
    // is most of split_quoted's speed.
    if !(t.starts_with('-') || t.starts_with('_') || (may_start_label(t) && has_colon(t))) {
        return false;
    }
    if matches(&ORIGINAL_MESSAGE, t) || matches(&UNDERSCORES, t) || matches(&FLAT_HEADER, t) {
        return true;
    }
    matches(&FROM_LABEL, t)
        && trimmed
            .iter()
            .skip(i + 1)
            .take(4)
            .any(|l| matches(&SENT_LABEL, l))
}

/// Splits a plain-text body into (own text, quoted text).
///
/// Quoted: `>` lines; attribution lines ("On …, X wrote:", "Am … schrieb
/// …:", "Le … a écrit :", …); and everything after an Outlook
/// `-----Original Message-----`, a `____…` rule, a `From:`/`Sent:` header
/// block or an attribution that is not followed by `>` lines (Outlook-style
/// quoting without markers). Own text between `>` blocks (bottom-posting,
/// inline replies) stays own. Both parts are trimmed; lines keep their text.
pub fn split_quoted(text: &str) -> (String, String) {
    let (own, quoted) = split_lines(text);
    (
        own.join("\n").trim().to_owned(),
        quoted.join("\n").trim().to_owned(),
    )
}

/// [`body_shingles`] of the quoted part ([`split_quoted`]) without building
/// the quoted text: words never span lines, so the lines are hashed in turn.
pub fn quoted_shingles(text: &str) -> Vec<u64> {
    let quoted = quoted_lines(text, |_| {});
    let mut words = Vec::with_capacity(text.len() / 6);
    for line in quoted {
        push_word_hashes(line, &mut words);
    }
    shingles_of_words(&words)
}

/// The lines of `text` as [`str::lines`] gives them, found with the SIMD
/// `memchr` (this runs over every fingerprinted body).
fn lines_of(text: &str) -> Vec<&str> {
    let mut lines = Vec::with_capacity(text.len() / 40 + 1);
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', text.as_bytes()) {
        let line = &text[start..nl];
        // `\r\n` ends a line; a lone `\r` does not.
        lines.push(line.strip_suffix('\r').unwrap_or(line));
        start = nl + 1;
    }
    if start < text.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// [`split_quoted`] by lines: (own lines, quoted lines).
fn split_lines(text: &str) -> (Vec<&str>, Vec<&str>) {
    let mut own = Vec::new();
    let quoted = quoted_lines(text, |line| own.push(line));
    (own, quoted)
}

/// The quoted lines of [`split_lines`]; the own ones go to `own`. Each line
/// is trimmed once, up front: every test below looks at the trimmed line
/// (trimming it again per test was most of the cost per line).
fn quoted_lines<'t>(text: &'t str, mut own: impl FnMut(&'t str)) -> Vec<&'t str> {
    let lines = lines_of(text);
    let trimmed: Vec<&str> = lines.iter().map(|l| l.trim()).collect();
    let mut quoted: Vec<&str> = Vec::new();
    let mut i = 0;
    while let (Some(&line), Some(t)) = (lines.get(i), trimmed.get(i)) {
        if is_hard_boundary(&trimmed, i) {
            quoted.extend_from_slice(&lines[i..]);
            break;
        }
        if let Some(n) = attribution_len(&lines, &trimmed, i) {
            let next = trimmed.iter().skip(i + n).find(|t| !t.is_empty());
            if next.is_some_and(|t| t.starts_with('>')) {
                // Header of a `>` block: the reply may continue below it.
                quoted.extend(lines.iter().skip(i).take(n));
                i += n;
                continue;
            }
            quoted.extend_from_slice(&lines[i..]);
            break;
        }
        if t.starts_with('>') {
            quoted.push(line);
        } else {
            own(line);
        }
        i += 1;
    }
    quoted
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// splitmix64 finaliser: spreads the combined word hashes so the bottom-k
/// sample is uniform.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of a run of word hashes (order matters).
fn hash_shingle(word_hashes: &[u64]) -> u64 {
    let mut h = FNV_OFFSET;
    for w in word_hashes {
        h = (h.rotate_left(23) ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// Hashes of the words of `text`, lower-cased, with punctuation (including
/// `>` quote markers) as separators, so re-wrapping and re-quoting do not
/// change them. Each word is hashed once (shingles combine word hashes) with
/// a rotate-xor per byte and one finalising mix per word; ASCII is handled
/// byte by byte without decoding chars. No allocation beyond the result.
fn word_hashes(text: &str) -> Vec<u64> {
    let mut out = Vec::with_capacity(text.len() / 6);
    push_word_hashes(text, &mut out);
    out
}

/// [`word_hashes`], appended to `out`.
fn push_word_hashes(text: &str, out: &mut Vec<u64>) {
    let bytes = text.as_bytes();
    let (mut h, mut len) = (0u64, 0u64);
    let mut i = 0;
    let mut buf = [0u8; 4];
    while i < bytes.len() {
        let b = bytes[i];
        let alnum = if b < 0x80 {
            i += 1;
            // One table load instead of range tests and a case fold.
            let folded = ASCII_WORD_BYTE[usize::from(b)];
            if folded != 0 {
                h = h.rotate_left(7) ^ u64::from(folded);
                len += 1;
                true
            } else {
                false
            }
        } else {
            let c = text[i..].chars().next().unwrap_or(' ');
            i += c.len_utf8().max(1);
            if c.is_alphanumeric() {
                for l in c.to_lowercase() {
                    for lb in l.encode_utf8(&mut buf).bytes() {
                        h = h.rotate_left(7) ^ u64::from(lb);
                        len += 1;
                    }
                }
                true
            } else {
                false
            }
        };
        if !alnum && len > 0 {
            out.push(mix(h ^ len.wrapping_mul(FNV_OFFSET)));
            (h, len) = (0, 0);
        }
    }
    if len > 0 {
        out.push(mix(h ^ len.wrapping_mul(FNV_OFFSET)));
    }
}

/// ASCII letters and digits lower-cased; 0 for every other ASCII byte.
const ASCII_WORD_BYTE: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            t[b] = c.to_ascii_lowercase();
        }
        b += 1;
    }
    t
};

/// Sorted, deduped sample of the hashes of the text's
/// [`SHINGLE_WORDS`]-word shingles: the [`SAMPLE_SIZE`] smallest. A text
/// shorter than one shingle yields one hash of all its words; an empty text
/// yields nothing.
pub fn body_shingles(text: &str) -> Vec<u64> {
    shingles_of_words(&word_hashes(text))
}

/// The sample of the shingles of a run of word hashes.
fn shingles_of_words(words: &[u64]) -> Vec<u64> {
    let hashes: Vec<u64> = if words.is_empty() {
        Vec::new()
    } else if words.len() < SHINGLE_WORDS {
        vec![hash_shingle(words)]
    } else {
        words.windows(SHINGLE_WORDS).map(hash_shingle).collect()
    };
    bottom_k(hashes)
}

/// The [`SAMPLE_SIZE`] smallest distinct values, sorted. Long texts have
/// thousands of shingles: partition off a slack of the smallest first and
/// sort only those (the full sort was most of the fingerprint's cost);
/// fall back to the full sort when duplicates ate the slack.
fn bottom_k(mut hashes: Vec<u64>) -> Vec<u64> {
    const SLACK: usize = 2 * SAMPLE_SIZE;
    if hashes.len() > SLACK {
        // Partitioning only permutes: the fallback still sees every value.
        hashes.select_nth_unstable(SLACK);
        let mut head = hashes[..SLACK].to_vec();
        head.sort_unstable();
        head.dedup();
        if head.len() >= SAMPLE_SIZE {
            head.truncate(SAMPLE_SIZE);
            return head;
        }
    }
    hashes.sort_unstable();
    hashes.dedup();
    hashes.truncate(SAMPLE_SIZE);
    hashes
}

/// Fraction (0..=1) of the parent's sampled shingles found in the reply's
/// quoted part. Both inputs must be sorted ascending (as
/// [`body_shingles`] returns them); unsorted input gives a meaningless
/// number but never panics.
///
/// When the reply sample is full ([`SAMPLE_SIZE`] hashes) it may have been
/// truncated, so only parent hashes up to the reply's largest are counted
/// (bottom-k containment estimate); this keeps a reply that quotes a long
/// history from looking unrelated.
pub fn quoted_overlap(parent_shingles: &[u64], reply_quoted_shingles: &[u64]) -> f32 {
    let limit = match reply_quoted_shingles.last() {
        None => return 0.0,
        Some(&max) if reply_quoted_shingles.len() >= SAMPLE_SIZE => max,
        Some(_) => u64::MAX,
    };
    let (mut i, mut j) = (0usize, 0usize);
    let (mut considered, mut common) = (0usize, 0usize);
    while let Some(&p) = parent_shingles.get(i) {
        if p > limit {
            break;
        }
        considered += 1;
        while reply_quoted_shingles.get(j).is_some_and(|&r| r < p) {
            j += 1;
        }
        if reply_quoted_shingles.get(j) == Some(&p) {
            common += 1;
        }
        i += 1;
    }
    if considered == 0 {
        return 0.0;
    }
    (common as f32 / considered as f32).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P1: &str = "Thank you for your order of 40 units of the XR-200 pump. \
        Our warehouse in Rotterdam confirmed that the goods will ship on Friday \
        and should arrive at your site early next week.";
    const P2: &str = "Please note that the invoice 7781 includes the installation \
        kit, which was previously quoted separately. The total therefore differs \
        slightly from the first offer we sent in March.";
    const P3: &str = "If you need the delivery split across two locations, let me \
        know by Wednesday so that logistics can prepare separate packing lists \
        and customs documents for each destination.";

    fn parent() -> String {
        format!("Hello Maria,\n\n{P1}\n\n{P2}\n\n{P3}\n\nBest regards,\nJohn")
    }

    /// Re-wraps text at `width` columns with a prefix, like mail clients do.
    fn wrap_quote(text: &str, width: usize, prefix: &str) -> String {
        let mut out = String::new();
        for para in text.split("\n\n") {
            let mut line = String::new();
            for w in para.split_whitespace() {
                if line.len() + w.len() + 1 > width && !line.is_empty() {
                    out.push_str(&format!("{prefix}{line}\n"));
                    line.clear();
                }
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(w);
            }
            out.push_str(&format!("{prefix}{line}\n{}\n", prefix.trim_end()));
        }
        out
    }

    // The line classifier as it was before each line was trimmed once up
    // front and label-less lines skipped the colon search: the reference
    // the fast one must agree with (`is_attribution` is unchanged and shared).
    fn ref_attribution_len(lines: &[&str], i: usize) -> Option<usize> {
        let line = lines.get(i)?;
        if is_attribution(line) {
            return Some(1);
        }
        let next = lines.get(i + 1)?;
        let t = line.trim_start();
        if ends_with_colon(next.trim_end())
            && ATTRIBUTION_OPENERS.iter().any(|o| t.starts_with(o))
            && is_attribution(&format!("{} {}", t.trim_end(), next.trim()))
        {
            return Some(2);
        }
        None
    }

    fn ref_is_hard_boundary(lines: &[&str], i: usize) -> bool {
        let Some(line) = lines.get(i) else {
            return false;
        };
        let t = line.trim();
        // Every boundary pattern starts with `-` or `_` or contains a colon;
        // skipping the regexes for other lines is most of split_quoted's speed.
        if !(t.starts_with('-') || t.starts_with('_') || has_colon(t)) {
            return false;
        }
        if matches(&ORIGINAL_MESSAGE, t) || matches(&UNDERSCORES, t) || matches(&FLAT_HEADER, t) {
            return true;
        }
        matches(&FROM_LABEL, t)
            && lines
                .iter()
                .skip(i + 1)
                .take(4)
                .any(|l| matches(&SENT_LABEL, l.trim()))
    }

    fn ref_split_lines(text: &str) -> (Vec<&str>, Vec<&str>) {
        let lines = lines_of(text);
        let mut own: Vec<&str> = Vec::new();
        let mut quoted: Vec<&str> = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            if ref_is_hard_boundary(&lines, i) {
                quoted.extend_from_slice(&lines[i..]);
                break;
            }
            if let Some(n) = ref_attribution_len(&lines, i) {
                let next = lines[i + n..].iter().find(|l| !l.trim().is_empty());
                if next.is_some_and(|l| l.trim_start().starts_with('>')) {
                    // Header of a `>` block: the reply may continue below it.
                    quoted.extend_from_slice(&lines[i..i + n]);
                    i += n;
                    continue;
                }
                quoted.extend_from_slice(&lines[i..]);
                break;
            }
            let line = lines[i];
            if line.trim_start().starts_with('>') {
                quoted.push(line);
            } else {
                own.push(line);
            }
            i += 1;
        }
        (own, quoted)
    }

    fn overlap_of(reply: &str) -> f32 {
        let (_, quoted) = split_quoted(reply);
        quoted_overlap(&body_shingles(&parent()), &body_shingles(&quoted))
    }

    proptest! {
        /// The line-wise quoted fingerprint equals the one of the joined
        /// quoted text, and the lines are those of `str::lines`.
        #[test]
        fn quoted_shingles_match_the_joined_quote(
            parts in prop::collection::vec(prop::sample::select(vec![
                "> ", ">", "\n", "\r\n", "On Mon, 3 Mar 2025, Ann wrote:", "-----Original Message-----",
                "From: Ann", "Sent: Monday", "the invoice", " 7781 ", "é", "\r", "  ", "wrote:", "Thanks.",
            ]), 0..40)
        ) {
            let text: String = parts.concat();
            prop_assert_eq!(lines_of(&text), text.lines().collect::<Vec<_>>());
            prop_assert_eq!(quoted_shingles(&text), body_shingles(&split_quoted(&text).1));
        }

        /// The classifier agrees with its reference line for line, on
        /// texts built from boundary, label, attribution and prose pieces
        /// (labels in several languages, bold marks, blank padding).
        #[test]
        fn split_lines_matches_the_reference(
            parts in prop::collection::vec(prop::sample::select(vec![
                "\n", "\r\n", "  ", " ", "> ", ">", "*", ":", "：", "-----Original Message-----",
                "-- ", "__________", "Begin forwarded message:", "begin forwarded message :",
                "From: Ann", "*From:* Ann", "Von: Ann", "De : Ann", "Od: Ann", "От: Ann",
                "Lähettäjä: Ann", "发件人：Ann", "보낸 사람: Ann", "Sent: Monday", "Date: Mon",
                "Gesendet: Mo", "From: A Sent: B", "On Mon, 3 Mar 2025, Ann", "On ", "wrote:",
                "Am 3. März schrieb Ann:", "Le lun. a écrit :", "the invoice", " 7781 ", "é",
                "Thanks.", "Dear Bob", "la la", "velvet", "olive", "\u{3000}", "\u{a0}",
            ]), 0..48)
        ) {
            let text: String = parts.concat();
            prop_assert_eq!(split_lines(&text), ref_split_lines(&text));
        }

        /// The one-scan colon test agrees with `str::contains`, also next
        /// to other characters that start with the byte `EF`.
        #[test]
        fn has_colon_matches_contains(
            parts in prop::collection::vec(prop::sample::select(vec![
                "a", ":", "：", "；", "＝", "\u{FFFD}", "é", " ", "From", "\u{EF}",
            ]), 0..12)
        ) {
            let t: String = parts.concat();
            prop_assert_eq!(has_colon(&t), t.contains(':') || t.contains('：'));
        }
    }

    #[test]
    fn regexes_compile() {
        for r in [
            &ORIGINAL_MESSAGE,
            &UNDERSCORES,
            &FROM_LABEL,
            &SENT_LABEL,
            &FLAT_HEADER,
            &ATTRIBUTION,
        ] {
            assert!(r.is_some());
        }
    }

    #[test]
    fn top_posting_with_markers() {
        let reply = format!(
            "Great, Friday works for us.\n\nOn Mon, 3 Mar 2025 at 10:02, John Smith <john@example.com> wrote:\n{}",
            wrap_quote(&parent(), 60, "> ")
        );
        let (own, quoted) = split_quoted(&reply);
        assert_eq!(own, "Great, Friday works for us.");
        assert!(quoted.starts_with("On Mon"));
        let o = overlap_of(&reply);
        assert!(o >= 0.9, "{o}");
    }

    #[test]
    fn gmail_two_line_attribution() {
        let reply = format!(
            "Thanks!\n\nOn Mon, Mar 3, 2025 at 10:02 AM John Smith <john@example.com>\nwrote:\n\n{}",
            wrap_quote(&parent(), 72, "> ")
        );
        let (own, _) = split_quoted(&reply);
        assert_eq!(own, "Thanks!");
        assert!(overlap_of(&reply) >= 0.9);
    }

    #[test]
    fn bottom_posting_and_inline() {
        let reply = format!(
            "John Smith wrote:\n> {P1}\n\nFriday is fine.\n\n> {P2}\n> {P3}\n\nOne location only.\n-- \nMaria"
        );
        let (own, quoted) = split_quoted(&reply);
        assert!(own.contains("Friday is fine."));
        assert!(own.contains("One location only."));
        assert!(!own.contains("Rotterdam"));
        assert!(quoted.contains("Rotterdam") && quoted.contains("customs"));
        assert!(overlap_of(&reply) >= 0.5);
    }

    #[test]
    fn outlook_without_markers() {
        let reply = format!(
            "Hi John, confirmed.\r\n\r\n________________________________\r\nFrom: John Smith <john@example.com>\r\nSent: Monday, March 3, 2025 10:02 AM\r\nTo: Maria\r\nSubject: Order XR-200\r\n\r\n{}",
            parent().replace('\n', "\r\n")
        );
        let (own, quoted) = split_quoted(&reply);
        assert_eq!(own, "Hi John, confirmed.");
        assert!(quoted.contains("Rotterdam"));
        assert!(overlap_of(&reply) >= 0.9);

        let orig = format!("ok\n\n-----Original Message-----\nFrom: John\n{}", parent());
        assert_eq!(split_quoted(&orig).0, "ok");
        assert!(overlap_of(&orig) >= 0.9);

        let header_only = format!(
            "ok\n\nVon: John Smith\nGesendet: Montag\nAn: Maria\n\n{}",
            parent()
        );
        assert_eq!(split_quoted(&header_only).0, "ok");

        let flat = format!("ok\n*From:* John *Sent:* Monday *To:* Maria\n{}", parent());
        assert_eq!(split_quoted(&flat).0, "ok");
    }

    #[test]
    fn localised_attributions_without_markers() {
        for attr in [
            "Am 03.03.2025 um 10:02 schrieb John Smith <john@example.com>:",
            "Le lun. 3 mars 2025 à 10:02, John Smith <john@example.com> a écrit :",
            "El lun, 3 mar 2025 a las 10:02, John Smith (<john@example.com>) escribió:",
            "2025年3月3日 10:02，John Smith <john@example.com> 写道：",
        ] {
            let reply = format!("Danke.\n\n{attr}\n\n{}", parent());
            let (own, quoted) = split_quoted(&reply);
            assert_eq!(own, "Danke.", "{attr}");
            assert!(quoted.starts_with(attr), "{attr}");
        }
    }

    #[test]
    fn prose_is_not_quoted() {
        let text = "From: the team's point of view this is fine.\nWe wrote: nothing yet, honestly.\nAll good";
        // "We wrote: nothing..." does not END with the attribution colon.
        let (own, quoted) = split_quoted(text);
        assert_eq!(own, text);
        assert!(quoted.is_empty());
    }

    #[test]
    fn unrelated_same_subject_is_near_zero() {
        let other = "Hello Maria,\n\nAttached is the agenda for the quarterly review \
            meeting. We will discuss the marketing budget, the new hires in the Lyon \
            office and the timeline for the website relaunch.\n\nBest regards,\nJohn";
        let reply = format!(
            "Thanks.\n\nOn Tue, John wrote:\n{}",
            wrap_quote(other, 60, "> ")
        );
        let o = overlap_of(&reply);
        assert!(o < 0.05, "{o}");
    }

    #[test]
    fn partial_quote() {
        // Quotes only P1: about a third of the parent.
        let reply = format!("Ok.\n\nJohn wrote:\n> {P1}");
        let o = overlap_of(&reply);
        assert!(o > 0.15 && o < 0.6, "{o}");
    }

    #[test]
    fn shingle_basics() {
        assert!(body_shingles("").is_empty());
        assert!(body_shingles(" >> ,, ").is_empty());
        assert_eq!(
            body_shingles("Hello, World!"),
            body_shingles("> hello\n>   world")
        );
        assert_eq!(body_shingles("one two three").len(), 1);
        assert_eq!(body_shingles("a b c d e f g").len(), 3);
        let long: String = (0..1000).map(|i| format!("w{i} ")).collect();
        let s = body_shingles(&long);
        assert_eq!(s.len(), SAMPLE_SIZE);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(quoted_overlap(&[], &s), 0.0);
        assert_eq!(quoted_overlap(&s, &[]), 0.0);
        assert_eq!(quoted_overlap(&s, &s), 1.0);
    }

    #[test]
    fn long_history_still_matches() {
        // The reply quotes the parent plus a long older history, so its
        // sample is truncated; the bottom-k estimate must still see the parent.
        let history: String = (0..2000).map(|i| format!("older{i} ")).collect();
        let parent_full = format!("{}\n\n{history}", parent());
        let p = body_shingles(&parent_full);
        let reply_quoted = format!("{parent_full}\n\n{history} more words here");
        let o = quoted_overlap(&p, &body_shingles(&reply_quoted));
        assert!(o >= 0.9, "{o}");
    }

    proptest! {
        #[test]
        fn never_panics_and_bounded(a in "\\PC{0,300}", b in "\\PC{0,300}") {
            let (own, quoted) = split_quoted(&a);
            prop_assert!(own.len() + quoted.len() <= a.len());
            let sa = body_shingles(&a);
            let sb = body_shingles(&b);
            prop_assert!(sa.len() <= SAMPLE_SIZE);
            let o = quoted_overlap(&sa, &sb);
            prop_assert!((0.0..=1.0).contains(&o));
            let _ = split_quoted(&b);
        }

        #[test]
        fn containment_is_full(a in "[a-z]{1,6}( [a-z]{1,6}){4,80}", b in "[a-z ]{0,400}") {
            let whole = format!("{a} {b}");
            let o = quoted_overlap(&body_shingles(&a), &body_shingles(&whole));
            prop_assert!((o - 1.0).abs() < f32::EPSILON, "{}", o);
        }
    }
}
