//! Config files parse, defaults and overrides apply, and each invalid value is reported with its
//! key path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgweir::config::{AuthType, Config, ConfigError, PoolMode, Secret, SessionStatePolicy};

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// One database, so that a snippet appended to it is otherwise valid.
const DB: &str = "[databases.app]\n";
/// A user, so that a snippet appended to it is otherwise valid.
const USER: &str = "\n[users.app]\npassword = \"pw\"\n";

fn parse(toml: &str) -> Result<Config, ConfigError> {
    Config::from_toml(toml, Some(config_dir()))
}

/// The Display of the error for `toml`, which must be rejected.
fn err(toml: &str) -> String {
    match parse(toml) {
        Ok(_) => panic!("config accepted:\n{toml}"),
        Err(e) => e.to_string(),
    }
}

/// `DB` + `body` + `USER`: a config valid except for `body`.
fn with_db(body: &str) -> String {
    format!("{DB}{body}\n{USER}")
}

/// Asserts `toml` is rejected with exactly one problem, at `key`, whose message contains
/// `needle`; returns the message.
fn one_problem(toml: &str, key: &str, needle: &str) -> String {
    let e = parse(toml).expect_err("config must be rejected");
    let problems = e.problems();
    assert_eq!(problems.len(), 1, "expected one problem, got:\n{e}");
    assert_eq!(problems[0].key, key, "{e}");
    assert!(problems[0].message.contains(needle), "expected {needle:?} in:\n{e}");
    assert!(e.to_string().contains(&format!("{key}: ")), "{e}");
    problems[0].message.clone()
}

// ---- the shipped files ----

#[test]
fn example_parses_with_every_key() {
    let c = Config::load(&config_dir().join("example.toml")).expect("example.toml is valid");
    assert_eq!(c.listen.addr.to_string(), "127.0.0.1:6432");
    assert_eq!(c.listen.auth_type, AuthType::ScramSha256);
    assert_eq!(c.listen.max_message_size, 64 << 20);
    assert_eq!(c.listen.tcp_keepalive, Some(Duration::from_secs(60)));
    assert_eq!(c.pool_defaults.pool_size, 20);
    assert_eq!(c.pool_defaults.idle_transaction_timeout, Some(Duration::from_secs(300)));
    assert_eq!(c.pool_defaults.session_state, SessionStatePolicy::Reset);

    let app = &c.databases["app"];
    assert_eq!(app.pool.pool_size, 10, "database override");
    assert_eq!(app.pool.min_pool_size, 2, "database override");
    assert_eq!(app.pool.server_lifetime, None, "0 disables");
    assert_eq!(
        app.pool.acquire_timeout,
        Duration::from_secs(5),
        "inherited from [pool]"
    );
    assert_eq!(app.server_user, None);

    let rep = &c.databases["reporting"];
    assert_eq!(rep.pool.mode, PoolMode::Session);
    assert_eq!(rep.pool.acquire_timeout, Duration::from_secs(30));
    assert_eq!(rep.pool.idle_transaction_timeout, None, "\"0\" disables");
    assert_eq!(rep.pool.server_check_delay, Duration::ZERO, "0 means check every time");
    assert_eq!(rep.pool.session_state, SessionStatePolicy::Reject);
    assert_eq!(rep.pool.server_lifetime, Some(Duration::from_secs(3600)), "inherited");
    assert_eq!(rep.server_user.as_deref(), Some("report_reader"));
    assert_eq!(rep.server_password.as_deref(), Some("report-password"));
    assert_eq!(rep.dbname, "app");

    // auth_file users merged with [users.*].
    assert_eq!(c.users["carol"].secret, Secret::Plain("carol-password".into()));
    assert_eq!(
        c.users["carol"].pool_size,
        Some(2),
        "table settings, auth_file password"
    );
    assert!(matches!(c.users["dave"].secret, Secret::Scram(_)));
    assert!(matches!(c.users["bob"].secret, Secret::Scram(_)));
    let alice = c.pool_settings("app", "alice").expect("pool");
    assert_eq!(alice.pool_size, 5, "user override");
    assert_eq!(alice.min_pool_size, 2);
    assert_eq!(c.pool_settings("app", "bob").expect("pool").pool_size, 10);
    assert!(c.pool_settings("nope", "alice").is_none());
}

