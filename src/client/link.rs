//! The protocol state of one client linked to one server: framing both directions, counting
//! what the server still owes, rewriting prepared-statement names, and ordering the replies
//! pgweir adds or removes. Sans-IO: the session moves bytes, this decides what they are.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::hygiene::{StateChange, function_call_change, session_state_change};
use super::prepared::query_text;
use super::prepared::{
    Expect, SERVER_PREFIX, Statement, StatementCommand, StatementRegistry, Undo, check_parse, classify_query,
    parse_facts, split_cstr,
};
use crate::clock::Mono;
use crate::config::SessionStatePolicy;
use crate::net::buffers::SpareList;
use crate::pool::PooledServer;
use crate::proto::frame::{HEADER_LEN, needed_len};
use crate::proto::messages::{self, PgError, put_message};
use crate::proto::tag::{TransactionStatus, backend, frontend};
use crate::proto::{ProtocolError, frame_at};
use crate::server::params::{self, ParamSet, ResetScope};
use crate::server::{ServerConn, ServerStatements};

/// Server frames are bounded by PostgreSQL itself (1 GiB); pgweir only needs complete copies of
/// the small ones it inspects.
const MAX_SERVER_FRAME: usize = (1 << 30) + 1;

/// A client's prepared statements: its own name → the shared statement.
pub type ClientStatements = HashMap<Bytes, Arc<Statement>>;

/// What the client side of the session hands the link for framing.
pub struct ClientSide<'a> {
    pub buf: &'a mut BytesMut,
    pub statements: &'a mut ClientStatements,
    pub registry: &'a StatementRegistry,
    /// The client's session parameters, for the statements' parse context.
    pub params: &'a crate::server::ParamSet,
    pub max_message: usize,
    pub max_prepared: usize,
}

pub struct Link {
    pub server: PooledServer,
    /// ReadyForQuery messages still owed by the server (one per Query, Sync, FunctionCall).
    pub pending_rfq: u32,
    /// An extended-protocol message was sent after the last Sync.
    pub unsynced: bool,
    /// Syncs sent since the last Execute: an Execute that starts COPY FROM STDIN makes the
    /// server swallow the Syncs that follow it until CopyDone, so they owe no ReadyForQuery.
    syncs_after_execute: u32,
    /// The last command-running message was an Execute (a COPY it starts waits for a Sync).
    after_execute: bool,
    pub status: TransactionStatus,
    /// An extended-protocol message failed before the client sent the Sync that ends its
    /// batch (it sent Flush and waited): PostgreSQL ignores everything up to that Sync, so
    /// pgweir passes nothing on, answers nothing and records nothing until then.
    skip_until_sync: bool,
    /// An earlier client left an unnamed statement on this server: unless this client's first
    /// message replaces it (a Parse of ""), it is closed ahead of that message, so a Bind of ""
    /// never runs another client's statement.
    close_unnamed: bool,
    pub copy_in: bool,
    /// The server sent a FATAL (or PANIC) ErrorResponse, passed on to the client: the
    /// connection is ending, and the client has been told why by PostgreSQL itself.
    pub server_fatal: bool,
    /// What the commands completed since the last ReadyForQuery were, as far as a RESET needs.
    reset_batch: ResetBatch,
    /// The batch (counted in ReadyForQuery messages) of a Query that is one `SET x TO DEFAULT`:
    /// its SET is a reset (see `params::sets_to_default`).
    default_set_batch: Option<u32>,
    /// ReadyForQuery messages received on this link.
    rfq_seen: u32,
    /// The batch of a reset whose scope is read from its text (a Query of RESETs, or a Parse or
    /// Bind of one), and the tracked parameters it resets: if the batch completes as resets
    /// only, the client is told its login values at its ReadyForQuery, whatever the server
    /// reported (a server whose own default equals the value before reports nothing).
    reset_scope: Option<(u32, ResetScope)>,
    /// A reset in the open transaction told the client values the server does not have: a
    /// rollback takes them back to what the server holds (see `report_at_ready`).
    reset_in_tx: bool,
    /// A ROLLBACK completed since the last ReadyForQuery.
    rolled_back: bool,
    /// The client's statements a DISCARD ALL or DEALLOCATE ALL dropped, with the batch of its
    /// Query: PostgreSQL keeps them when the command fails (in a transaction block, in a failed
    /// transaction), so they come back if an error answers that Query.
    dropped_statements: Option<(u32, ClientStatements)>,
    /// Remaining bytes of a client CopyData being streamed through without buffering it whole.
    c_skip: usize,
    /// Server bytes (from the start of the server read buffer) framed and ready for the client.
    pub s_ready: usize,
    s_skip: usize,
    /// Replies pgweir produces, to be sent to the client before `s_ready` bytes.
    pub inject: BytesMut,
    expect: VecDeque<Expect>,
    /// The client sent Terminate; everything before it has been framed.
    pub terminated: bool,
    /// What to do with statements that change session state.
    policy: SessionStatePolicy,
    /// Session state was changed on this server (Reset policy: reset before reuse).
    pub dirty: Option<StateChange>,
    /// Traffic and statements of this link, folded into pool counters when it ends.
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    pub queries: u64,
    /// When each ReadyForQuery still owed was asked for (Query or Sync sent), oldest first.
    rfq_sent: VecDeque<Mono>,
    /// Round-trip times of this link, merged into the pool's histogram when it ends.
    pub query_times: crate::metrics::LocalHistogram,
    /// Keep the text of the last query for the admin API (admin.query_text_bytes > 0).
    pub capture_queries: bool,
    pub last_query: Option<Bytes>,
    /// The time to record round trips with; None reads the clock. An event loop sets its
    /// reading for the round (one clock read for many sessions instead of one per message).
    pub clock: Option<Mono>,
}

/// A CommandComplete tag of BEGIN, START TRANSACTION, COMMIT or ROLLBACK. The first byte
/// decides most tags without a compare of the whole ("SELECT 1" is as long as "ROLLBACK").
fn is_transaction_control(tag: &[u8]) -> bool {
    match tag.first() {
        Some(b'B' | b'C' | b'R') => matches!(tag, b"BEGIN\0" | b"COMMIT\0" | b"ROLLBACK\0"),
        Some(b'S') => tag == b"START TRANSACTION\0",
        _ => false,
    }
}

/// Whether the server sends its ParameterStatus reports just before ReadyForQuery (PostgreSQL
/// 14 on); older ones send each as the command runs, before its CommandComplete.
fn reports_at_ready(server: &ParamSet) -> bool {
    server
        .get("server_version")
        .and_then(|v| v.split(|b| !b.is_ascii_digit()).next())
        .and_then(|major| std::str::from_utf8(major).ok()?.parse::<u32>().ok())
        .is_some_and(|major| major >= 14)
}

/// PostgreSQL reports changed parameters just before ReadyForQuery, so a report cannot be tied
/// to the command that caused it; it can be when every command of the batch was a reset.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ResetBatch {
    /// No command completed since the last ReadyForQuery (or only transaction control).
    None,
    /// RESET or DISCARD ALL, and nothing that could have set a parameter.
    Resets,
    /// Anything else: a SET, or a SELECT that may have called set_config.
    Other,
}

/// What [`Link::parameter_status`] did with a report.
enum Report {
    /// Pass it on as it is.
    Forward,
    /// It must be replaced, once everything before it has gone to the client.
    EditAtFront,
    /// Replaced (or dropped) at the front of the buffer.
    Edited,
}

/// The growable parts of a [`Link`], kept by the session between transactions so a link
/// allocates nothing in the common case.
#[derive(Default)]
pub struct LinkSpares {
    rfq_sent: VecDeque<Mono>,
    expect: VecDeque<Expect>,
}

impl LinkSpares {
    /// Whether these queues have room of their own (a session's kept ones), as opposed to the
    /// empty default.
    pub fn allocated(&self) -> bool {
        self.expect.capacity() > 0 || self.rfq_sent.capacity() > 0
    }

