//! The replicated [`Store`]: PostgreSQL (`--store postgres://…`), for a
//! server whose acked messages must survive the loss of its database
//! machine. Run it with synchronous streaming replication (a COMMIT returns
//! only once a standby has the WAL on disk) and give the server every node
//! (`postgres://user@h1:5432,h2:5432,h3:5432/udpchat?target_session_attrs=read-write`):
//! it talks to whichever one is primary, and finds the new one after a
//! failover by itself.
//!
//! The same contract as [`SqliteStore`](super::sqlite::SqliteStore), the
//! same rows refused (see `rows`). What is new is that a connection can be
//! lost in the middle of a COMMIT, when nobody knows whether it happened:
//! every operation is idempotent (a message is keyed by its id and by
//! (recipient, sender, msg_id), an ack counts once, a registry row is an
//! upsert), so [`Store::commit`] reconnects and applies the whole batch
//! again, which leaves the store as one application would have. It does
//! so for up to [`PATIENCE`]; a batch still not through fails with
//! [`io::ErrorKind::NotConnected`] and its messages are refused.
//!
//! # Schema (version 1, in `udpchat_schema`)
//!
//! ```sql
//! CREATE TABLE clients (
//!     seq           bigint GENERATED ALWAYS AS IDENTITY,  -- registration order
//!     name          text PRIMARY KEY,
//!     addr          text NOT NULL,     -- last known address, "ip:port"
//!     registered_at bigint,            -- Unix seconds
//!     key           bytea,             -- the X25519 key that owns the name (32 bytes)
//!     last_seen     bigint             -- when it was last online, Unix seconds
//! );
//! CREATE TABLE mail (                  -- as SQLite's `mail` table
//!     id bigint PRIMARY KEY, recipient text NOT NULL, sender text NOT NULL,
//!     channel boolean NOT NULL, stored_at bigint NOT NULL, msg_id bigint NOT NULL,
//!     kind smallint NOT NULL, body bytea NOT NULL, sender_key bytea,
//!     UNIQUE (recipient, sender, msg_id)
//! );
//! CREATE TABLE channel (                -- a channel message stored once
//!     id bigint PRIMARY KEY, sender text NOT NULL, stored_at bigint NOT NULL,
//!     msg_id bigint NOT NULL, body bytea NOT NULL,
//!     pending text[] NOT NULL,          -- the recipients it was stored for
//!     owed integer NOT NULL             -- how many of them have not acked
//! );
//! CREATE TABLE channel_acked (
//!     mail bigint NOT NULL REFERENCES channel (id) ON DELETE CASCADE,
//!     recipient text NOT NULL,
//!     PRIMARY KEY (mail, recipient)
//! );
//! ```
//!
//! Version 2 adds the tables of several servers ([`super::cluster`]);
//! version 3 indexes `channel` by `pending` (a mailbox fetched) and makes
//! its (sender, msg_id) unique (a channel message stored once however
//! many servers it is sent through).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io;
use std::str::FromStr;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, NoTls, Statement, Transaction};

use super::cluster;
use super::rows;
use super::sqlite::StoreError;
use crate::store::{Body, Loaded, News, Outcome, Store, StoreOp, StoredMail};
use crate::wire::{MAX_SEALED, MailId, Name};

/// The schema version this build writes and understands (2 added the
/// tables of several servers, see [`super::cluster`], 3 an index to fetch
/// one mailbox; an older database is brought up to it at start).
pub const SCHEMA_VERSION: i32 = 3;

/// How long a commit keeps trying to reach a primary (a failover: the old
/// one dies, a standby is promoted) before its batch fails. The poll loop
/// waits with it, so not long: clients give up on a request after 2.5 s.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How long one connection attempt to one host may take, unless the
/// connection string says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Most doorbell rings taken off the connection per look (one of another
/// server is enough to read the feed; this server's own are passed over):
/// more than come in between two looks.
const RINGS_AT_ONCE: usize = 4096;

/// How long a look for a doorbell ring waits on the connection.
const RING_WAIT: Duration = Duration::from_millis(1);

/// A lock every udpchat server takes while it creates the schema, so that
/// several starting at once do not race (`pg_advisory_xact_lock`).
const SCHEMA_LOCK: i64 = 0x7564_7063;