#[test]
fn minimal_parses_with_defaults() {
    let c = Config::load(&config_dir().join("minimal.toml")).expect("minimal.toml is valid");
    assert_eq!(c.listen.addr.to_string(), "127.0.0.1:6432");
    assert_eq!(c.listen.max_client_conn, 1000);
    assert_eq!(c.listen.auth_type, AuthType::ScramSha256);
    assert_eq!(c.listen.max_message_size, 64 << 20);
    assert_eq!(c.listen.client_login_timeout, Duration::from_secs(15));
    assert_eq!(c.listen.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.listen.workers, 0);
    assert!(
        c.listen.event_loop,
        "the event loops serve plain-TCP transaction-mode clients by default"
    );
    assert_eq!(c.listen.event_loop_after, Duration::from_millis(100));
    assert_eq!(c.listen.tcp_keepalive, Some(Duration::from_secs(60)));

    let app = &c.databases["app"];
    assert_eq!(app.host, "127.0.0.1");
    assert_eq!(app.port, 5432);
    assert_eq!(app.dbname, "app");
    assert_eq!(app.server_user, None);
    assert_eq!(app.pool, c.pool_defaults);
    let p = &app.pool;
    assert_eq!(p.mode, PoolMode::Transaction);
    assert_eq!((p.pool_size, p.min_pool_size), (20, 0));
    assert_eq!(p.acquire_timeout, Duration::from_secs(5));
    assert_eq!(p.idle_transaction_timeout, Some(Duration::from_secs(300)));
    assert_eq!(p.server_connect_timeout, Duration::from_secs(5));
    assert_eq!(p.server_idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(p.server_lifetime, Some(Duration::from_secs(3600)));
    assert_eq!(p.server_check_delay, Duration::from_secs(30));
    assert_eq!(p.max_prepared_statements, 200);
    assert_eq!(p.session_state, SessionStatePolicy::Reset);
    assert_eq!(p.reset_query, "DISCARD ALL");

    assert_eq!(c.users["app"].secret, Secret::Plain("app-password".into()));
    assert_eq!(c.users["app"].pool_size, None);
}

#[test]
fn missing_file_is_a_read_error() {
    let e = Config::load(&config_dir().join("does-not-exist.toml")).expect_err("no such file");
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert!(e.to_string().contains("does-not-exist.toml"), "{e}");
}

// ---- valid variations ----

#[test]
fn pool_defaults_flow_into_databases_and_are_overridden() {
    let c = parse(&format!(
        "[pool]\nmode = \"session\"\npool_size = 8\nmin_pool_size = 4\nserver_idle_timeout = 0\n\n\
         [databases.a]\n\n[databases.b]\npool_size = 2\nmode = \"transaction\"\nserver_idle_timeout = \"2min\"\n{USER}"
    ))
    .expect("valid");
    let a = &c.databases["a"].pool;
    assert_eq!((a.mode, a.pool_size, a.min_pool_size), (PoolMode::Session, 8, 4));
    assert_eq!(a.server_idle_timeout, None);
    let b = &c.databases["b"].pool;
    assert_eq!((b.mode, b.pool_size), (PoolMode::Transaction, 2));
    assert_eq!(b.min_pool_size, 2, "an inherited min_pool_size is clamped to pool_size");
    assert_eq!(b.server_idle_timeout, Some(Duration::from_secs(120)));
}

#[test]
fn durations_accept_units_and_zero() {
    let c = parse(&format!(
        "[listen]\ntcp_keepalive = 0\nshutdown_timeout = \"0\"\nclient_login_timeout = \"1m 30s\"\n\n\
         [pool]\nacquire_timeout = \"250ms\"\nserver_lifetime = \"0\"\n\n{DB}{USER}"
    ))
    .expect("valid");
    assert_eq!(c.listen.tcp_keepalive, None);
    assert_eq!(c.listen.shutdown_timeout, Duration::ZERO);
    assert_eq!(c.listen.client_login_timeout, Duration::from_secs(90));
    assert_eq!(c.pool_defaults.acquire_timeout, Duration::from_millis(250));
    assert_eq!(c.pool_defaults.server_lifetime, None);
}

#[test]
fn trust_allows_users_without_passwords_and_no_users() {
    let c = parse(&format!("{DB}\n[listen]\nauth_type = \"trust\"\n\n[users.u]\n")).expect("valid");
    assert_eq!(c.users["u"].secret, Secret::None);
    let c = parse(&format!("{DB}\n[listen]\nauth_type = \"trust\"\n")).expect("valid");
    assert!(c.users.is_empty());
}

#[test]
fn md5_auth_accepts_md5_and_plain_secrets() {
    let c = parse(&format!(
        "{DB}\n[listen]\nauth_type = \"md5\"\n\n[users.a]\npassword = \"md5b46a52d3358ef62002c3d958bfd9e3c8\"\n\n\
         [users.b]\npassword = \"plain\"\n"
    ))
    .expect("valid");
    assert_eq!(c.listen.auth_type, AuthType::Md5);
    assert!(matches!(c.users["a"].secret, Secret::Md5(_)));
    assert!(matches!(c.users["b"].secret, Secret::Plain(_)));
}

#[test]
fn users_table_password_wins_over_auth_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("users.txt"),
        "\"x\" \"from-file\"\n\"y\" \"file-only\"\n",
    )
    .expect("write");
    let toml = format!("{DB}\n[listen]\nauth_file = \"users.txt\"\n\n[users.x]\npassword = \"from-table\"\n");
    let c = Config::from_toml(&toml, Some(dir.path().to_owned())).expect("valid");
    assert_eq!(c.users["x"].secret, Secret::Plain("from-table".into()));
    assert_eq!(c.users["y"].secret, Secret::Plain("file-only".into()));
}

