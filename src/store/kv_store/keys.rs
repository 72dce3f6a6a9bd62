//! The key layout, the same on every backend (and the one sled stores
//! have always had, so an existing store opens and reads the same).
//!
//! Ids are big-endian u64 so scans run in id order:
//! `a/<id>` activity JSON · `am/<mailbox>\0<id>` per-mailbox listing ·
//! `s/<source>` source → id · `m/<message-id>` → id · `h/<hash>` → id ·
//! `q/<id>` quarantine JSON · `qs/<source>` → id · `p/<mailbox>\0<folder>` position ·
//! `b/<mailbox>` mailbox state · `l/<id>` alert · `lj/<scope>/<subject>/<kind>` → open alert id ·
//! `lo/<id>` open alert (empty) · `lr/<resolved at><id>` resolved alert (empty) ·
//! `lrn` → how many `lr/` holds ·
//! `le/<seq>` alert journal entry (JSON) · `lh` → newest alert journal seq ·
//! `nc/<name>` named cursor ·
//! `r/<id>` regarding record (JSON, small, so lookups need not load activities) ·
//! `t/<token digits>` → id · `x/<thread-index root>` → id ·
//! `sb/<bucket><id>` smart-matching candidate JSON (newest last in a bucket) ·
//! `sh/<shingle><id>` fingerprint index posting (empty value) ·
//! `sc/<id>` smart-matching candidate JSON of activities with postings ·
//! `al/<mailbox>\0<pair>\0<time><id>` loop-detector mark (empty) ·
//! `f/<source>` follow-up owed on a committed message (JSON) ·
//! `rc/<kind>\0<id>` CRM record (JSON) · `ra/<address>\0<kind>\0<id>` address
//! index (empty) · `rk/<consumer>` record delta cursor ·
//! `e/<seq>` event (JSON) · `o/<consumer>\0<seq>` pending delivery (JSON) ·
//! `od/<consumer>\0<seq>` dead letter (JSON) · `ci/<consumer>\0<activity>` CRM
//! id · `pu/<address>\0<activity>` unresolved party (empty) ·
//! `og/<id>` outgoing email (JSON) · `oq/<mailbox>\0<id>` still queued
//! (empty) · `ok/<idempotency key>` → id · `ou/<user number>` token counter.
//!
//! `<source>` is `<mailbox>\0<folder>\0<uidvalidity>\0<uid>`, so a
//! mailbox's follow-ups are one prefix.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::{EmailActivity, Record, SourceKey, UnixTime};
use crate::store::StoreError;

pub(super) fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| {
        StoreError::Corrupt(format!("value at {:?}: {e}", String::from_utf8_lossy(key)))
    })
}

pub(super) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

/// `<prefix><part>\0<part>…`.
pub(super) fn key(prefix: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

pub(super) fn source_bytes(s: &SourceKey) -> Vec<u8> {
    key(
        "",
        &[
            s.mailbox.as_bytes(),
            s.folder.as_bytes(),
            s.uidvalidity.to_string().as_bytes(),
            s.uid.as_bytes(),
        ],
    )
}

/// `<prefix><id>`, the id big-endian.
pub(super) fn id_key(prefix: &str, id: u64) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub(super) fn read_id(v: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("bad id of {} bytes", v.len())))?;
    Ok(u64::from_be_bytes(arr))
}

/// `<prefix><part>\0`: what every key of one list under `part` starts with.
pub(super) fn list_prefix(prefix: &str, part: &str) -> Vec<u8> {
    key(prefix, &[part.as_bytes(), b""])
}

/// `<prefix><part>\0<n>`.
pub(super) fn list_key(prefix: &str, part: &str, n: u64) -> Vec<u8> {
    let mut k = list_prefix(prefix, part);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// `am/<mailbox>\0<id>`.
pub(super) fn mailbox_listing_key(mailbox: &str, id: u64) -> Vec<u8> {
    list_key("am/", mailbox, id)
}

/// `al/<mailbox>\0<pair>\0`: the loop detector's marks, then the time
/// (sign bit flipped, so negative times sort first) and the activity id.
pub(super) fn automatic_prefix(mailbox: &str, pair: &str) -> Vec<u8> {
    key("al/", &[mailbox.as_bytes(), pair.as_bytes(), b""])
}

pub(super) fn sortable_time(t: UnixTime) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

pub(super) fn mid_key(id: &str) -> Vec<u8> {
    key(
        "m/",
        &[crate::correlate::normalize_message_id(id).as_bytes()],
    )
}

pub(super) fn record_key(kind: &str, id: &str) -> Vec<u8> {
    key("rc/", &[kind.as_bytes(), id.as_bytes()])
}

pub(super) use crate::model::normalize_address;

pub(super) fn address_key(address: &str, kind: &str, id: &str) -> Vec<u8> {
    key("ra/", &[address.as_bytes(), kind.as_bytes(), id.as_bytes()])
}

pub(super) fn record_addresses(r: &Record) -> BTreeSet<String> {
    r.emails
        .iter()
        .map(|e| normalize_address(e))
        .filter(|e| !e.is_empty())
        .collect()
}

/// `pu/<address>\0<activity>`.
pub(super) fn unresolved_key(address: &str, id: u64) -> Vec<u8> {
    list_key("pu/", address, id)
}

pub(super) fn unresolved_addresses(a: &EmailActivity) -> BTreeSet<String> {
    a.parties
        .iter()
        .filter(|p| p.record.is_none() && !p.address.is_empty())
        .map(|p| normalize_address(&p.address))
        .collect()
}

/// Key under which the open alert of a subject and kind is found, to be
/// updated rather than repeated. (`lk/` held the text-keyed identities of
/// alerts before kinds; those are no longer read.)
pub(super) fn alert_identity(mailbox: Option<&str>, profile: Option<&str>, kind: &str) -> Vec<u8> {
    let (scope, subject) = match (mailbox, profile) {
        (Some(m), _) => ("m", m),
        (None, Some(p)) => ("p", p),
        (None, None) => ("d", ""),
    };
    key(
        "lj/",
        &[scope.as_bytes(), subject.as_bytes(), kind.as_bytes()],
    )
}
