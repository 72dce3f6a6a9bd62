//! Folder display paths (`Inbox`, `Inbox/Orders/2026`) → Graph folder ids,
//! and creating the `move_failed_to` folder when it is missing.

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{path_segment, Body, GraphMailbox, Request};
use super::error::{GraphError, Target};

/// The segments of a display path (`/`-separated, blanks dropped).
pub(super) fn segments(path: &str) -> Vec<&str> {
    path.split('/')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The child folders of `parent` (`None` = the mailbox root): (id, displayName).
async fn children(
    mb: &GraphMailbox,
    parent: Option<&str>,
) -> Result<Vec<(String, String)>, GraphError> {
    let mut link = match parent {
        Some(id) => format!(
            "mailFolders/{}/childFolders?$select=id,displayName&$top=100",
            path_segment(id)
        ),
        None => "mailFolders?$select=id,displayName&$top=100".to_string(),
    };
    let mut out = Vec::new();
    // A mailbox with more than 10,000 folders at one level is not a mailbox
    // we can sync; the bound keeps a looping nextLink from running forever.
    for _ in 0..100 {
        let v = mb
            .get_json(&link, None, Target::Mailbox, "listing mail folders")
            .await?;
        for f in v
            .get("value")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let (Some(id), Some(name)) = (
                f.get("id").and_then(Value::as_str),
                f.get("displayName").and_then(Value::as_str),
            ) {
                out.push((id.to_string(), name.to_string()));
            }
        }
        match v.get("@odata.nextLink").and_then(Value::as_str) {
            Some(next) => link = next.to_string(),
            None => break,
        }
    }
    Ok(out)
}

/// The id of the first segment: `Inbox` is the well-known `inbox` (its
/// display name may be localized), anything else a top-level folder.
async fn first(mb: &GraphMailbox, name: &str) -> Result<Option<String>, GraphError> {
    if name.eq_ignore_ascii_case("inbox") {
        let v = mb
            .get_json(
                "mailFolders/inbox?$select=id",
                None,
                Target::Mailbox,
                "finding the Inbox",
            )
            .await?;
        return Ok(v.get("id").and_then(Value::as_str).map(String::from));
    }
    Ok(find(children(mb, None).await?, name))
}

fn find(list: Vec<(String, String)>, name: &str) -> Option<String> {
    list.into_iter()
        .find(|(_, n)| n.eq_ignore_ascii_case(name))
        .map(|(id, _)| id)
}

/// The folder id of `path`, or `None` when a segment does not exist.
pub(super) async fn resolve(mb: &GraphMailbox, path: &str) -> Result<Option<String>, GraphError> {
    let segs = segments(path);
    let Some((head, rest)) = segs.split_first() else {
        return Ok(None);
    };
    let Some(mut id) = first(mb, head).await? else {
        return Ok(None);
    };
    for seg in rest {
        match find(children(mb, Some(&id)).await?, seg) {
            Some(child) => id = child,
            None => return Ok(None),
        }
    }
    Ok(Some(id))
}

/// The id of `path`, an error naming it when it does not exist.
pub(super) async fn require(mb: &GraphMailbox, path: &str) -> Result<String, GraphError> {
    resolve(mb, path).await?.ok_or_else(|| GraphError::Gone {
        what: format!("finding folder {path:?} of mailbox {}", mb.user()),
        code: "ErrorFolderNotFound".into(),
        message: "no such folder (display path, segments separated by /); check the folder names in the configuration".into(),
    })
}

/// The id of `path`, creating missing segments (under the mailbox root for
/// the first one).
pub(super) async fn resolve_or_create(mb: &GraphMailbox, path: &str) -> Result<String, GraphError> {
    let segs = segments(path);
    let mut parent: Option<String> = None;
    for (i, seg) in segs.iter().enumerate() {
        let existing = if i == 0 {
            first(mb, seg).await?
        } else {
            find(children(mb, parent.as_deref()).await?, seg)
        };
        let id = match existing {
            Some(id) => id,
            None => create(mb, parent.as_deref(), seg).await?,
        };
        parent = Some(id);
    }
    parent.ok_or_else(|| GraphError::BadAnswer {
        what: "creating the failed-mail folder".into(),
        detail: format!("move_failed_to {path:?} names no folder"),
    })
}

async fn create(mb: &GraphMailbox, parent: Option<&str>, name: &str) -> Result<String, GraphError> {
    let path = match parent {
        Some(id) => format!("mailFolders/{}/childFolders", path_segment(id)),
        None => "mailFolders".to_string(),
    };
    let what = format!("creating folder {name:?}");
    let answer = mb
        .request(Request {
            method: Method::POST,
            path: &path,
            body: Body::Json(json!({ "displayName": name })),
            prefer: None,
            target: Target::Mailbox,
            what: &what,
            max_body: None,
        })
        .await;
    match answer {
        Ok(a) => serde_json::from_slice::<Value>(&a.body)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(String::from))
            .ok_or_else(|| GraphError::BadAnswer {
                what,
                detail: "the created folder has no id".into(),
            }),
        // Created meanwhile (by another process or a retried request).
        Err(e) if e.code() == Some("ErrorFolderExists") => {
            let list = children(mb, parent).await?;
            find(list, name).ok_or(e)
        }
        Err(e) => Err(e),
    }
}
