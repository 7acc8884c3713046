//! udpchat: a chat system over UDP.
//!
//! A registry [`Server`] keeps the client table, stores messages for clients
//! that are offline and relays channel messages; [`Client`]s message each
//! other directly, with acks, and fall back to the server when a peer is
//! silent.
//!
//! Both are sans-IO state machines: they never touch a socket, a clock, a file
//! or a thread. Time comes in as `now`, datagrams and commands come in through
//! `handle_*` methods, and everything they want done comes out of `poll_*`
//! methods: datagrams to send, events to show, the next instant to wake at.
//! The `udpchat` binary drives them with a thin `mio` loop; you can drive
//! them from your own loop the same way.
//!
//! Every datagram travels in a Noise session ([`crypto`], on the `snow`
//! crate): `XX` between a client and the server, whose key the client pins;
//! `IK` between two clients, keyed by the table's keys. A name belongs to
//! the first key that registered it; mail for an offline client is sealed by
//! its sender to its key (Noise `K`), so the server stores what it cannot
//! read. The datagram layer is [`packet`], the messages inside sessions are
//! [`wire`]. Keys come in the configs ([`crypto::Keypair`]); every random
//! choice comes from the config's seed, so a run replays exactly.
//!
//! # Driving a client from your own loop
//!
//! ```no_run
//! use std::net::UdpSocket;
//! use std::time::Instant;
//! use udpchat::{Client, ClientConfig, Event, crypto::Keypair, wire::Name};
//!
//! let socket = UdpSocket::bind("0.0.0.0:2000")?;
//! let server = "127.0.0.1:1024".parse().unwrap();
//! let name = Name::new("Alice").unwrap();
//! // Seeds and the key's 32 secret bytes come from the OS in real use (the
//! // `udpchat` binary keeps the key in a 0600 file).
//! let key = Keypair::from_secret([9; 32]);
//! // `None`: first contact; keep the key of `Event::ServerKeyLearned` and
//! // pass it here next time, so a server with another key is refused.
//! let config = ClientConfig::new(name, server, [7; 32], key, None);
//! let mut client = Client::new(config, Instant::now());
//! client.handle_line(Instant::now(), "send Bob hello");
//! let mut buf = [0u8; 1500];
//! loop {
//!     // 1. Drain everything the client wants done.
//!     while let Some(t) = client.poll_transmit() {
//!         socket.send_to(&t.payload, t.to)?;
//!     }
//!     while let Some(event) = client.poll_event() {
//!         match event {
//!             Event::Exit(code) => std::process::exit(code),
//!             other => {
//!                 if let Some(line) = other.render(|unix| unix.to_string()) {
//!                     println!("{line}");
//!                 }
//!             }
//!         }
//!     }
//!     // 2. Sleep until a datagram arrives or the next deadline passes.
//!     let timeout = client.poll_timeout().map(|t| t.saturating_duration_since(Instant::now()));
//!     socket.set_read_timeout(timeout.filter(|d| !d.is_zero()))?;
//!     match socket.recv_from(&mut buf) {
//!         Ok((n, from)) => client.handle_datagram(Instant::now(), from, &buf[..n]),
//!         Err(_) => client.handle_timeout(Instant::now()),
//!     }
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

pub mod client;
pub mod crypto;
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod packet;
pub mod server;
pub mod store;
pub mod table;
#[cfg(test)]
mod test_rng;
pub mod timer;
pub mod wire;

pub use client::{Client, ClientConfig, Event, Path};
pub use server::{Census, Server, ServerConfig, ServerEvent, StoreFailure, Waiting};

/// How long a sender waits for an ack before it gives up on a try (direct
/// message) or resends (request to the server).
pub const ACK_TIMEOUT: Duration = Duration::from_millis(500);
/// Resend interval inside one ack window: a lost datagram is sent again
/// before the 500 ms verdict, so one loss does not end in a fallback.
pub const RETRANSMIT: Duration = Duration::from_millis(250);
/// Tries of a request to the server before giving up (500 ms each).
pub const SERVER_TRIES: u8 = 5;
/// Timer resolution: deadlines are rounded up to it.
pub const TICK: Duration = Duration::from_millis(5);

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// The datagram (at most [`wire::MAX_DATAGRAM`] bytes).
    pub payload: Vec<u8>,
    /// What it carries (its contents are encrypted): for logs, counters and
    /// tests.
    pub what: wire::What,
}
