//! Cryptography, all of it from the `snow` crate (Noise) and the primitives
//! it ships (X25519, ChaCha20-Poly1305, BLAKE2s with its HMAC and HKDF):
//! static keys, the handshakes, transport sessions with a replay window,
//! sealed mail, and the server's stateless cookies, reset tokens and storage
//! encryption. Nothing here is home-made cryptography: the constructions are
//! Noise patterns, HMAC, HKDF and an AEAD used as their specifications say.
//!
//! Randomness never comes from the OS here: every handshake gets a 32-byte
//! seed from the caller's seeded generator, plugged into snow through
//! [`Seeded`], so a simulation replays a seed exactly and a production driver
//! seeds from `/dev/urandom`.
//!
//! Patterns and why:
//! - **Client ↔ server: `XX`.** The server's static key arrives in message 2,
//!   authenticated by `es`, so the client checks it against the key it pinned
//!   for that server before it reveals its own key (message 3); a changed
//!   server key is reported, not a silent timeout. Message 3 depends on the
//!   server's fresh ephemeral, so it proves the client holds its static key
//!   *now*: a recorded handshake replayed later registers nothing.
//! - **Client ↔ client: `IK`.** The initiator knows the peer's key from the
//!   table (vouched for by the server) and hides its own identity from
//!   onlookers; one round trip.
//! - **Stored mail: `K`.** A one-way message from the sender's static key to
//!   the recipient's: only the recipient can open it, and opening it proves
//!   the sender's key sealed it.

use core::fmt;
use std::net::SocketAddr;
use std::sync::LazyLock;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{Builder, HandshakeState, StatelessTransportState};

use crate::packet::{self, COOKIE_LEN, DATA_HEADER, MAX_DATAGRAM, TAG_LEN, TOKEN_LEN};
use crate::wire::Name;

/// Length of an X25519 key.
pub const KEY_LEN: usize = 32;

static XX: LazyLock<NoiseParams> = LazyLock::new(|| params("Noise_XX_25519_ChaChaPoly_BLAKE2s"));
static IK: LazyLock<NoiseParams> = LazyLock::new(|| params("Noise_IK_25519_ChaChaPoly_BLAKE2s"));
static K: LazyLock<NoiseParams> = LazyLock::new(|| params("Noise_K_25519_ChaChaPoly_BLAKE2s"));

fn params(name: &str) -> NoiseParams {
    // A constant of this file, tested below: it always parses.
    name.parse().expect("a valid Noise protocol name")
}

/// Prologues bind every handshake to this protocol and its role, so a
/// message of one kind can never be taken for another.
const CLIENT_SERVER: &[u8] = b"udpchat 2 client-server";
const PEER: &[u8] = b"udpchat 2 peer";
const MAIL: &[u8] = b"udpchat 2 mail";

// ---- keys -------------------------------------------------------------------

/// An X25519 public key: a client's or the server's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// No key: a name registered before keys existed, or released by the
    /// operator, until its next registration binds it. (No X25519 key pair
    /// has this public key: it is the identity point.)
    pub const NONE: PublicKey = PublicKey([0; KEY_LEN]);

    /// Whether this is [`PublicKey::NONE`].
    pub fn is_none(&self) -> bool {
        *self == PublicKey::NONE
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<PublicKey> {
        unhex(s).map(PublicKey)
    }

    /// The first 16 hex characters, for messages to people.
    pub fn fingerprint(&self) -> String {
        hex(&self.0[..8])
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}…)", self.fingerprint())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A static key pair. Its `Debug` never shows the secret half.
#[derive(Clone, PartialEq, Eq)]
pub struct Keypair {
    secret: [u8; KEY_LEN],
    public: PublicKey,
}

