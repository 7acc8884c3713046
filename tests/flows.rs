//! Every flow of SPEC §3 on the real state machines over an in-memory
//! network with virtual time: no sockets, no sleeps.

mod sim;

use std::time::Duration;

use sim::{Sim, addr, drop_all, drop_first, name};
use udpchat::console;
use udpchat::wire::What;

const WELCOME: &str = ">>> [Welcome, You are registered.]";
const UPDATED: &str = ">>> [Client table updated.]";
const SAVED: &str = ">>> [Messages received by the server and saved]";

/// Alice, Bob and Carol registered one after another.
fn three() -> Sim {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.join("Bob", 3000);
    s.join("Carol", 4000);
    s
}

#[test]
fn registration_announces_every_change_to_every_client() {
    let s = three();
    assert_eq!(s.lines(0), [WELCOME, UPDATED, UPDATED, UPDATED]);
    assert_eq!(s.lines(1), [WELCOME, UPDATED, UPDATED]);
    assert_eq!(s.lines(2), [WELCOME, UPDATED]);
    for node in &s.nodes {
        let table: Vec<_> = node
            .client
            .table()
            .iter()
            .map(|e| (e.name.to_string(), e.addr, e.online))
            .collect();
        assert_eq!(
            table,
            [
                ("Alice".to_string(), addr(2000), true),
                ("Bob".to_string(), addr(3000), true),
                ("Carol".to_string(), addr(4000), true)
            ]
        );
        assert_eq!(node.client.table().version(), s.server.table().version());
    }
}

#[test]
fn direct_message_is_shown_and_acked() {
    let mut s = three();
    let (a, b) = (s.nodes[0].lines.len(), s.nodes[1].lines.len());
    s.command(0, "send Bob Hello  there, 你好 😀");
    assert_eq!(s.lines_since(1, b), [">>> Alice: Hello  there, 你好 😀"]);
    assert_eq!(s.lines_since(0, a), [">>> [Message received by Bob.]"]);
    // Direct: the server saw nothing of it.
    assert_eq!(
        s.count(|p| p.to == s.server_addr && p.is(What::SaveMessage)),
        0
    );
}

#[test]
fn self_message_goes_round_the_network() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.command(0, "send Alice Hello, Alice!");
    assert_eq!(
        s.lines_since(0, 2),
        [
            ">>> Alice: Hello, Alice!",
            ">>> [Message received by Alice.]"
        ]
    );
}

#[test]
fn retransmitted_message_is_shown_once_and_acked_again() {
    let mut s = three();
    let b = s.nodes[1].lines.len();
    // The first ack is lost: Alice resends at 250 ms, Bob acks the duplicate.
    s.drop_rules.push(drop_first(1, |p| p.is(What::ChatAck)));
    s.command(0, "send Bob once");
    assert_eq!(s.lines_since(1, b), [">>> Alice: once"]);
    assert_eq!(s.lines(0).last(), Some(&">>> [Message received by Bob.]"));
    assert_eq!(s.count(|p| p.is(What::Chat)), 2);
    assert_eq!(s.count(|p| p.is(What::ChatAck)), 2);
}

#[test]
fn silent_peer_is_probed_marked_offline_and_the_message_saved() {
    let mut s = three();
    s.crash(1);
    let (a, c) = (s.nodes[0].lines.len(), s.nodes[2].lines.len());
    let t0 = s.now;
    s.line(0, "send Bob Hello");
    s.run_until(Duration::from_secs(5), |s| s.nodes[0].lines.len() > a);
    // The verdict comes after the 500 ms ack window, not before.
    assert!(s.now - t0 >= Duration::from_millis(500));
    s.settle();
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [No ACK from Bob, message sent to server.]",
            UPDATED,
            SAVED
        ]
    );
    assert_eq!(s.lines_since(2, c), [UPDATED]);
    assert_eq!(
        s.mailbox("Bob"),
        [("Alice".to_string(), false, "Hello".to_string())]
    );
    assert!(!s.nodes[0].client.table().get(&name("Bob")).unwrap().online);
}

#[test]
fn offline_peer_in_the_table_goes_straight_to_the_server() {
    let mut s = three();
    s.command(1, "dereg Bob");
    assert_eq!(s.lines(1).last(), Some(&">>> [You are Offline. Bye.]"));
    let a = s.nodes[0].lines.len();
    s.command(0, "send Bob Hi");
    assert_eq!(
        s.lines_since(0, a),
        [">>> [Bob is offline, message sent to server.]", SAVED]
    );
    // No direct attempt, and a deregistered Bob shows nothing.
    assert_eq!(s.count(|p| p.to == addr(3000) && p.is(What::Chat)), 0);
    assert_eq!(s.lines(1).last(), Some(&">>> [You are Offline. Bye.]"));
}

