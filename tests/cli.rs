//! The `pgweir` binary: `check`, `health`, `drain`, and a real SIGHUP reload of a running
//! process that must not drop its clients.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgweir::embedded_pg::{EmbeddedPostgres, roles};
use support::proxy::TestProxyBuilder;

fn pgweir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgweir"))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run pgweir");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_accepts_a_good_file_and_lists_every_problem_of_a_bad_one() {
    let dir = tempfile::tempdir().expect("dir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[databases.app]\n[users.app]\npassword = \"pw\"\n").expect("write");
    let (ok, text) = run(pgweir().args(["check", "--config"]).arg(&good));
    assert!(ok, "{text}");
    assert!(text.contains("OK"), "{text}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[listen]\naddr = \"nowhere\"\nmax_client_conn = 0\n\
         [pool]\npool_size = 0\nacquire_timeout = 5\n\
         [tls]\nmode = \"require\"\n\
         [[hba]]\naction = \"permit\"\naddress = \"all\"\n\
         [databases.app]\nport = 70000\n",
    )
    .expect("write");
    let (ok, text) = run(pgweir().args(["check", "--config"]).arg(&bad));
    assert!(!ok, "{text}");
    for key in [
        "listen.addr",
        "listen.max_client_conn",
        "pool.pool_size",
        "pool.acquire_timeout",
        "tls",
        "hba[1].action",
        "databases.app.port",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_drain_against_a_running_proxy() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).start().await;
    let admin = proxy.proxy().admin_addr().expect("admin").to_string();
    let client = proxy.connect(roles::SCRAM).await;
    client.batch_execute("SELECT 1").await.expect("query");

    // Runs `pgweir <args> --admin <at>` off the async runtime.
    let cli = |args: &[&str], at: &str| {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--admin".to_owned(), at.to_owned()]);
        async move {
            tokio::task::spawn_blocking(move || run(pgweir().args(args)))
                .await
                .expect("task")
        }
    };
    let (ok, text) = cli(&["health"], &admin).await;
    assert!(ok, "{text}");
    let (ok, text) = cli(&["health", "--ready"], &admin).await;
    assert!(ok, "{text}");

    // The admin listener is on loopback, so drain needs no token here.
    let (ok, text) = cli(&["drain"], &admin).await;
    assert!(ok, "{text}");
    let (ok, text) = cli(&["health", "--ready"], &admin).await;
    assert!(!ok, "draining must not be ready: {text}");
    assert!(text.contains("draining"), "{text}");
    // Liveness is unaffected, and connected clients are still served.
    let (ok, _) = cli(&["health"], &admin).await;
    assert!(ok);
    client
        .batch_execute("SELECT 1")
        .await
        .expect("still served while draining");

    // Nothing listening: failure, with the reason.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let (ok, text) = cli(&["health"], &format!("127.0.0.1:{port}")).await;
    assert!(!ok);
    assert!(text.contains("cannot reach"), "{text}");
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn write_config(path: &Path, pg: &EmbeddedPostgres, port: u16, admin: u16, pool_size: usize) {
    let (user, password) = roles::SCRAM;
    std::fs::write(
        path,
        format!(
            "[listen]\naddr = \"127.0.0.1:{port}\"\n[admin]\naddr = \"127.0.0.1:{admin}\"\n\
             [pool]\npool_size = {pool_size}\n\
             [databases.app]\nhost = \"{}\"\nport = {}\n[users.{user}]\npassword = \"{password}\"\n",
            pg.host(),
            pg.port()
        ),
    )
    .expect("write config");
}

/// Starts the binary on `path` and waits until it accepts connections on `port`.
async fn start(path: &Path, port: u16) -> KillOnDrop {
    let child = KillOnDrop(
        pgweir()
            .arg("--config")
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgweir"),
    );
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "pgweir did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_running_process_without_dropping_clients() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("pgweir.toml");
    let (port, admin) = (free_port(), free_port());
    write_config(&path, &pg, port, admin, 3);
    let child = start(&path, port).await;
    let conn = |user: (&str, &str)| {
        format!(
            "host=127.0.0.1 port={port} user={} password={} dbname=app",
            user.0, user.1
        )
    };
    let (idle, c1) = tokio_postgres::connect(&conn(roles::SCRAM), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(c1);
    let (in_tx, c2) = tokio_postgres::connect(&conn(roles::SCRAM), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(c2);
    in_tx.batch_execute("BEGIN; SELECT 1").await.expect("begin");

    write_config(&path, &pg, port, admin, 7);
    let status = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    assert!(
        support::proxy::eventually(Duration::from_secs(10), || status_shows_pool_size(admin, 7)).await,
        "pool_size 7 after SIGHUP"
    );

    // Nobody was dropped: the open transaction commits, the idle client queries, and the
    // process is still the same one.
    in_tx
        .batch_execute("SELECT 2; COMMIT")
        .await
        .expect("transaction survives the reload");
    idle.batch_execute("SELECT 3")
        .await
        .expect("idle client survives the reload");
    assert!(!in_tx.is_closed() && !idle.is_closed());
    let (fresh, c3) = tokio_postgres::connect(&conn(roles::SCRAM), tokio_postgres::NoTls)
        .await
        .expect("new client after reload");
    tokio::spawn(c3);
    fresh.batch_execute("SELECT 4").await.expect("query");
    drop(child);
}

/// Whether `pgweir status` lists a pool of `size`.
async fn status_shows_pool_size(admin: u16, size: usize) -> bool {
    let (code, body) = tokio::task::spawn_blocking(move || {
        let out = pgweir()
            .args(["status", "--admin", &format!("127.0.0.1:{admin}")])
            .output()
            .expect("status");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .expect("task");
    let size = size.to_string();
    code && body
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(3) == Some(size.as_str()))
}

/// A reloaded shutdown_timeout is the one a shutdown then uses (it used to be read once, at
/// start): a transaction left open is cut after the reloaded second, not the original two
/// minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_shutdown_timeout_is_the_one_shutdown_uses() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("pgweir.toml");
    let (port, admin) = (free_port(), free_port());
    let write = |grace: &str, pool_size: usize| {
        write_config(&path, &pg, port, admin, pool_size);
        let text = std::fs::read_to_string(&path).expect("read");
        let text = text.replacen("[listen]\n", &format!("[listen]\nshutdown_timeout = \"{grace}\"\n"), 1);
        std::fs::write(&path, text).expect("write");
    };
    write("120s", 3);
    let mut child = start(&path, port).await;
    let conn = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname=app",
        roles::SCRAM.0,
        roles::SCRAM.1
    );
    let (in_tx, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(c);
    in_tx.batch_execute("BEGIN; SELECT 1").await.expect("begin");

    write("1s", 7);
    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill -HUP")
            .success()
    );
    assert!(
        support::proxy::eventually(Duration::from_secs(10), || status_shows_pool_size(admin, 7)).await,
        "the reload was applied"
    );
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM")
            .success()
    );
    let signalled = Instant::now();
    while child.0.try_wait().expect("try_wait").is_none() {
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "still running 20 s after SIGTERM: the shutdown_timeout of start (120 s) is in use"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        in_tx.batch_execute("SELECT 2").await.is_err(),
        "the open transaction was cut"
    );
}

/// `workers = 1` runs a single-threaded (current-thread) runtime, PgBouncer-style: the whole
/// proxy, admin API, pool sweeper and signal handling included, must work on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_runs_everything_on_one_thread() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("pgweir.toml");
    let (port, admin) = (free_port(), free_port());
    write_config(&path, &pg, port, admin, 2);
    let text = std::fs::read_to_string(&path).expect("read");
    let text = text.replacen("[listen]\n", "[listen]\nworkers = 1\n", 1);
    let text = text.replacen("[pool]\n", "[pool]\nacquire_timeout = \"300ms\"\n", 1);
    std::fs::write(&path, text).expect("write");
    let mut child = start(&path, port).await;
    let conn = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname=app",
        roles::SCRAM.0,
        roles::SCRAM.1
    );
    // 20 clients share 2 servers: most transactions wait for one.
    let mut tasks = Vec::new();
    for i in 0..20i32 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let (client, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(c);
            for j in 0..25i32 {
                let row = client
                    .query_one("SELECT $1::int + $2::int", &[&i, &j])
                    .await
                    .expect("query");
                assert_eq!(row.get::<_, i32>(0), i + j);
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("client task"));
    }
    // The acquire timeout still ends a wait on this runtime (the sweeper task does it).
    let holder = &clients[0];
    let other = &clients[1];
    let third = &clients[2];
    holder.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    other.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    let waited = Instant::now();
    let err = third
        .batch_execute("SELECT 1")
        .await
        .expect_err("no server within 300 ms");
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    assert!(waited.elapsed() < Duration::from_secs(5), "{:?}", waited.elapsed());
    holder.batch_execute("COMMIT").await.expect("commit");
    other.batch_execute("COMMIT").await.expect("commit");

    let status = tokio::task::spawn_blocking(move || {
        pgweir()
            .args(["status", "--admin", &format!("127.0.0.1:{admin}")])
            .output()
            .expect("status")
    })
    .await
    .expect("task");
    assert!(status.status.success(), "admin API answers on the single thread");

    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let stopped = Instant::now();
    loop {
        if let Some(code) = child.0.try_wait().expect("wait") {
            assert!(code.success(), "clean exit after SIGTERM: {code:?}");
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(20), "pgweir did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn check_accepts_the_shipped_example_configs() {
    for file in ["config/example.toml", "config/minimal.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let (ok, text) = run(pgweir().args(["check", "--config"]).arg(&path));
        assert!(ok, "{file}: {text}");
    }
}
