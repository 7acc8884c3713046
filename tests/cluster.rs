//! Several servers of one cluster on the simulated network: a name's home
//! by rendezvous hashing, redirects to it, and clients that move to the
//! next home by themselves when theirs goes silent. (Each simulated server
//! keeps a store of its own here: these are the routing rules; shared mail
//! is the replicated store's.)

mod sim;

use std::time::Duration;

use sim::{Peer, Sim, addr, key_of, name, server_key};
use udpchat::crypto::Keypair;
use udpchat::store::MemoryStore;
use udpchat::wire::What;
use udpchat::{Server, ServerConfig};

const WELCOME: &str = ">>> [Welcome, You are registered.]";
const RECONNECTED: &str = ">>> [Reconnected to server.]";

/// Nothing passes between the clients at ports `a` and `b` directly:
/// only the servers reach both.
fn cut_direct_path(s: &mut Sim, a: u16, b: u16) {
    let (a, b) = (addr(a), addr(b));
    s.drop_rules.push(sim::drop_all(move |p| {
        (p.from == a && p.to == b) || (p.from == b && p.to == a)
    }));
}

/// Whether `who` is online at the server at `at`.
fn online_at(s: &Sim, at: u16, who: &str) -> bool {
    let server = s.server_at(addr(at));
    let id = server.table().lookup(&name(who));
    id.is_some_and(|id| server.table().get(id).online)
}

/// Starts `who` pointed at the server at `first`, knowing the others of
/// `all` too (the servers of one cluster).
fn spawn_via(s: &mut Sim, who: &str, port: u16, first: u16, all: &[u16]) -> usize {
    let pin = Some(server_key().public());
    let others: Vec<_> = all
        .iter()
        .filter(|&&p| p != first)
        .map(|&p| addr(p))
        .collect();
    s.spawn_configured(who, addr(port), key_of(who), pin, |c| {
        c.server = addr(first);
        c.alternates = others;
        c.failover = true;
    })
}

/// [`spawn_via`], run until it registered somewhere (or exited).
fn join_via(s: &mut Sim, who: &str, port: u16, first: u16, all: &[u16]) -> usize {
    let i = spawn_via(s, who, port, first, all);
    s.run_until(Duration::from_secs(30), |s| {
        s.nodes[i].exit.is_some() || s.lines(i).contains(&WELCOME)
    });
    i
}

#[test]
fn a_registration_at_another_server_is_redirected_to_the_name_s_home() {
    let mut s = Sim::new();
    s.cluster(3);
    let home = addr(1026);
    let who = s.name_homed_at("walker", home);
    // Pointed at the first server only, as `-c` with one address is.
    let i = s.spawn(&who, 2000);
    assert!(s.run_until(Duration::from_secs(10), |s| s.lines(i).contains(&WELCOME)));
    assert!(online_at(&s, 1026, &who), "not registered at its home");
    for other in [1024, 1025] {
        let server = s.server_at(addr(other));
        assert_eq!(server.table().lookup(&name(&who)), None, "a row at {other}");
    }
    assert_eq!(s.server.stats().redirected, 1);
    assert_eq!(s.count(|p| p.is(What::Redirect)), 1);
    // Every server agrees where it lives.
    for at in [1024, 1025, 1026] {
        assert_eq!(s.server_at(addr(at)).home_of(&name(&who)), Some(home));
    }
}

#[test]
fn a_name_homed_at_the_server_it_asks_is_not_redirected() {
    let mut s = Sim::new();
    s.cluster(3);
    let who = s.name_homed_at("stayer", addr(1024));
    let i = s.join(&who, 2000);
    assert!(s.lines(i).contains(&WELCOME));
    assert!(online_at(&s, 1024, &who));
    assert_eq!(s.count(|p| p.is(What::Redirect)), 0);
}

#[test]
fn a_client_whose_server_dies_registers_at_the_next_home_by_itself() {
    let mut s = Sim::new();
    s.cluster(3);
    let all = [1024, 1025, 1026];
    let who = s.name_homed_at("mover", addr(1025));
    let i = join_via(&mut s, &who, 2000, 1025, &all);
    assert!(online_at(&s, 1025, &who));
    // kill -9 of its server; its lease runs out and the others drop it.
    s.stop_server_at(addr(1025));
    s.set_live(&[addr(1024), addr(1026)]);
    let next = s.server.home_of(&name(&who)).unwrap();
    assert_ne!(next, addr(1025));
    // Five unanswered heartbeats, then a registration through the others.
    let back = s.run_until(Duration::from_secs(60), |s| {
        s.lines(i).contains(&RECONNECTED) && s.nodes[i].client.is_idle()
    });
    assert!(back, "{:?}", s.lines(i));
    assert_eq!(s.nodes[i].exit, None);
    assert!(
        online_at(&s, next.port(), &who),
        "not at the new home {next}"
    );
}

#[test]
fn a_save_under_way_when_the_server_dies_goes_again_to_the_next_home() {
    let mut s = Sim::new();
    s.cluster(3);
    let all = [1024, 1025, 1026];
    let who = s.name_homed_at("sender", addr(1025));
    let peer = s.name_homed_at("absent", addr(1025));
    let j = join_via(&mut s, &peer, 2001, 1025, &all);
    s.command(j, &format!("dereg {peer}"));
    let i = join_via(&mut s, &who, 2000, 1025, &all);
    s.settle();
    // The server dies between the line and its save.
    s.stop_server_at(addr(1025));
    s.set_live(&[addr(1024), addr(1026)]);
    let next = s.server.home_of(&name(&who)).unwrap();
    s.line(i, &format!("send {peer} are you there"));
    let answered = s.run_until(Duration::from_secs(60), |s| {
        s.count(|p| p.is(What::SaveMessage) && p.to == next) > 0 && s.nodes[i].client.is_idle()
    });
    assert!(answered, "{:?}", s.lines(i));
    assert_eq!(s.nodes[i].exit, None, "{:?}", s.lines(i));
    assert!(s.lines(i).contains(&RECONNECTED));
    assert!(!s.lines(i).iter().any(|l| l.contains("not responding")));
}

#[test]
fn a_redirect_cannot_hand_a_client_to_a_server_without_the_cluster_key() {
    let mut s = Sim::new();
    s.cluster(2);
    // The host at the second address is not the cluster's: another key.
    let rogue = ServerConfig::new([9; 32], Keypair::from_secret([0x66; 32]), (s.start, 0));
    s.peers[0] = Peer {
        addr: addr(1025),
        server: Server::new(rogue, s.now, Default::default()),
        store: MemoryStore::new(),
        up: true,
    };
    let who = s.name_homed_at("victim", addr(1025));
    let i = s.spawn(&who, 2000);
    s.run_until(Duration::from_secs(60), |s| s.nodes[i].exit.is_some());
    assert_eq!(s.nodes[i].exit, Some(1), "{:?}", s.lines(i));
    assert!(
        s.lines(i).iter().any(|l| l.contains("not connecting")),
        "{:?}",
        s.lines(i)
    );
    let rogue = s.server_at(addr(1025));
    assert_eq!(rogue.table().lookup(&name(&who)), None);
}

#[test]
fn a_redirect_to_a_server_that_died_is_left_once_its_lease_runs_out() {
    let mut s = Sim::new();
    s.cluster(3);
    let who = s.name_homed_at("latecomer", addr(1025));
    // Dead, but its lease has not run out yet: the others still send
    // its names to it.
    s.stop_server_at(addr(1025));
    let i = spawn_via(&mut s, &who, 2000, 1024, &[1024, 1025, 1026]);
    s.run_for(Duration::from_secs(4));
    assert!(s.count(|p| p.is(What::Redirect)) >= 1);
    assert!(!s.lines(i).contains(&WELCOME));
    s.set_live(&[addr(1024), addr(1026)]);
    let next = s.server.home_of(&name(&who)).unwrap();
    let welcomed = s.run_until(Duration::from_secs(60), |s| s.lines(i).contains(&WELCOME));
    assert!(welcomed, "{:?}", s.lines(i));
    assert!(online_at(&s, next.port(), &who));
}

#[test]
fn a_client_whose_servers_all_stay_silent_gives_up_in_bounded_time() {
    let mut s = Sim::new();
    s.cluster(3);
    let who = s.name_homed_at("alone", addr(1025));
    s.stop_server_at(addr(1025));
    let i = spawn_via(&mut s, &who, 2000, 1024, &[1024, 1025, 1026]);
    // The live servers keep sending it to the dead one, round after round.
    let ended = s.run_until(Duration::from_secs(120), |s| s.nodes[i].exit.is_some());
    assert!(ended, "{:?}", s.lines(i));
    assert_eq!(s.nodes[i].exit, Some(1));
    assert!(s.lines(i).contains(&">>> [Server not responding]"));
    // Four rounds of five tries, and the redirects they were given.
    let handshakes = s.count(|p| p.is(What::Initial) && p.from == addr(2000));
    assert!(handshakes <= 40, "{handshakes} handshakes");
}

// ---- one shared store: mail, channel and table across servers ----------

/// Three servers on one store, and `names[i]` homed at server `homes[i]`,
/// each started pointed at the first server (redirected to its home).
fn shared(names: &[&str], homes: &[u16]) -> (Sim, Vec<String>, Vec<usize>) {
    let mut s = Sim::new();
    s.shared_cluster(3);
    let mut who = Vec::new();
    let mut nodes = Vec::new();
    for (i, (prefix, home)) in names.iter().zip(homes).enumerate() {
        let n = s.name_homed_at(prefix, addr(*home));
        nodes.push(join_via(
            &mut s,
            &n,
            2000 + i as u16,
            1024,
            &[1024, 1025, 1026],
        ));
        who.push(n);
    }
    s.settle();
    (s, who, nodes)
}

/// A shared cluster of `n` servers, each config changed by `tweak`, and a
/// client per `(name prefix, home, port)` logged in at its home in that
/// order: the cluster, the names and the clients' nodes.
fn homed<const K: usize>(
    n: u16,
    tweak: impl Fn(&mut ServerConfig),
    clients: [(&str, u16, u16); K],
) -> (Sim, [String; K], [usize; K]) {
    let mut s = Sim::new();
    s.shared_cluster_with(n, tweak);
    let all: Vec<u16> = (1024..1024 + n).collect();
    let names = clients.map(|(prefix, home, _)| s.name_homed_at(prefix, addr(home)));
    let mut nodes = [0; K];
    for (i, (_, home, port)) in clients.into_iter().enumerate() {
        nodes[i] = join_via(&mut s, &names[i], port, home, &all);
    }
    s.settle();
    (s, names, nodes)
}

#[test]
fn clients_homed_on_different_servers_see_one_table_and_chat_directly() {
    let (mut s, who, n) = shared(&["ann", "ben", "cal"], &[1024, 1025, 1026]);
    for (i, name) in who.iter().enumerate() {
        let home = 1024 + i as u16;
        assert!(online_at(&s, home, name), "{name} not at {home}");
    }
    for &i in &n {
        let rows = s.nodes[i].client.table().len();
        assert_eq!(rows, 3, "{:?}", s.lines(i));
    }
    // Every server shows every client online, wherever it is served.
    for at in [1024, 1025, 1026] {
        for name in &who {
            assert!(online_at(&s, at, name), "{name} offline at {at}");
        }
    }
    let from = s.nodes[n[2]].lines.len();
    s.command(n[0], &format!("send {} across the cluster", who[2]));
    let shown = format!(">>> {}: across the cluster", who[0]);
    assert_eq!(s.lines_since(n[2], from), [shown.as_str()]);
    let received = format!(">>> [Message received by {}.]", who[2]);
    assert_eq!(s.lines(n[0]).last(), Some(&received.as_str()));
}

