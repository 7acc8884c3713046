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
//! After every input, drain the client: its events first, then its
//! datagrams (it holds a datagram back until the events queued before it
//! were polled, so an ack never leaves before the line it promises was
//! taken to be shown). Then wait for a datagram, but never past the next
//! deadline, and hand the client whatever is due. Commands are calls
//! ([`Client::send_message`]…); [`console`] turns typed lines into them and
//! events into the console's lines. This example (run as a
//! test against a real server, the library's own on a socket of its own,
//! hidden here) sends a message to itself and stops once it is received.
//!
//! ```
//! use std::net::UdpSocket;
//! use std::time::Instant;
//! use udpchat::{Client, ClientConfig, Event, console, crypto::Keypair, wire::Name};
//! # fn main() -> std::io::Result<()> {
//! # let server = udpchat_server()?;
//!
//! let socket = UdpSocket::bind("127.0.0.1:0")?;
//! let name = Name::new("Alice").unwrap();
//! // Seeds and the key's 32 secret bytes come from the OS in real use (the
//! // `udpchat` binary keeps the key in a 0600 file).
//! let key = Keypair::from_secret([9; 32]);
//! // `None`: first contact; keep the key of `Event::ServerKeyLearned` and
//! // pass it here next time, so a server with another key is refused.
//! let config = ClientConfig::new(name.clone(), server, [7; 32], key, None);
//! let mut client = Client::new(config, Instant::now());
//! let mut sent = None;
//! let mut buf = [0u8; 1500];
//! 'run: loop {
//!     // 1. Drain: show, then send.
//!     while let Some(event) = client.poll_event() {
//!         match event {
//!             Event::ReceivedBy { id, .. } if Some(id) == sent => break 'run,
//!             Event::Closed { failed } => std::process::exit(i32::from(failed)),
//!             other => {
//!                 if let Some(line) = console::render(&other, |unix| unix.to_string()) {
//!                     println!("{line}");
//!                 }
//!             }
//!         }
//!     }
//!     while let Some(t) = client.poll_transmit() {
//!         socket.send_to(&t.payload, t.to)?;
//!     }
//!     // Registered, with the client table: the message can go (its
//!     // outcome events carry the id returned). Then drain again.
//!     if sent.is_none() && client.is_ready() {
//!         let id = client.send_message(Instant::now(), &name, "a note to myself");
//!         sent = Some(id.expect("online, and a short message"));
//!         continue;
//!     }
//!     // 2. Wait for a datagram, but not past the next deadline (one that
//!     // is already due means no wait at all).
//!     let now = Instant::now();
//!     let wait = client.poll_timeout().map(|t| t.saturating_duration_since(now));
//!     if wait.is_none_or(|w| !w.is_zero()) {
//!         socket.set_read_timeout(wait)?;
//!         if let Ok((n, from)) = socket.recv_from(&mut buf) {
//!             client.handle_datagram(Instant::now(), from, &buf[..n]);
//!         }
//!     }
//!     // 3. Whatever is due by now, datagram or not.
//!     client.handle_timeout(Instant::now());
//! }
//! # Ok(())
//! # }
//! #
//! # /// The library's server on a socket of its own, in a thread.
//! # fn udpchat_server() -> std::io::Result<std::net::SocketAddr> {
//! #     use udpchat::store::{MemoryStore, Store};
//! #     use udpchat::{Server, ServerConfig};
//! #     let socket = UdpSocket::bind("127.0.0.1:0")?;
//! #     let at = socket.local_addr()?;
//! #     let key = Keypair::from_secret([5; 32]);
//! #     std::thread::spawn(move || {
//! #         let config = ServerConfig::new([1; 32], key, (Instant::now(), 1_700_000_000));
//! #         let mut server = Server::new(config, Instant::now(), Default::default());
//! #         let mut store = MemoryStore::new();
//! #         let mut buf = [0u8; 1500];
//! #         loop {
//! #             udpchat::store::serve_fetches(&mut server, &mut store, Instant::now());
//! #             let ops: Vec<_> = std::iter::from_fn(|| server.poll_store()).collect();
//! #             if !ops.is_empty() {
//! #                 store.commit(&ops).expect("a memory store");
//! #                 server.handle_committed();
//! #             }
//! #             while let Some(t) = server.poll_transmit() {
//! #                 let _ = socket.send_to(&t.payload, t.to);
//! #             }
//! #             while server.poll_event().is_some() {}
//! #             let now = Instant::now();
//! #             let wait = server.poll_timeout().map(|t| t.saturating_duration_since(now));
//! #             if wait.is_none_or(|w| !w.is_zero()) {
//! #                 socket.set_read_timeout(wait).expect("a timeout");
//! #                 if let Ok((n, from)) = socket.recv_from(&mut buf) {
//! #                     server.handle_datagram(Instant::now(), from, &buf[..n]);
//! #                 }
//! #             }
//! #             server.handle_timeout(Instant::now());
//! #         }
//! #     });
//! #     Ok(at)
//! # }
//! ```
//!
//! Without its default feature `driver` (`default-features = false`) the
//! crate is this sans-IO core alone: no `mio`, no SQLite, no signal
//! handling, no terminal code.

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

pub mod client;
pub mod crypto;
#[cfg(feature = "driver")]
pub mod driver;
#[cfg(feature = "fuzzing")]
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

pub use client::{Client, ClientConfig, CommandError, Event, Path, console};
pub use server::{Census, Remote, Server, ServerConfig, ServerEvent, StoreFailure, Waiting};

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
