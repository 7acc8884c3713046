//! What the other servers of a cluster did, as the store tells it: every
//! server keeps the whole registry and every mailbox (bodies on disk, as
//! alone), writes its own changes to the shared store, and applies the
//! others' ([`Server::handle_remote`]) in the order they were committed.
//! A client is served by one server at a time, its home: only that one
//! delivers its mail and commits its acks; the others store mail for it
//! and show it in their tables as online "elsewhere".

use super::*;

/// A change another server of the cluster committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// A registry row written: a registration, a new address, a key bound.
    Client(ClientRecord),
    /// A direct message stored, for its recipient's home to deliver.
    Mail(StoredMail),
    /// A channel message stored once, with the recipients still owed it.
    Channel(ChannelMail),
    /// A message acked by its recipient (deleted from its mailbox).
    Deleted {
        /// The recipient.
        to: Name,
        /// The message.
        mail: MailId,
    },
    /// A client came online at the server `server` (at `addr`), or left it.
    Presence {
        /// The client.
        name: Name,
        /// Where the client is.
        addr: SocketAddr,
        /// Online or gone.
        online: bool,
        /// The server it is (or was) at, as clients reach it.
        server: SocketAddr,
        /// Its registrations counted: with the server, what orders two
        /// claims to one name (see [`Server::handle_remote`]).
        epoch: u64,
    },
}

impl Server {
    /// Applies what other servers of the cluster committed (the store
    /// already holds it: nothing of it is committed again), each server's
    /// in its commit order. Mail for a client online here is delivered at
    /// once; presence changes reach every client's table as deltas.
    ///
    /// Between servers there is no order, so presence carries its own:
    /// each registration counts one more epoch for its name, and a claim
    /// (epoch, server) wins over a lower one, the server's address
    /// breaking ties; a server's "gone" counts only for its own claim.
    pub fn handle_remote(&mut self, now: Instant, changes: Vec<Remote>) {
        self.now = self.now.max(now);
        // Acked here, its delete not committed yet: the store (read just
        // now) still had it, but it must not come back. (Once the delete
        // is committed the store no longer gives it.)
        let mail = |c: &Remote| matches!(c, Remote::Mail(_) | Remote::Channel(_));
        let deleting = match changes.iter().any(mail) {
            true => self.deleting(),
            false => HashSet::new(),
        };
        let gone = |m: &StoredMail| deleting.contains(&(m.to.clone(), m.mail));
        for change in changes {
            match change {
                Remote::Client(c) => self.remote_row(c),
                Remote::Mail(m) if gone(&m) => {}
                Remote::Mail(m) => self.remote_mail(m),
                Remote::Channel(c) => {
                    for copy in c.copies().filter(|m| !gone(m)) {
                        self.remote_mail(copy);
                    }
                }
                Remote::Deleted { to, mail } => {
                    if let Some(id) = self.table.lookup(&to) {
                        if !self.holds(id) {
                            self.uncount(id);
                        }
                        self.unput(id, mail);
                    }
                }
                Remote::Presence {
                    name,
                    addr,
                    online,
                    server,
                    epoch,
                } => self.remote_presence(name, addr, (online, epoch), server),
            }
        }
        self.schedule_deltas(now);
    }

    /// The store already held some messages of the batch just committed
    /// under other ids (another server stored the same message first, and
    /// its sender sent it again through this one): this server's copies
    /// go, the store's are held instead (and delivered, to a recipient
    /// online here). The senders were told "saved", which is true.
    pub(super) fn handle_kept_instead(&mut self, now: Instant, kept: Vec<(MailId, StoredMail)>) {
        self.now = self.now.max(now);
        // Every copy of ours goes, also a channel message's for a
        // recipient the store's copy was not stored for (it was not
        // stored again for it either).
        let ours: HashSet<MailId> = kept.iter().map(|(o, _)| *o).collect();
        // Counted for mailboxes held elsewhere, not stored: the store's
        // copy is counted as the feed brings it.
        let counted = std::mem::take(&mut self.counted_last);
        for (_, to) in counted.into_iter().filter(|(m, _)| ours.contains(m)) {
            self.uncount(to);
        }
        let phantoms: Vec<(ClientId, MailId)> = (self.mailboxes.iter())
            .flat_map(|(&to, mb)| {
                (ours.iter())
                    .filter(|m| mb.mail.contains_key(m))
                    .map(move |&m| (to, m))
            })
            .collect();
        for (to, mail) in phantoms {
            self.unput(to, mail);
        }
        for (_, theirs) in kept {
            let Some(id) = self.table.lookup(&theirs.to) else {
                continue;
            };
            if !self.holds(id) {
                // Counted when the feed brings the other server's commit
                // of it (or counted already): not twice.
                continue;
            }
            let mail = theirs.mail;
            if self.hold_committed(theirs, false).is_some() {
                if self.expiry.is_none() {
                    self.expire(now);
                }
                if self.queue_live(id, mail) {
                    self.fanout.push_back(id);
                }
            }
        }
        self.schedule_deltas(now);
    }

