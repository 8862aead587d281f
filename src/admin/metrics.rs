//! `/metrics`: Prometheus/OpenMetrics text built at scrape time from pool snapshots and the
//! counters the pools and sessions already keep as plain atomics, so the hot path pays nothing
//! for metrics. Labels are bounded: database and user, never client ids.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::AdminState;
use crate::client::registry::ClientState;
use crate::metrics::HistogramSnapshot;

type Labels = Vec<(String, String)>;

fn labels(pool: &crate::pool::Pool, extra: Option<(&str, &str)>) -> Labels {
    let mut l = vec![
        ("database".to_owned(), pool.key().database.clone()),
        ("user".to_owned(), pool.key().user.clone()),
    ];
    if let Some((k, v)) = extra {
        l.push((k.to_owned(), v.to_owned()));
    }
    l
}

pub(super) async fn scrape(State(s): State<AdminState>) -> Response {
    let mut registry = Registry::with_prefix("pgweir");
    let pool_size = Family::<Labels, Gauge>::default();
    let servers = Family::<Labels, Gauge>::default();
    let waiting = Family::<Labels, Gauge>::default();
    let paused = Family::<Labels, Gauge>::default();
    let acquire_timeouts = Family::<Labels, Counter>::default();
    let idle_tx = Family::<Labels, Counter>::default();
    let query_timeouts = Family::<Labels, Counter>::default();
    let connects = Family::<Labels, Counter>::default();
    let connect_failures = Family::<Labels, Counter>::default();
    let checkouts = Family::<Labels, Counter>::default();
    let resets = Family::<Labels, Counter>::default();
    let queries = Family::<Labels, Counter>::default();
    let transactions = Family::<Labels, Counter>::default();
    let pool_clients = Family::<Labels, Gauge>::default();
    let utilisation = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let bytes = Family::<Labels, Counter>::default();
    let acquire_wait = Family::<Labels, HistogramSnapshot>::default();
    let transaction_duration = Family::<Labels, HistogramSnapshot>::default();
    let query_duration = Family::<Labels, HistogramSnapshot>::default();
    let closed = Family::<Labels, Counter>::default();
    let clients_now = s.ctx.clients.all();
    for pool in s.ctx.pools.all() {
        let snap = pool.snapshot();
        for (state, name) in [
            (ClientState::Active, "active"),
            (ClientState::Idle, "idle"),
            (ClientState::Waiting, "waiting"),
        ] {
            let n = clients_now
                .iter()
                .filter(|c| *c.pool == *pool.key() && c.state() == state)
                .count();
            pool_clients
                .get_or_create(&labels(&pool, Some(("state", name))))
                .set(n as i64);
        }
        utilisation.get_or_create(&labels(&pool, None)).set(snap.utilisation());
        let stats = pool.stats();
        pool_size.get_or_create(&labels(&pool, None)).set(snap.size as i64);
        servers
            .get_or_create(&labels(&pool, Some(("state", "active"))))
            .set(snap.active() as i64);
        servers
            .get_or_create(&labels(&pool, Some(("state", "idle"))))
            .set(snap.idle as i64);
        waiting.get_or_create(&labels(&pool, None)).set(snap.waiting as i64);
        paused.get_or_create(&labels(&pool, None)).set(i64::from(snap.paused));
        servers
            .get_or_create(&labels(&pool, Some(("state", "connecting"))))
            .set(stats.connecting.load(Ordering::Relaxed) as i64);
        servers
            .get_or_create(&labels(&pool, Some(("state", "testing"))))
            .set(stats.testing.load(Ordering::Relaxed) as i64);
        for (reason, count) in crate::pool::CLOSE_REASONS.iter().zip(&stats.closed) {
            closed
                .get_or_create(&labels(&pool, Some(("reason", reason))))
                .inc_by(count.load(Ordering::Relaxed));
        }
        query_duration
            .get_or_create(&labels(&pool, None))
            .set_from(&stats.query_duration.snapshot());
        bytes
            .get_or_create(&labels(&pool, Some(("direction", "in"))))
            .inc_by(stats.bytes_from_clients.load(Ordering::Relaxed));
        bytes
            .get_or_create(&labels(&pool, Some(("direction", "out"))))
            .inc_by(stats.bytes_to_clients.load(Ordering::Relaxed));
        acquire_wait
            .get_or_create(&labels(&pool, None))
            .set_from(&stats.acquire_wait.snapshot());
        transaction_duration
            .get_or_create(&labels(&pool, None))
            .set_from(&stats.transaction_duration.snapshot());
        for (family, value) in [
            (&acquire_timeouts, stats.acquire_timeouts.load(Ordering::Relaxed)),
            (&idle_tx, stats.idle_transaction_timeouts.load(Ordering::Relaxed)),
            (&query_timeouts, stats.query_timeouts.load(Ordering::Relaxed)),
            (&connects, stats.server_connects.load(Ordering::Relaxed)),
            (&connect_failures, stats.server_connect_failures.load(Ordering::Relaxed)),
            (&checkouts, stats.checkouts.load(Ordering::Relaxed)),
            (&resets, stats.session_resets.load(Ordering::Relaxed)),
            (&queries, stats.queries.load(Ordering::Relaxed)),
            (&transactions, stats.transactions.load(Ordering::Relaxed)),
        ] {
            family.get_or_create(&labels(&pool, None)).inc_by(value);
        }
    }
    registry.register("pool_size", "Configured pool_size per (database, user)", pool_size);
    registry.register("server_connections", "Server connections by state", servers);
    registry.register("clients_waiting", "Clients waiting for a server connection", waiting);
    registry.register("pool_paused", "1 when the pool is paused", paused);
    registry.register("acquire_timeouts", "Clients that hit acquire_timeout", acquire_timeouts);
    registry.register(
        "idle_transaction_timeouts",
        "Clients closed by idle_transaction_timeout",
        idle_tx,
    );
    registry.register(
        "query_timeouts",
        "Queries cancelled and clients closed by query_timeout",
        query_timeouts,
    );
    registry.register("server_connects", "Server connections opened", connects);
    registry.register(
        "server_connect_failures",
        "Failed attempts to open a server connection",
        connect_failures,
    );
    registry.register(
        "server_checkouts",
        "Server connections lent to clients (transactions in transaction mode)",
        checkouts,
    );
    registry.register(
        "session_resets",
        "Runs of reset_query on a server before its next client",
        resets,
    );

    registry.register(
        "queries",
        "Simple queries and Execute messages sent to servers",
        queries,
    );
    registry.register_with_unit(
        "client",
        "Bytes relayed for clients (in: client to server, out: server to client)",
        prometheus_client::registry::Unit::Bytes,
        bytes,
    );
    registry.register(
        "server_connections_closed",
        "Server connections closed, by reason",
        closed,
    );
    registry.register_with_unit(
        "query_duration",
        "Round trip of a simple query or an extended-protocol batch up to its Sync, as clients see it",
        prometheus_client::registry::Unit::Seconds,
        query_duration,
    );
    registry.register_with_unit(
        "acquire_wait",
        "Time from a client's first message to holding a server connection",
        prometheus_client::registry::Unit::Seconds,
        acquire_wait,
    );
    registry.register_with_unit(
        "transaction_duration",
        "Time a client held a server connection (one transaction in transaction mode)",
        prometheus_client::registry::Unit::Seconds,
        transaction_duration,
    );

    registry.register(
        "transactions",
        "Server links completed (transactions in transaction mode)",
        transactions,
    );
    registry.register("pool_clients", "Logged-in clients of the pool by state", pool_clients);
    registry.register(
        "pool_utilization_ratio",
        "Active server connections / pool_size",
        utilisation,
    );
    let clients = Gauge::<i64>::default();
    clients.set(s.ctx.connected.load(Ordering::Relaxed) as i64);
    registry.register("client_connections", "Connected clients", clients);
    let disconnects = Family::<Labels, Counter>::default();
    for (reason, count) in crate::client::DISCONNECT_REASONS.iter().zip(&s.ctx.disconnects) {
        disconnects
            .get_or_create(&vec![("reason".to_owned(), (*reason).to_owned())])
            .inc_by(count.load(Ordering::Relaxed));
    }
    registry.register("client_disconnects", "Ended client sessions by reason", disconnects);
    let login_failures = Family::<Labels, Counter>::default();
    for (reason, count) in crate::client::LOGIN_FAILURE_REASONS.iter().zip(&s.ctx.login_failures) {
        login_failures
            .get_or_create(&vec![("reason".to_owned(), (*reason).to_owned())])
            .inc_by(count.load(Ordering::Relaxed));
    }
    let cancels = Family::<Labels, Counter>::default();
    for (result, count) in s.ctx.cancels.stats.by_result() {
        cancels
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc_by(count);
    }
    registry.register(
        "cancel_requests",
        "CancelRequests by outcome (delivered, idle_client, unknown_key, forwarded to a peer, unroutable, ttl_exhausted)",
        cancels,
    );
    registry.register(
        "client_login_failures",
        "Failed client logins by reason (bad_password, unknown_user, hba_denied, timeout, …)",
        login_failures,
    );
    let st = &s.ctx.statements;
    for (name, help, value) in [
        (
            "prepared_statement_hits",
            "Client Parse of a statement pgweir already knew",
            &st.hits,
        ),
        (
            "prepared_statement_misses",
            "Client Parse of a new statement",
            &st.misses,
        ),
        (
            "prepared_statement_reprepares",
            "Statements prepared on another server before use",
            &st.reprepares,
        ),
    ] {
        let c = Counter::<u64>::default();
        c.inc_by(value.load(Ordering::Relaxed));
        registry.register(name, help, c);
    }

    let mut body = String::new();
    if encode(&mut body, &registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed").into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
