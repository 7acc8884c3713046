//! Fuzz targets, kept in the library so `cargo fuzz` (fuzz/fuzz_targets/)
//! and `cargo test` (tests/fuzz_targets.rs) run the very same functions.
//!
//! Each entry point takes arbitrary bytes and panics only when an invariant
//! is broken — a panic here is a finding, not a crash on bad input.
//!
//! [`decode`] takes one datagram (or one decrypted message). [`server`] and
//! [`client`] read the bytes as a *script* that drives a small world: a
//! real [`Server`] and two real [`Client`]s, Alice and Bob, each with its own
//! key, on an in-memory network, and an attacker who sees every datagram.
//! Each step is chosen by one byte: deliver, reorder, drop, replay an old
//! datagram (from its source or a spoofed one), tamper with a datagram in
//! flight (handshakes included), send one to another destination, inject raw
//! or forged bytes, let time pass, commit the store, restart the server,
//! type a command. Reading past the end yields zeros, so every byte string is
//! a valid script and a mutation of one byte changes one decision. The two
//! targets differ in where injected and forged bytes go: the server, or
//! Alice.
//!
//! Checked throughout: nothing is sent while store operations are
//! uncommitted; every datagram fits; no deadline is due right after
//! `handle_timeout`; table, mailboxes and store stay within their limits;
//! after a commit the store holds exactly what the server holds; nothing is
//! shown as from X that X did not send; and an address only the attacker
//! uses never gets more than 3× the bytes it sent, nor a table row.
//! [`seeds`] writes scripts for the committed corpus.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::crypto::{self, Keypair};
use crate::packet::{self, COOKIE_LEN, Datagram, Packet, TOKEN_LEN};
use crate::server::AMPLIFICATION;
use crate::store::{Body, MemoryStore, Store, StoreOp};
use crate::wire::{self, Content, Entry, MailId, Message, MsgId, Name, Refusal, Seq, Text};
use crate::{Client, ClientConfig, Event, Server, ServerConfig, Transmit, console};

/// Steps run per script at most, so one input stays fast however long.
const MAX_STEPS: usize = 1024;
/// Datagrams in flight at most (the oldest is lost past it).
const IN_FLIGHT: usize = 64;
/// Past datagrams the attacker keeps to replay.
const RECORDED: usize = 64;
/// Server limits, small so the bounds are reached within a short script.
const MAX_CLIENTS: usize = 4;
const MAILBOX_MESSAGES: usize = 4;
const MAILBOX_BYTES: usize = 4096;
const STORE_BYTES: usize = 8192;
/// Unix time of a script's start.
const EPOCH_UNIX: i64 = 1_700_000_000;

fn server_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1024))
}

/// Where the clients live.
const CLIENTS: [(&str, u16); 2] = [("Alice", 2000), ("Bob", 3000)];

/// Addresses only the attacker uses as sources: whatever reaches them was
/// provoked by spoofed datagrams.
fn victims() -> [SocketAddr; 2] {
    [
        SocketAddr::from(([127, 0, 0, 66], 6666)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 6667)),
    ]
}

// ---- decode -----------------------------------------------------------------

/// Decoding on arbitrary bytes: a datagram that parses is written back to
/// the very same bytes (every field has one encoding), and a message that
/// decodes re-encodes within [`wire::MAX_PLAINTEXT`] to a message that
/// decodes to an equal value.
///
/// Values, not bytes, are compared for messages: postcard accepts
/// over-long varints, so the re-encoding may be shorter than the input —
/// but never longer, since the encoder writes every field in its shortest
/// form.
pub fn decode(data: &[u8]) {
    if let Ok(Datagram::Packet(p)) = packet::parse(data) {
        assert_eq!(p.to_vec(), data, "{p:?}");
    }
    if let Ok(msg) = wire::decode(data) {
        let again = wire::encode_to_vec(&msg);
        assert!(
            !again.is_empty() && again.len() <= wire::MAX_PLAINTEXT,
            "{msg:?} re-encoded to {} bytes",
            again.len()
        );
        assert!(
            again.len() <= data.len(),
            "{msg:?} re-encoded longer than its input"
        );
        assert_eq!(wire::decode(&again).as_ref(), Ok(&msg), "input {data:?}");
        assert_eq!(wire::encode_to_vec(&msg), again);
    }
    if let Some(body) = wire::decode_body(data) {
        assert_eq!(wire::decode_body(&wire::encode_body(&body)), Some(body));
    }
}