const SCHEMA: &str = "
    CREATE TABLE udpchat_schema (version integer NOT NULL);
    CREATE TABLE clients (
        seq           bigint GENERATED ALWAYS AS IDENTITY,
        name          text PRIMARY KEY,
        addr          text NOT NULL,
        registered_at bigint,
        key           bytea,
        last_seen     bigint
    );
    CREATE INDEX clients_seq ON clients (seq);
    CREATE TABLE mail (
        id         bigint PRIMARY KEY,
        recipient  text NOT NULL,
        sender     text NOT NULL,
        channel    boolean NOT NULL,
        stored_at  bigint NOT NULL,
        msg_id     bigint NOT NULL,
        kind       smallint NOT NULL,
        body       bytea NOT NULL,
        sender_key bytea,
        UNIQUE (recipient, sender, msg_id)
    );
    CREATE TABLE channel (
        id        bigint PRIMARY KEY,
        sender    text NOT NULL,
        stored_at bigint NOT NULL,
        msg_id    bigint NOT NULL,
        body      bytea NOT NULL,
        pending   text[] NOT NULL,
        owed      integer NOT NULL
    );
    CREATE TABLE channel_acked (
        mail      bigint NOT NULL REFERENCES channel (id) ON DELETE CASCADE,
        recipient text NOT NULL,
        PRIMARY KEY (mail, recipient)
    );";

// `ON CONFLICT DO NOTHING`: a message already stored under its id or its
// (recipient, sender, msg_id) is not stored again (a batch replayed after
// a COMMIT whose outcome was unknown).
// Many rows in one statement (one round trip for a batch's messages), in
// their order: of two with one (recipient, sender, msg_id), the first is
// kept, as one INSERT each would.
const PUT: &str = "INSERT INTO mail
                       (id, recipient, sender, channel, stored_at, msg_id, kind, body, sender_key)
                   SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::boolean[],
                                        $5::bigint[], $6::bigint[], $7::smallint[], $8::bytea[],
                                        $9::bytea[])
                   ON CONFLICT DO NOTHING";
const DELETE: &str = "DELETE FROM mail WHERE id = $1 AND recipient = $2";
// The same message stored first under another id (by another server of a
// cluster, before a retry through this one): its row gains the recipients
// it lacks (registered in between), not acked ones; `inserted` says
// whether the row is this batch's. Nothing returned: a replay, or nobody
// new.
const PUT_CHANNEL: &str = "INSERT INTO channel (id, sender, stored_at, msg_id, body, pending, owed)
                           VALUES ($1, $2, $3, $4, $5, $6, $7)
                           ON CONFLICT (sender, msg_id) DO UPDATE
                           SET pending = channel.pending || ARRAY(
                                   SELECT r FROM unnest(EXCLUDED.pending) AS r
                                   WHERE r <> ALL (channel.pending)),
                               owed = channel.owed + cardinality(ARRAY(
                                   SELECT r FROM unnest(EXCLUDED.pending) AS r
                                   WHERE r <> ALL (channel.pending)))
                           WHERE channel.id <> EXCLUDED.id
                             AND NOT EXCLUDED.pending <@ channel.pending
                           RETURNING xmax = 0 AS inserted";
// Only for a message that exists, and counted once however often it is
// committed.
const ACK: &str = "INSERT INTO channel_acked (mail, recipient)
                   SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM channel WHERE id = $1)
                   ON CONFLICT DO NOTHING";
const COUNT_DOWN: &str = "UPDATE channel SET owed = owed - $2 WHERE id = $1 RETURNING owed";
const OWED: &str = "SELECT pending,
                           array(SELECT recipient FROM channel_acked WHERE mail = $1)
                    FROM channel WHERE id = $1";
const SET_OWED: &str = "UPDATE channel SET owed = $2 WHERE id = $1";
const DELETE_CHANNEL: &str = "DELETE FROM channel WHERE id = $1";
const REWRITE: &str = "UPDATE mail SET kind = $2, body = $3, sender_key = $4 WHERE id = $1";
// A name's key is set once (from NULL); registered_at keeps the first
// registration, by the database's clock.
const CLIENT: &str = "INSERT INTO clients (name, addr, registered_at, key, last_seen)
                          VALUES ($1, $2, extract(epoch FROM now())::bigint, $3, $4)
                      ON CONFLICT (name) DO UPDATE SET addr = excluded.addr,
                          key = coalesce(clients.key, excluded.key),
                          last_seen = coalesce(excluded.last_seen, clients.last_seen)";
const FORGET: &str = "DELETE FROM clients WHERE name = $1";
const LOAD_CLIENTS: &str = "SELECT seq, name, addr, key, last_seen FROM clients ORDER BY seq";
const LOAD_MAIL: &str = "SELECT id, recipient, sender, channel, stored_at, msg_id, kind, body,
                                sender_key
                         FROM mail ORDER BY id";
