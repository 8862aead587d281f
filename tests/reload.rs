//! Reloading the configuration (SIGHUP, POST /api/reload) never drops a connected client:
//! clients inside a transaction keep their server, idle clients keep working, and queries in
//! flight finish. (A real SIGHUP to the binary: tests/cli.rs.)

mod support;

use std::path::Path;
use std::time::Duration;

use pgweir::embedded_pg::{EmbeddedPostgres, roles};
use support::proxy::{TestProxy, backend_pid, eventually};

fn write_config(path: &Path, pg: &EmbeddedPostgres, listen: &str, admin: &str, pool: &str) {
    let (user, password) = roles::SCRAM;
    std::fs::write(
        path,
        format!(
            "[listen]\naddr = \"{listen}\"\n\n[admin]\naddr = \"{admin}\"\n\n[databases.app]\nport = {}\n{pool}\n\n[users.{user}]\npassword = \"{password}\"\n",
            pg.port()
        ),
    )
    .expect("write config");
}

/// Starts pgweir from a configuration file written by [`write_config`] with `pool` in the
/// database's section; returns the proxy and the file's path for rewriting.
async fn start_from_file(pg: &EmbeddedPostgres, dir: &Path, pool: &str) -> (TestProxy, std::path::PathBuf) {
    let path = dir.join("pgweir.toml");
    write_config(&path, pg, "127.0.0.1:0", "127.0.0.1:0", pool);
    let config = pgweir::config::Config::load(&path).expect("valid config");
    let proxy = pgweir::app::Proxy::start_with_path(config, Some(path.clone()))
        .await
        .expect("start");
    (TestProxy::wrap(proxy), path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_every_client_connected_and_working() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, path) = start_from_file(&pg, dir.path(), "pool_size = 4").await;

    let in_tx_a = proxy.connect(roles::SCRAM).await;
    let in_tx_b = proxy.connect(roles::SCRAM).await;
    let idle = proxy.connect(roles::SCRAM).await;
    let busy = proxy.connect(roles::SCRAM).await;
    for c in [&in_tx_a, &in_tx_b] {
        c.batch_execute("begin; create temp table t (x int) on commit drop; insert into t values (1)")
            .await
            .expect("transaction started");
    }
    let pid_a = backend_pid(&in_tx_a).await;
    let pid_b = backend_pid(&in_tx_b).await;
    idle.query_one("select 1", &[]).await.expect("idle client worked");
    let in_flight = tokio::spawn(async move {
        let row = busy.query_one("select 7::int4 from pg_sleep(1)", &[]).await;
        (busy, row)
    });
    let connected = proxy
        .proxy()
        .context()
        .connected
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(connected, 4);

    // A smaller pool than the servers now lent out, and other changed settings: the same code
    // path SIGHUP takes.
    write_config(
        &path,
        &pg,
        "127.0.0.1:0",
        "127.0.0.1:0",
        "pool_size = 2\nacquire_timeout = \"3s\"\nserver_check_delay = \"1s\"",
    );
    let reloaded = proxy.proxy().context().reload_from_file().expect("reload accepted");
    // Port 0 in the file is the same value as before, so nothing needs a restart.
    assert!(reloaded.needs_restart.is_empty(), "{reloaded:?}");
    assert!(reloaded.removed_pools.is_empty(), "{reloaded:?}");
    assert_eq!(proxy.proxy().context().pools.all()[0].settings().pool_size, 2);

    // Transactions go on on the same server connection, with their state intact.
    for (c, pid) in [(&in_tx_a, pid_a), (&in_tx_b, pid_b)] {
        assert_eq!(backend_pid(c).await, pid, "the transaction kept its server");
        let n: i64 = c
            .query_one("select count(*) from t", &[])
            .await
            .expect("temp table still there")
            .get(0);
        assert_eq!(n, 1);
        c.batch_execute("commit").await.expect("commit after reload");
    }
    let (busy, row) = in_flight.await.expect("task");
    assert_eq!(row.expect("in-flight query finished").get::<_, i32>(0), 7);
    busy.query_one("select 1", &[]).await.expect("busy client still works");
    idle.query_one("select 1", &[]).await.expect("idle client still works");
    for c in [&in_tx_a, &in_tx_b] {
        c.query_one("select 1", &[]).await.expect("still works after commit");
    }
    assert_eq!(
        proxy
            .proxy()
            .context()
            .connected
            .load(std::sync::atomic::Ordering::Relaxed),
        4,
        "nobody was disconnected"
    );
    // The surplus servers are closed as they come back, so the pool settles at its new size.
    let pools = proxy.proxy().context().pools.all();
    assert!(
        eventually(Duration::from_secs(5), || async { pools[0].snapshot().open <= 2 }).await,
        "pool shrinks to the reloaded size"
    );
    proxy
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("new logins work");
}

