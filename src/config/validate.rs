//! Raw → typed config: defaults, ranges and cross-field rules. Every problem is collected with its
//! key path; nothing is warned about and then ignored.
//!
//! When a value is wrong, the default stands in for it so that checks depending on it (e.g.
//! min_pool_size against pool_size) still run and report their own problems; the result is
//! thrown away whenever any problem was found.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::hba::{HbaAction, HbaAddress, HbaRule};
use super::raw::{
    RawAuthQuery, RawConfig, RawDuration, RawHba, RawListen, RawPeer, RawPool, RawServerTls, RawTls, RawUser,
};
use super::{
    AdminConfig, AuthQueryConfig, AuthType, ClientTlsConfig, ClientTlsMode, Config, ConfigError, ConfigProblem,
    DatabaseConfig, ListenConfig, PeerConfig, PoolMode, PoolSettings, Secret, ServerTlsConfig, ServerTlsMode,
    SessionStatePolicy, UserConfig, parse_userlist,
};
use crate::auth::AuthError;
use crate::auth::scram::ScramVerifier;
use crate::net::tls::{self, ServerVerify};

const ONE_DAY: Duration = Duration::from_secs(86_400);
/// No duration may exceed this: beyond it a value is surely a typo, and far-future deadlines
/// (`Instant + d`) could overflow elsewhere.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);
/// Linux caps TCP_KEEPIDLE at 32767 seconds; larger values fail `setsockopt` at run time, where
/// the error could only be logged.
const MAX_KEEPALIVE: Duration = Duration::from_secs(32_767);
const MAX_POOL_SIZE: usize = 10_000;
const MIN_MESSAGE_SIZE: usize = 1 << 10;
const MAX_MESSAGE_SIZE: usize = 1 << 30;
const DEFAULT_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 6432);

/// Collected problems plus the parsing helpers that report into it.
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Parses a written duration (0 and "0" give zero); `None` after recording a problem.
    fn duration(&mut self, key: &str, raw: &RawDuration) -> Option<Duration> {
        let parsed = match raw {
            RawDuration::Number(0) => Duration::ZERO,
            RawDuration::Number(n) if *n < 0 => {
                self.add(key, format!("must not be negative, got {n}"));
                return None;
            }
            RawDuration::Number(n) => {
                // A bare number is ambiguous (seconds? milliseconds?), so a unit is required.
                self.add(
                    key,
                    format!("a duration needs a unit: write \"{n}s\" or \"{n}ms\", not {n}"),
                );
                return None;
            }
            RawDuration::Text(t) if t.trim() == "0" => Duration::ZERO,
            RawDuration::Text(t) if t.trim_start().starts_with('-') => {
                self.add(key, format!("must not be negative, got {t:?}"));
                return None;
            }
            RawDuration::Text(t) => match humantime::parse_duration(t.trim()) {
                Ok(d) => d,
                Err(e) => {
                    self.add(
                        key,
                        format!("invalid duration {t:?}: {e} (examples: \"5s\", \"250ms\", \"10min\")"),
                    );
                    return None;
                }
            },
        };
        if parsed > MAX_DURATION {
            self.add(
                key,
                format!("must be at most {}, got {}", human(MAX_DURATION), human(parsed)),
            );
            return None;
        }
        Some(parsed)
    }

    /// A duration that must be greater than zero (and at most `max`, if given).
    fn positive_duration(
        &mut self,
        key: &str,
        raw: &Option<RawDuration>,
        default: Duration,
        max: Option<Duration>,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match self.duration(key, raw) {
            None => default,
            Some(d) if d.is_zero() => {
                self.add(key, "must be greater than 0 (it cannot be disabled)");
                default
            }
            Some(d) => match max {
                Some(max) if d > max => {
                    self.add(key, format!("must be at most {}, got {}", human(max), human(d)));
                    default
                }
                _ => d,
            },
        }
    }

    /// A duration where 0 means "disabled" (`None`).
    fn optional_duration(
        &mut self,
        key: &str,
        raw: &Option<RawDuration>,
        default: Option<Duration>,
    ) -> Option<Duration> {
        let Some(raw) = raw else { return default };
        match self.duration(key, raw) {
            None => default,
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
        }
    }

    /// A duration where 0 is an ordinary value (e.g. "check every time", "close at once").
    fn duration_or_zero(&mut self, key: &str, raw: &Option<RawDuration>, default: Duration) -> Duration {
        let Some(raw) = raw else { return default };
        self.duration(key, raw).unwrap_or(default)
    }

    /// An integer in `min..=max`.
    fn count(&mut self, key: &str, raw: Option<i64>, default: usize, min: usize, max: usize) -> usize {
        let Some(n) = raw else { return default };
        match usize::try_from(n) {
            Ok(v) if (min..=max).contains(&v) => v,
            Ok(v) if v > max => {
                self.add(key, format!("must be at most {max}, got {n}"));
                default
            }
            _ => {
                self.add(key, format!("must be at least {min}, got {n}"));
                default
            }
        }
    }
}

