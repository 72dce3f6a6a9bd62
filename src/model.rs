//! Domain types, named as CRM admins know them from Dynamics 365 server-side
//! synchronization: server profiles, mailboxes, email activities, alerts.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch (UTC). The store and the API speak this; the
/// CLI and API render it as RFC 3339.
pub type UnixTime = i64;

/// Kind of email server profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProfileType {
    ExchangeOnline,
    ExchangeServer,
    ImapSmtp,
    Pop3Smtp,
    /// A local Maildir: the embedded default and a handy import source.
    Maildir,
}

impl ProfileType {
    /// Parses the configuration spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "exchange_online" => Self::ExchangeOnline,
            "exchange_server" => Self::ExchangeServer,
            "imap_smtp" => Self::ImapSmtp,
            "pop3_smtp" => Self::Pop3Smtp,
            "maildir" => Self::Maildir,
            _ => return None,
        })
    }
    /// Profiles that have folders (folder tracking) and can sync appointments,
    /// contacts and tasks. POP3 is email-only, as in Dynamics.
    pub fn has_folders(self) -> bool {
        !matches!(self, ProfileType::Pop3Smtp)
    }
    /// Whether appointments, contacts and tasks can be synchronized.
    pub fn supports_act(self) -> bool {
        matches!(
            self,
            ProfileType::ExchangeOnline | ProfileType::ExchangeServer
        )
    }
}

/// Who owns a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerKind {
    User,
    Queue,
}

/// Incoming email delivery method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncomingDelivery {
    None,
    ServerSideSync,
    /// A shared mailbox receiving mail forwarded by users' server-side rules.
    ForwardMailbox,
}

/// Outgoing email (and ACT) delivery method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    None,
    ServerSideSync,
}

/// Email address approval status; by default only approved mailboxes process mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Empty,
    Approved,
    Pending,
    Rejected,
}

/// Test & Enable status for one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TestStatus {
    #[default]
    NotRun,
    Success,
    Failure,
}

/// A direction of Test & Enable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestDirection {
    Incoming,
    Outgoing,
    /// Appointments, contacts and tasks.
    Act,
}

/// Last Test & Enable result for one direction (incoming, outgoing, ACT).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TestResult {
    pub status: TestStatus,
    pub completed_on: Option<UnixTime>,
    pub detail: Option<String>,
    /// Set when the test failed because another deployment's marker holds
    /// the mailbox: whose it is, which a forced test (the web page's Take
    /// over) replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<crate::deployment::Marker>,
}

impl TestResult {
    /// A test that passed at `at`, with what it found.
    pub fn passed(at: UnixTime, detail: String) -> TestResult {
        TestResult {
            status: TestStatus::Success,
            completed_on: Some(at),
            detail: Some(detail),
            held_by: None,
        }
    }

    /// A test that failed at `at`, with its cause.
    pub fn failed(at: UnixTime, detail: String) -> TestResult {
        TestResult {
            status: TestStatus::Failure,
            completed_on: Some(at),
            detail: Some(detail),
            held_by: None,
        }
    }

    /// A test the connector failed: the cause, and who holds the mailbox
    /// if that is why.
    pub fn failure(at: UnixTime, e: &crate::connector::ConnectorError) -> TestResult {
        TestResult {
            held_by: e.other_deployment().cloned(),
            ..TestResult::failed(at, e.to_string())
        }
    }
}

/// A reference to a CRM record, written `kind:id` (e.g. `case:42`, `account:contoso`).
///
/// Held as one shared string: correlation clones record references for
/// every index posting and candidate it looks at, so a clone is a reference
/// count, not two allocations.
#[derive(Debug, Clone)]
pub struct RecordRef {
    /// `kind:id`, kind lower-cased.
    text: Arc<str>,
    /// Byte offset of the `:` between kind and id.
    colon: usize,
}

impl RecordRef {
    /// The record type (`case`, `account`, …), lower case.
    pub fn kind(&self) -> &str {
        &self.text[..self.colon]
    }

