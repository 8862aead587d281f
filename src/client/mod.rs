//! One client session: handshake (startup, auth, welcome), then the transaction loop that lends
//! it a server connection per transaction, and cancel routing.
//!
//! Key invariant: a session holds a server only inside [`session`]'s linked phase, and gives it
//! back only when the server said ReadyForQuery 'I' with nothing outstanding; every other exit
//! from that phase closes the server connection.

pub mod auth_query;
pub mod cancel;
mod error;
mod handshake;
pub mod hygiene;
mod link;
pub mod prepared;
pub mod registry;
mod session;
mod users;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

pub use cancel::CancelRegistry;
pub use error::{ClientError, DISCONNECT_REASONS, LOGIN_FAILURE_REASONS, LoginFailure};
pub(crate) use handshake::refuse;
pub use users::UserDirectory;

pub(crate) use session::Hub;

use crate::config::Config;
use crate::net::{PeerAddr, Sock};
use crate::pool::PoolRegistry;
use crate::server::ServerIds;

/// Process-unique id of a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(pub u64);

/// Everything a session needs from the rest of the process, passed in (no globals).
pub struct ClientContext {
    /// The running configuration; swapped whole on reload (new logins see the new one).
    pub config: ArcSwap<Config>,
    /// Client credentials prepared from `config`; swapped together with it.
    pub users: ArcSwap<UserDirectory>,
    pub pools: Arc<PoolRegistry>,
    pub cancels: CancelRegistry,
    /// Prepared statements shared by all clients (see `prepared`).
    pub statements: prepared::StatementRegistry,
    /// Clients' parameter forms, shared (see [`crate::server::params::FormInterner`]).
    pub param_forms: crate::server::params::FormInterner,
    pub server_ids: Arc<ServerIds>,
    /// Fires when the process starts shutting down: idle clients are told and closed, clients
    /// inside a transaction may finish it.
    pub shutdown: CancellationToken,
    next_client: AtomicU64,
    /// Connected clients (any phase), for max_client_conn accounting and the admin API.
    pub connected: AtomicUsize,
    /// Logged-in clients, for the admin API.
    pub clients: registry::ClientRegistry,
    /// Spare read buffers for sessions waking from idle.
    pub buffers: crate::net::buffers::BufferPool,
    /// Spare reply queues for sessions' first links.
    pub(crate) link_spares: link::SparesPool,
    /// The file the configuration came from, re-read on SIGHUP and POST /api/reload.
    pub config_path: Option<std::path::PathBuf>,
    /// Ended client sessions by reason (indexes of [`DISCONNECT_REASONS`]).
    pub disconnects: [AtomicU64; DISCONNECT_REASONS.len()],
    /// Failed logins by reason (indexes of [`LOGIN_FAILURE_REASONS`]).
    pub login_failures: [AtomicU64; LOGIN_FAILURE_REASONS.len()],
    /// Users looked up with `[auth_query]`.
    pub auth_query: auth_query::AuthQueryCache,
    /// Set by POST /api/drain: /ready answers 503 so load balancers stop sending new clients,
    /// while connected clients are served as usual (the shutdown that follows drains them).
    pub draining: std::sync::atomic::AtomicBool,
    /// The event loop serving plain-TCP transaction-mode clients between and during
    /// transactions (`listen.event_loop`); None serves every client from its own task.
    pub(crate) hub: Option<session::Hub>,
}

impl ClientContext {
    pub fn new(
        config: Arc<Config>,
        pools: Arc<PoolRegistry>,
        server_ids: Arc<ServerIds>,
        shutdown: CancellationToken,
    ) -> Self {
        let peer_id = config.listen.peer_id;
        ClientContext {
            users: ArcSwap::from_pointee(UserDirectory::from_config(&config)),
            config: ArcSwap::new(config),
            pools,
            cancels: CancelRegistry::new(peer_id),
            statements: prepared::StatementRegistry::default(),
            param_forms: Default::default(),
            server_ids,
            shutdown,
            next_client: AtomicU64::new(0),
            connected: AtomicUsize::new(0),
            clients: registry::ClientRegistry::default(),
            buffers: crate::net::buffers::BufferPool::new(session::READ_CHUNK),
            link_spares: Default::default(),
            config_path: None,
            disconnects: Default::default(),
            login_failures: Default::default(),
            auth_query: Default::default(),
            draining: Default::default(),
            hub: None,
        }
    }

    /// Re-reads the configuration file. A file with any problem is rejected whole and the running
    /// configuration kept; the error lists every problem.
    pub fn reload_from_file(&self) -> Result<Reloaded, String> {
        let path = self
            .config_path
            .as_ref()
            .ok_or_else(|| "pgweir was started without a configuration file".to_owned())?;
        let config = Config::load(path).map_err(|e| e.to_string())?;
        let reloaded = self.reload(config);
        tracing::info!(
            path = %path.display(),
            needs_restart = ?reloaded.needs_restart,
            removed_pools = ?reloaded.removed_pools,
            "configuration reloaded"
        );
        Ok(reloaded)
    }

