//! Several udpchat servers on one PostgreSQL database (`--store URL
//! --advertise ADDR`): leases, the feed of changes, presence.
//!
//! - **Leases.** Each server holds a row of `servers` with a lease it
//!   renews every [`RENEW`]; a server whose lease ran out ([`LEASE`]) is
//!   dead to the others, who read the live list with each renewal and route
//!   names over it ([`crate::Server::set_servers`]). A server that finds its
//!   row taken (it was stuck past its lease and another started at its
//!   address) stops: its place was given away.
//! - **The feed.** Every commit of a server appends one row to `feed`
//!   naming what it wrote (mail, acks, registry rows, presence), in the
//!   same transaction. Feed numbers come from a one-row counter updated in
//!   that transaction, so committers take turns on its row lock and the
//!   numbers become visible in order, without gaps: a reader that has seen
//!   number n has seen everything before it. Each server reads the feed
//!   after its own commits and every [`NEWS_EVERY`](super::commits) while
//!   idle, fetches the rows named, and hands them to the core
//!   ([`crate::Server::handle_remote`]). Nothing is lost across a
//!   reconnection or a failover of the database: the feed is a table and
//!   the reader keeps its place in it (why not `LISTEN/NOTIFY`:
//!   notifications are not kept while a listener is disconnected, so a
//!   table to catch up from is needed anyway, and reading it costs one
//!   round trip).
//! - **Presence.** Who is online at which server, kept in `presence` for
//!   servers that start later; changes travel in the feed.
//!
//! A batch replayed after a lost COMMIT appends its feed row again: every
//! change applies idempotently, so a reader seeing it twice is harmless.
//!
//! ```sql
//! CREATE TABLE servers  (addr text PRIMARY KEY, instance integer NOT NULL,
//!                        lease_until timestamptz NOT NULL, cursor bigint NOT NULL);
//! CREATE SEQUENCE udpchat_instances;
//! CREATE TABLE feed_head (seq bigint NOT NULL);      -- one row
//! CREATE TABLE feed     (seq bigint PRIMARY KEY, origin text NOT NULL, entries bytea NOT NULL);
//! CREATE TABLE presence (name text PRIMARY KEY, server text NOT NULL,
//!                        addr text NOT NULL, online boolean NOT NULL);
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
use crate::store::{News, StoreOp};
use crate::wire::{MailId, Name};

/// How long a server's lease lasts past its last renewal: how long a
/// killed server's names keep being sent to it. Clients that find it
/// silent go round the others for longer than this (five tries, then
/// three more rounds) before they give up.
pub const LEASE: Duration = Duration::from_secs(6);

/// How often a server renews its lease (and reads who is live).
pub const RENEW: Duration = Duration::from_secs(1);

/// Feed rows read at once.
const FEED_PAGE: i64 = 512;

/// The tables of several servers (schema version 2).
pub const SCHEMA: &str = "
    CREATE TABLE servers (
        addr        text PRIMARY KEY,
        instance    integer NOT NULL,
        lease_until timestamptz NOT NULL,
        cursor      bigint NOT NULL
    );
    CREATE SEQUENCE udpchat_instances;
    CREATE TABLE feed_head (seq bigint NOT NULL);
    INSERT INTO feed_head (seq) VALUES (0);
    CREATE TABLE feed (
        seq     bigint PRIMARY KEY,
        origin  text NOT NULL,
        entries bytea NOT NULL
    );
    CREATE TABLE presence (
        name   text PRIMARY KEY,
        server text NOT NULL,
        addr   text NOT NULL,
        online boolean NOT NULL
    );";

// One statement, one round trip: the counter's row lock is held to the
// COMMIT, which is what keeps feed numbers in commit order.
pub(super) const FEED_APPEND: &str = "WITH h AS (UPDATE feed_head SET seq = seq + 1 RETURNING seq)
                                      INSERT INTO feed (seq, origin, entries)
                                      SELECT seq, $1, $2 FROM h";
pub(super) const FEED_READ: &str = "SELECT seq, origin, entries FROM feed
                                    WHERE seq > $1 ORDER BY seq LIMIT $2";
// An "offline" from a server the client already left does not undo its
// "online" at the next one.
pub(super) const PRESENCE: &str = "INSERT INTO presence (name, server, addr, online)
                                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[],
                                                        $4::boolean[])
                                   ON CONFLICT (name) DO UPDATE SET server = excluded.server,
                                       addr = excluded.addr, online = excluded.online
                                   WHERE excluded.online OR presence.server = excluded.server";

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
    },
}

/// This server's place among several.
#[derive(Debug)]
pub struct Member {
    /// Where clients reach it, as the others list it.
    pub me: SocketAddr,
    /// Its number, the low bits of its mail ids.
    pub instance: u16,
    /// The last feed row read.
    cursor: i64,
    /// When the lease was last renewed.
    renewed: Instant,
}

