//! Mailboxes: mail held in store order, counted in bytes, kept once,
//! expired, its bodies let go to disk and fetched back.

use super::*;

/// How long undelivered mail is kept by default.
pub const MAIL_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often expired mail an online recipient still holds is looked at
/// again.
pub(super) const EXPIRY_RECHECK: Duration = Duration::from_secs(60);

/// A stored message as the server holds it: what delivery, duplicate
/// checks and the limits need. Its body is in memory only until it is
/// committed and while it is being delivered; otherwise it is on disk,
/// fetched ([`Server::poll_fetch`]) when a delivery needs it, so the
/// server's memory does not grow with the bytes it stores.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) from: Name,
    pub(super) channel: bool,
    /// Stored once for all its recipients ([`Body::Channel`]).
    pub(super) shared: bool,
    pub(super) stored_at: i64,
    pub(super) id: MsgId,
    /// The body's bytes, in memory or not.
    pub(super) len: u32,
    pub(super) body: Option<Box<Body>>,
    /// A fetch of the body is under way.
    pub(super) fetching: bool,
    /// Relayed live: delivered as a direct message while its recipient is
    /// online ([`Message::Relayed`]).
    pub(super) relayed: bool,
}

impl Held {
    /// `m`, with its body in memory.
    pub(super) fn new(m: &StoredMail) -> Held {
        Held {
            from: m.from.clone(),
            channel: m.channel,
            shared: matches!(m.body, Body::Channel(_)),
            stored_at: m.stored_at,
            id: m.id,
            len: u32::try_from(m.body.len()).unwrap_or(u32::MAX),
            body: Some(Box::new(m.body.clone())),
            fetching: false,
            relayed: false,
        }
    }

    /// Bytes counted against mailbox limits ([`StoredMail::size`]).
    pub(super) fn size(&self) -> usize {
        self.len as usize + MAIL_OVERHEAD
    }
}

#[derive(Debug, Default)]
pub(super) struct Mailbox {
    /// Boxed: a B-tree node holds eleven values, so an unboxed one costs
    /// ~1 KB for a mailbox's first message, and a channel fan-out makes
    /// a thousand of them at once.
    pub(super) mail: BTreeMap<MailId, Box<Held>>,
    /// How many messages hash to each (sender, message id)
    /// ([`Server::dedup_key`]): 21 bytes a message where the pairs
    /// themselves took 63. A hit is confirmed against the messages.
    pub(super) keys: HashMap<u64, u32>,
    pub(super) bytes: usize,
}

/// Message `mail` in `to`'s mailbox.
pub(super) fn held(
    boxes: &HashMap<ClientId, Mailbox>,
    to: ClientId,
    mail: MailId,
) -> Option<&Held> {
    boxes.get(&to)?.mail.get(&mail).map(|m| &**m)
}

/// [`held`], to change.
pub(super) fn held_mut(
    boxes: &mut HashMap<ClientId, Mailbox>,
    to: ClientId,
    mail: MailId,
) -> Option<&mut Held> {
    boxes.get_mut(&to)?.mail.get_mut(&mail).map(|m| &mut **m)
}

impl Server {
    /// Messages waiting for `name`, in store order.
    pub fn mailbox(&self, name: &Name) -> impl Iterator<Item = Waiting> {
        self.table
            .lookup(name)
            .and_then(|id| self.mailboxes.get(&id))
            .into_iter()
            .flat_map(|mb| {
                mb.mail.iter().map(|(&mail, m)| Waiting {
                    mail,
                    from: m.from.clone(),
                    channel: m.channel,
                    shared: m.shared,
                    stored_at: m.stored_at,
                    id: m.id,
                    len: m.len as usize,
                    in_memory: m.body.is_some(),
                })
            })
    }

    /// The next stored body a delivery needs: the driver reads it from
    /// the store ([`crate::store::Store::fetch`]) and hands it to
    /// [`Server::handle_fetched`].
    #[must_use]
    pub fn poll_fetch(&mut self) -> Option<(Name, MailId)> {
        while let Some((to, mail)) = self.fetches.pop_front() {
            let wanted = held(&self.mailboxes, to, mail).is_some_and(|m| m.fetching);
            if wanted {
                return Some((self.table.get(to).name.clone(), mail));
            }
        }
        None
    }

