//! The registry server as a sans-IO state machine.
//!
//! It keeps the client table ([`Directory`]), one session per row (its Noise
//! link, reply cache, liveness probe, mail deliveries in flight) and every
//! mailbox in memory. Datagrams and time come in through `handle_*`;
//! datagrams, storage operations and log events go out through `poll_*`.
//!
//! Everything a client asks arrives on an authenticated Noise session (see
//! [`links`]); a name belongs to the first key that registered it, and only
//! a session of that key can register it, log back in, take it over or
//! receive its mail.
//!
//! Durability rule: while any [`StoreOp`] is uncommitted, no datagram leaves
//! ([`Server::poll_transmit`] returns `None`). The driver commits the batch
//! and calls [`Server::handle_committed`], so every ack that promises "saved"
//! follows its write to disk, and replies keep the order they were made in.
//! A commit that fails (a full disk, a database another process locked) is
//! reported with [`Server::handle_commit_failed`]: the messages of the batch
//! are taken back and their senders refused (never acked), while the rest of
//! the batch — acks, registrations, moves, which promised nobody "saved" —
//! is retried until the store takes it, so the server keeps serving.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha12Rng;
use rand_core::{RngCore, SeedableRng};

use crate::crypto::{AT_REST_SALT, Keypair, PublicKey};
use crate::store::{
    Body, ChannelMail, ClientRecord, Loaded, MAIL_OVERHEAD, StoreOp, StoredMail, at_rest_ad,
    channel_ad,
};
use crate::table::{ClientId, Directory};
use crate::timer::{TimerKey, TimerWheel};
use crate::wire::{
    self, Content, MailBody, MailId, Message, MsgId, Name, Refusal, Rejection, Seq, Text, What,
};
use crate::{RETRANSMIT, TICK, Transmit};

pub mod limits;
pub mod links;

pub use links::{AMPLIFICATION, LinkId, LinkStats};
use links::{Incoming, Links};

/// Limits and seeds for a [`Server`]. Its `Debug` shows neither the seed nor
/// the key's secret half.
#[derive(Clone)]
pub struct ServerConfig {
    /// Seeds every handshake, session index, cookie secret and probe nonce.
    /// Use 32 bytes from the OS in production; a fixed seed makes a
    /// simulation reproducible.
    pub seed: [u8; 32],
    /// The server's static key (kept across restarts: clients pin it).
    pub key: Keypair,
    /// Wall-clock anchor: the Unix time (seconds) at `Instant` — stored
    /// messages are stamped `unix + (now - instant)`.
    pub clock: (Instant, i64),
    /// Most rows in the client table.
    pub max_clients: usize,
    /// Most messages in one mailbox.
    pub mailbox_messages: usize,
    /// Most bytes (text + sender name) in one mailbox.
    pub mailbox_bytes: usize,
    /// Most bytes stored over all mailboxes.
    pub store_bytes: usize,
    /// An online client not heard from for this long (three missed 10 s
    /// heartbeats) is marked offline.
    pub presence_timeout: Duration,
    /// Most handshakes under way (and most sessions no registration has
    /// claimed yet); past it the oldest is forgotten.
    pub max_handshakes: usize,
    /// A stored message not delivered this long after it was stored is
    /// deleted (`None`: kept until delivered).
    pub mail_ttl: Option<Duration>,
    /// A name not online for this long, with nothing in its mailbox and no
    /// stored mail from it, is forgotten (checked at start and hourly;
    /// `None`: names are kept for good).
    pub name_ttl: Option<Duration>,
    /// New names one source (an IPv4 address, an IPv6 /64) may register
    /// at once, and how often it earns one more.
    pub new_names: (u32, Duration),
    /// Requests (syncs, heartbeats, saves, channel messages) one source
    /// may send at once, and how often it earns one more.
    pub requests: (u32, Duration),
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("key", &self.key)
            .field("max_clients", &self.max_clients)
            .field("mailbox_messages", &self.mailbox_messages)
            .field("mailbox_bytes", &self.mailbox_bytes)
            .field("store_bytes", &self.store_bytes)
            .field("presence_timeout", &self.presence_timeout)
            .field("max_handshakes", &self.max_handshakes)
            .field("mail_ttl", &self.mail_ttl)
            .field("name_ttl", &self.name_ttl)
            .field("new_names", &self.new_names)
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// Defaults: 100,000 clients, 1,000 messages or 1 MiB per mailbox,
    /// 256 MiB in all, 4,096 handshakes under way, mail kept 30 days, names
    /// not seen for a year forgotten, 64
    /// new names per source and one more every 10 s, 2,000 requests per
    /// source and one more every millisecond.
    pub fn new(seed: [u8; 32], key: Keypair, clock: (Instant, i64)) -> Self {
        ServerConfig {
            seed,
            key,
            clock,
            max_clients: 100_000,
            mailbox_messages: 1000,
            mailbox_bytes: 1 << 20,
            store_bytes: 256 << 20,
            presence_timeout: Duration::from_secs(30),
            max_handshakes: 4096,
            mail_ttl: Some(MAIL_TTL),
            name_ttl: Some(NAME_TTL),
            new_names: (64, Duration::from_secs(10)),
            requests: (2000, Duration::from_millis(1)),
        }
    }
}

/// How long undelivered mail is kept by default.
pub const MAIL_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long a name not seen online is kept by default.
pub const NAME_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How often an online client's "last seen" is written again: a name
/// online for longer than its time-to-live must not look unseen to the
/// next start.
const SEEN_REFRESH: i64 = 24 * 3600;

/// How often, at most, names are checked against their time-to-live while
/// the server runs.
const NAME_SWEEP: Duration = Duration::from_secs(3600);

/// Something worth a line in the server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client registered (or logged back in) from an address.
    Registered(Name, SocketAddr),
    /// A client went offline: `true` when it said so (dereg), `false` when a
    /// probe found it silent.
    Offline(Name, bool),
    /// A channel message was stored once for this many recipients.
    StoredChannel {
        /// The sender.
        from: Name,
        /// Recipients it is pending for.
        recipients: usize,
    },
    /// A message was stored for a recipient.
    Stored {
        /// The recipient.
        to: Name,
        /// The sender.
        from: Name,
        /// A channel message.
        channel: bool,
    },
    /// A direct message its sender could not get through was stored, to be
    /// relayed to its online recipient (and deleted on its ack).
    Relaying {
        /// The recipient.
        to: Name,
        /// The sender.
        from: Name,
    },
    /// A registration was refused: the name is held by a live client, or
    /// belongs to another key.
    Rejected(Name, SocketAddr, Rejection),
    /// A client's address changed (validated), e.g. a NAT rebinding.
    Moved(Name, SocketAddr),
    /// A stored or relayed direct message was acked by its recipient and
    /// deleted (channel copies are counted in [`ServerStats`] instead: a
    /// fan-out would be a line per recipient).
    Delivered {
        /// The recipient.
        to: Name,
        /// The sender.
        from: Name,
        /// It was relayed live (its sender could not reach the recipient).
        relayed: bool,
    },
    /// A client taken for gone proved a new address on its session: it had
    /// only moved, and is online again there.
    Back(Name, SocketAddr),
    /// A stored message could not be decrypted (a damaged store, or a
    /// server key that changed) and was dropped.
    Undecryptable(Name, MailId),
    /// A stored message claims a sender whose key did not seal it (a store
    /// edited by hand, or a name released since): dropped.
    Unverifiable {
        /// The recipient.
        to: Name,
        /// The sender it claims.
        from: Name,
        /// The message.
        mail: MailId,
    },
    /// A recipient's mailbox was full, so it did not get a channel message.
    MailboxFull {
        /// The recipient.
        to: Name,
        /// The channel message's sender.
        from: Name,
    },
    /// A name not seen online for the name time-to-live was forgotten: the
    /// next key to register it owns it.
    Forgotten {
        /// The name.
        name: Name,
        /// Whole days since it was last online.
        days: i64,
    },
    /// A stored message reached the mail time-to-live undelivered and was
    /// deleted.
    Expired {
        /// The recipient.
        to: Name,
        /// The sender.
        from: Name,
        /// The message.
        mail: MailId,
    },
    /// The store refused a commit, so a message was refused to its sender.
    NotSaved {
        /// The sender.
        from: Name,
        /// A channel message.
        channel: bool,
        /// Why.
        failure: StoreFailure,
    },
}

/// Why a commit failed, as far as the senders it refuses care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// The disk is full.
    Full,
    /// Another process holds the database's write lock.
    Busy,
}

impl StoreFailure {
    /// The failure an I/O error from a [`Store`](crate::store::Store) is,
    /// if it is one the server can serve through (anything else — a
    /// damaged database, a failing disk — is the operator's to see).
    pub fn of(e: &std::io::Error) -> Option<StoreFailure> {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::ResourceBusy => Some(StoreFailure::Busy),
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                Some(StoreFailure::Full)
            }
            _ => None,
        }
    }

    fn refusal(self) -> Refusal {
        match self {
            StoreFailure::Full => Refusal::StoreFull,
            StoreFailure::Busy => Refusal::StoreBusy,
        }
    }
}

/// Counters of dropped input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Datagrams that did not parse, decrypt or decode.
    pub malformed: u64,
    /// Requests ignored: not from a registered session, or a bound reached.
    pub ignored: u64,
    /// Requests over their source's rate (refused, or dropped as lost).
    pub limited: u64,
    /// Stored messages acked by their recipients (channel copies included).
    pub delivered: u64,
    /// The session layer's counters.
    pub links: LinkStats,
}

/// The state a log summary tells: how many clients are online and
/// registered, how many messages wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Clients online.
    pub online: usize,
    /// Names in the registry.
    pub registered: usize,
    /// Stored messages waiting (a channel message counts once per
    /// recipient still owed it).
    pub stored: usize,
}

/// Most queued datagrams the transmit queue keeps room for once empty (a
/// storm's burst is not kept for good).
const TRANSMITS_KEEP: usize = 256;
/// Most replies remembered per session, to answer retransmitted requests.
const REPLY_CACHE: usize = 16;
/// Most requests waiting on one probe.
const PROBE_WAITERS: usize = 64;
/// Most deliveries in flight to one client.
const DELIVERY_WINDOW: usize = 16;
/// Liveness rounds (probe answered, deliveries still unacked) before the
/// server gives up on a client that answers probes but never acks mail.
const DELIVERY_ROUNDS: u8 = 3;
/// Most events queued for the log; older ones are dropped first.
const EVENT_QUEUE: usize = 1024;
/// How often expired mail an online recipient still holds is looked at
/// again.
const EXPIRY_RECHECK: Duration = Duration::from_secs(60);
/// How many hosts' ration of new names an IPv6 /48 gets.
const SITE_HOSTS: u32 = 16;
/// Sources whose new-name budget is remembered (about 100 bytes each).
const NAME_SOURCES: usize = 65_536;
/// How soon changes a failed commit left over are tried again (sooner if
/// new changes come: they go in the same transaction, first).
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Table changes are gathered this long before they go out as deltas: a
/// join storm's changes then fill whole delta datagrams instead of sending
/// every online client one nearly empty datagram per loop turn.
/// SPEC allows coalescing bursts into one update per tick; a person does
/// not notice 50 ms.
pub const DELTA_INTERVAL: Duration = Duration::from_millis(50);
/// Datagrams that waited longer than this in the socket mean the server is
/// behind: new handshakes are told "busy" (their answer would come close
/// to the client's 500 ms retry, which would only add to the queue, and the
/// key exchange is the costliest thing the server does).
pub const BUSY_AFTER: Duration = Duration::from_millis(400);
/// The wait a "busy" answer asks for: the queueing delay, within these
/// bounds (the client adds jitter and backs off on repeats).
const BUSY_WAIT: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));
/// How long a relayed message waits for its recipient's ack before its
/// sender is told "saved" instead: two delivery tries, well inside the
/// sender's 2.5 s of request tries.
const RELAY_WAIT: Duration = Duration::from_millis(1000);
/// Relayed messages awaiting their recipients' acks, at most; past it a
/// relay is answered as a save is (stored, "saved").
const MAX_RELAYS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Resend the probe or declare the client silent.
    Probe(ClientId),
    /// Resend a delivery or check the client's liveness.
    Delivery(ClientId, MailId),
    /// Has the client been heard from lately?
    Presence(ClientId),
    /// Try again what a failed commit left over.
    StoreRetry,
    /// Delete the mail that reached its time-to-live.
    Expiry,
    /// Send the table changes gathered since the last deltas.
    Deltas,
    /// Forget the names not online for the name time-to-live.
    Names,
    /// A relayed message's recipient has had its time to ack.
    Relay(ClientId, MailId),
}

