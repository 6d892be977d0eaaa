//! The HTTP API of an agent: a thin JSON layer over [`crate::Node`].
//!
//! | Method and path               | Does                                                     |
//! |-------------------------------|----------------------------------------------------------|
//! | `POST /v1/jobs`               | submits a [`JobSpec`] (JSON); `201 {"id"}` once durable  |
//! | `GET /v1/jobs`                | every job, newest first ([`JobJson`])                    |
//! | `GET /v1/jobs/{id}`           | one job                                                  |
//! | `DELETE /v1/jobs/{id}`        | stops a job; `202 {"id", "status": "stopping"}`          |
//! | `GET /v1/jobs/{id}/logs`      | `?index=N`: `{node, task, stdout, stderr}`, from any node |
//! | `GET /v1/nodes`               | every known node ([`NodeJson`])                          |
//! | `GET /v1/health`              | this agent's health                                      |
//! | `GET /metrics`                | Prometheus text                                          |
//! | `POST /v1/node/drain`         | this agent takes no new work and hands its work away     |
//! | `POST /v1/node/undrain`       | this agent takes work again                              |
//! | `POST /v1/node/leave`         | this agent leaves the cluster and shuts down (`202`)     |
//!
//! Every error is JSON: `{"error": "<message for humans>"}`, plus `"field"` and `"problem"`
//! when a job spec is refused (`field` is a path such as `resources.memory_mb` or
//! `constraints[0].label`). Statuses: 400 bad input, 401 missing or wrong token, 404 unknown
//! job or route, 405 wrong method, 413 body over [`MAX_BODY_BYTES`], 500 anything else.
//!
//! When a token is configured, every endpoint, `/v1/health` and `/metrics` included, needs
//! `Authorization: Bearer <token>`.
//!
//! What it does not do: TLS (put the API on loopback, or behind a proxy that terminates
//! TLS), rate limiting, or per-user authorization: a token holder may do everything.
//!
//! [`JobSpec`]: crate::crdt::JobSpec
//! [`JobJson`]: crate::engine::JobJson
//! [`NodeJson`]: crate::engine::NodeJson

use crate::crdt::JobSpec;
use crate::{Error, Node};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Largest request body accepted. A job spec is at most a few hundred KiB even at every
/// limit of [`crate::crdt::spec::limits`]; anything larger is refused before it is parsed.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What the API needs besides the node.
#[derive(Clone)]
struct ApiState {
    node: Node,
    token: Option<Arc<str>>,
    /// Told when a client asks this agent to leave; `None`: the handler shuts the node down.
    leave: Option<mpsc::Sender<()>>,
}

/// The API's routes for `node`. With `token`, every request must carry
/// `Authorization: Bearer <token>`. `POST /v1/node/leave` shuts the node down itself; an
/// agent that must also stop serving uses [`router_with_leave`].
pub fn router(node: Node, token: Option<String>) -> Router {
    build_router(ApiState { node, token: token.map(Into::into), leave: None })
}

/// Like [`router`], but `POST /v1/node/leave` only replies and sends `()` on `leave`: the
/// receiver (the agent's main loop) then shuts the node down and stops serving.
pub fn router_with_leave(node: Node, token: Option<String>, leave: mpsc::Sender<()>) -> Router {
    build_router(ApiState { node, token: token.map(Into::into), leave: Some(leave) })
}

fn build_router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(stop_job))
        .route("/v1/jobs/{id}/logs", get(job_logs))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/node/drain", post(drain))
        .route("/v1/node/undrain", post(undrain))
        .route("/v1/node/leave", post(leave))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `router` on `listener` until the process ends or the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes the requests in
