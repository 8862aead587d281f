//! The event loop (`listen.event_loop`): one thread serving every plain-TCP transaction-mode
//! session between and during its transactions, instead of one task per client. The thread
//! waits in its own epoll ([`crate::net::reactor`]), where the sockets it drives are moved.
//!
//! Why: per transaction, a task per client costs three task polls through the session's nested
//! futures, a wait set up again at every round trip (a `select!` of futures until round 31),
//! and a oneshot plus a task wake-up to hand a released server to the next waiter
//! (docs/performance.md). Here a socket's readiness hands
//! the loop the session's token (its reactor's events do that without a waker); the loop then
//! drives that session's state
//! directly with non-blocking reads and writes, and a released server reaches the next waiting
//! session through the loop's own inbox: at the start of the loop's next round that session's
//! first message is framed and sent, with no task woken (PgBouncer hands off within the same
//! step; doing so here measured worse, docs/performance.md round 8).
//!
//! Only the common path runs here: waiting for a first message, taking an idle server whose
//! parameters already match, and pumping the transaction. Everything else (logins, errors,
//! timeouts, kills, shutdown, connects, health checks, parameter changes, resets, statement
//! commands answered locally) hands the session back to its own task with a [`Resume`] that
//! says where to continue, so that logic exists once, in `session`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Framed, Link, LinkSpares, Pumped, Resume, Session, Wrote, reserve_for_server};
use crate::client::ClientError;
use crate::client::prepared::classify_query;
use crate::client::registry::{KILL, SHUTDOWN, now_ms};
use crate::clock::Mono;
use crate::config::SessionStatePolicy;
use crate::net::buffers::LoopBuffers;
use crate::net::reactor::{Dir, Driver, Reactor};
use crate::net::stream::{Sock, poll_hung_up, poll_read_ready_armed, readable_now, try_read_drained};
use crate::pool::{Grant, GrantSink, Pool};
use crate::proto::frame::HEADER_LEN;
use crate::proto::frame_at;
use crate::proto::tag::frontend;

/// What a session's task gets back from the loop.
type Back = (Box<Session>, Resume);

/// A handle for handing sessions to the event loops; cheap to clone.
#[derive(Clone)]
pub(crate) struct Hub {
    inboxes: Arc<[Arc<Inbox>]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl Hub {
    /// Starts `loops` event loops (at least one) on the current runtime: one per worker
    /// thread, so the data path uses every core the runtime has. A session stays with the
    /// loop it was given.
    pub(crate) fn start(loops: usize) -> Hub {
        let inboxes: Vec<Arc<Inbox>> = (0..loops.max(1)).map(|_| start_loop()).collect();
        Hub {
            inboxes: inboxes.into(),
            next: Default::default(),
        }
    }

    /// The loop a new session will use.
    pub(super) fn assign(&self) -> usize {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.inboxes.len()
    }

    /// Hands `session` to its loop until it needs its task again. None when the loop is gone
    /// (the runtime is shutting down).
    pub(super) async fn enter(&self, session: Box<Session>) -> Option<Back> {
        let (tx, rx) = oneshot::channel();
        let inbox = &self.inboxes[session.hub_index % self.inboxes.len()];
        inbox.push(|st| {
            // A loop that is gone drops the sender, and the task learns it below.
            if !st.closed {
                st.arrivals.push((session, tx));
            }
        });
        rx.await.ok()
    }
}

/// Starts one loop: on a thread of its own that waits in its own reactor, or, when that
/// cannot be set up, as a task on the current runtime. Returns its inbox.
fn start_loop() -> Arc<Inbox> {
    match start_thread_loop() {
        Ok(inbox) => inbox,
        Err(e) => {
            tracing::warn!(error = %e, "could not start the event loop's thread; it runs as a task");
            let inbox = Arc::new(Inbox::default());
            tokio::spawn(HubLoop::new(inbox.clone(), None));
            inbox
        }
    }
}

/// The loop's thread: it polls the loop and, when the loop waits, blocks in its reactor, whose
/// events for the loop's sockets become the loop's tokens without a waker (see
/// [`crate::net::reactor`]). Wake-ups from elsewhere (grants, stop signals, sockets on another
/// reactor, sessions entering) come through the inbox and the reactor's eventfd.
fn start_thread_loop() -> std::io::Result<Arc<Inbox>> {
    let handle = tokio::runtime::Handle::current();
    let (mut driver, reactor) = Driver::new()?;
    let inbox = Arc::new(Inbox::default());
    let mut hub = HubLoop::new(inbox.clone(), Some(reactor.clone()));
    let on_thread = reactor.clone();
    std::thread::Builder::new().name("pgweir-loop".into()).spawn(move || {
        // Tasks the loop spawns or wakes, and the pool's clock, belong to the runtime.
        let _runtime = handle.enter();
        let waker = on_thread.waker();
        let mut cx = Context::from_waker(&waker);
        while !on_thread.is_stopped() {
            if Pin::new(&mut hub).poll(&mut cx).is_ready() {
                break;
            }
            // From the clock reading the poll's last look at the timers took (there was one if
            // there are timers): one clock read fewer per wait.
            let timeout = hub.timers.peek().map(|Reverse((at, _))| at.since(hub.timers_read_at));
            if let Err(e) = driver.turn(&mut hub.local, timeout) {
                tracing::error!(error = %e, "the event loop's reactor failed; its sessions end");
                break;
            }
        }
    })?;
    // The thread ends with the runtime: this task is dropped when the runtime shuts down.
    tokio::spawn(async move {
        let _stop = StopOnDrop(reactor);
        std::future::pending::<()>().await
    });
    Ok(inbox)
}

struct StopOnDrop(Arc<Reactor>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl HubLoop {
    fn new(inbox: Arc<Inbox>, reactor: Option<Arc<Reactor>>) -> HubLoop {
        let sink: Arc<dyn GrantSink> = inbox.clone();
        HubLoop {
            inbox,
            sink,
            entries: Vec::new(),
            free: Vec::new(),
            timers: BinaryHeap::new(),
            // On its own thread the loop's reactor waits until the next deadline instead.
            sleep: reactor
                .is_none()
                .then(|| Box::pin(tokio::time::sleep(std::time::Duration::from_secs(3600)))),
            sleep_at: None,
            spare: InboxState::default(),
            generation: 0,
            clock: Clock::new(),
            watch_sweep: false,
            timers_read_at: Mono::now(),
            reactor,
            local: Vec::new(),
            spares: Spares::default(),
        }
    }
}

impl Drop for HubLoop {
    fn drop(&mut self) {
        // Sessions that were on their way in end (their tasks see the loop gone), grants go
        // back to their pools, and later arrivals are refused.
        let (arrivals, grants) = {
            let mut st = self.inbox.lock();
            st.closed = true;
            (std::mem::take(&mut st.arrivals), std::mem::take(&mut st.grants))
        };
        drop(arrivals);
        for (_, grant) in grants {
            if let Some((grant, pool)) = grant {
                pool.return_grant(grant);
            }
        }
    }
}

/// Everything that reaches the loop from outside its own poll: readiness, pool grants,
/// sessions entering. One mutex, held for a push or a swap.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct InboxState {
    /// The loop is running or already woken: a push need not wake it.
    notified: bool,
    /// Tokens whose socket or stop signal fired.
    ready: Vec<u64>,
    /// Pool grants by token; None ends the wait without one.
    grants: Vec<(u64, Option<(Grant, Pool)>)>,
    arrivals: Vec<(Box<Session>, oneshot::Sender<Back>)>,
    /// The loop is gone: arrivals are refused.
    closed: bool,
}

impl InboxState {
    fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.grants.is_empty() && self.arrivals.is_empty()
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        // Pushes and swaps cannot leave the state half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, f: impl FnOnce(&mut InboxState)) {
        let wake = {
            let mut st = self.lock();
            f(&mut st);
            !std::mem::replace(&mut st.notified, true)
        };
        if wake {
            self.waker.wake();
        }
    }
}

