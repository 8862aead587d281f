//! The event loop's own readiness reactor: an epoll instance (through mio) that one event-loop
//! thread blocks in, for the plain-TCP sockets that loop drives.
//!
//! Why not tokio's: at one event per wake-up (10 clients, or every round trip inside a
//! tpcb-like transaction) tokio's readiness machinery cost ~1,200 instructions per event: the
//! driver turn, `ScheduledIo`'s waker slots (a lock and a waker compare per registration),
//! the wake into the loop's inbox (another lock) and the task poll (docs/performance.md rounds
//! 8, 15, 16). Here a socket is registered once, edge-triggered, and an event for a socket the
//! loop is driving costs an atomic update and a push of the loop's token onto a local list:
//! the loop thread is the reactor thread.
//!
//! A socket adopted by a loop stays registered here for its life, also while a session's task
//! or the pool uses it: then it is an ordinary async socket whose events wake that task (one
//! cross-thread wake-up, as tokio's driver on another worker would do), so nothing outside the
//! loop needs to know which reactor a socket is on.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use mio::unix::SourceFd;

/// A direction of readiness.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    Read = 0,
    Write = 1,
}

impl Dir {
    /// Ready in this direction: cleared when an attempt finds nothing (or a short read).
    fn bit(self) -> u64 {
        1 << self as u64
    }

    /// Closed in this direction (the peer's FIN, a reset, an error): never cleared. A FIN that
    /// arrives with the last bytes raises no event of its own after a read drains those bytes
    /// (a short read clears `bit`), so without this the end would go unseen (tokio keeps
    /// read-closed apart for the same reason).
    fn closed(self) -> u64 {
        4 << self as u64
    }

    /// Either: an attempt in this direction will not wait.
    fn mask(self) -> u64 {
        self.bit() | self.closed()
    }
}

/// The low byte of [`IoState::ready`] holds readiness bits; the rest counts events, so a clear
/// based on an old look does not erase readiness an event set since (tokio's rule).
const TICK: u64 = 1 << 8;
const BITS: u64 = TICK - 1;

/// The mio token of the reactor's own waker.
const WAKE: mio::Token = mio::Token(usize::MAX);

/// Bytes one read may take; reads go through this buffer because the crate has no unsafe code
/// to read into a `BytesMut`'s uninitialised spare room (tokio does that internally). The copy
/// costs little next to the `recv` (an OLTP reply is a few hundred bytes).
const SCRATCH: usize = 128 * 1024;

/// Per socket: readiness seen and who waits for it.
#[derive(Default)]
struct IoState {
    ready: AtomicU64,
    /// An event loop's tokens, per direction: the next event in that direction hands the token
    /// to the loop (and takes it). Only the reactor's own thread sets or takes them.
    tokens: [AtomicU64; 2],
    /// Tasks' wakers, per direction, taken by the next event in that direction.
    wakers: Mutex<[Option<Waker>; 2]>,
    /// Bit per direction: `wakers` holds one (so an event without waiters takes no lock).
    waiting: AtomicU8,
}

impl IoState {
    fn set(&self, bits: u64) {
        let _ = self.ready.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
            Some(((v & !BITS) + TICK) | (v & BITS) | bits)
        });
    }

    fn clear(&self, seen: u64, bit: u64) {
        let _ = self.ready.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
            (v & !BITS == seen & !BITS).then_some(v & !bit)
        });
    }

    fn wakers(&self) -> MutexGuard<'_, [Option<Waker>; 2]> {
        // Holding the lock only swaps wakers in or out: it cannot be left half-done.
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Slot {
    generation: u32,
    state: Option<Arc<IoState>>,
}

#[derive(Default)]
struct Slots {
    list: Vec<Slot>,
    free: Vec<usize>,
}

/// The shared half of a reactor: registrations (from any thread) and its waker.
pub struct Reactor {
    registry: mio::Registry,
    waker: mio::Waker,
    slots: Mutex<Slots>,
    stopped: AtomicBool,
    scratch: Mutex<Vec<u8>>,
}

impl Reactor {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        // Pushes and takes leave the slab whole.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the reactor's thread from its wait.
    pub fn wake(&self) {
        // Fails only when the eventfd cannot be written, which would already have failed at
        // creation.
        let _ = self.waker.wake();
    }

