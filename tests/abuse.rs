//! What one source can take from the server, on the real state machines
//! over the in-memory network: new names are rationed per address, so one
//! host cannot fill the registry; known names and other hosts are not held
//! back.

mod sim;

use std::net::SocketAddr;
use std::time::Duration;

use sim::{Sim, key_of};
use udpchat::store::Store;

const WELCOME: &str = ">>> [Welcome, You are registered.]";
const TOO_MANY: &str = ">>> [Error: too many new names from this address lately; try again later.]";

fn at(host: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((host, port))
}

/// A server giving each source 3 new names, one more every 10 s.
fn rationed() -> Sim {
    Sim::with(|c| c.new_names = (3, Duration::from_secs(10)))
}

/// Starts `name` at `addr` and runs until its registration settled.
fn join_at(s: &mut Sim, name: &str, addr: SocketAddr) -> usize {
    let pin = Some(s.server.public_key());
    let i = s.spawn_at(name, addr, key_of(name), pin);
    s.run_until(Duration::from_secs(10), |s| {
        s.nodes[i].exit.is_some() || (s.nodes[i].client.is_idle() && s.quiet())
    });
    i
}

#[test]
fn one_address_gets_its_ration_of_new_names_and_no_more() {
    let mut s = rationed();
    let host = [198, 51, 100, 7];
    for (k, n) in ["m1", "m2", "m3"].into_iter().enumerate() {
        let i = join_at(&mut s, n, at(host, 4000 + k as u16));
        assert_eq!(s.lines(i).first(), Some(&WELCOME), "{n}");
    }
    // The fourth from the same host, on any port, is refused and exits 1;
    // no row is made for it.
    let i = join_at(&mut s, "m4", at(host, 4100));
    assert_eq!(s.lines(i), [TOO_MANY]);
    assert_eq!(s.nodes[i].exit, Some(1));
    assert_eq!(s.server.table().len(), 3);
    // Another host is not held back.
    let other = join_at(&mut s, "Alice", at([203, 0, 113, 5], 2000));
    assert_eq!(s.lines(other).first(), Some(&WELCOME));
    // A name the host already has logs in again (a new process, new port).
    s.crash(0);
    let again = join_at(&mut s, "m1", at(host, 4200));
    assert!(
        s.lines(again).iter().all(|l| *l != TOO_MANY),
        "{:?}",
        s.lines(again)
    );
    assert!(s.nodes[again].exit.is_none());
    // Ten seconds later the host has earned one more.
    s.run_for(Duration::from_secs(10));
    let i = join_at(&mut s, "m5", at(host, 4300));
    assert_eq!(s.lines(i).first(), Some(&WELCOME));
    let i = join_at(&mut s, "m6", at(host, 4301));
    assert_eq!(s.lines(i), [TOO_MANY]);
}

/// 200 joins at once from four hosts (say, four offices behind NATs):
/// the default ration lets every one in.
#[test]
fn a_registration_storm_from_a_few_hosts_is_not_rationed_by_default() {
    let mut s = Sim::new();
    let joined: Vec<usize> = (0..200u16)
        .map(|k| {
            let pin = Some(s.server.public_key());
            let name = format!("n{k}");
            s.spawn_at(
                &name,
                at([198, 51, 100, (k % 4) as u8 + 1], 5000 + k),
                key_of(&name),
                pin,
            )
        })
        .collect();
    s.settle();
    for i in joined {
        assert_eq!(s.lines(i).first(), Some(&WELCOME), "node {i}");
    }
    assert_eq!(s.server.table().len(), 200);
}

const SAVED: &str = ">>> [Messages received by the server and saved]";
const SLOW_DOWN: &str = ">>> [Error: too many requests from this address just now; not saved — send it again in a moment.]";

/// A server allowing each source 12 requests at once, one more a second.
fn metered() -> Sim {
    Sim::with(|c| c.requests = (12, Duration::from_secs(1)))
}

#[test]
fn one_address_gets_its_rate_of_requests_and_other_hosts_are_not_held_back() {
    let mut s = metered();
    let host = [198, 51, 100, 9];
    let alice = join_at(&mut s, "Alice", at(host, 2000));
    let bob = join_at(&mut s, "Bob", at([203, 0, 113, 7], 2000));
    let a = s.nodes[bob].lines.len();
    s.command(bob, "dereg Bob");
    assert_eq!(s.lines_since(bob, a), [">>> [You are Offline. Bye.]"]);
    s.settle();
    // Thirty saves at once from Alice's host: the rest of its burst is
    // saved, every one past it is refused, said so, and not stored.
    let a = s.nodes[alice].lines.len();
    for k in 0..30 {
        s.line(alice, &format!("send Bob m{k}"));
    }
    s.settle();
    let lines = s.lines_since(alice, a);
    let saved = lines.iter().filter(|l| **l == SAVED).count();
    let refused = lines.iter().filter(|l| **l == SLOW_DOWN).count();
    assert_eq!(saved + refused, 30, "{lines:?}");
    assert!((1..=12).contains(&saved), "{saved} saved: {lines:?}");
    assert_eq!(s.mailbox("Bob").len(), saved);
    // Another host is not held back.
    let carol = join_at(&mut s, "Carol", at([203, 0, 113, 8], 2000));
    let c = s.nodes[carol].lines.len();
    s.command(carol, "send Bob from carol");
    assert!(s.lines_since(carol, c).contains(&SAVED));
    // A few seconds later Alice's host has earned more.
    s.run_for(Duration::from_secs(5));
    let a = s.nodes[alice].lines.len();
    s.command(alice, "send Bob later");
    assert!(
        s.lines_since(alice, a).contains(&SAVED),
        "{:?}",
        s.lines_since(alice, a)
    );
    assert_eq!(s.mailbox("Bob").len(), saved + 2);
}

