//! The batch under commit: what each datagram promises, operations kept
//! for the next commit, and a failed commit taken back.

use super::*;

/// How soon changes a failed commit left over are tried again (sooner if
/// new changes come: they go in the same transaction, first).
pub(super) const STORE_RETRY: Duration = Duration::from_secs(1);

/// A reply that rests on the batch under way.
#[derive(Debug, Clone, Copy)]
pub(super) enum Promise {
    /// "Saved" (an ack of a save-message or a channel message), resting
    /// on the commit of `mail` (the newest message it needs).
    Saved { channel: bool, mail: MailId },
    /// A welcome that counted mail of this batch (the newest ids, so the
    /// last positions): a failed commit lowers the count.
    Welcome {
        version: u64,
        mail: u32,
        reset: [u8; crate::packet::TOKEN_LEN],
        /// The last message counted.
        last: MailId,
    },
    /// A relay whose answer ("received" or "saved") comes later: a failed
    /// commit refuses it instead, since nothing of it was kept.
    Relay { to: ClientId, mail: MailId },
}

impl Promise {
    /// A welcome (to request `seq`) that counts none of the messages
    /// `gone` (its client's, taken back): `None` if it counted none of
    /// them, or is not a welcome.
    fn welcome_without(&self, seq: Seq, gone: impl Iterator<Item = MailId>) -> Option<Message> {
        let Promise::Welcome {
            version,
            mail,
            reset,
            last,
        } = *self
        else {
            return None;
        };
        let taken = gone.filter(|&m| m <= last).count();
        (taken > 0).then(|| Message::Welcome {
            seq,
            version,
            mail: mail.saturating_sub(u32::try_from(taken).unwrap_or(u32::MAX)),
            reset,
        })
    }

    /// The newest message whose commit the promise rests on: it holds once
    /// the batch with that message is committed (batches commit in order).
    fn rests_on(&self) -> MailId {
        match *self {
            Promise::Saved { mail, .. } | Promise::Relay { mail, .. } => mail,
            Promise::Welcome { last, .. } => last,
        }
    }
}

/// What the batch since the last commit promised, so that a failed commit
/// can take it back. Indexes into `transmits` are stable meanwhile: nothing
/// leaves while a store operation is uncommitted.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// Messages put: (recipient, mail).
    pub(super) mail: Vec<(ClientId, MailId)>,
    /// The first of them: ids only grow, so a message is the batch's if
    /// its id is at least this.
    pub(super) first_mail: Option<MailId>,
    /// Their (recipient, sender, id), to spot a retry of one of them,
    /// with the mail id.
    pub(super) keys: HashMap<(ClientId, Name, MsgId), MailId>,
    /// The channel messages put, (sender, id): one entry for all copies.
    pub(super) channels: HashMap<(Name, MsgId), MailId>,
    /// Replies that hold only if this batch is committed: (client, seq,
    /// what they promised).
    pub(super) acks: Vec<(ClientId, Seq, Promise)>,
    /// Those replies among the datagrams (by number, see `Server::sent`;
    /// first sends and cached resends), with the session they were sealed
    /// for.
    pub(super) ack_transmits: Vec<(usize, ClientId, Seq, LinkId)>,
    /// Deliveries of the batch's messages among the datagrams (by
    /// number), with their recipients (a channel message's copies share
    /// its id).
    pub(super) deliveries: Vec<(usize, ClientId, MailId)>,
    /// The batch's other operations, polled already: they promised nobody
    /// "saved", so a failed commit defers them rather than undoing them.
    pub(super) others: Vec<StoreOp>,
    /// Log lines saying "stored": given once it is true.
    pub(super) stored: Vec<ServerEvent>,
    /// Copies of the batch's messages counted in mailboxes held
    /// elsewhere (see `holding`), in id order: uncounted if it fails.
    pub(super) counted: Vec<(MailId, ClientId)>,
}

/// New answers to requests whose replies were held back for a commit, by
/// (client, seq): the message kind and its encoding.
type Answers = HashMap<(ClientId, Seq), (What, Vec<u8>)>;

/// Where the [`Batch`] stood when the driver took its operations to
/// commit them ([`Server::seal_batch`]): what is before these marks is the
/// sealed batch's, what comes after belongs to the next one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seal {
    /// Datagrams made before it (by number) wait for its commit; later
    /// ones for the next.
    fence: usize,
    /// Mail ids below this are its messages'.
    next_mail: u64,
    /// Operations polled.
    polled: usize,
    others: usize,
    stored: usize,
}

