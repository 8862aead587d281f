//! Logged-in clients, for the admin API ("who holds the pool") and admin kills. Sessions update
//! their entry once per transaction with relaxed atomics, never per message; the admin side
//! only reads.

use crate::net::PeerAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use futures_util::task::AtomicWaker;

use super::ClientId;
use crate::idhash::IdHash;
use crate::pool::PoolKey;

/// What a client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Logged in, no server.
    Idle = 0,
    /// Waiting for a server connection.
    Waiting = 1,
    /// Holding a server connection.
    Active = 2,
}

/// [`StopSignal`] bit: an operator killed the client.
pub const KILL: u8 = 1;
/// [`StopSignal`] bit: pgweir is shutting down (idle clients leave, transactions may finish).
pub const SHUTDOWN: u8 = 2;
/// [`StopSignal`] bit raised with [`SHUTDOWN`], which does the stopping, when the reason is that
/// a reload removed the client's database rather than pgweir shutting down: it changes what the
/// client is told.
pub const REMOVED: u8 = 4;

/// Why a session must stop, for the one task serving it. Sessions wait on it around every
/// transaction, so it is an atomic and an [`AtomicWaker`]: no mutex and no shared waiter list
/// (a `CancellationToken` takes a mutex on every poll, and one shared shutdown token would make
/// every idle client register in the same list).
#[derive(Debug, Default)]
pub struct StopSignal {
    bits: AtomicU8,
    waker: AtomicWaker,
}

impl StopSignal {
    pub fn raise(&self, bit: u8) {
        self.bits.fetch_or(bit, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Makes the next raise wake `waker` instead of the session's task (the event loop holds
    /// the session meanwhile).
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// The raised bits among `mask`, 0 when none.
    pub fn raised_now(&self, mask: u8) -> u8 {
        self.bits.load(Ordering::SeqCst) & mask
    }

    /// Completes with the raised bits among `mask`. Only the session's own task may wait.
    pub fn raised(&self, mask: u8) -> Raised<'_> {
        Raised { signal: self, mask }
    }
}

/// Future of [`StopSignal::raised`].
pub struct Raised<'a> {
    signal: &'a StopSignal,
    mask: u8,
}

impl std::future::Future for Raised<'_> {
    type Output = u8;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<u8> {
        // Check, register, check again: a raise between the first check and the registration
        // is seen by the second.
        let bits = self.signal.raised_now(self.mask);
        if bits != 0 {
            return std::task::Poll::Ready(bits);
        }
        self.signal.waker.register(cx.waker());
        match self.signal.raised_now(self.mask) {
            0 => std::task::Poll::Pending,
            bits => std::task::Poll::Ready(bits),
        }
    }
}