#[test]
fn syncs_and_heartbeats_over_the_rate_are_only_delayed() {
    // Five requests at once, one a second: a joiner's sync and a few
    // heartbeats fit; twenty clients on one host joining at once do not,
    // yet every one registers and gets the whole table (retries find the
    // bucket refilled), none is told to register again.
    let mut s = Sim::with(|c| c.requests = (5, Duration::from_millis(100)));
    let host = [198, 51, 100, 10];
    let joined: Vec<usize> = (0..20u16)
        .map(|k| {
            let pin = Some(s.server.public_key());
            let name = format!("h{k}");
            s.spawn_at(&name, at(host, 6000 + k), key_of(&name), pin)
        })
        .collect();
    let done = s.run_until(Duration::from_secs(120), |s| {
        joined
            .iter()
            .all(|&i| s.nodes[i].client.table().len() == 20 && s.nodes[i].client.is_online())
    });
    assert!(done);
    assert!(s.server.stats().limited > 0, "the rate was never reached");
    for i in joined {
        assert_eq!(s.lines(i).first(), Some(&WELCOME), "node {i}");
        assert!(
            !s.lines(i).iter().any(|l| l.contains("Reconnected")),
            "{:?}",
            s.lines(i)
        );
    }
}

/// The names the server said it forgot, with the days each was unseen.
fn forgotten<'a>(events: impl IntoIterator<Item = &'a udpchat::ServerEvent>) -> Vec<(String, i64)> {
    (events.into_iter())
        .filter_map(|e| match e {
            udpchat::ServerEvent::Forgotten { name, days } => Some((name.to_string(), *days)),
            _ => None,
        })
        .collect()
}

/// The names in the store's registry, in registration order.
fn registry(s: &mut Sim) -> Vec<String> {
    (s.store.load().unwrap().clients.iter())
        .map(|c| c.name.to_string())
        .collect()
}

/// Node `i`'s first line.
fn first_line(s: &Sim, i: usize) -> Option<&str> {
    s.nodes[i].lines.first().map(String::as_str)
}

/// A client online for longer than a day has its "last seen" written again,
/// so a name online without a break is not forgotten at the next start
/// however long ago it logged in.
#[test]
fn a_name_online_for_days_is_not_taken_for_unseen() {
    let mut s = Sim::new();
    s.join("Alice", 2000);
    s.run_for(Duration::from_secs(25 * 3600));
    assert!(s.server.table().iter().any(|(_, e)| e.online));
    s.crash(0);
    // The restart comes 365 days and 13 hours after her login, 365 days
    // less 11 hours after the last time she was written down as seen.
    let later = sim::EPOCH_UNIX + 365 * 86_400 - 12 * 3600;
    let config = udpchat::ServerConfig::new([2; 32], sim::server_key(), (s.start, later));
    s.server = udpchat::Server::new(config, s.now, s.store.load().unwrap());
    let events: Vec<_> = std::iter::from_fn(|| s.server.poll_event()).collect();
    assert_eq!(forgotten(&events), []);
    assert!(s.server.table().lookup(&sim::name("Alice")).is_some());
}

