//! The chat client as a sans-IO state machine.
//!
//! A [`Client`] registers with the server, keeps a local copy of the client
//! table, sends direct messages straight to peers (falling back to the
//! server's mailbox when a peer is silent), sends channel messages through
//! the server, and shows what arrives. Commands are method calls
//! ([`Client::send_message`]…), what happens comes out as [`Event`]s; the
//! [`console`] turns typed lines into those calls and events into lines.
//!
//! Every datagram travels in a Noise session: with the server (`XX`, its
//! key pinned) and with each peer (`IK`, the peer's key
//! from the table). Mail for an offline peer is sealed to
//! its key before the server ever sees it.
//!
//! One concern a file: this one holds the [`Client`] and its inputs and
//! outputs; `join` registration and presence; `requests` the requests in
//! flight (one type with its timer, tries and indexes); `direct` chat
//! messages; `mailbox` stored mail at log-back; `directory` the table kept
//! in step; `peers` the sessions with peers and the path to each;
//! `session` the session with the server; `events` what the user is
//! told; [`console`] typed lines and the console's text.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha12Rng;
use rand_core::{RngCore, SeedableRng};
use slab::Slab;

use crate::crypto::{self, Keypair, PublicKey};
use crate::packet::{self, Datagram, Packet};
use crate::table::{DeltaOutcome, LocalTable, PageOutcome};
use crate::timer::{TimerKey, TimerWheel};
use crate::wire::{
    self, Content, Entry, FieldError, MailBody, MailId, Message, MsgId, Name, Refusal, Rejection,
    Sealed, Seq, Text,
};
use crate::{ACK_TIMEOUT, RETRANSMIT, SERVER_TRIES, TICK, Transmit};

pub mod console;
mod direct;
mod directory;
mod events;
mod join;
mod mailbox;
mod peers;
mod requests;
mod session;

pub use events::{CommandError, Event, Path};
use join::*;
use mailbox::*;
use requests::*;

use peers::{PeerInput, Peers};
use session::{KeyCheck, ServerSession, Trouble};

/// Settings of a [`Client`]. Its `Debug` shows neither the seed nor the
/// key's secret half.
#[derive(Clone)]
pub struct ClientConfig {
    /// The name to register under.
    pub name: Name,
    /// The server's address.
    pub server: SocketAddr,
    /// More addresses of the same server (a host name's other addresses):
    /// registration tries `server` and these in turn until one answers,
    /// which is the server's address from then on.
    pub alternates: Vec<SocketAddr>,
    /// The alternates are other servers of one cluster (sharing one store
    /// and one static key), not only other addresses of one server: when
    /// the server goes silent (five tries of a request or a heartbeat
    /// unanswered) the client registers again through them instead of
    /// giving up, and what it had under way goes again once it is back.
    /// A [`Message::Redirect`] turns this on too.
    pub failover: bool,
    /// Seeds message ids, sequence numbers, session indexes and every
    /// handshake's ephemeral key. Use OS randomness in production.
    pub seed: [u8; 32],
    /// The client's static key: it owns the name.
    pub key: Keypair,
    /// The server's key as remembered from an earlier contact; `None` on
    /// first contact (the key the server presents is then learned, see
    /// [`Event::ServerKeyLearned`]).
    pub server_key: Option<PublicKey>,
    /// Most rows kept in the local client table.
    pub max_table: usize,
    /// How often an online client tells the server it is still there.
    pub heartbeat: Duration,
    /// Most peers with a session kept at once (the least recently used go).
    pub max_peers: usize,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("name", &self.name)
            .field("server", &self.server)
            .field("alternates", &self.alternates)
            .field("failover", &self.failover)
            .field("key", &self.key)
            .field("server_key", &self.server_key)
            .field("max_table", &self.max_table)
            .field("heartbeat", &self.heartbeat)
            .field("max_peers", &self.max_peers)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// Defaults: a local table of at most 100,000 rows, a heartbeat every
    /// 10 s, sessions with up to 256 peers.
    pub fn new(
        name: Name,
        server: SocketAddr,
        seed: [u8; 32],
        key: Keypair,
        server_key: Option<PublicKey>,
    ) -> Self {
        ClientConfig {
            name,
            server,
            alternates: Vec::new(),
            failover: false,
            seed,
            key,
            server_key,
            max_table: 100_000,
            heartbeat: HEARTBEAT,
            max_peers: 256,
        }
    }
}