#[test]
fn a_message_saved_at_one_server_is_delivered_by_the_recipient_s_home() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1024, 1026]);
    s.command(n[1], &format!("dereg {}", who[1]));
    // Every server hears it left.
    for at in [1024, 1025, 1026] {
        assert!(!online_at(&s, at, &who[1]), "still online at {at}");
    }
    s.command(n[0], &format!("send {} while you were out", who[1]));
    let offline = format!(">>> [{} is offline, message sent to server.]", who[1]);
    let lines = s.lines(n[0]);
    assert_eq!(
        lines[lines.len() - 2..],
        [
            offline.as_str(),
            ">>> [Messages received by the server and saved]"
        ]
    );
    let from = s.nodes[n[1]].lines.len();
    s.command(n[1], &format!("reg {}", who[1]));
    let shown: Vec<_> = (s.lines_since(n[1], from).into_iter())
        .filter(|l| l.contains("while you were out"))
        .map(str::to_string)
        .collect();
    assert_eq!(shown, [format!(">>> {}: T+0 while you were out", who[0])]);
    assert!(online_at(&s, 1026, &who[1]));
    // Acked at its home, gone from every server's copy and the store.
    assert_eq!(s.store.len(), 0);
    for at in [1024, 1025, 1026] {
        let server = s.server_at(addr(at));
        assert_eq!(server.mailbox(&name(&who[1])).count(), 0, "at {at}");
    }
}

#[test]
fn a_save_for_a_client_online_elsewhere_is_delivered_there_at_once() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1024, 1026]);
    // No direct path between them: only the servers reach both.
    cut_direct_path(&mut s, 2000, 2001);
    let from = s.nodes[n[1]].lines.len();
    s.command(n[0], &format!("send {} through the store", who[1]));
    let shown: Vec<_> = (s.lines_since(n[1], from).into_iter())
        .filter(|l| l.contains("through the store"))
        .map(str::to_string)
        .collect();
    assert_eq!(shown.len(), 1, "{:?}", s.lines(n[1]));
    assert!(
        s.lines(n[0])
            .contains(&">>> [Messages received by the server and saved]")
    );
    assert_eq!(s.store.len(), 0, "not acked at its home");
}

#[test]
fn a_channel_message_reaches_the_clients_of_every_server_once() {
    let (mut s, who, n) = shared(&["ann", "ben", "cal", "dan"], &[1024, 1025, 1026, 1026]);
    s.command(n[3], &format!("dereg {}", who[3]));
    s.command(n[0], "send_all hello everyone");
    let line = format!(">>> [Channel_Message {}: hello everyone]", who[0]);
    for &i in &n[1..3] {
        let got = s.lines(i).iter().filter(|l| **l == line).count();
        assert_eq!(got, 1, "{:?}", s.lines(i));
    }
    // The one offline gets its stored copy when it logs back in.
    s.command(n[3], &format!("reg {}", who[3]));
    let stored = s
        .lines(n[3])
        .iter()
        .filter(|l| l.contains("hello everyone"))
        .count();
    assert_eq!(stored, 1, "{:?}", s.lines(n[3]));
    assert_eq!(s.store.len(), 0);
}

#[test]
fn a_killed_server_s_client_gets_its_mail_once_at_the_next_home() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1024, 1025]);
    s.stop_server_at(addr(1025));
    s.set_live(&[addr(1024), addr(1026)]);
    assert!(!online_at(&s, 1024, &who[1]), "its server's lease ran out");
    // Its client is alive, but nothing reaches it directly now.
    let (a, b) = (addr(2000), addr(2001));
    s.drop_rules
        .push(sim::drop_first(1000, move |p| p.from == a && p.to == b));
    s.line(n[0], &format!("send {} are you still there", who[1]));
    let next = s.server.home_of(&name(&who[1])).unwrap();
    let done = s.run_until(Duration::from_secs(60), |s| {
        s.lines(n[1])
            .iter()
            .any(|l| l.contains("are you still there"))
            && s.nodes[n[1]].client.is_idle()
            && s.quiet()
    });
    assert!(done, "{:?}", s.lines(n[1]));
    assert!(online_at(&s, next.port(), &who[1]));
    s.settle();
    let shown = s
        .lines(n[1])
        .iter()
        .filter(|l| l.contains("are you still there"))
        .count();
    assert_eq!(shown, 1, "{:?}", s.lines(n[1]));
    assert_eq!(s.store.len(), 0);
}

#[test]
fn a_server_back_from_a_stall_announces_its_clients_again() {
    let (mut s, who, _) = shared(&["ann", "ben"], &[1024, 1025]);
    let all = [addr(1024), addr(1025), addr(1026)];
    let others = [addr(1024), addr(1026)];
    // The second server stalls past its lease: the others drop it, and
    // take its client for offline.
    s.server.set_servers(addr(1024), &others);
    s.peers[1].server.set_servers(addr(1026), &others);
    s.run_for(Duration::from_secs(1));
    assert!(!online_at(&s, 1024, &who[1]));
    // It renews again, finds its lease had run out, and says so.
    s.set_live(&all);
    assert!(
        !online_at(&s, 1026, &who[1]),
        "live again is not online again"
    );
    s.peers[0].server.republish_presence();
    s.drain_servers();
    s.run_for(Duration::from_secs(1));
    for at in [1024, 1026] {
        assert!(online_at(&s, at, &who[1]), "{} offline at {at}", who[1]);
    }
}

/// Messages typed while the client fails over (its home killed, the lease
/// not yet run out) each end in an answer from the next server: none ends
/// the client, none is dropped.
#[test]
fn a_message_falling_back_during_a_failover_waits_for_the_next_server() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1025, 1024]);
    let (ann, ben) = (n[0], n[1]);
    // No direct path between them: every message falls back to a server.
    cut_direct_path(&mut s, 2000, 2001);
    // kill -9 of ann's home; its lease (6 s) has not run out yet.
    s.stop_server_at(addr(1025));
    let mut sent = 0;
    // The user keeps typing while the client notices the silence.
    while s.nodes[ann].client.is_online() && sent < 100 {
        s.line(ann, &format!("send {} m{sent}", who[1]));
        sent += 1;
        s.run_for(Duration::from_millis(100));
    }
    assert!(!s.nodes[ann].client.is_online(), "never failed over");
    // Still roaming (the others send it to the dead home) for the rest of
    // the lease; then the lease runs out.
    s.run_for(Duration::from_secs(5));
    s.set_live(&[addr(1024), addr(1026)]);
    s.run_until(Duration::from_secs(60), |s| {
        s.nodes[ann].exit.is_some() || (s.nodes[ann].client.is_idle() && s.quiet())
    });
    assert_eq!(s.nodes[ann].exit, None, "{:?}", s.lines(ann));
    let lines = s.lines(ann);
    let answered = (lines.iter())
        .filter(|l| l.contains("received by the server and saved") || l.contains("received by ben"))
        .count();
    assert_eq!(answered, sent, "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("Error")), "{lines:#?}");
    // Each shown to ben once.
    for i in 0..sent {
        let text = format!("m{i}");
        let shown = (s.lines(ben).iter())
            .filter(|l| l.ends_with(&format!(" {text}")))
            .count();
        assert_eq!(shown, 1, "{text}: {:#?}", s.lines(ben));
    }
}

/// The same with one message only, no direct attempt under way when the
/// failover starts.
#[test]
fn one_message_during_a_failover_is_sent_again_to_the_next_server() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1025, 1024]);
    let ann = n[0];
    cut_direct_path(&mut s, 2000, 2001);
    s.stop_server_at(addr(1025));
    s.line(ann, &format!("send {} only", who[1]));
    s.run_until(Duration::from_secs(30), |s| {
        !s.nodes[ann].client.is_online()
    });
    s.run_for(Duration::from_secs(5));
    s.set_live(&[addr(1024), addr(1026)]);
    s.run_until(Duration::from_secs(60), |s| {
        s.nodes[ann].exit.is_some() || (s.nodes[ann].client.is_idle() && s.quiet())
    });
    assert_eq!(s.nodes[ann].exit, None, "{:?}", s.lines(ann));
    let got = s.lines(n[1]).iter().filter(|l| l.contains("only")).count();
    assert_eq!(got, 1, "{:?}", s.lines(n[1]));
}

/// A server of the cluster whose config differs (`tweak`), as the peer at
/// `port`, live with the others.
fn replace_peer(s: &mut Sim, port: u16, tweak: impl FnOnce(&mut ServerConfig)) {
    let mut c = ServerConfig::new([port as u8; 32], server_key(), (s.start, sim::EPOCH_UNIX));
    c.instance = Some(port - 1024);
    tweak(&mut c);
    let i = s.peers.iter().position(|p| p.addr == addr(port)).unwrap();
    s.peers[i].server = Server::new(c, s.now, Default::default());
    let live: Vec<_> = (1024..1027).map(addr).collect();
    s.set_live(&live);
}

#[test]
fn a_server_that_cannot_read_the_cluster_s_mail_never_deletes_it() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1024, 1025]);
    s.command(n[1], &format!("dereg {}", who[1]));
    // A third server started with a fresh data dir: a server.key of its own
    // (the README's `cp server.key` step forgotten).
    replace_peer(&mut s, 1026, |c| {
        *c = ServerConfig::new(
            [9; 32],
            Keypair::from_secret([0x66; 32]),
            (c.clock.0, c.clock.1),
        );
        c.instance = Some(2);
    });
    s.command(n[0], "send_all hello everyone");
    assert!(s.lines(n[0]).contains(&">>> [Message received by Server.]"));
    s.command(n[1], &format!("reg {}", who[1]));
    let got = s
        .lines(n[1])
        .iter()
        .filter(|l| l.contains("hello everyone"))
        .count();
    assert_eq!(
        got,
        1,
        "ben never gets the channel message: {:?}",
        s.lines(n[1])
    );
}

#[test]
fn a_server_that_does_not_know_a_sender_leaves_its_mail_to_the_home() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1024, 1025]);
    s.command(n[1], &format!("dereg {}", who[1]));
    // The third server's table has room for the two names it knows only
    // (a smaller --max-clients, or one filled by names of its own).
    replace_peer(&mut s, 1026, |c| c.max_clients = 2);
    for (i, w) in who.iter().enumerate() {
        let k = key_of(w);
        s.peers[1].server.handle_remote(
            s.now,
            vec![udpchat::Remote::Client(udpchat::store::ClientRecord {
                name: name(w),
                addr: addr(2000 + i as u16),
                key: Some(k.public()),
                seen_at: None,
            })],
        );
    }
    // A newcomer at the first server: the third has no row for it.
    let cal = s.name_homed_at("cal", addr(1024));
    let c = join_via(&mut s, &cal, 2005, 1024, &[1024, 1025, 1026]);
    s.settle();
    s.command(c, &format!("send {} are you there", who[1]));
    assert!(
        s.lines(c)
            .iter()
            .any(|l| l.contains("received by the server and saved")),
        "{:?}",
        s.lines(c)
    );
    s.command(n[1], &format!("reg {}", who[1]));
    let got = s
        .lines(n[1])
        .iter()
        .filter(|l| l.contains("are you there"))
        .count();
    assert_eq!(got, 1, "saved, then lost: {:?}", s.lines(n[1]));
}

