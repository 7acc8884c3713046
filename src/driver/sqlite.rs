//! The durable [`Store`]: an embedded SQLite database (`udpchat.db` in the
//! data directory) holding the mailbox and the registry.
//!
//! This is I/O, not protocol: only the driver opens one. Every
//! [`Store::commit`] is one transaction, made durable before it returns (WAL
//! with `synchronous=FULL` syncs the log on every commit), so the server only
//! releases its "saved" acks for messages that survive a crash. A file this
//! build does not understand (not SQLite, another program's database, a newer
//! schema, a damaged page) is refused with a [`StoreError`] and left exactly
//! as it was: nothing here repairs, truncates or recreates a database.
//!
//! # Schema (version 3, in `PRAGMA user_version`)
//!
//! ```sql
//! CREATE TABLE clients (
//!     name          TEXT PRIMARY KEY,  -- a wire::Name
//!     addr          TEXT NOT NULL,     -- last known address, "ip:port"
//!     registered_at INTEGER,           -- first registration, Unix seconds
//!     key           BLOB               -- the X25519 key that owns the name (32 bytes);
//!                                      -- NULL: the next registration binds it
//!     last_seen     INTEGER            -- when it was last online, Unix seconds
//!                                      -- (older rows: when migrated to schema 3,
//!                                      -- as nothing earlier recorded it)
//! );
//! CREATE TABLE mail (
//!     id         INTEGER PRIMARY KEY,  -- the MailId (store order)
//!     recipient  TEXT NOT NULL,
//!     sender     TEXT NOT NULL,
//!     channel    INTEGER NOT NULL,     -- 1: sent to the channel (send_all)
//!     stored_at  INTEGER NOT NULL,     -- Unix seconds
//!     msg_id     INTEGER NOT NULL,     -- the sender's u64 MsgId, bit-cast to i64
//!     kind       INTEGER NOT NULL,     -- 1: sealed by the sender for the recipient
//!                                      -- 2: encrypted at rest by the server (channel)
//!                                      -- 3: like 2, stored in clear by schema 1 (shown
//!                                      --    as unverified: no sender was proved)
//!                                      -- 0: clear text from schema 1, until the
//!                                      --    server's first commit encrypts it (as 3)
//!     body       BLOB NOT NULL,        -- the seal, or salt and ciphertext (or the text)
//!     sender_key BLOB,                 -- kind 1: the sender's key (32 bytes)
//!     UNIQUE (recipient, sender, msg_id)
//! );
//! -- A channel message (send_all) stored once, with the recipients it was
//! -- stored for; each one's ack adds a row to channel_acked, and the last
//! -- one deletes the message. (Schema 2 stored a `mail` row per recipient.)
//! CREATE TABLE channel (
//!     id         INTEGER PRIMARY KEY,  -- the MailId, shared with `mail`'s ids
//!     sender     TEXT NOT NULL,
//!     stored_at  INTEGER NOT NULL,
//!     msg_id     INTEGER NOT NULL,
//!     body       BLOB NOT NULL,        -- salt and ciphertext (storage key, bound to
//!                                      -- sender, msg_id and id, not to a recipient)
//!     pending    TEXT NOT NULL,        -- the recipients' names, separated by spaces
//!     left       INTEGER NOT NULL      -- how many of them have not acked
//! );
//! CREATE TABLE channel_acked (
//!     mail       INTEGER NOT NULL REFERENCES channel (id),
//!     recipient  TEXT NOT NULL,
//!     PRIMARY KEY (mail, recipient)
//! ) WITHOUT ROWID;
//! ```
//!
//! The recipients are one column, written once, rather than a row each:
//! storing a message for 1,000 online clients is one row before the
//! sender's ack, not 1,000. An ack is one small row, never a rewrite of the
//! list (with 100,000 recipients that would be a megabyte per commit); who
//! is still owed it is `pending` less `channel_acked`.
//!
//! Schema 1 had no keys and kept `text` in clear; opening it migrates it
//! (names get bound to keys by their next registration).
//!
//! `msg_id` is chosen by the sender and may use all 64 bits; SQLite integers
//! are signed, so ids from 2^63 up are stored as negative numbers (same
//! bits; `printf('%u', msg_id)` shows the u64). The file is marked with
//! `PRAGMA application_id = 0x75647063` ("udpc"), so another program's
//! database is never mistaken for an empty one.
//!
//! # For operators
//!
//! WAL lets a reader in while the server runs. Look, don't edit: the running
//! server's memory is the working copy, and rows it cannot load stop the
//! next start with an error naming the row.
//!
//! ```sql
//! -- sqlite3 udpchat-data/udpchat.db
//! SELECT name, addr, datetime(registered_at, 'unixepoch') FROM clients ORDER BY rowid;
//! SELECT recipient, count(*) AS messages, sum(length(body)) AS bytes
//!   FROM mail GROUP BY recipient ORDER BY messages DESC;
//! SELECT id, sender, length(body), left, pending FROM channel;  -- recipients, and how many still owed
//! SELECT recipient FROM channel_acked WHERE mail = 42;           -- who has it already
//! SELECT id, sender, channel, datetime(stored_at, 'unixepoch'), kind, length(body)
//!   FROM mail WHERE recipient = 'Bob' ORDER BY id;            -- bodies are ciphertext
//! SELECT name, hex(key) FROM clients;                         -- who owns which name
//! SELECT id, sender, printf('%u', msg_id) AS msg_id FROM mail;   -- the u64, unsigned again
//! PRAGMA user_version;      -- schema version (3)
//! PRAGMA integrity_check;   -- "ok" when the file is sound
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior,
    params,
};

use super::rows;
use crate::store::{Body, ChannelMail, ClientRecord, Loaded, Store, StoreOp, StoredMail};
use crate::wire::{MAX_SEALED, MailId, Name};

/// The database's file name inside the data directory.
pub const DB_FILE: &str = "udpchat.db";

/// "udpc": marks the file as ours in the SQLite header.
const APPLICATION_ID: i64 = 0x7564_7063;

