//! Session parameters: what a client expects (startup values plus ParameterStatus updates it has
//! seen) and what a server connection has. On checkout the difference is applied with one `SET`
//! round trip, so a client's client_encoding, DateStyle, TimeZone… follow it from server to
//! server in transaction mode.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

/// Parameters PostgreSQL reports with ParameterStatus whose client value must follow the client.
/// Others it reports (server_version, integer_datetimes…) are server facts, not client settings.
pub const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
];

/// Every parameter PostgreSQL 15 reports with ParameterStatus (GUC_REPORT). Values pgweir SET
/// for any other name are only known because pgweir set them.
pub const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
];

/// Whether `name`'s values mean the same when they differ only in ASCII case. PostgreSQL
/// canonicalises these ("iso, dmy" is reported as "ISO, DMY", "europe/paris" as "Europe/Paris",
/// "ON" as "on"); it keeps an application_name, or any custom setting, exactly as given.
fn case_insensitive_value(name: &str) -> bool {
    matches!(
        name,
        "client_encoding"
            | "DateStyle"
            | "IntervalStyle"
            | "TimeZone"
            | "standard_conforming_strings"
            | "default_transaction_read_only"
    )
}

/// Equal values for `name`, as PostgreSQL would report them.
fn same_value(name: &str, a: &[u8], b: &[u8]) -> bool {
    match case_insensitive_value(name) {
        true => a.eq_ignore_ascii_case(b),
        false => a == b,
    }
}

/// What PostgreSQL reports for a client's startup `value` of the tracked parameter `name`, where
/// pgweir can know it without asking a server; `welcome` is what a fresh server connection of the
/// pool reported. A value equal to the welcome's but for case takes the welcome's spelling
/// ("utf8" → "UTF8"); an application_name follows [`application_name`]. None: only a server can
/// say ("iso, dmy" → "ISO, DMY", pgJDBC's "ISO" → "ISO, MDY", "utf-8" → "UTF8").
pub fn canonical_locally<'a>(name: &str, value: &'a [u8], welcome: &'a ParamSet) -> Option<Cow<'a, [u8]>> {
    if name == "application_name" {
        return application_name(value, welcome);
    }
    let w = welcome.get(name)?;
    same_value(name, w, value).then_some(Cow::Borrowed(w))
}

/// The longest application_name PostgreSQL keeps, in bytes (NAMEDATALEN − 1).
const MAX_NAME_LEN: usize = 63;

/// PostgreSQL's reading of a startup application_name, checked against PostgreSQL 15 with raw
/// startup packets: a value of 64 bytes or more is cut to at most 63 on a character boundary of
/// the server encoding (the GUC is GUC_IS_NAME: truncate_identifier, which also sends a NOTICE),
/// then every byte outside printable ASCII becomes '?' (check_application_name's
/// pg_clean_ascii). Startup values are raw bytes, never converted from client_encoding, so a
/// LATIN1 'é' is one '?' and a UTF-8 one two. PostgreSQL 16 writes such bytes as `\xNN`
/// instead; that is left to a server (None), as is a cut in a multibyte encoding other than UTF8.
fn application_name<'a>(value: &'a [u8], welcome: &ParamSet) -> Option<Cow<'a, [u8]>> {
    let printable = |b: &u8| (32..=126).contains(b);
    let kept = &value[..kept_name_len(value, welcome.get("server_encoding"))?];
    if kept.iter().all(printable) {
        return Some(Cow::Borrowed(kept));
    }
    if major_version(welcome.get("server_version")?)? >= 16 {
        return None;
    }
    Some(Cow::Owned(
        kept.iter().map(|b| if printable(b) { *b } else { b'?' }).collect(),
    ))
}

/// How many bytes of `value` PostgreSQL keeps of a name (pg_mbcliplen in the server `encoding`):
/// whole characters up to [`MAX_NAME_LEN`] bytes, each character's length read from its first
/// byte alone. None where the encoding's characters are not known here.
fn kept_name_len(value: &[u8], encoding: Option<&[u8]>) -> Option<usize> {
    if value.len() <= MAX_NAME_LEN || value[..MAX_NAME_LEN].is_ascii() {
        return Some(value.len().min(MAX_NAME_LEN));
    }
    match encoding? {
        b"UTF8" => {
            let mut len = 0;
            loop {
                // pg_utf_mblen: a stray continuation byte, or any other, counts as one.
                let char_len = match value[len] {
                    b if b & 0xe0 == 0xc0 => 2,
                    b if b & 0xf0 == 0xe0 => 3,
                    b if b & 0xf8 == 0xf0 => 4,
                    _ => 1,
                };
                if len + char_len > MAX_NAME_LEN {
                    return Some(len);
                }
                len += char_len;
                if len == MAX_NAME_LEN {
                    return Some(len);
                }
            }
        }
        e if e.starts_with(b"EUC_") || e == b"MULE_INTERNAL" => None,
        // Every other server encoding has one byte per character.
        _ => Some(MAX_NAME_LEN),
    }
}

/// The major version in a server_version report ("15.4 (Debian 15.4-1)" → 15).
fn major_version(version: &[u8]) -> Option<u32> {
    let digits = version.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&version[..digits]).ok()?.parse().ok()
}

