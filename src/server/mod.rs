//! One PostgreSQL backend connection: connecting and logging in (`connect`), the parameters the
//! server reported, its cancel key, and the bookkeeping the pool needs (age, last use).
//!
//! A `ServerConn` is either idle in its pool or lent to exactly one client session; it is never
//! shared. Whoever holds it decides whether it is clean enough to go back (see `pool::guard`).

mod connect;
pub mod memo;
pub mod params;
pub mod statements;

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::AsyncWriteExt;

pub use connect::{ServerSecret, ServerTarget, connect};
pub use params::ParamSet;
pub use statements::ServerStatements;

use crate::auth::AuthError;
use crate::clock::Mono;
use crate::net::ServerAddr;
use crate::proto::ProtocolError;
use crate::proto::messages::{self, ErrorFields};
use crate::proto::startup::CancelKey;

/// Process-unique id of a server connection, for logs and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub u64);

/// Hands out [`ServerId`]s; one per application, passed in rather than global.
#[derive(Debug, Default)]
pub struct ServerIds(AtomicU64);

impl ServerIds {
    pub fn next(&self) -> ServerId {
        ServerId(self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("could not connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out connecting to {addr} after {timeout:?} (server_connect_timeout)")]
    ConnectTimeout { addr: String, timeout: std::time::Duration },
    /// The server refused the login; its own error is kept so clients see the real reason.
    #[error("server rejected login: {} ({})", .0.message, .0.code.as_deref().unwrap_or("no SQLSTATE"))]
    Login(ErrorFields),
    #[error("server requested {0}, which pgweir cannot answer with the configured credentials")]
    AuthUnsupported(String),
    #[error("authentication with the server failed: {0}")]
    Auth(#[from] AuthError),
    #[error("server broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("server connection I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("server closed the connection")]
    Closed,
    /// TLS negotiation with the server failed, or the server lacks TLS that sslmode requires.
    #[error("TLS with {addr} failed: {why}")]
    Tls { addr: String, why: String },
}

/// Why [`ServerConn::query_first_row`] failed.
#[derive(Debug, Error)]
pub enum QueryError {
    #[error("{}", .0.message)]
    Sql(ErrorFields),
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl From<std::io::Error> for QueryError {
    fn from(e: std::io::Error) -> Self {
        QueryError::Server(ServerError::Io(e))
    }
}

impl From<ProtocolError> for QueryError {
    fn from(e: ProtocolError) -> Self {
        QueryError::Server(ServerError::Protocol(e))
    }
}

/// A logged-in backend connection.
#[derive(Debug)]
pub struct ServerConn {
    pub(crate) stream: crate::net::Stream,
    /// Read buffer reused for the connection's lifetime.
    pub(crate) buf: BytesMut,
    /// Bytes on their way to the server (client messages, possibly rewritten).
    pub(crate) wbuf: BytesMut,
    /// Prepared statements this backend holds.
    pub statements: ServerStatements,
    /// What the unnamed Parse texts last sent here do (session state, resets).
    pub parse_memo: memo::ParseMemo,
    /// A client parsed the unnamed statement here. PostgreSQL keeps it for the session, so
    /// the next client's link closes it first: a Bind of "" without a Parse of its own must
    /// not run another client's statement.
    pub unnamed_statement: bool,
    pub id: ServerId,
    /// The server's own cancel key; clients never see it.
    pub backend_key: CancelKey,
    /// Where CancelRequests for this connection must go.
    pub addr: ServerAddr,
    /// What pgweir knows of the server's session parameters.
    pub params: ParamSet,
    /// The parameter form (see [`ParamSet::form`]) of the last client this connection was
    /// brought in line with, and `params.generation()` then: while both still match, the next
    /// client with that form needs no comparison at checkout.
    pub satisfies: Option<(std::sync::Arc<[u8]>, u64)>,
    pub created: Mono,
    pub last_used: Mono,
    /// Set by the pool that opened it: lists it among the pool's open servers until dropped.
    pub(crate) listed: Option<crate::pool::Listed>,
}

impl ServerConn {
    pub fn backend_pid(&self) -> i32 {
        self.backend_key.pid
    }

    /// True when the idle socket has data or EOF waiting: an idle backend says nothing unless it
    /// is going away (FATAL on shutdown/terminate) or something is wrong, so such a connection
    /// must not be handed out. At most one non-blocking syscall: while the reactor has seen
    /// nothing arrive since the last read came up short (tokio clears read readiness then), the
    /// peek is skipped, the common case for a connection coming back from the idle list.
    /// (Client sockets at login always peek: there a packet racing the reactor matters.)
    pub fn has_pending_input(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        self.stream.has_pending_input_if_readable()
    }

    /// After a reset query: the parameters pgweir SET without PostgreSQL reporting them may be
    /// back at their defaults (DISCARD ALL, RESET ALL), so they are forgotten and set again when
    /// a client needs them. Prepared statements are forgotten only when the server says it
    /// dropped them (`read_until_ready`): forgetting statements it kept would make pgweir
    /// prepare them again under names the server still holds (42P05).
    pub fn forget_session_state(&mut self) {
        self.params.retain(|name| params::REPORTED.contains(&name));
    }

    /// After a client's RESET or DISCARD ALL: the parameters pgweir SET without PostgreSQL
    /// reporting them are back at their defaults, unless the transaction the reset ran in rolls
    /// back (an explicit one, or the implicit one of a Query or a batch that a later error
    /// fails), and then nothing is reported either. Which it is is not known here, so they keep
    /// a value no setting has: the next checkout SETs or RESETs each of them either way.
    pub fn session_state_unknown(&mut self) {
        let unreported: Vec<String> = self
            .params
            .iter()
            .filter(|(name, _)| !params::REPORTED.contains(name))
            .map(|(name, _)| name.to_owned())
            .collect();
        for name in unreported {
            // PostgreSQL's values never hold a NUL byte.
            self.params.set(&name, b"\0");
        }
    }

    /// Best-effort polite close: Terminate lets PostgreSQL log a clean disconnect instead of
    /// "unexpected EOF". Never blocks; if the socket is not writable the close proceeds anyway.
    /// Over TLS the Terminate is skipped: a record cannot be written without possibly waiting.
    pub fn close(self) {
        let mut buf = BytesMut::with_capacity(5);
        messages::terminate(&mut buf);
        let _ = self.stream.try_write(&buf);
    }

    /// Runs one simple query and discards its results; used for health checks, resets and
    /// parameter synchronisation. Returns the first error the server reported, if any.
    pub async fn run_discarding(&mut self, sql: &str) -> Result<Option<ErrorFields>, ServerError> {
        self.run_raw_discarding(sql.as_bytes()).await
    }

    /// Runs one parameterised query (extended protocol, text format) and returns the columns of
    /// its first row, None when it returned no row. For small look-ups outside the hot path.
    pub async fn query_first_row(
        &mut self,
        sql: &str,
        params: &[&[u8]],
    ) -> Result<Option<Vec<Option<Vec<u8>>>>, QueryError> {
        let mut out = BytesMut::with_capacity(sql.len() + 64);
        messages::extended_query(&mut out, sql.as_bytes(), params);
        self.stream.write_all(&out).await?;
        let mut row = None;
        let mut error = None;
        loop {
            let (tag, body) = connect::read_message(self).await?;
            match tag {
                crate::proto::tag::backend::DATA_ROW if row.is_none() => {
                    let columns = messages::parse_data_row(&body)?;
                    row = Some(columns.into_iter().map(|c| c.map(<[u8]>::to_vec)).collect());
                }
                crate::proto::tag::backend::ERROR_RESPONSE if error.is_none() => {
                    error = Some(messages::parse_error_fields(&body));
                }
                crate::proto::tag::backend::PARAMETER_STATUS => connect::record_parameter(&mut self.params, &body)?,
                crate::proto::tag::backend::READY_FOR_QUERY => {
                    return match error {
                        Some(e) => Err(QueryError::Sql(e)),
                        None => Ok(row),
                    };
                }
                _ => {}
            }
        }
    }

    /// Runs `prelude` (when not empty) and then `sql`, as [`params::set_prelude`] and
    /// [`params::set_statements`] build them. Returns the first error the server reported; `sql`
    /// does not run after a refused prelude.
    pub async fn run_settings(&mut self, prelude: &[u8], sql: &[u8]) -> Result<Option<ErrorFields>, ServerError> {
        if !prelude.is_empty()
            && let Some(refused) = self.run_raw_discarding(prelude).await?
        {
            return Ok(Some(refused));
        }
        self.run_raw_discarding(sql).await
    }

    /// [`Self::run_discarding`] for SQL that is not UTF-8 (values in the client's encoding).
    pub async fn run_raw_discarding(&mut self, sql: &[u8]) -> Result<Option<ErrorFields>, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 6);
        messages::query(&mut out, sql);
        self.stream.write_all(&out).await?;
        connect::read_until_ready(self).await
    }
}

/// How long [`send_cancel`] waits for PostgreSQL to close the cancel connection (within the
/// cancel path's 5 s forwarding bound, so that a slow confirmation is told from a slow connect).
pub const CANCEL_CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// Sends a CancelRequest for `key` to the server at `addr` on a fresh connection and waits for
/// the server to close it, which happens after the postmaster has signalled the backend.
/// Ok(true): closed, the cancel is done with; Ok(false): sent, but no close within
/// [`CANCEL_CONFIRM_TIMEOUT`], so PostgreSQL may still act on it; Err: it was not (completely)
/// sent.
pub async fn send_cancel(addr: &ServerAddr, key: CancelKey) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let mut stream = addr.connect().await?;
    let mut buf = BytesMut::with_capacity(16);
    messages::cancel_request(&mut buf, key);
    stream.write_all(&buf).await?;
    let mut sink = [0u8; 64];
    // PostgreSQL answers a CancelRequest with nothing: any end of the connection (EOF, or a
    // reset) means the postmaster is done with it.
    Ok(tokio::time::timeout(CANCEL_CONFIRM_TIMEOUT, stream.read(&mut sink))
        .await
        .is_ok())
}
