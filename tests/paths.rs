//! Direct, punched or relayed: clients behind NATs on the simulated
//! network (`sim/nat.rs`), every path a direct message can take, and what
//! the sender is told on each.

mod sim;

use sim::nat::NatKind;
use sim::{Sim, addr, drop_all, name};
use udpchat::wire::What;
use udpchat::{Path, StoreFailure};

const NO_ACK: &str = ">>> [No ACK from Bob, message sent to server.]";
const EXISTS: &str = ">>> [Client Bob exists!!]";
const RECEIVED: &str = ">>> [Message received by Bob.]";
const SAVED: &str = ">>> [Messages received by the server and saved]";

/// Alice and Bob, each behind a NAT of `kind`.
fn behind(kind: NatKind) -> Sim {
    let mut s = Sim::new();
    s.join_behind("Alice", 2000, kind);
    s.join_behind("Bob", 3000, kind);
    s.settle();
    s
}

/// `list`'s line for `who` at node `i`.
fn list_row(s: &mut Sim, i: usize, who: &str) -> String {
    let from = s.nodes[i].lines.len();
    s.line(i, "list");
    let row = s
        .lines_since(i, from)
        .into_iter()
        .find(|l| l.split_whitespace().nth(1) == Some(who))
        .map(str::to_string);
    row.unwrap_or_else(|| panic!("no list row for {who}"))
}

/// Sends `text` from node `i` to `to` and returns what the sender printed.
fn send(s: &mut Sim, i: usize, to: &str, text: &str) -> Vec<String> {
    let from = s.nodes[i].lines.len();
    s.command(i, &format!("send {to} {text}"));
    s.lines_since(i, from)
        .into_iter()
        .map(str::to_string)
        .collect()
}

#[test]
fn behind_endpoint_independent_nats_the_server_punches_a_direct_path() {
    let mut s = behind(NatKind::EndpointIndependent);
    // Each sees the other at its NAT's public address.
    let bob_public = s.seen_at(1);
    let row = s.nodes[0].client.table().get(&name("Bob")).unwrap().clone();
    assert_eq!(row.addr, bob_public);

    // The first message finds Bob's NAT closed: it falls back, the server
    // has Bob send towards Alice while it asks whether he is there, and
    // the retry goes through the opened path.
    let b = s.nodes[1].lines.len();
    assert_eq!(
        send(&mut s, 0, "Bob", "knock knock"),
        [NO_ACK, EXISTS, RECEIVED]
    );
    assert_eq!(s.lines_since(1, b), [">>> Alice: knock knock"]);
    assert_eq!(s.count(|p| p.is(What::Punch)), 1);
    assert_eq!(s.count(|p| p.is(What::RelayMessage)), 0);
    assert_eq!(s.nodes[0].client.path(&name("Bob")), Some(Path::Punched));
    assert!(
        list_row(&mut s, 0, "Bob").ends_with("online   punched"),
        "{}",
        list_row(&mut s, 0, "Bob")
    );

    // From now on both ways are direct, with nothing through the server.
    let to_server = s.count(|p| p.to == s.server_addr);
    let a = s.nodes[0].lines.len();
    assert_eq!(send(&mut s, 0, "Bob", "who is there"), [RECEIVED]);
    assert_eq!(
        send(&mut s, 1, "Alice", "me"),
        [">>> [Message received by Alice.]"]
    );
    assert_eq!(s.lines_since(0, a + 1), [">>> Bob: me"]);
    assert_eq!(s.nodes[1].client.path(&name("Alice")), Some(Path::Punched));
    assert_eq!(s.count(|p| p.to == s.server_addr), to_server);
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

#[test]
fn behind_symmetric_nats_the_server_relays_and_the_conversation_stays_relayed() {
    let mut s = behind(NatKind::Symmetric);
    let b = s.nodes[1].lines.len();
    assert_eq!(
        send(&mut s, 0, "Bob", "via you"),
        [NO_ACK, EXISTS, RECEIVED]
    );
    assert_eq!(
        s.lines_since(1, b),
        [">>> Bob: via you"].map(|l| l.replace("Bob", "Alice"))
    );
    assert_eq!(s.count(|p| p.is(What::RelayMessage)), 1);
    assert_eq!(s.count(|p| p.is(What::Relayed)), 1);
    // Relayed, not kept: Bob's ack deleted it.
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
    assert_eq!(s.nodes[0].client.path(&name("Bob")), Some(Path::Relayed));
    assert!(list_row(&mut s, 0, "Bob").ends_with("online   relayed"));

    // The next message goes through the relay at once, no fallback lines;
    // Bob, who got a relayed message, answers the same way.
    assert_eq!(send(&mut s, 0, "Bob", "again"), [RECEIVED]);
    assert_eq!(s.nodes[1].client.path(&name("Alice")), Some(Path::Relayed));
    assert_eq!(
        send(&mut s, 1, "Alice", "back"),
        [">>> [Message received by Alice.]"]
    );
    assert_eq!(
        s.lines_since(1, b),
        [
            ">>> Alice: via you",
            ">>> Alice: again",
            ">>> [Message received by Alice.]"
        ]
    );
    assert_eq!(s.count(|p| p.is(What::RelayMessage)), 3);
    // Every relayed message also tried the direct path again, in vain.
    assert!(s.count(|p| p.is(What::PeerInit)) >= 3);
    assert_eq!(s.nodes[0].client.path(&name("Bob")), Some(Path::Relayed));
}

#[test]
fn a_relayed_conversation_moves_to_the_direct_path_once_it_opens() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    // For a while nothing passes between the two (a firewall that later
    // lets UDP through): the relay carries the message.
    let between = |p: &sim::Packet| {
        (p.from == addr(2000) && p.to == addr(3000)) || (p.from == addr(3000) && p.to == addr(2000))
    };
    s.drop_rules.push(drop_all(between));
    assert_eq!(send(&mut s, 0, "Bob", "one"), [NO_ACK, EXISTS, RECEIVED]);
    assert_eq!(s.nodes[0].client.path(&name("Bob")), Some(Path::Relayed));
    assert_eq!(send(&mut s, 0, "Bob", "two"), [RECEIVED]);

    // The path opens: the next relayed message's handshake beside it gets
    // through, and the one after goes direct.
    s.drop_rules.clear();
    assert_eq!(send(&mut s, 0, "Bob", "three"), [RECEIVED]);
    assert_eq!(s.nodes[0].client.path(&name("Bob")), Some(Path::Punched));
    let relays = s.count(|p| p.is(What::RelayMessage));
    assert_eq!(send(&mut s, 0, "Bob", "four"), [RECEIVED]);
    assert_eq!(s.count(|p| p.is(What::RelayMessage)), relays);
    let shown: Vec<&str> = s
        .lines(1)
        .into_iter()
        .filter(|l| l.contains("Alice:"))
        .collect();
    assert_eq!(
        shown,
        [
            ">>> Alice: one",
            ">>> Alice: two",
            ">>> Alice: three",
            ">>> Alice: four"
        ]
    );
}

