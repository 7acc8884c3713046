//! Chat messages: direct ones both ways (straight, punched, saved or
//! relayed), channel messages out.

use super::*;

impl Client {
    /// `send <to> <text>`: a direct message. Its outcome events carry the
    /// id this returns.
    pub fn send_message(
        &mut self,
        now: Instant,
        to: &Name,
        text: &str,
    ) -> Result<MsgId, CommandError> {
        self.usable()?;
        let text = Self::text(text)?;
        let Some(entry) = self.table.get(to).cloned() else {
            return Err(CommandError::UnknownClient(to.to_string()));
        };
        if entry.key.is_none() {
            return Err(CommandError::NoKey(to.clone()));
        }
        let id = self.msg_id();
        if !entry.online {
            self.events.push_back(Event::PeerOffline {
                to: entry.name.clone(),
                id,
            });
            let sealed = self.seal(&entry.name, &entry.key, id, &text);
            self.start_at_server(now, entry, id, text, sealed, Phase::Save);
        } else if self.peers.path(&entry.key) == Some(Path::Relayed) {
            // The last message needed the relay: this one goes the same
            // way at once, and beside it our side of a fresh try at a
            // direct path (the server has the peer send its side).
            let sealed = self.seal(&entry.name, &entry.key, id, &text);
            self.punch(entry.key, entry.addr);
            self.start_at_server(now, entry, id, text, sealed, Phase::Relay);
        } else {
            let kind = Kind::direct(entry, id, text, Phase::Direct, None);
            self.start(now, kind, RETRANSMIT);
        }
        Ok(id)
    }

    /// `text` with its id, sealed to the recipient's key (before the server
    /// sees it: it can neither read nor alter it).
    pub(super) fn seal(
        &mut self,
        to: &Name,
        key: &PublicKey,
        id: MsgId,
        text: &Text,
    ) -> Option<Box<Sealed>> {
        let body = wire::encode_body(&MailBody {
            id,
            text: text.clone(),
        });
        let mut seed = [0; 32];
        self.rng.fill_bytes(&mut seed);
        let sealed = crypto::seal_mail(&self.config.key, &self.config.name, key, to, &body, seed);
        Sealed::from_slice(&sealed).ok().map(Box::new)
    }

    /// Sends `sealed` to the server for `entry`, as a save-message or a
    /// relay (`phase`).
    pub(super) fn start_at_server(
        &mut self,
        now: Instant,
        entry: Entry,
        id: MsgId,
        text: Text,
        sealed: Option<Box<Sealed>>,
        phase: fn(Seq) -> Phase,
    ) {
        let seq = self.seq();
        let kind = Kind::direct(entry, id, text, phase(seq), sealed);
        self.start(now, kind, ACK_TIMEOUT);
    }

    /// Our side of hole punching towards the peer `key` at `addr`.
    pub(super) fn punch(&mut self, key: PublicKey, addr: SocketAddr) {
        let session = &self.session;
        let out = self
            .peers
            .punch(&self.config.key, key, addr, &mut self.rng, |i| {
                session.owns(i)
            });
        if let Some(t) = out {
            self.transmit(t);
        }
    }

    /// For the load tool only: a save-message to `to` (offline in the
    /// table) carrying `sealed` as it is, without sealing anything, so
    /// that one process can drive the server's store at the rate many
    /// senders would (each sealing on its own CPU). The server cannot tell
    /// (it never opens a seal); a recipient would refuse it, since it is
    /// not sealed for this message. Nothing happens if `to` is not an
    /// offline row of the table or `sealed` is too long.
    #[doc(hidden)]
    pub fn save_presealed(&mut self, now: Instant, to: &str, sealed: &[u8]) {
        let entry = Name::new(to).ok().and_then(|n| self.table.get(&n).cloned());
        let (Some(entry), Ok(text)) = (entry, Text::new("(presealed)")) else {
            return;
        };
        if self.usable().is_err() || entry.online || sealed.len() > wire::MAX_SEALED {
            return;
        }
        let id = self.msg_id();
        self.events.push_back(Event::PeerOffline {
            to: entry.name.clone(),
            id,
        });
        let sealed = Sealed::from_slice(sealed).ok().map(Box::new);
        self.start_at_server(now, entry, id, text, sealed, Phase::Save);
    }

