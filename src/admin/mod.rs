//! HTTP admin API and Prometheus metrics, on their own listener. Handlers read pool snapshots
//! and counters; they never reach into a live session.
//!
//! Mutating endpoints need `Authorization: Bearer <admin.token>` when a token is configured;
//! without one they are served only on a loopback listener.

mod metrics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::client::ClientContext;
use crate::client::registry::{ClientInfo, ClientState, now_ms};
use crate::net::PeerAddr;
use crate::pool::{Pool, PoolKey};

#[derive(Clone)]
pub struct AdminState {
    ctx: Arc<ClientContext>,
    loopback: bool,
}

/// The admin router; `local` is the address the admin listener is bound to.
pub fn router(ctx: Arc<ClientContext>, local: SocketAddr) -> Router {
    let state = AdminState {
        loopback: local.ip().is_loopback(),
        ctx,
    };
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics::scrape))
        .route("/api/pools", get(pools))
        .route("/api/openapi.json", get(openapi))
        .route("/api/pools/{database}/{user}/pause", post(pause))
        .route("/api/pools/{database}/{user}/resume", post(resume))
        .route("/api/pools/{database}/{user}/size", put(resize))
        .route("/api/pools/{database}/{user}/reconnect", post(reconnect))
        .route("/api/pools/{database}/{user}/kill", post(kill_pool))
        .route("/api/reload", post(reload))
        .route("/api/drain", post(drain))
        .route("/api/clients", get(clients))
        .route("/api/servers", get(servers))
        .route("/api/holders", get(holders))
        .route("/api/clients/{id}/kill", post(kill_client))
        .route("/api/servers/{pid}/kill", post(kill_server))
        .fallback(not_found)
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint; see README for the admin API")
}

/// The OpenAPI description of this API, kept next to the code it describes.
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

fn pool_json(pool: &Pool, clients: &[Arc<ClientInfo>]) -> Value {
    let snap = pool.snapshot();
    let stats = pool.stats();
    let settings = pool.settings();
    let utilisation = snap.utilisation();
    let mine: Vec<&Arc<ClientInfo>> = clients.iter().filter(|c| *c.pool == *pool.key()).collect();
    let count = |state| mine.iter().filter(|c| c.state() == state).count();
    let now = now_ms();
    let oldest_wait = mine
        .iter()
        .filter_map(|c| c.waiting_since())
        .min()
        .map(|t| now.saturating_sub(t) as f64 / 1000.0);
    json!({
        "database": pool.key().database,
        "user": pool.key().user,
        "mode": format!("{:?}", settings.mode).to_lowercase(),
        "size": snap.size,
        "min_pool_size": settings.min_pool_size,
        "servers": {
            "active": snap.active(),
            "idle": snap.idle,
            "open": snap.open,
            "connecting": stats.connecting.load(Ordering::Relaxed),
            "testing": stats.testing.load(Ordering::Relaxed),
        },
        "clients": {
            "active": count(ClientState::Active),
            "waiting": snap.waiting,
            "idle": count(ClientState::Idle),
        },
        "oldest_wait_seconds": oldest_wait,
        "utilisation_percent": (utilisation * 1000.0).round() / 10.0,
        "acquire_timeouts": stats.acquire_timeouts.load(Ordering::Relaxed),
        "idle_transaction_timeouts": stats.idle_transaction_timeouts.load(Ordering::Relaxed),
        "server_connect_failures": stats.server_connect_failures.load(Ordering::Relaxed),
        "session_resets": stats.session_resets.load(Ordering::Relaxed),
        "paused": snap.paused,
    })
}

async fn pools(State(s): State<AdminState>) -> Json<Value> {
    let clients = s.ctx.clients.all();
    Json(Value::Array(
        s.ctx.pools.all().iter().map(|p| pool_json(p, &clients)).collect(),
    ))
}