/// Schema steps: `MIGRATIONS[v]` takes the database from version `v` to
/// `v + 1`. Only ever appended to.
const MIGRATIONS: &[&str] = &[
    // 1: the mailbox and the registry.
    "PRAGMA application_id = 1969516643;
     CREATE TABLE clients (
         name          TEXT PRIMARY KEY,
         addr          TEXT NOT NULL,
         registered_at INTEGER
     );
     CREATE TABLE mail (
         id        INTEGER PRIMARY KEY,
         recipient TEXT NOT NULL,
         sender    TEXT NOT NULL,
         channel   INTEGER NOT NULL,
         stored_at INTEGER NOT NULL,
         msg_id    INTEGER NOT NULL,
         text      TEXT NOT NULL,
         UNIQUE (recipient, sender, msg_id)
     );",
    // 2: names owned by keys; mail bodies sealed or encrypted, not text.
    "ALTER TABLE clients ADD COLUMN key BLOB;
     CREATE TABLE mail_v2 (
         id         INTEGER PRIMARY KEY,
         recipient  TEXT NOT NULL,
         sender     TEXT NOT NULL,
         channel    INTEGER NOT NULL,
         stored_at  INTEGER NOT NULL,
         msg_id     INTEGER NOT NULL,
         kind       INTEGER NOT NULL,
         body       BLOB NOT NULL,
         sender_key BLOB,
         UNIQUE (recipient, sender, msg_id)
     );
     INSERT INTO mail_v2 (id, recipient, sender, channel, stored_at, msg_id, kind, body)
         SELECT id, recipient, sender, channel, stored_at, msg_id, 0, CAST(text AS BLOB) FROM mail;
     DROP TABLE mail;
     ALTER TABLE mail_v2 RENAME TO mail;",
    // 3: a channel message stored once, with its pending set; when each
    // name was last online (names not seen for --name-ttl are forgotten).
    "ALTER TABLE clients ADD COLUMN last_seen INTEGER;
     UPDATE clients SET last_seen = unixepoch();
     CREATE TABLE channel (
         id        INTEGER PRIMARY KEY,
         sender    TEXT NOT NULL,
         stored_at INTEGER NOT NULL,
         msg_id    INTEGER NOT NULL,
         body      BLOB NOT NULL,
         pending   TEXT NOT NULL,
         left      INTEGER NOT NULL
     );
     CREATE TABLE channel_acked (
         mail      INTEGER NOT NULL REFERENCES channel (id),
         recipient TEXT NOT NULL,
         PRIMARY KEY (mail, recipient)
     ) WITHOUT ROWID;",
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a write waits for a lock held by another connection (an
/// operator's shell, say) before the commit fails and its messages are
/// refused "busy". Short: the poll loop waits with it, and clients give the
/// server 500 ms per try.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// Held (`flock`, exclusive) by the process that has the data directory
/// open: a second server, or `--release` beside a running one, is refused.
/// A lock beside the database rather than SQLite's own locks, which
/// readers such as the `sqlite3` shell must still be able to take.
pub const LOCK_FILE: &str = "udpchat.lock";

// `ON CONFLICT DO NOTHING` rather than `INSERT OR IGNORE`: both skip a row
// whose id or (recipient, sender, msg_id) is already stored, but OR IGNORE
// would also silently skip a row that breaks any other constraint.
const PUT: &str = "INSERT INTO mail
                       (id, recipient, sender, channel, stored_at, msg_id, kind, body, sender_key)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING";
const DELETE: &str = "DELETE FROM mail WHERE id = ?1 AND recipient = ?2";
// Acks left behind under this id by a hand edit (the shell runs without
// foreign keys) are not this message's.
const CLEAR_ACKED: &str = "DELETE FROM channel_acked WHERE mail = ?1
                           AND NOT EXISTS (SELECT 1 FROM channel WHERE id = ?1)";
const PUT_CHANNEL: &str = "INSERT INTO channel (id, sender, stored_at, msg_id, body, pending, left)
                           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING";
// Only for a message that exists; an ack counted once however often it
// is committed (a deferred batch is committed again).
const ACK: &str = "INSERT INTO channel_acked (mail, recipient)
                   SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM channel WHERE id = ?1)
                   ON CONFLICT DO NOTHING";
const COUNT_DOWN: &str = "UPDATE channel SET left = left - ?2 WHERE id = ?1 RETURNING left";
const OWED: &str = "SELECT pending,
                           (SELECT group_concat(recipient, ' ') FROM channel_acked WHERE mail = ?1)
                    FROM channel WHERE id = ?1";
const SET_LEFT: &str = "UPDATE channel SET left = ?2 WHERE id = ?1";
const DELETE_ACKED: &str = "DELETE FROM channel_acked WHERE mail = ?1";
const DELETE_CHANNEL: &str = "DELETE FROM channel WHERE id = ?1";
const REWRITE: &str = "UPDATE mail SET kind = ?2, body = ?3, sender_key = ?4 WHERE id = ?1";
// registered_at keeps the first registration; the clock is SQLite's. A
// name's key is set once (from NULL): the server never rebinds a name.
const CLIENT: &str = "INSERT INTO clients (name, addr, registered_at, key, last_seen)
                          VALUES (?1, ?2, unixepoch(), ?3, ?4)
                      ON CONFLICT (name) DO UPDATE SET addr = excluded.addr,
                          key = coalesce(clients.key, excluded.key),
                          last_seen = coalesce(excluded.last_seen, clients.last_seen)";
const FORGET: &str = "DELETE FROM clients WHERE name = ?1";
// rowid is the insertion order, and an upsert's UPDATE keeps it.
const LOAD_CLIENTS: &str = "SELECT rowid, name, addr, key, last_seen FROM clients ORDER BY rowid";
const LOAD_MAIL: &str = "SELECT id, recipient, sender, channel, stored_at, msg_id, kind, body,
                                sender_key
                         FROM mail ORDER BY id";
const FETCH_MAIL: &str = "SELECT id, recipient, sender, channel, stored_at, msg_id, kind, body,
                                 sender_key
                          FROM mail WHERE id = ?1 AND recipient = ?2";
// Only for a recipient still owed it, like a `mail` row of theirs.
const FETCH_CHANNEL: &str = "SELECT body, pending,
                                    (SELECT group_concat(recipient, ' ')
                                     FROM channel_acked WHERE mail = ?1)
                             FROM channel WHERE id = ?1";
const LOAD_CHANNEL: &str = "SELECT id, sender, stored_at, msg_id, body, pending,
                                   (SELECT group_concat(recipient, ' ')
                                    FROM channel_acked WHERE mail = channel.id),
                                   left
                            FROM channel ORDER BY id";

/// Why a data directory could not be opened: one line naming the file and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub(super) String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// The mailbox and registry in `DIR/udpchat.db`.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// The data directory's lock, held while the store is open.
    _lock: fs::File,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens `dir/udpchat.db`, creating the directory (mode 0700) and the
    /// database (mode 0600: it holds private messages) if missing.
    ///
    /// Sets WAL, `synchronous=FULL`, foreign keys and a busy timeout; checks
    /// that the file is a udpchat database this build understands; runs
    /// `PRAGMA quick_check` and refuses a damaged file; migrates an older
    /// schema. Never repairs or replaces anything.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        create_dir(dir)?;
        let lock = lock_dir(dir)?;
        let path = dir.join(DB_FILE);
        // SQLite would say only "unable to open database file"; opening it
        // ourselves first names the reason (permission denied, is a
        // directory, read-only file system).
        create_file(&path)?;
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_error(&path, &e))?;
        let mut store = SqliteStore {
            conn,
            path,
            _lock: lock,
        };
        store.prepare().map_err(|e| open_error(&store.path, &e))??;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Releases `name` (an operator's decision, e.g. for a user who lost
    /// their key file): the key that owns it is forgotten, so the next key
    /// to register the name owns it, and its mailbox is deleted — mail
    /// sealed for the old key, or channel copies, is no one else's to
    /// read. Returns how many messages were deleted. Run it with the
    /// server stopped: a running server keeps the binding it loaded.
    pub fn release(&mut self, name: &Name) -> Result<usize, StoreError> {
        let path = self.path.clone();
        let err = |e: rusqlite::Error| StoreError(format!("{}: {e}", path.display()));
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let known = tx
            .execute(
                "UPDATE clients SET key = NULL WHERE name = ?1",
                [name.as_str()],
            )
            .map_err(err)?;
        if known == 0 {
            return Err(StoreError(format!(
                "{}: no client named {name} is registered",
                path.display()
            )));
        }
        let mut deleted = tx
            .execute("DELETE FROM mail WHERE recipient = ?1", [name.as_str()])
            .map_err(err)?;
        let owed: Vec<i64> = tx
            .prepare(
                "SELECT id FROM channel
                 WHERE instr(' ' || pending || ' ', ' ' || ?1 || ' ') > 0",
            )
            .and_then(|mut s| {
                s.query_map([name.as_str()], |r| r.get(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(err)?;
        let gone = HashSet::from([name.as_str()]);
        for id in &owed {
            // Only where the name was still owed it.
            deleted += Self::take_pending(&tx, *id, &gone).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(deleted)
    }

    /// Everything `open` does after the file is open. The outer error is
    /// SQLite's, the inner one a verdict on the file.
    fn prepare(&mut self) -> rusqlite::Result<Result<(), StoreError>> {
        let conn = &mut self.conn;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // SQLite falls back to read-only when it cannot write, and would
        // only fail at the first commit, after the server said "listening".
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            return Ok(Err(StoreError(format!(
                "cannot write {}: permission denied (opened read-only)",
                self.path.display()
            ))));
        }
        // Reading the header is what finds a file that is not SQLite.
        if let Err(e) = check_identity(conn, &self.path)? {
            return Ok(Err(e));
        }
        if let Err(e) = quick_check(conn, &self.path)? {
            return Ok(Err(e));
        }
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Ok(Err(StoreError(format!(
                "cannot use write-ahead logging for {} (journal mode stays {mode}); \
                 is the data dir on a network file system?",
                self.path.display()
            ))));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        migrate(conn, &self.path)
    }

    /// Applies one operation; a channel copy's ack is gathered into
    /// `acked` (message id → recipients), for [`Self::take_pending`] at
    /// the end of the batch.
    fn apply<'a>(
        tx: &Transaction<'_>,
        path: &Path,
        op: &'a StoreOp,
        acked: &mut BTreeMap<i64, HashSet<&'a str>>,
    ) -> io::Result<()> {
        let sql = |e| sql_io_error(path, &e);
        match op {
            StoreOp::Put(m) => {
                let id = mail_id(m.mail).ok_or_else(|| {
                    invalid(path, format!("mail id {} does not fit SQLite", m.mail.0))
                })?;
                let (kind, body, key) = body_columns(path, id, &m.body)?;
                tx.prepare_cached(PUT)
                    .and_then(|mut s| {
                        s.execute(params![
                            id,
                            m.to.as_str(),
                            m.from.as_str(),
                            m.channel,
                            m.stored_at,
                            m.id.0.cast_signed(),
                            kind,
                            body,
                            key,
                        ])
                    })
                    .map_err(sql)?;
            }
            // One server alone on its file: nobody to tell.
            StoreOp::Presence { .. } => {}
            StoreOp::Rewrite { mail, body } => {
                if let Some(id) = mail_id(*mail) {
                    let (kind, body, key) = body_columns(path, id, body)?;
                    tx.prepare_cached(REWRITE)
                        .and_then(|mut s| s.execute(params![id, kind, body, key]))
                        .map_err(sql)?;
                }
            }
            StoreOp::Channel(c) => {
                let id = mail_id(c.mail).ok_or_else(|| {
                    invalid(path, format!("mail id {} does not fit SQLite", c.mail.0))
                })?;
                if !(1..=MAX_SEALED).contains(&c.body.len()) {
                    let what = format!("channel mail {id}: body of {} bytes", c.body.len());
                    return Err(invalid(path, what));
                }
                let pending: Vec<&str> = c.to.iter().map(Name::as_str).collect();
                tx.prepare_cached(CLEAR_ACKED)
                    .and_then(|mut s| s.execute([id]))
                    .map_err(sql)?;
                tx.prepare_cached(PUT_CHANNEL)
                    .and_then(|mut s| {
                        s.execute(params![
                            id,
                            c.from.as_str(),
                            c.stored_at,
                            c.id.0.cast_signed(),
                            &c.body[..],
                            pending.join(" "),
                            i64::try_from(pending.len()).unwrap_or(i64::MAX),
                        ])
                    })
                    .map_err(sql)?;
            }
            StoreOp::Delete { to, mail } => {
                // An id beyond i64 was never stored: nothing to delete.
                if let Some(id) = mail_id(*mail) {
                    let deleted = tx
                        .prepare_cached(DELETE)
                        .and_then(|mut s| s.execute(params![id, to.as_str()]))
                        .map_err(sql)?;
                    // Not a direct message: a copy of a channel message.
                    if deleted == 0 {
                        acked.entry(id).or_default().insert(to.as_str());
                    }
                }
            }
            StoreOp::Client(c) => {
                let key = c.key.map(|k| k.0.to_vec());
                tx.prepare_cached(CLIENT)
                    .and_then(|mut s| {
                        s.execute(params![c.name.as_str(), c.addr.to_string(), key, c.seen_at])
                    })
                    .map_err(sql)?;
            }
            StoreOp::Forget(name) => {
                tx.prepare_cached(FORGET)
                    .and_then(|mut s| s.execute([name.as_str()]))
                    .map_err(sql)?;
            }
        }
        Ok(())
    }
}

impl SqliteStore {
    /// Counts the acks of `gone` for channel message `id`, and deletes the
    /// message once nobody is owed it. Returns how many were new.
    fn take_pending(
        tx: &Transaction<'_>,
        id: i64,
        gone: &HashSet<&str>,
    ) -> rusqlite::Result<usize> {
        let mut acked = 0;
        for name in gone {
            acked += tx.prepare_cached(ACK)?.execute(params![id, name])?;
        }
        if acked == 0 {
            return Ok(0);
        }
        let left: Option<i64> = tx
            .prepare_cached(COUNT_DOWN)?
            .query_row(params![id, i64::try_from(acked).unwrap_or(i64::MAX)], |r| {
                r.get(0)
            })
            .optional()?;
        if left.is_some_and(|l| l > 0) {
            return Ok(acked);
        }
        // Seemingly done: counted again from the lists, so an ack for a
        // name the message was never stored for (only a hand edit makes
        // one) cannot delete it early.
        let owed: Option<(String, Option<String>)> = tx
            .prepare_cached(OWED)?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((pending, acks)) = owed else {
            return Ok(acked);
        };
        let left = still_owed(&pending, acks.as_deref()).count();
        if left == 0 {
            tx.prepare_cached(DELETE_ACKED)?.execute([id])?;
            tx.prepare_cached(DELETE_CHANNEL)?.execute([id])?;
        } else {
            let left = i64::try_from(left).unwrap_or(i64::MAX);
            tx.prepare_cached(SET_LEFT)?.execute(params![id, left])?;
        }
        Ok(acked)
    }
}

/// The names of `pending` (space-separated) not in `acked` (the same, or
/// NULL), each once.
fn still_owed<'a>(pending: &'a str, acked: Option<&'a str>) -> impl Iterator<Item = &'a str> {
    rows::still_owed(pending.split(' '), acked.unwrap_or_default().split(' '))
}

impl Store for SqliteStore {
    /// From a whole load: only one of several servers asks, and those
    /// share a PostgreSQL store, never this one (kept for the contract).
    fn mailboxes(&mut self, names: &[Name]) -> io::Result<Vec<StoredMail>> {
        let mut mail = self.load()?.mail;
        mail.retain(|m| names.contains(&m.to));
        Ok(mail)
    }

    /// Clients in registration order, mail in id order. Every row is
    /// checked; the first bad one is an `InvalidData` error naming it.
    fn load(&mut self) -> io::Result<Loaded> {
        let path = &self.path;
        let sql = |e| sql_io_error(path, &e);
        let mut loaded = Loaded::default();

        let mut stmt = self.conn.prepare_cached(LOAD_CLIENTS).map_err(sql)?;
        let mut rows = stmt.query([]).map_err(sql)?;
        while let Some(row) = rows.next().map_err(sql)? {
            let rowid = integer(row, 0, "rowid").unwrap_or_default();
            let client = client_row(row)
                .map_err(|what| invalid(path, format!("clients row {rowid}: {what}")))?;
            loaded.clients.push(client);
        }
        drop(rows);
        drop(stmt);

        let mut stmt = self.conn.prepare_cached(LOAD_MAIL).map_err(sql)?;
        let mut rows = stmt.query([]).map_err(sql)?;
        while let Some(row) = rows.next().map_err(sql)? {
            let id = integer(row, 0, "id").unwrap_or_default();
            let mail =
                mail_row(row).map_err(|what| invalid(path, format!("mail row {id}: {what}")))?;
            loaded.mail.push(mail);
        }
        drop(rows);
        drop(stmt);

        // Ids are one space across both tables: a channel row under a
        // mail row's id (a hand edit) would be overwritten in memory.
        let direct: HashSet<MailId> = loaded.mail.iter().map(|m| m.mail).collect();
        let mut stmt = self.conn.prepare_cached(LOAD_CHANNEL).map_err(sql)?;
        let mut rows = stmt.query([]).map_err(sql)?;
        while let Some(row) = rows.next().map_err(sql)? {
            let id = integer(row, 0, "id").unwrap_or_default();
            let channel = channel_row(row)
                .and_then(|c| match direct.contains(&c.mail) {
                    true => Err("id is also a mail row's".to_string()),
                    false => Ok(c),
                })
                .map_err(|what| invalid(path, format!("channel row {id}: {what}")))?;
            loaded.mail.extend(channel.copies());
        }
        // Store order across both tables (ids are shared and only grow).
        loaded.mail.sort_by_key(|m| m.mail);
        Ok(loaded)
    }

    /// A row that no longer decodes is `None`, like a missing one: the
    /// server drops it with a line, as it would at load.
    fn fetch(&mut self, to: &Name, mail: MailId) -> io::Result<Option<Body>> {
        let path = &self.path;
        let sql = |e| sql_io_error(path, &e);
        let id = i64::try_from(mail.0).map_err(|_| invalid(path, format!("mail id {}", mail.0)))?;
        let mut stmt = self.conn.prepare_cached(FETCH_MAIL).map_err(sql)?;
        let mut rows = stmt.query(params![id, to.as_str()]).map_err(sql)?;
        if let Some(row) = rows.next().map_err(sql)? {
            return Ok(mail_row(row).ok().filter(|m| m.to == *to).map(|m| m.body));
        }
        drop(rows);
        drop(stmt);
        let mut stmt = self.conn.prepare_cached(FETCH_CHANNEL).map_err(sql)?;
        let mut rows = stmt.query(params![id]).map_err(sql)?;
        let Some(row) = rows.next().map_err(sql)? else {
            return Ok(None);
        };
        let pending = text(row, 1, "pending").unwrap_or_default();
        let acked: Option<String> = row.get(2).ok().flatten();
        if !still_owed(&pending, acked.as_deref()).any(|n| n == to.as_str()) {
            return Ok(None);
        }
        Ok(blob(row, 0, "body")
            .ok()
            .filter(|b| (1..=MAX_SEALED).contains(&b.len()))
            .map(|b| Body::Channel(b.into())))
    }

    /// All of `ops` in one IMMEDIATE transaction: on any error nothing of
    /// the batch is kept (the transaction rolls back when dropped).
    fn commit(&mut self, ops: &[StoreOp]) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let path = &self.path;
        // IMMEDIATE takes the write lock up front (waiting out the busy
        // timeout), instead of failing when a read upgrades to a write.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| sql_io_error(path, &e))?;
        // Acks of channel copies, per message: its pending set is
        // rewritten once per commit, not once per ack. (Nothing later in a
        // batch depends on them: a message's id is never stored again.)
        let mut acked = BTreeMap::new();
        for op in ops {
            Self::apply(&tx, path, op, &mut acked)?;
        }
        for (id, gone) in &acked {
            Self::take_pending(&tx, *id, gone).map_err(|e| sql_io_error(path, &e))?;
        }
        tx.commit().map_err(|e| sql_io_error(path, &e))
    }
}

/// `mail.kind`, `body` and `sender_key` of a body (see
/// [`rows::body_columns`]).
fn body_columns(path: &Path, id: i64, body: &Body) -> io::Result<rows::BodyColumns> {
    rows::body_columns(body).map_err(|what| invalid(path, format!("mail {id}: {what}")))
}

fn client_row(row: &Row<'_>) -> Result<ClientRecord, String> {
    let name = text(row, 1, "name")?;
    let addr = text(row, 2, "addr")?;
    let key = match row.get_ref(3).map_err(|e| format!("key: {e}"))? {
        ValueRef::Null => None,
        _ => Some(blob(row, 3, "key")?),
    };
    let seen_at = match row.get_ref(4).map_err(|e| format!("last_seen: {e}"))? {
        ValueRef::Null => None,
        _ => Some(integer(row, 4, "last_seen")?),
    };
    rows::client(&name, &addr, key.as_deref(), seen_at)
}

fn blob(row: &Row<'_>, i: usize, col: &str) -> Result<Vec<u8>, String> {
    match row.get_ref(i).map_err(|e| format!("{col}: {e}"))? {
        ValueRef::Blob(b) => Ok(b.to_vec()),
        other => Err(format!("{col} is {}, not a blob", other.data_type())),
    }
}

/// A row of [`LOAD_CHANNEL`]: the message, with each recipient once.
fn channel_row(row: &Row<'_>) -> Result<ChannelMail, String> {
    let pending = text(row, 5, "pending")?;
    let acked = match row.get_ref(6).map_err(|e| format!("acked: {e}"))? {
        ValueRef::Null => String::new(),
        _ => text(row, 6, "acked")?,
    };
    let left = match row.get_ref(7).map_err(|e| format!("left: {e}"))? {
        ValueRef::Integer(n) => n,
        other => return Err(format!("left is {other:?}, not an integer")),
    };
    let words = |s: &str| s.split(' ').map(str::to_owned).collect();
    rows::channel(rows::ChannelColumns {
        id: integer(row, 0, "id")?,
        from: text(row, 1, "sender")?,
        stored_at: integer(row, 2, "stored_at")?,
        msg_id: integer(row, 3, "msg_id")?,
        body: blob(row, 4, "body")?,
        pending: words(&pending),
        acked: words(&acked),
        left,
    })
}

fn mail_row(row: &Row<'_>) -> Result<StoredMail, String> {
    let id = integer(row, 0, "id")?;
    rows::mail_id(id)?;
    let to = text(row, 1, "recipient")?;
    rows::name("recipient", &to)?;
    let from = text(row, 2, "sender")?;
    rows::name("sender", &from)?;
    let channel = integer(row, 3, "channel")?;
    let stored_at = integer(row, 4, "stored_at")?;
    let msg_id = integer(row, 5, "msg_id")?;
    let body = blob(row, 7, "body")?;
    let kind = integer(row, 6, "kind")?;
    let key = match (
        kind,
        row.get_ref(8).map_err(|e| format!("sender_key: {e}"))?,
    ) {
        (_, ValueRef::Blob(b)) => Some(b.to_vec()),
        (rows::KIND_SEALED, other) => {
            return Err(format!(
                "sender_key is {}, not a 32-byte blob",
                other.data_type()
            ));
        }
        _ => None,
    };
    rows::mail(rows::MailColumns {
        id,
        to,
        from,
        channel,
        stored_at,
        msg_id,
        kind,
        body,
        key,
    })
}

/// Column `i` as text; anything else (NULL, a number, invalid UTF-8) is
/// described, not coerced.
fn text(row: &Row<'_>, i: usize, col: &str) -> Result<String, String> {
    match row.get_ref(i).map_err(|e| format!("{col}: {e}"))? {
        ValueRef::Text(bytes) => {
            String::from_utf8(bytes.to_vec()).map_err(|_| format!("{col} is not valid UTF-8"))
        }
        other => Err(format!("{col} is {}, not text", other.data_type())),
    }
}

fn integer(row: &Row<'_>, i: usize, col: &str) -> Result<i64, String> {
    match row.get_ref(i).map_err(|e| format!("{col}: {e}"))? {
        ValueRef::Integer(n) => Ok(n),
        other => Err(format!("{col} is {}, not an integer", other.data_type())),
    }
}

fn mail_id(mail: MailId) -> Option<i64> {
    i64::try_from(mail.0).ok()
}

/// Refuses a file that is not ours or is newer than this build.
fn check_identity(conn: &Connection, path: &Path) -> rusqlite::Result<Result<(), StoreError>> {
    let app: i64 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let objects: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
    let path = path.display();
    Ok(match (app, version) {
        (APPLICATION_ID, v) if v > SCHEMA_VERSION => Err(StoreError(format!(
            "{path} was written by a newer udpchat (schema {v}, this build knows {SCHEMA_VERSION})"
        ))),
        (APPLICATION_ID, v) if v >= 1 => Ok(()),
        (0, 0) if objects == 0 => Ok(()),
        (APPLICATION_ID, v) => Err(StoreError(format!(
            "{path} is not a usable udpchat database (schema version {v})"
        ))),
        _ => Err(StoreError(format!(
            "{path} is not a udpchat database (it is another program's SQLite database)"
        ))),
    })
}

fn quick_check(conn: &Connection, path: &Path) -> rusqlite::Result<Result<(), StoreError>> {
    let mut stmt = conn.prepare("PRAGMA quick_check(1)")?;
    let first: String = stmt.query_row([], |r| r.get(0))?;
    Ok(if first == "ok" {
        Ok(())
    } else {
        Err(damaged(path, &first))
    })
}

fn damaged(path: &Path, what: &str) -> StoreError {
    // quick_check starts with a "*** in database main ***" banner; the
    // first line after it says what is wrong.
    let what = what
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("***"))
        .unwrap_or(what);
    StoreError(format!(
        "{} is damaged: {what} (left untouched; see `PRAGMA integrity_check`)",
        path.display()
    ))
}

/// Brings the schema up to [`SCHEMA_VERSION`], one transaction per step.
fn migrate(conn: &mut Connection, path: &Path) -> rusqlite::Result<Result<(), StoreError>> {
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Read again under the write lock: another process may have
        // migrated since the identity check.
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Ok(Err(StoreError(format!(
                "{} was written by a newer udpchat (schema {version}, this build knows {SCHEMA_VERSION})",
                path.display()
            ))));
        }
        let Some(step) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            return Ok(Ok(()));
        };
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| {
        // "File exists" for a path that is a file says the wrong thing.
        let reason = if dir.is_file() {
            "it is a file, not a directory".to_string()
        } else {
            io_reason(&e)
        };
        StoreError(format!("cannot create {}: {reason}", dir.display()))
    })
}