impl GrantSink for Inbox {
    fn grant(&self, token: u64, grant: Grant, pool: &Pool) -> Result<(), Grant> {
        let mut grant = Some(grant);
        self.push(|st| {
            if !st.closed
                && let Some(g) = grant.take()
            {
                st.grants.push((token, Some((g, pool.clone()))));
            }
        });
        // The loop is gone: nobody would take it. Not given back here: the pool's lock is
        // held, and taking it again would deadlock the thread.
        grant.map_or(Ok(()), Err)
    }

    fn ended(&self, token: u64) {
        self.push(|st| st.grants.push((token, None)));
    }
}

/// Registered with a socket or a stop signal: a wake-up records the session's token.
struct TokenWaker {
    inbox: Arc<Inbox>,
    token: u64,
}

impl Wake for TokenWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let token = self.token;
        self.inbox.push(|st| st.ready.push(token));
    }
}

/// A token is the entry's index and generation, so a late wake-up for an entry that has left
/// (and whose slot was reused) is recognised and ignored.
fn token(index: usize, generation: u32) -> u64 {
    ((index as u64) << 32) | u64::from(generation)
}

/// Marks the token of an entry's client-read waker ([`Entry::client_waker`]). Indexes stay far
/// below 2^30: the slab would need a billion entries to reach it.
const CLIENT_READ: u64 = 1 << 63;

/// Marks the token of an entry's server-read waker ([`Entry::server_waker`]).
const SERVER_READ: u64 = 1 << 62;

fn split_token(token: u64) -> (usize, u32) {
    (((token & !(CLIENT_READ | SERVER_READ)) >> 32) as usize, token as u32)
}

struct Entry {
    generation: u32,
    session: Box<Session>,
    back: oneshot::Sender<Back>,
    phase: Phase,
    /// One waker for the server socket, the client's write readiness and the stop signal:
    /// whichever fired, the session's state is looked at whole.
    waker: Waker,
    /// The waker for the client socket's read readiness. The same as `waker` but for its token
    /// ([`CLIENT_READ`]): its wake-ups tell the loop that the registration it made is gone
    /// ([`Entry::client_armed`]).
    client_waker: Waker,
    /// The waker for the linked server socket's read readiness, with its own token
    /// ([`SERVER_READ`]) for the same reason: see [`Linked::server_armed`].
    server_waker: Waker,
    /// The entry's current deadline (idle in transaction, or a query running too long).
    timer: Option<Mono>,
    /// The earliest deadline this entry has in the timer heap. A deadline that moves later is
    /// not pushed again: when the earlier one comes due, the current one is pushed then. So
    /// the heap holds about one item per linked entry however often deadlines move.
    scheduled: Option<Mono>,
    /// The client socket's read waker is registered and has not fired, so the client sending
    /// bytes or hanging up will drive this entry: no need to register again (a lock and a
    /// waker compare in tokio, twice per transaction otherwise). Set when a readiness poll
    /// with `client_waker` comes back Pending having registered it ([`poll_read_ready_armed`]);
    /// cleared by every read of the client (a read may clear its read readiness) and by every
    /// wake-up of `client_waker` (the reactor takes the waker when it wakes it).
    ///
    /// The second is needed because the reactor records readiness and wakes in two steps: on
    /// the multi-threaded runtime the loop can read the new bytes and register again in
    /// between, and the late wake-up then takes that fresh registration. So the rule is: while
    /// set and no `client_waker` token has come in since, either the waker is registered or its
    /// token is on its way; with [`readable_now`] false as well, the entry need not poll.
    client_armed: bool,
}

enum Phase {
    Unlinked,
    /// Queued in the pool for the first message (tag `tag`) since `started`.
    Waiting {
        tag: u8,
        started: Instant,
        wall_ms: u64,
        watch: Watch,
    },
    Linked(Linked),
}

