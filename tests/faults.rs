//! A store that fails its commits (a full disk, a database another process
//! locked), on the real state machines over the in-memory network: the
//! messages of a failed commit are refused to their senders, never acked and
//! never kept; everything else goes on and reaches the store once it can.

mod sim;

use std::time::Duration;

use sim::{Sim, name};
use udpchat::store::Store;
use udpchat::{ServerEvent, StoreFailure};

const SAVED: &str = ">>> [Messages received by the server and saved]";
const CHANNEL_ACK: &str = ">>> [Message received by Server.]";
const FULL: &str = ">>> [Error: the server's store is full; not saved.]";
const BUSY: &str = ">>> [Error: the server's store is busy (locked by another process); not saved — send it again.]";

/// Alice and Carol online, Bob registered and gone offline.
fn bob_away() -> Sim {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.join("Carol", 4000);
    s.command(1, "dereg Bob");
    s
}

#[test]
fn a_save_the_store_refuses_is_refused_and_not_kept() {
    let mut s = bob_away();
    s.store_fails = Some(StoreFailure::Full);
    let a = s.nodes[0].lines.len();
    s.command(0, "send Bob lost to a full disk");
    let said = s.lines_since(0, a);
    assert_eq!(said.last(), Some(&FULL), "{said:?}");
    assert!(!said.contains(&SAVED), "{said:?}");
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
    assert!(s.events.iter().any(|e| matches!(
        e,
        ServerEvent::NotSaved { from, channel: false, failure: StoreFailure::Full }
            if from.as_str() == "Alice"
    )));
    // Nothing said "stored" about it.
    assert!(
        !s.events
            .iter()
            .any(|e| matches!(e, ServerEvent::Stored { .. })),
        "{:?}",
        s.events
    );

    // The disk has room again: the next message is saved, and Bob gets
    // that one only.
    s.store_fails = None;
    let a = s.nodes[0].lines.len();
    s.command(0, "send Bob kept");
    assert_eq!(s.lines_since(0, a).last(), Some(&SAVED));
    assert_eq!(s.store.len(), 1);
    let b = s.nodes[1].lines.len();
    s.command(1, "reg Bob");
    let shown: Vec<&str> = s.lines_since(1, b);
    assert!(shown.iter().any(|l| l.ends_with(" kept")), "{shown:?}");
    assert!(!shown.iter().any(|l| l.contains("lost")), "{shown:?}");
    assert_eq!(s.store.len(), 0);
}

#[test]
fn a_channel_message_the_store_refuses_reaches_nobody() {
    let mut s = bob_away();
    s.store_fails = Some(StoreFailure::Busy);
    let (a, c) = (s.nodes[0].lines.len(), s.nodes[2].lines.len());
    s.command(0, "send_all not now");
    let said = s.lines_since(0, a);
    assert_eq!(said.last(), Some(&BUSY), "{said:?}");
    assert!(!said.contains(&CHANNEL_ACK), "{said:?}");
    // Carol, online, was not shown what its sender was told is not saved,
    // and no copy waits for anyone.
    assert_eq!(s.lines_since(2, c), Vec::<&str>::new());
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
    assert_eq!(s.server.mailbox(&name("Carol")).count(), 0);
    assert_eq!(s.server.stored_bytes(), 0);

    s.store_fails = None;
    let (a, c) = (s.nodes[0].lines.len(), s.nodes[2].lines.len());
    s.command(0, "send_all now");
    assert_eq!(s.lines_since(0, a), [CHANNEL_ACK]);
    assert_eq!(s.lines_since(2, c), [">>> [Channel_Message Alice: now]"]);
}

#[test]
fn a_retried_request_gets_the_same_refusal() {
    let mut s = bob_away();
    s.store_fails = Some(StoreFailure::Full);
    // The refusal is lost once: Alice's retry must not be stored now that
    // the disk has room, since the first answer already said "not saved"
    // for all the server knows.
    s.drop_rules.push(sim::drop_first(1, |p| {
        p.to == sim::addr(2000) && p.is(udpchat::wire::What::Refused)
    }));
    let a = s.nodes[0].lines.len();
    s.line(0, "send Bob twice?");
    assert!(s.run_until(Duration::from_secs(5), |s| {
        s.count(|p| p.to == s.server_addr && p.is(udpchat::wire::What::SaveMessage)) >= 2
    }));
    s.store_fails = None;
    s.settle();
    assert_eq!(s.lines_since(0, a).last(), Some(&FULL));
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
    assert_eq!(s.store.len(), 0);
}

