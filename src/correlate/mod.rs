//! Correlation: which CRM record an email is regarding, and why.
//!
//! This module is pure: it sees the message's features, an [`Indexes`] snapshot
//! the caller resolved from the store for exactly the keys [`lookup_keys`] asked
//! for, and the settings. No I/O, no clock, no store access, so every decision
//! can be replayed and tested in isolation.
//!
//! Methods, tried in [`CorrelationSettings::order`]: folder tracking, headers
//! (In-Reply-To, References), tracking token, conversation index
//! (`Thread-Index`), smart matching (Dynamics-compatible or scored). The first
//! confident match wins; conflicts and near-misses end up in the reasons.

pub mod fingerprint;
pub mod memindex;
pub mod subject;
pub mod thread_index;
pub mod token;

// foldhash: these maps are built per message (see `memindex`).
use foldhash::HashMap;
use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::FolderRule;
use crate::model::{ActivityId, CorrelationMethod, RecordRef};

pub use memindex::MemIndex;
use token::{FoundToken, TokenRejection, TokenSettings};

/// Seconds per day, for the smart-matching window.
const DAY: i64 = 86_400;

/// Fingerprint shingle index (scored smart matching): a tracked email is
/// indexed under its body's smallest sampled shingle hashes, so a reply that
/// quotes it is found even when the subject changed.
pub const SHINGLE_INDEX_KEYS: usize = 8;
/// Quoted-part shingles a message probes the index with (its smallest).
/// Each probe is a random index access; a parent's [`SHINGLE_INDEX_KEYS`]
/// smallest shingles are among the reply's smallest unless the quote holds
/// several times more text than the parent (32 and 64 probes gave the same
/// corpus figures).
pub const SHINGLE_PROBES: usize = 32;
/// Postings read per shingle; bounds a lookup however common a shingle is.
pub const MAX_SHINGLE_POSTINGS: usize = 32;
/// Document-frequency cut-off: a shingle seen in tracked mail of more than
/// this many records is boilerplate (signature, list footer, disclaimer),
/// not evidence; a thread quoting itself stays within one record.
pub const MAX_SHINGLE_RECORDS: usize = 2;
/// Hits on distinct (non-boilerplate) shingles that make a candidate.
pub const MIN_SHINGLE_HITS: usize = 2;
/// Candidates taken from the shingle index per message (most hits first).
pub const MAX_SHINGLE_CANDIDATES: usize = 8;

/// Smart-matching flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmartMode {
    /// Dynamics-compatible: equal subject word hashes plus enough shared addresses.
    Dynamics,
    /// Base subject, participants, time and quoted text combined into one score.
    Scored,
}

/// Smart-matching settings (Dynamics names where Dynamics has them).
#[derive(Debug, Clone, PartialEq)]
pub struct SmartSettings {
    pub mode: SmartMode,
    /// Scored mode: minimum score (0–1) for a match.
    pub threshold: f32,
    /// Only tracked mail sent within this many days is a candidate.
    pub window_days: u32,
    /// Dynamics HashMaxCount: subject words hashed.
    pub hash_max_count: usize,
    /// Dynamics HashDeltaSubjectCount: subject hashes allowed to differ.
    pub hash_delta_subject_count: usize,
    /// Dynamics HashMinAddressCount: shared addresses required.
    pub hash_min_address_count: usize,
}

impl Default for SmartSettings {
    fn default() -> Self {
        SmartSettings {
            mode: SmartMode::Scored,
            threshold: 0.6,
            window_days: 90,
            hash_max_count: 20,
            hash_delta_subject_count: 0,
            hash_min_address_count: 2,
        }
    }
}

/// Correlation settings (the organisation's email settings in Dynamics terms).
#[derive(Debug, Clone, PartialEq)]
pub struct CorrelationSettings {
    /// Methods in the order they are tried; the first confident match wins.
    pub order: Vec<CorrelationMethod>,
    /// Smart matching is off by default, as in current Dynamics versions.
    pub smart_matching: bool,
    /// Tracked folders allowed per user mailbox.
    pub max_tracked_folders: usize,
    /// Tracking-token format, earlier prefixes and the optional signing key.
    pub token: TokenSettings,
    /// With a signing key: reject unsigned tokens too (otherwise only bad signatures).
    pub require_signature: bool,
    pub smart: SmartSettings,
}

impl Default for CorrelationSettings {
    fn default() -> Self {
        CorrelationSettings {
            order: vec![
                CorrelationMethod::Folder,
                CorrelationMethod::InReplyTo,
                CorrelationMethod::TrackingToken,
                CorrelationMethod::ConversationIndex,
                CorrelationMethod::SmartMatching,
            ],
            smart_matching: false,
            max_tracked_folders: 25,
            token: TokenSettings::default(),
            require_signature: false,
            smart: SmartSettings::default(),
        }
    }
}

impl CorrelationSettings {
    /// Whether the quoted-text fingerprint is used, so the caller knows to
    /// compute [`MessageFeatures::body_shingles`] (the costliest feature).
    pub fn wants_body_features(&self) -> bool {
        self.smart_matching && self.smart.mode == SmartMode::Scored
    }
}

/// What correlation needs to know about a message (extracted by `parse`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessageFeatures {
    /// Every Message-ID the message carries (its own, `X-Microsoft-Original-Message-Id`).
    pub message_ids: Vec<String>,
    pub in_reply_to: Vec<String>,
    /// Oldest first, as in the header.
    pub references: Vec<String>,
    pub subject: String,
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub sent_at: Option<i64>,
    pub thread_index: Option<String>,
    /// Folder the message was found in.
    pub folder: String,
    /// Sent by the mailbox owner: the counterpart is then a recipient.
    #[serde(default)]
    pub outgoing: bool,
    /// Shingle sample of the whole body (indexed for replies to find it).
    #[serde(default)]
    pub body_shingles: Vec<u64>,
    /// Shingle sample of the quoted part of the body.
    #[serde(default)]
    pub quoted_shingles: Vec<u64>,
}

impl MessageFeatures {
    /// Fills both fingerprint features from the decoded text body.
    pub fn add_body_features(&mut self, body_text: &str) {
        self.add_quoted_features(body_text);
        self.add_index_features(body_text);
    }

    /// Fills [`Self::quoted_shingles`]: what scored smart matching compares
    /// (staged correlation computes only this).
    pub fn add_quoted_features(&mut self, body_text: &str) {
        self.quoted_shingles = fingerprint::quoted_shingles(body_text);
    }

    /// Fills [`Self::body_shingles`]: what indexing a tracked email stores.
    pub fn add_index_features(&mut self, body_text: &str) {
        self.body_shingles = fingerprint::body_shingles(body_text);
    }

    /// Domain of the other party: the sender of incoming mail, the first
    /// recipient of outgoing mail.
    fn counterpart_domain(&self) -> String {
        let addr = if self.outgoing {
            self.to.first().or(self.cc.first())
        } else {
            self.from.first()
        };
        addr.and_then(|a| a.rsplit_once('@').map(|(_, d)| d.to_string()))
            .unwrap_or_default()
    }

    fn participants(&self) -> Vec<u64> {
        subject::address_hashes(
            self.from
                .iter()
                .chain(&self.to)
                .chain(&self.cc)
                .map(String::as_str),
        )
    }
}

/// A tracked email as correlation sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedEmail {
    pub activity: ActivityId,
    pub regarding: Option<RecordRef>,
}

/// What smart matching knows about a tracked email (stored in its buckets).
///
/// The record it is regarding is per lookup (it can be re-pointed); the
/// rest is shared: a lookup hands out a copy of a candidate for every
/// bucket and shingle that names it, and a copy is one reference count.
/// Field access goes through [`Deref`](std::ops::Deref) to
/// [`CandidateData`]. Stored as one flat object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "CandidateWire", into = "CandidateWire")]
pub struct SmartCandidate {
    pub activity: ActivityId,
    /// Filled in at lookup time from the activity (it can be re-pointed).
    pub regarding: Option<RecordRef>,
    pub data: Arc<CandidateData>,
}

/// The immutable part of a [`SmartCandidate`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CandidateData {
    /// RFC 5256 base subject without tokens, for scored mode and reasons.
    pub base_subject: String,
    /// Dynamics subject word hashes, sorted.
    pub subject_hashes: Vec<u64>,
    /// Address hashes of From, To and Cc, sorted.
    pub participants: Vec<u64>,
    pub sent_at: Option<i64>,
    /// Shingle sample of the whole body.
    pub shingles: Vec<u64>,
    /// Patch-series membership (scored mode's series rule); absent in
    /// candidates indexed before the rule existed.
    pub series: Option<SeriesTag>,
}

impl std::ops::Deref for SmartCandidate {
    type Target = CandidateData;
    fn deref(&self) -> &CandidateData {
        &self.data
    }
}

/// How a [`SmartCandidate`] is stored (one flat object, as before the
/// shared part was split off).
#[derive(Serialize, Deserialize)]
struct CandidateWire {
    activity: ActivityId,
    #[serde(default)]
    regarding: Option<RecordRef>,
    base_subject: String,
    subject_hashes: Vec<u64>,
    participants: Vec<u64>,
    sent_at: Option<i64>,
    shingles: Vec<u64>,
    #[serde(default)]
    series: Option<SeriesTag>,
}

