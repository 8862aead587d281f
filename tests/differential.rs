//! Differential protocol test: the same client scripts run on direct PostgreSQL connections and
//! through pgweir, and every client must receive the same backend messages, byte for byte.
//!
//! A seeded generator writes, per client, a script of frontend messages: simple queries (one or
//! several statements, some failing mid-batch), extended-protocol pipelines (Parse, Bind,
//! Describe S/P, Execute with and without a row limit, Close, Flush, several Syncs before any
//! reply is read, errors that make the server skip to Sync), named statements used across
//! transactions, re-prepared after Close, duplicated and unknown names, named portals kept
//! across Syncs inside explicit transactions, cursors, savepoints, small and 5,000-row results,
//! values over 16 KiB both ways, parameters and results in text and binary format, SQL
//! DEALLOCATE (which pgweir answers itself), short sleeps so servers change hands mid-pipeline.
//!
//! Session parameters pgweir tracks (TimeZone, DateStyle, IntervalStyle, application_name,
//! client_encoding, standard_conforming_strings) are given at login by some clients, SET (also
//! SESSION, LOCAL, by set_config, by Parse/Bind/Execute, refused values) alone or among other
//! statements, in and out of transactions that commit or roll back, and read back with SHOW
//! and through values they format or parse, later, on whichever server pgweir picks. RESET
//! (one name, ALL), DISCARD ALL and SET … TO DEFAULT run alone in their Query (RESETs also
//! several together, or between BEGIN and COMMIT, or by Parse/Bind/Execute, or as a named
//! statement bound again later); in a transaction the next Query ends it. ParameterStatus
//! messages are compared like the rest.
//! Some clients also give settings pgweir does not track (`options=-c work_mem=…`), which it
//! applies on every server they get and takes off for the others; scripts read and RESET them.
//! COPY FROM STDIN runs by simple Query (among other statements) and by Execute (with a Sync
//! or a Flush after it), in and out of transactions: the client sends its data, in chunks that
//! split rows, once it has the CopyInResponse (sometimes pausing halfway), then CopyDone or
//! CopyFail; some rows fail the COPY (duplicate key, bad number). COPY TO STDOUT runs in text,
//! csv and binary.
//!
//! Scripts are otherwise transaction-mode safe: they keep no other session state (no temp
//! tables, LISTEN, advisory locks, SQL PREPARE) and use the unnamed statement only between its
//! Parse and the next Sync, since PostgreSQL keeps it for the session but pgweir may serve the
//! next transaction from another server. Nothing in them is nondeterministic (no now(),
//! random(), pids or OIDs of new objects). Each client writes only its own table, reset before
//! each run, so the direct run and the pgweir run see the same data.
//!
//! Four known differences are kept out of the scripts. First, the documented limits of
//! pgweir's RESET handling (README, session parameters): a RESET in the same Query (or Sync)
//! as statements other than RESETs and BEGIN … COMMIT, statements after a RESET in the same
//! transaction, a SET … TO DEFAULT with more around it or by the extended protocol.
//!
//! Second, PostgreSQL reads a statement's date, time and interval literals once, when it
//! parses it, under the session's DateStyle and TimeZone of that moment. A client's named
//! statement that pgweir prepares again on another server is parsed under the client's
//! settings of the time it is bound (README), so after the client changed DateStyle,
//! `'03/04/2020'::date` in it can read as April where PostgreSQL keeps March. So a named
//! statement with such literals is bound only while its client has its login settings (clients
//! that log in with different ones must not share it); other templates read such values at run
//! time (`'03/04/2020'::text::date`), and simple queries, parsed each time, use literals.
//!
//! Third, in a failed transaction, a Bind or Describe of a named statement that pgweir must
//! first prepare on the server it got fails on that Parse (25P02), where PostgreSQL reports a
//! wrong parameter count (08P01) first, or describes a statement that returns no rows. Nothing
//! can be prepared in a failed transaction; see `Gen::risky`.
//!
//! Fourth, PostgreSQL makes a transaction's changes visible to its next statements at every
//! Parse (a CommandCounterIncrement), not only when an Execute completes. A data-modifying
//! statement with RETURNING whose portal an Execute with a row limit left suspended has
//! changed rows its transaction does not see yet; a Parse that pgweir adds (preparing a named
//! statement on the server it got) makes them visible to what follows, and a client's Parse
//! that pgweir answers itself (the server has the statement) does not. So scripts run
//! `delete … returning` to completion (row limit 0). Found at seed 284738.
//!
//! Per seed, the clients run concurrently on direct connections, then concurrently through a
//! pgweir with one or two servers, so servers pass between clients all the time. The pgweir
//! differs by seed: both data paths, and a statement cache of 2 or 3 so that statements are
//! evicted and prepared again all the time.
//!
//! `PGWEIR_DIFF_SEEDS=N` runs N seeds instead of the fixed CI set; `PGWEIR_DIFF_SEED=x` runs
//! seed x alone (`PGWEIR_DIFF_FIRST=x` starts the N seeds at x); `PGWEIR_DIFF_CLIENT=c` gives
//! every other client of the seed an empty script; `PGWEIR_DIFF_DUMP` adds every message of a
//! mismatching client to its report; `PGWEIR_DIFF_MAX_FAILURES` (default 5) stops after that
//! many mismatching clients. A mismatch prints the seed, the client, its
//! script and the first message where the two streams differ, with a few around it. Seeds
//! that share the pgweir run one after another and state carries over between them (which
//! statements each server has), so a mismatch found in a long run may need the seeds before
//! it to show again.

mod support;

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use pgweir::config::AuthType;
use pgweir::embedded_pg::{EmbeddedPostgres, roles};
use support::proxy::{TestProxy, TestProxyBuilder};
use support::wire::{msg, read_frame};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Clients per seed at most; each has its own table `d<i>`.
const MAX_CLIENTS: usize = 5;
/// The seeds CI runs: enough to cover every proxy variant several times in a few seconds.
const CI_SEEDS: u64 = 150;
/// How long one backend message may take before the client is declared stuck (a lost reply).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// splitmix64: tiny, good enough, and no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// One frontend message of a script.
#[derive(Clone)]
enum Msg {
    Query(String),
    Parse {
        name: String,
        sql: String,
        types: Vec<u32>,
    },
    Bind {
        portal: String,
        stmt: String,
        params: Vec<Param>,
        results: Vec<i16>,
    },
    Describe {
        kind: u8,
        name: String,
    },
    Execute {
        portal: String,
        limit: i32,
    },
    Close {
        kind: u8,
        name: String,
    },
    Sync,
    Flush,
    /// COPY FROM STDIN data, sent only once the server asked for it with CopyInResponse.
    CopyData(Vec<u8>),
    CopyDone,
    CopyFail(String),
}

impl Msg {
    /// Part of the data of a COPY FROM STDIN, which a client sends only in copy-in mode.
    fn is_copy(&self) -> bool {
        matches!(self, Msg::CopyData(_) | Msg::CopyDone | Msg::CopyFail(_))
    }
}

#[derive(Clone)]
struct Param {
    binary: bool,
    value: Option<Vec<u8>>,
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

impl Msg {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut b = Vec::new();
        let tag = match self {
            Msg::Query(sql) => {
                cstr(&mut b, sql);
                b'Q'
            }
            Msg::Parse { name, sql, types } => {
                cstr(&mut b, name);
                cstr(&mut b, sql);
                b.extend_from_slice(&(types.len() as i16).to_be_bytes());
                for t in types {
                    b.extend_from_slice(&t.to_be_bytes());
                }
                b'P'
            }
            Msg::Bind {
                portal,
                stmt,
                params,
                results,
            } => {
                cstr(&mut b, portal);
                cstr(&mut b, stmt);
                b.extend_from_slice(&(params.len() as i16).to_be_bytes());
                for p in params {
                    b.extend_from_slice(&i16::from(p.binary).to_be_bytes());
                }
                b.extend_from_slice(&(params.len() as i16).to_be_bytes());
                for p in params {
                    match &p.value {
                        Some(v) => {
                            b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                            b.extend_from_slice(v);
                        }
                        None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                    }
                }
                b.extend_from_slice(&(results.len() as i16).to_be_bytes());
                for r in results {
                    b.extend_from_slice(&r.to_be_bytes());
                }
                b'B'
            }
            Msg::Describe { kind, name } => {
                b.push(*kind);
                cstr(&mut b, name);
                b'D'
            }
            Msg::Execute { portal, limit } => {
                cstr(&mut b, portal);
                b.extend_from_slice(&limit.to_be_bytes());
                b'E'
            }
            Msg::Close { kind, name } => {
                b.push(*kind);
                cstr(&mut b, name);
                b'C'
            }
            Msg::Sync => b'S',
            Msg::Flush => b'H',
            Msg::CopyData(data) => {
                b.extend_from_slice(data);
                b'd'
            }
            Msg::CopyDone => b'c',
            Msg::CopyFail(why) => {
                cstr(&mut b, why);
                b'f'
            }
        };
        out.extend_from_slice(&msg(tag, &b));
    }
}

