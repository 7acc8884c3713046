//! Fuzz targets, kept in the library so `cargo fuzz` (fuzz/fuzz_targets/)
//! and `cargo test` (tests/fuzz_targets.rs) run the very same functions.
//!
//! Each entry point takes arbitrary bytes and panics only when an invariant
//! is broken — a panic here is a finding, not a crash on bad input.
//!
//! [`server`] and [`client`] read the bytes as a *script*: a header, then
//! steps, each chosen by one byte (deliver raw bytes, deliver a well-formed
//! message built from the following bytes, let time pass, commit the store,
//! type a line …). Reading past the end yields zeros, so every byte string
//! is a valid script and a mutation of one byte changes one decision. Values
//! the machine under test sends out (tokens, nonces, sequence numbers, mail
//! ids) are remembered and can be echoed back, so a script can hold a real
//! session without guessing a 128-bit token. [`seeds`] writes scripts in the
//! same format for the committed corpus.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::store::{Loaded, MemoryStore, Store, StoreOp, StoredMail};
use crate::wire::{self, Entries, Entry, MailId, Message, MsgId, Name, Refusal, Seq, Text, Token};
use crate::{Client, ClientConfig, Server, ServerConfig, Transmit};

/// Steps run per script at most, so one input stays fast however long.
const MAX_STEPS: usize = 2048;
/// Values remembered per kind (tokens, nonces, …) for echoing back.
const MEMORY: usize = 8;
/// Server limits, small so the bounds are reached within a short script.
const MAX_CLIENTS: usize = 16;
const MAILBOX_MESSAGES: usize = 8;
const MAILBOX_BYTES: usize = 2048;
const STORE_BYTES: usize = 8192;
/// The client's local-table bound.
const MAX_TABLE: usize = 16;
/// Unix time of a script's start.
const EPOCH_UNIX: i64 = 1_700_000_000;

/// The client under test registers under `NAMES[0]` with this server.
fn server_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1024))
}

/// Source and table addresses a script can pick (index 0 is the client
/// target's server; the v4-mapped v6 one is a different address than its v4
/// twin, which the token check must notice).
fn addrs() -> [SocketAddr; 8] {
    [
        server_addr(),
        SocketAddr::from(([127, 0, 0, 1], 2000)),
        SocketAddr::from(([127, 0, 0, 1], 2001)),
        SocketAddr::from(([127, 0, 0, 2], 2000)),
        SocketAddr::from(([10, 0, 0, 1], 65535)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, 2000)),
        SocketAddr::from((Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped(), 2000)),
        SocketAddr::from(([0, 0, 0, 0], 0)),
    ]
}

/// Names a script can pick by index; more than [`MAX_CLIENTS`] of them so
/// the table fills up. The last index reads a raw name instead.
const NAMES: [&str; 31] = [
    "Alice",
    "Bob",
    "Carol",
    "张伟",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "e",
    "f",
    "g",
    "h",
    "i",
    "j",
    "k",
    "l",
    "m",
    "n",
    "o",
    "p",
    "q",
    "r",
    "s",
    "t",
    "u",
    "v",
    "w",
    "y",
    "z",
    "😀",
    "alice",
    "A-1",
    "b.b",
    "__",
];
const RAW_NAME: u8 = NAMES.len() as u8;
/// [`Reader::text`]: this length byte means "a long text" (u16 length).
const LONG_TEXT: u8 = 0xff;
/// [`Reader::seq`] and friends: a choice byte below this picks a remembered
/// value (0 the newest), at or above it reads a raw one.
const RAW: u8 = 0x80;

// ---- decode -----------------------------------------------------------------

/// `wire::decode` on arbitrary bytes: whatever decodes re-encodes within
/// [`wire::MAX_DATAGRAM`] to a datagram that decodes to an equal value.
///
/// Values, not bytes, are compared: postcard accepts over-long varints, so
/// the re-encoding may be shorter than the input — but never longer, since
/// the encoder writes every field in its shortest form.
pub fn decode(data: &[u8]) {
    let Ok(msg) = wire::decode(data) else {
        return;
    };
    let again = wire::encode_to_vec(&msg);
    assert!(
        !again.is_empty() && again.len() <= wire::MAX_DATAGRAM,
        "{msg:?} re-encoded to {} bytes",
        again.len()
    );
    assert!(
        again.len() <= data.len(),
        "{msg:?} re-encoded longer than its input"
    );
    assert_eq!(wire::decode(&again).as_ref(), Ok(&msg), "input {data:?}");
    // The canonical form is a fixed point.
    assert_eq!(wire::encode_to_vec(&msg), again);
}

// ---- server -----------------------------------------------------------------

