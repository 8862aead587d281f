//! All pools, keyed by (database, user), created on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Pool, PoolKey, lock};

/// The set of pools. Looked up once per client login, never per transaction, so a plain mutex
/// around a map is enough.
pub struct PoolRegistry {
    pools: Mutex<Pools>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// How many recently looked-up pools [`PoolRegistry::get_or_create`] compares by name before
/// it hashes: most deployments have fewer (database, user) pairs than this.
const RECENT: usize = 8;

#[derive(Default)]
struct Pools {
    by_key: HashMap<PoolKey, Pool>,
    /// The pools of the last logins that found one, compared by name first: a login whose
    /// pair is among them needs no key allocated (two Strings) and no SipHash of its names,
    /// ~600 instructions of a login's ~28,000. A removed pool leaves this list too.
    recent: Vec<Pool>,
    /// Which entry of `recent` the next miss replaces, once it is full.
    next: usize,
}

impl PoolRegistry {
    pub fn new(stop: CancellationToken, tracker: TaskTracker) -> Arc<PoolRegistry> {
        Arc::new(PoolRegistry {
            pools: Mutex::new(Pools::default()),
            stop,
            tracker,
        })
    }

    pub fn get(&self, key: &PoolKey) -> Option<Pool> {
        lock(&self.pools).by_key.get(key).cloned()
    }

    /// Returns the pool for (`database`, `user`), creating it (and starting its maintenance
    /// task) with `make`, which is given the key and may refuse (None). `make` runs under the
    /// registry's lock, as [`PoolRegistry::reconfigure`] installs a configuration: it sees the
    /// configuration a reload installs, or its pool is among those the reload removes.
    pub fn get_or_create(
        &self,
        database: &str,
        user: &str,
        make: impl FnOnce(PoolKey) -> Option<Pool>,
    ) -> Option<Pool> {
        let mut pools = lock(&self.pools);
        let is = |p: &&Pool| p.key().database == database && p.key().user == user;
        if let Some(p) = pools.recent.iter().find(is) {
            return Some(p.clone());
        }
        let key = PoolKey {
            database: database.to_owned(),
            user: user.to_owned(),
        };
        let (pool, new) = match pools.by_key.get(&key) {
            Some(p) => (p.clone(), false),
            None => (make(key.clone())?, true),
        };
        if new {
            pools.by_key.insert(key, pool.clone());
        }
        pools.remember(&pool);
        drop(pools);
        if new {
            self.tracker.spawn(pool.clone().maintain(self.stop.child_token()));
        }
        Some(pool)
    }

    /// Runs `install` (which puts a new configuration in place) under the registry's lock, then
    /// takes out every pool `keep` refuses and marks it removed. Returns those pools, for the
    /// caller to tell their clients and then close them (told first, a client waiting for a
    /// server hears why rather than that the pool closed).
    pub fn reconfigure(&self, install: impl FnOnce(), keep: impl Fn(&PoolKey) -> bool) -> Vec<Pool> {
        let removed: Vec<Pool> = {
            let mut pools = lock(&self.pools);
            install();
            let gone: Vec<PoolKey> = pools.by_key.keys().filter(|k| !keep(k)).cloned().collect();
            let removed = gone.iter().filter_map(|k| pools.by_key.remove(k)).collect();
            pools.recent.retain(|p| keep(p.key()));
            pools.next = 0;
            removed
        };
        for pool in &removed {
            pool.mark_removed();
        }
        removed
    }

    pub fn all(&self) -> Vec<Pool> {
        let mut v: Vec<Pool> = lock(&self.pools).by_key.values().cloned().collect();
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

impl Pools {
    fn remember(&mut self, pool: &Pool) {
        if self.recent.len() < RECENT {
            self.recent.push(pool.clone());
        } else {
            self.recent[self.next] = pool.clone();
            self.next = (self.next + 1) % RECENT;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::{PoolRegistry, RECENT};
    use crate::pool::tests::unconnected_pool;

    /// Every pair finds its own pool, whether it is among the recent ones or only in the map,
    /// and a pool is made once per pair.
    #[tokio::test]
    async fn each_pair_has_one_pool_whether_recent_or_not() {
        let registry = PoolRegistry::new(CancellationToken::new(), TaskTracker::new());
        let pairs: Vec<(String, String)> = (0..RECENT * 3)
            .map(|i| (format!("db{}", i % 3), format!("u{i}")))
            .collect();
        let mut made = 0;
        let mut first = Vec::new();
        for round in 0..3 {
            for (database, user) in &pairs {
                let pool = registry
                    .get_or_create(database, user, |key| {
                        made += 1;
                        assert_eq!((&key.database, &key.user), (database, user));
                        Some(unconnected_pool(database, user))
                    })
                    .expect("made");
                assert_eq!((&pool.key().database, &pool.key().user), (database, user));
                // Straight again: found among the recent ones.
                let again = registry
                    .get_or_create(database, user, |_| panic!("made twice"))
                    .expect("found");
                assert!(Arc::ptr_eq(&again.shared, &pool.shared));
                match round {
                    0 => first.push(pool),
                    _ => assert!(first.iter().any(|p| Arc::ptr_eq(&p.shared, &pool.shared))),
                }
            }
        }
        assert_eq!(made, pairs.len());
        assert_eq!(registry.all().len(), pairs.len());
        // Same user, other database, and the reverse, are other pools.
        let other = registry
            .get_or_create("db1", "u0", |key| Some(unconnected_pool(&key.database, &key.user)))
            .expect("made");
        assert!(!first.iter().any(|p| Arc::ptr_eq(&p.shared, &other.shared)));
    }

    /// A reconfiguration takes out the pools it does not keep, from the recent ones as well as
    /// the map: they are marked removed, later logins do not find them (a `make`
    /// that refuses gives None), and the kept pools are untouched.
    #[tokio::test]
    async fn reconfigure_takes_out_the_pools_it_does_not_keep() {
        let registry = PoolRegistry::new(CancellationToken::new(), TaskTracker::new());
        let make = |key: crate::pool::PoolKey| Some(unconnected_pool(&key.database, &key.user));
        // More pairs than the recent list holds, so removed pools sit in both places.
        let pools: Vec<_> = (0..RECENT * 2)
            .map(|i| {
                registry
                    .get_or_create(&format!("db{}", i % 2), &format!("u{i}"), make)
                    .expect("made")
            })
            .collect();
        let mut installed = false;
        let removed = registry.reconfigure(|| installed = true, |key| key.database == "db0");
        assert!(installed);
        assert_eq!(removed.len(), RECENT);
        assert!(removed.iter().all(|p| p.key().database == "db1" && p.is_removed()));
        for (i, pool) in pools.iter().enumerate() {
            let (database, user) = (format!("db{}", i % 2), format!("u{i}"));
            let found = registry.get_or_create(&database, &user, |_| None);
            if i % 2 == 0 {
                assert!(!pool.is_removed() && !pool.is_closed());
                assert!(Arc::ptr_eq(&found.expect("kept").shared, &pool.shared));
            } else {
                assert!(found.is_none(), "{database}/{user} still found");
            }
        }
        assert_eq!(registry.all().len(), RECENT);
    }
}
