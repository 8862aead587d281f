//! `listen.event_loop`: plain-TCP transaction-mode clients served by the event loops instead of
//! a task each. The whole suite runs on this path by default and once more on the task path
//! (PGWEIR_TEST_EVENT_LOOP=0 in `.ci/run`);
//! these tests pin the loop on regardless, and check the hand-overs between the loop and a
//! client's task: timeouts, kills, shutdown and pool waits that start in the loop.

mod support;

use std::time::Duration;

use pgweir::config::PoolMode;
use pgweir::embedded_pg::{EmbeddedPostgres, roles};
use support::proxy::{
    TestProxy, TestProxyBuilder, all_clients_in_event_loop, clients_json, eventually, first_value, sqlstate, warm_up,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_mode_clients_wait_in_the_event_loop_and_others_in_their_task() {
    let pg = support::postgres();
    let on = TestProxyBuilder::new(&pg).event_loop(true).start().await;
    let client = on.connect(roles::SCRAM).await;
    // Logged in, and after one transaction: still on its task.
    client.simple_query("select 1").await.expect("query");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(all_clients_in_event_loop(&on, 1, false).await);
    client.query_one("select 1", &[]).await.expect("query");
    assert!(
        all_clients_in_event_loop(&on, 1, true).await,
        "{:?}",
        clients_json(&on).await
    );

    let off = TestProxyBuilder::new(&pg).event_loop(false).start().await;
    let client = off.connect(roles::SCRAM).await;
    client.query_one("select 1", &[]).await.expect("query");
    assert!(all_clients_in_event_loop(&off, 1, false).await);

    // Session mode keeps its server for the whole session: it never enters the loop.
    let session = TestProxyBuilder::new(&pg)
        .event_loop(true)
        .mode(PoolMode::Session)
        .start()
        .await;
    let client = session.connect(roles::SCRAM).await;
    client.query_one("select 1", &[]).await.expect("query");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(all_clients_in_event_loop(&session, 1, false).await);
}

/// `listen.event_loop_after`: a client that connects for a short while stays on its task
/// (no crossing to the loop's thread and back), however many transactions it runs; one that
/// stays connected moves over at its first transaction after that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_waits_in_the_event_loop_once_connected_for_event_loop_after() {
    let pg = support::postgres();
    let after = Duration::from_secs(1);
    let proxy = TestProxyBuilder::new(&pg)
        .event_loop(true)
        .event_loop_after(after)
        .start()
        .await;
    let client = proxy.connect(roles::SCRAM).await;
    let connected = std::time::Instant::now();
    let mut checked = 0;
    for n in 1..=20 {
        client.simple_query("select 1").await.expect("query");
        let clients = clients_json(&proxy).await;
        // Well inside the time: the proxy's clock for the session starts a little apart.
        if connected.elapsed() < after / 2 {
            assert_eq!(clients[0]["event_loop"], false, "after {n} transactions: {clients:?}");
            checked = n;
        }
    }
    assert!(
        checked >= 3,
        "too slow to check the rule: {checked} transactions in {after:?}/2"
    );
    tokio::time::sleep(after).await;
    client.simple_query("select 1").await.expect("query");
    assert!(
        all_clients_in_event_loop(&proxy, 1, true).await,
        "{:?}",
        clients_json(&proxy).await
    );
    let rows = client.simple_query("select 41 + 1").await.expect("query in the loop");
    assert_eq!(first_value(&rows).expect("a row"), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_clients_share_two_servers_through_the_event_loop_and_get_their_own_rows() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .event_loop(true)
        .pool_size(2)
        .with_pool(|p| p.max_prepared_statements = 4)
        .start()
        .await;
    let mut tasks = Vec::new();
    for id in 0..40i32 {
        let client = proxy.connect(roles::SCRAM).await;
        tasks.push(tokio::spawn(async move {
            // Named statements beyond the per-server cache: evicted and re-prepared on
            // whichever server the loop hands over.
            let mut statements = Vec::new();
            for k in 0..6 {
                statements.push(
                    client
                        .prepare(&format!("select $1::int4 * 1000 + {k}"))
                        .await
                        .expect("prepare"),
                );
            }
            for round in 0..25i32 {
                let rows = client
                    .simple_query(&format!("select {id} + {round}"))
                    .await
                    .expect("simple query");
                let value = first_value(&rows).expect("a row");
                assert_eq!(value, (id + round).to_string());
                let k = (round % 6) as usize;
                let row = client.query_one(&statements[k], &[&id]).await.expect("execute");
                assert_eq!(row.get::<_, i32>(0), id * 1000 + k as i32);
                // A transaction of several statements stays on one server.
                let tx_pid: Vec<i32> = {
                    client.batch_execute("begin").await.expect("begin");
                    let a = client.query_one("select pg_backend_pid()", &[]).await.expect("pid");
                    let b = client.query_one("select pg_backend_pid()", &[]).await.expect("pid");
                    client.batch_execute("commit").await.expect("commit");
                    vec![a.get(0), b.get(0)]
                };
                assert_eq!(tx_pid[0], tx_pid[1], "a transaction moved between servers");
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("client task"));
    }
    assert!(all_clients_in_event_loop(&proxy, 40, true).await);
    let pool = &proxy.proxy().context().pools.all()[0];
    assert!(pool.snapshot().open <= 2, "{:?}", pool.snapshot());
}

/// One server, taken in turns by a client in the event loop and by one-transaction clients on
/// their tasks: the loop adopts the server's socket when it lends it, a task moves it back to
/// tokio's reactor (`Sock::to_runtime`), and every turn gets its own answer from the one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_taken_in_turns_by_the_event_loop_and_by_tasks_answers_each_of_them() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).event_loop(true).pool_size(1).start().await;
    let regular = proxy.connect(roles::SCRAM).await;
    warm_up(&regular).await;
    assert!(all_clients_in_event_loop(&proxy, 1, true).await);
    let pid: i32 = regular
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    for turn in 0..20i32 {
        let once = proxy.connect(roles::SCRAM).await;
        let row = tokio::time::timeout(
            Duration::from_secs(5),
            once.query_one("select $1::int4 * 2, pg_backend_pid()", &[&turn]),
        )
        .await
        .expect("a task's link answers")
        .expect("query");
        assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (turn * 2, pid));
        drop(once);
        let rows = tokio::time::timeout(
            Duration::from_secs(5),
            regular.simple_query(&format!("select {turn} + 1000")),
        )
        .await
        .expect("the loop's link answers")
        .expect("query");
        assert_eq!(first_value(&rows).expect("a row"), (turn + 1000).to_string());
    }
    let pool = &proxy.proxy().context().pools.all()[0];
    assert_eq!(pool.snapshot().open, 1, "{:?}", pool.snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_timeouts_and_pool_waits_that_start_in_the_event_loop_reach_the_client() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .event_loop(true)
        .pool_size(1)
        .with_pool(|p| {
            p.idle_transaction_timeout = Some(Duration::from_millis(400));
            p.query_timeout = Some(Duration::from_millis(400));
            p.acquire_timeout = Duration::from_millis(300);
        })
        .start()
        .await;

    // An idle client in the loop, killed through the admin API.
    let (victim, victim_task) = proxy.connect_watched(roles::SCRAM).await;
    warm_up(&victim).await;
    assert!(all_clients_in_event_loop(&proxy, 1, true).await);
    let id = clients_json(&proxy).await[0]["id"].as_u64().expect("id");
    let (status, body) = proxy
        .admin("POST", &format!("/api/clients/{id}/kill"), None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    let ended = tokio::time::timeout(Duration::from_secs(5), victim_task)
        .await
        .expect("killed client disconnected")
        .expect("task");
    assert_eq!(sqlstate(&ended.expect_err("killed")).as_deref(), Some("57P01"));

    // Idle in transaction while the loop holds the link.
    let (leaker, leaker_task) = proxy.connect_watched(roles::SCRAM).await;
    warm_up(&leaker).await;
    leaker.batch_execute("begin; select 1").await.expect("begin");
    let ended = tokio::time::timeout(Duration::from_secs(5), leaker_task)
        .await
        .expect("leaker disconnected")
        .expect("task");
    assert_eq!(sqlstate(&ended.expect_err("timed out")).as_deref(), Some("25P03"));

    // A query running past query_timeout.
    let (slow, _slow_task) = proxy.connect_watched(roles::SCRAM).await;
    warm_up(&slow).await;
    let e = slow.query_one("select pg_sleep(5)", &[]).await.expect_err("cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");

    // A pool wait that starts in the loop and ends at acquire_timeout; the client stays usable.
    let holder = proxy.connect(roles::SCRAM).await;
    let waiter = proxy.connect(roles::SCRAM).await;
    warm_up(&waiter).await;
    holder.batch_execute("begin; select 1").await.expect("holder begins");
    let e = waiter.query_one("select 2", &[]).await.expect_err("pool exhausted");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e:?}");
    // The holder commits within idle_transaction_timeout; the waiter is served again.
    holder.batch_execute("commit").await.expect("commit");
    let row = waiter.query_one("select 3::int4", &[]).await.expect("served");
    assert_eq!(row.get::<_, i32>(0), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reaches_clients_idle_in_the_event_loop() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).event_loop(true).start().await;
    let (client, task) = proxy.connect_watched(roles::SCRAM).await;
    warm_up(&client).await;
    assert!(all_clients_in_event_loop(&proxy, 1, true).await);
    proxy.shutdown(Duration::from_secs(2)).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("client disconnected")
        .expect("task");
    assert_eq!(sqlstate(&ended.expect_err("shut down")).as_deref(), Some("57P01"));
}

/// During a shutdown's grace period a transaction may finish, but a kill still ends it at
/// once, on both paths. (The shutdown's raise of the stop signal used up the event loop's
/// registration with it, so the later kill used to wake nobody there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_the_shutdown_grace_period_ends_an_open_transaction_on_both_paths() {
    let pg = support::postgres();
    for event_loop in [false, true] {
        let proxy = TestProxyBuilder::new(&pg).event_loop(event_loop).start().await;
        let (client, task) = proxy.connect_watched(roles::SCRAM).await;
        warm_up(&client).await;
        assert!(all_clients_in_event_loop(&proxy, 1, event_loop).await);
        client.batch_execute("begin; select 1").await.expect("begin");
        let ctx = proxy.proxy().context().clone();
        let info = ctx.clients.all().pop().expect("one client");
        assert_eq!(
            info.in_event_loop(),
            event_loop,
            "the open transaction is served where the test expects"
        );
        let stopping = tokio::spawn(proxy.shutdown(Duration::from_secs(30)));
        // The open transaction keeps the client through the shutdown signal...
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !task.is_finished(),
            "event_loop = {event_loop}: shutdown ended the transaction"
        );
        // ...until it is killed (what the admin API's kill does).
        info.stop.raise(pgweir::client::registry::KILL);
        let ended = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap_or_else(|_| panic!("event_loop = {event_loop}: the kill did not reach the client"))
            .expect("task");
        assert_eq!(
            sqlstate(&ended.expect_err("killed")).as_deref(),
            Some("57P01"),
            "event_loop = {event_loop}"
        );
        tokio::time::timeout(Duration::from_secs(10), stopping)
            .await
            .expect("shutdown finishes once the last client is gone")
            .expect("shutdown task");
    }
}

/// A client waiting for a server is killed at once, not at acquire_timeout, on both data
/// paths; its wait leaves the pool's queue and the server it would have had goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_reaches_a_client_that_waits_for_a_server_on_both_paths() {
    let pg = support::postgres();
    for event_loop in [false, true] {
        let (proxy, holder, waiter, waiter_task) = one_server_two_clients(&pg, event_loop).await;
        holder.batch_execute("begin; select 1").await.expect("holder begins");
        // A simple Query: the loop itself waits for a server for it (it hands named Parse to
        // the task).
        let query = tokio::spawn(async move { waiter.simple_query("select 2").await });
        let id = waiting_client(&proxy, event_loop).await;
        let (status, body) = proxy
            .admin("POST", &format!("/api/clients/{id}/kill"), None, None)
            .await;
        assert_eq!(status, 200, "{body}");
        // The query in flight gets the FATAL; the connection ends with it.
        let e = tokio::time::timeout(Duration::from_secs(5), query)
            .await
            .unwrap_or_else(|_| panic!("event_loop = {event_loop}: the kill waited for a server"))
            .expect("query task")
            .expect_err("killed");
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("57P01"),
            "event_loop = {event_loop}: {e:?}"
        );
        tokio::time::timeout(Duration::from_secs(5), waiter_task)
            .await
            .expect("the killed client's connection ended")
            .expect("task")
            .expect_err("closed by pgweir");
        let pool = &proxy.proxy().context().pools.all()[0];
        assert_eq!(
            pool.snapshot().waiting,
            0,
            "event_loop = {event_loop}: the killed wait is queued"
        );

        the_server_goes_on_serving(&proxy, &holder).await;
    }
}

