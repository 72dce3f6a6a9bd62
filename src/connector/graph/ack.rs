//! Follow-ups on committed messages: the processed category (or a delete)
//! for recorded ones, a move to `move_failed_to` for quarantined ones. A
//! message that is gone is done quietly; immutable ids survive moves, so the
//! source key's id finds the message wherever it is now.

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{path_segment, Body, Request};
use super::connector::GraphConnector;
use super::error::{GraphError, Target};
use super::folders;
use crate::connector::{Ack, AckKind, AckReport, ConnectorError};
use crate::error::{Classify, Disposition};

/// Carries out `acks` one after another; a transient failure (network,
/// throttling past the retries) stops the call and fails the rest, which
/// stay pending.
pub(super) async fn acknowledge(
    c: &mut GraphConnector,
    acks: Vec<Ack>,
) -> Result<AckReport, ConnectorError> {
    let mut report = AckReport::default();
    let mut iter = acks.into_iter();
    while let Some(ack) = iter.next() {
        let result = match ack.kind {
            AckKind::Recorded if c.settings.delete_after_processing => {
                delete(c, &ack.source.uid).await
            }
            AckKind::Recorded => match c.settings.processed_category.clone() {
                Some(cat) => categorize(c, &ack.source.uid, &cat).await,
                None => Ok(()),
            },
            AckKind::Failed => match c.settings.move_failed_to.clone() {
                Some(target) => move_to(c, &ack.source.uid, &target).await,
                None => Ok(()),
            },
        };
        match result {
            Ok(()) => {}
            Err(e) if e.is_gone() => {}
            Err(e) => {
                let stop = e.disposition() == Disposition::Transient;
                let e = ConnectorError::from(e);
                report.fail_all([&ack.source], &e);
                if stop {
                    let rest: Vec<Ack> = iter.collect();
                    report.fail_all(rest.iter().map(|a| &a.source), &e);
                    break;
                }
            }
        }
    }
    Ok(report)
}

async fn delete(c: &GraphConnector, id: &str) -> Result<(), GraphError> {
    let path = format!("messages/{}", path_segment(id));
    c.mailbox
        .request(Request {
            method: Method::DELETE,
            path: &path,
            body: Body::None,
            prefer: None,
            target: Target::Message,
            what: "deleting a processed message",
            max_body: None,
        })
        .await?;
    Ok(())
}

/// Adds `category`, keeping the message's others (PATCH replaces the list).
async fn categorize(c: &GraphConnector, id: &str, category: &str) -> Result<(), GraphError> {
    let path = format!("messages/{}", path_segment(id));
    let v = c
        .mailbox
        .get_json(
            &format!("{path}?$select=categories"),
            None,
            Target::Message,
            "reading a message's categories",
        )
        .await?;
    let mut cats: Vec<String> = v
        .get("categories")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(String::from))
        .collect();
    if cats.iter().any(|c| c.eq_ignore_ascii_case(category)) {
        return Ok(());
    }
    cats.push(category.to_string());
    c.mailbox
        .request(Request {
            method: Method::PATCH,
            path: &path,
            body: Body::Json(json!({ "categories": cats })),
            prefer: None,
            target: Target::Message,
            what: "adding the processed category",
            max_body: None,
        })
        .await?;
    Ok(())
}

async fn move_to(c: &mut GraphConnector, id: &str, target: &str) -> Result<(), GraphError> {
    let path = format!("messages/{}/move", path_segment(id));
    let mut fresh = false;
    loop {
        let folder = match c.failed_folder.clone() {
            Some(f) => f,
            None => {
                fresh = true;
                let f = folders::resolve_or_create(&c.mailbox, target).await?;
                c.failed_folder = Some(f.clone());
                f
            }
        };
        let r = c
            .mailbox
            .request(Request {
                method: Method::POST,
                path: &path,
                body: Body::Json(json!({ "destinationId": folder })),
                prefer: None,
                target: Target::Message,
                what: "moving a quarantined message to the failed-mail folder",
                max_body: None,
            })
            .await;
        match r {
            // "Not found" may mean the cached folder was deleted: find or
            // create it anew, once; then it is the message that is gone.
            Err(e) if e.is_gone() && !fresh => c.failed_folder = None,
            r => return r.map(|_| ()),
        }
    }
}