#[test]
fn deregistered_client_neither_shows_nor_acks_direct_messages() {
    let mut s = three();
    // Carol's table is stale on purpose: she never hears of the dereg.
    s.drop_rules
        .push(drop_all(|p| p.to == addr(4000) && p.is(What::Delta)));
    s.command(1, "dereg Bob");
    let (b, c) = (s.nodes[1].lines.len(), s.nodes[2].lines.len());
    s.command(2, "send Bob hi");
    let bob = s.nodes[1].addr;
    assert_eq!(s.count(|p| p.from == bob && p.is(What::ChatAck)), 0);
    assert_eq!(s.nodes[1].lines.len(), b);
    assert_eq!(
        s.lines_since(2, c),
        [">>> [No ACK from Bob, message sent to server.]", SAVED]
    );
}

#[test]
fn log_back_delivers_mail_oldest_first_and_clears_it_only_after_acks() {
    let mut s = three();
    s.command(0, "dereg Alice");
    s.run_for(Duration::from_secs(1));
    s.command(1, "send_all Welcome to Channel");
    s.run_for(Duration::from_secs(1));
    s.command(1, "send Alice Hello");
    s.run_for(Duration::from_secs(1));
    s.command(2, "send Alice Hello!!");
    assert_eq!(s.server.mailbox(&name("Alice")).count(), 3);
    let a = s.nodes[0].lines.len();
    let (b, c) = (s.nodes[1].lines.len(), s.nodes[2].lines.len());
    s.command(0, "reg Alice");
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [You Have Messages]",
            ">>> Channel_Message Bob: T+1 Welcome to Channel",
            ">>> Bob: T+2 Hello",
            ">>> Carol: T+3 Hello!!",
            UPDATED
        ]
    );
    assert_eq!(s.lines_since(1, b), [UPDATED]);
    assert_eq!(s.lines_since(2, c), [UPDATED]);
    assert_eq!(s.server.mailbox(&name("Alice")).count(), 0);
    assert_eq!(s.store.len(), 0);
}

#[test]
fn lost_mail_ack_means_redelivery_but_the_message_is_shown_once() {
    let mut s = three();
    s.command(0, "dereg Alice");
    s.command(1, "send Alice one");
    s.command(1, "send Alice two");
    s.drop_rules.push(drop_first(1, |p| p.is(What::Delivered)));
    let a = s.nodes[0].lines.len();
    s.command(0, "reg Alice");
    let shown: Vec<_> = s.lines_since(0, a);
    assert_eq!(
        shown,
        [
            ">>> [You Have Messages]",
            ">>> Bob: T+0 one",
            ">>> Bob: T+0 two",
            UPDATED
        ]
    );
    // A message went out again because its ack was lost …
    let deliveries = |p: &sim::Packet| p.to == addr(2000) && p.is(What::Deliver);
    assert!(s.count(deliveries) >= 3);
    // … and is gone only now that an ack arrived.
    assert_eq!(s.server.mailbox(&name("Alice")).count(), 0);
}

#[test]
fn mailbox_survives_a_log_back_that_never_acks() {
    let mut s = three();
    s.command(0, "dereg Alice");
    s.command(1, "send Alice keep me");
    s.drop_rules.push(drop_all(|p| p.is(What::Delivered)));
    s.command(0, "reg Alice");
    s.run_for(Duration::from_secs(10));
    // Never acked, never deleted: the next log-back gets it again.
    assert_eq!(s.server.mailbox(&name("Alice")).count(), 1);
    assert_eq!(s.store.len(), 1);
}

#[test]
fn channel_message_reaches_everyone_online_and_is_acked() {
    let mut s = three();
    let (a, b, c) = (
        s.nodes[0].lines.len(),
        s.nodes[1].lines.len(),
        s.nodes[2].lines.len(),
    );
    s.command(0, "send_all Welcome to Channel");
    assert_eq!(s.lines_since(0, a), [">>> [Message received by Server.]"]);
    assert_eq!(
        s.lines_since(1, b),
        [">>> [Channel_Message Alice: Welcome to Channel]"]
    );
    assert_eq!(
        s.lines_since(2, c),
        [">>> [Channel_Message Alice: Welcome to Channel]"]
    );
    // Both recipients acked, so no copy is left behind.
    assert_eq!(s.store.len(), 0);
}

