//! Raw-protocol behaviour: SSLRequest/GSSENCRequest answered 'N', bad input closes only the
//! offending client with an ErrorResponse, unknown database and wrong password errors, and
//! graceful shutdown.

mod support;

use std::time::Duration;

use pgweir::embedded_pg::roles;
use support::proxy::{TestProxyBuilder, sqlstate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn read_error(s: &mut TcpStream) -> (String, String) {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
    let mut pos = 0;
    while pos + 5 <= all.len() {
        let len = i32::from_be_bytes([all[pos + 1], all[pos + 2], all[pos + 3], all[pos + 4]]) as usize;
        if all[pos] == b'E' {
            let body = &all[pos + 5..pos + 1 + len];
            let mut code = String::new();
            let mut msg = String::new();
            for field in body.split(|&b| b == 0) {
                match field.first() {
                    Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into(),
                    Some(b'M') => msg = String::from_utf8_lossy(&field[1..]).into(),
                    _ => {}
                }
            }
            return (code, msg);
        }
        pos += 1 + len;
    }
    panic!("no ErrorResponse in {all:?}");
}

/// Reads a login's replies up to its first ReadyForQuery.
async fn read_until_ready(s: &mut TcpStream) {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("login")
            .expect("read");
        assert!(n > 0, "closed during login: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_answered_n() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).start().await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    for code in [80877104i32, 80877103] {
        let mut pkt = 8i32.to_be_bytes().to_vec();
        pkt.extend_from_slice(&code.to_be_bytes());
        s.write_all(&pkt).await.expect("write");
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.expect("answer");
        assert_eq!(&answer, b"N");
    }
    // The connection goes on in plaintext: a startup for an unknown database after auth.
    // (sslmode=prefer clients such as tokio-postgres' default take this path.)
    let client = proxy.connect(roles::SCRAM).await;
    client
        .query_one("select 1", &[])
        .await
        .expect("plaintext after refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_database() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).start().await;
    let e = proxy
        .try_connect((roles::SCRAM.0, "not-the-password"), "app")
        .await
        .expect_err("wrong password");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e:?}");
    let e = proxy
        .try_connect(("nobody", "x"), "app")
        .await
        .expect_err("unknown user");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e:?}");
    let e = proxy
        .try_connect(roles::SCRAM, "nosuchdb")
        .await
        .expect_err("unknown database");
    assert_eq!(sqlstate(&e).as_deref(), Some("3D000"), "{e:?}");
    let msg = e.as_db_error().expect("db error").message().to_owned();
    assert!(msg.contains("nosuchdb"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_client_auth_and_each_server_auth_method() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg);
    builder.auth_type = pgweir::config::AuthType::Md5;
    let proxy = builder.start().await;
    // Server-side methods: scram (app_scram), md5 (app_md5), cleartext (app_plain), trust (app_trust).
    for role in [roles::SCRAM, roles::MD5, roles::PLAIN, (roles::TRUST, "trust_pw")] {
        let client = proxy
            .try_connect(role, "app")
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", role.0));
        let who: String = client
            .query_one("select current_user::text", &[])
            .await
            .expect("query")
            .get(0);
        assert_eq!(who, role.0);
    }
    let e = proxy
        .try_connect((roles::MD5.0, "wrong"), "app")
        .await
        .expect_err("wrong md5");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_close_only_that_client() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg);
    builder.auth_type = pgweir::config::AuthType::Trust;
    builder.max_message_size = 64 * 1024;
    let proxy = builder.start().await;
    let bystander = proxy.connect(roles::SCRAM).await;

    // Garbage length in the startup packet.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).await.expect("write");
    let (code, _) = read_error(&mut s).await;
    assert_eq!(code, "08P01");
    // A length too short for any packet, and nothing after it: refused at once, not after
    // client_login_timeout (15 s here; read_error gives up after 5).
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&4i32.to_be_bytes()).await.expect("write");
    let (code, msg) = read_error(&mut s).await;
    assert_eq!(code, "08P01", "{msg}");

    // A startup packet (after an SSLRequest) that arrives a few bytes at a time still logs in.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut ssl = 8i32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&80877103i32.to_be_bytes());
    for piece in ssl.chunks(3) {
        s.write_all(piece).await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"N");
    for piece in support::startup_packet(roles::SCRAM.0, "app").chunks(5) {
        s.write_all(piece).await.expect("write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    read_until_ready(&mut s).await;

    // Logged in, then a message with a negative length and one over max_message_size.
    for bad in [vec![b'Q', 0xff, 0xff, 0xff, 0xf0], {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&(1_000_000i32).to_be_bytes());
        m
    }] {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.write_all(&support::startup_packet(roles::SCRAM.0, "app"))
            .await
            .expect("startup");
        read_until_ready(&mut s).await;
        s.write_all(&bad).await.expect("bad message");
        let (code, msg) = read_error(&mut s).await;
        assert_eq!(code, "08P01", "{msg}");
    }
    // Unsupported protocol version.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut pkt = 8i32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&0x0002_0000i32.to_be_bytes());
    s.write_all(&pkt).await.expect("write");
    let (code, _) = read_error(&mut s).await;
    assert_eq!(code, "08P01");

    bystander
        .query_one("select 1", &[])
        .await
        .expect("other clients unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_login_is_dropped_at_client_login_timeout() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg);
    builder.client_login_timeout = Duration::from_millis(300);
    let proxy = builder.start().await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&[0, 0]).await.expect("half a length");
    let (code, msg) = read_error(&mut s).await;
    assert_eq!(code, "08P01");
    assert!(msg.contains("client_login_timeout"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_transactions_finish() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).start().await;
    let addr = proxy.addr;
    let in_tx = proxy.connect(roles::SCRAM).await;
    let idle = proxy.connect(roles::SCRAM).await;
    in_tx
        .batch_execute("begin; create table shut (x int)")
        .await
        .expect("begin");
    let shutdown = tokio::spawn(proxy.shutdown(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are refused.
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown began"
    );
    // The idle client was told and closed.
    let e = idle.query_one("select 1", &[]).await.expect_err("idle client closed");
    assert!(idle.is_closed() || sqlstate(&e).as_deref() == Some("57P01"), "{e:?}");
    // The open transaction can still commit.
    in_tx
        .batch_execute("insert into shut values (1); commit")
        .await
        .expect("transaction finishes");
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown completes once the transaction is done")
        .expect("task");
}
