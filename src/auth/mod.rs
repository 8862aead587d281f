//! Sans-IO authentication: SCRAM-SHA-256 in both directions (pgweir verifying a client, and
//! pgweir logging in to PostgreSQL, including SCRAM pass-through with recovered keys) and md5.
//! Bytes in, bytes out; no sockets, no runtime. Every field a peer sends is distrusted.

pub mod md5;
pub mod scram;

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("malformed SCRAM message: {0}")]
    MalformedMessage(&'static str),
    #[error("invalid SCRAM verifier: {0}")]
    InvalidVerifier(&'static str),
    #[error("password authentication failed")]
    WrongPassword,
    #[error("server signature does not match: the server does not know the password")]
    ServerSignatureMismatch,
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    #[error("channel binding is not supported")]
    ChannelBindingUnsupported,
    #[error("server reported a SCRAM error: {0}")]
    ServerError(String),
    #[error("SCRAM message out of order")]
    OutOfOrder,
}