impl Server {
    /// The operations polled so far are one commit, under way: the
    /// driver may go on feeding the server, and polling the next batch's
    /// operations, until it reports this one with
    /// [`Server::handle_committed`] or [`Server::handle_commit_failed`].
    /// Datagrams made meanwhile wait for the next batch's commit. One
    /// sealed batch at a time: sealing again before it is reported adds
    /// to it.
    pub fn seal_batch(&mut self) {
        // Datagrams queued behind operations not polled yet may rest on
        // those: none of them is released by this batch's commit.
        let fence = match self.store_ops.is_empty() {
            true => self.sent + self.transmits.len(),
            false => self.hold_from.unwrap_or(self.sent),
        };
        let mark = Seal {
            fence,
            next_mail: self.next_mail,
            polled: self.uncommitted,
            others: self.batch.others.len(),
            stored: self.batch.stored.len(),
        };
        self.sealed = Some(mark);
    }

    /// Every operation queued, sealed as one batch (see
    /// [`Server::seal_batch`]): what a driver that commits on another
    /// thread takes when none is under way.
    #[must_use]
    pub fn poll_batch(&mut self) -> Vec<StoreOp> {
        let ops: Vec<StoreOp> = std::iter::from_fn(|| self.poll_store()).collect();
        if !ops.is_empty() {
            self.seal_batch();
        }
        ops
    }

    /// The driver committed the sealed batch (or, if none was sealed,
    /// every [`StoreOp`] polled so far): release the datagrams held
    /// behind it.
    pub fn handle_committed(&mut self) {
        if self.sealed.is_none() {
            self.seal_batch();
        }
        let Some(seal) = self.sealed.take() else {
            return;
        };
        self.uncommitted -= seal.polled.min(self.uncommitted);
        let done = self.mail_id_of(seal.next_mail);
        let stored: Vec<ServerEvent> = self.batch.stored.drain(..seal.stored).collect();
        for event in stored {
            self.event(event);
        }
        // A promise made since the seal may rest on the sealed batch (a
        // retry answered "saved", a relay's time running out): it holds
        // now, wherever it was filed.
        self.batch.acks.retain(|(_, _, p)| p.rests_on() >= done);
        let open: HashSet<(ClientId, Seq)> =
            self.batch.acks.iter().map(|&(c, s, _)| (c, s)).collect();
        (self.batch.ack_transmits).retain(|&(_, c, s, _)| open.contains(&(c, s)));
        self.batch.others.drain(..seal.others);
        self.batch.deliveries.retain(|&(_, _, mail)| mail >= done);
        self.batch.keys.retain(|_, mail| *mail >= done);
        self.batch.channels.retain(|_, mail| *mail >= done);
        let split = self.batch.mail.partition_point(|&(_, mail)| mail < done);
        let committed: Vec<(ClientId, MailId)> = self.batch.mail.drain(..split).collect();
        let split = self.batch.counted.partition_point(|&(mail, _)| mail < done);
        self.counted_last = self.batch.counted.drain(..split).collect();
        self.batch.first_mail = self.batch.mail.first().map(|&(_, mail)| mail);
        // On disk now: a body no delivery is waiting for leaves memory.
        for (to, mail) in committed {
            if !self.is_here(to)
                && let Some(m) = held_mut(&mut self.mailboxes, to, mail)
            {
                m.body = None;
            }
        }
        // What was made before the seal may leave; what came since waits
        // for the next commit (if anything of it is uncommitted).
        self.hold_from = (self.uncommitted > 0 || !self.store_ops.is_empty()).then_some(seal.fence);
        if !self.refetch.is_empty() {
            self.refetch_after(done);
        }
    }

    /// The driver committed the sealed batch, as [`Server::handle_committed`],
    /// and the store did some of it otherwise than asked
    /// ([`Store::outcomes`](crate::store::Store::outcomes)): a message it
    /// held already under another id, or refused for a mailbox that other
    /// servers filled.
    pub fn handle_committed_as(&mut self, now: Instant, outcomes: Vec<Outcome>) {
        let mut full = Vec::new();
        let mut kept = Vec::new();
        for outcome in outcomes {
            match outcome {
                Outcome::Full { to, mail } => full.push((to, mail)),
                Outcome::Kept { ours, row } => kept.push((ours, row)),
            }
        }
        if !full.is_empty() {
            // Before the batch is let go: the replies it holds back are
            // still here to be changed.
            self.refuse_full(now, full);
        }
        self.handle_committed();
        if !kept.is_empty() {
            self.handle_kept_instead(now, kept);
        }
    }

