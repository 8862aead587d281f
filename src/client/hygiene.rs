//! Session-state hygiene for transaction mode. A statement that changes session state (a SET
//! that outlives the transaction, LISTEN, SQL PREPARE, a session-level advisory lock, a
//! temporary table, `set_config(…, false)`, a WITH HOLD cursor) would leak to whichever client
//! gets the server next. Per pool, pgweir allows it (PgBouncer's behaviour), resets the server
//! before anyone else uses it, or rejects the statement with an explanation.
//!
//! The scan is lexical and conservative: comments and string literals are skipped, statements
//! are split at semicolons, and only leading keywords (plus a few function names anywhere) are
//! looked at. A DO block's body runs at once, so its text is searched for trigger words, its
//! string literals included (they may be dynamic SQL). What a called function does is out of
//! sight. Parameters pgweir tracks itself (TimeZone, DateStyle, …) are not session state
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
    // Cheap pre-filter: most queries contain no trigger word. One pass names them all (a
    // pass that stopped at the first would be followed by this one whenever it found one).
    let found = triggers(sql);
    if found == 0 {
        return None;
    }
    if found == SET && !may_start_with_set(sql) {
        return None;
    }
    full_scan(sql, found)
}

/// The session-state change a FunctionCall message (the fast-path protocol, which names a
/// function by OID and carries no SQL to scan) makes, for the built-in functions that make one.
/// Their OIDs are fixed in PostgreSQL's catalog; a user's function is as opaque here as in
/// `SELECT f()`.
pub fn function_call_change(oid: u32) -> Option<StateChange> {
    match oid {
        // set_config(text, text, bool): whether is_local is true would take decoding the
        // arguments; a reset too many is the cheap side.
        2078 => Some("set_config"),
        // pg_[try_]advisory_lock[_shared](bigint) and (integer, integer).
        2880..=2883 | 2886..=2889 => Some("session advisory lock"),
        _ => None,
    }
}

/// The lexical scan proper, for a text whose trigger words are `found`.
fn full_scan(sql: &[u8], found: u8) -> Option<StateChange> {
    // With standard_conforming_strings off (a tracked parameter, so a client may have it) a
    // backslash escapes a quote in a plain string literal. Which way a text is read decides
    // where its strings end, so a text with a backslash is scanned both ways.
    scan_text(sql, found, false).or_else(|| {
        if sql.contains(&b'\\') {
            scan_text(sql, found, true)
        } else {
            None
        }
    })
}

fn scan_text(sql: &[u8], found: u8, backslash_escapes: bool) -> Option<StateChange> {
    let Normalised { text, do_bodies } = normalise(sql, backslash_escapes);
    // A DO block runs its body now: whatever the body does to the session outlives it.
    if let Some(kind) = do_bodies.into_iter().find_map(|r| do_body_change(&sql[r])) {
        return Some(kind);
    }
    // A table created in pg_temp by name (or with pg_temp first in search_path, even SET
    // LOCAL) is a temporary table; the name may sit in a string given to set_config.
    if found & TEMP != 0 && find(&sql.to_ascii_lowercase(), b"pg_temp").is_some() {
        return Some("temporary object");
    }
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
            _ => {}
        }
        if found & TEMP != 0 && creates_temp(stmt) {
            return Some("temporary object");
        }
        if found & HOLD != 0
            && w(0) == b"declare"
            && code_words(stmt)
                .zip(code_words(stmt).skip(1))
                .any(|pair| pair == (&b"with"[..], &b"hold"[..]))
        {
            return Some("WITH HOLD cursor");
        }
        if found & ADVISORY != 0
            && (find(stmt, b"pg_advisory_lock").is_some() || find(stmt, b"pg_try_advisory_lock").is_some())
        {
            return Some("session advisory lock");
        }
        if found & SET_CONFIG != 0 && set_config_not_local(stmt) {
            return Some("set_config");
        }
    }
    None
}

/// The words of normalised code: runs of identifier bytes, a quoted identifier (kept with its
/// quotes, so it never reads as a keyword) being one word.
fn code_words(stmt: &[u8]) -> impl Iterator<Item = &[u8]> {
    stmt.split(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'"') || b >= 0x80))
        .filter(|w| !w.is_empty())
}

