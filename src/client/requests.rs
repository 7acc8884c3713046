//! Requests in flight: one [`Op`] per request with its timer, tries and
//! index entries, resent, answered, refused or given up on.

use super::*;

/// Handle of an operation in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct OpId(pub(super) usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    Op(OpId),
    Batch,
    /// Time to tell the server this client is still here.
    Heartbeat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Sent to the peer, awaiting its ack.
    Direct,
    /// Sent to the server as a save-message request.
    Save(Seq),
    /// Sent again to the fresh address after `Exists`.
    Retry,
    /// Handed to the server to relay: the peer is online but no direct
    /// path opened (or the last message to it needed the relay too).
    Relay(Seq),
}

impl Phase {
    /// The request to the server this phase is, if any.
    pub(super) fn seq(self) -> Option<Seq> {
        match self {
            Phase::Save(seq) | Phase::Relay(seq) => Some(seq),
            Phase::Direct | Phase::Retry => None,
        }
    }
}

#[derive(Debug)]
pub(super) enum Kind {
    Register {
        seq: Seq,
        joining: Joining,
    },
    Deregister {
        seq: Seq,
    },
    Channel {
        seq: Seq,
        id: MsgId,
        text: Text,
    },
    Direct {
        to: Name,
        addr: SocketAddr,
        /// The recipient's key, from the table (or the server's `Exists`).
        key: PublicKey,
        id: MsgId,
        text: Text,
        phase: Phase,
        /// The message sealed to `key`, once it goes to the server (boxed:
        /// most operations never need its kilobyte).
        sealed: Option<Box<wire::Sealed>>,
    },
    Sync {
        seq: Seq,
    },
    Heartbeat {
        seq: Seq,
    },
}

impl Kind {
    /// A direct message to the table row `entry`, at `phase`.
    pub(super) fn direct(
        entry: Entry,
        id: MsgId,
        text: Text,
        phase: Phase,
        sealed: Option<Box<wire::Sealed>>,
    ) -> Kind {
        Kind::Direct {
            to: entry.name,
            addr: entry.addr,
            key: entry.key,
            id,
            text,
            phase,
            sealed,
        }
    }
}

impl Kind {
    /// The sequence number of the request to the server under way, if any.
    pub(super) fn seq(&self) -> Option<Seq> {
        match self {
            Kind::Register { seq, .. }
            | Kind::Deregister { seq }
            | Kind::Channel { seq, .. }
            | Kind::Sync { seq }
            | Kind::Heartbeat { seq } => Some(*seq),
            Kind::Direct { phase, .. } => phase.seq(),
        }
    }
}

#[derive(Debug)]
pub(super) struct Op {
    pub(super) kind: Kind,
    /// Tries sent in the current phase.
    pub(super) sent: u8,
    pub(super) timer: TimerKey,
    /// Which registration the operation started in (a count): a refusal
    /// of an older session's request is just that request's end.
    pub(super) session: u32,
    /// Waiting for a new session: the server had forgotten ours.
    pub(super) parked: bool,
}

/// The requests in flight and the indexes that find them: by sequence
/// number (the server's answers) and by message id (a peer's ack). Both
/// follow from each request's kind and are kept in step on every change
/// ([`Requests::update`]), so no entry outlives its request or points at
/// a slot reused by another.
#[derive(Debug, Default)]
pub(super) struct Requests {
    ops: Slab<Op>,
    by_seq: HashMap<Seq, OpId>,
    by_msg: HashMap<MsgId, OpId>,
    /// The table sync under way: one at most.
    sync: Option<OpId>,
}

impl Requests {
    /// Where the next request goes (its timer is armed before it exists).
    pub(super) fn vacant(&self) -> OpId {
        OpId(self.ops.vacant_key())
    }

    pub(super) fn insert(&mut self, op: Op) -> OpId {
        let id = OpId(self.ops.insert(op));
        self.index(id);
        id
    }

