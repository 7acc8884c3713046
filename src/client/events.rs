//! What a client tells its user: events, why a command was refused, the
//! path messages to a peer take.

use super::*;

/// Something that happened, to show; [`console::render`] gives its exact
/// console line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Registration accepted.
    Welcome,
    /// The local client table changed.
    TableUpdated,
    /// After [`Event::TableUpdated`] for a delta: a client that came
    /// online (`true`: a new name, a log-back, a return) or went offline.
    Presence {
        /// The client.
        name: Name,
        /// Online now.
        online: bool,
    },
    /// More clients changed in the same delta than are named one by one.
    PresenceMore(usize),
    /// A direct message was acked by its recipient.
    ReceivedBy {
        /// The recipient.
        to: Name,
        /// The message ([`Client::send_message`] returned it).
        id: MsgId,
    },
    /// No ack within 500 ms; the message went to the server.
    NoAck {
        /// The recipient.
        to: Name,
        /// The message.
        id: MsgId,
    },
    /// The recipient is offline in the local table; the message went to the
    /// server directly.
    PeerOffline {
        /// The recipient.
        to: Name,
        /// The message.
        id: MsgId,
    },
    /// The server stored the message.
    Saved {
        /// The message.
        id: MsgId,
    },
    /// The server says the recipient is online after all.
    Exists {
        /// The recipient.
        to: Name,
        /// The message.
        id: MsgId,
    },
    /// Deregistration acked.
    Bye,
    /// A request that the client cannot live without got no answer.
    ServerNotResponding,
    /// The client is about to exit (follows `ServerNotResponding`).
    Exiting,
    /// A channel message got no answer from the server.
    ChannelNotResponding {
        /// The message ([`Client::send_all`] returned it).
        id: MsgId,
    },
    /// Stored messages follow.
    HaveMessages,
    /// A stored message, shown on log-back.
    Stored {
        /// Sender.
        from: Name,
        /// Sent with `send_all`.
        channel: bool,
        /// False for a message stored by protocol version 1, whose sender
        /// nothing proved (shown with "(unverified)").
        verified: bool,
        /// When the server stored it (Unix seconds).
        stored_at: i64,
        /// The message.
        text: Text,
    },
    /// A direct message arrived.
    Direct {
        /// Sender.
        from: Name,
        /// The message.
        text: Text,
    },
    /// The server acked a channel message.
    ChannelAcked {
        /// The message.
        id: MsgId,
    },
    /// A channel message arrived.
    Channel {
        /// Sender.
        from: Name,
        /// The message.
        text: Text,
    },
    /// The name is held by a live client.
    Rejected(Name),
    /// The name belongs to another key.
    RejectedKey(Name),
    /// First contact with the server: this is its key, to remember (not a
    /// console line).
    ServerKeyLearned(PublicKey),
    /// The server presented another key than the one remembered for it;
    /// nothing but the handshake was sent. The client exits.
    ServerKeyChanged {
        /// The key remembered.
        pinned: PublicKey,
        /// The key presented.
        presented: PublicKey,
    },
    /// The server speaks another protocol version. The client exits.
    VersionMismatch(u8),
    /// The server had forgotten this client; it registered again by itself.
    Reconnected,
    /// The recipient's mailbox is over its limit: the message was not
    /// saved.
    MailboxFull {
        /// The recipient.
        to: Name,
        /// The message.
        id: MsgId,
    },
    /// The server refused a message (its store, a rate, a lost session):
    /// not sent.
    Refused {
        /// The message.
        id: MsgId,
        /// What was wrong and what to do, as the console says it.
        why: String,
    },
    /// A stored or relayed message from this sender did not open with its
    /// key: reported and dropped (not an error of any command).
    Unverifiable(Name),
    /// A request the server refused, not a message's (registration: the
    /// server is full), as the console says it.
    Error(String),
    /// Not a line: the client is done (after `quit`, or `failed`: it ended
    /// on an error above, such as [`Event::Exiting`]). Nothing follows.
    Closed {
        /// It ended on a failure, not a `quit`.
        failed: bool,
    },
}

impl Event {
    /// Whether it says that a command was not carried out (a user error, a
    /// refusal, a server that did not answer), for a script's exit status.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Event::Error(_)
                | Event::Refused { .. }
                | Event::MailboxFull { .. }
                | Event::ChannelNotResponding { .. }
                | Event::ServerNotResponding
                | Event::Rejected(_)
                | Event::RejectedKey(_)
                | Event::ServerKeyChanged { .. }
                | Event::VersionMismatch(_)
        )
    }
}

/// Why a command was not carried out (nothing was sent). Its `Display` is
/// the console's explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// Deregistered: only `reg`, `list` and `help` work. The client's name.
    Offline(Name),
    /// A registration is under way.
    Registering,
    /// The client has exited.
    Exited,
    /// `reg` while online.
    AlreadyOnline,
    /// No such client in the local table (the name as given).
    UnknownClient(String),
    /// The client has no key yet (not registered since the server was
    /// upgraded).
    NoKey(Name),
    /// The message is this many bytes, over the limit.
    TooLong(usize),
    /// An empty message.
    Empty,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Offline(me) => {
                write!(f, "you are offline; type reg {me} to log back in.")
            }
            CommandError::Registering => write!(f, "registration is under way; wait for it."),
            CommandError::Exited => write!(f, "the client has exited."),
            CommandError::AlreadyOnline => write!(f, "you are already online."),
            CommandError::UnknownClient(to) => {
                write!(f, "unknown client {to}; type list to see the client table.")
            }
            CommandError::NoKey(to) => write!(
                f,
                "{to} has no key yet (not registered since the server was upgraded); \
                 the message was not sent."
            ),
            CommandError::TooLong(n) => write!(
                f,
                "message too long ({n} bytes); the limit is {}.",
                wire::MAX_TEXT
            ),
            CommandError::Empty => write!(f, "empty message."),
        }
    }
}

impl std::error::Error for CommandError {}

/// How direct messages reach a peer, as `list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Straight to the address in the table: it answered at once.
    Direct,
    /// Straight to it, after the server had both sides send to each other
    /// (hole punching) or a message had to fall back.
    Punched,
    /// Through the server: no direct path opened.
    Relayed,
}

impl Path {
    /// The word `list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Punched => "punched",
            Path::Relayed => "relayed",
        }
    }
}
