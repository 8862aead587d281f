//! HTTP admin API and Prometheus metrics, on their own listener. Handlers read pool snapshots
//! and counters; they never reach into a live session.
//!
//! Mutating endpoints need `Authorization: Bearer <admin.token>` when a token is configured;
//! without one they are served only on a loopback listener.

mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::client::ClientContext;
use crate::pool::{Pool, PoolKey};

/// Utilisation (active / pool_size) at which /ready reports a warning, and a critical state.
const UTILISATION_WARN: f64 = 0.8;
const UTILISATION_CRITICAL: f64 = 0.9;

#[derive(Clone)]
pub struct AdminState {
    ctx: Arc<ClientContext>,
    token: Option<String>,
    loopback: bool,
}

/// The admin router; `local` is the address the admin listener is bound to.
pub fn router(ctx: Arc<ClientContext>, local: SocketAddr) -> Router {
    let state = AdminState {
        token: ctx.config.admin.token.clone(),
        loopback: local.ip().is_loopback(),
        ctx,
    };
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics::scrape))
        .route("/api/pools", get(pools))
        .route("/api/pools/{database}/{user}/pause", post(pause))
        .route("/api/pools/{database}/{user}/resume", post(resume))
        .route("/api/pools/{database}/{user}/size", put(resize))
        .fallback(not_found)
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint; see README for the admin API")
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

fn pool_json(pool: &Pool) -> Value {
    let snap = pool.snapshot();
    let stats = pool.stats();
    let settings = pool.settings();
    let utilisation = if snap.size == 0 {
        0.0
    } else {
        snap.active() as f64 / snap.size as f64
    };
    json!({
        "database": pool.key().database,
        "user": pool.key().user,
        "mode": format!("{:?}", settings.mode).to_lowercase(),
        "size": snap.size,
        "min_pool_size": settings.min_pool_size,
        "servers": { "active": snap.active(), "idle": snap.idle, "open": snap.open },
        "clients": { "waiting": snap.waiting },
        "utilisation_percent": (utilisation * 1000.0).round() / 10.0,
        "acquire_timeouts": stats.acquire_timeouts.load(Ordering::Relaxed),
        "idle_transaction_timeouts": stats.idle_transaction_timeouts.load(Ordering::Relaxed),
        "server_connect_failures": stats.server_connect_failures.load(Ordering::Relaxed),
        "session_resets": stats.session_resets.load(Ordering::Relaxed),
        "paused": snap.paused,
    })
}

async fn pools(State(s): State<AdminState>) -> Json<Value> {
    Json(Value::Array(s.ctx.pools.all().iter().map(pool_json).collect()))
}

/// 200 when every pool is reachable and not paused, 503 with the reasons otherwise; per-pool
/// utilisation checks are reported either way.
async fn ready(State(s): State<AdminState>) -> Response {
    let mut reasons = Vec::new();
    let mut checks = Vec::new();
    for pool in s.ctx.pools.all() {
        let snap = pool.snapshot();
        let key = pool.key().to_string();
        if snap.paused {
            reasons.push(format!("pool {key} is paused"));
        }
        if pool.stats().last_connect_failed.load(Ordering::Relaxed) {
            reasons.push(format!("pool {key} cannot reach PostgreSQL"));
        }
        let utilisation = snap.active() as f64 / snap.size.max(1) as f64;
        let level = if utilisation >= UTILISATION_CRITICAL {
            "critical"
        } else if utilisation >= UTILISATION_WARN {
            "warning"
        } else {
            "ok"
        };
        checks
            .push(json!({ "pool": key, "utilisation_percent": (utilisation * 1000.0).round() / 10.0, "level": level }));
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "ready": reasons.is_empty(), "reasons": reasons, "checks": checks })),
    )
        .into_response()
}

/// Checks the caller may mutate; returns the error response otherwise.
#[allow(clippy::result_large_err)] // a Response, built at most once per request
fn authorise(s: &AdminState, headers: &HeaderMap) -> Result<(), Response> {
    match &s.token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let ok = given.is_some_and(|g| {
                use subtle::ConstantTimeEq;
                g.len() == token.len() && bool::from(g.as_bytes().ct_eq(token.as_bytes()))
            });
            if ok {
                Ok(())
            } else {
                Err(error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (admin.token)",
                ))
            }
        }
        None if s.loopback => Ok(()),
        None => Err(error(
            StatusCode::FORBIDDEN,
            "mutating endpoints are disabled: set admin.token, or bind the admin listener to loopback",
        )),
    }
}

#[allow(clippy::result_large_err)] // a Response, built at most once per request
fn find_pool(s: &AdminState, database: String, user: String) -> Result<Pool, Response> {
    let key = PoolKey { database, user };
    s.ctx.pools.get(&key).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!("no pool {key} (pools appear after the first client logs in)"),
        )
    })
}

async fn pause(State(s): State<AdminState>, headers: HeaderMap, Path(key): Path<(String, String)>) -> Response {
    mutate_pool(&s, &headers, key, Pool::pause)
}

async fn resume(State(s): State<AdminState>, headers: HeaderMap, Path(key): Path<(String, String)>) -> Response {
    mutate_pool(&s, &headers, key, Pool::resume)
}

/// Authorises, finds the pool, applies `f`, and answers with the pool's new state.
fn mutate_pool(
    s: &AdminState,
    headers: &HeaderMap,
    (database, user): (String, String),
    f: impl FnOnce(&Pool),
) -> Response {
    if let Err(r) = authorise(s, headers) {
        return r;
    }
    match find_pool(s, database, user) {
        Ok(pool) => {
            f(&pool);
            Json(pool_json(&pool)).into_response()
        }
        Err(r) => r,
    }
}

async fn resize(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path((database, user)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    // Unauthorised callers learn nothing about the body's validity.
    if let Err(r) = authorise(&s, &headers) {
        return r;
    }
    let size = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("size").and_then(Value::as_u64));
    let size = match size {
        Some(n) if (1..=10_000).contains(&n) => n as usize,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "body must be JSON {\"size\": N} with 1 <= N <= 10000",
            );
        }
    };
    mutate_pool(&s, &headers, (database, user), |pool| pool.resize(size))
}