// ---- the world ----------------------------------------------------------------

/// Script steps (`byte % COUNT`).
mod step {
    pub const DELIVER: u8 = 0;
    pub const REORDER: u8 = 1;
    pub const DROP: u8 = 2;
    pub const REPLAY: u8 = 3;
    pub const TAMPER: u8 = 4;
    pub const REDIRECT: u8 = 5;
    pub const RAW: u8 = 6;
    pub const ADVANCE: u8 = 7;
    pub const DEADLINE: u8 = 8;
    pub const COMMIT: u8 = 9;
    pub const LINE: u8 = 10;
    pub const RESTART: u8 = 11;
    pub const FORGE: u8 = 12;
    /// The store refuses the batch (full or locked).
    pub const FAIL_COMMIT: u8 = 13;
    pub const COUNT: u8 = 14;
}

/// Drives a server, Alice and Bob through a script; injected and forged
/// datagrams go to the server.
pub fn server(start: Instant, data: &[u8]) {
    World::new(start, true).run(data);
}

/// Drives the same world; injected and forged datagrams go to Alice.
pub fn client(start: Instant, data: &[u8]) {
    World::new(start, false).run(data);
}

struct Flight {
    from: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
}

struct Node {
    name: Name,
    addr: SocketAddr,
    client: Client,
    exited: bool,
}

struct World {
    now: Instant,
    at_server: bool,
    config: ServerConfig,
    server: Server,
    store: MemoryStore,
    uncommitted: Vec<StoreOp>,
    nodes: Vec<Node>,
    net: VecDeque<Flight>,
    recorded: VecDeque<Flight>,
    /// Text → who sent it (texts are unique).
    sent: HashMap<String, Name>,
    texts: u32,
    /// Per victim: bytes received from it, bytes sent to it (by anyone).
    victim_bytes: BTreeMap<SocketAddr, (usize, usize)>,
}

fn keypair(n: u8) -> Keypair {
    Keypair::from_secret([n; 32])
}

impl World {
    fn new(start: Instant, at_server: bool) -> World {
        let mut config = ServerConfig::new([9; 32], keypair(99), (start, EPOCH_UNIX));
        config.max_clients = MAX_CLIENTS;
        config.mailbox_messages = MAILBOX_MESSAGES;
        config.mailbox_bytes = MAILBOX_BYTES;
        config.store_bytes = STORE_BYTES;
        config.max_handshakes = 8;
        // Short, so a script's clock steps reach it.
        config.mail_ttl = Some(Duration::from_secs(40));
        // Likewise: names are forgotten and their rows reused mid-script.
        config.name_ttl = Some(Duration::from_secs(60));
        let server = Server::new(config.clone(), start, Default::default());
        let server_key = server.public_key();
        let nodes = CLIENTS
            .iter()
            .enumerate()
            .map(|(i, &(name, port))| {
                let name = Name::new(name).expect("a valid name");
                // Alice pinned the server's key; Bob meets it first now.
                let pin = (i == 0).then_some(server_key);
                let mut c = ClientConfig::new(
                    name.clone(),
                    server_addr(),
                    [i as u8 + 1; 32],
                    keypair(i as u8 + 1),
                    pin,
                );
                c.max_table = MAX_CLIENTS;
                Node {
                    name,
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    client: Client::new(c, start),
                    exited: false,
                }
            })
            .collect();
        let mut w = World {
            now: start,
            at_server,
            config,
            server,
            store: MemoryStore::new(),
            uncommitted: Vec::new(),
            nodes,
            net: VecDeque::new(),
            recorded: VecDeque::new(),
            sent: HashMap::new(),
            texts: 0,
            victim_bytes: BTreeMap::new(),
        };
        for i in 0..w.nodes.len() {
            w.drain_client(i);
        }
        w
    }

