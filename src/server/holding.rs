//! Which mailboxes a server holds. Alone, it holds every one (loaded at
//! start). One of several ([`ServerConfig::instance`]) holds only those it
//! needs: a client's mailbox is fetched from the store when the client
//! registers here, or when a message is saved for it here, and dropped
//! again when the client comes online at another server. So a server's
//! memory grows with the clients it serves, not with the whole store's
//! mail; the others' changes to a mailbox it holds reach it through the
//! feed ([`Server::handle_remote`]).
//!
//! A request that needs a mailbox not held waits for it, as one waits for
//! a liveness probe ([`Waiter`]); the store thread fetches the mailboxes
//! asked for ([`Server::poll_mailboxes`]) in its order with commits and
//! feed reads, so a mailbox fetched is never older than the feed read
//! before it, and the feed read after it brings anything newer.

use super::*;

/// Most mailboxes being fetched at once; past it a request that needs one
/// more is refused as busy (a save) or dropped (a registration, which its
/// client sends again).
pub(super) const MAX_LOADS: usize = 1024;

impl Server {
    /// Whether this server holds `id`'s whole mailbox: always when alone;
    /// one of several, only a mailbox it fetched (or of a name new here).
    pub(super) fn holds(&self, id: ClientId) -> bool {
        self.config.instance.is_none() || self.full.contains(&id)
    }

    /// Holds `id`'s mailbox from now on without fetching it: a name
    /// registered here first has nothing stored yet.
    pub(super) fn hold_new(&mut self, id: ClientId) {
        if self.config.instance.is_some() {
            self.full.insert(id);
        }
    }

    /// Makes `waiter` wait for `id`'s mailbox, fetched from the store
    /// unless it is held already: `false` when it is (go on at once).
    pub(super) fn wait_for_mailbox(&mut self, id: ClientId, waiter: Waiter) -> bool {
        if self.holds(id) {
            return false;
        }
        self.fetch_mailbox(id, waiter);
        true
    }

    /// One of several servers welcomes a client with its mailbox as the
    /// store has it: fetched again for each registration (a message saved
    /// at another server may not have come through the feed yet), the
    /// registration waiting. `false`: go on (alone, or fetched just now
    /// for this session, or a name new here).
    pub(super) fn fetch_for_registration(&mut self, id: ClientId, link: LinkId, seq: Seq) -> bool {
        if self.config.instance.is_none() || self.fresh == Some(link) {
            return false;
        }
        self.fetch_mailbox(id, Waiter::Register { link, seq });
        true
    }

    /// Fetches `id`'s mailbox, `waiter` waiting for it.
    fn fetch_mailbox(&mut self, id: ClientId, waiter: Waiter) {
        let same = |w: &Waiter| match (w, &waiter) {
            (Waiter::Register { link, seq }, Waiter::Register { link: l, seq: s }) => {
                link == l && seq == s
            }
            (
                Waiter::Save { from, seq, .. },
                Waiter::Save {
                    from: f, seq: s, ..
                },
            ) => from == f && seq == s,
            _ => false,
        };
        let waiters = self.loading.get(&id);
        if waiters.is_some_and(|w| w.iter().any(same)) {
            // A retransmission of what already waits.
            return;
        }
        let full = match waiters {
            Some(w) => w.len() >= PROBE_WAITERS,
            None => self.loading.len() >= MAX_LOADS,
        };
        if full {
            self.stats.ignored += 1;
            self.not_loaded(waiter, Refusal::Busy);
            return;
        }
        if !self.loading.contains_key(&id) {
            self.loads.push_back(id);
        }
        self.loading.entry(id).or_default().push(waiter);
    }

    /// The mailboxes to fetch (by their owners' names): the driver reads
    /// each one's stored mail ([`crate::store::Store::mailboxes`]) and
    /// hands it to [`Server::handle_mailboxes`].
    #[must_use]
    pub fn poll_mailboxes(&mut self) -> Vec<Name> {
        let ids: Vec<ClientId> = self.loads.drain(..).collect();
        (ids.into_iter())
            .filter(|id| self.loading.contains_key(id))
            .map(|id| self.table.get(id).name.clone())
            .collect()
    }

