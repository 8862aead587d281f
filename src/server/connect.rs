//! Connecting and logging in to PostgreSQL, and the small request/response helper used outside
//! the hot path (login, parameter sync, health checks, resets).

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use rustls::pki_types::ServerName;

use super::{ParamSet, ServerConn, ServerError, ServerId};
use crate::auth::md5;
use crate::auth::scram::{ClientSecret, SCRAM_SHA_256, ScramClient, ScramKeys};
use crate::clock::Mono;
use crate::config::{ServerTlsConfig, ServerTlsMode};
use crate::net::{ServerAddr, Sock, Stream};
use crate::proto::messages::{self, AuthRequest, ErrorFields};
use crate::proto::startup::CancelKey;
use crate::proto::tag::backend;
use crate::proto::{ProtocolError, frame_at};

/// SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Asks the server for TLS per sslmode. Exactly one byte of answer is read, so nothing a man in
/// the middle sends after it can be taken as part of the TLS session (CVE-2021-23222).
///
/// Like libpq, no TLS over a Unix socket: the server would refuse it, and the socket never
/// leaves the host.
async fn negotiate_tls(mut tcp: Sock, target: &ServerTarget, tls: &ServerTlsConfig) -> Result<Stream, ServerError> {
    if matches!(tcp, Sock::Unix(_)) {
        return Ok(Stream::Plain(tcp));
    }
    let (
        ServerTlsMode::Prefer | ServerTlsMode::Require | ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull,
        Some(connector),
    ) = (tls.mode, &tls.connector)
    else {
        return Ok(Stream::Plain(tcp));
    };
    let fail = |why: String| ServerError::Tls {
        addr: target.addr_string(),
        why,
    };
    tcp.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == ServerTlsMode::Prefer => return Ok(Stream::Plain(tcp)),
        b'N' => {
            return Err(fail(format!(
                "the server does not offer TLS, which server_tls.mode = {:?} requires (set ssl = on in postgresql.conf, or lower the mode)",
                tls.mode
            )));
        }
        other => return Err(fail(format!("unexpected answer {:?} to SSLRequest", other as char))),
    }
    let name = tls.server_name.clone().unwrap_or_else(|| target.host.clone());
    let name = ServerName::try_from(name).map_err(|e| fail(format!("invalid server name for TLS: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(connector.config.clone());
    let tls_stream = connector.connect(name, tcp).await.map_err(|e| fail(e.to_string()))?;
    Ok(Stream::Tls(Box::new(tls_stream.into())))
}

/// Backend messages during login are small; a bigger one means something is wrong.
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
}

impl ServerTarget {
    pub fn addr_string(&self) -> String {
        crate::net::describe_endpoint(&self.host, self.port)
    }
}

/// What pgweir can prove to the server.
#[derive(Clone)]
pub enum ServerSecret {
    Plain(String),
    /// "md5…" as stored in pg_authid; answers md5 challenges only.
    Md5Stored(String),
    /// Keys recovered from a client's SCRAM login (pass-through); answers SCRAM only.
    Scram(ScramKeys),
    None,
}

impl From<&crate::config::Secret> for ServerSecret {
    /// What a stored secret proves to PostgreSQL by itself: a plain password anything, an md5
    /// hash md5 challenges; a SCRAM verifier nothing (pass-through needs a client's keys).
    fn from(secret: &crate::config::Secret) -> Self {
        use crate::config::Secret;
        match secret {
            Secret::Plain(p) => ServerSecret::Plain(p.clone()),
            Secret::Md5(m) => ServerSecret::Md5Stored(m.clone()),
            Secret::Scram(_) | Secret::None => ServerSecret::None,
        }
    }
}

impl std::fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach logs.
        f.write_str(match self {
            ServerSecret::Plain(_) => "Plain(..)",
            ServerSecret::Md5Stored(_) => "Md5Stored(..)",
            ServerSecret::Scram(_) => "Scram(..)",
            ServerSecret::None => "None",
        })
    }
}

