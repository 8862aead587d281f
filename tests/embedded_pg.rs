//! The embedded PostgreSQL every other integration test relies on: roles, auth methods,
//! restart, crash and parallel clusters.

mod support;

use std::process::Command;

use pgweir::embedded_pg::{EmbeddedError, EmbeddedOptions, EmbeddedPostgres, roles};

/// `pg.psql`, panicking with the SQL and psql's error.
fn sql(pg: &EmbeddedPostgres, dbname: &str, query: &str) -> String {
    pg.psql(dbname, query).unwrap_or_else(|e| panic!("{query}: {e}"))
}

/// psql over TCP as `user`, with `password` in PGPASSWORD (none: no PGPASSWORD at all).
fn tcp_psql(pg: &EmbeddedPostgres, user: &str, password: Option<&str>, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new(pg.tool("psql"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    // No ~/.pgpass fallback: the password under test is the only one offered.
    cmd.env("PGPASSFILE", "/nonexistent").env("PGCONNECT_TIMEOUT", "10");
    let out = cmd
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            pg.host(),
            "-p",
        ])
        .arg(pg.port().to_string())
        .args(["-U", user, "-d", roles::DATABASE, "-c", sql])
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn roles_log_in_with_their_auth_methods() {
    let pg = support::postgres();
    assert_eq!(sql(&pg, "postgres", "select 1"), "1");
    assert_eq!(pg.host(), "127.0.0.1");
    assert!(pg.bin_dir().join("initdb").is_file());
    assert!(pg.data_dir().join("PG_VERSION").is_file());

    for (user, password) in [roles::SUPERUSER, roles::SCRAM, roles::MD5, roles::PLAIN] {
        let who = tcp_psql(&pg, user, Some(password), "select current_user").unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(who, user);
        let err = tcp_psql(&pg, user, Some("wrong"), "select 1").expect_err(user);
        assert!(err.contains("password authentication failed"), "{user}: {err}");
        let err = tcp_psql(&pg, user, None, "select 1").expect_err(user);
        assert!(err.contains("no password supplied"), "{user}: {err}");
    }
    assert_eq!(
        tcp_psql(&pg, roles::TRUST, None, "select current_user").expect("trust login"),
        roles::TRUST
    );

    // The auth method each TCP login used, and how each password is stored.
    let methods = sql(
        &pg,
        "postgres",
        "select user_name[1] || '=' || auth_method from pg_hba_file_rules where type = 'host' order by line_number",
    );
    assert_eq!(
        methods,
        "app_md5=md5\napp_plain=password\napp_trust=trust\nall=scram-sha-256"
    );
    let stored = sql(
        &pg,
        "postgres",
        "select rolname || '=' || coalesce(case when rolpassword like 'md5%' then 'md5' \
             else split_part(rolpassword, '$', 1) end, '-') from pg_authid \
             where rolname in ('postgres', 'app_scram', 'app_md5', 'app_plain', 'app_trust') order by rolname",
    );
    assert_eq!(
        stored.lines().collect::<Vec<_>>(),
        [
            "app_md5=md5",
            "app_plain=SCRAM-SHA-256",
            "app_scram=SCRAM-SHA-256",
            "app_trust=-",
            "postgres=SCRAM-SHA-256"
        ]
    );

    // Every login role may create objects in `app`, and connect to `postgres`.
    for (i, user) in [roles::SCRAM.0, roles::MD5.0, roles::PLAIN.0, roles::TRUST]
        .into_iter()
        .enumerate()
    {
        let password = [roles::SCRAM.1, roles::MD5.1, roles::PLAIN.1, ""][i];
        let made = tcp_psql(
            &pg,
            user,
            Some(password),
            &format!("create table t_{i}(x int); create schema s_{i}; select 'ok'"),
        );
        assert_eq!(made.unwrap_or_else(|e| panic!("{user}: {e}")), "ok");
    }
    assert_eq!(
        sql(
            &pg,
            "postgres",
            "select count(*) from pg_database where datname = 'app'"
        ),
        "1"
    );
}

#[test]
fn psql_reports_errors_and_runs_scripts() {
    let pg = support::postgres();
    let err = pg.psql("app", "select nope").expect_err("unknown column");
    assert!(
        matches!(&err, EmbeddedError::Command { output, .. } if output.contains("nope")),
        "{err}"
    );
    // A script: statements run one by one, so CREATE DATABASE works next to others.
    let out = sql(&pg, "postgres", "create database other; select 2;\nselect 3;");
    assert_eq!(out, "2\n3");
}

#[test]
fn options_reach_postgresql_conf() {
    let pg = support::postgres_with(EmbeddedOptions {
        max_connections: 37,
        extra_conf: vec!["work_mem = '7MB'".to_owned()],
        ..Default::default()
    });
    assert_eq!(sql(&pg, "postgres", "show max_connections"), "37");
    assert_eq!(sql(&pg, "postgres", "show work_mem"), "7MB");
    assert_eq!(sql(&pg, "postgres", "show fsync"), "off");
    assert_eq!(sql(&pg, "postgres", "show listen_addresses"), "127.0.0.1");
}

#[test]
fn restart_kill_and_start_again() {
    let mut pg = support::postgres();
    let port = pg.port();
    let first = pg.postmaster_pid().expect("running");
    sql(&pg, "app", "create table kept(x int); insert into kept values (42)");

    pg.restart().expect("restart");
    let second = pg.postmaster_pid().expect("running after restart");
    assert_ne!(first, second);
    assert_eq!(pg.port(), port);
    assert_eq!(sql(&pg, "app", "select x from kept"), "42");

    // Make the row durable in the data files: a SIGKILL loses WAL still in shared memory.
    sql(&pg, "app", "checkpoint");
    pg.kill().expect("kill");
    assert_eq!(pg.postmaster_pid(), None);
    assert!(pg.psql("app", "select 1").is_err(), "the server is down");
    assert!(tcp_psql(&pg, roles::SCRAM.0, Some(roles::SCRAM.1), "select 1").is_err());
    assert!(pg.data_dir().join("PG_VERSION").is_file(), "the data dir stays");

    pg.start_again().expect("start again");
    assert_eq!(pg.port(), port);
    assert_eq!(sql(&pg, "app", "select x from kept"), "42");
    assert_eq!(
        tcp_psql(&pg, roles::SCRAM.0, Some(roles::SCRAM.1), "select 1").expect("scram login"),
        "1"
    );
    assert!(
        pg.log_contents().contains("database system was interrupted"),
        "crash recovery ran"
    );

    pg.stop().expect("stop");
    pg.stop().expect("stop");
    assert_eq!(pg.postmaster_pid(), None);
    pg.start_again().expect("start again");
    assert_eq!(sql(&pg, "app", "select 1"), "1");

    // Drop stops the server and removes everything.
    let data = pg.data_dir().to_path_buf();
    let pid = pg.postmaster_pid().expect("running");
    drop(pg);
    assert!(!data.exists());
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
    assert!(!alive, "postmaster {pid} still runs after drop");
}

#[test]
fn clusters_run_in_parallel() {
    let started: Vec<EmbeddedPostgres> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(support::postgres)).collect();
        handles.into_iter().map(|h| h.join().expect("start thread")).collect()
    });
    let mut ports: Vec<u16> = started.iter().map(|pg| pg.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    assert_ne!(started[0].data_dir(), started[1].data_dir());
    for (i, pg) in started.iter().enumerate() {
        sql(
            pg,
            "app",
            &format!("create table mine(x int); insert into mine values ({i})"),
        );
    }
    for (i, pg) in started.iter().enumerate() {
        assert_eq!(sql(pg, "app", "select x from mine"), i.to_string());
        assert_eq!(
            tcp_psql(pg, roles::MD5.0, Some(roles::MD5.1), "select 1").expect("md5 login"),
            "1"
        );
    }
}