    /// Tells the reactor's thread to stop, and wakes it.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// A waker for tasks' and signals' wake-ups of the reactor's thread (an eventfd write).
    pub fn waker(self: &Arc<Self>) -> Waker {
        Waker::from(Arc::new(ReactorWake(self.clone())))
    }
}

struct ReactorWake(Arc<Reactor>);

impl std::task::Wake for ReactorWake {
    fn wake(self: Arc<Self>) {
        self.0.wake();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake();
    }
}

/// The half of a reactor that waits: owned by its one thread.
pub struct Driver {
    poll: mio::Poll,
    events: mio::Events,
    reactor: Arc<Reactor>,
    wakes: Vec<Waker>,
}

impl Driver {
    pub fn new() -> io::Result<(Driver, Arc<Reactor>)> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = mio::Waker::new(poll.registry(), WAKE)?;
        let reactor = Arc::new(Reactor {
            registry,
            waker,
            slots: Mutex::default(),
            stopped: AtomicBool::new(false),
            scratch: Mutex::new(vec![0; SCRATCH]),
        });
        Ok((
            Driver {
                poll,
                events: mio::Events::with_capacity(1024),
                reactor: reactor.clone(),
                wakes: Vec::new(),
            },
            reactor,
        ))
    }

    /// Waits up to `timeout` (None: until something happens), records the readiness it finds,
    /// pushes the loop tokens it releases onto `tokens` and wakes the tasks that wait.
    pub fn turn(&mut self, tokens: &mut Vec<u64>, timeout: Option<Duration>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        {
            let slots = self.reactor.slots();
            for event in self.events.iter() {
                let key = event.token();
                if key == WAKE {
                    continue;
                }
                let (index, generation) = (key.0 & 0xffff_ffff, (key.0 >> 32) as u32);
                let Some(Slot {
                    generation: g,
                    state: Some(state),
                }) = slots.list.get(index)
                else {
                    continue;
                };
                if *g != generation {
                    // The socket left between the wait and here; the slot has a new one.
                    continue;
                }
                let failed = event.is_error();
                let mut bits = 0;
                if event.is_readable() {
                    bits |= Dir::Read.bit();
                }
                if failed || event.is_read_closed() {
                    bits |= Dir::Read.closed();
                }
                if event.is_writable() {
                    bits |= Dir::Write.bit();
                }
                if failed || event.is_write_closed() {
                    bits |= Dir::Write.closed();
                }
                if bits == 0 {
                    continue;
                }
                state.set(bits);
                // The directions this event concerns, as `Dir::bit`s.
                let mut fired = 0;
                for dir in [Dir::Read, Dir::Write] {
                    if bits & dir.mask() == 0 {
                        continue;
                    }
                    fired |= dir.bit();
                    let token = state.tokens[dir as usize].swap(0, Ordering::Relaxed);
                    if token != 0 {
                        tokens.push(token);
                    }
                }
                if state.waiting.load(Ordering::SeqCst) as u64 & fired != 0 {
                    let mut wakers = state.wakers();
                    for dir in [Dir::Read, Dir::Write] {
                        if fired & dir.bit() != 0
                            && let Some(w) = wakers[dir as usize].take()
                        {
                            state.waiting.fetch_and(!(dir.bit() as u8), Ordering::SeqCst);
                            self.wakes.push(w);
                        }
                    }
                }
            }
        }
        for w in self.wakes.drain(..) {
            w.wake();
        }
        Ok(())
    }
}

/// A plain TCP socket registered with a [`Reactor`]. Its methods mirror tokio's `TcpStream`'s of
/// the same names, so the code around it is the same for both.
pub struct OwnSock {
    io: TcpStream,
    state: Arc<IoState>,
    reactor: Arc<Reactor>,
    key: usize,
}

impl std::fmt::Debug for OwnSock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnSock").field("fd", &self.io.as_raw_fd()).finish()
    }
}

