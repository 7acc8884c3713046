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
//! A driver that commits on another thread seals the batch
//! ([`Server::poll_batch`]) and goes on: the next batch gathers meanwhile,
//! and a commit releases only the datagrams made before its seal.
//! A commit that fails (a full disk, a database another process locked) is
//! reported with [`Server::handle_commit_failed`]: the messages of the batch
//! are taken back and their senders refused (never acked), while the rest of
//! the batch — acks, registrations, moves, which promised nobody "saved" —
//! is retried until the store takes it, so the server keeps serving.
//!
//! One concern a file: this one holds the [`Server`], its inputs and
//! outputs; `registry` registration, addresses, presence and the table's
//! deltas; `requests` sessions' requests (authenticated, rate-limited,
//! answered once); `chat` saves, relays, punches and channel messages;
//! `mailbox` mail held and its bytes; `delivery` stored mail going out;
//! `routing` which server of several is a name's home; `cluster` what the
//! others did;
//! `probes` liveness probes; `commit` the batch under commit and its
//! promises; `events` what the server reports; [`links`] the Noise
//! sessions; [`limits`] rate limits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha12Rng;
use rand_core::{RngCore, SeedableRng};

use crate::crypto::{AT_REST_SALT, Keypair, PublicKey};
use crate::store::{
    Body, ChannelMail, ClientRecord, Loaded, MAIL_OVERHEAD, Outcome, StoreOp, StoredMail,
    at_rest_ad, channel_ad,
};
use crate::table::{ClientId, Directory};
use crate::timer::{TimerKey, TimerWheel};
use crate::wire::{
    self, Content, MailBody, MailId, Message, MsgId, Name, Refusal, Rejection, Seq, Text, What,
};
use crate::{RETRANSMIT, TICK, Transmit};

mod chat;
mod cluster;
mod commit;
mod delivery;
mod events;
mod holding;
pub mod limits;
pub mod links;
mod mailbox;
mod probes;
mod registry;
mod requests;
mod routing;

use chat::*;
pub use cluster::Remote;
use commit::*;
pub use events::{Census, ServerEvent, ServerStats, StoreFailure, Waiting};
pub use mailbox::MAIL_TTL;
use mailbox::*;
use probes::*;
use registry::*;
pub use registry::{DELTA_INTERVAL, NAME_TTL};
use requests::*;
pub use routing::home;
use routing::*;

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
    /// One of several servers sharing a store: the number the store gave
    /// this one, the low 16 bits of every mail id it gives out, so that
    /// two servers never give out the same id (`None`: alone, ids count
    /// 1, 2, 3…). The counter above them follows the highest id seen
    /// from any server (a Lamport clock), so ids stay in store order
    /// across servers, as closely as the servers hear of each other.
    pub instance: Option<u16>,
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
            .field("instance", &self.instance)
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
            instance: None,
        }
    }
}

