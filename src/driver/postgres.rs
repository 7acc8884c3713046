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
//! many servers it is sent through). Version 4 counts each mailbox, so
//! that servers sharing the database enforce one limit on it
//! ([`PgStore::limit_mailboxes`]):
//!
//! ```sql
//! CREATE TABLE mailbox (               -- what each recipient is owed
//!     name     text PRIMARY KEY,
//!     messages bigint NOT NULL,        -- its `mail` rows, and the `channel` rows
//!                                      -- pending for it that it has not acked
//!     bytes    bigint NOT NULL         -- theirs, each length(body) + MAIL_OVERHEAD
//! );
//! ```
//!
//! Every change to `mail`, `channel.pending` or `channel_acked` changes the
//! counters in the same transaction, by what it really changed (rows
//! inserted, deleted, acked: a replayed batch changes nothing). A commit
//! applies its batch's sum to the counters in one statement, names in one
//! order (concurrent commits lock counter rows in that order: no deadlock
//! between them), and the row lock it then holds makes it see every
//! earlier commit's messages: with limits set, it goes through its own
//! messages for each mailbox in batch order, as [`MemoryStore`] does, and
//! takes back, in one more statement, each one the mailbox had no room
//! for ([`Outcome::Full`]). Acks are only recorded for a recipient the
//! message is pending for.
//!
//! [`MemoryStore`]: crate::store::MemoryStore

use std::collections::{BTreeMap, HashMap, HashSet};
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
use crate::store::{
    Body, Loaded, MAIL_OVERHEAD, MailboxLimits, News, Outcome, Store, StoreOp, StoredMail,
};
use crate::wire::{MAX_SEALED, MailId, Name};

/// The schema version this build writes and understands (2 added the
/// tables of several servers, see [`super::cluster`], 3 an index to fetch
/// one mailbox, 4 the mailbox counters; an older database is brought up
/// to it at start).
pub const SCHEMA_VERSION: i32 = 4;

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

/// What schema version 4 adds: each mailbox's counters.
const SCHEMA_4: &str = "CREATE TABLE mailbox (
        name     text PRIMARY KEY,
        messages bigint NOT NULL,
        bytes    bigint NOT NULL
    );";

/// A schema-3 database's counters, from its rows (after its acks of
/// recipients a message was never pending for are dropped: a recipient
/// it gains later is owed it). `$1`: [`MAIL_OVERHEAD`].
const COUNT_ALL: &str = "INSERT INTO mailbox (name, messages, bytes)
    SELECT name, count(*), sum(size) FROM (
        SELECT recipient AS name, length(body) + $1 AS size FROM mail
        UNION ALL
        SELECT p.name, length(c.body) + $1 FROM channel c
        CROSS JOIN LATERAL (SELECT DISTINCT r AS name FROM unnest(c.pending) AS r
                            WHERE r <> '') AS p
        WHERE NOT EXISTS (SELECT 1 FROM channel_acked a
                          WHERE a.mail = c.id AND a.recipient = p.name)
    ) AS owed GROUP BY name";
const DROP_STRAY_ACKS: &str = "DELETE FROM channel_acked a USING channel c
                               WHERE a.mail = c.id AND a.recipient <> ALL (c.pending)";

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
                   ON CONFLICT DO NOTHING
                   RETURNING id";
const DELETE: &str = "DELETE FROM mail WHERE id = $1 AND recipient = $2 RETURNING length(body)";
// A new channel message (nothing returned: its id or its (sender, msg_id)
// is there already, see `GAIN_CHANNEL`).
const PUT_CHANNEL: &str = "INSERT INTO channel (id, sender, stored_at, msg_id, body, pending, owed)
                           VALUES ($1, $2, $3, $4, $5, $6, $7)
                           ON CONFLICT DO NOTHING
                           RETURNING id";