#[test]
fn while_the_store_fails_everything_else_is_served_and_stored_later() {
    let mut s = bob_away();
    s.command(0, "send Bob waiting for you");
    assert_eq!(s.store.len(), 1);

    s.store_fails = Some(StoreFailure::Full);
    // A new client registers, Bob logs back and reads his mail, Alice and
    // Carol talk directly: none of it needs the store to answer.
    let dave = s.join("Dave", 5000);
    assert_eq!(
        s.lines(dave).first(),
        Some(&">>> [Welcome, You are registered.]")
    );
    let b = s.nodes[1].lines.len();
    s.command(1, "reg Bob");
    assert!(
        s.lines_since(1, b)
            .iter()
            .any(|l| l.ends_with(" waiting for you")),
        "{:?}",
        s.lines_since(1, b)
    );
    let c = s.nodes[2].lines.len();
    s.command(0, "send Carol hello");
    assert_eq!(s.lines_since(2, c), [">>> Alice: hello"]);
    // Bob's ack deleted the message in memory, not yet on disk, and Dave's
    // row is not on disk yet either.
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
    assert_eq!(s.store.len(), 1);
    let on_disk = |s: &mut Sim| {
        s.store
            .load()
            .unwrap()
            .clients
            .iter()
            .any(|c| c.name.as_str() == "Dave")
    };
    assert!(!on_disk(&mut s));

    // Room again: what was left over is committed by the retry, unasked.
    s.store_fails = None;
    s.run_for(Duration::from_secs(2));
    assert_eq!(s.store.len(), 0);
    assert!(on_disk(&mut s));
    // And Bob is not shown his message again.
    let b = s.nodes[1].lines.len();
    s.run_for(Duration::from_secs(5));
    assert_eq!(s.lines_since(1, b), Vec::<&str>::new());
}

/// Alice online and Bob gone offline, on a server that keeps mail 60 s.
fn ttl_of_a_minute() -> Sim {
    let mut s = Sim::with(|c| c.mail_ttl = Some(Duration::from_secs(60)));
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.command(1, "dereg Bob");
    s
}

#[test]
fn mail_undelivered_for_its_time_to_live_is_deleted_and_nothing_else() {
    let mut s = ttl_of_a_minute();
    s.command(0, "send Bob old");
    s.run_for(Duration::from_secs(30));
    s.command(0, "send Bob newer");
    assert_eq!(s.store.len(), 2);
    // 60 s after the first: it goes, the second stays.
    s.run_for(Duration::from_secs(31));
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 1);
    assert_eq!(s.store.len(), 1);
    assert!(s.events.iter().any(|e| matches!(
        e,
        ServerEvent::Expired { to, from, .. } if to.as_str() == "Bob" && from.as_str() == "Alice"
    )));
    let b = s.nodes[1].lines.len();
    s.command(1, "reg Bob");
    let shown = s.lines_since(1, b);
    assert!(shown.iter().any(|l| l.ends_with(" newer")), "{shown:?}");
    assert!(!shown.iter().any(|l| l.ends_with(" old")), "{shown:?}");
    // A server started two minutes later drops what expired meanwhile,
    // from memory and from the store.
    s.command(1, "dereg Bob");
    s.command(0, "send Bob while down");
    let loaded = s.store.load().unwrap();
    assert_eq!(loaded.mail.len(), 1);
    let unix = sim::EPOCH_UNIX + (s.now - s.start).as_secs() as i64 + 120;
    let mut config = udpchat::ServerConfig::new([3; 32], sim::server_key(), (s.now, unix));
    config.mail_ttl = Some(Duration::from_secs(60));
    let mut server = udpchat::Server::new(config, s.now, loaded);
    assert_eq!(server.mailbox(&name("Bob")).count(), 0);
    assert!(matches!(
        server.poll_store(),
        Some(udpchat::store::StoreOp::Delete { .. })
    ));
}