#[test]
fn channel_silent_recipient_is_marked_offline_and_gets_a_stored_copy() {
    let mut s = three();
    s.crash(2);
    let (a, b) = (s.nodes[0].lines.len(), s.nodes[1].lines.len());
    s.command(0, "send_all anyone?");
    assert_eq!(
        s.lines_since(0, a),
        [">>> [Message received by Server.]", UPDATED]
    );
    assert_eq!(
        s.lines_since(1, b),
        [">>> [Channel_Message Alice: anyone?]", UPDATED]
    );
    assert!(
        !s.server
            .table()
            .get(s.server.table().lookup(&name("Carol")).unwrap())
            .online
    );
    assert_eq!(
        s.mailbox("Carol"),
        [("Alice".to_string(), true, "anyone?".to_string())]
    );
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

#[test]
fn channel_message_for_offline_clients_is_stored_at_once() {
    let mut s = three();
    s.command(2, "dereg Carol");
    s.command(0, "send_all hi all");
    assert_eq!(
        s.mailbox("Carol"),
        [("Alice".to_string(), true, "hi all".to_string())]
    );
    // No probe was needed for a client already offline.
    assert_eq!(s.count(|p| p.is(What::Probe)), 0);
}

#[test]
fn server_answers_exists_for_a_live_recipient_and_the_retry_succeeds() {
    let mut s = three();
    // Alice's first try to Bob is lost (the message, its retransmission, and
    // its copy on the fresh link the retransmission started); Bob answers
    // the probe.
    let to_bob = |p: &sim::Packet| p.to == addr(3000) && p.is(What::Chat);
    s.drop_rules.push(drop_first(3, to_bob));
    let (a, b) = (s.nodes[0].lines.len(), s.nodes[1].lines.len());
    s.command(0, "send Bob are you there");
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [No ACK from Bob, message sent to server.]",
            ">>> [Client Bob exists!!]",
            ">>> [Message received by Bob.]"
        ]
    );
    assert_eq!(s.lines_since(1, b), [">>> Alice: are you there"]);
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

/// SPEC's retry after `exists` fails too: the server reaches Bob and Alice
/// does not, so the server relays the message (it used to end in "Bob did
/// not answer; the message was not delivered", and the message was lost).
#[test]
fn exists_then_silence_is_relayed_by_the_server() {
    let mut s = three();
    s.drop_rules
        .push(drop_all(|p| p.to == addr(3000) && p.is(What::Chat)));
    let (a, b) = (s.nodes[0].lines.len(), s.nodes[1].lines.len());
    s.command(0, "send Bob lost");
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [No ACK from Bob, message sent to server.]",
            ">>> [Client Bob exists!!]",
            ">>> [Message received by Bob.]"
        ]
    );
    assert_eq!(s.lines_since(1, b), [">>> Alice: lost"]);
    assert_eq!(s.count(|p| p.is(What::RelayMessage)), 1);
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 0);
}

#[test]
fn retried_save_request_stores_the_message_once() {
    let mut s = three();
    s.command(1, "dereg Bob");
    // The server's first ack is lost; the client retries the same request.
    s.drop_rules
        .push(drop_first(1, |p| p.to == addr(2000) && p.is(What::Ack)));
    let a = s.nodes[0].lines.len();
    s.command(0, "send Bob once only");
    assert_eq!(
        s.lines_since(0, a),
        [">>> [Bob is offline, message sent to server.]", SAVED]
    );
    assert_eq!(s.count(|p| p.is(What::SaveMessage)), 2);
    assert_eq!(s.server.mailbox(&name("Bob")).count(), 1);
}

#[test]
fn duplicate_live_name_is_rejected_after_the_probe() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    let i = s.join("Alice", 3000);
    assert_eq!(
        s.lines(i),
        [">>> [Registration rejected: name Alice is already in use.]"]
    );
    assert_eq!(s.nodes[i].exit, Some(1));
    assert_eq!(s.lines(0), [WELCOME, UPDATED]);
    assert_eq!(s.count(|p| p.to == addr(2000) && p.is(What::Probe)), 1);
}

#[test]
fn silent_holder_loses_the_name_after_the_probe() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.crash(0);
    let t0 = s.now;
    let i = s.join("Alice", 3000);
    assert_eq!(s.lines(i), [WELCOME, UPDATED]);
    assert!(
        s.now - t0 >= Duration::from_millis(500),
        "took over before the probe ran out"
    );
    let id = s.server.table().lookup(&name("Alice")).unwrap();
    assert_eq!(s.server.table().get(id).addr, addr(3000));
}

