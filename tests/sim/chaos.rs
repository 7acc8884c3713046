//! A seeded chaos simulation of one `Server` and up to 50 `Client`s, with an
//! invariant checker.
//!
//! Everything random comes from one ChaCha stream seeded by the run's seed,
//! time is virtual (it jumps to the next deadline) and every container is
//! iterated in a fixed order, so a seed replays the same trace.
//!
//! The network loses, duplicates, delays (jitter) and reorders datagrams and
//! cuts links for a while (partitions that heal). Client processes crash
//! (silent leave) and restart under the same name, on the same port or
//! another. The server crashes and restarts from its committed store: store
//! operations are committed only at the end of each loop turn (the "commit
//! point"), so a crash mid-turn loses exactly the uncommitted ones, and the
//! acks held behind them never leave.
//!
//! The checker reads the client's console lines, like a user would: every
//! message text is unique (`m<seed>-c<sender>-<n>`), so a display can be
//! attributed to the send it came from.
//!
//! Most runs also have an attacker. On path, it records datagrams and later
//! replays them: unchanged, from another address (a victim's or a client's),
//! to another destination, or with bytes flipped. Off path, it forges
//! datagrams from victim addresses: random session indexes, handshakes of
//! its own, forged cookies and reset tokens, old protocol versions. As
//! another user, it runs clients of its own key under names that others
//! own. The checker adds: nothing is shown as from X that X did not send
//! (above); mail is deleted only after its recipient showed it, and the
//! hijacker is never welcomed nor shown anything; an address only the
//! attacker uses (a victim) never gets more than 3× the bytes sent from it,
//! nor a table row.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use udpchat::crypto::{self, Keypair, ServerSecrets};
use udpchat::packet::{self, Packet as Datagram};
use udpchat::server::AMPLIFICATION;
use udpchat::store::{MemoryStore, Store, StoreOp, StoredMail};
use udpchat::wire::{self, Name};
use udpchat::{
    Client, ClientConfig, Event, Path, Server, ServerConfig, ServerEvent, StoreFailure, console,
};

use crate::sim::nat::{Nat, NatKind};

/// Unix time of the simulation's start (stored-message timestamps).
pub const EPOCH_UNIX: i64 = 1_700_000_000;
/// The longest a send may wait for its outcome line. The worst honest path
/// is: direct try (0.5 s), save-message (5 × 0.5 s), parked across a server
/// restart while the client re-registers (5 × 0.5 s plus a 0.5 s probe), the
/// save again (2.5 s), `exists` and a last direct try (0.5 s): about 9.5 s.
pub const OUTCOME_BOUND: Duration = Duration::from_secs(20);

/// How much longer than [`OUTCOME_BOUND`] a send may go without an outcome
/// when its sender was answered "busy" meanwhile: a client believes busy
/// answers for up to 60 s in all before its tries run out (`BUSY_BUDGET`
/// in src/client/join.rs), on top of the tries themselves.
const BUSY_ALLOWANCE: Duration = Duration::from_secs(60);

/// The extra time a send issued at `issued` has, given when its process was
/// last answered "busy".
fn busy_allowance(busy_at: Option<Instant>, issued: Instant) -> Duration {
    match busy_at {
        Some(at) if at >= issued => BUSY_ALLOWANCE,
        _ => Duration::ZERO,
    }
}

/// The ways a direct message may fail (see [`World::line`]): the server
/// did not answer or refused it, or the sender could not send it. None of
/// them is the peer's silence: the server relays to a peer it reaches.
/// The last two end the client: an attacker answering in the server's
/// name with another protocol version or key (seed 57371).
const ACCEPTED_FAILURES: [&str; 16] = [
    "[Server not responding",
    "[Error: the server's store is full",
    "[Error: the server's store is busy",
    "[Error: too many requests from this address",
    "[Error: mailbox of ",
    "[Error: the server is busy",
    "[Error: the server has no client ",
    "[Error: the server lost this session",
    "[Error: you went offline before the server took it",
    "[Error: the server is full",
    "[Error: the server refused the request",
    "[Error: you are offline",
    "[Error: registration is under way",
    "[Error: unknown client ",
    "[Error: server speaks protocol version",
    "[Error: the server presented key",
];

/// What a run looks like; everything derives from the seed.
#[derive(Debug, Clone)]
pub struct Params {
    /// The seed.
    pub seed: u64,
    /// Client names (`c0`…).
    pub clients: usize,
    /// Per-datagram loss probability (per link direction).
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub dup: f64,
    /// Probability that a datagram is held back (reordered) by up to 150 ms.
    pub reorder: f64,
    /// Uniform extra delay on every datagram, on top of 1 ms.
    pub jitter: Duration,
    /// Mean time between faults (partition, client crash, server crash).
    pub fault_every: Duration,
    /// Whether the server may crash.
    pub server_crashes: bool,
    /// Mean time between two commands of one client.
    pub think: Duration,
    /// How long faults and the workload go on.
    pub chaos: Duration,
    /// Small mailbox and store limits (exercise the refusals).
    pub small_limits: bool,
    /// Mean time between two moves of the attacker (`None`: no attacker).
    pub attack_every: Option<Duration>,
    /// Faults include spells of a store that fails every commit (full,
    /// locked).
    pub store_faults: bool,
    /// Faults include spells of a server that is behind (it answers new
    /// handshakes "busy").
    pub busy_spells: bool,
    /// Per slot: the NAT its host sits behind, if any, and whether that
    /// NAT rebinds (forgets its mappings) at some faults.
    pub nats: Vec<Option<(NatKind, bool)>>,
    /// Commits run beside the server, as a store thread does: the batch
    /// sealed at one commit point is reported at the next, while the
    /// server goes on with the next batch's datagrams.
    pub pipelined: bool,
}

impl Params {
    /// The run for `seed`: loss spread over 0–30 %, most runs small, some
    /// with 50 clients.
    pub fn from_seed(seed: u64) -> Params {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x05ee_d0fc_4a05);
        let clients = match rng.below(10) {
            0 => 50,
            1..=2 => 10 + rng.below(15) as usize,
            _ => 2 + rng.below(7) as usize,
        };
        // Fewer commands per client when there are many, to keep runs short.
        let think = Duration::from_millis(300 + 150 * clients as u64);
        Params {
            seed,
            clients,
            loss: (seed % 31) as f64 / 100.0,
            dup: rng.unit() * 0.1,
            reorder: rng.unit() * 0.2,
            jitter: Duration::from_millis(rng.below(40)),
            fault_every: Duration::from_millis(1500 + rng.below(6000)),
            server_crashes: rng.below(3) != 0,
            think,
            chaos: Duration::from_secs(20 + rng.below(20)),
            small_limits: rng.below(4) == 0,
            // Most runs have an attacker, a few keep the plain network.
            attack_every: (rng.below(5) != 0).then(|| Duration::from_millis(20 + rng.below(300))),
            // Drawn last, so the draws above give every seed the run it had
            // before store faults existed.
            store_faults: rng.below(3) == 0,
            // Drawn after it for the same reason.
            busy_spells: rng.below(3) == 0,
            // Half the runs put clients behind NATs of every kind (no NAT,
            // endpoint-independent, symmetric, either of them rebinding).
            // Drawn last, like the two above.
            nats: if rng.below(2) == 0 {
                (0..clients)
                    .map(|_| match rng.below(5) {
                        0 => None,
                        1 => Some((NatKind::EndpointIndependent, false)),
                        2 => Some((NatKind::Symmetric, false)),
                        3 => Some((NatKind::EndpointIndependent, true)),
                        _ => Some((NatKind::Symmetric, true)),
                    })
                    .collect()
            } else {
                vec![None; clients]
            },
            // Drawn last, like the ones above.
            pipelined: rng.below(2) == 0,
        }
    }
}

