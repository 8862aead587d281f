//! Protocol-level named prepared statements in transaction mode.
//!
//! Each transaction may run on a different server, so a client's statement names cannot be
//! sent as they are. pgweir keeps, per client, `name → statement`; statements are identified by
//! their full Parse payload (query text and parameter types, compared byte for byte — never a
//! hash) and the client's parse settings ([`crate::server::params::parse_context`]) in a
//! process-wide registry that gives each distinct statement a counter-based server name
//! `__pgweir_N`. Identical statements from clients with the same settings therefore share one
//! server-side statement. Each server connection remembers which ones it has (bounded, LRU);
//! when a client's Bind or Describe lands on a server that lacks the statement, pgweir sends the
//! Parse first and swallows its ParseComplete.
//!
//! To keep replies in order, the session keeps a queue of what each forwarded message will be
//! answered with ([`Expect`]), so it can drop replies to its own messages, insert replies to
//! messages it answered itself, and undo name bookkeeping for messages PostgreSQL skipped after
//! an error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};

use crate::proto::messages::PgError;

/// Prefix of server-side statement names; client names with it are never passed through.
pub const SERVER_PREFIX: &str = "__pgweir_";

/// One distinct statement (query text + parameter types).
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// `__pgweir_N` followed by NUL, ready to splice into messages.
    pub server_name: Bytes,
    /// The Parse payload after the name: query, NUL, parameter count and type OIDs.
    pub payload: Bytes,
    /// Whether executing it changes session state (scanned once, when first seen).
    pub state_change: Option<super::hygiene::StateChange>,
    /// The tracked parameters it resets, when it is a RESET (pgJDBC prepares a RESET ALL it
    /// runs often).
    pub reset_scope: Option<crate::server::params::ResetScope>,
    /// Some server has accepted this Parse, so the text is valid SQL: a client's Parse of it
    /// outside a transaction can be answered without a server.
    pub validated: std::sync::atomic::AtomicBool,
}

impl Statement {
    /// A complete Parse message creating this statement under its server name.
    pub fn parse_message(&self, out: &mut BytesMut) {
        out.put_u8(b'P');
        out.put_i32((4 + self.server_name.len() + self.payload.len()) as i32);
        out.put_slice(&self.server_name);
        out.put_slice(&self.payload);
    }
}

/// Process-wide statement registry. Entries are held weakly: a statement lives as long as some
/// client still has a name for it, so the registry cannot grow without bound.
#[derive(Debug, Default)]
pub struct StatementRegistry {
    map: Mutex<HashMap<Bytes, Weak<Statement>>>,
    next_id: AtomicU64,
    /// Counters for metrics and the admin API.
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub reprepares: AtomicU64,
}

impl StatementRegistry {
    /// The shared statement for `payload` parsed in `context` (the client's
    /// [`crate::server::params::parse_context`]), if some client holds it.
    pub fn lookup(&self, context: &[u8], payload: &[u8]) -> Option<Arc<Statement>> {
        let key = [context, payload].concat();
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key[..]).and_then(Weak::upgrade)
    }

    /// Returns the shared statement for `payload` parsed in `context`, creating it if needed.
    /// Clients share a statement only when both match: PostgreSQL fixes a statement's literal
    /// dates, times and intervals when it parses it, under the settings of whoever prepared it.
    pub fn intern(&self, context: &[u8], payload: &[u8]) -> Arc<Statement> {
        let key = [context, payload].concat();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&key[..]).and_then(Weak::upgrade) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return s;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Purge dead entries when the map has doubled since the last purge, so cleanup cost is
        // amortised over insertions.
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut name = BytesMut::with_capacity(32);
        name.put_slice(SERVER_PREFIX.as_bytes());
        name.put_slice(id.to_string().as_bytes());
        name.put_u8(0);
        let (state_change, reset_scope) = parse_facts(query_text(payload));
        let stmt = Arc::new(Statement {
            id,
            server_name: name.freeze(),
            payload: Bytes::copy_from_slice(payload),
            state_change,
            reset_scope,
            validated: std::sync::atomic::AtomicBool::new(false),
        });
        map.insert(Bytes::from(key), Arc::downgrade(&stmt));
        stmt
    }
}

