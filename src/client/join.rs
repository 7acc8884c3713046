//! Registration with the server and presence: joining (and rejoining a
//! server that forgot us), busy answers, the welcome, `dereg`, `reg` and
//! `quit`, going offline.

use super::*;

/// "Busy" answers are believed for this much waiting per registration, in
/// all: a forged one (it needs only our index, which an on-path attacker
/// sees) can delay "server not responding", not prevent it.
pub(super) const BUSY_BUDGET: Duration = Duration::from_secs(60);

/// The longest one "busy" answer makes us wait.
pub(super) const MAX_BUSY_DELAY: Duration = Duration::from_secs(5);

/// What a registration under way was told so far.
#[derive(Debug, Default)]
pub(super) struct Patience {
    /// "Busy" answers.
    pub(super) busy: u8,
    /// The waits they brought, in all.
    pub(super) waited: Duration,
    /// A message 2 already gave message 3 tries of its own.
    pub(super) renewed: bool,
}

/// Redirects one round of a registration follows before it waits its
/// tries out. A server redirects only to one that scores the name higher
/// than itself, so among servers keeping the rule no chain is longer than
/// the cluster; the bound is for a server that does not.
pub(super) const MAX_REDIRECTS: u8 = 4;

/// Rounds of five tries over the servers of a cluster before a
/// registration gives up ("Server not responding"): a server killed takes
/// its lease's length to drop out of the others' lists, and meanwhile they
/// may still send us to it.
pub(super) const MAX_ROUNDS: u8 = 3;

/// Most server addresses kept (given, or learned from redirects).
pub(super) const MAX_SERVERS: usize = 16;