/// (Attacker racing the owner while two servers both take themselves for
/// a new name's home, their leases disagreeing for a moment.) The store
/// keeps the first key committed; the server that bound the other one
/// gives the name up, and the squatter is refused from then on.
#[test]
fn a_name_claimed_at_two_servers_at_once_stays_with_the_key_the_store_kept() {
    let mut s = Sim::new();
    s.shared_cluster(2);
    s.server.set_servers(addr(1024), &[addr(1024)]);
    s.peers[0].server.set_servers(addr(1025), &[addr(1025)]);
    s.feed_held = true;
    let pin = Some(server_key().public());
    let owner = s.spawn_configured("dup", addr(2000), key_of("dup"), pin, |c| {
        c.server = addr(1024);
    });
    assert!(s.run_until(Duration::from_secs(10), |s| {
        s.lines(owner).contains(&WELCOME)
    }));
    let other = Keypair::from_secret([0x77; 32]);
    let squatter = s.spawn_configured("dup", addr(2001), other, pin, |c| {
        c.server = addr(1025);
    });
    assert!(s.run_until(Duration::from_secs(10), |s| {
        s.lines(squatter).contains(&WELCOME)
    }));
    // They hear of each other.
    s.feed_held = false;
    s.drain_servers();
    s.set_live(&[addr(1024), addr(1025)]);
    s.run_until(Duration::from_secs(60), |s| {
        s.nodes[squatter].exit.is_some()
    });
    assert_eq!(s.nodes[squatter].exit, Some(1), "{:?}", s.lines(squatter));
    for at in [1024, 1025] {
        let server = s.server_at(addr(at));
        let id = server.table().lookup(&name("dup")).unwrap();
        assert_eq!(
            server.table().get(id).key,
            key_of("dup").public(),
            "at {at}"
        );
    }
    assert_eq!(s.nodes[owner].exit, None, "{:?}", s.lines(owner));
}

// ---- random runs: every promise kept across servers ---------------------

/// splitmix64, for the random runs.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// What client node `i` showed of messages: every text, as often as shown.
fn shown_texts(s: &Sim, i: usize) -> Vec<String> {
    (s.nodes[i].events.iter())
        .filter_map(|e| match e {
            udpchat::Event::Direct { text, .. }
            | udpchat::Event::Stored { text, .. }
            | udpchat::Event::Channel { text, .. } => Some(text.to_string()),
            _ => None,
        })
        .collect()
}

/// Outcome events of node `i`'s sends so far: (promised, ended).
fn outcomes(s: &Sim, i: usize) -> (usize, usize) {
    let (mut promised, mut ended) = (0, 0);
    for e in &s.nodes[i].events {
        match e {
            udpchat::Event::ReceivedBy { .. }
            | udpchat::Event::Saved { .. }
            | udpchat::Event::ChannelAcked { .. } => {
                promised += 1;
                ended += 1;
            }
            udpchat::Event::Refused { .. }
            | udpchat::Event::MailboxFull { .. }
            | udpchat::Event::Error(_)
            | udpchat::Event::ChannelNotResponding { .. }
            | udpchat::Event::ServerNotResponding => ended += 1,
            _ => {}
        }
    }
    (promised, ended)
}

/// One random run: five clients on three servers sharing a store, 3 %
/// loss, the feed held back now and then (servers that have not read it
/// yet), direct and channel messages one at a time per sender, deregs and
/// log-backs,
/// and one server killed at a random moment, its lease running out a
/// random while later. Every message its sender was told was received or
/// saved is shown to its recipient, and none twice to one process.
fn random_run(seed: u64) -> (usize, usize, usize) {
    let mut rng = Rng(seed);
    let mut s = Sim::new();
    // Small mailboxes: some fill up, through several servers at once.
    s.shared_cluster_with(3, |c| c.mailbox_messages = 2);
    let mut loss = Rng(seed ^ 0x5eed);
    s.drop_rules.push(Box::new(move |_| loss.below(100) < 3));
    let all = [1024u16, 1025, 1026];
    let names: Vec<String> = (0..5).map(|i| format!("r{seed}c{i}")).collect();
    let mut nodes: Vec<Vec<usize>> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let first = all[rng.below(3) as usize];
        nodes.push(vec![join_via(&mut s, n, 2000 + i as u16, first, &all)]);
    }
    s.settle();
    let mut killed: Option<u16> = None;
    let mut lease_due: Option<std::time::Instant> = None;
    // (sender name index, recipient name index, text, promised): a
    // channel message once per other client.
    let mut sent: Vec<(usize, usize, String, bool)> = Vec::new();
    for step in 0..30 {
        if let Some(due) = lease_due
            && s.now >= due
        {
            let live: Vec<_> = all
                .iter()
                .filter(|&&p| Some(p) != killed)
                .map(|&p| addr(p))
                .collect();
            s.set_live(&live);
            lease_due = None;
        }
        s.feed_held = rng.below(4) == 0;
        let a = rng.below(5) as usize;
        let node = *nodes[a].last().unwrap();
        if s.nodes[node].exit.is_some() {
            continue;
        }
        match rng.below(10) {
            0..=6 if s.nodes[node].client.is_online() => {
                let b = (a + 1 + rng.below(4) as usize) % 5;
                let text = format!("s{seed}n{step}");
                let before = outcomes(&s, node);
                s.line(node, &format!("send {} {text}", names[b]));
                s.run_until(Duration::from_secs(30), |s| {
                    outcomes(s, node).1 > before.1 || s.nodes[node].exit.is_some()
                });
                let promised = outcomes(&s, node).0 > before.0;
                sent.push((a, b, text, promised));
            }
            7 if s.nodes[node].client.is_online() && rng.below(2) == 0 => {
                s.line(node, &format!("dereg {}", names[a]));
            }
            7 if s.nodes[node].client.is_online() => {
                let text = format!("s{seed}all{step}");
                let before = outcomes(&s, node);
                let logged = (s.events.len(), s.peer_events.len());
                s.line(node, &format!("send_all {text}"));
                s.run_until(Duration::from_secs(30), |s| {
                    outcomes(s, node).1 > before.1 || s.nodes[node].exit.is_some()
                });
                let promised = outcomes(&s, node).0 > before.0;
                // A recipient whose mailbox was full (its server logged
                // it) is not owed the message.
                let missed: Vec<String> = (s.events[logged.0..].iter())
                    .chain(&s.peer_events[logged.1..])
                    .filter_map(|e| match e {
                        udpchat::ServerEvent::MailboxFull { to, from, .. }
                            if from.as_str() == names[a] =>
                        {
                            Some(to.as_str().to_string())
                        }
                        _ => None,
                    })
                    .collect();
                for b in (0..5).filter(|&b| b != a) {
                    let owed = promised && !missed.contains(&names[b]);
                    sent.push((a, b, text.clone(), owed));
                }
            }
            8 if !s.nodes[node].client.is_online() => {
                s.line(node, &format!("reg {}", names[a]));
            }
            9 if killed.is_none() => {
                let victim = all[rng.below(3) as usize];
                s.stop_server_at(addr(victim));
                killed = Some(victim);
                lease_due = Some(s.now + Duration::from_millis(rng.below(8000)));
            }
            _ => {}
        }
        s.run_for(Duration::from_millis(rng.below(1500)));
    }
    // The lease runs out, the feed flows, everyone logs back in (a client
    // that gave up starts again, same name and key).
    s.feed_held = false;
    let live: Vec<_> = all
        .iter()
        .filter(|&&p| Some(p) != killed)
        .map(|&p| addr(p))
        .collect();
    s.set_live(&live);
    s.drain_servers();
    s.run_for(Duration::from_secs(10));
    let first = live[0].port();
    for (i, n) in names.iter().enumerate() {
        let node = *nodes[i].last().unwrap();
        if s.nodes[node].exit.is_some() {
            let ports: Vec<u16> = live.iter().map(|a| a.port()).collect();
            nodes[i].push(join_via(&mut s, n, 3000 + i as u16, first, &ports));
        } else if !s.nodes[node].client.is_online() {
            s.line(node, &format!("reg {n}"));
        }
    }
    s.run_until(Duration::from_secs(120), |s| {
        s.quiet()
            && s.nodes
                .iter()
                .all(|n| !n.alive || n.exit.is_some() || n.client.is_idle())
    });
    s.run_for(Duration::from_secs(30));
    for (a, b, text, promised) in &sent {
        // Never twice to one process. A process that showed it and died
        // before its ack was committed leaves it for the next one: shown
        // once by each, as on one server.
        let per_process: Vec<usize> = (nodes[*b].iter())
            .map(|&i| shown_texts(&s, i).iter().filter(|t| *t == text).count())
            .collect();
        assert!(
            per_process.iter().all(|&n| n <= 1),
            "seed {seed}: {text} from {} shown {per_process:?} times to {}",
            names[*a],
            names[*b]
        );
        if *promised {
            let lines: Vec<_> = nodes[*b].iter().map(|&i| s.lines(i)).collect();
            assert!(
                per_process.iter().sum::<usize>() >= 1,
                "seed {seed}: {text} from {} promised, never shown to {}: {lines:#?}",
                names[*a],
                names[*b]
            );
        }
    }
    (
        sent.len(),
        sent.iter().filter(|m| m.3).count(),
        s.refused_full,
    )
}

#[test]
fn random_runs_keep_every_promise_across_servers() {
    let first: u64 = std::env::var("UDPCHAT_CLUSTER_FIRST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let seeds: u64 = std::env::var("UDPCHAT_CLUSTER_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let (mut sent, mut promised, mut full) = (0, 0, 0);
    for seed in first..first + seeds {
        let (n, p, f) = random_run(seed);
        sent += n;
        promised += p;
        full += f;
    }
    // The runs do something: most messages get an answer.
    eprintln!(
        "{seeds} runs from {first}: {sent} sent, {promised} received or saved, \
         {full} copies refused by the store for a full mailbox"
    );
    assert!(promised * 2 > sent, "{promised} of {sent}");
}

/// The same message stored through two servers: its server died after
/// committing it but before the "saved" reached the sender, which sent it
/// again through the next server before that one had read the feed. The
/// store keeps the first copy; the second server holds that one instead of
/// its own, and the recipient is shown the message once.
#[test]
fn a_message_saved_again_through_another_server_is_held_as_the_store_kept_it() {
    let mut s = Sim::new();
    s.shared_cluster(2);
    let all = [1024, 1025];
    let sender = s.name_homed_at("sender", addr(1024));
    let rcpt = s.name_homed_at("rcpt", addr(1025));
    let r = join_via(&mut s, &rcpt, 2001, 1025, &all);
    s.command(r, &format!("dereg {rcpt}"));
    let i = join_via(&mut s, &sender, 2000, 1024, &all);
    s.settle();
    // The first server commits the save; its "saved" never leaves.
    let from = addr(1024);
    s.drop_rules
        .push(sim::drop_all(move |p| p.from == from && p.to == addr(2000)));
    s.feed_held = true;
    s.line(i, &format!("send {rcpt} said once"));
    s.run_until(Duration::from_secs(5), |s| s.store.len() == 1);
    assert_eq!(s.store.len(), 1);
    s.stop_server_at(addr(1024));
    s.set_live(&[addr(1025)]);
    // Five silent tries, a failover, the same message again (same id).
    let saved = s.run_until(Duration::from_secs(60), |s| {
        s.lines(i)
            .contains(&">>> [Messages received by the server and saved]")
    });
    assert!(saved, "{:?}", s.lines(i));
    assert_eq!(s.store.len(), 1, "stored once");
    s.feed_held = false;
    s.drain_servers();
    s.command(r, &format!("reg {rcpt}"));
    s.settle();
    let shown = s
        .lines(r)
        .iter()
        .filter(|l| l.ends_with("said once"))
        .count();
    assert_eq!(shown, 1, "{:?}", s.lines(r));
    assert_eq!(s.store.len(), 0, "acked: nothing left");
}

// ---- mailboxes held where they are needed ------------------------------

/// Each server holds only the mailboxes it needs: the recipient's home,
/// and the server a message for it was saved through (it fetched the
/// mailbox to save into). A server that never needed it holds none of
/// the store's mail; the sender's server lets go of it once the
/// recipient is served at its home again.
#[test]
fn a_server_holds_only_the_mailboxes_it_needs() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1024, 1026]);
    s.command(n[1], &format!("dereg {}", who[1]));
    s.command(n[0], &format!("send {} held where needed", who[1]));
    assert!(
        s.lines(n[0])
            .contains(&">>> [Messages received by the server and saved]")
    );
    s.settle();
    assert_eq!(s.store.len(), 1);
    let held = |s: &Sim, at: u16| s.server_at(addr(at)).mailbox(&name(&who[1])).count();
    assert_eq!(held(&s, 1024), 1, "fetched to save into");
    assert_eq!(held(&s, 1026), 1, "its home, from the feed");
    assert_eq!(held(&s, 1025), 0, "never needed it");
    assert_eq!(s.server_at(addr(1025)).stored_bytes(), 0);
    // Its home's deliveries are lost on the way: the message stays
    // unacked while the recipient is online at its home.
    let (home, rcpt) = (addr(1026), addr(2001));
    s.drop_rules.push(sim::drop_all(move |p| {
        p.from == home && p.to == rcpt && p.is(What::Deliver)
    }));
    s.line(n[1], &format!("reg {}", who[1]));
    let served = s.run_until(Duration::from_secs(10), |s| {
        online_at(s, 1026, &who[1]) && online_at(s, 1024, &who[1])
    });
    assert!(served, "{:?}", s.lines(n[1]));
    assert_eq!(held(&s, 1026), 1, "not acked yet");
    assert_eq!(held(&s, 1024), 0, "let go once served at its home");
    s.drop_rules.clear();
    let shown = s.run_until(Duration::from_secs(30), |s| {
        s.lines(n[1])
            .iter()
            .any(|l| l.ends_with("held where needed"))
    });
    assert!(shown, "{:?}", s.lines(n[1]));
    s.settle();
    assert_eq!(s.store.len(), 0);
}