const FETCH_MAIL: &str = "SELECT id, recipient, sender, channel, stored_at, msg_id, kind, body,
                                 sender_key
                          FROM mail WHERE id = $1 AND recipient = $2";
// Only for a recipient still owed it, like a `mail` row of theirs.
const FETCH_CHANNEL: &str = "SELECT body, pending,
                                    array(SELECT recipient FROM channel_acked WHERE mail = $1)
                             FROM channel WHERE id = $1";
const HIGHEST_MAIL: &str =
    "SELECT greatest((SELECT max(id) FROM mail), (SELECT max(id) FROM channel))";
const LOAD_CHANNEL: &str = "SELECT id, sender, stored_at, msg_id, body, pending,
                                   array(SELECT recipient FROM channel_acked
                                         WHERE mail = channel.id),
                                   owed
                            FROM channel ORDER BY id";

/// The statements a commit or a fetch uses, prepared once per connection.
pub(super) struct Prepared {
    fetch_mail: Statement,
    fetch_channel: Statement,
    put: Statement,
    delete: Statement,
    put_channel: Statement,
    ack: Statement,
    count_down: Statement,
    owed: Statement,
    set_owed: Statement,
    delete_channel: Statement,
    rewrite: Statement,
    client: Statement,
    forget: Statement,
    pub(super) feed_append: Statement,
    pub(super) feed_read: Statement,
    presence: Statement,
    pub(super) resolve_mail: Statement,
    pub(super) resolve_channel: Statement,
    pub(super) resolve_clients: Statement,
    pub(super) mailbox_mail: Statement,
    pub(super) mailbox_channel: Statement,
}

impl Prepared {
    /// Sets up a new connection: its statements, and it listens to the
    /// doorbell of the other servers' commits (see `cluster`).
    fn new(client: &mut Client) -> Result<Prepared, postgres::Error> {
        client.batch_execute(&format!("LISTEN {}", cluster::FEED_CHANNEL))?;
        Ok(Prepared {
            fetch_mail: client.prepare(FETCH_MAIL)?,
            fetch_channel: client.prepare(FETCH_CHANNEL)?,
            put: client.prepare(PUT)?,
            delete: client.prepare(DELETE)?,
            put_channel: client.prepare(PUT_CHANNEL)?,
            ack: client.prepare(ACK)?,
            count_down: client.prepare(COUNT_DOWN)?,
            owed: client.prepare(OWED)?,
            set_owed: client.prepare(SET_OWED)?,
            delete_channel: client.prepare(DELETE_CHANNEL)?,
            rewrite: client.prepare(REWRITE)?,
            client: client.prepare(CLIENT)?,
            forget: client.prepare(FORGET)?,
            feed_append: client.prepare(cluster::FEED_APPEND)?,
            feed_read: client.prepare(cluster::FEED_READ)?,
            presence: client.prepare(cluster::PRESENCE)?,
            resolve_mail: client.prepare(cluster::RESOLVE_MAIL)?,
            resolve_channel: client.prepare(cluster::RESOLVE_CHANNEL)?,
            resolve_clients: client.prepare(cluster::RESOLVE_CLIENTS)?,
            mailbox_mail: client.prepare(cluster::MAILBOX_MAIL)?,
            mailbox_channel: client.prepare(cluster::MAILBOX_CHANNEL)?,
        })
    }
}

/// The mailbox and registry in a PostgreSQL database.
pub struct PgStore {
    config: Config,
    /// The connection string without its password, for messages.
    shown: String,
    /// The connection, while it works.
    conn: Option<(Client, Prepared)>,
    /// For the log: connections lost and found (see [`Store::notes`]).
    notes: Vec<String>,
    /// One of several servers on the database ([`PgStore::join`]).
    pub(super) member: Option<cluster::Member>,
    /// Connections made so far: what was read on an earlier one may be
    /// gone (see `cluster`'s feed reader).
    pub(super) connections: u64,
    /// [`Store::outcomes`] of the last commit.
    outcomes: Vec<Outcome>,
    /// The feed is to be read whatever the doorbell says: a connection
    /// new since the last read (it missed what rang before it listened),
    /// or a read that stopped at a full page.
    pub(super) rung: bool,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("at", &self.shown)
            .finish_non_exhaustive()
    }
}

