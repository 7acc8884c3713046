//! The console as a script sees it (stdin a pipe): every line carried out,
//! in order, however many come at once; `list` only once the table is
//! there; an exit status that says whether every command succeeded.

mod common;

use std::time::Duration;

use common::{Client, Server, TABLE, WELCOME, run_script};

/// A script's generous deadline: 10,000 messages on a noisy 2-core machine.
const SCRIPT: Duration = Duration::from_secs(300);

#[test]
fn a_piped_script_of_ten_thousand_sends_is_carried_out_in_order() {
    let server = Server::start();
    let [mut bob] = Client::join_all(&server, ["Bob"]);
    const N: usize = 10_000;
    let script: String = (1..=N).map(|i| format!("send Bob m{i}\n")).collect();
    let run = run_script("Alice", server.port(), script, SCRIPT);
    // Every line carried out: one outcome each, every one received, none
    // refused or dropped for want of room.
    let received = run
        .stdout
        .iter()
        .filter(|l| *l == ">>> [Message received by Bob.]")
        .count();
    let errors: Vec<&String> = run.stdout.iter().filter(|l| l.contains("Error")).collect();
    assert_eq!(received, N, "errors: {errors:?}");
    assert_eq!(run.status.code(), Some(0), "{:?}", run.stderr);
    // Bob showed each once, in the script's order.
    let mut shown = Vec::new();
    while shown.len() < N {
        let Some(line) = bob.next_line(common::DEADLINE) else {
            bob.fail(&format!("showed {} of {N}", shown.len()));
        };
        if let Some(text) = line.strip_prefix(">>> Alice: ") {
            shown.push(text.to_string());
        }
    }
    let sent: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    assert!(shown == sent, "Bob's order differs from the script's");
    bob.finish();
}

#[test]
fn a_piped_list_waits_for_the_table() {
    let server = Server::start();
    let [mut bob] = Client::join_all(&server, ["Bob"]);
    // `list` is in the pipe before Alice's first datagram leaves.
    let run = run_script("Alice", server.port(), "list\n".into(), common::DEADLINE);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout[..2], [WELCOME, TABLE], "{:?}", run.stdout);
    assert_eq!(run.stdout[2], ">>> [Client table: 2 of 2 online.]");
    let rows: Vec<&str> = run.stdout[3..]
        .iter()
        .filter_map(|l| l.strip_prefix(">>> ")?.split_whitespace().next())
        .collect();
    assert_eq!(rows, ["Alice", "Bob"], "{:?}", run.stdout);
    bob.expect(TABLE);
    bob.finish();
}

#[test]
fn a_script_with_a_failing_command_runs_the_rest_and_exits_3() {
    let server = Server::start();
    let [mut bob] = Client::join_all(&server, ["Bob"]);
    let script = "send Nobody hello\nsend Bob after the error\n".to_string();
    let run = run_script("Alice", server.port(), script, common::DEADLINE);
    assert!(
        run.stdout
            .iter()
            .any(|l| l.starts_with(">>> [Error: unknown client Nobody")),
        "{:?}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&">>> [Message received by Bob.]".to_string()),
        "{:?}",
        run.stdout
    );
    assert_eq!(run.status.code(), Some(3), "{run:?}");
    bob.expect(TABLE);
    bob.expect(">>> Alice: after the error");
    bob.finish();
}

#[test]
fn quit_leaves_telling_the_server_and_exits_0() {
    let server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    alice.send("quit");
    alice.expect(">>> [You are Offline. Bye.]");
    alice.expect_exit(0);
    // The server was told: Bob's table has her offline at once.
    bob.expect(TABLE);
    bob.send("send Alice are you there");
    bob.expect_lines(&[
        ">>> [Alice is offline, message sent to server.]",
        common::SAVED,
    ]);
    bob.finish();
}

#[test]
fn quit_while_offline_exits_at_once() {
    let server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    alice.send("dereg Alice");
    alice.expect(">>> [You are Offline. Bye.]");
    bob.expect(TABLE);
    alice.send("quit");
    alice.expect_exit(0);
    bob.expect_quiet(common::QUIET);
    bob.finish();
}

