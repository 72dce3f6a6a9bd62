//! The Graph HTTP client: one [`GraphApp`] per Entra app (token, request
//! budget, HTTP client), one [`GraphMailbox`] per mailbox (at most
//! [`MAX_IN_FLIGHT`] requests at once, shared by the mailbox's connector and
//! its sender). Every request carries the bearer token and
//! `Prefer: IdType="ImmutableId"`, has a time-out, waits for the app's budget,
//! retries 429/503/504 inside the call honouring `Retry-After`, and renews
//! the token once on a 401.

use std::sync::Arc;
use std::time::Duration;

// Tokio's clock, so the budget follows paused time in tests.
use tokio::time::Instant;

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use tokio::sync::Semaphore;

use super::error::{classify, error_parts, GraphError, Target};
use super::{GraphSettings, SentItem};
use crate::entra::{describe_reqwest, TokenSource};
use crate::model::UnixTime;

/// Graph allows four concurrent requests per mailbox per app (Outlook
/// service limits); more answer 429 `MailboxConcurrency`.
pub const MAX_IN_FLIGHT: usize = 4;

/// Throttled answers retried inside one call before giving up with a
/// transient error.
const RETRIES: u32 = 3;

/// Longest `Retry-After` waited inside a call; a longer one is handed to the
/// scheduler (the error carries it) instead of holding the task.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(30);

/// A budget that keeps `limit` requests in any `window`: a bucket spends
/// at most its size plus one window of refill in a window, so a tenth of
/// the limit as the burst and nine tenths refilled over the window never
/// exceed it (Graph's 10,000 per 10 minutes: 1,000 at once, then 900 a
/// minute); a small burst leaves the most for the sustained rate.
fn window_budget(limit: u32, window: Duration) -> Budget {
    let burst = (limit / 10).max(1);
    let per_window = f64::from(limit - burst);
    let per_minute = per_window * 60.0 / window.as_secs_f64().max(1.0);
    Budget::new(per_minute.max(1.0) as u32, burst)
}