/// `config` as a user may see it: hosts, database and user, never the
/// password.
fn describe(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    format!(
        "postgres://{}{}/{}",
        config
            .get_user()
            .map(|u| format!("{u}@"))
            .unwrap_or_default(),
        hosts.join(","),
        config.get_dbname().unwrap_or_default()
    )
}

/// Whether `e` says the connection (or the server behind it) is gone or
/// not the primary any more, so that the batch may be tried again on a new
/// connection, rather than that the batch itself is wrong.
fn is_transient(e: &postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        // Not the server's verdict: the socket closed, a read timed out.
        return true;
    };
    let code = db.code();
    code.code().starts_with("08")
        || code.code().starts_with("57P")
        || [
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .contains(code)
}

impl PgStore {
    /// Connects to `url` (a `postgres://` URL or `key=value` string),
    /// creating the schema in an empty database and refusing one this
    /// build does not understand.
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        let mut config = Config::from_str(url).map_err(|e| {
            // Its text never quotes the string back (it may hold a password).
            StoreError(format!("not a PostgreSQL connection string: {e}"))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let shown = describe(&config);
        let failed = |e: postgres::Error| StoreError(format!("{shown}: {}", reason(&e)));
        let mut client = config.connect(NoTls).map_err(failed)?;
        create_schema(&mut client).map_err(failed)??;
        let prepared = Prepared::new(&mut client).map_err(failed)?;
        Ok(PgStore {
            config,
            shown: shown.clone(),
            conn: Some((client, prepared)),
            notes: Vec::new(),
            member: None,
            connections: 1,
            outcomes: Vec::new(),
            rung: true,
        })
    }

    /// Releases `name` (an operator's decision, e.g. for a user who lost
    /// their key file), as [`SqliteStore::release`](super::sqlite::SqliteStore::release)
    /// does: the key that owns it is forgotten and its mailbox deleted.
    /// Returns how many messages were deleted. Run it with every server
    /// on the database stopped: a running server keeps the binding it
    /// loaded.
    pub fn release(&mut self, name: &Name) -> Result<usize, StoreError> {
        let shown = self.shown.clone();
        let who = name.as_str();
        let result = self.with_retry(|client, p| {
            let mut tx = client.transaction()?;
            let known = tx.execute("UPDATE clients SET key = NULL WHERE name = $1", &[&who])?;
            if known == 0 {
                return Ok(None);
            }
            let mut deleted = tx.execute("DELETE FROM mail WHERE recipient = $1", &[&who])?;
            let owed: Vec<i64> = tx
                .query(
                    "SELECT id FROM channel WHERE $1 = ANY (pending)
                     AND NOT EXISTS (SELECT 1 FROM channel_acked
                                     WHERE mail = channel.id AND recipient = $1)",
                    &[&who],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let gone = HashSet::from([who]);
            for id in &owed {
                take_pending(&mut tx, p, *id, &gone)?;
                deleted += 1;
            }
            tx.commit()?;
            Ok(Some(deleted))
        });
        match result {
            Ok(Some(deleted)) => Ok(usize::try_from(deleted).unwrap_or(usize::MAX)),
            Ok(None) => Err(StoreError(format!(
                "{shown}: no client named {name} is registered"
            ))),
            Err(e) => Err(StoreError(e.to_string())),
        }
    }

    /// What the store is, for the log (no password).
    pub fn describe(&self) -> &str {
        &self.shown
    }

    /// The connection, made again if it was lost.
    fn connect(&mut self) -> Result<&mut (Client, Prepared), postgres::Error> {
        if self.conn.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let mut client = self.config.connect(NoTls)?;
            let prepared = Prepared::new(&mut client)?;
            self.conn = Some((client, prepared));
            self.connections += 1;
            self.rung = true;
            self.notes.push(format!(
                "connected to a read-write server of {}",
                self.shown
            ));
        }
        Ok(self.conn.as_mut().expect("connected just above"))
    }

    /// Runs `work` on a connection, again on a new one while it fails for
    /// a lost connection or a primary that is not one any more, for up to
    /// [`PATIENCE`]. `work` must be safe to repeat (see the module's text).
    pub(super) fn with_retry<T>(
        &mut self,
        mut work: impl FnMut(&mut Client, &Prepared) -> Result<T, postgres::Error>,
    ) -> io::Result<T> {
        let deadline = Instant::now() + PATIENCE;
        let mut pause = Duration::from_millis(20);
        loop {
            let result = match self.connect() {
                Ok((client, prepared)) => work(client, prepared),
                Err(e) => Err(e),
            };
            match result {
                Ok(t) => return Ok(t),
                Err(e) if is_transient(&e) && Instant::now() < deadline => {
                    if self.conn.take().is_some() {
                        self.notes.push(format!(
                            "lost the database connection ({}): looking for a primary",
                            reason(&e)
                        ));
                    }
                    // A promotion takes a moment; do not hammer the hosts.
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    if is_transient(&e) && self.conn.take().is_some() {
                        self.notes
                            .push(format!("lost the database connection ({})", reason(&e)));
                    }
                    return Err(self.io_error(&e));
                }
            }
        }
    }

    fn io_error(&self, e: &postgres::Error) -> io::Error {
        let kind = match e.code() {
            _ if is_transient(e) => io::ErrorKind::NotConnected,
            Some(&SqlState::DISK_FULL) => io::ErrorKind::StorageFull,
            Some(&SqlState::INSUFFICIENT_PRIVILEGE) => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("{}: {}", self.shown, reason(e)))
    }
}

/// An error's text, with the server's detail when it gave one.
fn reason(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            text
        }
    }
}