/// A message saved through another server while the feed is behind (the
/// home has not read it yet) is in the mailbox the recipient is welcomed
/// with: its home fetches the mailbox from the store for each
/// registration, so it is announced ([You Have Messages]) and comes in
/// the welcome's batch, once.
#[test]
fn a_message_the_home_has_not_read_from_the_feed_is_in_the_welcome() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1024, 1026]);
    s.command(n[1], &format!("dereg {}", who[1]));
    s.feed_held = true;
    s.command(n[0], &format!("send {} ahead of the feed", who[1]));
    assert!(
        s.lines(n[0])
            .contains(&">>> [Messages received by the server and saved]")
    );
    assert_eq!(s.store.len(), 1);
    assert_eq!(
        s.server_at(addr(1026)).mailbox(&name(&who[1])).count(),
        0,
        "the home has not read the feed"
    );
    let from = s.nodes[n[1]].lines.len();
    s.command(n[1], &format!("reg {}", who[1]));
    let lines = s.lines_since(n[1], from);
    let have = lines
        .iter()
        .position(|l| l.ends_with("[You Have Messages]"));
    let text = lines.iter().position(|l| l.ends_with("ahead of the feed"));
    assert!(
        matches!((have, text), (Some(h), Some(t)) if h < t),
        "{lines:?}"
    );
    s.feed_held = false;
    s.drain_servers();
    s.settle();
    let shown = (s.lines(n[1]).iter())
        .filter(|l| l.ends_with("ahead of the feed"))
        .count();
    assert_eq!(shown, 1, "{:?}", s.lines(n[1]));
    assert_eq!(s.store.len(), 0);
}

/// A save through a server that does not hold the recipient's mailbox
/// waits for it, so the mailbox's limit holds across servers: the
/// messages stored through the recipient's home count.
#[test]
fn a_mailbox_s_limit_counts_what_other_servers_stored() {
    let mut s = Sim::new();
    s.shared_cluster_with(3, |c| c.mailbox_messages = 2);
    let all = [1024, 1025, 1026];
    let homes = [1024, 1025, 1026];
    let names: Vec<String> = ["ann", "ben", "cat"]
        .iter()
        .zip(homes)
        .map(|(p, h)| s.name_homed_at(p, addr(h)))
        .collect();
    let n: Vec<usize> = (names.iter().enumerate())
        .map(|(i, who)| join_via(&mut s, who, 2000 + i as u16, homes[i], &all))
        .collect();
    s.settle();
    s.command(n[2], &format!("dereg {}", names[2]));
    // Two through its home's neighbours: the mailbox is full.
    s.command(n[1], &format!("send {} first", names[2]));
    s.command(n[1], &format!("send {} second", names[2]));
    s.settle();
    assert_eq!(s.store.len(), 2);
    // A third through a server that has not held the mailbox before.
    assert_eq!(s.server_at(addr(1024)).mailbox(&name(&names[2])).count(), 0);
    s.command(n[0], &format!("send {} third", names[2]));
    s.settle();
    assert_eq!(s.store.len(), 2, "{:?}", s.lines(n[0]));
    let full = (s.lines(n[0]).iter()).any(|l| l.contains("mailbox") && l.contains("full"));
    assert!(full, "{:?}", s.lines(n[0]));
}

/// A mailbox that cannot be fetched (the database out of reach for
/// reads): a save waiting for it is refused, said so, and nothing is
/// stored; a registration waiting for it gets no answer, and its client's
/// next try asks the store again. Once the store answers, both go
/// through.
#[test]
fn a_mailbox_the_store_cannot_give_refuses_the_save_and_holds_the_registration() {
    let (mut s, who, n) = shared(&["ann", "ben"], &[1024, 1026]);
    s.command(n[1], &format!("dereg {}", who[1]));
    s.mailboxes_fail = true;
    s.command(n[0], &format!("send {} not yet", who[1]));
    let refused = (s.lines(n[0]).iter()).any(|l| l.contains("store is busy"));
    assert!(refused, "{:?}", s.lines(n[0]));
    assert_eq!(s.store.len(), 0);
    // Its sender logs back in meanwhile: the registration waits.
    s.command(n[0], &format!("dereg {}", who[0]));
    let welcome = |s: &Sim| s.count(|p| p.is(What::Welcome) && p.to == addr(2000));
    let before = welcome(&s);
    s.line(n[0], &format!("reg {}", who[0]));
    s.run_for(Duration::from_millis(700));
    assert_eq!(welcome(&s), before, "welcomed without its mailbox");
    assert!(!online_at(&s, 1024, &who[0]));
    s.mailboxes_fail = false;
    let back = s.run_until(Duration::from_secs(30), |s| online_at(s, 1024, &who[0]));
    assert!(back, "{:?}", s.lines(n[0]));
    assert_eq!(welcome(&s), before + 1);
    s.settle();
    s.command(n[0], &format!("send {} now", who[1]));
    assert!(
        s.lines(n[0])
            .contains(&">>> [Messages received by the server and saved]")
    );
    assert_eq!(s.store.len(), 1);
}

// ---- found by review ---------------------------------------------------

/// A channel message still waiting for its commit (the store thread takes
/// one batch at a time) when a recipient's registration fetches its
/// mailbox: the fetch reads the store before the message is in it, and a
/// server's own commits never come back through the feed. The mailbox is
/// fetched once more after that commit, and the recipient, online here by
/// then, gets the message during its session, once. (Found by review.)
#[test]
fn a_channel_message_waiting_for_its_commit_reaches_a_client_registering_meanwhile() {
    let mut s = Sim::new();
    s.shared_cluster(2);
    let all = [1024, 1025];
    let ann = s.name_homed_at("ann", addr(1024));
    let ben = s.name_homed_at("ben", addr(1025));
    let a = join_via(&mut s, &ann, 2000, 1024, &all);
    let b = join_via(&mut s, &ben, 2001, 1025, &all);
    s.settle();
    // ben's server dies; its lease runs out: ben's home is the first
    // server now, which never held ben's mailbox.
    s.crash(b);
    s.stop_server_at(addr(1025));
    s.set_live(&[addr(1024)]);
    s.settle();
    // ben starts again there; its first registration is lost, so the
    // retry comes while ann's channel message waits for its commit.
    let me = addr(2002);
    // (The registration rides in the handshake's third message.)
    s.drop_rules.push(sim::drop_first(1, move |p| {
        p.is(What::Finish) && p.from == me
    }));
    let b2 = spawn_via(&mut s, &ben, 2002, 1024, &[1024]);
    let regs = |s: &Sim| s.count(|p| p.is(What::Finish) && p.from == me);
    assert!(s.run_until(Duration::from_secs(10), |s| regs(s) >= 1));
    s.hold = true;
    s.line(a, "send_all while you log in");
    assert!(s.run_until(Duration::from_secs(10), |s| regs(s) >= 2));
    s.run_for(Duration::from_millis(20));
    s.release(None);
    s.settle();
    assert!(
        s.lines(a).contains(&">>> [Message received by Server.]"),
        "{:?}",
        s.lines(a)
    );
    assert!(online_at(&s, 1024, &ben), "{:?}", s.lines(b2));
    let shown = (s.lines(b2).iter())
        .filter(|l| l.contains("while you log in"))
        .count();
    assert_eq!(shown, 1, "{:?}", s.lines(b2));
    assert_eq!(s.store.len(), 0, "acked");
}

/// Channel messages for a recipient whose mailbox the sending server does
/// not hold keep that mailbox's limit all the same: the server counts what
/// waits there (from the feed, and its own copies), so one sender cannot
/// fill the shared store, nor the mailbox its home fetches. (Found by
/// review.)
#[test]
fn channel_messages_through_another_server_keep_the_mailbox_limit() {
    let (mut s, [_, ben], [a, b]) = homed(
        3,
        |c| c.mailbox_messages = 2,
        [("ann", 1024, 2000), ("ben", 1026, 2001)],
    );
    s.command(b, &format!("dereg {ben}"));
    for i in 0..6 {
        s.command(a, &format!("send_all flood{i}"));
    }
    s.settle();
    let held_at_home = s.server_at(addr(1026)).mailbox(&name(&ben)).count();
    s.command(b, &format!("reg {ben}"));
    s.settle();
    let shown = (s.lines(b).iter()).filter(|l| l.contains("flood")).count();
    assert!(
        shown <= 2 && held_at_home <= 2,
        "mailbox limit 2: {shown} shown, {held_at_home} held at its home: {:?}",
        s.lines(b)
    );
}

/// Channel copies counted for a mailbox another server holds are counted
/// back when their commit fails (they were never stored): failed sends do
/// not use up the recipient's limit. (Found by review.)
#[test]
fn channel_copies_of_a_failed_commit_do_not_use_up_a_mailbox_elsewhere() {
    let (mut s, [_, ben], [a, b]) = homed(
        3,
        |c| c.mailbox_messages = 2,
        [("ann", 1024, 2000), ("ben", 1026, 2001)],
    );
    s.command(b, &format!("dereg {ben}"));
    s.settle();
    s.store_fails = Some(udpchat::StoreFailure::Busy);
    for i in 0..3 {
        s.command(a, &format!("send_all lost{i}"));
    }
    s.settle();
    s.store_fails = None;
    for i in 0..2 {
        s.command(a, &format!("send_all kept{i}"));
    }
    s.settle();
    s.command(b, &format!("reg {ben}"));
    s.settle();
    let lines = s.lines(b);
    let shown = |text: &str| lines.iter().filter(|l| l.contains(text)).count();
    assert_eq!(shown("lost"), 0, "{lines:?}");
    assert_eq!(shown("kept"), 2, "{lines:?}");
}

