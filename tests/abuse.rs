//! What one source can take from the server, on the real state machines
//! over the in-memory network: new names are rationed per address, so one
//! host cannot fill the registry; known names and other hosts are not held
//! back.

mod sim;

use std::net::SocketAddr;
use std::time::Duration;

use sim::{Sim, key_of};

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
