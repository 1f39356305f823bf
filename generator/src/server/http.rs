//! The HTTP/JSON face of the generator: the gRPC methods, called as they are (same validation, same
//! engine), with their messages in proto3 JSON (pbjson, generated from the same .proto files) and
//! their status codes mapped to HTTP in one table.
//!
//! - `POST /v1/generate`: a `GenerateRequest` → a `GenerateResponse`; with `Accept:
//!   text/event-stream`, server-sent events: `progress` (a `Progress`) every `progressEvery` steps,
//!   then `result` (a `GenerateResponse`) or `error`.
//! - `GET /v1/describe`, `GET /healthz` (live), `GET /readyz` (the start-up guides are registered),
//!   `GET /openapi.json`, and the playground at `/`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dlm_proto::dlm::v1 as pb;
use pb::generator_server::Generator;
use tokio_stream::StreamExt;

use super::GeneratorService;

const OPENAPI: &str = include_str!("openapi.json");
const PLAYGROUND: &str = include_str!("playground.html");

/// gRPC status → HTTP status (the one table).
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A gRPC status as JSON: `{"code": "INVALID_ARGUMENT", "message": "…"}`.
fn status_json(s: &tonic::Status) -> serde_json::Value {
    serde_json::json!({
        "code": format!("{:?}", s.code()).to_uppercase_snake(),
        "message": s.message(),
    })
}

trait UpperSnake {
    fn to_uppercase_snake(&self) -> String;
}

impl UpperSnake for String {
    /// `InvalidArgument` → `INVALID_ARGUMENT` (gRPC's own spelling of the codes).
    fn to_uppercase_snake(&self) -> String {
        let mut out = String::new();
        for (i, c) in self.chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }
}

fn error_response(s: tonic::Status) -> Response {
    (http_status(s.code()), Json(status_json(&s))).into_response()
}

/// A gRPC request carrying the HTTP client's deadline (`grpc-timeout`, e.g. `5S`), if it sent one.
fn grpc_request<T>(msg: T, headers: &HeaderMap) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(v) = headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        r.metadata_mut().insert("grpc-timeout", v);
    }
    r
}

async fn generate(
    State(service): State<Arc<GeneratorService>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req: pb::GenerateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error_response(tonic::Status::invalid_argument(format!(
                "body is not a GenerateRequest in JSON: {e}"
            )))
        }
    };
    let wants_events = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_events {
        return match service.generate(grpc_request(req, &headers)).await {
            Ok(r) => Json(r.into_inner()).into_response(),
            Err(s) => error_response(s),
        };
    }
    let stream = match service.generate_stream(grpc_request(req, &headers)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return error_response(s),
    };
    let events = stream.map(|item| -> Result<SseEvent, Infallible> {
        Ok(match item {
            Ok(pb::GenerateEvent {
                event: Some(pb::generate_event::Event::Progress(p)),
            }) => SseEvent::default().event("progress").json_data(p),
            Ok(pb::GenerateEvent {
                event: Some(pb::generate_event::Event::Result(r)),
            }) => SseEvent::default().event("result").json_data(r),
            Ok(pb::GenerateEvent { event: None }) => Ok(SseEvent::default().comment("empty")),
            Err(s) => SseEvent::default()
                .event("error")
                .json_data(status_json(&s)),
        }
        .unwrap_or_else(|e| SseEvent::default().event("error").data(e.to_string())))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn describe(State(service): State<Arc<GeneratorService>>) -> Response {
    match service
        .describe(tonic::Request::new(pb::DescribeRequest {}))
        .await
    {
        Ok(r) => Json(r.into_inner()).into_response(),
        Err(s) => error_response(s),
    }
}

async fn ready(State(service): State<Arc<GeneratorService>>) -> Response {
    if service.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: start-up guides are registering\n",
        )
            .into_response()
    }
}

pub fn router(service: Arc<GeneratorService>) -> Router {
    Router::new()
        .route("/v1/generate", post(generate))
        .route("/v1/describe", get(describe))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/", get(|| async { Html(PLAYGROUND) }))
        .with_state(service)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_http_and_spell_as_grpc_does() {
        assert_eq!(
            http_status(tonic::Code::InvalidArgument),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(tonic::Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        let v = status_json(&tonic::Status::deadline_exceeded("late"));
        assert_eq!(v["code"], "DEADLINE_EXCEEDED");
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert!(spec["paths"]["/v1/generate"]["post"].is_object());
    }
}
