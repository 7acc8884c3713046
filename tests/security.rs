//! Attacks an independent review found against the first version of
//! protocol 2, kept as tests: each plays the attack over the simulated
//! network and asserts the property the attack broke (it fails if the
//! weakness comes back).

mod sim;

use std::net::SocketAddr;
use std::time::Duration;

use sim::{EPOCH_UNIX, Sim, addr, drop_first, key_of, name, server_key};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use udpchat::crypto::{self, Keypair, Link, PublicKey, Seeded};
use udpchat::packet::{self, Datagram, Packet};
use udpchat::store::{Body, ClientRecord, Loaded, StoredMail};
use udpchat::wire::{self, MailBody, MailId, Message, MsgId, Text, What};
use udpchat::{Client, ClientConfig, Event};
use udpchat::{Server, ServerConfig};

// ---- a Noise party whose static key is the all-zero (low-order) point ----

const ZERO_SECRET: [u8; 32] = [0xEE; 32];

/// X25519 as snow does it, except that the static key set from
/// `ZERO_SECRET` has public key 0 and every DH with it gives 0 — exactly
/// what the honest side computes for DH(x, 0).
struct ZeroDh {
    inner: Box<dyn Dh>,
    zero: bool,
}

impl Dh for ZeroDh {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn pub_len(&self) -> usize {
        32
    }
    fn priv_len(&self) -> usize {
        32
    }
    fn set(&mut self, privkey: &[u8]) {
        if privkey == ZERO_SECRET {
            self.zero = true;
        } else {
            self.inner.set(privkey);
        }
    }
    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        self.inner.generate(rng)
    }
    fn pubkey(&self) -> &[u8] {
        if self.zero {
            &[0; 32]
        } else {
            self.inner.pubkey()
        }
    }
    fn privkey(&self) -> &[u8] {
        self.inner.privkey()
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        if self.zero {
            out[..32].fill(0);
            Ok(())
        } else {
            self.inner.dh(pubkey, out)
        }
    }
}

struct ZeroResolver([u8; 32]);

impl CryptoResolver for ZeroResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Seeded(self.0).resolve_rng()
    }
    fn resolve_dh(&self, c: &DHChoice) -> Option<Box<dyn Dh>> {
        Some(Box::new(ZeroDh {
            inner: DefaultResolver.resolve_dh(c)?,
            zero: false,
        }))
    }
    fn resolve_hash(&self, c: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(c)
    }
    fn resolve_cipher(&self, c: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(c)
    }
}

fn server_with(sim: &mut Sim, loaded: Loaded, max_handshakes: usize) {
    let mut config = ServerConfig::new([1; 32], server_key(), (sim.start, EPOCH_UNIX));
    config.max_handshakes = max_handshakes;
    // The server keeps committed bodies on disk: the store holds them.
    sim.store = udpchat::store::MemoryStore::holding(&loaded);
    sim.server = Server::new(config, sim.start, loaded);
}

fn packets_to(sim: &Sim, to: SocketAddr) -> Vec<Vec<u8>> {
    sim.log
        .iter()
        .filter(|p| p.to == to)
        .map(|p| p.payload.clone())
        .collect()
}

// ---- 1. impersonating a key-less (legacy / released) name -----------------

/// A name with no key yet (migrated from version 1, or released by the
/// operator) is in everyone's table with key NONE = the all-zero point.
/// Anyone — not even registered — can finish an IK handshake "as" that key
/// (ss = DH(s, 0) = 0) and is then shown as that name.
#[test]
fn a_small_order_key_gets_no_peer_session() {
    let mut sim = Sim::new();
    let loaded = Loaded {
        clients: vec![ClientRecord {
            name: name("Carol"),
            addr: addr(2999),
            key: None,
            seen_at: None,
        }],
        mail: vec![],
        highest_mail: None,
    };
    server_with(&mut sim, loaded, 4096);
    let bob = sim.join("Bob", 2001);
    let bob_key = key_of("Bob").public();

    // The attacker: no registration, no key of Carol's.
    let evil = addr(6666);
    let mut hs = snow::Builder::with_resolver(
        "Noise_IK_25519_ChaChaPoly_BLAKE2s".parse().unwrap(),
        Box::new(ZeroResolver([7; 32])),
    )
    .local_private_key(&ZERO_SECRET)
    .unwrap()
    .remote_public_key(&bob_key.0)
    .unwrap()
    .prologue(b"udpchat 2 peer")
    .unwrap()
    .build_initiator()
    .unwrap();
    let mut m1 = [0u8; packet::IK1_LEN];
    assert_eq!(hs.write_message(&[], &mut m1).unwrap(), packet::IK1_LEN);
    let init = Packet::PeerInit {
        sender: 77,
        noise: &m1,
    }
    .to_vec();
    let before = sim.lines(bob).len();
    sim.inject(evil, addr(2001), init);
    sim.run_for(Duration::from_millis(20));
    // Bob does not answer a handshake of a small-order key: no session, so
    // nothing it could send would be shown.
    assert!(
        !packets_to(&sim, evil).iter().any(|p| p[1] == 7),
        "Bob answered the handshake of key 0"
    );
    assert_eq!(sim.lines(bob).len(), before);
}

// ---- 2. name takeover through a reused LinkId ------------------------------

/// Alice comes back from a new address while her old session looks online:
/// her registration waits on a probe, keyed by the LinkId (a slab index).
/// An attacker completes enough handshakes to push her unowned link out of
/// the `unowned` queue and gets the freed slot for a link of its own key; when
/// the probe times out, `accept` binds Alice's name to the attacker's key.
/// (max_handshakes = 4 only to keep the test small; the default is 4096,
/// which the attacker must match within the 500 ms probe.)
#[test]
fn a_waiting_registration_is_never_accepted_for_another_key() {
    let mut sim = Sim::new();
    server_with(&mut sim, Loaded::default(), 4);
    let alice = sim.join("Alice", 2000);
    let bob = sim.join("Bob", 2001);
    // Alice leaves silently, and comes back at once from another port.
    sim.crash(alice);
    let alice2 = sim.spawn_keyed("Alice", 2002, key_of("Alice"));
    sim.run_for(Duration::from_millis(10));
    // The attacker, one key, a few registrations of its own names.
    for i in 0..4u16 {
        sim.spawn_keyed(&format!("m{i}"), 3000 + i, key_of("Mallory"));
        sim.run_for(Duration::from_millis(10));
    }
    sim.run_for(Duration::from_secs(3));
    let id = sim.server.table().lookup(&name("Alice")).unwrap();
    let entry = sim.server.table().get(id).clone();
    println!("Alice's row now: {entry:?}");
    println!("Alice (2002) printed: {:?}", sim.lines(alice2));
    println!(
        "Bob's table row for Alice: {:?}",
        sim.nodes[bob].client.table().get(&name("Alice"))
    );
    assert_eq!(
        entry.key,
        key_of("Alice").public(),
        "the name Alice is now bound to another key (at {})",
        entry.addr
    );
}

