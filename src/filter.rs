//! Filter: what is tracked, what is skipped and why, before and after correlation.
//!
//! Skipped mail is still recorded (method `skipped` with the reason), so nothing
//! disappears silently; the outgoing side uses the same markers never to answer an
//! automatic message, which is how auto-reply loops are broken.
//!
//! Automatic mail (out-of-office replies, bounces, bulk and list mail) goes
//! through correlation like any other: customers write through lists, groups
//! and ticket systems that set these headers, and their replies must attach.
//! Only then does the automatic-mail policy apply:
//! * mail that correlates to tracked email by folder, In-Reply-To/References,
//!   tracking token or Thread-Index is tracked whatever its headers, and
//!   flagged `no_reply` so the outgoing side never answers it;
//! * smart matching alone (subject and recipients) never attaches automatic
//!   mail: a newsletter or an out-of-office whose subject resembles a case is
//!   no evidence it belongs to it; such mail counts as correlating to nothing;
//! * mail that correlates to nothing gets its class's configured action
//!   ([`AutomaticMailPolicy`]): `track`, `track_no_reply` or `skip`.
//!
//! A link to an email that was itself skipped does not count as correlating:
//! a reply in a list thread nobody tracks stays as skipped as the thread.

use crate::config::TrackFilter;
use crate::correlate::Decision;
use crate::crm::parties::AddressResolution;
use crate::model::{AutomaticClass, CorrelationMethod, UnixTime};
use crate::parse::ParsedMessage;

/// What happens to automatic mail of one class that correlates to nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutomaticAction {
    /// Tracked like ordinary mail (the outgoing side may answer it).
    Track,
    /// Tracked, and flagged so the outgoing side never answers it.
    TrackNoReply,
    /// Recorded as `skipped`, with the class in the reason.
    Skip,
}

impl AutomaticAction {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AutomaticAction::Track => "track",
            AutomaticAction::TrackNoReply => "track_no_reply",
            AutomaticAction::Skip => "skip",
        }
    }
}

/// Per-mailbox policy for automatic mail (`automatic_mail` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutomaticMailPolicy {
    /// Uncorrelated out-of-office and other automatic replies. Default
    /// `skip`, as Dynamics 365 does: an out-of-office about nothing tracked
    /// is noise; one that correlates is tracked anyway.
    pub auto_reply: AutomaticAction,
    /// Uncorrelated bounces (delivery status notifications). Default `skip`.
    pub bounce: AutomaticAction,
    /// Uncorrelated bulk mail. Default `skip`.
    pub bulk: AutomaticAction,
    /// Uncorrelated mailing-list mail. Default `skip`.
    pub list: AutomaticAction,
    /// Loop detector: more than this many automatic replies and bounces
    /// between the same two addresses within `loop_window` seconds is a
    /// mail loop; the rest are skipped and one Warning raised.
    pub loop_limit: u32,
    /// Loop detector window, seconds.
    pub loop_window: UnixTime,
}

impl Default for AutomaticMailPolicy {
    fn default() -> Self {
        AutomaticMailPolicy {
            auto_reply: AutomaticAction::Skip,
            bounce: AutomaticAction::Skip,
            bulk: AutomaticAction::Skip,
            list: AutomaticAction::Skip,
            loop_limit: 5,
            loop_window: 60 * 60,
        }
    }
}

impl AutomaticMailPolicy {
    /// The action for uncorrelated mail of `class`.
    pub fn action(&self, class: AutomaticClass) -> AutomaticAction {
        match class {
            AutomaticClass::AutoReply => self.auto_reply,
            AutomaticClass::Bounce => self.bounce,
            AutomaticClass::Bulk => self.bulk,
            AutomaticClass::List => self.list,
        }
    }
}

/// Per-mailbox filtering policy.
#[derive(Debug, Clone)]
pub struct FilterPolicy {
    /// The mailbox's own address(es), lower-case.
    pub own_addresses: Vec<String>,
    /// What happens to automatic mail (see the module docs).
    pub automatic: AutomaticMailPolicy,
    pub track: TrackFilter,
}