/// Server script steps (`byte % SERVER_STEPS`).
mod server_step {
    pub const RAW: u8 = 0;
    pub const MESSAGE: u8 = 1;
    pub const ADVANCE: u8 = 2;
    pub const DEADLINE: u8 = 3;
    pub const COMMIT: u8 = 4;
    pub const COUNT: u8 = 5;
}

/// Drives a [`Server`] (16 clients, 8 messages or 2 KiB a mailbox, 8 KiB in
/// all) through a script.
///
/// Header: seed byte; up to 4 loaded clients and up to 4 loaded messages
/// (texts may break the rules, as a store edited by hand could). Steps: raw
/// datagram, well-formed message, advance time, jump to the next deadline,
/// commit the store.
///
/// Checked throughout: nothing is sent while store operations are
/// uncommitted; every datagram sent decodes and fits; no deadline is due
/// right after `handle_timeout`; the table, every mailbox and the store stay
/// within their limits; after a commit the store holds exactly what the
/// server holds.
///
/// `start` is the virtual clock's origin (the caller reads a clock once:
/// `Instant` has no constructor). Only offsets from it matter, so a run does
/// not depend on when it happens.
pub fn server(start: Instant, data: &[u8]) {
    let mut r = Reader::new(data);
    let mut config = ServerConfig::new([r.byte(); 32], (start, EPOCH_UNIX));
    config.max_clients = MAX_CLIENTS;
    config.mailbox_messages = MAILBOX_MESSAGES;
    config.mailbox_bytes = MAILBOX_BYTES;
    config.store_bytes = STORE_BYTES;
    let loaded = read_loaded(&mut r);
    let mut store = MemoryStore::new();
    let mut seed_ops: Vec<StoreOp> = loaded
        .clients
        .iter()
        .map(|(name, addr)| StoreOp::Client {
            name: name.clone(),
            addr: *addr,
        })
        .collect();
    seed_ops.extend(loaded.mail.iter().cloned().map(StoreOp::Put));
    store.commit(&seed_ops).expect("memory store");
    // A store from a server with bigger limits may start over ours: the
    // server must not grow it, and may not be blamed for it.
    let total_limit = STORE_BYTES.max(loaded.mail.iter().map(StoredMail::size).sum());
    let mut box_limits: HashMap<Name, (usize, usize)> = HashMap::new();
    for m in &loaded.mail {
        let e = box_limits.entry(m.to.clone()).or_default();
        e.0 += 1;
        e.1 += m.size();
    }
    let box_limit = |name: &Name| {
        let (n, bytes) = box_limits.get(name).copied().unwrap_or_default();
        (MAILBOX_MESSAGES.max(n), MAILBOX_BYTES.max(bytes))
    };

    let mut server = Server::new(config, start, loaded);
    let mut now = start;
    let mut memory = Memory::default();
    let mut uncommitted: Vec<StoreOp> = Vec::new();
    let mut steps = 0;
    while !r.is_empty() && steps < MAX_STEPS {
        steps += 1;
        match r.byte() % server_step::COUNT {
            server_step::RAW => {
                let from = r.source(&memory, addrs()[1]);
                let payload = r.raw_datagram();
                server.handle_datagram(now, from, payload);
            }
            server_step::MESSAGE => {
                let msg = r.message(&mut memory);
                let from = r.source(&memory, addrs()[1]);
                server.handle_datagram(now, from, &wire::encode_to_vec(&msg));
            }
            server_step::ADVANCE => {
                now += Duration::from_millis(u64::from(r.u16()));
                server_timeout(&mut server, now);
            }
            server_step::DEADLINE => {
                if let Some(t) = server.poll_timeout() {
                    now = now.max(t);
                }
                server_timeout(&mut server, now);
            }
            _ => {
                store.commit(&uncommitted).expect("memory store");
                uncommitted.clear();
                server.handle_committed();
            }
        }
        // Drain like the driver, except that committing is a script step.
        while let Some(op) = server.poll_store() {
            uncommitted.push(op);
        }
        while let Some(t) = server.poll_transmit() {
            assert!(
                uncommitted.is_empty(),
                "sent {t:?} with {} store operations uncommitted",
                uncommitted.len()
            );
            memory.learn(&check_transmit(&t), t.to);
        }
        while server.poll_event().is_some() {}

        assert!(server.table().len() <= MAX_CLIENTS, "table over its bound");
        assert!(
            server.stored_bytes() <= total_limit,
            "stored {} bytes, limit {total_limit}",
            server.stored_bytes()
        );
        for (_, entry) in server.table().iter() {
            let (n, bytes) = box_limit(&entry.name);
            let mail: Vec<&StoredMail> = server.mailbox(&entry.name).collect();
            assert!(mail.len() <= n, "mailbox of {} over its count", entry.name);
            let size: usize = mail.iter().map(|m| m.size()).sum();
            assert!(size <= bytes, "mailbox of {} over its bytes", entry.name);
        }
        if uncommitted.is_empty() {
            assert_store_mirrors(&mut store, &server);
        }
    }
}