fn create_file(path: &Path) -> Result<fs::File, StoreError> {
    let mut options = fs::OpenOptions::new();
    options.read(true).write(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .map_err(|e| StoreError(format!("cannot open {}: {}", path.display(), io_reason(&e))))
}

/// Takes the data directory's lock without waiting.
fn lock_dir(dir: &Path) -> Result<fs::File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = create_file(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError(format!(
            "{} is in use by another udpchat process (a server, or --release); it holds {}",
            dir.display(),
            path.display()
        ))),
        Err(fs::TryLockError::Error(e)) => Err(StoreError(format!(
            "cannot lock {}: {}",
            path.display(),
            io_reason(&e)
        ))),
    }
}

/// "permission denied" rather than "Permission denied (os error 13)".
fn io_reason(e: &io::Error) -> String {
    let full = e.to_string();
    let text = full.split(" (os error").next().unwrap_or(&full);
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => full,
    }
}

/// An SQLite error while opening, as a verdict on the file.
fn open_error(path: &Path, e: &rusqlite::Error) -> StoreError {
    let p = path.display();
    StoreError(match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            format!("{p} is not a udpchat database (it is not an SQLite database at all)")
        }
        Some(ErrorCode::DatabaseCorrupt) => {
            return damaged(path, "database disk image is malformed");
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            format!("{p} is locked by another process (another udpchat server on this data dir?)")
        }
        Some(ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => {
            format!("cannot write {p}: permission denied")
        }
        Some(ErrorCode::DiskFull) => format!("cannot write {p}: the disk is full"),
        Some(ErrorCode::CannotOpen) => format!("cannot open {p}: {e}"),
        _ => format!("{p}: {e}"),
    })
}