    /// What the store gave for [`Server::poll_mailboxes`]: every message
    /// stored for `names`. The mailboxes are held from now on and what
    /// waited for them goes on; a store that failed leaves them not held
    /// (a save waiting is refused, its sender may send again; a
    /// registration waiting is dropped, its client sends it again).
    pub fn handle_mailboxes(
        &mut self,
        now: Instant,
        names: &[Name],
        mail: std::io::Result<Vec<StoredMail>>,
    ) {
        self.now = self.now.max(now);
        let ids: HashSet<ClientId> = (names.iter())
            .filter_map(|n| self.table.lookup(n))
            .filter(|id| self.loading.contains_key(id))
            .collect();
        // Messages this server stored that are not committed yet: a
        // fetch cannot have seen them, and this server's own commits never
        // come back through the feed, so a mailbox fetched now is fetched
        // once more after they are (nothing waiting on that second one).
        let uncommitted = |server: &Server, id: ClientId| {
            !server.batch.channels.is_empty() || !server.uncommitted_to(id).is_empty()
        };
        let watermark = self.mail_id_of(self.next_mail);
        match mail {
            Err(_) => {
                for id in ids {
                    let waiters = self.loading.remove(&id).unwrap_or_default();
                    if waiters.is_empty() && self.refetch.len() < self.table.capacity() {
                        // A second fetch that failed: tried again after
                        // the next commit.
                        self.refetch.push((id, watermark));
                    }
                    for waiter in waiters {
                        self.not_loaded(waiter, Refusal::StoreBusy);
                    }
                }
            }
            Ok(mail) => {
                // Deleted here but not in the store yet (acked, expired):
                // a fetch may still find them, and must not bring them back.
                let deleting = self.deleting();
                self.full.extend(ids.iter().copied());
                for id in &ids {
                    // Held now: counted whole.
                    self.waiting.remove(id);
                }
                // Held here from before, gone from the store since (acked
                // or expired through another server while this one's feed
                // was behind): it goes, unless it is this server's and not
                // committed yet. Not while its client is online here,
                // whose deliveries may be under way.
                let stored: HashSet<(Name, MailId)> =
                    mail.iter().map(|m| (m.to.clone(), m.mail)).collect();
                let away: Vec<ClientId> = (ids.iter().copied())
                    .filter(|&id| !self.is_here(id))
                    .collect();
                for id in away {
                    let name = self.table.get(id).name.clone();
                    let mine = self.uncommitted_to(id);
                    for held in self.mail_ids(id) {
                        if !stored.contains(&(name.clone(), held)) && !mine.contains(&held) {
                            self.unput(id, held);
                        }
                    }
                }
                for m in mail {
                    let Some(id) = self.table.lookup(&m.to).filter(|id| ids.contains(id)) else {
                        continue;
                    };
                    if deleting.contains(&(m.to.clone(), m.mail)) {
                        continue;
                    }
                    let mail = m.mail;
                    // New to this server: a client online here gets it now
                    // (one registering is welcomed with it).
                    if self.hold_committed(m, false).is_some()
                        && self.is_here(id)
                        && self.queue_live(id, mail)
                    {
                        self.fanout.push_back(id);
                    }
                }
                // What expired while nobody held it goes now.
                self.expire(now);
                for id in ids {
                    let waiters = self.loading.remove(&id).unwrap_or_default();
                    if uncommitted(self, id)
                        && !waiters.is_empty()
                        // Bounded by the table, not by MAX_LOADS: in a
                        // join storm a copy left out would wait for its
                        // client's next login.
                        && self.refetch.len() < self.table.capacity()
                    {
                        self.refetch.push((id, watermark));
                    }
                    self.resume(now, id, waiters);
                }
            }
        }
        self.schedule_deltas(now);
    }

    /// The messages this server put in `id`'s mailbox that are not
    /// committed yet.
    fn uncommitted_to(&self, id: ClientId) -> HashSet<MailId> {
        (self.batch.mail.iter())
            .filter(|&&(to, _)| to == id)
            .map(|&(_, mail)| mail)
            .collect()
    }

    /// Messages deleted here whose deletes are not committed yet (acked,
    /// expired): the store may still give them, by recipient and id (a
    /// channel message's copies share its id).
    pub(super) fn deleting(&self) -> HashSet<(Name, MailId)> {
        (self.store_ops.iter())
            .chain(&self.batch.others)
            .chain(&self.deferred)
            .filter_map(|op| match op {
                StoreOp::Delete { to, mail } => Some((to.clone(), *mail)),
                _ => None,
            })
            .collect()
    }

    /// After a commit that took every message up to `done`: the mailboxes
    /// fetched while those were under way are fetched again.
    pub(super) fn refetch_after(&mut self, done: MailId) {
        let (due, wait): (Vec<_>, Vec<_>) = (self.refetch.drain(..)).partition(|&(_, w)| w <= done);
        self.refetch = wait;
        for (id, _) in due {
            if self.holds(id) && !self.loading.contains_key(&id) {
                self.loading.insert(id, Vec::new());
                self.loads.push_back(id);
            }
        }
    }

