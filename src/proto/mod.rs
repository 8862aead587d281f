//! PostgreSQL v3 wire protocol, sans-IO: bytes in, values or bytes out. Nothing here touches a
//! socket or a runtime, so it can be unit tested and fuzzed on its own.
//!
//! The hot path never decodes a whole message: [`frame`] reads the 5-byte header (tag + length),
//! distrusts the length, and the session forwards complete frames verbatim. Only the handful of
//! messages pgweir must understand are parsed: the startup packet, authentication exchanges,
//! ParameterStatus, BackendKeyData, ErrorResponse fields and ReadyForQuery's status byte.
//!
//! pgwire is deliberately not used: its decoders replace non-UTF-8 bytes (a LATIN1 startup
//! parameter would be silently altered) and do not enforce declared lengths (crates.md §1.6),
//! and the builders pgweir needs are a few dozen lines.

pub mod frame;
pub mod messages;
pub mod startup;
pub mod tag;

use thiserror::Error;

pub use frame::{Frame, FrameError, frame_at};
pub use tag::TransactionStatus;

/// A message from the peer that breaks the protocol. The session ending because of it knows
/// which side sent it; this type only says what was wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("malformed {what} message: {why}")]
    Malformed { what: &'static str, why: &'static str },
    #[error("unsupported frontend protocol {major}.{minor}: pgweir speaks 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("unexpected message {tag:?} during {phase}")]
    Unexpected { tag: char, phase: &'static str },
}

/// Reads a NUL-terminated string starting at `pos`; returns it and the position after the NUL.
pub(crate) fn read_cstr(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(pos..)?;
    let nul = memchr::memchr(0, rest)?;
    Some((&rest[..nul], pos + nul + 1))
}

pub(crate) fn read_i32(buf: &[u8], pos: usize) -> Option<i32> {
    let b = buf.get(pos..pos + 4)?;
    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}