    /// Room for an ordinary transaction's replies already allocated, and no more than a few
    /// times that (a pipeline of thousands grows them; those go back to the allocator).
    fn reusable(&self) -> bool {
        let fits = |capacity: usize| (1..=KEEP_CAPACITY).contains(&capacity);
        fits(self.rfq_sent.capacity()) && fits(self.expect.capacity())
    }
}

/// Reply-queue capacity kept in a [`SparesPool`].
const KEEP_CAPACITY: usize = 64;

/// [`LinkSpares`] of sessions that ended, for links of sessions without queues of their own
/// (a session's first link, or its next after one that ended in an error): a connection per
/// transaction would otherwise grow both reply queues from nothing and free them again at
/// every connection (four allocator calls, ~500 instructions of a login's ~30,000). Kept like
/// the read buffers (`net::buffers`).
#[derive(Default)]
pub struct SparesPool(SpareList<LinkSpares>);

impl SparesPool {
    /// Spares for a session without its own: kept ones when there are, else empty ones.
    pub fn take(&self) -> LinkSpares {
        self.0.pop().unwrap_or_default()
    }

    /// Keeps a session's spares for a later session, when they are worth keeping.
    pub fn give(&self, spares: LinkSpares) {
        if spares.reusable() {
            self.0.push(spares);
        }
    }
}

impl Link {
    pub fn new(server: PooledServer, policy: SessionStatePolicy, spares: LinkSpares) -> Self {
        let LinkSpares { rfq_sent, expect } = spares;
        debug_assert!(rfq_sent.is_empty() && expect.is_empty());
        // The values here only make a Link; `start` sets every one but the server, the policy
        // and the spares' capacity.
        let mut link = Link {
            close_unnamed: false,
            policy,
            dirty: None,
            bytes_to_server: 0,
            bytes_to_client: 0,
            queries: 0,
            capture_queries: false,
            last_query: None,
            rfq_sent,
            query_times: Default::default(),
            server,
            pending_rfq: 0,
            unsynced: false,
            syncs_after_execute: 0,
            after_execute: false,
            status: TransactionStatus::Idle,
            skip_until_sync: false,
            copy_in: false,
            server_fatal: false,
            reset_batch: ResetBatch::None,
            default_set_batch: None,
            rfq_seen: 0,
            reset_scope: None,
            reset_in_tx: false,
            rolled_back: false,
            dropped_statements: None,
            c_skip: 0,
            s_ready: 0,
            s_skip: 0,
            inject: BytesMut::new(),
            expect,
            terminated: false,
            clock: None,
        };
        link.start();
        link
    }

    /// Makes a link kept from an earlier transaction new for `server`, in place: building a
    /// new one to move into the kept box copied the whole link twice per transaction.
    pub fn restart(&mut self, server: PooledServer, policy: SessionStatePolicy) {
        self.server = server;
        self.policy = policy;
        self.start();
    }

    /// Sets everything but the server and the policy to where a link starts: the one place
    /// that says what a link starts with, for new and kept links alike. Every field is bound
    /// by name, so one added to [`Link`], or a reset dropped from here, fails to build (an
    /// unused binding is an error under clippy's `-D warnings`): a value left from the last
    /// transaction would reach another client's.
    fn start(&mut self) {
        let Link {
            server,
            pending_rfq,
            unsynced,
            syncs_after_execute,
            after_execute,
            status,
            skip_until_sync,
            close_unnamed,
            copy_in,
            server_fatal,
            reset_batch,
            default_set_batch,
            rfq_seen,
            reset_scope,
            reset_in_tx,
            rolled_back,
            dropped_statements,
            c_skip,
            s_ready,
            s_skip,
            inject,
            expect,
            terminated,
            policy: _,
            dirty,
            bytes_to_server,
            bytes_to_client,
            queries,
            rfq_sent,
            query_times,
            capture_queries,
            last_query,
            clock,
        } = self;
        *close_unnamed = std::mem::take(&mut server.conn().unnamed_statement);
        *pending_rfq = 0;
        *unsynced = false;
        *syncs_after_execute = 0;
        *after_execute = false;
        *status = TransactionStatus::Idle;
        *skip_until_sync = false;
        *copy_in = false;
        *server_fatal = false;
        *reset_batch = ResetBatch::None;
        *default_set_batch = None;
        *rfq_seen = 0;
        *reset_scope = None;
        *reset_in_tx = false;
        *rolled_back = false;
        *dropped_statements = None;
        *c_skip = 0;
        *s_ready = 0;
        *s_skip = 0;
        // A fresh one, not a cleared one: what a rare big injection grew stays with no link.
        *inject = BytesMut::new();
        // Kept with their capacity (most links allocate nothing).
        expect.clear();
        rfq_sent.clear();
        *terminated = false;
        *dirty = None;
        *bytes_to_server = 0;
        *bytes_to_client = 0;
        *queries = 0;
        *query_times = Default::default();
        *capture_queries = false;
        *last_query = None;
        *clock = None;
    }

    fn now(&self) -> Mono {
        self.clock.unwrap_or_else(Mono::now)
    }

    /// The growable parts, emptied, for the next link (the session's own, or the next one an
    /// event loop makes from this link's box).
    pub fn take_spares(&mut self) -> LinkSpares {
        self.rfq_sent.clear();
        self.expect.clear();
        LinkSpares {
            rfq_sent: std::mem::take(&mut self.rfq_sent),
            expect: std::mem::take(&mut self.expect),
        }
    }

    /// When the oldest reply still owed by the server was asked for (for query_timeout).
    pub fn oldest_outstanding(&self) -> Option<Mono> {
        self.rfq_sent.front().copied()
    }

    /// The server has answered everything and is outside a transaction, and every byte has
    /// been passed on both ways.
    pub fn server_idle(&self) -> bool {
        self.pending_rfq == 0
            && !self.unsynced
            && self.status == TransactionStatus::Idle
            && !self.copy_in
            && self.c_skip == 0
            && self.s_skip == 0
            && self.s_ready == 0
            && self.inject.is_empty()
            && self.expect.is_empty()
    }

    /// The client is inside a transaction and not waiting for anything.
    pub fn idle_in_transaction(&self) -> bool {
        self.pending_rfq == 0 && !self.unsynced && self.status != TransactionStatus::Idle && !self.copy_in
    }

    /// Bytes waiting to go to the server.
    pub fn has_bytes_for_server(&mut self) -> bool {
        !self.server.conn().wbuf.is_empty()
    }

    /// Bytes waiting to go to the client.
    pub fn has_bytes_for_client(&self) -> bool {
        !self.inject.is_empty() || self.s_ready > 0
    }

    /// Whether what the client has been sent ends with a whole message: nothing framed still
    /// waits, and no large message is being streamed through. Otherwise a message of pgweir's
    /// own would be read as the rest of the one cut off.
    pub fn client_at_message_boundary(&self) -> bool {
        !self.has_bytes_for_client() && self.s_skip == 0
    }

    /// The next bytes for the client: replies pgweir produced go before framed server bytes.
    pub fn bytes_for_client(&self) -> &[u8] {
        if self.inject.is_empty() {
            &self.server.conn_ref().buf[..self.s_ready]
        } else {
            &self.inject
        }
    }

    /// Records that the first `n` bytes of [`Link::bytes_for_client`] were sent.
    #[inline]
    pub fn sent_to_client(&mut self, n: usize) {
        if self.inject.is_empty() {
            consume(&mut self.server.conn().buf, n);
            self.s_ready -= n;
        } else {
            self.inject.advance(n);
        }
        self.bytes_to_client += n as u64;
    }

    /// Records that the first `n` bytes of the server's write buffer were sent.
    pub fn sent_to_server(&mut self, n: usize) {
        consume(&mut self.server.conn().wbuf, n);
        self.bytes_to_server += n as u64;
    }