#[test]
fn a_relayed_message_its_recipient_does_not_ack_is_saved_and_delivered_later() {
    let mut s = behind(NatKind::Symmetric);
    // Bob answers the server's probes but never gets a relayed message.
    let bob = s.seen_at(1);
    s.drop_rules
        .push(drop_all(move |p| p.to == bob && p.is(What::Relayed)));
    let b = s.nodes[1].lines.len();
    let a = s.nodes[0].lines.len();
    s.line(0, "send Bob keep it");
    s.run_for(std::time::Duration::from_secs(3));
    assert_eq!(s.lines_since(0, a), [NO_ACK, EXISTS, SAVED]);
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 1);
    // The server keeps trying; when its deliveries get through again, Bob
    // shows it once and the mailbox empties.
    s.drop_rules.clear();
    s.run_for(std::time::Duration::from_secs(40));
    let shown: Vec<&str> = s
        .lines_since(1, b)
        .into_iter()
        .filter(|l| l.contains("keep it"))
        .collect();
    assert_eq!(shown.len(), 1, "{:?}", s.lines_since(1, b));
    assert!(shown[0].starts_with(">>> Alice: "), "{shown:?}");
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

#[test]
fn a_relay_the_store_cannot_keep_is_refused_and_never_shown() {
    let mut s = behind(NatKind::Symmetric);
    s.store_fails = Some(StoreFailure::Full);
    let b = s.nodes[1].lines.len();
    assert_eq!(
        send(&mut s, 0, "Bob", "not kept"),
        [
            NO_ACK,
            EXISTS,
            ">>> [Error: the server's store is full; not saved.]"
        ]
    );
    s.store_fails = None;
    s.run_for(std::time::Duration::from_secs(5));
    assert_eq!(s.lines_since(1, b), Vec::<&str>::new());
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

#[test]
fn a_message_to_oneself_behind_a_nat_without_hairpinning_is_relayed() {
    let mut s = Sim::new();
    s.join_behind("Alice", 2000, NatKind::Symmetric);
    let a = s.nodes[0].lines.len();
    s.command(0, "send Alice note to self");
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [No ACK from Alice, message sent to server.]",
            ">>> [Client Alice exists!!]",
            ">>> Alice: note to self",
            ">>> [Message received by Alice.]"
        ]
    );
}