/// Most queued datagrams the transmit queue keeps room for once empty (a
/// storm's burst is not kept for good).
const TRANSMITS_KEEP: usize = 256;
/// Most events queued for the log; older ones are dropped first.
const EVENT_QUEUE: usize = 1024;
/// How many hosts' ration of new names an IPv6 /48 gets.
const SITE_HOSTS: u32 = 16;
/// Sources whose new-name budget is remembered (about 100 bytes each).
const NAME_SOURCES: usize = 65_536;
/// Datagrams that waited longer than this in the socket mean the server is
/// behind: new handshakes are told "busy" (their answer would come close
/// to the client's 500 ms retry, which would only add to the queue, and the
/// key exchange is the costliest thing the server does).
pub const BUSY_AFTER: Duration = Duration::from_millis(400);
/// The wait a "busy" answer asks for: the queueing delay, within these
/// bounds (the client adds jitter and backs off on repeats).
const BUSY_WAIT: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

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
    /// The batch the driver is committing while the next one gathers
    /// ([`Server::seal_batch`]).
    sealed: Option<Seal>,
    /// Datagrams [`Server::poll_transmit`] has given out: `transmits[i]`
    /// is datagram number `sent + i`.
    sent: usize,
    /// The first datagram held back for a commit, by number (`None`:
    /// nothing is uncommitted, everything may leave).
    hold_from: Option<usize>,
    /// Operations a failed commit left over, committed before any new one.
    deferred: Vec<StoreOp>,
    /// Where in `deferred` each client's row waits.
    deferred_rows: HashMap<Name, usize>,
    /// Where in `deferred` each client's presence waits.
    deferred_presence: HashMap<Name, usize>,
    retry: Option<TimerKey>,
    /// A [`Timer::Deltas`] is armed.
    deltas_armed: bool,
    events: VecDeque<ServerEvent>,
    stats: ServerStats,
    /// The servers sharing the store, when there are several
    /// ([`Server::set_servers`]).
    cluster: Option<Cluster>,
    /// Rows online at another server of the cluster, and which.
    remote: HashMap<ClientId, SocketAddr>,
    /// Each name's latest claim in the cluster: its epoch and the server
    /// that made it ([`Server::handle_remote`]).
    epochs: HashMap<ClientId, (u64, SocketAddr)>,
    /// One of several servers: the mailboxes it holds in full (see
    /// [`holding`]).
    full: HashSet<ClientId>,
    /// Mailboxes being fetched, and the requests waiting for them.
    loading: HashMap<ClientId, Vec<Waiter>>,
    /// Mailboxes to fetch: [`Server::poll_mailboxes`].
    loads: VecDeque<ClientId>,
    /// Messages waiting in mailboxes this server does not hold, as it
    /// counted them (the others' from the feed, its own channel copies):
    /// what a channel message's fan-out checks their limit against.
    waiting: HashMap<ClientId, holding::Waiting>,
    /// The channel copies counted in `waiting` for the batch committed
    /// last: uncounted if the store kept another server's copies instead.
    counted_last: Vec<(MailId, ClientId)>,
    /// Mailboxes to fetch once more after the commit of every message
    /// below the id given (see [`Server::handle_mailboxes`]).
    refetch: Vec<(ClientId, MailId)>,
    /// The session whose registration is being taken with its mailbox
    /// just fetched (or none to fetch): not fetched again.
    fresh: Option<LinkId>,
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
            sealed: None,
            sent: 0,
            hold_from: None,
            deferred: Vec::new(),
            deferred_rows: HashMap::new(),
            deferred_presence: HashMap::new(),
            retry: None,
            deltas_armed: false,
            events: VecDeque::new(),
            stats: ServerStats::default(),
            cluster: None,
            remote: HashMap::new(),
            epochs: HashMap::new(),
            full: HashSet::new(),
            loading: HashMap::new(),
            loads: VecDeque::new(),
            waiting: HashMap::new(),
            counted_last: Vec::new(),
            refetch: Vec::new(),
            fresh: None,
            config,
        };
        // A row without a "last seen" (older than schema 3) counts from now.
        let unix = server.unix_time(now);
        for c in &loaded.clients {
            if let Some(id) = server.row(&c.name, c.addr, c.key.unwrap_or(PublicKey::NONE)) {
                server.sessions.seen[id.index() as usize] = c.seen_at.unwrap_or(unix);
            }
        }
        // One of several servers loads no mail (it fetches a mailbox when
        // it needs one): its ids still go past every id in the store.
        if let Some(highest) = loaded.highest_mail {
            server.next_mail = server.next_mail.max(server.counter_of(highest) + 1);
        }
        for m in loaded.mail {
            server.hold_committed(m, true);
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

    /// The next datagram to send, or `None` (also while the next one
    /// waits for store operations to be committed: every datagram made
    /// while any is uncommitted waits for the commit of the batch it was
    /// made with, see [`Server::seal_batch`]).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.uncommitted > 0 || !self.store_ops.is_empty() {
            // Everything queued now waits for the operations.
            let from = *self.hold_from.get_or_insert(self.sent);
            if self.sent >= from {
                return None;
            }
        }
        while self.transmits.is_empty() {
            let to = self.fanout.pop_front()?;
            self.pump(self.now, to);
        }
        let next = self.transmits.pop_front();
        self.sent += 1;
        if self.transmits.is_empty() && self.transmits.capacity() > TRANSMITS_KEEP {
            self.transmits.shrink_to(TRANSMITS_KEEP);
        }
        next
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
            && self.sealed.is_none()
            && self.transmits.is_empty()
            && self.fanout.is_empty()
            && self.fetches.is_empty()
            && self.loading.is_empty()
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

    /// The mail id of counter value `n` (see [`ServerConfig::instance`]).
    fn mail_id_of(&self, n: u64) -> MailId {
        match self.config.instance {
            None => MailId(n),
            Some(i) => MailId(n << 16 | u64::from(i)),
        }
    }

    /// The counter value of mail id `mail`, whichever server gave it out.
    fn counter_of(&self, mail: MailId) -> u64 {
        match self.config.instance {
            None => mail.0,
            Some(_) => mail.0 >> 16,
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