#[test]
fn absolute_auth_file_ignores_base_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("users.txt");
    std::fs::write(&file, "\"x\" \"pw\"\n").expect("write");
    let toml = format!("{DB}\n[listen]\nauth_file = {:?}\n", file.display().to_string());
    let c = Config::from_toml(&toml, Some(config_dir())).expect("valid");
    assert!(c.users.contains_key("x"));
}

// ---- parse errors: toml names the key and the line ----

#[test]
fn unknown_top_level_key() {
    let e = err(&format!("bogus = 1\n{DB}"));
    assert!(e.contains("bogus") && e.contains("line 1"), "{e}");
    let e = err(&format!("{DB}\n[bogus]\nx = 1\n"));
    assert!(e.contains("bogus") && e.contains("line 3"), "{e}");
}

#[test]
fn unknown_nested_key() {
    let e = err(&format!("{DB}\n[listen]\nadress = \"x\"\n"));
    assert!(
        e.contains("adress") && e.contains("line 4") && e.contains("`addr`"),
        "{e}"
    );
    let e = err(&format!("{DB}pool_sise = 3\n"));
    assert!(e.contains("pool_sise") && e.contains("line 2"), "{e}");
    let e = err(&format!("{DB}\n[users.u]\npasword = \"x\"\n"));
    assert!(e.contains("pasword") && e.contains("line 4"), "{e}");
}

#[test]
fn wrong_type() {
    let e = err(&format!("{DB}pool_size = \"3\"\n"));
    assert!(e.contains("line 2") && e.contains("pool_size"), "{e}");
    let e = err(&format!("{DB}acquire_timeout = true\n"));
    assert!(e.contains("acquire_timeout") && e.contains("a duration string"), "{e}");
}

#[test]
fn syntax_error_names_the_line() {
    let e = err(&format!("{DB}port = \n"));
    assert!(matches!(parse(&format!("{DB}port = \n")), Err(ConfigError::Parse(_))));
    assert!(e.contains("line 2"), "{e}");
}

// ---- validation errors: one test per rule ----

#[test]
fn missing_databases() {
    one_problem(USER, "databases", "at least one");
}

#[test]
fn bad_duration() {
    one_problem(
        &with_db("\n[pool]\nacquire_timeout = \"5 parsecs\"\n"),
        "pool.acquire_timeout",
        "invalid duration",
    );
}

#[test]
fn duration_without_unit() {
    one_problem(
        &with_db("idle_transaction_timeout = 5\n"),
        "databases.app.idle_transaction_timeout",
        "unit",
    );
}

#[test]
fn negative_duration() {
    one_problem(
        &with_db("\n[pool]\nserver_lifetime = \"-5s\"\n"),
        "pool.server_lifetime",
        "negative",
    );
}

#[test]
fn zero_acquire_timeout() {
    one_problem(
        &with_db("\n[pool]\nacquire_timeout = \"0\"\n"),
        "pool.acquire_timeout",
        "greater than 0",
    );
    one_problem(
        &with_db("acquire_timeout = \"0s\"\n"),
        "databases.app.acquire_timeout",
        "greater than 0",
    );
}

