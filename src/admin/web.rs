//! The web admin page at `/`: three static files (`index.html`, `app.js`,
//! `app.css`, under `src/admin/web/`) compiled into the binary, so the page
//! needs no build step and no files beside the daemon.
//!
//! The page and its assets are open: they hold no data. Every piece of data
//! comes from `/api/v1` calls that the script makes with
//! `Authorization: Bearer <token>`, the token kept in the tab's
//! `sessionStorage` — never in a URL, in `localStorage` or in a cookie. A
//! browser adds none of that to a request another site makes, so a forged
//! cross-site request carries no credentials: CSRF-safe by construction.
//!
//! The Content-Security-Policy allows scripts and styles from these files
//! only (no inline script or style, no `eval`), and the script writes data
//! into the page as text only: an email subject is attacker-controlled.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The policy every page response carries (see the module comment).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// One embedded file: its bytes, content type and entity tag.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: String,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Self {
        // A strong tag from the content: after an upgrade the browser's
        // revalidation (`no-cache`) fetches the new file, else gets a 304.
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Asset {
            body,
            content_type,
            etag: format!("\"{hex}\""),
        }
    }
}

static INDEX: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("web/index.html"), "text/html; charset=utf-8"));
static APP_JS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("web/app.js"), "text/javascript; charset=utf-8"));
static APP_CSS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("web/app.css"), "text/css; charset=utf-8"));

/// The headers every response of the page carries, a 404 included.
fn security_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == asset.etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    // Revalidate on every load: the file names carry no version, and the
    // 304 makes it cheap.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(tag) = HeaderValue::from_str(&asset.etag) {
        headers.insert(header::ETAG, tag);
    }
    security_headers(headers);
    response
}

/// `GET /`: the admin page.
#[utoipa::path(
    get,
    path = "/",
    tag = "web",
    operation_id = "web_page",
    responses(
        (status = 200, description = "The web admin page (no token: it holds no data; it asks for the token and sends it on each /api/v1 call)", body = String, content_type = "text/html"),
        (status = 304, description = "Not modified since the `ETag` given in `If-None-Match`"),
    )
)]
pub async fn page(request: HeaderMap) -> Response {
    serve(&INDEX, &request)
}

/// `GET /assets/{file}`: the page's script and style sheet.
#[utoipa::path(
    get,
    path = "/assets/{file}",
    tag = "web",
    operation_id = "web_asset",
    params(("file" = String, Path, description = "`app.js` or `app.css`")),
    responses(
        (status = 200, description = "The file", body = String, content_type = "text/javascript"),
        (status = 304, description = "Not modified since the `ETag` given in `If-None-Match`"),
        (status = 404, description = "No such file", body = String, content_type = "text/plain"),
    )
)]
pub async fn asset(Path(file): Path<String>, request: HeaderMap) -> Response {
    match file.as_str() {
        "app.js" => serve(&APP_JS, &request),
        "app.css" => serve(&APP_CSS, &request),
        _ => {
            let mut response = (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("no asset {file:?}\n"),
            )
                .into_response();
            security_headers(response.headers_mut());
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page must work under its own policy: no inline script, inline
    /// style or event-handler attribute, and only the two assets loaded.
    #[test]
    fn the_page_has_nothing_inline_that_its_policy_would_block() {
        let html = INDEX.body;
        let lower = html.to_ascii_lowercase();
        assert!(!lower.contains("style="), "inline style attribute");
        assert!(!lower.contains("<style"), "inline style element");
        assert!(!lower.contains("javascript:"), "javascript: URL");
        let on_attr = regex::Regex::new(r"(?i)\son[a-z]+\s*=").unwrap();
        assert!(!on_attr.is_match(html), "inline event handler");
        let scripts: Vec<&str> = regex::Regex::new(r"(?is)<script\b[^>]*>(.*?)</script>")
            .unwrap()
            .captures_iter(html)
            .map(|c| c.get(1).map_or("", |m| m.as_str()))
            .collect();
        assert_eq!(scripts, vec![""], "exactly one script, external and empty");
        assert!(html.contains(r#"<script src="/assets/app.js" defer></script>"#));
        assert!(html.contains(r#"href="/assets/app.css""#));
    }

    /// Data goes into the page as text only: the script never assigns HTML
    /// (an email subject is attacker-controlled), keeps the token out of
    /// localStorage and cookies, and sends it as a header only.
    #[test]
    fn the_script_writes_text_only_and_keeps_the_token_in_session_storage() {
        // The code, without its comments (which name what it avoids).
        let js: String = APP_JS
            .body
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                !(l.starts_with("//") || l.starts_with("/*") || l.starts_with('*'))
            })
            .collect::<Vec<_>>()
            .join("\n");
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "localStorage",
            "document.cookie",
        ] {
            assert!(!js.contains(banned), "app.js uses {banned}");
        }
        assert!(js.contains("sessionStorage"));
        assert!(js.contains("Authorization"));
    }

    #[tokio::test]
    async fn assets_carry_type_cache_and_security_headers_and_revalidate() {
        for (file, ty) in [("app.js", "text/javascript"), ("app.css", "text/css")] {
            let r = asset(Path(file.to_string()), HeaderMap::new()).await;
            assert_eq!(r.status(), StatusCode::OK);
            let h = r.headers();
            assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(ty));
            assert_eq!(h[header::CACHE_CONTROL], "no-cache");
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
            let mut again = HeaderMap::new();
            again.insert(header::IF_NONE_MATCH, h[header::ETAG].clone());
            let r = asset(Path(file.to_string()), again).await;
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        }
        let r = page(HeaderMap::new()).await;
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(
            r.headers()[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        let r = asset(Path("../Cargo.toml".to_string()), HeaderMap::new()).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
}
