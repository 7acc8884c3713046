//! Stored mail at log-back: a batch shown in order, each message once,
//! opened with its sender's key, acked after it is shown.

use super::*;

/// Most (sender, id) pairs remembered to show each message once.
pub(super) const SEEN: usize = 16_384;

/// Out-of-order stored messages held back to be shown in order.
pub(super) const BATCH_AHEAD: u32 = 64;

/// A mail batch that makes no progress this long is abandoned (the server
/// keeps the rest for the next log-back).
pub(super) const BATCH_STALL: Duration = Duration::from_secs(5);

pub(super) struct Batch {
    /// The welcome's `seq`: deliveries of another batch are not ours.
    pub(super) id: Seq,
    pub(super) total: u32,
    pub(super) next: u32,
    pub(super) ahead: BTreeMap<u32, Delivery>,
    pub(super) timer: TimerKey,
}

pub(super) struct Delivery {
    pub(super) mail: MailId,
    pub(super) from: Name,
    pub(super) channel: bool,
    /// False for a direct message nobody proved the sender of.
    pub(super) verified: bool,
    pub(super) stored_at: i64,
    /// `None`: the seal did not open (not sealed by the sender's key for
    /// ours); it is reported and acked, never shown.
    pub(super) body: Option<(MsgId, Text)>,
}

/// Remembers the last [`SEEN`] (sender, id) pairs.
#[derive(Default)]
pub(super) struct Seen {
    pub(super) set: HashSet<(Name, MsgId)>,
    pub(super) order: VecDeque<(Name, MsgId)>,
}

impl Seen {
    /// True the first time a pair is offered.
    pub(super) fn first(&mut self, from: &Name, id: MsgId) -> bool {
        let key = (from.clone(), id);
        if !self.set.insert(key.clone()) {
            return false;
        }
        if self.order.len() == SEEN
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(key);
        true
    }
}

impl Client {
    pub(super) fn on_deliver(
        &mut self,
        now: Instant,
        batch_id: Seq,
        pos: Option<u32>,
        d: Delivery,
    ) {
        // Acks only follow display: a message acked but not shown would be
        // deleted by the server and lost.
        if self.presence != Presence::Online {
            return;
        }
        let Some(pos) = pos else {
            // Live: a channel message as it happens, or a direct message the
            // server kept for us while we were being taken for gone.
            let mail = d.mail;
            match d.body {
                Some((id, text)) if d.channel => {
                    if self.seen.first(&d.from, id) {
                        self.events.push_back(Event::Channel { from: d.from, text });
                    }
                }
                _ => self.show_stored(d),
            }
            self.ack_mail(mail);
            return;
        };
        // A delayed datagram of an earlier batch (simulation seeds 12299,
        // 12489) must not take a place in this one: it is ignored, unacked,
        // and the current batch brings the message in its order.
        let Some(batch) = self.batch.as_mut().filter(|b| b.id == batch_id) else {
            if self.batch.is_none() && self.last_batch == Some(batch_id) {
                // A late retransmission of the batch just finished.
                let mail = d.mail;
                self.show_stored(d);
                self.ack_mail(mail);
            }
            return;
        };
        if pos < batch.next {
            // Shown already (the ack was lost): ack again.
            let mail = d.mail;
            self.show_stored(d);
            self.ack_mail(mail);
            return;
        }
        if pos >= batch.total || pos >= batch.next.saturating_add(BATCH_AHEAD) {
            return;
        }
        batch.ahead.insert(pos, d);
        let mut shown = Vec::new();
        while let Some(d) = batch.ahead.remove(&batch.next) {
            batch.next += 1;
            shown.push(d);
        }
        let done = batch.next >= batch.total;
        let progress = !shown.is_empty();
        for d in shown {
            let mail = d.mail;
            self.show_stored(d);
            self.ack_mail(mail);
        }
        if done {
            if let Some(batch) = self.batch.take() {
                self.timers.cancel(batch.timer);
            }
            self.start_sync(now, 0);
        } else if progress && let Some(batch) = self.batch.as_mut() {
            self.timers.cancel(batch.timer);
            batch.timer = self.timers.insert(now + BATCH_STALL, Timer::Batch);
        }
    }

    pub(super) fn show_stored(&mut self, d: Delivery) {
        let Some((id, text)) = d.body else {
            self.events.push_back(Event::Unverifiable(d.from));
            return;
        };
        if self.seen.first(&d.from, id) {
            let event = Event::Stored {
                from: d.from,
                channel: d.channel,
                verified: d.verified,
                stored_at: d.stored_at,
                text,
            };
            self.events.push_back(event);
        }
    }

    /// A delivery as shown: sealed mail opened with our key (it must have
    /// been sealed by the key the server vouches for, between exactly these
    /// names), relayed channel mail as it came in our session.
    pub(super) fn open_delivery(
        &mut self,
        mail: MailId,
        stored_at: i64,
        from: Name,
        content: Content,
    ) -> Delivery {
        let (channel, verified, body) = match content {
            Content::Sealed { key, sealed } => {
                // The server says which key sealed it; our table, where it
                // knows the sender, must agree (else the server lies about
                // one or the other).
                let agrees = self
                    .table
                    .get(&from)
                    .is_none_or(|e| e.key.is_none() || e.key == key);
                let body = agrees
                    .then(|| {
                        crypto::open_mail(&self.config.key, &self.config.name, &key, &from, &sealed)
                    })
                    .flatten()
                    .and_then(|plain| wire::decode_body(&plain))
                    .map(|b| (b.id, b.text));
                (false, true, body)
            }
            // A channel message is the server's word by design; one the
            // server marks as stored by protocol version 1 proved no sender,
            // and a direct one relayed never does: shown as unverified.
            Content::Relayed {
                channel,
                verified,
                id,
                text,
            } => (channel, channel && verified, Some((id, text))),
        };
        Delivery {
            mail,
            from,
            channel,
            verified,
            stored_at,
            body,
        }
    }

    pub(super) fn ack_mail(&mut self, mail: MailId) {
        self.send_server(&Message::Delivered { mail });
    }
}