/// Settings that change what a statement's text means when PostgreSQL parses it: how its bytes
/// decode, how a backslash in a literal reads, the values of date, time, interval and money
/// literals (parse analysis turns them into constants once, for as long as the prepared
/// statement lives), and whether `x = NULL` is read as `x IS NULL`. (search_path is not here:
/// PostgreSQL analyses a statement again when it changes.)
const PARSE_CONTEXT: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "timezone_abbreviations",
    "lc_monetary",
    "transform_null_equals",
];

/// `set`'s values of those settings, as one key: statements prepared by clients whose keys
/// differ must not be shared on a server (one's '01/02/2024'::date is not the other's).
pub fn parse_context(set: &ParamSet) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for name in PARSE_CONTEXT {
        let value = set.get(name).unwrap_or_default();
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend(value.iter().map(u8::to_ascii_lowercase));
    }
    out
}

/// Maps a parameter name to the spelling PostgreSQL uses in ParameterStatus (names are
/// case-insensitive in SET but the reports use these exact spellings).
pub fn canonical_name(name: &str) -> Cow<'static, str> {
    for t in TRACKED {
        if t.eq_ignore_ascii_case(name) {
            return Cow::Borrowed(t);
        }
    }
    Cow::Owned(name.to_ascii_lowercase())
}

/// True for names safe to put unquoted into `SET name = ...` (custom GUCs have a dot).
pub fn is_valid_name(name: &str) -> bool {
    // One table load per byte: every login checks its parameters' names, and the three tests
    // per byte this replaces were ~12 instructions a byte.
    !name.is_empty() && name.len() <= 63 && name.bytes().all(|b| NAME_BYTE[b as usize])
}

/// The bytes [`is_valid_name`] allows: ASCII letters, digits, `_` and `.`.
static NAME_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b'.';
        b += 1;
    }
    table
};

/// A small ordered map of parameter name → raw value. A handful of entries, so a Vec beats a map.
/// Every login fills one and every server connection another: names PostgreSQL reports and
/// short values are held without an allocation of their own.
#[derive(Debug, Clone, Default)]
pub struct ParamSet {
    entries: Vec<(Name, Value)>,
    /// Bumped by every change, so "nothing changed since" is one integer compare.
    generation: u64,
}

impl PartialEq for ParamSet {
    fn eq(&self, other: &Self) -> bool {
        self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(&other.entries)
                .all(|(a, b)| a.0.as_str() == b.0.as_str() && a.1.as_slice() == b.1.as_slice())
    }
}

impl Eq for ParamSet {}

