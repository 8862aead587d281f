//! The transaction loop. Unlinked, the session owns only its client socket and waits for the
//! client's next message. On the first message of a transaction it checks out a server,
//! brings the server's session parameters in line with the client's, and links: bytes then flow
//! both ways, framed by header only and forwarded verbatim, while a few tags are counted to know
//! when the server is idle again.
//!
//! Release rule (transaction mode): the server goes back to the pool only when
//! - every Query/Sync/FunctionCall sent has been answered by its ReadyForQuery (pipelining),
//! - no extended-protocol message is waiting for a Sync,
//! - the last ReadyForQuery said 'I' and no COPY is in progress,
//! - every byte has been forwarded both ways.
//!
//! Reads and writes of both sockets are multiplexed in one hand-polled wait (a plain socket
//! read only once the reactor has seen it readable, as the event loop reads), and a direction
//! is only read when its previous bytes are written: a peer that writes a lot while the other
//! side is slow gets TCP backpressure instead of growing our buffers, and neither side can
//! deadlock the other.

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use std::sync::Arc;

use super::handshake::{LoggedIn, send_error};
use super::hygiene::StateChange;
use super::link::{ClientSide, ClientStatements, Link, LinkSpares};
use super::prepared::{StatementCommand, classify_query};
use super::registry::{ClientInfo, KILL, REMOVED, SHUTDOWN};
use super::{ClientContext, ClientError};
use crate::clock::Mono;
use crate::config::{PoolMode, SessionStatePolicy};
use crate::net::Stream;
use crate::net::stream::ReadArm;
use crate::pool::{Checkout, Grant, Pool, PoolError, PooledServer, SettingsCache};
use crate::proto::frame::HEADER_LEN;
use crate::proto::messages::{self, PgError, Severity};
use crate::proto::tag::{TransactionStatus, frontend};
use crate::proto::{FrameError, ProtocolError, frame_at};
use crate::server::params::{self, ParamSet};
use crate::server::{ServerError, send_cancel};

/// Read granularity. Small enough that an idle client costs little, large enough that a result
/// set arrives in few syscalls.
mod hub;

pub(crate) use hub::Hub;

pub(super) const READ_CHUNK: usize = 16 * 1024;

struct Session {
    ctx: Arc<ClientContext>,
    client: Stream,
    buf: BytesMut,
    pool: Pool,
    /// `pool`'s settings, following reloads.
    settings: SettingsCache,
    /// Copied on write (`Arc::make_mut`): shared with the pool's login template until the
    /// client changes a value.
    params: Arc<ParamSet>,
    /// The tracked parameters the client sent at login, which a RESET brings back; taken when
    /// a report first changes one of them (until then `params` holds them, and an idle client
    /// pays for no copy).
    reset_to: Option<Box<ParamSet>>,
    /// `params.form()` and the generation it was computed at.
    params_form: (u64, std::sync::Arc<[u8]>),
    /// Fixed for the connection: a session-mode client may rely on session state that a
    /// switch to transaction mode after a reload would silently drop.
    mode: PoolMode,
    max_message: usize,
    /// Refreshed from `settings` at the start of every link and, in session mode, whenever the
    /// server is idle, so a reload reaches connected clients.
    idle_tx_timeout: Option<Duration>,
    query_timeout: Option<Duration>,
    /// After an error pgweir generated for an extended-protocol message, the rest of the
    /// client's messages up to Sync are dropped, as PostgreSQL itself does.
    discard_until_sync: bool,
    login: LoggedInKeys,
    /// The client's named prepared statements (see `prepared`).
    statements: ClientStatements,
    /// When the client last sent anything, for idle_transaction_timeout.
    last_activity: Mono,
    /// This client's entry in the admin registry.
    info: Arc<ClientInfo>,
    /// How much query text to keep for the admin API; 0 keeps none.
    query_text_bytes: usize,
    /// Buffers of the last link, reused by the next.
    spares: LinkSpares,
    /// Between transactions the session is handed to the event loop (`hub`).
    hub_eligible: bool,
    /// Transactions (links) this session's task has ended, up to [`HUB_AFTER_LINKS`].
    task_links: u8,
    /// When the session has been connected for `listen.event_loop_after` (as it was at the start).
    hub_from: Mono,
    /// Which of the event loops.
    hub_index: usize,
    /// ParameterStatus messages the client is owed (a server reported a value in another
    /// spelling than the client was told); they go out ahead of its next reply.
    status_for_client: BytesMut,
    /// The task pump's read registrations on the server and the client socket, made at its
    /// first wait and kept while the task's waker stays the same; dropped when the session
    /// enters the event loop, which has its own. Boxed: a session idle in the loop keeps only
    /// the pointer's room.
    pump_reads: Option<Box<PumpReads>>,
}

struct PumpReads {
    server: ReadArm,
    client: ReadArm,
}

impl PumpReads {
    fn new(task: &std::task::Waker) -> Box<PumpReads> {
        Box::new(PumpReads {
            server: ReadArm::new(task),
            client: ReadArm::new(task),
        })
    }
}

struct LoggedInKeys {
    key: crate::proto::startup::CancelKey,
    slot: std::sync::Arc<super::cancel::CancelSlot>,
}

/// Where a session continues after the event loop (`hub`) handed it back to its task.
enum Resume {
    /// Wait for (or handle) the client's next message.
    Unlinked,
    /// Check out a server for the first message in the buffer (tag `tag`), as if asked at
    /// `started`.
    Acquire { tag: u8, started: Instant },
    /// The pool granted something that needs a task (a connect, a health check, session
    /// parameters to apply).
    Granted { tag: u8, started: Instant, grant: Grant },
    /// Killed or shut down (the raised stop bits): tell the client and end the session.
    Stopped(u8),
    /// The client closed its connection while it waited for a server: end the session.
    ClientLeft,
    /// Carry on with a link: pump it (`outcome` None) or end it with `outcome`.
    Link {
        link: Box<Link>,
        linked_at: Mono,
        outcome: Option<Result<Pumped, ClientError>>,
    },
}

/// Resolves when the client has closed its connection (or it failed); pends for good once the
/// client has sent more bytes, which stay in the socket for the next read.
async fn client_left(tcp: &crate::net::Sock) {
    if !std::future::poll_fn(|cx| crate::net::stream::poll_hung_up(tcp, cx)).await {
        std::future::pending::<()>().await;
    }
}

/// Why [`Session::acquire`] got no server.
enum NoServer {
    /// Tell the client (the session goes on unless the error is FATAL).
    Reply(PgError),
    /// Killed or shut down (the raised stop bits) while waiting.
    Stopped(u8),
    /// The client closed its connection while waiting.
    ClientLeft,
}

/// How [`Session::serve`] stopped.
enum Served {
    /// The session is over.
    Done,
    /// The client is idle between transactions and the event loop can serve it.
    ToHub,
}

/// How a linked phase ended.
enum Unlinked {
    /// Server released; keep serving the client.
    Continue,
    /// The client left (Terminate or EOF); the server was handled.
    ClientGone,
}

