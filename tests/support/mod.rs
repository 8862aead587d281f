//! Shared helpers for the integration tests. Each test binary uses a subset.

#![allow(dead_code)]

pub mod fake_pg;
pub mod pki;
pub mod proxy;
pub mod wire;

use pgweir::embedded_pg::{EmbeddedError, EmbeddedOptions, EmbeddedPostgres};

/// A fresh embedded PostgreSQL with default options (see [`postgres_with`]).
pub fn postgres() -> EmbeddedPostgres {
    postgres_with(EmbeddedOptions::default())
}

/// A fresh embedded PostgreSQL. Tests never skip: without PostgreSQL installed this panics and
/// says what to install, both locally and under `CI=true` (where `.ci/run` should have
/// installed it).
pub fn postgres_with(opts: EmbeddedOptions) -> EmbeddedPostgres {
    match EmbeddedPostgres::start(opts) {
        Ok(pg) => pg,
        Err(e @ EmbeddedError::NotFound(_)) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "CI=true but PostgreSQL is not installed: {e}\n\
             .ci/run installs it (apt-get install -y postgresql); check that step's output."
            )
        }
        Err(e @ EmbeddedError::NotFound(_)) => panic!(
            "the integration tests need a local PostgreSQL installation and never skip: {e}\n\
             On Debian/Ubuntu run `sudo apt-get install -y postgresql` (the packaged cluster is not used; \
             tests start their own on free ports), or set PG_BIN_DIR."
        ),
        Err(e) => panic!("could not start the embedded PostgreSQL: {e}"),
    }
}

/// SSLRequest: length 8, code 80877103.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A startup-phase packet: its length, `code` (a protocol version or a request code), `body`.
pub fn packet(code: i32, body: &[u8]) -> Vec<u8> {
    let mut v = ((body.len() + 8) as i32).to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A protocol 3.0 StartupMessage carrying `pairs` as given (any bytes, duplicates, in order).
pub fn startup_message(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in pairs {
        body.extend_from_slice(k);
        body.push(0);
        body.extend_from_slice(v);
        body.push(0);
    }
    body.push(0);
    packet(196_608, &body)
}

/// A protocol 3.0 StartupMessage for `user` and `db`, for raw-socket tests.
pub fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    startup_message(&[(b"user", user.as_bytes()), (b"database", db.as_bytes())])
}