impl OwnSock {
    /// Registers `io`, which must be non-blocking already (the loops adopt duplicates of
    /// tokio's sockets, which share their non-blocking flag: setting it again was a syscall per
    /// connection), with `reactor`. It counts as writable until a write says
    /// otherwise, and as readable once the reactor's next turn reports what the registration
    /// found there (epoll reports a registered socket's current state): the sockets the loops
    /// adopt have just come up empty on a read (a client) or have nothing to say until asked
    /// (a server), so a read right away would only cost an EAGAIN.
    pub fn register(io: TcpStream, reactor: &Arc<Reactor>) -> io::Result<OwnSock> {
        debug_assert!(
            socket2::SockRef::from(&io).nonblocking().unwrap_or(true),
            "a blocking socket would stall the loop"
        );
        let (state, key) = enroll(&io, reactor)?;
        Ok(OwnSock {
            io,
            state,
            reactor: reactor.clone(),
            key,
        })
    }

    /// Moves the registration to `reactor` (two `epoll_ctl`): a server the pool lends to another
    /// loop than the one it was last on. Only while no task waits on the socket (its waker would
    /// stay behind). On failure the socket stays where it was.
    pub fn move_to(&mut self, reactor: &Arc<Reactor>) -> io::Result<()> {
        if self.is_on(reactor) {
            return Ok(());
        }
        let (state, key) = enroll(&self.io, reactor)?;
        let _ = self.reactor.registry.deregister(&mut SourceFd(&self.io.as_raw_fd()));
        release_slot(&self.reactor, self.key);
        self.state = state;
        self.key = key;
        self.reactor = reactor.clone();
        Ok(())
    }
}

/// A slot and an epoll registration for `io` on `reactor`.
fn enroll(io: &TcpStream, reactor: &Arc<Reactor>) -> io::Result<(Arc<IoState>, usize)> {
    let state = Arc::new(IoState::default());
    state.ready.store(Dir::Write.bit(), Ordering::SeqCst);
    let key = {
        let mut slots = reactor.slots();
        let index = match slots.free.pop() {
            Some(i) => i,
            None => {
                slots.list.push(Slot {
                    generation: 0,
                    state: None,
                });
                slots.list.len() - 1
            }
        };
        let slot = &mut slots.list[index];
        slot.generation = slot.generation.wrapping_add(1);
        slot.state = Some(state.clone());
        ((slot.generation as usize) << 32) | index
    };
    let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
    if let Err(e) = reactor
        .registry
        .register(&mut SourceFd(&io.as_raw_fd()), mio::Token(key), interest)
    {
        release_slot(reactor, key);
        return Err(e);
    }
    Ok((state, key))
}

impl OwnSock {
    /// Whether this socket is registered with `reactor`.
    pub fn is_on(&self, reactor: &Arc<Reactor>) -> bool {
        Arc::ptr_eq(&self.reactor, reactor)
    }

    /// For the reactor's own thread only: the next event in `dir` hands `token` to the loop.
    /// Returns whether the socket is ready in `dir` already (then it may never come).
    #[inline]
    pub fn watch(&self, dir: Dir, token: u64) -> bool {
        self.state.tokens[dir as usize].store(token, Ordering::Relaxed);
        self.state.ready.load(Ordering::SeqCst) & dir.mask() != 0
    }

    /// Whether readiness in `dir` has been seen since it was last cleared.
    #[inline]
    pub fn is_ready(&self, dir: Dir) -> bool {
        self.state.ready.load(Ordering::SeqCst) & dir.mask() != 0
    }