    /// Moves every complete client message (and the available part of a streamed CopyData)
    /// from the client buffer to the server's write buffer, rewriting statement names.
    /// The session frames after every read and write, and most of those calls find nothing
    /// new: they return here, inlined, without the full framing function's set-up.
    #[inline]
    pub fn frame_client(&mut self, c: &mut ClientSide<'_>) -> Result<(), ProtocolError> {
        if c.buf.is_empty() && self.c_skip == 0 {
            return Ok(());
        }
        self.frame_client_input(c)
    }

    fn frame_client_input(&mut self, c: &mut ClientSide<'_>) -> Result<(), ProtocolError> {
        if self.c_skip > 0 {
            let take = self.c_skip.min(c.buf.len());
            let chunk = c.buf.split_to(take);
            self.server.conn().wbuf.put_slice(&chunk);
            self.c_skip -= take;
            if self.c_skip > 0 {
                return Ok(());
            }
        }
        // Messages are framed in place and copied once, into the server's write buffer; the
        // read buffer is taken out of `c` meanwhile so a message can be borrowed from it while
        // `c`'s statement tables change, and is consumed in one step at the end.
        let buf = std::mem::take(&mut *c.buf);
        let mut pos = 0;
        let result = loop {
            if self.terminated || pos == buf.len() {
                break Ok(());
            }
            let rest = &buf[pos..];
            let Some(total) = needed_len(rest, 0, c.max_message) else {
                if rest.len() >= HEADER_LEN
                    && let Err(e) = frame_at(rest, 0, c.max_message)
                {
                    break Err(e.into());
                }
                break Ok(());
            };
            let tag = rest[0];
            if rest.len() < total {
                if tag == frontend::COPY_DATA {
                    self.server.conn().wbuf.put_slice(rest);
                    self.c_skip = total - rest.len();
                    pos = buf.len();
                }
                break Ok(());
            }
            if self.waits_for_earlier_batch(tag, &rest[HEADER_LEN..total], c) {
                break Ok(());
            }
            pos += total;
            if tag == frontend::TERMINATE {
                self.terminated = true;
                break Ok(());
            }
            if let Err(e) = self.client_message(tag, &rest[..total], c) {
                break Err(e);
            }
        };
        *c.buf = buf;
        consume(c.buf, pos);
        result
    }

    /// Whether a message naming a client statement must wait until the server has answered
    /// an earlier batch (one before a Sync still owed) that defines or closes that name, or
    /// creates or evicts on the server the statement the message would rely on.
    /// pgweir decides how to send such a message from the client's names (a Parse under a
    /// name in use fails, a Bind of a name it does not know goes as it is) and from the
    /// statements it believes the server has (no Parse sent ahead of a Bind), and records both
    /// optimistically when it sends the Parse or Close that changes them. Within a batch that
    /// is safe: after an error PostgreSQL skips everything up to the Sync. Across a Sync it is
    /// not: had the earlier Parse failed, the name would be free and the statement missing.
    /// Messages wait only then, which a driver's usual batches (Parse, Bind, Execute ..., Sync)
    /// never do.
    fn waits_for_earlier_batch(&self, tag: u8, body: &[u8], c: &ClientSide<'_>) -> bool {
        if self.pending_rfq == 0 || self.skip_until_sync {
            return false;
        }
        // `payload` for a Parse; `bind` for a Bind or Describe, which use the statement the
        // name maps to.
        let (name, payload, bind) = match tag {
            frontend::PARSE => match split_cstr(body) {
                Some((n, p)) => (n, Some(p), false),
                None => return false,
            },
            frontend::BIND => match split_cstr(body).and_then(|(_, rest)| split_cstr(rest)) {
                Some((n, _)) => (n, None, true),
                None => return false,
            },
            frontend::DESCRIBE | frontend::CLOSE if body.first() == Some(&b'S') => match split_cstr(&body[1..]) {
                Some((n, _)) => (n, None, tag == frontend::DESCRIBE),
                None => return false,
            },
            _ => return false,
        };
        if name.is_empty() {
            return false;
        }
        let target = if bind { c.statements.get(name) } else { None };
        let relies_on = |s: &Arc<Statement>| match payload {
            Some(p) => s.payload == p,
            None => target.is_some_and(|t| t.id == s.id),
        };
        let mut after_barrier = false;
        let mut evicted = Vec::new();
        for e in self.expect.iter().rev() {
            match e {
                Expect::Barrier => after_barrier = true,
                Expect::InjectedClose { id } if after_barrier => evicted.push(*id),
                _ if !after_barrier => {}
                // A Bind of the name this Parse defined, under the server name: should the
                // Parse fail, it fails as the Bind of an unknown name does.
                Expect::Parse {
                    client_name: Some(n),
                    stmt: Some(_),
                } if bind && n == name => {}
                Expect::Parse {
                    client_name: Some(n), ..
                } if n == name => return true,
                Expect::Parse { stmt: Some(s), .. } | Expect::InjectedParse { stmt: s } if relies_on(s) => {
                    return true;
                }
                Expect::Synthetic {
                    undo: Undo::Unmap(n) | Undo::Remap(n, _),
                    ..
                } if n == name => return true,
                _ => {}
            }
        }
        if evicted.is_empty() {
            return false;
        }
        // An eviction may be skipped too, and the statement stay on the server.
        let id = match payload {
            Some(p) => c
                .registry
                .lookup(&crate::server::params::parse_context(c.params), p)
                .map(|s| s.id),
            None => target.map(|s| s.id),
        };
        id.is_some_and(|id| evicted.contains(&id))
    }

    /// Records that the message just sent (a Query, FunctionCall or Sync) owes a ReadyForQuery.
    #[inline]
    fn owes_ready(&mut self) {
        self.pending_rfq += 1;
        self.rfq_sent.push_back(self.now());
        self.expect.push_back(Expect::Barrier);
    }

    /// Refuses a session-state change under the Reject policy. The server itself raises the
    /// error, so it lands in order and aborts an open transaction exactly as a failing
    /// statement would.
    fn reject(&mut self, kind: StateChange) {
        let sql = rejection_sql(&rejection(kind));
        messages::query(&mut self.server.conn().wbuf, sql.as_bytes());
        self.owes_ready();
    }

