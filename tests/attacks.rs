//! The attacker's end-to-end tests: the real `udpchat` binary on loopback,
//! and the test playing Mallory against it — taking a name with another
//! key, replaying and altering every datagram of a recorded conversation,
//! spoofing first datagrams, forging cookies and chat messages, reading the
//! database files, swapping the server's key, speaking another protocol
//! version, and handing the client bad key files.
//!
//! Every check is of what a user (or an operator) would see: console lines,
//! exit statuses, the client table as `list` prints it, the server's log,
//! the bytes of the files. Datagrams are built with the crate's own
//! `packet`, `crypto` and `wire` modules, so a forgery is well-formed
//! wherever the attacker could make it so and fails only where the
//! cryptography says it must.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    Client, DEADLINE, MAIL, PORT_RETRIES, QUIET, Run, SAVED, Server, TABLE, WELCOME, chat,
    config_home, dereg, free_udp_port, key_file, port_in_use_error, run, run_in, scratch_dir,
    send_to_offline,
};
use mio::{Events, Interest, Poll, Token, Waker};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use udpchat::crypto::{self, Keypair, Link, PublicKey};
use udpchat::packet::{self, Datagram, Packet};
use udpchat::wire::{self, Content, Entry, MailId, Message, MsgId, Name, Seq, Text};

/// What Mallory must read, and nothing else, when she claims Alice's name.
const HIJACK_REFUSED: &str = ">>> [Registration rejected: name Alice belongs to another key.]";
/// The server's data directory inside its working directory (the default).
const DATA_DIR: &str = "udpchat-data";
/// The server's key file in its data directory.
const SERVER_KEY: &str = "server.key";
/// `>>> [Message received by Server.]`
const CHANNEL_ACKED: &str = ">>> [Message received by Server.]";
/// How long a client must stay silent after an attack that should change
/// nothing: longer than [`QUIET`], because a replayed request that wrongly
/// set off a probe (500 ms) and a table broadcast would need that long to
/// show.
const SETTLE: Duration = Duration::from_secs(2);
/// Attack datagrams go out at most this fast, so that the kernel's receive
/// buffers (a few hundred datagrams) do not silently drop part of the
/// attack while a debug build is busy.
const RATE: u64 = 2000;
/// Seed of every random choice of the attacks (bit positions, garbage).
const SEED: u64 = 0xa77a_c4e5;

// ---------------------------------------------------------------------------
// Small helpers.

/// Ctrl+C on the server, and wait until it is gone.
#[track_caller]
fn stop_server(server: &mut Server) {
    server.interrupt();
    assert!(
        server.wait_exit(DEADLINE).is_some(),
        "server did not exit within {DEADLINE:?} of SIGINT"
    );
}

/// The first line of `help`, which ends a `list` in [`rows`].
const HELP_FIRST: &str =
    ">>> send <name> <message>   direct message to a client (yourself included)";
/// Lines `help` prints.
const HELP_LINES: usize = 13;

/// The rows `list` prints at `client`, exactly as printed. `help` is typed
/// right after it, so the end of the table is a line known in advance and
/// no quiet window is needed to know that no row is missing.
#[track_caller]
fn rows(client: &mut Client) -> Vec<String> {
    client.send("list");
    client.send("help");
    common::list_header(client);
    let mut rows = Vec::new();
    loop {
        let Some(line) = client.next_line(DEADLINE) else {
            client.fail("list + help ended early");
        };
        if line == HELP_FIRST {
            break;
        }
        if rows.len() > 100 {
            client.fail("list printed more than 100 rows");
        }
        rows.push(line);
    }
    for _ in 1..HELP_LINES {
        if client.next_line(DEADLINE).is_none() {
            client.fail("help printed fewer lines than it should");
        }
    }
    rows
}