// ---- 3. a replayed Finish logs a deregistered client back in --------------

#[test]
fn a_replayed_finish_changes_nothing() {
    let mut sim = Sim::new();
    let alice = sim.join("Alice", 2000);
    let finish = sim
        .log
        .iter()
        .find(|p| p.from == addr(2000) && p.is(What::Finish))
        .unwrap()
        .payload
        .clone();
    // Ordinary use: a few channel messages push the registration's reply
    // out of the 16-entry reply cache.
    for i in 0..16 {
        sim.command(alice, &format!("send_all hello {i}"));
    }
    sim.command(alice, "dereg Alice");
    let id = sim.server.table().lookup(&name("Alice")).unwrap();
    assert!(!sim.server.table().get(id).online);
    // An on-path attacker replays the handshake's last message (spoofing
    // Alice's address, as it saw it).
    sim.inject(addr(2000), sim.server_addr, finish);
    sim.run_for(Duration::from_millis(20));
    assert!(
        !sim.server.table().get(id).online,
        "a replayed datagram logged Alice back in: she is online again"
    );
}

// ---- 4. one spoofed datagram makes a client exit ---------------------------

/// The negotiation answer is unauthenticated and needs no secret: an
/// off-path spoofer sends [0, 1] "from the server" while the client is at
/// its first handshake message (start-up, and every reconnect).
#[test]
fn a_spoofed_version_answer_does_not_end_the_registration() {
    let mut sim = Sim::new();
    let alice = sim.spawn("Alice", 2000);
    let server = sim.server_addr;
    sim.inject(server, addr(2000), vec![packet::NEGOTIATE, 1]);
    sim.run_for(Duration::from_secs(3));
    println!("{:?}", sim.lines(alice));
    assert_eq!(sim.nodes[alice].exit, None, "the client exited");
    assert_eq!(
        sim.lines(alice),
        [
            ">>> [Welcome, You are registered.]",
            ">>> [Client table updated.]"
        ]
    );
}

/// What a spoofed answer cannot do, a real one does: a server that never
/// completes a handshake but says it speaks another version is named.
#[test]
fn a_version_answer_is_reported_when_no_handshake_completes() {
    let mut sim = Sim::new();
    sim.drop_rules.push(sim::drop_all(|p| p.is(What::Retry)));
    let alice = sim.spawn("Alice", 2000);
    let server = sim.server_addr;
    sim.inject(server, addr(2000), vec![packet::NEGOTIATE, 3]);
    sim.run_for(Duration::from_secs(5));
    assert_eq!(
        sim.lines(alice),
        [">>> [Error: server speaks protocol version 3; this client speaks 2.]"]
    );
    assert_eq!(sim.nodes[alice].exit, Some(1));
}

/// A server whose key really changed is refused, after the tries, with the
/// key-change line, and was sent nothing but handshakes.
#[test]
fn a_changed_server_key_is_refused_after_the_tries() {
    let mut sim = Sim::new();
    let pinned = Keypair::from_secret([0x44; 32]).public();
    let alice = sim.spawn_with("Alice", 2000, key_of("Alice"), Some(pinned));
    sim.run_for(Duration::from_secs(5));
    let lines = sim.lines(alice);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("not the key"), "{lines:?}");
    assert_eq!(sim.nodes[alice].exit, Some(1));
    let sent: Vec<_> = sim.log.iter().filter(|p| p.from == addr(2000)).collect();
    assert!(
        sent.iter().all(|p| p.is(What::Initial)),
        "{:?}",
        sent.iter().map(|p| p.what).collect::<Vec<_>>()
    );
    assert_eq!(sim.server.table().len(), 0);
}

/// An on-path attacker who sees the client's `Initial` (its index is in
/// clear) answers first with a message 2 of its own key: the client exits
/// with "the server's key changed", although the real server's answer is on
/// its way.
#[test]
fn a_forged_response_does_not_end_the_registration() {
    let mut sim = Sim::new();
    let alice = sim.spawn("Alice", 2000);
    let initial = sim
        .log
        .iter()
        .find(|p| p.from == addr(2000) && p.is(What::Initial))
        .unwrap()
        .payload
        .clone();
    let Ok(Datagram::Packet(Packet::Initial { sender, noise, .. })) = packet::parse(&initial)
    else {
        panic!()
    };
    let mut hs = crypto::server_handshake(&Keypair::from_secret([0x66; 32]), [3; 32]);
    let mut scratch = [0u8; 1200];
    hs.read_message(noise, &mut scratch).unwrap();
    let mut m2 = [0u8; packet::XX2_LEN];
    hs.write_message(&[], &mut m2).unwrap();
    let forged = Packet::Response {
        receiver: sender,
        sender: 1,
        noise: &m2,
    }
    .to_vec();
    let server = sim.server_addr;
    sim.inject(server, addr(2000), forged);
    sim.run_for(Duration::from_secs(3));
    println!("{:?}", sim.lines(alice));
    assert_eq!(
        sim.nodes[alice].exit, None,
        "one forged datagram ended the client"
    );
    // The next try met the real server: registered, no warning.
    assert_eq!(
        sim.lines(alice),
        [
            ">>> [Welcome, You are registered.]",
            ">>> [Client table updated.]"
        ]
    );
}

// ---- 5. stored mail the server (or a store writer) forged ------------------