/// The lines of node `i` since `from` that show a message.
fn shown(s: &Sim, i: usize, from: usize) -> Vec<String> {
    s.lines_since(i, from)
        .into_iter()
        .filter(|l| l.contains(": ") && !l.starts_with(">>> ["))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_nat_that_rebinds_mid_conversation_loses_nothing() {
    let mut s = behind(NatKind::EndpointIndependent);
    assert_eq!(send(&mut s, 0, "Bob", "before"), [NO_ACK, EXISTS, RECEIVED]);
    let old = s.seen_at(0);
    // Alice's NAT forgets its mappings: her datagrams now leave from a new
    // port, and nothing reaches her old one, the server's probe included.
    s.nodes[0].nat.as_mut().unwrap().rebind();
    let (a, b) = (s.nodes[0].lines.len(), s.nodes[1].lines.len());
    // Bob speaks first: neither he nor the server can reach her, so it is
    // saved, and she is taken for gone.
    assert_eq!(
        send(&mut s, 1, "Alice", "during"),
        [
            ">>> [No ACK from Alice, message sent to server.]",
            ">>> [Client table updated.]",
            SAVED
        ]
    );
    // Her next heartbeat comes from the new port: the server challenges
    // it, she answers, and she is back on the same session (no new
    // registration), where the saved message reaches her.
    s.run_for(std::time::Duration::from_secs(12));
    assert_eq!(shown(&s, 0, a), [">>> Bob: T+1 during"]);
    assert!(
        !s.lines_since(0, a)
            .contains(&">>> [Reconnected to server.]"),
        "{:?}",
        s.lines_since(0, a)
    );
    assert_eq!(s.count(|p| p.is(What::PathChallenge)), 1);
    let outcome = send(&mut s, 0, "Bob", "after");
    assert_eq!(
        outcome.last().map(String::as_str),
        Some(RECEIVED),
        "{outcome:?}"
    );
    assert_eq!(shown(&s, 1, b), [">>> Alice: after"]);
    // Her name and session moved with her: the server and Bob have her
    // new address.
    let new = s.seen_at(0);
    assert_ne!(new, old);
    let alice = s.server.table().lookup(&name("Alice")).unwrap();
    assert_eq!(s.server.table().get(alice).addr, new);
    assert!(s.server.table().get(alice).online);
    assert_eq!(
        s.nodes[1].client.table().get(&name("Alice")).unwrap().addr,
        new
    );
    assert_eq!(s.server.mailbox(&name("Alice")).count(), 0);
}

#[test]
fn a_client_whose_nat_rebinds_and_who_speaks_first_reaches_its_peer() {
    let mut s = behind(NatKind::EndpointIndependent);
    assert_eq!(
        send(&mut s, 1, "Alice", "hello"),
        [
            ">>> [No ACK from Alice, message sent to server.]",
            ">>> [Client Alice exists!!]",
            ">>> [Message received by Alice.]"
        ]
    );
    s.nodes[0].nat.as_mut().unwrap().rebind();
    let b = s.nodes[1].lines.len();
    // Her datagrams to Bob come from a port his NAT never saw; her save
    // tells the server where she is now; in the end the relay carries it.
    let outcome = send(&mut s, 0, "Bob", "from my new port");
    assert_eq!(
        outcome.last().map(String::as_str),
        Some(RECEIVED),
        "{outcome:?}"
    );
    assert_eq!(shown(&s, 1, b), [">>> Alice: from my new port"]);
    let alice = s.server.table().lookup(&name("Alice")).unwrap();
    assert_eq!(s.server.table().get(alice).addr, s.seen_at(0));
    // And Bob's answer finds her.
    let a = s.nodes[0].lines.len();
    let outcome = send(&mut s, 1, "Alice", "got it");
    assert_eq!(
        outcome.last().map(String::as_str),
        Some(">>> [Message received by Alice.]"),
        "{outcome:?}"
    );
    assert_eq!(shown(&s, 0, a), [">>> Bob: got it"]);
}