/// Creates the schema in a database without one, under a lock all servers
/// take; the outer error is the connection's, the inner one a verdict on
/// the database.
fn create_schema(client: &mut Client) -> Result<Result<(), StoreError>, postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    let ours = tx
        .query_one("SELECT to_regclass('udpchat_schema') IS NOT NULL", &[])?
        .get::<_, bool>(0);
    if !ours {
        let tables: i64 = tx
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()",
                &[],
            )?
            .get(0);
        if tables > 0 {
            return Ok(Err(StoreError(
                "the database holds another program's tables, not udpchat's".to_string(),
            )));
        }
        tx.batch_execute(SCHEMA)?;
        tx.batch_execute(super::cluster::SCHEMA)?;
        tx.batch_execute(super::cluster::SCHEMA_3)?;
        tx.execute(
            "INSERT INTO udpchat_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )?;
        tx.commit()?;
        return Ok(Ok(()));
    }
    let mut version: Option<i32> = tx
        .query_opt("SELECT max(version) FROM udpchat_schema", &[])?
        .and_then(|r| r.get(0));
    if version == Some(1) {
        // Version 2 only adds tables: an older database takes them as is.
        tx.batch_execute(super::cluster::SCHEMA)?;
        version = Some(2);
    }
    if version == Some(2) {
        // Version 3 adds indexes. A channel message that one build stored
        // twice (sent again through a second server) is kept once: the
        // first copy, which every recipient it was stored for still owes
        // or has acked.
        tx.batch_execute(
            "DELETE FROM channel c USING channel d
             WHERE c.sender = d.sender AND c.msg_id = d.msg_id AND c.id > d.id",
        )?;
        tx.batch_execute(super::cluster::SCHEMA_3)?;
        tx.execute("UPDATE udpchat_schema SET version = $1", &[&SCHEMA_VERSION])?;
        version = Some(SCHEMA_VERSION);
    }
    tx.commit()?;
    Ok(match version {
        Some(SCHEMA_VERSION) => Ok(()),
        Some(v) if v > SCHEMA_VERSION => Err(StoreError(format!(
            "written by a newer udpchat (schema {v}, this build knows {SCHEMA_VERSION})"
        ))),
        v => Err(StoreError(format!(
            "not a usable udpchat database (schema version {v:?})"
        ))),
    })
}

/// A stored mail id as the database's bigint (ids beyond it are never
/// given out: the server counts up from 1).
fn db_id(mail: MailId) -> io::Result<i64> {
    i64::try_from(mail.0).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("mail id {} does not fit PostgreSQL's bigint", mail.0),
        )
    })
}

