//! The server's durable side, as data: the [`Server`](crate::Server) emits
//! [`StoreOp`]s and is told when they are committed; a [`Store`] carries them
//! out. The server's own memory is the working copy of everything but
//! committed bodies, so the core never waits on a commit: it only holds
//! back its acks until the driver reports it (group commit: one
//! transaction per loop iteration). Bodies are read back on demand
//! ([`Store::fetch`], [`serve_fetches`]) when a delivery needs one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::crypto::{self, Keypair, PublicKey, ServerSecrets};
use crate::wire::{self, MailBody, MailId, MsgId, Name, Text};

/// A message kept for a recipient until it acked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMail {
    /// Store-order id (increasing across all mailboxes).
    pub mail: MailId,
    /// The recipient.
    pub to: Name,
    /// The sender.
    pub from: Name,
    /// A channel message (`send_all`) rather than a direct one.
    pub channel: bool,
    /// When the server stored it, Unix seconds.
    pub stored_at: i64,
    /// The sender's message id: (to, from, id) is unique in the store.
    pub id: MsgId,
    /// The message, never in clear text once the server has started.
    pub body: Body,
}

/// A stored message's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A direct message sealed by its sender to the recipient's key: the
    /// server cannot read or alter it. `key` is the sender's static key
    /// when it was stored.
    Sealed {
        /// The sender's key.
        key: PublicKey,
        /// The sealed [`crate::wire::MailBody`].
        sealed: Vec<u8>,
    },
    /// A message the server encrypted with its storage key (a channel
    /// message): salt, then the encrypted [`crate::wire::MailBody`].
    AtRest(Vec<u8>),
    /// A channel message stored once for all its recipients: salt, then
    /// the [`crate::wire::MailBody`] encrypted with the server's storage
    /// key, bound to sender, message id and mail id (`channel_ad`) but
    /// not to a recipient. Every recipient's copy shares these bytes.
    Channel(Arc<[u8]>),
    /// Like `AtRest`, for a message a server of protocol version 1 stored
    /// in clear: nothing ever proved its sender, so it is shown marked
    /// "(unverified)".
    Legacy(Vec<u8>),
    /// A message stored in clear by a server of protocol version 1. The
    /// server encrypts these at start ([`StoreOp::Rewrite`]).
    Clear(String),
}

impl Body {
    /// Bytes of the stored form.
    pub fn len(&self) -> usize {
        match self {
            Body::Sealed { sealed, .. } => sealed.len(),
            Body::AtRest(b) | Body::Legacy(b) => b.len(),
            Body::Channel(b) => b.len(),
            Body::Clear(t) => t.len(),
        }
    }

    /// Whether its length is one a stored message can have (1 to
    /// [`wire::MAX_SEALED`] bytes, or [`wire::MAX_TEXT`] of clear text):
    /// every store refuses any other, before it could stop the next load.
    pub fn fits(&self) -> bool {
        let max = match self {
            Body::Clear(_) => wire::MAX_TEXT,
            _ => wire::MAX_SEALED,
        };
        (1..=max).contains(&self.len())
    }

