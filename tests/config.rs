//! Config files parse, defaults and overrides apply, and each invalid value is reported with its
//! key path.

use std::path::Path;
use std::time::Duration;

use pgweir::config::{AuthType, Config, PoolMode, Secret, SessionStatePolicy};

fn dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn err(toml: &str) -> String {
    match Config::from_toml(toml, Some(dir().join("config"))) {
        Ok(_) => panic!("config accepted:\n{toml}"),
        Err(e) => e.to_string(),
    }
}

const DB: &str = "[databases.app]\n";

#[test]
fn example_parses_with_every_key() {
    let c = Config::load(&dir().join("config/example.toml")).expect("example.toml is valid");
    assert_eq!(c.listen.addr.to_string(), "127.0.0.1:6432");
    assert_eq!(c.listen.auth_type, AuthType::ScramSha256);
    assert_eq!(c.pool_defaults.pool_size, 20);
    assert_eq!(c.pool_defaults.idle_transaction_timeout, Some(Duration::from_secs(300)));
    assert_eq!(c.pool_defaults.session_state, SessionStatePolicy::Reset);
    let app = &c.databases["app"];
    assert_eq!(app.pool.pool_size, 10, "database override");
    assert_eq!(
        app.pool.acquire_timeout,
        Duration::from_secs(5),
        "inherited from [pool]"
    );
    let rep = &c.databases["reporting"];
    assert_eq!(rep.pool.mode, PoolMode::Session);
    assert_eq!(rep.server_user.as_deref(), Some("report_reader"));
    assert_eq!(rep.dbname, "app");
    // auth_file users merged with [users.*].
    assert!(matches!(c.users["carol"].secret, Secret::Plain(_)));
    assert!(matches!(c.users["dave"].secret, Secret::Md5(_)));
    assert!(matches!(c.users["bob"].secret, Secret::Scram(_)));
    assert_eq!(
        c.pool_settings("app", "alice").expect("pool").pool_size,
        5,
        "user override"
    );
}

#[test]
fn minimal_parses_with_defaults() {
    let c = Config::load(&dir().join("config/minimal.toml")).expect("minimal.toml is valid");
    let app = &c.databases["app"];
    assert_eq!(app.host, "127.0.0.1");
    assert_eq!(app.dbname, "app");
    assert_eq!(app.pool.mode, PoolMode::Transaction);
    assert_eq!(app.pool.acquire_timeout, Duration::from_secs(5));
    assert_eq!(c.listen.max_client_conn, 1000);
    assert_eq!(c.listen.client_login_timeout, Duration::from_secs(15));
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let e = err(&format!("{DB}\n[listen]\nadress = \"x\"\n"));
    assert!(e.contains("adress"), "{e}");
    let e = err(&format!("{DB}pool_sise = 3\n"));
    assert!(e.contains("pool_sise"), "{e}");
    let e = err(&format!("{DB}\n[bogus]\nx = 1\n"));
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn bad_values_name_the_key() {
    for (toml, needle) in [
        (
            format!("{DB}\n[pool]\nacquire_timeout = \"5 parsecs\"\n"),
            "pool.acquire_timeout",
        ),
        (format!("{DB}\n[pool]\nacquire_timeout = 5\n"), "pool.acquire_timeout"),
        (
            format!("{DB}\n[pool]\nacquire_timeout = \"0\"\n"),
            "pool.acquire_timeout",
        ),
        (format!("{DB}pool_size = 0\n"), "databases.app.pool_size"),
        (
            format!("{DB}pool_size = 2\nmin_pool_size = 3\n"),
            "databases.app.min_pool_size",
        ),
        (format!("{DB}port = 70000\n"), "databases.app.port"),
        (format!("{DB}mode = \"statement\"\n"), "databases.app.mode"),
        (
            format!("{DB}\n[pool]\nsession_state = \"maybe\"\n"),
            "pool.session_state",
        ),
        (format!("{DB}password = \"x\"\n"), "databases.app.password"),
        (format!("{DB}\n[listen]\naddr = \"localhost\"\n"), "listen.addr"),
        (format!("{DB}\n[listen]\nauth_type = \"ldap\"\n"), "listen.auth_type"),
        (
            format!("{DB}\n[listen]\nmax_message_size = 10\n"),
            "listen.max_message_size",
        ),
        ("[listen]\nmax_client_conn = 5\n".to_owned(), "databases"),
        (format!("{DB}\n[users.u]\npool_size = 1\n"), "users.u.password"),
        (
            format!(
                "{DB}\n[listen]\nauth_type = \"md5\"\n\n[users.u]\npassword = \"SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA\"\n"
            ),
            "users.u.password",
        ),
        (
            format!("{DB}\n[listen]\nauth_file = \"does-not-exist.txt\"\n"),
            "listen.auth_file",
        ),
    ] {
        let e = err(&toml);
        assert!(e.contains(needle), "expected {needle:?} in {e:?} for\n{toml}");
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let e = err(&format!("{DB}pool_size = 0\nport = 0\n\n[pool]\nmode = \"x\"\n"));
    assert!(
        e.contains("databases.app.pool_size") && e.contains("databases.app.port") && e.contains("pool.mode"),
        "{e}"
    );
}

#[test]
fn bad_userlist_line_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("users.txt"), "\"ok\" \"pw\"\nbroken line\n").expect("write");
    let toml = format!("{DB}\n[listen]\nauth_file = \"users.txt\"\n");
    let e = Config::from_toml(&toml, Some(dir.path().to_owned())).expect_err("bad auth_file");
    let e = e.to_string();
    assert!(e.contains("listen.auth_file") && e.contains("line 2"), "{e}");
}

#[test]
fn trust_allows_users_without_passwords() {
    let c = Config::from_toml(&format!("{DB}\n[listen]\nauth_type = \"trust\"\n\n[users.u]\n"), None).expect("valid");
    assert!(matches!(c.users["u"].secret, Secret::None));
}
