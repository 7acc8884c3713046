//! Throughput of the codec and of the state machines, with no network:
//! `cargo bench --bench core`. Each line is the median of several timed runs.

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::hint::black_box;
use std::time::{Duration, Instant};

use udpchat::wire::{self, Message, MsgId, Name, Seq, Text, Token};

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
        token: Token([3; 16]),
        to: Name::new("Bob").unwrap(),
        id: MsgId(77),
        text: Text::new("a short message, as most are").unwrap(),
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
