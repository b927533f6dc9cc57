//! Bounds on connections, shared by every listener Ferry opens: the broker's Kafka port, the
//! gateway's admin API and its QUIC endpoint.
//!
//! Owns: counting open connections in all and per client address ([`Gate`]: a connection
//! past either cap is refused at once, with a log line and a metric), and the memory budget of
//! requests being read ([`Budget`]: a connection takes room for the bytes it is about to read
//! and waits when there is none, so memory follows what arrived, never what a length prefix
//! announced). Does not own: the settings ([`crate::config::ConnectionLimits`]) or the timeouts,
//! which each listener applies around its own reads.
//!
//! Every refusal increments `ferry_connections_refused_total{listener, reason}`.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default `frame_bytes_max` of a broker: larger requests close the connection unread.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 100 << 20;

/// What a listener allows its connections (Kafka's `max.connections`,
/// `max.connections.per.ip`, `connections.max.idle.ms`, `queued.max.request.bytes`). The
/// broker's Kafka port, the gateway's admin API and its QUIC endpoint each apply them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections at most; more are closed at once (with a log line and a metric).
    pub connections_max: usize,
    /// Open connections from one IP address at most.
    pub connections_per_address_max: usize,
    /// A connection with no request in progress and no answer pending for this long is closed.
    pub idle_timeout: Duration,
    /// A request must arrive whole within this long of its first byte (time spent waiting for
    /// the memory budget does not count); a slower one closes the connection.
    pub request_read_timeout: Duration,
    /// Bytes of requests being read or served, across all connections, at most: a connection
    /// waits for room (and reads nothing meanwhile) instead of allocating past it.
    pub request_memory_max: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            connections_max: 10_000,
            connections_per_address_max: 1_000,
            idle_timeout: Duration::from_secs(600),
            request_read_timeout: Duration::from_secs(30),
            request_memory_max: 256 << 20,
        }
    }
}

/// Count one refusal of a connection (or of a request that closed its connection).
pub fn refused(listener: &'static str, reason: &'static str) {
    metrics::counter!("ferry_connections_refused_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// Why a new connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `connections_max` connections are open.
    Total(usize),
    /// `connections_per_address_max` connections from this address are open.
    PerAddress(usize),
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Total(_) => "connections_max",
            Refusal::PerAddress(_) => "connections_per_address_max",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Total(n) => write!(f, "{n} connections are open (connections_max)"),
            Refusal::PerAddress(n) => write!(
                f,
                "{n} connections from this address are open (connections_per_address_max)"
            ),
        }
    }
}

/// Open connections of one listener, in all and per client address.
#[derive(Debug)]
pub struct Gate {
    listener: &'static str,
    total_max: usize,
    per_address_max: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Gate {
    pub fn new(listener: &'static str, total_max: usize, per_address_max: usize) -> Arc<Gate> {
        Arc::new(Gate {
            listener,
            total_max,
            per_address_max,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// Admit a connection from `ip`, or say why not (counted in the refusal metric).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        let mut g = self.open.lock().expect("gate lock");
        let (total, per) = &mut *g;
        let from_ip = per.get(&ip).copied().unwrap_or(0);
        let refusal = if *total >= self.total_max {
            Some(Refusal::Total(*total))
        } else if from_ip >= self.per_address_max {
            Some(Refusal::PerAddress(from_ip))
        } else {
            None
        };
        if let Some(r) = refusal {
            refused(self.listener, r.reason());
            return Err(r);
        }
        *total += 1;
        *per.entry(ip).or_insert(0) += 1;
        Ok(Admitted {
            gate: self.clone(),
            ip,
        })
    }

    /// Connections open now (in all, from `ip`).
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let g = self.open.lock().expect("gate lock");
        (g.0, g.1.get(&ip).copied().unwrap_or(0))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut g = self.gate.open.lock().expect("gate lock");
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// The memory budget of requests being read and served, in bytes.
#[derive(Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    max: usize,
}

/// Room taken from a [`Budget`]; dropping it gives the room back.
#[derive(Debug)]
pub struct Room {
    permit: Option<OwnedSemaphorePermit>,
}

impl Room {
    pub fn empty() -> Room {
        Room { permit: None }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    fn add(&mut self, p: OwnedSemaphorePermit) {
        match &mut self.permit {
            Some(have) => have.merge(p),
            None => self.permit = Some(p),
        }
    }
}

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            sem: Arc::new(Semaphore::new(max)),
            max,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// Add `bytes` of room to `room`, waiting while the budget has none. Returns whether it had
    /// to wait. `bytes` must not exceed the budget (callers cap chunks well below it).
    pub async fn take(&self, room: &mut Room, bytes: usize) -> bool {
        assert!(bytes <= self.max, "a chunk larger than the whole budget");
        let n = u32::try_from(bytes).expect("chunks are small");
        if let Ok(p) = self.sem.clone().try_acquire_many_owned(n) {
            room.add(p);
            return false;
        }
        metrics::counter!("ferry_request_memory_waits_total").increment(1);
        let p = self
            .sem
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the budget's semaphore is never closed");
        room.add(p);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_caps_in_all_and_per_address() {
        let g = Gate::new("test", 3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = g.admit(a).unwrap();
        let _a2 = g.admit(a).unwrap();
        assert_eq!(g.admit(a).unwrap_err(), Refusal::PerAddress(2));
        let _b1 = g.admit(b).unwrap();
        assert_eq!(g.admit(b).unwrap_err(), Refusal::Total(3));
        drop(a1);
        assert_eq!(g.open(a), (2, 1));
        let _b2 = g.admit(b).unwrap();
    }

    #[tokio::test]
    async fn budget_waits_for_room_instead_of_going_past_it() {
        let budget = Budget::new(100);
        let mut r1 = Room::empty();
        assert!(!budget.take(&mut r1, 60).await);
        assert!(!budget.take(&mut r1, 40).await);
        assert_eq!(r1.bytes(), 100);
        assert_eq!(budget.available(), 0);
        let b2 = budget.clone();
        let waiter = tokio::spawn(async move {
            let mut r2 = Room::empty();
            let waited = b2.take(&mut r2, 10).await;
            (waited, r2.bytes())
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "no room: the second reader waits");
        drop(r1);
        assert_eq!(waiter.await.unwrap(), (true, 10));
        assert_eq!(budget.available(), 100);
    }
}