/// The rows of `list` as name → (address, status); the path a row may end
/// with (direct, punched, relayed) is how this client reaches that peer,
/// not part of the table.
#[track_caller]
fn table(client: &mut Client) -> BTreeMap<String, (String, String)> {
    let mut table = BTreeMap::new();
    for line in rows(client) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let ([">>>", name, addr, status] | [">>>", name, addr, status, _]) = fields[..] else {
            client.fail(&format!("{line:?} is not a table row"));
        };
        table.insert(name.to_owned(), (addr.to_owned(), status.to_owned()));
    }
    table
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn at(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A UDP socket of the attacker's on loopback.
fn attacker_socket() -> UdpSocket {
    UdpSocket::bind(loopback(0)).expect("bind an attacker socket")
}

/// Waits until the server's log has a line `pred` accepts; returns it.
#[track_caller]
fn await_log(server: &mut Server, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = server.stdout();
        if let Some(line) = log.iter().map(|l| common::unstamped(l)).find(|l| pred(l)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the server never logged {what} within {DEADLINE:?}; its log: {:#?}",
            server.stdout()
        );
        // A poll interval; the loop ends on the line itself.
        thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts the server never logged a registration of `name` from a client
/// port in `ports`.
#[track_caller]
fn assert_not_registered(server: &mut Server, name: &str, ports: &[u16]) {
    let log = server.stdout();
    for port in ports {
        let line = format!("{name} registered from {}", at(*port));
        assert!(
            !log.iter().any(|l| common::unstamped(l) == line),
            "the server registered {name} from port {port}: {log:#?}"
        );
    }
}

/// Pacing, not a stand-in for a condition: attack datagram `sent` is due
/// at `sent / RATE` seconds after `started`.
fn pace(started: Instant, sent: u64) {
    let due = Duration::from_micros(sent * 1_000_000 / RATE);
    if let Some(ahead) = due.checked_sub(started.elapsed()) {
        thread::sleep(ahead);
    }
}

/// Sends `data` to `to` from `socket`; a full send buffer is waited out
/// (bounded), because a datagram the attacker failed to send would make
/// the test weaker without anyone noticing.
#[track_caller]
fn send_from(socket: &UdpSocket, data: &[u8], to: SocketAddr) {
    for _ in 0..10_000 {
        match socket.send_to(data, to) {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::yield_now(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // An ICMP "port unreachable" of an earlier datagram surfacing.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => panic!("send_to {to} failed: {e}"),
        }
    }
    panic!("send_to {to} stayed blocked");
}

/// The 32 bytes of a `private <hex>` or `public <hex>` line of a key file.
fn key_line(path: &Path, label: &str) -> [u8; 32] {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    let prefix = format!("{label} ");
    let hex = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {label} line in {path:?}"));
    crypto::unhex(hex.trim()).unwrap_or_else(|| panic!("bad {label} line in {path:?}"))
}

/// The key pair in a key file the real client created.
fn read_keypair(path: &Path) -> Keypair {
    let keys = Keypair::from_secret(key_line(path, "private"));
    assert_eq!(keys.public().0, key_line(path, "public"), "{path:?}");
    keys
}

fn name(s: &str) -> Name {
    Name::new(s).expect("a valid name")
}

fn text(s: &str) -> Text {
    Text::new(s).expect("a valid text")
}

/// XX message 1 of a client with key `keys`, as the real client makes it.
fn xx_message_1(keys: &Keypair, seed: [u8; 32]) -> [u8; packet::XX1_LEN] {
    let mut hs = crypto::client_handshake(keys, seed);
    // snow wants room for a tag even where message 1 has none.
    let mut buf = [0u8; packet::XX1_LEN + packet::TAG_LEN];
    let n = hs.write_message(&[], &mut buf).expect("XX message 1");
    assert_eq!(n, packet::XX1_LEN);
    let mut msg1 = [0u8; packet::XX1_LEN];
    msg1.copy_from_slice(&buf[..n]);
    msg1
}

/// A short name for a datagram's type, for counts and failure messages.
fn kind_of(data: &[u8]) -> &'static str {
    match packet::parse(data) {
        Ok(Datagram::Packet(p)) => match p {
            Packet::Initial { cookie: None, .. } => "Initial",
            Packet::Initial {
                cookie: Some(_), ..
            } => "Initial+cookie",
            Packet::Retry { .. } => "Retry",
            Packet::Response { .. } => "Response",
            Packet::Finish { .. } => "Finish",
            Packet::Data { .. } => "Data",
            Packet::PeerInit { .. } => "PeerInit",
            Packet::PeerResponse { .. } => "PeerResponse",
            Packet::Reset { .. } => "Reset",
            Packet::Busy { .. } => "Busy",
        },
        Ok(Datagram::Negotiate(_)) => "Negotiate",
        Ok(Datagram::OtherVersion(_)) => "OtherVersion",
        Err(_) => "unparsable",
    }
}

// ---------------------------------------------------------------------------
// Counting what comes back to an attacker's socket.

#[derive(Default)]
struct Heard {
    got: Vec<(SocketAddr, Vec<u8>)>,
    last: Option<Instant>,
}

/// Everything a socket receives, gathered on a thread (so no answer is lost
/// to a full buffer while the test is busy sending), bounded in count and
/// time.
struct Tally {
    heard: Arc<Mutex<Heard>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
}

/// A tally stops by itself after this long.
const TALLY_LIFETIME: Duration = Duration::from_secs(120);
/// Most datagrams a tally keeps.
const TALLY_MAX: usize = 100_000;

impl Tally {
    fn start(socket: &UdpSocket) -> Tally {
        let socket = socket.try_clone().expect("clone the attacker socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        let heard = Arc::new(Mutex::new(Heard::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (heard, stop) = (Arc::clone(&heard), Arc::clone(&stop));
            thread::spawn(move || {
                let started = Instant::now();
                let mut buf = vec![0u8; 2048];
                while !stop.load(Ordering::Relaxed) && started.elapsed() < TALLY_LIFETIME {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let mut h = heard.lock().unwrap_or_else(|e| e.into_inner());
                        if h.got.len() < TALLY_MAX {
                            h.got.push((from, buf[..n].to_vec()));
                        }
                        h.last = Some(Instant::now());
                    }
                }
            })
        };
        Tally {
            heard,
            stop,
            thread: Some(thread),
            started: Instant::now(),
        }
    }

    fn heard(&self) -> MutexGuard<'_, Heard> {
        self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until nothing arrived for [`QUIET`] (bounded by [`DEADLINE`]),
    /// then returns everything received.
    fn settle(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let last = self.heard().last.unwrap_or(self.started);
            let since = Instant::now().max(last) - last;
            if since >= QUIET || Instant::now() >= deadline {
                return self.heard().got.clone();
            }
            // A poll interval; the loop ends on the quiet itself.
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `within` for the `n`-th datagram to arrive.
    fn await_count(&self, n: usize, within: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.heard().got.clone();
            if got.len() >= n || Instant::now() >= deadline {
                return got;
            }
            // A poll interval; the loop ends on the arrival itself.
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes in `got` that came from `from` (every source when `None`).
fn bytes_from(got: &[(SocketAddr, Vec<u8>)], from: Option<SocketAddr>) -> usize {
    got.iter()
        .filter(|(src, _)| from.is_none_or(|f| *src == f))
        .map(|(_, d)| d.len())
        .sum()
}

// ---------------------------------------------------------------------------
// A recording relay: every datagram between the clients and the server, and
// between the clients, crosses it and is kept.

/// One datagram the relay forwarded: from endpoint `from` to endpoint `to`
/// (indexes into the relay's endpoints; 0 is the server).
#[derive(Debug, Clone)]
struct Recorded {
    from: usize,
    to: usize,
    data: Vec<u8>,
}

#[derive(Default)]
struct Tape {
    recording: bool,
    datagrams: Vec<Recorded>,
    /// Handles on the relay's sockets: `senders[i]` is the socket that
    /// stands for endpoint `i`, so the test can send "as" it.
    senders: Vec<UdpSocket>,
    /// The real address of each endpoint.
    real: Vec<SocketAddr>,
}

/// Most endpoints the relay stands in for.
const RELAY_ENDPOINTS: usize = 16;
/// The relay stops by itself after this long.
const RELAY_LIFETIME: Duration = Duration::from_secs(300);
const WAKE: Token = Token(usize::MAX);

/// A loopback relay with one socket per real endpoint (as in
/// `tests/chaos.rs`, without the chaos): whatever reaches socket `P_x`
/// from real endpoint `y` goes on to `x` from `P_y`. Clients are told
/// `P_server` is the server; the server records `P_y` as `y`'s address,
/// so direct messages between clients cross the relay too.
struct Relay {
    port: u16,
    tape: Arc<Mutex<Tape>>,
    stop: Arc<AtomicBool>,
    waker: Waker,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(server_port: u16) -> Relay {
        let poll = Poll::new().expect("relay poll");
        let waker = Waker::new(poll.registry(), WAKE).expect("relay waker");
        let tape = Arc::new(Mutex::new(Tape {
            recording: true,
            ..Tape::default()
        }));
        let mut inner = RelayThread {
            poll,
            sockets: Vec::new(),
            real: Vec::new(),
            by_real: HashMap::new(),
            tape: Arc::clone(&tape),
        };
        let front = inner
            .endpoint(loopback(server_port))
            .expect("the relay's front socket");
        let port = inner.sockets[front]
            .local_addr()
            .expect("relay address")
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || inner.run(&stop))
        };
        Relay {
            port,
            tape,
            stop,
            waker,
            thread: Some(thread),
        }
    }

    /// The port clients use as the server's.
    fn port(&self) -> u16 {
        self.port
    }

    fn tape(&self) -> MutexGuard<'_, Tape> {
        self.tape.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops recording (forwarding goes on) and returns what was recorded.
    fn stop_recording(&self) -> Vec<Recorded> {
        let mut tape = self.tape();
        tape.recording = false;
        std::mem::take(&mut tape.datagrams)
    }

    /// The endpoint whose real address has `port`.
    #[track_caller]
    fn endpoint_of(&self, port: u16) -> usize {
        let tape = self.tape();
        tape.real
            .iter()
            .position(|a| a.port() == port)
            .unwrap_or_else(|| panic!("the relay never saw port {port}: {:?}", tape.real))
    }

    /// Handles on the relay's sockets and the endpoints' real addresses.
    fn sockets(&self) -> (Vec<UdpSocket>, Vec<SocketAddr>) {
        let tape = self.tape();
        let senders = tape
            .senders
            .iter()
            .map(|s| s.try_clone().expect("clone a relay socket"))
            .collect();
        (senders, tape.real.clone())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct RelayThread {
    poll: Poll,
    sockets: Vec<mio::net::UdpSocket>,
    real: Vec<SocketAddr>,
    by_real: HashMap<SocketAddr, usize>,
    tape: Arc<Mutex<Tape>>,
}

impl RelayThread {
    fn run(&mut self, stop: &AtomicBool) {
        let started = Instant::now();
        let mut events = Events::with_capacity(64);
        let mut buf = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) && started.elapsed() < RELAY_LIFETIME {
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(200)))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return;
            }
            // Every socket, not only those reported ready: edge-triggered
            // readiness of a socket drained only partly is not repeated.
            let mut more = true;
            for _ in 0..64 {
                if !more {
                    break;
                }
                more = false;
                for at in 0..self.sockets.len() {
                    more |= self.drain(at, &mut buf);
                }
            }
        }
    }

    /// Forwards up to 256 datagrams that reached socket `at`; true if more
    /// may be waiting.
    fn drain(&mut self, at: usize, buf: &mut [u8]) -> bool {
        for _ in 0..256 {
            let (n, src) = match self.sockets[at].recv_from(buf) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => continue,
            };
            let Some(from) = self.endpoint(src) else {
                continue;
            };
            let data = buf[..n].to_vec();
            let _ = self.sockets[from].send_to(&data, self.real[at]);
            let mut tape = self.tape.lock().unwrap_or_else(|e| e.into_inner());
            if tape.recording {
                tape.datagrams.push(Recorded { from, to: at, data });
            }
        }
        true
    }

    /// The socket standing for real endpoint `src`, made on first sight.
    fn endpoint(&mut self, src: SocketAddr) -> Option<usize> {
        if let Some(&i) = self.by_real.get(&src) {
            return Some(i);
        }
        if self.sockets.len() >= RELAY_ENDPOINTS {
            return None;
        }
        let socket = UdpSocket::bind(loopback(0)).ok()?;
        socket.set_nonblocking(true).ok()?;
        let handle = socket.try_clone().ok()?;
        let mut socket = mio::net::UdpSocket::from_std(socket);
        let i = self.sockets.len();
        self.poll
            .registry()
            .register(&mut socket, Token(i), Interest::READABLE)
            .ok()?;
        self.sockets.push(socket);
        self.real.push(src);
        self.by_real.insert(src, i);
        let mut tape = self.tape.lock().unwrap_or_else(|e| e.into_inner());
        tape.senders.push(handle);
        tape.real.push(src);
        Some(i)
    }
}