/// A duration for messages: whole days as "N days" (humantime would say "1day"), the rest as
/// humantime writes them.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    match (secs / 86_400, secs % 86_400, d.subsec_nanos()) {
        (1, 0, 0) => "1 day".to_owned(),
        (days, 0, 0) if days > 1 => format!("{days} days"),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// A table name as it would be written in a key path: bare when TOML allows it, quoted
/// otherwise, so `users."a.b".password` cannot be mistaken for `users.a.b.password`.
fn key_part(name: &str) -> Cow<'_, str> {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\"")))
    }
}

/// The defaults documented on [`PoolSettings`] (for code that builds a configuration by hand).
pub fn default_pool_settings() -> PoolSettings {
    default_pool()
}

/// The defaults documented on [`PoolSettings`].
fn default_pool() -> PoolSettings {
    PoolSettings {
        mode: PoolMode::Transaction,
        pool_size: 20,
        min_pool_size: 0,
        acquire_timeout: Duration::from_secs(5),
        idle_transaction_timeout: Some(Duration::from_secs(5 * 60)),
        query_timeout: None,
        server_connect_timeout: Duration::from_secs(5),
        server_idle_timeout: Some(Duration::from_secs(10 * 60)),
        server_lifetime: Some(Duration::from_secs(60 * 60)),
        server_check_delay: Duration::from_secs(30),
        max_prepared_statements: 200,
        session_state: SessionStatePolicy::Reset,
        reset_query: "DISCARD ALL".to_owned(),
        server_tls: ServerTlsConfig::prefer(),
    }
}

/// Overlays `raw` on `base`, reporting problems under `prefix` (`pool` or `databases.NAME`).
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
        Some("reset_always") => SessionStatePolicy::ResetAlways,
        Some("reject") => SessionStatePolicy::Reject,
        Some(other) => {
            p.add(
                key("session_state"),
                format!("must be \"allow\", \"reset\", \"reset_always\" or \"reject\", got {other:?}"),
            );
            base.session_state
        }
    };
    let pool_size = p.count(&key("pool_size"), raw.pool_size, base.pool_size, 1, MAX_POOL_SIZE);
    // An inherited min_pool_size is clamped to a smaller pool_size set here, as a user's
    // pool_size clamps it in `Config::pool_settings`; one written here must fit.
    let min_pool_size = p.count(
        &key("min_pool_size"),
        raw.min_pool_size,
        base.min_pool_size.min(pool_size),
        0,
        MAX_POOL_SIZE,
    );
    if min_pool_size > pool_size {
        p.add(
            key("min_pool_size"),
            format!("must not exceed pool_size ({pool_size}), got {min_pool_size}"),
        );
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
        acquire_timeout: p.positive_duration(
            &key("acquire_timeout"),
            &raw.acquire_timeout,
            base.acquire_timeout,
            Some(ONE_DAY),
        ),
        idle_transaction_timeout: p.optional_duration(
            &key("idle_transaction_timeout"),
            &raw.idle_transaction_timeout,
            base.idle_transaction_timeout,
        ),
        query_timeout: p.optional_duration(&key("query_timeout"), &raw.query_timeout, base.query_timeout),
        server_connect_timeout: p.positive_duration(
            &key("server_connect_timeout"),
            &raw.server_connect_timeout,
            base.server_connect_timeout,
            Some(ONE_DAY),
        ),
        server_idle_timeout: p.optional_duration(
            &key("server_idle_timeout"),
            &raw.server_idle_timeout,
            base.server_idle_timeout,
        ),
        server_lifetime: p.optional_duration(&key("server_lifetime"), &raw.server_lifetime, base.server_lifetime),
        server_check_delay: p.duration_or_zero(
            &key("server_check_delay"),
            &raw.server_check_delay,
            base.server_check_delay,
        ),
        max_prepared_statements: p.count(
            &key("max_prepared_statements"),
            raw.max_prepared_statements,
            base.max_prepared_statements,
            1,
            100_000,
        ),
        session_state,
        reset_query,
        server_tls: base.server_tls.clone(),
    }
}