#[test]
fn registering_again_from_the_same_address_is_idempotent() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    let version = s.server.table().version();
    // A restarted process on the same port.
    s.crash(0);
    let i = s.join("Alice", 2000);
    assert_eq!(s.lines(i), [WELCOME, UPDATED]);
    assert_eq!(
        s.server.table().version(),
        version,
        "nothing changed in the table"
    );
}

#[test]
fn server_gone_dereg_gives_up_after_five_tries_and_exits() {
    let mut s = three();
    s.stop_server();
    let a = s.nodes[0].lines.len();
    let t0 = s.now;
    s.command(0, "dereg Alice");
    assert_eq!(
        s.lines_since(0, a),
        [">>> [Server not responding]", ">>> [Exiting]"]
    );
    assert_eq!(s.nodes[0].exit, Some(1));
    assert_eq!(s.count(|p| p.is(What::Deregister)), 5);
    assert!(s.now - t0 >= Duration::from_millis(2500));
}

#[test]
fn server_gone_channel_message_fails_but_the_client_stays() {
    let mut s = three();
    s.stop_server();
    let a = s.nodes[0].lines.len();
    s.command(0, "send_all anyone");
    assert_eq!(s.lines_since(0, a), [">>> [Server not responding.]"]);
    assert_eq!(s.nodes[0].exit, None);
    // Direct chat still works without the server.
    s.command(0, "send Carol still here");
    assert_eq!(s.lines(2).last(), Some(&">>> Alice: still here"));
    assert_eq!(s.lines(0).last(), Some(&">>> [Message received by Carol.]"));
}

#[test]
fn server_gone_save_message_exits() {
    let mut s = three();
    s.command(1, "dereg Bob");
    s.stop_server();
    let a = s.nodes[0].lines.len();
    s.command(0, "send Bob Hello");
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [Bob is offline, message sent to server.]",
            ">>> [Server not responding]",
            ">>> [Exiting]"
        ]
    );
    assert_eq!(s.nodes[0].exit, Some(1));
}

#[test]
fn log_back_without_an_answer_leaves_the_client_offline_but_running() {
    let mut s = three();
    s.command(0, "dereg Alice");
    s.stop_server();
    let a = s.nodes[0].lines.len();
    s.command(0, "reg Alice");
    assert_eq!(s.lines_since(0, a), [">>> [Server not responding]"]);
    assert_eq!(s.nodes[0].exit, None);
    s.command(0, "send Bob hi");
    assert_eq!(
        s.lines(0).last(),
        Some(&">>> [Error: you are offline; type reg Alice to log back in.]")
    );
}

#[test]
fn user_errors_are_explained() {
    let mut s = three();
    let cases = [
        (
            "dereg Bob",
            ">>> [Error: dereg takes your own name (Alice).]",
        ),
        ("reg Bob", ">>> [Error: reg takes your own name (Alice).]"),
        ("reg Alice", ">>> [Error: you are already online.]"),
        (
            "send Zed hi",
            ">>> [Error: unknown client Zed; type list to see the client table.]",
        ),
        ("send Bob", ">>> [Error: usage: send <name> <message>]"),
        ("send_all", ">>> [Error: usage: send_all <message>]"),
        (
            "frobnicate",
            ">>> [Error: unknown command frobnicate; type help for the commands.]",
        ),
    ];
    for (line, want) in cases {
        s.command(0, line);
        assert_eq!(s.lines(0).last(), Some(&want), "after {line:?}");
    }
    let long = format!("send Bob {}", "é".repeat(501));
    s.command(0, &long);
    assert_eq!(
        s.lines(0).last(),
        Some(&">>> [Error: message too long (1002 bytes); the limit is 1000.]")
    );
    // Nothing was sent for any of them.
    assert_eq!(s.count(|p| p.is(What::Chat)), 0);
}

#[test]
fn list_shows_the_local_table() {
    let mut s = three();
    s.command(1, "dereg Bob");
    let a = s.nodes[0].lines.len();
    s.command(0, "list");
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [Client table: 2 of 3 online.]",
            ">>> Alice  127.0.0.1:2000         online   (you)",
            ">>> Bob    127.0.0.1:3000         offline",
            ">>> Carol  127.0.0.1:4000         online"
        ]
    );
}

#[test]
fn commands_typed_before_registration_run_after_it() {
    let mut s = Sim::new();
    s.join("Bob", 3000);
    let i = s.spawn("Alice", 2000);
    s.line(i, "send Bob early bird");
    s.settle();
    assert_eq!(
        s.lines(i),
        [WELCOME, UPDATED, ">>> [Message received by Bob.]"]
    );
    assert_eq!(s.lines(0).last(), Some(&">>> Alice: early bird"));
}

