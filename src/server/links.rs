//! The server's session layer: stateless cookies for addresses that have not
//! proved they receive, Noise `XX` handshakes, established sessions
//! ("links") by index, path validation when a client's address changes, and
//! stateless resets for sessions the server no longer holds.
//!
//! What reaches the rest of the server is only authenticated: a message
//! that decrypted in a link (or rode the handshake's last message), with the
//! link it came on. Until an address has echoed a cookie, the server keeps
//! nothing for it and answers with at most one datagram smaller than the
//! one it got.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha12Rng;
use rand_core::RngCore;
use slab::Slab;
use snow::HandshakeState;

use crate::Transmit;
use crate::crypto::{self, CookieJar, Keypair, Link, PublicKey, ServerSecrets};
use crate::packet::{self, Datagram, MAX_DATAGRAM, Packet, TOKEN_LEN, XX2_LEN};
use crate::table::ClientId;
use crate::wire::{self, Message, Name, Seq, What};

/// How long a cookie stays valid: its bucket and the next.
const COOKIE_PERIOD: Duration = Duration::from_secs(60);
/// A handshake not finished in this time is forgotten.
const HANDSHAKE_TTL: Duration = Duration::from_secs(10);
/// A link on which no registration succeeded is dropped after this time.
const UNOWNED_TTL: Duration = Duration::from_secs(30);
/// A path challenge is sent again at most this often (each time a datagram
/// comes from the new address, within the amplification budget), so a lost
/// challenge never strands a client that moved.
const PATH_RETRY: Duration = Duration::from_millis(250);
/// No address that has not proved it receives gets more than this many
/// times the bytes it sent (QUIC's anti-amplification limit).
pub const AMPLIFICATION: usize = 3;
/// The wait a "busy" answer asks for when the handshake table is full.
const FULL_WAIT: Duration = Duration::from_millis(500);

/// Handle of an established session: its slot and its (random, unique)
/// session index, so a handle kept after its session ended never reaches
/// the session that reuses the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId {
    slot: usize,
    index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Handshake(usize),
    Link(usize),
}

struct Handshake {
    hs: HandshakeState,
    addr: SocketAddr,
    /// The client's index for the session.
    client: u64,
    /// Ours.
    local: u64,
    /// The client's ephemeral key: a retransmitted message 1 is answered
    /// with the same message 2, not a new handshake.
    ephemeral: [u8; 32],
    response: Vec<u8>,
}

/// An address change under validation.
#[derive(Debug)]
struct PathCheck {
    addr: SocketAddr,
    nonce: u64,
    /// Bytes received from / sent to `addr` while it is unproven.
    received: usize,
    sent: usize,
    last: Option<Instant>,
}

/// An established session with a client.
pub struct ServerLink {
    link: Link,
    /// The address the client proved it receives at; everything for the
    /// client goes there.
    addr: SocketAddr,
    /// The registered client this session belongs to, once one is.
    pub owner: Option<ClientId>,
    /// The registration that rode the handshake's last message, until the
    /// client's first session datagram shows it got the answer (`None`
    /// from then on: a copy of message 3 is a replay). Boxed, like `path`:
    /// most of a session's life it is `None`, and a pointer is what an
    /// idle session pays.
    hello: Option<Box<Hello>>,
    path: Option<Box<PathCheck>>,
}

/// A retransmitted `Finish` (byte for byte) is handled as its registration
/// again.
struct Hello {
    seq: Seq,
    name: Name,
    finish: Vec<u8>,
}

/// What an authenticated datagram brought (handed over at once, never
/// stored: its size is no cost).
#[allow(clippy::large_enum_variant)]
pub enum Incoming {
    /// A message on an established session.
    Message(LinkId, Message),
    /// The session's client now receives at a new, validated address.
    Moved(LinkId, SocketAddr),
}

/// Counters of what the layer dropped or answered statelessly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams whose framing did not parse, or did not decrypt.
    pub malformed: u64,
    /// Retries sent (addresses asked to prove they receive).
    pub retries: u64,
    /// Stateless resets sent.
    pub resets: u64,
    /// Version-negotiation answers sent.
    pub negotiations: u64,
    /// Handshakes answered "busy" instead of message 2.
    pub busy: u64,
}

