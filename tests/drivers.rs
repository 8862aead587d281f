//! Real client drivers through pgweir in transaction mode: 50 clients on a pool of 4 keeping at
//! most 8 statements per server, so a client's consecutive transactions land on different
//! servers and named statements are evicted and re-prepared wherever they go. Each script
//! (tests/drivers/) checks every result against values unique to its connection and exits
//! non-zero on a wrong row or any error:
//! - asyncpg: named prepared statements and its statement cache, explicit prepare, cursors
//!   (portals) in transactions, executemany, asyncpg.Pool;
//! - psycopg 3: automatic server-side prepare, pipeline mode, COPY in and out, named cursors;
//! - node-postgres: named statements prepared once per connection, then only bound; pg.Pool;
//! - pgJDBC: server-side statements after prepareThreshold, batches, fetch-size portals.
//!
//! Each driver also runs over TLS (sslmode verify-full against a throwaway CA), with fewer
//! clients.
//!
//! The drivers are installed into target/drivers by tests/drivers/setup.sh, which these tests
//! run first (it only checks when they are there). A driver that cannot be installed fails its
//! test with the reason: none is skipped.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use pgweir::config::ClientTlsMode;
use pgweir::embedded_pg::roles;
use support::pki::{Pki, client_tls};
use support::proxy::{TestProxy, TestProxyBuilder};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs tests/drivers/setup.sh once per test binary; every test reports its failure.
fn setup() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = DONE.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(root().join("tests/drivers/setup.sh"))
            .output()
            .map_err(|e| format!("could not run tests/drivers/setup.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tests/drivers/setup.sh failed (it needs python3 with venv, npm, and apt-get as root or via sudo):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// How a driver connects.
enum Transport {
    Plain,
    /// TLS required by pgweir, verified by the driver against this CA.
    Tls(Box<Pki>),
}

/// A pool of 4 keeping at most 8 statements per server: the drivers' statements (some unique
/// per connection) are evicted and re-prepared all the time.
async fn proxy(pg: &pgweir::embedded_pg::EmbeddedPostgres, transport: &Transport) -> TestProxy {
    let mut builder = TestProxyBuilder::new(pg)
        .pool_size(4)
        .with_pool(|p| p.max_prepared_statements = 8);
    if let Transport::Tls(pki) = transport {
        builder.tls = client_tls(ClientTlsMode::Require, &pki.leaf("proxy", &["127.0.0.1"]));
    }
    builder.start().await
}

/// Runs one driver script through a fresh proxy and fails the test with its output unless it
/// exits 0.
async fn run(transport: Transport, program: PathBuf, args: &[PathBuf]) {
    setup();
    let pg = support::postgres();
    let proxy = proxy(&pg, &transport).await;
    let (user, password) = roles::SCRAM;
    let mut command = tokio::process::Command::new(&program);
    match &transport {
        Transport::Plain => {
            command
                .env("PGSSLMODE", "disable")
                .env("DRIVER_CLIENTS", "50")
                .env("DRIVER_ROUNDS", "10");
        }
        Transport::Tls(pki) => {
            command
                .env("PGSSLMODE", "verify-full")
                .env("PGSSLROOTCERT", pki.ca_file())
                .env("NODE_EXTRA_CA_CERTS", pki.ca_file())
                .env("DRIVER_CLIENTS", "20")
                .env("DRIVER_ROUNDS", "5");
        }
    }
    let child = command
        .args(args)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.port().to_string())
        .env("PGUSER", user)
        .env("PGPASSWORD", password)
        .env("PGDATABASE", roles::DATABASE)
        .env("NODE_PATH", root().join("target/drivers/node/node_modules"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", program.display()));
    let out = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not finish within 240 s", program.display()))
        .expect("driver output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{stdout}\n{stderr}",
        program.display(),
        out.status
    );
    assert!(stdout.contains("errors: 0"), "unexpected output:\n{stdout}\n{stderr}");
}

fn script(name: &str) -> PathBuf {
    root().join("tests/drivers").join(name)
}

fn python() -> PathBuf {
    root().join("target/drivers/venv/bin/python")
}

fn tls() -> Transport {
    Transport::Tls(Box::new(Pki::new("pgweir driver-test CA")))
}

fn java_args() -> Vec<PathBuf> {
    vec![
        PathBuf::from("-cp"),
        PathBuf::from("/usr/share/java/postgresql.jar"),
        script("JdbcStress.java"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_gets_every_row_right() {
    run(Transport::Plain, python(), &[script("asyncpg_stress.py")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_over_tls_gets_every_row_right() {
    run(tls(), python(), &[script("asyncpg_stress.py")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_gets_every_row_right() {
    run(Transport::Plain, python(), &[script("psycopg_stress.py")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_over_tls_gets_every_row_right() {
    run(tls(), python(), &[script("psycopg_stress.py")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_gets_every_row_right() {
    run(Transport::Plain, PathBuf::from("node"), &[script("node_pg_stress.js")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_over_tls_gets_every_row_right() {
    run(tls(), PathBuf::from("node"), &[script("node_pg_stress.js")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_gets_every_row_right() {
    run(Transport::Plain, PathBuf::from("java"), &java_args()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_over_tls_gets_every_row_right() {
    run(tls(), PathBuf::from("java"), &java_args()).await;
}
