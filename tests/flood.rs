//! Flood end to end: random, truncated and mutated datagrams pour into a
//! running server and a running client from a few sockets while real
//! clients register and chat through it all. The legitimate traffic must
//! get its exact lines, both processes must keep serving, and their memory
//! must stay flat.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{Client, DEADLINE, Server, TABLE, WELCOME, chat};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use udpchat::packet::{self, Packet};

/// Datagrams sent at each target (the server and the client).
const PER_TARGET: usize = 100_000;
/// Sockets the flood comes from.
const SENDERS: usize = 3;
/// Datagrams per second at each target. A debug build of either process
/// reads and rejects one in a few microseconds, so this leaves it most of
/// its time for real work; a stall of a few tens of milliseconds on a busy
/// machine still fills the 208 KiB default receive buffer (a few hundred
/// small datagrams) and drops some, which the retransmissions cover.
const RATE: u64 = 12_000;
/// Datagrams sent between two looks at the pacing clock.
const BATCH: usize = 32;
/// The flood stops by itself after this long, whatever it has sent.
const FLOOD_LIMIT: Duration = Duration::from_secs(25);
/// The legitimate traffic starts once this share of the flood is out.
const START_LEGIT_AT: usize = PER_TARGET / 4;
/// Memory is sampled every this many datagrams per target.
const SAMPLE_EVERY: usize = 5_000;
/// The name of the flooded client.
const VICTIM: &str = "Alice";
const SEED: u64 = 0xf100_d006;

/// Growth allowed in resident memory over the whole flood, per process.
///
/// Every structure in both processes is bounded, and a datagram that does
/// not decode or authenticate must leave nothing behind. What may grow is a
/// constant: the allocator reaching its working size, SQLite's page cache
/// (2 MiB at most by default) for the registration of the legitimate
/// traffic, a second table entry, stdout buffers. Seen: 100–250 KiB. 8 MiB
/// leaves a wide margin for another allocator or libc, and still catches a
/// leak of 84 bytes or more per flood datagram.
const RSS_GROWTH_LIMIT_KIB: u64 = 8 * 1024;

/// Growth allowed over the second half of the flood, after the legitimate
/// traffic (which happens in the first half): memory must be flat there,
/// whatever a process allocated once. 2 MiB over 50,000 datagrams catches
/// a leak of 42 bytes or more per datagram, even one that only some kinds
/// of datagram trigger, as long as they are a fair share of the flood.
const SECOND_HALF_GROWTH_LIMIT_KIB: u64 = 2 * 1024;

// ---------------------------------------------------------------------------
// Memory and socket figures from /proc.

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Datagrams the kernel dropped at full receive buffers of the UDP sockets
/// bound to `port` (the `drops` column of /proc/net/udp).
fn kernel_drops(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let suffix = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local = cols.get(1)?;
            if !local.ends_with(&suffix) {
                return None;
            }
            cols.last()?.parse::<u64>().ok()
        })
        .sum()
}

// ---------------------------------------------------------------------------
// The flood.