/// Whether a waiting session's client socket is watched for a hang-up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Not yet: the wait is young (see [`WATCH_AFTER`]).
    Later,
    /// Watched: a hang-up ends the session at once.
    On,
    /// The client sent more bytes while it waited: those stay in the socket for the next read,
    /// and the watch ends (a hang-up is seen when the transaction reads them).
    Off,
}

struct Linked {
    /// Boxed, not inline: with thousands of clients an entry is cold when its transaction
    /// starts, and a link written into it (~470 bytes) missed the cache line by line; the box
    /// of the last link to end here ([`HubLoop::spares`]) is warm. It also goes to the task as
    /// it is ([`Resume::Link`]).
    link: Box<Link>,
    linked_at: Mono,
    was_idle_in_tx: bool,
    max_prepared: usize,
    /// [`Entry::client_armed`]'s rule for this link's server socket and
    /// [`Entry::server_waker`]. Inside a transaction the server is watched after each reply
    /// (for what it may send unasked) and was polled again after each query; the second
    /// registration is skipped while the first still stands (~140 instructions a round trip).
    server_armed: bool,
    /// What the last pass that ended in a wait framed (bytes for the server, bytes for the
    /// client). Only the pump changes a link's buffers, and only a read or a write does, so a
    /// wake-up finds the framing, the writes and the deadline as that pass left them: its first
    /// pass goes straight to the reads (one pass in three per wake-up otherwise framed
    /// nothing, wrote nothing and worked out the same deadline again).
    framed: Option<(bool, bool)>,
}

/// What driving an entry came to.
enum Step {
    /// Waiting for readiness, a grant or a timer.
    Wait,
    /// Its task must continue.
    Back(Resume),
}

struct HubLoop {
    inbox: Arc<Inbox>,
    /// The reactor the loop's thread waits in; None for a loop that runs as a task.
    reactor: Option<Arc<Reactor>>,
    /// Tokens the reactor's last turn released (events on sockets the loop watches).
    local: Vec<u64>,
    sink: Arc<dyn GrantSink>,
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// Idle-in-transaction and query deadlines of linked entries.
    timers: BinaryHeap<Reverse<(Mono, u64)>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    sleep_at: Option<Mono>,
    /// Swapped with the inbox's state, so draining it allocates nothing.
    spare: InboxState,
    /// The last generation given to an entry.
    generation: u32,
    clock: Clock,
    /// A sweep that starts watching long waiters' clients is in the timer heap.
    watch_sweep: bool,
    /// When [`HubLoop::poll_timers`] last read the clock.
    timers_read_at: Mono,
    /// Links and read buffers that ended their use here, for the next ones.
    spares: Spares,
}

/// What transactions that ended in a loop leave for its next ones (last in, first out): kept
/// by the loop rather than by each session so they are warm however many clients take turns.
#[derive(Default)]
struct Spares {
    /// Links, boxes and growable parts, without an allocation and a free per transaction
    /// (~230 instructions: glibc's per-thread cache rarely had a block that size). A link here
    /// has released its server; it still names the server's pool until it is reused.
    #[expect(
        clippy::vec_box,
        reason = "a box moves on to a session's phase and to its task as it is"
    )]
    links: Vec<Box<Link>>,
    /// Client read buffers: lent to a session when its client sends, taken back when it is idle.
    bufs: LoopBuffers,
}

impl Spares {
    /// More than a loop's pools are likely to lend it at once.
    const MAX_LINKS: usize = 64;

    fn take_link(&mut self) -> Option<Box<Link>> {
        self.links.pop()
    }

    fn keep_link(&mut self, link: Box<Link>) {
        if self.links.len() < Self::MAX_LINKS {
            self.links.push(link);
        }
    }
}

/// How long a session waits for a server before the loop watches its client for a hang-up.
/// Most waits end within milliseconds; arming the watch costs about as many instructions as a
/// quarter of a proxied transaction, so only waits that last pay for it.
const WATCH_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The least time between two sweeps that start watches: a sweep walks every entry, and when
/// waits routinely outlast [`WATCH_AFTER`] (2,000 clients running tpcb-like on 20 servers) one
/// comes due nearly every round; sweeping for each cost a tenth of the loop's CPU there. So a
/// wait is watched between WATCH_AFTER and WATCH_AFTER + SWEEP_EVERY after it began.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The timer heap's token for the watch sweep; no entry has it (index u32::MAX is never
/// reached: the slab would need four billion entries).
const SWEEP: u64 = u64::MAX;

/// One clock reading per round of the loop (of each clock), shared by every session it drives
/// in that round (clock reads are a visible share of a proxied transaction's CPU on virtual
/// machines). `now` is for what meets the pool's waits, which tokio times; `mono` for the rest
/// (see [`crate::clock`]). Wall time for the admin API is derived from the monotonic reading
/// and re-anchored every second.
#[derive(Clone, Copy)]
struct Clock {
    now: Instant,
    mono: Mono,
    wall_ms: u64,
    anchor: Mono,
    anchor_wall_ms: u64,
}

impl Clock {
    fn new() -> Clock {
        let mono = Mono::now();
        let wall_ms = now_ms();
        Clock {
            now: Instant::now(),
            mono,
            wall_ms,
            anchor: mono,
            anchor_wall_ms: wall_ms,
        }
    }

    fn tick(&mut self, mono: Mono) {
        let since = mono.since(self.anchor);
        if since >= std::time::Duration::from_secs(1) {
            *self = Clock::new();
        } else {
            self.now = Instant::now();
            self.mono = mono;
            self.wall_ms = self.anchor_wall_ms + since.as_millis() as u64;
        }
    }
}