    /// The record's id within its kind.
    pub fn id(&self) -> &str {
        &self.text[self.colon + 1..]
    }
}

impl PartialEq for RecordRef {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for RecordRef {}

impl std::hash::Hash for RecordRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl PartialOrd for RecordRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// By kind, then id (not by the joined text: `:` sorts between digits and letters).
impl Ord for RecordRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.kind(), self.id()).cmp(&(other.kind(), other.id()))
    }
}

impl fmt::Display for RecordRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for RecordRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, id) = s
            .split_once(':')
            .ok_or_else(|| format!("record reference {s:?} is not of the form kind:id"))?;
        let valid_kind =
            !kind.is_empty() && kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_kind || id.trim().is_empty() {
            return Err(format!("record reference {s:?} is not of the form kind:id"));
        }
        Ok(RecordRef {
            text: format!("{}:{id}", kind.to_ascii_lowercase()).into(),
            colon: kind.len(),
        })
    }
}

impl Serialize for RecordRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// In the API a record reference is its text, `kind:id`.
impl utoipa::PartialSchema for RecordRef {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[a-z0-9_]+:"))
            .description(Some(
                "A CRM record, `kind:id` (kind lower case `[a-z0-9_]+`), e.g. `case:42`",
            ))
            .examples(["account:fabrikam"])
            .into()
    }
}

impl utoipa::ToSchema for RecordRef {}

impl<'de> Deserialize<'de> for RecordRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Direction of an email activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Incoming,
    Outgoing,
}

/// How an activity was tied to its regarding record (Dynamics `correlationmethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CorrelationMethod {
    None,
    Skipped,
    InReplyTo,
    TrackingToken,
    ConversationIndex,
    SmartMatching,
    Folder,
    Custom,
}

impl CorrelationMethod {
    /// All methods, for metrics that must show zero counts too.
    pub const ALL: [CorrelationMethod; 8] = [
        CorrelationMethod::None,
        CorrelationMethod::Skipped,
        CorrelationMethod::InReplyTo,
        CorrelationMethod::TrackingToken,
        CorrelationMethod::ConversationIndex,
        CorrelationMethod::SmartMatching,
        CorrelationMethod::Folder,
        CorrelationMethod::Custom,
    ];

    /// The snake_case name used in config, JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CorrelationMethod::None => "none",
            CorrelationMethod::Skipped => "skipped",
            CorrelationMethod::InReplyTo => "in_reply_to",
            CorrelationMethod::TrackingToken => "tracking_token",
            CorrelationMethod::ConversationIndex => "conversation_index",
            CorrelationMethod::SmartMatching => "smart_matching",
            CorrelationMethod::Folder => "folder",
            CorrelationMethod::Custom => "custom",
        }
    }
}

impl fmt::Display for CorrelationMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a message came from: unique per (mailbox, folder, UIDVALIDITY, UID).
///
/// `uid` is a string so that POP3 UIDLs and Maildir unique names fit as well as
/// IMAP UIDs; `uidvalidity` is 0 for sources without one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SourceKey {
    pub mailbox: String,
    pub folder: String,
    pub uidvalidity: u64,
    pub uid: String,
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{};{}/{}",
            self.mailbox, self.folder, self.uidvalidity, self.uid
        )
    }
}

/// Store-assigned activity id.
pub type ActivityId = u64;

