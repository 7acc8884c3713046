//! A NAT in front of a simulated host, as home routers and Linux
//! masquerading behave: a datagram from inside gets a public source port,
//! and a datagram from outside comes in only from where the inside has sent
//! to through that port (address-and-port-dependent filtering). What
//! differs is the mapping:
//!
//! - endpoint-independent: one public port per inside socket, whatever the
//!   destination, so a peer that learns it from the server can use it once
//!   the inside has sent to that peer (hole punching);
//! - symmetric: a new public port per destination, so the port the server
//!   sees is useless to a peer (only a relay gets through).
//!
//! Either may rebind: forget every mapping, as a NAT that reboots or times
//! out, so the inside sockets come out on new ports. Neither hairpins: a
//! datagram from inside to the NAT's own public address is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// One public port per inside socket (hole punching opens it).
    EndpointIndependent,
    /// One public port per inside socket and destination.
    Symmetric,
}

#[derive(Debug)]
pub struct Nat {
    pub kind: NatKind,
    /// The NAT's public address.
    pub public: IpAddr,
    /// (inside socket, destination for a symmetric NAT) → public port.
    map: BTreeMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// Public port → its inside socket and the destinations sent to.
    ports: BTreeMap<u16, (SocketAddr, BTreeSet<SocketAddr>)>,
    /// The last port handed out: ports are never reused, so a rebinding
    /// always moves the inside somewhere new.
    last: u16,
}

impl Nat {
    pub fn new(kind: NatKind, public: IpAddr) -> Nat {
        Nat {
            kind,
            public,
            map: BTreeMap::new(),
            ports: BTreeMap::new(),
            last: 40_000,
        }
    }

    fn key(&self, from: SocketAddr, to: SocketAddr) -> (SocketAddr, Option<SocketAddr>) {
        (from, (self.kind == NatKind::Symmetric).then_some(to))
    }

    /// The public source of a datagram from the inside socket `from` to
    /// `to`; it lets `to` answer through that port from now on.
    pub fn outbound(&mut self, from: SocketAddr, to: SocketAddr) -> SocketAddr {
        let key = self.key(from, to);
        let port = match self.map.get(&key) {
            Some(&port) => port,
            None => {
                self.last = self.last.checked_add(1).unwrap_or(40_001);
                let port = self.last;
                self.map.insert(key, port);
                self.ports.insert(port, (from, BTreeSet::new()));
                port
            }
        };
        if let Some((_, sent_to)) = self.ports.get_mut(&port) {
            sent_to.insert(to);
        }
        SocketAddr::new(self.public, port)
    }

    /// The inside socket a datagram from `from` to the public `to` reaches,
    /// if the NAT lets it in.
    pub fn inbound(&self, to: SocketAddr, from: SocketAddr) -> Option<SocketAddr> {
        // No hairpinning (as Linux masquerading): the inside cannot reach
        // itself through the public address.
        if to.ip() != self.public || from.ip() == self.public {
            return None;
        }
        let (inside, sent_to) = self.ports.get(&to.port())?;
        sent_to.contains(&from).then_some(*inside)
    }

    /// Where the inside socket `from` appears to `to`, if it has sent there.
    pub fn mapped(&self, from: SocketAddr, to: SocketAddr) -> Option<SocketAddr> {
        let port = self.map.get(&self.key(from, to))?;
        Some(SocketAddr::new(self.public, *port))
    }

    /// Forgets every mapping: the next datagram from inside leaves from a
    /// new port, and nothing from outside comes in until it has.
    pub fn rebind(&mut self) {
        self.map.clear();
        self.ports.clear();
    }
}
