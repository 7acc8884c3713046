//! The datagram layer of protocol version 2: what every datagram on the wire
//! looks like *outside* the encryption.
//!
//! A datagram starts with a version byte. Version 2 then has a type byte and
//! a fixed layout per type: the Noise handshake steps between a client and
//! the server (`Initial`, `Retry`, `Response`, `Finish`), the handshake
//! between two clients (`PeerInit`, `PeerResponse`), encrypted session data
//! (`Data`), and the server's stateless answers to traffic it cannot place
//! (`Retry`, `Reset`). Everything a user sees travels inside `Data` (see
//! [`crate::wire`] for the messages) or inside the third handshake message.
//!
//! Session indexes (chosen at random by the receiving side, as WireGuard's)
//! name the session a datagram belongs to, so a session survives a change of
//! the peer's address. Every length is fixed or bounded here, before any
//! cryptography runs, so garbage costs one comparison.
//!
//! A datagram whose first byte is [`NEGOTIATE`] lists the versions its sender
//! speaks; the server sends one (two bytes, never larger than what it
//! answers) to any datagram of another version, so an old or new client can
//! say which versions differ instead of timing out.

use core::fmt;

/// The protocol version of this build: the first byte of every datagram.
pub const VERSION: u8 = 2;
/// First byte of a version-negotiation datagram; the rest lists versions.
pub const NEGOTIATE: u8 = 0;
/// No datagram is larger than this (a conservative path MTU for UDP).
pub const MAX_DATAGRAM: usize = 1200;
/// A Noise tag (ChaCha20-Poly1305).
pub const TAG_LEN: usize = 16;
/// A stateless cookie: the time bucket (4 bytes) and its MAC (16).
pub const COOKIE_LEN: usize = 20;
/// A stateless reset token.
pub const TOKEN_LEN: usize = 16;
/// Bytes of a session index: 64 bits, so that no one can collect, in
/// advance, the reset tokens of the indexes a server may hand out.
pub const INDEX_LEN: usize = 8;
/// Header of a `Data` datagram: version, type, receiver index, nonce.
pub const DATA_HEADER: usize = 1 + 1 + INDEX_LEN + 8;
/// Most plaintext one `Data` datagram carries.
pub const MAX_PLAINTEXT: usize = MAX_DATAGRAM - DATA_HEADER - TAG_LEN;
/// Header of a `Finish` datagram: version, type, receiver index.
pub const FINISH_HEADER: usize = 1 + 1 + INDEX_LEN;
/// Most plaintext the third client–server handshake message carries
/// (after its encrypted static key and its tag).
pub const MAX_FINISH_PAYLOAD: usize = MAX_DATAGRAM - FINISH_HEADER - XX3_LEN;

/// XX message 1 (`e`), with an empty payload.
pub const XX1_LEN: usize = 32;
/// XX message 2 (`e, ee, s, es`), with an empty payload.
pub const XX2_LEN: usize = 32 + 32 + TAG_LEN + TAG_LEN;
/// XX message 3 (`s, se`) without its payload: the encrypted static key and
/// the payload's tag.
pub const XX3_LEN: usize = 32 + TAG_LEN + TAG_LEN;
/// IK message 1 (`e, es, s, ss`), with an empty payload.
pub const IK1_LEN: usize = 32 + 32 + TAG_LEN + TAG_LEN;
/// IK message 2 (`e, ee, se`), with an empty payload.
pub const IK2_LEN: usize = 32 + TAG_LEN;

/// Type bytes of version-2 datagrams.
pub(crate) mod kind {
    pub const INITIAL: u8 = 1;
    pub const RETRY: u8 = 2;
    pub const RESPONSE: u8 = 3;
    pub const FINISH: u8 = 4;
    pub const DATA: u8 = 5;
    pub const PEER_INIT: u8 = 6;
    pub const PEER_RESPONSE: u8 = 7;
    pub const RESET: u8 = 8;
    pub const BUSY: u8 = 9;
}

