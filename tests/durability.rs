//! No data lost through pgweir: a large COPY in and out is byte-identical, and every COMMIT
//! acknowledged to a client is visible afterwards, even across a PostgreSQL crash.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pgweir::embedded_pg::{EmbeddedOptions, roles};
use sha2::{Digest, Sha256};
use support::proxy::{TestProxyBuilder, direct, eventually};

/// Megabytes for the COPY test: the full 100 by default; `PGWEIR_COPY_MB` overrides it.
fn copy_megabytes() -> usize {
    std::env::var("PGWEIR_COPY_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// Deterministic COPY text rows (`id\tpayload\n`, about 100 bytes each), in chunks of about 64 KiB.
fn copy_chunks(total: usize) -> impl Iterator<Item = Bytes> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut id: u64 = 0;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut produced = 0;
    std::iter::from_fn(move || {
        if produced >= total {
            return None;
        }
        let mut chunk = Vec::with_capacity(66 * 1024);
        while chunk.len() < 64 * 1024 && produced + chunk.len() < total {
            id += 1;
            chunk.extend_from_slice(id.to_string().as_bytes());
            chunk.push(b'\t');
            for _ in 0..90 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.push(ALPHABET[(state % ALPHABET.len() as u64) as usize]);
            }
            chunk.push(b'\n');
        }
        produced += chunk.len();
        Some(Bytes::from(chunk))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_100_mb_in_and_out_through_pgweir_is_byte_identical() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(2).start().await;
    let client = proxy.connect(roles::SCRAM).await;
    client
        .batch_execute("create unlogged table copy_blob (id bigint primary key, payload text not null)")
        .await
        .expect("create");
    let total = copy_megabytes() << 20;
    let started = Instant::now();
    let sink = client
        .copy_in("copy copy_blob (id, payload) from stdin")
        .await
        .expect("COPY FROM STDIN starts");
    futures_util::pin_mut!(sink);
    let mut sent = Sha256::new();
    let mut sent_len = 0usize;
    for chunk in copy_chunks(total) {
        sent.update(&chunk);
        sent_len += chunk.len();
        sink.send(chunk).await.expect("send COPY data");
    }
    let rows = sink.finish().await.expect("COPY FROM STDIN completes");
    let copied_in = started.elapsed();

    let stream = client
        .copy_out("copy (select id, payload from copy_blob order by id) to stdout")
        .await
        .expect("COPY TO STDOUT starts");
    futures_util::pin_mut!(stream);
    let mut received = Sha256::new();
    let mut received_len = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("COPY data");
        received.update(&chunk);
        received_len += chunk.len();
    }
    eprintln!(
        "COPY {} MiB: {rows} rows in {copied_in:?}, out in {:?}",
        sent_len >> 20,
        started.elapsed() - copied_in
    );
    assert!(sent_len >= total);
    assert_eq!(received_len, sent_len, "bytes out != bytes in");
    assert_eq!(received.finalize(), sent.finalize(), "COPY round trip changed the data");
    // The session is still usable, and the server went back to the pool clean.
    let n: i64 = client
        .query_one("select count(*) from copy_blob", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n as u64, rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_commit_survives_a_postgres_crash_mid_run() {
    // synchronous_commit = on: PostgreSQL only acknowledges a COMMIT once its WAL is written, so
    // a SIGKILL cannot lose it (fsync stays off: a killed process does not lose the OS cache).
    let mut pg = support::postgres_with(EmbeddedOptions {
        extra_conf: vec!["synchronous_commit = on".to_owned()],
        ..Default::default()
    });
    let proxy = Arc::new(
        TestProxyBuilder::new(&pg)
            .pool_size(6)
            .with_pool(|p| {
                p.server_connect_timeout = Duration::from_secs(1);
                p.acquire_timeout = Duration::from_secs(2);
            })
            .start()
            .await,
    );
    proxy
        .connect(roles::SCRAM)
        .await
        .batch_execute("create table acked (client int, seq int, primary key (client, seq))")
        .await
        .expect("create");
    let acked: Arc<Mutex<BTreeSet<(i32, i32)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for client_id in 0..12i32 {
        let (proxy, acked, stop) = (proxy.clone(), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut seq = 0i32;
            while !stop.is_cancelled() {
                let c = match client.take() {
                    Some(c) if !c.is_closed() => c,
                    _ => match proxy.try_connect(roles::SCRAM, "app").await {
                        Ok(c) => c,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                seq += 1;
                let r = async {
                    c.batch_execute("begin").await?;
                    c.execute("insert into acked values ($1, $2)", &[&client_id, &seq])
                        .await?;
                    c.batch_execute("commit").await
                }
                .await;
                if r.is_ok() {
                    acked.lock().expect("lock").insert((client_id, seq));
                }
                client = Some(c);
            }
        }));
    }
    let count = || acked.lock().expect("lock").len();
    assert!(
        eventually(Duration::from_secs(10), || async { count() >= 300 }).await,
        "commits before the crash: {}",
        count()
    );
    tokio::task::block_in_place(|| pg.kill()).expect("SIGKILL the postmaster");
    let at_crash = count();
    tokio::task::block_in_place(|| pg.start_again()).expect("crash recovery");
    assert!(
        eventually(Duration::from_secs(10), || async { count() >= at_crash + 300 }).await,
        "commits after the restart: {}",
        count() - at_crash
    );
    stop.cancel();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("client task ends")
            .expect("task");
    }
    let observer = direct(&pg, "app").await;
    let present: BTreeSet<(i32, i32)> = observer
        .query("select client, seq from acked", &[])
        .await
        .expect("read back")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let acked = acked.lock().expect("lock");
    let lost: Vec<_> = acked.difference(&present).collect();
    eprintln!(
        "{} commits acknowledged ({at_crash} before the crash), {} rows present",
        acked.len(),
        present.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged commits lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}