// The row of a channel message already stored (by a replay of this batch,
// or first by another server of a cluster, before a retry through this
// one) gains the recipients it lacks: registered in between, or refused
// for a full mailbox before; not acked ones. Locked first, so the
// recipients it gains are counted from the row as this transaction
// changes it. Nothing returned: the row went in between.
const GAIN_CHANNEL: &str = "UPDATE channel c SET pending = c.pending || g.added,
                                owed = c.owed + cardinality(g.added)
                            FROM (SELECT id, ARRAY(SELECT r FROM unnest($3::text[]) AS r
                                                   WHERE r <> ALL (channel.pending)) AS added
                                  FROM channel WHERE sender = $1 AND msg_id = $2
                                  FOR UPDATE) AS g
                            WHERE c.id = g.id
                            RETURNING c.id, g.added, length(c.body)";
// Only for a message that exists and is pending for the recipient, and
// counted once however often it is committed: the body's length when it
// was.
const ACK: &str = "WITH c AS (SELECT id, length(body) AS len FROM channel
                             WHERE id = $1 AND $2 = ANY (pending)),
                        acked AS (INSERT INTO channel_acked (mail, recipient)
                                  SELECT id, $2 FROM c
                                  ON CONFLICT DO NOTHING
                                  RETURNING mail)
                   SELECT c.len FROM c JOIN acked ON acked.mail = c.id";
const COUNT_DOWN: &str = "UPDATE channel SET owed = owed - $2 WHERE id = $1 RETURNING owed";
const OWED: &str = "SELECT pending,
                           array(SELECT recipient FROM channel_acked WHERE mail = $1)
                    FROM channel WHERE id = $1";
const SET_OWED: &str = "UPDATE channel SET owed = $2 WHERE id = $1";
const DELETE_CHANNEL: &str = "DELETE FROM channel WHERE id = $1";
// The recipient, and how many bytes longer the body is now.
const REWRITE: &str = "UPDATE mail m SET kind = $2, body = $3, sender_key = $4
                       FROM (SELECT id, length(body) AS len FROM mail WHERE id = $1
                             FOR UPDATE) AS o
                       WHERE m.id = o.id
                       RETURNING m.recipient, length(m.body) - o.len";
// The messages of mailbox $1 stored at $2 or before (past the mail's time
// to live, expired whether or not a server deleted them yet): each row's
// id and body length.
const EXPIRED: &str = "SELECT id, length(body) FROM mail WHERE recipient = $1 AND stored_at <= $2
                       UNION ALL
                       SELECT c.id, length(c.body) FROM channel c
                       WHERE c.pending @> ARRAY[$1::text] AND c.stored_at <= $2
                         AND NOT EXISTS (SELECT 1 FROM channel_acked a
                                         WHERE a.mail = c.id AND a.recipient = $1)";
// A batch's changes to the counters, in one order of names (as every
// commit's: they lock counter rows in that order); each mailbox as it is
// now, this batch's changes in.
const COUNT: &str = "INSERT INTO mailbox (name, messages, bytes)
                     SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
                         AS d (name, messages, bytes)
                     ORDER BY name COLLATE \"C\"
                     ON CONFLICT (name) DO UPDATE
                     SET messages = mailbox.messages + EXCLUDED.messages,
                         bytes = mailbox.bytes + EXCLUDED.bytes
                     RETURNING name, messages, bytes";