#[test]
fn zero_server_connect_timeout() {
    one_problem(
        &with_db("server_connect_timeout = 0\n"),
        "databases.app.server_connect_timeout",
        "greater than 0",
    );
}

#[test]
fn timeouts_above_one_day() {
    one_problem(
        &with_db("acquire_timeout = \"25h\"\n"),
        "databases.app.acquire_timeout",
        "must be at most 1 day, got 1day 1h",
    );
    one_problem(
        &with_db("\n[pool]\nserver_connect_timeout = \"2days\"\n"),
        "pool.server_connect_timeout",
        "at most",
    );
}

#[test]
fn absurd_duration() {
    one_problem(
        &with_db("server_lifetime = \"1000y\"\n"),
        "databases.app.server_lifetime",
        "365 days",
    );
}

#[test]
fn zero_pool_size() {
    let m = one_problem(&with_db("pool_size = 0\n"), "databases.app.pool_size", "at least 1");
    assert_eq!(m, "must be at least 1, got 0");
}

#[test]
fn min_pool_size_above_pool_size() {
    one_problem(
        &with_db("pool_size = 2\nmin_pool_size = 3\n"),
        "databases.app.min_pool_size",
        "must not exceed pool_size (2)",
    );
    one_problem(
        &with_db("\n[pool]\nmin_pool_size = 30\n"),
        "pool.min_pool_size",
        "must not exceed pool_size (20)",
    );
}

#[test]
fn zero_max_client_conn() {
    one_problem(
        &with_db("\n[listen]\nmax_client_conn = 0\n"),
        "listen.max_client_conn",
        "at least 1",
    );
}

#[test]
fn max_message_size_out_of_range() {
    one_problem(
        &with_db("\n[listen]\nmax_message_size = 10\n"),
        "listen.max_message_size",
        "1 KiB",
    );
    one_problem(
        &with_db("\n[listen]\nmax_message_size = 2147483648\n"),
        "listen.max_message_size",
        "1 GiB",
    );
}

#[test]
fn event_loop_after_is_a_duration_and_zero_means_at_once() {
    one_problem(
        &with_db("\n[listen]\nevent_loop_after = 100\n"),
        "listen.event_loop_after",
        "needs a unit",
    );
    one_problem(
        &with_db("\n[listen]\nevent_loop_after = \"-1s\"\n"),
        "listen.event_loop_after",
        "",
    );
    let c = Config::from_toml(&with_db("\n[listen]\nevent_loop_after = 0\n"), None).expect("0 is valid");
    assert_eq!(c.listen.event_loop_after, Duration::ZERO);
    let c = Config::from_toml(&with_db("\n[listen]\nevent_loop_after = \"2s\"\n"), None).expect("2s is valid");
    assert_eq!(c.listen.event_loop_after, Duration::from_secs(2));
}

#[test]
fn bad_listen_addr() {
    one_problem(
        &with_db("\n[listen]\naddr = \"localhost:6432\"\n"),
        "listen.addr",
        "IP:port",
    );
    // Port 0 picks a free port (tests, and embedding in-process); it is allowed.
    let c = Config::from_toml(&with_db("\n[listen]\naddr = \"127.0.0.1:0\"\n"), None).expect("port 0 is valid");
    assert_eq!(c.listen.addr.port(), 0);
}

#[test]
fn bad_auth_type() {
    one_problem(
        &with_db("\n[listen]\nauth_type = \"ldap\"\n"),
        "listen.auth_type",
        "\"ldap\"",
    );
}

#[test]
fn sub_second_tcp_keepalive() {
    one_problem(
        &with_db("\n[listen]\ntcp_keepalive = \"500ms\"\n"),
        "listen.tcp_keepalive",
        "at least 1s",
    );
}

#[test]
fn bad_port() {
    one_problem(&with_db("port = 70000\n"), "databases.app.port", "between 1 and 65535");
    one_problem(&with_db("port = 0\n"), "databases.app.port", "between 1 and 65535");
}

#[test]
fn bad_mode() {
    one_problem(
        &with_db("mode = \"statement\"\n"),
        "databases.app.mode",
        "\"statement\"",
    );
}

