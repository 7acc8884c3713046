//! The load tool: many embedded `Client` state machines in this one process,
//! each on its own UDP socket, against the real server binary (a child
//! process), beside a ceiling measured in the same run.
//!
//! ```sh
//! cargo bench --bench load -- join --n 10000            # all at once
//! cargo bench --bench load -- join --n 50000 --spread 10
//! cargo bench --bench load -- echo                      # the ceiling alone
//! ```
//!
//! `join` starts `--n` clients (spread evenly over `--spread` seconds, 0 by
//! default), each registering a new name, and waits until every one is
//! registered and every table holds all `n` names online, or until
//! `--deadline` seconds (120). Clients bind distinct loopback addresses,
//! 127.1.x.y, at most 16 per address, as a storm from many hosts would come:
//! the server's per-source ration of new names (64) does not apply to it.
//! It prints:
//! - how many registered, how many gave up (`[Server not responding]`, exit
//!   1) or were refused;
//! - when the last welcome came and when the last table converged;
//! - datagrams to and from the server, and what the kernel dropped on the
//!   server's socket (`/proc/net/udp`);
//! - the server's CPU time over the storm and its datagrams per CPU-second,
//!   beside a bare `mio` echo loop's on the same machine in the same run
//!   (the ratio is the figure to compare);
//! - the server's resident memory per registered client (`VmRSS` before
//!   the first client and after the last table converged).
//!
//! Every wait has a deadline and every loop a bound: the tool stops by
//! itself, with exit status 1 if the storm did not converge.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mio::net::UdpSocket as MioSocket;
use mio::{Events, Interest, Poll, Token};
use udpchat::crypto::{Keypair, PublicKey};
use udpchat::driver::sqlite::SqliteStore;
use udpchat::store::{Body, Store, StoreOp, StoredMail};
use udpchat::wire::{MailId, MsgId, Name};
use udpchat::{Client, ClientConfig, Event};

/// Clients per loopback address.
const PER_ADDRESS: usize = 16;

/// `--store URL`: the server under load keeps its data in PostgreSQL.
static STORE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `--servers N` (with `--store`): N servers share the database, each
/// client pointed at the first and given the others.
static SERVERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(mode) = args.first() else {
        usage();
    };
    let flag = |name: &str, default: f64| -> f64 {
        match args.iter().position(|a| a == name) {
            Some(i) => args
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage()),
            None => default,
        }
    };
    if let Some(i) = args.iter().position(|a| a == "--store") {
        let url = args.get(i + 1).cloned().unwrap_or_else(|| usage());
        println!(
            "server store: PostgreSQL ({})",
            url.split('@').next_back().unwrap_or("")
        );
        let _ = STORE.set(url);
    }
    let servers = flag("--servers", 1.0) as usize;
    if servers > 1 && STORE.get().is_none() {
        eprintln!("--servers N needs --store: several servers share one database");
        usage();
    }
    let _ = SERVERS.set(servers.max(1));
    raise_fd_limit();
    match mode.as_str() {
        "join" => {
            let n = flag("--n", 1000.0) as usize;
            let spread = Duration::from_secs_f64(flag("--spread", 0.0));
            let deadline = Duration::from_secs_f64(flag("--deadline", 120.0));
            let echo = echo_ceiling();
            let ok = join(n, spread, deadline, echo);
            std::process::exit(if ok { 0 } else { 1 });
        }
        "echo" => {
            echo_ceiling();
        }
        "saves" => {
            let k = flag("--senders", 16.0) as usize;
            let secs = flag("--secs", 5.0);
            let presealed = args.iter().any(|a| a == "--presealed");
            std::process::exit(if saves(k.max(1), secs, presealed) {
                0
            } else {
                1
            });
        }
        "channel" => {
            let n = flag("--n", 1000.0) as usize;
            let rounds = flag("--rounds", 20.0) as usize;
            std::process::exit(if channel(n.max(2), rounds.max(1)) {
                0
            } else {
                1
            });
        }
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench load -- join [--n N] [--spread SECS] [--deadline SECS] | saves [--senders K] [--secs S] [--presealed] | channel [--n N] [--rounds R] | echo  (any mode: --store postgres://… [--servers N])"
    );
    std::process::exit(2)
}

