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
    let (victim, conn) = tokio_postgres::connect(&proxy.conn_str(roles::SCRAM, "app"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn_task = tokio::spawn(conn);
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
    let (victim, conn) = tokio_postgres::connect(&proxy.conn_str(roles::SCRAM, "app"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn_task = tokio::spawn(conn);
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