/// `CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP …` and `SELECT … INTO [GLOBAL|LOCAL] TEMP …`,
/// wherever they sit in the statement (`EXPLAIN ANALYZE CREATE TEMP TABLE … AS` runs it).
fn creates_temp(stmt: &[u8]) -> bool {
    let mut prev: &[u8] = b"";
    for word in code_words(stmt) {
        if matches!(word, b"temp" | b"temporary")
            && matches!(prev, b"create" | b"replace" | b"into" | b"local" | b"global")
        {
            return true;
        }
        prev = word;
    }
    false
}

/// Whether a `set_config` call in normalised `stmt` is not certainly local: its last
/// argument is not the literal `true` (`not true`, `true and false` and a parameter are all
/// session-wide as far as this scan can tell).
fn set_config_not_local(stmt: &[u8]) -> bool {
    let mut rest = stmt;
    while let Some(at) = find(rest, b"set_config") {
        rest = &rest[at + b"set_config".len()..];
        let open = rest.iter().position(|&b| !b.is_ascii_whitespace() && b != b'"');
        if open.and_then(|o| rest.get(o)) != Some(&b'(') {
            continue;
        }
        let mut depth = 0usize;
        let mut last_arg_start = 0;
        let mut last = None;
        for (i, &b) in rest.iter().enumerate() {
            match b {
                b'(' => {
                    depth += 1;
                    if depth == 1 {
                        last_arg_start = i + 1;
                    }
                }
                b',' if depth == 1 => last_arg_start = i + 1,
                b')' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        last = rest.get(last_arg_start..i);
                        break;
                    }
                }
                _ => {}
            }
        }
        if last.map(<[u8]>::trim_ascii) != Some(&b"true"[..]) {
            return true;
        }
    }
    false
}

