//! Server-connection pools, one per (database, user).
//!
//! Invariants:
//! - `open` counts every connection that exists or is being opened for this pool: idle ones,
//!   lent ones and connects in flight. It never exceeds `size`, except transiently after a
//!   shrink, when returned connections are closed instead of kept.
//! - A waiter is served in arrival order. A returned connection goes straight to the oldest
//!   waiter; a closed one passes its slot (the right to open a new connection) to the oldest
//!   waiter. So no waiter can be overtaken by a client that arrived later.
//! - A `PooledServer` owns its connection; dropping it without `release` closes the connection,
//!   so an error path can never hand a dirty connection to another client.
//!
//! Locks are `std::sync::Mutex`es held only for a few pointer moves, never across `.await`.

mod maintenance;
mod registry;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use registry::PoolRegistry;

use crate::clock::Mono;
use crate::config::{PoolMode, PoolSettings};
use crate::server::params::LoginTemplate;
use crate::server::{self, ParamSet, ServerConn, ServerError, ServerIds, ServerSecret, ServerTarget};

/// Identifies a pool: the database name clients use and the client's user name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.database, self.user)
    }
}

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("no server connection for pool {key} within {timeout:?}")]
    Timeout {
        key: PoolKey,
        timeout: Duration,
        snapshot: PoolSnapshot,
    },
    #[error("pool {0} is closed")]
    Closed(PoolKey),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Counters that only grow; read by the admin API and metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub acquire_timeouts: AtomicU64,
    pub idle_transaction_timeouts: AtomicU64,
    /// Queries cancelled (and their clients disconnected) at query_timeout.
    pub query_timeouts: AtomicU64,
    pub server_connects: AtomicU64,
    pub server_connect_failures: AtomicU64,
    pub checkouts: crate::metrics::StripedCounter,
    /// Runs of reset_query: after each session-mode client, and in transaction mode after a
    /// client changed session state (session_state = "reset") or after every transaction
    /// ("reset_always").
    pub session_resets: AtomicU64,
    /// The most recent attempt to open a server connection failed (for /ready).
    pub last_connect_failed: std::sync::atomic::AtomicBool,
    /// Time from a client's first message to holding a server.
    pub acquire_wait: crate::metrics::LatencyHistogram,
    /// Time a client held a server (in transaction mode: one transaction).
    pub transaction_duration: crate::metrics::LatencyHistogram,
    /// Server connections being opened right now.
    pub connecting: AtomicU64,
    /// Idle server connections being health-checked right now.
    pub testing: AtomicU64,
    /// Server connections closed, by reason (see [`CLOSE_REASONS`]).
    pub closed: [AtomicU64; CLOSE_REASONS.len()],
    /// Round trips (Query or Sync to ReadyForQuery) as seen by clients.
    pub query_duration: crate::metrics::LatencyHistogram,
    /// Server links completed: transactions in transaction mode, sessions in session mode.
    pub transactions: crate::metrics::StripedCounter,
    /// Simple Query and Execute messages sent to servers.
    pub queries: crate::metrics::StripedCounter,
    pub bytes_from_clients: crate::metrics::StripedCounter,
    pub bytes_to_clients: crate::metrics::StripedCounter,
}

/// Why server connections are closed, as bounded metric labels.
pub const CLOSE_REASONS: [&str; 9] = [
    "idle_timeout",
    "lifetime",
    "dead",
    "dirty",
    "resize",
    "pool_closed",
    "killed",
    "retarget",
    "reconnect",
];

/// Index into [`CLOSE_REASONS`].
#[derive(Debug, Clone, Copy)]
pub enum CloseReason {
    IdleTimeout = 0,
    Lifetime = 1,
    /// Failed the health check or had unexpected input while idle.
    Dead = 2,
    /// Returned by a session that could not vouch for it (error, client gone mid-transaction,
    /// failed reset).
    Dirty = 3,
    Resize = 4,
    PoolClosed = 5,
    /// Closed through the admin API (`POST /api/servers/{pid}/kill` on an idle one).
    Killed = 6,
    /// Opened for a server address, database or user that a reload has changed since.
    Retarget = 7,
    /// Opened before an operator's reconnect (`POST /api/pools/{db}/{user}/reconnect`).
    Reconnect = 8,
}

/// A point-in-time view of a pool, for error messages and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub size: usize,
    pub open: usize,
    pub idle: usize,
    pub waiting: usize,
    pub paused: bool,
}

impl PoolSnapshot {
    pub fn active(&self) -> usize {
        self.open - self.idle
    }

    /// Active server connections as a fraction of pool_size.
    pub fn utilisation(&self) -> f64 {
        self.active() as f64 / self.size.max(1) as f64
    }
}

/// Connections are boxed once, at connect: a checkout and a checkin move one through the idle
/// list, a waiter's channel, the vetting future and the lending guard, and a pointer moves for
/// nothing where the struct itself is a few hundred bytes of memcpy each time.
pub(crate) type Conn = Box<ServerConn>;

/// How [`Pool::begin_checkout`] went.
pub(crate) enum Checkout {
    Ready(Grant),
    /// Queued; the sender is dropped when the wait ends without a grant.
    Wait(oneshot::Receiver<Grant>),
}

/// What a waiter is given.
pub(crate) enum Grant {
    Conn(Conn),
    /// Permission to open one new connection (the slot is already counted in `open`).
    Slot,
}

/// Where grants for waiters that are not tasks go: the event loop (`client::session::hub`)
/// waits for many clients at once, so its waits are entries in its inbox, not channels.
pub(crate) trait GrantSink: Send + Sync {
    /// Hands `grant` to the waiter `token`. The sink owns it from then on (and gives it back
    /// with [`Pool::return_grant`] if that waiter has gone meanwhile). Err(grant) when the
    /// sink itself is gone: the pool offers it to its next waiter. Called with the pool's
    /// lock held, so it must not give the grant back itself.
    fn grant(&self, token: u64, grant: Grant, pool: &Pool) -> Result<(), Grant>;
    /// The wait of `token` ended without a grant (acquire_timeout, or the pool closed).
    fn ended(&self, token: u64);
}

