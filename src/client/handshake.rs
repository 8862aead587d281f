//! Client login: SSLRequest/GSSENCRequest refusal, CancelRequest, StartupMessage, password
//! authentication, database lookup and the welcome (ParameterStatus, BackendKeyData,
//! ReadyForQuery) — all without a server when the pool already knows its parameters and what
//! PostgreSQL reports for the client's startup values.

// `Failure` carries the reply to send; it is large, but login errors happen once per
// connection at most, so boxing would only add noise.
#![allow(clippy::result_large_err)]

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use crate::net::{PeerAddr, Sock};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::auth_query::{LookupTarget, Stored};
use super::cancel::CancelSlot;
use super::users::{UserDirectory, UserEntry};
use super::{ClientContext, ClientError, LoginFailure};
use crate::auth::scram::{ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramKeys, ScramServer};
use crate::auth::{AuthError, md5};
use crate::config::hba::{self, HbaVerdict};
use crate::config::{AuthType, ClientTlsMode, Config, Secret};
use crate::net::stream::TlsConn;
use crate::net::{Stream, tls};
use crate::pool::{Pool, PoolError};
use crate::proto::messages::{self, ErrorFields, PgError};
use crate::proto::startup::{self, CancelKey, MAX_STARTUP_LEN, StartupPacket, StartupParams};
use crate::proto::tag::{TransactionStatus, frontend};
use crate::proto::{ProtocolError, frame_at};
use crate::server::params::{self, LoginTemplate, ParamSet};
use crate::server::{ServerError, ServerSecret, ServerTarget};

/// Password messages are tiny; anything bigger during login is hostile or broken.
const MAX_LOGIN_MESSAGE: usize = 10_000;

/// A logged-in client, ready for the transaction loop.
pub(super) struct LoggedIn {
    pub client: Stream,
    pub pool: Pool,
    /// Session parameters the client expects on whichever server serves it (the login
    /// template's until the session changes one).
    pub params: Arc<ParamSet>,
    /// `params.form()`, interned.
    pub form: Arc<[u8]>,
    pub application_name: Arc<str>,
    pub key: CancelKey,
    pub slot: Arc<CancelSlot>,
    /// What the client sent after its login without waiting for the welcome (a pipelined
    /// first query): read with the startup packet, the session's first input. Mostly empty.
    pub pending: Vec<u8>,
}

/// Runs the login. `Ok(None)` means the connection was a CancelRequest (or closed politely).
/// Failures are counted by reason for the login-failures metric.
pub(super) async fn run(tcp: Sock, peer: &PeerAddr, ctx: &ClientContext) -> Result<Option<LoggedIn>, ClientError> {
    attempt(tcp, peer, ctx).await.map_err(|(reason, error)| {
        ctx.login_failures[reason as usize].fetch_add(1, Ordering::Relaxed);
        error
    })
}

async fn attempt(
    tcp: Sock,
    peer: &PeerAddr,
    ctx: &ClientContext,
) -> Result<Option<LoggedIn>, (LoginFailure, ClientError)> {
    // The configuration for the connection's start (timeout, TLS, the pre-startup packets);
    // `login` takes its own when the StartupMessage is in, for the decisions about who logs in.
    let config = ctx.config.load_full();
    let timeout = config.listen.client_login_timeout;
    let deadline = Instant::now() + timeout;
    let (mut conn, Some(startup)) = negotiate_until_startup(tcp, &config, ctx, deadline).await? else {
        return Ok(None);
    };
    // The certificate hash this connection was served with, for SCRAM-SHA-256-PLUS.
    let end_point = match conn.stream.is_tls() {
        true => config.tls.acceptor.as_ref().and_then(|a| a.end_point.as_deref()),
        false => None,
    };
    let logged_in = login(&mut conn, peer, ctx, end_point, startup);
    match tokio::time::timeout_at(deadline, logged_in).await {
        Ok(Ok(Some(done))) => Ok(Some(LoggedIn {
            client: conn.stream,
            pool: done.pool,
            params: done.params,
            form: done.form,
            application_name: done.application_name,
            key: done.key,
            slot: done.slot,
            pending: conn.carry,
        })),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(Failure { reason, error, reply })) => {
            if let Some(reply) = reply {
                let _ = send_error(&mut conn.stream, &reply).await;
            }
            Err((reason, error))
        }
        Err(_) => Err(login_timed_out(&mut conn.stream, timeout).await),
    }
}

/// The exchange before the StartupMessage: SSLRequest (and TLS), GSSENCRequest, direct TLS,
/// CancelRequest (None: handled, the connection ends).
async fn negotiate_until_startup(
    tcp: Sock,
    config: &Config,
    ctx: &ClientContext,
    deadline: Instant,
) -> Result<(LoginConn, Option<StartupParams>), (LoginFailure, ClientError)> {
    // TLS is for the network: like PostgreSQL, pgweir answers 'N' to an SSLRequest on its Unix
    // socket, whose file permissions are the protection.
    let mut may_start_tls = config.tls.acceptor.is_some() && matches!(tcp, Sock::Tcp(_));
    let mut conn = LoginConn {
        stream: Stream::Plain(tcp),
        carry: Vec::new(),
    };
    loop {
        let negotiated = negotiate(&mut conn, config, may_start_tls, ctx);
        let step = match tokio::time::timeout_at(deadline, negotiated).await {
            Ok(Ok(step)) => step,
            Ok(Err(Failure { reason, error, reply })) => {
                if let Some(reply) = reply {
                    let _ = send_error(&mut conn.stream, &reply).await;
                }
                return Err((reason, error));
            }
            Err(_) => return Err(login_timed_out(&mut conn.stream, config.listen.client_login_timeout).await),
        };
        match step {
            Negotiated::Startup(params) => return Ok((conn, Some(params))),
            Negotiated::Done => return Ok((conn, None)),
            Negotiated::StartTls { direct } => {
                may_start_tls = false;
                let Stream::Plain(tcp) = conn.stream else {
                    return Err(tls_failure("TLS requested twice".into()));
                };
                // Boxed: a TLS handshake's state is large, and plaintext logins need none of it.
                conn.stream = Box::pin(start_tls(tcp, config, deadline, direct)).await?;
            }
        }
    }
}