fn resolve(base_dir: Option<&Path>, file: &str) -> std::path::PathBuf {
    match base_dir {
        Some(dir) if Path::new(file).is_relative() => dir.join(file),
        _ => std::path::PathBuf::from(file),
    }
}

/// Peer ids live in 14 bits of the cancel keys pgweir issues (as in PgBouncer).
pub const MAX_PEER_ID: u16 = 16_383;

fn peers(p: &mut Problems, raw: &[RawPeer], own_id: u16) -> BTreeMap<u16, PeerConfig> {
    let mut peers = BTreeMap::new();
    for (i, r) in raw.iter().enumerate() {
        let key = |k: &str| format!("peers[{}].{k}", i + 1);
        let id = match r.id {
            Some(n) if (1..=i64::from(MAX_PEER_ID)).contains(&n) => n as u16,
            Some(n) => {
                p.add(key("id"), format!("must be between 1 and {MAX_PEER_ID}, got {n}"));
                continue;
            }
            None => {
                p.add(key("id"), "is required (the other instance's listen.peer_id)");
                continue;
            }
        };
        let host = match r.host.as_deref() {
            Some(h) if !h.trim().is_empty() => h.to_owned(),
            _ => {
                p.add(key("host"), "is required");
                continue;
            }
        };
        let port = match r.port.map(u16::try_from) {
            Some(Ok(port)) if port != 0 => port,
            _ => {
                p.add(key("port"), "is required, between 1 and 65535");
                continue;
            }
        };
        if crate::net::is_socket_dir(&host) && check_socket_dir(p, &key("host"), &host, port).is_none() {
            continue;
        }
        if peers.insert(id, PeerConfig { host, port }).is_some() {
            p.add(key("id"), format!("peer id {id} is listed twice"));
        }
    }
    if !peers.is_empty() && own_id == 0 {
        p.add(
            "listen.peer_id",
            "[[peers]] are listed but listen.peer_id is 0: give this instance its own id to enable cancel forwarding",
        );
    }
    // An entry for this instance's own id is allowed (one file for every instance) and unused.
    peers
}

/// PgBouncer's default auth_query.
const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

fn auth_query(
    p: &mut Problems,
    raw: Option<&RawAuthQuery>,
    users: &BTreeMap<String, UserConfig>,
) -> Option<AuthQueryConfig> {
    let raw = raw?;
    let user = match raw.user.as_deref() {
        Some(u) if !u.is_empty() => u.to_owned(),
        _ => {
            p.add(
                "auth_query.user",
                "is required: the user pgweir logs in as to look up passwords",
            );
            String::new()
        }
    };
    if !user.is_empty() {
        match users.get(&user).map(|u| &u.secret) {
            Some(Secret::Plain(_) | Secret::Md5(_)) => {}
            Some(_) => p.add(
                "auth_query.user",
                format!("[users.{user}] needs a plain or md5 password: pgweir logs in with it to run the query"),
            ),
            None => p.add(
                "auth_query.user",
                format!("{user:?} must also be listed in [users] (or auth_file) with its password"),
            ),
        }
    }
    let query = raw.query.clone().unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_owned());
    if !query.contains("$1") {
        p.add("auth_query.query", "must take the user name as parameter $1");
    }
    let cache_ttl = p.duration_or_zero("auth_query.cache_ttl", &raw.cache_ttl, Duration::from_secs(60));
    Some(AuthQueryConfig { user, query, cache_ttl })
}

