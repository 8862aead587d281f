//! acquire_timeout, idle_transaction_timeout and max_client_conn against a real PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use pgweir::embedded_pg::roles;
use support::proxy::{TestProxyBuilder, all_clients_in_event_loop, direct, eventually, first_value, sqlstate, warm_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_timeout_fails_fast_with_a_useful_error_and_the_client_stays_usable() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(1)
        .with_pool(|p| p.acquire_timeout = Duration::from_millis(300))
        .start()
        .await;
    let holder = proxy.connect(roles::SCRAM).await;
    holder.batch_execute("begin; select 1").await.expect("holder begins");
    let waiter = proxy.connect(roles::SCRAM).await;
    let started = Instant::now();
    let e = waiter.query_one("select 1", &[]).await.expect_err("pool exhausted");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
        "took {elapsed:?}"
    );
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e:?}");
    let msg = e.as_db_error().expect("db error").message().to_owned();
    for needle in ["app/app_scram", "acquire_timeout", "pool_size 1", "1 active", "waiting"] {
        assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    }
    // Simple protocol too.
    let e = waiter.simple_query("select 1").await.expect_err("still exhausted");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"));
    // Once the holder commits, the same client connection works.
    holder.batch_execute("commit").await.expect("commit");
    let row = waiter
        .query_one("select 7::int4", &[])
        .await
        .expect("usable after the timeout");
    assert_eq!(row.get::<_, i32>(0), 7);
    let stats = proxy.proxy().context().pools.all();
    assert_eq!(
        stats[0]
            .stats()
            .acquire_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_kills_the_leaker_and_frees_its_locks() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(2)
        .with_pool(|p| p.idle_transaction_timeout = Some(Duration::from_millis(500)))
        .start()
        .await;
    let setup = proxy.connect(roles::SCRAM).await;
    setup
        .batch_execute("create table itt (id int primary key, v int); insert into itt values (1, 0)")
        .await
        .expect("setup");
    let leaker = proxy.connect(roles::SCRAM).await;
    leaker
        .batch_execute("begin; update itt set v = 1 where id = 1")
        .await
        .expect("leaker takes a row lock");
    // Meanwhile another client wants the same row: it must get it once the leaker is killed.
    let started = Instant::now();
    let other = proxy.connect(roles::SCRAM).await;
    other
        .batch_execute("update itt set v = 2 where id = 1")
        .await
        .expect("lock freed after the timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    let e = leaker
        .batch_execute("commit")
        .await
        .expect_err("leaker was disconnected");
    if let Some(code) = sqlstate(&e) {
        assert_eq!(code, "25P03", "{e:?}");
    }
    let v: i32 = other
        .query_one("select v from itt where id = 1", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(v, 2, "the leaker's update must have been rolled back");
    let observer = direct(&pg, "app").await;
    let idle_in_tx: i64 = observer
        .query_one(
            "select count(*) from pg_stat_activity where state like 'idle in transaction%'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(idle_in_tx, 0);
    let pools = proxy.proxy().context().pools.all();
    assert_eq!(
        pools[0]
            .stats()
            .idle_transaction_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_error_reaches_a_waiting_reader() {
    // The FATAL is sent as soon as the timeout fires: a client blocked reading sees it.
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.idle_transaction_timeout = Some(Duration::from_millis(200)))
        .start()
        .await;
    let (client, conn_task) = proxy.connect_watched(roles::SCRAM).await;
    client.batch_execute("begin").await.expect("begin");
    let result = tokio::time::timeout(Duration::from_secs(5), conn_task)
        .await
        .expect("connection ends after the timeout")
        .expect("task");
    let e = result.expect_err("connection closed with an error");
    assert_eq!(sqlstate(&e).as_deref(), Some("25P03"), "{e:?}");
    let msg = e.as_db_error().expect("db error").message().to_owned();
    assert!(msg.contains("idle_transaction_timeout"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_the_excess_at_once() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg);
    builder.max_client_conn = 3;
    let proxy = builder.start().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(proxy.connect(roles::SCRAM).await);
    }
    let started = Instant::now();
    let e = proxy
        .try_connect(roles::SCRAM, "app")
        .await
        .expect_err("fourth client refused");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e:?}");
    let msg = e.as_db_error().expect("db error").message().to_owned();
    assert!(msg.contains("max_client_conn"), "{msg}");
    drop(held.pop());
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxy.try_connect(roles::SCRAM, "app").await.is_ok()
        })
        .await,
        "a slot frees up when a client leaves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_first_in_first_out() {
    let pg = support::postgres();
    let proxy = std::sync::Arc::new(
        TestProxyBuilder::new(&pg)
            .pool_size(1)
            .with_pool(|p| p.acquire_timeout = Duration::from_secs(20))
            .start()
            .await,
    );
    let holder = proxy.connect(roles::SCRAM).await;
    // The order is taken where the server runs the queries, not where the clients' tasks
    // happen to record their replies (tasks on a loaded machine can record out of order).
    holder
        .batch_execute("create sequence fifo_order; begin")
        .await
        .expect("hold the only server");
    let mut tasks = Vec::new();
    for i in 0..5usize {
        let client = proxy.connect(roles::SCRAM).await;
        tasks.push(tokio::spawn(async move {
            let rows = client
                .simple_query("select nextval('fifo_order')")
                .await
                .expect("eventually served");
            (i, first_value(&rows).and_then(|v| v.parse::<usize>().ok()))
        }));
        // Make the arrival order unambiguous: the next waiter starts only once this one is
        // queued in the pool (a fixed sleep is not enough on a loaded machine).
        let pools = &proxy.proxy().context().pools;
        assert!(
            eventually(Duration::from_secs(10), || async {
                pools.all()[0].snapshot().waiting == i + 1
            })
            .await,
            "waiter {i} never queued"
        );
    }
    holder.batch_execute("commit").await.expect("release");
    for t in tasks {
        let (i, served) = t.await.expect("task");
        assert_eq!(served, Some(i + 1), "waiter {i} was served out of turn");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connect_timeout_bounds_a_silent_server() {
    let pg = support::postgres();
    // A "server" that accepts connections and never says anything.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut builder = TestProxyBuilder::new(&pg).with_pool(|p| p.server_connect_timeout = Duration::from_millis(300));
    builder.extra_databases.push((
        "silent".to_owned(),
        pgweir::config::DatabaseConfig {
            host: "127.0.0.1".to_owned(),
            port: silent_port,
            dbname: "silent".to_owned(),
            server_user: None,
            server_password: None,
            pool: builder.pool.clone(),
        },
    ));
    let proxy = builder.start().await;
    let started = Instant::now();
    let e = proxy.try_connect(roles::SCRAM, "silent").await.expect_err("no server");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let msg = e.as_db_error().expect("db error").message().to_owned();
    assert!(msg.contains("server_connect_timeout"), "{msg}");
    // Other databases are unaffected.
    proxy
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("app works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_replaces_a_terminated_backend() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(1)
        .with_pool(|p| p.server_check_delay = Duration::ZERO)
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    let admin = direct(&pg, "postgres").await;
    terminate_backend_then_query(&client, &admin, "after a health check").await;
}

/// Terminates the backend serving `client` (through `admin`, straight to PostgreSQL) while it
/// sits idle in the pool, then checks that the client's next query runs on a new backend.
async fn terminate_backend_then_query(client: &tokio_postgres::Client, admin: &tokio_postgres::Client, what: &str) {
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    admin
        .execute("select pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let new_pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap_or_else(|e| panic!("{what}: the dead backend was handed out: {e}"))
        .get(0);
    assert_ne!(new_pid, pid);
}

/// Without a health check (server_check_delay far away), a backend that ended while idle in the
/// pool is still never handed out: its goodbye (FATAL, then EOF) makes the socket readable and
/// the checkout's peek sees it, so the client's very next query gets a fresh backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_ended_while_idle_is_never_handed_out() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(1)
        .with_pool(|p| p.server_check_delay = Duration::from_secs(3600))
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    let admin = direct(&pg, "postgres").await;
    for round in 0..3 {
        terminate_backend_then_query(&client, &admin, &format!("round {round}")).await;
    }
}

/// How a slowloris client stalls its login.
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// Connects and sends nothing.
    Silent,
    /// Sends two of the four length bytes.
    HalfLength,
    /// Declares a 100-byte startup packet and sends only part of it.
    ShortBody,
    /// A complete StartupMessage, then never answers the SASL challenge.
    NoPassword,
    /// Drips one byte of a startup packet every 100 ms: always "making progress".
    Drip,
}

/// Runs one slowloris connection; returns how long the proxy took to close it.
async fn slowloris(addr: std::net::SocketAddr, stall: Stall) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let startup = support::startup_packet("app_scram", "app");
    let first: &[u8] = match stall {
        Stall::Silent | Stall::Drip => &[],
        Stall::HalfLength => &[0, 0],
        Stall::ShortBody => &[0, 0, 0, 100, 0, 3, 0, 0, b'u'],
        Stall::NoPassword => &startup,
    };
    s.write_all(first).await.expect("write");
    let mut drip = startup.iter().copied().cycle();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {} // the SASL challenge, or the final ErrorResponse
            },
            _ = tokio::time::sleep(Duration::from_millis(100)), if matches!(stall, Stall::Drip) => {
                let byte = drip.next().unwrap_or_default();
                if s.write_all(&[byte]).await.is_err() {
                    return started.elapsed();
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_all_dropped_at_client_login_timeout_and_others_still_log_in() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg);
    builder.client_login_timeout = Duration::from_millis(700);
    builder.max_client_conn = 1000;
    let proxy = builder.start().await;
    let addr = proxy.addr;
    let stalls = [
        Stall::Silent,
        Stall::HalfLength,
        Stall::ShortBody,
        Stall::NoPassword,
        Stall::Drip,
    ];
    let tasks: Vec<_> = (0..250)
        .map(|i| {
            let stall = stalls[i % stalls.len()];
            (stall, tokio::spawn(slowloris(addr, stall)))
        })
        .collect();
    // While 250 logins hang, a real client gets in.
    let ok = tokio::time::timeout(Duration::from_secs(5), async {
        proxy.connect(roles::SCRAM).await.query_one("select 1", &[]).await
    })
    .await
    .expect("a real login is not starved by slowloris clients");
    ok.expect("query");
    for (stall, t) in tasks {
        let took = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap_or_else(|_| panic!("{stall:?} connection never dropped"))
            .expect("task");
        assert!(
            took >= Duration::from_millis(600) && took < Duration::from_secs(4),
            "{stall:?} dropped after {took:?}"
        );
    }
    // None of them is still counted as a connected client (any phase, login included).
    let ctx = proxy.proxy().context();
    assert!(
        eventually(Duration::from_secs(5), || async {
            ctx.connected.load(std::sync::atomic::Ordering::Relaxed) == 0
        })
        .await,
        "{} clients still counted",
        ctx.connected.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_the_query_and_frees_the_server() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(1)
        .with_pool(|p| p.query_timeout = Some(Duration::from_millis(400)))
        .start()
        .await;
    let slow = proxy.connect(roles::SCRAM).await;
    let e = cut_off_by_query_timeout(&slow).await;
    assert!(
        e.as_db_error().is_some_and(|d| d.message().contains("query_timeout")),
        "{e:?}"
    );
    // The backend stopped running it (cancelled, connection closed), and the one-connection
    // pool serves the next client at once.
    let admin = direct(&pg, "app").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                    &[],
                )
                .await
                .expect("count")
                .get(0);
            n == 0
        })
        .await
    );
    let next = proxy.connect(roles::SCRAM).await;
    let v: i32 = next.query_one("SELECT 7", &[]).await.expect("next client").get(0);
    assert_eq!(v, 7);
    // Quick queries in a long transaction are not affected: the clock is per query.
    next.batch_execute("BEGIN").await.expect("begin");
    for _ in 0..3 {
        next.batch_execute("SELECT pg_sleep(0.2)")
            .await
            .expect("under the timeout");
    }
    next.batch_execute("COMMIT").await.expect("commit");
    let (_, metrics) = proxy.admin("GET", "/metrics", None, None).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pgweir_query_timeouts_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
}