/// Answers a connection over max_client_conn as PostgreSQL answers one over max_connections:
/// the exchange before the StartupMessage runs as for any client, so a CancelRequest is still
/// acted on (when a proxy is saturated is when one is most needed) and a client that requires
/// TLS gets it and so reads the refusal instead of "server does not support SSL"; then the
/// StartupMessage is answered with `reply`. Bounded by `within`.
pub(crate) async fn refuse(tcp: Sock, ctx: &ClientContext, reply: PgError, within: std::time::Duration) {
    let config = ctx.config.load_full();
    if let Ok((mut conn, Some(_))) = negotiate_until_startup(tcp, &config, ctx, Instant::now() + within).await {
        let _ = tokio::time::timeout(within, async {
            let _ = send_error(&mut conn.stream, &reply).await;
            let _ = conn.stream.shutdown().await;
        })
        .await;
    }
}

fn tls_failure(why: String) -> (LoginFailure, ClientError) {
    (LoginFailure::TlsHandshake, ClientError::Login(why))
}

/// The TLS handshake after an SSLRequest (or a direct TLS start): the client's stream from then
/// on. Failures here are the client's business (wrong CA, stuffed bytes, no common cipher): it
/// gets a TLS alert from rustls, and the connection ends.
async fn start_tls(
    tcp: Sock,
    config: &Config,
    deadline: Instant,
    direct: bool,
) -> Result<Stream, (LoginFailure, ClientError)> {
    let Some(acceptor) = config.tls.acceptor.as_ref() else {
        return Err(tls_failure("TLS is not configured".into()));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(acceptor.config.clone());
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => TlsConn::from(tls),
        Ok(Err(e)) => return Err(tls_failure(format!("TLS handshake failed: {e}"))),
        Err(_) => return Err((LoginFailure::Timeout, ClientError::LoginTimeout)),
    };
    if direct && tls.alpn_protocol() != Some(tls::ALPN_POSTGRESQL) {
        // PostgreSQL 17 requires ALPN on direct TLS so that a TLS connection meant for another
        // protocol cannot be replayed against the database.
        return Err(tls_failure("direct TLS connection without ALPN \"postgresql\"".into()));
    }
    Ok(Stream::Tls(Box::new(tls)))
}

async fn login_timed_out(client: &mut Stream, timeout: std::time::Duration) -> (LoginFailure, ClientError) {
    let e = PgError::fatal(
        "08P01",
        "pgweir: client login did not complete within client_login_timeout",
    )
    .with_hint(format!(
        "The client must finish startup and authentication within {timeout:?}."
    ));
    let _ = send_error(client, &e).await;
    (LoginFailure::Timeout, ClientError::LoginTimeout)
}

/// What the pre-startup exchange ended with.
enum Negotiated {
    /// A StartupMessage: go on with authentication.
    Startup(StartupParams),
    /// The client wants TLS (after SSLRequest + 'S', or directly, PostgreSQL 17 style).
    StartTls { direct: bool },
    /// A CancelRequest was handled; the connection ends.
    Done,
}

/// First byte of a TLS handshake record: a PostgreSQL 17 client with sslnegotiation=direct.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Reads packets until a StartupMessage, answering SSLRequest/GSSENCRequest and handling
/// CancelRequest. Bytes a client or a man in the middle sent after an SSLRequest are never
/// taken as plaintext: read with it (they stay in `carry`) or waiting on the socket, they
/// fail a TLS login.
async fn negotiate(
    conn: &mut LoginConn,
    config: &Config,
    may_start_tls: bool,
    ctx: &ClientContext,
) -> Result<Negotiated, Failure> {
    if let (true, Sock::Tcp(tcp)) = (may_start_tls, conn.stream.sock()) {
        let mut first = [0u8; 1];
        tcp.peek(&mut first).await?;
        if first[0] == TLS_HANDSHAKE_RECORD {
            return Ok(Negotiated::StartTls { direct: true });
        }
    }
    loop {
        let parsed = match conn.read_startup_packet().await? {
            Packet::Request(request) => startup::parse_startup_packet(&request[..]),
            // The parameters keep the packet's allocation.
            Packet::Other(packet) => startup::parse_startup_packet(packet),
        };
        match parsed? {
            StartupPacket::SslRequest if conn.stream.is_tls() => {
                return Err(reject(
                    LoginFailure::Protocol,
                    PgError::fatal("08P01", "SSLRequest received inside a TLS session"),
                ));
            }
            StartupPacket::SslRequest if may_start_tls => {
                if conn.has_unread() {
                    // CVE-2021-23214: anything sent before our answer was written without
                    // knowing whether TLS would be used, and may have been injected.
                    return Err(reject(
                        LoginFailure::Protocol,
                        PgError::fatal("08P01", "received unencrypted data after SSL request").with_detail(
                            "This could be either a client-software bug or evidence of an attempted man-in-the-middle attack.",
                        ),
                    ));
                }
                conn.stream.write_all(b"S").await?;
                return Ok(Negotiated::StartTls { direct: false });
            }
            // GSS encryption is not offered; 'N' lets libpq continue per its gssencmode.
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => conn.stream.write_all(b"N").await?,
            StartupPacket::Cancel(key) => {
                // Boxed: forwarding to a peer is a connection of its own, and only a cancel
                // request (a connection of its own too) makes it.
                Box::pin(ctx.cancels.cancel(key, &config.peers)).await;
                return Ok(Negotiated::Done);
            }
            StartupPacket::Startup(params) => {
                let local = matches!(conn.stream.sock(), Sock::Unix(_));
                if config.tls.mode == ClientTlsMode::Require && !conn.stream.is_tls() && !local {
                    return Err(reject(
                        LoginFailure::TlsRequired,
                        PgError::fatal("28000", "pgweir requires TLS (SSL) for all client connections")
                            .with_hint("Connect with sslmode=require (or verify-ca/verify-full)."),
                    ));
                }
                return Ok(Negotiated::Startup(params));
            }
        }
    }
}