/// The session-state change a DO block's body may make, read from its raw text with string
/// literals included, since those may be dynamic SQL (`EXECUTE 'SET role x'`). PL/pgSQL
/// statements do not start at the start of the text, so a word counts wherever it is; `set`
/// only where a statement (or a string) can start, so that an UPDATE's SET does not count.
/// A false positive costs a reset; a false negative leaks.
fn do_body_change(body: &[u8]) -> Option<StateChange> {
    let body = body.to_ascii_lowercase();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    let mut prev: &[u8] = b"";
    let mut i = 0;
    while i < body.len() {
        if !is_word(body[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < body.len() && is_word(body[i]) {
            i += 1;
        }
        let word = &body[start..i];
        let next = body[i..].split(|&b| !is_word(b)).find(|w| !w.is_empty()).unwrap_or(b"");
        // Whether a word ends right before this one (with only whitespace between).
        let after_word = body[..start]
            .iter()
            .rev()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| is_word(b));
        let statement_start = !after_word || matches!(prev, b"begin" | b"then" | b"else" | b"loop" | b"do");
        match word {
            b"set" if statement_start && !matches!(next, b"local" | b"transaction") => return Some("SET"),
            b"listen" => return Some("LISTEN"),
            b"prepare" if next != b"transaction" => return Some("PREPARE"),
            b"temp" | b"temporary" => return Some("temporary object"),
            b"hold" if prev == b"with" => return Some("WITH HOLD cursor"),
            _ if word.starts_with(b"pg_temp") => return Some("temporary object"),
            _ if find(word, b"advisory_lock").is_some() => return Some("session advisory lock"),
            // Its arguments may hold strings with any punctuation: any call counts.
            _ if find(word, b"set_config").is_some() => return Some("set_config"),
            _ => {}
        }
        prev = word;
    }
    None
}

/// False only when `sql` is one statement (at most a trailing `;`) without comments whose first
/// word is neither SET nor DO: then its "set" is an UPDATE's (or a name's), and a text whose only trigger
/// word is "set" changes no session state. Anything else is left to the full scan.
fn may_start_with_set(sql: &[u8]) -> bool {
    // Only `;`, `-` and `/` matter here (an UPDATE … SET comes through here on every
    // execution), looked for a vector at a time.
    may_start_with_set_finding(sql, find_punctuation)
}

/// [`may_start_with_set`] with `find` for its punctuation search (the tests pass a bytewise
/// one).
#[inline(always)]
fn may_start_with_set_finding(sql: &[u8], find: impl Fn(&[u8]) -> Option<usize>) -> bool {
    let mut end = sql.len();
    let mut from = 0;
    while let Some(off) = find(&sql[from..]) {
        let i = from + off;
        match sql[i] {
            b';' if sql[i + 1..].iter().all(u8::is_ascii_whitespace) => {
                end = i;
                break;
            }
            b';' => return true,
            b'-' | b'/' if matches!(sql.get(i + 1), Some(b'-' | b'*')) => return true,
            _ => {}
        }
        from = i + 1;
    }
    first_word_is_set_or_do(&sql[..end])
}

/// Where the first `;`, `-` or `/` in `hay` is.
#[inline]
fn find_punctuation(hay: &[u8]) -> Option<usize> {
    // SSE2 is x86-64's baseline: its searcher directly, without memchr3's run-time choice and
    // AVX2 set-up, which cost more than they save on a statement of tens of bytes.
    #[cfg(target_arch = "x86_64")]
    if let Some(three) = memchr::arch::x86_64::sse2::memchr::Three::new(b';', b'-', b'/') {
        return three.find(hay);
    }
    memchr::memchr3(b';', b'-', b'/', hay)
}

/// Whether one statement's first word is SET, or DO (whose "set" may be in its body, which runs
/// now). The leading letters only: a quote, `$` or NUL glued to the keyword (`SET"work_mem"=…`,
/// which PostgreSQL runs) splits it from what follows in the full scan.
fn first_word_is_set_or_do(code: &[u8]) -> bool {
    let start = code
        .iter()
        .position(|&b| !(b.is_ascii_whitespace() || b == 0))
        .unwrap_or(code.len());
    let letters = code[start..].iter().take_while(|b| b.is_ascii_alphabetic()).count();
    let word = &code[start..start + letters];
    word.eq_ignore_ascii_case(b"set") || word.eq_ignore_ascii_case(b"do")
}

/// Where `needle` first occurs in `hay`. The scans that need it are rare (the pre-filter saw
/// the word), and short texts do not repay a searcher's set-up.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
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
    // Tests the key positions in `hits` (byte j set: a key starts at `sql[base + j]`); true
    // when `hit` asked to stop.
    let mut test = |mut hits: u128, base: usize| {
        while hits != 0 {
            let byte = hits.trailing_zeros() / 8;
            // Each byte is 0 or 1, so this clears exactly the lowest hit.
            hits &= hits - 1;
            if hit(trigger_at(sql, base + byte as usize)) {
                return true;
            }
        }
        false
    };
    let len = sql.len();
    let mut at = 0;
    while let Some(block) = sql.get(at..at + 17).and_then(|b| <&[u8; 17]>::try_from(b).ok()) {
        if test(key_hits(block), at) {
            return;
        }
        at += 16;
    }
    // Positions `at..len - 1` are left (a key in the last byte starts no trigger word).
    if at + 1 >= len {
        return;
    }
    if let Some(base) = len.checked_sub(17)
        && let Ok(block) = <&[u8; 17]>::try_from(&sql[base..])
    {
        // The text's last 17 bytes, without the positions an earlier block tested (fewer
        // than 16 of them, so the shift is in range). No copy.
        let seen = at - base;
        test(key_hits(block) >> (8 * seen), at);
    } else {
        // A text shorter than a block (BEGIN, COMMIT): pair by pair, cheaper than a padded
        // copy of it and a block test (~140 instructions).
        // A key's first letter is one bit test; the pair is compared only after it.
        for (i, pair) in sql.windows(2).enumerate() {
            if matches!(pair[0] | 0x20, b's' | b'l' | b'p' | b't' | b'a' | b'h')
                && is_key(pair[0], pair[1])
                && hit(trigger_at(sql, i))
            {
                return;
            }
        }
    }
}

/// Byte j of the result is non-zero when a two-letter trigger key starts at `block[j]`,
/// ignoring ASCII case. `| 0x20` lower-cases ASCII letters and maps no other byte onto a
/// lower-case letter, so a key hit is exact. Fixed-length and branch-free so the compiler turns
/// it into vector compares (SSE2 on x86-64) without any unsafe code here.
fn key_hits(block: &[u8; 17]) -> u128 {
    let mut hits = [0u8; 16];
    for (j, hit) in hits.iter_mut().enumerate() {
        *hit = is_key(block[j], block[j + 1]) as u8;
    }
    u128::from_le_bytes(hits)
}