/// A proxy with one server (acquire_timeout 60 s) and two clients idle on the given path:
/// `holder` to take the server, and `waiter`, with its connection's task, to queue behind it.
async fn one_server_two_clients(
    pg: &EmbeddedPostgres,
    event_loop: bool,
) -> (
    TestProxy,
    tokio_postgres::Client,
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let proxy = TestProxyBuilder::new(pg)
        .event_loop(event_loop)
        .pool_size(1)
        .with_pool(|p| p.acquire_timeout = Duration::from_secs(60))
        .start()
        .await;
    let holder = proxy.connect(roles::SCRAM).await;
    let (waiter, waiter_task) = proxy.connect_watched(roles::SCRAM).await;
    warm_up(&holder).await;
    warm_up(&waiter).await;
    // On the event loop the wait must start there: both clients idle in the loop first.
    assert!(all_clients_in_event_loop(&proxy, 2, event_loop).await);
    (proxy, holder, waiter, waiter_task)
}

/// The holder commits; its server then serves a new client, and the pool opened no other.
async fn the_server_goes_on_serving(proxy: &TestProxy, holder: &tokio_postgres::Client) {
    holder.batch_execute("commit").await.expect("commit");
    let other = proxy.connect(roles::SCRAM).await;
    let row = tokio::time::timeout(Duration::from_secs(5), other.query_one("select 3::int4", &[]))
        .await
        .expect("the server goes on serving")
        .expect("query");
    assert_eq!(row.get::<_, i32>(0), 3);
    let pool = &proxy.proxy().context().pools.all()[0];
    assert_eq!(pool.snapshot().open, 1, "{:?}", pool.snapshot());
}

