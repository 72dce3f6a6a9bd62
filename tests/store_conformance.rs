//! The store conformance suite ([`crm_mailsync::store::conformance`]) for
//! every backend: the embedded sled one (a fresh temp dir per rule,
//! reopened from disk) and the in-memory one. A new backend adds a
//! [`Fixture`] and one `store_conformance_suite!` line here.

use std::time::{Duration, Instant};

use crm_mailsync::store::conformance::{Fixture, MemFixture};
use crm_mailsync::store::{SledBackend, StoreError};

/// A sled store in its own temp dir; reopening opens it from disk again.
struct SledFixture {
    dir: tempfile::TempDir,
}

impl SledFixture {
    fn new() -> Self {
        SledFixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Fixture for SledFixture {
    type Backend = SledBackend;

    /// sled's background flusher thread holds the file lock a moment past
    /// the drop of the previous store, so an immediate reopen can fail with
    /// `Locked` (seen in CI): wait for it, but not forever.
    fn open(&self) -> SledBackend {
        let path = self.dir.path().join("store");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match SledBackend::open(&path, 16) {
                Ok(b) => return b,
                Err(StoreError::Locked(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("open {}: {e}", path.display()),
            }
        }
    }
}

mod sled {
    crm_mailsync::store_conformance_suite!(super::SledFixture::new());
}

mod memory {
    crm_mailsync::store_conformance_suite!(super::MemFixture::default());
}

/// The key layout stays what existing sled stores hold (the semantic layer
/// moved above the backend, the bytes did not): a store written through
/// [`SledStore`] holds exactly these keys in the `crm-mailsync` tree.
#[test]
fn sled_stores_keep_their_key_layout() {
    use crm_mailsync::model::Record;
    use crm_mailsync::store::conformance::{activity, batch, inserted};
    use crm_mailsync::store::kv::{KeyRange, KvBackend, ScanOrder};
    use crm_mailsync::store::{SledStore, Store};

    let fixture = SledFixture::new();
    let path = fixture.dir.path().join("store");
    let id = {
        let s = SledStore::open(&path).unwrap();
        s.set_outbox_consumers(vec!["crm".into()]);
        let id = inserted(
            s.commit(batch(vec![activity("sales", "7", Some("<A@X>"), "h1")]))
                .unwrap()[0],
        );
        s.upsert_records(
            vec![Record {
                kind: "contact".into(),
                id: "c1".into(),
                name: "Ann".into(),
                emails: vec!["Ann@X".into()],
                owner: None,
                email_enabled: true,
                user_number: None,
                updated_at: 0,
            }],
            &[],
            Some(("crm", "cursor")),
            1,
        )
        .unwrap();
        id
    };
    let kv = fixture.open();
    let with_id = |prefix: &[u8], n: u64| [prefix, &n.to_be_bytes()[..]].concat();
    let expected: Vec<Vec<u8>> = vec![
        with_id(b"a/", id),
        with_id(b"am/sales\0", id),
        with_id(b"e/", 1),
        b"h/h1".to_vec(),
        b"m/a@x".to_vec(),
        with_id(b"o/crm\0", 1),
        with_id(b"r/", id),
        b"ra/ann@x\0contact\0c1".to_vec(),
        b"rc/contact\0c1".to_vec(),
        b"rk/crm".to_vec(),
        b"s/sales\0INBOX\x001\x007".to_vec(),
    ];
    let all = KeyRange {
        start: Vec::new(),
        end: None,
    };
    assert_eq!(
        kv.scan_keys(&all, ScanOrder::Ascending, 0).unwrap(),
        expected
    );
    assert_eq!(kv.get(b"m/a@x").unwrap(), Some(id.to_be_bytes().to_vec()));
    assert_eq!(kv.get(b"rk/crm").unwrap(), Some(b"cursor".to_vec()));
}
