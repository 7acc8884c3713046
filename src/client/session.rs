//! The client's session with the server: the `XX` handshake (with the
//! server's cookie round trip and the check of the server's key against the
//! one pinned for it), then the established link and its reset token.

use rand_chacha::ChaCha12Rng;
use rand_core::RngCore;
use snow::HandshakeState;

use crate::crypto::{self, Keypair, Link, PublicKey, same_secret};
use crate::packet::{
    COOKIE_LEN, MAX_DATAGRAM, MAX_FINISH_PAYLOAD, Packet, TAG_LEN, TOKEN_LEN, XX1_LEN, XX2_LEN,
    XX3_LEN,
};
use crate::wire::{self, Message, What};

/// Progress of a handshake.
enum Join {
    /// Message 1 sent (with the cookie, once a `Retry` gave one).
    Initial {
        hs: Box<HandshakeState>,
        local: u64,
        msg1: [u8; XX1_LEN],
        cookie: Option<[u8; COOKIE_LEN]>,
    },
    /// Message 3 sent: the session is established on our side; the
    /// server's answer to the registration it carried is awaited.
    Finish { datagram: Vec<u8>, sent: u8 },
}

/// What message 2 said about the server's key.
pub(super) enum KeyCheck {
    /// As pinned.
    Pinned,
    /// First contact: this key is now pinned.
    Learned(PublicKey),
    /// Not the pinned key: nothing more is sent (noted as [`Trouble`]).
    Changed,
}

/// Why a handshake may be failing, from unauthenticated answers: reported
/// only if it never succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trouble {
    /// A version answer: the server speaks this version instead.
    Version(u8),
    /// A message 2 from another key than the pinned one.
    KeyChanged {
        pinned: PublicKey,
        presented: PublicKey,
    },
}

/// The session with the server.
pub(super) struct ServerSession {
    link: Option<Link>,
    reset: Option<[u8; TOKEN_LEN]>,
    join: Option<Join>,
    pinned: Option<PublicKey>,
    trouble: Option<Trouble>,
}

impl ServerSession {
    pub fn new(pinned: Option<PublicKey>) -> ServerSession {
        ServerSession {
            link: None,
            reset: None,
            join: None,
            pinned,
            trouble: None,
        }
    }

    /// Notes a reason the handshake may be failing.
    pub fn note(&mut self, trouble: Trouble) {
        self.trouble = Some(trouble);
    }

    /// Whether a handshake is under way and still at message 1 (the only
    /// time a version-negotiation answer is believed).
    pub fn at_first_message(&self) -> bool {
        matches!(self.join, Some(Join::Initial { .. }))
    }

    /// Starts a handshake; the old session stays usable until it finishes.
    pub fn begin(&mut self, key: &Keypair, rng: &mut ChaCha12Rng) {
        let mut seed = [0; 32];
        rng.fill_bytes(&mut seed);
        let mut hs = crypto::client_handshake(key, seed);
        // snow wants room for a tag even where message 1 has none.
        let mut buf = [0; XX1_LEN + TAG_LEN];
        if !matches!(hs.write_message(&[], &mut buf), Ok(XX1_LEN)) {
            return;
        }
        let mut msg1 = [0; XX1_LEN];
        msg1.copy_from_slice(&buf[..XX1_LEN]);
        self.join = Some(Join::Initial {
            hs: Box::new(hs),
            local: rng.next_u64(),
            msg1,
            cookie: None,
        });
    }

    /// The handshake is over (welcomed, rejected or abandoned); what was
    /// noted against it, if anything.
    pub fn end_join(&mut self) -> Option<Trouble> {
        self.join = None;
        self.trouble.take()
    }

    /// Whether `receiver` is our handshake's index and message 1 went with
    /// a cookie: the only moment a "busy" answer is believed.
    pub fn awaits_response(&self, receiver: u64) -> bool {
        matches!(&self.join, Some(Join::Initial { local, cookie: Some(_), .. }) if *local == receiver)
    }

    /// Whether something was noted against the handshake under way (a key
    /// or version that is not ours): not a silent server.
    pub fn troubled(&self) -> bool {
        self.trouble.is_some()
    }

    /// Whether a handshake is under way.
    pub fn joining(&self) -> bool {
        self.join.is_some()
    }

