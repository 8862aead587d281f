//! The login path over raw sockets: startup packets as PostgreSQL reads them (malformed ones,
//! duplicate keys, split anywhere, followed by what a client sent without waiting), parameter
//! values at the inline/heap boundary, and read buffers handed from a departed client to the
//! next.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgweir::config::AuthType;
use pgweir::embedded_pg::roles;
use pgweir::pool::CANONICAL_VALUES_KEPT;
use support::proxy::{TestProxy, TestProxyBuilder};
use support::{SSL_REQUEST, packet, startup_message, startup_packet, wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Default)]
struct Reply {
    status: Vec<(String, Vec<u8>)>,
    error: Option<(String, String)>,
    /// The ErrorResponse's severity, when there was one.
    severity: String,
    rows: Vec<Vec<Option<Vec<u8>>>>,
    ready: bool,
    eof: bool,
    /// A NegotiateProtocolVersion: the version offered and the options refused.
    negotiate: Option<(i32, Vec<String>)>,
}

fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut msg) = (String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into(),
            Some(b'M') => msg = String::from_utf8_lossy(&field[1..]).into(),
            _ => {}
        }
    }
    (code, msg)
}

/// Reads messages until ReadyForQuery, EOF, or (after an ErrorResponse during login) EOF.
async fn read_reply(s: &mut TcpStream, limit: Duration) -> Reply {
    read_reply_kept(s, &mut Vec::new(), limit).await
}

/// [`read_reply`] that leaves what it read past the ReadyForQuery in `buf` for the next reply
/// (a pipelined query's, read with the login's).
async fn read_reply_kept(s: &mut TcpStream, buf: &mut Vec<u8>, limit: Duration) -> Reply {
    let mut r = Reply::default();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // Parse what we have.
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let tag = buf[0];
            let body = buf[5..1 + len].to_vec();
            buf.drain(..1 + len);
            match tag {
                b'S' => {
                    let mut parts = body.splitn(3, |&b| b == 0);
                    let k = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                    let v = parts.next().unwrap_or_default().to_vec();
                    r.status.push((k, v));
                }
                b'E' => {
                    r.error = Some(error_fields(&body));
                    r.severity = body
                        .split(|&b| b == 0)
                        .find_map(|f| f.strip_prefix(b"S"))
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                }
                b'D' => {
                    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
                    let mut pos = 2;
                    let mut row = Vec::new();
                    for _ in 0..n {
                        let l = i32::from_be_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]);
                        pos += 4;
                        if l < 0 {
                            row.push(None);
                        } else {
                            row.push(Some(body[pos..pos + l as usize].to_vec()));
                            pos += l as usize;
                        }
                    }
                    r.rows.push(row);
                }
                b'Z' => {
                    r.ready = true;
                    return r;
                }
                b'v' => {
                    let minor = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let names = body[8..]
                        .split(|&b| b == 0)
                        .filter(|n| !n.is_empty())
                        .map(|n| String::from_utf8_lossy(n).into_owned())
                        .collect();
                    r.negotiate = Some((minor, names));
                }
                _ => {}
            }
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                r.eof = true;
                return r;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return r,
        }
    }
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

async fn query(s: &mut TcpStream, sql: &str) -> Reply {
    s.write_all(&query_message(sql)).await.expect("query");
    read_reply(s, Duration::from_secs(10)).await
}

async fn trust_proxy(pg: &pgweir::embedded_pg::EmbeddedPostgres, pool_size: usize) -> TestProxy {
    let mut b = TestProxyBuilder::new(pg).pool_size(pool_size);
    b.auth_type = AuthType::Trust;
    b.client_login_timeout = Duration::from_secs(2);
    b.start().await
}

async fn login(proxy: &TestProxy, extra: &[(&[u8], &[u8])]) -> (TcpStream, Reply) {
    let mut pairs: Vec<(&[u8], &[u8])> = vec![(b"user", roles::TRUST.as_bytes()), (b"database", b"app")];
    pairs.extend_from_slice(extra);
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&startup_message(&pairs)).await.expect("startup");
    let r = read_reply(&mut s, Duration::from_secs(10)).await;
    (s, r)
}

fn status<'a>(r: &'a Reply, name: &str) -> Option<&'a [u8]> {
    r.status.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

/// Values either side of the 22-byte inline limit (one the prefix of another), multi-byte UTF-8
/// and empty values: each client is told its own value at login and finds it on the one shared
/// server, transaction after transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_the_inline_limit_follow_each_client() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let a21 = "a".repeat(21);
    let app_names: Vec<String> = vec![
        String::new(),
        a21.clone(),
        format!("{a21}b"),
        format!("{a21}c"),
        format!("{a21}a"),
        format!("{a21}aa"),
        format!("{a21}ab"),
        format!("{a21}aA"),
        "x".repeat(64),
    ];
    let e = "é";
    let tags: Vec<String> = vec![
        e.repeat(11),
        format!("{}x", e.repeat(11)),
        format!("{}x", e.repeat(10)),
        format!("{}", e.repeat(12)),
        String::new(),
        format!("{}xé", e.repeat(10)),
    ];
    let mut clients = Vec::new();
    for (i, name) in app_names.iter().enumerate() {
        let tag = &tags[i % tags.len()];
        // Alternate the spelling of the names: canonicalisation must treat them alike.
        let an: &[u8] = if i % 2 == 0 {
            b"application_name"
        } else {
            b"Application_Name"
        };
        let tn: &[u8] = if i % 2 == 0 { b"app.tag" } else { b"APP.Tag" };
        let (s, r) = login(&proxy, &[(an, name.as_bytes()), (tn, tag.as_bytes())]).await;
        assert!(r.ready && r.error.is_none(), "login {i}: {r:?}");
        // As PostgreSQL reports it: cut to NAMEDATALEN - 1 = 63 bytes.
        assert_eq!(
            status(&r, "application_name"),
            Some(&name.as_bytes()[..name.len().min(63)]),
            "ParameterStatus for {i}"
        );
        clients.push((s, name.clone(), tag.clone()));
    }
    for round in 0..4 {
        for (i, (s, name, tag)) in clients.iter_mut().enumerate() {
            let r = query(
                s,
                "select current_setting('application_name'), current_setting('app.tag', true)",
            )
            .await;
            assert!(r.error.is_none(), "round {round} client {i}: {r:?}");
            let row = &r.rows[0];
            // PostgreSQL 15 keeps an ASCII application_name as given.
            // (PostgreSQL truncates application_name to NAMEDATALEN-1 = 63 bytes.)
            assert_eq!(
                row[0].as_deref(),
                Some(&name.as_bytes()[..name.len().min(63)]),
                "round {round} client {i} application_name"
            );
            assert_eq!(
                row[1].as_deref().unwrap_or_default(),
                tag.as_bytes(),
                "round {round} client {i} app.tag"
            );
        }
    }
}