/// One version-2 datagram, borrowing from the bytes it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Client → server: XX message 1, with the cookie of an earlier `Retry`
    /// once the client has one. `sender` is the client's session index.
    Initial {
        /// The client's index for this session.
        sender: u64,
        /// The cookie proving the client receives at its address.
        cookie: Option<&'a [u8; COOKIE_LEN]>,
        /// XX message 1.
        noise: &'a [u8; XX1_LEN],
    },
    /// Server → client: "prove you receive here": send `Initial` again with
    /// this cookie. Stateless on the server.
    Retry {
        /// The client's index, echoed.
        receiver: u64,
        /// The cookie.
        cookie: &'a [u8; COOKIE_LEN],
    },
    /// Server → client: XX message 2.
    Response {
        /// The client's index.
        receiver: u64,
        /// The server's index for this session.
        sender: u64,
        /// XX message 2.
        noise: &'a [u8; XX2_LEN],
    },
    /// Client → server: XX message 3, whose payload is the first request.
    Finish {
        /// The server's index.
        receiver: u64,
        /// XX message 3.
        noise: &'a [u8],
    },
    /// Session data: a [`crate::wire::Message`] encrypted under the
    /// session's keys with an explicit nonce (UDP reorders and loses).
    Data {
        /// The receiving side's index.
        receiver: u64,
        /// The nonce: the sender's counter, checked against a replay window.
        nonce: u64,
        /// Ciphertext and tag.
        ciphertext: &'a [u8],
    },
    /// Client → client: IK message 1.
    PeerInit {
        /// The initiator's index.
        sender: u64,
        /// IK message 1.
        noise: &'a [u8; IK1_LEN],
    },
    /// Client → client: IK message 2.
    PeerResponse {
        /// The initiator's index.
        receiver: u64,
        /// The responder's index.
        sender: u64,
        /// IK message 2.
        noise: &'a [u8; IK2_LEN],
    },
    /// Server → client: "I hold no session of that index" (the server
    /// restarted), proved by a token the client got inside the session.
    Reset {
        /// The index the server no longer knows.
        receiver: u64,
        /// The token.
        token: &'a [u8; TOKEN_LEN],
    },
    /// Server → client: "alive but loaded: send message 1 again in
    /// `wait_ms`". Sent instead of the handshake's costly message 2, and
    /// smaller than the message 1 it answers; it does not count as a try.
    Busy {
        /// The client's index, echoed (only those who saw message 1 know
        /// it).
        receiver: u64,
        /// How long to wait, in milliseconds.
        wait_ms: u16,
    },
}

/// What a datagram is, at the outermost level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// A version-2 datagram.
    Packet(Packet<'a>),
    /// A version-negotiation datagram: the versions its sender speaks.
    Negotiate(&'a [u8]),
    /// Another version (its first byte).
    OtherVersion(u8),
}

/// Why a datagram was rejected before any cryptography ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Zero bytes.
    Empty,
    /// Larger than [`MAX_DATAGRAM`].
    Oversize(usize),
    /// A version-2 type byte that means nothing.
    UnknownType(u8),
    /// The wrong length for its type.
    Length,
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PacketError::Empty => write!(f, "empty datagram"),
            PacketError::Oversize(n) => write!(f, "datagram of {n} bytes exceeds {MAX_DATAGRAM}"),
            PacketError::UnknownType(t) => write!(f, "unknown packet type {t}"),
            PacketError::Length => write!(f, "wrong length for its type"),
        }
    }
}

impl std::error::Error for PacketError {}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// `b[at..]` as exactly `N` bytes.
fn exact<const N: usize>(b: &[u8], at: usize) -> Result<&[u8; N], PacketError> {
    b.get(at..)
        .and_then(|rest| rest.try_into().ok())
        .ok_or(PacketError::Length)
}

fn fixed<const N: usize>(b: &[u8], at: usize) -> Result<&[u8; N], PacketError> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(PacketError::Length)
}

