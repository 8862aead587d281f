//! Unix-domain sockets on both sides: clients on pgweir's `listen.unix_socket_dir`, and pgweir
//! reaching PostgreSQL through its socket directory (`host = "/dir"`), as PgBouncer does.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use pgweir::app::{AppError, Proxy};
use pgweir::config::ClientTlsMode;
use pgweir::config::hba::{HbaAction, HbaAddress, HbaRule};
use pgweir::embedded_pg::roles;
use support::pki::{Pki, client_tls};
use support::proxy::{TestProxy, TestProxyBuilder, message, sqlstate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Logs in over the Unix socket in `dir` of the listener on `port` (libpq's `host=/dir`).
async fn unix_client(
    dir: &Path,
    port: u16,
    (user, password): (&str, &str),
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conn_str = format!(
        "host={} port={port} user={user} password={password} dbname=app connect_timeout=10",
        dir.display()
    );
    let (client, conn) = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).expect("JSON body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_servers_meet_over_unix_sockets() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("socket dir");
    let mut builder = TestProxyBuilder::new(&pg).pool_size(2);
    builder.unix_socket_dir = Some(dir.path().to_owned());
    builder.server_unix_socket = true;
    let proxy = builder.start().await;

    let path = proxy
        .proxy()
        .unix_socket_path()
        .expect("listening on a socket")
        .to_owned();
    assert_eq!(path, dir.path().join(format!(".s.PGSQL.{}", proxy.port())));
    let meta = std::fs::symlink_metadata(&path).expect("socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o777, "unix_socket_mode default");

    let local = unix_client(dir.path(), proxy.port(), roles::SCRAM)
        .await
        .expect("login over pgweir's Unix socket");
    let tcp = proxy.connect(roles::SCRAM).await;
    // inet_client_addr() is NULL exactly for a backend reached over its Unix socket.
    for client in [&local, &tcp] {
        let row = client
            .query_one("SELECT inet_client_addr() IS NULL, current_user::text", &[])
            .await
            .expect("query");
        assert!(
            row.get::<_, bool>(0),
            "pgweir must reach PostgreSQL over its Unix socket"
        );
        assert_eq!(row.get::<_, String>(1), roles::SCRAM.0);
    }

    // Transaction pooling across both kinds of client: four clients share two servers, each
    // with its own prepared statement and transaction.
    let mut clients = vec![local, tcp];
    clients.push(unix_client(dir.path(), proxy.port(), roles::MD5).await.expect("login"));
    clients.push(proxy.connect(roles::PLAIN).await);
    let work = clients.iter().enumerate().map(|(i, c)| async move {
        let stmt = c.prepare("SELECT $1::int + $2::int").await.expect("prepare");
        for n in 0..50 {
            let tx_value = i as i32 * 1000 + n;
            c.batch_execute("BEGIN").await.expect("begin");
            let row = c.query_one(&stmt, &[&tx_value, &1]).await.expect("execute");
            assert_eq!(row.get::<_, i32>(0), tx_value + 1);
            c.batch_execute("COMMIT").await.expect("commit");
        }
    });
    futures_util::future::join_all(work).await;

    // The admin API tells the Unix-socket clients from the TCP ones, and names the process
    // behind each socket (this test's, which runs the clients) as PgBouncer writes it.
    let (status, body) = proxy.admin("GET", "/api/clients", None, None).await;
    assert_eq!(status, 200, "{body}");
    let listed = json(&body);
    let mut addrs: Vec<String> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["addr"].as_str().expect("addr").to_owned())
        .collect();
    addrs.sort();
    assert_eq!(addrs.len(), 4, "{body}");
    assert!(
        addrs[0].starts_with("127.0.0.1:") && addrs[1].starts_with("127.0.0.1:"),
        "{addrs:?}"
    );
    let me = std::process::id();
    assert_eq!(&addrs[2..], [format!("unix({me})"), format!("unix({me})")], "{addrs:?}");
    for c in listed.as_array().expect("array") {
        match c["addr"].as_str().expect("addr").starts_with("unix") {
            true => assert_eq!(c["unix_peer"]["pid"], me, "{c}"),
            false => assert!(c["unix_peer"].is_null(), "{c}"),
        }
    }

    // A cancel arrives on pgweir's socket and reaches PostgreSQL through its socket.
    let victim = &clients[0];
    let token = victim.cancel_token();
    let started = std::time::Instant::now();
    let (slept, ()) = tokio::join!(victim.simple_query("SELECT pg_sleep(30)"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.expect("cancel sent");
    });
    let e = slept.expect_err("cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let row = victim
        .query_one("SELECT 7", &[])
        .await
        .expect("usable after the cancel");
    assert_eq!(row.get::<_, i32>(0), 7);

    drop(clients);
    proxy.shutdown(Duration::from_secs(5)).await;
    assert!(!path.exists(), "shutdown removes the socket file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_group_owns_the_socket_file() {
    use std::os::unix::fs::MetadataExt;
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("socket dir");
    let mut builder = TestProxyBuilder::new(&pg);
    builder.unix_socket_dir = Some(dir.path().to_owned());
    let mut config = builder.config();
    // A group this process is not in: root may give the file to it, anyone else is refused.
    config.listen.unix_socket_group = Some(4242);
    config.listen.unix_socket_mode = 0o770;
    let as_root = std::fs::metadata("/proc/self").expect("proc").uid() == 0;
    match Proxy::start(config).await {
        Ok(proxy) => {
            assert!(as_root, "only root can give the socket to a group it is not in");
            let proxy = TestProxy::wrap(proxy);
            let path = proxy.proxy().unix_socket_path().expect("socket").to_owned();
            let meta = std::fs::symlink_metadata(&path).expect("socket file");
            assert_eq!(meta.gid(), 4242, "unix_socket_group");
            assert_eq!(meta.permissions().mode() & 0o777, 0o770, "unix_socket_mode");
            proxy.shutdown(Duration::from_secs(5)).await;
        }
        Err(e) => {
            assert!(!as_root, "root must be able to set the group: {e}");
            assert!(matches!(e, AppError::UnixSocketGroup { gid: 4242, .. }), "{e}");
            assert!(e.to_string().contains("member of that group"), "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_replaced_and_a_live_one_is_not_taken() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("socket dir");
    let mut builder = TestProxyBuilder::new(&pg);
    builder.unix_socket_dir = Some(dir.path().to_owned());
    let mut config = builder.config();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    config.listen.addr.set_port(port);
    let path = dir.path().join(format!(".s.PGSQL.{port}"));

    // A live socket (another process listening) is left alone.
    let live = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let e = match Proxy::start(config.clone()).await {
        Err(e) => e,
        Ok(_) => panic!("a socket in use must not be taken over"),
    };
    assert!(matches!(e, AppError::SocketInUse { .. }), "{e}");
    assert!(e.to_string().contains("another process is listening"), "{e}");
    drop(live);
    std::fs::remove_file(&path).expect("remove");
    // A non-blocking connect, as pgweir's probe makes.
    let connect = || {
        let c = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        c.set_nonblocking(true)?;
        c.connect(&socket2::SockAddr::unix(&path)?).map(|()| c)
    };
    // Live too when its backlog is full: Linux answers the probe's connect with EAGAIN.
    let busy = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).expect("socket");
    busy.bind(&socket2::SockAddr::unix(&path).expect("addr")).expect("bind");
    busy.listen(0).expect("listen");
    let mut queued = Vec::new();
    for _ in 0..8 {
        match connect() {
            Ok(c) => queued.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("connect: {e}"),
        }
    }
    assert!(queued.len() < 8, "the backlog filled up");
    match Proxy::start(config.clone()).await {
        Err(AppError::SocketInUse { .. }) => {}
        Err(e) => panic!("a listener with a full backlog is in use, got: {e}"),
        Ok(_) => panic!("a socket in use must not be taken over"),
    }
    drop(queued);
    // Closed without removing its file, as after a crash: the file is stale now.
    drop(busy);
    assert!(path.exists());
    // Another test forking meanwhile (each starts its own PostgreSQL) holds a copy of the
    // listener's descriptor until its child execs, so the socket can outlive the drop briefly
    // and would rightly count as live: wait until nobody listens.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match connect() {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "the dropped listener still answers: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let proxy = TestProxy::wrap(Proxy::start(config.clone()).await.expect("stale socket replaced"));
    let client = unix_client(dir.path(), port, roles::SCRAM).await.expect("login");
    assert_eq!(
        client.query_one("SELECT 1", &[]).await.expect("query").get::<_, i32>(0),
        1
    );
    drop(client);
    // A successor (a rolling restart) took the path over while this one still runs: this
    // one's shutdown must not delete the successor's socket.
    std::fs::remove_file(&path).expect("remove");
    let successor = std::os::unix::net::UnixListener::bind(&path).expect("successor binds");
    proxy.shutdown(Duration::from_secs(5)).await;
    assert!(path.exists(), "the successor's socket file was removed");
    std::os::unix::net::UnixStream::connect(&path).expect("the successor still reachable");
    drop(successor);
    std::fs::remove_file(&path).expect("remove");

    // Anything but a socket in the way is an error, not deleted.
    std::fs::write(&path, "not a socket").expect("write");
    let e = match Proxy::start(config).await {
        Err(e) => e,
        Ok(_) => panic!("a regular file must not be replaced"),
    };
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).expect("still there"), "not a socket");
}

/// A start-up that fails after the socket file was bound (here: the admin address is taken)
/// removes the file again rather than leaving a stale one behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_up_removes_its_socket_file() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("socket dir");
    let mut builder = TestProxyBuilder::new(&pg);
    builder.unix_socket_dir = Some(dir.path().to_owned());
    let mut config = builder.config();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    config.admin.addr = Some(taken.local_addr().expect("addr"));
    let e = match Proxy::start(config).await {
        Err(e) => e,
        Ok(_) => panic!("the admin address is taken"),
    };
    assert!(matches!(e, AppError::Bind { .. }), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|entry| entry.expect("entry").path())
        .collect();
    assert!(left.is_empty(), "socket file left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rules_and_tls_require_treat_the_socket_as_this_host() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("socket dir");
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["127.0.0.1"]);
    let mut builder = TestProxyBuilder::new(&pg);
    builder.unix_socket_dir = Some(dir.path().to_owned());
    builder.tls = client_tls(ClientTlsMode::Require, &leaf);
    let rule = |action, address: &str| HbaRule {
        action,
        address: HbaAddress::parse(address).expect("address"),
        databases: None,
        users: None,
        tls: None,
    };
    builder.hba = vec![rule(HbaAction::Allow, "local"), rule(HbaAction::Deny, "all")];
    let proxy = builder.start().await;

    // TLS is required on the network, not on the host's own socket; the `local` rule admits it.
    let client = unix_client(dir.path(), proxy.port(), roles::SCRAM)
        .await
        .expect("plaintext login over the socket");
    assert_eq!(
        client.query_one("SELECT 1", &[]).await.expect("query").get::<_, i32>(0),
        1
    );

    // An SSLRequest on the socket is answered 'N', as PostgreSQL does there.
    let path = proxy.proxy().unix_socket_path().expect("socket").to_owned();
    let mut raw = tokio::net::UnixStream::connect(&path).await.expect("connect");
    raw.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .expect("SSLRequest");
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), raw.read_exact(&mut answer))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(answer[0], b'N');

    // TCP clients still need TLS (refused before the rules are even consulted).
    let e = proxy.try_connect(roles::SCRAM, "app").await.expect_err("plaintext TCP");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e:?}");
    assert!(message(&e).contains("requires TLS"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_only_rule_refuses_tcp_clients_by_name() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("socket dir");
    let mut builder = TestProxyBuilder::new(&pg);
    builder.unix_socket_dir = Some(dir.path().to_owned());
    builder.hba = vec![HbaRule {
        action: HbaAction::Allow,
        address: HbaAddress::Local,
        databases: None,
        users: None,
        tls: None,
    }];
    let proxy = builder.start().await;
    let client = unix_client(dir.path(), proxy.port(), roles::SCRAM)
        .await
        .expect("local login");
    assert_eq!(
        client.query_one("SELECT 1", &[]).await.expect("query").get::<_, i32>(0),
        1
    );
    let e = proxy
        .try_connect(roles::SCRAM, "app")
        .await
        .expect_err("TCP has no rule");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e:?}");
    assert!(
        message(&e).contains("no pgweir [[hba]] rule allows host \"127.0.0.1\""),
        "{e:?}"
    );
    let e = {
        let mut deny = TestProxyBuilder::new(&pg);
        deny.unix_socket_dir = Some(dir.path().to_owned());
        deny.hba = vec![HbaRule {
            action: HbaAction::Deny,
            address: HbaAddress::Local,
            databases: None,
            users: None,
            tls: None,
        }];
        let denying = deny.start().await;
        unix_client(dir.path(), denying.port(), roles::SCRAM)
            .await
            .expect_err("denied")
    };
    assert!(
        message(&e).contains("rule 1 rejects connection for host \"[local]\""),
        "{e:?}"
    );
}

/// As in libpq, TLS does not apply on a Unix socket: `server_tls.mode = "require"` still
/// connects (this PostgreSQL has no TLS at all, so over TCP the same pool fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_does_not_apply_over_postgresqls_unix_socket() {
    use pgweir::config::{ServerTlsConfig, ServerTlsMode};
    use pgweir::net::tls::{self, ServerVerify};
    let pg = support::postgres();
    let require = || ServerTlsConfig {
        mode: ServerTlsMode::Require,
        ca_file: None,
        server_name: None,
        connector: Some(tls::connector(ServerVerify::None, None).expect("connector")),
    };
    let mut builder = TestProxyBuilder::new(&pg).with_pool(|p| p.server_tls = require());
    builder.server_unix_socket = true;
    let proxy = builder.start().await;
    let client = proxy.connect(roles::SCRAM).await;
    let row = client
        .query_one(
            "SELECT ssl, inet_client_addr() IS NULL FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("served over the socket");
    assert!(!row.get::<_, bool>(0) && row.get::<_, bool>(1));

    // The same pool over TCP: this PostgreSQL cannot do TLS, so require fails there.
    let tcp = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.server_tls = require())
        .start()
        .await;
    let e = tcp.try_connect(roles::SCRAM, "app").await.expect_err("no TLS over TCP");
    assert!(message(&e).contains("TLS"), "{e:?}");
}