/// A well-formed datagram of a random type with random contents: the
/// framing is right, the cryptography is not (the flood has no keys).
/// Protocol-version-1 messages too, as an old client would send.
fn template(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let index = rng.next_u64();
    let mut bytes = vec![0u8; 16 + (rng.next_u32() % 1100) as usize];
    rng.fill_bytes(&mut bytes);
    let mut cookie = [0u8; packet::COOKIE_LEN];
    rng.fill_bytes(&mut cookie);
    let mut token = [0u8; packet::TOKEN_LEN];
    rng.fill_bytes(&mut token);
    let mut k32 = [0u8; packet::XX1_LEN];
    rng.fill_bytes(&mut k32);
    let mut xx2 = [0u8; packet::XX2_LEN];
    rng.fill_bytes(&mut xx2);
    let mut ik1 = [0u8; packet::IK1_LEN];
    rng.fill_bytes(&mut ik1);
    let mut ik2 = [0u8; packet::IK2_LEN];
    rng.fill_bytes(&mut ik2);
    let cookie = rng.next_u32().is_multiple_of(2).then_some(&cookie);
    let p = match rng.next_u32() % 9 {
        0 => Packet::Initial {
            sender: index,
            cookie,
            noise: &k32,
        },
        1 => Packet::Retry {
            receiver: index,
            cookie: cookie.unwrap_or(&[0; packet::COOKIE_LEN]),
        },
        2 => Packet::Response {
            receiver: index,
            sender: rng.next_u64(),
            noise: &xx2,
        },
        3 => Packet::Finish {
            receiver: index,
            noise: &bytes,
        },
        4 | 5 => Packet::Data {
            receiver: index,
            nonce: rng.next_u64(),
            ciphertext: &bytes,
        },
        6 => Packet::PeerInit {
            sender: index,
            noise: &ik1,
        },
        7 => Packet::PeerResponse {
            receiver: index,
            sender: rng.next_u64(),
            noise: &ik2,
        },
        _ => {
            // An old client's datagram: version 1 and a few bytes.
            let mut v1 = vec![1u8];
            v1.extend_from_slice(&bytes[..(rng.next_u32() % 16) as usize]);
            return v1;
        }
    };
    p.to_vec()
}

/// What kinds of datagram the flood sent.
#[derive(Debug, Default, Clone, Copy)]
struct Mix {
    random: usize,
    truncated: usize,
    mutated: usize,
    trailing: usize,
    valid: usize,
    /// `send_to` failed (a full send buffer).
    send_errors: usize,
}

/// Raw material generated up front, so that the flood thread (a debug
/// build, like the test) spends its time sending rather than encoding.
struct Pool {
    /// Well-formed datagrams.
    templates: Vec<Vec<u8>>,
    /// Random bytes, a little longer than the longest datagram sent.
    noise: Vec<u8>,
}

impl Pool {
    fn new(rng: &mut ChaCha8Rng) -> Pool {
        let templates = (0..2048).map(|_| template(rng)).collect();
        let mut noise = vec![0u8; 64 * 1024];
        rng.fill_bytes(&mut noise);
        Pool { templates, noise }
    }

    fn template(&self, rng: &mut ChaCha8Rng) -> Vec<u8> {
        self.templates[(rng.next_u32() as usize) % self.templates.len()].clone()
    }

    /// `len` random bytes from a random place in the noise.
    fn noise(&self, rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
        let at = (rng.next_u32() as usize) % (self.noise.len() - len);
        self.noise[at..at + len].to_vec()
    }
}

/// One hostile datagram.
/// Nothing the flood sends can be legitimate: it holds no key.
fn hostile(rng: &mut ChaCha8Rng, pool: &Pool, mix: &mut Mix) -> Vec<u8> {
    let roll = rng.next_u32() % 100;
    if roll < 30 {
        // Random bytes, some over the 1200-byte limit, half with the
        // right version byte.
        let len = (rng.next_u32() % 1300) as usize;
        let mut d = pool.noise(rng, len);
        if let Some(first) = d.first_mut()
            && rng.next_u32().is_multiple_of(2)
        {
            *first = packet::VERSION;
        }
        mix.random += 1;
        d
    } else if roll < 55 {
        let mut d = pool.template(rng);
        let cut = (rng.next_u32() as usize) % d.len();
        d.truncate(cut);
        mix.truncated += 1;
        d
    } else if roll < 85 {
        let mut d = pool.template(rng);
        for _ in 0..=rng.next_u32() % 4 {
            let at = (rng.next_u32() as usize) % d.len();
            d[at] = rng.next_u32() as u8;
        }
        mix.mutated += 1;
        d
    } else if roll < 95 {
        let mut d = pool.template(rng);
        let extra = (rng.next_u32() % 8) as usize + 1;
        d.extend_from_slice(&pool.noise(rng, extra));
        mix.trailing += 1;
        d
    } else {
        mix.valid += 1;
        pool.template(rng)
    }
}

