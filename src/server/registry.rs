//! The registry: registration, address changes, sessions revived, who is
//! online, names forgotten, the table's deltas.

use super::*;

/// How long a name not seen online is kept by default.
pub const NAME_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How often an online client's "last seen" is written again: a name
/// online for longer than its time-to-live must not look unseen to the
/// next start.
pub(super) const SEEN_REFRESH: i64 = 24 * 3600;

/// How often, at most, names are checked against their time-to-live while
/// the server runs.
pub(super) const NAME_SWEEP: Duration = Duration::from_secs(3600);

/// Table changes are gathered this long before they go out as deltas: a
/// join storm's changes then fill whole delta datagrams instead of sending
/// every online client one nearly empty datagram per loop turn.
/// SPEC allows coalescing bursts into one update per tick; a person does
/// not notice 50 ms.
pub const DELTA_INTERVAL: Duration = Duration::from_millis(50);

/// Distinct names in a loaded store (registry rows, and mail recipients a
/// hand-edited store may lack rows for).
pub(super) fn known_names(loaded: &Loaded) -> usize {
    let names: HashSet<&Name> = loaded
        .clients
        .iter()
        .map(|c| &c.name)
        .chain(loaded.mail.iter().map(|m| &m.to))
        .collect();
    names.len()
}

impl Server {
    /// A registration on `link`: its key must own the name (or the name be
    /// new, or unbound: then it becomes the key's).
    pub(super) fn on_register(&mut self, now: Instant, link: LinkId, seq: Seq, name: Name) {
        let (Some(key), Some(from)) = (self.links.remote(link), self.links.addr(link)) else {
            return;
        };
        // A session registers once, one name: a registration on one that
        // is already a client's (a retransmission, or a replay) gets the
        // cached answer or nothing. A new registration is a new handshake.
        if let Some(owner) = self.links.get(link).and_then(|l| l.owner) {
            if self.table.lookup(&name) == Some(owner)
                && self.sessions[owner.index() as usize].link == Some(link)
            {
                self.cached(owner, seq);
            }
            return;
        }
        // Another server of the cluster is the name's home: it holds the
        // name's mail and presence, so the client goes there. Nothing is
        // kept here (the session stays unclaimed and ages out).
        if let Some(to) = self.elsewhere(&name) {
            self.stats.redirected += 1;
            let msg = Message::Redirect { seq, to };
            self.links.send(link, &msg, &mut self.transmits);
            return;
        }
        let Some(id) = self.table.lookup(&name) else {
            // A new row is for good: one source may not fill the registry.
            // (Checked after the lookup, so known names always log in.)
            if self.table.len() < self.table.capacity()
                && !(self.new_names_site.take(now, from) && self.new_names.take(now, from))
            {
                // Counted, not logged: the log is not the attacker's to fill.
                self.stats.ignored += 1;
                let msg = Message::Refused {
                    seq,
                    reason: Refusal::TooManyNames,
                };
                self.links.send(link, &msg, &mut self.transmits);
                return;
            }
            match self.table.insert(name.clone(), from, false, key) {
                Ok(id) => {
                    let unix = self.unix_time(now);
                    self.sessions.reset(id.index() as usize, unix);
                    // New here: nothing stored for it to fetch.
                    self.hold_new(id);
                    self.fresh = Some(link);
                    self.accept(now, id, link, seq);
                    self.fresh = None;
                }
                // No row, so no session to cache in: a retry is refused again.
                Err(_) => {
                    let reason = Refusal::Busy;
                    let msg = Message::Refused { seq, reason };
                    self.links.send(link, &msg, &mut self.transmits);
                }
            }
            return;
        };
        let entry = self.table.get(id);
        let (same_addr, owner) = (entry.addr == from, entry.key);
        // Online at another server of the cluster: this one is its home
        // now (that one died, or the servers changed), and cannot probe it.
        let online = self.is_here(id);
        if !owner.is_none() && owner != key {
            // Whether the owner is online, silent or gone: never its mail,
            // never its name.
            self.stats.ignored += 1;
            let reason = Rejection::OtherKey;
            self.event(ServerEvent::Rejected(name, from, reason));
            let msg = Message::Rejected { seq, reason };
            self.links.send(link, &msg, &mut self.transmits);
            return;
        }
        if !online || same_addr {
            self.accept(now, id, link, seq);
            return;
        }
        // Held by a live-looking process of the same key at another
        // address: only a silent holder loses it.
        let waiting = self.sessions[id.index() as usize].probe.as_ref().is_some_and(|p| {
            p.waiters
                .iter()
                .any(|w| matches!(w, Waiter::Register { link: l, seq: s } if *l == link && *s == seq))
        });
        if !waiting {
            self.wait_for_probe(now, id, Waiter::Register { link, seq });
        }
    }

