//! `pgweir demo`: a throwaway PostgreSQL (initdb into a temp dir) with pgweir in front of it, so
//! a newcomer sees the proxy work with one command. Everything is deleted on exit.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::config::{AuthType, Config, DatabaseConfig, ListenConfig, PoolSettings, Secret, UserConfig};
use crate::embedded_pg::{EmbeddedPostgres, roles};

/// A config serving database `app` (and `postgres`) of the embedded server through `listen`,
/// with the embedded cluster's roles as users. Small pools make pooling visible.
pub fn demo_config(pg: &EmbeddedPostgres, listen: SocketAddr) -> Config {
    let pool = PoolSettings {
        pool_size: 5,
        idle_transaction_timeout: Some(std::time::Duration::from_secs(60)),
        ..crate::config::default_pool_settings()
    };
    let databases: BTreeMap<String, DatabaseConfig> = ["app", "postgres"]
        .into_iter()
        .map(|name| {
            (
                name.to_owned(),
                DatabaseConfig {
                    host: pg.host().to_owned(),
                    port: pg.port(),
                    dbname: name.to_owned(),
                    server_user: None,
                    server_password: None,
                    pool: pool.clone(),
                },
            )
        })
        .collect();
    let users = [roles::SCRAM, roles::MD5, roles::PLAIN, roles::SUPERUSER]
        .into_iter()
        .map(|(name, password)| {
            (
                name.to_owned(),
                UserConfig {
                    secret: Secret::Plain(password.to_owned()),
                    pool_size: None,
                },
            )
        })
        .collect();
    Config {
        listen: ListenConfig {
            addr: listen,
            max_client_conn: 1000,
            auth_type: AuthType::ScramSha256,
            max_message_size: 64 << 20,
            client_login_timeout: std::time::Duration::from_secs(15),
            shutdown_timeout: std::time::Duration::from_secs(5),
            workers: 0,
            event_loop: true,
            event_loop_after: std::time::Duration::from_millis(100),
            tcp_keepalive: Some(std::time::Duration::from_secs(60)),
            peer_id: 0,
            unix_socket_dir: None,
            unix_socket_mode: 0o777,
            unix_socket_group: None,
        },
        admin: crate::config::AdminConfig {
            addr: Some(SocketAddr::new(listen.ip(), 0)),
            token: None,
            ready_warn_percent: 80,
            ready_critical_percent: 90,
            query_text_bytes: 0,
        },
        pool_defaults: pool,
        databases,
        users,
        tls: Default::default(),
        hba: Vec::new(),
        auth_query: None,
        peers: Default::default(),
    }
}
