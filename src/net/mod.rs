//! Sockets: listener set-up and per-socket options shared by client and server connections.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpStream, UnixStream};

/// TCP_NODELAY (the protocol is request/response; Nagle would add up to 40 ms per round trip)
/// and keepalive (so a peer that vanished without a FIN is noticed). Failures are ignored: the
/// connection still works, only less well.
pub fn configure_socket(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive_params(idle));
    }
}

/// Sets [`configure_socket`]'s options on a listening socket, where Linux has every accepted
/// connection inherit them (its keepalive timer armed too): five `setsockopt` fewer per client.
/// Returns whether connections accepted from it need nothing more for `keepalive`.
pub fn configure_listener(listener: &tokio::net::TcpListener, keepalive: Option<Duration>) -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    let sock = SockRef::from(listener);
    let nodelay = sock.set_tcp_nodelay(true);
    let keepalive = match keepalive {
        Some(idle) => sock.set_tcp_keepalive(&keepalive_params(idle)),
        None => Ok(()),
    };
    nodelay.is_ok() && keepalive.is_ok()
}

fn keepalive_params(idle: Duration) -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10))
        .with_retries(3)
}

/// Whether a configured host names a Unix-socket directory, as libpq reads `host`: a path
/// holding PostgreSQL's socket file `.s.PGSQL.<port>`.
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// The socket file PostgreSQL (and pgweir's own listener) uses in `dir` for `port`.
pub fn socket_path(dir: impl AsRef<Path>, port: u16) -> PathBuf {
    dir.as_ref().join(format!(".s.PGSQL.{port}"))
}

/// `host:port`, or the socket file's path, for messages.
pub fn describe_endpoint(host: &str, port: u16) -> String {
    match is_socket_dir(host) {
        true => socket_path(host, port).display().to_string(),
        false => format!("{host}:{port}"),
    }
}

/// Connects to `host:port` over TCP (TCP_NODELAY and `keepalive` set), or to the Unix socket
/// of `port` when `host` is a directory.
pub async fn connect(host: &str, port: u16, keepalive: Option<Duration>) -> io::Result<Sock> {
    if is_socket_dir(host) {
        return UnixStream::connect(socket_path(host, port)).await.map(Sock::Unix);
    }
    let tcp = TcpStream::connect((host, port)).await?;
    configure_socket(&tcp, keepalive);
    Ok(Sock::Tcp(tcp))
}

/// Where a client connected from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAddr {
    Ip(SocketAddr),
    /// pgweir's Unix-domain socket: a process on this host, named by the kernel
    /// (SO_PEERCRED) when it could say.
    Local(Option<UnixPeer>),
}

/// The process at the other end of a Unix-socket connection, as the kernel saw it connect:
/// on a shared host this answers "which application holds these connections".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    pub pid: Option<i32>,
    pub uid: u32,
}

impl PeerAddr {
    /// The peer of an accepted Unix-socket connection.
    pub fn of_unix(stream: &UnixStream) -> PeerAddr {
        PeerAddr::Local(stream.peer_cred().ok().map(|c| UnixPeer {
            pid: c.pid(),
            uid: c.uid(),
        }))
    }

    /// The client's IP address; None for a Unix-socket client.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            PeerAddr::Ip(a) => Some(a.ip()),
            PeerAddr::Local(_) => None,
        }
    }
}

/// `ip:port`, or `unix(pid)` as PgBouncer writes a Unix-socket client.
impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Ip(a) => a.fmt(f),
            PeerAddr::Local(Some(UnixPeer { pid: Some(pid), .. })) => write!(f, "unix({pid})"),
            PeerAddr::Local(_) => f.write_str("unix"),
        }
    }
}

/// Where a server connection's CancelRequests must go: the address it was connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    /// The socket file itself, behind an `Arc`: handing it to the client's cancel slot at every
    /// link is a reference count, not a path copy.
    Unix(Arc<Path>),
}

impl ServerAddr {
    pub async fn connect(&self) -> io::Result<Sock> {
        match self {
            ServerAddr::Tcp(a) => TcpStream::connect(a).await.map(Sock::Tcp),
            ServerAddr::Unix(p) => UnixStream::connect(p).await.map(Sock::Unix),
        }
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Tcp(a) => a.fmt(f),
            ServerAddr::Unix(p) => p.display().fmt(f),
        }
    }
}

pub mod buffers;
pub mod reactor;
pub mod stream;
pub mod tls;

pub use stream::{Sock, Stream};