/// Long texts are cut in the printed script; their length is kept.
fn short(s: &[u8]) -> String {
    let text = String::from_utf8_lossy(s);
    if text.chars().count() <= 90 {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(60).collect();
        format!("{head:?}…({} bytes)", s.len())
    }
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::Query(sql) => write!(f, "Query({})", short(sql.as_bytes())),
            Msg::Parse { name, sql, types } => write!(f, "Parse({name:?}, {}, types {types:?})", short(sql.as_bytes())),
            Msg::Bind {
                portal,
                stmt,
                params,
                results,
            } => {
                write!(f, "Bind(portal {portal:?}, stmt {stmt:?}, [")?;
                for (i, p) in params.iter().enumerate() {
                    let sep = if i > 0 { ", " } else { "" };
                    match &p.value {
                        None => write!(f, "{sep}NULL")?,
                        Some(v) if p.binary => write!(f, "{sep}bin{v:02x?}")?,
                        Some(v) => write!(f, "{sep}{}", short(v))?,
                    }
                }
                write!(f, "], results {results:?})")
            }
            Msg::Describe { kind, name } => write!(f, "Describe({}, {name:?})", *kind as char),
            Msg::Execute { portal, limit } => write!(f, "Execute({portal:?}, limit {limit})"),
            Msg::Close { kind, name } => write!(f, "Close({}, {name:?})", *kind as char),
            Msg::Sync => write!(f, "Sync"),
            Msg::Flush => write!(f, "Flush"),
            Msg::CopyData(data) => write!(f, "CopyData({})", short(data)),
            Msg::CopyDone => write!(f, "CopyDone"),
            Msg::CopyFail(why) => write!(f, "CopyFail({why:?})"),
        }
    }
}

/// A client's script: steps, each sent in one write before its replies are read.
type Script = Vec<Vec<Msg>>;