/// The admin token, written inline or (for Kubernetes Secrets and the like) read from a file;
/// surrounding whitespace of the file is ignored.
fn admin_token(p: &mut Problems, inline: Option<&str>, file: Option<&str>, base_dir: Option<&Path>) -> Option<String> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            p.add("admin.token_file", "set either token or token_file, not both");
            None
        }
        (Some(t), None) => Some(t.to_owned()),
        (None, Some(f)) => {
            let path = resolve(base_dir, f);
            match std::fs::read_to_string(&path) {
                Ok(t) => Some(t.trim().to_owned()),
                Err(e) => {
                    p.add("admin.token_file", format!("cannot read {}: {e}", path.display()));
                    None
                }
            }
        }
        (None, None) => None,
    }
}

fn hba_rules(p: &mut Problems, raw: &[RawHba]) -> Vec<HbaRule> {
    let mut rules = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        // 1-based, as the rule numbers in login error messages.
        let key = |k: &str| format!("hba[{}].{k}", i + 1);
        let action = match r.action.as_deref() {
            Some("allow") => HbaAction::Allow,
            Some("deny") => HbaAction::Deny,
            Some(other) => {
                p.add(key("action"), format!("must be \"allow\" or \"deny\", got {other:?}"));
                HbaAction::Deny
            }
            None => {
                p.add(key("action"), "is required (\"allow\" or \"deny\")");
                HbaAction::Deny
            }
        };
        let address = match r.address.as_deref() {
            Some(a) => HbaAddress::parse(a).unwrap_or_else(|e| {
                p.add(key("address"), e);
                HbaAddress::All
            }),
            None => {
                p.add(
                    key("address"),
                    "is required (\"all\", \"local\" for the Unix socket, an IP address or a CIDR range)",
                );
                HbaAddress::All
            }
        };
        for (name, list) in [("databases", &r.databases), ("users", &r.users)] {
            if list
                .as_ref()
                .is_some_and(|l| l.is_empty() || l.iter().any(String::is_empty))
            {
                p.add(key(name), "must list names (omit the key to match any)");
            }
        }
        if address == HbaAddress::Local && r.tls.is_some() {
            p.add(
                key("tls"),
                "a Unix-socket client never uses TLS, so this rule could never match: remove tls (as PostgreSQL's local lines have no ssl variant)",
            );
        }
        rules.push(HbaRule {
            action,
            address,
            databases: r.databases.clone(),
            users: r.users.clone(),
            tls: r.tls,
        });
    }
    rules
}

fn client_tls(p: &mut Problems, raw: &RawTls, base_dir: Option<&Path>) -> ClientTlsConfig {
    let mode = match raw.mode.as_deref() {
        None | Some("disable") => ClientTlsMode::Disable,
        Some("allow") => ClientTlsMode::Allow,
        Some("prefer") => ClientTlsMode::Prefer,
        Some("require") => ClientTlsMode::Require,
        Some(other) => {
            p.add(
                "tls.mode",
                format!("must be \"disable\", \"allow\", \"prefer\" or \"require\", got {other:?}"),
            );
            ClientTlsMode::Disable
        }
    };
    let cert_file = raw.cert_file.as_deref().map(|f| resolve(base_dir, f));
    let key_file = raw.key_file.as_deref().map(|f| resolve(base_dir, f));
    let mut acceptor = None;
    if mode != ClientTlsMode::Disable {
        match (&cert_file, &key_file) {
            (Some(cert), Some(key)) => match tls::acceptor(cert, key) {
                Ok(a) => acceptor = Some(a),
                Err(e) => p.add("tls.cert_file", e),
            },
            _ => p.add(
                "tls",
                "mode other than \"disable\" needs cert_file and key_file (PEM certificate chain and private key)",
            ),
        }
    }
    ClientTlsConfig {
        mode,
        cert_file,
        key_file,
        acceptor,
    }
}