/// What the client accepts from the server as "stored direct message from
/// Alice": a seal checked against the key the *delivery itself* names, or no
/// seal at all (`Relayed`, channel = false). Both rows below were written by
/// someone holding neither Alice's key nor the server's: they only wrote to
/// udpchat.db (or ran a modified server).
#[test]
fn stored_mail_is_shown_as_alices_only_if_her_key_sealed_it() {
    let mut sim = Sim::new();
    let mallory = Keypair::from_secret([0x66; 32]);
    let bob_pub = key_of("Bob").public();
    let body = wire::encode_body(&MailBody {
        id: MsgId(42),
        text: Text::new("forged but sealed").unwrap(),
    });
    let sealed = crypto::seal_mail(
        &mallory,
        &name("Alice"),
        &bob_pub,
        &name("Bob"),
        &body,
        [5; 32],
    );
    let row = |mail, body| StoredMail {
        mail: MailId(mail),
        to: name("Bob"),
        from: name("Alice"),
        channel: false,
        stored_at: EPOCH_UNIX,
        id: MsgId(mail),
        body,
    };
    let loaded = Loaded {
        clients: vec![
            ClientRecord {
                name: name("Alice"),
                addr: addr(2000),
                key: Some(key_of("Alice").public()),
                seen_at: None,
            },
            ClientRecord {
                name: name("Bob"),
                addr: addr(2001),
                key: Some(bob_pub),
                seen_at: None,
            },
        ],
        mail: vec![
            row(
                1,
                Body::Sealed {
                    key: mallory.public(),
                    sealed,
                },
            ),
            row(2, Body::Clear("forged in clear".to_string())),
        ],
        highest_mail: None,
    };
    server_with(&mut sim, loaded, 4096);
    let bob = sim.join("Bob", 2001);
    let lines = sim.lines(bob);
    println!("{lines:?}");
    // The seal is not Alice's key's: the server drops it when it loads it.
    assert!(
        !lines.iter().any(|l| l.contains("forged but sealed")),
        "Bob shows a sealed message as from Alice that her key never sealed: {lines:?}"
    );
    assert_eq!(sim.server.mailbox(&name("Bob")).count(), 0);
    // A clear one (what only protocol version 1 stored) proves no sender:
    // it is shown, marked as such, never as Alice's word.
    let clear: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("forged in clear"))
        .collect();
    assert_eq!(clear.len(), 1, "{lines:?}");
    assert!(clear[0].ends_with(" (unverified)"), "{lines:?}");
}

// ---- 6. reset tokens can be collected before a session exists ---------------

/// The reset token is HMAC(server key, index) with a 32-bit index, handed to
/// anyone who sends a Data datagram for an index not in use. Collected in
/// advance (2^32 · 31 bytes ≈ 133 GB covers every index, forever: the key
/// never changes), it resets any later session whose index an observer sees.
#[test]
fn reset_tokens_cannot_be_collected_in_advance() {
    // The attacker asks for the tokens of many indexes; a session index is
    // 64 random bits, so none of them is one the server will hand out.
    let mut sim = Sim::new();
    let evil = addr(6666);
    let mut asked = std::collections::HashSet::new();
    let mut sent = 0;
    for i in 0..2_000u64 {
        let index = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        asked.insert(index);
        let probe = Packet::Data {
            receiver: index,
            nonce: 0,
            ciphertext: &[0; 17],
        }
        .to_vec();
        sent += probe.len();
        sim.inject(evil, sim.server_addr, probe);
    }
    sim.run_for(Duration::from_millis(100));
    let resets = packets_to(&sim, evil);
    let got: usize = resets.iter().map(Vec::len).sum();
    assert_eq!(resets.len(), 2_000);
    assert!(got < sent, "{got} bytes of resets for {sent}");
    let alice = sim.join("Alice", 2000);
    let index = sim
        .log
        .iter()
        .find_map(|p| match packet::parse(&p.payload) {
            Ok(Datagram::Packet(Packet::Data { receiver, .. })) if p.from == addr(2000) => {
                Some(receiver)
            }
            _ => None,
        })
        .unwrap();
    assert!(!asked.contains(&index), "the attacker holds Alice's token");
    // The server loses every session; while the attacker keeps asking, Alice
    // still gets her reset and comes back.
    let config = ServerConfig::new([2; 32], server_key(), (sim.start, EPOCH_UNIX));
    let loaded = udpchat::store::Store::load(&mut sim.store).unwrap();
    sim.server = Server::new(config, sim.now, loaded);
    for i in 0..2_000u64 {
        let probe = Packet::Data {
            receiver: i,
            nonce: 0,
            ciphertext: &[0; 17],
        }
        .to_vec();
        sim.inject(evil, sim.server_addr, probe);
    }
    sim.run_until(Duration::from_secs(30), |s| {
        s.lines(alice).contains(&">>> [Reconnected to server.]")
    });
    assert!(sim.lines(alice).contains(&">>> [Reconnected to server.]"));
}

#[allow(dead_code)]
fn unused(_: PublicKey) {}

// ---- 2b. the same takeover at the default limit (4096) ---------------------

fn pump_server(sim: &mut Sim, evil: SocketAddr, got: &mut Vec<Vec<u8>>) {
    while let Some(op) = sim.server.poll_store() {
        let _ = op;
        sim.server.handle_committed();
    }
    while let Some(t) = sim.server.poll_transmit() {
        if t.to.port() >= 40000 || t.to == evil {
            got.push(t.payload);
        } else {
            let from = sim.server_addr;
            sim.inject(from, t.to, t.payload);
        }
    }
    while let Some(op) = sim.server.poll_store() {
        let _ = op;
        sim.server.handle_committed();
    }
}

