//! Wiring: bind the listener, build the shared context, accept clients, and run the shutdown
//! sequence. Tests use [`Proxy::start`] to run the whole proxy in-process on port 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{self, ClientContext};
use crate::config::Config;
use crate::net::{PeerAddr, Sock};
use crate::pool::PoolRegistry;
use crate::proto::messages::PgError;
use crate::server::ServerIds;

#[derive(Debug, Error)]
pub enum AppError {
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not listen on the Unix socket {}: {source}", path.display())]
    BindUnix {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another process is listening on the Unix socket {}; stop it, or give this pgweir another \
         listen.unix_socket_dir or port",
        path.display()
    )]
    SocketInUse { path: PathBuf },
    #[error(
        "cannot give the Unix socket {} to group {gid} (listen.unix_socket_group): {source}; pgweir \
         must run as root or as a member of that group",
        path.display()
    )]
    UnixSocketGroup {
        path: PathBuf,
        gid: u32,
        source: std::io::Error,
    },
}

/// A listener for clients: the TCP address, or the Unix socket.
enum Listener {
    /// `inherited`: the keepalive every connection accepted from it already has (with
    /// TCP_NODELAY), when the OS passes the listener's options on.
    Tcp {
        listener: TcpListener,
        inherited: Option<Option<Duration>>,
    },
    Unix(UnixListener),
}

impl Listener {
    fn tcp(listener: TcpListener, keepalive: Option<Duration>) -> Listener {
        let inherited = crate::net::configure_listener(&listener, keepalive).then_some(keepalive);
        Listener::Tcp { listener, inherited }
    }

    /// Accepts a client; a TCP one gets TCP_NODELAY and the configured keepalive.
    async fn accept(&self, ctx: &ClientContext) -> std::io::Result<(Sock, PeerAddr)> {
        match self {
            Listener::Tcp { listener, inherited } => {
                // `poll_accept` waits in the socket's one read-waker slot (this task is its
                // only acceptor), not `accept()`'s waiter list, linked and unlinked under the
                // socket's lock each time the loop waits.
                let (s, a) = std::future::poll_fn(|cx| listener.poll_accept(cx)).await?;
                // Set per connection only when the listener's do not fit: a reload changed
                // listen.tcp_keepalive, or the OS does not pass them on.
                let keepalive = ctx.config.load().listen.tcp_keepalive;
                if *inherited != Some(keepalive) {
                    crate::net::configure_socket(&s, keepalive);
                }
                Ok((Sock::Tcp(s), PeerAddr::Ip(a)))
            }
            Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                let peer = PeerAddr::of_unix(&s);
                (Sock::Unix(s), peer)
            }),
        }
    }
}

/// Binds `path` for clients with permission bits `mode`. A socket file left by a pgweir that
/// did not shut down cleanly (a connect is refused: nobody listens) is replaced; one a process
/// still accepts on, or one that cannot be probed (say, another user's), is left alone.
async fn bind_unix(path: &Path, mode: u32, group: Option<u32>) -> Result<(UnixListener, SocketFile), AppError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let failed = |source| AppError::BindUnix {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(failed(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        // Bounded: a live listener with a full backlog leaves a connect waiting.
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::UnixStream::connect(path)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(failed)?;
            }
            // Linux answers a non-blocking connect to a live listener whose backlog is full
            // with EAGAIN rather than letting it wait.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(AppError::SocketInUse { path: path.to_owned() });
            }
            Ok(Err(e)) => return Err(failed(e)),
            Ok(Ok(_)) | Err(_) => return Err(AppError::SocketInUse { path: path.to_owned() }),
        }
    }
    // Bound, but not listening until the owner and mode below apply: a listening socket
    // would accept connections from anyone the umask let in meanwhile.
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).map_err(failed)?;
    sock.bind(&socket2::SockAddr::unix(path).map_err(failed)?)
        .map_err(failed)?;
    // Held from here on, so a failure below (or later in start-up) removes the file again.
    let file = SocketFile::of(path).map_err(failed)?;
    if let Some(gid) = group {
        // Before the mode: a chown may clear mode bits on some systems.
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| AppError::UnixSocketGroup {
            path: path.to_owned(),
            gid,
            source: e,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    // tokio's own backlog for its listeners.
    sock.listen(1024).map_err(failed)?;
    sock.set_nonblocking(true).map_err(failed)?;
    let listener = UnixListener::from_std(sock.into()).map_err(failed)?;
    Ok((listener, file))
}

/// The socket file pgweir bound, known by its inode: at shutdown it removes only that file,
/// not one another pgweir put at the same path meanwhile (a successor in a rolling restart).
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    fn of(path: &Path) -> std::io::Result<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
        })
    }
}

