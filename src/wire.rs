//! The messages: what travels *inside* an encrypted session (a `Data`
//! datagram, or the payload of the handshake's third message; the datagram
//! layer is [`crate::packet`]). One datagram carries one [`Message`],
//! encoded with `postcard`.
//!
//! Every variable-length field has a bound ([`Name`], [`Text`], table pages),
//! decoding borrows strings from the datagram and copies them into
//! fixed-capacity buffers, and anything that is not exactly one well-formed
//! message of this version is rejected with a [`WireError`] — never a panic,
//! never an allocation sized by a length field.
//!
//! Enum variants are only ever appended: postcard encodes a variant by its
//! index, so reordering would silently change the meaning of old datagrams.

use core::fmt;
use core::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::crypto::{PublicKey, SEALED_OVERHEAD};
pub use crate::packet::{MAX_DATAGRAM, MAX_PLAINTEXT, VERSION};

/// Longest client name, in bytes of UTF-8.
pub const MAX_NAME: usize = 32;
/// Longest chat message, in bytes of UTF-8.
pub const MAX_TEXT: usize = 1000;
/// Client-table entries one `Page` or `Delta` datagram holds when every row
/// is the widest possible (a 32-byte name, an IPv6 address, its 32-byte
/// key). Rows are packed by their encoded size, [`PAGE_BYTES`] at most, so
/// typical rows (short names, IPv4) fit about twice as many.
pub const PAGE_ENTRIES: usize = 13;
/// Bytes of rows in one `Page` or `Delta`, at most: what
/// [`PAGE_ENTRIES`] of the widest rows take.
pub const PAGE_BYTES: usize = PAGE_ENTRIES * ENTRY_MAX;
/// Rows one `Page` or `Delta` can hold at all: [`PAGE_BYTES`] of the
/// narrowest rows. Decoding refuses more.
pub const MAX_PAGE_ROWS: usize = PAGE_BYTES / ENTRY_MIN;
/// Pages the server sends for one `Sync`, at most: a joiner pulls a large
/// table in windows, not one stop-and-wait round trip per page. Eight
/// pages (under 10 KB) fit any receive buffer, and the request comes on a
/// session whose address is proven, so this is no amplification.
pub const SYNC_WINDOW: usize = 8;
/// The body of sealed mail, at most: a [`MailBody`] with the longest text.
pub const MAX_BODY: usize = VARINT64 + TEXT_MAX;
/// Sealed mail, at most: the body, an ephemeral key and a tag.
pub const MAX_SEALED: usize = MAX_BODY + SEALED_OVERHEAD;

/// Why a datagram was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Zero bytes.
    Empty,
    /// Larger than [`MAX_PLAINTEXT`].
    Oversize(usize),
    /// The bytes are not a valid message (bad variant,
    /// truncated, string too long, invalid name, …).
    Malformed,
    /// A valid message followed by extra bytes.
    Trailing(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Empty => write!(f, "empty datagram"),
            WireError::Oversize(n) => write!(f, "message of {n} bytes exceeds {MAX_PLAINTEXT}"),
            WireError::Malformed => write!(f, "malformed message"),
            WireError::Trailing(n) => write!(f, "{n} trailing bytes after the message"),
        }
    }
}

impl std::error::Error for WireError {}

/// Why a string was refused as a [`Name`] or a [`Text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldError {
    /// Zero bytes.
    Empty,
    /// More bytes than the field allows (the actual length is given).
    TooLong(usize),
    /// A name with whitespace or a control character in it.
    BadChar,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldError::Empty => write!(f, "it is empty"),
            FieldError::TooLong(n) => write!(f, "it is {n} bytes long"),
            FieldError::BadChar => write!(f, "it contains whitespace or a control character"),
        }
    }
}

/// A client's name: 1–32 bytes of UTF-8 without whitespace or control
/// characters; case-sensitive.
///
/// ```
/// use udpchat::wire::Name;
/// assert!(Name::new("Alice").is_ok());
/// assert!(Name::new("two words").is_err());
/// assert!(Name::new(&"x".repeat(33)).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(heapless::String<MAX_NAME>);