/// Copies counted for a mailbox nobody holds (its home died; the new one
/// has not fetched it) are forgotten once past the mail's time to live,
/// as they would have expired: a mailbox full of old messages takes new
/// ones, and its owner, back, is shown only the new.
#[test]
fn counted_copies_past_the_mail_ttl_free_the_mailbox() {
    let (mut s, [_, ben], [a, b]) = homed(
        2,
        |c| {
            c.mailbox_messages = 2;
            c.mail_ttl = Some(Duration::from_secs(60));
        },
        [("ann", 1024, 2000), ("ben", 1025, 2001)],
    );
    s.command(b, &format!("dereg {ben}"));
    s.settle();
    s.stop_server_at(addr(1025));
    s.set_live(&[addr(1024)]);
    s.settle();
    for i in 0..2 {
        s.command(a, &format!("send_all old{i}"));
    }
    s.run_for(Duration::from_secs(61));
    s.command(a, "send_all fresh");
    s.settle();
    let b2 = join_via(&mut s, &ben, 2002, 1024, &[1024]);
    s.settle();
    let lines = s.lines(b2);
    let shown = |text: &str| lines.iter().filter(|l| l.contains(text)).count();
    assert_eq!(shown("fresh"), 1, "{lines:?}");
    assert_eq!(shown("old"), 0, "{lines:?}");
}

// ---- attacks on mailboxes held where needed ------------------------------
// (Written by two attacking reviews. A "ghost" is a message the store no
// longer has, acked or expired, held again by a server from a late feed
// row: the feed reads rows as the store has them then, as the replicated
// store does, and a message whose delete is not committed yet is passed
// over.)

/// The makings of a ghost: `ben` (node `b`) logs out; ann (node `a`)
/// saves "ghostly" for it while the feed is held; ben logs back in, is
/// shown it and acks it, logs out and crashes; then the feed catches up,
/// late, with the message and its delete.
fn acked_behind_the_feed(s: &mut Sim, ben: &str, b: usize, a: usize) {
    s.command(b, &format!("dereg {ben}"));
    s.feed_held = true;
    s.command(a, &format!("send {ben} ghostly"));
    assert!(s.lines(a).contains(&SAVED), "{:?}", s.lines(a));
    s.command(b, &format!("reg {ben}"));
    s.settle();
    s.command(b, &format!("dereg {ben}"));
    s.crash(b);
    s.feed_held = false;
    s.drain_servers();
    s.settle();
}

/// How many lines of each of `nodes` contain `text`, summed.
fn shown_in(s: &Sim, nodes: &[usize], text: &str) -> usize {
    (nodes.iter())
        .map(|&i| s.lines(i).iter().filter(|l| l.contains(text)).count())
        .sum()
}

const SAVED: &str = ">>> [Messages received by the server and saved]";

/// The home fetches a mailbox for a registration while the feed is behind:
/// it delivers a message saved through another server, the recipient
/// acks it and the delete is committed. The feed then catches up: the
/// message is shown once, never again.
#[test]
fn attack_a_message_acked_before_the_feed_brings_it_is_not_shown_again() {
    let (mut s, [ben, _], [b, a]) = homed(2, |_| {}, [("ben", 1024, 2001), ("ann", 1025, 2000)]);
    let all = [1024, 1025];
    s.command(b, &format!("dereg {ben}"));
    s.feed_held = true;
    s.command(a, &format!("send {ben} ghostly"));
    assert!(s.lines(a).contains(&SAVED), "{:?}", s.lines(a));
    s.command(b, &format!("reg {ben}"));
    s.settle();
    assert_eq!(shown_in(&s, &[b], "ghostly"), 1, "{:?}", s.lines(b));
    assert_eq!(s.store.len(), 0, "acked and deleted");
    s.command(b, &format!("dereg {ben}"));
    s.crash(b);
    // The feed catches up (a few hundred ms late, as a slow reader is).
    s.feed_held = false;
    s.drain_servers();
    s.settle();
    let ghost = s.server_at(addr(1024)).mailbox(&name(&ben)).count();
    let b2 = join_via(&mut s, &ben, 2002, 1024, &all);
    s.settle();
    let shown = shown_in(&s, &[b, b2], "ghostly");
    assert_eq!(
        shown,
        1,
        "held again at its home after the ack ({ghost} held); second process: {:?}",
        s.lines(b2)
    );
}

/// A client moves from server A to B and back to A while the feed is
/// behind: B delivers a message A saved into its mailbox, the client acks
/// it there; back at A, A's registration fetch lets go of what A held and
/// the store no longer has, the message acked at B included. (Found by
/// an attack: the stale copy was held, and dropped as unreadable only
/// when a delivery found no body.)
#[test]
fn attack_a_mailbox_held_at_the_old_server_is_not_stale_when_the_client_comes_back() {
    let (mut s, [_, ben], [a, b]) = homed(2, |_| {}, [("ann", 1024, 2000), ("ben", 1025, 2001)]);
    s.command(b, &format!("dereg {ben}"));
    // Saved through A: A fetches ben's mailbox and holds it.
    s.command(a, &format!("send {ben} stale copy"));
    assert!(s.lines(a).contains(&SAVED), "{:?}", s.lines(a));
    s.settle();
    assert_eq!(s.server_at(addr(1024)).mailbox(&name(&ben)).count(), 1);
    s.feed_held = true;
    s.command(b, &format!("reg {ben}"));
    s.settle();
    assert_eq!(shown_in(&s, &[b], "stale copy"), 1, "{:?}", s.lines(b));
    assert_eq!(s.store.len(), 0, "acked at B");
    s.command(b, &format!("dereg {ben}"));
    s.crash(b);
    // B stalls: ben's home is A now.
    s.set_live(&[addr(1024)]);
    let b2 = join_via(&mut s, &ben, 2002, 1024, &[1024]);
    s.settle();
    let shown = shown_in(&s, &[b, b2], "stale copy");
    s.feed_held = false;
    s.drain_servers();
    s.settle();
    assert_eq!(shown, 1, "second process: {:?}", s.lines(b2));
    // The registration's fetch let the stale copy go: no delivery tried
    // a body the store no longer had (and took it for unreadable).
    let unreadable =
        (s.events.iter()).any(|e| matches!(e, udpchat::ServerEvent::Undecryptable(..)));
    assert!(!unreadable, "{:?}", s.events);
}

/// After [`attack_a_message_acked_before_the_feed_brings_it_is_not_shown_again`]
/// no ghost fills a mailbox of one message at its home: a channel message
/// sent through the home afterwards reaches the recipient.
#[test]
fn attack_a_ghost_message_does_not_take_a_channel_message_s_place() {
    let (mut s, [ben, _, _], [b, a, c]) = homed(
        2,
        |c| c.mailbox_messages = 1,
        [
            ("ben", 1024, 2001),
            ("ann", 1025, 2000),
            ("cal", 1024, 2003),
        ],
    );
    let all = [1024, 1025];
    acked_behind_the_feed(&mut s, &ben, b, a);
    s.command(c, "send_all after the ghost");
    assert!(
        s.lines(c).contains(&">>> [Message received by Server.]"),
        "{:?}",
        s.lines(c)
    );
    let held: Vec<_> = (s.server_at(addr(1024)).mailbox(&name(&ben)))
        .map(|m| (m.mail, m.from.to_string(), m.channel))
        .collect();
    let b2 = join_via(&mut s, &ben, 2002, 1024, &all);
    s.settle();
    s.run_for(Duration::from_secs(30));
    let lines = s.lines(b2);
    let left: Vec<_> = (s.server_at(addr(1024)).mailbox(&name(&ben)))
        .map(|m| (m.mail, m.from.to_string(), m.channel))
        .collect();
    assert_eq!(
        shown_in(&s, &[b2], "after the ghost"),
        1,
        "{lines:?}; held at A before: {held:?}, after: {left:?}; store {}; ben's events {:?}",
        s.store.len(),
        s.nodes[b2].events
    );
}

/// A client logs in at A, out, in at B, out and back at A while the feed
/// is behind (A never heard of B's claim: both claim the same epoch), and
/// a third server saves messages for it meanwhile. Every one saved is
/// shown once.
#[test]
fn attack_a_client_hopping_a_b_a_behind_the_feed_gets_what_a_third_server_saved() {
    let mut s = Sim::new();
    s.shared_cluster(3);
    let all = [1024, 1025, 1026];
    // ben: home A (1024) with all three live, B (1025) without A.
    let ben = name_with_homes(&s, "ben", &[(&all, 1024), (&[1025, 1026], 1025)]);
    let cal = name_with_homes(&s, "cal", &[(&all, 1026), (&[1025, 1026], 1026)]);
    let c = join_via(&mut s, &cal, 2000, 1026, &all);
    let b1 = join_via(&mut s, &ben, 2001, 1024, &all);
    s.settle();
    s.command(c, &format!("send {ben} hop zero"));
    s.command(b1, &format!("dereg {ben}"));
    s.crash(b1);
    s.feed_held = true;
    s.command(c, &format!("send {ben} hop one"));
    // A stalls: ben's home is B.
    s.set_live(&[addr(1025), addr(1026)]);
    let b2 = join_via(&mut s, &ben, 2002, 1025, &[1025, 1026]);
    s.settle();
    s.command(c, &format!("send {ben} hop two"));
    s.command(b2, &format!("dereg {ben}"));
    s.crash(b2);
    s.command(c, &format!("send {ben} hop three"));
    // A is back: ben's home is A again.
    s.set_live(&[addr(1024), addr(1025), addr(1026)]);
    let b3 = join_via(&mut s, &ben, 2003, 1024, &all);
    s.settle();
    s.command(c, &format!("send {ben} hop four"));
    s.feed_held = false;
    s.drain_servers();
    s.settle();
    s.command(c, &format!("send {ben} hop five"));
    s.run_for(Duration::from_secs(20));
    s.settle();
    let saved = (s.lines(c).iter())
        .filter(|l| l.contains("saved") || l.contains("received by"))
        .count();
    let nodes = [b1, b2, b3];
    let per: Vec<usize> = (0..6)
        .map(|i| {
            shown_in(
                &s,
                &nodes,
                &format!("hop {}", ["zero", "one", "two", "three", "four", "five"][i]),
            )
        })
        .collect();
    assert!(
        per.iter().all(|&n| n == 1),
        "{saved} answered; shown {per:?}; b3 {:?}; cal {:?}",
        s.lines(b3),
        s.lines(c)
    );
}

/// After [`attack_a_message_acked_before_the_feed_brings_it_is_not_shown_again`]
/// the welcome of the recipient's next registration at its home counts no
/// ghost ahead of a real message saved meanwhile, which is shown.
#[test]
fn attack_a_ghost_message_does_not_stall_the_welcome_batch() {
    let (mut s, [ben, _], [b, a]) = homed(2, |_| {}, [("ben", 1024, 2001), ("ann", 1025, 2000)]);
    let all = [1024, 1025];
    acked_behind_the_feed(&mut s, &ben, b, a);
    // A real message, saved through the same server (a later id).
    s.command(a, &format!("send {ben} the real one"));
    assert_eq!(
        (s.lines(a).iter()).filter(|l| **l == SAVED).count(),
        2,
        "{:?}",
        s.lines(a)
    );
    let b2 = spawn_via(&mut s, &ben, 2002, 1024, &all);
    let shown = s.run_until(Duration::from_secs(60), |s| {
        shown_in(s, &[b2], "the real one") > 0
    });
    s.settle();
    assert!(
        shown,
        "not shown in a minute online: {:?}; held at its home {:?}; store {}",
        s.lines(b2),
        (s.server_at(addr(1024)).mailbox(&name(&ben)))
            .map(|m| m.mail)
            .collect::<Vec<_>>(),
        s.store.len()
    );
    assert_eq!(shown_in(&s, &[b2], "the real one"), 1, "{:?}", s.lines(b2));
}