impl Keypair {
    /// The key pair of an X25519 private key (any 32 bytes; X25519 clamps).
    pub fn from_secret(secret: [u8; KEY_LEN]) -> Keypair {
        let mut dh = dh();
        dh.set(&secret);
        let mut public = [0; KEY_LEN];
        public.copy_from_slice(dh.pubkey());
        Keypair {
            secret,
            public: PublicKey(public),
        }
    }

    /// A new key pair from 32 random bytes (X25519 key generation is
    /// exactly that).
    pub fn generate(rng: &mut impl RngCore) -> Keypair {
        let mut secret = [0; KEY_LEN];
        rng.fill_bytes(&mut secret);
        Keypair::from_secret(secret)
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The private half, for writing it to a key file.
    pub fn secret(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

fn dh() -> Box<dyn Dh> {
    // The default resolver always has Curve25519 with the features we build.
    DefaultResolver
        .resolve_dh(&DHChoice::Curve25519)
        .expect("snow built with curve25519")
}

fn blake2s() -> Box<dyn Hash> {
    DefaultResolver
        .resolve_hash(&HashChoice::Blake2s)
        .expect("snow built with blake2")
}

fn chachapoly(key: &[u8; 32]) -> Box<dyn Cipher> {
    let mut c = DefaultResolver
        .resolve_cipher(&CipherChoice::ChaChaPoly)
        .expect("snow built with chacha20poly1305");
    c.set(key);
    c
}

// ---- seeded randomness --------------------------------------------------------

struct SeededRng(ChaCha20Rng);

impl Random for SeededRng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

/// snow's default primitives with randomness from a seed instead of the OS:
/// each handshake is built with a fresh seed drawn from the caller's seeded
/// generator, so its ephemeral key is reproducible from the run's seed.
pub struct Seeded(pub [u8; 32]);

impl CryptoResolver for Seeded {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRng(ChaCha20Rng::from_seed(self.0))))
    }
    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }
    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }
    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

fn builder(params: &NoiseParams, seed: [u8; 32]) -> Builder<'static> {
    Builder::with_resolver(params.clone(), Box::new(Seeded(seed)))
}

/// Builds a handshake. Every argument is ours and well-formed (a 32-byte key,
/// a pattern this file names), so snow cannot refuse it.
fn build(b: Result<HandshakeState, snow::Error>) -> HandshakeState {
    b.expect("a well-formed handshake configuration")
}

// ---- handshakes ---------------------------------------------------------------

/// The client's side of the client–server handshake (`XX`).
pub fn client_handshake(local: &Keypair, seed: [u8; 32]) -> HandshakeState {
    build(
        builder(&XX, seed)
            .local_private_key(local.secret())
            .and_then(|b| b.prologue(CLIENT_SERVER))
            .and_then(|b| b.build_initiator()),
    )
}

/// The server's side of the client–server handshake (`XX`).
pub fn server_handshake(local: &Keypair, seed: [u8; 32]) -> HandshakeState {
    build(
        builder(&XX, seed)
            .local_private_key(local.secret())
            .and_then(|b| b.prologue(CLIENT_SERVER))
            .and_then(|b| b.build_responder()),
    )
}

/// The initiating client's side of a client–client handshake (`IK`).
pub fn peer_initiator(local: &Keypair, remote: &PublicKey, seed: [u8; 32]) -> HandshakeState {
    build(
        builder(&IK, seed)
            .local_private_key(local.secret())
            .and_then(|b| b.remote_public_key(&remote.0))
            .and_then(|b| b.prologue(PEER))
            .and_then(|b| b.build_initiator()),
    )
}

/// The responding client's side of a client–client handshake (`IK`).
pub fn peer_responder(local: &Keypair, seed: [u8; 32]) -> HandshakeState {
    build(
        builder(&IK, seed)
            .local_private_key(local.secret())
            .and_then(|b| b.prologue(PEER))
            .and_then(|b| b.build_responder()),
    )
}

