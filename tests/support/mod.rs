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

/// A protocol 3.0 StartupMessage for `user` and `db`, for raw-socket tests.
pub fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    pkt.extend_from_slice(&body);
    pkt
}
