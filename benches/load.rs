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

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mio::net::UdpSocket as MioSocket;
use mio::{Events, Interest, Poll, Token};
use udpchat::crypto::Keypair;
use udpchat::wire::Name;
use udpchat::{Client, ClientConfig, Event};

/// Clients per loopback address.
const PER_ADDRESS: usize = 16;

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
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench load -- join [--n N] [--spread SECS] [--deadline SECS] | echo"
    );
    std::process::exit(2)
}

// ---------------------------------------------------------------------------
// The join storm.

struct Joiner {
    client: Option<Client>,
    socket: Option<MioSocket>,
    start: Duration,
    welcomed: Option<Duration>,
    gave_up: bool,
    exited: bool,
}

fn join(n: usize, spread: Duration, deadline: Duration, echo: f64) -> bool {
    let dir = scratch("load-join");
    let server = ServerProcess::start(&dir);
    let rss_before = server.rss();
    let cpu_before = server.cpu();
    let drops_before = udp_drops(server.port);
    let client_drops_before = client_drops();
    let server_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port));

    let mut poll = Poll::new().expect("poll");
    let mut joiners: Vec<Joiner> = (0..n)
        .map(|i| Joiner {
            client: None,
            socket: None,
            start: if n > 1 {
                spread.mul_f64(i as f64 / (n - 1) as f64)
            } else {
                Duration::ZERO
            },
            welcomed: None,
            gave_up: false,
            exited: false,
        })
        .collect();
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut started = 0usize;
    let mut last_table = Duration::ZERO;
    let mut buf = [0u8; 2048];
    let mut events = Events::with_capacity(1024);
    let t0 = Instant::now();
    let mut complete_since: Option<Instant> = None;

    let drain =
        |j: &mut Joiner, i: usize, at: Duration, sent: &mut u64, last_table: &mut Duration| {
            let (Some(client), Some(socket)) = (j.client.as_mut(), j.socket.as_ref()) else {
                return;
            };
            while let Some(t) = client.poll_transmit() {
                let _ = socket.send_to(&t.payload, t.to);
                *sent += 1;
            }
            while let Some(e) = client.poll_event() {
                match e {
                    Event::Welcome => j.welcomed = Some(at),
                    Event::TableUpdated => *last_table = at,
                    Event::ServerNotResponding => j.gave_up = true,
                    Event::Exit(_) => j.exited = true,
                    Event::Error(why) if i < 3 => eprintln!("client {i}: {why}"),
                    _ => {}
                }
            }
        };

    loop {
        let now = Instant::now();
        let at = now - t0;
        // Start the clients whose time came.
        while started < n && joiners[started].start <= at {
            let i = started;
            let addr = client_addr(i);
            let std = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            std.set_nonblocking(true).expect("nonblocking");
            let mut socket = MioSocket::from_std(std);
            poll.registry()
                .register(&mut socket, Token(i), Interest::READABLE)
                .expect("register socket");
            let name = Name::new(&format!("load{i}")).expect("name");
            let mut secret = [7u8; 32];
            secret[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let mut seed = [3u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let config =
                ClientConfig::new(name, server_addr, seed, Keypair::from_secret(secret), None);
            let j = &mut joiners[i];
            j.client = Some(Client::new(config, now));
            j.socket = Some(socket);
            drain(j, i, at, &mut sent, &mut last_table);
            started += 1;
        }
        // Datagrams.
        let next_start = (started < n).then(|| t0 + joiners[started].start);
        let mut next = next_start;
        for j in &joiners[..started] {
            if let Some(t) = j.client.as_ref().and_then(|c| c.poll_timeout()) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        let wait = next
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        poll.poll(&mut events, Some(wait)).expect("poll");
        let now = Instant::now();
        let at = now - t0;
        for event in events.iter() {
            let i = event.token().0;
            let j = &mut joiners[i];
            if let (Some(client), Some(socket)) = (j.client.as_mut(), j.socket.as_ref()) {
                // Until WouldBlock (or an error, which ends this read).
                while let Ok((len, from)) = socket.recv_from(&mut buf) {
                    received += 1;
                    client.handle_datagram(now, from, &buf[..len]);
                }
            }
            drain(j, i, at, &mut sent, &mut last_table);
        }
        // Timers. A client's own process would have read what reached it
        // before its timer fired; this one process may not have come round
        // to that socket yet, so it reads it first (else the tool, not the
        // server, would make clients retry and give up).
        for (i, j) in joiners[..started].iter_mut().enumerate() {
            if let (Some(client), Some(socket)) = (j.client.as_mut(), j.socket.as_ref())
                && client.poll_timeout().is_some_and(|t| t <= now)
            {
                while let Ok((len, from)) = socket.recv_from(&mut buf) {
                    received += 1;
                    client.handle_datagram(now, from, &buf[..len]);
                }
                if client.poll_timeout().is_some_and(|t| t <= now) {
                    client.handle_timeout(now);
                }
                drain(j, i, at, &mut sent, &mut last_table);
            }
        }
        // Done: everyone started and settled (welcomed with a full table,
        // or gone), and nothing changed for a second.
        let settled = started == n
            && joiners.iter().all(|j| {
                j.exited
                    || j.client
                        .as_ref()
                        .is_some_and(|c| c.is_online() && c.table().len() == n)
            });
        if settled {
            let since = *complete_since.get_or_insert(now);
            if now - since >= Duration::from_secs(1) && at - last_table >= Duration::from_secs(1) {
                break;
            }
        } else {
            complete_since = None;
        }
        if at > deadline {
            eprintln!("deadline of {deadline:?} reached");
            break;
        }
    }
    let elapsed = t0.elapsed();
    let cpu = server.cpu() - cpu_before;
    let rss_after = server.rss();
    let drops = udp_drops(server.port).saturating_sub(drops_before);
    let client_drops = client_drops().saturating_sub(client_drops_before);

    let registered = joiners.iter().filter(|j| j.welcomed.is_some()).count();
    let gave_up = joiners.iter().filter(|j| j.gave_up).count();
    let refused = joiners
        .iter()
        .filter(|j| j.exited && !j.gave_up && j.welcomed.is_none())
        .count();
    let complete = joiners
        .iter()
        .filter(|j| {
            j.client.as_ref().is_some_and(|c| {
                c.is_online() && c.table().len() == n && c.table().iter().all(|e| e.online)
            })
        })
        .count();
    let last_welcome = joiners.iter().filter_map(|j| j.welcomed).max();
    println!("join storm: {n} clients, spread over {spread:?}");
    println!(
        "  registered {registered}, gave up {gave_up}, refused {refused}; {complete} tables hold all {n} names online"
    );
    println!(
        "  last welcome at {:.2} s, last table change at {:.2} s (run {:.2} s)",
        last_welcome.unwrap_or_default().as_secs_f64(),
        last_table.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "  datagrams: {sent} to the server, {received} from it; dropped by the server's socket: {drops}, by the clients': {client_drops}"
    );
    let rate = (sent + received) as f64 / cpu.max(1e-9);
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

struct ServerProcess {
    child: Child,
    port: u16,
}

impl ServerProcess {
    fn start(dir: &Path) -> ServerProcess {
        let port = {
            let probe = UdpSocket::bind("127.0.0.1:0").expect("probe port");
            probe.local_addr().expect("probe addr").port()
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_udpchat"))
            .args(["-s", &port.to_string(), "--data-dir"])
            .arg(dir.join("data"))
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
                if line.contains("listening on") || line.contains("buffer is") {
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
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            println!("server: {line}");
        }
        ServerProcess { child, port }
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