/// Malformed startup packets are refused with an ErrorResponse promptly, never accepted, never
/// left hanging until the login timeout, and the proxy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_are_refused_at_once() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 2).await;
    let u = roles::TRUST.as_bytes();
    let with = |body: &[u8]| packet(196608, body);
    let userpart = [b"user\0".as_slice(), u, b"\0"].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no final NUL", with(&userpart)),
        ("unterminated value", with(&[b"user\0".as_slice(), u].concat())),
        ("unterminated name", with(b"user")),
        ("empty name first", with(&[b"\0".as_slice(), &userpart, b"\0"].concat())),
        (
            "bytes after the terminator",
            with(&[userpart.as_slice(), b"\0x"].concat()),
        ),
        (
            "two NULs in the middle",
            with(&[userpart.as_slice(), b"\0database\0app\0\0"].concat()),
        ),
        ("odd NULs at the end", with(&[userpart.as_slice(), b"\0\0\0"].concat())),
        (
            "non-UTF-8 name",
            with(&[userpart.as_slice(), b"ap\xffp\0x\0\0"].concat()),
        ),
        ("length 8, protocol 3.0", packet(196608, b"")),
        ("only the terminator", packet(196608, b"\0")),
        ("empty user", with(b"user\0\0\0")),
        ("SSLRequest of 12 bytes", packet(80877103, b"\0\0\0\0")),
        ("CancelRequest of 8 bytes", packet(80877102, b"")),
        ("protocol 2.0", packet(0x0002_0000, &userpart)),
        (
            "options -c without setting",
            with(&[userpart.as_slice(), b"options\0-c\0\0"].concat()),
        ),
        (
            "options other switch",
            with(&[userpart.as_slice(), b"options\0-B 100\0\0"].concat()),
        ),
        (
            "options without =",
            with(&[userpart.as_slice(), b"options\0-c foo\0\0"].concat()),
        ),
        ("bad name", with(&[userpart.as_slice(), b"a;b\0x\0\0"].concat())),
        (
            "replication",
            with(&[userpart.as_slice(), b"replication\0database\0\0"].concat()),
        ),
    ];
    for (what, pkt) in cases {
        let started = Instant::now();
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.write_all(&pkt).await.expect("write");
        let r = read_reply(&mut s, Duration::from_secs(5)).await;
        assert!(!r.ready, "{what}: accepted: {r:?}");
        assert!(r.error.is_some() || r.eof, "{what}: no answer: {r:?}");
        let (code, msg) = r.error.clone().unwrap_or_default();
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{what}: took {:?} ({code} {msg})",
            started.elapsed()
        );
        assert!(!msg.contains("client_login_timeout"), "{what}: {msg}");
        eprintln!("{what}: {code} {msg}");
    }
    // A very long value (near MAX_STARTUP_LEN) logs in and is applied.
    let long = "v".repeat(9_000);
    let (mut s, r) = login(&proxy, &[(b"app.long", long.as_bytes())]).await;
    assert!(r.ready, "{r:?}");
    let r = query(&mut s, "select length(current_setting('app.long'))").await;
    assert_eq!(r.rows[0][0].as_deref(), Some(&b"9000"[..]), "{r:?}");
    // Over MAX_STARTUP_LEN: refused at once from the header.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&10_001i32.to_be_bytes()).await.expect("write");
    let r = read_reply(&mut s, Duration::from_secs(5)).await;
    assert_eq!(r.error.map(|e| e.0).as_deref(), Some("08P01"));
}

