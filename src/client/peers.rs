//! Sessions with other clients: one `IK` handshake per peer key, then an
//! encrypted link that direct messages and their acks ride.
//!
//! A peer is its static key (the table says which name owns it). Either
//! side may start a handshake; the newest link that carried data becomes
//! the one to send on, and an ack goes back on the link its message came
//! on, so two clients that start at once still converge. A few older links
//! are kept to receive what is still in flight; the least recently used
//! peers are forgotten past a bound. Each peer also has the path our
//! messages take to it (direct, punched or relayed: `Path`), and
//! `Peers::punch` is our side of hole punching.

use std::collections::HashMap;
use std::net::SocketAddr;

use rand_chacha::ChaCha12Rng;
use rand_core::RngCore;
use snow::HandshakeState;

use super::Path;
use crate::Transmit;
use crate::crypto::{self, Keypair, Link, PublicKey};
use crate::packet::{IK1_LEN, IK2_LEN, MAX_DATAGRAM, Packet};
use crate::wire::{self, Message, What};

/// Links kept per peer besides the one sent on.
const OLDER_LINKS: usize = 2;

enum Slot {
    /// Our message 1 is out; the datagram is kept to send again.
    Initiating {
        key: PublicKey,
        hs: Box<HandshakeState>,
        datagram: Vec<u8>,
    },
    /// An established link. A link we answered keeps the message 1 it
    /// answered and our answer, so a retransmitted message 1 gets the same
    /// answer rather than a new session.
    Link {
        key: PublicKey,
        link: Box<Link>,
        answered: Option<(Vec<u8>, Vec<u8>)>,
    },
}

#[derive(Default)]
struct Peer {
    initiating: Option<u64>,
    /// The link to send on.
    current: Option<u64>,
    /// Links that may still receive, oldest first.
    older: Vec<u64>,
    used: u64,
    /// How our direct messages reach it, once something did.
    path: Option<Path>,
    /// The server had to help: a message to it fell back or was relayed,
    /// or the server asked us to punch towards it. A direct path found
    /// after that is a punched one.
    helped: bool,
}

/// What a datagram from a peer brought (handed over at once, never stored:
/// its size is no cost).
#[allow(clippy::large_enum_variant)]
pub(super) enum PeerInput {
    /// Nothing (or nothing valid).
    Nothing,
    /// Answer this (a handshake response).
    Reply(Transmit),
    /// A handshake from a key our table does not have: the table may be
    /// behind.
    UnknownKey,
    /// Our handshake with `key` finished: what waited for it can go.
    Established(PublicKey),
    /// A message on the link `index` from `key`.
    Message {
        key: PublicKey,
        index: u64,
        msg: Message,
    },
}

/// Every peer session of a client.
pub(super) struct Peers {
    slots: HashMap<u64, Slot>,
    peers: HashMap<PublicKey, Peer>,
    clock: u64,
    max: usize,
}

impl Peers {
    pub fn new(max: usize) -> Peers {
        Peers {
            slots: HashMap::new(),
            peers: HashMap::new(),
            clock: 0,
            max: max.max(1),
        }
    }

    /// Whether `index` is one of ours.
    pub fn owns(&self, index: u64) -> bool {
        self.slots.contains_key(&index)
    }

    fn fresh_index(&self, rng: &mut ChaCha12Rng, taken: impl Fn(u64) -> bool) -> u64 {
        loop {
            let i = rng.next_u64();
            if !self.slots.contains_key(&i) && !taken(i) {
                return i;
            }
        }
    }

