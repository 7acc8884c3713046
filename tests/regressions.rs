//! Bugs found in review, each pinned by the scenario that exposed it, and
//! the presence (heartbeat) behaviour that fixed several of them.

mod sim;

use std::time::Duration;

use sim::{EPOCH_UNIX, Sim, addr, drop_all, drop_first, name};
use udpchat::store::{MAIL_OVERHEAD, Store};
use udpchat::wire::What;
use udpchat::{Server, ServerConfig};

const SAVED: &str = ">>> [Messages received by the server and saved]";
const UPDATED: &str = ">>> [Client table updated.]";

fn three() -> Sim {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.join("Carol", 4000);
    s
}

/// 65 senders fall back for one silent recipient at once: more than a probe
/// takes waiters. Every sender still gets exactly one outcome — saved, or
/// told the server was busy — and nobody exits.
#[test]
fn more_waiters_than_a_probe_takes_all_get_an_answer() {
    // 66 names from one address: past the default ration of new names.
    let mut s = Sim::with(|c| c.new_names.0 = 100);
    s.join("Bob", 3000);
    for i in 0..65u16 {
        s.join(&format!("s{i:02}"), 4000 + i);
    }
    s.crash(0);
    for i in 1..=65 {
        s.line(i, "send Bob hi");
    }
    s.settle();
    let busy = ">>> [Error: the server is busy; the message to Bob was not saved — send it again.]";
    let mut saved = 0;
    for i in 1..=65 {
        assert_eq!(s.nodes[i].exit, None, "sender {i}: {:?}", s.lines(i));
        let outcomes: Vec<_> = s
            .lines(i)
            .into_iter()
            .filter(|l| *l == SAVED || *l == busy)
            .collect();
        assert_eq!(outcomes.len(), 1, "sender {i}: {:?}", s.lines(i));
        saved += usize::from(outcomes[0] == SAVED);
    }
    assert_eq!(s.server.mailbox(&name("Bob")).count(), saved);
    assert!(saved >= 64, "only the overflow is refused");
}

/// A new client on a silent client's old port must not show or ack
/// messages meant for the old one.
#[test]
fn a_chat_for_someone_else_at_a_reused_port_is_not_taken() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.crash(1);
    let c = s.join("Carol", 3000);
    let (a, cl) = (s.nodes[0].lines.len(), s.nodes[c].lines.len());
    s.command(0, "send Bob for Bob only");
    assert_eq!(
        s.lines_since(c, cl),
        [UPDATED],
        "Carol only sees Bob go offline"
    );
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [No ACK from Bob, message sent to server.]",
            UPDATED,
            SAVED
        ]
    );
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 1);
}

/// The server's probe of a live client is lost, so it is marked offline and
/// its message saved. Its next heartbeat is answered "unknown session": it
/// registers again by itself and gets the message.
#[test]
fn a_live_client_taken_for_gone_reconnects_on_its_heartbeat_and_gets_its_mail() {
    let mut s = three();
    // Every copy of the message's first try (see the exists flow test).
    s.drop_rules
        .push(drop_first(3, |p| p.to == addr(3000) && p.is(What::Chat)));
    s.drop_rules
        .push(drop_first(2, |p| p.to == addr(3000) && p.is(What::Probe)));
    let b = s.nodes[1].lines.len();
    s.command(0, "send Bob hello");
    assert_eq!(s.lines(0).last(), Some(&SAVED));
    s.run_until(Duration::from_secs(15), |s| s.nodes[1].lines.len() >= b + 4);
    let got = s.lines_since(1, b);
    assert_eq!(got[0], ">>> [Reconnected to server.]");
    assert_eq!(got[1], ">>> [You Have Messages]");
    assert!(
        got[2].starts_with(">>> Alice: T+") && got[2].ends_with(" hello"),
        "{got:?}"
    );
    assert_eq!(got[3], UPDATED);
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

/// A silent leave is noticed by missed heartbeats alone.
#[test]
fn three_missed_heartbeats_mark_a_client_offline() {
    let mut s = three();
    s.crash(1);
    let a = s.nodes[0].lines.len();
    s.run_for(Duration::from_secs(25));
    assert!(
        s.lines_since(0, a).is_empty(),
        "not before three heartbeats are missed"
    );
    s.run_for(Duration::from_secs(10));
    assert_eq!(s.lines_since(0, a), [UPDATED]);
    assert!(!s.nodes[0].client.table().get(&name("Bob")).unwrap().online);
    // Heartbeats went out every 10 s from the live clients.
    let beats = s.count(|p| p.from == addr(2000) && p.is(What::Heartbeat));
    assert_eq!(beats, 3);
}

/// A lost delta is noticed on the next heartbeat, whose answer carries the
/// server's table version.
#[test]
fn a_lost_delta_is_repaired_by_the_heartbeat() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.drop_rules
        .push(drop_all(|p| p.to == addr(2000) && p.is(What::Delta)));
    s.join("Bob", 3000);
    assert!(s.nodes[0].client.table().get(&name("Bob")).is_none());
    s.run_for(Duration::from_secs(11));
    assert!(s.nodes[0].client.table().get(&name("Bob")).is_some());
    assert_eq!(
        s.nodes[0].client.table().version(),
        s.server.table().version()
    );
    assert_eq!(s.lines(0).last(), Some(&UPDATED));
}

