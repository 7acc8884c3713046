//! The registry server as a sans-IO state machine.
//!
//! It keeps the client table ([`Directory`]), one session per row (token,
//! reply cache, liveness probe, mail deliveries in flight) and every mailbox
//! in memory. Datagrams and time come in through `handle_*`; datagrams,
//! storage operations and log events go out through `poll_*`.
//!
//! Durability rule: while any [`StoreOp`] is uncommitted, no datagram leaves
//! ([`Server::poll_transmit`] returns `None`). The driver commits the batch
//! and calls [`Server::handle_committed`], so every ack that promises "saved"
//! follows its write to disk, and replies keep the order they were made in.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha12Rng;
use rand_core::{RngCore, SeedableRng};

use crate::store::{Loaded, StoreOp, StoredMail};
use crate::table::{ClientId, Directory};
use crate::timer::{TimerKey, TimerWheel};
use crate::wire::{self, MailId, Message, MsgId, Name, Refusal, Seq, Text, Token};
use crate::{RETRANSMIT, TICK, Transmit};

/// Limits and seeds for a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Seeds session tokens and probe nonces. Use 32 bytes from the OS in
    /// production; a fixed seed makes a simulation reproducible.
    pub seed: [u8; 32],
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
}

impl ServerConfig {
    /// Defaults: 100,000 clients, 1,000 messages or 1 MiB per mailbox,
    /// 256 MiB in all.
    pub fn new(seed: [u8; 32], clock: (Instant, i64)) -> Self {
        ServerConfig {
            seed,
            clock,
            max_clients: 100_000,
            mailbox_messages: 1000,
            mailbox_bytes: 1 << 20,
            store_bytes: 256 << 20,
            presence_timeout: Duration::from_secs(30),
        }
    }
}

/// Something worth a line in the server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A client registered (or logged back in) from an address.
    Registered(Name, SocketAddr),
    /// A client went offline: `true` when it said so (dereg), `false` when a
    /// probe found it silent.
    Offline(Name, bool),
    /// A message was stored for a recipient.
    Stored {
        /// The recipient.
        to: Name,
        /// The sender.
        from: Name,
        /// A channel message.
        channel: bool,
    },
    /// A registration for a name held by a live client was refused.
    Rejected(Name, SocketAddr),
    /// A recipient's mailbox was full, so it did not get a channel message.
    MailboxFull(Name),
    /// A datagram was dropped as undecodable.
    Malformed(SocketAddr, wire::WireError),
}

/// Counters of dropped input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Datagrams that did not decode.
    pub malformed: u64,
    /// Requests ignored: bad token, wrong source address, or a bound reached.
    pub ignored: u64,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Resend the probe or declare the client silent.
    Probe(ClientId),
    /// Resend a delivery or check the client's liveness.
    Delivery(ClientId, MailId),
    /// Has the client been heard from lately?
    Presence(ClientId),
}

#[derive(Debug, Clone)]
enum Cached {
    /// Being worked on (probe or commit pending): retries are ignored.
    Pending,
    /// The encoded reply (replies are small; the datagram, not a `Message`
    /// with its inline 1000-byte text buffer, is what is kept).
    Done(Vec<u8>),
}

#[derive(Debug)]
enum Waiter {
    /// A save-message for the probed client.
    Save {
        from: ClientId,
        seq: Seq,
        mail: Box<NewMail>,
    },
    /// A registration that would take the probed client's name.
    Register { addr: SocketAddr, seq: Seq },
}