/// Removes the file, but only while it is still the one pgweir bound. Dropped at shutdown, or
/// when start-up fails after the bind.
impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A running proxy.
pub struct Proxy {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    /// The Unix socket file, when listening on one; removed at shutdown.
    unix_socket: Option<SocketFile>,
    ctx: Arc<ClientContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Binds the client listener and starts accepting. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Proxy, AppError> {
        Self::start_with_path(config, None).await
    }

    /// Like [`Proxy::start`], remembering the file `config` came from so SIGHUP and
    /// POST /api/reload can re-read it.
    pub async fn start_with_path(config: Config, path: Option<std::path::PathBuf>) -> Result<Proxy, AppError> {
        let config = Arc::new(config);
        let listener = TcpListener::bind(config.listen.addr)
            .await
            .map_err(|source| AppError::Bind {
                addr: config.listen.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| AppError::Bind {
            addr: config.listen.addr,
            source,
        })?;
        // Named after the port actually bound, so `listen.addr = "…:0"` works too.
        let unix_path = config
            .listen
            .unix_socket_dir
            .as_ref()
            .map(|dir| crate::net::socket_path(dir, addr.port()));
        let (unix_listener, unix_socket) = match &unix_path {
            Some(path) => {
                let (listener, file) =
                    bind_unix(path, config.listen.unix_socket_mode, config.listen.unix_socket_group).await?;
                (Some(listener), Some(file))
            }
            None => (None, None),
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let pools = PoolRegistry::new(shutdown.child_token(), tracker.clone());
        let mut ctx = ClientContext::new(config.clone(), pools, Arc::new(ServerIds::default()), shutdown.clone());
        ctx.config_path = path;
        if config.listen.event_loop {
            // One loop per worker thread.
            ctx.hub = Some(crate::client::Hub::start(config.listen.worker_threads()));
        }
        let ctx = Arc::new(ctx);
        let admin_addr = match config.admin.addr {
            Some(admin) => {
                let admin_listener = TcpListener::bind(admin)
                    .await
                    .map_err(|source| AppError::Bind { addr: admin, source })?;
                let local = admin_listener
                    .local_addr()
                    .map_err(|source| AppError::Bind { addr: admin, source })?;
                let router = crate::admin::router(ctx.clone(), local);
                let stop = shutdown.clone();
                tracker.spawn(async move {
                    let serve = axum::serve(admin_listener, router)
                        .with_graceful_shutdown(async move { stop.cancelled().await });
                    if let Err(e) = serve.await {
                        tracing::warn!(error = %e, "admin listener failed");
                    }
                });
                tracing::info!(addr = %local, "admin API is listening");
                Some(local)
            }
            None => None,
        };
        // One limit for both listeners: max_client_conn counts clients, however they came.
        let limit = Arc::new(Semaphore::new(config.listen.max_client_conn));
        let mut accept_tasks = vec![tokio::spawn(accept_loop(
            Listener::tcp(listener, config.listen.tcp_keepalive),
            ctx.clone(),
            tracker.clone(),
            limit.clone(),
        ))];
        tracing::info!(%addr, "pgweir is listening");
        if let (Some(unix), Some(path)) = (unix_listener, &unix_path) {
            accept_tasks.push(tokio::spawn(accept_loop(
                Listener::Unix(unix),
                ctx.clone(),
                tracker.clone(),
                limit,
            )));
            tracing::info!(path = %path.display(), "pgweir is listening on a Unix socket");
        }
        Ok(Proxy {
            addr,
            admin_addr,
            unix_socket,
            ctx,
            shutdown,
            tracker,
            accept_tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Unix socket clients may connect to, if `listen.unix_socket_dir` is set.
    pub fn unix_socket_path(&self) -> Option<&Path> {
        self.unix_socket.as_ref().map(|f| f.path.as_path())
    }

    /// Where the admin API listens, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn context(&self) -> &Arc<ClientContext> {
        &self.ctx
    }

    /// Graceful shutdown: stop accepting, tell idle clients, let transactions finish for up to
    /// `grace`, then close everything that is left.
    pub async fn shutdown(mut self, grace: Duration) {
        self.shutdown.cancel();
        self.ctx.clients.stop_all(crate::client::registry::SHUTDOWN);
        // Gone before the grace period, as the TCP listener is: new clients fail at once.
        // Removed while the listener still stands, so a successor starting meanwhile never
        // finds it refusing connections and takes it for stale.
        drop(self.unix_socket.take());
        for task in &self.accept_tasks {
            task.abort();
        }
        for task in self.accept_tasks {
            let _ = task.await;
        }
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(?grace, "shutdown_timeout reached; closing the remaining connections");
        }
        self.ctx.pools.close_all();
    }
}

async fn accept_loop(listener: Listener, ctx: Arc<ClientContext>, tracker: TaskTracker, limit: Arc<Semaphore>) {
    loop {
        let (stream, addr) = match listener.accept(&ctx).await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; connections already served
                // are unaffected.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let ctx = ctx.clone();
                tracker.spawn(serve_with_permit(stream, addr, ctx, permit));
            }
            Err(_) => {
                let max = ctx.config.load().listen.max_client_conn;
                let ctx = ctx.clone();
                tracker.spawn(async move { client::refuse(stream, &ctx, too_many_clients(max), REFUSE_WITHIN).await });
            }
        }
    }
}

async fn serve_with_permit(stream: Sock, addr: PeerAddr, ctx: Arc<ClientContext>, _permit: OwnedSemaphorePermit) {
    ctx.connected.fetch_add(1, Ordering::Relaxed);
    client::serve(stream, addr, ctx.clone()).await;
    ctx.connected.fetch_sub(1, Ordering::Relaxed);
}

/// How long a connection over max_client_conn may take to be told so (its TLS handshake
/// included): refusals hold a socket each, and a flood of them must not pile up.
const REFUSE_WITHIN: Duration = Duration::from_secs(5);

fn too_many_clients(max: usize) -> PgError {
    PgError::fatal(
        "53300",
        format!("sorry, too many clients already (pgweir max_client_conn = {max})"),
    )
    .with_hint("Raise max_client_conn in the [listen] configuration, or close idle client connections.")
}

/// Runs the proxy until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP re-reads the
/// configuration file (a broken file is rejected and the running configuration kept).
pub async fn run_until_signal(config: Config, path: Option<std::path::PathBuf>) -> Result<(), AppError> {
    crate::fdlimit::raise_and_check(&config);
    let proxy = Proxy::start_with_path(config, path).await?;
    let ctx = proxy.context().clone();
    let reloader = tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            if let Err(e) = ctx.reload_from_file() {
                tracing::error!(error = %e, "configuration reload rejected; the running configuration is kept");
            }
        }
    });
    crate::shutdown::wait_for_signal().await;
    reloader.abort();
    // As the last reload left it, not as at start.
    let grace = proxy.context().config.load().listen.shutdown_timeout;
    tracing::info!(
        ?grace,
        "shutting down: no new connections; open transactions may finish"
    );
    proxy.shutdown(grace).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use socket2::SockRef;

    use super::*;

    fn config(keepalive_secs: u64) -> Config {
        Config::from_toml(
            &format!(
                "[listen]\naddr = \"127.0.0.1:0\"\nauth_type = \"trust\"\ntcp_keepalive = \"{keepalive_secs}s\"\n[databases.a]\n"
            ),
            None,
        )
        .expect("config")
    }

    fn context(keepalive_secs: u64) -> ClientContext {
        let config = config(keepalive_secs);
        let shutdown = CancellationToken::new();
        let pools = PoolRegistry::new(shutdown.child_token(), TaskTracker::new());
        ClientContext::new(Arc::new(config), pools, Arc::new(ServerIds::default()), shutdown)
    }

    async fn accept_one(listener: &Listener, ctx: &ClientContext, addr: SocketAddr) -> tokio::net::TcpStream {
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        match listener.accept(ctx).await.expect("accept") {
            (Sock::Tcp(s), _) => s,
            (Sock::Unix(_) | Sock::Own(_), _) => unreachable!("a tokio TCP socket from the listener"),
        }
    }

    #[tokio::test]
    async fn accepted_clients_have_nodelay_and_the_configured_keepalive_also_after_a_reload() {
        let ctx = context(61);
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let listener = Listener::tcp(tcp, ctx.config.load().listen.tcp_keepalive);
        let s = accept_one(&listener, &ctx, addr).await;
        let sock = SockRef::from(&s);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(sock.tcp_keepalive_time().expect("idle"), Duration::from_secs(61));
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("count"), 3);

        // A reload changes listen.tcp_keepalive: the listener's no longer fit, the socket is set.
        ctx.config.store(Arc::new(config(7)));
        let s = accept_one(&listener, &ctx, addr).await;
        let sock = SockRef::from(&s);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert_eq!(sock.tcp_keepalive_time().expect("idle"), Duration::from_secs(7));
    }
}