/// Duplicate startup keys. PostgreSQL 15 (checked by hand against a local server with raw
/// packets) takes the LAST user/database/options/replication (ProcessStartupPacket overwrites
/// port->user_name, port->database_name, port->cmdline_options), and a GUC given as its own
/// startup parameter beats the same GUC in `options` whatever the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_startup_keys_are_read_as_postgresql_reads_them() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 2).await;
    let mut diverged = Vec::new();
    // user twice: PostgreSQL logs in as the second.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&startup_message(&[
        (b"user", roles::TRUST.as_bytes()),
        (b"database", b"app"),
        (b"user", roles::PLAIN.0.as_bytes()),
    ]))
    .await
    .expect("startup");
    let r = read_reply(&mut s, Duration::from_secs(10)).await;
    assert!(r.ready, "{r:?}");
    let q = query(&mut s, "select current_user").await;
    let who = String::from_utf8_lossy(q.rows[0][0].as_deref().unwrap_or_default()).into_owned();
    if who != roles::PLAIN.0 {
        diverged.push(format!(
            "user twice: pgweir logged in as {who:?}, PostgreSQL would use {:?}",
            roles::PLAIN.0
        ));
    }
    // options twice: PostgreSQL applies only the last.
    let (mut s, r) = login(
        &proxy,
        &[
            (b"options", b"-c statement_timeout=5"),
            (b"options", b"-c application_name=x"),
        ],
    )
    .await;
    assert!(r.ready, "{r:?}");
    let q = query(&mut s, "select current_setting('statement_timeout')").await;
    let st = String::from_utf8_lossy(q.rows[0][0].as_deref().unwrap_or_default()).into_owned();
    if st != "0" {
        diverged.push(format!(
            "options twice: statement_timeout {st:?} from the first options, PostgreSQL ignores it (\"0\")"
        ));
    }
    // A startup parameter beats `options` even when options comes later.
    let (mut s, r) = login(
        &proxy,
        &[
            (b"application_name", b"fromparam"),
            (b"options", b"-c application_name=fromopt"),
        ],
    )
    .await;
    assert!(r.ready, "{r:?}");
    let q = query(&mut s, "select current_setting('application_name')").await;
    let an = String::from_utf8_lossy(q.rows[0][0].as_deref().unwrap_or_default()).into_owned();
    if an != "fromparam" {
        diverged.push(format!(
            "param then options: application_name {an:?}, PostgreSQL \"fromparam\""
        ));
    }
    // replication=false then replication=true: PostgreSQL treats it as a replication connection.
    let (_s, r) = login(&proxy, &[(b"replication", b"false"), (b"replication", b"true")]).await;
    if r.ready {
        diverged
            .push("replication false,true: pgweir logged in as a normal client, PostgreSQL starts a walsender".into());
    }
    // The same GUC twice in different spellings: last wins in both.
    let (mut s, r) = login(
        &proxy,
        &[(b"application_name", b"first"), (b"APPLICATION_NAME", b"second")],
    )
    .await;
    assert!(r.ready, "{r:?}");
    assert_eq!(status(&r, "application_name"), Some(&b"second"[..]));
    let q = query(&mut s, "select current_setting('application_name')").await;
    assert_eq!(q.rows[0][0].as_deref(), Some(&b"second"[..]));
    for d in &diverged {
        eprintln!("DIVERGES: {d}");
    }
    assert!(diverged.is_empty(), "{diverged:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_ssl_request_with_stuffed_bytes_is_refused() {
    use pgweir::config::ClientTlsMode;
    use support::pki::{Pki, client_tls};
    let pg = support::postgres();
    let pki = Pki::new("review17 CA");
    let leaf = pki.leaf("proxy", &["127.0.0.1"]);
    let mut b = TestProxyBuilder::new(&pg);
    b.tls = client_tls(ClientTlsMode::Prefer, &leaf);
    b.auth_type = AuthType::Trust;
    let proxy = b.start().await;
    for split in [1usize, 4, 5, 7] {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s.write_all(&SSL_REQUEST[..split]).await.expect("first piece");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut rest = SSL_REQUEST[split..].to_vec();
        rest.extend_from_slice(&startup_packet(roles::TRUST, "app"));
        s.write_all(&rest).await.expect("rest");
        let mut all = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
        let text = String::from_utf8_lossy(&all);
        assert_eq!(all.first(), Some(&b'E'), "split {split}: {all:?}");
        assert!(
            text.contains("unencrypted data after SSL request"),
            "split {split}: {text}"
        );
    }
}

/// A client that sends fewer than 8 bytes and waits is cut off at client_login_timeout (not
/// before, not never); a CancelRequest in two pieces still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_headers_wait_for_the_login_timeout_only() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 2).await;
    let full = startup_packet(roles::TRUST, "app");
    for n in [1usize, 4, 5, 7, 8, 12] {
        let started = Instant::now();
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.write_all(&full[..n]).await.expect("write");
        let r = read_reply(&mut s, Duration::from_secs(6)).await;
        let (code, msg) = r.error.clone().unwrap_or_default();
        assert_eq!(code, "08P01", "{n} bytes: {r:?}");
        assert!(msg.contains("client_login_timeout"), "{n} bytes: {msg}");
        let t = started.elapsed();
        assert!(
            t >= Duration::from_millis(1900) && t < Duration::from_secs(4),
            "{n} bytes: {t:?}"
        );
    }
    // The whole packet a byte at a time, each byte its own segment.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    for b in &full {
        s.write_all(&[*b]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let r = read_reply(&mut s, Duration::from_secs(5)).await;
    assert!(r.ready, "{r:?}");
    // CancelRequest (16 bytes) split 8 + 8: the connection just ends, no reply.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let cancel = packet(80877102, &[0, 0, 0, 1, 0, 0, 0, 2]);
    s.write_all(&cancel[..8]).await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&cancel[8..]).await.expect("write");
    let r = read_reply(&mut s, Duration::from_secs(3)).await;
    assert!(r.eof && r.error.is_none() && r.status.is_empty(), "{r:?}");
}

/// Startup-phase packets are read in chunks larger than the packets, so what a client sends
/// without waiting for the answer (its StartupMessage after an SSLRequest, its first query
/// after its login) is kept for what comes next, never lost and never a hang: whole, split
/// anywhere, and with a startup packet larger than one chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_sends_before_its_answer_is_kept_for_what_comes_next() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 2).await;
    // A search_path that makes the packet ~800 bytes, more than one read takes.
    let long_path = (0..150).map(|i| format!("s{i:03}")).collect::<Vec<_>>().join(",");
    for (name, path) in [("short", "public"), ("long", long_path.as_str())] {
        let mut all = SSL_REQUEST.to_vec();
        let login_at = all.len();
        all.extend_from_slice(&startup_message(&[
            (b"user", roles::TRUST.as_bytes()),
            (b"database", b"app"),
            (b"search_path", path.as_bytes()),
        ]));
        let query_at = all.len();
        all.extend_from_slice(&query_message("select 'piped', current_setting('search_path')"));
        for split in [
            None,
            Some(3),
            Some(login_at + 5),
            Some(query_at - 1),
            Some(query_at + 7),
        ] {
            let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            match split {
                None => s.write_all(&all).await.expect("write"),
                Some(at) => {
                    s.write_all(&all[..at]).await.expect("first part");
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    s.write_all(&all[at..]).await.expect("rest");
                }
            }
            let mut answer = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut answer))
                .await
                .expect("the SSLRequest's answer in time")
                .expect("the SSLRequest's answer");
            assert_eq!(&answer, b"N", "{name} {split:?}");
            // Both replies may come in one read.
            let mut kept = Vec::new();
            let login = read_reply_kept(&mut s, &mut kept, Duration::from_secs(5)).await;
            assert!(login.ready && login.error.is_none(), "{name} {split:?}: {login:?}");
            let q = read_reply_kept(&mut s, &mut kept, Duration::from_secs(5)).await;
            assert!(q.ready && q.error.is_none(), "{name} {split:?}: {q:?}");
            assert_eq!(q.rows.len(), 1, "{name} {split:?}: {q:?}");
            assert_eq!(q.rows[0][0].as_deref(), Some(&b"piped"[..]), "{name} {split:?}");
            assert_eq!(
                q.rows[0][1].as_deref(),
                Some(path.as_bytes()),
                "{name} {split:?}: the login's own value"
            );
            // And the session goes on as any other.
            let q = query(&mut s, "select 'after'").await;
            assert_eq!(q.rows.len(), 1, "{name} {split:?}: {q:?}");
        }
    }
}

