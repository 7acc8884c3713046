//! The wire format: one datagram carries one [`Message`], encoded as a
//! protocol version byte followed by the message in `postcard`.
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

/// The protocol version this build speaks; the first byte of every datagram.
pub const VERSION: u8 = 1;
/// No datagram is larger than this (a conservative path MTU for UDP).
pub const MAX_DATAGRAM: usize = 1200;
/// Longest client name, in bytes of UTF-8.
pub const MAX_NAME: usize = 32;
/// Longest chat message, in bytes of UTF-8.
pub const MAX_TEXT: usize = 1000;
/// Client-table entries carried by one `Page` or `Delta` datagram.
pub const PAGE_ENTRIES: usize = 20;

/// Why a datagram was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Zero bytes: not even a version.
    Empty,
    /// Larger than [`MAX_DATAGRAM`].
    Oversize(usize),
    /// A version byte this build does not speak.
    Version(u8),
    /// The bytes after the version are not a valid message (bad variant,
    /// truncated, string too long, invalid name, …).
    Malformed,
    /// A valid message followed by extra bytes.
    Trailing(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Empty => write!(f, "empty datagram"),
            WireError::Oversize(n) => write!(f, "datagram of {n} bytes exceeds {MAX_DATAGRAM}"),
            WireError::Version(v) => write!(f, "unknown protocol version {v}"),
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

/// A 128-bit session token given by the server in [`Message::Welcome`].
/// Every later request carries it; the server also checks the source address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Token(pub [u8; 16]);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Half the token is plenty to tell sessions apart in a log.
        write!(f, "Token(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Request sequence number; an ack or reply echoes it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Seq(pub u32);

/// A chat message's id, chosen by its sender; (sender, id) is unique and is
/// what receivers deduplicate on, end to end through the mailbox.
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
    /// The source address the server saw the client register from.
    pub addr: SocketAddr,
    /// Whether the server believes the client is online.
    pub online: bool,
}

/// Why the server refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The recipient's mailbox (or the server's store) is over its limit.
    MailboxFull,
    /// The recipient of a save-message request was never registered.
    UnknownRecipient,
    /// The token is not a live session (e.g. the server restarted).
    UnknownSession,
    /// The server is at a bound (pending requests, clients) and refused.
    Busy,
}

/// Table entries of one datagram.
pub type Entries = heapless::Vec<Entry, PAGE_ENTRIES>;

/// Every message of the protocol. Variants are appended, never reordered.
///
/// Fields share one vocabulary: `seq` is the request's [`Seq`] (echoed by its
/// answer), `token` the session [`Token`], `id` a chat message's [`MsgId`],
/// `mail` a stored message's [`MailId`], `version` a client-table version.
#[allow(missing_docs)] // the fields: see the vocabulary above
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    // ---- client → server -------------------------------------------------
    /// Register (or log back in) under `name`. Answered by `Welcome` or
    /// `Rejected`.
    Register { seq: Seq, name: Name },
    /// Notified leave. Answered by `Ack`.
    Deregister { seq: Seq, token: Token },
    /// Store `text` for `to` (the recipient did not ack a direct message).
    /// Answered by `Ack` (saved), `Exists` or `Refused`.
    SaveMessage {
        seq: Seq,
        token: Token,
        to: Name,
        id: MsgId,
        text: Text,
    },
    /// A channel message for every other client. Answered by `Ack`.
    ChannelSend {
        seq: Seq,
        token: Token,
        id: MsgId,
        text: Text,
    },
    /// Ask for the table entries changed after version `since`, starting at
    /// row `from`. Answered by `Page`.
    Sync {
        seq: Seq,
        token: Token,
        since: u64,
        from: u32,
    },
    /// Presence, carrying the client's table version. Answered by `Alive`.
    Heartbeat {
        seq: Seq,
        token: Token,
        version: u64,
    },
    /// The client displayed (or had already displayed) a `Deliver`.
    Delivered { token: Token, mail: MailId },
    /// Answer to `Probe`.
    ProbeReply { nonce: u64 },

    // ---- server → client -------------------------------------------------
    /// Registration accepted; `mail` stored messages follow as `Deliver`s
    /// with positions `0..mail`.
    Welcome {
        seq: Seq,
        token: Token,
        version: u64,
        mail: u32,
    },
    /// The name is held by a live client.
    Rejected { seq: Seq },
    /// The request `seq` was carried out (deregistered, saved, channel
    /// message stored).
    Ack { seq: Seq },
    /// Save-message refused because the recipient is alive at `entry.addr`.
    Exists { seq: Seq, entry: Entry },
    /// The request `seq` was refused.
    Refused { seq: Seq, reason: Refusal },
    /// A page of table rows answering `Sync`; `next` is the row to ask for
    /// next, or `None` when the pass is complete.
    Page {
        seq: Seq,
        version: u64,
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
        from: Name,
        channel: bool,
        stored_at: i64,
        id: MsgId,
        text: Text,
    },
    /// "Are you still `name`?" Answered by `ProbeReply` with the same nonce.
    Probe { nonce: u64, name: Name },

    // ---- client → client -------------------------------------------------
    /// A direct message. It names its recipient, so a client that now
    /// holds an address the sender's table gives to someone else neither
    /// shows nor acks it.
    Chat {
        from: Name,
        to: Name,
        id: MsgId,
        text: Text,
    },
    /// The direct message `id` was shown (or had been).
    ChatAck { id: MsgId },

    // ---- server → client (appended) --------------------------------------
    /// Answer to `Heartbeat`, with the server's table version.
    Alive { seq: Seq, version: u64 },
}

