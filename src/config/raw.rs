//! Serde mirror of the TOML file. No logic: defaults and checks live in `validate.rs`.
//!
//! Values are kept as close to what was written as serde allows (integers as `i64`, durations
//! and enums as strings) so that range and spelling problems become `ConfigProblem`s with a key
//! path, collected together, instead of stopping at the first serde error. Only unknown keys and
//! wrong TOML types are serde errors.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The whole file. Every section except `[databases.*]` may be omitted.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[listen]`: the client-facing side.
    #[serde(default)]
    pub listen: RawListen,
    /// `[pool]`: defaults for every pool.
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub pool: RawPool,
    /// `[databases.NAME]`, keyed by the name clients connect with.
    #[serde(default)]
    pub databases: BTreeMap<String, RawDatabase>,
    /// `[users.NAME]`, keyed by user name.
    #[serde(default)]
    pub users: BTreeMap<String, RawUser>,
    /// `[tls]`: TLS towards clients.
    #[serde(default)]
    pub tls: RawTls,
    /// `[server_tls]`: TLS towards PostgreSQL.
    #[serde(default)]
    pub server_tls: RawServerTls,
    /// `[[hba]]`: who may connect from where.
    #[serde(default)]
    pub hba: Vec<RawHba>,
    /// `[auth_query]`: users looked up in PostgreSQL.
    pub auth_query: Option<RawAuthQuery>,
    /// `[[peers]]`: other instances for cancel forwarding.
    #[serde(default)]
    pub peers: Vec<RawPeer>,
}

/// One `[[peers]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub id: Option<i64>,
    pub host: Option<String>,
    pub port: Option<i64>,
}

/// `[auth_query]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthQuery {
    pub user: Option<String>,
    pub query: Option<String>,
    pub cache_ttl: Option<RawDuration>,
}

/// One `[[hba]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHba {
    /// allow | deny.
    pub action: Option<String>,
    /// "all", an IP address or a CIDR range.
    pub address: Option<String>,
    pub databases: Option<Vec<String>>,
    pub users: Option<Vec<String>>,
    pub tls: Option<bool>,
}

/// `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// disable | allow | prefer | require.
    pub mode: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

/// `[server_tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    /// disable | prefer | require | verify-ca | verify-full.
    pub mode: Option<String>,
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
}

/// A duration as written: "5s", "250ms", "10min", or 0 / "0" (meaning disabled where allowed).
/// Parsed by humantime in `validate.rs`, where a bad value becomes a problem with its key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawDuration {
    /// A string, e.g. "5s" or "0".
    Text(String),
    /// A bare integer; only 0 is meaningful (a unit is required otherwise).
    Number(i64),
}

// Hand-written rather than `#[serde(untagged)]`: untagged enums report a wrong type as "data did
// not match any variant of untagged enum RawDuration", which tells the user nothing.
impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = RawDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"5s\", \"250ms\" or \"10min\", or 0")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(v))
            }
        }

        deserializer.deserialize_any(DurationVisitor)
    }
}

/// `[listen]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// `addr`: IP:port to listen on.
    pub addr: Option<String>,
    /// `max_client_conn`: maximum connected clients.
    pub max_client_conn: Option<i64>,
    /// `auth_type`: "trust", "md5" or "scram-sha-256".
    pub auth_type: Option<String>,
    /// `auth_file`: PgBouncer-style userlist, relative to the config file's directory.
    pub auth_file: Option<String>,
    /// `max_message_size`: bytes.
    pub max_message_size: Option<i64>,
    /// `client_login_timeout`.
    pub client_login_timeout: Option<RawDuration>,
    /// `shutdown_timeout`; 0 closes at once.
    pub shutdown_timeout: Option<RawDuration>,
    /// `workers`: 0 = one per core; 1 = a single-threaded event loop (cheapest per transaction
    /// when one core is enough).
    pub workers: Option<i64>,
    /// `event_loop`: serve plain-TCP transaction-mode clients from per-worker event loops.
    pub event_loop: Option<bool>,
    /// `event_loop_after`: connected this long before a session waits in the loop; 0 = from its
    /// third transaction.
    pub event_loop_after: Option<RawDuration>,
    /// `tcp_keepalive`; 0 leaves the OS default.
    pub tcp_keepalive: Option<RawDuration>,
    pub peer_id: Option<i64>,
    /// `unix_socket_dir`: also listen on `<dir>/.s.PGSQL.<port>`; "" or absent: no Unix socket.
    pub unix_socket_dir: Option<String>,
    /// `unix_socket_mode`: permission bits of the socket file, in octal ("0777").
    pub unix_socket_mode: Option<String>,
    /// `unix_socket_group`: group owning the socket file, by name or number.
    pub unix_socket_group: Option<String>,
}