/// The id of the client waiting for a server on the given path, once there is one.
async fn waiting_client(proxy: &TestProxy, event_loop: bool) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let clients = clients_json(proxy).await;
        if let Some(id) = clients
            .iter()
            .find(|c| c["state"] == "waiting" && c["event_loop"] == event_loop)
            .and_then(|c| c["id"].as_u64())
        {
            return id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "event_loop = {event_loop}: no client waited: {clients:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client waiting for a server that hangs up leaves the pool's queue (and the client list,
/// where it counts against max_client_conn) long before a server frees up, on both data paths
/// (the event loop watches waits older than a second); one that sends more while it waits is
/// still served, every message intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_while_waiting_for_a_server_leaves_the_queue_on_both_paths() {
    let pg = support::postgres();
    for event_loop in [false, true] {
        let (proxy, holder, waiter, waiter_task) = one_server_two_clients(&pg, event_loop).await;
        let waiter = std::sync::Arc::new(waiter);

        // More bytes while waiting (a pipelined second query) end the watch, not the client.
        holder.batch_execute("begin; select 1").await.expect("holder begins");
        let w = waiter.clone();
        let first = tokio::spawn(async move { w.simple_query("select 2").await });
        waiting_client(&proxy, event_loop).await;
        // Past the event loop's WATCH_AFTER, so its watch is on when the bytes come.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let w = waiter.clone();
        let second = tokio::spawn(async move { w.simple_query("select 3").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        waiting_client(&proxy, event_loop).await;
        holder.batch_execute("commit").await.expect("commit");
        for (query, want) in [(first, "2"), (second, "3")] {
            let rows = tokio::time::timeout(Duration::from_secs(5), query)
                .await
                .unwrap_or_else(|_| panic!("event_loop = {event_loop}: a pipelined query was lost"))
                .expect("query task")
                .expect("query");
            assert_eq!(first_value(&rows).as_deref(), Some(want), "event_loop = {event_loop}");
        }
        assert!(all_clients_in_event_loop(&proxy, 2, event_loop).await);

        // Hanging up while waiting: gone while the holder still holds the only server.
        holder
            .batch_execute("begin; select 1")
            .await
            .expect("holder begins again");
        let w = waiter.clone();
        let abandoned = tokio::spawn(async move { w.simple_query("select 4").await });
        waiting_client(&proxy, event_loop).await;
        waiter_task.abort();
        let pool = &proxy.proxy().context().pools.all()[0];
        let left = eventually(Duration::from_secs(5), || async {
            clients_json(&proxy).await.len() == 1 && pool.snapshot().waiting == 0
        })
        .await;
        assert!(
            left,
            "event_loop = {event_loop}: the hung-up client still waits: {:?} {:?}",
            clients_json(&proxy).await,
            pool.snapshot()
        );
        abandoned
            .await
            .expect("query task")
            .expect_err("its connection is gone");

        the_server_goes_on_serving(&proxy, &holder).await;
    }
}

/// A client's next query that arrives while its transaction runs (pipelined) is answered, and
/// so is one it sends after sitting idle: after a transaction the loop keeps the client's read
/// waker from the transaction when it has not fired instead of registering it again, and
/// must never keep one that has. A second client queued for the only server rides along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_later_queries_of_a_client_in_the_event_loop_are_answered() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).event_loop(true).pool_size(1).start().await;
    let client = proxy.connect(roles::SCRAM).await;
    let other = proxy.connect(roles::SCRAM).await;
    warm_up(&client).await;
    warm_up(&other).await;
    assert!(all_clients_in_event_loop(&proxy, 2, true).await);
    for round in 0..3 {
        let slow = client.simple_query("select 'one' from pg_sleep(0.2)");
        let next = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.simple_query("select 'two'").await
        };
        let queued = async {
            tokio::time::sleep(Duration::from_millis(80)).await;
            other.simple_query("select 'three'").await
        };
        let (slow, next, queued) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(slow, next, queued) })
                .await
                .unwrap_or_else(|_| panic!("round {round}: a query was not answered"));
        assert_eq!(first_value(&slow.expect("slow")).as_deref(), Some("one"));
        assert_eq!(first_value(&next.expect("next")).as_deref(), Some("two"));
        assert_eq!(first_value(&queued.expect("queued")).as_deref(), Some("three"));

        tokio::time::sleep(Duration::from_millis(100)).await;
        let later = tokio::time::timeout(Duration::from_secs(5), client.simple_query("select 'four'"))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the query after a pause was not answered"))
            .expect("later");
        assert_eq!(first_value(&later).as_deref(), Some("four"));
    }
    assert!(all_clients_in_event_loop(&proxy, 2, true).await);
}