/// Applies one operation; a channel copy's ack is gathered into `acked`
/// (message id → recipients), counted at the end of the batch. Returns
/// whether it wrote all it was to (a message already there is not).
fn apply<'a>(
    tx: &mut Transaction<'_>,
    p: &Prepared,
    op: &'a StoreOp,
    acked: &mut BTreeMap<i64, HashSet<&'a str>>,
) -> Result<bool, postgres::Error> {
    match op {
        // Gathered by the caller and written by `put_all`.
        StoreOp::Put(_) => {}
        StoreOp::Rewrite { mail, body } => {
            if let (Ok(id), Ok((kind, body, key))) = (db_id(*mail), rows::body_columns(body)) {
                tx.execute(&p.rewrite, &[&id, &(kind as i16), &body, &key])?;
            }
        }
        StoreOp::Channel(c) => {
            let pending: Vec<&str> = c.to.iter().map(Name::as_str).collect();
            let owed = i32::try_from(pending.len()).unwrap_or(i32::MAX);
            // Not written: a replay (its id is there), or the same
            // message stored first under another id (`kept_instead`),
            // maybe for more recipients now.
            let row = tx.query_opt(
                &p.put_channel,
                &[
                    &c.mail.0.cast_signed(),
                    &c.from.as_str(),
                    &c.stored_at,
                    &c.id.0.cast_signed(),
                    &&c.body[..],
                    &pending,
                    &owed,
                ],
            )?;
            return Ok(row.is_some_and(|r| r.get::<_, bool>(0)));
        }
        StoreOp::Delete { to, mail } => {
            // An id beyond bigint was never stored: nothing to delete.
            if let Ok(id) = db_id(*mail) {
                let deleted = tx.execute(&p.delete, &[&id, &to.as_str()])?;
                // Not a direct message: a copy of a channel message.
                if deleted == 0 {
                    acked.entry(id).or_default().insert(to.as_str());
                }
            }
        }
        StoreOp::Client(c) => {
            let key = c.key.map(|k| k.0.to_vec());
            tx.execute(
                &p.client,
                &[&c.name.as_str(), &c.addr.to_string(), &key, &c.seen_at],
            )?;
        }
        StoreOp::Forget(name) => {
            tx.execute(&p.forget, &[&name.as_str()])?;
        }
        // Written with the batch's feed row (see `cluster`), when there is one.
        StoreOp::Presence { .. } => {}
    }
    Ok(true)
}

/// Writes `puts` with one statement.
/// Returns whether every message was inserted (one already there, by id
/// or by (recipient, sender, message id), is not).
fn put_all(
    tx: &mut Transaction<'_>,
    p: &Prepared,
    puts: &[&StoredMail],
) -> Result<bool, postgres::Error> {
    if puts.is_empty() {
        return Ok(true);
    }
    let mut cols = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for m in puts {
        // Checked before the transaction began (`check_batch`).
        let Ok((kind, body, key)) = rows::body_columns(&m.body) else {
            continue;
        };
        cols.0.push(m.mail.0.cast_signed());
        cols.1.push(m.to.as_str());
        cols.2.push(m.from.as_str());
        cols.3.push(m.channel);
        cols.4.push(m.stored_at);
        cols.5.push(m.id.0.cast_signed());
        cols.6.push(kind as i16);
        cols.7.push(body);
        cols.8.push(key);
    }
    let inserted = tx.execute(
        &p.put,
        &[
            &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6, &cols.7, &cols.8,
        ],
    )?;
    Ok(inserted == cols.0.len() as u64)
}

/// Counts the acks of `gone` for channel message `id`, and deletes the
/// message once nobody is owed it.
fn take_pending(
    tx: &mut Transaction<'_>,
    p: &Prepared,
    id: i64,
    gone: &HashSet<&str>,
) -> Result<(), postgres::Error> {
    let mut acked: i32 = 0;
    for name in gone {
        acked += i32::try_from(tx.execute(&p.ack, &[&id, name])?).unwrap_or(0);
    }
    if acked == 0 {
        return Ok(());
    }
    let left: Option<i32> = tx
        .query_opt(&p.count_down, &[&id, &acked])?
        .map(|r| r.get(0));
    if left.is_none_or(|l| l > 0) {
        return Ok(());
    }
    // Seemingly done: counted again from the lists, so an ack for a name
    // the message was never stored for cannot delete it early.
    let Some(row) = tx.query_opt(&p.owed, &[&id])? else {
        return Ok(());
    };
    let pending: Vec<String> = row.get(0);
    let acks: Vec<String> = row.get(1);
    let left = rows::still_owed(
        pending.iter().map(String::as_str),
        acks.iter().map(String::as_str),
    )
    .count();
    if left == 0 {
        tx.execute(&p.delete_channel, &[&id])?;
    } else {
        let left = i32::try_from(left).unwrap_or(i32::MAX);
        tx.execute(&p.set_owed, &[&id, &left])?;
    }
    Ok(())
}