/// Whether `remote` is of small order: any key of ours gives the all-zero
/// shared secret with it (RFC 7748 §6.1), so a peer can "prove" it without
/// a private key. Never accepted as an identity.
pub fn is_weak(local: &Keypair, remote: &PublicKey) -> bool {
    let mut dh = dh();
    dh.set(local.secret());
    let mut out = [0u8; KEY_LEN];
    dh.dh(&remote.0, &mut out).is_err() || out == [0; KEY_LEN]
}

/// The remote static key a handshake has learned, if any.
pub fn remote_static(hs: &HandshakeState) -> Option<PublicKey> {
    let rs = hs.get_remote_static()?;
    Some(PublicKey(rs.try_into().ok()?))
}

// ---- sessions -----------------------------------------------------------------

/// Replay protection for a session: the highest nonce seen and a bitmap of
/// the [`REPLAY_WINDOW`] before it (RFC 6479's scheme). A nonce is accepted
/// once; one older than the window is refused, as a replay would be.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    top: Option<u64>,
    bits: [u64; WINDOW_WORDS],
}

const WINDOW_WORDS: usize = 16;
/// How far behind the newest nonce a late datagram may still be accepted
/// (UDP reorders; retransmissions carry new nonces).
pub const REPLAY_WINDOW: u64 = (WINDOW_WORDS as u64 - 1) * 64;

impl ReplayWindow {
    /// Whether `n` would be accepted (not seen, not too old).
    pub fn fresh(&self, n: u64) -> bool {
        match self.top {
            None => true,
            Some(top) if n > top => true,
            Some(top) if top - n >= REPLAY_WINDOW => false,
            Some(_) => self.bits[Self::word(n)] & Self::bit(n) == 0,
        }
    }

    /// Records `n` as seen (after it authenticated).
    pub fn mark(&mut self, n: u64) {
        match self.top {
            Some(top) if n <= top => {}
            Some(top) => {
                // Words that the window slides past now cover newer nonces.
                let steps = (n / 64 - top / 64).min(WINDOW_WORDS as u64);
                for i in 1..=steps {
                    self.bits[Self::word(top + i * 64)] = 0;
                }
                self.top = Some(n);
            }
            None => {
                self.bits = [0; WINDOW_WORDS];
                self.top = Some(n);
            }
        }
        self.bits[Self::word(n)] |= Self::bit(n);
    }

    fn word(n: u64) -> usize {
        ((n / 64) % WINDOW_WORDS as u64) as usize
    }

    fn bit(n: u64) -> u64 {
        1 << (n % 64)
    }
}

/// An established Noise session: transport keys, both session indexes, the
/// next nonce to send and the replay window of the receiving direction.
pub struct Link {
    transport: StatelessTransportState,
    remote: PublicKey,
    local: u64,
    remote_index: u64,
    next_nonce: u64,
    replay: ReplayWindow,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("remote", &self.remote)
            .field("local", &self.local)
            .field("remote_index", &self.remote_index)
            .field("next_nonce", &self.next_nonce)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// The session of a finished handshake; `None` if it is not finished or
    /// learned no remote key.
    pub fn new(hs: HandshakeState, local: u64, remote_index: u64) -> Option<Link> {
        let remote = remote_static(&hs)?;
        let transport = hs.into_stateless_transport_mode().ok()?;
        Some(Link {
            transport,
            remote,
            local,
            remote_index,
            next_nonce: 0,
            replay: ReplayWindow::default(),
        })
    }

    /// The peer's static key, proved by the handshake.
    pub fn remote(&self) -> PublicKey {
        self.remote
    }

    /// Our index: the peer puts it in every datagram to us.
    pub fn local_index(&self) -> u64 {
        self.local
    }

    /// The peer's index: we put it in every datagram to the peer.
    pub fn remote_index(&self) -> u64 {
        self.remote_index
    }