/// `[pool]`, and (via [`RawDatabase::pool_overrides`]) the pool keys of a database table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// "" disables the admin listener.
    pub addr: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<String>,
    pub ready_warn_percent: Option<i64>,
    pub query_text_bytes: Option<i64>,
    pub ready_critical_percent: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// `mode`: "transaction" or "session".
    pub mode: Option<String>,
    /// `pool_size`.
    pub pool_size: Option<i64>,
    /// `min_pool_size`.
    pub min_pool_size: Option<i64>,
    /// `acquire_timeout`; must be > 0.
    pub acquire_timeout: Option<RawDuration>,
    /// `idle_transaction_timeout`; 0 disables.
    pub idle_transaction_timeout: Option<RawDuration>,
    /// `query_timeout`; 0 disables.
    pub query_timeout: Option<RawDuration>,
    /// `server_connect_timeout`; must be > 0.
    pub server_connect_timeout: Option<RawDuration>,
    /// `server_idle_timeout`; 0 disables.
    pub server_idle_timeout: Option<RawDuration>,
    /// `server_lifetime`; 0 disables.
    pub server_lifetime: Option<RawDuration>,
    /// `server_check_delay`; 0 checks before every reuse.
    pub server_check_delay: Option<RawDuration>,
    /// `max_prepared_statements`.
    pub max_prepared_statements: Option<i64>,
    /// `session_state`: "allow", "reset", "reset_always" or "reject".
    pub session_state: Option<String>,
    /// `reset_query`.
    pub reset_query: Option<String>,
}

/// `[databases.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    /// `host`: PostgreSQL host name or IP address.
    pub host: Option<String>,
    /// `port`.
    pub port: Option<i64>,
    /// `dbname`: database name on the server.
    pub dbname: Option<String>,
    /// `user`: forced server user.
    pub user: Option<String>,
    /// `password`: the forced server user's plain-text password.
    pub password: Option<String>,
    // Per-database overrides of [pool]. Listed here rather than flattened because serde cannot
    // combine `flatten` with `deny_unknown_fields`.
    /// Overrides `pool.mode`.
    pub mode: Option<String>,
    /// Overrides `pool.pool_size`.
    pub pool_size: Option<i64>,
    /// Overrides `pool.min_pool_size`.
    pub min_pool_size: Option<i64>,
    /// Overrides `pool.acquire_timeout`.
    pub acquire_timeout: Option<RawDuration>,
    /// Overrides `pool.idle_transaction_timeout`.
    pub idle_transaction_timeout: Option<RawDuration>,
    /// Overrides `pool.query_timeout`.
    pub query_timeout: Option<RawDuration>,
    /// Overrides `pool.server_connect_timeout`.
    pub server_connect_timeout: Option<RawDuration>,
    /// Overrides `pool.server_idle_timeout`.
    pub server_idle_timeout: Option<RawDuration>,
    /// Overrides `pool.server_lifetime`.
    pub server_lifetime: Option<RawDuration>,
    /// Overrides `pool.server_check_delay`.
    pub server_check_delay: Option<RawDuration>,
    /// Overrides `pool.max_prepared_statements`.
    pub max_prepared_statements: Option<i64>,
    /// Overrides `pool.session_state`.
    pub session_state: Option<String>,
    /// Overrides `pool.reset_query`.
    pub reset_query: Option<String>,
}

impl RawDatabase {
    /// The pool overrides as a `RawPool`, so one function validates both.
    pub fn pool_overrides(&self) -> RawPool {
        RawPool {
            mode: self.mode.clone(),
            pool_size: self.pool_size,
            min_pool_size: self.min_pool_size,
            acquire_timeout: self.acquire_timeout.clone(),
            idle_transaction_timeout: self.idle_transaction_timeout.clone(),
            query_timeout: self.query_timeout.clone(),
            server_connect_timeout: self.server_connect_timeout.clone(),
            server_idle_timeout: self.server_idle_timeout.clone(),
            server_lifetime: self.server_lifetime.clone(),
            server_check_delay: self.server_check_delay.clone(),
            max_prepared_statements: self.max_prepared_statements,
            session_state: self.session_state.clone(),
            reset_query: self.reset_query.clone(),
        }
    }
}

/// `[users.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    /// `password`: plain, "md5<32 hex>" or a "SCRAM-SHA-256$…" verifier.
    pub password: Option<String>,
    /// `pool_size`: overrides the database's pool_size for this user's pools.
    pub pool_size: Option<i64>,
}