/// Starts `names` one after another on the server behind `port`, as
/// [`Client::join_all`] does for a harness server.
#[track_caller]
fn join_at<const N: usize>(port: u16, names: [&str; N]) -> [Client; N] {
    let mut clients: Vec<Client> = Vec::with_capacity(N);
    for name in names {
        let mut newcomer = Client::start(name, port);
        newcomer.expect_lines(&[WELCOME, TABLE]);
        for earlier in &mut clients {
            earlier.expect(TABLE);
        }
        clients.push(newcomer);
    }
    let Ok(clients) = <[Client; N]>::try_from(clients) else {
        unreachable!("exactly N clients were pushed")
    };
    clients
}

// ---------------------------------------------------------------------------
// 1. Name hijack.

/// Mallory starts `udpchat -c Alice …` with her own key (`--key` in a
/// directory of her own): she must read exactly the rejection, exit 1, and
/// never see a message; the server must log the refusal and never a
/// registration from her port.
#[track_caller]
fn hijack_is_refused(server: &mut Server, mallory_dir: &Path) {
    let key = mallory_dir.join("mallory.key");
    let key = key.to_str().expect("a UTF-8 path");
    let mut mallory = Client::start_with("Alice", server.port(), &["--key", key]);
    mallory.expect(HIJACK_REFUSED);
    mallory.expect_exit(1);
    mallory.assert_stderr_empty();
    let refusal = format!(
        "refused Alice from {}: the name belongs to another key",
        at(mallory.port())
    );
    await_log(server, &refusal, |l| l == refusal);
    assert_not_registered(server, "Alice", &[mallory.port()]);
}

/// Attack: Mallory claims the name of a client that deregistered and has
/// mail waiting. Proves the name stays the owner's key's: Mallory is
/// refused and sees no mail, and the real Alice, logging back with her own
/// key, gets every saved message exactly once.
#[test]
fn hijack_of_a_deregistered_name_is_refused_and_the_mail_kept() {
    let mut server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    dereg(&mut alice, &mut [&mut bob]);
    send_to_offline(&mut bob, "Alice", "for Alice only, one");
    send_to_offline(&mut bob, "Alice", "for Alice only, two");

    let mallory = scratch_dir();
    hijack_is_refused(&mut server, mallory.path());
    // Twice: a refusal leaves nothing behind that a second try could use.
    hijack_is_refused(&mut server, mallory.path());
    // Nobody's table changed.
    bob.expect_quiet(QUIET);
    alice.expect_quiet(QUIET);

    alice.send("reg Alice");
    alice.expect_lines(&[
        MAIL,
        ">>> Bob: <ts> for Alice only, one",
        ">>> Bob: <ts> for Alice only, two",
        TABLE,
    ]);
    bob.expect(TABLE);
    alice.expect_quiet(QUIET);

    alice.finish();
    bob.finish();
}

/// Attack: Mallory claims the name of a client that vanished without a
/// word (killed), first while the table still shows it online, then once
/// mail was saved for it. Proves that a silent owner loses neither name
/// nor mail to another key, while the owner's own key, started again,
/// takes the name back and gets every saved message exactly once.
#[test]
fn hijack_of_a_silently_gone_name_is_refused_and_the_mail_kept() {
    let mut server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    alice.signal(libc::SIGKILL);
    alice.wait_exit(DEADLINE);
    alice.expect_end();
    // Keep the dead client's port out of the kernel's hands, so nobody
    // draws it and takes over its address.
    let _old_port = UdpSocket::bind(("0.0.0.0", alice.port())).ok();

    let mallory = scratch_dir();
    // Still listed online, silent: refused at once, on the key alone.
    hijack_is_refused(&mut server, mallory.path());

    bob.send("send Alice while you were gone");
    bob.expect_lines(&[
        ">>> [No ACK from Alice, message sent to server.]",
        TABLE,
        SAVED,
    ]);
    send_to_offline(&mut bob, "Alice", "and once more");

    // Offline now, with mail.
    hijack_is_refused(&mut server, mallory.path());
    bob.expect_quiet(QUIET);

    let mut alice = Client::start("Alice", server.port());
    alice.expect_lines(&[
        WELCOME,
        MAIL,
        ">>> Bob: <ts> while you were gone",
        ">>> Bob: <ts> and once more",
        TABLE,
    ]);
    bob.expect(TABLE);
    alice.expect_quiet(QUIET);
    chat(&mut bob, &mut alice, "welcome back");

    alice.finish();
    bob.finish();
}

