//! Session parameters follow the client: reported at login without a server, and a client's
//! SET of a tracked parameter applies on whichever server serves its next transaction.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use pgweir::embedded_pg::roles;
use support::proxy::{TestProxyBuilder, direct};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_needs_no_server_once_parameters_are_known() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .pool_size(1)
        .with_pool(|p| p.acquire_timeout = Duration::from_millis(500))
        .start()
        .await;
    let holder = proxy.connect(roles::SCRAM).await;
    holder.batch_execute("begin").await.expect("hold the only server");
    // The pool is exhausted, yet new clients log in at once with server parameters.
    let newcomer = tokio::time::timeout(Duration::from_secs(2), proxy.connect(roles::SCRAM))
        .await
        .expect("login without waiting for a server");
    drop(newcomer);
    holder.batch_execute("commit").await.expect("commit");
}

/// A client for the connection string `conn`, its connection driven in the background.
async fn connect(conn: &str) -> tokio_postgres::Client {
    let (client, c) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(c);
    client
}

async fn check(client: &tokio_postgres::Client, idx: usize, settings: &[(&str, &str, &str)]) {
    for _ in 0..20 {
        for (name, va, vb) in settings {
            let want = if idx == 0 { va } else { vb };
            let got: String = client
                .query_one("select current_setting($1)", &[name])
                .await
                .expect("current_setting")
                .get(0);
            assert_eq!(got.to_lowercase(), want.to_lowercase(), "{name} for client {idx}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_parameters_follow_each_client() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(2).start().await;
    let settings = [
        ("TimeZone", "Europe/Paris", "America/New_York"),
        ("DateStyle", "SQL, DMY", "German, DMY"),
        ("IntervalStyle", "iso_8601", "sql_standard"),
        ("application_name", "client-a", "client-b"),
    ];
    let a = proxy.connect(roles::SCRAM).await;
    let b = proxy.connect(roles::SCRAM).await;
    for (name, va, vb) in settings {
        a.batch_execute(&format!("set {name} = '{va}'")).await.expect("set a");
        b.batch_execute(&format!("set {name} = '{vb}'")).await.expect("set b");
    }
    // Interleave many transactions so each client lands on both servers.
    join_all([check(&a, 0, &settings), check(&b, 1, &settings)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_are_applied() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let conn = format!(
        "{} application_name=from-startup options='-c TimeZone=Asia/Tokyo -c statement_timeout=1234'",
        proxy.conn_str(roles::SCRAM, "app")
    );
    let client = connect(&conn).await;
    let row = client
        .query_one(
            "select current_setting('application_name'), current_setting('TimeZone'), current_setting('statement_timeout')",
            &[],
        )
        .await
        .expect("settings");
    assert_eq!(row.get::<_, String>(0), "from-startup");
    assert_eq!(row.get::<_, String>(1), "Asia/Tokyo");
    assert_eq!(row.get::<_, String>(2), "1234ms");
    // pg_stat_activity shows the client's application_name on the backend serving it.
    let observer = direct(&pg, "postgres").await;
    client.batch_execute("begin").await.expect("begin");
    let names: Vec<String> = observer
        .query(
            "select application_name from pg_stat_activity where usename = 'app_scram'",
            &[],
        )
        .await
        .expect("activity")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(names.iter().any(|n| n == "from-startup"), "{names:?}");
    client.batch_execute("commit").await.expect("commit");
}

/// `options=-c search_path=a,b` (how many frameworks pick their schema) is a list of two
/// schemas to PostgreSQL. Applied with `SET search_path = 'a,b'` it was one schema named "a,b"
/// that does not exist, and every unqualified table name failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_search_path_list_stays_a_list() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let conn = format!(
        "{} options='-c search_path=pg_catalog,public'",
        proxy.conn_str(roles::SCRAM, "app")
    );
    let client = connect(&conn).await;
    let row = client
        .query_one(
            "select current_schemas(false)::text, current_setting('search_path')",
            &[],
        )
        .await
        .expect("schemas");
    assert_eq!(row.get::<_, String>(0), "{pg_catalog,public}");
    assert_eq!(row.get::<_, String>(1), "pg_catalog,public");
}

/// RESET ALL or DISCARD ALL (what many client-side pools run when a connection comes back)
/// take a PostgreSQL session back to its startup settings. Through pgweir they took the server
/// back to its own defaults, and pgweir went on believing its SETs were in place: the client's
/// later transactions ran without its startup settings on that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_come_back_after_reset_all_or_discard_all() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let conn = format!(
        "{} options='-c statement_timeout=1234 -c search_path=pg_catalog,public'",
        proxy.conn_str(roles::SCRAM, "app")
    );
    let client = connect(&conn).await;
    for reset in ["RESET ALL", "DISCARD ALL", "RESET statement_timeout"] {
        client.batch_execute(reset).await.expect("reset");
        let row = client
            .query_one(
                "select current_setting('statement_timeout'), current_setting('search_path')",
                &[],
            )
            .await
            .expect("settings");
        assert_eq!(row.get::<_, String>(0), "1234ms", "after {reset}");
        assert_eq!(row.get::<_, String>(1), "pg_catalog,public", "after {reset}");
    }
}

/// Clients that start alike share the checkout fast path (a server remembers the parameter form
/// it satisfies). A SET by one of them changes what its server has: the next client with the
/// original form must get the server brought back, not the marker's stale promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_changed_by_one_client_is_brought_back_for_the_next() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let conn = format!(
        "{} application_name=same-app options='-c TimeZone=UTC'",
        proxy.conn_str(roles::SCRAM, "app")
    );
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = connect(&conn).await;
        clients.push(client);
    }
    // All three start alike: the one server serves them in turn on the fast path.
    for client in &clients {
        assert_eq!(zone(client).await, "UTC");
    }
    clients[0]
        .batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .expect("set");
    for round in 0..3 {
        assert_eq!(zone(&clients[1]).await, "UTC", "round {round}: client 1 keeps UTC");
        assert_eq!(
            zone(&clients[0]).await,
            "Asia/Tokyo",
            "round {round}: client 0 keeps its SET"
        );
        assert_eq!(zone(&clients[2]).await, "UTC", "round {round}: client 2 keeps UTC");
    }
    // The clients logged in by one template share its parameters until one changes a value:
    // client 0's change is its own copy, and a login now still starts from the template's.
    let late = connect(&conn).await;
    assert_eq!(
        zone(&late).await,
        "UTC",
        "a later login starts at its own startup value"
    );
    assert_eq!(zone(&clients[0]).await, "Asia/Tokyo");
    // Back to the common form: the fast path applies again and nobody sees Tokyo.
    clients[0]
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("set back");
    for client in clients.iter().chain([&late]) {
        assert_eq!(zone(client).await, "UTC");
    }
}