    fn run(mut self, data: &[u8]) {
        let mut r = Reader::new(data);
        let mut steps = 0;
        while !r.is_empty() && steps < MAX_STEPS {
            steps += 1;
            match r.byte() % step::COUNT {
                step::DELIVER => {
                    if let Some(f) = self.net.pop_front() {
                        self.deliver(f);
                    }
                }
                step::REORDER => {
                    let k = r.byte() as usize;
                    if let Some(f) = self.take(k) {
                        self.deliver(f);
                    }
                }
                step::DROP => {
                    let k = r.byte() as usize;
                    let _ = self.take(k);
                }
                step::REPLAY => {
                    let k = r.byte() as usize;
                    let spoof = r.byte();
                    if !self.recorded.is_empty() {
                        let f = &self.recorded[k % self.recorded.len()];
                        let from = match spoof % 3 {
                            0 => f.from,
                            1 => victims()[0],
                            _ => self.nodes[spoof as usize % self.nodes.len()].addr,
                        };
                        let f = Flight {
                            from,
                            to: f.to,
                            payload: f.payload.clone(),
                        };
                        self.deliver(f);
                    }
                }
                step::TAMPER => {
                    let k = r.byte() as usize;
                    let how = r.byte();
                    let at = r.u16() as usize;
                    let value = r.byte();
                    if let Some(mut f) = self.take(k) {
                        let p = &mut f.payload;
                        match how % 4 {
                            0 if !p.is_empty() => {
                                let i = at % p.len();
                                p[i] ^= 1 << (value % 8);
                            }
                            1 if !p.is_empty() => {
                                let i = at % p.len();
                                p[i] = value;
                            }
                            2 => p.truncate(at % (p.len() + 1)),
                            _ => p.extend(std::iter::repeat_n(value, at % 17)),
                        }
                        self.deliver(f);
                    }
                }
                step::REDIRECT => {
                    let k = r.byte() as usize;
                    let to = r.byte();
                    if let Some(mut f) = self.take(k) {
                        f.to = self.pick_addr(to);
                        self.deliver(f);
                    }
                }
                step::RAW => {
                    let from = self.pick_source(r.byte());
                    let len = r.byte() as usize * 5;
                    let payload = r.take(len).to_vec();
                    let to = self.target();
                    self.deliver(Flight { from, to, payload });
                }
                step::ADVANCE => {
                    self.now += Duration::from_millis(u64::from(r.u16()) % 20_000);
                    self.timeouts();
                }
                step::DEADLINE => {
                    if let Some(t) = self.next_deadline() {
                        self.now = self.now.max(t);
                    }
                    self.timeouts();
                }
                step::COMMIT => self.commit(),
                step::FAIL_COMMIT => {
                    let failure = if r.byte().is_multiple_of(2) {
                        crate::StoreFailure::Full
                    } else {
                        crate::StoreFailure::Busy
                    };
                    self.fail_commit(failure);
                }
                step::LINE => {
                    let who = r.byte() as usize % self.nodes.len();
                    let line = self.command(who, r.byte(), r.byte());
                    if !self.nodes[who].exited {
                        let now = self.now;
                        let _ = console::command(&mut self.nodes[who].client, now, &line);
                        self.drain_client(who);
                    }
                }
                step::RESTART => {
                    // A crash: whatever was not committed is gone.
                    self.uncommitted.clear();
                    let loaded = self.store.load().expect("memory store");
                    self.server = Server::new(self.config.clone(), self.now, loaded);
                    self.drain_server();
                }
                step::FORGE => {
                    let f = self.forge(&mut r);
                    self.deliver(f);
                }
                _ => {}
            }
        }
        self.commit();
    }

    fn take(&mut self, k: usize) -> Option<Flight> {
        if self.net.is_empty() {
            return None;
        }
        let k = k % self.net.len();
        self.net.remove(k)
    }

    fn target(&self) -> SocketAddr {
        if self.at_server {
            server_addr()
        } else {
            self.nodes[0].addr
        }
    }

    fn pick_addr(&self, b: u8) -> SocketAddr {
        match b as usize % (self.nodes.len() + 1) {
            0 => server_addr(),
            i => self.nodes[i - 1].addr,
        }
    }

    fn pick_source(&self, b: u8) -> SocketAddr {
        let v = victims();
        match b % 4 {
            0 | 1 => v[b as usize % 2],
            2 => server_addr(),
            _ => self.nodes[b as usize % self.nodes.len()].addr,
        }
    }