/// Attack: Mallory claims the name of a client that is online. Proves the
/// live owner is neither displaced nor disturbed (no table change anywhere,
/// its row keeps its address, messages still reach it), and that its mail
/// saved later is still its own alone.
#[test]
fn hijack_of_an_online_name_is_refused_and_the_owner_undisturbed() {
    let mut server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    let before = table(&mut bob);

    let mallory = scratch_dir();
    hijack_is_refused(&mut server, mallory.path());
    alice.expect_quiet(QUIET);
    bob.expect_quiet(QUIET);
    assert_eq!(table(&mut bob), before, "Bob's table after the hijack");
    assert_eq!(
        before.get("Alice"),
        Some(&(at(alice.port()), "online".to_owned())),
        "Bob's table: {before:?}"
    );
    chat(&mut bob, &mut alice, "still the real you?");
    chat(&mut alice, &mut bob, "still me");

    dereg(&mut alice, &mut [&mut bob]);
    send_to_offline(&mut bob, "Alice", "kept for the real Alice");
    hijack_is_refused(&mut server, mallory.path());
    alice.send("reg Alice");
    alice.expect_lines(&[MAIL, ">>> Bob: <ts> kept for the real Alice", TABLE]);
    bob.expect(TABLE);
    alice.expect_quiet(QUIET);

    alice.finish();
    bob.finish();
}

// ---------------------------------------------------------------------------
// 2. Replay.

/// One bit of `data` flipped, at `bit`.
fn flipped(data: &[u8], bit: usize) -> Vec<u8> {
    let mut d = data.to_vec();
    d[bit / 8] ^= 1 << (bit % 8);
    d
}

/// The altered copies of one datagram: a bit flipped in the header (the
/// version, type, indexes, nonce or cookie), one anywhere, and the last
/// bit (a tag's, for every encrypted type).
fn alterations(data: &[u8], rng: &mut ChaCha8Rng) -> Vec<Vec<u8>> {
    let bits = data.len() * 8;
    let header = data.len().min(packet::DATA_HEADER) * 8;
    vec![
        flipped(data, rng.next_u32() as usize % header),
        flipped(data, rng.next_u32() as usize % bits),
        flipped(data, bits - 1),
    ]
}

/// Attack: an on-path recorder keeps every datagram of a whole
/// conversation (registrations with their cookie round trips, direct
/// chat with its peer handshakes, a message saved for an offline client,
/// a channel message, a log-back with mail, a dereg), then sends each one
/// again — from the socket that first carried it and from a fresh one —
/// and then each with one bit flipped, three ways. Proves that a replayed
/// or altered datagram changes nothing a user sees: no client prints a
/// line, every `list` is unchanged, the server logs nothing new, chat goes
/// on as before, and the fresh socket gets back at most 3× the bytes it
/// sent.
#[test]
fn replayed_and_altered_datagrams_change_nothing() {
    let mut server = Server::start();
    let relay = Relay::start(server.port());
    let [mut alice, mut bob, mut carol] = join_at(relay.port(), ["Alice", "Bob", "Carol"]);

    chat(&mut alice, &mut bob, "hello Bob");
    chat(&mut bob, &mut alice, "hello Alice");
    chat(&mut carol, &mut alice, "hi from Carol");
    dereg(&mut carol, &mut [&mut alice, &mut bob]);
    send_to_offline(&mut alice, "Carol", "saved for Carol");
    bob.send("send_all to the channel");
    bob.expect(CHANNEL_ACKED);
    alice.expect(">>> [Channel_Message Bob: to the channel]");
    carol.send("reg Carol");
    carol.expect_lines(&[
        MAIL,
        ">>> Alice: <ts> saved for Carol",
        ">>> Channel_Message Bob: <ts> to the channel",
        TABLE,
    ]);
    alice.expect(TABLE);
    bob.expect(TABLE);
    chat(&mut bob, &mut carol, "back again?");
    // Carol ends offline, so replays meet a deregistered client too.
    dereg(&mut carol, &mut [&mut alice, &mut bob]);

    let tape = relay.stop_recording();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &tape {
        *kinds.entry(kind_of(&r.data)).or_default() += 1;
    }
    for kind in [
        "Initial",
        "Initial+cookie",
        "Retry",
        "Response",
        "Finish",
        "Data",
        "PeerInit",
        "PeerResponse",
    ] {
        assert!(
            kinds.contains_key(kind),
            "the recording has no {kind} datagram: {kinds:?}"
        );
    }

    let tables_before = [table(&mut alice), table(&mut bob), table(&mut carol)];
    assert_eq!(
        tables_before[0], tables_before[1],
        "Alice's and Bob's tables"
    );
    let log_before = server.stdout();

    let (senders, real) = relay.sockets();
    let fresh = attacker_socket();
    let tally = Tally::start(&fresh);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut fresh_sent: usize = 0;
    let mut fresh_sent_to_server: usize = 0;
    let mut altered = Vec::new();
    for r in &tape {
        for a in alterations(&r.data, &mut rng) {
            altered.push(Recorded {
                from: r.from,
                to: r.to,
                data: a,
            });
        }
    }
    let started = Instant::now();
    let mut n: u64 = 0;
    for r in tape.iter().chain(&altered) {
        // From the source: the relay's socket that first carried it.
        send_from(&senders[r.from], &r.data, real[r.to]);
        // From elsewhere: straight to the destination, from a stranger.
        send_from(&fresh, &r.data, real[r.to]);
        fresh_sent += r.data.len();
        if r.to == 0 {
            fresh_sent_to_server += r.data.len();
        }
        n += 2;
        pace(started, n);
    }

    alice.expect_quiet(SETTLE);
    bob.expect_quiet(QUIET);
    carol.expect_quiet(QUIET);
    let got = tally.settle();
    let from_server = bytes_from(&got, Some(real[0]));
    let from_anyone = bytes_from(&got, None);
    assert!(
        from_server <= 3 * fresh_sent_to_server,
        "the server sent the fresh socket {from_server} bytes for {fresh_sent_to_server}"
    );
    assert!(
        from_anyone <= 3 * fresh_sent,
        "the fresh socket got {from_anyone} bytes back for {fresh_sent}"
    );
    assert_eq!(server.stdout(), log_before, "the server's log changed");

    let tables_after = [table(&mut alice), table(&mut bob), table(&mut carol)];
    assert_eq!(tables_after, tables_before, "the tables changed");

    // Chat goes on as before, over the same sessions and new ones.
    chat(&mut alice, &mut bob, "after the replay");
    chat(&mut bob, &mut alice, "nothing changed");
    carol.send("reg Carol");
    carol.expect(TABLE);
    alice.expect(TABLE);
    bob.expect(TABLE);
    chat(&mut carol, &mut alice, "still here");
    alice.send("send_all all well");
    alice.expect(CHANNEL_ACKED);
    bob.expect(">>> [Channel_Message Alice: all well]");
    carol.expect(">>> [Channel_Message Alice: all well]");

    alice.finish();
    bob.finish();
    carol.finish();
}

/// How many channel messages push a registration's answer out of the
/// server's reply cache (16 replies per session), with the dereg after
/// them.
const PAST_THE_REPLY_CACHE: usize = 16;

