//! Several udpchat servers on one PostgreSQL database (`--store URL
//! --advertise ADDR`): leases, the feed of changes, presence.
//!
//! - **Leases.** Each server holds a row of `servers` with a lease it
//!   renews every [`RENEW`]; a server whose lease ran out ([`LEASE`]) is
//!   dead to the others, who read the live list with each renewal and route
//!   names over it ([`crate::Server::set_servers`]).
//! - **The feed.** Every commit of a server appends one row to `feed`
//!   naming what it wrote (mail, acks, registry rows, presence), in the
//!   same transaction, numbered in that server's own sequence (its
//!   *origin*, one per server start). A server commits one batch at a
//!   time, so its rows become visible in its order; a number is skipped
//!   only after a commit whose outcome stayed unknown, and nothing of that
//!   origin can appear below a number already seen. Servers never wait on
//!   each other to commit. The same transaction rings a doorbell,
//!   `NOTIFY` on `udpchat_feed` (delivered at COMMIT, once per
//!   transaction); every server `LISTEN`s on its connection and, when
//!   another's ring comes in (or on a new connection, which may have
//!   missed some), reads every other origin on from where it stopped,
//!   reads the rows the entries name (as they are then: a message acked
//!   meanwhile is simply gone) and hands them to the core
//!   ([`crate::Server::handle_remote`]). The doorbell is only that: nothing
//!   is lost across a reconnection or a failover of the database, because
//!   the feed is a table and the reader keeps its place in it
//!   (notifications are not kept while a listener is disconnected), and a
//!   server reads it at least every quarter second anyway. Rows are kept
//!   [`FEED_KEEP`]; a server that has not read for half of that stops
//!   rather than serve from what it may have missed.
//! - **Presence.** Who is online at which server, with the name's epoch
//!   (its registrations counted: the newer claim wins, between servers
//!   that have no common order), kept in `presence` for servers that
//!   start later; changes travel in the feed.
//!
//! A batch replayed after a lost COMMIT writes its feed row under the same
//! number, which the database keeps once.
//!
//! ```sql
//! CREATE TABLE servers  (addr text PRIMARY KEY, instance integer NOT NULL,
//!                        origin text NOT NULL, lease_until timestamptz NOT NULL,
//!                        key bytea NOT NULL);            -- the server's public key
//! CREATE SEQUENCE udpchat_instances;
//! CREATE TABLE origins  (origin text PRIMARY KEY);     -- "addr#start"
//! CREATE TABLE feed     (origin text, seq bigint, at timestamptz DEFAULT now(),
//!                        entries bytea NOT NULL, PRIMARY KEY (origin, seq));
//! CREATE TABLE presence (name text PRIMARY KEY, server text NOT NULL, addr text NOT NULL,
//!                        online boolean NOT NULL, epoch bigint NOT NULL);
//! ```

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::postgres::{PgStore, mail_row};
use super::rows;
use super::sqlite::StoreError;
use crate::Remote;
use crate::crypto::PublicKey;
use crate::store::{News, StoreOp, StoredMail};
use crate::wire::{MailId, Name};

/// How long a server's lease lasts past its last renewal: how long a
/// killed server's names keep being sent to it. Clients that find it
/// silent go round the others for longer than this (five tries, then
/// three more rounds) before they give up.
pub const LEASE: Duration = Duration::from_secs(6);

/// How often a server renews its lease (and reads who is live).
pub const RENEW: Duration = Duration::from_secs(1);

/// How long feed rows are kept. A server that has not read the feed for
/// half of it (stuck) stops: it may have missed rows.
pub const FEED_KEEP: Duration = Duration::from_secs(600);

/// How often a server deletes feed rows past [`FEED_KEEP`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The lock a joining server holds while it picks its instance number.
const JOIN_LOCK: i64 = 0x7564_7064;

/// Feed rows read at once, per origin.
const FEED_PAGE: i64 = 512;

