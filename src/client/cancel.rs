//! Cancel routing. Clients get a pgweir-made BackendKeyData; a CancelRequest carrying it is
//! looked up here and, if the client currently holds a server, re-sent to that server with the
//! server's own key. A forged or stale key does nothing.
//!
//! Race: a cancel must never hit the *next* client's query on the same server. The session
//! clears its target and waits for in-flight cancels under the same lock the cancel path uses
//! to read the target, so a server is only returned to the pool once no cancel aimed at it can
//! still be sent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use subtle::ConstantTimeEq;

use crate::proto::startup::CancelKey;

#[derive(Debug, Default)]
struct SlotInner {
    target: Option<(SocketAddr, CancelKey)>,
}

/// Per-client: which server (if any) a cancel should go to right now.
#[derive(Debug, Default)]
pub struct CancelSlot {
    inner: Mutex<SlotInner>,
    in_flight: AtomicU32,
}

impl CancelSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_target(&self, addr: SocketAddr, key: CancelKey) {
        self.lock().target = Some((addr, key));
    }

    /// Clears the target; returns true when no cancel is in flight any more, so the server may
    /// be handed on. The caller retries (after yielding) while this returns false.
    pub fn clear_target(&self) -> bool {
        let mut inner = self.lock();
        inner.target = None;
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Takes the current target and marks a cancel in flight (under the lock, see module docs).
    fn begin_cancel(&self) -> Option<(SocketAddr, CancelKey)> {
        let inner = self.lock();
        let target = inner.target?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(target)
    }

    fn end_cancel(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Entry {
    secret: i32,
    slot: Arc<CancelSlot>,
}

/// Every logged-in client's key, by pid.
#[derive(Default)]
pub struct CancelRegistry {
    entries: DashMap<i32, Entry>,
}

impl CancelRegistry {
    /// Issues a fresh random key for a client and registers its slot. Pids are random too (not
    /// sequential), so keys cannot be enumerated; the sign bit is cleared because some drivers
    /// print or parse pids as positive numbers.
    pub fn register(&self, slot: Arc<CancelSlot>) -> CancelKey {
        loop {
            let pid = (rand::random::<u32>() & 0x7fff_ffff) as i32;
            if pid == 0 {
                continue;
            }
            let secret = rand::random::<i32>();
            if let dashmap::Entry::Vacant(v) = self.entries.entry(pid) {
                v.insert(Entry { secret, slot });
                return CancelKey { pid, secret };
            }
        }
    }

    pub fn unregister(&self, key: CancelKey) {
        self.entries.remove(&key.pid);
    }

    /// Handles a CancelRequest: returns once the cancel has been delivered, or at once if the key
    /// is unknown or its client holds no server.
    pub async fn cancel(&self, key: CancelKey) {
        let slot = match self.entries.get(&key.pid) {
            Some(e) if bool::from(e.secret.to_be_bytes().ct_eq(&key.secret.to_be_bytes())) => e.slot.clone(),
            _ => {
                tracing::debug!(pid = key.pid, "cancel request with an unknown key ignored");
                return;
            }
        };
        let Some((addr, server_key)) = slot.begin_cancel() else {
            tracing::debug!("cancel request for an idle client ignored");
            return;
        };
        if let Err(e) = crate::server::send_cancel(addr, server_key).await {
            tracing::warn!(%addr, error = %e, "could not forward a cancel request");
        }
        slot.end_cancel();
    }
}