#[test]
fn no_takeover_at_the_default_handshake_limit() {
    let mut sim = Sim::new();
    let alice = sim.join("Alice", 2000);
    sim.join("Bob", 2001);
    sim.crash(alice);
    let evil = addr(40000);
    let mallory = key_of("Mallory");
    // A cookie for the attacker's one address.
    let mut got = Vec::new();
    let mut hs0 = crypto::client_handshake(&mallory, [9; 32]);
    let mut m1 = [0u8; 48];
    hs0.write_message(&[], &mut m1).unwrap();
    let first = Packet::Initial {
        sender: 0,
        cookie: None,
        noise: (&m1[..32]).try_into().unwrap(),
    }
    .to_vec();
    let now = sim.now;
    sim.server.handle_datagram(now, evil, &first);
    pump_server(&mut sim, evil, &mut got);
    let Ok(Datagram::Packet(Packet::Retry { cookie, .. })) = packet::parse(&got[0]) else {
        panic!()
    };
    let cookie = *cookie;
    // Stage 4095 handshakes at message 2 beforehand (they live 10 s).
    let staged = 4095usize;
    let mut pending = Vec::new();
    let t0 = std::time::Instant::now();
    for i in 0..staged {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let mut hs = crypto::client_handshake(&mallory, seed);
        let mut m1 = [0u8; 48];
        hs.write_message(&[], &mut m1).unwrap();
        let init = Packet::Initial {
            sender: i as u64,
            cookie: Some(&cookie),
            noise: (&m1[..32]).try_into().unwrap(),
        }
        .to_vec();
        got.clear();
        let now = sim.now;
        sim.server.handle_datagram(now, evil, &init);
        pump_server(&mut sim, evil, &mut got);
        let Ok(Datagram::Packet(Packet::Response { sender, noise, .. })) = packet::parse(&got[0])
        else {
            panic!()
        };
        let mut scratch = [0u8; 1200];
        hs.read_message(noise, &mut scratch).unwrap();
        let reg = wire::encode_to_vec(&Message::Register {
            seq: wire::Seq(1),
            name: name("Bob"),
        });
        let mut m3 = vec![0u8; 200];
        let n = hs.write_message(&reg, &mut m3).unwrap();
        m3.truncate(n);
        pending.push(
            Packet::Finish {
                receiver: sender,
                noise: &m3,
            }
            .to_vec(),
        );
    }
    println!("staging {staged} handshakes: {:?}", t0.elapsed());
    // Alice comes back from another port; her registration waits on a probe.
    let alice2 = sim.spawn_keyed("Alice", 2002, key_of("Alice"));
    sim.run_for(Duration::from_millis(10));
    // The attacker fires the staged message 3s (each a registration).
    let t1 = std::time::Instant::now();
    for f in &pending {
        let now = sim.now;
        sim.server.handle_datagram(now, evil, f);
        got.clear();
        pump_server(&mut sim, evil, &mut got);
    }
    // Two more full handshakes: the first frees Alice's slot, the second
    // is stored in it.
    for i in 0..2u64 {
        let mut seed = [0xAB; 32];
        seed[..8].copy_from_slice(&i.to_le_bytes());
        let mut hs = crypto::client_handshake(&mallory, seed);
        let mut m1 = [0u8; 48];
        hs.write_message(&[], &mut m1).unwrap();
        let init = Packet::Initial {
            sender: 90_000 + i,
            cookie: Some(&cookie),
            noise: (&m1[..32]).try_into().unwrap(),
        }
        .to_vec();
        got.clear();
        let now = sim.now;
        sim.server.handle_datagram(now, evil, &init);
        pump_server(&mut sim, evil, &mut got);
        let Ok(Datagram::Packet(Packet::Response { sender, noise, .. })) = packet::parse(&got[0])
        else {
            panic!()
        };
        let mut scratch = [0u8; 1200];
        hs.read_message(noise, &mut scratch).unwrap();
        let reg = wire::encode_to_vec(&Message::Register {
            seq: wire::Seq(1),
            name: name("Bob"),
        });
        let mut m3 = vec![0u8; 200];
        let n = hs.write_message(&reg, &mut m3).unwrap();
        m3.truncate(n);
        let fin = Packet::Finish {
            receiver: sender,
            noise: &m3,
        }
        .to_vec();
        let now = sim.now;
        sim.server.handle_datagram(now, evil, &fin);
        got.clear();
        pump_server(&mut sim, evil, &mut got);
    }
    println!(
        "server time for {} Finish datagrams (+2 handshakes): {:?}",
        pending.len(),
        t1.elapsed()
    );
    sim.run_for(Duration::from_secs(3));
    let id = sim.server.table().lookup(&name("Alice")).unwrap();
    let entry = sim.server.table().get(id).clone();
    println!(
        "Alice's row: {entry:?}; Alice printed {:?}",
        sim.lines(alice2)
    );
    assert_eq!(
        entry.key,
        key_of("Alice").public(),
        "name Alice bound to another key"
    );
}

/// The server accepts a registration whose static key is the all-zero
/// point: the name stays "unbound" (anyone may take it) and the key is one
/// nobody has to hold.
#[test]
fn the_server_refuses_a_small_order_key() {
    let mut sim = Sim::new();
    let evil = addr(40000);
    let mut got = Vec::new();
    let mk = || {
        snow::Builder::with_resolver(
            "Noise_XX_25519_ChaChaPoly_BLAKE2s".parse().unwrap(),
            Box::new(ZeroResolver([8; 32])),
        )
        .local_private_key(&ZERO_SECRET)
        .unwrap()
        .prologue(b"udpchat 2 client-server")
        .unwrap()
        .build_initiator()
        .unwrap()
    };
    let mut hs = mk();
    let mut m1 = [0u8; 48];
    hs.write_message(&[], &mut m1).unwrap();
    let noise: &[u8; 32] = (&m1[..32]).try_into().unwrap();
    let now = sim.now;
    sim.server.handle_datagram(
        now,
        evil,
        &Packet::Initial {
            sender: 1,
            cookie: None,
            noise,
        }
        .to_vec(),
    );
    pump_server(&mut sim, evil, &mut got);
    let Ok(Datagram::Packet(Packet::Retry { cookie, .. })) = packet::parse(&got[0]) else {
        panic!()
    };
    let cookie = *cookie;
    got.clear();
    sim.server.handle_datagram(
        now,
        evil,
        &Packet::Initial {
            sender: 1,
            cookie: Some(&cookie),
            noise,
        }
        .to_vec(),
    );
    pump_server(&mut sim, evil, &mut got);
    let Ok(Datagram::Packet(Packet::Response { sender, noise, .. })) = packet::parse(&got[0])
    else {
        panic!()
    };
    let mut scratch = [0u8; 1200];
    hs.read_message(noise, &mut scratch).unwrap();
    let reg = wire::encode_to_vec(&Message::Register {
        seq: wire::Seq(1),
        name: name("Dave"),
    });
    let mut m3 = vec![0u8; 200];
    let n = hs.write_message(&reg, &mut m3).unwrap();
    m3.truncate(n);
    got.clear();
    sim.server.handle_datagram(
        now,
        evil,
        &Packet::Finish {
            receiver: sender,
            noise: &m3,
        }
        .to_vec(),
    );
    pump_server(&mut sim, evil, &mut got);
    let id = sim.server.table().lookup(&name("Dave"));
    println!(
        "Dave: {:?}",
        id.map(|id| sim.server.table().get(id).clone())
    );
    assert!(
        id.is_none_or(|id| !sim.server.table().get(id).online),
        "registered with key 0"
    );
}

