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

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp;

/// `try_read_buf` on a plain socket that, like tokio's own `poll_read`, takes a read that
/// left room in `buf` as proof the socket is drained and clears its read readiness: the next
/// read then waits for the reactor instead of making a `recv` that only returns EAGAIN (one
/// wasted syscall per read: two per proxied transaction in the event loop).
/// Sound with edge-triggered epoll: bytes arriving after the read raise a new event, tokio
/// ignores a clear whose readiness tick is stale, and it never clears a read-closed state.
pub fn try_read_drained(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let mut short = 0;
    let result = tcp.try_io(tokio::io::Interest::READABLE, || {
        let room = buf.capacity() - buf.len();
        let n = tcp.try_read_buf(buf)?;
        if n > 0 && n < room {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match result {
        Err(e) if short > 0 && e.kind() == io::ErrorKind::WouldBlock => Ok(short),
        other => other,
    }
}

/// Whether the reactor has seen `tcp` readable (or closed) since its read readiness was last
/// cleared. Unlike `poll_read_ready` it takes no lock and registers no waker, so it is the
/// cheap first look where readiness is likely (a session woken by its socket) or where a waker
/// is known to be registered already.
pub fn readable_now(tcp: &TcpStream) -> bool {
    tcp.try_io(tokio::io::Interest::READABLE, || Ok(())).is_ok()
}

/// `poll_read_ready` for a socket whose registered read waker may still be waiting: `armed`
/// says a poll came back Pending since the caller last read the socket (a read is what clears
/// read readiness, so the caller clears `armed` on every read). While armed, the earlier
/// registration still stands and the poll (a lock and a waker compare in tokio) is skipped.
///
/// A Pending counts as a registration only while the task has coop budget left: with the
/// budget spent, tokio answers Pending without looking at the socket and only wakes the task
/// once, later. Taking that for armed would leave nothing registered for the client's next
/// bytes, and the session would hang.
#[inline]
pub fn poll_read_ready_armed(tcp: &TcpStream, armed: &mut bool, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    if *armed {
        return Poll::Pending;
    }
    let ready = tcp.poll_read_ready(cx);
    *armed = ready.is_pending() && tokio::task::coop::has_budget_remaining();
    ready
}

/// Whether a client waiting for something has hung up, without consuming a byte: Ready(true)
/// when it closed its connection or the socket failed, Ready(false) when it sent bytes (they
/// stay in the socket for the next read), Pending while neither (`cx` is woken on readability).
pub fn poll_hung_up(tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<bool> {
    let mut byte = [0u8; 1];
    let mut peek = ReadBuf::new(&mut byte);
    match tcp.poll_peek(cx, &mut peek) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(true),
        Poll::Ready(Ok(_)) => Poll::Ready(false),
    }
}

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Reads with `try_read_drained` the way the event loop does: wait for readiness, read.
    async fn read_some(tcp: &TcpStream, buf: &mut BytesMut) -> usize {
        loop {
            tokio::time::timeout(Duration::from_secs(5), tcp.readable())
                .await
                .expect("readiness must come back for bytes sent after a short read")
                .unwrap();
            buf.reserve(4096);
            match try_read_drained(tcp, buf) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_short_read_clears_readiness_without_losing_later_bytes_or_eof() {
        let (mut tx, rx) = pair().await;
        let mut buf = BytesMut::with_capacity(4096);
        tx.write_all(b"first").await.unwrap();
        assert_eq!(read_some(&rx, &mut buf).await, 5);
        // The short read cleared readiness: waiting starts at once, with no recv for EAGAIN.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), rx.readable())
                .await
                .is_err(),
            "a short read should leave the socket not ready"
        );
        tx.write_all(b"second").await.unwrap();
        assert_eq!(read_some(&rx, &mut buf).await, 6);
        // Bytes and the close together: the short read clears readiness, the close stays seen.
        tx.write_all(b"last").await.unwrap();
        tx.shutdown().await.unwrap();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(read_some(&rx, &mut buf).await, 4);
        assert_eq!(read_some(&rx, &mut buf).await, 0, "EOF must still be reported");
        assert_eq!(&buf[..], b"firstsecondlast");
    }

    #[tokio::test]
    async fn a_pending_forced_by_the_coop_budget_does_not_count_as_armed() {
        let (mut tx, busy) = pair().await;
        let (_quiet_peer, quiet) = pair().await;
        tx.write_all(b"ready").await.unwrap();
        busy.readable().await.unwrap();
        std::future::poll_fn(|cx| {
            // Spend the task's budget the way a long loop round can: on polls that succeed.
            for _ in 0..10_000 {
                if !tokio::task::coop::has_budget_remaining() {
                    break;
                }
                assert!(busy.poll_read_ready(cx).is_ready());
            }
            assert!(
                !tokio::task::coop::has_budget_remaining(),
                "the test runs under a budget"
            );
            let mut armed = false;
            assert!(poll_read_ready_armed(&quiet, &mut armed, cx).is_pending());
            assert!(!armed, "a Pending that registered nothing must not count as armed");
            Poll::Ready(())
        })
        .await;
        // A new poll of the task has budget again: a Pending registers the waker and counts.
        tokio::task::yield_now().await;
        std::future::poll_fn(|cx| {
            let mut armed = false;
            // tokio may report a new socket readable once; a read that finds nothing clears it.
            let nothing = quiet.try_read(&mut [0u8; 8]).unwrap_err();
            assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
            assert!(poll_read_ready_armed(&quiet, &mut armed, cx).is_pending());
            assert!(armed);
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_full_buffer_keeps_readiness() {
        let (mut tx, rx) = pair().await;
        tx.write_all(&[7u8; 100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        rx.readable().await.unwrap();
        let mut buf = BytesMut::with_capacity(10);
        let room = buf.capacity();
        // Filling the room says nothing about what is left: the rest is read without waiting.
        assert_eq!(try_read_drained(&rx, &mut buf).unwrap(), room);
        let mut total = room;
        while total < 100 {
            buf.reserve(100);
            total += try_read_drained(&rx, &mut buf).expect("readiness kept after a full read");
        }
        assert_eq!(total, 100);
    }
}