/// Settings a client gives in its startup packet besides user and database.
type Startup = Vec<(&'static str, String)>;

/// What one client does: log in with its settings, then run its script.
type Plan = (Startup, Script);

fn print_script(script: &Script) -> String {
    let mut out = String::new();
    for (i, step) in script.iter().enumerate() {
        let _ = writeln!(out, "  step {i}:");
        for m in step {
            let _ = writeln!(out, "    {m:?}");
        }
    }
    out
}

/// What a parameter holds; values are drawn per Bind.
#[derive(Clone, Copy)]
enum PType {
    /// An int4 from the list.
    Int(&'static [i32]),
    Int8,
    /// A short ASCII text.
    Text,
    /// A text of 17–40 KiB, so the Bind spans reads.
    Wide,
}

impl PType {
    fn oid(self) -> u32 {
        match self {
            PType::Int(_) => 23,
            PType::Int8 => 20,
            PType::Text | PType::Wide => 25,
        }
    }
}

/// A statement the generator uses, with `$n` parameters.
#[derive(Clone)]
struct Template {
    sql: String,
    params: Vec<PType>,
}

fn t(sql: impl Into<String>, params: &[PType]) -> Template {
    Template {
        sql: sql.into(),
        params: params.to_vec(),
    }
}

const SMALL: &[i32] = &[-7, 0, 1, 2, 42, 1000];
const ROWS: &[i32] = &[0, 1, 3, 100, 1000, 5000];
const KEYS: &[i32] = &[1, 5, 50, 99, 101, 120, 150];

/// Values of the tracked parameters scripts set, and give at login.
const ZONES: &[&str] = &[
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "Asia/Kolkata",
    "Pacific/Chatham",
];
const DATESTYLES: &[&str] = &[
    "ISO, MDY",
    "ISO, DMY",
    "SQL, DMY",
    "SQL, MDY",
    "Postgres, DMY",
    "German",
    "ISO",
];
const INTERVALSTYLES: &[&str] = &["postgres", "postgres_verbose", "sql_standard", "iso_8601"];

/// The statements of client `c` (its table is `d<c>`).
fn templates(c: usize) -> Vec<Template> {
    vec![
        t(
            "select $1::int4 + 1 as a, $2::text as b, $3::int8 * 2 as c",
            &[PType::Int(SMALL), PType::Text, PType::Int8],
        ),
        t(
            "select g, repeat('x', $2::int4) as r from generate_series(1, $1::int4) g",
            &[PType::Int(ROWS), PType::Int(&[0, 3, 40])],
        ),
        // Rows wider than 16 KiB: each DataRow spans reads.
        t(
            "select g, repeat(md5(g::text), $2::int4) from generate_series(1, $1::int4) g",
            &[PType::Int(&[1, 2, 4]), PType::Int(&[600, 1100])],
        ),
        // Fails after some rows when $1 is 1..5: an error in the middle of a result.
        t(
            "select g, 10 / (g - $1::int4) from generate_series(1, 5) g",
            &[PType::Int(&[0, 3, 9])],
        ),
        t(
            format!("select k, v from d{c} where k <= $1::int4 order by k"),
            &[PType::Int(&[0, 5, 50, 200])],
        ),
        // Keys 1..100 exist after a reset: 23505 for some.
        t(
            format!("insert into d{c} values ($1::int4, $2::text)"),
            &[PType::Int(KEYS), PType::Text],
        ),
        t(
            format!("update d{c} set v = v || $2::text where k % 10 = $1::int4"),
            &[PType::Int(&[0, 3, 7]), PType::Text],
        ),
        t(
            format!("delete from d{c} where k = $1::int4 returning k, v"),
            &[PType::Int(KEYS)],
        ),
        t(format!("select count(*), sum(k), max(length(v)) from d{c}"), &[]),
        t("select length($1::text), md5($1::text)", &[PType::Wide]),
        t("select * from no_such_table", &[]),
        t("selec 1", &[]),
        t("", &[]),
        t("do $$begin raise notice 'notice %', 42; end$$", &[]),
        t("values (1, 'one'), (2, null)", &[]),
        t("select 1/0", &[]),
        // Read under DateStyle when it runs (a date literal would be read when it is parsed:
        // see the top comment), printed under DateStyle, TimeZone and IntervalStyle.
        t(
            "select '2020-01-02 03:04:05+00'::timestamptz::text as ts, '03/04/2020'::text::date::text as d, \
             $1::int4 * interval '1 day 02:03:04' as i, current_setting('application_name') as a",
            &[PType::Int(SMALL)],
        ),
        // A few milliseconds: servers change hands in the middle of other clients' pipelines.
        t("select pg_sleep($1::int4 / 1000.0)", &[PType::Int(&[0, 2, 5])]),
        // PARSE_SENSITIVE: literals read when the statement is parsed, under the DateStyle and
        // TimeZone of that moment. Clients that log in with different ones must not share it.
        t(
            "select '03/04/2020'::date::text as d, '2020-01-02 03:04:05'::timestamptz::text as t, $1::int4 as n",
            &[PType::Int(SMALL)],
        ),
    ]
}

/// The template whose named statements a client binds only while it has its login settings
/// (see the top comment).
const PARSE_SENSITIVE: usize = 18;

/// Transaction control, by simple or extended protocol.
const TX_START: &[&str] = &["begin", "begin isolation level repeatable read", "start transaction"];
const TX_END: &[&str] = &["commit", "rollback", "end"];
const TX_MIDDLE: &[&str] = &[
    "savepoint sp",
    "rollback to savepoint sp",
    "release savepoint sp",
    "rollback to sp",
];

/// The generator's belief about the session, for choosing sensible next messages. It may be
/// wrong (a BEGIN that was skipped after an error, a Parse that failed): that only makes a
/// message fail the same way on both sides. What must never happen is a script relying on state
/// pgweir legitimately does not keep between transactions; that rule does not depend on this.
struct Gen {
    rng: Rng,
    client: usize,
    templates: Vec<Template>,
    /// Named statements believed prepared: (name, template index).
    stmts: Vec<(String, usize)>,
    next_stmt: usize,
    /// Named portals believed open in the explicit transaction.
    portals: Vec<String>,
    in_tx: bool,
    /// Something in the explicit transaction may have failed it (see `risky`).
    tx_risky: bool,
    /// Something since the last Sync (or earlier in this simple query) may have failed, so
    /// PostgreSQL may skip what follows: a COMMIT then may not end the transaction. In a
    /// transaction that may have failed, everything may fail from the start.
    batch_risky: bool,
    /// Nothing was generated yet since the last Sync (or in this simple query): a COMMIT or
    /// ROLLBACK here runs even in a failed transaction.
    batch_fresh: bool,
    cursor_open: bool,
    /// An extended-protocol message was sent after the last Sync (a simple Query now would be
    /// skipped by PostgreSQL if an error is pending, and is not what any driver does).
    unsynced: bool,
    /// The data of the COPY FROM STDIN just generated: the step after it.
    copy_data: Option<Vec<Vec<Msg>>>,
    /// Keys COPY has used, so most copied rows are new.
    next_key: usize,
    /// A SET or RESET of a tracked parameter may have run (see `settings_change`).
    settings_changed: bool,
    /// Names of statements parsed under the login settings, never used after they may have
    /// changed.
    retired: Vec<String>,
    /// A reset is prepared as statement "r".
    reset_prepared: bool,
    /// A COPY FROM STDIN is prepared as statement "cp".
    copy_prepared: bool,
    /// Statements closed where the Close may have been skipped after an error: a Parse of
    /// the name may fail (42P05).
    maybe_alive: Vec<String>,
}

impl Gen {
    fn new(seed: u64, client: usize) -> Self {
        Gen {
            rng: Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(client as u64)),
            client,
            templates: templates(client),
            stmts: Vec::new(),
            next_stmt: 0,
            portals: Vec::new(),
            in_tx: false,
            tx_risky: false,
            batch_risky: false,
            batch_fresh: true,
            cursor_open: false,
            unsynced: false,
            copy_data: None,
            next_key: 0,
            settings_changed: false,
            retired: Vec::new(),
            reset_prepared: false,
            copy_prepared: false,
            maybe_alive: Vec::new(),
        }
    }

    fn plan(mut self) -> Plan {
        let startup = self.startup();
        (startup, self.script())
    }

    /// Login settings: none for most clients, so both a RESET back to the server's defaults and
    /// one back to a client's own values are exercised.
    fn startup(&mut self) -> Startup {
        let mut out = Vec::new();
        if self.rng.chance(50) {
            return out;
        }
        if self.rng.chance(50) {
            out.push(("TimeZone", self.rng.pick(ZONES).to_owned()));
        }
        if self.rng.chance(40) {
            out.push(("DateStyle", self.rng.pick(DATESTYLES).to_owned()));
        }
        if self.rng.chance(30) {
            out.push(("IntervalStyle", self.rng.pick(INTERVALSTYLES).to_owned()));
        }
        if self.rng.chance(40) {
            // PostgreSQL cuts a long name to 63 bytes and writes '?' for non-ASCII bytes.
            let name = match self.rng.below(4) {
                0 => "é-".repeat(30),
                1 => "x".repeat(70),
                _ => format!("login{}", self.client),
            };
            out.push(("application_name", name));
        }
        if self.rng.chance(15) {
            // Canonicalised: reported as Europe/Paris.
            out.push(("TimeZone", "europe/paris".to_owned()));
        }
        if self.rng.chance(20) {
            out.push(("client_encoding", "utf8".to_owned()));
        }
        if self.rng.chance(30) {
            // Settings pgweir does not track but applies for this client on every server (and
            // takes off again for the next client), a tracked one among them.
            out.push((
                "options",
                self.rng
                    .pick(&[
                        "-c work_mem=5MB",
                        "-c work_mem=6MB -c TimeZone=Asia/Tokyo",
                        "-c standard_conforming_strings=off",
                    ])
                    .to_owned(),
            ));
        }
        out
    }

    fn script(mut self) -> Script {
        let steps = 8 + self.rng.below(20);
        let mut script = Vec::new();
        for _ in 0..steps {
            let step = if !self.unsynced && self.rng.chance(6) {
                self.reset_step()
            } else if !self.unsynced && !self.stmts.is_empty() && self.rng.chance(3) {
                self.deallocate_step()
            } else if !self.unsynced && self.rng.chance(35) {
                self.simple_step()
            } else {
                self.extended_step()
            };
            script.push(step);
            script.extend(self.copy_data.take().into_iter().flatten());
        }
        if self.unsynced {
            script.push(vec![Msg::Sync]);
        }
        if self.in_tx {
            script.push(vec![Msg::Query("rollback".into())]);
        }
        script
    }

    fn text_value(&mut self) -> String {
        let len = self.rng.pick(&[0, 1, 5, 12]);
        (0..len).map(|_| char::from(b'a' + self.rng.below(26) as u8)).collect()
    }

    fn value(&mut self, p: PType) -> Option<String> {
        if self.rng.chance(5) {
            return None;
        }
        Some(match p {
            PType::Int(list) => self.rng.pick(list).to_string(),
            PType::Int8 => self.rng.pick(&[0i64, -1, 1 << 40, 123_456_789_012]).to_string(),
            PType::Text => self.text_value(),
            PType::Wide => {
                let unit = self.text_value() + "w";
                unit.repeat((17 * 1024 + self.rng.below(23 * 1024)) / unit.len() + 1)
            }
        })
    }

    /// A template with its parameters written in as literals, for simple queries.
    fn literal_sql(&mut self, idx: usize) -> String {
        let tpl = self.templates[idx].clone();
        let mut sql = tpl.sql.clone();
        for (i, p) in tpl.params.iter().enumerate().rev() {
            let lit = match self.value(*p) {
                None => "null".to_owned(),
                Some(v) if matches!(p, PType::Text | PType::Wide) => format!("'{v}'"),
                Some(v) => v,
            };
            sql = sql.replace(&format!("${}", i + 1), &lit);
        }
        sql
    }

    fn tx_statement(&mut self) -> String {
        let sql = if !self.in_tx {
            // After a possible failure the BEGIN may or may not run: believed open, and
            // perhaps failed.
            self.in_tx = true;
            self.tx_risky = self.batch_risky;
            self.rng.pick(TX_START)
        } else if self.rng.chance(45) {
            if self.batch_risky && !self.batch_fresh {
                // May be skipped: the transaction may go on, failed.
                self.risky();
            } else {
                self.end_tx();
            }
            self.rng.pick(TX_END)
        } else {
            self.risky();
            self.rng.pick(TX_MIDDLE)
        };
        sql.to_owned()
    }

    /// The message just generated may fail. Why the generator cares: in a failed
    /// transaction, a Bind or Describe of a statement pgweir must first prepare on the server
    /// it got fails on that Parse (25P02) where PostgreSQL checks the Bind first (08P01 for a
    /// wrong parameter count) or, for a statement that returns no rows, describes it. That
    /// difference is known and kept (nothing can be prepared in a failed transaction), so
    /// scripts bind a named statement inside a transaction only while nothing in it may have
    /// failed.
    fn risky(&mut self) {
        self.batch_risky = true;
        if self.in_tx {
            self.tx_risky = true;
        }
    }

    /// Whether `idx` may fail however it is bound (or is likely to with some values).
    fn risky_template(idx: usize) -> bool {
        matches!(idx, 3 | 5 | 10 | 11 | 15)
    }

    fn end_tx(&mut self) {
        self.in_tx = false;
        self.tx_risky = false;
        self.portals.clear();
        self.cursor_open = false;
    }

    /// A SET of a tracked parameter (never to DEFAULT: see `reset_step`), sometimes LOCAL,
    /// sometimes refused.
    /// The client's settings may differ from its login ones from now on: its statements whose
    /// literals were read under the old ones are not bound again.
    fn settings_change(&mut self) {
        self.settings_changed = true;
        let (sensitive, rest): (Vec<_>, Vec<_>) = self.stmts.drain(..).partition(|(_, i)| *i == PARSE_SENSITIVE);
        self.stmts = rest;
        // Never used again: a Parse of the name would fail, and a Bind would run the old one.
        self.retired.extend(sensitive.into_iter().map(|(n, _)| n));
    }

    fn set_sql(&mut self) -> String {
        self.settings_change();
        let scope = match self.rng.below(10) {
            0 => " session",
            1 | 2 if self.in_tx => " local",
            // Outside a transaction: a WARNING, and no effect.
            3 if self.rng.chance(20) => " local",
            _ => "",
        };
        if scope == " local" && self.rng.chance(20) {
            // Untracked, but gone at the end of the transaction.
            return "set local work_mem = '7MB'".into();
        }
        let to = self.rng.pick(&[" to ", " = "]);
        let (name, value) = match self.rng.below(11) {
            0 | 1 => ("timezone", self.rng.pick(ZONES)),
            2 | 3 => ("datestyle", self.rng.pick(DATESTYLES)),
            4 => ("intervalstyle", self.rng.pick(INTERVALSTYLES)),
            5 | 6 => ("application_name", self.rng.pick(&["a", "", "b c", "Diff", "né"])),
            7 => ("client_encoding", self.rng.pick(&["UTF8", "utf8"])),
            8 => ("standard_conforming_strings", self.rng.pick(&["on", "off"])),
            9 => {
                let local = if self.in_tx && self.rng.chance(30) {
                    "true"
                } else {
                    "false"
                };
                let zone = self.rng.pick(ZONES);
                return format!("select set_config('TimeZone', '{zone}', {local})");
            }
            _ => {
                self.risky();
                let (name, value) = self.rng.pick(&[
                    ("timezone", "No/Where"),
                    ("datestyle", "Sideways"),
                    ("intervalstyle", "roman"),
                ]);
                (name, value)
            }
        };
        if name == "timezone" && self.rng.chance(25) {
            return format!("set{scope} time zone '{value}'");
        }
        format!("set{scope} {name}{to}'{value}'")
    }

    /// What the tracked parameters are now, as names and through values they format or parse.
    fn read_sql(&mut self) -> String {
        match self.rng.below(9) {
            // Not tracked: what the client gave at login, or the default.
            8 => "show work_mem".into(),
            0 => "show timezone".into(),
            1 => "show datestyle".into(),
            2 => "show intervalstyle".into(),
            3 => "show application_name".into(),
            4 => "select current_setting('standard_conforming_strings'), current_setting('client_encoding')".into(),
            // A backslash reads as an escape with standard_conforming_strings off (and warns).
            5 => "select length('a\\b') as backslash".into(),
            _ => "select '2020-01-02 03:04:05+00'::timestamptz::text as ts, '03/04/2020'::date::text as d, \
                  interval '1 day 02:03:04.5'::text as i"
                .into(),
        }
    }

    /// SQL DEALLOCATE of a named statement (pgweir answers it itself from its table of the
    /// client's names), or of all; in a transaction that may have failed, it may fail.
    fn deallocate_step(&mut self) -> Vec<Msg> {
        let sql = if self.rng.chance(20) {
            if !self.tx_risky {
                self.reset_prepared = false;
                self.copy_prepared = false;
            }
            let gone: Vec<String> = self.stmts.drain(..).map(|(n, _)| n).collect();
            if self.tx_risky {
                self.maybe_alive.extend(gone);
            }
            "deallocate all".to_owned()
        } else {
            let (name, _) = self.stmts.remove(self.rng.below(self.stmts.len()));
            if self.tx_risky {
                self.maybe_alive.push(name.clone());
            }
            // The model of which names exist is not exact (a Parse skipped after an error it
            // did not foresee): a DEALLOCATE that fails would fail the transaction unseen, and
            // a later Bind in it would meet the difference `Gen::risky` keeps out.
            self.risky();
            format!("{} {name}", self.rng.pick(&["deallocate", "DEALLOCATE PREPARE"]))
        };
        vec![Msg::Query(sql)]
    }

    /// A RESET, DISCARD ALL or SET … TO DEFAULT, alone in its Query as pgweir requires (see
    /// the top comment); in a transaction, the transaction ends in the next Query.
    fn reset_step(&mut self) -> Vec<Msg> {
        self.settings_change();
        let sql = self.rng.pick(&[
            "reset timezone",
            "reset datestyle",
            "reset application_name",
            "reset intervalstyle",
            "reset all",
            "RESET ALL;",
            "discard all",
            "set timezone to default",
            "set session datestyle = default",
            "set time zone local",
            "set application_name to default",
            "reset timezone; reset intervalstyle",
            "reset application_name; reset work_mem; reset datestyle",
            "reset work_mem",
            "set work_mem to default",
            "begin; reset all; commit",
            "start transaction; reset intervalstyle; end",
        ]);
        // In a transaction that may have failed, such a BEGIN would fail the whole Query.
        let sql = if self.in_tx && sql.contains(';') {
            "reset all"
        } else {
            sql
        };
        // Prepared once as a named statement and bound after, as pgJDBC does with a statement
        // it runs often; outside transactions only, so its Parse cannot fail.
        if !self.in_tx && self.rng.chance(15) {
            let mut out = Vec::new();
            if !self.reset_prepared {
                let sql = self.rng.pick(&["reset all", "reset timezone", "reset intervalstyle"]);
                self.reset_prepared = true;
                out.push(Msg::Parse {
                    name: "r".into(),
                    sql: sql.to_owned(),
                    types: vec![],
                });
            }
            out.push(Msg::Bind {
                portal: String::new(),
                stmt: "r".into(),
                params: vec![],
                results: vec![],
            });
            out.push(Msg::Execute {
                portal: String::new(),
                limit: 0,
            });
            out.push(Msg::Sync);
            self.batch_risky = false;
            self.batch_fresh = true;
            return out;
        }
        // By Parse/Bind/Execute as pgJDBC sends it, alone before its Sync (a SET … TO DEFAULT
        // is recognised only in a Query).
        let mut out = if !sql.starts_with("set") && !sql.contains(';') && self.rng.chance(35) {
            let unnamed = |sql: &str| {
                [
                    Msg::Parse {
                        name: String::new(),
                        sql: sql.to_owned(),
                        types: vec![],
                    },
                    Msg::Bind {
                        portal: String::new(),
                        stmt: String::new(),
                        params: vec![],
                        results: vec![],
                    },
                    Msg::Execute {
                        portal: String::new(),
                        limit: 0,
                    },
                ]
            };
            let mut out = unnamed(sql).to_vec();
            if !self.in_tx && sql != "discard all" && self.rng.chance(25) {
                // An error after it rolls the batch's implicit transaction back, the reset
                // too (in an explicit one, a documented limit).
                out.extend(unnamed("select 1/0"));
            }
            out.push(Msg::Sync);
            out
        } else {
            vec![Msg::Query(sql.to_owned())]
        };
        if sql.ends_with("commit") || sql.ends_with("end") {
            // Its own transaction, or the end of the open one.
            self.end_tx();
        } else if self.in_tx {
            // DISCARD ALL fails in a transaction block, and keeps the statements.
            out.push(Msg::Query(self.rng.pick(TX_END).to_owned()));
            self.end_tx();
        } else if sql == "discard all" {
            self.stmts.clear();
            self.reset_prepared = false;
            self.copy_prepared = false;
        }
        self.batch_risky = false;
        self.batch_fresh = true;
        out
    }

    /// COPY FROM STDIN's data for the next step: rows in chunks that split them anywhere, then
    /// CopyDone, or CopyFail. Some rows fail: a key in use (23505), a key that is no number
    /// (22P02).
    fn copy_rows(&mut self, extended: bool) -> Vec<Msg> {
        let mut text = String::new();
        let rows = self.rng.pick(&[0, 1, 3, 40, 400]);
        let wide = self.rng.chance(20);
        for _ in 0..rows {
            let k = match self.rng.below(100) {
                0 => "x1".to_owned(),
                1 | 2 => self.rng.pick(KEYS).to_string(),
                _ => {
                    self.next_key += 1;
                    (1000 + self.next_key).to_string()
                }
            };
            let v = if wide {
                "w".repeat(100 + self.rng.below(300))
            } else {
                self.text_value()
            };
            let _ = writeln!(text, "{k}\t{v}");
        }
        let bytes = text.into_bytes();
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = (1 + self.rng.below(3000)).min(bytes.len() - at);
            out.push(Msg::CopyData(bytes[at..at + len].to_vec()));
            at += len;
        }
        if self.rng.chance(10) {
            out.push(Msg::CopyFail("client gave up".into()));
        } else {
            out.push(Msg::CopyDone);
        }
        if extended {
            out.push(Msg::Sync);
        }
        out
    }

    /// The steps that send a COPY's data: one, or two with a pause between, the first of them
    /// only CopyData (the server answers nothing until the data ends).
    fn copy_steps(&mut self, extended: bool) -> Vec<Vec<Msg>> {
        let mut all = self.copy_rows(extended);
        let data = all.iter().filter(|m| matches!(m, Msg::CopyData(_))).count();
        if data >= 2 && self.rng.chance(40) {
            let rest = all.split_off(1 + self.rng.below(data - 1));
            vec![all, rest]
        } else {
            vec![all]
        }
    }

    /// COPY TO STDOUT, in text, csv or binary.
    fn copy_out_sql(&mut self) -> String {
        let c = self.client;
        match self.rng.below(4) {
            0 => format!("copy (select k, v from d{c} order by k) to stdout"),
            1 => "copy (select g, repeat('z', g % 70) from generate_series(1, 700) g) to stdout (format csv)".into(),
            2 => format!("copy (select * from d{c} where k < 10 order by k) to stdout (format binary)"),
            _ => "copy (select 1/0) to stdout".into(),
        }
    }

    fn simple_step(&mut self) -> Vec<Msg> {
        let n = 1 + self.rng.below(3);
        let mut parts = Vec::new();
        self.batch_risky = self.tx_risky;
        self.batch_fresh = true;
        for _ in 0..n {
            let roll = self.rng.below(100);
            let sql = if roll < 25 {
                self.tx_statement()
            } else if roll < 29 && self.copy_data.is_none() {
                self.risky();
                self.copy_data = Some(self.copy_steps(false));
                format!("copy d{} from stdin", self.client)
            } else if roll < 32 {
                self.risky();
                self.copy_out_sql()
            } else if roll < 42 {
                self.set_sql()
            } else if roll < 52 {
                self.read_sql()
            } else if roll < 62 && self.in_tx {
                self.risky();
                if self.cursor_open {
                    if self.rng.chance(30) {
                        self.cursor_open = false;
                        "close cur".to_owned()
                    } else {
                        format!("fetch {} from cur", self.rng.pick(&[1, 7, 100]))
                    }
                } else {
                    self.cursor_open = true;
                    let rows = self.rng.pick(&[5, 50, 3000]);
                    format!("declare cur cursor for select g, repeat('y', g % 50) from generate_series(1, {rows}) g")
                }
            } else {
                let mut idx = self.rng.below(self.templates.len());
                if idx == 11 && n > 1 {
                    // A syntax error fails the whole Query before any of it runs (a COMMIT
                    // before it too): alone only, so the generator's beliefs hold.
                    idx = 15;
                }
                if Self::risky_template(idx) {
                    self.risky();
                }
                self.literal_sql(idx)
            };
            parts.push(sql);
            self.batch_fresh = false;
        }
        self.batch_risky = self.tx_risky;
        self.batch_fresh = true;
        vec![Msg::Query(parts.join("; "))]
    }

    fn params(&mut self, idx: usize) -> Vec<Param> {
        let types = self.templates[idx].params.clone();
        types
            .into_iter()
            .map(|p| {
                let binary = !matches!(p, PType::Text | PType::Wide) && self.rng.chance(50);
                let value = self.value(p).map(|v| match (binary, p) {
                    (true, PType::Int8) => v
                        .parse::<i64>()
                        .map_or_else(|_| v.into_bytes(), |n| n.to_be_bytes().to_vec()),
                    (true, _) => v
                        .parse::<i32>()
                        .map_or_else(|_| v.into_bytes(), |n| n.to_be_bytes().to_vec()),
                    (false, _) => v.into_bytes(),
                });
                Param { binary, value }
            })
            .collect()
    }

    fn result_formats(&mut self) -> Vec<i16> {
        match self.rng.below(4) {
            0 | 1 => vec![],
            2 => vec![1],
            _ => vec![0, 1, 1],
        }
    }

    fn limit(&mut self) -> i32 {
        if self.rng.chance(60) {
            0
        } else {
            self.rng.pick(&[1, 2, 10, 500])
        }
    }

    /// Parse (named or unnamed), maybe Describe S, Bind, maybe Describe P, Execute(s), maybe
    /// Close P. The unnamed statement is bound right after its Parse, never after a Sync.
    fn parse_bind_execute(&mut self, out: &mut Vec<Msg>) {
        let idx = if self.rng.chance(15) {
            self.rng.pick(&[10, 11, 12, 15])
        } else {
            self.rng.below(self.templates.len())
        };
        let idx = if idx == PARSE_SENSITIVE && self.settings_changed {
            0
        } else {
            idx
        };
        let tpl = self.templates[idx].clone();
        // After a possible error earlier in its batch or transaction the Parse may be skipped:
        // its name may or may not exist afterwards.
        let mut uncertain = self.batch_risky || self.tx_risky;
        if Self::risky_template(idx) {
            self.risky();
        }
        let name = if self.rng.chance(40) {
            String::new()
        } else if !self.stmts.is_empty() && self.rng.chance(10) {
            // A name in use: 42P05, and the rest up to Sync is skipped.
            self.risky();
            self.stmts[self.rng.below(self.stmts.len())].0.clone()
        } else {
            // Names come back after a Close: re-Parse of a closed name.
            let n = format!("s{}", self.next_stmt % 6);
            self.next_stmt += 1;
            if self.stmts.iter().any(|(s, _)| *s == n) || self.retired.contains(&n) {
                format!("s{}x{}", self.client, self.next_stmt)
            } else {
                if self.maybe_alive.contains(&n) {
                    // The Close may have been skipped: this Parse then fails (42P05) and the
                    // name keeps its old statement, perhaps one whose literals were read under
                    // settings since changed. So the name stays unknown, never bound.
                    self.risky();
                    uncertain = true;
                }
                n
            }
        };
        let types = if self.rng.chance(50) {
            tpl.params.iter().map(|p| p.oid()).collect()
        } else if self.rng.chance(30) {
            vec![0; tpl.params.len()]
        } else {
            vec![]
        };
        out.push(Msg::Parse {
            name: name.clone(),
            sql: tpl.sql.clone(),
            types,
        });
        if !name.is_empty() && !self.stmts.iter().any(|(s, _)| *s == name) {
            if !uncertain {
                self.stmts.push((name.clone(), idx));
            } else if !self.maybe_alive.contains(&name) {
                self.maybe_alive.push(name.clone());
            }
        }
        if self.rng.chance(30) {
            out.push(Msg::Describe {
                kind: b'S',
                name: name.clone(),
            });
        }
        if self.rng.chance(15) {
            // Prepared only, to be bound in a later transaction (or not at all).
            return;
        }
        self.bind_execute(out, name, idx);
    }

    fn portal_name(&mut self) -> String {
        if self.rng.chance(60) {
            String::new()
        } else {
            format!("p{}", self.rng.below(3))
        }
    }

    fn bind_execute(&mut self, out: &mut Vec<Msg>, stmt: String, idx: usize) {
        let portal = self.portal_name();
        if !portal.is_empty() {
            // May be open already (42P03).
            self.risky();
        }
        let params = self.params(idx);
        let results = self.result_formats();
        if results.len() > 1 {
            // Three formats fit only a three-column result; otherwise 08P01.
            self.risky();
        }
        out.push(Msg::Bind {
            portal: portal.clone(),
            stmt,
            params,
            results,
        });
        if self.rng.chance(25) {
            out.push(Msg::Describe {
                kind: b'P',
                name: portal.clone(),
            });
        }
        let limit = self.limit();
        // The fourth known difference (module docs): a DELETE … RETURNING's portal runs to
        // completion, never suspended with its changes unseen. The limit is still drawn, so
        // every other script of a seed stays what it was.
        let limit = if self.templates[idx].sql.starts_with("delete") {
            0
        } else {
            limit
        };
        out.push(Msg::Execute {
            portal: portal.clone(),
            limit,
        });
        if limit > 0 && self.rng.chance(40) {
            // A statement that is not a query (DO, an INSERT without RETURNING) runs to its
            // end at the first Execute, whatever the limit, and the second fails (55000).
            self.risky();
            let limit = self.limit();
            out.push(Msg::Execute {
                portal: portal.clone(),
                limit,
            });
        }
        if !portal.is_empty() {
            if self.rng.chance(40) {
                out.push(Msg::Close {
                    kind: b'P',
                    name: portal,
                });
            } else if self.in_tx && !self.portals.contains(&portal) {
                // Kept across Syncs: only inside an explicit transaction.
                self.portals.push(portal);
            }
        }
    }

    /// One unit of an extended-protocol pipeline.
    fn extended_unit(&mut self, out: &mut Vec<Msg>) {
        let roll = self.rng.below(100);
        match roll {
            0..=39 => self.parse_bind_execute(out),
            40..=54 if !self.stmts.is_empty() && !self.tx_risky => {
                let (name, idx) = self.stmts[self.rng.below(self.stmts.len())].clone();
                // Its Parse may have failed, or been skipped.
                self.risky();
                if self.rng.chance(20) {
                    out.push(Msg::Describe {
                        kind: b'S',
                        name: name.clone(),
                    });
                }
                self.bind_execute(out, name, idx);
            }
            55..=62 => {
                if !self.stmts.is_empty() && self.rng.chance(70) {
                    let i = self.rng.below(self.stmts.len());
                    let (name, _) = self.stmts.remove(i);
                    if self.batch_risky {
                        // PostgreSQL may skip the Close.
                        self.maybe_alive.push(name.clone());
                    }
                    out.push(Msg::Close { kind: b'S', name });
                } else {
                    let kind = self.rng.pick(b"SP");
                    out.push(Msg::Close {
                        kind,
                        name: "never_made".into(),
                    });
                }
            }
            63..=67 => {
                // Unknown names: 26000 and 34000.
                self.risky();
                if self.rng.chance(50) {
                    out.push(Msg::Describe {
                        kind: b'S',
                        name: "no_stmt".into(),
                    });
                } else {
                    out.push(Msg::Bind {
                        portal: String::new(),
                        stmt: "no_stmt".into(),
                        params: vec![],
                        results: vec![],
                    });
                    out.push(Msg::Execute {
                        portal: String::new(),
                        limit: 0,
                    });
                }
            }
            68..=77 if !self.portals.is_empty() => {
                // A portal suspended in an earlier Sync of this transaction.
                self.risky();
                let p = self.portals[self.rng.below(self.portals.len())].clone();
                if self.rng.chance(20) {
                    out.push(Msg::Describe {
                        kind: b'P',
                        name: p.clone(),
                    });
                }
                let limit = self.limit();
                out.push(Msg::Execute {
                    portal: p.clone(),
                    limit,
                });
                if self.rng.chance(20) {
                    self.portals.retain(|q| *q != p);
                    out.push(Msg::Close { kind: b'P', name: p });
                }
            }
            78..=83 => {
                let sql = match self.rng.below(3) {
                    0 => self.set_sql(),
                    1 => self.read_sql(),
                    _ => {
                        self.risky();
                        self.copy_out_sql()
                    }
                };
                out.push(Msg::Parse {
                    name: String::new(),
                    sql,
                    types: vec![],
                });
                out.push(Msg::Bind {
                    portal: String::new(),
                    stmt: String::new(),
                    params: vec![],
                    results: vec![],
                });
                out.push(Msg::Execute {
                    portal: String::new(),
                    limit: 0,
                });
            }
            _ => {
                let sql = self.tx_statement();
                out.push(Msg::Parse {
                    name: String::new(),
                    sql,
                    types: vec![],
                });
                out.push(Msg::Bind {
                    portal: String::new(),
                    stmt: String::new(),
                    params: vec![],
                    results: vec![],
                });
                out.push(Msg::Execute {
                    portal: String::new(),
                    limit: 0,
                });
            }
        }
    }

    fn extended_step(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        let units = 1 + self.rng.below(4);
        for u in 0..units {
            let last = u + 1 == units;
            if last && self.rng.chance(6) {
                // COPY FROM STDIN by Execute: the data follows in the next step, with a Sync.
                // Sometimes of a named statement prepared once (pgweir runs it under its own
                // name), while nothing may have failed (see `risky`).
                let stmt = if !self.tx_risky && !self.batch_risky && self.rng.chance(30) {
                    "cp"
                } else {
                    ""
                };
                self.risky();
                if stmt.is_empty() || !self.copy_prepared {
                    self.copy_prepared |= !stmt.is_empty();
                    out.push(Msg::Parse {
                        name: stmt.into(),
                        sql: format!("copy d{} from stdin", self.client),
                        types: vec![],
                    });
                }
                out.push(Msg::Bind {
                    portal: String::new(),
                    stmt: stmt.into(),
                    params: vec![],
                    results: vec![],
                });
                out.push(Msg::Execute {
                    portal: String::new(),
                    limit: 0,
                });
                // Some drivers Sync at once (PostgreSQL ignores it in copy-in mode), some Flush.
                out.push(if self.rng.chance(50) { Msg::Sync } else { Msg::Flush });
                self.copy_data = Some(self.copy_steps(true));
                self.unsynced = false;
                self.batch_risky = self.tx_risky;
                self.batch_fresh = true;
                break;
            }
            self.extended_unit(&mut out);
            self.batch_fresh = false;
            self.unsynced = true;
            if (last && self.rng.chance(85)) || (!last && self.rng.chance(40)) {
                out.push(Msg::Sync);
                self.unsynced = false;
                self.batch_risky = self.tx_risky;
                self.batch_fresh = true;
            } else if last || self.rng.chance(15) {
                out.push(Msg::Flush);
            }
        }
        out
    }
}