fn server_timeout(server: &mut Server, now: Instant) {
    server.handle_timeout(now);
    assert!(
        server.poll_timeout().is_none_or(|t| t > now),
        "a deadline is due right after handle_timeout"
    );
}

/// With everything committed, the durable copy is the server's memory: the
/// same registry (name → last address) and the same mail, record for record.
fn assert_store_mirrors(store: &mut MemoryStore, server: &Server) {
    let durable = store.load().expect("memory store");
    let mut rows: BTreeMap<Name, SocketAddr> = BTreeMap::new();
    let mut mail: Vec<StoredMail> = Vec::new();
    for (_, entry) in server.table().iter() {
        rows.insert(entry.name.clone(), entry.addr);
        mail.extend(server.mailbox(&entry.name).cloned());
    }
    mail.sort_by_key(|m| m.mail);
    let clients: BTreeMap<Name, SocketAddr> = durable.clients.into_iter().collect();
    assert_eq!(clients, rows, "registry: store vs server");
    assert_eq!(durable.mail, mail, "mail: store vs server");
}

/// The header's loaded state: distinct clients (at most 4), and mail only
/// for them with distinct, increasing ids — a store the server itself could
/// have written, apart from the texts.
fn read_loaded(r: &mut Reader<'_>) -> Loaded {
    let mut loaded = Loaded::default();
    for _ in 0..r.byte() % 5 {
        let name = r.name();
        let addr = r.addr();
        if loaded.clients.iter().all(|(n, _)| *n != name) {
            loaded.clients.push((name, addr));
        }
    }
    let mut next = 0u64;
    for i in 0..r.byte() % 5 {
        let to = r.byte();
        let from = r.name();
        let channel = r.bool();
        let stored_at = r.u64() as i64;
        next += 1 + u64::from(r.byte());
        // Any length, empty or over the limit: the store is not trusted.
        let text = match r.byte() {
            LONG_TEXT => "é".repeat(usize::from(r.u16() % 600)),
            n => String::from_utf8_lossy(r.take(usize::from(n % 64))).into_owned(),
        };
        let Some((to, _)) = loaded
            .clients
            .get(usize::from(to) % loaded.clients.len().max(1))
        else {
            continue;
        };
        loaded.mail.push(StoredMail {
            mail: MailId(next),
            to: to.clone(),
            from,
            channel,
            stored_at,
            id: MsgId(u64::from(i)),
            text,
        });
    }
    loaded
}

// ---- client -----------------------------------------------------------------

/// Client script steps (`byte % COUNT`).
mod client_step {
    pub const RAW: u8 = 0;
    pub const MESSAGE: u8 = 1;
    pub const ADVANCE: u8 = 2;
    pub const DEADLINE: u8 = 3;
    pub const LINE: u8 = 4;
    pub const COMMAND: u8 = 5;
    pub const COUNT: u8 = 6;
}

/// Commands of [`client_step::COMMAND`] (`byte % COUNT`).
mod command {
    pub const SEND: u8 = 0;
    pub const SEND_ALL: u8 = 1;
    pub const DEREG: u8 = 2;
    pub const REG: u8 = 3;
    pub const LIST: u8 = 4;
    pub const HELP: u8 = 5;
    pub const COUNT: u8 = 6;
}