/// Whether the bytes `a`, `b` are a two-letter trigger key, ignoring ASCII case. Branch-free
/// (`&` and `|`, not `&&` and `||`) for [`key_hits`]' vector compares.
#[inline(always)]
fn is_key(a: u8, b: u8) -> bool {
    let (a, b) = (a | 0x20, b | 0x20);
    (a == b's') & (b == b'e')
        | (a == b'l') & (b == b'i')
        | (a == b'p') & (b == b'r')
        | (a == b't') & (b == b'e')
        | (a == b'a') & (b == b'd')
        | (a == b'h') & (b == b'o')
}

/// Which trigger word starts at `sql[i]` (whose two-letter key is known to match), as its
/// bit; 0 for none.
fn trigger_at(sql: &[u8], i: usize) -> u8 {
    // Three letters first, as one number (one switch): the "SE" of every SELECT and the "TE"
    // of every UPDATE end here. `| 0x20` maps only a letter's two cases onto a lower-case
    // letter, so three matching letters are the word's first three.
    const fn head(word: &[u8]) -> u32 {
        u32::from_le_bytes([word[0], word[1], word[2], 0])
    }
    const SET_: u32 = head(b"set");
    const LIS: u32 = head(b"lis");
    const PRE: u32 = head(b"pre");
    const TEM: u32 = head(b"tem");
    const ADV: u32 = head(b"adv");
    const HOL: u32 = head(b"hol");
    let lower = |k: usize| sql.get(i + k).map_or(0, |b| b | 0x20);
    let (rest, bit): (&[u8], u8) = match u32::from_le_bytes([lower(0), lower(1), lower(2), 0]) {
        SET_ => {
            let config = sql
                .get(i + 3..i + 10)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"_config"));
            return if config { SET | SET_CONFIG } else { SET };
        }
        LIS => (b"ten", LISTEN),
        PRE => (b"pare", PREPARE),
        TEM => (b"p", TEMP),
        ADV => (b"isory", ADVISORY),
        HOL => (b"d", HOLD),
        _ => return 0,
    };
    match sql.get(i + 3..i + 3 + rest.len()) {
        Some(w) if w.eq_ignore_ascii_case(rest) => bit,
        _ => 0,
    }
}

/// A text with its comments and literals blanked, and where the bodies of its DO blocks are.
struct Normalised {
    text: Vec<u8>,
    do_bodies: Vec<std::ops::Range<usize>>,
}

