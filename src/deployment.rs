//! One mailbox, one deployment.
//!
//! Dynamics stores the organization's id in the mailbox and refuses to sync
//! a mailbox another organization syncs unless forced. Two crm-mailsync
//! deployments on one mailbox would each record every message (duplicates
//! in the CRM) and fight over follow-ups (one moves what the other still
//! reads). So every deployment has an id, and a mailbox it syncs holds a
//! marker naming it: IMAP METADATA where the server has it, else a message
//! in a dedicated unsubscribed folder; a file in a Maildir; an extended
//! property of the root folder in Exchange Online. Connectors only
//! read and write the marker ([`crate::connector::Connector::read_marker`]);
//! the rules are here: an empty slot is claimed, our own marker is fine, a
//! foreign one refuses the mailbox unless the operator forces a take-over
//! (Test & Enable with `force`), after which the other deployment finds
//! the new marker at its next check and disables its side.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::connector::{Connector, ConnectorError};
use crate::error::{Classify, Disposition};
use crate::model::{self, UnixTime};

/// File in the state directory holding a generated deployment id.
const ID_FILE: &str = "deployment-id";

/// This deployment: who claims mailboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// Stable id: `[daemon] deployment_id`, else generated once and kept in
    /// the state directory (so it moves with the store).
    pub id: String,
    /// Host name, for people reading a marker.
    pub host: String,
}

/// Why this deployment has no id.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} the deployment id file {}: {source}", path.display())]
pub struct DeploymentIdError {
    action: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

impl Deployment {
    /// The configured id, else the one kept in the state directory, else a
    /// new random one written there (0600).
    pub fn load_or_create(config: &Config) -> Result<Deployment, DeploymentIdError> {
        let host = host_name();
        if let Some(id) = &config.daemon.deployment_id {
            return Ok(Deployment {
                id: id.clone(),
                host,
            });
        }
        let path = config.daemon.state_dir.join(ID_FILE);
        let id = read_or_create_id(&path)?;
        Ok(Deployment { id, host })
    }

    /// A fixed deployment for unit tests.
    #[cfg(test)]
    pub fn for_tests() -> std::sync::Arc<Deployment> {
        std::sync::Arc::new(Deployment {
            id: "test-deployment".into(),
            host: "test-host".into(),
        })
    }

