//! What a server reports: log events, store failures, counters, the
//! census, a waiting message as listed.

use super::*;

/// Something worth a line in the server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client registered (or logged back in) from an address.
    Registered(Name, SocketAddr),
    /// A client went offline: `true` when it said so (dereg), `false` when a
    /// probe found it silent.
    Offline(Name, bool),
    /// A channel message was stored once for this many recipients.
    StoredChannel {
        /// The sender.
        from: Name,
        /// Recipients it is pending for.
        recipients: usize,
        /// Its id in the store.
        mail: MailId,
    },
    /// A message was stored for a recipient.
    Stored {
        /// The recipient.
        to: Name,
        /// The sender.
        from: Name,
        /// A channel message.
        channel: bool,
    },
    /// A direct message its sender could not get through was stored, to be
    /// relayed to its online recipient (and deleted on its ack).
    Relaying {
        /// The recipient.
        to: Name,
        /// The sender.
        from: Name,
    },
    /// A registration was refused: the name is held by a live client, or
    /// belongs to another key.
    Rejected(Name, SocketAddr, Rejection),
    /// A client's address changed (validated), e.g. a NAT rebinding.
    Moved(Name, SocketAddr),
    /// A stored or relayed direct message was acked by its recipient and
    /// deleted (channel copies are counted in [`ServerStats`] instead: a
    /// fan-out would be a line per recipient).
    Delivered {
        /// The recipient.
        to: Name,
        /// The sender.
        from: Name,
        /// It was relayed live (its sender could not reach the recipient).
        relayed: bool,
    },
    /// A client taken for gone proved a new address on its session: it had
    /// only moved, and is online again there.
    Back(Name, SocketAddr),
    /// A stored message could not be decrypted (a damaged store, or a
    /// server key that changed) and was dropped.
    Undecryptable(Name, MailId),
    /// A stored message claims a sender whose key did not seal it (a store
    /// edited by hand, or a name released since): dropped.
    Unverifiable {
        /// The recipient.
        to: Name,
        /// The sender it claims.
        from: Name,
        /// The message.
        mail: MailId,
    },
    /// A recipient's mailbox was full, so it did not get a message (a
    /// channel message; or a direct one the store refused, its mailbox
    /// filled through other servers: its sender is told).
    MailboxFull {
        /// The recipient.
        to: Name,
        /// The message's sender.
        from: Name,
        /// A channel message.
        channel: bool,
    },
    /// A name not seen online for the name time-to-live was forgotten: the
    /// next key to register it owns it.
    Forgotten {
        /// The name.
        name: Name,
        /// Whole days since it was last online.
        days: i64,
    },
    /// A stored message reached the mail time-to-live undelivered and was
    /// deleted.
    Expired {
        /// The recipient.
        to: Name,
        /// The sender.
        from: Name,
        /// The message.
        mail: MailId,
    },
    /// The store refused a commit, so a message was refused to its sender.
    NotSaved {
        /// The sender.
        from: Name,
        /// A channel message.
        channel: bool,
        /// Why.
        failure: StoreFailure,
    },
}

/// Why a commit failed, as far as the senders it refuses care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// The disk is full.
    Full,
    /// Another process holds the database's write lock.
    Busy,
    /// The database server cannot be reached (no primary answers).
    Unreachable,
}

impl StoreFailure {
    /// The failure an I/O error from a [`Store`](crate::store::Store) is,
    /// if it is one the server can serve through (anything else — a
    /// damaged database, a failing disk — is the operator's to see).
    pub fn of(e: &std::io::Error) -> Option<StoreFailure> {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::ResourceBusy => Some(StoreFailure::Busy),
            ErrorKind::NotConnected
            | ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::TimedOut => Some(StoreFailure::Unreachable),
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                Some(StoreFailure::Full)
            }
            _ => None,
        }
    }

    pub(super) fn refusal(self) -> Refusal {
        match self {
            StoreFailure::Full => Refusal::StoreFull,
            // The client's "try again later" either way.
            StoreFailure::Busy | StoreFailure::Unreachable => Refusal::StoreBusy,
        }
    }
}

/// Counters of dropped input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Datagrams that did not parse, decrypt or decode.
    pub malformed: u64,
    /// Requests ignored: not from a registered session, or a bound reached.
    pub ignored: u64,
    /// Requests over their source's rate (refused, or dropped as lost).
    pub limited: u64,
    /// Stored messages acked by their recipients (channel copies included).
    pub delivered: u64,
    /// Registrations sent to their name's home server (several servers).
    pub redirected: u64,
    /// The session layer's counters.
    pub links: LinkStats,
}

/// The state a log summary tells: how many clients are online and
/// registered, how many messages wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Clients online.
    pub online: usize,
    /// Names in the registry.
    pub registered: usize,
    /// Stored messages waiting (a channel message counts once per
    /// recipient still owed it).
    pub stored: usize,
}

/// A message waiting in a mailbox, as [`Server::mailbox`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// Store-order id.
    pub mail: MailId,
    /// The sender.
    pub from: Name,
    /// A channel message.
    pub channel: bool,
    /// Stored once for all its recipients: the store's bytes count its
    /// body once.
    pub shared: bool,
    /// When the server stored it, Unix seconds.
    pub stored_at: i64,
    /// The sender's message id.
    pub id: MsgId,
    /// Its body's bytes.
    pub len: usize,
    /// Its body is in the server's memory (uncommitted, or being
    /// delivered), not only on disk.
    pub in_memory: bool,
}

impl Waiting {
    /// Bytes counted against mailbox limits.
    pub fn size(&self) -> usize {
        self.len + MAIL_OVERHEAD
    }
}