    fn client_message(&mut self, tag: u8, msg: &[u8], c: &mut ClientSide<'_>) -> Result<(), ProtocolError> {
        let malformed = |what| ProtocolError::Malformed {
            what,
            why: "missing NUL terminator",
        };
        let body = &msg[HEADER_LEN..];
        if self.close_unnamed {
            self.close_unnamed = false;
            // pgbench -M extended and most drivers' one-off queries start with Parse(""): no
            // Close then, and no reply to swallow.
            if !(tag == frontend::PARSE && body.first() == Some(&0)) {
                put_message(&mut self.server.conn().wbuf, frontend::CLOSE, |b| b.put_slice(b"S\0"));
                self.expect.push_back(Expect::Swallow);
            }
        }
        if self.skip_until_sync {
            if tag != frontend::SYNC {
                return Ok(());
            }
            self.skip_until_sync = false;
        }
        match tag {
            frontend::PARSE => {
                self.unsynced = true;
                let (name, payload) = split_cstr(body).ok_or(malformed("Parse"))?;
                let query = query_text(payload);
                if self.capture_queries {
                    self.last_query = Some(Bytes::copy_from_slice(query));
                }
                // An unnamed statement's text comes again with every execution: its facts are
                // remembered on the connection. A named one's session-state change is worked
                // out once, when the statement is registered.
                let (change, scope) = if name.is_empty() {
                    self.server.conn().parse_memo.facts(query, parse_facts)
                } else {
                    (None, params::reset_scope(query))
                };
                // pgJDBC runs a RESET by Parse/Bind/Execute: whether it ran in this batch, its
                // CommandComplete says.
                if let Some(scope) = scope {
                    self.add_reset_scope(scope);
                }
                if let Some(kind) = change.filter(|_| self.policy == SessionStatePolicy::Reject) {
                    put_message(&mut self.server.conn().wbuf, frontend::PARSE, |b| {
                        b.put_slice(b"__pgweir_rejected\0\x01\0\0\0")
                    });
                    self.expect.push_back(Expect::FailingParse { error: rejection(kind) });
                    return Ok(());
                }
                if name.is_empty() {
                    self.dirty = self.dirty.or(change);
                    self.server.conn().unnamed_statement = true;
                    self.server.conn().wbuf.put_slice(msg);
                    self.expect.push_back(Expect::Parse {
                        client_name: None,
                        stmt: None,
                    });
                    return Ok(());
                }
                if c.statements.contains_key(name) {
                    // PostgreSQL reports 42P05 at this point of the pipeline and skips to Sync;
                    // a Parse that is sure to fail makes the server do exactly that. It checks
                    // the statement before the name, though: the server checks it first, and
                    // if that fails, its error is the client's and the failing Parse is skipped.
                    let wbuf = &mut self.server.conn().wbuf;
                    check_parse(wbuf, payload);
                    put_message(wbuf, frontend::PARSE, |b| b.put_slice(b"__pgweir_dup\0\x01\0\0\0"));
                    self.expect.push_back(Expect::Swallow);
                    self.expect.push_back(Expect::Swallow);
                    self.expect.push_back(Expect::FailingParse {
                        error: PgError::error(
                            "42P05",
                            format!(
                                "prepared statement \"{}\" already exists",
                                String::from_utf8_lossy(name)
                            ),
                        ),
                    });
                    return Ok(());
                }
                let stmt = c
                    .registry
                    .intern(&crate::server::params::parse_context(c.params), payload);
                if let Some(kind) = stmt.state_change.filter(|_| self.policy == SessionStatePolicy::Reject) {
                    put_message(&mut self.server.conn().wbuf, frontend::PARSE, |b| {
                        b.put_slice(b"__pgweir_rejected\0\x01\0\0\0")
                    });
                    self.expect.push_back(Expect::FailingParse { error: rejection(kind) });
                    return Ok(());
                }
                let name = Bytes::copy_from_slice(name);
                c.statements.insert(name.clone(), stmt.clone());
                let conn = self.server.conn();
                if conn.statements.contains(stmt.id) {
                    conn.statements.touch(stmt.id);
                    // PostgreSQL's Parse takes a snapshot and locks what the statement reads,
                    // for the transaction (explicit, or the batch's implicit one, which a
                    // BEGIN ISOLATION LEVEL later in the batch then finds started: 25001), and
                    // in a failed transaction it refuses the Parse (25P02): only the server
                    // can do that. (A batch of nothing but Parse, Close and Sync is answered
                    // before any server is linked; see `Session::answer_statement_batch`.)
                    check_parse(&mut conn.wbuf, payload);
                    self.expect.push_back(Expect::Parse {
                        client_name: Some(name),
                        stmt: None,
                    });
                    self.expect.push_back(Expect::Swallow);
                } else {
                    make_room(conn, &mut self.expect, c.max_prepared);
                    stmt.parse_message(&mut conn.wbuf);
                    conn.statements.insert(stmt.id);
                    self.expect.push_back(Expect::Parse {
                        client_name: Some(name),
                        stmt: Some(stmt),
                    });
                }
            }
            frontend::BIND => {
                self.unsynced = true;
                let (portal, rest) = split_cstr(body).ok_or(malformed("Bind"))?;
                let (name, rest) = split_cstr(rest).ok_or(malformed("Bind"))?;
                let expect = match self.resolve(name, c, true) {
                    Resolved::Verbatim => {
                        self.server.conn().wbuf.put_slice(msg);
                        Expect::Other
                    }
                    Resolved::Renamed {
                        server_name,
                        client_name,
                    } => {
                        put_message(&mut self.server.conn().wbuf, frontend::BIND, |b| {
                            b.put_slice(portal);
                            b.put_u8(0);
                            b.put_slice(&server_name);
                            b.put_slice(rest);
                        });
                        Expect::Renamed {
                            server_name,
                            client_name,
                        }
                    }
                };
                self.expect.push_back(expect);
            }
            frontend::DESCRIBE => {
                self.unsynced = true;
                let kind = *body.first().ok_or(malformed("Describe"))?;
                let (name, _) = split_cstr(&body[1..]).ok_or(malformed("Describe"))?;
                let resolved = if kind == b'S' {
                    self.resolve(name, c, false)
                } else {
                    Resolved::Verbatim
                };
                let expect = match resolved {
                    Resolved::Verbatim => {
                        self.server.conn().wbuf.put_slice(msg);
                        Expect::Other
                    }
                    Resolved::Renamed {
                        server_name,
                        client_name,
                    } => {
                        put_message(&mut self.server.conn().wbuf, frontend::DESCRIBE, |b| {
                            b.put_u8(b'S');
                            b.put_slice(&server_name);
                        });
                        Expect::Renamed {
                            server_name,
                            client_name,
                        }
                    }
                };
                self.expect.push_back(expect);
            }
            frontend::CLOSE => {
                self.unsynced = true;
                let kind = *body.first().ok_or(malformed("Close"))?;
                let (name, _) = split_cstr(&body[1..]).ok_or(malformed("Close"))?;
                if kind == b'S' && !name.is_empty() {
                    // Server statements are shared and cached; closing only forgets the client's
                    // name. Closing an unknown name is not an error in PostgreSQL either.
                    let undo = match c.statements.remove(name) {
                        Some(stmt) => Undo::Remap(Bytes::copy_from_slice(name), stmt),
                        None => Undo::None,
                    };
                    self.expect.push_back(Expect::Synthetic {
                        bytes: Bytes::from_static(b"3\0\0\0\x04"),
                        undo,
                    });
                } else {
                    self.server.conn().wbuf.put_slice(msg);
                    self.expect.push_back(Expect::Other);
                }
            }
            frontend::EXECUTE => {
                self.queries += 1;
                self.unsynced = true;
                self.syncs_after_execute = 0;
                self.after_execute = true;
                self.server.conn().wbuf.put_slice(msg);
                self.expect.push_back(Expect::Other);
            }
            frontend::SYNC => {
                self.server.conn().wbuf.put_slice(msg);
                self.syncs_after_execute += 1;
                if !self.copy_in {
                    self.unsynced = false;
                    self.owes_ready();
                }
            }
            frontend::QUERY => {
                self.queries += 1;
                if self.capture_queries {
                    self.last_query = Some(Bytes::copy_from_slice(body.strip_suffix(b"\0").unwrap_or(body)));
                }
                // A COPY started by a simple Query swallows no Syncs.
                self.syncs_after_execute = 0;
                self.after_execute = false;
                match classify_query(body) {
                    Some(StatementCommand::Deallocate(name)) if c.statements.contains_key(name.as_bytes()) => {
                        let name = Bytes::from(name.into_bytes());
                        let restore = c.statements.remove(&name).map(|stmt| (name, stmt));
                        self.expect.push_back(Expect::SyntheticQuery {
                            tag: "DEALLOCATE",
                            restore,
                        });
                        return Ok(());
                    }
                    Some(StatementCommand::DeallocateAll) | Some(StatementCommand::DiscardAll) => {
                        // The client's own names go now, in order with what it sends next. What
                        // the server holds is cleared only when it reports the command done
                        // (below): a DISCARD ALL that fails (inside a transaction block, say)
                        // leaves the server's statements in place, and the client's come back.
                        let batch = self.rfq_seen.wrapping_add(self.pending_rfq);
                        self.dropped_statements = Some((batch, std::mem::take(c.statements)));
                    }
                    _ => {}
                }
                if let Some(kind) = session_state_change(body) {
                    if self.policy == SessionStatePolicy::Reject {
                        self.reject(kind);
                        return Ok(());
                    }
                    self.dirty = self.dirty.or(Some(kind));
                }
                if params::sets_to_default(body) {
                    self.default_set_batch = Some(self.rfq_seen.wrapping_add(self.pending_rfq));
                }
                if let Some(scope) = params::reset_scope(body) {
                    self.add_reset_scope(scope);
                }
                self.server.conn().wbuf.put_slice(msg);
                self.owes_ready();
            }
            frontend::FUNCTION_CALL => {
                let oid = body.first_chunk::<4>().map(|b| u32::from_be_bytes(*b));
                if let Some(kind) = oid.and_then(function_call_change) {
                    if self.policy == SessionStatePolicy::Reject {
                        // A FunctionCall is answered like a Query: an error, then ReadyForQuery.
                        self.reject(kind);
                        return Ok(());
                    }
                    self.dirty = self.dirty.or(Some(kind));
                }
                self.server.conn().wbuf.put_slice(msg);
                self.owes_ready();
            }
            frontend::COPY_DONE | frontend::COPY_FAIL => {
                self.copy_in = false;
                self.server.conn().wbuf.put_slice(msg);
            }
            _ => self.server.conn().wbuf.put_slice(msg),
        }
        Ok(())
    }

