//! Real NATs: each test makes its own network namespaces (it needs root;
//! where namespaces cannot be made it prints one `SKIPPED` line and passes),
//! a router namespace per client site that masquerades with nftables, and a
//! "wan" namespace whose bridge is the internet the server sits on. Every
//! address is from a documentation range (RFC 5737 for IPv4, RFC 3849 for
//! IPv6) and lives only inside the namespaces, which have no link to the
//! host's own network: nothing is routed anywhere else. The namespaces go
//! when the test ends, also when it fails.
//!
//! ```text
//!   wan: br0 203.0.113.1/24, 2001:db8::1/64 — the server
//!    ├─ nat0: 203.0.113.10 ⇄ 192.0.2.1/24    ─ host0: 192.0.2.2
//!    ├─ nat1: 203.0.113.11 ⇄ 198.51.100.1/24 ─ host1: 198.51.100.2
//!    └─ v6: 2001:db8::2/64 (no IPv4 at all)
//! ```

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Client, DEADLINE, SAVED, Server, TABLE, WELCOME};

/// How a site's router maps its clients' sockets.
#[derive(Clone, Copy)]
enum Nat {
    /// `masquerade`: Linux keeps the inside port where it can, one mapping
    /// per socket whatever the destination, and lets in only replies from
    /// where the inside sent to (a stateful firewall drops the rest).
    EndpointIndependent,
    /// `masquerade fully-random`: a random port per destination, so the
    /// port the server sees is of no use to a peer.
    Symmetric,
}

/// The namespaces of one test, deleted on drop.
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    sites: usize,
}