/// Under password authentication a password sent with the startup packet (it cannot answer the
/// salt it has not seen) is read as the answer and fails at once with 28P01, as PostgreSQL
/// fails it; it does not wait for client_login_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_sent_with_the_startup_packet_is_its_answer() {
    let pg = support::postgres();
    let mut b = TestProxyBuilder::new(&pg);
    b.auth_type = AuthType::Md5;
    b.client_login_timeout = Duration::from_secs(3);
    let proxy = b.start().await;
    let mut all = startup_packet(roles::MD5.0, "app");
    let password = format!("md5{}\0", "0".repeat(32));
    let password = password.as_bytes();
    all.push(b'p');
    all.extend_from_slice(&((password.len() + 4) as i32).to_be_bytes());
    all.extend_from_slice(password);
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&all).await.expect("write");
    let r = read_reply(&mut s, Duration::from_secs(6)).await;
    let (code, msg) = r.error.clone().unwrap_or_default();
    assert_eq!(code, "28P01", "{r:?}");
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

/// A client asking for protocol 3.x above 3.0, or for `_pq_` options, is told 3.0 and which
/// options were refused (NegotiateProtocolVersion; PostgreSQL too sends the whole version
/// number, 196608, where the documentation says minor version), and logs in; a plain 3.0
/// client without options is told nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_protocol_versions_and_options_are_negotiated_down() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let user: (&[u8], &[u8]) = (b"user", roles::TRUST.as_bytes());
    let db: (&[u8], &[u8]) = (b"database", b"app");
    const V3_0: i32 = 196608;
    // The minor version asked for, the parameters, what NegotiateProtocolVersion says.
    type Case<'a> = (u16, Vec<(&'a [u8], &'a [u8])>, Option<(i32, Vec<&'a str>)>);
    let cases: [Case; 4] = [
        (0, vec![user, db], None),
        (2, vec![user, db], Some((V3_0, vec![]))),
        (
            0,
            vec![user, (b"_pq_.compression", b"on"), db],
            Some((V3_0, vec!["_pq_.compression"])),
        ),
        (
            1,
            vec![(b"_pq_.a", b""), user, db, (b"_pq_.b", b"x")],
            Some((V3_0, vec!["_pq_.a", "_pq_.b"])),
        ),
    ];
    for (minor, pairs, expected) in cases {
        let mut packet = startup_message(&pairs);
        packet[6..8].copy_from_slice(&minor.to_be_bytes());
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.write_all(&packet).await.expect("startup");
        let r = read_reply(&mut s, Duration::from_secs(10)).await;
        assert!(r.ready && r.error.is_none(), "3.{minor} {pairs:?}: {r:?}");
        let expected = expected.map(|(v, names)| (v, names.into_iter().map(String::from).collect::<Vec<_>>()));
        assert_eq!(r.negotiate, expected, "3.{minor} {pairs:?}");
        let q = query(&mut s, "select 1").await;
        assert_eq!(q.rows, [[Some(b"1".to_vec())]], "{q:?}");
    }
}

/// Bytes a departing client left unread in its session buffer (a partial message, or bytes
/// after a Terminate) must not reach the next client that gets that buffer from the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_clients_unread_bytes_never_reach_the_next() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 2).await;
    for i in 0..150 {
        let (mut a, r) = login(&proxy, &[]).await;
        assert!(r.ready);
        // Warm: a transaction so the session holds a buffer.
        let q = query(&mut a, "select 1").await;
        assert!(q.error.is_none());
        let leak = "select 'LEAKED-FROM-A'";
        let mut junk = Vec::new();
        if i % 2 == 0 {
            // A query whose declared length is more than what is sent, then gone.
            junk.push(b'Q');
            junk.extend_from_slice(&1000i32.to_be_bytes());
            junk.extend_from_slice(leak.as_bytes());
        } else {
            // Terminate followed by a complete query pgweir never runs.
            junk.extend_from_slice(&[b'X', 0, 0, 0, 4]);
            junk.push(b'Q');
            junk.extend_from_slice(&((leak.len() + 5) as i32).to_be_bytes());
            junk.extend_from_slice(leak.as_bytes());
            junk.push(0);
        }
        a.write_all(&junk).await.expect("junk");
        drop(a);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (mut b, r) = login(&proxy, &[]).await;
        assert!(r.ready, "{r:?}");
        let q = query(&mut b, "select 'b'").await;
        assert!(q.error.is_none(), "iteration {i}: {q:?}");
        assert_eq!(q.rows.len(), 1, "iteration {i}: {q:?}");
        assert_eq!(q.rows[0][0].as_deref(), Some(&b"b"[..]), "iteration {i}");
        let q = query(&mut b, "select 'b2'").await;
        assert_eq!(q.rows.len(), 1, "iteration {i}: {q:?}");
    }
}

/// A client is told what PostgreSQL reports for its startup values, not its own spelling, from
/// the pool's first login on (a server is asked once for a value no rule explains), and nothing
/// more once a server applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_told_the_servers_spelling_of_their_startup_values() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let long = "x".repeat(64);
    let accented = "\u{e9}".repeat(40);
    let cases: [(&str, &[u8]); 9] = [
        ("DateStyle", b"iso, dmy"),
        ("DateStyle", b"ISO"),
        ("client_encoding", b"utf8"),
        ("client_encoding", b"utf-8"),
        ("TimeZone", b"europe/paris"),
        ("IntervalStyle", b"ISO_8601"),
        ("standard_conforming_strings", b"ON"),
        ("application_name", long.as_bytes()),
        // PostgreSQL 15 cuts it to 31 whole characters, then writes '?' for each byte.
        ("application_name", accented.as_bytes()),
    ];
    let sql = |name: &str| format!("select current_setting('{name}')");
    for (name, value) in cases {
        for nth in ["first", "second"] {
            let (mut s, r) = login(&proxy, &[(name.as_bytes(), value)]).await;
            assert!(r.ready, "{name}={value:?}: {r:?}");
            let q = query(&mut s, &sql(name)).await;
            let actual = q.rows[0][0].clone().expect("a setting");
            assert_ne!(actual, value, "{name}: PostgreSQL canonicalises {value:?}");
            assert_eq!(
                status(&r, name),
                Some(&actual[..]),
                "{name}={value:?} at the {nth} login"
            );
            assert!(
                q.status.iter().all(|(k, _)| k != name),
                "{name}: nothing more to tell the client: {q:?}"
            );
        }
    }
}

