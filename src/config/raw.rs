//! Serde mirror of the TOML file. No logic: defaults and checks live in `validate.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub pool: RawPool,
    #[serde(default)]
    pub databases: BTreeMap<String, RawDatabase>,
    #[serde(default)]
    pub users: BTreeMap<String, RawUser>,
}

/// A duration written as "5s", "250ms", "10min", or 0 / "0" (meaning disabled where allowed).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Text(String),
    Number(i64),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub addr: Option<String>,
    pub max_client_conn: Option<i64>,
    pub auth_type: Option<String>,
    pub auth_file: Option<String>,
    pub max_message_size: Option<i64>,
    pub client_login_timeout: Option<RawDuration>,
    pub shutdown_timeout: Option<RawDuration>,
    pub workers: Option<i64>,
    pub tcp_keepalive: Option<RawDuration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub mode: Option<String>,
    pub pool_size: Option<i64>,
    pub min_pool_size: Option<i64>,
    pub acquire_timeout: Option<RawDuration>,
    pub idle_transaction_timeout: Option<RawDuration>,
    pub server_connect_timeout: Option<RawDuration>,
    pub server_idle_timeout: Option<RawDuration>,
    pub server_lifetime: Option<RawDuration>,
    pub server_check_delay: Option<RawDuration>,
    pub max_prepared_statements: Option<i64>,
    pub session_state: Option<String>,
    pub reset_query: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub host: Option<String>,
    pub port: Option<i64>,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    // Per-database overrides of [pool]. Listed here rather than flattened because serde cannot
    // combine `flatten` with `deny_unknown_fields`.
    pub mode: Option<String>,
    pub pool_size: Option<i64>,
    pub min_pool_size: Option<i64>,
    pub acquire_timeout: Option<RawDuration>,
    pub idle_transaction_timeout: Option<RawDuration>,
    pub server_connect_timeout: Option<RawDuration>,
    pub server_idle_timeout: Option<RawDuration>,
    pub server_lifetime: Option<RawDuration>,
    pub server_check_delay: Option<RawDuration>,
    pub max_prepared_statements: Option<i64>,
    pub session_state: Option<String>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub password: Option<String>,
    pub pool_size: Option<i64>,
}