fn server_tls(p: &mut Problems, raw: &RawServerTls, base_dir: Option<&Path>) -> ServerTlsConfig {
    let mode = match raw.mode.as_deref() {
        None | Some("prefer") => ServerTlsMode::Prefer,
        Some("disable") => ServerTlsMode::Disable,
        Some("require") => ServerTlsMode::Require,
        Some("verify-ca") => ServerTlsMode::VerifyCa,
        Some("verify-full") => ServerTlsMode::VerifyFull,
        Some(other) => {
            p.add(
                "server_tls.mode",
                format!(
                    "must be \"disable\", \"prefer\", \"require\", \"verify-ca\" or \"verify-full\", got {other:?}"
                ),
            );
            ServerTlsMode::Prefer
        }
    };
    let ca_file = raw.ca_file.as_deref().map(|f| resolve(base_dir, f));
    if raw
        .server_name
        .as_deref()
        .is_some_and(|n| rustls::pki_types::ServerName::try_from(n).is_err())
    {
        p.add("server_tls.server_name", "must be a DNS name or an IP address");
    }
    let verify = match mode {
        ServerTlsMode::Disable => None,
        ServerTlsMode::Prefer | ServerTlsMode::Require => Some(ServerVerify::None),
        ServerTlsMode::VerifyCa => Some(ServerVerify::Ca),
        ServerTlsMode::VerifyFull => Some(ServerVerify::Full),
    };
    let connector = match verify {
        Some(ServerVerify::Ca | ServerVerify::Full) if ca_file.is_none() => {
            p.add(
                "server_tls.ca_file",
                "verify-ca and verify-full need ca_file (the CA that signed PostgreSQL's certificate)",
            );
            None
        }
        Some(v) => match tls::connector(v, ca_file.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => {
                p.add("server_tls.ca_file", e);
                None
            }
        },
        None => None,
    };
    ServerTlsConfig {
        mode,
        ca_file,
        server_name: raw.server_name.clone(),
        connector,
    }
}

fn listen_config(p: &mut Problems, l: &RawListen) -> ListenConfig {
    let addr = match l.addr.as_deref() {
        None => SocketAddr::from(DEFAULT_ADDR),
        Some(a) => a.parse().unwrap_or_else(|e| {
            p.add(
                "listen.addr",
                format!("invalid address {a:?}: {e} (expected IP:port, e.g. \"127.0.0.1:6432\" or \"[::1]:6432\")"),
            );
            SocketAddr::from(DEFAULT_ADDR)
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
    let max_client_conn = p.count("listen.max_client_conn", l.max_client_conn, 1000, 1, 1_000_000);
    let max_message_size = match l.max_message_size {
        None => 64 << 20,
        Some(n) => match usize::try_from(n) {
            Ok(v) if (MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&v) => v,
            _ => {
                p.add(
                    "listen.max_message_size",
                    format!("must be between {MIN_MESSAGE_SIZE} (1 KiB) and {MAX_MESSAGE_SIZE} (1 GiB) bytes, got {n}"),
                );
                64 << 20
            }
        },
    };
    let client_login_timeout = p.positive_duration(
        "listen.client_login_timeout",
        &l.client_login_timeout,
        Duration::from_secs(15),
        None,
    );
    let shutdown_timeout = p.duration_or_zero("listen.shutdown_timeout", &l.shutdown_timeout, Duration::from_secs(30));
    let workers = p.count("listen.workers", l.workers, 0, 0, 1024);
    let tcp_keepalive = p.optional_duration("listen.tcp_keepalive", &l.tcp_keepalive, Some(Duration::from_secs(60)));
    if let Some(d) = tcp_keepalive {
        if d < Duration::from_secs(1) {
            p.add(
                "listen.tcp_keepalive",
                format!(
                    "must be at least 1s (the OS counts it in whole seconds), or 0 to keep the OS default; got {}",
                    human(d)
                ),
            );
        } else if d > MAX_KEEPALIVE {
            p.add(
                "listen.tcp_keepalive",
                format!(
                    "must be at most {} (the Linux limit), got {}",
                    human(MAX_KEEPALIVE),
                    human(d)
                ),
            );
        }
    }
    let unix_socket_dir = match l.unix_socket_dir.as_deref() {
        None | Some("") => None,
        // Port 0 is chosen at bind time: check the longest name it could give.
        Some(dir) => check_socket_dir(
            p,
            "listen.unix_socket_dir",
            dir,
            match addr.port() {
                0 => u16::MAX,
                port => port,
            },
        )
        .map(std::path::PathBuf::from),
    };
    let unix_socket_mode = match l.unix_socket_mode.as_deref() {
        None => 0o777,
        Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
            Ok(mode) if mode <= 0o777 => mode,
            _ => {
                p.add(
                    "listen.unix_socket_mode",
                    format!("must be permission bits in octal, e.g. \"0777\" or \"0770\", got {m:?}"),
                );
                0o777
            }
        },
    };
    let unix_socket_group = match l.unix_socket_group.as_deref() {
        None | Some("") => None,
        Some(group) => {
            let gid = group.parse::<u32>().ok().or_else(|| {
                std::fs::read_to_string("/etc/group")
                    .ok()
                    .and_then(|text| gid_in_group_file(&text, group))
            });
            if gid.is_none() {
                p.add(
                    "listen.unix_socket_group",
                    format!("no group named {group:?} in /etc/group; give the group's name there or its numeric id"),
                );
            }
            if unix_socket_dir.is_none() {
                p.add(
                    "listen.unix_socket_group",
                    "applies to the Unix socket, but listen.unix_socket_dir is not set",
                );
            }
            gid
        }
    };
    ListenConfig {
        unix_socket_dir,
        unix_socket_mode,
        unix_socket_group,
        addr,
        max_client_conn,
        auth_type,
        max_message_size,
        client_login_timeout,
        shutdown_timeout,
        workers,
        event_loop: l.event_loop.unwrap_or(true),
        event_loop_after: p.duration_or_zero(
            "listen.event_loop_after",
            &l.event_loop_after,
            Duration::from_millis(100),
        ),
        peer_id: p.count("listen.peer_id", l.peer_id, 0, 0, MAX_PEER_ID as usize) as u16,
        tcp_keepalive,
    }
}

/// The id of group `name` in the text of an /etc/group file (`name:x:gid:members` lines).
/// Groups only a directory service knows are not found: those are given by number.
pub(crate) fn gid_in_group_file(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.trim().parse().ok()
    })
}

