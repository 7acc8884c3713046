//! Liveness probes: a request that needs to know whether a client is
//! there waits while the client is asked.

use super::*;

/// Most requests waiting on one probe.
pub(super) const PROBE_WAITERS: usize = 64;

#[derive(Debug)]
pub(super) struct Probe {
    pub(super) nonce: u64,
    pub(super) sent: u8,
    pub(super) timer: TimerKey,
    pub(super) waiters: Vec<Waiter>,
    /// Deliveries to the probed client went unacked. A flag, not a waiter,
    /// so a full waiter list can never strand them.
    pub(super) deliveries: bool,
}

#[derive(Debug)]
pub(super) enum Waiter {
    /// A save-message for the probed client.
    Save {
        from: ClientId,
        seq: Seq,
        mail: Box<NewMail>,
    },
    /// A registration that would take the probed client's name (by a
    /// session of the key that owns it).
    Register { link: LinkId, seq: Seq },
}

impl Server {
    pub(super) fn on_probe_reply(&mut self, now: Instant, link: LinkId, nonce: u64) {
        let Some(&id) = self.probes.get(&nonce) else {
            self.stats.ignored += 1;
            return;
        };
        // Only the probed session can say it is alive.
        if self.sessions[id.index() as usize].link != Some(link) {
            self.stats.ignored += 1;
            return;
        }
        self.probes.remove(&nonce);
        let Some(probe) = self.sessions[id.index() as usize].probe.take() else {
            return;
        };
        self.timers.cancel(probe.timer);
        self.heard(now, id);
        if probe.deliveries {
            self.redeliver(now, id);
        }
        for waiter in probe.waiters {
            match waiter {
                Waiter::Save { from, seq, .. } => {
                    let entry = self.table.get(id).clone();
                    self.reply(from, seq, Message::Exists { seq, entry });
                }
                Waiter::Register { link, seq } => {
                    let name = self.table.get(id).name.clone();
                    let addr = self.links.addr(link);
                    let reason = Rejection::InUse;
                    if let Some(addr) = addr {
                        self.event(ServerEvent::Rejected(name, addr, reason));
                    }
                    let msg = Message::Rejected { seq, reason };
                    self.links.send(link, &msg, &mut self.transmits);
                }
            }
        }
    }

    pub(super) fn on_probe_timer(&mut self, now: Instant, id: ClientId) {
        let Some(session) = self.sessions.get_mut(id.index() as usize) else {
            return;
        };
        let Some(probe) = session.probe.as_mut() else {
            return;
        };
        if probe.sent < 2 {
            probe.sent += 1;
            probe.timer = self.timers.insert(now + RETRANSMIT, Timer::Probe(id));
            let msg = Message::Probe { nonce: probe.nonce };
            self.send_to(id, &msg);
            return;
        }
        // Silent for the whole ack timeout: the client is gone.
        let Some(probe) = session.probe.take() else {
            return;
        };
        self.probes.remove(&probe.nonce);
        // (Online at another server now: not this one's to take offline.)
        if self.is_here(id) {
            self.set_offline(id, false);
        }
        let mut waiters = probe.waiters;
        // Mail first, so a newcomer taking the name finds it in the mailbox
        // it is welcomed with.
        waiters.sort_by_key(|w| matches!(w, Waiter::Register { .. }));
        for waiter in waiters {
            match waiter {
                Waiter::Save { from, seq, mail } => self.save(now, from, seq, id, *mail),
                Waiter::Register { link, seq } => {
                    if !self.table.get(id).online && self.links.get(link).is_some() {
                        self.accept(now, id, link, seq);
                    }
                }
            }
        }
    }

    /// Makes a request wait for a liveness probe of `id`. When the probe
    /// already has [`PROBE_WAITERS`] waiting, a save-message is refused as
    /// busy (an explicit answer; its sender may try again) and a
    /// registration is dropped (its client retries by itself).
    pub(super) fn wait_for_probe(&mut self, now: Instant, id: ClientId, waiter: Waiter) {
        let probe = self.probe(now, id);
        if probe.waiters.len() < PROBE_WAITERS {
            probe.waiters.push(waiter);
            return;
        }
        self.stats.ignored += 1;
        if let Waiter::Save { from, seq, .. } = waiter {
            let reason = Refusal::Busy;
            self.reply(from, seq, Message::Refused { seq, reason });
        }
    }

    /// The liveness probe of `id`, started if none is under way.
    pub(super) fn probe(&mut self, now: Instant, id: ClientId) -> &mut Probe {
        let probe = match self.sessions[id.index() as usize].probe.take() {
            Some(probe) => probe,
            None => {
                let nonce = self.rng.next_u64();
                let timer = self.timers.insert(now + RETRANSMIT, Timer::Probe(id));
                self.probes.insert(nonce, id);
                self.send_to(id, &Message::Probe { nonce });
                Box::new(Probe {
                    nonce,
                    sent: 1,
                    timer,
                    waiters: Vec::new(),
                    deliveries: false,
                })
            }
        };
        self.sessions[id.index() as usize].probe.insert(probe)
    }
}