impl Future for HubLoop {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            // With the task's coop budget spent, every readiness poll answers Pending and wakes
            // the task, which here would put the token straight back in the inbox: the loop
            // would spin without ever handing the thread back to the scheduler (nor to the I/O
            // driver that could end the spin). Yield instead; the inbox keeps what is queued.
            // Not seen in practice (rounds per poll stay below a hundred, each spending budget
            // only on the rare readiness that raced a read), so this is a guard, not a path.
            if !tokio::task::coop::has_budget_remaining() {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            {
                let mut st = this.inbox.lock();
                if st.is_empty() && this.local.is_empty() {
                    // Registered before `notified` drops, under the lock every push takes: a
                    // push after this point wakes this registration.
                    this.inbox.waker.register(cx.waker());
                    st.notified = false;
                } else {
                    // Running: pushes from this round (grants to this loop's own waiters) need
                    // not wake it.
                    st.notified = true;
                    std::mem::swap(&mut st.ready, &mut this.spare.ready);
                    std::mem::swap(&mut st.grants, &mut this.spare.grants);
                    std::mem::swap(&mut st.arrivals, &mut this.spare.arrivals);
                }
            }
            this.spare.ready.append(&mut this.local);
            // Timers are looked at on every round, so a loop that never runs out of work still
            // ends overdue transactions.
            // One clock reading per round serves the timers and the round's sessions.
            let mut now = None;
            let fired = this.poll_timers(cx, &mut now);
            if this.spare.is_empty() {
                if fired {
                    continue;
                }
                return Poll::Pending;
            }
            this.clock.tick(now.unwrap_or_else(Mono::now));
            let mut arrivals = std::mem::take(&mut this.spare.arrivals);
            for (session, back) in arrivals.drain(..) {
                this.admit(session, back);
            }
            this.spare.arrivals = arrivals;
            let mut grants = std::mem::take(&mut this.spare.grants);
            for (token, grant) in grants.drain(..) {
                this.granted(token, grant);
            }
            this.spare.grants = grants;
            let mut ready = std::mem::take(&mut this.spare.ready);
            for token in ready.drain(..) {
                this.woken(token);
            }
            this.spare.ready = ready;
        }
    }
}

impl HubLoop {
    /// Drives the entry a waker's token names, if it is still there.
    fn woken(&mut self, token: u64) {
        let (index, generation) = split_token(token);
        let Some(Some(entry)) = self.entries.get_mut(index) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        if token & CLIENT_READ != 0 {
            // The reactor took the client's read waker to wake it.
            entry.client_armed = false;
        }
        if token & SERVER_READ != 0
            && let Phase::Linked(l) = &mut entry.phase
        {
            // Likewise the server's; from an earlier link it is stale, and clearing does no harm.
            l.server_armed = false;
        }
        self.drive(index);
    }

    fn admit(&mut self, mut session: Box<Session>, back: oneshot::Sender<Back>) {
        session.client.adopt(self.reactor.as_ref());
        let index = self.free.pop().unwrap_or_else(|| {
            self.entries.push(None);
            self.entries.len() - 1
        });
        // Generations only need to differ from the slot's recent occupants; one counter for
        // all slots wraps after 4 billion admissions.
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let waker_for = |flag: u64| {
            Waker::from(Arc::new(TokenWaker {
                inbox: self.inbox.clone(),
                token: token(index, generation) | flag,
            }))
        };
        let (waker, client_waker, server_waker) = (waker_for(0), waker_for(CLIENT_READ), waker_for(SERVER_READ));
        session.info.stop.register(&waker);
        session.info.set_in_event_loop(true);
        self.entries[index] = Some(Entry {
            generation,
            session,
            back,
            phase: Phase::Unlinked,
            waker,
            client_waker,
            server_waker,
            timer: None,
            scheduled: None,
            client_armed: false,
        });
        self.drive(index);
    }

    fn granted(&mut self, token: u64, grant: Option<(Grant, Pool)>) {
        let (index, generation) = split_token(token);
        let waiting = match self.entries.get(index) {
            Some(Some(e)) if e.generation == generation => matches!(e.phase, Phase::Waiting { .. }),
            _ => false,
        };
        if !waiting {
            // The entry left while it waited (killed, shut down): the grant goes back, as the
            // pool counts it as lent.
            if let Some((grant, pool)) = grant {
                pool.return_grant(grant);
            }
            return;
        }
        let Some(Some(entry)) = self.entries.get_mut(index) else {
            return;
        };
        let Phase::Waiting {
            tag, started, wall_ms, ..
        } = entry.phase
        else {
            return;
        };
        entry.phase = Phase::Unlinked;
        let step = match grant {
            Some((grant, _)) => link(
                entry,
                Ask { tag, started, wall_ms },
                grant,
                self.clock,
                self.reactor.as_ref(),
                &mut self.spares,
            ),
            // acquire_timeout, or the pool closed: the task produces the error.
            None => Step::Back(Resume::Acquire { tag, started }),
        };
        match step {
            Step::Wait => self.drive(index),
            Step::Back(resume) => self.hand_back(index, resume),
        }
    }

    fn drive(&mut self, index: usize) {
        let Some(Some(entry)) = self.entries.get_mut(index) else {
            return;
        };
        let tok = token(index, entry.generation);
        let step = loop {
            match &entry.phase {
                Phase::Unlinked => match unlinked(
                    entry,
                    &self.sink,
                    tok,
                    &self.clock,
                    self.reactor.as_ref(),
                    &mut self.spares,
                ) {
                    Some(step) => break step,
                    None => continue,
                },
                Phase::Waiting { watch, .. } => {
                    // A kill or a shutdown reaches a waiting client now, not at acquire_timeout,
                    // and a watched client that hangs up stops waiting (and counting against
                    // max_client_conn) at once. A grant already on its way finds no waiting
                    // entry and is given back.
                    let resume = match entry.session.info.stop.raised_now(KILL | SHUTDOWN) {
                        0 if *watch == Watch::On => {
                            let mut cx = Context::from_waker(&entry.waker);
                            // The peek is a read: whatever it finds, a later read registers anew.
                            entry.client_armed = false;
                            match poll_hung_up(entry.session.client.sock(), &mut cx) {
                                Poll::Ready(true) => Resume::ClientLeft,
                                Poll::Ready(false) => {
                                    if let Phase::Waiting { watch, .. } = &mut entry.phase {
                                        *watch = Watch::Off;
                                    }
                                    break Step::Wait;
                                }
                                Poll::Pending => break Step::Wait,
                            }
                        }
                        0 => break Step::Wait,
                        bits => Resume::Stopped(bits),
                    };
                    entry.session.pool.forget_waits(Some((&self.sink, tok)));
                    entry.session.info.set_idle();
                    break Step::Back(resume);
                }
                Phase::Linked(_) => match pump(
                    entry,
                    &mut self.timers,
                    tok,
                    &self.clock,
                    self.reactor.as_ref(),
                    &mut self.spares,
                ) {
                    Some(step) => break step,
                    None => continue,
                },
            }
        };
        match step {
            Step::Back(resume) => self.hand_back(index, resume),
            Step::Wait => {
                if !self.watch_sweep
                    && matches!(
                        entry.phase,
                        Phase::Waiting {
                            watch: Watch::Later,
                            ..
                        }
                    )
                {
                    self.timers
                        .push(Reverse((self.clock.mono.saturating_add(WATCH_AFTER), SWEEP)));
                    self.watch_sweep = true;
                }
            }
        }
    }