/// Default heartbeat interval (SPEC §3 Presence).
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Commands in flight (sends, channel messages, dereg) past which
/// [`Client::wants_input`] says no: a script piped in waits rather than
/// overrunning its peers and the server's probe queue.
const IN_FLIGHT: usize = 16;

/// A chat client. See the [crate docs](crate) for a driving loop.
pub struct Client {
    config: ClientConfig,
    rng: ChaCha12Rng,
    next_seq: u32,
    presence: Presence,
    /// The first registration (welcome and table) is complete.
    ready: bool,
    /// Announce the table once the sync under way completes.
    announce: bool,
    session: ServerSession,
    /// Counts registrations (see [`Op::session`]).
    sessions: u32,
    peers: Peers,
    table: LocalTable,
    requests: Requests,
    /// Pages of the current sync request's window applied so far.
    sync_pages: usize,
    /// How the registration under way was answered so far.
    patience: Patience,
    /// The server answered at `config.server`: the alternates are done.
    server_answered: bool,
    /// Tries of message 1 sent while no address had answered.
    join_turn: usize,
    /// Redirects followed and rounds over the servers since the last
    /// welcome (bounded: servers that disagree cannot keep us going round).
    roaming: Roaming,
    batch: Option<Batch>,
    /// The welcome that opened the latest mail batch.
    last_batch: Option<Seq>,
    heartbeat: Option<TimerKey>,
    seen: Seen,
    /// `quit` was typed: exit once the dereg is acked.
    quitting: bool,
    timers: TimerWheel<Timer>,
    /// Datagrams to send, each with how many events had been queued when
    /// it was: it is handed out only once those were polled. An ack tells
    /// its sender the message was shown, so however an embedder drains us,
    /// a line goes to the screen before its ack leaves ("acks follow
    /// display").
    transmits: VecDeque<(u64, Transmit)>,
    /// Events polled so far.
    polled: u64,
    events: VecDeque<Event>,
}

impl Client {
    /// A client that starts registering at once.
    pub fn new(config: ClientConfig, now: Instant) -> Client {
        let mut rng = ChaCha12Rng::from_seed(config.seed);
        let mut client = Client {
            next_seq: rng.next_u32(),
            rng,
            presence: Presence::Joining,
            ready: false,
            announce: false,
            session: ServerSession::new(config.server_key),
            sessions: 0,
            peers: Peers::new(config.max_peers),
            table: LocalTable::new(config.max_table),
            requests: Requests::default(),
            sync_pages: 0,
            patience: Patience::default(),
            server_answered: false,
            join_turn: 0,
            roaming: Roaming::default(),
            batch: None,
            last_batch: None,
            heartbeat: None,
            seen: Seen::default(),
            quitting: false,
            timers: TimerWheel::new(now, TICK),
            transmits: VecDeque::new(),
            polled: 0,
            events: VecDeque::new(),
            config,
        };
        client.register(now, Joining::First);
        client
    }