/// Parses one datagram's framing. Lengths are exact for every fixed-size
/// type; nothing is decrypted here.
pub fn parse(data: &[u8]) -> Result<Datagram<'_>, PacketError> {
    if data.len() > MAX_DATAGRAM {
        return Err(PacketError::Oversize(data.len()));
    }
    let (&version, _) = data.split_first().ok_or(PacketError::Empty)?;
    match version {
        VERSION => {}
        NEGOTIATE => return Ok(Datagram::Negotiate(&data[1..])),
        other => return Ok(Datagram::OtherVersion(other)),
    }
    let &ty = data.get(1).ok_or(PacketError::Length)?;
    let idx = |at| u64_at(data, at).ok_or(PacketError::Length);
    // Offsets: version and type, then one or two indexes.
    const I1: usize = 2;
    const I2: usize = I1 + INDEX_LEN;
    const AFTER1: usize = I2;
    const AFTER2: usize = I2 + INDEX_LEN;
    let packet = match ty {
        kind::INITIAL => {
            let sender = idx(I1)?;
            match data.get(AFTER1) {
                Some(0) => Packet::Initial {
                    sender,
                    cookie: None,
                    noise: exact(data, AFTER1 + 1)?,
                },
                Some(1) => Packet::Initial {
                    sender,
                    cookie: Some(fixed(data, AFTER1 + 1)?),
                    noise: exact(data, AFTER1 + 1 + COOKIE_LEN)?,
                },
                _ => return Err(PacketError::Length),
            }
        }
        kind::RETRY => Packet::Retry {
            receiver: idx(I1)?,
            cookie: exact(data, AFTER1)?,
        },
        kind::RESPONSE => Packet::Response {
            receiver: idx(I1)?,
            sender: idx(I2)?,
            noise: exact(data, AFTER2)?,
        },
        kind::FINISH => {
            let noise = data.get(FINISH_HEADER..).ok_or(PacketError::Length)?;
            if noise.len() < XX3_LEN {
                return Err(PacketError::Length);
            }
            Packet::Finish {
                receiver: idx(I1)?,
                noise,
            }
        }
        kind::DATA => {
            let ciphertext = data.get(DATA_HEADER..).ok_or(PacketError::Length)?;
            // A tag and at least one byte of message.
            if ciphertext.len() <= TAG_LEN {
                return Err(PacketError::Length);
            }
            Packet::Data {
                receiver: idx(I1)?,
                nonce: u64_at(data, AFTER1).ok_or(PacketError::Length)?,
                ciphertext,
            }
        }
        kind::PEER_INIT => Packet::PeerInit {
            sender: idx(I1)?,
            noise: exact(data, AFTER1)?,
        },
        kind::PEER_RESPONSE => Packet::PeerResponse {
            receiver: idx(I1)?,
            sender: idx(I2)?,
            noise: exact(data, AFTER2)?,
        },
        kind::RESET => Packet::Reset {
            receiver: idx(I1)?,
            token: exact(data, AFTER1)?,
        },
        kind::BUSY => Packet::Busy {
            receiver: idx(I1)?,
            wait_ms: u16::from_le_bytes(*exact::<2>(data, AFTER1)?),
        },
        other => return Err(PacketError::UnknownType(other)),
    };
    Ok(Datagram::Packet(packet))
}

