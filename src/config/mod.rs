//! Configuration: a TOML file parsed into a raw serde mirror (`raw.rs`), then validated into the
//! typed [`Config`] below (`validate.rs`). Every problem is collected with its key path; nothing is
//! warned about and then ignored. Code receives a `Config` (usually `Arc<Config>`) as an argument;
//! there is no global.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod error;
pub mod hba;
mod raw;
mod userlist;
mod validate;

pub use error::{ConfigError, ConfigProblem};
pub use userlist::parse_userlist;
pub use validate::default_pool_settings;

/// Validated, typed configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: ListenConfig,
    pub admin: AdminConfig,
    /// Defaults applied to every pool unless a database or user overrides them.
    pub pool_defaults: PoolSettings,
    /// Keyed by the database name clients put in their startup packet.
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// Keyed by user name. Merged from `[users.*]` and `auth_file` (config wins on conflict).
    pub users: BTreeMap<String, UserConfig>,
    /// TLS towards clients (`[tls]`). Server-side TLS is a pool setting (`server_tls`).
    pub tls: ClientTlsConfig,
    /// `[[hba]]` rules, in file order; empty = every client may try to log in.
    pub hba: Vec<hba::HbaRule>,
    /// `[auth_query]`: look up users missing from `users` in PostgreSQL itself.
    pub auth_query: Option<AuthQueryConfig>,
    /// `[[peers]]`: other pgweir instances, by peer id, to forward their CancelRequests to.
    pub peers: BTreeMap<u16, PeerConfig>,
}

/// Another pgweir instance behind the same load balancer (PgBouncer's `[peers]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Where that instance's client listener is reachable from this one.
    pub host: String,
    pub port: u16,
}

/// Users not listed in the configuration are looked up in PostgreSQL (PgBouncer's auth_user
/// and auth_query), so only one credential lives in pgweir's files.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthQueryConfig {
    /// The user pgweir logs in as to run the query; must be in `users` with a password.
    pub user: String,
    /// Returns (name, stored password) for `$1`. Default reads pg_shadow.
    pub query: String,
    /// How long a looked-up verifier (or "no such user") is reused. Default 60s; 0 = no cache.
    pub cache_ttl: Duration,
}

/// How pgweir answers clients about TLS (`[tls]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientTlsConfig {
    pub mode: ClientTlsMode,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Built from the files when the configuration was loaded; None when mode is Disable.
    pub acceptor: Option<crate::net::tls::Material<rustls::ServerConfig>>,
}

/// Client-facing TLS modes (PgBouncer's client_tls_sslmode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientTlsMode {
    /// SSLRequest is answered 'N'; direct TLS is refused. The default.
    #[default]
    Disable,
    /// TLS when the client asks for it (same as Prefer: the server side cannot prefer).
    Allow,
    /// TLS when the client asks for it.
    Prefer,
    /// Only TLS clients may log in; plaintext ones get FATAL 28000. CancelRequests are still
    /// accepted in plaintext, as PostgreSQL does, since libpq sends them that way.
    Require,
}

/// Server-facing TLS (`[server_tls]`), applied to every pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTlsConfig {
    pub mode: ServerTlsMode,
    /// CA certificates for verify-ca / verify-full.
    pub ca_file: Option<PathBuf>,
    /// Name to send as SNI and to check the certificate against; defaults to the database host.
    pub server_name: Option<String>,
    /// Built when the configuration was loaded; None when mode is Disable.
    pub connector: Option<crate::net::tls::Material<rustls::ClientConfig>>,
}

/// libpq's sslmode values, for pgweir's connections to PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServerTlsMode {
    /// Never ask for TLS.
    Disable,
    /// Ask; fall back to plaintext if the server has TLS off. The default (as PgBouncer ≥ 1.20).
    #[default]
    Prefer,
    /// TLS or no connection; any certificate is accepted (handshake signatures are checked).
    Require,
    /// TLS with a certificate chain leading to ca_file; the host name is not checked.
    VerifyCa,
    /// TLS with a chain leading to ca_file and a certificate naming the host.
    VerifyFull,
}