/// The store as a whole cannot take the channel message: refused, clearly,
/// and nothing stored; never "received" with copies silently missing.
#[test]
fn a_channel_message_the_store_cannot_hold_is_refused() {
    let mut s = Sim::with(|c| c.store_bytes = 200);
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.join("Carol", 4000);
    s.command(1, "dereg Bob");
    let a = s.nodes[0].lines.len();
    s.command(0, "send_all to everyone");
    assert_eq!(
        s.lines_since(0, a),
        [">>> [Error: the server's store is full; not saved.]"]
    );
    assert_eq!(s.server.stored_bytes(), 0);
    assert!(!s.lines(2).iter().any(|l| l.contains("to everyone")));
}

/// A channel message is stored once: its body counts against the store one
/// time however many are owed it, and it is gone when the last one has it.
/// (Stored per recipient, twenty copies would not fit this store.)
#[test]
fn a_channel_message_is_stored_once_for_all_its_recipients() {
    let text = "x".repeat(900);
    let room = 2 * 1000 + 20 * MAIL_OVERHEAD;
    let mut s = Sim::with(|c| {
        c.store_bytes = room;
        c.new_names.0 = 100;
    });
    s.join("Alice", 2000);
    for i in 0..20u16 {
        let n = s.join(&format!("r{i:02}"), 3000 + i);
        s.command(n, &format!("dereg r{i:02}"));
    }
    let a = s.nodes[0].lines.len();
    s.command(0, &format!("send_all {text}"));
    assert_eq!(s.lines_since(0, a), [">>> [Message received by Server.]"]);
    let held = s.server.stored_bytes();
    assert!(
        held > 20 * MAIL_OVERHEAD + 900 && held < 20 * MAIL_OVERHEAD + 1000,
        "{held}"
    );
    assert_eq!(s.store.load().unwrap().mail.len(), 20);
    for i in 0..20u16 {
        s.command(1 + usize::from(i), &format!("reg r{i:02}"));
        s.settle();
        let shown = s
            .lines(1 + usize::from(i))
            .iter()
            .filter(|l| l.contains(&text))
            .count();
        assert_eq!(shown, 1, "r{i:02}");
        if i < 19 {
            // The body stays while anyone is still owed it.
            assert!(s.server.stored_bytes() > 900, "after r{i:02}");
        }
    }
    assert_eq!(s.server.stored_bytes(), 0);
    assert!(s.store.load().unwrap().mail.is_empty());
}

/// Alice, Bob and Carol on a server whose mailboxes take one message.
fn three_with_mailboxes_of_one() -> Sim {
    let mut s = Sim::with(|c| c.mailbox_messages = 1);
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.join("Carol", 4000);
    s
}

/// One recipient's full mailbox does not hold up the channel: the others
/// get the message, that one misses it, nothing already kept is lost.
#[test]
fn a_full_mailbox_misses_channel_messages_without_blocking_the_channel() {
    let mut s = three_with_mailboxes_of_one();
    s.command(1, "dereg Bob");
    s.command(2, "send Bob first");
    let a = s.nodes[0].lines.len();
    s.command(0, "send_all to everyone");
    assert_eq!(s.lines_since(0, a), [">>> [Message received by Server.]"]);
    assert_eq!(
        s.lines(2).last(),
        Some(&">>> [Channel_Message Alice: to everyone]")
    );
    let bob: Vec<_> = s.mailbox("Bob").into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(bob, ["first"]);
    // And a direct message to the full mailbox says so.
    s.command(0, "send Bob second");
    assert_eq!(
        s.lines(0).last(),
        Some(&">>> [Error: mailbox of Bob is full, message not saved.]")
    );
}

