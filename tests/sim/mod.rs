//! An in-memory network for the sans-IO state machines: one `Server`, any
//! number of `Client`s, virtual time that jumps to the next deadline, and
//! per-datagram drop rules. No sockets, no sleeps, no threads.

#![allow(dead_code)]

pub mod nat;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use udpchat::crypto::{Keypair, PublicKey, ServerSecrets};
use udpchat::store::{MailboxLimits, MemoryStore, Outcome, Store, StoreOp};
use udpchat::wire::{self, MailId, Name, What};
use udpchat::{
    Client, ClientConfig, Event, Remote, Server, ServerConfig, ServerEvent, StoreFailure, console,
};

use nat::{Nat, NatKind};

/// One-way latency of every link.
pub const LATENCY: Duration = Duration::from_millis(1);
/// Unix time of the simulation's start, for stored-message timestamps.
pub const EPOCH_UNIX: i64 = 1_700_000_000;

/// A datagram in flight: its bytes are encrypted; `what` is what its
/// sender put in (`None`: injected by a test, as an attacker would).
#[derive(Debug, Clone)]
pub struct Packet {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub what: Option<What>,
    pub payload: Vec<u8>,
}

impl Packet {
    /// Whether it carries `w`.
    pub fn is(&self, w: What) -> bool {
        self.what == Some(w)
    }
}

/// Decides whether a packet is lost; `true` drops it.
pub type DropRule = Box<dyn FnMut(&Packet) -> bool>;

pub struct Node {
    pub client: Client,
    /// Its socket's address (inside its NAT, if it has one).
    pub addr: SocketAddr,
    /// The NAT it sits behind, if any: its datagrams leave from the NAT's
    /// public address, and only what the NAT lets in reaches it.
    pub nat: Option<Nat>,
    /// A dead node (crashed, silent leave) neither receives nor sends.
    pub alive: bool,
    pub lines: Vec<String>,
    /// The presence lines (`[Bob is online.]`…), kept apart so that the
    /// flow tests' line lists stay SPEC's.
    pub presence: Vec<String>,
    /// Every event it gave, as given (ids and all).
    pub events: Vec<Event>,
    pub exit: Option<i32>,
    /// Typed lines waiting for the first registration, as the binary
    /// holds them.
    pub console: console::Console,
}

/// Another server of a cluster beside the simulation's own (same key, a
/// store of its own: these test routing, not shared mail).
pub struct Peer {
    pub addr: SocketAddr,
    pub server: Server,
    pub store: MemoryStore,
    pub up: bool,
}

pub struct Sim {
    pub start: Instant,
    pub now: Instant,
    pub server: Server,
    pub server_addr: SocketAddr,
    pub server_up: bool,
    pub store: MemoryStore,
    /// While set, every commit fails so.
    pub store_fails: Option<StoreFailure>,
    /// Mailboxes the server asks for cannot be read (its commits may
    /// still go through).
    pub mailboxes_fail: bool,
    /// While set, store operations are polled but not committed (nothing
    /// leaves the server) until [`Sim::release`].
    pub hold: bool,
    held: Vec<StoreOp>,
    /// Operations sealed as the batch under commit ([`Sim::seal`]).
    sealed: Vec<StoreOp>,
    /// Every event the server logged.
    pub events: Vec<ServerEvent>,
    /// Every event the cluster's other servers logged.
    pub peer_events: Vec<ServerEvent>,
    /// Copies the store refused for a full mailbox ([`Outcome::Full`]).
    pub refused_full: usize,
    pub nodes: Vec<Node>,
    /// Delivery time → packets, in send order.
    queue: BTreeMap<(Instant, u64), Packet>,
    sent: u64,
    pub drop_rules: Vec<DropRule>,
    /// Every packet that was sent, for assertions on the wire.
    pub log: Vec<Packet>,
    /// The other servers of a cluster ([`Sim::cluster`]).
    pub peers: Vec<Peer>,
    /// The cluster shares one store ([`Sim::shared_cluster`]): every
    /// server commits to `store`, and what one commits reaches the others
    /// through `feed`, as the replicated store's feed carries it.
    pub shared: bool,
    feed: std::collections::VecDeque<(SocketAddr, Vec<Remote>)>,
    /// While set, committed changes wait in the feed (servers that have
    /// not read it yet).
    pub feed_held: bool,
}