impl ServerTlsConfig {
    /// `prefer` with no files: works against any server.
    pub fn prefer() -> ServerTlsConfig {
        ServerTlsConfig {
            mode: ServerTlsMode::Prefer,
            ca_file: None,
            server_name: None,
            connector: crate::net::tls::connector(crate::net::tls::ServerVerify::None, None).ok(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenConfig {
    /// Client-facing listener. Default 127.0.0.1:6432.
    pub addr: SocketAddr,
    /// Maximum connected clients; the excess get SQLSTATE 53300 at once. Default 1000.
    pub max_client_conn: usize,
    /// How clients authenticate to pgweir. Default ScramSha256.
    pub auth_type: AuthType,
    /// Largest single protocol message accepted from a client, in bytes. Default 64 MiB.
    pub max_message_size: usize,
    /// Time a client has to finish startup + auth. Default 15s.
    pub client_login_timeout: Duration,
    /// On SIGTERM/SIGINT, how long transactions may run before connections are closed. Default 30s.
    pub shutdown_timeout: Duration,
    /// Tokio worker threads (and event loops); 0 = automatic ([`ListenConfig::worker_threads`]).
    /// Default 0.
    pub workers: usize,
    /// Serve plain-TCP transaction-mode clients from one event loop per worker instead of a
    /// task each (less CPU per transaction). Default true.
    pub event_loop: bool,
    /// How long a session has been connected before it waits in an event loop (never before its
    /// third transaction). Crossing to the loop's thread, and back for the Terminate, costs a
    /// connection more CPU than the loop saves it over a few dozen transactions, so a
    /// short-lived client (a web request, `pgbench -C`) never crosses; a long-lived one moves
    /// over soon after it connects (docs/performance.md round 27). Zero: from the third
    /// transaction. Default 100 ms.
    pub event_loop_after: Duration,
    /// TCP keepalive idle time on client and server sockets; None = OS default. Default 60s.
    pub tcp_keepalive: Option<Duration>,
    /// This instance's id (1..=16383) in the cancel keys it issues, for cancel forwarding
    /// between instances (`[[peers]]`); 0 (the default) disables peering.
    pub peer_id: u16,
    /// Also listen on the Unix socket `<dir>/.s.PGSQL.<port of addr>`, as PostgreSQL and
    /// PgBouncer name theirs (`psql -h <dir>`). None (the default): TCP only.
    pub unix_socket_dir: Option<std::path::PathBuf>,
    /// Permission bits of that socket file. Default 0o777 (PgBouncer's); anyone who can reach
    /// the file may connect, and still has to log in.
    pub unix_socket_mode: u32,
    /// The group (id) the socket file is given, so `unix_socket_mode = "0770"` admits exactly
    /// that group's members. None (the default): the group pgweir runs as.
    pub unix_socket_group: Option<u32>,
}

impl ListenConfig {
    /// The worker threads, and event loops, `workers` stands for on this machine.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => auto_workers(),
            n => n,
        }
    }
}

/// `workers = 0`: one per core, but one on a machine of one or two cores. There PostgreSQL and
/// the clients (or the kernel's network work) share the cores, and a second loop measured
/// worse on every count (`pgbench -S`, 2 cores: 15.2 against 12.3 µs of CPU per transaction
/// at 100 clients, 21 against 16.5 at 2,000, and 5–10 % fewer transactions per second):
/// sessions on two loops hand servers to each other across threads, and a multi-threaded
/// runtime costs more per wake-up than a single-threaded one.
pub fn auto_workers() -> usize {
    workers_for_cores(std::thread::available_parallelism().map_or(1, usize::from))
}

fn workers_for_cores(cores: usize) -> usize {
    match cores {
        0..=2 => 1,
        n => n,
    }
}

/// The HTTP admin API and Prometheus metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Admin listener; None disables it. Default 127.0.0.1:6433.
    pub addr: Option<SocketAddr>,
    /// Bearer token required by mutating endpoints. Without one they are only served when the
    /// admin listener is on a loopback address.
    pub token: Option<String>,
    /// Pool utilisation (active / pool_size, percent) at which /ready reports "warning".
    /// Default 80.
    pub ready_warn_percent: u8,
    /// Utilisation at which /ready reports "critical". Default 90; at least ready_warn_percent.
    pub ready_critical_percent: u8,
    /// Bytes of each client's last query text shown by /api/clients; 0 (the default) keeps
    /// none, because query text can contain personal data.
    pub query_text_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    /// Accept any password-less login for known users (and, with no users configured, anyone).
    Trust,
    Md5,
    ScramSha256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection is lent for one transaction (returned at ReadyForQuery 'I').
    Transaction,
    /// A server connection is held for the whole client session.
    Session,
}

/// What to do, in transaction mode, with a statement that changes session state (see
/// `client::hygiene`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStatePolicy {
    /// Let it through; the state leaks to later clients of that server (PgBouncer's behaviour).
    Allow,
    /// Let it through, then run `reset_query` on that server before anyone else gets it.
    Reset,
    /// Run `reset_query` after every transaction, whatever the scan saw (PgBouncer's
    /// `server_reset_query_always`): also covers what the scan cannot see, such as a function
    /// that changes the session when called.
    ResetAlways,
    /// Refuse the statement with an ErrorResponse that explains transaction mode.
    Reject,
}

