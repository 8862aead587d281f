//! Cancel routing. Clients get a pgweir-made BackendKeyData; a CancelRequest carrying it is
//! looked up here and, if the client currently holds a server, re-sent to that server with the
//! server's own key. A forged or stale key does nothing.
//!
//! Race: a cancel must never hit the *next* client's query on the same server. The session
//! clears its target and waits for in-flight cancels under the same lock the cancel path uses
//! to read the target, so a server is only returned to the pool once no cancel aimed at it can
//! still be sent. A cancel PostgreSQL did not confirm (it closes the cancel connection once
//! it has signalled the backend) may still be acted on later, so the server it aimed at is
//! marked unsettled and closed instead of handed on.
//!
//! Peering (several instances behind one load balancer, PgBouncer's `peer_id`): a client's
//! CancelRequest arrives on a new connection that may land on another instance. With
//! `listen.peer_id` set, keys carry the issuing instance's id in pid bits 17..31 and a hop
//! budget (TTL 3) in the secret's low 2 bits; an instance that receives a key of another id
//! forwards the 16 bytes to that peer with the TTL decremented, so a misconfigured ring of peers
//! cannot forward a request forever. 17 bits of pid and 30 of secret stay random.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;

use crate::config::PeerConfig;
use crate::idhash::IdHash;
use crate::net::ServerAddr;
use crate::proto::startup::CancelKey;

/// Connecting to a peer and handing it a cancel must not take longer than this.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct SlotInner {
    target: Option<(ServerAddr, CancelKey)>,
}

/// Per-client: which server (if any) a cancel should go to right now.
#[derive(Debug, Default)]
pub struct CancelSlot {
    inner: Mutex<SlotInner>,
    in_flight: AtomicU32,
    /// A cancel was sent to the current target and PostgreSQL did not confirm it in time.
    unsettled: AtomicBool,
}