    pub(super) fn get(&self, id: OpId) -> Option<&Op> {
        self.ops.get(id.0)
    }

    /// Changes request `id` through `f`; its index entries follow.
    pub(super) fn update<R>(&mut self, id: OpId, f: impl FnOnce(&mut Op) -> R) -> Option<R> {
        self.unindex(id);
        let r = f(self.ops.get_mut(id.0)?);
        self.index(id);
        Some(r)
    }

    /// Takes request `id` out, with its index entries.
    pub(super) fn remove(&mut self, id: OpId) -> Option<Op> {
        self.unindex(id);
        self.ops.try_remove(id.0)
    }

    /// The request the server's answer to `seq` is for.
    pub(super) fn by_seq(&self, seq: Seq) -> Option<OpId> {
        self.by_seq.get(&seq).copied()
    }

    /// The direct message a peer's ack of `id` is for.
    pub(super) fn by_msg(&self, id: MsgId) -> Option<OpId> {
        self.by_msg.get(&id).copied()
    }

    pub(super) fn sync(&self) -> Option<OpId> {
        self.sync
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (OpId, &Op)> {
        self.ops.iter().map(|(i, op)| (OpId(i), op))
    }

    /// Whether a request of this kind is in flight.
    pub(super) fn any(&self, kind: impl Fn(&Kind) -> bool) -> bool {
        self.ops.iter().any(|(_, op)| kind(&op.kind))
    }

    /// Its keys: the server request's `seq`, if one is under way; the
    /// message id while a peer's ack would end it (sent to the peer, or
    /// relayed while a direct path may still open, not saved); whether it
    /// is the table sync.
    fn keys(kind: &Kind) -> (Option<Seq>, Option<MsgId>, bool) {
        let msg = match kind {
            Kind::Direct {
                id,
                phase: Phase::Direct | Phase::Retry | Phase::Relay(_),
                ..
            } => Some(*id),
            _ => None,
        };
        (kind.seq(), msg, matches!(kind, Kind::Sync { .. }))
    }

    fn index(&mut self, id: OpId) {
        let Some(op) = self.ops.get(id.0) else {
            return;
        };
        let (seq, msg, sync) = Self::keys(&op.kind);
        if let Some(seq) = seq {
            self.by_seq.insert(seq, id);
        }
        if let Some(msg) = msg {
            self.by_msg.insert(msg, id);
        }
        if sync {
            self.sync = Some(id);
        }
    }

    fn unindex(&mut self, id: OpId) {
        let Some(op) = self.ops.get(id.0) else {
            return;
        };
        let (seq, msg, sync) = Self::keys(&op.kind);
        if let Some(seq) = seq
            && self.by_seq.get(&seq) == Some(&id)
        {
            self.by_seq.remove(&seq);
        }
        if let Some(msg) = msg
            && self.by_msg.get(&msg) == Some(&id)
        {
            self.by_msg.remove(&msg);
        }
        if sync && self.sync == Some(id) {
            self.sync = None;
        }
    }
}

impl Client {
    pub(super) fn on_ack(&mut self, now: Instant, seq: Seq) {
        let Some(kind) = self.take_server_op(seq, |k| {
            matches!(
                k,
                Kind::Deregister { .. }
                    | Kind::Channel { .. }
                    | Kind::Direct {
                        phase: Phase::Save(_) | Phase::Relay(_),
                        ..
                    }
            )
        }) else {
            return;
        };
        match kind {
            Kind::Deregister { .. } => self.left(),
            Kind::Channel { id, .. } => self.events.push_back(Event::ChannelAcked { id }),
            Kind::Direct { id, .. } => self.events.push_back(Event::Saved { id }),
            _ => {}
        }
        let _ = now;
    }