/// Encodes `msg` (with the version byte) into `buf`, returning the length.
///
/// Every message fits in [`MAX_DATAGRAM`] by construction (checked at
/// compile time below), so this only fails if `buf` is too small.
pub fn encode(msg: &Message, buf: &mut [u8]) -> Result<usize, WireError> {
    let (first, rest) = buf.split_first_mut().ok_or(WireError::Empty)?;
    *first = VERSION;
    let used = postcard::to_slice(msg, rest)
        .map_err(|_| WireError::Oversize(MAX_DATAGRAM + 1))?
        .len();
    Ok(1 + used)
}

/// Encodes `msg` into a fresh, exactly sized buffer.
pub fn encode_to_vec(msg: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    match encode(msg, &mut buf) {
        Ok(n) => buf[..n].to_vec(),
        // Unreachable: every message fits (see the compile-time check).
        Err(_) => Vec::new(),
    }
}

/// Decodes one datagram. Rejects empty, oversize, wrong-version, malformed
/// and trailing-byte input.
pub fn decode(data: &[u8]) -> Result<Message, WireError> {
    if data.len() > MAX_DATAGRAM {
        return Err(WireError::Oversize(data.len()));
    }
    let (&version, body) = data.split_first().ok_or(WireError::Empty)?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let (msg, rest) =
        postcard::take_from_bytes::<Message>(body).map_err(|_| WireError::Malformed)?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    Ok(msg)
}

// ---- worst-case sizes, checked at compile time ------------------------------
// postcard: varint u32 ≤ 5 bytes, u64 ≤ 10, i64 (zigzag) ≤ 10, a string is a
// varint length (≤ 2 bytes below 16384) and its bytes, a bool 1, an Option 1 +
// value, an enum variant index 1 (fewer than 128 variants).

const VARINT32: usize = 5;
const VARINT64: usize = 10;
const NAME_MAX: usize = 1 + MAX_NAME;
const TEXT_MAX: usize = 2 + MAX_TEXT;
/// SocketAddr: variant, 16 address bytes (v6), port as a varint u16.
const ADDR_MAX: usize = 1 + 16 + 3;
const ENTRY_MAX: usize = NAME_MAX + ADDR_MAX + 1;
const ENTRIES_MAX: usize = 1 + PAGE_ENTRIES * ENTRY_MAX;

/// Upper bound of an encoded datagram, over every variant (the largest ones).
pub const MAX_ENCODED: usize = {
    let page = 1 + VARINT32 + VARINT64 + ENTRIES_MAX + 1 + VARINT32;
    let delta = 1 + VARINT64 + VARINT64 + ENTRIES_MAX;
    let deliver =
        1 + VARINT64 + VARINT32 + 1 + VARINT32 + NAME_MAX + 1 + VARINT64 + VARINT64 + TEXT_MAX;
    let save = 1 + VARINT32 + 16 + NAME_MAX + VARINT64 + TEXT_MAX;
    let chat = 1 + NAME_MAX + NAME_MAX + VARINT64 + TEXT_MAX;
    let mut max = page;
    if delta > max {
        max = delta;
    }
    if deliver > max {
        max = deliver;
    }
    if save > max {
        max = save;
    }
    if chat > max {
        max = chat;
    }
    1 + max
};