pub fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The key of a client name: the same name gets the same key, as one user
/// keeps one key file.
pub fn key_of(name: &str) -> Keypair {
    let mut secret = [0x42u8; 32];
    for (i, b) in name.bytes().enumerate() {
        secret[i % 32] ^= b.wrapping_add(i as u8);
    }
    Keypair::from_secret(secret)
}

/// The server's key.
pub fn server_key() -> Keypair {
    Keypair::from_secret([0x53; 32])
}

/// Renders stored-message times as `T+<seconds since start>`.
pub fn sim_time(unix: i64) -> String {
    format!("T+{}", unix - EPOCH_UNIX)
}

impl Sim {
    pub fn new() -> Sim {
        let start = Instant::now();
        let config = ServerConfig::new([1; 32], server_key(), (start, EPOCH_UNIX));
        let server = Server::new(config, start, Default::default());
        Sim {
            start,
            now: start,
            server,
            server_addr: addr(1024),
            server_up: true,
            store: MemoryStore::new(),
            store_fails: None,
            mailboxes_fail: false,
            hold: false,
            held: Vec::new(),
            sealed: Vec::new(),
            events: Vec::new(),
            nodes: Vec::new(),
            queue: BTreeMap::new(),
            sent: 0,
            drop_rules: Vec::new(),
            log: Vec::new(),
            peers: Vec::new(),
            shared: false,
            feed: Default::default(),
            feed_held: false,
            peer_events: Vec::new(),
            refused_full: 0,
        }
    }

    /// [`Sim::cluster`] on one shared store: mail, presence and the table
    /// cross servers. Each server has its own instance number (mail ids).
    pub fn shared_cluster(&mut self, n: u16) {
        self.shared_cluster_with(n, |_| {});
    }

    /// [`Sim::shared_cluster`] with every server's config changed by
    /// `tweak`.
    pub fn shared_cluster_with(&mut self, n: u16, tweak: impl Fn(&mut ServerConfig)) {
        assert!(
            self.nodes.is_empty(),
            "a cluster is made before its clients"
        );
        let config = |port: u16, start| {
            let mut c = ServerConfig::new([port as u8; 32], server_key(), (start, EPOCH_UNIX));
            c.instance = Some(port - 1024);
            tweak(&mut c);
            c
        };
        let first = config(1024, self.start);
        // The store counts every mailbox across the servers, as
        // PostgreSQL does, and refuses what goes over the servers' limits.
        self.store = MemoryStore::with_limits(MailboxLimits {
            messages: first.mailbox_messages,
            bytes: first.mailbox_bytes,
            ttl: first.mail_ttl,
        });
        self.server = Server::new(first, self.now, Default::default());
        self.shared = true;
        self.cluster(n);
        for p in &mut self.peers {
            p.server = Server::new(
                config(p.addr.port(), self.start),
                self.now,
                Default::default(),
            );
        }
        let live: Vec<SocketAddr> = (1024..1024 + n).map(addr).collect();
        self.set_live(&live);
    }

    /// What a commit of `ops` by the server at `origin` tells the others.
    fn publish(&mut self, origin: SocketAddr, ops: &[StoreOp]) {
        if !self.shared {
            return;
        }
        let changes: Vec<Remote> = (ops.iter())
            .filter_map(|op| match op {
                StoreOp::Put(m) => Some(Remote::Mail(m.clone())),
                StoreOp::Channel(c) => Some(Remote::Channel(c.clone())),
                StoreOp::Delete { to, mail } => Some(Remote::Deleted {
                    to: to.clone(),
                    mail: *mail,
                }),
                // As the store has it when read (the first key committed
                // for a name is its key), as the replicated store reads it.
                StoreOp::Client(c) => (self.store.load().ok()?.clients.into_iter())
                    .find(|row| row.name == c.name)
                    .map(Remote::Client),
                StoreOp::Presence {
                    name,
                    addr,
                    online,
                    epoch,
                } => Some(Remote::Presence {
                    name: name.clone(),
                    addr: *addr,
                    online: *online,
                    server: origin,
                    epoch: *epoch,
                }),
                StoreOp::Forget(_) | StoreOp::Rewrite { .. } => None,
            })
            .collect();
        if !changes.is_empty() {
            self.feed.push_back((origin, changes));
        }
    }