/// Bob logs back in while a message for him waits in a batch that then
/// fails: the welcome counted only what was committed, so his mail batch
/// neither waits for the message taken back nor stalls.
#[test]
fn a_welcome_counts_no_message_a_failed_commit_takes_back() {
    let mut s = bob_away();
    s.command(0, "send Bob committed");
    // Bob's handshake reaches its last step; Alice's message gets to the
    // server just before his Finish (which carries the registration), and
    // both are handled before the commit, as in one read burst.
    let bob_addr = sim::addr(3000);
    let response = move |p: &sim::Packet| p.to == bob_addr && p.is(udpchat::wire::What::Response);
    let before = s.count(response);
    let b = s.nodes[1].lines.len();
    s.line(1, "reg Bob");
    assert!(s.run_until(Duration::from_secs(5), |s| s.count(response) > before));
    s.run_for(sim::LATENCY / 2);
    s.hold = true;
    let a = s.nodes[0].lines.len();
    s.line(0, "send Bob taken back");
    let bob = name("Bob");
    let online = |s: &Sim| {
        s.server
            .table()
            .lookup(&bob)
            .is_some_and(|id| s.server.table().get(id).online)
    };
    assert!(s.run_until(Duration::from_secs(5), |s| online(s)));
    assert_eq!(s.server.mailbox(&bob).count(), 2);
    s.release(Some(StoreFailure::Full));
    let t0 = s.now;
    s.settle();
    let said = s.lines_since(0, a);
    assert!(said.contains(&FULL), "{said:?}");
    let shown = s.lines_since(1, b);
    assert!(shown.iter().any(|l| l.ends_with(" committed")), "{shown:?}");
    assert!(!shown.iter().any(|l| l.contains("taken back")), "{shown:?}");
    assert_eq!(shown.last(), Some(&">>> [Client table updated.]"));
    // Done at once, not after the 5 s a stalled batch waits.
    assert!(s.now - t0 < Duration::from_secs(2), "{:?}", s.now - t0);
    assert!(s.nodes[1].client.is_online());
}

/// Mail whose time runs out while its recipient is logging back in and
/// reading it is not taken out of the batch under way.
#[test]
fn mail_being_delivered_does_not_expire_under_its_reader() {
    let mut s = ttl_of_a_minute();
    s.command(0, "send Bob first");
    s.command(0, "send Bob second");
    s.run_for(Duration::from_millis(59_800));
    // Bob's acks are lost for a while, so both stay in flight past 60 s.
    let bob_addr = sim::addr(3000);
    s.drop_rules.push(sim::drop_first(4, move |p| {
        p.from == bob_addr && p.is(udpchat::wire::What::Delivered)
    }));
    let b = s.nodes[1].lines.len();
    s.command(1, "reg Bob");
    let shown = s.lines_since(1, b);
    assert_eq!(
        shown
            .iter()
            .filter(|l| l.ends_with(" first") || l.ends_with(" second"))
            .count(),
        2,
        "{shown:?}"
    );
    assert!(s.now - s.start > Duration::from_secs(60));
    assert!(s.nodes[1].client.is_online());
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
    assert!(
        !s.events
            .iter()
            .any(|e| matches!(e, ServerEvent::Expired { .. }))
    );
}

/// A store edited by hand with a time stamp far in the future: the server
/// starts, and keeps the message.
#[test]
fn a_stored_time_far_in_the_future_does_not_stop_the_server() {
    let mut s = bob_away();
    s.command(0, "send Bob from the future");
    let mut loaded = s.store.load().unwrap();
    for stamp in [i64::MAX, i64::MAX - 1_000, i64::MIN] {
        loaded.mail[0].stored_at = stamp;
        let config =
            udpchat::ServerConfig::new([4; 32], sim::server_key(), (s.now, sim::EPOCH_UNIX));
        let server = udpchat::Server::new(config, s.now, loaded.clone());
        let kept = server.mailbox(&name("Bob")).count();
        // Far future: kept; far past: long expired.
        assert_eq!(kept, usize::from(stamp > 0), "{stamp}");
    }
}

/// With a store thread, one batch is under commit while the next gathers:
/// its commit releases only what was said before it was sealed; what came
/// after waits for its own batch, and a failure of that one takes back
/// only its own messages.
#[test]
fn a_batch_under_commit_releases_its_own_replies_and_the_next_waits_for_its_commit() {
    let mut s = bob_away();
    s.join("Dave", 5000);
    s.command(2, "dereg Carol");
    s.hold = true;
    let (a, d) = (s.nodes[0].lines.len(), s.nodes[3].lines.len());
    s.line(0, "send Bob first batch");
    let bob = name("Bob");
    assert!(
        s.run_until(Duration::from_secs(5), |s| s.server.mailbox(&bob).count()
            == 1)
    );
    s.seal();
    s.line(3, "send Carol second batch");
    let carol = name("Carol");
    assert!(
        s.run_until(Duration::from_secs(5), |s| s.server.mailbox(&carol).count()
            == 1)
    );
    // Both under way: nobody has heard "saved".
    assert!(!s.lines_since(0, a).contains(&SAVED));
    assert!(!s.lines_since(3, d).contains(&SAVED));

    s.commit_sealed(None);
    assert!(s.run_until(Duration::from_secs(1), |s| {
        s.lines_since(0, a).contains(&SAVED)
    }));
    assert!(
        !s.lines_since(3, d).contains(&SAVED),
        "{:?}",
        s.lines_since(3, d)
    );

    // The second batch is sealed in turn, and its commit fails.
    s.seal();
    s.commit_sealed(Some(StoreFailure::Full));
    s.hold = false;
    s.settle();
    let said = s.lines_since(3, d);
    assert_eq!(said.last(), Some(&FULL), "{said:?}");
    assert!(!said.contains(&SAVED), "{said:?}");
    assert_eq!(s.server.mailbox(&carol).count(), 0);
    assert_eq!(s.server.mailbox(&bob).count(), 1);
    assert_eq!(s.store.len(), 1);
    let b = s.nodes[1].lines.len();
    s.command(1, "reg Bob");
    let shown = s.lines_since(1, b);
    assert!(
        shown.iter().any(|l| l.ends_with(" first batch")),
        "{shown:?}"
    );
}

