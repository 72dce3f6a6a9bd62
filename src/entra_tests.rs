use super::*;

const CERT: &[u8] = include_bytes!("../fixtures/graph/test-cert.pem");
const KEY: &[u8] = include_bytes!("../fixtures/graph/test-key.pem");
const X5T: &str = include_str!("../fixtures/graph/x5t-s256.txt");

fn decode(part: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap()
}

#[test]
fn margin_is_a_tenth_within_bounds() {
    assert_eq!(
        refresh_margin(Duration::from_secs(3599)),
        Duration::from_secs(300)
    );
    assert_eq!(
        refresh_margin(Duration::from_secs(600)),
        Duration::from_secs(60)
    );
    assert_eq!(
        refresh_margin(Duration::from_secs(3)),
        Duration::from_secs(1)
    );
}

#[test]
fn certificate_assertion_has_the_documented_shape() {
    let url = "https://login.microsoftonline.com/t/oauth2/v2.0/token";
    let jwt = client_assertion(CERT, KEY, "app-1", url, 1_800_000_000).unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["x5t#S256"], X5T.trim());
    let claims: serde_json::Value = serde_json::from_slice(&decode(parts[1])).unwrap();
    assert_eq!(claims["aud"], url);
    assert_eq!(claims["iss"], "app-1");
    assert_eq!(claims["sub"], "app-1");
    assert_eq!(claims["nbf"], 1_800_000_000i64);
    assert_eq!(claims["exp"], 1_800_000_600i64);
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
    // Two assertions never share a jti.
    let again = client_assertion(CERT, KEY, "app-1", url, 1_800_000_000).unwrap();
    assert_ne!(again, jwt);

    // The signature verifies with the key's public half (RS256 = PKCS#1 v1.5 SHA-256).
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(KEY).unwrap();
    let pair = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        pair.public().as_ref(),
    );
    let signed = format!("{}.{}", parts[0], parts[1]);
    public.verify(signed.as_bytes(), &decode(parts[2])).unwrap();
}

#[test]
fn bad_key_is_a_permanent_credential_error() {
    let e = client_assertion(CERT, b"not a key", "a", "u", 0).unwrap_err();
    assert!(matches!(e, EntraError::Credential(_)));
    assert_eq!(e.disposition(), Disposition::Permanent);
    assert!(e.is_rejected());
}

#[test]
fn debug_never_shows_secrets() {
    let c = Credential::Secret(Secret::new("hunter2"));
    assert!(!format!("{c:?}").contains("hunter2"));
    let c = Credential::Certificate {
        cert_pem: CERT.to_vec(),
        key_pem: KEY.to_vec(),
    };
    assert!(!format!("{c:?}").contains("PRIVATE"));
    let ts = TokenSource::new(
        reqwest::Client::new(),
        "http://127.0.0.1:1/t".into(),
        "id".into(),
        Credential::Secret(Secret::new("hunter2")),
        "s".into(),
    );
    assert!(!format!("{ts:?}").contains("hunter2"));
}

#[test]
fn aadsts_codes_and_advice() {
    assert_eq!(
        aadsts_code("AADSTS7000222: The provided client secret keys are expired.").as_deref(),
        Some("AADSTS7000222")
    );
    assert_eq!(aadsts_code("no code"), None);
    let t = what_to_do(
        "invalid_client",
        Some("AADSTS7000222"),
        "client_secret_file",
    );
    assert!(
        t.contains("expired") && t.contains("client_secret_file"),
        "{t}"
    );
    let t = what_to_do("invalid_client", Some("AADSTS7000215"), "client_secret");
    assert!(
        t.contains("wrong") && t.contains("Certificates & secrets"),
        "{t}"
    );
    assert!(what_to_do("unauthorized_client", Some("AADSTS700016"), "x").contains("client_id"));
    assert!(what_to_do("invalid_request", Some("AADSTS90002"), "x").contains("tenant"));
    assert!(what_to_do("unauthorized_client", None, "x").contains("not allowed"));
}

/// A tiny token endpoint: answers the queued responses in order.
async fn token_endpoint(
    answers: Vec<(u16, &'static str)>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::extract::State;
    use std::sync::{Arc, Mutex};
    type S = (
        Arc<Mutex<Vec<(u16, &'static str)>>>,
        Arc<Mutex<Vec<String>>>,
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let state: S = (Arc::new(Mutex::new(answers)), seen.clone());
    let app = axum::Router::new()
        .route(
            "/t/oauth2/v2.0/token",
            axum::routing::post(
                |State((answers, seen)): State<S>, body: String| async move {
                    seen.lock().unwrap().push(body);
                    let (status, text) = answers.lock().unwrap().remove(0);
                    (axum::http::StatusCode::from_u16(status).unwrap(), text)
                },
            ),
        )
        .with_state(state);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}/t/oauth2/v2.0/token"), seen)
}

#[tokio::test]
async fn rejection_names_the_code_and_secret_file_is_reread() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "old\n").unwrap();
    let (url, seen) = token_endpoint(vec![
        (
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS7000222: The provided client secret keys for app 'x' are expired.\r\nTrace ID: 1"}"#,
        ),
        (200, r#"{"token_type":"Bearer","expires_in":3599,"access_token":"tok-1"}"#),
    ])
    .await;
    let ts = TokenSource::new(
        reqwest::Client::new(),
        url,
        "app-1".into(),
        Credential::SecretFile(file.clone()),
        "https://graph.microsoft.com/.default".into(),
    );
    let e = ts.token().await.unwrap_err();
    assert_eq!(e.aadsts(), Some("AADSTS7000222"));
    assert_eq!(e.disposition(), Disposition::Permanent);
    let text = e.to_string();
    assert!(
        text.contains("AADSTS7000222") && text.contains("expired"),
        "{text}"
    );
    assert!(!text.contains("Trace ID"), "{text}");
    std::fs::write(&file, "new\n").unwrap();
    assert_eq!(ts.token().await.unwrap().expose(), "tok-1");
    assert!(ts.expires_at().is_some());
    let bodies = seen.lock().unwrap().clone();
    assert!(bodies[0].contains("client_secret=old"), "{}", bodies[0]);
    assert!(bodies[1].contains("client_secret=new"));
    assert!(bodies[1].contains("grant_type=client_credentials"));
}

#[tokio::test]
async fn busy_endpoint_is_transient_with_retry_after() {
    let (url, _) = token_endpoint(vec![(503, "")]).await;
    let ts = TokenSource::new(
        reqwest::Client::new(),
        url,
        "a".into(),
        Credential::Secret(Secret::new("s")),
        "s".into(),
    );
    let e = ts.token().await.unwrap_err();
    assert_eq!(e.disposition(), Disposition::Transient);
}

#[tokio::test]
async fn certificate_credential_posts_an_assertion() {
    let (url, seen) = token_endpoint(vec![(
        200,
        r#"{"token_type":"Bearer","expires_in":"3599","access_token":"tok"}"#,
    )])
    .await;
    let ts = TokenSource::new(
        reqwest::Client::new(),
        url,
        "a".into(),
        Credential::Certificate {
            cert_pem: CERT.to_vec(),
            key_pem: KEY.to_vec(),
        },
        "s".into(),
    );
    assert_eq!(ts.token().await.unwrap().expose(), "tok");
    let body = seen.lock().unwrap()[0].clone();
    assert!(body.contains("client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"), "{body}");
    assert!(body.contains("client_assertion=ey"));
    assert!(!body.contains("client_secret"));
}