/// Review 17's F2: the first client of a pool was told its own spelling at login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_parameter_status_matches_the_servers_value() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let long = "x".repeat(64);
    let cases: [(&str, &[u8], &str); 4] = [
        ("DateStyle", b"iso, dmy", "DateStyle"),
        ("client_encoding", b"utf8", "client_encoding"),
        ("TimeZone", b"europe/paris", "TimeZone"),
        ("application_name", long.as_bytes(), "application_name"),
    ];
    let mut bad = Vec::new();
    for (name, value, show) in cases {
        let (mut s, r) = login(&proxy, &[(name.as_bytes(), value)]).await;
        assert!(r.ready, "{r:?}");
        let reported = status(&r, name).map(|v| String::from_utf8_lossy(v).into_owned());
        let q = query(&mut s, &format!("select current_setting('{show}')")).await;
        let actual = String::from_utf8_lossy(q.rows[0][0].as_deref().unwrap_or_default()).into_owned();
        if reported.as_deref() != Some(actual.as_str()) {
            bad.push(format!("{name}: ParameterStatus {reported:?}, server has {actual:?}"));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// pgJDBC's startup packet: `DateStyle=ISO` names no field order, and PostgreSQL reports
/// "ISO, MDY" at login; a strict driver checks the DateStyle it is told. So must pgweir, for the
/// pool's first client too, and the session then needs no SET for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbcs_datestyle_is_reported_as_postgresql_reports_it() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let jdbc: [(&[u8], &[u8]); 5] = [
        (b"client_encoding", b"UTF8"),
        (b"DateStyle", b"ISO"),
        (b"TimeZone", b"Europe/Paris"),
        (b"extra_float_digits", b"3"),
        (b"application_name", b"PostgreSQL JDBC Driver"),
    ];
    let (mut s, r) = login(&proxy, &jdbc).await;
    assert!(r.ready, "{r:?}");
    assert_eq!(status(&r, "DateStyle"), Some(&b"ISO, MDY"[..]), "{r:?}");
    assert_eq!(status(&r, "TimeZone"), Some(&b"Europe/Paris"[..]), "{r:?}");
    for _ in 0..3 {
        let q = query(&mut s, "select current_setting('DateStyle')").await;
        assert_eq!(q.rows[0][0].as_deref(), Some(&b"ISO, MDY"[..]), "{q:?}");
        assert!(q.status.is_empty(), "nothing more to tell: {q:?}");
    }
}

/// Applications send the same startup packet every time: once the pool knows what PostgreSQL
/// reports for its values, a login needs no server. With the pool's only server held in a
/// transaction, the second identical login completes (it would wait past client_login_timeout
/// for a server) and no checkout is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_whose_values_are_known_needs_no_server() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let long = "x".repeat(64);
    let values: [(&[u8], &[u8]); 6] = [
        (b"DateStyle", b"iso, dmy"),
        (b"TimeZone", b"europe/paris"),
        (b"client_encoding", b"utf-8"),
        (b"IntervalStyle", b"ISO_8601"),
        (b"standard_conforming_strings", b"ON"),
        (b"application_name", long.as_bytes()),
    ];
    let expected: [(&str, &[u8]); 6] = [
        ("DateStyle", b"ISO, DMY"),
        ("TimeZone", b"Europe/Paris"),
        ("client_encoding", b"UTF8"),
        ("IntervalStyle", b"iso_8601"),
        ("standard_conforming_strings", b"on"),
        ("application_name", &long.as_bytes()[..63]),
    ];
    let (mut holder, r) = login(&proxy, &values).await;
    assert!(r.ready, "{r:?}");
    for (name, value) in expected {
        assert_eq!(status(&r, name), Some(value), "{name} at the first login");
    }
    let q = query(&mut holder, "begin").await;
    assert!(q.error.is_none(), "{q:?}");
    let pool = proxy
        .pool_where(|k| k.user == roles::TRUST)
        .expect("the trust user's pool");
    let checkouts = pool.stats().checkouts.load(Ordering::Relaxed);
    let (_second, r) = login(&proxy, &values).await;
    assert!(r.ready && r.error.is_none(), "{r:?}");
    for (name, value) in expected {
        assert_eq!(status(&r, name), Some(value), "{name} at the second login");
    }
    assert_eq!(
        pool.stats().checkouts.load(Ordering::Relaxed),
        checkouts,
        "the login took no server"
    );
    let q = query(&mut holder, "commit").await;
    assert!(q.error.is_none(), "{q:?}");
}

/// A pool keeps the last login worked out from a startup packet and copies it for the next
/// login with the same packet. Logins with other packets, taking turns, must each get their
/// own values: in ParameterStatus and on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_taking_turns_each_get_their_own_parameters() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    type Packet = &'static [(&'static [u8], &'static [u8])];
    let packets: [(Packet, &str, &str); 4] = [
        (
            &[(b"DateStyle", b"sql, dmy"), (b"application_name", b"a")],
            "SQL, DMY",
            "a",
        ),
        (&[], "ISO, MDY", ""),
        (
            &[(b"DateStyle", b"sql, dmy"), (b"application_name", b"b")],
            "SQL, DMY",
            "b",
        ),
        (
            &[(b"application_name", b"b"), (b"DateStyle", b"German")],
            "German, DMY",
            "b",
        ),
    ];
    for round in 0..3 {
        for (packet, datestyle, app) in packets {
            let (mut s, r) = login(&proxy, packet).await;
            assert!(r.ready, "{r:?}");
            let told = [status(&r, "DateStyle"), status(&r, "application_name")];
            assert_eq!(
                told,
                [Some(datestyle.as_bytes()), Some(app.as_bytes())],
                "round {round}, {packet:?}"
            );
            let q = query(
                &mut s,
                "select current_setting('DateStyle'), current_setting('application_name')",
            )
            .await;
            let has = [q.rows[0][0].as_deref(), q.rows[0][1].as_deref()];
            assert_eq!(
                has,
                [Some(datestyle.as_bytes()), Some(app.as_bytes())],
                "round {round}, {packet:?}"
            );
        }
    }
}