/// Longest path a Unix socket can have (`sun_path` holds 108 bytes with the final NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Checks a Unix-socket directory as libpq and PostgreSQL use one: absolute, and short enough
/// for the socket file `.s.PGSQL.<port>` inside it. None after recording a problem.
fn check_socket_dir<'a>(p: &mut Problems, key: &str, dir: &'a str, port: u16) -> Option<&'a str> {
    if !dir.starts_with('/') {
        p.add(key, format!("must be an absolute directory path, got {dir:?}"));
        return None;
    }
    let path = crate::net::socket_path(dir, port);
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        p.add(
            key,
            format!(
                "the socket path {} is {len} bytes; Unix sockets allow at most {MAX_SOCKET_PATH}: use a shorter directory",
                path.display()
            ),
        );
        return None;
    }
    Some(dir)
}

/// Where a user's secret came from, so a problem with it points at the place to fix.
enum Origin {
    /// `[users.NAME].password` (or its absence there, with no auth_file entry either).
    Table,
    /// An `auth_file` entry; the path as resolved.
    AuthFile(String),
}

/// Reads `listen.auth_file`, if any, relative to `base_dir`. `None` after recording a problem.
fn read_auth_file(p: &mut Problems, file: &str, base_dir: Option<&Path>) -> Option<(String, Vec<(String, String)>)> {
    let path = match base_dir {
        Some(dir) if Path::new(file).is_relative() => dir.join(file),
        _ => Path::new(file).to_owned(),
    };
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            p.add("listen.auth_file", format!("cannot read {shown}: {e}"));
            return None;
        }
    };
    match parse_userlist(&text) {
        Ok(list) => Some((shown, list)),
        Err(e) => {
            p.add("listen.auth_file", format!("{shown}: {e}"));
            None
        }
    }
}

