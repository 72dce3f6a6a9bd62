//! Party resolution: the from/to/cc/bcc addresses of a message, each
//! resolved to a record of the directory, or left unresolved with the reason.
//!
//! The rules (Dynamics' order, its random picks fixed):
//! * addresses compare case-insensitively (lower-cased, trimmed);
//! * the kinds of [`PartySettings::order`] are tried in turn (default user →
//!   contact → account → lead → queue): the first kind with exactly one
//!   record carrying the address wins;
//! * two or more records of that first matching kind (a tie) leave the
//!   party unresolved with the candidates (`kind:id`) in its note: the
//!   directory cannot tell which one is meant, and a guess would link the
//!   email to the wrong customer;
//! * more records carrying the address than [`PartySettings::max_matches`]
//!   (a shared mailbox like `info@`) leave it unresolved as well;
//! * records of kinds outside the order (cases, opportunities) are never
//!   parties.
//!
//! Resolution is pure over a lookup function (address → records), so the
//! pipeline can cache one lookup per distinct address of a batch, the bench
//! can drive it against any store, and the tests need none.
//!
//! Late resolution: a party left unresolved is indexed by the store
//! ([`Store::activities_with_unresolved`]); when records arrive (import, the
//! records API, the adapter's record sync) the caller passes their addresses
//! to [`resolve_pending`], which re-resolves those activities and writes
//! each one whose parties changed through [`Store::update_activity`]
//! (one `activity.updated` event with changes `["parties"]`, in the same
//! batch). **Every path that adds or changes records must call it.**

use std::collections::{BTreeSet, HashMap};

use crate::config::PartySettings;
use crate::model::{record_kind, EmailActivity, Party, PartyRole, Record, RecordRef, UnixTime};
use crate::store::{Store, StoreError};

/// Note of a party resolved to a record the pipeline created for it.
pub const AUTO_CREATED_NOTE: &str = "auto-created";

/// At most this many candidates are named in a note (the rest are counted).
const NOTE_CANDIDATES: usize = 10;

/// The outcome for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressResolution {
    /// The record it resolved to.
    pub record: Option<RecordRef>,
    /// The kind that decided: the winner's, or the tied kind's (a tie still
    /// tells what the sender is, only not which one). `None` when no record
    /// of an ordered kind carries the address or there were too many.
    pub kind: Option<String>,
    /// Whether the winner (or, for a tie, any tied candidate) is
    /// email-enabled.
    pub email_enabled: bool,
    /// Why unresolved (no record, tie, too many, with the candidates), or
    /// how resolved when not by the directory alone (auto-created).
    pub note: Option<String>,
    /// No record at all carries the address (auto-create applies only then).
    pub unknown: bool,
}

impl AddressResolution {
    /// A short human-readable summary (`contact:42`, `unresolved: …`).
    pub fn summary(&self) -> String {
        match (&self.record, &self.note) {
            (Some(r), None) => r.to_string(),
            (Some(r), Some(n)) => format!("{r} ({n})"),
            (None, Some(n)) => format!("unresolved: {n}"),
            (None, None) => "unresolved".into(),
        }
    }
}

pub use crate::model::normalize_address;

