//! The embedded default backend on sled: one tree, prefixed keys, one
//! `apply_batch` + `flush` per commit.
//!
//! Key layout (ids are big-endian u64 so prefix scans run in id order):
//! `a/<id>` activity JSON · `am/<mailbox>\0<id>` per-mailbox listing ·
//! `s/<source>` source → id · `m/<message-id>` → id · `h/<hash>` → id ·
//! `q/<id>` quarantine JSON · `qs/<source>` → id · `p/<mailbox>\0<folder>` position ·
//! `b/<mailbox>` mailbox state · `l/<id>` alert · `lk/<identity>` → alert id ·
//! `r/<id>` regarding record (JSON, small, so lookups need not load activities) ·
//! `t/<token digits>` → id · `x/<thread-index root>` → id ·
//! `sb/<bucket><id>` smart-matching candidate JSON (newest last in a bucket) ·
//! `sh/<shingle><id>` fingerprint index posting (empty value) ·
//! `sc/<id>` smart-matching candidate JSON of activities with postings ·
//! `f/<source>` follow-up owed on a committed message (JSON) ·
//! `rc/<kind>\0<id>` CRM record (JSON) · `ra/<address>\0<kind>\0<id>` address
//! index (empty) · `rk/<consumer>` record delta cursor ·
//! `e/<seq>` event (JSON) · `o/<consumer>\0<seq>` pending delivery (JSON) ·
//! `od/<consumer>\0<seq>` dead letter (JSON) · `ci/<consumer>\0<activity>` CRM
//! id · `pu/<address>\0<activity>` unresolved party (empty).
//!
//! Regarding records are cached in memory: every correlation lookup needs
//! them and they change only on commit (insert or re-point). So are
//! smart-matching buckets and candidates ([`CandidateCache`]): nearly every
//! incoming reply probes a bucket, and scanning its keys and decoding its
//! candidates' JSON (each carries its body's shingle sample) was about
//! three quarters of a correlation against this store.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    same_email, ActivityQuery, CommitBatch, CommitOutcome, DeliveryOutcome, OutboxStats,
    PendingItem, RecordChanges, Store, StoreError, Tally,
};
use crate::correlate::memindex::MAX_CANDIDATES_PER_BUCKET;
use crate::correlate::{
    shingle_candidate_ids, CandidateData, IndexEntry, Indexes, LookupKeys, SmartCandidate,
    TrackedEmail, MAX_SHINGLE_POSTINGS,
};
use crate::model::{
    ActivityId, Alert, AlertLevel, CorrelationMethod, DeadLetter, DeliveryState, EmailActivity,
    EventKind, FolderPosition, FollowUp, MailboxState, OutboxEvent, QuarantineEntry, Record,
    RecordRef, SourceKey, UnixTime,
};

/// Cached regarding records beyond this count are dropped (and re-read).
const REGARDING_CACHE_MAX: usize = 1 << 20;

/// Cached smart-matching candidates beyond this count are dropped (and
/// re-read): one holds a body's shingle sample, about 1.2 KB, so the cache
/// stays under about 80 MB.
const CANDIDATE_CACHE_MAX: usize = 1 << 16;

/// Cached posting lists beyond this count are dropped (and re-read); one
/// holds at most 32 ids.
const POSTINGS_CACHE_MAX: usize = 1 << 18;

/// The two kinds of posting list correlation reads: a key per member,
/// `<prefix><list><id>`, ids ascending in key order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Postings {
    /// `sb/<bucket><id>`, valued with the candidate's JSON; a lookup takes
    /// the newest [`MAX_CANDIDATES_PER_BUCKET`].
    Bucket,
    /// `sh/<shingle><id>`, empty values; a lookup takes the oldest
    /// [`MAX_SHINGLE_POSTINGS`], as the in-memory index does.
    Shingle,
}

impl Postings {
    /// `<prefix><list>`: the keys of a list's members start with it.
    fn list_prefix(self, list: u64) -> Vec<u8> {
        let mut k = match self {
            Postings::Bucket => b"sb/".to_vec(),
            Postings::Shingle => b"sh/".to_vec(),
        };
        k.extend_from_slice(&list.to_be_bytes());
        k
    }

    fn key(self, list: u64, id: ActivityId) -> Vec<u8> {
        let mut k = self.list_prefix(list);
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    fn limit(self) -> usize {
        match self {
            Postings::Bucket => MAX_CANDIDATES_PER_BUCKET,
            Postings::Shingle => MAX_SHINGLE_POSTINGS,
        }
    }

    /// Adds `id` to a list as read (ascending, at most [`Self::limit`]).
    fn add(self, ids: &mut Vec<ActivityId>, id: ActivityId) {
        // A lookup may have cached the list after the commit's write
        // already, and ids are allocated before commits, so they need not
        // arrive in order.
        let Err(at) = ids.binary_search(&id) else {
            return;
        };
        ids.insert(at, id);
        if ids.len() > self.limit() {
            match self {
                Postings::Bucket => {
                    ids.remove(0);
                }
                Postings::Shingle => {
                    ids.pop();
                }
            }
        }
    }
}

/// Smart-matching data read from the tree, kept for the next lookups.
///
/// A candidate's data never changes once written (its regarding record,
/// which can, comes from the regarding cache), and posting lists only gain
/// members, each on commit: [`Store::commit`] adds them to the cached lists
/// itself. A lookup that read the tree while a commit ran cannot know
/// whether it saw that commit, so it caches what it read only when
/// `generation` (bumped by every commit) did not move meanwhile.
#[derive(Default)]
struct CandidateCache {
    generation: u64,
    data: HashMap<ActivityId, Arc<CandidateData>>,
    /// What a lookup reads of a posting list (empty: no member).
    postings: HashMap<(Postings, u64), Vec<ActivityId>>,
}

impl CandidateCache {
    fn put_data(&mut self, id: ActivityId, data: Arc<CandidateData>) {
        if self.data.len() >= CANDIDATE_CACHE_MAX {
            self.data.clear();
        }
        self.data.insert(id, data);
    }

    /// Caches a posting list as read at generation `read_at`.
    fn put_postings(&mut self, list: (Postings, u64), ids: Vec<ActivityId>, read_at: u64) {
        if read_at != self.generation {
            return;
        }
        if self.postings.len() >= POSTINGS_CACHE_MAX {
            self.postings.clear();
        }
        self.postings.insert(list, ids);
    }

    /// What a commit wrote for `e`: its data, and its id in the cached
    /// lists it joins (a list not cached is read whole when asked for).
    fn committed(&mut self, e: &IndexEntry) {
        self.put_data(e.activity, e.candidate.data.clone());
        let lists = (e.buckets.iter().map(|b| (Postings::Bucket, *b)))
            .chain(e.shingle_keys.iter().map(|h| (Postings::Shingle, *h)));
        for list in lists {
            if let Some(ids) = self.postings.get_mut(&list) {
                list.0.add(ids, e.activity);
            }
        }
    }
}

/// sled-backed [`Store`].
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    /// Serialises writers so deduplication reads and the batch they produce are
    /// one critical section. Never held across an await (the trait is blocking).
    write_lock: Mutex<()>,
    regarding_cache: Mutex<HashMap<ActivityId, Option<RecordRef>>>,
    candidate_cache: Mutex<CandidateCache>,
    /// Consumers that get a pending delivery per new event.
    consumers: Mutex<Vec<String>>,
    /// The newest event seq, sent after every commit that appended events.
    events_tx: tokio::sync::watch::Sender<u64>,
}

fn io(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(ioe)
            if ioe.kind() == std::io::ErrorKind::WouldBlock || ioe.to_string().contains("lock") =>
        {
            StoreError::Locked(ioe.to_string())
        }
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Io(other.to_string()),
    }
}

fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| {
        StoreError::Corrupt(format!("value at {:?}: {e}", String::from_utf8_lossy(key)))
    })
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

fn key(prefix: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn source_bytes(s: &SourceKey) -> Vec<u8> {
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

fn id_key(prefix: &str, id: u64) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn read_id(v: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("bad id of {} bytes", v.len())))?;
    Ok(u64::from_be_bytes(arr))
}

/// `al/<mailbox>\0<pair>\0`: the loop detector's marks, then the time
/// (sign bit flipped, so negative times sort first) and the activity id.
fn automatic_prefix(mailbox: &str, pair: &str) -> Vec<u8> {
    key("al/", &[mailbox.as_bytes(), pair.as_bytes(), b""])
}

fn sortable_time(t: UnixTime) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

fn now() -> UnixTime {
    chrono::Utc::now().timestamp()
}

fn last_seq_of(tree: &sled::Tree) -> Result<u64, StoreError> {
    match tree.scan_prefix(b"e/").keys().next_back() {
        Some(k) => read_id(&k.map_err(io)?[2..]),
        None => Ok(0),
    }
}

