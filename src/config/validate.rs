//! Raw → typed config: defaults, ranges and cross-field rules. Every problem is collected with its
//! key path; nothing is warned about and then ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::raw::{RawConfig, RawDuration, RawPool};
use super::{
    AuthType, Config, ConfigError, ConfigProblem, DatabaseConfig, ListenConfig, PoolMode, PoolSettings, Secret,
    SessionStatePolicy, UserConfig, parse_userlist,
};

const ONE_DAY: Duration = Duration::from_secs(86_400);

struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Parses a duration; `allow_zero` decides whether 0 means "disabled" (Ok(None)) or is an error.
    fn duration(
        &mut self,
        key: &str,
        raw: &Option<RawDuration>,
        default: Option<Duration>,
        allow_zero: bool,
    ) -> Option<Duration> {
        let parsed = match raw {
            None => return default,
            Some(RawDuration::Number(0)) => Duration::ZERO,
            Some(RawDuration::Number(n)) => {
                self.add(
                    key,
                    format!("durations need a unit, e.g. \"{n}s\" or \"{n}ms\" (got {n})"),
                );
                return default;
            }
            Some(RawDuration::Text(t)) if t.trim() == "0" => Duration::ZERO,
            Some(RawDuration::Text(t)) => match humantime::parse_duration(t.trim()) {
                Ok(d) => d,
                Err(e) => {
                    self.add(
                        key,
                        format!("invalid duration {t:?}: {e} (examples: \"5s\", \"250ms\", \"10min\")"),
                    );
                    return default;
                }
            },
        };
        if parsed.is_zero() {
            if allow_zero {
                return None;
            }
            self.add(key, "must be greater than 0");
            return default;
        }
        Some(parsed)
    }

    fn count(&mut self, key: &str, raw: Option<i64>, default: usize, min: usize, max: usize) -> usize {
        match raw {
            None => default,
            Some(n) if n < min as i64 || n > max as i64 => {
                self.add(key, format!("must be between {min} and {max}, got {n}"));
                default
            }
            Some(n) => n as usize,
        }
    }
}

fn default_pool() -> PoolSettings {
    PoolSettings {
        mode: PoolMode::Transaction,
        pool_size: 20,
        min_pool_size: 0,
        acquire_timeout: Duration::from_secs(5),
        idle_transaction_timeout: Some(Duration::from_secs(300)),
        server_connect_timeout: Duration::from_secs(5),
        server_idle_timeout: Some(Duration::from_secs(600)),
        server_lifetime: Some(Duration::from_secs(3600)),
        server_check_delay: Duration::from_secs(30),
        max_prepared_statements: 200,
        session_state: SessionStatePolicy::Reset,
        reset_query: "DISCARD ALL".to_owned(),
    }
}