fn candidates(records: &[&Record]) -> String {
    let mut refs: Vec<String> = records
        .iter()
        .map(|r| format!("{}:{}", r.kind, r.id))
        .collect();
    refs.sort();
    let more = refs.len().saturating_sub(NOTE_CANDIDATES);
    refs.truncate(NOTE_CANDIDATES);
    let mut s = refs.join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

/// Resolves one address from the records that carry it (as
/// [`Store::records_by_address`] returns them), following the module rules.
pub fn resolve_with(records: &[Record], settings: &PartySettings) -> AddressResolution {
    let unresolved =
        |kind: Option<String>, email_enabled, note: String, unknown| AddressResolution {
            record: None,
            kind,
            email_enabled,
            note: Some(note),
            unknown,
        };
    if records.is_empty() {
        return unresolved(None, false, "no record has this address".into(), true);
    }
    let all: Vec<&Record> = records.iter().collect();
    if records.len() > settings.max_matches {
        return unresolved(
            None,
            false,
            format!(
                "{} records have this address, more than max_matches = {}: {}",
                records.len(),
                settings.max_matches,
                candidates(&all)
            ),
            false,
        );
    }
    for kind in &settings.order {
        let of_kind: Vec<&Record> = records.iter().filter(|r| &r.kind == kind).collect();
        match of_kind.as_slice() {
            [] => continue,
            [one] => {
                return match one.reference() {
                    Ok(r) => AddressResolution {
                        record: Some(r),
                        kind: Some(kind.clone()),
                        email_enabled: one.email_enabled,
                        note: None,
                        unknown: false,
                    },
                    // A record whose id cannot form a reference cannot be
                    // named on the activity: say so instead of dropping it.
                    Err(why) => unresolved(
                        Some(kind.clone()),
                        one.email_enabled,
                        format!("record {}:{} is not usable: {why}", one.kind, one.id),
                        false,
                    ),
                };
            }
            tied => {
                return unresolved(
                    Some(kind.clone()),
                    tied.iter().any(|r| r.email_enabled),
                    format!(
                        "tie: {} {kind} records have this address: {}",
                        tied.len(),
                        candidates(tied)
                    ),
                    false,
                );
            }
        }
    }
    unresolved(
        None,
        false,
        format!(
            "no {} has this address (only {})",
            settings.order.join(", "),
            candidates(&all)
        ),
        false,
    )
}

/// [`resolve_with`] for `address`, noting [`AUTO_CREATED_NOTE`] when the
/// winner is the record auto-create made for this very address (so a batch
/// retried after a crash reads as the first run did).
pub fn resolve_for(
    address: &str,
    records: &[Record],
    settings: &PartySettings,
) -> AddressResolution {
    let mut r = resolve_with(records, settings);
    if r.note.is_none()
        && r.record
            .as_ref()
            .is_some_and(|rec| rec.id() == auto_created_id(address))
    {
        r.note = Some(AUTO_CREATED_NOTE.into());
    }
    r
}

/// Resolves one address through `lookup` (address → records carrying it).
pub fn resolve_address<E>(
    address: &str,
    settings: &PartySettings,
    lookup: &mut impl FnMut(&str) -> Result<Vec<Record>, E>,
) -> Result<AddressResolution, E> {
    let address = normalize_address(address);
    let records = lookup(&address)?;
    Ok(resolve_for(&address, &records, settings))
}

/// The addresses of a message by role, lower-cased, each once per role, in
/// message order: from, to, cc, bcc.
pub fn party_addresses<'a>(
    from: &'a [String],
    to: &'a [String],
    cc: &'a [String],
    bcc: &'a [String],
) -> Vec<(PartyRole, String)> {
    let mut out: Vec<(PartyRole, String)> = Vec::new();
    for (role, list) in [
        (PartyRole::From, from),
        (PartyRole::To, to),
        (PartyRole::Cc, cc),
        (PartyRole::Bcc, bcc),
    ] {
        for a in list {
            let a = normalize_address(a);
            if a.is_empty() || out.iter().any(|(r, x)| *r == role && *x == a) {
                continue;
            }
            out.push((role, a));
        }
    }
    out
}

/// Resolves every party of a message; `lookup` is asked once per distinct
/// address (callers cache across messages).
pub fn resolve_parties<E>(
    addresses: &[(PartyRole, String)],
    lookup: &mut impl FnMut(&str) -> Result<AddressResolution, E>,
) -> Result<Vec<Party>, E> {
    let mut seen: HashMap<&str, AddressResolution> = HashMap::new();
    let mut out = Vec::with_capacity(addresses.len());
    for (role, address) in addresses {
        let res = match seen.get(address.as_str()) {
            Some(r) => r.clone(),
            None => {
                let r = lookup(address)?;
                seen.insert(address, r.clone());
                r
            }
        };
        out.push(Party {
            role: *role,
            address: address.clone(),
            record: res.record,
            note: res.note,
        });
    }
    Ok(out)
}

