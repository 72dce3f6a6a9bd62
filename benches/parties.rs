//! Party resolution per message (from, to, cc, bcc: four addresses) against
//! a real [`SledStore`] whose directory holds 1,000 and 100,000 records, in
//! one run. The address index makes each lookup one prefix read, so the two
//! lines should be about equal (O(1) in the directory's size).
//!
//! Each iteration takes the next message of a fixed list: the four
//! addresses are a contact, a user, an account (all resolved) and an
//! unknown one, spread over the whole directory so the sled cache is not
//! the only thing read. No batch cache: every address is looked up, as for
//! the first message of a batch.
//!
//! Run: `cargo bench --bench parties -- --warm-up-time 1 --measurement-time 5`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crm_mailsync::config::CrmSettings;
use crm_mailsync::crm::parties;
use crm_mailsync::model::{PartyRole, Record};
use crm_mailsync::store::{SledStore, Store, StoreError};

fn record(kind: &str, id: String, email: String) -> Record {
    Record {
        kind: kind.into(),
        id,
        name: String::new(),
        emails: vec![email],
        owner: None,
        email_enabled: true,
        user_number: None,
        updated_at: 0,
    }
}

/// A store with `n` records: 90 % contacts, 5 % accounts, 5 % users.
fn directory(n: usize) -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("store")).unwrap();
    let mut batch = Vec::new();
    for i in 0..n {
        let r = match i % 20 {
            0 => record("account", format!("a{i}"), format!("info@acct{i}.example")),
            1 => record("user", format!("u{i}"), format!("staff{i}@example.test")),
            _ => record(
                "contact",
                format!("c{i}"),
                format!("contact{i}@customer.example"),
            ),
        };
        batch.push(r);
        if batch.len() == 5_000 {
            store
                .upsert_records(std::mem::take(&mut batch), &[], None, 1)
                .unwrap();
        }
    }
    store.upsert_records(batch, &[], None, 1).unwrap();
    (dir, store)
}

/// 1,000 messages' addresses, spread over a directory of `n` records.
fn messages(n: usize) -> Vec<Vec<(PartyRole, String)>> {
    let mut rng = fastrand::Rng::with_seed(7);
    let of = |rng: &mut fastrand::Rng, rest: usize| rng.usize(..n / 20) * 20 + rest;
    (0..1_000)
        .map(|k| {
            let rest = 2 + rng.usize(..18);
            let contact = of(&mut rng, rest);
            let user = of(&mut rng, 1);
            let account = of(&mut rng, 0);
            parties::party_addresses(
                &[format!("Contact{contact}@Customer.Example")],
                &[format!("staff{user}@example.test")],
                &[format!("info@acct{account}.example")],
                &[format!("stranger{k}@nowhere.example")],
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let settings = CrmSettings::default().parties;
    let mut g = c.benchmark_group("party_resolution_per_message");
    g.throughput(Throughput::Elements(1));
    for n in [1_000usize, 100_000] {
        let (_dir, store) = directory(n);
        assert_eq!(store.count_records(None).unwrap(), n as u64);
        let msgs = messages(n);
        // Every message resolves three of its four parties.
        for m in &msgs[..10] {
            let got = parties::resolve_parties(m, &mut |a: &str| {
                Ok::<_, StoreError>(parties::resolve_for(
                    a,
                    &store.records_by_address(a)?,
                    &settings,
                ))
            })
            .unwrap();
            assert_eq!(got.iter().filter(|p| p.record.is_some()).count(), 3);
        }
        let mut i = 0;
        g.bench_function(format!("{n}_records"), |b| {
            b.iter(|| {
                i = (i + 1) % msgs.len();
                let got = parties::resolve_parties(&msgs[i], &mut |a: &str| {
                    Ok::<_, StoreError>(parties::resolve_for(
                        a,
                        &store.records_by_address(a)?,
                        &settings,
                    ))
                })
                .unwrap();
                black_box(got)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