    /// Messages of the sealed batch the store refused for a full mailbox
    /// (the server's own count said there was room: other servers filled
    /// it meanwhile). Each copy is taken back, and each request is
    /// answered as if the server had seen the mailbox full: a direct
    /// message's "saved" becomes "mailbox full", as does a channel
    /// message's when no recipient kept it; a relay is refused; a welcome
    /// counts one message less.
    fn refuse_full(&mut self, now: Instant, full: Vec<(Name, MailId)>) {
        self.now = self.now.max(now);
        let mut refused: HashSet<(ClientId, MailId)> = HashSet::new();
        // Places in welcomes' batches the refused messages had.
        let mut holes: HashMap<ClientId, Vec<u32>> = HashMap::new();
        for (name, mail) in full {
            let Some(to) = self.table.lookup(&name) else {
                continue;
            };
            if !refused.insert((to, mail)) {
                continue;
            }
            if let Some(pos) = self.place_of(to, mail) {
                holes.entry(to).or_default().push(pos);
            }
            let direct = (self.batch.keys.iter())
                .find(|&(&(c, _, _), &m)| c == to && m == mail)
                .map(|((_, from, _), _)| from.clone());
            let channel = (self.batch.channels.iter())
                .find(|&(_, &m)| m == mail)
                .map(|((from, _), _)| from.clone());
            match self.batch.counted.iter().position(|&c| c == (mail, to)) {
                Some(i) => {
                    self.batch.counted.remove(i);
                    self.uncount(to);
                }
                None => self.unput(to, mail),
            }
            self.batch.mail.retain(|&c| c != (to, mail));
            if let Some(from) = direct.clone().or(channel) {
                self.unlog_stored(&name, &from, direct.is_none().then_some(mail));
                let channel = direct.is_none();
                self.event(ServerEvent::MailboxFull {
                    to: name,
                    from,
                    channel,
                });
            }
        }
        let mails: HashSet<MailId> = refused.iter().map(|&(_, m)| m).collect();
        // Channel messages no recipient kept.
        let kept_by_nobody = |mail: &MailId, batch: &Batch| {
            !batch.mail.iter().any(|(_, m)| m == mail)
                && !batch.counted.iter().any(|(m, _)| m == mail)
        };
        let reason = Refusal::MailboxFull;
        let mut answers: Answers = HashMap::new();
        let mut relay_refusals = Vec::new();
        for (client, seq, promise) in self.batch.acks.clone() {
            let msg = match promise {
                Promise::Saved { channel, mail } if mails.contains(&mail) => {
                    if channel && !kept_by_nobody(&mail, &self.batch) {
                        continue;
                    }
                    Message::Refused { seq, reason }
                }
                Promise::Saved { .. } => continue,
                Promise::Relay { to, mail } => {
                    if refused.contains(&(to, mail))
                        && let Some(r) = self.relays.remove(&(to, mail))
                    {
                        // Its answer was never sent: it is sent now.
                        self.timers.cancel(r.timer);
                        relay_refusals.push((client, seq));
                    }
                    continue;
                }
                Promise::Welcome { .. } => {
                    let gone = (refused.iter()).filter(|&&(to, _)| to == client);
                    match promise.welcome_without(seq, gone.map(|&(_, m)| m)) {
                        Some(msg) => msg,
                        None => continue,
                    }
                }
            };
            answers.insert((client, seq), self.answer(client, seq, &msg));
        }
        self.batch
            .acks
            .retain(|&(c, s, _)| !answers.contains_key(&(c, s)));
        // A refused copy's live delivery goes with it, a channel copy's
        // too (by recipient: its other copies go out): its recipient must
        // not see what the store did not keep for it.
        let sent = self.sent;
        let mut gone: HashSet<usize> = (self.batch.deliveries.iter())
            .filter(|&&(_, to, m)| refused.contains(&(to, m)))
            .filter_map(|&(n, _, _)| n.checked_sub(sent))
            .collect();
        let resend = self.close_places(holes);
        // Their datagrams, sealed with the old places, go: sent again.
        gone.extend(resent_places(&self.batch.deliveries, &resend, sent));
        let held = self.batch.ack_transmits.clone();
        let gone = self.rewrite_held(&held, &answers, gone);
        self.renumber_held(&gone);
        for (to, mail, pos) in resend {
            self.transmit_delivery(to, mail, Some(pos));
        }
        for (client, seq) in relay_refusals {
            self.reply(client, seq, Message::Refused { seq, reason });
        }
    }