/// What a sent message is answered with, for reading exactly the replies of a step.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Query or Sync: ReadyForQuery.
    Ready,
    /// Parse, Bind, Close: their one completion message.
    One(u8),
    /// Describe of a statement: ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    /// Describe of a portal: RowDescription or NoData.
    DescribePortal,
    /// Execute: rows, then CommandComplete, PortalSuspended or EmptyQueryResponse.
    Execute,
}

fn want(m: &Msg) -> Option<Want> {
    Some(match m {
        Msg::Query(_) | Msg::Sync => Want::Ready,
        Msg::Parse { .. } => Want::One(b'1'),
        Msg::Bind { .. } => Want::One(b'2'),
        Msg::Close { .. } => Want::One(b'3'),
        Msg::Describe { kind: b'S', .. } => Want::DescribeStatement,
        Msg::Describe { .. } => Want::DescribePortal,
        Msg::Execute { .. } => Want::Execute,
        Msg::Flush | Msg::CopyData(_) | Msg::CopyDone | Msg::CopyFail(_) => return None,
    })
}

/// A client connection that reads replies by protocol rules, not by timing: every sent message
/// owes its completion, except that after an error in an extended-protocol message the server
/// answers nothing until Sync. That also ends a step that ends in Flush exactly.
struct Client {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    owed: VecDeque<(Want, bool)>,
    /// Skipping to Sync after an error (this lasts across steps when a step ends in Flush).
    skipping: bool,
    /// The server sent CopyInResponse and waits for the data, which the next step holds.
    copy_in: bool,
}

