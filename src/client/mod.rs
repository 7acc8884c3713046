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
mod peers;
mod session;

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
            seed,
            key,
            server_key,
            max_table: 100_000,
            heartbeat: HEARTBEAT,
            max_peers: 256,
        }
    }
}

/// Something that happened, to show; [`console::render`] gives its exact
/// console line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Registration accepted.
    Welcome,
    /// The local client table changed.
    TableUpdated,
    /// After [`Event::TableUpdated`] for a delta: a client that came
    /// online (`true`: a new name, a log-back, a return) or went offline.
    Presence {
        /// The client.
        name: Name,
        /// Online now.
        online: bool,
    },
    /// More clients changed in the same delta than are named one by one.
    PresenceMore(usize),
    /// A direct message was acked by its recipient.
    ReceivedBy {
        /// The recipient.
        to: Name,
        /// The message ([`Client::send_message`] returned it).
        id: MsgId,
    },
    /// No ack within 500 ms; the message went to the server.
    NoAck {
        /// The recipient.
        to: Name,
        /// The message.
        id: MsgId,
    },
    /// The recipient is offline in the local table; the message went to the
    /// server directly.
    PeerOffline {
        /// The recipient.
        to: Name,
        /// The message.
        id: MsgId,
    },
    /// The server stored the message.
    Saved {
        /// The message.
        id: MsgId,
    },
    /// The server says the recipient is online after all.
    Exists {
        /// The recipient.
        to: Name,
        /// The message.
        id: MsgId,
    },
    /// Deregistration acked.
    Bye,
    /// A request that the client cannot live without got no answer.
    ServerNotResponding,
    /// The client is about to exit (follows `ServerNotResponding`).
    Exiting,
    /// A channel message got no answer from the server.
    ChannelNotResponding {
        /// The message ([`Client::send_all`] returned it).
        id: MsgId,
    },
    /// Stored messages follow.
    HaveMessages,
    /// A stored message, shown on log-back.
    Stored {
        /// Sender.
        from: Name,
        /// Sent with `send_all`.
        channel: bool,
        /// False for a message stored by protocol version 1, whose sender
        /// nothing proved (shown with "(unverified)").
        verified: bool,
        /// When the server stored it (Unix seconds).
        stored_at: i64,
        /// The message.
        text: Text,
    },
    /// A direct message arrived.
    Direct {
        /// Sender.
        from: Name,
        /// The message.
        text: Text,
    },
    /// The server acked a channel message.
    ChannelAcked {
        /// The message.
        id: MsgId,
    },
    /// A channel message arrived.
    Channel {
        /// Sender.
        from: Name,
        /// The message.
        text: Text,
    },
    /// The name is held by a live client.
    Rejected(Name),
    /// The name belongs to another key.
    RejectedKey(Name),
    /// First contact with the server: this is its key, to remember (not a
    /// console line).
    ServerKeyLearned(PublicKey),
    /// The server presented another key than the one remembered for it;
    /// nothing but the handshake was sent. The client exits.
    ServerKeyChanged {
        /// The key remembered.
        pinned: PublicKey,
        /// The key presented.
        presented: PublicKey,
    },
    /// The server speaks another protocol version. The client exits.
    VersionMismatch(u8),
    /// The server had forgotten this client; it registered again by itself.
    Reconnected,
    /// The recipient's mailbox is over its limit: the message was not
    /// saved.
    MailboxFull {
        /// The recipient.
        to: Name,
        /// The message.
        id: MsgId,
    },
    /// The server refused a message (its store, a rate, a lost session):
    /// not sent.
    Refused {
        /// The message.
        id: MsgId,
        /// What was wrong and what to do, as the console says it.
        why: String,
    },
    /// A stored or relayed message from this sender did not open with its
    /// key: reported and dropped (not an error of any command).
    Unverifiable(Name),
    /// A request the server refused, not a message's (registration: the
    /// server is full), as the console says it.
    Error(String),
    /// Not a line: the client is done (after `quit`, or `failed`: it ended
    /// on an error above, such as [`Event::Exiting`]). Nothing follows.
    Closed {
        /// It ended on a failure, not a `quit`.
        failed: bool,
    },
}

impl Event {
    /// Whether it says that a command was not carried out (a user error, a
    /// refusal, a server that did not answer), for a script's exit status.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Event::Error(_)
                | Event::Refused { .. }
                | Event::MailboxFull { .. }
                | Event::ChannelNotResponding { .. }
                | Event::ServerNotResponding
                | Event::Rejected(_)
                | Event::RejectedKey(_)
                | Event::ServerKeyChanged { .. }
                | Event::VersionMismatch(_)
        )
    }
}

/// Why a command was not carried out (nothing was sent). Its `Display` is
/// the console's explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// Deregistered: only `reg`, `list` and `help` work. The client's name.
    Offline(Name),
    /// A registration is under way.
    Registering,
    /// The client has exited.
    Exited,
    /// `reg` while online.
    AlreadyOnline,
    /// No such client in the local table (the name as given).
    UnknownClient(String),
    /// The client has no key yet (not registered since the server was
    /// upgraded).
    NoKey(Name),
    /// The message is this many bytes, over the limit.
    TooLong(usize),
    /// An empty message.
    Empty,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Offline(me) => {
                write!(f, "you are offline; type reg {me} to log back in.")
            }
            CommandError::Registering => write!(f, "registration is under way; wait for it."),
            CommandError::Exited => write!(f, "the client has exited."),
            CommandError::AlreadyOnline => write!(f, "you are already online."),
            CommandError::UnknownClient(to) => {
                write!(f, "unknown client {to}; type list to see the client table.")
            }
            CommandError::NoKey(to) => write!(
                f,
                "{to} has no key yet (not registered since the server was upgraded); \
                 the message was not sent."
            ),
            CommandError::TooLong(n) => write!(
                f,
                "message too long ({n} bytes); the limit is {}.",
                wire::MAX_TEXT
            ),
            CommandError::Empty => write!(f, "empty message."),
        }
    }
}

impl std::error::Error for CommandError {}

/// Default heartbeat interval (SPEC §3 Presence).
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Clients named one by one after a delta; the rest are counted.
const PRESENCE_LINES: usize = 8;
/// Commands in flight (sends, channel messages, dereg) past which
/// [`Client::wants_input`] says no: a script piped in waits rather than
/// overrunning its peers and the server's probe queue.
const IN_FLIGHT: usize = 16;
/// Most (sender, id) pairs remembered to show each message once.
const SEEN: usize = 16_384;
/// Out-of-order stored messages held back to be shown in order.
const BATCH_AHEAD: u32 = 64;
/// A mail batch that makes no progress this long is abandoned (the server
/// keeps the rest for the next log-back).
const BATCH_STALL: Duration = Duration::from_secs(5);
/// "Busy" answers are believed for this much waiting per registration, in
/// all: a forged one (it needs only our index, which an on-path attacker
/// sees) can delay "server not responding", not prevent it.
const BUSY_BUDGET: Duration = Duration::from_secs(60);
/// The longest one "busy" answer makes us wait.
const MAX_BUSY_DELAY: Duration = Duration::from_secs(5);