/// A server that ends while its client sits idle in a transaction (an operator's
/// pg_terminate_backend, PostgreSQL's idle_in_transaction_session_timeout) reaches the client
/// at once, before it sends anything more: the loop keeps watching the server of an open
/// transaction after every round trip, including those where its watch from the reply still
/// stood and it did not register again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ending_mid_transaction_reaches_its_idle_client_at_once() {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg).event_loop(true).pool_size(1).start().await;
    let (client, conn_task) = proxy.connect_watched(roles::SCRAM).await;
    // After two transactions the session waits in the loop; the next one runs there.
    warm_up(&client).await;
    assert!(all_clients_in_event_loop(&proxy, 1, true).await);
    client.batch_execute("begin").await.expect("begin");
    // Round trips inside the transaction: each query goes out while the watch placed after
    // the previous reply still stands.
    for i in 0..5 {
        let rows = tokio::time::timeout(Duration::from_secs(5), client.simple_query(&format!("select {i}")))
            .await
            .unwrap_or_else(|_| panic!("round trip {i}: the reply was never seen"))
            .expect("query");
        assert_eq!(first_value(&rows), Some(i.to_string()));
    }
    let pid: i32 = first_value(&client.simple_query("select pg_backend_pid()").await.expect("pid"))
        .and_then(|p| p.parse().ok())
        .expect("a pid");
    assert!(all_clients_in_event_loop(&proxy, 1, true).await);
    let admin = support::proxy::direct(&pg, "postgres").await;
    admin
        .execute("select pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    let ended = tokio::time::timeout(Duration::from_secs(5), conn_task)
        .await
        .expect("the client learns its server ended without sending anything")
        .expect("connection task");
    let e = ended.expect_err("the connection ends with the server's error");
    assert!(client.is_closed());
    // PostgreSQL's own FATAL (57P01) or pgweir's lost-server error, whichever the client read.
    assert!(
        matches!(sqlstate(&e).as_deref(), Some("57P01" | "08006") | None),
        "{e:?}"
    );
}