/// A wait registered by a [`GrantSink`]; dropping it unserved tells the sink.
pub(crate) struct SinkWaiter {
    sink: Arc<dyn GrantSink>,
    token: u64,
    /// Where a grant goes back to if its waiter left.
    pool: Pool,
    served: bool,
}

impl Drop for SinkWaiter {
    fn drop(&mut self) {
        if !self.served {
            self.sink.ended(self.token);
        }
    }
}

enum WaiterTx {
    Task(oneshot::Sender<Grant>),
    Sink(SinkWaiter),
}

impl WaiterTx {
    fn send(self, grant: Grant) -> Result<(), Grant> {
        match self {
            WaiterTx::Task(tx) => tx.send(grant),
            WaiterTx::Sink(mut w) => {
                // Either way: a sink that refuses is gone and need not hear the wait ended.
                w.served = true;
                w.sink.grant(w.token, grant, &w.pool)
            }
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            WaiterTx::Task(tx) => tx.is_closed(),
            WaiterTx::Sink(_) => false,
        }
    }
}

struct Waiter {
    /// When acquire_timeout ends this wait: the sweeper drops `tx`, which the waiter reads as
    /// a timeout.
    deadline: Instant,
    tx: WaiterTx,
}

struct PoolState {
    /// LIFO: the most recently used connection is the warmest (and keeps idle ones aging out).
    idle: Vec<Conn>,
    open: usize,
    size: usize,
    waiters: VecDeque<Waiter>,
    /// A sweeper task is running (it ends when no one waits).
    sweeping: bool,
    /// When the sweeper will next look, to wake it early for a waiter due sooner (after a
    /// reload shortened acquire_timeout).
    sweep_at: Option<Instant>,
    closed: bool,
    /// Paused pools lend nothing: new checkouts queue until resume.
    paused: bool,
    /// Where new connections go; a reload may change it ([`Pool::retarget`]).
    target: Arc<ServerTarget>,
    /// Counts target changes and reconnects: a connection opened for an older generation is
    /// closed when returned.
    generation: u64,
    /// Why the generation last changed: what a connection of an older one is closed for.
    renewed_by: CloseReason,
}

/// How many (parameter, client value) → reported value pairs a pool keeps (see
/// [`Pool::canonical_value`]).
pub const CANONICAL_VALUES_KEPT: usize = 256;

/// What PostgreSQL reported for clients' values of the tracked parameters: per name (the index in
/// [`server::params::TRACKED`]), a client's value → the value reported for it.
#[derive(Default)]
struct CanonicalValues {
    by_name: [Answers; server::params::TRACKED.len()],
}

/// A client's value of one parameter → the value PostgreSQL reported for it.
type Answers = HashMap<Box<[u8]>, Box<[u8]>>;

impl CanonicalValues {
    /// Values come from clients, so the number kept is bounded: one that invents new values
    /// cannot grow the pool without limit. Past the bound a new value costs a server round trip
    /// at each login, as it does the first time; applications send the same startup packet every
    /// time, so a pool sees a handful.
    const MAX: usize = CANONICAL_VALUES_KEPT;
    /// Longer values are not kept (no DateStyle, TimeZone or encoding name is this long), so
    /// all of them together stay under MAX × 2 × MAX_VALUE_LEN bytes.
    const MAX_VALUE_LEN: usize = 128;

    fn index(name: &str) -> Option<usize> {
        server::params::TRACKED.iter().position(|t| *t == name)
    }

    fn get(&self, name: &str, value: &[u8]) -> Option<&[u8]> {
        self.by_name[Self::index(name)?].get(value).map(|c| &c[..])
    }

    fn learn(&mut self, name: &str, value: &[u8], canonical: &[u8]) {
        let Some(i) = Self::index(name) else {
            return;
        };
        if self.by_name.iter().map(HashMap::len).sum::<usize>() >= Self::MAX
            || value.len() > Self::MAX_VALUE_LEN
            || canonical.len() > Self::MAX_VALUE_LEN
            || self.by_name[i].contains_key(value)
        {
            return;
        }
        self.by_name[i].insert(value.into(), canonical.into());
    }
}

/// A pool's welcome and the last few logins worked out against it.
#[derive(Default)]
struct Welcome {
    /// The pool generation `params` (and the templates) are from: a connection of an older
    /// one must not set them, nor a renew clear those of a newer one.
    generation: u64,
    params: Option<Arc<ParamSet>>,
    /// A few, so that applications taking turns on one pool (each with its own
    /// application_name, say) do not push each other's out at every login.
    templates: [Option<Arc<LoginTemplate>>; LOGIN_TEMPLATES_KEPT],
    /// The slot the next template goes to: the oldest.
    next_template: usize,
}

impl Welcome {
    /// A connection of `generation` logged in: its parameters become the welcome if there is
    /// none from that generation yet (or only one from an older).
    fn offer(&mut self, generation: u64, params: impl FnOnce() -> Arc<ParamSet>) {
        if generation > self.generation {
            *self = Welcome {
                generation,
                ..Welcome::default()
            };
        }
        if generation == self.generation && self.params.is_none() {
            self.params = Some(params());
        }
    }

    /// The pool moved to `generation`: what older servers reported is forgotten, what a
    /// connection of this generation already offered is kept.
    fn renew(&mut self, generation: u64) {
        if generation > self.generation {
            *self = Welcome {
                generation,
                ..Welcome::default()
            };
        }
    }
}

/// How many distinct startup packets' login templates a pool keeps.
pub const LOGIN_TEMPLATES_KEPT: usize = 4;