/// What a registration under way was told so far.
#[derive(Debug, Default)]
struct Patience {
    /// "Busy" answers.
    busy: u8,
    /// The waits they brought, in all.
    waited: Duration,
    /// A message 2 already gave message 3 tries of its own.
    renewed: bool,
}

/// Handle of an operation in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct OpId(usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Op(OpId),
    Batch,
    /// Time to tell the server this client is still here.
    Heartbeat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Joining {
    /// At start-up.
    First,
    /// `reg` after `dereg`.
    LogBack,
    /// The server forgot the session.
    Reconnect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Sent to the peer, awaiting its ack.
    Direct,
    /// Sent to the server as a save-message request.
    Save(Seq),
    /// Sent again to the fresh address after `Exists`.
    Retry,
    /// Handed to the server to relay: the peer is online but no direct
    /// path opened (or the last message to it needed the relay too).
    Relay(Seq),
}

impl Phase {
    /// The request to the server this phase is, if any.
    fn seq(self) -> Option<Seq> {
        match self {
            Phase::Save(seq) | Phase::Relay(seq) => Some(seq),
            Phase::Direct | Phase::Retry => None,
        }
    }
}

/// How direct messages reach a peer, as `list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Straight to the address in the table: it answered at once.
    Direct,
    /// Straight to it, after the server had both sides send to each other
    /// (hole punching) or a message had to fall back.
    Punched,
    /// Through the server: no direct path opened.
    Relayed,
}

impl Path {
    /// The word `list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Punched => "punched",
            Path::Relayed => "relayed",
        }
    }
}

#[derive(Debug)]
enum Kind {
    Register {
        seq: Seq,
        joining: Joining,
    },
    Deregister {
        seq: Seq,
    },
    Channel {
        seq: Seq,
        id: MsgId,
        text: Text,
    },
    Direct {
        to: Name,
        addr: SocketAddr,
        /// The recipient's key, from the table (or the server's `Exists`).
        key: PublicKey,
        id: MsgId,
        text: Text,
        phase: Phase,
        /// The message sealed to `key`, once it goes to the server (boxed:
        /// most operations never need its kilobyte).
        sealed: Option<Box<wire::Sealed>>,
    },
    Sync {
        seq: Seq,
    },
    Heartbeat {
        seq: Seq,
    },
}

impl Kind {
    /// A direct message to the table row `entry`, at `phase`.
    fn direct(
        entry: Entry,
        id: MsgId,
        text: Text,
        phase: Phase,
        sealed: Option<Box<wire::Sealed>>,
    ) -> Kind {
        Kind::Direct {
            to: entry.name,
            addr: entry.addr,
            key: entry.key,
            id,
            text,
            phase,
            sealed,
        }
    }
}

impl Kind {
    /// The sequence number of the request to the server under way, if any.
    fn seq(&self) -> Option<Seq> {
        match self {
            Kind::Register { seq, .. }
            | Kind::Deregister { seq }
            | Kind::Channel { seq, .. }
            | Kind::Sync { seq }
            | Kind::Heartbeat { seq } => Some(*seq),
            Kind::Direct { phase, .. } => phase.seq(),
        }
    }
}

#[derive(Debug)]
struct Op {
    kind: Kind,
    sent: u8,
    timer: TimerKey,
    /// Which registration the operation started in (a count): a refusal
    /// of an older session's request is just that request's end.
    session: u32,
    /// Waiting for a new session: the server had forgotten ours.
    parked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    /// Waiting for `Welcome`.
    Joining,
    Online,
    /// After `dereg`: only `reg`, `list` and `help` work.
    Offline,
    /// Exit was requested; nothing more happens.
    Done,
}

struct Batch {
    /// The welcome's `seq`: deliveries of another batch are not ours.
    id: Seq,
    total: u32,
    next: u32,
    ahead: BTreeMap<u32, Delivery>,
    timer: TimerKey,
}

struct Delivery {
    mail: MailId,
    from: Name,
    channel: bool,
    /// False for a direct message nobody proved the sender of.
    verified: bool,
    stored_at: i64,
    /// `None`: the seal did not open (not sealed by the sender's key for
    /// ours); it is reported and acked, never shown.
    body: Option<(MsgId, Text)>,
}

/// Remembers the last [`SEEN`] (sender, id) pairs.
#[derive(Default)]
struct Seen {
    set: HashSet<(Name, MsgId)>,
    order: VecDeque<(Name, MsgId)>,
}

