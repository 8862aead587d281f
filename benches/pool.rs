//! Pool checkout/checkin cost: uncontended (one task) and contended (64 tasks sharing 8
//! connections). The pool needs real server connections, so a tiny fake backend logs them in
//! (SSLRequest 'N', AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery 'I') and
//! then answers every Query with CommandComplete + ReadyForQuery. Checkout and checkin never
//! touch the socket once the connections exist. Run with `cargo bench --bench pool`.

use std::sync::Arc;
use tokio::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use pgweir::config::default_pool_settings;
use pgweir::pool::{Pool, PoolKey};
use pgweir::server::{ServerIds, ServerSecret, ServerTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "../tests/support/fake_pg.rs"]
mod fake_pg;

use fake_pg::msg;

async fn fake_backend() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if fake_pg::trust_login(&mut s, "15.0").await.is_err() {
                    return;
                }
                let mut reply = Vec::new();
                msg(&mut reply, b'C', b"SELECT 1\0");
                msg(&mut reply, b'Z', b"I");
                loop {
                    let mut hdr = [0u8; 5];
                    if s.read_exact(&mut hdr).await.is_err() {
                        return;
                    }
                    let len = i32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
                    let mut body = vec![0u8; len.saturating_sub(4)];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    match hdr[0] {
                        b'Q' if s.write_all(&reply).await.is_err() => return,
                        b'X' => return,
                        _ => {}
                    }
                }
            });
        }
    });
    port
}

fn pool(port: u16, size: usize) -> Pool {
    let mut settings = default_pool_settings();
    settings.pool_size = size;
    Pool::new(
        PoolKey {
            database: "bench".into(),
            user: "bench".into(),
        },
        ServerTarget {
            host: "127.0.0.1".into(),
            port,
            dbname: "bench".into(),
            user: "bench".into(),
        },
        ServerSecret::Plain("x".into()),
        settings,
        None,
        Arc::new(ServerIds::default()),
    )
}

/// Opens every connection of the pool once so the measured loop only checks out and in.
async fn warm(pool: &Pool, size: usize) {
    let mut held = Vec::new();
    for _ in 0..size {
        held.push(
            pool.checkout(Instant::now(), &pool.settings())
                .await
                .expect("checkout from fake backend"),
        );
    }
    for s in held {
        s.release();
    }
}

fn checkout_checkin(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let port = rt.block_on(fake_backend());

    let one = pool(port, 1);
    rt.block_on(warm(&one, 1));
    // Sessions read settings through a cache; so do the measured loops.
    let one_settings = one.settings().clone();
    c.bench_function("pool checkout+checkin, uncontended", |b| {
        b.to_async(&rt).iter(|| async {
            let s = one.checkout(Instant::now(), &one_settings).await.expect("checkout");
            s.release();
        })
    });

    const TASKS: usize = 64;
    const CONNS: usize = 8;
    const PER_TASK: usize = 100;
    let shared = pool(port, CONNS);
    rt.block_on(warm(&shared, CONNS));
    c.bench_function("pool 64 tasks x 100 checkouts on 8 connections", |b| {
        b.to_async(&rt).iter(|| {
            let shared = shared.clone();
            async move {
                let mut tasks = Vec::with_capacity(TASKS);
                for _ in 0..TASKS {
                    let p = shared.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut settings = p.settings_cache();
                        for _ in 0..PER_TASK {
                            let s = p.checkout(Instant::now(), settings.load()).await.expect("checkout");
                            tokio::task::yield_now().await;
                            s.release();
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("task");
                }
            }
        })
    });
}

criterion_group!(benches, checkout_checkin);
criterion_main!(benches);
