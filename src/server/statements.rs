//! The prepared statements one server connection holds, by pgweir statement id, so a client's
//! statement is prepared on a server only when that server lacks it. Bounded by
//! max_prepared_statements with least-recently-used eviction.

use std::collections::HashMap;

use crate::idhash::IdHash;

/// Which statements one server connection has prepared, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<u64, u64, IdHash>,
    tick: u64,
}

impl ServerStatements {
    pub fn contains(&self, id: u64) -> bool {
        self.used.contains_key(&id)
    }

    pub fn touch(&mut self, id: u64) {
        self.tick += 1;
        if let Some(t) = self.used.get_mut(&id) {
            *t = self.tick;
        }
    }

    pub fn insert(&mut self, id: u64) {
        self.tick += 1;
        self.used.insert(id, self.tick);
    }

    pub fn remove(&mut self, id: u64) {
        self.used.remove(&id);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// The least recently used statement id not in `keep`, the eviction candidate.
    pub fn oldest_except(&self, keep: &[u64]) -> Option<u64> {
        self.used
            .iter()
            .filter(|(id, _)| !keep.contains(id))
            .min_by_key(|(_, t)| **t)
            .map(|(id, _)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_order() {
        let mut s = ServerStatements::default();
        s.insert(1);
        s.insert(2);
        s.insert(3);
        s.touch(1);
        assert_eq!(s.oldest_except(&[]), Some(2));
        s.remove(2);
        assert_eq!(s.oldest_except(&[]), Some(3));
        assert_eq!(s.len(), 2);
    }
}