/// What one client saw.
#[derive(Default)]
struct Transcript {
    /// ParameterStatus (name, value) at login, sorted.
    login_params: Vec<(String, String)>,
    /// Every backend message after the login's ReadyForQuery, normalised (see `normalise`).
    messages: Vec<Vec<u8>>,
    /// Index into `messages` where each step's replies begin.
    step_starts: Vec<usize>,
    /// Set when the client could not go on (timeout, connection closed).
    failure: Option<String>,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, startup: &Startup, t: &mut Transcript) -> std::io::Result<Client> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Client {
            r: BufReader::with_capacity(64 * 1024, r),
            w,
            owed: VecDeque::new(),
            skipping: false,
            copy_in: false,
        };
        c.w.write_all(&startup_packet(startup)).await?;
        loop {
            let m = c.read().await?;
            match m[0] {
                b'Z' => break,
                b'S' => {
                    let mut fields = m[5..].split(|&b| b == 0);
                    let name = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
                    let value = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
                    t.login_params.push((name, value));
                }
                b'E' => return Err(std::io::Error::other(format!("login failed: {}", show(&m)))),
                _ => {}
            }
        }
        t.login_params.sort();
        Ok(c)
    }

    async fn read(&mut self) -> std::io::Result<Vec<u8>> {
        match tokio::time::timeout(READ_TIMEOUT, read_frame(&mut self.r)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply within {READ_TIMEOUT:?} (still owed: {:?})", self.owed),
            )),
        }
    }

    /// Drops what the server will not answer while it skips to Sync.
    fn skip_to_sync(&mut self) {
        while self.skipping && self.owed.front().is_some_and(|(w, _)| *w != Want::Ready) {
            self.owed.pop_front();
        }
    }

    async fn step(&mut self, step: &[Msg], t: &mut Transcript) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        // COPY data goes out only when the server asked for it, as a driver sends it; when the
        // COPY failed first, the rest of the step (its Sync) still goes.
        let copying = std::mem::take(&mut self.copy_in);
        if copying && step.iter().all(|m| matches!(m, Msg::CopyData(_))) {
            // Part of the data: nothing is answered yet. The pause lets pgweir forward it and
            // wait for more.
            let mut bytes = Vec::new();
            step.iter().for_each(|m| m.encode(&mut bytes));
            self.w.write_all(&bytes).await?;
            self.w.flush().await?;
            self.copy_in = true;
            tokio::time::sleep(Duration::from_millis(2)).await;
            return Ok(());
        }
        for m in step.iter().filter(|m| copying || !m.is_copy()) {
            m.encode(&mut bytes);
            if let Some(w) = want(m) {
                let extended = !matches!(m, Msg::Query(_) | Msg::Sync);
                self.owed.push_back((w, extended));
            }
        }
        self.skip_to_sync();
        // Written while the replies are read: a long pipeline must not deadlock on full
        // socket buffers in both directions.
        let Client {
            r,
            w,
            owed,
            skipping,
            copy_in,
        } = self;
        let write = async {
            w.write_all(&bytes).await?;
            w.flush().await
        };
        let read = async {
            while let Some(&(front, extended)) = owed.front() {
                let m = match tokio::time::timeout(READ_TIMEOUT, read_frame(r)).await {
                    Ok(m) => m?,
                    Err(_) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no reply within {READ_TIMEOUT:?} (still owed: {owed:?})"),
                        ));
                    }
                };
                let tag = m[0];
                t.messages.push(normalise(m));
                if tag == b'G' {
                    // The data is the next step. A COPY run by Execute is the last message of
                    // its step but for a Sync or Flush, and the server ignores a Sync in copy-in
                    // mode: only the Sync after the data is answered.
                    *copy_in = true;
                    if extended {
                        owed.clear();
                    }
                    break;
                }
                let done = match (front, tag) {
                    // Notices and reports can come at any point.
                    (_, b'N' | b'S' | b'A') => false,
                    (Want::Ready, b'Z') => {
                        *skipping = false;
                        true
                    }
                    (Want::Ready, _) => false,
                    (_, b'E') if extended => {
                        *skipping = true;
                        true
                    }
                    (Want::One(expected), _) => tag == expected,
                    (Want::DescribeStatement | Want::DescribePortal, b'T' | b'n') => true,
                    (Want::Execute, b'C' | b's' | b'I') => true,
                    _ => false,
                };
                if done {
                    owed.pop_front();
                    while *skipping && owed.front().is_some_and(|(w, _)| *w != Want::Ready) {
                        owed.pop_front();
                    }
                }
            }
            Ok(())
        };
        let (written, read) = tokio::join!(write, read);
        written?;
        read
    }
}

