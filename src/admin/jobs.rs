//! Test & Enable on demand, as jobs: `POST /api/v1/mailboxes/{name}/test`,
//! `POST /api/v1/profiles/{name}/test` (202 with the job) and
//! `GET /api/v1/jobs/{id}` (its progress, results and summary).
//!
//! The runner ([`crate::testenable::TestEnable`]) reaches the handlers as a
//! request extension the daemon adds to the router; without it (a router
//! built for tests or documentation) the routes answer 503.

use std::sync::Arc;

use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::doc::ErrorBody;
use super::ApiError;
use crate::jobs::Job;
use crate::testenable::{StartError, TestEnable};

/// A started job: its id under `job`, and the job as it is now.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct JobStarted {
    /// The job's id, for `GET /api/v1/jobs/{id}`.
    job: String,
    #[serde(flatten)]
    status: Job,
}

/// Options of a Test & Enable.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct TestParams {
    /// Take the mailbox over from another crm-mailsync deployment whose
    /// marker it holds (that deployment disables its side at its next
    /// check). Without it such a mailbox fails the incoming test.
    force: Option<bool>,
}

type Runner = Option<Extension<Arc<TestEnable>>>;

fn runner(te: Runner) -> Result<Arc<TestEnable>, ApiError> {
    te.map(|Extension(t)| t).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Test & Enable is not available in this process (it runs in the daemon)",
        )
    })
}

fn started(result: Result<Arc<crate::jobs::JobHandle>, StartError>) -> Result<Response, ApiError> {
    match result {
        Ok(job) => {
            let status = job.snapshot();
            Ok((
                StatusCode::ACCEPTED,
                Json(JobStarted {
                    job: status.id.clone(),
                    status,
                }),
            )
                .into_response())
        }
        Err(e) => Err(ApiError::new(StatusCode::NOT_FOUND, e.to_string())),
    }
}

/// `POST /api/v1/mailboxes/{name}/test`: runs Test & Enable of the mailbox
/// as a job (incoming, outgoing where it sends, ACT where configured); on
/// success the mailbox is enabled, on failure an Error alert says what to do.
#[utoipa::path(
    post,
    path = "/mailboxes/{name}/test",
    tag = "mailboxes",
    operation_id = "test_mailbox",
    params(("name" = String, Path, description = "Mailbox name as configured"), TestParams),
    responses(
        (status = 202, description = "The job started; follow it at GET /api/v1/jobs/{id}", body = JobStarted),
        (status = 400, description = "A malformed query parameter", body = String, content_type = "text/plain"),
        (status = 404, description = "No such mailbox", body = ErrorBody),
        (status = 503, description = "No Test & Enable runner in this process", body = ErrorBody),
    )
)]
pub async fn test_mailbox(
    te: Runner,
    Path(name): Path<String>,
    Query(p): Query<TestParams>,
) -> Result<Response, ApiError> {
    started(runner(te)?.start_mailbox(&name, p.force.unwrap_or(false)))
}

/// `POST /api/v1/profiles/{name}/test`: Test & Enable of every mailbox of
/// the profile as one job, as many at once as its
/// `max_concurrent_connections` allows (shared with its mailbox tasks).
#[utoipa::path(
    post,
    path = "/profiles/{name}/test",
    tag = "profiles",
    operation_id = "test_profile",
    params(("name" = String, Path, description = "Profile name as configured"), TestParams),
    responses(
        (status = 202, description = "The job started; follow it at GET /api/v1/jobs/{id}", body = JobStarted),
        (status = 400, description = "A malformed query parameter", body = String, content_type = "text/plain"),
        (status = 404, description = "No such profile", body = ErrorBody),
        (status = 503, description = "No Test & Enable runner in this process", body = ErrorBody),
    )
)]
pub async fn test_profile(
    te: Runner,
    Path(name): Path<String>,
    Query(p): Query<TestParams>,
) -> Result<Response, ApiError> {
    started(runner(te)?.start_profile(&name, p.force.unwrap_or(false)))
}