    /// A marker naming this deployment, claimed now.
    pub fn marker(&self) -> Marker {
        Marker {
            deployment: self.id.clone(),
            host: self.host.clone(),
            claimed_at: model::now(),
        }
    }
}

fn read_or_create_id(path: &Path) -> Result<String, DeploymentIdError> {
    let err = |action, source| DeploymentIdError {
        action,
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) if valid_id(text.trim()) => return Ok(text.trim().to_string()),
        Ok(_) => {
            return Err(err(
                "use",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "it does not hold an id (8 to 64 letters, digits, '.', '_' or '-'); delete it to have a new one generated",
                ),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("read", e)),
    }
    let id = new_id().map_err(|e| err("generate", e))?;
    if let Some(dir) = path.parent() {
        crate::private_fs::create_dir_all(dir).map_err(|e| err("create the directory of", e))?;
    }
    let mut file = crate::private_fs::create_file(path).map_err(|e| err("write", e))?;
    std::io::Write::write_all(&mut file, format!("{id}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| err("write", e))?;
    Ok(id)
}

/// 128 random bits as 32 hex digits.
fn new_id() -> Result<String, std::io::Error> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| std::io::Error::other("the system random source failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What a deployment id may be: safe in a header, a file and a JSON value.
pub fn valid_id(id: &str) -> bool {
    (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown host".into())
}

/// The marker a mailbox holds: which deployment syncs it, since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Marker {
    pub deployment: String,
    pub host: String,
    pub claimed_at: UnixTime,
}

impl Marker {
    /// The marker as one line of JSON (METADATA value, Maildir file, Graph
    /// extended property).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A marker read back; `None` when the text is not one (someone else's
    /// value, a damaged file).
    pub fn from_json(text: &str) -> Option<Marker> {
        serde_json::from_str::<Marker>(text.trim())
            .ok()
            .filter(|m| valid_id(&m.deployment))
    }

    /// The marker as an IMAP annotation value:
    /// `deployment=ID; host=HOST; claimed_at=SECONDS`. No quotes or
    /// backslashes, so it reads back the same whether the server returns it
    /// as a quoted string (whose escapes the IMAP parser leaves in) or as a
    /// literal.
    pub fn to_annotation(&self) -> String {
        let host: String = self
            .host
            .chars()
            .map(|c| {
                if c.is_control() || matches!(c, '"' | '\\' | ';' | '=') {
                    '_'
                } else {
                    c
                }
            })
            .take(200)
            .collect();
        format!(
            "deployment={}; host={host}; claimed_at={}",
            self.deployment, self.claimed_at
        )
    }

    /// A marker from an annotation value; `None` when it is not one.
    pub fn from_annotation(text: &str) -> Option<Marker> {
        let mut fields = std::collections::HashMap::new();
        for part in text.split(';') {
            let (k, v) = part.split_once('=')?;
            fields.insert(k.trim(), v.trim());
        }
        Marker::from_headers(
            fields.get("deployment")?,
            fields.get("host").copied(),
            fields.get("claimed_at").copied(),
        )
    }

    /// The marker as the hidden message of an IMAP mailbox without
    /// METADATA. Headers carry it (one header search finds it); the body
    /// tells a person who opens the folder what it is.
    pub fn to_message(&self) -> Vec<u8> {
        let date = chrono::DateTime::from_timestamp(self.claimed_at, 0)
            .unwrap_or_default()
            .to_rfc2822();
        format!(
            "From: crm-mailsync <crm-mailsync@localhost.invalid>\r\n\
             To: undisclosed-recipients:;\r\n\
             Subject: crm-mailsync deployment marker (do not delete)\r\n\
             Date: {date}\r\n\
             Message-ID: <marker.{id}.{at}@crm-mailsync.invalid>\r\n\
             {MARKER_HEADER}: {id}\r\n\
             X-CRM-Mailsync-Host: {host}\r\n\
             X-CRM-Mailsync-Claimed-At: {at}\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             \r\n\
             This message tells crm-mailsync which of its deployments synchronizes\r\n\
             this mailbox with the CRM: deployment {id} on {host}, since {date}.\r\n\
             A mailbox is synchronized by one deployment only; another deployment\r\n\
             refuses it unless an operator forces a take-over with Test & Enable.\r\n\
             Deleting this message lets the next deployment that checks claim it.\r\n",
            id = self.deployment,
            host = header_safe(&self.host),
            at = self.claimed_at,
        )
        .into_bytes()
    }

    /// A marker from the header values of a marker message: (deployment,
    /// host, claimed at).
    pub fn from_headers(deployment: &str, host: Option<&str>, at: Option<&str>) -> Option<Marker> {
        let deployment = deployment.trim();
        valid_id(deployment).then(|| Marker {
            deployment: deployment.to_string(),
            host: host.unwrap_or("unknown host").trim().to_string(),
            claimed_at: at.and_then(|a| a.trim().parse().ok()).unwrap_or(0),
        })
    }

    fn describe(&self) -> String {
        format!(
            "deployment {} on {}, since {}",
            self.deployment,
            self.host,
            model::format_time(self.claimed_at)
        )
    }
}

/// Header of the hidden marker message that holds the deployment id.
pub const MARKER_HEADER: &str = "X-CRM-Mailsync-Deployment";

fn header_safe(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect::<String>()
}

/// What a mailbox's marker slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkerSlot {
    /// This protocol has nowhere to keep a marker (POP3): why.
    Unsupported(String),
    /// No marker yet.
    Empty,
    Held(Marker),
}

/// What [`claim`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The mailbox had no marker; it now names this deployment.
    Claimed,
    /// It named this deployment already.
    Ours,
    /// It named another deployment; forced, it now names this one.
    TakenOver(Marker),
    /// No marker is possible here: why (said in the Test & Enable result).
    Unsupported(String),
}

impl Claim {
    /// A clause for the Test & Enable line.
    pub fn describe(&self, me: &Deployment) -> String {
        match self {
            Claim::Claimed => format!("marked as synchronized by deployment {}", me.id),
            Claim::Ours => format!("marked as synchronized by this deployment ({})", me.id),
            Claim::TakenOver(old) => format!(
                "taken over from {} (forced); that deployment disables its side at its next check",
                old.describe()
            ),
            Claim::Unsupported(why) => format!("no deployment marker: {why}"),
        }
    }
}

/// Who claims which mailbox, how.
#[derive(Debug, Clone, Copy)]
pub struct Claiming<'a> {
    /// The mailbox's name (for the refusal's text).
    pub mailbox: &'a str,
    pub deployment: &'a Deployment,
    /// Take the mailbox over from another deployment.
    pub force: bool,
    /// The profile's `deployment_marker`: false claims nothing.
    pub enabled: bool,
}

/// The mailbox is another deployment's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mailbox {mailbox:?} is synchronized by another crm-mailsync deployment ({}); this deployment is {mine}. A mailbox is synchronized by one deployment only: stop the other deployment's sync of it, or take it over here with a forced Test & Enable (POST /api/v1/mailboxes/{mailbox}/test?force=true, or crm-mailsync test-enable --force {mailbox}), after which the other deployment disables its side", .marker.describe())]
pub struct OtherDeployment {
    pub mailbox: String,
    pub marker: Marker,
    pub mine: String,
}

/// Claims the mailbox behind `connector` for `me`: an empty slot is
/// written, our own marker left alone, a foreign one refused
/// ([`ConnectorError::OtherDeployment`], permanent) unless `force`, when it
/// is overwritten. A write is read back: two deployments claiming at once
/// both write, and the one whose marker is not the one read loses.
pub async fn claim<C: Connector>(
    connector: &mut C,
    claiming: Claiming<'_>,
) -> Result<Claim, ConnectorError> {
    let Claiming {
        mailbox,
        deployment: me,
        force,
        enabled,
    } = claiming;
    if !enabled {
        return Ok(Claim::Unsupported(
            "off for this profile (deployment_marker = false)".into(),
        ));
    }
    let refused = |marker: Marker| {
        ConnectorError::OtherDeployment(Box::new(OtherDeployment {
            mailbox: mailbox.to_string(),
            marker,
            mine: me.id.clone(),
        }))
    };
    let held = match connector.read_marker().await? {
        MarkerSlot::Unsupported(why) => return Ok(Claim::Unsupported(why)),
        MarkerSlot::Held(m) if m.deployment == me.id => return Ok(Claim::Ours),
        MarkerSlot::Held(m) if !force => return Err(refused(m)),
        MarkerSlot::Held(m) => Some(m),
        MarkerSlot::Empty => None,
    };
    if let Err(e) = connector.write_marker(&me.marker()).await {
        // A server that will not keep a marker (no folder may be created,
        // a quota, a property it refuses) must not stop the mailbox: the
        // marker protects against a second deployment, syncing is the job.
        // Tried again at the next check.
        if e.disposition() == Disposition::Permanent {
            return Ok(Claim::Unsupported(format!(
                "the server refused to keep the marker ({e})"
            )));
        }
        return Err(e);
    }
    match connector.read_marker().await? {
        MarkerSlot::Held(m) if m.deployment == me.id => {}
        MarkerSlot::Held(m) => return Err(refused(m)),
        other => {
            return Err(ConnectorError::MarkerLost(format!(
                "the deployment marker just written does not read back ({other:?})"
            )))
        }
    }
    Ok(match held {
        Some(old) => Claim::TakenOver(old),
        None => Claim::Claimed,
    })
}

/// The incoming test, then the claim (only after a passing test): the
/// test's line with what the claim did, and the claim. The one way both the
/// mailbox task's start and an on-demand Test & Enable run it.
pub async fn test_and_claim<C: Connector>(
    connector: &mut C,
    claiming: Claiming<'_>,
) -> Result<(String, Claim), ConnectorError> {
    let detail = connector.test().await?;
    let claim = claim(connector, claiming).await?;
    let line = format!("{detail}; {}", claim.describe(claiming.deployment));
    Ok((line, claim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::{Ack, AckReport, FetchBatch};
    use std::time::Duration;

    /// A mailbox's marker slot and how its writes go.
    struct Slot {
        held: Option<Marker>,
        writes: usize,
        /// The next write fails with this disposition.
        fail_write: Option<Disposition>,
        /// Another deployment writes right after ours (a race lost).
        overtaken_by: Option<Marker>,
    }

    impl Slot {
        fn holding(held: Option<Marker>) -> Self {
            Slot {
                held,
                writes: 0,
                fail_write: None,
                overtaken_by: None,
            }
        }
    }

    impl Connector for Slot {
        fn protocol(&self) -> &'static str {
            "slot"
        }
        async fn fetch(&mut self) -> Result<FetchBatch, ConnectorError> {
            Ok(FetchBatch::default())
        }
        async fn acknowledge(&mut self, _: Vec<Ack>) -> Result<AckReport, ConnectorError> {
            Ok(AckReport::default())
        }
        async fn wait_for_changes(
            &mut self,
            _: Duration,
            _: bool,
            _: &tokio_util::sync::CancellationToken,
        ) -> Result<(), ConnectorError> {
            Ok(())
        }
        async fn test(&mut self) -> Result<String, ConnectorError> {
            Ok("ok".into())
        }
        async fn close(&mut self) {}
        async fn read_marker(&mut self) -> Result<MarkerSlot, ConnectorError> {
            Ok(self
                .held
                .clone()
                .map_or(MarkerSlot::Empty, MarkerSlot::Held))
        }
        async fn write_marker(&mut self, marker: &Marker) -> Result<(), ConnectorError> {
            if let Some(disposition) = self.fail_write.take() {
                return Err(ConnectorError::Maildir {
                    path: "slot".into(),
                    detail: "refused".into(),
                    disposition,
                });
            }
            self.writes += 1;
            self.held = Some(self.overtaken_by.take().unwrap_or_else(|| marker.clone()));
            Ok(())
        }
    }

    fn deployment(id: &str) -> Deployment {
        Deployment {
            id: id.into(),
            host: "h".into(),
        }
    }

    fn claiming(me: &Deployment, force: bool) -> Claiming<'_> {
        Claiming {
            mailbox: "mb",
            deployment: me,
            force,
            enabled: true,
        }
    }

    #[tokio::test]
    async fn claims_follow_the_one_deployment_rules() {
        let (a, b) = (deployment("deployment-a"), deployment("deployment-b"));
        let mut slot = Slot::holding(None);
        assert_eq!(
            claim(&mut slot, claiming(&a, false)).await.unwrap(),
            Claim::Claimed
        );
        assert_eq!(slot.writes, 1);
        // Ours: nothing written.
        assert_eq!(
            claim(&mut slot, claiming(&a, false)).await.unwrap(),
            Claim::Ours
        );
        assert_eq!(slot.writes, 1);
        // Another's: refused, untouched.
        let e = claim(&mut slot, claiming(&b, false)).await.unwrap_err();
        assert!(
            matches!(&e, ConnectorError::OtherDeployment(o) if o.marker.deployment == "deployment-a"),
            "{e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Permanent);
        assert_eq!(slot.writes, 1);
        // Forced: taken over.
        match claim(&mut slot, claiming(&b, true)).await.unwrap() {
            Claim::TakenOver(old) => assert_eq!(old.deployment, "deployment-a"),
            other => panic!("{other:?}"),
        }
        assert_eq!(slot.held.as_ref().unwrap().deployment, "deployment-b");
        // Off for the profile: nothing read or written.
        let off = Claiming {
            enabled: false,
            ..claiming(&a, true)
        };
        assert!(matches!(
            claim(&mut slot, off).await.unwrap(),
            Claim::Unsupported(_)
        ));
        assert_eq!(slot.held.as_ref().unwrap().deployment, "deployment-b");
    }

    #[tokio::test]
    async fn a_lost_race_a_refusing_server_and_a_passing_failure_differ() {
        let (a, b) = (deployment("deployment-a"), deployment("deployment-b"));
        // Both claimed an empty slot; the other's write landed last.
        let mut slot = Slot::holding(None);
        slot.overtaken_by = Some(b.marker());
        let e = claim(&mut slot, claiming(&a, false)).await.unwrap_err();
        assert!(
            matches!(&e, ConnectorError::OtherDeployment(o) if o.marker.deployment == "deployment-b"),
            "{e:?}"
        );
        // A server that will not keep a marker: the mailbox syncs without.
        let mut slot = Slot::holding(None);
        slot.fail_write = Some(Disposition::Permanent);
        match claim(&mut slot, claiming(&a, false)).await.unwrap() {
            Claim::Unsupported(why) => assert!(why.contains("refused to keep the marker"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A passing failure is an error: tried again at the next check.
        slot.fail_write = Some(Disposition::Transient);
        let e = claim(&mut slot, claiming(&a, false)).await.unwrap_err();
        assert_eq!(e.disposition(), Disposition::Transient);
        assert_eq!(
            claim(&mut slot, claiming(&a, false)).await.unwrap(),
            Claim::Claimed
        );
    }

    #[test]
    fn ids_are_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(ID_FILE);
        let a = read_or_create_id(&path).unwrap();
        assert!(valid_id(&a) && a.len() == 32, "{a}");
        assert_eq!(read_or_create_id(&path).unwrap(), a);
        let b = read_or_create_id(&dir.path().join("other").join(ID_FILE)).unwrap();
        assert_ne!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::write(&path, "not an id!\n").unwrap();
        let e = read_or_create_id(&path).unwrap_err().to_string();
        assert!(e.contains("delete it"), "{e}");
    }

    #[test]
    fn markers_survive_json_and_headers() {
        let m = Marker {
            deployment: "0123456789abcdef".into(),
            host: "crm1".into(),
            claimed_at: 1_800_000_000,
        };
        assert_eq!(Marker::from_json(&m.to_json()), Some(m.clone()));
        assert_eq!(Marker::from_json("{\"x\":1}"), None);
        assert_eq!(Marker::from_json("garbage"), None);
        assert_eq!(Marker::from_annotation(&m.to_annotation()), Some(m.clone()));
        let odd = Marker {
            host: "a\"b\\c;d=e".into(),
            ..m.clone()
        };
        let value = odd.to_annotation();
        assert!(!value.contains(['"', '\\']), "{value}");
        assert_eq!(
            Marker::from_annotation(&value).map(|m| m.host),
            Some("a_b_c_d_e".to_string())
        );
        assert_eq!(Marker::from_annotation("something else"), None);
        let msg = String::from_utf8(m.to_message()).unwrap();
        let value = |name: &str| {
            msg.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::to_string)
        };
        let back = Marker::from_headers(
            &value(MARKER_HEADER).unwrap(),
            value("X-CRM-Mailsync-Host").as_deref(),
            value("X-CRM-Mailsync-Claimed-At").as_deref(),
        );
        assert_eq!(back, Some(m));
        assert_eq!(Marker::from_headers("bad id", None, None), None);
    }
}