    /// Messages as the store has them when the feed is read, as the
    /// replicated store reads the rows a feed entry names: one deleted
    /// meanwhile (acked, expired) is not brought.
    fn as_stored_now(&mut self, changes: Vec<Remote>) -> Vec<Remote> {
        let mut names: Vec<Name> = Vec::new();
        for change in &changes {
            match change {
                Remote::Mail(m) => names.push(m.to.clone()),
                Remote::Channel(c) => names.extend(c.to.iter().cloned()),
                _ => {}
            }
        }
        if names.is_empty() {
            return changes;
        }
        names.sort();
        names.dedup();
        let stored: HashSet<(Name, MailId)> = (self.store.mailboxes(&names).unwrap().into_iter())
            .map(|m| (m.to, m.mail))
            .collect();
        (changes.into_iter())
            .filter_map(|change| match change {
                Remote::Mail(m) => stored
                    .contains(&(m.to.clone(), m.mail))
                    .then_some(Remote::Mail(m)),
                Remote::Channel(mut c) => {
                    c.to.retain(|to| stored.contains(&(to.clone(), c.mail)));
                    (!c.to.is_empty()).then_some(Remote::Channel(c))
                }
                other => Some(other),
            })
            .collect()
    }

    /// Hands every committed change to the other running servers.
    fn flow_feed(&mut self) {
        if self.feed_held {
            return;
        }
        while let Some((origin, changes)) = self.feed.pop_front() {
            let changes = self.as_stored_now(changes);
            let now = self.now;
            if self.server_up && self.server_addr != origin {
                self.server.handle_remote(now, changes.clone());
                self.drain_server();
            }
            for i in 0..self.peers.len() {
                if self.peers[i].up && self.peers[i].addr != origin {
                    self.peers[i].server.handle_remote(now, changes.clone());
                    self.drain_peer(i);
                }
            }
        }
    }

    /// Makes the server one of `n` servers of a cluster, at ports 1024 to
    /// 1024 + n - 1, all with its key, each told the others are live.
    pub fn cluster(&mut self, n: u16) {
        for port in 1025..1024 + n {
            let seed = [port as u8; 32];
            let config = ServerConfig::new(seed, server_key(), (self.start, EPOCH_UNIX));
            self.peers.push(Peer {
                addr: addr(port),
                server: Server::new(config, self.now, Default::default()),
                store: MemoryStore::new(),
                up: true,
            });
        }
        let live: Vec<SocketAddr> = (1024..1024 + n).map(addr).collect();
        self.set_live(&live);
    }

    /// Tells every running server of the cluster which servers are live.
    pub fn set_live(&mut self, live: &[SocketAddr]) {
        if self.server_up {
            self.server.set_servers(self.server_addr, live);
        }
        for p in self.peers.iter_mut().filter(|p| p.up) {
            p.server.set_servers(p.addr, live);
        }
    }

    /// Hands every running server's output on (its commits to the store
    /// and the feed, its datagrams to the network), as a driver does after
    /// calling into it: for tests that call a server directly.
    pub fn drain_servers(&mut self) {
        if self.server_up {
            self.drain_server();
        }
        for i in 0..self.peers.len() {
            if self.peers[i].up {
                self.drain_peer(i);
            }
        }
        self.flow_feed();
    }

    /// The server of the cluster at `at`.
    pub fn server_at(&self, at: SocketAddr) -> &Server {
        if at == self.server_addr {
            return &self.server;
        }
        let peer = self.peers.iter().find(|p| p.addr == at);
        &peer.expect("a server of the cluster").server
    }

    /// A name (`prefix` and a number) whose home is the server at `home`.
    pub fn name_homed_at(&self, prefix: &str, home: SocketAddr) -> String {
        (0..1000)
            .map(|i| format!("{prefix}{i}"))
            .find(|n| self.server.home_of(&name(n)) == Some(home))
            .expect("some name lands on every server")
    }

    /// The server of the cluster at `at` stops (kill -9).
    pub fn stop_server_at(&mut self, at: SocketAddr) {
        if at == self.server_addr {
            self.server_up = false;
        }
        for p in self.peers.iter_mut().filter(|p| p.addr == at) {
            p.up = false;
        }
    }