    /// Starts watching the clients of sessions that have waited [`WATCH_AFTER`] for a server;
    /// schedules the next sweep while younger waits remain, [`SWEEP_EVERY`] from now at the
    /// soonest.
    fn sweep_waits(&mut self, mono: Mono) {
        // The waits began at tokio Instants (the pool times them); this runs a few times a
        // second at most.
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for index in 0..self.entries.len() {
            let Some(Some(entry)) = self.entries.get_mut(index) else {
                continue;
            };
            let Phase::Waiting { started, watch, .. } = &mut entry.phase else {
                continue;
            };
            if *watch != Watch::Later {
                continue;
            }
            let due = *started + WATCH_AFTER;
            if due <= now {
                *watch = Watch::On;
                self.drive(index);
            } else if next.is_none_or(|n| due < n) {
                next = Some(due);
            }
        }
        if let Some(at) = next {
            let at = mono.saturating_add(at.saturating_duration_since(now));
            self.timers
                .push(Reverse((at.max(mono.saturating_add(SWEEP_EVERY)), SWEEP)));
            self.watch_sweep = true;
        }
    }

    fn hand_back(&mut self, index: usize, resume: Resume) {
        let Some(entry) = self.entries.get_mut(index).and_then(Option::take) else {
            return;
        };
        self.free.push(index);
        entry.session.info.set_in_event_loop(false);
        // A task that is gone (runtime shutdown) drops the session, which closes it; a grant
        // on its way to it goes back, or its slot would stay counted as open.
        if let Err((session, Resume::Granted { grant, .. })) = entry.back.send((entry.session, resume)) {
            session.pool.return_grant(grant);
        }
    }

    /// Hands back linked entries whose deadline came. Returns true when it did anything.
    /// `now` is the round's clock reading, taken here if nobody has yet.
    fn poll_timers(&mut self, cx: &mut Context<'_>, now: &mut Option<Mono>) -> bool {
        let Some(&Reverse((at, _))) = self.timers.peek() else {
            return false;
        };
        let now = *now.get_or_insert_with(Mono::now);
        self.timers_read_at = now;
        match &mut self.sleep {
            Some(sleep) => {
                if self.sleep_at != Some(at) {
                    sleep.as_mut().reset(at.to_instant(Instant::now(), now));
                    self.sleep_at = Some(at);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return false;
                }
            }
            // The reactor's wait ends at the deadline.
            None if at > now => return false,
            None => {}
        }
        let mut sweep = false;
        while let Some(&Reverse((at, tok))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if tok == SWEEP {
                self.watch_sweep = false;
                sweep = true;
                continue;
            }
            let (index, generation) = split_token(tok);
            let due = match self.entries.get_mut(index) {
                Some(Some(e)) if e.generation == generation && e.scheduled == Some(at) => {
                    e.scheduled = None;
                    match e.timer {
                        Some(t) if t <= now => matches!(e.phase, Phase::Linked(_)),
                        Some(t) => {
                            // The deadline moved later meanwhile.
                            self.timers.push(Reverse((t, tok)));
                            e.scheduled = Some(t);
                            false
                        }
                        None => false,
                    }
                }
                _ => false,
            };
            if due {
                // The task's pump finds the deadline passed and acts on it.
                self.take_link_back(index);
            }
        }
        if sweep {
            self.sweep_waits(now);
        }
        self.sleep_at = None;
        true
    }

    fn take_link_back(&mut self, index: usize) {
        let Some(Some(entry)) = self.entries.get_mut(index) else {
            return;
        };
        if let Some(resume) = link_back(entry, None) {
            self.hand_back(index, resume);
        }
    }
}

/// Moves a linked entry's link into a [`Resume`] for its task.
fn link_back(entry: &mut Entry, outcome: Option<Result<Pumped, ClientError>>) -> Option<Resume> {
    match std::mem::replace(&mut entry.phase, Phase::Unlinked) {
        Phase::Linked(mut l) => Some(Resume::Link {
            link: {
                // The task reads the clock itself.
                l.link.clock = None;
                l.link
            },
            linked_at: l.linked_at,
            outcome,
        }),
        other => {
            entry.phase = other;
            None
        }
    }
}

/// [`poll_read_ready_armed`]; on a socket of the loop's own reactor, a watch that hands the
/// loop `token` at the next read event instead of a waker registration (no lock, no waker).
#[inline]
fn read_ready(
    sock: &Sock,
    reactor: Option<&Arc<Reactor>>,
    armed: &mut bool,
    cx: &mut Context<'_>,
    token: u64,
) -> Poll<std::io::Result<()>> {
    own_watch(sock, reactor, Dir::Read, token).unwrap_or_else(|| poll_read_ready_armed(sock, armed, cx))
}

