//! pgweir: a transaction-mode PostgreSQL connection-pooling proxy.
//!
//! ```text
//! client socket ─▶ app (accept, max_client_conn) ─▶ client::handshake (startup, auth, welcome)
//!    ─▶ client::session ─▶ pool.checkout(started) ─▶ server conn (bytes forwarded both ways)
//!    ─▶ ReadyForQuery 'I' ─▶ server released to the pool (or closed if not clean)
//! ```
//!
//! Layers, each using only those listed before it: `clock` and `idhash`, `proto` and `auth`
//! (sans-IO), `config`, `net`, `server` (one backend connection), `pool` (per (database,
//! user)), `client` (one session), `app` (wiring). Vocabulary follows PgBouncer: *client* is
//! the frontend side, *server* the PostgreSQL backend side.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod embedded_pg;
pub mod fdlimit;
pub mod idhash;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod proto;
pub mod server;
pub mod shutdown;