/// Overlays `raw` on `base`, reporting problems under `prefix`.
fn pool_settings(p: &mut Problems, prefix: &str, raw: &RawPool, base: &PoolSettings) -> PoolSettings {
    let key = |k: &str| format!("{prefix}.{k}");
    let mode = match raw.mode.as_deref() {
        None => base.mode,
        Some("transaction") => PoolMode::Transaction,
        Some("session") => PoolMode::Session,
        Some(other) => {
            p.add(
                key("mode"),
                format!("must be \"transaction\" or \"session\", got {other:?}"),
            );
            base.mode
        }
    };
    let session_state = match raw.session_state.as_deref() {
        None => base.session_state,
        Some("allow") => SessionStatePolicy::Allow,
        Some("reset") => SessionStatePolicy::Reset,
        Some("reject") => SessionStatePolicy::Reject,
        Some(other) => {
            p.add(
                key("session_state"),
                format!("must be \"allow\", \"reset\" or \"reject\", got {other:?}"),
            );
            base.session_state
        }
    };
    let pool_size = p.count(&key("pool_size"), raw.pool_size, base.pool_size, 1, 10_000);
    let min_pool_size = p.count(
        &key("min_pool_size"),
        raw.min_pool_size,
        base.min_pool_size.min(pool_size),
        0,
        10_000,
    );
    if min_pool_size > pool_size {
        p.add(
            key("min_pool_size"),
            format!("must not exceed pool_size ({pool_size}), got {min_pool_size}"),
        );
    }
    let acquire_timeout = p
        .duration(
            &key("acquire_timeout"),
            &raw.acquire_timeout,
            Some(base.acquire_timeout),
            false,
        )
        .unwrap_or(base.acquire_timeout);
    let server_connect_timeout = p
        .duration(
            &key("server_connect_timeout"),
            &raw.server_connect_timeout,
            Some(base.server_connect_timeout),
            false,
        )
        .unwrap_or(base.server_connect_timeout);
    for (k, d) in [
        ("acquire_timeout", acquire_timeout),
        ("server_connect_timeout", server_connect_timeout),
    ] {
        if d > ONE_DAY {
            p.add(
                key(k),
                format!("must be at most one day, got {}", humantime::format_duration(d)),
            );
        }
    }
    let reset_query = match &raw.reset_query {
        Some(q) if q.trim().is_empty() => {
            p.add(
                key("reset_query"),
                "must not be empty (use session_state = \"allow\" to skip resets)",
            );
            base.reset_query.clone()
        }
        Some(q) => q.clone(),
        None => base.reset_query.clone(),
    };
    PoolSettings {
        mode,
        pool_size,
        min_pool_size,
        acquire_timeout,
        idle_transaction_timeout: p.duration(
            &key("idle_transaction_timeout"),
            &raw.idle_transaction_timeout,
            base.idle_transaction_timeout,
            true,
        ),
        server_connect_timeout,
        server_idle_timeout: p.duration(
            &key("server_idle_timeout"),
            &raw.server_idle_timeout,
            base.server_idle_timeout,
            true,
        ),
        server_lifetime: p.duration(
            &key("server_lifetime"),
            &raw.server_lifetime,
            base.server_lifetime,
            true,
        ),
        server_check_delay: p
            .duration(
                &key("server_check_delay"),
                &raw.server_check_delay,
                Some(base.server_check_delay),
                true,
            )
            .unwrap_or(Duration::ZERO),
        max_prepared_statements: p.count(
            &key("max_prepared_statements"),
            raw.max_prepared_statements,
            base.max_prepared_statements,
            1,
            100_000,
        ),
        session_state,
        reset_query,
    }
}

