//! The server's durable side, as data: the [`Server`](crate::Server) emits
//! [`StoreOp`]s and is told when they are committed; a [`Store`] carries them
//! out. The server's own memory is the working copy, so the core never waits
//! on storage: it only holds back its acks until the driver reports the
//! commit (group commit: one transaction per loop iteration).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;

use crate::wire::{MailId, MsgId, Name};

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
    /// The message (1–1000 bytes, checked when it arrived; kept at its own
    /// size rather than in a fixed 1000-byte buffer).
    pub text: String,
}

/// Memory a stored message costs besides its text: the record, the names,
/// the indexes. Counted so the byte limits bound real memory, not just text.
pub const MAIL_OVERHEAD: usize = 128;

impl StoredMail {
    /// Bytes counted against mailbox limits.
    pub fn size(&self) -> usize {
        self.text.len() + MAIL_OVERHEAD
    }
}

/// One change to durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Keep this message (idempotent on (to, from, id)).
    Put(StoredMail),
    /// The recipient acked this message.
    Delete {
        /// The recipient.
        to: Name,
        /// The message.
        mail: MailId,
    },
    /// A client registered: remember its name and the address it came from
    /// (replaces an earlier address).
    Client {
        /// The name.
        name: Name,
        /// Its last known address.
        addr: SocketAddr,
    },
}

/// What a [`Store`] holds, as loaded when the server starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Every registered name with its last known address, in registration
    /// order.
    pub clients: Vec<(Name, SocketAddr)>,
    /// Every stored message, in store order.
    pub mail: Vec<StoredMail>,
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
}

/// A [`Store`] that keeps everything in memory: nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemoryStore {
    clients: Vec<(Name, SocketAddr)>,
    index: HashMap<Name, usize>,
    mail: BTreeMap<MailId, StoredMail>,
    keys: HashSet<(Name, Name, MsgId)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of stored messages.
    pub fn len(&self) -> usize {
        self.mail.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.mail.is_empty()
    }
}

impl Store for MemoryStore {
    fn load(&mut self) -> io::Result<Loaded> {
        Ok(Loaded {
            clients: self.clients.clone(),
            mail: self.mail.values().cloned().collect(),
        })
    }

    fn commit(&mut self, ops: &[StoreOp]) -> io::Result<()> {
        for op in ops {
            match op {
                StoreOp::Put(m) => {
                    if self.keys.insert((m.to.clone(), m.from.clone(), m.id)) {
                        self.mail.insert(m.mail, m.clone());
                    }
                }
                StoreOp::Delete { mail, .. } => {
                    if let Some(m) = self.mail.remove(mail) {
                        self.keys.remove(&(m.to, m.from, m.id));
                    }
                }
                StoreOp::Client { name, addr } => match self.index.get(name) {
                    Some(&i) => self.clients[i].1 = *addr,
                    None => {
                        self.index.insert(name.clone(), self.clients.len());
                        self.clients.push((name.clone(), *addr));
                    }
                },
            }
        }
        Ok(())
    }
}