struct Done {
    pool: Pool,
    params: Arc<ParamSet>,
    /// `params.form()`, interned.
    form: Arc<[u8]>,
    application_name: Arc<str>,
    key: CancelKey,
    slot: Arc<CancelSlot>,
}

/// A login failure: the error for logs and, when the client should hear about it, the reply.
struct Failure {
    reason: LoginFailure,
    error: ClientError,
    reply: Option<PgError>,
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure {
            reason: LoginFailure::ClientGone,
            error: ClientError::ClientIo(e),
            reply: None,
        }
    }
}

impl From<ProtocolError> for Failure {
    fn from(e: ProtocolError) -> Self {
        let reply = PgError::fatal("08P01", format!("pgweir: {e}"));
        Failure {
            reason: LoginFailure::Protocol,
            error: ClientError::ClientProtocol(e),
            reply: Some(reply),
        }
    }
}

fn reject(reason: LoginFailure, reply: PgError) -> Failure {
    Failure {
        reason,
        error: ClientError::Login(reply.message.clone()),
        reply: Some(reply),
    }
}

/// Applies the `[[hba]]` rules before any password is asked for, as PostgreSQL does. `peer` is
/// the address the connection was accepted from (not asked of the socket again).
fn check_hba(client: &Stream, peer: &PeerAddr, config: &Config, user: &str, database: &str) -> Result<(), Failure> {
    if config.hba.is_empty() {
        return Ok(());
    }
    let ip = peer.ip();
    // PostgreSQL's name for a Unix-socket client in the same message.
    let host = ip.map_or_else(|| "[local]".to_owned(), |ip| ip.to_string());
    let tls = client.is_tls();
    let encryption = if tls { "TLS" } else { "no encryption" };
    let refused = |why: String| {
        reject(
            LoginFailure::HbaDenied,
            PgError::fatal("28000", why).with_hint(
                "pgweir's [[hba]] rules decide who may connect from where; ask its operator to add an allow rule.",
            ),
        )
    };
    match hba::check(&config.hba, ip, database, user, tls) {
        HbaVerdict::Allowed => Ok(()),
        HbaVerdict::DeniedBy(n) => Err(refused(format!(
            "pgweir [[hba]] rule {n} rejects connection for host \"{host}\", user \"{user}\", database \"{database}\", {encryption}"
        ))),
        HbaVerdict::NoMatch => Err(refused(format!(
            "no pgweir [[hba]] rule allows host \"{host}\", user \"{user}\", database \"{database}\", {encryption}"
        ))),
    }
}