    /// The client of `link` now receives at `addr`: its row and everyone's
    /// table follow.
    pub(super) fn on_moved(&mut self, now: Instant, link: LinkId, addr: SocketAddr) {
        let Some(id) = self.authenticate(now, link) else {
            return;
        };
        let entry = self.table.get(id);
        let (name, online) = (entry.name.clone(), entry.online);
        self.table.set(id, addr, online);
        // Its row as the table now has it, new address and all.
        self.note_seen(now, id);
        if online {
            self.publish_presence(id);
        }
        self.event(ServerEvent::Moved(name.clone(), addr));
        if self.sessions[id.index() as usize].gone {
            self.revive(now, id, name, addr);
        }
    }

    /// The ids of `id`'s waiting mail, in store order.
    pub(super) fn mail_ids(&self, id: ClientId) -> Vec<MailId> {
        let mailbox = self.mailboxes.get(&id);
        mailbox.map_or_else(Vec::new, |mb| mb.mail.keys().copied().collect())
    }

    /// Whether `link` is the session of a client taken for gone.
    pub(super) fn is_gone(&self, link: LinkId) -> bool {
        let owner = self.links.get(link).and_then(|l| l.owner);
        owner.is_some_and(|id| {
            let session = &self.sessions[id.index() as usize];
            session.gone && session.link == Some(link)
        })
    }

    /// A client taken for gone proved a new address on its session: it had
    /// only moved. It is online again, same session and name, everyone's
    /// table follows, and what was stored for it meanwhile comes live.
    pub(super) fn revive(&mut self, now: Instant, id: ClientId, name: Name, addr: SocketAddr) {
        let session = &mut self.sessions[id.index() as usize];
        session.gone = false;
        session.rounds = 0;
        // It never stopped taking deltas.
        session.syncing = false;
        if let Some(timer) = session.presence.take() {
            self.timers.cancel(timer);
        }
        self.table.set(id, addr, true);
        self.publish_presence(id);
        let mail = self.mail_ids(id);
        let session = &mut self.sessions[id.index() as usize];
        session.queue = mail.into_iter().map(|m| (m, None)).collect();
        session.serial = true;
        self.event(ServerEvent::Back(name, addr));
        self.heard(now, id);
        self.pump(now, id);
    }

    /// Makes `link` the client's session, marks it online at the link's
    /// address, welcomes it and starts streaming its mailbox.
    pub(super) fn accept(&mut self, now: Instant, id: ClientId, link: LinkId, seq: Seq) {
        let (Some(addr), Some(key)) = (self.links.addr(link), self.links.remote(link)) else {
            return;
        };
        let entry = self.table.get(id);
        // Checked by every caller; checked again here, where it matters: a
        // name is never given to another key.
        if !entry.key.is_none() && entry.key != key {
            self.stats.ignored += 1;
            return;
        }
        if self.fetch_for_registration(id, link, seq) {
            return;
        }
        let entry = self.table.get(id);
        let changed = !(entry.online && entry.addr == addr && entry.key == key);
        let name = entry.name.clone();
        let session = &mut self.sessions[id.index() as usize];
        if let Some(old) = session.link.replace(link)
            && old != link
        {
            // The previous session is over: a datagram on it now gets a
            // stateless reset, and its process registers again if alive.
            self.links.remove(old);
        }
        self.links.set_owner(link, id);
        if changed {
            // The registry: who owns the name, who may have mail, and where
            // and when it was last seen. Committed before the welcome leaves.
            let seen_at = Some(self.seen(now, id));
            self.store_ops.push_back(StoreOp::Client(ClientRecord {
                name: name.clone(),
                addr,
                key: Some(key),
                seen_at,
            }));
        }
        self.table.set_key(id, key);
        self.table.set(id, addr, true);
        self.remote.remove(&id);
        self.claim_presence(id);
        self.cancel_deliveries(id);
        let mail = self.mail_ids(id);
        let session = &mut self.sessions[id.index() as usize];
        session.rounds = 0;
        session.gone = false;
        session.serial = false;
        session.batch = seq;
        // It syncs after the welcome (and after its mail).
        session.syncing = true;
        session.queue = mail
            .iter()
            .enumerate()
            .map(|(i, &m)| (m, Some(i as u32)))
            .collect();
        let (version, count, reset) = (
            self.table.version(),
            mail.len() as u32,
            self.links.reset_token(link),
        );
        let welcome = Message::Welcome {
            seq,
            version,
            mail: count,
            reset,
        };
        match (mail.last(), self.batch.first_mail) {
            // It counts mail of the batch under way, which a failed commit
            // takes back: then a welcome with the lower count replaces it
            // (a counted position that never came would stall the batch).
            (Some(&last), Some(first)) if last >= first => {
                let promise = Promise::Welcome {
                    version,
                    mail: count,
                    reset,
                    last,
                };
                self.promise(id, seq, welcome, promise);
            }
            _ => self.reply(id, seq, welcome),
        }
        self.event(ServerEvent::Registered(name, addr));
        self.heard(now, id);
        // Queued after the welcome, so the client learns the batch size first.
        self.pump(now, id);
    }