impl From<CandidateWire> for SmartCandidate {
    fn from(w: CandidateWire) -> Self {
        SmartCandidate {
            activity: w.activity,
            regarding: w.regarding,
            data: Arc::new(CandidateData {
                base_subject: w.base_subject,
                subject_hashes: w.subject_hashes,
                participants: w.participants,
                sent_at: w.sent_at,
                shingles: w.shingles,
                series: w.series,
            }),
        }
    }
}

impl From<SmartCandidate> for CandidateWire {
    fn from(c: SmartCandidate) -> Self {
        let d = Arc::unwrap_or_clone(c.data);
        CandidateWire {
            activity: c.activity,
            regarding: c.regarding,
            base_subject: d.base_subject,
            subject_hashes: d.subject_hashes,
            participants: d.participants,
            sent_at: d.sent_at,
            shingles: d.shingles,
            series: d.series,
        }
    }
}

/// Which patch series a tracked email belongs to, and its place in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesTag {
    /// `series:<sender>:<N>:<version>`; also hashed into a smart-matching
    /// bucket, so siblings find each other without a scan.
    pub key: String,
    /// k of k/N (0: the cover letter).
    pub part: u32,
}

/// Series tag of a message that is not itself a reply or forward (replies
/// to a patch share its subject and are the subject bucket's business).
pub fn series_tag(f: &MessageFeatures) -> Option<SeriesTag> {
    series_tag_unless_reply(f, subject::is_reply_or_forward(&f.subject))
}

/// [`series_tag`] with the subject's reply prefix already known.
fn series_tag_unless_reply(f: &MessageFeatures, is_reply: bool) -> Option<SeriesTag> {
    if is_reply {
        return None;
    }
    let m = subject::series_marker(&f.subject)?;
    let sender = f.from.first()?;
    Some(SeriesTag {
        key: format!("series:{sender}:{}:{}", m.total, m.version),
        part: m.part,
    })
}

/// Series tag used to look for siblings of an incoming message: only when it
/// carries no In-Reply-To/References at all. A message whose headers name a
/// parent we do not track told us where it belongs; guessing a sibling would
/// attach it where its own client said it does not (a wrong attachment is
/// worse than none).
fn series_tag_to_match(f: &MessageFeatures, is_reply: bool) -> Option<SeriesTag> {
    if !f.in_reply_to.is_empty() || !f.references.is_empty() {
        return None;
    }
    series_tag_unless_reply(f, is_reply)
}

/// Bucket of a series key (the `series:` prefix keeps it apart from the
/// subject buckets).
fn series_bucket(t: &SeriesTag) -> u64 {
    subject::fnv1a64(t.key.as_bytes())
}

/// Index entries written when an activity becomes tracked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub activity: ActivityId,
    /// Digit runs of the tracking tokens in its subject.
    pub token_digits: Vec<String>,
    /// Hex root of its `Thread-Index`.
    pub thread_root: Option<String>,
    /// Smart-matching buckets (one per mode).
    pub buckets: Vec<u64>,
    /// Sampled body shingles for the fingerprint index (scored mode).
    #[serde(default)]
    pub shingle_keys: Vec<u64>,
    pub candidate: SmartCandidate,
}

/// Keys whose tracked emails correlation wants to see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LookupKeys {
    /// Normalised Message-IDs from In-Reply-To, then References newest
    /// first. The header method takes the first that names a tracked email,
    /// so a lookup may stop at its first hit: whatever it holds, the first
    /// hit of all sources layered into one [`Indexes`] is among them.
    pub message_ids: Vec<String>,
    /// Digit runs of tracking tokens found in the subject.
    pub token_digits: Vec<String>,
    /// Hex root of the `Thread-Index`, if it decodes.
    pub thread_root: Option<String>,
    /// Smart-matching bucket of the configured mode (empty when off).
    pub buckets: Vec<u64>,
    /// Quoted-part shingles to probe the fingerprint index with (scored
    /// mode, once the body features are filled).
    pub shingles: Vec<u64>,
    /// What was derived from the subject and addresses on the way, handed
    /// on through [`Indexes::derived`] so the methods do not derive it again.
    pub derived: Arc<Derived>,
}

impl LookupKeys {
    /// Whether any key of the methods before smart matching is present.
    pub fn has_direct_keys(&self) -> bool {
        !self.message_ids.is_empty() || !self.token_digits.is_empty() || self.thread_root.is_some()
    }
}

/// What correlation derives from a message's subject and addresses: found
/// once by [`lookup_keys`] and handed on to the methods through the index
/// slice (subject parsing is a measurable share of correlation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Derived {
    /// The subject's tracking tokens (as [`token::find_tokens`] finds them).
    pub subject_tokens: Vec<FoundToken>,
    /// Scored mode: the base subject without tokens.
    pub base_subject: Option<String>,
    /// Scored mode: the subject starts with a reply or forward prefix.
    pub is_reply: bool,
    /// Smart matching: address hashes of From, To and Cc, sorted.
    pub participants: Vec<u64>,
    /// Scored mode: the patch series whose siblings to look for.
    pub series: Option<SeriesTag>,
    /// Whether the smart-matching parts (everything but the tokens) are
    /// filled: staged correlation derives them only when smart matching
    /// gets to run.
    pub for_smart: bool,
}

impl Derived {
    /// Derives everything from `f` under `s`.
    pub fn of(f: &MessageFeatures, s: &CorrelationSettings) -> Derived {
        let mut d = Derived::tokens_of(f, s);
        d.add_smart(f, s);
        d
    }

    /// Only what the methods before smart matching need: the tokens.
    fn tokens_of(f: &MessageFeatures, s: &CorrelationSettings) -> Derived {
        Derived {
            subject_tokens: token::find_tokens(&s.token, &f.subject),
            ..Derived::default()
        }
    }

    /// Adds the smart-matching parts (nothing when smart matching is off).
    fn add_smart(&mut self, f: &MessageFeatures, s: &CorrelationSettings) {
        self.for_smart = true;
        if !s.smart_matching {
            return;
        }
        self.participants = f.participants();
        if s.smart.mode == SmartMode::Scored {
            self.base_subject = Some(if self.subject_tokens.is_empty() {
                subject::base_subject(&f.subject)
            } else {
                let spans: Vec<_> = self.subject_tokens.iter().map(|t| t.span.clone()).collect();
                subject::base_subject(&token::remove_spans(&f.subject, &spans))
            });
            self.is_reply = subject::is_reply_or_forward(&f.subject);
            self.series = series_tag_to_match(f, self.is_reply);
        }
    }
}

/// The slice of the store's indexes relevant to one message.
#[derive(Debug, Clone, Default)]
pub struct Indexes<'a> {
    /// Normalised Message-ID → tracked email.
    pub by_message_id: HashMap<String, TrackedEmail>,
    /// Token digit run → tracked email that carried it.
    pub by_token: HashMap<String, TrackedEmail>,
    /// Thread-Index root → first tracked email of that conversation.
    pub by_thread_root: HashMap<String, TrackedEmail>,
    /// Fingerprint index postings of the probed shingles (at most
    /// [`MAX_SHINGLE_POSTINGS`] each; absent: no tracked email has it).
    pub by_shingle: HashMap<u64, Vec<TrackedEmail>>,
    /// Smart-matching candidates from the requested buckets, and those
    /// [`shingle_candidate_ids`] picked from `by_shingle`.
    pub candidates: Vec<SmartCandidate>,
    /// The mailbox's folder-tracking rules.
    pub folder_rules: &'a [FolderRule],
    /// [`LookupKeys::derived`] of the keys this slice was resolved for
    /// (same message, same settings); `None`: the methods derive it.
    pub derived: Option<Arc<Derived>>,
}

/// The outcome of correlation for one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub method: CorrelationMethod,
    pub regarding: Option<RecordRef>,
    /// Confidence 0–1.
    pub score: f32,
    /// Short human-readable lines explaining the decision.
    pub reasons: Vec<String>,
    /// The tracked email this one was linked through, if any.
    pub correlated_with: Option<ActivityId>,
}

impl Decision {
    /// No method matched.
    pub fn unmatched(reasons: Vec<String>) -> Self {
        Decision {
            method: CorrelationMethod::None,
            regarding: None,
            score: 0.0,
            reasons,
            correlated_with: None,
        }
    }

    fn matched(method: CorrelationMethod, t: &TrackedEmail, score: f32, reason: String) -> Self {
        Decision {
            method,
            regarding: t.regarding.clone(),
            score,
            reasons: vec![reason],
            correlated_with: Some(t.activity),
        }
    }
}

/// Normalises a Message-ID for index keys: angle brackets and surrounding
/// white space removed, lower-cased (providers change case of the domain part).
pub fn normalize_message_id(id: &str) -> String {
    normalized_message_id(id).into_owned()
}

/// [`normalize_message_id`], borrowing `id` when it is normalised already
/// (parse stores ids without brackets, so only upper case forces a copy):
/// the methods look every referenced id up again, without allocating.
fn normalized_message_id(id: &str) -> Cow<'_, str> {
    let t = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    if t.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(t.to_ascii_lowercase())
    } else {
        Cow::Borrowed(t)
    }
}

