//! Hostile input: random and mutated datagrams, random command lines. Nothing
//! may panic, anything that decodes must survive a round trip, and state stays
//! within its bounds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use udpchat::wire::{self, Entry, MailId, Message, MsgId, Name, Refusal, Seq, Text, Token};
use udpchat::{Client, ClientConfig, Server, ServerConfig};

/// A small deterministic generator (xorshift64*), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn samples() -> Vec<Message> {
    let name = Name::new("Alice").unwrap();
    let text = Text::new("hello 你好").unwrap();
    let token = Token([7; 16]);
    let entry = Entry {
        name: name.clone(),
        addr: "127.0.0.1:2000".parse().unwrap(),
        online: true,
    };
    vec![
        Message::Register {
            seq: Seq(1),
            name: name.clone(),
        },
        Message::Deregister { seq: Seq(2), token },
        Message::SaveMessage {
            seq: Seq(3),
            token,
            to: name.clone(),
            id: MsgId(4),
            text: text.clone(),
        },
        Message::ChannelSend {
            seq: Seq(5),
            token,
            id: MsgId(6),
            text: text.clone(),
        },
        Message::Sync {
            seq: Seq(7),
            token,
            since: 3,
            from: 0,
        },
        Message::Heartbeat {
            seq: Seq(8),
            token,
            version: 9,
        },
        Message::Delivered {
            token,
            mail: MailId(10),
        },
        Message::ProbeReply { nonce: 11 },
        Message::Welcome {
            seq: Seq(12),
            token,
            version: 13,
            mail: 2,
        },
        Message::Rejected { seq: Seq(14) },
        Message::Ack { seq: Seq(15) },
        Message::Exists {
            seq: Seq(16),
            entry: entry.clone(),
        },
        Message::Refused {
            seq: Seq(17),
            reason: Refusal::Busy,
        },
        Message::Page {
            seq: Seq(18),
            version: 19,
            entries: [entry.clone()].into_iter().collect(),
            next: Some(20),
        },
        Message::Delta {
            prev: 21,
            version: 22,
            entries: [entry].into_iter().collect(),
        },
        Message::Deliver {
            mail: MailId(23),
            batch: Seq(12),
            pos: Some(0),
            from: name.clone(),
            channel: true,
            stored_at: 1_700_000_000,
            id: MsgId(24),
            text: text.clone(),
        },
        Message::Probe {
            nonce: 25,
            name: name.clone(),
        },
        Message::Chat {
            from: name.clone(),
            to: name,
            id: MsgId(26),
            text,
        },
        Message::ChatAck { id: MsgId(27) },
        Message::Alive {
            seq: Seq(28),
            version: 29,
        },
    ]
}

/// A valid datagram with a few bytes changed, cut or extended.
fn mutate(rng: &mut Rng, valid: &[Vec<u8>]) -> Vec<u8> {
    let mut d = valid[rng.below(valid.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(4) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = rng.next() as u8;
            }
            1 => d.truncate(rng.below(d.len() + 1)),
            2 => d.extend(rng.bytes(8)),
            _ => {
                if d.len() > 1 {
                    let i = 1 + rng.below(d.len() - 1);
                    d[i] ^= 1 << rng.below(8);
                }
            }
        }
    }
    d
}

#[test]
fn decoder_never_panics_and_what_decodes_round_trips() {
    let valid: Vec<Vec<u8>> = samples().iter().map(wire::encode_to_vec).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut decoded = 0;
    for i in 0..200_000 {
        let d = if i % 2 == 0 {
            rng.bytes(1300)
        } else {
            mutate(&mut rng, &valid)
        };
        if let Ok(msg) = wire::decode(&d) {
            decoded += 1;
            // Value equality, not byte equality: postcard accepts over-long
            // varints, so a re-encoding may be shorter.
            let again = wire::encode_to_vec(&msg);
            assert!(again.len() <= wire::MAX_DATAGRAM);
            assert_eq!(wire::decode(&again), Ok(msg), "input {d:?}");
        }
    }
    assert!(
        decoded > 1000,
        "mutations should often stay valid, got {decoded}"
    );
}

#[test]
fn server_survives_random_datagrams_from_random_hosts() {
    let valid: Vec<Vec<u8>> = samples().iter().map(wire::encode_to_vec).collect();
    let mut rng = Rng(42);
    let start = Instant::now();
    let mut now = start;
    let mut config = ServerConfig::new([3; 32], (start, 1_700_000_000));
    config.max_clients = 64;
    let mut server = Server::new(config, start, Default::default());
    for i in 0..100_000 {
        let from = SocketAddr::from((
            [127, 0, 0, 1 + rng.below(4) as u8],
            2000 + rng.below(8) as u16,
        ));
        let d = match i % 3 {
            0 => rng.bytes(1300),
            1 => mutate(&mut rng, &valid),
            // Fresh names so registration paths run and the bound is hit.
            _ => wire::encode_to_vec(&Message::Register {
                seq: Seq(rng.next() as u32),
                name: Name::new(&format!("n{}", rng.below(200))).unwrap(),
            }),
        };
        server.handle_datagram(now, from, &d);
        if rng.below(10) == 0 {
            now += Duration::from_millis(rng.below(700) as u64);
            server.handle_timeout(now);
        }
        while server.poll_store().is_some() {}
        server.handle_committed();
        while server.poll_transmit().is_some() {}
        while server.poll_event().is_some() {}
        // Deadlines move forward: none is due right after handling timeouts.
        server.handle_timeout(now);
        assert!(
            server.poll_timeout().is_none_or(|t| t > now),
            "a deadline in the past"
        );
    }
    assert!(server.table().len() <= 64);
    assert!(server.stats().malformed > 10_000);
}

#[test]
fn client_survives_random_datagrams_and_command_lines() {
    let valid: Vec<Vec<u8>> = samples().iter().map(wire::encode_to_vec).collect();
    let mut rng = Rng(7);
    let start = Instant::now();
    let mut now = start;
    let server: SocketAddr = "127.0.0.1:1024".parse().unwrap();
    let mut client = Client::new(
        ClientConfig::new(Name::new("Alice").unwrap(), server, [5; 32]),
        start,
    );
    let words = [
        "send", "send_all", "dereg", "reg", "list", "help", "Alice", "Bob", "x", "", " ", "😀",
    ];
    for i in 0..50_000 {
        if i % 5 == 0 {
            let line: Vec<&str> = (0..rng.below(5))
                .map(|_| words[rng.below(words.len())])
                .collect();
            client.handle_line(now, &line.join(" "));
        } else {
            // Half from the server's address, so server-only paths run.
            let from = if rng.below(2) == 0 {
                server
            } else {
                SocketAddr::from(([10, 0, 0, 1], 2000))
            };
            let d = if i % 2 == 0 {
                rng.bytes(1300)
            } else {
                mutate(&mut rng, &valid)
            };
            client.handle_datagram(now, from, &d);
        }
        if rng.below(10) == 0 {
            now += Duration::from_millis(rng.below(700) as u64);
            client.handle_timeout(now);
            assert!(
                client.poll_timeout().is_none_or(|t| t > now),
                "a deadline in the past after handle_timeout"
            );
        }
        while client.poll_transmit().is_some() {}
        while client.poll_event().is_some() {}
    }
}
