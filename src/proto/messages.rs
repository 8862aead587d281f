//! Builders for the messages pgweir itself sends (to clients and to servers), and parsers for the
//! few backend messages it must understand during login and while tracking session state.

use bytes::{BufMut, BytesMut};

use super::startup::{CANCEL_REQUEST_CODE, CancelKey, PROTOCOL_3_0};
use super::tag::{TransactionStatus, backend, frontend};
use super::{ProtocolError, read_cstr, read_i32};

/// Writes `tag | len | body`, with `body` produced by `f`; the length is patched afterwards so
/// builders never compute sizes by hand.
pub(crate) fn put_message(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let len_pos = buf.len();
    buf.put_i32(0);
    f(buf);
    let len = (buf.len() - len_pos) as i32;
    buf[len_pos..len_pos + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// ErrorResponse / NoticeResponse severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The session ends after this message.
    Fatal,
    /// The current command failed; the session goes on.
    Error,
    Notice,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "FATAL",
            Severity::Error => "ERROR",
            Severity::Notice => "NOTICE",
            Severity::Warning => "WARNING",
        }
    }
}

/// An error or notice pgweir generates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    /// Five-character SQLSTATE.
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    /// What the user should do about it.
    pub hint: Option<String>,
}

impl PgError {
    pub fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Encodes as ErrorResponse (or NoticeResponse for notice/warning severities).
    pub fn encode(&self, buf: &mut BytesMut) {
        let tag = match self.severity {
            Severity::Fatal | Severity::Error => backend::ERROR_RESPONSE,
            Severity::Notice | Severity::Warning => backend::NOTICE_RESPONSE,
        };
        put_message(buf, tag, |b| {
            b.put_u8(b'S');
            put_cstr(b, self.severity.as_str().as_bytes());
            b.put_u8(b'V');
            put_cstr(b, self.severity.as_str().as_bytes());
            b.put_u8(b'C');
            put_cstr(b, self.code.as_bytes());
            b.put_u8(b'M');
            put_cstr(b, self.message.as_bytes());
            if let Some(d) = &self.detail {
                b.put_u8(b'D');
                put_cstr(b, d.as_bytes());
            }
            if let Some(h) = &self.hint {
                b.put_u8(b'H');
                put_cstr(b, h.as_bytes());
            }
            b.put_u8(0);
        });
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity.as_str(), self.code, self.message)
    }
}