/// A pool's open server connections. A lent one is in no pool list (a session holds it, or it
/// is being reset, health-checked or handed to the next client), so the admin API finds every
/// server here rather than only through whichever clients hold one at the instant it looks.
/// Changed only when a connection opens or closes.
#[derive(Default)]
struct OpenServers(Mutex<Vec<OpenServer>>);

struct OpenServer {
    id: server::ServerId,
    pid: i32,
    created: Mono,
    /// The pool's generation it was opened for.
    generation: u64,
}

/// Keeps its connection in its pool's [`OpenServers`] for as long as the connection exists,
/// however it ends (closed, discarded or dropped with its session).
pub(crate) struct Listed {
    list: Arc<OpenServers>,
    id: server::ServerId,
    /// The pool's target generation it was opened for (see [`Pool::retarget`]).
    generation: u64,
}

impl fmt::Debug for Listed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Listed").field(&self.id).finish()
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut list = lock(&self.list.0);
        if let Some(i) = list.iter().position(|s| s.id == self.id) {
            list.swap_remove(i);
        }
    }
}

pub(crate) struct PoolShared {
    /// Shared with the admin registry's entry of each client of the pool.
    key: Arc<PoolKey>,
    /// Swapped whole on reload; readers take a cheap snapshot.
    settings: arc_swap::ArcSwap<PoolSettings>,
    keepalive: Option<Duration>,
    secret: Mutex<ServerSecret>,
    state: Mutex<PoolState>,
    /// Parameters of the pool's first server login; replayed to clients at login so they need
    /// no server (PgBouncer's "welcome message").
    welcome: Mutex<Welcome>,
    /// What PostgreSQL reported for a client's value of a tracked parameter ("iso, dmy" →
    /// "ISO, DMY"), learnt from a server at a login or when a session applied it, so the next
    /// login with that value is told the server's value without asking a server again.
    canonical: Mutex<CanonicalValues>,
    /// Wakes the waiter sweeper before its planned time.
    sweep_now: tokio::sync::Notify,
    open_servers: Arc<OpenServers>,
    ids: Arc<ServerIds>,
    pub(crate) stats: PoolStats,
    /// Its database was removed from the configuration by a reload (see [`Pool::remove`]).
    removed: std::sync::atomic::AtomicBool,
}