impl Packet<'_> {
    /// The datagram, version byte first.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.push(VERSION);
        match *self {
            Packet::Initial {
                sender,
                cookie,
                noise,
            } => {
                out.push(kind::INITIAL);
                out.extend_from_slice(&sender.to_le_bytes());
                match cookie {
                    Some(c) => {
                        out.push(1);
                        out.extend_from_slice(c);
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(noise);
            }
            Packet::Retry { receiver, cookie } => {
                out.push(kind::RETRY);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(cookie);
            }
            Packet::Response {
                receiver,
                sender,
                noise,
            } => {
                out.push(kind::RESPONSE);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(&sender.to_le_bytes());
                out.extend_from_slice(noise);
            }
            Packet::Finish { receiver, noise } => {
                out.push(kind::FINISH);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(noise);
            }
            Packet::Data {
                receiver,
                nonce,
                ciphertext,
            } => {
                out.push(kind::DATA);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(&nonce.to_le_bytes());
                out.extend_from_slice(ciphertext);
            }
            Packet::PeerInit { sender, noise } => {
                out.push(kind::PEER_INIT);
                out.extend_from_slice(&sender.to_le_bytes());
                out.extend_from_slice(noise);
            }
            Packet::PeerResponse {
                receiver,
                sender,
                noise,
            } => {
                out.push(kind::PEER_RESPONSE);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(&sender.to_le_bytes());
                out.extend_from_slice(noise);
            }
            Packet::Reset { receiver, token } => {
                out.push(kind::RESET);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(token);
            }
            Packet::Busy { receiver, wait_ms } => {
                out.push(kind::BUSY);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(&wait_ms.to_le_bytes());
            }
        }
        out
    }

    /// The encoded length.
    pub fn len(&self) -> usize {
        const I: usize = INDEX_LEN;
        2 + match self {
            Packet::Initial { cookie, .. } => I + 1 + cookie.map_or(0, |c| c.len()) + XX1_LEN,
            Packet::Retry { .. } => I + COOKIE_LEN,
            Packet::Response { .. } => 2 * I + XX2_LEN,
            Packet::Finish { noise, .. } => I + noise.len(),
            Packet::Data { ciphertext, .. } => I + 8 + ciphertext.len(),
            Packet::PeerInit { .. } => I + IK1_LEN,
            Packet::PeerResponse { .. } => 2 * I + IK2_LEN,
            Packet::Reset { .. } => I + TOKEN_LEN,
            Packet::Busy { .. } => I + 2,
        }
    }

    /// Never: every packet has a header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The server's answer to a datagram of another version: the versions it
/// speaks.
pub fn negotiation() -> [u8; 2] {
    [NEGOTIATE, VERSION]
}

// Every stateless answer is smaller than what provokes it, and the XX
// response is within 3× of the cookie-carrying initial (it only ever goes to
// an address that proved it receives, but the bound costs nothing).
const INITIAL_MIN: usize = 2 + INDEX_LEN + 1 + XX1_LEN;
const _: () = assert!(2 + INDEX_LEN + COOKIE_LEN <= INITIAL_MIN);
const _: () = assert!(2 + 2 * INDEX_LEN + XX2_LEN <= 3 * (INITIAL_MIN + COOKIE_LEN));
const _: () = assert!(2 + INDEX_LEN + TOKEN_LEN <= DATA_HEADER + TAG_LEN + 1);
const _: () = assert!(2 + 2 * INDEX_LEN + IK2_LEN <= 2 + INDEX_LEN + IK1_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Vec<u8>> {
        let cookie = [7u8; COOKIE_LEN];
        let token = [9u8; TOKEN_LEN];
        let xx1 = [1u8; XX1_LEN];
        let xx2 = [2u8; XX2_LEN];
        let ik1 = [3u8; IK1_LEN];
        let ik2 = [4u8; IK2_LEN];
        let finish = [5u8; XX3_LEN + 10];
        let ct = [6u8; TAG_LEN + 5];
        [
            Packet::Initial {
                sender: 1,
                cookie: None,
                noise: &xx1,
            },
            Packet::Initial {
                sender: u64::MAX,
                cookie: Some(&cookie),
                noise: &xx1,
            },
            Packet::Retry {
                receiver: 3,
                cookie: &cookie,
            },
            Packet::Response {
                receiver: 4,
                sender: 5,
                noise: &xx2,
            },
            Packet::Finish {
                receiver: 6,
                noise: &finish,
            },
            Packet::Data {
                receiver: 7,
                nonce: u64::MAX,
                ciphertext: &ct,
            },
            Packet::PeerInit {
                sender: 8,
                noise: &ik1,
            },
            Packet::PeerResponse {
                receiver: 9,
                sender: 10,
                noise: &ik2,
            },
            Packet::Reset {
                receiver: 11,
                token: &token,
            },
        ]
        .iter()
        .map(|p| {
            let bytes = p.to_vec();
            assert_eq!(bytes.len(), p.len());
            assert_eq!(parse(&bytes), Ok(Datagram::Packet(*p)));
            bytes
        })
        .collect()
    }

    #[test]
    fn every_type_round_trips() {
        assert_eq!(samples().len(), 9);
    }

    #[test]
    fn the_stateless_answers_have_the_sizes_the_readme_gives() {
        let retry = Packet::Retry {
            receiver: 1,
            cookie: &[0; COOKIE_LEN],
        };
        let reset = Packet::Reset {
            receiver: 1,
            token: &[0; TOKEN_LEN],
        };
        assert_eq!((retry.len(), reset.len()), (30, 26));
        assert_eq!(negotiation().len(), 2);
    }

    #[test]
    fn a_byte_more_or_less_is_rejected() {
        for bytes in samples() {
            let is_variable = matches!(bytes[1], kind::FINISH | kind::DATA);
            // Variable-length types have a minimum: header and tag (and an
            // encrypted key, for Finish).
            let shortest = match bytes[1] {
                kind::FINISH => FINISH_HEADER + XX3_LEN,
                kind::DATA => DATA_HEADER + TAG_LEN + 1,
                _ => bytes.len(),
            };
            for cut in 0..shortest {
                assert!(
                    !matches!(parse(&bytes[..cut]), Ok(Datagram::Packet(_))),
                    "{bytes:?} cut at {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(
                parse(&longer).is_ok(),
                is_variable,
                "{bytes:?} with a byte more"
            );
        }
    }

    #[test]
    fn other_versions_and_types() {
        assert_eq!(parse(&[]), Err(PacketError::Empty));
        assert_eq!(parse(&[1, 0, 0]), Ok(Datagram::OtherVersion(1)));
        assert_eq!(parse(&[0, 2]), Ok(Datagram::Negotiate(&[2])));
        assert_eq!(parse(&[VERSION, 99]), Err(PacketError::UnknownType(99)));
        assert_eq!(parse(&[VERSION]), Err(PacketError::Length));
        assert_eq!(
            parse(&[VERSION; MAX_DATAGRAM + 1]),
            Err(PacketError::Oversize(MAX_DATAGRAM + 1))
        );
        assert_eq!(negotiation(), [NEGOTIATE, VERSION]);
    }
}