#[test]
fn help_lists_every_command_and_the_editing_keys() {
    let server = Server::start();
    let [mut alice] = Client::join_all(&server, ["Alice"]);
    alice.send("help");
    let mut help = Vec::new();
    while help
        .last()
        .is_none_or(|l: &String| !l.starts_with(">>> Ctrl+C"))
    {
        let Some(line) = alice.next_line(common::DEADLINE) else {
            alice.fail("help ended early");
        };
        help.push(line);
    }
    let text = help.join("\n");
    for word in [
        "send <name>",
        "send_all",
        "dereg",
        "reg <your name>",
        "list",
        "help",
        "quit",
        "Ctrl+U",
        "Ctrl+K",
        "Ctrl+W",
        "Ctrl+L",
        "Ctrl+D",
        "Ctrl+C",
        "Up/Down",
        "Tab",
    ] {
        assert!(text.contains(word), "help does not mention {word}:\n{text}");
    }
    alice.finish();
}

#[test]
fn presence_lines_follow_the_table_update_that_brought_them() {
    let server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    bob.send("quit");
    bob.expect(">>> [You are Offline. Bye.]");
    bob.expect_exit(0);
    alice.expect(TABLE);
    alice.expect(">>> [Bob is offline.]");
    alice.close_stdin();
    alice.expect_exit(0);
    let lines = alice.transcript();
    assert_eq!(
        lines,
        [
            WELCOME,
            TABLE,
            TABLE,
            ">>> [Bob is online.]",
            TABLE,
            ">>> [Bob is offline.]"
        ],
        "{lines:#?}"
    );
}

#[test]
fn list_has_a_header_marks_you_shows_your_real_state_and_aligns_wide_names() {
    use unicode_width::UnicodeWidthStr;
    let server = Server::start();
    let [mut alice, mut li] = Client::join_all(&server, ["Alice", "李雷"]);
    let list = |client: &mut Client| -> Vec<String> {
        client.send("list");
        let header = client.next_line(common::DEADLINE).unwrap();
        let rows = (0..2).map(|_| client.next_line(common::DEADLINE).unwrap());
        std::iter::once(header).chain(rows).collect()
    };
    let lines = list(&mut alice);
    assert_eq!(lines[0], ">>> [Client table: 2 of 2 online.]");
    assert!(lines[1].starts_with(">>> Alice  "), "{lines:#?}");
    assert!(lines[1].ends_with("online   (you)"), "{lines:#?}");
    assert!(lines[2].starts_with(">>> 李雷   "), "{lines:#?}");
    assert!(lines[2].ends_with("online"), "{lines:#?}");
    // The address column starts at the same screen column in both rows,
    // though 李雷 is 6 bytes and 4 columns, Alice 5 and 5.
    let column = |row: &str| row[..row.find("127.0.0.1").unwrap()].width();
    assert_eq!(column(&lines[1]), column(&lines[2]), "{lines:#?}");
    // Deregistered: the table (no deltas come any more) is stale, but
    // her own row says what she is.
    alice.send("dereg Alice");
    alice.expect(">>> [You are Offline. Bye.]");
    li.expect(TABLE);
    let lines = list(&mut alice);
    assert_eq!(lines[0], ">>> [Client table: 1 of 2 online.]");
    assert!(lines[1].ends_with("offline  (you)"), "{lines:#?}");
    alice.finish();
    li.finish();
}

/// `HH:MM:SS ` and the rest, if `line` is `>>> HH:MM:SS rest`.
fn after_clock(line: &str) -> Option<&str> {
    let rest = line.strip_prefix(">>> ")?;
    let (clock, rest) = rest.split_at_checked(9)?;
    let b = clock.as_bytes();
    let ok = b[2] == b':' && b[5] == b':' && b[8] == b' ';
    let digits = [0, 1, 3, 4, 6, 7].iter().all(|&i| b[i].is_ascii_digit());
    (ok && digits).then_some(rest)
}

