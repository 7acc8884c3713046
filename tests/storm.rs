//! A server under a join storm, on the real state machines over the
//! in-memory network: a server that is behind answers new handshakes
//! "busy" and its joiners wait instead of giving up; joiners pull the table
//! in windows of pages; a joiner that is still pulling is sent no deltas.

mod sim;

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use udpchat::packet::Packet as Wire;
use udpchat::wire::{SYNC_WINDOW, What};

use sim::{Sim, addr, drop_all, name};

const WELCOME: &str = ">>> [Welcome, You are registered.]";
const UPDATED: &str = ">>> [Client table updated.]";
const GONE: [&str; 2] = [">>> [Server not responding]", ">>> [Exiting]"];

#[test]
fn a_server_behind_says_busy_and_its_joiner_waits_without_spending_its_tries() {
    let mut s = Sim::new();
    s.server.set_queue_delay(Duration::from_secs(1));
    let i = s.spawn("Alice", 2000);
    // Twice the five silent tries (2.5 s) that would end the registration.
    s.run_for(Duration::from_secs(5));
    let busy = s.count(|p| p.is(What::Busy));
    assert!(busy >= 2, "{busy} busy answers");
    assert_eq!(s.count(|p| p.is(What::Response)), 0, "no key exchange yet");
    assert_eq!(s.nodes[i].exit, None, "{:?}", s.lines(i));
    assert!(s.lines(i).is_empty(), "{:?}", s.lines(i));
    // Each busy answer is smaller than the message 1 it answers.
    let largest = |w: What| {
        let sizes = s.log.iter().filter(|p| p.is(w)).map(|p| p.payload.len());
        sizes.max()
    };
    let (busy, initial) = (largest(What::Busy), largest(What::Initial));
    assert!(busy.is_some() && busy < initial, "{busy:?} vs {initial:?}");

    // Caught up: the next try gets the handshake.
    s.server.set_queue_delay(Duration::ZERO);
    let done = s.run_until(Duration::from_secs(30), |s| s.lines(i).len() >= 2);
    assert!(done, "{:?}", s.lines(i));
    assert_eq!(s.lines(i), [WELCOME, UPDATED]);
}

#[test]
fn busy_answers_are_believed_only_so_long() {
    let mut s = Sim::new();
    s.server.set_queue_delay(Duration::from_secs(3));
    let t0 = s.now;
    let i = s.spawn("Alice", 2000);
    let done = s.run_until(Duration::from_secs(600), |s| s.nodes[i].exit.is_some());
    assert!(done, "the client waits for ever");
    assert_eq!(s.lines(i), GONE);
    assert_eq!(s.nodes[i].exit, Some(1));
    let took = s.now - t0;
    assert!(
        took >= Duration::from_secs(60) && took <= Duration::from_secs(90),
        "{took:?}"
    );
}

/// Alice's registration with message 2 never arriving: when she gives up,
/// with `forge` run every 100 ms meanwhile.
fn give_up_time(mut forge: impl FnMut(&mut Sim)) -> Duration {
    let mut s = Sim::new();
    // The cookie round trip works; message 2 never comes.
    s.drop_rules.push(drop_all(|p| p.is(What::Response)));
    let t0 = s.now;
    let i = s.spawn("Alice", 2000);
    while s.nodes[i].exit.is_none() && s.now - t0 < Duration::from_secs(30) {
        forge(&mut s);
        s.run_for(Duration::from_millis(100));
    }
    assert_eq!(s.lines(i), GONE);
    s.now - t0
}

#[test]
fn a_busy_answer_for_another_handshake_changes_nothing() {
    let honest = give_up_time(|_| {});
    // An off-path attacker, who does not know the client's index, answers
    // "busy" for it over and over.
    let mut guess = 1u64;
    let attacked = give_up_time(|s| {
        let forged = Wire::Busy {
            receiver: guess,
            wait_ms: 10_000,
        };
        guess = guess
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let server = s.server_addr;
        s.inject(server, addr(2000), forged.to_vec());
    });
    assert!(honest >= Duration::from_millis(2500), "{honest:?}");
    assert_eq!(attacked, honest);
}

/// Rows of the simulated clients' size ("c123", one address) one page
/// holds.
fn per_page() -> usize {
    let s = crowd(2);
    let row = s.server.table().iter().next().unwrap().1.clone();
    udpchat::wire::rows_that_fit(std::iter::repeat_n(&row, 1000))
}

/// A server with `n` clients online, all settled.
fn crowd(n: usize) -> Sim {
    // All simulated clients share one host: lift its ration of new names.
    let mut s = Sim::with(|c| c.new_names.0 = 1000);
    for k in 0..n {
        s.join(&format!("c{k}"), 3000 + k as u16);
    }
    s.settle();
    s
}

#[test]
fn a_joiner_pulls_the_table_in_windows_of_pages() {
    // Enough rows for two windows.
    let rows = per_page() * SYNC_WINDOW + 5;
    let mut s = crowd(rows - 1);
    let first_sync = s.log.len();
    let i = s.join("Zed", 2000);
    assert_eq!(s.lines(i), [WELCOME, UPDATED]);
    assert_eq!(s.nodes[i].client.table().len(), rows);
    let ours = |p: &sim::Packet| p.from == addr(2000) && p.is(What::Sync);
    let syncs = s.log[first_sync..].iter().filter(|p| ours(p)).count();
    assert_eq!(syncs, 2, "one Sync per window of {SYNC_WINDOW} pages");
    let pages = s.log[first_sync..]
        .iter()
        .filter(|p| p.to == addr(2000) && p.is(What::Page))
        .count();
    assert_eq!(pages, SYNC_WINDOW + 1);
}

