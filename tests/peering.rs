//! Cancel forwarding between pgweir instances (`listen.peer_id`, `[[peers]]`): a CancelRequest
//! that reaches another instance than the client's is passed to the instance that issued the key.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgweir::config::PeerConfig;
use pgweir::embedded_pg::{EmbeddedPostgres, roles};
use support::proxy::{TestProxy, TestProxyBuilder, direct, eventually, sqlstate};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn peer(proxy: &TestProxy) -> PeerConfig {
    PeerConfig {
        host: "127.0.0.1".to_owned(),
        port: proxy.port(),
    }
}

/// Reloads `proxy` with `peers` (the ports are only known once every instance listens).
fn set_peers(proxy: &TestProxy, peers: BTreeMap<u16, PeerConfig>) {
    let mut config = (**proxy.proxy().context().config.load()).clone();
    config.peers = peers;
    assert!(
        proxy.proxy().context().reload(config).needs_restart.is_empty(),
        "peers change without restart"
    );
}

async fn cancels(proxy: &TestProxy, result: &str) -> u64 {
    proxy
        .metric(&format!("pgweir_cancel_requests_total{{result=\"{result}\"}}"))
        .await
}

/// Runs a long query through `a`, sends its cancel to `b` (as a load balancer might), and
/// returns the query's error.
async fn cancel_on_a_through_b(pg: &EmbeddedPostgres, a: &TestProxy, b: &TestProxy) -> tokio_postgres::Error {
    let client = a.connect(roles::SCRAM).await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    // Running in PostgreSQL, not only linked in A: a cancel that arrives before the backend
    // starts the query is ignored by PostgreSQL, and the test would wait out the sleep.
    let observer = direct(pg, "postgres").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            let n: i64 = observer
                .query_one(
                    "select count(*) from pg_stat_activity where query = 'SELECT pg_sleep(30)' and state = 'active'",
                    &[],
                )
                .await
                .expect("activity")
                .get(0);
            n == 1
        })
        .await,
        "the query is running on A"
    );
    let to_b = TcpStream::connect(b.addr).await.expect("connect to B");
    token
        .cancel_query_raw(to_b, tokio_postgres::NoTls)
        .await
        .expect("cancel sent to B");
    tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancelled in time")
        .expect("task")
        .expect_err("query cancelled")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_the_other_instance_reaches_the_query() {
    let pg = support::postgres();
    let mut a = TestProxyBuilder::new(&pg);
    a.peer_id = 1;
    let a = a.start().await;
    let mut b = TestProxyBuilder::new(&pg);
    b.peer_id = 2;
    let b = b.start().await;
    let peers: BTreeMap<u16, PeerConfig> = [(1, peer(&a)), (2, peer(&b))].into();
    set_peers(&a, peers.clone());
    set_peers(&b, peers);

    let started = Instant::now();
    let e = cancel_on_a_through_b(&pg, &a, &b).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(cancels(&b, "forwarded").await, 1);
    assert!(eventually(Duration::from_secs(5), || async { cancels(&a, "delivered").await == 1 }).await);
}

/// A raw CancelRequest.
async fn send_cancel(proxy: &TestProxy, pid: i32, secret: i32) {
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut packet = Vec::with_capacity(16);
    packet.extend_from_slice(&16i32.to_be_bytes());
    packet.extend_from_slice(&80877102i32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    s.write_all(&packet).await.expect("send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_loops_end_after_three_hops_and_unknown_peers_are_dropped() {
    let pg = support::postgres();
    let mut a = TestProxyBuilder::new(&pg);
    a.peer_id = 1;
    let a = a.start().await;
    // Misconfigured: peer 3 points back at A itself.
    set_peers(&a, [(1, peer(&a)), (3, peer(&a))].into());

    let pid_of_peer = |id: i32| (id << 17) | 12_345;
    send_cancel(&a, pid_of_peer(3), 0x1234_5673).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            cancels(&a, "ttl_exhausted").await == 1 && cancels(&a, "forwarded").await == 3
        })
        .await,
        "three hops, then dropped"
    );
    send_cancel(&a, pid_of_peer(7), 0x1234_5673).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            cancels(&a, "unroutable").await == 1
        })
        .await
    );
    // Nothing kept going round.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cancels(&a, "forwarded").await, 3);

    // The proxy is unharmed.
    let client = a.connect(roles::SCRAM).await;
    assert_eq!(client.query_one("SELECT 1", &[]).await.expect("q").get::<_, i32>(0), 1);
}

/// A peer on the same host may be listed by its Unix-socket directory, as in PgBouncer's
/// `[peers]` (host=/dir): forwarding then goes through the socket file, not TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_is_forwarded_to_a_peer_listed_by_its_unix_socket() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("socket dir");
    let mut a = TestProxyBuilder::new(&pg);
    a.peer_id = 1;
    a.unix_socket_dir = Some(dir.path().to_owned());
    let a = a.start().await;
    let mut b = TestProxyBuilder::new(&pg);
    b.peer_id = 2;
    let b = b.start().await;
    let a_by_socket = PeerConfig {
        host: dir.path().display().to_string(),
        port: a.port(),
    };
    set_peers(&b, [(1, a_by_socket), (2, peer(&b))].into());

    let e = cancel_on_a_through_b(&pg, &a, &b).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    assert_eq!(cancels(&b, "forwarded").await, 1);
    assert_eq!(cancels(&b, "unroutable").await, 0);
}