/// Attack: the recorder keeps the handshake's last datagram (the one that
/// carries a registration) of a client that then sends enough requests
/// for the server to forget that registration's answer, and deregisters;
/// the recorder then sends the registration again from the client's
/// address. Proves that a replayed registration cannot log a deregistered
/// client back in: no table changes, the client stays offline.
#[test]
fn a_replayed_registration_does_not_log_a_deregistered_client_back_in() {
    let mut server = Server::start();
    let relay = Relay::start(server.port());
    let [mut alice, mut bob] = join_at(relay.port(), ["Alice", "Bob"]);
    for i in 0..PAST_THE_REPLY_CACHE {
        alice.send(&format!("send_all number {i}"));
        alice.expect(CHANNEL_ACKED);
        bob.expect(&format!(">>> [Channel_Message Alice: number {i}]"));
    }
    dereg(&mut alice, &mut [&mut bob]);
    let tape = relay.stop_recording();
    let alice_at = relay.endpoint_of(alice.port());
    let finishes: Vec<&Recorded> = tape
        .iter()
        .filter(|r| r.from == alice_at && r.to == 0 && kind_of(&r.data) == "Finish")
        .collect();
    assert!(!finishes.is_empty(), "no registration of Alice recorded");
    let before = table(&mut bob);
    let log_before = server.stdout();

    let (senders, real) = relay.sockets();
    for r in &finishes {
        send_from(&senders[r.from], &r.data, real[r.to]);
    }

    bob.expect_quiet(SETTLE);
    alice.expect_quiet(QUIET);
    assert_eq!(server.stdout(), log_before, "the server's log changed");
    assert_eq!(table(&mut bob), before, "Bob's table");
    assert_eq!(
        before.get("Alice").map(|(_, s)| s.as_str()),
        Some("offline"),
        "{before:?}"
    );

    alice.send("reg Alice");
    alice.expect(TABLE);
    bob.expect(TABLE);
    chat(&mut bob, &mut alice, "really back");
    alice.finish();
    bob.finish();
}

// ---------------------------------------------------------------------------
// 3. Unproven first datagrams.

/// Attack: a stranger sends the server first datagrams it cannot back up —
/// a well-formed `Initial` (a real XX message 1) without a cookie, with
/// forged cookies, and with a genuine cookie that was issued to another
/// address — as a reflection attack with a spoofed source would. Proves
/// the stranger earns at most 3× its bytes, only stateless `Retry`s (never
/// a handshake answer), and no row in anyone's table; a genuine cookie at
/// its own address does earn the handshake answer, so the refusals are the
/// cookie check at work.
#[test]
fn an_unproven_first_datagram_earns_little_and_changes_nothing() {
    let mut server = Server::start();
    let [mut alice] = Client::join_all(&server, ["Alice"]);
    let before = table(&mut alice);
    let target = loopback(server.port());
    let mallory = Keypair::from_secret([0x4d; 32]);

    // A genuine cookie, for the socket `honest` alone.
    let honest = attacker_socket();
    let honest_tally = Tally::start(&honest);
    let msg1 = xx_message_1(&mallory, [0xee; 32]);
    let initial = Packet::Initial {
        sender: 7,
        cookie: None,
        noise: &msg1,
    }
    .to_vec();
    send_from(&honest, &initial, target);
    let got = honest_tally.await_count(1, DEADLINE);
    let Some((_, retry)) = got.first() else {
        panic!("no Retry for a cookie-less Initial within {DEADLINE:?}");
    };
    let Ok(Datagram::Packet(Packet::Retry { receiver, cookie })) = packet::parse(retry) else {
        panic!("the answer to an Initial is not a Retry: {retry:?}");
    };
    assert_eq!(receiver, 7, "the Retry names the Initial's index");
    let genuine = *cookie;

    let stranger = attacker_socket();
    let tally = Tally::start(&stranger);
    let forged = [[0xab; packet::COOKIE_LEN], [0; packet::COOKIE_LEN], {
        // The right time bucket, a made-up MAC.
        let mut c = genuine;
        c[packet::COOKIE_LEN - 1] ^= 1;
        c
    }];
    let mut attacks = Vec::new();
    for round in 0..20u8 {
        let msg1 = xx_message_1(&mallory, [round; 32]);
        let sender = u64::from(round);
        attacks.push(
            Packet::Initial {
                sender,
                cookie: None,
                noise: &msg1,
            }
            .to_vec(),
        );
        for cookie in forged.iter().chain([&genuine]) {
            attacks.push(
                Packet::Initial {
                    sender,
                    cookie: Some(cookie),
                    noise: &msg1,
                }
                .to_vec(),
            );
        }
    }
    let started = Instant::now();
    let mut sent = 0;
    for (i, a) in attacks.iter().enumerate() {
        send_from(&stranger, a, target);
        sent += a.len();
        pace(started, i as u64 + 1);
    }
    let got = tally.settle();
    let earned = bytes_from(&got, None);
    assert!(
        earned <= 3 * sent,
        "{sent} bytes of unproven Initials earned {earned} bytes"
    );
    for (from, d) in &got {
        assert_eq!(*from, target, "an answer from elsewhere");
        assert_eq!(
            kind_of(d),
            "Retry",
            "an unproven address got a {} (state kept for it)",
            kind_of(d)
        );
    }
    assert!(!got.is_empty(), "the server answered no Initial at all");

    // The genuine cookie at its own address: the handshake answer.
    let with_cookie = Packet::Initial {
        sender: 7,
        cookie: Some(&genuine),
        noise: &msg1,
    }
    .to_vec();
    send_from(&honest, &with_cookie, target);
    let got = honest_tally.await_count(2, DEADLINE);
    assert_eq!(
        got.get(1).map(|(_, d)| kind_of(d)),
        Some("Response"),
        "a genuine cookie did not earn the handshake answer"
    );

    alice.expect_quiet(QUIET);
    assert_eq!(table(&mut alice), before, "Alice's table");
    let registered: Vec<String> = server
        .stdout()
        .iter()
        .map(|l| common::unstamped(l).to_string())
        .filter(|l| l.contains(" registered from "))
        .collect();
    assert_eq!(
        registered,
        [format!("Alice registered from {}", at(alice.port()))],
        "registrations in the server's log"
    );
    alice.finish();
}

// ---------------------------------------------------------------------------
// 4. The database never holds a message's text.