    /// Runs `f` if the socket is ready in `interest`'s direction; a `WouldBlock` from it clears
    /// that readiness (unless an event came since it was looked at).
    pub fn try_io<R>(&self, interest: tokio::io::Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        let dir = if interest.is_writable() { Dir::Write } else { Dir::Read };
        let seen = self.state.ready.load(Ordering::SeqCst);
        if seen & dir.mask() == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let r = f();
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.state.clear(seen, dir.bit());
        }
        r
    }

    /// One `recv` into `buf`'s spare room (64 bytes when it has none, as tokio's does), without
    /// looking at readiness.
    #[inline]
    pub fn read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let want = read_size(buf);
        let mut scratch = self.reactor.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let n = recv(&self.io, &mut scratch[..want])?;
        buf.extend_from_slice(&scratch[..n]);
        Ok(n)
    }

    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::READABLE, || self.read_buf(buf))
    }

    /// [`crate::net::stream::try_read_drained`] for this socket: one `recv` when it is
    /// read-ready, and a read shorter than it asked for drained the socket, so it clears read
    /// readiness like a `WouldBlock` would, without making and inspecting one (twice per
    /// proxied round trip). Shorter than the `recv` asked, not than `buf`'s room: a read is
    /// capped at the scratch buffer, and a capped read that cleared readiness would strand
    /// the rest, since edge-triggered epoll reports no new event for bytes already there.
    #[inline]
    pub fn try_read_drained(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let seen = self.state.ready.load(Ordering::SeqCst);
        if seen & Dir::Read.mask() == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let want = read_size(buf);
        let r = self.read_buf(buf);
        match &r {
            Ok(n) if *n > 0 && *n < want => self.state.clear(seen, Dir::Read.bit()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.state.clear(seen, Dir::Read.bit()),
            _ => {}
        }
        r
    }

    #[inline]
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::WRITABLE, || {
            Ok(rustix::net::send(&self.io, buf, rustix::net::SendFlags::NOSIGNAL)?)
        })
    }

    fn poll_ready(&self, dir: Dir, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_ready(dir) {
            return Poll::Ready(Ok(()));
        }
        {
            let mut wakers = self.state.wakers();
            let slot = &mut wakers[dir as usize];
            if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *slot = Some(cx.waker().clone());
            }
            self.state.waiting.fetch_or(dir.bit() as u8, Ordering::SeqCst);
        }
        // An event between the first look and the waker's store found no waker.
        if self.is_ready(dir) {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready(Dir::Read, cx)
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready(Dir::Write, cx)
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.peer_addr()
    }

    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.poll_read_ready(cx))?;
            // Through the scratch buffer, not `initialize_unfilled`: callers build a new ReadBuf
            // over a buffer's spare room for every read, and zeroing all of it each time cost
            // more than the read (16,000 instructions for a 64 KiB buffer).
            let r = self.try_io(tokio::io::Interest::READABLE, || {
                let want = buf.remaining().min(SCRATCH);
                let mut scratch = self.reactor.scratch.lock().unwrap_or_else(|e| e.into_inner());
                let n = recv(&self.io, &mut scratch[..want])?;
                buf.put_slice(&scratch[..n]);
                Ok(n)
            });
            match r {
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    pub fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.poll_write_ready(cx))?;
            match self.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    pub fn shutdown_write(&self) -> io::Result<()> {
        match self.io.shutdown(std::net::Shutdown::Write) {
            // Already closed by the peer: nothing left to shut down.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        }
    }
}

/// How many bytes one read into `buf` asks for: its spare room up to the scratch buffer's
/// size, 64 when it has none (as tokio's reads do).
#[inline]
fn read_size(buf: &BytesMut) -> usize {
    let room = buf.capacity() - buf.len();
    if room == 0 { 64 } else { room.min(SCRATCH) }
}

/// `recv` as a raw system call. libc's wrapper (std's, tokio's) is a cancellation point, and in
/// a process with more than one thread (the loop's own, here) it switches asynchronous
/// cancellation on and off around every call: ~190 instructions per proxied transaction.
#[inline]
fn recv(io: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::net::recv(io, buf, rustix::net::RecvFlags::empty())?.0)
}

fn release_slot(reactor: &Reactor, key: usize) {
    let index = key & 0xffff_ffff;
    let mut slots = reactor.slots();
    if let Some(slot) = slots.list.get_mut(index)
        && slot.state.take().is_some()
    {
        slots.free.push(index);
    }
}

impl Drop for OwnSock {
    fn drop(&mut self) {
        // Deregistered before the descriptor closes (the field drops after this), and the slot
        // freed after that: an event already taken from epoll for it finds a new generation.
        let _ = self.reactor.registry.deregister(&mut SourceFd(&self.io.as_raw_fd()));
        release_slot(&self.reactor, self.key);
    }
}

