//! Chaos end to end: real `udpchat` processes talk through a seeded UDP
//! proxy on loopback that drops, duplicates and reorders datagrams (the
//! kernel here has no netem), and assignment scenarios must still end
//! correctly.
//!
//! With loss the exact line sequence may change (a direct message can end in
//! `[No ACK from Bob, …]`, `[Client Bob exists!!]`, `[Message received by
//! Bob.]`), so these tests assert outcomes: every send ends in exactly one of
//! the endings the specification allows, every message reported received or
//! saved is shown exactly once by its recipient (after `reg` for saved ones),
//! and nothing is ever shown twice.
//!
//! The seed of the proxy's generator is in every failure message; set
//! `UDPCHAT_CHAOS_SEED` to run with another one. Timing still varies from run
//! to run, so a seed narrows a failure down rather than replaying it exactly.

mod common;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{BYE, Client, DEADLINE, MAIL, SAVED, Server, TABLE, WELCOME, line_matches};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

// ---------------------------------------------------------------------------
// The proxy.

/// How the proxy mistreats datagrams. Probabilities are per mille.
#[derive(Debug, Clone, Copy)]
struct Chaos {
    seed: u64,
    /// Client↔client datagrams dropped.
    peer_drop: u32,
    /// Datagrams to or from the server dropped, at most one per
    /// [`Chaos::server_gap`] on each client↔server pair.
    server_drop: u32,
    /// The server pairs' loss is bounded in bursts: a request is tried 5
    /// times and a probe twice within 500 ms, and by design the protocol
    /// concludes "server gone" or "client gone" when they all fail. With
    /// unbounded loss that honest verdict comes up every few hundred
    /// requests, which would make this test flaky without testing anything
    /// more. One drop per second per pair still loses a request, its answer,
    /// a probe or a table delta at any moment, but never a whole window.
    /// Client↔client loss is unbounded: every ending of a direct message is
    /// covered by the test's accepted outcomes.
    server_gap: Duration,
    /// Datagrams sent twice (the copy with its own delay).
    duplicate: u32,
    /// Datagrams held back a little, so that later ones overtake them.
    reorder: u32,
    /// The longest hold (well under the 250 ms retransmission interval, so
    /// a held datagram is reordered, not lost).
    max_delay: Duration,
}

impl Chaos {
    fn new(seed: u64) -> Chaos {
        Chaos {
            seed,
            peer_drop: 200,
            server_drop: 300,
            server_gap: Duration::from_secs(1),
            duplicate: 100,
            reorder: 200,
            max_delay: Duration::from_millis(40),
        }
    }
}

/// What happened to the datagrams of one class of pair.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    received: u64,
    dropped: u64,
    blackholed: u64,
    duplicated: u64,
    delayed: u64,
    sent: u64,
    /// Lost to a full queue or a failed send (should stay 0).
    overflow: u64,
}

impl Counts {
    fn loss_percent(&self) -> f64 {
        if self.received == 0 {
            return 0.0;
        }
        100.0 * (self.dropped + self.blackholed) as f64 / self.received as f64
    }
}

/// Counts for the client↔server and the client↔client pairs.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    server: Counts,
    peer: Counts,
    /// Datagrams from an unknown source when every socket was taken.
    refused: u64,
    endpoints: usize,
}

/// The proxy cannot read encrypted datagrams, so it knows a save-message
/// request by its size: its sealed body (an ephemeral key, a tag and the
/// message) makes it at least ~110 bytes, while everything else a client
/// sends the server in these tests (heartbeats, syncs, acks, a short
/// registration or channel message) stays under 100.
const SAVE_MESSAGE_MIN: usize = 100;

/// Scripted loss: every datagram from real port `from` to real port `to`
/// is dropped until real port `until` sends a save-message request (its
/// fallback to the server) through the proxy. Copies the chaos makes are
/// dropped alike, so the whole first try of a direct message is lost,
/// however many datagrams it took.
#[derive(Debug)]
struct Blackhole {
    from: u16,
    to: u16,
    until: u16,
}

#[derive(Debug, Default)]
struct Shared {
    stats: Stats,
    blackholes: Vec<Blackhole>,
}

