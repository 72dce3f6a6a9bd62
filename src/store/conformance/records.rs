//! The record directory: upsert outcomes, the address index, listing and
//! paging, the delta cursor; the unresolved-party index.

use super::{activity, batch, inserted, store, Fixture};
use crate::model::{Party, PartyRole, Record};
use crate::store::{RecordChanges, Store};

fn record(kind: &str, id: &str, emails: &[&str]) -> Record {
    Record {
        kind: kind.into(),
        id: id.into(),
        name: format!("{kind} {id}"),
        emails: emails.iter().map(|e| e.to_string()).collect(),
        owner: None,
        email_enabled: true,
        user_number: None,
        updated_at: 0,
    }
}

fn ids(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| format!("{}:{}", r.kind, r.id))
        .collect()
}

/// Inserted, updated, unchanged and deleted are counted as the batch
/// decides (the last entry for a record wins); `updated_at` moves only on
/// what changed; the address index is case-insensitive and follows an
/// address removed or a record deleted; the cursor is stored with the
/// batch.
pub fn records_upsert_counts_and_keeps_the_address_index<F: Fixture>(f: &F) {
    let s = store(f);
    let changes = s
        .upsert_records(
            vec![
                record(
                    "contact",
                    "1",
                    &["Ann@Customer.example", "ann@home.example"],
                ),
                record("contact", "2", &["bob@customer.example"]),
                record("account", "9", &["info@customer.example", " "]),
            ],
            &[("contact".into(), "nope".into())],
            Some(("dataverse", "token-1")),
            100,
        )
        .unwrap();
    assert_eq!(
        changes,
        RecordChanges {
            inserted: 3,
            ..Default::default()
        }
    );
    assert_eq!(
        s.record_cursor("dataverse").unwrap().as_deref(),
        Some("token-1")
    );
    assert_eq!(s.record_cursor("webhook").unwrap(), None);
    assert_eq!(s.record("contact", "1").unwrap().unwrap().updated_at, 100);
    for probe in [
        "ann@customer.example",
        "ANN@CUSTOMER.EXAMPLE",
        " Ann@customer.Example ",
    ] {
        assert_eq!(
            ids(&s.records_by_address(probe).unwrap()),
            vec!["contact:1"],
            "{probe}"
        );
    }
    assert!(s.records_by_address("").unwrap().is_empty());
    assert!(s
        .records_by_address("ann@customer.exampl")
        .unwrap()
        .is_empty());

    // Same again: unchanged, nothing rewritten. Then an address moves from
    // contact 1 to contact 2, one is deleted, one given twice.
    let again = s
        .upsert_records(
            vec![record(
                "contact",
                "1",
                &["Ann@Customer.example", "ann@home.example"],
            )],
            &[],
            None,
            200,
        )
        .unwrap();
    assert_eq!(again.unchanged, 1);
    assert_eq!(s.record("contact", "1").unwrap().unwrap().updated_at, 100);
    let changes = s
        .upsert_records(
            vec![
                record("contact", "1", &["ann@home.example"]),
                record("contact", "2", &["x@y.example"]),
                record(
                    "contact",
                    "2",
                    &["bob@customer.example", "ann@customer.example"],
                ),
                record("lead", "5", &["ann@customer.example"]),
            ],
            &[("account".into(), "9".into())],
            Some(("dataverse", "token-2")),
            300,
        )
        .unwrap();
    assert_eq!(
        changes,
        RecordChanges {
            inserted: 1,
            updated: 2,
            unchanged: 0,
            deleted: 1,
        }
    );
    assert_eq!(
        s.record_cursor("dataverse").unwrap().as_deref(),
        Some("token-2")
    );
    assert_eq!(
        ids(&s.records_by_address("ann@customer.example").unwrap()),
        vec!["contact:2", "lead:5"],
        "by kind then id, the removed address gone"
    );
    assert_eq!(
        ids(&s.records_by_address("ann@home.example").unwrap()),
        vec!["contact:1"]
    );
    assert!(s.records_by_address("x@y.example").unwrap().is_empty());
    assert!(s
        .records_by_address("info@customer.example")
        .unwrap()
        .is_empty());
    assert!(s.record("account", "9").unwrap().is_none());
    assert_eq!(s.record("contact", "2").unwrap().unwrap().updated_at, 300);
    // A delete and an upsert of the same record in one call: the upsert wins.
    let both = s
        .upsert_records(
            vec![record("lead", "5", &["lead@x.example"])],
            &[("lead".into(), "5".into())],
            None,
            400,
        )
        .unwrap();
    assert_eq!(both.updated, 1);
    assert_eq!(
        ids(&s.records_by_address("lead@x.example").unwrap()),
        vec!["lead:5"]
    );
    drop(s);
    let s = store(f);
    assert_eq!(
        ids(&s.records_by_address("ann@customer.example").unwrap()),
        vec!["contact:2"]
    );
    assert_eq!(
        s.record_cursor("dataverse").unwrap().as_deref(),
        Some("token-2")
    );
}