/// A startup value PostgreSQL refuses fails the login as it fails a login to PostgreSQL:
/// AuthenticationOk, then FATAL with PostgreSQL's SQLSTATE and message (read from PostgreSQL 15
/// with raw startup packets), and the connection closes. The server the value was tried on
/// serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_startup_value_fails_the_login_as_postgresql_does() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let cases: [(&str, &[u8], &str); 5] = [
        (
            "DateStyle",
            b"nonsense",
            r#"invalid value for parameter "DateStyle": "nonsense""#,
        ),
        (
            "TimeZone",
            b"Mars/Base",
            r#"invalid value for parameter "TimeZone": "Mars/Base""#,
        ),
        (
            "client_encoding",
            b"klingon",
            r#"invalid value for parameter "client_encoding": "klingon""#,
        ),
        (
            "IntervalStyle",
            b"roman",
            r#"invalid value for parameter "IntervalStyle": "roman""#,
        ),
        (
            "standard_conforming_strings",
            b"maybe",
            r#"parameter "standard_conforming_strings" requires a Boolean value"#,
        ),
    ];
    for (name, value, message) in cases {
        let (_s, r) = login(&proxy, &[(name.as_bytes(), value)]).await;
        assert!(!r.ready, "{name}: logged in: {r:?}");
        let (code, got) = r.error.clone().unwrap_or_default();
        assert_eq!(code, "22023", "{name}: {r:?}");
        // The name may come back in lower case: PostgreSQL names it as the statement that set
        // it did (pgweir's SET, not the startup packet).
        assert!(got.eq_ignore_ascii_case(message), "{name}: {got}");
        assert_eq!(r.severity, "FATAL", "{name}: {r:?}");
        assert!(r.eof, "{name}: the connection closes: {r:?}");
        let (mut next, r) = login(&proxy, &[]).await;
        assert!(r.ready, "{r:?}");
        let q = query(&mut next, "select 1").await;
        assert_eq!(q.rows[0][0].as_deref(), Some(&b"1"[..]), "{q:?}");
    }
}

/// The values a pool keeps are bounded, as they come from clients: past
/// CANONICAL_VALUES_KEPT a new value is still reported as PostgreSQL reports it (a server is
/// asked at each such login) but not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_values_a_pool_keeps_are_bounded() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 2).await;
    // Distinct spellings of one zone: the letters of `i`'s set bits in upper case.
    let spelling = |i: usize| -> String {
        let mut letter = 0;
        "america/argentina/buenos_aires"
            .chars()
            .map(|c| {
                if !c.is_ascii_alphabetic() {
                    return c;
                }
                letter += 1;
                if i >> (letter - 1) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    };
    let n = CANONICAL_VALUES_KEPT + 5;
    for i in 0..n {
        let value = spelling(i);
        let (_s, r) = login(&proxy, &[(b"TimeZone", value.as_bytes())]).await;
        assert!(r.ready, "{value}: {r:?}");
        assert_eq!(
            status(&r, "TimeZone"),
            Some(&b"America/Argentina/Buenos_Aires"[..]),
            "{value}"
        );
    }
    let pool = proxy
        .pool_where(|k| k.user == roles::TRUST)
        .expect("the trust user's pool");
    let kept: Vec<bool> = (0..n)
        .map(|i| pool.canonical_value("TimeZone", spelling(i).as_bytes()).is_some())
        .collect();
    assert_eq!(kept.iter().filter(|k| **k).count(), CANONICAL_VALUES_KEPT);
    assert!(kept[0] && !kept[n - 1], "the first kept, the last not");
}

/// pgJDBC sends `DateStyle=ISO`, which names no field order: PostgreSQL reads it against its
/// default ("ISO, MDY"). On a server the previous client left at "SQL, DMY", a bare `SET
/// DateStyle = 'ISO'` kept DMY, and '01/02/2024' became the 1st of February.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_datestyle_is_read_against_the_default_not_the_last_client() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let (mut european, r) = login(&proxy, &[(b"DateStyle", b"SQL, DMY")]).await;
    assert!(r.ready, "{r:?}");
    let q = query(&mut european, "select '01/02/2024'::date::text").await;
    assert_eq!(q.rows[0][0].as_deref(), Some(&b"01/02/2024"[..]), "{q:?}");
    drop(european);
    let (mut jdbc, r) = login(&proxy, &[(b"DateStyle", b"ISO")]).await;
    assert!(r.ready, "{r:?}");
    let q = query(
        &mut jdbc,
        "select current_setting('DateStyle'), '01/02/2024'::date::text",
    )
    .await;
    assert_eq!(q.rows[0][0].as_deref(), Some(&b"ISO, MDY"[..]), "{q:?}");
    assert_eq!(q.rows[0][1].as_deref(), Some(&b"2024-01-02"[..]), "{q:?}");
}

/// A startup setting PostgreSQL refuses ends the session with PostgreSQL's SQLSTATE and reason
/// (for an untracked setting, at the first transaction: pgweir applies those on a server, and
/// logins need none; a tracked one fails the login, see above), and
/// the server it was tried on does not go back to the pool half-set: the next client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_startup_setting_ends_the_session_with_postgresqls_reason() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let cases: [(&[u8], &str, &str); 3] = [
        (b"-c no_such_setting=1", "42704", "unrecognized configuration parameter"),
        (b"-c statement_timeout=abc", "22023", "invalid value for parameter"),
        (b"-c log_min_messages=debug1", "42501", "permission denied"),
    ];
    for (options, code, reason) in cases {
        let (mut s, r) = login(&proxy, &[(b"options", options)]).await;
        assert!(r.ready, "{r:?}");
        let q = query(&mut s, "select 1").await;
        let (got_code, message) = q.error.clone().unwrap_or_default();
        assert_eq!(got_code, code, "{q:?}");
        assert!(message.contains(reason), "{message}");
        assert!(q.eof || !q.ready, "the session ends: {q:?}");
        let (mut next, r) = login(&proxy, &[]).await;
        assert!(r.ready, "{r:?}");
        let q = query(&mut next, "select current_setting('statement_timeout')").await;
        assert_eq!(q.rows[0][0].as_deref(), Some(&b"0"[..]), "{q:?}");
    }
}