/// Removes what legitimately differs between the two runs, so the rest compares byte for byte.
///
/// Only one thing: the F (source file), L (line) and R (routine) fields of ErrorResponse and
/// NoticeResponse. They say where in PostgreSQL's source an error was raised. pgweir answers
/// some errors itself (42P05 for a statement name the client already uses: it knows the
/// client's names, the server does not) and, when a client's Bind or Describe lands on a server
/// that lacks the statement, the error of a failed transaction (25P02) is raised by pgweir's
/// Parse ahead of it instead of by the Bind: same severity, code, message, detail, hint and
/// position, another routine and line. No client acts on these three fields.
///
/// Everything else is compared as sent: row data, RowDescription (type and table OIDs come
/// from the same cluster), CommandComplete tags, ReadyForQuery status, ParameterStatus after
/// login, notices. BackendKeyData and the login's ParameterStatus are not in the stream: the
/// login is read before it (pgweir hands out its own cancel key by design); the login's
/// parameters are compared separately as sorted (name, value) pairs.
fn normalise(m: Vec<u8>) -> Vec<u8> {
    if !matches!(m[0], b'E' | b'N') {
        return m;
    }
    let mut body = Vec::with_capacity(m.len());
    for field in m[5..].split(|&b| b == 0) {
        match field.first() {
            None | Some(b'F' | b'L' | b'R') => {}
            Some(_) => {
                body.extend_from_slice(field);
                body.push(0);
            }
        }
    }
    body.push(0);
    msg(m[0], &body)
}