/// Bucket of the Dynamics mode: the sorted subject word hashes (tokens removed).
fn dynamics_bucket(sorted_hashes: &[u64]) -> Option<u64> {
    if sorted_hashes.is_empty() {
        return None;
    }
    Some(subject::fnv1a64_bytes(
        std::iter::once(b'd').chain(sorted_hashes.iter().flat_map(|h| h.to_le_bytes())),
    ))
}

/// Bucket of the scored mode: the base subject.
fn scored_bucket(base_subject: &str) -> Option<u64> {
    if base_subject.is_empty() {
        return None;
    }
    Some(subject::fnv1a64_bytes(
        b"s\0".iter().copied().chain(base_subject.bytes()),
    ))
}

fn sorted_subject_hashes(f: &MessageFeatures, s: &CorrelationSettings) -> Vec<u64> {
    let without_tokens = subject::strip_tokens(&f.subject, &s.token);
    let mut h = subject::subject_word_hashes(&without_tokens, s.smart.hash_max_count);
    h.sort_unstable();
    h
}

fn thread_root(f: &MessageFeatures) -> Option<String> {
    f.thread_index
        .as_deref()
        .and_then(|t| thread_index::decode(t).ok())
        .map(|t| t.root_key())
}

/// The store keys a message needs resolved before [`correlate`] runs: all
/// of them (staged correlation asks for them bit by bit instead, see
/// [`correlate_staged`]).
pub fn lookup_keys(f: &MessageFeatures, s: &CorrelationSettings) -> LookupKeys {
    let mut keys = direct_lookup_keys(f, s);
    add_candidate_keys(&mut keys, f, s);
    add_quoted_keys(&mut keys, f, s);
    keys
}

/// The keys of the methods before smart matching: Message-IDs, token
/// digits, the Thread-Index root.
pub fn direct_lookup_keys(f: &MessageFeatures, s: &CorrelationSettings) -> LookupKeys {
    let mut ids: Vec<String> = Vec::new();
    for id in f.in_reply_to.iter().chain(f.references.iter().rev()) {
        let n = normalized_message_id(id);
        if !n.is_empty() && !ids.iter().any(|x| *x == n) {
            ids.push(n.into_owned());
        }
    }
    let derived = Derived::tokens_of(f, s);
    let mut token_digits: Vec<String> = Vec::new();
    for t in &derived.subject_tokens {
        let d = t.token.digits();
        if !token_digits.contains(&d) {
            token_digits.push(d);
        }
    }
    LookupKeys {
        message_ids: ids,
        token_digits,
        thread_root: thread_root(f),
        buckets: Vec::new(),
        shingles: Vec::new(),
        derived: Arc::new(derived),
    }
}

/// Adds the smart-matching buckets (and the smart-matching parts of
/// [`LookupKeys::derived`]) to `keys`; nothing when smart matching is off.
pub fn add_candidate_keys(keys: &mut LookupKeys, f: &MessageFeatures, s: &CorrelationSettings) {
    Arc::make_mut(&mut keys.derived).add_smart(f, s);
    keys.buckets = candidate_buckets(&keys.derived, f, s);
}

/// The smart-matching buckets of a message whose smart-matching features
/// are derived (`derived.for_smart`); empty when smart matching is off.
fn candidate_buckets(derived: &Derived, f: &MessageFeatures, s: &CorrelationSettings) -> Vec<u64> {
    if !s.smart_matching {
        return Vec::new();
    }
    match s.smart.mode {
        SmartMode::Dynamics => dynamics_bucket(&sorted_subject_hashes(f, s)),
        SmartMode::Scored => derived.base_subject.as_deref().and_then(scored_bucket),
    }
    .into_iter()
    .chain(derived.series.as_ref().map(series_bucket))
    .collect()
}

/// Sets the fingerprint probes of `keys` from `f`'s quoted shingles (scored
/// mode): the second stage of staged correlation, after
/// [`MessageFeatures::add_quoted_features`], without recomputing the rest.
pub fn add_quoted_keys(keys: &mut LookupKeys, f: &MessageFeatures, s: &CorrelationSettings) {
    keys.shingles = if s.wants_body_features() {
        f.quoted_shingles
            .iter()
            .take(SHINGLE_PROBES)
            .copied()
            .collect()
    } else {
        Vec::new()
    };
}

/// Activities the fingerprint index links to, with their number of shingle
/// hits, most hits first: shingles whose postings span more than
/// [`MAX_SHINGLE_RECORDS`] records are ignored as boilerplate; an activity
/// needs [`MIN_SHINGLE_HITS`]. Pure; stores call it to know which candidates
/// to load.
pub fn shingle_candidate_ids(
    by_shingle: &HashMap<u64, Vec<TrackedEmail>>,
) -> Vec<(ActivityId, usize)> {
    let mut hits: HashMap<ActivityId, usize> = HashMap::default();
    for postings in by_shingle.values() {
        let mut records: Vec<&Option<RecordRef>> = Vec::new();
        for t in postings {
            if !records.contains(&&t.regarding) {
                records.push(&t.regarding);
            }
        }
        if records.len() > MAX_SHINGLE_RECORDS {
            continue;
        }
        for t in postings {
            *hits.entry(t.activity).or_default() += 1;
        }
    }
    let mut out: Vec<(ActivityId, usize)> = hits
        .into_iter()
        .filter(|(_, n)| *n >= MIN_SHINGLE_HITS)
        .collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    out.truncate(MAX_SHINGLE_CANDIDATES);
    out
}

/// What to index for a tracked email. Both smart-matching buckets are
/// written, so switching modes later needs no re-index.
pub fn index_entry(
    f: &MessageFeatures,
    activity: ActivityId,
    s: &CorrelationSettings,
) -> IndexEntry {
    let mut token_digits: Vec<String> = Vec::new();
    for t in token::find_tokens(&s.token, &f.subject) {
        let d = t.token.digits();
        if !token_digits.contains(&d) {
            token_digits.push(d);
        }
    }
    let subject_hashes = sorted_subject_hashes(f, s);
    let base_subject = subject::base_subject_without_tokens(&f.subject, &s.token);
    let series = series_tag(f);
    let buckets = dynamics_bucket(&subject_hashes)
        .into_iter()
        .chain(scored_bucket(&base_subject))
        .chain(series.as_ref().map(series_bucket))
        .collect();
    IndexEntry {
        activity,
        token_digits,
        thread_root: thread_root(f),
        buckets,
        shingle_keys: f
            .body_shingles
            .iter()
            .take(SHINGLE_INDEX_KEYS)
            .copied()
            .collect(),
        candidate: SmartCandidate {
            activity,
            regarding: None,
            data: Arc::new(CandidateData {
                base_subject,
                subject_hashes,
                participants: f.participants(),
                sent_at: f.sent_at,
                shingles: f.body_shingles.clone(),
                series,
            }),
        },
    }
}

/// What one method concluded.
enum Step {
    /// Confident match: done.
    Match(Decision),
    /// A conflict that must not be guessed past: unmatched, done.
    Stop(Decision),
    /// Nothing confident; try the next method.
    Continue,
}

/// Decides what the message is regarding. Pure.
///
/// Expects the body features filled when
/// [`CorrelationSettings::wants_body_features`]; callers that want to skip
/// that cost when cheaper methods decide use [`correlate_staged`].
pub fn correlate(
    f: &MessageFeatures,
    idx: &Indexes<'_>,
    settings: &CorrelationSettings,
) -> Decision {
    run_methods(f, idx, settings, StopAt::Never).unwrap_or_else(|| Decision::unmatched(Vec::new()))
}

/// Where the method loop of a stage of staged correlation stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopAt {
    /// At smart matching (its candidates are not resolved yet).
    Smart,
    /// At the quoted-text part of scored smart matching (no fingerprint yet).
    Quote,
    Never,
}

/// Staged correlation: resolves keys and derives features bit by bit, as
/// far as the decision needs. Stage 1 resolves Message-IDs, tokens and the
/// Thread-Index root and runs the methods before smart matching (a reply
/// whose In-Reply-To is tracked stops here; a message without any of those
/// keys skips it); stage 2 adds the smart-matching buckets and, in scored
/// mode, lets a specific subject decide alone (only tried when the subject
/// could: a reply prefix and a specific base subject); stage 3 decodes the
/// quoted-text fingerprint from `body` (scored mode only) and runs
/// everything. `resolve` adds what a set of keys names to the index slice
/// (the store lookup; the only I/O, injected); each stage passes only its
/// new keys, so nothing is looked up twice. The decision is the one
/// [`correlate`] gives with every key resolved, except that a subject
/// decided in stage 2 is not second-guessed by quote-linked candidates of
/// other records.
pub fn correlate_staged<'a, E>(
    f: &mut MessageFeatures,
    body: &str,
    s: &CorrelationSettings,
    mut resolve: impl FnMut(&LookupKeys, &mut Indexes<'a>) -> Result<(), E>,
) -> Result<Decision, E> {
    let mut idx = Indexes::default();
    let direct = direct_lookup_keys(f, s);
    // Without smart matching stage 1 decides; without direct keys it cannot
    // match anything that stage 2 (which runs every method before smart
    // matching again, folder rules included) would not.
    if !s.smart_matching || direct.has_direct_keys() {
        resolve(&direct, &mut idx)?;
        if let Some(d) = run_methods(f, &idx, s, StopAt::Smart) {
            return Ok(d);
        }
    }
    // Only the new keys from here on; the derived features move along
    // (the slice lets go of them, so they are extended, not copied).
    idx.derived = None;
    let mut keys = LookupKeys {
        derived: direct.derived,
        ..LookupKeys::default()
    };
    add_candidate_keys(&mut keys, f, s);
    if !s.wants_body_features() {
        resolve(&keys, &mut idx)?;
        return Ok(correlate(f, &idx, s));
    }
    if subject_alone_may_decide(&keys.derived) {
        resolve(&keys, &mut idx)?;
        if let Some(d) = run_methods(f, &idx, s, StopAt::Quote) {
            return Ok(d);
        }
        keys.buckets.clear();
    }
    f.add_quoted_features(body);
    add_quoted_keys(&mut keys, f, s);
    resolve(&keys, &mut idx)?;
    Ok(correlate(f, &idx, s))
}

