//! Microsoft Entra ID client credentials, shared by the Dataverse adapter and
//! the Microsoft Graph connector: one access token per app and scope, cached
//! and renewed before it runs out.
//!
//! The token endpoint is
//! `POST https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token` with the
//! form `grant_type=client_credentials&client_id&scope` and either
//! `client_secret`, or `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
//! and `client_assertion` (a JWT signed with the app's certificate key, RS256,
//! header `x5t#S256`). It answers
//! `{"token_type":"Bearer","expires_in":3599,"access_token":"…"}`. A rejected
//! client answers 400/401 with `{"error":"invalid_client",
//! "error_description":"AADSTS7000215: Invalid client secret provided. …"}`:
//! [`EntraError::Rejected`] names the AADSTS code and what to do.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use crate::config::Secret;
use crate::error::{Classify, Disposition};
use crate::model::UnixTime;

/// Renew this long before expiry: a tenth of the token's lifetime, at least
/// one second (short-lived test tokens) and at most five minutes (an hour's
/// token is renewed at 55 minutes, as Microsoft's own libraries do).
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// How the app proves who it is. `Debug` never shows the secret or the key.
#[derive(Clone)]
pub enum Credential {
    /// A client secret held in memory (from the config or the environment).
    Secret(Secret),
    /// A client secret read from this file at every token request, so a new
    /// secret written there is used on the next retry without a restart.
    SecretFile(PathBuf),
    /// A certificate uploaded to the app registration and its private key
    /// (PEM; PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`): each token
    /// request carries a fresh RS256 client assertion.
    Certificate {
        /// The certificate, PEM (the first `CERTIFICATE` block is used).
        cert_pem: Vec<u8>,
        /// Its RSA private key, PEM.
        key_pem: Vec<u8>,
    },
}

impl std::fmt::Debug for Credential {
    // Hand-written so a `{:?}` never prints a secret or a key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret(***)"),
            Credential::SecretFile(p) => f.debug_tuple("SecretFile").field(p).finish(),
            Credential::Certificate { .. } => f.write_str("Certificate(***)"),
        }
    }
}

impl Credential {
    /// What the operator fixes when the token endpoint rejects it.
    fn what_to_fix(&self) -> &'static str {
        match self {
            Credential::Secret(_) => "client_secret",
            Credential::SecretFile(_) => "client_secret_file",
            Credential::Certificate { .. } => "the certificate",
        }
    }
}

/// Token endpoint failure.
#[derive(Debug, thiserror::Error)]
pub enum EntraError {
    /// Network trouble or a time-out talking to the token endpoint.
    #[error("cannot reach the token endpoint {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// 429 or 5xx: the endpoint is busy or failing; worth retrying.
    #[error("the token endpoint answered {status}{}", suffix(text))]
    Busy {
        status: u16,
        text: String,
        retry_after: Option<Duration>,
    },
    /// The endpoint refused the client (bad secret, expired secret, unknown
    /// app or tenant…): retrying the same credentials cannot succeed.
    #[error(
        "the token endpoint rejected client {client_id}{}: {todo} ({text})",
        code_part(aadsts)
    )]
    Rejected {
        client_id: String,
        /// OAuth error (`invalid_client`, `unauthorized_client`, …).
        error: String,
        /// The `AADSTS…` code from the description, if any.
        aadsts: Option<String>,
        /// What the operator should do.
        todo: String,
        /// The endpoint's own text (error and first line of the description).
        text: String,
    },
    /// A success status without a usable token.
    #[error("the token endpoint {url} answered {status} without a usable token ({detail})")]
    BadAnswer {
        url: String,
        status: u16,
        detail: String,
    },
    /// The local credential cannot be used (unreadable secret file, bad
    /// certificate or key).
    #[error("the client credential cannot be used: {0}")]
    Credential(String),
}