fn client_json(c: &ClientInfo, now: u64) -> Value {
    let state = match c.state() {
        ClientState::Idle => "idle",
        ClientState::Waiting => "waiting",
        ClientState::Active => "active",
    };
    json!({
        "id": c.id.0,
        "addr": c.addr.to_string(),
        // Unix-socket clients: the connecting process, as the kernel reported it.
        "unix_peer": match c.addr {
            PeerAddr::Local(Some(p)) => json!({ "pid": p.pid, "uid": p.uid }),
            _ => Value::Null,
        },
        "application_name": &*c.application_name,
        "tls": c.tls,
        "event_loop": c.in_event_loop(),
        "database": c.pool.database,
        "user": c.pool.user,
        "state": state,
        "connected_at_ms": c.connected_at,
        "server_pid": c.server_pid(),
        "transaction_start_ms": c.linked_at(),
        "transaction_age_seconds": c.linked_at().map(|t| now.saturating_sub(t) as f64 / 1000.0),
        "idle_in_transaction_seconds": c.idle_in_transaction_since().map(|t| now.saturating_sub(t) as f64 / 1000.0),
        "last_query": Some(c.last_query()).filter(|q| !q.is_empty()),
    })
}

async fn clients(State(s): State<AdminState>) -> Json<Value> {
    let now = now_ms();
    Json(Value::Array(
        s.ctx.clients.all().iter().map(|c| client_json(c, now)).collect(),
    ))
}

/// Every open server connection: the ones lent (with the client holding each, the link a DBA
/// needs when pg_stat_activity shows a pid "idle in transaction") and the idle ones. The pools
/// say which servers are open, so one lent to nobody at this instant (being reset,
/// health-checked, or on its way to the next client) is listed too, as active with no client.
async fn servers(State(s): State<AdminState>) -> Json<Value> {
    let now = now_ms();
    // Read before the pools' lists: a server released since then is listed idle (the later
    // reading), one lent since then is listed active without its new client.
    let mut held: HashMap<i32, Arc<ClientInfo>> = s
        .ctx
        .clients
        .all()
        .into_iter()
        .filter_map(|c| c.server_pid().map(|pid| (pid, c)))
        .collect();
    let mut rows: Vec<Value> = Vec::new();
    let pools = s.ctx.pools.all();
    for pool in &pools {
        let idle: HashMap<i32, (Duration, Duration)> = pool
            .idle_servers()
            .into_iter()
            .map(|(pid, age, idle)| (pid, (age, idle)))
            .collect();
        for (pid, age) in pool.open_servers() {
            let key = pool.key();
            let row = match idle.get(&pid) {
                Some((age, idle)) => {
                    held.remove(&pid);
                    json!({
                        "pid": pid,
                        "database": key.database,
                        "user": key.user,
                        "state": "idle",
                        "age_seconds": age.as_secs_f64(),
                        "idle_seconds": idle.as_secs_f64(),
                    })
                }
                None => json!({
                    "pid": pid,
                    "database": key.database,
                    "user": key.user,
                    "state": "active",
                    "age_seconds": age.as_secs_f64(),
                    "client": held.remove(&pid).map(|c| client_json(&c, now)),
                }),
            };
            rows.push(row);
        }
    }
    // A server of a pool no longer in the registry (replaced by a reload) is still held. Of a
    // listed pool, a holder left over held a server that has closed since.
    for (pid, c) in held
        .into_iter()
        .filter(|(_, c)| !pools.iter().any(|p| *p.key() == *c.pool))
    {
        rows.push(json!({
            "pid": pid,
            "database": c.pool.database,
            "user": c.pool.user,
            "state": "active",
            "client": client_json(&c, now),
        }));
    }
    Json(Value::Array(rows))
}

#[derive(serde::Deserialize)]
struct HoldersQuery {
    /// "database/user"; all pools when absent.
    pool: Option<String>,
}

/// Who is holding the pool: clients with a server, longest-held first.
async fn holders(State(s): State<AdminState>, axum::extract::Query(q): axum::extract::Query<HoldersQuery>) -> Response {
    let filter = match q.pool.as_deref() {
        None => None,
        Some(p) => match p.split_once('/') {
            Some((d, u)) => Some((d.to_owned(), u.to_owned())),
            None => return error(StatusCode::BAD_REQUEST, "pool must be \"database/user\""),
        },
    };
    let now = now_ms();
    let mut held: Vec<_> = s
        .ctx
        .clients
        .all()
        .into_iter()
        .filter(|c| c.server_pid().is_some())
        .filter(|c| {
            filter
                .as_ref()
                .is_none_or(|(d, u)| &c.pool.database == d && &c.pool.user == u)
        })
        .collect();
    held.sort_by_key(|c| c.linked_at().unwrap_or(u64::MAX));
    Json(Value::Array(held.iter().map(|c| client_json(c, now)).collect())).into_response()
}