/// Opens and authenticates a server connection within `timeout`.
pub async fn connect(
    id: ServerId,
    target: &ServerTarget,
    secret: &ServerSecret,
    timeout: Duration,
    keepalive: Option<Duration>,
    tls: &ServerTlsConfig,
) -> Result<ServerConn, ServerError> {
    match tokio::time::timeout(timeout, connect_inner(id, target, secret, keepalive, tls)).await {
        Ok(r) => r,
        Err(_) => Err(ServerError::ConnectTimeout {
            addr: target.addr_string(),
            timeout,
        }),
    }
}

async fn connect_inner(
    id: ServerId,
    target: &ServerTarget,
    secret: &ServerSecret,
    keepalive: Option<Duration>,
    tls: &ServerTlsConfig,
) -> Result<ServerConn, ServerError> {
    let tcp = crate::net::connect(&target.host, target.port, keepalive)
        .await
        .map_err(|source| ServerError::Connect {
            addr: target.addr_string(),
            source,
        })?;
    let addr = match &tcp {
        Sock::Tcp(s) => ServerAddr::Tcp(s.peer_addr()?),
        Sock::Own(s) => ServerAddr::Tcp(s.peer_addr()?),
        Sock::Unix(_) => ServerAddr::Unix(crate::net::socket_path(&target.host, target.port).into()),
    };
    let stream = negotiate_tls(tcp, target, tls).await?;
    let now = Mono::now();
    let mut conn = ServerConn {
        stream,
        buf: BytesMut::with_capacity(8192),
        wbuf: BytesMut::new(),
        statements: Default::default(),
        parse_memo: Default::default(),
        unnamed_statement: false,
        id,
        backend_key: CancelKey { pid: 0, secret: 0 },
        addr,
        params: ParamSet::default(),
        satisfies: None,
        created: now,
        last_used: now,
        listed: None,
    };
    let mut out = BytesMut::with_capacity(256);
    messages::startup_message(
        &mut out,
        [("user", target.user.as_bytes()), ("database", target.dbname.as_bytes())],
    );
    conn.stream.write_all(&out).await?;

    let mut scram: Option<ScramClient> = None;
    loop {
        let (tag, body) = read_message(&mut conn).await?;
        match tag {
            backend::AUTHENTICATION => {
                out.clear();
                match messages::parse_auth_request(&body)? {
                    // A server (or a man in the middle) that skips SASLFinal would otherwise log
                    // us in without proving it knows the verifier.
                    AuthRequest::Ok if scram.as_ref().is_some_and(|c| !c.is_verified()) => {
                        return Err(ServerError::AuthUnsupported(
                            "AuthenticationOk before the SCRAM exchange completed".into(),
                        ));
                    }
                    AuthRequest::Ok => {}
                    AuthRequest::Cleartext => match secret {
                        ServerSecret::Plain(pw) => messages::password_message(&mut out, pw.as_bytes()),
                        _ => return Err(ServerError::AuthUnsupported("a cleartext password".into())),
                    },
                    AuthRequest::Md5 { salt } => {
                        let response = match secret {
                            ServerSecret::Plain(pw) => md5::md5_response(&target.user, pw, salt),
                            ServerSecret::Md5Stored(stored) => md5::md5_response_from_stored(stored, salt),
                            _ => return Err(ServerError::AuthUnsupported("an md5 password".into())),
                        };
                        messages::password_message(&mut out, response.as_bytes());
                    }
                    AuthRequest::Sasl { mechanisms } => {
                        if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                            return Err(ServerError::AuthUnsupported(format!("SASL mechanisms {mechanisms:?}")));
                        }
                        let client_secret = match secret {
                            ServerSecret::Plain(pw) => ClientSecret::Password(pw.clone()),
                            ServerSecret::Scram(keys) => ClientSecret::Keys(keys.clone()),
                            _ => {
                                return Err(ServerError::AuthUnsupported(
                                    "SCRAM-SHA-256 (configure a plain-text password, or log in once with SCRAM so pass-through keys are known)".into(),
                                ));
                            }
                        };
                        let mut client = ScramClient::new(client_secret);
                        let first = client.client_first();
                        messages::sasl_initial_response(&mut out, SCRAM_SHA_256, &first);
                        scram = Some(client);
                    }
                    AuthRequest::SaslContinue(data) => {
                        let client = scram.as_mut().ok_or(ProtocolError::Unexpected {
                            tag: 'R',
                            phase: "SASL continue without SASL start",
                        })?;
                        let reply = client.handle_server_first(&data)?;
                        messages::sasl_response(&mut out, &reply);
                    }
                    AuthRequest::SaslFinal(data) => {
                        let client = scram.as_mut().ok_or(ProtocolError::Unexpected {
                            tag: 'R',
                            phase: "SASL final without SASL start",
                        })?;
                        client.handle_server_final(&data)?;
                    }
                    AuthRequest::Unsupported(code) => {
                        return Err(ServerError::AuthUnsupported(format!("authentication method {code}")));
                    }
                }
                if !out.is_empty() {
                    conn.stream.write_all(&out).await?;
                }
            }
            backend::PARAMETER_STATUS => record_parameter(&mut conn.params, &body)?,
            backend::BACKEND_KEY_DATA => conn.backend_key = messages::parse_backend_key_data(&body)?,
            backend::ERROR_RESPONSE => return Err(ServerError::Login(messages::parse_error_fields(&body))),
            backend::READY_FOR_QUERY => return Ok(conn),
            backend::NOTICE_RESPONSE | backend::NEGOTIATE_PROTOCOL_VERSION => {}
            other => {
                return Err(ProtocolError::Unexpected {
                    tag: other as char,
                    phase: "server login",
                }
                .into());
            }
        }
    }
}

