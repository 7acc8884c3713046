//! Throughput of the codec and of the state machines, with no network:
//! `cargo bench --bench core`. Each line is the median of several timed runs.

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use udpchat::crypto::{self, Keypair, Link};
use udpchat::packet::{DATA_HEADER, MAX_DATAGRAM, TAG_LEN, XX1_LEN};
use udpchat::wire::{self, MailBody, Message, MsgId, Name, Seq, Text};

/// The system allocator, counting the bytes and blocks live: what the
/// memory lines below read.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_BLOCKS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged, with the same
// arguments; the counters only add up the sizes asked for.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Relaxed);
            LIVE_BLOCKS.fetch_add(1, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(p, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let q = unsafe { System.realloc(p, layout, new) };
        if !q.is_null() {
            LIVE_BYTES.fetch_add(new, Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap the server holds per registered client: `n` clients join (on the
/// simulated network) and stay 200 s (twenty heartbeats), then, if
/// `leave`, fall silent until marked offline; the server is dropped and
/// what that frees is divided by `n`.
fn server_heap(n: u16, leave: bool) {
    let mut s = sim::Sim::with(|c| c.new_names.0 = u32::MAX);
    for i in 0..n {
        s.join(&format!("c{i:05}"), 2000 + i);
    }
    s.run_for(Duration::from_secs(200));
    if leave {
        for i in 0..usize::from(n) {
            s.crash(i);
        }
        s.run_for(Duration::from_secs(60));
    }
    assert_eq!(s.server.table().len(), usize::from(n));
    let fresh = udpchat::Server::new(
        udpchat::ServerConfig::new([3; 32], sim::server_key(), (s.start, sim::EPOCH_UNIX)),
        s.now,
        Default::default(),
    );
    let (bytes, blocks) = (LIVE_BYTES.load(Relaxed), LIVE_BLOCKS.load(Relaxed));
    drop(std::mem::replace(&mut s.server, fresh));
    let freed = bytes - LIVE_BYTES.load(Relaxed);
    let blocks = blocks - LIVE_BLOCKS.load(Relaxed);
    let n = usize::from(n);
    let state = if leave { "offline" } else { "online" };
    println!(
        "{:<44} {:>10} B {:>8.1} blocks",
        format!("memory: server heap per client, {n} {state}"),
        freed / n,
        blocks as f64 / n as f64
    );
}

/// Heap the server holds per stored message besides what it holds for its
/// clients: Alice saves `per` 120-character messages for each of ten
/// deregistered clients; the server is dropped with and without them.
fn mail_heap(per: usize) {
    let freed = |send: bool| {
        let mut s = sim::Sim::with(|c| c.new_names.0 = u32::MAX);
        s.join("Alice", 2000);
        for i in 0..10 {
            let n = format!("r{i}");
            let node = s.join(&n, 2001 + i);
            s.command(node, &format!("dereg {n}"));
        }
        if send {
            for k in 0..per {
                for i in 0..10 {
                    s.command(0, &format!("send r{i} {k:06} {}", "x".repeat(113)));
                }
            }
        }
        s.run_for(Duration::from_secs(60));
        let fresh = udpchat::Server::new(
            udpchat::ServerConfig::new([3; 32], sim::server_key(), (s.start, sim::EPOCH_UNIX)),
            s.now,
            Default::default(),
        );
        let bytes = LIVE_BYTES.load(Relaxed);
        drop(std::mem::replace(&mut s.server, fresh));
        (bytes - LIVE_BYTES.load(Relaxed), s.store.len())
    };
    let (without, _) = freed(false);
    let (with, stored) = freed(true);
    assert_eq!(stored, 10 * per);
    println!(
        "{:<44} {:>10} B",
        format!("memory: server heap per stored message, {stored}"),
        (with - without) / stored
    );
}

/// Runs `f` (which does `n` operations) a few times; prints the median.
fn bench(label: &str, n: u64, mut f: impl FnMut()) {
    let mut runs: Vec<Duration> = (0..7)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    runs.sort();
    let median = runs[runs.len() / 2];
    let per_op = median.as_nanos() as f64 / n as f64;
    println!(
        "{label:<44} {per_op:>10.0} ns/op {:>12.0} ops/s",
        1e9 / per_op
    );
}

fn main() {
    let chat = Message::Chat {
        from: Name::new("Alice").unwrap(),
        to: Name::new("Bob").unwrap(),
        id: MsgId(u64::MAX),
        text: Text::new(&"x".repeat(wire::MAX_TEXT)).unwrap(),
    };
    let ack = Message::Ack { seq: Seq(123_456) };
    let save = Message::SaveMessage {
        seq: Seq(9),
        to: Name::new("Bob").unwrap(),
        id: MsgId(77),
        sealed: (0..100u8).collect(),
    };
    const N: u64 = 100_000;
    let mut buf = [0u8; wire::MAX_DATAGRAM];
    for (label, msg) in [
        ("chat, 1000-byte text", &chat),
        ("save-message, short text", &save),
        ("ack", &ack),
    ] {
        let bytes = wire::encode_to_vec(msg);
        bench(&format!("codec: encode {label}"), N, || {
            for _ in 0..N {
                black_box(wire::encode(black_box(msg), &mut buf).unwrap());
            }
        });
        bench(&format!("codec: decode {label}"), N, || {
            for _ in 0..N {
                black_box(wire::decode(black_box(&bytes)).unwrap());
            }
        });
    }

    server_heap(1000, false);
    server_heap(1000, true);
    mail_heap(200);
    handshakes();
    sessions();

    // Whole flows through the real state machines on the simulated network
    // (virtual time, no loss): the cost of the protocol logic itself.
    const MSGS: u64 = 2_000;
    bench("flow: direct message + ack, two clients", MSGS, || {
        let mut s = sim::Sim::new();
        s.join("Alice", 2000);
        s.join("Bob", 3000);
        for i in 0..MSGS {
            s.line(0, &format!("send Bob message {i}"));
        }
        s.settle();
        assert_eq!(s.nodes[1].lines.len() as u64, 2 + MSGS);
    });
    // 1,000 is the default mailbox limit.
    const SAVES: u64 = 1_000;
    bench("flow: save-message to an offline client", SAVES, || {
        let mut s = sim::Sim::new();
        s.join("Alice", 2000);
        s.join("Bob", 3000);
        s.command(1, "dereg Bob");
        for i in 0..SAVES {
            s.line(0, &format!("send Bob message {i}"));
        }
        s.settle();
        assert_eq!(s.server.mailbox(&sim::name("Bob")).count() as u64, SAVES);
    });
    bench("flow: channel message to 20 clients", 200, || {
        let mut s = sim::Sim::new();
        for i in 0..21u16 {
            s.join(&format!("c{i}"), 2000 + i);
        }
        for i in 0..200 {
            s.line(0, &format!("send_all channel {i}"));
        }
        s.settle();
        assert_eq!(s.store.len(), 0, "every copy acked and deleted");
    });
}

/// The Noise handshakes, each side timed on its own (its DH operations are
/// most of the cost): the client–server `XX` and the client–client `IK`.
fn handshakes() {
    const N: u64 = 200;
    let (client, server) = (Keypair::from_secret([1; 32]), Keypair::from_secret([2; 32]));
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut scratch = [0u8; MAX_DATAGRAM];
    // Messages of one full handshake, for the side not being timed.
    let xx = |seed: u8| {
        let mut c = crypto::client_handshake(&client, [seed; 32]);
        let mut s = crypto::server_handshake(&server, [seed; 32]);
        let (mut m1, mut m2, mut m3) = ([0u8; XX1_LEN + TAG_LEN], [0u8; 96], [0u8; 200]);
        let n1 = c.write_message(&[], &mut m1).unwrap();
        s.read_message(&m1[..n1], &mut [0u8; 64]).unwrap();
        let n2 = s.write_message(&[], &mut m2).unwrap();
        c.read_message(&m2[..n2], &mut [0u8; 64]).unwrap();
        let n3 = c.write_message(b"register", &mut m3).unwrap();
        (m1[..n1].to_vec(), m2[..n2].to_vec(), m3[..n3].to_vec())
    };
    let recorded: Vec<_> = (0..N).map(|i| xx(i as u8)).collect();
    bench("handshake XX (client-server): client side", N, || {
        for i in 0..N {
            let mut c = crypto::client_handshake(&client, [i as u8; 32]);
            c.write_message(&[], &mut buf).unwrap();
            c.read_message(&recorded[i as usize].1, &mut scratch)
                .unwrap();
            black_box(c.write_message(b"register", &mut buf).unwrap());
        }
    });
    bench("handshake XX (client-server): server side", N, || {
        for i in 0..N {
            let (m1, _, m3) = &recorded[i as usize];
            let mut s = crypto::server_handshake(&server, [i as u8; 32]);
            s.read_message(m1, &mut scratch).unwrap();
            s.write_message(&[], &mut buf).unwrap();
            black_box(s.read_message(m3, &mut scratch).unwrap());
        }
    });
    let (alice, bob) = (Keypair::from_secret([3; 32]), Keypair::from_secret([4; 32]));
    let ik = |seed: u8| {
        let mut i = crypto::peer_initiator(&alice, &bob.public(), [seed; 32]);
        let mut r = crypto::peer_responder(&bob, [seed; 32]);
        let (mut m1, mut m2) = ([0u8; 200], [0u8; 200]);
        let n1 = i.write_message(&[], &mut m1).unwrap();
        r.read_message(&m1[..n1], &mut [0u8; 64]).unwrap();
        let n2 = r.write_message(&[], &mut m2).unwrap();
        (m1[..n1].to_vec(), m2[..n2].to_vec())
    };
    let recorded: Vec<_> = (0..N).map(|i| ik(i as u8)).collect();
    bench("handshake IK (client-client): initiator", N, || {
        for i in 0..N {
            let mut h = crypto::peer_initiator(&alice, &bob.public(), [i as u8; 32]);
            h.write_message(&[], &mut buf).unwrap();
            black_box(
                h.read_message(&recorded[i as usize].1, &mut scratch)
                    .unwrap(),
            );
        }
    });
    bench("handshake IK (client-client): responder", N, || {
        for i in 0..N {
            let mut h = crypto::peer_responder(&bob, [i as u8; 32]);
            h.read_message(&recorded[i as usize].0, &mut scratch)
                .unwrap();
            black_box(h.write_message(&[], &mut buf).unwrap());
        }
    });
    let (na, nb) = (Name::new("Alice").unwrap(), Name::new("Bob").unwrap());
    let body = wire::encode_body(&MailBody {
        id: MsgId(5),
        text: Text::new(&"x".repeat(wire::MAX_TEXT)).unwrap(),
    });
    bench("sealed mail (K), 1000-byte text: seal", N, || {
        for i in 0..N {
            black_box(crypto::seal_mail(
                &alice,
                &na,
                &bob.public(),
                &nb,
                &body,
                [i as u8; 32],
            ));
        }
    });
    let sealed = crypto::seal_mail(&alice, &na, &bob.public(), &nb, &body, [9; 32]);
    bench("sealed mail (K), 1000-byte text: open", N, || {
        for _ in 0..N {
            black_box(crypto::open_mail(&bob, &nb, &alice.public(), &na, &sealed).unwrap());
        }
    });
}

/// One session datagram: encrypt a 1000-byte chat and decrypt it (with the
/// replay check).
fn sessions() {
    let (a, b) = (Keypair::from_secret([5; 32]), Keypair::from_secret([6; 32]));
    let mut i = crypto::peer_initiator(&a, &b.public(), [1; 32]);
    let mut r = crypto::peer_responder(&b, [2; 32]);
    let (mut m, mut p) = ([0u8; 200], [0u8; 200]);
    let n = i.write_message(&[], &mut m).unwrap();
    r.read_message(&m[..n], &mut p).unwrap();
    let n = r.write_message(&[], &mut m).unwrap();
    i.read_message(&m[..n], &mut p).unwrap();
    let (mut tx, mut rx) = (Link::new(i, 1, 2).unwrap(), Link::new(r, 2, 1).unwrap());
    let chat = wire::encode_to_vec(&Message::Chat {
        from: Name::new("Alice").unwrap(),
        to: Name::new("Bob").unwrap(),
        id: MsgId(1),
        text: Text::new(&"x".repeat(wire::MAX_TEXT)).unwrap(),
    });
    const N: u64 = 20_000;
    let mut buf = [0u8; MAX_DATAGRAM];
    bench("session: seal + open a 1000-byte chat", N, || {
        for _ in 0..N {
            let d = tx.seal(&chat).unwrap();
            // The nonce ends the header: version, kind, receiver index.
            let at = DATA_HEADER - 8;
            let nonce = u64::from_le_bytes(d[at..DATA_HEADER].try_into().unwrap());
            black_box(rx.open(nonce, &d[DATA_HEADER..], &mut buf).unwrap());
        }
    });
}