/// `poll_write_ready`, or [`read_ready`]'s watch for writability.
#[inline]
fn write_ready(
    sock: &Sock,
    reactor: Option<&Arc<Reactor>>,
    cx: &mut Context<'_>,
    token: u64,
) -> Poll<std::io::Result<()>> {
    own_watch(sock, reactor, Dir::Write, token).unwrap_or_else(|| sock.poll_write_ready(cx))
}

/// On a socket of the loop's own reactor: Ready when it is ready in `dir`, else Pending with
/// `token` stored for the next event. None for any other socket.
#[inline]
fn own_watch(sock: &Sock, reactor: Option<&Arc<Reactor>>, dir: Dir, token: u64) -> Option<Poll<std::io::Result<()>>> {
    let own = reactor.and_then(|r| sock.own_on(r))?;
    Some(if own.watch(dir, token) {
        Poll::Ready(Ok(()))
    } else {
        Poll::Pending
    })
}

/// Reads what the client sent into the session's buffer. A read may clear the socket's read
/// readiness, so the entry's registered waker no longer counts as armed ([`Entry::client_armed`]).
#[inline]
fn read_client(s: &mut Session, armed: &mut bool) -> std::io::Result<usize> {
    s.reserve_for_client();
    *armed = false;
    try_read_drained(s.client.sock(), &mut s.buf)
}

/// An unlinked session: reads until its buffer holds a first message, then asks the pool.
/// None means "drive again" (the phase changed).
fn unlinked(
    entry: &mut Entry,
    sink: &Arc<dyn GrantSink>,
    tok: u64,
    clock: &Clock,
    reactor: Option<&Arc<Reactor>>,
    spares: &mut Spares,
) -> Option<Step> {
    let s = &mut *entry.session;
    if s.info.stop.raised_now(KILL | SHUTDOWN) != 0 {
        return Some(Step::Back(Resume::Unlinked));
    }
    let armed = &mut entry.client_armed;
    let mut cx = Context::from_waker(&entry.client_waker);
    let tag = loop {
        match frame_at(&s.buf, 0, s.max_message) {
            Ok(Some(frame)) => break frame.tag,
            Ok(None) => {}
            // The task reports it.
            Err(_) => return Some(Step::Back(Resume::Unlinked)),
        }
        if s.buf.is_empty() && !readable_now(s.client.sock()) {
            // Idle clients hold no read buffer: readiness first, a buffer after. Right after a
            // transaction the waker registered while it ran usually still waits, and the
            // buffer the transaction used goes back to the loop here (kept, it would be 16 KiB
            // per idle client, and the next query of each of thousands of clients would land
            // in a buffer of its own, cold, instead of in the one the last client gave back).
            match read_ready(s.client.sock(), reactor, armed, &mut cx, tok | CLIENT_READ) {
                Poll::Pending => {
                    spares.bufs.take_back(&s.ctx.buffers, &mut s.buf);
                    return Some(Step::Wait);
                }
                Poll::Ready(Err(_)) => return Some(Step::Back(Resume::Unlinked)),
                Poll::Ready(Ok(())) => {}
            }
        }
        if s.buf.capacity() == 0 {
            s.buf = spares.bufs.take(&s.ctx.buffers);
        }
        match read_client(s, armed) {
            // EOF or an error: the task ends the session.
            Ok(0) => return Some(Step::Back(Resume::Unlinked)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                spares.bufs.take_back(&s.ctx.buffers, &mut s.buf);
                match read_ready(s.client.sock(), reactor, armed, &mut cx, tok | CLIENT_READ) {
                    Poll::Pending => return Some(Step::Wait),
                    Poll::Ready(Err(_)) => return Some(Step::Back(Resume::Unlinked)),
                    Poll::Ready(Ok(())) => {}
                }
            }
            Err(_) => return Some(Step::Back(Resume::Unlinked)),
        }
    };
    if s.discard_until_sync || !plain_first_message(s, tag) {
        return Some(Step::Back(Resume::Unlinked));
    }
    let (started, wall_ms) = (clock.now, clock.wall_ms);
    s.info.set_waiting(wall_ms);
    let settings = s.settings.load();
    match s.pool.checkout_for_sink(started, settings, sink, tok) {
        Ok(None) => {
            entry.phase = Phase::Waiting {
                tag,
                started,
                wall_ms,
                watch: Watch::Later,
            };
            Some(Step::Wait)
        }
        Ok(Some(grant)) => match link(entry, Ask { tag, started, wall_ms }, grant, *clock, reactor, spares) {
            Step::Wait => None,
            back => Some(back),
        },
        // Closed: the task's own checkout gets the same answer and replies.
        Err(_) => Some(Step::Back(Resume::Acquire { tag, started })),
    }
}

/// True for a first message the loop serves itself; the rest (Terminate, stray Flush or COPY
/// messages, DEALLOCATE and named Parse/Close that pgweir may answer without a server) go to
/// the task, which knows what to do with them.
fn plain_first_message(s: &Session, tag: u8) -> bool {
    match tag {
        frontend::QUERY => {
            let Ok(Some(frame)) = frame_at(&s.buf, 0, s.max_message) else {
                return false;
            };
            classify_query(&s.buf[HEADER_LEN..frame.total_len]).is_none()
        }
        frontend::PARSE => s.buf.get(HEADER_LEN) == Some(&0),
        frontend::TERMINATE
        | frontend::FLUSH
        | frontend::COPY_DATA
        | frontend::COPY_DONE
        | frontend::COPY_FAIL
        | frontend::CLOSE => false,
        _ => true,
    }
}

/// What a session asked the pool for: a server for its first message (tag `tag`), since
/// `started` (`wall_ms` on the wall clock).
struct Ask {
    tag: u8,
    started: Instant,
    wall_ms: u64,
}