pub(super) async fn run(login: LoggedIn, ctx: Arc<ClientContext>, info: Arc<ClientInfo>) -> Result<(), ClientError> {
    let LoggedIn {
        client,
        pool,
        params,
        form,
        key,
        slot,
        pending,
        ..
    } = login;
    let settings = pool.settings().clone();
    let started = Mono::now();
    let (max_message, query_text_bytes, hub_from) = {
        let config = ctx.config.load();
        (
            config.listen.max_message_size,
            config.admin.query_text_bytes,
            started.saturating_add(config.listen.event_loop_after),
        )
    };
    let hub = ctx
        .hub
        .clone()
        .filter(|_| settings.mode == PoolMode::Transaction && !client.is_tls());
    // Idle clients hold no read buffer; one that sent its first query with its login has it
    // in one, from the pool like any other.
    let buf = match pending.is_empty() {
        true => BytesMut::new(),
        false => {
            let mut buf = ctx.buffers.take();
            buf.extend_from_slice(&pending);
            buf
        }
    };
    let mut session = Box::new(Session {
        ctx: ctx.clone(),
        client,
        buf,
        mode: settings.mode,
        settings: pool.settings_cache(),
        pool,
        params_form: (params.generation(), form),
        reset_to: None,
        params,
        max_message,
        idle_tx_timeout: settings.idle_transaction_timeout,
        query_timeout: settings.query_timeout,
        discard_until_sync: false,
        login: LoggedInKeys { key, slot },
        statements: ClientStatements::new(),
        last_activity: started,
        info,
        query_text_bytes,
        spares: LinkSpares::default(),
        hub_eligible: hub.is_some(),
        task_links: 0,
        hub_from,
        hub_index: hub.as_ref().map_or(0, Hub::assign),
        status_for_client: BytesMut::new(),
        pump_reads: None,
    });
    let key = session.login.key;
    let mut resume = Resume::Unlinked;
    let result = loop {
        match session.serve(resume).await {
            Ok(Served::Done) => break Ok(()),
            Ok(Served::ToHub) => {
                let Some(hub) = &hub else {
                    unreachable!("only hub-eligible sessions are handed over")
                };
                session.pump_reads = None;
                match hub.enter(session).await {
                    Some((back, next)) => {
                        session = back;
                        resume = next;
                    }
                    // The event loop ended (the runtime is shutting down) and took the session.
                    None => break Err(ClientError::Shutdown),
                }
            }
            Err(e) => break Err(e),
        }
    };
    ctx.cancels.unregister(key);
    result
}

/// A session waits in the event loop no sooner than after this many transactions on its task
/// (and `listen.event_loop_after` after it connected): a client that runs one transaction per
/// connection never crosses to the loop's thread, however long it stays connected.
const HUB_AFTER_LINKS: u8 = 2;

impl Drop for Session {
    fn drop(&mut self) {
        // A client that leaves right after its query (a connection per transaction) would
        // otherwise free its read buffer and the next login allocate one afresh.
        if self.buf.capacity() > 0 {
            // Whatever it still holds (a Terminate, say) is no longer anyone's.
            self.buf.clear();
            self.ctx.buffers.give(std::mem::take(&mut self.buf));
        }
        self.ctx.link_spares.give(std::mem::take(&mut self.spares));
    }
}

impl Session {
    async fn serve(&mut self, resume: Resume) -> Result<Served, ClientError> {
        let mut resume = Some(resume);
        loop {
            // What to link: the first message's tag, and from an event loop, when it began
            // asking and what the pool granted it.
            let (tag, started, grant) = match resume.take() {
                None | Some(Resume::Unlinked) => {
                    // Unlinked: wait for a complete first message of the next transaction.
                    let tag = match self.next_unlinked_message().await? {
                        Next::Message(tag) => tag,
                        Next::Eof => return Ok(Served::Done),
                        Next::ToHub => return Ok(Served::ToHub),
                    };
                    if self.discard_until_sync {
                        self.discard_first_message(tag).await?;
                        continue;
                    }
                    match tag {
                        frontend::TERMINATE => return Ok(Served::Done),
                        // Nothing to do for these outside a transaction; PostgreSQL ignores them too.
                        frontend::FLUSH | frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => {
                            self.consume_first_message();
                            continue;
                        }
                        frontend::QUERY if self.answer_statement_command().await? => continue,
                        frontend::PARSE | frontend::CLOSE if self.answer_statement_batch().await? => continue,
                        _ => {}
                    }
                    (tag, None, None)
                }
                Some(Resume::Stopped(bits)) => return Err(self.stopped(bits).await),
                Some(Resume::ClientLeft) => return Ok(Served::Done),
                Some(Resume::Acquire { tag, started }) => (tag, Some(started), None),
                Some(Resume::Granted { tag, started, grant }) => (tag, Some(started), Some(grant)),
                Some(Resume::Link {
                    mut link,
                    linked_at,
                    outcome,
                }) => {
                    let outcome = match outcome {
                        Some(o) => o,
                        None => self.pump(&mut link).await,
                    };
                    if let Unlinked::ClientGone = self.end_link(&mut link, linked_at, outcome).await? {
                        return Ok(Served::Done);
                    }
                    if self.info.stop.raised_now(SHUTDOWN) != 0 {
                        return Err(self.shutting_down().await);
                    }
                    continue;
                }
            };
            // Get a server; a client that cannot get one is told why and stays connected.
            let (server, linked_at) = match self.acquire(started, grant).await {
                Ok(acquired) => acquired,
                Err(NoServer::Stopped(bits)) => return Err(self.stopped(bits).await),
                Err(NoServer::ClientLeft) => return Ok(Served::Done),
                Err(NoServer::Reply(reply)) => {
                    self.reply_error_for_first_message(tag, reply).await?;
                    continue;
                }
            };
            if let Unlinked::ClientGone = self.linked(server, linked_at).await? {
                return Ok(Served::Done);
            }
            if self.info.stop.raised_now(SHUTDOWN) != 0 {
                return Err(self.shutting_down().await);
            }
        }
    }

    /// Waits until the client buffer starts with a complete message (or the header of a
    /// CopyData, which is streamed) and returns its tag; or reports a clean EOF, or that the
    /// wait is the event loop's.
    async fn next_unlinked_message(&mut self) -> Result<Next, ClientError> {
        loop {
            match frame_at(&self.buf, 0, self.max_message) {
                Ok(Some(frame)) => return Ok(Next::Message(frame.tag)),
                Ok(None) => {}
                Err(e) => return Err(self.client_protocol_error(e).await),
            }
            if self.buf.is_empty() && self.client.is_tls() && self.client.waits_on_socket() {
                // An idle TLS client holds no read buffer either (16 KiB each, most of what it
                // costs): try once, then wait for the socket without one.
                self.reserve_for_client();
                match self.client.try_read_once(&mut self.buf) {
                    Ok(0) => return Ok(Next::Eof),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(ClientError::ClientIo(e)),
                }
                self.ctx.buffers.give(std::mem::take(&mut self.buf));
                self.wait_client_readable().await?;
                continue;
            }
            if self.buf.is_empty() && !self.client.is_tls() {
                // Idle clients hold no read buffer: wait for readability first, allocate after.
                // A busy client's next message is often already here, so try once first, when
                // the reactor has seen the socket readable since the last read: otherwise the
                // try finds nothing, and a buffer would be taken and given back for it (a
                // session's start after its login's last read, its wait after a reply).
                // (Not over TLS: socket readiness says nothing about bytes rustls holds.)
                if crate::net::stream::readable_now(self.client.sock()) {
                    self.reserve_for_client();
                    match crate::net::stream::try_read_drained(self.client.sock(), &mut self.buf) {
                        Ok(0) => return Ok(Next::Eof),
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(ClientError::ClientIo(e)),
                    }
                    self.ctx.buffers.give(std::mem::take(&mut self.buf));
                }
                if self.hub_eligible
                    // The loop runs on a thread of its own: entering it, and coming back for the
                    // Terminate, crosses between threads twice (an eventfd write and a wake-up
                    // each way), which a short-lived client would never earn back. The last
                    // link's start stands for now: no clock read per wait.
                    && self.task_links >= HUB_AFTER_LINKS
                    && self.last_activity >= self.hub_from
                    && !self.discard_until_sync
                    && self.info.stop.raised_now(KILL | SHUTDOWN) == 0
                {
                    return Ok(Next::ToHub);
                }
                // Idle on its task, it holds no read buffer either, not even the one its last
                // transaction read into: empty, that still keeps the pages the transaction
                // touched resident (8.3 against 3.9 KiB per idle client).
                if self.buf.capacity() > 0 {
                    self.ctx.buffers.give(std::mem::take(&mut self.buf));
                }
                self.wait_client_readable().await?;
            }
            self.reserve_for_client();
            // A TLS client waits here between transactions, and any client that stopped part-way
            // through a message waits here for the rest: shutdown and kill must still reach
            // them. A plain socket's read either took bytes or did not, and rustls keeps partial
            // records itself, so dropping the read is safe.
            let read = tokio::select! {
                biased;
                bits = self.info.stop.raised(KILL | SHUTDOWN) => return Err(self.stopped(bits).await),
                r = self.client.read_buf(&mut self.buf) => r,
            };
            match read {
                Ok(0) => return Ok(Next::Eof),
                Ok(_) => {}
                Err(e) => return Err(ClientError::ClientIo(e)),
            }
        }
    }