#[test]
fn a_page_lost_inside_a_window_is_asked_for_again_and_nothing_is_skipped() {
    let rows = per_page() * 3 + 2;
    let mut s = crowd(rows - 1);
    // The second page to Zed is lost; the third arrives and must not be
    // taken for it.
    let seen = Rc::new(Cell::new(0));
    let counter = Rc::clone(&seen);
    s.drop_rules.push(Box::new(move |p| {
        if p.to == addr(2000) && p.is(What::Page) {
            counter.set(counter.get() + 1);
            counter.get() == 2
        } else {
            false
        }
    }));
    let i = s.join("Zed", 2000);
    assert!(seen.get() >= 5, "the window was sent again: {}", seen.get());
    assert_eq!(s.lines(i), [WELCOME, UPDATED]);
    let table = s.nodes[i].client.table();
    assert_eq!(table.len(), rows);
    for k in 0..rows - 1 {
        assert!(table.get(&name(&format!("c{k}"))).is_some(), "c{k} missing");
    }
}

#[test]
fn changes_go_out_coalesced_and_not_to_a_joiner_still_pulling_the_table() {
    // A table of two windows.
    let crowd_size = per_page() * SYNC_WINDOW;
    let mut s = crowd(crowd_size);
    let before = s.log.len();
    // Three joins in the same instant: one delta datagram to each settled
    // client, not one per join.
    let joiners: Vec<usize> = ["x", "y", "z"]
        .iter()
        .enumerate()
        .map(|(k, n)| s.spawn(n, 2000 + k as u16))
        .collect();
    s.settle();
    for &j in &joiners {
        assert_eq!(s.lines(j), [WELCOME, UPDATED]);
        assert_eq!(s.nodes[j].client.table().len(), crowd_size + 3);
    }
    for k in 0..3u16 {
        let to = addr(3000 + k);
        let deltas = s.log[before..]
            .iter()
            .filter(|p| p.to == to && p.is(What::Delta))
            .count();
        assert_eq!(s.nodes[usize::from(k)].client.table().len(), crowd_size + 3);
        assert_eq!(deltas, 1, "c{k} got {deltas} deltas for 3 joins");
    }

    // Zed's first page is lost, so it is still pulling when "w" joins (its
    // first window is sent again after 500 ms; a lost last page would not
    // do: the server takes the pass for done once it sent that).
    let zed = addr(2100);
    s.drop_rules
        .push(sim::drop_first(1, move |p| p.to == zed && p.is(What::Page)));
    let before = s.log.len();
    let z = s.spawn("Zed", 2100);
    s.run_for(Duration::from_millis(100));
    let w = s.spawn("w", 2101);
    s.settle();
    assert_eq!(s.lines(w), [WELCOME, UPDATED]);
    assert_eq!(s.lines(z), [WELCOME, UPDATED]);
    let log = &s.log[before..];
    let last_page = log
        .iter()
        .rposition(|p| p.to == zed && p.is(What::Page))
        .unwrap();
    let early = log[..last_page]
        .iter()
        .filter(|p| p.to == zed && p.is(What::Delta))
        .count();
    assert_eq!(early, 0, "a delta reached Zed while it pulled the table");
    // Everyone else heard of w by a delta; Zed has it all the same.
    assert!(log.iter().any(|p| p.to == addr(3000) && p.is(What::Delta)));
    assert!(s.nodes[z].client.table().get(&name("w")).is_some());
    assert_eq!(s.nodes[z].client.table().len(), crowd_size + 5);
}

#[test]
fn a_channel_sender_is_acked_before_the_copies_go_out() {
    let mut s = crowd(6);
    let before = s.log.len();
    s.command(0, "send_all hello everyone");
    let log = &s.log[before..];
    let ack = log
        .iter()
        .position(|p| p.to == addr(3000) && p.is(What::Ack))
        .expect("the sender's ack");
    let first_copy = log
        .iter()
        .position(|p| p.from == s.server_addr && p.is(What::Deliver))
        .expect("a copy");
    assert!(ack < first_copy, "ack at {ack}, first copy at {first_copy}");
    for k in 1..6 {
        let shown = s.lines(k).last().copied();
        assert_eq!(shown, Some(">>> [Channel_Message c0: hello everyone]"));
    }
}

#[test]
fn a_server_that_never_gets_message_3_still_ends_in_not_responding() {
    let mut s = Sim::new();
    // Message 2 comes every time; message 3 (with the registration) is
    // always lost on the way.
    s.drop_rules.push(drop_all(|p| p.is(What::Finish)));
    let t0 = s.now;
    let i = s.spawn("Alice", 2000);
    let done = s.run_until(Duration::from_secs(120), |s| s.nodes[i].exit.is_some());
    assert!(done, "still trying after 120 s");
    assert_eq!(s.lines(i), GONE);
    assert!(s.count(|p| p.is(What::Response)) >= 2);
    assert!(s.now - t0 <= Duration::from_secs(10), "{:?}", s.now - t0);
}