    /// A structurally valid datagram with guessed or observed values: a
    /// real session index with garbage ciphertext, a forged cookie, a
    /// reset with a made-up token …
    fn forge(&mut self, r: &mut Reader<'_>) -> Flight {
        let from = self.pick_source(r.byte());
        let to = self.target();
        // An index seen on the wire, or a guess.
        let seen: Vec<u64> = self
            .recorded
            .iter()
            .filter_map(|f| match packet::parse(&f.payload) {
                Ok(Datagram::Packet(
                    Packet::Data { receiver, .. }
                    | Packet::Finish { receiver, .. }
                    | Packet::Retry { receiver, .. }
                    | Packet::Response { receiver, .. }
                    | Packet::PeerResponse { receiver, .. },
                )) => Some(receiver),
                _ => None,
            })
            .collect();
        let pick = r.byte() as usize;
        let index = if seen.is_empty() || pick.is_multiple_of(4) {
            u64::from(r.u32())
        } else {
            seen[pick % seen.len()]
        };
        let junk: Vec<u8> = (0..32 + r.byte() as usize)
            .map(|i| i as u8 ^ pick as u8)
            .collect();
        let cookie = [r.byte(); COOKIE_LEN];
        let token = [r.byte(); TOKEN_LEN];
        let noise32 = [r.byte(); packet::XX1_LEN];
        let payload = match r.byte() % 7 {
            0 => Packet::Data {
                receiver: index,
                nonce: u64::from(r.u32()),
                ciphertext: &junk,
            }
            .to_vec(),
            1 => Packet::Finish {
                receiver: index,
                noise: &junk[..junk.len().max(packet::XX3_LEN).min(junk.len())],
            }
            .to_vec(),
            2 => Packet::Initial {
                sender: index,
                cookie: Some(&cookie),
                noise: &noise32,
            }
            .to_vec(),
            3 => Packet::Reset {
                receiver: index,
                token: &token,
            }
            .to_vec(),
            4 => {
                // A real handshake's first message from a key of our own.
                let mut hs = crypto::client_handshake(&keypair(77), [r.byte(); 32]);
                let mut buf = [0u8; packet::XX1_LEN + packet::TAG_LEN];
                let _ = hs.write_message(&[], &mut buf);
                Packet::Initial {
                    sender: index,
                    cookie: None,
                    noise: (&buf[..packet::XX1_LEN]).try_into().expect("32 bytes"),
                }
                .to_vec()
            }
            5 => {
                // A real peer handshake to Alice from a key no table has.
                let alice = keypair(1).public();
                let mut hs = crypto::peer_initiator(&keypair(78), &alice, [r.byte(); 32]);
                let mut m = [0u8; packet::IK1_LEN];
                let _ = hs.write_message(&[], &mut m);
                Packet::PeerInit {
                    sender: index,
                    noise: &m,
                }
                .to_vec()
            }
            _ => vec![1, 0, r.byte(), r.byte()],
        };
        Flight { from, to, payload }
    }

    fn command(&mut self, who: usize, what: u8, arg: u8) -> String {
        let other = self.nodes[(who + 1 + arg as usize) % self.nodes.len()]
            .name
            .clone();
        let me = self.nodes[who].name.clone();
        match what % 8 {
            0..=2 => {
                let text = self.text(&me, arg);
                format!("send {other} {text}")
            }
            3 => {
                let text = self.text(&me, arg);
                format!("send_all {text}")
            }
            4 => format!("dereg {me}"),
            5 => format!("reg {me}"),
            6 => "list".to_string(),
            _ => {
                let text = self.text(&me, arg);
                format!("send {me} {text}")
            }
        }
    }

    fn text(&mut self, sender: &Name, arg: u8) -> String {
        self.texts += 1;
        let t = if arg.is_multiple_of(5) {
            // Near the limit, in four-byte characters: nothing may cut it.
            format!("f{}-{}", self.texts, "😀".repeat(240))
        } else {
            format!("f{}", self.texts)
        };
        self.sent.insert(t.clone(), sender.clone());
        t
    }

    // ---- the network and the machines -------------------------------------