    /// Waits, without a read buffer, until the client's socket is readable, or for a kill or
    /// shutdown, which comes first however busy the client (and no random pick per wait).
    async fn wait_client_readable(&mut self) -> Result<(), ClientError> {
        tokio::select! {
            biased;
            bits = self.info.stop.raised(KILL | SHUTDOWN) => Err(self.stopped(bits).await),
            // The socket's one read-waker slot (this task is its only reader), not tokio's
            // `readable()`, whose waiter-list node is linked and unlinked under the socket's
            // lock at every wait.
            r = std::future::poll_fn(|cx| self.client.sock().poll_read_ready(cx)) => r.map_err(ClientError::ClientIo),
        }
    }

    async fn stopped(&mut self, bits: u8) -> ClientError {
        if bits & KILL != 0 {
            self.killed(None).await
        } else {
            self.shutting_down().await
        }
    }

    /// Told at the end of a transaction, or at once when not in one: pgweir is shutting down,
    /// or a reload removed this client's database.
    async fn shutting_down(&mut self) -> ClientError {
        if self.info.stop.raised_now(REMOVED) != 0 {
            let database = &self.pool.key().database;
            let e = PgError::fatal(
                "57P01",
                format!("pgweir: database \"{database}\" was removed from the configuration"),
            )
            .with_hint(format!(
                "An operator removed [databases.{database}] from the pgweir configuration and reloaded it; \
                 connect to a database it still serves."
            ));
            let _ = send_error(&mut self.client, &e).await;
            return ClientError::DatabaseRemoved;
        }
        let e = PgError::fatal("57P01", "pgweir is shutting down; reconnect to continue");
        let _ = send_error(&mut self.client, &e).await;
        ClientError::Shutdown
    }

