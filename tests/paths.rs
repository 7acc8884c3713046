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

// ---- the attacker ---------------------------------------------------------

/// The server relays what it cannot read: the stored copy is the sender's
/// seal for Bob's key, no byte of the text in it, and only Bob's key opens
/// it.
#[test]
fn the_server_relays_a_seal_it_cannot_read() {
    let mut s = behind(NatKind::Symmetric);
    // Bob does not ack, so the relayed copy stays to be looked at.
    let bob = s.seen_at(1);
    s.drop_rules
        .push(drop_all(move |p| p.to == bob && p.is(What::Relayed)));
    s.line(0, "send Bob a secret for Bob");
    s.run_for(std::time::Duration::from_secs(3));
    assert!(s.count(|p| p.is(What::RelayMessage)) > 0);
    let waiting: Vec<_> = s.server.mailbox(&name("Bob")).collect();
    assert_eq!(waiting.len(), 1);
    let stored = s.store.get(&name("Bob"), waiting[0].mail).unwrap().clone();
    let udpchat::store::Body::Sealed { sealed, .. } = &stored.body else {
        panic!("a relayed message is stored as its sender sealed it: {stored:?}");
    };
    let text = b"a secret for Bob";
    assert!(!sealed.windows(text.len()).any(|w| w == text));
    let secrets = udpchat::crypto::ServerSecrets::derive(&sim::server_key());
    assert!(stored.open(&sim::key_of("Carol"), &secrets).is_none());
    assert!(stored.open(&sim::server_key(), &secrets).is_none());
    let opened = stored.open(&sim::key_of("Bob"), &secrets).unwrap();
    assert_eq!(opened.text.as_str(), "a secret for Bob");
}