/// A tracked email, as stored and shown to admins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EmailActivity {
    pub id: ActivityId,
    pub mailbox: String,
    pub source: SourceKey,
    /// Every Message-ID this email is known under (the one we generated, the one a
    /// provider rewrote it to, `X-Microsoft-Original-Message-Id`).
    pub message_ids: Vec<String>,
    pub in_reply_to: Vec<String>,
    pub references: Vec<String>,
    pub direction: Direction,
    pub subject: String,
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub sent_at: Option<UnixTime>,
    pub received_at: UnixTime,
    pub regarding: Option<RecordRef>,
    pub method: CorrelationMethod,
    pub score: f32,
    pub reasons: Vec<String>,
    /// Activity this one was correlated through (parent reply, token owner…).
    pub correlated_with: Option<ActivityId>,
    pub content_hash: String,
    pub size: u64,
    /// Extra sources the same email was seen under (another folder, a new
    /// UIDVALIDITY, another mailbox it was also delivered to).
    #[serde(default)]
    pub also_seen_as: Vec<SourceKey>,
    /// For a forward mailbox: the user whose server-side rule forwarded it.
    #[serde(default)]
    pub forwarded_by: Option<String>,
    /// What kind of automatic mail this is, if it is (see [`AutomaticClass`]).
    #[serde(default)]
    pub automatic: Option<AutomaticClass>,
    /// The outgoing side must never answer this email (automatic mail).
    #[serde(default)]
    pub no_reply: bool,
    /// From, to, cc and bcc, each resolved to a CRM record or not (with why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parties: Vec<Party>,
    /// Outgoing email the daemon sends for the CRM: its send status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<SendState>,
}

/// Kind of automatically generated mail, as the filter classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AutomaticClass {
    /// Out-of-office and other automatic responses (RFC 3834 `auto-replied`,
    /// vendor headers, read receipts).
    AutoReply,
    /// A delivery status notification (RFC 3464) or a mailer daemon's message.
    Bounce,
    /// Bulk mail: `Precedence: bulk|junk`, newsletters with `List-Unsubscribe`,
    /// machine notifications (`Auto-Submitted: auto-generated`).
    Bulk,
    /// Mailing-list traffic: `List-Id` or `Precedence: list`.
    List,
}

impl AutomaticClass {
    /// The snake_case name used in config, JSON and reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            AutomaticClass::AutoReply => "auto_reply",
            AutomaticClass::Bounce => "bounce",
            AutomaticClass::Bulk => "bulk",
            AutomaticClass::List => "list",
        }
    }
}

impl fmt::Display for AutomaticClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EmailActivity {
    /// Every mailbox this email was delivered to, first-seen first: its own,
    /// then those of the copies in [`EmailActivity::also_seen_as`].
    pub fn mailboxes(&self) -> Vec<&str> {
        let mut out = vec![self.mailbox.as_str()];
        for s in &self.also_seen_as {
            if !out.contains(&s.mailbox.as_str()) {
                out.push(&s.mailbox);
            }
        }
        out
    }
}

/// What the pipeline did with a message, for the connector's follow-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckKind {
    /// Recorded (activity, duplicate or skipped): flag or delete as configured.
    Recorded,
    /// Quarantined: move to the failed-mail folder if configured.
    Failed,
}

/// A follow-up (keyword, delete, move) owed on a committed message. It is
/// written in the commit that records the message and removed by a later one
/// once carried out, so a crash in between cannot lose it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowUp {
    pub source: SourceKey,
    pub kind: AckKind,
    /// When the commit that owes it was made.
    pub recorded_at: UnixTime,
    /// Attempts that failed with a permanent error so far.
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A message that could not be turned into an activity; its bytes are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuarantineEntry {
    pub id: u64,
    pub source: SourceKey,
    pub reason: String,
    /// Where the raw bytes were saved; empty when they were never downloaded
    /// (over `max_message_size`: the message stays on the server).
    pub saved_as: String,
    pub size: u64,
    pub at: UnixTime,
    /// `unparseable`, `too_large` or `unfetchable` (the alert kind's
    /// `quarantine:<class>`); absent in entries from before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
}

impl QuarantineEntry {
    /// Its class; for an entry from before the class was kept, inferred:
    /// only unparseable messages have their bytes saved.
    pub fn class(&self) -> &str {
        match &self.class {
            Some(c) => c,
            None if self.saved_as.is_empty() => "too_large",
            None => "unparseable",
        }
    }
}

/// Alert severity, as in Dynamics.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum AlertLevel {
    Error,
    Warning,
    Information,
}

impl AlertLevel {
    /// The level's name as the API spells it (`error`, `warning`, `information`).
    pub fn as_str(self) -> &'static str {
        match self {
            AlertLevel::Error => "error",
            AlertLevel::Warning => "warning",
            AlertLevel::Information => "information",
        }
    }
}