#[test]
fn reset_always_session_state() {
    let c = parse(&with_db("session_state = \"reset_always\"\n")).expect("valid");
    assert_eq!(c.databases["app"].pool.session_state, SessionStatePolicy::ResetAlways);
}

#[test]
fn bad_session_state() {
    one_problem(
        &with_db("\n[pool]\nsession_state = \"maybe\"\n"),
        "pool.session_state",
        "\"maybe\"",
    );
}

#[test]
fn empty_reset_query() {
    one_problem(
        &with_db("reset_query = \" \"\n"),
        "databases.app.reset_query",
        "must not be empty",
    );
}

#[test]
fn server_password_without_user() {
    one_problem(
        &with_db("password = \"x\"\n"),
        "databases.app.password",
        "requires user",
    );
}

#[test]
fn empty_host() {
    one_problem(&with_db("host = \"\"\n"), "databases.app.host", "must not be empty");
}

#[test]
fn user_without_password() {
    one_problem(
        &format!("{DB}\n[users.u]\npool_size = 1\n"),
        "users.u.password",
        "password is required",
    );
}

#[test]
fn zero_user_pool_size() {
    one_problem(
        &with_db("\n[users.u]\npassword = \"x\"\npool_size = 0\n"),
        "users.u.pool_size",
        "at least 1",
    );
}

#[test]
fn md5_auth_with_scram_secret() {
    let scram = "SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    one_problem(
        &format!("{DB}\n[listen]\nauth_type = \"md5\"\n\n[users.u]\npassword = \"{scram}\"\n"),
        "users.u.password",
        "SCRAM verifier",
    );
}

#[test]
fn scram_auth_with_md5_secret() {
    one_problem(
        &format!("{DB}\n[users.u]\npassword = \"md5b46a52d3358ef62002c3d958bfd9e3c8\"\n"),
        "users.u.password",
        "md5 hash",
    );
}

#[test]
fn malformed_scram_secret() {
    one_problem(
        &format!("{DB}\n[users.u]\npassword = \"SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA\"\n"),
        "users.u.password",
        "not a valid SCRAM-SHA-256 verifier",
    );
}

#[test]
fn no_users_without_trust() {
    one_problem(DB, "users", "no users");
}

#[test]
fn odd_names_are_quoted_in_key_paths() {
    one_problem(
        &format!("[databases.\"my.db\"]\npool_size = 0\n{USER}"),
        "databases.\"my.db\".pool_size",
        "at least 1",
    );
}

#[test]
fn missing_auth_file() {
    one_problem(
        &with_db("\n[listen]\nauth_file = \"does-not-exist.txt\"\n"),
        "listen.auth_file",
        "does-not-exist.txt",
    );
}

#[test]
fn bad_auth_file_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("users.txt"), "\"ok\" \"pw\"\nbroken line\n").expect("write");
    let toml = format!("{DB}\n[listen]\nauth_file = \"users.txt\"\n");
    let e = Config::from_toml(&toml, Some(dir.path().to_owned())).expect_err("bad auth_file");
    assert_eq!(e.problems().len(), 1, "{e}");
    assert_eq!(e.problems()[0].key, "listen.auth_file");
    let e = e.to_string();
    assert!(e.contains("users.txt") && e.contains("line 2"), "{e}");
}

#[test]
fn auth_file_md5_secret_under_scram() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("users.txt"),
        "\"erin\" \"md5b46a52d3358ef62002c3d958bfd9e3c8\"\n",
    )
    .expect("write");
    let toml = format!("{DB}\n[listen]\nauth_file = \"users.txt\"\n");
    let e = Config::from_toml(&toml, Some(dir.path().to_owned())).expect_err("md5 under scram");
    assert_eq!(e.problems().len(), 1, "{e}");
    assert_eq!(e.problems()[0].key, "listen.auth_file");
    assert!(e.problems()[0].message.contains("\"erin\""), "{e}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let e = parse(&format!(
        "{DB}pool_size = 0\nport = 0\n\n[pool]\nmode = \"x\"\n\n[listen]\nauth_type = \"md5\"\n\n[users.u]\n"
    ))
    .expect_err("invalid");
    let keys: Vec<&str> = e.problems().iter().map(|p| p.key.as_str()).collect();
    for key in [
        "databases.app.pool_size",
        "databases.app.port",
        "pool.mode",
        "users.u.password",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    // One problem per line, after a header line.
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), e.problems().len() + 1, "{text}");
    for (line, problem) in lines[1..].iter().zip(e.problems()) {
        assert_eq!(line.trim(), problem.to_string());
    }
}