fn suffix(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

fn code_part(code: &Option<String>) -> String {
    code.as_ref()
        .map(|c| format!(" with {c}"))
        .unwrap_or_default()
}

impl Classify for EntraError {
    fn disposition(&self) -> Disposition {
        match self {
            EntraError::Unreachable { .. } | EntraError::Busy { .. } => Disposition::Transient,
            EntraError::Rejected { .. }
            | EntraError::BadAnswer { .. }
            | EntraError::Credential(_) => Disposition::Permanent,
        }
    }
}

impl EntraError {
    /// The endpoint's own `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            EntraError::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True when the endpoint refused the client's credentials (or they
    /// cannot be used at all): an authentication failure, not an outage.
    pub fn is_rejected(&self) -> bool {
        matches!(
            self,
            EntraError::Rejected { .. } | EntraError::Credential(_)
        )
    }

    /// The `AADSTS…` code of a rejection.
    pub fn aadsts(&self) -> Option<&str> {
        match self {
            EntraError::Rejected { aadsts, .. } => aadsts.as_deref(),
            _ => None,
        }
    }
}

/// What to do about a rejection, by AADSTS code first, then OAuth error.
fn what_to_do(error: &str, aadsts: Option<&str>, fix: &str) -> String {
    let new_secret = "create a new client secret in the app registration (Entra admin center → App registrations → Certificates & secrets)";
    let where_to = if fix == "client_secret_file" {
        "and write its value (not its ID) to client_secret_file; it is read again on the next retry"
    } else {
        "and put its value (not its ID) into the configuration"
    };
    match aadsts {
        Some("AADSTS7000215") => format!("the client secret was rejected as wrong: {new_secret} {where_to}"),
        Some("AADSTS7000222") => format!("the client secret has expired: {new_secret} {where_to}"),
        Some("AADSTS700016") => "no application with this client_id exists in the tenant: check client_id and the tenant in token_url, and that the app registration lives in (or was consented to in) that tenant".into(),
        Some("AADSTS90002") => "the tenant was not found: check the tenant ID or domain in token_url".into(),
        Some("AADSTS700027") | Some("AADSTS700024") => "the client assertion was refused: upload the certificate (its public part) to the app registration under Certificates & secrets, and check the machine's clock".into(),
        Some("AADSTS7000112") => "the application is disabled in the tenant: enable it under Enterprise applications".into(),
        Some("AADSTS65001") | Some("AADSTS650057") => "admin consent is missing: grant admin consent for the app's application permissions".into(),
        _ => match error {
            "invalid_client" => format!("the client credentials were rejected: check client_id and {fix}; for a secret, {new_secret} {where_to}"),
            "unauthorized_client" => "the application is not allowed to get tokens in this tenant: check client_id, that the app registration exists in this tenant and is enabled".into(),
            "invalid_scope" => "the scope is not valid for this app: check scope (it ends in /.default)".into(),
            _ => format!("check the app registration, client_id and {fix}"),
        },
    }
}

/// A token in hand.
#[derive(Debug, Clone)]
struct Cached {
    token: Secret,
    /// Renew from this instant on (expiry minus the margin).
    renew_at: Instant,
}

/// The token cache (see the module docs). Share it (`Arc`) between every
/// user of one app registration; each request asks it for a token.
pub struct TokenSource {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    credential: Credential,
    scope: String,
    cached: tokio::sync::Mutex<Option<Cached>>,
    /// Copy of the cached token's expiry, readable without the async lock.
    expires_at: std::sync::Mutex<Option<UnixTime>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("credential", &self.credential)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct TokenErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenSource {
    /// A token source for `client_id` at `token_url` (the tenant's
    /// `…/oauth2/v2.0/token`) asking for `scope` (e.g.
    /// `https://graph.microsoft.com/.default`). Contacts nothing yet.
    pub fn new(
        http: reqwest::Client,
        token_url: String,
        client_id: String,
        credential: Credential,
        scope: String,
    ) -> Self {
        TokenSource {
            http,
            token_url,
            client_id,
            credential,
            scope,
            cached: tokio::sync::Mutex::new(None),
            expires_at: std::sync::Mutex::new(None),
        }
    }

    /// When the current token expires (Unix seconds); `None` before the
    /// first one was obtained.
    pub fn expires_at(&self) -> Option<UnixTime> {
        *self.expires_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A token that is good for at least the refresh margin.
    pub async fn token(&self) -> Result<Secret, EntraError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.renew_at {
                return Ok(c.token.clone());
            }
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// The API refused `rejected` (401): fetch a new token, unless another
    /// request already replaced it.
    pub async fn renew(&self, rejected: &Secret) -> Result<Secret, EntraError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.token.expose() != rejected.expose() && Instant::now() < c.renew_at {
                return Ok(c.token.clone());
            }
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// The form fields that prove the client's identity.
    fn credential_fields(&self) -> Result<Vec<(&'static str, String)>, EntraError> {
        Ok(match &self.credential {
            Credential::Secret(s) => vec![("client_secret", s.expose().to_string())],
            Credential::SecretFile(path) => {
                let s = std::fs::read_to_string(path).map_err(|e| {
                    EntraError::Credential(format!(
                        "cannot read client_secret_file {}: {e}",
                        path.display()
                    ))
                })?;
                let s = s.trim();
                if s.is_empty() {
                    return Err(EntraError::Credential(format!(
                        "client_secret_file {} is empty",
                        path.display()
                    )));
                }
                vec![("client_secret", s.to_string())]
            }
            Credential::Certificate { cert_pem, key_pem } => {
                let jwt = client_assertion(
                    cert_pem,
                    key_pem,
                    &self.client_id,
                    &self.token_url,
                    crate::model::now(),
                )?;
                vec![
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
                    ),
                    ("client_assertion", jwt),
                ]
            }
        })
    }

    async fn fetch(&self) -> Result<Cached, EntraError> {
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", self.client_id.clone()),
            ("scope", self.scope.clone()),
        ];
        form.extend(self.credential_fields()?);
        let started = Instant::now();
        let resp = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| EntraError::Unreachable {
                url: self.token_url.clone(),
                detail: describe_reqwest(&e),
            })?;
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let body = resp.text().await.map_err(|e| EntraError::Unreachable {
            url: self.token_url.clone(),
            detail: format!("reading the answer failed: {}", describe_reqwest(&e)),
        })?;
        if status.is_success() {
            let parsed: TokenResponse =
                serde_json::from_str(&body).map_err(|e| EntraError::BadAnswer {
                    url: self.token_url.clone(),
                    status: status.as_u16(),
                    detail: e.to_string(),
                })?;
            // `expires_in` is a number, or a string of digits from older endpoints.
            let lifetime = match parsed.expires_in {
                Some(serde_json::Value::Number(n)) => n.as_u64(),
                Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
                _ => None,
            }
            .map_or(Duration::from_secs(3600), Duration::from_secs);
            let expires_at = crate::model::now() + lifetime.as_secs() as i64;
            *self.expires_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(expires_at);
            return Ok(Cached {
                token: Secret::new(parsed.access_token),
                renew_at: started + lifetime.saturating_sub(refresh_margin(lifetime)),
            });
        }
        let detail: Option<TokenErrorBody> = serde_json::from_str(&body).ok();
        // Entra appends trace and correlation ids on new lines; the first
        // line is the AADSTS code and its explanation.
        let (error, first) = detail
            .as_ref()
            .map(|d| {
                (
                    d.error.clone(),
                    d.error_description
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string(),
                )
            })
            .unwrap_or_default();
        let text = match (error.is_empty(), first.is_empty()) {
            (false, false) => format!("{error}: {first}"),
            (false, true) => error.clone(),
            (true, false) => first.clone(),
            (true, true) => body.trim().chars().take(200).collect(),
        };
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(EntraError::Busy {
                status: status.as_u16(),
                text,
                retry_after,
            });
        }
        let aadsts = aadsts_code(&first);
        let todo = what_to_do(&error, aadsts.as_deref(), self.credential.what_to_fix());
        Err(EntraError::Rejected {
            client_id: self.client_id.clone(),
            error: if error.is_empty() {
                format!("HTTP {status}")
            } else {
                error
            },
            aadsts,
            todo,
            text: if text.is_empty() {
                format!("HTTP {status}, no error text")
            } else {
                text
            },
        })
    }
}