pub fn ready_for_query(buf: &mut BytesMut, status: TransactionStatus) {
    put_message(buf, backend::READY_FOR_QUERY, |b| b.put_u8(status.as_byte()));
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put_message(buf, backend::COMMAND_COMPLETE, |b| put_cstr(b, tag.as_bytes()));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &[u8]) {
    put_message(buf, backend::PARAMETER_STATUS, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, key: CancelKey) {
    put_message(buf, backend::BACKEND_KEY_DATA, |b| {
        b.put_i32(key.pid);
        b.put_i32(key.secret);
    });
}

pub fn auth_ok(buf: &mut BytesMut) {
    put_message(buf, backend::AUTHENTICATION, |b| b.put_i32(0));
}

pub fn auth_md5_request(buf: &mut BytesMut, salt: [u8; 4]) {
    put_message(buf, backend::AUTHENTICATION, |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn auth_sasl_request(buf: &mut BytesMut, mechanisms: &[&str]) {
    put_message(buf, backend::AUTHENTICATION, |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put_message(buf, backend::AUTHENTICATION, |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put_message(buf, backend::AUTHENTICATION, |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

/// Tells a client asking for protocol 3.x (x > 0) or `_pq_` options that pgweir speaks 3.0.
pub fn negotiate_protocol_version(buf: &mut BytesMut, unsupported: &[&str]) {
    put_message(buf, backend::NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(PROTOCOL_3_0);
        b.put_i32(unsupported.len() as i32);
        for o in unsupported {
            put_cstr(b, o.as_bytes());
        }
    });
}

// --- frontend messages pgweir sends to PostgreSQL ---

pub fn startup_message<'a>(buf: &mut BytesMut, params: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
    let len_pos = buf.len();
    buf.put_i32(0);
    buf.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(buf, k.as_bytes());
        put_cstr(buf, v);
    }
    buf.put_u8(0);
    let len = (buf.len() - len_pos) as i32;
    buf[len_pos..len_pos + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn password_message(buf: &mut BytesMut, password: &[u8]) {
    put_message(buf, frontend::PASSWORD, |b| put_cstr(b, password));
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    put_message(buf, frontend::PASSWORD, |b| {
        put_cstr(b, mechanism.as_bytes());
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    put_message(buf, frontend::PASSWORD, |b| b.put_slice(data));
}

pub fn query(buf: &mut BytesMut, sql: &[u8]) {
    put_message(buf, frontend::QUERY, |b| put_cstr(b, sql));
}

/// Parse (unnamed statement, parameter types inferred) + Bind (text parameters, text results) +
/// Execute (all rows) + Sync: one extended-protocol query with parameters kept out of the SQL.
pub fn extended_query(buf: &mut BytesMut, sql: &[u8], params: &[&[u8]]) {
    put_message(buf, frontend::PARSE, |b| {
        put_cstr(b, b"");
        put_cstr(b, sql);
        b.put_i16(0);
    });
    put_message(buf, frontend::BIND, |b| {
        put_cstr(b, b"");
        put_cstr(b, b"");
        b.put_i16(0);
        b.put_i16(params.len() as i16);
        for p in params {
            b.put_i32(p.len() as i32);
            b.put_slice(p);
        }
        b.put_i16(0);
    });
    put_message(buf, frontend::EXECUTE, |b| {
        put_cstr(b, b"");
        b.put_i32(0);
    });
    sync(buf);
}

/// The columns of a DataRow; None for SQL NULL. Every length is checked against the body.
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, ProtocolError> {
    let bad = || ProtocolError::Malformed {
        what: "DataRow",
        why: "column lengths do not fit the message",
    };
    let count = body.get(..2).ok_or_else(bad)?;
    let count = u16::from_be_bytes([count[0], count[1]]) as usize;
    let mut rest = &body[2..];
    let mut columns = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let len = rest.get(..4).ok_or_else(bad)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        rest = &rest[4..];
        if len < 0 {
            columns.push(None);
        } else {
            let len = len as usize;
            columns.push(Some(rest.get(..len).ok_or_else(bad)?));
            rest = &rest[len..];
        }
    }
    Ok(columns)
}

pub fn terminate(buf: &mut BytesMut) {
    put_message(buf, frontend::TERMINATE, |_| {});
}

pub fn sync(buf: &mut BytesMut) {
    put_message(buf, frontend::SYNC, |_| {});
}

pub fn cancel_request(buf: &mut BytesMut, key: CancelKey) {
    buf.put_i32(16);
    buf.put_i32(CANCEL_REQUEST_CODE);
    buf.put_i32(key.pid);
    buf.put_i32(key.secret);
}

// --- parsers ---

/// An Authentication request from a server (or the `'R'` messages pgweir must recognise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Vec<u8>),
    SaslFinal(Vec<u8>),
    /// Kerberos, GSS, SSPI…: not supported by pgweir towards servers.
    Unsupported(i32),
}

/// Parses the body of an `'R'` message.
pub fn parse_auth_request(body: &[u8]) -> Result<AuthRequest, ProtocolError> {
    let malformed = |why| ProtocolError::Malformed {
        what: "Authentication",
        why,
    };
    let code = read_i32(body, 0).ok_or(malformed("no code"))?;
    let rest = &body[4..];
    Ok(match code {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => {
            let salt: [u8; 4] = rest.try_into().map_err(|_| malformed("md5 salt is not 4 bytes"))?;
            AuthRequest::Md5 { salt }
        }
        10 => {
            let mut mechanisms = Vec::new();
            let mut pos = 0;
            loop {
                let (m, next) = read_cstr(rest, pos).ok_or(malformed("unterminated mechanism"))?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(String::from_utf8_lossy(m).into_owned());
                pos = next;
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(rest.to_vec()),
        12 => AuthRequest::SaslFinal(rest.to_vec()),
        other => AuthRequest::Unsupported(other),
    })
}

/// The fields of an ErrorResponse or NoticeResponse that pgweir looks at.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub severity: String,
    /// SQLSTATE; PostgreSQL always sends one, but a hostile or broken server might not, so it is
    /// optional here and defaulted by callers (PgBouncer CVE-2026-6666 was exactly this).
    pub code: Option<String>,
    pub message: String,
    /// PostgreSQL's DETAIL, when it gave one.
    pub detail: Option<String>,
}

pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields::default();
    let mut pos = 0;
    while let Some(&kind) = body.get(pos) {
        if kind == 0 {
            break;
        }
        let Some((value, next)) = read_cstr(body, pos + 1) else {
            break;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'S' => fields.severity = value,
            b'C' => fields.code = Some(value),
            b'M' => fields.message = value,
            b'D' => fields.detail = Some(value),
            _ => {}
        }
        pos = next;
    }
    fields
}

/// Parses a ParameterStatus body into (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let malformed = ProtocolError::Malformed {
        what: "ParameterStatus",
        why: "unterminated string",
    };
    let (name, next) = read_cstr(body, 0).ok_or(malformed.clone())?;
    let (value, _) = read_cstr(body, next).ok_or(malformed)?;
    Ok((name, value))
}

pub fn parse_backend_key_data(body: &[u8]) -> Result<CancelKey, ProtocolError> {
    match (read_i32(body, 0), read_i32(body, 4)) {
        (Some(pid), Some(secret)) => Ok(CancelKey { pid, secret }),
        _ => Err(ProtocolError::Malformed {
            what: "BackendKeyData",
            why: "shorter than 8 bytes",
        }),
    }
}

/// The mechanism name and data of a SASLInitialResponse body.
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let malformed = |why| ProtocolError::Malformed {
        what: "SASLInitialResponse",
        why,
    };
    let (mech, next) = read_cstr(body, 0).ok_or(malformed("unterminated mechanism"))?;
    let len = read_i32(body, next).ok_or(malformed("no data length"))?;
    let data = &body[next + 4..];
    if len == -1 {
        return Ok((mech, &[]));
    }
    if len < 0 || len as usize != data.len() {
        return Err(malformed("data length does not match"));
    }
    Ok((mech, data))
}

/// The password of a PasswordMessage body (NUL-terminated).
pub fn parse_password(body: &[u8]) -> Result<&[u8], ProtocolError> {
    match read_cstr(body, 0) {
        Some((pw, next)) if next == body.len() => Ok(pw),
        _ => Err(ProtocolError::Malformed {
            what: "PasswordMessage",
            why: "not a single NUL-terminated string",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame_at;

    #[test]
    fn error_response_round_trip() {
        let mut buf = BytesMut::new();
        PgError::error("53300", "pool full")
            .with_hint("raise pool_size")
            .encode(&mut buf);
        let f = frame_at(&buf, 0, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'E');
        let fields = parse_error_fields(&buf[f.body_range()]);
        assert_eq!(fields.code.as_deref(), Some("53300"));
        assert_eq!(fields.message, "pool full");
        assert_eq!(fields.severity, "ERROR");
    }

    #[test]
    fn auth_requests() {
        assert_eq!(parse_auth_request(&[0, 0, 0, 0]), Ok(AuthRequest::Ok));
        assert_eq!(
            parse_auth_request(&[0, 0, 0, 5, 1, 2, 3, 4]),
            Ok(AuthRequest::Md5 { salt: [1, 2, 3, 4] })
        );
        assert!(parse_auth_request(&[0, 0, 0, 5, 1]).is_err());
        assert_eq!(
            parse_auth_request(b"\0\0\0\x0aSCRAM-SHA-256\0\0"),
            Ok(AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256".into()]
            })
        );
        assert!(parse_auth_request(b"\0\0\0\x0aSCRAM").is_err());
        assert!(parse_auth_request(b"\0\0").is_err());
    }

    #[test]
    fn sasl_initial_response_lengths() {
        let mut buf = BytesMut::new();
        sasl_initial_response(&mut buf, "SCRAM-SHA-256", b"n,,n=,r=abc");
        let (mech, data) = parse_sasl_initial_response(&buf[5..]).unwrap();
        assert_eq!(mech, b"SCRAM-SHA-256");
        assert_eq!(data, b"n,,n=,r=abc");
        assert!(parse_sasl_initial_response(b"X\0\0\0\0\x09abc").is_err());
    }
}