/// What a forwarded (or self-answered) message will be answered with, in order.
#[derive(Debug)]
pub enum Expect {
    /// The client's own Parse: ParseComplete forwarded. On failure or skip, the optimistic
    /// bookkeeping is undone (`stmt` None with a name: the server had the statement already,
    /// only the client's name goes).
    Parse {
        client_name: Option<Bytes>,
        stmt: Option<Arc<Statement>>,
    },
    /// A Parse pgweir sent to prepare a statement on this server: ParseComplete swallowed.
    InjectedParse { stmt: Arc<Statement> },
    /// A Close pgweir sent to evict a statement: CloseComplete swallowed.
    InjectedClose { id: u64 },
    /// A Parse sent only to fail (duplicate client name): its error is replaced by this one.
    FailingParse { error: PgError },
    /// The reply to a message pgweir sent only to have the server check something (see
    /// [`check_parse`]): one completion message, swallowed.
    Swallow,
    /// Bind, Describe, Execute, or a forwarded Close: one completion message.
    Other,
    /// A Bind or Describe of a client's statement, sent under its server name: one completion
    /// message, and an error naming the statement names it as the client does.
    Renamed { server_name: Bytes, client_name: Bytes },
    /// Replies pgweir produces itself at this point of the stream (ParseComplete for a
    /// statement the server already has, CloseComplete for a client Close). `undo` restores
    /// the client's name table if PostgreSQL would have skipped the message.
    Synthetic { bytes: Bytes, undo: Undo },
    /// Sync or a simple Query/FunctionCall: ends with ReadyForQuery.
    Barrier,
    /// A simple Query pgweir answers itself (DEALLOCATE of a client statement); emitted with
    /// ReadyForQuery carrying the current transaction status. In a failed transaction
    /// PostgreSQL refuses it (25P02) and keeps the statement: `restore` puts it back.
    SyntheticQuery {
        tag: &'static str,
        restore: Option<(Bytes, Arc<Statement>)>,
    },
}

/// Bookkeeping to revert when a self-answered message is skipped after an error.
#[derive(Debug)]
pub enum Undo {
    None,
    /// The client's Parse was answered by pgweir: forget the name again.
    Unmap(Bytes),
    /// The client's Close was answered by pgweir: restore the name.
    Remap(Bytes, Arc<Statement>),
}

/// Name of the throwaway statement of [`check_parse`].
const CHECK_NAME: &[u8] = b"__pgweir_check\0";

/// Has the server parse `payload` (query text and parameter types) under a throwaway name and
/// drop it again: it fails exactly as the client's own Parse would, with a syntax or name
/// error, or with 25P02 in a failed transaction (where only COMMIT and ROLLBACK parse), and
/// then skips to Sync; in a transaction block it takes the snapshot and locks the client's
/// Parse would. Its ParseComplete stands for the client's; the CloseComplete after it
/// is pgweir's ([`Expect::Swallow`]).
pub fn check_parse(out: &mut BytesMut, payload: &[u8]) {
    out.put_u8(b'P');
    out.put_i32((4 + CHECK_NAME.len() + payload.len()) as i32);
    out.put_slice(CHECK_NAME);
    out.put_slice(payload);
    out.put_u8(b'C');
    out.put_i32((4 + 1 + CHECK_NAME.len()) as i32);
    out.put_u8(b'S');
    out.put_slice(CHECK_NAME);
}

/// What a Parse's query text does (the session-state change it makes, the parameters it
/// resets): worked out once for a named statement, remembered per server connection for the
/// unnamed one (`server::memo`).
pub fn parse_facts(query: &[u8]) -> crate::server::memo::ParseFacts {
    (
        super::hygiene::session_state_change(query),
        crate::server::params::reset_scope(query),
    )
}

/// The query text of a Parse payload (up to its NUL).
pub fn query_text(payload: &[u8]) -> &[u8] {
    // A text is tens of bytes or more: memchr at once, not [`split_cstr`]'s byte loop first.
    memchr::memchr(0, payload).map_or(payload, |nul| &payload[..nul])
}

/// Splits a Parse/Bind/Describe/Close name field: returns (name without NUL, rest after NUL).
pub fn split_cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    // Names are mostly empty or a few bytes long (pgbench's "P_0", pgJDBC's "S_1"): a byte loop
    // finds their NUL in fewer instructions than memchr's call and vector set-up, which pay
    // only on long texts (~40 instructions a call, five calls per extended-protocol statement).
    if let [0, rest @ ..] = body {
        // Unnamed: the most common name of all.
        return Some((&[], rest));
    }
    let nul = match body.iter().take(SHORT).position(|&b| b == 0) {
        Some(nul) => nul,
        None => SHORT + memchr::memchr(0, body.get(SHORT..)?)?,
    };
    Some((&body[..nul], &body[nul + 1..]))
}

/// How many bytes [`split_cstr`] looks at one by one before it hands the rest to memchr.
const SHORT: usize = 16;