    /// Whether a [`Server::poll_fetch`] or a [`Server::poll_mailboxes`] is
    /// waiting.
    pub fn wants_fetch(&self) -> bool {
        !self.fetches.is_empty() || !self.loads.is_empty()
    }

    /// What the store gave for a [`Server::poll_fetch`]. A body that is
    /// missing, or not the one stored (its length, its kind, its sender's
    /// key, its encryption), is dropped with a log line, as at load; a
    /// read that failed is tried again with the delivery's next resend.
    pub fn handle_fetched(
        &mut self,
        now: Instant,
        to: &Name,
        mail: MailId,
        fetched: std::io::Result<Option<Body>>,
    ) {
        self.now = self.now.max(now);
        let Some(id) = self.table.lookup(to) else {
            return;
        };
        let Some(m) = held_mut(&mut self.mailboxes, id, mail) else {
            return;
        };
        if !std::mem::replace(&mut m.fetching, false) {
            return;
        }
        let body = match fetched {
            Ok(body) => body,
            Err(_) => return,
        };
        let Some(m) = held(&self.mailboxes, id, mail) else {
            return;
        };
        let genuine = body.as_ref().is_some_and(|b| {
            // A version-1 clear body whose rewrite has not committed yet
            // (a failing store) is still the message, shown unverified.
            (b.len() == m.len as usize || matches!(b, Body::Clear(_)))
                && matches!(b, Body::Channel(_)) == m.shared
                && self.vouched(&m.from, b)
                && self.content(to, mail, m, b).is_some()
        });
        if !genuine {
            self.event(ServerEvent::Undecryptable(to.clone(), mail));
            self.cancel_delivery(id, mail);
            self.delete(id, mail);
            self.pump(now, id);
            return;
        }
        if let Some(m) = held_mut(&mut self.mailboxes, id, mail) {
            m.body = body.map(Box::new);
        }
        let inflight = (self.sessions.get_mut(id.index() as usize))
            .and_then(|s| s.inflight.get(&mail))
            .map(|f| f.pos);
        if let Some(pos) = inflight {
            self.transmit_delivery(id, mail, pos);
        }
    }

    /// Whether sealed mail is sealed with the key `from`'s name is bound
    /// to (a forgery written into the store would be vouched for).
    pub(super) fn vouched(&self, from: &Name, body: &Body) -> bool {
        let Body::Sealed { key, .. } = body else {
            return true;
        };
        let bound = self.table.lookup(from).map(|id| self.table.get(id).key);
        bound == Some(*key)
    }

    /// Total bytes held in mailboxes.
    pub fn stored_bytes(&self) -> usize {
        self.stored_bytes
    }

    /// Stores a direct message for `to` unless it is already there (a
    /// retry); `relay`: to be relayed live (the log says so). `Ok(Some(id))`
    /// for a new message, `Ok(None)` for a duplicate.
    pub(super) fn put(
        &mut self,
        now: Instant,
        to: ClientId,
        mail: NewMail,
        relay: bool,
    ) -> Result<Option<MailId>, Refusal> {
        let stored = StoredMail {
            mail: self.mail_id_of(self.next_mail),
            to: self.table.get(to).name.clone(),
            from: mail.from,
            channel: false,
            stored_at: self.unix_time(now),
            id: mail.id,
            body: mail.body,
        };
        if !self.admit(now, to, &stored)? {
            return Ok(None);
        }
        self.next_mail += 1;
        (self.batch.keys).insert((to, stored.from.clone(), stored.id), stored.mail);
        let (to_name, from) = (stored.to.clone(), stored.from.clone());
        self.batch.stored.push(if relay {
            ServerEvent::Relaying { to: to_name, from }
        } else {
            ServerEvent::Stored {
                to: to_name,
                from,
                channel: false,
            }
        });
        let id = stored.mail;
        self.store_ops.push_back(StoreOp::Put(stored));
        Ok(Some(id))
    }