/// The same replay, as an amplifier: one ~100-byte replayed Finish makes
/// the server stream the mailbox (and retransmit it) to the client's address.
#[test]
fn a_replayed_finish_is_not_amplified() {
    let mut sim = Sim::new();
    let alice = sim.join("Alice", 2000);
    let bob = sim.join("Bob", 2001);
    let finish = sim
        .log
        .iter()
        .find(|p| p.from == addr(2000) && p.is(What::Finish))
        .unwrap()
        .payload
        .clone();
    for i in 0..16 {
        sim.command(alice, &format!("send_all hello {i}"));
    }
    sim.command(alice, "dereg Alice");
    let long = "x".repeat(1000);
    for _ in 0..16 {
        sim.command(bob, &format!("send Alice {long}"));
    }
    let before: usize = sim
        .log
        .iter()
        .filter(|p| p.to == addr(2000))
        .map(|p| p.payload.len())
        .sum();
    sim.inject(addr(2000), sim.server_addr, finish.clone());
    sim.run_for(Duration::from_secs(5));
    let after: usize = sim
        .log
        .iter()
        .filter(|p| p.to == addr(2000))
        .map(|p| p.payload.len())
        .sum();
    println!(
        "replayed {} bytes; the server sent {} bytes to Alice's address",
        finish.len(),
        after - before
    );
    assert!(after - before <= 3 * finish.len());
}

#[test]
fn replay_window_model_with_huge_jumps() {
    use std::collections::HashSet;
    use udpchat::crypto::{REPLAY_WINDOW, ReplayWindow};
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200 {
        let mut w = ReplayWindow::default();
        let mut seen = HashSet::new();
        let mut top: Option<u64> = None;
        let base = if round % 2 == 0 { 0 } else { u64::MAX - 5000 };
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = match x % 5 {
                0 => base.saturating_add(x % 5000),
                1 => top.unwrap_or(base).saturating_add(x % 2000),
                2 => top.unwrap_or(base).saturating_sub(x % 1100),
                3 => u64::MAX - (x % 70),
                _ => top.unwrap_or(0).saturating_add(1 << (x % 64)),
            };
            let expect = !seen.contains(&n)
                && match top {
                    None => true,
                    Some(t) => n > t || t - n < REPLAY_WINDOW,
                };
            assert_eq!(w.fresh(n), expect, "n={n} top={top:?}");
            if expect {
                w.mark(n);
                seen.insert(n);
                top = Some(top.map_or(n, |t| t.max(n)));
            }
        }
    }
}

/// A lying server: it gave Bob a table with Alice's real key, then delivers
/// a message "from Alice" sealed by another key, vouching for that key.
/// Bob believes his table over the delivery: nothing is shown as Alice's.
/// (The test plays the server itself, handshake included.)
/// Bob, registered with a server the test plays (it holds the server's
/// key and Bob's session), whose table has Alice with her real key.
struct FakeServer {
    bob: Client,
    link: Link,
    start: std::time::Instant,
    addr: SocketAddr,
    /// The welcome's sequence number (a mail batch's id).
    batch: wire::Seq,
}

impl FakeServer {
    fn new() -> FakeServer {
        let start = std::time::Instant::now();
        let server_keys = server_key();
        let server_addr = addr(1024);
        let config = ClientConfig::new(
            name("Bob"),
            server_addr,
            [3; 32],
            key_of("Bob"),
            Some(server_keys.public()),
        );
        let mut bob = Client::new(config, start);
        let first = bob.poll_transmit().expect("message 1");
        let Ok(Datagram::Packet(Packet::Initial { sender, noise, .. })) =
            packet::parse(&first.payload)
        else {
            panic!("not an initial")
        };
        // Message 2 (the fake server skips the cookie).
        let mut hs = crypto::server_handshake(&server_keys, [4; 32]);
        let mut scratch = [0u8; 1200];
        hs.read_message(noise, &mut scratch).unwrap();
        let mut m2 = [0u8; packet::XX2_LEN];
        hs.write_message(&[], &mut m2).unwrap();
        let response = Packet::Response {
            receiver: sender,
            sender: 9,
            noise: &m2,
        }
        .to_vec();
        bob.handle_datagram(start, server_addr, &response);
        let finish = bob.poll_transmit().expect("message 3");
        let Ok(Datagram::Packet(Packet::Finish { noise, .. })) = packet::parse(&finish.payload)
        else {
            panic!("not a finish")
        };
        let n = hs.read_message(noise, &mut scratch).unwrap();
        let Ok(Message::Register { seq, .. }) = wire::decode(&scratch[..n]) else {
            panic!("not a registration")
        };
        let link = Link::new(hs, 9, sender).unwrap();
        let mut fake = FakeServer {
            bob,
            link,
            start,
            addr: server_addr,
            batch: seq,
        };
        // Welcome, then the table: Alice with her real key.
        fake.send(&Message::Welcome {
            seq,
            version: 1,
            mail: 0,
            reset: [0; 16],
        });
        fake.events();
        assert!(fake.sent().contains(&What::Sync), "a sync");
        let alice_row = wire::Entry {
            name: name("Alice"),
            addr: addr(2000),
            online: false,
            key: key_of("Alice").public(),
        };
        // The sync's seq is the welcome's + 1 (the client counts up).
        fake.send(&Message::Page {
            seq: wire::Seq(seq.0.wrapping_add(1)),
            version: 1,
            from: 0,
            entries: [alice_row].into_iter().collect(),
            next: None,
        });
        assert!(
            fake.bob.table().get(&name("Alice")).is_some(),
            "Bob has Alice's row"
        );
        fake.events();
        fake.sent();
        fake
    }