/// Re-reads the configuration file, like SIGHUP. A broken file is rejected (400, with every
/// problem) and the running configuration kept.
async fn reload(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorise(&s, &headers) {
        return r;
    }
    match s.ctx.reload_from_file() {
        Ok(r) => Json(json!({
            "reloaded": true,
            "needs_restart": r.needs_restart,
            "removed_pools": r.removed_pools,
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("configuration rejected, running configuration kept: {e}"),
        ),
    }
}

async fn kill_client(State(s): State<AdminState>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Err(r) = authorise(&s, &headers) {
        return r;
    }
    match s.ctx.clients.get(id) {
        Some(c) => {
            c.stop.raise(crate::client::registry::KILL);
            Json(json!({ "killed": id })).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no client {id}")),
    }
}

/// Kills a server connection by backend pid: the client holding it is disconnected (its
/// transaction rolled back), or an idle one is closed.
async fn kill_server(State(s): State<AdminState>, headers: HeaderMap, Path(pid): Path<i32>) -> Response {
    if let Err(r) = authorise(&s, &headers) {
        return r;
    }
    if let Some(c) = s.ctx.clients.by_server_pid(pid) {
        c.stop.raise(crate::client::registry::KILL);
        return Json(json!({ "killed": pid, "client": c.id.0 })).into_response();
    }
    let pools = s.ctx.pools.all();
    if pools.iter().any(|p| p.close_idle_server(pid)) {
        return Json(json!({ "killed": pid })).into_response();
    }
    if pools
        .iter()
        .any(|p| p.open_servers().iter().any(|&(open, _)| open == pid))
    {
        return error(
            StatusCode::CONFLICT,
            format!(
                "server connection {pid} is between clients (being reset, health-checked or handed to the next \
                 client); try again"
            ),
        );
    }
    error(
        StatusCode::NOT_FOUND,
        format!("no server connection with backend pid {pid}"),
    )
}

/// 200 when every pool is reachable and not paused, 503 with the reasons otherwise; per-pool
/// utilisation checks are reported either way.
async fn drain(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorise(&s, &headers) {
        return r;
    }
    s.ctx.draining.store(true, Ordering::SeqCst);
    tracing::info!("draining: /ready now answers 503; connected clients are still served");
    Json(json!({ "draining": true })).into_response()
}

async fn ready(State(s): State<AdminState>) -> Response {
    let mut reasons = Vec::new();
    if s.ctx.draining.load(Ordering::SeqCst) {
        reasons.push("draining (POST /api/drain): about to shut down".to_owned());
    }
    let mut checks = Vec::new();
    let (warn, critical) = {
        let c = s.ctx.config.load();
        (
            f64::from(c.admin.ready_warn_percent) / 100.0,
            f64::from(c.admin.ready_critical_percent) / 100.0,
        )
    };
    for pool in s.ctx.pools.all() {
        let snap = pool.snapshot();
        let key = pool.key().to_string();
        if snap.paused {
            reasons.push(format!("pool {key} is paused"));
        }
        if pool.stats().last_connect_failed.load(Ordering::Relaxed) {
            reasons.push(format!("pool {key} cannot reach PostgreSQL"));
        }
        let utilisation = snap.utilisation();
        let level = if utilisation >= critical {
            "critical"
        } else if utilisation >= warn {
            "warning"
        } else {
            "ok"
        };
        checks
            .push(json!({ "pool": key, "utilisation_percent": (utilisation * 1000.0).round() / 10.0, "level": level }));
    }
    // Databases whose pools hold no open connection (none created yet, or all idle ones
    // retired) get a connection probe, so a fresh pgweir in front of a PostgreSQL that is down is not
    // reported ready. PostgreSQL logs nothing for a connection closed before any byte is sent.
    let pools = s.ctx.pools.all();
    let config = s.ctx.config.load_full();
    let probes = config.databases.iter().filter_map(|(name, db)| {
        let has_open = pools.iter().any(|p| &p.key().database == name && p.snapshot().open > 0);
        (!has_open).then(|| {
            let (name, host, port) = (name.clone(), db.host.clone(), db.port);
            async move {
                let probe = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    crate::net::connect(&host, port, None),
                )
                .await;
                let at = crate::net::describe_endpoint(&host, port);
                match probe {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(format!("database {name} ({at}) is unreachable: {e}")),
                    Err(_) => Some(format!("database {name} ({at}) did not accept a connection within 1s")),
                }
            }
        })
    });
    reasons.extend(futures_util::future::join_all(probes).await.into_iter().flatten());
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
    // The running configuration's token: a reload rotates it.
    let config = s.ctx.config.load();
    match &config.admin.token {
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

/// Longest a pause request waits for running transactions before answering.
const PAUSE_DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Polls `done` until it holds or [`PAUSE_DRAIN`] has passed (pool counters have no wake-up
/// of their own, and an admin call can afford 20 ms steps).
async fn wait_up_to_drain(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PAUSE_DRAIN;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Pauses the pool, then waits (up to 30 s) for transactions in progress to finish, so that on
/// a 200 with `"drained": true` no server connection is lent out any more.
async fn pause(State(s): State<AdminState>, headers: HeaderMap, Path(key): Path<(String, String)>) -> Response {
    if let Err(r) = authorise(&s, &headers) {
        return r;
    }
    let pool = match find_pool(&s, key.0, key.1) {
        Ok(p) => p,
        Err(r) => return r,
    };
    pool.pause();
    wait_up_to_drain(|| pool.snapshot().active() == 0).await;
    let mut body = pool_json(&pool, &s.ctx.clients.all());
    body["drained"] = json!(pool.snapshot().active() == 0);
    Json(body).into_response()
}

#[derive(serde::Deserialize)]
struct ReconnectQuery {
    /// Answer only once every connection opened before the call is closed (at most 30 s):
    /// PgBouncer's WAIT_CLOSE.
    #[serde(default)]
    wait: bool,
}

/// PgBouncer's RECONNECT (and with `?wait=true` its WAIT_CLOSE) for one pool: idle servers are
/// closed now, lent ones when their client returns them; new ones open as needed.
async fn reconnect(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(key): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<ReconnectQuery>,
) -> Response {
    if let Err(r) = authorise(&s, &headers) {
        return r;
    }
    let pool = match find_pool(&s, key.0, key.1) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let closed_idle = pool.reconnect();
    tracing::info!(pool = %pool.key(), closed_idle, "reconnect requested through the admin API");
    if q.wait {
        wait_up_to_drain(|| pool.stale_servers() == 0).await;
    }
    let mut body = pool_json(&pool, &s.ctx.clients.all());
    body["closed_idle"] = json!(closed_idle);
    // Lent (or between clients) when this answers; each closes when returned.
    body["closing"] = json!(pool.stale_servers());
    Json(body).into_response()
}

/// PgBouncer's `KILL db` for one pool: every client is disconnected (FATAL 57P01, transactions
/// rolled back, also clients waiting for a server) and the idle servers are closed; the servers
/// clients held close as each is ended. Unlike PgBouncer the pool is not left paused: new
/// clients are served (pause it first to keep them out).
async fn kill_pool(State(s): State<AdminState>, headers: HeaderMap, Path(key): Path<(String, String)>) -> Response {
    if let Err(r) = authorise(&s, &headers) {
        return r;
    }
    let pool = match find_pool(&s, key.0, key.1) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let killed = s
        .ctx
        .clients
        .stop_pool(&pool.shared_key(), crate::client::registry::KILL);
    let closed_idle = pool.close_idle(crate::pool::CloseReason::Killed);
    tracing::info!(pool = %pool.key(), killed, closed_idle, "pool killed through the admin API");
    Json(json!({ "pool": pool.key().to_string(), "killed_clients": killed, "closed_idle": closed_idle }))
        .into_response()
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
            Json(pool_json(&pool, &s.ctx.clients.all())).into_response()
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

#[cfg(test)]
mod tests {
    /// Every route the router serves is described in openapi.json under the same method: the
    /// document is written by hand, and it had missed three routes.
    #[test]
    fn openapi_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("openapi.json")).expect("JSON");
        let source = include_str!("mod.rs");
        let mut routes = 0;
        for call in source.split(".route(\"").skip(1) {
            let (path, rest) = call.split_once('"').expect("a quoted path");
            let method = rest
                .trim_start_matches([',', ' '])
                .split('(')
                .next()
                .expect("a method router");
            assert!(
                doc["paths"][path].get(method).is_some(),
                "{method} {path} is routed but not in openapi.json"
            );
            routes += 1;
        }
        // The split found the router's calls, not nothing.
        assert!(routes >= 15, "{routes}");
    }
}
