//! Authentication, sans-IO: bytes in, bytes out. Nothing here touches a socket, a clock or
//! tokio, so every exchange can be driven (and tested) without a network, and the async
//! layers (`client::handshake` towards clients, `server::connect` towards PostgreSQL) only
//! move the bytes these functions produce.
//!
//! - [`scram`]: SCRAM-SHA-256 in both directions. [`scram::ScramServer`] verifies a client
//!   against a stored verifier and recovers its ClientKey; [`scram::ScramClient`] logs in to
//!   PostgreSQL with a password or with those recovered keys (SCRAM pass-through), so pgweir
//!   never needs to know plaintext passwords.
//! - [`md5`]: PostgreSQL's legacy md5 challenge/response, computable from the stored
//!   `md5…` hash alone.
//!
//! Everything a peer sends is distrusted: malformed, truncated or hostile input yields an
//! [`AuthError`], never a panic, and secrets are compared in constant time.

pub mod md5;
pub mod scram;

use thiserror::Error;

/// Why an authentication step failed.
///
/// The messages are meant for pgweir's logs. A client should only ever be told that
/// password authentication failed: finer detail would help someone probing for user names
/// or verifiers.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The peer's message does not follow the SCRAM grammar (RFC 5802 §7).
    #[error("malformed SCRAM message: {0}")]
    MalformedMessage(&'static str),
    /// A stored SCRAM verifier (pg_authid / userlist form) could not be parsed.
    #[error("invalid SCRAM verifier: {0}")]
    InvalidVerifier(&'static str),
    /// The client's proof does not match the verifier (or the user does not exist).
    #[error("password authentication failed")]
    WrongPassword,
    /// The server's signature is wrong: it does not hold our verifier, so it may be an
    /// impostor, and the login must not proceed.
    #[error("server signature does not match: the server does not know the password")]
    ServerSignatureMismatch,
    /// The nonce in a message is not the one this exchange established.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    /// The client demanded channel binding (`p=` gs2 flag), which pgweir does not offer.
    #[error("SCRAM channel binding is not supported")]
    ChannelBindingUnsupported,
    /// The peer asked for a SCRAM feature pgweir (like PostgreSQL) does not implement,
    /// such as an authorization identity or a mandatory extension.
    #[error("unsupported SCRAM feature: {0}")]
    Unsupported(&'static str),
    /// The SASL mechanism named by the peer is not SCRAM-SHA-256.
    #[error("unsupported SASL mechanism: {0}")]
    UnsupportedMechanism(String),
    /// The server ended the exchange with an `e=` attribute.
    #[error("server reported a SCRAM error: {0}")]
    ServerError(String),
    /// A step was called out of order, or again after the exchange ended.
    #[error("SCRAM message out of order")]
    OutOfOrder,
}
