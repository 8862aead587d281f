//! `[auth_query]`: users missing from pgweir's configuration are looked up in a real
//! PostgreSQL, authenticated against the stored verifier, and logged in by pass-through.

mod support;

use std::time::Duration;

use pgweir::config::{AuthQueryConfig, AuthType, Secret};
use pgweir::embedded_pg::{EmbeddedPostgres, roles};
use support::proxy::{TestProxy, TestProxyBuilder, direct, eventually, message, sqlstate};

/// A proxy that knows only the auth user; everyone else comes from PostgreSQL.
fn builder<'a>(
    pg: &'a EmbeddedPostgres,
    auth_user: (&str, &str),
    query: Option<&str>,
    ttl: Duration,
) -> TestProxyBuilder<'a> {
    let mut b = TestProxyBuilder::new(pg);
    b.users.retain(|name, _| name == auth_user.0);
    b = b.user(auth_user.0, Secret::Plain(auth_user.1.to_owned()));
    b.auth_query = Some(AuthQueryConfig {
        user: auth_user.0.to_owned(),
        query: query
            .unwrap_or("SELECT usename, passwd FROM pg_shadow WHERE usename = $1")
            .to_owned(),
        cache_ttl: ttl,
    });
    b
}

async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_users_are_looked_up_and_passed_through() {
    let pg = support::postgres();
    let proxy = builder(&pg, roles::SUPERUSER, None, Duration::from_secs(60))
        .pool_size(3)
        .start()
        .await;
    assert!(
        !proxy.proxy().context().config.load().users.contains_key(roles::SCRAM.0),
        "app_scram is not in pgweir's configuration"
    );

    // Three clients in transactions at once: three server logins, all by SCRAM pass-through
    // with keys recovered from the clients' proofs (pgweir never saw scram_pw in a file).
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = proxy.connect(roles::SCRAM).await;
        c.batch_execute("BEGIN").await.expect("begin");
        assert_eq!(current_user(&c).await, roles::SCRAM.0);
        clients.push(c);
    }
    for c in &clients {
        c.batch_execute("COMMIT").await.expect("commit");
    }

    // Wrong password and unknown user fail alike.
    let wrong = proxy
        .try_connect((roles::SCRAM.0, "nope"), "app")
        .await
        .expect_err("wrong password");
    let ghost = proxy.try_connect(("ghost", "nope"), "app").await.expect_err("unknown");
    assert_eq!(sqlstate(&wrong).as_deref(), Some("28P01"));
    assert_eq!(sqlstate(&ghost).as_deref(), Some("28P01"));
    assert_eq!(
        message(&wrong).replace(roles::SCRAM.0, "USER"),
        message(&ghost).replace("ghost", "USER"),
        "no user enumeration"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_definer_function_and_cache_ttl() {
    let pg = support::postgres();
    let admin = direct(&pg, "app").await;
    // PgBouncer's recommended set-up: a non-superuser auth user that may only call a
    // SECURITY DEFINER function reading pg_shadow.
    admin
        .batch_execute(
            "CREATE ROLE pgweir_auth LOGIN PASSWORD 'auth_pw';
             CREATE FUNCTION public.pgweir_lookup(name text, OUT usename name, OUT passwd text)
               RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
               AS $$ SELECT usename, passwd FROM pg_shadow WHERE usename = name $$;
             REVOKE ALL ON FUNCTION public.pgweir_lookup(text) FROM PUBLIC;
             GRANT EXECUTE ON FUNCTION public.pgweir_lookup(text) TO pgweir_auth;
             CREATE ROLE aq_user LOGIN PASSWORD 'first';",
        )
        .await
        .expect("set up roles");
    let ttl = Duration::from_secs(3);
    let proxy: TestProxy = builder(
        &pg,
        ("pgweir_auth", "auth_pw"),
        Some("SELECT * FROM public.pgweir_lookup($1)"),
        ttl,
    )
    .start()
    .await;
    let c = proxy.connect(("aq_user", "first")).await;
    assert_eq!(current_user(&c).await, "aq_user");

    // Within the TTL the cached verifier still answers for the old password...
    admin
        .batch_execute("ALTER ROLE aq_user PASSWORD 'second'")
        .await
        .expect("change password");
    proxy
        .try_connect(("aq_user", "first"), "app")
        .await
        .expect("cached verifier accepts the old password within cache_ttl");
    // ...and once it expires, the new one works and the old one does not.
    assert!(
        eventually(ttl * 3, || async {
            proxy.try_connect(("aq_user", "second"), "app").await.is_ok()
        })
        .await,
        "new password accepted after cache_ttl"
    );
    let e = proxy
        .try_connect(("aq_user", "first"), "app")
        .await
        .expect_err("old password refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));

    // A user created after start-up works at once (no negative answer was cached for it).
    admin
        .batch_execute("CREATE ROLE aq_new LOGIN PASSWORD 'new_pw'")
        .await
        .expect("create role");
    let c = proxy.connect(("aq_new", "new_pw")).await;
    assert_eq!(current_user(&c).await, "aq_new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_users_are_looked_up_and_passed_through() {
    let pg = support::postgres();
    let mut b = builder(&pg, roles::SUPERUSER, None, Duration::from_secs(60));
    b.auth_type = AuthType::Md5;
    let proxy = b.start().await;
    // app_md5's password is stored as an md5 hash, and its pg_hba line says md5: pgweir answers
    // PostgreSQL's md5 challenge with the stored hash.
    let c = proxy.connect(roles::MD5).await;
    assert_eq!(current_user(&c).await, roles::MD5.0);
    let e = proxy
        .try_connect((roles::MD5.0, "wrong"), "app")
        .await
        .expect_err("wrong password");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_look_up_is_reported_without_details() {
    let pg = support::postgres();
    let proxy = builder(
        &pg,
        (roles::SUPERUSER.0, "not-the-password"),
        None,
        Duration::from_secs(60),
    )
    .start()
    .await;
    let e = proxy.try_connect(roles::SCRAM, "app").await.expect_err("look-up fails");
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
    assert!(message(&e).contains("auth_query look-up failed"), "{e:?}");
    assert!(
        !message(&e).contains(roles::SUPERUSER.0),
        "the auth user is not disclosed: {e:?}"
    );
    // Failures are not cached: fixing the configuration (here: a reload) helps at once.
    let mut config = (**proxy.proxy().context().config.load()).clone();
    config.users.insert(
        roles::SUPERUSER.0.to_owned(),
        pgweir::config::UserConfig {
            secret: Secret::Plain(roles::SUPERUSER.1.to_owned()),
            pool_size: None,
        },
    );
    proxy.proxy().context().reload(config);
    let c = proxy.connect(roles::SCRAM).await;
    assert_eq!(current_user(&c).await, roles::SCRAM.0);
}
