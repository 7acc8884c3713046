//! A stream of saved messages for the crash tests: senders each with one
//! message in flight to a recipient who is offline, typing the next as soon
//! as the previous one is saved, and the check that every message reported
//! saved is shown to the recipient exactly once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Client, DEADLINE, MAIL, SAVED, TABLE, line_matches};

/// `>>> [Server not responding]`
pub const NOT_RESPONDING: &str = ">>> [Server not responding]";
/// `>>> [Exiting]`
pub const EXITING: &str = ">>> [Exiting]";
/// `>>> [Reconnected to server.]`
pub const RECONNECTED: &str = ">>> [Reconnected to server.]";

/// Mailbox quotas and a request ration for a stream's server, far above
/// what the senders can send, so that only the store answers, never a
/// quota (three senders on one address save faster than the default
/// ration's 1,000 a second on a quiet machine).
pub const SERVER_FLAGS: [&str; 6] = [
    "--mailbox-messages",
    "100000",
    "--mailbox-bytes",
    "67108864",
    "--requests-per-source",
    "1000000",
];

/// How long one look at a sender's output lasts while the senders are
/// served in turn.
const POLL: Duration = Duration::from_millis(1);

/// Where a sender's current message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Nothing in flight; the next message may be typed.
    Idle,
    /// `send R …` typed, nothing printed for it yet.
    Typed,
    /// `[R is offline, message sent to server.]` printed: the save-message
    /// request is with the server (or lost with it).
    Forwarded,
    /// `[Server not responding]` printed; `[Exiting]` must follow.
    GivingUp,
    /// `[Exiting]` printed; the process ends with status 1.
    Exited,
}

/// One sender of a save stream and what it was told about its messages.
pub struct Feed {
    pub client: Client,
    /// Who the messages are for (offline throughout).
    recipient: String,
    /// How many messages it sends at most.
    limit: usize,
    /// Index of the next message to type.
    next: usize,
    pub stage: Stage,
    /// Messages whose saved line was printed: always `0..confirmed`, since
    /// each is typed only after the previous one was saved.
    pub confirmed: usize,
}

impl Feed {
    /// `client`, about to send up to `limit` messages to `recipient`.
    pub fn new(client: Client, recipient: &str, limit: usize) -> Feed {
        Feed {
            client,
            recipient: recipient.to_owned(),
            limit,
            next: 0,
            stage: Stage::Idle,
            confirmed: 0,
        }
    }

    fn text(&self, i: usize) -> String {
        message_text(self.client.name(), i)
    }

    /// Types the next message if the sender is idle and has any left.
    pub fn feed(&mut self) {
        if self.stage == Stage::Idle && self.next < self.limit {
            let line = format!("send {} {}", self.recipient, self.text(self.next));
            self.client.send(&line);
            self.next += 1;
            self.stage = Stage::Typed;
        }
    }

    /// The message typed last whose outcome was not seen, if any.
    pub fn unconfirmed(&self) -> Option<usize> {
        (self.next > self.confirmed).then_some(self.confirmed)
    }

    /// Takes in one stdout line; anything the current stage does not allow
    /// fails the test with the transcript.
    pub fn take(&mut self, line: &str) {
        let forwarded = format!(
            ">>> [{} is offline, message sent to server.]",
            self.recipient
        );
        self.stage = match (self.stage, line) {
            // Table changes, and a move to another server of a cluster
            // (its message goes again there), come between outcomes.
            (stage, TABLE | RECONNECTED) => stage,
            (Stage::Typed, l) if l == forwarded => Stage::Forwarded,
            (Stage::Forwarded, SAVED) => {
                self.confirmed += 1;
                Stage::Idle
            }
            (Stage::Forwarded, NOT_RESPONDING) => Stage::GivingUp,
            (Stage::GivingUp, EXITING) => Stage::Exited,
            (stage, _) => self
                .client
                .fail(&format!("unexpected line {line:?} in stage {stage:?}")),
        };
    }

    /// Reads the rest of the output of a sender that has been killed.
    pub fn drain_after_kill(&mut self) {
        while let Some(line) = self.client.next_line(DEADLINE) {
            self.take(&line);
        }
        if !self.client.stdout_closed() {
            self.client
                .fail("stdout still open after SIGKILL and the deadline");
        }
    }

    /// Lets a sender whose server is gone end by itself: one with a request
    /// in flight retries, gives up and exits 1; an idle one exits 0 at end
    /// of input.
    pub fn wait_for_give_up(&mut self) {
        while matches!(
            self.stage,
            Stage::Typed | Stage::Forwarded | Stage::GivingUp
        ) {
            let Some(line) = self.client.next_line(DEADLINE) else {
                self.client.fail(&format!(
                    "no outcome within {DEADLINE:?} for the message in flight"
                ));
            };
            self.take(&line);
        }
        if self.stage == Stage::Exited {
            self.client.expect_exit(1);
        } else {
            // The ack got out before the crash: nothing is in flight.
            self.client.finish();
        }
    }
}

pub fn message_text(sender: &str, i: usize) -> String {
    format!("m-{sender}-{i}")
}

