//! Cancel requests are routed through pgweir's own keys to the right server; forged keys do
//! nothing.

mod support;

use std::time::{Duration, Instant};

use pgweir::embedded_pg::roles;
use support::proxy::{TestProxyBuilder, sqlstate};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(2).start().await;
    let client = proxy.connect(roles::SCRAM).await;
    let bystander = proxy.connect(roles::SCRAM).await;
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A bystander query runs on the other server and is untouched by the cancel.
    let slow = tokio::spawn(async move { bystander.query_one("select 5::int4 from pg_sleep(0.5)", &[]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel sent");
    let e = sleeper.await.expect("task").expect_err("query cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let row = slow.await.expect("task").expect("bystander unaffected");
    assert_eq!(row.get::<_, i32>(0), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_cancel_key_does_nothing() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let client = proxy.connect(roles::SCRAM).await;
    let sleeper = tokio::spawn(async move { client.query_one("select 9::int4 from pg_sleep(1)", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (pid, secret) in [(1i32, 1i32), (12345, -1), (i32::MAX, 0)] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
        let mut pkt = Vec::new();
        pkt.extend_from_slice(&16i32.to_be_bytes());
        pkt.extend_from_slice(&80877102i32.to_be_bytes());
        pkt.extend_from_slice(&pid.to_be_bytes());
        pkt.extend_from_slice(&secret.to_be_bytes());
        s.write_all(&pkt).await.expect("send forged cancel");
    }
    let row = sleeper
        .await
        .expect("task")
        .expect("query not cancelled by forged keys");
    assert_eq!(row.get::<_, i32>(0), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_an_idle_client_does_not_hit_the_next_user_of_its_server() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let a = proxy.connect(roles::SCRAM).await;
    let b = proxy.connect(roles::SCRAM).await;
    a.query_one("select 1", &[])
        .await
        .expect("a ran a query and released the server");
    let token = a.cancel_token();
    let b_query = tokio::spawn(async move { b.query_one("select 3::int4 from pg_sleep(0.7)", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // a is idle: its cancel must not touch b's query on the shared server.
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel sent");
    let row = b_query.await.expect("task").expect("b's query survives a's cancel");
    assert_eq!(row.get::<_, i32>(0), 3);
}

/// A cancel still reaches a running query when pgweir is at max_client_conn: the CancelRequest's
/// connection is over the limit, but like PostgreSQL at max_connections pgweir acts on it
/// before refusing (it used to answer it 53300 and drop it, just when a saturated proxy needs
/// its cancels); a login over the limit is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_is_acted_on_at_max_client_conn() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg).pool_size(1);
    builder.max_client_conn = 1;
    let proxy = builder.start().await;
    let client = proxy.connect(roles::SCRAM).await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = proxy
        .try_connect(roles::SCRAM, "app")
        .await
        .expect_err("over max_client_conn");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e:?}");
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel sent");
    let e = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("the query ended")
        .expect("task")
        .expect_err("query cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
}