/// Sends an error and flushes it: over TLS the record must leave before the connection closes.
pub(super) async fn send_error(client: &mut Stream, e: &PgError) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    e.encode(&mut buf);
    let write = async {
        client.write_all(&buf).await?;
        client.flush().await
    };
    // Every error sent this way is the connection's last word. A client that does not read
    // (its socket full) must not keep the session, and a server it may hold, open for good:
    // a kill or a timeout would never finish. Waiting longer would not help such a client,
    // since only its reading makes room; one that reads gets the error at once.
    tokio::time::timeout(LAST_WORD_WAIT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// How long a session's last error may wait for room in the client's socket.
pub(super) const LAST_WORD_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

async fn login(
    conn: &mut LoginConn,
    peer: &PeerAddr,
    ctx: &ClientContext,
    end_point: Option<&[u8]>,
    startup: StartupParams,
) -> Result<Option<Done>, Failure> {
    // The rules in force when the startup packet arrived (as in PgBouncer), not when the
    // connection was accepted: a reload that tightens hba or auth_type reaches a client that
    // connected before it and logs in after. One snapshot for every decision of this login.
    let config = ctx.config.load_full();
    let config = &config;
    let users = ctx.users.load_full();

    let user = match startup.get_str("user") {
        Some(u) if !u.is_empty() => u,
        _ => {
            return Err(reject(
                LoginFailure::Protocol,
                PgError::fatal("28000", "no PostgreSQL user name specified in startup packet"),
            ));
        }
    };
    let database = startup.get_str("database").filter(|d| !d.is_empty()).unwrap_or(user);
    if startup
        .get("replication")
        .is_some_and(|v| v != b"false" && v != b"0" && v != b"off")
    {
        return Err(reject(
            LoginFailure::Other,
            PgError::fatal("08P01", "pgweir does not support replication connections")
                .with_hint("Connect replication clients directly to PostgreSQL."),
        ));
    }
    client_parameters(&startup, None)?;

    let mut out = BytesMut::with_capacity(512);
    if startup.minor_version > 0 || startup.protocol_options().next().is_some() {
        let unsupported: Vec<&str> = startup.protocol_options().collect();
        messages::negotiate_protocol_version(&mut out, &unsupported);
        conn.stream.write_all(&out).await?;
        out.clear();
    }

    check_hba(&conn.stream, peer, config, user, database)?;

    let looked_up = look_up_user(ctx, config, &users, user, database).await?;
    let known = users.get(user).or(looked_up.as_ref());
    let exchange = match config.listen.auth_type {
        AuthType::Trust => None,
        AuthType::Md5 => Some(Exchange::Md5),
        AuthType::ScramSha256 => Some(Exchange::Scram { end_point }),
    };
    // `out` now holds the final authentication message(s), sent with the welcome: one write
    // (PgBouncer does the same) instead of two per login.
    let scram_keys = authenticate(conn, exchange, user, known, &mut out).await?;

    let Some(db) = config.databases.get(database) else {
        return Err(unknown_database(config, database));
    };

    // What a new pool needs is worked out only when the pool is new, not at every login. From
    // the running configuration rather than this login's copy: a reload since may have
    // changed or removed the database, and `make` runs under the lock a reload installs its
    // configuration under (a pool made from the old one would miss the reload).
    let pool = ctx.pools.get_or_create(database, user, |key| {
        let (config, users) = (ctx.config.load(), ctx.users.load());
        let db = config.databases.get(database)?;
        let settings = config.pool_settings(database, user).unwrap_or_else(|| db.pool.clone());
        Some(Pool::new(
            key,
            server_target(db, user),
            server_secret(&users, db.server_password.as_deref(), db.server_user.is_some(), user),
            settings,
            config.listen.tcp_keepalive,
            ctx.server_ids.clone(),
        ))
    });
    let Some(pool) = pool else {
        return Err(unknown_database(&ctx.config.load(), database));
    };
    // SCRAM pass-through: only when the user's configured secret is a real SCRAM verifier (a
    // verifier derived here from a plain password has a different salt than the server's) and
    // no forced server user is configured.
    // A verifier from auth_query is the server's own, so pass-through always fits it.
    if let (Some(keys), None) = (scram_keys, &db.server_user)
        && known.is_some_and(|u| matches!(u.secret, Secret::Scram(_)))
    {
        pool.set_secret(ServerSecret::Scram(keys));
    } else if let (Some(entry), None) = (&looked_up, &db.server_user) {
        let secret = ServerSecret::from(&entry.secret);
        if !matches!(secret, ServerSecret::None) {
            pool.set_secret(secret);
        }
    }

    let (welcome, template) = pool.welcome_for(startup.bytes());
    let welcome = match welcome {
        Some(w) => w,
        None => fetch_welcome(&pool).await?,
    };
    let template = match template {
        Some(t) => t,
        None => match work_out(ctx, &pool, &startup, welcome).await {
            Ok(t) => t,
            Err(failure) => {
                // The client has authenticated: like PostgreSQL, pgweir says so before the
                // FATAL (a value PostgreSQL refuses fails the login after AuthenticationOk).
                conn.stream.write_all(&out).await?;
                return Err(failure);
            }
        },
    };

    let slot = Arc::new(CancelSlot::default());
    let cancel_key = ctx.cancels.register(slot.clone());
    out.extend_from_slice(&template.status);
    messages::backend_key_data(&mut out, cancel_key);
    messages::ready_for_query(&mut out, TransactionStatus::Idle);
    if let Err(e) = conn.stream.write_all(&out).await {
        ctx.cancels.unregister(cancel_key);
        return Err(e.into());
    }
    Ok(Some(Done {
        pool,
        params: template.params.clone(),
        form: template.form.clone(),
        application_name: template.application_name.clone(),
        key: cancel_key,
        slot,
    }))
}

/// Works out a login's session parameters and greeting from its startup parameters and the
/// pool's welcome, and keeps the result in the pool for the next login with the same packet.
async fn work_out(
    ctx: &ClientContext,
    pool: &Pool,
    startup: &StartupParams,
    welcome: Arc<ParamSet>,
) -> Result<Arc<LoginTemplate>, Failure> {
    let mut client_params = ParamSet::default();
    client_parameters(startup, Some(&mut client_params))?;
    // Tracked parameters the client did not set take the server defaults, so that a value
    // another client SET on a shared server is reset before this client uses that server. Those
    // it set are held as PostgreSQL reports them ("iso, dmy" → "ISO, DMY"): the client is told
    // that value now, as PostgreSQL would tell it, and servers are compared with it from now on
    // (a server's "ISO, MDY" then satisfies pgJDBC's "ISO" with no SET each transaction). A rule
    // here or an earlier server's answer gives most; the rest a server gives now.
    let mut unknown = Vec::new();
    for name in params::TRACKED {
        let Some(value) = client_params.get(name) else {
            if let Some(value) = welcome.get(name) {
                client_params.set(name, value);
            }
            continue;
        };
        let canonical = match params::canonical_locally(name, value, &welcome) {
            Some(c) if *c == *value => continue,
            Some(c) => c.into_owned(),
            None => match pool.canonical_value(name, value) {
                Some(c) => c,
                None => {
                    unknown.push((*name, value.to_vec()));
                    continue;
                }
            },
        };
        client_params.set(name, &canonical);
    }
    let asked = !unknown.is_empty();
    if asked {
        let encoding = client_params.get("client_encoding").map(<[u8]>::to_vec);
        for (name, value) in ask_server(pool, unknown, encoding).await? {
            client_params.set(name, &value);
        }
    }
    let mut status = BytesMut::new();
    for (name, value) in welcome.iter() {
        let value = if params::TRACKED.contains(&name) {
            client_params.get(name).unwrap_or(value)
        } else {
            value
        };
        messages::parameter_status(&mut status, name, value);
    }
    let template = Arc::new(LoginTemplate {
        startup: startup.bytes().into(),
        welcome,
        form: ctx.param_forms.intern(&client_params.form()),
        application_name: String::from_utf8_lossy(client_params.get("application_name").unwrap_or_default()).into(),
        params: Arc::new(client_params),
        status: status.as_ref().into(),
    });
    // A login that asked a server is not kept: the pool has learnt the answers now, and the
    // next login with this packet works out the same without asking, and is kept.
    if !asked {
        pool.keep_login_template(template.clone());
    }
    Ok(template)
}

/// Opens (and returns) one server connection so the pool learns the server's parameters.
async fn fetch_welcome(pool: &Pool) -> Result<Arc<ParamSet>, Failure> {
    // In a task of its own: the whole login runs under client_login_timeout, and dropping a
    // checkout part-way (a connect in progress, a grant in its channel) would leak the pool
    // slot it holds, for good.
    let p = pool.clone();
    let checkout = tokio::spawn(async move {
        let settings = p.settings().clone();
        p.checkout(Instant::now(), &settings).await.map(|s| s.release())
    });
    let Ok(res) = checkout.await else {
        return Err(shutting_down());
    };
    match res {
        Ok(()) => pool.welcome().ok_or_else(|| {
            reject(
                LoginFailure::ServerUnavailable,
                PgError::fatal("08006", "pgweir: server parameters unavailable"),
            )
        }),
        Err(e) => Err(no_server(e, pool)),
    }
}

fn unknown_database(config: &Config, database: &str) -> Failure {
    let known: Vec<&str> = config.databases.keys().map(String::as_str).collect();
    reject(
        LoginFailure::UnknownDatabase,
        PgError::fatal("3D000", format!("database \"{database}\" does not exist"))
            .with_detail(format!("pgweir serves these databases: {}", known.join(", ")))
            .with_hint(format!(
                "Add a [databases.{database}] table to the pgweir configuration, or connect to one of those."
            )),
    )
}

/// A login's server task was cancelled: only a runtime shutting down does that.
fn shutting_down() -> Failure {
    reject(
        LoginFailure::ServerUnavailable,
        PgError::fatal("57P01", "pgweir: shutting down"),
    )
}

/// A login needed a server and the pool gave none.
fn no_server(e: PoolError, pool: &Pool) -> Failure {
    let reply = super::session::pool_error_reply(&e, pool, true);
    Failure {
        reason: LoginFailure::ServerUnavailable,
        error: e.into(),
        reply: Some(reply),
    }
}

/// Asks a server what PostgreSQL reports for a client's startup `values` of tracked parameters
/// that no local rule or earlier answer explains: one round trip that SETs them (as a session
/// would, in the client's `encoding`) and reads the server's ParameterStatus. The pool keeps each
/// answer, so the next login with these values asks no server. A value the server refuses fails
/// the login with its SQLSTATE and message, as it fails a login to PostgreSQL.
async fn ask_server(
    pool: &Pool,
    values: Vec<(&'static str, Vec<u8>)>,
    encoding: Option<Vec<u8>>,
) -> Result<Vec<(&'static str, Vec<u8>)>, Failure> {
    // In a task of its own, as in fetch_welcome: a login timeout drops the login part-way, and
    // dropping a checkout part-way would leak the slot it holds. The task finishes on its own
    // (and the pool still learns the answer).
    let p = pool.clone();
    let asked = tokio::spawn(async move {
        let settings = p.settings().clone();
        let mut server = p.checkout(Instant::now(), &settings).await.map_err(Unanswered::Pool)?;
        let mut pairs: Vec<(&str, &[u8])> = values.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        // Values are bytes in the client's encoding: set it first (set_prelude) where the
        // server's session may have another.
        if let Some(e) = &encoding
            && !pairs.iter().any(|(k, _)| *k == "client_encoding")
        {
            pairs.push(("client_encoding", e));
        }
        let conn = server.conn();
        let prelude = params::set_prelude(&conn.params, &pairs);
        let sql = params::set_statements(&pairs, &[]);
        let ran = tokio::time::timeout(settings.server_connect_timeout, conn.run_settings(&prelude, &sql)).await;
        match ran {
            Ok(Ok(None)) => {
                // Every tracked parameter is reported, so the server's record holds what it
                // made of each value (a value it already had is not reported again, and is
                // already there).
                let reported: Vec<(&'static str, Vec<u8>)> = values
                    .iter()
                    .map(|(name, value)| {
                        let canonical = conn.params.get(name).unwrap_or(value).to_vec();
                        p.learn_canonical_value(name, value, &canonical);
                        (*name, canonical)
                    })
                    .collect();
                server.release();
                Ok(reported)
            }
            Ok(Ok(Some(refused))) => {
                // The batch ran in one implicit transaction, rolled back by the error; the
                // server is idle with its reported values recorded, so it goes back.
                server.release();
                Err(Unanswered::Refused(refused))
            }
            Ok(Err(e)) => {
                server.discard();
                Err(Unanswered::Server(Some(e)))
            }
            Err(_) => {
                server.discard();
                Err(Unanswered::Server(None))
            }
        }
    });
    let unanswered = match asked.await {
        Ok(Ok(reported)) => return Ok(reported),
        Ok(Err(unanswered)) => unanswered,
        Err(_) => return Err(shutting_down()),
    };
    Err(match unanswered {
        Unanswered::Refused(fields) => {
            let mut reply = PgError::fatal(
                super::session::parameter_sqlstate(fields.code.as_deref()),
                fields.message,
            );
            reply.detail = fields.detail;
            reject(LoginFailure::Other, reply)
        }
        Unanswered::Pool(e) => no_server(e, pool),
        Unanswered::Server(e) => {
            let reply = PgError::fatal(
                "08006",
                "pgweir: the server did not answer while reading this client's session parameters",
            );
            Failure {
                reason: LoginFailure::ServerUnavailable,
                error: e.map_or_else(|| ClientError::Login(reply.message.clone()), ClientError::Server),
                reply: Some(reply),
            }
        }
    })
}

/// Why [`ask_server`] has no answer.
enum Unanswered {
    /// The server refused a value.
    Refused(ErrorFields),
    /// No server in time.
    Pool(PoolError),
    /// The server failed or did not answer within server_connect_timeout.
    Server(Option<ServerError>),
}

/// The session parameters a client asked for at startup, including `options=-c k=v`, put in
/// `set`; with no `set`, only whether they are acceptable (checked before authentication, where
/// a login whose packet the pool has seen needs nothing more).
fn client_parameters(startup: &StartupParams, mut set: Option<&mut ParamSet>) -> Result<(), Failure> {
    let mut add = |name: &str, value: &[u8]| -> Result<(), Failure> {
        if !params::is_valid_name(name) {
            return Err(reject(
                LoginFailure::Protocol,
                PgError::fatal("08P01", format!("unsupported startup parameter: {name}")),
            ));
        }
        if let Some(set) = set.as_deref_mut() {
            set.set(&params::canonical_name(name), value);
        }
        Ok(())
    };
    // As PostgreSQL reads the packet: only the last `options` counts, and its settings come
    // first, so a parameter sent on its own wins over the same one in `options`, in any order.
    if let Some(value) = startup.get("options") {
        for (k, v) in parse_options(value).map_err(|why| {
            reject(
                LoginFailure::Protocol,
                PgError::fatal("08P01", format!("unsupported options startup parameter: {why}"))
                    .with_hint("Only '-c name=value' and '--name=value' are supported in options."),
            )
        })? {
            add(&k, v.as_bytes())?;
        }
    }
    for (name, value) in startup.iter() {
        match name {
            "user" | "database" | "replication" | "options" => {}
            n if n.starts_with("_pq_.") => {}
            n => add(n, value)?,
        }
    }
    Ok(())
}

/// Parses libpq's `options` (`-c a=b -c c=d`, `--a=b`, backslash escapes spaces).
fn parse_options(raw: &[u8]) -> Result<Vec<(String, String)>, &'static str> {
    let text = std::str::from_utf8(raw).map_err(|_| "not UTF-8")?;
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or("-c without a setting")?
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_owned()
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_owned()
        } else {
            return Err("only -c and -- settings are allowed");
        };
        let (k, v) = setting.split_once('=').ok_or("setting without '='")?;
        out.push((k.replace('-', "_"), v.to_owned()));
    }
    Ok(out)
}