/// How a send ended, as its sender's console said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `[Message received by X.]`
    Delivered,
    /// `[Messages received by the server and saved]`
    Saved,
    /// `[Message received by Server.]` (channel)
    ChannelAcked,
    /// `[Error: …]`, `[Server not responding.]`, `[Server not responding]`.
    Failed,
    /// The sender's process crashed first (no outcome owed).
    SenderCrashed,
}

#[derive(Debug)]
struct SendRec {
    sender: usize,
    pid: usize,
    /// `None`: a channel message.
    to: Option<usize>,
    issued: Instant,
    outcome: Option<(Outcome, Instant)>,
    /// Channel: the names whose row was committed when it was sent (every
    /// later server has them, so each must get a copy).
    registry: Vec<usize>,
    /// Its sender was told the store refused it, and no server crash (which
    /// forgets the refusal a retry would get) came between: nobody may
    /// ever be shown it through the server.
    store_refused: bool,
    /// Server crashes before it was sent.
    crashes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    Alive,
    Crashed,
    Exited,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Send(String),
    Command,
}

struct Proc {
    slot: usize,
    addr: SocketAddr,
    client: Client,
    max_table: usize,
    state: ProcState,
    pending: Option<Pending>,
    /// Texts shown by this process.
    shown: HashSet<String>,
    /// Mail id of the last stored message shown, and when the current
    /// mail batch (`[You Have Messages]`) began.
    last_stored: Option<u64>,
    batch_at: Option<Instant>,
    /// When the server last answered this process "busy".
    busy_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Display {
    slot: usize,
    at: Instant,
}

#[derive(Clone)]
struct Packet {
    from: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Hash of the trace: every datagram sent and every console line, with
    /// its virtual time.
    pub trace: u64,
    /// Invariant violations, one line each.
    pub violations: Vec<String>,
    /// Sends issued.
    pub sends: usize,
    /// Outcomes by kind: delivered, saved, channel acked, failed, crashed.
    pub outcomes: [usize; 5],
    /// Messages shown.
    pub displays: usize,
    /// Datagrams sent / dropped by the network.
    pub datagrams: (u64, u64),
    /// Server and client crashes.
    pub crashes: (usize, usize),
    /// The attacker's hijack attempts and datagrams injected.
    pub attacks: (usize, usize),
    /// Displays left out of the cross-process "exactly once" rule because
    /// the recipient's process restarted (it forgets what it showed).
    pub excluded_restarts: usize,
    /// Failure lines by kind (names and texts cut off).
    pub failures: BTreeMap<String, usize>,
    /// At the end, how live clients reach the peers they talked with:
    /// direct, punched, relayed.
    pub paths: [usize; 3],
    /// NAT rebindings.
    pub rebinds: usize,
}

impl Report {
    /// The one-line replay command.
    pub fn replay(&self) -> String {
        format!(
            "UDPCHAT_SIM_SEED={} cargo test --test simulation -- --nocapture replay",
            self.seed
        )
    }
}

trait RngExt {
    fn below(&mut self, n: u64) -> u64;
    fn unit(&mut self) -> f64;
    fn chance(&mut self, p: f64) -> bool;
    fn millis(&mut self, lo: u64, hi: u64) -> Duration;
}

impl RngExt for ChaCha8Rng {
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo).max(1)))
    }
}

fn slot_name(slot: usize) -> Name {
    Name::new(&format!("c{slot}")).expect("short ascii name")
}

/// A slot's key: one user, one key file, whatever process runs it.
fn slot_key(seed: u64, slot: usize) -> Keypair {
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&seed.to_le_bytes());
    secret[8..16].copy_from_slice(&(slot as u64).to_le_bytes());
    secret[16] = 0xc1;
    Keypair::from_secret(secret)
}

fn server_keypair(seed: u64) -> Keypair {
    let mut secret = [0x5eu8; 32];
    secret[..8].copy_from_slice(&seed.to_le_bytes());
    Keypair::from_secret(secret)
}

fn slot_addr(slot: usize, k: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 20_000 + (slot * 8 + k % 8) as u16))
}

/// Renders stored-message times as `T+<seconds since the epoch>`.
fn sim_time(unix: i64) -> String {
    format!("T+{}", unix - EPOCH_UNIX)
}

/// Addresses only the attacker sends from: whatever they receive was
/// provoked by spoofed datagrams.
fn victims() -> [SocketAddr; 3] {
    [
        SocketAddr::from(([127, 0, 0, 99], 9001)),
        SocketAddr::from(([127, 0, 0, 99], 9002)),
        SocketAddr::from(([127, 0, 0, 98], 9003)),
    ]
}

/// Where the hijacker's processes run.
fn mallory_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 66], 6666))
}

/// The attacker: what it recorded on path, what its victims got, and the
/// hijacker's current process.
#[derive(Default)]
struct Attacker {
    recorded: VecDeque<Packet>,
    /// Victim → (bytes sent from it, bytes sent to it).
    victims: BTreeMap<SocketAddr, (usize, usize)>,
    mallory: Option<Client>,
    /// Hijack attempts, and datagrams injected.
    moves: (usize, usize),
}

/// Datagrams the on-path attacker keeps to replay.
const RECORDED: usize = 512;

/// One simulated world.
pub struct World {
    p: Params,
    rng: ChaCha8Rng,
    start: Instant,
    now: Instant,
    config: ServerConfig,
    server: Option<Server>,
    server_addr: SocketAddr,
    server_restart: Option<Instant>,
    store: MemoryStore,
    /// Polled from the server, not committed yet.
    uncommitted: Vec<StoreOp>,
    /// The batch sealed at the last commit point (pipelined runs).
    inflight: Option<Vec<StoreOp>>,
    /// Committed registry, as slots.
    registry: BTreeSet<usize>,
    /// (recipient slot, text) → (mail id, stored_at) of committed puts.
    puts: HashMap<(usize, String), (u64, i64)>,
    /// Mail id → when it was committed.
    put_times: HashMap<u64, Instant>,
    /// (text, recipient slot) that a full mailbox kept out.
    bounced: HashSet<(String, usize)>,
    /// Mail id → (recipient slot, text) of committed puts.
    mail_texts: HashMap<(u64, Name), (usize, String)>,
    /// The server's secrets (for opening channel copies in the store).
    secrets: ServerSecrets,
    /// Slots that have pinned the server's key (a first process meets it).
    pinned: BTreeSet<usize>,
    procs: Vec<Proc>,
    /// Slot → its current process.
    current: Vec<Option<usize>>,
    /// Slot → the NAT its host sits behind (every process of the slot).
    nats: Vec<Option<Nat>>,
    next_port: Vec<usize>,
    restarts: BTreeMap<(Instant, usize), bool>,
    next_act: Vec<Instant>,
    next_fault: Instant,
    /// (a, b, until): datagrams between a and b (either way) are lost.
    cuts: Vec<(SocketAddr, Option<SocketAddr>, Instant)>,
    queue: BTreeMap<(Instant, u64), Packet>,
    sent: u64,
    dropped: u64,
    faults: bool,
    workload: bool,
    sends: BTreeMap<String, SendRec>,
    send_counter: Vec<u32>,
    displays: HashMap<String, Vec<Display>>,
    /// Texts shown as stored mail (with a time stamp).
    stored_displays: HashSet<String>,
    /// Until when commits fail, and how.
    store_fails: Option<(Instant, StoreFailure)>,
    /// Until when the server is told it is behind, and by how much.
    busy: Option<(Instant, Duration)>,
    hasher: DefaultHasher,
    report: Report,
    /// Print every delivered datagram and console line (`UDPCHAT_SIM_TRACE`).
    trace_on: bool,
    attacker: Attacker,
    next_attack: Instant,
}