/// The method loop; `None` when it reached the stage's stop.
fn run_methods(
    f: &MessageFeatures,
    idx: &Indexes<'_>,
    settings: &CorrelationSettings,
    stop: StopAt,
) -> Option<Decision> {
    let derived_here;
    let d: &Derived = match &idx.derived {
        Some(d) if d.for_smart || stop == StopAt::Smart => d,
        _ => {
            derived_here = Derived::of(f, settings);
            &derived_here
        }
    };
    let mut notes = Vec::new();
    // A header match on a tracked email without a regarding record links the
    // email but lets later methods find the record.
    let mut linked: Option<(TrackedEmail, String)> = None;
    for method in &settings.order {
        let step = match method {
            CorrelationMethod::Folder => by_folder(f, idx),
            CorrelationMethod::InReplyTo => match by_headers(f, idx) {
                Some((t, reason)) if t.regarding.is_none() => {
                    notes.push(format!("{reason} (no regarding record)"));
                    linked.get_or_insert((t, reason));
                    Step::Continue
                }
                Some((t, reason)) => Step::Match(Decision::matched(
                    CorrelationMethod::InReplyTo,
                    &t,
                    1.0,
                    reason,
                )),
                None => Step::Continue,
            },
            CorrelationMethod::TrackingToken => by_token(f, idx, settings, d, &mut notes),
            CorrelationMethod::ConversationIndex => by_thread_index(f, idx, &mut notes),
            CorrelationMethod::SmartMatching
                if stop == StopAt::Smart && settings.smart_matching =>
            {
                return None;
            }
            CorrelationMethod::SmartMatching
                if stop == StopAt::Quote && settings.wants_body_features() =>
            {
                match by_subject_alone(f, idx, settings, d) {
                    Some(d) => Step::Match(d),
                    None => return None,
                }
            }
            CorrelationMethod::SmartMatching if settings.smart_matching => {
                match settings.smart.mode {
                    SmartMode::Dynamics => by_dynamics_smart(f, idx, settings, d, &mut notes),
                    SmartMode::Scored => by_scored_smart(f, idx, settings, d, &mut notes),
                }
            }
            _ => Step::Continue,
        };
        match step {
            Step::Match(mut d) => {
                d.reasons.extend(notes);
                return Some(d);
            }
            Step::Stop(mut d) => {
                d.reasons.extend(notes);
                return Some(d);
            }
            Step::Continue => {}
        }
    }
    if let Some((t, reason)) = linked {
        return Some(Decision {
            method: CorrelationMethod::InReplyTo,
            regarding: None,
            score: 1.0,
            reasons: vec![reason],
            correlated_with: Some(t.activity),
        });
    }
    if f.in_reply_to.is_empty() && f.references.is_empty() {
        notes.push("no In-Reply-To or References header".to_string());
    } else {
        notes.push("no referenced Message-ID is tracked".to_string());
    }
    Some(Decision::unmatched(notes))
}

fn by_folder(f: &MessageFeatures, idx: &Indexes<'_>) -> Step {
    let Some(rule) = idx
        .folder_rules
        .iter()
        .find(|r| r.folder.eq_ignore_ascii_case(&f.folder))
    else {
        return Step::Continue;
    };
    Step::Match(Decision {
        method: CorrelationMethod::Folder,
        regarding: Some(rule.regarding.clone()),
        score: 1.0,
        reasons: vec![format!(
            "folder {:?} is tracked to {}",
            rule.folder, rule.regarding
        )],
        correlated_with: None,
    })
}

/// In-Reply-To first, then References newest first.
fn by_headers(f: &MessageFeatures, idx: &Indexes<'_>) -> Option<(TrackedEmail, String)> {
    for id in &f.in_reply_to {
        let n = normalized_message_id(id);
        if let Some(t) = idx.by_message_id.get(n.as_ref()) {
            return Some((
                t.clone(),
                format!("In-Reply-To <{n}> = activity {}", t.activity),
            ));
        }
    }
    for id in f.references.iter().rev() {
        let n = normalized_message_id(id);
        if let Some(t) = idx.by_message_id.get(n.as_ref()) {
            return Some((
                t.clone(),
                format!("References contains <{n}> = activity {}", t.activity),
            ));
        }
    }
    None
}

fn rejection_text(r: &TokenRejection) -> String {
    match r {
        TokenRejection::Unsigned => "unsigned, but signed tokens are required".to_string(),
        TokenRejection::BadSignature => "signature invalid for the record it names".to_string(),
        TokenRejection::WrongDomain { domain } => {
            format!("signature bound to another domain (sender domain {domain})")
        }
    }
}

fn by_token(
    f: &MessageFeatures,
    idx: &Indexes<'_>,
    s: &CorrelationSettings,
    d: &Derived,
    notes: &mut Vec<String>,
) -> Step {
    let found: &[FoundToken] = &d.subject_tokens;
    let mut accepted: Vec<(&FoundToken, TrackedEmail, RecordRef)> = Vec::new();
    for ft in found {
        // The token is shown only in notes: displayed where one is written,
        // not for every token that matches cleanly.
        let shown = &ft.token;
        let mut buf = [0u8; token::MAX_DIGITS];
        let digits = match ft.token.digits_in(&mut buf) {
            Some(d) => Cow::Borrowed(d),
            None => Cow::Owned(ft.token.digits()),
        };
        let Some(t) = idx.by_token.get(digits.as_ref()) else {
            notes.push(format!("token {shown} is not known"));
            continue;
        };
        let Some(record) = t.regarding.clone() else {
            notes.push(format!(
                "token {shown} = activity {} (no regarding record)",
                t.activity
            ));
            continue;
        };
        let must_verify =
            s.token.signing.is_some() && (ft.token.signature.is_some() || s.require_signature);
        if must_verify {
            if let Err(why) = token::verify(
                &s.token,
                &ft.token,
                &record.to_string(),
                &f.counterpart_domain(),
            ) {
                notes.push(format!("token {shown} rejected: {}", rejection_text(&why)));
                continue;
            }
        }
        accepted.push((ft, t.clone(), record));
    }
    let Some((first, t, record)) = accepted.first() else {
        return Step::Continue;
    };
    if let Some((other, _, other_record)) = accepted.iter().find(|(_, _, r)| r != record) {
        return Step::Stop(Decision::unmatched(vec![format!(
            "tokens disagree: {} = {record}, {} = {other_record}",
            first.token, other.token
        )]));
    }
    let mut reason = format!(
        "subject token {} = {record} (activity {})",
        first.token, t.activity
    );
    if matches!(first.prefix, token::PrefixMatch::Previous(_)) {
        reason.push_str(", earlier prefix");
    }
    if first.token.signature.is_some() && s.token.signing.is_some() {
        reason.push_str(", signature valid");
    }
    if !first.mangled.is_empty() {
        reason.push_str(&format!(", repaired: {}", first.mangled.join(" ")));
    }
    Step::Match(Decision::matched(
        CorrelationMethod::TrackingToken,
        t,
        1.0,
        reason,
    ))
}

fn by_thread_index(f: &MessageFeatures, idx: &Indexes<'_>, notes: &mut Vec<String>) -> Step {
    let Some(raw) = f.thread_index.as_deref() else {
        return Step::Continue;
    };
    let ti = match thread_index::decode(raw) {
        Ok(ti) => ti,
        Err(e) => {
            notes.push(format!("Thread-Index ignored: {e}"));
            return Step::Continue;
        }
    };
    let root = ti.root_key();
    let Some(t) = idx.by_thread_root.get(&root) else {
        return Step::Continue;
    };
    let reason = format!(
        "Thread-Index root {}… = conversation of activity {} ({} child blocks)",
        &root[..12.min(root.len())],
        t.activity,
        ti.children
    );
    if t.regarding.is_none() {
        notes.push(format!("{reason} (no regarding record)"));
        return Step::Continue;
    }
    Step::Match(Decision::matched(
        CorrelationMethod::ConversationIndex,
        t,
        0.95,
        reason,
    ))
}