    fn deliver(&mut self, f: Flight) {
        let now = self.now;
        if let Some(v) = self.victim_bytes.get_mut(&f.from) {
            v.0 += f.payload.len();
        } else if victims().contains(&f.from) {
            self.victim_bytes.insert(f.from, (f.payload.len(), 0));
        }
        if self.recorded.len() == RECORDED {
            self.recorded.pop_front();
        }
        self.recorded.push_back(Flight {
            from: f.from,
            to: f.to,
            payload: f.payload.clone(),
        });
        if f.to == server_addr() {
            self.server.handle_datagram(now, f.from, &f.payload);
            self.drain_server();
        } else if let Some(i) = self.nodes.iter().position(|n| n.addr == f.to)
            && !self.nodes[i].exited
        {
            self.nodes[i]
                .client
                .handle_datagram(now, f.from, &f.payload);
            self.drain_client(i);
        }
    }

    fn send(&mut self, from: SocketAddr, t: Transmit) {
        assert!(
            t.payload.len() <= packet::MAX_DATAGRAM,
            "{:?} of {} bytes from {from}",
            t.what,
            t.payload.len()
        );
        if victims().contains(&t.to) {
            let v = self.victim_bytes.entry(t.to).or_default();
            v.1 += t.payload.len();
            assert!(
                v.1 <= AMPLIFICATION * v.0,
                "{from} sent {} bytes to {} which sent only {}",
                v.1,
                t.to,
                v.0
            );
            return;
        }
        if self.net.len() == IN_FLIGHT {
            self.net.pop_front();
        }
        self.net.push_back(Flight {
            from,
            to: t.to,
            payload: t.payload,
        });
    }

    fn drain_server(&mut self) {
        let now = self.now;
        crate::store::serve_fetches(&mut self.server, &mut self.store, now);
        while let Some(op) = self.server.poll_store() {
            self.uncommitted.push(op);
        }
        if !self.uncommitted.is_empty() {
            assert!(
                self.server.poll_transmit().is_none(),
                "a datagram left before its store operations were committed"
            );
        } else {
            while let Some(t) = self.server.poll_transmit() {
                self.send(server_addr(), t);
            }
        }
        while self.server.poll_event().is_some() {}
        self.check_server();
    }

    /// Shows, then sends (a datagram waits for the events before it).
    fn drain_client(&mut self, i: usize) {
        let from = self.nodes[i].addr;
        while let Some(event) = self.nodes[i].client.poll_event() {
            let _ = console::render(&event, |unix| unix.to_string());
            match event {
                Event::Closed { .. } => self.nodes[i].exited = true,
                Event::Direct { from, text }
                | Event::Channel { from, text }
                | Event::Stored { from, text, .. } => {
                    let sender = self.sent.get(text.as_str());
                    assert!(
                        sender == Some(&from),
                        "{} shows {:?} as from {from}, sent by {sender:?}",
                        self.nodes[i].name,
                        text.as_str()
                    );
                }
                _ => {}
            }
        }
        while let Some(t) = self.nodes[i].client.poll_transmit() {
            self.send(from, t);
        }
        assert!(self.nodes[i].client.table().len() <= MAX_CLIENTS);
        if self.nodes[i].exited {
            assert!(self.nodes[i].client.poll_timeout().is_none());
        }
    }