/// The reasons line about the sender's resolution.
pub fn sender_line(sender: Option<&str>, res: Option<&AddressResolution>) -> String {
    match (sender, res) {
        (Some(s), Some(r)) => format!("sender {s}: {}", r.summary()),
        _ => "sender: the message names no sender".into(),
    }
}

/// Deterministic id of an auto-created record for `address`: the same
/// address always gives the same id, so a batch retried after a crash
/// upserts the same record instead of creating a second one.
pub fn auto_created_id(address: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, normalize_address(address).as_bytes());
    let hex: String = digest
        .as_ref()
        .iter()
        .take(10)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("auto-{hex}")
}

/// The record auto-create makes for an unknown sender.
pub fn auto_created_record(kind: &str, address: &str) -> Record {
    let address = normalize_address(address);
    Record {
        kind: kind.to_string(),
        id: auto_created_id(&address),
        name: address.split('@').next().unwrap_or_default().to_string(),
        emails: vec![address],
        owner: None,
        email_enabled: true,
        user_number: None,
        updated_at: 0,
    }
}

/// Whether a kind counts as a CRM customer record for the
/// `from_crm_records` track filter.
pub fn is_customer_kind(kind: &str) -> bool {
    record_kind::CUSTOMER_KINDS.contains(&kind)
}

/// Re-resolves the unresolved parties of the activities that name one of
/// `addresses` (records for them were just added or changed) and writes
/// every activity whose parties changed with [`Store::update_activity`],
/// which appends its `activity.updated` event (changes `["parties"]`) in the
/// same batch. Returns how many activities were updated.
///
/// Called by `records import`; the admin records API and the adapter's
/// record sync call it after their upserts too (and after deletes: a
/// deleted record never un-resolves a party, but may end a tie).
pub fn resolve_pending(
    store: &dyn Store,
    addresses: &[String],
    settings: &PartySettings,
    at: UnixTime,
) -> Result<usize, StoreError> {
    let wanted: BTreeSet<String> = addresses
        .iter()
        .map(|a| normalize_address(a))
        .filter(|a| !a.is_empty())
        .collect();
    let mut ids = BTreeSet::new();
    for a in &wanted {
        ids.extend(store.activities_with_unresolved(a)?);
    }
    let mut cache: HashMap<String, AddressResolution> = HashMap::new();
    let mut updated = 0;
    for id in ids {
        let Some(activity) = store.activity(id)? else {
            continue;
        };
        if let Some(changed) = re_resolved(&activity, settings, store, &mut cache)? {
            if store
                .update_activity(changed, vec!["parties".into()], at)?
                .is_some()
            {
                updated += 1;
            }
        }
    }
    Ok(updated)
}