pub(super) fn record_parameter(params: &mut ParamSet, body: &[u8]) -> Result<(), ProtocolError> {
    let (name, value) = messages::parse_parameter_status(body)?;
    if let Ok(name) = std::str::from_utf8(name) {
        params.set(name, value);
    }
    Ok(())
}

/// Reads one whole message into an owned body. Only for the login and maintenance paths: the
/// session's hot path frames in place and forwards bytes.
pub(super) async fn read_message(conn: &mut ServerConn) -> Result<(u8, BytesMut), ServerError> {
    loop {
        if let Some(frame) = frame_at(&conn.buf, 0, MAX_LOGIN_MESSAGE).map_err(ProtocolError::from)? {
            let mut msg = conn.buf.split_to(frame.total_len);
            msg.advance(crate::proto::frame::HEADER_LEN);
            return Ok((frame.tag, msg));
        }
        conn.buf.reserve(8192);
        if conn.stream.read_buf(&mut conn.buf).await? == 0 {
            return Err(ServerError::Closed);
        }
    }
}

/// Reads and discards messages until ReadyForQuery, keeping ParameterStatus reports. Returns the
/// first ErrorResponse seen, if any.
pub(super) async fn read_until_ready(conn: &mut ServerConn) -> Result<Option<ErrorFields>, ServerError> {
    let mut first_error = None;
    loop {
        let (tag, body) = read_message(conn).await?;
        match tag {
            backend::READY_FOR_QUERY => return Ok(first_error),
            backend::PARAMETER_STATUS => record_parameter(&mut conn.params, &body)?,
            // The server dropped its prepared statements (a reset query that is, or includes,
            // DISCARD ALL or DEALLOCATE ALL): so does pgweir's record of them. A reset query
            // that keeps them (RESET ALL, say) leaves the record as it is.
            backend::COMMAND_COMPLETE if matches!(&body[..], b"DISCARD ALL\0" | b"DEALLOCATE ALL\0") => {
                conn.statements.clear();
            }
            backend::ERROR_RESPONSE if first_error.is_none() => {
                first_error = Some(messages::parse_error_fields(&body));
            }
            _ => {}
        }
    }
}