/// What a server learns when it joins: its number, who is live, who is
/// online where.
#[derive(Debug)]
pub struct Joined {
    /// The low bits of its mail ids ([`crate::ServerConfig::instance`]).
    pub instance: u16,
    /// Every live server, itself included.
    pub live: Vec<SocketAddr>,
    /// Clients online at the other live servers.
    pub presence: Vec<Remote>,
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
            StoreOp::Presence { name, addr, online } => Some(Entry::Presence {
                name: name.clone(),
                addr: *addr,
                online: *online,
            }),
            // Every server forgets names by the same rule, and rewrites
            // happen at start: nobody needs telling.
            StoreOp::Forget(_) | StoreOp::Rewrite { .. } => None,
        })
        .collect();
    (!entries.is_empty()).then(|| postcard::to_allocvec(&entries).unwrap_or_default())
}

/// The presence rows of a batch, the last per client: (names, servers,
/// addresses, online).
pub(super) type PresenceRows = (Vec<String>, Vec<String>, Vec<String>, Vec<bool>);

pub(super) fn presence_rows(ops: &[StoreOp], me: SocketAddr) -> Option<PresenceRows> {
    let mut last: HashMap<&Name, (SocketAddr, bool)> = HashMap::new();
    let mut order = Vec::new();
    for op in ops {
        if let StoreOp::Presence { name, addr, online } = op
            && last.insert(name, (*addr, *online)).is_none()
        {
            order.push(name);
        }
    }
    if order.is_empty() {
        return None;
    }
    let mut rows: PresenceRows = Default::default();
    for name in order {
        let (addr, online) = last[name];
        rows.0.push(name.as_str().to_string());
        rows.1.push(me.to_string());
        rows.2.push(addr.to_string());
        rows.3.push(online);
    }
    Some(rows)
}