/// A mailbox or profile alert. An alert is keyed by its subject (the
/// mailbox, or the profile for a profile alert) and its `kind`: while open,
/// the same condition raised again updates it (count, last seen, the latest
/// text and level) instead of adding another, so a mailbox failing every
/// minute for a day has one alert with a count, not 1,440.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Alert {
    pub id: u64,
    pub level: AlertLevel,
    /// What condition this is (`sync_failing`, `disabled`, `quarantine:unparseable`,
    /// `profile_failing`, …): with the subject, the alert's key. Alerts
    /// stored before kinds existed load with an empty kind.
    #[serde(default)]
    pub kind: String,
    pub mailbox: Option<String>,
    pub profile: Option<String>,
    /// The latest text raised for this condition.
    pub text: String,
    pub first_seen: UnixTime,
    pub last_seen: UnixTime,
    pub count: u64,
    /// When the condition cleared (e.g. the mailbox synced again); `None`
    /// while open. Alerts stored before this field existed load as open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<UnixTime>,
    /// When an operator acknowledged it (`POST /api/v1/alerts/{id}/acknowledge`);
    /// an acknowledged alert stays open until its condition clears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at: Option<UnixTime>,
}

impl Alert {
    /// Open (not resolved).
    pub fn is_open(&self) -> bool {
        self.resolved_at.is_none()
    }

    /// The mailbox the alert is about, else its profile (a profile alert).
    pub fn subject(&self) -> &str {
        self.mailbox
            .as_deref()
            .or(self.profile.as_deref())
            .unwrap_or("")
    }
}

/// An alert to raise: the key (`kind` + subject) and what it says.
#[derive(Debug, Clone, Copy)]
pub struct NewAlert<'a> {
    pub kind: &'a str,
    pub level: AlertLevel,
    /// The mailbox it is about; `None` for a profile (or daemon) alert.
    pub mailbox: Option<&'a str>,
    pub profile: Option<&'a str>,
    pub text: &'a str,
}

/// What an operator set on a mailbox at run time (Approve / Reject Email,
/// Enable / Disable, as on Dynamics' mailbox record), kept in the store
/// apart from the configuration: it survives restarts, and its approval
/// wins over the configuration's `approval`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MailboxControl {
    /// Approval set through the API; `None`: the configuration's.
    pub approval: Option<ApprovalStatus>,
    pub approval_changed_at: Option<UnixTime>,
    /// Set while an operator has the mailbox disabled.
    pub disabled_at: Option<UnixTime>,
}

/// Persistent per-mailbox state (what Dynamics keeps on the mailbox record).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MailboxState {
    pub name: String,
    /// False once a permanent error disabled the mailbox.
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub incoming_test: TestResult,
    pub outgoing_test: TestResult,
    pub act_test: TestResult,
    pub last_sync_at: Option<UnixTime>,
    pub last_success_at: Option<UnixTime>,
    pub last_sync_error: Option<String>,
    pub last_sync_error_at: Option<UnixTime>,
    pub items_processed: u64,
    pub items_failed: u64,
    pub transient_failures: u32,
    pub postponed_until: Option<UnixTime>,
    /// Consecutive cycles that found no mail; idle mailboxes back off.
    pub no_email_cycles: u32,
    /// Expiry of the OAuth access token used at the last login, if known.
    #[serde(default)]
    pub token_expires_at: Option<UnixTime>,
}

/// Sync position of one folder; committed in the same batch as its activities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderPosition {
    pub uidvalidity: u64,
    /// Next UID to fetch (IMAP), or 0 where the source has no order.
    pub next_uid: u64,
    pub highest_modseq: Option<u64>,
    /// Messages seen in the folder at the last completed scan.
    pub seen_count: u64,
    /// Messages below `next_uid` that the server listed but did not deliver
    /// (IMAP: SEARCH found them, FETCH failed or returned nothing): retried
    /// at the next cycles, quarantined after the profile's
    /// `missing_message_retries`. Kept here so the count survives restarts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry: Vec<RetryMessage>,
    /// Microsoft Graph: the delta (or next) link the folder's next request
    /// uses; `None` starts a full round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_link: Option<String>,
}