    /// Never true for a stored message; for clippy's len/is_empty pairing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Memory a stored message costs besides its body: the record, the names,
/// the indexes, a key. Counted so the byte limits bound real memory.
pub const MAIL_OVERHEAD: usize = 160;

impl StoredMail {
    /// Bytes counted against mailbox limits.
    pub fn size(&self) -> usize {
        self.body.len() + MAIL_OVERHEAD
    }
}

impl StoredMail {
    /// What the message says, as its recipient (with its key) would read
    /// it; channel copies need the server's secrets. For tests and
    /// checkers that hold every key: the server itself cannot open sealed
    /// mail.
    pub fn open(&self, recipient: &Keypair, server: &ServerSecrets) -> Option<MailBody> {
        match &self.body {
            Body::Sealed { key, sealed } => {
                let plain = crypto::open_mail(recipient, &self.to, key, &self.from, sealed)?;
                wire::decode_body(&plain)
            }
            Body::AtRest(blob) | Body::Legacy(blob) => {
                let ad = at_rest_ad(&self.to, &self.from, self.channel, self.id);
                wire::decode_body(&server.open_at_rest(&ad, blob)?)
            }
            Body::Channel(blob) => {
                let ad = channel_ad(&self.from, self.id, self.mail);
                wire::decode_body(&server.open_at_rest(&ad, blob)?)
            }
            Body::Clear(text) => Some(MailBody {
                id: self.id,
                text: Text::new(text).ok()?,
            }),
        }
    }
}

/// What a message encrypted at rest is bound to: a row moved to another
/// mailbox, or relabelled, no longer decrypts.
pub(crate) fn at_rest_ad(to: &Name, from: &Name, channel: bool, id: MsgId) -> Vec<u8> {
    let mut ad = b"udpchat 2 at rest".to_vec();
    for name in [to, from] {
        ad.push(name.as_str().len() as u8);
        ad.extend_from_slice(name.as_str().as_bytes());
    }
    ad.push(u8::from(channel));
    ad.extend_from_slice(&id.0.to_le_bytes());
    ad
}

/// What a channel message stored once is bound to: its sender, its id and
/// its place in the store. Not a recipient: one ciphertext serves them all
/// (the pending set, not the encryption, says who is still owed it).
pub(crate) fn channel_ad(from: &Name, id: MsgId, mail: MailId) -> Vec<u8> {
    let mut ad = b"udpchat 3 channel".to_vec();
    ad.push(from.as_str().len() as u8);
    ad.extend_from_slice(from.as_str().as_bytes());
    ad.extend_from_slice(&id.0.to_le_bytes());
    ad.extend_from_slice(&mail.0.to_le_bytes());
    ad
}

/// A channel message stored once, with the recipients still owed it (its
/// pending set): a recipient's ack deletes it from the set
/// ([`StoreOp::Delete`]), and the body goes with the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMail {
    /// Store-order id, the same in every recipient's mailbox.
    pub mail: MailId,
    /// The sender.
    pub from: Name,
    /// When the server stored it, Unix seconds.
    pub stored_at: i64,
    /// The sender's message id.
    pub id: MsgId,
    /// The [`Body::Channel`] bytes.
    pub body: Arc<[u8]>,
    /// The recipients it was stored for.
    pub to: Vec<Name>,
}

impl ChannelMail {
    /// Each recipient's copy, as its mailbox holds it.
    pub fn copies(&self) -> impl Iterator<Item = StoredMail> + '_ {
        self.to.iter().map(|to| StoredMail {
            mail: self.mail,
            to: to.clone(),
            from: self.from.clone(),
            channel: true,
            stored_at: self.stored_at,
            id: self.id,
            body: Body::Channel(self.body.clone()),
        })
    }
}

/// A registry row: a name, the address it was last seen at, and the key
/// that owns it (`None` for a name registered before keys existed, or
/// released by the operator: its next registration binds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    /// The name.
    pub name: Name,
    /// Its last known address.
    pub addr: SocketAddr,
    /// The key that owns the name.
    pub key: Option<PublicKey>,
    /// When the name was last online, Unix seconds (`None`: not known, as
    /// for a row older than schema 3; it does not expire at this start).
    pub seen_at: Option<i64>,
}

/// One change to durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Keep this message (idempotent on (to, from, id)).
    Put(StoredMail),
    /// Forget a registered name: its registry row goes (its key no longer
    /// owns it). Its mailbox was emptied first.
    Forget(Name),
    /// Keep this channel message once, pending for each of its recipients
    /// (idempotent on its mail id and each recipient).
    Channel(ChannelMail),
    /// The recipient acked this message (a direct one, or its copy of a
    /// channel message).
    Delete {
        /// The recipient.
        to: Name,
        /// The message.
        mail: MailId,
    },
    /// A client registered (or its address changed): remember its name, the
    /// address it came from and the key that owns the name (replaces an
    /// earlier address; a name's key changes only from none to one).
    Client(ClientRecord),
    /// Replace a stored message's body (a clear-text one of version 1,
    /// encrypted at rest).
    Rewrite {
        /// The message.
        mail: MailId,
        /// Its new body.
        body: Body,
    },
    /// One of several servers sharing the store: a client came online at
    /// this server (at `addr`) or left it. Only a store shared by several
    /// servers keeps it (the others learn who is online where); any other
    /// store takes it and does nothing.
    Presence {
        /// The client.
        name: Name,
        /// Where it is (or was last).
        addr: SocketAddr,
        /// Online here, or gone.
        online: bool,
        /// Its registrations counted across the cluster: a newer one
        /// (higher epoch) wins over an older one, wherever each was.
        epoch: u64,
    },
}

