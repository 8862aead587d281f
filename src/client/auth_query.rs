//! `auth_query`: users missing from the configuration are looked up in PostgreSQL itself, as
//! `[auth_query] user`, on the database the client asked for (PgBouncer's auth_user and
//! auth_query). The stored verifier both checks the client and, by SCRAM or md5 pass-through,
//! logs the pool in, so pgweir never holds those users' passwords.
//!
//! Answers, including "no such user", are cached per (database, user) for `cache_ttl`;
//! concurrent logins of one user share one look-up. Failed look-ups are not cached.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::users::UserEntry;
use crate::auth::scram::ScramVerifier;
use crate::config::{AuthQueryConfig, DatabaseConfig, Secret};
use crate::server::{self, ServerIds, ServerSecret, ServerTarget};

/// Past this many cached names, stale ones are dropped: clients trying random user names must
/// not grow the cache without bound.
const MAX_ENTRIES: usize = 10_000;

/// What PostgreSQL said about a user.
#[derive(Debug, Clone)]
pub enum Stored {
    Found(UserEntry),
    /// No row, or a NULL password: nobody can log in as this user.
    Missing,
}

struct Slot {
    created: Instant,
    answer: OnceCell<Stored>,
}

impl Slot {
    fn fresh(&self, ttl: Duration) -> bool {
        self.answer.get().is_none() || self.created.elapsed() < ttl
    }
}

/// The look-up cache, shared by all logins.
#[derive(Default)]
pub struct AuthQueryCache {
    slots: DashMap<(String, String), Arc<Slot>>,
}

/// Where and how to run one look-up.
pub struct LookupTarget<'a> {
    pub config: &'a AuthQueryConfig,
    pub database: &'a DatabaseConfig,
    /// The auth user's own credentials towards PostgreSQL.
    pub secret: ServerSecret,
    pub ids: &'a ServerIds,
    pub keepalive: Option<Duration>,
}

impl AuthQueryCache {
    /// Forgets every answer (after a reload: the query or the auth user may have changed).
    pub fn clear(&self) {
        self.slots.clear();
    }

    pub async fn lookup(&self, database: &str, user: &str, target: &LookupTarget<'_>) -> Result<Stored, String> {
        let ttl = target.config.cache_ttl;
        let key = (database.to_owned(), user.to_owned());
        if self.slots.len() >= MAX_ENTRIES {
            self.slots.retain(|_, slot| slot.fresh(ttl));
        }
        let slot = {
            let mut entry = self.slots.entry(key).or_insert_with(new_slot);
            if !entry.fresh(ttl) {
                *entry = new_slot();
            }
            entry.clone()
        };
        slot.answer.get_or_try_init(|| fetch(user, target)).await.cloned()
    }
}

fn new_slot() -> Arc<Slot> {
    Arc::new(Slot {
        created: Instant::now(),
        answer: OnceCell::new(),
    })
}

async fn fetch(user: &str, target: &LookupTarget<'_>) -> Result<Stored, String> {
    let db = target.database;
    let server_target = ServerTarget {
        host: db.host.clone(),
        port: db.port,
        dbname: db.dbname.clone(),
        user: target.config.user.clone(),
    };
    let timeout = db.pool.server_connect_timeout;
    let mut conn = server::connect(
        target.ids.next(),
        &server_target,
        &target.secret,
        timeout,
        target.keepalive,
        &db.pool.server_tls,
    )
    .await
    .map_err(|e| e.to_string())?;
    let row = tokio::time::timeout(timeout, conn.query_first_row(&target.config.query, &[user.as_bytes()])).await;
    conn.close();
    let row = match row {
        Ok(r) => r.map_err(|e| format!("auth_query failed: {e}"))?,
        Err(_) => return Err(format!("auth_query did not answer within {timeout:?}")),
    };
    // PgBouncer's shape is (name, password); a one-column query is taken as the password.
    let password = row.and_then(|columns| match columns.len() {
        1 => columns.into_iter().next().flatten(),
        _ => columns.into_iter().nth(1).flatten(),
    });
    let Some(password) = password.and_then(|p| String::from_utf8(p).ok()) else {
        return Ok(Stored::Missing);
    };
    let secret = Secret::parse(&password);
    let verifier = match &secret {
        Secret::Scram(s) => ScramVerifier::parse(s).ok(),
        Secret::Plain(p) => Some(ScramVerifier::generate(p)),
        Secret::Md5(_) | Secret::None => None,
    };
    Ok(match secret {
        Secret::None => Stored::Missing,
        secret => Stored::Found(UserEntry { secret, verifier }),
    })
}
