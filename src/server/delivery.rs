//! Delivery of stored mail to an online client: a window of messages in
//! flight, rounds of resends, acks.

use super::*;

/// Most deliveries in flight to one client.
pub(super) const DELIVERY_WINDOW: usize = 16;

/// Liveness rounds (probe answered, deliveries still unacked) before the
/// server gives up on a client that answers probes but never acks mail.
pub(super) const DELIVERY_ROUNDS: u8 = 3;

impl Server {
    /// Sends a just-stored message to its recipient now if it is online.
    pub(super) fn deliver_live(&mut self, now: Instant, to: ClientId, mail: MailId) {
        if self.queue_live(to, mail) {
            self.pump(now, to);
        }
    }

    /// Queues a just-stored message for its recipient if it is online.
    pub(super) fn queue_live(&mut self, to: ClientId, mail: MailId) -> bool {
        let online = self.is_here(to);
        if online {
            self.sessions[to.index() as usize]
                .queue
                .push_back((mail, None));
        }
        online
    }

    pub(super) fn on_delivered(&mut self, now: Instant, id: ClientId, mail: MailId) {
        // Nothing of the batch under way has left the server: an ack of its
        // mail is a guess (and would answer a relay "received" before its
        // commit, which may yet fail).
        if self.batch.first_mail.is_some_and(|first| mail >= first) {
            self.stats.ignored += 1;
            return;
        }
        let session = &mut self.sessions[id.index() as usize];
        if let Some(inflight) = session.inflight.remove(&mail) {
            self.timers.cancel(inflight.timer);
            session.rounds = 0;
        }
        if let Some(m) = held(&self.mailboxes, id, mail) {
            self.stats.delivered += 1;
            if !m.channel {
                let (to, from) = (self.table.get(id).name.clone(), m.from.clone());
                let relayed = m.relayed;
                self.event(ServerEvent::Delivered { to, from, relayed });
            }
        }
        self.delete(id, mail);
        if let Some(r) = self.relays.remove(&(id, mail)) {
            self.timers.cancel(r.timer);
            let seq = r.seq;
            self.reply(r.from, seq, Message::Received { seq });
        }
        self.pump(now, id);
    }

    pub(super) fn on_delivery_timer(&mut self, now: Instant, id: ClientId, mail: MailId) {
        let Some(session) = self.sessions.get_mut(id.index() as usize) else {
            return;
        };
        let Some(inflight) = session.inflight.get_mut(&mail) else {
            return;
        };
        if inflight.sent < 2 {
            inflight.sent += 1;
            inflight.timer = self
                .timers
                .insert(now + RETRANSMIT, Timer::Delivery(id, mail));
            let pos = inflight.pos;
            self.transmit_delivery(id, mail, pos);
            return;
        }
        // Unacked for the whole ack timeout: is the client still there?
        // (One liveness check covers every delivery in flight.)
        if session.probe.as_ref().is_some_and(|p| p.deliveries) {
            return;
        }
        session.rounds += 1;
        if session.rounds > DELIVERY_ROUNDS {
            // Answers probes but never acks: treat it as gone; the mail stays
            // for its next registration.
            self.set_offline(id, false);
            return;
        }
        self.probe(now, id).deliveries = true;
    }

    /// Sends queued deliveries while the window has room.
    pub(super) fn pump(&mut self, now: Instant, id: ClientId) {
        loop {
            let Some(session) = self.sessions.get_mut(id.index() as usize) else {
                return;
            };
            let window = if session.serial { 1 } else { DELIVERY_WINDOW };
            if session.inflight.len() >= window {
                return;
            }
            let Some((mail, pos)) = session.queue.pop_front() else {
                // What the revival queued has gone out.
                session.serial = false;
                return;
            };
            let exists = self
                .mailboxes
                .get(&id)
                .is_some_and(|mb| mb.mail.contains_key(&mail));
            if !exists || session.inflight.contains_key(&mail) {
                continue;
            }
            let timer = self
                .timers
                .insert(now + RETRANSMIT, Timer::Delivery(id, mail));
            session.inflight.insert(
                mail,
                Inflight {
                    pos,
                    sent: 1,
                    timer,
                },
            );
            self.transmit_delivery(id, mail, pos);
        }
    }