    fn timeouts(&mut self) {
        let now = self.now;
        self.server.handle_timeout(now);
        assert!(
            self.server.poll_timeout().is_none_or(|t| t > now),
            "server deadline not after now"
        );
        self.drain_server();
        for i in 0..self.nodes.len() {
            if self.nodes[i].exited {
                continue;
            }
            self.nodes[i].client.handle_timeout(now);
            assert!(
                self.nodes[i].client.poll_timeout().is_none_or(|t| t > now),
                "client deadline not after now"
            );
            self.drain_client(i);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let clients = self
            .nodes
            .iter()
            .filter(|n| !n.exited)
            .filter_map(|n| n.client.poll_timeout());
        self.server.poll_timeout().into_iter().chain(clients).min()
    }

    fn commit(&mut self) {
        while let Some(op) = self.server.poll_store() {
            self.uncommitted.push(op);
        }
        if !self.uncommitted.is_empty() {
            let ops = std::mem::take(&mut self.uncommitted);
            self.store.commit(&ops).expect("memory store");
            self.server.handle_committed();
            self.check_store();
        }
        self.drain_server();
    }

    /// The store takes nothing of what is uncommitted.
    fn fail_commit(&mut self, failure: crate::StoreFailure) {
        while let Some(op) = self.server.poll_store() {
            self.uncommitted.push(op);
        }
        if !self.uncommitted.is_empty() {
            self.uncommitted.clear();
            let now = self.now;
            self.server.handle_commit_failed(now, failure);
        }
        self.drain_server();
    }

    fn check_server(&self) {
        let s = &self.server;
        assert!(s.table().len() <= MAX_CLIENTS, "table over its bound");
        assert!(s.stored_bytes() <= STORE_BYTES, "store over its bound");
        // What the store's bytes count: every copy, and a shared channel
        // body once.
        let mut bodies = HashMap::new();
        let mut counted = 0;
        for (_, e) in s.table().iter() {
            for m in s.mailbox(&e.name) {
                match m.shared {
                    true => {
                        counted += crate::store::MAIL_OVERHEAD;
                        bodies.insert(m.mail, m.len);
                    }
                    false => counted += m.size(),
                }
            }
        }
        counted += bodies.values().sum::<usize>();
        assert_eq!(s.stored_bytes(), counted, "store bytes miscounted");
        for (_, e) in s.table().iter() {
            assert!(!victims().contains(&e.addr), "a spoofed address got a row");
            let mail: Vec<_> = s.mailbox(&e.name).collect();
            assert!(mail.len() <= MAILBOX_MESSAGES, "mailbox over its bound");
            let bytes: usize = mail.iter().map(|m| m.size()).sum();
            assert!(bytes <= MAILBOX_BYTES, "mailbox over its byte bound");
        }
    }

    /// After a commit the store holds exactly the server's mailboxes.
    fn check_store(&mut self) {
        let loaded = self.store.load().expect("memory store");
        let mut stored: Vec<(MailId, Name)> =
            loaded.mail.iter().map(|m| (m.mail, m.to.clone())).collect();
        stored.sort();
        let mut held: Vec<(MailId, Name)> = self
            .server
            .table()
            .iter()
            .flat_map(|(_, e)| {
                self.server
                    .mailbox(&e.name)
                    .map(|m| (m.mail, e.name.clone()))
            })
            .collect();
        held.sort();
        assert_eq!(stored, held, "store and server disagree");
        for m in &loaded.mail {
            assert!(!matches!(m.body, Body::Clear(_)), "mail kept in clear");
        }
        // Committed mail of an offline client is on disk only: memory
        // does not grow with what is stored.
        for (_, e) in self.server.table().iter().filter(|(_, e)| !e.online) {
            for m in self.server.mailbox(&e.name) {
                assert!(!m.in_memory, "a body held in memory for offline {}", e.name);
            }
        }
    }
}

/// Reads script bytes; past the end, zeros.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
}

// ---- samples and seeds -----------------------------------------------------------