// ---------------------------------------------------------------------------
// A fleet of embedded clients, one socket each, in one poll loop.

struct Member {
    client: Client,
    socket: MioSocket,
    exited: bool,
}

struct Fleet {
    poll: Poll,
    events: Events,
    members: Vec<Member>,
    server: SocketAddr,
    /// The cluster's other servers.
    others: Vec<SocketAddr>,
    t0: Instant,
    sent: u64,
    received: u64,
    buf: Box<[u8; 2048]>,
}

impl Fleet {
    fn new(servers: &Servers) -> Fleet {
        let mut addrs = servers.addrs();
        let server = addrs.remove(0);
        Fleet {
            poll: Poll::new().expect("poll"),
            events: Events::with_capacity(1024),
            members: Vec::new(),
            server,
            others: addrs,
            t0: Instant::now(),
            sent: 0,
            received: 0,
            buf: Box::new([0; 2048]),
        }
    }

    /// Time since the fleet was made.
    fn at(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Starts client `name` (its key and seed derived from `i`, its address
    /// [`client_addr`]`(i)`); it registers at once. Returns its index.
    fn spawn(&mut self, i: usize, name: &str, on: &mut dyn FnMut(usize, Event, Duration)) -> usize {
        let addr = client_addr(i);
        let std = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        std.set_nonblocking(true).expect("nonblocking");
        let mut socket = MioSocket::from_std(std);
        let k = self.members.len();
        self.poll
            .registry()
            .register(&mut socket, Token(k), Interest::READABLE)
            .expect("register socket");
        let name = Name::new(name).expect("name");
        let mut secret = [7u8; 32];
        secret[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let mut seed = [3u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let mut config =
            ClientConfig::new(name, self.server, seed, Keypair::from_secret(secret), None);
        config.alternates = self.others.clone();
        config.failover = !self.others.is_empty();
        let client = Client::new(config, Instant::now());
        self.members.push(Member {
            client,
            socket,
            exited: false,
        });
        self.drain(k, on);
        k
    }

    /// Runs `f` on member `k`'s client (a command), then sends what it made.
    fn command(
        &mut self,
        k: usize,
        f: impl FnOnce(&mut Client, Instant),
        on: &mut dyn FnMut(usize, Event, Duration),
    ) {
        f(&mut self.members[k].client, Instant::now());
        self.drain(k, on);
    }

    /// Sends member `k`'s datagrams and hands its events to `on`.
    fn drain(&mut self, k: usize, on: &mut dyn FnMut(usize, Event, Duration)) {
        let at = self.at();
        let m = &mut self.members[k];
        // Shows, then sends: a datagram waits for the events before it.
        while let Some(e) = m.client.poll_event() {
            if matches!(e, Event::Closed { .. }) {
                m.exited = true;
            }
            on(k, e, at);
        }
        let m = &mut self.members[k];
        while let Some(t) = m.client.poll_transmit() {
            let _ = m.socket.send_to(&t.payload, t.to);
            self.sent += 1;
        }
    }

    /// Reads everything waiting on member `k`'s socket.
    fn read(&mut self, k: usize, now: Instant) {
        let m = &mut self.members[k];
        // Until WouldBlock (or an error, which ends this read).
        while let Ok((len, from)) = m.socket.recv_from(&mut self.buf[..]) {
            self.received += 1;
            m.client.handle_datagram(now, from, &self.buf[..len]);
        }
    }

    /// One turn: waits (at most `max_wait`) for datagrams or the next
    /// timer, feeds what came, fires due timers.
    fn turn(&mut self, max_wait: Duration, on: &mut dyn FnMut(usize, Event, Duration)) {
        let next = self
            .members
            .iter()
            .filter_map(|m| m.client.poll_timeout())
            .min();
        let wait = next
            .map_or(max_wait, |t| t.saturating_duration_since(Instant::now()))
            .min(max_wait);
        self.poll.poll(&mut self.events, Some(wait)).expect("poll");
        let now = Instant::now();
        let mut ready: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
        // Lowest first: a mode that times one member (the channel's
        // sender is member 0) sees its datagram when it came, not after
        // a thousand others that came with it and would, for real, be
        // read by processes of their own.
        ready.sort_unstable();
        for k in ready {
            self.read(k, now);
            self.drain(k, on);
        }
        // A client's own process would have read what reached it before
        // its timer fired; this one process may not have come round to that
        // socket yet, so it reads it first (else the tool, not the server,
        // would make clients retry and give up).
        for k in 0..self.members.len() {
            if self.members[k]
                .client
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.read(k, now);
                let c = &mut self.members[k].client;
                if c.poll_timeout().is_some_and(|t| t <= now) {
                    c.handle_timeout(now);
                }
                self.drain(k, on);
            }
        }
    }

    /// Every member online with a table of `n` names, or gone.
    fn converged(&self, n: usize) -> usize {
        self.members
            .iter()
            .filter(|m| {
                !m.exited
                    && m.client.is_online()
                    && m.client.table().len() == n
                    && m.client.table().iter().all(|e| e.online)
            })
            .count()
    }
}

/// Joins `n` clients named `{prefix}{i}` (all at once) and runs until every
/// one is welcomed with a table of `n` online names, or `deadline`.
/// Returns whether all did.
fn gather(fleet: &mut Fleet, prefix: &str, n: usize, deadline: Duration) -> bool {
    let mut on = |_: usize, _: Event, _: Duration| {};
    for i in 0..n {
        fleet.spawn(i, &format!("{prefix}{i}"), &mut on);
    }
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        fleet.turn(Duration::from_millis(50), &mut on);
        if fleet.converged(n) == n {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------
// The join storm.

#[derive(Default, Clone, Copy)]
struct Joiner {
    welcomed: Option<Duration>,
    gave_up: bool,
}

fn join(n: usize, spread: Duration, deadline: Duration, echo: f64) -> bool {
    let dir = scratch("load-join");
    let server = Servers::start(&dir, &[]);
    let rss_before = server.rss();
    let cpu_before = server.cpu();
    let drops_before = server.drops();
    let client_drops_before = client_drops();
    let mut fleet = Fleet::new(&server);
    let starts: Vec<Duration> = (0..n)
        .map(|i| {
            if n > 1 {
                spread.mul_f64(i as f64 / (n - 1) as f64)
            } else {
                Duration::ZERO
            }
        })
        .collect();
    let mut joiners = vec![Joiner::default(); n];
    let last_table = Cell::new(Duration::ZERO);
    let mut complete_since: Option<Instant> = None;
    let mut on = |k: usize, e: Event, at: Duration| match e {
        Event::Welcome => joiners[k].welcomed = Some(at),
        Event::TableUpdated => last_table.set(at),
        Event::ServerNotResponding => joiners[k].gave_up = true,
        Event::Error(why) if k < 3 => eprintln!("client {k}: {why}"),
        _ => {}
    };
    loop {
        // Start the clients whose time came.
        while fleet.members.len() < n && starts[fleet.members.len()] <= fleet.at() {
            let i = fleet.members.len();
            fleet.spawn(i, &format!("load{i}"), &mut on);
        }
        let until_next = starts
            .get(fleet.members.len())
            .map_or(Duration::from_millis(50), |t| t.saturating_sub(fleet.at()));
        fleet.turn(until_next.min(Duration::from_millis(50)), &mut on);
        // Done: everyone started and settled (welcomed with a full table,
        // or gone), and nothing changed for a second.
        let settled = fleet.members.len() == n
            && fleet
                .members
                .iter()
                .all(|m| m.exited || (m.client.is_online() && m.client.table().len() == n));
        let now = Instant::now();
        if settled {
            let since = *complete_since.get_or_insert(now);
            if now - since >= Duration::from_secs(1)
                && fleet.at().saturating_sub(last_table.get()) >= Duration::from_secs(1)
            {
                break;
            }
        } else {
            complete_since = None;
        }
        if fleet.at() > deadline {
            eprintln!("deadline of {deadline:?} reached");
            break;
        }
    }
    let elapsed = fleet.at();
    let cpu = server.cpu() - cpu_before;
    let rss_after = server.rss();
    let drops = server.drops().saturating_sub(drops_before);
    let client_drops = client_drops().saturating_sub(client_drops_before);

    let registered = joiners.iter().filter(|j| j.welcomed.is_some()).count();
    let gave_up = joiners.iter().filter(|j| j.gave_up).count();
    let refused = fleet
        .members
        .iter()
        .zip(&joiners)
        .filter(|(m, j)| m.exited && !j.gave_up && j.welcomed.is_none())
        .count();
    let complete = fleet.converged(n);
    let last_welcome = joiners.iter().filter_map(|j| j.welcomed).max();
    println!("join storm: {n} clients, spread over {spread:?}");
    println!(
        "  registered {registered}, gave up {gave_up}, refused {refused}; {complete} tables hold all {n} names online"
    );
    println!(
        "  last welcome at {:.2} s, last table change at {:.2} s (run {:.2} s)",
        last_welcome.unwrap_or_default().as_secs_f64(),
        last_table.get().as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "  datagrams: {} to the server, {} from it; dropped by the server's socket: {drops}, by the clients': {client_drops}",
        fleet.sent, fleet.received
    );
    let rate = (fleet.sent + fleet.received) as f64 / cpu.max(1e-9);
    println!(
        "  server CPU {cpu:.2} s: {:.0} datagrams per CPU-second = {:.2} of the bare echo loop ({echo:.0})",
        rate,
        rate / echo
    );
    let per_client = (rss_after.saturating_sub(rss_before)) as f64 / registered.max(1) as f64;
    println!(
        "  server RSS {} KiB -> {} KiB: {per_client:.0} B per registered client",
        rss_before >> 10,
        rss_after >> 10
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    complete == n
}

// ---------------------------------------------------------------------------
// Durable saves with K senders.

/// `k` senders each keep one save-message to an offline recipient of its
/// own outstanding for `secs`; prints saves per second and the latency from
/// the command to "saved", beside SQLite's own grouped-commit rate on the
/// same disk in the same run. `presealed`: the senders send one fixed
/// seal-sized body instead of sealing each message (three X25519
/// operations each, which would make this one process, not the server,
/// the bottleneck).
fn saves(k: usize, secs: f64, presealed: bool) -> bool {
    let dir = scratch("load-saves");
    let ceiling = sqlite_ceiling(&dir.join("ceiling"));
    let server = Servers::start(&dir, &["--mailbox-messages", "1000000"]);
    let mut fleet = Fleet::new(&server);
    // The recipients: registered, then deregistered (offline, known).
    if !gather(&mut fleet, "sink", k, Duration::from_secs(60)) {
        eprintln!("the recipients did not register");
        return false;
    }
    let byes = Cell::new(0);
    let mut on_bye = |_: usize, e: Event, _: Duration| {
        byes.set(byes.get() + usize::from(matches!(e, Event::Bye)));
    };
    for s in 0..k {
        // Every sink is online here: a dereg is not refused.
        fleet.command(s, |c, now| drop(c.dereg(now)), &mut on_bye);
    }
    let end = Instant::now() + Duration::from_secs(30);
    while byes.get() < k && Instant::now() < end {
        fleet.turn(Duration::from_millis(50), &mut on_bye);
    }
    // The senders.
    let welcomed = Cell::new(0);
    let mut on_welcome = |_: usize, e: Event, _: Duration| {
        welcomed.set(welcomed.get() + usize::from(matches!(e, Event::Welcome)));
    };
    // Each sender on an address of its own, as senders on their own
    // machines would be (one address gets at most 1,000 requests a
    // second: `--requests-per-source`).
    for s in 0..k {
        fleet.spawn(
            (k + s) * PER_ADDRESS,
            &format!("sender{s}"),
            &mut on_welcome,
        );
    }
    let end = Instant::now() + Duration::from_secs(60);
    while welcomed.get() < k && Instant::now() < end {
        fleet.turn(Duration::from_millis(50), &mut on_welcome);
    }
    // Until every sender's table has its recipient, offline.
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end
        && !(0..k).all(|s| {
            let name = Name::new(&format!("sink{s}")).expect("name");
            fleet.members[k + s]
                .client
                .table()
                .get(&name)
                .is_some_and(|e| !e.online)
        })
    {
        fleet.turn(Duration::from_millis(50), &mut |_, _, _| {});
    }
    let text = "x".repeat(120);
    let sealed = vec![0x5a; text.len() + 11 + udpchat::crypto::SEALED_OVERHEAD];
    let mut log = SaveLog {
        sent_at: vec![Duration::ZERO; k],
        latencies: Vec::new(),
        errors: 0,
        due: (0..k).collect(),
    };
    let t0 = fleet.at();
    let stop = t0 + Duration::from_secs_f64(secs);
    let cpu_before = server.cpu();
    while fleet.at() < stop {
        for s in std::mem::take(&mut log.due) {
            let to = format!("sink{s}");
            log.sent_at[s] = fleet.at();
            let mut refused = false;
            fleet.command(
                k + s,
                |c, now| {
                    if presealed {
                        c.save_presealed(now, &to, &sealed);
                    } else {
                        let to = Name::new(&to).expect("a sink's name");
                        refused = c.send_message(now, &to, &text).is_err();
                    }
                },
                &mut |m, e, at| log.on(k, m, e, at),
            );
            // Refused before it went (counted like the server's refusals).
            if refused {
                log.errors += 1;
                log.due.push(s);
            }
        }
        fleet.turn(Duration::from_millis(5), &mut |m, e, at| {
            log.on(k, m, e, at)
        });
    }
    let SaveLog {
        mut latencies,
        errors,
        ..
    } = log;
    let spent = (fleet.at() - t0).as_secs_f64();
    let cpu = server.cpu() - cpu_before;
    latencies.sort_unstable();
    let rate = latencies.len() as f64 / spent;
    let how = if presealed {
        "presealed"
    } else {
        "each sealed by its sender"
    };
    println!("durable saves: {k} senders ({how}), one save outstanding each, {spent:.1} s");
    println!(
        "  {} saved ({errors} refused): {rate:.0} saves/s = {:.2} of SQLite's grouped commit here ({ceiling:.0} rows/s, 64 per commit)",
        latencies.len(),
        rate / ceiling
    );
    println!(
        "  command to \"saved\": median {:.2} ms, p99 {:.2} ms, max {:.2} ms; server CPU {cpu:.2} s",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    !latencies.is_empty()
}

/// What the `saves` senders (fleet members `k..2k`) were told.
struct SaveLog {
    /// When each sender's outstanding save was typed.
    sent_at: Vec<Duration>,
    latencies: Vec<Duration>,
    errors: usize,
    /// Senders whose save ended: they send the next.
    due: Vec<usize>,
}

impl SaveLog {
    /// Member `m`'s event (the recipients, `m < k`, are not watched).
    fn on(&mut self, k: usize, m: usize, e: Event, at: Duration) {
        let Some(s) = m.checked_sub(k) else {
            return;
        };
        match e {
            Event::Saved { .. } => {
                self.latencies.push(at - self.sent_at[s]);
                self.due.push(s);
            }
            Event::Error(_) | Event::Refused { .. } => {
                self.errors += 1;
                self.due.push(s);
            }
            _ => {}
        }
    }
}

/// Rows per second SQLite commits in transactions of 64 saves, in `dir`
/// (WAL, `synchronous=FULL`, as the server's store), for about 1.5 s.
fn sqlite_ceiling(dir: &Path) -> f64 {
    let mut store = SqliteStore::open(dir).expect("ceiling store");
    let mut spent = Duration::ZERO;
    let mut n = 0u64;
    while spent < Duration::from_millis(1500) {
        let ops: Vec<StoreOp> = (n..n + 64)
            .map(|i| {
                StoreOp::Put(StoredMail {
                    mail: MailId(i + 1),
                    to: Name::new(&format!("user{}", i % 64)).expect("name"),
                    from: Name::new(&format!("peer{}", (i / 64) % 64)).expect("name"),
                    channel: false,
                    stored_at: 1_700_000_000,
                    id: MsgId(i),
                    body: Body::Sealed {
                        key: PublicKey([7; 32]),
                        sealed: vec![0x5a; 120 + 11 + udpchat::crypto::SEALED_OVERHEAD],
                    },
                })
            })
            .collect();
        let start = Instant::now();
        store.commit(&ops).expect("ceiling commit");
        spent += start.elapsed();
        n += 64;
    }
    n as f64 / spent.as_secs_f64()
}

// ---------------------------------------------------------------------------
// Channel fan-out.

/// `n` clients online; client 0 sends `rounds` channel messages, one at a
/// time; prints how long until its ack and until the last recipient showed
/// each.
fn channel(n: usize, rounds: usize) -> bool {
    let dir = scratch("load-channel");
    let server = Servers::start(&dir, &[]);
    let mut fleet = Fleet::new(&server);
    if !gather(&mut fleet, "member", n, Duration::from_secs(120)) {
        eprintln!("the members did not all register");
        return false;
    }
    let mut acks = Vec::new();
    let mut lasts = Vec::new();
    for r in 0..rounds {
        // The recipients' acks of the last round reach the server after
        // they showed it: let the server work them off first, so a round
        // measures a channel message arriving at a server with nothing
        // else to do (the goal's figure), not queued behind 999 acks.
        let settle = Instant::now() + Duration::from_millis(100);
        while Instant::now() < settle {
            fleet.turn(Duration::from_millis(5), &mut |_, _, _| {});
        }
        let text = format!("round {r}");
        let sent = fleet.at();
        let acked = Cell::new(None);
        let shown = Cell::new(0usize);
        let last = Cell::new(Duration::ZERO);
        let mut on = |m: usize, e: Event, at: Duration| match e {
            Event::ChannelAcked { .. } if m == 0 => acked.set(Some(at - sent)),
            Event::Channel { text: t, .. } if t.as_str() == text => {
                shown.set(shown.get() + 1);
                last.set(at - sent);
            }
            _ => {}
        };
        fleet.command(0, |c, now| drop(c.send_all(now, &text)), &mut on);
        let end = Instant::now() + Duration::from_secs(10);
        while (acked.get().is_none() || shown.get() < n - 1) && Instant::now() < end {
            fleet.turn(Duration::from_millis(5), &mut on);
        }
        if shown.get() < n - 1 {
            eprintln!("round {r}: {} of {} shown", shown.get(), n - 1);
            return false;
        }
        acks.push(acked.get().unwrap_or(Duration::MAX));
        lasts.push(last.get());
    }
    acks.sort_unstable();
    lasts.sort_unstable();
    println!("channel: {n} online, {rounds} messages from one of them, one at a time");
    println!(
        "  send_all to the sender's ack: median {:.2} ms, max {:.2} ms",
        ms(percentile(&acks, 0.5)),
        ms(acks.last().copied().unwrap_or_default())
    );
    println!(
        "  send_all to the last of {} recipients showing it: median {:.2} ms, max {:.2} ms",
        n - 1,
        ms(percentile(&lasts, 0.5)),
        ms(lasts.last().copied().unwrap_or_default())
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    true
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `q` quantile of sorted `v` (nearest rank).
fn percentile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Client `i`'s address: 127.1.x.y, [`PER_ADDRESS`] clients each, port
/// chosen by the kernel.
fn client_addr(i: usize) -> SocketAddr {
    let host = i / PER_ADDRESS;
    let ip = Ipv4Addr::new(127, 1 + (host >> 16) as u8, (host >> 8) as u8, host as u8);
    SocketAddr::V4(SocketAddrV4::new(ip, 0))
}

// ---------------------------------------------------------------------------
// The ceiling: a bare mio echo loop.

/// Datagrams per CPU-second of a bare `mio` echo loop (receive one, send it
/// back) on loopback, in a thread of this process, fed by a window of
/// datagrams of a registration's size.
fn echo_ceiling() -> f64 {
    let server = UdpSocket::bind("127.0.0.1:0").expect("bind echo");
    let addr = server.local_addr().expect("echo addr");
    server.set_nonblocking(true).expect("nonblocking");
    let count: u64 = 200_000;
    let handle = std::thread::spawn(move || {
        let mut socket = MioSocket::from_std(server);
        let mut poll = Poll::new().expect("poll");
        poll.registry()
            .register(&mut socket, Token(0), Interest::READABLE)
            .expect("register");
        let mut events = Events::with_capacity(16);
        let mut buf = [0u8; 2048];
        let mut echoed = 0u64;
        let cpu0 = thread_cpu();
        let deadline = Instant::now() + Duration::from_secs(60);
        while echoed < count && Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .expect("poll");
            while let Ok((len, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..len], from);
                echoed += 1;
            }
        }
        (echoed, thread_cpu() - cpu0)
    });
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind echo client");
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let payload = [0x5au8; 120];
    let mut buf = [0u8; 2048];
    let window = 32u64;
    let (mut out, mut back) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while back < count && Instant::now() < deadline {
        while out < count && out - back < window {
            let _ = client.send_to(&payload, addr);
            out += 1;
        }
        match client.recv_from(&mut buf) {
            Ok(_) => back += 1,
            // A lost one: its slot in the window is given back.
            Err(_) => back = out.min(back + window),
        }
    }
    let (echoed, cpu) = handle.join().expect("echo thread");
    // Each echo is a datagram in and one out.
    let rate = (2 * echoed) as f64 / cpu.max(1e-9);
    println!(
        "bare mio echo loop: {echoed} echoed in {cpu:.2} CPU-s = {rate:.0} datagrams per CPU-second"
    );
    rate
}

/// This thread's CPU time in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec; the clock id is valid.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

// ---------------------------------------------------------------------------
// The server process and what /proc says about it.

/// The servers under load: one, or `--servers N` on one database.
struct Servers(Vec<ServerProcess>);

impl Servers {
    /// Starts them one after another (the first makes the key the others
    /// load from the shared data directory) and, for several, waits until
    /// each knows them all.
    fn start(dir: &Path, extra: &[&str]) -> Servers {
        let n = SERVERS.get().copied().unwrap_or(1);
        if n == 1 {
            return Servers(vec![ServerProcess::start(dir, extra, None)]);
        }
        let servers: Vec<ServerProcess> = (0..n)
            .map(|i| ServerProcess::start(dir, extra, Some((i + 1, n))))
            .collect();
        // The last started knows them all; each earlier one says so once
        // its next lease renewal lists the newcomers.
        for s in &servers[..n - 1] {
            s.wait_for(&format!("{n} servers live"));
        }
        Servers(servers)
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        (self.0.iter())
            .map(|s| SocketAddr::from((Ipv4Addr::LOCALHOST, s.port)))
            .collect()
    }

    /// Resident memory of them all, in bytes.
    fn rss(&self) -> u64 {
        self.0.iter().map(ServerProcess::rss).sum()
    }

    /// CPU seconds of them all.
    fn cpu(&self) -> f64 {
        self.0.iter().map(ServerProcess::cpu).sum()
    }

    /// Datagrams the kernel dropped on their sockets.
    fn drops(&self) -> u64 {
        self.0.iter().map(|s| udp_drops(s.port)).sum()
    }
}

struct ServerProcess {
    child: Child,
    port: u16,
    /// Its log lines about listening, buffers and the other servers.
    lines: std::sync::mpsc::Receiver<String>,
}

impl ServerProcess {
    /// `cluster`: the `i`th of `n` servers on `--store` (from 1): it
    /// advertises its loopback address and is started once it lists `i`.
    fn start(dir: &Path, extra: &[&str], cluster: Option<(usize, usize)>) -> ServerProcess {
        let port = {
            let probe = UdpSocket::bind("127.0.0.1:0").expect("probe port");
            probe.local_addr().expect("probe addr").port()
        };
        let advertise = cluster.map(|_| format!("127.0.0.1:{port}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_udpchat"))
            .args(["-s", &port.to_string(), "--data-dir"])
            .arg(dir.join("data"))
            .args(extra)
            .args(advertise.iter().flat_map(|a| ["--advertise", a.as_str()]))
            .args(
                STORE
                    .get()
                    .map(|url| ["--store", url.as_str()])
                    .into_iter()
                    .flatten(),
            )
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the server");
        let stdout = child.stdout.take().expect("server stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening on")
                    || line.contains("buffer is")
                    || line.contains("servers")
                {
                    let _ = tx.send(line);
                }
                // The rest (a line per registration) is read and dropped,
                // so the server never blocks on a full pipe.
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server did not say it listens");
        assert!(line.contains("listening on"), "{line}");
        // The last of several waits until it sees them all; the others
        // were started before it and see it within a second.
        let want = cluster.map(|(i, _)| format!("one of {i} servers"));
        let end = Instant::now() + Duration::from_secs(30);
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            println!("server: {line}");
            if want.as_ref().is_some_and(|w| line.contains(w.as_str())) {
                break;
            }
            if Instant::now() > end {
                break;
            }
        }
        ServerProcess {
            child,
            port,
            lines: rx,
        }
    }

    /// Waits (up to 30 s) until the server logs a line containing `what`.
    fn wait_for(&self, what: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                println!("server: {line}");
                if line.contains(what) {
                    return;
                }
            }
        }
        panic!("the server at port {} never said {what:?}", self.port);
    }

    fn stat(&self, file: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).unwrap_or_default()
    }

    /// Resident memory in bytes.
    fn rss(&self) -> u64 {
        let status = self.stat("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        kib << 10
    }

    /// User + system CPU seconds.
    fn cpu(&self) -> f64 {
        let stat = self.stat("stat");
        // Fields after the ")" that ends the command name.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
            .sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        ticks / hz
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SAFETY: kill with a pid we own and a valid signal.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Datagrams the kernel dropped on UDP sockets bound to `port`
/// (`/proc/net/udp`, last column).
fn udp_drops(port: u16) -> u64 {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let want = format!(":{port:04X}");
    let mut by_inode: HashMap<String, u64> = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1).is_some_and(|local| local.ends_with(&want))
            && let (Some(inode), Some(drops)) = (f.get(9), f.last())
        {
            by_inode.insert((*inode).to_string(), drops.parse().unwrap_or(0));
        }
    }
    by_inode.values().sum()
}

/// Datagrams the kernel dropped on the clients' sockets (bound in
/// 127.1.0.0/16; `/proc/net/udp` writes the address as a little-endian
/// hex word, so that is `….017F`).
fn client_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            if local.get(4..8) != Some("017F") {
                return None;
            }
            f.last()?.parse::<u64>().ok()
        })
        .sum()
}

/// Raises the soft limit on open files to the hard one: a socket per
/// client.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } == 0 {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above, read only.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    }
}

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("udpchat-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