    /// The client answered a probe: give every unacked delivery a new round.
    pub(super) fn redeliver(&mut self, now: Instant, id: ClientId) {
        let mails: Vec<(MailId, Option<u32>)> = self.sessions[id.index() as usize]
            .inflight
            .iter()
            .map(|(&m, f)| (m, f.pos))
            .collect();
        for (mail, pos) in mails {
            let timer = self
                .timers
                .insert(now + RETRANSMIT, Timer::Delivery(id, mail));
            if let Some(f) = self.sessions[id.index() as usize].inflight.get_mut(&mail) {
                self.timers.cancel(f.timer);
                f.timer = timer;
                f.sent = 1;
            }
            self.transmit_delivery(id, mail, pos);
        }
    }

    pub(super) fn transmit_delivery(&mut self, id: ClientId, mail: MailId, pos: Option<u32>) {
        let Some(m) = held_mut(&mut self.mailboxes, id, mail) else {
            return;
        };
        let cached = m.shared && self.opened.as_ref().is_some_and(|(o, _)| *o == mail);
        if m.body.is_none() && !cached {
            // On disk: sent once the driver has fetched it.
            if !std::mem::replace(&mut m.fetching, true) {
                self.fetches.push_back((id, mail));
            }
            return;
        }
        let Some(m) = held(&self.mailboxes, id, mail) else {
            return;
        };
        let (stored_at, from) = (m.stored_at, m.from.clone());
        let content = match &self.opened {
            Some((opened, content)) if *opened == mail && m.shared => content.clone(),
            // Checked when loaded, stored and fetched; a failure here
            // delivers nothing.
            _ => {
                let shared = m.shared;
                let to = &self.table.get(id).name;
                let Some(content) = m.body.as_deref().and_then(|b| self.content(to, mail, m, b))
                else {
                    return;
                };
                if shared {
                    self.opened = Some((mail, content.clone()));
                }
                content
            }
        };
        let relayed = pos.is_none() && held(&self.mailboxes, id, mail).is_some_and(|m| m.relayed);
        let batch = self.sessions[id.index() as usize].batch;
        let msg = if relayed {
            // Live, as the direct message it is (a stored one, counted in
            // a log-back's batch, is a delivery like any other).
            Message::Relayed {
                mail,
                from,
                content,
            }
        } else {
            Message::Deliver {
                mail,
                batch,
                pos,
                stored_at,
                from,
                content,
            }
        };
        let at = self.transmits.len();
        self.send_to(id, &msg);
        // A welcome's place too, while mail is uncommitted: a refused
        // message before it moves it (see `refuse_full`).
        let noted = |first: MailId| pos.is_some() || mail >= first;
        if self.transmits.len() > at && self.batch.first_mail.is_some_and(noted) {
            self.batch.deliveries.push((self.sent + at, id, mail));
        }
    }

    pub(super) fn cancel_deliveries(&mut self, id: ClientId) {
        let Some(session) = self.sessions.get_mut(id.index() as usize) else {
            return;
        };
        session.queue.clear();
        for (_, f) in std::mem::take(&mut session.inflight) {
            self.timers.cancel(f.timer);
        }
    }

    /// Stops delivering `mail` to `id` (its retransmission timer goes).
    pub(super) fn cancel_delivery(&mut self, id: ClientId, mail: MailId) {
        let session = self.sessions.get_mut(id.index() as usize);
        if let Some(f) = session.and_then(|s| s.inflight.remove(&mail)) {
            self.timers.cancel(f.timer);
        }
    }
}