/// The tables of several servers (schema version 2).
pub const SCHEMA: &str = "
    CREATE TABLE servers (
        addr        text PRIMARY KEY,
        instance    integer NOT NULL,
        origin      text NOT NULL,
        lease_until timestamptz NOT NULL,
        key         bytea NOT NULL
    );
    CREATE SEQUENCE udpchat_instances;
    CREATE TABLE origins (origin text PRIMARY KEY);
    CREATE TABLE feed (
        origin  text NOT NULL,
        seq     bigint NOT NULL,
        at      timestamptz NOT NULL DEFAULT now(),
        entries bytea NOT NULL,
        PRIMARY KEY (origin, seq)
    );
    CREATE INDEX feed_at ON feed (at);
    CREATE TABLE presence (
        name   text PRIMARY KEY,
        server text NOT NULL,
        addr   text NOT NULL,
        online boolean NOT NULL,
        epoch  bigint NOT NULL
    );";

// Written again by a replay after a lost COMMIT: kept once.
// With the doorbell ([`FEED_CHANNEL`]), sent when the transaction commits
// (one per transaction, however many rows: the database folds repeats).
pub(super) const FEED_APPEND: &str = "WITH appended AS (INSERT INTO feed (origin, seq, entries)
                                                      VALUES ($1, $2, $3) ON CONFLICT DO NOTHING)
                                      SELECT pg_notify('udpchat_feed', $1)";
/// The `LISTEN/NOTIFY` channel every commit with a feed row rings, its
/// origin as the payload: a doorbell, not the feed (notifications are
/// lost while a listener is disconnected, the feed table is not).
pub(super) const FEED_CHANNEL: &str = "udpchat_feed";
// Every other origin from where this reader stopped (0 for one it has not
// seen), by the primary key's index.
pub(super) const FEED_READ: &str = "SELECT o.origin, f.seq, f.entries
                                    FROM origins o
                                    LEFT JOIN unnest($1::text[], $2::bigint[]) AS c (origin, seq)
                                        ON c.origin = o.origin
                                    CROSS JOIN LATERAL (
                                        SELECT seq, entries FROM feed
                                        WHERE feed.origin = o.origin
                                          AND feed.seq > coalesce(c.seq, 0)
                                        ORDER BY seq LIMIT $4) f
                                    WHERE o.origin <> $3
                                    ORDER BY o.origin, f.seq";
