//! 20,000 connection attempts in a burst against a small max_client_conn: every attempt ends
//! promptly (logged in, refused with 53300, or refused/reset by TCP), and the proxy still serves.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pgweir::embedded_pg::roles;
use support::proxy::{TestProxyBuilder, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ATTEMPTS: usize = 20_000;
/// Attempts in flight at once: far above max_client_conn, well below RLIMIT_NOFILE (each attempt
/// costs two descriptors here, the client's and the in-process proxy's).
const IN_FLIGHT: usize = 400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The proxy sent an authentication request: a login slot was granted.
    Accepted,
    /// ErrorResponse 53300 (max_client_conn).
    Refused53300,
    /// Connection refused or reset by TCP (e.g. the accept backlog overflowed).
    TcpRefusedOrReset,
    /// Anything else: an unexpected message or error code.
    Other,
}

async fn attempt(i: usize, proxy: SocketAddr, packet: &[u8]) -> Result<Outcome, String> {
    // Spread the source addresses over 127.0.0.0/8 so 20,000 short connections do not exhaust
    // one address's ephemeral ports (TIME_WAIT) when other tests run at the same time.
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, (i / 250 % 250) as u8, (2 + i % 250) as u8));
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let mut s = match socket.connect(proxy).await {
        Ok(s) => s,
        Err(e) if is_refused_or_reset(&e) => return Ok(Outcome::TcpRefusedOrReset),
        Err(e) => return Err(format!("connect: {e}")),
    };
    if let Err(e) = s.write_all(packet).await {
        return if is_refused_or_reset(&e) {
            Ok(Outcome::TcpRefusedOrReset)
        } else {
            Err(format!("write: {e}"))
        };
    }
    let mut buf = Vec::with_capacity(256);
    loop {
        match s.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => return Ok(Outcome::TcpRefusedOrReset),
            Ok(0) => break,
            Ok(_) if buf.len() >= 5 => {
                let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() > len || buf[0] == b'R' {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) if is_refused_or_reset(&e) => return Ok(Outcome::TcpRefusedOrReset),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(match buf.first() {
        Some(b'R') => Outcome::Accepted,
        Some(b'E') if buf.windows(6).any(|w| w == b"C53300") => Outcome::Refused53300,
        _ => Outcome::Other,
    })
}

fn is_refused_or_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_connects_in_a_burst_all_end_and_the_proxy_still_serves() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg);
    builder.max_client_conn = 20;
    builder.client_login_timeout = Duration::from_secs(5);
    let proxy = builder.start().await;
    let addr = proxy.addr;
    let packet = support::startup_packet("app_scram", "app");
    let started = Instant::now();
    let outcomes: Vec<(usize, Duration, Result<Outcome, String>)> = futures_util::stream::iter(0..ATTEMPTS)
        .map(|i| {
            let packet = &packet;
            async move {
                let t = Instant::now();
                let r = match tokio::time::timeout(Duration::from_secs(15), attempt(i, addr, packet)).await {
                    Ok(r) => r,
                    Err(_) => Err("hung for 15 s".to_owned()),
                };
                (i, t.elapsed(), r)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let total = started.elapsed();
    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    for (i, took, r) in &outcomes {
        slowest = slowest.max(*took);
        match r {
            Ok(o) => *counts.entry(*o).or_default() += 1,
            Err(e) => failures.push(format!("attempt {i}: {e}")),
        }
    }
    eprintln!(
        "{ATTEMPTS} attempts in {total:?} (slowest {slowest:?}): {counts:?}, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} attempts failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(counts.get(&Outcome::Other), None, "unexpected replies: {counts:?}");
    assert!(counts.get(&Outcome::Accepted).copied().unwrap_or(0) > 0, "{counts:?}");
    assert!(
        counts.get(&Outcome::Refused53300).copied().unwrap_or(0) > 0,
        "max_client_conn was never reached: {counts:?}"
    );
    assert!(total < Duration::from_secs(240), "the burst took {total:?}");
    // Every abandoned login is released, and the proxy serves as before.
    let ctx = proxy.proxy().context();
    assert!(
        eventually(Duration::from_secs(10), || async {
            ctx.connected.load(std::sync::atomic::Ordering::Relaxed) == 0
        })
        .await,
        "{} clients still counted after the burst",
        ctx.connected.load(std::sync::atomic::Ordering::Relaxed)
    );
    let serves = eventually(Duration::from_secs(10), || async {
        match proxy.try_connect(roles::SCRAM, "app").await {
            Ok(c) => c.query_one("select 1", &[]).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(serves, "the proxy does not serve after the burst");
}