    /// What waited for `id`'s mailbox goes on: mail first, so a client
    /// registering finds it in the mailbox it is welcomed with.
    fn resume(&mut self, now: Instant, id: ClientId, mut waiters: Vec<Waiter>) {
        waiters.sort_by_key(|w| matches!(w, Waiter::Register { .. }));
        for waiter in waiters {
            match waiter {
                Waiter::Save { from, seq, mail } => self.save_or_probe(now, from, seq, id, *mail),
                Waiter::Register { link, seq } => {
                    // Checked again from the start: the name's key, its
                    // home and its presence may have changed meanwhile.
                    if self.links.get(link).is_some() {
                        let name = self.table.get(id).name.clone();
                        self.fresh = Some(link);
                        self.on_register(now, link, seq, name);
                        self.fresh = None;
                    }
                }
            }
        }
    }

    /// A request whose mailbox could not be fetched: a save is refused
    /// with `reason`; a registration gets no answer (its client sends it
    /// again, which asks the store again).
    fn not_loaded(&mut self, waiter: Waiter, reason: Refusal) {
        if let Waiter::Save { from, seq, .. } = waiter {
            self.reply(from, seq, Message::Refused { seq, reason });
        }
    }

    /// Lets go of `id`'s mailbox: another server serves the client now and
    /// holds it. Nothing of it is deleted from the store; what it held is
    /// counted from now on.
    pub(super) fn drop_mailbox(&mut self, id: ClientId) {
        if self.config.instance.is_none() || !self.full.remove(&id) {
            return;
        }
        let held: Vec<(MailId, i64)> = (self.mailboxes.get(&id).into_iter())
            .flat_map(|mb| mb.mail.iter().map(|(&mail, h)| (mail, h.stored_at)))
            .collect();
        self.waiting.remove(&id);
        let mine = self.uncommitted_to(id);
        for &(mail, stored_at) in &held {
            self.count(id, stored_at);
            if mine.contains(&mail) {
                // Not committed yet: uncounted if its commit fails.
                self.batch.counted.push((mail, id));
            }
        }
        if !mine.is_empty() {
            self.batch.counted.sort_unstable();
        }
        for (mail, _) in held {
            self.unput(id, mail);
        }
        self.mailboxes.remove(&id);
    }

    /// Counts one more message, stored at `stored_at`, for `id`'s mailbox,
    /// not held here, unless it holds its limit already (`false`).
    pub(super) fn count_waiting(&mut self, id: ClientId, stored_at: i64) -> bool {
        let limit = u32::try_from(self.config.mailbox_messages).unwrap_or(u32::MAX);
        if self.counted(id) >= limit {
            return false;
        }
        self.count(id, stored_at);
        true
    }

    /// Messages counted for `id`'s mailbox; none once the newest of them
    /// is past the mail's time to live (nobody here expires them one by
    /// one: they are counted, not held).
    fn counted(&mut self, id: ClientId) -> u32 {
        let unix = self.unix_time(self.now);
        let ttl = (self.config.mail_ttl).map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
        let Some(w) = self.waiting.get_mut(&id) else {
            return 0;
        };
        if w.n > 0 && ttl.is_some_and(|t| w.newest.saturating_add(t) <= unix) {
            // Their deletes may still come (the home expiring them): those
            // are theirs, not the next messages'.
            w.expired = w.expired.saturating_add(w.n);
            w.n = 0;
        }
        w.n
    }

    /// Counts one more message, stored at `stored_at`, for `id`'s mailbox.
    pub(super) fn count(&mut self, id: ClientId, stored_at: i64) {
        self.counted(id);
        let w = self.waiting.entry(id).or_default();
        w.n = w.n.saturating_add(1);
        w.newest = w.newest.max(stored_at);
    }

    /// One message fewer in `id`'s mailbox, not held here: one taken for
    /// expired first (its late delete), else one counted.
    pub(super) fn uncount(&mut self, id: ClientId) {
        if let Some(w) = self.waiting.get_mut(&id) {
            if w.expired > 0 {
                w.expired -= 1;
            } else {
                w.n = w.n.saturating_sub(1);
            }
            if w.n == 0 && w.expired == 0 {
                self.waiting.remove(&id);
            }
        }
    }
}

/// Messages counted in a mailbox another server holds: how many, and when
/// the newest was stored (unix seconds); and how many were let go as past
/// the mail's time to live whose deletes have not come.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Waiting {
    n: u32,
    newest: i64,
    expired: u32,
}
