//! Filter: what is tracked, what is skipped and why, before and after correlation.
//!
//! Skipped mail is still recorded (method `skipped` with the reason), so nothing
//! disappears silently; the outgoing side uses the same markers never to answer an
//! automatic message, which is how auto-reply loops are broken.

use crate::config::TrackFilter;
use crate::correlate::Decision;
use crate::model::CorrelationMethod;
use crate::parse::ParsedMessage;

/// Per-mailbox filtering policy.
#[derive(Debug, Clone)]
pub struct FilterPolicy {
    /// The mailbox's own address(es), lower-case.
    pub own_addresses: Vec<String>,
    /// Record automatic mail (out-of-office, bounces, bulk) as skipped.
    pub skip_auto_generated: bool,
    pub track: TrackFilter,
}

/// Verdict before correlation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Correlate,
    /// Recorded with method `skipped` and this reason.
    Skip(String),
}

/// Decides whether a message goes through correlation.
pub fn before_correlation(p: &ParsedMessage<'_>, policy: &FilterPolicy) -> Verdict {
    let from_self = p
        .features
        .from
        .iter()
        .any(|f| policy.own_addresses.iter().any(|o| o == f));
    let auto = auto_reason(p);
    match (from_self, auto) {
        (true, Some(why)) => Verdict::Skip(format!(
            "mail loop: automatic message ({why}) sent by this mailbox itself"
        )),
        (false, Some(why)) if policy.skip_auto_generated => {
            Verdict::Skip(format!("automatic message ({why})"))
        }
        _ => Verdict::Correlate,
    }
}

/// Applies the track filter to a correlation decision; returns the skip reason
/// when the mailbox only tracks responses and nothing correlated.
pub fn after_correlation(d: &Decision, policy: &FilterPolicy) -> Option<String> {
    match policy.track {
        TrackFilter::All => None,
        TrackFilter::ResponsesOnly if d.method == CorrelationMethod::None => Some(
            "track filter is responses-only and the email does not correlate to tracked email"
                .into(),
        ),
        TrackFilter::ResponsesOnly => None,
    }
}

/// Why a message looks automatic, if it does.
pub fn auto_reason(p: &ParsedMessage<'_>) -> Option<String> {
    if let Some(v) = &p.auto.auto_submitted {
        return Some(format!("Auto-Submitted: {v}"));
    }
    if p.auto.vendor_auto_reply {
        return Some("auto-reply header".into());
    }
    if let Some(v) = &p.auto.precedence {
        return Some(format!("Precedence: {v}"));
    }
    let sender_is_daemon = p.features.from.iter().any(|f| {
        let local = f.split('@').next().unwrap_or_default();
        local.eq_ignore_ascii_case("mailer-daemon") || local.eq_ignore_ascii_case("postmaster")
    });
    sender_is_daemon.then(|| "sent by a mailer daemon".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;

    fn policy(track: TrackFilter) -> FilterPolicy {
        FilterPolicy {
            own_addresses: vec!["support@example.test".into()],
            skip_auto_generated: true,
            track,
        }
    }

    #[test]
    fn out_of_office_is_skipped_with_reason() {
        let p = parse(
            b"From: a@x.test\nAuto-Submitted: auto-replied\nSubject: OOO\n\nbody",
            "INBOX",
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            before_correlation(&p, &policy(TrackFilter::All)),
            Verdict::Skip("automatic message (Auto-Submitted: auto-replied)".into())
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
    }

    #[test]
    fn responses_only_skips_uncorrelated() {
        let d = Decision::unmatched(vec![]);
        assert!(after_correlation(&d, &policy(TrackFilter::ResponsesOnly)).is_some());
        assert!(after_correlation(&d, &policy(TrackFilter::All)).is_none());
    }
}