/// Per-pool settings. `None` durations mean "disabled".
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    /// Maximum server connections per (database, user). Default 20. Must be >= 1.
    pub pool_size: usize,
    /// Server connections kept open even when idle. Default 0. Must be <= pool_size.
    pub min_pool_size: usize,
    /// How long a client waits for a server connection before it gets an error. Default 5s.
    pub acquire_timeout: Duration,
    /// A client idle inside a transaction longer than this is disconnected. Default 5min.
    pub idle_transaction_timeout: Option<Duration>,
    /// A query (Query or Sync to ReadyForQuery) running longer than this is cancelled, its
    /// server connection closed and the client disconnected with 57014, as PgBouncer's
    /// query_timeout. Default disabled.
    pub query_timeout: Option<Duration>,
    /// Connecting + authenticating to PostgreSQL must finish within this. Default 5s.
    pub server_connect_timeout: Duration,
    /// Idle server connections above min_pool_size are closed after this. Default 10min.
    pub server_idle_timeout: Option<Duration>,
    /// Server connections are closed (when idle) after this age. Default 1h.
    pub server_lifetime: Option<Duration>,
    /// A server connection idle longer than this is health-checked before reuse. Default 30s.
    pub server_check_delay: Duration,
    /// Prepared statements kept per server connection (LRU beyond). Default 200.
    pub max_prepared_statements: usize,
    /// Transaction mode: statements that change session state. Default Reset.
    pub session_state: SessionStatePolicy,
    /// Run on a server after session state changed (Reset policy) and at the end of a session-mode
    /// client. Default "DISCARD ALL".
    pub reset_query: String,
    /// TLS towards PostgreSQL; from `[server_tls]`, the same for every pool.
    pub server_tls: ServerTlsConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseConfig {
    /// Host name or IP address of PostgreSQL. Default "127.0.0.1".
    pub host: String,
    /// Default 5432.
    pub port: u16,
    /// Database name on the server. Defaults to the key of the `[databases.NAME]` table.
    pub dbname: String,
    /// Connect to the server as this user instead of the client's user (with `password`).
    pub server_user: Option<String>,
    /// Password for `server_user` (plain text).
    pub server_password: Option<String>,
    /// Pool settings for this database: pool defaults overlaid with this table's overrides.
    pub pool: PoolSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserConfig {
    pub secret: Secret,
    /// Overrides the database's pool_size for this user's pools.
    pub pool_size: Option<usize>,
}

/// What pgweir knows about a user's password.
#[derive(Debug, Clone, PartialEq)]
pub enum Secret {
    /// Plain text: works for every client auth method and every server auth method.
    Plain(String),
    /// "md5" + hex(md5(password + username)): md5 client auth, md5 server auth.
    Md5(String),
    /// "SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>": SCRAM client auth; towards the
    /// server only by pass-through.
    Scram(String),
    /// No password (only valid with auth_type = "trust").
    None,
}

impl Secret {
    /// Classifies a stored string the way PgBouncer's userlist.txt does.
    pub fn parse(s: &str) -> Secret {
        if s.is_empty() {
            Secret::None
        } else if s.starts_with("SCRAM-SHA-256$") {
            Secret::Scram(s.to_owned())
        } else if s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
            Secret::Md5(s.to_owned())
        } else {
            Secret::Plain(s.to_owned())
        }
    }
}

impl Config {
    /// Reads and validates a config file. Relative `auth_file` paths are resolved against the
    /// config file's directory.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path.parent().map(PathBuf::from))
    }

    /// Parses and validates TOML text. `base_dir` resolves relative file paths.
    pub fn from_toml(text: &str, base_dir: Option<PathBuf>) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(ConfigError::Parse)?;
        validate::validate(raw, base_dir.as_deref())
    }

    /// The effective pool settings for a (database, user) pair.
    pub fn pool_settings(&self, database: &str, user: &str) -> Option<PoolSettings> {
        let db = self.databases.get(database)?;
        let mut settings = db.pool.clone();
        if let Some(size) = self.users.get(user).and_then(|u| u.pool_size) {
            settings.pool_size = size;
            settings.min_pool_size = settings.min_pool_size.min(size);
        }
        Some(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_workers_are_one_per_core_but_one_on_two_cores() {
        assert_eq!(workers_for_cores(1), 1);
        assert_eq!(workers_for_cores(2), 1);
        assert_eq!(workers_for_cores(3), 3);
        assert_eq!(workers_for_cores(16), 16);
    }
}
