//! A connection that is plain TCP, a Unix-domain socket, or TLS over TCP, for both sides of
//! the proxy.
//!
//! tokio-rustls behaves like a `BufWriter`: a write can return `Ok(n)` while ciphertext still
//! sits in the TLS session because the socket was full, and only a flush pushes it out. The
//! proxy's loops write and then wait to *read*, so a read on a TLS stream first pushes any such
//! leftover out (registering for writability if the socket is still full). Without that, the
//! tail of a large result could sit unsent while both peers wait for each other.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream, tcp, unix};

use super::PeerAddr;
use super::reactor::{OwnSock, Reactor};

/// Runs `$body` with `$s` bound to the concrete socket, once per type.
macro_rules! each_sock {
    ($sock:expr, $s:ident => $body:expr) => {
        match $sock {
            Sock::Tcp($s) => $body,
            Sock::Unix($s) => $body,
            Sock::Own($s) => $body,
        }
    };
}

/// A socket to a client or a server: TCP, or a Unix-domain socket on the same host (cheaper
/// per message in the kernel). Every method forwards to tokio's type of the same name.
#[derive(Debug)]
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TCP registered with an event loop's own reactor ([`Sock::adopt`]).
    Own(OwnSock),
}

impl Sock {
    #[inline]
    pub fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        each_sock!(self, s => s.try_io(interest, f))
    }

    #[inline]
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        each_sock!(self, s => s.try_read_buf(buf))
    }

    #[inline]
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        each_sock!(self, s => s.try_write(buf))
    }

    #[inline]
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_sock!(self, s => s.poll_read_ready(cx))
    }

    #[inline]
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_sock!(self, s => s.poll_write_ready(cx))
    }

    /// Waits until a byte or EOF is waiting, without consuming it: Ok(0) at EOF, Ok(1) when
    /// bytes are waiting.
    fn poll_peek(&self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.poll_read_ready(cx))?;
            match self.try_io(Interest::READABLE, || self.peek_now()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// A non-blocking MSG_PEEK of one byte: WouldBlock when nothing is waiting, Ok(0) at EOF.
    pub fn peek_now(&self) -> io::Result<usize> {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        each_sock!(self, s => socket2::SockRef::from(s).peek(&mut probe))
    }

    pub fn peer_addr(&self) -> io::Result<PeerAddr> {
        match self {
            Sock::Tcp(s) => s.peer_addr().map(PeerAddr::Ip),
            Sock::Unix(s) => Ok(PeerAddr::of_unix(s)),
            Sock::Own(s) => s.peer_addr().map(PeerAddr::Ip),
        }
    }

    /// Moves a TCP socket to `reactor` (an event loop's), where it stays until another loop
    /// adopts it; Unix-domain sockets, and on failure this one, are left as they are. From
    /// tokio the descriptor is duplicated and tokio's dropped (which deregisters it there): four
    /// syscalls, once per connection; from another loop's reactor, two. Only for a socket no
    /// task waits on.
    #[inline]
    pub fn adopt(&mut self, reactor: &Arc<Reactor>) {
        // Mostly already there: a server the loop lent before, a session entering again.
        if self.own_on(reactor).is_none() {
            self.move_to(reactor);
        }
    }

    #[inline(never)]
    fn move_to(&mut self, reactor: &Arc<Reactor>) {
        let tcp = match self {
            Sock::Tcp(tcp) => tcp,
            Sock::Own(own) => {
                let _ = own.move_to(reactor);
                return;
            }
            Sock::Unix(_) => return,
        };
        let Ok(dup) = socket2::SockRef::from(&*tcp).try_clone() else {
            return;
        };
        if let Ok(own) = OwnSock::register(dup.into(), reactor) {
            *self = Sock::Own(own);
        }
    }

    /// Moves a socket on an event loop's reactor back to tokio's: a server that a task links
    /// after a loop last lent it. Waiting on it where it was would route every wake-up through
    /// the loop's thread (its `epoll_wait` returns, it wakes the task with an eventfd write),
    /// and a sleeping loop thread makes that a second context switch per reply: ~10 µs per
    /// `pgbench -C` connection (docs/performance.md round 27). Four syscalls (the duplicate, its
    /// registration with tokio, the deregistration and close of the old descriptor); on failure
    /// the socket stays where it was. Only for a socket no task waits on.
    #[inline]
    pub fn to_runtime(&mut self) {
        if matches!(self, Sock::Own(_)) {
            self.leave_loop();
        }
    }

    #[inline(never)]
    fn leave_loop(&mut self) {
        let Sock::Own(own) = self else {
            return;
        };
        let Ok(dup) = socket2::SockRef::from(&*own).try_clone() else {
            return;
        };
        if let Ok(tcp) = TcpStream::from_std(dup.into()) {
            *self = Sock::Tcp(tcp);
        }
    }

    /// The socket on `reactor`, if it is one.
    #[inline]
    pub fn own_on(&self, reactor: &Arc<Reactor>) -> Option<&OwnSock> {
        match self {
            Sock::Own(s) if s.is_on(reactor) => Some(s),
            _ => None,
        }
    }
}