    /// Messages at the places `holes` of their clients' welcome batches
    /// are gone (refused, or their commit failed): a welcome counts them
    /// no more, so the places after them move up, or the client would
    /// never be given the last ones (beyond its count) and its batch would
    /// stall. Returns the deliveries in flight that moved, to be sent
    /// again with their new places: (client, mail, place).
    fn close_places(&mut self, holes: HashMap<ClientId, Vec<u32>>) -> Vec<(ClientId, MailId, u32)> {
        let mut resend = Vec::new();
        for (to, holes) in holes {
            let moved = |p: u32| p - holes.iter().filter(|&&h| h < p).count() as u32;
            let Some(session) = self.sessions.get_mut(to.index() as usize) else {
                continue;
            };
            for (_, pos) in &mut session.queue {
                *pos = pos.map(moved);
            }
            for (&mail, f) in &mut session.inflight {
                if let Some(p) = f.pos.filter(|&p| moved(p) != p) {
                    f.pos = Some(moved(p));
                    resend.push((to, mail, moved(p)));
                }
            }
        }
        resend
    }

    /// The place `to`'s message `mail` has in the batch its welcome
    /// announced, if it is being delivered in one.
    fn place_of(&self, to: ClientId, mail: MailId) -> Option<u32> {
        let session = &self.sessions[to.index() as usize];
        match session.inflight.get(&mail) {
            Some(f) => f.pos,
            None => (session.queue.iter()).find_map(|&(m, pos)| pos.filter(|_| m == mail)),
        }
    }

    /// Takes a refused message's "stored" out of the log lines the sealed
    /// batch gives once committed (`channel`: a channel message's copy,
    /// with its id: one line counts all its recipients).
    fn unlog_stored(&mut self, to: &Name, from: &Name, channel: Option<MailId>) {
        let upto = self.sealed.map_or(self.batch.stored.len(), |s| s.stored);
        let at = (self.batch.stored[..upto].iter_mut()).position(|e| match e {
            ServerEvent::Stored {
                to: t,
                from: f,
                channel: false,
            }
            | ServerEvent::Relaying { to: t, from: f } => channel.is_none() && t == to && f == from,
            ServerEvent::StoredChannel {
                recipients, mail, ..
            } if channel == Some(*mail) => {
                *recipients = recipients.saturating_sub(1);
                *recipients == 0
            }
            _ => false,
        });
        if let Some(i) = at {
            self.batch.stored.remove(i);
            if let Some(seal) = &mut self.sealed {
                seal.stored -= 1;
            }
        }
    }