    pub(super) fn on_refused(&mut self, now: Instant, seq: Seq, reason: Refusal) {
        let found = self.requests.by_seq(seq);
        let current = found
            .and_then(|op| self.requests.get(op))
            .is_some_and(|op| op.session == self.sessions);
        if reason == Refusal::UnknownSession && current && self.presence == Presence::Online {
            // The server forgot us (it restarted): a message on its way to
            // it waits for the new session and goes again, same id, so it
            // is stored once whatever happened before.
            let park = |entry: &mut Op| {
                let message = matches!(
                    entry.kind,
                    Kind::Channel { .. }
                        | Kind::Direct {
                            phase: Phase::Save(_) | Phase::Relay(_),
                            ..
                        }
                );
                entry.parked |= message;
                message.then_some(entry.timer)
            };
            if let Some(op) = found
                && let Some(Some(timer)) = self.requests.update(op, park)
            {
                self.timers.cancel(timer);
                self.forget_session(now);
                return;
            }
        }
        let Some(kind) = self.take_server_op(seq, |_| true) else {
            return;
        };
        // Only a refusal of the current session means "register again"; one
        // for a request from an older session is just that request's end.
        // A refused message's line says which it was (its id).
        let id = match &kind {
            Kind::Direct { id, .. } | Kind::Channel { id, .. } => Some(*id),
            _ => None,
        };
        match (kind, reason) {
            // The server does not know us (it restarted): we are offline
            // already, which is what dereg asked for.
            (Kind::Deregister { .. }, Refusal::UnknownSession) => self.left(),
            (Kind::Heartbeat { .. }, _) if current => self.forget_session(now),
            (Kind::Heartbeat { .. }, _) => {}
            (Kind::Direct { to, id, .. }, Refusal::MailboxFull) => {
                self.events.push_back(Event::MailboxFull { to, id });
            }
            (Kind::Direct { to, .. }, Refusal::Busy) => {
                self.refuse(id, format!(
                    "the server is busy; the message to {to} was not saved — send it again."
                ));
            }
            (Kind::Direct { to, .. }, Refusal::UnknownRecipient) => {
                self.refuse(id, format!(
                    "the server has no client {to}; the message was not saved."
                ));
            }
            (Kind::Register { joining, .. }, reason) => {
                self.session.end_join();
                self.error(if reason == Refusal::TooManyNames {
                    "too many new names from this address lately; try again later.".to_string()
                } else {
                    "the server is full; try again later.".to_string()
                });
                if joining == Joining::First {
                    self.close(true);
                } else {
                    // What waited for this registration ends here, said so:
                    // a later `reg` must not send it unannounced.
                    self.presence = Presence::Offline;
                    self.drop_parked("the server is full; the message was not saved.");
                }
            }
            (Kind::Sync { .. }, _) => {
                self.table.cancel_sync();
                if current {
                    self.forget_session(now);
                }
            }
            (Kind::Direct { .. } | Kind::Channel { .. }, Refusal::UnknownSession) => {
                if self.presence == Presence::Online && current {
                    self.refuse(
                        id,
                        "the server lost this session; reconnecting — send it again.".to_string(),
                    );
                    self.forget_session(now);
                } else if self.presence == Presence::Online {
                    self.refuse(id, "the server lost this session; send it again.".to_string());
                } else {
                    self.refuse(
                        id,
                        "you went offline before the server took it; not saved.".to_string(),
                    );
                }
            }
            (_, Refusal::TooManyRequests) => self.refuse(
                id,
                "too many requests from this address just now; not saved — send it again in a moment."
                    .to_string(),
            ),
            (_, Refusal::MailboxFull | Refusal::StoreFull) => {
                self.refuse(id, "the server's store is full; not saved.".to_string())
            }
            (_, Refusal::StoreBusy) => self.refuse(
                id,
                "the server's store is busy (locked by another process); not saved — send it again."
                    .to_string(),
            ),
            (_, _) => self.refuse(id, "the server refused the request; try again later.".to_string()),
        }
    }