/// Memory of both targets at one moment of the flood.
#[derive(Debug, Clone, Copy)]
struct Sample {
    sent: usize,
    server_rss: u64,
    client_rss: u64,
}

struct FloodReport {
    sent: usize,
    elapsed: Duration,
    mix: Mix,
    samples: Vec<Sample>,
}

/// A paced flood at two targets from [`SENDERS`] sockets, on its own
/// thread; bounded in count and time, and stopped on drop.
struct Flood {
    progress: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<FloodReport>>,
}

impl Flood {
    fn start(server: SocketAddr, client: SocketAddr, pids: (u32, u32)) -> Flood {
        let progress = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Vec<UdpSocket> = (0..SENDERS)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind flood socket"))
            .collect();
        for s in &sockets {
            // Replies (refusals) pile up unread in these sockets; a full
            // buffer drops them, which is all they deserve.
            s.set_nonblocking(true).expect("nonblocking flood socket");
        }
        let thread = {
            let (progress, stop) = (Arc::clone(&progress), Arc::clone(&stop));
            thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(SEED);
                let pool = Pool::new(&mut rng);
                let mut mix = Mix::default();
                let mut samples = Vec::new();
                let started = Instant::now();
                let mut sent = 0;
                while sent < PER_TARGET
                    && started.elapsed() < FLOOD_LIMIT
                    && !stop.load(Ordering::Relaxed)
                {
                    for _ in 0..BATCH.min(PER_TARGET - sent) {
                        for target in [server, client] {
                            let data = hostile(&mut rng, &pool, &mut mix);
                            let socket = &sockets[(rng.next_u32() as usize) % SENDERS];
                            if socket.send_to(&data, target).is_err() {
                                mix.send_errors += 1;
                            }
                        }
                        sent += 1;
                        if sent % SAMPLE_EVERY == 0 {
                            samples.push(Sample {
                                sent,
                                server_rss: memory_kib(pids.0).0,
                                client_rss: memory_kib(pids.1).0,
                            });
                        }
                    }
                    progress.store(sent, Ordering::Relaxed);
                    // Pacing, not a stand-in for a condition: the flood is
                    // meant to last, at RATE per target.
                    let due = Duration::from_micros(sent as u64 * 1_000_000 / RATE);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        thread::sleep(ahead);
                    }
                }
                FloodReport {
                    sent,
                    elapsed: started.elapsed(),
                    mix,
                    samples,
                }
            })
        };
        Flood {
            progress,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until `n` datagrams went to each target (or the flood ended).
    fn await_progress(&self, n: usize) {
        let deadline = Instant::now() + FLOOD_LIMIT + DEADLINE;
        while self.progress.load(Ordering::Relaxed) < n
            && self.thread.as_ref().is_some_and(|t| !t.is_finished())
        {
            assert!(Instant::now() < deadline, "the flood made no progress");
            // A poll interval; the loop ends on the progress itself.
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the flood to end by itself and returns its report.
    fn finish(mut self) -> FloodReport {
        let thread = self.thread.take().expect("flood thread");
        thread.join().expect("flood thread panicked")
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------

/// `from` sends `text` to the channel; `to` is the other client.
#[track_caller]
fn channel(from: &mut Client, to: &mut Client, text: &str) {
    let from_name = from.name().to_owned();
    from.send(&format!("send_all {text}"));
    from.expect(">>> [Message received by Server.]");
    to.expect(&format!(">>> [Channel_Message {from_name}: {text}]"));
}

#[test]
fn flood_of_hostile_datagrams_leaves_service_and_memory_intact() {
    let started = Instant::now();
    let mut server = Server::start();
    let [mut alice] = Client::join_all(&server, [VICTIM]);
    let (server_pid, alice_pid) = (server.pid(), alice.pid());
    let before = (memory_kib(server_pid), memory_kib(alice_pid));
    let drops_before = (kernel_drops(server.port()), kernel_drops(alice.port()));

    let flood = Flood::start(
        SocketAddr::from(([127, 0, 0, 1], server.port())),
        SocketAddr::from(([127, 0, 0, 1], alice.port())),
        (server_pid, alice_pid),
    );

    // In the middle of the flood: a client registers, and both chat
    // directly and on the channel, with the exact lines of a quiet network.
    flood.await_progress(START_LEGIT_AT);
    let mut bob = Client::start("Bob", server.port());
    bob.expect_lines(&[WELCOME, TABLE]);
    alice.expect(TABLE);
    chat(&mut bob, &mut alice, "hello through the storm");
    chat(&mut alice, &mut bob, "loud and clear");
    channel(&mut bob, &mut alice, "channel through the storm");
    channel(&mut alice, &mut bob, "channel still works");
    let legit_done_at = flood.progress.load(Ordering::Relaxed);

    let report = flood.finish();
    let after = (memory_kib(server_pid), memory_kib(alice_pid));
    let drops = (
        kernel_drops(server.port()) - drops_before.0,
        kernel_drops(alice.port()) - drops_before.1,
    );

    // Both still serve once it is over.
    chat(&mut alice, &mut bob, "after the flood");
    chat(&mut bob, &mut alice, "all quiet");
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the server exited during the flood"
    );

    println!(
        "flood: {} datagrams to each target in {:?} ({:?}); legitimate traffic between \
         {START_LEGIT_AT} and {legit_done_at}; kernel drops: server {}, client {}",
        report.sent, report.elapsed, report.mix, drops.0, drops.1
    );
    println!(
        "memory KiB (VmRSS, VmHWM): server {:?} -> {:?}, client {:?} -> {:?}",
        before.0, after.0, before.1, after.1
    );
    for s in &report.samples {
        println!(
            "  after {:6}: server {} KiB, client {} KiB",
            s.sent, s.server_rss, s.client_rss
        );
    }

    assert_eq!(report.sent, PER_TARGET, "the flood was cut short");
    assert!(
        drops.0 < report.sent as u64 && drops.1 < report.sent as u64,
        "every datagram was dropped by the kernel: the processes never read"
    );
    let mid = report
        .samples
        .iter()
        .find(|s| s.sent == PER_TARGET / 2)
        .copied()
        .expect("a memory sample at half of the flood");
    let server_rss: Vec<u64> = report.samples.iter().map(|s| s.server_rss).collect();
    let client_rss: Vec<u64> = report.samples.iter().map(|s| s.client_rss).collect();
    for (who, base, mid_rss, rss, end) in [
        ("server", before.0, mid.server_rss, &server_rss, after.0),
        ("client", before.1, mid.client_rss, &client_rss, after.1),
    ] {
        let peak = rss.iter().copied().max().unwrap_or(0).max(end.0);
        let growth = peak.saturating_sub(base.0);
        assert!(
            growth < RSS_GROWTH_LIMIT_KIB,
            "{who} grew by {growth} KiB during the flood (from {} KiB RSS to a peak of \
             {peak} KiB); limit {RSS_GROWTH_LIMIT_KIB} KiB",
            base.0
        );
        // The high-water mark catches a spike between two samples.
        let hwm_growth = end.1.saturating_sub(base.1);
        assert!(
            hwm_growth < RSS_GROWTH_LIMIT_KIB,
            "{who}'s VmHWM grew by {hwm_growth} KiB during the flood; limit \
             {RSS_GROWTH_LIMIT_KIB} KiB"
        );
        let late = peak.saturating_sub(mid_rss);
        assert!(
            late < SECOND_HALF_GROWTH_LIMIT_KIB,
            "{who} grew by {late} KiB over the second half of the flood (from {mid_rss} \
             KiB to {peak} KiB): memory is not flat; limit {SECOND_HALF_GROWTH_LIMIT_KIB} KiB"
        );
    }

    alice.finish();
    bob.finish();
    assert!(
        server.stderr().is_empty(),
        "server stderr: {:?}",
        server.stderr()
    );
    println!("flood test took {:?}", started.elapsed());
}