/// `<prefix><consumer>\0<n>`.
fn consumer_key(prefix: &str, consumer: &str, n: u64) -> Vec<u8> {
    let mut k = key(prefix, &[consumer.as_bytes(), b""]);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn record_key(kind: &str, id: &str) -> Vec<u8> {
    key("rc/", &[kind.as_bytes(), id.as_bytes()])
}

/// Lower-cased, trimmed: how the directory and parties compare addresses.
fn normalize_address(a: &str) -> String {
    a.trim().to_lowercase()
}

fn address_key(address: &str, kind: &str, id: &str) -> Vec<u8> {
    key("ra/", &[address.as_bytes(), kind.as_bytes(), id.as_bytes()])
}

fn record_addresses(r: &Record) -> std::collections::BTreeSet<String> {
    r.emails
        .iter()
        .map(|e| normalize_address(e))
        .filter(|e| !e.is_empty())
        .collect()
}

fn unresolved_key(address: &str, id: ActivityId) -> Vec<u8> {
    let mut k = key("pu/", &[address.as_bytes(), b""]);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn unresolved_addresses(a: &EmailActivity) -> std::collections::BTreeSet<String> {
    a.parties
        .iter()
        .filter(|p| p.record.is_none() && !p.address.is_empty())
        .map(|p| normalize_address(&p.address))
        .collect()
}

fn mid_key(id: &str) -> Vec<u8> {
    key(
        "m/",
        &[crate::correlate::normalize_message_id(id).as_bytes()],
    )
}

impl SledStore {
    /// Opens (creating if needed) the store at `path`, with the default page
    /// cache ([`crate::config::DEFAULT_STORE_CACHE_MB`]).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache_mb(path, crate::config::DEFAULT_STORE_CACHE_MB)
    }

    /// Opens (creating if needed) the store at `path` with a page cache of
    /// `cache_mb` MiB (sled's own default, 1 GiB, is far too much beside other
    /// services). A directory it creates is 0700 whatever the umask.
    pub fn open_with_cache_mb(path: &Path, cache_mb: u64) -> Result<Self, StoreError> {
        crate::private_fs::create_dir_all(path)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", path.display())))?;
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(cache_mb.saturating_mul(1024 * 1024))
            .open()
            .map_err(io)?;
        let tree = db.open_tree("crm-mailsync").map_err(io)?;
        let last_seq = last_seq_of(&tree)?;
        Ok(SledStore {
            db,
            tree,
            write_lock: Mutex::new(()),
            regarding_cache: Mutex::new(HashMap::new()),
            candidate_cache: Mutex::new(CandidateCache::default()),
            consumers: Mutex::new(Vec::new()),
            events_tx: tokio::sync::watch::Sender::new(last_seq),
        })
    }

    fn consumer_list(&self) -> Vec<String> {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds the events of `changed` (activity, kind, changes, as this batch
    /// leaves it) to `b`, numbered after `last`, with a pending delivery per
    /// consumer and the unresolved-party index. Returns the newest seq.
    fn stage_events(
        &self,
        b: &mut sled::Batch,
        last: u64,
        changed: Vec<(EmailActivity, EventKind, Vec<String>)>,
        previous: &HashMap<u64, EmailActivity>,
    ) -> Result<u64, StoreError> {
        let consumers = self.consumer_list();
        let at = now();
        let mut seq = last;
        for (activity, kind, changes) in changed {
            seq += 1;
            if let Some(old) = previous.get(&activity.id) {
                for addr in unresolved_addresses(old) {
                    b.remove(unresolved_key(&addr, activity.id));
                }
            }
            for addr in unresolved_addresses(&activity) {
                b.insert(unresolved_key(&addr, activity.id), Vec::new());
            }
            let state = DeliveryState {
                seq,
                activity_id: activity.id,
                queued_at: at,
                attempts: 0,
                next_attempt_at: at,
                last_error: None,
            };
            let event = OutboxEvent {
                seq,
                id: OutboxEvent::id_for(seq),
                kind,
                activity_id: activity.id,
                changes,
                at,
                activity,
            };
            b.insert(id_key("e/", seq), encode(&event)?);
            for c in &consumers {
                b.insert(consumer_key("o/", c, seq), encode(&state)?);
            }
        }
        Ok(seq)
    }

    fn last_seq(&self) -> Result<u64, StoreError> {
        last_seq_of(&self.tree)
    }

    fn get_id(&self, k: &[u8]) -> Result<Option<u64>, StoreError> {
        self.tree
            .get(k)
            .map_err(io)?
            .map(|v| read_id(&v))
            .transpose()
    }

    fn get_json<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StoreError> {
        self.tree
            .get(k)
            .map_err(io)?
            .map(|v| decode(k, &v))
            .transpose()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic while holding the lock cannot leave sled half-written (the batch
        // is applied atomically or not at all), so a poisoned lock is safe to reuse.
        self.write_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The regarding record of an activity: cache, then `r/`, then the
    /// activity itself (stores written before `r/` existed).
    fn regarding_of(&self, id: ActivityId) -> Result<Option<Option<RecordRef>>, StoreError> {
        if let Some(r) = self
            .regarding_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Some(r.clone()));
        }
        let r = match self.get_json::<Option<RecordRef>>(&id_key("r/", id))? {
            Some(r) => r,
            None => match self.activity(id)? {
                Some(a) => a.regarding,
                None => return Ok(None),
            },
        };
        self.cache_regarding(std::iter::once((id, r.clone())));
        Ok(Some(r))
    }

    fn cache_regarding(&self, entries: impl Iterator<Item = (ActivityId, Option<RecordRef>)>) {
        let mut cache = self
            .regarding_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cache.len() > REGARDING_CACHE_MAX {
            cache.clear();
        }
        cache.extend(entries);
    }

    fn candidates(&self) -> MutexGuard<'_, CandidateCache> {
        // Entries are inserted whole, so a poisoned cache is still consistent.
        self.candidate_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// What a lookup reads of a posting list ([`Postings`]): cached, or
    /// read from its keys (values unread) and cached.
    fn posting_ids(&self, kind: Postings, list: u64) -> Result<Vec<ActivityId>, StoreError> {
        let read_at = {
            let cache = self.candidates();
            if let Some(ids) = cache.postings.get(&(kind, list)) {
                return Ok(ids.clone());
            }
            cache.generation
        };
        let prefix = kind.list_prefix(list);
        let keys = self.tree.scan_prefix(&prefix).keys();
        let read = |k: Result<sled::IVec, sled::Error>| read_id(&k.map_err(io)?[prefix.len()..]);
        let ids = match kind {
            Postings::Bucket => {
                let mut ids = keys
                    .rev()
                    .take(kind.limit())
                    .map(read)
                    .collect::<Result<Vec<_>, _>>()?;
                ids.reverse();
                ids
            }
            Postings::Shingle => keys
                .take(kind.limit())
                .map(read)
                .collect::<Result<Vec<_>, _>>()?,
        };
        self.candidates()
            .put_postings((kind, list), ids.clone(), read_at);
        Ok(ids)
    }

    /// A candidate's data: cached, or decoded from the entry at `key` (its
    /// `sb/` or `sc/` one) and cached. Data never changes once written, so
    /// what was read is right whenever it is cached.
    fn candidate_data(
        &self,
        id: ActivityId,
        key: impl FnOnce() -> Vec<u8>,
    ) -> Result<Option<Arc<CandidateData>>, StoreError> {
        if let Some(d) = self.candidates().data.get(&id) {
            return Ok(Some(d.clone()));
        }
        let Some(c) = self.get_json::<SmartCandidate>(&key())? else {
            return Ok(None);
        };
        self.candidates().put_data(id, c.data.clone());
        Ok(Some(c.data))
    }

    /// The tracked email known under a Message-ID.
    fn tracked_by_message_id(&self, id: &str) -> Result<Option<TrackedEmail>, StoreError> {
        match self.get_id(&mid_key(id))? {
            Some(aid) => self.tracked(aid),
            None => Ok(None),
        }
    }

    fn tracked(&self, id: ActivityId) -> Result<Option<TrackedEmail>, StoreError> {
        Ok(self.regarding_of(id)?.map(|regarding| TrackedEmail {
            activity: id,
            regarding,
        }))
    }

    /// Ids start at 1: 0 means "not assigned yet" in a [`PendingItem`].
    fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id().map_err(io)? + 1)
    }

    fn durable(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(io)?;
        Ok(())
    }
}

/// Pending view of a batch under construction, so later items see earlier ones.
#[derive(Default)]
struct Overlay {
    sources: HashMap<Vec<u8>, u64>,
    quarantine_sources: HashMap<Vec<u8>, u64>,
    message_ids: HashMap<Vec<u8>, u64>,
    hashes: HashMap<Vec<u8>, u64>,
    activities: HashMap<u64, EmailActivity>,
    /// Activities this batch touched, in the order it first did, with what
    /// changed (`None`: inserted by this batch).
    touched: Vec<(u64, Option<std::collections::BTreeSet<String>>)>,
    /// Stored versions of activities this batch changed, as before it.
    previous: HashMap<u64, EmailActivity>,
    quarantine_rows: Vec<(u64, Vec<u8>)>,
    /// Thread-Index root keys written by this batch (first writer wins).
    thread_roots: Vec<Vec<u8>>,
}

impl Store for SledStore {
    fn commit(&self, batch: CommitBatch) -> Result<Vec<CommitOutcome>, StoreError> {
        let _guard = self.lock();
        let mut ov = Overlay::default();
        let mut outcomes = Vec::with_capacity(batch.items.len());
        for item in batch.items {
            match item {
                PendingItem::Activity(a) => outcomes.push(self.stage_activity(*a, &mut ov)?),
                PendingItem::Quarantine(mut q) => {
                    let sk = key("qs/", &[&source_bytes(&q.source)]);
                    if let Some(id) = ov
                        .quarantine_sources
                        .get(&sk)
                        .copied()
                        .map_or_else(|| self.get_id(&sk), |i| Ok(Some(i)))?
                    {
                        outcomes.push(CommitOutcome::Quarantined(id));
                        continue;
                    }
                    q.id = self.next_id()?;
                    ov.quarantine_sources.insert(sk, q.id);
                    outcomes.push(CommitOutcome::Quarantined(q.id));
                    ov.quarantine_rows.push((q.id, encode(&q)?));
                }
            }
        }
        let mut b = sled::Batch::default();
        for (k, id) in &ov.sources {
            b.insert(k.clone(), id.to_be_bytes().to_vec());
        }
        for (k, id) in &ov.quarantine_sources {
            b.insert(k.clone(), id.to_be_bytes().to_vec());
        }
        for (k, id) in &ov.message_ids {
            b.insert(k.clone(), id.to_be_bytes().to_vec());
        }
        for (k, id) in &ov.hashes {
            b.insert(k.clone(), id.to_be_bytes().to_vec());
        }
        let inserted: std::collections::HashSet<u64> = outcomes
            .iter()
            .filter_map(|o| match o {
                CommitOutcome::Inserted(id) => Some(*id),
                _ => None,
            })
            .collect();
        for e in batch
            .index
            .iter()
            .filter(|e| inserted.contains(&e.activity))
        {
            let id = e.activity.to_be_bytes().to_vec();
            // Counters wrap, so the newest carrier of a token wins.
            for d in &e.token_digits {
                b.insert(key("t/", &[d.as_bytes()]), id.clone());
            }
            if let Some(root) = &e.thread_root {
                let k = key("x/", &[root.as_bytes()]);
                if self.tree.get(&k).map_err(io)?.is_none() && !ov.thread_roots.contains(&k) {
                    ov.thread_roots.push(k.clone());
                    b.insert(k, id.clone());
                }
            }
            let mut c = e.candidate.clone();
            c.regarding = None;
            let c = encode(&c)?;
            for bucket in &e.buckets {
                b.insert(Postings::Bucket.key(*bucket, e.activity), c.clone());
            }
            for h in &e.shingle_keys {
                b.insert(Postings::Shingle.key(*h, e.activity), Vec::new());
            }
            if !e.shingle_keys.is_empty() {
                b.insert(id_key("sc/", e.activity), c);
            }
        }
        for m in batch
            .automatic
            .iter()
            .filter(|m| inserted.contains(&m.activity))
        {
            let mut k = automatic_prefix(&m.mailbox, &m.pair);
            k.extend_from_slice(&sortable_time(m.at));
            k.extend_from_slice(&m.activity.to_be_bytes());
            b.insert(k, Vec::new());
        }
        let mut changed = Vec::new();
        for (id, how) in &ov.touched {
            let Some(a) = ov.activities.get(id) else {
                continue;
            };
            match how {
                None => changed.push((a.clone(), EventKind::ActivityCreated, Vec::new())),
                Some(what) => changed.push((
                    a.clone(),
                    EventKind::ActivityUpdated,
                    what.iter().cloned().collect(),
                )),
            }
        }
        let last_seq = self.last_seq()?;
        let new_seq = self.stage_events(&mut b, last_seq, changed, &ov.previous)?;
        for (id, a) in &ov.activities {
            b.insert(id_key("r/", *id), encode(&a.regarding)?);
            b.insert(id_key("a/", *id), encode(a)?);
            // Listed under every mailbox it was delivered to.
            for mailbox in a.mailboxes() {
                let mut am = key("am/", &[mailbox.as_bytes(), b""]);
                am.extend_from_slice(&id.to_be_bytes());
                b.insert(am, Vec::new());
            }
        }
        for (id, row) in ov.quarantine_rows {
            b.insert(id_key("q/", id), row);
        }
        for (mailbox, folder, pos) in &batch.positions {
            b.insert(
                key("p/", &[mailbox.as_bytes(), folder.as_bytes()]),
                encode(pos)?,
            );
        }
        if let Some(mut state) = batch.mailbox_state {
            Tally::of(&outcomes).add_to(&mut state);
            b.insert(key("b/", &[state.name.as_bytes()]), encode(&state)?);
        }
        for source in &batch.follow_ups_done {
            b.remove(key("f/", &[&source_bytes(source)]));
        }
        for f in &batch.follow_ups {
            b.insert(key("f/", &[&source_bytes(&f.source)]), encode(f)?);
        }
        self.tree.apply_batch(b).map_err(io)?;
        // Reads see the batch from here on, durable or not, so the caches
        // must too (a failed flush below must not leave a cached list
        // without what the tree now holds).
        {
            let mut cache = self.candidates();
            cache.generation += 1;
            for e in batch
                .index
                .iter()
                .filter(|e| inserted.contains(&e.activity))
            {
                cache.committed(e);
            }
        }
        self.cache_regarding(ov.activities.into_iter().map(|(id, a)| (id, a.regarding)));
        self.durable()?;
        if new_seq != last_seq {
            self.events_tx.send_replace(new_seq);
        }
        Ok(outcomes)
    }

    fn allocate_id(&self) -> Result<ActivityId, StoreError> {
        self.next_id()
    }

    fn is_seen(&self, source: &SourceKey) -> Result<bool, StoreError> {
        let sb = source_bytes(source);
        Ok(self.tree.contains_key(key("s/", &[&sb])).map_err(io)?
            || self.tree.contains_key(key("qs/", &[&sb])).map_err(io)?)
    }

    fn tracked_by_message_ids(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, TrackedEmail>, StoreError> {
        let mut out = HashMap::new();
        for id in ids {
            if let Some(t) = self.tracked_by_message_id(id)? {
                out.insert(crate::correlate::normalize_message_id(id), t);
            }
        }
        Ok(out)
    }

    fn lookup_into(&self, keys: &LookupKeys, idx: &mut Indexes<'_>) -> Result<(), StoreError> {
        // Found by `lookup_keys` already; the token method reuses them.
        idx.derived = Some(keys.derived.clone());
        // In order, up to the first tracked one (see `LookupKeys`): a long
        // References chain costs one read when In-Reply-To is tracked.
        for id in &keys.message_ids {
            if let Some(t) = self.tracked_by_message_id(id)? {
                idx.by_message_id.entry(id.clone()).or_insert(t);
                break;
            }
        }
        for d in &keys.token_digits {
            if let Some(aid) = self.get_id(&key("t/", &[d.as_bytes()]))? {
                if let Some(t) = self.tracked(aid)? {
                    idx.by_token.insert(d.clone(), t);
                }
            }
        }
        if let Some(root) = &keys.thread_root {
            if let Some(aid) = self.get_id(&key("x/", &[root.as_bytes()]))? {
                if let Some(t) = self.tracked(aid)? {
                    idx.by_thread_root.insert(root.clone(), t);
                }
            }
        }
        for bucket in &keys.buckets {
            let ids = self.posting_ids(Postings::Bucket, *bucket)?;
            // Ids grow with time: newest first, as the tree scan gave them.
            for aid in ids.into_iter().rev() {
                if idx.candidates.iter().any(|x| x.activity == aid) {
                    continue;
                }
                let Some(data) = self.candidate_data(aid, || Postings::Bucket.key(*bucket, aid))?
                else {
                    continue;
                };
                idx.candidates.push(SmartCandidate {
                    activity: aid,
                    regarding: self.regarding_of(aid)?.flatten(),
                    data,
                });
            }
        }
        for h in &keys.shingles {
            let mut postings = Vec::new();
            for aid in self.posting_ids(Postings::Shingle, *h)? {
                if let Some(t) = self.tracked(aid)? {
                    postings.push(t);
                }
            }
            if !postings.is_empty() {
                idx.by_shingle.insert(*h, postings);
            }
        }
        for (aid, _) in shingle_candidate_ids(&idx.by_shingle) {
            if idx.candidates.iter().any(|x| x.activity == aid) {
                continue;
            }
            if let Some(data) = self.candidate_data(aid, || id_key("sc/", aid))? {
                idx.candidates.push(SmartCandidate {
                    activity: aid,
                    regarding: self.regarding_of(aid)?.flatten(),
                    data,
                });
            }
        }
        Ok(())
    }

    fn automatic_since(
        &self,
        mailbox: &str,
        pair: &str,
        since: UnixTime,
        max: usize,
    ) -> Result<usize, StoreError> {
        let prefix = automatic_prefix(mailbox, pair);
        let mut from = prefix.clone();
        from.extend_from_slice(&sortable_time(since));
        let mut n = 0;
        for kv in self.tree.range(from..) {
            let (k, _) = kv.map_err(io)?;
            if !k.starts_with(&prefix) || n >= max {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn activity(&self, id: ActivityId) -> Result<Option<EmailActivity>, StoreError> {
        self.get_json(&id_key("a/", id))
    }

    fn activities(&self, q: &ActivityQuery) -> Result<Vec<EmailActivity>, StoreError> {
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let mut out = Vec::new();
        match &q.mailbox {
            Some(m) => {
                let prefix = key("am/", &[m.as_bytes(), b""]);
                for kv in self.tree.scan_prefix(&prefix).rev() {
                    let (k, _) = kv.map_err(io)?;
                    let id = read_id(&k[prefix.len()..])?;
                    if q.before.is_some_and(|b| id >= b) {
                        continue;
                    }
                    if let Some(a) = self.activity(id)? {
                        out.push(a);
                    }
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            None => {
                let end = id_key("a/", q.before.unwrap_or(u64::MAX));
                for kv in self.tree.range(b"a/".to_vec()..end).rev() {
                    let (k, v) = kv.map_err(io)?;
                    out.push(decode(&k, &v)?);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    fn count_activities(&self, mailbox: Option<&str>) -> Result<u64, StoreError> {
        let prefix = match mailbox {
            Some(m) => key("am/", &[m.as_bytes(), b""]),
            None => b"a/".to_vec(),
        };
        let mut n = 0;
        for kv in self.tree.scan_prefix(prefix).keys() {
            kv.map_err(io)?;
            n += 1;
        }
        Ok(n)
    }

    fn quarantined(&self, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(b"q/").rev().take(limit.max(1)) {
            let (k, v) = kv.map_err(io)?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    fn folder_positions(
        &self,
        mailbox: &str,
    ) -> Result<HashMap<String, FolderPosition>, StoreError> {
        let prefix = key("p/", &[mailbox.as_bytes(), b""]);
        let mut out = HashMap::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(io)?;
            let folder = String::from_utf8_lossy(&k[prefix.len()..]).to_string();
            out.insert(folder, decode(&k, &v)?);
        }
        Ok(out)
    }

    fn mailbox_state(&self, mailbox: &str) -> Result<Option<MailboxState>, StoreError> {
        self.get_json(&key("b/", &[mailbox.as_bytes()]))
    }

    fn follow_ups(&self, mailbox: &str) -> Result<Vec<FollowUp>, StoreError> {
        let prefix = key("f/", &[mailbox.as_bytes(), b""]);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(io)?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    fn put_mailbox_state(&self, state: &MailboxState) -> Result<(), StoreError> {
        let _guard = self.lock();
        self.tree
            .insert(key("b/", &[state.name.as_bytes()]), encode(state)?)
            .map_err(io)?;
        self.durable()
    }

    fn raise_alert(
        &self,
        level: AlertLevel,
        mailbox: Option<&str>,
        profile: Option<&str>,
        text: &str,
        at: UnixTime,
    ) -> Result<Alert, StoreError> {
        let _guard = self.lock();
        let ident = alert_identity(level, mailbox, profile, text);
        let alert = match self.get_id(&ident)? {
            Some(id) => match self.get_json::<Alert>(&id_key("l/", id))? {
                Some(mut a) => {
                    a.count += 1;
                    a.last_seen = at;
                    a
                }
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "alert {id} is indexed but missing"
                    )))
                }
            },
            None => Alert {
                id: self.next_id()?,
                level,
                mailbox: mailbox.map(str::to_string),
                profile: profile.map(str::to_string),
                text: text.to_string(),
                first_seen: at,
                last_seen: at,
                count: 1,
                resolved_at: None,
            },
        };
        let mut b = sled::Batch::default();
        b.insert(ident, alert.id.to_be_bytes().to_vec());
        b.insert(id_key("l/", alert.id), encode(&alert)?);
        self.tree.apply_batch(b).map_err(io)?;
        self.durable()?;
        Ok(alert)
    }

    fn alerts(&self, limit: usize) -> Result<Vec<Alert>, StoreError> {
        let mut all = Vec::new();
        for kv in self.tree.scan_prefix(b"l/") {
            let (k, v) = kv.map_err(io)?;
            all.push(decode::<Alert>(&k, &v)?);
        }
        all.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(b.id.cmp(&a.id)));
        all.truncate(limit.max(1));
        Ok(all)
    }

    fn resolve_alerts(&self, mailbox: &str, prefix: &str, at: UnixTime) -> Result<u64, StoreError> {
        let _guard = self.lock();
        let mut b = sled::Batch::default();
        let mut resolved = 0u64;
        for kv in self.tree.scan_prefix(b"l/") {
            let (k, v) = kv.map_err(io)?;
            let mut a = decode::<Alert>(&k, &v)?;
            if a.resolved_at.is_some()
                || a.mailbox.as_deref() != Some(mailbox)
                || !a.text.starts_with(prefix)
            {
                continue;
            }
            a.resolved_at = Some(at);
            // Unlinked from its identity: the next identical alert is a new one.
            b.remove(alert_identity(
                a.level,
                a.mailbox.as_deref(),
                a.profile.as_deref(),
                &a.text,
            ));
            b.insert(k, encode(&a)?);
            resolved += 1;
        }
        if resolved > 0 {
            self.tree.apply_batch(b).map_err(io)?;
            self.durable()?;
        }
        Ok(resolved)
    }

    fn upsert_records(
        &self,
        records: Vec<Record>,
        deleted: &[(String, String)],
        cursor: Option<(&str, &str)>,
        at: UnixTime,
    ) -> Result<RecordChanges, StoreError> {
        let _guard = self.lock();
        let mut b = sled::Batch::default();
        let mut changes = RecordChanges::default();
        // Later entries for the same record win, as in a file read top down.
        let mut staged: HashMap<Vec<u8>, Option<Record>> = HashMap::new();
        let mut order = Vec::new();
        for (kind, id) in deleted {
            let k = record_key(kind, id);
            if !staged.contains_key(&k) {
                order.push(k.clone());
            }
            staged.insert(k, None);
        }
        for r in records {
            let k = record_key(&r.kind, &r.id);
            if !staged.contains_key(&k) {
                order.push(k.clone());
            }
            staged.insert(k, Some(r));
        }
        for k in order {
            let Some(new) = staged.remove(&k) else {
                continue;
            };
            let old: Option<Record> = self.get_json(&k)?;
            match (old, new) {
                (None, None) => {}
                (Some(old), None) => {
                    for a in record_addresses(&old) {
                        b.remove(address_key(&a, &old.kind, &old.id));
                    }
                    b.remove(k);
                    changes.deleted += 1;
                }
                (old, Some(mut new)) => {
                    if let Some(o) = &old {
                        let mut same = new.clone();
                        same.updated_at = o.updated_at;
                        if &same == o {
                            changes.unchanged += 1;
                            continue;
                        }
                        let keep = record_addresses(&new);
                        for a in record_addresses(o).difference(&keep) {
                            b.remove(address_key(a, &o.kind, &o.id));
                        }
                        changes.updated += 1;
                    } else {
                        changes.inserted += 1;
                    }
                    for a in record_addresses(&new) {
                        b.insert(address_key(&a, &new.kind, &new.id), Vec::new());
                    }
                    new.updated_at = at;
                    b.insert(k, encode(&new)?);
                }
            }
        }
        if let Some((consumer, c)) = cursor {
            b.insert(key("rk/", &[consumer.as_bytes()]), c.as_bytes().to_vec());
        }
        self.tree.apply_batch(b).map_err(io)?;
        self.durable()?;
        Ok(changes)
    }

    fn record(&self, kind: &str, id: &str) -> Result<Option<Record>, StoreError> {
        self.get_json(&record_key(kind, id))
    }

    fn records_by_address(&self, address: &str) -> Result<Vec<Record>, StoreError> {
        let a = normalize_address(address);
        if a.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = key("ra/", &[a.as_bytes(), b""]);
        let mut out = Vec::new();
        for k in self.tree.scan_prefix(&prefix).keys() {
            let k = k.map_err(io)?;
            let rest = &k[prefix.len()..];
            let Some(z) = rest.iter().position(|b| *b == 0) else {
                return Err(StoreError::Corrupt("address index key without kind".into()));
            };
            let kind = String::from_utf8_lossy(&rest[..z]);
            let id = String::from_utf8_lossy(&rest[z + 1..]);
            if let Some(r) = self.record(&kind, &id)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn records(
        &self,
        kind: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let prefix = match kind {
            Some(k) => key("rc/", &[k.as_bytes(), b""]),
            None => b"rc/".to_vec(),
        };
        let start = match after {
            Some((k, id)) => {
                let mut s = record_key(k, id);
                // Just past it.
                s.push(0);
                s.max(prefix.clone())
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for kv in self.tree.range(start..) {
            let (k, v) = kv.map_err(io)?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    fn count_records(&self, kind: Option<&str>) -> Result<u64, StoreError> {
        let prefix = match kind {
            Some(k) => key("rc/", &[k.as_bytes(), b""]),
            None => b"rc/".to_vec(),
        };
        let mut n = 0;
        for k in self.tree.scan_prefix(prefix).keys() {
            k.map_err(io)?;
            n += 1;
        }
        Ok(n)
    }

    fn record_cursor(&self, consumer: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .get(key("rk/", &[consumer.as_bytes()]))
            .map_err(io)?
            .map(|v| String::from_utf8_lossy(&v).to_string()))
    }

    fn activities_with_unresolved(&self, address: &str) -> Result<Vec<ActivityId>, StoreError> {
        let prefix = key("pu/", &[normalize_address(address).as_bytes(), b""]);
        let mut out = Vec::new();
        for k in self.tree.scan_prefix(&prefix).keys() {
            out.push(read_id(&k.map_err(io)?[prefix.len()..])?);
        }
        Ok(out)
    }

    fn set_outbox_consumers(&self, consumers: Vec<String>) {
        *self.consumers.lock().unwrap_or_else(|p| p.into_inner()) = consumers;
    }

    fn update_activity(
        &self,
        activity: EmailActivity,
        changes: Vec<String>,
        at: UnixTime,
    ) -> Result<Option<u64>, StoreError> {
        let _ = at;
        let _guard = self.lock();
        let id = activity.id;
        let Some(old) = self.activity(id)? else {
            return Ok(None);
        };
        let mut b = sled::Batch::default();
        b.insert(id_key("r/", id), encode(&activity.regarding)?);
        b.insert(id_key("a/", id), encode(&activity)?);
        for mailbox in activity.mailboxes() {
            let mut am = key("am/", &[mailbox.as_bytes(), b""]);
            am.extend_from_slice(&id.to_be_bytes());
            b.insert(am, Vec::new());
        }
        let last = self.last_seq()?;
        let regarding = activity.regarding.clone();
        let previous = HashMap::from([(id, old)]);
        let seq = self.stage_events(
            &mut b,
            last,
            vec![(activity, EventKind::ActivityUpdated, changes)],
            &previous,
        )?;
        self.tree.apply_batch(b).map_err(io)?;
        self.cache_regarding(std::iter::once((id, regarding)));
        self.durable()?;
        self.events_tx.send_replace(seq);
        Ok(Some(seq))
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut out = Vec::new();
        for kv in self.tree.range(id_key("e/", after.saturating_add(1))..) {
            let (k, v) = kv.map_err(io)?;
            if !k.starts_with(b"e/") || out.len() >= limit {
                break;
            }
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    fn event(&self, seq: u64) -> Result<Option<OutboxEvent>, StoreError> {
        self.get_json(&id_key("e/", seq))
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.last_seq()
    }

    fn watch_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_tx.subscribe()
    }

    fn pending_deliveries(
        &self,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeliveryState>, StoreError> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let prefix = key("o/", &[consumer.as_bytes(), b""]);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix).take(limit) {
            let (k, v) = kv.map_err(io)?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    fn finish_delivery(&self, consumer: &str, outcome: DeliveryOutcome) -> Result<(), StoreError> {
        let _guard = self.lock();
        let mut b = sled::Batch::default();
        match outcome {
            DeliveryOutcome::Delivered {
                seq,
                activity_id,
                crm_id,
            } => {
                b.remove(consumer_key("o/", consumer, seq));
                if let Some(c) = crm_id {
                    b.insert(consumer_key("ci/", consumer, activity_id), c.into_bytes());
                }
            }
            DeliveryOutcome::Retry(state) => {
                let k = consumer_key("o/", consumer, state.seq);
                // Delivered meanwhile (another worker, a replay): keep it gone.
                if self.tree.contains_key(&k).map_err(io)? {
                    b.insert(k, encode(&state)?);
                }
            }
            DeliveryOutcome::DeadLetter(dead) => {
                b.remove(consumer_key("o/", consumer, dead.state.seq));
                b.insert(
                    consumer_key("od/", consumer, dead.state.seq),
                    encode(&dead)?,
                );
            }
        }
        self.tree.apply_batch(b).map_err(io)?;
        self.durable()
    }

    fn crm_id(&self, consumer: &str, activity: ActivityId) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .get(consumer_key("ci/", consumer, activity))
            .map_err(io)?
            .map(|v| String::from_utf8_lossy(&v).to_string()))
    }

    fn outbox_stats(&self, consumer: &str) -> Result<OutboxStats, StoreError> {
        let prefix = key("o/", &[consumer.as_bytes(), b""]);
        let mut stats = OutboxStats::default();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(io)?;
            if stats.depth == 0 {
                stats.oldest_queued_at = Some(decode::<DeliveryState>(&k, &v)?.queued_at);
            }
            stats.depth += 1;
        }
        let dprefix = key("od/", &[consumer.as_bytes(), b""]);
        for k in self.tree.scan_prefix(&dprefix).keys() {
            k.map_err(io)?;
            stats.dead_letters += 1;
        }
        Ok(stats)
    }

    fn dead_letters(&self, consumer: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let prefix = key("od/", &[consumer.as_bytes(), b""]);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix).take(limit) {
            let (k, v) = kv.map_err(io)?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }
}

/// Key under which an open alert is found for aggregation.
fn alert_identity(
    level: AlertLevel,
    mailbox: Option<&str>,
    profile: Option<&str>,
    text: &str,
) -> Vec<u8> {
    let level_s = format!("{level:?}");
    key(
        "lk/",
        &[
            level_s.as_bytes(),
            mailbox.unwrap_or("").as_bytes(),
            profile.unwrap_or("").as_bytes(),
            text.as_bytes(),
        ],
    )
}

impl SledStore {
    /// Decides insert / duplicate / already-seen for one activity and records the
    /// result in the overlay (written by the caller in one batch).
    fn stage_activity(
        &self,
        mut a: EmailActivity,
        ov: &mut Overlay,
    ) -> Result<CommitOutcome, StoreError> {
        let sk = key("s/", &[&source_bytes(&a.source)]);
        if let Some(id) = ov
            .sources
            .get(&sk)
            .copied()
            .map_or_else(|| self.get_id(&sk), |i| Ok(Some(i)))?
        {
            return Ok(CommitOutcome::AlreadySeen(id));
        }
        let lookup = |ov: &Overlay,
                      k: &[u8],
                      m: &HashMap<Vec<u8>, u64>|
         -> Result<Option<u64>, StoreError> {
            let _ = ov;
            match m.get(k) {
                Some(id) => Ok(Some(*id)),
                None => self.get_id(k),
            }
        };
        let mut duplicate_of = None;
        for mid in &a.message_ids {
            if let Some(id) = lookup(ov, &mid_key(mid), &ov.message_ids)? {
                let same = match ov.activities.get(&id) {
                    Some(e) => same_email(e, &a),
                    None => self.activity(id)?.is_some_and(|e| same_email(&e, &a)),
                };
                if same {
                    duplicate_of = Some(id);
                    break;
                }
            }
        }
        let hk = key("h/", &[a.content_hash.as_bytes()]);
        if duplicate_of.is_none() && a.message_ids.is_empty() {
            duplicate_of = lookup(ov, &hk, &ov.hashes)?;
        }
        if let Some(id) = duplicate_of {
            let mut existing = match ov.activities.remove(&id) {
                Some(e) => e,
                None => {
                    let stored = self.activity(id)?.ok_or_else(|| {
                        StoreError::Corrupt(format!("activity {id} is indexed but missing"))
                    })?;
                    ov.previous.insert(id, stored.clone());
                    stored
                }
            };
            let mut what = std::collections::BTreeSet::new();
            what.insert("also_seen_as".to_string());
            existing.also_seen_as.push(a.source.clone());
            // Moving a message into another tracked folder re-points it; leaving
            // a tracked folder (any other decision) changes nothing.
            if a.method == CorrelationMethod::Folder
                && a.regarding.is_some()
                && existing.regarding != a.regarding
            {
                existing.regarding = a.regarding.clone();
                existing.method = CorrelationMethod::Folder;
                existing.score = a.score;
                existing.correlated_with = None;
                existing
                    .reasons
                    .push(format!("moved to tracked folder {:?}", a.source.folder));
                existing.reasons.extend(a.reasons.iter().cloned());
                what.insert("regarding".to_string());
            }
            match ov.touched.iter_mut().find(|(t, _)| *t == id) {
                // Inserted by this batch: still one `activity.created`.
                Some((_, None)) => {}
                Some((_, Some(w))) => w.extend(what),
                None => ov.touched.push((id, Some(what))),
            }
            ov.activities.insert(id, existing);
            ov.sources.insert(sk, id);
            return Ok(CommitOutcome::Duplicate(id));
        }
        if a.id == 0 {
            a.id = self.next_id()?;
        }
        let id = a.id;
        for mid in &a.message_ids {
            let k = mid_key(mid);
            // First writer keeps a Message-ID: a later, different message reusing it
            // must not steal the thread.
            if lookup(ov, &k, &ov.message_ids)?.is_none() {
                ov.message_ids.insert(k, id);
            }
        }
        if lookup(ov, &hk, &ov.hashes)?.is_none() {
            ov.hashes.insert(hk, id);
        }
        ov.sources.insert(sk, id);
        ov.activities.insert(id, a);
        ov.touched.push((id, None));
        Ok(CommitOutcome::Inserted(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CorrelationMethod, Direction};
    use crate::store::AutomaticMark;

    pub(crate) fn activity(
        mailbox: &str,
        uid: &str,
        mid: Option<&str>,
        hash: &str,
    ) -> EmailActivity {
        EmailActivity {
            id: 0,
            mailbox: mailbox.into(),
            source: SourceKey {
                mailbox: mailbox.into(),
                folder: "INBOX".into(),
                uidvalidity: 1,
                uid: uid.into(),
            },
            message_ids: mid.map(|m| vec![m.to_string()]).unwrap_or_default(),
            in_reply_to: vec![],
            references: vec![],
            direction: Direction::Incoming,
            subject: "s".into(),
            from: vec![],
            to: vec![],
            cc: vec![],
            sent_at: None,
            received_at: 0,
            regarding: Some("case:1".parse().unwrap()),
            method: CorrelationMethod::None,
            score: 0.0,
            reasons: vec![],
            correlated_with: None,
            content_hash: hash.into(),
            size: 1,
            also_seen_as: vec![],
            forwarded_by: None,
            automatic: None,
            no_reply: false,
            parties: vec![],
        }
    }

    /// Opens a store this process has just dropped. sled's background
    /// flusher thread holds the file lock a moment past the drop, so an
    /// immediate reopen can fail with `Locked` (seen in CI); wait for it,
    /// but not forever.
    fn reopen(path: &Path) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(path) {
                Ok(s) => return s,
                Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen {}: {e}", path.display()),
            }
        }
    }

    fn batch(items: Vec<EmailActivity>) -> CommitBatch {
        CommitBatch {
            items: items
                .into_iter()
                .map(|a| PendingItem::Activity(Box::new(a)))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn dedupes_by_source_then_message_id_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let out = s
            .commit(batch(vec![
                activity("m", "1", Some("a@x"), "h1"),
                activity("m", "2", Some("b@x"), "h2"),
            ]))
            .unwrap();
        assert!(matches!(
            out[..],
            [CommitOutcome::Inserted(_), CommitOutcome::Inserted(_)]
        ));
        let first = match out[0] {
            CommitOutcome::Inserted(i) => i,
            _ => unreachable!(),
        };
        // Same source again: a replay after a crash.
        let again = s
            .commit(batch(vec![activity("m", "1", Some("a@x"), "h1")]))
            .unwrap();
        assert_eq!(again, vec![CommitOutcome::AlreadySeen(first)]);
        // Same email under a new UID (UIDVALIDITY reset) and within one batch twice.
        let moved = s
            .commit(batch(vec![
                activity("m", "9", Some("<A@X>"), "h1"),
                activity("m", "10", Some("a@x"), "h1"),
            ]))
            .unwrap();
        assert_eq!(
            moved,
            vec![
                CommitOutcome::Duplicate(first),
                CommitOutcome::Duplicate(first)
            ]
        );
        assert_eq!(s.activity(first).unwrap().unwrap().also_seen_as.len(), 2);
        // Same Message-ID, another sender, date or subject: a different email.
        let mut reused = activity("m", "11", Some("a@x"), "zz");
        reused.subject = "another email reusing the Message-ID".into();
        let other = s.commit(batch(vec![reused])).unwrap();
        assert!(matches!(other[0], CommitOutcome::Inserted(_)));
        assert_eq!(s.count_activities(None).unwrap(), 3);
        assert_eq!(s.count_activities(Some("m")).unwrap(), 3);
        assert!(s.is_seen(&activity("m", "10", None, "").source).unwrap());
        let t = s
            .tracked_by_message_ids(&["a@x".into(), "nope@x".into()])
            .unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t["a@x"].activity, first);
    }

    /// The header method takes the first tracked id of In-Reply-To, then
    /// References newest first; the store reads up to that one only, and a
    /// batch's staged overlay layered over it still gives the method the
    /// first hit of both.
    #[test]
    fn message_ids_resolve_up_to_the_first_tracked_one() {
        use crate::correlate::{
            correlate, lookup_keys, CorrelationSettings, MemIndex, MessageFeatures,
        };
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let mut stored = Vec::new();
        for (n, mid) in ["root@x", "mid@x", "newest@x"].iter().enumerate() {
            let mut a = activity("m", &n.to_string(), Some(mid), &format!("h{n}"));
            a.regarding = Some(format!("case:{n}").parse().unwrap());
            stored.push(a);
        }
        s.commit(batch(stored)).unwrap();
        let settings = CorrelationSettings::default();
        let reply = MessageFeatures {
            in_reply_to: vec!["unknown@x".into()],
            references: vec!["root@x".into(), "mid@x".into(), "newest@x".into()],
            ..Default::default()
        };
        let keys = lookup_keys(&reply, &settings);
        let mut idx = Indexes::default();
        s.lookup_into(&keys, &mut idx).unwrap();
        assert_eq!(
            idx.by_message_id.keys().collect::<Vec<_>>(),
            vec!["newest@x"],
            "nothing read past the first hit"
        );
        let d = correlate(&reply, &idx, &settings);
        assert_eq!(d.method, CorrelationMethod::InReplyTo);
        assert_eq!(d.regarding, Some("case:2".parse().unwrap()));
        assert!(
            d.reasons[0].contains("References contains <newest@x>"),
            "{:?}",
            d.reasons
        );
        // The parent staged in the same batch (not in the store yet) comes
        // first in the order, so it wins over the store's hit.
        let mut staged = MemIndex::default();
        staged.insert_message_ids(&["unknown@x".into()], 99, Some("case:9".parse().unwrap()));
        staged.fill(&keys, &mut idx);
        let d = correlate(&reply, &idx, &settings);
        assert_eq!(d.method, CorrelationMethod::InReplyTo);
        assert_eq!(d.regarding, Some("case:9".parse().unwrap()));
    }

    #[test]
    fn correlation_indexes_are_written_with_their_activity_and_resolved() {
        use crate::correlate::{index_entry, lookup_keys, CorrelationSettings, MessageFeatures};
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let settings = CorrelationSettings {
            smart_matching: true,
            ..Default::default()
        };
        let f = MessageFeatures {
            subject: "Invoice 7781 CRM:0001001".into(),
            thread_index: Some(crate::correlate::thread_index::encode_root(
                1 << 40,
                [3; 16],
            )),
            ..Default::default()
        };
        let mut a = activity("m", "1", Some("p@x"), "h1");
        a.id = s.allocate_id().unwrap();
        let mut dup = activity("m", "2", Some("p@x"), "h1");
        dup.id = s.allocate_id().unwrap();
        let mut b = batch(vec![a.clone(), dup.clone()]);
        b.index = vec![
            index_entry(&f, a.id, &settings),
            index_entry(&f, dup.id, &settings),
        ];
        s.commit(b).unwrap();
        drop(s);
        // Reopen: nothing comes from the cache.
        let s = reopen(dir.path());
        let reply = MessageFeatures {
            subject: "RE: Invoice 7781 CRM:0001001".into(),
            thread_index: f.thread_index.clone(),
            ..Default::default()
        };
        let idx = s.lookup(&lookup_keys(&reply, &settings)).unwrap();
        assert_eq!(idx.by_token["0001001"].activity, a.id);
        assert_eq!(idx.by_thread_root.values().next().unwrap().activity, a.id);
        // The duplicate's entries were not written.
        assert_eq!(idx.candidates.len(), 1);
        assert_eq!(idx.candidates[0].activity, a.id);
        assert_eq!(
            idx.candidates[0].regarding.as_ref().unwrap().to_string(),
            "case:1"
        );
    }

    /// A parent body with enough words for a fingerprint.
    const PARENT_TEXT: &str = "the pallets for the Rotterdam warehouse arrive on Friday and \
        the customs papers for both destinations are ready to sign today";

    /// A fresh store and scored smart-matching settings.
    fn scored_store() -> (
        tempfile::TempDir,
        SledStore,
        crate::correlate::CorrelationSettings,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let settings = crate::correlate::CorrelationSettings {
            smart_matching: true,
            ..Default::default()
        };
        (dir, s, settings)
    }

    /// The in-memory bucket and posting lists must read exactly as the
    /// tree does, however commits (ids out of order, more members than a
    /// lookup takes) and lookups interleave.
    #[test]
    fn cached_smart_matching_lists_read_as_a_fresh_store_does() {
        use crate::correlate::{index_entry, lookup_keys, MessageFeatures};
        let (dir, s, settings) = scored_store();
        let text = PARENT_TEXT;
        let features = |i: i64| {
            let mut f = MessageFeatures {
                subject: "Delivery plan".into(),
                to: vec!["ann@customer.example".into()],
                sent_at: Some(1_767_000_000 + i),
                ..Default::default()
            };
            f.add_body_features(text);
            f
        };
        let mut reply = features(1_000);
        reply.subject = "Re: Delivery plan".into();
        reply.add_body_features(&format!("Fine.\n\nOn Monday, Ann wrote:\n> {text}"));
        let keys = lookup_keys(&reply, &settings);
        assert!(!keys.buckets.is_empty() && !keys.shingles.is_empty());
        // More members than a lookup takes, committed newest batch first.
        let ids: Vec<u64> = (0..45).map(|_| s.allocate_id().unwrap()).collect();
        let empty = s.lookup(&keys).unwrap();
        assert!(empty.candidates.is_empty() && empty.by_shingle.is_empty());
        for chunk in ids.chunks(9).rev() {
            let mut b = batch(
                chunk
                    .iter()
                    .map(|id| {
                        let mut a = activity("m", &id.to_string(), None, &format!("h{id}"));
                        a.id = *id;
                        a
                    })
                    .collect(),
            );
            b.index = chunk
                .iter()
                .map(|id| index_entry(&features(*id as i64), *id, &settings))
                .collect();
            s.commit(b).unwrap();
            // Caches the lists as they are now.
            s.lookup(&keys).unwrap();
        }
        let cached = s.lookup(&keys).unwrap();
        drop(s);
        let fresh = reopen(dir.path()).lookup(&keys).unwrap();
        assert_eq!(cached.candidates, fresh.candidates);
        assert_eq!(cached.by_shingle, fresh.by_shingle);
        // Newest candidates of the bucket, oldest postings of a shingle.
        assert_eq!(
            fresh.candidates.first().map(|c| c.activity),
            ids.last().copied()
        );
        let postings = fresh.by_shingle.values().next().unwrap();
        assert_eq!(postings.len(), MAX_SHINGLE_POSTINGS);
        assert_eq!(postings[0].activity, ids[0]);
    }

    #[test]
    fn a_list_read_while_a_commit_ran_is_not_cached() {
        let mut cache = CandidateCache::default();
        let read_at = cache.generation;
        cache.generation += 1;
        cache.put_postings((Postings::Bucket, 7), vec![1], read_at);
        assert!(cache.postings.is_empty());
        cache.put_postings((Postings::Bucket, 7), vec![1, 2], cache.generation);
        assert_eq!(cache.postings[&(Postings::Bucket, 7)], vec![1, 2]);
    }

    #[test]
    fn posting_lists_keep_what_a_lookup_reads() {
        let mut newest: Vec<u64> = (1..=MAX_CANDIDATES_PER_BUCKET as u64)
            .map(|i| i * 2)
            .collect();
        Postings::Bucket.add(&mut newest, 5);
        assert_eq!(newest.len(), MAX_CANDIDATES_PER_BUCKET);
        assert_eq!(newest[..3], [4, 5, 6]);
        Postings::Bucket.add(&mut newest, 5);
        assert_eq!(newest.len(), MAX_CANDIDATES_PER_BUCKET);
        let mut oldest: Vec<u64> = (1..=MAX_SHINGLE_POSTINGS as u64).map(|i| i * 2).collect();
        Postings::Shingle.add(&mut oldest, 5);
        assert_eq!(oldest.len(), MAX_SHINGLE_POSTINGS);
        assert_eq!(oldest[..4], [2, 4, 5, 6]);
        assert_eq!(oldest.last(), Some(&(2 * MAX_SHINGLE_POSTINGS as u64 - 2)));
    }

    #[test]
    fn fingerprint_shingles_find_a_quoted_parent_under_another_subject() {
        use crate::correlate::{index_entry, lookup_keys, MessageFeatures};
        let (dir, s, settings) = scored_store();
        let text = PARENT_TEXT;
        let mut f = MessageFeatures {
            subject: "Delivery plan".into(),
            ..Default::default()
        };
        f.add_body_features(text);
        let mut a = activity("m", "1", Some("p@x"), "h1");
        a.id = s.allocate_id().unwrap();
        let mut b = batch(vec![a.clone()]);
        b.index = vec![index_entry(&f, a.id, &settings)];
        assert!(!b.index[0].shingle_keys.is_empty());
        s.commit(b).unwrap();
        drop(s);
        let s = reopen(dir.path());
        let mut reply = MessageFeatures {
            subject: "Something else entirely".into(),
            ..Default::default()
        };
        reply.add_body_features(&format!("Fine.\n\nOn Monday, Ann wrote:\n> {text}"));
        let idx = s.lookup(&lookup_keys(&reply, &settings)).unwrap();
        assert!(!idx.by_shingle.is_empty());
        assert_eq!(idx.candidates.len(), 1);
        assert_eq!(idx.candidates[0].activity, a.id);
        assert_eq!(
            idx.candidates[0].regarding.as_ref().unwrap().to_string(),
            "case:1"
        );
    }

    #[test]
    fn moving_into_another_tracked_folder_re_points_leaving_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let mut a = activity("m", "1", Some("p@x"), "h1");
        a.method = CorrelationMethod::Folder;
        let id = match s.commit(batch(vec![a])).unwrap()[0] {
            CommitOutcome::Inserted(i) => i,
            o => panic!("{o:?}"),
        };
        let mut moved = activity("m", "7", Some("p@x"), "h1");
        moved.source.folder = "INBOX/Contoso".into();
        moved.method = CorrelationMethod::Folder;
        moved.regarding = Some("account:contoso".parse().unwrap());
        assert_eq!(
            s.commit(batch(vec![moved])).unwrap(),
            vec![CommitOutcome::Duplicate(id)]
        );
        let after = s.activity(id).unwrap().unwrap();
        assert_eq!(after.regarding.unwrap().to_string(), "account:contoso");
        assert!(after
            .reasons
            .contains(&"moved to tracked folder \"INBOX/Contoso\"".to_string()));
        assert_eq!(
            s.tracked_by_message_ids(&["p@x".into()]).unwrap()["p@x"]
                .regarding
                .as_ref()
                .unwrap()
                .to_string(),
            "account:contoso"
        );
        // Out of the tracked folder into an untracked one: unchanged.
        let mut left = activity("m", "8", Some("p@x"), "h1");
        left.source.folder = "Archive".into();
        left.regarding = None;
        s.commit(batch(vec![left])).unwrap();
        let after = s.activity(id).unwrap().unwrap();
        assert_eq!(after.regarding.unwrap().to_string(), "account:contoso");
        assert_eq!(after.method, CorrelationMethod::Folder);
    }

    #[test]
    fn positions_and_state_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let mut b = batch(vec![activity("m", "1", None, "h")]);
            b.positions.push((
                "m".into(),
                "INBOX".into(),
                FolderPosition {
                    uidvalidity: 7,
                    next_uid: 2,
                    highest_modseq: None,
                    seen_count: 1,
                    retry: Vec::new(),
                },
            ));
            // The state as before the batch: the commit adds its one insert.
            b.mailbox_state = Some(MailboxState {
                name: "m".into(),
                items_processed: 4,
                ..Default::default()
            });
            s.commit(b).unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.folder_positions("m").unwrap()["INBOX"].next_uid, 2);
        assert_eq!(s.mailbox_state("m").unwrap().unwrap().items_processed, 5);
        assert_eq!(
            s.activities(&ActivityQuery {
                mailbox: Some("m".into()),
                limit: 10,
                before: None
            })
            .unwrap()
            .len(),
            1
        );
    }

    /// `items_processed` counted duplicates and re-scanned copies (a
    /// UIDVALIDITY re-scan showed 2,324 processed with 1,314 stored): the
    /// state written with a batch counts what its commit inserted, as the
    /// metrics do.
    #[test]
    fn items_processed_counts_only_inserted_activities() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let state = |processed, failed| MailboxState {
            name: "m".into(),
            items_processed: processed,
            items_failed: failed,
            ..Default::default()
        };
        let mut b = batch(vec![
            activity("m", "1", Some("a@x"), "h1"),
            activity("m", "2", Some("b@x"), "h2"),
        ]);
        b.mailbox_state = Some(state(0, 0));
        let first = s.commit(b).unwrap();
        assert_eq!(
            Tally::of(&first),
            Tally {
                inserted: 2,
                quarantined: 0
            }
        );
        // A re-scan under a new UIDVALIDITY: the same two emails, one new one,
        // one replayed source and a quarantined message.
        let mut rescanned = activity("m", "1", Some("a@x"), "h1");
        rescanned.source.uidvalidity = 2;
        let mut b = batch(vec![
            rescanned,
            activity("m", "2", Some("b@x"), "h2"),
            activity("m", "3", Some("c@x"), "h3"),
        ]);
        b.items.push(PendingItem::Quarantine(QuarantineEntry {
            id: 0,
            source: activity("m", "4", None, "").source,
            reason: "bad".into(),
            saved_as: String::new(),
            size: 1,
            at: 0,
        }));
        b.mailbox_state = Some(state(2, 0));
        let outcomes = s.commit(b).unwrap();
        let stored = s.mailbox_state("m").unwrap().unwrap();
        assert_eq!((stored.items_processed, stored.items_failed), (3, 1));
        assert_eq!(
            stored.items_processed,
            s.count_activities(Some("m")).unwrap()
        );
        let mut mine = state(2, 0);
        Tally::of(&outcomes).add_to(&mut mine);
        assert_eq!(mine, stored);
    }

    /// The same Message-ID delivered to two mailboxes, one copy with a
    /// disclaimer footer (another content hash): one activity, listed under
    /// both mailboxes, with both sources.
    #[test]
    fn one_email_in_two_mailboxes_with_different_bytes_is_one_activity() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let mut original = activity("alice", "1", Some("one@x"), "plain");
        original.from = vec!["c@customer.example".into()];
        original.sent_at = Some(1_767_000_000);
        original.subject = "Quote  request".into();
        let id = match s.commit(batch(vec![original.clone()])).unwrap()[0] {
            CommitOutcome::Inserted(i) => i,
            o => panic!("{o:?}"),
        };
        let mut footer = original.clone();
        footer.mailbox = "queue".into();
        footer.source.mailbox = "queue".into();
        footer.content_hash = "with-footer".into();
        footer.subject = "Quote request".into();
        assert_eq!(
            s.commit(batch(vec![footer.clone()])).unwrap(),
            vec![CommitOutcome::Duplicate(id)]
        );
        let a = s.activity(id).unwrap().unwrap();
        assert_eq!(a.mailboxes(), vec!["alice", "queue"]);
        assert_eq!(a.also_seen_as, vec![footer.source.clone()]);
        assert_eq!(s.count_activities(None).unwrap(), 1);
        for m in ["alice", "queue"] {
            let listed = s
                .activities(&ActivityQuery {
                    mailbox: Some(m.into()),
                    limit: 10,
                    before: None,
                })
                .unwrap();
            assert_eq!(listed.len(), 1, "{m}");
            assert_eq!(listed[0].id, id);
        }
        // Another sender, date or subject under the same Message-ID: another email.
        for change in 0..3 {
            let mut other = footer.clone();
            other.source.uid = format!("other{change}");
            match change {
                0 => other.from = vec!["someone@else.example".into()],
                1 => other.sent_at = Some(1_767_000_999),
                _ => other.subject = "Something else".into(),
            }
            assert!(matches!(
                s.commit(batch(vec![other])).unwrap()[0],
                CommitOutcome::Inserted(_)
            ));
        }
    }

    /// Follow-ups are written with their batch, survive a reopen (a crash
    /// before they were carried out), and a later commit removes them;
    /// one owed again in that same commit stays.
    #[test]
    fn follow_ups_commit_with_their_batch_and_are_cleared_later() {
        use crate::model::AckKind;
        let dir = tempfile::tempdir().unwrap();
        let follow_up = |mailbox: &str, uid: &str, kind| FollowUp {
            source: activity(mailbox, uid, None, "").source,
            kind,
            recorded_at: 7,
            failures: 0,
            last_error: None,
        };
        {
            let s = SledStore::open(dir.path()).unwrap();
            let mut b = batch(vec![
                activity("m", "1", Some("a@x"), "h1"),
                activity("m", "2", Some("b@x"), "h2"),
            ]);
            b.follow_ups = vec![
                follow_up("m", "1", AckKind::Recorded),
                follow_up("m", "2", AckKind::Failed),
                follow_up("m2", "1", AckKind::Recorded),
            ];
            s.commit(b).unwrap();
        }
        let s = reopen(dir.path());
        let owed = s.follow_ups("m").unwrap();
        assert_eq!(
            owed,
            vec![
                follow_up("m", "1", AckKind::Recorded),
                follow_up("m", "2", AckKind::Failed)
            ]
        );
        assert_eq!(s.follow_ups("m2").unwrap().len(), 1);
        // Done: 1 and 2; 2 is owed again by the same commit, 3 is new.
        let mut again = follow_up("m", "2", AckKind::Failed);
        again.failures = 1;
        let b = CommitBatch {
            follow_ups_done: vec![owed[0].source.clone(), owed[1].source.clone()],
            follow_ups: vec![again.clone(), follow_up("m", "3", AckKind::Recorded)],
            ..Default::default()
        };
        s.commit(b).unwrap();
        assert_eq!(
            s.follow_ups("m").unwrap(),
            vec![again, follow_up("m", "3", AckKind::Recorded)]
        );
        assert_eq!(s.follow_ups("m2").unwrap().len(), 1);
    }

    #[test]
    fn automatic_marks_count_by_pair_and_time_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let s = SledStore::open(&path).unwrap();
        let mut b = batch(vec![
            activity("m", "1", Some("a1@x"), "h1"),
            activity("m", "2", Some("a2@x"), "h2"),
            activity("m", "3", Some("a3@x"), "h3"),
            activity("m", "4", Some("a4@x"), "h4"),
        ]);
        let ids: Vec<u64> = (0..4).map(|_| s.allocate_id().unwrap()).collect();
        for (item, id) in b.items.iter_mut().zip(&ids) {
            if let PendingItem::Activity(a) = item {
                a.id = *id;
            }
        }
        let mark = |pair: &str, at: i64, activity: u64| AutomaticMark {
            mailbox: "m".into(),
            pair: pair.into(),
            at,
            activity,
        };
        b.automatic = vec![
            mark("a@x b@x", -5, ids[0]),
            mark("a@x b@x", 100, ids[1]),
            mark("a@x b@x", 200, ids[2]),
            mark("a@x b@xx", 150, ids[3]),
            // Not an activity of this batch: not written.
            mark("a@x b@x", 300, 999_999),
        ];
        s.commit(b).unwrap();
        drop(s);
        let s = reopen(&path);
        assert_eq!(s.automatic_since("m", "a@x b@x", -10, 10).unwrap(), 3);
        assert_eq!(s.automatic_since("m", "a@x b@x", 100, 10).unwrap(), 2);
        assert_eq!(s.automatic_since("m", "a@x b@x", 101, 10).unwrap(), 1);
        assert_eq!(s.automatic_since("m", "a@x b@x", -10, 2).unwrap(), 2);
        assert_eq!(s.automatic_since("m", "a@x b@xx", 0, 10).unwrap(), 1);
        assert_eq!(s.automatic_since("other", "a@x b@x", 0, 10).unwrap(), 0);
    }

    #[test]
    fn alerts_aggregate() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.raise_alert(AlertLevel::Error, Some("m"), None, "auth failed", 10)
            .unwrap();
        let a = s
            .raise_alert(AlertLevel::Error, Some("m"), None, "auth failed", 20)
            .unwrap();
        assert_eq!((a.count, a.first_seen, a.last_seen), (2, 10, 20));
        s.raise_alert(AlertLevel::Warning, Some("m"), None, "slow", 30)
            .unwrap();
        let all = s.alerts(10).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].text, "slow");
    }

    #[test]
    fn resolved_alert_stays_listed_and_a_repeat_opens_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let first = s
            .raise_alert(AlertLevel::Error, Some("m"), None, "not synced since x", 10)
            .unwrap();
        s.raise_alert(
            AlertLevel::Error,
            Some("other"),
            None,
            "not synced since x",
            10,
        )
        .unwrap();
        assert_eq!(s.resolve_alerts("m", "not synced since", 20).unwrap(), 1);
        assert_eq!(s.resolve_alerts("m", "not synced since", 21).unwrap(), 0);
        let again = s
            .raise_alert(AlertLevel::Error, Some("m"), None, "not synced since x", 30)
            .unwrap();
        assert_ne!(again.id, first.id);
        let all = s.alerts(10).unwrap();
        let old = all.iter().find(|a| a.id == first.id).unwrap();
        assert_eq!((old.resolved_at, old.count), (Some(20), 1));
        assert!(all
            .iter()
            .filter(|a| a.id != first.id)
            .all(|a| a.resolved_at.is_none()));
    }

    #[test]
    fn alerts_stored_without_resolved_at_load_as_open() {
        let json = r#"{"id":1,"level":"error","mailbox":"m","profile":null,"text":"t","first_seen":1,"last_seen":2,"count":3}"#;
        let a: Alert = serde_json::from_str(json).unwrap();
        assert_eq!(a.resolved_at, None);
    }
}