/// Which credentials the pool uses towards PostgreSQL.
/// Where a pool of `db` for client `user` connects, as whom.
pub(super) fn server_target(db: &crate::config::DatabaseConfig, user: &str) -> ServerTarget {
    ServerTarget {
        host: db.host.clone(),
        port: db.port,
        dbname: db.dbname.clone(),
        user: db.server_user.clone().unwrap_or_else(|| user.to_owned()),
    }
}

pub(super) fn server_secret(
    users: &UserDirectory,
    db_password: Option<&str>,
    forced_user: bool,
    user: &str,
) -> ServerSecret {
    if forced_user {
        return db_password.map_or(ServerSecret::None, |p| ServerSecret::Plain(p.to_owned()));
    }
    users
        .get(user)
        .map_or(ServerSecret::None, |u| ServerSecret::from(&u.secret))
}

/// For a user missing from the configuration, asks PostgreSQL (auth_query). None when there is
/// nothing to look up, or PostgreSQL knows no password for the user (the login then fails as
/// for any unknown user, without saying which).
async fn look_up_user(
    ctx: &ClientContext,
    config: &Config,
    users: &UserDirectory,
    user: &str,
    database: &str,
) -> Result<Option<UserEntry>, Failure> {
    let (Some(aq), None, Some(db)) = (&config.auth_query, users.get(user), config.databases.get(database)) else {
        return Ok(None);
    };
    if config.listen.auth_type == AuthType::Trust {
        return Ok(None);
    }
    let secret = users
        .get(&aq.user)
        .map_or(ServerSecret::None, |u| ServerSecret::from(&u.secret));
    let target = LookupTarget {
        config: aq,
        database: db,
        secret,
        ids: &ctx.server_ids,
        keepalive: config.listen.tcp_keepalive,
    };
    // Boxed: the look-up (a server connection of its own) is most of a login future's size,
    // and most logins never make it.
    match Box::pin(ctx.auth_query.lookup(database, user, &target)).await {
        Ok(Stored::Found(entry)) => Ok(Some(entry)),
        Ok(Stored::Missing) => Ok(None),
        Err(why) => {
            // The details name the auth user and the server's error: for the log, not for an
            // unauthenticated client.
            tracing::warn!(user, database, auth_user = %aq.user, error = %why, "auth_query look-up failed");
            Err(reject(
                LoginFailure::ServerUnavailable,
                PgError::fatal(
                    "08006",
                    "pgweir could not verify the password: the auth_query look-up failed",
                )
                .with_hint("The pgweir log has the reason; the operator should check [auth_query]."),
            ))
        }
    }
}