/// A client queued for a server when its pool is closed (at the end of a shutdown's grace
/// period) is told the pool closed, on both data paths, not that acquire_timeout passed: it
/// did not, and the timeout counter operators alert on must not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_queued_when_its_pool_closes_is_told_so_not_timed_out() {
    let pg = support::postgres();
    for event_loop in [false, true] {
        let proxy = TestProxyBuilder::new(&pg)
            .pool_size(1)
            .with_pool(|p| p.acquire_timeout = Duration::from_secs(30))
            .event_loop(event_loop)
            .start()
            .await;
        let holder = proxy.connect(roles::SCRAM).await;
        holder.batch_execute("begin; select 1").await.expect("holder begins");
        let waiter = proxy.connect(roles::SCRAM).await;
        let query = tokio::spawn(async move { waiter.simple_query("select 1").await.map(|_| ()) });
        let pools = &proxy.proxy().context().pools;
        assert!(
            eventually(Duration::from_secs(10), || async {
                pools.all()[0].snapshot().waiting == 1
            })
            .await,
            "the waiter never queued (event_loop = {event_loop})"
        );
        pools.close_all();
        let e = tokio::time::timeout(Duration::from_secs(5), query)
            .await
            .expect("answered at once, not at acquire_timeout")
            .expect("task")
            .expect_err("no server");
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("57P01"),
            "event_loop = {event_loop}: {e:?}"
        );
        let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
        assert!(message.contains("is closed"), "{message}");
        assert_eq!(
            pools.all()[0]
                .stats()
                .acquire_timeouts
                .load(std::sync::atomic::Ordering::Relaxed),
            0,
            "event_loop = {event_loop}"
        );
    }
}

