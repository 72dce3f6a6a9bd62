//! `[crm] type = "webhook"`: every outbox event is POSTed as JSON to one
//! URL, signed as [Standard Webhooks](https://www.standardwebhooks.com/)
//! prescribes; records can be pulled from an optional `records_url`.
//!
//! **Request.** `POST <url>` with
//! * `webhook-id`: the event id (`evt_<seq>`), the same on every retry: the
//!   receiver's idempotency key;
//! * `webhook-timestamp`: Unix seconds of this attempt;
//! * `webhook-signature`: `v1,<base64 HMAC-SHA256>` over
//!   `"{webhook-id}.{webhook-timestamp}.{body}"`, keyed with the
//!   base64-decoded part of a `whsec_…` secret after the prefix; one
//!   `v1,…` per configured secret, separated by spaces (rotation);
//! * `content-type: application/json`;
//! * the body, the envelope `{"type": "activity.created" |
//!   "activity.updated", "timestamp": <RFC 3339 of the event's commit>,
//!   "data": <the event>}` (`schema/event.schema.json`). The body of one
//!   event is byte-for-byte the same on every retry.
//!
//! **Answer.** 2xx: delivered. 408, 429, 5xx, network trouble, time-out:
//! transient, honouring `Retry-After` (seconds or an HTTP-date). 401, 403,
//! 404, 405, 410 and redirects (never followed): the endpoint itself is
//! wrong ([`CrmError::Endpoint`]: delivery pauses, nothing is dropped). Any
//! other 4xx: the receiver refuses this event (dead-lettered, the response
//! text in the alert).
//!
//! **Test.** [`CrmAdapter::test`] POSTs a signed envelope of type
//! `webhook.test` (`webhook-id` `test_<unix nanos>`, `data.message`) that a
//! receiver answers like any event; it changes nothing on our side.
//!
//! **Records.** With `records_url`, `GET <records_url>` (first pull) or
//! `GET <records_url>?cursor=<cursor>`, signed like a POST over an empty
//! body, answers JSON lines: each line a record (`{"kind": "contact", "id":
//! "…", "name": "…", "emails": ["…"], "owner": …, "email_enabled": …,
//! "user_number": …}`) or a deletion (`{"kind": "contact", "id": "…",
//! "deleted": true}`). Response headers: `X-Next-Cursor` (where the next
//! pull starts; stored with the records) and `X-More: true` when another
//! page follows at once. Without `records_url` there are no records to pull.
//!
//! Secrets never appear in logs or messages; URLs are shown without query
//! or user info.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::hmac;

use super::{CrmAdapter, CrmError, DeliveryReceipt, RecordPage};
use crate::config::WebhookSettings;
use crate::model::{format_time, OutboxEvent, Record};

/// The response text kept in an error message.
const MAX_ERROR_TEXT: usize = 300;

/// Header naming where the next record pull starts.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";
/// Header saying another record page follows at once (`true`).
pub const MORE_HEADER: &str = "x-more";

/// The webhook adapter (see the module docs).
pub struct WebhookAdapter {
    client: reqwest::Client,
    url: reqwest::Url,
    records_url: Option<reqwest::Url>,
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for WebhookAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookAdapter")
            .field("url", &shown(&self.url))
            .field("records_url", &self.records_url.as_ref().map(shown))
            .field("secrets", &self.keys.len())
            .finish()
    }
}

/// A URL as logs and messages show it: no user info, no query.
fn shown(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// The HMAC key of a `whsec_…` secret (the base64 after the prefix).
pub fn signing_key(secret: &str) -> Result<hmac::Key, CrmError> {
    let b64 = secret
        .trim()
        .strip_prefix("whsec_")
        .ok_or_else(|| CrmError::endpoint("a webhook secret does not start with whsec_"))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| CrmError::endpoint("a webhook secret is not valid base64 after whsec_"))?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &raw))
}