/// flight and returns.
pub async fn serve_until<F>(listener: tokio::net::TcpListener, router: Router, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

// ---------------------------------------------------------------------------------------
// Errors

/// An error reply: a status and a JSON body with at least `error`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, body: json!({ "error": message.into() }) }
    }

    fn invalid_spec(field: Option<&str>, problem: &str) -> ApiError {
        let error = match field {
            Some(field) => format!("invalid job spec: field `{field}`: {problem}"),
            None => format!("invalid job spec: {problem}"),
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "error": error, "field": field, "problem": problem }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> ApiError {
        match error {
            Error::InvalidSpec { field, problem } => ApiError::invalid_spec(Some(&field), &problem),
            error @ Error::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, error.to_string()),
            // This node is going away: another node can serve the request.
            error @ (Error::Left | Error::Shutdown) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
            }
            // The node that holds the answer (a task's logs) could not be asked.
            error @ (Error::Net { .. } | Error::Remote { .. }) => {
                ApiError::new(StatusCode::BAD_GATEWAY, error.to_string())
            }
            other => {
                tracing::warn!(error = %other, "API request failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> ApiError {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(status, format!("request body is larger than {MAX_BODY_BYTES} bytes"));
        }
        ApiError::new(status, format!("cannot read the request body: {}", rejection.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, format!("bad path: {}", rejection.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, format!("bad query: {}", rejection.body_text()))
    }
}

type ApiResult = Result<Response, ApiError>;

// ---------------------------------------------------------------------------------------
// Authentication

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.token else {
        return next.run(request).await;
    };
    match bearer_token(request.headers()) {
        Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong API token").into_response(),
        None => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this agent requires an API token (Authorization: Bearer <token>; the CLI's --token-file)",
            )
            .into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without an early exit, so the time taken does not tell how much of a guess
/// was right (the length may leak; tokens are long and random).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------
// Handlers

async fn submit_job(State(state): State<ApiState>, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let body = body?;
    let spec = parse_spec(&body)?;
    let id = state.node.submit(spec).await?;
    let location = format!("/v1/jobs/{id}");
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(json!({ "id": id }))).into_response())
}

async fn list_jobs(State(state): State<ApiState>) -> ApiResult {
    Ok(Json(state.node.jobs().await?).into_response())
}

async fn get_job(State(state): State<ApiState>, id: Result<Path<String>, PathRejection>) -> ApiResult {
    let Path(id) = id?;
    Ok(Json(state.node.job(&id).await?).into_response())
}

async fn stop_job(State(state): State<ApiState>, id: Result<Path<String>, PathRejection>) -> ApiResult {
    let Path(id) = id?;
    state.node.stop(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id, "status": "stopping" }))).into_response())
}

/// `GET /v1/jobs/{id}/logs` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    /// Instance index; the facade's default (instance 0) when absent.
    index: Option<u32>,
}

async fn job_logs(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let Query(query) = query?;
    let logs = state.node.logs(&id, query.index).await?;
    Ok(Json(json!({
        "node": logs.node,
        "task": logs.task,
        "stdout": logs.stdout,
        "stderr": logs.stderr,
    }))
    .into_response())
}

async fn list_nodes(State(state): State<ApiState>) -> ApiResult {
    Ok(Json(state.node.nodes().await?).into_response())
}

async fn health(State(state): State<ApiState>) -> ApiResult {
    let health = state.node.health().await?;
    // The facade's health, plus where peers can reach this node (what `--seed` takes).
    let mut body = serde_json::to_value(&health).unwrap_or_else(|_| json!({}));
    if let Value::Object(fields) = &mut body {
        let addrs: Vec<String> = state.node.listen_addrs().iter().map(ToString::to_string).collect();
        fields.insert("listen_addrs".into(), json!(addrs));
    }
    let status = if health.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, Json(body)).into_response())
}

async fn metrics(State(state): State<ApiState>) -> ApiResult {
    let text = state.node.metrics().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

async fn drain(State(state): State<ApiState>) -> ApiResult {
    state.node.drain().await?;
    Ok(Json(json!({ "id": state.node.id().to_string(), "mode": "draining" })).into_response())
}

async fn undrain(State(state): State<ApiState>) -> ApiResult {
    state.node.undrain().await?;
    Ok(Json(json!({ "id": state.node.id().to_string(), "mode": "active" })).into_response())
}

async fn leave(State(state): State<ApiState>) -> ApiResult {
    let id = state.node.id().to_string();
    tracing::info!("leave requested over the API");
    match &state.leave {
        // The receiver shuts the node down; if it is already doing so the signal is moot.
        Some(leave) => {
            let _ = leave.try_send(());
        }
        None => {
            let node = state.node.clone();
            tokio::spawn(async move { node.shutdown().await });
        }
    }
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id, "mode": "left" }))).into_response())
}

async fn unknown_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint (see `colony --help` or the API docs)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint")
}

// ---------------------------------------------------------------------------------------
// Spec parsing with the offending field named

/// Parses a JSON job spec. A refusal names the field where it can: `comand` for an unknown
/// field, `command` for a missing one, `resources.memory_mb` for a wrong type.
fn parse_spec(body: &[u8]) -> Result<JobSpec, ApiError> {
    use axum::extract::rejection::JsonRejection;
    match Json::<JobSpec>::from_bytes(body) {
        Ok(Json(spec)) => Ok(spec),
        Err(JsonRejection::JsonSyntaxError(rejection)) => {
            let located = locate_json_error(&inner_message(&rejection));
            let error = match &located.field {
                Some(field) => format!("invalid JSON in field `{field}`: {}", located.problem),
                None => format!("invalid JSON: {}", located.problem),
            };
            let body = json!({ "error": error, "field": located.field, "problem": located.problem });
            Err(ApiError { status: StatusCode::BAD_REQUEST, body })
        }
        Err(JsonRejection::JsonDataError(rejection)) => {
            let located = locate_json_error(&inner_message(&rejection));
            Err(ApiError::invalid_spec(located.field.as_deref(), &located.problem))
        }
        Err(other) => Err(ApiError::new(other.status(), other.body_text())),
    }
}

