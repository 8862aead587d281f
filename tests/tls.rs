//! TLS on both sides: clients to pgweir (tokio-postgres + rustls, psql, raw sockets for the
//! attacks), and pgweir to a real PostgreSQL with ssl = on. Certificates are made per test run.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pgweir::app::Proxy;
use pgweir::config::{ClientTlsMode, ServerTlsConfig, ServerTlsMode};
use pgweir::embedded_pg::{EmbeddedOptions, EmbeddedPostgres, EmbeddedTls, roles};
use pgweir::net::tls::{self, ServerVerify};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::pki::{Leaf, Pki, client_tls};
use support::proxy::{TestProxy, TestProxyBuilder, message, sqlstate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A proxy in front of `pg` serving TLS to clients with `leaf`.
async fn tls_proxy(pg: &EmbeddedPostgres, mode: ClientTlsMode, leaf: &Leaf) -> TestProxy {
    let mut builder = TestProxyBuilder::new(pg);
    builder.tls = client_tls(mode, leaf);
    builder.start().await
}

/// A rustls client config trusting only `ca_file`, offering `alpn`.
fn rustls_client(ca_file: &Path, alpn: Option<&[u8]>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("read CA") {
        roots.add(cert.expect("CA pem")).expect("add CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if let Some(alpn) = alpn {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    config
}

async fn connect_tls(
    proxy: &TestProxy,
    ca_file: &Path,
    sslmode: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (user, password) = roles::SCRAM;
    let conn_str = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=app sslmode={sslmode} connect_timeout=10",
        proxy.port()
    );
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client(ca_file, None));
    let (client, conn) = tokio_postgres::connect(&conn_str, tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn select_one(client: &tokio_postgres::Client) -> i32 {
    client.query_one("SELECT 1", &[]).await.expect("query").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_tls_and_plaintext_refused_in_require_mode() {
    let pg = support::postgres();
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["localhost", "127.0.0.1"]);
    let proxy = tls_proxy(&pg, ClientTlsMode::Require, &leaf).await;

    // The rustls config checks the chain and the name (127.0.0.1 is in the certificate):
    // verify-full semantics.
    let client = connect_tls(&proxy, &pki.ca_file(), "require").await.expect("TLS login");
    assert_eq!(select_one(&client).await, 1);
    // Many round trips and a result larger than one TLS record both ways.
    let big: String = client
        .query_one("SELECT repeat('x', 200000)", &[])
        .await
        .expect("big result")
        .get(0);
    assert_eq!(big.len(), 200_000);
    for i in 0..50 {
        let v: i32 = client
            .query_one("SELECT $1::int", &[&i])
            .await
            .expect("extended")
            .get(0);
        assert_eq!(v, i);
    }

    let e = proxy
        .try_connect(roles::SCRAM, "app")
        .await
        .expect_err("plaintext refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
    assert!(message(&e).contains("requires TLS"), "{e:?}");

    // A client trusting another CA refuses pgweir's certificate.
    let other = Pki::new("someone else's CA");
    let e = connect_tls(&proxy, &other.ca_file(), "require")
        .await
        .expect_err("unknown CA");
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_mode_serves_both_and_disable_answers_n() {
    let pg = support::postgres();
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["127.0.0.1"]);
    let proxy = tls_proxy(&pg, ClientTlsMode::Prefer, &leaf).await;
    let tls_client = connect_tls(&proxy, &pki.ca_file(), "require").await.expect("TLS login");
    let plain = proxy.connect(roles::SCRAM).await;
    assert_eq!(select_one(&tls_client).await, 1);
    assert_eq!(select_one(&plain).await, 1);
    // The admin API says which clients use TLS, and with what.
    let (status, body) = proxy.admin("GET", "/api/clients", None, None).await;
    assert_eq!(status, 200, "{body}");
    let clients: serde_json::Value = serde_json::from_str(&body).expect("json");
    let tls: Vec<&serde_json::Value> = clients.as_array().expect("array").iter().map(|c| &c["tls"]).collect();
    assert_eq!(tls.len(), 2, "{body}");
    assert_eq!(tls.iter().filter(|t| t.is_null()).count(), 1, "{body}");
    assert!(
        tls.iter().any(|t| t.as_str().is_some_and(|s| s.starts_with("TLSv1_"))),
        "{body}"
    );

    // With TLS disabled, sslmode=require fails cleanly (the server said 'N').
    let plain_proxy = TestProxyBuilder::new(&pg).start().await;
    let e = connect_tls(&plain_proxy, &pki.ca_file(), "require")
        .await
        .expect_err("no TLS offered");
    assert!(e.to_string().contains("TLS") || e.to_string().contains("SSL"), "{e}");
}

fn psql(pg: &EmbeddedPostgres, conninfo: &str) -> std::process::Output {
    let mut cmd = std::process::Command::new(pg.tool("psql"));
    cmd.args(["-X", "-A", "-t", "-c", "SELECT 40 + 2", conninfo])
        .env("PGPASSWORD", roles::SCRAM.1)
        .env("PGCONNECT_TIMEOUT", "10");
    cmd.output().expect("run psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_sslmode_require_and_verify_full() {
    let pg = support::postgres();
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["localhost", "127.0.0.1"]);
    let proxy = tls_proxy(&pg, ClientTlsMode::Require, &leaf).await;
    let port = proxy.port();
    let ca = pki.ca_file();
    for mode in ["require", "verify-ca", "verify-full"] {
        let conninfo = format!(
            "host=127.0.0.1 port={port} user={} dbname=app sslmode={mode} sslrootcert={}",
            roles::SCRAM.0,
            ca.display()
        );
        let out = tokio::task::block_in_place(|| psql(&pg, &conninfo));
        assert!(
            out.status.success(),
            "psql sslmode={mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    }
    // verify-full against a certificate for another name fails on the client side.
    let wrong = pki.leaf("wrong", &["db.example.com"]);
    let wrong_proxy = tls_proxy(&pg, ClientTlsMode::Require, &wrong).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} dbname=app sslmode=verify-full sslrootcert={}",
        wrong_proxy.port(),
        roles::SCRAM.0,
        ca.display()
    );
    let out = tokio::task::block_in_place(|| psql(&pg, &conninfo));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match host name"), "{err}");
}

/// Reads until EOF (bounded) and returns everything the server sent.
async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_stuffed_after_ssl_request_are_rejected() {
    let pg = support::postgres();
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["127.0.0.1"]);
    let proxy = tls_proxy(&pg, ClientTlsMode::Prefer, &leaf).await;

    // SSLRequest and a plaintext StartupMessage in one write: pgweir must not answer 'S' and
    // then treat the stuffed bytes as if they came through TLS.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut packet = SSL_REQUEST.to_vec();
    packet.extend_from_slice(&support::startup_packet(roles::TRUST, "app"));
    s.write_all(&packet).await.expect("send");
    let reply = read_all(&mut s).await;
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains("08P01") && text.contains("unencrypted data after SSL request"),
        "{text}"
    );

    // The slower variant: wait for 'S', then send plaintext instead of a ClientHello. rustls
    // sees a corrupt record; no PostgreSQL message ever comes back.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&SSL_REQUEST).await.expect("send");
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.expect("answer");
    assert_eq!(answer[0], b'S');
    s.write_all(&support::startup_packet(roles::TRUST, "app"))
        .await
        .expect("send");
    let reply = read_all(&mut s).await;
    assert!(
        reply.is_empty() || reply[0] == 0x15,
        "expected EOF or a TLS alert, got {reply:?}"
    );

    // The proxy is unharmed.
    let client = proxy.connect(roles::SCRAM).await;
    assert_eq!(select_one(&client).await, 1);
}

/// PostgreSQL 17's sslnegotiation=direct: a ClientHello with ALPN "postgresql" straight away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_is_accepted_and_without_alpn_refused() {
    let pg = support::postgres();
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["127.0.0.1"]);
    let proxy = tls_proxy(&pg, ClientTlsMode::Require, &leaf).await;
    let name = ServerName::try_from("127.0.0.1").expect("name");

    let connector = tokio_rustls::TlsConnector::from(Arc::new(rustls_client(&pki.ca_file(), Some(b"postgresql"))));
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let tls = connector
        .connect(name.clone(), tcp)
        .await
        .expect("direct TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    // Inside the TLS session the protocol starts at the StartupMessage, no SSLRequest.
    let mut config: tokio_postgres::Config = proxy.conn_str(roles::SCRAM, "app").parse().expect("config");
    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, conn) = config
        .connect_raw(tls, tokio_postgres::NoTls)
        .await
        .expect("login over direct TLS");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    assert_eq!(select_one(&client).await, 1);

    // Without ALPN the handshake may complete, but pgweir closes without serving the client.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(rustls_client(&pki.ca_file(), None)));
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    if let Ok(tls) = connector.connect(name.clone(), tcp).await {
        let mut config: tokio_postgres::Config = proxy.conn_str(roles::SCRAM, "app").parse().expect("config");
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        assert!(
            config.connect_raw(tls, tokio_postgres::NoTls).await.is_err(),
            "direct TLS without ALPN must not be served"
        );
    }

    // A client offering another ALPN protocol is refused in the handshake.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(rustls_client(&pki.ca_file(), Some(b"http/1.1"))));
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    assert!(connector.connect(name, tcp).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_tls_clients() {
    let pg = support::postgres();
    let first = Pki::new("first CA");
    let leaf = first.leaf("proxy", &["127.0.0.1"]);
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    std::fs::write(&cert, &leaf.cert_pem).expect("cert");
    std::fs::write(&key, &leaf.key_pem).expect("key");
    let config_path = dir.path().join("pgweir.toml");
    let (user, password) = roles::SCRAM;
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"\"\n\
         [tls]\nmode = \"require\"\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n\
         [databases.app]\nhost = \"{}\"\nport = {}\n[users.{user}]\npassword = \"{password}\"\n",
        pg.host(),
        pg.port()
    );
    std::fs::write(&config_path, text).expect("config");
    let config = pgweir::config::Config::load(&config_path).expect("valid config");
    let proxy = Proxy::start_with_path(config, Some(config_path.clone()))
        .await
        .expect("start");
    let proxy = TestProxy::wrap(proxy);
    let before = connect_tls(&proxy, &first.ca_file(), "require")
        .await
        .expect("first CA");
    let in_tx = connect_tls(&proxy, &first.ca_file(), "require")
        .await
        .expect("first CA");
    in_tx.batch_execute("BEGIN").await.expect("begin");

    // Rotate to a certificate from another CA, then reload as SIGHUP does.
    let second = Pki::new("second CA");
    let rotated = second.leaf("proxy", &["127.0.0.1"]);
    std::fs::write(&cert, &rotated.cert_pem).expect("cert");
    std::fs::write(&key, &rotated.key_pem).expect("key");
    proxy.proxy().context().reload_from_file().expect("reload accepted");

    // Existing TLS sessions go on, inside and outside a transaction.
    assert_eq!(select_one(&before).await, 1);
    assert_eq!(select_one(&in_tx).await, 1);
    in_tx.batch_execute("COMMIT").await.expect("commit");
    // New clients get the new certificate: the old CA no longer verifies it.
    assert!(connect_tls(&proxy, &first.ca_file(), "require").await.is_err());
    let after = connect_tls(&proxy, &second.ca_file(), "require")
        .await
        .expect("second CA");
    assert_eq!(select_one(&after).await, 1);

    // A broken key file is refused at reload and the running certificate stays.
    std::fs::write(&key, "not a key").expect("key");
    let e = proxy
        .proxy()
        .context()
        .reload_from_file()
        .expect_err("broken key refused");
    assert!(e.contains("key"), "{e}");
    let again = connect_tls(&proxy, &second.ca_file(), "require")
        .await
        .expect("still serving");
    assert_eq!(select_one(&again).await, 1);
}

/// A PostgreSQL with ssl = on and a certificate from `pki` for 127.0.0.1.
fn tls_postgres(leaf: &Leaf) -> EmbeddedPostgres {
    support::postgres_with(EmbeddedOptions {
        tls: Some(EmbeddedTls {
            cert_pem: leaf.cert_pem.clone(),
            key_pem: leaf.key_pem.clone(),
        }),
        ..Default::default()
    })
}

fn server_tls(mode: ServerTlsMode, ca: Option<&Path>, server_name: Option<&str>) -> ServerTlsConfig {
    let verify = match mode {
        ServerTlsMode::VerifyCa => ServerVerify::Ca,
        ServerTlsMode::VerifyFull => ServerVerify::Full,
        _ => ServerVerify::None,
    };
    ServerTlsConfig {
        mode,
        ca_file: ca.map(Path::to_path_buf),
        server_name: server_name.map(str::to_owned),
        connector: (mode != ServerTlsMode::Disable).then(|| tls::connector(verify, ca).expect("connector")),
    }
}

/// Whether the server connection serving `client` is encrypted, as PostgreSQL sees it.
async fn server_side_ssl(client: &tokio_postgres::Client) -> bool {
    client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_modes_against_real_postgres() {
    let pki = Pki::new("database CA");
    let leaf = pki.leaf("pg", &["127.0.0.1", "localhost"]);
    let pg = tls_postgres(&leaf);
    let ca = pki.ca_file();

    for mode in [
        ServerTlsMode::Prefer,
        ServerTlsMode::Require,
        ServerTlsMode::VerifyCa,
        ServerTlsMode::VerifyFull,
    ] {
        let proxy = TestProxyBuilder::new(&pg)
            .with_pool(|p| p.server_tls = server_tls(mode, Some(&ca), None))
            .start()
            .await;
        let client = proxy.connect(roles::SCRAM).await;
        assert!(server_side_ssl(&client).await, "{mode:?} must encrypt");
    }
    let proxy = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.server_tls = server_tls(ServerTlsMode::Disable, None, None))
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    assert!(!server_side_ssl(&client).await, "disable must not encrypt");

    // verify-full with a name the certificate does not carry fails, and says why; verify-ca
    // does not check the name.
    let proxy = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.server_tls = server_tls(ServerTlsMode::VerifyFull, Some(&ca), Some("db.example.com")))
        .start()
        .await;
    let e = proxy.try_connect(roles::SCRAM, "app").await.expect_err("name mismatch");
    assert!(message(&e).contains("TLS"), "{e:?}");
    let proxy = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.server_tls = server_tls(ServerTlsMode::VerifyCa, Some(&ca), Some("db.example.com")))
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    assert!(server_side_ssl(&client).await);

    // A CA that did not sign the server's certificate is refused.
    let other = Pki::new("other CA");
    let proxy = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.server_tls = server_tls(ServerTlsMode::VerifyFull, Some(&other.ca_file()), None))
        .start()
        .await;
    let e = proxy.try_connect(roles::SCRAM, "app").await.expect_err("unknown CA");
    assert!(message(&e).contains("TLS"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_require_accepts_self_signed_ca_certificate() {
    // The usual `openssl req -x509` certificate: self-signed and marked CA:TRUE, which webpki
    // refuses as a leaf. sslmode=require must still work, as with libpq.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("self-signed");
    let pg = support::postgres_with(EmbeddedOptions {
        tls: Some(EmbeddedTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }),
        ..Default::default()
    });
    let proxy = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.server_tls = server_tls(ServerTlsMode::Require, None, None))
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    assert!(server_side_ssl(&client).await);
    // Large results and pipelined queries through an encrypted server connection.
    let rows = client
        .query("SELECT g, repeat('y', 1000) FROM generate_series(1, 2000) g", &[])
        .await
        .expect("rows");
    assert_eq!(rows.len(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_require_against_plaintext_postgres_fails_clearly() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.server_tls = server_tls(ServerTlsMode::Require, None, None))
        .start()
        .await;
    let e = proxy
        .try_connect(roles::SCRAM, "app")
        .await
        .expect_err("no TLS on the server");
    assert!(message(&e).contains("does not offer TLS"), "{e:?}");
    // prefer falls back to plaintext.
    let proxy = TestProxyBuilder::new(&pg)
        .with_pool(|p| p.server_tls = server_tls(ServerTlsMode::Prefer, None, None))
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    assert!(!server_side_ssl(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_plus_channel_binding_over_tls() {
    let pg = support::postgres();
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["127.0.0.1"]);
    let proxy = tls_proxy(&pg, ClientTlsMode::Prefer, &leaf).await;

    // tokio-postgres computes tls-server-end-point from the certificate it received; a man in
    // the middle with another certificate could not produce the same binding.
    let (user, password) = roles::SCRAM;
    let conn_str = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=app sslmode=require channel_binding=require",
        proxy.port()
    );
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client(&pki.ca_file(), None));
    let (client, conn) = tokio_postgres::connect(&conn_str, tls)
        .await
        .expect("SCRAM-SHA-256-PLUS login");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    assert_eq!(select_one(&client).await, 1);

    // libpq too, over TLS; and without TLS it cannot get channel binding, so it refuses.
    let base = format!("host=127.0.0.1 port={} user={user} dbname=app", proxy.port());
    let out = tokio::task::block_in_place(|| psql(&pg, &format!("{base} sslmode=require channel_binding=require")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let out = tokio::task::block_in_place(|| psql(&pg, &format!("{base} sslmode=disable channel_binding=require")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("channel binding"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tls_server_end_point_follows_the_signature_hash() {
    let key = KeyPair::generate().expect("P-256 key");
    let cert = CertificateParams::new(vec!["a".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let der = cert.der();
    use sha2::Digest;
    assert_eq!(
        tls::server_end_point(der).expect("ECDSA-SHA256 has a hash"),
        sha2::Sha256::digest(der).to_vec()
    );
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
    let cert = CertificateParams::new(vec!["a".to_owned()])
        .expect("params")
        .self_signed(&ed)
        .expect("cert");
    assert_eq!(tls::server_end_point(cert.der()), None, "Ed25519 names no hash");
    // Truncated or garbage input is refused, never trusted.
    assert_eq!(tls::server_end_point(&der[..der.len() / 2]), None);
    assert_eq!(tls::server_end_point(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    assert_eq!(tls::server_end_point(&[]), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_client_is_killed_and_told() {
    let pg = support::postgres();
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["127.0.0.1"]);
    let proxy = tls_proxy(&pg, ClientTlsMode::Require, &leaf).await;
    let client = connect_tls(&proxy, &pki.ca_file(), "require").await.expect("TLS login");
    assert_eq!(select_one(&client).await, 1);
    let (_, body) = proxy.admin("GET", "/api/clients", None, None).await;
    let clients: serde_json::Value = serde_json::from_str(&body).expect("json");
    let id = clients[0]["id"].as_u64().expect("client id");
    let (status, body) = proxy
        .admin("POST", &format!("/api/clients/{id}/kill"), None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    // The session was waiting for the client's next query inside rustls; the kill reaches it
    // there and the FATAL goes out encrypted before the close.
    let e = client.query_one("SELECT 1", &[]).await.expect_err("killed");
    assert!(client.is_closed() || sqlstate(&e).as_deref() == Some("57P01"), "{e:?}");
    assert!(
        support::proxy::eventually(Duration::from_secs(5), || async {
            proxy.admin("GET", "/api/clients", None, None).await.1 == "[]"
        })
        .await
    );
}

/// An idle TLS client holds no read buffer, as a plain one does not (that 16 KiB was most of
/// what an idle TLS client cost), and after idling it is served as before: a query many TLS
/// records long, and one more small one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_clients_give_back_their_read_buffers() {
    let pg = support::postgres();
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["127.0.0.1"]);
    let proxy = tls_proxy(&pg, ClientTlsMode::Require, &leaf).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(connect_tls(&proxy, &pki.ca_file(), "require").await.expect("TLS login"));
    }
    // All at once, so that ten buffers are in use together (one at a time, they would all
    // reuse the same one).
    let sleeps = clients.iter().map(|c| c.batch_execute("SELECT pg_sleep(0.2)"));
    for r in futures_util::future::join_all(sleeps).await {
        r.expect("sleep");
    }
    let buffers = &proxy.proxy().context().buffers;
    assert!(
        support::proxy::eventually(Duration::from_secs(5), || async { buffers.spare() >= 10 }).await,
        "idle TLS clients still hold read buffers: {} spare",
        buffers.spare()
    );
    let long = "x".repeat(100_000);
    for client in &clients {
        let n: i32 = client
            .query_one(&format!("SELECT length('{long}')"), &[])
            .await
            .expect("a long query after idling")
            .get(0);
        assert_eq!(n, 100_000);
        assert_eq!(select_one(client).await, 1);
    }
}

/// A client that requires TLS, over max_client_conn, is told so over TLS (PostgreSQL does the
/// same at max_connections); pgweir used to answer its SSLRequest 'N', and the client gave up
/// with "server does not support TLS" instead of the 53300 that says what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_over_max_client_conn_reads_the_refusal() {
    let pg = support::postgres();
    let pki = Pki::new("pgweir test CA");
    let leaf = pki.leaf("proxy", &["localhost", "127.0.0.1"]);
    let mut builder = TestProxyBuilder::new(&pg);
    builder.tls = client_tls(ClientTlsMode::Require, &leaf);
    builder.max_client_conn = 1;
    let proxy = builder.start().await;
    let first = connect_tls(&proxy, &pki.ca_file(), "require").await.expect("TLS login");
    assert_eq!(select_one(&first).await, 1);
    let e = connect_tls(&proxy, &pki.ca_file(), "require")
        .await
        .expect_err("over max_client_conn");
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("53300"), "{e:?}");
}