#[test]
fn quit_help_and_list_typed_during_registration_run_at_once() {
    let mut s = Sim::new();
    s.join("Bob", 3000);
    let i = s.spawn("Alice", 2000);
    // Nothing has reached the server yet.
    s.paste(i, &["help", "list", "quit"]);
    let lines = s.lines(i);
    assert_eq!(lines.len(), console::HELP.len() + 1, "{lines:?}");
    assert_eq!(lines.last(), Some(&">>> The client table is empty."));
    // Offline and still registering: exit 0 at once, the server not told.
    assert_eq!(s.nodes[i].exit, Some(0));
}

#[test]
fn a_paste_of_many_lines_is_carried_out_whole() {
    let mut s = three();
    let bob = 1;
    let n = 100;
    let pasted: Vec<String> = (0..n).map(|k| format!("send Bob paste {k}")).collect();
    let pasted: Vec<&str> = pasted.iter().map(String::as_str).collect();
    s.paste(0, &pasted);
    s.settle();
    let shown: Vec<&str> = s
        .lines(bob)
        .into_iter()
        .filter(|l| l.contains("paste"))
        .collect();
    let expected: Vec<String> = (0..n).map(|k| format!(">>> Alice: paste {k}")).collect();
    assert_eq!(shown, expected);
    let received = s
        .lines(0)
        .iter()
        .filter(|l| **l == ">>> [Message received by Bob.]")
        .count();
    assert_eq!(received, n);
}

#[test]
fn a_replayed_request_changes_nothing_from_any_address() {
    let mut s = three();
    s.command(1, "dereg Bob");
    s.command(1, "reg Bob");
    let version = s.server.table().version();
    // Every datagram Bob ever sent the server, again, from his address and
    // from another: each was seen (or belongs to a session that is gone).
    let sent: Vec<Vec<u8>> = s
        .log
        .iter()
        .filter(|p| p.from == addr(3000) && p.to == s.server_addr)
        .map(|p| p.payload.clone())
        .collect();
    assert!(sent.len() > 5);
    let now = s.now;
    for payload in &sent {
        for from in [addr(3000), addr(6666)] {
            s.server.handle_datagram(now, from, payload);
        }
    }
    let bob = s.server.table().lookup(&name("Bob")).unwrap();
    assert!(s.server.table().get(bob).online);
    assert_eq!(s.server.table().get(bob).addr, addr(3000));
    assert_eq!(s.server.table().version(), version);
    // Nothing reached Bob's or anyone's screen, and the only answers were
    // stateless ones smaller than what provoked them (a reset of a session
    // that is gone, a retry of an old handshake's first message).
    let mut answered = 0;
    while let Some(t) = s.server.poll_transmit() {
        assert!(
            matches!(
                t.what,
                What::Reset | What::Retry | What::Response | What::Welcome
            ),
            "{:?}",
            t.what
        );
        answered += t.payload.len();
    }
    let received: usize = sent.iter().map(Vec::len).sum::<usize>() * 2;
    assert!(answered <= received, "{answered} > {received}");
}

#[test]
fn a_client_that_was_told_nothing_is_idle_only_when_done() {
    let mut s = three();
    s.crash(1);
    s.line(0, "send Bob are you there");
    assert!(!s.nodes[0].client.is_idle());
    s.run_for(Duration::from_millis(600));
    // Fallback in flight: still busy.
    assert!(!s.nodes[0].client.is_idle());
    s.settle();
    assert!(s.nodes[0].client.is_idle());
    assert_eq!(s.lines(0).last(), Some(&SAVED));
}

#[test]
fn many_clients_converge_on_one_table() {
    let mut s = Sim::new();
    for i in 0..60u16 {
        s.join(&format!("c{i:02}"), 2000 + i);
    }
    s.settle();
    let version = s.server.table().version();
    for node in &s.nodes {
        assert_eq!(node.client.table().len(), 60);
        assert_eq!(node.client.table().version(), version);
    }
}