impl PgStore {
    /// Joins the servers of this database as the one clients reach at
    /// `me`: takes a lease (waiting out the one a killed predecessor at
    /// the same address left, up to [`LEASE`]), a number, and the place in
    /// the feed to read from. Call it before [`Store::load`]: what is
    /// committed between the two is applied twice, which is harmless,
    /// rather than missed. Clients the previous server at `me` had online
    /// are marked offline for the others.
    ///
    /// [`Store::load`]: crate::store::Store::load
    pub fn join(&mut self, me: SocketAddr) -> Result<Joined, StoreError> {
        let deadline = Instant::now() + LEASE + RENEW;
        let me_text = me.to_string();
        loop {
            let attempt = self.with_retry(|client, p| {
                let mut tx = client.transaction()?;
                let instance: i64 = tx
                    .query_one("SELECT nextval('udpchat_instances')", &[])?
                    .get(0);
                // 16 bits: the low bits of mail ids. Two live servers share
                // them only 65,536 starts apart.
                let instance = i32::try_from((instance - 1).rem_euclid(1 << 16)).unwrap_or(0);
                let cursor: i64 = tx.query_one("SELECT seq FROM feed_head", &[])?.get(0);
                let lease = LEASE.as_secs_f64();
                let taken = tx.execute(
                    "INSERT INTO servers (addr, instance, lease_until, cursor)
                     VALUES ($1, $2, now() + make_interval(secs => $3), $4)
                     ON CONFLICT (addr) DO UPDATE SET instance = excluded.instance,
                         lease_until = excluded.lease_until, cursor = excluded.cursor
                     WHERE servers.lease_until < now()",
                    &[&me_text, &instance, &lease, &cursor],
                )?;
                if taken == 0 {
                    return Ok(None);
                }
                // Its predecessor's clients are not here any more.
                let gone = tx.query(
                    "UPDATE presence SET online = false WHERE server = $1 AND online
                     RETURNING name, addr",
                    &[&me_text],
                )?;
                let entries: Vec<Entry> = (gone.iter())
                    .filter_map(|r| {
                        let name = Name::new(r.get::<_, &str>(0)).ok()?;
                        let addr = r.get::<_, &str>(1).parse().ok()?;
                        Some(Entry::Presence {
                            name,
                            addr,
                            online: false,
                        })
                    })
                    .collect();
                if !entries.is_empty() {
                    let bytes = postcard::to_allocvec(&entries).unwrap_or_default();
                    tx.execute(&p.feed_append, &[&me_text, &bytes])?;
                }
                let live = live_servers(&mut tx)?;
                let presence = tx.query(
                    "SELECT p.name, p.addr, p.server FROM presence p
                     JOIN servers s ON s.addr = p.server
                     WHERE p.online AND s.lease_until > now() AND p.server <> $1",
                    &[&me_text],
                )?;
                tx.commit()?;
                let presence: Vec<Remote> = (presence.iter())
                    .filter_map(|r| {
                        Some(Remote::Presence {
                            name: Name::new(r.get::<_, &str>(0)).ok()?,
                            addr: r.get::<_, &str>(1).parse().ok()?,
                            online: true,
                            server: r.get::<_, &str>(2).parse().ok()?,
                        })
                    })
                    .collect();
                Ok(Some((instance, cursor, live, presence)))
            });
            match attempt {
                Ok(Some((instance, cursor, live, presence))) => {
                    let instance = u16::try_from(instance).unwrap_or(0);
                    self.member = Some(Member {
                        me,
                        instance,
                        cursor,
                        renewed: Instant::now(),
                    });
                    return Ok(Joined {
                        instance,
                        live,
                        presence,
                    });
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(RENEW / 4),
                Ok(None) => {
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
        let (me, instance, cursor) = (member.me, i32::from(member.instance), member.cursor);
        let me_text = me.to_string();
        let mut news = News::default();
        if member.renewed.elapsed() >= RENEW {
            let lease = LEASE.as_secs_f64();
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
                // Rows this server has not read, deleted while it was
                // taken for dead: what they said cannot be had again.
                let (head, oldest): (i64, Option<i64>) = {
                    let r = tx.query_one(
                        "SELECT (SELECT seq FROM feed_head), (SELECT min(seq) FROM feed)",
                        &[],
                    )?;
                    (r.get(0), r.get(1))
                };
                if cursor < head && oldest.is_none_or(|o| o > cursor + 1) {
                    return Ok(Renewal::Behind);
                }
                tx.execute(
                    "UPDATE servers SET lease_until = now() + make_interval(secs => $3),
                         cursor = $4
                     WHERE addr = $1 AND instance = $2",
                    &[&me_text, &instance, &lease, &cursor],
                )?;
                let live = live_servers(&mut tx)?;
                // Rows every live server has read are of no more use.
                tx.execute(
                    "DELETE FROM feed WHERE seq <= (SELECT min(cursor) FROM servers
                                                    WHERE lease_until > now())",
                    &[],
                )?;
                tx.commit()?;
                Ok(Renewal::Renewed { live, lapsed })
            })?;
            let stuck = LEASE.as_secs();
            match renewed {
                Renewal::TakenOver => {
                    return Err(io::Error::other(format!(
                        "{}: another server took this one's address while it was stuck (longer than {stuck} s); stopping",
                        self.describe(),
                    )));
                }
                Renewal::Behind => {
                    return Err(io::Error::other(format!(
                        "{}: this server was taken for dead (stuck longer than {stuck} s) and the others' changes since are gone; restart it",
                        self.describe(),
                    )));
                }
                Renewal::Renewed { live, lapsed } => {
                    news.live = Some(live);
                    news.rejoined = lapsed;
                }
            }
            if let Some(m) = &mut self.member {
                m.renewed = Instant::now();
            }
        }
        let rows =
            self.with_retry(|client, p| client.query(&p.feed_read, &[&cursor, &FEED_PAGE]))?;
        let Some(last) = rows.last().map(|r| r.get::<_, i64>(0)) else {
            return Ok(news);
        };
        let mut named: Vec<(SocketAddr, Entry)> = Vec::new();
        for row in &rows {
            let origin: &str = row.get(1);
            let Ok(origin) = origin.parse::<SocketAddr>() else {
                continue;
            };
            if origin == me {
                continue;
            }
            let bytes: &[u8] = row.get(2);
            // A row this build cannot read names nothing it can apply.
            if let Ok(entries) = postcard::from_bytes::<Vec<Entry>>(bytes) {
                named.extend(entries.into_iter().map(|e| (origin, e)));
            }
        }
        news.changes = self.resolve(named)?;
        if let Some(m) = &mut self.member {
            m.cursor = last;
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
        let (mail, channels, clients) = self.with_retry(|client, _| {
            let mut tx = client.transaction()?;
            tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")?;
            let mail = match mail_ids.is_empty() {
                true => Vec::new(),
                false => tx.query(
                    "SELECT id, recipient, sender, channel, stored_at, msg_id, kind, body,
                            sender_key
                     FROM mail WHERE id = ANY($1)",
                    &[&mail_ids],
                )?,
            };
            let channels = match channel_ids.is_empty() {
                true => Vec::new(),
                false => tx.query(
                    "SELECT id, sender, stored_at, msg_id, body, pending,
                            array(SELECT recipient FROM channel_acked WHERE mail = channel.id),
                            owed
                     FROM channel WHERE id = ANY($1)",
                    &[&channel_ids],
                )?,
            };
            let clients = match names.is_empty() {
                true => Vec::new(),
                false => tx.query(
                    "SELECT name, addr, key, last_seen FROM clients WHERE name = ANY($1)",
                    &[&names],
                )?,
            };
            tx.commit()?;
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
                Entry::Presence { name, addr, online } => Some(Remote::Presence {
                    name,
                    addr,
                    online,
                    server: origin,
                }),
            };
            changes.extend(change);
        }
        Ok(changes)
    }
}

/// What a lease renewal found.
enum Renewal {
    /// Renewed; `lapsed`: it had run out (the others took this server for
    /// dead meanwhile, and its clients for offline).
    Renewed { live: Vec<SocketAddr>, lapsed: bool },
    /// Another server holds this one's address now.
    TakenOver,
    /// Feed rows this server never read are deleted.
    Behind,
}

/// Every server whose lease is current.
fn live_servers(tx: &mut postgres::Transaction<'_>) -> Result<Vec<SocketAddr>, postgres::Error> {
    let rows = tx.query("SELECT addr FROM servers WHERE lease_until > now()", &[])?;
    Ok((rows.iter())
        .filter_map(|r| r.get::<_, &str>(0).parse().ok())
        .collect())
}