    /// Feeds `msg` to Bob in his session.
    fn send(&mut self, msg: &Message) {
        let d = self.link.seal(&wire::encode_to_vec(msg)).unwrap();
        self.bob.handle_datagram(self.start, self.addr, &d);
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.bob.poll_event()).collect()
    }

    /// What Bob sent since last asked.
    fn sent(&mut self) -> Vec<What> {
        std::iter::from_fn(|| self.bob.poll_transmit())
            .map(|t| t.what)
            .collect()
    }
}

/// `text` as `signer` seals it for Bob, claiming to be from Alice.
fn sealed_as_alice(signer: &Keypair, text: &str) -> wire::Sealed {
    let body = wire::encode_body(&MailBody {
        id: MsgId(1),
        text: Text::new(text).unwrap(),
    });
    let sealed = crypto::seal_mail(
        signer,
        &name("Alice"),
        &key_of("Bob").public(),
        &name("Bob"),
        &body,
        [5; 32],
    );
    wire::Sealed::from_slice(&sealed).unwrap()
}

#[test]
fn a_delivery_vouching_for_another_key_than_the_table_is_refused() {
    let mut fake = FakeServer::new();
    // The lie: sealed by Mallory, vouched for as Alice's.
    let mallory = Keypair::from_secret([0x66; 32]);
    fake.send(&Message::Deliver {
        mail: MailId(1),
        batch: fake.batch,
        pos: None,
        stored_at: EPOCH_UNIX,
        from: name("Alice"),
        content: wire::Content::Sealed {
            key: mallory.public(),
            sealed: sealed_as_alice(&mallory, "forged, vouched for"),
        },
    });
    let events = fake.events();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Stored { .. } | Event::Direct { .. })),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Unverifiable(n) if *n == name("Alice"))),
        "{events:?}"
    );
}

/// A server that lies in a relay shows Bob nothing as from anyone: not a
/// seal of another key vouched for as Alice's, not clear text it claims to
/// relay, not a message from a name Bob's table lacks (he catches up
/// instead, and does not ack: a true relay comes again). Alice's own seal,
/// relayed, is shown as her direct message.
#[test]
fn a_relay_the_server_made_up_is_never_shown() {
    let mut fake = FakeServer::new();
    let mallory = Keypair::from_secret([0x66; 32]);
    let lies = [
        (
            name("Alice"),
            wire::Content::Sealed {
                key: mallory.public(),
                sealed: sealed_as_alice(&mallory, "forged relay"),
            },
        ),
        (
            name("Alice"),
            wire::Content::Relayed {
                channel: false,
                verified: true,
                id: MsgId(2),
                text: Text::new("clear relay").unwrap(),
            },
        ),
    ];
    for (k, (from, content)) in lies.into_iter().enumerate() {
        fake.send(&Message::Relayed {
            mail: MailId(10 + k as u64),
            from,
            content,
        });
        let events = fake.events();
        assert!(
            !events.iter().any(|e| matches!(e, Event::Direct { .. })),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Unverifiable(n) if *n == name("Alice"))),
            "{events:?}"
        );
    }
    // From a name Bob's table does not have: nothing shown, nothing acked,
    // a sync to catch up.
    let carol = Keypair::from_secret([0x77; 32]);
    let body = wire::encode_body(&MailBody {
        id: MsgId(3),
        text: Text::new("from nowhere").unwrap(),
    });
    let sealed = crypto::seal_mail(
        &carol,
        &name("Carol"),
        &key_of("Bob").public(),
        &name("Bob"),
        &body,
        [6; 32],
    );
    fake.sent();
    fake.send(&Message::Relayed {
        mail: MailId(20),
        from: name("Carol"),
        content: wire::Content::Sealed {
            key: carol.public(),
            sealed: wire::Sealed::from_slice(&sealed).unwrap(),
        },
    });
    assert_eq!(fake.events(), []);
    assert_eq!(fake.sent(), [What::Sync]);
    // The truth: Alice's seal, relayed, is her direct message, acked.
    let alice = key_of("Alice");
    fake.send(&Message::Relayed {
        mail: MailId(30),
        from: name("Alice"),
        content: wire::Content::Sealed {
            key: alice.public(),
            sealed: sealed_as_alice(&alice, "really from Alice"),
        },
    });
    assert_eq!(
        fake.events(),
        [Event::Direct {
            from: name("Alice"),
            text: Text::new("really from Alice").unwrap()
        }]
    );
    assert_eq!(fake.sent(), [What::Delivered]);
}

fn three_clients() -> Sim {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.join("Carol", 4000);
    s
}

fn rec(n: &str, port: u16, key: Keypair) -> ClientRecord {
    ClientRecord {
        name: name(n),
        addr: addr(port),
        key: Some(key.public()),
        seen_at: None,
    }
}

/// Alice's address changes (a NAT rebinding) and the server's first three
/// challenges to the new one are lost; then the network heals.
fn moved_while_challenges_are_lost() -> Sim {
    let mut s = three_clients();
    s.nodes[0].addr = addr(2500);
    s.drop_rules.push(drop_first(3, |p| {
        p.to == addr(2500) && p.is(What::PathChallenge)
    }));
    for _ in 0..3 {
        s.line(0, "send_all while challenges are lost");
        s.run_for(Duration::from_millis(700));
    }
    s.settle();
    s
}

/// (Second review, F1.) After lost path challenges the server challenges
/// the new address again, so the session moves and Alice hears it again
/// (it used to stop after three, and every reply went to the dead address).
#[test]
fn lost_path_challenges_do_not_strand_a_session() {
    let mut s = moved_while_challenges_are_lost();
    let a = s.nodes[0].lines.len();
    s.command(0, "send_all after the network healed");
    let alice = s.server.table().lookup(&name("Alice")).unwrap();
    assert_eq!(s.server.table().get(alice).addr, addr(2500));
    assert!(
        s.lines_since(0, a)
            .contains(&">>> [Message received by Server.]"),
        "Alice never hears the server again: {:?}",
        s.lines_since(0, a)
    );
}