    fn reserve_for_client(&mut self) {
        let want = crate::proto::frame::needed_len(&self.buf, 0, self.max_message)
            .map(|n| n.saturating_sub(self.buf.len()))
            .unwrap_or(0)
            .clamp(4096, READ_CHUNK * 64);
        if self.buf.capacity() == 0 {
            self.buf = self.ctx.buffers.take();
        }
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want.max(READ_CHUNK));
        }
    }

    async fn client_protocol_error(&mut self, e: FrameError) -> ClientError {
        let _ = send_error(&mut self.client, &client_protocol_reply(&e)).await;
        ClientError::ClientProtocol(ProtocolError::Frame(e))
    }

    /// A message pgweir cannot read, from either side, while a server is linked: the client is
    /// told (when at a message boundary) before the session ends, as it is outside a link; the
    /// caller cancels and closes the server.
    async fn link_protocol_error(&mut self, link: &Link, e: ClientError) -> ClientError {
        let reply = match &e {
            ClientError::ClientProtocol(pe) => client_protocol_reply(pe),
            ClientError::Server(ServerError::Protocol(pe)) => PgError::fatal(
                "08P01",
                format!("pgweir: invalid message from the server: {pe}; its connection was closed"),
            )
            .with_hint(
                "If a statement was running, whether it took effect is unknown: check before running a write again.",
            ),
            _ => return e,
        };
        self.last_word(Some(link), &reply).await;
        e
    }

    fn consume_first_message(&mut self) {
        if let Ok(Some(frame)) = frame_at(&self.buf, 0, self.max_message) {
            self.buf.advance(frame.total_len);
        }
    }

    /// Drops one message while in discard-until-Sync mode; at the Sync, answers ReadyForQuery.
    async fn discard_first_message(&mut self, tag: u8) -> Result<(), ClientError> {
        self.consume_first_message();
        match tag {
            frontend::SYNC => {
                self.discard_until_sync = false;
                self.send_ready_for_query().await
            }
            frontend::TERMINATE => Err(ClientError::ClientIo(std::io::ErrorKind::ConnectionAborted.into())),
            _ => Ok(()),
        }
    }

    /// `DEALLOCATE` of the client's own statements needs no server outside a transaction: the
    /// statements live in pgweir's table. Returns true when the query was answered here.
    async fn answer_statement_command(&mut self) -> Result<bool, ClientError> {
        let Ok(Some(frame)) = frame_at(&self.buf, 0, self.max_message) else {
            return Ok(false);
        };
        let tag = match classify_query(&self.buf[HEADER_LEN..frame.total_len]) {
            Some(StatementCommand::DeallocateAll) => {
                self.statements.clear();
                "DEALLOCATE ALL"
            }
            Some(StatementCommand::Deallocate(name)) if self.statements.remove(name.as_bytes()).is_some() => {
                "DEALLOCATE"
            }
            _ => return Ok(false),
        };
        self.buf.advance(frame.total_len);
        let mut out = BytesMut::with_capacity(32);
        messages::command_complete(&mut out, tag);
        messages::ready_for_query(&mut out, TransactionStatus::Idle);
        self.client.write_all(&out).await.map_err(ClientError::ClientIo)?;
        Ok(true)
    }

    /// Outside a transaction, a batch made only of Parse (of statements some server already
    /// accepted), Close of statements, and a final Sync touches nothing but pgweir's statement
    /// table, so it is answered without a server. Besides saving a round trip, this keeps a
    /// single-threaded client that prepares synchronously (libpq's PQprepare, as pgbench
    /// -M prepared does) from waiting for a server that its own other connections hold.
    /// Returns true when the batch was answered here.
    async fn answer_statement_batch(&mut self) -> Result<bool, ClientError> {
        let mut pos = 0;
        let mut replies = BytesMut::new();
        let mut adds: Vec<(bytes::Bytes, std::sync::Arc<super::prepared::Statement>)> = Vec::new();
        let mut removes: Vec<bytes::Bytes> = Vec::new();
        loop {
            let Ok(Some(frame)) = frame_at(&self.buf, pos, self.max_message) else {
                return Ok(false);
            };
            let body = &self.buf[pos + HEADER_LEN..pos + frame.total_len];
            match frame.tag {
                frontend::PARSE => {
                    let Some((name, payload)) = super::prepared::split_cstr(body) else {
                        return Ok(false);
                    };
                    if name.is_empty()
                        || (self.statements.contains_key(name) && !removes.iter().any(|r| r == name))
                        || adds.iter().any(|(n, _)| n == name)
                    {
                        return Ok(false);
                    }
                    let context = params::parse_context(&self.params);
                    let Some(stmt) = self.ctx.statements.lookup(&context, payload) else {
                        return Ok(false);
                    };
                    if !stmt.validated.load(std::sync::atomic::Ordering::Relaxed)
                        || (stmt.state_change.is_some()
                            && self.settings.load().session_state == SessionStatePolicy::Reject)
                    {
                        return Ok(false);
                    }
                    adds.push((bytes::Bytes::copy_from_slice(name), stmt));
                    replies.extend_from_slice(b"1\0\0\0\x04");
                }
                frontend::CLOSE if body.first() == Some(&b'S') => {
                    let Some((name, _)) = super::prepared::split_cstr(&body[1..]) else {
                        return Ok(false);
                    };
                    if name.is_empty() || adds.iter().any(|(n, _)| n == name) {
                        return Ok(false);
                    }
                    removes.push(bytes::Bytes::copy_from_slice(name));
                    replies.extend_from_slice(b"3\0\0\0\x04");
                }
                frontend::SYNC => {
                    pos += frame.total_len;
                    break;
                }
                _ => return Ok(false),
            }
            pos += frame.total_len;
        }
        for name in removes {
            self.statements.remove(&name);
        }
        for (name, stmt) in adds {
            self.statements.insert(name, stmt);
        }
        self.buf.advance(pos);
        messages::ready_for_query(&mut replies, TransactionStatus::Idle);
        self.client.write_all(&replies).await.map_err(ClientError::ClientIo)?;
        Ok(true)
    }

    async fn send_ready_for_query(&mut self) -> Result<(), ClientError> {
        let mut out = BytesMut::with_capacity(6);
        messages::ready_for_query(&mut out, TransactionStatus::Idle);
        self.client.write_all(&out).await.map_err(ClientError::ClientIo)
    }

    /// Answers the first message of a transaction that could not get a server: simple Query
    /// and FunctionCall get the error and ReadyForQuery; extended-protocol messages get the
    /// error now and ReadyForQuery at their Sync, exactly like a PostgreSQL error would.
    async fn reply_error_for_first_message(&mut self, tag: u8, reply: PgError) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        reply.encode(&mut out);
        self.client.write_all(&out).await.map_err(ClientError::ClientIo)?;
        if reply.severity == Severity::Fatal {
            return Err(ClientError::Login(reply.message));
        }
        match tag {
            frontend::QUERY | frontend::FUNCTION_CALL => {
                self.consume_first_message();
                self.send_ready_for_query().await
            }
            _ => {
                self.discard_until_sync = true;
                Ok(())
            }
        }
    }

    /// Checks out a server and applies the client's session parameters to it.
    /// Returns the server and when it was linked (reused as the link's start: clock reads are
    /// a visible share of a proxied transaction's CPU).
    /// `started` is when an event loop began asking (it has marked the client waiting); None
    /// starts now. A `grant` the pool gave the event loop is finished here instead of a checkout.
    async fn acquire(
        &mut self,
        started: Option<Instant>,
        grant: Option<Grant>,
    ) -> Result<(PooledServer, Mono), NoServer> {
        // Both clocks, read at the same points: tokio's for the pool's wait, ours for the rest.
        let (mut now, mut mono) = (Instant::now(), Mono::now());
        let (started, wall_ms) = match started {
            Some(at) => (
                at,
                super::registry::now_ms().saturating_sub(now.saturating_duration_since(at).as_millis() as u64),
            ),
            None => (now, super::registry::now_ms()),
        };
        let grant = match grant {
            Some(grant) => Ok(grant),
            None => match self.pool.begin_checkout(started, self.settings.load()) {
                Ok(Checkout::Ready(grant)) => Ok(grant),
                Ok(Checkout::Wait(mut rx)) => {
                    self.info.set_waiting(wall_ms);
                    // A kill or a shutdown reaches a waiting client now, not at acquire_timeout;
                    // and a client that hangs up stops waiting (and counting against
                    // max_client_conn) at once, as in PgBouncer.
                    let granted = tokio::select! {
                        biased;
                        granted = &mut rx => Ok(granted.ok()),
                        bits = self.info.stop.raised(KILL | SHUTDOWN) => Err(NoServer::Stopped(bits)),
                        () = client_left(self.client.sock()) => Err(NoServer::ClientLeft),
                    };
                    let granted = match granted {
                        Ok(granted) => granted,
                        Err(why) => {
                            // Closing refuses grants from here on (the pool passes them to the
                            // next waiter); one that came just before goes back.
                            rx.close();
                            if let Ok(grant) = rx.try_recv() {
                                self.pool.return_grant(grant);
                            }
                            self.pool.forget_waits(None);
                            self.info.set_idle();
                            return Err(why);
                        }
                    };
                    (now, mono) = (Instant::now(), Mono::now());
                    granted.ok_or_else(|| self.pool.acquire_timed_out(self.settings.load()))
                }
                Err(e) => Err(e),
            },
        };
        // The common case needs no future: an idle server that needs no health check and
        // already has this client's parameters.
        let result = match grant {
            // Closed by a shutdown, or by a reload that removed its database: the client is
            // told that, and why, rather than an ERROR and then the FATAL.
            Err(PoolError::Closed(_)) if self.info.stop.raised_now(SHUTDOWN) != 0 => {
                self.info.set_idle();
                return Err(NoServer::Stopped(SHUTDOWN));
            }
            Err(e) => Err(pool_error_reply(&e, &self.pool, false)),
            Ok(Grant::Conn(mut conn)) => {
                if Pool::usable_now(&mut conn, self.settings.load(), mono) && self.params_satisfied(&conn) {
                    Ok(self.pool.lend(conn))
                } else {
                    self.info.set_waiting(wall_ms);
                    let finished = self.finish_grant(Grant::Conn(conn)).await;
                    (now, mono) = (Instant::now(), Mono::now());
                    finished
                }
            }
            Ok(grant) => {
                // Connecting takes a while: the client waits for a server meanwhile, as the
                // admin API should show.
                self.info.set_waiting(wall_ms);
                let finished = self.finish_grant(grant).await;
                (now, mono) = (Instant::now(), Mono::now());
                finished
            }
        };
        let waited = now.saturating_duration_since(started);
        self.pool.stats().acquire_wait.observe(waited);
        match result {
            // A kill raised while the server was being found, connected or readied wins over
            // the statement waiting for it ("at once, also while the client waits"): nothing
            // has reached the server, so it goes back clean.
            Ok(server) if self.info.stop.raised_now(KILL) != 0 => {
                server.release();
                self.info.set_idle();
                Err(NoServer::Stopped(KILL))
            }
            Ok(mut server) => {
                // A task waits on its server through tokio, not through a loop's thread. Moved
                // only now: the checks above read what the loop's reactor saw on the socket.
                server.conn().stream.to_runtime();
                self.info
                    .set_linked(server.conn_ref().backend_pid(), wall_ms + waited.as_millis() as u64);
                Ok((server, mono))
            }
            Err(e) => {
                self.info.set_idle();
                Err(NoServer::Reply(e))
            }
        }
    }

    /// Turns a grant into a server with this client's parameters: vets an idle connection or
    /// connects for a slot, then applies parameters where they differ.
    async fn finish_grant(&mut self, grant: Grant) -> Result<PooledServer, PgError> {
        // Boxed: connecting or vetting is the rare path, and its future (2.2 KiB, the TLS and
        // SCRAM states) kept inline would size every client's task, idle ones included.
        let server = match Box::pin(self.pool.finish_grant(grant, self.settings.load())).await {
            Ok(s) => s,
            Err(e) => return Err(pool_error_reply(&e, &self.pool, false)),
        };
        if self.params_satisfied(server.conn_ref()) {
            return Ok(server);
        }
        self.align_params(server).await
    }

    /// True when `server` already has this client's session parameters: the common case, as
    /// clients of one application start alike. One generation and one byte-slice compare.
    fn params_satisfied(&mut self, conn: &crate::server::ServerConn) -> bool {
        let Some((form, generation)) = &conn.satisfies else {
            return false;
        };
        if *generation != conn.params.generation() {
            return false;
        }
        // Forms are interned: the same values are almost always the same allocation.
        let mine = self.current_params_form();
        std::sync::Arc::ptr_eq(form, mine) || **form == **mine
    }

    /// Brings the server's session parameters in line with the client's (when
    /// [`Session::params_satisfied`] says they differ).
    async fn align_params(&mut self, mut server: PooledServer) -> Result<PooledServer, PgError> {
        // A server of this pool right after its login; every server has logged in by now, so
        // the pool has it (an empty set would only make more names look stale).
        let baseline = self.pool.welcome().unwrap_or_default();
        let have = &server.conn_ref().params;
        let mut diffs: Vec<(String, Vec<u8>)> = have
            .differences(&self.params)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_vec()))
            .collect();
        let stale: Vec<String> = params::stale(have, &self.params, &baseline)
            .into_iter()
            .map(str::to_owned)
            .collect();
        if diffs.is_empty() && stale.is_empty() {
            self.mark_satisfied(server.conn());
            return Ok(server);
        }
        // The values are written for standard_conforming_strings = on (see params::set_prelude):
        // where the prelude turns it on for that, this client's own setting is set again.
        const SCS: &str = "standard_conforming_strings";
        if params::reads_backslash_escapes(have)
            && !diffs.iter().any(|(k, _)| k == SCS)
            && let Some(wanted) = self.params.get(SCS)
        {
            diffs.push((SCS.to_owned(), wanted.to_vec()));
        }
        let pairs: Vec<(&str, &[u8])> = diffs.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        // RESET: back to the connection's own default (its startup packet, the role's and the
        // database's settings), the baseline's value or PostgreSQL's own.
        let resets: Vec<&str> = stale.iter().map(String::as_str).collect();
        let prelude = params::set_prelude(have, &pairs);
        let sql = params::set_statements(&pairs, &resets);
        let conn = server.conn();
        let result = tokio::time::timeout(
            self.settings.load().server_connect_timeout,
            conn.run_settings(&prelude, &sql),
        )
        .await;
        match result {
            Ok(Ok(None)) => {
                for (name, value) in &diffs {
                    if let Some(tracked) = params::TRACKED.iter().find(|t| **t == name.as_str()) {
                        // PostgreSQL reports the canonical spelling ("iso" → "ISO, MDY");
                        // adopting it means the next comparison matches and no SET is repeated.
                        let canonical = conn.params.get(name).unwrap_or(value).to_vec();
                        if canonical != *value {
                            // The client was told another value: a login holds what a server
                            // of the pool reported, so only a server that reads the value
                            // differently (after an upgrade, say) gets here. Tell the client
                            // this server's, as PostgreSQL would, and the next login.
                            self.pool.learn_canonical_value(tracked, value, &canonical);
                            crate::proto::messages::parameter_status(&mut self.status_for_client, name, &canonical);
                        }
                        if let Some(reset_to) = &mut self.reset_to
                            && reset_to.get(name) == Some(value.as_slice())
                        {
                            reset_to.set(name, &canonical);
                        }
                        Arc::make_mut(&mut self.params).set(name, &canonical);
                        conn.params.set(name, &canonical);
                    } else {
                        conn.params.set(name, value);
                    }
                }
                for name in &stale {
                    match baseline.get(name) {
                        Some(value) => conn.params.set(name, value),
                        None => conn.params.retain(|n| n != name),
                    }
                }
                self.mark_satisfied(server.conn());
                Ok(server)
            }
            Ok(Ok(Some(fields))) => {
                server.discard();
                Err(PgError::fatal(
                    parameter_sqlstate(fields.code.as_deref()),
                    format!(
                        "pgweir could not apply this client's session parameters: {}",
                        fields.message
                    ),
                )
                .with_hint("Check the parameters set in the connection's startup packet or options."))
            }
            Ok(Err(e)) => {
                server.discard();
                Err(server_error_reply(&e, &self.pool))
            }
            Err(_) => {
                server.discard();
                Err(PgError::error(
                    "08006",
                    "pgweir: the server did not answer while applying session parameters",
                ))
            }
        }
    }

    #[inline]
    fn current_params_form(&mut self) -> &std::sync::Arc<[u8]> {
        if self.params_form.0 != self.params.generation() {
            self.params_form = (
                self.params.generation(),
                self.ctx.param_forms.intern(&self.params.form()),
            );
        }
        &self.params_form.1
    }

    /// Records that `conn` now has every value this client's parameters ask for.
    fn mark_satisfied(&mut self, conn: &mut crate::server::ServerConn) {
        let form = self.current_params_form().clone();
        conn.satisfies = Some((form, conn.params.generation()));
    }

    /// Serves one transaction (or, in session mode, the rest of the session) on `server`.
    async fn linked(&mut self, server: PooledServer, linked_at: Mono) -> Result<Unlinked, ClientError> {
        let spares = match self.spares.allocated() {
            // Kept from this session's last link, empty but allocated.
            true => std::mem::take(&mut self.spares),
            // A session's first link, or one after a link that ended in an error (its queues
            // went with it), takes a departed session's queues.
            false => self.ctx.link_spares.take(),
        };
        let mut link = self.start_link(server, linked_at, spares);
        let result = self.pump(&mut link).await;
        self.end_link(&mut link, linked_at, result).await
    }

    #[inline]
    fn start_link(&mut self, server: PooledServer, linked_at: Mono, spares: LinkSpares) -> Link {
        let policy = self.refresh_timeouts();
        let mut link = Link::new(server, policy, spares);
        self.link_started(&mut link, linked_at);
        link
    }

    /// [`Session::start_link`] for a link kept from an earlier transaction (an event loop's).
    #[inline]
    fn restart_link(&mut self, link: &mut Link, server: PooledServer, linked_at: Mono) {
        let policy = self.refresh_timeouts();
        link.restart(server, policy);
        self.link_started(link, linked_at);
    }

    fn link_started(&mut self, link: &mut Link, linked_at: Mono) {
        if !self.status_for_client.is_empty() {
            link.inject.extend_from_slice(&self.status_for_client);
            self.status_for_client.clear();
        }
        self.last_activity = linked_at;
        let conn = link.server.conn_ref();
        self.login.slot.set_target(conn.addr.clone(), conn.backend_key);
    }

    /// Folds a link's counters into its pool's: once per link, no per-message metric cost.
    #[inline]
    fn fold_link_stats(&self, link: &Link, linked_at: Mono, now: Mono) {
        let stats = self.pool.stats();
        stats.transaction_duration.observe(now.since(linked_at));
        stats
            .bytes_from_clients
            .fetch_add(link.bytes_to_server, std::sync::atomic::Ordering::Relaxed);
        stats
            .bytes_to_clients
            .fetch_add(link.bytes_to_client, std::sync::atomic::Ordering::Relaxed);
        stats
            .queries
            .fetch_add(link.queries, std::sync::atomic::Ordering::Relaxed);
        stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !link.query_times.is_empty() {
            stats.query_duration.merge(&link.query_times);
        }
    }

    /// Ends a link by `result`; the link is left empty, to be dropped where it lies (moving
    /// it would be a copy of all of it).
    async fn end_link(
        &mut self,
        link: &mut Link,
        linked_at: Mono,
        result: Result<Pumped, ClientError>,
    ) -> Result<Unlinked, ClientError> {
        self.fold_link_stats(link, linked_at, Mono::now());
        self.info.set_idle();
        self.task_links = self.task_links.saturating_add(1);
        // Whatever happened, no cancel may reach this server once it is handed on.
        while !self.login.slot.clear_target() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A cancel PostgreSQL did not confirm may still interrupt whatever runs next on this
        // server: it is closed rather than handed on. Taken on every path, so the mark never
        // outlives this server.
        let unsettled = self.login.slot.take_unsettled();
        match result {
            Ok(Pumped::Idle) => {
                // Idle means nothing is owed or expected: the queues are empty already.
                self.spares = link.take_spares();
                if unsettled {
                    link.server.discard_in_place();
                } else {
                    self.return_idle_server(&mut link.server, link.dirty).await;
                }
                Ok(Unlinked::Continue)
            }
            Ok(Pumped::ClientGone) => {
                // Boxed like a reset (see return_idle_server): rare, and large.
                Box::pin(self.finish_server_after_client_left(link, unsettled)).await;
                Ok(Unlinked::ClientGone)
            }
            Err(e) => {
                // Dirty or broken: cancel anything still running, then close.
                if link.pending_rfq > 0 {
                    spawn_cancel(link.server.conn_ref());
                }
                link.server.discard_in_place();
                Err(e)
            }
        }
    }

    /// Takes the timeouts of the pool's current settings; returns its session-state policy
    /// (read in the same step).
    fn refresh_timeouts(&mut self) -> SessionStatePolicy {
        let settings = self.settings.load();
        let (idle, query, policy) = (
            settings.idle_transaction_timeout,
            settings.query_timeout,
            settings.session_state,
        );
        self.idle_tx_timeout = idle;
        self.query_timeout = query;
        policy
    }

    /// The client is gone. A server with nothing in flight and no open transaction can be
    /// reused (after DISCARD ALL in session mode); anything else is cancelled and closed, which
    /// rolls back its transaction and frees its locks. `unsettled`: a cancel PostgreSQL did not
    /// confirm aimed at it, so it is closed either way.
    async fn finish_server_after_client_left(&mut self, link: &mut Link, unsettled: bool) {
        let clean = !unsettled && link.server_idle() && link.server.conn_ref().buf.is_empty();
        if clean {
            self.return_idle_server(&mut link.server, link.dirty).await;
            return;
        }
        if link.pending_rfq > 0 || link.unsynced {
            spawn_cancel(link.server.conn_ref());
        }
        link.server.discard_in_place();
    }

    /// Returns a server that is idle (nothing in flight, no open transaction) to the pool, after
    /// the reset query when session state may have changed on it: always in session mode, and in
    /// transaction mode when a client changed session state under the `reset` policy, or after
    /// every transaction under `reset_always`.
    /// Leaves `server` empty, to be dropped where it lies.
    async fn return_idle_server(&mut self, server: &mut PooledServer, dirty: Option<StateChange>) {
        let policy = self.settings.load().session_state;
        let reset = match (self.mode, dirty) {
            (PoolMode::Session, _) => true,
            (PoolMode::Transaction, Some(kind)) if policy == SessionStatePolicy::Reset => {
                tracing::debug!(pool = %self.pool.key(), change = kind, "resetting session state before reuse");
                true
            }
            (PoolMode::Transaction, _) => policy == SessionStatePolicy::ResetAlways,
        };
        if reset {
            // Boxed: a reset is the less common end of a transaction, and its future kept
            // inline would size every client's task, idle ones included.
            Box::pin(self.reset_and_release(server)).await;
        } else {
            server.release_in_place(Mono::now());
        }
    }

    /// Runs the pool's reset query so no session state reaches the next client; a server that
    /// cannot be reset is closed instead.
    async fn reset_and_release(&self, server: &mut PooledServer) {
        self.pool
            .stats()
            .session_resets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let settings = self.pool.settings();
        let conn = server.conn();
        let reset = tokio::time::timeout(
            settings.server_connect_timeout,
            conn.run_discarding(&settings.reset_query),
        )
        .await;
        if matches!(reset, Ok(Ok(None))) {
            conn.forget_session_state();
            server.release_in_place(Mono::now());
        } else {
            server.discard_in_place();
        }
    }

    /// What the link's client-side framing reads and changes of this session.
    fn client_side(&mut self, max_prepared: usize) -> ClientSide<'_> {
        ClientSide {
            buf: &mut self.buf,
            statements: &mut self.statements,
            registry: &self.ctx.statements,
            params: &self.params,
            max_message: self.max_message,
            max_prepared,
        }
    }

    /// Frames what each side sent and says what the link needs next. Shared by the task's
    /// pump and the event loop, so both read the protocol the same way.
    #[inline]
    fn frame_link(&mut self, link: &mut Link, max_prepared: usize) -> Result<Framed, ClientError> {
        link.frame_client(&mut self.client_side(max_prepared))
            .map_err(ClientError::ClientProtocol)?;
        let waiting = !self.buf.is_empty();
        link.frame_server(&mut self.params, &mut self.reset_to, &mut self.statements)
            .map_err(|e| ClientError::Server(ServerError::Protocol(e)))?;
        if waiting {
            // A message that waited for the server's answer to an earlier batch may go now.
            link.frame_client(&mut self.client_side(max_prepared))
                .map_err(ClientError::ClientProtocol)?;
        }
        link.settle();
        if let Some(q) = link.last_query.take() {
            self.info.set_last_query(&q, self.query_text_bytes);
        }
        let to_server = link.has_bytes_for_server();
        let to_client = link.has_bytes_for_client();
        if !to_server && !to_client {
            let idle = link.server_idle() && link.server.conn_ref().buf.is_empty();
            if link.terminated {
                // A client that pipelined work before its Terminate gets that work finished,
                // as PostgreSQL would; one that says goodbye inside a transaction has it
                // rolled back (the server is closed).
                if idle || link.pending_rfq == 0 {
                    return Ok(Framed::ClientGone);
                }
            } else if idle {
                return Ok(Framed::Idle);
            }
        }
        Ok(Framed::Pending { to_server, to_client })
    }

    async fn pump(&mut self, link: &mut Link) -> Result<Pumped, ClientError> {
        let mut was_idle_in_tx = false;
        link.capture_queries = self.query_text_bytes > 0;
        let max_prepared = self.settings.load().max_prepared_statements;
        // The timeout's timer, kept across waits and armed as the loop arms its own: at the
        // earliest deadline seen, left where it is when the deadline moves later (the idle one
        // moves at every statement of a transaction), and looked at again when it fires. A
        // timer made and dropped per wait cost a registration in tokio's wheel, its removal
        // and two clock reads each time (~3,000 instructions per tpcb-like transaction).
        let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
        let mut armed: Option<Mono> = None;
        // The waker the stop signal and the reads wake, as registered by this pump.
        let mut stop_waker: Option<std::task::Waker> = None;
        // Whether the timer, since it was last armed, was polled with that waker: from then on
        // its firing wakes the task and shows in `is_elapsed`, so a look at that does (a poll
        // would register the same waker again, ~100 instructions per wait).
        let mut timer_polled = false;
        loop {
            let framed = match self.frame_link(link, max_prepared) {
                Ok(framed) => framed,
                Err(e) => return Err(self.link_protocol_error(link, e).await),
            };
            let (c_pending, s_pending) = match framed {
                Framed::ClientGone => return Ok(Pumped::ClientGone),
                Framed::Idle if self.mode == PoolMode::Transaction => return Ok(Pumped::Idle),
                Framed::Idle => {
                    // Session mode keeps one link for the whole session.
                    self.refresh_timeouts();
                    (false, false)
                }
                Framed::Pending { to_server, to_client } => (to_server, to_client),
            };

            match self.try_write_pending(link, c_pending, s_pending) {
                Wrote::Progress => continue,
                Wrote::Blocked => {}
                Wrote::ServerFailed(e) => return Err(ClientError::ServerIo(e)),
                Wrote::ClientGone => return Ok(Pumped::ClientGone),
            }
            let deadline = self.link_deadline(
                link,
                c_pending || s_pending,
                &mut was_idle_in_tx,
                super::registry::now_ms,
            );
            if let Some((at, _)) = deadline
                && armed.is_none_or(|a| at < a)
            {
                let when = at.to_instant(Instant::now(), Mono::now());
                match timer.as_mut().as_pin_mut() {
                    Some(sleep) => sleep.reset(when),
                    None => timer.set(Some(tokio::time::sleep_until(when))),
                }
                armed = Some(at);
                timer_polled = false;
            }
            let read_client = !c_pending && !link.terminated;
            if read_client {
                self.reserve_for_client();
            }
            let inject_pending = !link.inject.is_empty();
            let s_ready = link.s_ready;
            let inject = &link.inject;
            let conn = link.server.conn();
            if !s_pending {
                reserve_for_server(&mut conn.buf);
            }
            let (client, cbuf, stop) = (&mut self.client, &mut self.buf, &self.info.stop);
            let pump_reads = &mut self.pump_reads;
            let (server, sbuf, wbuf) = (&mut conn.stream, &mut conn.buf, &conn.wbuf);
            // One wait on every direction at once, polled by hand rather than through a
            // `select!` of futures: a direction either writes what it has framed or, when that
            // is all written, reads more. Checked in a fixed order: a kill or a deadline is
            // never starved by a direction that is always ready (a long result streaming
            // through), and the server side, which wakes the session in almost every
            // transaction, comes before the client side.
            let event = std::future::poll_fn(|cx| {
                // Reads over plain sockets take no coop budget of their own (see
                // `poll_read_into`): this keeps a result that is always ready from holding the
                // worker thread.
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                let mut stop_bits = stop.raised_now(KILL | SHUTDOWN);
                if stop_waker.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                    // The timer's registration, made with another waker, wakes someone else.
                    timer_polled = false;
                    match pump_reads {
                        // Whether each socket's read registration still stands a fresh pump
                        // cannot know: the event loop may have registered its own meanwhile.
                        Some(reads) if reads.server.wakes(cx.waker()) => {
                            reads.server.disarm();
                            reads.client.disarm();
                        }
                        _ => *pump_reads = Some(PumpReads::new(cx.waker())),
                    }
                    stop.register(cx.waker());
                    stop_waker = Some(cx.waker().clone());
                    stop_bits = stop.raised_now(KILL);
                } else if stop_bits & SHUTDOWN != 0 {
                    // Registered once per pump, not per poll, but again after a raise, which
                    // takes the registration (a shutdown's would swallow a later kill).
                    stop.register(cx.waker());
                    stop_bits = stop.raised_now(KILL);
                }
                // Made above at this pump's first poll.
                let reads = pump_reads.get_or_insert_with(|| PumpReads::new(cx.waker()));
                let event = if stop_bits & KILL != 0 {
                    Event::Killed
                // With no deadline now (a statement running without query_timeout) the timer
                // has nothing to say: left unpolled, it is looked at again once one stands.
                } else if armed.is_some()
                    && deadline.is_some()
                    && timer.as_mut().as_pin_mut().is_some_and(|t| {
                        if timer_polled {
                            t.is_elapsed()
                        } else {
                            let fired = t.poll(cx).is_ready();
                            // With the coop budget spent, tokio answers Pending without
                            // registering the waker (as in `poll_read_ready_armed`).
                            timer_polled = !fired && tokio::task::coop::has_budget_remaining();
                            fired
                        }
                    })
                {
                    Event::Timer
                } else if let Poll::Ready(r) = if inject_pending {
                    Pin::new(&mut *client).poll_write(cx, inject).map(Io::Wrote)
                } else if s_pending {
                    Pin::new(&mut *client).poll_write(cx, &sbuf[..s_ready]).map(Io::Wrote)
                } else {
                    reads.server.poll_read_into(server, sbuf).map(Io::Read)
                } {
                    Event::Server(r)
                } else if let Poll::Ready(r) = if c_pending {
                    Pin::new(&mut *server).poll_write(cx, wbuf).map(Io::Wrote)
                } else if read_client {
                    reads.client.poll_read_into(client, cbuf).map(Io::Read)
                } else {
                    Poll::Pending
                } {
                    Event::Client(r)
                } else {
                    return Poll::Pending;
                };
                coop.made_progress();
                Poll::Ready(event)
            })
            .await;
            match event {
                Event::Client(Io::Wrote(r)) => match r {
                    Ok(n) => link.sent_to_server(n),
                    // The server went away under a write: as when it is seen going away
                    // under a read, the client is told.
                    Err(e) => return Err(self.server_lost(link, Some(e)).await),
                },
                Event::Client(Io::Read(r)) => match r {
                    Ok(0) | Err(_) => return Ok(Pumped::ClientGone),
                    Ok(_) => self.last_activity = Mono::now(),
                },
                Event::Server(Io::Wrote(r)) => match r {
                    Ok(n) => link.sent_to_client(n),
                    // The client vanished while results were flowing.
                    Err(_) => return Ok(Pumped::ClientGone),
                },
                Event::Server(Io::Read(r)) => match r {
                    Ok(0) => return Err(self.server_lost(link, None).await),
                    Ok(_) => {}
                    Err(e) => return Err(self.server_lost(link, Some(e)).await),
                },
                Event::Timer => {
                    armed = None;
                    // Otherwise it was set for a deadline that has moved later since (or gone):
                    // set again above for the one that stands now.
                    if let Some((at, overdue)) = deadline
                        && at <= Mono::now()
                    {
                        return Err(match overdue {
                            Overdue::IdleInTransaction => self.idle_transaction_timeout(link).await,
                            Overdue::Query => self.query_timed_out(link).await,
                        });
                    }
                }
                Event::Killed => return Err(self.killed(Some(link)).await),
            }
        }
    }

    /// Fast path of both pumps: a socket usually has room for what was just framed, so it is
    /// written without waiting (plain TCP only; TLS reports WouldBlock and goes the long way).
    #[inline]
    fn try_write_pending(&mut self, link: &mut Link, to_server: bool, to_client: bool) -> Wrote {
        if to_server {
            let conn = link.server.conn_ref();
            match conn.stream.try_write(&conn.wbuf) {
                Ok(n) if n > 0 => {
                    link.sent_to_server(n);
                    return Wrote::Progress;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Wrote::ServerFailed(e),
            }
        }
        if to_client {
            match self.client.try_write(link.bytes_for_client()) {
                Ok(n) if n > 0 => {
                    link.sent_to_client(n);
                    return Wrote::Progress;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // The client vanished while results were flowing.
                Err(_) => return Wrote::ClientGone,
            }
        }
        Wrote::Blocked
    }

    /// Records the link entering or leaving idle-in-transaction (`was_idle_in_tx` is the last
    /// state recorded; `writing` says bytes still wait to go out) and returns its next deadline
    /// and which timeout it is. Shared by both pumps. `wall_ms` says when it is (Unix ms), for
    /// the admin API: the event loop has it from its round's clock.
    #[inline]
    fn link_deadline(
        &self,
        link: &Link,
        writing: bool,
        was_idle_in_tx: &mut bool,
        wall_ms: impl FnOnce() -> u64,
    ) -> Option<(Mono, Overdue)> {
        let idle_in_tx = link.idle_in_transaction() && !writing;
        if idle_in_tx != *was_idle_in_tx {
            // Only on transitions: a relaxed store per state change, not per message (but that
            // is every statement of a multi-statement transaction).
            self.info.set_idle_in_transaction(idle_in_tx.then(wall_ms));
            *was_idle_in_tx = idle_in_tx;
        }
        let idle_deadline = match self.idle_tx_timeout {
            Some(t) if idle_in_tx => Some((self.last_activity.saturating_add(t), Overdue::IdleInTransaction)),
            _ => None,
        };
        // A query is overdue when the oldest reply the server owes was asked for longer ago
        // than query_timeout; that clock runs whatever the client does meanwhile.
        let query_deadline = match (self.query_timeout, link.oldest_outstanding()) {
            (Some(t), Some(sent)) if link.pending_rfq > 0 => Some((sent.saturating_add(t), Overdue::Query)),
            _ => None,
        };
        match (idle_deadline, query_deadline) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Sends a session's last error, unless the client is part-way through a message of the
    /// server's, which the error would be read as the rest of: it sees the connection close.
    async fn last_word(&mut self, link: Option<&Link>, e: &PgError) {
        if link.is_none_or(Link::client_at_message_boundary) {
            let _ = send_error(&mut self.client, e).await;
        }
    }

    async fn server_lost(&mut self, link: &Link, e: Option<std::io::Error>) -> ClientError {
        // PostgreSQL's own FATAL (pg_terminate_backend, its idle-in-transaction timeout, a
        // shutdown) has reached the client and says why: a second FATAL would hide its code.
        if !link.server_fatal {
            self.last_word(Some(link), &server_lost_reply(link)).await;
        }
        match e {
            Some(e) => ClientError::ServerIo(e),
            None => ClientError::Server(ServerError::Closed),
        }
    }

    /// An operator killed this client through the admin API: tell it, and end the session (a
    /// server it held is cancelled and closed by the caller).
    async fn killed(&mut self, link: Option<&Link>) -> ClientError {
        let reply = PgError::fatal(
            "57P01",
            "pgweir: connection terminated by an administrator (admin API kill)",
        );
        self.last_word(link, &reply).await;
        ClientError::Killed
    }

    /// query_timeout: the caller closes the server after cancelling what it runs (its state is
    /// unknown mid-query), so the client cannot go on either.
    async fn query_timed_out(&mut self, link: &Link) -> ClientError {
        self.pool
            .stats()
            .query_timeouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = self.query_timeout.unwrap_or_default();
        let pid = link.server.conn_ref().backend_pid();
        tracing::info!(pool = %self.pool.key(), backend_pid = pid, "query_timeout: cancelling the query and closing the client");
        let reply = PgError::fatal(
            "57014",
            format!(
                "pgweir: canceling query because it ran longer than query_timeout ({})",
                humantime::format_duration(timeout)
            ),
        )
        .with_detail("The query was cancelled, its transaction rolled back and the connection closed.")
        .with_hint("Make the query faster, or raise query_timeout for this pool.");
        self.last_word(Some(link), &reply).await;
        ClientError::QueryTimeout
    }

    async fn idle_transaction_timeout(&mut self, link: &Link) -> ClientError {
        self.pool
            .stats()
            .idle_transaction_timeouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = self.idle_tx_timeout.unwrap_or_default();
        let pid = link.server.conn_ref().backend_pid();
        tracing::info!(pool = %self.pool.key(), backend_pid = pid, "closing a client idle in transaction");
        let reply = PgError::fatal(
            "25P03",
            format!(
                "pgweir: terminating connection because it was idle in transaction for longer than idle_transaction_timeout ({})",
                humantime::format_duration(timeout)
            ),
        )
        .with_detail("The transaction was rolled back and its server connection freed for other clients.")
        .with_hint("Commit or roll back transactions promptly, or raise idle_transaction_timeout for this pool.");
        self.last_word(Some(link), &reply).await;
        ClientError::IdleTransactionTimeout
    }
}

/// What one framing step left a link with.
enum Framed {
    /// The client said Terminate and nothing it sent is still owed an answer.
    ClientGone,
    /// Nothing in flight, no transaction open, nothing buffered: the server can be released.
    Idle,
    /// Bytes are waiting to be written, to the server and to the client.
    Pending { to_server: bool, to_client: bool },
}

/// What [`Session::try_write_pending`] did.
enum Wrote {
    /// Some bytes went out: frame and try again.
    Progress,
    /// Nothing to write, or the sockets are full: wait.
    Blocked,
    ServerFailed(std::io::Error),
    ClientGone,
}

/// Which timeout a link's next deadline belongs to.
#[derive(Clone, Copy)]
enum Overdue {
    IdleInTransaction,
    Query,
}

enum Pumped {
    Idle,
    ClientGone,
}

/// What [`Session::next_unlinked_message`] found.
enum Next {
    /// A complete first message with this tag.
    Message(u8),
    Eof,
    /// Nothing yet, and the event loop is to wait for it.
    ToHub,
}

enum Io {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

enum Event {
    Client(Io),
    Server(Io),
    /// The pump's timer fired: a timeout is due, or its deadline moved since it was set.
    Timer,
    Killed,
}

/// Cancels whatever the server is running, in the background (the session does not wait).
fn spawn_cancel(conn: &crate::server::ServerConn) {
    let (addr, key) = (conn.addr.clone(), conn.backend_key);
    tokio::spawn(async move {
        // The server is being closed anyway: whether PostgreSQL confirms does not matter.
        let _ = send_cancel(&addr, key).await;
    });
}

fn reserve_for_server(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(READ_CHUNK);
    }
}

fn client_protocol_reply(e: &dyn std::fmt::Display) -> PgError {
    PgError::fatal("08P01", format!("pgweir: invalid message from client: {e}"))
        .with_hint("The limit for one message is max_message_size in the [listen] configuration.")
}

/// What a client is told when its server connection ends under it. Only what is known: with
/// a statement in flight (a COMMIT among them, perhaps) whether it took effect is not, and a
/// client told "rolled back" might run a committed write again.
fn server_lost_reply(link: &Link) -> PgError {
    let in_tx = link.status != TransactionStatus::Idle;
    let in_flight = link.pending_rfq > 0 || link.unsynced;
    let message = match (in_tx, in_flight) {
        (true, false) => "pgweir: the server connection was lost during the transaction; it was rolled back",
        (true, true) => {
            "pgweir: the server connection was lost while a statement of the transaction ran; the transaction \
             was rolled back unless that statement committed it"
        }
        (false, true) => {
            "pgweir: the server connection was lost while a statement ran; whether it took effect is unknown"
        }
        (false, false) => "pgweir: the server connection was lost; no statement was running",
    };
    let hint = if in_flight {
        "Reconnect; before running a write again, check whether it took effect. The PostgreSQL log says why the \
         backend ended."
    } else {
        "Reconnect and retry; the PostgreSQL log says why the backend ended."
    };
    PgError::fatal("08006", message).with_hint(hint)
}

/// The reply for a failed checkout. Acquire timeouts are ERROR 53300 (the session survives: a
/// client outside a transaction can simply retry) with everything an operator needs to act.
pub(super) fn pool_error_reply(e: &PoolError, pool: &Pool, at_login: bool) -> PgError {
    let severity = if at_login { Severity::Fatal } else { Severity::Error };
    match e {
        PoolError::Timeout { key, timeout, snapshot } => PgError::new(
            severity,
            "53300",
            format!(
                "pgweir: no server connection available for pool \"{key}\" within acquire_timeout ({}): pool_size {}, {} active, {} waiting",
                humantime::format_duration(*timeout),
                snapshot.size,
                snapshot.active(),
                snapshot.waiting,
            ),
        )
        .with_hint(
            "Long-running or idle-in-transaction clients hold the pool's connections. Raise pool_size (or acquire_timeout) \
             for this database in the pgweir configuration, or shorten the transactions.",
        ),
        PoolError::Closed(key) => PgError::new(severity, "57P01", format!("pgweir: pool \"{key}\" is closed")),
        PoolError::Server(se) => {
            let mut reply = server_error_reply(se, pool);
            reply.severity = severity;
            reply
        }
    }
}

fn server_error_reply(e: &ServerError, pool: &Pool) -> PgError {
    match e {
        // The server's own verdict (wrong server password, database missing on the server, too
        // many connections) is the most useful thing to show.
        ServerError::Login(fields) => {
            let code = sqlstate_static(fields.code.as_deref());
            let hint = match code {
                // Credentials are not the problem here; telling the operator to check them
                // would send them the wrong way.
                "53300" => {
                    "PostgreSQL is at max_connections: lower the pool sizes of pgweir (and of other clients) or raise max_connections on the server."
                }
                "57P03" => "PostgreSQL is starting up or shutting down; retry shortly.",
                _ => "Check the server credentials for this database/user in the pgweir configuration.",
            };
            PgError {
                severity: Severity::Error,
                code,
                message: format!("pgweir: PostgreSQL refused the pool's login: {}", fields.message),
                detail: Some(format!("pool \"{}\"", pool.key())),
                hint: Some(hint.into()),
            }
        }
        other => PgError::error(
            "08006",
            format!(
                "pgweir: could not open a server connection for pool \"{}\": {other}",
                pool.key()
            ),
        )
        .with_hint("Check that PostgreSQL is running and reachable at the host and port configured for this database."),
    }
}

/// The SQLSTATE PostgreSQL gave for a session parameter it refused, as PostgreSQL would give it
/// at login (an unknown name, a value it rejects, one the role may not set); others as
/// invalid_parameter_value.
pub(super) fn parameter_sqlstate(code: Option<&str>) -> &'static str {
    match code {
        Some("42704") => "42704",
        Some("42501") => "42501",
        Some("55P02") => "55P02",
        Some("22P02") => "22P02",
        _ => "22023",
    }
}

/// Maps a server SQLSTATE to a `&'static str` for re-sending. Unknown codes become the generic
/// connection-failure class rather than being echoed, so `PgError` can stay allocation-free.
fn sqlstate_static(code: Option<&str>) -> &'static str {
    match code {
        Some("28P01") => "28P01",
        Some("28000") => "28000",
        Some("3D000") => "3D000",
        Some("53300") => "53300",
        Some("57P03") => "57P03",
        Some("42501") => "42501",
        _ => "08006",
    }
}