/// The deserializer's own message, without axum's preamble.
fn inner_message(rejection: &dyn std::error::Error) -> String {
    match rejection.source() {
        Some(inner) => inner.to_string(),
        None => rejection.to_string(),
    }
}

/// A JSON data error split into the field path and the problem.
#[derive(Debug, PartialEq)]
struct LocatedError {
    field: Option<String>,
    problem: String,
}

/// How serde_json's error messages begin: they follow the path in `"<path>: <message>"`.
const SERDE_MESSAGE_STARTS: &[&str] = &[
    "invalid ",
    "unknown variant",
    "unknown field",
    "missing field",
    "duplicate field",
    "number out of range",
    "data did not match",
    "expected ",
    "EOF while parsing",
    "trailing ",
    "key must be",
    "control character",
    "lone leading surrogate",
    "unexpected end of hex escape",
    "recursion limit exceeded",
];

/// Splits `"<path>: <serde message>"` (or a bare message) and names the field. A missing,
/// unknown or duplicate field is named by the message itself and joined to the path of the
/// object that holds it.
fn locate_json_error(text: &str) -> LocatedError {
    let starts_message = |s: &str| SERDE_MESSAGE_STARTS.iter().any(|p| s.starts_with(p));
    let (path, message) = if starts_message(text) {
        (None, text)
    } else {
        text.match_indices(": ")
            .map(|(at, _)| at)
            .find(|&at| starts_message(&text[at + 2..]))
            .map_or((None, text), |at| (Some(&text[..at]), &text[at + 2..]))
    };
    let path = path.filter(|p| !p.is_empty() && *p != ".");
    let named = ["missing field `", "unknown field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    let field = match (path, named) {
        // serde_path_to_error may already have pushed the unknown key onto the path.
        (Some(path), Some(name)) if path == name || path.ends_with(&format!(".{name}")) => Some(path.to_string()),
        (Some(path), Some(name)) => Some(format!("{path}.{name}")),
        (None, Some(name)) => Some(name.to_string()),
        (Some(path), None) => Some(path.to_string()),
        (None, None) => None,
    };
    LocatedError { field, problem: message.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> Option<String> {
        let error = parse_spec(body.as_bytes()).expect_err("the spec must be refused");
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        error.body["field"].as_str().map(str::to_string)
    }

    #[test]
    fn a_good_spec_parses() {
        let spec = parse_spec(br#"{"command":"echo","args":["hi"],"resources":{"memory_mb":64}}"#).unwrap();
        assert_eq!(spec.command, "echo");
        assert_eq!(spec.resources.memory_mb, 64);
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        assert_eq!(field_of(r#"{"comand":"echo"}"#).as_deref(), Some("comand"));
        assert_eq!(field_of(r#"{"name":"x"}"#).as_deref(), Some("command"));
        assert_eq!(field_of(r#"{"command":"x","command":"y"}"#).as_deref(), Some("command"));
        assert_eq!(field_of(r#"{"command":"x","constraints":[{"op":"eq"}]}"#).as_deref(), Some("constraints[0].label"));
    }

    #[test]
    fn wrong_types_are_named_by_path() {
        assert_eq!(field_of(r#"{"command":"x","count":-1}"#).as_deref(), Some("count"));
        assert_eq!(
            field_of(r#"{"command":"x","resources":{"memory_mb":"lots"}}"#).as_deref(),
            Some("resources.memory_mb")
        );
        assert_eq!(field_of(r#"{"command":"x","args":["a",2]}"#).as_deref(), Some("args[1]"));
        assert_eq!(field_of(r#"{"command":"x","kind":"daemon"}"#).as_deref(), Some("kind"));
        assert_eq!(field_of(r#"{"command":"x","env":{"A: b":1}}"#).as_deref(), Some("env.A: b"));
        assert_eq!(field_of(r#""x""#), None);
    }

    #[test]
    fn syntax_errors_say_where() {
        let error = parse_spec(br#"{"command": "#).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        let message = error.body["error"].as_str().unwrap();
        assert!(message.starts_with("invalid JSON") && message.contains("line 1"), "{message}");
        assert_eq!(error.body["field"], "command");
        assert!(error.body["problem"].as_str().unwrap().starts_with("EOF while parsing"), "{}", error.body);
        let error = parse_spec(b"").unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn bearer_tokens_are_read_and_compared() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("s3cret"));
        headers.insert(header::AUTHORIZATION, "Basic s3cret".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
