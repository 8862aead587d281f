//! pgbench through pgweir: 100 clients, simple, extended and prepared protocol, zero failed
//! transactions.

mod support;

use std::process::Stdio;
use std::time::Duration;

use pgweir::embedded_pg::roles;
use support::proxy::{TestProxy, TestProxyBuilder};

/// How long one pgbench run may take: the slowest here takes seconds. A hang must fail the
/// test with what pgweir was doing, not stall CI until its own limit.
const PGBENCH_LIMIT: Duration = Duration::from_secs(180);

async fn pgbench(pg: &pgweir::embedded_pg::EmbeddedPostgres, proxy: &TestProxy, args: &[&str]) -> String {
    let (user, password) = roles::SCRAM;
    let child = tokio::process::Command::new(pg.bin_dir().join("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &proxy.port().to_string(), "-U", user])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", password)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("pgbench runs");
    let out = match tokio::time::timeout(PGBENCH_LIMIT, child.wait_with_output()).await {
        Ok(out) => out.expect("pgbench runs"),
        Err(_) => {
            // The child is killed as its future drops; first, what pgweir holds.
            let mut state = String::new();
            for path in ["/api/pools", "/api/clients", "/api/servers"] {
                let (_, body) = proxy.admin("GET", path, None, None).await;
                state += &format!("{path}: {body}\n");
            }
            panic!("pgbench {args:?} did not finish in {PGBENCH_LIMIT:?}; pgweir's state:\n{state}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "pgbench {args:?} failed:\n{stdout}\n{stderr}");
    stdout + &stderr
}

fn assert_no_failures(output: &str, expected_tx: u64) {
    let processed = output
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .unwrap_or_else(|| panic!("no transaction count in:\n{output}"));
    let done: u64 = processed
        .split('/')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad count {processed:?}"));
    assert_eq!(done, expected_tx, "{output}");
    if let Some(failed) = output
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
    {
        assert!(failed.starts_with("0 "), "failed transactions: {failed}\n{output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_extended_and_prepared_with_100_clients() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(10).start().await;
    pgbench(&pg, &proxy, &["-i", "-q", "-s", "1"]).await;
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(&pg, &proxy, &["-c", "100", "-j", "2", "-t", "20", "-M", mode]).await;
        assert_no_failures(&out, 2000);
        let out = pgbench(&pg, &proxy, &["-S", "-c", "100", "-j", "2", "-t", "50", "-M", mode]).await;
        assert_no_failures(&out, 5000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_works_through_pgweir() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(2).start().await;
    let (user, password) = roles::SCRAM;
    let port = proxy.port();
    let mut child = tokio::process::Command::new(pg.bin_dir().join("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(format!("host=127.0.0.1 port={port} user={user} dbname=app"))
        .args([
            "-c",
            "create table psql_t (id int, s text)",
            "-c",
            "\\copy psql_t from stdin",
            "-c",
            "select count(*), string_agg(s, ',' order by id) from psql_t",
        ])
        .env("PGPASSWORD", password)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psql runs");
    let mut stdin = child.stdin.take().expect("stdin");
    // A hang must fail the test, not stall CI until its own limit (psql itself takes a second).
    let out = tokio::time::timeout(Duration::from_secs(60), async move {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(b"1\tone\n2\ttwo\n\\.\n").await?;
        drop(stdin);
        child.wait_with_output().await
    })
    .await
    .expect("psql finished within 60 s")
    .expect("psql runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2|one,two"), "{stdout}");
}
