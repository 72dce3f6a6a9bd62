//! The stand-in's Microsoft Entra ID token endpoint: client credentials
//! with a secret or a certificate's client assertion (see the module docs
//! of [`super`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use chrono::Utc;
use serde_json::{json, Value};

use super::handlers::{b64url, json_response};
use super::query::parse_query;
use super::{Inner, Shared, GRAPH_SCOPE};

pub(crate) async fn token_endpoint(
    State(s): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    let form: HashMap<String, String> = parse_query(Some(&String::from_utf8_lossy(&body)))
        .into_iter()
        .collect();
    let mut inner = s.lock();
    let aad = |inner: &mut Inner, status: StatusCode, err: &str, code: u32, text: String| {
        inner.stats.token_refusals += 1;
        json_response(status, super::entra::refusal_body(err, code, &text))
    };
    if !tenant.eq_ignore_ascii_case(&s.tenant) {
        return aad(
            &mut inner,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."),
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return aad(
            &mut inner,
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.".into(),
        );
    }
    let client_id = form.get("client_id").cloned().unwrap_or_default();
    let Some(client) = inner.clients.get(&client_id).cloned() else {
        return aad(
            &mut inner,
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'."),
        );
    };
    if form.get("scope").map(String::as_str) != Some(GRAPH_SCOPE) {
        return aad(
            &mut inner,
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            format!("The provided value for scope {} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).", form.get("scope").cloned().unwrap_or_default()),
        );
    }
    if let Some(assertion) = form.get("client_assertion") {
        if form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return aad(
                &mut inner,
                StatusCode::BAD_REQUEST,
                "invalid_request",
                50027,
                "JWT token is invalid or malformed: unknown client_assertion_type.".into(),
            );
        }
        if let Err(text) = check_assertion(assertion, &client, &client_id, &s.token_url()) {
            return aad(
                &mut inner,
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700027,
                text,
            );
        }
    } else {
        if client.secret.is_none() || form.get("client_secret") != client.secret.as_ref() {
            return aad(&mut inner, StatusCode::UNAUTHORIZED, "invalid_client", 7000215, format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."));
        }
        if client.secret_expired {
            return aad(&mut inner, StatusCode::UNAUTHORIZED, "invalid_client", 7000222, format!("The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds."));
        }
    }
    inner.token_counter += 1;
    let token = format!(
        "eyJ0eXAiOiJKV1QiLCJub25jZSI6Imdyc.graph-standin-{}.{:016x}",
        inner.token_counter,
        inner.token_counter.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    );
    let lifetime = inner.token_lifetime;
    inner
        .tokens
        .insert(token.clone(), Instant::now() + lifetime);
    inner.stats.tokens_issued += 1;
    json_response(
        StatusCode::OK,
        json!({"token_type": "Bearer", "expires_in": lifetime.as_secs(), "ext_expires_in": lifetime.as_secs(), "access_token": token}),
    )
}

/// Checks an RS256 client assertion as Entra does: the certificate it
/// names, the audience, the issuer and subject, the time window, the
/// signature.
fn check_assertion(
    jwt: &str,
    client: &super::Client,
    client_id: &str,
    token_url: &str,
) -> Result<(), String> {
    let Some((cert, public)) = &client.certificate else {
        return Err(format!(
            "The app '{client_id}' has no certificate credentials."
        ));
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err("JWT token is invalid or malformed.".into());
    }
    let dec = |p: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| "JWT token is invalid or malformed.".to_string())
    };
    let header: Value = serde_json::from_slice(&dec(parts[0])?).map_err(|e| e.to_string())?;
    let claims: Value = serde_json::from_slice(&dec(parts[1])?).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err("The client assertion must be signed with RS256.".into());
    }
    let s256 = b64url(ring::digest::digest(&ring::digest::SHA256, cert).as_ref());
    let sha1 = b64url(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert).as_ref());
    if header["x5t#S256"].as_str() != Some(s256.as_str())
        && header["x5t"].as_str() != Some(sha1.as_str())
    {
        return Err(format!("Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of key used by client: '{}']", header["x5t#S256"]));
    }
    if claims["aud"].as_str() != Some(token_url) {
        return Err(format!(
            "The audience claim value is invalid '{}'.",
            claims["aud"]
        ));
    }
    if claims["iss"].as_str() != Some(client_id) || claims["sub"].as_str() != Some(client_id) {
        return Err("The issuer and subject of the client assertion must be the client id.".into());
    }
    let now = Utc::now().timestamp();
    let exp = claims["exp"].as_i64().unwrap_or(0);
    let nbf = claims["nbf"].as_i64().unwrap_or(i64::MAX);
    if exp < now || nbf > now + 300 {
        return Err("The provided client assertion is expired or not yet valid.".into());
    }
    let sig = dec(parts[2])?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public.as_slice(),
    );
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .map_err(|_| "Client assertion contains an invalid signature.".to_string())
}