/// A connected session reads its pool's settings through a cache: a reload must still reach
/// it on its next transaction, without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_client_follows_reloaded_pool_settings() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, path) = start_from_file(&pg, dir.path(), "session_state = \"allow\"").await;
    let client = proxy.connect(roles::SCRAM).await;
    client
        .batch_execute("set search_path = public")
        .await
        .expect("allowed before the reload");

    write_config(&path, &pg, "127.0.0.1:0", "127.0.0.1:0", "session_state = \"reject\"");
    proxy.proxy().context().reload_from_file().expect("reload accepted");

    let e = client
        .batch_execute("set search_path = public")
        .await
        .expect_err("rejected after the reload, on the same connection");
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e:?}");
    client
        .query_one("select 1", &[])
        .await
        .expect("connection still usable");
}

/// Timeouts are read at the start of every transaction: a client connected before a reload
/// that adds idle_transaction_timeout is still freed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_idle_transaction_timeout_reaches_a_connected_client() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, path) = start_from_file(&pg, dir.path(), "").await;
    let (client, conn_task) = proxy.connect_watched(roles::SCRAM).await;
    client
        .query_one("select 1", &[])
        .await
        .expect("served before the reload");

    write_config(
        &path,
        &pg,
        "127.0.0.1:0",
        "127.0.0.1:0",
        "idle_transaction_timeout = \"300ms\"",
    );
    proxy.proxy().context().reload_from_file().expect("reload accepted");

    client.batch_execute("begin").await.expect("begin");
    let result = tokio::time::timeout(Duration::from_secs(10), conn_task)
        .await
        .expect("the connection is ended by the reloaded timeout")
        .expect("task");
    let e = result.expect_err("connection closed with an error");
    assert_eq!(e.code().map(|c| c.code()), Some("25P03"), "{e:?}");
}

/// A live resize through the admin API is an operator's decision: a reload that changes other
/// settings of the pool keeps it; a reload that changes pool_size in the file replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_resize_survives_reloads_until_pool_size_itself_is_edited() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, path) = start_from_file(&pg, dir.path(), "pool_size = 3").await;
    let client = proxy.connect(roles::SCRAM).await;
    client.query_one("select 1", &[]).await.expect("pool exists");
    let size = |body: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        v["size"].as_u64().expect("size")
    };
    let user = roles::SCRAM.0;
    let (status, body) = proxy
        .admin(
            "PUT",
            &format!("/api/pools/app/{user}/size"),
            None,
            Some(r#"{"size": 7}"#),
        )
        .await;
    assert_eq!((status, size(&body)), (200, 7), "{body}");

    // Another setting of the same pool changes: the live size stays.
    write_config(
        &path,
        &pg,
        "127.0.0.1:0",
        "127.0.0.1:0",
        "pool_size = 3\nquery_timeout = \"30s\"",
    );
    proxy.proxy().context().reload_from_file().expect("reload accepted");
    let pool = proxy.pool_where(|k| k.user == user).expect("the pool");
    assert_eq!(
        pool.settings().query_timeout,
        Some(Duration::from_secs(30)),
        "reload applied"
    );
    assert_eq!(
        pool.snapshot().size,
        7,
        "a reload of other settings undid the live resize"
    );

    // pool_size itself is edited: the file wins.
    write_config(
        &path,
        &pg,
        "127.0.0.1:0",
        "127.0.0.1:0",
        "pool_size = 4\nquery_timeout = \"30s\"",
    );
    proxy.proxy().context().reload_from_file().expect("reload accepted");
    assert_eq!(pool.snapshot().size, 4);
    client.query_one("select 1", &[]).await.expect("still served");
}