/// Lower-cases the SQL (ASCII; other bytes pass as they are) and blanks out comments and string
/// literals, so keywords are only found in code. Quoted identifiers stay, quotes included, with
/// bytes other than letters, digits and `_` turned into `_` (`"pg_advisory_lock"(1)` is a call;
/// `"a;b"` is no statement break). Where a string ends follows PostgreSQL's lexer: nested
/// comments, backslash escapes in E'' strings (in all strings with `backslash_escapes`), and
/// `$` inside an identifier (`a$x$`) starting no dollar quote. Reading a literal as ending
/// earlier than PostgreSQL does would let a quote in it hide the code after it.
fn normalise(sql: &[u8], backslash_escapes: bool) -> Normalised {
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    let mut out = Vec::with_capacity(sql.len());
    let mut do_bodies = Vec::new();
    let mut stmt_start = 0;
    // Where the last string literal that took backslash escapes ended.
    let mut escaping_end: Option<usize> = None;
    // Whether the statement being read is a DO, whose literal is its body.
    let in_do = |out: &[u8], stmt_start: usize| {
        let stmt = out[stmt_start..].trim_ascii_start();
        stmt.starts_with(b"do") && !stmt.get(2).is_some_and(|&b| ident(b))
    };
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
                let mut depth = 0usize;
                while i < sql.len() {
                    match (sql[i], sql.get(i + 1)) {
                        (b'/', Some(b'*')) => {
                            depth += 1;
                            i += 2;
                        }
                        (b'*', Some(b'/')) => {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => i += 1,
                    }
                }
                out.push(b' ');
                continue;
            }
            b'\'' => {
                // An E'' string, or one continuing it across a newline, takes backslash escapes.
                let continues_escaping = escaping_end.is_some_and(|end: usize| {
                    let gap = &sql[end..i];
                    gap.iter().all(u8::is_ascii_whitespace) && gap.contains(&b'\n')
                });
                let escapes = backslash_escapes
                    || continues_escaping
                    || (i >= 1 && sql[i - 1] | 0x20 == b'e' && !(i >= 2 && ident(sql[i - 2])));
                i += 1;
                let body = i;
                while i < sql.len() {
                    match sql[i] {
                        b'\\' if escapes => i += 2,
                        b'\'' if sql.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => break,
                        _ => i += 1,
                    }
                }
                if in_do(&out, stmt_start) {
                    do_bodies.push(body..i.min(sql.len()));
                }
                escaping_end = escapes.then_some(i + 1);
                out.extend_from_slice(b" '' ");
            }
            b'"' => {
                out.extend_from_slice(b" \"");
                i += 1;
                while i < sql.len() && sql[i] != b'"' {
                    let c = sql[i].to_ascii_lowercase();
                    out.push(if c.is_ascii_alphanumeric() { c } else { b'_' });
                    i += 1;
                }
                out.extend_from_slice(b"\" ");
            }
            // A `$` after an identifier byte is part of the identifier (or a parameter).
            b'$' if !(i >= 1 && ident(sql[i - 1])) => {
                // Dollar quoting: $tag$ ... $tag$, the tag an identifier or empty.
                let start = i;
                let mut j = i + 1;
                if sql.get(j).is_some_and(|c| !c.is_ascii_digit()) {
                    while j < sql.len() && ident(sql[j]) && sql[j] != b'$' {
                        j += 1;
                    }
                }
                if j < sql.len() && sql[j] == b'$' {
                    let tag = &sql[start..=j];
                    let body_start = j + 1;
                    let body_end = sql[body_start..]
                        .windows(tag.len())
                        .position(|w| w == tag)
                        .map_or(sql.len(), |p| body_start + p);
                    if in_do(&out, stmt_start) {
                        do_bodies.push(body_start..body_end);
                    }
                    out.extend_from_slice(b" '' ");
                    i = (body_end + tag.len()).min(sql.len());
                    continue;
                }
                out.push(b'$');
            }
            b';' => {
                out.push(b';');
                stmt_start = out.len();
            }
            0 => out.push(b' '),
            _ => out.push(b.to_ascii_lowercase()),
        }
        i += 1;
    }
    Normalised { text: out, do_bodies }
}

#[cfg(test)]
mod tests {
    use super::session_state_change as scan;

    fn contains_trigger(sql: &[u8]) -> bool {
        super::triggers(sql) != 0
    }

    /// `may_start_with_set` with its punctuation found byte by byte, as it was before it used
    /// memchr (what it does with each mark is shared).
    fn may_start_with_set_bytewise(sql: &[u8]) -> bool {
        super::may_start_with_set_finding(sql, |hay| hay.iter().position(|b| matches!(b, b';' | b'-' | b'/')))
    }

    #[test]
    fn the_set_shortcut_finds_punctuation_at_every_offset() {
        let base = b"UPDATE pgbench_accounts SET abalance = abalance + -12 WHERE aid = 3";
        for mark in [&b";"[..], b"; ", b";x", b"--", b"/*", b"-", b"/", b"- -", b"; \n"] {
            for at in 0..=base.len() {
                let mut sql = base[..at].to_vec();
                sql.extend_from_slice(mark);
                sql.extend_from_slice(&base[at..]);
                for cut in 0..=sql.len() {
                    let text = &sql[..cut];
                    assert_eq!(
                        super::may_start_with_set(text),
                        may_start_with_set_bytewise(text),
                        "{}",
                        String::from_utf8_lossy(text)
                    );
                }
            }
        }
        for sql in [
            &b"set x = 1"[..],
            b" SET x=1;",
            b"do $$ $$",
            b"update t set x = 1;  \n\t",
        ] {
            assert_eq!(super::may_start_with_set(sql), may_start_with_set_bytewise(sql));
        }
    }