/// Links a granted server to the entry's session when that needs nothing asynchronous: an idle,
/// plain-TCP connection that passes the cheap checks and already has the client's parameters.
/// Returns Wait when linked (the caller drives on).
fn link(
    entry: &mut Entry,
    Ask { tag, started, wall_ms }: Ask,
    grant: Grant,
    clock: Clock,
    reactor: Option<&Arc<Reactor>>,
    spares: &mut Spares,
) -> Step {
    let s = &mut *entry.session;
    let Grant::Conn(mut conn) = grant else {
        return Step::Back(Resume::Granted { tag, started, grant });
    };
    let settings = s.settings.load();
    let max_prepared = settings.max_prepared_statements;
    // A kill that came in the same round as the grant: the task releases the server unused.
    if conn.stream.is_tls()
        || !Pool::usable_now(&mut conn, settings, clock.mono)
        || !s.params_satisfied(&conn)
        || s.info.stop.raised_now(KILL) != 0
    {
        return Step::Back(Resume::Granted {
            tag,
            started,
            grant: Grant::Conn(conn),
        });
    }
    conn.stream.adopt(reactor);
    let server = s.pool.lend(conn);
    let waited = clock.now.saturating_duration_since(started);
    s.pool.stats().acquire_wait.observe(waited);
    s.info
        .set_linked(server.conn_ref().backend_pid(), wall_ms + waited.as_millis() as u64);
    let mut link = match spares.take_link() {
        Some(mut spare) => {
            s.restart_link(&mut spare, server, clock.mono);
            spare
        }
        None => Box::new(s.start_link(server, clock.mono, LinkSpares::default())),
    };
    link.capture_queries = s.query_text_bytes > 0;
    entry.phase = Phase::Linked(Linked {
        link,
        linked_at: clock.mono,
        was_idle_in_tx: false,
        max_prepared,
        server_armed: false,
        framed: None,
    });
    Step::Wait
}

/// [`Session::pump`] without a task: frames what arrived, writes what it can, reads what is
/// there, and registers the session's waker for whatever it must wait for. None means "drive
/// again" (the phase changed).
fn pump(
    entry: &mut Entry,
    timers: &mut BinaryHeap<Reverse<(Mono, u64)>>,
    tok: u64,
    clock: &Clock,
    reactor: Option<&Arc<Reactor>>,
    spares: &mut Spares,
) -> Option<Step> {
    let now = clock.mono;
    let s = &mut *entry.session;
    let Phase::Linked(l) = &mut entry.phase else {
        return None;
    };
    let mut cx = Context::from_waker(&entry.waker);
    loop {
        let mut stop = s.info.stop.raised_now(KILL | SHUTDOWN);
        if stop == SHUTDOWN {
            // A shutdown lets the transaction finish, but its raise took the registration made
            // at admission: register again so an operator's kill during the grace period still
            // reaches this session (then look again, for a kill raised in between).
            s.info.stop.register(&entry.waker);
            stop = s.info.stop.raised_now(KILL);
        }
        if stop & KILL != 0 {
            return link_back(entry, None).map(Step::Back);
        }
        let link = &mut l.link;
        link.clock = Some(now);
        // Every pass that does not end in a wait leaves `framed` empty: the next one frames.
        let (c_pending, s_pending) = match l.framed.take() {
            Some(framed) => framed,
            None => {
                let (c_pending, s_pending) = match s.frame_link(link, l.max_prepared) {
                    Ok(Framed::ClientGone) => {
                        return link_back(entry, Some(Ok(Pumped::ClientGone))).map(Step::Back);
                    }
                    Ok(Framed::Idle) => return release(entry, now, spares),
                    Ok(Framed::Pending { to_server, to_client }) => (to_server, to_client),
                    Err(e) => return link_back(entry, Some(Err(e))).map(Step::Back),
                };
                match s.try_write_pending(link, c_pending, s_pending) {
                    Wrote::Progress => continue,
                    Wrote::Blocked => {}
                    Wrote::ServerFailed(e) => {
                        return link_back(entry, Some(Err(ClientError::ServerIo(e)))).map(Step::Back);
                    }
                    Wrote::ClientGone => return link_back(entry, Some(Ok(Pumped::ClientGone))).map(Step::Back),
                }
                // Which timeout it is the task works out again when the timer hands the
                // session back.
                let deadline = s
                    .link_deadline(link, c_pending || s_pending, &mut l.was_idle_in_tx, || clock.wall_ms)
                    .map(|(at, _)| at);
                entry.timer = deadline;
                if let Some(at) = deadline
                    && entry.scheduled.is_none_or(|s| at < s)
                {
                    timers.push(Reverse((at, tok)));
                    entry.scheduled = Some(at);
                }
                (c_pending, s_pending)
            }
        };

        // Server direction: what was framed for the client goes out first; then more is read.
        let conn = link.server.conn();
        if s_pending {
            if let Poll::Ready(r) = write_ready(s.client.sock(), reactor, &mut cx, tok) {
                if r.is_err() {
                    return link_back(entry, Some(Ok(Pumped::ClientGone))).map(Step::Back);
                }
                continue;
            }
        } else {
            // Readiness first: right after a query went out, the reply is not there yet, and
            // the reactor knows it without a read attempt.
            if readable_now(conn.stream.sock()) {
                reserve_for_server(&mut conn.buf);
                l.server_armed = false;
                match try_read_drained(conn.stream.sock(), &mut conn.buf) {
                    Ok(0) => return link_back(entry, None).map(Step::Back),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    // The task's read meets the same end and reports it.
                    Err(_) => return link_back(entry, None).map(Step::Back),
                }
            }
            let mut server_cx = Context::from_waker(&entry.server_waker);
            match read_ready(
                conn.stream.sock(),
                reactor,
                &mut l.server_armed,
                &mut server_cx,
                tok | SERVER_READ,
            ) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return link_back(entry, None).map(Step::Back),
            }
        }
        // Client direction: what was framed for the server goes out first; then more is read.
        if c_pending {
            if write_ready(conn.stream.sock(), reactor, &mut cx, tok).is_ready() {
                continue;
            }
        } else if !link.terminated {
            if readable_now(s.client.sock()) {
                match read_client(s, &mut entry.client_armed) {
                    Ok(0) => return link_back(entry, Some(Ok(Pumped::ClientGone))).map(Step::Back),
                    Ok(_) => {
                        s.last_activity = now;
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return link_back(entry, Some(Ok(Pumped::ClientGone))).map(Step::Back),
                }
            }
            // Bytes the client sends while its transaction runs (the next pipelined message, a
            // COPY chunk) or its hang-up must drive the session.
            let mut client_cx = Context::from_waker(&entry.client_waker);
            match read_ready(
                s.client.sock(),
                reactor,
                &mut entry.client_armed,
                &mut client_cx,
                tok | CLIENT_READ,
            ) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return link_back(entry, Some(Ok(Pumped::ClientGone))).map(Step::Back),
            }
        }
        l.framed = Some((c_pending, s_pending));
        return Some(Step::Wait);
    }
}

