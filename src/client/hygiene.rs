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

/// Trigger words the pre-filter found, one bit each: the full scan only looks for what they
/// can start.
const SET: u8 = 1;
const LISTEN: u8 = 1 << 1;
const PREPARE: u8 = 1 << 2;
const TEMP: u8 = 1 << 3;
const ADVISORY: u8 = 1 << 4;
const HOLD: u8 = 1 << 5;
const SET_CONFIG: u8 = 1 << 6;

/// Returns the first session-state change in `sql`, if any.
pub fn session_state_change(sql: &[u8]) -> Option<StateChange> {
    // A Query message's text keeps its NUL terminator.
    let sql = sql.strip_suffix(b"\0").unwrap_or(sql);
    // Cheap pre-filter, stopping at the first trigger word: most queries contain none. Only a
    // text with one pays for a second pass that names them all.
    if !contains_trigger(sql) {
        return None;
    }
    let found = triggers(sql);
    if found == SET && !may_start_with_set(sql) {
        return None;
    }
    full_scan(sql, found)
}

/// The lexical scan proper, for a text whose trigger words are `found`.
fn full_scan(sql: &[u8], found: u8) -> Option<StateChange> {
    let text = normalise(sql);
    for stmt in text.split(|&b| b == b';') {
        // The first six words, without allocating ("UPDATE … SET" comes through here).
        let mut words: [&[u8]; 6] = [b""; 6];
        for (slot, word) in words
            .iter_mut()
            .zip(stmt.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty()))
        {
            *slot = word;
        }
        let w = |i: usize| words.get(i).copied().unwrap_or(b"");
        match w(0) {
            b"set" => {
                let name = match w(1) {
                    b"local" => continue,
                    b"session" => {
                        if w(2) == b"characteristics" {
                            return Some("SET SESSION CHARACTERISTICS");
                        }
                        w(2)
                    }
                    other => other,
                };
                if name == b"transaction" {
                    continue;
                }
                let name = name.split(|&b| b == b'=' || b == b'(').next().unwrap_or(b"");
                if TRACKED.iter().any(|t| t.as_bytes().eq_ignore_ascii_case(name)) {
                    continue;
                }
                return Some("SET");
            }
            b"listen" => return Some("LISTEN"),
            b"prepare" if w(1) != b"transaction" => return Some("PREPARE"),
            b"create" => {
                let mut i = 1;
                if matches!(w(i), b"global" | b"local") {
                    i += 1;
                }
                if matches!(w(i), b"temp" | b"temporary") {
                    return Some("temporary object");
                }
                if w(i) == b"or" && w(i + 1) == b"replace" && matches!(w(i + 2), b"temp" | b"temporary") {
                    return Some("temporary object");
                }
            }
            b"declare" if found & HOLD != 0 && find(stmt, b" with hold").is_some() => {
                return Some("WITH HOLD cursor");
            }
            _ => {}
        }
        if found & ADVISORY != 0
            && (find(stmt, b"pg_advisory_lock").is_some() || find(stmt, b"pg_try_advisory_lock").is_some())
        {
            return Some("session advisory lock");
        }
        if found & SET_CONFIG != 0
            && let Some(at) = find(stmt, b"set_config")
        {
            // set_config(name, value, is_local): session-wide unless the last argument is true.
            let call = &stmt[at..];
            let args = call.split(|&b| b == b')').next().unwrap_or(call);
            if find(args, b"true").is_none() {
                return Some("set_config");
            }
        }
    }
    None
}

/// False only when `sql` is one statement (at most a trailing `;`) without comments whose first
/// word is not SET: then its "set" is an UPDATE's (or a name's), and a text whose only trigger
/// word is "set" changes no session state. Anything else is left to the full scan.
fn may_start_with_set(sql: &[u8]) -> bool {
    let mut end = sql.len();
    for (i, &b) in sql.iter().enumerate() {
        match b {
            b';' if sql[i + 1..].iter().all(u8::is_ascii_whitespace) => {
                end = i;
                break;
            }
            b';' => return true,
            b'-' | b'/' if matches!(sql.get(i + 1), Some(b'-' | b'*')) => return true,
            _ => {}
        }
    }
    // The leading letters only: a quote, `$` or NUL glued to the keyword (`SET"work_mem"=…`,
    // which PostgreSQL runs) splits it from what follows in the full scan.
    let code = &sql[..end];
    let start = code
        .iter()
        .position(|&b| !(b.is_ascii_whitespace() || b == 0))
        .unwrap_or(code.len());
    let letters = code[start..].iter().take_while(|b| b.is_ascii_alphabetic()).count();
    code[start..start + letters].eq_ignore_ascii_case(b"set")
}

/// Where `needle` first occurs in `hay`. The scans that need it are rare (the pre-filter saw
/// the word), and short texts do not repay a searcher's set-up.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains_trigger(sql: &[u8]) -> bool {
    let mut any = false;
    scan_keys(sql, |bit| {
        any = bit != 0;
        any
    });
    any
}

/// The trigger words in `sql`, one bit each.
fn triggers(sql: &[u8]) -> u8 {
    let mut found = 0;
    scan_keys(sql, |bit| {
        found |= bit;
        false
    });
    found
}

