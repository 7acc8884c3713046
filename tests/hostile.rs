//! Hostile input: random and mutated datagrams (real handshakes and session
//! datagrams among them), random command lines. Nothing may panic, anything
//! that decodes must survive a round trip, and state stays within its
//! bounds.

mod inputs;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use inputs::Rng;
use udpchat::crypto::{self, Keypair};
use udpchat::packet::{self, Datagram, Packet};
use udpchat::wire::{self, Name};
use udpchat::{Client, ClientConfig, Server, ServerConfig, console, fuzzing};

/// One encoded message of every variant (what sessions carry inside).
fn samples() -> Vec<Vec<u8>> {
    fuzzing::sample_messages()
        .iter()
        .map(|(_, m)| wire::encode_to_vec(m))
        .collect()
}

/// Real datagrams of every handshake and session type.
fn datagrams() -> Vec<Vec<u8>> {
    fuzzing::sample_datagrams(Instant::now())
}

/// A valid datagram with a few bytes changed, cut or extended.
fn mutate(rng: &mut Rng, valid: &[Vec<u8>]) -> Vec<u8> {
    let pick = rng.below(valid.len());
    inputs::mutate(rng, &valid[pick])
}

#[test]
fn decoder_never_panics_and_what_decodes_round_trips() {
    let valid: Vec<Vec<u8>> = samples();
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
            assert!(again.len() <= wire::MAX_PLAINTEXT);
            assert_eq!(wire::decode(&again), Ok(msg), "input {d:?}");
        }
        if let Ok(Datagram::Packet(p)) = packet::parse(&d) {
            assert_eq!(p.to_vec(), d);
        }
    }
    assert!(
        decoded > 1000,
        "mutations should often stay valid, got {decoded}"
    );
}

#[test]
fn server_survives_random_datagrams_from_random_hosts() {
    let valid: Vec<Vec<u8>> = datagrams();
    let mut rng = Rng(42);
    let start = Instant::now();
    let mut now = start;
    let key = Keypair::from_secret([3; 32]);
    let mut config = ServerConfig::new([3; 32], key, (start, 1_700_000_000));
    config.max_clients = 64;
    let mut server = Server::new(config, start, Default::default());
    // The latest retry the server sent each host: echoed, it passes the
    // cookie check, so the handshake paths run too.
    let mut cookies: std::collections::HashMap<SocketAddr, [u8; packet::COOKIE_LEN]> =
        Default::default();
    for i in 0..30_000 {
        let from = SocketAddr::from((
            [127, 0, 0, 1 + rng.below(4) as u8],
            2000 + rng.below(8) as u16,
        ));
        let d = match i % 3 {
            0 => rng.bytes(1300),
            1 => mutate(&mut rng, &valid),
            // A real first handshake message, with the host's cookie when
            // it has one.
            _ => {
                let mut hs = crypto::client_handshake(
                    &Keypair::from_secret([rng.below(200) as u8; 32]),
                    [rng.next() as u8; 32],
                );
                let mut buf = [0u8; packet::XX1_LEN + packet::TAG_LEN];
                hs.write_message(&[], &mut buf).unwrap();
                let noise: [u8; packet::XX1_LEN] = buf[..packet::XX1_LEN].try_into().unwrap();
                Packet::Initial {
                    sender: rng.next(),
                    cookie: cookies.get(&from),
                    noise: &noise,
                }
                .to_vec()
            }
        };
        server.handle_datagram(now, from, &d);
        if rng.below(10) == 0 {
            now += Duration::from_millis(rng.below(700) as u64);
            server.handle_timeout(now);
        }
        while server.poll_store().is_some() {}
        server.handle_committed();
        while let Some(t) = server.poll_transmit() {
            assert!(t.payload.len() <= packet::MAX_DATAGRAM);
            if let Ok(Datagram::Packet(Packet::Retry { cookie, .. })) = packet::parse(&t.payload) {
                cookies.insert(t.to, *cookie);
            }
        }
        while server.poll_event().is_some() {}
        // Deadlines move forward: none is due right after handling timeouts.
        server.handle_timeout(now);
        assert!(
            server.poll_timeout().is_none_or(|t| t > now),
            "a deadline in the past"
        );
    }
    assert!(server.table().len() <= 64);
    assert!(server.stats().malformed > 5_000);
    // Handshakes ran to message 2 (a third message never came), and
    // stayed within their bound.
    let (handshakes, _) = server.sessions();
    assert!(handshakes > 0 && handshakes <= 4096, "{handshakes}");
}

#[test]
fn client_survives_random_datagrams_and_command_lines() {
    let valid: Vec<Vec<u8>> = datagrams();
    let mut rng = Rng(7);
    let start = Instant::now();
    let mut now = start;
    let server: SocketAddr = "127.0.0.1:1024".parse().unwrap();
    let config = ClientConfig::new(
        Name::new("Alice").unwrap(),
        server,
        [5; 32],
        Keypair::from_secret([5; 32]),
        None,
    );
    let mut client = Client::new(config, start);
    let words = [
        "send", "send_all", "dereg", "reg", "list", "help", "Alice", "Bob", "x", "", " ", "😀",
    ];
    for i in 0..50_000 {
        if i % 5 == 0 {
            let line: Vec<&str> = (0..rng.below(5))
                .map(|_| words[rng.below(words.len())])
                .collect();
            let _ = console::command(&mut client, now, &line.join(" "));
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
        // Events first: the client holds a datagram until those before it
        // were polled.
        while client.poll_event().is_some() {}
        while client.poll_transmit().is_some() {}
    }
}