fn sql_io_error(path: &Path, e: &rusqlite::Error) -> io::Error {
    let kind = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => io::ErrorKind::InvalidData,
        Some(ErrorCode::DiskFull) => io::ErrorKind::StorageFull,
        Some(ErrorCode::PermissionDenied) => io::ErrorKind::PermissionDenied,
        Some(ErrorCode::ReadOnly) => io::ErrorKind::ReadOnlyFilesystem,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => io::ErrorKind::ResourceBusy,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{}: {e}", path.display()))
}

fn invalid(path: &Path, what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PublicKey;
    use crate::store::{ChannelMail, MemoryStore};
    use crate::wire::{MAX_TEXT, MsgId};

    /// A fresh directory under the system temp dir, removed when dropped
    /// (also when the test fails).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("udpchat-sqlite-test-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn mail(mail: u64, to: &str, from: &str, id: u64, text: &str) -> StoredMail {
        StoredMail {
            mail: MailId(mail),
            to: name(to),
            from: name(from),
            channel: mail.is_multiple_of(2),
            stored_at: 1_700_000_000 + mail as i64,
            id: MsgId(id),
            // The store keeps bodies as they come: any bytes will do.
            body: Body::Sealed {
                key: PublicKey([7; 32]),
                sealed: text.as_bytes().to_vec(),
            },
        }
    }

    fn put(m: StoredMail) -> StoreOp {
        StoreOp::Put(m)
    }

    fn key_of(n: &str) -> PublicKey {
        PublicKey([n.as_bytes()[0]; 32])
    }

    fn record(n: &str, addr: &str) -> ClientRecord {
        ClientRecord {
            name: name(n),
            addr: addr.parse().unwrap(),
            key: Some(key_of(n)),
            seen_at: Some(1_700_000_000),
        }
    }

    fn client(n: &str, addr: &str) -> StoreOp {
        StoreOp::Client(record(n, addr))
    }

    fn delete(to: &str, mail: u64) -> StoreOp {
        StoreOp::Delete {
            to: name(to),
            mail: MailId(mail),
        }
    }

    fn raw(store: &SqliteStore) -> Connection {
        Connection::open(store.path()).unwrap()
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    fn open_err(dir: &Path) -> String {
        match SqliteStore::open(dir) {
            Ok(store) => panic!("{} opened", store.path().display()),
            Err(e) => e.to_string(),
        }
    }

    /// A body is fetched as it was stored, for its recipient only, and
    /// like the memory store's; a missing or damaged one is `None`.
    #[test]
    fn a_fetch_gives_the_stored_body_like_the_memory_store() {
        let dir = TempDir::new("fetch");
        let mut memory = MemoryStore::new();
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let ops = vec![
            put(mail(1, "Bob", "Alice", 1, "direct")),
            StoreOp::Channel(channel(2, "Alice", &["Bob", "Carol"], "to all")),
            put(mail(3, "Carol", "Bob", 3, "damaged soon")),
        ];
        store.commit(&ops).unwrap();
        memory.commit(&ops).unwrap();
        store.commit(&[delete("Carol", 2)]).unwrap();
        memory.commit(&[delete("Carol", 2)]).unwrap();
        for (to, id) in [
            ("Bob", 1),
            ("Bob", 2),
            ("Carol", 2),
            ("Carol", 1),
            ("Bob", 9),
        ] {
            let (to, id) = (name(to), MailId(id));
            let fetched = store.fetch(&to, id).unwrap();
            assert_eq!(fetched, memory.fetch(&to, id).unwrap(), "{to} {id:?}");
        }
        assert!(matches!(
            store.fetch(&name("Bob"), MailId(1)).unwrap(),
            Some(Body::Sealed { sealed, .. }) if sealed == b"direct"
        ));
        assert!(matches!(
            store.fetch(&name("Bob"), MailId(2)).unwrap(),
            Some(Body::Channel(b)) if &*b == b"to all"
        ));
        // Carol acked her copy; Bob's is still there.
        assert_eq!(store.fetch(&name("Carol"), MailId(2)).unwrap(), None);
        raw(&store)
            .execute("UPDATE mail SET kind = 99 WHERE id = 3", [])
            .unwrap();
        assert_eq!(store.fetch(&name("Carol"), MailId(3)).unwrap(), None);
    }

    #[test]
    fn round_trip_survives_reopen_and_matches_memory_store() {
        let dir = TempDir::new("round-trip");
        let batches = vec![
            vec![
                client("Alice", "127.0.0.1:2000"),
                client("Bob", "[::1]:3000"),
            ],
            vec![
                put(mail(1, "Bob", "Alice", u64::MAX, "hi 😀")),
                put(mail(2, "Bob", "Alice", 7, &"x".repeat(MAX_TEXT))),
                put(mail(3, "Alice", "Bob", 0, "yo")),
            ],
            vec![delete("Bob", 1), client("Carol", "10.0.0.3:4000")],
        ];
        let mut memory = MemoryStore::new();
        {
            let mut store = SqliteStore::open(&dir.0).unwrap();
            for ops in &batches {
                store.commit(ops).unwrap();
                memory.commit(ops).unwrap();
            }
            assert_eq!(store.load().unwrap(), memory.load().unwrap());
        }
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded, memory.load().unwrap());
        let names: Vec<&str> = loaded.clients.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["Alice", "Bob", "Carol"]);
        let ids: Vec<u64> = loaded.mail.iter().map(|m| m.mail.0).collect();
        assert_eq!(ids, [2, 3]);
        // The high bit of a u64 id survives as the same bits in an i64.
        let conn = raw(&store);
        let stored: i64 = conn
            .query_row("SELECT msg_id FROM mail WHERE id = 2", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 7);
        store
            .commit(&[put(mail(4, "Bob", "Alice", u64::MAX, "again"))])
            .unwrap();
        let stored: i64 = conn
            .query_row("SELECT msg_id FROM mail WHERE id = 4", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, -1);
        assert_eq!(
            store.load().unwrap().mail.last().unwrap().id,
            MsgId(u64::MAX)
        );
    }

    #[test]
    fn put_is_idempotent() {
        let dir = TempDir::new("idempotent");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let first = mail(1, "Bob", "Alice", 42, "hello");
        // A retried request, in the same batch and in a later one.
        store
            .commit(&[put(first.clone()), put(first.clone())])
            .unwrap();
        store.commit(&[put(first.clone())]).unwrap();
        // The same (recipient, sender, msg_id) under a new mail id.
        store
            .commit(&[put(mail(2, "Bob", "Alice", 42, "hello"))])
            .unwrap();
        // The same mail id for another key is not allowed to replace it.
        store
            .commit(&[put(mail(1, "Carol", "Dave", 9, "other"))])
            .unwrap();
        assert_eq!(store.load().unwrap().mail, [first]);
        // The same msg_id from another sender, or to another recipient, is
        // a different message.
        store
            .commit(&[
                put(mail(3, "Bob", "Carol", 42, "from Carol")),
                put(mail(4, "Dave", "Alice", 42, "to Dave")),
            ])
            .unwrap();
        assert_eq!(count(&raw(&store), "mail"), 3);
    }

    #[test]
    fn delete_removes_only_the_acked_mail() {
        let dir = TempDir::new("delete");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        store
            .commit(&[
                put(mail(1, "Bob", "Alice", 1, "one")),
                put(mail(2, "Bob", "Alice", 2, "two")),
                put(mail(3, "Carol", "Alice", 3, "three")),
            ])
            .unwrap();
        store.commit(&[delete("Bob", 2)]).unwrap();
        // Unknown ids, a wrong recipient and an id beyond i64 delete nothing.
        store
            .commit(&[delete("Bob", 99), delete("Bob", 3), delete("Bob", u64::MAX)])
            .unwrap();
        let ids: Vec<u64> = store
            .load()
            .unwrap()
            .mail
            .iter()
            .map(|m| m.mail.0)
            .collect();
        assert_eq!(ids, [1, 3]);
    }

    #[test]
    fn client_upsert_replaces_the_address_and_keeps_the_order() {
        let dir = TempDir::new("upsert");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        store
            .commit(&[
                client("Alice", "127.0.0.1:2000"),
                client("Bob", "127.0.0.1:3000"),
            ])
            .unwrap();
        let conn = raw(&store);
        let first: i64 = conn
            .query_row(
                "SELECT registered_at FROM clients WHERE name = 'Alice'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        conn.execute(
            "UPDATE clients SET registered_at = 5 WHERE name = 'Alice'",
            [],
        )
        .unwrap();
        store.commit(&[client("Alice", "10.1.2.3:4000")]).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(
            loaded.clients,
            [
                record("Alice", "10.1.2.3:4000"),
                record("Bob", "127.0.0.1:3000"),
            ]
        );
        // A name's key is never replaced, only bound once.
        store
            .commit(&[StoreOp::Client(ClientRecord {
                key: Some(PublicKey([9; 32])),
                ..record("Alice", "10.1.2.3:4000")
            })])
            .unwrap();
        assert_eq!(store.load().unwrap().clients[0].key, Some(key_of("Alice")));
        assert!(
            first > 1_600_000_000,
            "registered_at {first} is not Unix seconds"
        );
        let kept: i64 = conn
            .query_row(
                "SELECT registered_at FROM clients WHERE name = 'Alice'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kept, 5, "a new address must not move the registration");
        assert_eq!(count(&conn, "clients"), 2);
    }

    #[test]
    fn a_failing_op_leaves_nothing_of_its_batch() {
        let dir = TempDir::new("atomic");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let before = vec![
            client("Alice", "127.0.0.1:2000"),
            put(mail(1, "Bob", "Alice", 1, "kept")),
        ];
        store.commit(&before).unwrap();
        let expected = store.load().unwrap();

        // SQLite refuses the last statement of the batch.
        store
            .conn
            .execute_batch(
                "CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.mail WHEN NEW.body = CAST('boom' AS BLOB)
                 BEGIN SELECT RAISE(ABORT, 'refused by test'); END;",
            )
            .unwrap();
        let batch = [
            client("Alice", "10.0.0.1:1"),
            client("Carol", "10.0.0.2:2"),
            delete("Bob", 1),
            put(mail(2, "Carol", "Alice", 2, "fine")),
            put(mail(3, "Carol", "Alice", 3, "boom")),
        ];
        let err = store.commit(&batch).unwrap_err();
        assert!(err.to_string().contains("refused by test"), "{err}");
        assert_eq!(store.load().unwrap(), expected);
        assert_eq!(
            raw(&store)
                .query_row("SELECT count(*) FROM mail", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            1
        );

        // Refused before SQLite sees it: a body no load would accept.
        let mut empty = mail(4, "Carol", "Alice", 4, "x");
        empty.body = Body::AtRest(Vec::new());
        let err = store
            .commit(&[client("Dave", "10.0.0.4:4"), put(empty)])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(store.load().unwrap(), expected);

        // The connection is still good for the next batch.
        store.commit(&batch[..4]).unwrap();
        assert_eq!(store.load().unwrap().mail.len(), 1);
        assert_eq!(store.load().unwrap().clients.len(), 2);
    }

    #[test]
    fn garbage_file_is_refused_and_left_alone() {
        let dir = TempDir::new("garbage");
        fs::create_dir_all(&dir.0).unwrap();
        let file = dir.0.join(DB_FILE);
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        fs::write(&file, &garbage).unwrap();
        let err = open_err(&dir.0);
        assert!(err.contains("is not a udpchat database"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert_eq!(fs::read(&file).unwrap(), garbage);
    }

    #[test]
    fn another_programs_database_is_refused() {
        let dir = TempDir::new("foreign");
        fs::create_dir_all(&dir.0).unwrap();
        let conn = Connection::open(dir.0.join(DB_FILE)).unwrap();
        conn.execute_batch("CREATE TABLE notes (body TEXT);")
            .unwrap();
        drop(conn);
        let err = open_err(&dir.0);
        assert!(err.contains("is not a udpchat database"), "{err}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = TempDir::new("future");
        let store = SqliteStore::open(&dir.0).unwrap();
        raw(&store).pragma_update(None, "user_version", 7).unwrap();
        drop(store);
        let err = open_err(&dir.0);
        assert!(
            err.contains("was written by a newer udpchat (schema 7, this build knows 3)"),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_file_is_refused_and_left_alone() {
        let dir = TempDir::new("damaged");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let ops: Vec<StoreOp> = (1..=200)
            .map(|i| put(mail(i, "Bob", "Alice", i, &"m".repeat(200))))
            .collect();
        store.commit(&ops).unwrap();
        let file = store.path().to_path_buf();
        // Closing the last connection checkpoints the WAL into the file.
        drop(store);
        let mut bytes = fs::read(&file).unwrap();
        let page = 4096;
        assert!(bytes.len() > 6 * page, "{} bytes", bytes.len());
        // Pages 2.. hold the tables and their indexes: scribble over some.
        for b in &mut bytes[page..4 * page] {
            *b = 0xA5;
        }
        fs::write(&file, &bytes).unwrap();
        let err = open_err(&dir.0);
        assert!(err.contains("is damaged"), "{err}");
        assert_eq!(fs::read(&file).unwrap(), bytes);
    }

    #[test]
    fn an_uncreatable_directory_is_a_clear_error() {
        let dir = TempDir::new("uncreatable");
        fs::create_dir_all(&dir.0).unwrap();
        let file = dir.0.join("plain-file");
        fs::write(&file, b"not a directory").unwrap();
        let target = file.join("data");
        let err = open_err(&target);
        assert_eq!(
            err,
            format!("cannot create {}: not a directory", target.display())
        );
    }

    #[test]
    fn the_database_path_being_a_directory_is_a_clear_error() {
        let dir = TempDir::new("db-is-dir");
        fs::create_dir_all(dir.0.join(DB_FILE)).unwrap();
        let err = open_err(&dir.0);
        assert!(err.starts_with("cannot open "), "{err}");
        assert!(err.ends_with(": is a directory"), "{err}");
    }

    #[test]
    fn wal_and_full_sync_are_set() {
        let dir = TempDir::new("pragmas");
        let store = SqliteStore::open(&dir.0).unwrap();
        let get = |p: &str| -> String {
            store
                .conn
                .pragma_query_value(None, p, |r| r.get::<_, rusqlite::types::Value>(0))
                .map(|v| format!("{v:?}"))
                .unwrap()
        };
        assert_eq!(get("journal_mode"), "Text(\"wal\")");
        assert_eq!(get("synchronous"), "Integer(2)"); // FULL
        assert_eq!(get("foreign_keys"), "Integer(1)");
        assert_eq!(
            get("busy_timeout"),
            format!("Integer({})", BUSY_TIMEOUT.as_millis())
        );
        assert_eq!(get("user_version"), format!("Integer({SCHEMA_VERSION})"));
        assert_eq!(get("application_id"), format!("Integer({APPLICATION_ID})"));
        // WAL is a property of the file: a fresh connection sees it too.
        let mode: String = raw(&store)
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_commit_is_visible_to_another_connection() {
        let dir = TempDir::new("visible");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let other = raw(&store);
        assert_eq!(count(&other, "mail"), 0);
        store
            .commit(&[
                client("Alice", "127.0.0.1:2000"),
                put(mail(1, "Bob", "Alice", 1, "hi")),
            ])
            .unwrap();
        // Still open, nothing checkpointed: the committed rows are in the WAL.
        assert_eq!(count(&other, "mail"), 1);
        assert_eq!(count(&other, "clients"), 1);
        let body: Vec<u8> = other
            .query_row("SELECT body FROM mail WHERE recipient = 'Bob'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(body, b"hi");
    }

    #[test]
    fn a_bad_row_is_a_load_error_naming_it() {
        let cases = [
            (
                "UPDATE clients SET addr = 'nowhere' WHERE name = 'Alice'",
                "clients row 1: addr \"nowhere\"",
            ),
            (
                "UPDATE clients SET name = 'two words' WHERE name = 'Alice'",
                "clients row 1: name \"two words\" is not a valid name",
            ),
            (
                "UPDATE clients SET addr = x'01'",
                "clients row 1: addr is Blob, not text",
            ),
            (
                "UPDATE clients SET key = x'0102'",
                "clients row 1: key is 2 bytes, not 32",
            ),
            (
                "UPDATE mail SET body = x''",
                "mail row 1: body is 0 bytes long",
            ),
            (
                "UPDATE mail SET body = CAST(printf('%.1061c', 'x') AS BLOB)",
                "mail row 1: body is 1061 bytes long",
            ),
            (
                "UPDATE mail SET kind = 0, body = CAST(printf('%.1001c', 'x') AS BLOB)",
                "mail row 1: text is 1001 bytes long",
            ),
            (
                "UPDATE mail SET kind = 5",
                "mail row 1: kind is 5, not 0, 1, 2 or 3",
            ),
            (
                "UPDATE mail SET sender_key = x'01'",
                "mail row 1: sender_key is 1 bytes, not 32",
            ),
            (
                "UPDATE mail SET body = 'text, not a blob'",
                "mail row 1: body is Text, not a blob",
            ),
            (
                "UPDATE mail SET sender = ''",
                "mail row 1: sender \"\" is not a valid name",
            ),
            (
                "UPDATE mail SET channel = 2",
                "mail row 1: channel is 2, not 0 or 1",
            ),
            (
                "UPDATE mail SET stored_at = 'yesterday'",
                "mail row 1: stored_at is Text, not an integer",
            ),
            (
                "UPDATE mail SET kind = 0, body = x'ff'",
                "mail row 1: body is not valid UTF-8",
            ),
            ("UPDATE mail SET id = -5", "mail row -5: negative id"),
        ];
        for (i, (sql, expected)) in cases.iter().enumerate() {
            let dir = TempDir::new(&format!("bad-row-{i}"));
            let mut store = SqliteStore::open(&dir.0).unwrap();
            store
                .commit(&[
                    client("Alice", "127.0.0.1:2000"),
                    put(mail(1, "Bob", "Alice", 1, "hi")),
                ])
                .unwrap();
            raw(&store).execute(sql, []).unwrap();
            let err = store.load().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{sql}");
            let msg = err.to_string();
            assert!(
                msg.starts_with(&store.path().display().to_string()),
                "{msg}"
            );
            assert!(msg.contains(expected), "{sql}: {msg}");
        }
    }

    #[test]
    fn a_mail_id_beyond_i64_is_refused() {
        let dir = TempDir::new("huge-id");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let err = store
            .commit(&[put(mail(u64::MAX, "Bob", "Alice", 1, "hi"))])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(store.load().unwrap().mail.is_empty());
    }

    #[test]
    fn a_schema_1_database_is_migrated_keeping_every_row() {
        let dir = TempDir::new("migrate");
        fs::create_dir_all(&dir.0).unwrap();
        {
            // Exactly what a version-1 server wrote.
            let conn = Connection::open(dir.0.join(DB_FILE)).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO clients (name, addr, registered_at) VALUES ('Bob', '127.0.0.1:3000', 5);
                 INSERT INTO mail (id, recipient, sender, channel, stored_at, msg_id, text)
                     VALUES (7, 'Bob', 'Alice', 0, 1700000000, -1, 'old 😀');",
            )
            .unwrap();
        }
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(
            loaded.clients,
            // Last seen: counted from the migration, not from its
            // registration (an active old name must not look unseen).
            [ClientRecord {
                key: None,
                seen_at: loaded.clients[0].seen_at,
                ..record("Bob", "127.0.0.1:3000")
            }]
        );
        assert!(loaded.clients[0].seen_at > Some(1_600_000_000));
        assert_eq!(loaded.mail.len(), 1);
        let m = &loaded.mail[0];
        assert_eq!((m.mail, m.id), (MailId(7), MsgId(u64::MAX)));
        assert_eq!(m.body, Body::Clear("old 😀".to_string()));
        // The server encrypts it at rest with its first commit.
        store
            .commit(&[StoreOp::Rewrite {
                mail: MailId(7),
                body: Body::AtRest(vec![1; 40]),
            }])
            .unwrap();
        assert_eq!(
            store.load().unwrap().mail[0].body,
            Body::AtRest(vec![1; 40])
        );
        let version: i64 = raw(&store)
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 3);
        assert_eq!(count(&raw(&store), "channel"), 0);
    }

    fn channel(mail: u64, from: &str, to: &[&str], text: &str) -> ChannelMail {
        ChannelMail {
            mail: MailId(mail),
            from: name(from),
            stored_at: 1_700_000_000 + mail as i64,
            id: MsgId(mail * 10),
            body: text.as_bytes().into(),
            to: to.iter().map(|n| name(n)).collect(),
        }
    }

    #[test]
    fn a_channel_message_is_stored_once_and_goes_with_its_last_recipient() {
        let dir = TempDir::new("channel");
        let mut memory = MemoryStore::new();
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let batches = vec![
            vec![
                put(mail(1, "Bob", "Alice", 1, "direct")),
                StoreOp::Channel(channel(2, "Alice", &["Bob", "Carol", "Dave"], "to all")),
                put(mail(3, "Carol", "Bob", 3, "direct too")),
            ],
            // A retried batch stores nothing twice.
            vec![StoreOp::Channel(channel(2, "Alice", &["Bob"], "to all"))],
            vec![delete("Bob", 2), delete("Carol", 2)],
        ];
        for ops in &batches {
            store.commit(ops).unwrap();
            memory.commit(ops).unwrap();
        }
        let conn = raw(&store);
        assert_eq!(count(&conn, "channel"), 1);
        // The list as stored, two acks beside it, one left.
        let row: (String, i64) = conn
            .query_row("SELECT pending, left FROM channel", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(row, ("Bob Carol Dave".to_string(), 1));
        assert_eq!(count(&conn, "channel_acked"), 2);
        // An ack committed again (a deferred batch) counts once.
        store.commit(&[delete("Bob", 2)]).unwrap();
        let left: i64 = conn
            .query_row("SELECT left FROM channel", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 1);
        drop(store);
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded, memory.load().unwrap());
        let rows: Vec<(u64, &str)> = loaded
            .mail
            .iter()
            .map(|m| (m.mail.0, m.to.as_str()))
            .collect();
        assert_eq!(rows, [(1, "Bob"), (2, "Dave"), (3, "Carol")]);
        assert_eq!(loaded.mail[1].body, Body::Channel(b"to all"[..].into()));
        assert!(loaded.mail[1].channel);
        // A direct delete never touches the channel's rows, nor the other way.
        store
            .commit(&[delete("Dave", 1), delete("Bob", 3)])
            .unwrap();
        assert_eq!(store.load().unwrap().mail.len(), 3);
        // An ack from a name it was never stored for brings the count to 0,
        // but the lists still owe Dave: nothing is deleted early.
        store.commit(&[delete("Mallory", 2)]).unwrap();
        assert_eq!(count(&conn, "channel"), 1);
        let loaded = store.load().unwrap();
        let owed: Vec<&str> = (loaded.mail.iter())
            .filter(|m| m.mail == MailId(2))
            .map(|m| m.to.as_str())
            .collect();
        assert_eq!(owed, ["Dave"]);
        store.commit(&[delete("Dave", 2)]).unwrap();
        assert_eq!(count(&conn, "channel"), 0);
        assert_eq!(count(&conn, "channel_acked"), 0);
    }

    #[test]
    fn the_copies_of_a_loaded_channel_message_share_one_body() {
        let dir = TempDir::new("channel-shared");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let ops = [
            StoreOp::Channel(channel(5, "Alice", &["Bob", "Carol"], "one")),
            StoreOp::Channel(channel(6, "Bob", &["Alice", "Carol"], "two")),
        ];
        store.commit(&ops).unwrap();
        let loaded = store.load().unwrap();
        let bodies: Vec<&std::sync::Arc<[u8]>> = loaded
            .mail
            .iter()
            .map(|m| match &m.body {
                Body::Channel(b) => b,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(bodies.len(), 4);
        assert!(std::sync::Arc::ptr_eq(bodies[0], bodies[1]));
        assert!(std::sync::Arc::ptr_eq(bodies[2], bodies[3]));
        assert!(!std::sync::Arc::ptr_eq(bodies[1], bodies[2]));
    }

    #[test]
    fn a_bad_channel_row_is_a_load_error_naming_it() {
        let dir = TempDir::new("channel-bad");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        store
            .commit(&[StoreOp::Channel(channel(9, "Alice", &["Bob"], "x"))])
            .unwrap();
        raw(&store)
            .execute("UPDATE channel SET pending = 'Bob Carol\u{7}'", [])
            .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("channel row 9: pending \"Carol\\u{7}\""),
            "{err}"
        );
        for (sql, expected) in [
            (
                "UPDATE channel SET pending = '  '",
                "channel row 9: pending is empty",
            ),
            (
                "UPDATE channel SET pending = 'Bob'; INSERT INTO mail
                     (id, recipient, sender, channel, stored_at, msg_id, kind, body)
                     VALUES (9, 'Bob', 'Alice', 0, 1, 1, 2, x'01')",
                "channel row 9: id is also a mail row's",
            ),
            (
                "DELETE FROM mail WHERE id = 9; UPDATE channel SET left = 1.5",
                "channel row 9: left is Real(1.5), not an integer",
            ),
            (
                "UPDATE channel SET left = 2",
                "channel row 9: left is 2, not 0 to 1",
            ),
        ] {
            raw(&store).execute_batch(sql).unwrap();
            let err = store.load().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
        // A body too large to have come from us is refused when stored.
        let mut big = channel(10, "Alice", &["Bob"], "");
        big.body = vec![1; MAX_SEALED + 1].into();
        assert!(store.commit(&[StoreOp::Channel(big)]).is_err());
    }

    #[test]
    fn last_seen_is_kept_by_a_row_written_without_it_and_a_forgotten_name_is_gone() {
        let dir = TempDir::new("forget");
        let mut memory = MemoryStore::new();
        let mut store = SqliteStore::open(&dir.0).unwrap();
        let batches = [
            vec![
                client("Alice", "127.0.0.1:2000"),
                client("Bob", "127.0.0.1:3000"),
            ],
            // A row written without a time keeps the one it had.
            vec![StoreOp::Client(ClientRecord {
                seen_at: None,
                ..record("Alice", "127.0.0.1:2001")
            })],
            vec![StoreOp::Client(ClientRecord {
                seen_at: Some(1_800_000_000),
                ..record("Bob", "127.0.0.1:3000")
            })],
            vec![
                StoreOp::Forget(name("Alice")),
                StoreOp::Forget(name("Nobody")),
            ],
        ];
        for (i, ops) in batches.iter().enumerate() {
            store.commit(ops).unwrap();
            memory.commit(ops).unwrap();
            assert_eq!(
                store.load().unwrap(),
                memory.load().unwrap(),
                "after batch {i}"
            );
        }
        let loaded = store.load().unwrap();
        assert_eq!(
            loaded.clients,
            [ClientRecord {
                seen_at: Some(1_800_000_000),
                ..record("Bob", "127.0.0.1:3000")
            }]
        );
        // Its next registration is a new row, bound to whichever key comes.
        store.commit(&[client("Alice", "127.0.0.1:2002")]).unwrap();
        let names: Vec<String> = store
            .load()
            .unwrap()
            .clients
            .iter()
            .map(|c| c.name.to_string())
            .collect();
        assert_eq!(names, ["Bob", "Alice"]);
    }

    #[test]
    fn release_forgets_the_key_and_deletes_the_mailbox() {
        let dir = TempDir::new("release");
        let mut store = SqliteStore::open(&dir.0).unwrap();
        store
            .commit(&[
                client("Alice", "127.0.0.1:2000"),
                client("Bob", "127.0.0.1:3000"),
                put(mail(1, "Alice", "Bob", 1, "for Alice")),
                put(mail(2, "Alice", "Bob", 2, "also")),
                put(mail(3, "Bob", "Alice", 3, "for Bob")),
                StoreOp::Channel(channel(4, "Bob", &["Alice"], "to all")),
                StoreOp::Channel(channel(5, "Bob", &["Alice", "Carol"], "to all")),
            ])
            .unwrap();
        assert_eq!(store.release(&name("Alice")), Ok(4));
        // Alice's copies are gone, and the body nobody else is owed.
        let conn = raw(&store);
        let rows: Vec<(i64, i64)> = conn
            .prepare("SELECT id, left FROM channel")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [(5, 1)]);
        let loaded = store.load().unwrap();
        assert_eq!(loaded.clients[0].key, None);
        assert_eq!(loaded.clients[1].key, Some(key_of("Bob")));
        let ids: Vec<u64> = loaded.mail.iter().map(|m| m.mail.0).collect();
        assert_eq!(ids, [3, 5]);
        let err = store.release(&name("Nobody")).unwrap_err();
        assert!(err.to_string().contains("no client named Nobody"), "{err}");
        // The next registration binds the name to its key.
        store.commit(&[client("Alice", "127.0.0.1:2001")]).unwrap();
        assert_eq!(store.load().unwrap().clients[0].key, Some(key_of("Alice")));
    }
}