/// A retry answered "saved" while its batch commits is that batch's
/// promise, whichever batch it was filed with: once the batch is
/// committed it is kept, and a later failed commit leaves it alone.
#[test]
fn a_retry_answered_while_its_batch_commits_is_settled_by_that_commit() {
    let mut s = bob_away();
    s.hold = true;
    let a = s.nodes[0].lines.len();
    s.line(0, "send Bob first");
    let bob = name("Bob");
    assert!(
        s.run_until(Duration::from_secs(5), |s| s.server.mailbox(&bob).count()
            == 1)
    );
    s.seal();
    // The commit is slow: Alice's client retries its request meanwhile.
    s.run_for(Duration::from_millis(1200));
    s.commit_sealed(None);
    assert!(s.run_until(Duration::from_secs(1), |s| {
        s.lines_since(0, a).contains(&SAVED)
    }));
    // A later batch fails: only its own message is refused.
    let c = s.nodes[2].lines.len();
    s.line(2, "send Bob second");
    assert!(
        s.run_until(Duration::from_secs(5), |s| s.server.mailbox(&bob).count()
            == 2)
    );
    s.seal();
    s.commit_sealed(Some(StoreFailure::Full));
    s.hold = false;
    s.settle();
    assert_eq!(s.lines_since(2, c).last(), Some(&FULL));
    let said = s.lines_since(0, a);
    assert!(!said.contains(&FULL), "{said:?}");
    assert_eq!(said.iter().filter(|l| **l == SAVED).count(), 1, "{said:?}");
    assert_eq!(s.store.len(), 1);
}

/// A relayed message whose recipient does not ack in time is answered
/// "saved" by the relay's timer; when that happens while its batch is
/// still committing, the answer rests on that batch, not on the next one:
/// the next one failing does not refuse a message that was kept.
#[test]
fn a_relay_saved_while_its_batch_commits_is_not_refused_by_the_next_batch() {
    let mut s = Sim::new();
    s.join_behind("Alice", 2000, sim::nat::NatKind::Symmetric);
    s.join_behind("Bob", 3000, sim::nat::NatKind::Symmetric);
    s.settle();
    s.join("Carol", 4000);
    s.command(2, "dereg Carol");
    s.join("Dave", 5000);
    let bob_at = s.seen_at(1);
    // The relay never reaches Bob in time: its timer answers "saved".
    s.drop_rules.push(sim::drop_all(move |p| {
        p.to == bob_at && p.is(udpchat::wire::What::Relayed)
    }));
    let (a, b) = (s.nodes[0].lines.len(), s.nodes[1].lines.len());
    s.hold = true;
    s.line(0, "send Bob relayed");
    let bob = name("Bob");
    // Earlier batches (the direct attempt's) go through until the relay
    // is stored.
    let mut turns = 0;
    while s.server.mailbox(&bob).count() == 0 {
        s.seal();
        s.commit_sealed(None);
        s.run_for(Duration::from_millis(2));
        turns += 1;
        assert!(turns < 5000, "the relay was never stored");
    }
    s.seal();
    // A slow commit, longer than the relay's wait.
    s.run_for(Duration::from_millis(1100));
    s.line(3, "send Carol other");
    let carol = name("Carol");
    assert!(
        s.run_until(Duration::from_secs(5), |s| s.server.mailbox(&carol).count()
            == 1)
    );
    s.commit_sealed(None);
    s.seal();
    s.commit_sealed(Some(StoreFailure::Full));
    s.hold = false;
    s.drop_rules.clear();
    s.run_for(Duration::from_secs(40));
    let said = s.lines_since(0, a);
    assert!(!said.contains(&FULL), "{said:?}");
    assert!(
        !s.events.iter().any(|e| matches!(
            e,
            ServerEvent::NotSaved { from, .. } if from.as_str() == "Alice"
        )),
        "{:?}",
        s.events
    );
    let shown = s.lines_since(1, b);
    assert_eq!(
        shown.iter().filter(|l| l.ends_with(" relayed")).count(),
        1,
        "{shown:?}"
    );
}