    pub(super) fn on_op_timer(&mut self, now: Instant, op: OpId) {
        let Some(entry) = self.requests.get(op) else {
            return;
        };
        let sent = entry.sent;
        match &entry.kind {
            Kind::Direct {
                phase: Phase::Direct | Phase::Retry,
                ..
            } if sent < 2 => {
                self.resend(now, op, RETRANSMIT);
            }
            Kind::Direct {
                to,
                key,
                id,
                text,
                phase: Phase::Direct,
                ..
            } => {
                // Silent for the whole ack window: hand it to the server,
                // sealed to the recipient's key (the server cannot read it).
                let (to, key, id, text) = (to.clone(), *key, *id, text.clone());
                let sealed = self.seal(&to, &key, id, &text);
                // Saved, a late ack of the peer's no longer ends it.
                self.peers.fell_back(key);
                self.events.push_back(Event::NoAck { to, id });
                self.hand_to_server(now, op, sealed, Phase::Save);
            }
            Kind::Direct {
                to,
                key,
                id,
                text,
                phase: Phase::Retry,
                ..
            } => {
                // The server reaches the peer, we do not, even after both
                // sides sent to each other: the server relays it (still
                // sealed to the peer's key, which `Exists` may have
                // changed). Never dropped: if the peer does not ack the
                // relayed copy, it waits in its mailbox ("saved").
                let (to, key, id, text) = (to.clone(), *key, *id, text.clone());
                let sealed = self.seal(&to, &key, id, &text);
                self.peers.relayed(key);
                self.hand_to_server(now, op, sealed, Phase::Relay);
            }
            _ if sent < SERVER_TRIES => {
                // Up to a fifth longer, never shorter: clients that lost
                // the same burst do not all come back at the same instant,
                // and five silent tries still take at least 2.5 s.
                let wait =
                    ACK_TIMEOUT.mul_f64(1.0 + f64::from(self.rng.next_u32() % 1000) / 5000.0);
                self.resend(now, op, wait);
            }
            _ => self.give_up(now, op),
        }
    }

    /// Five tries without an answer from the server.
    pub(super) fn give_up(&mut self, now: Instant, op: OpId) {
        if self.fail_over(now, op) {
            return;
        }
        let Some(kind) = self.finish(op) else {
            return;
        };
        // No handshake completed in five tries: what we heard instead is now
        // the likely reason. Neither is authenticated, so neither stops a
        // registration that could still succeed.
        if matches!(kind, Kind::Register { .. })
            && let Some(trouble) = self.session.end_join()
        {
            match trouble {
                Trouble::Version(v) => self.events.push_back(Event::VersionMismatch(v)),
                Trouble::KeyChanged { pinned, presented } => self
                    .events
                    .push_back(Event::ServerKeyChanged { pinned, presented }),
            }
            self.close(true);
            return;
        }
        match kind {
            Kind::Register {
                joining: Joining::LogBack,
                ..
            } => {
                self.presence = Presence::Offline;
                self.events.push_back(Event::ServerNotResponding);
            }
            Kind::Register { .. } | Kind::Deregister { .. } | Kind::Direct { .. } => {
                self.events.push_back(Event::ServerNotResponding);
                self.events.push_back(Event::Exiting);
                self.close(true);
            }
            Kind::Channel { id, .. } => self.events.push_back(Event::ChannelNotResponding { id }),
            Kind::Sync { .. } => {
                // The table stays as it is; a heartbeat or the next delta
                // shows the gap again.
                self.table.cancel_sync();
                self.announce = false;
                self.become_ready();
            }
            // The server may be gone; chat goes on, the next beat tries again.
            Kind::Heartbeat { .. } => {}
        }
    }

    /// Registers an operation, sends its first datagram and arms its timer.
    pub(super) fn start(&mut self, now: Instant, kind: Kind, wait: Duration) -> OpId {
        let timer = (self.timers).insert(now + wait, Timer::Op(self.requests.vacant()));
        let op = self.requests.insert(Op {
            kind,
            sent: 0,
            timer,
            session: self.sessions,
            parked: false,
        });
        self.transmit_op(op);
        op
    }