#[derive(Debug, Clone)]
struct NewMail {
    from: Name,
    id: MsgId,
    text: Text,
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

#[derive(Debug)]
struct Inflight {
    pos: Option<u32>,
    sent: u8,
    timer: TimerKey,
}

#[derive(Debug, Default)]
struct Session {
    token: Option<Token>,
    replies: VecDeque<(Seq, Cached)>,
    probe: Option<Probe>,
    queue: VecDeque<(MailId, Option<u32>)>,
    inflight: BTreeMap<MailId, Inflight>,
    rounds: u8,
    /// The welcome that opened the current mail batch.
    batch: Seq,
    /// When an authenticated datagram last came from the client.
    last_heard: Option<Instant>,
    presence: Option<TimerKey>,
}

#[derive(Debug, Default)]
struct Mailbox {
    mail: BTreeMap<MailId, StoredMail>,
    keys: HashSet<(Name, MsgId)>,
    bytes: usize,
}

/// The registry server. See the [crate docs](crate) for the driving loop.
pub struct Server {
    config: ServerConfig,
    rng: ChaCha12Rng,
    table: Directory,
    /// `sessions[i]` belongs to table row `i`: rows are never removed and a
    /// session is pushed with every row, so a `ClientId` indexes both.
    sessions: Vec<Session>,
    tokens: HashMap<Token, ClientId>,
    probes: HashMap<u64, ClientId>,
    mailboxes: HashMap<ClientId, Mailbox>,
    stored_bytes: usize,
    next_mail: u64,
    timers: TimerWheel<Timer>,
    transmits: VecDeque<Transmit>,
    store_ops: VecDeque<StoreOp>,
    uncommitted: usize,
    events: VecDeque<ServerEvent>,
    stats: ServerStats,
}

impl Server {
    /// A server with the registry and mailboxes a [`Store`](crate::store::Store)
    /// loaded: every known client starts offline (at its last known address)
    /// until it is heard from again.
    pub fn new(config: ServerConfig, now: Instant, loaded: Loaded) -> Server {
        let mut server = Server {
            rng: ChaCha12Rng::from_seed(config.seed),
            table: Directory::new(config.max_clients),
            sessions: Vec::new(),
            tokens: HashMap::new(),
            probes: HashMap::new(),
            mailboxes: HashMap::new(),
            stored_bytes: 0,
            next_mail: 1,
            timers: TimerWheel::new(now, TICK),
            transmits: VecDeque::new(),
            store_ops: VecDeque::new(),
            uncommitted: 0,
            events: VecDeque::new(),
            stats: ServerStats::default(),
            config,
        };
        for (name, addr) in &loaded.clients {
            server.row(name, *addr);
        }
        // Mail for a name the registry lacks (a store edited by hand) still
        // gets a row, so it is not lost.
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        for m in loaded.mail {
            let Some(to) = server.row(&m.to, unknown) else {
                continue;
            };
            server.next_mail = server.next_mail.max(m.mail.0 + 1);
            server.stored_bytes += m.size();
            let mb = server.mailboxes.entry(to).or_default();
            mb.bytes += m.size();
            mb.keys.insert((m.from.clone(), m.id));
            mb.mail.insert(m.mail, m);
        }
        // Loading is not a change anyone needs to hear about.
        let _ = server.table.take_deltas();
        server
    }

