//! Clients and servers going away: a killed client's locks are freed, PostgreSQL restarts are
//! survived, old and idle server connections are retired.

mod support;

use std::time::{Duration, Instant};

use pgweir::embedded_pg::roles;
use support::proxy::{TestProxyBuilder, direct, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_while_holding_a_row_lock_frees_it_within_a_second() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(3).start().await;
    let setup = proxy.connect(roles::SCRAM).await;
    setup
        .batch_execute("create table locks (id int primary key, v int); insert into locks values (1, 0)")
        .await
        .expect("setup");
    // A raw client that takes a lock and then vanishes (socket closed, no Terminate).
    let (victim, conn_task) = proxy.connect_watched(roles::SCRAM).await;
    victim
        .batch_execute("begin; update locks set v = 1 where id = 1")
        .await
        .expect("lock taken");
    conn_task.abort();
    drop(victim);
    let started = Instant::now();
    let other = proxy.connect(roles::SCRAM).await;
    tokio::time::timeout(
        Duration::from_secs(1),
        other.batch_execute("update locks set v = 2 where id = 1"),
    )
    .await
    .expect("lock freed within a second")
    .expect("update");
    assert!(started.elapsed() < Duration::from_secs(1));
    let v: i32 = other.query_one("select v from locks", &[]).await.expect("read").get(0);
    assert_eq!(v, 2, "the killed client's update was rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_query_cancels_the_query() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(2).start().await;
    let (victim, conn_task) = proxy.connect_watched(roles::SCRAM).await;
    let q = tokio::spawn(async move { victim.simple_query("select pg_sleep(60)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn_task.abort();
    q.abort();
    let observer = direct(&pg, "postgres").await;
    let gone = eventually(Duration::from_secs(3), || async {
        let n: i64 = observer
            .query_one(
                "select count(*) from pg_stat_activity where query like 'select pg_sleep(60)%' and state = 'active'",
                &[],
            )
            .await
            .expect("activity")
            .get(0);
        n == 0
    })
    .await;
    assert!(gone, "the abandoned query is still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_postgres_restart() {
    let mut pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(3).start().await;
    let before = proxy.connect(roles::SCRAM).await;
    before.query_one("select 1", &[]).await.expect("works before");
    tokio::task::block_in_place(|| pg.restart()).expect("restart PostgreSQL");
    let back = Instant::now();
    // The idle pooled connection died with the old server; the client's next query must get a
    // fresh one rather than an error (the dead one is detected before reuse).
    let ok = eventually(Duration::from_secs(2), || async {
        before.query_one("select 1", &[]).await.is_ok()
    })
    .await;
    assert!(ok, "the existing client could not query after the restart");
    let fresh = proxy.connect(roles::SCRAM).await;
    fresh
        .query_one("select 1", &[])
        .await
        .expect("new client after restart");
    assert!(back.elapsed() < Duration::from_secs(3), "took {:?}", back.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_then_up_gives_clear_errors_then_recovers() {
    let mut pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.server_connect_timeout = Duration::from_secs(1))
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    client.query_one("select 1", &[]).await.expect("works");
    tokio::task::block_in_place(|| pg.stop()).expect("stop");
    let e = client.query_one("select 1", &[]).await.expect_err("server down");
    let code = support::proxy::sqlstate(&e);
    assert!(matches!(code.as_deref(), Some("08006") | Some("57P01")), "{e:?}");
    tokio::task::block_in_place(|| pg.start_again()).expect("start again");
    let started = Instant::now();
    let recovered = eventually(Duration::from_secs(3), || async {
        match proxy.try_connect(roles::SCRAM, "app").await {
            Ok(c) => c.query_one("select 1", &[]).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(recovered, "no recovery within 3s");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_old_server_connections_are_retired_and_min_pool_size_kept_warm() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(4)
        .with_pool(|p| {
            p.min_pool_size = 2;
            p.server_idle_timeout = Some(Duration::from_millis(400));
            p.server_lifetime = Some(Duration::from_secs(2));
        })
        .start()
        .await;
    let observer = direct(&pg, "postgres").await;
    let count = || async {
        observer
            .query_one("select count(*) from pg_stat_activity where usename = 'app_scram'", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    // Open 4 server connections at once.
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| proxy.connect(roles::SCRAM))).await;
    futures_util::future::join_all(clients.iter().map(|c| c.batch_execute("select pg_sleep(0.3)"))).await;
    assert_eq!(count().await, 4);
    // Idle ones above min_pool_size close after server_idle_timeout.
    assert!(
        eventually(Duration::from_secs(3), || async { count().await == 2 }).await,
        "idle connections not retired"
    );
    let pids_before: Vec<i32> = observer
        .query(
            "select pid from pg_stat_activity where usename = 'app_scram' order by pid",
            &[],
        )
        .await
        .expect("pids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // After server_lifetime they are replaced, keeping min_pool_size warm.
    let replaced = eventually(Duration::from_secs(5), || async {
        let pids: Vec<i32> = observer
            .query(
                "select pid from pg_stat_activity where usename = 'app_scram' order by pid",
                &[],
            )
            .await
            .expect("pids")
            .iter()
            .map(|r| r.get(0))
            .collect();
        pids.len() == 2 && pids.iter().all(|p| !pids_before.contains(p))
    })
    .await;
    assert!(replaced, "server_lifetime did not replace the warm connections");
}

/// Reads pgweir's stats for the only `app` pool: (active, idle) server connections.
fn app_pool_servers(proxy: &support::proxy::TestProxy) -> (usize, usize) {
    let pools = proxy.proxy().context().pools.all();
    let pool = pools
        .iter()
        .find(|p| p.key().database == "app")
        .expect("app pool exists");
    let s = pool.snapshot();
    (s.active(), s.idle)
}

/// The error a client sees when PostgreSQL dies under it: either the backend's own last words
/// (57P01 "unexpected postmaster exit" when the postmaster was killed, 57P02 when another
/// backend crashed), forwarded, or pgweir's 08006 when the socket just closed.
fn assert_crash_error(e: &tokio_postgres::Error) {
    let code = support::proxy::sqlstate(e);
    assert!(matches!(code.as_deref(), Some("08006" | "57P01" | "57P02")), "{e:?}");
    let msg = e.as_db_error().expect("db error").message().to_owned();
    if code.as_deref() == Some("08006") {
        assert!(msg.contains("rolled back") || msg.contains("lost"), "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sigkilled_mid_transaction_gives_clients_an_error_and_the_pool_recovers_by_itself() {
    let mut pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(4)
        .with_pool(|p| p.server_connect_timeout = Duration::from_secs(2))
        .start()
        .await;
    let setup = proxy.connect(roles::SCRAM).await;
    // The embedded cluster runs with synchronous_commit = off: without this, a SIGKILL within
    // the WAL writer's delay can lose the CREATE TABLE itself, and the check below would wait
    // for a table that crash recovery rightly never brings back.
    setup
        .batch_execute("set synchronous_commit = on; create table crash (id int)")
        .await
        .expect("setup");
    let mut in_tx = Vec::new();
    for i in 0..3 {
        let (c, conn) = proxy.connect_watched(roles::SCRAM).await;
        c.batch_execute(&format!("begin; insert into crash values ({i})"))
            .await
            .expect("transaction open");
        in_tx.push((c, conn));
    }
    // And one client in the middle of a query.
    let busy_client = proxy.connect(roles::SCRAM).await;
    busy_client.batch_execute("begin").await.expect("begin");
    let busy = tokio::spawn(async move { busy_client.simple_query("select pg_sleep(30)").await.map(|_| ()) });
    let observer = direct(&pg, "postgres").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            observer
                .query_one(
                    "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        })
        .await,
        "the sleeping query never started"
    );
    drop(observer);
    tokio::task::block_in_place(|| pg.kill()).expect("SIGKILL the postmaster");
    for (c, conn) in in_tx {
        // The client is idle in its transaction: pgweir tells it at once (an asynchronous FATAL,
        // which tokio-postgres reports as the connection's result) and closes it.
        let ended = tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the client is told promptly")
            .expect("task");
        let e = ended.expect_err("the connection ends with an error");
        assert_crash_error(&e);
        assert!(c.batch_execute("commit").await.is_err(), "commit after the crash");
    }
    let e = tokio::time::timeout(Duration::from_secs(5), busy)
        .await
        .expect("the running query ends promptly")
        .expect("task")
        .expect_err("the query cannot complete");
    assert_crash_error(&e);
    tokio::task::block_in_place(|| pg.start_again()).expect("crash recovery and restart");
    // No operator action: new clients get fresh server connections.
    let recovered = eventually(Duration::from_secs(5), || async {
        match proxy.try_connect(roles::SCRAM, "app").await {
            Ok(c) => c.query_one("select count(*) from crash", &[]).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(recovered, "the pool did not recover within 5s of the restart");
    let fresh = proxy.connect(roles::SCRAM).await;
    let n: i64 = fresh
        .query_one("select count(*) from crash", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "uncommitted inserts survived the crash");
    // The dead servers were dropped, not parked as idle, and nothing is left checked out.
    assert!(
        eventually(Duration::from_secs(3), || async { app_pool_servers(&proxy).0 == 0 }).await,
        "servers still active: {:?}",
        app_pool_servers(&proxy)
    );
    let observer = direct(&pg, "postgres").await;
    let (_, idle) = app_pool_servers(&proxy);
    let on_server: i64 = observer
        .query_one("select count(*) from pg_stat_activity where usename = 'app_scram'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        idle as i64, on_server,
        "pool's idle servers and PostgreSQL's backends disagree"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_at_max_connections_gives_a_clear_error_and_no_retry_storm() {
    let pg = support::postgres_with(pgweir::embedded_pg::EmbeddedOptions {
        max_connections: 4,
        extra_conf: vec![
            "superuser_reserved_connections = 0".to_owned(),
            "log_connections = on".to_owned(),
        ],
        ..Default::default()
    });
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(4)
        .with_pool(|p| p.acquire_timeout = Duration::from_secs(2))
        .start()
        .await;
    // Every slot of the server taken by direct connections.
    let mut hogs = Vec::new();
    for _ in 0..4 {
        hogs.push(direct(&pg, "postgres").await);
    }
    let received_before = pg.log_contents().matches("connection received").count();
    let started = Instant::now();
    // pgweir needs a server connection to log a client in (server parameters), so the refusal
    // reaches the client at login.
    let results = futures_util::future::join_all((0..10).map(|_| proxy.try_connect(roles::SCRAM, "app"))).await;
    let elapsed = started.elapsed();
    for r in &results {
        let Err(e) = r else {
            panic!("a login succeeded although the server had no slot");
        };
        assert_eq!(support::proxy::sqlstate(e).as_deref(), Some("53300"), "{e:?}");
        let db = e.as_db_error().expect("db error");
        assert!(
            db.message().contains("too many clients"),
            "the server's reason is shown: {}",
            db.message()
        );
        assert!(
            db.hint().is_some_and(|h| h.contains("max_connections")),
            "the hint says what to do: {:?}",
            db.hint()
        );
    }
    assert!(elapsed < Duration::from_secs(4), "errors took {elapsed:?}");
    // Ten refused logins must not turn into a flood of server connection attempts.
    let attempts = pg.log_contents().matches("connection received").count() - received_before;
    eprintln!("10 refused logins in {elapsed:?} caused {attempts} server connection attempts");
    assert!(
        (1..=20).contains(&attempts),
        "{attempts} server connection attempts for 10 client logins"
    );
    // Once slots free up, the same clients work again.
    hogs.clear();
    assert!(
        eventually(Duration::from_secs(5), || async {
            match proxy.try_connect(roles::SCRAM, "app").await {
                Ok(c) => c.simple_query("select 1").await.is_ok(),
                Err(_) => false,
            }
        })
        .await,
        "no recovery after the server had slots again"
    );
}

/// A fake PostgreSQL that completes a trust login and then reads queries without ever
/// answering. Returns its port and a receiver of "a connection to me closed" events.
async fn stalling_backend() -> (u16, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                if support::fake_pg::trust_login(&mut s, "17.0").await.is_err() {
                    return;
                }
                // Swallow whatever comes, answer nothing, report when the peer hangs up.
                let mut sink = [0u8; 4096];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = closed_tx.send(());
            });
        }
    });
    (port, closed_rx)
}

/// A proxy whose database "stall" is the stalling fake backend (pool settings from `pool`).
async fn stall_proxy(
    pg: &pgweir::embedded_pg::EmbeddedPostgres,
    pool: impl FnOnce(&mut pgweir::config::PoolSettings),
) -> (support::proxy::TestProxy, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (stall_port, closed) = stalling_backend().await;
    let mut builder = TestProxyBuilder::new(pg).with_pool(pool);
    builder.extra_databases.push((
        "stall".to_owned(),
        pgweir::config::DatabaseConfig {
            host: "127.0.0.1".to_owned(),
            port: stall_port,
            dbname: "stall".to_owned(),
            server_user: None,
            server_password: None,
            pool: builder.pool.clone(),
        },
    ));
    (builder.start().await, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_backend_trips_acquire_timeout_and_is_closed_when_its_client_gives_up() {
    let pg = support::postgres();
    let (proxy, mut closed) = stall_proxy(&pg, |p| {
        p.pool_size = 1;
        p.acquire_timeout = Duration::from_millis(500);
    })
    .await;
    let (stuck, stuck_conn) = tokio_postgres::connect(&proxy.conn_str(roles::SCRAM, "stall"), tokio_postgres::NoTls)
        .await
        .expect("login via the fake");
    let stuck_conn = tokio::spawn(stuck_conn);
    let waiter = proxy
        .try_connect(roles::SCRAM, "stall")
        .await
        .expect("login via the fake");
    // Without query_timeout (this pool has none) the query just hangs; the client's own
    // timeout gives up here. a_stalled_backend_trips_query_timeout covers pgweir's.
    let hung = tokio::time::timeout(Duration::from_millis(700), stuck.simple_query("select 1")).await;
    assert!(hung.is_err(), "the fake backend answered");
    // The only server is stuck: the next client gets a prompt 53300, not a hang.
    let started = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(5), waiter.simple_query("select 1"))
        .await
        .expect("acquire_timeout bounds the wait")
        .expect_err("no server available");
    assert_eq!(support::proxy::sqlstate(&e).as_deref(), Some("53300"), "{e:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // The stuck client gives up (its socket closes): the half-answered server cannot be reused,
    // so pgweir closes it rather than returning it to the pool.
    stuck_conn.abort();
    drop(stuck);
    tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .expect("the stalled server connection is closed once its client left")
        .expect("channel open");
    assert!(
        eventually(Duration::from_secs(3), || async {
            let pools = proxy.proxy().context().pools.all();
            pools
                .iter()
                .filter(|p| p.key().database == "stall")
                .all(|p| p.snapshot().active() == 0)
        })
        .await,
        "the stalled server is still counted as active"
    );
    // Other databases never noticed.
    proxy
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("app unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_backend_crash_restart_is_survived_without_operator_action() {
    // SIGKILL of one backend makes the postmaster reset every backend and run crash recovery
    // on its own: the pool must notice and recover with no help.
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(4).start().await;
    let victim = proxy.connect(roles::SCRAM).await;
    victim.batch_execute("begin").await.expect("begin");
    let pid: i32 = victim
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let (bystander, bystander_conn) = proxy.connect_watched(roles::SCRAM).await;
    bystander.batch_execute("begin").await.expect("bystander begins");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL {pid} failed");
    let e = tokio::time::timeout(Duration::from_secs(5), victim.query_one("select 1", &[]))
        .await
        .expect("the victim's next query fails promptly")
        .expect_err("its backend is gone");
    if support::proxy::sqlstate(&e).is_some() {
        assert_crash_error(&e);
    } else {
        assert!(victim.is_closed(), "{e:?}");
    }
    // The bystander's backend was reset by the postmaster: it is told.
    let ended = tokio::time::timeout(Duration::from_secs(5), bystander_conn)
        .await
        .expect("the bystander is told promptly")
        .expect("task");
    assert_crash_error(&ended.expect_err("the bystander's transaction is gone"));
    let recovered = eventually(Duration::from_secs(10), || async {
        match proxy.try_connect(roles::SCRAM, "app").await {
            Ok(c) => c.query_one("select 1", &[]).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(recovered, "no recovery after the crash restart");
    assert!(
        eventually(Duration::from_secs(3), || async { app_pool_servers(&proxy).0 == 0 }).await,
        "servers still active: {:?}",
        app_pool_servers(&proxy)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_backend_trips_query_timeout() {
    let pg = support::postgres();
    let (proxy, mut closed) = stall_proxy(&pg, |p| {
        p.pool_size = 1;
        p.query_timeout = Some(Duration::from_millis(500));
    })
    .await;
    let stuck = proxy
        .try_connect(roles::SCRAM, "stall")
        .await
        .expect("login via the fake");
    let started = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(5), stuck.simple_query("select 1"))
        .await
        .expect("query_timeout bounds the wait")
        .expect_err("timed out");
    assert_eq!(support::proxy::sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    // The stalled server connection is closed, not returned to the pool.
    tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .expect("the stalled server connection is closed")
        .expect("channel open");
    assert!(
        eventually(Duration::from_secs(3), || async {
            proxy
                .proxy()
                .context()
                .pools
                .all()
                .iter()
                .filter(|p| p.key().database == "stall")
                .all(|p| p.snapshot().open == 0)
        })
        .await
    );
}

/// A client logged in over the raw protocol (as the trust user).
async fn raw_login(proxy: &support::proxy::TestProxy) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&support::startup_packet(roles::TRUST, "app"))
        .await
        .expect("startup");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), support::wire::read_frame(&mut s))
            .await
            .expect("login answered")
            .expect("login");
        assert_ne!(m[0], b'E', "login refused: {}", String::from_utf8_lossy(&m));
        if m[0] == b'Z' {
            return s;
        }
    }
}

/// The ErrorResponses pgweir sends a raw client until it closes the connection (within 10 s).
async fn errors_until_closed(s: &mut tokio::net::TcpStream) -> Vec<String> {
    let mut errors = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), support::wire::read_frame(s))
            .await
            .expect("pgweir answers and closes")
        {
            Ok(m) if m[0] == b'E' => errors.push(String::from_utf8_lossy(&m).into_owned()),
            Ok(_) => {}
            Err(_) => return errors,
        }
    }
}

/// A client that asks for a result far larger than socket buffers hold and then reads
/// nothing: pgweir can write to it no more.
async fn client_that_stops_reading(proxy: &support::proxy::TestProxy) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = raw_login(proxy).await;
    let q = b"select repeat('x', 10000) from generate_series(1, 100000)\0";
    s.write_all(&support::wire::msg(b'Q', q)).await.expect("query");
    s
}

/// Waits until pgweir's only client holds the pool's server, then a second for the sockets
/// between them to fill (the result is a gigabyte), and returns that client's id.
async fn stuck_client_id(proxy: &support::proxy::TestProxy) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let clients = support::proxy::clients_json(proxy).await;
        if clients.len() == 1 && clients[0]["server_pid"].is_i64() {
            break clients[0]["id"].as_u64().expect("id");
        }
        assert!(Instant::now() < deadline, "the client never held a server: {clients:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    id
}

/// After the stuck client's session ended: nothing is listed, and the pool's one server serves
/// the next client at once.
async fn stuck_client_gone(proxy: &support::proxy::TestProxy, what: &str) {
    let gone = eventually(Duration::from_secs(3), || async {
        support::proxy::clients_json(proxy).await.is_empty()
    })
    .await;
    assert!(
        gone,
        "{what}: the client that stopped reading is still served: {:?}",
        support::proxy::clients_json(proxy).await
    );
    let next = proxy.connect(roles::SCRAM).await;
    tokio::time::timeout(Duration::from_secs(3), next.query_one("select 1", &[]))
        .await
        .unwrap_or_else(|_| panic!("{what}: the pool's server was not freed"))
        .expect("query");
}

/// An operator kills a client that no longer reads its result: the kill ends it (its error
/// cannot be delivered) and frees its server, instead of waiting for room in its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_still_killed() {
    let pg = support::postgres();
    let mut b = TestProxyBuilder::new(&pg).pool_size(1);
    b.auth_type = pgweir::config::AuthType::Trust;
    let proxy = b.start().await;
    let _stuck = client_that_stops_reading(&proxy).await;
    let id = stuck_client_id(&proxy).await;
    let (status, body) = proxy
        .admin("POST", &format!("/api/clients/{id}/kill"), None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    stuck_client_gone(&proxy, "kill").await;
}

/// query_timeout reaches a query whose client stopped reading its result (the server waits on
/// pgweir, which waits on the client): the session ends and the server is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_ends_a_client_that_stops_reading() {
    let pg = support::postgres();
    let mut b = TestProxyBuilder::new(&pg)
        .pool_size(1)
        .with_pool(|p| p.query_timeout = Some(Duration::from_millis(1500)));
    b.auth_type = pgweir::config::AuthType::Trust;
    let proxy = b.start().await;
    let _stuck = client_that_stops_reading(&proxy).await;
    stuck_client_id(&proxy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stuck_client_gone(&proxy, "query_timeout").await;
}

/// A client that stopped part-way through a message (here: a Query's header and a few bytes of
/// its text) waits for the rest; a kill still ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stopped_mid_message_is_still_killed() {
    use tokio::io::AsyncWriteExt;
    let pg = support::postgres();
    let mut b = TestProxyBuilder::new(&pg).pool_size(1);
    b.auth_type = pgweir::config::AuthType::Trust;
    let proxy = b.start().await;
    let mut s = raw_login(&proxy).await;
    let whole = support::wire::msg(b'Q', b"select 'a query whose end never comes'\0");
    s.write_all(&whole[..12]).await.expect("part of a query");
    let clients = support::proxy::clients_json(&proxy).await;
    assert_eq!(clients.len(), 1, "{clients:?}");
    let id = clients[0]["id"].as_u64().expect("id");
    // Let the session read what came and wait for the rest.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = proxy
        .admin("POST", &format!("/api/clients/{id}/kill"), None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    let gone = eventually(Duration::from_secs(3), || async {
        support::proxy::clients_json(&proxy).await.is_empty()
    })
    .await;
    assert!(gone, "the client is still served after its kill");
    let m = tokio::time::timeout(Duration::from_secs(3), support::wire::read_frame(&mut s))
        .await
        .expect("told")
        .expect("an error before the close");
    assert_eq!(m[0], b'E', "{}", String::from_utf8_lossy(&m));
    assert!(String::from_utf8_lossy(&m).contains("57P01"));
}

/// A fake PostgreSQL whose first connection logs in at once and whose later ones only after
/// `delay`, and that answers no query: every Query text it is sent goes to the receiver.
async fn slow_login_backend(delay: Duration) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            let wait = if first { Duration::ZERO } else { delay };
            first = false;
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if support::fake_pg::trust_login(&mut s, "17.0").await.is_err() {
                    return;
                }
                while let Ok(m) = support::wire::read_frame(&mut s).await {
                    if m[0] == b'Q' {
                        let _ = tx.send(String::from_utf8_lossy(&m[5..]).into_owned());
                    }
                }
            });
        }
    });
    (port, rx)
}

/// A client killed while pgweir connects a server for its statement is ended once the
/// connection is made, and its statement never reaches the server (the connection goes back
/// to the pool unused); meanwhile the admin API shows it waiting for a server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_while_its_server_connects_never_runs_its_statement() {
    let pg = support::postgres();
    let (port, mut queries) = slow_login_backend(Duration::from_millis(1500)).await;
    let mut builder = TestProxyBuilder::new(&pg).with_pool(|p| p.pool_size = 2);
    builder.extra_databases.push((
        "slow".to_owned(),
        pgweir::config::DatabaseConfig {
            host: "127.0.0.1".to_owned(),
            port,
            dbname: "slow".to_owned(),
            server_user: None,
            server_password: None,
            pool: builder.pool.clone(),
        },
    ));
    let proxy = builder.start().await;
    // The first client's login takes the fake's first connection (for the server's
    // parameters), then keeps it: its statement is never answered.
    let holder = proxy
        .try_connect(roles::SCRAM, "slow")
        .await
        .expect("login via the fake");
    let held = tokio::spawn(async move { holder.simple_query("begin").await });
    let first = tokio::time::timeout(Duration::from_secs(5), queries.recv())
        .await
        .expect("the holder's statement reached the fake")
        .expect("channel open");
    assert!(first.starts_with("begin"), "{first}");
    let victim = proxy
        .try_connect(roles::SCRAM, "slow")
        .await
        .expect("login via the fake");
    let asked = tokio::spawn(async move { victim.simple_query("select 'the killed statement'").await });
    // The pool's second connection is being made (it takes 1.5 s).
    let mut waiting = None;
    let deadline = Instant::now() + Duration::from_secs(1);
    while waiting.is_none() {
        waiting = support::proxy::clients_json(&proxy)
            .await
            .into_iter()
            .find(|c| c["state"] == "waiting");
        assert!(
            waiting.is_some() || Instant::now() < deadline,
            "no client shown waiting while its server connects: {:?}",
            support::proxy::clients_json(&proxy).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = waiting.expect("waiting client")["id"].as_u64().expect("id");
    let (status, body) = proxy
        .admin("POST", &format!("/api/clients/{id}/kill"), None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    let e = tokio::time::timeout(Duration::from_secs(5), asked)
        .await
        .expect("the killed client is answered once the connection is made")
        .expect("task")
        .expect_err("killed");
    assert_eq!(support::proxy::sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Ok(q) = queries.try_recv() {
        panic!("the killed client's statement reached the server: {q}");
    }
    held.abort();
}

/// PostgreSQL's own FATAL (here its answer to `pg_terminate_backend`) is the client's last
/// word: pgweir passes it on and adds no FATAL of its own, which would hide its SQLSTATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_s_own_fatal_is_the_only_one_its_client_gets() {
    use tokio::io::AsyncWriteExt;
    let pg = support::postgres();
    let mut b = TestProxyBuilder::new(&pg);
    b.auth_type = pgweir::config::AuthType::Trust;
    let proxy = b.start().await;
    let mut s = raw_login(&proxy).await;
    s.write_all(&support::wire::msg(
        b'Q',
        b"select pg_terminate_backend(pg_backend_pid())\0",
    ))
    .await
    .expect("query");
    let errors = errors_until_closed(&mut s).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("C57P01"), "{errors:?}");
}

/// A fake PostgreSQL that logs in and closes the connection when a statement arrives, with no
/// ErrorResponse (as a crashed backend does).
async fn vanishing_backend() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if support::fake_pg::trust_login(&mut s, "17.0").await.is_err() {
                    return;
                }
                while let Ok(m) = support::wire::read_frame(&mut s).await {
                    if m[0] == b'Q' {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A server lost while a statement ran: the client is told (08006) that whether the statement
/// took effect is unknown, not that it was rolled back (it may have been a COMMIT, and a client
/// told "rolled back" would run the write again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_mid_statement_is_reported_as_unknown_outcome() {
    let pg = support::postgres();
    let port = vanishing_backend().await;
    let mut builder = TestProxyBuilder::new(&pg);
    builder.extra_databases.push((
        "vanish".to_owned(),
        pgweir::config::DatabaseConfig {
            host: "127.0.0.1".to_owned(),
            port,
            dbname: "vanish".to_owned(),
            server_user: None,
            server_password: None,
            pool: builder.pool.clone(),
        },
    ));
    let proxy = builder.start().await;
    let client = proxy
        .try_connect(roles::SCRAM, "vanish")
        .await
        .expect("login via the fake");
    let e = client
        .simple_query("insert into t values (1)")
        .await
        .expect_err("the server vanished");
    assert_eq!(support::proxy::sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
    let text = support::proxy::message(&e);
    assert!(text.contains("whether it took effect is unknown"), "{text}");
}

/// A malformed message from a client inside a transaction (its server linked) gets the same
/// FATAL 08P01 as one outside (the session used to end without a word), and the transaction is
/// rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_inside_a_transaction_is_answered() {
    use tokio::io::AsyncWriteExt;
    let pg = support::postgres();
    let mut b = TestProxyBuilder::new(&pg);
    b.auth_type = pgweir::config::AuthType::Trust;
    let proxy = b.start().await;
    let mut s = raw_login(&proxy).await;
    s.write_all(&support::wire::msg(b'Q', b"begin\0")).await.expect("begin");
    loop {
        let m = support::wire::read_frame(&mut s).await.expect("begin answered");
        if m[0] == b'Z' {
            assert_eq!(m[5], b'T', "in a transaction");
            break;
        }
    }
    // A Query whose length field is below the minimum.
    s.write_all(&[b'Q', 0, 0, 0, 2]).await.expect("bad message");
    let errors = errors_until_closed(&mut s).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("C08P01") && errors[0].contains("invalid message from client"),
        "{errors:?}"
    );
}