/// A handle to one pool; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<PoolShared>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("key", &self.shared.key).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections cannot leave the state half
    // updated in a way later users could not cope with, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub fn new(
        key: PoolKey,
        target: ServerTarget,
        secret: ServerSecret,
        settings: PoolSettings,
        keepalive: Option<Duration>,
        ids: Arc<ServerIds>,
    ) -> Pool {
        let size = settings.pool_size;
        Pool {
            shared: Arc::new(PoolShared {
                key: Arc::new(key),
                keepalive,
                secret: Mutex::new(secret),
                state: Mutex::new(PoolState {
                    idle: Vec::with_capacity(size),
                    open: 0,
                    size,
                    waiters: VecDeque::new(),
                    sweeping: false,
                    sweep_at: None,
                    closed: false,
                    paused: false,
                    target: Arc::new(target),
                    generation: 0,
                    renewed_by: CloseReason::Retarget,
                }),
                settings: arc_swap::ArcSwap::from_pointee(settings),
                welcome: Mutex::default(),
                canonical: Mutex::default(),
                sweep_now: tokio::sync::Notify::new(),
                open_servers: Arc::default(),
                ids,
                stats: PoolStats::default(),
                removed: Default::default(),
            }),
        }
    }

    pub fn key(&self) -> &PoolKey {
        &self.shared.key
    }

    /// The key, shared: one allocation per pool rather than per holder.
    pub fn shared_key(&self) -> Arc<PoolKey> {
        self.shared.key.clone()
    }

    /// The current settings, for the admin API, logins and rare paths (sessions read them
    /// through [`Pool::settings_cache`]). A guard rather than an `Arc` clone: no reference
    /// count bounces between cores.
    pub fn settings(&self) -> arc_swap::Guard<Arc<PoolSettings>> {
        self.shared.settings.load()
    }

    /// A per-holder copy of the settings that follows reloads: a session reads settings
    /// several times per transaction, and each check costs one pointer compare instead of an
    /// `ArcSwap` load (a visible share of a proxied transaction's instructions).
    pub fn settings_cache(&self) -> SettingsCache {
        SettingsCache(arc_swap::Cache::new(SettingsHandle(self.clone())))
    }

    /// Applies reloaded settings: the size at once (see [`Pool::resize`]), everything else to
    /// the next checkout, connect and maintenance pass. The size follows the file only when the
    /// file's pool_size changed: a live resize (admin API) survives reloads that change other
    /// settings, until someone edits pool_size itself.
    pub fn update_settings(&self, settings: PoolSettings) {
        let size = settings.pool_size;
        let old = self.shared.settings.swap(Arc::new(settings));
        if size != old.pool_size {
            self.resize(size);
        }
    }

    pub fn mode(&self) -> PoolMode {
        self.shared.settings.load().mode
    }

    pub fn stats(&self) -> &PoolStats {
        &self.shared.stats
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let st = lock(&self.shared.state);
        PoolSnapshot {
            size: st.size,
            open: st.open,
            idle: st.idle.len(),
            waiting: st.waiters.len(),
            paused: st.paused,
        }
    }

    /// Replaces the credentials used for new server connections (SCRAM pass-through keys learnt
    /// from a client login).
    pub fn set_secret(&self, secret: ServerSecret) {
        *lock(&self.shared.secret) = secret;
    }

    /// True when the pool can open server connections without keys learnt from a client.
    pub fn has_usable_secret(&self) -> bool {
        !matches!(*lock(&self.shared.secret), ServerSecret::None)
    }

    /// The value PostgreSQL reported for `value` of the tracked parameter `name`, if learnt.
    pub fn canonical_value(&self, name: &str, value: &[u8]) -> Option<Vec<u8>> {
        lock(&self.shared.canonical).get(name, value).map(<[u8]>::to_vec)
    }

    /// Records that PostgreSQL reports `canonical` for `value` of the tracked parameter `name`
    /// (kept while fewer than [`CANONICAL_VALUES_KEPT`] are).
    pub fn learn_canonical_value(&self, name: &str, value: &[u8], canonical: &[u8]) {
        lock(&self.shared.canonical).learn(name, value, canonical);
    }

    /// The welcome parameters, if a server has logged in already.
    pub fn welcome(&self) -> Option<Arc<ParamSet>> {
        lock(&self.shared.welcome).params.clone()
    }

    /// The welcome parameters, and the kept login template that fits a login with `startup`
    /// (the startup packet's parameter bytes), if any: one lock for both.
    pub fn welcome_for(&self, startup: &[u8]) -> (Option<Arc<ParamSet>>, Option<Arc<LoginTemplate>>) {
        let welcome = lock(&self.shared.welcome);
        let params = welcome.params.clone();
        let template = params
            .as_ref()
            .and_then(|p| welcome.templates.iter().flatten().find(|t| t.fits(startup, p)).cloned());
        (params, template)
    }

    /// Keeps `template` for later logins with the same startup packet, in place of the oldest
    /// of the [`LOGIN_TEMPLATES_KEPT`] kept.
    pub fn keep_login_template(&self, template: Arc<LoginTemplate>) {
        let mut welcome = lock(&self.shared.welcome);
        // Two logins with one new packet at once both work it out; one copy is enough.
        if welcome
            .templates
            .iter()
            .flatten()
            .any(|t| t.fits(&template.startup, &template.welcome))
        {
            return;
        }
        let slot = welcome.next_template;
        welcome.templates[slot] = Some(template);
        welcome.next_template = (slot + 1) % LOGIN_TEMPLATES_KEPT;
    }

    /// Takes a server connection, waiting until `acquire_timeout` after `started` (when the
    /// caller began asking). Waiters are served first-in, first-out.
    /// `settings` are the caller's view of this pool's settings (the timeout, and vetting of
    /// idle servers).
    pub async fn checkout(&self, started: Instant, settings: &PoolSettings) -> Result<PooledServer, PoolError> {
        let grant = match self.begin_checkout(started, settings)? {
            Checkout::Ready(grant) => grant,
            Checkout::Wait(rx) => rx.await.map_err(|_| self.acquire_timed_out(settings))?,
        };
        self.finish_grant(grant, settings).await
    }

    /// The first, synchronous half of [`Pool::checkout`]: a grant available now, or a queued
    /// wait for one. Callers that can use an idle connection without vetting it
    /// ([`Pool::usable_now`]) then skip the future of [`Pool::finish_grant`].
    pub(crate) fn begin_checkout(&self, started: Instant, settings: &PoolSettings) -> Result<Checkout, PoolError> {
        let mut waiting = None;
        let immediate = self.take_or_wait(started + settings.acquire_timeout, || {
            let (tx, rx) = oneshot::channel();
            waiting = Some(rx);
            WaiterTx::Task(tx)
        })?;
        match (immediate, waiting) {
            (Some(grant), _) => Ok(Checkout::Ready(grant)),
            // No timer per wait: the sweeper ends overdue waits by dropping their sender.
            (None, Some(rx)) => Ok(Checkout::Wait(rx)),
            (None, None) => unreachable!("take_or_wait queued no waiter"),
        }
    }

    /// The error for a wait whose sender was dropped: the pool was closed (its waiters are
    /// dropped with it), or acquire_timeout passed (the sweeper).
    pub(crate) fn acquire_timed_out(&self, settings: &PoolSettings) -> PoolError {
        if lock(&self.shared.state).closed {
            return PoolError::Closed((*self.shared.key).clone());
        }
        self.shared.stats.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
        PoolError::Timeout {
            key: (*self.shared.key).clone(),
            timeout: settings.acquire_timeout,
            snapshot: self.snapshot(),
        }
    }

    /// [`Pool::checkout`] for a waiter that is not a task: a grant available now is returned,
    /// otherwise `token` is queued and the grant (or the end of the wait) goes to `sink`.
    pub(crate) fn checkout_for_sink(
        &self,
        started: Instant,
        settings: &PoolSettings,
        sink: &Arc<dyn GrantSink>,
        token: u64,
    ) -> Result<Option<Grant>, PoolError> {
        self.take_or_wait(started + settings.acquire_timeout, || {
            WaiterTx::Sink(SinkWaiter {
                sink: sink.clone(),
                token,
                pool: self.clone(),
                served: false,
            })
        })
    }

    /// Removes waits their waiters gave up (a task that stopped waiting, and the sink waiter
    /// `sink_wait`), so they no longer count as waiting or stand in the queue until the next
    /// release or the sweeper reaches them.
    pub(crate) fn forget_waits(&self, sink_wait: Option<(&Arc<dyn GrantSink>, u64)>) {
        // A token is only unique within its sink (each event loop counts its own).
        let given_up =
            |s: &SinkWaiter| sink_wait.is_some_and(|(sink, token)| s.token == token && Arc::ptr_eq(&s.sink, sink));
        lock(&self.shared.state)
            .waiters
            .retain(|w| !w.tx.is_closed() && !matches!(&w.tx, WaiterTx::Sink(s) if given_up(s)));
    }

    /// Takes an idle connection or a free slot when nobody queues before us and the pool is
    /// not paused; otherwise queues the waiter `tx` makes.
    fn take_or_wait(&self, deadline: Instant, tx: impl FnOnce() -> WaiterTx) -> Result<Option<Grant>, PoolError> {
        let shared = &self.shared;
        let mut st = lock(&shared.state);
        if st.closed {
            return Err(PoolError::Closed((*shared.key).clone()));
        }
        if st.waiters.is_empty() && !st.paused {
            if let Some(conn) = st.idle.pop() {
                return Ok(Some(Grant::Conn(conn)));
            }
            if st.open < st.size {
                st.open += 1;
                return Ok(Some(Grant::Slot));
            }
        }
        // Others were here first (queue behind them even if a slot seems free), the pool is
        // paused, or it is full.
        st.waiters.push_back(Waiter { deadline, tx: tx() });
        if !st.sweeping {
            st.sweeping = true;
            st.sweep_at = Some(deadline);
            tokio::spawn(self.clone().sweep_waiters());
        } else if st.sweep_at.is_some_and(|at| deadline < at) {
            self.shared.sweep_now.notify_one();
        }
        Ok(None)
    }

    /// Turns a grant into a lent connection: an idle one is vetted first, a slot is connected.
    pub(crate) async fn finish_grant(&self, grant: Grant, settings: &PoolSettings) -> Result<PooledServer, PoolError> {
        let shared = &self.shared;
        let conn = match grant {
            Grant::Conn(conn) => match self.vet(conn, settings).await {
                Some(conn) => conn,
                // The idle connection was dead; its slot is ours to reconnect with.
                None => self.open_slot().await?,
            },
            Grant::Slot => self.open_slot().await?,
        };
        shared.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        Ok(self.guard(conn))
    }

    /// Ends waits that reached their deadline, in one task per pool that runs only while
    /// someone waits, instead of a timer registered and cancelled on every wait. Under lock, so
    /// a waiter is either served or timed out, never both.
    async fn sweep_waiters(self) {
        loop {
            let next = {
                let mut st = lock(&self.shared.state);
                let now = Instant::now();
                // Deadlines are mostly in arrival order, but a reload can change
                // acquire_timeout, so every waiter is looked at.
                st.waiters.retain(|w| w.deadline > now && !w.tx.is_closed());
                match st.waiters.iter().map(|w| w.deadline).min() {
                    Some(at) => {
                        st.sweep_at = Some(at);
                        at
                    }
                    None => {
                        st.sweeping = false;
                        st.sweep_at = None;
                        return;
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.shared.sweep_now.notified() => {}
            }
        }
    }

    /// Lends an idle connection that [`Pool::usable_now`] accepted.
    pub(crate) fn lend(&self, conn: Conn) -> PooledServer {
        self.shared.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        self.guard(conn)
    }

    /// True when an idle connection can be lent without waiting for anything: not past its
    /// lifetime, silent, and used recently enough to skip the health check. The rest of
    /// [`Pool::vet`] needs a task.
    pub(crate) fn usable_now(conn: &mut ServerConn, settings: &PoolSettings, now: Mono) -> bool {
        let age = now.since(conn.created);
        settings.server_lifetime.is_none_or(|l| age < l)
            && now.since(conn.last_used) < settings.server_check_delay
            && !conn.has_pending_input()
    }

    /// Gives back a grant whose waiter left before it arrived.
    pub(crate) fn return_grant(&self, grant: Grant) {
        match grant {
            Grant::Conn(conn) => self.checkin(conn, Mono::now()),
            Grant::Slot => self.release_slot(),
        }
    }

    /// Checks an idle connection before lending it. Returns None (having closed it and kept
    /// its slot for the caller) when it must not be used.
    async fn vet(&self, mut conn: Conn, settings: &PoolSettings) -> Option<Conn> {
        let stats = &self.shared.stats;
        let now = Mono::now();
        if settings.server_lifetime.is_some_and(|l| now.since(conn.created) >= l) {
            self.count_close(CloseReason::Lifetime);
            conn.close();
            return None;
        }
        if conn.has_pending_input() {
            self.count_close(CloseReason::Dead);
            conn.close();
            return None;
        }
        if now.since(conn.last_used) >= settings.server_check_delay {
            // An empty query is the cheapest round trip that proves the backend is alive.
            stats.testing.fetch_add(1, Ordering::Relaxed);
            let check = tokio::time::timeout(settings.server_connect_timeout, conn.run_discarding("")).await;
            stats.testing.fetch_sub(1, Ordering::Relaxed);
            if !matches!(check, Ok(Ok(None))) {
                self.count_close(CloseReason::Dead);
                conn.close();
                return None;
            }
        }
        Some(conn)
    }

    /// Opens a connection for a slot already counted in `open`; on failure the slot is passed on.
    async fn open_slot(&self) -> Result<Conn, ServerError> {
        let shared = &self.shared;
        let secret = lock(&shared.secret).clone();
        let (target, generation) = {
            let st = lock(&shared.state);
            (st.target.clone(), st.generation)
        };
        shared.stats.connecting.fetch_add(1, Ordering::Relaxed);
        let settings = shared.settings.load_full();
        let result = server::connect(
            shared.ids.next(),
            &target,
            &secret,
            settings.server_connect_timeout,
            shared.keepalive,
            &settings.server_tls,
        )
        .await;
        shared.stats.connecting.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(mut conn) => {
                conn.listed = Some(self.list(&conn, generation));
                shared.stats.server_connects.fetch_add(1, Ordering::Relaxed);
                shared.stats.last_connect_failed.store(false, Ordering::Relaxed);
                // Not from a connection to a target a retarget or reconnect has replaced
                // meanwhile, however this interleaves with its renew.
                lock(&shared.welcome).offer(generation, || Arc::new(conn.params.clone()));
                Ok(Box::new(conn))
            }
            Err(e) => {
                shared.stats.server_connect_failures.fetch_add(1, Ordering::Relaxed);
                shared.stats.last_connect_failed.store(true, Ordering::Relaxed);
                self.release_slot();
                Err(e)
            }
        }
    }

    fn guard(&self, conn: Conn) -> PooledServer {
        PooledServer {
            conn: Some(conn),
            pool: self.clone(),
        }
    }

    /// A connection was closed: its slot goes to the oldest waiter, or is freed.
    fn release_slot(&self) {
        let mut st = lock(&self.shared.state);
        // Saturating so that a release too many cannot wrap and make the pool refuse every
        // connection in a release build; the tests (debug builds) would see it here.
        debug_assert!(st.open > 0, "a slot released that was never taken");
        st.open = st.open.saturating_sub(1);
        if !st.paused {
            Self::serve_waiters(&mut st);
        }
    }

    /// Returns a clean connection: to the oldest waiter, else to the idle list.
    fn checkin(&self, mut conn: Conn, now: Mono) {
        conn.last_used = now;
        let mut st = lock(&self.shared.state);
        let stale = conn.listed.as_ref().is_some_and(|l| l.generation != st.generation);
        if st.closed || st.open > st.size || stale {
            let reason = if st.closed {
                CloseReason::PoolClosed
            } else if stale {
                st.renewed_by
            } else {
                CloseReason::Resize
            };
            drop(st);
            self.count_close(reason);
            conn.close();
            self.release_slot();
            return;
        }
        // LIFO: the waiter served first gets this very connection.
        st.idle.push(conn);
        if !st.paused {
            Self::serve_waiters(&mut st);
        }
    }

    /// Stops lending connections: new transactions queue (and time out after acquire_timeout)
    /// until [`Pool::resume`]. Transactions in progress finish normally.
    pub fn pause(&self) {
        lock(&self.shared.state).paused = true;
    }

    /// Serves the queued waiters, oldest first, from idle connections and free slots.
    pub fn resume(&self) {
        let mut st = lock(&self.shared.state);
        st.paused = false;
        Self::serve_waiters(&mut st);
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.shared.state).paused
    }

    /// Changes pool_size at run time. Growing serves waiters at once; shrinking closes idle
    /// connections now and lent ones as they come back.
    pub fn resize(&self, size: usize) {
        let retired = {
            let mut st = lock(&self.shared.state);
            st.size = size.max(1);
            let mut retired = Vec::new();
            while st.open > st.size {
                let Some(conn) = st.idle.pop() else { break };
                st.open -= 1;
                retired.push(conn);
            }
            if !st.paused {
                Self::serve_waiters(&mut st);
            }
            retired
        };
        self.close_taken(retired, CloseReason::Resize);
    }

    /// Hands idle connections, then new-connection slots, to waiters in arrival order.
    fn serve_waiters(st: &mut PoolState) {
        while !st.waiters.is_empty() {
            let grant = if let Some(conn) = st.idle.pop() {
                Grant::Conn(conn)
            } else if st.open < st.size {
                st.open += 1;
                Grant::Slot
            } else {
                return;
            };
            let mut unsent = Some(grant);
            while let Some(w) = st.waiters.pop_front() {
                let Some(g) = unsent.take() else { break };
                match w.tx.send(g) {
                    Ok(()) => break,
                    // That waiter gave up; try the next one with the same grant.
                    Err(back) => unsent = Some(back),
                }
            }
            match unsent {
                Some(Grant::Conn(conn)) => st.idle.push(conn),
                Some(Grant::Slot) => st.open -= 1,
                None => {}
            }
        }
    }

    /// Idle server connections: (backend pid, age, time idle).
    pub fn idle_servers(&self) -> Vec<(i32, Duration, Duration)> {
        let now = Mono::now();
        lock(&self.shared.state)
            .idle
            .iter()
            .map(|c| (c.backend_pid(), now.since(c.created), now.since(c.last_used)))
            .collect()
    }

    /// Every open server connection, idle or not: (backend pid, age).
    pub fn open_servers(&self) -> Vec<(i32, Duration)> {
        let now = Mono::now();
        lock(&self.shared.open_servers.0)
            .iter()
            .map(|s| (s.pid, now.since(s.created)))
            .collect()
    }

    fn list(&self, conn: &ServerConn, generation: u64) -> Listed {
        let list = &self.shared.open_servers;
        lock(&list.0).push(OpenServer {
            id: conn.id,
            pid: conn.backend_pid(),
            created: conn.created,
            generation,
        });
        Listed {
            list: list.clone(),
            id: conn.id,
            generation,
        }
    }

    /// Points new connections at `target` (a reload changed the database's host, port, dbname
    /// or server user): idle connections to the old one are closed at once, lent ones when
    /// they come back, so transactions that start after it run on the new target (but for one
    /// on a connection already on its way to a client). Returns whether anything changed.
    pub fn retarget(&self, target: ServerTarget) -> bool {
        let mut st = lock(&self.shared.state);
        if *st.target == target {
            return false;
        }
        st.target = Arc::new(target);
        self.renew(st, CloseReason::Retarget);
        true
    }

    /// PgBouncer's RECONNECT: every connection open now is closed, idle ones at once and lent
    /// ones when returned, so every transaction from here on runs on a new one (for one on a
    /// connection already on its way to a client). For when what stands between pgweir and
    /// PostgreSQL changed without the configuration changing (a load balancer or DNS name
    /// switched over), or server-side settings only new sessions read. Returns how many idle
    /// connections were closed.
    pub fn reconnect(&self) -> usize {
        self.renew(lock(&self.shared.state), CloseReason::Reconnect)
    }

    /// Starts a new generation, closing the idle connections of older ones now (the lent ones
    /// close when returned, see `checkin`), and forgets what the servers reported: the next
    /// ones may be other servers. Returns how many idle connections were closed.
    fn renew(&self, mut st: MutexGuard<'_, PoolState>, reason: CloseReason) -> usize {
        st.generation += 1;
        let generation = st.generation;
        st.renewed_by = reason;
        // Taken under the lock that moves the generation: no idle connection of the old one
        // can be lent after it.
        let idle = Self::take_idle(&mut st);
        drop(st);
        let n = self.close_taken(idle, reason);
        lock(&self.shared.welcome).renew(generation);
        *lock(&self.shared.canonical) = CanonicalValues::default();
        n
    }

    /// How many open connections (idle, lent or between clients) belong to a generation older
    /// than the current one: those a retarget or reconnect has yet to close.
    pub fn stale_servers(&self) -> usize {
        let generation = lock(&self.shared.state).generation;
        lock(&self.shared.open_servers.0)
            .iter()
            .filter(|s| s.generation != generation)
            .count()
    }

    /// Closes the idle connections now, counted under `reason` (an admin kill of the pool,
    /// whose clients the caller ends: their connections close with them). Returns how many.
    pub fn close_idle(&self, reason: CloseReason) -> usize {
        let idle = Self::take_idle(&mut lock(&self.shared.state));
        self.close_taken(idle, reason)
    }

    /// Takes every idle connection out of the pool, their slots going to waiters (unless
    /// paused), for the caller to close outside the lock with [`Pool::close_taken`].
    fn take_idle(st: &mut PoolState) -> Vec<Conn> {
        let idle = std::mem::take(&mut st.idle);
        st.open -= idle.len();
        if !st.paused {
            Self::serve_waiters(st);
        }
        idle
    }

    /// Closes connections already taken out of the pool (their slots given up), counted under
    /// `reason`. Returns how many.
    fn close_taken(&self, conns: Vec<Conn>, reason: CloseReason) -> usize {
        let n = conns.len();
        for conn in conns {
            self.count_close(reason);
            conn.close();
        }
        n
    }

    /// Where new connections go.
    pub fn target(&self) -> Arc<ServerTarget> {
        lock(&self.shared.state).target.clone()
    }

    /// Closes the idle server connection with this backend pid; false if none is idle here.
    pub fn close_idle_server(&self, pid: i32) -> bool {
        let conn = {
            let mut st = lock(&self.shared.state);
            let Some(i) = st.idle.iter().position(|c| c.backend_pid() == pid) else {
                return false;
            };
            st.idle.remove(i)
        };
        self.count_close(CloseReason::Killed);
        conn.close();
        self.release_slot();
        true
    }

    pub(crate) fn count_close(&self, reason: CloseReason) {
        self.shared.stats.closed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the pool as taken out for good because a reload removed its database, so that a
    /// login or session still holding it can tell. The reload closes it next.
    pub fn mark_removed(&self) {
        self.shared.removed.store(true, Ordering::SeqCst);
    }

    pub fn is_removed(&self) -> bool {
        self.shared.removed.load(Ordering::SeqCst)
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.shared.state).closed
    }

    /// Closes idle connections and refuses new checkouts; lent connections close on return.
    pub fn close(&self) {
        let idle = {
            let mut st = lock(&self.shared.state);
            st.closed = true;
            st.waiters.clear();
            let idle = std::mem::take(&mut st.idle);
            st.open -= idle.len();
            idle
        };
        self.close_taken(idle, CloseReason::PoolClosed);
    }
}