impl World {
    /// A world for `p`, with every client starting up.
    pub fn new(p: Params) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
        let start = Instant::now();
        let mut config = ServerConfig::new([0; 32], server_keypair(p.seed), (start, EPOCH_UNIX));
        // Every name fits, exactly: the table bound is reached, not passed.
        config.max_clients = p.clients;
        if p.small_limits {
            config.mailbox_messages = 6;
            config.mailbox_bytes = 6 * 200;
            config.store_bytes = 40 * 200;
        }
        let mut seed = [0; 32];
        rng.fill_bytes(&mut seed);
        config.seed = seed;
        let server = Server::new(config.clone(), start, Default::default());
        let n = p.clients;
        let mut w = World {
            rng,
            start,
            now: start,
            config,
            server: Some(server),
            server_addr: SocketAddr::from(([127, 0, 0, 1], 1024)),
            server_restart: None,
            store: MemoryStore::new(),
            uncommitted: Vec::new(),
            inflight: None,
            registry: BTreeSet::new(),
            puts: HashMap::new(),
            put_times: HashMap::new(),
            bounced: HashSet::new(),
            mail_texts: HashMap::new(),
            secrets: ServerSecrets::derive(&server_keypair(p.seed)),
            pinned: BTreeSet::new(),
            procs: Vec::new(),
            current: vec![None; n],
            nats: (0..n)
                .map(|slot| {
                    let public = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1 + slot as u8));
                    p.nats[slot].map(|(kind, _)| Nat::new(kind, public))
                })
                .collect(),
            next_port: vec![0; n],
            restarts: BTreeMap::new(),
            next_act: vec![start; n],
            next_fault: start,
            cuts: Vec::new(),
            queue: BTreeMap::new(),
            sent: 0,
            dropped: 0,
            faults: true,
            workload: true,
            sends: BTreeMap::new(),
            send_counter: vec![0; n],
            displays: HashMap::new(),
            stored_displays: HashSet::new(),
            store_fails: None,
            busy: None,
            hasher: DefaultHasher::new(),
            trace_on: std::env::var_os("UDPCHAT_SIM_TRACE").is_some(),
            attacker: Attacker::default(),
            next_attack: start,
            report: Report {
                seed: p.seed,
                ..Report::default()
            },
            p,
        };
        for slot in 0..n {
            // Clients come up over the first two seconds.
            let at = start + w.rng.millis(0, 2000);
            w.restarts.insert((at, slot), false);
            w.next_act[slot] = at + w.rng.millis(500, 3000);
        }
        w.next_fault = start + w.p.fault_every;
        if let Some(every) = w.p.attack_every {
            w.next_attack = start + every;
        }
        w
    }

    /// Runs the whole scenario and checks it.
    pub fn run(mut self) -> Report {
        let chaos_end = self.start + self.p.chaos;
        self.run_until(chaos_end);
        // Heal: no more faults or commands; the server and every process
        // that ended come back.
        self.faults = false;
        self.workload = false;
        self.cuts.clear();
        self.busy = None;
        if self.server.is_none() {
            self.server_restart = Some(self.now);
        }
        let t = self.now + Duration::from_secs(20);
        self.run_until(t);
        self.revive_all();
        // Long enough for a presence timeout (30 s), heartbeats (10 s) and
        // the syncs they trigger, and for every mailbox to drain.
        let t = self.now + Duration::from_secs(50);
        self.run_until(t);
        self.check_end();
        self.report.trace = self.hasher.finish();
        self.report.datagrams = (self.sent, self.dropped);
        self.report.attacks = self.attacker.moves;
        self.report
    }

    fn violation(&mut self, what: String) {
        let at = self.now - self.start;
        if self.report.violations.len() < 50 {
            self.report
                .violations
                .push(format!("t={:.3}s {what}", at.as_secs_f64()));
        }
    }

    // ---- the loop ---------------------------------------------------------

    fn run_until(&mut self, end: Instant) {
        loop {
            let Some(next) = self.next_deadline() else {
                self.now = end;
                return;
            };
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            self.turn();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        consider(self.queue.keys().next().map(|(t, _)| *t));
        consider(self.server.as_ref().and_then(Server::poll_timeout));
        consider(self.server_restart);
        consider(self.restarts.keys().next().map(|(t, _)| *t));
        for slot in 0..self.p.clients {
            if let Some(pid) = self.current[slot]
                && self.procs[pid].state == ProcState::Alive
            {
                consider(self.procs[pid].client.poll_timeout());
            }
        }
        if self.workload {
            consider(self.next_act.iter().min().copied());
        }
        if self.faults && self.p.attack_every.is_some() {
            consider(Some(self.next_attack));
        }
        if let Some(m) = &self.attacker.mallory {
            consider(m.poll_timeout());
        }
        if self.faults {
            consider(Some(self.next_fault));
        }
        next
    }

    /// One loop turn at `self.now`, ending at the commit point.
    fn turn(&mut self) {
        let now = self.now;
        // 1. Datagrams due.
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let packet = entry.remove();
            self.deliver(packet);
        }
        // 2. Faults: a server crash here loses what this turn did not
        // commit yet.
        if self.faults && self.next_fault <= now {
            self.fault();
            self.next_fault = now
                + self
                    .rng
                    .millis(0, 2 * self.p.fault_every.as_millis() as u64);
        }
        if self.faults
            && let Some(every) = self.p.attack_every
            && self.next_attack <= now
        {
            self.attack();
            let mean = every.as_millis() as u64;
            self.next_attack = now + self.rng.millis(mean / 2, 2 * mean);
        }
        if let Some(m) = self.attacker.mallory.as_mut()
            && m.poll_timeout().is_some_and(|t| t <= now)
        {
            m.handle_timeout(now);
            self.drain_mallory();
        }
        if let Some(at) = self.server_restart
            && at <= now
        {
            self.server_restart = None;
            self.restart_server();
        }
        while let Some(entry) = self.restarts.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, slot), same_port) = entry.remove_entry();
            self.start_process(slot, same_port);
        }
        // 3. Timers.
        if let Some(server) = self.server.as_mut()
            && server.poll_timeout().is_some_and(|t| t <= now)
        {
            server.handle_timeout(now);
            if let Some(t) = server.poll_timeout()
                && t <= now
            {
                self.violation(format!("server busy loop: deadline {t:?} not after now"));
            }
            self.drain_server();
        }
        for slot in 0..self.p.clients {
            let Some(pid) = self.current[slot] else {
                continue;
            };
            let proc = &mut self.procs[pid];
            if proc.state != ProcState::Alive || proc.client.poll_timeout().is_none_or(|t| t > now)
            {
                continue;
            }
            proc.client.handle_timeout(now);
            if proc.state == ProcState::Alive
                && let Some(t) = proc.client.poll_timeout()
                && t <= now
            {
                self.violation(format!("c{slot} busy loop: deadline not after now"));
            }
            self.drain_client(pid);
        }
        // 4. The workload.
        if self.workload {
            for slot in 0..self.p.clients {
                if self.next_act[slot] <= now {
                    self.act(slot);
                    let mean = self.p.think.as_millis() as u64;
                    self.next_act[slot] = now + self.rng.millis(mean / 4, 2 * mean);
                }
            }
        }
        self.check_pending();
        self.check_victims();
        // 5. The commit point.
        self.commit();
    }

    fn commit(&mut self) {
        let mut deleted_unseen = Vec::new();
        let mut first = true;
        loop {
            let Some(server) = self.server.as_mut() else {
                return;
            };
            udpchat::store::serve_fetches(server, &mut self.store, self.now);
            while let Some(op) = server.poll_store() {
                self.uncommitted.push(op);
            }
            let failing = self
                .store_fails
                .filter(|&(until, _)| until > self.now)
                .map(|(_, failure)| failure);
            // Pipelined, the batch sealed at the last commit point is
            // reported now (once per commit point), and the one gathered
            // since is sealed; otherwise everything polled commits now.
            let batch = if !self.p.pipelined {
                Some(std::mem::take(&mut self.uncommitted)).filter(|b| !b.is_empty())
            } else if first {
                let sealed = self.inflight.take();
                if sealed.is_none() && !self.uncommitted.is_empty() {
                    self.inflight = Some(std::mem::take(&mut self.uncommitted));
                    server.seal_batch();
                }
                sealed
            } else {
                None
            };
            first = false;
            if let Some(ops) = batch {
                if let Some(failure) = failing {
                    // Nothing of the batch reached the store, and the
                    // operations polled since are dropped with it.
                    self.uncommitted.clear();
                    server.handle_commit_failed(self.now, failure);
                } else {
                    self.store.commit(&ops).expect("memory store");
                    server.handle_committed();
                    self.note_committed(&ops, &mut deleted_unseen);
                    let server = self.server.as_mut().expect("still running");
                    if self.p.pipelined && !self.uncommitted.is_empty() {
                        self.inflight = Some(std::mem::take(&mut self.uncommitted));
                        server.seal_batch();
                    }
                }
            }
            let Some(server) = self.server.as_mut() else {
                return;
            };
            let mut out = Vec::new();
            while let Some(t) = server.poll_transmit() {
                out.push(t);
            }
            let fetching = server.wants_fetch();
            let server_ok = server.stored_bytes() <= self.config.store_bytes
                && server.table().len() <= self.config.max_clients;
            if !server_ok {
                self.violation("server over a configured bound".to_string());
            }
            let more = !out.is_empty() || fetching;
            let from = self.server_addr;
            for t in out {
                self.enqueue(from, t.to, t.payload);
            }
            for v in std::mem::take(&mut deleted_unseen) {
                self.violation(v);
            }
            if !more {
                return;
            }
        }
    }

    /// What a committed batch tells the checker.
    fn note_committed(&mut self, ops: &[StoreOp], deleted_unseen: &mut Vec<String>) {
        for op in ops {
            match op {
                StoreOp::Put(_) | StoreOp::Channel(_) => {
                    for m in &op.stored() {
                        self.put_times.insert(m.mail.0, self.now);
                        if let (Some(slot), Some(text)) =
                            (slot_of(&m.to), open(&self.secrets, self.p.seed, m))
                        {
                            self.puts
                                .insert((slot, text.clone()), (m.mail.0, m.stored_at));
                            self.mail_texts
                                .insert((m.mail.0, m.to.clone()), (slot, text));
                        }
                    }
                }
                StoreOp::Client(c) => {
                    if let Some(slot) = slot_of(&c.name) {
                        self.registry.insert(slot);
                    }
                }
                StoreOp::Delete { to, mail } => {
                    // Only the owner's ack deletes mail, and it acks
                    // only what it showed.
                    if let Some((slot, text)) = self.mail_texts.get(&(mail.0, to.clone())) {
                        let shown = self
                            .displays
                            .get(text)
                            .is_some_and(|d| d.iter().any(|d| d.slot == *slot));
                        if !shown {
                            deleted_unseen.push(format!(
                                "mail {} for c{slot} ({text}) deleted, never shown by c{slot}",
                                mail.0
                            ));
                        }
                    }
                }
                StoreOp::Forget(n) => {
                    if let Some(slot) = slot_of(n) {
                        self.registry.remove(&slot);
                    }
                }
                StoreOp::Rewrite { .. } | StoreOp::Presence { .. } => {}
            }
        }
    }

    fn deliver(&mut self, p: Packet) {
        let now = self.now;
        if self.trace_on {
            let at = (now - self.start).as_secs_f64();
            // Whole addresses: hosts behind NATs share their ports.
            println!(
                "{at:9.3} {} -> {} {:?} ({} bytes)",
                p.from,
                p.to,
                p.payload.get(1),
                p.payload.len()
            );
        }
        if p.to == self.server_addr {
            let Some(server) = self.server.as_mut() else {
                return;
            };
            // As the driver would say before a burst: behind by this much.
            let behind = self
                .busy
                .filter(|&(until, _)| until > now)
                .map_or(Duration::ZERO, |(_, by)| by);
            server.set_queue_delay(behind);
            server.handle_datagram(now, p.from, &p.payload);
            self.drain_server();
            return;
        }
        if p.to == mallory_addr() {
            if let Some(m) = self.attacker.mallory.as_mut() {
                m.handle_datagram(now, p.from, &p.payload);
                self.drain_mallory();
            }
            return;
        }
        // Through the slot's NAT (only what it lets in), or straight.
        let target = (0..self.p.clients).find_map(|slot| {
            let pid = self.current[slot]?;
            let proc = &self.procs[pid];
            let at = match &self.nats[slot] {
                Some(nat) => nat.inbound(p.to, p.from),
                None => Some(p.to),
            };
            (at == Some(proc.addr) && proc.state == ProcState::Alive).then_some(pid)
        });
        if let Some(pid) = target {
            if let Ok(packet::Datagram::Packet(Datagram::Busy { .. })) = packet::parse(&p.payload) {
                self.procs[pid].busy_at = Some(now);
            }
            self.procs[pid]
                .client
                .handle_datagram(now, p.from, &p.payload);
            self.drain_client(pid);
        }
    }

    /// Takes the server's events (and its store ops, held until the commit
    /// point), noting each channel copy a full mailbox bounced against its
    /// sender's pending send.
    fn drain_server(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        udpchat::store::serve_fetches(server, &mut self.store, self.now);
        while let Some(op) = server.poll_store() {
            self.uncommitted.push(op);
        }
        let mut bounced = Vec::new();
        while let Some(event) = server.poll_event() {
            if let ServerEvent::MailboxFull { to, from, .. } = event {
                bounced.push((to, from));
            }
        }
        // Attributed by the sender the server names, not by the datagram's
        // source: an on-path attacker may have moved it to another address.
        for (to, from) in bounced {
            let sending = slot_of(&from)
                .and_then(|slot| self.current[slot])
                .and_then(|pid| match &self.procs[pid].pending {
                    Some(Pending::Send(text)) => Some(text.clone()),
                    _ => None,
                });
            if let (Some(text), Some(slot)) = (sending, slot_of(&to)) {
                self.bounced.insert((text, slot));
            }
        }
    }

    fn drain_client(&mut self, pid: usize) {
        let mut out = Vec::new();
        let mut lines = Vec::new();
        {
            // Shows, then sends (the client holds a datagram until the
            // events before it were polled).
            let proc = &mut self.procs[pid];
            while let Some(event) = proc.client.poll_event() {
                match event {
                    Event::Closed { .. } => proc.state = ProcState::Exited,
                    other => lines.extend(console::render(&other, sim_time)),
                }
            }
            while let Some(t) = proc.client.poll_transmit() {
                out.push(t);
            }
            if proc.client.table().len() > proc.max_table {
                lines.push("!!! table over bound".to_string());
            }
        }
        let (slot, inside) = (self.procs[pid].slot, self.procs[pid].addr);
        for t in out {
            let from = match self.nats[slot].as_mut() {
                Some(nat) => nat.outbound(inside, t.to),
                None => inside,
            };
            self.enqueue(from, t.to, t.payload);
        }
        for line in lines {
            self.line(pid, &line);
        }
    }

    fn enqueue(&mut self, from: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
        let at = (self.now - self.start).as_nanos();
        (at, from, to, &payload).hash(&mut self.hasher);
        if payload.len() > wire::MAX_DATAGRAM {
            self.violation(format!("oversize datagram from {from}"));
        }
        if victims().contains(&from) {
            self.attacker.victims.entry(from).or_default().0 += payload.len();
        }
        if victims().contains(&to) {
            let v = self.attacker.victims.entry(to).or_default();
            v.1 += payload.len();
            let (got, sent) = *v;
            if sent > AMPLIFICATION * got {
                self.violation(format!(
                    "{from} sent {sent} bytes to {to}, which sent only {got} (more than {AMPLIFICATION}×)"
                ));
            }
            // Nobody lives there: nothing to deliver.
            return;
        }
        // The on-path attacker sees every datagram and keeps some.
        if self.faults && self.p.attack_every.is_some() && self.rng.chance(0.2) {
            if self.attacker.recorded.len() == RECORDED {
                self.attacker.recorded.pop_front();
            }
            self.attacker.recorded.push_back(Packet {
                from,
                to,
                payload: payload.clone(),
            });
        }
        let now = self.now;
        let (from_host, to_host) = (self.host(from), self.host(to));
        let cut = self.cuts.iter().any(|&(a, b, until)| {
            until > now
                && ((a == from_host && b.is_none_or(|b| b == to_host))
                    || (a == to_host && b.is_none_or(|b| b == from_host)))
        });
        let copies = if self.faults && self.rng.chance(self.p.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.sent += 1;
            if cut || (self.faults && self.rng.chance(self.p.loss)) {
                self.dropped += 1;
                continue;
            }
            let mut delay = Duration::from_millis(1);
            if self.faults {
                delay += self.rng.millis(0, self.p.jitter.as_millis() as u64 + 1);
                if self.rng.chance(self.p.reorder) {
                    delay += self.rng.millis(0, 150);
                }
            }
            self.queue.insert(
                (now + delay, self.sent),
                Packet {
                    from,
                    to,
                    payload: payload.clone(),
                },
            );
        }
    }

    /// Who is at a wire address, for partitions: a NAT's public address
    /// with any port is the host behind it (its ports change).
    fn host(&self, addr: SocketAddr) -> SocketAddr {
        if self.nats.iter().flatten().any(|n| n.public == addr.ip()) {
            SocketAddr::new(addr.ip(), 0)
        } else {
            addr
        }
    }

    /// Process `pid`'s host, as [`World::host`] names it.
    fn host_of(&self, pid: usize) -> SocketAddr {
        let proc = &self.procs[pid];
        match &self.nats[proc.slot] {
            Some(nat) => SocketAddr::new(nat.public, 0),
            None => proc.addr,
        }
    }

    /// Where process `pid` appears to the server (and to anyone who reads
    /// the table): its NAT's mapping, or its own address.
    fn seen_at(&self, pid: usize) -> Option<SocketAddr> {
        let proc = &self.procs[pid];
        match &self.nats[proc.slot] {
            Some(nat) => nat.mapped(proc.addr, self.server_addr),
            None => Some(proc.addr),
        }
    }

    // ---- the attacker ---------------------------------------------------------

    fn attack(&mut self) {
        let roll = self.rng.below(100);
        self.attacker.moves.1 += 1;
        match roll {
            // On path: a recorded datagram again, changed or not.
            0..=49 => {
                if self.attacker.recorded.is_empty() {
                    return;
                }
                let k = self.rng.below(self.attacker.recorded.len() as u64) as usize;
                let mut p = self.attacker.recorded[k].clone();
                match self.rng.below(6) {
                    0 | 1 => {}
                    2 => p.from = self.any_victim(),
                    3 => p.from = self.any_client_addr().unwrap_or(p.from),
                    4 => p.to = self.any_client_addr().unwrap_or(self.server_addr),
                    _ => {
                        if !p.payload.is_empty() {
                            let i = self.rng.below(p.payload.len() as u64) as usize;
                            p.payload[i] ^= 1 << self.rng.below(8);
                        }
                    }
                }
                self.inject(p);
            }
            // Another user: a process of its own key under a name someone
            // else owns.
            50..=57 => self.hijack(),
            // Off path: forged datagrams from a victim's address.
            _ => {
                let from = self.any_victim();
                let to = if self.rng.chance(0.5) {
                    self.server_addr
                } else {
                    self.any_client_addr().unwrap_or(self.server_addr)
                };
                let payload = self.forge();
                self.inject(Packet { from, to, payload });
            }
        }
    }

    /// The server keeps nothing for an address that never proved it
    /// receives: no handshake, no session, no table row.
    fn check_victims(&mut self) {
        let Some(server) = &self.server else {
            return;
        };
        let held: Vec<String> = victims()
            .into_iter()
            .filter_map(|v| {
                let state = server.state_at(v);
                let row = server.table().iter().any(|(_, e)| e.addr == v);
                (state > 0 || row).then(|| {
                    format!("the server holds {state} handshakes or sessions for {v} (row: {row})")
                })
            })
            .collect();
        for v in held {
            self.violation(v);
        }
    }

    /// Sends a datagram the attacker made, through the same network.
    fn inject(&mut self, p: Packet) {
        if self.trace_on {
            let at = (self.now - self.start).as_secs_f64();
            println!("{at:9.3} attacker {} -> {}", p.from, p.to);
        }
        self.enqueue(p.from, p.to, p.payload);
    }

    fn any_victim(&mut self) -> SocketAddr {
        let v = victims();
        v[self.rng.below(v.len() as u64) as usize]
    }

    fn any_client_addr(&mut self) -> Option<SocketAddr> {
        let slot = self.rng.below(self.p.clients as u64) as usize;
        self.current[slot].and_then(|pid| self.seen_at(pid))
    }

    /// A well-formed datagram with guessed values: the attacker knows the
    /// protocol, not the keys.
    fn forge(&mut self) -> Vec<u8> {
        let index = self.rng.next_u64();
        let mut junk = vec![0u8; 16 + self.rng.below(200) as usize];
        self.rng.fill_bytes(&mut junk);
        let mut seed = [0; 32];
        self.rng.fill_bytes(&mut seed);
        let attacker = Keypair::from_secret(seed);
        match self.rng.below(8) {
            0 => Datagram::Data {
                receiver: index,
                nonce: self.rng.next_u64() % 100,
                ciphertext: &junk,
            }
            .to_vec(),
            1 | 2 => {
                // A real first handshake message, with no cookie or a
                // forged one: the server must answer only with a retry.
                let mut hs = crypto::client_handshake(&attacker, seed);
                let mut buf = [0u8; packet::XX1_LEN + packet::TAG_LEN];
                let _ = hs.write_message(&[], &mut buf);
                let noise: [u8; packet::XX1_LEN] =
                    buf[..packet::XX1_LEN].try_into().expect("32 bytes");
                let mut cookie = [0u8; packet::COOKIE_LEN];
                self.rng.fill_bytes(&mut cookie);
                let forged = self.rng.chance(0.5);
                Datagram::Initial {
                    sender: index,
                    cookie: forged.then_some(&cookie),
                    noise: &noise,
                }
                .to_vec()
            }
            3 => {
                let mut token = [0u8; packet::TOKEN_LEN];
                self.rng.fill_bytes(&mut token);
                Datagram::Reset {
                    receiver: index,
                    token: &token,
                }
                .to_vec()
            }
            4 => {
                let mut cookie = [0u8; packet::COOKIE_LEN];
                self.rng.fill_bytes(&mut cookie);
                Datagram::Retry {
                    receiver: index,
                    cookie: &cookie,
                }
                .to_vec()
            }
            5 => {
                // A real peer handshake to a client, from a key no table
                // has.
                let slot = self.rng.below(self.p.clients as u64) as usize;
                let to = slot_key(self.p.seed, slot).public();
                let mut hs = crypto::peer_initiator(&attacker, &to, seed);
                let mut m = [0u8; packet::IK1_LEN];
                let _ = hs.write_message(&[], &mut m);
                Datagram::PeerInit {
                    sender: index,
                    noise: &m,
                }
                .to_vec()
            }
            6 => {
                // Protocol version 1, as an old client would send.
                let mut v1 = vec![1u8];
                v1.extend_from_slice(&junk[..8]);
                v1
            }
            _ => {
                let n = packet::FINISH_HEADER + packet::XX3_LEN + 8;
                let mut f = junk;
                f.resize(n.max(f.len()), 0);
                Datagram::Finish {
                    receiver: index,
                    noise: &f[packet::FINISH_HEADER..],
                }
                .to_vec()
            }
        }
    }

    /// A client of the attacker's own key registers a name that a slot's
    /// key owns (committed): it must be refused, every time.
    fn hijack(&mut self) {
        if self.attacker.mallory.is_some() || self.registry.is_empty() {
            return;
        }
        let owned: Vec<usize> = self.registry.iter().copied().collect();
        let slot = owned[self.rng.below(owned.len() as u64) as usize];
        let mut seed = [0; 32];
        self.rng.fill_bytes(&mut seed);
        let config = ClientConfig::new(
            slot_name(slot),
            self.server_addr,
            seed,
            Keypair::from_secret(seed),
            Some(server_keypair(self.p.seed).public()),
        );
        self.attacker.moves.0 += 1;
        self.attacker.mallory = Some(Client::new(config, self.now));
        self.drain_mallory();
    }

    fn drain_mallory(&mut self) {
        let Some(m) = self.attacker.mallory.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        let mut lines = Vec::new();
        let mut exited = false;
        while let Some(event) = m.poll_event() {
            match event {
                Event::Closed { .. } => exited = true,
                other => lines.extend(console::render(&other, sim_time)),
            }
        }
        while let Some(t) = m.poll_transmit() {
            out.push(t);
        }
        let name = m.name().clone();
        if exited {
            self.attacker.mallory = None;
        }
        for t in out {
            self.enqueue(mallory_addr(), t.to, t.payload);
        }
        for line in lines {
            let body = line.strip_prefix(">>> ").unwrap_or(&line);
            let hijacked = body == "[Welcome, You are registered.]"
                || body == "[You Have Messages]"
                || body.starts_with("[Message received by")
                || parse_display(body).is_some();
            if hijacked {
                self.violation(format!("the hijacker of {name} got: {line}"));
            }
            if self.trace_on {
                let at = (self.now - self.start).as_secs_f64();
                println!("{at:9.3} hijacker as {name}: {line}");
            }
        }
    }

    // ---- faults and processes ----------------------------------------------

    fn fault(&mut self) {
        let now = self.now;
        self.cuts.retain(|&(_, _, until)| until > now);
        // Only in runs that have them, so the other runs draw as before.
        if self.p.store_faults && self.rng.chance(0.3) {
            let failure = if self.rng.chance(0.5) {
                StoreFailure::Full
            } else {
                StoreFailure::Busy
            };
            self.store_fails = Some((now + self.rng.millis(100, 4000), failure));
            return;
        }
        let rebinding: Vec<usize> = (0..self.p.clients)
            .filter(|&slot| self.p.nats[slot].is_some_and(|(_, rebinds)| rebinds))
            .collect();
        if !rebinding.is_empty() && self.rng.chance(0.3) {
            // A NAT forgets its mappings (it rebooted, or they timed out):
            // its hosts' datagrams leave from new ports from now on.
            let slot = rebinding[self.rng.below(rebinding.len() as u64) as usize];
            if let Some(nat) = self.nats[slot].as_mut() {
                nat.rebind();
            }
            self.report.rebinds += 1;
            if self.trace_on {
                println!(
                    "{:9.3} c{slot}'s NAT rebinds",
                    (now - self.start).as_secs_f64()
                );
            }
            return;
        }
        if self.p.busy_spells && self.rng.chance(0.3) {
            // A transient overload: the server behind by up to 1.5 s for up
            // to 2 s (its joiners wait, back off and come back).
            let delay = self.rng.millis(300, 1500);
            self.busy = Some((now + self.rng.millis(100, 2000), delay));
            return;
        }
        match self.rng.below(10) {
            0..=4 => {
                // A partition: one client from the server, from one peer, or
                // from everyone; it heals after a while.
                let slot = self.rng.below(self.p.clients as u64) as usize;
                let Some(pid) = self.current[slot] else {
                    return;
                };
                let a = self.host_of(pid);
                let b = match self.rng.below(3) {
                    0 => Some(self.server_addr),
                    1 => {
                        let other = self.rng.below(self.p.clients as u64) as usize;
                        self.current[other].map(|o| self.host_of(o))
                    }
                    _ => None,
                };
                let until = now + self.rng.millis(300, 8000);
                self.cuts.push((a, b, until));
            }
            5..=7 => {
                let slot = self.rng.below(self.p.clients as u64) as usize;
                if let Some(pid) = self.current[slot]
                    && self.procs[pid].state == ProcState::Alive
                {
                    self.crash_process(pid);
                    if self.rng.chance(0.8) {
                        let at = now + self.rng.millis(200, 10_000);
                        let same = self.rng.chance(0.5);
                        self.restarts.insert((at, slot), same);
                    }
                }
            }
            _ => {
                if self.p.server_crashes && self.server.is_some() {
                    self.report.crashes.0 += 1;
                    if self.trace_on {
                        println!("{:9.3} server crash", (now - self.start).as_secs_f64());
                    }
                    self.server = None;
                    // Polled but never committed: lost with the process.
                    self.uncommitted.clear();
                    self.inflight = None;
                    self.server_restart = Some(now + self.rng.millis(100, 6000));
                }
            }
        }
    }

    fn crash_process(&mut self, pid: usize) {
        if self.trace_on {
            println!(
                "{:9.3} crash process {pid}",
                (self.now - self.start).as_secs_f64()
            );
        }
        self.report.crashes.1 += 1;
        let proc = &mut self.procs[pid];
        proc.state = ProcState::Crashed;
        if let Some(Pending::Send(text)) = proc.pending.take()
            && let Some(rec) = self.sends.get_mut(&text)
            && rec.outcome.is_none()
        {
            rec.outcome = Some((Outcome::SenderCrashed, self.now));
        }
    }

    fn restart_server(&mut self) {
        let mut seed = [0; 32];
        self.rng.fill_bytes(&mut seed);
        self.config.seed = seed;
        let loaded = self.store.load().expect("memory store");
        self.server = Some(Server::new(self.config.clone(), self.now, loaded));
        if self.trace_on {
            println!(
                "{:9.3} server restart",
                (self.now - self.start).as_secs_f64()
            );
        }
        let at = (self.now - self.start).as_nanos();
        (at, "server restart").hash(&mut self.hasher);
    }

    /// A new process for `slot` (the previous one, if any, has ended).
    fn start_process(&mut self, slot: usize, same_port: bool) {
        if let Some(pid) = self.current[slot]
            && self.procs[pid].state == ProcState::Alive
        {
            return;
        }
        if !same_port {
            self.next_port[slot] += 1;
        }
        let addr = slot_addr(slot, self.next_port[slot]);
        let mut seed = [0; 32];
        self.rng.fill_bytes(&mut seed);
        // The first process of a slot meets the server's key; later ones
        // have it pinned (as the key file's known_servers would).
        let pin = self
            .pinned
            .contains(&slot)
            .then(|| server_keypair(self.p.seed).public());
        self.pinned.insert(slot);
        let config = ClientConfig::new(
            slot_name(slot),
            self.server_addr,
            seed,
            slot_key(self.p.seed, slot),
            pin,
        );
        let max_table = config.max_table;
        let client = Client::new(config, self.now);
        let pid = self.procs.len();
        self.procs.push(Proc {
            slot,
            addr,
            client,
            max_table,
            state: ProcState::Alive,
            pending: None,
            shown: HashSet::new(),
            last_stored: None,
            batch_at: None,
            busy_at: None,
        });
        self.current[slot] = Some(pid);
        let at = (self.now - self.start).as_nanos();
        (at, "start", slot, addr).hash(&mut self.hasher);
        self.drain_client(pid);
    }

    /// After the heal: every ended process comes back and every offline one
    /// logs back in, so saved mail can be checked.
    fn revive_all(&mut self) {
        self.restarts.clear();
        for slot in 0..self.p.clients {
            match self.current[slot] {
                Some(pid) if self.procs[pid].state == ProcState::Alive => {
                    let proc = &self.procs[pid];
                    if !proc.client.is_online() && proc.client.is_idle() {
                        let line = format!("reg c{slot}");
                        self.command(pid, &line, Pending::Command);
                    }
                }
                _ => self.start_process(slot, true),
            }
        }
    }

    // ---- the workload -----------------------------------------------------

    fn act(&mut self, slot: usize) {
        let Some(pid) = self.current[slot] else {
            return;
        };
        let proc = &mut self.procs[pid];
        if proc.state != ProcState::Alive || !proc.client.is_idle() {
            return;
        }
        if proc.pending == Some(Pending::Command) {
            proc.pending = None;
        }
        if proc.pending.is_some() {
            return;
        }
        let online = proc.client.is_online();
        let roll = self.rng.below(100);
        if !online && roll < 70 {
            self.command(pid, &format!("reg c{slot}"), Pending::Command);
            return;
        }
        match roll {
            0..=59 => {
                // Mostly to someone else; sometimes to oneself.
                let to = self.rng.below(self.p.clients as u64) as usize;
                let text = self.text(slot);
                self.record_send(slot, pid, Some(to), &text);
                self.command(pid, &format!("send c{to} {text}"), Pending::Send(text));
            }
            60..=79 => {
                let text = self.text(slot);
                self.record_send(slot, pid, None, &text);
                self.command(pid, &format!("send_all {text}"), Pending::Send(text));
            }
            80..=87 => self.command(pid, &format!("dereg c{slot}"), Pending::Command),
            88..=91 => self.command(pid, &format!("reg c{slot}"), Pending::Command),
            _ => self.command(pid, "list", Pending::Command),
        }
    }

    fn text(&mut self, slot: usize) -> String {
        self.send_counter[slot] += 1;
        let n = self.send_counter[slot];
        // Some texts are not ASCII: nothing may cut or alter them.
        let tail = if n.is_multiple_of(5) {
            " 你好🙂"
        } else {
            ""
        };
        format!("m{}-c{slot}-{n}{tail}", self.p.seed)
    }

    fn record_send(&mut self, slot: usize, pid: usize, to: Option<usize>, text: &str) {
        self.report.sends += 1;
        let registry = if to.is_none() {
            self.registry
                .iter()
                .copied()
                .filter(|&r| r != slot)
                .collect()
        } else {
            Vec::new()
        };
        self.sends.insert(
            text.to_string(),
            SendRec {
                sender: slot,
                pid,
                to,
                issued: self.now,
                outcome: None,
                registry,
                store_refused: false,
                crashes: self.report.crashes.0,
            },
        );
    }

    fn command(&mut self, pid: usize, line: &str, pending: Pending) {
        let at = (self.now - self.start).as_nanos();
        (at, pid, line).hash(&mut self.hasher);
        self.procs[pid].pending = Some(pending);
        let now = self.now;
        let reply = console::command(&mut self.procs[pid].client, now, line);
        for line in reply.lines {
            self.line(pid, &line);
        }
        self.drain_client(pid);
    }

    // ---- the checker ------------------------------------------------------

    /// One console line of process `pid`.
    fn line(&mut self, pid: usize, line: &str) {
        if self.trace_on {
            let at = (self.now - self.start).as_secs_f64();
            println!(
                "{at:9.3} c{} (process {pid}, port {}) {line}",
                self.procs[pid].slot,
                self.procs[pid].addr.port()
            );
        }
        let at = (self.now - self.start).as_nanos();
        (at, pid, line).hash(&mut self.hasher);
        let slot = self.procs[pid].slot;
        if line.starts_with("!!!") {
            self.violation(format!("c{slot}: {line}"));
            return;
        }
        let Some(body) = line.strip_prefix(">>> ") else {
            self.violation(format!("c{slot} printed a line without '>>> ': {line:?}"));
            return;
        };
        if let Some(display) = parse_display(body) {
            self.display(pid, display);
            return;
        }
        if body == "[You Have Messages]" {
            let now = self.now;
            let proc = &mut self.procs[pid];
            proc.batch_at = Some(now);
            proc.last_stored = None;
            return;
        }
        let outcome = if let Some(rest) = body.strip_prefix("[Message received by ") {
            let who = rest.trim_end_matches(".]");
            if who == "Server" {
                Some((Outcome::ChannelAcked, None))
            } else {
                Some((Outcome::Delivered, Some(who.to_string())))
            }
        } else if body == "[Messages received by the server and saved]" {
            Some((Outcome::Saved, None))
        } else if body.starts_with("[Error: ")
            || body == "[Server not responding.]"
            || body == "[Server not responding]"
        {
            Some((Outcome::Failed, None))
        } else {
            None
        };
        let Some((outcome, who)) = outcome else {
            return;
        };
        let pending = self.procs[pid].pending.clone();
        let text = match pending {
            Some(Pending::Send(text)) => text,
            // A failure line of a reg/dereg/list, or the exit of a process
            // whose re-registration failed: not a send's.
            _ if outcome == Outcome::Failed => return,
            _ => {
                self.violation(format!(
                    "c{slot} shows an outcome with no send pending: {line}"
                ));
                return;
            }
        };
        let now = self.now;
        let Some(rec) = self.sends.get_mut(&text) else {
            return;
        };
        let fits = match (outcome, rec.to) {
            (Outcome::Delivered, Some(to)) => who.as_deref() == Some(&format!("c{to}")),
            (Outcome::Saved, Some(_)) | (Outcome::Failed, _) => true,
            (Outcome::ChannelAcked, None) => true,
            _ => false,
        };
        rec.outcome = Some((outcome, now));
        rec.store_refused = body.starts_with("[Error: the server's store is")
            && rec.crashes == self.report.crashes.0;
        self.procs[pid].pending = None;
        if outcome == Outcome::Failed {
            let kind: String = body.chars().take(30).collect();
            *self.report.failures.entry(kind).or_default() += 1;
            // Never dropped: a direct message fails only for a reason of
            // the server's (gone, refusing, full) or the sender's own, never
            // because its peer could not be reached directly.
            if rec.to.is_some() && !ACCEPTED_FAILURES.iter().any(|f| body.starts_with(f)) {
                self.violation(format!("c{slot}: a direct message was dropped: {line}"));
            }
        }
        if !fits {
            self.violation(format!(
                "c{slot}: outcome {line} does not fit the send of {text}"
            ));
        }
    }

    fn display(&mut self, pid: usize, d: Parsed) {
        self.report.displays += 1;
        let slot = self.procs[pid].slot;
        let now = self.now;
        let Some(rec) = self.sends.get(&d.text) else {
            self.violation(format!("c{slot} shows a message never sent: {:?}", d.text));
            return;
        };
        let kind_ok = match rec.to {
            Some(to) => !d.channel && to == slot,
            None => d.channel && rec.sender != slot,
        };
        if d.from != format!("c{}", rec.sender) || !kind_ok {
            self.violation(format!(
                "c{slot} shows {:?} as from {} (channel {}), sent by c{} to {:?}",
                d.text, d.from, d.channel, rec.sender, rec.to
            ));
        }
        if let Some(ts) = d.stored {
            self.stored_displays.insert(d.text.clone());
            match self.puts.get(&(slot, d.text.clone())) {
                Some(&(mail, stored_at)) => {
                    if ts != stored_at - EPOCH_UNIX {
                        self.violation(format!("c{slot} shows {:?} with time T+{ts}", d.text));
                    }
                    let proc = &self.procs[pid];
                    if let (Some(last), Some(batch)) = (proc.last_stored, proc.batch_at)
                        && mail < last
                    {
                        // Out of store order; only mail that was in the
                        // mailbox when the batch began must keep its order
                        // (newer mail may be pushed live meanwhile).
                        let old = |m: u64| self.put_times.get(&m).is_some_and(|&t| t <= batch);
                        if old(mail) && old(last) {
                            self.violation(format!(
                                "c{slot} shows stored mail {mail} after {last} (out of order)"
                            ));
                        }
                    }
                    let proc = &mut self.procs[pid];
                    proc.last_stored = Some(proc.last_stored.map_or(mail, |l| l.max(mail)));
                }
                None => {
                    self.violation(format!(
                        "c{slot} shows {:?} as stored, but it never was",
                        d.text
                    ));
                }
            }
        }
        if !self.procs[pid].shown.insert(d.text.clone()) {
            self.violation(format!("c{slot} (process {pid}) shows {:?} twice", d.text));
        }
        self.displays
            .entry(d.text)
            .or_default()
            .push(Display { slot, at: now });
    }

    /// Sends without an outcome: bounded time, and no silent ending.
    fn check_pending(&mut self) {
        let now = self.now;
        let mut late = Vec::new();
        for pid in self.current.iter().flatten().copied() {
            let proc = &mut self.procs[pid];
            let Some(Pending::Send(text)) = &proc.pending else {
                continue;
            };
            let Some(rec) = self.sends.get(text) else {
                continue;
            };
            if proc.state == ProcState::Exited {
                late.push(format!(
                    "c{}: process exited without an outcome for {text}",
                    proc.slot
                ));
                proc.pending = None;
            } else if proc.state == ProcState::Alive && proc.client.is_idle() {
                late.push(format!("c{}: send of {text} ended silently", proc.slot));
                proc.pending = None;
            } else if now - rec.issued > OUTCOME_BOUND + busy_allowance(proc.busy_at, rec.issued) {
                late.push(format!(
                    "c{}: no outcome for {text} within {OUTCOME_BOUND:?}",
                    proc.slot
                ));
                proc.pending = None;
            }
        }
        for v in late {
            self.violation(v);
        }
    }

    fn check_end(&mut self) {
        let Some(server) = self.server.as_ref() else {
            self.violation("server down at the end".to_string());
            return;
        };
        let mut v = Vec::new();
        for (_, e) in server.table().iter() {
            if victims().contains(&e.addr) || e.addr == mallory_addr() {
                v.push(format!("{} has the attacker's address {}", e.name, e.addr));
            }
        }
        // Outcomes.
        let mut counts = [0; 5];
        for (text, rec) in &self.sends {
            let Some((outcome, at)) = rec.outcome else {
                v.push(format!("c{}: no outcome for {text}", rec.sender));
                continue;
            };
            counts[outcome as usize] += 1;
            let shown: Vec<&Display> = self
                .displays
                .get(text)
                .map(|d| d.iter().collect())
                .unwrap_or_default();
            let shown_by = |slot: usize| shown.iter().filter(|d| d.slot == slot).count();
            let secrets = &self.secrets;
            let seed = self.p.seed;
            let store = &self.store;
            let mailbox_has = |slot: usize| {
                let to = slot_name(slot);
                server.mailbox(&to).any(|m| {
                    (store.get(&to, m.mail))
                        .and_then(|m| open(secrets, seed, m))
                        .as_deref()
                        == Some(text)
                })
            };
            match (outcome, rec.to) {
                (Outcome::Delivered, Some(to))
                    if !shown.iter().any(|d| d.slot == to && d.at <= at) =>
                {
                    v.push(format!(
                        "{text}: 'received by c{to}' but c{to} never showed it"
                    ));
                }
                (Outcome::Saved, Some(to)) if shown_by(to) == 0 && !mailbox_has(to) => {
                    v.push(format!(
                        "{text}: saved for c{to}, never shown and not in its mailbox"
                    ));
                }
                (Outcome::ChannelAcked, None) => {
                    for &r in &rec.registry {
                        if shown_by(r) == 0
                            && !mailbox_has(r)
                            && !self.bounced.contains(&(text.clone(), r))
                        {
                            v.push(format!("{text}: channel message acked, c{r} never got it"));
                        }
                    }
                }
                _ => {}
            }
            // Refused "not saved" by the store: a channel message is shown
            // by nobody, a direct one never as stored mail (it may have
            // reached its peer directly before the fallback).
            if rec.store_refused
                && (rec.to.is_none() && !shown.is_empty()
                    || rec.to.is_some() && self.stored_displays.contains(text))
            {
                v.push(format!(
                    "{text}: its sender was told the store refused it, yet it was shown from the server"
                ));
            }
            // Shown by two processes of one name: only after a restart.
            for slot in 0..self.p.clients {
                if shown_by(slot) > 1 {
                    self.report.excluded_restarts += 1;
                }
            }
            let _ = rec.pid;
        }
        self.report.outcomes = counts;
        // How the live clients reach the peers they talked with.
        for slot in 0..self.p.clients {
            let Some(pid) = self.current[slot] else {
                continue;
            };
            for other in 0..self.p.clients {
                match self.procs[pid].client.path(&slot_name(other)) {
                    Some(Path::Direct) => self.report.paths[0] += 1,
                    Some(Path::Punched) => self.report.paths[1] += 1,
                    Some(Path::Relayed) => self.report.paths[2] += 1,
                    None => {}
                }
            }
        }
        // Convergence: every live process is online, its table is the
        // server's, and its mailbox is empty.
        let mut server_rows: Vec<_> = server.table().iter().map(|(_, e)| e.clone()).collect();
        server_rows.sort_by(|a, b| a.name.cmp(&b.name));
        for slot in 0..self.p.clients {
            let Some(pid) = self.current[slot] else {
                continue;
            };
            let proc = &self.procs[pid];
            if proc.state != ProcState::Alive {
                v.push(format!("c{slot}: process {:?} at the end", proc.state));
                continue;
            }
            if !proc.client.is_online() {
                v.push(format!("c{slot}: not online after the quiet period"));
                continue;
            }
            let row = server
                .table()
                .lookup(&slot_name(slot))
                .map(|id| server.table().get(id));
            let seen_at = self.seen_at(pid);
            if !row.is_some_and(|e| e.online && Some(e.addr) == seen_at) {
                v.push(format!("c{slot}: online, but the server has {row:?}"));
            }
            let local: Vec<_> = proc.client.table().iter().cloned().collect();
            if local != server_rows || proc.client.table().version() != server.table().version() {
                v.push(format!(
                    "c{slot}: table v{} {:?} differs from the server's v{} {:?}",
                    proc.client.table().version(),
                    local
                        .iter()
                        .map(|e| (e.name.as_str(), e.online))
                        .collect::<Vec<_>>(),
                    server.table().version(),
                    server_rows
                        .iter()
                        .map(|e| (e.name.as_str(), e.online))
                        .collect::<Vec<_>>()
                ));
            }
            let left = server.mailbox(&slot_name(slot)).count();
            if left > 0 {
                v.push(format!(
                    "c{slot}: online, {left} messages still in its mailbox"
                ));
            }
        }
        if !server.is_idle() {
            v.push("server not idle after the quiet period".to_string());
        }
        for x in v {
            self.violation(x);
        }
    }
}

