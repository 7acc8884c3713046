//! Chat through the server: saves, relays and punches for direct messages,
//! channel messages to everyone.

use super::*;

/// How long a relayed message waits for its recipient's ack before its
/// sender is told "saved" instead: two delivery tries, well inside the
/// sender's 2.5 s of request tries.
pub(super) const RELAY_WAIT: Duration = Duration::from_millis(1000);

/// Relayed messages awaiting their recipients' acks, at most; past it a
/// relay is answered as a save is (stored, "saved").
pub(super) const MAX_RELAYS: usize = 4096;

/// A relayed message's sender, waiting for the recipient's ack.
#[derive(Debug)]
pub(super) struct Relaying {
    pub(super) from: ClientId,
    pub(super) seq: Seq,
    pub(super) timer: TimerKey,
}

#[derive(Debug, Clone)]
pub(super) struct NewMail {
    pub(super) from: Name,
    pub(super) id: MsgId,
    pub(super) body: Body,
}

impl Server {
    pub(super) fn on_save(
        &mut self,
        now: Instant,
        sender: ClientId,
        seq: Seq,
        to: Name,
        mail: NewMail,
    ) {
        let Some(to) = self.recipient(sender, seq, &to) else {
            return;
        };
        self.pending(sender, seq);
        if !self.holds(to) {
            let mail = Box::new(mail);
            let waiter = Waiter::Save {
                from: sender,
                seq,
                mail,
            };
            self.wait_for_mailbox(to, waiter);
            return;
        }
        self.save_or_probe(now, sender, seq, to, mail);
    }

    /// Stores a message for `to`, whose mailbox is held, or first asks it
    /// whether it is there when it is online here.
    pub(super) fn save_or_probe(
        &mut self,
        now: Instant,
        sender: ClientId,
        seq: Seq,
        to: ClientId,
        mail: NewMail,
    ) {
        // Online at another server of the cluster: stored, and its home
        // delivers it at once (this server cannot probe it).
        if self.is_here(to) {
            // The sender could not reach it: while the probe asks whether
            // it is there, it opens its side of a path to the sender.
            self.punch(to, sender);
            self.wait_for_probe(
                now,
                to,
                Waiter::Save {
                    from: sender,
                    seq,
                    mail: Box::new(mail),
                },
            );
        } else {
            self.save(now, sender, seq, to, mail);
        }
    }

    /// The client named `to`, or `sender`'s request `seq` refused: no
    /// such client.
    fn recipient(&mut self, sender: ClientId, seq: Seq, to: &Name) -> Option<ClientId> {
        let found = self.table.lookup(to);
        if found.is_none() {
            let reason = Refusal::UnknownRecipient;
            self.reply(sender, seq, Message::Refused { seq, reason });
        }
        found
    }

    /// Stores a direct message and acks its sender (after the commit).
    pub(super) fn save(
        &mut self,
        now: Instant,
        sender: ClientId,
        seq: Seq,
        to: ClientId,
        mail: NewMail,
    ) {
        self.store_direct(now, sender, seq, to, mail, false);
    }

    /// A direct message its sender could not get through: relayed to an
    /// online recipient, stored for an offline one. Either way it is
    /// stored first, so it is never lost: the recipient's ack of the
    /// relayed copy deletes it and tells the sender "received"; without
    /// one in [`RELAY_WAIT`] the sender hears "saved" and the copy waits
    /// in the mailbox like any other.
    pub(super) fn on_relay(
        &mut self,
        now: Instant,
        sender: ClientId,
        seq: Seq,
        to: Name,
        mail: NewMail,
    ) {
        let Some(to) = self.recipient(sender, seq, &to) else {
            return;
        };
        let relay = self.is_here(to) && self.relays.len() < MAX_RELAYS;
        if !relay && !self.holds(to) {
            // Saved, as it would be, once the mailbox is here.
            self.pending(sender, seq);
            let mail = Box::new(mail);
            let waiter = Waiter::Save {
                from: sender,
                seq,
                mail,
            };
            self.wait_for_mailbox(to, waiter);
            return;
        }
        self.store_direct(now, sender, seq, to, mail, relay);
        if relay {
            // Direct stays the goal: the recipient tries to open a path
            // towards the sender again with every relayed message.
            self.punch(to, sender);
        }
    }

