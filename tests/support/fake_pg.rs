//! A minimal fake PostgreSQL backend login, for tests and benches that need a server which
//! misbehaves on purpose (never answers) or costs nothing (answers every Query at once).
//! Shared with `benches/pool.rs` through `#[path]`, so it depends on tokio only.

#![allow(dead_code)]

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Appends one backend message.
pub fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

/// Plays PostgreSQL with `ssl = off` and trust authentication up to the first ReadyForQuery:
/// answers an SSLRequest 'N', reads the StartupMessage, and sends AuthenticationOk, the usual
/// ParameterStatus reports (server_version `version`), BackendKeyData and ReadyForQuery 'I'.
pub async fn trust_login(s: &mut TcpStream, version: &str) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await?;
        let mut body = vec![0u8; (i32::from_be_bytes(len) as usize).saturating_sub(4)];
        s.read_exact(&mut body).await?;
        if body == [0x04, 0xd2, 0x16, 0x2f] {
            s.write_all(b"N").await?;
            continue;
        }
        break;
    }
    let mut out = Vec::new();
    msg(&mut out, b'R', &0i32.to_be_bytes());
    for (k, v) in [
        ("server_version", version),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
    ] {
        msg(&mut out, b'S', format!("{k}\0{v}\0").as_bytes());
    }
    msg(&mut out, b'K', &[0, 0, 0, 42, 0, 0, 0, 7]);
    msg(&mut out, b'Z', b"I");
    s.write_all(&out).await
}