/// Drives a [`Client`] named `Alice` (local table of 16) through a script.
///
/// Header: seed byte, heartbeat byte (1–20 s). Steps: raw datagram,
/// well-formed message (from the server by default), advance time, jump to
/// the next deadline, raw typed bytes (split into lines), a well-formed
/// command.
///
/// Checked throughout: every datagram sent decodes and fits; no deadline is
/// due right after `handle_timeout`; the table stays within its bound; every
/// event renders; after `Exit` nothing more is sent and nothing is due.
///
/// `start` is the virtual clock's origin, as for [`server`].
pub fn client(start: Instant, data: &[u8]) {
    let mut r = Reader::new(data);
    let name = Name::new(NAMES[0]).expect("valid name");
    let mut config = ClientConfig::new(name, server_addr(), [r.byte(); 32]);
    config.max_table = MAX_TABLE;
    config.heartbeat = Duration::from_secs(1 + u64::from(r.byte() % 20));
    let mut client = Client::new(config, start);
    let mut now = start;
    let mut memory = Memory::default();
    let mut exited = false;
    let mut steps = 0;
    loop {
        // Drain first: the registration is out before the first step.
        while let Some(t) = client.poll_transmit() {
            assert!(!exited, "sent {t:?} after exiting");
            memory.learn(&check_transmit(&t), t.to);
        }
        while let Some(event) = client.poll_event() {
            if let crate::Event::Exit(_) = event {
                assert!(!exited, "exited twice");
                exited = true;
            } else {
                let line = event.render(|unix| unix.to_string());
                assert!(line.is_some(), "{event:?} renders no line");
            }
        }
        if exited {
            assert_eq!(client.poll_timeout(), None, "a deadline after exit");
        }
        assert!(client.table().len() <= MAX_TABLE, "table over its bound");
        if r.is_empty() || steps == MAX_STEPS {
            break;
        }
        steps += 1;
        match r.byte() % client_step::COUNT {
            client_step::RAW => {
                let from = r.source(&memory, server_addr());
                let payload = r.raw_datagram();
                client.handle_datagram(now, from, payload);
            }
            client_step::MESSAGE => {
                let msg = r.message(&mut memory);
                let from = r.source(&memory, server_addr());
                client.handle_datagram(now, from, &wire::encode_to_vec(&msg));
            }
            client_step::ADVANCE => {
                now += Duration::from_millis(u64::from(r.u16()));
                client_timeout(&mut client, now);
            }
            client_step::DEADLINE => {
                if let Some(t) = client.poll_timeout() {
                    now = now.max(t);
                }
                client_timeout(&mut client, now);
            }
            client_step::LINE => {
                let n = usize::from(r.u16() % 1200);
                let typed = String::from_utf8_lossy(r.take(n)).into_owned();
                for line in typed.split('\n') {
                    client.handle_line(now, line);
                }
            }
            _ => {
                let line = r.command();
                client.handle_line(now, &line);
            }
        }
    }
}

fn client_timeout(client: &mut Client, now: Instant) {
    client.handle_timeout(now);
    assert!(
        client.poll_timeout().is_none_or(|t| t > now),
        "a deadline is due right after handle_timeout"
    );
}

/// Every datagram either machine sends is one well-formed message.
fn check_transmit(t: &Transmit) -> Message {
    assert!(
        t.payload.len() <= wire::MAX_DATAGRAM,
        "a {}-byte datagram",
        t.payload.len()
    );
    match wire::decode(&t.payload) {
        Ok(msg) => msg,
        Err(e) => panic!("sent an undecodable datagram ({e}): {:?}", t.payload),
    }
}

// ---- script reading ---------------------------------------------------------

/// Values seen in sent datagrams, each with the address it went to (a reply
/// that echoes one usually has to come from there).
#[derive(Default)]
struct Memory {
    tokens: VecDeque<(Token, SocketAddr)>,
    seqs: VecDeque<(Seq, SocketAddr)>,
    /// Probe nonces, message ids, mail ids, table versions.
    numbers: VecDeque<(u64, SocketAddr)>,
    /// The address of the value picked last: the default source.
    hint: Option<SocketAddr>,
}

fn remember<T>(ring: &mut VecDeque<(T, SocketAddr)>, value: T, to: SocketAddr) {
    if ring.len() == MEMORY {
        ring.pop_front();
    }
    ring.push_back((value, to));
}

impl Memory {
    fn learn(&mut self, msg: &Message, to: SocketAddr) {
        use Message::*;
        match *msg {
            Register { seq, .. }
            | Rejected { seq }
            | Ack { seq }
            | Exists { seq, .. }
            | Refused { seq, .. } => remember(&mut self.seqs, seq, to),
            Deregister { seq, token } => {
                remember(&mut self.seqs, seq, to);
                remember(&mut self.tokens, token, to);
            }
            SaveMessage { seq, token, id, .. } | ChannelSend { seq, token, id, .. } => {
                remember(&mut self.seqs, seq, to);
                remember(&mut self.tokens, token, to);
                remember(&mut self.numbers, id.0, to);
            }
            Sync {
                seq, token, since, ..
            } => {
                remember(&mut self.seqs, seq, to);
                remember(&mut self.tokens, token, to);
                remember(&mut self.numbers, since, to);
            }
            Heartbeat {
                seq,
                token,
                version,
            } => {
                remember(&mut self.seqs, seq, to);
                remember(&mut self.tokens, token, to);
                remember(&mut self.numbers, version, to);
            }
            Delivered { token, mail } => {
                remember(&mut self.tokens, token, to);
                remember(&mut self.numbers, mail.0, to);
            }
            ProbeReply { nonce } | Probe { nonce, .. } => remember(&mut self.numbers, nonce, to),
            Welcome {
                seq,
                token,
                version,
                ..
            } => {
                remember(&mut self.seqs, seq, to);
                remember(&mut self.tokens, token, to);
                remember(&mut self.numbers, version, to);
            }
            Page { seq, version, .. } | Alive { seq, version } => {
                remember(&mut self.seqs, seq, to);
                remember(&mut self.numbers, version, to);
            }
            Delta { version, .. } => remember(&mut self.numbers, version, to),
            Deliver { mail, .. } => remember(&mut self.numbers, mail.0, to),
            Chat { id, .. } | ChatAck { id } => remember(&mut self.numbers, id.0, to),
        }
    }
}