/// A backend message for people: its tag, and its fields or a cut-down body.
fn show(m: &[u8]) -> String {
    let tag = m[0] as char;
    let body = &m[5.min(m.len())..];
    match tag {
        'E' | 'N' => {
            let fields: Vec<String> = body
                .split(|&b| b == 0)
                .filter(|f| !f.is_empty())
                .map(|f| format!("{}={}", f[0] as char, String::from_utf8_lossy(&f[1..])))
                .collect();
            format!("{tag} {}", fields.join(" "))
        }
        _ => format!("{tag} {}", short(body)),
    }
}

/// A StartupMessage for the test role and database, with `startup`'s settings.
fn startup_packet(startup: &Startup) -> Vec<u8> {
    let pairs: Vec<(&[u8], &[u8])> = [("user", roles::TRUST), ("database", "app")]
        .into_iter()
        .chain(startup.iter().map(|(k, v)| (*k, v.as_str())))
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    support::startup_message(&pairs)
}

/// Runs `plan` on a fresh connection to `addr`.
async fn run_script(addr: std::net::SocketAddr, plan: Arc<Plan>) -> Transcript {
    let (startup, script) = &*plan;
    let mut t = Transcript::default();
    let mut client = match Client::connect(addr, startup, &mut t).await {
        Ok(c) => c,
        Err(e) => {
            t.failure = Some(format!("connect: {e}"));
            return t;
        }
    };
    for step in script.iter() {
        t.step_starts.push(t.messages.len());
        if let Err(e) = client.step(step, &mut t).await {
            t.failure = Some(format!("step {}: {e}", t.step_starts.len() - 1));
            return t;
        }
    }
    let _ = client.w.write_all(&msg(b'X', &[])).await;
    t
}

