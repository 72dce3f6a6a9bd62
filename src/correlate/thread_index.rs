//! Outlook/Exchange conversation index (`Thread-Index` header, MAPI
//! PidTagConversationIndex, Graph `conversationIndex`).
//!
//! Layout (MS-OXOMSG 2.2.1.3, and as observed in real headers):
//! * header block, 22 bytes: 6 bytes holding the top 48 bits of a FILETIME,
//!   big-endian, then a 16-byte conversation GUID. MS-OXOMSG describes byte 0
//!   as "reserved = 0x01" followed by 40 bits of time, but real Outlook
//!   headers carry the FILETIME's bits 63..16 in bytes 0..5, whose first byte
//!   is 0x01 for dates between 1972 and 2057, so both readings agree today;
//!   we follow the headers;
//! * one 5-byte child block per reply/forward: 1 bit DC, 31 bits of time
//!   delta (ticks >> 18 when DC = 0, ticks >> 23 when DC = 1), then one byte
//!   of 4 random bits and a 4-bit sequence count.
//!
//! Every message of a conversation shares the 22-byte root, so the root is
//! the correlation key.

#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// Length of the header (root) block in bytes.
pub const ROOT_LEN: usize = 22;
/// Length of each child block in bytes.
pub const CHILD_LEN: usize = 5;

/// Lenient decoder: padding optional, non-zero trailing bits tolerated,
/// because gateways re-fold and trim these headers.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// A decoded conversation index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ThreadIndex {
    /// The 22-byte header block shared by the whole conversation.
    pub root: [u8; ROOT_LEN],
    /// Number of 5-byte child blocks (0 for the first message).
    pub children: usize,
}

/// Why a `Thread-Index` value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThreadIndexError {
    /// The header is empty or whitespace only.
    Empty,
    /// The value is not base64.
    InvalidBase64,
    /// The decoded length is not 22 + 5·k bytes.
    BadLength(usize),
}

impl fmt::Display for ThreadIndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("Thread-Index header is empty"),
            Self::InvalidBase64 => f.write_str("Thread-Index header is not valid base64"),
            Self::BadLength(n) => write!(
                f,
                "Thread-Index decodes to {n} bytes; expected 22 plus a multiple of 5"
            ),
        }
    }
}

impl std::error::Error for ThreadIndexError {}