/// A setting's value is quoted for `standard_conforming_strings = on`; on a server a previous
/// client left at `off`, a backslash before a quote ended the literal early and the rest of the
/// value ran as SQL in pgweir's own SET batch (here a SET search_path; with a forced
/// `server_user`, with that user's rights). The batch must be read with the setting on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_value_never_runs_as_sql_whatever_the_server_quotes_by() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let off: (&[u8], &[u8]) = (b"standard_conforming_strings", b"off");
    let (mut legacy, r) = login(&proxy, &[off]).await;
    assert!(r.ready, "{r:?}");
    let q = query(&mut legacy, "select current_setting('standard_conforming_strings')").await;
    assert_eq!(q.rows[0][0].as_deref(), Some(&b"off"[..]), "{q:?}");
    drop(legacy);
    let payload = br"x\';SET search_path = pwned;--";
    let (mut attacker, r) = login(&proxy, &[off, (b"application_name", payload)]).await;
    assert!(r.ready, "{r:?}");
    let q = query(
        &mut attacker,
        "select current_setting('search_path'), current_setting('application_name'), \
         current_setting('standard_conforming_strings')",
    )
    .await;
    assert!(q.error.is_none(), "{q:?}");
    assert_eq!(q.rows[0][0].as_deref(), Some(&br#""$user", public"#[..]), "{q:?}");
    assert_eq!(q.rows[0][1].as_deref(), Some(&payload[..]), "{q:?}");
    // Still the client's own setting once its values are in.
    assert_eq!(q.rows[0][2].as_deref(), Some(&b"off"[..]), "{q:?}");
}

/// A setting's bytes are in the client's encoding. After a LATIN1 client the server read the
/// next UTF8 client's batch as LATIN1, before the batch's own client_encoding SET ran: a custom
/// `app.tenant = é` arrived as "Ã©".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_values_are_read_in_the_clients_own_encoding() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let (mut latin1, r) = login(&proxy, &[(b"client_encoding", b"LATIN1"), (b"app.tenant", b"\xe9")]).await;
    assert!(r.ready, "{r:?}");
    let q = query(&mut latin1, "select current_setting('app.tenant')").await;
    assert_eq!(q.rows[0][0].as_deref(), Some(&b"\xe9"[..]), "LATIN1 é: {q:?}");
    drop(latin1);
    let (mut utf8, r) = login(
        &proxy,
        &[(b"client_encoding", b"UTF8"), (b"app.tenant", "é".as_bytes())],
    )
    .await;
    assert!(r.ready, "{r:?}");
    let q = query(&mut utf8, "select current_setting('app.tenant')").await;
    assert_eq!(q.rows[0][0].as_deref(), Some("é".as_bytes()), "{q:?}");
}

/// PostgreSQL's RESET (ALL, one name, DISCARD ALL) goes back to the value the client sent at
/// login. A pooled server goes back to its own login values instead, and pgweir used to adopt
/// what the server then reported: after a RESET ALL a client that logged in with TimeZone
/// Asia/Tokyo and DateStyle "SQL, DMY" had the pool's UTC and ISO for the rest of its session,
/// and its driver was told so. Every message after login (ParameterStatus reports included) must
/// match what the same client gets from PostgreSQL directly, with another client's session
/// having used the one server in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_brings_back_the_clients_own_login_values() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let extra: [(&[u8], &[u8]); 4] = [
        (b"TimeZone", b"Asia/Tokyo"),
        (b"DateStyle", b"SQL, DMY"),
        (b"application_name", b"resetter"),
        // Reported but not tracked: its login value comes back with the others.
        (b"default_transaction_read_only", b"on"),
    ];
    let script = [
        "RESET ALL",
        "SHOW TimeZone",
        "SHOW DateStyle",
        "SET TimeZone = 'UTC'",
        "SHOW TimeZone",
        "DISCARD ALL",
        "SELECT current_setting('TimeZone'), current_setting('DateStyle'), current_setting('application_name')",
        "SET TimeZone = 'UTC'; SET application_name = 'other'",
        "RESET TimeZone",
        "SHOW TimeZone",
        "SHOW application_name",
        // (Not here: a RESET in the same Query as a SET. PostgreSQL reports only the batch's
        // net changes, just before ReadyForQuery, so pgweir cannot tell which of the two a
        // report comes from, and such a batch still adopts the server's values.)
        "SET TimeZone = 'America/New_York'",
        "RESET ALL",
        "SHOW TimeZone",
        "BEGIN; RESET ALL; COMMIT",
        // A RESET in disguise: PostgreSQL's DEFAULT is the login value too.
        "SET TimeZone = 'UTC'",
        "SET TimeZone TO DEFAULT",
        "SHOW TimeZone",
        "SET TIME ZONE 'Europe/Paris'",
        "SET TIME ZONE LOCAL",
        "SET DateStyle = 'German'",
        "SET SESSION DateStyle = DEFAULT;",
        "SELECT current_setting('TimeZone'), '01/02/2024'::date::text",
    ];
    same_as_direct(&pg, &proxy, &extra, &script, false).await;
}