/// Records list by kind then id, after a `(kind, id)` (exclusive), at most
/// `limit`, of one kind or all; counts agree.
pub fn records_list_by_kind_and_page<F: Fixture>(f: &F) {
    let s = store(f);
    let mut all = Vec::new();
    for kind in ["account", "contact", "contact2"] {
        for id in ["a", "ab", "b"] {
            all.push(record(kind, id, &[]));
        }
    }
    s.upsert_records(all.clone(), &[], None, 1).unwrap();
    let everything = ids(&all);
    assert_eq!(ids(&s.records(None, None, 0).unwrap()), everything);
    assert_eq!(s.count_records(None).unwrap(), 9);
    assert_eq!(
        ids(&s.records(Some("contact"), None, 0).unwrap()),
        vec!["contact:a", "contact:ab", "contact:b"],
        "not contact2"
    );
    assert_eq!(s.count_records(Some("contact")).unwrap(), 3);
    assert_eq!(s.count_records(Some("lead")).unwrap(), 0);
    assert_eq!(
        ids(&s
            .records(Some("contact"), Some(("contact", "a")), 1)
            .unwrap()),
        vec!["contact:ab"]
    );
    assert_eq!(
        ids(&s.records(None, Some(("contact", "b")), 2).unwrap()),
        vec!["contact2:a", "contact2:ab"]
    );
    // Paging through everything, two at a time.
    let mut paged = Vec::new();
    let mut after: Option<(String, String)> = None;
    loop {
        let page = s
            .records(
                None,
                after.as_ref().map(|(k, i)| (k.as_str(), i.as_str())),
                2,
            )
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.kind.clone(), last.id.clone()));
        paged.extend(ids(&page));
    }
    assert_eq!(paged, everything);
    // A cursor of another kind before or after this one.
    assert_eq!(
        ids(&s
            .records(Some("contact"), Some(("account", "zz")), 0)
            .unwrap())
        .len(),
        3
    );
    assert!(s
        .records(Some("account"), Some(("contact", "a")), 0)
        .unwrap()
        .is_empty());
}

/// Activities with an unresolved party are found by its address
/// (case-insensitively), oldest first; resolved parties are not indexed.
pub fn unresolved_parties_are_indexed_by_address<F: Fixture>(f: &F) {
    let s = store(f);
    let party = |address: &str, resolved: bool| Party {
        role: PartyRole::To,
        address: address.into(),
        record: resolved.then(|| "contact:1".parse().unwrap()),
        note: None,
    };
    let mut a = activity("m", "1", Some("a@x"), "h1");
    a.parties = vec![
        party("ann@customer.example", false),
        party("bob@x.example", true),
    ];
    let mut b = activity("m", "2", Some("b@x"), "h2");
    b.parties = vec![party("Ann@Customer.example", false)];
    let out = s.commit(batch(vec![a, b])).unwrap();
    let (a, b) = (inserted(out[0]), inserted(out[1]));
    assert_eq!(
        s.activities_with_unresolved("ANN@customer.example")
            .unwrap(),
        vec![a, b]
    );
    assert!(s
        .activities_with_unresolved("bob@x.example")
        .unwrap()
        .is_empty());
    assert!(s
        .activities_with_unresolved("ann@customer")
        .unwrap()
        .is_empty());
    assert!(s.activities_with_unresolved("").unwrap().is_empty());
    drop(s);
    let s = store(f);
    assert_eq!(
        s.activities_with_unresolved("ann@customer.example")
            .unwrap(),
        vec![a, b]
    );
}