    /// A `Data` datagram carrying `plaintext` (at most
    /// [`packet::MAX_PLAINTEXT`] bytes). `None` only once 2^64 − 1 datagrams
    /// were sent in this session.
    pub fn seal(&mut self, plaintext: &[u8]) -> Option<Vec<u8>> {
        let nonce = self.next_nonce;
        if nonce == u64::MAX || plaintext.len() > packet::MAX_PLAINTEXT {
            return None;
        }
        let mut out = vec![0; DATA_HEADER + plaintext.len() + TAG_LEN];
        out[0] = packet::VERSION;
        out[1] = packet::kind::DATA;
        let at = 2 + packet::INDEX_LEN;
        out[2..at].copy_from_slice(&self.remote_index.to_le_bytes());
        out[at..DATA_HEADER].copy_from_slice(&nonce.to_le_bytes());
        let n = self
            .transport
            .write_message(nonce, plaintext, &mut out[DATA_HEADER..])
            .ok()?;
        out.truncate(DATA_HEADER + n);
        self.next_nonce += 1;
        Some(out)
    }

    /// Decrypts a `Data` datagram's contents into `buf`: `None` if it does
    /// not authenticate or its nonce was seen (a replay) or is too old.
    pub fn open<'b>(
        &mut self,
        nonce: u64,
        ciphertext: &[u8],
        buf: &'b mut [u8; MAX_DATAGRAM],
    ) -> Option<&'b [u8]> {
        if !self.replay.fresh(nonce) {
            return None;
        }
        let n = self.transport.read_message(nonce, ciphertext, buf).ok()?;
        self.replay.mark(nonce);
        Some(&buf[..n])
    }
}

// ---- sealed mail ---------------------------------------------------------------

/// The prologue of a sealed message: it binds the sealed bytes to their
/// sender and recipient names, so a server cannot relabel them.
fn mail_prologue(from: &Name, to: &Name) -> Vec<u8> {
    let mut p = MAIL.to_vec();
    for name in [from, to] {
        p.push(name.as_str().len() as u8);
        p.extend_from_slice(name.as_str().as_bytes());
    }
    p
}

/// Overhead of a sealed message over its body: an ephemeral key and a tag.
pub const SEALED_OVERHEAD: usize = KEY_LEN + TAG_LEN;

/// Seals `body` from `sender` to `recipient` (Noise `K`): only the holder
/// of the recipient's key can open it, and opening it proves that the holder
/// of the sender's key sealed it.
pub fn seal_mail(
    sender: &Keypair,
    from: &Name,
    recipient: &PublicKey,
    to: &Name,
    body: &[u8],
    seed: [u8; 32],
) -> Vec<u8> {
    let prologue = mail_prologue(from, to);
    let mut hs = build(
        builder(&K, seed)
            .local_private_key(sender.secret())
            .and_then(|b| b.remote_public_key(&recipient.0))
            .and_then(|b| b.prologue(&prologue))
            .and_then(|b| b.build_initiator()),
    );
    let mut out = vec![0; body.len() + SEALED_OVERHEAD];
    match hs.write_message(body, &mut out) {
        Ok(n) => {
            out.truncate(n);
            out
        }
        // Only a body over 64 KiB fails; ours are at most a message.
        Err(_) => Vec::new(),
    }
}

/// Opens what [`seal_mail`] sealed, as the recipient: `None` unless it was
/// sealed by `sender`'s key, for our key, between exactly these names.
pub fn open_mail(
    recipient: &Keypair,
    to: &Name,
    sender: &PublicKey,
    from: &Name,
    sealed: &[u8],
) -> Option<Vec<u8>> {
    if sealed.len() < SEALED_OVERHEAD || sealed.len() > u16::MAX as usize {
        return None;
    }
    let prologue = mail_prologue(from, to);
    let mut hs = builder(&K, [0; 32])
        .local_private_key(recipient.secret())
        .and_then(|b| b.remote_public_key(&sender.0))
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_responder())
        .ok()?;
    let mut out = vec![0; sealed.len()];
    let n = hs.read_message(sealed, &mut out).ok()?;
    out.truncate(n);
    Some(out)
}