/// A reply that rests on the batch under way.
#[derive(Debug, Clone, Copy)]
enum Promise {
    /// "Saved" (an ack of a save-message or a channel message).
    Saved { channel: bool },
    /// A welcome that counted mail of this batch (the newest ids, so the
    /// last positions): a failed commit lowers the count.
    Welcome {
        version: u64,
        mail: u32,
        reset: [u8; crate::packet::TOKEN_LEN],
        /// The last message counted.
        last: MailId,
    },
    /// A relay whose answer ("received" or "saved") comes later: a failed
    /// commit refuses it instead, since nothing of it was kept.
    Relay { to: ClientId, mail: MailId },
}

/// What the batch since the last commit promised, so that a failed commit
/// can take it back. Indexes into `transmits` are stable meanwhile: nothing
/// leaves while a store operation is uncommitted.
#[derive(Debug, Default)]
struct Batch {
    /// Messages put: (recipient, mail).
    mail: Vec<(ClientId, MailId)>,
    /// The first of them: ids only grow, so a message is the batch's if
    /// its id is at least this.
    first_mail: Option<MailId>,
    /// Their (recipient, sender, id), to spot a retry of one of them.
    keys: HashSet<(ClientId, Name, MsgId)>,
    /// The channel messages put, (sender, id): one entry for all copies.
    channels: HashSet<(Name, MsgId)>,
    /// Replies that hold only if this batch is committed: (client, seq,
    /// what they promised).
    acks: Vec<(ClientId, Seq, Promise)>,
    /// Those replies in `transmits` (first sends and cached resends), with
    /// the session they were sealed for.
    ack_transmits: Vec<(usize, ClientId, Seq, LinkId)>,
    /// Deliveries of the batch's messages in `transmits`.
    deliveries: Vec<(usize, MailId)>,
    /// The batch's other operations, polled already: they promised nobody
    /// "saved", so a failed commit defers them rather than undoing them.
    others: Vec<StoreOp>,
    /// Log lines saying "stored": given once it is true.
    stored: Vec<ServerEvent>,
}

#[derive(Debug, Clone)]
enum Cached {
    /// Being worked on (probe or commit pending): retries are ignored.
    Pending,
    /// The encoded reply, sealed afresh each time it is sent (replies are
    /// small; the bytes, not a `Message` with its inline 1000-byte text
    /// buffer, are what is kept).
    Done(What, Vec<u8>),
}

#[derive(Debug)]
enum Waiter {
    /// A save-message for the probed client.
    Save {
        from: ClientId,
        seq: Seq,
        mail: Box<NewMail>,
    },
    /// A registration that would take the probed client's name (by a
    /// session of the key that owns it).
    Register { link: LinkId, seq: Seq },
}

#[derive(Debug, Clone)]
struct NewMail {
    from: Name,
    id: MsgId,
    body: Body,
}

#[derive(Debug)]
struct Probe {
    nonce: u64,
    sent: u8,
    timer: TimerKey,
    waiters: Vec<Waiter>,
    /// Deliveries to the probed client went unacked. A flag, not a waiter,
    /// so a full waiter list can never strand them.
    deliveries: bool,
}

/// A relayed message's sender, waiting for the recipient's ack.
#[derive(Debug)]
struct Relaying {
    from: ClientId,
    seq: Seq,
    timer: TimerKey,
}

#[derive(Debug)]
struct Inflight {
    pos: Option<u32>,
    sent: u8,
    timer: TimerKey,
}

#[derive(Debug, Default)]
struct Session {
    /// The client's current Noise session.
    link: Option<LinkId>,
    replies: VecDeque<(Seq, Cached)>,
    /// Boxed: rare, and every session would pay its size.
    probe: Option<Box<Probe>>,
    queue: VecDeque<(MailId, Option<u32>)>,
    inflight: BTreeMap<MailId, Inflight>,
    rounds: u8,
    /// The welcome that opened the current mail batch.
    batch: Seq,
    /// When an authenticated datagram last came from the client.
    last_heard: Option<Instant>,
    presence: Option<TimerKey>,
    /// Welcomed, and no sync pass of it has reached the table's end since:
    /// it ignores deltas (its pass brings every row), so it is sent none.
    /// In a join storm most online clients are such joiners; deltas to
    /// them would cost as much as all their pages.
    syncing: bool,
    /// Taken for gone by a probe or the presence timeout, not deregistered:
    /// the client may only have moved (a NAT rebinding the probe's old
    /// address did not reach). Its link is kept for a presence timeout, and
    /// if it proves a new address on it, it is online again on the same
    /// session ([`Server::revive`]).
    gone: bool,
    /// Its mail goes one message at a time: what was stored while it was
    /// taken for gone is delivered live after [`Server::revive`], without
    /// a batch's positions, so only one in flight keeps it in store order.
    serial: bool,
}

impl Session {
    /// A row's session while nothing is under way.
    const IDLE: Session = Session {
        link: None,
        replies: VecDeque::new(),
        probe: None,
        queue: VecDeque::new(),
        inflight: BTreeMap::new(),
        rounds: 0,
        batch: Seq(0),
        last_heard: None,
        presence: None,
        syncing: false,
        gone: false,
        serial: false,
    };

    /// Nothing under way and nothing to answer on: no link, probe,
    /// delivery or presence timer.
    fn is_idle(&self) -> bool {
        self.link.is_none()
            && self.probe.is_none()
            && self.queue.is_empty()
            && self.inflight.is_empty()
            && self.presence.is_none()
    }
}

static IDLE_SESSION: Session = Session::IDLE;

/// One session per table row, boxed only while the row has one: an idle
/// offline client costs a pointer and its "last seen" here, not a
/// `Session` (the registry may hold far more names than are online).
#[derive(Debug, Default)]
struct Sessions {
    live: Vec<Option<Box<Session>>>,
    /// Per row: the "last seen" time last written to the store, Unix
    /// seconds.
    seen: Vec<i64>,
}

impl Sessions {
    /// Row `i` starts afresh (a new row, or a vacant one given to a new
    /// name), seen at `seen`.
    fn reset(&mut self, i: usize, seen: i64) {
        if i >= self.live.len() {
            self.live.resize_with(i + 1, || None);
            self.seen.resize(i + 1, seen);
        }
        self.live[i] = None;
        self.seen[i] = seen;
    }

    /// Row `i`'s session, if it has one.
    fn get_mut(&mut self, i: usize) -> Option<&mut Session> {
        self.live[i].as_deref_mut()
    }

    /// Frees row `i`'s session if it is idle.
    fn release(&mut self, i: usize) {
        if self.live[i].as_ref().is_some_and(|s| s.is_idle()) {
            self.live[i] = None;
        }
    }
}

impl std::ops::Index<usize> for Sessions {
    type Output = Session;

    fn index(&self, i: usize) -> &Session {
        self.live[i].as_deref().unwrap_or(&IDLE_SESSION)
    }
}

impl std::ops::IndexMut<usize> for Sessions {
    /// Boxes a session for the row if it has none.
    fn index_mut(&mut self, i: usize) -> &mut Session {
        self.live[i].get_or_insert_with(Box::default)
    }
}

/// A stored message as the server holds it: what delivery, duplicate
/// checks and the limits need. Its body is in memory only until it is
/// committed and while it is being delivered; otherwise it is on disk,
/// fetched ([`Server::poll_fetch`]) when a delivery needs it, so the
/// server's memory does not grow with the bytes it stores.
#[derive(Debug)]
struct Held {
    from: Name,
    channel: bool,
    /// Stored once for all its recipients ([`Body::Channel`]).
    shared: bool,
    stored_at: i64,
    id: MsgId,
    /// The body's bytes, in memory or not.
    len: u32,
    body: Option<Box<Body>>,
    /// A fetch of the body is under way.
    fetching: bool,
    /// Relayed live: delivered as a direct message while its recipient is
    /// online ([`Message::Relayed`]).
    relayed: bool,
}

impl Held {
    /// `m`, with its body in memory.
    fn new(m: &StoredMail) -> Held {
        Held {
            from: m.from.clone(),
            channel: m.channel,
            shared: matches!(m.body, Body::Channel(_)),
            stored_at: m.stored_at,
            id: m.id,
            len: u32::try_from(m.body.len()).unwrap_or(u32::MAX),
            body: Some(Box::new(m.body.clone())),
            fetching: false,
            relayed: false,
        }
    }

    /// Bytes counted against mailbox limits ([`StoredMail::size`]).
    fn size(&self) -> usize {
        self.len as usize + MAIL_OVERHEAD
    }
}

#[derive(Debug, Default)]
struct Mailbox {
    /// Boxed: a B-tree node holds eleven values, so an unboxed one costs
    /// ~1 KB for a mailbox's first message, and a channel fan-out makes
    /// a thousand of them at once.
    mail: BTreeMap<MailId, Box<Held>>,
    /// How many messages hash to each (sender, message id)
    /// ([`Server::dedup_key`]): 21 bytes a message where the pairs
    /// themselves took 63. A hit is confirmed against the messages.
    keys: HashMap<u64, u32>,
    bytes: usize,
}

/// Message `mail` in `to`'s mailbox.
fn held(boxes: &HashMap<ClientId, Mailbox>, to: ClientId, mail: MailId) -> Option<&Held> {
    boxes.get(&to)?.mail.get(&mail).map(|m| &**m)
}

/// [`held`], to change.
fn held_mut(
    boxes: &mut HashMap<ClientId, Mailbox>,
    to: ClientId,
    mail: MailId,
) -> Option<&mut Held> {
    boxes.get_mut(&to)?.mail.get_mut(&mail).map(|m| &mut **m)
}

/// A message waiting in a mailbox, as [`Server::mailbox`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// Store-order id.
    pub mail: MailId,
    /// The sender.
    pub from: Name,
    /// A channel message.
    pub channel: bool,
    /// Stored once for all its recipients: the store's bytes count its
    /// body once.
    pub shared: bool,
    /// When the server stored it, Unix seconds.
    pub stored_at: i64,
    /// The sender's message id.
    pub id: MsgId,
    /// Its body's bytes.
    pub len: usize,
    /// Its body is in the server's memory (uncommitted, or being
    /// delivered), not only on disk.
    pub in_memory: bool,
}

impl Waiting {
    /// Bytes counted against mailbox limits.
    pub fn size(&self) -> usize {
        self.len + MAIL_OVERHEAD
    }
}

/// Distinct names in a loaded store (registry rows, and mail recipients a
/// hand-edited store may lack rows for).
fn known_names(loaded: &Loaded) -> usize {
    let names: HashSet<&Name> = loaded
        .clients
        .iter()
        .map(|c| &c.name)
        .chain(loaded.mail.iter().map(|m| &m.to))
        .collect();
    names.len()
}

/// The registry server. See the [crate docs](crate) for the driving loop.
pub struct Server {
    config: ServerConfig,
    rng: ChaCha12Rng,
    table: Directory,
    links: Links,
    /// `sessions[i]` belongs to table row `i`: rows are never dropped and a
    /// session is pushed with every row, so a `ClientId` indexes both (a
    /// row vacated by `forget_unseen` gets a fresh session with its next
    /// name).
    sessions: Sessions,
    probes: HashMap<u64, ClientId>,
    /// Relayed messages not yet acked, by (recipient, mail).
    relays: HashMap<(ClientId, MailId), Relaying>,
    /// New names per source: per host, and per IPv6 site.
    new_names: limits::Buckets,
    new_names_site: limits::Buckets,
    /// Requests per source.
    requests: limits::Buckets,
    mailboxes: HashMap<ClientId, Mailbox>,
    /// Every stored message by when it was stored, oldest first: what
    /// expires next.
    by_age: BTreeSet<(i64, MailId, ClientId)>,
    expiry: Option<(Instant, TimerKey)>,
    stored_bytes: usize,
    /// Copies in memory of each channel message stored once: its body
    /// counts against the store's bytes once, until the last copy goes.
    shared: HashMap<MailId, u32>,
    /// The channel message decrypted last: a fan-out opens it once, not
    /// once per recipient.
    opened: Option<(MailId, Content)>,
    next_mail: u64,
    timers: TimerWheel<Timer>,
    transmits: VecDeque<Transmit>,
    /// Recipients of a channel message whose copy is queued but not yet
    /// sealed: [`Server::poll_transmit`] seals each when the datagrams
    /// before it are out, so the sender's ack leaves before the fan-out's
    /// work, not after it.
    fanout: VecDeque<ClientId>,
    /// Bodies a delivery is waiting for: [`Server::poll_fetch`].
    fetches: VecDeque<(ClientId, MailId)>,
    /// Keys the mailboxes' duplicate checks.
    dedup: std::hash::RandomState,
    /// The time of the latest call that gave one: when a lazily sealed
    /// copy's retransmission is due from.
    now: Instant,
    store_ops: VecDeque<StoreOp>,
    uncommitted: usize,
    batch: Batch,
    /// Operations a failed commit left over, committed before any new one.
    deferred: Vec<StoreOp>,
    /// Where in `deferred` each client's row waits.
    deferred_rows: HashMap<Name, usize>,
    retry: Option<TimerKey>,
    /// A [`Timer::Deltas`] is armed.
    deltas_armed: bool,
    events: VecDeque<ServerEvent>,
    stats: ServerStats,
}