/// Size of the intersection of two sorted, deduplicated lists.
fn shared_count(a: &[u64], b: &[u64]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// Seconds between the candidate and the message when both dates are known.
fn seconds_after(f: &MessageFeatures, c: &SmartCandidate) -> Option<i64> {
    Some(f.sent_at?.saturating_sub(c.sent_at?))
}

fn by_dynamics_smart(
    f: &MessageFeatures,
    idx: &Indexes<'_>,
    s: &CorrelationSettings,
    d: &Derived,
    notes: &mut Vec<String>,
) -> Step {
    let hashes = sorted_subject_hashes(f, s);
    let participants = &d.participants;
    let window = i64::from(s.smart.window_days) * DAY;
    let mut passing: Vec<&SmartCandidate> = Vec::new();
    let mut near_miss: Option<String> = None;
    for c in &idx.candidates {
        if c.regarding.is_none() {
            continue;
        }
        let longer = hashes.len().max(c.subject_hashes.len());
        let common = shared_count(&hashes, &c.subject_hashes);
        if common + s.smart.hash_delta_subject_count < longer {
            continue;
        }
        let shared = shared_count(participants, &c.participants);
        if shared < s.smart.hash_min_address_count {
            near_miss.get_or_insert(format!(
                "smart match: activity {} has the subject but {shared} shared address(es) < {}",
                c.activity, s.smart.hash_min_address_count
            ));
            continue;
        }
        if seconds_after(f, c).is_some_and(|dt| dt.abs() > window) {
            near_miss.get_or_insert(format!(
                "smart match: activity {} is outside the {}-day window",
                c.activity, s.smart.window_days
            ));
            continue;
        }
        passing.push(c);
    }
    let Some(best) = passing.iter().max_by_key(|c| (c.sent_at, c.activity)) else {
        notes.extend(near_miss);
        return Step::Continue;
    };
    if let Some(other) = passing.iter().find(|c| c.regarding != best.regarding) {
        notes.push(format!(
            "smart match ambiguous: activity {} ({}) and activity {} ({})",
            best.activity,
            show(&best.regarding),
            other.activity,
            show(&other.regarding)
        ));
        return Step::Continue;
    }
    let t = TrackedEmail {
        activity: best.activity,
        regarding: best.regarding.clone(),
    };
    Step::Match(Decision::matched(
        CorrelationMethod::SmartMatching,
        &t,
        0.9,
        format!(
            "dynamics smart match: {} subject hash(es) equal + {} shared addresses with activity {}",
            hashes.len(),
            shared_count(participants, &best.participants),
            best.activity
        ),
    ))
}

/// `{:.2}` of a score without the float formatter's exact decimal
/// expansion (every match writes its score into a reason): for an `f32` in
/// [0, 1], x·100 is exact in `f64`, so rounding it half to even gives the
/// digits `{:.2}` prints (checked for every `f32` in [0, 1] once, and by a
/// test); integers format cheaply. Anything else goes to the formatter.
struct Fixed2(f32);

impl std::fmt::Display for Fixed2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !(0.0..=1.0).contains(&self.0) {
            return write!(f, "{:.2}", self.0);
        }
        // In 0..=100 by the range test.
        let n = (f64::from(self.0) * 100.0).round_ties_even() as u8;
        write!(f, "{}.{:02}", n / 100, n % 100)
    }
}

/// `{:.0}` of a percentage in [0, 100] the same way (rounding an `f32`'s
/// exact value half to even; also checked for every `f32` in [0, 100]).
struct Percent0(f32);

impl std::fmt::Display for Percent0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !(0.0..=100.0).contains(&self.0) {
            return write!(f, "{:.0}", self.0);
        }
        write!(f, "{}", f64::from(self.0).round_ties_even() as u8)
    }
}

/// A regarding record for reasons, `-` for none (written straight into
/// the reason, not built as a string first).
fn show(r: &Option<RecordRef>) -> impl std::fmt::Display + '_ {
    struct Show<'r>(&'r Option<RecordRef>);
    impl std::fmt::Display for Show<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.0 {
                Some(r) => r.fmt(f),
                None => f.write_str("-"),
            }
        }
    }
    Show(r)
}

/// One scored candidate and the parts of its score.
struct Scored<'c> {
    candidate: &'c SmartCandidate,
    score: f32,
    shared: usize,
    overlap: f32,
    rejected: Option<String>,
    /// Fingerprint-index hits (sampled shingles of its body in the quote).
    shingle_hits: usize,
    /// Seconds since the sibling of the same patch series, when the series
    /// rule applied.
    series_gap: Option<i64>,
}

/// Score weights: the same base subject only gets a candidate into the
/// bucket; what separates a reply from a new message with the same subject is
/// a reply prefix, who is on it, when, and above all whether it quotes the
/// parent. Subject + reply prefix + one shared participant + recent is just
/// enough; a stranger or a message without reply prefix needs quoted text.
const W_SUBJECT: f32 = 0.3;
const W_REPLY_PREFIX: f32 = 0.15;
const W_PARTICIPANTS: f32 = 0.15;
const W_TIME: f32 = 0.1;
const W_QUOTED: f32 = 0.4;
/// Series rule: a sibling (or cover letter) of the same patch series from
/// the same sender. Alone with the sender it stays below the default
/// threshold (0.4 + 0.075 + 0.1); it passes only with a shared recipient
/// too and within [`SERIES_GAP`].
const W_SERIES: f32 = 0.4;
/// Parts of one series are sent together (git send-email: seconds apart).
const SERIES_GAP: i64 = 2 * 3600;
/// Tracked emails with one base subject beyond which the subject counts as
/// generic (`Question`, `Invoice`) in scored smart matching.
const GENERIC_SUBJECT: usize = 8;
/// Bonus of a specific base subject that names exactly one record (see
/// [`by_subject_alone`]): with a reply prefix and a shared participant it
/// reaches the default threshold without quoted text.
const W_SPECIFIC_SUBJECT: f32 = 0.1;
/// Quoting half of the parent's sampled text counts as full quoting (replies
/// quote selectively).
const FULL_QUOTE: f32 = 0.5;

/// `quoted` is the message's quoted-text sample (empty: score without it).
#[allow(clippy::too_many_arguments)]
fn score_candidate<'c>(
    f: &MessageFeatures,
    quoted: &[u64],
    participants: &[u64],
    base: &str,
    is_reply: bool,
    series: Option<&SeriesTag>,
    c: &'c SmartCandidate,
    s: &CorrelationSettings,
) -> Scored<'c> {
    let window = i64::from(s.smart.window_days) * DAY;
    let subject = if *c.base_subject == *base { 1.0 } else { 0.0 };
    let shared = shared_count(participants, &c.participants);
    let p = (shared.min(2) as f32) / 2.0;
    let dt = seconds_after(f, c);
    let mut rejected = None;
    let time = match dt {
        // A reply is sent after its parent; an hour of clock skew is tolerated.
        Some(d) if d < -3600 => {
            rejected = Some("it was sent after this message".to_string());
            0.0
        }
        Some(d) if d > window => {
            rejected = Some(format!("it is older than {} days", s.smart.window_days));
            0.0
        }
        Some(d) => 1.0 - (d.max(0) as f32 / window.max(1) as f32),
        None => 0.5,
    };
    let overlap = fingerprint::quoted_overlap(&c.shingles, quoted);
    let reply = if is_reply { 1.0 } else { 0.0 };
    let series_gap = series_link(series, c, dt);
    let score = W_SUBJECT * subject
        + W_REPLY_PREFIX * reply
        + W_PARTICIPANTS * p
        + W_TIME * time
        + W_QUOTED * (overlap / FULL_QUOTE).min(1.0)
        + if series_gap.is_some() { W_SERIES } else { 0.0 };
    let score = score.min(1.0);
    Scored {
        candidate: c,
        score: if rejected.is_some() { 0.0 } else { score },
        shared,
        overlap,
        rejected,
        shingle_hits: 0,
        series_gap,
    }
}

/// The series rule's evidence: same series key (sender, N, version), another
/// part, both dates known and at most [`SERIES_GAP`] apart. Returns the gap.
fn series_link(series: Option<&SeriesTag>, c: &SmartCandidate, dt: Option<i64>) -> Option<i64> {
    let (mine, theirs) = (series?, c.series.as_ref()?);
    let dt = dt?;
    (mine.key == theirs.key && mine.part != theirs.part && dt.abs() <= SERIES_GAP).then_some(dt)
}

fn describe(base: &str, sc: &Scored<'_>) -> String {
    if let (Some(gap), Some(theirs)) = (sc.series_gap, &sc.candidate.series) {
        return format!(
            "patch series: same sender and marker ({}) as part {} in activity {}, sent {gap}s apart + {} shared participant(s) (score {})",
            theirs.key, theirs.part, sc.candidate.activity, sc.shared, Fixed2(sc.score)
        );
    }
    if *sc.candidate.base_subject != *base {
        return format!(
            "quoted text: {} indexed shingle(s) and {}% of the sampled text of activity {} (subject '{}', here '{base}') + {} shared participant(s) (score {})",
            sc.shingle_hits,
            Percent0(sc.overlap * 100.0),
            sc.candidate.activity,
            sc.candidate.base_subject,
            sc.shared,
            Fixed2(sc.score)
        );
    }
    format!(
        "subject base '{base}' + {} shared participant(s) + {}% quoted overlap with activity {} (score {})",
        sc.shared,
        Percent0(sc.overlap * 100.0),
        sc.candidate.activity,
        Fixed2(sc.score)
    )
}