    /// `send_all <text>`: a channel message. Its outcome events carry the
    /// id this returns.
    pub fn send_all(&mut self, now: Instant, text: &str) -> Result<MsgId, CommandError> {
        self.usable()?;
        let text = Self::text(text)?;
        let (seq, id) = (self.seq(), self.msg_id());
        self.start(now, Kind::Channel { seq, id, text }, ACK_TIMEOUT);
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_chat(
        &mut self,
        now: Instant,
        key: PublicKey,
        index: u64,
        from: SocketAddr,
        sender: Name,
        to: Name,
        id: MsgId,
        text: Text,
    ) {
        // A deregistered client neither shows nor acks: the sender falls back
        // to the server, which keeps the message for the next log-back. Nor
        // does a client that got someone else's message.
        if self.presence != Presence::Online || to != self.config.name {
            return;
        }
        // Shown as from `sender` only if the session's key owns that name.
        if self
            .table
            .get(&sender)
            .is_none_or(|e| e.key != key || e.key.is_none())
        {
            if self.requests.sync().is_none() {
                // Perhaps our table is behind (a new client): catch up; the
                // sender tries again, or the server keeps the message.
                let since = self.table.version();
                self.start_sync(now, since);
            }
            return;
        }
        if self.seen.first(&sender, id) {
            self.events.push_back(Event::Direct { from: sender, text });
        }
        if let Some(t) = self.peers.reply(index, from, &Message::ChatAck { id }) {
            self.transmit(t);
        }
    }

    pub(super) fn on_chat_ack(&mut self, key: PublicKey, id: MsgId) {
        let Some(op) = self.requests.by_msg(id) else {
            return;
        };
        // Only the recipient's key can ack it.
        if !matches!(self.requests.get(op), Some(Op { kind: Kind::Direct { key: k, .. }, .. }) if *k == key)
        {
            return;
        }
        if let Some(Kind::Direct { to, id, .. }) = self.finish(op) {
            self.peers.proved(key);
            self.events.push_back(Event::ReceivedBy { to, id });
        }
    }

    /// A direct message the server relayed (its sender could not reach
    /// us): shown as the direct message it is, if its seal opens with the
    /// sender's key, then acked to the server, which tells the sender.
    pub(super) fn on_relayed(&mut self, now: Instant, mail: MailId, from: Name, content: Content) {
        // Acks only follow display; offline, the server keeps it for us.
        if self.presence != Presence::Online {
            return;
        }
        // Shown as a direct message from `from` only as a peer's chat is:
        // our table must hold that name with the key that sealed it. A
        // name it lacks yet: catch up, the server delivers it again.
        if self.table.get(&from).is_none_or(|e| e.key.is_none()) {
            if self.requests.sync().is_none() {
                let since = self.table.version();
                self.start_sync(now, since);
            }
            return;
        }
        let key = match &content {
            Content::Sealed { key, .. } => Some(*key),
            Content::Relayed { .. } => None,
        };
        let d = self.open_delivery(mail, 0, from, content);
        match (key, d.body) {
            (Some(key), Some((id, text))) => {
                // Our answers go the same way until a direct path opens.
                self.peers.relayed(key);
                if self.seen.first(&d.from, id) {
                    self.events.push_back(Event::Direct { from: d.from, text });
                }
            }
            // Not sealed by the table's key for the sender, or not sealed
            // at all (the server never relays clear text): reported and
            // dropped, never shown.
            _ => self.show_stored(Delivery { body: None, ..d }),
        }
        self.ack_mail(mail);
    }

    pub(super) fn on_exists(&mut self, now: Instant, seq: Seq, entry: Entry) {
        let Some(op) = self.requests.by_seq(seq) else {
            return;
        };
        // The answer to a save: the peer is online at this address after
        // all, so the message goes there again.
        let retry = |req: &mut Op| {
            let Kind::Direct {
                to,
                addr,
                key,
                id,
                phase,
                ..
            } = &mut req.kind
            else {
                return None;
            };
            if !matches!(phase, Phase::Save(_)) || entry.name != *to || entry.key.is_none() {
                return None;
            }
            *addr = entry.addr;
            *key = entry.key;
            *phase = Phase::Retry;
            Some((to.clone(), *id))
        };
        let Some(Some((to, id))) = self.requests.update(op, retry) else {
            return;
        };
        self.events.push_back(Event::Exists { to, id });
        self.restart(now, op, RETRANSMIT);
        // The table was wrong about this peer; catch up with the server's.
        if self.requests.sync().is_none() {
            let since = self.table.version();
            self.start_sync(now, since);
        }
    }

    /// Moves a direct message to the server (`phase`: save or relay)
    /// with its seal, tries counted afresh.
    pub(super) fn hand_to_server(
        &mut self,
        now: Instant,
        op: OpId,
        sealed: Option<Box<Sealed>>,
        phase: fn(Seq) -> Phase,
    ) {
        let seq = self.seq();
        self.requests.update(op, |entry| {
            if let Kind::Direct {
                phase: p,
                sealed: s,
                ..
            } = &mut entry.kind
            {
                *p = phase(seq);
                *s = sealed;
            }
        });
        self.restart(now, op, ACK_TIMEOUT);
    }

    /// Our handshake with `key` finished: the direct messages that waited
    /// for it go now (their tries and timers are unchanged).
    pub(super) fn flush_direct(&mut self, key: &PublicKey) {
        let waiting: Vec<OpId> = (self.requests.iter())
            .filter(|(_, op)| {
                matches!(
                    &op.kind,
                    Kind::Direct { key: k, phase: Phase::Direct | Phase::Retry, .. } if k == key
                )
            })
            .map(|(id, _)| id)
            .collect();
        for op in waiting {
            self.emit(op, false);
        }
    }
}