impl Server {
    /// A server with the registry and mailboxes a [`Store`](crate::store::Store)
    /// loaded: every known client starts offline (at its last known address)
    /// until it is heard from again. Mail a version-1 server stored in clear
    /// is encrypted at rest by the first commit ([`StoreOp::Rewrite`]).
    pub fn new(config: ServerConfig, now: Instant, loaded: Loaded) -> Server {
        let mut rng = ChaCha12Rng::from_seed(config.seed);
        let mut cookie_secret = [0; 32];
        rng.fill_bytes(&mut cookie_secret);
        let links = Links::new(
            config.key.clone(),
            cookie_secret,
            now,
            config.max_handshakes,
        );
        let mut server = Server {
            rng,
            // Every name loaded keeps its row, also past a lowered limit:
            // only new names are refused.
            table: Directory::new(config.max_clients.max(known_names(&loaded))),
            links,
            sessions: Sessions::default(),
            probes: HashMap::new(),
            relays: HashMap::new(),
            new_names: limits::Buckets::new(
                limits::Prefix::Host,
                config.new_names.0,
                config.new_names.1,
                NAME_SOURCES,
            ),
            // A site (/48) gets what 16 hosts would, no more.
            requests: limits::Buckets::new(
                limits::Prefix::Host,
                config.requests.0,
                config.requests.1,
                NAME_SOURCES,
            ),
            new_names_site: limits::Buckets::new(
                limits::Prefix::Site,
                config.new_names.0.saturating_mul(SITE_HOSTS),
                config.new_names.1 / SITE_HOSTS,
                NAME_SOURCES,
            ),
            mailboxes: HashMap::new(),
            by_age: BTreeSet::new(),
            expiry: None,
            stored_bytes: 0,
            shared: HashMap::new(),
            opened: None,
            next_mail: 1,
            timers: TimerWheel::new(now, TICK),
            transmits: VecDeque::new(),
            fanout: VecDeque::new(),
            fetches: VecDeque::new(),
            dedup: std::hash::RandomState::new(),
            now,
            store_ops: VecDeque::new(),
            uncommitted: 0,
            batch: Batch::default(),
            deferred: Vec::new(),
            deferred_rows: HashMap::new(),
            retry: None,
            deltas_armed: false,
            events: VecDeque::new(),
            stats: ServerStats::default(),
            config,
        };
        // A row without a "last seen" (older than schema 3) counts from now.
        let unix = server.unix_time(now);
        for c in &loaded.clients {
            if let Some(id) = server.row(&c.name, c.addr, c.key.unwrap_or(PublicKey::NONE)) {
                server.sessions.seen[id.index() as usize] = c.seen_at.unwrap_or(unix);
            }
        }
        // Mail for a name the registry lacks (a store edited by hand) still
        // gets a row, so it is not lost.
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        for mut m in loaded.mail {
            // Before anything can skip it: an id in the store is never
            // given out again (a new message under it would be lost to the
            // store's conflict rule).
            server.next_mail = server.next_mail.max(m.mail.0.saturating_add(1));
            let Some(to) = server.row(&m.to, unknown, PublicKey::NONE) else {
                continue;
            };
            if let Body::Clear(text) = &m.body {
                let body = server.legacy_at_rest(&m, text);
                server.store_ops.push_back(StoreOp::Rewrite {
                    mail: m.mail,
                    body: body.clone(),
                });
                m.body = body;
            }
            // Sealed mail is delivered with the key it was stored with: it
            // must be the key the sender's name is bound to, or a forgery
            // written into the store would be vouched for.
            if let Body::Sealed { key, .. } = &m.body {
                let bound = server
                    .table
                    .lookup(&m.from)
                    .map(|id| server.table.get(id).key);
                if bound != Some(*key) {
                    server.event(ServerEvent::Unverifiable {
                        to: m.to.clone(),
                        from: m.from.clone(),
                        mail: m.mail,
                    });
                    server.store_ops.push_back(StoreOp::Delete {
                        to: m.to.clone(),
                        mail: m.mail,
                    });
                    continue;
                }
            }
            if server
                .content(&m.to, m.mail, &Held::new(&m), &m.body)
                .is_none()
            {
                // Encrypted under a server key that is gone, or damaged:
                // nobody can ever read it. Said once, then dropped.
                server.event(ServerEvent::Undecryptable(m.to.clone(), m.mail));
                server.store_ops.push_back(StoreOp::Delete {
                    to: m.to.clone(),
                    mail: m.mail,
                });
                continue;
            }
            let mut held = Held::new(&m);
            // Checked; it stays on disk until a delivery needs it (a body
            // rewritten now may still be fetched clear: `handle_fetched`).
            held.body = None;
            server.charge(m.mail, held.shared, server.cost(m.mail, &held));
            server.by_age.insert((m.stored_at, m.mail, to));
            let key = server.dedup_key(&m.from, m.id);
            let mb = server.mailboxes.entry(to).or_default();
            mb.bytes += held.size();
            *mb.keys.entry(key).or_default() += 1;
            mb.mail.insert(m.mail, Box::new(held));
        }
        // Loading is not a change anyone needs to hear about.
        let _ = server.table.take_deltas();
        // What expired while the server was down goes now.
        server.expire(now);
        if server.config.name_ttl.is_some() {
            server.forget_unseen(now);
            let due = now + server.name_sweep();
            server.timers.insert(due, Timer::Names);
        }
        server
    }