/// `GET /api/v1/jobs/{id}`: a job's progress (`completed` of `total`), its
/// results per mailbox and, once done, its summary.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    tag = "mailboxes",
    operation_id = "get_job",
    params(("id" = String, Path, description = "Job id, as the POST that started it answered")),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 404, description = "No such job (ids do not survive a restart)", body = ErrorBody),
        (status = 503, description = "No Test & Enable runner in this process", body = ErrorBody),
    )
)]
pub async fn get_job(te: Runner, Path(id): Path<String>) -> Result<Response, ApiError> {
    match runner(te)?.job(&id) {
        Some(job) => Ok(Json(job).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job {id:?} (jobs are kept in memory: not across a restart, and only the newest finished ones)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{router, AdminState};
    use tokio_util::sync::CancellationToken;

    const TOKEN: &str = "0123456789abcdef";

    /// A daemon-less admin router over a Maildir mailbox, with a runner.
    fn app(dir: &std::path::Path, with_runner: bool) -> axum::Router {
        let maildir = dir.join("maildir");
        for d in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        let text = format!(
            r#"
            [daemon]
            state_dir = "{}"
            [admin]
            token = "{TOKEN}"
            [[profiles]]
            name = "local"
            type = "maildir"
            [[mailboxes]]
            name = "support"
            profile = "local"
            email = "support@example.test"
            approval = "approved"
            path = "{}"
            "#,
            dir.display(),
            maildir.display()
        );
        let config = Arc::new(crate::config::from_toml_str(&text, Vec::new(), dir).unwrap());
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::SledStore::open(&dir.join("store")).unwrap());
        let te = Arc::new(TestEnable::standalone(
            config.clone(),
            store.clone(),
            crate::deployment::Deployment::for_tests(),
        ));
        let r = router(AdminState {
            config: config.into(),
            store,
            runtime: Arc::new(crate::scheduler::Runtime::default()),
            prometheus: None,
            shutdown: CancellationToken::new(),
            send_wakeup: None,
        });
        if with_runner {
            r.layer(Extension(te))
        } else {
            r
        }
    }

    /// One request to `app`, served on a loopback port: (status, JSON).
    async fn call(app: axum::Router, method: &str, path: &str) -> (u16, serde_json::Value) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let resp = reqwest::Client::new()
            .request(
                method.parse().unwrap(),
                format!("http://127.0.0.1:{port}{path}"),
            )
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        server.abort();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    /// `body` against the document's schema of `method template → status`.
    fn conforms(method: &str, template: &str, status: u16, body: &serde_json::Value) {
        let doc = crate::admin::openapi().unwrap();
        let response =
            &doc["paths"][format!("/api/v1{template}")][method]["responses"][status.to_string()];
        let mut root = response["content"]["application/json"]["schema"].clone();
        assert!(
            root.is_object(),
            "{method} {template} {status} undocumented"
        );
        root["components"] = doc["components"].clone();
        let validator = jsonschema::draft202012::new(&root).unwrap();
        let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: {errors:?}\n{body:#}"
        );
    }

    #[tokio::test]
    async fn a_mailbox_test_is_a_job_whose_answers_match_the_document() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path(), true);
        let (status, started) = call(app.clone(), "POST", "/api/v1/mailboxes/support/test").await;
        assert_eq!(status, 202, "{started}");
        conforms("post", "/mailboxes/{name}/test", 202, &started);
        assert_eq!(started["kind"], "mailbox_test");
        assert_eq!(started["target"], "support");
        let id = started["job"].as_str().unwrap().to_string();
        assert_eq!(started["id"], id.as_str());
        let job = loop {
            let (status, job) = call(app.clone(), "GET", &format!("/api/v1/jobs/{id}")).await;
            assert_eq!(status, 200, "{job}");
            if job["state"] == "done" {
                break job;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        conforms("get", "/jobs/{id}", 200, &job);
        assert_eq!(
            (job["total"].as_u64(), job["succeeded"].as_u64()),
            (Some(1), Some(1)),
            "{job}"
        );
        let r = &job["results"][0];
        assert_eq!(r["incoming"]["status"], "success", "{job}");
        assert_eq!(r["outgoing"]["status"], "not_run", "{job}");
        assert_eq!(r["act"]["status"], "not_run", "{job}");
        assert_eq!(r["enabled"], true, "{job}");
        assert_eq!(job["peak_connections"], 1, "{job}");
        assert!(job["finished_at"].is_number(), "{job}");
        assert!(
            job["summary"].as_str().unwrap().contains("1 succeeded"),
            "{job}"
        );

        let (status, started) = call(app.clone(), "POST", "/api/v1/profiles/local/test").await;
        assert_eq!(status, 202, "{started}");
        conforms("post", "/profiles/{name}/test", 202, &started);
        assert_eq!(started["kind"], "profile_test");
        assert_eq!(started["total"], 1);
    }

    #[tokio::test]
    async fn unknown_mailboxes_profiles_and_jobs_are_404_json_and_no_runner_is_503() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path(), true);
        for (path, method, template, text) in [
            (
                "/api/v1/mailboxes/nobody/test",
                "POST",
                "/mailboxes/{name}/test",
                "no mailbox \"nobody\"",
            ),
            (
                "/api/v1/profiles/nothing/test",
                "POST",
                "/profiles/{name}/test",
                "no profile \"nothing\"",
            ),
            ("/api/v1/jobs/0-0", "GET", "/jobs/{id}", "no job \"0-0\""),
        ] {
            let (status, body) = call(app.clone(), method, path).await;
            assert_eq!(status, 404, "{path}: {body}");
            assert!(body["error"].as_str().unwrap().starts_with(text), "{body}");
            conforms(&method.to_lowercase(), template, 404, &body);
        }
        let bare = app_without_runner(dir.path());
        let (status, body) = call(bare, "POST", "/api/v1/mailboxes/support/test").await;
        assert_eq!(status, 503, "{body}");
        assert!(body["error"].is_string());
    }

    fn app_without_runner(dir: &std::path::Path) -> axum::Router {
        let other = dir.join("bare");
        std::fs::create_dir_all(&other).unwrap();
        app(&other, false)
    }
}
