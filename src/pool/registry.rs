//! All pools, keyed by (database, user), created on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Pool, PoolKey, lock};

/// The set of pools. Looked up once per client login, never per transaction, so a plain mutex
/// around a map is enough.
pub struct PoolRegistry {
    pools: Mutex<HashMap<PoolKey, Pool>>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl PoolRegistry {
    pub fn new(stop: CancellationToken, tracker: TaskTracker) -> Arc<PoolRegistry> {
        Arc::new(PoolRegistry {
            pools: Mutex::new(HashMap::new()),
            stop,
            tracker,
        })
    }

    pub fn get(&self, key: &PoolKey) -> Option<Pool> {
        lock(&self.pools).get(key).cloned()
    }

    /// Returns the pool for `key`, creating it (and starting its maintenance task) with `make`.
    pub fn get_or_create(&self, key: &PoolKey, make: impl FnOnce() -> Pool) -> Pool {
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.get(key) {
            return p.clone();
        }
        let pool = make();
        pools.insert(key.clone(), pool.clone());
        drop(pools);
        self.tracker.spawn(pool.clone().maintain(self.stop.child_token()));
        pool
    }

    pub fn all(&self) -> Vec<Pool> {
        let mut v: Vec<Pool> = lock(&self.pools).values().cloned().collect();
        v.sort_by(|a, b| a.key().cmp(b.key()));
        v
    }

    /// Closes every pool (idle connections now, lent ones when returned).
    pub fn close_all(&self) {
        for p in self.all() {
            p.close();
        }
    }
}
