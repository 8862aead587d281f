//! `TestProxy`: the whole proxy in-process on 127.0.0.1:0 in front of an embedded PostgreSQL.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use pgweir::app::Proxy;
use pgweir::config::{AuthType, Config, DatabaseConfig, ListenConfig, PoolMode, PoolSettings, Secret, UserConfig};
use pgweir::embedded_pg::{EmbeddedPostgres, roles};

/// Builder for a proxy configuration pointing at `pg`. Defaults: transaction mode, pool_size 5,
/// SCRAM client auth, every embedded role configured with its plain password.
pub struct TestProxyBuilder<'a> {
    pg: &'a EmbeddedPostgres,
    pub pool: PoolSettings,
    pub auth_type: AuthType,
    pub max_client_conn: usize,
    pub max_message_size: usize,
    pub client_login_timeout: Duration,
    pub users: BTreeMap<String, UserConfig>,
    pub extra_databases: Vec<(String, DatabaseConfig)>,
    pub admin_token: Option<String>,
    pub query_text_bytes: usize,
    /// Client-facing TLS (`[tls]`); disabled unless a test sets it.
    pub tls: pgweir::config::ClientTlsConfig,
    /// `[[hba]]` rules; none unless a test sets them.
    pub hba: Vec<pgweir::config::hba::HbaRule>,
    /// `[auth_query]`; none unless a test sets it.
    pub auth_query: Option<pgweir::config::AuthQueryConfig>,
    /// listen.peer_id; 0 = no peering.
    pub peer_id: u16,
    /// listen.event_loop; None follows PGWEIR_TEST_EVENT_LOOP ("0" = the task path, anything
    /// else or unset = the event loop, the default): the whole suite runs on either data
    /// path, and `.ci/run` runs it both ways.
    pub event_loop: Option<bool>,
    /// listen.event_loop_after.
    pub event_loop_after: Duration,
    /// listen.unix_socket_dir; None = TCP only.
    pub unix_socket_dir: Option<std::path::PathBuf>,
    /// Connect to PostgreSQL over its Unix socket (host = its socket dir) instead of TCP.
    pub server_unix_socket: bool,
}

pub fn default_pool() -> PoolSettings {
    PoolSettings {
        pool_size: 5,
        idle_transaction_timeout: None,
        ..pgweir::config::default_pool_settings()
    }
}

impl<'a> TestProxyBuilder<'a> {
    pub fn new(pg: &'a EmbeddedPostgres) -> Self {
        let users = [roles::SCRAM, roles::MD5, roles::PLAIN, roles::SUPERUSER]
            .into_iter()
            .map(|(u, p)| {
                (
                    u.to_owned(),
                    UserConfig {
                        secret: Secret::Plain(p.to_owned()),
                        pool_size: None,
                    },
                )
            })
            .chain(std::iter::once((
                roles::TRUST.to_owned(),
                UserConfig {
                    secret: Secret::Plain("trust_pw".to_owned()),
                    pool_size: None,
                },
            )))
            .collect();
        TestProxyBuilder {
            pg,
            pool: default_pool(),
            auth_type: AuthType::ScramSha256,
            max_client_conn: 10_000,
            max_message_size: 64 << 20,
            client_login_timeout: Duration::from_secs(15),
            users,
            extra_databases: Vec::new(),
            admin_token: None,
            query_text_bytes: 0,
            tls: Default::default(),
            hba: Vec::new(),
            auth_query: None,
            peer_id: 0,
            event_loop: None,
            event_loop_after: Duration::ZERO,
            unix_socket_dir: None,
            server_unix_socket: false,
        }
    }

    pub fn event_loop(mut self, on: bool) -> Self {
        self.event_loop = Some(on);
        self
    }

    pub fn event_loop_after(mut self, connected: Duration) -> Self {
        self.event_loop_after = connected;
        self
    }

    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool.pool_size = n;
        self
    }

    pub fn mode(mut self, mode: PoolMode) -> Self {
        self.pool.mode = mode;
        self
    }

    pub fn with_pool(mut self, f: impl FnOnce(&mut PoolSettings)) -> Self {
        f(&mut self.pool);
        self
    }

    pub fn user(mut self, name: &str, secret: Secret) -> Self {
        self.users.insert(
            name.to_owned(),
            UserConfig {
                secret,
                pool_size: None,
            },
        );
        self
    }

    pub fn config(&self) -> Config {
        let host = match self.server_unix_socket {
            true => self.pg.socket_dir().to_str().expect("utf-8 socket dir").to_owned(),
            false => self.pg.host().to_owned(),
        };
        let db = |name: &str| DatabaseConfig {
            host: host.clone(),
            port: self.pg.port(),
            dbname: name.to_owned(),
            server_user: None,
            server_password: None,
            pool: self.pool.clone(),
        };
        let mut databases: BTreeMap<String, DatabaseConfig> =
            ["app", "postgres"].into_iter().map(|n| (n.to_owned(), db(n))).collect();
        for (name, d) in &self.extra_databases {
            databases.insert(name.clone(), d.clone());
        }
        Config {
            listen: ListenConfig {
                addr: "127.0.0.1:0".parse().expect("literal address"),
                max_client_conn: self.max_client_conn,
                auth_type: self.auth_type,
                max_message_size: self.max_message_size,
                client_login_timeout: self.client_login_timeout,
                shutdown_timeout: Duration::from_secs(5),
                // Two loops whatever the machine: the tests cover sessions on different loops.
                workers: 2,
                event_loop: self
                    .event_loop
                    .unwrap_or_else(|| std::env::var("PGWEIR_TEST_EVENT_LOOP").map_or(true, |v| v != "0")),
                // After the second transaction, not after the default 100 ms: the suite's clients
                // run a few transactions each, and the loop is the path most of them should take.
                event_loop_after: self.event_loop_after,
                tcp_keepalive: Some(Duration::from_secs(60)),
                peer_id: self.peer_id,
                unix_socket_dir: self.unix_socket_dir.clone(),
                unix_socket_mode: 0o777,
                unix_socket_group: None,
            },
            admin: pgweir::config::AdminConfig {
                addr: Some("127.0.0.1:0".parse().expect("literal address")),
                token: self.admin_token.clone(),
                ready_warn_percent: 80,
                ready_critical_percent: 90,
                query_text_bytes: self.query_text_bytes,
            },
            pool_defaults: self.pool.clone(),
            databases,
            users: self.users.clone(),
            tls: self.tls.clone(),
            hba: self.hba.clone(),
            auth_query: self.auth_query.clone(),
            peers: Default::default(),
        }
    }

    pub async fn start(self) -> TestProxy {
        let config = self.config();
        let proxy = Proxy::start(config).await.expect("proxy starts");
        TestProxy {
            addr: proxy.local_addr(),
            proxy: Some(proxy),
        }
    }
}