/// Impersonation by a registered user: Carol holds a real session with Bob
/// (her own key, which Bob's table has) and sends a chat claiming to be
/// from Alice, under any id. Bob shows nothing and acks nothing; the same
/// session's chats as Carol are shown as hers.
#[test]
fn a_chat_is_shown_only_as_from_the_key_that_sent_it() {
    use udpchat::crypto::{self, Link};
    use udpchat::packet::{self, Datagram, Packet};
    use udpchat::wire::{self, Message, MsgId, Text};

    let mut s = three();
    let (carol_key, bob_key) = (sim::key_of("Carol"), sim::key_of("Bob"));
    let now = s.now;
    let mut hs = crypto::peer_initiator(&carol_key, &bob_key.public(), [7; 32]);
    let mut m1 = [0u8; packet::IK1_LEN];
    hs.write_message(&[], &mut m1).unwrap();
    let init = Packet::PeerInit {
        sender: 77,
        noise: &m1,
    }
    .to_vec();
    let bob = &mut s.nodes[1].client;
    bob.handle_datagram(now, addr(4000), &init);
    let response = bob
        .poll_transmit()
        .expect("Bob answers a key his table has");
    let Ok(Datagram::Packet(Packet::PeerResponse { sender, noise, .. })) =
        packet::parse(&response.payload)
    else {
        panic!("not a peer response: {:?}", response.what);
    };
    hs.read_message(noise, &mut [0u8; 64]).unwrap();
    let mut link = Link::new(hs, 77, sender).unwrap();
    let chat = |from: &str, id: u64, text: &str| {
        wire::encode_to_vec(&Message::Chat {
            from: name(from),
            to: name("Bob"),
            id: MsgId(id),
            text: Text::new(text).unwrap(),
        })
    };
    // As Alice, under ids Alice might use next: nothing shown, nothing acked.
    for id in [1, 2, u64::MAX] {
        let forged = link
            .seal(&chat("Alice", id, "send me your password"))
            .unwrap();
        bob.handle_datagram(now, addr(4000), &forged);
    }
    // (A mismatch makes Bob check his table with the server: a sync.)
    while let Some(t) = bob.poll_transmit() {
        assert_ne!(t.what, What::ChatAck, "Bob acked a forgery");
        assert_eq!(t.to, s.server_addr);
    }
    assert!(bob.poll_event().is_none(), "Bob showed a forgery");
    // As herself: shown as Carol's, and acked on the same session.
    let own = link.seal(&chat("Carol", 1, "hi, it is Carol")).unwrap();
    bob.handle_datagram(now, addr(4000), &own);
    // The ack waits until the line it promises was taken to be shown,
    // whichever the embedder polls first.
    assert!(bob.poll_transmit().is_none(), "an ack before its line");
    assert!(matches!(
        bob.poll_event(),
        Some(udpchat::Event::Direct { from, text })
            if from == name("Carol") && text.as_str() == "hi, it is Carol"
    ));
    let ack = bob.poll_transmit().expect("an ack");
    assert_eq!(ack.what, What::ChatAck);
    // Alice's real message under the same id is still shown (the forgery
    // took no place in Bob's dedup).
    let a = s.nodes[1].lines.len();
    s.command(0, "send Bob the real one");
    assert_eq!(s.lines_since(1, a), [">>> Alice: the real one"]);
}

/// A NAT rebinding: Alice's datagrams suddenly come from another port. Her
/// session and name stay; the server challenges the new address, moves her
/// there once it answers from it, and everyone's table follows.
#[test]
fn an_address_change_keeps_the_session_once_the_new_address_is_validated() {
    let mut s = three();
    let (b, c) = (s.nodes[1].lines.len(), s.nodes[2].lines.len());
    s.nodes[0].addr = addr(2500);
    let a = s.nodes[0].lines.len();
    s.command(0, "send_all from my new port");
    // The first answer went to the old address; the retry's reached her,
    // after the table change (her own row moved) did.
    assert_eq!(
        s.lines_since(0, a),
        [UPDATED, ">>> [Message received by Server.]"]
    );
    assert_eq!(
        s.count(|p| p.to == addr(2500) && p.is(What::PathChallenge)),
        1
    );
    let alice = s.server.table().lookup(&name("Alice")).unwrap();
    assert_eq!(s.server.table().get(alice).addr, addr(2500));
    assert!(s.server.table().get(alice).online);
    assert_eq!(
        s.lines_since(1, b),
        [">>> [Channel_Message Alice: from my new port]", UPDATED]
    );
    assert_eq!(s.lines_since(2, c)[1], UPDATED);
    for i in [1, 2] {
        let row = s.nodes[i]
            .client
            .table()
            .get(&name("Alice"))
            .unwrap()
            .clone();
        assert_eq!(row.addr, addr(2500), "client {i}'s table");
    }
    // The registry too: a restarted server still knows where she was.
    let stored = udpchat::store::Store::load(&mut s.store).unwrap();
    assert!(
        stored
            .clients
            .iter()
            .any(|c| c.name == name("Alice") && c.addr == addr(2500))
    );
    // And direct messages find her there.
    let a = s.nodes[0].lines.len();
    s.command(1, "send Alice welcome to 2500");
    assert_eq!(s.lines_since(0, a), [">>> Bob: welcome to 2500"]);
}