impl Store for PgStore {
    /// Clients in registration order, mail in id order; the first bad row
    /// is an `InvalidData` error naming it.
    fn load(&mut self) -> io::Result<Loaded> {
        // One of several servers fetches a mailbox when it needs it: at
        // start only the registry, and where mail ids have got to.
        let every_mailbox = self.member.is_none();
        let (clients, mail, channels, highest) = self.with_retry(|client, _| {
            let mut tx = client.transaction()?;
            // One snapshot for the three reads.
            tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")?;
            let clients = tx.query(LOAD_CLIENTS, &[])?;
            if !every_mailbox {
                let highest: Option<i64> = tx.query_one(HIGHEST_MAIL, &[])?.get(0);
                tx.commit()?;
                return Ok((clients, Vec::new(), Vec::new(), highest));
            }
            let mail = tx.query(LOAD_MAIL, &[])?;
            let channels = tx.query(LOAD_CHANNEL, &[])?;
            tx.commit()?;
            Ok((clients, mail, channels, None))
        })?;
        let shown = &self.shown;
        let invalid =
            |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("{shown}: {what}"));
        let mut loaded = Loaded::default();
        for row in &clients {
            let seq: i64 = row.get(0);
            let key: Option<Vec<u8>> = row.get(3);
            let client = rows::client(row.get(1), row.get(2), key.as_deref(), row.get(4))
                .map_err(|what| invalid(format!("clients row {seq}: {what}")))?;
            loaded.clients.push(client);
        }
        for row in &mail {
            let id: i64 = row.get(0);
            let m = mail_row(row).map_err(|what| invalid(format!("mail row {id}: {what}")))?;
            loaded.mail.push(m);
        }
        let direct: HashSet<MailId> = loaded.mail.iter().map(|m| m.mail).collect();
        for row in &channels {
            let id: i64 = row.get(0);
            let owed: i32 = row.get(7);
            let channel = rows::channel(rows::ChannelColumns {
                id,
                from: row.get(1),
                stored_at: row.get(2),
                msg_id: row.get(3),
                body: row.get(4),
                pending: row.get(5),
                acked: row.get(6),
                left: i64::from(owed),
            })
            .and_then(|c| match direct.contains(&c.mail) {
                true => Err("id is also a mail row's".to_string()),
                false => Ok(c),
            })
            .map_err(|what| invalid(format!("channel row {id}: {what}")))?;
            loaded.mail.extend(channel.copies());
        }
        loaded.mail.sort_by_key(|m| m.mail);
        loaded.highest_mail = highest.and_then(|h| u64::try_from(h).ok()).map(MailId);
        Ok(loaded)
    }

    /// A row that no longer decodes is `None`, like a missing one.
    fn fetch(&mut self, to: &Name, mail: MailId) -> io::Result<Option<Body>> {
        let id = db_id(mail)?;
        let to_str = to.as_str();
        let (direct, channel) = self.with_retry(|client, p| {
            let direct = client.query_opt(&p.fetch_mail, &[&id, &to_str])?;
            if direct.is_some() {
                return Ok((direct, None));
            }
            let channel = client.query_opt(&p.fetch_channel, &[&id])?;
            Ok((None, channel))
        })?;
        if let Some(row) = direct {
            return Ok(mail_row(&row).ok().filter(|m| m.to == *to).map(|m| m.body));
        }
        let Some(row) = channel else {
            return Ok(None);
        };
        let pending: Vec<String> = row.get(1);
        let acked: Vec<String> = row.get(2);
        let owed = rows::still_owed(
            pending.iter().map(String::as_str),
            acked.iter().map(String::as_str),
        )
        .any(|n| n == to_str);
        let body: Vec<u8> = row.get(0);
        Ok((owed && (1..=MAX_SEALED).contains(&body.len())).then(|| Body::Channel(body.into())))
    }

    fn notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// All of `ops` in one transaction; a batch whose COMMIT was lost with
    /// its connection is applied again on the next one (see the module's
    /// text).
    fn commit(&mut self, ops: &[StoreOp]) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        crate::store::check_batch(ops)?;
        self.outcomes.clear();
        // What the other servers are told, in the same transaction.
        let shared = self.member.as_ref().map(|m| {
            let presence = cluster::presence_rows(ops, m.me);
            (
                m.origin.clone(),
                m.next_seq,
                cluster::feed_entries(ops),
                presence,
            )
        });
        let result = self.with_retry(|client, p| {
            let mut tx = client.transaction()?;
            let mut acked = BTreeMap::new();
            // Runs of messages go in one statement each; everything keeps
            // its order.
            let mut puts: Vec<&StoredMail> = Vec::new();
            let mut all_new = true;
            for op in ops {
                if let StoreOp::Put(m) = op {
                    puts.push(m);
                    continue;
                }
                all_new &= put_all(&mut tx, p, &puts)?;
                puts.clear();
                all_new &= apply(&mut tx, p, op, &mut acked)?;
            }
            all_new &= put_all(&mut tx, p, &puts)?;
            for (id, gone) in &acked {
                take_pending(&mut tx, p, *id, gone)?;
            }
            if let Some((origin, seq, entries, presence)) = &shared {
                if let Some((names, servers, addrs, online, epochs)) = presence {
                    tx.execute(&p.presence, &[names, servers, addrs, online, epochs])?;
                }
                if let Some(entries) = entries {
                    tx.execute(&p.feed_append, &[origin, seq, entries])?;
                }
            }
            tx.commit()?;
            Ok(all_new)
        });
        // The number is used, whatever became of the commit: one whose
        // outcome stayed unknown may have written its row, and the next
        // batch's must not be taken for its replay.
        if let (Some(m), Some((_, _, Some(_), _))) = (&mut self.member, &shared) {
            m.next_seq += 1;
        }
        // Of several servers, another may have stored the same message
        // first (a retry through this one): the store kept that copy.
        if let (Ok(false), Some(_)) = (&result, &self.member) {
            let kept = cluster::kept_instead(self, ops)?;
            // Their rows may have gained recipients: a row of its own in
            // the feed names them by the ids they are kept under.
            let mut ids: Vec<MailId> = (kept.iter())
                .filter(|(_, m)| m.channel)
                .map(|(_, m)| m.mail)
                .collect();
            (self.outcomes).extend(
                kept.into_iter()
                    .map(|(ours, row)| Outcome::Kept { ours, row }),
            );
            ids.sort_unstable();
            ids.dedup();
            if let (Some(entries), Some(m)) = (cluster::channel_entries(&ids), &self.member) {
                let (origin, seq) = (m.origin.clone(), m.next_seq);
                let appended = self.with_retry(|client, p| {
                    client.execute(&p.feed_append, &[&origin, &seq, &entries])
                });
                if let Some(m) = &mut self.member {
                    m.next_seq += 1;
                }
                // The batch is committed whatever becomes of this row:
                // without it the others see the new copies at their
                // clients' next login.
                if let Err(e) = appended {
                    self.notes
                        .push(format!("a retried channel message's feed row: {e}"));
                }
            }
        }
        result.map(|_| ())
    }

    fn outcomes(&mut self) -> Vec<Outcome> {
        std::mem::take(&mut self.outcomes)
    }

    fn news(&mut self) -> Option<io::Result<News>> {
        self.member.is_some().then(|| self.news_now())
    }

    fn news_rung(&mut self, idle: bool) -> Option<bool> {
        let own = self.member.as_ref()?.origin.clone();
        let mut rung = std::mem::take(&mut self.rung);
        let Some((client, _)) = &mut self.conn else {
            // Connected again by the read, which then reads.
            return Some(true);
        };
        let mut notifications = client.notifications();
        // Every ring buffered goes (this server's own too, or they would
        // pile up), in one bounded pass.
        let drain = |notifications: &mut postgres::Notifications<'_>, rung: &mut bool| {
            let mut rings = notifications.iter();
            for _ in 0..RINGS_AT_ONCE {
                match rings.next() {
                    Ok(Some(ring)) => *rung |= ring.payload() != own,
                    Ok(None) => return true,
                    // A lost connection: the read finds out, connects again.
                    Err(_) => return false,
                }
            }
            true
        };
        if !drain(&mut notifications, &mut rung) {
            return Some(true);
        }
        if idle && !rung {
            // Nothing else to do: a moment's wait on the connection (a
            // look without one does not read the socket, as the client's
            // runtime never turns, so it sees only rings that came in
            // with other replies).
            match notifications.timeout_iter(RING_WAIT).next() {
                Ok(Some(ring)) => rung |= ring.payload() != own,
                Ok(None) => {}
                Err(_) => return Some(true),
            }
            if !drain(&mut notifications, &mut rung) {
                return Some(true);
            }
        }
        drop(notifications);
        Some(rung || client.is_closed())
    }

    fn mailboxes(&mut self, names: &[Name]) -> io::Result<Vec<StoredMail>> {
        self.mailboxes_now(names)
    }
}

pub(super) fn mail_row(row: &postgres::Row) -> Result<StoredMail, String> {
    let kind: i16 = row.get(6);
    rows::mail(rows::MailColumns {
        id: row.get(0),
        to: row.get(1),
        from: row.get(2),
        channel: i64::from(row.get::<_, bool>(3)),
        stored_at: row.get(4),
        msg_id: row.get(5),
        kind: i64::from(kind),
        body: row.get(7),
        key: row.get(8),
    })
}