/// The transaction is over: the server goes back to the pool (and so, by a function call, to
/// the next waiting session) unless it needs a reset or a cancel may be racing it, which the
/// task handles.
fn release(entry: &mut Entry, now: Mono, spares: &mut Spares) -> Option<Step> {
    let s = &mut *entry.session;
    let Phase::Linked(l) = &mut entry.phase else {
        return None;
    };
    let needs_reset = match s.settings.load().session_state {
        SessionStatePolicy::Reset => l.link.dirty.is_some(),
        SessionStatePolicy::ResetAlways => true,
        SessionStatePolicy::Allow | SessionStatePolicy::Reject => false,
    };
    // The task path closes a server an unconfirmed cancel aimed at (rare: PostgreSQL slow or
    // unreachable for the cancel).
    if needs_reset || !s.login.slot.clear_target() || s.login.slot.unsettled() {
        return link_back(entry, Some(Ok(Pumped::Idle))).map(Step::Back);
    }
    s.fold_link_stats(&l.link, l.linked_at, now);
    s.info.set_idle();
    l.link.server.release_in_place(now);
    if let Phase::Linked(l) = std::mem::replace(&mut entry.phase, Phase::Unlinked) {
        // Its reply queues are empty: the server answered everything.
        spares.keep_link(l.link);
    }
    entry.timer = None;
    if s.info.stop.raised_now(SHUTDOWN) != 0 {
        return Some(Step::Back(Resume::Stopped(SHUTDOWN)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop that is gone refuses a grant, which then goes to the pool's next waiter: handing
    /// it back to the pool from inside the grant took the pool's lock a second time on the
    /// thread that held it, and that thread never came back.
    #[tokio::test(flavor = "current_thread")]
    async fn a_grant_for_a_loop_that_is_gone_goes_to_the_next_waiter() {
        let pool = crate::pool::tests::unconnected_pool("d", "u");
        let settings = pool.settings().as_ref().clone();
        let started = tokio::time::Instant::now();
        let (gone, live) = (Arc::new(Inbox::default()), Arc::new(Inbox::default()));
        gone.lock().closed = true;
        let (gone_sink, live_sink): (Arc<dyn GrantSink>, Arc<dyn GrantSink>) = (gone.clone(), live.clone());
        let mut held: Vec<Grant> = (0..settings.pool_size)
            .map(|_| {
                pool.checkout_for_sink(started, &settings, &live_sink, 1)
                    .expect("open")
                    .expect("a free slot")
            })
            .collect();
        assert!(
            pool.checkout_for_sink(started, &settings, &gone_sink, 2)
                .expect("queued")
                .is_none()
        );
        assert!(
            pool.checkout_for_sink(started, &settings, &live_sink, 3)
                .expect("queued")
                .is_none()
        );
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (returning, grant) = (pool.clone(), held.pop().expect("a grant"));
        std::thread::spawn(move || {
            returning.return_grant(grant);
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("giving a grant back must not deadlock on the pool's lock");
        let grants: Vec<u64> = live.lock().grants.iter().map(|(token, _)| *token).collect();
        assert_eq!(grants, vec![3], "the next waiter gets the refused grant");
        assert!(gone.lock().grants.is_empty());
        for (_, grant) in std::mem::take(&mut live.lock().grants) {
            if let Some((grant, pool)) = grant {
                pool.return_grant(grant);
            }
        }
        for grant in held {
            pool.return_grant(grant);
        }
    }

    /// The guard at the top of [`HubLoop::poll`]: with the budget spent it must hand the
    /// thread back (woken again) and leave queued work for the next poll, not drive it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_loop_whose_coop_budget_is_spent_yields_and_keeps_its_inbox() {
        let inbox = Arc::new(Inbox::default());
        let mut hub = HubLoop::new(inbox.clone(), None);
        // A token of no entry: driving it would just drop it.
        inbox.push(|st| st.ready.push(token(3, 1)));
        std::future::poll_fn(|cx| {
            while tokio::task::coop::has_budget_remaining() {
                if let Poll::Ready(progress) = tokio::task::coop::poll_proceed(cx) {
                    progress.made_progress();
                }
            }
            assert!(Pin::new(&mut hub).poll(cx).is_pending());
            assert!(!inbox.lock().is_empty(), "the queued token waits for the next poll");
            Poll::Ready(())
        })
        .await;
        // Polled again with a fresh budget (the task's next poll), the loop drains its inbox.
        tokio::task::yield_now().await;
        std::future::poll_fn(|cx| {
            assert!(Pin::new(&mut hub).poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert!(inbox.lock().is_empty());
    }

    #[test]
    fn client_and_server_read_tokens_name_the_same_entry() {
        for (index, generation) in [(0, 1), (7, u32::MAX), ((1 << 30) - 1, 42)] {
            let plain = token(index, generation);
            assert_eq!(split_token(plain), (index, generation));
            assert_eq!(split_token(plain | CLIENT_READ), (index, generation));
            assert_eq!(split_token(plain | SERVER_READ), (index, generation));
            assert_eq!(
                plain & (CLIENT_READ | SERVER_READ),
                0,
                "an index never reaches the flag bits"
            );
        }
    }
}
