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