/// One message of every variant, named, for seeds and hostile-input tests.
pub fn sample_messages() -> Vec<(&'static str, Message)> {
    let name = |s: &str| Name::new(s).expect("a valid name");
    let text = |s: &str| Text::new(s).expect("a valid text");
    let key = keypair(5).public();
    let entry = Entry {
        name: name("Bob"),
        addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
        online: true,
        key,
    };
    let entries: wire::Entries = [entry.clone()].into_iter().collect();
    let sealed: wire::Sealed = (0..60u8).collect();
    vec![
        (
            "register",
            Message::Register {
                seq: Seq(1),
                name: name("Alice"),
            },
        ),
        ("deregister", Message::Deregister { seq: Seq(2) }),
        (
            "save_message",
            Message::SaveMessage {
                seq: Seq(3),
                to: name("Bob"),
                id: MsgId(4),
                sealed: sealed.clone(),
            },
        ),
        (
            "channel_send",
            Message::ChannelSend {
                seq: Seq(5),
                id: MsgId(6),
                text: text("hello all"),
            },
        ),
        (
            "sync",
            Message::Sync {
                seq: Seq(7),
                since: 3,
                from: 20,
            },
        ),
        (
            "heartbeat",
            Message::Heartbeat {
                seq: Seq(8),
                version: 9,
            },
        ),
        ("delivered", Message::Delivered { mail: MailId(10) }),
        ("probe_reply", Message::ProbeReply { nonce: 1 << 40 }),
        ("path_response", Message::PathResponse { nonce: 7 }),
        (
            "welcome",
            Message::Welcome {
                seq: Seq(11),
                version: 12,
                mail: 2,
                reset: [3; TOKEN_LEN],
            },
        ),
        (
            "rejected",
            Message::Rejected {
                seq: Seq(13),
                reason: wire::Rejection::OtherKey,
            },
        ),
        ("ack", Message::Ack { seq: Seq(14) }),
        (
            "exists",
            Message::Exists {
                seq: Seq(15),
                entry: entry.clone(),
            },
        ),
        (
            "refused",
            Message::Refused {
                seq: Seq(16),
                reason: Refusal::MailboxFull,
            },
        ),
        (
            "page",
            Message::Page {
                seq: Seq(17),
                version: 18,
                from: 0,
                entries: entries.clone(),
                next: Some(1),
            },
        ),
        (
            "delta",
            Message::Delta {
                prev: 18,
                version: 19,
                entries,
            },
        ),
        (
            "deliver_sealed",
            Message::Deliver {
                mail: MailId(20),
                batch: Seq(21),
                pos: Some(0),
                stored_at: EPOCH_UNIX,
                from: name("Bob"),
                content: Content::Sealed { key, sealed },
            },
        ),
        (
            "deliver_relayed",
            Message::Deliver {
                mail: MailId(22),
                batch: Seq(21),
                pos: None,
                stored_at: EPOCH_UNIX,
                from: name("Bob"),
                content: Content::Relayed {
                    channel: true,
                    verified: true,
                    id: MsgId(23),
                    text: text("to all"),
                },
            },
        ),
        ("probe", Message::Probe { nonce: 24 }),
        (
            "alive",
            Message::Alive {
                seq: Seq(25),
                version: 26,
            },
        ),
        ("path_challenge", Message::PathChallenge { nonce: 27 }),
        (
            "chat",
            Message::Chat {
                from: name("Alice"),
                to: name("Bob"),
                id: MsgId(28),
                text: text("hi"),
            },
        ),
        ("chat_ack", Message::ChatAck { id: MsgId(29) }),
    ]
}

/// Real datagrams of every packet type, as a run of the world produces them
/// (handshakes, sessions, retries, resets), for seeds and hostile tests.
pub fn sample_datagrams(start: Instant) -> Vec<Vec<u8>> {
    let mut w = World::new(start, true);
    let mut out = Vec::new();
    for _ in 0..40 {
        while let Some(f) = w.net.pop_front() {
            out.push(f.payload.clone());
            w.deliver(f);
        }
        w.commit();
        if w.net.is_empty() {
            break;
        }
    }
    out.truncate(64);
    out
}

/// A script writer for the committed seeds.
#[derive(Default)]
struct Script(Vec<u8>);

impl Script {
    fn step(mut self, s: u8, args: &[u8]) -> Self {
        self.0.push(s);
        self.0.extend_from_slice(args);
        self
    }

    /// Delivers everything in flight (committing as the driver would),
    /// `n` rounds.
    fn settle(mut self, n: usize) -> Self {
        for _ in 0..n {
            for _ in 0..12 {
                self = self.step(step::DELIVER, &[]);
            }
            self = self.step(step::COMMIT, &[]);
        }
        self
    }
}

