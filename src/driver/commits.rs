//! The store on a thread of its own: the poll loop hands it a sealed batch
//! ([`Server::poll_batch`]), a body or mailboxes to fetch, and goes on
//! serving; the thread does the blocking work (an fsync, a round trip to
//! PostgreSQL, a failover's reconnection) and hands each result back
//! through a channel, waking the loop with a [`mio::Waker`]. The protocol
//! never runs here.
//!
//! One batch is under commit at a time: the next one gathers in the
//! server meanwhile and goes when this one is reported, so batches commit
//! in order and a failed one is reported before anything after it.

use std::io;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use mio::Waker;

use crate::Server;
use crate::store::{Body, News, Outcome, Store, StoreOp, StoredMail};
use crate::wire::{MailId, Name};

/// Work for the store's thread.
enum Job {
    Commit(Vec<StoreOp>),
    Fetch(Name, MailId),
    Mailboxes(Vec<Name>),
}

/// What the store's thread did.
pub enum Done {
    /// The batch sent last was committed (or not), with what the store
    /// has to say for the log, and what it did otherwise than asked
    /// ([`Store::outcomes`]).
    Committed(io::Result<()>, Vec<String>, Vec<Outcome>),
    /// A body asked for.
    Fetched(Name, MailId, io::Result<Option<Body>>, Vec<String>),
    /// Mailboxes asked for ([`Server::poll_mailboxes`]).
    Mailboxes(Vec<Name>, io::Result<Vec<StoredMail>>, Vec<String>),
    /// What the other servers of a cluster did ([`Store::news`]).
    News(io::Result<News>, Vec<String>),
}

/// How often the thread asks a shared store without a doorbell for news
/// when it has nothing else to do: how late, at most, a message saved at
/// another server reaches its recipient here. Busy, it asks between jobs
/// no more often than this, doorbell or not: a read of the feed after
/// every commit would double a commit's latency under load.
const NEWS_EVERY: Duration = Duration::from_millis(50);

/// How often the thread looks for a doorbell ring when it has nothing
/// else to do ([`Store::news_rung`]: a look costs no round trip, and
/// waits at most a millisecond; between jobs it does not wait): how late,
/// at most, a message saved at another server reaches its recipient here
/// when all is quiet. Every look wakes the thread: idle, one of three
/// servers spent 1.2 % of a core at 5 ms, 0.6 % at 20 ms (its database
/// backend 0.2–0.3 %); reading the feed every 50 ms, as before the
/// doorbell, cost 0.3 % and 0.5 % in the backend.
const RING_EVERY: Duration = Duration::from_millis(20);

/// How often the thread asks a store with a doorbell for news though
/// nobody rang (a ring may be lost): its lease is renewed then too, every
/// second ([`RENEW`](super::cluster::RENEW)), so this is well below that.
const NEWS_AT_LEAST: Duration = Duration::from_millis(250);

/// The store's thread, and whether a batch is with it.
pub struct Commits {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    /// A batch is being committed: the next waits.
    busy: bool,
}

impl Commits {
    /// Starts the thread that owns `store`; it wakes `waker` after each
    /// result.
    pub fn start(mut store: Box<dyn Store + Send>, waker: Arc<Waker>) -> io::Result<Commits> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel();
        thread::Builder::new()
            .name("udpchat-store".to_string())
            .spawn(move || {
                // Asks for news only of a store that has any.
                let mut shared = true;
                let mut asked = Instant::now();
                // A store with a doorbell (known after the first look),
                // and whether it rang since the last read of the news.
                let mut bell = false;
                let mut rang = true;
                let send = |done| {
                    let sent = outbox.send(done).is_ok();
                    // A loop that cannot be woken has gone.
                    sent && waker.wake().is_ok()
                };
                loop {
                    // Ends when the loop drops its sender (or its receiver).
                    let idle = if bell { RING_EVERY } else { NEWS_EVERY };
                    let job = match shared {
                        true => match inbox.recv_timeout(idle) {
                            Ok(job) => Some(job),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        },
                        false => match inbox.recv() {
                            Ok(job) => Some(job),
                            Err(_) => return,
                        },
                    };
                    // Without a doorbell: when idle, and between jobs once
                    // the last look is NEWS_EVERY old. With one: the same,
                    // once it rang, and every NEWS_AT_LEAST regardless.
                    let now = job.is_none() || asked.elapsed() >= NEWS_EVERY;
                    let ask = match shared.then(|| store.news_rung(job.is_none())).flatten() {
                        Some(rung) => {
                            bell = true;
                            rang |= rung;
                            (rang && now) || asked.elapsed() >= NEWS_AT_LEAST
                        }
                        None => {
                            bell = false;
                            now
                        }
                    };
                    let result = match job {
                        Some(Job::Commit(ops)) => {
                            let result = store.commit(&ops);
                            let outcomes = store.outcomes();
                            Some(Done::Committed(result, store.notes(), outcomes))
                        }
                        Some(Job::Fetch(to, mail)) => {
                            let body = store.fetch(&to, mail);
                            Some(Done::Fetched(to, mail, body, store.notes()))
                        }
                        Some(Job::Mailboxes(names)) => {
                            let mail = store.mailboxes(&names);
                            Some(Done::Mailboxes(names, mail, store.notes()))
                        }
                        None => None,
                    };
                    if let Some(done) = result
                        && !send(done)
                    {
                        return;
                    }
                    if ask && shared {
                        asked = Instant::now();
                        rang = false;
                        match store.news() {
                            None => shared = false,
                            Some(Ok(news)) if news.is_empty() => {}
                            Some(news) => {
                                if !send(Done::News(news, store.notes())) {
                                    return;
                                }
                            }
                        }
                    }
                }
            })?;
        Ok(Commits {
            jobs: Some(jobs),
            done,
            busy: false,
        })
    }

    /// Hands the thread the bodies the server asked for and, unless a
    /// batch is under way, the next batch. Fails if the thread is gone
    /// (it panicked): nothing would ever be committed again.
    pub fn dispatch(&mut self, server: &mut Server) -> io::Result<()> {
        let Some(jobs) = &self.jobs else {
            return Ok(());
        };
        let names = server.poll_mailboxes();
        if !names.is_empty() {
            jobs.send(Job::Mailboxes(names)).map_err(|_| gone())?;
        }
        while let Some((to, mail)) = server.poll_fetch() {
            jobs.send(Job::Fetch(to, mail)).map_err(|_| gone())?;
        }
        if !self.busy {
            let ops = server.poll_batch();
            if !ops.is_empty() {
                jobs.send(Job::Commit(ops)).map_err(|_| gone())?;
                self.busy = true;
            }
        }
        Ok(())
    }

    /// The next result, if one is in; fails if the thread is gone.
    pub fn take_done(&mut self) -> io::Result<Option<Done>> {
        let done = match self.done.try_recv() {
            Ok(done) => done,
            Err(mpsc::TryRecvError::Empty) => return Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => return Err(gone()),
        };
        if matches!(done, Done::Committed(..)) {
            self.busy = false;
        }
        Ok(Some(done))
    }
}

fn gone() -> io::Error {
    io::Error::other("the store's thread ended")
}

impl Drop for Commits {
    /// The thread ends after the job in hand (a commit is all or nothing
    /// either way); nobody waits for it: a stopping server must not hang
    /// on a database that does not answer.
    fn drop(&mut self) {
        self.jobs = None;
    }
}