/// Every file under `dir` (recursively), with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                todo.push(path);
            } else if meta.is_file() {
                // A file may go (the WAL at a checkpoint) between the
                // listing and the read: then there is nothing to search.
                if let Ok(bytes) = fs::read(&path) {
                    out.push((path, bytes));
                }
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts no file under `dir` holds any of `secrets`, and that `control`
/// (something the store does keep in clear, such as a name) is found, so
/// the search is known to look at the store's real bytes.
#[track_caller]
fn assert_no_secrets(dir: &Path, secrets: &[&str], control: &str, when: &str) {
    let files = files_under(dir);
    assert!(
        files
            .iter()
            .any(|(p, _)| p.file_name().is_some_and(|n| n == "udpchat.db")),
        "{when}: no udpchat.db under {dir:?}"
    );
    for (path, bytes) in &files {
        for secret in secrets {
            assert!(
                !contains(bytes, secret.as_bytes()),
                "{when}: {path:?} holds the text {secret:?}"
            );
        }
    }
    assert!(
        files.iter().any(|(_, b)| contains(b, control.as_bytes())),
        "{when}: {control:?} is in no file under {dir:?}, so the search proves nothing"
    );
}

/// Direct mail for an offline client (sealed by its sender).
const DIRECT_SECRET: &str = "DIRECT-7c1f: the vault code is 4812-9931, burn after reading";
/// A second one, in other scripts, so more than ASCII is looked for.
const DIRECT_SECRET_2: &str = "DIRECT-2b9e: 秘密のメッセージ — nur für Carol, ünïcødé ✓";
/// A channel message while Carol is offline (stored for her, delivered to
/// Alice at once).
const CHANNEL_SECRET: &str = "CHANNEL-5d0a: the meeting moved to the old boathouse at nine";
/// A channel message while everyone is online (stored a moment for each,
/// deleted on ack).
const CHANNEL_SECRET_2: &str = "CHANNEL-e4c3: everyone online hears this, nobody stores it";
/// A live direct message.
const LIVE_SECRET: &str = "LIVE-91aa: straight from Alice to Bob, no server involved";

/// Attack: someone who can read the server's disk (a backup, a stolen
/// laptop) looks for the messages in the database files. Proves that no
/// message text — direct mail saved for an offline client, channel messages
/// for offline and online clients, live chat — is ever in any file of the
/// data directory (the database, its WAL and shared memory, the key),
/// while the server runs and after it stopped, though the messages were
/// delivered intact.
#[test]
fn the_database_files_never_hold_a_message_text() {
    let mut server = Server::start();
    let [mut alice, mut bob, mut carol] = Client::join_all(&server, ["Alice", "Bob", "Carol"]);
    let data = server.dir().join(DATA_DIR);
    let secrets = [
        DIRECT_SECRET,
        DIRECT_SECRET_2,
        CHANNEL_SECRET,
        CHANNEL_SECRET_2,
        LIVE_SECRET,
    ];

    chat(&mut alice, &mut bob, LIVE_SECRET);
    bob.send(&format!("send_all {CHANNEL_SECRET_2}"));
    bob.expect(CHANNEL_ACKED);
    alice.expect(&format!(">>> [Channel_Message Bob: {CHANNEL_SECRET_2}]"));
    carol.expect(&format!(">>> [Channel_Message Bob: {CHANNEL_SECRET_2}]"));
    dereg(&mut carol, &mut [&mut alice, &mut bob]);
    send_to_offline(&mut alice, "Carol", DIRECT_SECRET);
    send_to_offline(&mut bob, "Carol", DIRECT_SECRET_2);
    bob.send(&format!("send_all {CHANNEL_SECRET}"));
    bob.expect(CHANNEL_ACKED);
    alice.expect(&format!(">>> [Channel_Message Bob: {CHANNEL_SECRET}]"));

    // Stored and waiting: the store holds them now, somewhere.
    assert_no_secrets(&data, &secrets, "Carol", "with mail waiting");

    carol.send("reg Carol");
    carol.expect_lines(&[
        MAIL,
        &format!(">>> Alice: <ts> {DIRECT_SECRET}"),
        &format!(">>> Bob: <ts> {DIRECT_SECRET_2}"),
        &format!(">>> Channel_Message Bob: <ts> {CHANNEL_SECRET}"),
        TABLE,
    ]);
    alice.expect(TABLE);
    bob.expect(TABLE);
    assert_no_secrets(&data, &secrets, "Carol", "after delivery");

    alice.finish();
    bob.finish();
    carol.finish();
    stop_server(&mut server);
    assert_no_secrets(&data, &secrets, "Carol", "after the server stopped");
    // Nor the rest of the server's directory (the clients' keys and
    // known_servers live there in these tests), nor its log.
    assert_no_secrets(server.dir(), &secrets, "Carol", "anywhere");
    let log = server.stdout().join("\n") + &server.stderr().join("\n");
    for secret in secrets {
        assert!(!log.contains(secret), "the server logged {secret:?}");
    }
}

// ---------------------------------------------------------------------------
// 5. A changed server key.

/// Attack: another server (or the same one with a new key: its `server.key`
/// deleted) answers at the address a client knows. Proves the client
/// refuses it: one line saying the key changed and how to accept a new one
/// on purpose (delete that line of `known_servers`), exit status 1, the
/// pinned key left as it was, and no registration reaches the server.
#[test]
fn a_changed_server_key_is_refused() {
    let mut server = Server::start();
    let [mut alice] = Client::join_all(&server, ["Alice"]);
    alice.finish();
    let known = config_home(server.port()).join("udpchat/known_servers");
    let pinned = fs::read_to_string(&known).expect("known_servers after the first contact");
    let old_key = server
        .stdout()
        .into_iter()
        .map(|l| common::unstamped(&l).to_string())
        .find(|l| l.starts_with("server key "))
        .expect("the server logs its key");
    assert!(
        pinned.contains(&format!(
            "{} {}",
            at(server.port()),
            &old_key["server key ".len()..]
        )),
        "known_servers does not pin the server's key: {pinned:?}"
    );

    stop_server(&mut server);
    fs::remove_file(server.dir().join(DATA_DIR).join(SERVER_KEY)).expect("delete server.key");
    server.restart();
    let new_key = await_log(&mut server, "its key", |l| l.starts_with("server key "));
    assert_ne!(new_key, old_key, "the restarted server kept its old key");

    let mut alice = Client::start("Alice", server.port());
    let Some(line) = alice.next_line(DEADLINE) else {
        alice.fail("printed nothing about the changed key");
    };
    for needle in ["key", "known_servers", "delete that line"] {
        assert!(
            line.contains(needle),
            "{line:?} does not mention {needle:?}"
        );
    }
    // That one line and nothing else, on either stream.
    alice.expect_exit(1);
    alice.assert_stderr_empty();
    assert_eq!(
        fs::read_to_string(&known).expect("known_servers"),
        pinned,
        "the pinned key was changed"
    );
    assert_not_registered(&mut server, "Alice", &[alice.port()]);
    assert!(
        !server.stdout().iter().any(|l| l.contains("registered")),
        "the server registered someone: {:#?}",
        server.stdout()
    );
}

// ---------------------------------------------------------------------------
// 6. Other protocol versions.

/// Attack (or an old client): datagrams of other protocol versions at the
/// server. Proves each gets exactly one answer, no larger than itself,
/// that says "version 2" (`[0, 2]`), and that a datagram too short to be
/// answered within that bound (one byte) gets none.
#[test]
fn another_version_gets_one_small_answer() {
    let server = Server::start();
    let target = loopback(server.port());
    for probe in [&[1u8, 0, 5, 5, 5][..], &[1, 0], &[3, 1, 2, 3], &[255; 40]] {
        let socket = attacker_socket();
        let tally = Tally::start(&socket);
        send_from(&socket, probe, target);
        tally.await_count(1, DEADLINE);
        let got = tally.settle();
        let answers: Vec<&Vec<u8>> = got.iter().map(|(_, d)| d).collect();
        assert_eq!(answers, [&vec![0u8, 2]], "answers to {probe:?}");
        assert!(answers[0].len() <= probe.len());
    }
    let socket = attacker_socket();
    let tally = Tally::start(&socket);
    send_from(&socket, &[1], target);
    let got = tally.settle();
    assert!(got.is_empty(), "a 1-byte datagram got {got:?}");
}

/// Attack (or a newer server): something at the server's address answers
/// the client's first datagram with "I speak version 3". Proves the client
/// says which versions differ, in one line, and exits 1 instead of
/// retrying into a timeout.
#[test]
fn a_server_of_another_version_is_named_and_the_client_exits() {
    let fake = attacker_socket();
    fake.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    let port = fake.local_addr().expect("fake server address").port();
    let server = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (n, from) = fake
            .recv_from(&mut buf)
            .expect("the client's first datagram");
        send_from(&fake, &[packet::NEGOTIATE, 3], from);
        buf[..n].to_vec()
    });
    let mut client = Client::start("Alice", port);
    let Some(line) = client.next_line(DEADLINE) else {
        client.fail("printed nothing");
    };
    assert!(
        line.contains("server speaks protocol version 3; this client speaks 2"),
        "{line:?}"
    );
    client.expect_exit(1);
    let first = server.join().expect("the fake server");
    assert_eq!(kind_of(&first), "Initial", "the client's first datagram");
}