    /// Maps a client statement name for Bind (`bind`) or Describe, preparing it on this server
    /// first when the server lacks it.
    fn resolve(&mut self, name: &[u8], c: &mut ClientSide<'_>, bind: bool) -> Resolved {
        if name.is_empty() {
            return Resolved::Verbatim;
        }
        // The name as the table holds it: a reference more, where a copy of the client's bytes
        // was an allocation per Bind (kept for an error that might name the statement).
        let Some((client_name, stmt)) = c.statements.get_key_value(name) else {
            // Unknown: PostgreSQL's own 26000 error names it, unless the name could alias one of
            // pgweir's server-side statements.
            if name.starts_with(SERVER_PREFIX.as_bytes()) {
                return Resolved::Renamed {
                    server_name: Bytes::from_static(b"__pgweir_unknown\0"),
                    client_name: Bytes::copy_from_slice(name),
                };
            }
            return Resolved::Verbatim;
        };
        let (client_name, stmt) = (client_name.clone(), stmt.clone());
        self.dirty = self.dirty.or(stmt.state_change);
        if bind && let Some(scope) = stmt.reset_scope {
            self.add_reset_scope(scope);
        }
        let conn = self.server.conn();
        if conn.statements.contains(stmt.id) {
            conn.statements.touch(stmt.id);
        } else {
            make_room(conn, &mut self.expect, c.max_prepared);
            stmt.parse_message(&mut conn.wbuf);
            conn.statements.insert(stmt.id);
            c.registry.reprepares.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.expect.push_back(Expect::InjectedParse { stmt: stmt.clone() });
        }
        Resolved::Renamed {
            server_name: stmt.server_name.clone(),
            client_name,
        }
    }

    /// Frames newly read server bytes: counts ReadyForQuery, tracks COPY and parameter reports,
    /// streams big rows through, and applies the reply edits the expect queue calls for. Edits
    /// (dropping or replacing a reply, inserting pgweir's own) happen only at the front of the
    /// buffer, once everything before them has been written, so replies stay in order.
    #[inline]
    pub fn frame_server(
        &mut self,
        client_params: &mut Arc<ParamSet>,
        reset_to: &mut Option<Box<ParamSet>>,
        statements: &mut ClientStatements,
    ) -> Result<(), ProtocolError> {
        // Nothing new to frame and no reply of pgweir's own due: what the full loop below would
        // conclude at its first step, without its set-up (most calls end here).
        if self.s_skip == 0
            && self.server.conn_ref().buf.len() - self.s_ready < HEADER_LEN
            && !matches!(
                self.expect.front(),
                Some(Expect::Synthetic { .. } | Expect::SyntheticQuery { .. })
            )
        {
            return Ok(());
        }
        self.frame_server_input(client_params, reset_to, statements)
    }