impl Name {
    /// Checks `s` and copies it into a fixed-capacity buffer.
    pub fn new(s: &str) -> Result<Name, FieldError> {
        if s.is_empty() {
            return Err(FieldError::Empty);
        }
        if s.len() > MAX_NAME {
            return Err(FieldError::TooLong(s.len()));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(FieldError::BadChar);
        }
        heapless::String::try_from(s)
            .map(Name)
            .map_err(|_| FieldError::TooLong(s.len()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A chat message: 1–1000 bytes of UTF-8 (any script). A `Text` is never cut:
/// an over-long message is refused whole.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Text(heapless::String<MAX_TEXT>);

impl Text {
    /// Checks `s` and copies it into a fixed-capacity buffer.
    pub fn new(s: &str) -> Result<Text, FieldError> {
        if s.is_empty() {
            return Err(FieldError::Empty);
        }
        heapless::String::try_from(s)
            .map(Text)
            .map_err(|_| FieldError::TooLong(s.len()))
    }

    /// The message as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

macro_rules! borrowed_str_serde {
    ($ty:ident) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // Borrowed from the datagram: postcard checks the length prefix
                // against the bytes actually present before handing it over.
                let s = <&'de str>::deserialize(d)?;
                $ty::new(s).map_err(|e| {
                    serde::de::Error::custom(format_args!("invalid {}: {e}", stringify!($ty)))
                })
            }
        }
    };
}

borrowed_str_serde!(Name);
borrowed_str_serde!(Text);

/// Request sequence number; an ack or reply echoes it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Seq(pub u32);

/// A chat message's id, chosen at random by its sender; (sender, id) is
/// unique and is what receivers deduplicate on, end to end through the
/// mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MsgId(pub u64);

/// A stored message's id in the server's mailbox (increasing in store order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MailId(pub u64);

/// One row of the client table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The client's name.
    pub name: Name,
    /// The source address the server last validated for the client.
    pub addr: SocketAddr,
    /// Whether the server believes the client is online.
    pub online: bool,
    /// The static key that owns the name (the server vouches for it).
    pub key: PublicKey,
}

/// Why the server refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The recipient's mailbox (or the server's store) is over its limit.
    MailboxFull,
    /// The recipient of a save-message request was never registered.
    UnknownRecipient,
    /// The session is not a live registration (e.g. the client went
    /// offline meanwhile): register again.
    UnknownSession,
    /// The server is at a bound (pending requests, clients) and refused.
    Busy,
    /// The server's store could not take the message (its disk is full):
    /// not saved.
    StoreFull,
    /// The server's database is locked by another process: not saved, send
    /// it again.
    StoreBusy,
    /// The source address registered too many new names lately.
    TooManyNames,
    /// The source address sent too many requests just now: send it again
    /// in a moment.
    TooManyRequests,
}

/// Why a registration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// The name is held by a live client (same key, another process).
    InUse,
    /// The name belongs to another key.
    OtherKey,
}

/// Table entries of one datagram.
pub type Entries = heapless::Vec<Entry, MAX_PAGE_ROWS>;

impl Entry {
    /// The row's encoded size in bytes (what it adds to a `Page`).
    pub fn wire_len(&self) -> usize {
        let name = self.name.as_str().len();
        let ip = if self.addr.is_ipv4() { 4 } else { 16 };
        varint_len(name as u64)
            + name
            + 1
            + ip
            + varint_len(u64::from(self.addr.port()))
            + 1
            + crate::crypto::KEY_LEN
    }
}

/// Bytes of postcard's varint for `v`.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Packs `rows` greedily into groups of at most [`PAGE_BYTES`] encoded
/// bytes and [`MAX_PAGE_ROWS`] rows: the rows of each `Page` or `Delta`.
/// Returns how many of `rows` the first group takes (at least one, if any).
pub fn rows_that_fit<'a>(rows: impl IntoIterator<Item = &'a Entry>) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for row in rows {
        bytes += row.wire_len();
        if n == MAX_PAGE_ROWS || (n > 0 && bytes > PAGE_BYTES) {
            break;
        }
        n += 1;
    }
    n
}

/// Sealed mail: a [`MailBody`] sealed by its sender to its recipient's key
/// (Noise `K`, see [`crate::crypto::seal_mail`]). The server stores and
/// forwards it but can neither read nor alter it.
pub type Sealed = heapless::Vec<u8, MAX_SEALED>;

