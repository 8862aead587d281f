//! Wiring: bind the listener, build the shared context, accept clients, and run the shutdown
//! sequence. Tests use [`Proxy::start`] to run the whole proxy in-process on port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{self, ClientContext};
use crate::config::Config;
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
}

/// A running proxy.
pub struct Proxy {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    ctx: Arc<ClientContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    accept_task: tokio::task::JoinHandle<()>,
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
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let pools = PoolRegistry::new(shutdown.child_token(), tracker.clone());
        let mut ctx = ClientContext::new(config.clone(), pools, Arc::new(ServerIds::default()), shutdown.clone());
        ctx.config_path = path;
        if config.listen.event_loop {
            // One loop per worker thread (the runtime has `workers` of them, or one per core).
            let loops = match config.listen.workers {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            };
            ctx.hub = Some(crate::client::Hub::start(loops));
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
        let accept_task = tokio::spawn(accept_loop(listener, ctx.clone(), tracker.clone()));
        tracing::info!(%addr, "pgweir is listening");
        Ok(Proxy {
            addr,
            admin_addr,
            ctx,
            shutdown,
            tracker,
            accept_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancel();
        self.ctx.clients.stop_all(crate::client::registry::SHUTDOWN);
        self.accept_task.abort();
        let _ = self.accept_task.await;
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(?grace, "shutdown_timeout reached; closing the remaining connections");
        }
        self.ctx.pools.close_all();
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<ClientContext>, tracker: TaskTracker) {
    let limit = Arc::new(Semaphore::new(ctx.config.load().listen.max_client_conn));
    loop {
        let (stream, addr) = match listener.accept().await {
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
                tracker.spawn(refuse(stream, max));
            }
        }
    }
}

async fn serve_with_permit(
    stream: TcpStream,
    addr: SocketAddr,
    ctx: Arc<ClientContext>,
    _permit: OwnedSemaphorePermit,
) {
    ctx.connected.fetch_add(1, Ordering::Relaxed);
    client::serve(stream, addr, ctx.clone()).await;
    ctx.connected.fetch_sub(1, Ordering::Relaxed);
}

/// Tells a client over max_client_conn why it is refused. The startup packet is read first so
/// the close does not turn into a reset that could swallow the error; all of it is bounded.
async fn refuse(mut stream: TcpStream, max: usize) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut scratch = [0u8; 1024];
        for _ in 0..2 {
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).await?;
            let len = i32::from_be_bytes(len);
            if !(8..=10_000).contains(&len) {
                break;
            }
            let mut rest = len as usize - 4;
            let mut code = [0u8; 4];
            stream.read_exact(&mut code).await?;
            rest -= 4;
            while rest > 0 {
                let n = stream.read(&mut scratch[..rest.min(1024)]).await?;
                if n == 0 {
                    break;
                }
                rest -= n;
            }
            if i32::from_be_bytes(code) == crate::proto::startup::SSL_REQUEST_CODE
                || i32::from_be_bytes(code) == crate::proto::startup::GSSENC_REQUEST_CODE
            {
                stream.write_all(b"N").await?;
                continue;
            }
            break;
        }
        let mut out = BytesMut::new();
        PgError::fatal(
            "53300",
            format!("sorry, too many clients already (pgweir max_client_conn = {max})"),
        )
        .with_hint("Raise max_client_conn in the [listen] configuration, or close idle client connections.")
        .encode(&mut out);
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

/// Runs the proxy until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP re-reads the
/// configuration file (a broken file is rejected and the running configuration kept).
pub async fn run_until_signal(config: Config, path: Option<std::path::PathBuf>) -> Result<(), AppError> {
    let grace = config.listen.shutdown_timeout;
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
    tracing::info!(
        ?grace,
        "shutting down: no new connections; open transactions may finish"
    );
    proxy.shutdown(grace).await;
    Ok(())
}