/// How far a registration has roamed over the servers of a cluster since
/// the last welcome.
#[derive(Debug, Default)]
pub(super) struct Roaming {
    pub(super) redirects: u8,
    pub(super) rounds: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Joining {
    /// At start-up.
    First,
    /// `reg` after `dereg`.
    LogBack,
    /// The server forgot the session.
    Reconnect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Presence {
    /// Waiting for `Welcome`.
    Joining,
    Online,
    /// After `dereg`: only `reg`, `list` and `help` work.
    Offline,
    /// Exit was requested; nothing more happens.
    Done,
}

impl Client {
    /// XX message 2 from the server: check its key, then send message 3
    /// with the registration in it.
    pub(super) fn on_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        receiver: u64,
        sender: u64,
        noise: &[u8; packet::XX2_LEN],
    ) {
        let Some((op, seq)) = self.register_op() else {
            return;
        };
        let first = Message::Register {
            seq,
            name: self.config.name.clone(),
        };
        match self.session.on_response(receiver, sender, noise, &first) {
            // Not the pinned key: nothing more goes to it; the next try
            // starts afresh, and if none meets the pinned key the change is
            // reported (a forgery cannot end the registration by itself).
            None | Some(KeyCheck::Changed) => {}
            Some(check) => {
                self.server_answers_at(from);
                if let KeyCheck::Learned(key) = check {
                    self.events.push_back(Event::ServerKeyLearned(key));
                }
                self.send_join();
                // The server answered with its key: alive. Message 3 gets
                // tries of its own (a loaded server may take a while for
                // each step of the handshake) — once per registration, so
                // a server (or an on-path attacker) that answers message 1
                // but never message 3 still ends in "not responding".
                if !std::mem::replace(&mut self.patience.renewed, true) {
                    self.rearm(now, op, ACK_TIMEOUT);
                }
            }
        }
    }

    /// The registration under way: its operation and sequence number.
    pub(super) fn register_op(&self) -> Option<(OpId, Seq)> {
        self.requests.iter().find_map(|(id, op)| match op.kind {
            Kind::Register { seq, .. } => Some((id, seq)),
            _ => None,
        })
    }

    /// The server is alive but behind: message 1 goes again after the wait
    /// it asked for, doubled on the next two repeats and jittered (RFC 8085
    /// §3.1.3), so a storm of joiners spreads out instead of coming back in
    /// step. The answer does not count as a try. Unauthenticated (it only
    /// echoes our index), so it is believed for [`BUSY_BUDGET`] in all;
    /// past that the tries run out as for silence.
    pub(super) fn on_busy(&mut self, now: Instant, wait_ms: u16) {
        let Some((op, _)) = self.register_op() else {
            return;
        };
        if self.patience.waited >= BUSY_BUDGET {
            return;
        }
        let base = Duration::from_millis(u64::from(wait_ms)).max(ACK_TIMEOUT);
        let backoff = base * (1u32 << self.patience.busy.min(2));
        // Uniform in [0.5, 1.5) of it.
        let factor = 0.5 + f64::from(self.rng.next_u32()) / (f64::from(u32::MAX) + 1.0);
        let delay = backoff.mul_f64(factor).min(MAX_BUSY_DELAY);
        self.patience.busy = self.patience.busy.saturating_add(1);
        self.patience.waited += delay;
        let timer = self.timers.insert(now + delay, Timer::Op(op));
        let old = self.requests.update(op, |entry| {
            entry.sent = entry.sent.saturating_sub(1);
            std::mem::replace(&mut entry.timer, timer)
        });
        if let Some(old) = old {
            self.timers.cancel(old);
        }
    }

    /// The server answered a handshake step (checked) from `from`, one of
    /// its addresses: that address is the server's from now on, so that a
    /// cookie or a session is never taken to another one.
    pub(super) fn server_answers_at(&mut self, from: SocketAddr) {
        if self.server_answered {
            return;
        }
        self.server_answered = true;
        if from != self.config.server
            && let Some(other) = self.config.alternates.iter_mut().find(|a| **a == from)
        {
            std::mem::swap(other, &mut self.config.server);
        }
    }

    /// `Redirect`: the registration under way belongs on the server at
    /// `to` (another server of the cluster, the name's home). The session
    /// it came on proved the server's key, and the new handshake must meet
    /// the same key, so a redirect cannot hand us to anyone else.
    pub(super) fn on_redirect(&mut self, now: Instant, seq: Seq, to: SocketAddr) {
        if self.register_op().is_none_or(|(_, s)| s != seq)
            || self.roaming.redirects >= MAX_REDIRECTS
        {
            // Past the bound the tries run out as for silence.
            return;
        }
        let Some(Kind::Register { joining, .. }) =
            self.take_server_op(seq, |k| matches!(k, Kind::Register { .. }))
        else {
            return;
        };
        self.roaming.redirects += 1;
        self.config.failover = true;
        self.session.end_join();
        self.point_at(to);
        self.register(now, joining);
    }

    /// Talks to the server at `to` from now on, keeping the one it was at
    /// among the alternates (a later failover may need it).
    fn point_at(&mut self, to: SocketAddr) {
        if to != self.config.server {
            let old = std::mem::replace(&mut self.config.server, to);
            let alternates = &mut self.config.alternates;
            match alternates.iter().position(|a| *a == to) {
                Some(i) => alternates[i] = old,
                None if alternates.len() < MAX_SERVERS => alternates.push(old),
                None => {}
            }
        }
        // Only `to` now: not the next address in turn.
        self.server_answered = true;
    }

    /// Five tries of `op` unanswered while other servers of the cluster
    /// may answer: register again through them (true) rather than give up.
    /// What was under way waits for the new registration and goes again
    /// (same ids: stored once whatever the silent server did with it).
    pub(super) fn fail_over(&mut self, now: Instant, op: OpId) -> bool {
        if !self.config.failover || self.config.alternates.is_empty() {
            return false;
        }
        let Some(entry) = self.requests.get(op) else {
            return false;
        };
        match entry.kind {
            Kind::Register { joining, .. } => {
                // A key or version not ours is not a silent server.
                if self.session.troubled() || self.roaming.rounds >= MAX_ROUNDS {
                    return false;
                }
                self.roaming.rounds += 1;
                // A fresh round may follow redirects again: the servers
                // that disagreed may agree by now.
                self.roaming.redirects = 0;
                self.finish(op);
                self.session.end_join();
                self.try_every_server();
                self.register(now, joining);
                true
            }
            // Failing over already: a message that went to the server
            // meanwhile (a fallback) waits for the new registration too.
            Kind::Direct { .. } | Kind::Channel { .. } if self.presence == Presence::Joining => {
                self.timers.cancel(entry.timer);
                self.requests.update(op, |entry| entry.parked = true);
                true
            }
            _ if self.presence == Presence::Online && entry.session == self.sessions => {
                self.try_every_server();
                // As if the server had said it lost us: messages park,
                // the rest ends, and we register again.
                self.on_lost_session(now);
                true
            }
            _ => false,
        }
    }

    /// The next handshake goes to each address in turn, the silent one
    /// last.
    fn try_every_server(&mut self) {
        self.server_answered = false;
        self.join_turn = 1;
    }

    /// Sends the handshake datagram the registration is at: until the
    /// server has answered, each try goes to the next of its addresses.
    pub(super) fn send_join(&mut self) {
        if let Some((payload, what)) = self.session.join_datagram() {
            let mut to = self.config.server;
            if !self.server_answered && !self.config.alternates.is_empty() {
                let turn = self.join_turn % (1 + self.config.alternates.len());
                self.join_turn = self.join_turn.wrapping_add(1);
                if turn > 0 {
                    to = self.config.alternates[turn - 1];
                }
            }
            self.transmit(Transmit { to, payload, what });
        }
    }

    /// `dereg`: a notified leave ([`Event::Bye`] once the server acked).
    pub fn dereg(&mut self, now: Instant) -> Result<(), CommandError> {
        self.usable()?;
        let under_way = self.requests.any(|k| matches!(k, Kind::Deregister { .. }));
        if !under_way {
            let seq = self.seq();
            self.start(now, Kind::Deregister { seq }, ACK_TIMEOUT);
        }
        Ok(())
    }

    /// `quit`: leave telling the server (a dereg), then exit with status 0;
    /// offline or still registering, exit at once.
    /// Messages still in flight end first (acked, saved or failed, each
    /// said so), then the dereg goes.
    pub fn quit(&mut self, now: Instant) {
        match self.presence {
            Presence::Online => {
                self.quitting = true;
                self.quit_when_done(now);
            }
            Presence::Offline | Presence::Joining => self.close(false),
            Presence::Done => {}
        }
    }

    /// A `quit` waits for the messages in flight: once none is left, the
    /// dereg goes (and its ack ends the client).
    pub(super) fn quit_when_done(&mut self, now: Instant) {
        if !self.quitting || self.presence != Presence::Online {
            return;
        }
        let sending = self
            .requests
            .any(|k| matches!(k, Kind::Direct { .. } | Kind::Channel { .. }));
        if !sending {
            // Online, so it cannot be refused.
            let _ = self.dereg(now);
        }
    }

    /// The server has us offline, as a dereg asked: `[You are Offline.
    /// Bye.]`, and the exit a `quit` asked for.
    pub(super) fn left(&mut self) {
        self.go_offline();
        self.events.push_back(Event::Bye);
        if self.quitting {
            self.close(false);
        }
    }

    /// `reg <name>`: log back in after `dereg`.
    pub fn reg(&mut self, now: Instant) -> Result<(), CommandError> {
        match self.presence {
            Presence::Offline => {
                // A log-back of the user's own: rounds over the servers
                // counted afresh, starting with any of them (the one it
                // was at may have died while it was offline).
                self.roaming = Roaming::default();
                if self.config.failover {
                    self.try_every_server();
                }
                self.register(now, Joining::LogBack);
                Ok(())
            }
            Presence::Online => Err(CommandError::AlreadyOnline),
            Presence::Joining => Err(CommandError::Registering),
            Presence::Done => Err(CommandError::Exited),
        }
    }

    pub(super) fn on_welcome(
        &mut self,
        now: Instant,
        seq: Seq,
        mail: u32,
        reset: [u8; packet::TOKEN_LEN],
    ) {
        let Some(Kind::Register { joining, .. }) =
            self.take_server_op(seq, |k| matches!(k, Kind::Register { .. }))
        else {
            return;
        };
        self.session.end_join();
        self.session.set_reset(reset);
        self.roaming = Roaming::default();
        self.sessions = self.sessions.wrapping_add(1);
        self.presence = Presence::Online;
        match joining {
            Joining::First => self.events.push_back(Event::Welcome),
            // The server may have restarted while we were offline, and a
            // restarted server numbers table versions afresh: a version
            // kept from before would make later catch-up syncs skip rows
            // (simulation seeds 3394, 4211). The entries stay, so sends
            // work while the mail streams; the full sync refreshes them.
            Joining::LogBack => self.table.forget_version(),
            Joining::Reconnect => {
                // A restarted server may know fewer clients: start afresh.
                self.table.clear();
                self.events.push_back(Event::Reconnected);
            }
        }
        let parked: Vec<OpId> = (self.requests.iter())
            .filter(|(_, op)| op.parked)
            .map(|(id, _)| id)
            .collect();
        for op in parked {
            let session = self.sessions;
            self.requests.update(op, |entry| {
                entry.parked = false;
                entry.session = session;
            });
            self.restart(now, op, ACK_TIMEOUT);
        }
        self.announce = true;
        self.last_batch = Some(seq);
        if let Some(timer) = self.heartbeat.take() {
            self.timers.cancel(timer);
        }
        self.heartbeat = Some(
            self.timers
                .insert(now + self.config.heartbeat, Timer::Heartbeat),
        );
        // A batch of the previous session (the server restarted mid-stream)
        // is void: positions start over with this welcome, and its stall
        // timer must not abandon the new batch (simulation seed 3594).
        if let Some(old) = self.batch.take() {
            self.timers.cancel(old.timer);
        }
        if mail > 0 {
            self.events.push_back(Event::HaveMessages);
            let timer = self.timers.insert(now + BATCH_STALL, Timer::Batch);
            self.batch = Some(Batch {
                id: seq,
                total: mail,
                next: 0,
                ahead: BTreeMap::new(),
                timer,
            });
        } else {
            self.start_sync(now, 0);
        }
    }

    /// A stateless reset proved the server holds no session of ours (it
    /// restarted): what was on its way to it waits for a new registration
    /// and goes again (same ids, so stored once whatever happened before).
    pub(super) fn on_lost_session(&mut self, now: Instant) {
        if self.presence != Presence::Online {
            return;
        }
        let mut dereg = false;
        let ids: Vec<OpId> = self.requests.iter().map(|(id, _)| id).collect();
        for op in ids {
            let Some(entry) = self.requests.get(op) else {
                continue;
            };
            match entry.kind {
                Kind::Channel { .. }
                | Kind::Direct {
                    phase: Phase::Save(_) | Phase::Relay(_),
                    ..
                } => {
                    self.timers.cancel(entry.timer);
                    self.requests.update(op, |entry| entry.parked = true);
                }
                Kind::Deregister { .. } => {
                    dereg = true;
                    self.finish(op);
                }
                Kind::Sync { .. } => {
                    self.finish(op);
                    self.table.cancel_sync();
                }
                Kind::Heartbeat { .. } => {
                    self.finish(op);
                }
                _ => {}
            }
        }
        if dereg {
            // We are not registered any more, which is what dereg asked for.
            self.drop_parked("you went offline before the server took it; not saved.");
            self.left();
        } else {
            self.forget_session(now);
        }
    }

    /// Ends every parked operation with an error line.
    pub(super) fn drop_parked(&mut self, why: &str) {
        let parked: Vec<OpId> = (self.requests.iter())
            .filter(|(_, op)| op.parked)
            .map(|(id, _)| id)
            .collect();
        for op in parked {
            let id = match self.finish(op) {
                Some(Kind::Direct { id, .. } | Kind::Channel { id, .. }) => Some(id),
                _ => None,
            };
            self.refuse(id, why.to_string());
        }
    }

    /// The first registration is complete, table and all.
    pub(super) fn become_ready(&mut self) {
        self.ready = true;
    }

    pub(super) fn register(&mut self, now: Instant, joining: Joining) {
        self.presence = Presence::Joining;
        self.patience = Patience::default();
        // Every registration is a fresh handshake: it proves the key anew.
        self.session.begin(&self.config.key, &mut self.rng);
        let seq = self.seq();
        self.start(now, Kind::Register { seq, joining }, ACK_TIMEOUT);
    }

    /// The server no longer knows the session: register again by itself.
    pub(super) fn forget_session(&mut self, now: Instant) {
        if self.presence != Presence::Online {
            return;
        }
        self.roaming = Roaming::default();
        self.register(now, Joining::Reconnect);
    }

    /// After `dereg` (or a server that no longer knows us): no session, no
    /// heartbeat, no mail batch or table sync under way.
    pub(super) fn go_offline(&mut self) {
        self.presence = Presence::Offline;
        if let Some(timer) = self.heartbeat.take() {
            self.timers.cancel(timer);
        }
        if let Some(batch) = self.batch.take() {
            self.timers.cancel(batch.timer);
        }
        if let Some(op) = self.requests.sync() {
            self.finish(op);
            self.table.cancel_sync();
        }
    }
}