/// A parameter name: one of [`REPORTED`]'s spellings, or a copy of any other.
#[derive(Debug, Clone)]
enum Name {
    Known(&'static str),
    Other(Box<str>),
}

impl Name {
    fn new(name: &str) -> Name {
        match REPORTED.iter().find(|k| **k == name) {
            Some(k) => Name::Known(k),
            None => Name::Other(name.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Name::Known(k) => k,
            Name::Other(n) => n,
        }
    }
}

/// Values up to this long ("UTF8", "ISO, MDY", "Europe/Paris", an application name) are kept
/// inline; the size keeps a `Value` as small as a `Vec`.
const INLINE: usize = 22;

/// A parameter value's bytes.
#[derive(Debug, Clone)]
enum Value {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Value {
    fn new(value: &[u8]) -> Value {
        if value.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..value.len()].copy_from_slice(value);
            Value::Inline {
                len: value.len() as u8,
                bytes,
            }
        } else {
            Value::Heap(value.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Value::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Value::Heap(b) => b,
        }
    }
}

impl ParamSet {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// An exact, order-independent serialisation of the set (names sorted, values folded to
    /// ASCII lower case where `differences` compares them so). Two sets with equal forms want the
    /// same values, so a server known to satisfy one form satisfies every set with that form.
    pub fn form(&self) -> Vec<u8> {
        let mut entries: Vec<(&str, &[u8])> = self.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        // Sized up front: growing it a parameter at a time cost a reallocation each, per login.
        let mut out = Vec::with_capacity(entries.iter().map(|(k, v)| 8 + k.len() + v.len()).sum());
        for (k, v) in entries {
            // Lengths first: names and values are arbitrary bytes, so no separator is safe.
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            match case_insensitive_value(k) {
                true => out.extend(v.iter().map(u8::to_ascii_lowercase)),
                false => out.extend_from_slice(v),
            }
        }
        out
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Sets `name` (already canonical) to `value`.
    pub fn set(&mut self, name: &str, value: &[u8]) {
        match self.entries.iter_mut().find(|(k, _)| k.as_str() == name) {
            Some((_, v)) => {
                if v.as_slice() != value {
                    *v = Value::new(value);
                    self.generation += 1;
                }
            }
            None => {
                if self.entries.capacity() == 0 {
                    // A login sets about six, a server connection reports thirteen.
                    self.entries.reserve(8);
                }
                self.entries.push((Name::new(name), Value::new(value)));
                self.generation += 1;
            }
        }
    }

    /// A copy holding only the entries whose name `keep` accepts.
    pub fn only(&self, mut keep: impl FnMut(&str) -> bool) -> ParamSet {
        ParamSet {
            entries: self.entries.iter().filter(|(k, _)| keep(k.as_str())).cloned().collect(),
            generation: 0,
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.entries.retain(|(k, _)| keep(k.as_str()));
        self.generation += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries of `wanted` whose value differs from (or is missing in) `self`: in ASCII
    /// case only where PostgreSQL canonicalises the value (a client's "iso, mdy" against a
    /// server's "ISO, MDY" needs no SET), byte for byte otherwise (an application_name).
    pub fn differences<'a>(&self, wanted: &'a ParamSet) -> Vec<(&'a str, &'a [u8])> {
        wanted
            .iter()
            .filter(|(k, v)| self.get(k).is_none_or(|have| !same_value(k, have, v)))
            .collect()
    }
}

/// Reported parameters that describe the server, not a session: no client changes them (and
/// RESET would fail), so they are never stale.
const SERVER_FACTS: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "in_hot_standby",
];

/// What a server holds that `wanted` does not ask for and that differs from `baseline` (what a
/// connection of this pool has after its own login): a setting an earlier client gave at
/// startup (`options=-c statement_timeout=…`, a custom `app.tenant`), or a reported one it
/// changed (`default_transaction_read_only`). `RESET` brings each back to the connection's own
/// default, which is `baseline`'s value where it has one. Whether PostgreSQL reports a name
/// differs by version (search_path from 18, default_transaction_read_only from 14), so this
/// compares values rather than trusting a list.
pub fn stale<'a>(server: &'a ParamSet, wanted: &ParamSet, baseline: &ParamSet) -> Vec<&'a str> {
    server
        .iter()
        .filter(|&(k, v)| {
            wanted.get(k).is_none()
                && !SERVER_FACTS.contains(&k)
                && baseline.get(k).is_none_or(|b| !same_value(k, b, v))
        })
        .map(|(k, _)| k)
        .collect()
}

/// Settings whose `SET name = 'literal'` quotes the literal as one list element
/// (GUC_LIST_QUOTE in PostgreSQL) and that a session can change.
const LIST_QUOTED: &[&str] = &[
    "search_path",
    "temp_tablespaces",
    "local_preload_libraries",
    "session_preload_libraries",
];

/// Whether a Query's whole text is one `SET [SESSION] name {TO | =} DEFAULT` or `SET TIME ZONE
/// {DEFAULT | LOCAL}`: PostgreSQL then goes back to the value the client gave at login, like a
/// RESET, though the command tag says only SET. Anything else (comments, more statements, a
/// quoted name) is not recognised, and is read as an ordinary SET.
#[inline]
pub fn sets_to_default(sql: &[u8]) -> bool {
    // Cheap first, inlined: almost every query is out at its first letters (the call, ~15
    // instructions of prologue and epilogue, cost as much as the test).
    head(sql) == *b"set" && set_to_default(sql)
}

/// [`sets_to_default`] past its first letters.
fn set_to_default(sql: &[u8]) -> bool {
    let text = sql.strip_suffix(b"\0").unwrap_or(sql).trim_ascii();
    if text.len() < 11 || !text[..4].eq_ignore_ascii_case(b"set ") || text.len() > 96 {
        return false;
    }
    let text = text.strip_suffix(b";").unwrap_or(text);
    let mut words: [&[u8]; 6] = [b""; 6];
    let mut n = 0;
    for word in text
        .split(|&b| b.is_ascii_whitespace() || b == b'=')
        .filter(|w| !w.is_empty())
    {
        if n == words.len() || word.iter().any(|&b| matches!(b, b'"' | b'\'' | b';' | b'-' | b'/')) {
            return false;
        }
        words[n] = word;
        n += 1;
    }
    // SET SESSION name TO DEFAULT / SET SESSION TIME ZONE …
    let rest = if n >= 2 && words[1].eq_ignore_ascii_case(b"session") {
        &words[2..n]
    } else {
        &words[1..n]
    };
    match rest {
        [time, zone, value] if time.eq_ignore_ascii_case(b"time") && zone.eq_ignore_ascii_case(b"zone") => {
            value.eq_ignore_ascii_case(b"default") || value.eq_ignore_ascii_case(b"local")
        }
        [name, to, value] if to.eq_ignore_ascii_case(b"to") => {
            !name.eq_ignore_ascii_case(b"local") && value.eq_ignore_ascii_case(b"default")
        }
        // `SET name = DEFAULT`: the '=' was a separator.
        [name, value] => !name.eq_ignore_ascii_case(b"local") && value.eq_ignore_ascii_case(b"default"),
        _ => false,
    }
}

/// The tracked parameters resets take back to the client's login values: one bit per
/// [`TRACKED`] name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetScope(u8);

impl ResetScope {
    /// RESET ALL, DISCARD ALL.
    pub const ALL: ResetScope = ResetScope((1 << TRACKED.len()) - 1);

    /// RESET name, SET name TO DEFAULT, SET TIME ZONE LOCAL, for a [`TRACKED`] name.
    pub fn one(name: &str) -> Option<ResetScope> {
        TRACKED.iter().position(|t| *t == name).map(|i| ResetScope(1 << i))
    }

    pub fn covers(self, name: &str) -> bool {
        ResetScope::one(name).is_some_and(|one| self.0 & one.0 != 0)
    }

    /// What two resets of one batch cover.
    pub fn union(self, other: ResetScope) -> ResetScope {
        ResetScope(self.0 | other.0)
    }
}

/// [`TRACKED`] in the order PostgreSQL up to 15 sends its reports at ReadyForQuery: its
/// settings table's, sorted by name without regard to case.
pub const TRACKED_REPORT_ORDER: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "standard_conforming_strings",
    "TimeZone",
];