    /// `reset_to` holds the tracked parameters the client set at login (what PostgreSQL goes
    /// back to at a RESET, where the server goes back to its own); None while `client_params`
    /// still holds them.
    fn frame_server_input(
        &mut self,
        client_params: &mut Arc<ParamSet>,
        reset_to: &mut Option<Box<ParamSet>>,
        statements: &mut ClientStatements,
    ) -> Result<(), ProtocolError> {
        let mut pos = self.s_ready;
        if self.s_skip > 0 {
            let available = self.server.conn().buf.len() - pos;
            let take = self.s_skip.min(available);
            pos += take;
            self.s_skip -= take;
            if self.s_skip > 0 {
                self.s_ready = pos;
                return Ok(());
            }
        }
        loop {
            if matches!(
                self.expect.front(),
                Some(Expect::Synthetic { .. } | Expect::SyntheticQuery { .. })
            ) {
                if pos > 0 {
                    // pgweir's own replies go out after the bytes before them, and no server
                    // reply may be matched against them.
                    break;
                }
                emit_synthetic(&mut self.expect, &mut self.inject, self.status, statements);
            }
            let conn = self.server.conn();
            // Messages that mean nothing to pgweir (rows above all) pass in a tight loop: none of
            // them changes the reply queue, so the checks below would only conclude "forward".
            // A partial or malformed frame stops it, for the full path to stream or report.
            let barrier_front = matches!(self.expect.front(), Some(Expect::Barrier) | None);
            // The framing that stops the run is the next message's: kept, not done again.
            let next = loop {
                match frame_at(&conn.buf, pos, MAX_SERVER_FRAME) {
                    Ok(Some(frame)) if passes_through(frame.tag, barrier_front) => pos += frame.total_len,
                    other => break other,
                }
            };
            let available = conn.buf.len() - pos;
            if available < HEADER_LEN {
                break;
            }
            let tag = conn.buf[pos];
            // Every message this loop acts on must be whole; only pass-through ones stream.
            let inspect = !passes_through(tag, barrier_front);
            let frame = match next? {
                Some(f) => f,
                None if inspect => break,
                None => {
                    // A big row or copy chunk: pass its start on now and stream the rest.
                    let total = needed_len(&conn.buf, pos, MAX_SERVER_FRAME).unwrap_or(available);
                    self.s_skip = total - available;
                    pos = conn.buf.len();
                    break;
                }
            };
            if pos > 0 && needs_edit(tag, self.expect.front()) {
                break;
            }
            if tag == backend::READY_FOR_QUERY {
                let status = conn.buf.get(pos + HEADER_LEN).copied();
                let rfq_seen = self.rfq_seen;
                // After a ROLLBACK TO SAVEPOINT too: to a savepoint before the reset it undoes
                // it, and the client is told what the server holds again; to one after it, the
                // client is told the server's defaults, which statements after a RESET in its
                // transaction run with anyway (a documented limit).
                let due = (self.reset_batch == ResetBatch::Resets
                    && self.reset_scope.is_some_and(|(batch, _)| batch == rfq_seen))
                    || (self.reset_in_tx && self.rolled_back);
                if due {
                    if pos > 0 {
                        // The reports go just before this ReadyForQuery.
                        break;
                    }
                    self.report_at_ready(status, client_params, reset_to);
                    continue;
                }
            }
            let body = &conn.buf[pos + HEADER_LEN..pos + frame.total_len];
            match tag {
                backend::READY_FOR_QUERY => {
                    self.status = body.first().and_then(|&b| TransactionStatus::from_byte(b)).ok_or(
                        ProtocolError::Malformed {
                            what: "ReadyForQuery",
                            why: "unknown transaction status",
                        },
                    )?;
                    self.pending_rfq = self.pending_rfq.saturating_sub(1);
                    self.reset_batch = ResetBatch::None;
                    self.rolled_back = false;
                    if self.status == TransactionStatus::Idle {
                        self.reset_in_tx = false;
                    }
                    let rfq_seen = self.rfq_seen;
                    self.dropped_statements.take_if(|(batch, _)| *batch == rfq_seen);
                    self.rfq_seen = self.rfq_seen.wrapping_add(1);
                    if let Some(sent) = self.rfq_sent.pop_front() {
                        // Not `self.now()`: that would borrow all of self while `conn` is held.
                        let now = self.clock.unwrap_or_else(Mono::now);
                        self.query_times.observe(now.since(sent));
                    }
                }
                backend::PARAMETER_STATUS => {
                    match self.parameter_status(pos, frame.total_len, client_params, reset_to)? {
                        // No reply the queue waits for: it only passes on.
                        Report::Forward => pos += frame.total_len,
                        Report::EditAtFront => break,
                        Report::Edited => {}
                    }
                    continue;
                }
                backend::COPY_IN_RESPONSE => {
                    self.copy_in = true;
                    self.pending_rfq = self.pending_rfq.saturating_sub(self.syncs_after_execute);
                    for _ in 0..self.syncs_after_execute {
                        self.rfq_sent.pop_back();
                    }
                    for _ in 0..self.syncs_after_execute {
                        if matches!(self.expect.back(), Some(Expect::Barrier)) {
                            self.expect.pop_back();
                        }
                    }
                    self.syncs_after_execute = 0;
                    // The server now ignores Syncs until CopyDone/CopyFail and then owes a
                    // ReadyForQuery only for the Sync that follows: the batch is open again.
                    if self.after_execute {
                        self.unsynced = true;
                    }
                }
                backend::COMMAND_COMPLETE => {
                    self.copy_in = false;
                    // However it was sent (a simple Query, or Parse/Bind/Execute as pgJDBC does),
                    // the server has just dropped every prepared statement it had.
                    if matches!(body, b"DISCARD ALL\0" | b"DEALLOCATE ALL\0") {
                        conn.statements.clear();
                        let rfq_seen = self.rfq_seen;
                        if self
                            .dropped_statements
                            .as_ref()
                            .is_none_or(|(batch, _)| *batch != rfq_seen)
                        {
                            // Run by Execute: the client's names go now, but for those it
                            // prepared after the command, whose Parse is not answered yet.
                            statements.retain(|name, _| parsed_later(&self.expect, name));
                        }
                    }
                    self.rolled_back |= body == b"ROLLBACK\0";
                    let resets = matches!(body, b"DISCARD ALL\0" | b"RESET\0");
                    if self.reset_batch != ResetBatch::Other {
                        let default_set =
                            body == b"SET\0" && self.default_set_batch.take_if(|b| *b == self.rfq_seen).is_some();
                        self.reset_batch = match resets || default_set {
                            true => ResetBatch::Resets,
                            false if is_transaction_control(body) => self.reset_batch,
                            false => ResetBatch::Other,
                        };
                    }
                    // A RESET or DISCARD ALL takes the session back to the connection's own
                    // defaults, where PostgreSQL would go back to the client's startup settings:
                    // what pgweir set is no longer known to be there, so the next transaction
                    // sets it again (and another client's resets it).
                    if resets {
                        conn.session_state_unknown();
                    }
                }
                backend::ERROR_RESPONSE => {
                    self.copy_in = false;
                    self.server_fatal |= ends_the_connection(body);
                    // An error in a batch of resets rolls its implicit transaction back, the
                    // resets with it: they must not be reported.
                    if self.reset_batch == ResetBatch::Resets {
                        self.reset_batch = ResetBatch::Other;
                    }
                    let rfq_seen = self.rfq_seen;
                    if let Some((_, dropped)) = self.dropped_statements.take_if(|(batch, _)| *batch == rfq_seen) {
                        for (name, stmt) in dropped {
                            statements.entry(name).or_insert(stmt);
                        }
                    }
                }
                _ => {}
            }
            match reply_action(tag, &conn.buf[pos..pos + frame.total_len], &mut self.expect) {
                Action::Forward => pos += frame.total_len,
                Action::Swallow => conn.buf.advance(frame.total_len),
                Action::Replace(e) => {
                    conn.buf.advance(frame.total_len);
                    e.encode(&mut self.inject);
                }
                Action::ReplaceBytes(bytes) => {
                    conn.buf.advance(frame.total_len);
                    self.inject.put_slice(&bytes);
                }
            }
            if tag == backend::ERROR_RESPONSE
                && fail_front(&mut self.expect, &mut conn.statements, statements)
                && self.expect.is_empty()
                && self.unsynced
            {
                // The failed batch's Sync has not been sent yet.
                self.skip_until_sync = true;
            }
        }
        self.s_ready = pos;
        Ok(())
    }

    /// Reads a ParameterStatus at `pos` (an edit must wait until it is at the front, 0). Out of line: a report is rare in the transaction loop.
    #[inline(never)]
    fn parameter_status(
        &mut self,
        pos: usize,
        total_len: usize,
        client_params: &mut Arc<ParamSet>,
        reset_to: &mut Option<Box<ParamSet>>,
    ) -> Result<Report, ProtocolError> {
        let conn = self.server.conn();
        let body = &conn.buf[pos + HEADER_LEN..pos + total_len];
        let (name, value) = messages::parse_parameter_status(body)?;
        let Ok(name) = std::str::from_utf8(name) else {
            return Ok(Report::Forward);
        };
        let tracked = params::TRACKED.contains(&name);
        let rfq_seen = self.rfq_seen;
        // PostgreSQL reports only a change: a server going back to a value the client holds
        // (a rollback of what a reset told it) says nothing new. After a reset whose scope is
        // known, the client's reports are all made at ReadyForQuery (`report_at_ready`).
        // So are those of a rollback of a transaction with such a reset: pgweir adds to them.
        let scoped = ((self.reset_batch == ResetBatch::Resets
            && self.reset_scope.is_some_and(|(batch, _)| batch == rfq_seen))
            || (self.reset_in_tx && self.rolled_back))
            && reports_at_ready(&conn.params);
        if tracked && (scoped || client_params.get(name) == Some(value)) {
            if pos > 0 {
                return Ok(Report::EditAtFront);
            }
            conn.params.set(name, value);
            conn.buf.advance(total_len);
            return Ok(Report::Edited);
        }
        // A reset took the server back to ITS login values; the client's session goes back to
        // the client's (PostgreSQL: RESET returns to the startup packet's value). The client is
        // told its own value, or nothing when it already holds it, as PostgreSQL reports only
        // changes; the next transaction sets it on whichever server it gets.
        if self.reset_batch == ResetBatch::Resets && reports_at_ready(&conn.params) {
            // Only tracked values ever change in `client_params`; the others stay as at login.
            let startup = match reset_to {
                Some(r) if params::TRACKED.contains(&name) => r.get(name),
                _ => client_params.get(name),
            };
            if let Some(startup) = startup.filter(|s| *s != value).map(<[u8]>::to_vec) {
                if pos > 0 {
                    return Ok(Report::EditAtFront);
                }
                if client_params.get(name) != Some(startup.as_slice()) {
                    Arc::make_mut(client_params).set(name, &startup);
                    messages::parameter_status(&mut self.inject, name, &startup);
                }
                conn.params.set(name, value);
                conn.buf.advance(total_len);
                return Ok(Report::Edited);
            }
        }
        if params::TRACKED.contains(&name) {
            if reset_to.is_none() && client_params.get(name) != Some(value) {
                // The login values are about to change: keep them for a later RESET.
                *reset_to = Some(Box::new(client_params.only(|n| params::TRACKED.contains(&n))));
            }
            Arc::make_mut(client_params).set(name, value);
        }
        conn.params.set(name, value);
        Ok(Report::Forward)
    }