/// The idle clock starts again at every statement: a transaction whose statements come more
/// often than idle_transaction_timeout lasts many times that long, and one left idle is still
/// cut off at the timeout. On a session's task the pump keeps one timer across its waits and,
/// when it fires, checks the deadline that stands then (it has usually moved later); the event
/// loop's timers work the same way. Both paths: with the loop on, after two transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_restarts_at_every_statement() {
    let pg = support::postgres();
    for event_loop in [false, true] {
        let proxy = TestProxyBuilder::new(&pg)
            .event_loop(event_loop)
            .with_pool(|p| p.idle_transaction_timeout = Some(Duration::from_millis(500)))
            .start()
            .await;
        let client = proxy.connect(roles::SCRAM).await;
        // With the loop on, the transactions below run in it.
        warm_up(&client).await;
        assert!(
            all_clients_in_event_loop(&proxy, 1, event_loop).await,
            "the session waits in the loop exactly when it is on"
        );
        client.batch_execute("begin").await.expect("begin");
        let started = Instant::now();
        // 100 ms apart: a busy CI host has 400 ms to answer each one before the idle clock runs
        // out, and the transaction outlives the timeout more than twice over.
        for i in 0..12 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let rows = client.simple_query(&format!("select {i}")).await.unwrap_or_else(|e| {
                panic!(
                    "event_loop = {event_loop}: statement {i} after {:?}: {e:?}",
                    started.elapsed()
                )
            });
            assert_eq!(first_value(&rows), Some(i.to_string()));
        }
        client.batch_execute("commit").await.expect("commit");

        client.batch_execute("begin").await.expect("begin again");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let e = client
            .simple_query("select 1")
            .await
            .expect_err("left idle in its transaction, the client is cut off");
        assert!(
            client.is_closed() || sqlstate(&e).as_deref() == Some("25P03"),
            "event_loop = {event_loop}: {e:?}"
        );
    }
}

/// A query_timeout due before the idle_transaction_timeout the transaction's earlier wait set
/// fires at its own time: the task's timer, kept across waits, is set earlier when the deadline
/// moves earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_fires_before_a_later_idle_transaction_timeout() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .event_loop(false)
        .with_pool(|p| {
            p.idle_transaction_timeout = Some(Duration::from_secs(20));
            p.query_timeout = Some(Duration::from_secs(1));
        })
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    client.batch_execute("begin").await.expect("begin");
    // Idle in the transaction past BEGIN's own query deadline: the timer set for that one has
    // fired and been set again for the idle timeout, 20 s away.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cut_off_by_query_timeout(&client).await;
}

/// Runs `SELECT pg_sleep(30)`, which the pool's query_timeout (a second or less) must end
/// within 5 s with SQLSTATE 57014; returns the error.
async fn cut_off_by_query_timeout(client: &tokio_postgres::Client) -> tokio_postgres::Error {
    let started = Instant::now();
    let e = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .expect_err("query_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    e
}