    /// The datagrams that move `msg` towards the peer `key` at `addr`: the
    /// message on the current link, or (while there is none) our handshake's
    /// first message, started if need be. With `fresh`, a new handshake
    /// starts beside the current link: a message that went unanswered may
    /// have gone down a link the peer no longer has (it restarted), and the
    /// new link takes over once it is up.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        local: &Keypair,
        key: PublicKey,
        addr: SocketAddr,
        msg: &Message,
        fresh: bool,
        rng: &mut ChaCha12Rng,
        taken: impl Fn(u64) -> bool,
    ) -> Vec<Transmit> {
        let peer = self.touch(key);
        let mut out = Vec::new();
        if let Some(index) = peer.current
            && let Some(Slot::Link { link, .. }) = self.slots.get_mut(&index)
        {
            if let Some(payload) = link.seal(&wire::encode_to_vec(msg)) {
                out.push(Transmit {
                    to: addr,
                    payload,
                    what: msg.what(),
                });
            }
            if !fresh {
                return out;
            }
        }
        out.extend(self.initiate(local, key, addr, rng, taken));
        out
    }

    /// Our handshake's first message to `key` at `addr`: the one under way
    /// again, or a new one. Sent when the server says the peer cannot
    /// reach us (hole punching: the datagram opens our NAT towards it, and
    /// if it gets through, the handshake gives a link that proves the
    /// path), and beside every relayed message, to find a direct path.
    pub fn punch(
        &mut self,
        local: &Keypair,
        key: PublicKey,
        addr: SocketAddr,
        rng: &mut ChaCha12Rng,
        taken: impl Fn(u64) -> bool,
    ) -> Option<Transmit> {
        self.touch(key).helped = true;
        let out = self.initiate(local, key, addr, rng, taken);
        self.evict();
        out
    }

    fn initiate(
        &mut self,
        local: &Keypair,
        key: PublicKey,
        addr: SocketAddr,
        rng: &mut ChaCha12Rng,
        taken: impl Fn(u64) -> bool,
    ) -> Option<Transmit> {
        if let Some(index) = self.peers.get(&key).and_then(|p| p.initiating)
            && let Some(Slot::Initiating { datagram, .. }) = self.slots.get(&index)
        {
            return Some(Transmit {
                to: addr,
                payload: datagram.clone(),
                what: What::PeerInit,
            });
        }
        let mut seed = [0; 32];
        rng.fill_bytes(&mut seed);
        let mut hs = crypto::peer_initiator(local, &key, seed);
        let mut msg1 = [0u8; IK1_LEN];
        if !matches!(hs.write_message(&[], &mut msg1), Ok(IK1_LEN)) {
            return None;
        }
        let index = self.fresh_index(rng, taken);
        let datagram = Packet::PeerInit {
            sender: index,
            noise: &msg1,
        }
        .to_vec();
        if let Some(peer) = self.peers.get_mut(&key) {
            peer.initiating = Some(index);
        }
        self.slots.insert(
            index,
            Slot::Initiating {
                key,
                hs: Box::new(hs),
                datagram: datagram.clone(),
            },
        );
        self.evict();
        Some(Transmit {
            to: addr,
            payload: datagram,
            what: What::PeerInit,
        })
    }

    /// The peer `key`, marked as the most recently used.
    fn touch(&mut self, key: PublicKey) -> &mut Peer {
        self.clock += 1;
        let peer = self.peers.entry(key).or_default();
        peer.used = self.clock;
        peer
    }

    /// How direct messages reach `key`, if they ever did.
    pub fn path(&self, key: &PublicKey) -> Option<Path> {
        self.peers.get(key).and_then(|p| p.path)
    }

    /// A message to `key` could not go direct: the server was asked.
    pub fn fell_back(&mut self, key: PublicKey) {
        self.touch(key).helped = true;
        self.evict();
    }

    /// Messages between us and `key` go through the server (one of ours
    /// was relayed, or one of its came relayed), until a link proves a
    /// direct path.
    pub fn relayed(&mut self, key: PublicKey) {
        self.fell_back(key);
        if let Some(peer) = self.peers.get_mut(&key) {
            peer.path = Some(Path::Relayed);
        }
    }

    /// Our datagrams reach `key` at the address we send to, and its reach
    /// us: our handshake with it finished, or it acked our message. (Its
    /// own datagrams arriving prove only its way to us: behind a symmetric
    /// NAT it may reach us from a port we cannot reach it at.)
    pub fn proved(&mut self, key: PublicKey) {
        if let Some(peer) = self.peers.get_mut(&key) {
            peer.path = Some(if peer.helped {
                Path::Punched
            } else {
                Path::Direct
            });
        }
    }

    /// Sends `msg` on exactly the link `index` (an ack goes back the way
    /// its message came).
    pub fn reply(&mut self, index: u64, to: SocketAddr, msg: &Message) -> Option<Transmit> {
        let Some(Slot::Link { link, .. }) = self.slots.get_mut(&index) else {
            return None;
        };
        let payload = link.seal(&wire::encode_to_vec(msg))?;
        Some(Transmit {
            to,
            payload,
            what: msg.what(),
        })
    }

    /// A peer's message 1. `known` says whether a key owns a name in our
    /// table: a handshake from any other key is not answered.
    #[allow(clippy::too_many_arguments)]
    pub fn on_init(
        &mut self,
        local: &Keypair,
        from: SocketAddr,
        sender: u64,
        noise: &[u8; IK1_LEN],
        rng: &mut ChaCha12Rng,
        known: impl Fn(&PublicKey) -> bool,
        taken: impl Fn(u64) -> bool,
    ) -> PeerInput {
        // The same message 1 again: the same answer.
        for slot in self.slots.values() {
            if let Slot::Link {
                answered: Some((init, response)),
                ..
            } = slot
                && init.as_slice() == noise.as_slice()
            {
                return PeerInput::Reply(Transmit {
                    to: from,
                    payload: response.clone(),
                    what: What::PeerResponse,
                });
            }
        }
        let mut seed = [0; 32];
        rng.fill_bytes(&mut seed);
        let mut hs = crypto::peer_responder(local, seed);
        let mut scratch = [0u8; MAX_DATAGRAM];
        if hs.read_message(noise, &mut scratch).is_err() {
            return PeerInput::Nothing;
        }
        let Some(key) = crypto::remote_static(&hs) else {
            return PeerInput::Nothing;
        };
        // A small-order key can be "proved" without a private key.
        if crypto::is_weak(local, &key) {
            return PeerInput::Nothing;
        }
        if !known(&key) {
            return PeerInput::UnknownKey;
        }
        let mut msg2 = [0u8; IK2_LEN];
        if !matches!(hs.write_message(&[], &mut msg2), Ok(IK2_LEN)) {
            return PeerInput::Nothing;
        }
        let index = self.fresh_index(rng, taken);
        let response = Packet::PeerResponse {
            receiver: sender,
            sender: index,
            noise: &msg2,
        }
        .to_vec();
        let Some(link) = Link::new(hs, index, sender) else {
            return PeerInput::Nothing;
        };
        self.touch(key).older.push(index);
        self.slots.insert(
            index,
            Slot::Link {
                key,
                link: Box::new(link),
                answered: Some((noise.to_vec(), response.clone())),
            },
        );
        self.trim(key);
        self.evict();
        PeerInput::Reply(Transmit {
            to: from,
            payload: response,
            what: What::PeerResponse,
        })
    }

    /// A peer's message 2, answering ours.
    pub fn on_response(&mut self, receiver: u64, sender: u64, noise: &[u8; IK2_LEN]) -> PeerInput {
        let Some(Slot::Initiating { hs, .. }) = self.slots.get_mut(&receiver) else {
            return PeerInput::Nothing;
        };
        let mut scratch = [0u8; MAX_DATAGRAM];
        if hs.read_message(noise, &mut scratch).is_err() {
            // A forgery: snow restored its state, the real answer may come.
            return PeerInput::Nothing;
        }
        let Some(Slot::Initiating { key, hs, .. }) = self.slots.remove(&receiver) else {
            return PeerInput::Nothing;
        };
        if let Some(peer) = self.peers.get_mut(&key)
            && peer.initiating == Some(receiver)
        {
            peer.initiating = None;
        }
        let Some(link) = Link::new(*hs, receiver, sender) else {
            return PeerInput::Nothing;
        };
        if link.remote() != key {
            return PeerInput::Nothing;
        }
        self.slots.insert(
            receiver,
            Slot::Link {
                key,
                link: Box::new(link),
                answered: None,
            },
        );
        self.make_current(key, receiver);
        self.proved(key);
        PeerInput::Established(key)
    }

    /// Session data from a peer.
    pub fn on_data(&mut self, receiver: u64, nonce: u64, ciphertext: &[u8]) -> PeerInput {
        let Some(Slot::Link { key, link, .. }) = self.slots.get_mut(&receiver) else {
            return PeerInput::Nothing;
        };
        let key = *key;
        let mut buf = [0u8; MAX_DATAGRAM];
        let Some(plain) = link.open(nonce, ciphertext, &mut buf) else {
            return PeerInput::Nothing;
        };
        let Ok(msg) = wire::decode(plain) else {
            return PeerInput::Nothing;
        };
        // Data proves the link works both ways: the newest such link is
        // the one to send on.
        if self
            .peers
            .get(&key)
            .is_some_and(|p| p.current != Some(receiver))
        {
            self.make_current(key, receiver);
        }
        PeerInput::Message {
            key,
            index: receiver,
            msg,
        }
    }

    fn make_current(&mut self, key: PublicKey, index: u64) {
        let peer = self.touch(key);
        peer.older.retain(|&i| i != index);
        if let Some(old) = peer.current.replace(index) {
            peer.older.push(old);
        }
        self.trim(key);
    }

    /// Keeps at most [`OLDER_LINKS`] older links for `key`.
    fn trim(&mut self, key: PublicKey) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        while peer.older.len() > OLDER_LINKS {
            let index = peer.older.remove(0);
            self.slots.remove(&index);
        }
    }

    /// Forgets the least recently used peers past the bound.
    fn evict(&mut self) {
        while self.peers.len() > self.max {
            let Some((&key, _)) = self.peers.iter().min_by_key(|(k, p)| (p.used, **k)) else {
                return;
            };
            if let Some(peer) = self.peers.remove(&key) {
                for index in peer
                    .current
                    .into_iter()
                    .chain(peer.initiating)
                    .chain(peer.older)
                {
                    self.slots.remove(&index);
                }
            }
        }
    }
}