impl StoreOp {
    /// The messages this operation stores, one per recipient (none for
    /// the other operations).
    pub fn stored(&self) -> Vec<StoredMail> {
        match self {
            StoreOp::Put(m) => vec![m.clone()],
            StoreOp::Channel(c) => c.copies().collect(),
            StoreOp::Delete { .. }
            | StoreOp::Client(_)
            | StoreOp::Forget(_)
            | StoreOp::Rewrite { .. }
            | StoreOp::Presence { .. } => Vec::new(),
        }
    }
}

/// Refuses a batch no store may keep (`InvalidData`, nothing of it
/// written): a body of a length no stored message has ([`Body::fits`]),
/// a shared channel body as one recipient's copy, or a mail id beyond
/// `i64::MAX` (what SQL databases hold). Every [`Store`] calls it first.
pub fn check_batch(ops: &[StoreOp]) -> io::Result<()> {
    let invalid = |what: String| Err(io::Error::new(io::ErrorKind::InvalidData, what));
    for op in ops {
        let (mail, len, fits) = match op {
            StoreOp::Put(m) => (m.mail, m.body.len(), m.body.fits()),
            StoreOp::Rewrite { mail, body } => (*mail, body.len(), body.fits()),
            StoreOp::Channel(c) => {
                let len = c.body.len();
                (c.mail, len, (1..=wire::MAX_SEALED).contains(&len))
            }
            StoreOp::Delete { .. }
            | StoreOp::Client(_)
            | StoreOp::Forget(_)
            | StoreOp::Presence { .. } => continue,
        };
        if i64::try_from(mail.0).is_err() {
            return invalid(format!(
                "mail id {} does not fit a database's integer",
                mail.0
            ));
        }
        if !fits {
            return invalid(format!("mail {}: body of {len} bytes", mail.0));
        }
        if let StoreOp::Put(StoredMail {
            body: Body::Channel(_),
            ..
        })
        | StoreOp::Rewrite {
            body: Body::Channel(_),
            ..
        } = op
        {
            return invalid(format!("mail {}: a shared channel body", mail.0));
        }
    }
    Ok(())
}

/// What a [`Store`] holds, as loaded when the server starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Every registered name with its last known address and its key, in
    /// registration order.
    pub clients: Vec<ClientRecord>,
    /// Every stored message, in store order: a channel message once per
    /// recipient still owed it, all copies sharing one [`Body::Channel`].
    /// Empty for one of several servers: it fetches a mailbox when it
    /// needs it ([`Store::mailboxes`]).
    pub mail: Vec<StoredMail>,
    /// The highest mail id in the store, when `mail` does not hold them
    /// all (no id is given out twice).
    pub highest_mail: Option<MailId>,
}

/// Where committed [`StoreOp`]s go.
///
/// `commit` must make all of `ops` durable together, or fail as a whole; only
/// after it returns `Ok` does the driver call
/// [`Server::handle_committed`](crate::Server::handle_committed).
pub trait Store {
    /// The registry and every stored message (used at server start).
    fn load(&mut self) -> io::Result<Loaded>;
    /// Applies `ops` as one transaction.
    fn commit(&mut self, ops: &[StoreOp]) -> io::Result<()>;
    /// The body of message `mail` as stored for `to` (`None`: there is
    /// none, or its row is damaged): the server keeps committed bodies on
    /// disk, not in memory, and asks for one when it delivers it.
    fn fetch(&mut self, to: &Name, mail: MailId) -> io::Result<Option<Body>>;
    /// Every message stored for `names`, in store order, as
    /// [`Store::load`] gives them: what one of several servers reads when
    /// it needs a mailbox it does not hold ([`crate::Server::poll_mailboxes`]).
    /// A store only ever used by one server need not have it.
    fn mailboxes(&mut self, names: &[Name]) -> io::Result<Vec<StoredMail>> {
        let _ = names;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this store serves one server, which loads every mailbox at start",
        ))
    }
    /// What happened to the store since the last call that an operator
    /// should read (a lost connection found again), for the server's log.
    fn notes(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// One of several servers on this store: what the others committed
    /// since the last call, and who is live (asked every few dozen
    /// milliseconds, and after each commit). `None`: the store serves this
    /// server alone, there is never news. An error other than
    /// [`io::ErrorKind::NotConnected`] (asked again later) means this
    /// server must stop: it was taken for dead and its place given away.
    fn news(&mut self) -> Option<io::Result<News>> {
        None
    }
    /// Whether [`Store::news`] has anything new, as far as the store can
    /// tell without a round trip: `Some(true)` when another server rang
    /// since the last call (or a ring may have been missed), `None` for a
    /// store without a doorbell (its news is asked for every few dozen
    /// milliseconds). `idle`: nothing else to do, it may wait a moment
    /// for a ring.
    fn news_rung(&mut self, _idle: bool) -> Option<bool> {
        None
    }
    /// What the last commit did otherwise than asked, operation by
    /// operation (every message not named here was stored as asked). A
    /// store of one server never has any: its server's own view is the
    /// whole truth.
    fn outcomes(&mut self) -> Vec<Outcome> {
        Vec::new()
    }
}

