//! The Microsoft Entra ID token endpoint's refusal, as the test stand-ins
//! answer it (`{"error", "error_description": "AADSTS…: …", "error_codes"…}`).

/// The JSON body of a refused token request.
pub fn refusal_body(error: &str, code: u32, text: &str) -> serde_json::Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    serde_json::json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: 0000aaaa-11bb-cccc-dd22-eeeeee333333\r\nCorrelation ID: aaaa0000-bb11-2222-33cc-444444dddddd\r\nTimestamp: {now}"),
        "error_codes": [code],
        "timestamp": now,
        "trace_id": "0000aaaa-11bb-cccc-dd22-eeeeee333333",
        "correlation_id": "aaaa0000-bb11-2222-33cc-444444dddddd",
    })
}