/// A name not online for the name time-to-live, and named by no stored
/// mail, is forgotten when the server starts again: a full registry has
/// room again, and the next key to register the name owns it. Names mail
/// is waiting for, or was sent by, stay.
#[test]
fn names_not_seen_for_their_time_to_live_are_forgotten_at_the_next_start() {
    // Mail kept for good, so that Bob's is still there a year on.
    let four = |c: &mut udpchat::ServerConfig| {
        c.max_clients = 4;
        c.mail_ttl = None;
    };
    let mut s = Sim::with(four);
    for (i, n) in ["Alice", "Bob", "Carol", "Dave"].iter().enumerate() {
        s.join(n, 2000 + i as u16);
    }
    s.command(1, "dereg Bob");
    s.command(2, "dereg Carol");
    s.command(3, "send Bob see you next year");
    let erin = join_at(&mut s, "Erin", at([127, 0, 0, 1], 2004));
    assert_eq!(
        s.nodes[erin].lines.last().map(String::as_str),
        Some(">>> [Error: the server is full; try again later.]")
    );
    s.crash(0);
    s.crash(3);

    // A year and a day later, the server starts again.
    let later = sim::EPOCH_UNIX + 366 * 86_400;
    let mut config = udpchat::ServerConfig::new([2; 32], sim::server_key(), (s.start, later));
    four(&mut config);
    let loaded = s.store.load().unwrap();
    s.server = udpchat::Server::new(config, s.now, loaded);
    let events: Vec<_> = std::iter::from_fn(|| s.server.poll_event()).collect();
    // Alice was online until the restart, but is last known at her login.
    assert_eq!(
        forgotten(&events),
        [("Alice".to_string(), 366), ("Carol".to_string(), 366)]
    );
    // What the driver does first: commit what the start asked for.
    let ops: Vec<_> = std::iter::from_fn(|| s.server.poll_store()).collect();
    s.store.commit(&ops).unwrap();
    s.server.handle_committed();
    assert_eq!(registry(&mut s), ["Bob", "Dave"]);

    let erin = join_at(&mut s, "Erin", at([127, 0, 0, 1], 2005));
    assert_eq!(first_line(&s, erin), Some(WELCOME));
    let pin = Some(s.server.public_key());
    let carol = s.spawn_at(
        "Carol",
        at([127, 0, 0, 1], 2006),
        key_of("another Carol"),
        pin,
    );
    s.settle();
    assert_eq!(first_line(&s, carol), Some(WELCOME));
    // Bob's mail is still his.
    let bob: Vec<String> = s.mailbox("Bob").into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(bob, ["see you next year"]);
}

/// While the server runs, a name silent past its time-to-live is forgotten
/// within the hour: its row goes to the next new name even in a full
/// registry, the others see the newcomer, and a message for the forgotten
/// name is refused rather than stored for nobody.
#[test]
fn names_not_seen_for_their_time_to_live_are_forgotten_while_the_server_runs() {
    let mut s = Sim::with(|c| {
        c.max_clients = 3;
        c.name_ttl = Some(Duration::from_secs(1800));
    });
    s.join("Alice", 2000);
    s.join("Bob", 2001);
    s.join("Carol", 2002);
    // Carol falls silent: marked offline after three missed heartbeats.
    s.crash(2);
    s.run_for(Duration::from_secs(2 * 3600 + 60));
    // Alice and Bob were online all along.
    let names: Vec<String> = forgotten(&s.events).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["Carol"]);
    assert!(s.server.table().lookup(&sim::name("Carol")).is_none());
    assert_eq!(s.server.table().len(), 2);
    assert_eq!(registry(&mut s), ["Alice", "Bob"]);

    let dave = join_at(&mut s, "Dave", at([127, 0, 0, 1], 2003));
    assert_eq!(first_line(&s, dave), Some(WELCOME));
    assert_eq!(s.server.table().len(), 3);
    s.settle();
    let alice = s.nodes[0].client.table();
    assert!(alice.get(&sim::name("Dave")).is_some_and(|e| e.online));
    // Alice still has Carol, offline; the server no longer takes mail for her.
    let a = s.nodes[0].lines.len();
    s.command(0, "send Carol are you there?");
    let said = s.lines_since(0, a);
    assert!(
        said.iter().any(|l| l.starts_with(">>> [Error:")) && !said.contains(&SAVED),
        "{said:?}"
    );
    assert!(s.mailbox("Carol").is_empty());
    // Dave's row is Dave's: a message to him is his.
    s.command(3, "dereg Dave");
    s.command(0, "send Dave hello Dave");
    let dave_mail: Vec<String> = s.mailbox("Dave").into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(dave_mail, ["hello Dave"]);
}

/// A deregistered client's session is kept a presence timeout (so a retried
/// dereg still finds its answer) and then dropped: its name is forgotten
/// after its time-to-live like a silent one's, and `reg` still logs back in
/// (every registration is a fresh handshake).
#[test]
fn a_deregistered_name_is_let_go_like_a_silent_one() {
    let mut s = Sim::with(|c| c.name_ttl = Some(Duration::from_secs(1800)));
    s.join("Alice", 2000);
    s.join("Bob", 2001);
    s.command(1, "dereg Bob");
    assert_eq!(
        s.server.sessions().1,
        2,
        "Bob's session, for a retried dereg"
    );
    s.run_for(Duration::from_secs(31));
    assert_eq!(s.server.sessions().1, 1, "only Alice's is left");

    s.command(1, "reg Bob");
    let bob = s.server.table().lookup(&sim::name("Bob")).unwrap();
    assert!(s.server.table().get(bob).online);
    s.command(1, "dereg Bob");
    s.run_for(Duration::from_secs(2 * 3600 + 60));
    let names: Vec<String> = forgotten(&s.events).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["Bob"]);
    assert_eq!(s.server.sessions().1, 1);
}