    /// The mail a save or relay request of `sender` carries.
    pub(super) fn sealed_mail(
        &self,
        sender: ClientId,
        id: MsgId,
        sealed: &wire::Sealed,
    ) -> NewMail {
        let entry = self.table.get(sender);
        NewMail {
            from: entry.name.clone(),
            id,
            body: Body::Sealed {
                key: entry.key,
                sealed: sealed.to_vec(),
            },
        }
    }

    /// Tells the online client `to` that `peer` cannot reach it, so that
    /// it sends `peer` a datagram (see [`Message::Punch`]).
    pub(super) fn punch(&mut self, to: ClientId, peer: ClientId) {
        if to != peer {
            let entry = self.table.get(peer).clone();
            self.send_to(to, &Message::Punch { entry });
        }
    }

    /// [`Server::save`], or with `relay` a relay to an online recipient:
    /// the sender's answer then waits for the recipient's ack.
    pub(super) fn store_direct(
        &mut self,
        now: Instant,
        sender: ClientId,
        seq: Seq,
        to: ClientId,
        mail: NewMail,
        relay: bool,
    ) {
        // A probe may just have marked the recipient offline: everyone,
        // the sender included, hears of it before the sender hears "saved".
        self.flush_deltas();
        let key = (to, mail.from.clone(), mail.id);
        match self.put(now, to, mail, relay) {
            Ok(Some(mail)) if relay => {
                if let Some(m) = held_mut(&mut self.mailboxes, to, mail) {
                    m.relayed = true;
                }
                self.pending(sender, seq);
                let timer = self.timers.insert(now + RELAY_WAIT, Timer::Relay(to, mail));
                let from = sender;
                self.relays
                    .insert((to, mail), Relaying { from, seq, timer });
                self.batch
                    .acks
                    .push((sender, seq, Promise::Relay { to, mail }));
                self.deliver_live(now, to, mail);
            }
            Ok(mail) => {
                // The recipient may be online again by now (it came back
                // while the probe ran): then it gets the message at once.
                if let Some(mail) = mail {
                    self.deliver_live(now, to, mail);
                }
                if let Some(&mail) = self.batch.keys.get(&key) {
                    // Stored by this batch (now, or by a retry of it).
                    self.ack_saved(sender, seq, false, mail);
                } else {
                    self.reply(sender, seq, Message::Ack { seq });
                }
            }
            Err(reason) => self.reply(sender, seq, Message::Refused { seq, reason }),
        }
    }