// The newer claim (epoch, then server, byte order) wins; a server's
// "gone" counts for its own claim.
pub(super) const PRESENCE: &str = "INSERT INTO presence (name, server, addr, online, epoch)
                                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[],
                                                        $4::boolean[], $5::bigint[])
                                   ON CONFLICT (name) DO UPDATE SET server = excluded.server,
                                       addr = excluded.addr, online = excluded.online,
                                       epoch = excluded.epoch
                                   WHERE (excluded.epoch, excluded.server COLLATE \"C\")
                                       >= (presence.epoch, presence.server COLLATE \"C\")";

pub(super) const RESOLVE_MAIL: &str =
    "SELECT id, recipient, sender, channel, stored_at, msg_id, kind, body, sender_key
     FROM mail WHERE id = ANY($1)";
pub(super) const RESOLVE_CHANNEL: &str = "SELECT id, sender, stored_at, msg_id, body, pending,
            array(SELECT recipient FROM channel_acked WHERE mail = channel.id), owed
     FROM channel WHERE id = ANY($1)";
// A mailbox's mail, by the (recipient, sender, msg_id) key's index.
pub(super) const MAILBOX_MAIL: &str =
    "SELECT id, recipient, sender, channel, stored_at, msg_id, kind, body, sender_key
     FROM mail WHERE recipient = ANY($1) ORDER BY id";
// The channel messages still pending for any of them, by `channel_pending`.
pub(super) const MAILBOX_CHANNEL: &str = "SELECT id, sender, stored_at, msg_id, body, pending,
            array(SELECT recipient FROM channel_acked WHERE mail = channel.id), owed
     FROM channel WHERE pending && $1::text[] ORDER BY id";
/// What schema version 3 adds: an index to find the channel messages
/// pending for a name (a mailbox fetched when its client registers), and
/// a channel message's (sender, message id) as a key, so that one sent
/// again through a second server is stored once (as a direct message's
/// (recipient, sender, message id) always was).
pub const SCHEMA_3: &str = "CREATE INDEX channel_pending ON channel USING GIN (pending);
    CREATE UNIQUE INDEX channel_message ON channel (sender, msg_id);";
pub(super) const RESOLVE_CLIENTS: &str =
    "SELECT name, addr, key, last_seen FROM clients WHERE name = ANY($1)";

/// One change named in a feed row; the rows it names are read from their
/// tables (a message acked meanwhile is simply gone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Entry {
    Put {
        to: Name,
        mail: MailId,
    },
    Channel {
        mail: MailId,
    },
    Delete {
        to: Name,
        mail: MailId,
    },
    Client {
        name: Name,
    },
    Presence {
        name: Name,
        addr: SocketAddr,
        online: bool,
        epoch: u64,
    },
}

/// This server's place among several.
#[derive(Debug)]
pub struct Member {
    /// Where clients reach it, as the others list it.
    pub me: SocketAddr,
    /// Its number, the low bits of its mail ids.
    pub instance: u16,
    /// Its feed rows' origin (`addr#start`) and the next row's number.
    pub(super) origin: String,
    pub(super) next_seq: i64,
    /// The last row read of each other origin.
    cursors: HashMap<String, i64>,
    /// When the lease was last renewed, the feed last read, old rows last
    /// deleted.
    renewed: Instant,
    read: Instant,
    pruned: Instant,
}

/// What a server learns when it joins: its number, who is live, who is
/// online where.
#[derive(Debug)]
pub struct Joined {
    /// The low bits of its mail ids ([`crate::ServerConfig::instance`]).
    pub instance: u16,
    /// Every live server, itself included.
    pub live: Vec<SocketAddr>,
    /// Every name's latest claim (online at a live server, or gone).
    pub presence: Vec<Remote>,
}

/// A feed row naming channel messages by the ids the store keeps them
/// under: a retry's row names its own id, which the store did not keep,
/// but the kept row may have gained recipients (see `PUT_CHANNEL`) whose
/// servers must hear of them.
pub(super) fn channel_entries(ids: &[MailId]) -> Option<Vec<u8>> {
    encode(
        &(ids.iter())
            .map(|&mail| Entry::Channel { mail })
            .collect::<Vec<_>>(),
    )
}

/// A feed row's bytes (`None`: nothing to tell).
fn encode(entries: &[Entry]) -> Option<Vec<u8>> {
    (!entries.is_empty()).then(|| postcard::to_allocvec(entries).unwrap_or_default())
}

/// The feed row of a batch: what it changed that the others must know
/// (`None`: nothing, e.g. a rewrite at start).
pub(super) fn feed_entries(ops: &[StoreOp]) -> Option<Vec<u8>> {
    let entries: Vec<Entry> = (ops.iter())
        .filter_map(|op| match op {
            StoreOp::Put(m) => Some(Entry::Put {
                to: m.to.clone(),
                mail: m.mail,
            }),
            StoreOp::Channel(c) => Some(Entry::Channel { mail: c.mail }),
            StoreOp::Delete { to, mail } => Some(Entry::Delete {
                to: to.clone(),
                mail: *mail,
            }),
            StoreOp::Client(c) => Some(Entry::Client {
                name: c.name.clone(),
            }),
            StoreOp::Presence {
                name,
                addr,
                online,
                epoch,
            } => Some(Entry::Presence {
                name: name.clone(),
                addr: *addr,
                online: *online,
                epoch: *epoch,
            }),
            // Every server forgets names by the same rule, and rewrites
            // happen at start: nobody needs telling.
            StoreOp::Forget(_) | StoreOp::Rewrite { .. } => None,
        })
        .collect();
    encode(&entries)
}

/// The presence rows of a batch, the last per client: (names, servers,
/// addresses, online, epochs).
pub(super) type PresenceRows = (Vec<String>, Vec<String>, Vec<String>, Vec<bool>, Vec<i64>);

pub(super) fn presence_rows(ops: &[StoreOp], me: SocketAddr) -> Option<PresenceRows> {
    let mut last: HashMap<&Name, (SocketAddr, bool, u64)> = HashMap::new();
    let mut order = Vec::new();
    for op in ops {
        if let StoreOp::Presence {
            name,
            addr,
            online,
            epoch,
        } = op
            && last.insert(name, (*addr, *online, *epoch)).is_none()
        {
            order.push(name);
        }
    }
    if order.is_empty() {
        return None;
    }
    let mut rows: PresenceRows = Default::default();
    for name in order {
        let (addr, online, epoch) = last[name];
        rows.0.push(name.as_str().to_string());
        rows.1.push(me.to_string());
        rows.2.push(addr.to_string());
        rows.3.push(online);
        rows.4.push(i64::try_from(epoch).unwrap_or(i64::MAX));
    }
    Some(rows)
}

/// For each message of `ops` the store holds under another id (another
/// server stored the same message first): our id, and the row kept (a
/// channel message's, one per recipient).
pub(super) fn kept_instead(
    store: &mut PgStore,
    ops: &[StoreOp],
) -> io::Result<Vec<(MailId, StoredMail)>> {
    let (mut to, mut from, mut msg, mut ours) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut c_from, mut c_msg, mut c_ours) = (Vec::new(), Vec::new(), Vec::new());
    // Each channel message's recipients, by this server's id.
    let mut recipients: HashMap<i64, HashSet<&Name>> = HashMap::new();
    for op in ops {
        match op {
            StoreOp::Put(m) => {
                to.push(m.to.as_str().to_string());
                from.push(m.from.as_str().to_string());
                msg.push(m.id.0.cast_signed());
                ours.push(m.mail.0.cast_signed());
            }
            StoreOp::Channel(c) => {
                c_from.push(c.from.as_str().to_string());
                c_msg.push(c.id.0.cast_signed());
                c_ours.push(c.mail.0.cast_signed());
                recipients.insert(c.mail.0.cast_signed(), c.to.iter().collect());
            }
            _ => {}
        }
    }
    let (rows, channels) = store.with_retry(|client, _| {
        let rows = client.query(
            "SELECT m.id, m.recipient, m.sender, m.channel, m.stored_at, m.msg_id, m.kind,
                    m.body, m.sender_key, o.id
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                  AS o (recipient, sender, msg_id, id)
             JOIN mail m ON m.recipient = o.recipient AND m.sender = o.sender
                        AND m.msg_id = o.msg_id
             WHERE m.id <> o.id",
            &[&to, &from, &msg, &ours],
        )?;
        let channels = match c_ours.is_empty() {
            true => Vec::new(),
            false => client.query(
                "SELECT c.id, c.sender, c.stored_at, c.msg_id, c.body, c.pending,
                        array(SELECT recipient FROM channel_acked WHERE mail = c.id), c.owed,
                        o.id
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS o (sender, msg_id, id)
                 JOIN channel c ON c.sender = o.sender AND c.msg_id = o.msg_id
                 WHERE c.id <> o.id",
                &[&c_from, &c_msg, &c_ours],
            )?,
        };
        Ok((rows, channels))
    })?;
    let mut kept: Vec<(MailId, StoredMail)> = (rows.iter())
        .filter_map(|r| {
            let ours = MailId(r.get::<_, i64>(9).cast_unsigned());
            Some((ours, mail_row(r).ok()?))
        })
        .collect();
    // A channel message: the store's copies for the recipients this
    // server stored it for (one who is not owed the store's, acked or
    // not among its recipients, has none).
    for r in &channels {
        let ours: i64 = r.get(8);
        let owed: i32 = r.get(7);
        let Ok(theirs) = rows::channel(rows::ChannelColumns {
            id: r.get(0),
            from: r.get(1),
            stored_at: r.get(2),
            msg_id: r.get(3),
            body: r.get(4),
            pending: r.get(5),
            acked: r.get(6),
            left: i64::from(owed),
        }) else {
            continue;
        };
        let Some(wanted) = recipients.get(&ours) else {
            continue;
        };
        kept.extend(
            (theirs.copies())
                .filter(|m| wanted.contains(&m.to))
                .map(|m| (MailId(ours.cast_unsigned()), m)),
        );
    }
    Ok(kept)
}