// ---- the server's symmetric secrets ----------------------------------------------

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    blake2s().hmac(key, data, &mut out);
    out
}

/// HKDF (RFC 5869, as Noise uses it) with two outputs.
fn hkdf2(salt: &[u8], ikm: &[u8]) -> ([u8; 32], [u8; 32]) {
    let (mut a, mut b, mut unused) = ([0; 32], [0; 32], [0; 32]);
    blake2s().hkdf(salt, ikm, 2, &mut a, &mut b, &mut unused);
    (a, b)
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Keys the server derives from its static key (HKDF), so they survive a
/// restart with it: reset tokens, and the key that encrypts channel copies
/// in the store.
#[derive(Clone)]
pub struct ServerSecrets {
    reset: [u8; 32],
    storage: [u8; 32],
}

impl fmt::Debug for ServerSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerSecrets(…)")
    }
}

/// Bytes of random salt in front of every message encrypted at rest.
pub const AT_REST_SALT: usize = 16;
/// Overhead of a message encrypted at rest: salt and tag.
pub const AT_REST_OVERHEAD: usize = AT_REST_SALT + TAG_LEN;

impl ServerSecrets {
    /// Derives the secrets from the server's static key.
    pub fn derive(key: &Keypair) -> ServerSecrets {
        let (reset, storage) = hkdf2(b"udpchat 2 server secrets", key.secret());
        ServerSecrets { reset, storage }
    }

    /// The token that proves a stateless reset of session `index` comes
    /// from this server (QUIC's stateless reset): the client learns it
    /// inside the session, and the server can compute it again after a
    /// restart.
    pub fn reset_token(&self, index: u64) -> [u8; TOKEN_LEN] {
        let mut data = b"reset".to_vec();
        data.extend_from_slice(&index.to_le_bytes());
        let mac = hmac(&self.reset, &data);
        let mut token = [0; TOKEN_LEN];
        token.copy_from_slice(&mac[..TOKEN_LEN]);
        token
    }

    /// Encrypts `body` for the store: a per-message key from HKDF over a
    /// random salt (so no nonce is ever reused, whatever the store forgets),
    /// ChaCha20-Poly1305 with `ad` authenticated alongside.
    pub fn seal_at_rest(&self, salt: [u8; AT_REST_SALT], ad: &[u8], body: &[u8]) -> Vec<u8> {
        let (key, _) = hkdf2(&self.storage, &salt);
        let mut out = vec![0; AT_REST_SALT + body.len() + TAG_LEN];
        out[..AT_REST_SALT].copy_from_slice(&salt);
        let n = chachapoly(&key).encrypt(0, ad, body, &mut out[AT_REST_SALT..]);
        out.truncate(AT_REST_SALT + n);
        out
    }

    /// Decrypts what [`ServerSecrets::seal_at_rest`] made, with the same
    /// `ad`.
    pub fn open_at_rest(&self, ad: &[u8], blob: &[u8]) -> Option<Vec<u8>> {
        if blob.len() < AT_REST_OVERHEAD {
            return None;
        }
        let (salt, ct) = blob.split_at(AT_REST_SALT);
        let (key, _) = hkdf2(&self.storage, salt);
        let mut out = vec![0; ct.len()];
        let n = chachapoly(&key).decrypt(0, ad, ct, &mut out).ok()?;
        out.truncate(n);
        Some(out)
    }
}

/// Stateless cookies (QUIC Retry, WireGuard cookies): an HMAC over the
/// client's address and a time bucket, under a secret of this server
/// process. A valid cookie proves the address received an earlier answer.
#[derive(Clone)]
pub struct CookieJar {
    secret: [u8; 32],
}

impl fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieJar(…)")
    }
}

impl CookieJar {
    /// A jar with a fresh secret (from the server's seeded generator).
    pub fn new(secret: [u8; 32]) -> CookieJar {
        CookieJar { secret }
    }