/// The committed seed corpus: (target, file name, bytes).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, msg) in sample_messages() {
        out.push(("decode", format!("seed-{name}"), wire::encode_to_vec(&msg)));
    }
    let cookie = [7u8; COOKIE_LEN];
    let token = [8u8; TOKEN_LEN];
    let noise = [9u8; packet::XX1_LEN];
    for (name, p) in [
        (
            "packet-initial",
            Packet::Initial {
                sender: 1,
                cookie: Some(&cookie),
                noise: &noise,
            },
        ),
        (
            "packet-reset",
            Packet::Reset {
                receiver: 2,
                token: &token,
            },
        ),
        (
            "packet-data",
            Packet::Data {
                receiver: 3,
                nonce: 4,
                ciphertext: &[5; 40],
            },
        ),
    ] {
        out.push(("decode", format!("seed-{name}"), p.to_vec()));
    }
    let join = Script::default().settle(4);
    let chat = Script(join.0.clone())
        .step(step::LINE, &[0, 0, 1])
        .settle(3)
        .step(step::LINE, &[1, 3, 1])
        .settle(3);
    let mail = Script(join.0.clone())
        .step(step::LINE, &[1, 4, 0])
        .settle(3)
        .step(step::LINE, &[0, 0, 1])
        .step(step::DEADLINE, &[])
        .settle(2)
        .step(step::DEADLINE, &[])
        .settle(3)
        .step(step::LINE, &[1, 5, 0])
        .settle(4);
    let tamper = Script::default()
        .step(step::DELIVER, &[])
        .step(step::TAMPER, &[0, 0, 10, 0, 3])
        .step(step::DEADLINE, &[])
        .settle(4)
        .step(step::TAMPER, &[0, 1, 40, 0, 0xff])
        .settle(2);
    let replay = Script(chat.0.clone())
        .step(step::REPLAY, &[0, 0])
        .step(step::REPLAY, &[5, 1])
        .step(step::REPLAY, &[9, 2])
        .step(step::REDIRECT, &[0, 1])
        .settle(2);
    let restart = Script(join.0.clone())
        .step(step::RESTART, &[])
        .step(step::ADVANCE, &[0x10, 0x27])
        .step(step::LINE, &[0, 3, 2])
        .settle(6);
    let forge = Script(join.0.clone())
        .step(step::FORGE, &[0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
        .step(step::FORGE, &[1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 1])
        .step(step::FORGE, &[0, 3, 9, 9, 9, 9, 4, 9])
        .step(step::RAW, &[0, 4, 1, 0, 7, 7])
        .settle(2);
    // A save and a channel message whose commits fail, then a save that is
    // kept and read.
    let mut fails = Script(join.0.clone())
        .step(step::LINE, &[1, 4, 0])
        .settle(3);
    for (line, failure) in [([0, 0, 0], 0), ([0, 3, 1], 1)] {
        fails = fails.step(step::LINE, &line);
        for _ in 0..12 {
            fails = fails.step(step::DELIVER, &[]);
        }
        fails = fails.step(step::FAIL_COMMIT, &[failure]).settle(3);
    }
    let fails = fails
        .step(step::LINE, &[0, 0, 0])
        .settle(3)
        .step(step::LINE, &[1, 5, 0])
        .settle(4);
    for target in ["server", "client"] {
        for (name, s) in [
            ("store-fails", &fails),
            ("join", &join),
            ("chat", &chat),
            ("mail", &mail),
            ("tamper", &tamper),
            ("replay", &replay),
            ("restart", &restart),
            ("forge", &forge),
        ] {
            out.push((target, format!("seed-{name}"), s.0.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_join_seed_registers_both_clients() {
        let start = Instant::now();
        let mut w = World::new(start, true);
        for _ in 0..4 {
            while let Some(f) = w.net.pop_front() {
                w.deliver(f);
            }
            w.commit();
        }
        assert!(w.nodes.iter().all(|n| n.client.is_online()));
        assert_eq!(w.server.table().len(), 2);
    }

    #[test]
    fn sample_datagrams_cover_the_handshake_and_session_types() {
        let kinds: std::collections::BTreeSet<u8> = sample_datagrams(Instant::now())
            .iter()
            .map(|d| d[1])
            .collect();
        // Initial, Retry, Response, Finish, Data.
        for k in 1..=5 {
            assert!(kinds.contains(&k), "no packet of type {k}: {kinds:?}");
        }
    }

    #[test]
    fn a_victim_address_is_never_amplified() {
        let start = Instant::now();
        let mut w = World::new(start, true);
        // A first message from a spoofed source: one small retry at most.
        let mut hs = crypto::client_handshake(&keypair(50), [1; 32]);
        let mut buf = [0u8; packet::XX1_LEN + packet::TAG_LEN];
        hs.write_message(&[], &mut buf).unwrap();
        let p = Packet::Initial {
            sender: 1,
            cookie: None,
            noise: (&buf[..packet::XX1_LEN]).try_into().expect("32 bytes"),
        }
        .to_vec();
        w.deliver(Flight {
            from: victims()[0],
            to: server_addr(),
            payload: p,
        });
        let (got, sent) = w.victim_bytes[&victims()[0]];
        assert!(sent > 0 && sent <= AMPLIFICATION * got, "{sent} vs {got}");
        assert_eq!(w.server.sessions(), (0, 0));
    }
}