pub(super) fn validate(raw: RawConfig, base_dir: Option<&Path>) -> Result<Config, ConfigError> {
    let mut p = Problems(Vec::new());
    let l = &raw.listen;
    let addr = match l.addr.as_deref() {
        None => SocketAddr::from(([127, 0, 0, 1], 6432)),
        Some(a) => a.parse().unwrap_or_else(|e| {
            p.add(
                "listen.addr",
                format!("invalid address {a:?}: {e} (expected IP:port, e.g. \"127.0.0.1:6432\")"),
            );
            SocketAddr::from(([127, 0, 0, 1], 6432))
        }),
    };
    let auth_type = match l.auth_type.as_deref() {
        None | Some("scram-sha-256") => AuthType::ScramSha256,
        Some("md5") => AuthType::Md5,
        Some("trust") => AuthType::Trust,
        Some(other) => {
            p.add(
                "listen.auth_type",
                format!("must be \"scram-sha-256\", \"md5\" or \"trust\", got {other:?}"),
            );
            AuthType::ScramSha256
        }
    };
    let listen = ListenConfig {
        addr,
        max_client_conn: p.count("listen.max_client_conn", l.max_client_conn, 1000, 1, 1_000_000),
        auth_type,
        max_message_size: p.count("listen.max_message_size", l.max_message_size, 64 << 20, 1024, 1 << 30),
        client_login_timeout: p
            .duration(
                "listen.client_login_timeout",
                &l.client_login_timeout,
                Some(Duration::from_secs(15)),
                false,
            )
            .unwrap_or(Duration::from_secs(15)),
        shutdown_timeout: p
            .duration(
                "listen.shutdown_timeout",
                &l.shutdown_timeout,
                Some(Duration::from_secs(30)),
                true,
            )
            .unwrap_or(Duration::ZERO),
        workers: p.count("listen.workers", l.workers, 0, 0, 1024),
        tcp_keepalive: p.duration(
            "listen.tcp_keepalive",
            &l.tcp_keepalive,
            Some(Duration::from_secs(60)),
            true,
        ),
    };

    let pool_defaults = pool_settings(&mut p, "pool", &raw.pool, &default_pool());

    let mut users: BTreeMap<String, UserConfig> = BTreeMap::new();
    if let Some(file) = &l.auth_file {
        let path = match base_dir {
            Some(dir) if Path::new(file).is_relative() => dir.join(file),
            _ => Path::new(file).to_owned(),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => match parse_userlist(&text) {
                Ok(list) => {
                    for (name, password) in list {
                        users.insert(
                            name,
                            UserConfig {
                                secret: Secret::parse(&password),
                                pool_size: None,
                            },
                        );
                    }
                }
                Err(e) => p.add("listen.auth_file", format!("{}: {e}", path.display())),
            },
            Err(e) => p.add("listen.auth_file", format!("cannot read {}: {e}", path.display())),
        }
    }
    for (name, u) in &raw.users {
        let key = format!("users.{name}");
        let pool_size = u
            .pool_size
            .map(|n| p.count(&format!("{key}.pool_size"), Some(n), 1, 1, 10_000));
        users.insert(
            name.clone(),
            UserConfig {
                secret: Secret::parse(u.password.as_deref().unwrap_or("")),
                pool_size,
            },
        );
    }
    for (name, u) in &users {
        let key = format!("users.{name}.password");
        match (&u.secret, auth_type) {
            (Secret::None, AuthType::Md5 | AuthType::ScramSha256) => {
                p.add(key, "a password is required unless listen.auth_type is \"trust\"")
            }
            (Secret::Scram(s), _) if crate::auth::scram::ScramVerifier::parse(s).is_err() => {
                p.add(key, "is not a valid SCRAM-SHA-256 verifier")
            }
            (Secret::Scram(_), AuthType::Md5) => p.add(
                key,
                "md5 client authentication cannot be checked against a SCRAM verifier; use a plain or md5 password, or auth_type = \"scram-sha-256\"",
            ),
            _ => {}
        }
    }

    if raw.databases.is_empty() {
        p.add("databases", "at least one [databases.NAME] table is required");
    }
    let mut databases = BTreeMap::new();
    for (name, d) in &raw.databases {
        let key = format!("databases.{name}");
        let port = match d.port {
            None => 5432,
            Some(n) if (1..=65535).contains(&n) => n as u16,
            Some(n) => {
                p.add(format!("{key}.port"), format!("must be between 1 and 65535, got {n}"));
                5432
            }
        };
        if d.password.is_some() && d.user.is_none() {
            p.add(
                format!("{key}.password"),
                "requires user (the forced server user it belongs to)",
            );
        }
        let host = d.host.clone().unwrap_or_else(|| "127.0.0.1".to_owned());
        if host.is_empty() {
            p.add(format!("{key}.host"), "must not be empty");
        }
        databases.insert(
            name.clone(),
            DatabaseConfig {
                host,
                port,
                dbname: d.dbname.clone().unwrap_or_else(|| name.clone()),
                server_user: d.user.clone(),
                server_password: d.password.clone(),
                pool: pool_settings(&mut p, &key, &d.pool_overrides(), &pool_defaults),
            },
        );
    }

    if p.0.is_empty() {
        Ok(Config {
            listen,
            pool_defaults,
            databases,
            users,
        })
    } else {
        Err(ConfigError::Invalid(p.0))
    }
}