/// The first three bytes of `sql` after leading ASCII whitespace with `| 0x20`, which
/// lower-cases ASCII letters and turns no other byte into one, so comparing with lower-case
/// words is exact; zeros when fewer than three are left.
#[inline(always)]
fn head(sql: &[u8]) -> [u8; 3] {
    let start = match sql.first() {
        Some(b) if !b.is_ascii_whitespace() => 0,
        _ => sql.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(sql.len()),
    };
    match sql.get(start..start + 3) {
        Some(&[a, b, c]) => [a | 0x20, b | 0x20, c | 0x20],
        _ => [0; 3],
    }
}

/// Which tracked parameters a Query that is one reset (`RESET ALL`, `DISCARD ALL`,
/// `RESET name`, or what [`sets_to_default`] accepts) takes back to the login values. None for
/// anything else, and for a reset of a name pgweir does not track.
#[inline]
pub fn reset_scope(sql: &[u8]) -> Option<ResetScope> {
    // This runs on every Query and Parse: rule out almost all of them on three bytes (RESET,
    // DISCARD, SET, BEGIN, START) before trimming and comparing words, inlined (see
    // sets_to_default).
    if !matches!(&head(sql), b"res" | b"dis" | b"set" | b"beg" | b"sta") {
        return None;
    }
    resets(sql)
}

/// [`reset_scope`] past its first letters.
fn resets(sql: &[u8]) -> Option<ResetScope> {
    let text = sql.strip_suffix(b"\0").unwrap_or(sql).trim_ascii();
    let text = text.strip_suffix(b";").unwrap_or(text);
    // Cheap first: this runs on every Query and Parse.
    let starts = |prefix: &[u8]| text.len() > prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix);
    let reset_like = starts(b"reset") || starts(b"discard") || starts(b"set");
    if text.len() > 256 || !(reset_like || starts(b"begin") || starts(b"start")) {
        return None;
    }
    if text.contains(&b';') {
        return resets_in_one_query(text);
    }
    // One statement: a lone BEGIN or START TRANSACTION (the first statement of every
    // transaction a client opens by hand) resets nothing.
    if !reset_like || text.len() > 96 {
        return None;
    }
    // Two words, or more (no allocation: this runs on every SET).
    let mut words = text.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty());
    let two = match (words.next(), words.next(), words.next()) {
        (Some(verb), Some(object), None) => Some((verb, object)),
        _ => None,
    };
    match two {
        Some((verb, all)) if all.eq_ignore_ascii_case(b"all") => {
            (verb.eq_ignore_ascii_case(b"reset") || verb.eq_ignore_ascii_case(b"discard")).then_some(ResetScope::ALL)
        }
        Some((verb, name)) if verb.eq_ignore_ascii_case(b"reset") => tracked(name).and_then(ResetScope::one),
        _ if sets_to_default(sql) => {
            // The name is the word before TO, '=' or DEFAULT, or TIME ZONE.
            let names = text[3..]
                .split(|&b| b.is_ascii_whitespace() || b == b'=')
                .filter(|w| !w.is_empty() && !w.eq_ignore_ascii_case(b"session"));
            let name = names.into_iter().next()?;
            if name.eq_ignore_ascii_case(b"time") {
                return ResetScope::one("TimeZone");
            }
            tracked(name).and_then(ResetScope::one)
        }
        _ => None,
    }
}

/// What a Query of several RESET (one name, ALL) and DISCARD ALL statements resets, and
/// nothing else but transaction control that commits (`BEGIN; RESET ALL; COMMIT`): a SET … TO
/// DEFAULT among them completes as a SET, which pgweir cannot tell from any other, and a
/// ROLLBACK would undo them.
fn resets_in_one_query(text: &[u8]) -> Option<ResetScope> {
    if text.iter().any(|b| matches!(b, b'"' | b'\'' | b'-' | b'/' | b'$')) {
        return None;
    }
    let mut scope = ResetScope(0);
    for statement in text.split(|&b| b == b';').map(<[u8]>::trim_ascii) {
        let mut words = statement.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty());
        let verb = words.next()?;
        let is = |word: &[u8]| verb.eq_ignore_ascii_case(word);
        if is(b"begin") || is(b"commit") || is(b"end") {
            continue;
        }
        let name = words.next()?;
        if is(b"start") && name.eq_ignore_ascii_case(b"transaction") {
            continue;
        }
        if words.next().is_some() {
            return None;
        }
        scope = if name.eq_ignore_ascii_case(b"all")
            && (verb.eq_ignore_ascii_case(b"reset") || verb.eq_ignore_ascii_case(b"discard"))
        {
            ResetScope::ALL
        } else if verb.eq_ignore_ascii_case(b"reset") {
            // A name pgweir does not track resets nothing it reports.
            tracked(name)
                .and_then(ResetScope::one)
                .map_or(scope, |one| scope.union(one))
        } else {
            return None;
        };
    }
    (scope != ResetScope(0)).then_some(scope)
}

/// The tracked parameter `name` names, in any case.
fn tracked(name: &[u8]) -> Option<&'static str> {
    TRACKED
        .iter()
        .copied()
        .find(|t| t.as_bytes().eq_ignore_ascii_case(name))
}