/// A message the server would not deliver yet, and how often it was tried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryMessage {
    /// IMAP UID in the folder (under the position's UIDVALIDITY).
    pub uid: u64,
    /// Fetch attempts so far, all failed.
    pub tries: u32,
    /// What went wrong the last time (server text, "not returned").
    pub reason: String,
}

/// Renders a Unix time as RFC 3339 for humans.
pub fn format_time(t: UnixTime) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

/// An address as the record directory, its index and parties compare it:
/// trimmed, lower-cased (Unicode, so an internationalised local part
/// compares the same everywhere).
pub fn normalize_address(address: &str) -> String {
    address.trim().to_lowercase()
}

/// Current wall-clock time; the only place the crate reads the clock for timestamps.
pub fn now() -> UnixTime {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ref_round_trips_and_rejects_garbage() {
        let r: RecordRef = "Case:42".parse().unwrap();
        assert_eq!(r.to_string(), "case:42");
        assert!("case".parse::<RecordRef>().is_err());
        assert!(":42".parse::<RecordRef>().is_err());
        assert!("ca se:42".parse::<RecordRef>().is_err());
        assert!("case: ".parse::<RecordRef>().is_err());
    }

    #[test]
    fn pop3_profiles_have_no_folders_or_act() {
        assert!(!ProfileType::Pop3Smtp.has_folders());
        assert!(!ProfileType::Pop3Smtp.supports_act());
        assert!(ProfileType::ImapSmtp.has_folders());
    }
}

// ---------------------------------------------------------------------------
// The CRM side: records the daemon learns, parties it resolves, events it
// delivers.

/// Record kinds that have a special meaning; any other kind (`case`,
/// `opportunity`, …) is a regarding-able record.
pub mod record_kind {
    pub const USER: &str = "user";
    pub const QUEUE: &str = "queue";
    pub const CONTACT: &str = "contact";
    pub const ACCOUNT: &str = "account";
    pub const LEAD: &str = "lead";
    /// Kinds a sender can resolve to for the `from_crm_records` track filter.
    pub const CUSTOMER_KINDS: [&str; 3] = [CONTACT, ACCOUNT, LEAD];
}

/// One CRM record in the daemon's directory: a user, queue, contact, account,
/// lead or any regarding-able record (`kind:id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Record {
    /// Lower case, `[a-z0-9_]+` (see [`record_kind`]).
    pub kind: String,
    /// The CRM's id (a GUID in Dataverse), as given.
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// Email addresses as given; the address index uses them lower-cased.
    #[serde(default)]
    pub emails: Vec<String>,
    /// Owning user or team (CRM id), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Dynamics' "email-enabled" (`donotemail` false, address valid): the
    /// `from_email_enabled_records` track filter looks at it.
    #[serde(default = "default_true")]
    pub email_enabled: bool,
    /// Users only: the Dynamics user number carried in tracking tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_number: Option<u32>,
    /// When the directory last changed this record (set by the store).
    #[serde(default)]
    pub updated_at: UnixTime,
}

fn default_true() -> bool {
    true
}

impl Record {
    /// `kind:id` of this record.
    pub fn reference(&self) -> Result<RecordRef, String> {
        format!("{}:{}", self.kind, self.id).parse()
    }
}

/// How a message names a party.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PartyRole {
    From,
    To,
    Cc,
    Bcc,
}

impl PartyRole {
    /// Dataverse `participationtypemask` (1 sender, 2 to, 3 cc, 4 bcc).
    pub fn participation_type_mask(self) -> u8 {
        match self {
            PartyRole::From => 1,
            PartyRole::To => 2,
            PartyRole::Cc => 3,
            PartyRole::Bcc => 4,
        }
    }
}