async fn zone(client: &tokio_postgres::Client) -> String {
    client
        .query_one("select current_setting('TimeZone')", &[])
        .await
        .expect("TimeZone")
        .get(0)
}

/// PostgreSQL canonicalises DateStyle, TimeZone, client_encoding… but keeps application_name
/// as given: a client named "Billing" must not run on a server still named "billing" by the
/// client before it (pg_stat_activity, logs and `SHOW` would show the other client's value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_names_differing_only_in_case_are_distinct() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let mut clients = Vec::new();
    for name in ["billing", "Billing", "BILLING", "billing"] {
        let conn = format!("{} application_name={name}", proxy.conn_str(roles::SCRAM, "app"));
        let client = connect(&conn).await;
        clients.push((name, client));
    }
    for round in 0..2 {
        for (name, client) in &clients {
            let got: String = client
                .query_one("select current_setting('application_name')", &[])
                .await
                .expect("application_name")
                .get(0);
            assert_eq!(&got, name, "round {round}");
        }
    }
    // A SET in a different case only is a change too.
    let (_, first) = &clients[0];
    first
        .batch_execute("SET application_name = 'BiLLing'")
        .await
        .expect("set");
    for (name, client) in clients.iter().skip(1) {
        let got: String = client
            .query_one("select current_setting('application_name')", &[])
            .await
            .expect("application_name")
            .get(0);
        assert_eq!(&got, name);
    }
    let got: String = first
        .query_one("select current_setting('application_name')", &[])
        .await
        .expect("application_name")
        .get(0);
    assert_eq!(got, "BiLLing");
}

/// Settings one client asked for at startup (`options=-c …`, or a parameter in the startup
/// packet) stay with that client: the next client on the same server gets the server's
/// defaults back, not the earlier client's statement_timeout, search_path, read-only default or
/// custom setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_of_one_client_do_not_reach_the_next() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let with = format!(
        "{} options='-c statement_timeout=1234 -c search_path=elsewhere -c app.tenant=42 -c default_transaction_read_only=on'",
        proxy.conn_str(roles::SCRAM, "app")
    );
    let plain = proxy.conn_str(roles::SCRAM, "app");
    let sql = "select current_setting('statement_timeout') || ' | ' || current_setting('search_path') || ' | ' \
               || coalesce(current_setting('app.tenant', true), '') || ' | ' \
               || current_setting('default_transaction_read_only')";
    let mut clients = Vec::new();
    for conn in [&with, &plain, &with, &plain] {
        let client = connect(conn).await;
        clients.push(client);
    }
    let mine = "1234ms | elsewhere | 42 | on";
    let defaults = "0 | \"$user\", public |  | off";
    for round in 0..3 {
        for (i, client) in clients.iter().enumerate() {
            let got: String = client.query_one(sql, &[]).await.expect("settings").get(0);
            let want = if i % 2 == 0 { mine } else { defaults };
            assert_eq!(got, want, "round {round}, client {i}");
        }
    }
}

