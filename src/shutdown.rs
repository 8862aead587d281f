//! Process signals. SIGTERM and SIGINT both mean "drain and exit"; the drain itself lives in
//! [`crate::app::Proxy::shutdown`] so tests can trigger it without signals.

/// Resolves on the first SIGTERM or SIGINT. If a handler cannot be installed (which only
/// happens in unusual sandboxes), that signal is simply not awaited.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