/// Someone re-sends one of Alice's datagrams from an address of its own
/// before the original arrives: it is served (it is Alice's own request),
/// but the answer goes to Alice's address, the stranger gets only a small
/// challenge it cannot answer, and nothing moves.
#[test]
fn a_datagram_copied_to_another_address_moves_nothing() {
    let mut s = three();
    let to_server = |p: &sim::Packet| p.from == addr(2000) && p.is(What::ChannelSend);
    s.drop_rules.push(drop_first(1, to_server));
    s.line(0, "send_all through a thief");
    let copied = s
        .log
        .iter()
        .rev()
        .find(|p| p.from == addr(2000) && p.is(What::ChannelSend))
        .unwrap()
        .payload
        .clone();
    let thief = addr(6666);
    let server = s.server_addr;
    s.inject(thief, server, copied.clone());
    s.settle();
    let alice = s.server.table().lookup(&name("Alice")).unwrap();
    assert_eq!(s.server.table().get(alice).addr, addr(2000));
    let to_thief = s.bytes_to(thief);
    assert!(
        to_thief <= 3 * copied.len(),
        "{to_thief} bytes to the thief for {}",
        copied.len()
    );
    assert!(s.lines(0).contains(&">>> [Message received by Server.]"));
    assert_eq!(
        s.lines(1)
            .iter()
            .filter(|l| l.contains("through a thief"))
            .count(),
        1
    );
}

/// A host name with several addresses (`localhost`: 127.0.0.1 and ::1):
/// registration tries them in turn, stays with the one that answered, and
/// five silent tries in all — not five each — still mean the server is gone.
#[test]
fn registration_tries_each_server_address_until_one_answers() {
    let mut s = Sim::new();
    let dead: std::net::SocketAddr = "[::1]:1024".parse().unwrap();
    let live = s.server_addr;
    let pin = Some(s.server.public_key());
    let i = s.spawn_configured("Alice", addr(2000), sim::key_of("Alice"), pin, |c| {
        c.server = dead;
        c.alternates = vec![live];
    });
    s.run_until(Duration::from_secs(10), |s| {
        s.nodes[i].client.is_idle() && s.quiet()
    });
    assert_eq!(s.lines(i), [WELCOME, UPDATED]);
    let initials: Vec<_> = s
        .log
        .iter()
        .filter(|p| p.is(What::Initial))
        .map(|p| p.to)
        .collect();
    // The second try reached it (the third carries its cookie back).
    assert_eq!(initials[..2], [dead, live]);
    assert!(initials[2..].iter().all(|to| *to == live), "{initials:?}");
    // From then on everything goes to the address that answered.
    let since = s.log.len();
    s.command(i, "send_all hello");
    s.run_for(Duration::from_secs(40));
    assert!(s.log[since..].iter().all(|p| p.to != dead));
    assert!(s.log[since..].iter().any(|p| p.is(What::Heartbeat)));

    let mut s = Sim::new();
    s.stop_server();
    let other: std::net::SocketAddr = "[::1]:1024".parse().unwrap();
    let t0 = s.now;
    let i = s.spawn_configured("Bob", addr(3000), sim::key_of("Bob"), pin, |c| {
        c.alternates = vec![other];
    });
    s.run_until(Duration::from_secs(20), |s| s.nodes[i].exit.is_some());
    assert_eq!(s.lines(i), [">>> [Server not responding]", ">>> [Exiting]"]);
    assert_eq!(s.count(|p| p.is(What::Initial)), 5);
    assert!(s.now - t0 >= Duration::from_millis(2500));
}

/// Named presence lines follow a table update from a delta: who came
/// online and who went offline (the client itself left out).
#[test]
fn presence_lines_name_who_came_and_went() {
    let mut s = three();
    assert_eq!(
        s.nodes[0].presence,
        [">>> [Bob is online.]", ">>> [Carol is online.]"]
    );
    assert_eq!(s.nodes[2].presence, Vec::<String>::new());
    s.command(1, "dereg Bob");
    s.command(1, "reg Bob");
    let want = [">>> [Bob is offline.]", ">>> [Bob is online.]"];
    assert_eq!(s.nodes[0].presence[2..], want);
    assert_eq!(s.nodes[2].presence, want);
    // Bob's own comings and goings are not told to him.
    assert!(s.nodes[1].presence.iter().all(|l| !l.contains("Bob")));
}