    pub(super) fn on_channel(
        &mut self,
        now: Instant,
        sender: ClientId,
        seq: Seq,
        id: MsgId,
        text: Text,
    ) {
        let from = self.table.get(sender).name.clone();
        let recipients: Vec<ClientId> = self
            .table
            .iter()
            .map(|(r, _)| r)
            .filter(|&r| r != sender)
            .collect();
        // Every recipient gets a copy in its mailbox first, so an online
        // one that never acks (or a crash mid fan-out) still finds it there;
        // its ack deletes the copy. The message is stored once (one body,
        // one pending row per recipient), so a fan-out costs one seal and
        // one body's bytes however large the table. If the store cannot
        // take it for everyone, it is refused: never acked half-kept.
        let mail = self.mail_id_of(self.next_mail);
        let body = wire::encode_body(&MailBody { id, text });
        let mut salt = [0; AT_REST_SALT];
        self.rng.fill_bytes(&mut salt);
        // Encrypted at rest under the server's storage key: the store's
        // files never hold a message's text.
        let sealed = self
            .links
            .secrets()
            .seal_at_rest(salt, &channel_ad(&from, id, mail), &body);
        let body: Arc<[u8]> = sealed.into();
        let needed = MAIL_OVERHEAD
            .saturating_mul(recipients.len())
            .saturating_add(body.len());
        if self.stored_bytes.saturating_add(needed) > self.config.store_bytes {
            let reason = Refusal::MailboxFull;
            self.reply(sender, seq, Message::Refused { seq, reason });
            return;
        }
        let stored_at = self.unix_time(now);
        let mut stored = false;
        // A copy committed by an earlier batch (a retry after a restart):
        // the message is out, so the answer is "saved" whatever this batch
        // does; a copy new in it that fails is missed like a full mailbox.
        let mut committed = false;
        let mut missed = false;
        // The newest message "saved" would rest on.
        let mut rests_on: Option<MailId> = None;
        let mut live = Vec::new();
        let mut pending = Vec::new();
        // One of several servers: a recipient whose mailbox another
        // server holds gets its copy in the store only (that server reads
        // it from the feed), unless the message is there already.
        let (recipients, elsewhere): (Vec<ClientId>, Vec<ClientId>) =
            recipients.into_iter().partition(|&r| self.holds(r));
        for r in recipients {
            let copy = StoredMail {
                mail,
                to: self.table.get(r).name.clone(),
                from: from.clone(),
                channel: true,
                stored_at,
                id,
                body: Body::Channel(body.clone()),
            };
            match self.admit(now, r, &copy) {
                Ok(true) => {
                    stored = true;
                    rests_on = rests_on.max(Some(mail));
                    live.push((r, mail));
                    pending.push(copy.to);
                }
                // Not new: a copy put by a batch still under way (a retry
                // while it commits) rests on it; otherwise it is committed.
                Ok(false) => match self.batch.channels.get(&(from.clone(), id)) {
                    Some(&earlier) => {
                        stored = true;
                        rests_on = rests_on.max(Some(earlier));
                    }
                    None => committed = true,
                },
                // This recipient's own mailbox is full: it misses the
                // message (logged), as a full mailbox bounces direct mail.
                Err(_) => {
                    missed = true;
                    self.event(ServerEvent::MailboxFull {
                        to: copy.to,
                        from: from.clone(),
                        channel: true,
                    });
                }
            }
        }
        let before = self.batch.channels.get(&(from.clone(), id)).copied();
        if !elsewhere.is_empty() && !committed && before.is_none() {
            // Their mailboxes are counted, not held: a full one misses
            // the message as a held one does.
            for r in elsewhere {
                let name = self.table.get(r).name.clone();
                if self.count_waiting(r, stored_at) {
                    self.batch.counted.push((mail, r));
                    stored = true;
                    rests_on = rests_on.max(Some(mail));
                    pending.push(name);
                } else {
                    missed = true;
                    self.event(ServerEvent::MailboxFull {
                        to: name,
                        from: from.clone(),
                        channel: true,
                    });
                }
            }
        } else if let Some(earlier) = before {
            stored = true;
            rests_on = rests_on.max(Some(earlier));
        }
        if !pending.is_empty() {
            self.next_mail += 1;
            self.batch.channels.insert((from.clone(), id), mail);
            self.batch.stored.push(ServerEvent::StoredChannel {
                from: from.clone(),
                recipients: pending.len(),
                mail,
            });
            self.store_ops.push_back(StoreOp::Channel(ChannelMail {
                mail,
                from,
                stored_at,
                id,
                body,
                to: pending,
            }));
        }
        // SPEC: the sender's ack first, then the copies (all of them leave
        // after the commit, in this order).
        if let (true, false, Some(mail)) = (stored, committed, rests_on) {
            self.ack_saved(sender, seq, true, mail);
        } else if missed && !stored && !committed {
            // Every mailbox it was for is full: kept for nobody, and the
            // sender must not read "received".
            let reason = Refusal::MailboxFull;
            self.reply(sender, seq, Message::Refused { seq, reason });
        } else {
            self.reply(sender, seq, Message::Ack { seq });
        }
        for (r, mail) in live {
            if self.queue_live(r, mail) {
                self.fanout.push_back(r);
            }
        }
    }

    /// No ack for a relayed message in time: it stays stored, and its
    /// sender hears so.
    pub(super) fn on_relay_timer(&mut self, to: ClientId, mail: MailId) {
        let Some(r) = self.relays.remove(&(to, mail)) else {
            return;
        };
        let seq = r.seq;
        if self.batch.first_mail.is_some_and(|first| mail >= first) {
            // Its commit is still under way: "saved" stands or falls with it.
            self.ack_saved(r.from, seq, false, mail);
        } else {
            self.reply(r.from, seq, Message::Ack { seq });
        }
    }
}