    /// The cookie for `addr` in time bucket `bucket`.
    pub fn make(&self, bucket: u32, addr: SocketAddr) -> [u8; COOKIE_LEN] {
        let mut data = b"cookie".to_vec();
        data.extend_from_slice(&bucket.to_le_bytes());
        match addr {
            SocketAddr::V4(a) => {
                data.push(4);
                data.extend_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                data.push(6);
                data.extend_from_slice(&a.ip().octets());
            }
        }
        data.extend_from_slice(&addr.port().to_le_bytes());
        let mac = hmac(&self.secret, &data);
        let mut cookie = [0; COOKIE_LEN];
        cookie[..4].copy_from_slice(&bucket.to_le_bytes());
        cookie[4..].copy_from_slice(&mac[..COOKIE_LEN - 4]);
        cookie
    }

    /// Whether `cookie` was made for `addr` in bucket `now` or the one
    /// before it.
    pub fn check(&self, cookie: &[u8; COOKIE_LEN], addr: SocketAddr, now: u32) -> bool {
        let mut b = [0; 4];
        b.copy_from_slice(&cookie[..4]);
        let bucket = u32::from_le_bytes(b);
        (bucket == now || bucket.wrapping_add(1) == now)
            && same_secret(&self.make(bucket, addr), cookie)
    }
}