/// A reload that removes a database takes its pools out (PgBouncer drops their clients at
/// once, transactions and all): a client outside a transaction is told at once, one waiting
/// for a server too, one inside finishes it and is told then, the pool's server is closed, new
/// logins are refused, and other databases' clients are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_database_ends_its_clients_at_their_transactions_end() {
    use support::proxy::{message, sqlstate};
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("tempdir");
    let two = format!(
        "pool_size = 4\n\n[databases.gone]\nport = {}\ndbname = \"app\"\npool_size = 1\nacquire_timeout = \"60s\"",
        pg.port()
    );
    let (proxy, path) = start_from_file(&pg, dir.path(), &two).await;
    let connect_gone = || async {
        let (client, conn) = tokio_postgres::connect(&proxy.conn_str(roles::SCRAM, "gone"), tokio_postgres::NoTls)
            .await
            .expect("connect to gone");
        (client, tokio::spawn(conn))
    };
    let (idle, idle_task) = connect_gone().await;
    let (in_tx, in_tx_task) = connect_gone().await;
    let (waiter, waiter_task) = connect_gone().await;
    let other = proxy.connect(roles::SCRAM).await;
    // The pool's one server: used by the idle client, then held by the transaction.
    let pid = backend_pid(&idle).await;
    in_tx
        .batch_execute("begin; create temp table t (x int) on commit drop")
        .await
        .expect("transaction started");
    assert_eq!(backend_pid(&in_tx).await, pid);
    let waiting = tokio::spawn(async move { waiter.query_one("select 1", &[]).await.map(|_| ()) });
    let gone_pool = proxy.pool_where(|k| k.database == "gone").expect("pool");
    assert!(
        eventually(Duration::from_secs(10), || async { gone_pool.snapshot().waiting == 1 }).await,
        "the third client waits for the server"
    );
    drop(gone_pool);

    write_config(&path, &pg, "127.0.0.1:0", "127.0.0.1:0", "pool_size = 4");
    let (status, body) = proxy.admin("POST", "/api/reload", None, None).await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        body["removed_pools"],
        serde_json::json!([format!("gone/{}", roles::SCRAM.0)]),
        "{body}"
    );

    let ended = |task: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>| async move {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("connection ended")
            .expect("task")
            .expect_err("ended by pgweir")
    };
    let e = ended(idle_task).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    assert!(message(&e).contains("\"gone\" was removed"), "{e:?}");
    // Told the same, not first that the pool closed.
    let e = waiting.await.expect("task").expect_err("no server for the waiter");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    assert!(message(&e).contains("\"gone\" was removed"), "{e:?}");
    tokio::time::timeout(Duration::from_secs(10), waiter_task)
        .await
        .expect("the waiter's connection ended")
        .expect("task")
        .expect_err("ended by pgweir");

    // The open transaction goes on on its server and commits.
    in_tx.batch_execute("insert into t values (1)").await.expect("insert");
    let n: i64 = in_tx
        .query_one("select count(*) from t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    in_tx.batch_execute("commit").await.expect("commit");
    let e = ended(in_tx_task).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");

    let e = proxy
        .try_connect(roles::SCRAM, "gone")
        .await
        .expect_err("the database is gone");
    assert_eq!(sqlstate(&e).as_deref(), Some("3D000"), "{e:?}");
    other.query_one("select 1", &[]).await.expect("app is untouched");
    let (_, pools) = proxy.admin("GET", "/api/pools", None, None).await;
    assert!(!pools.contains("\"gone\""), "{pools}");
    assert_eq!(
        proxy
            .metric("pgweir_client_disconnects_total{reason=\"database_removed\"}")
            .await,
        3
    );
    // Its server closed when returned.
    assert!(
        support::proxy::backend_gone(&pg, pid).await,
        "server {pid} of the removed database still open"
    );
}

/// A reload names every setting it cannot apply without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_each_setting_that_needs_a_restart() {
    let pg = support::postgres();
    let proxy = support::proxy::TestProxyBuilder::new(&pg).start().await;
    let ctx = proxy.proxy().context();
    let mut config = (**ctx.config.load()).clone();
    config.listen.max_client_conn += 1;
    config.listen.peer_id += 1;
    config.listen.event_loop = !config.listen.event_loop;
    config.listen.workers += 1;
    config.listen.tcp_keepalive = Some(config.listen.tcp_keepalive.unwrap_or_default() + Duration::from_secs(1));
    let reloaded = ctx.reload(config);
    assert_eq!(
        reloaded.needs_restart,
        [
            "listen.max_client_conn",
            "listen.peer_id",
            "listen.event_loop",
            "listen.workers",
            "listen.tcp_keepalive"
        ],
    );
    proxy
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("still serving");
}