/// The activity with its unresolved parties resolved again; `None` when
/// nothing changed.
fn re_resolved(
    activity: &EmailActivity,
    settings: &PartySettings,
    store: &dyn Store,
    cache: &mut HashMap<String, AddressResolution>,
) -> Result<Option<EmailActivity>, StoreError> {
    let mut out = activity.clone();
    let mut changed = false;
    let mut sender_update = None;
    for p in out.parties.iter_mut().filter(|p| p.record.is_none()) {
        let res = match cache.get(&p.address) {
            Some(r) => r.clone(),
            None => {
                let r =
                    resolve_address(&p.address, settings, &mut |a| store.records_by_address(a))?;
                cache.insert(p.address.clone(), r.clone());
                r
            }
        };
        if res.record != p.record || res.note != p.note {
            if p.role == PartyRole::From && sender_update.is_none() {
                sender_update = Some(sender_line(Some(&p.address), Some(&res)));
            }
            p.record = res.record;
            p.note = res.note;
            changed = true;
        }
    }
    if !changed {
        return Ok(None);
    }
    if let Some(line) = sender_update {
        match out.reasons.iter_mut().find(|r| r.starts_with("sender ")) {
            Some(r) => *r = format!("{line} (resolved later)"),
            None => out.reasons.push(format!("{line} (resolved later)")),
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CrmSettings;

    fn settings() -> PartySettings {
        CrmSettings::default().parties
    }

    fn rec(kind: &str, id: &str, email: &str) -> Record {
        Record {
            kind: kind.into(),
            id: id.into(),
            name: String::new(),
            emails: vec![email.into()],
            owner: None,
            email_enabled: true,
            user_number: None,
            updated_at: 0,
        }
    }

    #[test]
    fn one_match_resolves() {
        let r = resolve_with(&[rec("contact", "1", "a@x")], &settings());
        assert_eq!(r.record.unwrap().to_string(), "contact:1");
        assert_eq!(r.kind.as_deref(), Some("contact"));
        assert_eq!(r.note, None);
    }

    #[test]
    fn order_decides_between_kinds() {
        let recs = [rec("account", "acc", "a@x"), rec("contact", "c", "a@x")];
        let r = resolve_with(&recs, &settings());
        assert_eq!(r.record.unwrap().to_string(), "contact:c");
        let mut s = settings();
        s.order = vec!["account".into(), "contact".into()];
        assert_eq!(
            resolve_with(&recs, &s).record.unwrap().to_string(),
            "account:acc"
        );
        // The user comes first by default.
        let recs = [rec("lead", "l", "a@x"), rec("user", "u", "a@x")];
        assert_eq!(
            resolve_with(&recs, &settings()).record.unwrap().to_string(),
            "user:u"
        );
    }

    #[test]
    fn a_tie_in_the_first_matching_kind_is_unresolved_with_candidates() {
        let recs = [
            rec("contact", "2", "a@x"),
            rec("contact", "1", "a@x"),
            rec("account", "9", "a@x"),
        ];
        let r = resolve_with(&recs, &settings());
        assert_eq!(r.record, None);
        assert_eq!(r.kind.as_deref(), Some("contact"));
        let note = r.note.unwrap();
        assert!(note.starts_with("tie: 2 contact records"), "{note}");
        assert!(note.ends_with("contact:1, contact:2"), "{note}");
        // A tie in a later kind does not matter when an earlier one has one.
        let recs = [
            rec("user", "u", "a@x"),
            rec("contact", "1", "a@x"),
            rec("contact", "2", "a@x"),
        ];
        assert_eq!(
            resolve_with(&recs, &settings()).record.unwrap().to_string(),
            "user:u"
        );
    }

    #[test]
    fn more_matches_than_the_limit_are_unresolved() {
        let mut s = settings();
        s.max_matches = 3;
        let recs: Vec<Record> = (0..4).map(|i| rec("lead", &i.to_string(), "a@x")).collect();
        let r = resolve_with(&recs, &s);
        assert_eq!((r.record.clone(), r.kind.clone()), (None, None));
        assert!(
            r.note.as_deref().unwrap().contains("4 records"),
            "{:?}",
            r.note
        );
        assert!(r.note.unwrap().contains("lead:0, lead:1, lead:2, lead:3"));
        // At the limit: still resolved (by the user).
        let mut recs = recs[..2].to_vec();
        recs.push(rec("user", "u", "a@x"));
        assert_eq!(
            resolve_with(&recs, &s).record.unwrap().to_string(),
            "user:u"
        );
    }

    #[test]
    fn unknown_and_other_kinds_are_unresolved() {
        let r = resolve_with(&[], &settings());
        assert!(r.unknown && r.record.is_none());
        let r = resolve_with(&[rec("case", "7", "a@x")], &settings());
        assert!(!r.unknown && r.record.is_none());
        assert!(r.note.unwrap().contains("only case:7"));
    }

    #[test]
    fn addresses_compare_case_insensitively_and_each_is_looked_up_once() {
        let parties = party_addresses(
            &["Alice@X.test".into()],
            &["bob@x.test".into(), "BOB@x.test".into()],
            &["alice@x.test".into()],
            &["hidden@x.test".into()],
        );
        assert_eq!(
            parties,
            vec![
                (PartyRole::From, "alice@x.test".into()),
                (PartyRole::To, "bob@x.test".into()),
                (PartyRole::Cc, "alice@x.test".into()),
                (PartyRole::Bcc, "hidden@x.test".into()),
            ]
        );
        let mut asked = Vec::new();
        let directory = [rec("contact", "a", "ALICE@x.test")];
        let got = resolve_parties(&parties, &mut |a: &str| {
            asked.push(a.to_string());
            let hits: Vec<Record> = directory
                .iter()
                .filter(|r| r.emails.iter().any(|e| e.eq_ignore_ascii_case(a)))
                .cloned()
                .collect();
            Ok::<_, ()>(resolve_with(&hits, &settings()))
        })
        .unwrap();
        assert_eq!(asked.len(), 3, "{asked:?}");
        assert_eq!(got[0].record.as_ref().unwrap().to_string(), "contact:a");
        assert_eq!(got[2].record.as_ref().unwrap().to_string(), "contact:a");
        assert_eq!(got[3].role, PartyRole::Bcc);
        assert!(got[1].record.is_none());
    }

    #[test]
    fn auto_created_ids_are_deterministic() {
        assert_eq!(auto_created_id("New@X.test"), auto_created_id("new@x.test"));
        assert_ne!(auto_created_id("a@x.test"), auto_created_id("b@x.test"));
        let r = auto_created_record("lead", "New@X.test");
        assert_eq!(r.emails, vec!["new@x.test".to_string()]);
        assert!(r.reference().is_ok());
    }

    fn activity() -> EmailActivity {
        use crate::model::{CorrelationMethod, Direction, SourceKey};
        EmailActivity {
            id: 1,
            mailbox: "m".into(),
            source: SourceKey {
                mailbox: "m".into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: "1".into(),
            },
            message_ids: vec!["m@x".into()],
            in_reply_to: vec![],
            references: vec![],
            direction: Direction::Incoming,
            subject: "s".into(),
            from: vec!["late@x.test".into()],
            to: vec![],
            cc: vec![],
            sent_at: None,
            received_at: 0,
            regarding: None,
            method: CorrelationMethod::None,
            score: 0.0,
            reasons: vec![],
            correlated_with: None,
            content_hash: "h".into(),
            size: 1,
            also_seen_as: vec![],
            forwarded_by: None,
            automatic: None,
            no_reply: false,
            parties: vec![],
            send: None,
        }
    }

    #[test]
    fn late_resolution_updates_the_activity_with_one_event() {
        use crate::store::{CommitBatch, PendingItem, SledStore};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        let mut a = activity();
        a.parties = vec![Party {
            role: PartyRole::From,
            address: "late@x.test".into(),
            record: None,
            note: Some("no record has this address".into()),
        }];
        a.reasons
            .push("sender late@x.test: unresolved: no record".into());
        store
            .commit(CommitBatch {
                items: vec![PendingItem::Activity(Box::new(a))],
                ..Default::default()
            })
            .unwrap();
        let s = settings();
        assert_eq!(
            resolve_pending(&store, &["late@x.test".into()], &s, 5).unwrap(),
            0
        );
        store
            .upsert_records(vec![rec("contact", "9", "Late@X.test")], &[], None, 5)
            .unwrap();
        assert_eq!(
            resolve_pending(&store, &["LATE@x.test".into()], &s, 6).unwrap(),
            1
        );
        let got = store.activity(1).unwrap().unwrap();
        assert_eq!(
            got.parties[0].record.as_ref().unwrap().to_string(),
            "contact:9"
        );
        assert!(got
            .reasons
            .iter()
            .any(|r| r == "sender late@x.test: contact:9 (resolved later)"));
        let last = store.last_event_seq().unwrap();
        let e = store.event(last).unwrap().unwrap();
        assert_eq!(e.changes, vec!["parties".to_string()]);
        assert!(store
            .activities_with_unresolved("late@x.test")
            .unwrap()
            .is_empty());
        // Nothing left to do: no second event.
        assert_eq!(
            resolve_pending(&store, &["late@x.test".into()], &s, 7).unwrap(),
            0
        );
        assert_eq!(store.last_event_seq().unwrap(), last);
    }
}