    /// Marks the client offline, tells everyone (via the next delta) and
    /// stops its deliveries; its mail stays. Its session stays for a
    /// presence timeout: a dereg'd client's retried dereg finds its answer
    /// there, and a silent one (`notified` false) that only moved may come
    /// back on it ([`Server::revive`]).
    pub(super) fn set_offline(&mut self, id: ClientId, notified: bool) {
        let entry = self.table.get(id);
        let (addr, name) = (entry.addr, entry.name.clone());
        // Seen until now: what the name's time-to-live counts from.
        self.note_seen(self.now, id);
        self.table.set(id, addr, false);
        self.publish_presence(id);
        self.cancel_deliveries(id);
        self.unload(id);
        // The session is kept until a presence timeout from now
        // (`on_presence_timer`): a retried dereg still finds its answer, and
        // a silent client that only moved can prove its new address on it.
        let session = &mut self.sessions[id.index() as usize];
        session.gone = !notified;
        session.last_heard = Some(self.now);
        if session.link.is_some() && session.presence.is_none() {
            let due = self.now + self.config.presence_timeout;
            session.presence = Some(self.timers.insert(due, Timer::Presence(id)));
        }
        self.release(id);
        self.event(ServerEvent::Offline(name, notified));
    }

    /// Frees the session of `id` if nothing is under way on it.
    pub(super) fn release(&mut self, id: ClientId) {
        self.sessions.release(id.index() as usize);
    }

    /// Notes that `id` is online now, for its "last seen"; returns the time.
    pub(super) fn seen(&mut self, now: Instant, id: ClientId) -> i64 {
        let unix = self.unix_time(now);
        self.sessions.seen[id.index() as usize] = unix;
        unix
    }

    /// Writes `id`'s row again with "last seen" now.
    pub(super) fn note_seen(&mut self, now: Instant, id: ClientId) {
        let entry = self.table.get(id);
        let (name, addr, key) = (entry.name.clone(), entry.addr, entry.key);
        let seen_at = Some(self.seen(now, id));
        self.store_ops.push_back(StoreOp::Client(ClientRecord {
            name,
            addr,
            key: (!key.is_none()).then_some(key),
            seen_at,
        }));
    }

    /// The client showed signs of life: push its presence deadline out
    /// (lazily: the timer re-arms itself when it fires early).
    pub(super) fn heard(&mut self, now: Instant, id: ClientId) {
        let unix = self.unix_time(now);
        let stored = self.sessions.seen[id.index() as usize];
        if unix.saturating_sub(stored) >= SEEN_REFRESH && self.table.get(id).online {
            self.note_seen(now, id);
        }
        let session = &mut self.sessions[id.index() as usize];
        session.last_heard = Some(now);
        if session.presence.is_none() && self.table.get(id).online {
            let due = now + self.config.presence_timeout;
            session.presence = Some(self.timers.insert(due, Timer::Presence(id)));
        }
    }

    pub(super) fn on_presence_timer(&mut self, now: Instant, id: ClientId) {
        let here = self.is_here(id);
        let session = &mut self.sessions[id.index() as usize];
        session.presence = None;
        let heard = session.last_heard.unwrap_or(now);
        let due = heard + self.config.presence_timeout;
        if !here {
            // Deregistered (its session answered retried deregs, which stop
            // within 2.5 s) or taken for gone (a client that only moved had
            // that long to prove its new address): a presence timeout later
            // the session is dropped, so an idle offline client keeps
            // nothing here.
            if now < due && session.link.is_some() {
                session.presence = Some(self.timers.insert(due, Timer::Presence(id)));
            } else if let Some(link) = session.link.take() {
                session.gone = false;
                self.links.remove(link);
            }
            self.release(id);
            return;
        }
        if now >= due {
            // Three heartbeats missed: a silent leave, noticed without
            // anyone having to message the client.
            self.set_offline(id, false);
        } else {
            session.presence = Some(self.timers.insert(due, Timer::Presence(id)));
        }
    }