    /// Applies a new, already validated configuration: new logins use it at once, and existing
    /// pools take their new settings (size at once, timeouts from the next use). Sessions
    /// already running keep the idle_transaction_timeout and mode they started with. The pools
    /// of a database the new configuration no longer has are removed: their clients leave at
    /// the end of the transaction they are in (at once when not in one), told why.
    pub fn reload(&self, config: Config) -> Reloaded {
        let old = self.config.load_full();
        let mut needs_restart = Vec::new();
        if old.listen.addr != config.listen.addr {
            needs_restart.push("listen.addr".to_owned());
        }
        if old.listen.max_client_conn != config.listen.max_client_conn {
            needs_restart.push("listen.max_client_conn".to_owned());
        }
        if old.listen.peer_id != config.listen.peer_id {
            // Keys already handed out carry the old id.
            needs_restart.push("listen.peer_id".to_owned());
        }
        if old.listen.event_loop != config.listen.event_loop {
            needs_restart.push("listen.event_loop".to_owned());
        }
        if old.listen.unix_socket_dir != config.listen.unix_socket_dir {
            needs_restart.push("listen.unix_socket_dir".to_owned());
        }
        if old.listen.unix_socket_mode != config.listen.unix_socket_mode {
            needs_restart.push("listen.unix_socket_mode".to_owned());
        }
        if old.listen.unix_socket_group != config.listen.unix_socket_group {
            needs_restart.push("listen.unix_socket_group".to_owned());
        }
        if old.admin.addr != config.admin.addr {
            needs_restart.push("admin.addr".to_owned());
        }
        if old.listen.workers != config.listen.workers {
            // The runtime's thread count.
            needs_restart.push("listen.workers".to_owned());
        }
        if old.listen.tcp_keepalive != config.listen.tcp_keepalive {
            // Set once on the listening socket, which accepted connections inherit it from,
            // and kept by each pool for its server connections.
            needs_restart.push("listen.tcp_keepalive".to_owned());
        }
        let users = Arc::new(UserDirectory::from_config(&config));
        let config = Arc::new(config);
        let removed = self.pools.reconfigure(
            || {
                self.users.store(users.clone());
                self.auth_query.clear();
                self.config.store(config.clone());
            },
            |key| config.databases.contains_key(&key.database),
        );
        for pool in &removed {
            let told = self
                .clients
                .stop_pool(&pool.shared_key(), registry::SHUTDOWN | registry::REMOVED);
            tracing::info!(pool = %pool.key(), clients = told, "pool removed by reload: its database is no longer configured");
            pool.close();
        }
        for pool in self.pools.all() {
            let key = pool.key();
            if let Some(settings) = config.pool_settings(&key.database, &key.user)
                && **pool.settings() != settings
            {
                pool.update_settings(settings);
            }
            let Some(db) = config.databases.get(&key.database) else {
                continue;
            };
            // A new address, database or server user (a failover, a move): the pool follows,
            // as a pool made now would.
            if pool.retarget(handshake::server_target(db, &key.user)) {
                tracing::info!(pool = %key, to = %pool.target().addr_string(), "server target changed by reload");
            }
            // A configured password, as a pool made now would use it: new connections log in
            // with it. None where the pool's secret comes from elsewhere (SCRAM pass-through
            // keys from a client's login, auth_query), which is kept.
            let secret = handshake::server_secret(
                &users,
                db.server_password.as_deref(),
                db.server_user.is_some(),
                &key.user,
            );
            if !matches!(secret, crate::server::ServerSecret::None) {
                pool.set_secret(secret);
            }
        }
        Reloaded {
            needs_restart,
            removed_pools: removed.iter().map(|p| p.key().to_string()).collect(),
        }
    }

    fn next_client_id(&self) -> ClientId {
        ClientId(self.next_client.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// What a reload did beyond taking the new configuration.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Settings that changed in the file but take a restart to apply.
    pub needs_restart: Vec<String>,
    /// Pools ("database/user") taken out because their database is no longer configured.
    pub removed_pools: Vec<String>,
}

/// Serves one accepted client connection to its end. Never panics on peer input; every error
/// ends this session only.
pub async fn serve(stream: Sock, addr: PeerAddr, ctx: Arc<ClientContext>) {
    let id = ctx.next_client_id();
    // Both phases in one box: kept inline, they made this future 11 KiB, copied several times
    // into the task at every accept (memcpy was a tenth of a login's instructions). One box, not
    // one each: they never run at once, so the login's state shares the session's room, and a
    // connection makes one allocation of ~2 KiB fewer (sizes glibc serves slowly).
    let result = Box::pin(async {
        let Some(login) = handshake::run(stream, &addr, &ctx).await? else {
            return Ok(());
        };
        let tls = login.client.tls_description();
        let info = ctx
            .clients
            .register(id, addr, login.pool.shared_key(), login.application_name.clone(), tls);
        // Shutdown raises the signal on registered clients; one that registered meanwhile
        // sees the token instead. The same for a reload that removed the pool's database.
        if ctx.shutdown.is_cancelled() {
            info.stop.raise(registry::SHUTDOWN);
        }
        if login.pool.is_removed() {
            info.stop.raise(registry::SHUTDOWN | registry::REMOVED);
        }
        let result = session::run(login, ctx.clone(), info).await;
        ctx.clients.unregister(id);
        result
    })
    .await;
    let reason = result.as_ref().map_or_else(ClientError::reason_index, |_| 0);
    ctx.disconnects[reason].fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(()) => tracing::debug!(client = id.0, %addr, "client session ended"),
        Err(e) if e.is_client_churn() => tracing::debug!(client = id.0, %addr, error = %e, "client session ended"),
        Err(e) => tracing::info!(client = id.0, %addr, error = %e, "client session ended with an error"),
    }
}