/// After [`attack_a_message_acked_before_the_feed_brings_it_is_not_shown_again`]
/// the old home counts no ghost when its owner comes online at another
/// server (`drop_mailbox` counts what was held, and nothing would ever
/// delete a ghost again): with a limit of one, a channel message it
/// stores afterwards reaches that recipient, online elsewhere.
#[test]
fn attack_a_ghost_counted_at_the_old_home_does_not_fill_the_mailbox_for_good() {
    let (mut s, [ben, _, _], [b, a, c]) = homed(
        2,
        |c| c.mailbox_messages = 1,
        [
            ("ben", 1024, 2001),
            ("ann", 1025, 2000),
            ("cal", 1024, 2003),
        ],
    );
    acked_behind_the_feed(&mut s, &ben, b, a);
    assert_eq!(s.store.len(), 0);
    // A stalls a moment: ben's home is B, and ben logs in there (and
    // stays). A lets go of ben's mailbox, counting what it held.
    s.set_live(&[addr(1025)]);
    let b2 = join_via(&mut s, &ben, 2002, 1025, &[1025]);
    s.settle();
    s.set_live(&[addr(1024), addr(1025)]);
    s.settle();
    assert_eq!(s.server_at(addr(1024)).mailbox(&name(&ben)).count(), 0);
    s.command(c, "send_all lost for ben");
    assert!(
        s.lines(c).contains(&">>> [Message received by Server.]"),
        "{:?}",
        s.lines(c)
    );
    s.run_for(Duration::from_secs(5));
    s.settle();
    assert_eq!(
        shown_in(&s, &[b2], "lost for ben"),
        1,
        "online at B, mailbox empty: {:?}; server events {:?}",
        s.lines(b2),
        (s.events.iter())
            .filter(|e| format!("{e:?}").contains("Full"))
            .collect::<Vec<_>>()
    );
}

/// A message waiting for its commit at the recipient's server (held) when
/// the recipient's new process registers at another server (its old
/// server stalled): the new home's fetch misses it, the old one lets the
/// mailbox go; the commit then goes through and the feed brings it to the
/// new home, which delivers it once.
#[test]
fn attack_a_save_under_commit_when_the_recipient_moves_reaches_it_at_the_new_home() {
    let (mut s, [_, ben], [a, b]) = homed(3, |_| {}, [("ann", 1024, 2000), ("ben", 1024, 2001)]);
    cut_direct_path(&mut s, 2000, 2001);
    s.crash(b);
    s.hold = true;
    s.line(a, &format!("send {ben} moving target"));
    s.run_for(Duration::from_secs(3));
    // ben's server stalls; ben starts again and lands at its next home.
    s.set_live(&[addr(1025), addr(1026)]);
    let next = s.server.home_of(&name(&ben)).unwrap();
    let b2 = spawn_via(&mut s, &ben, 2002, next.port(), &[1025, 1026]);
    s.run_until(Duration::from_secs(10), |s| s.lines(b2).contains(&WELCOME));
    s.release(None);
    s.set_live(&[addr(1024), addr(1025), addr(1026)]);
    s.run_for(Duration::from_secs(20));
    s.settle();
    let told = (s.lines(a).iter()).any(|l| l.contains("saved") || l.contains("received by"));
    let shown = shown_in(&s, &[b, b2], "moving target");
    assert!(
        !told || shown == 1,
        "told {told}, shown {shown}: {:?} / {:?}",
        s.lines(a),
        s.lines(b2)
    );
    assert!(shown <= 1);
}

/// A message acked at its home while the delete waits for its commit, and
/// the feed read meanwhile (the store still has the row, stored through
/// another server): it does not come back into the home's mailbox as a
/// ghost, which would be counted against the limit for good.
#[test]
fn mail_acked_while_its_delete_commits_is_not_brought_back_by_the_feed() {
    let (mut s, [ben, _], [b, a]) = homed(2, |_| {}, [("ben", 1024, 2001), ("ann", 1025, 2000)]);
    s.command(b, &format!("dereg {ben}"));
    s.feed_held = true;
    s.command(a, &format!("send {ben} ghostly"));
    assert!(
        s.lines(a)
            .contains(&">>> [Messages received by the server and saved]")
    );
    s.line(b, &format!("reg {ben}"));
    let shown = |s: &Sim| s.lines(b).iter().any(|l| l.contains("ghostly"));
    assert!(s.run_until(Duration::from_secs(10), shown));
    // Its ack is on the way: the delete it makes waits for its commit.
    s.hold = true;
    s.run_for(Duration::from_millis(300));
    assert_eq!(s.server_at(addr(1024)).mailbox(&name(&ben)).count(), 0);
    // The feed is read now: the store still has the message.
    assert_eq!(s.store.len(), 1);
    s.feed_held = false;
    s.drain_servers();
    let held = s.server_at(addr(1024)).mailbox(&name(&ben)).count();
    s.release(None);
    s.settle();
    assert_eq!(held, 0, "the feed brought the acked message back");
    assert_eq!(s.server_at(addr(1024)).mailbox(&name(&ben)).count(), 0);
    assert_eq!(s.store.len(), 0);
    let times = s.lines(b).iter().filter(|l| l.contains("ghostly")).count();
    assert_eq!(times, 1);
}

// ---- attacks, second round -------------------------------------------------
// (Written by a second attacking review.)

/// A name (`prefix` and a number) whose home is `home` for each (live
/// servers, home) of `want`.
fn name_with_homes(s: &Sim, prefix: &str, want: &[(&[u16], u16)]) -> String {
    let probe = |live: &[u16]| {
        let mut p = udpchat::Server::new(
            ServerConfig::new([7; 32], server_key(), (s.start, sim::EPOCH_UNIX)),
            s.now,
            Default::default(),
        );
        let live: Vec<_> = live.iter().map(|&p| addr(p)).collect();
        p.set_servers(live[0], &live);
        p
    };
    let probes: Vec<(udpchat::Server, u16)> = want
        .iter()
        .map(|&(live, home)| (probe(live), home))
        .collect();
    (0..2000)
        .map(|i| format!("{prefix}{i}"))
        .find(|n| (probes.iter()).all(|(p, home)| p.home_of(&name(n)) == Some(addr(*home))))
        .expect("a name with those homes")
}

/// Three servers (A 1024, B 1025, C 1026) with `mailbox` messages a
/// mailbox: ann homed at B (at A once B is gone), ben at C, cal at A,
/// all online. ben's name, and the clients ann, ben, cal.
fn ann_moving_to_a(mailbox: usize) -> (Sim, String, [usize; 3]) {
    let mut s = Sim::new();
    s.shared_cluster_with(3, |c| c.mailbox_messages = mailbox);
    let all = [1024, 1025, 1026];
    let ann = name_with_homes(&s, "ann", &[(&all, 1025), (&[1024, 1026], 1024)]);
    let ben = s.name_homed_at("ben", addr(1026));
    let cal = s.name_homed_at("cal", addr(1024));
    let b = join_via(&mut s, &ben, 2001, 1026, &all);
    let c = join_via(&mut s, &cal, 2002, 1024, &all);
    let a = join_via(&mut s, &ann, 2000, 1025, &all);
    s.settle();
    (s, ben, [a, b, c])
}

fn full_events(s: &Sim) -> Vec<String> {
    (s.events.iter())
        .filter(|e| matches!(e, udpchat::ServerEvent::MailboxFull { .. }))
        .map(|e| format!("{e:?}"))
        .collect()
}

/// A channel message committed at its sender's home B, whose "received"
/// is lost; B dies and the sender sends it again (same id) through A. The
/// store keeps B's copy. A counts the recipient's copy (held at C) from
/// B's feed row, and again for the copy the store kept instead of its
/// own: one message in the mailbox, which A must count once. With a
/// limit of two, the next channel message through A must still reach it.
#[test]
fn attack2_a_channel_message_sent_again_through_another_server_is_counted_once() {
    let (mut s, ben, [a, b, c]) = ann_moving_to_a(2);
    s.command(b, &format!("dereg {ben}"));
    // B commits the channel message; its answer never reaches ann.
    let home = addr(1025);
    s.drop_rules
        .push(sim::drop_all(move |p| p.from == home && p.to == addr(2000)));
    s.line(a, "send_all first try");
    s.run_until(Duration::from_secs(5), |s| !s.store.is_empty());
    assert!(!s.store.is_empty());
    s.run_for(Duration::from_millis(100));
    s.stop_server_at(addr(1025));
    s.set_live(&[addr(1024), addr(1026)]);
    let said = s.run_until(Duration::from_secs(60), |s| {
        s.lines(a).contains(&">>> [Message received by Server.]")
    });
    assert!(said, "{:?}", s.lines(a));
    s.settle();
    s.command(a, "send_all second");
    let told = (s.lines(a).iter())
        .filter(|l| **l == ">>> [Message received by Server.]")
        .count();
    assert_eq!(told, 2, "{:?}", s.lines(a));
    let full = full_events(&s);
    let b2 = join_via(&mut s, &ben, 2003, 1026, &[1024, 1026]);
    s.settle();
    s.run_for(Duration::from_secs(5));
    let lines = s.lines(b2);
    let shown = |t: &str| lines.iter().filter(|l| l.contains(t)).count();
    assert_eq!(shown("first try"), 1, "{lines:?}");
    assert_eq!(
        shown("second"),
        1,
        "ben's mailbox held one message (limit 2), yet A logged {full:?}: {lines:?}"
    );
    let _ = c;
}

/// A direct message saved through the sender's home B for a recipient
/// online at its own home C: C delivers it, it is acked and deleted. B's
/// "saved" was lost and B dies; the sender sends it again through A. A
/// fetches the mailbox (empty now), puts its copy, and the store, which
/// still knows the message's key, stores nothing and reports nothing
/// kept. A holds a copy the store never had: with a limit of one, a later
/// message through A for the same recipient (its mailbox empty) must not
/// be refused as full.
#[test]
fn attack2_a_retry_of_a_message_already_acked_leaves_no_phantom_filling_the_mailbox() {
    let (mut s, ben, [a, b, c]) = ann_moving_to_a(1);
    cut_direct_path(&mut s, 2000, 2001);
    cut_direct_path(&mut s, 2002, 2001);
    let home = addr(1025);
    s.drop_rules
        .push(sim::drop_all(move |p| p.from == home && p.to == addr(2000)));
    s.line(a, &format!("send {ben} once"));
    assert!(s.run_until(Duration::from_secs(10), |s| shown_in(s, &[b], "once") == 1));
    s.run_for(Duration::from_millis(200));
    s.stop_server_at(addr(1025));
    s.set_live(&[addr(1024), addr(1026)]);
    let answered = s.run_until(Duration::from_secs(60), |s| {
        (s.lines(a).iter()).any(|l| l.contains("saved") || l.contains("received by"))
    });
    assert!(answered, "{:?}", s.lines(a));
    s.settle();
    assert_eq!(s.store.len(), 0, "nothing waits for ben");
    let held = s.server_at(addr(1024)).mailbox(&name(&ben)).count();
    s.command(c, &format!("send {ben} later"));
    s.run_for(Duration::from_secs(3));
    s.settle();
    assert_eq!(
        shown_in(&s, &[b], "later"),
        1,
        "A holds {held} for ben (store: {}); cal: {:?}",
        s.store.len(),
        s.lines(c)
    );
    assert_eq!(shown_in(&s, &[b], "once"), 1);
}

