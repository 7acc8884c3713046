//! The server's log as an operator reads it: a time stamp on every line,
//! where the data lives, what happened to mail, and a periodic summary.

mod common;

use common::{Client, SAVED, Server, TABLE, unstamped};

/// Whether `stamp` is RFC 3339 in UTC to the millisecond
/// (`2026-12-06T21:15:03.042Z`).
fn is_rfc3339(stamp: &str) -> bool {
    let b = stamp.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[test]
fn every_line_is_stamped_and_the_start_says_where_the_data_is() {
    let mut server = Server::start_with(&["--data-dir", "data"]);
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    bob.send("dereg Bob");
    bob.expect(">>> [You are Offline. Bye.]");
    alice.expect(TABLE);
    alice.send("send Bob kept for you");
    alice.expect_lines(&[">>> [Bob is offline, message sent to server.]", SAVED]);
    bob.send("reg Bob");
    bob.expect(">>> [You Have Messages]");
    bob.expect(">>> Alice: <ts> kept for you");
    bob.expect(TABLE);
    alice.expect(TABLE);
    server.expect_stdout("delivered a stored message from Alice to Bob: acked and deleted");
    let log = server.stdout();
    for line in &log {
        let (stamp, _) = line.split_once(' ').unwrap_or_default();
        assert!(is_rfc3339(stamp), "an unstamped line: {line:?}");
    }
    let data = std::fs::canonicalize(server.dir().join("data")).unwrap();
    let lines: Vec<&str> = log.iter().map(|l| unstamped(l)).collect();
    assert!(
        lines[0].starts_with("udpchat server listening on "),
        "{lines:#?}"
    );
    assert!(lines[1].starts_with("server key "), "{lines:#?}");
    assert_eq!(lines[2], format!("data dir data ({})", data.display()));
    let order: Vec<&&str> = lines.iter().filter(|l| l.contains("from Alice")).collect();
    assert_eq!(
        order,
        [
            &"stored a message from Alice for Bob",
            &"delivered a stored message from Alice to Bob: acked and deleted"
        ],
        "{lines:#?}"
    );
    alice.finish();
    bob.finish();
}

#[test]
fn a_summary_says_who_is_here_and_what_came_and_went() {
    let mut server = Server::start_with(&["--summary-every", "1s"]);
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    common::chat(&mut alice, &mut bob, "hello");
    server.expect_stdout("summary: 2 online, 2 registered, 0 stored messages; in the last ");
    let log = server.stdout();
    let summary = log
        .iter()
        .map(|l| unstamped(l))
        .find(|l| l.starts_with("summary: 2 online"))
        .unwrap();
    for part in [
        " datagrams in, ",
        " out, ",
        " malformed, ",
        " ignored, ",
        " rate-limited, ",
    ] {
        assert!(summary.contains(part), "{summary}");
    }
    alice.finish();
    bob.finish();
}