/// See [`Pool::settings_cache`].
pub struct SettingsCache(arc_swap::Cache<SettingsHandle, Arc<PoolSettings>>);

impl SettingsCache {
    /// The pool's current settings.
    #[inline]
    pub fn load(&mut self) -> &Arc<PoolSettings> {
        self.0.load()
    }
}

/// Lets an `arc_swap::Cache` hold the pool that owns the settings.
pub struct SettingsHandle(Pool);

impl std::ops::Deref for SettingsHandle {
    type Target = arc_swap::ArcSwap<PoolSettings>;

    fn deref(&self) -> &Self::Target {
        &self.0.shared.settings
    }
}

/// A server connection lent from a pool. Dropping it closes the connection; call
/// [`PooledServer::release`] to return a clean one.
pub struct PooledServer {
    conn: Option<Conn>,
    pool: Pool,
}

impl PooledServer {
    pub fn conn(&mut self) -> &mut ServerConn {
        // `conn` is only None after release/discard, which consume self.
        self.conn.as_mut().expect("PooledServer used after release")
    }

    pub fn conn_ref(&self) -> &ServerConn {
        self.conn.as_ref().expect("PooledServer used after release")
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Returns the connection for reuse. Only call when it is idle: ReadyForQuery 'I' seen,
    /// nothing outstanding.
    pub fn release(mut self) {
        self.release_in_place(Mono::now());
    }

    /// [`PooledServer::release`] with the caller's clock reading, for a guard the caller drops
    /// in place afterwards (moving a structure that holds one is a copy of all of it); the
    /// guard is empty from here on.
    pub(crate) fn release_in_place(&mut self, now: Mono) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn, now);
        }
    }

    /// Closes the connection; its slot goes to the next waiter.
    pub fn discard(mut self) {
        self.discard_in_place();
    }

    /// [`PooledServer::discard`] for a guard the caller drops in place afterwards.
    pub(crate) fn discard_in_place(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.count_close(CloseReason::Dirty);
            conn.close();
            self.pool.release_slot();
        }
    }
}