/// What sealed mail holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailBody {
    /// The sender's message id (the one the recipient deduplicates on).
    pub id: MsgId,
    /// The message.
    pub text: Text,
}

/// A stored message as it is delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// A direct message, sealed by the sender; `key` is the sender's key as
    /// the server knew it when it stored the message.
    Sealed {
        /// The sender's static key.
        key: PublicKey,
        /// The sealed [`MailBody`].
        sealed: Sealed,
    },
    /// A message the server relays as it is: a channel message (which the
    /// server reads by design), or a message stored by a server of protocol
    /// version 1.
    Relayed {
        /// A channel message.
        channel: bool,
        /// False for a message of protocol version 1, whose sender nothing
        /// proved. (A direct message relayed is never taken as verified.)
        verified: bool,
        /// The sender's message id.
        id: MsgId,
        /// The message.
        text: Text,
    },
}

/// Every message of the protocol. Variants are appended, never reordered.
///
/// Fields share one vocabulary: `seq` is the request's [`Seq`] (echoed by
/// its answer), `id` a chat message's [`MsgId`], `mail` a stored message's
/// [`MailId`], `version` a client-table version, `nonce` a value the answer
/// echoes. Every message travels inside a Noise session, which is what
/// authenticates it: none carries a token or trusts a name it does not
/// check against the session's key.
#[allow(missing_docs)] // the fields: see the vocabulary above
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    // ---- client → server -------------------------------------------------
    /// Register (or log back in) under `name`, as the session's key.
    /// Answered by `Welcome`, `Rejected`, `Refused` or `Redirect`.
    Register { seq: Seq, name: Name },
    /// Notified leave. Answered by `Ack`.
    Deregister { seq: Seq },
    /// Store sealed mail for `to` (the recipient did not ack a direct
    /// message). Answered by `Ack` (saved), `Exists` or `Refused`.
    SaveMessage {
        seq: Seq,
        to: Name,
        id: MsgId,
        sealed: Sealed,
    },
    /// A channel message for every other client. Answered by `Ack`.
    ChannelSend { seq: Seq, id: MsgId, text: Text },
    /// Ask for the table entries changed after version `since`, starting at
    /// row `from`. Answered by `Page`.
    Sync { seq: Seq, since: u64, from: u32 },
    /// Presence, carrying the client's table version. Answered by `Alive`.
    Heartbeat { seq: Seq, version: u64 },
    /// The client displayed (or had already displayed) a `Deliver`.
    Delivered { mail: MailId },
    /// Answer to `Probe`.
    ProbeReply { nonce: u64 },
    /// Answer to `PathChallenge`, from the address being validated.
    PathResponse { nonce: u64 },

    // ---- server → client -------------------------------------------------
    /// Registration accepted; `mail` stored messages follow as `Deliver`s
    /// with positions `0..mail`. `reset` proves a later stateless reset of
    /// this session.
    Welcome {
        seq: Seq,
        version: u64,
        mail: u32,
        reset: [u8; crate::packet::TOKEN_LEN],
    },
    /// Registration refused.
    Rejected { seq: Seq, reason: Rejection },
    /// The request `seq` was carried out (deregistered, saved, channel
    /// message stored).
    Ack { seq: Seq },
    /// Save-message refused because the recipient is alive at `entry.addr`.
    Exists { seq: Seq, entry: Entry },
    /// The request `seq` was refused.
    Refused { seq: Seq, reason: Refusal },
    /// A page of table rows answering `Sync`, scanned from row `from`;
    /// `next` is the row to ask for next, or `None` when the pass is
    /// complete. Up to [`SYNC_WINDOW`] pages answer one `Sync`, each
    /// continuing where the one before stopped.
    Page {
        seq: Seq,
        version: u64,
        from: u32,
        entries: Entries,
        next: Option<u32>,
    },
    /// Table rows changed in versions `(prev, version]`.
    Delta {
        prev: u64,
        version: u64,
        entries: Entries,
    },
    /// A stored message. `pos` is its place in the batch announced by the
    /// `Welcome` whose `seq` is `batch` (shown in that order; a delayed
    /// datagram of an earlier batch is told apart by it); `None` for a
    /// message sent live.
    Deliver {
        mail: MailId,
        batch: Seq,
        pos: Option<u32>,
        stored_at: i64,
        from: Name,
        content: Content,
    },
    /// "Are you still there?" Answered by `ProbeReply` with the same nonce.
    Probe { nonce: u64 },
    /// Answer to `Heartbeat`, with the server's table version.
    Alive { seq: Seq, version: u64 },
    /// "Do you receive at this new address?" (the client's source address
    /// changed). Answered by `PathResponse` with the same nonce.
    PathChallenge { nonce: u64 },

    // ---- client → client -------------------------------------------------
    /// A direct message. It names sender and recipient; the recipient shows
    /// it only if the session's key is the sender's key in its table.
    Chat {
        from: Name,
        to: Name,
        id: MsgId,
        text: Text,
    },
    /// The direct message `id` was shown (or had been).
    ChatAck { id: MsgId },

    // ---- added by protocol version 2's reachability (appended: earlier
    // variants keep their indexes) -------------------------------------------
    /// Client → server: relay sealed mail for `to`, which is online but
    /// did not answer directly (no path through the NATs between us).
    /// Stored as a save is; answered by `Received` (the recipient acked
    /// the relayed copy), `Ack` (saved: no ack came in time) or `Refused`.
    RelayMessage {
        seq: Seq,
        to: Name,
        id: MsgId,
        sealed: Sealed,
    },
    /// Server → client: a direct message relayed live (shown as a direct
    /// message). Acked with `Delivered { mail }`.
    Relayed {
        mail: MailId,
        from: Name,
        content: Content,
    },
    /// Server → client: the recipient acked the relayed message `seq`.
    Received { seq: Seq },
    /// Server → client: `entry` is trying to reach you and gets no
    /// answer; send it a datagram now, so that the NATs between you let
    /// its retry through (hole punching).
    Punch { entry: Entry },

    // ---- added by several servers sharing one store (appended) ------------
    /// Server → client, answering `Register`: `name`'s home is the server
    /// of the same cluster (the same static key) at `to`; register there.
    /// Sent on the session, so only a holder of the server key can move a
    /// client (an off-path forgery cannot send it elsewhere).
    Redirect { seq: Seq, to: SocketAddr },
}