/// Runs a command line (words split on whitespace: `ip -n X link set lo
/// up`); panics with its stderr if it fails.
#[track_caller]
fn run(line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let out = Command::new(words[0])
        .args(&words[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (.ci/run installs it)", words[0]));
    assert!(
        out.status.success(),
        "{line} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The public address of site `k`'s router and its LAN prefix.
const SITES: [(&str, &str); 2] = [("203.0.113.10", "192.0.2"), ("203.0.113.11", "198.51.100")];
/// Where the server is, on the wan bridge.
const SERVER_V4: &str = "203.0.113.1";
const SERVER_V6: &str = "2001:db8::1";

/// Says that `test` is skipped and why, on the terminal even when the test
/// harness captures output (a passing test's `eprintln!` is never shown).
fn skip(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}\n");
    // Straight to file descriptor 2, past the harness's capture.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

impl Lab {
    /// The wan namespace with its bridge, or `None` (said on stderr) where
    /// this process cannot make network namespaces. With
    /// `UDPCHAT_NAT_TESTS=required` (as `.ci/run` sets where it can make
    /// them) a missing tool fails the test instead of skipping it.
    fn new(test: &str) -> Option<Lab> {
        let required = std::env::var("UDPCHAT_NAT_TESTS").is_ok_and(|v| v == "required");
        let tools = [
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("conntrack", "conntrack"),
        ];
        for (tool, package) in tools {
            if Command::new(tool).arg("--version").output().is_err() {
                let why = format!("{tool} is not installed (Debian package {package})");
                assert!(!required, "{why}");
                skip(test, &why);
                return None;
            }
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("udpchat-{}-{n}-", std::process::id());
        let wan = format!("{prefix}wan");
        let made = Command::new("ip").args(["netns", "add", &wan]).output();
        let failed = match made {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failed {
            let why = format!("cannot make network namespaces: {why}");
            assert!(!required, "{why}");
            skip(test, &why);
            return None;
        }
        let lab = Lab {
            prefix,
            namespaces: vec![wan.clone()],
            sites: 0,
        };
        run(&format!("ip -n {wan} link set lo up"));
        run(&format!("ip -n {wan} link add br0 type bridge"));
        run(&format!("ip -n {wan} link set br0 up"));
        run(&format!("ip -n {wan} addr add {SERVER_V4}/24 dev br0"));
        run(&format!(
            "ip -n {wan} addr add {SERVER_V6}/64 dev br0 nodad"
        ));
        Some(lab)
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> String {
        let ns = self.ns(name);
        run(&format!("ip netns add {ns}"));
        self.namespaces.push(ns.clone());
        run(&format!("ip -n {ns} link set lo up"));
        ns
    }

    /// The namespace the server runs in.
    fn wan(&self) -> String {
        self.ns("wan")
    }

    /// A host on the wan bridge (through the veth `port` there) whose end
    /// of the link is `eth0`.
    fn plug(&self, port: &str, ns: &str) {
        let wan = self.wan();
        run(&format!(
            "ip link add {port} netns {wan} type veth peer name eth0 netns {ns}"
        ));
        run(&format!("ip -n {wan} link set {port} master br0 up"));
    }

    /// A client site: a router namespace that masquerades (`nat`) between
    /// the wan bridge and a LAN, and a client namespace on that LAN.
    /// Returns the client namespace.
    fn site(&mut self, nat: Nat) -> String {
        let k = self.sites;
        self.sites += 1;
        let (public, lan) = SITES[k];
        let router = self.add_ns(&format!("nat{k}"));
        let host = self.add_ns(&format!("host{k}"));
        // The router's `eth0` faces the wan, `lan` its client.
        self.plug(&format!("up{k}"), &router);
        run(&format!("ip -n {router} addr add {public}/24 dev eth0"));
        run(&format!("ip -n {router} link set eth0 up"));
        run(&format!(
            "ip link add lan netns {router} type veth peer name eth0 netns {host}"
        ));
        run(&format!("ip -n {router} addr add {lan}.1/24 dev lan"));
        run(&format!("ip -n {router} link set lan up"));
        run(&format!("ip -n {host} addr add {lan}.2/24 dev eth0"));
        run(&format!("ip -n {host} link set eth0 up"));
        run(&format!("ip -n {host} route add default via {lan}.1"));
        run(&format!(
            "ip netns exec {router} sysctl -qw net.ipv4.ip_forward=1"
        ));
        let masquerade = match nat {
            Nat::EndpointIndependent => "masquerade",
            Nat::Symmetric => "masquerade fully-random",
        };
        // A home router: masquerading out of the wan, and a stateful
        // firewall that lets in only what answers the inside (unsolicited
        // datagrams are dropped before conntrack keeps them, as on any such
        // router).
        let rules = format!(
            "table ip nat {{
               chain post {{
                 type nat hook postrouting priority srcnat;
                 oifname \"eth0\" {masquerade}
               }}
             }}
             table inet filter {{
               chain input {{
                 type filter hook input priority 0; policy drop;
                 ct state established,related accept
                 iifname {{ \"lo\", \"lan\" }} accept
               }}
               chain forward {{
                 type filter hook forward priority 0; policy drop;
                 ct state established,related accept
                 iifname \"lan\" oifname \"eth0\" accept
               }}
             }}
            "
        );
        self.nft(&router, &rules);
        host
    }

    /// Loads nftables `rules` into namespace `ns`.
    #[track_caller]
    fn nft(&self, ns: &str, rules: &str) {
        let mut nft = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft");
        let written = nft.stdin.take().map(|mut s| s.write_all(rules.as_bytes()));
        let out = nft.wait_with_output().expect("nft ends");
        assert!(
            out.status.success() && matches!(written, Some(Ok(()))),
            "nft in {ns} failed: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Site `k`'s router forgets every mapping (as one that rebooted) and
    /// maps from another port range from now on: its client's datagrams
    /// leave from a new port, and nothing comes in at the old one.
    fn rebind(&self, k: usize) {
        let router = self.ns(&format!("nat{k}"));
        self.nft(
            &router,
            "flush chain ip nat post\n\
             add rule ip nat post oifname \"eth0\" meta l4proto udp masquerade to :20000-29999\n",
        );
        run(&format!("ip netns exec {router} conntrack -F"));
    }

    /// A host on the wan bridge with an IPv6 address only.
    fn v6_host(&mut self) -> String {
        let host = self.add_ns("v6");
        self.plug("up6", &host);
        run(&format!(
            "ip -n {host} addr add 2001:db8::2/64 dev eth0 nodad"
        ));
        run(&format!("ip -n {host} link set eth0 up"));
        host
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

const RECEIVED_BY_BOB: &str = ">>> [Message received by Bob.]";
const NO_ACK_BOB: &str = ">>> [No ACK from Bob, message sent to server.]";
const BOB_EXISTS: &str = ">>> [Client Bob exists!!]";

/// The status lines `client` prints for one direct message, up to its
/// outcome; table updates that come in between are left out.
#[track_caller]
fn outcome(client: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let Some(line) = client.next_line(DEADLINE) else {
            client.fail(&format!("no outcome after {lines:?}"));
        };
        if line == TABLE {
            continue;
        }
        let end = line.starts_with(">>> [Message received by ")
            || line == SAVED
            || line.starts_with(">>> [Error: ")
            || line.starts_with(">>> [Server not responding");
        lines.push(line);
        if end {
            return lines;
        }
    }
}

/// Waits until `client` shows a message from `from` ending in `text` (live
/// or stored); other lines on the way are passed over.
#[track_caller]
fn shows(client: &mut Client, from: &str, text: &str) {
    loop {
        let Some(line) = client.next_line(DEADLINE) else {
            client.fail(&format!("never showed {from}'s {text:?}"));
        };
        if line.starts_with(&format!(">>> {from}: ")) && line.ends_with(text) {
            return;
        }
    }
}

/// `list`'s rows on `client`, whose table has `rows` rows, by name: the
/// address and the rest of the row (status, then the path if any).
#[track_caller]
fn list(client: &mut Client, rows: usize) -> Vec<(String, String, String)> {
    client.send("list");
    let mut out = Vec::new();
    while out.len() < rows {
        let Some(line) = client.next_line(DEADLINE) else {
            client.fail("list printed too few rows");
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [">>>", name, addr, rest @ ..] = &fields[..]
            && !name.starts_with('[')
        {
            out.push((name.to_string(), addr.to_string(), rest.join(" ")));
        }
    }
    out
}

/// The row of `name` in `rows`.
#[track_caller]
fn row<'a>(rows: &'a [(String, String, String)], name: &str) -> &'a (String, String, String) {
    rows.iter()
        .find(|r| r.0 == name)
        .unwrap_or_else(|| panic!("no row for {name} in {rows:?}"))
}

/// A server in the wan namespace, and Alice and Bob at sites behind `nat`
/// (client flags `extra`), both registered and with each other in their
/// tables.
fn two_sites(lab: &mut Lab, nat: Nat, extra: &[&str]) -> (Server, Client, Client) {
    let a = lab.site(nat);
    let b = lab.site(nat);
    let server = Server::start_in(Some(&lab.wan()), extra);
    let mut alice = Client::start_in(Some(&a), "Alice", SERVER_V4, server.port(), extra);
    alice.expect_lines(&[WELCOME, TABLE]);
    let mut bob = Client::start_in(Some(&b), "Bob", SERVER_V4, server.port(), extra);
    bob.expect_lines(&[WELCOME, TABLE]);
    alice.expect(TABLE);
    (server, alice, bob)
}

/// Alice messages Bob twice, Bob answers: the first message falls back and
/// is received after the server's `exists`, the others are received at
/// once. Returns the end of Alice's `list` row for Bob (status and path).
#[track_caller]
fn converse(alice: &mut Client, bob: &mut Client) -> String {
    alice.send("send Bob knock knock");
    assert_eq!(outcome(alice), [NO_ACK_BOB, BOB_EXISTS, RECEIVED_BY_BOB]);
    bob.expect(">>> Alice: knock knock");
    alice.send("send Bob who is there");
    assert_eq!(outcome(alice), [RECEIVED_BY_BOB]);
    bob.expect(">>> Alice: who is there");
    bob.send("send Alice me");
    assert_eq!(outcome(bob), [">>> [Message received by Alice.]"]);
    shows(alice, "Bob", "me");
    let rows = list(alice, 2);
    row(&rows, "Bob").2.clone()
}

#[test]
fn behind_two_endpoint_independent_nats_clients_chat_directly_after_a_punch() {
    let test = "behind_two_endpoint_independent_nats_clients_chat_directly_after_a_punch";
    let Some(mut lab) = Lab::new(test) else {
        return;
    };
    let (mut server, mut alice, mut bob) = two_sites(&mut lab, Nat::EndpointIndependent, &[]);
    // The server records each at its router's public address.
    let rows = list(&mut alice, 2);
    assert!(row(&rows, "Bob").1.starts_with("203.0.113.11:"), "{rows:?}");

    // Bob's router drops Alice's first datagrams (nothing went out to her
    // yet); the server has Bob send towards her, and her retry gets in.
    // From then on, straight through both routers, both ways.
    assert_eq!(converse(&mut alice, &mut bob), "online punched");
    let log = server.stdout();
    assert!(!log.iter().any(|l| l.contains("relaying")), "{log:#?}");
}

#[test]
fn behind_two_symmetric_nats_clients_chat_through_the_relay() {
    let test = "behind_two_symmetric_nats_clients_chat_through_the_relay";
    let Some(mut lab) = Lab::new(test) else {
        return;
    };
    let (mut server, mut alice, mut bob) = two_sites(&mut lab, Nat::Symmetric, &[]);
    // The retry fails too: the server relays, and the conversation stays
    // on the relay, at once, both ways.
    assert_eq!(converse(&mut alice, &mut bob), "online relayed");
    server.expect_stdout("relaying a message from Alice to Bob");
    server.expect_stdout("relaying a message from Bob to Alice");
}

#[test]
fn a_nat_that_rebinds_a_clients_port_mid_conversation_loses_nothing() {
    let test = "a_nat_that_rebinds_a_clients_port_mid_conversation_loses_nothing";
    let Some(mut lab) = Lab::new(test) else {
        return;
    };
    let (mut server, mut alice, mut bob) = two_sites(&mut lab, Nat::EndpointIndependent, &[]);
    alice.send("send Bob before");
    assert_eq!(outcome(&mut alice).last().unwrap(), RECEIVED_BY_BOB);
    bob.expect(">>> Alice: before");
    let old = row(&list(&mut bob, 2), "Alice").1.clone();

    // Alice's router reboots onto other ports mid-conversation. Until her
    // next heartbeat (within 10 s) nobody, the server included, can reach
    // her: Bob's message is saved for her (or, if the beat came first,
    // goes through once the server knows her new port).
    lab.rebind(0);
    bob.send("send Alice during");
    let during = outcome(&mut bob);
    assert!(
        during
            .last()
            .is_some_and(|l| l == SAVED || l == ">>> [Message received by Alice.]"),
        "{during:?}"
    );
    shows(&mut alice, "Bob", "during");
    alice.send("send Bob after");
    let after = outcome(&mut alice);
    assert_eq!(after.last().unwrap(), RECEIVED_BY_BOB, "{after:?}");
    shows(&mut bob, "Alice", "after");
    // Her session and name moved with her, and everyone's table.
    server.expect_stdout("Alice moved to 203.0.113.10:2");
    let new = row(&list(&mut bob, 2), "Alice").1.clone();
    assert_ne!(new, old);
    assert!(new.starts_with("203.0.113.10:2"), "{new}");
    // Each message shown once, and she never had to register again.
    alice.close_stdin();
    bob.close_stdin();
    alice.wait_exit(DEADLINE);
    bob.wait_exit(DEADLINE);
    let a = alice.transcript();
    let b = bob.transcript();
    assert_eq!(
        a.iter().filter(|l| l.ends_with(" during")).count(),
        1,
        "{a:#?}"
    );
    assert_eq!(
        b.iter().filter(|l| l.ends_with(": after")).count(),
        1,
        "{b:#?}"
    );
    assert!(
        !a.iter().any(|l| l.contains("[Reconnected to server.]")),
        "{a:#?}"
    );
    assert_eq!(a.iter().filter(|l| *l == WELCOME).count(), 1, "{a:#?}");
}

#[test]
fn an_ipv6_client_and_an_ipv4_client_chat_through_a_dual_stack_server() {
    let test = "an_ipv6_client_and_an_ipv4_client_chat_through_a_dual_stack_server";
    let Some(mut lab) = Lab::new(test) else {
        return;
    };
    let v4 = lab.site(Nat::EndpointIndependent);
    let v6 = lab.v6_host();
    let mut server = Server::start_in(Some(&lab.wan()), &[]);
    let mut carol = Client::start_in(Some(&v6), "Carol", SERVER_V6, server.port(), &[]);
    carol.expect_lines(&[WELCOME, TABLE]);
    let mut dave = Client::start_in(Some(&v4), "Dave", SERVER_V4, server.port(), &[]);
    dave.expect_lines(&[WELCOME, TABLE]);
    carol.expect(TABLE);
    // One server socket, both families, each client at its own.
    let rows = list(&mut carol, 2);
    assert!(
        row(&rows, "Dave").1.starts_with("203.0.113.10:"),
        "{rows:?}"
    );
    let rows = list(&mut dave, 2);
    assert!(
        row(&rows, "Carol").1.starts_with("[2001:db8::2]:"),
        "{rows:?}"
    );
    // Neither host can reach the other's family: the server relays.
    carol.send("send Dave from IPv6");
    assert_eq!(
        outcome(&mut carol).last().unwrap(),
        ">>> [Message received by Dave.]"
    );
    shows(&mut dave, "Carol", "from IPv6");
    dave.send("send Carol from IPv4");
    assert_eq!(
        outcome(&mut dave).last().unwrap(),
        ">>> [Message received by Carol.]"
    );
    shows(&mut carol, "Dave", "from IPv4");
    server.expect_stdout("Carol registered from [2001:db8::2]:");
    server.expect_stdout("Dave registered from 203.0.113.10:");
}