// ---- hex ---------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 64 hex characters as 32 bytes.
pub fn unhex(s: &str) -> Option<[u8; KEY_LEN]> {
    let s = s.as_bytes();
    if s.len() != 2 * KEY_LEN {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0; KEY_LEN];
    for (i, pair) in s.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Datagram, Packet, parse};

    fn keys(n: u8) -> Keypair {
        Keypair::from_secret([n; 32])
    }

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    /// A full XX handshake; returns (client link, server link).
    fn xx(client: &Keypair, server: &Keypair) -> (Link, Link) {
        let mut c = client_handshake(client, [1; 32]);
        let mut s = server_handshake(server, [2; 32]);
        let (mut m, mut p) = ([0u8; 1200], [0u8; 1200]);
        let n = c.write_message(&[], &mut m).unwrap();
        assert_eq!(n, packet::XX1_LEN);
        s.read_message(&m[..n], &mut p).unwrap();
        let n = s.write_message(&[], &mut m).unwrap();
        assert_eq!(n, packet::XX2_LEN);
        c.read_message(&m[..n], &mut p).unwrap();
        assert_eq!(remote_static(&c), Some(server.public()));
        let n = c.write_message(b"hello", &mut m).unwrap();
        assert_eq!(n, packet::XX3_LEN + 5);
        let got = s.read_message(&m[..n], &mut p).unwrap();
        assert_eq!(&p[..got], b"hello");
        (Link::new(c, 10, 20).unwrap(), Link::new(s, 20, 10).unwrap())
    }

    fn data(datagram: &[u8]) -> (u64, u64, Vec<u8>) {
        match parse(datagram) {
            Ok(Datagram::Packet(Packet::Data {
                receiver,
                nonce,
                ciphertext,
            })) => (receiver, nonce, ciphertext.to_vec()),
            other => panic!("not data: {other:?}"),
        }
    }

    #[test]
    fn keys_derive_their_public_half_and_never_print_the_secret() {
        let a = keys(7);
        assert_eq!(Keypair::from_secret(*a.secret()), a);
        assert_ne!(a.public(), keys(8).public());
        let shown = format!("{a:?}");
        assert!(!shown.contains(&hex(a.secret())), "{shown}");
        assert_eq!(PublicKey::from_hex(&a.public().to_hex()), Some(a.public()));
        assert_eq!(PublicKey::from_hex("zz"), None);
    }

    #[test]
    fn sessions_carry_data_both_ways_and_refuse_replays_and_tampering() {
        let (mut c, mut s) = xx(&keys(1), &keys(2));
        assert_eq!(s.remote(), keys(1).public());
        let mut buf = [0u8; MAX_DATAGRAM];
        let d = c.seal(b"request").unwrap();
        let (receiver, nonce, ct) = data(&d);
        assert_eq!(receiver, 20);
        assert_eq!(s.open(nonce, &ct, &mut buf), Some(&b"request"[..]));
        // The same datagram again: a replay.
        assert_eq!(s.open(nonce, &ct, &mut buf), None);
        // One bit flipped anywhere in the ciphertext, or another nonce.
        let d = c.seal(b"second").unwrap();
        let (_, nonce, ct) = data(&d);
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 1;
            assert_eq!(s.open(nonce, &bad, &mut buf), None, "flip at {i}");
        }
        assert_eq!(s.open(nonce + 1, &ct, &mut buf), None);
        assert_eq!(s.open(nonce, &ct, &mut buf), Some(&b"second"[..]));
        let d = s.seal(b"reply").unwrap();
        let (receiver, nonce, ct) = data(&d);
        assert_eq!(receiver, 10);
        assert_eq!(c.open(nonce, &ct, &mut buf), Some(&b"reply"[..]));
        // A session with another server cannot read it.
        let (mut other, _) = xx(&keys(1), &keys(3));
        assert_eq!(other.open(nonce, &ct, &mut buf), None);
    }

    #[test]
    fn replay_window_accepts_each_nonce_once_in_any_order_within_the_window() {
        let mut w = ReplayWindow::default();
        let order = [5u64, 3, 4, 0, 900, 100, 901, 899, 2000, 1100, 1101];
        for &n in &order {
            assert!(w.fresh(n), "{n} refused");
            w.mark(n);
            assert!(!w.fresh(n), "{n} accepted twice");
        }
        // Behind the newest by a whole window: refused even if never seen.
        assert!(!w.fresh(2000 - REPLAY_WINDOW));
        assert!(w.fresh(2000 - REPLAY_WINDOW + 1));
        // A jump far ahead forgets everything older.
        w.mark(1_000_000);
        assert!(!w.fresh(2000));
        assert!(w.fresh(1_000_000 - 1));
        // Model check against a set, over a pseudo-random walk.
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::HashSet::new();
        let mut top = 0u64;
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (top + (x % 300)).saturating_sub(200);
            let expect = !seen.contains(&n) && (n > top || top - n < REPLAY_WINDOW);
            assert_eq!(w.fresh(n), expect || seen.is_empty(), "n={n} top={top}");
            if w.fresh(n) {
                w.mark(n);
                seen.insert(n);
                top = top.max(n);
            }
        }
    }

    #[test]
    fn peer_handshake_proves_both_keys() {
        let (a, b) = (keys(4), keys(5));
        let mut i = peer_initiator(&a, &b.public(), [3; 32]);
        let mut r = peer_responder(&b, [4; 32]);
        let (mut m, mut p) = ([0u8; 1200], [0u8; 1200]);
        let n = i.write_message(&[], &mut m).unwrap();
        assert_eq!(n, packet::IK1_LEN);
        r.read_message(&m[..n], &mut p).unwrap();
        assert_eq!(remote_static(&r), Some(a.public()));
        let n = r.write_message(&[], &mut m).unwrap();
        assert_eq!(n, packet::IK2_LEN);
        i.read_message(&m[..n], &mut p).unwrap();
        assert!(Link::new(i, 1, 2).is_some() && Link::new(r, 2, 1).is_some());
        // Addressed to another key: the responder cannot read message 1.
        let mut i = peer_initiator(&a, &keys(6).public(), [3; 32]);
        let mut r = peer_responder(&b, [4; 32]);
        let n = i.write_message(&[], &mut m).unwrap();
        assert!(r.read_message(&m[..n], &mut p).is_err());
    }

    #[test]
    fn sealed_mail_opens_only_for_its_recipient_from_its_sender_between_its_names() {
        let (alice, bob, carol) = (keys(1), keys(2), keys(3));
        let (na, nb, nc) = (name("Alice"), name("Bob"), name("Carol"));
        let sealed = seal_mail(&alice, &na, &bob.public(), &nb, b"secret", [9; 32]);
        assert_eq!(sealed.len(), 6 + SEALED_OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        let open = |who: &Keypair, to: &Name, from_key: &PublicKey, from: &Name, s: &[u8]| {
            open_mail(who, to, from_key, from, s)
        };
        assert_eq!(
            open(&bob, &nb, &alice.public(), &na, &sealed).as_deref(),
            Some(&b"secret"[..])
        );
        assert_eq!(open(&carol, &nb, &alice.public(), &na, &sealed), None);
        assert_eq!(open(&bob, &nb, &carol.public(), &na, &sealed), None);
        assert_eq!(open(&bob, &nb, &alice.public(), &nc, &sealed), None);
        assert_eq!(open(&bob, &nc, &alice.public(), &na, &sealed), None);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x80;
            assert_eq!(open(&bob, &nb, &alice.public(), &na, &bad), None);
        }
        assert_eq!(open(&bob, &nb, &alice.public(), &na, &sealed[..10]), None);
    }

    #[test]
    fn small_order_keys_are_weak_and_real_ones_are_not() {
        let me = keys(3);
        assert!(is_weak(&me, &PublicKey::NONE));
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(is_weak(&me, &PublicKey(one)));
        // p - 1 (order 2), little-endian.
        let mut p_minus_1 = [0xffu8; 32];
        p_minus_1[0] = 0xec;
        p_minus_1[31] = 0x7f;
        assert!(is_weak(&me, &PublicKey(p_minus_1)));
        assert!(!is_weak(&me, &keys(4).public()));
    }

    #[test]
    fn cookies_bind_address_and_time() {
        let jar = CookieJar::new([5; 32]);
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let c = jar.make(10, a);
        assert!(jar.check(&c, a, 10));
        assert!(jar.check(&c, a, 11));
        assert!(!jar.check(&c, a, 12));
        assert!(!jar.check(&c, b, 10));
        assert!(!CookieJar::new([6; 32]).check(&c, a, 10));
        let mut bad = c;
        bad[19] ^= 1;
        assert!(!jar.check(&bad, a, 10));
    }

    #[test]
    fn server_secrets_survive_a_restart_and_encrypt_at_rest() {
        let key = keys(9);
        let (s1, s2) = (ServerSecrets::derive(&key), ServerSecrets::derive(&key));
        assert_eq!(s1.reset_token(7), s2.reset_token(7));
        assert_ne!(s1.reset_token(7), s1.reset_token(8));
        assert_ne!(
            s1.reset_token(7),
            ServerSecrets::derive(&keys(10)).reset_token(7)
        );
        let blob = s1.seal_at_rest([1; AT_REST_SALT], b"ad", b"channel text");
        assert!(!blob.windows(12).any(|w| w == b"channel text"));
        assert_eq!(
            s2.open_at_rest(b"ad", &blob).as_deref(),
            Some(&b"channel text"[..])
        );
        assert_eq!(s2.open_at_rest(b"other ad", &blob), None);
        assert_eq!(
            ServerSecrets::derive(&keys(10)).open_at_rest(b"ad", &blob),
            None
        );
        let again = s1.seal_at_rest([2; AT_REST_SALT], b"ad", b"channel text");
        assert_ne!(blob, again);
    }

    #[test]
    fn a_seed_replays_the_same_handshake() {
        let run = |seed| {
            let mut c = client_handshake(&keys(1), seed);
            let mut m = [0u8; 64];
            let n = c.write_message(&[], &mut m).unwrap();
            m[..n].to_vec()
        };
        assert_eq!(run([1; 32]), run([1; 32]));
        assert_ne!(run([1; 32]), run([2; 32]));
    }
}