    /// The driver's commit of the operations polled since the last
    /// [`Server::handle_committed`] failed: none of them reached the store.
    /// Its messages are taken back and every request they answered is
    /// refused (the "saved" acks held back are replaced); everything else
    /// of it is committed again before any newer operation, on its own
    /// after a second if nothing newer comes.
    pub fn handle_commit_failed(&mut self, now: Instant, failure: StoreFailure) {
        // The sealed batch and everything since: the next batch's promises
        // were made beside the failed one's (a retry of its messages).
        self.uncommitted = 0;
        self.sealed = None;
        self.hold_from = None;
        let batch = std::mem::take(&mut self.batch);
        // Not polled yet, so not tried, but made with the batch's promises.
        let unpolled: Vec<StoreOp> = self.store_ops.drain(..).collect();
        for op in batch.others.into_iter().chain(unpolled) {
            self.defer(op);
        }
        if !self.deferred.is_empty() && self.retry.is_none() {
            self.retry = Some(self.timers.insert(now + STORE_RETRY, Timer::StoreRetry));
        }
        self.schedule_deltas(now);
        // Places in welcomes' batches the taken-back messages had.
        let mut holes: HashMap<ClientId, Vec<u32>> = HashMap::new();
        for &(to, mail) in &batch.mail {
            if let Some(pos) = self.place_of(to, mail) {
                holes.entry(to).or_default().push(pos);
            }
        }
        for &(to, mail) in &batch.mail {
            self.unput(to, mail);
        }
        // Before the pump below, which sends queued mail with its place.
        let resend = self.close_places(holes);
        for &(_, to) in &batch.counted {
            self.uncount(to);
        }
        // Window slots the taken-back deliveries held are free again.
        let mut online: Vec<ClientId> = batch.mail.iter().map(|&(to, _)| to).collect();
        online.sort_unstable();
        online.dedup();
        for to in online {
            if self.is_here(to) {
                self.pump(now, to);
            }
        }
        // Datagram numbers as places in `transmits`: nothing of the batch
        // has left.
        let sent = self.sent;
        let ours = |m: MailId| batch.first_mail.is_some_and(|first| m >= first);
        let mut gone: HashSet<usize> = (batch.deliveries.iter())
            .filter(|&&(_, _, m)| ours(m))
            .filter_map(|&(n, _, _)| n.checked_sub(sent))
            .collect();
        gone.extend(resent_places(&batch.deliveries, &resend, sent));
        let reason = failure.refusal();
        let mut refusals: Answers = HashMap::new();
        let mut relay_refusals = Vec::new();
        for &(client, seq, promise) in &batch.acks {
            let msg = match promise {
                Promise::Saved { channel, .. } => {
                    let from = self.table.get(client).name.clone();
                    self.event(ServerEvent::NotSaved {
                        from,
                        channel,
                        failure,
                    });
                    Message::Refused { seq, reason }
                }
                Promise::Relay { to, mail } => {
                    // Its answer was never sent: it is sent now, refused.
                    if let Some(r) = self.relays.remove(&(to, mail)) {
                        self.timers.cancel(r.timer);
                        let from = self.table.get(client).name.clone();
                        self.event(ServerEvent::NotSaved {
                            from,
                            channel: false,
                            failure,
                        });
                        relay_refusals.push((client, seq));
                    }
                    continue;
                }
                Promise::Welcome { .. } => {
                    let gone = (batch.mail.iter()).filter(|&&(to, _)| to == client);
                    match promise.welcome_without(seq, gone.map(|&(_, m)| m)) {
                        Some(msg) => msg,
                        None => continue,
                    }
                }
            };
            refusals.insert((client, seq), self.answer(client, seq, &msg));
        }
        // Nothing numbered is kept: no renumbering.
        self.rewrite_held(&batch.ack_transmits, &refusals, gone);
        for (to, mail, pos) in resend {
            self.transmit_delivery(to, mail, Some(pos));
        }
        for (client, seq) in relay_refusals {
            self.reply(client, seq, Message::Refused { seq, reason });
        }
    }

    /// `msg` as the answer to `client`'s request `seq`, encoded, and
    /// cached: a retry of the request gets the same answer.
    fn answer(&mut self, client: ClientId, seq: Seq, msg: &Message) -> (What, Vec<u8>) {
        let encoded = (msg.what(), wire::encode_to_vec(msg));
        self.cache(client, seq, encoded.clone());
        encoded
    }