/// (F1b.) The same, then a direct message to a peer that left silently:
/// the fallback's "saved" reaches Alice at her new address, so she does not
/// give up and exit.
#[test]
fn a_client_that_moved_still_gets_its_saves_answered() {
    let mut s = moved_while_challenges_are_lost();
    s.run_for(Duration::from_secs(300));
    s.crash(2);
    let a = s.nodes[0].lines.len();
    s.command(0, "send Carol are you there");
    assert_eq!(s.nodes[0].exit, None, "{:?}", s.lines_since(0, a));
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [No ACK from Carol, message sent to server.]",
            ">>> [Client table updated.]",
            ">>> [Messages received by the server and saved]"
        ]
    );
}

/// (F4a.) Someone who can write udpchat.db but has no server.key adds a
/// kind-0 (clear) row with channel = 1: the server encrypts it itself and
/// Alice shows it as Bob's channel message, unmarked.
#[test]
fn a_clear_channel_row_written_into_the_store_is_shown_unverified() {
    let mut sim = Sim::new();
    let loaded = Loaded {
        clients: vec![
            rec("Alice", 2000, key_of("Alice")),
            rec("Bob", 3000, key_of("Bob")),
        ],
        mail: vec![StoredMail {
            mail: MailId(1),
            to: name("Alice"),
            from: name("Bob"),
            channel: true,
            stored_at: EPOCH_UNIX,
            id: MsgId(7),
            body: Body::Clear("pay Mallory 100".to_string()),
        }],
        highest_mail: None,
    };
    let config = ServerConfig::new([1; 32], server_key(), (sim.start, EPOCH_UNIX));
    sim.store = udpchat::store::MemoryStore::holding(&loaded);
    sim.server = Server::new(config, sim.start, loaded);
    let alice = sim.join("Alice", 2000);
    println!("{:?}", sim.lines(alice));
    // Never as Bob's word: marked, because nothing proved who wrote it.
    let lines = sim.lines(alice);
    let shown: Vec<&&str> = lines.iter().filter(|l| l.contains("pay Mallory")).collect();
    assert_eq!(shown.len(), 1, "{lines:?}");
    assert!(shown[0].ends_with(" (unverified)"), "{lines:?}");
}

/// (F5.) One session, one handshake, tries to register registers any number of new names by
/// sending `Register` as ordinary session data ("a session registers once"
/// is only checked for names that already exist).
#[test]
fn one_session_registers_one_name() {
    use udpchat::crypto::Link;
    use udpchat::packet::{self, Datagram};
    use udpchat::wire::{Message, Seq};
    let mut sim = Sim::new();
    let _bob = sim.join("Bob", 3000);
    let evil = addr(6666);
    let mallory = Keypair::from_secret([0x66; 32]);
    let mut out = Vec::new();
    let pump = |sim: &mut Sim, out: &mut Vec<Vec<u8>>| {
        while sim.server.poll_store().is_some() {}
        sim.server.handle_committed();
        while let Some(t) = sim.server.poll_transmit() {
            if t.to == evil {
                out.push(t.payload)
            }
        }
    };
    let mut hs = crypto::client_handshake(&mallory, [9; 32]);
    let mut m1 = [0u8; 48];
    hs.write_message(&[], &mut m1).unwrap();
    let noise: &[u8; 32] = (&m1[..32]).try_into().unwrap();
    let now = sim.now;
    sim.server.handle_datagram(
        now,
        evil,
        &Packet::Initial {
            sender: 77u64,
            cookie: None,
            noise,
        }
        .to_vec(),
    );
    pump(&mut sim, &mut out);
    let Ok(Datagram::Packet(Packet::Retry { cookie, .. })) = packet::parse(&out[0]) else {
        panic!()
    };
    let cookie = *cookie;
    out.clear();
    sim.server.handle_datagram(
        now,
        evil,
        &Packet::Initial {
            sender: 77u64,
            cookie: Some(&cookie),
            noise,
        }
        .to_vec(),
    );
    pump(&mut sim, &mut out);
    let Ok(Datagram::Packet(Packet::Response { sender, noise, .. })) = packet::parse(&out[0])
    else {
        panic!()
    };
    let mut scratch = [0u8; 1200];
    hs.read_message(noise, &mut scratch).unwrap();
    let reg = wire::encode_to_vec(&Message::Register {
        seq: Seq(1),
        name: name("m0"),
    });
    let mut m3 = vec![0u8; 200];
    let n = hs.write_message(&reg, &mut m3).unwrap();
    m3.truncate(n);
    sim.server.handle_datagram(
        now,
        evil,
        &Packet::Finish {
            receiver: sender,
            noise: &m3,
        }
        .to_vec(),
    );
    pump(&mut sim, &mut out);
    let mut link = Link::new(hs, 77, sender).unwrap();
    for i in 1..200u32 {
        let msg = wire::encode_to_vec(&Message::Register {
            seq: Seq(1 + i),
            name: name(&format!("m{i}")),
        });
        let d = link.seal(&msg).unwrap();
        let now = sim.now;
        sim.server.handle_datagram(now, evil, &d);
        pump(&mut sim, &mut out);
    }
    let bound = sim
        .server
        .table()
        .iter()
        .filter(|(_, e)| e.key == mallory.public())
        .count();
    println!(
        "names bound to Mallory's key after one handshake: {bound}; datagrams back: {}",
        out.len()
    );
    assert!(bound <= 1, "{bound} names from one session");
}

/// (F6.) Bob restarts (his links are gone). Alice's one fresh handshake
/// datagram is lost; `Peers::send` never sends or restarts it while the
/// dead current link exists (`initiating.is_some()` returns early), so
/// every later message to Bob fails although both are online.
#[test]
fn one_lost_peer_handshake_does_not_break_a_restarted_peer() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.command(0, "send Bob hello");
    s.crash(1);
    let bob = s.join("Bob", 3000);
    s.drop_rules.push(drop_first(1, |p| {
        p.to == addr(3000) && p.is(What::PeerInit)
    }));
    s.command(0, "send Bob after your restart");
    s.run_for(Duration::from_secs(20));
    let a = s.nodes[0].lines.len();
    s.command(0, "send Bob one more");
    println!("alice: {:?}", s.nodes[0].lines);
    println!("bob: {:?}", s.lines(bob));
    println!(
        "PeerInit to Bob: {}",
        s.count(|p| p.to == addr(3000) && p.is(What::PeerInit))
    );
    assert!(
        s.lines_since(0, a)
            .contains(&">>> [Message received by Bob.]"),
        "{:?}",
        s.lines_since(0, a)
    );
}