impl Seen {
    /// True the first time a pair is offered.
    fn first(&mut self, from: &Name, id: MsgId) -> bool {
        let key = (from.clone(), id);
        if !self.set.insert(key.clone()) {
            return false;
        }
        if self.order.len() == SEEN
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(key);
        true
    }
}

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
    ops: Slab<Op>,
    by_seq: HashMap<Seq, OpId>,
    by_msg: HashMap<MsgId, OpId>,
    sync: Option<OpId>,
    /// Pages of the current sync request's window applied so far.
    sync_pages: usize,
    /// How the registration under way was answered so far.
    patience: Patience,
    /// The server answered at `config.server`: the alternates are done.
    server_answered: bool,
    /// Tries of message 1 sent while no address had answered.
    join_turn: usize,
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
            ops: Slab::new(),
            by_seq: HashMap::new(),
            by_msg: HashMap::new(),
            sync: None,
            sync_pages: 0,
            patience: Patience::default(),
            server_answered: false,
            join_turn: 0,
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

    // ---- inputs -----------------------------------------------------------

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
            Message::Alive { seq, version } => {
                let heartbeat = |k: &Kind| matches!(k, Kind::Heartbeat { .. });
                let idle = self.sync.is_none() && self.batch.is_none();
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
                if self.presence == Presence::Online && self.sync.is_none() {
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

    /// XX message 2 from the server: check its key, then send message 3
    /// with the registration in it.
    fn on_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        receiver: u64,
        sender: u64,
        noise: &[u8; packet::XX2_LEN],
    ) {
        let Some((op, seq)) = self.register_op() else {
            return;
        };
        let first = Message::Register {
            seq,
            name: self.config.name.clone(),
        };
        match self.session.on_response(receiver, sender, noise, &first) {
            // Not the pinned key: nothing more goes to it; the next try
            // starts afresh, and if none meets the pinned key the change is
            // reported (a forgery cannot end the registration by itself).
            None | Some(KeyCheck::Changed) => {}
            Some(check) => {
                self.server_answers_at(from);
                if let KeyCheck::Learned(key) = check {
                    self.events.push_back(Event::ServerKeyLearned(key));
                }
                self.send_join();
                // The server answered with its key: alive. Message 3 gets
                // tries of its own (a loaded server may take a while for
                // each step of the handshake) — once per registration, so
                // a server (or an on-path attacker) that answers message 1
                // but never message 3 still ends in "not responding".
                if !std::mem::replace(&mut self.patience.renewed, true) {
                    self.rearm(now, op, ACK_TIMEOUT);
                }
            }
        }
    }

    /// The registration under way: its operation and sequence number.
    fn register_op(&self) -> Option<(OpId, Seq)> {
        self.ops.iter().find_map(|(i, op)| match op.kind {
            Kind::Register { seq, .. } => Some((OpId(i), seq)),
            _ => None,
        })
    }

    /// The server is alive but behind: message 1 goes again after the wait
    /// it asked for, doubled on the next two repeats and jittered (RFC 8085
    /// §3.1.3), so a storm of joiners spreads out instead of coming back in
    /// step. The answer does not count as a try. Unauthenticated (it only
    /// echoes our index), so it is believed for [`BUSY_BUDGET`] in all;
    /// past that the tries run out as for silence.
    fn on_busy(&mut self, now: Instant, wait_ms: u16) {
        let Some((op, _)) = self.register_op() else {
            return;
        };
        if self.patience.waited >= BUSY_BUDGET {
            return;
        }
        let base = Duration::from_millis(u64::from(wait_ms)).max(ACK_TIMEOUT);
        let backoff = base * (1u32 << self.patience.busy.min(2));
        // Uniform in [0.5, 1.5) of it.
        let factor = 0.5 + f64::from(self.rng.next_u32()) / (f64::from(u32::MAX) + 1.0);
        let delay = backoff.mul_f64(factor).min(MAX_BUSY_DELAY);
        self.patience.busy = self.patience.busy.saturating_add(1);
        self.patience.waited += delay;
        if let Some(entry) = self.ops.get_mut(op.0) {
            self.timers.cancel(entry.timer);
            entry.sent = entry.sent.saturating_sub(1);
            entry.timer = self.timers.insert(now + delay, Timer::Op(op));
        }
    }

    /// The server answered a handshake step (checked) from `from`, one of
    /// its addresses: that address is the server's from now on, so that a
    /// cookie or a session is never taken to another one.
    fn server_answers_at(&mut self, from: SocketAddr) {
        if self.server_answered {
            return;
        }
        self.server_answered = true;
        if from != self.config.server
            && let Some(other) = self.config.alternates.iter_mut().find(|a| **a == from)
        {
            std::mem::swap(other, &mut self.config.server);
        }
    }

    /// Sends the handshake datagram the registration is at: until the
    /// server has answered, each try goes to the next of its addresses.
    fn send_join(&mut self) {
        if let Some((payload, what)) = self.session.join_datagram() {
            let mut to = self.config.server;
            if !self.server_answered && !self.config.alternates.is_empty() {
                let turn = self.join_turn % (1 + self.config.alternates.len());
                self.join_turn = self.join_turn.wrapping_add(1);
                if turn > 0 {
                    to = self.config.alternates[turn - 1];
                }
            }
            self.transmit(Transmit { to, payload, what });
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
                        let beating = self
                            .ops
                            .iter()
                            .any(|(_, op)| matches!(op.kind, Kind::Heartbeat { .. }));
                        if !beating {
                            let seq = self.seq();
                            let op = self.start(now, Kind::Heartbeat { seq }, ACK_TIMEOUT);
                            self.by_seq.insert(seq, op);
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

    /// `send <to> <text>`: a direct message. Its outcome events carry the
    /// id this returns.
    pub fn send_message(
        &mut self,
        now: Instant,
        to: &Name,
        text: &str,
    ) -> Result<MsgId, CommandError> {
        self.usable()?;
        let text = Self::text(text)?;
        let Some(entry) = self.table.get(to).cloned() else {
            return Err(CommandError::UnknownClient(to.to_string()));
        };
        if entry.key.is_none() {
            return Err(CommandError::NoKey(to.clone()));
        }
        let id = self.msg_id();
        if !entry.online {
            self.events.push_back(Event::PeerOffline {
                to: entry.name.clone(),
                id,
            });
            let sealed = self.seal(&entry.name, &entry.key, id, &text);
            self.start_at_server(now, entry, id, text, sealed, Phase::Save);
        } else if self.peers.path(&entry.key) == Some(Path::Relayed) {
            // The last message needed the relay: this one goes the same
            // way at once, and beside it our side of a fresh try at a
            // direct path (the server has the peer send its side).
            let sealed = self.seal(&entry.name, &entry.key, id, &text);
            self.punch(entry.key, entry.addr);
            let op = self.start_at_server(now, entry, id, text, sealed, Phase::Relay);
            self.by_msg.insert(id, op);
        } else {
            let kind = Kind::direct(entry, id, text, Phase::Direct, None);
            let op = self.start(now, kind, RETRANSMIT);
            self.by_msg.insert(id, op);
        }
        Ok(id)
    }

    /// `text` with its id, sealed to the recipient's key (before the server
    /// sees it: it can neither read nor alter it).
    fn seal(&mut self, to: &Name, key: &PublicKey, id: MsgId, text: &Text) -> Option<Box<Sealed>> {
        let body = wire::encode_body(&MailBody {
            id,
            text: text.clone(),
        });
        let mut seed = [0; 32];
        self.rng.fill_bytes(&mut seed);
        let sealed = crypto::seal_mail(&self.config.key, &self.config.name, key, to, &body, seed);
        Sealed::from_slice(&sealed).ok().map(Box::new)
    }

    /// Sends `sealed` to the server for `entry`, as a save-message or a
    /// relay (`phase`).
    fn start_at_server(
        &mut self,
        now: Instant,
        entry: Entry,
        id: MsgId,
        text: Text,
        sealed: Option<Box<Sealed>>,
        phase: fn(Seq) -> Phase,
    ) -> OpId {
        let seq = self.seq();
        let kind = Kind::direct(entry, id, text, phase(seq), sealed);
        let op = self.start(now, kind, ACK_TIMEOUT);
        self.by_seq.insert(seq, op);
        op
    }

    /// Our side of hole punching towards the peer `key` at `addr`.
    fn punch(&mut self, key: PublicKey, addr: SocketAddr) {
        let session = &self.session;
        let out = self
            .peers
            .punch(&self.config.key, key, addr, &mut self.rng, |i| {
                session.owns(i)
            });
        if let Some(t) = out {
            self.transmit(t);
        }
    }

    /// For the load tool only: a save-message to `to` (offline in the
    /// table) carrying `sealed` as it is, without sealing anything, so
    /// that one process can drive the server's store at the rate many
    /// senders would (each sealing on its own CPU). The server cannot tell
    /// (it never opens a seal); a recipient would refuse it, since it is
    /// not sealed for this message. Nothing happens if `to` is not an
    /// offline row of the table or `sealed` is too long.
    #[doc(hidden)]
    pub fn save_presealed(&mut self, now: Instant, to: &str, sealed: &[u8]) {
        let entry = Name::new(to).ok().and_then(|n| self.table.get(&n).cloned());
        let (Some(entry), Ok(text)) = (entry, Text::new("(presealed)")) else {
            return;
        };
        if self.usable().is_err() || entry.online || sealed.len() > wire::MAX_SEALED {
            return;
        }
        let id = self.msg_id();
        self.events.push_back(Event::PeerOffline {
            to: entry.name.clone(),
            id,
        });
        let sealed = Sealed::from_slice(sealed).ok().map(Box::new);
        self.start_at_server(now, entry, id, text, sealed, Phase::Save);
    }

    /// `send_all <text>`: a channel message. Its outcome events carry the
    /// id this returns.
    pub fn send_all(&mut self, now: Instant, text: &str) -> Result<MsgId, CommandError> {
        self.usable()?;
        let text = Self::text(text)?;
        let (seq, id) = (self.seq(), self.msg_id());
        let op = self.start(now, Kind::Channel { seq, id, text }, ACK_TIMEOUT);
        self.by_seq.insert(seq, op);
        Ok(id)
    }

    /// `dereg`: a notified leave ([`Event::Bye`] once the server acked).
    pub fn dereg(&mut self, now: Instant) -> Result<(), CommandError> {
        self.usable()?;
        let under_way = self
            .ops
            .iter()
            .any(|(_, op)| matches!(op.kind, Kind::Deregister { .. }));
        if !under_way {
            let seq = self.seq();
            let op = self.start(now, Kind::Deregister { seq }, ACK_TIMEOUT);
            self.by_seq.insert(seq, op);
        }
        Ok(())
    }

    /// `quit`: leave telling the server (a dereg), then exit with status 0;
    /// offline or still registering, exit at once.
    /// Messages still in flight end first (acked, saved or failed, each
    /// said so), then the dereg goes.
    pub fn quit(&mut self, now: Instant) {
        match self.presence {
            Presence::Online => {
                self.quitting = true;
                self.quit_when_done(now);
            }
            Presence::Offline | Presence::Joining => self.close(false),
            Presence::Done => {}
        }
    }

    /// A `quit` waits for the messages in flight: once none is left, the
    /// dereg goes (and its ack ends the client).
    fn quit_when_done(&mut self, now: Instant) {
        if !self.quitting || self.presence != Presence::Online {
            return;
        }
        let sending = self
            .ops
            .iter()
            .any(|(_, op)| matches!(op.kind, Kind::Direct { .. } | Kind::Channel { .. }));
        if !sending {
            // Online, so it cannot be refused.
            let _ = self.dereg(now);
        }
    }

    /// The server has us offline, as a dereg asked: `[You are Offline.
    /// Bye.]`, and the exit a `quit` asked for.
    fn left(&mut self) {
        self.go_offline();
        self.events.push_back(Event::Bye);
        if self.quitting {
            self.close(false);
        }
    }

    /// `reg <name>`: log back in after `dereg`.
    pub fn reg(&mut self, now: Instant) -> Result<(), CommandError> {
        match self.presence {
            Presence::Offline => {
                self.register(now, Joining::LogBack);
                Ok(())
            }
            Presence::Online => Err(CommandError::AlreadyOnline),
            Presence::Joining => Err(CommandError::Registering),
            Presence::Done => Err(CommandError::Exited),
        }
    }

    // ---- outputs ----------------------------------------------------------

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
            Timer::Op(op) => match self.ops.get(op.0).map(|op| &op.kind) {
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
                .ops
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
        let commands = self
            .ops
            .iter()
            .filter(|(_, op)| {
                matches!(
                    op.kind,
                    Kind::Direct { .. } | Kind::Channel { .. } | Kind::Deregister { .. }
                )
            })
            .count();
        // A dereg under way decides what the next line may do (`reg`, a
        // send): the script waits for its answer.
        let leaving = (self.ops.iter()).any(|(_, op)| matches!(op.kind, Kind::Deregister { .. }));
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

    // ---- incoming ---------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn on_chat(
        &mut self,
        now: Instant,
        key: PublicKey,
        index: u64,
        from: SocketAddr,
        sender: Name,
        to: Name,
        id: MsgId,
        text: Text,
    ) {
        // A deregistered client neither shows nor acks: the sender falls back
        // to the server, which keeps the message for the next log-back. Nor
        // does a client that got someone else's message.
        if self.presence != Presence::Online || to != self.config.name {
            return;
        }
        // Shown as from `sender` only if the session's key owns that name.
        if self
            .table
            .get(&sender)
            .is_none_or(|e| e.key != key || e.key.is_none())
        {
            if self.sync.is_none() {
                // Perhaps our table is behind (a new client): catch up; the
                // sender tries again, or the server keeps the message.
                let since = self.table.version();
                self.start_sync(now, since);
            }
            return;
        }
        if self.seen.first(&sender, id) {
            self.events.push_back(Event::Direct { from: sender, text });
        }
        if let Some(t) = self.peers.reply(index, from, &Message::ChatAck { id }) {
            self.transmit(t);
        }
    }

    fn on_chat_ack(&mut self, key: PublicKey, id: MsgId) {
        let Some(&op) = self.by_msg.get(&id) else {
            return;
        };
        // Only the recipient's key can ack it.
        if !matches!(self.ops.get(op.0), Some(Op { kind: Kind::Direct { key: k, .. }, .. }) if *k == key)
        {
            return;
        }
        self.by_msg.remove(&id);
        if let Some(Kind::Direct { to, id, .. }) = self.finish(op) {
            self.peers.proved(key);
            self.events.push_back(Event::ReceivedBy { to, id });
        }
    }

    /// A direct message the server relayed (its sender could not reach
    /// us): shown as the direct message it is, if its seal opens with the
    /// sender's key, then acked to the server, which tells the sender.
    fn on_relayed(&mut self, now: Instant, mail: MailId, from: Name, content: Content) {
        // Acks only follow display; offline, the server keeps it for us.
        if self.presence != Presence::Online {
            return;
        }
        // Shown as a direct message from `from` only as a peer's chat is:
        // our table must hold that name with the key that sealed it. A
        // name it lacks yet: catch up, the server delivers it again.
        if self.table.get(&from).is_none_or(|e| e.key.is_none()) {
            if self.sync.is_none() {
                let since = self.table.version();
                self.start_sync(now, since);
            }
            return;
        }
        let key = match &content {
            Content::Sealed { key, .. } => Some(*key),
            Content::Relayed { .. } => None,
        };
        let d = self.open_delivery(mail, 0, from, content);
        match (key, d.body) {
            (Some(key), Some((id, text))) => {
                // Our answers go the same way until a direct path opens.
                self.peers.relayed(key);
                if self.seen.first(&d.from, id) {
                    self.events.push_back(Event::Direct { from: d.from, text });
                }
            }
            // Not sealed by the table's key for the sender, or not sealed
            // at all (the server never relays clear text): reported and
            // dropped, never shown.
            _ => self.show_stored(Delivery { body: None, ..d }),
        }
        self.ack_mail(mail);
    }

    fn on_welcome(&mut self, now: Instant, seq: Seq, mail: u32, reset: [u8; packet::TOKEN_LEN]) {
        let Some(Kind::Register { joining, .. }) =
            self.take_server_op(seq, |k| matches!(k, Kind::Register { .. }))
        else {
            return;
        };
        self.session.end_join();
        self.session.set_reset(reset);
        self.sessions = self.sessions.wrapping_add(1);
        self.presence = Presence::Online;
        match joining {
            Joining::First => self.events.push_back(Event::Welcome),
            // The server may have restarted while we were offline, and a
            // restarted server numbers table versions afresh: a version
            // kept from before would make later catch-up syncs skip rows
            // (simulation seeds 3394, 4211). The entries stay, so sends
            // work while the mail streams; the full sync refreshes them.
            Joining::LogBack => self.table.forget_version(),
            Joining::Reconnect => {
                // A restarted server may know fewer clients: start afresh.
                self.table.clear();
                self.events.push_back(Event::Reconnected);
            }
        }
        let parked: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| op.parked)
            .map(|(i, _)| OpId(i))
            .collect();
        for op in parked {
            if let Some(entry) = self.ops.get_mut(op.0) {
                entry.parked = false;
                entry.session = self.sessions;
            }
            self.restart(now, op, ACK_TIMEOUT);
        }
        self.announce = true;
        self.last_batch = Some(seq);
        if let Some(timer) = self.heartbeat.take() {
            self.timers.cancel(timer);
        }
        self.heartbeat = Some(
            self.timers
                .insert(now + self.config.heartbeat, Timer::Heartbeat),
        );
        // A batch of the previous session (the server restarted mid-stream)
        // is void: positions start over with this welcome, and its stall
        // timer must not abandon the new batch (simulation seed 3594).
        if let Some(old) = self.batch.take() {
            self.timers.cancel(old.timer);
        }
        if mail > 0 {
            self.events.push_back(Event::HaveMessages);
            let timer = self.timers.insert(now + BATCH_STALL, Timer::Batch);
            self.batch = Some(Batch {
                id: seq,
                total: mail,
                next: 0,
                ahead: BTreeMap::new(),
                timer,
            });
        } else {
            self.start_sync(now, 0);
        }
    }

    fn on_ack(&mut self, now: Instant, seq: Seq) {
        let Some(kind) = self.take_server_op(seq, |k| {
            matches!(
                k,
                Kind::Deregister { .. }
                    | Kind::Channel { .. }
                    | Kind::Direct {
                        phase: Phase::Save(_) | Phase::Relay(_),
                        ..
                    }
            )
        }) else {
            return;
        };
        match kind {
            Kind::Deregister { .. } => self.left(),
            Kind::Channel { id, .. } => self.events.push_back(Event::ChannelAcked { id }),
            Kind::Direct { id, .. } => self.events.push_back(Event::Saved { id }),
            _ => {}
        }
        let _ = now;
    }

    fn on_exists(&mut self, now: Instant, seq: Seq, entry: Entry) {
        let Some(&op) = self.by_seq.get(&seq) else {
            return;
        };
        let Some(Op {
            kind:
                Kind::Direct {
                    to,
                    addr,
                    key,
                    id,
                    phase,
                    ..
                },
            ..
        }) = self.ops.get_mut(op.0)
        else {
            return;
        };
        if !matches!(phase, Phase::Save(_)) || entry.name != *to || entry.key.is_none() {
            return;
        }
        self.by_seq.remove(&seq);
        *addr = entry.addr;
        *key = entry.key;
        *phase = Phase::Retry;
        let (to, id) = (to.clone(), *id);
        self.events.push_back(Event::Exists { to, id });
        self.by_msg.insert(id, op);
        self.restart(now, op, RETRANSMIT);
        // The table was wrong about this peer; catch up with the server's.
        if self.sync.is_none() {
            let since = self.table.version();
            self.start_sync(now, since);
        }
    }

    /// A stateless reset proved the server holds no session of ours (it
    /// restarted): what was on its way to it waits for a new registration
    /// and goes again (same ids, so stored once whatever happened before).
    fn on_lost_session(&mut self, now: Instant) {
        if self.presence != Presence::Online {
            return;
        }
        let mut dereg = false;
        let ids: Vec<OpId> = self.ops.iter().map(|(i, _)| OpId(i)).collect();
        for op in ids {
            let Some(entry) = self.ops.get_mut(op.0) else {
                continue;
            };
            match entry.kind {
                Kind::Channel { .. }
                | Kind::Direct {
                    phase: Phase::Save(_) | Phase::Relay(_),
                    ..
                } => {
                    self.timers.cancel(entry.timer);
                    entry.parked = true;
                }
                Kind::Deregister { .. } => {
                    dereg = true;
                    self.finish(op);
                }
                Kind::Sync { .. } => {
                    self.finish(op);
                    self.table.cancel_sync();
                }
                Kind::Heartbeat { .. } => {
                    self.finish(op);
                }
                _ => {}
            }
        }
        if dereg {
            // We are not registered any more, which is what dereg asked for.
            self.drop_parked("you went offline before the server took it; not saved.");
            self.left();
        } else {
            self.forget_session(now);
        }
    }

    /// Ends every parked operation with an error line.
    fn drop_parked(&mut self, why: &str) {
        let parked: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| op.parked)
            .map(|(i, _)| OpId(i))
            .collect();
        for op in parked {
            let id = match self.finish(op) {
                Some(Kind::Direct { id, .. } | Kind::Channel { id, .. }) => Some(id),
                _ => None,
            };
            self.refuse(id, why.to_string());
        }
    }

    fn on_refused(&mut self, now: Instant, seq: Seq, reason: Refusal) {
        let current = self
            .by_seq
            .get(&seq)
            .and_then(|op| self.ops.get(op.0))
            .is_some_and(|op| op.session == self.sessions);
        if reason == Refusal::UnknownSession && current && self.presence == Presence::Online {
            // The server forgot us (it restarted): a message on its way to
            // it waits for the new session and goes again, same id, so it
            // is stored once whatever happened before.
            if let Some(&op) = self.by_seq.get(&seq)
                && let Some(entry) = self.ops.get_mut(op.0)
                && matches!(
                    entry.kind,
                    Kind::Channel { .. }
                        | Kind::Direct {
                            phase: Phase::Save(_) | Phase::Relay(_),
                            ..
                        }
                )
            {
                self.timers.cancel(entry.timer);
                entry.parked = true;
                self.forget_session(now);
                return;
            }
        }
        let Some(kind) = self.take_server_op(seq, |_| true) else {
            return;
        };
        // Only a refusal of the current session means "register again"; one
        // for a request from an older session is just that request's end.
        // A refused message's line says which it was (its id).
        let id = match &kind {
            Kind::Direct { id, .. } | Kind::Channel { id, .. } => Some(*id),
            _ => None,
        };
        match (kind, reason) {
            // The server does not know us (it restarted): we are offline
            // already, which is what dereg asked for.
            (Kind::Deregister { .. }, Refusal::UnknownSession) => self.left(),
            (Kind::Heartbeat { .. }, _) if current => self.forget_session(now),
            (Kind::Heartbeat { .. }, _) => {}
            (Kind::Direct { to, id, .. }, Refusal::MailboxFull) => {
                self.events.push_back(Event::MailboxFull { to, id });
            }
            (Kind::Direct { to, .. }, Refusal::Busy) => {
                self.refuse(id, format!(
                    "the server is busy; the message to {to} was not saved — send it again."
                ));
            }
            (Kind::Direct { to, .. }, Refusal::UnknownRecipient) => {
                self.refuse(id, format!(
                    "the server has no client {to}; the message was not saved."
                ));
            }
            (Kind::Register { joining, .. }, reason) => {
                self.session.end_join();
                self.error(if reason == Refusal::TooManyNames {
                    "too many new names from this address lately; try again later.".to_string()
                } else {
                    "the server is full; try again later.".to_string()
                });
                if joining == Joining::First {
                    self.close(true);
                } else {
                    // What waited for this registration ends here, said so:
                    // a later `reg` must not send it unannounced.
                    self.presence = Presence::Offline;
                    self.drop_parked("the server is full; the message was not saved.");
                }
            }
            (Kind::Sync { .. }, _) => {
                self.table.cancel_sync();
                if current {
                    self.forget_session(now);
                }
            }
            (Kind::Direct { .. } | Kind::Channel { .. }, Refusal::UnknownSession) => {
                if self.presence == Presence::Online && current {
                    self.refuse(
                        id,
                        "the server lost this session; reconnecting — send it again.".to_string(),
                    );
                    self.forget_session(now);
                } else if self.presence == Presence::Online {
                    self.refuse(id, "the server lost this session; send it again.".to_string());
                } else {
                    self.refuse(
                        id,
                        "you went offline before the server took it; not saved.".to_string(),
                    );
                }
            }
            (_, Refusal::TooManyRequests) => self.refuse(
                id,
                "too many requests from this address just now; not saved — send it again in a moment."
                    .to_string(),
            ),
            (_, Refusal::MailboxFull | Refusal::StoreFull) => {
                self.refuse(id, "the server's store is full; not saved.".to_string())
            }
            (_, Refusal::StoreBusy) => self.refuse(
                id,
                "the server's store is busy (locked by another process); not saved — send it again."
                    .to_string(),
            ),
            (_, _) => self.refuse(id, "the server refused the request; try again later.".to_string()),
        }
    }

    fn on_page(
        &mut self,
        now: Instant,
        seq: Seq,
        version: u64,
        from: u32,
        entries: &[Entry],
        next: Option<u32>,
    ) {
        let Some(op) = self.sync else {
            return;
        };
        if !matches!(self.ops.get(op.0), Some(Op { kind: Kind::Sync { seq: s }, .. }) if *s == seq)
        {
            return;
        }
        // Only the page that continues the pass: one after a lost page, or
        // a late copy, is dropped (the retry asks from where we are).
        let Some((since, expected)) = self.table.sync_request() else {
            return;
        };
        if from != expected {
            return;
        }
        self.sync_pages += 1;
        match self.table.apply_page(version, entries, next) {
            PageOutcome::More => {
                let same_pass = self.table.sync_request().is_some_and(|(s, _)| s == since);
                if next.is_some() && same_pass && self.sync_pages < wire::SYNC_WINDOW {
                    // More of this window is on its way: an answer, so the
                    // tries start over, but nothing to send.
                    self.rearm(now, op, ACK_TIMEOUT);
                    return;
                }
                self.by_seq.remove(&seq);
                self.sync_pages = 0;
                let seq = self.seq();
                if let Some(Op {
                    kind: Kind::Sync { seq: s },
                    ..
                }) = self.ops.get_mut(op.0)
                {
                    *s = seq;
                }
                self.by_seq.insert(seq, op);
                self.restart(now, op, ACK_TIMEOUT);
            }
            PageOutcome::Done { changed } => {
                self.by_seq.remove(&seq);
                self.sync = None;
                self.sync_pages = 0;
                self.finish(op);
                // Announce a join or log-back even if the table looks the same.
                let announce = std::mem::take(&mut self.announce);
                if changed || announce {
                    self.events.push_back(Event::TableUpdated);
                }
                self.become_ready();
            }
        }
    }

    fn on_delta(&mut self, now: Instant, prev: u64, version: u64, entries: &[Entry]) {
        // While joining or reading the mailbox the sync that follows brings
        // the whole table; a delta now would only be announced twice.
        if self.presence != Presence::Online || self.batch.is_some() {
            return;
        }
        // Who was online before, to name who came and went.
        let before: Vec<Option<bool>> = entries
            .iter()
            .map(|e| self.table.get(&e.name).map(|row| row.online))
            .collect();
        match self.table.apply_delta(prev, version, entries) {
            DeltaOutcome::Applied { changed: true } => {
                self.events.push_back(Event::TableUpdated);
                let changes = entries
                    .iter()
                    .zip(before)
                    .filter(|(e, was)| e.name != self.config.name && *was != Some(e.online))
                    // A new name that is offline (a release, a restart) is
                    // no one coming or going.
                    .filter(|(e, was)| was.is_some() || e.online);
                let mut named = 0;
                let mut more = 0;
                for (e, _) in changes {
                    if named < PRESENCE_LINES {
                        named += 1;
                        self.events.push_back(Event::Presence {
                            name: e.name.clone(),
                            online: e.online,
                        });
                    } else {
                        more += 1;
                    }
                }
                if more > 0 {
                    self.events.push_back(Event::PresenceMore(more));
                }
            }
            DeltaOutcome::Applied { changed: false } | DeltaOutcome::Stale => {}
            DeltaOutcome::Gap => {
                if self.sync.is_none() {
                    let since = self.table.version();
                    self.start_sync(now, since);
                }
            }
        }
    }

    fn on_deliver(&mut self, now: Instant, batch_id: Seq, pos: Option<u32>, d: Delivery) {
        // Acks only follow display: a message acked but not shown would be
        // deleted by the server and lost.
        if self.presence != Presence::Online {
            return;
        }
        let Some(pos) = pos else {
            // Live: a channel message as it happens, or a direct message the
            // server kept for us while we were being taken for gone.
            let mail = d.mail;
            match d.body {
                Some((id, text)) if d.channel => {
                    if self.seen.first(&d.from, id) {
                        self.events.push_back(Event::Channel { from: d.from, text });
                    }
                }
                _ => self.show_stored(d),
            }
            self.ack_mail(mail);
            return;
        };
        // A delayed datagram of an earlier batch (simulation seeds 12299,
        // 12489) must not take a place in this one: it is ignored, unacked,
        // and the current batch brings the message in its order.
        let Some(batch) = self.batch.as_mut().filter(|b| b.id == batch_id) else {
            if self.batch.is_none() && self.last_batch == Some(batch_id) {
                // A late retransmission of the batch just finished.
                let mail = d.mail;
                self.show_stored(d);
                self.ack_mail(mail);
            }
            return;
        };
        if pos < batch.next {
            // Shown already (the ack was lost): ack again.
            let mail = d.mail;
            self.show_stored(d);
            self.ack_mail(mail);
            return;
        }
        if pos >= batch.total || pos >= batch.next.saturating_add(BATCH_AHEAD) {
            return;
        }
        batch.ahead.insert(pos, d);
        let mut shown = Vec::new();
        while let Some(d) = batch.ahead.remove(&batch.next) {
            batch.next += 1;
            shown.push(d);
        }
        let done = batch.next >= batch.total;
        let progress = !shown.is_empty();
        for d in shown {
            let mail = d.mail;
            self.show_stored(d);
            self.ack_mail(mail);
        }
        if done {
            if let Some(batch) = self.batch.take() {
                self.timers.cancel(batch.timer);
            }
            self.start_sync(now, 0);
        } else if progress && let Some(batch) = self.batch.as_mut() {
            self.timers.cancel(batch.timer);
            batch.timer = self.timers.insert(now + BATCH_STALL, Timer::Batch);
        }
    }

    fn show_stored(&mut self, d: Delivery) {
        let Some((id, text)) = d.body else {
            self.events.push_back(Event::Unverifiable(d.from));
            return;
        };
        if self.seen.first(&d.from, id) {
            let event = Event::Stored {
                from: d.from,
                channel: d.channel,
                verified: d.verified,
                stored_at: d.stored_at,
                text,
            };
            self.events.push_back(event);
        }
    }

    /// A delivery as shown: sealed mail opened with our key (it must have
    /// been sealed by the key the server vouches for, between exactly these
    /// names), relayed channel mail as it came in our session.
    fn open_delivery(
        &mut self,
        mail: MailId,
        stored_at: i64,
        from: Name,
        content: Content,
    ) -> Delivery {
        let (channel, verified, body) = match content {
            Content::Sealed { key, sealed } => {
                // The server says which key sealed it; our table, where it
                // knows the sender, must agree (else the server lies about
                // one or the other).
                let agrees = self
                    .table
                    .get(&from)
                    .is_none_or(|e| e.key.is_none() || e.key == key);
                let body = agrees
                    .then(|| {
                        crypto::open_mail(&self.config.key, &self.config.name, &key, &from, &sealed)
                    })
                    .flatten()
                    .and_then(|plain| wire::decode_body(&plain))
                    .map(|b| (b.id, b.text));
                (false, true, body)
            }
            // A channel message is the server's word by design; one the
            // server marks as stored by protocol version 1 proved no sender,
            // and a direct one relayed never does: shown as unverified.
            Content::Relayed {
                channel,
                verified,
                id,
                text,
            } => (channel, channel && verified, Some((id, text))),
        };
        Delivery {
            mail,
            from,
            channel,
            verified,
            stored_at,
            body,
        }
    }

    fn ack_mail(&mut self, mail: MailId) {
        self.send_server(&Message::Delivered { mail });
    }

    // ---- timers -----------------------------------------------------------

    fn on_op_timer(&mut self, now: Instant, op: OpId) {
        let Some(entry) = self.ops.get(op.0) else {
            return;
        };
        let sent = entry.sent;
        match &entry.kind {
            Kind::Direct {
                phase: Phase::Direct | Phase::Retry,
                ..
            } if sent < 2 => {
                self.resend(now, op, RETRANSMIT);
            }
            Kind::Direct {
                to,
                key,
                id,
                text,
                phase: Phase::Direct,
                ..
            } => {
                // Silent for the whole ack window: hand it to the server,
                // sealed to the recipient's key (the server cannot read it).
                let (to, key, id, text) = (to.clone(), *key, *id, text.clone());
                let sealed = self.seal(&to, &key, id, &text);
                self.by_msg.remove(&id);
                self.peers.fell_back(key);
                self.events.push_back(Event::NoAck { to, id });
                self.hand_to_server(now, op, sealed, Phase::Save);
            }
            Kind::Direct {
                to,
                key,
                id,
                text,
                phase: Phase::Retry,
                ..
            } => {
                // The server reaches the peer, we do not, even after both
                // sides sent to each other: the server relays it (still
                // sealed to the peer's key, which `Exists` may have
                // changed). Never dropped: if the peer does not ack the
                // relayed copy, it waits in its mailbox ("saved").
                let (to, key, id, text) = (to.clone(), *key, *id, text.clone());
                let sealed = self.seal(&to, &key, id, &text);
                self.peers.relayed(key);
                self.hand_to_server(now, op, sealed, Phase::Relay);
            }
            _ if sent < SERVER_TRIES => {
                // Up to a fifth longer, never shorter: clients that lost
                // the same burst do not all come back at the same instant,
                // and five silent tries still take at least 2.5 s.
                let wait =
                    ACK_TIMEOUT.mul_f64(1.0 + f64::from(self.rng.next_u32() % 1000) / 5000.0);
                self.resend(now, op, wait);
            }
            _ => self.give_up(op),
        }
    }

    /// Moves a direct message to the server (`phase`: save or relay)
    /// with its seal, tries counted afresh.
    fn hand_to_server(
        &mut self,
        now: Instant,
        op: OpId,
        sealed: Option<Box<Sealed>>,
        phase: fn(Seq) -> Phase,
    ) {
        let seq = self.seq();
        if let Some(Op {
            kind:
                Kind::Direct {
                    phase: p,
                    sealed: s,
                    ..
                },
            ..
        }) = self.ops.get_mut(op.0)
        {
            *p = phase(seq);
            *s = sealed;
        }
        self.by_seq.insert(seq, op);
        self.restart(now, op, ACK_TIMEOUT);
    }

    /// Five tries without an answer from the server.
    fn give_up(&mut self, op: OpId) {
        let Some(kind) = self.finish(op) else {
            return;
        };
        // No handshake completed in five tries: what we heard instead is now
        // the likely reason. Neither is authenticated, so neither stops a
        // registration that could still succeed.
        if matches!(kind, Kind::Register { .. })
            && let Some(trouble) = self.session.end_join()
        {
            match trouble {
                Trouble::Version(v) => self.events.push_back(Event::VersionMismatch(v)),
                Trouble::KeyChanged { pinned, presented } => self
                    .events
                    .push_back(Event::ServerKeyChanged { pinned, presented }),
            }
            self.close(true);
            return;
        }
        match kind {
            Kind::Register {
                joining: Joining::LogBack,
                ..
            } => {
                self.presence = Presence::Offline;
                self.events.push_back(Event::ServerNotResponding);
            }
            Kind::Register { .. } | Kind::Deregister { .. } | Kind::Direct { .. } => {
                self.events.push_back(Event::ServerNotResponding);
                self.events.push_back(Event::Exiting);
                self.close(true);
            }
            Kind::Channel { id, .. } => self.events.push_back(Event::ChannelNotResponding { id }),
            Kind::Sync { .. } => {
                // The table stays as it is; a heartbeat or the next delta
                // shows the gap again.
                self.table.cancel_sync();
                self.announce = false;
                self.become_ready();
            }
            // The server may be gone; chat goes on, the next beat tries again.
            Kind::Heartbeat { .. } => {}
        }
    }

    /// The first registration is complete, table and all.
    fn become_ready(&mut self) {
        self.ready = true;
    }

    // ---- operations -------------------------------------------------------

    fn register(&mut self, now: Instant, joining: Joining) {
        self.presence = Presence::Joining;
        self.patience = Patience::default();
        // Every registration is a fresh handshake: it proves the key anew.
        self.session.begin(&self.config.key, &mut self.rng);
        let seq = self.seq();
        let op = self.start(now, Kind::Register { seq, joining }, ACK_TIMEOUT);
        self.by_seq.insert(seq, op);
    }

    /// The server no longer knows the session: register again by itself.
    fn forget_session(&mut self, now: Instant) {
        if self.presence != Presence::Online {
            return;
        }
        self.register(now, Joining::Reconnect);
    }

    fn start_sync(&mut self, now: Instant, since: u64) {
        if let Some(op) = self.sync.take()
            && let Some(Kind::Sync { seq }) = self.finish(op)
        {
            self.by_seq.remove(&seq);
        }
        self.table.start_sync(since);
        self.sync_pages = 0;
        let seq = self.seq();
        let op = self.start(now, Kind::Sync { seq }, ACK_TIMEOUT);
        self.by_seq.insert(seq, op);
        self.sync = Some(op);
    }

    /// Registers an operation, sends its first datagram and arms its timer.
    fn start(&mut self, now: Instant, kind: Kind, wait: Duration) -> OpId {
        let timer_slot = self.ops.vacant_key();
        let timer = self.timers.insert(now + wait, Timer::Op(OpId(timer_slot)));
        let op = OpId(self.ops.insert(Op {
            kind,
            sent: 0,
            timer,
            session: self.sessions,
            parked: false,
        }));
        self.transmit_op(op);
        op
    }

    /// Sends again and re-arms the timer (same phase).
    fn resend(&mut self, now: Instant, op: OpId, wait: Duration) {
        if let Some(entry) = self.ops.get_mut(op.0) {
            entry.timer = self.timers.insert(now + wait, Timer::Op(op));
        }
        self.transmit_op(op);
    }

    /// An answer that is not the last: one try outstanding again, the
    /// timer re-armed, nothing sent.
    fn rearm(&mut self, now: Instant, op: OpId, wait: Duration) {
        if let Some(entry) = self.ops.get_mut(op.0) {
            self.timers.cancel(entry.timer);
            entry.sent = 1;
            entry.timer = self.timers.insert(now + wait, Timer::Op(op));
        }
    }

    /// Starts a new phase: the try counter starts over.
    fn restart(&mut self, now: Instant, op: OpId, wait: Duration) {
        if let Some(entry) = self.ops.get_mut(op.0) {
            self.timers.cancel(entry.timer);
            entry.sent = 0;
        }
        self.resend(now, op, wait);
    }

    fn transmit_op(&mut self, op: OpId) {
        let Some(entry) = self.ops.get_mut(op.0) else {
            return;
        };
        entry.sent = entry.sent.saturating_add(1);
        self.emit(op, true);
    }

    /// Sends the operation's datagram (without counting a try). `retry`:
    /// this is a try, so an unanswered direct message may start a fresh
    /// handshake (not when a finished handshake releases it).
    fn emit(&mut self, op: OpId, retry: bool) {
        let Some(entry) = self.ops.get(op.0) else {
            return;
        };
        let msg = match &entry.kind {
            Kind::Register { .. } => {
                // Message 3 twice unanswered: the server may have lost the
                // handshake (it restarted); start it over.
                if self.session.finish_tries().is_some_and(|n| n >= 2) || !self.session.joining() {
                    self.session.begin(&self.config.key, &mut self.rng);
                }
                self.send_join();
                return;
            }
            Kind::Deregister { seq } => Message::Deregister { seq: *seq },
            Kind::Channel { seq, id, text } => Message::ChannelSend {
                seq: *seq,
                id: *id,
                text: text.clone(),
            },
            Kind::Direct {
                to,
                addr,
                key,
                id,
                text,
                phase: phase @ (Phase::Direct | Phase::Retry),
                ..
            } => {
                let msg = Message::Chat {
                    from: self.config.name.clone(),
                    to: to.clone(),
                    id: *id,
                    text: text.clone(),
                };
                // Unanswered once (or the server says the peer is alive
                // after all): the peer may have restarted and lost our
                // link, so a new handshake runs beside the old link.
                let fresh = retry && (*phase == Phase::Retry || entry.sent >= 2);
                let (key, addr) = (*key, *addr);
                let session = &self.session;
                let out = self.peers.send(
                    &self.config.key,
                    key,
                    addr,
                    &msg,
                    fresh,
                    &mut self.rng,
                    |i| session.owns(i),
                );
                for t in out {
                    self.transmit(t);
                }
                return;
            }
            Kind::Direct {
                to,
                id,
                phase: Phase::Save(seq),
                sealed: Some(sealed),
                ..
            } => Message::SaveMessage {
                seq: *seq,
                to: to.clone(),
                id: *id,
                sealed: (**sealed).clone(),
            },
            Kind::Direct {
                to,
                id,
                phase: Phase::Relay(seq),
                sealed: Some(sealed),
                ..
            } => Message::RelayMessage {
                seq: *seq,
                to: to.clone(),
                id: *id,
                sealed: (**sealed).clone(),
            },
            // Never: a save or relay always has its seal.
            Kind::Direct { .. } => return,
            Kind::Heartbeat { seq } => Message::Heartbeat {
                seq: *seq,
                version: self.table.version(),
            },
            Kind::Sync { seq } => {
                // A fresh window from where the pass stands.
                self.sync_pages = 0;
                let (since, from) = self.table.sync_request().unwrap_or((0, 0));
                Message::Sync {
                    seq: *seq,
                    since,
                    from,
                }
            }
        };
        self.send_server(&msg);
    }

    /// Our handshake with `key` finished: the direct messages that waited
    /// for it go now (their tries and timers are unchanged).
    fn flush_direct(&mut self, key: &PublicKey) {
        let waiting: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| {
                matches!(
                    &op.kind,
                    Kind::Direct { key: k, phase: Phase::Direct | Phase::Retry, .. } if k == key
                )
            })
            .map(|(i, _)| OpId(i))
            .collect();
        for op in waiting {
            self.emit(op, false);
        }
    }

    /// Removes a finished operation with its timer and every index entry
    /// pointing at it (slab slots are reused, so none may linger).
    fn finish(&mut self, op: OpId) -> Option<Kind> {
        let entry = self.ops.try_remove(op.0)?;
        self.timers.cancel(entry.timer);
        if let Some(seq) = entry.kind.seq()
            && self.by_seq.get(&seq) == Some(&op)
        {
            self.by_seq.remove(&seq);
        }
        if let Kind::Direct { id, .. } = entry.kind
            && self.by_msg.get(&id) == Some(&op)
        {
            self.by_msg.remove(&id);
        }
        if self.sync == Some(op) {
            self.sync = None;
        }
        Some(entry.kind)
    }

    /// Completes the server request `seq` if it is of the expected kind.
    fn take_server_op(&mut self, seq: Seq, want: impl Fn(&Kind) -> bool) -> Option<Kind> {
        let &op = self.by_seq.get(&seq)?;
        let kind = &self.ops.get(op.0)?.kind;
        if kind.seq() != Some(seq) || !want(kind) {
            return None;
        }
        self.finish(op)
    }

    /// After `dereg` (or a server that no longer knows us): no session, no
    /// heartbeat, no mail batch or table sync under way.
    fn go_offline(&mut self) {
        self.presence = Presence::Offline;
        if let Some(timer) = self.heartbeat.take() {
            self.timers.cancel(timer);
        }
        if let Some(batch) = self.batch.take() {
            self.timers.cancel(batch.timer);
        }
        if let Some(op) = self.sync {
            self.finish(op);
            self.table.cancel_sync();
        }
    }

    // ---- helpers ----------------------------------------------------------

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
