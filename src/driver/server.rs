//! The server's poll loop.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use std::sync::Arc;

use mio::net::UdpSocket;
use mio::{Events, Token, Waker};

use super::commits::{Commits, Done};
use super::keys;
use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{
    Fatal, RECV_BUF, SEND_BATCH, SERVER_BUFFERS, SIGNALS, bind, io_fatal, listen, random_seed,
    read_burst, send_all, size_buffers, unix_now, wait,
};
use crate::crypto::Keypair;
use crate::server::ServerStats;
use crate::store::{MailboxLimits, Store};
use crate::wire::{Name, Rejection};
use crate::{Server, ServerConfig, ServerEvent, StoreFailure};

/// The store's thread says it finished something.
const STORE: Token = Token(2);

/// The server's static key, in its data directory.
pub const KEY_FILE: &str = "server.key";

/// What the command line chose for the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Where the server's key lives, and the SQLite database unless
    /// `store` says otherwise.
    pub data_dir: PathBuf,
    /// A PostgreSQL connection string: the registry and mailboxes are kept
    /// there (see [`super::postgres`]).
    pub store: Option<String>,
    /// One of several servers on `store`: the address clients reach this
    /// one at (the others redirect there; see [`super::cluster`]).
    pub advertise: Option<SocketAddr>,
    /// The heartbeat interval clients use; three missed ones mark a client
    /// offline.
    pub heartbeat: Duration,
    /// Most messages in one mailbox.
    pub mailbox_messages: usize,
    /// Most bytes in one mailbox.
    pub mailbox_bytes: usize,
    /// Most bytes stored in all.
    pub store_bytes: usize,
    /// Most names in the registry.
    pub max_clients: usize,
    /// How long undelivered mail is kept (`None`: until delivered).
    pub mail_ttl: Option<Duration>,
    /// How long a name not online is kept (`None`: for good).
    pub name_ttl: Option<Duration>,
    /// New names one source registers at once (then one per 10 s).
    pub names_per_source: usize,
    /// Requests one source sends at once (then half as many a second).
    pub requests_per_source: usize,
    /// How often the log sums up (`None`: never).
    pub summary_every: Option<Duration>,
}