/// Merges auth_file entries and `[users.*]` tables (the table wins where both give a password)
/// and checks every secret against `auth_type`.
fn users(
    p: &mut Problems,
    raw: &BTreeMap<String, RawUser>,
    auth_file: Option<(String, Vec<(String, String)>)>,
    auth_file_failed: bool,
    auth_type: AuthType,
) -> BTreeMap<String, UserConfig> {
    let mut merged: BTreeMap<String, (UserConfig, Origin)> = BTreeMap::new();
    if let Some((path, list)) = auth_file {
        for (name, password) in list {
            let user = UserConfig {
                secret: Secret::parse(&password),
                pool_size: None,
            };
            merged.insert(name, (user, Origin::AuthFile(path.clone())));
        }
    }
    for (name, u) in raw {
        let key = format!("users.{}", key_part(name));
        if name.is_empty() {
            p.add(&key, "user name must not be empty");
        }
        let pool_size = u
            .pool_size
            .map(|n| p.count(&format!("{key}.pool_size"), Some(n), 1, 1, MAX_POOL_SIZE));
        let entry = merged.entry(name.clone()).or_insert_with(|| {
            (
                UserConfig {
                    secret: Secret::None,
                    pool_size: None,
                },
                Origin::Table,
            )
        });
        entry.0.pool_size = pool_size;
        // A table without a password keeps the auth_file's, so secrets can live in the
        // auth_file while per-user settings live here.
        if let Some(password) = &u.password {
            entry.0.secret = Secret::parse(password);
            entry.1 = Origin::Table;
        }
    }

    for (name, (user, origin)) in &merged {
        let (key, context) = match origin {
            Origin::Table => (format!("users.{}.password", key_part(name)), String::new()),
            Origin::AuthFile(path) => ("listen.auth_file".to_owned(), format!("{path}: user {name:?}: ")),
        };
        let problem = match (&user.secret, auth_type) {
            (Secret::None, AuthType::Md5 | AuthType::ScramSha256) => {
                Some("a password is required unless listen.auth_type is \"trust\"".to_owned())
            }
            (Secret::Scram(s), _) => match ScramVerifier::parse(s) {
                Err(AuthError::InvalidVerifier(why)) => Some(format!("is not a valid SCRAM-SHA-256 verifier: {why}")),
                Err(e) => Some(format!("is not a valid SCRAM-SHA-256 verifier: {e}")),
                Ok(_) if auth_type == AuthType::Md5 => Some(
                    "md5 client authentication cannot be checked against a SCRAM verifier; use a plain or md5 \
                     password, or auth_type = \"scram-sha-256\""
                        .to_owned(),
                ),
                Ok(_) => None,
            },
            (Secret::Md5(_), AuthType::ScramSha256) => Some(
                "SCRAM client authentication cannot be checked against an md5 hash; use a plain password or a \
                 SCRAM-SHA-256 verifier, or auth_type = \"md5\""
                    .to_owned(),
            ),
            _ => None,
        };
        if let Some(message) = problem {
            p.add(key, format!("{context}{message}"));
        }
    }

    // Without users nobody can log in (except under trust); say so now rather than at the first
    // refused login. Skipped when the auth_file failed, which is already reported.
    if merged.is_empty() && auth_type != AuthType::Trust && !auth_file_failed {
        p.add(
            "users",
            "no users are configured ([users.NAME] or listen.auth_file), so no client could log in; add users \
             or set listen.auth_type = \"trust\"",
        );
    }

    merged.into_iter().map(|(name, (user, _))| (name, user)).collect()
}

/// Validates a parsed file. `base_dir` resolves a relative `listen.auth_file`; without it the
/// path is relative to the current directory.
fn percent(p: &mut Problems, key: &str, raw: Option<i64>, default: u8) -> u8 {
    match raw {
        None => default,
        Some(n) if (1..=100).contains(&n) => n as u8,
        Some(n) => {
            p.add(key, format!("must be a percentage between 1 and 100, got {n}"));
            default
        }
    }
}