/// Copies counted at A for a mailbox its home C holds are forgotten once
/// the newest is past the mail's time to live; C's deletes of those
/// expired copies reach A a moment later (the feed is behind) and must
/// not count out the new copies A counted meanwhile (A would then take as
/// many again: the mailbox would end with twice its limit).
#[test]
fn attack2_late_expiry_deletes_do_not_count_out_copies_counted_after_the_ttl_reset() {
    let (mut s, [_, ben], [a, b]) = homed(
        3,
        |c| {
            c.mailbox_messages = 2;
            c.mail_ttl = Some(Duration::from_secs(60));
        },
        [("ann", 1024, 2000), ("ben", 1026, 2001)],
    );
    let all = [1024, 1025, 1026];
    s.command(b, &format!("dereg {ben}"));
    s.settle();
    for i in 0..2 {
        s.command(a, &format!("send_all old{i}"));
    }
    s.run_for(Duration::from_secs(59));
    // C expires them at 60 s; A reads the feed a moment late.
    s.feed_held = true;
    s.run_for(Duration::from_secs(2));
    for i in 0..2 {
        s.command(a, &format!("send_all fresh{i}"));
    }
    s.feed_held = false;
    s.drain_servers();
    s.settle();
    for i in 2..4 {
        s.command(a, &format!("send_all fresh{i}"));
    }
    s.settle();
    let held = s.server_at(addr(1026)).mailbox(&name(&ben)).count();
    let b2 = join_via(&mut s, &ben, 2002, 1026, &all);
    s.settle();
    let lines = s.lines(b2);
    let shown = lines.iter().filter(|l| l.contains("fresh")).count();
    assert!(
        held <= 2 && shown <= 2,
        "limit 2: {held} held at its home, {shown} shown: {lines:?}"
    );
}

/// A sealed batch with a message for a client that registers while it
/// commits (the registration's fetch misses it, a refetch waits for the
/// commit), and the commit fails: the message is refused to its sender,
/// the welcome's count is lowered, and nothing is shown; the next message
/// reaches it once.
#[test]
fn attack2_a_failed_commit_beside_a_registration_fetch_shows_nothing_refused() {
    let (mut s, [_, ben], [a, b]) = homed(2, |_| {}, [("ann", 1024, 2000), ("ben", 1024, 2001)]);
    s.command(b, &format!("dereg {ben}"));
    s.hold = true;
    s.line(a, &format!("send {ben} refused one"));
    s.line(a, "send_all refused too");
    s.run_for(Duration::from_millis(300));
    s.seal();
    s.line(b, &format!("reg {ben}"));
    s.run_for(Duration::from_millis(300));
    s.commit_sealed(Some(udpchat::StoreFailure::Busy));
    s.release(None);
    s.settle();
    s.run_for(Duration::from_secs(5));
    s.settle();
    let told = (s.lines(a).iter())
        .filter(|l| **l == SAVED || **l == ">>> [Message received by Server.]")
        .count();
    let shown = shown_in(&s, &[b], "refused");
    assert!(shown <= 2, "{:?}", s.lines(b));
    assert!(
        shown >= told,
        "told {told}, shown {shown}: {:?} / {:?}",
        s.lines(a),
        s.lines(b)
    );
    s.command(a, "send_all after");
    s.run_for(Duration::from_secs(3));
    s.settle();
    assert_eq!(shown_in(&s, &[b], "after"), 1, "{:?}", s.lines(b));
}

/// A channel message committed at B (its "received" lost) for the names B
/// knew, sent again through A, which knows one more: dan, new at A while
/// the feed was behind, online at A. The store keeps B's row, which
/// gains dan (as PostgreSQL's channel row gains a recipient), and reports
/// dan's copy kept instead of A's: dan, online at A, is shown it without
/// logging in again, once.
#[test]
fn attack2_a_channel_retry_keeps_the_copy_for_a_name_the_first_server_did_not_know() {
    let mut s = Sim::new();
    s.shared_cluster(3);
    let all = [1024, 1025, 1026];
    let ann = name_with_homes(&s, "ann", &[(&all, 1025), (&[1024, 1026], 1024)]);
    let ben = s.name_homed_at("ben", addr(1026));
    let dan = s.name_homed_at("dan", addr(1024));
    let b = join_via(&mut s, &ben, 2001, 1026, &all);
    let a = join_via(&mut s, &ann, 2000, 1025, &all);
    s.settle();
    s.feed_held = true;
    let d = join_via(&mut s, &dan, 2003, 1024, &all);
    let home = addr(1025);
    s.drop_rules
        .push(sim::drop_all(move |p| p.from == home && p.to == addr(2000)));
    s.line(a, "send_all to whom it knew");
    s.run_until(Duration::from_secs(5), |s| !s.store.is_empty());
    s.run_for(Duration::from_millis(100));
    s.stop_server_at(addr(1025));
    s.set_live(&[addr(1024), addr(1026)]);
    let said = s.run_until(Duration::from_secs(60), |s| {
        s.lines(a).contains(&">>> [Message received by Server.]")
    });
    assert!(said, "{:?}", s.lines(a));
    s.feed_held = false;
    s.drain_servers();
    s.settle();
    s.run_for(Duration::from_secs(10));
    s.settle();
    let stored_for_dan = s.store.len();
    assert_eq!(shown_in(&s, &[b], "whom it knew"), 1, "{:?}", s.lines(b));
    assert_eq!(
        shown_in(&s, &[d], "whom it knew"),
        1,
        "dan online at A all along ({stored_for_dan} rows in the store): {:?}",
        s.lines(d)
    );
}

// ---- the store decides a full mailbox ------------------------------------
// (Each server checks a mailbox's limit against what it holds or counted;
// servers saving to one mailbox at once can each see room that is gone.
// The shared store counts every mailbox across the servers, as PostgreSQL
// does, and refuses the message that would go over: its sender is told.)

/// ann, ben and cat homed on three servers with `mailbox` messages a
/// mailbox, cat logged out: cat's name, and the three clients.
fn cat_away(mailbox: usize) -> (Sim, String, [usize; 3]) {
    let (mut s, [_, _, cat], nodes) = homed(
        3,
        |c| c.mailbox_messages = mailbox,
        [
            ("ann", 1024, 2000),
            ("ben", 1025, 2001),
            ("cat", 1026, 2002),
        ],
    );
    s.command(nodes[2], &format!("dereg {cat}"));
    s.settle();
    (s, cat, nodes)
}

/// Whether the cluster's first server logged `to`'s mailbox full (for a
/// channel message or a direct one).
fn logged_full(s: &Sim, to: &str, channel: bool) -> bool {
    (s.events.iter()).any(|e| {
        matches!(e, udpchat::ServerEvent::MailboxFull { to: t, channel: c, .. }
            if t.as_str() == to && *c == channel)
    })
}

/// A message written to the store by a server that tells nobody (its feed
/// row not read yet): the other servers' view of `to`'s mailbox is stale.
fn stored_behind_their_backs(s: &mut Sim, to: &str, id: u64) {
    stored_behind_their_backs_sized(s, to, id, 40);
}

/// [`stored_behind_their_backs`] with a body of `len` bytes: a message
/// that fills `to`'s mailbox by bytes in the store only.
fn stored_behind_their_backs_sized(s: &mut Sim, to: &str, id: u64, len: usize) {
    use udpchat::store::{Body, Store, StoreOp, StoredMail};
    let m = StoredMail {
        mail: udpchat::wire::MailId(1 << 40 | id),
        to: name(to),
        from: name("someone"),
        channel: false,
        stored_at: sim::EPOCH_UNIX,
        id: udpchat::wire::MsgId(id),
        body: Body::AtRest(vec![7; len]),
    };
    s.store.commit(&[StoreOp::Put(m)]).unwrap();
}

/// Two servers save to one offline mailbox, neither hearing of the
/// other's commits: the one whose save would pass the limit is refused by
/// the store, and its sender reads "mailbox full", not "saved". The
/// owner, back, gets exactly the messages reported saved.
#[test]
fn two_servers_filling_one_mailbox_at_once_save_no_more_than_it_holds() {
    let (mut s, cat, [a, b, _]) = cat_away(2);
    s.feed_held = true;
    s.command(a, &format!("send {cat} from ann one"));
    s.command(b, &format!("send {cat} from ben one"));
    // a's server holds the mailbox with its own one message: room, it
    // thinks; the store has two.
    let from = s.lines(a).len();
    s.command(a, &format!("send {cat} from ann two"));
    let full = format!(">>> [Error: mailbox of {cat} is full, message not saved.]");
    let said = s.lines_since(a, from);
    assert_eq!(said.last(), Some(&full.as_str()), "{said:?}");
    assert!(said.iter().all(|l| !l.contains("saved]")), "{said:?}");
    assert_eq!(s.store.len(), 2);
    assert!(logged_full(&s, &cat, false), "{:?}", s.events);
    // The refused message is gone from a's server too: its next save
    // is refused by the server itself, and the store has the same two.
    assert_eq!(s.server_at(addr(1024)).mailbox(&name(&cat)).count(), 1);
    s.feed_held = false;
    s.settle();
    let c2 = join_via(&mut s, &cat, 2003, 1026, &[1024, 1025, 1026]);
    s.settle();
    let lines = s.lines(c2);
    let shown = |text: &str| lines.iter().filter(|l| l.contains(text)).count();
    assert_eq!(shown("from ann one"), 1, "{lines:?}");
    assert_eq!(shown("from ben one"), 1, "{lines:?}");
    assert_eq!(shown("from ann two"), 0, "{lines:?}");
}

/// A channel message whose copy for one recipient the store refuses (its
/// mailbox filled through another server): the others get it, the sender
/// is told it was saved, and the full mailbox never shows it.
#[test]
fn a_channel_copy_the_store_refuses_is_kept_for_the_others_only() {
    let (mut s, cat, [a, b, _]) = cat_away(1);
    stored_behind_their_backs(&mut s, &cat, 1);
    let from = s.lines(a).len();
    s.command(a, "send_all hello all");
    s.settle();
    let saved = s.lines_since(a, from);
    assert!(
        saved.iter().all(|l| !l.contains("full")) && !saved.is_empty(),
        "{saved:?}"
    );
    assert_eq!(
        (s.lines(b).iter())
            .filter(|l| l.contains("hello all"))
            .count(),
        1
    );
    assert!(logged_full(&s, &cat, true), "{:?}", s.events);
    let c2 = join_via(&mut s, &cat, 2003, 1026, &[1024, 1025, 1026]);
    s.settle();
    let lines = s.lines(c2);
    assert!(lines.iter().all(|l| !l.contains("hello all")), "{lines:?}");
}

/// A channel message the store keeps for nobody (every recipient's
/// mailbox full, by writes the sending server never heard of): its
/// sender reads "mailbox full", as when the server sees them full.
#[test]
fn a_channel_message_the_store_keeps_for_nobody_is_refused() {
    let (mut s, [_, cat], [a, c]) = homed(
        2,
        |c| c.mailbox_messages = 1,
        [("ann", 1024, 2000), ("cat", 1025, 2001)],
    );
    s.command(c, &format!("dereg {cat}"));
    s.settle();
    stored_behind_their_backs(&mut s, &cat, 1);
    let from = s.lines(a).len();
    s.command(a, "send_all nobody keeps this");
    s.settle();
    let lines = s.lines_since(a, from);
    assert!(lines.iter().any(|l| l.contains("full")), "{lines:?}");
    assert!(lines.iter().all(|l| !l.contains("saved]")), "{lines:?}");
    assert_eq!(s.store.len(), 1);
}