/// The `i`-th newest remembered value (modulo how many there are).
fn newest<T: Copy>(ring: &VecDeque<(T, SocketAddr)>, i: u8) -> (T, SocketAddr) {
    ring[ring.len() - 1 - usize::from(i) % ring.len()]
}

/// Reads a script; past the end every read yields zeros.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    fn byte(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length (u16, up to just over one datagram) and that many bytes.
    fn raw_datagram(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16()) % (wire::MAX_DATAGRAM + 2);
        self.take(n)
    }

    fn addr(&mut self) -> SocketAddr {
        let all = addrs();
        all[usize::from(self.byte()) % all.len()]
    }

    /// Where a datagram comes from: one of [`addrs`], or (two values in
    /// ten) the address of the value picked last, else `default`.
    fn source(&mut self, memory: &Memory, default: SocketAddr) -> SocketAddr {
        let b = self.byte() % 10;
        let all = addrs();
        match all.get(usize::from(b)) {
            Some(&addr) => addr,
            None => memory.hint.unwrap_or(default),
        }
    }

    fn name(&mut self) -> Name {
        let b = self.byte() % (RAW_NAME + 1);
        let raw;
        let s = match NAMES.get(usize::from(b)) {
            Some(s) => *s,
            None => {
                let n = usize::from(self.byte() % 40);
                raw = String::from_utf8_lossy(self.take(n)).into_owned();
                &raw
            }
        };
        Name::new(s).unwrap_or_else(|_| Name::new("Invalid").expect("valid name"))
    }

    fn text(&mut self) -> Text {
        let s = match self.byte() {
            // Over the limit and multi-byte: exercises the bound and UTF-8
            // boundaries in the encoder.
            LONG_TEXT => "€".repeat(usize::from(self.u16() % 340)),
            n => String::from_utf8_lossy(self.take(usize::from(n % 64) + 1)).into_owned(),
        };
        Text::new(&s).unwrap_or_else(|_| Text::new("…").expect("valid text"))
    }

    fn seq(&mut self, memory: &mut Memory) -> Seq {
        let b = self.byte();
        if b < RAW && !memory.seqs.is_empty() {
            let (seq, addr) = newest(&memory.seqs, b);
            memory.hint = Some(addr);
            return seq;
        }
        Seq(self.u32())
    }

    fn token(&mut self, memory: &mut Memory) -> Token {
        let b = self.byte();
        if b < RAW && !memory.tokens.is_empty() {
            let (token, addr) = newest(&memory.tokens, b);
            memory.hint = Some(addr);
            return token;
        }
        Token(self.array())
    }

    fn number(&mut self, memory: &mut Memory) -> u64 {
        let b = self.byte();
        if b < RAW && !memory.numbers.is_empty() {
            let (n, addr) = newest(&memory.numbers, b);
            memory.hint = Some(addr);
            return n;
        }
        self.u64()
    }

    fn entry(&mut self) -> Entry {
        Entry {
            name: self.name(),
            addr: self.addr(),
            online: self.bool(),
        }
    }

    fn entries(&mut self) -> Entries {
        let n = usize::from(self.byte()) % (wire::PAGE_ENTRIES + 1);
        (0..n).map(|_| self.entry()).collect()
    }

    /// A well-formed message: the variant by index (as on the wire), the
    /// fields from the following bytes or from [`Memory`].
    fn message(&mut self, m: &mut Memory) -> Message {
        m.hint = None;
        match self.byte() % 20 {
            0 => Message::Register {
                seq: self.seq(m),
                name: self.name(),
            },
            1 => Message::Deregister {
                seq: self.seq(m),
                token: self.token(m),
            },
            2 => Message::SaveMessage {
                seq: self.seq(m),
                token: self.token(m),
                to: self.name(),
                id: MsgId(self.number(m)),
                text: self.text(),
            },
            3 => Message::ChannelSend {
                seq: self.seq(m),
                token: self.token(m),
                id: MsgId(self.number(m)),
                text: self.text(),
            },
            4 => Message::Sync {
                seq: self.seq(m),
                token: self.token(m),
                since: self.number(m),
                from: self.u32(),
            },
            5 => Message::Heartbeat {
                seq: self.seq(m),
                token: self.token(m),
                version: self.number(m),
            },
            6 => Message::Delivered {
                token: self.token(m),
                mail: MailId(self.number(m)),
            },
            7 => Message::ProbeReply {
                nonce: self.number(m),
            },
            8 => Message::Welcome {
                seq: self.seq(m),
                token: self.token(m),
                version: self.number(m),
                mail: self.u32() % 64,
            },
            9 => Message::Rejected { seq: self.seq(m) },
            10 => Message::Ack { seq: self.seq(m) },
            11 => Message::Exists {
                seq: self.seq(m),
                entry: self.entry(),
            },
            12 => Message::Refused {
                seq: self.seq(m),
                reason: match self.byte() % 4 {
                    0 => Refusal::MailboxFull,
                    1 => Refusal::UnknownRecipient,
                    2 => Refusal::UnknownSession,
                    _ => Refusal::Busy,
                },
            },
            13 => Message::Page {
                seq: self.seq(m),
                version: self.number(m),
                entries: self.entries(),
                next: self.bool().then(|| self.u32() % 64),
            },
            14 => Message::Delta {
                prev: self.number(m),
                version: self.number(m),
                entries: self.entries(),
            },
            15 => Message::Deliver {
                mail: MailId(self.number(m)),
                // A welcome's seq echoed back, so batches can match.
                batch: Seq(self.number(m) as u32),
                pos: self.bool().then(|| self.u32() % 64),
                from: self.name(),
                channel: self.bool(),
                stored_at: self.u64() as i64,
                id: MsgId(self.number(m)),
                text: self.text(),
            },
            16 => Message::Probe {
                nonce: self.number(m),
                name: self.name(),
            },
            17 => Message::Chat {
                from: self.name(),
                to: self.name(),
                id: MsgId(self.number(m)),
                text: self.text(),
            },
            18 => Message::ChatAck {
                id: MsgId(self.number(m)),
            },
            _ => Message::Alive {
                seq: self.seq(m),
                version: self.number(m),
            },
        }
    }

    /// A console line that parses: `send <name> <text>`, `send_all`, …
    fn command(&mut self) -> String {
        match self.byte() % command::COUNT {
            command::SEND => {
                let to = self.name();
                format!("send {to} {}", self.text())
            }
            command::SEND_ALL => format!("send_all {}", self.text()),
            command::DEREG => format!("dereg {}", self.name()),
            command::REG => format!("reg {}", self.name()),
            command::LIST => "list".to_string(),
            _ => "help".to_string(),
        }
    }
}