/// Parses `>>> <sender>: <ts> m-<sender>-<i>` into (sender, i).
pub fn parse_mail(line: &str) -> Option<(String, usize)> {
    let (sender, rest) = line.strip_prefix(">>> ")?.split_once(": ")?;
    // The timestamp is 19 bytes, then a space, then the text.
    let text = rest.get(20..)?;
    let index = text
        .strip_prefix(&format!("m-{sender}-"))?
        .parse::<usize>()
        .ok()?;
    line_matches(&format!(">>> {sender}: <ts> {text}"), line).ok()?;
    Some((sender.to_owned(), index))
}

/// Serves the senders until `until`, or until every one has sent all it
/// had.
pub fn run_until(feeds: &mut [Feed], until: Instant) {
    for feed in feeds.iter_mut() {
        feed.feed();
    }
    while Instant::now() < until {
        for feed in feeds.iter_mut() {
            if let Some(line) = feed.client.next_line(POLL) {
                feed.take(&line);
                feed.feed();
            }
        }
        if feeds
            .iter()
            .all(|f| f.stage == Stage::Idle && f.next >= f.limit)
        {
            return;
        }
    }
}

/// The recipient of `feeds` registers and reads its mailbox: every message
/// a sender was told is saved is shown exactly once, oldest first; the one
/// it had in flight when it stopped, at most once, after them.
pub fn check_delivered_once(r: &mut Client, feeds: &[Feed]) {
    let recipient = r.name().to_owned();
    r.send(&format!("reg {recipient}"));
    let mut shown: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut first = true;
    loop {
        let Some(line) = r.next_line(DEADLINE) else {
            r.fail(&format!("no {TABLE:?} within {DEADLINE:?} of reg"));
        };
        if line == TABLE {
            break;
        }
        if first && line == MAIL {
            first = false;
            continue;
        }
        if first {
            r.fail(&format!("{line:?} before {MAIL:?}"));
        }
        let Some((sender, index)) = parse_mail(&line) else {
            r.fail(&format!("{line:?} is not a stored message of this test"));
        };
        shown.entry(sender).or_default().push(index);
    }
    check_shown(r, feeds, shown);
}

/// [`check_delivered_once`] for a recipient homed on one of several
/// servers: what other servers saved in the last moments before its
/// registration (before its home read them from the store's feed) comes
/// just after the welcome's batch, live. Every confirmed message must come
/// within [`DEADLINE`]; then nothing more for a while (no second copy).
pub fn check_delivered_once_across_servers(r: &mut Client, feeds: &[Feed]) {
    let recipient = r.name().to_owned();
    r.send(&format!("reg {recipient}"));
    let mut shown: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let all_in = |shown: &BTreeMap<String, Vec<usize>>| {
        feeds.iter().all(|f| {
            let got = shown.get(f.client.name()).map_or(0, Vec::len);
            got >= f.confirmed
        })
    };
    let deadline = std::time::Instant::now() + DEADLINE;
    while !all_in(&shown) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Some(line) = r.next_line(left) else {
            r.fail(&format!(
                "not every saved message within {DEADLINE:?} of reg"
            ));
        };
        if line == TABLE || line == MAIL {
            continue;
        }
        let Some((sender, index)) = parse_mail(&line) else {
            r.fail(&format!("{line:?} is not a stored message of this test"));
        };
        shown.entry(sender).or_default().push(index);
    }
    // A duplicate, or the message in flight at the crash, would come now.
    while let Some(line) = r.next_line(super::QUIET) {
        if let Some((sender, index)) = parse_mail(&line) {
            shown.entry(sender).or_default().push(index);
        }
    }
    check_shown(r, feeds, shown);
}

/// Each sender's confirmed messages shown once, oldest first, with its
/// unconfirmed one at most once after them; nothing else.
fn check_shown(r: &mut Client, feeds: &[Feed], mut shown: BTreeMap<String, Vec<usize>>) {
    let recipient = r.name().to_owned();

    let counts: Vec<usize> = feeds.iter().map(|f| f.confirmed).collect();
    eprintln!("  confirmed saved per sender: {counts:?}, all shown once");
    for feed in feeds {
        let name = feed.client.name().to_owned();
        let got = shown.remove(&name).unwrap_or_default();
        // Confirmed messages, in the order they were stored.
        let saved: Vec<usize> = (0..feed.confirmed).collect();
        // The one in flight at the crash may have been committed with its ack
        // lost in the crash (commit, then kill, then no ack): then it is
        // shown, once, after the confirmed ones. It may equally be missing.
        let with_in_flight: Option<Vec<usize>> = feed
            .unconfirmed()
            .map(|i| saved.iter().copied().chain([i]).collect());
        assert!(
            got == saved || Some(&got) == with_in_flight.as_ref(),
            "{recipient} was shown {name}'s messages {got:?}; confirmed saved: 0..{} \
             (each exactly once, oldest first), unconfirmed in flight: {:?}\n{recipient}: {:#?}",
            feed.confirmed,
            feed.unconfirmed(),
            r.transcript(),
        );
    }
    assert!(
        shown.is_empty(),
        "{recipient} was shown messages from unknown senders: {shown:?}"
    );
}