// ---------------------------------------------------------------------------
// 7. Key files.

/// Runs `udpchat -c Alice 127.0.0.1 <server> <free port> --key <key>` to
/// its end (it must end by itself), choosing another port if the one picked
/// was taken meanwhile.
fn run_client(server_port: u16, key: &Path) -> Run {
    let key = key.to_str().expect("a UTF-8 path");
    for _ in 0..PORT_RETRIES {
        let port = free_udp_port();
        let out = run(&[
            "-c",
            "Alice",
            "127.0.0.1",
            &server_port.to_string(),
            &port.to_string(),
            "--key",
            key,
        ]);
        if out.stderr != [port_in_use_error(port)] {
            return out;
        }
    }
    panic!("no free client port after {PORT_RETRIES} tries");
}

/// Asserts `out` is a refusal to use the key file at `key`: status 1,
/// nothing on stdout, one stderr line naming the file and containing
/// `why`, no panic.
#[track_caller]
fn assert_key_refused(out: &Run, key: &Path, why: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{:?} {:?}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    let [line] = &out.stderr[..] else {
        panic!("expected one stderr line, got {:?}", out.stderr);
    };
    assert!(
        line.contains(&key.display().to_string()),
        "{line:?} does not name {key:?}"
    );
    assert!(line.contains(why), "{line:?} does not say {why:?}");
    assert!(out.no_panic(), "{:?}", out.stderr);
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("key file").permissions().mode() & 0o7777
}

/// Attack: the client's key file is left readable by others, or damaged
/// (cut short, emptied). Proves the client refuses to run with one clear
/// line on stderr naming the file, exit status 1, and never touches the
/// file — the owner's identity survives: put right, the same key registers
/// the name again.
#[test]
fn a_bad_key_file_is_refused_and_left_alone() {
    let server = Server::start();
    let dir = scratch_dir();
    let key = dir.path().join("alice.key");
    let key_arg = key.to_str().expect("a UTF-8 path");
    let mut alice = Client::start_with("Alice", server.port(), &["--key", key_arg]);
    alice.expect_lines(&[WELCOME, TABLE]);
    alice.finish();
    let original = fs::read(&key).expect("the key file the client made");
    assert_eq!(mode(&key), 0o600, "a new key file's mode");

    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod 644");
    let out = run_client(server.port(), &key);
    assert_key_refused(&out, &key, "readable by others");
    assert_eq!(
        fs::read(&key).expect("key file"),
        original,
        "the file changed"
    );
    assert_eq!(mode(&key), 0o644, "the file's mode changed");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod 600");

    for cut in [original.len() / 2, 0] {
        fs::write(&key, &original[..cut]).expect("damage the key file");
        let out = run_client(server.port(), &key);
        assert_key_refused(&out, &key, "damaged");
        assert_eq!(
            fs::read(&key).expect("key file"),
            &original[..cut],
            "the damaged file changed"
        );
        assert_eq!(mode(&key), 0o600, "the damaged file's mode changed");
    }

    // Put right: the same key, so the name is still Alice's.
    fs::write(&key, &original).expect("restore the key file");
    let mut alice = Client::start_with("Alice", server.port(), &["--key", key_arg]);
    alice.expect_lines(&[WELCOME, TABLE]);
    alice.finish();
}

// ---------------------------------------------------------------------------
// 8. Operator release.

/// Attack surface for the operator: a name's key is lost, so the operator
/// releases it (`udpchat --release Alice`, server stopped). Proves the
/// release is what frees a name — before it another key is refused, after
/// it another key registers Alice — and that the new owner does NOT get
/// the old owner's mail, while the old key is now the stranger.
#[test]
fn an_operator_release_frees_the_name_without_its_mail() {
    let mut server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    dereg(&mut alice, &mut [&mut bob]);
    send_to_offline(&mut bob, "Alice", "for the old Alice only");
    alice.finish();
    bob.finish();
    let newcomer = scratch_dir();
    hijack_is_refused(&mut server, newcomer.path());

    stop_server(&mut server);
    let out = run_in(
        server.dir(),
        &["--release", "Alice", "--data-dir", DATA_DIR],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{:?} {:?}",
        out.stdout,
        out.stderr
    );
    let [line] = &out.stdout[..] else {
        panic!("--release printed {:?}", out.stdout);
    };
    assert!(line.starts_with("released Alice: "), "{line:?}");
    server.restart();

    let key = newcomer.path().join("mallory.key");
    let key = key.to_str().expect("a UTF-8 path");
    let mut new_alice = Client::start_with("Alice", server.port(), &["--key", key]);
    new_alice.expect_lines(&[WELCOME, TABLE]);
    new_alice.expect_quiet(QUIET);

    let mut old_alice = Client::start("Alice", server.port());
    old_alice.expect(HIJACK_REFUSED);
    old_alice.expect_exit(1);
    new_alice.expect_quiet(QUIET);

    new_alice.finish();
    let log = server.stdout();
    assert!(
        !log.iter().any(|l| l.contains("cannot be decrypted")),
        "{log:#?}"
    );
}

// ---------------------------------------------------------------------------
// 9. Impersonation with raw datagrams.

/// A fake channel message "from Alice" as the server would deliver it.
fn fake_delivery(from: &str, t: &str) -> Message {
    Message::Deliver {
        mail: MailId(1),
        batch: Seq(0),
        pos: None,
        stored_at: 0,
        from: name(from),
        content: Content::Relayed {
            channel: true,
            verified: true,
            id: MsgId(77),
            text: text(t),
        },
    }
}