/// A base subject specific enough to name a conversation on its own: three
/// words and 15 characters, or two words one of which carries a digit
/// (`invoice 7781`). `question`, `hello`, `order status` are not.
fn is_specific_subject(base: &str) -> bool {
    let words = base.split(' ').filter(|w| !w.is_empty()).count();
    if words < 2 {
        return false;
    }
    // Fewer than 15 bytes is fewer than 15 characters; only longer
    // non-ASCII subjects need the characters counted.
    let long = base.len() >= 15 && (base.is_ascii() || base.chars().count() >= 15);
    (words >= 3 && long) || base.bytes().any(|b| b.is_ascii_digit())
}

/// Whether [`by_subject_alone`] can decide for a message with these
/// derived features: a reply prefix and a specific base subject.
fn subject_alone_may_decide(d: &Derived) -> bool {
    d.is_reply && is_specific_subject(d.base_subject.as_deref().unwrap_or_default())
}

/// The first stage of scored smart matching, which needs no body: a reply
/// (reply/forward prefix) whose specific base subject names exactly one
/// record among the tracked emails in the window, sharing a participant
/// with it, is regarding that record when subject, prefix, participants
/// and time alone reach the threshold. Quoted text could only add to that
/// score, so the costly fingerprint is left for the ambiguous cases:
/// generic subjects, subjects shared by several records, no prefix, no
/// shared participant. `None`: not decided here.
fn by_subject_alone(
    f: &MessageFeatures,
    idx: &Indexes<'_>,
    s: &CorrelationSettings,
    d: &Derived,
) -> Option<Decision> {
    if !subject_alone_may_decide(d) {
        return None;
    }
    let base = d.base_subject.as_deref().unwrap_or_default();
    let participants = &d.participants;
    let mut best: Option<Scored<'_>> = None;
    let mut record: Option<&RecordRef> = None;
    for c in &idx.candidates {
        let Some(r) = c.regarding.as_ref() else {
            continue;
        };
        if *c.base_subject != *base {
            continue;
        }
        // Without the quoted text, whether it is filled or not: the staged
        // and the full run must agree.
        let sc = score_candidate(f, &[], participants, base, d.is_reply, None, c, s);
        if sc.rejected.is_some() {
            continue;
        }
        match record {
            Some(known) if known != r => return None,
            _ => record = Some(r),
        }
        let better = best
            .as_ref()
            .is_none_or(|b| (sc.score, sc.candidate.activity) > (b.score, b.candidate.activity));
        if sc.shared > 0 && better {
            best = Some(sc);
        }
    }
    let best = best?;
    let score = (best.score + W_SPECIFIC_SUBJECT).min(1.0);
    if score < s.smart.threshold {
        return None;
    }
    let t = TrackedEmail {
        activity: best.candidate.activity,
        regarding: best.candidate.regarding.clone(),
    };
    Some(Decision::matched(
        CorrelationMethod::SmartMatching,
        &t,
        score,
        format!(
            "reply to subject base '{base}', which names only {} (activity {}) + {} shared participant(s); quoted text not needed (score {})",
            show(&t.regarding),
            t.activity,
            best.shared,
            Fixed2(score)
        ),
    ))
}