/// A RESET inside a transaction that rolls back leaves the server with the settings pgweir gave
/// it for the client (PostgreSQL reports none of them): they must still be taken off before the
/// next client uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_that_rolls_back_does_not_leave_startup_settings_to_the_next_client() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(1).start().await;
    let with = connect(&format!(
        "{} options='-c work_mem=5MB'",
        proxy.conn_str(roles::SCRAM, "app")
    ))
    .await;
    let plain = connect(&proxy.conn_str(roles::SCRAM, "app")).await;
    async fn work_mem(client: &tokio_postgres::Client) -> String {
        let row = client.query_one("show work_mem", &[]).await.expect("show");
        row.get(0)
    }
    for (reset, end) in [
        ("reset work_mem", "rollback"),
        ("reset all", "rollback"),
        ("reset work_mem; select 1/0", ""),
        ("reset all", "commit"),
    ] {
        assert_eq!(work_mem(&with).await, "5MB", "{reset} {end}");
        if end.is_empty() {
            with.batch_execute(reset).await.expect_err("fails");
        } else {
            with.batch_execute("begin").await.expect("begin");
            with.batch_execute(reset).await.expect("reset");
            with.batch_execute(end).await.expect("end");
        }
        assert_eq!(work_mem(&plain).await, "4MB", "after {reset} {end}");
    }
    with.batch_execute("set work_mem to default").await.expect("default");
    assert_eq!(work_mem(&with).await, "5MB", "after SET TO DEFAULT");
}

/// Clients with different startup settings share two servers, transaction after transaction,
/// and each must always see what PostgreSQL itself gives a direct connection made with the same
/// settings: the same role and database, read from PostgreSQL before the proxy is involved.
/// Covers list values, partial DateStyles, a client at standard_conforming_strings = off before
/// one whose value holds a backslash and a quote, custom settings, and a client with none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_startup_settings_match_direct_postgresql() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).pool_size(2).start().await;
    let clients: [&str; 6] = [
        r"options='-c DateStyle=SQL,DMY -c search_path=pg_catalog,public -c standard_conforming_strings=off'",
        r"options='-c DateStyle=ISO -c TimeZone=europe/paris' application_name=it\'s\\x",
        "",
        r"options='-c statement_timeout=4321 -c app.tenant=é'",
        r"options='-c IntervalStyle=iso_8601 -c DateStyle=German'",
        r"options='-c search_path=\'$user\',pg_catalog' application_name=Billing",
    ];
    let sql = "select current_setting('DateStyle'), current_setting('TimeZone'), \
               current_setting('search_path'), current_setting('standard_conforming_strings'), \
               current_setting('statement_timeout'), current_setting('IntervalStyle'), \
               coalesce(current_setting('app.tenant', true), '<unset>'), \
               current_setting('application_name'), '01/02/2024'::date::text";
    let read = |row: tokio_postgres::Row| (0..9).map(|i| row.get::<_, String>(i)).collect::<Vec<_>>();
    let (user, password) = roles::SCRAM;
    let mut expected = Vec::new();
    for extra in clients {
        let direct = connect(&format!(
            "host={} port={} user={user} password={password} dbname=app {extra}",
            pg.host(),
            pg.port()
        ))
        .await;
        expected.push(read(direct.query_one(sql, &[]).await.expect("direct")));
    }
    let mut through = Vec::new();
    for extra in clients {
        through.push(connect(&format!("{} {extra}", proxy.conn_str(roles::SCRAM, "app"))).await);
    }
    let rounds = through
        .iter()
        .zip(&expected)
        .enumerate()
        .map(|(i, (client, want))| async move {
            for round in 0..15 {
                let mut got = read(client.query_one(sql, &[]).await.expect("through pgweir"));
                // Known difference: once a server has had a custom setting, it stays defined there
                // (RESET makes it '', nothing makes it undefined again), so a client that never set
                // it reads '' where a fresh session reads NULL.
                if got[6].is_empty() && want[6] == "<unset>" {
                    got[6] = "<unset>".into();
                }
                assert_eq!(&got, want, "client {i}, round {round}");
            }
        });
    join_all(rounds).await;
}
