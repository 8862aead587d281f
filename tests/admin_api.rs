//! The admin HTTP API and /metrics against a live proxy and a real PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use pgweir::embedded_pg::roles;
use support::proxy::{TestProxyBuilder, backend_pid, eventually};

fn json(body: &str) -> serde_json::Value {
    // Responses may be chunked; the JSON document is the line that starts with { or [.
    let doc = body
        .lines()
        .find(|l| l.starts_with('{') || l.starts_with('['))
        .unwrap_or(body);
    serde_json::from_str(doc).unwrap_or_else(|e| panic!("bad JSON {body:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_pools_and_metrics() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(1)
        .with_pool(|p| p.acquire_timeout = Duration::from_millis(200))
        .start()
        .await;
    let (status, body) = proxy.admin("GET", "/health", None, None).await;
    assert_eq!(status, 200, "{body}");
    let client = proxy.connect(roles::SCRAM).await;
    client.query_one("select 1", &[]).await.expect("query");
    let (status, body) = proxy.admin("GET", "/ready", None, None).await;
    assert_eq!(status, 200, "{body}");
    // Exhaust the pool: a waiter shows in the gauges while it waits, then times out, and that
    // shows in the pool list and metrics.
    client.batch_execute("begin").await.expect("hold");
    let other = proxy.connect(roles::SCRAM).await;
    let waiting = tokio::spawn(async move {
        let r = other.query_one("select 1", &[]).await;
        (other, r)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, during) = proxy.admin("GET", "/metrics", None, None).await;
    assert!(
        during.contains("pgweir_clients_waiting{database=\"app\",user=\"app_scram\"} 1"),
        "{during}"
    );
    assert!(
        during.contains("pgweir_pool_clients{database=\"app\",user=\"app_scram\",state=\"waiting\"} 1"),
        "{during}"
    );
    let (_other, r) = waiting.await.expect("task");
    r.expect_err("acquire timeout");
    let (status, body) = proxy.admin("GET", "/api/pools", None, None).await;
    assert_eq!(status, 200, "{body}");
    let pools = json(&body);
    let pool = &pools[0];
    assert_eq!(pool["database"], "app");
    assert_eq!(pool["user"], roles::SCRAM.0);
    assert_eq!(pool["size"], 1);
    assert_eq!(pool["servers"]["active"], 1);
    assert_eq!(pool["acquire_timeouts"], 1);
    assert_eq!(pool["utilisation_percent"], 100.0);
    assert_eq!(pool["clients"]["active"], 1, "{pool}");
    assert_eq!(pool["clients"]["idle"], 1, "{pool}");
    let (_, body) = proxy.admin("GET", "/ready", None, None).await;
    assert_eq!(json(&body)["checks"][0]["level"], "critical", "{body}");
    let (status, metrics) = proxy.admin("GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    for needle in [
        "pgweir_pool_size{database=\"app\",user=\"app_scram\"} 1",
        "pgweir_server_connections{database=\"app\",user=\"app_scram\",state=\"active\"} 1",
        "pgweir_acquire_timeouts_total{database=\"app\",user=\"app_scram\"} 1",
        "pgweir_client_connections 2",
        "# EOF",
    ] {
        assert!(metrics.contains(needle), "{needle:?} missing from\n{metrics}");
    }
    // Histograms: every acquisition (including the timed-out one) and every held server.
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
    };
    let acquires = sample("pgweir_acquire_wait_seconds_count{");
    assert!(acquires >= 3.0, "{acquires}");
    assert_eq!(
        sample("pgweir_acquire_wait_seconds_bucket{le=\"+Inf\""),
        acquires,
        "+Inf bucket = count"
    );
    assert!(
        sample("pgweir_acquire_wait_seconds_sum{") >= 0.2,
        "the 200 ms timeout is in the sum"
    );
    assert!(sample("pgweir_transaction_duration_seconds_count{") >= 2.0);
    assert!(
        sample("pgweir_queries_total{") >= 1.0,
        "folded when each transaction ends"
    );
    assert!(sample("pgweir_client_bytes_total{database=\"app\",user=\"app_scram\",direction=\"in\"}") > 0.0);
    assert!(sample("pgweir_client_bytes_total{database=\"app\",user=\"app_scram\",direction=\"out\"}") > 0.0);
    assert!(
        metrics.contains("pgweir_client_disconnects_total{reason=\"normal\"}"),
        "{metrics}"
    );
    assert!(sample("pgweir_transactions_total{") >= 1.0);
    assert_eq!(sample("pgweir_pool_utilization_ratio{"), 1.0);
    assert!(sample("pgweir_query_duration_seconds_count{") >= 1.0);
    for needle in [
        "pgweir_server_connections{database=\"app\",user=\"app_scram\",state=\"connecting\"} 0",
        "pgweir_server_connections_closed_total{database=\"app\",user=\"app_scram\",reason=\"dirty\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
    client.batch_execute("commit").await.expect("commit");
    let (status, _) = proxy.admin("GET", "/nope", None, None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_under_load_serves_waiters_at_once() {
    let pg = support::postgres();
    let proxy = std::sync::Arc::new(
        TestProxyBuilder::new(&pg)
            .pool_size(1)
            .with_pool(|p| p.acquire_timeout = Duration::from_secs(20))
            .start()
            .await,
    );
    let holder = proxy.connect(roles::SCRAM).await;
    holder.batch_execute("begin").await.expect("hold the only server");
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let client = proxy.connect(roles::SCRAM).await;
        waiters.push(tokio::spawn(async move {
            client.simple_query("select 1").await.map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let path = format!("/api/pools/app/{}/size", roles::SCRAM.0);
    let (status, body) = proxy.admin("PUT", &path, None, Some("{\"size\": 4}")).await;
    assert_eq!(status, 200, "{body}");
    for w in waiters {
        w.await.expect("task").expect("waiter served after the resize");
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    let (status, _) = proxy.admin("PUT", &path, None, Some("{\"size\": 0}")).await;
    assert_eq!(status, 400);
    // Shrinking retires idle connections.
    holder.batch_execute("commit").await.expect("commit");
    let (status, _) = proxy.admin("PUT", &path, None, Some("{\"size\": 1}")).await;
    assert_eq!(status, 200);
    let p = proxy.clone();
    assert!(
        eventually(Duration::from_secs(3), || {
            let p = p.clone();
            async move {
                let (_, body) = p.admin("GET", "/api/pools", None, None).await;
                json(&body)[0]["servers"]["open"] == 1
            }
        })
        .await
    );
}

/// A paused pool opens no min_pool_size connections (the operator is taking its server out of
/// use); resumed, it warms up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_pool_is_not_warmed_up() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(3)
        .with_pool(|p| p.min_pool_size = 2)
        .start()
        .await;
    proxy
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("pool exists");
    let open = |proxy: &support::proxy::TestProxy| {
        proxy
            .proxy()
            .context()
            .pools
            .all()
            .iter()
            .map(|p| p.snapshot().open)
            .sum::<usize>()
    };
    assert!(
        eventually(Duration::from_secs(5), || async { open(&proxy) == 2 }).await,
        "min_pool_size not reached: {}",
        open(&proxy)
    );
    let base = format!("/api/pools/app/{}", roles::SCRAM.0);
    let (status, body) = proxy.admin("POST", &format!("{base}/pause"), None, None).await;
    assert_eq!(status, 200, "{body}");
    for pid in proxy.proxy().context().pools.all()[0]
        .idle_servers()
        .into_iter()
        .map(|(pid, _, _)| pid)
    {
        let (status, body) = proxy
            .admin("POST", &format!("/api/servers/{pid}/kill"), None, None)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // Maintenance runs every second here.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(open(&proxy), 0, "a paused pool opened connections");
    let (status, body) = proxy.admin("POST", &format!("{base}/pause"), None, None).await;
    assert_eq!(json(&body)["drained"], true, "{status} {body}");
    let (status, _) = proxy.admin("POST", &format!("{base}/resume"), None, None).await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(5), || async { open(&proxy) == 2 }).await,
        "not warmed up after resume: {}",
        open(&proxy)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_queues_new_transactions_until_resume() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(2)
        .with_pool(|p| p.acquire_timeout = Duration::from_secs(20))
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    client.query_one("select 1", &[]).await.expect("pool exists");
    let base = format!("/api/pools/app/{}", roles::SCRAM.0);
    // Pause waits for a transaction in progress to finish.
    let in_tx = proxy.connect(roles::SCRAM).await;
    in_tx.batch_execute("begin").await.expect("begin");
    let proxy = std::sync::Arc::new(proxy);
    let p = proxy.clone();
    let pause_path = format!("{base}/pause");
    let pausing = tokio::spawn(async move { p.admin("POST", &pause_path, None, None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pausing.is_finished(), "pause answered while a transaction was running");
    in_tx
        .batch_execute("commit")
        .await
        .expect("the running transaction may finish");
    let (status, body) = pausing.await.expect("task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["paused"], true);
    assert_eq!(json(&body)["drained"], true);
    let (status, _) = proxy.admin("GET", "/ready", None, None).await;
    assert_eq!(status, 503, "a paused pool is not ready");
    let q = tokio::spawn(async move {
        client
            .query_one("select 5::int4", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!q.is_finished(), "a query ran while the pool was paused");
    let (status, _) = proxy.admin("POST", &format!("{base}/resume"), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(q.await.expect("task").expect("runs after resume"), 5);
    let (status, _) = proxy.admin("POST", "/api/pools/nope/nobody/pause", None, None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_need_the_token_when_one_is_configured() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg);
    builder.admin_token = Some("a-very-long-admin-token".to_owned());
    let proxy = builder.start().await;
    proxy
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("pool exists");
    let path = format!("/api/pools/app/{}/pause", roles::SCRAM.0);
    let (status, _) = proxy.admin("POST", &path, None, None).await;
    assert_eq!(status, 401);
    let (status, _) = proxy.admin("POST", &path, Some("wrong-token-wrong-token"), None).await;
    assert_eq!(status, 401);
    let (status, _) = proxy.admin("POST", &path, Some("a-very-long-admin-token"), None).await;
    assert_eq!(status, 200);
    // Reads stay open.
    let (status, _) = proxy.admin("GET", "/api/pools", None, None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_servers_clients_and_kill() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(2).start().await;
    let conn = format!("{} application_name=leaker", proxy.conn_str(roles::SCRAM, "app"));
    let (leaker, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let leaker_task = tokio::spawn(c);
    leaker
        .batch_execute("begin; select 1")
        .await
        .expect("leaker holds a server");
    let idle = proxy.connect(roles::SCRAM).await;
    idle.query_one("select 1", &[]).await.expect("idle client ran a query");
    let pid: i32 = {
        let direct = support::proxy::direct(&pg, "postgres").await;
        direct
            .query_one(
                "select pid from pg_stat_activity where usename = 'app_scram' and state = 'idle in transaction'",
                &[],
            )
            .await
            .expect("the leaker's backend")
            .get(0)
    };
    // The idle client has its reply, but the proxy marks it idle just after sending it: on a
    // loaded machine the first look can still see it holding its server.
    let path = format!("/api/holders?pool=app/{}", roles::SCRAM.0);
    let deadline = Instant::now() + Duration::from_secs(2);
    let holders = loop {
        let (status, body) = proxy.admin("GET", &path, None, None).await;
        assert_eq!(status, 200, "{body}");
        let holders = json(&body);
        match holders.as_array().map(Vec::len) {
            Some(1) => break holders,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            n => panic!("{n:?} holders, expected the leaker alone: {body}"),
        }
    };
    assert_eq!(holders[0]["application_name"], "leaker");
    assert_eq!(
        holders[0]["server_pid"], pid,
        "the pid pg_stat_activity shows links to the client"
    );
    let client_id = holders[0]["id"].as_u64().expect("id");
    let (_, body) = proxy.admin("GET", "/api/servers", None, None).await;
    let servers = json(&body);
    let held = servers
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["pid"] == pid)
        .expect("held server listed");
    assert_eq!(held["client"]["id"], client_id);
    let (_, body) = proxy.admin("GET", "/api/clients", None, None).await;
    assert_eq!(json(&body).as_array().map(Vec::len), Some(2), "{body}");
    // Kill the leaker through the pid a DBA sees: its transaction is rolled back.
    let (status, body) = proxy
        .admin("POST", &format!("/api/servers/{pid}/kill"), None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    let ended = tokio::time::timeout(Duration::from_secs(5), leaker_task)
        .await
        .expect("leaker disconnected")
        .expect("task");
    let e = ended.expect_err("killed");
    assert_eq!(support::proxy::sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    let (status, _) = proxy.admin("POST", "/api/clients/999999/kill", None, None).await;
    assert_eq!(status, 404);
    let (status, _) = proxy.admin("GET", "/api/holders?pool=nonsense", None, None).await;
    assert_eq!(status, 400);
    idle.query_one("select 1", &[]).await.expect("other clients unaffected");
}

/// Every metric the shipped alert rules and dashboard use is one pgweir serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_use_real_metric_names() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).start().await;
    proxy
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("pool exists");
    let (_, metrics) = proxy.admin("GET", "/metrics", None, None).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let alerts = std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml");
    let dashboard = std::fs::read_to_string(dir.join("grafana-dashboard.json")).expect("dashboard");
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut checked = 0;
    for text in [&alerts, &dashboard] {
        for (i, _) in text.match_indices("pgweir_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
                "{name} is used in config/ but not served by /metrics"
            );
            checked += 1;
        }
    }
    assert!(checked > 10);
}

/// A server lent to no client at the instant the admin API looks (here: being reset after a
/// session-mode client left) is still listed, as active with no client, and a kill of it says
/// why it cannot be done now instead of "no such server".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_lists_a_server_between_clients() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(2)
        .mode(pgweir::config::PoolMode::Session)
        .with_pool(|p| p.reset_query = "select pg_sleep(3)".into())
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    drop(client);
    // The reset runs for three seconds once the client has gone.
    let deadline = Instant::now() + Duration::from_millis(2500);
    let row = loop {
        let (_, body) = proxy.admin("GET", "/api/servers", None, None).await;
        let found = json(&body)
            .as_array()
            .expect("array")
            .iter()
            .find(|s| s["pid"] == pid && s["client"].is_null() && s["state"] == "active")
            .cloned();
        match found {
            Some(row) => break row,
            None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            None => panic!("server {pid} not listed while it is reset: {body}"),
        }
    };
    assert_eq!(row["user"], roles::SCRAM.0, "{row}");
    assert!(row["age_seconds"].as_f64().is_some(), "{row}");
    let (status, body) = proxy
        .admin("POST", &format!("/api/servers/{pid}/kill"), None, None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("between clients"), "{body}");
    // Once reset, it is idle, listed once.
    let idle = eventually(Duration::from_secs(6), || async {
        let (_, body) = proxy.admin("GET", "/api/servers", None, None).await;
        let servers = json(&body);
        let rows: Vec<_> = servers
            .as_array()
            .expect("array")
            .iter()
            .filter(|s| s["pid"] == pid)
            .cloned()
            .collect();
        rows.len() == 1 && rows[0]["state"] == "idle"
    })
    .await;
    assert!(idle, "server {pid} not listed idle once after its reset");
    // Closed, it is no longer listed, and counted as killed.
    let (status, body) = proxy
        .admin("POST", &format!("/api/servers/{pid}/kill"), None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    let killed = proxy
        .metric("pgweir_server_connections_closed_total{database=\"app\",user=\"app_scram\",reason=\"killed\"}")
        .await;
    assert_eq!(killed, 1);
    let (_, body) = proxy.admin("GET", "/api/servers", None, None).await;
    assert!(
        json(&body).as_array().expect("array").iter().all(|s| s["pid"] != pid),
        "closed server {pid} still listed: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_lists_every_route() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).start().await;
    let (status, body) = proxy.admin("GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("OpenAPI document is JSON");
    for path in [
        "/health",
        "/ready",
        "/metrics",
        "/api/pools",
        "/api/clients",
        "/api/servers",
        "/api/holders",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_subcommand_prints_the_pools_table() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(3).start().await;
    proxy
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("pool exists");
    let admin = proxy.proxy().admin_addr().expect("admin enabled").to_string();
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pgweir"))
            .args(["status", "--admin", &admin])
            .output()
            .expect("pgweir status runs")
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("database"), "{stdout}");
    let row = stdout.lines().nth(1).expect("one pool row");
    assert!(
        row.starts_with("app") && row.contains("app_scram") && row.contains("transaction"),
        "{row}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_good_file_and_keeps_running_on_a_broken_one() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgweir.toml");
    let write = |pool_size: u32, extra: &str| {
        let (user, password) = roles::SCRAM;
        std::fs::write(
            &path,
            format!(
                "[listen]\naddr = \"127.0.0.1:0\"\n\n[admin]\naddr = \"127.0.0.1:0\"\n\n[databases.app]\nport = {}\npool_size = {pool_size}\n{extra}\n\n[users.{user}]\npassword = \"{password}\"\n",
                pg.port()
            ),
        )
        .expect("write config");
    };
    write(2, "");
    let config = pgweir::config::Config::load(&path).expect("valid config");
    let proxy = pgweir::app::Proxy::start_with_path(config, Some(path.clone()))
        .await
        .expect("start");
    let harness = support::proxy::TestProxy::wrap(proxy);
    harness
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("works");
    let pool_size = |body: &str| json(body)[0]["size"].as_u64();
    let (_, body) = harness.admin("GET", "/api/pools", None, None).await;
    assert_eq!(pool_size(&body), Some(2));

    write(7, "acquire_timeout = \"2s\"");
    let (status, body) = harness.admin("POST", "/api/reload", None, None).await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = harness.admin("GET", "/api/pools", None, None).await;
    assert_eq!(pool_size(&body), Some(7), "pool_size follows the reloaded file");
    let pools = harness.proxy().context().pools.all();
    assert_eq!(
        pools[0].settings().acquire_timeout,
        Duration::from_secs(2),
        "other pool settings too"
    );

    write(3, "bogus_key = 1");
    let (status, body) = harness.admin("POST", "/api/reload", None, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bogus_key"), "{body}");
    let (_, body) = harness.admin("GET", "/api/pools", None, None).await;
    assert_eq!(pool_size(&body), Some(7), "a broken file changes nothing");
    harness
        .connect(roles::SCRAM)
        .await
        .query_one("select 1", &[])
        .await
        .expect("still serving");
}

/// A reload that points a database elsewhere (here: another database on the same server, as a
/// failover would another host) moves its pool: the idle server is closed at once, the one a
/// transaction holds when it is returned, and every transaction after runs on the new target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_a_pool_to_its_new_target() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgweir.toml");
    let (user, password) = roles::SCRAM;
    let write = |dbname: &str| {
        std::fs::write(
            &path,
            format!(
                "[listen]\naddr = \"127.0.0.1:0\"\nauth_type = \"trust\"\n\n[admin]\naddr = \"127.0.0.1:0\"\n\n\
                 [databases.app]\nport = {}\ndbname = \"{dbname}\"\n\n[users.{user}]\npassword = \"{password}\"\n",
                pg.port()
            ),
        )
        .expect("write config");
    };
    write("app");
    let config = pgweir::config::Config::load(&path).expect("valid config");
    let proxy = pgweir::app::Proxy::start_with_path(config, Some(path.clone()))
        .await
        .expect("start");
    let harness = support::proxy::TestProxy::wrap(proxy);
    let idle = harness.connect(roles::SCRAM).await;
    let holder = harness.connect(roles::SCRAM).await;
    let current = |row: tokio_postgres::Row| row.get::<_, String>(0);
    holder.batch_execute("begin").await.expect("begin");
    assert_eq!(
        current(holder.query_one("select current_database()", &[]).await.expect("query")),
        "app"
    );
    // On a second server, idle once this returns.
    assert_eq!(
        current(idle.query_one("select current_database()", &[]).await.expect("query")),
        "app"
    );

    write("postgres");
    let (status, body) = harness.admin("POST", "/api/reload", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["needs_restart"], serde_json::json!([]), "{body}");
    assert_eq!(
        current(idle.query_one("select current_database()", &[]).await.expect("query")),
        "postgres",
        "a transaction after the reload runs on the new target"
    );
    assert_eq!(
        current(holder.query_one("select current_database()", &[]).await.expect("query")),
        "app",
        "a transaction open across the reload stays where it began"
    );
    holder.batch_execute("commit").await.expect("commit");
    assert_eq!(
        current(holder.query_one("select current_database()", &[]).await.expect("query")),
        "postgres"
    );
    let closed = harness
        .metric(&format!(
            "pgweir_server_connections_closed_total{{database=\"app\",user=\"{user}\",reason=\"retarget\"}}"
        ))
        .await;
    assert_eq!(closed, 2, "the idle server at once, the held one when returned");
}

/// A reload rotates the admin token: the new one is required from then on, the old refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_admin_token() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgweir.toml");
    let write = |token: &str| {
        std::fs::write(
            &path,
            format!(
                "[listen]\naddr = \"127.0.0.1:0\"\nauth_type = \"trust\"\n\n[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{token}\"\n\n[databases.app]\nport = {}\n",
                pg.port()
            ),
        )
        .expect("write config");
    };
    let (old, new) = ("the-first-admin-token-0123", "the-second-admin-token-456");
    write(old);
    let config = pgweir::config::Config::load(&path).expect("valid config");
    let proxy = pgweir::app::Proxy::start_with_path(config, Some(path.clone()))
        .await
        .expect("start");
    let harness = support::proxy::TestProxy::wrap(proxy);
    write(new);
    let (status, body) = harness.admin("POST", "/api/reload", Some(old), None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = harness.admin("POST", "/api/reload", Some(old), None).await;
    assert_eq!(status, 401, "the old token still works after the reload");
    let (status, body) = harness.admin("POST", "/api/reload", Some(new), None).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_show_idle_in_transaction_age_and_last_query_when_enabled() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg);
    builder.query_text_bytes = 16;
    let proxy = builder.start().await;
    let client = proxy.connect(roles::SCRAM).await;
    client
        .batch_execute("begin; select 'a long query text that gets cut'")
        .await
        .expect("open a transaction");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, body) = proxy.admin("GET", "/api/clients", None, None).await;
    let c = &json(&body)[0];
    let idle = c["idle_in_transaction_seconds"].as_f64().expect("idle in transaction");
    assert!(idle >= 0.2, "{c}");
    assert_eq!(
        c["last_query"], "begin; select 'a",
        "truncated to query_text_bytes: {c}"
    );
    client.batch_execute("commit").await.expect("commit");
    let (_, body) = proxy.admin("GET", "/api/clients", None, None).await;
    assert!(json(&body)[0]["idle_in_transaction_seconds"].is_null(), "{body}");

    // Off by default: no query text.
    let proxy2 = TestProxyBuilder::new(&pg).start().await;
    let other = proxy2.connect(roles::SCRAM).await;
    other.batch_execute("select 1").await.expect("query");
    let (_, body) = proxy2.admin("GET", "/api/clients", None, None).await;
    assert!(json(&body)[0]["last_query"].is_null(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_probes_databases_no_client_has_used_yet() {
    let pg = support::postgres();
    // Fresh proxy, no client yet, PostgreSQL up: ready.
    let proxy = TestProxyBuilder::new(&pg).start().await;
    let (status, body) = proxy.admin("GET", "/ready", None, None).await;
    assert_eq!(status, 200, "{body}");
    // A configured database whose server is down makes it not ready, before any client tries.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut builder = TestProxyBuilder::new(&pg);
    builder.extra_databases.push((
        "down".to_owned(),
        pgweir::config::DatabaseConfig {
            host: "127.0.0.1".to_owned(),
            port: dead_port,
            dbname: "down".to_owned(),
            server_user: None,
            server_password: None,
            pool: builder.pool.clone(),
        },
    ));
    let proxy = builder.start().await;
    let (status, body) = proxy.admin("GET", "/ready", None, None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database down") && body.contains("unreachable"), "{body}");
}

/// PgBouncer's RECONNECT and WAIT_CLOSE for one pool: the idle server closes at once, the one a
/// transaction holds when returned (the transaction itself goes on, on it); every transaction
/// after runs on a new server, and `?wait=true` answers once no old one is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_replaces_every_server_of_a_pool() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(4).start().await;
    let (user, _) = roles::SCRAM;
    let idle = proxy.connect(roles::SCRAM).await;
    let holder = proxy.connect(roles::SCRAM).await;
    holder.batch_execute("begin").await.expect("begin");
    let held = backend_pid(&holder).await;
    let was_idle = backend_pid(&idle).await;
    assert_ne!(held, was_idle);

    let path = format!("/api/pools/app/{user}/reconnect");
    let (status, body) = proxy.admin("POST", &path, None, None).await;
    assert_eq!(status, 200, "{body}");
    let body = json(&body);
    assert_eq!(
        (body["closed_idle"].as_u64(), body["closing"].as_u64()),
        (Some(1), Some(1)),
        "{body}"
    );
    let fresh = backend_pid(&idle).await;
    assert!(![held, was_idle].contains(&fresh), "a new server after the reconnect");
    assert_eq!(
        backend_pid(&holder).await,
        held,
        "the open transaction stays on its server"
    );

    // WAIT_CLOSE: the answer waits for the held server, which closes when the commit returns it.
    let wait_path = format!("{path}?wait=true");
    let answer = proxy.admin("POST", &wait_path, None, None);
    tokio::pin!(answer);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut answer)
            .await
            .is_err(),
        "answered before the held server was returned"
    );
    holder.batch_execute("commit").await.expect("commit");
    let (status, body) = answer.await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["closing"].as_u64(), Some(0), "{body}");
    let after = [backend_pid(&holder).await, backend_pid(&idle).await];
    assert!(!after.contains(&held) && !after.contains(&was_idle), "{after:?}");
    let closed = proxy
        .metric(&format!(
            "pgweir_server_connections_closed_total{{database=\"app\",user=\"{user}\",reason=\"reconnect\"}}"
        ))
        .await;
    // The two of before the first reconnect, and the one the second found idle.
    assert_eq!(closed, 3);
}

/// PgBouncer's `KILL db` for one pool: its clients are ended (in a transaction, idle, or
/// waiting for a server), its servers closed, and the pool serves new clients at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_pool_ends_its_clients_and_closes_its_servers() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(1)
        .with_pool(|p| p.acquire_timeout = Duration::from_secs(60))
        .start()
        .await;
    let (user, _) = roles::SCRAM;
    let (holder, holder_task) = proxy.connect_watched(roles::SCRAM).await;
    let (idle, idle_task) = proxy.connect_watched(roles::SCRAM).await;
    let (waiter, waiter_task) = proxy.connect_watched(roles::SCRAM).await;
    idle.query_one("select 1", &[]).await.expect("idle client worked");
    holder.batch_execute("begin").await.expect("begin");
    let pid = backend_pid(&holder).await;
    let waiting = tokio::spawn(async move { waiter.query_one("select 1", &[]).await.map(|_| ()) });
    let pool = proxy.pool_where(|k| k.database == "app").expect("pool");
    assert!(eventually(Duration::from_secs(10), || async { pool.snapshot().waiting == 1 }).await);

    let (status, body) = proxy
        .admin("POST", &format!("/api/pools/app/{user}/kill"), None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["killed_clients"].as_u64(), Some(3), "{body}");
    for task in [holder_task, idle_task, waiter_task] {
        let ended = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("client ended")
            .expect("task");
        assert!(ended.is_err(), "ended by pgweir");
    }
    let e = waiting.await.expect("task").expect_err("killed while waiting");
    assert_eq!(support::proxy::sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    assert!(support::proxy::backend_gone(&pg, pid).await, "server {pid} still open");
    let fresh = proxy.connect(roles::SCRAM).await;
    fresh
        .query_one("select 1", &[])
        .await
        .expect("the pool serves new clients");
    let (status, _) = proxy.admin("POST", "/api/pools/app/nobody/kill", None, None).await;
    assert_eq!(status, 404);
}