// Takes back what this batch stored for mailboxes without room: direct
// rows ($1), recipients of channel rows ($2, $3; a row pending for nobody
// else goes), and the counters ($4 to $6: names, messages, bytes). Every
// row named is this transaction's (written or locked by it).
const REFUSE: &str = "WITH refused (id, names) AS (
                          SELECT id, array_agg(name)
                          FROM unnest($2::bigint[], $3::text[]) AS t (id, name) GROUP BY id),
                      gone AS (DELETE FROM channel c USING refused r
                               WHERE c.id = r.id AND c.owed <= cardinality(r.names)),
                      kept AS (UPDATE channel c
                               SET pending = ARRAY(SELECT n FROM unnest(c.pending) AS n
                                                   WHERE n <> ALL (r.names)),
                                   owed = c.owed - cardinality(r.names)
                               FROM refused r
                               WHERE c.id = r.id AND c.owed > cardinality(r.names)),
                      direct AS (DELETE FROM mail WHERE id = ANY ($1))
                      UPDATE mailbox m SET messages = m.messages - t.messages,
                                           bytes = m.bytes - t.bytes
                      FROM unnest($4::text[], $5::bigint[], $6::bigint[])
                          AS t (name, messages, bytes)
                      WHERE m.name = t.name";
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
    gain_channel: Statement,
    count: Statement,
    expired: Statement,
    refuse: Statement,
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
            gain_channel: client.prepare(GAIN_CHANNEL)?,
            count: client.prepare(COUNT)?,
            expired: client.prepare(EXPIRED)?,
            refuse: client.prepare(REFUSE)?,
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
    /// Enforced by each commit when set ([`PgStore::limit_mailboxes`]).
    limits: Option<MailboxLimits>,
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
            limits: None,
            rung: true,
        })
    }

    /// Refuses, from now on, a message its recipient's mailbox has no
    /// room for as the database counts it, whichever server stored the
    /// rest ([`Outcome::Full`]): what one of several servers sharing the
    /// database sets, from its `--mailbox-*` limits. Without it nothing
    /// is refused (the counters are kept all the same).
    pub fn limit_mailboxes(&mut self, limits: MailboxLimits) {
        self.limits = Some(limits);
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
            let gone = BTreeMap::from([(name, 0)]);
            for id in &owed {
                take_pending(&mut tx, p, *id, &gone, &mut Tally::default())?;
                deleted += 1;
            }
            // Owed nothing now.
            tx.execute(
                "UPDATE mailbox SET messages = 0, bytes = 0 WHERE name = $1",
                &[&who],
            )?;
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
        tx.batch_execute(SCHEMA_4)?;
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
        version = Some(3);
    }
    if version == Some(3) {
        // Version 4 counts each mailbox: from its rows, once.
        tx.batch_execute(SCHEMA_4)?;
        tx.batch_execute(DROP_STRAY_ACKS)?;
        tx.execute(COUNT_ALL, &[&(MAIL_OVERHEAD as i32)])?;
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

/// A channel copy's acks, gathered by [`apply`]: message id → recipients,
/// each with the place in the batch of its first ack.
type Acked<'a> = BTreeMap<i64, BTreeMap<&'a Name, usize>>;

/// A message's bytes as the counters count them.
fn counted(len: usize) -> i64 {
    i64::try_from(len + MAIL_OVERHEAD).unwrap_or(i64::MAX)
}

/// Applies operation `at` of the batch, noting in `tally` what it changed
/// in which mailbox; a channel copy's ack is gathered into `acked`,
/// counted at the end of the batch. Returns whether it wrote all it was
/// to (a message already there is not).
fn apply<'a>(
    tx: &mut Transaction<'_>,
    p: &Prepared,
    at: usize,
    op: &'a StoreOp,
    acked: &mut Acked<'a>,
    tally: &mut Tally,
) -> Result<bool, postgres::Error> {
    match op {
        // Gathered by the caller and written by `put_all`.
        StoreOp::Put(_) => {}
        StoreOp::Rewrite { mail, body } => {
            if let (Ok(id), Ok((kind, body, key))) = (db_id(*mail), rows::body_columns(body)) {
                let row = tx.query_opt(&p.rewrite, &[&id, &(kind as i16), &body, &key])?;
                if let Some(row) = row
                    && let Ok(to) = Name::new(row.get::<_, &str>(0))
                {
                    let longer: i32 = row.get(1);
                    tally.note(at, to, 0, i64::from(longer), Change::Resized);
                }
            }
        }
        StoreOp::Channel(c) => {
            // Each recipient once (as the counters count them).
            let mut seen = HashSet::new();
            let to: Vec<&Name> = c.to.iter().filter(|n| seen.insert(*n)).collect();
            let pending: Vec<&str> = to.iter().map(|n| n.as_str()).collect();
            let owed = i32::try_from(pending.len()).unwrap_or(i32::MAX);
            let (id, msg_id) = (c.mail.0.cast_signed(), c.id.0.cast_signed());
            // Twice at most: a row there at the insert may be gone (acked
            // by its last recipient) when it is to gain recipients.
            for _ in 0..2 {
                let row = tx.query_opt(
                    &p.put_channel,
                    &[
                        &id,
                        &c.from.as_str(),
                        &c.stored_at,
                        &msg_id,
                        &&c.body[..],
                        &pending,
                        &owed,
                    ],
                )?;
                if row.is_some() {
                    let size = counted(c.body.len());
                    for name in to {
                        let added = Change::Added(id, true, c.mail, c.stored_at);
                        tally.note(at, name.clone(), 1, size, added);
                    }
                    return Ok(true);
                }
                // Not written: a replay (its id is there), or the same
                // message stored first under another id (`kept_instead`);
                // its row gains the recipients it lacks.
                let gained =
                    tx.query_opt(&p.gain_channel, &[&c.from.as_str(), &msg_id, &pending])?;
                if let Some(row) = gained {
                    let (kept, names, len): (i64, Vec<String>, i32) =
                        (row.get(0), row.get(1), row.get(2));
                    let size = counted(usize::try_from(len).unwrap_or(0));
                    for name in names.iter().filter_map(|n| Name::new(n).ok()) {
                        let added = Change::Added(kept, true, c.mail, c.stored_at);
                        tally.note(at, name, 1, size, added);
                    }
                    return Ok(false);
                }
            }
            return Ok(false);
        }
        StoreOp::Delete { to, mail } => {
            // An id beyond bigint was never stored: nothing to delete.
            if let Ok(id) = db_id(*mail) {
                match tx.query_opt(&p.delete, &[&id, &to.as_str()])? {
                    Some(row) => {
                        let len: i32 = row.get(0);
                        let size = counted(usize::try_from(len).unwrap_or(0));
                        tally.note(at, to.clone(), -1, -size, Change::Removed(id));
                    }
                    // Not a direct message: a copy of a channel message.
                    None => {
                        acked.entry(id).or_default().entry(to).or_insert(at);
                    }
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

/// Writes `puts` (each with its place in the batch) with one statement,
/// noting in `tally` those really stored. Returns whether every message
/// was inserted (one already there, by id or by (recipient, sender,
/// message id), is not).
fn put_all(
    tx: &mut Transaction<'_>,
    p: &Prepared,
    puts: &[(usize, &StoredMail)],
    tally: &mut Tally,
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
    let mut by_id = HashMap::new();
    for &(at, m) in puts {
        // Checked before the transaction began (`check_batch`).
        let Ok((kind, body, key)) = rows::body_columns(&m.body) else {
            continue;
        };
        let id = m.mail.0.cast_signed();
        by_id.entry(id).or_insert((at, m));
        cols.0.push(id);
        cols.1.push(m.to.as_str());
        cols.2.push(m.from.as_str());
        cols.3.push(m.channel);
        cols.4.push(m.stored_at);
        cols.5.push(m.id.0.cast_signed());
        cols.6.push(kind as i16);
        cols.7.push(body);
        cols.8.push(key);
    }
    let inserted = tx.query(
        &p.put,
        &[
            &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6, &cols.7, &cols.8,
        ],
    )?;
    for row in &inserted {
        if let Some(&(at, m)) = by_id.get(&row.get::<_, i64>(0)) {
            let size = counted(m.body.len());
            let added = Change::Added(m.mail.0.cast_signed(), false, m.mail, m.stored_at);
            tally.note(at, m.to.clone(), 1, size, added);
        }
    }
    Ok(inserted.len() == cols.0.len())
}

/// Counts the acks of `gone` (each with its place in the batch) for
/// channel message `id`, noting them in `tally`, and deletes the message
/// once nobody is owed it.
fn take_pending(
    tx: &mut Transaction<'_>,
    p: &Prepared,
    id: i64,
    gone: &BTreeMap<&Name, usize>,
    tally: &mut Tally,
) -> Result<(), postgres::Error> {
    let mut acked: i32 = 0;
    for (&name, &at) in gone {
        if let Some(row) = tx.query_opt(&p.ack, &[&id, &name.as_str()])? {
            let len: i32 = row.get(0);
            let size = counted(usize::try_from(len).unwrap_or(0));
            tally.note(at, name.clone(), -1, -size, Change::Removed(id));
            acked += 1;
        }
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

/// What a change did to a mailbox, for [`Tally`].
#[derive(Debug, Clone, Copy)]
enum Change {
    /// A message stored: its row's id, whether that is a `channel` row
    /// (else a `mail` row), the operation's mail id, and when it was
    /// stored (Unix seconds).
    Added(i64, bool, MailId, i64),
    /// A message acked or deleted: its row.
    Removed(i64),
    /// A body rewritten to another length.
    Resized,
}

/// What one batch changed in each mailbox, change by change, as the
/// writes found it (a row already there, or already gone, changes
/// nothing): the counters' side of a commit.
#[derive(Debug, Default)]
struct Tally {
    /// (place in the batch, mailbox, messages, bytes, change).
    changes: Vec<(usize, Name, i64, i64, Change)>,
}

impl Tally {
    fn note(&mut self, at: usize, to: Name, messages: i64, bytes: i64, change: Change) {
        self.changes.push((at, to, messages, bytes, change));
    }

    /// Adds the batch's changes to the counters (one statement) and,
    /// with `limits`, takes back each message a mailbox had no room for
    /// (one more, when there is one): each mailbox's messages go in in
    /// batch order, after everything committed before (its counter row
    /// is locked from here to the COMMIT), as into a
    /// [`MemoryStore`](crate::store::MemoryStore). Returns the messages
    /// refused.
    fn settle(
        mut self,
        tx: &mut Transaction<'_>,
        p: &Prepared,
        limits: Option<MailboxLimits>,
    ) -> Result<Vec<Outcome>, postgres::Error> {
        if self.changes.is_empty() {
            return Ok(Vec::new());
        }
        // Byte order of names, as `COUNT` sorts them.
        let mut sums: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for (_, to, messages, bytes, _) in &self.changes {
            let sum = sums.entry(to.as_str()).or_default();
            sum.0 += messages;
            sum.1 += bytes;
        }
        let names: Vec<&str> = sums.keys().copied().collect();
        let (messages, bytes): (Vec<i64>, Vec<i64>) = sums.values().copied().unzip();
        let now = tx.query(&p.count, &[&names, &messages, &bytes])?;
        let Some(limits) = limits else {
            return Ok(Vec::new());
        };
        let most = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let (most_messages, most_bytes) = (most(limits.messages), most(limits.bytes));
        // Each mailbox as it was before this batch.
        let mut held: HashMap<String, (i64, i64)> = HashMap::new();
        for row in &now {
            let name: String = row.get(0);
            let (m, b): (i64, i64) = (row.get(1), row.get(2));
            let (dm, db) = sums.get(name.as_str()).copied().unwrap_or_default();
            held.insert(name, (m - dm, b - db));
        }
        let mut order: Vec<usize> = (0..self.changes.len()).collect();
        order.sort_by_key(|&i| self.changes[i].0);
        // (row, mailbox, a channel row's, messages, bytes, still to be
        // taken back), by the message's place among them.
        let mut refused: Vec<(i64, &str, bool, i64, i64, bool)> = Vec::new();
        let mut refused_at: HashMap<(i64, &str), usize> = HashMap::new();
        // By mailbox, its expired rows, once looked for (see below).
        let mut expired: HashMap<&str, HashSet<i64>> = HashMap::new();
        let mut outcomes = Vec::new();
        for &i in &order {
            let (_, to, messages, bytes, change) = &self.changes[i];
            let Some(now) = held.get_mut(to.as_str()) else {
                continue;
            };
            let over =
                |now: &(i64, i64)| now.0 + messages > most_messages || now.1 + bytes > most_bytes;
            if let Change::Added(.., stored_at) = *change
                && over(now)
                && let Some(ttl) = limits.ttl
                && !expired.contains_key(to.as_str())
            {
                // Rows past the mail's time to live do not count (nobody
                // may have deleted them: nobody holds the mailbox): they
                // are looked for once the counter says it is full.
                let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
                let cutoff = stored_at.saturating_sub(ttl);
                let rows = tx.query(&p.expired, &[&to.as_str(), &cutoff])?;
                let mut gone = HashSet::new();
                for row in &rows {
                    let (id, len): (i64, i32) = (row.get(0), row.get(1));
                    gone.insert(id);
                    now.0 -= 1;
                    now.1 -= counted(usize::try_from(len).unwrap_or(0));
                }
                expired.insert(to.as_str(), gone);
            }
            match *change {
                // Deleted in this batch, and not counted already.
                Change::Removed(row)
                    if expired.get(to.as_str()).is_some_and(|e| e.contains(&row)) => {}
                Change::Added(row, channel, ours, _) if over(now) => {
                    refused_at.insert((row, to.as_str()), refused.len());
                    refused.push((row, to.as_str(), channel, *messages, *bytes, true));
                    outcomes.push(Outcome::Full {
                        to: to.clone(),
                        mail: ours,
                    });
                }
                // The ack or delete of a message this batch stored where
                // there was no room: it is gone already, and its counts
                // with it.
                Change::Removed(row)
                    if refused_at
                        .get(&(row, to.as_str()))
                        .is_some_and(|&r| refused[r].5) =>
                {
                    if let Some(&r) = refused_at.get(&(row, to.as_str())) {
                        refused[r].5 = false;
                    }
                }
                _ => {
                    now.0 += messages;
                    now.1 += bytes;
                }
            }
        }
        let mut take_back: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        let (mut direct, mut channel_ids, mut channel_names) = (Vec::new(), Vec::new(), Vec::new());
        for &(row, to, channel, messages, bytes, _) in refused.iter().filter(|r| r.5) {
            let back = take_back.entry(to).or_default();
            back.0 += messages;
            back.1 += bytes;
            match channel {
                true => {
                    channel_ids.push(row);
                    channel_names.push(to);
                }
                false => direct.push(row),
            }
        }
        if !take_back.is_empty() {
            let names: Vec<&str> = take_back.keys().copied().collect();
            let (messages, bytes): (Vec<i64>, Vec<i64>) = take_back.values().copied().unzip();
            tx.execute(
                &p.refuse,
                &[
                    &direct,
                    &channel_ids,
                    &channel_names,
                    &names,
                    &messages,
                    &bytes,
                ],
            )?;
        }
        self.changes.clear();
        Ok(outcomes)
    }
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
        let limits = self.limits;
        let result = self.with_retry(|client, p| {
            let mut tx = client.transaction()?;
            let mut acked = Acked::new();
            let mut tally = Tally::default();
            // Runs of messages go in one statement each; everything keeps
            // its order.
            let mut puts: Vec<(usize, &StoredMail)> = Vec::new();
            let mut all_new = true;
            for (at, op) in ops.iter().enumerate() {
                if let StoreOp::Put(m) = op {
                    puts.push((at, m));
                    continue;
                }
                all_new &= put_all(&mut tx, p, &puts, &mut tally)?;
                puts.clear();
                all_new &= apply(&mut tx, p, at, op, &mut acked, &mut tally)?;
            }
            all_new &= put_all(&mut tx, p, &puts, &mut tally)?;
            for (id, gone) in &acked {
                take_pending(&mut tx, p, *id, gone, &mut tally)?;
            }
            // The counters, and what a full mailbox had no room for.
            let refused = tally.settle(&mut tx, p, limits)?;
            if let Some((origin, seq, entries, presence)) = &shared {
                if let Some((names, servers, addrs, online, epochs)) = presence {
                    tx.execute(&p.presence, &[names, servers, addrs, online, epochs])?;
                }
                if let Some(entries) = entries {
                    tx.execute(&p.feed_append, &[origin, seq, entries])?;
                }
            }
            tx.commit()?;
            Ok((all_new, refused))
        });
        let result = result.map(|(all_new, refused)| {
            self.outcomes.extend(refused);
            all_new
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