/// Every mailbox a channel message is for is full: it is kept for nobody,
/// and its sender is told so rather than "received".
#[test]
fn a_channel_message_every_mailbox_refuses_is_not_acked() {
    let mut s = three_with_mailboxes_of_one();
    s.command(1, "dereg Bob");
    s.command(2, "dereg Carol");
    s.command(0, "send Bob first");
    s.command(0, "send Carol first");
    let a = s.nodes[0].lines.len();
    s.command(0, "send_all to everyone");
    assert_eq!(
        s.lines_since(0, a),
        [">>> [Error: the server's store is full; not saved.]"]
    );
    for n in ["Bob", "Carol"] {
        let kept: Vec<_> = s.mailbox(n).into_iter().map(|(_, _, t)| t).collect();
        assert_eq!(kept, ["first"], "{n}");
    }
}

/// After a server restart, dereg is answered "unknown session": the client
/// is offline already, which is what it asked for.
#[test]
fn dereg_after_a_server_restart_is_a_clean_leave() {
    let mut s = three();
    let mail = s.store.load().unwrap();
    s.server = Server::new(
        ServerConfig::new([2; 32], sim::server_key(), (s.start, EPOCH_UNIX)),
        s.now,
        mail,
    );
    let a = s.nodes[0].lines.len();
    s.command(0, "dereg Alice");
    assert_eq!(s.lines_since(0, a), [">>> [You are Offline. Bye.]"]);
    assert_eq!(s.nodes[0].exit, None);
}

/// A registration taking over a name and a save-message for it wait on the
/// same probe: the message is stored first and reaches the newcomer.
#[test]
fn a_message_saved_during_a_takeover_reaches_the_new_holder() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.crash(1);
    s.line(0, "send Bob hello");
    s.run_for(Duration::from_millis(100));
    let nb = s.spawn("Bob", 3500);
    s.settle();
    assert!(s.lines(0).contains(&SAVED), "{:?}", s.lines(0));
    assert!(
        s.lines(nb).iter().any(|l| l.ends_with(" hello")),
        "{:?}",
        s.lines(nb)
    );
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

/// A save-message is stored but its ack is lost; the user deregisters; the
/// retry still carries the old session and gets the cached answer.
#[test]
fn a_retry_after_dereg_still_learns_the_message_was_saved() {
    let mut s = three();
    s.command(1, "dereg Bob");
    s.drop_rules
        .push(drop_first(1, |p| p.to == addr(2000) && p.is(What::Ack)));
    let a = s.nodes[0].lines.len();
    s.line(0, "send Bob x");
    s.run_for(Duration::from_millis(50));
    s.line(0, "dereg Alice");
    s.settle();
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 1);
    let lines = s.lines_since(0, a);
    assert_eq!(
        lines.iter().filter(|l| **l == SAVED).count(),
        1,
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("Error")), "{lines:?}");
}

/// A save-message that reaches a restarted server (which answers "unknown
/// session") is not bounced to the user: the client registers again and the
/// message goes once more under the new session, stored once.
#[test]
fn a_save_after_a_server_restart_reconnects_and_is_saved() {
    let mut s = three();
    s.command(1, "dereg Bob");
    let loaded = s.store.load().unwrap();
    s.server = Server::new(
        ServerConfig::new([2; 32], sim::server_key(), (s.start, EPOCH_UNIX)),
        s.now,
        loaded,
    );
    let a = s.nodes[0].lines.len();
    s.command(0, "send Bob after the restart");
    let lines = s.lines_since(0, a);
    assert_eq!(lines[0], ">>> [Bob is offline, message sent to server.]");
    assert_eq!(lines[1], ">>> [Reconnected to server.]");
    assert!(lines.contains(&SAVED), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("Error")), "{lines:?}");
    let bob: Vec<_> = s.mailbox("Bob").into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(bob, ["after the restart"]);
}