/// The server of an origin (`addr#start`).
fn server_of(origin: &str) -> Option<SocketAddr> {
    origin.split('#').next()?.parse().ok()
}

impl PgStore {
    /// Joins the servers of this database as the one clients reach at
    /// `me`: takes a lease (waiting out the one a killed predecessor at
    /// the same address left, up to [`LEASE`]), a number, an origin for
    /// its feed rows and the place in the others' to read from. Call it
    /// before [`Store::load`]: what is committed between the two is
    /// applied twice, which is harmless, rather than missed. Clients the
    /// previous server at `me` had online are marked gone for the others.
    ///
    /// [`Store::load`]: crate::store::Store::load
    pub fn join(&mut self, me: SocketAddr, key: &PublicKey) -> Result<Joined, StoreError> {
        let deadline = Instant::now() + LEASE + RENEW;
        let me_text = me.to_string();
        let key_bytes = key.0.to_vec();
        loop {
            let attempt = self.with_retry(|client, p| {
                let mut tx = client.transaction()?;
                // One join at a time: the instance number is chosen among
                // the live servers' and must not be chosen twice.
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&JOIN_LOCK])?;
                let others = tx.query(
                    "SELECT addr, key FROM servers WHERE lease_until > now() AND key <> $1",
                    &[&key_bytes],
                )?;
                if let Some(other) = others.first() {
                    return Ok(Err(other.get::<_, String>(0)));
                }
                let start: i64 = tx
                    .query_one("SELECT nextval('udpchat_instances')", &[])?
                    .get(0);
                // 16 bits: the low bits of mail ids. Never one a live
                // server has: the next free one from the sequence's.
                let used: HashSet<i32> = (tx
                    .query(
                        "SELECT instance FROM servers WHERE lease_until > now() AND addr <> $1",
                        &[&me_text],
                    )?
                    .iter())
                .map(|r| r.get(0))
                .collect();
                let instance = (0..1 << 16)
                    .map(|i| i32::try_from((start - 1 + i).rem_euclid(1 << 16)).unwrap_or(0))
                    .find(|i| !used.contains(i))
                    .unwrap_or(0);
                let origin = format!("{me_text}#{start}");
                let lease = LEASE.as_secs_f64();
                let taken = tx.execute(
                    "INSERT INTO servers (addr, instance, origin, lease_until, key)
                     VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5)
                     ON CONFLICT (addr) DO UPDATE SET instance = excluded.instance,
                         origin = excluded.origin, lease_until = excluded.lease_until,
                         key = excluded.key
                     WHERE servers.lease_until < now()",
                    &[&me_text, &instance, &origin, &lease, &key_bytes],
                )?;
                if taken == 0 {
                    return Ok(Ok(None));
                }
                tx.execute("INSERT INTO origins (origin) VALUES ($1)", &[&origin])?;
                let cursors: HashMap<String, i64> = (tx
                    .query("SELECT origin, max(seq) FROM feed GROUP BY origin", &[])?
                    .iter())
                .map(|r| (r.get(0), r.get(1)))
                .collect();
                // Its predecessor's clients are not here any more.
                let gone = tx.query(
                    "UPDATE presence SET online = false WHERE server = $1 AND online
                     RETURNING name, addr, epoch",
                    &[&me_text],
                )?;
                let entries: Vec<Entry> = (gone.iter())
                    .filter_map(|r| {
                        Some(Entry::Presence {
                            name: Name::new(r.get::<_, &str>(0)).ok()?,
                            addr: r.get::<_, &str>(1).parse().ok()?,
                            online: false,
                            epoch: u64::try_from(r.get::<_, i64>(2)).ok()?,
                        })
                    })
                    .collect();
                let mut next_seq = 1;
                if !entries.is_empty() {
                    let bytes = postcard::to_allocvec(&entries).unwrap_or_default();
                    tx.execute(&p.feed_append, &[&origin, &next_seq, &bytes])?;
                    next_seq += 1;
                }
                let live = live_servers(&mut tx)?;
                let presence = tx.query(
                    "SELECT p.name, p.addr, p.server, p.epoch,
                            p.online AND coalesce(s.lease_until > now(), false)
                     FROM presence p LEFT JOIN servers s ON s.addr = p.server",
                    &[],
                )?;
                tx.commit()?;
                let presence: Vec<Remote> = (presence.iter())
                    .filter_map(|r| {
                        Some(Remote::Presence {
                            name: Name::new(r.get::<_, &str>(0)).ok()?,
                            addr: r.get::<_, &str>(1).parse().ok()?,
                            server: r.get::<_, &str>(2).parse().ok()?,
                            epoch: u64::try_from(r.get::<_, i64>(3)).ok()?,
                            online: r.get(4),
                        })
                    })
                    .collect();
                Ok(Ok(Some((
                    instance, origin, next_seq, cursors, live, presence,
                ))))
            });
            match attempt {
                Ok(Err(other)) => {
                    return Err(StoreError(format!(
                        "{}: this server's key is not the one the servers already running have (e.g. {other}): give every server of the cluster the same server.key",
                        self.describe()
                    )));
                }
                Ok(Ok(Some((instance, origin, next_seq, cursors, live, presence)))) => {
                    let instance = u16::try_from(instance).unwrap_or(0);
                    let now = Instant::now();
                    self.member = Some(Member {
                        me,
                        instance,
                        origin,
                        next_seq,
                        cursors,
                        renewed: now,
                        read: now,
                        pruned: now,
                    });
                    return Ok(Joined {
                        instance,
                        live,
                        presence,
                    });
                }
                Ok(Ok(None)) if Instant::now() < deadline => std::thread::sleep(RENEW / 4),
                Ok(Ok(None)) => {
                    return Err(StoreError(format!(
                        "{}: another server with --advertise {me} is running",
                        self.describe()
                    )));
                }
                Err(e) => return Err(StoreError(e.to_string())),
            }
        }
    }

    /// The servers of a cluster running on this database now: a server
    /// without `--advertise` refuses to start beside them (it would not
    /// hear of their writes, nor they of its).
    pub fn cluster_running(&mut self) -> Result<Vec<SocketAddr>, StoreError> {
        self.with_retry(|client, _| {
            let mut tx = client.transaction()?;
            let live = live_servers(&mut tx)?;
            tx.commit()?;
            Ok(live)
        })
        .map_err(|e| StoreError(e.to_string()))
    }

    /// [`crate::store::Store::news`] of a member: the lease renewed when
    /// due, then the feed read on from where it stopped.
    pub(super) fn news_now(&mut self) -> io::Result<News> {
        let Some(member) = &self.member else {
            return Ok(News::default());
        };
        let stuck = LEASE.as_secs();
        if member.read.elapsed() > FEED_KEEP / 2 {
            return Err(io::Error::other(format!(
                "{}: this server has not read the others' changes for {} s (stuck, taken for dead); restart it",
                self.describe(),
                member.read.elapsed().as_secs()
            )));
        }
        let (me, instance) = (member.me, i32::from(member.instance));
        let origin = member.origin.clone();
        let prune = member.pruned.elapsed() >= PRUNE_EVERY;
        let me_text = me.to_string();
        let mut news = News::default();
        if member.renewed.elapsed() >= RENEW {
            let lease = LEASE.as_secs_f64();
            let keep = FEED_KEEP.as_secs_f64();
            let renewed = self.with_retry(|client, _| {
                let mut tx = client.transaction()?;
                // Ours still, and had it run out (the others took this
                // server for dead meanwhile)?
                let lapsed: Option<bool> = tx
                    .query_opt(
                        "SELECT lease_until < now() FROM servers
                         WHERE addr = $1 AND instance = $2 FOR UPDATE",
                        &[&me_text, &instance],
                    )?
                    .map(|r| r.get(0));
                let Some(lapsed) = lapsed else {
                    return Ok(Renewal::TakenOver);
                };
                tx.execute(
                    "UPDATE servers SET lease_until = now() + make_interval(secs => $3)
                     WHERE addr = $1 AND instance = $2",
                    &[&me_text, &instance, &lease],
                )?;
                let live = live_servers(&mut tx)?;
                let mut origins = None;
                if prune {
                    tx.execute(
                        "DELETE FROM feed WHERE at < now() - make_interval(secs => $1)",
                        &[&keep],
                    )?;
                    tx.execute(
                        "DELETE FROM origins o
                         WHERE NOT EXISTS (SELECT 1 FROM feed f WHERE f.origin = o.origin)
                           AND NOT EXISTS (SELECT 1 FROM servers s WHERE s.origin = o.origin
                                                                    AND s.lease_until > now())",
                        &[],
                    )?;
                    origins = Some(
                        (tx.query("SELECT origin FROM origins", &[])?.iter())
                            .map(|r| r.get::<_, String>(0))
                            .collect::<HashSet<String>>(),
                    );
                }
                // Deleted with the others' while this one was taken for
                // dead: listed again, so its rows are read.
                tx.execute(
                    "INSERT INTO origins (origin) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&origin],
                )?;
                tx.commit()?;
                Ok(Renewal::Renewed {
                    live,
                    lapsed,
                    origins,
                })
            })?;
            match renewed {
                Renewal::TakenOver => {
                    return Err(io::Error::other(format!(
                        "{}: another server took this one's address while it was stuck (longer than {stuck} s); stopping",
                        self.describe(),
                    )));
                }
                Renewal::Renewed {
                    live,
                    lapsed,
                    origins,
                } => {
                    news.live = Some(live);
                    news.rejoined = lapsed;
                    if let Some(m) = &mut self.member {
                        m.renewed = Instant::now();
                        if let Some(origins) = origins {
                            // Places kept only in origins still listed.
                            m.cursors.retain(|o, _| origins.contains(o));
                            m.pruned = Instant::now();
                        }
                    }
                }
            }
        }
        // The feed's rows and the rows they name are read on one
        // connection, or the read counts for nothing: after a failover the
        // new primary may lack rows the old one showed (a COMMIT is visible
        // there before a standby has it) until their batch is replayed,
        // under the same feed number, so a row must not be passed over on
        // the strength of a half-read.
        let connection = self.connections;
        let (origins, seqs): (Vec<String>, Vec<i64>) = match &self.member {
            Some(m) => m.cursors.iter().map(|(o, s)| (o.clone(), *s)).unzip(),
            None => return Ok(news),
        };
        let rows = self.with_retry(|client, p| {
            client.query(&p.feed_read, &[&origins, &seqs, &origin, &FEED_PAGE])
        })?;
        if self.connections != connection {
            // Read on a new connection after all: again next time.
            return Ok(news);
        }
        let mut named: Vec<(SocketAddr, Entry)> = Vec::new();
        let mut read: HashMap<String, i64> = HashMap::new();
        for row in &rows {
            let from: String = row.get(0);
            let seq: i64 = row.get(1);
            let place = read.entry(from.clone()).or_insert(seq);
            *place = (*place).max(seq);
            let Some(server) = server_of(&from) else {
                continue;
            };
            let bytes: &[u8] = row.get(2);
            // A row this build cannot read names nothing it can apply.
            if let Ok(entries) = postcard::from_bytes::<Vec<Entry>>(bytes) {
                named.extend(entries.into_iter().map(|e| (server, e)));
            }
        }
        let changes = self.resolve(named)?;
        if self.connections != connection {
            // The rows they name were read on another connection: the
            // entries again next time.
            return Ok(news);
        }
        news.changes = changes;
        // A full page: more to read, doorbell or not.
        self.rung |= rows.len() >= FEED_PAGE as usize;
        if let Some(m) = &mut self.member {
            m.read = Instant::now();
            m.cursors.extend(read);
        }
        Ok(news)
    }

    /// The rows the entries name, as changes for the core, in order.
    fn resolve(&mut self, named: Vec<(SocketAddr, Entry)>) -> io::Result<Vec<Remote>> {
        let mut mail_ids = HashSet::new();
        let mut channel_ids = HashSet::new();
        let mut names = HashSet::new();
        for (_, e) in &named {
            match e {
                Entry::Put { mail, .. } => {
                    mail_ids.insert(mail.0.cast_signed());
                }
                Entry::Channel { mail } => {
                    channel_ids.insert(mail.0.cast_signed());
                }
                Entry::Client { name } => {
                    names.insert(name.as_str().to_string());
                }
                Entry::Delete { .. } | Entry::Presence { .. } => {}
            }
        }
        let (mail_ids, channel_ids, names): (Vec<i64>, Vec<i64>, Vec<String>) = (
            mail_ids.into_iter().collect(),
            channel_ids.into_iter().collect(),
            names.into_iter().collect(),
        );
        // Each kind in one statement, prepared once per connection; no
        // common snapshot is needed (each row is read as it is now).
        let (mail, channels, clients) = self.with_retry(|client, p| {
            let mail = match mail_ids.is_empty() {
                true => Vec::new(),
                false => client.query(&p.resolve_mail, &[&mail_ids])?,
            };
            let channels = match channel_ids.is_empty() {
                true => Vec::new(),
                false => client.query(&p.resolve_channel, &[&channel_ids])?,
            };
            let clients = match names.is_empty() {
                true => Vec::new(),
                false => client.query(&p.resolve_clients, &[&names])?,
            };
            Ok((mail, channels, clients))
        })?;
        // Rows that no longer decode are skipped, as a fetch skips them.
        let mut mail: HashMap<(MailId, Name), _> = (mail.iter())
            .filter_map(|r| mail_row(r).ok())
            .map(|m| ((m.mail, m.to.clone()), m))
            .collect();
        let mut channels: HashMap<MailId, _> = (channels.iter())
            .filter_map(|r| {
                let owed: i32 = r.get(7);
                rows::channel(rows::ChannelColumns {
                    id: r.get(0),
                    from: r.get(1),
                    stored_at: r.get(2),
                    msg_id: r.get(3),
                    body: r.get(4),
                    pending: r.get(5),
                    acked: r.get(6),
                    left: i64::from(owed),
                })
                .ok()
            })
            .map(|c| (c.mail, c))
            .collect();
        let mut clients: HashMap<String, _> = (clients.iter())
            .filter_map(|r| {
                let key: Option<Vec<u8>> = r.get(2);
                let c = rows::client(r.get(0), r.get(1), key.as_deref(), r.get(3)).ok()?;
                Some((c.name.as_str().to_string(), c))
            })
            .collect();
        let mut changes = Vec::new();
        for (origin, e) in named {
            let change = match e {
                Entry::Put { to, mail: id } => mail.remove(&(id, to)).map(Remote::Mail),
                Entry::Channel { mail: id } => channels.remove(&id).map(Remote::Channel),
                Entry::Delete { to, mail } => Some(Remote::Deleted { to, mail }),
                Entry::Client { name } => clients.remove(name.as_str()).map(Remote::Client),
                Entry::Presence {
                    name,
                    addr,
                    online,
                    epoch,
                } => Some(Remote::Presence {
                    name,
                    addr,
                    online,
                    server: origin,
                    epoch,
                }),
            };
            changes.extend(change);
        }
        Ok(changes)
    }
}