/// Builds one simple-query text `SET a = 'x'; SET b = 'y'; RESET c;` for the given pairs and
/// `resets` (names from a [`ParamSet`], so valid unquoted), quoting values
/// as string literals (standard_conforming_strings style: only `'` is doubled, and an E'' form is
/// never produced, so backslashes are literal). Returns raw bytes because values may be in the
/// client's encoding.
pub fn set_statements(pairs: &[(&str, &[u8])], resets: &[&str]) -> BytesMut {
    let mut sql = BytesMut::new();
    for (name, value) in pairs {
        if *name == "DateStyle" {
            // A DateStyle keeps whatever part it leaves out ("ISO" names no field order) from
            // the session's current setting, which on a shared server is the last client's.
            // PostgreSQL reads a startup value against the default, so start from there.
            sql.put_slice(b"RESET DateStyle;");
        }
        // `SET search_path = 'a,b'` makes one quoted schema name "a,b" of the literal, where a
        // startup `-c search_path=a,b` is a list of two: set_config takes the value as the
        // startup packet does. The other names keep SET (no result row to discard).
        let listed = LIST_QUOTED.iter().any(|l| l.eq_ignore_ascii_case(name));
        if listed {
            sql.put_slice(b"SELECT pg_catalog.set_config('");
            sql.put_slice(name.as_bytes());
            sql.put_slice(b"', '");
        } else {
            sql.put_slice(b"SET ");
            sql.put_slice(name.as_bytes());
            sql.put_slice(b" = '");
        }
        for &b in *value {
            if b == b'\'' {
                sql.put_u8(b'\'');
            }
            sql.put_u8(b);
        }
        sql.put_slice(if listed { b"', false);" } else { b"';" });
    }
    for name in resets {
        sql.put_slice(b"RESET ");
        sql.put_slice(name.as_bytes());
        sql.put_slice(b";");
    }
    sql
}

/// Whether a server whose parameters are `have` reads a backslash in a plain literal as an
/// escape (standard_conforming_strings not on), so [`set_prelude`] turns the setting on first.
pub fn reads_backslash_escapes(have: &ParamSet) -> bool {
    have.get("standard_conforming_strings") != Some(&b"on"[..])
}

/// The query to run, when one is needed, on a server whose parameters are `have` before
/// [`set_statements`] for `pairs`. That batch is parsed whole as the server's session stands, and
/// an earlier client may have left it reading differently from how the values are written:
/// - they are quoted for standard_conforming_strings = on; at off a backslash escapes, and a
///   value ending in \' would end its literal early and the rest of it would run as SQL (a
///   caller that wants another setting sets it in the batch);
/// - they are bytes in the client's encoding (`pairs`' client_encoding); in another they turn to
///   mojibake ("é" sent in UTF8 read as LATIN1 is "Ã©").
pub fn set_prelude(have: &ParamSet, pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut prelude = Vec::new();
    if reads_backslash_escapes(have) {
        prelude.extend_from_slice(b"SET standard_conforming_strings = on;");
    }
    if let Some((_, encoding)) = pairs.iter().find(|(k, _)| *k == "client_encoding")
        && encoding.iter().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(b))
    {
        prelude.extend_from_slice(b"SET client_encoding = '");
        prelude.extend_from_slice(encoding);
        prelude.extend_from_slice(b"';");
    }
    prelude
}

/// One shared copy of each parameter form ([`ParamSet::form`]) in use, so that sessions whose
/// clients ask for the same values hold the same `Arc`: checking a server against a session is
/// then a pointer compare, where comparing the bytes read the session's own copy, cold with
/// thousands of clients taking turns (several cache misses per transaction).
#[derive(Default)]
pub struct FormInterner {
    forms: std::sync::Mutex<std::collections::HashSet<Arc<[u8]>>>,
}

impl FormInterner {
    /// Distinct forms kept; past it the set starts over (forms in use stay alive in their
    /// sessions, only their sharing with later ones is lost).
    const MAX: usize = 1024;

    /// The shared copy of `form`. Looked up by its bytes: a login whose form is known (most
    /// are) allocates no copy of its own.
    pub fn intern(&self, form: &[u8]) -> Arc<[u8]> {
        let mut forms = self.forms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = forms.get(form) {
            return known.clone();
        }
        if forms.len() >= Self::MAX {
            forms.clear();
        }
        let form: Arc<[u8]> = form.into();
        forms.insert(form.clone());
        form
    }
}

/// What a login worked out from its startup packet and its pool's welcome: the client's
/// parameters as PostgreSQL reports them, their interned form, and the ParameterStatus messages
/// the client is greeted with. The clients of one application send the same startup packet
/// every time, so a pool keeps the last few of these and the next login with the same packet
/// copies it instead of working it all out again (about a sixth of a login's instructions).
#[derive(Debug)]
pub struct LoginTemplate {
    /// The startup packet's parameters, byte for byte ([`crate::proto::startup::StartupParams::bytes`]).
    pub startup: Box<[u8]>,
    /// The welcome this was worked out against.
    pub welcome: Arc<ParamSet>,
    /// Shared with the sessions that log in by it until one changes a value (copy on write:
    /// most never do, and each copy was ~0.5 KiB per client and a tenth of a login's work).
    pub params: Arc<ParamSet>,
    /// `params.form()`, interned.
    pub form: Arc<[u8]>,
    /// `params`' application_name, for the admin API.
    pub application_name: Arc<str>,
    /// The ParameterStatus messages of the welcome, with the client's values.
    pub status: Box<[u8]>,
}

