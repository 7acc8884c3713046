//! Requests on a session: authenticated, rate-limited, answered once (the
//! reply cache answers a retransmission).

use super::*;

/// Most replies remembered per session, to answer retransmitted requests.
pub(super) const REPLY_CACHE: usize = 16;

#[derive(Debug, Clone)]
pub(super) enum Cached {
    /// Being worked on (probe or commit pending): retries are ignored.
    Pending,
    /// The encoded reply, sealed afresh each time it is sent (replies are
    /// small; the bytes, not a `Message` with its inline 1000-byte text
    /// buffer, are what is kept).
    Done(What, Vec<u8>),
}

#[derive(Debug)]
pub(super) struct Inflight {
    pub(super) pos: Option<u32>,
    pub(super) sent: u8,
    pub(super) timer: TimerKey,
}

#[derive(Debug, Default)]
pub(super) struct Session {
    /// The client's current Noise session.
    pub(super) link: Option<LinkId>,
    pub(super) replies: VecDeque<(Seq, Cached)>,
    /// Boxed: rare, and every session would pay its size.
    pub(super) probe: Option<Box<Probe>>,
    pub(super) queue: VecDeque<(MailId, Option<u32>)>,
    pub(super) inflight: BTreeMap<MailId, Inflight>,
    pub(super) rounds: u8,
    /// The welcome that opened the current mail batch.
    pub(super) batch: Seq,
    /// When an authenticated datagram last came from the client.
    pub(super) last_heard: Option<Instant>,
    pub(super) presence: Option<TimerKey>,
    /// Welcomed, and no sync pass of it has reached the table's end since:
    /// it ignores deltas (its pass brings every row), so it is sent none.
    /// In a join storm most online clients are such joiners; deltas to
    /// them would cost as much as all their pages.
    pub(super) syncing: bool,
    /// Taken for gone by a probe or the presence timeout, not deregistered:
    /// the client may only have moved (a NAT rebinding the probe's old
    /// address did not reach). Its link is kept for a presence timeout, and
    /// if it proves a new address on it, it is online again on the same
    /// session ([`Server::revive`]).
    pub(super) gone: bool,
    /// Its mail goes one message at a time: what was stored while it was
    /// taken for gone is delivered live after [`Server::revive`], without
    /// a batch's positions, so only one in flight keeps it in store order.
    pub(super) serial: bool,
}

impl Session {
    /// A row's session while nothing is under way.
    pub(super) const IDLE: Session = Session {
        link: None,
        replies: VecDeque::new(),
        probe: None,
        queue: VecDeque::new(),
        inflight: BTreeMap::new(),
        rounds: 0,
        batch: Seq(0),
        last_heard: None,
        presence: None,
        syncing: false,
        gone: false,
        serial: false,
    };

    /// Nothing under way and nothing to answer on: no link, probe,
    /// delivery or presence timer.
    pub(super) fn is_idle(&self) -> bool {
        self.link.is_none()
            && self.probe.is_none()
            && self.queue.is_empty()
            && self.inflight.is_empty()
            && self.presence.is_none()
    }
}

/// One session per table row, boxed only while the row has one: an idle
/// offline client costs a pointer and its "last seen" here, not a
/// `Session` (the registry may hold far more names than are online).
#[derive(Debug, Default)]
pub(super) struct Sessions {
    pub(super) live: Vec<Option<Box<Session>>>,
    /// Per row: the "last seen" time last written to the store, Unix
    /// seconds.
    pub(super) seen: Vec<i64>,
}

impl Sessions {
    /// Row `i` starts afresh (a new row, or a vacant one given to a new
    /// name), seen at `seen`.
    pub(super) fn reset(&mut self, i: usize, seen: i64) {
        if i >= self.live.len() {
            self.live.resize_with(i + 1, || None);
            self.seen.resize(i + 1, seen);
        }
        self.live[i] = None;
        self.seen[i] = seen;
    }

    /// Row `i`'s session, if it has one.
    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut Session> {
        self.live[i].as_deref_mut()
    }

    /// Frees row `i`'s session if it is idle.
    pub(super) fn release(&mut self, i: usize) {
        if self.live[i].as_ref().is_some_and(|s| s.is_idle()) {
            self.live[i] = None;
        }
    }
}

static IDLE_SESSION: Session = Session::IDLE;

impl std::ops::Index<usize> for Sessions {
    type Output = Session;

    fn index(&self, i: usize) -> &Session {
        self.live[i].as_deref().unwrap_or(&IDLE_SESSION)
    }
}

impl std::ops::IndexMut<usize> for Sessions {
    /// Boxes a session for the row if it has none.
    fn index_mut(&mut self, i: usize) -> &mut Session {
        self.live[i].get_or_insert_with(Box::default)
    }
}

impl Server {
    /// The registered client whose current session `link` is.
    pub(super) fn authenticate(&mut self, now: Instant, link: LinkId) -> Option<ClientId> {
        let owner = self.links.get(link).and_then(|l| l.owner);
        match owner {
            Some(id) if self.sessions[id.index() as usize].link == Some(link) => {
                self.heard(now, id);
                Some(id)
            }
            _ => {
                self.stats.ignored += 1;
                None
            }
        }
    }

