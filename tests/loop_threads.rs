//! The event loops' threads (`listen.event_loop`, src/net/reactor.rs): one per worker, each
//! waiting in its own epoll, and gone once the runtime that started them is. In a test binary
//! of its own, so no other test's proxy adds or removes loop threads while this one counts.

mod support;

use std::time::{Duration, Instant};

use pgweir::embedded_pg::roles;
use support::proxy::TestProxyBuilder;

/// Waits up to 5 s for `n` loop threads: a thread names itself once it runs, a little after
/// its spawn returned, and ends a little after it was told to.
fn wait_for_loop_threads(n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let count = loop_threads();
        if count == n || Instant::now() >= deadline {
            return count;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn loop_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "pgweir-loop")
        .count()
}

#[test]
fn each_event_loop_has_a_thread_that_ends_with_the_runtime() {
    let pg = support::postgres();
    assert_eq!(loop_threads(), 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // The test proxy runs two workers, so two loops.
        let proxy = TestProxyBuilder::new(&pg).event_loop(true).start().await;
        assert_eq!(wait_for_loop_threads(2), 2);
        let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| proxy.connect(roles::SCRAM))).await;
        for (i, c) in clients.iter().enumerate() {
            let row = c.query_one("select $1::int", &[&(i as i32)]).await.expect("query");
            assert_eq!(row.get::<_, i32>(0), i as i32);
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    assert_eq!(wait_for_loop_threads(0), 0, "loop threads outlived their runtime");
}