// ---- seeds ------------------------------------------------------------------

/// One message of every variant, with fields that take every wire path
/// (multi-byte names and text, v4 and v6 addresses, `Some` and `None`).
pub fn sample_messages() -> Vec<(&'static str, Message)> {
    let name = |s| Name::new(s).expect("valid name");
    let text = |s| Text::new(s).expect("valid text");
    let token = Token([7; 16]);
    let v4 = Entry {
        name: name("Alice"),
        addr: SocketAddr::from(([127, 0, 0, 1], 2000)),
        online: true,
    };
    let v6 = Entry {
        name: name("张伟"),
        addr: SocketAddr::from((Ipv6Addr::LOCALHOST, 65535)),
        online: false,
    };
    let entries: Entries = [v4.clone(), v6].into_iter().collect();
    vec![
        (
            "register",
            Message::Register {
                seq: Seq(1),
                name: name("Alice"),
            },
        ),
        ("deregister", Message::Deregister { seq: Seq(2), token }),
        (
            "save_message",
            Message::SaveMessage {
                seq: Seq(3),
                token,
                to: name("Bob"),
                id: MsgId(4),
                text: text("hello 你好"),
            },
        ),
        (
            "channel_send",
            Message::ChannelSend {
                seq: Seq(u32::MAX),
                token,
                id: MsgId(u64::MAX),
                text: text("hi all"),
            },
        ),
        (
            "sync",
            Message::Sync {
                seq: Seq(5),
                token,
                since: 300,
                from: 20,
            },
        ),
        (
            "heartbeat",
            Message::Heartbeat {
                seq: Seq(6),
                token,
                version: 7,
            },
        ),
        (
            "delivered",
            Message::Delivered {
                token,
                mail: MailId(8),
            },
        ),
        ("probe_reply", Message::ProbeReply { nonce: 1 << 40 }),
        (
            "welcome",
            Message::Welcome {
                seq: Seq(9),
                token,
                version: 10,
                mail: 2,
            },
        ),
        ("rejected", Message::Rejected { seq: Seq(11) }),
        ("ack", Message::Ack { seq: Seq(12) }),
        (
            "exists",
            Message::Exists {
                seq: Seq(13),
                entry: v4,
            },
        ),
        (
            "refused",
            Message::Refused {
                seq: Seq(14),
                reason: Refusal::MailboxFull,
            },
        ),
        (
            "page",
            Message::Page {
                seq: Seq(15),
                version: 16,
                entries: entries.clone(),
                next: Some(2),
            },
        ),
        (
            "delta",
            Message::Delta {
                prev: 16,
                version: 17,
                entries,
            },
        ),
        (
            "deliver",
            Message::Deliver {
                mail: MailId(18),
                batch: Seq(12),
                pos: Some(0),
                from: name("Bob"),
                channel: false,
                stored_at: -1,
                id: MsgId(19),
                text: text("stored 😀"),
            },
        ),
        (
            "probe",
            Message::Probe {
                nonce: 20,
                name: name("Alice"),
            },
        ),
        (
            "chat",
            Message::Chat {
                from: name("Bob"),
                to: name("Alice"),
                id: MsgId(21),
                text: text("hey"),
            },
        ),
        ("chat_ack", Message::ChatAck { id: MsgId(21) }),
        (
            "alive",
            Message::Alive {
                seq: Seq(22),
                version: 23,
            },
        ),
    ]
}

