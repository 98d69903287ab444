//! Admission of new connections, for every TLS listener: a cap on open connections and one per
//! source address (IPv6 per /64), decided at accept time, never by leaving clients in the
//! kernel's backlog. At the cap, the oldest connection that has not finished its TLS handshake
//! is shed to make room (a peer that completes no handshake is the cheapest attack there is);
//! only when every open connection has finished one is the newcomer refused. Once the
//! listener is more than half full, new connections get the short `busy_handshake_timeout`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections per source address at most.
    pub max_per_address: usize,
    /// Time for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Time for a TLS handshake once more than half of `max_connections` are open.
    pub busy_handshake_timeout: Duration,
}

#[derive(Default)]
struct State {
    open: usize,
    per_address: HashMap<IpAddr, usize>,
    /// Connections still in their handshake, oldest first, with the signal that sheds them.
    handshaking: BTreeMap<u64, Arc<Notify>>,
    next: u64,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_per_address` connections from this address are open.
    PerAddress,
    /// `max_connections` are open and all of them have finished their handshake.
    Full,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::PerAddress => "the connection limit per source address is reached",
            Refusal::Full => "the connection limit is reached and every connection has finished its handshake",
        })
    }
}

/// The gate of one listener.
pub struct Gate {
    limits: GateLimits,
    state: Mutex<State>,
    idle: Notify,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("limits", &self.limits).field("open", &self.open()).finish()
    }
}

impl Gate {
    /// A gate with these limits.
    pub fn new(limits: GateLimits) -> Arc<Self> {
        Arc::new(Self { limits, state: Mutex::default(), idle: Notify::new() })
    }

    /// The limits.
    pub fn limits(&self) -> GateLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.lock().open
    }

    /// Admits a connection from `ip`, shedding the oldest unfinished handshake when full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let key = crate::source::address_key(ip);
        let mut s = self.lock();
        if s.per_address.get(&key).copied().unwrap_or(0) >= self.limits.max_per_address {
            return Err(Refusal::PerAddress);
        }
        if s.open >= self.limits.max_connections {
            let Some((_, shed)) = s.handshaking.pop_first() else { return Err(Refusal::Full) };
            // It leaves as soon as its task sees this; its count goes with it.
            shed.notify_one();
        }
        s.open += 1;
        *s.per_address.entry(key).or_insert(0) += 1;
        let seq = s.next;
        s.next += 1;
        let shed = Arc::new(Notify::new());
        s.handshaking.insert(seq, shed.clone());
        let busy = s.open * 2 > self.limits.max_connections;
        let budget = if busy { self.limits.busy_handshake_timeout } else { self.limits.handshake_timeout };
        Ok(Ticket { gate: self.clone(), key, seq, shed, budget, busy })
    }

    /// Waits until no connection is open, at most `timeout`; whether that happened.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.idle.notified();
                if self.open() == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }
}

/// How a handshake ended without a connection.
#[derive(Debug)]
pub enum HandshakeError<E> {
    /// It failed.
    Failed(E),
    /// It took longer than its budget.
    TimedOut(Duration),
    /// It was shed to make room for a newer connection.
    Shed,
}

/// An admitted connection: counted until dropped.
pub struct Ticket {
    gate: Arc<Gate>,
    key: IpAddr,
    seq: u64,
    shed: Arc<Notify>,
    budget: Duration,
    busy: bool,
}

impl Ticket {
    /// Runs the TLS handshake within its budget, unless the connection is shed first; then it
    /// counts as established and is never shed.
    pub async fn handshake<T, E>(
        &self,
        handshake: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, HandshakeError<E>> {
        let result = tokio::select! {
            r = tokio::time::timeout(self.budget, handshake) => match r {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(e)) => Err(HandshakeError::Failed(e)),
                Err(_) => Err(HandshakeError::TimedOut(self.budget)),
            },
            _ = self.shed.notified() => Err(HandshakeError::Shed),
        };
        self.gate.lock().handshaking.remove(&self.seq);
        result
    }

    /// Whether the listener was more than half full when this connection came (it got the
    /// short handshake budget).
    pub fn admitted_busy(&self) -> bool {
        self.busy
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.handshaking.remove(&self.seq);
        s.open = s.open.saturating_sub(1);
        if let Some(n) = s.per_address.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                s.per_address.remove(&self.key);
            }
        }
        let idle = s.open == 0;
        drop(s);
        if idle {
            self.gate.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize, per: usize) -> Arc<Gate> {
        Gate::new(GateLimits {
            max_connections: max,
            max_per_address: per,
            handshake_timeout: Duration::from_secs(10),
            busy_handshake_timeout: Duration::from_millis(50),
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_limit() {
        let g = gate(10, 2);
        let a = g.admit(ip("10.0.0.1")).unwrap();
        let _b = g.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(g.admit(ip("10.0.0.1")).err(), Some(Refusal::PerAddress));
        assert!(g.admit(ip("10.0.0.2")).is_ok(), "another address");
        drop(a);
        assert!(g.admit(ip("10.0.0.1")).is_ok(), "a slot came free");
        // IPv6 counts per /64; IPv4-mapped as IPv4.
        let _c = g.admit(ip("2001:db8::1")).unwrap();
        let _d = g.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(g.admit(ip("2001:db8::ffff")).err(), Some(Refusal::PerAddress));
        let _e = g.admit(ip("10.0.0.2")).unwrap();
        let _f = g.admit(ip("::ffff:10.0.0.2")).unwrap();
        assert_eq!(g.admit(ip("10.0.0.2")).err(), Some(Refusal::PerAddress), "mapped counts as IPv4");
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_unfinished_handshake_is_shed() {
        let g = gate(2, 10);
        let old = g.admit(ip("10.0.0.1")).unwrap();
        let done = g.admit(ip("10.0.0.2")).unwrap();
        done.handshake(async { Ok::<_, ()>(()) }).await.unwrap();
        let newcomer = g.admit(ip("10.0.0.3")).unwrap();
        let r = old.handshake(std::future::pending::<Result<(), ()>>()).await;
        assert!(matches!(r, Err(HandshakeError::Shed)), "the old handshake was shed");
        drop(old);
        assert_eq!(g.open(), 2);
        // Now both open connections are past or in a handshake: the newest is sheddable.
        newcomer.handshake(async { Ok::<_, ()>(()) }).await.unwrap();
        assert_eq!(g.admit(ip("10.0.0.4")).err(), Some(Refusal::Full), "all established: refused");
        drop(done);
        drop(newcomer);
        assert!(g.wait_idle(Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn busy_listeners_give_short_handshakes() {
        let g = gate(4, 10);
        let a = g.admit(ip("10.0.0.1")).unwrap();
        let b = g.admit(ip("10.0.0.1")).unwrap();
        assert!(!a.admitted_busy() && !b.admitted_busy());
        let c = g.admit(ip("10.0.0.1")).unwrap();
        assert!(c.admitted_busy(), "more than half full");
        let r = c.handshake(std::future::pending::<Result<(), ()>>()).await;
        assert!(matches!(r, Err(HandshakeError::TimedOut(d)) if d == Duration::from_millis(50)));
    }
}
