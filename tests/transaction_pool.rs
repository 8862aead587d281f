//! Transaction pooling against a real PostgreSQL: bounded backends, pinning inside
//! transactions, pipelining, COPY, notices, errors mid-pipeline, session mode.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use pgweir::config::PoolMode;
use pgweir::embedded_pg::roles;
use support::proxy::{TestProxyBuilder, direct};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_query_through_the_proxy() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).start().await;
    let client = proxy.connect(roles::SCRAM).await;
    let row = client
        .query_one("select 1::int4 + $1::int4", &[&41i32])
        .await
        .expect("query");
    assert_eq!(row.get::<_, i32>(0), 42);
    let rows = client
        .simple_query("select 'a'; select 'b'")
        .await
        .expect("simple query");
    let data_rows = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(data_rows, 2, "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_ten_backends() {
    let pg = support::postgres();
    let proxy = Arc::new(TestProxyBuilder::new(&pg).pool_size(10).start().await);
    let observer = direct(&pg, "postgres").await;
    let max_seen = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let max_seen = max_seen.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let row = observer
                    .query_one(
                        "select count(*) from pg_stat_activity where usename = $1 and datname = 'app'",
                        &[&roles::SCRAM.0],
                    )
                    .await
                    .expect("count backends");
                max_seen.fetch_max(row.get::<_, i64>(0), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let tasks = (0..500).map(|i| {
        let proxy = proxy.clone();
        async move {
            let client = proxy.connect(roles::SCRAM).await;
            for j in 0..3 {
                let row = client
                    .query_one("select $1::int4 * 1000 + $2::int4, pg_sleep(0.001)::text", &[&i, &j])
                    .await
                    .expect("query through the pool");
                assert_eq!(row.get::<_, i32>(0), i * 1000 + j, "a client got someone else's row");
            }
        }
    });
    join_all(tasks).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.await.expect("watcher");
    let max = max_seen.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (1..=10).contains(&max),
        "pg_stat_activity showed {max} backends for a pool of 10"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_is_pinned_to_one_backend() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(3).start().await;
    let a = proxy.connect(roles::SCRAM).await;
    let b = proxy.connect(roles::SCRAM).await;
    a.batch_execute("begin").await.expect("begin");
    let pid: i32 = a.query_one("select pg_backend_pid()", &[]).await.expect("pid").get(0);
    // Another client's traffic in between must not take a's server.
    for _ in 0..5 {
        let other: i32 = b.query_one("select pg_backend_pid()", &[]).await.expect("pid").get(0);
        assert_ne!(other, pid, "b was given the server a holds inside its transaction");
        let again: i32 = a.query_one("select pg_backend_pid()", &[]).await.expect("pid").get(0);
        assert_eq!(again, pid, "a's transaction moved to another backend");
    }
    a.batch_execute("commit").await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_and_errors_mid_pipeline() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(2).start().await;
    let client = proxy.connect(roles::SCRAM).await;
    // tokio-postgres pipelines concurrent queries on one connection: many Syncs in flight.
    let futures = (0..200).map(|i| {
        let client = &client;
        async move {
            if i % 17 == 0 {
                let e = client.query_one("select 1/0", &[]).await.expect_err("division by zero");
                assert_eq!(support::proxy::sqlstate(&e).as_deref(), Some("22012"));
            } else {
                let row = client
                    .query_one("select $1::int4", &[&i])
                    .await
                    .expect("pipelined query");
                assert_eq!(row.get::<_, i32>(0), i);
            }
        }
    });
    join_all(futures).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let client = proxy.connect(roles::SCRAM).await;
    client
        .batch_execute("create table copy_t (id int, name text)")
        .await
        .expect("create");
    let sink = client
        .copy_in::<_, bytes::Bytes>("copy copy_t from stdin")
        .await
        .expect("copy in starts");
    let data: String = (0..10_000).map(|i| format!("{i}\tname {i}\n")).collect();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(bytes::Bytes::from(data.clone())).await.expect("copy data");
    let n = sink.finish().await.expect("copy done");
    assert_eq!(n, 10_000);
    // The server must be back in the pool (pool_size 1): another client gets it.
    let other = proxy.connect(roles::SCRAM).await;
    let count: i64 = other
        .query_one("select count(*) from copy_t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 10_000);
    let stream = client
        .copy_out("copy (select * from copy_t order by id) to stdout")
        .await
        .expect("copy out");
    use futures_util::TryStreamExt;
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.expect("copy out data");
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).expect("utf8"), data);
    let again: i64 = other
        .query_one("select count(*) from copy_t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(again, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_the_client() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).start().await;
    let (client, mut conn) = tokio_postgres::connect(&proxy.conn_str(roles::SCRAM, "app"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(msg)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = msg {
                let _ = tx.send(n.message().to_owned());
            }
        }
    });
    client
        .batch_execute("do $$ begin raise notice 'hello from plpgsql'; end $$")
        .await
        .expect("do block");
    let notice = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notice in time");
    assert_eq!(notice.as_deref(), Some("hello from plpgsql"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_one_backend_and_resets_it() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .mode(PoolMode::Session)
        .pool_size(1)
        .start()
        .await;
    let a = proxy.connect(roles::SCRAM).await;
    let pid1: i32 = a.query_one("select pg_backend_pid()", &[]).await.expect("pid").get(0);
    a.batch_execute("set search_path = nowhere").await.expect("set");
    let pid2: i32 = a.query_one("select pg_backend_pid()", &[]).await.expect("pid").get(0);
    assert_eq!(pid1, pid2);
    drop(a);
    // pool_size 1: the next client gets the same backend, reset by DISCARD ALL.
    let b = proxy.connect(roles::SCRAM).await;
    let row = b
        .query_one("select pg_backend_pid(), current_setting('search_path')", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, i32>(0), pid1);
    assert_eq!(row.get::<_, String>(1), "\"$user\", public");
}