    /// The row for `name`, created offline at `addr` if missing.
    pub(super) fn row(
        &mut self,
        name: &Name,
        addr: SocketAddr,
        key: PublicKey,
    ) -> Option<ClientId> {
        if let Some(id) = self.table.lookup(name) {
            return Some(id);
        }
        let id = self.table.insert(name.clone(), addr, false, key).ok()?;
        // New (or a vacant row given to a new name): counted as seen from
        // now, whenever it next logs in.
        let unix = self.unix_time(self.now);
        self.sessions.reset(id.index() as usize, unix);
        Some(id)
    }

    /// How often names are checked: hourly, or twice per time-to-live when
    /// that is shorter (no name outlives it by more than half).
    pub(super) fn name_sweep(&self) -> Duration {
        self.config.name_ttl.map_or(NAME_SWEEP, |ttl| {
            (ttl / 2).clamp(Duration::from_secs(1), NAME_SWEEP)
        })
    }

    /// Forgets every name not online for the name time-to-live that nothing
    /// still refers to: offline with no session, no probe and no delivery
    /// under way, an empty mailbox, and no stored mail from it (that mail
    /// is checked against the name's key). Its row is vacant for a new
    /// name and the store forgets it.
    pub(super) fn forget_unseen(&mut self, now: Instant) {
        let Some(ttl) = self.config.name_ttl else {
            return;
        };
        if self.config.instance.is_some() {
            // One of several servers does not hold every mailbox, so it
            // cannot tell an unseen name's mailbox is empty, nor that no
            // mail from it waits anywhere: names are kept.
            return;
        }
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let unix = self.unix_time(now);
        let senders: HashSet<&Name> = (self.mailboxes.values())
            .flat_map(|mb| mb.mail.values().map(|m| &m.from))
            .collect();
        let unseen: Vec<ClientId> = (self.table.iter())
            .filter(|&(id, e)| {
                let s = &self.sessions[id.index() as usize];
                !e.online
                    && self.sessions.seen[id.index() as usize].saturating_add(ttl) <= unix
                    && s.link.is_none()
                    && s.probe.is_none()
                    && s.queue.is_empty()
                    && s.inflight.is_empty()
                    && self.mailboxes.get(&id).is_none_or(|mb| mb.mail.is_empty())
                    && !senders.contains(&e.name)
            })
            .map(|(id, _)| id)
            .collect();
        for id in unseen {
            let name = self.table.get(id).name.clone();
            let i = id.index() as usize;
            if let Some(key) = self.sessions.live[i].take().and_then(|s| s.presence) {
                self.timers.cancel(key);
            }
            self.mailboxes.remove(&id);
            // The row goes to the next new name: nothing of this one's
            // cluster presence may stick to it.
            self.epochs.remove(&id);
            self.remote.remove(&id);
            self.table.remove(id);
            self.event(ServerEvent::Forgotten {
                name: name.clone(),
                days: unix.saturating_sub(self.sessions.seen[i]) / 86_400,
            });
            self.store_ops.push_back(StoreOp::Forget(name));
        }
    }

    /// Turns the table changes made since the last flush into deltas for
    /// every online client: bursts coalesce into one update per drain.
    pub(super) fn flush_deltas(&mut self) {
        let deltas = self.table.take_deltas();
        if deltas.is_empty() {
            return;
        }
        let online: Vec<LinkId> = self
            .table
            .iter()
            .filter(|(_, e)| e.online)
            .map(|(id, _)| &self.sessions[id.index() as usize])
            .filter(|s| !s.syncing)
            .filter_map(|s| s.link)
            .collect();
        for delta in deltas {
            let msg = Message::Delta {
                prev: delta.prev,
                version: delta.version,
                entries: delta.entries,
            };
            let plain = wire::encode_to_vec(&msg);
            for &link in &online {
                self.links
                    .send_encoded(link, &plain, What::Delta, &mut self.transmits);
            }
        }
    }

    /// Arms the deltas' timer if the table changed and none is armed.
    pub(super) fn schedule_deltas(&mut self, now: Instant) {
        if !self.deltas_armed && self.table.has_changes() {
            self.deltas_armed = true;
            self.timers.insert(now + DELTA_INTERVAL, Timer::Deltas);
        }
    }
}