/// Verdict before correlation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Correlate,
    /// Recorded with method `skipped` and this reason.
    Skip(String),
}

/// A message's automatic-mail class and the header that gave it away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Automatic {
    pub class: AutomaticClass,
    /// Human-readable evidence, e.g. `List-Id <dev.example>`.
    pub why: String,
}

/// Decides whether a message goes through correlation: only automatic mail
/// the mailbox sent itself (a mail loop) does not.
pub fn before_correlation(p: &ParsedMessage<'_>, policy: &FilterPolicy) -> Verdict {
    let from_self = p
        .features
        .from
        .iter()
        .any(|f| policy.own_addresses.iter().any(|o| o == f));
    // A list echoing our own post is a copy of our message, not a loop.
    match classify(p) {
        Some(a) if from_self && a.class != AutomaticClass::List => Verdict::Skip(format!(
            "mail loop: automatic message ({}) sent by this mailbox itself",
            a.why
        )),
        _ => Verdict::Correlate,
    }
}

/// One counterpart address of a message with its party resolution, for the
/// track filter: the sender of incoming mail, the recipients of mail the
/// mailbox sent itself.
#[derive(Debug, Clone, Copy)]
pub struct Counterpart<'a> {
    pub address: &'a str,
    pub resolution: &'a AddressResolution,
}