const _: () = assert!(
    MAX_ENCODED <= MAX_DATAGRAM,
    "a message can exceed one datagram"
);

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
        }
    }

    /// The largest instance of every variant.
    fn largest_messages() -> Vec<Message> {
        let seq = Seq(u32::MAX);
        let token = Token([0xff; 16]);
        let id = MsgId(u64::MAX);
        let entries: Entries = (0..PAGE_ENTRIES).map(widest_entry).collect();
        vec![
            Message::Register {
                seq,
                name: longest_name('é'),
            },
            Message::Deregister { seq, token },
            Message::SaveMessage {
                seq,
                token,
                to: longest_name('x'),
                id,
                text: longest_text(),
            },
            Message::ChannelSend {
                seq,
                token,
                id,
                text: longest_text(),
            },
            Message::Sync {
                seq,
                token,
                since: u64::MAX,
                from: u32::MAX,
            },
            Message::Heartbeat {
                seq,
                token,
                version: u64::MAX,
            },
            Message::Delivered {
                token,
                mail: MailId(u64::MAX),
            },
            Message::ProbeReply { nonce: u64::MAX },
            Message::Welcome {
                seq,
                token,
                version: u64::MAX,
                mail: u32::MAX,
            },
            Message::Rejected { seq },
            Message::Ack { seq },
            Message::Exists {
                seq,
                entry: widest_entry(1),
            },
            Message::Refused {
                seq,
                reason: Refusal::MailboxFull,
            },
            Message::Page {
                seq,
                version: u64::MAX,
                entries: entries.clone(),
                next: Some(u32::MAX),
            },
            Message::Delta {
                prev: u64::MAX,
                version: u64::MAX,
                entries,
            },
            Message::Deliver {
                mail: MailId(u64::MAX),
                batch: seq,
                pos: Some(u32::MAX),
                from: longest_name('x'),
                channel: true,
                stored_at: i64::MIN,
                id,
                text: longest_text(),
            },
            Message::Probe {
                nonce: u64::MAX,
                name: longest_name('x'),
            },
            Message::Chat {
                from: longest_name('x'),
                to: longest_name('y'),
                id,
                text: longest_text(),
            },
            Message::ChatAck { id },
            Message::Alive {
                seq,
                version: u64::MAX,
            },
        ]
    }

    #[test]
    fn every_variant_round_trips_within_the_datagram_bound() {
        for msg in largest_messages() {
            let bytes = encode_to_vec(&msg);
            assert!(!bytes.is_empty(), "{msg:?} did not encode");
            assert!(
                bytes.len() <= MAX_ENCODED,
                "{msg:?} is {} bytes",
                bytes.len()
            );
            assert_eq!(bytes[0], VERSION);
            assert_eq!(decode(&bytes), Ok(msg));
        }
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
    fn oversize_empty_and_wrong_version_are_rejected() {
        assert_eq!(decode(&[]), Err(WireError::Empty));
        assert_eq!(
            decode(&[VERSION; MAX_DATAGRAM + 1]),
            Err(WireError::Oversize(MAX_DATAGRAM + 1))
        );
        let mut bytes = encode_to_vec(&Message::Ack { seq: Seq(7) });
        bytes[0] = VERSION + 1;
        assert_eq!(decode(&bytes), Err(WireError::Version(VERSION + 1)));
        // An unknown variant index.
        assert_eq!(decode(&[VERSION, 120]), Err(WireError::Malformed));
    }

    /// Builds `Chat` (to "Al") by hand so the string fields can break the
    /// rules.
    fn raw_chat(from: &str, text: &str) -> Vec<u8> {
        let mut out = vec![VERSION, 17]; // Message::Chat
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
        let bytes = [VERSION, 17, 0x80, 0x80, 0x80, 0x80, 0x40, b'a'];
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