impl AsFd for OwnSock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.io.as_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::AtomicUsize;

    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        b.set_nonblocking(true).expect("non-blocking");
        (a, b)
    }

    /// A reactor, a connected peer, and our end registered with the reactor (which the socket
    /// keeps alive).
    fn registered() -> (Driver, TcpStream, OwnSock) {
        let (driver, reactor) = Driver::new().expect("reactor");
        let (peer, ours) = pair();
        let sock = OwnSock::register(ours, &reactor).expect("register");
        (driver, peer, sock)
    }

    fn turn(driver: &mut Driver) -> Vec<u64> {
        let mut tokens = Vec::new();
        driver
            .turn(&mut tokens, Some(Duration::from_millis(200)))
            .expect("turn");
        tokens
    }

    #[test]
    fn a_watched_socket_hands_its_token_once_per_event() {
        let (mut driver, mut peer, sock) = registered();
        // Not readable until the reactor says so: no read is tried.
        let mut buf = BytesMut::with_capacity(64);
        let e = sock.try_read_buf(&mut buf).expect_err("nothing sent");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(!sock.is_ready(Dir::Read));
        assert!(sock.is_ready(Dir::Write));
        assert!(!sock.watch(Dir::Read, 7));
        // The registration's own first event (writable) hands no read token.
        let first = turn(&mut driver);
        assert!(!first.contains(&7), "{first:?}");
        peer.write_all(b"hello").expect("write");
        let tokens = turn(&mut driver);
        assert_eq!(tokens, vec![7]);
        assert!(sock.is_ready(Dir::Read));
        // Taken: a further event without a new watch hands nothing.
        peer.write_all(b"!").expect("write");
        assert!(!turn(&mut driver).contains(&7));
        assert_eq!(sock.try_read_buf(&mut buf).expect("read"), 6);
        assert_eq!(&buf[..], b"hello!");
    }

    #[test]
    fn the_end_of_a_stream_stays_seen_after_a_short_read_of_its_last_bytes() {
        let (mut driver, mut peer, sock) = registered();
        let mut buf = BytesMut::with_capacity(64);
        assert!(sock.try_read_buf(&mut buf).is_err());
        assert!(!sock.watch(Dir::Read, 5));
        // The last bytes and the FIN arrive together: one event.
        peer.write_all(b"bye").expect("write");
        drop(peer);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(turn(&mut driver), vec![5]);
        // A read that leaves room counts as draining the socket (the event loop's rule).
        assert_eq!(sock.try_read_drained(&mut buf).expect("read"), 3);
        // No further event will come, so the end must still show.
        assert!(sock.is_ready(Dir::Read), "the FIN is forgotten");
        assert!(sock.watch(Dir::Read, 5));
        assert_eq!(sock.try_read_buf(&mut buf).expect("eof"), 0);
        assert!(turn(&mut driver).is_empty());
    }

    #[test]
    fn a_short_read_clears_read_readiness_and_a_full_one_keeps_it() {
        let (mut driver, mut peer, sock) = registered();
        let mut buf = BytesMut::with_capacity(64);
        let room = buf.capacity();
        let e = sock.try_read_drained(&mut buf).expect_err("nothing sent");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(!sock.watch(Dir::Read, 9));
        peer.write_all(&vec![1u8; room + 10]).expect("write");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(turn(&mut driver), vec![9]);
        // Filling the room says nothing about what is left.
        assert_eq!(sock.try_read_drained(&mut buf).expect("read"), room);
        assert!(sock.is_ready(Dir::Read), "a full read must keep readiness");
        buf.reserve(64);
        assert_eq!(sock.try_read_drained(&mut buf).expect("read"), 10);
        // The short read drained the socket: no recv until the next event.
        assert!(!sock.is_ready(Dir::Read), "a short read must clear readiness");
        let e = sock.try_read_drained(&mut buf).expect_err("not ready");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(!sock.watch(Dir::Read, 9));
        peer.write_all(b"more").expect("write");
        assert_eq!(turn(&mut driver), vec![9]);
        assert_eq!(sock.try_read_drained(&mut buf).expect("read"), 4);
        assert_eq!(buf.len(), room + 14);
    }

    #[test]
    fn a_read_capped_at_the_scratch_buffer_keeps_readiness_for_the_rest() {
        let (mut driver, reactor) = Driver::new().expect("reactor");
        let (mut peer, ours) = pair();
        // Room in the kernel for all the bytes at once, so they are all there before the read.
        socket2::SockRef::from(&ours)
            .set_recv_buffer_size(8 * SCRATCH)
            .expect("SO_RCVBUF");
        let sock = OwnSock::register(ours, &reactor).expect("register");
        // More room than one read takes, and more bytes waiting than that.
        let mut buf = BytesMut::with_capacity(4 * SCRATCH);
        assert!(!sock.watch(Dir::Read, 4));
        let sent = SCRATCH + 1000;
        let writer = std::thread::spawn(move || {
            peer.write_all(&vec![7u8; sent]).expect("write");
            peer
        });
        let _peer = writer.join().expect("writer");
        std::thread::sleep(Duration::from_millis(20));
        let _ = turn(&mut driver);
        let mut got = 0;
        while got < sent {
            // Each read finds readiness still set until the socket is drained: no further event
            // comes for bytes already there.
            assert!(sock.is_ready(Dir::Read), "{} bytes stranded", sent - got);
            got += sock.try_read_drained(&mut buf).expect("read");
        }
        assert_eq!(got, sent);
        assert!(!sock.is_ready(Dir::Read), "the last, short read drained the socket");
    }

    #[test]
    fn bytes_that_were_there_before_the_registration_are_reported_at_the_next_turn() {
        let (mut driver, reactor) = Driver::new().expect("reactor");
        let (mut peer, ours) = pair();
        peer.write_all(b"early").expect("write");
        std::thread::sleep(Duration::from_millis(20));
        let sock = OwnSock::register(ours, &reactor).expect("register");
        assert!(!sock.watch(Dir::Read, 3));
        assert_eq!(turn(&mut driver), vec![3]);
        let mut buf = BytesMut::with_capacity(64);
        assert_eq!(sock.try_read_buf(&mut buf).expect("read"), 5);
    }

    #[test]
    fn a_clear_from_an_old_look_keeps_readiness_a_later_event_set() {
        let state = IoState::default();
        state.set(Dir::Read.bit());
        let seen = state.ready.load(Ordering::SeqCst);
        state.set(Dir::Read.bit());
        state.clear(seen, Dir::Read.bit());
        assert_ne!(state.ready.load(Ordering::SeqCst) & Dir::Read.bit(), 0);
        let seen = state.ready.load(Ordering::SeqCst);
        state.clear(seen, Dir::Read.bit());
        assert_eq!(state.ready.load(Ordering::SeqCst) & Dir::Read.bit(), 0);
    }

    /// A waker that counts its wake-ups.
    pub(crate) struct Count(pub(crate) AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_task_waiting_on_a_socket_is_woken_by_its_event() {
        let (mut driver, mut peer, sock) = registered();
        let mut buf = BytesMut::with_capacity(64);
        assert!(sock.try_read_buf(&mut buf).is_err());
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(sock.poll_read_ready(&mut cx).is_pending());
        let _ = turn(&mut driver);
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "writable does not wake a reader");
        peer.write_all(b"x").expect("write");
        let _ = turn(&mut driver);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(sock.poll_read_ready(&mut cx).is_ready());
        // EOF counts as readable.
        assert_eq!(sock.try_read_buf(&mut buf).expect("read"), 1);
        assert!(sock.try_read_buf(&mut buf).is_err());
        assert!(sock.poll_read_ready(&mut cx).is_pending());
        drop(peer);
        let _ = turn(&mut driver);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!(sock.try_read_buf(&mut buf).expect("eof"), 0);
    }

    #[test]
    fn a_dropped_socket_frees_its_slot_and_stale_keys_are_ignored() {
        let (mut driver, reactor) = Driver::new().expect("reactor");
        let (mut peer1, ours1) = pair();
        let first = OwnSock::register(ours1, &reactor).expect("register");
        let old_key = first.key;
        drop(first);
        let (mut peer2, ours2) = pair();
        let second = OwnSock::register(ours2, &reactor).expect("register");
        assert_eq!(second.key & 0xffff_ffff, old_key & 0xffff_ffff, "slot reused");
        assert_ne!(second.key, old_key, "with a new generation");
        assert!(second.try_read_buf(&mut BytesMut::with_capacity(8)).is_err());
        assert!(!second.watch(Dir::Read, 9));
        let _ = peer1.write_all(b"late");
        let _ = turn(&mut driver);
        peer2.write_all(b"y").expect("write");
        assert!(turn(&mut driver).contains(&9));
    }

    #[test]
    fn a_stop_wakes_the_waiting_thread() {
        let (mut driver, reactor) = Driver::new().expect("reactor");
        let r = reactor.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            r.stop();
        });
        let started = std::time::Instant::now();
        driver
            .turn(&mut Vec::new(), Some(Duration::from_secs(10)))
            .expect("turn");
        assert!(reactor.is_stopped());
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().expect("join");
    }
}
