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
    let rows: Vec<&str> = run.stdout[2..]
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