    /// Sends again and re-arms the timer (same phase).
    pub(super) fn resend(&mut self, now: Instant, op: OpId, wait: Duration) {
        if self.requests.get(op).is_none() {
            return;
        }
        let timer = self.timers.insert(now + wait, Timer::Op(op));
        self.requests.update(op, |entry| entry.timer = timer);
        self.transmit_op(op);
    }

    /// An answer that is not the last: one try outstanding again, the
    /// timer re-armed, nothing sent.
    pub(super) fn rearm(&mut self, now: Instant, op: OpId, wait: Duration) {
        let Some(old) = self.requests.get(op).map(|entry| entry.timer) else {
            return;
        };
        self.timers.cancel(old);
        let timer = self.timers.insert(now + wait, Timer::Op(op));
        self.requests.update(op, |entry| {
            entry.sent = 1;
            entry.timer = timer;
        });
    }

    /// Starts a new phase: the try counter starts over.
    pub(super) fn restart(&mut self, now: Instant, op: OpId, wait: Duration) {
        let old = self.requests.update(op, |entry| {
            entry.sent = 0;
            entry.timer
        });
        if let Some(old) = old {
            self.timers.cancel(old);
        }
        self.resend(now, op, wait);
    }

    pub(super) fn transmit_op(&mut self, op: OpId) {
        let counted = self.requests.update(op, |entry| {
            entry.sent = entry.sent.saturating_add(1);
        });
        if counted.is_some() {
            self.emit(op, true);
        }
    }

    /// Sends the operation's datagram (without counting a try). `retry`:
    /// this is a try, so an unanswered direct message may start a fresh
    /// handshake (not when a finished handshake releases it).
    pub(super) fn emit(&mut self, op: OpId, retry: bool) {
        let Some(entry) = self.requests.get(op) else {
            return;
        };
        let msg = match &entry.kind {
            Kind::Register { .. } => {
                // Message 3 twice unanswered: the server may have lost the
                // handshake (it restarted); start it over.
                if self.session.finish_tries().is_some_and(|n| n >= 2) || !self.session.joining() {
                    self.session.begin(&self.config.key, &mut self.rng);
                }
                self.send_join();
                return;
            }
            Kind::Deregister { seq } => Message::Deregister { seq: *seq },
            Kind::Channel { seq, id, text } => Message::ChannelSend {
                seq: *seq,
                id: *id,
                text: text.clone(),
            },
            Kind::Direct {
                to,
                addr,
                key,
                id,
                text,
                phase: phase @ (Phase::Direct | Phase::Retry),
                ..
            } => {
                let msg = Message::Chat {
                    from: self.config.name.clone(),
                    to: to.clone(),
                    id: *id,
                    text: text.clone(),
                };
                // Unanswered once (or the server says the peer is alive
                // after all): the peer may have restarted and lost our
                // link, so a new handshake runs beside the old link.
                let fresh = retry && (*phase == Phase::Retry || entry.sent >= 2);
                let (key, addr) = (*key, *addr);
                let session = &self.session;
                let out = self.peers.send(
                    &self.config.key,
                    key,
                    addr,
                    &msg,
                    fresh,
                    &mut self.rng,
                    |i| session.owns(i),
                );
                for t in out {
                    self.transmit(t);
                }
                return;
            }
            Kind::Direct {
                to,
                id,
                phase: Phase::Save(seq),
                sealed: Some(sealed),
                ..
            } => Message::SaveMessage {
                seq: *seq,
                to: to.clone(),
                id: *id,
                sealed: (**sealed).clone(),
            },
            Kind::Direct {
                to,
                id,
                phase: Phase::Relay(seq),
                sealed: Some(sealed),
                ..
            } => Message::RelayMessage {
                seq: *seq,
                to: to.clone(),
                id: *id,
                sealed: (**sealed).clone(),
            },
            // Never: a save or relay always has its seal.
            Kind::Direct { .. } => return,
            Kind::Heartbeat { seq } => Message::Heartbeat {
                seq: *seq,
                version: self.table.version(),
            },
            Kind::Sync { seq } => {
                // A fresh window from where the pass stands.
                self.sync_pages = 0;
                let (since, from) = self.table.sync_request().unwrap_or((0, 0));
                Message::Sync {
                    seq: *seq,
                    since,
                    from,
                }
            }
        };
        self.send_server(&msg);
    }