#[test]
fn admin_section_defaults_disable_and_errors() {
    let base = "[databases.app]\n\n[users.u]\npassword = \"pw\"\n";
    let c = Config::from_toml(base, None).expect("valid");
    assert_eq!(c.admin.addr.map(|a| a.to_string()).as_deref(), Some("127.0.0.1:6433"));
    assert_eq!(c.admin.token, None);
    let c = Config::from_toml(&format!("{base}\n[admin]\naddr = \"\"\n"), None).expect("valid");
    assert_eq!(c.admin.addr, None, "empty addr disables the admin listener");
    for (toml, needle) in [
        (format!("{base}\n[admin]\naddr = \"nope\"\n"), "admin.addr"),
        (format!("{base}\n[admin]\ntoken = \"short\"\n"), "admin.token"),
        (
            format!("{base}\n[admin]\nready_warn_percent = 0\n"),
            "admin.ready_warn_percent",
        ),
        (
            format!("{base}\n[admin]\nready_warn_percent = 90\nready_critical_percent = 50\n"),
            "admin.ready_critical_percent",
        ),
    ] {
        let e = Config::from_toml(&toml, None)
            .expect_err("invalid admin section")
            .to_string();
        assert!(e.contains(needle), "{needle} in {e}");
    }
}

#[test]
fn tls_sections_default_and_validate() {
    let c = parse(&with_db("")).expect("valid");
    assert_eq!(c.tls.mode, pgweir::config::ClientTlsMode::Disable);
    assert!(c.tls.acceptor.is_none());
    // Server TLS defaults to prefer, as PgBouncer ≥ 1.20, and reaches every pool.
    assert_eq!(c.pool_defaults.server_tls.mode, pgweir::config::ServerTlsMode::Prefer);
    assert_eq!(
        c.databases["app"].pool.server_tls.mode,
        pgweir::config::ServerTlsMode::Prefer
    );

    one_problem(
        &format!("[tls]\nmode = \"sometimes\"\n{}", with_db("")),
        "tls.mode",
        "must be",
    );
    one_problem(
        &format!("[tls]\nmode = \"require\"\n{}", with_db("")),
        "tls",
        "cert_file and key_file",
    );
    let msg = one_problem(
        &format!(
            "[tls]\nmode = \"prefer\"\ncert_file = \"missing.crt\"\nkey_file = \"missing.key\"\n{}",
            with_db("")
        ),
        "tls.cert_file",
        "cannot read",
    );
    assert!(msg.contains("missing.crt"), "{msg}");
    one_problem(
        &format!("[server_tls]\nmode = \"verify-full\"\n{}", with_db("")),
        "server_tls.ca_file",
        "need ca_file",
    );
    one_problem(
        &format!("[server_tls]\nmode = \"maybe\"\n{}", with_db("")),
        "server_tls.mode",
        "verify-full",
    );
    one_problem(
        &format!("[server_tls]\nserver_name = \"not a name!\"\n{}", with_db("")),
        "server_tls.server_name",
        "DNS name",
    );

    // Files are resolved against the config file's directory and must hold PEM.
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("ca.pem"), "no PEM here").expect("write");
    let text = format!(
        "[server_tls]\nmode = \"verify-ca\"\nca_file = \"ca.pem\"\n{}",
        with_db("")
    );
    let e = Config::from_toml(&text, Some(dir.path().to_owned())).expect_err("not PEM");
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}