impl LoginTemplate {
    /// True when a login with `startup` against `welcome` would work out exactly this.
    pub fn fits(&self, startup: &[u8], welcome: &Arc<ParamSet>) -> bool {
        Arc::ptr_eq(&self.welcome, welcome) && *self.startup == *startup
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_template_fits_only_its_own_packet_and_welcome() {
        let welcome = Arc::new(welcome("15.4", "UTF8"));
        let template = LoginTemplate {
            startup: b"user\0u\0DateStyle\0sql\0"[..].into(),
            welcome: welcome.clone(),
            params: Arc::default(),
            form: Arc::from(&b""[..]),
            application_name: Arc::from(""),
            status: Box::default(),
        };
        assert!(template.fits(b"user\0u\0DateStyle\0sql\0", &welcome));
        assert!(!template.fits(b"user\0u\0DateStyle\0iso\0", &welcome));
        assert!(!template.fits(b"user\0u\0", &welcome));
        // An equal welcome from another server login is another welcome: values worked out
        // against one are not assumed to hold against the other.
        let other = Arc::new((*welcome).clone());
        assert!(!template.fits(b"user\0u\0DateStyle\0sql\0", &other));
    }

    #[test]
    fn equal_forms_are_interned_to_one_allocation() {
        let interner = FormInterner::default();
        let mut a = ParamSet::default();
        a.set("DateStyle", b"ISO, DMY");
        a.set("TimeZone", b"UTC");
        // The same values set in another order: the same form.
        let mut b = ParamSet::default();
        b.set("TimeZone", b"UTC");
        b.set("DateStyle", b"ISO, DMY");
        let (fa, fb) = (interner.intern(&a.form()), interner.intern(&b.form()));
        assert!(Arc::ptr_eq(&fa, &fb));
        b.set("TimeZone", b"Europe/Paris");
        let fc = interner.intern(&b.form());
        assert!(!Arc::ptr_eq(&fa, &fc));
        assert_ne!(*fa, *fc);
        // Past its bound the set starts over; what it hands out is still the form asked for.
        for i in 0..FormInterner::MAX + 10 {
            let mut p = ParamSet::default();
            p.set("application_name", i.to_string().as_bytes());
            assert_eq!(*interner.intern(&p.form()), *p.form());
        }
        assert!(interner.forms.lock().unwrap().len() <= FormInterner::MAX);
    }

    fn welcome(version: &str, encoding: &str) -> ParamSet {
        let mut w = ParamSet::default();
        w.set("client_encoding", b"UTF8");
        w.set("DateStyle", b"ISO, MDY");
        w.set("server_version", version.as_bytes());
        w.set("server_encoding", encoding.as_bytes());
        w
    }

    #[test]
    fn sets_to_default_reads_only_whole_resets_in_disguise() {
        for yes in [
            "SET TimeZone TO DEFAULT",
            "set timezone = default;",
            "SET timezone=DEFAULT\0",
            "SET SESSION DateStyle TO DEFAULT",
            "SET TIME ZONE LOCAL",
            "  set time zone default ; ",
        ] {
            assert!(sets_to_default(yes.as_bytes()), "{yes}");
        }
        for no in [
            "SET TimeZone TO 'UTC'",
            "SET LOCAL TimeZone TO DEFAULT",
            "SET TimeZone TO DEFAULT; SET DateStyle = ISO",
            "SET TimeZone TO DEFAULT -- why",
            "SET \"TimeZone\" TO DEFAULT",
            "SET TIME ZONE 'UTC'",
            "SELECT 1",
            "RESET ALL",
            "SET x TO default_value",
        ] {
            assert!(!sets_to_default(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn reset_scopes() {
        let one = ResetScope::one;
        assert_eq!(reset_scope(b"RESET ALL\0"), Some(ResetScope::ALL));
        assert_eq!(reset_scope(b" discard  all ;"), Some(ResetScope::ALL));
        assert_eq!(reset_scope(b"reset timezone"), one("TimeZone"));
        assert_eq!(reset_scope(b"RESET DateStyle;"), one("DateStyle"));
        assert_eq!(reset_scope(b"set session datestyle = default"), one("DateStyle"));
        assert_eq!(reset_scope(b"set application_name to default"), one("application_name"));
        assert_eq!(reset_scope(b"SET TIME ZONE LOCAL"), one("TimeZone"));
        assert_eq!(reset_scope(b"SET timezone=DEFAULT\0"), one("TimeZone"));
        let two = one("TimeZone").and_then(|t| Some(t.union(one("DateStyle")?)));
        assert_eq!(reset_scope(b"reset timezone; RESET datestyle;\0"), two);
        assert_eq!(reset_scope(b"reset work_mem; reset timezone"), one("TimeZone"));
        assert_eq!(reset_scope(b"reset timezone; discard all"), Some(ResetScope::ALL));
        assert_eq!(reset_scope(b"BEGIN; RESET ALL; COMMIT"), Some(ResetScope::ALL));
        assert_eq!(
            reset_scope(b"start transaction isolation level serializable; reset timezone; end"),
            one("TimeZone")
        );
        for no in [
            "reset work_mem",
            "reset work_mem; reset search_path",
            "set timezone to 'UTC'",
            "reset timezone; select 1",
            "reset timezone; set datestyle to default",
            "reset timezone; reset all; rollback",
            "begin; reset timezone; abort",
            "begin; commit",
            "BEGIN;",
            "begin isolation level serializable",
            "start transaction read only;",
            "reset all please",
            "discard all now",
            "reset timezone;; reset datestyle",
            "discard plans",
            "set local timezone to default",
        ] {
            assert_eq!(reset_scope(no.as_bytes()), None, "{no}");
        }
        let both = one("TimeZone").and_then(|t| Some(t.union(one("DateStyle")?)));
        assert!(both.is_some_and(|b| b.covers("TimeZone") && b.covers("DateStyle") && !b.covers("IntervalStyle")));
        assert!(TRACKED.iter().all(|t| ResetScope::ALL.covers(t)));
        let mut sorted = TRACKED.to_vec();
        sorted.sort_by_key(|n| n.to_ascii_lowercase());
        assert_eq!(sorted, TRACKED_REPORT_ORDER);
    }

    /// The application_name cases were read from PostgreSQL 15.18 (UTF8 database) with raw
    /// startup packets.
    #[test]
    fn values_canonical_without_a_server() {
        let pg15 = welcome("15.18 (Debian 15.18-0+deb12u1)", "UTF8");
        let local = |name: &str, value: &[u8], w: &ParamSet| canonical_locally(name, value, w).map(Cow::into_owned);
        assert_eq!(local("client_encoding", b"utf8", &pg15).as_deref(), Some(&b"UTF8"[..]));
        assert_eq!(local("client_encoding", b"UTF8", &pg15).as_deref(), Some(&b"UTF8"[..]));
        assert_eq!(
            local("DateStyle", b"iso, mdy", &pg15).as_deref(),
            Some(&b"ISO, MDY"[..])
        );
        // Other spellings need a server.
        assert_eq!(local("client_encoding", b"utf-8", &pg15), None);
        assert_eq!(local("DateStyle", b"ISO", &pg15), None);
        assert_eq!(local("TimeZone", b"UTC", &pg15), None, "not in this welcome");
        // application_name keeps its case; PostgreSQL cuts it and cleans it.
        let name = |value: &[u8], w: &ParamSet| local("application_name", value, w);
        assert_eq!(name(b"App", &pg15).as_deref(), Some(&b"App"[..]));
        assert_eq!(name(b"", &pg15).as_deref(), Some(&b""[..]));
        let x64 = [b'x'; 64];
        assert_eq!(name(&x64, &pg15).as_deref(), Some(&x64[..63]));
        assert_eq!(name(&x64[..63], &pg15).as_deref(), Some(&x64[..63]));
        assert_eq!(name(b"a\x01b\x7fc", &pg15).as_deref(), Some(&b"a?b?c"[..]));
        assert_eq!(
            name(b"\xe9x", &pg15).as_deref(),
            Some(&b"?x"[..]),
            "raw bytes, one '?' each"
        );
        let e = "\u{e9}";
        // 40 × 'é' (80 bytes): cut to 31 whole characters, 62 bytes.
        assert_eq!(name(e.repeat(40).as_bytes(), &pg15), Some(vec![b'?'; 62]));
        assert_eq!(name(e.repeat(32).as_bytes(), &pg15), Some(vec![b'?'; 62]));
        let mixed = format!("{}xyz", e.repeat(31));
        assert_eq!(
            name(mixed.as_bytes(), &pg15).as_deref(),
            Some(&[[b'?'; 62].as_slice(), b"x"].concat()[..])
        );
        let ascii_then_e = format!("{}{e}", "a".repeat(62));
        assert_eq!(
            name(ascii_then_e.as_bytes(), &pg15).as_deref(),
            Some(&ascii_then_e.as_bytes()[..62])
        );
        assert_eq!(name(&"\u{1f600}".repeat(16).into_bytes(), &pg15), Some(vec![b'?'; 60]));
        assert_eq!(name(&b"a\x80".repeat(40), &pg15), Some(b"a?".repeat(32)[..63].to_vec()));
        // 0xE9 as a UTF8 lead byte claims three bytes: 21 "characters" fill 63.
        assert_eq!(name(&[0xe9; 70], &pg15), Some(vec![b'?'; 63]));
        // A single-byte server encoding cuts anywhere.
        let latin1 = welcome("15.4", "LATIN1");
        assert_eq!(name(e.repeat(40).as_bytes(), &latin1), Some(vec![b'?'; 63]));
        // What PostgreSQL 16 writes for other bytes, and cuts in EUC encodings, a server says.
        let pg16 = welcome("16.1", "UTF8");
        assert_eq!(name(b"\xe9x", &pg16), None);
        assert_eq!(name(&x64, &pg16).as_deref(), Some(&x64[..63]));
        let euc = welcome("15.4", "EUC_JP");
        assert_eq!(name(e.repeat(40).as_bytes(), &euc), None);
        assert_eq!(name(b"\xe9x", &euc).as_deref(), Some(&b"?x"[..]), "nothing to cut");
        assert_eq!(major_version(b"9.6.24"), Some(9));
        assert_eq!(major_version(b"17beta1"), Some(17));
        assert_eq!(major_version(b"devel"), None);
    }

    #[test]
    fn statements_are_keyed_by_the_settings_parsing_depends_on() {
        let mut a = ParamSet::default();
        a.set("DateStyle", b"ISO, MDY");
        a.set("application_name", b"one");
        a.set("statement_timeout", b"5s");
        let mut b = a.clone();
        b.set("application_name", b"two");
        b.set("statement_timeout", b"9s");
        b.set("DateStyle", b"iso, mdy");
        assert_eq!(parse_context(&a), parse_context(&b), "names and timeouts do not matter");
        b.set("transform_null_equals", b"on");
        assert_ne!(parse_context(&a), parse_context(&b));
        let mut c = a.clone();
        c.set("DateStyle", b"ISO, DMY");
        assert_ne!(parse_context(&a), parse_context(&c));
    }

    #[test]
    fn a_datestyle_is_set_from_the_default() {
        let sql = set_statements(&[("TimeZone", b"UTC"), ("DateStyle", b"ISO")], &["search_path"]);
        assert_eq!(
            &sql[..],
            b"SET TimeZone = 'UTC';RESET DateStyle;SET DateStyle = 'ISO';RESET search_path;"
        );
    }

    #[test]
    fn canonical_names_and_differences() {
        assert_eq!(canonical_name("datestyle"), "DateStyle");
        assert_eq!(canonical_name("Search_Path"), "search_path");
        let mut server = ParamSet::default();
        server.set("DateStyle", b"ISO, MDY");
        server.set("TimeZone", b"UTC");
        let mut client = ParamSet::default();
        client.set("DateStyle", b"iso, mdy");
        client.set("TimeZone", b"Europe/Paris");
        client.set("application_name", b"x");
        let d = server.differences(&client);
        assert_eq!(
            d,
            vec![("TimeZone", &b"Europe/Paris"[..]), ("application_name", &b"x"[..])]
        );
        // Forms ignore order and value case, and track every change.
        let mut a = ParamSet::default();
        a.set("TimeZone", b"UTC");
        a.set("DateStyle", b"ISO, MDY");
        let mut b = ParamSet::default();
        b.set("DateStyle", b"iso, mdy");
        b.set("TimeZone", b"utc");
        assert_eq!(a.form(), b.form());
        let before = b.generation();
        b.set("TimeZone", b"utc");
        assert_eq!(b.generation(), before, "an unchanged value is no change");
        b.set("TimeZone", b"Europe/Paris");
        assert_ne!(b.generation(), before);
        assert_ne!(a.form(), b.form());
        // An application_name is kept as given: case is a difference, in both.
        server.set("application_name", b"billing");
        client.set("application_name", b"Billing");
        assert!(
            server
                .differences(&client)
                .contains(&("application_name", &b"Billing"[..]))
        );
        a.set("application_name", b"billing");
        let mut e = a.clone();
        e.set("application_name", b"Billing");
        assert_ne!(a.form(), e.form());
        // What a server holds, this client does not want and differs from a fresh connection
        // is stale, reported by PostgreSQL or not; the server's own facts never are.
        let mut baseline = ParamSet::default();
        baseline.set("server_version", b"15.4");
        baseline.set("is_superuser", b"off");
        baseline.set("default_transaction_read_only", b"off");
        baseline.set("search_path", b"\"$user\", public");
        let mut server = baseline.clone();
        server.set("is_superuser", b"on");
        server.set("statement_timeout", b"1234");
        server.set("app.tenant", b"42");
        server.set("default_transaction_read_only", b"on");
        let mut wanted = ParamSet::default();
        wanted.set("app.tenant", b"7");
        assert_eq!(
            stale(&server, &wanted, &baseline),
            vec!["default_transaction_read_only", "statement_timeout"]
        );
        server.set("search_path", b"elsewhere");
        assert!(
            stale(&server, &wanted, &baseline).contains(&"search_path"),
            "reported or not"
        );
        // Length prefixes keep names and values from running into each other.
        let mut c = ParamSet::default();
        c.set("ab", b"c");
        let mut d = ParamSet::default();
        d.set("a", b"bc");
        assert_ne!(c.form(), d.form());
        let sql = set_statements(&[("application_name", b"it's")], &[]);
        assert_eq!(&sql[..], b"SET application_name = 'it''s';");
        let sql = set_statements(&[("search_path", b"a,b's")], &[]);
        assert_eq!(
            &sql[..],
            b"SELECT pg_catalog.set_config('search_path', 'a,b''s', false);"
        );
        assert!(is_valid_name("myapp.tenant_id"));
        assert!(!is_valid_name("a; drop table x"));
        for c in (0..=0x7fu8).map(char::from).chain(['é', 'ß']) {
            let expected = c.is_ascii_alphanumeric() || c == '_' || c == '.';
            assert_eq!(is_valid_name(&format!("a{c}b")), expected, "{c:?}");
        }
        assert!(is_valid_name(&"x".repeat(63)) && !is_valid_name(&"x".repeat(64)) && !is_valid_name(""));
    }

    #[test]
    fn values_of_every_length_and_names_of_any_kind_round_trip() {
        let mut set = ParamSet::default();
        // Either side of the inline limit, and a value replaced by a longer and a shorter one.
        for len in [0, 1, INLINE - 1, INLINE, INLINE + 1, 200] {
            let value = vec![b'v'; len];
            set.set("application_name", &value);
            assert_eq!(set.get("application_name"), Some(&value[..]), "length {len}");
            set.set("myapp.tenant", &value);
            assert_eq!(set.get("myapp.tenant"), Some(&value[..]), "length {len}");
        }
        assert_eq!(set.len(), 2, "a name set again replaces its value");
        set.set("TimeZone", b"America/Argentina/Buenos_Aires");
        let names: Vec<&str> = set.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["application_name", "myapp.tenant", "TimeZone"]);
        // Equality looks at names and bytes, not at how they are held.
        let mut other = ParamSet::default();
        other.set("application_name", &[b'v'; 200]);
        other.set("myapp.tenant", &[b'v'; 200]);
        other.set("TimeZone", b"America/Argentina/Buenos_Aires");
        assert_eq!(set, other);
        other.set("TimeZone", b"UTC");
        assert_ne!(set, other);
        set.retain(|k| k != "myapp.tenant");
        assert_eq!(set.get("myapp.tenant"), None);
        assert_eq!(set.len(), 2);
    }
}