pub struct TestProxy {
    pub addr: SocketAddr,
    proxy: Option<Proxy>,
}

impl TestProxy {
    /// Wraps a proxy started some other way (e.g. from a config file).
    pub fn wrap(proxy: Proxy) -> TestProxy {
        TestProxy {
            addr: proxy.local_addr(),
            proxy: Some(proxy),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Sends one HTTP/1.1 request to the admin API; returns (status, body).
    pub async fn admin(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.proxy().admin_addr().expect("admin API enabled");
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to admin API");
        let body = body.unwrap_or("");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: pgweir\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("send request");
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
            .await
            .expect("admin response in time")
            .expect("read response");
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy running")
    }

    /// The first pool whose (database, user) key `matches`.
    pub fn pool_where(&self, matches: impl Fn(&pgweir::pool::PoolKey) -> bool) -> Option<pgweir::pool::Pool> {
        self.proxy()
            .context()
            .pools
            .all()
            .into_iter()
            .find(|p| matches(p.key()))
    }

    /// A libpq-style connection string for tokio-postgres.
    pub fn conn_str(&self, (user, password): (&str, &str), dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={dbname} connect_timeout=10",
            self.addr.port()
        )
    }

    /// Connects as `role` to database `app` and spawns the connection task.
    pub async fn connect(&self, role: (&str, &str)) -> tokio_postgres::Client {
        self.try_connect(role, "app")
            .await
            .expect("client connects through pgweir")
    }

    /// A client whose connection task is returned rather than detached, to see when and how
    /// pgweir ends the connection.
    pub async fn connect_watched(
        &self,
        role: (&str, &str),
    ) -> (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ) {
        let (client, conn) = tokio_postgres::connect(&self.conn_str(role, "app"), tokio_postgres::NoTls)
            .await
            .expect("connect");
        (client, tokio::spawn(conn))
    }

    pub async fn try_connect(
        &self,
        role: (&str, &str),
        dbname: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.conn_str(role, dbname), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(p) = self.proxy.take() {
            p.shutdown(grace).await;
        }
    }
}

/// Connects straight to PostgreSQL as the superuser (for assertions on pg_stat_activity etc.).
pub async fn direct(pg: &EmbeddedPostgres, dbname: &str) -> tokio_postgres::Client {
    let (user, password) = roles::SUPERUSER;
    let s = format!(
        "host={} port={} user={user} password={password} dbname={dbname}",
        pg.host(),
        pg.port()
    );
    let (client, conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls)
        .await
        .expect("direct connection to PostgreSQL");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The backend pid of the server the client's next statement runs on.
pub async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[]).await.expect("pid").get(0)
}

/// Whether PostgreSQL's backend `pid` has ended within 10 s (asked over a direct connection).
pub async fn backend_gone(pg: &EmbeddedPostgres, pid: i32) -> bool {
    let direct = direct(pg, "postgres").await;
    eventually(Duration::from_secs(10), || async {
        direct
            .query_one("select count(*) from pg_stat_activity where pid = $1", &[&pid])
            .await
            .expect("pg_stat_activity")
            .get::<_, i64>(0)
            == 0
    })
    .await
}

/// The server's message for a database error, else the error's own text.
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

impl TestProxy {
    /// The value of one metric line on /metrics, e.g. `pgweir_x_total{reason="y"}`.
    pub async fn metric(&self, series: &str) -> u64 {
        let (status, body) = self.admin("GET", "/metrics", None, None).await;
        assert_eq!(status, 200);
        let prefix = format!("{series} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in metrics"))
    }
}

/// The first value of a simple query's first row.
pub fn first_value(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    })
}

/// Extracts the SQLSTATE code of a tokio-postgres error, if it carries one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET /api/clients, parsed.
pub async fn clients_json(proxy: &TestProxy) -> Vec<serde_json::Value> {
    let (status, body) = proxy.admin("GET", "/api/clients", None, None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body)
        .expect("json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Two transactions: a session waits in the loop from its second on (the first runs on its
/// task; a connection-per-transaction client never crosses to the loop's thread).
pub async fn warm_up(client: &tokio_postgres::Client) {
    for _ in 0..2 {
        client.simple_query("select 1").await.expect("warm up");
    }
}

/// True once every listed client reports `event_loop` = `want`.
pub async fn all_clients_in_event_loop(proxy: &TestProxy, n: usize, want: bool) -> bool {
    eventually(Duration::from_secs(5), || async {
        let clients = clients_json(proxy).await;
        clients.len() == n && clients.iter().all(|c| c["event_loop"] == want)
    })
    .await
}