    /// A simulation whose server has `config` changed from the defaults.
    pub fn with(config: impl FnOnce(&mut ServerConfig)) -> Sim {
        let mut s = Sim::new();
        let mut c = ServerConfig::new([1; 32], server_key(), (s.start, EPOCH_UNIX));
        config(&mut c);
        s.server = Server::new(c, s.now, Default::default());
        s
    }

    /// Starts a client and runs until its first registration settled.
    pub fn join(&mut self, n: &str, port: u16) -> usize {
        let i = self.spawn(n, port);
        self.run_until(Duration::from_secs(10), |s| {
            s.nodes[i].exit.is_some() || (s.nodes[i].client.is_idle() && s.quiet())
        });
        i
    }

    /// Starts a client without waiting (its key is its name's, the
    /// server's key pinned).
    pub fn spawn(&mut self, n: &str, port: u16) -> usize {
        self.spawn_keyed(n, port, key_of(n))
    }

    /// Starts a client with a key of its own choosing.
    pub fn spawn_keyed(&mut self, n: &str, port: u16, key: Keypair) -> usize {
        let pin = Some(self.server.public_key());
        self.spawn_with(n, port, key, pin)
    }

    /// Starts a client with a key and a pinned server key (`None`: first
    /// contact).
    pub fn spawn_with(
        &mut self,
        n: &str,
        port: u16,
        key: Keypair,
        server_key: Option<PublicKey>,
    ) -> usize {
        self.spawn_at(n, addr(port), key, server_key)
    }

    /// Starts a client at any address (another host's).
    pub fn spawn_at(
        &mut self,
        n: &str,
        at: SocketAddr,
        key: Keypair,
        server_key: Option<PublicKey>,
    ) -> usize {
        self.spawn_configured(n, at, key, server_key, |_| {})
    }

    /// [`Sim::spawn_at`] with the client's configuration changed by `tweak`.
    pub fn spawn_configured(
        &mut self,
        n: &str,
        at: SocketAddr,
        key: Keypair,
        server_key: Option<PublicKey>,
        tweak: impl FnOnce(&mut ClientConfig),
    ) -> usize {
        self.spawn_node(n, at, key, server_key, tweak, None)
    }

    /// Starts a client at `at`, behind `nat` if given.
    fn spawn_node(
        &mut self,
        n: &str,
        at: SocketAddr,
        key: Keypair,
        server_key: Option<PublicKey>,
        tweak: impl FnOnce(&mut ClientConfig),
        nat: Option<Nat>,
    ) -> usize {
        let mut seed = [0u8; 32];
        seed[..2].copy_from_slice(&at.port().to_le_bytes());
        seed[2] = self.nodes.len() as u8;
        let mut config = ClientConfig::new(name(n), self.server_addr, seed, key, server_key);
        tweak(&mut config);
        let client = Client::new(config, self.now);
        self.nodes.push(Node {
            client,
            addr: at,
            nat,
            alive: true,
            lines: Vec::new(),
            presence: Vec::new(),
            events: Vec::new(),
            exit: None,
            console: console::Console::new(false),
        });
        let i = self.nodes.len() - 1;
        self.drain_node(i);
        i
    }