struct Parsed {
    from: String,
    text: String,
    channel: bool,
    /// Seconds since the epoch, for a stored message.
    stored: Option<i64>,
}

/// A console body that shows a message, in one of its four forms.
fn parse_display(body: &str) -> Option<Parsed> {
    if let Some(rest) = body.strip_prefix("[Channel_Message ") {
        let rest = rest.strip_suffix(']')?;
        let (from, text) = rest.split_once(": ")?;
        return Some(Parsed {
            from: from.to_string(),
            text: text.to_string(),
            channel: true,
            stored: None,
        });
    }
    if body.starts_with('[') {
        return None;
    }
    let (channel, rest) = match body.strip_prefix("Channel_Message ") {
        Some(rest) => (true, rest),
        None => (false, body),
    };
    let (from, rest) = rest.split_once(": ")?;
    if from.contains(char::is_whitespace) {
        return None;
    }
    let (stored, text) = match rest.strip_prefix("T+") {
        Some(r) => {
            let (ts, text) = r.split_once(' ')?;
            (Some(ts.parse().ok()?), text)
        }
        None if channel => return None,
        None => (None, rest),
    };
    Some(Parsed {
        from: from.to_string(),
        text: text.to_string(),
        channel,
        stored,
    })
}

/// A stored message's text, opened with its recipient's key (or the
/// server's secrets, for a channel copy): the checker holds every key.
fn open(secrets: &ServerSecrets, seed: u64, m: &StoredMail) -> Option<String> {
    let slot = slot_of(&m.to)?;
    let body = m.open(&slot_key(seed, slot), secrets)?;
    Some(body.text.to_string())
}

fn slot_of(name: &Name) -> Option<usize> {
    name.as_str().strip_prefix('c')?.parse().ok()
}

/// Runs one seed.
pub fn run_seed(seed: u64) -> Report {
    World::new(Params::from_seed(seed)).run()
}
