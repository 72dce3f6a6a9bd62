//! Correlation: which CRM record an email is regarding, and why.
//!
//! This module is pure: it sees the message's features, an [`Indexes`] snapshot
//! the caller resolved from the store for exactly the keys [`lookup_keys`] asked
//! for, and the settings. No I/O, no clock, no store access, so every decision
//! can be replayed and tested in isolation.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::config::FolderRule;
use crate::model::{ActivityId, CorrelationMethod, RecordRef};

/// Correlation settings (the organisation's email settings in Dynamics terms).
#[derive(Debug, Clone, PartialEq)]
pub struct CorrelationSettings {
    /// Methods in the order they are tried; the first confident match wins.
    pub order: Vec<CorrelationMethod>,
    /// Smart matching is off by default, as in current Dynamics versions.
    pub smart_matching: bool,
    /// Tracked folders allowed per user mailbox.
    pub max_tracked_folders: usize,
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
        }
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
}

/// A tracked email as correlation sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedEmail {
    pub activity: ActivityId,
    pub regarding: Option<RecordRef>,
}

/// Keys whose tracked emails correlation wants to see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LookupKeys {
    /// Normalised Message-IDs from In-Reply-To and References.
    pub message_ids: Vec<String>,
}

/// The slice of the store's indexes relevant to one message.
#[derive(Debug, Clone, Default)]
pub struct Indexes<'a> {
    /// Normalised Message-ID → tracked email.
    pub by_message_id: HashMap<String, TrackedEmail>,
    /// The mailbox's folder-tracking rules.
    pub folder_rules: &'a [FolderRule],
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
}

/// Normalises a Message-ID for index keys: angle brackets and surrounding
/// white space removed, lower-cased (providers change case of the domain part).
pub fn normalize_message_id(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_ascii_lowercase()
}

/// The store keys a message needs resolved before [`correlate`] runs.
pub fn lookup_keys(f: &MessageFeatures) -> LookupKeys {
    let mut ids: Vec<String> = Vec::new();
    for id in f.in_reply_to.iter().chain(f.references.iter().rev()) {
        let n = normalize_message_id(id);
        if !n.is_empty() && !ids.contains(&n) {
            ids.push(n);
        }
    }
    LookupKeys { message_ids: ids }
}

/// Decides what the message is regarding. Pure.
pub fn correlate(
    f: &MessageFeatures,
    idx: &Indexes<'_>,
    settings: &CorrelationSettings,
) -> Decision {
    let mut notes = Vec::new();
    // A header match on a tracked email without a regarding record links the
    // email but lets later methods find the record.
    let mut linked: Option<(TrackedEmail, String)> = None;
    for method in &settings.order {
        let found = match method {
            CorrelationMethod::Folder => by_folder(f, idx),
            CorrelationMethod::InReplyTo => match by_headers(f, idx) {
                Some((t, reason)) if t.regarding.is_none() => {
                    notes.push(format!("{reason} (no regarding record)"));
                    linked.get_or_insert((t, reason));
                    None
                }
                other => other.map(|(t, reason)| {
                    let regarding = t.regarding.clone();
                    Decision {
                        method: CorrelationMethod::InReplyTo,
                        regarding,
                        score: 1.0,
                        reasons: vec![reason],
                        correlated_with: Some(t.activity),
                    }
                }),
            },
            // The remaining methods live in their own submodules as they land.
            _ => None,
        };
        if let Some(mut d) = found {
            d.reasons.extend(notes);
            return d;
        }
    }
    if let Some((t, reason)) = linked {
        return Decision {
            method: CorrelationMethod::InReplyTo,
            regarding: None,
            score: 1.0,
            reasons: vec![reason],
            correlated_with: Some(t.activity),
        };
    }
    notes.push(if f.in_reply_to.is_empty() && f.references.is_empty() {
        "no In-Reply-To or References header".to_string()
    } else {
        "no referenced Message-ID is tracked".to_string()
    });
    Decision::unmatched(notes)
}

fn by_folder(f: &MessageFeatures, idx: &Indexes<'_>) -> Option<Decision> {
    let rule = idx
        .folder_rules
        .iter()
        .find(|r| r.folder.eq_ignore_ascii_case(&f.folder))?;
    Some(Decision {
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
        if let Some(t) = idx.by_message_id.get(&normalize_message_id(id)) {
            return Some((
                t.clone(),
                format!(
                    "In-Reply-To <{}> = activity {}",
                    normalize_message_id(id),
                    t.activity
                ),
            ));
        }
    }
    for id in f.references.iter().rev() {
        if let Some(t) = idx.by_message_id.get(&normalize_message_id(id)) {
            return Some((
                t.clone(),
                format!(
                    "References contains <{}> = activity {}",
                    normalize_message_id(id),
                    t.activity
                ),
            ));
        }
    }
    None
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
        let d = correlate(&f, &idx, &CorrelationSettings::default());
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
        let d = correlate(&f, &idx, &CorrelationSettings::default());
        assert_eq!(d.correlated_with, Some(2));
        assert_eq!(lookup_keys(&f).message_ids, vec!["c@x", "b@x", "a@x"]);
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
        let d = correlate(&f, &idx, &CorrelationSettings::default());
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
        let d = correlate(&f, &idx, &CorrelationSettings::default());
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
        let d = correlate(&f, &Indexes::default(), &CorrelationSettings::default());
        assert_eq!(d.method, CorrelationMethod::None);
        assert_eq!(
            d.reasons,
            vec!["no referenced Message-ID is tracked".to_string()]
        );
    }
}