/// What a commit did with a message otherwise than asked
/// ([`Store::outcomes`]): several servers write the same mailboxes, so
/// only the store can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The store held the message already under another id, stored first
    /// by another server of a cluster (the same message sent again
    /// through this one): this server's id, and the row the store kept
    /// (a channel message's, one per recipient).
    Kept {
        /// This server's id for it.
        ours: MailId,
        /// The store's row.
        row: StoredMail,
    },
    /// Not stored for `to`: its mailbox, as the store counts it across
    /// every server, would have gone over [`MailboxLimits`]. A direct
    /// message is then not stored at all; a channel message is not
    /// pending for `to` (its other recipients keep it).
    Full {
        /// The recipient.
        to: Name,
        /// The message.
        mail: MailId,
    },
}

/// How much one mailbox may hold, as a store shared by several servers
/// enforces it ([`Outcome::Full`]): the server's `--mailbox-*` limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxLimits {
    /// Messages waiting.
    pub messages: usize,
    /// Bytes waiting, each message counted as [`StoredMail::size`].
    pub bytes: usize,
    /// The mail's time to live: a message stored this long before the
    /// new one does not count (expired, whether or not a server has
    /// deleted it yet: nobody does while nobody holds the mailbox).
    pub ttl: Option<std::time::Duration>,
}

/// What the other servers of a cluster did, for [`Store::news`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct News {
    /// Every live server as clients reach it, when it was read again.
    pub live: Option<Vec<SocketAddr>>,
    /// Their commits, in commit order.
    pub changes: Vec<crate::Remote>,
    /// This server's lease had run out (it was stuck): the others took
    /// its clients for offline, so it must say again who is online here
    /// ([`crate::Server::republish_presence`]).
    pub rejoined: bool,
}

impl News {
    /// Nothing to tell.
    pub fn is_empty(&self) -> bool {
        self.live.is_none() && self.changes.is_empty() && !self.rejoined
    }
}

/// Hands the server every mailbox ([`Server::poll_mailboxes`]) and body
/// ([`Server::poll_fetch`]) it asked for from `store`: what a driver does
/// each turn, before it commits.
///
/// [`Server::poll_fetch`]: crate::Server::poll_fetch
/// [`Server::poll_mailboxes`]: crate::Server::poll_mailboxes
pub fn serve_fetches<S: Store + ?Sized>(server: &mut crate::Server, store: &mut S, now: Instant) {
    loop {
        let names = server.poll_mailboxes();
        if !names.is_empty() {
            let mail = store.mailboxes(&names);
            server.handle_mailboxes(now, &names, mail);
        }
        let Some((to, mail)) = server.poll_fetch() else {
            break;
        };
        let body = store.fetch(&to, mail);
        server.handle_fetched(now, &to, mail, body);
    }
}