impl PgStore {
    /// [`crate::store::Store::mailboxes`]: every message stored for
    /// `names`, in store order (rows that no longer decode are skipped, as
    /// a fetch skips them).
    pub(super) fn mailboxes_now(&mut self, names: &[Name]) -> io::Result<Vec<StoredMail>> {
        let names: Vec<&str> = names.iter().map(Name::as_str).collect();
        let (mail, channels) = self.with_retry(|client, p| {
            let mail = client.query(&p.mailbox_mail, &[&names])?;
            let channels = client.query(&p.mailbox_channel, &[&names])?;
            Ok((mail, channels))
        })?;
        let wanted: HashSet<&str> = names.iter().copied().collect();
        let mut found: Vec<StoredMail> = (mail.iter())
            .filter_map(|r| mail_row(r).ok())
            .filter(|m| wanted.contains(m.to.as_str()))
            .collect();
        for r in &channels {
            let owed: i32 = r.get(7);
            let Ok(c) = rows::channel(rows::ChannelColumns {
                id: r.get(0),
                from: r.get(1),
                stored_at: r.get(2),
                msg_id: r.get(3),
                body: r.get(4),
                pending: r.get(5),
                acked: r.get(6),
                left: i64::from(owed),
            }) else {
                continue;
            };
            found.extend(c.copies().filter(|m| wanted.contains(m.to.as_str())));
        }
        // Store order, a channel message's copies by name (as every
        // store gives them).
        found.sort_by(|a, b| (a.mail, &a.to).cmp(&(b.mail, &b.to)));
        Ok(found)
    }
}

/// What a lease renewal found.
enum Renewal {
    /// Renewed; `lapsed`: it had run out (the others took this server for
    /// dead meanwhile, and its clients for offline); `origins`: every
    /// origin listed, when old rows were deleted.
    Renewed {
        live: Vec<SocketAddr>,
        lapsed: bool,
        origins: Option<HashSet<String>>,
    },
    /// Another server holds this one's address now.
    TakenOver,
}

/// Every server whose lease is current.
fn live_servers(tx: &mut postgres::Transaction<'_>) -> Result<Vec<SocketAddr>, postgres::Error> {
    let rows = tx.query("SELECT addr FROM servers WHERE lease_until > now()", &[])?;
    Ok((rows.iter())
        .filter_map(|r| r.get::<_, &str>(0).parse().ok())
        .collect())
}