/// Attack: Mallory, a registered client, forges messages to Bob. First
/// from a stranger's socket with no session at all: a version-1 `Chat`
/// "from Alice" in clear, the same inside a version-2 `Data` frame, random
/// `Data` (also with the index of a real session of Bob's), random peer
/// handshakes, a forged reset. Then over a genuine encrypted session with
/// Bob under her own key: chats claiming to be from Alice or from Bob
/// himself, one addressed to Alice, a forged server delivery, a forged
/// table update. Proves Bob shows none of it, his table is unchanged, and
/// Alice sees nothing — while the same session's honest message ("from
/// Mallory") is shown once, so the refusals are the name check at work,
/// and a replay of that message is not shown again.
#[test]
fn forged_messages_show_nothing() {
    let server = Server::start();
    let [mut alice, mut bob, mut mallory] = Client::join_all(&server, ["Alice", "Bob", "Mallory"]);
    let bob_at = loopback(bob.port());
    let before = table(&mut bob);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);

    // --- No session: clear text and garbage.
    let stranger = attacker_socket();
    let stranger_tally = Tally::start(&stranger);
    let claim = Message::Chat {
        from: name("Alice"),
        to: name("Bob"),
        id: MsgId(1),
        text: text("v1: this is Alice, trust me"),
    };
    let mut raw: Vec<Vec<u8>> = Vec::new();
    let mut v1 = vec![1u8];
    v1.extend_from_slice(&wire::encode_to_vec(&claim));
    raw.push(v1);
    let mut clear = wire::encode_to_vec(&claim);
    clear.extend_from_slice(&[0u8; packet::TAG_LEN]);
    for _ in 0..20 {
        raw.push(
            Packet::Data {
                receiver: rng.next_u64(),
                nonce: rng.next_u64() % 64,
                ciphertext: &clear,
            }
            .to_vec(),
        );
    }
    for _ in 0..200 {
        let mut ct = vec![0u8; 17 + (rng.next_u32() % 1000) as usize];
        rng.fill_bytes(&mut ct);
        raw.push(
            Packet::Data {
                receiver: rng.next_u64(),
                nonce: rng.next_u64(),
                ciphertext: &ct,
            }
            .to_vec(),
        );
    }
    for _ in 0..20 {
        let mut ik1 = [0u8; packet::IK1_LEN];
        rng.fill_bytes(&mut ik1);
        raw.push(
            Packet::PeerInit {
                sender: rng.next_u64(),
                noise: &ik1,
            }
            .to_vec(),
        );
        let mut ik2 = [0u8; packet::IK2_LEN];
        rng.fill_bytes(&mut ik2);
        raw.push(
            Packet::PeerResponse {
                receiver: rng.next_u64(),
                sender: rng.next_u64(),
                noise: &ik2,
            }
            .to_vec(),
        );
        let mut token = [0u8; packet::TOKEN_LEN];
        rng.fill_bytes(&mut token);
        raw.push(
            Packet::Reset {
                receiver: rng.next_u64(),
                token: &token,
            }
            .to_vec(),
        );
    }
    let started = Instant::now();
    for (i, d) in raw.iter().enumerate() {
        send_from(&stranger, d, bob_at);
        pace(started, i as u64 + 1);
    }
    bob.expect_quiet(QUIET);
    alice.expect_quiet(QUIET);

    // --- A genuine session with Bob, under Mallory's own key.
    let mallory_keys = read_keypair(&key_file(server.port(), "Mallory"));
    let bob_key = PublicKey(key_line(&key_file(server.port(), "Bob"), "public"));
    let session = attacker_socket();
    let tally = Tally::start(&session);
    let mut hs = crypto::peer_initiator(&mallory_keys, &bob_key, [9; 32]);
    let mut msg1 = [0u8; packet::IK1_LEN];
    let n = hs.write_message(&[], &mut msg1).expect("IK message 1");
    assert_eq!(n, packet::IK1_LEN);
    let ours = 0x6d61_6c6c;
    let init = Packet::PeerInit {
        sender: ours,
        noise: &msg1,
    }
    .to_vec();
    send_from(&session, &init, bob_at);
    let got = tally.await_count(1, DEADLINE);
    let Some((_, answer)) = got.first() else {
        panic!("Bob did not answer a handshake from a key in his table");
    };
    let Ok(Datagram::Packet(Packet::PeerResponse {
        receiver,
        sender: theirs,
        noise,
    })) = packet::parse(answer)
    else {
        panic!("Bob's answer is not a PeerResponse: {answer:?}");
    };
    assert_eq!(receiver, ours);
    let mut scratch = [0u8; packet::MAX_DATAGRAM];
    hs.read_message(noise, &mut scratch)
        .expect("Bob's IK message 2");
    let mut link = Link::new(hs, ours, theirs).expect("an established session");
    assert_eq!(link.remote(), bob_key);

    let mut entries = wire::Entries::new();
    entries
        .push(Entry {
            name: name("Alice"),
            addr: session.local_addr().expect("address"),
            online: true,
            key: mallory_keys.public(),
        })
        .expect("room for one entry");
    let lies = [
        Message::Chat {
            from: name("Alice"),
            to: name("Bob"),
            id: MsgId(2),
            text: text("this is Alice, honestly"),
        },
        Message::Chat {
            from: name("Bob"),
            to: name("Bob"),
            id: MsgId(3),
            text: text("a note to self"),
        },
        Message::Chat {
            from: name("Mallory"),
            to: name("Alice"),
            id: MsgId(4),
            text: text("meant for Alice"),
        },
        fake_delivery("Alice", "a channel message from Alice"),
        Message::Delta {
            prev: 0,
            version: 1_000,
            entries,
        },
        Message::ChatAck { id: MsgId(5) },
    ];
    for lie in &lies {
        let d = link.seal(&wire::encode_to_vec(lie)).expect("seal");
        send_from(&session, &d, bob_at);
        // The same, sent by a stranger who copied it, and altered.
        send_from(&stranger, &d, bob_at);
        send_from(&session, &flipped(&d, d.len() * 8 - 1), bob_at);
    }
    bob.expect_quiet(SETTLE);
    alice.expect_quiet(QUIET);
    mallory.expect_quiet(QUIET);
    assert_eq!(table(&mut bob), before, "Bob's table after the forgeries");

    // The control: the session works, and Bob shows an honest message once.
    let honest = Message::Chat {
        from: name("Mallory"),
        to: name("Bob"),
        id: MsgId(6),
        text: text("Mallory here, under my own name"),
    };
    let d = link.seal(&wire::encode_to_vec(&honest)).expect("seal");
    send_from(&session, &d, bob_at);
    bob.expect(">>> Mallory: Mallory here, under my own name");
    let acked = |got: &[(SocketAddr, Vec<u8>)], link: &mut Link| {
        got.iter().any(|(_, d)| {
            let Ok(Datagram::Packet(Packet::Data {
                nonce, ciphertext, ..
            })) = packet::parse(d)
            else {
                return false;
            };
            let mut buf = [0u8; packet::MAX_DATAGRAM];
            link.open(nonce, ciphertext, &mut buf)
                .and_then(|p| wire::decode(p).ok())
                == Some(Message::ChatAck { id: MsgId(6) })
        })
    };
    // Everything after the handshake answer, until the ack is among it.
    let mut seen = 1;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = tally.await_count(seen + 1, deadline.saturating_duration_since(Instant::now()));
        assert!(got.len() > seen, "Bob never acked; got {got:?}");
        if acked(&got[seen..], &mut link) {
            break;
        }
        seen = got.len();
    }
    // Its replay, from the session's socket and from a stranger's.
    send_from(&session, &d, bob_at);
    send_from(&stranger, &d, bob_at);
    bob.expect_quiet(QUIET);

    let answered = bytes_from(&stranger_tally.settle(), None);
    assert_eq!(answered, 0, "Bob answered the stranger");
    alice.finish();
    bob.finish();
    mallory.finish();
}
