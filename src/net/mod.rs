//! Sockets: listener set-up and per-socket options shared by client and server connections.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// TCP_NODELAY (the protocol is request/response; Nagle would add up to 40 ms per round trip)
/// and keepalive (so a peer that vanished without a FIN is noticed). Failures are ignored: the
/// connection still works, only less well.
pub fn configure_socket(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let ka = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = SockRef::from(stream).set_tcp_keepalive(&ka);
    }
}

pub mod buffers;
pub mod stream;
pub mod tls;

pub use stream::Stream;
