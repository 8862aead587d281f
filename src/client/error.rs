//! Why a client session ended.

use thiserror::Error;

use crate::pool::PoolError;
use crate::proto::ProtocolError;
use crate::server::ServerError;

/// A session-ending error. Each knows its side, so logs can keep client churn quiet and server
/// faults loud.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("client I/O error: {0}")]
    ClientIo(#[source] std::io::Error),
    #[error("client protocol violation: {0}")]
    ClientProtocol(#[from] ProtocolError),
    #[error("client login failed: {0}")]
    Login(String),
    #[error("client login timed out (client_login_timeout)")]
    LoginTimeout,
    #[error("idle in transaction for longer than idle_transaction_timeout")]
    IdleTransactionTimeout,
    #[error("a query ran longer than query_timeout")]
    QueryTimeout,
    #[error("server connection failed: {0}")]
    Server(#[from] ServerError),
    #[error("server I/O error: {0}")]
    ServerIo(#[source] std::io::Error),
    #[error("pool error: {0}")]
    Pool(#[from] PoolError),
    #[error("pgweir is shutting down")]
    Shutdown,
    #[error("terminated by an administrator")]
    Killed,
    #[error("its database was removed from the configuration")]
    DatabaseRemoved,
}

/// Why logins failed, as bounded metric labels (indexes of [`LoginFailure`]).
pub const LOGIN_FAILURE_REASONS: [&str; 11] = [
    "bad_password",
    "unknown_user",
    "hba_denied",
    "timeout",
    "tls_handshake",
    "tls_required",
    "protocol",
    "unknown_database",
    "server_unavailable",
    "client_gone",
    "other",
];

/// Why one login failed; the discriminant indexes [`LOGIN_FAILURE_REASONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    BadPassword,
    UnknownUser,
    HbaDenied,
    Timeout,
    TlsHandshake,
    TlsRequired,
    Protocol,
    UnknownDatabase,
    ServerUnavailable,
    ClientGone,
    Other,
}

/// Why client sessions ended, as bounded metric labels.
pub const DISCONNECT_REASONS: [&str; 11] = [
    "normal",
    "client_io",
    "client_protocol",
    "login_failed",
    "idle_transaction_timeout",
    "server_error",
    "pool_error",
    "shutdown",
    "killed",
    "query_timeout",
    "database_removed",
];

impl ClientError {
    /// Index into [`DISCONNECT_REASONS`].
    pub fn reason_index(&self) -> usize {
        match self {
            ClientError::ClientIo(_) => 1,
            ClientError::ClientProtocol(_) => 2,
            ClientError::Login(_) | ClientError::LoginTimeout => 3,
            ClientError::IdleTransactionTimeout => 4,
            ClientError::Server(_) | ClientError::ServerIo(_) => 5,
            ClientError::Pool(_) => 6,
            ClientError::Shutdown => 7,
            ClientError::Killed => 8,
            ClientError::QueryTimeout => 9,
            ClientError::DatabaseRemoved => 10,
        }
    }

    /// Errors caused by clients coming and going, logged at debug level.
    pub fn is_client_churn(&self) -> bool {
        matches!(
            self,
            ClientError::ClientIo(_)
                | ClientError::ClientProtocol(_)
                | ClientError::Login(_)
                | ClientError::LoginTimeout
        )
    }
}