/// Runs `script` (one Query each, or one Parse/Bind/Execute/Sync each when `extended`) as a client with the login settings `extra`, on PostgreSQL
/// directly and through `proxy` (whose one server another client has just used with values of
/// its own), and asserts that every message after login is the same, ParameterStatus included.
async fn same_as_direct(
    pg: &pgweir::embedded_pg::EmbeddedPostgres,
    proxy: &TestProxy,
    extra: &[(&[u8], &[u8])],
    script: &[&str],
    extended: bool,
) {
    // Every message as (tag, body), so reports, rows and tags are all compared.
    async fn run(s: &mut TcpStream, script: &[&str], extended: bool) -> Vec<(char, Vec<u8>)> {
        let mut all = Vec::new();
        for sql in script {
            let mut text = sql.as_bytes().to_vec();
            text.push(0);
            let out = if let Some(rest) = sql.strip_prefix('=') {
                // "=name SQL": prepares the named statement.
                let (name, text) = rest.split_once(' ').expect("=name SQL");
                [
                    wire::msg(b'P', &[name.as_bytes(), b"\0", text.as_bytes(), b"\0\0\0"].concat()),
                    wire::msg(b'S', b""),
                ]
                .concat()
            } else if let Some(name) = sql.strip_prefix('@') {
                // "@name": runs it.
                [
                    wire::msg(b'B', &[b"\0", name.as_bytes(), b"\0\0\0\0\0\0\0"].concat()),
                    wire::msg(b'E', b"\0\0\0\0\0"),
                    wire::msg(b'S', b""),
                ]
                .concat()
            } else if extended {
                // "a | b": both in one batch, one Sync.
                let mut batch: Vec<u8> = sql
                    .split(" | ")
                    .flat_map(|one| {
                        [
                            wire::msg(b'P', &[b"\0", one.as_bytes(), b"\0\0\0"].concat()),
                            wire::msg(b'B', b"\0\0\0\0\0\0\0\0"),
                            wire::msg(b'E', b"\0\0\0\0\0"),
                        ]
                        .concat()
                    })
                    .collect();
                batch.extend_from_slice(&wire::msg(b'S', b""));
                batch
            } else {
                wire::msg(b'Q', &text)
            };
            s.write_all(&out).await.expect("query");
            all.push(('>', sql.as_bytes().to_vec()));
            loop {
                let m = tokio::time::timeout(Duration::from_secs(10), wire::read_frame(s))
                    .await
                    .expect("reply in time")
                    .unwrap_or_else(|e| panic!("reading the reply to {sql}: {e}"));
                all.push((m[0] as char, m[5..].to_vec()));
                if m[0] == b'Z' {
                    break;
                }
            }
        }
        all
    }
    let mut pairs: Vec<(&[u8], &[u8])> = vec![(b"user", roles::TRUST.as_bytes()), (b"database", b"app")];
    pairs.extend_from_slice(extra);
    let mut direct = TcpStream::connect((pg.host(), pg.port()))
        .await
        .expect("connect directly");
    direct.write_all(&startup_message(&pairs)).await.expect("startup");
    let r = read_reply(&mut direct, Duration::from_secs(10)).await;
    assert!(r.ready && r.error.is_none(), "direct login: {r:?}");
    let want = run(&mut direct, script, extended).await;

    // Another client first leaves the one server with values of its own.
    let (mut other, r) = login(proxy, &[(b"TimeZone", b"Europe/Paris"), (b"DateStyle", b"German")]).await;
    assert!(r.ready && r.error.is_none(), "other login: {r:?}");
    assert!(query(&mut other, "SELECT 1").await.ready);
    let (mut s, r) = login(proxy, extra).await;
    assert!(r.ready && r.error.is_none(), "login: {r:?}");
    let got = run(&mut s, script, extended).await;
    let show = |v: &[(char, Vec<u8>)]| {
        v.iter()
            .map(|(t, b)| format!("{t} {}", String::from_utf8_lossy(b).replace('\0', "|")))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(show(&got), show(&want));
}

/// PostgreSQL reports a RESET's change from the value the client held to its login value; the
/// server behind pgweir goes back to its own default, and reports nothing when it had that value
/// already (the client then kept the SET value, and was told nothing). A ROLLBACK of a
/// transaction with a RESET goes back to the value before it: reported when the client was
/// told another, not reported when it holds that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_reports_its_login_values_though_the_server_changes_nothing() {
    let pg = support::postgres();
    let proxy = trust_proxy(&pg, 1).await;
    let extra: [(&[u8], &[u8]); 2] = [(b"IntervalStyle", b"iso_8601"), (b"DateStyle", b"German")];
    let script = [
        // The server's own default.
        "SET IntervalStyle = 'postgres'",
        "RESET IntervalStyle",
        "SHOW IntervalStyle",
        "SET IntervalStyle = 'postgres'",
        "RESET TimeZone; RESET IntervalStyle",
        "SHOW IntervalStyle",
        "SET IntervalStyle = 'postgres'",
        "BEGIN; RESET IntervalStyle; COMMIT",
        "SHOW IntervalStyle",
        "SET IntervalStyle = 'postgres'",
        "SET application_name = 'x'",
        "RESET ALL",
        "SELECT current_setting('IntervalStyle'), current_setting('application_name')",
        "SET IntervalStyle = 'postgres'",
        "BEGIN",
        "RESET ALL",
        "ROLLBACK",
        "SHOW IntervalStyle",
        "BEGIN",
        "RESET DateStyle",
        "ROLLBACK",
        "SHOW DateStyle",
        // The server reports the rollback of one, pgweir the other: in PostgreSQL's order.
        "SET TimeZone = 'Asia/Tokyo'",
        "BEGIN",
        "RESET ALL",
        "ROLLBACK",
        "SELECT current_setting('IntervalStyle'), current_setting('TimeZone')",
        "BEGIN",
        "SET IntervalStyle TO DEFAULT",
        "COMMIT",
        "SHOW IntervalStyle",
    ];
    same_as_direct(&pg, &proxy, &extra, &script, false).await;
    // As pgJDBC sends them (but SET … TO DEFAULT, recognised only in a Query).
    let script: Vec<&str> = script
        .into_iter()
        .filter(|sql| !sql.ends_with("DEFAULT") && !sql.contains(';'))
        .collect();
    same_as_direct(&pg, &proxy, &extra, &script, true).await;
    // A RESET ALL prepared once and run later, as pgJDBC does with one it runs often.
    let script = [
        "=rs RESET ALL",
        "SET IntervalStyle = 'postgres'",
        "@rs",
        "SHOW IntervalStyle",
        "SET IntervalStyle = 'postgres'",
        "BEGIN",
        "@rs",
        "ROLLBACK",
        "SHOW IntervalStyle",
        // The error rolls the batch's implicit transaction back, the RESET with it.
        "RESET ALL | SELECT 1/0",
        "SHOW IntervalStyle",
    ];
    same_as_direct(&pg, &proxy, &extra, &script, true).await;
}