/// Writes scripts in the format [`Reader`] reads.
struct Writer(Vec<u8>);

impl Writer {
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn advance(self, step: u8, ms: u16) -> Self {
        self.bytes(&[step]).bytes(&ms.to_le_bytes())
    }
    fn raw_seq(self, seq: u32) -> Self {
        self.bytes(&[RAW]).bytes(&seq.to_le_bytes())
    }
    fn text(self, s: &str) -> Self {
        let n = u8::try_from(s.len() - 1).expect("short seed text");
        self.bytes(&[n]).bytes(s.as_bytes())
    }
}

/// Name indexes used by the seeds.
const ALICE: u8 = 0;
const BOB: u8 = 1;
const CAROL: u8 = 2;
/// [`Reader::source`]: "where the value picked last was sent".
const HINTED: u8 = 8;

/// The committed seed corpus: `(target, file name, contents)`. Decode seeds
/// are real datagrams, one per variant; server and client seeds are scripts
/// that hold real sessions (registration, mail, probes, timeouts).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, msg) in sample_messages() {
        out.push(("decode", format!("seed-{name}"), wire::encode_to_vec(&msg)));
    }
    // The longest datagrams.
    let long = Text::new(&"😀".repeat(wire::MAX_TEXT / 4)).expect("valid text");
    let chat = Message::Chat {
        from: Name::new(NAMES[4]).expect("valid name"),
        to: Name::new(NAMES[4]).expect("valid name"),
        id: MsgId(u64::MAX),
        text: long,
    };
    out.push(("decode", "seed-chat-max".into(), wire::encode_to_vec(&chat)));

    let (msg, raw, adv, deadline, commit) = (
        server_step::MESSAGE,
        server_step::RAW,
        server_step::ADVANCE,
        server_step::DEADLINE,
        server_step::COMMIT,
    );
    let [a1, a2, a3] = [1, 2, 3];
    // Alice and Bob register, commit, Alice's session saves mail for Carol
    // (offline, unknown) and Bob, sends to the channel; time passes.
    let sessions = Writer(vec![1, 0, 0])
        .bytes(&[msg, 0])
        .raw_seq(1)
        .bytes(&[ALICE, a1])
        .bytes(&[msg, 0])
        .raw_seq(1)
        .bytes(&[BOB, a2, commit])
        // SaveMessage with Alice's token (Bob's is the newest), to Carol.
        .bytes(&[msg, 2])
        .raw_seq(2)
        .bytes(&[1, CAROL, RAW])
        .bytes(&5u64.to_le_bytes())
        .text("for carol")
        .bytes(&[HINTED, commit])
        // ChannelSend from Alice.
        .bytes(&[msg, 3])
        .raw_seq(3)
        .bytes(&[1, RAW])
        .bytes(&6u64.to_le_bytes())
        .text("hello all")
        .bytes(&[HINTED, commit])
        .advance(adv, 400)
        .bytes(&[deadline, commit, deadline, commit])
        .advance(adv, 40_000)
        .bytes(&[commit]);
    out.push(("server", "seed-sessions".into(), sessions.0));
    // A loaded store (two clients, mail for one) and a client logging back
    // in, acking its delivery; then garbage.
    let loaded = Writer(vec![2, 2, ALICE, a1, BOB, a2, 1])
        .bytes(&[0, BOB, 0])
        .bytes(&[0; 8])
        .bytes(&[0])
        .bytes(&[5])
        .bytes(b"hello")
        .bytes(&[msg, 0])
        .raw_seq(7)
        .bytes(&[ALICE, a1, commit])
        // Delivered with the welcome's token and the delivery's mail id.
        .bytes(&[msg, 6, 0, 1, HINTED, commit])
        .bytes(&[raw, a3, 4, 0, 1, 0xff, 0, 0])
        .bytes(&[deadline, commit]);
    out.push(("server", "seed-loaded".into(), loaded.0));
    // A name held by a live client at another address: the probe, its
    // reply, and a registration over a silent holder.
    let probe = Writer(vec![3, 0, 0])
        .bytes(&[msg, 0])
        .raw_seq(1)
        .bytes(&[ALICE, a1, commit])
        .bytes(&[msg, 0])
        .raw_seq(2)
        .bytes(&[ALICE, a2, commit])
        // ProbeReply with the probe's nonce, from where it was sent.
        .bytes(&[msg, 7, 0, HINTED, commit])
        .bytes(&[msg, 0])
        .raw_seq(3)
        .bytes(&[ALICE, a3, commit])
        .bytes(&[deadline, commit, deadline, commit, deadline, commit]);
    out.push(("server", "seed-probe".into(), probe.0));

    let (cmsg, cline, ccmd, cadv, cdeadline) = (
        client_step::MESSAGE,
        client_step::LINE,
        client_step::COMMAND,
        client_step::ADVANCE,
        client_step::DEADLINE,
    );
    let server = 0;
    // Welcome (echoing the registration's seq), a table page, a direct
    // message both ways, stored mail, a channel message, heartbeats.
    let session = Writer(vec![9, 2])
        .bytes(&[cmsg, 8, 0, RAW])
        .bytes(&[1; 16])
        .bytes(&[RAW])
        .bytes(&1u64.to_le_bytes())
        .bytes(&[0, 0, 0, 0, server])
        // Page answering the sync: Alice and Bob online.
        .bytes(&[cmsg, 13, 0, RAW])
        .bytes(&2u64.to_le_bytes())
        .bytes(&[2, ALICE, 1, 1, BOB, 2, 1, 0, server])
        .bytes(&[ccmd, command::SEND, BOB])
        .text("hi bob")
        .bytes(&[cmsg, 18, 0, 2])
        .bytes(&[cmsg, 17, BOB, ALICE, RAW])
        .bytes(&3u64.to_le_bytes())
        .text("hi alice")
        .bytes(&[2])
        .bytes(&[cmsg, 15, RAW])
        .bytes(&4u64.to_le_bytes())
        .bytes(&[0, CAROL, 1])
        .bytes(&[0; 8])
        .bytes(&[RAW])
        .bytes(&5u64.to_le_bytes())
        .text("channel")
        .bytes(&[server])
        .bytes(&[ccmd, command::SEND, CAROL])
        .text("offline?")
        .bytes(&[ccmd, command::SEND_ALL])
        .text("all")
        .advance(cadv, 600)
        .bytes(&[cdeadline, cdeadline, cdeadline])
        .bytes(&[ccmd, command::LIST, ccmd, command::HELP]);
    out.push(("client", "seed-session".into(), session.0));
    // Typed lines before and after a silent server: queued commands, the
    // give-up path and the exit.
    let typed = b"send Bob hi\nlist\nsend_all x\ndereg Alice\nreg Alice\nhelp";
    let silent = Writer(vec![1, 9])
        .bytes(&[cline])
        .bytes(&(typed.len() as u16).to_le_bytes())
        .bytes(typed)
        .bytes(&[cdeadline; 12]);
    out.push(("client", "seed-silent".into(), silent.0));
    // Registered, then dereg and reg again with a stored-mail batch.
    let logback = Writer(vec![4, 0])
        .bytes(&[cmsg, 8, 0, RAW])
        .bytes(&[2; 16])
        .bytes(&[RAW])
        .bytes(&1u64.to_le_bytes())
        .bytes(&[0, 0, 0, 0, server])
        .bytes(&[cmsg, 13, 0, RAW])
        .bytes(&1u64.to_le_bytes())
        .bytes(&[1, ALICE, 1, 1, 0, server])
        .bytes(&[ccmd, command::DEREG, ALICE])
        .bytes(&[cmsg, 10, 0, server])
        .bytes(&[ccmd, command::REG, ALICE])
        .bytes(&[cmsg, 8, 0, RAW])
        .bytes(&[3; 16])
        .bytes(&[RAW])
        .bytes(&2u64.to_le_bytes())
        .bytes(&[2, 0, 0, 0, server])
        .bytes(&[cmsg, 15, RAW])
        .bytes(&9u64.to_le_bytes())
        .bytes(&[1, 1, 0, 0, 0, BOB, 0])
        .bytes(&[0; 8])
        .bytes(&[RAW])
        .bytes(&1u64.to_le_bytes())
        .text("one")
        .bytes(&[server])
        .bytes(&[cadv, 0x88, 0x13, cdeadline, cdeadline]);
    out.push(("client", "seed-logback".into(), logback.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pool_name_is_a_valid_name() {
        // An invalid one would silently become the fallback name.
        for s in NAMES {
            assert!(Name::new(s).is_ok(), "{s:?}");
        }
    }
}