/// Authenticates the client with `exchange` (None: trust) against `entry`, the user's
/// configured or looked-up secret. Returns SCRAM keys when the client used SCRAM.
/// The closing message (AuthenticationOk, after SASLFinal for SCRAM) is appended to `done`
/// for the caller to send with what follows, not written.
async fn authenticate(
    conn: &mut LoginConn,
    exchange: Option<Exchange<'_>>,
    user: &str,
    entry: Option<&UserEntry>,
    done: &mut BytesMut,
) -> Result<Option<ScramKeys>, Failure> {
    let Some(exchange) = exchange else {
        messages::auth_ok(done);
        return Ok(None);
    };
    // The password exchanges in a box of their own: their state (~500 bytes) would otherwise
    // be part of every login's future, trust logins' included, which have none.
    Box::pin(exchange_password(conn, exchange, user, entry, done)).await
}

/// The password exchanges [`authenticate`] runs; SCRAM with the TLS end point its channel
/// binding uses, if any.
#[derive(Clone, Copy)]
enum Exchange<'a> {
    Md5,
    Scram { end_point: Option<&'a [u8]> },
}

/// The MD5 or SCRAM exchange of [`authenticate`].
async fn exchange_password(
    conn: &mut LoginConn,
    exchange: Exchange<'_>,
    user: &str,
    entry: Option<&UserEntry>,
    done: &mut BytesMut,
) -> Result<Option<ScramKeys>, Failure> {
    let failed = |reason| {
        reject(
            reason,
            PgError::fatal("28P01", format!("password authentication failed for user \"{user}\"")),
        )
    };
    let mut out = BytesMut::with_capacity(256);
    match exchange {
        Exchange::Md5 => {
            let salt: [u8; 4] = rand::random();
            messages::auth_md5_request(&mut out, salt);
            conn.stream.write_all(&out).await?;
            let body = conn.read_password_message().await?;
            let response = messages::parse_password(&body)?;
            let stored = match entry.map(|e| &e.secret) {
                Some(Secret::Md5(m)) => Some(m.clone()),
                Some(Secret::Plain(p)) => Some(md5::md5_stored(user, p)),
                _ => None,
            };
            match stored {
                Some(stored) if md5::md5_verify(&stored, salt, response) => {
                    messages::auth_ok(done);
                    Ok(None)
                }
                Some(_) => Err(failed(LoginFailure::BadPassword)),
                None => Err(failed(LoginFailure::UnknownUser)),
            }
        }
        Exchange::Scram { end_point } => {
            // Unknown users (or users without a usable verifier) run a mock exchange that fails
            // at the end, so user names cannot be probed.
            let (mut server, wrong) = match entry.and_then(|e| e.verifier.clone()) {
                Some(v) => (ScramServer::new(v), LoginFailure::BadPassword),
                None => (ScramServer::mock(user), LoginFailure::UnknownUser),
            };
            let offered: &[&str] = match end_point {
                Some(_) => &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256],
                None => &[SCRAM_SHA_256],
            };
            messages::auth_sasl_request(&mut out, offered);
            conn.stream.write_all(&out).await?;
            let body = conn.read_password_message().await?;
            let (mechanism, data) = messages::parse_sasl_initial_response(&body)?;
            let binding = match (mechanism, end_point) {
                (m, None) if m == SCRAM_SHA_256.as_bytes() => ChannelBinding::NotOffered,
                (m, Some(_)) if m == SCRAM_SHA_256.as_bytes() => ChannelBinding::Declined,
                (m, Some(data)) if m == SCRAM_SHA_256_PLUS.as_bytes() => {
                    ChannelBinding::TlsServerEndPoint(data.to_vec())
                }
                _ => {
                    return Err(reject(
                        LoginFailure::Protocol,
                        PgError::fatal(
                            "28000",
                            format!(
                                "SASL mechanism {} is not supported; pgweir offers {}",
                                String::from_utf8_lossy(mechanism),
                                offered.join(", ")
                            ),
                        ),
                    ));
                }
            };
            server.set_channel_binding(binding);
            let server_first = server
                .handle_client_first(data)
                .map_err(|_| failed(LoginFailure::Protocol))?;
            out.clear();
            messages::auth_sasl_continue(&mut out, &server_first);
            conn.stream.write_all(&out).await?;
            let body = conn.read_password_message().await?;
            let (server_final, keys) = server.handle_client_final(&body).map_err(|e| {
                failed(match e {
                    AuthError::WrongPassword => wrong,
                    _ => LoginFailure::Protocol,
                })
            })?;
            messages::auth_sasl_final(done, &server_final);
            messages::auth_ok(done);
            Ok(Some(keys))
        }
    }
}