    /// Starts a client behind a NAT of its own (public address
    /// 203.0.113.<n>, one per node) and runs until it registered.
    pub fn join_behind(&mut self, n: &str, port: u16, kind: NatKind) -> usize {
        let inside = SocketAddr::from(([10, 0, 0, 2], port));
        let public = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1 + self.nodes.len() as u8));
        let pin = Some(self.server.public_key());
        let nat = Some(Nat::new(kind, public));
        let i = self.spawn_node(n, inside, key_of(n), pin, |_| {}, nat);
        self.run_until(Duration::from_secs(10), |s| {
            s.nodes[i].exit.is_some() || (s.nodes[i].client.is_idle() && s.quiet())
        });
        i
    }

    /// Where node `i` appears to the server (its NAT's mapping, if any).
    pub fn seen_at(&self, i: usize) -> SocketAddr {
        let node = &self.nodes[i];
        match &node.nat {
            Some(nat) => nat.mapped(node.addr, self.server_addr).expect("mapped"),
            None => node.addr,
        }
    }

    /// Ends a [`Sim::hold`]: the held operations are committed, or fail so.
    pub fn release(&mut self, failure: Option<StoreFailure>) {
        self.hold = false;
        let ops = std::mem::take(&mut self.held);
        match failure {
            Some(f) => self.server.handle_commit_failed(self.now, f),
            None => self.commit_held(&ops),
        }
        self.drain_server();
    }

    /// Commits `ops`, held or sealed, to the store and reports what the
    /// store did with them ([`Store::outcomes`]), as a driver does.
    fn commit_held(&mut self, ops: &[StoreOp]) {
        self.store.commit(ops).unwrap();
        let outcomes = self.store.outcomes();
        self.refused_full += full_in(&outcomes);
        self.server.handle_committed_as(self.now, outcomes);
        self.publish(self.server_addr, ops);
    }

    /// While holding: the operations held so far become the batch under
    /// commit, as a driver with a store thread takes them; what comes next
    /// is held for the batch after it.
    pub fn seal(&mut self) {
        assert!(self.hold, "seal only while holding");
        self.sealed.extend(std::mem::take(&mut self.held));
        self.server.seal_batch();
    }

    /// Reports the sealed batch committed, or failed so (which takes the
    /// held operations with it, as a driver drops them); holding goes on.
    pub fn commit_sealed(&mut self, failure: Option<StoreFailure>) {
        let ops = std::mem::take(&mut self.sealed);
        match failure {
            Some(f) => {
                self.held.clear();
                self.server.handle_commit_failed(self.now, f);
            }
            None => self.commit_held(&ops),
        }
        self.drain_server();
    }

    /// Types a console line at client `i`.
    pub fn line(&mut self, i: usize, line: &str) {
        self.paste(i, &[line]);
    }

    /// Types lines at client `i` all at once (a paste: the binary reads
    /// them in one go), then runs what the client can take of them.
    pub fn paste(&mut self, i: usize, lines: &[&str]) {
        let node = &mut self.nodes[i];
        for line in lines {
            if let Some(refused) = node.console.push(&node.client, line.to_string()) {
                node.lines.extend(refused.lines);
            }
        }
        self.drain_node(i);
    }

    /// Types a line and runs until every operation it started is settled.
    pub fn command(&mut self, i: usize, line: &str) {
        self.line(i, line);
        self.settle();
    }

    /// Runs until no client has work in flight and the network is empty
    /// (at most a minute of virtual time).
    pub fn settle(&mut self) {
        self.run_until(Duration::from_secs(60), |s| {
            s.quiet()
                && s.nodes
                    .iter()
                    .all(|n| !n.alive || n.exit.is_some() || n.client.is_idle())
        });
    }

    /// No datagram in flight and the server has nothing under way.
    pub fn quiet(&self) -> bool {
        self.queue.is_empty()
            && (!self.server_up || self.server.is_idle())
            && self.peers.iter().all(|p| !p.up || p.server.is_idle())
    }

    /// Silent leave: the client stops, the server is not told.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// The server process stops.
    pub fn stop_server(&mut self) {
        self.server_up = false;
    }

    /// Advances virtual time by `d`, handling everything due on the way.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(d, |s| s.now >= end);
    }

    /// Runs until `done` holds or `limit` of virtual time passed. Returns
    /// whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            let Some(next) = self.next_deadline() else {
                // Nothing scheduled: time just passes.
                self.now = end;
                return done(self);
            };
            if next > end {
                self.now = end;
                return done(self);
            }
            self.now = self.now.max(next);
            self.step();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let packet = self.queue.keys().next().map(|(t, _)| *t);
        let server = if self.server_up {
            self.server.poll_timeout()
        } else {
            None
        };
        let peers = self.peers.iter().filter(|p| p.up);
        let server = server
            .into_iter()
            .chain(peers.filter_map(|p| p.server.poll_timeout()));
        let clients = self
            .nodes
            .iter()
            .filter(|n| n.alive && n.exit.is_none())
            .filter_map(|n| n.client.poll_timeout());
        packet.into_iter().chain(server).chain(clients).min()
    }

    /// Delivers due packets and fires due timers at `self.now`.
    fn step(&mut self) {
        let now = self.now;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let packet = entry.remove();
            self.deliver(packet);
            self.flow_feed();
        }
        if self.server_up {
            self.server.handle_timeout(now);
            self.drain_server();
        }
        for p in 0..self.peers.len() {
            if self.peers[p].up {
                self.peers[p].server.handle_timeout(now);
                self.drain_peer(p);
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive && self.nodes[i].exit.is_none() {
                self.nodes[i].client.handle_timeout(now);
                self.drain_node(i);
            }
        }
        self.flow_feed();
    }

    fn deliver(&mut self, p: Packet) {
        let now = self.now;
        let bytes = p.payload;
        if p.to == self.server_addr {
            if self.server_up {
                self.server.handle_datagram(now, p.from, &bytes);
                self.drain_server();
            }
            return;
        }
        if let Some(i) = self.peers.iter().position(|peer| peer.addr == p.to) {
            if self.peers[i].up {
                self.peers[i].server.handle_datagram(now, p.from, &bytes);
                self.drain_peer(i);
            }
            return;
        }
        // Through a NAT (only what it lets in), or straight to a node.
        let target = self.nodes.iter().position(|n| {
            let at = match &n.nat {
                Some(nat) => nat.inbound(p.to, p.from),
                None => Some(p.to),
            };
            at == Some(n.addr) && n.alive && n.exit.is_none()
        });
        if let Some(i) = target {
            self.nodes[i].client.handle_datagram(now, p.from, &bytes);
            self.drain_node(i);
        }
    }

    fn drain_server(&mut self) {
        loop {
            if self.mailboxes_fail {
                let names = self.server.poll_mailboxes();
                if !names.is_empty() {
                    let down = std::io::Error::from(std::io::ErrorKind::NotConnected);
                    self.server.handle_mailboxes(self.now, &names, Err(down));
                }
            }
            udpchat::store::serve_fetches(&mut self.server, &mut self.store, self.now);
            let ops: Vec<StoreOp> = std::iter::from_fn(|| self.server.poll_store()).collect();
            let mut committed = false;
            if self.hold {
                // The server holds back what waits for them.
                self.held.extend(ops);
            } else if !ops.is_empty() {
                match self.store_fails {
                    Some(failure) => self.server.handle_commit_failed(self.now, failure),
                    None => {
                        self.store.commit(&ops).unwrap();
                        let outcomes = self.store.outcomes();
                        self.refused_full += full_in(&outcomes);
                        self.server.handle_committed_as(self.now, outcomes);
                        self.publish(self.server_addr, &ops);
                        committed = true;
                    }
                }
            }
            while let Some(t) = self.server.poll_transmit() {
                let from = self.server_addr;
                self.enqueue(from, t.to, Some(t.what), t.payload);
            }
            while let Some(event) = self.server.poll_event() {
                self.events.push(event);
            }
            if !committed && !self.server.wants_fetch() {
                break;
            }
        }
    }

    /// A cluster peer's output, committed at once to its own store.
    fn drain_peer(&mut self, i: usize) {
        loop {
            let now = self.now;
            let peer = &mut self.peers[i];
            let store = match self.shared {
                true => &mut self.store,
                false => &mut peer.store,
            };
            udpchat::store::serve_fetches(&mut peer.server, store, now);
            let ops: Vec<StoreOp> = std::iter::from_fn(|| peer.server.poll_store()).collect();
            if !ops.is_empty() {
                store.commit(&ops).unwrap();
                let outcomes = store.outcomes();
                self.refused_full += full_in(&outcomes);
                peer.server.handle_committed_as(now, outcomes);
                let origin = peer.addr;
                self.publish(origin, &ops);
            }
            let peer = &mut self.peers[i];
            let from = peer.addr;
            let out: Vec<_> = std::iter::from_fn(|| peer.server.poll_transmit()).collect();
            self.peer_events
                .extend(std::iter::from_fn(|| peer.server.poll_event()));
            let again = !ops.is_empty() || peer.server.wants_fetch();
            for t in out {
                self.enqueue(from, t.to, Some(t.what), t.payload);
            }
            if !again {
                break;
            }
        }
    }

    /// Keeps one event of client `i`: as given, and as its console line.
    fn record(&mut self, i: usize, event: Event) {
        let node = &mut self.nodes[i];
        node.events.push(event.clone());
        if let Some(code) = console::exit_status(&event) {
            node.exit = Some(code);
        }
        let line = console::render(&event, sim_time);
        match event {
            Event::Presence { .. } | Event::PresenceMore(_) => node.presence.extend(line),
            _ => node.lines.extend(line),
        }
    }

    /// Shows, then sends: the client hands out a datagram only once the
    /// events before it were polled.
    fn drain_node(&mut self, i: usize) {
        loop {
            while let Some(event) = self.nodes[i].client.poll_event() {
                self.record(i, event);
            }
            // Then the next typed line the client can take, as the binary
            // runs them: after what came before it is shown.
            let (now, node) = (self.now, &mut self.nodes[i]);
            match node.console.run_next(&mut node.client, now) {
                Some(reply) => node.lines.extend(reply.lines),
                None => break,
            }
        }
        while let Some(t) = self.nodes[i].client.poll_transmit() {
            let node = &mut self.nodes[i];
            let from = match node.nat.as_mut() {
                Some(nat) => nat.outbound(node.addr, t.to),
                None => node.addr,
            };
            self.enqueue(from, t.to, Some(t.what), t.payload);
        }
    }

    /// Sends raw bytes from `from` (an attacker, a replay) into the network.
    pub fn inject(&mut self, from: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
        self.enqueue(from, to, None, payload);
    }

    fn enqueue(&mut self, from: SocketAddr, to: SocketAddr, what: Option<What>, payload: Vec<u8>) {
        assert!(payload.len() <= wire::MAX_DATAGRAM, "oversize datagram");
        let packet = Packet {
            from,
            to,
            what,
            payload,
        };
        self.log.push(packet.clone());
        for rule in &mut self.drop_rules {
            if rule(&packet) {
                return;
            }
        }
        self.sent += 1;
        self.queue.insert((self.now + LATENCY, self.sent), packet);
    }

    /// What is in `n`'s mailbox, opened with every key the simulation
    /// holds: (sender, channel, text), in store order.
    pub fn mailbox(&self, n: &str) -> Vec<(String, bool, String)> {
        let secrets = ServerSecrets::derive(&server_key());
        let to = name(n);
        self.server
            .mailbox(&to)
            .map(|m| {
                // The body is the store's (committed: the simulation
                // commits at every step unless told to hold).
                let text = (self.store.get(&to, m.mail))
                    .and_then(|stored| stored.open(&key_of(n), &secrets))
                    .map_or_else(|| "<unreadable>".to_string(), |b| b.text.to_string());
                (m.from.to_string(), m.channel, text)
            })
            .collect()
    }

    /// Lines client `i` printed, as `&str`s.
    pub fn lines(&self, i: usize) -> Vec<&str> {
        self.nodes[i].lines.iter().map(String::as_str).collect()
    }

    /// Lines client `i` printed since `from`.
    pub fn lines_since(&self, i: usize, from: usize) -> Vec<&str> {
        self.nodes[i].lines[from..]
            .iter()
            .map(String::as_str)
            .collect()
    }

    /// The bytes sent to `to` in all (before drop rules).
    pub fn bytes_to(&self, to: SocketAddr) -> usize {
        let to_it = self.log.iter().filter(|p| p.to == to);
        to_it.map(|p| p.payload.len()).sum()
    }

    /// How many packets matching `f` were sent (before drop rules).
    pub fn count(&self, f: impl Fn(&Packet) -> bool) -> usize {
        self.log.iter().filter(|p| f(p)).count()
    }
}

/// Drops the first `n` packets matching `f`.
pub fn drop_first(mut n: usize, f: impl Fn(&Packet) -> bool + 'static) -> DropRule {
    Box::new(move |p| {
        if n > 0 && f(p) {
            n -= 1;
            true
        } else {
            false
        }
    })
}

/// Drops every packet matching `f`.
pub fn drop_all(f: impl Fn(&Packet) -> bool + 'static) -> DropRule {
    Box::new(f)
}

/// How many of `outcomes` say a mailbox was full.
fn full_in(outcomes: &[Outcome]) -> usize {
    (outcomes.iter())
        .filter(|o| matches!(o, Outcome::Full { .. }))
        .count()
}
