//! What a stored row must be, for every database: the checks that turn a
//! row's columns into a [`StoredMail`], [`ChannelMail`] or
//! [`ClientRecord`], or into a message naming what is wrong with it. Each
//! store reads its own column types and hands the values here, so SQLite
//! and PostgreSQL refuse exactly the same rows.

use std::net::SocketAddr;
use std::str::FromStr;

use crate::crypto::PublicKey;
use crate::store::{Body, ChannelMail, ClientRecord, StoredMail};
use crate::wire::{MAX_SEALED, MAX_TEXT, MailId, MsgId, Name};

/// `mail.kind`: what `body` holds.
pub const KIND_CLEAR: i64 = 0;
pub const KIND_SEALED: i64 = 1;
pub const KIND_AT_REST: i64 = 2;
pub const KIND_LEGACY: i64 = 3;

/// A `mail` row's columns.
pub struct MailColumns {
    pub id: i64,
    pub to: String,
    pub from: String,
    pub channel: i64,
    pub stored_at: i64,
    pub msg_id: i64,
    pub kind: i64,
    pub body: Vec<u8>,
    /// `sender_key`, if not NULL.
    pub key: Option<Vec<u8>>,
}

/// A `channel` row's columns, with who acked it.
pub struct ChannelColumns {
    pub id: i64,
    pub from: String,
    pub stored_at: i64,
    pub msg_id: i64,
    pub body: Vec<u8>,
    /// The recipients it was stored for.
    pub pending: Vec<String>,
    /// Those who acked it.
    pub acked: Vec<String>,
    /// The count of recipients still owed it, as stored.
    pub left: i64,
}

/// `name` as a valid name.
pub fn name(col: &str, s: &str) -> Result<Name, String> {
    Name::new(s).map_err(|e| format!("{col} {s:?} is not a valid name: {e}"))
}

/// A `key` or `sender_key` column: 32 bytes.
pub fn key(col: &str, b: &[u8]) -> Result<PublicKey, String> {
    b.try_into()
        .map(PublicKey)
        .map_err(|_| format!("{col} is {} bytes, not 32", b.len()))
}

/// A registry row.
pub fn client(
    name_col: &str,
    addr: &str,
    key_col: Option<&[u8]>,
    seen_at: Option<i64>,
) -> Result<ClientRecord, String> {
    let name = name("name", name_col)?;
    let addr = SocketAddr::from_str(addr)
        .map_err(|_| format!("addr {addr:?} of {name} is not an ip:port address"))?;
    let key = key_col.map(|k| key("key", k)).transpose()?;
    Ok(ClientRecord {
        name,
        addr,
        key,
        seen_at,
    })
}

/// A stored id as a [`MailId`].
pub fn mail_id(id: i64) -> Result<MailId, String> {
    u64::try_from(id)
        .map(MailId)
        .map_err(|_| "negative id".to_string())
}

/// A message's `mail` row.
pub fn mail(c: MailColumns) -> Result<StoredMail, String> {
    let mail = mail_id(c.id)?;
    let to = name("recipient", &c.to)?;
    let from = name("sender", &c.from)?;
    let channel = match c.channel {
        0 => false,
        1 => true,
        n => return Err(format!("channel is {n}, not 0 or 1")),
    };
    let body = match c.kind {
        KIND_CLEAR => {
            let text =
                String::from_utf8(c.body).map_err(|_| "body is not valid UTF-8".to_string())?;
            if !(1..=MAX_TEXT).contains(&text.len()) {
                return Err(format!(
                    "text is {} bytes long (must be 1 to {MAX_TEXT})",
                    text.len()
                ));
            }
            Body::Clear(text)
        }
        KIND_SEALED => Body::Sealed {
            key: match &c.key {
                Some(k) => key("sender_key", k)?,
                None => return Err("sender_key is NULL, not a 32-byte blob".to_string()),
            },
            sealed: c.body,
        },
        KIND_AT_REST => Body::AtRest(c.body),
        KIND_LEGACY => Body::Legacy(c.body),
        n => return Err(format!("kind is {n}, not 0, 1, 2 or 3")),
    };
    if body.is_empty() || body.len() > MAX_SEALED {
        return Err(format!(
            "body is {} bytes long (must be 1 to {MAX_SEALED})",
            body.len()
        ));
    }
    Ok(StoredMail {
        mail,
        to,
        from,
        channel,
        stored_at: c.stored_at,
        id: MsgId(c.msg_id.cast_unsigned()),
        body,
    })
}

/// The names of `pending` not in `acked`, each once.
pub fn still_owed<'a>(
    pending: impl IntoIterator<Item = &'a str>,
    acked: impl IntoIterator<Item = &'a str>,
) -> impl Iterator<Item = &'a str> {
    let acked: std::collections::HashSet<&str> = acked.into_iter().collect();
    let mut seen = std::collections::HashSet::new();
    pending
        .into_iter()
        .filter(move |n| !n.is_empty() && !acked.contains(n) && seen.insert(*n))
}

/// A channel message's row: the message, with each recipient still owed
/// it once.
pub fn channel(c: ChannelColumns) -> Result<ChannelMail, String> {
    let mail = mail_id(c.id)?;
    let from = name("sender", &c.from)?;
    if !(1..=MAX_SEALED).contains(&c.body.len()) {
        return Err(format!(
            "body is {} bytes long (must be 1 to {MAX_SEALED})",
            c.body.len()
        ));
    }
    let mut to = still_owed(
        c.pending.iter().map(String::as_str),
        c.acked.iter().map(String::as_str),
    )
    .map(|n| name("pending", n))
    .collect::<Result<Vec<Name>, String>>()?;
    // A row nobody is owed is never left behind; one (a hand edit) would
    // hide its id from the server, which could then give it out again.
    if to.is_empty() {
        return Err("pending is empty, or all of it acked".to_string());
    }
    // Counted down by acks; anything but a whole number no larger than
    // the names (a hand edit) would stop the first ack's commit.
    if !(0..=to.len() as i64).contains(&c.left) {
        return Err(format!("left is {}, not 0 to {}", c.left, to.len()));
    }
    to.sort_unstable();
    Ok(ChannelMail {
        mail,
        from,
        stored_at: c.stored_at,
        id: MsgId(c.msg_id.cast_unsigned()),
        body: c.body.into(),
        to,
    })
}

/// `kind`, `body` and `sender_key`.
pub type BodyColumns = (i64, Vec<u8>, Option<Vec<u8>>);

/// A body's `kind`, `body` and `sender_key` columns. A body no load would
/// accept is refused here, before it could stop the next start; `Err`
/// names what is wrong with it.
pub fn body_columns(body: &Body) -> Result<BodyColumns, String> {
    if !body.fits() {
        return Err(format!("body of {} bytes", body.len()));
    }
    Ok(match body {
        Body::Sealed { key, sealed } => (KIND_SEALED, sealed.clone(), Some(key.0.to_vec())),
        Body::AtRest(b) => (KIND_AT_REST, b.clone(), None),
        Body::Legacy(b) => (KIND_LEGACY, b.clone(), None),
        // Never a `mail` row: only `StoreOp::Channel` stores one.
        Body::Channel(_) => return Err("a shared channel body".to_string()),
        Body::Clear(t) => (KIND_CLEAR, t.as_bytes().to_vec(), None),
    })
}