/// Calls `hit` with the bit of every trigger word (0 for a key that starts none) until it
/// returns true.
#[inline(always)]
fn scan_keys(sql: &[u8], mut hit: impl FnMut(u8) -> bool) {
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
            if hit(trigger_at(sql, at + byte as usize)) {
                return;
            }
        }
        at += 16;
    }
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

/// Which trigger word starts at `sql[i]` (whose two-letter key is known to match), as its
/// bit; 0 for none.
fn trigger_at(sql: &[u8], i: usize) -> u8 {
    let (word, bit): (&[u8], u8) = match (sql[i] | 0x20, sql.get(i + 1).map_or(0, |b| b | 0x20)) {
        (b's', b'e') => (b"set", SET),
        (b'l', b'i') => (b"listen", LISTEN),
        (b'p', b'r') => (b"prepare", PREPARE),
        (b't', b'e') => (b"temp", TEMP),
        (b'a', b'd') => (b"advisory", ADVISORY),
        (b'h', b'o') => (b"hold", HOLD),
        _ => return 0,
    };
    if !sql.get(i..i + word.len()).is_some_and(|w| w.eq_ignore_ascii_case(word)) {
        return 0;
    }
    if bit == SET
        && sql
            .get(i + 3..i + 10)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"_config"))
    {
        return SET | SET_CONFIG;
    }
    bit
}

/// Lower-cases the SQL (ASCII; other bytes pass as they are) and blanks out comments and
/// quoted strings/identifiers, so keywords are only found in code.
fn normalise(sql: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(sql.len());
    let mut i = 0;
    while i < sql.len() {
        let b = sql[i];
        match b {
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
                out.push(b' ');
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < sql.len() && !(sql[i] == b'*' && sql[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
                out.push(b' ');
                continue;
            }
            b'\'' | b'"' => {
                let quote = b;
                i += 1;
                while i < sql.len() && sql[i] != quote {
                    i += 1;
                }
                out.extend_from_slice(b" '' ");
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
                    out.extend_from_slice(b" '' ");
                    i = end;
                    continue;
                }
                out.push(b'$');
            }
            0 => out.push(b' '),
            _ => out.push(b.to_ascii_lowercase()),
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
    fn the_prefilter_names_the_words_it_saw() {
        use super::{ADVISORY, HOLD, SET, SET_CONFIG, triggers};
        assert_eq!(
            triggers(b"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"),
            SET
        );
        assert_eq!(triggers(b"select SET_CONFIG('a', 'b', false)"), SET | SET_CONFIG);
        assert_eq!(triggers(b"select set_confi"), SET, "cut short");
        assert_eq!(
            triggers(b"declare c cursor with hold for select pg_advisory_lock(1)"),
            HOLD | ADVISORY
        );
        assert_eq!(triggers(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"), 0);
    }

    #[test]
    fn the_shortcut_for_set_only_texts_agrees_with_the_full_scan() {
        let heads = ["", " ", "\t\n", "/* c */ ", "-- c\n", "begin; ", "x; "];
        let bodies = [
            "update t set x = 1",
            "UPDATE t SET x = 1",
            "set search_path = a",
            "SET TimeZone = 'UTC'",
            "set local work_mem = 1",
            "update t set x = ';'",
            "update t set x = '--'",
            "select offset_set from t",
            "insert into settings values (1)",
            "set",
            "setx = 1",
            "SET\"work_mem\"='77kB'",
            "set$$x$$",
            "set\0x",
        ];
        for head in heads {
            for body in bodies {
                for tail in ["", ";", "; ", ";\n", "; set work_mem = 1", " -- set work_mem = 1"] {
                    let sql = format!("{head}{body}{tail}");
                    let found = super::triggers(sql.as_bytes());
                    if found == super::SET && !super::may_start_with_set(sql.as_bytes()) {
                        assert_eq!(super::full_scan(sql.as_bytes(), found), None, "{sql:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn updates_with_set_are_looked_at_whole() {
        for (sql, kind) in [
            ("  Set search_path = a;  ", Some("SET")),
            ("\tSET work_mem = 1", Some("SET")),
            ("update t set x = 1; ", None),
            ("update t set x = 1;\0", None),
            ("SET\"work_mem\"='77kB'", Some("SET")),
            ("set\"search_path\" to public", Some("SET")),
            ("\0SET work_mem=1", Some("SET")),
            ("set\0search_path = x", Some("SET")),
            ("set work_mem = 1;\0", Some("SET")),
            ("/* x */ SET work_mem = 1", Some("SET")),
            ("-- x\nSET work_mem = 1", Some("SET")),
            ("update t set x = 1 -- x\nset y", None),
            ("update t set x = ';' ; set work_mem = 1", Some("SET")),
            ("UPDATE t SET x = 1; SET search_path = a", Some("SET")),
            ("update t set x = set_config('a.b', 'c', false)", Some("set_config")),
            ("update t set x = set_config('a.b', 'c', true)", None),
            (
                "update t set x = 1 where pg_try_advisory_lock(2)",
                Some("session advisory lock"),
            ),
            ("UPDATE t SET temp = 1 /* ; set work_mem = 1 */", None),
            ("update t set x = 1;\nlisten ch", Some("LISTEN")),
        ] {
            assert_eq!(scan(sql.as_bytes()), kind, "{sql}");
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