/// Applies the mailbox's track filter to a correlation decision (one that
/// is not skipped already); returns the skip reason when the email is not
/// tracked.
///
/// * Mail in a tracked folder (method `folder`) and seeded mail (`custom`)
///   are always tracked: filing a message into a tracked folder is the
///   user's explicit choice, under every filter, `none` included (as
///   `responses_only` always treated folder tracking).
/// * `none`: nothing else is tracked.
/// * A response (the email correlates to tracked email by any method) is
///   tracked under every other filter.
/// * `from_crm_records`: otherwise tracked when a counterpart resolves to a
///   contact, account or lead; `from_email_enabled_records`: to any
///   email-enabled record. A tie inside one kind still decides the kind
///   (the sender is one of those contacts, only not which one); too many
///   matches decide nothing.
pub fn track_verdict(
    d: &Decision,
    track: TrackFilter,
    counterparts: &[Counterpart<'_>],
) -> Option<String> {
    if matches!(
        d.method,
        CorrelationMethod::Folder | CorrelationMethod::Custom
    ) {
        return None;
    }
    let name = track.as_str();
    if track == TrackFilter::None {
        return Some(format!(
            "track filter is {name}: nothing is tracked (only mail filed into a tracked folder)"
        ));
    }
    if track == TrackFilter::All || d.method != CorrelationMethod::None {
        return None;
    }
    let (qualifies, wanted): (fn(&AddressResolution) -> bool, &str) = match track {
        TrackFilter::ResponsesToCrmEmail => {
            return Some(format!(
                "track filter is {name} and the email does not correlate to tracked email"
            ))
        }
        TrackFilter::FromCrmRecords => (
            |r| {
                r.kind
                    .as_deref()
                    .is_some_and(crate::crm::parties::is_customer_kind)
            },
            "a contact, account or lead",
        ),
        TrackFilter::FromEmailEnabledRecords => (
            |r| r.kind.is_some() && r.email_enabled,
            "an email-enabled record",
        ),
        TrackFilter::All | TrackFilter::None => return None,
    };
    if counterparts.iter().any(|c| qualifies(c.resolution)) {
        return None;
    }
    let who = if counterparts.is_empty() {
        "the email names no counterpart".to_string()
    } else {
        counterparts
            .iter()
            .map(|c| format!("{} is {}", c.address, c.resolution.summary()))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Some(format!(
        "track filter is {name}: the email does not correlate to tracked email and no counterpart resolves to {wanted} ({who})"
    ))
}

/// How a correlation decision counts for automatic mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correlation {
    /// Folder, headers, token, Thread-Index or a seed, to tracked email.
    Tracked,
    /// Smart matching alone: not enough for automatic mail.
    SmartOnly,
    /// Nothing, or only an email that was itself skipped.
    Nothing,
}

/// How `d` counts; `linked_to_skipped` tells whether the activity it links
/// through (when it names no record) was itself skipped.
pub fn correlation_of(d: &Decision, linked_to_skipped: bool) -> Correlation {
    let linked = d.regarding.is_some() || (d.correlated_with.is_some() && !linked_to_skipped);
    match d.method {
        CorrelationMethod::SmartMatching if d.regarding.is_some() => Correlation::SmartOnly,
        CorrelationMethod::Folder
        | CorrelationMethod::InReplyTo
        | CorrelationMethod::TrackingToken
        | CorrelationMethod::ConversationIndex
        | CorrelationMethod::Custom
            if linked =>
        {
            Correlation::Tracked
        }
        _ => Correlation::Nothing,
    }
}

/// What the automatic-mail policy makes of a correlated message.
#[derive(Debug, Clone, PartialEq)]
pub struct AutomaticVerdict {
    /// The decision to record (the correlation's, unmatched, or skipped).
    pub decision: Decision,
    /// The outgoing side must never answer it.
    pub no_reply: bool,
}

/// Applies the automatic-mail policy to automatic mail `a` once `d` is known
/// (see the module docs).
pub fn automatic_verdict(
    a: &Automatic,
    d: Decision,
    correlation: Correlation,
    policy: &AutomaticMailPolicy,
) -> AutomaticVerdict {
    let class = a.class;
    if correlation == Correlation::Tracked {
        let mut decision = d;
        decision.reasons.push(format!(
            "automatic mail ({class}: {}), tracked because it correlates; never answered",
            a.why
        ));
        return AutomaticVerdict {
            decision,
            no_reply: true,
        };
    }
    let mut notes = d.reasons;
    if correlation == Correlation::SmartOnly {
        notes.push("smart matching alone does not attach automatic mail".into());
    }
    let action = policy.action(class);
    let config = format!("automatic_mail.{class} = \"{}\"", action.as_str());
    match action {
        AutomaticAction::Skip => {
            let mut reasons = vec![format!(
                "automatic mail ({class}: {}) that correlates to no tracked email ({config})",
                a.why
            )];
            reasons.extend(notes);
            AutomaticVerdict {
                decision: Decision {
                    method: CorrelationMethod::Skipped,
                    regarding: None,
                    score: 0.0,
                    reasons,
                    correlated_with: None,
                },
                no_reply: true,
            }
        }
        AutomaticAction::Track | AutomaticAction::TrackNoReply => {
            let mut decision = if correlation == Correlation::SmartOnly {
                Decision::unmatched(notes)
            } else {
                Decision {
                    reasons: notes,
                    ..d
                }
            };
            decision
                .reasons
                .push(format!("automatic mail ({class}: {}), {config}", a.why));
            AutomaticVerdict {
                decision,
                no_reply: action == AutomaticAction::TrackNoReply,
            }
        }
    }
}

/// The automatic-mail class of a message, if it is automatic. Bounces first
/// (a DSN may also say `auto-replied`), then automatic replies, list mail,
/// bulk mail.
pub fn classify(p: &ParsedMessage<'_>) -> Option<Automatic> {
    let m = &p.auto;
    let is = |class, why: String| Some(Automatic { class, why });
    let report = m.report_type.as_deref();
    if report.is_some_and(|t| t.contains("delivery-status")) {
        return is(
            AutomaticClass::Bounce,
            "delivery status notification (multipart/report)".into(),
        );
    }
    let daemon = p.features.from.iter().find(|f| {
        let local = f.split('@').next().unwrap_or_default();
        local.eq_ignore_ascii_case("mailer-daemon") || local.eq_ignore_ascii_case("postmaster")
    });
    if let Some(d) = daemon {
        return is(
            AutomaticClass::Bounce,
            format!("sent by a mailer daemon ({d})"),
        );
    }
    let is_reply = !p.features.in_reply_to.is_empty() || !p.features.references.is_empty();
    if let Some(v) = &m.auto_submitted {
        // RFC 3834: `auto-replied` answers a message; `auto-generated` (and
        // anything else but `no`) is a machine's own, which answers a
        // message when it says it replies.
        let class = if v.starts_with("auto-replied") || is_reply {
            AutomaticClass::AutoReply
        } else {
            AutomaticClass::Bulk
        };
        return is(class, format!("Auto-Submitted: {v}"));
    }
    if m.vendor_auto_reply {
        return is(
            AutomaticClass::AutoReply,
            "auto-reply header (X-Autoreply, X-Autorespond or X-Auto-Response-Suppress)".into(),
        );
    }
    if report.is_some_and(|t| t.contains("disposition-notification")) {
        return is(
            AutomaticClass::AutoReply,
            "read receipt (multipart/report; report-type=disposition-notification)".into(),
        );
    }
    let precedence = m.precedence.as_deref().unwrap_or_default();
    if precedence.starts_with("auto_reply") {
        return is(AutomaticClass::AutoReply, "Precedence: auto_reply".into());
    }
    if let Some(id) = &m.list_id {
        return is(AutomaticClass::List, format!("List-Id {id}"));
    }
    if precedence.starts_with("list") {
        return is(AutomaticClass::List, "Precedence: list".into());
    }
    if m.list_unsubscribe && is_reply {
        return is(
            AutomaticClass::List,
            "List-Unsubscribe on a reply (list traffic)".into(),
        );
    }
    if !precedence.is_empty() {
        return is(AutomaticClass::Bulk, format!("Precedence: {precedence}"));
    }
    if m.list_unsubscribe {
        return is(AutomaticClass::Bulk, "List-Unsubscribe".into());
    }
    None
}

/// Why a message looks automatic, if it does.
pub fn auto_reason(p: &ParsedMessage<'_>) -> Option<String> {
    classify(p).map(|a| format!("{}: {}", a.class, a.why))
}

/// Whether mail of `class` counts toward the loop detector: automatic
/// replies and bounces answer mail, so two of them can answer each other
/// forever; list and bulk mail does not answer anything.
pub fn counts_toward_loops(class: AutomaticClass) -> bool {
    matches!(class, AutomaticClass::AutoReply | AutomaticClass::Bounce)
}

/// The two addresses a loop runs between: the sender and the first
/// recipient (else the mailbox's own address), in a stable order so both
/// directions count together.
pub fn loop_pair(from: &[String], to: &[String], cc: &[String], own: &[String]) -> Option<String> {
    let a = from.first()?;
    let b = to.first().or_else(|| cc.first()).or_else(|| own.first())?;
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    Some(format!("{x} {y}"))
}

/// The skip reason of an automatic message past the loop detector's limit.
pub fn loop_reason(pair: &str, count: usize, policy: &AutomaticMailPolicy) -> String {
    format!(
        "mail loop suspected: {count} automatic replies or bounces between {} within {} minutes (more than automatic_mail.loop_limit = {})",
        pair.replace(' ', " and "),
        policy.loop_window / 60,
        policy.loop_limit
    )
}

/// The Warning raised once when a loop is detected.
pub fn loop_notice(pair: &str, policy: &AutomaticMailPolicy) -> String {
    format!(
        "mail loop suspected between {}: more than {} automatic replies or bounces within {} minutes; further ones are skipped",
        pair.replace(' ', " and "),
        policy.loop_limit,
        policy.loop_window / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;

    fn policy(track: TrackFilter) -> FilterPolicy {
        FilterPolicy {
            own_addresses: vec!["support@example.test".into()],
            automatic: AutomaticMailPolicy::default(),
            track,
        }
    }

    fn class_of(headers: &str) -> Option<AutomaticClass> {
        let raw = format!("From: a@x.test\nMessage-ID: <m@x>\n{headers}\n\nbody");
        classify(&parse(raw.as_bytes(), "INBOX", 1 << 20).unwrap()).map(|a| a.class)
    }

    #[test]
    fn automatic_mail_is_classified() {
        use AutomaticClass::*;
        assert_eq!(class_of("Auto-Submitted: auto-replied"), Some(AutoReply));
        assert_eq!(class_of("X-Autoreply: yes"), Some(AutoReply));
        assert_eq!(class_of("X-Autorespond: yes"), Some(AutoReply));
        assert_eq!(class_of("X-Auto-Response-Suppress: OOF"), Some(AutoReply));
        assert_eq!(class_of("Precedence: auto_reply"), Some(AutoReply));
        assert_eq!(
            class_of(
                "Content-Type: multipart/report; report-type=disposition-notification; boundary=b"
            ),
            Some(AutoReply)
        );
        // auto-generated: a reply when it answers a message, else bulk.
        assert_eq!(class_of("Auto-Submitted: auto-generated"), Some(Bulk));
        assert_eq!(
            class_of("Auto-Submitted: auto-generated\nIn-Reply-To: <p@x>"),
            Some(AutoReply)
        );
        assert_eq!(
            class_of("Content-Type: multipart/report; report-type=delivery-status; boundary=b\nAuto-Submitted: auto-replied"),
            Some(Bounce)
        );
        assert_eq!(class_of("List-Id: <dev.example>"), Some(List));
        assert_eq!(
            class_of("List-Id: <dev.example>\nPrecedence: bulk"),
            Some(List)
        );
        assert_eq!(class_of("Precedence: list"), Some(List));
        assert_eq!(
            class_of("List-Unsubscribe: <mailto:u@x>\nReferences: <p@x>"),
            Some(List)
        );
        assert_eq!(class_of("Precedence: bulk"), Some(Bulk));
        assert_eq!(class_of("Precedence: junk"), Some(Bulk));
        assert_eq!(class_of("List-Unsubscribe: <mailto:u@x>"), Some(Bulk));
        assert_eq!(class_of("Auto-Submitted: no\nPrecedence: normal"), None);
        let daemon = parse(b"From: MAILER-DAEMON@mx.test\n\nbody", "INBOX", 1 << 20).unwrap();
        assert_eq!(classify(&daemon).map(|a| a.class), Some(Bounce));
    }

    #[test]
    fn list_mail_goes_through_correlation() {
        let p = parse(
            b"From: a@x.test\nPrecedence: list\nList-Id: <dev.example>\nIn-Reply-To: <p@x>\n\nbody",
            "INBOX",
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            before_correlation(&p, &policy(TrackFilter::All)),
            Verdict::Correlate
        );
    }

    #[test]
    fn own_automatic_message_is_a_loop() {
        let p = parse(
            b"From: support@example.test\nPrecedence: auto_reply\n\nbody",
            "INBOX",
            1 << 20,
        )
        .unwrap();
        match before_correlation(&p, &policy(TrackFilter::All)) {
            Verdict::Skip(r) => assert!(r.starts_with("mail loop"), "{r}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn ordinary_mail_and_auto_submitted_no_pass() {
        let p = parse(
            b"From: a@x.test\nAuto-Submitted: no\n\nbody",
            "INBOX",
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            before_correlation(&p, &policy(TrackFilter::All)),
            Verdict::Correlate
        );
        assert_eq!(classify(&p), None);
    }

    fn reply(correlated_with: Option<u64>, regarding: Option<&str>) -> Decision {
        Decision {
            method: CorrelationMethod::InReplyTo,
            regarding: regarding.map(|r| r.parse().unwrap()),
            score: 1.0,
            reasons: vec!["In-Reply-To <p@x> = activity 1".into()],
            correlated_with,
        }
    }

    #[test]
    fn correlated_automatic_mail_is_tracked_and_flagged_uncorrelated_is_skipped_with_class() {
        let ooo = Automatic {
            class: AutomaticClass::AutoReply,
            why: "Auto-Submitted: auto-replied".into(),
        };
        let p = AutomaticMailPolicy::default();
        let d = reply(Some(1), Some("case:1"));
        let v = automatic_verdict(&ooo, d.clone(), correlation_of(&d, false), &p);
        assert_eq!(v.decision.method, CorrelationMethod::InReplyTo);
        assert_eq!(v.decision.regarding, d.regarding);
        assert!(v.no_reply);
        // Linked only to a skipped email: correlates to nothing.
        let d = reply(Some(1), None);
        assert_eq!(correlation_of(&d, true), Correlation::Nothing);
        assert_eq!(correlation_of(&d, false), Correlation::Tracked);
        let v = automatic_verdict(&ooo, d, Correlation::Nothing, &p);
        assert_eq!(v.decision.method, CorrelationMethod::Skipped);
        assert!(v.decision.reasons[0].contains("auto_reply"), "{v:?}");
        assert!(v.decision.reasons[0].contains("automatic_mail.auto_reply = \"skip\""));
    }

    #[test]
    fn smart_matching_alone_does_not_attach_automatic_mail() {
        let news = Automatic {
            class: AutomaticClass::Bulk,
            why: "List-Unsubscribe".into(),
        };
        let d = Decision {
            method: CorrelationMethod::SmartMatching,
            regarding: Some("case:1".parse().unwrap()),
            score: 0.9,
            reasons: vec!["subject".into()],
            correlated_with: Some(3),
        };
        assert_eq!(correlation_of(&d, false), Correlation::SmartOnly);
        let mut p = AutomaticMailPolicy::default();
        let v = automatic_verdict(&news, d.clone(), Correlation::SmartOnly, &p);
        assert_eq!(v.decision.method, CorrelationMethod::Skipped);
        p.bulk = AutomaticAction::Track;
        let v = automatic_verdict(&news, d, Correlation::SmartOnly, &p);
        assert_eq!(v.decision.method, CorrelationMethod::None);
        assert_eq!(v.decision.regarding, None);
        assert!(!v.no_reply);
    }

    #[test]
    fn loop_pairs_are_direction_free() {
        let a = loop_pair(&["b@x".into()], &["a@x".into()], &[], &[]);
        let b = loop_pair(&["a@x".into()], &["b@x".into()], &[], &[]);
        assert_eq!(a, b);
        assert_eq!(
            loop_pair(&["b@x".into()], &[], &[], &["me@x".into()]).as_deref(),
            Some("b@x me@x")
        );
    }

    fn resolved(kind: Option<&str>, email_enabled: bool) -> AddressResolution {
        AddressResolution {
            record: kind.map(|k| format!("{k}:1").parse().unwrap()),
            kind: kind.map(str::to_string),
            email_enabled,
            note: None,
            unknown: kind.is_none(),
        }
    }

    #[test]
    fn track_filters_decide_by_correlation_and_sender() {
        use TrackFilter::{All, FromCrmRecords, FromEmailEnabledRecords, ResponsesToCrmEmail};
        let none = Decision::unmatched(vec![]);
        let mut reply = Decision::unmatched(vec![]);
        reply.method = CorrelationMethod::InReplyTo;
        let mut folder = Decision::unmatched(vec![]);
        folder.method = CorrelationMethod::Folder;
        let contact = resolved(Some("contact"), true);
        let muted = resolved(Some("contact"), false);
        let user = resolved(Some("user"), true);
        let unknown = resolved(None, false);
        let c = |r| {
            vec![Counterpart {
                address: "a@x",
                resolution: r,
            }]
        };
        let skip = |d: &Decision, t, r| track_verdict(d, t, &c(r)).is_some();
        for t in [
            All,
            ResponsesToCrmEmail,
            FromCrmRecords,
            FromEmailEnabledRecords,
            TrackFilter::None,
        ] {
            assert!(!skip(&folder, t, &unknown), "folder wins under {t:?}");
            assert_eq!(skip(&reply, t, &unknown), t == TrackFilter::None, "{t:?}");
        }
        assert!(!skip(&none, All, &unknown));
        assert!(skip(&none, ResponsesToCrmEmail, &contact));
        assert!(!skip(&none, FromCrmRecords, &contact));
        assert!(!skip(&none, FromCrmRecords, &muted));
        assert!(skip(&none, FromCrmRecords, &user));
        assert!(skip(&none, FromCrmRecords, &unknown));
        assert!(!skip(&none, FromEmailEnabledRecords, &user));
        assert!(skip(&none, FromEmailEnabledRecords, &muted));
        assert!(skip(&none, FromEmailEnabledRecords, &unknown));
        let why = track_verdict(&none, FromCrmRecords, &c(&user)).unwrap();
        assert!(why.contains("a@x is user:1"), "{why}");
    }
}
