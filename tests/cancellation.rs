//! Work that must finish to give a resource back (a pool slot, a cancel in flight) survives
//! client_login_timeout cutting off the connection it runs for. A forwarder in front of
//! PostgreSQL plays a server that accepts and never answers.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgweir::config::DatabaseConfig;
use pgweir::embedded_pg::{EmbeddedPostgres, roles};
use support::proxy::{TestProxyBuilder, sqlstate};
use tokio::net::{TcpListener, TcpStream};

/// A TCP forwarder to PostgreSQL that can hold connections open without answering: all of
/// them (`stall_all`, a PostgreSQL that accepts but does not reply) or only CancelRequests
/// (`stall_cancels`).
struct Forwarder {
    port: u16,
    stall_all: Arc<AtomicBool>,
    stall_cancels: Arc<AtomicBool>,
}

async fn forwarder(pg: &EmbeddedPostgres) -> Forwarder {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the forwarder");
    let port = listener.local_addr().expect("forwarder address").port();
    let target = (pg.host().to_owned(), pg.port());
    let stall_all = Arc::new(AtomicBool::new(false));
    let stall_cancels = Arc::new(AtomicBool::new(false));
    let (all, cancels) = (stall_all.clone(), stall_cancels.clone());
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            if all.load(Ordering::SeqCst) {
                held.push(s);
                continue;
            }
            let target = target.clone();
            let cancels = cancels.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                // Startup packets are at least 8 bytes; wait for them.
                loop {
                    let n = s.peek(&mut first).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    if n >= 8 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let is_cancel = first[..4] == 16i32.to_be_bytes() && first[4..] == 80877102i32.to_be_bytes();
                if is_cancel && cancels.load(Ordering::SeqCst) {
                    // Never answer, never close.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop(s);
                    return;
                }
                let Ok(mut up) = TcpStream::connect((target.0.as_str(), target.1)).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            });
        }
    });
    Forwarder {
        port,
        stall_all,
        stall_cancels,
    }
}

/// A proxy with a 1 s client_login_timeout and a database "fwd" reached through the
/// forwarder (pool of 2, acquire_timeout 2 s, server_connect_timeout 3 s, then `f`).
async fn proxy_via_forwarder(
    pg: &EmbeddedPostgres,
    port: u16,
    f: impl FnOnce(&mut pgweir::config::PoolSettings),
) -> support::proxy::TestProxy {
    let mut b = TestProxyBuilder::new(pg);
    b.client_login_timeout = Duration::from_secs(1);
    let mut pool = b.pool.clone();
    pool.pool_size = 2;
    pool.acquire_timeout = Duration::from_secs(2);
    pool.server_connect_timeout = Duration::from_secs(3);
    f(&mut pool);
    b.extra_databases.push((
        "fwd".to_owned(),
        DatabaseConfig {
            host: pg.host().to_owned(),
            port,
            dbname: "app".to_owned(),
            server_user: None,
            server_password: None,
            pool,
        },
    ));
    b.start().await
}

/// Logins whose client_login_timeout fires while the pool's first connect (for the server's
/// parameters) hangs must not leak the pool slots those connects hold: once PostgreSQL answers
/// again, the pool serves logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_timeout_during_the_pools_first_connect_leaks_no_pool_slot() {
    let pg = support::postgres();
    let fwd = forwarder(&pg).await;
    let proxy = proxy_via_forwarder(&pg, fwd.port, |_| {}).await;

    // PostgreSQL accepts but does not answer (overloaded, or a network path that black-holes).
    fwd.stall_all.store(true, Ordering::SeqCst);
    let logins: Vec<_> = (0..2)
        .map(|_| {
            let s = proxy.conn_str(roles::SCRAM, "fwd");
            tokio::spawn(async move { tokio_postgres::connect(&s, tokio_postgres::NoTls).await.map(|_| ()) })
        })
        .collect();
    for l in logins {
        assert!(
            l.await.expect("login task").is_err(),
            "login should time out while PostgreSQL is silent"
        );
    }
    // PostgreSQL is fine again. Wait past server_connect_timeout: any connect still genuinely
    // in progress would have ended (and released its slot) by now.
    fwd.stall_all.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pool = proxy.pool_where(|k| k.database == "fwd").expect("the forwarded pool");
    let snap = pool.snapshot();
    eprintln!(
        "after the stall: {snap:?}, connecting gauge = {}",
        pool.stats().connecting.load(Ordering::Relaxed)
    );
    let started = Instant::now();
    let r = proxy.try_connect(roles::SCRAM, "fwd").await;
    match &r {
        Ok(_) => {}
        Err(e) => eprintln!(
            "login after recovery failed after {:?}: {e:?} ({:?})",
            started.elapsed(),
            sqlstate(e)
        ),
    }
    assert_eq!(
        snap.open, 0,
        "no server connection exists, yet the pool counts {} open",
        snap.open
    );
    assert!(
        r.is_ok(),
        "pool wedged: PostgreSQL is reachable but the pool has no free slot"
    );
}