impl CancelSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[inline]
    pub fn set_target(&self, addr: ServerAddr, key: CancelKey) {
        self.lock().target = Some((addr, key));
    }

    /// Clears the target; returns true when no cancel is in flight any more, so the server may
    /// be handed on. The caller retries (after yielding) while this returns false.
    #[inline]
    pub fn clear_target(&self) -> bool {
        let mut inner = self.lock();
        inner.target = None;
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Takes the current target and marks a cancel in flight (under the lock, see module docs).
    fn begin_cancel(&self) -> Option<(ServerAddr, CancelKey)> {
        let inner = self.lock();
        let target = inner.target.clone()?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(target)
    }

    /// `settled`: PostgreSQL confirmed the cancel, or it cannot have reached PostgreSQL.
    fn end_cancel(&self, settled: bool) {
        if !settled {
            // Before in_flight drops, so the session that sees no cancel in flight sees this.
            self.unsettled.store(true, Ordering::Release);
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether a cancel aimed at the current server might still be acted on by PostgreSQL.
    #[inline]
    pub fn unsettled(&self) -> bool {
        self.unsettled.load(Ordering::Acquire)
    }

    /// [`CancelSlot::unsettled`], clearing it: the caller closes that server.
    pub fn take_unsettled(&self) -> bool {
        self.unsettled.swap(false, Ordering::AcqRel)
    }
}

struct Entry {
    secret: i32,
    slot: Arc<CancelSlot>,
}

/// Where the peer id sits in a pid.
const PEER_SHIFT: u32 = 17;
const PEER_MASK: u32 = 0x3fff;
/// Hop budget of a forwarded cancel, in the secret's low bits.
const TTL_MASK: i32 = 0b11;

/// The peer id a key was issued by (0 when the issuer does not peer).
pub fn peer_of(key: CancelKey) -> u16 {
    ((key.pid as u32 >> PEER_SHIFT) & PEER_MASK) as u16
}

/// What happened to CancelRequests, for metrics.
#[derive(Debug, Default)]
pub struct CancelStats {
    /// Sent to the server of one of this instance's clients.
    pub delivered: AtomicU64,
    /// The client held no server (its query had finished).
    pub idle_client: AtomicU64,
    /// No client of this instance has the key (stale or forged).
    pub unknown_key: AtomicU64,
    /// Passed on to the peer that issued the key.
    pub forwarded: AtomicU64,
    /// Issued by a peer id not in `[[peers]]`, or the peer could not be reached.
    pub unroutable: AtomicU64,
    /// Dropped after three hops between peers.
    pub ttl_exhausted: AtomicU64,
}

impl CancelStats {
    /// (label, count) pairs for the metrics endpoint.
    pub fn by_result(&self) -> [(&'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("delivered", get(&self.delivered)),
            ("idle_client", get(&self.idle_client)),
            ("unknown_key", get(&self.unknown_key)),
            ("forwarded", get(&self.forwarded)),
            ("unroutable", get(&self.unroutable)),
            ("ttl_exhausted", get(&self.ttl_exhausted)),
        ]
    }
}

/// Every logged-in client's key, by pid.
#[derive(Default)]
pub struct CancelRegistry {
    entries: DashMap<i32, Entry, IdHash>,
    /// This instance's `listen.peer_id`; 0 = no peering. Fixed for the process's life, since
    /// keys already issued carry it.
    peer_id: u16,
    pub stats: CancelStats,
}

impl CancelRegistry {
    pub fn new(peer_id: u16) -> Self {
        CancelRegistry {
            peer_id,
            ..Default::default()
        }
    }

    pub fn peer_id(&self) -> u16 {
        self.peer_id
    }

    /// Issues a fresh random key for a client and registers its slot. Pids are random too (not
    /// sequential), so keys cannot be enumerated; the sign bit is cleared because some drivers
    /// print or parse pids as positive numbers.
    pub fn register(&self, slot: Arc<CancelSlot>) -> CancelKey {
        loop {
            let random = rand::random::<u32>() & 0x7fff_ffff;
            let (pid, secret) = match self.peer_id {
                0 => (random as i32, rand::random::<i32>()),
                id => (
                    ((u32::from(id) << PEER_SHIFT) | (random & ((1 << PEER_SHIFT) - 1))) as i32,
                    (rand::random::<i32>() & !TTL_MASK) | TTL_MASK,
                ),
            };
            if pid == 0 {
                continue;
            }
            if let dashmap::Entry::Vacant(v) = self.entries.entry(pid) {
                v.insert(Entry { secret, slot });
                return CancelKey { pid, secret };
            }
        }
    }

    pub fn unregister(&self, key: CancelKey) {
        self.entries.remove(&key.pid);
    }

    /// Handles a CancelRequest: returns once the cancel has been delivered (or forwarded to the
    /// peer that issued the key), or at once if the key is unknown or its client holds no server.
    pub async fn cancel(&self, key: CancelKey, peers: &BTreeMap<u16, PeerConfig>) {
        if self.peer_id != 0 && peer_of(key) != self.peer_id {
            return self.forward(key, peers).await;
        }
        // With peering, the TTL bits may have been decremented on the way: they are not part
        // of the secret.
        let mask = if self.peer_id == 0 { !0 } else { !TTL_MASK };
        let slot = match self.entries.get(&key.pid) {
            Some(e)
                if bool::from(
                    (e.secret & mask)
                        .to_be_bytes()
                        .ct_eq(&(key.secret & mask).to_be_bytes()),
                ) =>
            {
                e.slot.clone()
            }
            _ => {
                self.stats.unknown_key.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(pid = key.pid, "cancel request with an unknown key ignored");
                return;
            }
        };
        let Some((addr, server_key)) = slot.begin_cancel() else {
            self.stats.idle_client.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("cancel request for an idle client ignored");
            return;
        };
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        // In a task of its own and bounded: this runs under the cancel connection's
        // client_login_timeout, and a drop between begin_cancel and end_cancel would leave the
        // target session waiting for the cancel to finish for ever, holding its server.
        let _ = tokio::spawn(async move {
            let settled =
                match tokio::time::timeout(FORWARD_TIMEOUT, crate::server::send_cancel(&addr, server_key)).await {
                    Ok(Ok(true)) => true,
                    // Nothing complete reached PostgreSQL: it ignores a partial CancelRequest.
                    Ok(Err(e)) => {
                        tracing::warn!(%addr, error = %e, "could not forward a cancel request");
                        true
                    }
                    Ok(Ok(false)) | Err(_) => {
                        tracing::warn!(
                            %addr,
                            "PostgreSQL did not confirm a forwarded cancel request in time; the server \
                             connection it aimed at will be closed, not reused, so a late cancel cannot hit \
                             another client's query"
                        );
                        false
                    }
                };
            slot.end_cancel(settled);
        })
        .await;
    }

    async fn forward(&self, key: CancelKey, peers: &BTreeMap<u16, PeerConfig>) {
        let owner = peer_of(key);
        let ttl = key.secret & TTL_MASK;
        if ttl == 0 {
            self.stats.ttl_exhausted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                peer = owner,
                "failed to forward cancel request because its TTL was exhausted"
            );
            return;
        }
        let Some(peer) = peers.get(&owner) else {
            self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = owner, "cancel request for a peer not in [[peers]] ignored");
            return;
        };
        let key = CancelKey {
            pid: key.pid,
            secret: (key.secret & !TTL_MASK) | (ttl - 1),
        };
        let mut packet = bytes::BytesMut::with_capacity(16);
        crate::proto::messages::cancel_request(&mut packet, key);
        let send = async {
            // A peer on the same host may be reachable only by its Unix socket (host = "/dir").
            let mut stream = crate::net::connect(&peer.host, peer.port, None).await?;
            stream.write_all(&packet).await?;
            stream.shutdown().await
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, send).await {
            Ok(Ok(())) => {
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = owner, host = %peer.host, port = peer.port, error = %e, "could not forward a cancel request to its peer");
            }
            Err(_) => {
                self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = owner, host = %peer.host, port = peer.port, "forwarding a cancel request to its peer timed out");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peering_keys_carry_the_peer_id_and_a_ttl_of_three() {
        for id in [1u16, 2, 777, 16_383] {
            let registry = CancelRegistry::new(id);
            for _ in 0..200 {
                let key = registry.register(Arc::new(CancelSlot::default()));
                assert_eq!(peer_of(key), id);
                assert!(key.pid > 0, "positive pid");
                assert_eq!(key.secret & TTL_MASK, 3);
            }
        }
        let plain = CancelRegistry::new(0);
        let key = plain.register(Arc::new(CancelSlot::default()));
        assert!(key.pid > 0);
    }
}