    /// Feeds one datagram received from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.datagram(now, from, data);
        self.quit_when_done(now);
    }

    fn datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        if self.presence == Presence::Done {
            return;
        }
        let Ok(datagram) = packet::parse(data) else {
            return;
        };
        // Until the server has answered, any of its addresses may.
        let from_server = from == self.config.server
            || (!self.server_answered && self.config.alternates.contains(&from));
        let packet = match datagram {
            Datagram::Packet(p) => p,
            Datagram::Negotiate(versions) => {
                // Unauthenticated: noted, and believed only if the server
                // never answers our handshake (see `give_up`).
                if from_server
                    && self.session.at_first_message()
                    && !versions.contains(&packet::VERSION)
                {
                    let theirs = versions.iter().copied().max().unwrap_or(0);
                    self.session.note(Trouble::Version(theirs));
                }
                return;
            }
            // A client answers no one it has no session with.
            Datagram::OtherVersion(_) => return,
        };
        match packet {
            Packet::Retry { receiver, cookie }
                if from_server && self.session.on_retry(receiver, cookie) =>
            {
                self.server_answers_at(from);
                self.send_join();
            }
            Packet::Response {
                receiver,
                sender,
                noise,
            } if from_server => self.on_response(now, from, receiver, sender, noise),
            Packet::Busy { receiver, wait_ms }
                if from_server && self.session.awaits_response(receiver) =>
            {
                self.server_answers_at(from);
                self.on_busy(now, wait_ms);
            }
            // The server restarted and lost our session: the same path as
            // an "unknown session" answer.
            Packet::Reset { receiver, token }
                if from_server && self.session.is_reset(receiver, token) =>
            {
                self.on_lost_session(now);
            }
            Packet::Data {
                receiver,
                nonce,
                ciphertext,
            } => {
                if self.session.owns(receiver) {
                    if let Some(msg) = self.session.open(nonce, ciphertext) {
                        self.on_server_message(now, msg);
                    }
                } else if self.peers.owns(receiver) {
                    let input = self.peers.on_data(receiver, nonce, ciphertext);
                    self.on_peer(now, from, input);
                }
            }
            Packet::PeerInit { sender, noise } => {
                let table = &self.table;
                let session = &self.session;
                // An unbound name's placeholder is no one's key.
                let input = self.peers.on_init(
                    &self.config.key,
                    from,
                    sender,
                    noise,
                    &mut self.rng,
                    |key| !key.is_none() && table.iter().any(|e| e.key == *key),
                    |i| session.owns(i),
                );
                self.on_peer(now, from, input);
            }
            Packet::PeerResponse {
                receiver,
                sender,
                noise,
            } => {
                let input = self.peers.on_response(receiver, sender, noise);
                self.on_peer(now, from, input);
            }
            _ => {}
        }
    }

    /// A message on the server session.
    fn on_server_message(&mut self, now: Instant, msg: Message) {
        match msg {
            Message::Welcome {
                seq, mail, reset, ..
            } => self.on_welcome(now, seq, mail, reset),
            Message::Rejected { seq, reason }
                if self
                    .take_server_op(seq, |k| matches!(k, Kind::Register { .. }))
                    .is_some() =>
            {
                self.session.end_join();
                let name = self.config.name.clone();
                self.events.push_back(match reason {
                    Rejection::InUse => Event::Rejected(name),
                    Rejection::OtherKey => Event::RejectedKey(name),
                });
                self.close(true);
            }
            Message::Ack { seq } => self.on_ack(now, seq),
            Message::Redirect { seq, to } => self.on_redirect(now, seq, to),
            Message::Alive { seq, version } => {
                let heartbeat = |k: &Kind| matches!(k, Kind::Heartbeat { .. });
                let idle = self.requests.sync().is_none() && self.batch.is_none();
                // A newer table than ours means a delta was lost: catch up.
                if self.take_server_op(seq, heartbeat).is_some()
                    && idle
                    && version > self.table.version()
                {
                    let since = self.table.version();
                    self.start_sync(now, since);
                }
            }
            Message::Exists { seq, entry } => self.on_exists(now, seq, entry),
            Message::Refused { seq, reason } => self.on_refused(now, seq, reason),
            Message::Page {
                seq,
                version,
                from,
                entries,
                next,
            } => self.on_page(now, seq, version, from, &entries, next),
            Message::Delta {
                prev,
                version,
                entries,
            } => self.on_delta(now, prev, version, &entries),
            Message::Deliver {
                mail,
                batch,
                pos,
                stored_at,
                from,
                content,
            } => {
                let d = self.open_delivery(mail, stored_at, from, content);
                self.on_deliver(now, batch, pos, d);
            }
            Message::Probe { nonce } => {
                if matches!(self.presence, Presence::Joining | Presence::Online) {
                    self.send_server(&Message::ProbeReply { nonce });
                }
            }
            Message::PathChallenge { nonce } => {
                // The server saw us at a new address: say it is really us.
                self.send_server(&Message::PathResponse { nonce });
            }
            Message::Received { seq } => {
                let relay = |k: &Kind| {
                    matches!(
                        k,
                        Kind::Direct {
                            phase: Phase::Relay(_),
                            ..
                        }
                    )
                };
                if let Some(Kind::Direct { to, id, .. }) = self.take_server_op(seq, relay) {
                    self.events.push_back(Event::ReceivedBy { to, id });
                }
            }
            Message::Relayed {
                mail,
                from,
                content,
            } => self.on_relayed(now, mail, from, content),
            // A peer cannot reach us: our datagram towards it opens our NAT
            // for its retry. Only online (a deregistered client takes no
            // direct messages), never towards ourselves.
            Message::Punch { entry }
                if self.presence == Presence::Online
                    && !entry.key.is_none()
                    && entry.name != self.config.name =>
            {
                self.punch(entry.key, entry.addr);
            }
            _ => {}
        }
    }

    /// What a peer datagram brought.
    fn on_peer(&mut self, now: Instant, from: SocketAddr, input: PeerInput) {
        match input {
            PeerInput::Nothing => {}
            PeerInput::Reply(t) => self.transmit(t),
            PeerInput::UnknownKey => {
                // Someone our table does not know: perhaps it is behind.
                if self.presence == Presence::Online && self.requests.sync().is_none() {
                    let since = self.table.version();
                    self.start_sync(now, since);
                }
            }
            PeerInput::Established(key) => self.flush_direct(&key),
            PeerInput::Message { key, index, msg } => match msg {
                Message::Chat {
                    from: sender,
                    to,
                    id,
                    text,
                } => self.on_chat(now, key, index, from, sender, to, id, text),
                Message::ChatAck { id } => self.on_chat_ack(key, id),
                _ => {}
            },
        }
    }

    /// Handles every timer due at `now`. Spurious calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.poll_expired(now) {
            if self.presence == Presence::Done {
                return;
            }
            match timer {
                Timer::Op(op) => self.on_op_timer(now, op),
                Timer::Heartbeat => {
                    self.heartbeat = None;
                    if self.presence == Presence::Online {
                        let beating = self.requests.any(|k| matches!(k, Kind::Heartbeat { .. }));
                        if !beating {
                            let seq = self.seq();
                            self.start(now, Kind::Heartbeat { seq }, ACK_TIMEOUT);
                        }
                        self.heartbeat = Some(
                            self.timers
                                .insert(now + self.config.heartbeat, Timer::Heartbeat),
                        );
                    }
                }
                Timer::Batch => {
                    // The server stopped streaming: show the table; the
                    // rest of the mail waits for the next log-back.
                    if self.batch.take().is_some() {
                        self.start_sync(now, 0);
                    }
                }
            }
        }
        self.quit_when_done(now);
    }

    /// The next datagram to send. None is handed out before the events
    /// queued ahead of it were polled (see [`Client::poll_event`]): drain
    /// the events, then the datagrams.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        match self.transmits.front() {
            Some((fence, _)) if *fence <= self.polled => self.transmits.pop_front().map(|(_, t)| t),
            _ => None,
        }
    }

    /// The next thing to show.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front()?;
        self.polled += 1;
        Some(event)
    }

    /// When [`Client::handle_timeout`] next has work, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.presence == Presence::Done {
            return None;
        }
        self.timers.poll_timeout()
    }

    /// The next deadline and why it is there (`"direct message: the peer's
    /// ack"`…), for logs and tests: a pass over every timer, so not for
    /// every loop turn ([`Client::poll_timeout`] says when, cheaply, and
    /// may be a little early when timers were cancelled).
    #[must_use]
    pub fn poll_deadline(&self) -> Option<(Instant, &'static str)> {
        if self.presence == Presence::Done {
            return None;
        }
        let (at, timer) = self.timers.peek()?;
        let why = match timer {
            Timer::Heartbeat => "heartbeat: tell the server we are here",
            Timer::Batch => "stored mail: the batch stalls",
            Timer::Op(op) => match self.requests.get(*op).map(|op| &op.kind) {
                Some(Kind::Register { .. }) => "registration: the server's answer",
                Some(Kind::Deregister { .. }) => "dereg: the server's answer",
                Some(Kind::Channel { .. }) => "channel message: the server's ack",
                Some(Kind::Direct { phase, .. }) => match phase {
                    Phase::Direct | Phase::Retry => "direct message: the peer's ack",
                    Phase::Save(_) => "save: the server's answer",
                    Phase::Relay(_) => "relay: the server's answer",
                },
                Some(Kind::Sync { .. }) => "table sync: the next page",
                Some(Kind::Heartbeat { .. }) => "heartbeat: the server's answer",
                None => "a request that has ended",
            },
        };
        Some((at, why))
    }

    /// No operation is in flight and no command waits: at end of input the
    /// driver may exit (once it has drained the events and datagrams
    /// already given, as after every input).
    pub fn is_idle(&self) -> bool {
        self.presence != Presence::Joining
            && self
                .requests
                .iter()
                .all(|(_, op)| matches!(op.kind, Kind::Heartbeat { .. }))
            && self.batch.is_none()
    }

    /// Whether a command line given now is carried out, not refused for
    /// want of room: the first registration is complete (so the table is
    /// there), no registration or dereg is under way, no `quit` was given,
    /// and fewer than 16 commands are in flight. A driver reading a script stops reading while this
    /// is false, so that no line is dropped and none overtakes another.
    pub fn wants_input(&self) -> bool {
        let commands = (self.requests.iter())
            .filter(|(_, op)| {
                matches!(
                    op.kind,
                    Kind::Direct { .. } | Kind::Channel { .. } | Kind::Deregister { .. }
                )
            })
            .count();
        // A dereg under way decides what the next line may do (`reg`, a
        // send): the script waits for its answer.
        let leaving = self.requests.any(|k| matches!(k, Kind::Deregister { .. }));
        self.ready
            && matches!(self.presence, Presence::Online | Presence::Offline)
            && !leaving
            && !self.quitting
            && commands < IN_FLIGHT
    }

    /// The local client table.
    pub fn table(&self) -> &LocalTable {
        &self.table
    }

    /// How direct messages to `name` go, once one went or came: straight,
    /// punched through NATs with the server's help, or relayed by it.
    pub fn path(&self, name: &Name) -> Option<Path> {
        let key = self.table.get(name)?.key;
        self.peers.path(&key)
    }

    /// The first registration is complete, its table synced (or given up
    /// on): until then a name cannot be told from an unknown one.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Registered and not deregistered.
    pub fn is_online(&self) -> bool {
        self.presence == Presence::Online
    }

    /// The name this client registers under.
    pub fn name(&self) -> &Name {
        &self.config.name
    }

    /// Whether a chat command may run now, and why not.
    fn usable(&self) -> Result<(), CommandError> {
        match self.presence {
            Presence::Online => Ok(()),
            Presence::Offline => Err(CommandError::Offline(self.config.name.clone())),
            Presence::Joining => Err(CommandError::Registering),
            Presence::Done => Err(CommandError::Exited),
        }
    }

    fn text(text: &str) -> Result<Text, CommandError> {
        Text::new(text).map_err(|e| match e {
            FieldError::TooLong(n) => CommandError::TooLong(n),
            _ => CommandError::Empty,
        })
    }

    /// A request of ours was refused: the message `id`'s outcome if it
    /// was one, else an error line.
    fn refuse(&mut self, id: Option<MsgId>, why: String) {
        match id {
            Some(id) => self.events.push_back(Event::Refused { id, why }),
            None => self.error(why),
        }
    }

    /// Queues a datagram behind the events queued so far.
    fn transmit(&mut self, t: Transmit) {
        let fence = self.polled + self.events.len() as u64;
        self.transmits.push_back((fence, t));
    }

    fn error(&mut self, text: String) {
        self.events.push_back(Event::Error(text));
    }

    /// The client is done: nothing more happens.
    fn close(&mut self, failed: bool) {
        self.presence = Presence::Done;
        self.events.push_back(Event::Closed { failed });
    }

    fn seq(&mut self) -> Seq {
        self.next_seq = self.next_seq.wrapping_add(1);
        Seq(self.next_seq)
    }

    /// A fresh message id: random, so no one can guess the next one and
    /// take its place.
    fn msg_id(&mut self) -> MsgId {
        MsgId(self.rng.next_u64())
    }

    /// Sends `msg` to the server in our session (nothing without one).
    fn send_server(&mut self, msg: &Message) {
        if let Some(payload) = self.session.seal(msg) {
            self.transmit(Transmit {
                to: self.config.server,
                payload,
                what: msg.what(),
            });
        }
    }
}