impl Drop for PooledServer {
    fn drop(&mut self) {
        self.discard_in_place();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::{CanonicalValues, LOGIN_TEMPLATES_KEPT, Pool, PoolKey, lock};
    use crate::server::params::{LoginTemplate, ParamSet};
    use crate::server::{ServerIds, ServerSecret, ServerTarget};

    /// The welcome follows the pool's generation whatever order a renew and a login of either
    /// generation come in: an older connection never sets it, and a renew never clears what a
    /// connection of the new generation already set (that left logins answered "server
    /// parameters unavailable" until a fresh connect).
    #[test]
    fn the_welcome_is_never_from_an_older_generation() {
        let (old, new) = (Arc::new(ParamSet::default()), Arc::new(ParamSet::default()));
        let is = |w: &super::Welcome, p: &Arc<ParamSet>| w.params.as_ref().is_some_and(|x| Arc::ptr_eq(x, p));
        // The old generation's connection finishes after the renew.
        let mut w = super::Welcome::default();
        w.renew(1);
        w.offer(0, || old.clone());
        assert!(w.params.is_none());
        w.offer(1, || new.clone());
        assert!(is(&w, &new));
        // The new generation's connection finishes before the renew reaches the welcome.
        let mut w = super::Welcome::default();
        w.offer(0, || old.clone());
        w.offer(1, || new.clone());
        assert!(is(&w, &new), "a newer generation replaces an older welcome");
        w.renew(1);
        assert!(is(&w, &new), "the renew keeps it");
        w.offer(1, || old.clone());
        assert!(is(&w, &new), "the first of a generation stays");
        w.renew(2);
        assert!(w.params.is_none());
    }

    /// Event loops number their waits each on its own, so two loops can queue the same token
    /// on one pool: one giving up its wait must not take the other's out of the queue.
    #[tokio::test(flavor = "current_thread")]
    async fn a_sink_forgets_only_its_own_wait() {
        use super::{Grant, GrantSink};
        #[derive(Default)]
        struct Sink(std::sync::Mutex<Vec<u64>>);
        impl GrantSink for Sink {
            fn grant(&self, token: u64, grant: Grant, _pool: &Pool) -> Result<(), Grant> {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).push(token);
                drop(grant);
                Ok(())
            }
            fn ended(&self, _token: u64) {}
        }
        let pool = unconnected_pool("d", "u");
        let settings = pool.settings().as_ref().clone();
        let started = tokio::time::Instant::now();
        let (a, b): (Arc<dyn GrantSink>, Arc<dyn GrantSink>) = (Arc::new(Sink::default()), Arc::new(Sink::default()));
        let held: Vec<_> = (0..settings.pool_size)
            .map(|_| {
                pool.checkout_for_sink(started, &settings, &a, 9)
                    .expect("open")
                    .expect("slot")
            })
            .collect();
        assert!(
            pool.checkout_for_sink(started, &settings, &a, 1)
                .expect("queued")
                .is_none()
        );
        assert!(
            pool.checkout_for_sink(started, &settings, &b, 1)
                .expect("queued")
                .is_none()
        );
        assert_eq!(pool.snapshot().waiting, 2);
        pool.forget_waits(Some((&a, 1)));
        assert_eq!(pool.snapshot().waiting, 1, "b's wait with the same token stays");
        drop(held);
    }