    /// Message 3 went out this many times without an answer.
    pub fn finish_tries(&self) -> Option<u8> {
        match &self.join {
            Some(Join::Finish { sent, .. }) => Some(*sent),
            _ => None,
        }
    }

    /// The handshake datagram to (re)send now.
    pub fn join_datagram(&mut self) -> Option<(Vec<u8>, What)> {
        match self.join.as_mut()? {
            Join::Initial {
                local,
                msg1,
                cookie,
                ..
            } => {
                let p = Packet::Initial {
                    sender: *local,
                    cookie: cookie.as_ref(),
                    noise: msg1,
                };
                Some((p.to_vec(), What::Initial))
            }
            Join::Finish { datagram, sent } => {
                *sent = sent.saturating_add(1);
                Some((datagram.clone(), What::Finish))
            }
        }
    }

    /// The server asks us to prove we receive: keep the cookie. True when
    /// it was for our handshake (then message 1 goes again at once). A
    /// different cookie replaces ours: the server restarted (new secret)
    /// since it gave us the one we have.
    pub fn on_retry(&mut self, receiver: u64, got: &[u8; COOKIE_LEN]) -> bool {
        match &mut self.join {
            Some(Join::Initial { local, cookie, .. })
                if *local == receiver && cookie.as_ref() != Some(got) =>
            {
                *cookie = Some(*got);
                true
            }
            _ => false,
        }
    }

    /// XX message 2: checks the server's key, then writes message 3 with
    /// `first` (the registration) as its payload. `None` if it is not for
    /// our handshake or does not authenticate.
    pub fn on_response(
        &mut self,
        receiver: u64,
        sender: u64,
        noise: &[u8; XX2_LEN],
        first: &Message,
    ) -> Option<KeyCheck> {
        let Some(Join::Initial { hs, local, .. }) = &mut self.join else {
            return None;
        };
        if *local != receiver {
            return None;
        }
        let mut scratch = [0u8; MAX_DATAGRAM];
        if hs.read_message(noise, &mut scratch).is_err() {
            // A forgery: snow restored its state, the real answer may
            // still come.
            return None;
        }
        let Some(Join::Initial { mut hs, local, .. }) = self.join.take() else {
            return None;
        };
        let presented = crypto::remote_static(&hs)?;
        let check = match self.pinned {
            Some(pinned) if pinned != presented => {
                // The next try starts a new handshake.
                self.trouble = Some(Trouble::KeyChanged { pinned, presented });
                return Some(KeyCheck::Changed);
            }
            Some(_) => KeyCheck::Pinned,
            None => {
                self.pinned = Some(presented);
                KeyCheck::Learned(presented)
            }
        };
        let payload = wire::encode_to_vec(first);
        if payload.len() > MAX_FINISH_PAYLOAD {
            return None;
        }
        let mut msg3 = vec![0u8; XX3_LEN + payload.len()];
        let n = hs.write_message(&payload, &mut msg3).ok()?;
        msg3.truncate(n);
        let datagram = Packet::Finish {
            receiver: sender,
            noise: &msg3,
        }
        .to_vec();
        self.link = Some(Link::new(*hs, local, sender)?);
        self.reset = None;
        self.join = Some(Join::Finish { datagram, sent: 0 });
        Some(check)
    }

    /// Whether `receiver` is our session's index.
    pub fn owns(&self, receiver: u64) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.local_index() == receiver)
    }

    /// Decrypts session data.
    pub fn open(&mut self, nonce: u64, ciphertext: &[u8]) -> Option<Message> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let plain = self.link.as_mut()?.open(nonce, ciphertext, &mut buf)?;
        wire::decode(plain).ok()
    }

    /// Encrypts a message for the server.
    pub fn seal(&mut self, msg: &Message) -> Option<Vec<u8>> {
        self.link.as_mut()?.seal(&wire::encode_to_vec(msg))
    }

    /// Remembers the reset token the welcome brought.
    pub fn set_reset(&mut self, token: [u8; TOKEN_LEN]) {
        self.reset = Some(token);
    }

    /// A stateless reset: true if it proves the server lost our session.
    pub fn is_reset(&self, receiver: u64, token: &[u8; TOKEN_LEN]) -> bool {
        match (&self.link, &self.reset) {
            (Some(link), Some(ours)) => link.remote_index() == receiver && same_secret(ours, token),
            _ => false,
        }
    }
}