    /// Authenticates a request and answers it from the reply cache if it is a
    /// retransmission; `Some` means "new, go ahead".
    pub(super) fn request(&mut self, now: Instant, link: LinkId, seq: Seq) -> Option<ClientId> {
        let Some(id) = self.authenticate(now, link) else {
            // A session no registration succeeded on: the client learns it
            // is not registered.
            self.refuse_session(link, seq);
            return None;
        };
        if self.cached(id, seq) {
            return None;
        }
        Some(id)
    }

    /// [`Server::request`] for requests that need the client online; an
    /// offline one is told its session is gone (it re-registers).
    pub(super) fn online_request(
        &mut self,
        now: Instant,
        link: LinkId,
        seq: Seq,
    ) -> Option<ClientId> {
        let id = self.request(now, link, seq)?;
        if !self.is_here(id) {
            self.refuse_session(link, seq);
            return None;
        }
        Some(id)
    }

    /// Takes a token from the request's source. Over the rate, a request
    /// that can be refused is (`refuse`: a save or a channel message, which
    /// the user is told to send again); a sync or heartbeat is dropped as
    /// if lost (a refusal would make the client register again), and its
    /// retries, half a second apart, find the bucket refilled.
    pub(super) fn within_rate(
        &mut self,
        now: Instant,
        link: LinkId,
        id: ClientId,
        seq: Seq,
        refuse: bool,
    ) -> bool {
        let Some(addr) = self.links.addr(link) else {
            return false;
        };
        if self.requests.take(now, addr) {
            return true;
        }
        self.stats.limited += 1;
        if refuse {
            let reason = Refusal::TooManyRequests;
            self.reply(id, seq, Message::Refused { seq, reason });
        } else {
            self.forget(id, seq);
        }
        false
    }

    /// "Unknown session": the client re-registers by itself.
    pub(super) fn refuse_session(&mut self, link: LinkId, seq: Seq) {
        let reason = Refusal::UnknownSession;
        let msg = Message::Refused { seq, reason };
        self.links.send(link, &msg, &mut self.transmits);
    }

    /// If `seq` was seen: resend its reply (or ignore it while pending).
    pub(super) fn cached(&mut self, id: ClientId, seq: Seq) -> bool {
        let session = &self.sessions[id.index() as usize];
        let Some((_, cached)) = session.replies.iter().find(|(s, _)| *s == seq) else {
            return false;
        };
        if let (Cached::Done(what, plain), Some(link)) = (cached, session.link) {
            let (what, plain) = (*what, plain.clone());
            let at = self.transmits.len();
            self.links
                .send_encoded(link, &plain, what, &mut self.transmits);
            // A resent "saved" of this very batch stands or falls with it.
            if self.transmits.len() > at
                && self.batch.acks.iter().any(|&(i, s, _)| i == id && s == seq)
            {
                self.batch
                    .ack_transmits
                    .push((self.sent + at, id, seq, link));
            }
        }
        true
    }

    pub(super) fn pending(&mut self, id: ClientId, seq: Seq) {
        let replies = &mut self.sessions[id.index() as usize].replies;
        if replies.len() == REPLY_CACHE {
            replies.pop_front();
        }
        // Most sessions only ever cache their welcome: room for one.
        replies.reserve_exact(1);
        replies.push_back((seq, Cached::Pending));
    }

    /// Drops `seq` from the cache (idempotent reads need no cached reply).
    pub(super) fn forget(&mut self, id: ClientId, seq: Seq) {
        self.sessions[id.index() as usize]
            .replies
            .retain(|(s, _)| *s != seq);
    }

    /// Sends `msg` on the client's session and caches it for retransmitted
    /// requests.
    pub(super) fn reply(&mut self, id: ClientId, seq: Seq, msg: Message) {
        let (what, plain) = (msg.what(), wire::encode_to_vec(&msg));
        self.cache(id, seq, (what, plain.clone()));
        if let Some(link) = self.sessions[id.index() as usize].link {
            self.links
                .send_encoded(link, &plain, what, &mut self.transmits);
        }
    }

    /// Remembers the reply to `seq` for retransmitted requests.
    pub(super) fn cache(&mut self, id: ClientId, seq: Seq, (what, plain): (What, Vec<u8>)) {
        let replies = &mut self.sessions[id.index() as usize].replies;
        match replies.iter_mut().find(|(s, _)| *s == seq) {
            Some((_, cached)) => *cached = Cached::Done(what, plain),
            None => {
                if replies.len() == REPLY_CACHE {
                    replies.pop_front();
                }
                replies.reserve_exact(1);
                replies.push_back((seq, Cached::Done(what, plain)));
            }
        }
    }

    /// Sends `msg` on the client's session (no caching).
    pub(super) fn send_to(&mut self, id: ClientId, msg: &Message) {
        if let Some(link) = self.sessions[id.index() as usize].link {
            self.links.send(link, msg, &mut self.transmits);
        }
    }
}