    fn template(startup: &[u8], welcome: &Arc<ParamSet>) -> Arc<LoginTemplate> {
        Arc::new(LoginTemplate {
            startup: startup.into(),
            welcome: welcome.clone(),
            params: Arc::default(),
            form: Arc::from(&b""[..]),
            application_name: Arc::from(""),
            status: Box::default(),
        })
    }

    /// A pool for `database` and `user` that never connects anywhere (port 1).
    pub(crate) fn unconnected_pool(database: &str, user: &str) -> Pool {
        Pool::new(
            PoolKey {
                database: database.into(),
                user: user.into(),
            },
            ServerTarget {
                host: "127.0.0.1".into(),
                port: 1,
                dbname: database.into(),
                user: user.into(),
            },
            ServerSecret::None,
            crate::config::default_pool_settings(),
            None,
            Arc::new(ServerIds::default()),
        )
    }

    #[test]
    fn a_pool_keeps_the_last_few_login_templates() {
        let pool = unconnected_pool("d", "u");
        let welcome = Arc::new(ParamSet::default());
        pool.keep_login_template(template(b"a", &welcome));
        assert!(pool.welcome_for(b"a").1.is_none(), "no welcome yet, so nothing fits");
        lock(&pool.shared.welcome).params = Some(welcome.clone());
        assert!(pool.welcome_for(b"a").1.is_some());
        let packets: Vec<Vec<u8>> = (0..LOGIN_TEMPLATES_KEPT - 1).map(|i| vec![b'b'; i + 1]).collect();
        for p in &packets {
            pool.keep_login_template(template(p, &welcome));
        }
        // Many logins with one new packet at once each work it out and offer it: the first
        // copy is kept, the others push nothing out.
        for _ in 0..LOGIN_TEMPLATES_KEPT {
            pool.keep_login_template(template(b"a", &welcome));
        }
        assert!(
            pool.welcome_for(b"a").1.is_some(),
            "still among the last {LOGIN_TEMPLATES_KEPT}"
        );
        for p in &packets {
            let (_, t) = pool.welcome_for(p);
            assert_eq!(t.map(|t| t.startup.to_vec()), Some(p.clone()));
        }
        // One more pushes out the oldest.
        pool.keep_login_template(template(b"c", &welcome));
        assert!(pool.welcome_for(b"a").1.is_none());
        assert!(pool.welcome_for(b"c").1.is_some());
        assert!(pool.welcome_for(&packets[0]).1.is_some());
    }