/// One address of an activity, resolved to a record or not (and why).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Party {
    pub role: PartyRole,
    /// The address as used in the message, lower-cased.
    pub address: String,
    /// The record it resolved to; `None` when unknown or ambiguous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordRef>,
    /// Why it is unresolved (no record, a tie, too many matches, with the
    /// candidates), or how it was resolved (auto-created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What an outbox event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A new activity.
    #[serde(rename = "activity.created")]
    ActivityCreated,
    /// An activity changed: re-pointed, seen in another mailbox, parties
    /// resolved later (`changes` names what).
    #[serde(rename = "activity.updated")]
    ActivityUpdated,
}

/// One event of the durable event log: written in the same atomic batch as
/// the activity change it reports, numbered in commit order (`seq` is the
/// pull feed's cursor and never reused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OutboxEvent {
    /// 1, 2, 3, … in commit order, without gaps.
    pub seq: u64,
    /// Stable id of this event (`evt_<seq>`), the same on every retry: the
    /// webhook's `webhook-id`, the receiver's dedupe key.
    pub id: String,
    pub kind: EventKind,
    pub activity_id: ActivityId,
    /// What changed for [`EventKind::ActivityUpdated`]: `regarding`,
    /// `also_seen_as`, `parties`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    pub at: UnixTime,
    /// The activity as this commit left it.
    pub activity: EmailActivity,
}

impl OutboxEvent {
    /// The stable event id for a sequence number.
    pub fn id_for(seq: u64) -> String {
        format!("evt_{seq}")
    }
}

/// Delivery state of one event for one consumer (a CRM adapter).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    pub seq: u64,
    pub activity_id: ActivityId,
    /// When the event was committed (the outbox's age counts from here).
    pub queued_at: UnixTime,
    pub attempts: u32,
    /// Not to be tried before this time (back-off, `Retry-After`).
    #[serde(default)]
    pub next_attempt_at: UnixTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// An event given up on after the dead-letter age, kept for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub consumer: String,
    pub state: DeliveryState,
    pub dead_at: UnixTime,
    pub reason: String,
}

// ---------------------------------------------------------------------------
// The outgoing side: email the CRM asks the daemon to send.

/// Send status of an outgoing email, with the Dynamics email status codes
/// it maps to (`statuscode` of the email activity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SendStatus {
    /// Queued, not tried yet (or waiting for a retry).
    PendingSend,
    /// "Sending, attempt N" was made durable before the SMTP transaction.
    Sending,
    Sent,
    /// Given up, with the reason (the server's reply, "delivery unknown").
    Failed,
    Canceled,
}

impl SendStatus {
    /// The snake_case name used in JSON and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            SendStatus::PendingSend => "pending_send",
            SendStatus::Sending => "sending",
            SendStatus::Sent => "sent",
            SendStatus::Failed => "failed",
            SendStatus::Canceled => "canceled",
        }
    }

    /// Parses [`SendStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending_send" => SendStatus::PendingSend,
            "sending" => SendStatus::Sending,
            "sent" => SendStatus::Sent,
            "failed" => SendStatus::Failed,
            "canceled" => SendStatus::Canceled,
            _ => return None,
        })
    }

    /// Dynamics' email `statuscode`: Pending Send 6, Sending 7, Sent 3,
    /// Failed 8, Canceled 5.
    pub fn dynamics_statuscode(self) -> u8 {
        match self {
            SendStatus::PendingSend => 6,
            SendStatus::Sending => 7,
            SendStatus::Sent => 3,
            SendStatus::Failed => 8,
            SendStatus::Canceled => 5,
        }
    }

    /// Dynamics' display name of the status.
    pub fn dynamics_name(self) -> &'static str {
        match self {
            SendStatus::PendingSend => "Pending Send",
            SendStatus::Sending => "Sending",
            SendStatus::Sent => "Sent",
            SendStatus::Failed => "Failed",
            SendStatus::Canceled => "Canceled",
        }
    }

    /// Whether the email still waits for the sender (pending or sending).
    pub fn is_queued(self) -> bool {
        matches!(self, SendStatus::PendingSend | SendStatus::Sending)
    }
}

