//! A connection that is either plain TCP or TLS over TCP, for both sides of the proxy.
//!
//! tokio-rustls behaves like a `BufWriter`: a write can return `Ok(n)` while ciphertext still
//! sits in the TLS session because the socket was full, and only a flush pushes it out. The
//! proxy's loops write and then wait to *read*, so a read on a TLS stream first pushes any such
//! leftover out (registering for writability if the socket is still full). Without that, the
//! tail of a large result could sit unsent while both peers wait for each other.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp;

/// TLS over TCP, client or server side.
pub struct TlsConn(tokio_rustls::TlsStream<TcpStream>);

impl TlsConn {
    pub fn tcp(&self) -> &TcpStream {
        self.0.get_ref().0
    }

    /// The negotiated ALPN protocol, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.0.get_ref().1.alpn_protocol()
    }

    /// "TLSv1_3/TLS13_AES_256_GCM_SHA384"-style description for the admin API and logs.
    pub fn describe(&self) -> String {
        let state = self.0.get_ref().1;
        match (state.protocol_version(), state.negotiated_cipher_suite()) {
            (Some(v), Some(s)) => format!("{v:?}/{:?}", s.suite()),
            _ => "TLS".to_owned(),
        }
    }

    fn poll_push(&mut self, cx: &mut Context<'_>) {
        if self.0.get_ref().1.wants_write() {
            // Pending registers the waker for writability; errors surface on the next write.
            let _ = Pin::new(&mut self.0).poll_flush(cx);
        }
    }
}

impl From<tokio_rustls::server::TlsStream<TcpStream>> for TlsConn {
    fn from(s: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        TlsConn(s.into())
    }
}

impl From<tokio_rustls::client::TlsStream<TcpStream>> for TlsConn {
    fn from(s: tokio_rustls::client::TlsStream<TcpStream>) -> Self {
        TlsConn(s.into())
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.poll_push(cx);
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.0).poll_write(cx, buf))?;
        // Push the records now; what the socket cannot take yet goes out on the next read or write.
        self.poll_push(cx);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A client or server connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            Stream::Tls(t) => f.debug_tuple("Tls").field(t.tcp()).finish(),
        }
    }
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.tcp(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// TLS version and cipher, or None for plain TCP.
    pub fn tls_description(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => Some(t.describe()),
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    /// Reads into `buf` without waiting. Plain TCP only: with TLS, readiness of the socket says
    /// nothing about decrypted bytes, so it reports WouldBlock and callers wait with a read.
    pub fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_read_buf(buf),
            Stream::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// True when the peer has sent something (or closed) that nobody has read yet, without
    /// consuming it. Used on idle server connections, which must be silent.
    pub fn has_pending_input(&self) -> bool {
        pending(self.peek_one())
    }

    /// [`Stream::has_pending_input`] for a socket whose reads go through the reactor: the peek
    /// runs only when the reactor has seen the socket readable since a read last came up short
    /// (a `WouldBlock` from the peek clears that again), and no waker is registered, so the
    /// common answer, "nothing arrived", costs no syscall.
    pub fn has_pending_input_if_readable(&self) -> bool {
        pending(self.tcp().try_io(tokio::io::Interest::READABLE, || self.peek_one()))
    }

    fn peek_one(&self) -> io::Result<usize> {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        socket2::SockRef::from(self.tcp()).peek(&mut probe)
    }

    /// Best-effort write that never waits; plain TCP only (a TLS record cannot be half-sent).
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_write(buf),
            Stream::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Borrowed read and write halves, usable at the same time from one task (`select!`).
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(t) => {
                let (r, w) = tokio::io::split(&mut **t);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(t) => Pin::new(&mut **t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
        }
    }
}

/// Read half of a [`Stream::split`].
pub enum ReadHalf<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsConn>),
}

/// Write half of a [`Stream::split`].
pub enum WriteHalf<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsConn>),
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A peek's verdict: bytes or EOF or an error all mean the peer did not stay silent.
fn pending(peek: io::Result<usize>) -> bool {
    !matches!(peek, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}
