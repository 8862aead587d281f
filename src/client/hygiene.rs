//! Session-state hygiene for transaction mode. A statement that changes session state (a SET
//! that outlives the transaction, LISTEN, SQL PREPARE, a session-level advisory lock, a
//! temporary table, `set_config(…, false)`, a WITH HOLD cursor) would leak to whichever client
//! gets the server next. Per pool, pgweir allows it (PgBouncer's behaviour), resets the server
//! before anyone else uses it, or rejects the statement with an explanation.
//!
//! The scan is lexical and conservative: comments and string literals are skipped, statements
//! are split at semicolons, and only leading keywords (plus a few function names anywhere) are
//! looked at. Parameters pgweir tracks itself (TimeZone, DateStyle, …) are not session state
//! here: they already follow the client.

use crate::server::params::TRACKED;

/// What kind of session state a statement changes, for messages and metrics.
pub type StateChange = &'static str;

/// Returns the first session-state change in `sql`, if any.
pub fn session_state_change(sql: &[u8]) -> Option<StateChange> {
    // Cheap pre-filter: most queries contain none of the trigger words.
    if !contains_trigger(sql) {
        return None;
    }
    let text = normalise(sql);
    for stmt in text.split(';') {
        let words: Vec<&str> = stmt.split_ascii_whitespace().take(6).collect();
        let w = |i: usize| words.get(i).copied().unwrap_or("");
        match w(0) {
            "set" => {
                let (scope, name) = match w(1) {
                    "local" => continue,
                    "session" => {
                        if w(2) == "characteristics" {
                            return Some("SET SESSION CHARACTERISTICS");
                        }
                        ("session", w(2))
                    }
                    other => ("", other),
                };
                let _ = scope;
                if name == "transaction" {
                    continue;
                }
                let name = name.split(['=', '(']).next().unwrap_or("");
                if TRACKED.iter().any(|t| t.eq_ignore_ascii_case(name)) {
                    continue;
                }
                return Some("SET");
            }
            "listen" => return Some("LISTEN"),
            "prepare" if w(1) != "transaction" => return Some("PREPARE"),
            "create" => {
                let mut i = 1;
                if matches!(w(i), "global" | "local") {
                    i += 1;
                }
                if matches!(w(i), "temp" | "temporary") {
                    return Some("temporary object");
                }
                if w(i) == "or" && w(i + 1) == "replace" && matches!(w(i + 2), "temp" | "temporary") {
                    return Some("temporary object");
                }
            }
            "declare" if stmt.contains(" with hold") => return Some("WITH HOLD cursor"),
            _ => {}
        }
        if stmt.contains("pg_advisory_lock") || stmt.contains("pg_try_advisory_lock") {
            return Some("session advisory lock");
        }
        if let Some(at) = stmt.find("set_config") {
            // set_config(name, value, is_local): session-wide unless the last argument is true.
            let call = &stmt[at..];
            let args = call.split(')').next().unwrap_or(call);
            if !args.contains("true") {
                return Some("set_config");
            }
        }
    }
    None
}

fn contains_trigger(sql: &[u8]) -> bool {
    // This runs on every query, and most queries hold none of these words ("set" also covers
    // "set_config"). Each 16-byte block is tested for all two-letter keys at once; only the
    // positions of key hits ("SE" of every SELECT) pay for a whole-word compare.
    let mut at = 0;
    while at < sql.len() {
        let mut padded = [0u8; 17];
        let block = match sql.get(at..at + 17).and_then(|b| <&[u8; 17]>::try_from(b).ok()) {
            Some(block) => block,
            None => {
                // The last block, NUL-padded: `0 | 0x20` is a space, which starts no key.
                padded[..sql.len() - at].copy_from_slice(&sql[at..]);
                &padded
            }
        };
        let mut hits = key_hits(block);
        while hits != 0 {
            let byte = hits.trailing_zeros() / 8;
            hits &= !(0xff << (byte * 8));
            if trigger_at(sql, at + byte as usize) {
                return true;
            }
        }
        at += 16;
    }
    false
}

/// Byte j of the result is non-zero when a two-letter trigger key starts at `block[j]`,
/// ignoring ASCII case. `| 0x20` lower-cases ASCII letters and maps no other byte onto a
/// lower-case letter, so a key hit is exact. Fixed-length and branch-free so the compiler turns
/// it into vector compares (SSE2 on x86-64) without any unsafe code here.
fn key_hits(block: &[u8; 17]) -> u128 {
    let mut hits = [0u8; 16];
    for (j, hit) in hits.iter_mut().enumerate() {
        let (a, b) = (block[j] | 0x20, block[j + 1] | 0x20);
        *hit = ((a == b's') & (b == b'e')
            | (a == b'l') & (b == b'i')
            | (a == b'p') & (b == b'r')
            | (a == b't') & (b == b'e')
            | (a == b'a') & (b == b'd')
            | (a == b'h') & (b == b'o')) as u8;
    }
    u128::from_le_bytes(hits)
}

/// Whether a trigger word starts at `sql[i]` (whose two-letter key is known to match).
fn trigger_at(sql: &[u8], i: usize) -> bool {
    let word: &[u8] = match (sql[i] | 0x20, sql.get(i + 1).map_or(0, |b| b | 0x20)) {
        (b's', b'e') => b"set",
        (b'l', b'i') => b"listen",
        (b'p', b'r') => b"prepare",
        (b't', b'e') => b"temp",
        (b'a', b'd') => b"advisory",
        (b'h', b'o') => b"hold",
        _ => return false,
    };
    sql.get(i..i + word.len()).is_some_and(|w| w.eq_ignore_ascii_case(word))
}