/// A [`Store`] that keeps everything in memory: nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemoryStore {
    clients: Vec<ClientRecord>,
    index: HashMap<Name, usize>,
    /// By mail id, then recipient: a channel message has one id for all.
    mail: BTreeMap<(MailId, Name), StoredMail>,
    keys: HashMap<(Name, Name, MsgId), MailId>,
    /// Channel messages by (sender, message id), as first stored, with
    /// every recipient they were ever stored for: as a database's channel
    /// row with its recipients, acked ones included.
    channels: HashMap<(Name, MsgId), (ChannelMail, HashSet<Name>)>,
    /// Each mailbox's messages and bytes ([`StoredMail::size`]).
    tally: HashMap<Name, (usize, usize)>,
    /// Enforced when set, as a store shared by several servers does
    /// ([`MemoryStore::with_limits`]).
    limits: Option<MailboxLimits>,
    /// [`Store::outcomes`] of the last commit.
    outcomes: Vec<Outcome>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that refuses a message its recipient's mailbox has
    /// no room for ([`Outcome::Full`]), as one shared by several servers
    /// does: the sans-IO stand-in for PostgreSQL in a simulated cluster.
    pub fn with_limits(limits: MailboxLimits) -> Self {
        MemoryStore {
            limits: Some(limits),
            ..Self::default()
        }
    }

    /// Number of stored messages.
    pub fn len(&self) -> usize {
        self.mail.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.mail.is_empty()
    }

    /// A store holding what `loaded` says (for tests that start a server
    /// from hand-made contents: its bodies are fetched from the store).
    pub fn holding(loaded: &Loaded) -> Self {
        let mut store = MemoryStore::new();
        let ops: Vec<StoreOp> = (loaded.clients.iter().cloned().map(StoreOp::Client))
            .chain(loaded.mail.iter().cloned().map(StoreOp::Put))
            .collect();
        // A memory store's commit cannot fail.
        let _ = store.commit(&ops);
        store
    }

    /// Overwrites the body of `mail` as stored for `to`, past every check
    /// of [`Store::commit`]: what an attacker with write access to the
    /// database does, for the tests that play one.
    pub fn tamper(&mut self, to: &Name, mail: MailId, body: Body) {
        if let Some(m) = self.mail.get_mut(&(mail, to.clone())) {
            m.body = body;
        }
    }

    /// The message `mail` as stored for `to`.
    pub fn get(&self, to: &Name, mail: MailId) -> Option<&StoredMail> {
        self.mail.get(&(mail, to.clone()))
    }
}

impl MemoryStore {
    /// A channel message: stored once per (sender, message id), pending
    /// for each recipient whose mailbox has room. Sent again under
    /// another id (through another server of a cluster), the first row
    /// is kept and gains the recipients it lacks; every copy the
    /// recipients given hold is reported kept instead.
    fn put_channel(&mut self, c: &ChannelMail) {
        let key = (c.from.clone(), c.id);
        let first = self.channels.get(&key).map(|(first, _)| first.mail);
        // Every copy of the first row gone: it is gone, as a database
        // deletes a channel row nobody is owed.
        let first = first.filter(|&id| self.mail.keys().any(|(m, _)| *m == id));
        let Some(theirs) = first.filter(|&id| id != c.mail) else {
            let mut stored = HashSet::new();
            for m in c.copies() {
                let to = m.to.clone();
                if self.put(m) {
                    stored.insert(to);
                }
            }
            match self.channels.get_mut(&key) {
                // A replay of the first: the same row.
                Some((first, ever)) if first.mail == c.mail => ever.extend(stored),
                // Pending for nobody: no row.
                _ if stored.is_empty() => {}
                _ => {
                    self.channels.insert(key, (c.clone(), stored));
                }
            }
            return;
        };
        let (template, ever) = self.channels.get(&key).expect("looked up above");
        let template = ChannelMail {
            to: Vec::new(),
            ..template.clone()
        };
        let new: Vec<Name> = (c.to.iter())
            .filter(|to| !ever.contains(*to))
            .cloned()
            .collect();
        for m in (ChannelMail {
            to: new,
            ..template
        })
        .copies()
        {
            let to = m.to.clone();
            match self.insert(m) {
                true => {
                    if let Some((_, ever)) = self.channels.get_mut(&key) {
                        ever.insert(to);
                    }
                }
                false => self.outcomes.push(Outcome::Full { to, mail: c.mail }),
            }
        }
        for to in &c.to {
            if let Some(row) = self.mail.get(&(theirs, to.clone())) {
                let row = row.clone();
                self.outcomes.push(Outcome::Kept { ours: c.mail, row });
            }
        }
    }

    /// Whether `m` is in the store now: stored (if its mailbox has room),
    /// or there already under its id. Not: refused for a full mailbox,
    /// or stored first under another id (both reported).
    fn put(&mut self, m: StoredMail) -> bool {
        let key = (m.to.clone(), m.from.clone(), m.id);
        match self.keys.get(&key) {
            None => {
                let (to, mail) = (m.to.clone(), m.mail);
                let stored = self.insert(m);
                if !stored {
                    self.outcomes.push(Outcome::Full { to, mail });
                }
                stored
            }
            // Stored first under another id (by another server sharing
            // this store): that copy is kept.
            Some(&kept) if kept != m.mail => {
                if let Some(row) = self.mail.get(&(kept, m.to.clone())) {
                    let row = row.clone();
                    self.outcomes.push(Outcome::Kept { ours: m.mail, row });
                }
                false
            }
            Some(_) => true,
        }
    }