/// Runs the server until a signal stops it. Returns the exit status.
pub fn run(options: Options) -> Result<i32, Fatal> {
    // The port first: a server that cannot listen must not create or touch
    // a data directory. Then the data: a damaged store stops the server
    // before it reads a single datagram.
    let socket = bind(options.addr)?;
    let dir = options.data_dir.display();
    let data_error = |e: &dyn std::fmt::Display| Fatal(format!("error: data dir {dir}: {e}"));
    let store_error = |e: &dyn std::fmt::Display| Fatal(format!("error: --store: {e}"));
    let mut joined = None;
    let (mut store, described): (Box<dyn Store + Send>, String) = match &options.store {
        None => {
            let sqlite = SqliteStore::open(&options.data_dir).map_err(|e| data_error(&e))?;
            (Box::new(sqlite), String::new())
        }
        Some(url) => {
            // Only the key lives in the data directory then (created
            // with it, 0700).
            let mut pg = PgStore::open(url).map_err(|e| store_error(&e))?;
            match options.advertise {
                // Before the load: what others commit meanwhile comes twice
                // (harmless), not never. With its key: the cluster's must
                // be one (clients pin it, channel mail is sealed with it).
                Some(me) => {
                    let secret = random_seed()?;
                    let key_path = options.data_dir.join(KEY_FILE);
                    let (key, _) =
                        keys::load_or_create(&key_path, || Keypair::from_secret(secret))?;
                    let joining = pg.join(me, &key.public()).map_err(|e| store_error(&e))?;
                    joined = Some((me, joining));
                    // The others write the same mailboxes: the database
                    // counts them, and refuses what one has no room for.
                    pg.limit_mailboxes(MailboxLimits {
                        messages: options.mailbox_messages,
                        bytes: options.mailbox_bytes,
                        ttl: options.mail_ttl,
                    });
                }
                None => {
                    let live = pg.cluster_running().map_err(|e| store_error(&e))?;
                    if let Some(one) = live.first() {
                        return Err(store_error(&format!(
                            "{}: {} servers with --advertise run on this database (e.g. {one}); start this one with --advertise too",
                            pg.describe(),
                            live.len()
                        )));
                    }
                }
            }
            let shown = pg.describe().to_string();
            (Box::new(pg), shown)
        }
    };
    let loaded = store.load().map_err(|e| match options.store {
        None => data_error(&e),
        Some(_) => store_error(&e),
    })?;
    // Created on first start, kept ever after: clients pin it.
    let secret = random_seed()?;
    let key_path = options.data_dir.join(KEY_FILE);
    let (key, _) = keys::load_or_create(&key_path, || Keypair::from_secret(secret))?;
    let fingerprint = key.public().to_hex();
    // Room for a join storm's burst while the loop commits or sends.
    let want = SERVER_BUFFERS;
    let (recv, send) = size_buffers(&socket, want);
    let (socket, mut poll, mut signals) = listen(socket)?;
    let local = socket.local_addr().map_err(io_fatal)?;
    let waker = Arc::new(Waker::new(poll.registry(), STORE).map_err(io_fatal)?);

    let now = Instant::now();
    let mut config = ServerConfig::new(random_seed()?, key, (now, unix_now()));
    config.presence_timeout = options.heartbeat * 3;
    config.mailbox_messages = options.mailbox_messages;
    config.mailbox_bytes = options.mailbox_bytes;
    config.store_bytes = options.store_bytes;
    config.max_clients = options.max_clients;
    config.mail_ttl = options.mail_ttl;
    config.name_ttl = options.name_ttl;
    config.new_names.0 = u32::try_from(options.names_per_source).unwrap_or(u32::MAX);
    let burst = u32::try_from(options.requests_per_source).unwrap_or(u32::MAX);
    // Half the burst a second: a source that keeps to that never waits.
    config.requests = (burst, Duration::from_secs(2) / burst.max(1));
    config.instance = joined.as_ref().map(|(_, j)| j.instance);
    let known = loaded.clients.len();
    let mut server = Server::new(config, now, loaded);
    let me = joined.as_ref().map(|(me, _)| *me);
    if let Some((me, joined)) = joined {
        server.set_servers(me, &joined.live);
        server.handle_remote(now, joined.presence);
    }
    let mut commits = Commits::start(store, waker).map_err(io_fatal)?;
    let mut log = Log::default();
    log.line(&format!("udpchat server listening on {local}"));
    // The public half only: what a user may compare out of band.
    log.line(&format!("server key {fingerprint}"));
    let absolute = std::fs::canonicalize(&options.data_dir).unwrap_or_default();
    log.line(&format!("data dir {dir} ({})", absolute.display()));
    if !described.is_empty() {
        log.line(&format!("store {described} (PostgreSQL)"));
    }
    if let Some(me) = me {
        let live = server.cluster_size();
        log.line(&format!(
            "one of {live} servers on the store; clients reach this one at {me}"
        ));
    }
    if known > options.max_clients {
        log.line(&format!(
            "the registry holds {known} names, more than --max-clients {}: new names are refused",
            options.max_clients
        ));
    }
    for (what, got, asked, cap) in [
        ("receive", recv, want.0, "net.core.rmem_max"),
        ("send", send, want.1, "net.core.wmem_max"),
    ] {
        if got < asked {
            log.line(&format!(
                "{what} buffer is {} KiB, not the {} KiB asked: {cap} caps it (raise it, or run with CAP_NET_ADMIN)",
                got >> 10,
                asked >> 10
            ));
        }
    }

    log.flush();
    let mut summary = options.summary_every.map(|every| Summary::new(every, now));

    let mut events = Events::with_capacity(16);
    let mut buf = [0u8; RECV_BUF];
    let mut backlog = false;
    let mut failing = false;
    // When the socket was last read empty. While every burst since found
    // more waiting, whatever is read now arrived after it, so `now -
    // drained` bounds how long it waited: a backlog not worked off for that
    // long is what tells the server to answer "busy". (A long turn of
    // commits and sends alone is not: its latecomers are answered in the
    // next burst.)
    let mut drained = Instant::now();
    loop {
        let summary_due = summary.as_ref().map(|s| s.next);
        let deadline = match (server.poll_timeout(), summary_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        wait(&mut poll, &mut events, deadline, backlog)?;
        for event in events.iter() {
            if event.token() == SIGNALS && signals.pending().next().is_some() {
                log.line("udpchat server stopped");
                log.flush();
                return Ok(0);
            }
        }
        let now = Instant::now();
        server.set_queue_delay(if backlog {
            now - drained
        } else {
            Duration::ZERO
        });
        let mut read = 0;
        backlog = read_burst(&socket, &mut buf, |from, data| {
            read += 1;
            server.handle_datagram(now, from, data)
        });
        if !backlog {
            drained = Instant::now();
        }
        server.handle_timeout(now);
        let sent = flush(
            &mut server,
            &mut commits,
            &socket,
            (now, me),
            &mut failing,
            &mut log,
        )?;
        if let Some(summary) = summary.as_mut() {
            summary.count(read, sent);
            if now >= summary.next {
                log.line(&summary.line(&server, now));
            }
        }
        log.flush();
    }
}

/// The server's log on stdout: one line per state change, each stamped
/// with the time (RFC 3339, UTC, to the millisecond), gathered over a loop
/// turn and written with one flushed write at its end: a join storm logs
/// thousands of lines, and a write each would cost CPU the protocol needs.
#[derive(Default)]
struct Log {
    lines: String,
    /// This turn's time stamp, taken at its first line.
    stamp: Option<String>,
}

impl Log {
    fn line(&mut self, text: &str) {
        let stamp = self
            .stamp
            .get_or_insert_with(|| super::rfc3339(SystemTime::now()));
        self.lines.push_str(stamp);
        self.lines.push(' ');
        self.lines.push_str(text);
        self.lines.push('\n');
    }

    /// Writes what was gathered; a closed stdout is not worth dying for.
    fn flush(&mut self) {
        self.stamp = None;
        if self.lines.is_empty() {
            return;
        }
        let mut out = io::stdout().lock();
        let _ = out.write_all(self.lines.as_bytes());
        let _ = out.flush();
        self.lines.clear();
    }
}

/// The periodic summary line: the state (online, registered, stored) and
/// what came and went since the last one.
struct Summary {
    every: Duration,
    next: Instant,
    since: Instant,
    /// Datagrams read and sent since the last summary.
    read: u64,
    sent: u64,
    /// The server's counters at the last summary.
    last: ServerStats,
}

impl Summary {
    fn new(every: Duration, now: Instant) -> Summary {
        Summary {
            every,
            next: now + every,
            since: now,
            read: 0,
            sent: 0,
            last: ServerStats::default(),
        }
    }

    fn count(&mut self, read: u64, sent: u64) {
        self.read += read;
        self.sent += sent;
    }

    /// The line, and the counting starts over.
    fn line(&mut self, server: &Server, now: Instant) -> String {
        let census = server.census();
        let stats = server.stats();
        let last = std::mem::replace(&mut self.last, stats);
        let secs = now.duration_since(self.since).as_secs();
        let line = format!(
            "summary: {} online, {} registered, {} stored messages; in the last {secs} s: \
             {} datagrams in, {} out, {} malformed, {} ignored, {} rate-limited, {} stored \
             messages delivered",
            census.online,
            census.registered,
            census.stored,
            self.read,
            self.sent,
            stats.malformed - last.malformed,
            stats.ignored - last.ignored,
            stats.limited - last.limited,
            stats.delivered - last.delivered,
        );
        self.read = 0;
        self.sent = 0;
        self.since = now;
        self.next = now + self.every;
        line
    }
}

/// Takes in what the store's thread finished, hands it what the server
/// wants stored or fetched, then sends what the server released; returns
/// how many datagrams it sent. `failing`: the last commit failed (said
/// once, until one succeeds).
fn flush(
    server: &mut Server,
    commits: &mut Commits,
    socket: &UdpSocket,
    (now, me): (Instant, Option<SocketAddr>),
    failing: &mut bool,
    log: &mut Log,
) -> Result<u64, Fatal> {
    let mut sent = 0;
    loop {
        let thread_gone = |e: io::Error| Fatal(format!("error: cannot store messages: {e}"));
        while let Some(done) = commits.take_done().map_err(thread_gone)? {
            let notes = match done {
                Done::Committed(Ok(()), notes, outcomes) => {
                    server.handle_committed_as(now, outcomes);
                    if std::mem::take(failing) {
                        log.line("the store takes writes again");
                    }
                    notes
                }
                Done::Committed(Err(e), notes, _) => {
                    for note in notes {
                        log.line(&note);
                    }
                    // A full disk, a lock someone else holds, a database
                    // out of reach: refuse what needed the store, serve
                    // everything else, try again.
                    let failure = StoreFailure::of(&e)
                        .ok_or_else(|| Fatal(format!("error: cannot store messages: {e}")))?;
                    if !std::mem::replace(failing, true) {
                        log.line(&format!(
                            "cannot store messages: {e}; they are refused until it can"
                        ));
                    }
                    server.handle_commit_failed(now, failure);
                    Vec::new()
                }
                Done::Fetched(to, mail, body, notes) => {
                    server.handle_fetched(now, &to, mail, body);
                    notes
                }
                Done::Mailboxes(names, mail, notes) => {
                    server.handle_mailboxes(now, &names, mail);
                    notes
                }
                Done::News(Ok(news), notes) => {
                    if let (Some(me), Some(live)) = (me, news.live) {
                        let before = server.cluster_size();
                        server.set_servers(me, &live);
                        if server.cluster_size() != before {
                            log.line(&format!("{} servers live", server.cluster_size()));
                        }
                    }
                    server.handle_remote(now, news.changes);
                    if news.rejoined {
                        log.line("this server's lease had run out (it was stuck): its clients are announced again");
                        server.republish_presence();
                    }
                    notes
                }
                // Asked again shortly: the connection is being looked for.
                Done::News(Err(e), notes) if e.kind() == io::ErrorKind::NotConnected => notes,
                Done::News(Err(e), _) => return Err(Fatal(format!("error: {e}"))),
            };
            for note in notes {
                log.line(&note);
            }
        }
        commits.dispatch(server).map_err(thread_gone)?;
        // UDP is lossy anyway: a full send buffer is one more loss that the
        // retransmissions cover.
        // In chunks as they come: a channel fan-out seals its copies as
        // they are polled, and the sender's ack ahead of them should not
        // wait for the last one. The turn's first datagram (that ack, or
        // the first reply) goes on its own, before any sealing.
        let mut batch = Vec::new();
        let mut chunk = 1;
        loop {
            batch.clear();
            batch.extend(std::iter::from_fn(|| server.poll_transmit()).take(chunk));
            if batch.is_empty() {
                break;
            }
            sent += batch.len() as u64;
            send_all(socket, &mut batch);
            chunk = SEND_BATCH;
        }
        while let Some(event) = server.poll_event() {
            log.line(&line(&event));
        }
        // A fan-out sent above may have asked for bodies: asked now, not
        // at the next datagram.
        if !server.wants_fetch() {
            return Ok(sent);
        }
    }
}

/// The log line for `event`.
fn line(event: &ServerEvent) -> String {
    match event {
        ServerEvent::Registered(name, addr) => format!("{name} registered from {addr}"),
        ServerEvent::Offline(name, true) => format!("{name} deregistered"),
        ServerEvent::Offline(name, false) => format!("{name} is silent: marked offline"),
        ServerEvent::Forgotten { name, days } => {
            format!("forgot {name}: not online for {days} days (--name-ttl); the name is free")
        }
        ServerEvent::StoredChannel {
            from, recipients, ..
        } => {
            let whom = if *recipients == 1 {
                "client"
            } else {
                "clients"
            };
            format!("stored a channel message from {from} for {recipients} {whom}")
        }
        ServerEvent::Stored { to, from, channel } => {
            let kind = if *channel {
                "channel message"
            } else {
                "message"
            };
            format!("stored a {kind} from {from} for {to}")
        }
        ServerEvent::Rejected(name, addr, Rejection::InUse) => {
            format!("refused {name} from {addr}: name in use")
        }
        ServerEvent::Rejected(name, addr, Rejection::OtherKey) => {
            format!("refused {name} from {addr}: the name belongs to another key")
        }
        ServerEvent::Moved(name, addr) => format!("{name} moved to {addr}"),
        ServerEvent::Delivered { to, from, relayed } => {
            let how = if *relayed { "relayed" } else { "stored" };
            format!("delivered a {how} message from {from} to {to}: acked and deleted")
        }
        ServerEvent::Relaying { to, from } => {
            format!("relaying a message from {from} to {to} (stored until {to} acks it)")
        }
        ServerEvent::Back(name, addr) => {
            format!("{name} is back online at {addr}, on the session it had")
        }
        ServerEvent::Unverifiable { to, from, mail } => format!(
            "stored message {} for {to} is not sealed by the key of {from}: dropped",
            mail.0
        ),
        ServerEvent::Undecryptable(name, mail) => format!(
            "stored message {} for {name} cannot be decrypted (damaged, or server.key changed): dropped",
            mail.0
        ),
        ServerEvent::MailboxFull { to, from, channel } => {
            let what = if *channel {
                "a channel message"
            } else {
                "a message"
            };
            format!("mailbox of {to} is full: {what} from {from} was not kept")
        }
        ServerEvent::Expired { to, from, mail } => format!(
            "stored message {} for {to} from {from} expired undelivered: deleted",
            mail.0
        ),
        ServerEvent::NotSaved {
            from,
            channel,
            failure,
        } => {
            let kind = if *channel {
                "channel message"
            } else {
                "message"
            };
            let why = match failure {
                StoreFailure::Full => "the store is full",
                StoreFailure::Busy => "the database is locked by another process",
                StoreFailure::Unreachable => "the database cannot be reached",
            };
            format!("refused a {kind} from {from}: {why}")
        }
    }
}

/// One line on stdout, flushed; a closed stdout is not worth dying for.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `udpchat --release NAME`: frees a name in the data directory, or in the
/// PostgreSQL database of `--store` (the servers stopped), so the next key
/// to register it owns it.
pub fn release(data_dir: &std::path::Path, store: Option<&str>, name: &Name) -> Result<i32, Fatal> {
    let deleted = match store {
        Some(url) => PgStore::open(url)
            .and_then(|mut pg| {
                // Servers running on the database keep the binding they
                // hold (and would give the mail back): they stop first.
                let live = pg.cluster_running()?;
                match live.first() {
                    Some(one) => Err(super::sqlite::StoreError(format!(
                        "{}: {} servers run on this database (e.g. {one}); stop them first",
                        pg.describe(),
                        live.len()
                    ))),
                    None => pg.release(name),
                }
            })
            .map_err(|e| Fatal(format!("error: --store: {e}")))?,
        None => {
            let dir = data_dir.display();
            if !data_dir.join(super::sqlite::DB_FILE).is_file() {
                return Err(Fatal(format!(
                    "error: data dir {dir}: no udpchat database here"
                )));
            }
            let mut store = SqliteStore::open(data_dir)
                .map_err(|e| Fatal(format!("error: data dir {dir}: {e}")))?;
            store
                .release(name)
                .map_err(|e| Fatal(format!("error: {e}")))?
        }
    };
    say(&format!(
        "released {name}: the next key to register it owns it; {deleted} stored messages for it were deleted"
    ));
    Ok(0)
}