/// Lower-cases the SQL and blanks out comments and quoted strings/identifiers, so keywords are
/// only found in code.
fn normalise(sql: &[u8]) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    while i < sql.len() {
        let b = sql[i];
        match b {
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
                out.push(' ');
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < sql.len() && !(sql[i] == b'*' && sql[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
                out.push(' ');
                continue;
            }
            b'\'' | b'"' => {
                let quote = b;
                i += 1;
                while i < sql.len() && sql[i] != quote {
                    i += 1;
                }
                out.push_str(" '' ");
            }
            b'$' => {
                // Dollar quoting: $tag$ ... $tag$
                let start = i;
                let mut j = i + 1;
                while j < sql.len() && (sql[j].is_ascii_alphanumeric() || sql[j] == b'_') {
                    j += 1;
                }
                if j < sql.len() && sql[j] == b'$' {
                    let tag = &sql[start..=j];
                    let body_start = j + 1;
                    let end = sql[body_start..]
                        .windows(tag.len())
                        .position(|w| w == tag)
                        .map(|p| body_start + p + tag.len())
                        .unwrap_or(sql.len());
                    out.push_str(" '' ");
                    i = end;
                    continue;
                }
                out.push('$');
            }
            0 => out.push(' '),
            _ => out.push(b.to_ascii_lowercase() as char),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::session_state_change as scan;

    #[test]
    fn trigger_prefilter_finds_every_word_anywhere_in_any_case() {
        for word in ["set", "listen", "prepare", "temp", "advisory", "hold", "set_config"] {
            for sql in [
                word.to_owned(),
                word.to_uppercase(),
                format!("select 1; {}", word.to_uppercase()),
                format!("x{word}"),
            ] {
                assert!(super::contains_trigger(sql.as_bytes()), "{sql}");
            }
            // Truncated at the end of the text: no match, no out-of-bounds read ("set_confi"
            // still holds "set").
            let cut = &word.as_bytes()[..word.len() - 1];
            assert_eq!(super::contains_trigger(cut), word == "set_config", "{word}");
        }
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "",
            "s",
            "UPDATE t SET",
        ] {
            assert_eq!(super::contains_trigger(sql.as_bytes()), sql.ends_with("SET"), "{sql}");
        }
    }

    #[test]
    fn block_scan_agrees_with_a_plain_search_at_every_offset() {
        let words = ["set", "listen", "prepare", "temp", "advisory", "hold"];
        let reference = |sql: &[u8]| {
            let lower = sql.to_ascii_lowercase();
            words.iter().any(|w| lower.windows(w.len()).any(|x| x == w.as_bytes()))
        };
        let filler = b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345 AND x IN (1, 2, 3)";
        for word in words {
            for case in [word.to_owned(), word.to_uppercase()] {
                // Every start offset across several 16-byte blocks, including words that
                // straddle a block boundary and words cut off by the end of the text.
                for at in 0..48 {
                    let mut sql = filler[..at.min(filler.len())].to_vec();
                    sql.extend_from_slice(case.as_bytes());
                    sql.extend_from_slice(&filler[..(40 - at % 40)]);
                    assert!(super::contains_trigger(&sql), "{}", String::from_utf8_lossy(&sql));
                    for cut in 0..sql.len() {
                        assert_eq!(
                            super::contains_trigger(&sql[..cut]),
                            reference(&sql[..cut]),
                            "{}",
                            String::from_utf8_lossy(&sql[..cut])
                        );
                    }
                }
            }
        }
        for len in 0..filler.len() {
            assert_eq!(super::contains_trigger(&filler[..len]), reference(&filler[..len]));
        }
    }

    #[test]
    fn detects_session_state_changes() {
        for (sql, kind) in [
            ("SET search_path = app", "SET"),
            ("set session statement_timeout to 5", "SET"),
            ("select 1; SET work_mem='1GB'", "SET"),
            ("LISTEN channel", "LISTEN"),
            ("PREPARE p AS select 1", "PREPARE"),
            ("create temp table t (x int)", "temporary object"),
            ("CREATE GLOBAL TEMPORARY TABLE t (x int)", "temporary object"),
            ("select pg_advisory_lock(1)", "session advisory lock"),
            ("select pg_try_advisory_lock_shared(1)", "session advisory lock"),
            ("select set_config('search_path', 'x', false)", "set_config"),
            ("declare c cursor with hold for select 1", "WITH HOLD cursor"),
        ] {
            assert_eq!(scan(sql.as_bytes()), Some(kind), "{sql}");
        }
    }

    #[test]
    fn ignores_transaction_scoped_and_tracked_changes() {
        for sql in [
            "SET LOCAL search_path = app",
            "set transaction isolation level serializable",
            "SET TimeZone = 'UTC'",
            "set application_name to x",
            "select 'set search_path = x'",
            "select 1 -- set x = 1",
            "select /* listen x */ 1",
            "select pg_advisory_xact_lock(1)",
            "select set_config('a.b', 'x', true)",
            "prepare transaction 'x'",
            "select $$ create temp table $$",
            "update settings set value = 1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        ] {
            assert_eq!(scan(sql.as_bytes()), None, "{sql}");
        }
    }
}
