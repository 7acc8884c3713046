//! Reaching every online client: a dual-stack server and clients of both
//! families, and a server found under any of its host name's addresses.

mod common;

use std::net::UdpSocket;

use common::{Client, Server, chat};

const WELCOME: &str = ">>> [Welcome, You are registered.]";
const TABLE: &str = ">>> [Client table updated.]";

/// Whether this host has IPv6 loopback; if not, says so in one line.
fn ipv6_loopback(test: &str) -> bool {
    let ok = UdpSocket::bind("[::1]:0").is_ok();
    if !ok {
        eprintln!("SKIPPED {test}: this host has no IPv6 loopback (::1)");
    }
    ok
}

/// `list`'s row for `name` on `client`, whose table has `rows` rows (all
/// of them are read).
fn row(client: &mut Client, rows: usize, name: &str) -> String {
    client.send("list");
    assert_eq!(common::list_header(client).1, rows);
    let mut found = None;
    for _ in 0..rows {
        let Some(line) = client.next_line(common::DEADLINE) else {
            client.fail(&format!("list gave fewer than {rows} rows"));
        };
        if line
            .strip_prefix(">>> ")
            .and_then(|l| l.split_whitespace().next())
            == Some(name)
        {
            found = Some(line);
        }
    }
    found.unwrap_or_else(|| client.fail(&format!("no list row for {name}")))
}

/// The first case: IPv4 clients of a server listening on `[::]`
/// were recorded as `[::ffff:127.0.0.1]:port`. Now one default server takes
/// both families, records IPv4 as plain IPv4, and its IPv4 and IPv6
/// clients chat directly both ways.
#[test]
fn an_ipv4_and_an_ipv6_client_chat_directly_through_the_default_server() {
    if !ipv6_loopback("an_ipv4_and_an_ipv6_client_chat_directly_through_the_default_server") {
        return;
    }
    let server = Server::start();
    let mut alice = Client::start_on("Alice", "127.0.0.1", server.port(), &[]);
    alice.expect_lines(&[WELCOME, TABLE]);
    let mut bob = Client::start_on("Bob", "::1", server.port(), &[]);
    bob.expect_lines(&[WELCOME, TABLE]);
    alice.expect(TABLE);

    let alice_row = row(&mut bob, 2, "Alice");
    assert!(
        alice_row.contains(&format!(" 127.0.0.1:{} ", alice.port())),
        "{alice_row}"
    );
    let bob_row = row(&mut alice, 2, "Bob");
    assert!(
        bob_row.contains(&format!(" [::1]:{} ", bob.port())),
        "{bob_row}"
    );
    chat(&mut alice, &mut bob, "over IPv6");
    chat(&mut bob, &mut alice, "over IPv4");
}

/// `--bind ::` is the same dual-stack listener: an IPv4 client is at its
/// plain address there too, and is reached.
#[test]
fn bind_unspecified_ipv6_still_records_ipv4_clients_as_ipv4() {
    if !ipv6_loopback("bind_unspecified_ipv6_still_records_ipv4_clients_as_ipv4") {
        return;
    }
    let server = Server::start_with(&["--bind", "::"]);
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    let alice_row = row(&mut bob, 2, "Alice");
    assert!(
        alice_row.contains(&format!(" 127.0.0.1:{} ", alice.port())),
        "{alice_row}"
    );
    chat(&mut bob, &mut alice, "no mapped address");
}

/// The second case: `localhost` tried only 127.0.0.1. Now it tries
/// both loopbacks, so a server that listens on ::1 alone is found.
#[test]
fn localhost_finds_a_server_that_listens_on_ipv6_only() {
    if !ipv6_loopback("localhost_finds_a_server_that_listens_on_ipv6_only") {
        return;
    }
    let server = Server::start_with(&["--bind", "::1"]);
    let mut alice = Client::start_on("Alice", "localhost", server.port(), &[]);
    alice.expect_lines(&[WELCOME, TABLE]);
    let mut bob = Client::start_on("Bob", "localhost", server.port(), &[]);
    bob.expect_lines(&[WELCOME, TABLE]);
    alice.expect(TABLE);
    chat(&mut alice, &mut bob, "found you");
}