/// All sessions and handshakes of a server.
pub struct Links {
    key: Keypair,
    secrets: ServerSecrets,
    cookies: CookieJar,
    start: Instant,
    /// Boxed, like `links`: a slab keeps its slots' size after a storm.
    handshakes: Slab<Box<Handshake>>,
    /// Handshakes in the order they began (all live equally long).
    handshake_order: VecDeque<(Instant, usize, u64)>,
    /// A client's ephemeral key and address → its handshake (an on-path
    /// copy from elsewhere is another handshake, not a claim on this one).
    by_ephemeral: HashMap<([u8; 32], SocketAddr), usize>,
    /// Boxed: a slab never gives back its slots, so a 10,000-client storm
    /// would keep 10,000 unboxed links' worth (~380 B each) for good.
    links: Slab<Box<ServerLink>>,
    /// Links that no registration claimed yet, oldest first.
    unowned: VecDeque<(Instant, LinkId, u64)>,
    by_index: HashMap<u64, Slot>,
    max_handshakes: usize,
    /// Set while the server is behind: new handshakes are told to come back
    /// after this long rather than costing their key exchange now.
    busy: Option<Duration>,
    stats: LinkStats,
}

impl Links {
    /// A layer with the server's static key; `cookie_secret` comes from the
    /// server's seeded generator (it need not survive a restart).
    pub fn new(
        key: Keypair,
        cookie_secret: [u8; 32],
        now: Instant,
        max_handshakes: usize,
    ) -> Links {
        Links {
            secrets: ServerSecrets::derive(&key),
            key,
            cookies: CookieJar::new(cookie_secret),
            start: now,
            handshakes: Slab::new(),
            handshake_order: VecDeque::new(),
            by_ephemeral: HashMap::new(),
            links: Slab::new(),
            unowned: VecDeque::new(),
            by_index: HashMap::new(),
            max_handshakes,
            busy: None,
            stats: LinkStats::default(),
        }
    }

    /// The server's public key.
    pub fn public(&self) -> PublicKey {
        self.key.public()
    }

    /// The keys derived from the server's static key.
    pub fn secrets(&self) -> &ServerSecrets {
        &self.secrets
    }

    /// Counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Handshakes under way.
    pub fn handshakes(&self) -> usize {
        self.handshakes.len()
    }