/// The first difference between the direct and the proxied transcript, described in full.
fn compare(
    seed: u64,
    client: usize,
    (startup, script): &Plan,
    direct: &Transcript,
    proxied: &Transcript,
    variant: &str,
) -> Option<String> {
    let mut report = String::new();
    if let Some(f) = &direct.failure {
        let _ = writeln!(report, "the direct run itself failed: {f}");
    }
    let first = direct
        .messages
        .iter()
        .zip(&proxied.messages)
        .position(|(a, b)| a != b)
        .or_else(|| {
            (direct.messages.len() != proxied.messages.len()).then(|| direct.messages.len().min(proxied.messages.len()))
        });
    let login_differs = direct.login_params != proxied.login_params;
    if first.is_none() && !login_differs && report.is_empty() && proxied.failure.is_none() {
        return None;
    }
    let _ = writeln!(
        report,
        "MISMATCH: seed {seed} client {client} via {variant} (rerun: PGWEIR_DIFF_SEED={seed} cargo test --test differential)"
    );
    if login_differs {
        let _ = writeln!(
            report,
            "login ParameterStatus differs:\n  direct:  {:?}\n  proxied: {:?}",
            direct.login_params, proxied.login_params
        );
    }
    if let Some(f) = &proxied.failure {
        let _ = writeln!(report, "the proxied run failed: {f}");
    }
    if let Some(i) = first {
        let step = direct.step_starts.iter().rposition(|&s| s <= i).unwrap_or(0);
        let _ = writeln!(
            report,
            "first difference at message {i} (in the replies to step {step}):"
        );
        for j in i.saturating_sub(3)..i {
            let _ = writeln!(report, "  both:    {}", show(&direct.messages[j]));
        }
        let side = |t: &Transcript| t.messages.get(i).map_or_else(|| "<nothing>".to_owned(), |m| show(m));
        let _ = writeln!(report, "  direct:  {}", side(direct));
        let _ = writeln!(report, "  proxied: {}", side(proxied));
        for j in i + 1..(i + 4) {
            let _ = writeln!(
                report,
                "  then     direct {} | proxied {}",
                direct.messages.get(j).map_or_else(|| "-".to_owned(), |m| show(m)),
                proxied.messages.get(j).map_or_else(|| "-".to_owned(), |m| show(m))
            );
        }
    }
    let _ = write!(
        report,
        "script of client {client} (startup {startup:?}):\n{}",
        print_script(script)
    );
    if std::env::var_os("PGWEIR_DIFF_DUMP").is_some() {
        let _ = writeln!(report, "every message (direct | proxied):");
        for j in 0..direct.messages.len().max(proxied.messages.len()) {
            if let Some(step) = direct.step_starts.iter().position(|&s| s == j) {
                let _ = writeln!(report, "  -- step {step}");
            }
            let side = |t: &Transcript| t.messages.get(j).map_or_else(|| "-".to_owned(), |m| show(m));
            let _ = writeln!(report, "  {j}: {} | {}", side(direct), side(proxied));
        }
    }
    Some(report)
}

/// Puts every client table back as the scripts expect it.
async fn reset_tables(pg: &EmbeddedPostgres) {
    let s = format!("host={} port={} user={} dbname=app", pg.host(), pg.port(), roles::TRUST);
    let (c, conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls)
        .await
        .expect("direct connection");
    tokio::spawn(conn);
    let mut sql = String::new();
    for i in 0..MAX_CLIENTS {
        let _ = write!(
            sql,
            "create table if not exists d{i} (k int4 primary key, v text); truncate d{i}; \
             insert into d{i} select g, 'v' || g from generate_series(1, 100) g;"
        );
    }
    c.batch_execute(&sql).await.expect("reset tables");
}

struct Variant {
    name: String,
    proxy: TestProxy,
}

async fn variants(pg: &EmbeddedPostgres) -> Vec<Variant> {
    let mut out = Vec::new();
    // Pools of one and two servers, both data paths, and a statement cache small enough that
    // pgweir closes and re-prepares statements all the time. A session enters the loop after
    // its second transaction, or (the last) once connected for 20 ms: at whatever point of its
    // script that falls.
    for (pool_size, event_loop, max_prepared, loop_after_ms) in [
        (1, true, 200, 0),
        (2, false, 3, 0),
        (1, false, 200, 0),
        (2, true, 2, 20),
    ] {
        let mut b = TestProxyBuilder::new(pg)
            .pool_size(pool_size)
            .event_loop(event_loop)
            .event_loop_after(Duration::from_millis(loop_after_ms))
            .with_pool(|p| {
                // One client's long transaction must not make another's wait an error.
                p.acquire_timeout = Duration::from_secs(120);
                p.max_prepared_statements = max_prepared;
            });
        b.auth_type = AuthType::Trust;
        out.push(Variant {
            name: format!(
                "pool_size {pool_size}, event_loop {event_loop}, max_prepared_statements {max_prepared}, \
                 event_loop_after {loop_after_ms} ms"
            ),
            proxy: b.start().await,
        });
    }
    out
}

/// Runs one seed: its clients on direct connections, then through `variant`. Returns the
/// number of scripts and the reports of mismatches.
async fn run_seed(pg: &EmbeddedPostgres, variant: &Variant, seed: u64) -> (usize, Vec<String>) {
    let clients = 2 + (seed as usize % (MAX_CLIENTS - 1));
    let mut scripts: Vec<Arc<Plan>> = (0..clients).map(|c| Arc::new(Gen::new(seed, c).plan())).collect();
    // To see whether a mismatch needs the other clients: the others get empty scripts.
    if let Some(only) = env_u64("PGWEIR_DIFF_CLIENT") {
        for (c, s) in scripts.iter_mut().enumerate() {
            if c as u64 != only {
                *s = Arc::new((s.0.clone(), Vec::new()));
            }
        }
    }
    let pg_addr: std::net::SocketAddr = format!("{}:{}", pg.host(), pg.port())
        .parse()
        .expect("PostgreSQL address");
    let mut runs = Vec::new();
    for addr in [pg_addr, variant.proxy.addr] {
        reset_tables(pg).await;
        let tasks: Vec<_> = scripts
            .iter()
            .map(|s| tokio::spawn(run_script(addr, s.clone())))
            .collect();
        let mut transcripts = Vec::new();
        for task in tasks {
            transcripts.push(task.await.expect("client task"));
        }
        runs.push(transcripts);
    }
    let reports = (0..clients)
        .filter_map(|c| compare(seed, c, &scripts[c], &runs[0][c], &runs[1][c], &variant.name))
        .collect();
    (clients, reports)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgweir_answers_every_client_as_postgres_would() {
    let pg = support::postgres();
    let variants = variants(&pg).await;
    let seeds: Vec<u64> = match (env_u64("PGWEIR_DIFF_SEED"), env_u64("PGWEIR_DIFF_SEEDS")) {
        (Some(seed), _) => vec![seed],
        (None, Some(n)) => {
            let first = env_u64("PGWEIR_DIFF_FIRST").unwrap_or(0);
            (first..first + n).collect()
        }
        (None, None) => (0..CI_SEEDS).collect(),
    };
    // Stop early: one mismatch tends to repeat in many seeds.
    let max_failures = env_u64("PGWEIR_DIFF_MAX_FAILURES").unwrap_or(5) as usize;
    let started = std::time::Instant::now();
    let mut scripts = 0;
    let mut failures = Vec::new();
    for &seed in &seeds {
        let variant = &variants[(seed % variants.len() as u64) as usize];
        let (n, reports) = run_seed(&pg, variant, seed).await;
        scripts += n;
        for r in &reports {
            eprintln!("{r}");
        }
        failures.extend(reports);
        if failures.len() >= max_failures {
            break;
        }
    }
    eprintln!(
        "differential: {} seeds, {scripts} scripts, {} mismatching, {:.1}s",
        seeds.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} clients saw something else through pgweir:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
