//! Per-pool housekeeping: retire idle connections past server_idle_timeout (down to
//! min_pool_size) or past server_lifetime, and keep min_pool_size connections warm.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{CloseReason, Pool, lock};
use crate::clock::Mono;

impl Pool {
    /// Runs until `stop` fires. One tracked task per pool.
    pub async fn maintain(self, stop: CancellationToken) {
        let period = self.maintenance_period();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            // A removed pool keeps no task (nor itself) alive.
            if self.is_closed() {
                return;
            }
            self.retire_idle(Mono::now());
            self.warm_up().await;
        }
    }

    /// Often enough that a timeout is enforced within a fraction of itself, never busier than 10/s.
    fn maintenance_period(&self) -> Duration {
        let s = self.shared.settings.load_full();
        [s.server_idle_timeout, s.server_lifetime]
            .into_iter()
            .flatten()
            .map(|d| d / 4)
            .chain([Duration::from_secs(1)])
            .min()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(100))
    }

    /// Closes idle connections that are too old or idle too long. Public to the crate so tests
    /// and the admin API can force a pass.
    pub(crate) fn retire_idle(&self, now: Mono) -> usize {
        let settings = self.shared.settings.load_full();
        let retired = {
            let mut st = lock(&self.shared.state);
            let keep_min = settings.min_pool_size;
            let mut retired = Vec::new();
            // Oldest-used first, so the idle timeout trims the cold end of the LIFO stack.
            let idle = std::mem::take(&mut st.idle);
            for conn in idle {
                let too_old = settings.server_lifetime.is_some_and(|l| now.since(conn.created) >= l);
                let too_idle = settings
                    .server_idle_timeout
                    .is_some_and(|t| now.since(conn.last_used) >= t);
                let spare = st.open - retired.len() > keep_min;
                if too_old || (too_idle && spare) {
                    self.count_close(if too_old {
                        CloseReason::Lifetime
                    } else {
                        CloseReason::IdleTimeout
                    });
                    retired.push(conn);
                } else {
                    st.idle.push(conn);
                }
            }
            st.open -= retired.len();
            retired
        };
        let n = retired.len();
        for conn in retired {
            conn.close();
        }
        n
    }

    /// Opens connections until min_pool_size exist. Stops at the first failure; the next pass
    /// tries again, so a down server costs one attempt per period, not a storm. Not while the
    /// pool is paused: a pause is how an operator takes a server out of use (to restart it,
    /// say), and a connection opened meanwhile would count as lent (`drained: false`).
    async fn warm_up(&self) {
        if !self.has_usable_secret() {
            return;
        }
        loop {
            {
                let mut st = lock(&self.shared.state);
                if st.closed || st.paused || st.open >= self.shared.settings.load().min_pool_size.min(st.size) {
                    return;
                }
                st.open += 1;
            }
            match self.open_slot().await {
                Ok(conn) => self.checkin(conn, Mono::now()),
                Err(e) => {
                    tracing::warn!(pool = %self.shared.key, error = %e, "could not open a min_pool_size connection");
                    return;
                }
            }
        }
    }
}