    /// Established sessions.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// No sessions.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Handshakes and sessions held for `addr`. (A session whose client
    /// seems to have moved there only notes the address it challenges, one
    /// per session: not counted.)
    pub fn state_at(&self, addr: SocketAddr) -> usize {
        let handshakes = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.addr == addr)
            .count();
        let links = self.links.iter().filter(|(_, l)| l.addr == addr).count();
        handshakes + links
    }

    /// The link, if it still exists.
    pub fn get(&self, id: LinkId) -> Option<&ServerLink> {
        self.links
            .get(id.slot)
            .map(|l| &**l)
            .filter(|l| l.link.local_index() == id.index)
    }

    fn get_mut(&mut self, id: LinkId) -> Option<&mut ServerLink> {
        self.links
            .get_mut(id.slot)
            .map(|l| &mut **l)
            .filter(|l| l.link.local_index() == id.index)
    }

    fn id_of(&self, slot: usize) -> LinkId {
        LinkId {
            slot,
            index: self.links[slot].link.local_index(),
        }
    }

    /// The link's client key.
    pub fn remote(&self, id: LinkId) -> Option<PublicKey> {
        self.get(id).map(|l| l.link.remote())
    }

    /// The link's validated address.
    pub fn addr(&self, id: LinkId) -> Option<SocketAddr> {
        self.get(id).map(|l| l.addr)
    }

    /// The reset token of this link (told to the client in `Welcome`).
    pub fn reset_token(&self, id: LinkId) -> [u8; TOKEN_LEN] {
        self.secrets.reset_token(id.index)
    }

    /// Marks the link as the session of `owner`.
    pub fn set_owner(&mut self, id: LinkId, owner: ClientId) {
        if let Some(l) = self.get_mut(id) {
            l.owner = Some(owner);
        }
    }

    /// Drops a link: datagrams for it get a stateless reset from now on.
    pub fn remove(&mut self, id: LinkId) {
        if self.get(id).is_some() {
            self.links.remove(id.slot);
            self.by_index.remove(&id.index);
            self.trim();
        }
    }

    /// Sends `msg` on link `id` to its validated address.
    pub fn send(&mut self, id: LinkId, msg: &Message, out: &mut VecDeque<Transmit>) {
        let plain = wire::encode_to_vec(msg);
        self.send_encoded(id, &plain, msg.what(), out);
    }

    /// Sends an encoded message (a cached reply) on link `id`.
    pub fn send_encoded(
        &mut self,
        id: LinkId,
        plain: &[u8],
        what: What,
        out: &mut VecDeque<Transmit>,
    ) {
        let Some(l) = self.get_mut(id) else {
            return;
        };
        if let Some(payload) = l.link.seal(plain) {
            out.push_back(Transmit {
                to: l.addr,
                payload,
                what,
            });
        }
    }

    /// One datagram from `from`: answers what can be answered statelessly
    /// (into `out`) and returns what an authenticated datagram brought.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        rng: &mut ChaCha12Rng,
        out: &mut VecDeque<Transmit>,
    ) -> Option<Incoming> {
        let datagram = match packet::parse(data) {
            Ok(d) => d,
            Err(_) => {
                self.stats.malformed += 1;
                return None;
            }
        };
        let packet = match datagram {
            Datagram::Packet(p) => p,
            // Never answer a negotiation: two servers would ping-pong.
            Datagram::Negotiate(_) => return None,
            Datagram::OtherVersion(_) => {
                // Two bytes, so never more than the datagram that asked.
                if data.len() >= 2 {
                    self.stats.negotiations += 1;
                    out.push_back(Transmit {
                        to: from,
                        payload: packet::negotiation().to_vec(),
                        what: What::Negotiate,
                    });
                }
                return None;
            }
        };
        match packet {
            Packet::Initial {
                sender,
                cookie,
                noise,
            } => {
                let bucket = self.bucket(now);
                match cookie {
                    Some(c) if self.cookies.check(c, from, bucket) => {
                        self.initial(now, from, sender, noise, rng, out);
                    }
                    // No cookie, or a stale or forged one: prove it first.
                    _ => {
                        self.stats.retries += 1;
                        let cookie = self.cookies.make(bucket, from);
                        let retry = Packet::Retry {
                            receiver: sender,
                            cookie: &cookie,
                        };
                        out.push_back(Transmit {
                            to: from,
                            payload: retry.to_vec(),
                            what: What::Retry,
                        });
                    }
                }
                None
            }
            Packet::Finish { receiver, noise } => self.finish(now, from, receiver, noise, data),
            Packet::Data {
                receiver,
                nonce,
                ciphertext,
            } => self.data(now, from, receiver, nonce, ciphertext, data.len(), rng, out),
            // Client-bound packets: a confused or hostile sender.
            Packet::Retry { .. }
            | Packet::Response { .. }
            | Packet::PeerInit { .. }
            | Packet::PeerResponse { .. }
            | Packet::Reset { .. }
            | Packet::Busy { .. } => {
                self.stats.malformed += 1;
                None
            }
        }
    }

    fn bucket(&self, now: Instant) -> u32 {
        let secs = now.saturating_duration_since(self.start).as_secs();
        (secs / COOKIE_PERIOD.as_secs()) as u32
    }

    /// A fresh session index, unused by any handshake or link.
    fn fresh_index(&self, rng: &mut ChaCha12Rng) -> u64 {
        loop {
            let i = rng.next_u64();
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// While `Some`, message 1 of a new handshake is answered "busy, come
    /// back after this long" (see [`Packet::Busy`]).
    pub fn set_busy(&mut self, wait: Option<Duration>) {
        self.busy = wait;
    }

    /// XX message 1 from an address that proved it receives.
    fn initial(
        &mut self,
        now: Instant,
        from: SocketAddr,
        client: u64,
        noise: &[u8; packet::XX1_LEN],
        rng: &mut ChaCha12Rng,
        out: &mut VecDeque<Transmit>,
    ) {
        let ephemeral = *noise;
        if let Some(&h) = self.by_ephemeral.get(&(ephemeral, from)) {
            // Message 1 again (our answer was lost): the same answer.
            let h = &self.handshakes[h];
            if h.client == client {
                out.push_back(Transmit {
                    to: from,
                    payload: h.response.clone(),
                    what: What::Response,
                });
            }
            return;
        }
        self.expire(now);
        // Behind, or full of recent handshakes: a small answer now, the key
        // exchange when the client comes back (the client does not count it
        // as a try, so a loaded server is not taken for a gone one).
        let full = self.handshakes.len() >= self.max_handshakes;
        if let Some(wait) = self.busy.or(full.then_some(FULL_WAIT)) {
            self.stats.busy += 1;
            let busy = Packet::Busy {
                receiver: client,
                wait_ms: u16::try_from(wait.as_millis()).unwrap_or(u16::MAX),
            };
            out.push_back(Transmit {
                to: from,
                payload: busy.to_vec(),
                what: What::Busy,
            });
            return;
        }
        let mut seed = [0; 32];
        rng.fill_bytes(&mut seed);
        let mut hs = crypto::server_handshake(&self.key, seed);
        let mut scratch = [0u8; MAX_DATAGRAM];
        if hs.read_message(noise, &mut scratch).is_err() {
            self.stats.malformed += 1;
            return;
        }
        let mut msg2 = [0u8; XX2_LEN];
        if !matches!(hs.write_message(&[], &mut msg2), Ok(XX2_LEN)) {
            return;
        }
        let local = self.fresh_index(rng);
        let response = Packet::Response {
            receiver: client,
            sender: local,
            noise: &msg2,
        }
        .to_vec();
        out.push_back(Transmit {
            to: from,
            payload: response.clone(),
            what: What::Response,
        });
        let h = self.handshakes.insert(Box::new(Handshake {
            hs,
            addr: from,
            client,
            local,
            ephemeral,
            response,
        }));
        self.by_ephemeral.insert((ephemeral, from), h);
        self.by_index.insert(local, Slot::Handshake(h));
        self.handshake_order.push_back((now, h, local));
    }

    /// Forgets handshakes older than [`HANDSHAKE_TTL`] and links that no
    /// registration claimed within [`UNOWNED_TTL`].
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, h, local)) = self.handshake_order.front() {
            if now.saturating_duration_since(at) < HANDSHAKE_TTL
                && self.handshakes.len() < self.max_handshakes
            {
                break;
            }
            self.handshake_order.pop_front();
            self.drop_handshake(h, local);
        }
        while let Some(&(at, id, local)) = self.unowned.front() {
            if now.saturating_duration_since(at) < UNOWNED_TTL
                && self.unowned.len() < self.max_handshakes
            {
                break;
            }
            self.unowned.pop_front();
            if self
                .get(id)
                .is_some_and(|l| l.owner.is_none() && local == id.index)
            {
                self.remove(id);
            }
        }
        self.trim();
    }

    /// Gives back the room only a storm needed: a table at a quarter of
    /// its capacity is shrunk (so at most once per fourfold drop).
    fn trim(&mut self) {
        if self.by_index.len() * 4 < self.by_index.capacity() {
            self.by_index.shrink_to_fit();
        }
        if self.by_ephemeral.len() * 4 < self.by_ephemeral.capacity() {
            self.by_ephemeral.shrink_to_fit();
        }
        if self.unowned.len() * 4 < self.unowned.capacity() {
            self.unowned.shrink_to_fit();
        }
        if self.handshake_order.len() * 4 < self.handshake_order.capacity() {
            self.handshake_order.shrink_to_fit();
        }
    }

    /// Removes handshake `h` if it is still the one begun with index
    /// `local` (slab slots are reused).
    fn drop_handshake(&mut self, h: usize, local: u64) {
        if self.handshakes.get(h).is_some_and(|x| x.local == local) {
            let x = self.handshakes.remove(h);
            self.by_ephemeral.remove(&(x.ephemeral, x.addr));
            if self.by_index.get(&local) == Some(&Slot::Handshake(h)) {
                self.by_index.remove(&local);
            }
        }
    }

    /// XX message 3: the client proves its key; its payload is the first
    /// request, a registration.
    fn finish(
        &mut self,
        now: Instant,
        from: SocketAddr,
        receiver: u64,
        noise: &[u8],
        datagram: &[u8],
    ) -> Option<Incoming> {
        match self.by_index.get(&receiver).copied() {
            Some(Slot::Handshake(h)) => {
                if self.handshakes[h].addr != from {
                    return None;
                }
                // A forged message 3 leaves the handshake as it was (snow
                // restores its state), so the real one still gets through.
                let mut buf = [0u8; MAX_DATAGRAM];
                let Ok(n) = self.handshakes[h].hs.read_message(noise, &mut buf) else {
                    self.stats.malformed += 1;
                    return None;
                };
                let x = *self.handshakes.remove(h);
                self.by_ephemeral.remove(&(x.ephemeral, x.addr));
                self.by_index.remove(&receiver);
                let Ok(Message::Register { seq, name }) = wire::decode(&buf[..n]) else {
                    self.stats.malformed += 1;
                    return None;
                };
                // A small-order key can be "proved" without a private key.
                if crypto::remote_static(&x.hs).is_none_or(|k| crypto::is_weak(&self.key, &k)) {
                    self.stats.malformed += 1;
                    return None;
                }
                let link = Link::new(x.hs, x.local, x.client)?;
                let slot = self.links.insert(Box::new(ServerLink {
                    link,
                    addr: from,
                    owner: None,
                    hello: Some(Box::new(Hello {
                        seq,
                        name: name.clone(),
                        finish: datagram.to_vec(),
                    })),
                    path: None,
                }));
                let id = self.id_of(slot);
                self.by_index.insert(receiver, Slot::Link(slot));
                self.unowned.push_back((now, id, receiver));
                self.expire(now);
                Some(Incoming::Message(id, Message::Register { seq, name }))
            }
            Some(Slot::Link(l)) => {
                // The same message 3 again (our answer was lost): the same
                // request again, which the reply cache answers. Once the
                // client sent session data it had its answer: a copy now is
                // a replay.
                let link = &self.links[l];
                let hello = link.hello.as_ref()?;
                if hello.finish != datagram || link.addr != from {
                    return None;
                }
                let (seq, name) = (hello.seq, hello.name.clone());
                Some(Incoming::Message(
                    self.id_of(l),
                    Message::Register { seq, name },
                ))
            }
            None => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn data(
        &mut self,
        now: Instant,
        from: SocketAddr,
        receiver: u64,
        nonce: u64,
        ciphertext: &[u8],
        len: usize,
        rng: &mut ChaCha12Rng,
        out: &mut VecDeque<Transmit>,
    ) -> Option<Incoming> {
        let l = match self.by_index.get(&receiver) {
            Some(Slot::Link(l)) => *l,
            // Data for a handshake that is not finished: nothing to say.
            Some(Slot::Handshake(_)) => return None,
            None => {
                // Not ours (any more): the client learns it without anyone
                // else being able to tell it so. Smaller than the datagram,
                // and no one can collect tokens in advance: indexes are 64
                // random bits.
                self.stats.resets += 1;
                let token = self.secrets.reset_token(receiver);
                let reset = Packet::Reset {
                    receiver,
                    token: &token,
                };
                out.push_back(Transmit {
                    to: from,
                    payload: reset.to_vec(),
                    what: What::Reset,
                });
                return None;
            }
        };
        let link = &mut self.links[l];
        let mut buf = [0u8; MAX_DATAGRAM];
        let Some(plain) = link.link.open(nonce, ciphertext, &mut buf) else {
            self.stats.malformed += 1;
            return None;
        };
        let Ok(msg) = wire::decode(plain) else {
            self.stats.malformed += 1;
            return None;
        };
        // A copy of message 3 is a replay from now on (see `finish`): its
        // bytes need not be kept (a tenth of a client's memory).
        link.hello = None;
        let id = LinkId {
            slot: l,
            index: receiver,
        };
        if from == link.addr {
            return Some(Incoming::Message(id, msg));
        }
        // Authenticated, from a new address: the client may have moved (a
        // NAT rebinding), or someone replays its datagrams from elsewhere.
        // Only an answer to a challenge sent there moves the session.
        if let Message::PathResponse { nonce } = msg
            && let Some(p) = &link.path
            && p.addr == from
            && p.nonce == nonce
        {
            link.addr = from;
            link.path = None;
            return Some(Incoming::Moved(id, from));
        }
        self.challenge(now, l, from, len, rng, out);
        Some(Incoming::Message(id, msg))
    }

    /// Sends (within the amplification limit) a path challenge to `addr`.
    #[allow(clippy::too_many_arguments)]
    fn challenge(
        &mut self,
        now: Instant,
        l: usize,
        addr: SocketAddr,
        len: usize,
        rng: &mut ChaCha12Rng,
        out: &mut VecDeque<Transmit>,
    ) {
        let link = &mut self.links[l];
        let path = match &mut link.path {
            Some(p) if p.addr == addr => p,
            _ => link.path.insert(Box::new(PathCheck {
                addr,
                nonce: rng.next_u64(),
                received: 0,
                sent: 0,
                last: None,
            })),
        };
        path.received += len;
        if path
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < PATH_RETRY)
        {
            return;
        }
        let plain = wire::encode_to_vec(&Message::PathChallenge { nonce: path.nonce });
        let Some(payload) = link.link.seal(&plain) else {
            return;
        };
        if path.sent + payload.len() > AMPLIFICATION * path.received {
            return;
        }
        path.sent += payload.len();
        path.last = Some(now);
        out.push_back(Transmit {
            to: addr,
            payload,
            what: What::PathChallenge,
        });
    }
}