#[test]
fn unix_sockets_parse_and_validate() {
    let c = parse(&with_db("")).expect("valid");
    assert_eq!(c.listen.unix_socket_dir, None, "TCP only by default");
    assert_eq!(c.listen.unix_socket_mode, 0o777);
    let c = parse(&format!(
        "[listen]\naddr = \"127.0.0.1:7432\"\nunix_socket_dir = \"/run/pgweir\"\nunix_socket_mode = \"0770\"\n\
         [databases.local]\nhost = \"/var/run/postgresql\"\nport = 5433\n{}",
        with_db("")
    ))
    .expect("valid");
    assert_eq!(c.listen.unix_socket_dir.as_deref(), Some(Path::new("/run/pgweir")));
    assert_eq!(c.listen.unix_socket_mode, 0o770);
    assert_eq!(c.databases["local"].host, "/var/run/postgresql");
    let off = parse(&format!("[listen]\nunix_socket_dir = \"\"\n{}", with_db(""))).expect("valid");
    assert_eq!(off.listen.unix_socket_dir, None, "\"\" turns it off");

    one_problem(
        &format!("[listen]\nunix_socket_dir = \"run/pgweir\"\n{}", with_db("")),
        "listen.unix_socket_dir",
        "absolute",
    );
    one_problem(
        &format!("[listen]\nunix_socket_dir = \"/{}\"\n{}", "d".repeat(100), with_db("")),
        "listen.unix_socket_dir",
        "at most 107",
    );
    // With port 0 the name is only known at bind time: it must fit for any port.
    one_problem(
        &format!(
            "[listen]\naddr = \"127.0.0.1:0\"\nunix_socket_dir = \"/{}\"\n{}",
            "d".repeat(94),
            with_db("")
        ),
        "listen.unix_socket_dir",
        "at most 107",
    );
    one_problem(
        &format!("[listen]\nunix_socket_mode = \"0888\"\n{}", with_db("")),
        "listen.unix_socket_mode",
        "octal",
    );
    // The socket's group, by number or by a name in /etc/group (root's group is in every one).
    let group = |g: &str| {
        format!(
            "[listen]\nunix_socket_dir = \"/run/pgweir\"\nunix_socket_group = \"{g}\"\n{}",
            with_db("")
        )
    };
    assert_eq!(
        parse(&group("4242")).expect("valid").listen.unix_socket_group,
        Some(4242)
    );
    assert_eq!(parse(&group("root")).expect("valid").listen.unix_socket_group, Some(0));
    assert_eq!(parse(&with_db("")).expect("valid").listen.unix_socket_group, None);
    one_problem(&group("no-such-group-here"), "listen.unix_socket_group", "numeric id");
    one_problem(
        &format!("[listen]\nunix_socket_group = \"4242\"\n{}", with_db("")),
        "listen.unix_socket_group",
        "unix_socket_dir is not set",
    );
    one_problem(
        &format!("[databases.far]\nhost = \"/{}\"\n{}", "d".repeat(100), with_db("")),
        "databases.far.host",
        "shorter directory",
    );
    let c = parse(&format!(
        "[[hba]]\naction = \"allow\"\naddress = \"local\"\n{}",
        with_db("")
    ))
    .expect("valid");
    assert_eq!(c.hba[0].address, pgweir::config::hba::HbaAddress::Local);
}

#[test]
fn hba_rules_parse_and_validate() {
    let c = parse(&format!(
        "[[hba]]\naction = \"deny\"\naddress = \"10.9.0.0/16\"\n\
         [[hba]]\naction = \"allow\"\naddress = \"all\"\nusers = [\"app\"]\ndatabases = [\"app\"]\ntls = true\n{}",
        with_db("")
    ))
    .expect("valid");
    assert_eq!(c.hba.len(), 2);
    assert_eq!(c.hba[0].action, pgweir::config::hba::HbaAction::Deny);
    assert_eq!(c.hba[1].address, pgweir::config::hba::HbaAddress::All);
    assert_eq!(c.hba[1].tls, Some(true));
    assert!(parse(&with_db("")).expect("valid").hba.is_empty());

    one_problem(
        &format!("[[hba]]\naction = \"permit\"\naddress = \"all\"\n{}", with_db("")),
        "hba[1].action",
        "\"allow\" or \"deny\"",
    );
    one_problem(
        &format!("[[hba]]\naction = \"allow\"\n{}", with_db("")),
        "hba[1].address",
        "is required",
    );
    one_problem(
        &format!(
            "[[hba]]\naction = \"allow\"\naddress = \"all\"\n[[hba]]\naction = \"deny\"\naddress = \"10.0.0.0/40\"\n{}",
            with_db("")
        ),
        "hba[2].address",
        "prefix length",
    );
    one_problem(
        &format!(
            "[[hba]]\naction = \"allow\"\naddress = \"all\"\nusers = []\n{}",
            with_db("")
        ),
        "hba[1].users",
        "must list names",
    );
    one_problem(
        &format!(
            "[[hba]]\naction = \"allow\"\naddress = \"local\"\ntls = false\n{}",
            with_db("")
        ),
        "hba[1].tls",
        "could never match",
    );
    let e = err(&format!(
        "[[hba]]\naction = \"allow\"\naddress = \"all\"\nport = 1\n{}",
        with_db("")
    ));
    assert!(e.contains("port"), "{e}");
}