/// An on-path attacker who recorded a relayed delivery and a punch plays
/// them again, from the server's address and from its own: Bob shows the
/// message once and sends no handshake more.
#[test]
fn a_replayed_relay_or_punch_changes_nothing() {
    let mut s = behind(NatKind::Symmetric);
    let b = s.nodes[1].lines.len();
    assert_eq!(
        send(&mut s, 0, "Bob", "only once"),
        [NO_ACK, EXISTS, RECEIVED]
    );
    let recorded: Vec<sim::Packet> = s
        .log
        .iter()
        .filter(|p| p.is(What::Relayed) || p.is(What::Punch))
        .cloned()
        .collect();
    // The punches: one while the server probed Bob, one with the relay.
    assert!(recorded.iter().any(|p| p.is(What::Relayed)));
    assert_eq!(recorded.iter().filter(|p| p.is(What::Punch)).count(), 2);
    let inits = s.count(|p| p.is(What::PeerInit));
    let thief = addr(6666);
    for p in &recorded {
        for from in [p.from, thief] {
            s.inject(from, p.to, p.payload.clone());
        }
    }
    s.settle();
    assert_eq!(s.lines_since(1, b), [">>> Alice: only once"]);
    assert_eq!(s.count(|p| p.is(What::PeerInit)), inits);
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

/// Alice is gone (her process died) and the server took her for gone; a
/// stranger who captured one of her datagrams on its way (the server never
/// got it, so no replay window stops it) sends it from its own address.
/// Her session is not revived there: the stranger gets only a challenge it
/// cannot answer (within 3× of what it sent), none of her mail, and her
/// row stays.
#[test]
fn a_gone_clients_captured_datagram_sent_from_elsewhere_revives_nothing() {
    let mut s = behind(NatKind::EndpointIndependent);
    let alice_at = s.seen_at(0);
    // Her next heartbeat is caught on the way: the server never sees it.
    let beat = move |p: &sim::Packet| p.from == alice_at && p.is(What::Heartbeat);
    s.drop_rules.push(sim::drop_first(1, beat));
    s.run_for(std::time::Duration::from_secs(11));
    // The first of her heartbeats, the one lost (its retry got through).
    let captured = s
        .log
        .iter()
        .find(|p| beat(p))
        .expect("a heartbeat of Alice's")
        .payload
        .clone();
    s.crash(0);
    assert_eq!(
        send(&mut s, 1, "Alice", "for Alice only"),
        [
            ">>> [No ACK from Alice, message sent to server.]",
            ">>> [Client table updated.]",
            SAVED
        ]
    );
    let thief = addr(6666);
    let server = s.server_addr;
    s.inject(thief, server, captured.clone());
    s.settle();
    // It got through the session's checks: the challenge shows it.
    assert_eq!(s.count(|p| p.to == thief && p.is(What::PathChallenge)), 1);
    let to_thief = s.bytes_to(thief);
    assert!(
        to_thief <= 3 * captured.len(),
        "{to_thief} bytes for {}",
        captured.len()
    );
    assert!(
        !s.log
            .iter()
            .any(|p| p.to == thief && (p.is(What::Deliver) || p.is(What::Relayed)))
    );
    let alice = s.server.table().lookup(&name("Alice")).unwrap();
    assert!(!s.server.table().get(alice).online);
    assert_eq!(s.server.table().get(alice).addr, alice_at);
    assert_eq!(s.server.mailbox(&name("Alice")).count(), 1);
}

/// Alice was taken for gone (nothing from the server reached her), then
/// deregistered; her dereg's ack is lost too, and her NAT rebinds before
/// the retry. The retry, from the new port, proves that address — and
/// leaves her offline: she said she left.
#[test]
fn a_client_that_deregistered_is_not_brought_back_by_a_retry_from_a_new_port() {
    let mut s = behind(NatKind::EndpointIndependent);
    let alice_at = s.seen_at(0);
    let server = s.server_addr;
    s.drop_rules
        .push(drop_all(move |p| p.from == server && p.to == alice_at));
    // Bob's message makes the server probe her: silent, taken for gone.
    assert_eq!(
        send(&mut s, 1, "Alice", "are you there").last().unwrap(),
        SAVED
    );
    let alice = s.server.table().lookup(&name("Alice")).unwrap();
    assert!(!s.server.table().get(alice).online);
    let a = s.nodes[0].lines.len();
    s.line(0, "dereg Alice");
    s.run_for(std::time::Duration::from_millis(300));
    // Her dereg arrived (its ack did not); now her NAT rebinds.
    s.nodes[0].nat.as_mut().unwrap().rebind();
    s.settle();
    assert!(
        s.lines_since(0, a).contains(&">>> [You are Offline. Bye.]"),
        "{:?}",
        s.lines_since(0, a)
    );
    assert!(!s.nodes[0].client.is_online());
    assert!(!s.server.table().get(alice).online);
    assert!(
        !s.events
            .iter()
            .any(|e| matches!(e, udpchat::ServerEvent::Back(..))),
        "{:?}",
        s.events
    );
}

/// Relays are requests like saves: a burst past the sender's ration is
/// refused, said so, and neither stored nor shown; what got in is shown.
#[test]
fn relays_count_against_the_senders_request_ration() {
    let mut s = Sim::with(|c| c.requests = (12, std::time::Duration::from_secs(1)));
    s.join_behind("Alice", 2000, NatKind::Symmetric);
    s.join_behind("Bob", 3000, NatKind::Symmetric);
    s.settle();
    assert_eq!(send(&mut s, 0, "Bob", "first"), [NO_ACK, EXISTS, RECEIVED]);
    // The ration refills, then thirty relays at once.
    s.run_for(std::time::Duration::from_secs(20));
    let (a, b) = (s.nodes[0].lines.len(), s.nodes[1].lines.len());
    for k in 0..30 {
        s.line(0, &format!("send Bob burst {k}"));
    }
    s.settle();
    let lines = s.lines_since(0, a);
    let slow_down = ">>> [Error: too many requests from this address just now; not saved — send it again in a moment.]";
    let received = lines.iter().filter(|l| **l == RECEIVED).count();
    let refused = lines.iter().filter(|l| **l == slow_down).count();
    assert_eq!(received + refused, 30, "{lines:?}");
    assert!(
        (1..=12).contains(&received),
        "{received} relayed: {lines:?}"
    );
    let shown = s
        .lines_since(1, b)
        .iter()
        .filter(|l| l.contains("burst"))
        .count();
    assert_eq!(shown, received);
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}