fn by_scored_smart(
    f: &MessageFeatures,
    idx: &Indexes<'_>,
    s: &CorrelationSettings,
    d: &Derived,
    notes: &mut Vec<String>,
) -> Step {
    if let Some(decision) = by_subject_alone(f, idx, s, d) {
        return Step::Match(decision);
    }
    let base = d.base_subject.as_deref().unwrap_or_default();
    let is_reply = d.is_reply;
    // Quote-linked candidates (fingerprint index) compete even when the
    // subject changed; the subject term then simply adds nothing.
    let quoted_hits: HashMap<ActivityId, usize> =
        shingle_candidate_ids(&idx.by_shingle).into_iter().collect();
    let series = d.series.as_ref();
    if base.is_empty() && quoted_hits.is_empty() && series.is_none() {
        return Step::Continue;
    }
    let participants = &d.participants;
    let same_subject = |c: &SmartCandidate| !base.is_empty() && *c.base_subject == *base;
    // A subject shared by many tracked emails (`Question`, `Invoice`) is no
    // evidence on its own, as a shingle shared by many records is not: then
    // only candidates the quoted text links compete (the mailbox's own
    // address is on all of them, so shared participants do not tell them
    // apart either).
    let generic = idx.candidates.iter().filter(|c| same_subject(c)).count() > GENERIC_SUBJECT;
    let mut scored: Vec<Scored<'_>> = idx
        .candidates
        .iter()
        .filter(|c| {
            c.regarding.is_some()
                && ((same_subject(c) && !generic)
                    || quoted_hits.contains_key(&c.activity)
                    || series_link(series, c, seconds_after(f, c)).is_some())
        })
        .map(|c| {
            let mut sc = score_candidate(
                f,
                &f.quoted_shingles,
                participants,
                base,
                is_reply,
                series,
                c,
                s,
            );
            sc.shingle_hits = quoted_hits.get(&c.activity).copied().unwrap_or(0);
            sc
        })
        .collect();
    // Best first; on equal scores the newer candidate first (stable output).
    scored.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.candidate.activity.cmp(&a.candidate.activity))
    });
    let Some(best) = scored.first() else {
        return Step::Continue;
    };
    if let Some(why) = &best.rejected {
        notes.push(format!(
            "smart match: best candidate activity {} rejected: {why}",
            best.candidate.activity
        ));
        return Step::Continue;
    }
    if best.score < s.smart.threshold {
        notes.push(format!(
            "smart match below threshold {}: {}",
            Fixed2(s.smart.threshold),
            describe(base, best)
        ));
        return Step::Continue;
    }
    // Equal (within rounding) best scores for different records: do not guess.
    if let Some(rival) = scored
        .iter()
        .skip(1)
        .find(|o| o.candidate.regarding != best.candidate.regarding && best.score - o.score < 0.02)
    {
        notes.push(format!(
            "smart match ambiguous: activity {} ({}) and activity {} ({}) both score {}",
            best.candidate.activity,
            show(&best.candidate.regarding),
            rival.candidate.activity,
            show(&rival.candidate.regarding),
            Fixed2(best.score)
        ));
        return Step::Continue;
    }
    let t = TrackedEmail {
        activity: best.candidate.activity,
        regarding: best.candidate.regarding.clone(),
    };
    Step::Match(Decision::matched(
        CorrelationMethod::SmartMatching,
        &t,
        best.score.clamp(0.0, 1.0),
        describe(base, best),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(id: ActivityId, r: Option<&str>) -> TrackedEmail {
        TrackedEmail {
            activity: id,
            regarding: r.map(|s| s.parse().unwrap()),
        }
    }

    fn defaults() -> CorrelationSettings {
        CorrelationSettings::default()
    }

    #[test]
    fn specific_subjects_name_a_conversation_generic_ones_do_not() {
        for specific in [
            "invoice 7781",
            "quarterly report for acme",
            "ref 12 a",
            "счёт за услуги связи",
        ] {
            assert!(is_specific_subject(specific), "{specific}");
        }
        for generic in [
            "question",
            "hello",
            "order status",
            "7781",
            "a b c",
            "short one two",
            "счёт за газ",
            "",
        ] {
            assert!(!is_specific_subject(generic), "{generic}");
        }
    }

    /// Buckets are stored: their hashes must not change with the code that
    /// computes them (`d` + little-endian word hashes; `s\0` + base subject).
    #[test]
    fn bucket_hashes_keep_their_stored_form() {
        let words = [3u64, 0x0102_0304_0506_0708];
        let mut bytes = vec![b'd'];
        for h in words {
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        assert_eq!(dynamics_bucket(&words), Some(subject::fnv1a64(&bytes)));
        assert_eq!(dynamics_bucket(&[]), None);
        assert_eq!(
            scored_bucket("invoice 7781"),
            Some(subject::fnv1a64(b"s\0invoice 7781"))
        );
        assert_eq!(scored_bucket(""), None);
    }

    #[test]
    fn message_ids_are_normalised_and_borrowed_when_already_normal() {
        assert_eq!(
            normalize_message_id(" <AbC@Example.COM> "),
            "abc@example.com"
        );
        assert!(matches!(
            normalized_message_id("abc@example.com"),
            Cow::Borrowed("abc@example.com")
        ));
        assert!(matches!(
            normalized_message_id("<abc@example.com>"),
            Cow::Borrowed("abc@example.com")
        ));
        assert!(matches!(normalized_message_id("Abc@x"), Cow::Owned(ref o) if o == "abc@x"));
        assert_eq!(normalize_message_id("<>"), "");
    }

    #[test]
    fn in_reply_to_wins_over_references_and_explains_itself() {
        let f = MessageFeatures {
            in_reply_to: vec!["<B@x>".into()],
            references: vec!["<a@x>".into(), "<b@x>".into()],
            ..Default::default()
        };
        let mut idx = Indexes::default();
        idx.by_message_id
            .insert("a@x".into(), tracked(1, Some("case:1")));
        idx.by_message_id
            .insert("b@x".into(), tracked(2, Some("case:2")));
        let d = correlate(&f, &idx, &defaults());
        assert_eq!(d.method, CorrelationMethod::InReplyTo);
        assert_eq!(d.regarding.unwrap().to_string(), "case:2");
        assert_eq!(
            d.reasons,
            vec!["In-Reply-To <b@x> = activity 2".to_string()]
        );
    }

    #[test]
    fn references_are_searched_newest_first() {
        let f = MessageFeatures {
            references: vec!["<a@x>".into(), "<b@x>".into(), "<c@x>".into()],
            ..Default::default()
        };
        let mut idx = Indexes::default();
        idx.by_message_id
            .insert("a@x".into(), tracked(1, Some("case:1")));
        idx.by_message_id
            .insert("b@x".into(), tracked(2, Some("case:2")));
        let d = correlate(&f, &idx, &defaults());
        assert_eq!(d.correlated_with, Some(2));
        assert_eq!(
            lookup_keys(&f, &defaults()).message_ids,
            vec!["c@x", "b@x", "a@x"]
        );
    }

    #[test]
    fn folder_rule_overrides_headers() {
        let rules = vec![FolderRule {
            folder: "INBOX/Customers".into(),
            regarding: "account:7".parse().unwrap(),
        }];
        let f = MessageFeatures {
            folder: "INBOX/Customers".into(),
            in_reply_to: vec!["<a@x>".into()],
            ..Default::default()
        };
        let mut idx = Indexes {
            folder_rules: &rules,
            ..Default::default()
        };
        idx.by_message_id
            .insert("a@x".into(), tracked(1, Some("case:1")));
        let d = correlate(&f, &idx, &defaults());
        assert_eq!(d.method, CorrelationMethod::Folder);
        assert_eq!(d.regarding.unwrap().to_string(), "account:7");
    }

    #[test]
    fn parent_without_regarding_links_but_reports_it() {
        let f = MessageFeatures {
            in_reply_to: vec!["<a@x>".into()],
            ..Default::default()
        };
        let mut idx = Indexes::default();
        idx.by_message_id.insert("a@x".into(), tracked(9, None));
        let d = correlate(&f, &idx, &defaults());
        assert_eq!(d.method, CorrelationMethod::InReplyTo);
        assert_eq!(d.regarding, None);
        assert_eq!(d.correlated_with, Some(9));
    }

    #[test]
    fn unknown_references_stay_unmatched_with_a_reason() {
        let f = MessageFeatures {
            in_reply_to: vec!["<zz@x>".into()],
            ..Default::default()
        };
        let d = correlate(&f, &Indexes::default(), &defaults());
        assert_eq!(d.method, CorrelationMethod::None);
        assert_eq!(
            d.reasons,
            vec!["no referenced Message-ID is tracked".to_string()]
        );
    }

    fn index_of(
        entries: &[(&MessageFeatures, ActivityId, &str)],
        s: &CorrelationSettings,
    ) -> MemIndex {
        let mut m = MemIndex::default();
        for (f, id, r) in entries {
            let rec: RecordRef = r.parse().unwrap();
            m.insert_message_ids(&f.message_ids, *id, Some(rec.clone()));
            m.insert_entry(&index_entry(f, *id, s), Some(rec));
        }
        m
    }

    fn run(f: &MessageFeatures, m: &MemIndex, s: &CorrelationSettings) -> Decision {
        correlate(f, &m.lookup(&lookup_keys(f, s)), s)
    }

    /// [`correlate_staged`] from scratch; also whether it had to decode the
    /// quoted-text fingerprint.
    fn run_staged(
        f: &MessageFeatures,
        body: &str,
        m: &MemIndex,
        s: &CorrelationSettings,
    ) -> (Decision, bool) {
        let mut g = f.clone();
        g.quoted_shingles.clear();
        let d = correlate_staged(&mut g, body, s, |k, slice| {
            m.fill(k, slice);
            Ok::<_, std::convert::Infallible>(())
        })
        .unwrap_or_else(|never| match never {});
        (d, !g.quoted_shingles.is_empty())
    }

    #[test]
    fn mangled_token_resolves_to_the_record_of_its_carrier() {
        let s = defaults();
        let parent = MessageFeatures {
            subject: "Invoice 7781 CRM:0001001".into(),
            ..Default::default()
        };
        let m = index_of(&[(&parent, 42, "case:7")], &s);
        let reply = MessageFeatures {
            subject: "AW: [EXTERNAL] [crm : 0001001] Invoice 7781".into(),
            ..Default::default()
        };
        let d = run(&reply, &m, &s);
        assert_eq!(d.method, CorrelationMethod::TrackingToken);
        assert_eq!(d.regarding.unwrap().to_string(), "case:7");
        assert!(d.reasons[0].starts_with("subject token CRM:0001001 = case:7 (activity 42)"));
    }

    #[test]
    fn two_tokens_for_two_records_are_a_tie_not_a_guess() {
        let s = defaults();
        let a = MessageFeatures {
            subject: "A CRM:0001001".into(),
            ..Default::default()
        };
        let b = MessageFeatures {
            subject: "B CRM:0001002".into(),
            ..Default::default()
        };
        let m = index_of(&[(&a, 1, "case:1"), (&b, 2, "case:2")], &s);
        let both = MessageFeatures {
            subject: "RE: A CRM:0001001 CRM:0001002".into(),
            ..Default::default()
        };
        let d = run(&both, &m, &s);
        assert_eq!(d.method, CorrelationMethod::None);
        assert!(d.reasons[0].contains("case:1") && d.reasons[0].contains("case:2"));
    }

    #[test]
    fn signed_token_from_another_domain_is_rejected_with_a_reason() {
        let mut s = defaults();
        s.token.signing = Some(token::SigningKey {
            current: b"0123456789abcdef0123".to_vec(),
            previous: vec![],
        });
        let tok = token::generate_signed(&s.token, 1, 1, "case:7", "contoso.com");
        let parent = MessageFeatures {
            subject: format!("Offer {tok}"),
            ..Default::default()
        };
        let m = index_of(&[(&parent, 5, "case:7")], &s);
        let mut reply = MessageFeatures {
            subject: format!("RE: Offer {tok}"),
            from: vec!["buyer@contoso.com".into()],
            ..Default::default()
        };
        assert_eq!(run(&reply, &m, &s).method, CorrelationMethod::TrackingToken);
        reply.from = vec!["eve@fabrikam.com".into()];
        let d = run(&reply, &m, &s);
        assert_eq!(d.method, CorrelationMethod::None);
        assert!(
            d.reasons[0].contains("rejected: signature bound to another domain"),
            "{:?}",
            d.reasons
        );
        // Unsigned tokens pass unless signatures are required.
        reply.subject = "RE: Offer CRM:0001001".into();
        assert_eq!(run(&reply, &m, &s).method, CorrelationMethod::TrackingToken);
        s.require_signature = true;
        assert_eq!(run(&reply, &m, &s).method, CorrelationMethod::None);
    }

    #[test]
    fn previous_prefix_tokens_still_resolve() {
        let mut s = defaults();
        let parent = MessageFeatures {
            subject: "Quote TKT:0001003".into(),
            ..Default::default()
        };
        s.token.prefix = "TKT:".into();
        let m = index_of(&[(&parent, 3, "case:3")], &s);
        s.token.prefix = "CRM:".into();
        s.token.previous_prefixes = vec!["TKT:".into()];
        let reply = MessageFeatures {
            subject: "Re: Quote TKT:0001003".into(),
            ..Default::default()
        };
        let d = run(&reply, &m, &s);
        assert_eq!(d.regarding.unwrap().to_string(), "case:3");
        assert!(d.reasons[0].contains("earlier prefix"));
    }

    #[test]
    fn thread_index_child_matches_the_root_conversation() {
        let s = defaults();
        let root = thread_index::encode_root(133_000_000_000_000_000, [7; 16]);
        let child = thread_index::encode_child(&root, 10_000_000, 1).unwrap();
        let parent = MessageFeatures {
            thread_index: Some(root),
            ..Default::default()
        };
        let m = index_of(&[(&parent, 11, "opportunity:9")], &s);
        let reply = MessageFeatures {
            thread_index: Some(child),
            ..Default::default()
        };
        let d = run(&reply, &m, &s);
        assert_eq!(d.method, CorrelationMethod::ConversationIndex);
        assert_eq!(d.correlated_with, Some(11));
        assert!(d.reasons[0].contains("1 child blocks"));
    }

    fn smart(mode: SmartMode) -> CorrelationSettings {
        CorrelationSettings {
            smart_matching: true,
            smart: SmartSettings {
                mode,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    const PARENT_BODY: &str = "Hello team, the invoice for the March delivery is attached. \
        Please check the quantities on line four because the warehouse counted two \
        pallets less than the order said, and let me know before Friday.";

    fn parent_features() -> MessageFeatures {
        let mut f = MessageFeatures {
            subject: "Invoice 7781".into(),
            from: vec!["ann@contoso.com".into()],
            to: vec!["bob@fabrikam.com".into()],
            sent_at: Some(1_000_000),
            ..Default::default()
        };
        f.add_body_features(PARENT_BODY);
        f
    }

    #[test]
    fn dynamics_smart_matching_needs_equal_subject_hashes_and_two_addresses() {
        let s = smart(SmartMode::Dynamics);
        let m = index_of(&[(&parent_features(), 17, "case:1")], &s);
        let mut reply = MessageFeatures {
            subject: "RE: Invoice 7781".into(),
            from: vec!["bob@fabrikam.com".into()],
            to: vec!["ann@contoso.com".into()],
            sent_at: Some(1_000_600),
            ..Default::default()
        };
        let d = run(&reply, &m, &s);
        assert_eq!(d.method, CorrelationMethod::SmartMatching);
        assert_eq!(d.correlated_with, Some(17));
        reply.to = vec!["carol@other.com".into()];
        let d = run(&reply, &m, &s);
        assert_eq!(d.method, CorrelationMethod::None);
        assert!(d.reasons[0].contains("1 shared address(es) < 2"));
        reply.to = vec!["ann@contoso.com".into()];
        reply.sent_at = Some(1_000_000 + 91 * DAY);
        assert_eq!(run(&reply, &m, &s).method, CorrelationMethod::None);
    }

    #[test]
    fn scored_smart_matching_uses_quoted_text_and_explains_rejections() {
        let s = smart(SmartMode::Scored);
        let m = index_of(&[(&parent_features(), 17, "case:1")], &s);
        let quoted: String = PARENT_BODY
            .split(". ")
            .map(|l| format!("> {l}\n"))
            .collect();
        let mut reply = MessageFeatures {
            subject: "Re: [EXTERNAL] Invoice 7781".into(),
            from: vec!["bob@fabrikam.com".into()],
            to: vec!["dave@elsewhere.com".into()],
            sent_at: Some(1_003_600),
            ..Default::default()
        };
        let body = format!("Checked, all fine.\n\n{quoted}");
        reply.add_body_features(&body);
        // A specific subject naming one record, a reply prefix and a shared
        // participant decide without the quoted text.
        let d = run(&reply, &m, &s);
        assert_eq!(d.method, CorrelationMethod::SmartMatching, "{d:?}");
        assert!(
            d.reasons[0].starts_with(
                "reply to subject base 'invoice 7781', which names only case:1 (activity 17) + 1 shared participant(s); quoted text not needed"
            ),
            "{:?}",
            d.reasons
        );
        assert_eq!(run_staged(&reply, &body, &m, &s), (d, false));
        // Forwarded to a colleague who answers: nobody shared, so the quote
        // has to show it.
        reply.from = vec!["zed@fabrikam.com".into()];
        let d = run(&reply, &m, &s);
        assert_eq!(d.method, CorrelationMethod::SmartMatching, "{d:?}");
        assert!(
            d.reasons[0].starts_with("subject base 'invoice 7781' + 0 shared participant(s) + "),
            "{:?}",
            d.reasons
        );
        assert_eq!(run_staged(&reply, &body, &m, &s), (d, true));
        // Same subject without reply prefix, no quote, one shared participant:
        // a new message, not enough.
        reply.subject = "Invoice 7781".into();
        reply.add_body_features("A new question about invoice 7781.");
        let d = run(&reply, &m, &s);
        assert_eq!(d.method, CorrelationMethod::None);
        assert!(
            d.reasons[0].starts_with("smart match below threshold 0.60"),
            "{:?}",
            d.reasons
        );
    }

    #[test]
    fn series_rule_needs_sender_recipient_marker_and_time_together() {
        let s = smart(SmartMode::Scored);
        let part = |k: u32, subject: &str, from: &str, to: &str, at: i64| MessageFeatures {
            message_ids: vec![format!("p{k}-{at}@x")],
            subject: format!("[PATCH v2 {k}/3] {subject}"),
            from: vec![from.into()],
            to: vec![to.into()],
            sent_at: Some(at),
            ..Default::default()
        };
        let cover = part(0, "Series cover", "dev@x.test", "list@y.test", 1_000_000);
        let m = index_of(&[(&cover, 1, "case:1")], &s);
        let sibling = part(2, "Other topic", "dev@x.test", "list@y.test", 1_000_060);
        let d = run(&sibling, &m, &s);
        assert_eq!(d.method, CorrelationMethod::SmartMatching, "{d:?}");
        // Headers that name an untracked parent: the client said where the
        // message belongs; no sibling guessing.
        let mut told = sibling.clone();
        told.in_reply_to = vec!["yes".into()];
        assert_eq!(run(&told, &m, &s).method, CorrelationMethod::None);
        assert!(d.reasons[0].contains("patch series"), "{:?}", d.reasons);
        // Same marker, sender only (another recipient): below threshold.
        let other_to = part(
            2,
            "Other topic",
            "dev@x.test",
            "elsewhere@z.test",
            1_000_060,
        );
        assert_eq!(run(&other_to, &m, &s).method, CorrelationMethod::None);
        // More than two hours later: no series evidence.
        let late = part(
            2,
            "Other topic",
            "dev@x.test",
            "list@y.test",
            1_000_000 + 3 * 3600,
        );
        assert_eq!(run(&late, &m, &s).method, CorrelationMethod::None);
        // Another sender, another N or another version: other series.
        for f in [
            part(2, "Other topic", "else@x.test", "list@y.test", 1_000_060),
            MessageFeatures {
                subject: "[PATCH v2 2/4] Other topic".into(),
                ..sibling.clone()
            },
            MessageFeatures {
                subject: "[PATCH v3 2/3] Other topic".into(),
                ..sibling.clone()
            },
            // A reply is not a series part.
            MessageFeatures {
                subject: "Re: [PATCH v2 2/3] Other topic".into(),
                ..sibling.clone()
            },
        ] {
            assert_eq!(run(&f, &m, &s).method, CorrelationMethod::None, "{f:?}");
        }
    }

    #[test]
    fn series_markers() {
        use subject::{series_marker, SeriesMarker};
        let m = |version, part, total| {
            Some(SeriesMarker {
                version,
                part,
                total,
            })
        };
        assert_eq!(series_marker("[PATCH 01/44] arch/arm: x"), m(1, 1, 44));
        assert_eq!(series_marker("[notmuch] [PATCH v2 2/2] x"), m(2, 2, 2));
        assert_eq!(series_marker("[RFC][PATCH 06/10] cifs"), m(1, 6, 10));
        assert_eq!(series_marker("[PATCHv3 0/4] cover"), m(3, 0, 4));
        assert_eq!(series_marker("Meeting notes (2/3)"), m(1, 2, 3));
        assert_eq!(series_marker("Notes (see 2/3)"), None);
        assert_eq!(series_marker("[PATCH 5/4] x"), None);
        assert_eq!(series_marker("[PATCH] x"), None);
        assert_eq!(series_marker("[PATCH 1/2 x"), None);
    }

    #[test]
    fn scored_tie_between_two_records_stays_unmatched() {
        let s = smart(SmartMode::Scored);
        let p = parent_features();
        let m = index_of(&[(&p, 1, "case:1"), (&p, 2, "case:2")], &s);
        let mut reply = p.clone();
        reply.subject = "Re: Invoice 7781".into();
        reply.sent_at = Some(1_000_100);
        reply.add_body_features(&format!("Agreed.\n> {PARENT_BODY}"));
        let d = run(&reply, &m, &s);
        assert_eq!(d.method, CorrelationMethod::None);
        assert!(d.reasons[0].contains("ambiguous"), "{:?}", d.reasons);
    }

    #[test]
    fn reason_numbers_print_as_the_formatter_does() {
        for v in [
            0.0f32, 0.005, 0.015, 0.125, 0.375, 0.5, 0.625, 0.875, 0.995, 1.0,
        ] {
            assert_eq!(Fixed2(v).to_string(), format!("{v:.2}"), "{v}");
        }
        for v in [0.0f32, 0.5, 1.5, 2.5, 9.5, 10.0, 41.4, 99.5, 100.0] {
            assert_eq!(Percent0(v).to_string(), format!("{v:.0}"), "{v}");
        }
        for v in [-0.004f32, -1.0, 1.005, 7.5, f32::NAN, f32::INFINITY] {
            assert_eq!(Fixed2(v).to_string(), format!("{v:.2}"), "{v}");
        }
        for v in [-0.4f32, 100.5, 250.0, f32::NAN] {
            assert_eq!(Percent0(v).to_string(), format!("{v:.0}"), "{v}");
        }
    }

    proptest::proptest! {
        #[test]
        fn fixed2_matches_the_formatter(v in 0.0f32..=1.0) {
            proptest::prop_assert_eq!(Fixed2(v).to_string(), format!("{v:.2}"));
        }

        #[test]
        fn percent0_matches_the_formatter(v in 0.0f32..=100.0) {
            proptest::prop_assert_eq!(Percent0(v).to_string(), format!("{v:.0}"));
        }
    }

    proptest::proptest! {
        /// The in-tree twin of the cargo-fuzz target: arbitrary bytes through
        /// parse, features, index and every method never panic.
        #[test]
        fn whole_path_never_panics(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1500),
            dynamics in proptest::bool::ANY,
        ) {
            let mut text = b"Message-ID: <a@x>\nSubject: Re: x CRM:0001001\nThread-Index: AQHWABCDEFGHIJKLMNOPQRSTUVWXYZab\n".to_vec();
            text.extend_from_slice(&bytes);
            for raw in [&bytes[..], &text[..]] {
                let Ok(p) = crate::parse::parse(raw, "INBOX", 1 << 20) else { continue };
                let mut f = p.features;
                f.add_body_features(&p.body_text);
                let s = smart(if dynamics { SmartMode::Dynamics } else { SmartMode::Scored });
                let m = index_of(&[(&f, 1, "case:1")], &s);
                let mut reply = f.clone();
                reply.quoted_shingles = f.body_shingles.clone();
                let _ = run(&f, &m, &s);
                let _ = run(&reply, &m, &s);
            }
        }
    }
}