#[test]
fn auth_query_section_validates_its_user_and_query() {
    let c = parse(&format!("[auth_query]\nuser = \"app\"\n{}", with_db(""))).expect("valid");
    let aq = c.auth_query.expect("auth_query");
    assert_eq!(aq.user, "app");
    assert!(aq.query.contains("pg_shadow") && aq.query.contains("$1"));
    assert_eq!(aq.cache_ttl, Duration::from_secs(60));
    assert!(parse(&with_db("")).expect("valid").auth_query.is_none());

    one_problem(
        &format!("[auth_query]\n{}", with_db("")),
        "auth_query.user",
        "is required",
    );
    one_problem(
        &format!("[auth_query]\nuser = \"nobody\"\n{}", with_db("")),
        "auth_query.user",
        "must also be listed in [users]",
    );
    one_problem(
        &format!("[auth_query]\nuser = \"app\"\nquery = \"SELECT 1\"\n{}", with_db("")),
        "auth_query.query",
        "$1",
    );
    one_problem(
        &format!("[auth_query]\nuser = \"app\"\ncache_ttl = 5\n{}", with_db("")),
        "auth_query.cache_ttl",
        "needs a unit",
    );
}

#[test]
fn peers_need_an_own_peer_id_and_distinct_ids() {
    let c = parse(&format!(
        "[listen]\npeer_id = 1\n[[peers]]\nid = 1\nhost = \"10.0.0.1\"\nport = 6432\n\
         [[peers]]\nid = 2\nhost = \"10.0.0.2\"\nport = 6432\n{}",
        with_db("")
    ))
    .expect("valid");
    assert_eq!(c.listen.peer_id, 1);
    assert_eq!(c.peers.len(), 2);
    assert_eq!(c.peers[&2].host, "10.0.0.2");

    one_problem(
        &format!("[[peers]]\nid = 2\nhost = \"h\"\nport = 1\n{}", with_db("")),
        "listen.peer_id",
        "give this instance its own id",
    );
    one_problem(
        &format!("[listen]\npeer_id = 16384\n{}", with_db("")),
        "listen.peer_id",
        "16383",
    );
    one_problem(
        &format!(
            "[listen]\npeer_id = 1\n[[peers]]\nid = 2\nhost = \"h\"\nport = 1\n[[peers]]\nid = 2\nhost = \"i\"\nport = 2\n{}",
            with_db("")
        ),
        "peers[2].id",
        "listed twice",
    );
    one_problem(
        &format!(
            "[listen]\npeer_id = 1\n[[peers]]\nid = 2\nhost = \"h\"\n{}",
            with_db("")
        ),
        "peers[1].port",
        "is required",
    );
    // A Unix-socket directory, as libpq takes one: absolute and short enough for the socket file.
    let c = parse(&format!(
        "[listen]\npeer_id = 1\n[[peers]]\nid = 2\nhost = \"/run/pgweir\"\nport = 6432\n{}",
        with_db("")
    ))
    .expect("valid");
    assert_eq!(c.peers[&2].host, "/run/pgweir");
    one_problem(
        &format!(
            "[listen]\npeer_id = 1\n[[peers]]\nid = 2\nhost = \"/{}\"\nport = 6432\n{}",
            "d".repeat(120),
            with_db("")
        ),
        "peers[1].host",
        "at most",
    );
}

#[test]
fn admin_token_can_come_from_a_file() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("token"), "  a-token-of-enough-length-123 \n").expect("write");
    let text = format!("[admin]\ntoken_file = \"token\"\n{}", with_db(""));
    let c = Config::from_toml(&text, Some(dir.path().to_owned())).expect("valid");
    assert_eq!(c.admin.token.as_deref(), Some("a-token-of-enough-length-123"));
    one_problem(
        &format!("[admin]\ntoken_file = \"/nonexistent/token\"\n{}", with_db("")),
        "admin.token_file",
        "cannot read",
    );
    one_problem(
        &format!(
            "[admin]\ntoken = \"0123456789abcdef0\"\ntoken_file = \"t\"\n{}",
            with_db("")
        ),
        "admin.token_file",
        "not both",
    );
}