/// A token bucket: `per_minute` requests a minute, bursts up to `burst`.
/// `per_minute` 0 = no budget.
#[derive(Debug)]
struct Budget {
    per_minute: u32,
    burst: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl Budget {
    fn new(per_minute: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Budget {
            per_minute,
            burst,
            state: tokio::sync::Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until one request may go.
    async fn take(&self) {
        if self.per_minute == 0 {
            return;
        }
        let rate = f64::from(self.per_minute) / 60.0;
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                let refill = now.duration_since(s.1).as_secs_f64() * rate;
                s.0 = (s.0 + refill).min(self.burst);
                s.1 = now;
                if s.0 >= 1.0 {
                    s.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - s.0) / rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// One Entra app registration's Graph access: shared by every mailbox of a
/// profile and by their senders.
#[derive(Debug)]
pub struct GraphApp {
    http: reqwest::Client,
    token: TokenSource,
    budget: Budget,
}

impl GraphApp {
    /// `http` should have a connect time-out (per-request time-outs come from
    /// each mailbox's settings); `app_budget_per_minute` (bursts up to ten
    /// seconds' worth) = 0 turns the app's budget off. Each mailbox also
    /// keeps Graph's own per-mailbox limit (10,000 requests in 10 minutes).
    pub fn new(http: reqwest::Client, token: TokenSource, app_budget_per_minute: u32) -> Self {
        GraphApp {
            http,
            token,
            budget: Budget::new(app_budget_per_minute, app_budget_per_minute / 6),
        }
    }

    /// When the current access token expires.
    pub fn token_expires_at(&self) -> Option<UnixTime> {
        self.token.expires_at()
    }

    /// The HTTP client for Graph and its token endpoint: rustls (ring) with
    /// the system roots plus `ca_file`, a connect time-out, no redirects
    /// (our token must not follow one elsewhere). Per-request time-outs are
    /// set by each mailbox; the token endpoint gets `token_timeout`.
    pub fn http_client(
        ca_file: Option<&std::path::Path>,
        connect_timeout: Duration,
        token_timeout: Duration,
    ) -> Result<reqwest::Client, crate::net::NetError> {
        let tls = crate::net::client_config(ca_file)?;
        reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(connect_timeout)
            // The whole-request bound (token requests have no own); each
            // Graph request sets its own shorter one.
            .timeout(token_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("crm-mailsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| crate::net::NetError::TlsSetup(format!("Graph HTTP client: {e}")))
    }
}

/// A request body.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    None,
    Json(serde_json::Value),
    /// `Content-Type: text/plain` (sendMail with base64 MIME).
    Text(String),
}

/// A successful answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
    /// The body was not read: its `Content-Length` (or the bytes read so
    /// far) passed the limit.
    pub too_large: Option<u64>,
}

/// One request, as the helpers build it.
pub(crate) struct Request<'a> {
    pub method: Method,
    /// Relative to `/users/{id}/`, or a full link Graph gave us.
    pub path: &'a str,
    pub body: Body,
    /// Extra `Prefer` values (`odata.maxpagesize=…`).
    pub prefer: Option<String>,
    pub target: Target,
    pub what: &'a str,
    /// Stop reading a body larger than this.
    pub max_body: Option<u64>,
}

/// One mailbox's Graph access (see the module docs).
#[derive(Debug)]
pub struct GraphMailbox {
    app: Arc<GraphApp>,
    user: String,
    /// `{graph_url}/users/{user}`.
    base: String,
    graph_url: String,
    in_flight: Semaphore,
    /// The permits of `in_flight`.
    max_in_flight: usize,
    /// Graph's per-app-and-mailbox request limit.
    budget: Budget,
    timeout: Duration,
}

impl GraphMailbox {
    /// The mailbox `settings.user` at `settings.graph_url` through `app`.
    pub fn new(app: Arc<GraphApp>, settings: &GraphSettings) -> Arc<Self> {
        let graph_url = settings.graph_url.trim_end_matches('/').to_string();
        Arc::new(GraphMailbox {
            base: format!("{graph_url}/users/{}", path_segment(&settings.user)),
            graph_url,
            user: settings.user.clone(),
            app,
            in_flight: Semaphore::new(settings.max_in_flight.clamp(1, MAX_IN_FLIGHT)),
            max_in_flight: settings.max_in_flight.clamp(1, MAX_IN_FLIGHT),
            budget: window_budget(settings.request_limit.0, settings.request_limit.1),
            timeout: settings.request_timeout,
        })
    }

    /// Requests this mailbox may have in flight.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// The `{id}` of `/users/{id}`.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// When the app's current access token expires.
    pub fn token_expires_at(&self) -> Option<UnixTime> {
        self.app.token_expires_at()
    }

    /// Gets an access token (Test & Enable: the credentials work).
    pub async fn check_token(&self) -> Result<(), GraphError> {
        self.app.token.token().await.map_err(GraphError::Token)?;
        Ok(())
    }

    /// POST /users/{id}/sendMail with Content-Type text/plain and the base64
    /// MIME body. 202 → Ok. Exchange keeps our Message-ID and headers and
    /// files the copy in Sent Items.
    pub async fn send_mime(&self, mime: &[u8]) -> Result<(), GraphError> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(mime);
        self.request(Request {
            method: Method::POST,
            path: "sendMail",
            body: Body::Text(b64),
            prefer: None,
            target: Target::Mailbox,
            what: "sending a message (sendMail)",
            max_body: None,
        })
        .await?;
        Ok(())
    }

    /// Sent Items lookup by internetMessageId (exact, with angle brackets as
    /// Graph stores them).
    pub async fn find_sent(
        &self,
        internet_message_id: &str,
    ) -> Result<Option<SentItem>, GraphError> {
        let filter = format!(
            "internetMessageId eq '{}'",
            internet_message_id.replace('\'', "''")
        );
        let path = format!(
            "mailFolders/sentitems/messages?$filter={}&$select=id,internetMessageId",
            query_encode(&filter)
        );
        let v = self
            .get_json(
                &path,
                None,
                Target::Mailbox,
                "looking up a sent message in Sent Items",
            )
            .await?;
        let first = v
            .get("value")
            .and_then(|v| v.as_array())
            .and_then(|a| a.first());
        Ok(first.and_then(|m| {
            Some(SentItem {
                id: m.get("id")?.as_str()?.to_string(),
                internet_message_id: m
                    .get("internetMessageId")
                    .and_then(|s| s.as_str())
                    .unwrap_or(internet_message_id)
                    .to_string(),
            })
        }))
    }

    /// GET /users/{id}/mailFolders/inbox (Test & Enable): "Inbox readable: N messages".
    pub async fn probe_inbox(&self) -> Result<String, GraphError> {
        let v = self
            .get_json(
                "mailFolders/inbox",
                None,
                Target::Mailbox,
                "reading the Inbox",
            )
            .await?;
        let total = v.get("totalItemCount").and_then(|n| n.as_u64());
        Ok(match total {
            Some(n) => format!("Inbox readable: {n} messages"),
            None => "Inbox readable".to_string(),
        })
    }

    /// GET and parse JSON.
    pub(crate) async fn get_json(
        &self,
        path: &str,
        prefer: Option<String>,
        target: Target,
        what: &str,
    ) -> Result<serde_json::Value, GraphError> {
        let answer = self
            .request(Request {
                method: Method::GET,
                path,
                body: Body::None,
                prefer,
                target,
                what,
                max_body: None,
            })
            .await?;
        serde_json::from_slice(&answer.body).map_err(|e| GraphError::BadAnswer {
            what: what.to_string(),
            detail: format!("{} with a body that is not JSON ({e})", answer.status),
        })
    }

    /// The full URL of `path`: relative to the user, or a link Graph gave
    /// (which must stay on the configured Graph endpoint: our token goes with it).
    fn url(&self, path: &str, what: &str) -> Result<String, GraphError> {
        if path.starts_with("https://") || path.starts_with("http://") {
            if !path.starts_with(&format!("{}/", self.graph_url)) {
                return Err(GraphError::BadAnswer {
                    what: what.to_string(),
                    detail: format!(
                        "a link outside {} ({}); not following it with our token",
                        self.graph_url,
                        path.split('?').next().unwrap_or("")
                    ),
                });
            }
            Ok(path.to_string())
        } else {
            Ok(format!("{}/{}", self.base, path.trim_start_matches('/')))
        }
    }

    /// One request (see the module docs). Holds one of the mailbox's
    /// permits from the first attempt until the body is read.
    pub(crate) async fn request(&self, req: Request<'_>) -> Result<Answer, GraphError> {
        let url = self.url(req.path, req.what)?;
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| GraphError::BadAnswer {
                what: req.what.to_string(),
                detail: "the mailbox's request limiter is closed".into(),
            })?;
        let mut token = self.app.token.token().await.map_err(GraphError::Token)?;
        let mut renewed = false;
        let mut throttled = 0u32;
        loop {
            self.budget.take().await;
            self.app.budget.take().await;
            let prefer = match &req.prefer {
                Some(p) => format!("IdType=\"ImmutableId\", {p}"),
                None => "IdType=\"ImmutableId\"".to_string(),
            };
            let mut rb = self
                .app
                .http
                .request(req.method.clone(), &url)
                .bearer_auth(token.expose())
                .header("Prefer", prefer)
                .header("Accept", "application/json")
                .timeout(self.timeout);
            rb = match &req.body {
                Body::None => rb,
                Body::Json(v) => rb
                    .header("Content-Type", "application/json")
                    .body(v.to_string()),
                Body::Text(t) => rb.header("Content-Type", "text/plain").body(t.clone()),
            };
            let resp = rb.send().await.map_err(|e| GraphError::Unreachable {
                what: req.what.to_string(),
                detail: describe_reqwest(&e),
            })?;
            let status = resp.status();
            let headers = resp.headers().clone();
            if status.is_success() {
                return read_body(resp, req.max_body, req.what).await;
            }
            let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            if status == StatusCode::UNAUTHORIZED && !renewed {
                let (code, _) = error_parts(&body);
                tracing::info!(
                    connector = "graph",
                    code = %code,
                    "access token refused (401); renewing it and repeating the request"
                );
                token = self
                    .app
                    .token
                    .renew(&token)
                    .await
                    .map_err(GraphError::Token)?;
                renewed = true;
                continue;
            }
            let error = classify(status, &headers, &body, req.target, req.what, &self.user);
            // A 504 to a POST (sendMail) may have been carried out: not
            // repeated here, the caller looks before sending again.
            let retry_inline = status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE
                || (status == StatusCode::GATEWAY_TIMEOUT && req.method != Method::POST);
            if retry_inline && throttled < RETRIES {
                let wait = error
                    .retry_after()
                    .unwrap_or_else(|| Duration::from_secs(1 << throttled));
                if wait <= MAX_INLINE_WAIT {
                    throttled += 1;
                    tracing::debug!(
                        connector = "graph",
                        status = status.as_u16(),
                        wait_ms = wait.as_millis() as u64,
                        "throttled; waiting as Retry-After says"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            return Err(error);
        }
    }
}

/// Reads a success body, stopping at `max` bytes.
async fn read_body(
    mut resp: reqwest::Response,
    max: Option<u64>,
    what: &str,
) -> Result<Answer, GraphError> {
    let status = resp.status();
    if let (Some(max), Some(len)) = (max, resp.content_length()) {
        if len > max {
            return Ok(Answer {
                status,
                body: Vec::new(),
                too_large: Some(len),
            });
        }
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if let Some(max) = max {
                    if body.len() as u64 > max {
                        return Ok(Answer {
                            status,
                            body: Vec::new(),
                            too_large: Some(body.len() as u64),
                        });
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Err(GraphError::Unreachable {
                    what: what.to_string(),
                    detail: format!("reading the answer failed: {}", describe_reqwest(&e)),
                })
            }
        }
    }
    Ok(Answer {
        status,
        body,
        too_large: None,
    })
}

/// Percent-encodes a path segment or query value (all but RFC 3986 unreserved).
pub(crate) fn query_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A user id or email as a path segment (`@` may stay, as Graph's own
/// examples write it).
pub(crate) fn path_segment(s: &str) -> String {
    query_encode(s).replace("%40", "@")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn budget_spaces_requests_after_the_burst() {
        let b = Budget::new(60, 2);
        let t = tokio::time::Instant::now();
        b.take().await;
        b.take().await;
        assert!(t.elapsed() < Duration::from_millis(10));
        b.take().await;
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(990), "{waited:?}");
        assert!(waited < Duration::from_millis(1100), "{waited:?}");
        // 0 = no budget.
        let free = Budget::new(0, 0);
        for _ in 0..100 {
            free.take().await;
        }
    }

    /// Regression: a bucket as big as Graph's limit, refilled at a tenth of
    /// it a minute, allowed twice the limit in ten minutes.
    #[tokio::test(start_paused = true)]
    async fn a_window_budget_never_passes_its_limit_in_any_window() {
        let window = Duration::from_secs(10);
        let b = window_budget(100, window);
        let start = tokio::time::Instant::now();
        let mut at = Vec::new();
        while start.elapsed() < window * 3 {
            b.take().await;
            at.push(start.elapsed());
        }
        for (i, t) in at.iter().enumerate() {
            let in_window = at[i..].iter().take_while(|u| **u < *t + window).count();
            assert!(
                in_window <= 100,
                "{in_window} requests in the window from {t:?}"
            );
        }
        // And it uses most of it: about 90 a window after the burst.
        assert!(at.len() >= 10 + 3 * 85, "{}", at.len());
    }

    #[test]
    fn ids_are_encoded_as_path_segments() {
        assert_eq!(path_segment("u@x.example"), "u@x.example");
        assert_eq!(path_segment("AAk/A+B="), "AAk%2FA%2BB%3D");
    }
}