/// A save relayed live to a recipient online at the same server, whose
/// mailbox the store finds full: the relay is refused with the message
/// (its sender reads "mailbox full"), and the live copy never leaves.
#[test]
fn a_relay_the_store_refuses_is_not_delivered() {
    let (mut s, [_, cat], [a, c]) = homed(
        2,
        |c| c.mailbox_messages = 1,
        [("ann", 1024, 2000), ("cat", 1024, 2001)],
    );
    cut_direct_path(&mut s, 2000, 2001);
    stored_behind_their_backs(&mut s, &cat, 1);
    let from = (s.lines(a).len(), s.lines(c).len());
    s.command(a, &format!("send {cat} relayed or not"));
    s.settle();
    let said = s.lines_since(a, from.0);
    let full = format!(">>> [Error: mailbox of {cat} is full, message not saved.]");
    assert_eq!(said.last(), Some(&full.as_str()), "{said:?}");
    assert!(
        said.iter()
            .all(|l| !l.contains("saved]") && !l.contains("received")),
        "{said:?}"
    );
    let shown = s.lines_since(c, from.1);
    assert!(
        shown.iter().all(|l| !l.contains("relayed or not")),
        "{shown:?}"
    );
    assert_eq!(s.store.len(), 1);
}

// ---- attacks on the store's full mailbox ----

/// Drops the first packet from `from` to `to` carrying `what`, and keeps
/// it, to be injected later (a delayed datagram).
fn delay_first(
    s: &mut Sim,
    from: u16,
    to: u16,
    what: What,
) -> std::rc::Rc<std::cell::RefCell<Option<sim::Packet>>> {
    let kept = std::rc::Rc::new(std::cell::RefCell::new(None));
    let slot = kept.clone();
    let (from, to) = (addr(from), addr(to));
    s.drop_rules.push(Box::new(move |p| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() && p.from == from && p.to == to && p.is(what) {
            *slot = Some(p.clone());
            return true;
        }
        false
    }));
    kept
}

/// A channel message the store keeps for nobody, whose live copy was
/// sealed into the datagrams held for the commit (the recipient's ack of
/// an older message pumped its queue meanwhile): the sender reads
/// "mailbox full", so the recipient must never be shown it.
#[test]
fn attack_full_a_channel_copy_pumped_during_the_commit_never_leaves() {
    let (mut s, [_, cat], [a, c]) = homed(
        2,
        |c| c.mailbox_messages = 2,
        [("ann", 1024, 2000), ("cat", 1024, 2001)],
    );
    cut_direct_path(&mut s, 2000, 2001);
    let ack = delay_first(&mut s, 2001, 1024, What::Delivered);
    s.line(a, &format!("send {cat} zero"));
    s.run_until(Duration::from_secs(5), |_| ack.borrow().is_some());
    assert!(
        s.lines(c).iter().any(|l| l.contains("zero")),
        "{:?}",
        s.lines(c)
    );
    // The store has zero and one more: the channel copy does not fit.
    stored_behind_their_backs(&mut s, &cat, 1);
    s.hold = true;
    let from = (s.lines(a).len(), s.lines(c).len());
    s.line(a, "send_all hello all");
    s.run_for(Duration::from_millis(10));
    // cat's late ack of zero frees its window: its queue (the channel
    // copy) is pumped into the held datagrams.
    let p = ack.borrow_mut().take().unwrap();
    s.inject(p.from, p.to, p.payload);
    s.run_for(Duration::from_millis(10));
    s.release(None);
    s.settle();
    let said = s.lines_since(a, from.0);
    assert!(said.iter().any(|l| l.contains("full")), "{said:?}");
    let shown = s.lines_since(c, from.1);
    assert!(
        shown.iter().all(|l| !l.contains("hello all")),
        "told not saved, yet shown: {shown:?}"
    );
}

/// A welcome that counted two messages of the batch under commit, the
/// first of which the store refuses (over the bytes limit) and the
/// second keeps: the welcome counts one, and the one kept is delivered
/// (and shown once), not left at a position the client never expects.
#[test]
fn attack_full_a_welcome_with_a_refused_message_before_a_kept_one_delivers_the_kept_one() {
    let (mut s, [_, ben, cat], [a, b, c]) = homed(
        2,
        |c| c.mailbox_bytes = 1200,
        [
            ("ann", 1024, 2000),
            ("ben", 1024, 2001),
            ("cat", 1024, 2002),
        ],
    );
    let _ = ben;
    s.command(c, &format!("dereg {cat}"));
    s.settle();
    // 660 bytes of the store's 1200: ann's long message (over 500) does
    // not fit, ben's short one does; the server sees room for both.
    stored_behind_their_backs_sized(&mut s, &cat, 1, 500);
    // cat's new process: its registration (in its handshake's last
    // datagram) arrives while the saves are under commit.
    let register = delay_first(&mut s, 2003, 1024, What::Finish);
    let c2 = spawn_via(&mut s, &cat, 2003, 1024, &[1024, 1025]);
    s.run_until(Duration::from_secs(5), |_| register.borrow().is_some());
    s.hold = true;
    let from = (s.lines(a).len(), s.lines(b).len());
    let long = "l".repeat(400);
    s.line(a, &format!("send {cat} {long}"));
    s.run_for(Duration::from_millis(10));
    s.line(b, &format!("send {cat} short one"));
    s.run_for(Duration::from_millis(10));
    let p = register.borrow_mut().take().unwrap();
    s.inject(p.from, p.to, p.payload);
    s.run_for(Duration::from_millis(10));
    // Registered, its welcome held for the commit.
    assert!(online_at(&s, 1024, &cat));
    s.release(None);
    let prompt = s.run_until(Duration::from_secs(3), |s| {
        s.lines(c2).iter().any(|l| l.contains("short one"))
    });
    s.settle();
    let ann_said = s.lines_since(a, from.0);
    assert!(ann_said.iter().any(|l| l.contains("full")), "{ann_said:?}");
    let ben_said = s.lines_since(b, from.1);
    assert!(ben_said.iter().any(|l| l.contains("saved")), "{ben_said:?}");
    let lines = s.lines(c2);
    let shown = |t: &str| lines.iter().filter(|l| l.contains(t)).count();
    assert_eq!(shown("short one"), 1, "{lines:?}");
    assert_eq!(shown(&long), 0, "{lines:?}");
    // Shown with the welcome's batch, not after the server took the
    // client for gone (it never acked a position past its count) and it
    // registered again.
    let dropped = (s.events.iter())
        .any(|e| matches!(e, udpchat::ServerEvent::Offline(n, false) if n.as_str() == cat));
    assert!(
        prompt && !dropped,
        "{:?} {:?}",
        s.nodes[c2].events,
        s.events
    );
}

/// A relay the store refuses in the sealed batch, and another relay to
/// the same recipient made after the seal: the refused one's live copy
/// goes, and renumbering the held datagrams must not let the next
/// batch's copy out before its own commit, which fails: its recipient
/// never sees it, its sender is not told it was received.
#[test]
fn attack_full_a_refusal_in_the_sealed_batch_does_not_release_the_next_one() {
    let (mut s, [_, cat], [a, c]) = homed(
        2,
        |c| c.mailbox_messages = 2,
        [("ann", 1024, 2000), ("cat", 1024, 2001)],
    );
    cut_direct_path(&mut s, 2000, 2001);
    stored_behind_their_backs(&mut s, &cat, 1);
    stored_behind_their_backs(&mut s, &cat, 2);
    s.hold = true;
    let from = (s.lines(a).len(), s.lines(c).len());
    // Each goes to the server once the direct path failed.
    let relays = |s: &Sim| s.count(|p| p.is(What::RelayMessage));
    let sent = relays(&s);
    s.line(a, &format!("send {cat} first refused"));
    s.run_until(Duration::from_secs(5), |s| relays(s) > sent);
    s.run_for(Duration::from_millis(5));
    s.seal();
    s.line(a, &format!("send {cat} second fails"));
    s.run_until(Duration::from_secs(5), |s| relays(s) > sent + 1);
    s.run_for(Duration::from_millis(5));
    s.commit_sealed(None);
    s.run_for(Duration::from_millis(50));
    let shown = s.lines_since(c, from.1);
    assert!(
        shown.iter().all(|l| !l.contains("second fails")),
        "out before its commit: {shown:?}"
    );
    s.seal();
    s.commit_sealed(Some(udpchat::StoreFailure::Unreachable));
    s.hold = false;
    s.settle();
    let said = s.lines_since(a, from.0);
    assert!(said.iter().any(|l| l.contains("full")), "{said:?}");
    assert!(
        said.iter()
            .all(|l| !l.contains("received") && !l.contains("saved]")),
        "{said:?}"
    );
    let shown = s.lines_since(c, from.1);
    assert!(
        shown
            .iter()
            .all(|l| !l.contains("first refused") && !l.contains("second fails")),
        "{shown:?}"
    );
}

/// A welcome that counted a message of a commit that then fails, before
/// messages another server committed under higher ids (its mail counter
/// was ahead, the feed behind): the welcome counts one less, and the
/// others move up a place, so all of them are delivered in the welcome's
/// batch, not left past its count until the client registers again.
#[test]
fn a_welcome_whose_first_message_s_commit_fails_delivers_the_rest_at_once() {
    let (mut s, [_, ben, cat], [a, b, c]) = homed(
        2,
        |_| {},
        [
            ("ann", 1024, 2000),
            ("ben", 1025, 2001),
            ("cat", 1024, 2002),
        ],
    );
    let _ = ben;
    s.command(c, &format!("dereg {cat}"));
    s.settle();
    // ben's server stores three for cat; cat's home has not read them.
    s.feed_held = true;
    for i in 0..3 {
        s.command(b, &format!("send {cat} from ben {i}"));
    }
    assert_eq!(s.store.len(), 3);
    // cat's new process: its registration arrives while ann's save, with
    // a lower id than ben's, is under commit.
    let register = delay_first(&mut s, 2003, 1024, What::Finish);
    let c2 = spawn_via(&mut s, &cat, 2003, 1024, &[1024, 1025]);
    s.run_until(Duration::from_secs(5), |_| register.borrow().is_some());
    s.hold = true;
    let from = s.lines(a).len();
    s.line(a, &format!("send {cat} from ann"));
    s.run_for(Duration::from_millis(10));
    let p = register.borrow_mut().take().unwrap();
    s.inject(p.from, p.to, p.payload);
    s.run_for(Duration::from_millis(10));
    assert!(online_at(&s, 1024, &cat));
    s.release(Some(udpchat::StoreFailure::Unreachable));
    let prompt = s.run_until(Duration::from_secs(3), |s| {
        (0..3).all(|i| {
            let text = format!("from ben {i}");
            s.lines(c2).iter().any(|l| l.contains(&text))
        })
    });
    s.feed_held = false;
    s.settle();
    let ann_said = s.lines_since(a, from);
    assert!(
        ann_said.iter().all(|l| !l.contains("saved]")),
        "{ann_said:?}"
    );
    let lines = s.lines(c2);
    for i in 0..3 {
        let text = format!("from ben {i}");
        let shown = lines.iter().filter(|l| l.contains(&text)).count();
        assert_eq!(shown, 1, "{lines:?}");
    }
    let dropped = (s.events.iter())
        .any(|e| matches!(e, udpchat::ServerEvent::Offline(n, false) if n.as_str() == cat));
    assert!(prompt && !dropped, "{lines:?} {:?}", s.events);
}