/// Bytes one startup-phase read may take: more than the packets drivers send (libpq's
/// SSLRequest is 8 bytes and its StartupMessage about 60), so the read comes up short, which
/// tokio takes as the socket drained: the next read waits for the client instead of making a
/// `recv` that finds nothing (two per login: after the 'N', after the welcome), and a
/// StartupMessage arrives in one `recv` instead of a header and then the rest.
const STARTUP_READ: usize = 512;

/// A client during its login: its stream, and what was read from it but not used yet.
struct LoginConn {
    stream: Stream,
    /// Bytes read beyond a startup-phase packet (a client that did not wait for the answer):
    /// the next packet's, the password exchange's or the session's first input.
    carry: Vec<u8>,
}

impl LoginConn {
    /// Whether the client sent anything not read as a packet yet, read already or still on the
    /// socket.
    fn has_unread(&self) -> bool {
        !self.carry.is_empty() || self.stream.has_pending_input()
    }

    /// Reads one startup-phase packet. Bytes beyond it stay in `carry`; [`negotiate`] refuses
    /// TLS after an SSLRequest when there are any.
    async fn read_startup_packet(&mut self) -> Result<Packet, Failure> {
        let LoginConn { stream: client, carry } = self;
        std::future::poll_fn(|cx| {
            loop {
                if let Some(packet) = take_packet(carry)? {
                    return Poll::Ready(Ok(packet));
                }
                // On the stack for this poll only: the login's future stays small.
                let mut raw = [0u8; STARTUP_READ];
                let mut read = ReadBuf::new(&mut raw);
                std::task::ready!(Pin::new(&mut *client).poll_read(cx, &mut read))?;
                let got = read.filled();
                if got.is_empty() {
                    return Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()));
                }
                if carry.is_empty()
                    && let Some((packet, rest)) = packet_in(got)?
                {
                    // The common case: the whole packet in one read, and no allocation for the
                    // rest, which is nothing.
                    carry.extend_from_slice(rest);
                    return Poll::Ready(Ok(packet));
                }
                carry.extend_from_slice(got);
            }
        })
        .await
    }

    /// Reads one PasswordMessage-family message and returns its body.
    async fn read_password_message(&mut self) -> Result<Vec<u8>, Failure> {
        let mut header = [0u8; 5];
        self.read_exact_carried(&mut header).await?;
        let frame = match frame_at(&header, 0, MAX_LOGIN_MESSAGE) {
            Ok(_) => {
                let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
                len - 4
            }
            Err(e) => return Err(ProtocolError::from(e).into()),
        };
        if header[0] != frontend::PASSWORD {
            if header[0] == frontend::TERMINATE {
                return Err(Failure {
                    reason: LoginFailure::ClientGone,
                    error: ClientError::Login("client gave up during authentication".into()),
                    reply: None,
                });
            }
            return Err(ProtocolError::Unexpected {
                tag: header[0] as char,
                phase: "authentication",
            }
            .into());
        }
        let mut body = vec![0u8; frame];
        self.read_exact_carried(&mut body).await?;
        Ok(body)
    }

    /// `read_exact` that takes what was read beyond the startup packet first.
    async fn read_exact_carried(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        let from_carry = self.carry.len().min(out.len());
        out[..from_carry].copy_from_slice(&self.carry[..from_carry]);
        self.carry.drain(..from_carry);
        if from_carry < out.len() {
            self.stream.read_exact(&mut out[from_carry..]).await?;
        }
        Ok(())
    }
}