/// A delta with many changes names eight and counts the rest.
#[test]
fn presence_lines_name_eight_clients_a_delta_and_count_the_rest() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    let pin = Some(s.server.public_key());
    let n = 20;
    for k in 0..n {
        let name = format!("c{k}");
        s.spawn_with(&name, 3000 + k, sim::key_of(&name), pin);
    }
    s.settle();
    let mut told = 0;
    for line in &s.nodes[0].presence {
        if line.ends_with(" is online.]") {
            told += 1;
        } else {
            let more: usize = line
                .strip_prefix(">>> [and ")
                .and_then(|l| l.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{line}"));
            told += more;
        }
    }
    assert_eq!(told, n as usize, "{:?}", s.nodes[0].presence);
    assert!(
        s.nodes[0]
            .presence
            .iter()
            .any(|l| l.starts_with(">>> [and ")),
        "the joins came in one delta: {:?}",
        s.nodes[0].presence
    );
}

/// Two messages to Bob in flight at once: each outcome carries the id its
/// send returned, so they can be told apart (a refused command returns why,
/// and sends nothing).
#[test]
fn each_outcome_carries_the_id_its_send_returned() {
    use udpchat::{CommandError, Event};
    let mut s = three();
    let now = s.now;
    let first = s.nodes[0]
        .client
        .send_message(now, &name("Bob"), "one")
        .unwrap();
    let second = s.nodes[0]
        .client
        .send_message(now, &name("Bob"), "two")
        .unwrap();
    let channel = s.nodes[0].client.send_all(now, "to all").unwrap();
    assert_ne!(first, second);
    s.settle();
    let outcomes: Vec<&Event> = s.nodes[0]
        .events
        .iter()
        .filter(|e| matches!(e, Event::ReceivedBy { .. } | Event::ChannelAcked { .. }))
        .collect();
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    for (id, to) in [(first, "Bob"), (second, "Bob")] {
        assert!(
            outcomes.contains(&&Event::ReceivedBy { to: name(to), id }),
            "{outcomes:?}"
        );
    }
    assert!(outcomes.contains(&&Event::ChannelAcked { id: channel }));
    // Refused up front: an error, nothing sent.
    let sent = s.log.len();
    assert_eq!(
        s.nodes[0].client.send_message(now, &name("Nobody"), "hi"),
        Err(CommandError::UnknownClient("Nobody".to_string()))
    );
    assert_eq!(
        s.nodes[0].client.send_all(now, ""),
        Err(CommandError::Empty)
    );
    s.settle();
    assert_eq!(s.log.len(), sent);
}

/// Each deadline says why it is there, and it is the one `poll_timeout`
/// wakes for (at, or just after, a timer cancelled since).
#[test]
fn deadlines_tell_their_reason() {
    let mut s = three();
    // Bob gets no chat and his answers to probes are lost.
    s.drop_rules
        .push(drop_all(|p| p.to == addr(3000) && p.is(What::Chat)));
    s.drop_rules
        .push(drop_all(|p| p.from == addr(3000) && p.is(What::ProbeReply)));
    s.line(0, "send Bob where are you");
    let (at, why) = s.nodes[0].client.poll_deadline().unwrap();
    assert_eq!(why, "direct message: the peer's ack");
    assert!(s.nodes[0].client.poll_timeout().is_some_and(|t| t <= at));
    // Past the ack window: a save, and the server probes Bob.
    s.run_for(Duration::from_millis(510));
    assert_eq!(
        s.nodes[0].client.poll_deadline().map(|d| d.1),
        Some("save: the server's answer")
    );
    assert_eq!(
        s.server.poll_deadline().map(|d| d.1),
        Some("probe: is the client still there")
    );
    s.settle();
    // Nothing under way: the client's next wake-up is its heartbeat.
    assert_eq!(
        s.nodes[0].client.poll_deadline().map(|d| d.1),
        Some("heartbeat: tell the server we are here")
    );
}

/// `quit` right after a send: the message ends first (here Bob is gone, so
/// it is saved for him), then the dereg, then the exit.
#[test]
fn quit_lets_the_messages_in_flight_end_first() {
    let mut s = three();
    s.crash(1);
    let a = s.nodes[0].lines.len();
    s.line(0, "send Bob before I go");
    s.line(0, "quit");
    s.settle();
    assert_eq!(
        s.lines_since(0, a),
        [
            ">>> [No ACK from Bob, message sent to server.]",
            UPDATED,
            SAVED,
            ">>> [You are Offline. Bye.]"
        ]
    );
    assert_eq!(s.nodes[0].exit, Some(0));
    assert_eq!(s.mailbox("Bob").len(), 1);
}