    /// Removes a finished operation with its timer (its index entries go
    /// with it).
    pub(super) fn finish(&mut self, op: OpId) -> Option<Kind> {
        let entry = self.requests.remove(op)?;
        self.timers.cancel(entry.timer);
        Some(entry.kind)
    }

    /// Completes the server request `seq` if it is of the expected kind.
    pub(super) fn take_server_op(
        &mut self,
        seq: Seq,
        want: impl Fn(&Kind) -> bool,
    ) -> Option<Kind> {
        let op = self.requests.by_seq(seq)?;
        if !want(&self.requests.get(op)?.kind) {
            return None;
        }
        self.finish(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind, timers: &mut TimerWheel<Timer>, now: Instant) -> Op {
        Op {
            kind,
            sent: 0,
            timer: timers.insert(now, Timer::Batch),
            session: 0,
            parked: false,
        }
    }

    #[test]
    fn the_indexes_follow_each_request_through_its_phases() {
        let now = Instant::now();
        let mut timers = TimerWheel::new(now, TICK);
        let mut requests = Requests::default();
        let entry = Entry {
            name: Name::new("Bob").unwrap(),
            addr: SocketAddr::from(([127, 0, 0, 1], 2000)),
            online: true,
            key: PublicKey([3; 32]),
        };
        let (id, text) = (MsgId(7), Text::new("hi").unwrap());
        let kind = Kind::direct(entry, id, text, Phase::Direct, None);
        let direct = requests.insert(op(kind, &mut timers, now));
        // Sent to the peer: its ack finds it, no server answer does.
        assert_eq!(requests.by_msg(id), Some(direct));
        assert_eq!(requests.by_seq(Seq(1)), None);
        // Saved: the server's answer finds it, a late peer ack does not.
        requests.update(direct, |op| {
            if let Kind::Direct { phase, .. } = &mut op.kind {
                *phase = Phase::Save(Seq(1));
            }
        });
        assert_eq!(requests.by_msg(id), None);
        assert_eq!(requests.by_seq(Seq(1)), Some(direct));
        // Relayed: both do (a direct path may still open).
        requests.update(direct, |op| {
            if let Kind::Direct { phase, .. } = &mut op.kind {
                *phase = Phase::Relay(Seq(2));
            }
        });
        assert_eq!(requests.by_seq(Seq(1)), None, "the old request's answer");
        assert_eq!(requests.by_seq(Seq(2)), Some(direct));
        assert_eq!(requests.by_msg(id), Some(direct));

        // A sync is found as the sync, and by each window's request.
        let sync = requests.insert(op(Kind::Sync { seq: Seq(3) }, &mut timers, now));
        assert_eq!(requests.sync(), Some(sync));
        requests.update(sync, |op| op.kind = Kind::Sync { seq: Seq(4) });
        assert_eq!(
            (requests.by_seq(Seq(3)), requests.by_seq(Seq(4))),
            (None, Some(sync))
        );

        // Gone, with every entry: a slot reused later is not found by them.
        assert!(requests.remove(sync).is_some());
        assert!(requests.remove(direct).is_some());
        assert_eq!(requests.by_msg(id), None);
        assert_eq!(requests.by_seq(Seq(2)), None);
        assert_eq!(requests.by_seq(Seq(4)), None);
        assert_eq!(requests.sync(), None);
        let reused = requests.insert(op(Kind::Heartbeat { seq: Seq(5) }, &mut timers, now));
        assert_eq!(reused, direct, "the slab reuses the slot");
        assert_eq!(requests.by_msg(id), None);
        assert_eq!(requests.by_seq(Seq(5)), Some(reused));
    }
}