    #[test]
    fn trigger_prefilter_finds_every_word_anywhere_in_any_case() {
        for word in ["set", "listen", "prepare", "temp", "advisory", "hold", "set_config"] {
            for sql in [
                word.to_owned(),
                word.to_uppercase(),
                format!("select 1; {}", word.to_uppercase()),
                format!("x{word}"),
            ] {
                assert!(contains_trigger(sql.as_bytes()), "{sql}");
            }
            // Truncated at the end of the text: no match, no out-of-bounds read ("set_confi"
            // still holds "set").
            let cut = &word.as_bytes()[..word.len() - 1];
            assert_eq!(contains_trigger(cut), word == "set_config", "{word}");
        }
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "",
            "s",
            "UPDATE t SET",
        ] {
            assert_eq!(contains_trigger(sql.as_bytes()), sql.ends_with("SET"), "{sql}");
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
                    assert!(contains_trigger(&sql), "{}", String::from_utf8_lossy(&sql));
                    for cut in 0..sql.len() {
                        assert_eq!(
                            contains_trigger(&sql[..cut]),
                            reference(&sql[..cut]),
                            "{}",
                            String::from_utf8_lossy(&sql[..cut])
                        );
                    }
                }
            }
        }
        for len in 0..filler.len() {
            assert_eq!(contains_trigger(&filler[..len]), reference(&filler[..len]));
        }
    }

    #[test]
    fn near_misses_are_no_trigger_words_in_short_texts_or_long() {
        let words = ["set", "listen", "prepare", "temp", "advisory", "hold"];
        let reference = |sql: &[u8]| {
            let lower = sql.to_ascii_lowercase();
            words.iter().any(|w| lower.windows(w.len()).any(|x| x == w.as_bytes()))
        };
        for word in words {
            // Every letter in turn: changed (a near miss), and upper-cased alone (mixed case).
            for k in 0..word.len() {
                let mut miss = word.as_bytes().to_vec();
                miss[k] = b'x';
                let mut mixed = word.as_bytes().to_vec();
                mixed[k] = mixed[k].to_ascii_uppercase();
                for w in [miss, mixed] {
                    for sql in [
                        w.clone(),
                        [&b"END "[..], &w, b";"].concat(),
                        [&b"SELECT abalance FROM pgbench_accounts WHERE "[..], &w, b" = 1"].concat(),
                    ] {
                        assert_eq!(
                            contains_trigger(&sql),
                            reference(&sql),
                            "{}",
                            String::from_utf8_lossy(&sql)
                        );
                    }
                }
            }
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
    fn do_blocks_are_scanned_inside_their_bodies() {
        for (sql, kind) in [
            ("DO $$BEGIN SET search_path = pg_catalog; END$$;", "SET"),
            ("do $$begin set role alice; end$$", "SET"),
            (
                "DO $$BEGIN IF true THEN SET SESSION AUTHORIZATION alice; END IF; END$$",
                "SET",
            ),
            ("DO LANGUAGE plpgsql $x$BEGIN SET search_path = x; END$x$", "SET"),
            ("DO $x$BEGIN SET search_path = x; END$x$ LANGUAGE plpgsql", "SET"),
            ("DO 'BEGIN SET search_path = q; END'", "SET"),
            ("DO E'BEGIN SET search_path = q; END'", "SET"),
            ("select 1; do $$begin set role alice; end$$", "SET"),
            ("/* c */ DO $$BEGIN SET search_path = x; END$$", "SET"),
            ("DO $$BEGIN EXECUTE 'SET search_path = z'; END$$", "SET"),
            ("DO $$BEGIN EXECUTE format('SET role %I', 'alice'); END$$", "SET"),
            (
                "DO $$BEGIN PERFORM set_config('search_path', 'y', false); END$$",
                "set_config",
            ),
            ("DO $$BEGIN CREATE TEMP TABLE tt(x int); END$$", "temporary object"),
            ("DO $$BEGIN PERFORM pg_advisory_lock(1); END$$", "session advisory lock"),
            ("DO $$BEGIN LISTEN chan; END$$", "LISTEN"),
            ("DO $$BEGIN EXECUTE 'PREPARE p AS SELECT 1'; END$$", "PREPARE"),
            (
                "DO $$BEGIN EXECUTE 'DECLARE c CURSOR WITH HOLD FOR SELECT 1'; END$$",
                "WITH HOLD cursor",
            ),
        ] {
            assert_eq!(scan(sql.as_bytes()), Some(kind), "{sql}");
        }
        for sql in [
            "DO $$BEGIN UPDATE t SET x = 1; END$$",
            "DO $$BEGIN SET LOCAL search_path = x; END$$",
            "DO $$BEGIN PERFORM pg_advisory_xact_lock(1); END$$",
            "create function f() returns void as $$ set search_path = x $$ language sql",
            "select $$ do $$",
        ] {
            assert_eq!(scan(sql.as_bytes()), None, "{sql}");
        }
    }

    #[test]
    fn literals_and_comments_end_where_postgresql_ends_them() {
        for sql in [
            // Backslash escapes in an E'' string, and in a plain one with
            // standard_conforming_strings off.
            r"select E'\' ; ' ; set search_path = estr; -- '",
            r"select e'\' ; ' ; set search_path = estr; -- '",
            r"select E'a''\' ; ' ; set search_path = estr; -- '",
            "select E'x'\n'\\' ; ' ; set search_path = estr; -- '",
            r"select '\' ; ' ; set search_path = scs_off; -- '",
            // Nested comments.
            "/* /* */ ' */ set search_path = nest; -- '",
            // `$` inside an identifier starts no dollar quote; a tag may be non-ASCII.
            "select 1 as a$x$; set search_path = dollarid; select 1 as b$x$",
            "select $é$ ' $é$; set search_path = utag; -- '",
            // A quoted identifier is a name, not a string.
            "select \"pg_advisory_lock\"(5)",
            "select pg_catalog.\"set_config\"('search_path', 'qi', false)",
            "prepare \"transaction\" as select 1",
        ] {
            assert!(scan(sql.as_bytes()).is_some(), "{sql}");
        }
        for sql in [
            r"select '\' -- set search_path = x",
            "select 1 as \"a;set search_path = x\"",
            "select U&'d\\0061t\\+000061'",
        ] {
            assert_eq!(scan(sql.as_bytes()), None, "{sql}");
        }
    }

    #[test]
    fn temporary_objects_made_any_way() {
        for sql in [
            "select 1 into temp tt",
            "SELECT 1 INTO TEMPORARY TABLE tt",
            "select 1 into local temp tt",
            "with x as (select 1) select * into temp tt from x",
            "explain analyze create temp table tt as select 1",
            "create temp sequence s",
            "create temporary view v as select 1",
            "create or replace temp view v as select 1",
            "create table pg_temp.tt (x int)",
            "create function pg_temp.f() returns int as 'select 1' language sql",
            "begin; set local search_path = pg_temp; create table tt (x int); commit",
            "select set_config('search_path', 'pg_temp', true)",
        ] {
            assert_eq!(scan(sql.as_bytes()), Some("temporary object"), "{sql}");
        }
        for sql in [
            "select temp from weather",
            "update weather set temp = 1",
            "create table template_x (x int)",
        ] {
            assert_eq!(scan(sql.as_bytes()), None, "{sql}");
        }
    }

    #[test]
    fn set_config_is_local_only_with_a_literal_true() {
        for sql in [
            "select set_config('search_path', 'tf', true and false)",
            "select set_config('search_path', 'tf', not true)",
            "select set_config('a.b', 'x', true), set_config('search_path', 'x', false)",
            "select set_config('a.b', 'x', $1)",
        ] {
            assert_eq!(scan(sql.as_bytes()), Some("set_config"), "{sql}");
        }
        for sql in [
            "select set_config('a.b', current_setting('a.c'), true)",
            "select set_config('a.b', 'x', TRUE), set_config('a.c', 'y', true)",
        ] {
            assert_eq!(scan(sql.as_bytes()), None, "{sql}");
        }
    }

    #[test]
    fn hold_cursors_whatever_the_spacing() {
        for sql in [
            "declare c cursor with\thold for select 1",
            "DECLARE c CURSOR WITH\nHOLD FOR SELECT 1",
            "declare c no scroll cursor with /* x */ hold for select 1",
        ] {
            assert_eq!(scan(sql.as_bytes()), Some("WITH HOLD cursor"), "{sql}");
        }
        assert_eq!(scan(b"declare c cursor without hold for select 1"), None);
    }

    #[test]
    fn texts_cut_anywhere_never_panic_the_scan() {
        // Unterminated literals, comments and calls end the text at every possible byte.
        let tokens: [&[u8]; 16] = [
            b"do $$",
            b"$x$",
            b"E'",
            b"'",
            b"\\",
            b"/*",
            b"*/",
            b"--",
            b";",
            b"\"",
            b"set_config(",
            b")",
            b",",
            b" set ",
            b"temp",
            b"\n",
        ];
        let mut seed = 0x9e37_79b9_u32;
        for _ in 0..20_000 {
            let mut sql = Vec::new();
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                sql.extend_from_slice(tokens[seed as usize % tokens.len()]);
            }
            for cut in 0..=sql.len() {
                let _ = scan(&sql[..cut]);
            }
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
