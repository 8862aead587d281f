//! `[[hba]]` rules (who may connect from where) and the login-failure metric.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use pgweir::app::Proxy;
use pgweir::config::hba::{HbaAction, HbaAddress, HbaRule};
use pgweir::embedded_pg::roles;
use support::SSL_REQUEST;
use support::proxy::{TestProxy, TestProxyBuilder, message, sqlstate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn rule(action: HbaAction, address: &str) -> HbaRule {
    HbaRule {
        action,
        address: HbaAddress::parse(address).expect("address"),
        databases: None,
        users: None,
        tls: None,
    }
}

/// Logs in through `proxy` from the loopback address `from` (all of 127.0.0.0/8 is local).
async fn connect_from(
    proxy: &TestProxy,
    from: &str,
    role: (&str, &str),
    dbname: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from.parse().expect("ip"), 0))
        .expect("bind source address");
    let stream = socket.connect(proxy.addr).await.expect("connect");
    let config: tokio_postgres::Config = proxy.conn_str(role, dbname).parse().expect("config");
    let (client, conn) = config.connect_raw(stream, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_match_address_user_database_and_tls_first_match_wins() {
    let pg = support::postgres();
    let mut scram_on_app = rule(HbaAction::Allow, "127.0.0.0/8");
    scram_on_app.users = Some(vec![roles::SCRAM.0.to_owned()]);
    scram_on_app.databases = Some(vec!["app".to_owned()]);
    let mut md5_tls_only = rule(HbaAction::Allow, "all");
    md5_tls_only.users = Some(vec![roles::MD5.0.to_owned()]);
    md5_tls_only.tls = Some(true);
    let mut builder = TestProxyBuilder::new(&pg);
    builder.hba = vec![rule(HbaAction::Deny, "127.0.0.2"), scram_on_app, md5_tls_only];
    let proxy = builder.start().await;

    let ok = connect_from(&proxy, "127.0.0.1", roles::SCRAM, "app")
        .await
        .expect("allowed");
    assert_eq!(ok.query_one("SELECT 1", &[]).await.expect("query").get::<_, i32>(0), 1);
    let ok = connect_from(&proxy, "127.0.0.3", roles::SCRAM, "app")
        .await
        .expect("allowed");
    assert_eq!(ok.query_one("SELECT 1", &[]).await.expect("query").get::<_, i32>(0), 1);

    // Rule 1 denies 127.0.0.2 before rule 2 could allow it.
    let e = connect_from(&proxy, "127.0.0.2", roles::SCRAM, "app")
        .await
        .expect_err("denied");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e:?}");
    assert!(
        message(&e).contains("rule 1 rejects connection for host \"127.0.0.2\""),
        "{e:?}"
    );

    // No rule for this database, or for this user without TLS.
    let e = connect_from(&proxy, "127.0.0.1", roles::SCRAM, "postgres")
        .await
        .expect_err("db");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e:?}");
    assert!(message(&e).contains("no pgweir [[hba]] rule allows"), "{e:?}");
    let e = connect_from(&proxy, "127.0.0.1", roles::MD5, "app")
        .await
        .expect_err("plaintext");
    assert!(message(&e).contains("no encryption"), "{e:?}");

    // Denied before any password exchange: a wrong password is not even asked for.
    let e = connect_from(&proxy, "127.0.0.2", (roles::SCRAM.0, "wrong"), "app")
        .await
        .expect_err("denied");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_reload_with_the_configuration() {
    let pg = support::postgres();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("pgweir.toml");
    let (user, password) = roles::SCRAM;
    let write = |action: &str| {
        let text = format!(
            "[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"\"\n\
             [[hba]]\naction = \"{action}\"\naddress = \"127.0.0.0/8\"\n\
             [databases.app]\nhost = \"{}\"\nport = {}\n[users.{user}]\npassword = \"{password}\"\n",
            pg.host(),
            pg.port()
        );
        std::fs::write(&path, text).expect("config");
    };
    write("deny");
    let config = pgweir::config::Config::load(&path).expect("valid");
    let proxy = TestProxy::wrap(Proxy::start_with_path(config, Some(path.clone())).await.expect("start"));
    let e = proxy.try_connect(roles::SCRAM, "app").await.expect_err("denied");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e:?}");

    write("allow");
    proxy.proxy().context().reload_from_file().expect("reload");
    let client = proxy.connect(roles::SCRAM).await;
    client.batch_execute("BEGIN").await.expect("begin");

    // A connection accepted under the old rules logs in under the rules in force when its
    // startup packet arrives. The SSLRequest's 'N' shows its login has begun before the reload.
    let mut early = TcpStream::connect(proxy.addr).await.expect("connect");
    early.write_all(&SSL_REQUEST).await.expect("SSLRequest");
    let mut answer = [0u8; 1];
    early.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"N");

    // Tightening the rules affects new logins only: a connected client keeps working.
    write("deny");
    proxy.proxy().context().reload_from_file().expect("reload");
    assert!(proxy.try_connect(roles::SCRAM, "app").await.is_err());
    let config: tokio_postgres::Config = proxy.conn_str(roles::SCRAM, "app").parse().expect("config");
    let e = config
        .connect_raw(early, tokio_postgres::NoTls)
        .await
        .err()
        .expect("denied by the reloaded rules");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e:?}");
    client
        .batch_execute("COMMIT")
        .await
        .expect("commit on the existing session");

    // A broken rule is refused with its key and the running rules stay.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .expect("read")
            .replace("127.0.0.0/8", "127.0.0.0/99"),
    )
    .expect("write");
    let e = proxy.proxy().context().reload_from_file().expect_err("bad CIDR");
    assert!(e.contains("hba[1].address"), "{e}");
}