    /// Puts a message into `to`'s mailbox, as part of the batch under
    /// way, unless its (sender, id) is there already (`Ok(false)`: a
    /// retry). The caller emits the store operation.
    pub(super) fn admit(
        &mut self,
        now: Instant,
        to: ClientId,
        stored: &StoredMail,
    ) -> Result<bool, Refusal> {
        let held = Held::new(stored);
        let cost = self.cost(stored.mail, &held);
        let key = self.dedup_key(&stored.from, stored.id);
        let mb = self.mailboxes.entry(to).or_default();
        if mb.keys.contains_key(&key)
            && (mb.mail.values()).any(|m| m.id == stored.id && m.from == stored.from)
        {
            return Ok(false);
        }
        // A mailbox counts every message whole: it is what its owner is
        // sent, shared or not.
        let size = held.size();
        if mb.mail.len() >= self.config.mailbox_messages
            || mb.bytes + size > self.config.mailbox_bytes
            || self.stored_bytes + cost > self.config.store_bytes
        {
            return Err(Refusal::MailboxFull);
        }
        mb.bytes += size;
        *mb.keys.entry(key).or_default() += 1;
        let shared = held.shared;
        mb.mail.insert(stored.mail, Box::new(held));
        self.charge(stored.mail, shared, cost);
        self.by_age.insert((stored.stored_at, stored.mail, to));
        if self.expiry.is_none() {
            // The first message waiting: its expiry is the next.
            self.expire(now);
        }
        self.batch.first_mail.get_or_insert(stored.mail);
        self.batch.mail.push((to, stored.mail));
        Ok(true)
    }

    /// What one more copy of `m` adds to the store's bytes: a shared
    /// channel body counts with its first copy only.
    pub(super) fn cost(&self, mail: MailId, m: &Held) -> usize {
        match m.shared && self.shared.contains_key(&mail) {
            true => MAIL_OVERHEAD,
            false => m.size(),
        }
    }

    /// Counts a copy of `m`, costing `cost` ([`Server::cost`]), into the
    /// store's bytes.
    pub(super) fn charge(&mut self, mail: MailId, shared: bool, cost: usize) {
        self.stored_bytes += cost;
        if shared {
            *self.shared.entry(mail).or_default() += 1;
        }
    }

    /// Counts a copy of `m` out of the store's bytes.
    pub(super) fn discharge(&mut self, mail: MailId, m: &Held) {
        if !m.shared {
            self.stored_bytes -= m.size();
            return;
        }
        self.stored_bytes -= MAIL_OVERHEAD;
        if let Some(copies) = self.shared.get_mut(&mail) {
            *copies -= 1;
            if *copies == 0 {
                self.shared.remove(&mail);
                self.stored_bytes -= m.len as usize;
            }
        }
    }

    pub(super) fn delete(&mut self, to: ClientId, mail: MailId) {
        if self.take_mail(to, mail).is_some() {
            let to = self.table.get(to).name.clone();
            self.store_ops.push_back(StoreOp::Delete { to, mail });
        }
    }