/// One client's public facts.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: ClientId,
    pub addr: PeerAddr,
    pub pool: Arc<PoolKey>,
    /// Shared with the login template it came from (clients of an application send the same).
    pub application_name: Arc<str>,
    /// TLS version and cipher suite, None for a plaintext connection.
    pub tls: Option<String>,
    /// Unix milliseconds.
    pub connected_at: u64,
    state: AtomicU8,
    /// When the current server link started (Unix ms), 0 when none.
    linked_at: AtomicU64,
    /// PostgreSQL backend pid of the server held, 0 when none.
    server_pid: AtomicI32,
    /// When the current wait for a server started (Unix ms), 0 when not waiting.
    waiting_since: AtomicU64,
    /// Since when the client has been idle inside a transaction (Unix ms), 0 when not.
    idle_tx_since: AtomicU64,
    /// The last query text, truncated; only kept when admin.query_text_bytes > 0.
    last_query: std::sync::Mutex<String>,
    /// Raised by an admin kill or by shutdown.
    pub stop: StopSignal,
    /// Served by an event loop right now rather than by the client's own task.
    in_event_loop: std::sync::atomic::AtomicBool,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ClientInfo {
    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// Records whether an event loop or the client's own task serves the client.
    pub fn set_in_event_loop(&self, yes: bool) {
        self.in_event_loop.store(yes, Ordering::Relaxed);
    }

    pub fn in_event_loop(&self) -> bool {
        self.in_event_loop.load(Ordering::Relaxed)
    }

    /// `now_ms` is the caller's [`now_ms`] reading (sessions share one per transaction).
    pub fn set_waiting(&self, now_ms: u64) {
        self.waiting_since.store(now_ms, Ordering::Relaxed);
        self.state.store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    /// When the current wait for a server started, if waiting.
    pub fn waiting_since(&self) -> Option<u64> {
        (self.state() == ClientState::Waiting)
            .then(|| self.waiting_since.load(Ordering::Relaxed))
            .filter(|&t| t != 0)
    }

    pub fn set_linked(&self, server_pid: i32, at_ms: u64) {
        self.server_pid.store(server_pid, Ordering::Relaxed);
        self.linked_at.store(at_ms, Ordering::Relaxed);
        self.state.store(ClientState::Active as u8, Ordering::Relaxed);
    }

    /// Marks the start (at `since_ms`, Unix ms) or the end (None) of being idle inside a
    /// transaction.
    pub fn set_idle_in_transaction(&self, since_ms: Option<u64>) {
        self.idle_tx_since.store(since_ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// Since when the client has been idle inside a transaction.
    pub fn idle_in_transaction_since(&self) -> Option<u64> {
        Some(self.idle_tx_since.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Records the last query text, cut to `max` bytes (on a character boundary).
    pub fn set_last_query(&self, text: &[u8], max: usize) {
        let text = String::from_utf8_lossy(&text[..text.len().min(max)]).into_owned();
        *self.last_query.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }

    pub fn last_query(&self) -> String {
        self.last_query.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_idle(&self) {
        self.idle_tx_since.store(0, Ordering::Relaxed);
        self.server_pid.store(0, Ordering::Relaxed);
        self.linked_at.store(0, Ordering::Relaxed);
        self.state.store(ClientState::Idle as u8, Ordering::Relaxed);
    }

    /// The backend pid of the server held, if any.
    pub fn server_pid(&self) -> Option<i32> {
        Some(self.server_pid.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }

    /// When the current server link (in transaction mode: the transaction) started.
    pub fn linked_at(&self) -> Option<u64> {
        Some(self.linked_at.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }
}

/// Every logged-in client by id.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    clients: DashMap<u64, Arc<ClientInfo>, IdHash>,
}

impl ClientRegistry {
    pub fn register(
        &self,
        id: ClientId,
        addr: PeerAddr,
        pool: Arc<PoolKey>,
        application_name: Arc<str>,
        tls: Option<String>,
    ) -> Arc<ClientInfo> {
        let info = Arc::new(ClientInfo {
            id,
            addr,
            pool,
            application_name,
            tls,
            connected_at: now_ms(),
            state: AtomicU8::new(ClientState::Idle as u8),
            linked_at: AtomicU64::new(0),
            server_pid: AtomicI32::new(0),
            waiting_since: AtomicU64::new(0),
            idle_tx_since: AtomicU64::new(0),
            last_query: std::sync::Mutex::new(String::new()),
            stop: StopSignal::default(),
            in_event_loop: Default::default(),
        });
        self.clients.insert(id.0, info.clone());
        info
    }

    pub fn unregister(&self, id: ClientId) {
        self.clients.remove(&id.0);
    }

    pub fn get(&self, id: u64) -> Option<Arc<ClientInfo>> {
        self.clients.get(&id).map(|e| e.value().clone())
    }

    /// Raises `bit` on every registered client.
    pub fn stop_all(&self, bit: u8) {
        for entry in self.clients.iter() {
            entry.value().stop.raise(bit);
        }
    }

    /// Raises `bits` on every client of the pool with this key (the pool's own `Arc`, so a
    /// pool made since under the same names is not touched). Returns how many.
    pub fn stop_pool(&self, pool: &Arc<PoolKey>, bits: u8) -> usize {
        let mut n = 0;
        for entry in self.clients.iter().filter(|e| Arc::ptr_eq(&e.value().pool, pool)) {
            entry.value().stop.raise(bits);
            n += 1;
        }
        n
    }

    /// A snapshot, ordered by id.
    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<Arc<ClientInfo>> = self.clients.iter().map(|e| e.value().clone()).collect();
        v.sort_by_key(|c| c.id.0);
        v
    }

    /// The client holding the server with this backend pid.
    pub fn by_server_pid(&self, pid: i32) -> Option<Arc<ClientInfo>> {
        self.clients
            .iter()
            .find(|e| e.value().server_pid() == Some(pid))
            .map(|e| e.value().clone())
    }
}