    /// Feeds one datagram received from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let msg = match wire::decode(data) {
            Ok(msg) => msg,
            Err(e) => {
                self.stats.malformed += 1;
                self.event(ServerEvent::Malformed(from, e));
                return;
            }
        };
        match msg {
            Message::Register { seq, name } => self.on_register(now, from, seq, name),
            Message::Deregister { seq, token } => {
                if let Some(id) = self.request(now, from, token, seq) {
                    if self.table.get(id).online {
                        self.set_offline(id, true);
                    }
                    self.reply(id, seq, Message::Ack { seq });
                }
            }
            Message::SaveMessage {
                seq,
                token,
                to,
                id,
                text,
            } => {
                if let Some(sender) = self.online_request(now, from, token, seq) {
                    let mail = NewMail {
                        from: self.table.get(sender).name.clone(),
                        id,
                        text,
                    };
                    self.on_save(now, sender, seq, to, mail);
                }
            }
            Message::ChannelSend {
                seq,
                token,
                id,
                text,
            } => {
                if let Some(sender) = self.online_request(now, from, token, seq) {
                    self.on_channel(now, sender, seq, id, text);
                }
            }
            Message::Sync {
                seq,
                token,
                since,
                from: row,
            } => {
                if let Some(id) = self.online_request(now, from, token, seq) {
                    let (entries, next) = self.table.page(since, row);
                    let version = self.table.version();
                    self.forget(id, seq);
                    self.send(
                        from,
                        &Message::Page {
                            seq,
                            version,
                            entries,
                            next,
                        },
                    );
                }
            }
            Message::Heartbeat { seq, token, .. } => {
                if let Some(id) = self.online_request(now, from, token, seq) {
                    self.forget(id, seq);
                    let version = self.table.version();
                    self.send(from, &Message::Alive { seq, version });
                }
            }
            Message::Delivered { token, mail } => {
                if let Some(id) = self.authenticate(now, from, token) {
                    self.on_delivered(now, id, mail);
                }
            }
            Message::ProbeReply { nonce } => self.on_probe_reply(now, from, nonce),
            // Server-bound traffic only; anything else is a confused or
            // hostile peer.
            _ => self.stats.ignored += 1,
        }
    }

    /// Handles every timer due at `now`. Spurious calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.poll_expired(now) {
            match timer {
                Timer::Probe(id) => self.on_probe_timer(now, id),
                Timer::Delivery(id, mail) => self.on_delivery_timer(now, id, mail),
                Timer::Presence(id) => self.on_presence_timer(now, id),
            }
        }
    }

    /// The driver committed every [`StoreOp`] polled so far: release the
    /// datagrams held behind them.
    pub fn handle_committed(&mut self) {
        self.uncommitted = 0;
    }

    /// The next datagram to send, or `None` (also while store operations
    /// are waiting to be committed).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.uncommitted > 0 || !self.store_ops.is_empty() {
            return None;
        }
        self.flush_deltas();
        self.transmits.pop_front()
    }

    /// The next storage operation to commit.
    #[must_use]
    pub fn poll_store(&mut self) -> Option<StoreOp> {
        let op = self.store_ops.pop_front()?;
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

    /// Nothing under way but presence tracking: no probe, no delivery in
    /// flight or queued, nothing to store or send. (Costs a pass over the
    /// clients.)
    pub fn is_idle(&self) -> bool {
        self.probes.is_empty()
            && self.store_ops.is_empty()
            && self.uncommitted == 0
            && self.transmits.is_empty()
            && self
                .sessions
                .iter()
                .all(|s| s.inflight.is_empty() && s.queue.is_empty())
    }

    /// The client table.
    pub fn table(&self) -> &Directory {
        &self.table
    }

    /// Messages waiting for `name`, in store order.
    pub fn mailbox(&self, name: &Name) -> impl Iterator<Item = &StoredMail> {
        self.table
            .lookup(name)
            .and_then(|id| self.mailboxes.get(&id))
            .into_iter()
            .flat_map(|mb| mb.mail.values())
    }

    /// Total bytes held in mailboxes.
    pub fn stored_bytes(&self) -> usize {
        self.stored_bytes
    }

    /// Dropped-input counters.
    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    // ---- requests ---------------------------------------------------------

    fn on_register(&mut self, now: Instant, from: SocketAddr, seq: Seq, name: Name) {
        let Some(id) = self.table.lookup(&name) else {
            match self.table.insert(name.clone(), from, false) {
                Ok(id) => {
                    self.sessions.push(Session::default());
                    self.accept(now, id, from, seq);
                }
                // No row, so no session to cache in: a retry is refused again.
                Err(_) => self.send(
                    from,
                    &Message::Refused {
                        seq,
                        reason: Refusal::Busy,
                    },
                ),
            }
            return;
        };
        let entry = self.table.get(id);
        let (same_addr, online) = (entry.addr == from, entry.online);
        if same_addr && self.cached(id, seq) {
            return;
        }
        if !online || same_addr {
            self.accept(now, id, from, seq);
            return;
        }
        // Held by a client at another address: only a silent holder loses it.
        let waiting = self.sessions[id.index() as usize].probe.as_ref().is_some_and(|p| {
            p.waiters
                .iter()
                .any(|w| matches!(w, Waiter::Register { addr, seq: s } if *addr == from && *s == seq))
        });
        if !waiting {
            self.wait_for_probe(now, id, Waiter::Register { addr: from, seq });
        }
    }

    fn on_save(&mut self, now: Instant, sender: ClientId, seq: Seq, to: Name, mail: NewMail) {
        let Some(to) = self.table.lookup(&to) else {
            let reason = Refusal::UnknownRecipient;
            self.reply(sender, seq, Message::Refused { seq, reason });
            return;
        };
        self.pending(sender, seq);
        if self.table.get(to).online {
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
        // A probe may just have marked the recipient offline: everyone,
        // the sender included, hears of it before the sender hears "saved".
        self.flush_deltas();
        let reply = match self.put(now, to, mail, false) {
            Ok(mail) => {
                // The recipient may be online again by now (it came back
                // while the probe ran): then it gets the message at once.
                if let Some(mail) = mail {
                    self.deliver_live(now, to, mail);
                }
                Message::Ack { seq }
            }
            Err(reason) => Message::Refused { seq, reason },
        };
        self.reply(sender, seq, reply);
    }

    fn on_channel(&mut self, now: Instant, sender: ClientId, seq: Seq, id: MsgId, text: Text) {
        let from = self.table.get(sender).name.clone();
        let recipients: Vec<ClientId> = self
            .table
            .iter()
            .map(|(r, _)| r)
            .filter(|&r| r != sender)
            .collect();
        // Every recipient gets a stored copy first, so an online one that
        // never acks (or a crash mid fan-out) still finds it in its mailbox;
        // its ack deletes the copy. If the store as a whole cannot take a
        // copy for everyone, the message is refused: never acked half-kept.
        let size = text.as_str().len() + crate::store::MAIL_OVERHEAD;
        let needed = size.saturating_mul(recipients.len());
        if self.stored_bytes.saturating_add(needed) > self.config.store_bytes {
            let reason = Refusal::MailboxFull;
            self.reply(sender, seq, Message::Refused { seq, reason });
            return;
        }
        for r in recipients {
            let mail = NewMail {
                from: from.clone(),
                id,
                text: text.clone(),
            };
            match self.put(now, r, mail, true) {
                Ok(Some(mail)) => self.deliver_live(now, r, mail),
                Ok(None) => {}
                // This recipient's own mailbox is full: it misses the
                // message (logged), as a full mailbox bounces direct mail.
                Err(_) => {
                    let to = self.table.get(r).name.clone();
                    self.event(ServerEvent::MailboxFull(to));
                }
            }
        }
        self.reply(sender, seq, Message::Ack { seq });
    }

    /// Sends a just-stored message to its recipient now if it is online.
    fn deliver_live(&mut self, now: Instant, to: ClientId, mail: MailId) {
        if self.table.get(to).online {
            self.sessions[to.index() as usize]
                .queue
                .push_back((mail, None));
            self.pump(now, to);
        }
    }

    fn on_delivered(&mut self, now: Instant, id: ClientId, mail: MailId) {
        let session = &mut self.sessions[id.index() as usize];
        if let Some(inflight) = session.inflight.remove(&mail) {
            self.timers.cancel(inflight.timer);
            session.rounds = 0;
        }
        self.delete(id, mail);
        self.pump(now, id);
    }

    fn on_probe_reply(&mut self, now: Instant, from: SocketAddr, nonce: u64) {
        let Some(&id) = self.probes.get(&nonce) else {
            self.stats.ignored += 1;
            return;
        };
        if self.table.get(id).addr != from {
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
                Waiter::Register { addr, seq } => {
                    let name = self.table.get(id).name.clone();
                    self.event(ServerEvent::Rejected(name, addr));
                    self.send(addr, &Message::Rejected { seq });
                }
            }
        }
    }

    // ---- timers -----------------------------------------------------------

    fn on_probe_timer(&mut self, now: Instant, id: ClientId) {
        let session = &mut self.sessions[id.index() as usize];
        let Some(probe) = session.probe.as_mut() else {
            return;
        };
        if probe.sent < 2 {
            probe.sent += 1;
            probe.timer = self.timers.insert(now + RETRANSMIT, Timer::Probe(id));
            let msg = Message::Probe {
                nonce: probe.nonce,
                name: self.table.get(id).name.clone(),
            };
            let to = self.table.get(id).addr;
            self.send(to, &msg);
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
                Waiter::Register { addr, seq } => {
                    if !self.table.get(id).online {
                        self.accept(now, id, addr, seq);
                    }
                }
            }
        }
    }

    fn on_delivery_timer(&mut self, now: Instant, id: ClientId, mail: MailId) {
        let session = &mut self.sessions[id.index() as usize];
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
        if !self.table.get(id).online {
            return;
        }
        let heard = session.last_heard.unwrap_or(now);
        let due = heard + self.config.presence_timeout;
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
        let session = &mut self.sessions[id.index() as usize];
        session.last_heard = Some(now);
        if session.presence.is_none() && self.table.get(id).online {
            let due = now + self.config.presence_timeout;
            session.presence = Some(self.timers.insert(due, Timer::Presence(id)));
        }
    }

    // ---- sessions ---------------------------------------------------------

    /// The session a token belongs to, if the datagram comes from the
    /// address registered for it (an off-path host cannot act for a client).
    fn authenticate(&mut self, now: Instant, from: SocketAddr, token: Token) -> Option<ClientId> {
        match self.tokens.get(&token) {
            Some(&id) if self.table.get(id).addr == from => {
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
    fn request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        token: Token,
        seq: Seq,
    ) -> Option<ClientId> {
        let Some(id) = self.authenticate(now, from, token) else {
            // A token this server never issued (it restarted): say so, and
            // the client knows it is not registered here.
            if !self.tokens.contains_key(&token) {
                self.refuse_session(from, seq);
            }
            return None;
        };
        if self.cached(id, seq) {
            return None;
        }
        Some(id)
    }

    /// [`Server::request`] for requests that need the client online; an
    /// offline one is told its session is gone (it re-registers).
    fn online_request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        token: Token,
        seq: Seq,
    ) -> Option<ClientId> {
        let id = self.request(now, from, token, seq)?;
        if !self.table.get(id).online {
            self.refuse_session(from, seq);
            return None;
        }
        Some(id)
    }

    /// "Unknown session": the client re-registers by itself.
    fn refuse_session(&mut self, to: SocketAddr, seq: Seq) {
        let reason = Refusal::UnknownSession;
        self.send(to, &Message::Refused { seq, reason });
    }

    /// If `seq` was seen: resend its reply (or ignore it while pending).
    fn cached(&mut self, id: ClientId, seq: Seq) -> bool {
        let session = &self.sessions[id.index() as usize];
        let Some((_, cached)) = session.replies.iter().find(|(s, _)| *s == seq) else {
            return false;
        };
        if let Cached::Done(payload) = cached {
            let to = self.table.get(id).addr;
            self.transmits.push_back(Transmit {
                to,
                payload: payload.clone(),
            });
        }
        true
    }

    fn pending(&mut self, id: ClientId, seq: Seq) {
        let replies = &mut self.sessions[id.index() as usize].replies;
        if replies.len() == REPLY_CACHE {
            replies.pop_front();
        }
        replies.push_back((seq, Cached::Pending));
    }

    /// Drops `seq` from the cache (idempotent reads need no cached reply).
    fn forget(&mut self, id: ClientId, seq: Seq) {
        self.sessions[id.index() as usize]
            .replies
            .retain(|(s, _)| *s != seq);
    }

    /// Sends `msg` to the client's registered address and caches it for
    /// retransmitted requests.
    fn reply(&mut self, id: ClientId, seq: Seq, msg: Message) {
        let payload = wire::encode_to_vec(&msg);
        let replies = &mut self.sessions[id.index() as usize].replies;
        match replies.iter_mut().find(|(s, _)| *s == seq) {
            Some((_, cached)) => *cached = Cached::Done(payload.clone()),
            None => {
                if replies.len() == REPLY_CACHE {
                    replies.pop_front();
                }
                replies.push_back((seq, Cached::Done(payload.clone())));
            }
        }
        let to = self.table.get(id).addr;
        self.transmits.push_back(Transmit { to, payload });
    }

    /// Marks the client online at `addr`, welcomes it and starts streaming
    /// its mailbox.
    fn accept(&mut self, now: Instant, id: ClientId, addr: SocketAddr, seq: Seq) {
        let entry = self.table.get(id);
        // Same live session again (a restarted process on the same port, or
        // a retry): keep its token, so registering is idempotent.
        let keep = entry.online && entry.addr == addr;
        let name = entry.name.clone();
        let token = match self.sessions[id.index() as usize].token {
            Some(token) if keep => token,
            old => {
                if let Some(old) = old {
                    self.tokens.remove(&old);
                }
                let mut token = Token([0; 16]);
                self.rng.fill_bytes(&mut token.0);
                self.tokens.insert(token, id);
                token
            }
        };
        if !keep {
            // The registry: who may have mail, and where it was last seen.
            self.store_ops.push_back(StoreOp::Client {
                name: name.clone(),
                addr,
            });
        }
        self.table.set(id, addr, true);
        self.cancel_deliveries(id);
        let mail: Vec<MailId> = self
            .mailboxes
            .get(&id)
            .map(|mb| mb.mail.keys().copied().collect())
            .unwrap_or_default();
        let session = &mut self.sessions[id.index() as usize];
        session.token = Some(token);
        session.rounds = 0;
        session.batch = seq;
        session.queue = mail
            .iter()
            .enumerate()
            .map(|(i, &m)| (m, Some(i as u32)))
            .collect();
        let welcome = Message::Welcome {
            seq,
            token,
            version: self.table.version(),
            mail: mail.len() as u32,
        };
        self.reply(id, seq, welcome);
        self.event(ServerEvent::Registered(name, addr));
        self.heard(now, id);
        // Queued after the welcome, so the client learns the batch size first.
        self.pump(now, id);
    }

    /// Marks the client offline, tells everyone (via the next delta) and
    /// stops its deliveries; its mail stays.
    fn set_offline(&mut self, id: ClientId, notified: bool) {
        let entry = self.table.get(id);
        let (addr, name) = (entry.addr, entry.name.clone());
        self.table.set(id, addr, false);
        self.cancel_deliveries(id);
        self.event(ServerEvent::Offline(name, notified));
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
                let entry = self.table.get(id);
                let msg = Message::Probe {
                    nonce,
                    name: entry.name.clone(),
                };
                let to = entry.addr;
                self.send(to, &msg);
                Probe {
                    nonce,
                    sent: 1,
                    timer,
                    waiters: Vec::new(),
                    deliveries: false,
                }
            }
        };
        self.sessions[id.index() as usize].probe.insert(probe)
    }

    // ---- mail -------------------------------------------------------------

    /// Stores a message for `to` unless it is already there (a retry).
    /// `Ok(Some(id))` for a new message, `Ok(None)` for a duplicate.
    fn put(
        &mut self,
        now: Instant,
        to: ClientId,
        mail: NewMail,
        channel: bool,
    ) -> Result<Option<MailId>, Refusal> {
        let stored = StoredMail {
            mail: MailId(self.next_mail),
            to: self.table.get(to).name.clone(),
            from: mail.from,
            channel,
            stored_at: self.unix_time(now),
            id: mail.id,
            text: mail.text.as_str().to_string(),
        };
        let mb = self.mailboxes.entry(to).or_default();
        if mb.keys.contains(&(stored.from.clone(), stored.id)) {
            return Ok(None);
        }
        let size = stored.size();
        if mb.mail.len() >= self.config.mailbox_messages
            || mb.bytes + size > self.config.mailbox_bytes
            || self.stored_bytes + size > self.config.store_bytes
        {
            return Err(Refusal::MailboxFull);
        }
        self.next_mail += 1;
        mb.bytes += size;
        mb.keys.insert((stored.from.clone(), stored.id));
        mb.mail.insert(stored.mail, stored.clone());
        self.stored_bytes += size;
        let id = stored.mail;
        self.event(ServerEvent::Stored {
            to: stored.to.clone(),
            from: stored.from.clone(),
            channel,
        });
        self.store_ops.push_back(StoreOp::Put(stored));
        Ok(Some(id))
    }

    fn delete(&mut self, to: ClientId, mail: MailId) {
        let Some(mb) = self.mailboxes.get_mut(&to) else {
            return;
        };
        let Some(m) = mb.mail.remove(&mail) else {
            return;
        };
        mb.bytes -= m.size();
        mb.keys.remove(&(m.from.clone(), m.id));
        self.stored_bytes -= m.size();
        self.store_ops.push_back(StoreOp::Delete { to: m.to, mail });
    }

    /// Sends queued deliveries while the window has room.
    fn pump(&mut self, now: Instant, id: ClientId) {
        loop {
            let session = &mut self.sessions[id.index() as usize];
            if session.inflight.len() >= DELIVERY_WINDOW {
                return;
            }
            let Some((mail, pos)) = session.queue.pop_front() else {
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
        let Some(m) = self.mailboxes.get(&id).and_then(|mb| mb.mail.get(&mail)) else {
            return;
        };
        // Checked on the way in; a store edited by hand may hold anything.
        let Ok(text) = Text::new(&m.text) else {
            return;
        };
        let batch = self.sessions[id.index() as usize].batch;
        let msg = Message::Deliver {
            mail,
            batch,
            pos,
            from: m.from.clone(),
            channel: m.channel,
            stored_at: m.stored_at,
            id: m.id,
            text,
        };
        let to = self.table.get(id).addr;
        self.send(to, &msg);
    }

    fn cancel_deliveries(&mut self, id: ClientId) {
        let session = &mut self.sessions[id.index() as usize];
        session.queue.clear();
        for (_, f) in std::mem::take(&mut session.inflight) {
            self.timers.cancel(f.timer);
        }
    }

    // ---- plumbing ---------------------------------------------------------

    /// The row for `name`, created offline at `addr` if missing.
    fn row(&mut self, name: &Name, addr: SocketAddr) -> Option<ClientId> {
        if let Some(id) = self.table.lookup(name) {
            return Some(id);
        }
        let id = self.table.insert(name.clone(), addr, false).ok()?;
        self.sessions.push(Session::default());
        Some(id)
    }

    fn send(&mut self, to: SocketAddr, msg: &Message) {
        self.transmits.push_back(Transmit {
            to,
            payload: wire::encode_to_vec(msg),
        });
    }

    /// Turns the table changes made since the last flush into deltas for
    /// every online client: bursts coalesce into one update per drain.
    fn flush_deltas(&mut self) {
        let deltas = self.table.take_deltas();
        if deltas.is_empty() {
            return;
        }
        let online: Vec<SocketAddr> = self
            .table
            .iter()
            .filter(|(_, e)| e.online)
            .map(|(_, e)| e.addr)
            .collect();
        for delta in deltas {
            let msg = Message::Delta {
                prev: delta.prev,
                version: delta.version,
                entries: delta.entries,
            };
            let payload = wire::encode_to_vec(&msg);
            for &to in &online {
                self.transmits.push_back(Transmit {
                    to,
                    payload: payload.clone(),
                });
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