#[test]
fn timestamps_start_live_lines_with_the_time_of_day() {
    let server = Server::start();
    let [mut bob] = Client::join_all(&server, ["Bob"]);
    let mut alice = Client::start_with("Alice", server.port(), &["--timestamps"]);
    let next = |c: &mut Client| c.next_line(common::DEADLINE).unwrap();
    assert_eq!(
        after_clock(&next(&mut alice)),
        Some("[Welcome, You are registered.]")
    );
    assert_eq!(
        after_clock(&next(&mut alice)),
        Some("[Client table updated.]")
    );
    bob.expect(TABLE);
    bob.send("send Alice hi");
    assert_eq!(after_clock(&next(&mut alice)), Some("Bob: hi"));
    bob.expect(">>> [Message received by Alice.]");
    // `list` output is a listing, not something that happened: no clock.
    alice.send("list");
    assert_eq!(next(&mut alice), ">>> [Client table: 2 of 2 online.]");
    assert!(next(&mut alice).starts_with(">>> Alice  "));
    assert!(next(&mut alice).starts_with(">>> Bob    "));
    // A command's error happened now: a clock.
    alice.send("send Bob");
    assert_eq!(
        after_clock(&next(&mut alice)),
        Some("[Error: usage: send <name> <message>]")
    );
    // A stored message keeps its own stamp, and gets no clock.
    alice.send("dereg Alice");
    assert_eq!(
        after_clock(&next(&mut alice)),
        Some("[You are Offline. Bye.]")
    );
    bob.expect(TABLE);
    bob.send("send Alice later");
    bob.expect_lines(&[
        ">>> [Alice is offline, message sent to server.]",
        common::SAVED,
    ]);
    alice.send("reg Alice");
    assert_eq!(after_clock(&next(&mut alice)), Some("[You Have Messages]"));
    let stored = next(&mut alice);
    assert!(
        stored.starts_with(">>> Bob: ")
            && stored.ends_with(" later")
            && after_clock(&stored).is_none(),
        "{stored}"
    );
    assert_eq!(
        after_clock(&next(&mut alice)),
        Some("[Client table updated.]")
    );
    bob.expect(TABLE);
    alice.finish_failed();
    bob.finish();
}

#[test]
fn a_script_that_fails_then_quits_exits_3() {
    let server = Server::start();
    let [mut bob] = Client::join_all(&server, ["Bob"]);
    let script = "send Nobody hello\nquit\n".to_string();
    let run = run_script("Alice", server.port(), script, common::DEADLINE);
    assert!(
        run.stdout
            .contains(&">>> [You are Offline. Bye.]".to_string()),
        "{run:?}"
    );
    assert_eq!(run.status.code(), Some(3), "{run:?}");
    bob.close_stdin();
    bob.expect_exit(0);
}

#[test]
fn a_script_waits_for_its_dereg_before_the_next_line() {
    let server = Server::start();
    let [mut bob] = Client::join_all(&server, ["Bob"]);
    let script = "dereg Alice\nreg Alice\nsend Bob back again\n".to_string();
    let run = run_script("Alice", server.port(), script, common::DEADLINE);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    let at = |line: &str| run.stdout.iter().position(|l| l == line);
    let bye = at(">>> [You are Offline. Bye.]").expect("the dereg's answer");
    let received = at(">>> [Message received by Bob.]").expect("the send's outcome");
    assert!(bye < received, "{:?}", run.stdout);
    assert!(
        !run.stdout.iter().any(|l| l.contains("Error")),
        "{:?}",
        run.stdout
    );
    // Bob's table lines come as the deltas gather Alice's comings and
    // goings; then her message.
    while bob.next_line(common::DEADLINE).as_deref() == Some(TABLE) {}
    assert_eq!(
        bob.transcript().last().map(String::as_str),
        Some(">>> Alice: back again")
    );
    bob.finish();
}