/// Decodes the raw bytes, tolerating folding whitespace, missing or extra
/// padding and the URL-safe alphabet.
fn decode_bytes(header: &str) -> Result<Vec<u8>, ThreadIndexError> {
    let cleaned: String = header
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            other => other,
        })
        .collect();
    let cleaned = cleaned.trim_end_matches('=');
    if cleaned.is_empty() {
        return Err(ThreadIndexError::Empty);
    }
    let bytes = LENIENT
        .decode(cleaned)
        .map_err(|_| ThreadIndexError::InvalidBase64)?;
    if bytes.len() < ROOT_LEN || !(bytes.len() - ROOT_LEN).is_multiple_of(CHILD_LEN) {
        return Err(ThreadIndexError::BadLength(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes a `Thread-Index` header value.
pub fn decode(header: &str) -> Result<ThreadIndex, ThreadIndexError> {
    let bytes = decode_bytes(header)?;
    let (root, children) = bytes
        .split_first_chunk::<ROOT_LEN>()
        .ok_or(ThreadIndexError::BadLength(bytes.len()))?;
    Ok(ThreadIndex {
        root: *root,
        children: children.len() / CHILD_LEN,
    })
}

/// Time deltas (FILETIME ticks, 100 ns) of each child block, oldest first;
/// the root time plus their sum is roughly when the message was sent.
pub fn child_delta_ticks(header: &str) -> Result<Vec<u64>, ThreadIndexError> {
    let bytes = decode_bytes(header)?;
    let children = bytes.get(ROOT_LEN..).unwrap_or_default();
    Ok(children
        .chunks_exact(CHILD_LEN)
        .filter_map(|c| c.first_chunk::<4>())
        .map(|c| {
            let w = u32::from_be_bytes(*c);
            let v = u64::from(w & 0x7FFF_FFFF);
            if w & 0x8000_0000 == 0 {
                v << 18
            } else {
                v << 23
            }
        })
        .collect())
}

impl ThreadIndex {
    /// Lower-case hex of the 22-byte root (44 chars): the index key that
    /// every message in the conversation shares.
    pub fn root_key(&self) -> String {
        self.root.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The conversation GUID bytes as carried on the wire.
    pub fn guid(&self) -> [u8; 16] {
        let mut g = [0u8; 16];
        g.copy_from_slice(&self.root[6..]);
        g
    }

    /// Root time as FILETIME ticks (100 ns since 1601), low 16 bits zero.
    pub fn root_filetime_ticks(&self) -> u64 {
        self.root[..6]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
            << 16
    }
}

/// Builds a root (first message) `Thread-Index` value from a FILETIME
/// (100 ns ticks since 1601-01-01 UTC) and a random GUID (wire byte order).
pub fn encode_root(filetime_ticks: u64, guid: [u8; 16]) -> String {
    let mut b = [0u8; ROOT_LEN];
    b[..6].copy_from_slice(&(filetime_ticks >> 16).to_be_bytes()[2..]);
    b[6..].copy_from_slice(&guid);
    STANDARD.encode(b)
}

/// Appends a child block to `parent` for a reply/forward sent
/// `delta_ticks` (100 ns) after the parent's root time. `random` is the
/// block's last byte (high nibble random, low nibble sequence count).
/// Deltas too large for 31 bits at the coarse scale saturate.
pub fn encode_child(
    parent: &str,
    delta_ticks: u64,
    random: u8,
) -> Result<String, ThreadIndexError> {
    let mut bytes = decode_bytes(parent)?;
    let word: u32 = if delta_ticks >> 18 <= 0x7FFF_FFFF {
        // DC = 0: fine scale, ~26 ms resolution, up to ~6.5 years.
        (delta_ticks >> 18) as u32
    } else {
        // DC = 1: coarse scale, ~0.84 s resolution.
        0x8000_0000 | (delta_ticks >> 23).min(0x7FFF_FFFF) as u32
    };
    bytes.extend_from_slice(&word.to_be_bytes());
    bytes.push(random);
    Ok(STANDARD.encode(bytes))
}

#[cfg(test)]
#[allow(clippy::string_slice, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Real Outlook headers of one thread (root, then three replies), quoted in
    // "Trying to make use of Outlook's Thread-Index: header", managing.blue,
    // 2007-12-11.
    const THREAD: [&str; 4] = [
        "AcdyY+a08VX8xfobTsy61v9NHPZ7QA==",
        "AcdyY+a08VX8xfobTsy61v9NHPZ7QAAAiXbA",
        "AcdyY+a08VX8xfobTsy61v9NHPZ7QAAAiXbAAAXP5fw=",
        "AcdyY+a08VX8xfobTsy61v9NHPZ7QAAAiXbAAAXP5fwAABGXGw==",
    ];

    #[test]
    fn real_outlook_thread() {
        let root = decode(THREAD[0]).unwrap();
        assert_eq!(
            root.root_key(),
            "01c77263e6b4f155fcc5fa1b4eccbad6ff4d1cf67b40"
        );
        assert_eq!(root.root_filetime_ticks(), 0x01c7_7263_e6b4_0000);
        assert_eq!(root.guid()[0], 0xf1);
        for (i, h) in THREAD.iter().enumerate() {
            let t = decode(h).unwrap();
            assert_eq!(t.children, i);
            assert_eq!(t.root_key(), root.root_key());
        }
        let deltas = child_delta_ticks(THREAD[3]).unwrap();
        assert_eq!(deltas, vec![0x8976 << 18, 0x0005_cfe5 << 18, 0x1197 << 18]);
    }

    // Header and reading quoted on the Rebex forum ("How to interprete
    // Thread-Index header", 2013): id d7a7bda8-…, date 2013-09-03 07:26:58
    // local time (CEST = 05:26:58 UTC).
    #[test]
    fn rebex_reply_date() {
        let h = "Ac52TvSLqL2n1+xFTLyFv0/vTSUlWgyF0E9Q";
        let t = decode(h).unwrap();
        assert_eq!(t.children, 1);
        assert_eq!(&t.guid()[..4], &[0xa8, 0xbd, 0xa7, 0xd7]);
        let sent = t.root_filetime_ticks() + child_delta_ticks(h).unwrap()[0];
        // 2013-09-03 05:26:58 UTC, to within one second.
        let want: u64 = 130_226_596_180_000_000;
        assert!(sent.abs_diff(want) < 10_000_000, "{sent}");
    }

    #[test]
    fn tolerant_and_strict_decoding() {
        let folded = "AcdyY+a08VX8xfobTsy61v9NHPZ7\r\n\tQAAAiXbAAAXP5fw";
        assert_eq!(decode(folded).unwrap().children, 2);
        assert_eq!(
            decode("AcdyY+a08VX8xfobTsy61v9NHPZ7QA").unwrap().children,
            0
        );
        assert_eq!(
            decode("AcdyY-a08VX8xfobTsy61v9NHPZ7QA==").unwrap().children,
            0
        );
        assert_eq!(decode(""), Err(ThreadIndexError::Empty));
        assert_eq!(decode(" \r\n= "), Err(ThreadIndexError::Empty));
        assert_eq!(decode("not base64!!"), Err(ThreadIndexError::InvalidBase64));
        // 23 bytes: neither 22 nor 27.
        assert_eq!(
            decode(&STANDARD.encode([1u8; 23])),
            Err(ThreadIndexError::BadLength(23))
        );
        assert_eq!(decode("AQID"), Err(ThreadIndexError::BadLength(3)));
        for e in [
            ThreadIndexError::Empty,
            ThreadIndexError::InvalidBase64,
            ThreadIndexError::BadLength(3),
        ] {
            assert!(e.to_string().contains("Thread-Index"));
        }
    }

    #[test]
    fn encode_matches_real_header() {
        let real = decode(THREAD[0]).unwrap();
        let ours = encode_root(real.root_filetime_ticks() + 0xffff, real.guid());
        assert_eq!(ours, THREAD[0]);
        let child = encode_child(&ours, 0x8976 << 18, 0xc0).unwrap();
        assert_eq!(child, THREAD[1]);
        let big = encode_child(&ours, u64::MAX, 0).unwrap();
        assert_eq!(child_delta_ticks(&big).unwrap(), vec![0x7FFF_FFFFu64 << 23]);
        let coarse = encode_child(&ours, 1 << 50, 0).unwrap();
        assert_eq!(child_delta_ticks(&coarse).unwrap(), vec![1 << 50]);
        assert_eq!(encode_child("", 1, 1), Err(ThreadIndexError::Empty));
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in any::<String>()) {
            let _ = decode(&s);
            let _ = child_delta_ticks(&s);
            let _ = encode_child(&s, 1, 2);
        }

        #[test]
        fn decode_never_panics_base64ish(s in "[A-Za-z0-9+/=\\-_ \r\n]{0,80}") {
            if let Ok(t) = decode(&s) {
                prop_assert_eq!(t.root_key().len(), 44);
            }
        }

        #[test]
        fn round_trip(ticks in any::<u64>(), guid in any::<[u8; 16]>(),
                      deltas in prop::collection::vec((any::<u64>(), any::<u8>()), 0..6)) {
            let root = encode_root(ticks, guid);
            let r = decode(&root).unwrap();
            prop_assert_eq!(r.guid(), guid);
            prop_assert_eq!(r.root_filetime_ticks(), ticks & !0xFFFF);
            prop_assert_eq!(r.children, 0);
            let mut cur = root;
            for (i, (d, rnd)) in deltas.iter().enumerate() {
                cur = encode_child(&cur, *d, *rnd).unwrap();
                let c = decode(&cur).unwrap();
                prop_assert_eq!(c.children, i + 1);
                prop_assert_eq!(c.root, r.root);
                let got = child_delta_ticks(&cur).unwrap()[i];
                prop_assert!(got <= *d);
                // Resolution is 2^18 or 2^23 ticks, unless saturated.
                prop_assert!(*d - got < (1 << 23) || got == 0x7FFF_FFFFu64 << 23);
            }
        }
    }
}
