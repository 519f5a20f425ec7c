//! Operations: `/healthz`, `/readyz`, `/metrics` and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::Scope;
use crate::http::model::{Health, Ready};
use crate::http::{ApiError, AppState, Caller};

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", security(()),
    responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: the database answers and the server is not shutting down
/// (503 otherwise, so a load balancer stops sending).
#[utoipa::path(get, path = "/readyz", tag = "ops", security(()),
    responses((status = 200, body = Ready)))]
pub async fn readyz(State(st): State<AppState>) -> Result<Json<Ready>, ApiError> {
    if *st.shutdown.borrow() {
        return Err(ApiError::new(
            503,
            "shutting-down",
            "Shutting down",
            "this controller is shutting down: send requests to another one, or retry in a moment",
        ));
    }
    if let Err(e) = st.store.schema_version().await {
        // The driver's words can name hosts, users and paths of the
        // database: they go to the log, and anyone may call this route.
        tracing::warn!(error = %e, "readiness: the database does not answer");
        return Err(ApiError::new(
            503,
            "database-unavailable",
            "Database unavailable",
            "the database does not answer: the controller's log has the cause (search it for this request id); retry in a moment",
        ));
    }
    Ok(Json(Ready {
        status: "ready".into(),
        database: st.store.dialect().name().into(),
        driver: st.driver.is_some(),
    }))
}

/// Prometheus metrics (text exposition format 0.0.4): sessions and VMs by
/// state, VM creations and failures by reason, login durations, upstream
/// ports, HTTP requests and latencies, stream tickets. Needs the
/// `metrics:read` scope (admin accounts; give a scraper a token with only
/// that scope): the counts span every user.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(st): State<AppState>, Caller(p): Caller) -> Response {
    if let Err(e) = p.require(Scope::MetricsRead) {
        return ApiError::from(e).into_response();
    }
    match crate::metrics::render(&st.store, &st.upstreams).await {
        Ok(mut text) => {
            st.metrics.render(&mut text);
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                text,
            )
                .into_response()
        }
        Err(e) => ApiError::new(
            503,
            "metrics-unavailable",
            "Metrics unavailable",
            e.to_string(),
        )
        .into_response(),
    }
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "ops", security(()),
    responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        crate::http::openapi::json().to_string(),
    )
        .into_response()
}