impl fmt::Display for SendStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far an outgoing email got: carried on its activity
/// ([`EmailActivity::send`]), so every change reaches the CRM as an
/// `activity.updated` event with `changes = ["send_status"]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SendState {
    pub status: SendStatus,
    /// Dynamics' name of `status` ("Pending Send", "Sent", …).
    pub dynamics_status: String,
    /// Dynamics' `statuscode` of `status`.
    pub dynamics_statuscode: u8,
    /// SMTP transactions started so far.
    pub attempts: u32,
    /// Why it failed or was canceled; the last transient error while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub queued_at: UnixTime,
    /// When `status` was last changed.
    pub status_at: UnixTime,
    /// The tracking token appended to the subject (e.g. `CRM:0001001`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The CRM's own id of this email when the CRM created it (Dataverse
    /// `activityid` of an email left in Pending Send).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm_email_id: Option<String>,
}

impl SendState {
    /// A fresh state in `status` at `at`.
    pub fn new(status: SendStatus, at: UnixTime) -> Self {
        SendState {
            status,
            dynamics_status: status.dynamics_name().to_owned(),
            dynamics_statuscode: status.dynamics_statuscode(),
            attempts: 0,
            reason: None,
            queued_at: at,
            status_at: at,
            token: None,
            crm_email_id: None,
        }
    }

    /// Moves to `status` at `at`, keeping the Dynamics fields in step.
    pub fn set(&mut self, status: SendStatus, reason: Option<String>, at: UnixTime) {
        self.status = status;
        self.dynamics_status = status.dynamics_name().to_owned();
        self.dynamics_statuscode = status.dynamics_statuscode();
        self.reason = reason;
        self.status_at = at;
    }
}

/// Whether the Sent-folder copy of a sent email still has to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SentCopy {
    /// Not sent yet, or the profile files nothing (no Sent folder).
    #[default]
    NotNeeded,
    /// Sent; the APPEND (and the Message-ID read-back) is still owed: an
    /// at-least-once follow-up that first looks for the copy, so it is
    /// never made twice.
    Owed,
    /// Appended (or found there) and its stored Message-ID indexed.
    Done,
}

/// One queued outgoing email: the row the sender works from (`og/<id>`,
/// keyed by its activity id), kept after it is sent for the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutgoingEmail {
    /// The activity it is (direction outgoing, tracked to `regarding`).
    pub activity_id: ActivityId,
    /// Configured mailbox that sends it.
    pub mailbox: String,
    /// The Message-ID we generated (without angle brackets), in the MIME.
    pub message_id: String,
    /// SMTP `MAIL FROM`.
    pub envelope_from: String,
    /// SMTP `RCPT TO`: to, cc and bcc (bcc is not in the MIME).
    pub recipients: Vec<String>,
    /// The composed message exactly as sent (7-bit clean, so a string);
    /// every attempt sends these bytes, so the Message-ID never changes.
    pub mime: String,
    pub status: SendStatus,
    /// SMTP transactions started (the durable "attempt N" before each).
    pub attempts: u32,
    /// Not to be tried before this time (back-off after transient errors).
    #[serde(default)]
    pub next_attempt_at: UnixTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub sent_copy: SentCopy,
    /// Message-IDs the server stored the Sent copy under, when it rewrote ours.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_message_ids: Vec<String>,
    /// The client's idempotency key: a second request with it returns this
    /// email instead of queueing another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The activity this one answers (threading headers came from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<ActivityId>,
    pub queued_at: UnixTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<UnixTime>,
    /// When an operator last asked for a retry: `send_retry_for` counts
    /// from here instead of `queued_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_from: Option<UnixTime>,
    /// When a transport that confirms delivery later (Microsoft Graph's
    /// `202 Accepted`) took the current attempt: the email stays `sending`
    /// until its Sent copy shows up. `None` for SMTP and before acceptance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<UnixTime>,
    /// The provider's id of the Sent copy (Graph: the sent item's immutable
    /// id in Sent Items), once found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_item_id: Option<String>,
}