/// A CancelRequest whose forwarding to PostgreSQL outlives client_login_timeout must still
/// finish its bookkeeping: otherwise the target session waits for it for ever at the end of its
/// transaction, holding the pool's only server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_cut_off_by_the_login_timeout_does_not_wedge_its_session() {
    let pg = support::postgres();
    let fwd = forwarder(&pg).await;
    let proxy = proxy_via_forwarder(&pg, fwd.port, |p| {
        p.pool_size = 1;
        p.acquire_timeout = Duration::from_secs(12);
    })
    .await;
    let a = proxy.try_connect(roles::SCRAM, "fwd").await.expect("a connects");
    let bee = proxy.try_connect(roles::SCRAM, "fwd").await.expect("b connects");
    fwd.stall_cancels.store(true, Ordering::SeqCst);

    let token = a.cancel_token();
    let a = Arc::new(a);
    let a2 = a.clone();
    let q = tokio::spawn(async move { a2.simple_query("select pg_sleep(1.5)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The cancel reaches pgweir; pgweir's forwarding to PostgreSQL stalls (PostgreSQL slow to
    // accept, or unreachable), and the login timeout drops it.
    let _ = tokio::time::timeout(Duration::from_secs(3), token.cancel_query(tokio_postgres::NoTls)).await;
    let _ = q.await.expect("query task");
    // Even send_cancel's own 5 s read timeout has long passed after 12 s: the server must be free.
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(14), bee.simple_query("select 1")).await;
    eprintln!("b after {:?}: {r:?}", started.elapsed());
    assert!(matches!(r, Ok(Ok(_))), "b never got the pool's only server");
    let r = tokio::time::timeout(Duration::from_secs(3), a.simple_query("select 1")).await;
    assert!(matches!(r, Ok(Ok(_))), "a hangs: its session is stuck in end_link");
}

/// PostgreSQL closes a cancel connection once it has signalled the backend. A cancel it never
/// confirms may still be acted on later, and must not interrupt the next client's query: the
/// server it aimed at is closed rather than handed on. A confirmed cancel keeps the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_an_unconfirmed_cancel_aimed_at_is_closed_not_reused() {
    let pg = support::postgres();
    let fwd = forwarder(&pg).await;
    let proxy = proxy_via_forwarder(&pg, fwd.port, |p| {
        p.pool_size = 1;
        p.acquire_timeout = Duration::from_secs(12);
    })
    .await;
    let a = Arc::new(proxy.try_connect(roles::SCRAM, "fwd").await.expect("a connects"));
    let bee = proxy.try_connect(roles::SCRAM, "fwd").await.expect("b connects");
    let backend = |c: Arc<tokio_postgres::Client>| async move {
        c.query_one("select pg_backend_pid()", &[])
            .await
            .expect("backend pid")
            .get::<_, i32>(0)
    };
    let first = backend(a.clone()).await;

    // A confirmed cancel: the server goes on serving the pool.
    let (slept, ()) = tokio::join!(a.simple_query("select pg_sleep(30)"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.cancel_token()
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel");
    });
    assert_eq!(sqlstate(&slept.expect_err("cancelled")).as_deref(), Some("57014"));
    let bee = Arc::new(bee);
    assert_eq!(backend(bee.clone()).await, first, "a confirmed cancel keeps the server");

    // An unconfirmed one: the forwarder holds the CancelRequest and never closes it, as a
    // PostgreSQL that is slow to accept would.
    fwd.stall_cancels.store(true, Ordering::SeqCst);
    let a2 = a.clone();
    let q = tokio::spawn(async move { a2.simple_query("select pg_sleep(1.5)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        a.cancel_token().cancel_query(tokio_postgres::NoTls),
    )
    .await;
    q.await
        .expect("query task")
        .expect("the cancel never reached PostgreSQL");
    let next = tokio::time::timeout(Duration::from_secs(14), backend(bee.clone()))
        .await
        .expect("b gets the pool's server once the cancel is given up");
    assert_ne!(
        next, first,
        "a server an unconfirmed cancel aimed at was handed to another client"
    );
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(3), a.simple_query("select 1"))
            .await
            .map(|r| r.is_ok()),
        Ok(true),
        "a goes on"
    );
}