    /// Feeds one datagram received from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.now = self.now.max(now);
        self.datagram(now, from, data);
        self.schedule_deltas(now);
    }

    fn datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let incoming = self
            .links
            .handle(now, from, data, &mut self.rng, &mut self.transmits);
        let (link, msg) = match incoming {
            None => return,
            Some(Incoming::Moved(link, addr)) => {
                self.on_moved(now, link, addr);
                return;
            }
            // A session taken for gone takes nothing from an unproven
            // address (the challenge is on its way there): a refusal would
            // make a client that only moved register again.
            Some(Incoming::Message(link, _))
                if self.links.addr(link) != Some(from) && self.is_gone(link) =>
            {
                self.stats.ignored += 1;
                return;
            }
            Some(Incoming::Message(link, msg)) => (link, msg),
        };
        let what = msg.what();
        match msg {
            Message::Register { seq, name } => self.on_register(now, link, seq, name),
            Message::Deregister { seq } => {
                if let Some(id) = self.request(now, link, seq) {
                    if self.table.get(id).online {
                        self.set_offline(id, true);
                    }
                    // Taken for gone before, it has now said it left: a
                    // retry from a new address must not bring it back.
                    self.sessions[id.index() as usize].gone = false;
                    self.reply(id, seq, Message::Ack { seq });
                }
            }
            // A relay is a request like a save: the same rate limit.
            Message::SaveMessage {
                seq,
                to,
                id,
                sealed,
            }
            | Message::RelayMessage {
                seq,
                to,
                id,
                sealed,
            } => {
                let relay = what == What::RelayMessage;
                if let Some(sender) = self.online_request(now, link, seq)
                    && self.within_rate(now, link, sender, seq, true)
                {
                    let mail = self.sealed_mail(sender, id, &sealed);
                    if relay {
                        self.on_relay(now, sender, seq, to, mail);
                    } else {
                        self.on_save(now, sender, seq, to, mail);
                    }
                }
            }
            Message::ChannelSend { seq, id, text } => {
                if let Some(sender) = self.online_request(now, link, seq)
                    && self.within_rate(now, link, sender, seq, true)
                {
                    self.on_channel(now, sender, seq, id, text);
                }
            }
            Message::Sync {
                seq,
                since,
                from: row,
            } => {
                if let Some(id) = self.online_request(now, link, seq)
                    && self.within_rate(now, link, id, seq, false)
                {
                    self.forget(id, seq);
                    // A window of pages, each from where the last stopped,
                    // all stamped with the version they were taken at.
                    let version = self.table.version();
                    let mut from = row;
                    self.sessions[id.index() as usize].syncing = true;
                    for _ in 0..wire::SYNC_WINDOW {
                        let (entries, next) = self.table.page(since, from);
                        let page = Message::Page {
                            seq,
                            version,
                            from,
                            entries,
                            next,
                        };
                        self.links.send(link, &page, &mut self.transmits);
                        match next {
                            Some(n) => from = n,
                            None => {
                                // The pass is complete: later changes reach
                                // it as deltas (a pass it starts again
                                // marks it syncing again).
                                self.sessions[id.index() as usize].syncing = false;
                                break;
                            }
                        }
                    }
                }
            }
            Message::Heartbeat { seq, .. } => {
                if let Some(id) = self.online_request(now, link, seq)
                    && self.within_rate(now, link, id, seq, false)
                {
                    self.forget(id, seq);
                    let version = self.table.version();
                    let alive = Message::Alive { seq, version };
                    self.links.send(link, &alive, &mut self.transmits);
                }
            }
            Message::Delivered { mail } => {
                if let Some(id) = self.authenticate(now, link) {
                    self.on_delivered(now, id, mail);
                }
            }
            Message::ProbeReply { nonce } => self.on_probe_reply(now, link, nonce),
            // A path response that moved nothing (a late copy): harmless.
            Message::PathResponse { .. } => {}
            // Server-bound traffic only; anything else is a confused or
            // hostile peer.
            _ => self.stats.ignored += 1,
        }
    }

    /// How long the datagrams about to be handed in waited in the socket,
    /// as the driver estimates it (see the driver's loop). Above
    /// [`BUSY_AFTER`], message 1 of every new handshake is answered "busy"
    /// until a smaller delay is reported.
    pub fn set_queue_delay(&mut self, waited: Duration) {
        let busy = (waited > BUSY_AFTER).then(|| waited.clamp(BUSY_WAIT.0, BUSY_WAIT.1));
        self.links.set_busy(busy);
    }

    /// Handles every timer due at `now`. Spurious calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        while let Some(timer) = self.timers.poll_expired(now) {
            match timer {
                Timer::Probe(id) => self.on_probe_timer(now, id),
                Timer::Delivery(id, mail) => self.on_delivery_timer(now, id, mail),
                Timer::Presence(id) => self.on_presence_timer(now, id),
                Timer::StoreRetry => {
                    self.retry = None;
                    self.undefer();
                }
                Timer::Expiry => {
                    self.expiry = None;
                    self.expire(now);
                }
                Timer::Names => {
                    self.forget_unseen(now);
                    self.timers.insert(now + self.name_sweep(), Timer::Names);
                }
                Timer::Deltas => {
                    self.deltas_armed = false;
                    self.flush_deltas();
                }
                Timer::Relay(to, mail) => self.on_relay_timer(to, mail),
            }
        }
        self.schedule_deltas(now);
    }

    /// Arms the deltas' timer if the table changed and none is armed.
    fn schedule_deltas(&mut self, now: Instant) {
        if !self.deltas_armed && self.table.has_changes() {
            self.deltas_armed = true;
            self.timers.insert(now + DELTA_INTERVAL, Timer::Deltas);
        }
    }

    /// The driver committed every [`StoreOp`] polled so far: release the
    /// datagrams held behind them.
    pub fn handle_committed(&mut self) {
        // The batch is everything polled: a driver polls all, then commits.
        debug_assert!(self.store_ops.is_empty() || self.batch.mail.is_empty());
        self.uncommitted = 0;
        let batch = std::mem::take(&mut self.batch);
        for event in batch.stored {
            self.event(event);
        }
        // On disk now: a body no delivery is waiting for leaves memory.
        for &(to, mail) in &batch.mail {
            if !self.table.get(to).online
                && let Some(m) = held_mut(&mut self.mailboxes, to, mail)
            {
                m.body = None;
            }
        }
    }

    /// The driver's commit of the operations polled since the last
    /// [`Server::handle_committed`] failed: none of them reached the store.
    /// Its messages are taken back and every request they answered is
    /// refused (the "saved" acks held back are replaced); everything else
    /// of it is committed again before any newer operation, on its own
    /// after a second if nothing newer comes.
    pub fn handle_commit_failed(&mut self, now: Instant, failure: StoreFailure) {
        self.uncommitted = 0;
        let batch = std::mem::take(&mut self.batch);
        // Not polled yet, so not tried, but made with the batch's promises.
        let unpolled: Vec<StoreOp> = self.store_ops.drain(..).collect();
        for op in batch.others.into_iter().chain(unpolled) {
            self.defer(op);
        }
        if !self.deferred.is_empty() && self.retry.is_none() {
            self.retry = Some(self.timers.insert(now + STORE_RETRY, Timer::StoreRetry));
        }
        self.schedule_deltas(now);
        for &(to, mail) in &batch.mail {
            self.unput(to, mail);
        }
        // Window slots the taken-back deliveries held are free again.
        let mut online: Vec<ClientId> = batch.mail.iter().map(|&(to, _)| to).collect();
        online.sort_unstable();
        online.dedup();
        for to in online {
            if self.table.get(to).online {
                self.pump(now, to);
            }
        }
        let mut gone: HashSet<usize> = batch.deliveries.iter().map(|&(i, _)| i).collect();
        let reason = failure.refusal();
        let mut refusals: HashMap<(ClientId, Seq), (What, Vec<u8>)> = HashMap::new();
        let mut relay_refusals = Vec::new();
        for &(client, seq, promise) in &batch.acks {
            let msg = match promise {
                Promise::Saved { channel } => {
                    let from = self.table.get(client).name.clone();
                    self.event(ServerEvent::NotSaved {
                        from,
                        channel,
                        failure,
                    });
                    Message::Refused { seq, reason }
                }
                Promise::Relay { to, mail } => {
                    // Its answer was never sent: it is sent now, refused.
                    if let Some(r) = self.relays.remove(&(to, mail)) {
                        self.timers.cancel(r.timer);
                        let from = self.table.get(client).name.clone();
                        self.event(ServerEvent::NotSaved {
                            from,
                            channel: false,
                            failure,
                        });
                        relay_refusals.push((client, seq));
                    }
                    continue;
                }
                Promise::Welcome {
                    version,
                    mail,
                    reset,
                    last,
                } => {
                    let taken = batch
                        .mail
                        .iter()
                        .filter(|&&(to, m)| to == client && m <= last)
                        .count();
                    if taken == 0 {
                        continue;
                    }
                    Message::Welcome {
                        seq,
                        version,
                        mail: mail.saturating_sub(taken as u32),
                        reset,
                    }
                }
            };
            let encoded = (msg.what(), wire::encode_to_vec(&msg));
            // A retry of the request gets the same answer.
            self.cache(client, seq, encoded.clone());
            refusals.insert((client, seq), encoded);
        }
        for &(i, sender, seq, link) in &batch.ack_transmits {
            // A reply the failure does not change stays as it is.
            let Some((what, plain)) = refusals.get(&(sender, seq)) else {
                continue;
            };
            // Sealed for the session the reply was for, or not at all (a
            // client that logged in again meanwhile finds the new answer
            // in the reply cache).
            if self.sessions[sender.index() as usize].link != Some(link) {
                gone.insert(i);
                continue;
            }
            let mut sealed = VecDeque::new();
            self.links.send_encoded(link, plain, *what, &mut sealed);
            match sealed.pop_front() {
                Some(t) if i < self.transmits.len() => self.transmits[i] = t,
                _ => {
                    gone.insert(i);
                }
            }
        }
        if !gone.is_empty() {
            let mut i = 0;
            self.transmits.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
            });
        }
        for (client, seq) in relay_refusals {
            self.reply(client, seq, Message::Refused { seq, reason });
        }
    }

    /// Keeps `op` for the next commit; a client's newest row replaces an
    /// older one still waiting, so waiting rows never outnumber clients.
    fn defer(&mut self, op: StoreOp) {
        match &op {
            // Taken back (see `unput`): it answered a request refused now.
            StoreOp::Put(_) | StoreOp::Channel(_) => return,
            StoreOp::Client(c) => {
                if let Some(&i) = self.deferred_rows.get(&c.name) {
                    // In the older one's place: still before any message
                    // that needs the row.
                    self.deferred[i] = op;
                    return;
                }
                self.deferred_rows
                    .insert(c.name.clone(), self.deferred.len());
            }
            StoreOp::Delete { .. } | StoreOp::Forget(_) | StoreOp::Rewrite { .. } => {}
        }
        self.deferred.push(op);
    }

    /// Puts what a failed commit left over in front of the queue.
    fn undefer(&mut self) {
        self.deferred_rows.clear();
        for op in self.deferred.drain(..).rev() {
            self.store_ops.push_front(op);
        }
    }

    /// Takes back a message the store never got.
    fn unput(&mut self, to: ClientId, mail: MailId) {
        let session = self.sessions.get_mut(to.index() as usize);
        if let Some(f) = session.and_then(|s| s.inflight.remove(&mail)) {
            self.timers.cancel(f.timer);
        }
        self.take_mail(to, mail);
    }

    /// The next datagram to send, or `None` (also while store operations
    /// are waiting to be committed).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.uncommitted > 0 || !self.store_ops.is_empty() {
            return None;
        }
        while self.transmits.is_empty() {
            let to = self.fanout.pop_front()?;
            self.pump(self.now, to);
        }
        let next = self.transmits.pop_front();
        if self.transmits.is_empty() && self.transmits.capacity() > TRANSMITS_KEEP {
            self.transmits.shrink_to(TRANSMITS_KEEP);
        }
        next
    }

    /// The next storage operation to commit.
    #[must_use]
    pub fn poll_store(&mut self) -> Option<StoreOp> {
        if !self.deferred.is_empty() && !self.store_ops.is_empty() {
            // What a failed commit left over goes first, in its order.
            self.undefer();
        }
        let op = self.store_ops.pop_front()?;
        if !matches!(op, StoreOp::Put(_) | StoreOp::Channel(_)) {
            self.batch.others.push(op.clone());
        }
        self.uncommitted += 1;
        Some(op)
    }

    /// The next log event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// When [`Server::handle_timeout`] next has work, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.poll_timeout()
    }

    /// The next deadline and why it is there (`"probe"`, `"delivery"`…),
    /// for logs and tests: a pass over every timer, so not for every loop
    /// turn ([`Server::poll_timeout`] says when, cheaply, and may be a
    /// little early when timers were cancelled).
    #[must_use]
    pub fn poll_deadline(&self) -> Option<(Instant, &'static str)> {
        let (at, timer) = self.timers.peek()?;
        let why = match timer {
            Timer::Probe(_) => "probe: is the client still there",
            Timer::Delivery(..) => "delivery: the recipient's ack",
            Timer::Presence(_) => "presence: heard from lately",
            Timer::StoreRetry => "store: retry what a failed commit left",
            Timer::Expiry => "mail: the next to reach its time-to-live",
            Timer::Deltas => "table: send the changes gathered",
            Timer::Names => "names: forget those unseen too long",
            Timer::Relay(..) => "relay: the recipient's ack, or saved",
        };
        Some((at, why))
    }

    /// Nothing under way but presence tracking: no probe, no delivery in
    /// flight or queued, nothing to store or send. (Costs a pass over the
    /// clients.)
    pub fn is_idle(&self) -> bool {
        self.probes.is_empty()
            && self.relays.is_empty()
            && self.store_ops.is_empty()
            && self.deferred.is_empty()
            && self.uncommitted == 0
            && self.transmits.is_empty()
            && self.fanout.is_empty()
            && self.fetches.is_empty()
            && !self.deltas_armed
            && self
                .sessions
                .live
                .iter()
                .flatten()
                .all(|s| s.inflight.is_empty() && s.queue.is_empty())
    }

    /// The client table.
    pub fn table(&self) -> &Directory {
        &self.table
    }

    /// The server's public key (clients pin it).
    pub fn public_key(&self) -> PublicKey {
        self.links.public()
    }

    /// Messages waiting for `name`, in store order.
    pub fn mailbox(&self, name: &Name) -> impl Iterator<Item = Waiting> {
        self.table
            .lookup(name)
            .and_then(|id| self.mailboxes.get(&id))
            .into_iter()
            .flat_map(|mb| {
                mb.mail.iter().map(|(&mail, m)| Waiting {
                    mail,
                    from: m.from.clone(),
                    channel: m.channel,
                    shared: m.shared,
                    stored_at: m.stored_at,
                    id: m.id,
                    len: m.len as usize,
                    in_memory: m.body.is_some(),
                })
            })
    }

    /// The next stored body a delivery needs: the driver reads it from
    /// the store ([`crate::store::Store::fetch`]) and hands it to
    /// [`Server::handle_fetched`].
    #[must_use]
    pub fn poll_fetch(&mut self) -> Option<(Name, MailId)> {
        while let Some((to, mail)) = self.fetches.pop_front() {
            let wanted = held(&self.mailboxes, to, mail).is_some_and(|m| m.fetching);
            if wanted {
                return Some((self.table.get(to).name.clone(), mail));
            }
        }
        None
    }

    /// Whether a [`Server::poll_fetch`] is waiting.
    pub fn wants_fetch(&self) -> bool {
        !self.fetches.is_empty()
    }

    /// What the store gave for a [`Server::poll_fetch`]. A body that is
    /// missing, or not the one stored (its length, its kind, its sender's
    /// key, its encryption), is dropped with a log line, as at load; a
    /// read that failed is tried again with the delivery's next resend.
    pub fn handle_fetched(
        &mut self,
        now: Instant,
        to: &Name,
        mail: MailId,
        fetched: std::io::Result<Option<Body>>,
    ) {
        self.now = self.now.max(now);
        let Some(id) = self.table.lookup(to) else {
            return;
        };
        let Some(m) = held_mut(&mut self.mailboxes, id, mail) else {
            return;
        };
        if !std::mem::replace(&mut m.fetching, false) {
            return;
        }
        let body = match fetched {
            Ok(body) => body,
            Err(_) => return,
        };
        let Some(m) = held(&self.mailboxes, id, mail) else {
            return;
        };
        let genuine = body.as_ref().is_some_and(|b| {
            // A version-1 clear body whose rewrite has not committed yet
            // (a failing store) is still the message, shown unverified.
            (b.len() == m.len as usize || matches!(b, Body::Clear(_)))
                && matches!(b, Body::Channel(_)) == m.shared
                && self.vouched(&m.from, b)
                && self.content(to, mail, m, b).is_some()
        });
        if !genuine {
            self.event(ServerEvent::Undecryptable(to.clone(), mail));
            self.cancel_delivery(id, mail);
            self.delete(id, mail);
            self.pump(now, id);
            return;
        }
        if let Some(m) = held_mut(&mut self.mailboxes, id, mail) {
            m.body = body.map(Box::new);
        }
        let inflight = (self.sessions.get_mut(id.index() as usize))
            .and_then(|s| s.inflight.get(&mail))
            .map(|f| f.pos);
        if let Some(pos) = inflight {
            self.transmit_delivery(id, mail, pos);
        }
    }

    /// Whether sealed mail is sealed with the key `from`'s name is bound
    /// to (a forgery written into the store would be vouched for).
    fn vouched(&self, from: &Name, body: &Body) -> bool {
        let Body::Sealed { key, .. } = body else {
            return true;
        };
        let bound = self.table.lookup(from).map(|id| self.table.get(id).key);
        bound == Some(*key)
    }

    /// Stops delivering `mail` to `id` (its retransmission timer goes).
    fn cancel_delivery(&mut self, id: ClientId, mail: MailId) {
        let session = self.sessions.get_mut(id.index() as usize);
        if let Some(f) = session.and_then(|s| s.inflight.remove(&mail)) {
            self.timers.cancel(f.timer);
        }
    }

    /// Total bytes held in mailboxes.
    pub fn stored_bytes(&self) -> usize {
        self.stored_bytes
    }

    /// Handshakes under way and sessions established.
    pub fn sessions(&self) -> (usize, usize) {
        (self.links.handshakes(), self.links.len())
    }

    /// Handshakes and sessions held for `addr`: zero for an address that
    /// never proved it receives (see [`links`]). Costs a pass over them.
    pub fn state_at(&self, addr: SocketAddr) -> usize {
        self.links.state_at(addr)
    }

    /// How many are online, registered, and how many messages wait (it
    /// walks the table: for a periodic log line, not every turn).
    pub fn census(&self) -> Census {
        Census {
            online: self.table.iter().filter(|(_, e)| e.online).count(),
            registered: self.table.len(),
            stored: self.mailboxes.values().map(|mb| mb.mail.len()).sum(),
        }
    }

    /// Dropped-input counters.
    pub fn stats(&self) -> ServerStats {
        let mut stats = self.stats;
        stats.links = self.links.stats();
        stats.malformed += stats.links.malformed;
        stats
    }

    // ---- requests ---------------------------------------------------------

    /// A registration on `link`: its key must own the name (or the name be
    /// new, or unbound: then it becomes the key's).
    fn on_register(&mut self, now: Instant, link: LinkId, seq: Seq, name: Name) {
        let (Some(key), Some(from)) = (self.links.remote(link), self.links.addr(link)) else {
            return;
        };
        // A session registers once, one name: a registration on one that
        // is already a client's (a retransmission, or a replay) gets the
        // cached answer or nothing. A new registration is a new handshake.
        if let Some(owner) = self.links.get(link).and_then(|l| l.owner) {
            if self.table.lookup(&name) == Some(owner)
                && self.sessions[owner.index() as usize].link == Some(link)
            {
                self.cached(owner, seq);
            }
            return;
        }
        let Some(id) = self.table.lookup(&name) else {
            // A new row is for good: one source may not fill the registry.
            // (Checked after the lookup, so known names always log in.)
            if self.table.len() < self.table.capacity()
                && !(self.new_names_site.take(now, from) && self.new_names.take(now, from))
            {
                // Counted, not logged: the log is not the attacker's to fill.
                self.stats.ignored += 1;
                let msg = Message::Refused {
                    seq,
                    reason: Refusal::TooManyNames,
                };
                self.links.send(link, &msg, &mut self.transmits);
                return;
            }
            match self.table.insert(name.clone(), from, false, key) {
                Ok(id) => {
                    let unix = self.unix_time(now);
                    self.sessions.reset(id.index() as usize, unix);
                    self.accept(now, id, link, seq);
                }
                // No row, so no session to cache in: a retry is refused again.
                Err(_) => {
                    let reason = Refusal::Busy;
                    let msg = Message::Refused { seq, reason };
                    self.links.send(link, &msg, &mut self.transmits);
                }
            }
            return;
        };
        let entry = self.table.get(id);
        let (same_addr, online, owner) = (entry.addr == from, entry.online, entry.key);
        if !owner.is_none() && owner != key {
            // Whether the owner is online, silent or gone: never its mail,
            // never its name.
            self.stats.ignored += 1;
            let reason = Rejection::OtherKey;
            self.event(ServerEvent::Rejected(name, from, reason));
            let msg = Message::Rejected { seq, reason };
            self.links.send(link, &msg, &mut self.transmits);
            return;
        }
        if !online || same_addr {
            self.accept(now, id, link, seq);
            return;
        }
        // Held by a live-looking process of the same key at another
        // address: only a silent holder loses it.
        let waiting = self.sessions[id.index() as usize].probe.as_ref().is_some_and(|p| {
            p.waiters
                .iter()
                .any(|w| matches!(w, Waiter::Register { link: l, seq: s } if *l == link && *s == seq))
        });
        if !waiting {
            self.wait_for_probe(now, id, Waiter::Register { link, seq });
        }
    }

    /// The client of `link` now receives at `addr`: its row and everyone's
    /// table follow.
    fn on_moved(&mut self, now: Instant, link: LinkId, addr: SocketAddr) {
        let Some(id) = self.authenticate(now, link) else {
            return;
        };
        let entry = self.table.get(id);
        let (name, key, online) = (entry.name.clone(), entry.key, entry.online);
        self.table.set(id, addr, online);
        let seen_at = Some(self.seen(now, id));
        self.store_ops.push_back(StoreOp::Client(ClientRecord {
            name: name.clone(),
            addr,
            key: Some(key),
            seen_at,
        }));
        self.event(ServerEvent::Moved(name.clone(), addr));
        if self.sessions[id.index() as usize].gone {
            self.revive(now, id, name, addr);
        }
    }

    /// The ids of `id`'s waiting mail, in store order.
    fn mail_ids(&self, id: ClientId) -> Vec<MailId> {
        let mailbox = self.mailboxes.get(&id);
        mailbox.map_or_else(Vec::new, |mb| mb.mail.keys().copied().collect())
    }

    /// Whether `link` is the session of a client taken for gone.
    fn is_gone(&self, link: LinkId) -> bool {
        let owner = self.links.get(link).and_then(|l| l.owner);
        owner.is_some_and(|id| {
            let session = &self.sessions[id.index() as usize];
            session.gone && session.link == Some(link)
        })
    }

    /// A client taken for gone proved a new address on its session: it had
    /// only moved. It is online again, same session and name, everyone's
    /// table follows, and what was stored for it meanwhile comes live.
    fn revive(&mut self, now: Instant, id: ClientId, name: Name, addr: SocketAddr) {
        let session = &mut self.sessions[id.index() as usize];
        session.gone = false;
        session.rounds = 0;
        // It never stopped taking deltas.
        session.syncing = false;
        if let Some(timer) = session.presence.take() {
            self.timers.cancel(timer);
        }
        self.table.set(id, addr, true);
        let mail = self.mail_ids(id);
        let session = &mut self.sessions[id.index() as usize];
        session.queue = mail.into_iter().map(|m| (m, None)).collect();
        session.serial = true;
        self.event(ServerEvent::Back(name, addr));
        self.heard(now, id);
        self.pump(now, id);
    }

    fn on_save(&mut self, now: Instant, sender: ClientId, seq: Seq, to: Name, mail: NewMail) {
        let Some(to) = self.table.lookup(&to) else {
            let reason = Refusal::UnknownRecipient;
            self.reply(sender, seq, Message::Refused { seq, reason });
            return;
        };
        self.pending(sender, seq);
        if self.table.get(to).online {
            // The sender could not reach it: while the probe asks whether
            // it is there, it opens its side of a path to the sender.
            self.punch(to, sender);
            self.wait_for_probe(
                now,
                to,
                Waiter::Save {
                    from: sender,
                    seq,
                    mail: Box::new(mail),
                },
            );
        } else {
            self.save(now, sender, seq, to, mail);
        }
    }

    /// Stores a direct message and acks its sender (after the commit).
    fn save(&mut self, now: Instant, sender: ClientId, seq: Seq, to: ClientId, mail: NewMail) {
        self.store_direct(now, sender, seq, to, mail, false);
    }

    /// A direct message its sender could not get through: relayed to an
    /// online recipient, stored for an offline one. Either way it is
    /// stored first, so it is never lost: the recipient's ack of the
    /// relayed copy deletes it and tells the sender "received"; without
    /// one in [`RELAY_WAIT`] the sender hears "saved" and the copy waits
    /// in the mailbox like any other.
    fn on_relay(&mut self, now: Instant, sender: ClientId, seq: Seq, to: Name, mail: NewMail) {
        let Some(to) = self.table.lookup(&to) else {
            let reason = Refusal::UnknownRecipient;
            self.reply(sender, seq, Message::Refused { seq, reason });
            return;
        };
        let relay = self.table.get(to).online && self.relays.len() < MAX_RELAYS;
        self.store_direct(now, sender, seq, to, mail, relay);
        if relay {
            // Direct stays the goal: the recipient tries to open a path
            // towards the sender again with every relayed message.
            self.punch(to, sender);
        }
    }

    /// The mail a save or relay request of `sender` carries.
    fn sealed_mail(&self, sender: ClientId, id: MsgId, sealed: &wire::Sealed) -> NewMail {
        let entry = self.table.get(sender);
        NewMail {
            from: entry.name.clone(),
            id,
            body: Body::Sealed {
                key: entry.key,
                sealed: sealed.to_vec(),
            },
        }
    }

    /// Tells the online client `to` that `peer` cannot reach it, so that
    /// it sends `peer` a datagram (see [`Message::Punch`]).
    fn punch(&mut self, to: ClientId, peer: ClientId) {
        if to != peer {
            let entry = self.table.get(peer).clone();
            self.send_to(to, &Message::Punch { entry });
        }
    }

    /// [`Server::save`], or with `relay` a relay to an online recipient:
    /// the sender's answer then waits for the recipient's ack.
    fn store_direct(
        &mut self,
        now: Instant,
        sender: ClientId,
        seq: Seq,
        to: ClientId,
        mail: NewMail,
        relay: bool,
    ) {
        // A probe may just have marked the recipient offline: everyone,
        // the sender included, hears of it before the sender hears "saved".
        self.flush_deltas();
        let key = (to, mail.from.clone(), mail.id);
        match self.put(now, to, mail, relay) {
            Ok(Some(mail)) if relay => {
                if let Some(m) = held_mut(&mut self.mailboxes, to, mail) {
                    m.relayed = true;
                }
                self.pending(sender, seq);
                let timer = self.timers.insert(now + RELAY_WAIT, Timer::Relay(to, mail));
                let from = sender;
                self.relays
                    .insert((to, mail), Relaying { from, seq, timer });
                self.batch
                    .acks
                    .push((sender, seq, Promise::Relay { to, mail }));
                self.deliver_live(now, to, mail);
            }
            Ok(mail) => {
                // The recipient may be online again by now (it came back
                // while the probe ran): then it gets the message at once.
                if let Some(mail) = mail {
                    self.deliver_live(now, to, mail);
                }
                if self.batch.keys.contains(&key) {
                    // Stored by this batch (now, or by a retry of it).
                    self.ack_saved(sender, seq, false);
                } else {
                    self.reply(sender, seq, Message::Ack { seq });
                }
            }
            Err(reason) => self.reply(sender, seq, Message::Refused { seq, reason }),
        }
    }

    fn on_channel(&mut self, now: Instant, sender: ClientId, seq: Seq, id: MsgId, text: Text) {
        let from = self.table.get(sender).name.clone();
        let recipients: Vec<ClientId> = self
            .table
            .iter()
            .map(|(r, _)| r)
            .filter(|&r| r != sender)
            .collect();
        // Every recipient gets a copy in its mailbox first, so an online
        // one that never acks (or a crash mid fan-out) still finds it there;
        // its ack deletes the copy. The message is stored once (one body,
        // one pending row per recipient), so a fan-out costs one seal and
        // one body's bytes however large the table. If the store cannot
        // take it for everyone, it is refused: never acked half-kept.
        let mail = MailId(self.next_mail);
        let body = wire::encode_body(&MailBody { id, text });
        let mut salt = [0; AT_REST_SALT];
        self.rng.fill_bytes(&mut salt);
        // Encrypted at rest under the server's storage key: the store's
        // files never hold a message's text.
        let sealed = self
            .links
            .secrets()
            .seal_at_rest(salt, &channel_ad(&from, id, mail), &body);
        let body: Arc<[u8]> = sealed.into();
        let needed = MAIL_OVERHEAD
            .saturating_mul(recipients.len())
            .saturating_add(body.len());
        if self.stored_bytes.saturating_add(needed) > self.config.store_bytes {
            let reason = Refusal::MailboxFull;
            self.reply(sender, seq, Message::Refused { seq, reason });
            return;
        }
        let stored_at = self.unix_time(now);
        let mut stored = false;
        // A copy committed by an earlier batch (a retry after a restart):
        // the message is out, so the answer is "saved" whatever this batch
        // does; a copy new in it that fails is missed like a full mailbox.
        let mut committed = false;
        let mut missed = false;
        let mut live = Vec::new();
        let mut pending = Vec::new();
        for r in recipients {
            let copy = StoredMail {
                mail,
                to: self.table.get(r).name.clone(),
                from: from.clone(),
                channel: true,
                stored_at,
                id,
                body: Body::Channel(body.clone()),
            };
            match self.admit(now, r, &copy) {
                Ok(true) => {
                    stored = true;
                    live.push((r, mail));
                    pending.push(copy.to);
                }
                // A copy put by this batch (a retry while it commits).
                Ok(false) if self.batch.channels.contains(&(from.clone(), id)) => stored = true,
                Ok(false) => committed = true,
                // This recipient's own mailbox is full: it misses the
                // message (logged), as a full mailbox bounces direct mail.
                Err(_) => {
                    missed = true;
                    self.event(ServerEvent::MailboxFull {
                        to: copy.to,
                        from: from.clone(),
                    });
                }
            }
        }
        if !pending.is_empty() {
            self.next_mail += 1;
            self.batch.channels.insert((from.clone(), id));
            self.batch.stored.push(ServerEvent::StoredChannel {
                from: from.clone(),
                recipients: pending.len(),
            });
            self.store_ops.push_back(StoreOp::Channel(ChannelMail {
                mail,
                from,
                stored_at,
                id,
                body,
                to: pending,
            }));
        }
        // SPEC: the sender's ack first, then the copies (all of them leave
        // after the commit, in this order).
        if stored && !committed {
            self.ack_saved(sender, seq, true);
        } else if missed && !stored && !committed {
            // Every mailbox it was for is full: kept for nobody, and the
            // sender must not read "received".
            let reason = Refusal::MailboxFull;
            self.reply(sender, seq, Message::Refused { seq, reason });
        } else {
            self.reply(sender, seq, Message::Ack { seq });
        }
        for (r, mail) in live {
            if self.queue_live(r, mail) {
                self.fanout.push_back(r);
            }
        }
    }

    /// Sends a just-stored message to its recipient now if it is online.
    fn deliver_live(&mut self, now: Instant, to: ClientId, mail: MailId) {
        if self.queue_live(to, mail) {
            self.pump(now, to);
        }
    }

    /// Queues a just-stored message for its recipient if it is online.
    fn queue_live(&mut self, to: ClientId, mail: MailId) -> bool {
        let online = self.table.get(to).online;
        if online {
            self.sessions[to.index() as usize]
                .queue
                .push_back((mail, None));
        }
        online
    }

    fn on_delivered(&mut self, now: Instant, id: ClientId, mail: MailId) {
        // Nothing of the batch under way has left the server: an ack of its
        // mail is a guess (and would answer a relay "received" before its
        // commit, which may yet fail).
        if self.batch.first_mail.is_some_and(|first| mail >= first) {
            self.stats.ignored += 1;
            return;
        }
        let session = &mut self.sessions[id.index() as usize];
        if let Some(inflight) = session.inflight.remove(&mail) {
            self.timers.cancel(inflight.timer);
            session.rounds = 0;
        }
        if let Some(m) = held(&self.mailboxes, id, mail) {
            self.stats.delivered += 1;
            if !m.channel {
                let (to, from) = (self.table.get(id).name.clone(), m.from.clone());
                let relayed = m.relayed;
                self.event(ServerEvent::Delivered { to, from, relayed });
            }
        }
        self.delete(id, mail);
        if let Some(r) = self.relays.remove(&(id, mail)) {
            self.timers.cancel(r.timer);
            let seq = r.seq;
            self.reply(r.from, seq, Message::Received { seq });
        }
        self.pump(now, id);
    }

    /// No ack for a relayed message in time: it stays stored, and its
    /// sender hears so.
    fn on_relay_timer(&mut self, to: ClientId, mail: MailId) {
        let Some(r) = self.relays.remove(&(to, mail)) else {
            return;
        };
        let seq = r.seq;
        if self.batch.first_mail.is_some_and(|first| mail >= first) {
            // Its commit is still under way: "saved" stands or falls with it.
            self.ack_saved(r.from, seq, false);
        } else {
            self.reply(r.from, seq, Message::Ack { seq });
        }
    }

    fn on_probe_reply(&mut self, now: Instant, link: LinkId, nonce: u64) {
        let Some(&id) = self.probes.get(&nonce) else {
            self.stats.ignored += 1;
            return;
        };
        // Only the probed session can say it is alive.
        if self.sessions[id.index() as usize].link != Some(link) {
            self.stats.ignored += 1;
            return;
        }
        self.probes.remove(&nonce);
        let Some(probe) = self.sessions[id.index() as usize].probe.take() else {
            return;
        };
        self.timers.cancel(probe.timer);
        self.heard(now, id);
        if probe.deliveries {
            self.redeliver(now, id);
        }
        for waiter in probe.waiters {
            match waiter {
                Waiter::Save { from, seq, .. } => {
                    let entry = self.table.get(id).clone();
                    self.reply(from, seq, Message::Exists { seq, entry });
                }
                Waiter::Register { link, seq } => {
                    let name = self.table.get(id).name.clone();
                    let addr = self.links.addr(link);
                    let reason = Rejection::InUse;
                    if let Some(addr) = addr {
                        self.event(ServerEvent::Rejected(name, addr, reason));
                    }
                    let msg = Message::Rejected { seq, reason };
                    self.links.send(link, &msg, &mut self.transmits);
                }
            }
        }
    }

    // ---- timers -----------------------------------------------------------

    fn on_probe_timer(&mut self, now: Instant, id: ClientId) {
        let Some(session) = self.sessions.get_mut(id.index() as usize) else {
            return;
        };
        let Some(probe) = session.probe.as_mut() else {
            return;
        };
        if probe.sent < 2 {
            probe.sent += 1;
            probe.timer = self.timers.insert(now + RETRANSMIT, Timer::Probe(id));
            let msg = Message::Probe { nonce: probe.nonce };
            self.send_to(id, &msg);
            return;
        }
        // Silent for the whole ack timeout: the client is gone.
        let Some(probe) = session.probe.take() else {
            return;
        };
        self.probes.remove(&probe.nonce);
        if self.table.get(id).online {
            self.set_offline(id, false);
        }
        let mut waiters = probe.waiters;
        // Mail first, so a newcomer taking the name finds it in the mailbox
        // it is welcomed with.
        waiters.sort_by_key(|w| matches!(w, Waiter::Register { .. }));
        for waiter in waiters {
            match waiter {
                Waiter::Save { from, seq, mail } => self.save(now, from, seq, id, *mail),
                Waiter::Register { link, seq } => {
                    if !self.table.get(id).online && self.links.get(link).is_some() {
                        self.accept(now, id, link, seq);
                    }
                }
            }
        }
    }

    fn on_delivery_timer(&mut self, now: Instant, id: ClientId, mail: MailId) {
        let Some(session) = self.sessions.get_mut(id.index() as usize) else {
            return;
        };
        let Some(inflight) = session.inflight.get_mut(&mail) else {
            return;
        };
        if inflight.sent < 2 {
            inflight.sent += 1;
            inflight.timer = self
                .timers
                .insert(now + RETRANSMIT, Timer::Delivery(id, mail));
            let pos = inflight.pos;
            self.transmit_delivery(id, mail, pos);
            return;
        }
        // Unacked for the whole ack timeout: is the client still there?
        // (One liveness check covers every delivery in flight.)
        if session.probe.as_ref().is_some_and(|p| p.deliveries) {
            return;
        }
        session.rounds += 1;
        if session.rounds > DELIVERY_ROUNDS {
            // Answers probes but never acks: treat it as gone; the mail stays
            // for its next registration.
            self.set_offline(id, false);
            return;
        }
        self.probe(now, id).deliveries = true;
    }

    fn on_presence_timer(&mut self, now: Instant, id: ClientId) {
        let session = &mut self.sessions[id.index() as usize];
        session.presence = None;
        let heard = session.last_heard.unwrap_or(now);
        let due = heard + self.config.presence_timeout;
        if !self.table.get(id).online {
            // Deregistered (its session answered retried deregs, which stop
            // within 2.5 s) or taken for gone (a client that only moved had
            // that long to prove its new address): a presence timeout later
            // the session is dropped, so an idle offline client keeps
            // nothing here.
            if now < due && session.link.is_some() {
                session.presence = Some(self.timers.insert(due, Timer::Presence(id)));
            } else if let Some(link) = session.link.take() {
                session.gone = false;
                self.links.remove(link);
            }
            self.release(id);
            return;
        }
        if now >= due {
            // Three heartbeats missed: a silent leave, noticed without
            // anyone having to message the client.
            self.set_offline(id, false);
        } else {
            session.presence = Some(self.timers.insert(due, Timer::Presence(id)));
        }
    }

    /// The client showed signs of life: push its presence deadline out
    /// (lazily: the timer re-arms itself when it fires early).
    fn heard(&mut self, now: Instant, id: ClientId) {
        let unix = self.unix_time(now);
        let stored = self.sessions.seen[id.index() as usize];
        if unix.saturating_sub(stored) >= SEEN_REFRESH && self.table.get(id).online {
            self.note_seen(now, id);
        }
        let session = &mut self.sessions[id.index() as usize];
        session.last_heard = Some(now);
        if session.presence.is_none() && self.table.get(id).online {
            let due = now + self.config.presence_timeout;
            session.presence = Some(self.timers.insert(due, Timer::Presence(id)));
        }
    }

    // ---- sessions ---------------------------------------------------------

    /// The registered client whose current session `link` is.
    fn authenticate(&mut self, now: Instant, link: LinkId) -> Option<ClientId> {
        let owner = self.links.get(link).and_then(|l| l.owner);
        match owner {
            Some(id) if self.sessions[id.index() as usize].link == Some(link) => {
                self.heard(now, id);
                Some(id)
            }
            _ => {
                self.stats.ignored += 1;
                None
            }
        }
    }

    /// Authenticates a request and answers it from the reply cache if it is a
    /// retransmission; `Some` means "new, go ahead".
    fn request(&mut self, now: Instant, link: LinkId, seq: Seq) -> Option<ClientId> {
        let Some(id) = self.authenticate(now, link) else {
            // A session no registration succeeded on: the client learns it
            // is not registered.
            self.refuse_session(link, seq);
            return None;
        };
        if self.cached(id, seq) {
            return None;
        }
        Some(id)
    }

    /// [`Server::request`] for requests that need the client online; an
    /// offline one is told its session is gone (it re-registers).
    fn online_request(&mut self, now: Instant, link: LinkId, seq: Seq) -> Option<ClientId> {
        let id = self.request(now, link, seq)?;
        if !self.table.get(id).online {
            self.refuse_session(link, seq);
            return None;
        }
        Some(id)
    }

    /// Takes a token from the request's source. Over the rate, a request
    /// that can be refused is (`refuse`: a save or a channel message, which
    /// the user is told to send again); a sync or heartbeat is dropped as
    /// if lost (a refusal would make the client register again), and its
    /// retries, half a second apart, find the bucket refilled.
    fn within_rate(
        &mut self,
        now: Instant,
        link: LinkId,
        id: ClientId,
        seq: Seq,
        refuse: bool,
    ) -> bool {
        let Some(addr) = self.links.addr(link) else {
            return false;
        };
        if self.requests.take(now, addr) {
            return true;
        }
        self.stats.limited += 1;
        if refuse {
            let reason = Refusal::TooManyRequests;
            self.reply(id, seq, Message::Refused { seq, reason });
        } else {
            self.forget(id, seq);
        }
        false
    }

    /// "Unknown session": the client re-registers by itself.
    fn refuse_session(&mut self, link: LinkId, seq: Seq) {
        let reason = Refusal::UnknownSession;
        let msg = Message::Refused { seq, reason };
        self.links.send(link, &msg, &mut self.transmits);
    }

    /// If `seq` was seen: resend its reply (or ignore it while pending).
    fn cached(&mut self, id: ClientId, seq: Seq) -> bool {
        let session = &self.sessions[id.index() as usize];
        let Some((_, cached)) = session.replies.iter().find(|(s, _)| *s == seq) else {
            return false;
        };
        if let (Cached::Done(what, plain), Some(link)) = (cached, session.link) {
            let (what, plain) = (*what, plain.clone());
            let at = self.transmits.len();
            self.links
                .send_encoded(link, &plain, what, &mut self.transmits);
            // A resent "saved" of this very batch stands or falls with it.
            if self.transmits.len() > at
                && self.batch.acks.iter().any(|&(i, s, _)| i == id && s == seq)
            {
                self.batch.ack_transmits.push((at, id, seq, link));
            }
        }
        true
    }

    fn pending(&mut self, id: ClientId, seq: Seq) {
        let replies = &mut self.sessions[id.index() as usize].replies;
        if replies.len() == REPLY_CACHE {
            replies.pop_front();
        }
        // Most sessions only ever cache their welcome: room for one.
        replies.reserve_exact(1);
        replies.push_back((seq, Cached::Pending));
    }

    /// Drops `seq` from the cache (idempotent reads need no cached reply).
    fn forget(&mut self, id: ClientId, seq: Seq) {
        self.sessions[id.index() as usize]
            .replies
            .retain(|(s, _)| *s != seq);
    }

    /// Sends `msg` on the client's session and caches it for retransmitted
    /// requests.
    fn reply(&mut self, id: ClientId, seq: Seq, msg: Message) {
        let (what, plain) = (msg.what(), wire::encode_to_vec(&msg));
        self.cache(id, seq, (what, plain.clone()));
        if let Some(link) = self.sessions[id.index() as usize].link {
            self.links
                .send_encoded(link, &plain, what, &mut self.transmits);
        }
    }

    /// Remembers the reply to `seq` for retransmitted requests.
    fn cache(&mut self, id: ClientId, seq: Seq, (what, plain): (What, Vec<u8>)) {
        let replies = &mut self.sessions[id.index() as usize].replies;
        match replies.iter_mut().find(|(s, _)| *s == seq) {
            Some((_, cached)) => *cached = Cached::Done(what, plain),
            None => {
                if replies.len() == REPLY_CACHE {
                    replies.pop_front();
                }
                replies.reserve_exact(1);
                replies.push_back((seq, Cached::Done(what, plain)));
            }
        }
    }

    /// Acks `seq` "saved": a promise that holds only once the batch is
    /// committed, so the ack is noted for [`Server::handle_commit_failed`].
    fn ack_saved(&mut self, id: ClientId, seq: Seq, channel: bool) {
        self.promise(id, seq, Message::Ack { seq }, Promise::Saved { channel });
    }

    /// Replies `msg`, which holds only if the batch is committed (see
    /// [`Promise`]).
    fn promise(&mut self, id: ClientId, seq: Seq, msg: Message, promise: Promise) {
        self.batch.acks.push((id, seq, promise));
        let at = self.transmits.len();
        self.reply(id, seq, msg);
        if self.transmits.len() > at
            && let Some(link) = self.sessions[id.index() as usize].link
        {
            self.batch.ack_transmits.push((at, id, seq, link));
        }
    }

    /// Sends `msg` on the client's session (no caching).
    fn send_to(&mut self, id: ClientId, msg: &Message) {
        if let Some(link) = self.sessions[id.index() as usize].link {
            self.links.send(link, msg, &mut self.transmits);
        }
    }

    /// Makes `link` the client's session, marks it online at the link's
    /// address, welcomes it and starts streaming its mailbox.
    fn accept(&mut self, now: Instant, id: ClientId, link: LinkId, seq: Seq) {
        let (Some(addr), Some(key)) = (self.links.addr(link), self.links.remote(link)) else {
            return;
        };
        let entry = self.table.get(id);
        // Checked by every caller; checked again here, where it matters: a
        // name is never given to another key.
        if !entry.key.is_none() && entry.key != key {
            self.stats.ignored += 1;
            return;
        }
        let changed = !(entry.online && entry.addr == addr && entry.key == key);
        let name = entry.name.clone();
        let session = &mut self.sessions[id.index() as usize];
        if let Some(old) = session.link.replace(link)
            && old != link
        {
            // The previous session is over: a datagram on it now gets a
            // stateless reset, and its process registers again if alive.
            self.links.remove(old);
        }
        self.links.set_owner(link, id);
        if changed {
            // The registry: who owns the name, who may have mail, and where
            // and when it was last seen. Committed before the welcome leaves.
            let seen_at = Some(self.seen(now, id));
            self.store_ops.push_back(StoreOp::Client(ClientRecord {
                name: name.clone(),
                addr,
                key: Some(key),
                seen_at,
            }));
        }
        self.table.set_key(id, key);
        self.table.set(id, addr, true);
        self.cancel_deliveries(id);
        let mail = self.mail_ids(id);
        let session = &mut self.sessions[id.index() as usize];
        session.rounds = 0;
        session.gone = false;
        session.serial = false;
        session.batch = seq;
        // It syncs after the welcome (and after its mail).
        session.syncing = true;
        session.queue = mail
            .iter()
            .enumerate()
            .map(|(i, &m)| (m, Some(i as u32)))
            .collect();
        let (version, count, reset) = (
            self.table.version(),
            mail.len() as u32,
            self.links.reset_token(link),
        );
        let welcome = Message::Welcome {
            seq,
            version,
            mail: count,
            reset,
        };
        match (mail.last(), self.batch.first_mail) {
            // It counts mail of the batch under way, which a failed commit
            // takes back: then a welcome with the lower count replaces it
            // (a counted position that never came would stall the batch).
            (Some(&last), Some(first)) if last >= first => {
                let promise = Promise::Welcome {
                    version,
                    mail: count,
                    reset,
                    last,
                };
                self.promise(id, seq, welcome, promise);
            }
            _ => self.reply(id, seq, welcome),
        }
        self.event(ServerEvent::Registered(name, addr));
        self.heard(now, id);
        // Queued after the welcome, so the client learns the batch size first.
        self.pump(now, id);
    }

    /// Marks the client offline, tells everyone (via the next delta) and
    /// stops its deliveries; its mail stays. Its session stays for a
    /// presence timeout: a dereg'd client's retried dereg finds its answer
    /// there, and a silent one (`notified` false) that only moved may come
    /// back on it ([`Server::revive`]).
    fn set_offline(&mut self, id: ClientId, notified: bool) {
        let entry = self.table.get(id);
        let (addr, name) = (entry.addr, entry.name.clone());
        // Seen until now: what the name's time-to-live counts from.
        self.note_seen(self.now, id);
        self.table.set(id, addr, false);
        self.cancel_deliveries(id);
        self.unload(id);
        // The session is kept until a presence timeout from now
        // (`on_presence_timer`): a retried dereg still finds its answer, and
        // a silent client that only moved can prove its new address on it.
        let session = &mut self.sessions[id.index() as usize];
        session.gone = !notified;
        session.last_heard = Some(self.now);
        if session.link.is_some() && session.presence.is_none() {
            let due = self.now + self.config.presence_timeout;
            session.presence = Some(self.timers.insert(due, Timer::Presence(id)));
        }
        self.release(id);
        self.event(ServerEvent::Offline(name, notified));
    }

    /// Frees the session of `id` if nothing is under way on it.
    fn release(&mut self, id: ClientId) {
        self.sessions.release(id.index() as usize);
    }

    /// Notes that `id` is online now, for its "last seen"; returns the time.
    fn seen(&mut self, now: Instant, id: ClientId) -> i64 {
        let unix = self.unix_time(now);
        self.sessions.seen[id.index() as usize] = unix;
        unix
    }

    /// Writes `id`'s row again with "last seen" now.
    fn note_seen(&mut self, now: Instant, id: ClientId) {
        let entry = self.table.get(id);
        let (name, addr, key) = (entry.name.clone(), entry.addr, entry.key);
        let seen_at = Some(self.seen(now, id));
        self.store_ops.push_back(StoreOp::Client(ClientRecord {
            name,
            addr,
            key: (!key.is_none()).then_some(key),
            seen_at,
        }));
    }

    /// Makes a request wait for a liveness probe of `id`. When the probe
    /// already has [`PROBE_WAITERS`] waiting, a save-message is refused as
    /// busy (an explicit answer; its sender may try again) and a
    /// registration is dropped (its client retries by itself).
    fn wait_for_probe(&mut self, now: Instant, id: ClientId, waiter: Waiter) {
        let probe = self.probe(now, id);
        if probe.waiters.len() < PROBE_WAITERS {
            probe.waiters.push(waiter);
            return;
        }
        self.stats.ignored += 1;
        if let Waiter::Save { from, seq, .. } = waiter {
            let reason = Refusal::Busy;
            self.reply(from, seq, Message::Refused { seq, reason });
        }
    }

    /// The liveness probe of `id`, started if none is under way.
    fn probe(&mut self, now: Instant, id: ClientId) -> &mut Probe {
        let probe = match self.sessions[id.index() as usize].probe.take() {
            Some(probe) => probe,
            None => {
                let nonce = self.rng.next_u64();
                let timer = self.timers.insert(now + RETRANSMIT, Timer::Probe(id));
                self.probes.insert(nonce, id);
                self.send_to(id, &Message::Probe { nonce });
                Box::new(Probe {
                    nonce,
                    sent: 1,
                    timer,
                    waiters: Vec::new(),
                    deliveries: false,
                })
            }
        };
        self.sessions[id.index() as usize].probe.insert(probe)
    }

    // ---- mail -------------------------------------------------------------

    /// Stores a direct message for `to` unless it is already there (a
    /// retry); `relay`: to be relayed live (the log says so). `Ok(Some(id))`
    /// for a new message, `Ok(None)` for a duplicate.
    fn put(
        &mut self,
        now: Instant,
        to: ClientId,
        mail: NewMail,
        relay: bool,
    ) -> Result<Option<MailId>, Refusal> {
        let stored = StoredMail {
            mail: MailId(self.next_mail),
            to: self.table.get(to).name.clone(),
            from: mail.from,
            channel: false,
            stored_at: self.unix_time(now),
            id: mail.id,
            body: mail.body,
        };
        if !self.admit(now, to, &stored)? {
            return Ok(None);
        }
        self.next_mail += 1;
        self.batch.keys.insert((to, stored.from.clone(), stored.id));
        let (to_name, from) = (stored.to.clone(), stored.from.clone());
        self.batch.stored.push(if relay {
            ServerEvent::Relaying { to: to_name, from }
        } else {
            ServerEvent::Stored {
                to: to_name,
                from,
                channel: false,
            }
        });
        let id = stored.mail;
        self.store_ops.push_back(StoreOp::Put(stored));
        Ok(Some(id))
    }

    /// Puts a message into `to`'s mailbox, as part of the batch under
    /// way, unless its (sender, id) is there already (`Ok(false)`: a
    /// retry). The caller emits the store operation.
    fn admit(&mut self, now: Instant, to: ClientId, stored: &StoredMail) -> Result<bool, Refusal> {
        let held = Held::new(stored);
        let cost = self.cost(stored.mail, &held);
        let key = self.dedup_key(&stored.from, stored.id);
        let mb = self.mailboxes.entry(to).or_default();
        if mb.keys.contains_key(&key)
            && (mb.mail.values()).any(|m| m.id == stored.id && m.from == stored.from)
        {
            return Ok(false);
        }
        // A mailbox counts every message whole: it is what its owner is
        // sent, shared or not.
        let size = held.size();
        if mb.mail.len() >= self.config.mailbox_messages
            || mb.bytes + size > self.config.mailbox_bytes
            || self.stored_bytes + cost > self.config.store_bytes
        {
            return Err(Refusal::MailboxFull);
        }
        mb.bytes += size;
        *mb.keys.entry(key).or_default() += 1;
        let shared = held.shared;
        mb.mail.insert(stored.mail, Box::new(held));
        self.charge(stored.mail, shared, cost);
        self.by_age.insert((stored.stored_at, stored.mail, to));
        if self.expiry.is_none() {
            // The first message waiting: its expiry is the next.
            self.expire(now);
        }
        self.batch.first_mail.get_or_insert(stored.mail);
        self.batch.mail.push((to, stored.mail));
        Ok(true)
    }

    /// What one more copy of `m` adds to the store's bytes: a shared
    /// channel body counts with its first copy only.
    fn cost(&self, mail: MailId, m: &Held) -> usize {
        match m.shared && self.shared.contains_key(&mail) {
            true => MAIL_OVERHEAD,
            false => m.size(),
        }
    }

    /// Counts a copy of `m`, costing `cost` ([`Server::cost`]), into the
    /// store's bytes.
    fn charge(&mut self, mail: MailId, shared: bool, cost: usize) {
        self.stored_bytes += cost;
        if shared {
            *self.shared.entry(mail).or_default() += 1;
        }
    }

    /// Counts a copy of `m` out of the store's bytes.
    fn discharge(&mut self, mail: MailId, m: &Held) {
        if !m.shared {
            self.stored_bytes -= m.size();
            return;
        }
        self.stored_bytes -= MAIL_OVERHEAD;
        if let Some(copies) = self.shared.get_mut(&mail) {
            *copies -= 1;
            if *copies == 0 {
                self.shared.remove(&mail);
                self.stored_bytes -= m.len as usize;
            }
        }
    }

    fn delete(&mut self, to: ClientId, mail: MailId) {
        if self.take_mail(to, mail).is_some() {
            let to = self.table.get(to).name.clone();
            self.store_ops.push_back(StoreOp::Delete { to, mail });
        }
    }

    /// Removes a message from memory, with what it counted for.
    fn take_mail(&mut self, to: ClientId, mail: MailId) -> Option<Held> {
        let m = held(&self.mailboxes, to, mail)?;
        let key = self.dedup_key(&m.from, m.id);
        let mb = self.mailboxes.get_mut(&to)?;
        let m = mb.mail.remove(&mail)?;
        mb.bytes -= m.size();
        if let Some(n) = mb.keys.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                mb.keys.remove(&key);
            }
        }
        self.discharge(mail, &m);
        self.by_age.remove(&(m.stored_at, mail, to));
        Some(*m)
    }

    /// The duplicate key of (`from`, `id`): a keyed hash, so no sender can
    /// aim collisions at a mailbox (a collision would only cost a scan).
    fn dedup_key(&self, from: &Name, id: MsgId) -> u64 {
        self.dedup.hash_one((from, id))
    }

    /// Lets go of the bodies of `to`'s committed mail: they stay on disk
    /// until a delivery fetches them again.
    fn unload(&mut self, to: ClientId) {
        let first = self.batch.first_mail;
        let Some(mb) = self.mailboxes.get_mut(&to) else {
            return;
        };
        for (&mail, m) in &mut mb.mail {
            // This batch's mail is not on disk until its commit.
            if first.is_none_or(|first| mail < first) {
                m.body = None;
            }
        }
    }

    /// Deletes the mail that reached its time-to-live, then sets the
    /// timer for the next.
    fn expire(&mut self, now: Instant) {
        let Some(ttl) = self.config.mail_ttl else {
            return;
        };
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let unix = self.unix_time(now);
        let mut expired = Vec::new();
        let mut next: Option<Duration> = None;
        for &(stored_at, mail, to) in &self.by_age {
            let left = stored_at.saturating_add(ttl).saturating_sub(unix);
            if left > 0 {
                next = Some(Duration::from_secs(left.unsigned_abs()));
                break;
            }
            // An online recipient is being given it (or has it in a
            // numbered batch): it is not left undelivered, and taking it
            // out of the batch would stall the client. Looked at again
            // later, in case the recipient leaves without it.
            if self.table.get(to).online {
                next = Some(next.map_or(EXPIRY_RECHECK, |n| n.min(EXPIRY_RECHECK)));
                continue;
            }
            expired.push((stored_at, mail, to));
        }
        for (stored_at, mail, to) in expired {
            match self.take_mail(to, mail) {
                Some(m) => {
                    let to = self.table.get(to).name.clone();
                    self.event(ServerEvent::Expired {
                        to: to.clone(),
                        from: m.from,
                        mail,
                    });
                    self.store_ops.push_back(StoreOp::Delete { to, mail });
                }
                None => {
                    self.by_age.remove(&(stored_at, mail, to));
                }
            }
        }
        // A time too far to count (a hand-edited store) is never.
        if let Some(due) = next.and_then(|n| now.checked_add(n))
            && self.expiry.is_none_or(|(at, _)| at > due)
        {
            if let Some((_, key)) = self.expiry.take() {
                self.timers.cancel(key);
            }
            self.expiry = Some((due, self.timers.insert(due, Timer::Expiry)));
        }
    }

    /// Sends queued deliveries while the window has room.
    fn pump(&mut self, now: Instant, id: ClientId) {
        loop {
            let Some(session) = self.sessions.get_mut(id.index() as usize) else {
                return;
            };
            let window = if session.serial { 1 } else { DELIVERY_WINDOW };
            if session.inflight.len() >= window {
                return;
            }
            let Some((mail, pos)) = session.queue.pop_front() else {
                // What the revival queued has gone out.
                session.serial = false;
                return;
            };
            let exists = self
                .mailboxes
                .get(&id)
                .is_some_and(|mb| mb.mail.contains_key(&mail));
            if !exists || session.inflight.contains_key(&mail) {
                continue;
            }
            let timer = self
                .timers
                .insert(now + RETRANSMIT, Timer::Delivery(id, mail));
            session.inflight.insert(
                mail,
                Inflight {
                    pos,
                    sent: 1,
                    timer,
                },
            );
            self.transmit_delivery(id, mail, pos);
        }
    }

    /// The client answered a probe: give every unacked delivery a new round.
    fn redeliver(&mut self, now: Instant, id: ClientId) {
        let mails: Vec<(MailId, Option<u32>)> = self.sessions[id.index() as usize]
            .inflight
            .iter()
            .map(|(&m, f)| (m, f.pos))
            .collect();
        for (mail, pos) in mails {
            let timer = self
                .timers
                .insert(now + RETRANSMIT, Timer::Delivery(id, mail));
            if let Some(f) = self.sessions[id.index() as usize].inflight.get_mut(&mail) {
                self.timers.cancel(f.timer);
                f.timer = timer;
                f.sent = 1;
            }
            self.transmit_delivery(id, mail, pos);
        }
    }

    fn transmit_delivery(&mut self, id: ClientId, mail: MailId, pos: Option<u32>) {
        let Some(m) = held_mut(&mut self.mailboxes, id, mail) else {
            return;
        };
        let cached = m.shared && self.opened.as_ref().is_some_and(|(o, _)| *o == mail);
        if m.body.is_none() && !cached {
            // On disk: sent once the driver has fetched it.
            if !std::mem::replace(&mut m.fetching, true) {
                self.fetches.push_back((id, mail));
            }
            return;
        }
        let Some(m) = held(&self.mailboxes, id, mail) else {
            return;
        };
        let (stored_at, from) = (m.stored_at, m.from.clone());
        let content = match &self.opened {
            Some((opened, content)) if *opened == mail && m.shared => content.clone(),
            // Checked when loaded, stored and fetched; a failure here
            // delivers nothing.
            _ => {
                let shared = m.shared;
                let to = &self.table.get(id).name;
                let Some(content) = m.body.as_deref().and_then(|b| self.content(to, mail, m, b))
                else {
                    return;
                };
                if shared {
                    self.opened = Some((mail, content.clone()));
                }
                content
            }
        };
        let relayed = pos.is_none() && held(&self.mailboxes, id, mail).is_some_and(|m| m.relayed);
        let batch = self.sessions[id.index() as usize].batch;
        let msg = if relayed {
            // Live, as the direct message it is (a stored one, counted in
            // a log-back's batch, is a delivery like any other).
            Message::Relayed {
                mail,
                from,
                content,
            }
        } else {
            Message::Deliver {
                mail,
                batch,
                pos,
                stored_at,
                from,
                content,
            }
        };
        let at = self.transmits.len();
        self.send_to(id, &msg);
        if self.transmits.len() > at && self.batch.first_mail.is_some_and(|first| mail >= first) {
            self.batch.deliveries.push((at, mail));
        }
    }

    /// A stored message as it is delivered: sealed mail as it was sealed,
    /// a channel copy decrypted from the store (it travels in the
    /// recipient's session).
    fn content(&self, to: &Name, mail: MailId, m: &Held, body: &Body) -> Option<Content> {
        match body {
            Body::Sealed { key, sealed } => Some(Content::Sealed {
                key: *key,
                sealed: wire::Sealed::from_slice(sealed).ok()?,
            }),
            Body::AtRest(blob) | Body::Legacy(blob) => {
                let ad = at_rest_ad(to, &m.from, m.channel, m.id);
                let plain = self.links.secrets().open_at_rest(&ad, blob)?;
                let verified = matches!(body, Body::AtRest(_));
                let body = wire::decode_body(&plain)?;
                Some(Content::Relayed {
                    channel: m.channel,
                    verified,
                    id: body.id,
                    text: body.text,
                })
            }
            Body::Channel(blob) => {
                let ad = channel_ad(&m.from, m.id, mail);
                let plain = self.links.secrets().open_at_rest(&ad, blob)?;
                let body = wire::decode_body(&plain)?;
                Some(Content::Relayed {
                    channel: true,
                    verified: true,
                    id: body.id,
                    text: body.text,
                })
            }
            Body::Clear(text) => Some(Content::Relayed {
                channel: m.channel,
                verified: false,
                id: m.id,
                text: Text::new(text).ok()?,
            }),
        }
    }

    /// A version-1 message stored in clear, encrypted at rest (and marked:
    /// it proves no sender).
    fn legacy_at_rest(&mut self, m: &StoredMail, text: &str) -> Body {
        let Ok(text) = Text::new(text) else {
            return m.body.clone();
        };
        let body = wire::encode_body(&MailBody { id: m.id, text });
        let mut salt = [0; AT_REST_SALT];
        self.rng.fill_bytes(&mut salt);
        let ad = at_rest_ad(&m.to, &m.from, m.channel, m.id);
        Body::Legacy(self.links.secrets().seal_at_rest(salt, &ad, &body))
    }

    fn cancel_deliveries(&mut self, id: ClientId) {
        let Some(session) = self.sessions.get_mut(id.index() as usize) else {
            return;
        };
        session.queue.clear();
        for (_, f) in std::mem::take(&mut session.inflight) {
            self.timers.cancel(f.timer);
        }
    }

    // ---- plumbing ---------------------------------------------------------

    /// The row for `name`, created offline at `addr` if missing.
    fn row(&mut self, name: &Name, addr: SocketAddr, key: PublicKey) -> Option<ClientId> {
        if let Some(id) = self.table.lookup(name) {
            return Some(id);
        }
        let id = self.table.insert(name.clone(), addr, false, key).ok()?;
        // New (or a vacant row given to a new name): counted as seen from
        // now, whenever it next logs in.
        let unix = self.unix_time(self.now);
        self.sessions.reset(id.index() as usize, unix);
        Some(id)
    }

    /// How often names are checked: hourly, or twice per time-to-live when
    /// that is shorter (no name outlives it by more than half).
    fn name_sweep(&self) -> Duration {
        self.config.name_ttl.map_or(NAME_SWEEP, |ttl| {
            (ttl / 2).clamp(Duration::from_secs(1), NAME_SWEEP)
        })
    }

    /// Forgets every name not online for the name time-to-live that nothing
    /// still refers to: offline with no session, no probe and no delivery
    /// under way, an empty mailbox, and no stored mail from it (that mail
    /// is checked against the name's key). Its row is vacant for a new
    /// name and the store forgets it.
    fn forget_unseen(&mut self, now: Instant) {
        let Some(ttl) = self.config.name_ttl else {
            return;
        };
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let unix = self.unix_time(now);
        let senders: HashSet<&Name> = (self.mailboxes.values())
            .flat_map(|mb| mb.mail.values().map(|m| &m.from))
            .collect();
        let unseen: Vec<ClientId> = (self.table.iter())
            .filter(|&(id, e)| {
                let s = &self.sessions[id.index() as usize];
                !e.online
                    && self.sessions.seen[id.index() as usize].saturating_add(ttl) <= unix
                    && s.link.is_none()
                    && s.probe.is_none()
                    && s.queue.is_empty()
                    && s.inflight.is_empty()
                    && self.mailboxes.get(&id).is_none_or(|mb| mb.mail.is_empty())
                    && !senders.contains(&e.name)
            })
            .map(|(id, _)| id)
            .collect();
        for id in unseen {
            let name = self.table.get(id).name.clone();
            let i = id.index() as usize;
            if let Some(key) = self.sessions.live[i].take().and_then(|s| s.presence) {
                self.timers.cancel(key);
            }
            self.mailboxes.remove(&id);
            self.table.remove(id);
            self.event(ServerEvent::Forgotten {
                name: name.clone(),
                days: unix.saturating_sub(self.sessions.seen[i]) / 86_400,
            });
            self.store_ops.push_back(StoreOp::Forget(name));
        }
    }

    /// Turns the table changes made since the last flush into deltas for
    /// every online client: bursts coalesce into one update per drain.
    fn flush_deltas(&mut self) {
        let deltas = self.table.take_deltas();
        if deltas.is_empty() {
            return;
        }
        let online: Vec<LinkId> = self
            .table
            .iter()
            .filter(|(_, e)| e.online)
            .map(|(id, _)| &self.sessions[id.index() as usize])
            .filter(|s| !s.syncing)
            .filter_map(|s| s.link)
            .collect();
        for delta in deltas {
            let msg = Message::Delta {
                prev: delta.prev,
                version: delta.version,
                entries: delta.entries,
            };
            let plain = wire::encode_to_vec(&msg);
            for &link in &online {
                self.links
                    .send_encoded(link, &plain, What::Delta, &mut self.transmits);
            }
        }
    }

    fn unix_time(&self, now: Instant) -> i64 {
        let (at, unix) = self.config.clock;
        let elapsed = now.saturating_duration_since(at).as_secs();
        unix.saturating_add(i64::try_from(elapsed).unwrap_or(i64::MAX))
    }

    fn event(&mut self, event: ServerEvent) {
        if self.events.len() == EVENT_QUEUE {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}