/// The value of `pgweir_client_login_failures_total{reason=…}` on /metrics.
async fn login_failures(proxy: &TestProxy, reason: &str) -> u64 {
    proxy
        .metric(&format!("pgweir_client_login_failures_total{{reason=\"{reason}\"}}"))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_counted_by_reason() {
    let pg = support::postgres();
    let mut builder = TestProxyBuilder::new(&pg);
    builder.hba = vec![rule(HbaAction::Deny, "127.0.0.9"), rule(HbaAction::Allow, "all")];
    builder.client_login_timeout = Duration::from_millis(300);
    let proxy = builder.start().await;
    for reason in [
        "bad_password",
        "unknown_user",
        "hba_denied",
        "timeout",
        "protocol",
        "unknown_database",
    ] {
        assert_eq!(login_failures(&proxy, reason).await, 0, "{reason}");
    }

    for _ in 0..2 {
        let e = proxy
            .try_connect((roles::SCRAM.0, "wrong"), "app")
            .await
            .expect_err("wrong password");
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
    }
    let e = proxy
        .try_connect(("nobody", "x"), "app")
        .await
        .expect_err("unknown user");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
    let e = connect_from(&proxy, "127.0.0.9", roles::SCRAM, "app")
        .await
        .expect_err("hba");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"));
    let e = proxy.try_connect(roles::SCRAM, "nope").await.expect_err("database");
    assert_eq!(sqlstate(&e).as_deref(), Some("3D000"));
    // A slowloris client, and one that sends garbage.
    let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
    slow.write_all(&[0, 0]).await.expect("half a length");
    let mut garbage = TcpStream::connect(proxy.addr).await.expect("connect");
    garbage.write_all(&[0, 0, 0, 3, 1, 2, 3, 4]).await.expect("bad length");

    assert!(
        support::proxy::eventually(Duration::from_secs(5), || async {
            login_failures(&proxy, "timeout").await == 1 && login_failures(&proxy, "protocol").await == 1
        })
        .await
    );
    assert_eq!(login_failures(&proxy, "bad_password").await, 2);
    assert_eq!(login_failures(&proxy, "unknown_user").await, 1);
    assert_eq!(login_failures(&proxy, "hba_denied").await, 1);
    assert_eq!(login_failures(&proxy, "unknown_database").await, 1);
    // Successful logins count nowhere.
    let client = proxy.connect(roles::SCRAM).await;
    assert_eq!(client.query_one("SELECT 1", &[]).await.expect("q").get::<_, i32>(0), 1);
    assert_eq!(login_failures(&proxy, "bad_password").await, 2);
}