impl AsyncRead for Sock {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Sock::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Sock::Own(s) => s.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Sock {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Sock::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Sock::Own(s) => s.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_flush(cx),
            Sock::Unix(s) => Pin::new(s).poll_flush(cx),
            Sock::Own(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sock::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Own(s) => Poll::Ready(s.shutdown_write()),
        }
    }
}

/// `try_read_buf` on a plain socket that, like tokio's own `poll_read`, takes a read that
/// left room in `buf` as proof the socket is drained and clears its read readiness: the next
/// read then waits for the reactor instead of making a `recv` that only returns EAGAIN (one
/// wasted syscall per read: two per proxied transaction in the event loop).
/// Sound with edge-triggered epoll: bytes arriving after the read raise a new event, tokio
/// ignores a clear whose readiness tick is stale, and it never clears a read-closed state.
pub fn try_read_drained(sock: &Sock, buf: &mut BytesMut) -> io::Result<usize> {
    // One body per tokio socket type, so each closure is known to its `try_io` and inlined
    // there.
    macro_rules! drained {
        ($s:expr) => {{
            let mut short = 0;
            let result = $s.try_io(Interest::READABLE, || {
                let room = buf.capacity() - buf.len();
                let n = $s.try_read_buf(buf)?;
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
        }};
    }
    match sock {
        // The event loop's sockets (the hottest read of all) clear readiness themselves.
        Sock::Own(own) => own.try_read_drained(buf),
        Sock::Tcp(tcp) => drained!(tcp),
        Sock::Unix(unix) => drained!(unix),
    }
}

/// Whether the reactor has seen `sock` readable (or closed) since its read readiness was last
/// cleared. Unlike `poll_read_ready` it takes no lock and registers no waker, so it is the
/// cheap first look where readiness is likely (a session woken by its socket) or where a waker
/// is known to be registered already.
#[inline]
pub fn readable_now(sock: &Sock) -> bool {
    each_sock!(sock, tcp => tcp.try_io(Interest::READABLE, || Ok(())).is_ok())
}

/// `poll_read_ready` for a socket whose registered read waker may still be waiting: `armed`
/// says a poll came back Pending and that registration has not been used up. The caller
/// clears it on every read (a read is what clears read readiness) and whenever the registered
/// waker fires (the hub's client waker: a wake-up takes the registration, even a late one that
/// arrives after another thread already read the bytes). While armed, the earlier
/// registration still stands and the poll (a lock and a waker compare in tokio) is skipped.
///
/// A Pending counts as a registration only while the task has coop budget left: with the
/// budget spent, tokio answers Pending without looking at the socket and only wakes the task
/// once, later. Taking that for armed would leave nothing registered for the client's next
/// bytes, and the session would hang.
#[inline]
pub fn poll_read_ready_armed(tcp: &Sock, armed: &mut bool, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    if *armed {
        return Poll::Pending;
    }
    let ready = tcp.poll_read_ready(cx);
    *armed = ready.is_pending() && tokio::task::coop::has_budget_remaining();
    ready
}

/// One read into `buf` for a task that waits on several things at once: over a plain socket
/// it reads only when the reactor has seen the socket readable, and otherwise registers `cx`
/// for readability unless `armed` says an earlier registration still stands (see
/// [`poll_read_ready_armed`]; every read here clears it, and so must the caller whenever a
/// wake-up took that registration: [`ReadArm`] does). tokio's `AsyncRead` would check
/// readiness, lock the socket's waiter list and register the waker on every poll, ready or
/// not, and route the bytes through a `ReadBuf`. TLS goes through tokio-rustls as before.
/// Ok(0) is EOF. Uses no coop budget on a plain socket: the caller accounts for its progress.
#[inline]
fn poll_read_into(
    stream: &mut Stream,
    buf: &mut BytesMut,
    armed: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let sock = match stream {
        Stream::Plain(sock) => sock,
        Stream::Tls(_) => return std::pin::pin!(tokio::io::AsyncReadExt::read_buf(stream, buf)).poll(cx),
    };
    loop {
        if readable_now(sock) {
            *armed = false;
            match try_read_drained(sock, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
        std::task::ready!(poll_read_ready_armed(sock, armed, cx))?;
    }
}

/// A read registration that a task waiting on several things keeps across its polls
/// ([`poll_read_ready_armed`]), made with a waker of its own: a wake-up through it says the
/// registration is used up, which the task's own waker cannot say. An event's wake-up comes
/// after the readiness it reports, so it can arrive late, after the task has read those bytes
/// and registered again, and take that new registration: counted as still standing, it would
/// leave nothing registered for the next bytes and the task would wait for ever (the event
/// loop tells its wake-ups apart the same way, by token).
pub struct ReadArm {
    armed: bool,
    wake: Arc<ArmWake>,
    waker: Waker,
}

struct ArmWake {
    task: Waker,
    fired: AtomicBool,
}

impl std::task::Wake for ArmWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Before the task's wake-up, so the poll that follows sees it.
        self.fired.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl ReadArm {
    /// A registration that wakes `task`; none is made until the first poll.
    pub fn new(task: &Waker) -> ReadArm {
        let wake = Arc::new(ArmWake {
            task: task.clone(),
            fired: AtomicBool::new(false),
        });
        ReadArm {
            armed: false,
            waker: Waker::from(wake.clone()),
            wake,
        }
    }

    /// Whether this wakes `task` (a registration made for another waker wakes someone else).
    #[inline]
    pub fn wakes(&self, task: &Waker) -> bool {
        self.wake.task.will_wake(task)
    }

    /// Forgets any registration: someone else may have registered on the socket since.
    #[inline]
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// [`poll_read_into`] through this registration.
    #[inline]
    pub fn poll_read_into(&mut self, stream: &mut Stream, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        if self.wake.fired.load(Ordering::Relaxed) && self.wake.fired.swap(false, Ordering::Acquire) {
            self.armed = false;
        }
        poll_read_into(stream, buf, &mut self.armed, &mut Context::from_waker(&self.waker))
    }
}

/// Whether a client waiting for something has hung up, without consuming a byte: Ready(true)
/// when it closed its connection or the socket failed, Ready(false) when it sent bytes (they
/// stay in the socket for the next read), Pending while neither (`cx` is woken on readability).
pub fn poll_hung_up(tcp: &Sock, cx: &mut Context<'_>) -> Poll<bool> {
    match tcp.poll_peek(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(true),
        Poll::Ready(Ok(_)) => Poll::Ready(false),
    }
}

/// TLS over TCP, client or server side.
pub struct TlsConn(tokio_rustls::TlsStream<Sock>);

impl TlsConn {
    pub fn sock(&self) -> &Sock {
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

impl From<tokio_rustls::server::TlsStream<Sock>> for TlsConn {
    fn from(s: tokio_rustls::server::TlsStream<Sock>) -> Self {
        TlsConn(s.into())
    }
}

impl From<tokio_rustls::client::TlsStream<Sock>> for TlsConn {
    fn from(s: tokio_rustls::client::TlsStream<Sock>) -> Self {
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
    Plain(Sock),
    Tls(Box<TlsConn>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            Stream::Tls(t) => f.debug_tuple("Tls").field(t.sock()).finish(),
        }
    }
}

impl Stream {
    pub fn sock(&self) -> &Sock {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.sock(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// [`Sock::adopt`] for a plain stream, when there is a reactor to adopt it.
    #[inline]
    pub fn adopt(&mut self, reactor: Option<&Arc<Reactor>>) {
        if let (Some(reactor), Stream::Plain(sock)) = (reactor, self) {
            sock.adopt(reactor);
        }
    }

    /// [`Sock::to_runtime`] for a plain stream.
    #[inline]
    pub fn to_runtime(&mut self) {
        if let Stream::Plain(sock) = self {
            sock.to_runtime();
        }
    }

    /// True when the next bytes can only come from the socket, so its readiness is a sound
    /// signal to wait for without a read buffer: always for a plain stream; over TLS when rustls
    /// holds no decrypted bytes nor records to send (tokio-rustls decrypts every complete record
    /// it reads, so what it may still hold is part of one, which more socket bytes complete).
    pub fn waits_on_socket(&self) -> bool {
        match self {
            Stream::Plain(_) => true,
            Stream::Tls(t) => {
                let state = t.0.get_ref().1;
                state.wants_read() && !state.wants_write()
            }
        }
    }

    /// One read that never waits: WouldBlock when nothing (or only part of a TLS record) is
    /// there yet. The noop waker it may leave registered is harmless: whoever waits next
    /// registers its own.
    pub fn try_read_once(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let read = std::pin::pin!(tokio::io::AsyncReadExt::read_buf(self, buf));
        match read.poll(&mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// TLS version and cipher, or None for plain TCP.
    pub fn tls_description(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => Some(t.describe()),
        }
    }

    pub fn peer_addr(&self) -> io::Result<PeerAddr> {
        self.sock().peer_addr()
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
    #[inline]
    pub fn has_pending_input_if_readable(&self) -> bool {
        let sock = self.sock();
        pending(sock.try_io(Interest::READABLE, || sock.peek_now()))
    }

    fn peek_one(&self) -> io::Result<usize> {
        self.sock().peek_now()
    }

    /// Best-effort write that never waits; plain sockets only (a TLS record cannot be half-sent).
    #[inline]
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_write(buf),
            Stream::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Borrowed read and write halves, usable at the same time from one task (`select!`).
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Stream::Plain(Sock::Tcp(s)) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Plain(Sock::Unix(s)) => {
                let (r, w) = s.split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            Stream::Plain(Sock::Own(s)) => (ReadHalf::Own(s), WriteHalf::Own(s)),
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
    Unix(unix::ReadHalf<'a>),
    Own(&'a OwnSock),
    Tls(tokio::io::ReadHalf<&'a mut TlsConn>),
}

/// Write half of a [`Stream::split`].
pub enum WriteHalf<'a> {
    Plain(tcp::WriteHalf<'a>),
    Unix(unix::WriteHalf<'a>),
    Own(&'a OwnSock),
    Tls(tokio::io::WriteHalf<&'a mut TlsConn>),
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Unix(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Own(s) => s.poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Unix(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Own(s) => s.poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Unix(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Own(_) => Poll::Ready(Ok(())),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Unix(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Own(s) => Poll::Ready(s.shutdown_write()),
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

    /// Waits until the reactor has seen `sock` readable, as the session's idle wait does.
    async fn readable(sock: &Sock) -> io::Result<()> {
        std::future::poll_fn(|cx| sock.poll_read_ready(cx)).await
    }

    async fn pair() -> (TcpStream, Sock) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), Sock::Tcp(b.unwrap().0))
    }

    fn unix_pair() -> (UnixStream, Sock) {
        let (a, b) = UnixStream::pair().unwrap();
        (a, Sock::Unix(b))
    }

    #[tokio::test]
    async fn a_read_registration_a_late_wake_up_took_is_made_again() {
        use crate::net::reactor::tests::Count;
        let (mut peer, sock) = pair().await;
        let mut stream = Stream::Plain(sock);
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut arm = ReadArm::new(&task);
        let mut buf = BytesMut::with_capacity(64);
        assert!(arm.poll_read_into(&mut stream, &mut buf).is_pending());
        // What a late wake-up does: the socket's registration is gone (here: replaced by
        // another waker's), and the registration's waker fires.
        let other = Waker::from(Arc::new(Count(std::sync::atomic::AtomicUsize::new(0))));
        let Stream::Plain(sock) = &stream else { unreachable!() };
        assert!(sock.poll_read_ready(&mut Context::from_waker(&other)).is_pending());
        arm.waker.wake_by_ref();
        assert!(arm.poll_read_into(&mut stream, &mut buf).is_pending());
        let before = count.0.load(Ordering::SeqCst);
        peer.write_all(b"next").await.unwrap();
        // The runtime's driver delivers the event while this task sleeps.
        for _ in 0..100 {
            if count.0.load(Ordering::SeqCst) > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            count.0.load(Ordering::SeqCst) > before,
            "the next bytes must wake the task"
        );
        assert!(matches!(arm.poll_read_into(&mut stream, &mut buf), Poll::Ready(Ok(4))));
    }

    /// Reads with `try_read_drained` the way the event loop does: wait for readiness, read.
    async fn read_some(tcp: &Sock, buf: &mut BytesMut) -> usize {
        loop {
            tokio::time::timeout(Duration::from_secs(5), readable(tcp))
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
        let (tx, rx) = pair().await;
        short_reads(tx, rx).await;
        let (tx, rx) = unix_pair();
        short_reads(tx, rx).await;
    }

    #[tokio::test]
    async fn a_hang_up_is_told_from_bytes_on_both_kinds_of_socket() {
        let (mut tx, rx) = pair().await;
        let (mut utx, urx) = unix_pair();
        for rx in [&rx, &urx] {
            let waiting = std::future::poll_fn(|cx| Poll::Ready(poll_hung_up(rx, cx).is_pending())).await;
            assert!(waiting, "a silent peer has neither sent nor hung up");
        }
        tx.write_all(b"Q").await.unwrap();
        utx.write_all(b"Q").await.unwrap();
        for rx in [&rx, &urx] {
            assert!(
                !std::future::poll_fn(|cx| poll_hung_up(rx, cx)).await,
                "bytes are not a hang-up"
            );
            assert_eq!(rx.peek_now().unwrap(), 1, "the byte stays for the next read");
        }
        drop((tx, utx));
        let (_tx2, rx2) = pair().await;
        let (utx2, urx2) = unix_pair();
        drop(utx2);
        assert!(std::future::poll_fn(|cx| poll_hung_up(&urx2, cx)).await);
        assert_eq!(rx2.peer_addr().unwrap().ip(), Some("127.0.0.1".parse().unwrap()));
        let PeerAddr::Local(Some(peer)) = urx2.peer_addr().unwrap() else {
            panic!("the kernel names a Unix-socket peer");
        };
        assert_eq!(peer.pid, Some(std::process::id() as i32));
    }

    async fn short_reads(mut tx: impl tokio::io::AsyncWrite + Unpin, rx: Sock) {
        let mut buf = BytesMut::with_capacity(4096);
        tx.write_all(b"first").await.unwrap();
        assert_eq!(read_some(&rx, &mut buf).await, 5);
        // The short read cleared readiness: waiting starts at once, with no recv for EAGAIN.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), readable(&rx))
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
        readable(&busy).await.unwrap();
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
            let nothing = quiet.try_read_buf(&mut BytesMut::with_capacity(8)).unwrap_err();
            assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
            assert!(poll_read_ready_armed(&quiet, &mut armed, cx).is_pending());
            assert!(armed);
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_socket_moved_back_from_a_loop_keeps_its_bytes_and_works_through_tokio() {
        let (mut peer, mut sock) = pair().await;
        // Nobody turns this reactor: a socket still on it would never be seen readable.
        let (_driver, reactor) = crate::net::reactor::Driver::new().unwrap();
        sock.adopt(&reactor);
        assert!(sock.own_on(&reactor).is_some());
        peer.write_all(b"before").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        sock.to_runtime();
        assert!(matches!(sock, Sock::Tcp(_)), "{sock:?}");
        peer.write_all(b"after").await.unwrap();
        let mut buf = BytesMut::with_capacity(64);
        while buf.len() < 11 {
            read_some(&sock, &mut buf).await;
        }
        assert_eq!(&buf[..], b"beforeafter");
        sock.write_all(b"reply").await.unwrap();
        let mut got = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got).await.unwrap();
        assert_eq!(&got, b"reply");
        sock.to_runtime();
        assert!(matches!(sock, Sock::Tcp(_)), "a socket on tokio stays there");
    }

    #[tokio::test]
    async fn a_full_buffer_keeps_readiness() {
        let (mut tx, rx) = pair().await;
        tx.write_all(&[7u8; 100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        readable(&rx).await.unwrap();
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
