//! The local client table kept in step with the server's: sync passes,
//! deltas, and the presence lines they bring.

use super::*;

/// Clients named one by one after a delta; the rest are counted.
pub(super) const PRESENCE_LINES: usize = 8;

impl Client {
    pub(super) fn start_sync(&mut self, now: Instant, since: u64) {
        if let Some(op) = self.requests.sync() {
            self.finish(op);
        }
        self.table.start_sync(since);
        self.sync_pages = 0;
        let seq = self.seq();
        self.start(now, Kind::Sync { seq }, ACK_TIMEOUT);
    }

    pub(super) fn on_page(
        &mut self,
        now: Instant,
        seq: Seq,
        version: u64,
        from: u32,
        entries: &[Entry],
        next: Option<u32>,
    ) {
        let Some(op) = self.requests.sync() else {
            return;
        };
        if self.requests.by_seq(seq) != Some(op) {
            return;
        }
        // Only the page that continues the pass: one after a lost page, or
        // a late copy, is dropped (the retry asks from where we are).
        let Some((since, expected)) = self.table.sync_request() else {
            return;
        };
        if from != expected {
            return;
        }
        self.sync_pages += 1;
        match self.table.apply_page(version, entries, next) {
            PageOutcome::More => {
                let same_pass = self.table.sync_request().is_some_and(|(s, _)| s == since);
                if next.is_some() && same_pass && self.sync_pages < wire::SYNC_WINDOW {
                    // More of this window is on its way: an answer, so the
                    // tries start over, but nothing to send.
                    self.rearm(now, op, ACK_TIMEOUT);
                    return;
                }
                // The next window: a request of its own.
                self.sync_pages = 0;
                let seq = self.seq();
                self.requests
                    .update(op, |req| req.kind = Kind::Sync { seq });
                self.restart(now, op, ACK_TIMEOUT);
            }
            PageOutcome::Done { changed } => {
                self.sync_pages = 0;
                self.finish(op);
                // Announce a join or log-back even if the table looks the same.
                let announce = std::mem::take(&mut self.announce);
                if changed || announce {
                    self.events.push_back(Event::TableUpdated);
                }
                self.become_ready();
            }
        }
    }

    pub(super) fn on_delta(&mut self, now: Instant, prev: u64, version: u64, entries: &[Entry]) {
        // While joining or reading the mailbox the sync that follows brings
        // the whole table; a delta now would only be announced twice.
        if self.presence != Presence::Online || self.batch.is_some() {
            return;
        }
        // Who was online before, to name who came and went.
        let before: Vec<Option<bool>> = entries
            .iter()
            .map(|e| self.table.get(&e.name).map(|row| row.online))
            .collect();
        match self.table.apply_delta(prev, version, entries) {
            DeltaOutcome::Applied { changed: true } => {
                self.events.push_back(Event::TableUpdated);
                let changes = entries
                    .iter()
                    .zip(before)
                    .filter(|(e, was)| e.name != self.config.name && *was != Some(e.online))
                    // A new name that is offline (a release, a restart) is
                    // no one coming or going.
                    .filter(|(e, was)| was.is_some() || e.online);
                let mut named = 0;
                let mut more = 0;
                for (e, _) in changes {
                    if named < PRESENCE_LINES {
                        named += 1;
                        self.events.push_back(Event::Presence {
                            name: e.name.clone(),
                            online: e.online,
                        });
                    } else {
                        more += 1;
                    }
                }
                if more > 0 {
                    self.events.push_back(Event::PresenceMore(more));
                }
            }
            DeltaOutcome::Applied { changed: false } | DeltaOutcome::Stale => {}
            DeltaOutcome::Gap => {
                if self.requests.sync().is_none() {
                    let since = self.table.version();
                    self.start_sync(now, since);
                }
            }
        }
    }
}