    #[test]
    fn canonical_values_are_kept_per_name_and_bounded() {
        let mut known = CanonicalValues::default();
        known.learn("DateStyle", b"iso, dmy", b"ISO, DMY");
        known.learn("DateStyle", b"iso, dmy", b"other");
        assert_eq!(
            known.get("DateStyle", b"iso, dmy"),
            Some(&b"ISO, DMY"[..]),
            "first answer kept"
        );
        assert_eq!(known.get("TimeZone", b"iso, dmy"), None);
        assert_eq!(known.get("DateStyle", b"ISO, DMY"), None);
        known.learn("search_path", b"a", b"a");
        assert_eq!(known.get("search_path", b"a"), None, "tracked parameters only");
        known.learn("TimeZone", &[b'z'; 129], b"UTC");
        assert_eq!(known.get("TimeZone", &[b'z'; 129]), None, "too long to keep");
        for i in 0..1000 {
            known.learn("TimeZone", format!("zone{i}").as_bytes(), b"UTC");
        }
        assert_eq!(
            known.by_name.iter().map(HashMap::len).sum::<usize>(),
            CanonicalValues::MAX
        );
        assert_eq!(known.get("TimeZone", b"zone0"), Some(&b"UTC"[..]));
        assert_eq!(known.get("TimeZone", b"zone999"), None);
        assert_eq!(known.get("DateStyle", b"iso, dmy"), Some(&b"ISO, DMY"[..]));
    }
}