    /// Stores `m` if its mailbox has room.
    fn insert(&mut self, m: StoredMail) -> bool {
        let (count, bytes) = self.tally.get(&m.to).copied().unwrap_or_default();
        let over = |(count, bytes): (usize, usize), limits: MailboxLimits| {
            count >= limits.messages || bytes + m.size() > limits.bytes
        };
        if let Some(limits) = self.limits
            && over((count, bytes), limits)
        {
            // The tally counts every row; without the expired ones it may
            // fit (counted one by one: a full mailbox is rare).
            let Some(ttl) = limits.ttl else {
                return false;
            };
            let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
            let live = (self.mail.values())
                .filter(|x| x.to == m.to && x.stored_at.saturating_add(ttl) > m.stored_at)
                .fold((0, 0), |(n, b), x| (n + 1, b + x.size()));
            if over(live, limits) {
                return false;
            }
        }
        self.tally
            .insert(m.to.clone(), (count + 1, bytes + m.size()));
        self.keys
            .insert((m.to.clone(), m.from.clone(), m.id), m.mail);
        self.mail.insert((m.mail, m.to.clone()), m);
        true
    }

    /// Takes message `mail` out of `to`'s mailbox.
    fn remove(&mut self, to: &Name, mail: MailId) {
        let Some(m) = self.mail.remove(&(mail, to.clone())) else {
            return;
        };
        if let Some((count, bytes)) = self.tally.get_mut(to) {
            *count = count.saturating_sub(1);
            *bytes = bytes.saturating_sub(m.size());
        }
        self.keys.remove(&(m.to, m.from, m.id));
    }
}

impl Store for MemoryStore {
    fn load(&mut self) -> io::Result<Loaded> {
        Ok(Loaded {
            clients: self.clients.clone(),
            mail: self.mail.values().cloned().collect(),
            highest_mail: None,
        })
    }

    fn mailboxes(&mut self, names: &[Name]) -> io::Result<Vec<StoredMail>> {
        let names: std::collections::HashSet<&Name> = names.iter().collect();
        Ok((self.mail.values())
            .filter(|m| names.contains(&m.to))
            .cloned()
            .collect())
    }

    fn fetch(&mut self, to: &Name, mail: MailId) -> io::Result<Option<Body>> {
        Ok(self.mail.get(&(mail, to.clone())).map(|m| m.body.clone()))
    }

    fn outcomes(&mut self) -> Vec<Outcome> {
        std::mem::take(&mut self.outcomes)
    }

    fn commit(&mut self, ops: &[StoreOp]) -> io::Result<()> {
        check_batch(ops)?;
        self.outcomes.clear();
        for op in ops {
            match op {
                StoreOp::Put(m) => {
                    self.put(m.clone());
                }
                StoreOp::Channel(c) => self.put_channel(c),
                StoreOp::Delete { to, mail } => self.remove(to, *mail),
                StoreOp::Client(c) => match self.index.get(&c.name) {
                    Some(&i) => {
                        let row = &mut self.clients[i];
                        row.addr = c.addr;
                        row.key = row.key.or(c.key);
                        row.seen_at = c.seen_at.or(row.seen_at);
                    }
                    None => {
                        self.index.insert(c.name.clone(), self.clients.len());
                        self.clients.push(c.clone());
                    }
                },
                StoreOp::Forget(name) => {
                    if self.index.remove(name).is_some() {
                        self.clients.retain(|c| c.name != *name);
                        self.index = (self.clients.iter().enumerate())
                            .map(|(i, c)| (c.name.clone(), i))
                            .collect();
                    }
                }
                StoreOp::Rewrite { mail, body } => {
                    for m in self.mail.values_mut().filter(|m| m.mail == *mail) {
                        if let Some((_, bytes)) = self.tally.get_mut(&m.to) {
                            *bytes = (*bytes + body.len()).saturating_sub(m.body.len());
                        }
                        m.body = body.clone();
                    }
                }
                // One server alone: nobody to tell.
                StoreOp::Presence { .. } => {}
            }
        }
        Ok(())
    }
}