/// Most endpoints (server, clients) the proxy stands in for.
const MAX_ENDPOINTS: usize = 32;
/// Most datagrams held at once; past it they are dropped and counted.
const MAX_QUEUE: usize = 4096;
/// The proxy stops by itself after this long even if nobody stops it.
const LIFETIME: Duration = Duration::from_secs(300);
/// Longest sleep of the proxy thread with nothing to do.
const IDLE: Duration = Duration::from_secs(1);
/// Datagrams read from one socket per turn.
const BURST: usize = 256;
const WAKE: Token = Token(usize::MAX);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A seeded lossy relay with one socket per real endpoint.
///
/// Socket `P_x` stands for endpoint `x`: whatever arrives at `P_x` from a
/// real endpoint `y` goes on to `x` from `P_y`. So `x` sees `P_y` as `y`'s
/// address: the server records `P_y` in its table, peers send to `P_y`, and
/// every datagram — client↔server and client↔client — crosses the proxy.
/// `P_server` is created up front (clients are told it is the server);
/// `P_y` for a client is created when `y`'s first datagram (its
/// registration) arrives, before anyone can learn `P_y`.
struct Proxy {
    front: u16,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    waker: Waker,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy in front of the server on `server_port`.
    fn start(server_port: u16, chaos: Chaos) -> Proxy {
        let poll = Poll::new().expect("proxy poll");
        let waker = Waker::new(poll.registry(), WAKE).expect("proxy waker");
        let mut front = UdpSocket::bind(loopback(0)).expect("bind proxy front");
        poll.registry()
            .register(&mut front, Token(0), Interest::READABLE)
            .expect("register proxy front");
        let port = front.local_addr().expect("proxy front address").port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let server = loopback(server_port);
        let mut relay = Relay {
            poll,
            sockets: vec![front],
            real: vec![server],
            by_real: HashMap::from([(server, 0)]),
            queue: BinaryHeap::new(),
            next: 0,
            rng: ChaCha8Rng::seed_from_u64(chaos.seed),
            chaos,
            last_server_drop: HashMap::new(),
            shared: Arc::clone(&shared),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || relay.run(&stop))
        };
        Proxy {
            front: port,
            shared,
            stop,
            waker,
            thread: Some(thread),
        }
    }

    /// The port clients use as "the server".
    fn port(&self) -> u16 {
        self.front
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        // A poisoned lock only means the relay thread panicked; the counts
        // are still worth reporting.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every datagram from real port `from` to real port `to` until
    /// real port `until` falls back to the server (see [`Blackhole`]).
    fn blackhole(&self, from: u16, to: u16, until: u16) {
        self.shared().blackholes.push(Blackhole { from, to, until });
    }

    fn stats(&self) -> Stats {
        self.shared().stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A datagram waiting for its release time.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    at: Instant,
    /// Arrival order, so that equal release times keep it.
    n: u64,
    from: usize,
    to: usize,
    data: Vec<u8>,
}

/// The proxy thread's state.
struct Relay {
    poll: Poll,
    /// `sockets[i]` stands for the real endpoint `real[i]`.
    sockets: Vec<UdpSocket>,
    real: Vec<SocketAddr>,
    by_real: HashMap<SocketAddr, usize>,
    queue: BinaryHeap<Reverse<Held>>,
    next: u64,
    rng: ChaCha8Rng,
    chaos: Chaos,
    /// Last random drop on each client↔server pair (by socket indexes).
    last_server_drop: HashMap<(usize, usize), Instant>,
    shared: Arc<Mutex<Shared>>,
}

fn chance(rng: &mut ChaCha8Rng, per_mille: u32) -> bool {
    rng.next_u32() % 1000 < per_mille
}

impl Relay {
    fn run(&mut self, stop: &AtomicBool) {
        let started = Instant::now();
        let mut events = Events::with_capacity(64);
        let mut buf = vec![0u8; 2048];
        let mut backlog = false;
        while !stop.load(Ordering::Relaxed) && started.elapsed() < LIFETIME {
            let now = Instant::now();
            let timeout = if backlog {
                Duration::ZERO
            } else {
                self.queue
                    .peek()
                    .map_or(IDLE, |Reverse(h)| h.at.saturating_duration_since(now))
                    .min(IDLE)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return;
            }
            // Every socket, not only those reported ready: a socket left
            // with data after a full burst is read again on the next turn.
            backlog = false;
            for at in 0..self.sockets.len() {
                backlog |= self.drain(at, &mut buf);
            }
            self.release(Instant::now());
        }
    }

    /// Reads up to [`BURST`] datagrams from socket `at`; true if more may
    /// be waiting.
    fn drain(&mut self, at: usize, buf: &mut [u8]) -> bool {
        for _ in 0..BURST {
            match self.sockets[at].recv_from(buf) {
                Ok((n, src)) => {
                    let data = buf[..n].to_vec();
                    self.take(at, src, data);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                // An ICMP error from sending to a client that is gone: it
                // says nothing about the next datagram.
                Err(_) => {}
            }
        }
        true
    }

    /// The socket that stands for real endpoint `src`, created on first
    /// sight.
    fn endpoint(&mut self, src: SocketAddr) -> Option<usize> {
        if let Some(&i) = self.by_real.get(&src) {
            return Some(i);
        }
        if self.sockets.len() >= MAX_ENDPOINTS {
            return None;
        }
        let mut socket = UdpSocket::bind(loopback(0)).ok()?;
        let i = self.sockets.len();
        self.poll
            .registry()
            .register(&mut socket, Token(i), Interest::READABLE)
            .ok()?;
        self.sockets.push(socket);
        self.real.push(src);
        self.by_real.insert(src, i);
        Some(i)
    }

    /// Decides the fate of one datagram that arrived at socket `to` from
    /// `src`.
    fn take(&mut self, to: usize, src: SocketAddr, data: Vec<u8>) {
        let now = Instant::now();
        let from = self.endpoint(src);
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let Shared { stats, blackholes } = &mut *shared;
        stats.endpoints = self.sockets.len();
        let Some(from) = from else {
            stats.refused += 1;
            return;
        };
        let server = from == 0 || to == 0;
        let counts = if server {
            &mut stats.server
        } else {
            &mut stats.peer
        };
        counts.received += 1;
        let (from_port, to_port) = (self.real[from].port(), self.real[to].port());
        if to == 0 && data.len() > SAVE_MESSAGE_MIN {
            blackholes.retain(|b| b.until != from_port);
        }
        if blackholes
            .iter()
            .any(|b| b.from == from_port && b.to == to_port)
        {
            counts.blackholed += 1;
            return;
        }
        let dropped = if server {
            let pair = (from.min(to), from.max(to));
            let rested = self
                .last_server_drop
                .get(&pair)
                .is_none_or(|&t| now.duration_since(t) >= self.chaos.server_gap);
            let drop = chance(&mut self.rng, self.chaos.server_drop) && rested;
            if drop {
                self.last_server_drop.insert(pair, now);
            }
            drop
        } else {
            chance(&mut self.rng, self.chaos.peer_drop)
        };
        if dropped {
            counts.dropped += 1;
            return;
        }
        let copies = if chance(&mut self.rng, self.chaos.duplicate) {
            counts.duplicated += 1;
            2
        } else {
            1
        };
        let max_us = u64::try_from(self.chaos.max_delay.as_micros()).unwrap_or(u64::MAX);
        for copy in 0..copies {
            let delay = if copy > 0 || chance(&mut self.rng, self.chaos.reorder) {
                counts.delayed += 1;
                Duration::from_micros(self.rng.next_u64() % (max_us + 1))
            } else {
                Duration::ZERO
            };
            if self.queue.len() >= MAX_QUEUE {
                counts.overflow += 1;
                continue;
            }
            self.queue.push(Reverse(Held {
                at: now + delay,
                n: self.next,
                from,
                to,
                data: data.clone(),
            }));
            self.next += 1;
        }
    }

    /// Sends every held datagram that is due.
    fn release(&mut self, now: Instant) {
        while self.queue.peek().is_some_and(|Reverse(h)| h.at <= now) {
            let Some(Reverse(h)) = self.queue.pop() else {
                return;
            };
            let result = self.sockets[h.from].send_to(&h.data, self.real[h.to]);
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let counts = if h.from == 0 || h.to == 0 {
                &mut shared.stats.server
            } else {
                &mut shared.stats.peer
            };
            match result {
                Ok(_) => counts.sent += 1,
                Err(_) => counts.overflow += 1,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Clients seen through their outcomes.

/// Heartbeats every second (server and clients), so that a client the
/// server wrongly marked offline — possible only if a process stalls for a
/// whole ack window — is told so within seconds and gets its mail.
const HEARTBEAT: [&str; 2] = ["--heartbeat", "1"];
/// `>>> [Reconnected to server.]`
const RECONNECTED: &str = ">>> [Reconnected to server.]";
/// The last line `help` prints: the end of a `list` + `help` pair.
const HELP_END: &str = ">>> Ctrl+C                  quit without telling the server";

/// How a chat message was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `>>> Bob: text`
    Live,
    /// `>>> Bob: <ts> text` (from the mailbox)
    Stored,
    /// `>>> [Channel_Message Bob: text]`
    Channel,
    /// `>>> Channel_Message Bob: <ts> text` (from the mailbox)
    StoredChannel,
}

impl Form {
    fn channel(self) -> bool {
        matches!(self, Form::Channel | Form::StoredChannel)
    }
}

/// One shown chat message.
#[derive(Debug, Clone)]
struct Shown {
    form: Form,
    from: String,
    text: String,
}

/// A client whose output is read as outcomes: status lines go to whoever
/// waits for them; table notices and incoming messages are recorded on the
/// way, whenever they come.
struct Peer {
    client: Client,
    /// Every name in the scenario, to recognise `>>> <name>: …` lines.
    names: Vec<String>,
    shown: Vec<Shown>,
    welcomes: usize,
    mail_notices: usize,
    reconnects: usize,
}

impl Peer {
    /// Starts a client through `proxy` and waits for its welcome.
    #[track_caller]
    fn join(name: &str, proxy: &Proxy, names: &[&str]) -> Peer {
        let client = Client::start_with(name, proxy.port(), &HEARTBEAT);
        let mut peer = Peer {
            client,
            names: names.iter().map(|&n| n.to_owned()).collect(),
            shown: Vec::new(),
            welcomes: 0,
            mail_notices: 0,
            reconnects: 0,
        };
        let first = peer.next_status();
        if first != WELCOME {
            peer.client
                .fail(&format!("expected {WELCOME:?}, got {first:?}"));
        }
        peer.welcomes += 1;
        peer
    }

    fn name(&self) -> &str {
        self.client.name()
    }

    /// Records a line that is not a status line; returns it back if it is
    /// one.
    #[track_caller]
    fn classify(&mut self, line: String) -> Option<String> {
        match line.as_str() {
            TABLE => return None,
            MAIL => {
                self.mail_notices += 1;
                return None;
            }
            RECONNECTED => {
                self.reconnects += 1;
                return None;
            }
            _ => {}
        }
        if let Some(body) = line
            .strip_prefix(">>> [Channel_Message ")
            .and_then(|b| b.strip_suffix(']'))
            && let Some((from, text)) = self.split_sender(body)
        {
            self.record(Form::Channel, from, text);
            return None;
        }
        if let Some(body) = line.strip_prefix(">>> Channel_Message ")
            && let Some((from, rest)) = self.split_sender(body)
        {
            let text = self.stored_text(&line, "Channel_Message ", &from, &rest);
            self.record(Form::StoredChannel, from, text);
            return None;
        }
        if let Some(body) = line.strip_prefix(">>> ")
            && let Some((from, rest)) = self.split_sender(body)
        {
            let stamped = rest
                .get(..20)
                .is_some_and(|head| line_matches("<ts> ", head).is_ok());
            if stamped {
                let text = self.stored_text(&line, "", &from, &rest);
                self.record(Form::Stored, from, text);
            } else {
                self.record(Form::Live, from, rest);
            }
            return None;
        }
        Some(line)
    }

    /// `Bob: rest` → (`Bob`, `rest`) when Bob is a name of the scenario.
    fn split_sender(&self, body: &str) -> Option<(String, String)> {
        let (from, rest) = body.split_once(": ")?;
        self.names
            .iter()
            .any(|n| n == from)
            .then(|| (from.to_owned(), rest.to_owned()))
    }

    /// The text of a stored line, after checking its timestamp and that the
    /// mail notice came first.
    #[track_caller]
    fn stored_text(&mut self, line: &str, kind: &str, from: &str, rest: &str) -> String {
        let text = rest.get(20..).unwrap_or("").to_owned();
        if let Err(why) = line_matches(&format!(">>> {kind}{from}: <ts> {text}"), line) {
            self.client.fail(&format!("stored message {line:?}: {why}"));
        }
        if self.mail_notices == 0 {
            self.client
                .fail(&format!("stored message {line:?} before {MAIL:?}"));
        }
        text
    }

    fn record(&mut self, form: Form, from: String, text: String) {
        self.shown.push(Shown { form, from, text });
    }

    /// The next status line (anything but a table notice or a chat
    /// message).
    #[track_caller]
    fn next_status(&mut self) -> String {
        loop {
            let Some(line) = self.client.next_line(DEADLINE) else {
                self.client
                    .fail(&format!("no status line within {DEADLINE:?}"));
            };
            if let Some(status) = self.classify(line) {
                return status;
            }
        }
    }

    /// Reads lines until `(from, text)` was shown or `deadline` passes; a
    /// status line meanwhile fails the test.
    #[track_caller]
    fn await_shown(&mut self, from: &str, text: &str, deadline: Instant) {
        while !self.has_shown(from, text) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.client.next_line(left) else {
                self.client.fail(&format!(
                    "{from}'s message {text:?} not shown within {DEADLINE:?}"
                ));
            };
            if let Some(status) = self.classify(line) {
                self.client
                    .fail(&format!("unexpected status line {status:?}"));
            }
        }
    }

    fn has_shown(&self, from: &str, text: &str) -> bool {
        self.shown.iter().any(|s| s.from == from && s.text == text)
    }

    /// Waits until `list` shows exactly `want` (name, online).
    #[track_caller]
    fn await_table(&mut self, want: &[(&str, bool)]) {
        let mut want: Vec<(String, bool)> = want.iter().map(|&(n, o)| (n.to_owned(), o)).collect();
        want.sort();
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.client.send("list");
            self.client.send("help");
            let mut rows = Vec::new();
            loop {
                let line = self.next_status();
                if line == HELP_END {
                    break;
                }
                if common::is_list_header(&line) {
                    continue;
                }
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    // A row may end with the path to that peer.
                    [">>>", name, _addr, status @ ("online" | "offline")]
                    | [">>>", name, _addr, status @ ("online" | "offline"), _] => {
                        rows.push(((*name).to_owned(), *status == "online"));
                    }
                    // The other help lines, or an empty table.
                    _ if line.starts_with(">>> ") && !line.starts_with(">>> [") => {}
                    _ => self
                        .client
                        .fail(&format!("unexpected status line {line:?} in a listing")),
                }
            }
            rows.sort();
            if rows == want {
                return;
            }
            if Instant::now() >= deadline {
                self.client.fail(&format!(
                    "table is {rows:?}, still not {want:?} after {DEADLINE:?}"
                ));
            }
            // Wait for a change (or a second, the heartbeat that finds a
            // missed one) before looking again.
            if let Some(line) = self.client.next_line(Duration::from_secs(1))
                && let Some(status) = self.classify(line)
            {
                self.client
                    .fail(&format!("unexpected status line {status:?}"));
            }
        }
    }

    /// Ends the client normally: end of input, every line read and
    /// recorded, exit status 0, empty stderr.
    #[track_caller]
    fn finish(&mut self) {
        self.client.close_stdin();
        self.drain_to_end();
        self.client.expect_exit(0);
        self.client.assert_stderr_empty();
    }

    /// Reads every line until stdout closes; status lines are not allowed.
    #[track_caller]
    fn drain_to_end(&mut self) {
        while !self.client.stdout_closed() {
            match self.client.next_line(DEADLINE) {
                Some(line) => {
                    if let Some(status) = self.classify(line) {
                        self.client
                            .fail(&format!("unexpected status line {status:?} at the end"));
                    }
                }
                None if self.client.stdout_closed() => {}
                None => self.client.fail("stdout still open at the end"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Outcomes.

/// A message sent in a scenario. Every ending a send may have is "acked by
/// the recipient" or "stored by the server" (a direct message the server
/// can reach its recipient with is relayed, never dropped): the recipient
/// must show it exactly once.
#[derive(Debug, Clone)]
struct Item {
    from: String,
    to: String,
    text: String,
    channel: bool,
}

#[derive(Debug, Default)]
struct Ledger {
    items: Vec<Item>,
    /// Each status path seen for a direct message, with how often.
    paths: HashMap<Vec<String>, usize>,
}

/// `from` sends `text` to `to`; returns once the sender printed one of the
/// endings the specification allows, failing on anything else.
#[track_caller]
fn send_direct(ledger: &mut Ledger, from: &mut Peer, to: &str, text: &str) -> Vec<String> {
    from.client.send(&format!("send {to} {text}"));
    let received = format!(">>> [Message received by {to}.]");
    let no_ack = format!(">>> [No ACK from {to}, message sent to server.]");
    let offline = format!(">>> [{to} is offline, message sent to server.]");
    let exists = format!(">>> [Client {to} exists!!]");
    // The last two: the retry after `exists` failed too, and the server
    // relayed it (acked by the recipient, or kept for it).
    let endings: [&[&str]; 5] = [
        &[&received],
        &[&no_ack, SAVED],
        &[&offline, SAVED],
        &[&no_ack, &exists, &received],
        &[&no_ack, &exists, SAVED],
    ];
    let mut path: Vec<String> = Vec::new();
    loop {
        path.push(from.next_status());
        if endings.iter().any(|e| *e == path.as_slice()) {
            ledger.items.push(Item {
                from: from.name().to_owned(),
                to: to.to_owned(),
                text: text.to_owned(),
                channel: false,
            });
            *ledger.paths.entry(path.clone()).or_default() += 1;
            return path;
        }
        let prefix = endings
            .iter()
            .any(|e| e.len() > path.len() && e[..path.len()] == path[..]);
        if !prefix {
            from.client.fail(&format!(
                "send {to} {text}: the status lines {path:?} are not an allowed ending"
            ));
        }
    }
}

/// `from` sends `text` to the channel; `to` are the other online clients.
#[track_caller]
fn send_all(ledger: &mut Ledger, from: &mut Peer, to: &[&str], text: &str) {
    from.client.send(&format!("send_all {text}"));
    await_channel_ack(ledger, from, to, text);
}

/// The server's ack of a channel message already typed.
#[track_caller]
fn await_channel_ack(ledger: &mut Ledger, from: &mut Peer, to: &[&str], text: &str) {
    let line = from.next_status();
    if line != ">>> [Message received by Server.]" {
        from.client.fail(&format!(
            "send_all {text}: got {line:?}, expected the server's ack"
        ));
    }
    for &name in to {
        ledger.items.push(Item {
            from: from.name().to_owned(),
            to: name.to_owned(),
            text: text.to_owned(),
            channel: true,
        });
    }
}

#[track_caller]
fn dereg(peer: &mut Peer) {
    let name = peer.name().to_owned();
    peer.client.send(&format!("dereg {name}"));
    let line = peer.next_status();
    if line != BYE {
        peer.client
            .fail(&format!("dereg: got {line:?}, expected {BYE:?}"));
    }
}

/// Waits until every live recipient shows what it must, then checks every
/// client's whole record: each message it showed was sent to it, in the
/// right form, and shown once; each delivered one was shown.
#[track_caller]
fn settle_and_verify(ledger: &Ledger, peers: &mut [&mut Peer]) {
    let deadline = Instant::now() + DEADLINE;
    for item in &ledger.items {
        // The recipient's latest process (a client that left and came back
        // is two of them).
        for peer in peers.iter_mut().rev() {
            if peer.name() == item.to && !peer.client.stdout_closed() {
                peer.await_shown(&item.from, &item.text, deadline);
                break;
            }
        }
    }
    for peer in peers.iter_mut() {
        for (i, shown) in peer.shown.clone().iter().enumerate() {
            let sent = ledger.items.iter().any(|item| {
                item.to == peer.name()
                    && item.from == shown.from
                    && item.text == shown.text
                    && item.channel == shown.form.channel()
            });
            if !sent {
                peer.client
                    .fail(&format!("showed {shown:?}, which nobody sent to it"));
            }
            let again = peer.shown[..i]
                .iter()
                .any(|s| s.from == shown.from && s.text == shown.text);
            if again {
                peer.client.fail(&format!("showed {shown:?} twice"));
            }
        }
        if peer.welcomes != 1 {
            let n = peer.welcomes;
            peer.client.fail(&format!("{n} welcomes"));
        }
    }
    for item in &ledger.items {
        let times: usize = peers
            .iter()
            .filter(|p| p.name() == item.to)
            .map(|p| {
                p.shown
                    .iter()
                    .filter(|s| s.from == item.from && s.text == item.text)
                    .count()
            })
            .sum();
        assert!(times == 1, "{item:?} shown {times} times by {}", item.to);
    }
}

/// Runs `body` with the seed from `UDPCHAT_CHAOS_SEED` (decimal or 0x-hex)
/// or `default_seed`, and puts the seed into any failure message.
fn with_seed(test: &str, default_seed: u64, body: impl FnOnce(u64)) {
    let seed = std::env::var("UDPCHAT_CHAOS_SEED")
        .ok()
        .and_then(|s| match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        })
        .unwrap_or(default_seed);
    if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| body(seed))) {
        let what = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!("{test} failed with chaos seed {seed:#x} (UDPCHAT_CHAOS_SEED={seed:#x}):\n{what}");
    }
}

/// The server, and the proxy in front of it.
const AB: [&str; 2] = ["Alice", "Bob"];

/// A server behind the proxy with Alice and Bob online, each seeing both.
fn alice_and_bob(seed: u64) -> (Server, Proxy, Peer, Peer) {
    let (server, proxy) = network(seed);
    let mut alice = Peer::join("Alice", &proxy, &AB);
    let mut bob = Peer::join("Bob", &proxy, &AB);
    let both = [("Alice", true), ("Bob", true)];
    alice.await_table(&both);
    bob.await_table(&both);
    (server, proxy, alice, bob)
}

fn network(seed: u64) -> (Server, Proxy) {
    let server = Server::start_with(&HEARTBEAT);
    let proxy = Proxy::start(server.port(), Chaos::new(seed));
    (server, proxy)
}

fn report(test: &str, seed: u64, proxy: &Proxy, ledger: &Ledger) {
    let s = proxy.stats();
    println!(
        "{test} seed {seed:#x}: client<->server {:?} loss {:.1}%; client<->client {:?} loss {:.1}%; \
         {} endpoints, {} refused",
        s.server,
        s.server.loss_percent(),
        s.peer,
        s.peer.loss_percent(),
        s.endpoints,
        s.refused
    );
    let mut paths: Vec<_> = ledger.paths.iter().collect();
    paths.sort();
    for (path, n) in paths {
        println!("  {n} x {path:?}");
    }
    assert_eq!(
        s.server.overflow + s.peer.overflow,
        0,
        "the proxy lost datagrams to its own limits"
    );
}

// ---------------------------------------------------------------------------
// Scenarios.

const ABC: [&str; 3] = ["Alice", "Bob", "Carol"];

/// Alice, Bob and Carol join one after another; each waits until its table
/// shows everyone online.
#[track_caller]
fn join_abc(proxy: &Proxy) -> [Peer; 3] {
    let mut peers = ABC.map(|name| Peer::join(name, proxy, &ABC));
    let all: Vec<(&str, bool)> = ABC.iter().map(|&n| (n, true)).collect();
    for peer in &mut peers {
        peer.await_table(&all);
    }
    peers
}

/// Test-case 1: every pair chats; Alice leaves; Bob and Carol leave her
/// mail; she logs back and gets it, in order.
#[test]
fn chaos_case01_chat_dereg_offline_mail_reg() {
    const TEST: &str = "chaos_case01_chat_dereg_offline_mail_reg";
    with_seed(TEST, 0xc4a0_5001, |seed| {
        let (_server, proxy) = network(seed);
        let [mut alice, mut bob, mut carol] = join_abc(&proxy);
        let mut ledger = Ledger::default();

        // Every ordered pair, a few rounds, one message at a time.
        for round in 0..3 {
            let [a, b, c] = [&mut alice, &mut bob, &mut carol];
            send_direct(&mut ledger, a, "Bob", &format!("Hello {round} from Alice"));
            send_direct(
                &mut ledger,
                a,
                "Carol",
                &format!("Hello {round} from Alice"),
            );
            send_direct(&mut ledger, b, "Alice", &format!("Hello! {round} from Bob"));
            send_direct(&mut ledger, b, "Carol", &format!("Hello! {round} from Bob"));
            send_direct(
                &mut ledger,
                c,
                "Alice",
                &format!("Hello!! {round} from Carol"),
            );
            send_direct(
                &mut ledger,
                c,
                "Bob",
                &format!("Hello!! {round} from Carol"),
            );
        }

        dereg(&mut alice);
        let alice_gone = [("Alice", false), ("Bob", true), ("Carol", true)];
        bob.await_table(&alice_gone);
        carol.await_table(&alice_gone);

        for (sender, text) in [(&mut bob, "Hi"), (&mut carol, "Hi!")] {
            let sent = send_direct(&mut ledger, sender, "Alice", text);
            if sent.last().map(String::as_str) != Some(SAVED) {
                sender
                    .client
                    .fail(&format!("a message to the offline Alice ended in {sent:?}"));
            }
        }

        let before = alice.shown.len();
        alice.client.send("reg Alice");
        let deadline = Instant::now() + DEADLINE;
        alice.await_shown("Bob", "Hi", deadline);
        alice.await_shown("Carol", "Hi!", deadline);
        let mail: Vec<(String, String)> = alice.shown[before..]
            .iter()
            .filter(|s| s.form == Form::Stored)
            .map(|s| (s.from.clone(), s.text.clone()))
            .collect();
        let want = [
            ("Bob".to_owned(), "Hi".to_owned()),
            ("Carol".to_owned(), "Hi!".to_owned()),
        ];
        if mail != want {
            alice
                .client
                .fail(&format!("mail after reg is {mail:?}, expected {want:?}"));
        }

        settle_and_verify(&ledger, &mut [&mut alice, &mut bob, &mut carol]);
        for peer in [&mut alice, &mut bob, &mut carol] {
            peer.finish();
        }
        report(TEST, seed, &proxy, &ledger);
    });
}

/// Test-case 3: channel messages reach every other client once — one after
/// another, then all three at the same time.
#[test]
fn chaos_case03_channel() {
    const TEST: &str = "chaos_case03_channel";
    with_seed(TEST, 0xc4a0_5003, |seed| {
        let (_server, proxy) = network(seed);
        let [mut alice, mut bob, mut carol] = join_abc(&proxy);
        let mut ledger = Ledger::default();

        send_all(
            &mut ledger,
            &mut alice,
            &["Bob", "Carol"],
            "Welcome to Channel",
        );
        send_all(
            &mut ledger,
            &mut bob,
            &["Alice", "Carol"],
            "Welcome from Bob",
        );
        send_all(
            &mut ledger,
            &mut carol,
            &["Alice", "Bob"],
            "Welcome from Carol",
        );

        for round in 0..3 {
            let mut peers = [&mut alice, &mut bob, &mut carol];
            for peer in &mut peers {
                let text = format!("round {round} from {}", peer.name());
                peer.client.send(&format!("send_all {text}"));
            }
            for peer in &mut peers {
                let me = peer.name().to_owned();
                let others: Vec<&str> = ABC.iter().copied().filter(|&n| n != me).collect();
                let text = format!("round {round} from {me}");
                await_channel_ack(&mut ledger, peer, &others, &text);
            }
        }

        settle_and_verify(&ledger, &mut [&mut alice, &mut bob, &mut carol]);
        for peer in [&mut alice, &mut bob, &mut carol] {
            peer.finish();
        }
        report(TEST, seed, &proxy, &ledger);
    });
}

/// Test-case 11: Bob leaves silently; Alice's message falls back to the
/// server, which finds him gone and stores it; Bob comes back and gets it
/// once.
#[test]
fn chaos_case11_silent_leave_falls_back_to_server() {
    const TEST: &str = "chaos_case11_silent_leave_falls_back_to_server";
    with_seed(TEST, 0xc4a0_5011, |seed| {
        let (_server, proxy, mut alice, mut bob) = alice_and_bob(seed);
        let mut ledger = Ledger::default();

        bob.client.signal(libc::SIGINT);
        bob.client.wait_exit(DEADLINE);
        bob.drain_to_end();

        for text in ["Hello", "Are you there?"] {
            let sent = send_direct(&mut ledger, &mut alice, "Bob", text);
            if sent.last().map(String::as_str) != Some(SAVED) {
                alice
                    .client
                    .fail(&format!("a message to the departed Bob ended in {sent:?}"));
            }
        }

        // Bob again, from a new process: the mail waits for him.
        let mut bob_again = Peer::join("Bob", &proxy, &AB);
        let deadline = Instant::now() + DEADLINE;
        bob_again.await_shown("Alice", "Hello", deadline);
        bob_again.await_shown("Alice", "Are you there?", deadline);

        settle_and_verify(&ledger, &mut [&mut alice, &mut bob, &mut bob_again]);
        alice.finish();
        bob_again.finish();
        report(TEST, seed, &proxy, &ledger);
    });
}

/// The exists-then-retry path, provoked: the proxy swallows the first try
/// of a direct message (the message and its retransmission, or the acks),
/// so the sender falls back to the server, which finds the recipient alive;
/// the sender retries to the fresh address.
#[test]
fn chaos_exists_then_retry() {
    const TEST: &str = "chaos_exists_then_retry";
    with_seed(TEST, 0xc4a0_5e71, |seed| {
        let (_server, proxy, mut alice, mut bob) = alice_and_bob(seed);
        let mut ledger = Ledger::default();

        for round in 0..4 {
            // Even rounds lose the message, odd rounds the acks (Bob has
            // shown it then, and must not show the retry again).
            let (from, to) = if round % 2 == 0 {
                (alice.client.port(), bob.client.port())
            } else {
                (bob.client.port(), alice.client.port())
            };
            proxy.blackhole(from, to, alice.client.port());
            let text = format!("knock knock {round}");
            let sent = send_direct(&mut ledger, &mut alice, "Bob", &text);
            let exists = ">>> [Client Bob exists!!]";
            // A round whose retry was lost too went through the relay, and
            // the next then goes there at once (no fallback to provoke).
            let fell_back = sent.len() > 1 || round == 0;
            if fell_back && sent.get(1).map(String::as_str) != Some(exists) {
                alice.client.fail(&format!(
                    "round {round}: expected the fallback and {exists:?}, got {sent:?}"
                ));
            }
        }

        settle_and_verify(&ledger, &mut [&mut alice, &mut bob]);
        alice.finish();
        bob.finish();
        report(TEST, seed, &proxy, &ledger);
    });
}