/// The `webhook-signature` header value: `v1,<base64>` per key, space
/// separated, over `"{id}.{timestamp}.{body}"`.
pub fn signature(keys: &[hmac::Key], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut signed = Vec::with_capacity(id.len() + body.len() + 24);
    signed.extend_from_slice(id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(timestamp.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    keys.iter()
        .map(|k| {
            let tag = hmac::sign(k, &signed);
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The JSON body POSTed for an event (see the module docs).
pub fn envelope(event: &OutboxEvent) -> Result<Vec<u8>, CrmError> {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        #[serde(rename = "type")]
        kind: crate::model::EventKind,
        timestamp: String,
        data: &'a OutboxEvent,
    }
    serde_json::to_vec(&Envelope {
        kind: event.kind,
        timestamp: format_time(event.at),
        data: event,
    })
    .map_err(|e| CrmError::permanent(format!("cannot encode event {}: {e}", event.id)))
}

/// `Retry-After` as a wait from `now`: delay-seconds or an HTTP-date (a
/// date in the past: no wait). `None` when absent or unreadable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(at.timestamp()).ok()?);
    Some(at.duration_since(now).unwrap_or_default())
}

/// Cuts a response text to [`MAX_ERROR_TEXT`] characters on one line.
fn excerpt(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > MAX_ERROR_TEXT {
        let cut: String = one_line.chars().take(MAX_ERROR_TEXT).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

/// Classifies a non-2xx answer (see the module docs). `what` names the
/// request in the message ("webhook https://…").
pub fn classify_status(
    what: &str,
    status: u16,
    retry_after: Option<Duration>,
    body: &str,
) -> CrmError {
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let text = excerpt(body);
    let said = if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    };
    match status {
        408 | 429 | 500..=599 => CrmError::Transient {
            message: format!("{what} answered {status} {reason}{said}"),
            retry_after,
        },
        410 => CrmError::endpoint(format!(
            "{what} answered 410 Gone: the receiver says this endpoint is gone; configure the new URL{said}"
        )),
        401 | 403 => CrmError::endpoint(format!(
            "{what} rejected the request ({status} {reason}): check the signing secret and the receiver's configuration{said}"
        )),
        404 | 405 => CrmError::endpoint(format!(
            "{what} answered {status} {reason}: check the configured URL{said}"
        )),
        300..=399 => CrmError::endpoint(format!(
            "{what} answered a redirect ({status} {reason}); redirects are not followed: configure the final URL"
        )),
        400..=499 => CrmError::permanent(format!(
            "{what} refused the event ({status} {reason}){said}"
        )),
        _ => CrmError::transient(format!("{what} answered an unexpected {status}{said}")),
    }
}

/// A transport failure, with its causes (reqwest's own text is terse) and
/// without the URL (its query may carry a token).
fn transport_error(what: &str, e: reqwest::Error) -> CrmError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut detail = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        cause = c.source();
    }
    CrmError::transient(format!("{what}: {kind}: {detail}"))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

impl WebhookAdapter {
    /// Builds the adapter: HTTP client with the crate's TLS configuration
    /// (system roots plus `ca_file`), the settings' time-out, no redirects.
    pub fn new(settings: &WebhookSettings) -> Result<Self, CrmError> {
        let url = reqwest::Url::parse(&settings.url)
            .map_err(|e| CrmError::endpoint(format!("webhook url is not a URL: {e}")))?;
        let records_url = settings
            .records_url
            .as_deref()
            .map(reqwest::Url::parse)
            .transpose()
            .map_err(|e| CrmError::endpoint(format!("webhook records_url is not a URL: {e}")))?;
        let keys = settings
            .secrets
            .iter()
            .map(|s| signing_key(s.expose()))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(CrmError::endpoint(format!(
                "no whsec_ secret in {}",
                settings.secret_file.display()
            )));
        }
        let tls = crate::net::client_config(settings.ca_file.as_deref())
            .map_err(|e| CrmError::endpoint(format!("webhook TLS setup: {e}")))?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(std::sync::Arc::unwrap_or_clone(tls))
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("crm-mailsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CrmError::endpoint(format!("webhook HTTP client: {e}")))?;
        Ok(WebhookAdapter {
            client,
            url,
            records_url,
            keys,
        })
    }

    /// POSTs an alert journal entry as event `alert.raised`: `data` is the
    /// alert as the entry holds it (an Error), `timestamp` when it became
    /// one, `webhook-id` [`AlertEvent::webhook_id`] (the same on every
    /// retry: the receiver's dedupe key; an escalation has its own).
    ///
    /// [`AlertEvent::webhook_id`]: crate::store::AlertEvent::webhook_id
    pub async fn notify_alert_event(
        &self,
        event: &crate::store::AlertEvent,
    ) -> Result<u16, CrmError> {
        #[derive(serde::Serialize)]
        struct Envelope<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            timestamp: String,
            data: &'a crate::model::Alert,
        }
        let body = serde_json::to_vec(&Envelope {
            kind: "alert.raised",
            timestamp: format_time(event.at),
            data: &event.alert,
        })
        .map_err(|e| {
            CrmError::permanent(format!("cannot encode alert event {}: {e}", event.seq))
        })?;
        self.post(&event.webhook_id(), body).await
    }

    /// POSTs a signed body; `Ok(status)` on 2xx.
    async fn post(&self, id: &str, body: Vec<u8>) -> Result<u16, CrmError> {
        let what = format!("webhook {}", shown(&self.url));
        let timestamp = unix_now();
        let signature = signature(&self.keys, id, timestamp, &body);
        let response = self
            .client
            .post(self.url.clone())
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error(&what, e))?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(status);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let text = response.text().await.unwrap_or_default();
        Err(classify_status(&what, status, retry_after, &text))
    }
}

/// Parses a records response body (see the module docs) into a page
/// without cursor.
pub fn parse_records(body: &str) -> Result<RecordPage, CrmError> {
    let mut records = Vec::new();
    let mut deleted = Vec::new();
    for (i, line) in body.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| {
            CrmError::permanent(format!("records_url answered a bad line {}: {why}", i + 1))
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let kind = value["kind"]
            .as_str()
            .map(str::to_ascii_lowercase)
            .filter(|k| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
            .ok_or_else(|| bad("\"kind\" must be a record kind ([a-z0-9_]+)".into()))?;
        let id = value["id"]
            .as_str()
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| bad("\"id\" must be a non-empty string".into()))?
            .to_string();
        if value["deleted"].as_bool() == Some(true) {
            deleted.push((kind, id));
            continue;
        }
        let mut record: Record = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        record.kind = kind;
        record.updated_at = 0;
        records.push(record);
    }
    Ok(RecordPage {
        records,
        deleted,
        ..RecordPage::default()
    })
}

impl CrmAdapter for WebhookAdapter {
    fn name(&self) -> &'static str {
        "webhook"
    }

    async fn pull_records(&self, cursor: Option<&str>) -> Result<RecordPage, CrmError> {
        let Some(url) = &self.records_url else {
            return Ok(RecordPage::default());
        };
        let what = format!("records_url {}", shown(url));
        let mut url = url.clone();
        if let Some(c) = cursor {
            url.query_pairs_mut().append_pair("cursor", c);
        }
        let id = format!("records_{}", unix_now());
        let timestamp = unix_now();
        let response = self
            .client
            .get(url)
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&self.keys, &id, timestamp, b""),
            )
            .send()
            .await
            .map_err(|e| transport_error(&what, e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response
            .text()
            .await
            .map_err(|e| transport_error(&what, e))?;
        if !(200..300).contains(&status) {
            let retry_after = headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            return Err(match classify_status(&what, status, retry_after, &text) {
                // A records endpoint that refuses a pull refuses every pull.
                CrmError::Permanent { message } => CrmError::Endpoint { message },
                other => other,
            });
        }
        let page = parse_records(&text)?;
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        Ok(RecordPage {
            cursor: header(NEXT_CURSOR_HEADER),
            more: header(MORE_HEADER).is_some_and(|v| v.eq_ignore_ascii_case("true")),
            ..page
        })
    }

    async fn deliver(
        &self,
        event: &OutboxEvent,
        _crm_id: Option<&str>,
    ) -> Result<DeliveryReceipt, CrmError> {
        self.post(&event.id, envelope(event)?).await?;
        // A webhook receiver has no id of its own to report.
        Ok(DeliveryReceipt::default())
    }

    async fn test(&self) -> Result<String, CrmError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let id = format!("test_{nanos}");
        let body = serde_json::to_vec(&serde_json::json!({
            "type": "webhook.test",
            "timestamp": format_time(unix_now()),
            "data": {"message": "crm-mailsync test event: answer 2xx; it creates nothing"},
        }))
        .map_err(|e| CrmError::permanent(e.to_string()))?;
        let status = self.post(&id, body).await?;
        Ok(format!(
            "webhook {} accepted a signed webhook.test event (HTTP {status})",
            shown(&self.url)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks reference example (the spec's and its
    /// libraries' test vector), checked independently with Python:
    /// `base64(hmac.new(b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    /// b'msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{"test": 2432232314}',
    /// sha256).digest())`.
    #[test]
    fn signature_matches_the_standard_webhooks_reference_example() {
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = signature(
            &[key],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    /// Rotation: one `v1,` per secret, space separated, in the file's order
    /// (second value computed with Python as above, key
    /// `dGVzdC1zZWNyZXQtcm90YXRlZC0wMDAwMDAwMDAw`).
    #[test]
    fn every_secret_signs_for_rotation() {
        let keys = [
            signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
            signing_key("whsec_dGVzdC1zZWNyZXQtcm90YXRlZC0wMDAwMDAwMDAw").unwrap(),
        ];
        let sig = signature(
            &keys,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,U4DKGB8ZkJUL5D+azGcj4Mk1FGz6msSO67Au5ee06dA="
        );
        assert!(signing_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(signing_key("whsec_not base64!").is_err());
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // Already past: no wait.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:20:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn statuses_are_classified_as_documented() {
        let w = "webhook http://127.0.0.1/hook";
        let ra = Some(Duration::from_secs(7));
        for s in [408, 429, 500, 502, 503, 504] {
            let e = classify_status(w, s, ra, "busy");
            assert!(matches!(e, CrmError::Transient { .. }), "{s}: {e:?}");
            assert_eq!(e.retry_after(), ra, "{s}");
        }
        for s in [301, 302, 401, 403, 404, 405, 410] {
            let e = classify_status(w, s, None, "");
            assert!(matches!(e, CrmError::Endpoint { .. }), "{s}: {e:?}");
        }
        let long = "x".repeat(5000);
        for s in [400, 409, 413, 422] {
            let e = classify_status(w, s, None, &format!("field subject: {long}"));
            let CrmError::Permanent { message } = &e else {
                panic!("{s}: {e:?}");
            };
            assert!(message.contains("field subject"), "{message}");
            assert!(message.len() < 600, "response text truncated");
        }
        let gone = classify_status(w, 410, None, "").to_string();
        assert!(
            gone.contains("410 Gone") && gone.contains("127.0.0.1"),
            "{gone}"
        );
    }

    #[test]
    fn records_lines_upsert_and_delete() {
        let body = r#"{"kind":"contact","id":"c1","name":"Ann","emails":["Ann@Example.test"]}

{"kind":"Account","id":"a1","emails":["info@a.test"],"email_enabled":false}
{"kind":"contact","id":"c2","deleted":true}
"#;
        let RecordPage {
            records, deleted, ..
        } = parse_records(body).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].emails, vec!["Ann@Example.test"]);
        assert_eq!(records[1].kind, "account");
        assert!(!records[1].email_enabled);
        assert!(records[0].email_enabled);
        assert_eq!(deleted, vec![("contact".to_string(), "c2".to_string())]);
        let e = parse_records("{\"kind\":\"contact\",\"id\":\"c1\"}\nnot json\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(parse_records("{\"kind\":\"con tact\",\"id\":\"c1\"}").is_err());
        assert!(parse_records("{\"kind\":\"contact\",\"id\":\"\"}").is_err());
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        let u = reqwest::Url::parse("https://user:pw@crm.example/hook?token=s3cret#x").unwrap();
        assert_eq!(shown(&u), "https://crm.example/hook");
    }

    #[test]
    fn the_client_takes_the_crate_tls_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let settings = WebhookSettings {
            url: "https://crm.example/hook".into(),
            secrets: vec![crate::config::Secret::new(
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            )],
            secret_file: dir.path().join("secret"),
            records_url: None,
            allow_insecure: false,
            ca_file: None,
            timeout: Duration::from_secs(5),
            alert_group_wait: Duration::ZERO,
        };
        let a = WebhookAdapter::new(&settings).unwrap();
        let debug = format!("{a:?}");
        assert!(!debug.contains("MfKQ9r8"), "{debug}");
        let none = WebhookSettings {
            secrets: vec![],
            ..settings
        };
        assert!(WebhookAdapter::new(&none).is_err());
    }
}