/// What a datagram carries, for logs, tests and counters (the contents of
/// a `Data` datagram are encrypted; its sender knows what it put in).
#[allow(missing_docs)] // one per packet type and message variant
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum What {
    Initial,
    Retry,
    Busy,
    Response,
    Finish,
    PeerInit,
    PeerResponse,
    Reset,
    Negotiate,
    Register,
    Deregister,
    SaveMessage,
    ChannelSend,
    Sync,
    Heartbeat,
    Delivered,
    ProbeReply,
    PathResponse,
    Welcome,
    Rejected,
    Ack,
    Exists,
    Refused,
    Page,
    Delta,
    Deliver,
    Probe,
    Alive,
    PathChallenge,
    Chat,
    ChatAck,
    RelayMessage,
    Relayed,
    Received,
    Punch,
    Redirect,
}

impl Message {
    /// Which message this is.
    pub fn what(&self) -> What {
        match self {
            Message::Register { .. } => What::Register,
            Message::Deregister { .. } => What::Deregister,
            Message::SaveMessage { .. } => What::SaveMessage,
            Message::ChannelSend { .. } => What::ChannelSend,
            Message::Sync { .. } => What::Sync,
            Message::Heartbeat { .. } => What::Heartbeat,
            Message::Delivered { .. } => What::Delivered,
            Message::ProbeReply { .. } => What::ProbeReply,
            Message::PathResponse { .. } => What::PathResponse,
            Message::Welcome { .. } => What::Welcome,
            Message::Rejected { .. } => What::Rejected,
            Message::Ack { .. } => What::Ack,
            Message::Exists { .. } => What::Exists,
            Message::Refused { .. } => What::Refused,
            Message::Page { .. } => What::Page,
            Message::Delta { .. } => What::Delta,
            Message::Deliver { .. } => What::Deliver,
            Message::Probe { .. } => What::Probe,
            Message::Alive { .. } => What::Alive,
            Message::PathChallenge { .. } => What::PathChallenge,
            Message::Chat { .. } => What::Chat,
            Message::ChatAck { .. } => What::ChatAck,
            Message::RelayMessage { .. } => What::RelayMessage,
            Message::Relayed { .. } => What::Relayed,
            Message::Received { .. } => What::Received,
            Message::Punch { .. } => What::Punch,
            Message::Redirect { .. } => What::Redirect,
        }
    }
}