    /// Whether `id` is online at this server (not elsewhere in the
    /// cluster): only then does this server deliver to it, probe it,
    /// relay to it or take its requests.
    pub(super) fn is_here(&self, id: ClientId) -> bool {
        self.table.get(id).online && !self.remote.contains_key(&id)
    }

    /// Writes `id`'s presence to the store for the other servers, when
    /// there are any: online here or gone, under its current epoch.
    pub(super) fn publish_presence(&mut self, id: ClientId) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let me = cluster.me;
        let epoch = match self.epochs.get(&id) {
            Some(&(epoch, server)) if server == me => epoch,
            // Not ours (any more): nothing to say for it.
            Some(_) => return,
            None => 0,
        };
        let entry = self.table.get(id);
        self.store_ops.push_back(StoreOp::Presence {
            name: entry.name.clone(),
            addr: entry.addr,
            online: entry.online,
            epoch,
        });
    }

    /// A registration here: the name's next epoch is this server's, and
    /// the others hear of it.
    pub(super) fn claim_presence(&mut self, id: ClientId) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let next = self
            .epochs
            .get(&id)
            .map_or(1, |&(e, _)| e.saturating_add(1));
        self.epochs.insert(id, (next, cluster.me));
        self.publish_presence(id);
    }

    /// Says again, for the other servers, who is online here: after this
    /// server's lease ran out (it was stuck) they took its clients for
    /// offline.
    pub fn republish_presence(&mut self) {
        let here: Vec<ClientId> = (self.table.iter())
            .map(|(id, _)| id)
            .filter(|&id| self.is_here(id))
            .collect();
        for id in here {
            self.publish_presence(id);
        }
    }

    /// Clients online at servers no longer live are offline: a server
    /// killed says nothing, its lease just runs out.
    pub(super) fn drop_dead_servers(&mut self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let dead: Vec<ClientId> = (self.remote.iter())
            .filter(|(_, server)| !cluster.live.contains(server))
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.remote.remove(&id);
            let addr = self.table.get(id).addr;
            self.table.set(id, addr, false);
        }
    }

    fn remote_row(&mut self, c: ClientRecord) {
        let key = c.key.unwrap_or(PublicKey::NONE);
        let Some(id) = self.row(&c.name, c.addr, key) else {
            return;
        };
        // The store's key is the name's (the first registration committed
        // wins): a server that bound another one (two servers both took
        // themselves for its home at once) gives it up, and the session
        // of that key with it.
        if !key.is_none() && self.table.get(id).key != key {
            if !self.table.get(id).key.is_none() && self.is_here(id) {
                self.let_go(id);
                let at = self.table.get(id).addr;
                self.table.set(id, at, false);
            }
            self.table.set_key(id, key);
        }
        if !self.is_here(id) {
            let online = self.table.get(id).online;
            self.table.set(id, c.addr, online);
        }
        if let Some(seen) = c.seen_at {
            let i = id.index() as usize;
            self.sessions.seen[i] = self.sessions.seen[i].max(seen);
        }
    }

    fn remote_mail(&mut self, m: StoredMail) {
        let mail = m.mail;
        let Some(to) = self.hold_committed(m, false) else {
            return;
        };
        if self.expiry.is_none() {
            self.expire(self.now);
        }
        if self.queue_live(to, mail) {
            self.fanout.push_back(to);
        }
    }

    fn remote_presence(
        &mut self,
        name: Name,
        addr: SocketAddr,
        (online, epoch): (bool, u64),
        server: SocketAddr,
    ) {
        let Some(id) = self.table.lookup(&name) else {
            return;
        };
        let claim = (epoch, server.to_string());
        let held = self.epochs.get(&id).map(|&(e, s)| (e, s.to_string()));
        if held.as_ref().is_some_and(|h| claim < *h) {
            // Older than what this server knows: stale.
            return;
        }
        let same = held.as_ref() == Some(&claim);
        self.epochs.insert(id, (epoch, server));
        if self.cluster.as_ref().is_some_and(|c| c.me == server) {
            // This server's own claim from before a restart (as the store
            // kept it): counted, so the next registration here is newer.
            return;
        }
        if online || !same {
            // A newer claim, online or already gone again, supersedes any
            // older one, this server's included.
            if self.is_here(id) {
                self.let_go(id);
            }
            self.remote.remove(&id);
        }
        if online {
            self.remote.insert(id, server);
            self.table.set(id, addr, true);
            // Its server holds its mailbox now.
            self.drop_mailbox(id);
        } else if same && self.remote.get(&id) == Some(&server) {
            // Its server says it left.
            self.remote.remove(&id);
            self.table.set(id, addr, false);
        } else if !same {
            let at = self.table.get(id).addr;
            self.table.set(id, at, false);
        }
    }

    /// Stops serving `id` here without telling anyone (another server does
    /// now): deliveries stop, its body cache goes, its session ends.
    fn let_go(&mut self, id: ClientId) {
        self.cancel_deliveries(id);
        self.unload(id);
        let session = &mut self.sessions[id.index() as usize];
        let (link, presence) = (session.link.take(), session.presence.take());
        if let Some(link) = link {
            self.links.remove(link);
        }
        if let Some(timer) = presence {
            self.timers.cancel(timer);
        }
        self.release(id);
    }

    /// Holds a message the store has committed (at start, or from another
    /// server) in its recipient's mailbox, body on disk: `None` when it is
    /// already held, or dropped (unverifiable, undecryptable). `mine`:
    /// loaded at start, this server's to repair (a clear body encrypted,
    /// an unreadable one deleted). Another server's mail is never changed
    /// from here: what this server cannot check (a sender it does not
    /// know, a key it does not have) is that server's to judge, not a
    /// reason to delete it for the whole cluster.
    pub(super) fn hold_committed(&mut self, mut m: StoredMail, mine: bool) -> Option<ClientId> {
        // Before anything can skip it: an id in the store is never
        // given out again (a new message under it would be lost to the
        // store's conflict rule).
        self.next_mail = self.next_mail.max(self.counter_of(m.mail) + 1);
        // Mail for a name the registry lacks (a store edited by hand) still
        // gets a row, so it is not lost.
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let to = self.row(&m.to, unknown, PublicKey::NONE)?;
        if !self.holds(to) {
            // One of several servers, not serving this client: its
            // mailbox is fetched whole if this server ever needs it, and
            // only counted meanwhile.
            self.count(to, m.stored_at);
            return None;
        }
        if let Some(mb) = self.mailboxes.get(&to) {
            let key = self.dedup_key(&m.from, m.id);
            let twin = mb.keys.contains_key(&key)
                && (mb.mail.values()).any(|h| h.id == m.id && h.from == m.from);
            if mb.mail.contains_key(&m.mail) || twin {
                return None;
            }
        }
        if !mine && matches!(m.body, Body::Clear(_)) {
            return None;
        }
        if let Body::Clear(text) = &m.body {
            let body = self.legacy_at_rest(&m, text);
            self.store_ops.push_back(StoreOp::Rewrite {
                mail: m.mail,
                body: body.clone(),
            });
            m.body = body;
        }
        // Sealed mail is delivered with the key it was stored with: it
        // must be the key the sender's name is bound to, or a forgery
        // written into the store would be vouched for.
        if !self.vouched(&m.from, &m.body) {
            self.event(ServerEvent::Unverifiable {
                to: m.to.clone(),
                from: m.from.clone(),
                mail: m.mail,
            });
            if mine {
                self.store_ops.push_back(StoreOp::Delete {
                    to: m.to.clone(),
                    mail: m.mail,
                });
            }
            return None;
        }
        if self
            .content(&m.to, m.mail, &Held::new(&m), &m.body)
            .is_none()
        {
            // Encrypted under a server key that is gone, or damaged:
            // nobody can ever read it. Said once, then dropped.
            self.event(ServerEvent::Undecryptable(m.to.clone(), m.mail));
            if mine {
                self.store_ops.push_back(StoreOp::Delete {
                    to: m.to.clone(),
                    mail: m.mail,
                });
            }
            return None;
        }
        let mut held = Held::new(&m);
        // Checked; it stays on disk until a delivery needs it (a body
        // rewritten now may still be fetched clear: `handle_fetched`).
        held.body = None;
        self.charge(m.mail, held.shared, self.cost(m.mail, &held));
        self.by_age.insert((m.stored_at, m.mail, to));
        let key = self.dedup_key(&m.from, m.id);
        let mb = self.mailboxes.entry(to).or_default();
        mb.bytes += held.size();
        *mb.keys.entry(key).or_default() += 1;
        mb.mail.insert(m.mail, Box::new(held));
        Some(to)
    }
}