    /// Records that the batch being sent (up to its Sync, or this Query) resets `scope`.
    fn add_reset_scope(&mut self, scope: ResetScope) {
        let batch = self.rfq_seen.wrapping_add(self.pending_rfq);
        self.reset_scope = Some(match self.reset_scope {
            Some((b, earlier)) if b == batch => (batch, earlier.union(scope)),
            _ => (batch, scope),
        });
    }

    /// Tells the client, just before the ReadyForQuery with status byte `status`, the values a
    /// direct connection would have reported, in PostgreSQL's order:
    /// - after a reset, its login values of the parameters reset (the server went back to its
    ///   own, and reported only those that changed on it);
    /// - after a rollback of a transaction that reset some, what the server holds again: the
    ///   values from before the transaction, which the server need not report.
    fn report_at_ready(
        &mut self,
        status: Option<u8>,
        client_params: &mut Arc<ParamSet>,
        reset_to: &mut Option<Box<ParamSet>>,
    ) {
        let rfq_seen = self.rfq_seen;
        let scope = self
            .reset_scope
            .take_if(|(batch, _)| *batch == rfq_seen)
            .map(|(_, scope)| scope)
            .filter(|_| self.reset_batch == ResetBatch::Resets);
        let conn = self.server.conn();
        for &name in params::TRACKED_REPORT_ORDER {
            let value = match scope {
                Some(scope) if scope.covers(name) => reset_to.as_ref().and_then(|r| r.get(name)),
                Some(_) => None,
                None => conn.params.get(name),
            };
            if let Some(value) = value
                .filter(|v| client_params.get(name) != Some(*v))
                .map(<[u8]>::to_vec)
            {
                messages::parameter_status(&mut self.inject, name, &value);
                Arc::make_mut(client_params).set(name, &value);
            }
        }
        if scope.is_some() && status != Some(b'I') {
            self.reset_in_tx = true;
        }
        if scope.is_none() {
            // The rollback's reports are made; the ReadyForQuery clears the rest.
            self.rolled_back = false;
        }
    }

    /// Clears the reply queue when it still expects replies although the server has answered
    /// every Sync and Query: a message flow pgweir does not model must not block the release
    /// of the server forever (pgweir's own pending replies are kept).
    #[inline]
    pub fn settle(&mut self) {
        if self.pending_rfq == 0 && !self.unsynced && !self.expect.is_empty() && self.s_ready == 0 {
            if matches!(
                self.expect.front(),
                Some(Expect::Synthetic { .. } | Expect::SyntheticQuery { .. })
            ) {
                return;
            }
            tracing::debug!(left = self.expect.len(), "reply queue out of step; cleared");
            self.expect.clear();
        }
    }
}

/// Drops the first `n` bytes of `buf`. When that is all of it, clearing keeps the whole
/// allocation in front of the next read or write, where advancing would shrink the buffer and
/// cost a reclaim before it is filled again (once per transaction and direction).
fn consume(buf: &mut BytesMut, n: usize) {
    if n == buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

/// Emits replies pgweir owes at the front of the queue.
fn emit_synthetic(
    expect: &mut VecDeque<Expect>,
    inject: &mut BytesMut,
    status: TransactionStatus,
    statements: &mut ClientStatements,
) {
    loop {
        match expect.front() {
            Some(Expect::Synthetic { bytes, .. }) => inject.put_slice(bytes),
            Some(Expect::SyntheticQuery { .. }) if status == TransactionStatus::Failed => {
                // Known only now that every earlier reply is in: the transaction failed, and
                // PostgreSQL refuses the command before it looks at the statement.
                PgError::error(
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                )
                .encode(inject);
                messages::ready_for_query(inject, status);
                if let Some(Expect::SyntheticQuery {
                    restore: Some((name, stmt)),
                    ..
                }) = expect.pop_front()
                {
                    statements.insert(name, stmt);
                }
                continue;
            }
            Some(Expect::SyntheticQuery { tag, .. }) => {
                put_message(inject, backend::COMMAND_COMPLETE, |b| {
                    b.put_slice(tag.as_bytes());
                    b.put_u8(0);
                });
                messages::ready_for_query(inject, status);
            }
            _ => return,
        }
        expect.pop_front();
    }
}

/// Whether an ErrorResponse's severity is FATAL or PANIC, after which PostgreSQL closes the
/// connection. Read from the `V` field (never translated, PostgreSQL 9.6 and later), else `S`.
fn ends_the_connection(body: &[u8]) -> bool {
    let mut severity = None;
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'V', v)) => return matches!(v, b"FATAL" | b"PANIC"),
            Some((b'S', v)) => severity = Some(v),
            _ => {}
        }
    }
    matches!(severity, Some(b"FATAL" | b"PANIC"))
}

/// An ErrorResponse arrived: the message at the front failed and PostgreSQL skips the rest up
/// to the next Sync. Undo the optimistic bookkeeping done for each of them. Returns whether the
/// error answered an extended-protocol message (PostgreSQL now skips to Sync).
fn fail_front(expect: &mut VecDeque<Expect>, server: &mut ServerStatements, statements: &mut ClientStatements) -> bool {
    // Undo newest first, so the tables end as they were before the first skipped message.
    let mut skipped = Vec::new();
    while let Some(front) = expect.front() {
        if matches!(front, Expect::Barrier | Expect::SyntheticQuery { .. }) {
            break;
        }
        let Some(entry) = expect.pop_front() else {
            break;
        };
        skipped.push(entry);
    }
    let extended = !skipped.is_empty();
    for entry in skipped.into_iter().rev() {
        match entry {
            Expect::Parse {
                client_name: Some(name),
                stmt: Some(stmt),
            } => {
                if statements.get(&name).is_some_and(|s| Arc::ptr_eq(s, &stmt)) {
                    statements.remove(&name);
                }
                server.remove(stmt.id);
            }
            Expect::Parse {
                client_name: Some(name),
                stmt: None,
            } => {
                statements.remove(&name);
            }
            Expect::InjectedParse { stmt } => server.remove(stmt.id),
            Expect::InjectedClose { id } => server.insert(id),
            Expect::Synthetic { undo, .. } => match undo {
                Undo::None => {}
                Undo::Unmap(name) => {
                    statements.remove(&name);
                }
                Undo::Remap(name, stmt) => {
                    statements.insert(name, stmt);
                }
            },
            _ => {}
        }
    }
    extended
}

/// Whether the queue of replies still holds the client's Parse of `name`.
fn parsed_later(expect: &VecDeque<Expect>, name: &[u8]) -> bool {
    expect.iter().any(|e| match e {
        Expect::Parse {
            client_name: Some(n), ..
        } => n == name,
        Expect::Synthetic {
            undo: Undo::Unmap(n), ..
        } => n == name,
        _ => false,
    })
}

/// Whether a reply must be dropped or replaced rather than forwarded.
fn needs_edit(tag: u8, front: Option<&Expect>) -> bool {
    matches!(
        (tag, front),
        (b'1', Some(Expect::InjectedParse { .. } | Expect::Swallow))
            | (b'3', Some(Expect::InjectedClose { .. } | Expect::Swallow))
            | (
                backend::ERROR_RESPONSE,
                Some(Expect::FailingParse { .. } | Expect::Renamed { .. })
            )
    )
}

/// `error` (a whole ErrorResponse) with the quoted statement name `"server_name"` written as
/// the client's `"client_name"`, or None when it does not name the statement. PostgreSQL
/// names it in 26000 (does not exist) and 08P01 (wrong number of parameters); the client
/// must see its own name, never pgweir's.
fn client_named_error(error: &[u8], server_name: &[u8], client_name: &[u8]) -> Option<BytesMut> {
    let server_name = server_name.strip_suffix(b"\0").unwrap_or(server_name);
    let quoted = [b"\"", server_name, b"\""].concat();
    let body = &error[HEADER_LEN..];
    let at = body.windows(quoted.len()).position(|w| w == quoted.as_slice())?;
    let mut out = BytesMut::with_capacity(error.len() + client_name.len());
    put_message(&mut out, backend::ERROR_RESPONSE, |b| {
        b.put_slice(&body[..at + 1]);
        b.put_slice(client_name);
        b.put_slice(&body[at + quoted.len() - 1..]);
    });
    Some(out)
}