/// Recognises the simple-query statements that act on prepared statements:
/// `DEALLOCATE [PREPARE] ALL`, `DEALLOCATE [PREPARE] name` and `DISCARD ALL`, alone in the
/// query (an optional trailing semicolon allowed).
#[derive(Debug, PartialEq, Eq)]
pub enum StatementCommand {
    DeallocateAll,
    Deallocate(String),
    DiscardAll,
}

#[inline]
pub fn classify_query(sql: &[u8]) -> Option<StatementCommand> {
    // Both commands start with a 'd': every other query is out after one byte, inlined (the
    // call cost as much as the test; it runs on every Query, twice on the first of a
    // transaction).
    let first = sql.iter().find(|b| !b.is_ascii_whitespace())?;
    if !first.eq_ignore_ascii_case(&b'd') {
        return None;
    }
    classify_d(sql)
}

/// [`classify_query`] past its first letter.
fn classify_d(sql: &[u8]) -> Option<StatementCommand> {
    let text = std::str::from_utf8(sql).ok()?;
    let text = text.trim_end_matches('\0').trim();
    let text = text.strip_suffix(';').unwrap_or(text).trim();
    let mut words = text.split_ascii_whitespace();
    let first = words.next()?;
    if first.eq_ignore_ascii_case("discard") {
        let second = words.next()?;
        return (second.eq_ignore_ascii_case("all") && words.next().is_none()).then_some(StatementCommand::DiscardAll);
    }
    if !first.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut rest = text[first.len()..].trim_start();
    if rest.len() >= 7
        && rest[..7].eq_ignore_ascii_case("prepare")
        && rest[7..].starts_with(|c: char| c.is_ascii_whitespace())
    {
        rest = rest[7..].trim_start();
    }
    if rest.eq_ignore_ascii_case("all") {
        return Some(StatementCommand::DeallocateAll);
    }
    let name = if let Some(quoted) = rest.strip_prefix('"') {
        let inner = quoted.strip_suffix('"')?;
        if inner.replace("\"\"", "").contains('"') {
            return None;
        }
        inner.replace("\"\"", "\"")
    } else {
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return None;
        }
        rest.to_ascii_lowercase()
    };
    Some(StatementCommand::Deallocate(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cstr_finds_the_first_nul_on_either_side_of_the_byte_loop() {
        let reference = |body: &[u8]| {
            let nul = body.iter().position(|&b| b == 0)?;
            Some((body[..nul].to_vec(), body[nul + 1..].to_vec()))
        };
        for len in 0..=3 * SHORT {
            let plain: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            // No NUL at all: malformed, whatever the length.
            assert_eq!(split_cstr(&plain), None, "len {len}");
            for nul in 0..len {
                let mut body = plain.clone();
                body[nul] = 0;
                // A second NUL after the first must not be the one found.
                if nul + 2 < len {
                    body[nul + 2] = 0;
                }
                let got = split_cstr(&body).map(|(a, b)| (a.to_vec(), b.to_vec()));
                assert_eq!(got, reference(&body), "len {len}, NUL at {nul}");
            }
        }
    }

    #[test]
    fn registry_shares_identical_statements_and_forgets_unused_ones() {
        let reg = StatementRegistry::default();
        let a = reg.intern(b"", b"select 1\0\0\0");
        let b = reg.intern(b"", b"select 1\0\0\0");
        let c = reg.intern(b"", b"select 2\0\0\0");
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.id, c.id);
        assert_eq!(&a.server_name[..], format!("{SERVER_PREFIX}{}\0", a.id).as_bytes());
        let id = c.id;
        drop(c);
        let c2 = reg.intern(b"", b"select 2\0\0\0");
        assert_ne!(c2.id, id, "a statement nobody holds is not kept");
    }

    #[test]
    fn classifies_deallocate_and_discard() {
        assert_eq!(
            classify_query(b"DEALLOCATE ALL\0"),
            Some(StatementCommand::DeallocateAll)
        );
        assert_eq!(
            classify_query(b"  deallocate prepare all ;\0"),
            Some(StatementCommand::DeallocateAll)
        );
        assert_eq!(
            classify_query(b"DEALLOCATE S_1\0"),
            Some(StatementCommand::Deallocate("s_1".into()))
        );
        assert_eq!(
            classify_query(b"DEALLOCATE \"S 1\"\0"),
            Some(StatementCommand::Deallocate("S 1".into()))
        );
        assert_eq!(classify_query(b"discard all\0"), Some(StatementCommand::DiscardAll));
        assert_eq!(classify_query(b"discard plans\0"), None);
        assert_eq!(classify_query(b"select 1\0"), None);
        assert_eq!(classify_query(b"deallocate a; select 1\0"), None);
    }
}