/// The startup-phase packet at the start of `bytes` and what follows it, or None while it is
/// incomplete. The length is checked as soon as it is there: a bad one is refused without
/// waiting for bytes that may never come.
fn packet_in(bytes: &[u8]) -> Result<Option<(Packet, &[u8])>, ProtocolError> {
    let Some(head) = bytes.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = i32::from_be_bytes(*head);
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(ProtocolError::Malformed {
            what: "startup",
            why: "invalid length",
        });
    }
    let Some((packet, rest)) = bytes.split_at_checked(len as usize) else {
        return Ok(None);
    };
    let packet = match packet.first_chunk::<8>() {
        Some(request) if packet.len() == 8 => Packet::Request(*request),
        _ => Packet::Other(packet.to_vec()),
    };
    Ok(Some((packet, rest)))
}

/// [`packet_in`] on what earlier reads left, taking the packet out of it.
fn take_packet(carry: &mut Vec<u8>) -> Result<Option<Packet>, ProtocolError> {
    let Some((packet, rest)) = packet_in(carry)? else {
        return Ok(None);
    };
    let used = carry.len() - rest.len();
    carry.drain(..used);
    Ok(Some(packet))
}

/// A packet [`LoginConn::read_startup_packet`] read. libpq starts every TCP connection with an
/// SSLRequest (8 bytes), kept here without an allocation.
enum Packet {
    Request([u8; 8]),
    Other(Vec<u8>),
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        Failure {
            reason: LoginFailure::ServerUnavailable,
            error: e.into(),
            reply: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Packet, packet_in, parse_options, take_packet};

    /// Startup-phase bytes cut at every point: each packet comes out whole, in order, as soon
    /// as its last byte is in, and never a byte of the next with it.
    #[test]
    fn packets_come_out_of_carried_bytes_whole_and_in_order() {
        let ssl: Vec<u8> = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let body = b"user\0bob\0database\0app\0\0";
        let mut startup = (body.len() as i32 + 8).to_be_bytes().to_vec();
        startup.extend_from_slice(&196608i32.to_be_bytes());
        startup.extend_from_slice(body);
        let query = b"Q\0\0\0\x0dselect 1\0".to_vec();
        let all = [ssl.clone(), startup.clone(), query.clone()].concat();
        for cut in 0..=all.len() {
            let mut carry = Vec::new();
            let mut out: Vec<Vec<u8>> = Vec::new();
            for chunk in [&all[..cut], &all[cut..]] {
                carry.extend_from_slice(chunk);
                while out.len() < 2 {
                    match take_packet(&mut carry).expect("valid") {
                        Some(Packet::Request(r)) => out.push(r.to_vec()),
                        Some(Packet::Other(p)) => out.push(p),
                        None => break,
                    }
                }
            }
            assert_eq!(out, [ssl.clone(), startup.clone()], "cut at {cut}");
            assert_eq!(carry, query, "cut at {cut}: what follows stays");
        }
        // An 8-byte packet is a request kept without an allocation; longer ones are not.
        assert!(matches!(packet_in(&ssl), Ok(Some((Packet::Request(_), [])))));
        assert!(matches!(packet_in(&startup), Ok(Some((Packet::Other(_), [])))));
    }

    /// A bad length is refused as soon as its four bytes are in, not after waiting for a
    /// packet that may never come.
    #[test]
    fn a_bad_startup_length_is_refused_from_its_four_bytes() {
        for len in [0i32, 7, -1, super::MAX_STARTUP_LEN as i32 + 1] {
            let bytes = len.to_be_bytes();
            assert!(packet_in(&bytes[..3]).expect("too short to tell").is_none());
            assert!(packet_in(&bytes).is_err(), "{len}");
        }
        let ok = (super::MAX_STARTUP_LEN as i32).to_be_bytes();
        assert!(
            packet_in(&ok).expect("a valid length").is_none(),
            "incomplete, not refused"
        );
    }

    #[test]
    fn options_parsing() {
        assert_eq!(
            parse_options(b"-c search_path=a,b --statement-timeout=5s -cTimeZone=UTC").unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("TimeZone".into(), "UTC".into())
            ]
        );
        assert_eq!(
            parse_options(b"-c application_name=a\\ b").unwrap(),
            vec![("application_name".into(), "a b".into())]
        );
        assert!(parse_options(b"-x").is_err());
        assert!(parse_options(b"-c").is_err());
    }
}

#[cfg(test)]
mod last_word_tests {
    use std::time::{Duration, Instant};

    use tokio::net::{TcpListener, TcpStream};

    use super::{LAST_WORD_WAIT, send_error};
    use crate::net::{Sock, Stream};
    use crate::proto::messages::PgError;

    /// A client whose socket is full (it reads nothing) does not hold its session's last error,
    /// and so the session, for ever.
    #[tokio::test]
    async fn a_last_error_gives_up_on_a_client_that_does_not_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (peer, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let _peer = peer.expect("connect");
        let sock = accepted.expect("accept").0;
        let chunk = vec![0u8; 1 << 16];
        while sock.try_write(&chunk).is_ok() {}
        let mut stream = Stream::Plain(Sock::Tcp(sock));
        let started = Instant::now();
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            send_error(&mut stream, &PgError::fatal("57P01", "killed")),
        )
        .await
        .expect("send_error returned");
        assert!(sent.is_err(), "nothing can be sent to a full socket");
        assert!(started.elapsed() >= LAST_WORD_WAIT, "{:?}", started.elapsed());
    }
}