/// Whether a server message needs nothing from [`Link::frame_server_input`] but forwarding: not
/// one it reads (ReadyForQuery, ParameterStatus, CopyInResponse, ErrorResponse, CommandComplete)
/// nor a reply that settles an entry of the reply queue ([`reply_action`]: RowDescription,
/// EmptyQueryResponse and PortalSuspended settle one only when the queue's front is not a
/// Barrier).
fn passes_through(tag: u8, barrier_front: bool) -> bool {
    match tag {
        backend::READY_FOR_QUERY
        | backend::PARAMETER_STATUS
        | backend::COPY_IN_RESPONSE
        | backend::ERROR_RESPONSE
        | backend::COMMAND_COMPLETE
        | b'1'
        | b'2'
        | b'3'
        | b'n' => false,
        b'T' | b'I' | b's' => barrier_front,
        _ => true,
    }
}

/// The error for a statement refused under the Reject policy.
fn rejection(kind: StateChange) -> PgError {
    PgError::error(
        "0A000",
        format!("pgweir: {kind} changes session state, which transaction pooling would leak to other clients"),
    )
    .with_hint(
        "Use SET LOCAL or transaction-scoped equivalents, pass settings in the connection's options, \
         or set session_state = \"reset\" (or use session mode) for this pool.",
    )
}

/// A statement that makes PostgreSQL raise `e` (dollar-quoted so no escaping of the text is
/// needed beyond single quotes).
fn rejection_sql(e: &PgError) -> String {
    let q = |s: &str| s.replace('\'', "''");
    format!(
        "DO $pgweir$ BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = '{}', HINT = '{}'; END $pgweir$",
        e.code,
        q(&e.message),
        q(e.hint.as_deref().unwrap_or(""))
    )
}

enum Resolved {
    Verbatim,
    /// Sent under `server_name`; an error naming it names `client_name` instead.
    Renamed {
        server_name: Bytes,
        client_name: Bytes,
    },
}

enum Action {
    Forward,
    Swallow,
    Replace(PgError),
    ReplaceBytes(BytesMut),
}

/// Matches a server reply against the expect queue, popping completed entries.
fn reply_action(tag: u8, message: &[u8], expect: &mut VecDeque<Expect>) -> Action {
    let front_is_barrier = matches!(expect.front(), Some(Expect::Barrier) | None);
    match tag {
        b'1' => match expect.pop_front() {
            Some(Expect::InjectedParse { stmt }) => {
                stmt.validated.store(true, std::sync::atomic::Ordering::Relaxed);
                Action::Swallow
            }
            Some(Expect::Swallow) => Action::Swallow,
            Some(Expect::Parse { stmt: Some(stmt), .. }) => {
                stmt.validated.store(true, std::sync::atomic::Ordering::Relaxed);
                Action::Forward
            }
            _ => Action::Forward,
        },
        b'3' => match expect.pop_front() {
            Some(Expect::InjectedClose { .. } | Expect::Swallow) => Action::Swallow,
            _ => Action::Forward,
        },
        b'2' | b'n' => {
            expect.pop_front();
            Action::Forward
        }
        // RowDescription completes a Describe; inside a simple query it is just data.
        b'T' | b'C' | b'I' | b's' if !front_is_barrier => {
            expect.pop_front();
            Action::Forward
        }
        backend::ERROR_RESPONSE => match expect.front() {
            Some(Expect::FailingParse { error }) => Action::Replace(error.clone()),
            Some(Expect::Renamed {
                server_name,
                client_name,
            }) => match client_named_error(message, server_name, client_name) {
                Some(bytes) => Action::ReplaceBytes(bytes),
                None => Action::Forward,
            },
            _ => Action::Forward,
        },
        backend::READY_FOR_QUERY => {
            while let Some(e) = expect.pop_front() {
                if matches!(e, Expect::Barrier) {
                    break;
                }
            }
            Action::Forward
        }
        _ => Action::Forward,
    }
}

/// Evicts least-recently-used statements until one more fits, closing them on the server.
/// A statement whose Parse is still unanswered is left alone (the server may exceed `max` by
/// those for a moment): should that Parse fail and this Close be skipped after some error,
/// undoing the eviction would record a statement the server never had.
fn make_room(conn: &mut ServerConn, expect: &mut VecDeque<Expect>, max: usize) {
    let max = max.max(1);
    if conn.statements.len() < max {
        return;
    }
    let unconfirmed: Vec<u64> = expect
        .iter()
        .filter_map(|e| match e {
            Expect::Parse { stmt: Some(s), .. } | Expect::InjectedParse { stmt: s } => Some(s.id),
            _ => None,
        })
        .collect();
    while conn.statements.len() >= max + unconfirmed.len() {
        let Some(id) = conn.statements.oldest_except(&unconfirmed) else {
            return;
        };
        conn.statements.remove(id);
        put_message(&mut conn.wbuf, frontend::CLOSE, |b| {
            b.put_u8(b'S');
            b.put_slice(SERVER_PREFIX.as_bytes());
            b.put_slice(id.to_string().as_bytes());
            b.put_u8(0);
        });
        expect.push_back(Expect::InjectedClose { id });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::buffers::KEEP_PER_SHARD;

    /// FATAL and PANIC end the connection, read from the untranslated `V` field when there is
    /// one (a server with lc_messages in another language translates `S`).
    #[test]
    fn which_errors_end_the_connection() {
        assert!(ends_the_connection(b"SFATAL\0VFATAL\0C57P01\0Mbye\0\0"));
        assert!(ends_the_connection(b"SPANIC\0C XX000\0\0"));
        assert!(ends_the_connection(b"SFATAL\0C57P01\0\0"));
        assert!(ends_the_connection(b"SSCHWERWIEGEND\0VFATAL\0C57P01\0\0"));
        assert!(!ends_the_connection(b"SERROR\0VERROR\0C42601\0MFATAL\0\0"));
        assert!(!ends_the_connection(b"SFEHLER\0VERROR\0C42601\0\0"));
        assert!(!ends_the_connection(b""));
    }

    fn spares(capacity: usize) -> LinkSpares {
        LinkSpares {
            rfq_sent: VecDeque::with_capacity(capacity),
            expect: VecDeque::with_capacity(capacity),
        }
    }

    /// The pool keeps allocated queues of an ordinary size, at most a bounded number of them,
    /// and hands them out before making new ones.
    #[test]
    fn the_spares_pool_keeps_ordinary_queues_and_no_more_than_its_bound() {
        let pool = SparesPool::default();
        pool.give(spares(0));
        assert_eq!(pool.take().expect.capacity(), 0, "nothing allocated: nothing kept");
        pool.give(spares(KEEP_CAPACITY * 4));
        assert_eq!(pool.take().expect.capacity(), 0, "grown by a long pipeline: not kept");
        pool.give(spares(4));
        let taken = pool.take();
        assert!(taken.expect.capacity() >= 4 && taken.rfq_sent.capacity() >= 4);
        assert_eq!(pool.take().expect.capacity(), 0, "each kept one is handed out once");
        for _ in 0..KEEP_PER_SHARD + 10 {
            pool.give(spares(4));
        }
        let mut kept = 0;
        while pool.take().expect.capacity() > 0 {
            kept += 1;
        }
        assert_eq!(kept, KEEP_PER_SHARD, "this thread's shard is bounded");
    }

    /// A session keeps its own queues only when they have room (see `Session::linked`).
    #[test]
    fn spares_are_allocated_when_either_queue_has_room() {
        assert!(!LinkSpares::default().allocated());
        assert!(spares(1).allocated());
        let mut one = LinkSpares::default();
        one.rfq_sent.reserve(1);
        assert!(one.allocated());
    }
}
