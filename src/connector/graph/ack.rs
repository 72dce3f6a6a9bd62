//! Follow-ups on committed messages: the processed category (or a delete)
//! for recorded ones, a move to `move_failed_to` for quarantined ones. A
//! message that is gone is done quietly; immutable ids survive moves, so the
//! source key's id finds the message wherever it is now.

use futures::StreamExt as _;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{path_segment, Body, Request};
use super::connector::GraphConnector;
use super::error::{GraphError, Target};
use super::folders;
use crate::connector::{Ack, AckKind, AckReport, ConnectorError};
use crate::error::{Classify, Disposition};

/// Acks carried out together; after a group with a transient failure
/// (network, throttling past the retries) the rest is failed untried and
/// stays pending.
const GROUP: usize = 16;

/// Carries out `acks`, as many at once as the mailbox allows (its
/// semaphore holds anyway).
pub(super) async fn acknowledge(
    c: &mut GraphConnector,
    acks: Vec<Ack>,
) -> Result<AckReport, ConnectorError> {
    let mut report = AckReport::default();
    // The failed-mail folder is found (or created) once, before the moves.
    if let Some(target) = c.settings.move_failed_to.clone() {
        if c.failed_folder.is_none() && acks.iter().any(|a| a.kind == AckKind::Failed) {
            match folders::resolve_or_create(&c.mailbox, &target).await {
                Ok(id) => c.failed_folder = Some(id),
                Err(e) => {
                    let e = ConnectorError::from(e);
                    report.fail_all(
                        acks.iter()
                            .filter(|a| a.kind == AckKind::Failed)
                            .map(|a| &a.source),
                        &e,
                    );
                    if e.disposition() == Disposition::Transient {
                        let rest: Vec<&Ack> =
                            acks.iter().filter(|a| a.kind != AckKind::Failed).collect();
                        report.fail_all(rest.iter().map(|a| &a.source), &e);
                        return Ok(report);
                    }
                }
            }
        }
    }
    let mut stale_folder = false;
    let mut groups = acks.chunks(GROUP);
    while let Some(group) = groups.next() {
        let c_ref: &GraphConnector = c;
        let jobs: Vec<_> = group.iter().map(|ack| one(c_ref, ack)).collect();
        let outcomes: Vec<Result<(), GraphError>> = futures::stream::iter(jobs)
            .buffered(c.mailbox.max_in_flight())
            .collect()
            .await;
        let results = group.iter().zip(outcomes);
        let mut stop: Option<ConnectorError> = None;
        for (ack, result) in results {
            match result {
                Ok(()) => {}
                Err(e) if e.is_gone() => {}
                Err(e) => {
                    if e.code() == Some(FOLDER_GONE) {
                        stale_folder = true;
                    }
                    let transient = e.disposition() == Disposition::Transient;
                    let e = ConnectorError::from(e);
                    report.fail_all([&ack.source], &e);
                    if transient {
                        stop = Some(e);
                    }
                }
            }
        }
        if let Some(e) = stop {
            let rest: Vec<&Ack> = groups.flatten().collect();
            report.fail_all(rest.iter().map(|a| &a.source), &e);
            break;
        }
    }
    for ack in &acks {
        c.listed_categories.remove(&ack.source.uid);
    }
    if stale_folder {
        // Found (or created) anew at the next call.
        c.failed_folder = None;
    }
    Ok(report)
}

/// The code given to a move whose destination folder may be gone.
const FOLDER_GONE: &str = "FailedFolderNotFound";

async fn one(c: &GraphConnector, ack: &Ack) -> Result<(), GraphError> {
    match ack.kind {
        AckKind::Recorded if c.settings.delete_after_processing => delete(c, &ack.source.uid).await,
        AckKind::Recorded => match &c.settings.processed_category {
            Some(cat) => categorize(c, &ack.source.uid, cat).await,
            None => Ok(()),
        },
        AckKind::Failed => match (&c.settings.move_failed_to, &c.failed_folder) {
            (Some(_), Some(folder)) => move_to(c, &ack.source.uid, folder).await,
            _ => Ok(()),
        },
    }
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

/// Adds `category`, keeping the message's others (PATCH replaces the
/// list): those its delta page listed moments ago, else read first.
async fn categorize(c: &GraphConnector, id: &str, category: &str) -> Result<(), GraphError> {
    let path = format!("messages/{}", path_segment(id));
    let mut cats: Vec<String> = match c.listed_categories.get(id) {
        Some(listed) => listed.clone(),
        None => {
            let v = c
                .mailbox
                .get_json(
                    &format!("{path}?$select=categories"),
                    None,
                    Target::Message,
                    "reading a message's categories",
                )
                .await?;
            v.get("categories")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(String::from))
                .collect()
        }
    };
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

/// Moves a message; "not found" may be the folder's doing as well as the
/// message's, so the folder is looked up (not created) to tell which.
async fn move_to(c: &GraphConnector, id: &str, folder: &str) -> Result<(), GraphError> {
    let path = format!("messages/{}/move", path_segment(id));
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
        Ok(_) => Ok(()),
        Err(e) if e.is_gone() => {
            let folder_there = c
                .mailbox
                .get_json(
                    &format!("mailFolders/{}?$select=id", path_segment(folder)),
                    None,
                    Target::Mailbox,
                    "checking the failed-mail folder",
                )
                .await;
            match folder_there {
                Ok(_) => Err(e),
                Err(f) if f.is_gone() => Err(GraphError::Refused {
                    what: "moving a quarantined message to the failed-mail folder".into(),
                    status: 404,
                    code: FOLDER_GONE.into(),
                    message: "the failed-mail folder was deleted; it is created again at the next attempt".into(),
                }),
                Err(f) => Err(f),
            }
        }
        Err(e) => Err(e),
    }
}