    /// Removes a message from memory, with what it counted for.
    pub(super) fn take_mail(&mut self, to: ClientId, mail: MailId) -> Option<Held> {
        let m = held(&self.mailboxes, to, mail)?;
        let key = self.dedup_key(&m.from, m.id);
        let mb = self.mailboxes.get_mut(&to)?;
        let m = mb.mail.remove(&mail)?;
        mb.bytes -= m.size();
        if let Some(n) = mb.keys.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                mb.keys.remove(&key);
            }
        }
        self.discharge(mail, &m);
        self.by_age.remove(&(m.stored_at, mail, to));
        Some(*m)
    }

    /// The duplicate key of (`from`, `id`): a keyed hash, so no sender can
    /// aim collisions at a mailbox (a collision would only cost a scan).
    pub(super) fn dedup_key(&self, from: &Name, id: MsgId) -> u64 {
        self.dedup.hash_one((from, id))
    }

    /// Lets go of the bodies of `to`'s committed mail: they stay on disk
    /// until a delivery fetches them again.
    pub(super) fn unload(&mut self, to: ClientId) {
        let first = self.batch.first_mail;
        let Some(mb) = self.mailboxes.get_mut(&to) else {
            return;
        };
        for (&mail, m) in &mut mb.mail {
            // This batch's mail is not on disk until its commit.
            if first.is_none_or(|first| mail < first) {
                m.body = None;
            }
        }
    }

    /// Deletes the mail that reached its time-to-live, then sets the
    /// timer for the next.
    pub(super) fn expire(&mut self, now: Instant) {
        let Some(ttl) = self.config.mail_ttl else {
            return;
        };
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let unix = self.unix_time(now);
        let mut expired = Vec::new();
        let mut next: Option<Duration> = None;
        for &(stored_at, mail, to) in &self.by_age {
            let left = stored_at.saturating_add(ttl).saturating_sub(unix);
            if left > 0 {
                next = Some(Duration::from_secs(left.unsigned_abs()));
                break;
            }
            // An online recipient is being given it (or has it in a
            // numbered batch): it is not left undelivered, and taking it
            // out of the batch would stall the client. Looked at again
            // later, in case the recipient leaves without it.
            if self.table.get(to).online {
                next = Some(next.map_or(EXPIRY_RECHECK, |n| n.min(EXPIRY_RECHECK)));
                continue;
            }
            expired.push((stored_at, mail, to));
        }
        for (stored_at, mail, to) in expired {
            match self.take_mail(to, mail) {
                Some(m) => {
                    let to = self.table.get(to).name.clone();
                    self.event(ServerEvent::Expired {
                        to: to.clone(),
                        from: m.from,
                        mail,
                    });
                    self.store_ops.push_back(StoreOp::Delete { to, mail });
                }
                None => {
                    self.by_age.remove(&(stored_at, mail, to));
                }
            }
        }
        // A time too far to count (a hand-edited store) is never.
        if let Some(due) = next.and_then(|n| now.checked_add(n))
            && self.expiry.is_none_or(|(at, _)| at > due)
        {
            if let Some((_, key)) = self.expiry.take() {
                self.timers.cancel(key);
            }
            self.expiry = Some((due, self.timers.insert(due, Timer::Expiry)));
        }
    }

    /// A stored message as it is delivered: sealed mail as it was sealed,
    /// a channel copy decrypted from the store (it travels in the
    /// recipient's session).
    pub(super) fn content(
        &self,
        to: &Name,
        mail: MailId,
        m: &Held,
        body: &Body,
    ) -> Option<Content> {
        match body {
            Body::Sealed { key, sealed } => Some(Content::Sealed {
                key: *key,
                sealed: wire::Sealed::from_slice(sealed).ok()?,
            }),
            Body::AtRest(blob) | Body::Legacy(blob) => {
                let ad = at_rest_ad(to, &m.from, m.channel, m.id);
                let plain = self.links.secrets().open_at_rest(&ad, blob)?;
                let verified = matches!(body, Body::AtRest(_));
                let body = wire::decode_body(&plain)?;
                Some(Content::Relayed {
                    channel: m.channel,
                    verified,
                    id: body.id,
                    text: body.text,
                })
            }
            Body::Channel(blob) => {
                let ad = channel_ad(&m.from, m.id, mail);
                let plain = self.links.secrets().open_at_rest(&ad, blob)?;
                let body = wire::decode_body(&plain)?;
                Some(Content::Relayed {
                    channel: true,
                    verified: true,
                    id: body.id,
                    text: body.text,
                })
            }
            Body::Clear(text) => Some(Content::Relayed {
                channel: m.channel,
                verified: false,
                id: m.id,
                text: Text::new(text).ok()?,
            }),
        }
    }

    /// A version-1 message stored in clear, encrypted at rest (and marked:
    /// it proves no sender).
    pub(super) fn legacy_at_rest(&mut self, m: &StoredMail, text: &str) -> Body {
        let Ok(text) = Text::new(text) else {
            return m.body.clone();
        };
        let body = wire::encode_body(&MailBody { id: m.id, text });
        let mut salt = [0; AT_REST_SALT];
        self.rng.fill_bytes(&mut salt);
        let ad = at_rest_ad(&m.to, &m.from, m.channel, m.id);
        Body::Legacy(self.links.secrets().seal_at_rest(salt, &ad, &body))
    }
}