/// Encodes `msg` into `buf`, returning the length.
///
/// Every message fits in [`MAX_PLAINTEXT`] by construction (checked at
/// compile time below), so this only fails if `buf` is too small.
pub fn encode(msg: &Message, buf: &mut [u8]) -> Result<usize, WireError> {
    postcard::to_slice(msg, buf)
        .map(|used| used.len())
        .map_err(|_| WireError::Oversize(MAX_PLAINTEXT + 1))
}

/// Encodes `msg` into a fresh, exactly sized buffer.
pub fn encode_to_vec(msg: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_PLAINTEXT];
    match encode(msg, &mut buf) {
        Ok(n) => buf[..n].to_vec(),
        // Unreachable: every message fits (see the compile-time check).
        Err(_) => Vec::new(),
    }
}

/// Decodes one message. Rejects empty, oversize, malformed and
/// trailing-byte input.
pub fn decode(data: &[u8]) -> Result<Message, WireError> {
    if data.len() > MAX_PLAINTEXT {
        return Err(WireError::Oversize(data.len()));
    }
    if data.is_empty() {
        return Err(WireError::Empty);
    }
    let (msg, rest) =
        postcard::take_from_bytes::<Message>(data).map_err(|_| WireError::Malformed)?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Encodes a [`MailBody`] (the plaintext that gets sealed).
pub fn encode_body(body: &MailBody) -> Vec<u8> {
    let mut buf = [0u8; MAX_BODY];
    postcard::to_slice(body, &mut buf)
        .map(|b| b.to_vec())
        .unwrap_or_default()
}

/// Decodes a [`MailBody`] (an opened seal), exactly.
pub fn decode_body(data: &[u8]) -> Option<MailBody> {
    match postcard::take_from_bytes::<MailBody>(data) {
        Ok((body, [])) => Some(body),
        _ => None,
    }
}

// ---- worst-case sizes, checked at compile time ------------------------------
// postcard: varint u32 ≤ 5 bytes, u64 ≤ 10, i64 (zigzag) ≤ 10, a string is a
// varint length (≤ 2 bytes below 16384) and its bytes, a bool 1, an Option 1 +
// value, an enum variant index 1 (fewer than 128 variants), a byte array its
// bytes, a bounded byte vector a varint length and its bytes.

const VARINT32: usize = 5;
const VARINT64: usize = 10;
const NAME_MAX: usize = 1 + MAX_NAME;
const TEXT_MAX: usize = 2 + MAX_TEXT;
const KEY_MAX: usize = crate::crypto::KEY_LEN;
const SEALED_MAX: usize = 2 + MAX_SEALED;
/// SocketAddr: variant, 16 address bytes (v6), port as a varint u16.
const ADDR_MAX: usize = 1 + 16 + 3;
const ENTRY_MAX: usize = NAME_MAX + ADDR_MAX + 1 + KEY_MAX;
/// The narrowest row: an empty name, IPv4 with a one-byte port.
const ENTRY_MIN: usize = 1 + (1 + 4 + 1) + 1 + KEY_MAX;
/// The length (fewer than 128 rows: one byte) and the rows.
const ENTRIES_MAX: usize = 1 + PAGE_BYTES;
const _: () = assert!(MAX_PAGE_ROWS < 128);

/// Upper bound of an encoded message, over every variant (the largest ones).
pub const MAX_ENCODED: usize = {
    let page = 1 + VARINT32 + VARINT64 + VARINT32 + ENTRIES_MAX + 1 + VARINT32;
    let delta = 1 + VARINT64 + VARINT64 + ENTRIES_MAX;
    let deliver_head = 1 + VARINT64 + VARINT32 + 1 + VARINT32 + VARINT64 + NAME_MAX + 1;
    let sealed = deliver_head + KEY_MAX + SEALED_MAX;
    let relayed = deliver_head + 1 + 1 + VARINT64 + TEXT_MAX;
    let save = 1 + VARINT32 + NAME_MAX + VARINT64 + SEALED_MAX;
    let chat = 1 + NAME_MAX + NAME_MAX + VARINT64 + TEXT_MAX;
    let mut max = page;
    let all = [delta, sealed, relayed, save, chat];
    let mut i = 0;
    while i < all.len() {
        if all[i] > max {
            max = all[i];
        }
        i += 1;
    }
    max
};

const _: () = assert!(
    MAX_ENCODED <= MAX_PLAINTEXT,
    "a message can exceed one datagram"
);
// A registration rides in the handshake's last message.
const _: () = assert!(1 + VARINT32 + NAME_MAX <= crate::packet::MAX_FINISH_PAYLOAD);

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv6Addr, SocketAddrV6};

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn longest_name(c: char) -> Name {
        name(&c.to_string().repeat(MAX_NAME / c.len_utf8()))
    }

    fn longest_text() -> Text {
        // 250 four-byte characters: exactly MAX_TEXT bytes.
        Text::new(&"😀".repeat(MAX_TEXT / 4)).unwrap()
    }

    fn longest_sealed() -> Sealed {
        (0..MAX_SEALED).map(|i| i as u8).collect()
    }

    fn widest_entry(i: usize) -> Entry {
        let mut n = longest_name('x').as_str().to_string();
        n.replace_range(0..3, &format!("{i:03}"));
        Entry {
            name: name(&n),
            addr: SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::new(
                    0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
                ),
                65535,
                0,
                0,
            )),
            online: true,
            key: PublicKey([0xff; 32]),
        }
    }

    /// A `Page` and a `Delta` of `entries`, every other field at its widest.
    fn table_messages(entries: Entries) -> [Message; 2] {
        [
            Message::Page {
                seq: Seq(u32::MAX),
                version: u64::MAX,
                from: u32::MAX,
                entries: entries.clone(),
                next: Some(u32::MAX),
            },
            Message::Delta {
                prev: u64::MAX,
                version: u64::MAX,
                entries,
            },
        ]
    }

    /// The largest instance of every variant.
    fn largest_messages() -> Vec<Message> {
        let seq = Seq(u32::MAX);
        let id = MsgId(u64::MAX);
        let [page, delta] = table_messages((0..PAGE_ENTRIES).map(widest_entry).collect());
        let deliver = |content| Message::Deliver {
            mail: MailId(u64::MAX),
            batch: seq,
            pos: Some(u32::MAX),
            stored_at: i64::MIN,
            from: longest_name('x'),
            content,
        };
        vec![
            Message::Register {
                seq,
                name: longest_name('é'),
            },
            Message::Deregister { seq },
            Message::SaveMessage {
                seq,
                to: longest_name('x'),
                id,
                sealed: longest_sealed(),
            },
            Message::ChannelSend {
                seq,
                id,
                text: longest_text(),
            },
            Message::Sync {
                seq,
                since: u64::MAX,
                from: u32::MAX,
            },
            Message::Heartbeat {
                seq,
                version: u64::MAX,
            },
            Message::Delivered {
                mail: MailId(u64::MAX),
            },
            Message::ProbeReply { nonce: u64::MAX },
            Message::PathResponse { nonce: u64::MAX },
            Message::Welcome {
                seq,
                version: u64::MAX,
                mail: u32::MAX,
                reset: [0xff; 16],
            },
            Message::Rejected {
                seq,
                reason: Rejection::OtherKey,
            },
            Message::Ack { seq },
            Message::Exists {
                seq,
                entry: widest_entry(1),
            },
            Message::Refused {
                seq,
                reason: Refusal::MailboxFull,
            },
            page,
            delta,
            deliver(Content::Sealed {
                key: PublicKey([0xff; 32]),
                sealed: longest_sealed(),
            }),
            deliver(Content::Relayed {
                channel: true,
                verified: true,
                id,
                text: longest_text(),
            }),
            Message::Probe { nonce: u64::MAX },
            Message::Alive {
                seq,
                version: u64::MAX,
            },
            Message::PathChallenge { nonce: u64::MAX },
            Message::Chat {
                from: longest_name('x'),
                to: longest_name('y'),
                id,
                text: longest_text(),
            },
            Message::ChatAck { id },
            Message::RelayMessage {
                seq,
                to: longest_name('x'),
                id,
                sealed: longest_sealed(),
            },
            Message::Relayed {
                mail: MailId(u64::MAX),
                from: longest_name('x'),
                content: Content::Sealed {
                    key: PublicKey([0xff; 32]),
                    sealed: longest_sealed(),
                },
            },
            Message::Received { seq },
            Message::Punch {
                entry: widest_entry(2),
            },
            Message::Redirect {
                seq,
                to: SocketAddr::from(([0xffff; 8], u16::MAX)),
            },
        ]
    }

    #[test]
    fn every_variant_round_trips_within_the_datagram_bound() {
        let mut whats = std::collections::HashSet::new();
        for msg in largest_messages() {
            let bytes = encode_to_vec(&msg);
            assert!(!bytes.is_empty(), "{msg:?} did not encode");
            assert!(
                bytes.len() <= MAX_ENCODED,
                "{msg:?} is {} bytes",
                bytes.len()
            );
            assert_eq!(decode(&bytes), Ok(msg.clone()));
            whats.insert(msg.what());
        }
        // Every message variant (the packet types are the other eight).
        assert_eq!(whats.len(), 27);
    }

    #[test]
    fn a_rows_wire_len_is_its_encoding() {
        let v4 = |port| SocketAddr::from(([203, 0, 113, 9], port));
        let v6 = |port| SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 7, 9));
        let mut rows = Vec::new();
        for port in [0, 127, 128, 16_383, 16_384, 65_535] {
            for n in [name("a"), longest_name('y')] {
                for addr in [v4(port), v6(port)] {
                    let key = PublicKey([3; 32]);
                    rows.push(Entry {
                        name: n.clone(),
                        addr,
                        online: port % 2 == 0,
                        key,
                    });
                }
            }
        }
        for row in rows {
            let bytes = postcard::to_allocvec(&row).unwrap();
            assert_eq!(row.wire_len(), bytes.len(), "{row:?}");
        }
    }

    #[test]
    fn pages_of_the_narrowest_and_the_widest_rows_fit_a_datagram() {
        let narrow = Entry {
            name: name("a"),
            addr: SocketAddr::from(([10, 0, 0, 1], 1)),
            online: true,
            key: PublicKey([1; 32]),
        };
        let wide = widest_entry(0);
        for row in [narrow, wide] {
            let n = rows_that_fit(std::iter::repeat_n(&row, 1000));
            let entries: Entries = std::iter::repeat_n(row.clone(), n).collect();
            for msg in table_messages(entries) {
                let bytes = encode_to_vec(&msg);
                assert!(bytes.len() <= MAX_ENCODED, "{n} rows: {}", bytes.len());
                assert_eq!(decode(&bytes).unwrap(), msg);
            }
            assert!(n >= PAGE_ENTRIES, "{n} rows of {row:?}");
        }
        // Typical rows (short names, IPv4) fit more than the widest.
        let typical = Entry {
            name: name("load1234"),
            addr: SocketAddr::from(([127, 1, 2, 3], 40_000)),
            online: true,
            key: PublicKey([1; 32]),
        };
        assert!(rows_that_fit(std::iter::repeat_n(&typical, 1000)) >= 2 * PAGE_ENTRIES - 4);
    }

    #[test]
    fn the_largest_body_fits_its_seal() {
        let body = MailBody {
            id: MsgId(u64::MAX),
            text: longest_text(),
        };
        let bytes = encode_body(&body);
        assert!(bytes.len() <= MAX_BODY, "{}", bytes.len());
        assert_eq!(decode_body(&bytes), Some(body));
        assert_eq!(decode_body(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_body(&longer), None);
    }

    #[test]
    fn every_truncation_is_rejected_without_panic() {
        for msg in largest_messages() {
            let bytes = encode_to_vec(&msg);
            for cut in 0..bytes.len() {
                let got = decode(&bytes[..cut]);
                assert!(got.is_err(), "{msg:?} cut at {cut} decoded as {got:?}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode_to_vec(&Message::Ack { seq: Seq(7) });
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(WireError::Trailing(1)));
    }

    #[test]
    fn oversize_empty_and_unknown_variants_are_rejected() {
        assert_eq!(decode(&[]), Err(WireError::Empty));
        assert_eq!(
            decode(&[0; MAX_PLAINTEXT + 1]),
            Err(WireError::Oversize(MAX_PLAINTEXT + 1))
        );
        assert_eq!(decode(&[120]), Err(WireError::Malformed));
    }

    /// The variant index of `Chat`, from the encoder itself.
    fn chat_variant() -> u8 {
        encode_to_vec(&Message::Chat {
            from: name("a"),
            to: name("b"),
            id: MsgId(0),
            text: Text::new("c").unwrap(),
        })[0]
    }

    /// Builds `Chat` (to "Al") by hand so the string fields can break the
    /// rules.
    fn raw_chat(from: &str, text: &str) -> Vec<u8> {
        let mut out = vec![chat_variant()];
        push_str(&mut out, from);
        push_str(&mut out, "Al");
        out.push(1); // id
        push_str(&mut out, text);
        out
    }

    fn push_str(out: &mut Vec<u8>, s: &str) {
        let mut n = s.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(s.as_bytes());
    }

    #[test]
    fn hand_built_chat_decodes() {
        let bytes = raw_chat("Bob", "hi");
        assert_eq!(
            decode(&bytes),
            Ok(Message::Chat {
                from: name("Bob"),
                to: name("Al"),
                id: MsgId(1),
                text: Text::new("hi").unwrap()
            })
        );
    }

    #[test]
    fn over_long_and_invalid_strings_are_rejected() {
        let long_name = "n".repeat(MAX_NAME + 1);
        assert_eq!(
            decode(&raw_chat(&long_name, "hi")),
            Err(WireError::Malformed)
        );
        assert_eq!(
            decode(&raw_chat("two words", "hi")),
            Err(WireError::Malformed)
        );
        assert_eq!(decode(&raw_chat("", "hi")), Err(WireError::Malformed));
        assert_eq!(decode(&raw_chat("Bob", "")), Err(WireError::Malformed));
        let long_text = "t".repeat(MAX_TEXT + 1);
        assert_eq!(
            decode(&raw_chat("Bob", &long_text)),
            Err(WireError::Malformed)
        );
    }

    #[test]
    fn a_length_prefix_beyond_the_datagram_is_rejected_without_allocating() {
        // A string length of 2^35: postcard must notice the bytes are not
        // there rather than reserve memory for them.
        let bytes = [chat_variant(), 0x80, 0x80, 0x80, 0x80, 0x40, b'a'];
        assert_eq!(decode(&bytes), Err(WireError::Malformed));
    }

    #[test]
    fn a_sealed_field_longer_than_its_bound_is_rejected() {
        let mut bytes = encode_to_vec(&Message::SaveMessage {
            seq: Seq(1),
            to: name("Bob"),
            id: MsgId(2),
            sealed: longest_sealed(),
        });
        // Claim one byte more than the bound and supply it.
        let at = bytes.len() - MAX_SEALED - 2;
        let n = MAX_SEALED + 1;
        bytes[at] = (n & 0x7f) as u8 | 0x80;
        bytes[at + 1] = (n >> 7) as u8;
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(WireError::Malformed));
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let mut bytes = raw_chat("Bob", "ab");
        let last = bytes.len() - 1;
        bytes[last] = 0xff;
        assert_eq!(decode(&bytes), Err(WireError::Malformed));
    }

    #[test]
    fn name_rules() {
        assert_eq!(Name::new(""), Err(FieldError::Empty));
        assert_eq!(Name::new("a\tb"), Err(FieldError::BadChar));
        assert_eq!(Name::new("a\u{7}"), Err(FieldError::BadChar));
        assert_eq!(Name::new(&"é".repeat(17)), Err(FieldError::TooLong(34)));
        assert!(Name::new("张伟").is_ok());
        assert_ne!(name("alice"), name("Alice"));
    }

    #[test]
    fn text_is_refused_whole_never_cut() {
        let s = "€".repeat(334); // 1002 bytes
        assert_eq!(Text::new(&s), Err(FieldError::TooLong(1002)));
        assert_eq!(Text::new(&s[..999]).unwrap().as_str().len(), 999);
    }
}