// ---- bodies on disk: what the server fetches back is checked ----------------

/// Mail for an offline client is on disk only (the server keeps what it
/// needs to deliver and count it), and is delivered from there when the
/// client logs back in.
#[test]
fn mail_for_an_offline_client_waits_on_disk_and_is_delivered_from_it() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 2001);
    s.command(1, "dereg Bob");
    for k in 0..3 {
        s.command(0, &format!("send Bob note {k}"));
    }
    let waiting: Vec<_> = s.server.mailbox(&name("Bob")).collect();
    assert_eq!(waiting.len(), 3);
    assert!(waiting.iter().all(|m| !m.in_memory), "{waiting:?}");
    assert_eq!(s.store.len(), 3);
    let b = s.nodes[1].lines.len();
    s.command(1, "reg Bob");
    s.settle();
    let shown: Vec<&str> = (s.lines_since(1, b).into_iter())
        .filter(|l| l.contains("note "))
        .collect();
    assert_eq!(shown.len(), 3, "{:?}", s.lines_since(1, b));
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
    assert!(s.store.is_empty());
}

/// (Attacker with write access to the store.) While Bob is offline, his
/// copy of one channel message is overwritten with another's: same kind,
/// same length, encrypted by the server, but bound to another mail id.
/// Fetched for delivery, it fails its check and is dropped with a log line;
/// Bob never shows it, and the untouched message still arrives.
#[test]
fn a_body_swapped_on_disk_is_dropped_when_fetched_not_shown() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 2001);
    s.command(1, "dereg Bob");
    s.command(0, "send_all first: meet at 5");
    s.command(0, "send_all other: pay Mallory");
    let ids: Vec<MailId> = s.server.mailbox(&name("Bob")).map(|m| m.mail).collect();
    assert_eq!(ids.len(), 2);
    let second = s.store.get(&name("Bob"), ids[1]).unwrap().body.clone();
    s.store.tamper(&name("Bob"), ids[0], second);
    let b = s.nodes[1].lines.len();
    s.command(1, "reg Bob");
    s.settle();
    let lines = s.lines_since(1, b);
    assert_eq!(
        lines.iter().filter(|l| l.contains("pay Mallory")).count(),
        1,
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("meet at 5")), "{lines:?}");
    assert!(
        s.events
            .iter()
            .any(|e| matches!(e, udpchat::ServerEvent::Undecryptable(n, m) if *n == name("Bob") && *m == ids[0])),
        "{:?}",
        s.events
    );
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

/// (Found by review.) A version-1 clear-text message whose rewrite is
/// deferred by a failing store, let go at Bob's dereg, is fetched back as
/// the clear row still on disk: it is the message, not a forgery, and is
/// delivered or kept, never dropped.
#[test]
fn a_clear_message_whose_rewrite_is_deferred_is_still_delivered() {
    let mut s = Sim::new();
    let loaded = Loaded {
        clients: vec![
            rec("Alice", 2000, key_of("Alice")),
            rec("Bob", 2001, key_of("Bob")),
        ],
        mail: vec![StoredMail {
            mail: MailId(1),
            to: name("Bob"),
            from: name("Alice"),
            channel: false,
            stored_at: EPOCH_UNIX,
            id: MsgId(7),
            body: Body::Clear("hello from version one".to_string()),
        }],
        highest_mail: None,
    };
    let config = ServerConfig::new([1; 32], server_key(), (s.start, EPOCH_UNIX));
    s.store = udpchat::store::MemoryStore::holding(&loaded);
    s.server = Server::new(config, s.start, loaded);
    // The disk refuses writes (locked by another process) for a while.
    s.store_fails = Some(udpchat::StoreFailure::Busy);
    // Bob's first deliveries are lost on the way.
    s.drop_rules.push(Box::new(|p| p.is(What::Deliver)));
    let bob = s.join("Bob", 2001);
    s.command(bob, "dereg Bob");
    s.drop_rules.clear();
    let b = s.nodes[bob].lines.len();
    s.command(bob, "reg Bob");
    s.settle();
    s.store_fails = None;
    s.run_for(Duration::from_secs(5));
    s.settle();
    println!("events: {:?}", s.events);
    println!("bob: {:?}", s.lines_since(bob, b));
    let shown = s
        .lines(bob)
        .iter()
        .filter(|l| l.contains("hello from version one"))
        .count();
    let waiting = s.server.mailbox(&name("Bob")).count();
    assert!(
        shown == 1 || waiting == 1,
        "message lost: shown {shown}, still waiting {waiting}, store {} rows",
        s.store.len()
    );
}

/// (Attacker with write access to the store.) While Bob is offline, the
/// sealed message Alice left him is relabelled on disk as sealed by
/// Mallory's key (same bytes, same length). The server cannot open sealed
/// mail, but it checks the key against the one Alice's name is bound to
/// when it fetches the body: dropped with a log line, never shown.
#[test]
fn a_sealed_body_relabelled_on_disk_is_dropped_when_fetched() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 2001);
    s.command(1, "dereg Bob");
    s.command(0, "send Bob the real one");
    let mail = s.server.mailbox(&name("Bob")).next().unwrap().mail;
    let Body::Sealed { sealed, .. } = s.store.get(&name("Bob"), mail).unwrap().body.clone() else {
        panic!("a direct message is stored sealed");
    };
    let forged = udpchat::store::StoreOp::Rewrite {
        mail,
        body: Body::Sealed {
            key: key_of("Mallory").public(),
            sealed,
        },
    };
    udpchat::store::Store::commit(&mut s.store, &[forged]).unwrap();
    let b = s.nodes[1].lines.len();
    s.command(1, "reg Bob");
    s.settle();
    let lines = s.lines_since(1, b);
    assert!(
        !lines.iter().any(|l| l.contains("the real one")),
        "{lines:?}"
    );
    assert!(
        s.events.iter().any(
            |e| matches!(e, udpchat::ServerEvent::Undecryptable(n, m) if *n == name("Bob") && *m == mail)
        ),
        "{:?}",
        s.events
    );
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}