pub(super) fn validate(raw: RawConfig, base_dir: Option<&Path>) -> Result<Config, ConfigError> {
    let mut p = Problems(Vec::new());
    let listen = listen_config(&mut p, &raw.listen);
    let admin = AdminConfig {
        addr: match raw.admin.addr.as_deref() {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 6433))),
            Some("") => None,
            Some(a) => match a.parse() {
                Ok(addr) => Some(addr),
                Err(e) => {
                    p.add(
                        "admin.addr",
                        format!("invalid address {a:?}: {e} (expected IP:port, or \"\" to disable)"),
                    );
                    None
                }
            },
        },
        token: match admin_token(
            &mut p,
            raw.admin.token.as_deref(),
            raw.admin.token_file.as_deref(),
            base_dir,
        )
        .as_deref()
        {
            Some(t) if t.len() < 16 => {
                p.add("admin.token", "must be at least 16 characters");
                None
            }
            t => t.map(str::to_owned),
        },
        ready_warn_percent: percent(&mut p, "admin.ready_warn_percent", raw.admin.ready_warn_percent, 80),
        ready_critical_percent: percent(
            &mut p,
            "admin.ready_critical_percent",
            raw.admin.ready_critical_percent,
            90,
        ),
        query_text_bytes: p.count("admin.query_text_bytes", raw.admin.query_text_bytes, 0, 0, 65_536),
    };
    if admin.ready_critical_percent < admin.ready_warn_percent {
        p.add(
            "admin.ready_critical_percent",
            format!(
                "must be at least ready_warn_percent ({}), got {}",
                admin.ready_warn_percent, admin.ready_critical_percent
            ),
        );
    }

    let tls = client_tls(&mut p, &raw.tls, base_dir);
    let hba = hba_rules(&mut p, &raw.hba);
    let mut base_pool = default_pool();
    base_pool.server_tls = server_tls(&mut p, &raw.server_tls, base_dir);
    let pool_defaults = pool_settings(&mut p, "pool", &raw.pool, &base_pool);

    if raw.databases.is_empty() {
        p.add("databases", "at least one [databases.NAME] table is required");
    }
    let mut databases = BTreeMap::new();
    for (name, d) in &raw.databases {
        let key = format!("databases.{}", key_part(name));
        if name.is_empty() {
            p.add(&key, "database name must not be empty");
        }
        let port = match d.port {
            None => 5432,
            Some(n) => u16::try_from(n).ok().filter(|&port| port != 0).unwrap_or_else(|| {
                p.add(format!("{key}.port"), format!("must be between 1 and 65535, got {n}"));
                5432
            }),
        };
        let host = d.host.clone().unwrap_or_else(|| "127.0.0.1".to_owned());
        if host.trim().is_empty() {
            p.add(format!("{key}.host"), "must not be empty");
        } else if crate::net::is_socket_dir(&host) {
            check_socket_dir(&mut p, &format!("{key}.host"), &host, port);
        }
        let dbname = d.dbname.clone().unwrap_or_else(|| name.clone());
        if d.dbname.as_deref().is_some_and(str::is_empty) {
            p.add(
                format!("{key}.dbname"),
                "must not be empty (omit it to use the table name)",
            );
        }
        if d.user.as_deref().is_some_and(str::is_empty) {
            p.add(
                format!("{key}.user"),
                "must not be empty (omit it to use the client's user)",
            );
        }
        if d.password.is_some() && d.user.is_none() {
            p.add(
                format!("{key}.password"),
                "requires user (the forced server user it belongs to)",
            );
        }
        let pool = pool_settings(&mut p, &key, &d.pool_overrides(), &pool_defaults);
        databases.insert(
            name.clone(),
            DatabaseConfig {
                host,
                port,
                dbname,
                server_user: d.user.clone(),
                server_password: d.password.clone(),
                pool,
            },
        );
    }

    // Users last: in most files [users.*] follow [databases.*], and problems are listed in
    // roughly file order.
    let auth_file = raw
        .listen
        .auth_file
        .as_deref()
        .map(|file| read_auth_file(&mut p, file, base_dir));
    let auth_file_failed = matches!(auth_file, Some(None));
    let users = users(
        &mut p,
        &raw.users,
        auth_file.flatten(),
        auth_file_failed,
        listen.auth_type,
    );
    let auth_query = auth_query(&mut p, raw.auth_query.as_ref(), &users);
    let peers = peers(&mut p, &raw.peers, listen.peer_id);

    if p.0.is_empty() {
        Ok(Config {
            listen,
            admin,
            pool_defaults,
            databases,
            users,
            tls,
            hba,
            auth_query,
            peers,
        })
    } else {
        Err(ConfigError::Invalid(p.0))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn group_ids_are_read_from_an_etc_group_text() {
        let text = "root:x:0:\n# a comment\nwheel:x:10:alice,bob\npgweir:*:998:\nbroken\nodd:x:notanumber:\n";
        assert_eq!(super::gid_in_group_file(text, "root"), Some(0));
        assert_eq!(super::gid_in_group_file(text, "wheel"), Some(10));
        assert_eq!(super::gid_in_group_file(text, "pgweir"), Some(998));
        assert_eq!(super::gid_in_group_file(text, "whee"), None, "whole names only");
        assert_eq!(super::gid_in_group_file(text, "broken"), None);
        assert_eq!(super::gid_in_group_file(text, "odd"), None);
        assert_eq!(super::gid_in_group_file(text, "alice"), None, "members are not groups");
    }
}