/// The server acked a channel message, Bob acked his copy, Carol's copy was
/// still in flight when the server crashed: after the restart Carol gets it
/// (from her mailbox, once she has reconnected by herself) and Bob does not
/// get it again.
#[test]
fn a_channel_message_survives_a_crash_mid_fan_out() {
    let mut s = three();
    s.drop_rules
        .push(drop_all(|p| p.to == addr(4000) && p.is(What::Deliver)));
    let (a, b, c) = (
        s.nodes[0].lines.len(),
        s.nodes[1].lines.len(),
        s.nodes[2].lines.len(),
    );
    s.line(0, "send_all to everyone");
    s.run_until(Duration::from_secs(5), |s| s.nodes[0].lines.len() > a);
    assert_eq!(s.lines_since(0, a), [">>> [Message received by Server.]"]);
    s.run_for(Duration::from_millis(100));
    assert_eq!(
        s.lines_since(1, b),
        [">>> [Channel_Message Alice: to everyone]"]
    );
    // Crash: the server comes back from what was committed.
    s.drop_rules.clear();
    let loaded = s.store.load().unwrap();
    assert_eq!(loaded.mail.len(), 1, "only Carol's copy is left");
    s.server = Server::new(
        ServerConfig::new([2; 32], sim::server_key(), (s.start, EPOCH_UNIX)),
        s.now,
        loaded,
    );
    s.run_until(Duration::from_secs(15), |s| s.lines(2).len() >= c + 4);
    let carol = s.lines_since(2, c);
    assert_eq!(
        carol[..2],
        [">>> [Reconnected to server.]", ">>> [You Have Messages]"]
    );
    assert!(
        carol[2].starts_with(">>> Channel_Message Alice: T+") && carol[2].ends_with(" to everyone")
    );
    s.settle();
    let bob_again = s
        .lines_since(1, b)
        .iter()
        .filter(|l| l.contains("to everyone"))
        .count();
    assert_eq!(bob_again, 1);
    assert_eq!(s.server.mailbox(&name("Carol")).count(), 0);
}

/// A server that restarts between its cookie and the client's answer has a
/// new cookie secret: the client takes the new cookie instead of sending
/// the stale one until it gives up.
#[test]
fn a_cookie_from_before_a_server_restart_is_replaced() {
    let mut s = Sim::new();
    // Alice's first datagram is answered with a retry; her answer to it is
    // lost, and the server restarts meanwhile.
    s.drop_rules.push(drop_first(1, |p| {
        p.from == addr(2000) && p.is(What::Initial) && p.payload.len() > 40
    }));
    let alice = s.spawn("Alice", 2000);
    s.run_for(Duration::from_millis(100));
    let config = ServerConfig::new([9; 32], sim::server_key(), (s.start, EPOCH_UNIX));
    let loaded = s.store.load().unwrap();
    s.server = Server::new(config, s.now, loaded);
    s.run_until(Duration::from_secs(10), |s| s.nodes[alice].lines.len() >= 2);
    assert_eq!(
        s.lines(alice),
        [">>> [Welcome, You are registered.]", UPDATED]
    );
}

/// A registry loaded with more names than a lowered `max_clients` keeps
/// every one of them (they log back in); only new names are refused.
#[test]
fn a_lowered_client_limit_keeps_every_known_name() {
    let mut s = three();
    for i in 0..3 {
        s.crash(i);
    }
    let mut c = ServerConfig::new([2; 32], sim::server_key(), (s.now, EPOCH_UNIX));
    c.max_clients = 1;
    s.server = Server::new(c, s.now, s.store.load().unwrap());
    assert_eq!(s.server.table().len(), 3);
    let carol = s.join("Carol", 4100);
    assert_eq!(
        s.lines(carol).first(),
        Some(&">>> [Welcome, You are registered.]")
    );
    let dave = s.join("Dave", 5000);
    assert_eq!(
        s.lines(dave),
        [">>> [Error: the server is full; try again later.]"]
    );
    assert_eq!(s.nodes[dave].exit, Some(1));
    assert_eq!(s.server.table().len(), 3);
}

/// A save the server committed but whose "saved" was lost, retried to the
/// restarted server (which has no reply cache any more), is stored once:
/// the mailbox's duplicate check on (sender, id) is what catches it.
#[test]
fn a_committed_save_retried_after_a_restart_is_stored_once() {
    let mut s = three();
    s.command(1, "dereg Bob");
    s.drop_rules.push(drop_all(|p| p.to == addr(2000)));
    let a = s.nodes[0].lines.len();
    s.line(0, "send Bob only once please");
    assert!(s.run_until(Duration::from_secs(2), |s| s.store.len() == 1));
    let loaded = s.store.load().unwrap();
    s.server = Server::new(
        ServerConfig::new([2; 32], sim::server_key(), (s.start, EPOCH_UNIX)),
        s.now,
        loaded,
    );
    s.drop_rules.clear();
    assert!(s.run_until(Duration::from_secs(20), |s| {
        s.lines_since(0, a).contains(&SAVED)
    }));
    s.settle();
    assert_eq!(s.store.len(), 1);
    let bob: Vec<_> = s.mailbox("Bob").into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(bob, ["only once please"]);
}