/// The `AADSTS<digits>` code at the start of (or inside) a description.
fn aadsts_code(description: &str) -> Option<String> {
    let at = description.find("AADSTS")?;
    let digits: String = description[at + 6..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

/// Base64url without padding, as JWTs use.
fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An RS256 client assertion for `client_id` at `token_url`, valid for ten
/// minutes from `now`: header `{"alg":"RS256","typ":"JWT","x5t#S256":…}`
/// (base64url SHA-256 of the certificate's DER), claims `aud` = the token
/// URL, `iss` = `sub` = the client id, a random `jti`, `nbf`, `iat`, `exp`.
pub fn client_assertion(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_id: &str,
    token_url: &str,
    now: UnixTime,
) -> Result<String, EntraError> {
    use ring::signature::RsaKeyPair;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let cert = CertificateDer::from_pem_slice(cert_pem).map_err(|e| {
        EntraError::Credential(format!("the certificate is not a PEM certificate: {e}"))
    })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        EntraError::Credential(format!("the private key is not a PEM private key: {e}"))
    })?;
    let pair = match &key {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => {
            return Err(EntraError::Credential(
                "the private key must be an RSA key (PKCS#8 or PKCS#1 PEM)".into(),
            ))
        }
    }
    .map_err(|e| EntraError::Credential(format!("the private key is not a usable RSA key: {e}")))?;
    let thumb = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let header =
        serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t#S256": b64url(thumb.as_ref())});
    let rng = ring::rand::SystemRandom::new();
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&rng, &mut jti)
        .map_err(|_| EntraError::Credential("no random numbers for the assertion id".into()))?;
    let claims = serde_json::json!({
        "aud": token_url,
        "iss": client_id,
        "sub": client_id,
        "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "nbf": now,
        "iat": now,
        "exp": now + 600,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut sig = vec![0u8; pair.public().modulus_len()];
    pair.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &rng,
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| EntraError::Credential("signing the client assertion failed".into()))?;
    Ok(format!("{signing_input}.{}", b64url(&sig)))
}

/// `Retry-After` as seconds (fractions allowed) or an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let wait = at.timestamp() - crate::model::now();
    Some(Duration::from_secs(wait.clamp(0, 86_400) as u64))
}

/// A transport error with its cause chain (reqwest's own text has the URL,
/// which may be long; the causes say what happened).
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut out = kind.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
#[path = "entra_tests.rs"]
mod tests;