    /// Replaces replies held back for a commit (`held`, see
    /// [`Batch::ack_transmits`]) by new `answers`, sealed again for their
    /// session, and drops the held datagrams at the places `gone` in
    /// `transmits`; returns the places dropped (more, for replies whose
    /// session is gone), in order.
    fn rewrite_held(
        &mut self,
        held: &[(usize, ClientId, Seq, LinkId)],
        answers: &Answers,
        mut gone: HashSet<usize>,
    ) -> Vec<usize> {
        let sent = self.sent;
        for &(n, sender, seq, link) in held {
            // Held, so never sent: below `sent` would be a bug, skipped.
            let Some(i) = n.checked_sub(sent) else {
                continue;
            };
            // A reply the failure does not change stays as it is.
            let Some((what, plain)) = answers.get(&(sender, seq)) else {
                continue;
            };
            // Sealed for the session the reply was for, or not at all (a
            // client that logged in again meanwhile finds the new answer
            // in the reply cache).
            if self.sessions[sender.index() as usize].link != Some(link) {
                gone.insert(i);
                continue;
            }
            let mut sealed = VecDeque::new();
            self.links.send_encoded(link, plain, *what, &mut sealed);
            match sealed.pop_front() {
                Some(t) if i < self.transmits.len() => self.transmits[i] = t,
                _ => {
                    gone.insert(i);
                }
            }
        }
        if !gone.is_empty() {
            let mut i = 0;
            self.transmits.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
            });
        }
        let mut gone: Vec<usize> = gone.into_iter().collect();
        gone.sort_unstable();
        gone
    }

    /// Datagrams at the places `gone` (in order) of `transmits` were
    /// dropped: the numbers of those after them go down by as many, and
    /// what was noted of the dropped ones goes.
    fn renumber_held(&mut self, gone: &[usize]) {
        if gone.is_empty() {
            return;
        }
        let sent = self.sent;
        let dropped = |n: usize| {
            n.checked_sub(sent)
                .is_some_and(|i| gone.binary_search(&i).is_ok())
        };
        let shift = |n: usize| match n.checked_sub(sent) {
            Some(i) => n - gone.partition_point(|&g| g < i),
            None => n,
        };
        (self.batch.ack_transmits).retain(|&(n, ..)| !dropped(n));
        self.batch.deliveries.retain(|&(n, _, _)| !dropped(n));
        for t in &mut self.batch.ack_transmits {
            t.0 = shift(t.0);
        }
        for d in &mut self.batch.deliveries {
            d.0 = shift(d.0);
        }
        if let Some(seal) = &mut self.sealed {
            seal.fence = shift(seal.fence);
        }
        self.hold_from = self.hold_from.map(shift);
    }

    /// Keeps `op` for the next commit; a client's newest row replaces an
    /// older one still waiting, so waiting rows never outnumber clients.
    pub(super) fn defer(&mut self, op: StoreOp) {
        match &op {
            // Taken back (see `unput`): it answered a request refused now.
            StoreOp::Put(_) | StoreOp::Channel(_) => return,
            StoreOp::Client(c) => {
                if let Some(&i) = self.deferred_rows.get(&c.name) {
                    // In the older one's place: still before any message
                    // that needs the row.
                    self.deferred[i] = op;
                    return;
                }
                self.deferred_rows
                    .insert(c.name.clone(), self.deferred.len());
            }
            StoreOp::Presence { name, .. } => {
                // Only the newest says where it is: one per client waits.
                if let Some(&i) = self.deferred_presence.get(name) {
                    self.deferred[i] = op;
                    return;
                }
                (self.deferred_presence).insert(name.clone(), self.deferred.len());
            }
            StoreOp::Delete { .. } | StoreOp::Forget(_) | StoreOp::Rewrite { .. } => {}
        }
        self.deferred.push(op);
    }

    /// Puts what a failed commit left over in front of the queue.
    pub(super) fn undefer(&mut self) {
        self.deferred_rows.clear();
        self.deferred_presence.clear();
        for op in self.deferred.drain(..).rev() {
            self.store_ops.push_front(op);
        }
    }

    /// Takes back a message the store never got.
    pub(super) fn unput(&mut self, to: ClientId, mail: MailId) {
        let session = self.sessions.get_mut(to.index() as usize);
        if let Some(f) = session.and_then(|s| s.inflight.remove(&mail)) {
            self.timers.cancel(f.timer);
        }
        self.take_mail(to, mail);
    }

    /// The next storage operation to commit.
    #[must_use]
    pub fn poll_store(&mut self) -> Option<StoreOp> {
        if !self.deferred.is_empty() && !self.store_ops.is_empty() {
            // What a failed commit left over goes first, in its order.
            self.undefer();
        }
        let op = self.store_ops.pop_front()?;
        if !matches!(op, StoreOp::Put(_) | StoreOp::Channel(_)) {
            self.batch.others.push(op.clone());
        }
        self.uncommitted += 1;
        Some(op)
    }

    /// Acks `seq` "saved": a promise that holds only once the batch is
    /// committed, so the ack is noted for [`Server::handle_commit_failed`].
    pub(super) fn ack_saved(&mut self, id: ClientId, seq: Seq, channel: bool, mail: MailId) {
        let promise = Promise::Saved { channel, mail };
        self.promise(id, seq, Message::Ack { seq }, promise);
    }

    /// Replies `msg`, which holds only if the batch is committed (see
    /// [`Promise`]).
    pub(super) fn promise(&mut self, id: ClientId, seq: Seq, msg: Message, promise: Promise) {
        self.batch.acks.push((id, seq, promise));
        let at = self.transmits.len();
        self.reply(id, seq, msg);
        let at_number = self.sent + at;
        if self.transmits.len() > at
            && let Some(link) = self.sessions[id.index() as usize].link
        {
            self.batch.ack_transmits.push((at_number, id, seq, link));
        }
    }
}

/// Where in `transmits` (`sent` datagrams on) the held `deliveries` (see
/// `Batch::deliveries`) of the moved messages `resend` are (see
/// `Server::close_places`): they carry the old places.
fn resent_places(
    deliveries: &[(usize, ClientId, MailId)],
    resend: &[(ClientId, MailId, u32)],
    sent: usize,
) -> Vec<usize> {
    (deliveries.iter())
        .filter(|&&(_, to, m)| resend.iter().any(|&(t, r, _)| t == to && r == m))
        .filter_map(|&(n, _, _)| n.checked_sub(sent))
        .collect()
}