/// A client idle in the loop holds no read buffer: ten clients whose transactions overlap take
/// ten buffers from the pool and give all ten back when they go idle, instead of each keeping
/// 16 KiB that its next query would land in cold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_idle_in_the_event_loop_give_back_their_read_buffers() {
    idle_clients_give_back_their_read_buffers(true).await;
}

/// Nor does one idle on its task (one connected for less than `event_loop_after`, or
/// `event_loop = false`): it kept the buffer its last transaction read into, 8.3 KiB per idle
/// client in `benches/idle_clients.py --queries 4` against 4.5 once given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_idle_on_their_task_give_back_their_read_buffers() {
    idle_clients_give_back_their_read_buffers(false).await;
}

async fn idle_clients_give_back_their_read_buffers(in_loop: bool) {
    let pg = support::postgres();
    let proxy = TestProxyBuilder::new(&pg)
        .event_loop(true)
        .event_loop_after(Duration::from_secs(if in_loop { 0 } else { 3600 }))
        .pool_size(10)
        .start()
        .await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let client = proxy.connect(roles::SCRAM).await;
        warm_up(&client).await;
        clients.push(client);
    }
    assert!(all_clients_in_event_loop(&proxy, 10, in_loop).await);
    let buffers = &proxy.proxy().context().buffers;
    let overlapping = || async {
        let sleeps = clients.iter().map(|c| c.batch_execute("SELECT pg_sleep(0.5)"));
        for r in futures_util::future::join_all(sleeps).await {
            r.expect("sleep");
        }
    };
    // The first round opens the ten servers (on the clients' tasks: a connect needs one); in
    // the second a loop lends the buffers, and keeps them when they come back.
    overlapping().await;
    overlapping().await;
    if in_loop {
        for round in 2..5 {
            assert!(all_clients_in_event_loop(&proxy, 10, true).await);
            let idle = buffers.spare();
            let (_, lent) = tokio::join!(
                overlapping(),
                eventually(Duration::from_secs(5), || async { buffers.spare() + 10 <= idle })
            );
            assert!(
                lent,
                "round {round}: the queries took no buffers from the pool ({idle} spare before, {} \
                 now): the clients kept theirs while idle",
                buffers.spare()
            );
            assert!(
                eventually(Duration::from_secs(5), || async { buffers.spare() >= idle }).await,
                "round {round}: idle clients still hold read buffers: {} spare, {idle} before",
                buffers.spare()
            );
        }
    } else {
        // Mid-query the pool's count does not fall by the clients' ten on this path (it rose
        // from 12 to 17 in a trial run), so only the idle count is checked: all ten are back.
        for round in 2..5 {
            overlapping().await;
            assert!(
                eventually(Duration::from_secs(5), || async { buffers.spare() >= 10 }).await,
                "round {round}: clients idle on their tasks still hold read buffers: {} spare",
                buffers.spare()
            );
        }
    }
    // And they are served as before, a query longer than a buffer included.
    let long = "x".repeat(100_000);
    for client in &clients {
        let rows = client
            .simple_query(&format!("SELECT length('{long}')"))
            .await
            .expect("long query");
        assert_eq!(first_value(&rows).as_deref(), Some("100000"));
    }
}
