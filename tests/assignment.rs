//! The twelve test cases of the assignment (seeds/000, "Test-case 1" to 12),
//! run against the real binary on loopback, with the console wording of
//! SPEC.md §2. Each test asserts every client's whole stdout, line by line.

mod common;

use std::net::UdpSocket;

use common::{
    BYE, Client, DEADLINE, MAIL, QUIET, SAVED, Server, TABLE, WELCOME, chat, send_to_offline,
};

/// "Server exit" in the seed: Ctrl+C on the server, and wait until it is gone
/// so that every later request really finds no server.
#[track_caller]
fn stop_server(server: &mut Server) {
    server.interrupt();
    assert!(
        server.wait_exit(DEADLINE).is_some(),
        "server did not exit within {DEADLINE:?} of SIGINT"
    );
}

/// A client that left silently (signal) must be gone before the next step.
#[track_caller]
fn leave_silently(client: &mut Client, sig: libc::c_int) {
    client.signal(sig);
    client.wait_exit(DEADLINE);
}

#[test]
fn case01_chat_dereg_offline_mail_reg() {
    let server = Server::start();
    let [mut alice, mut bob, mut carol] = Client::join_all(&server, ["Alice", "Bob", "Carol"]);

    // Every ordered pair chats, one message at a time.
    chat(&mut alice, &mut bob, "Hello");
    chat(&mut alice, &mut carol, "Hello");
    chat(&mut bob, &mut alice, "Hello!");
    chat(&mut bob, &mut carol, "Hello!");
    chat(&mut carol, &mut alice, "Hello!!");
    chat(&mut carol, &mut bob, "Hello!!");

    alice.send("dereg Alice");
    alice.expect(BYE);
    bob.expect(TABLE);
    carol.expect(TABLE);

    send_to_offline(&mut bob, "Alice", "Hi");
    send_to_offline(&mut carol, "Alice", "Hi!");

    alice.send("reg Alice");
    alice.expect_lines(&[MAIL, ">>> Bob: <ts> Hi", ">>> Carol: <ts> Hi!", TABLE]);
    bob.expect(TABLE);
    carol.expect(TABLE);

    alice.finish();
    bob.finish();
    carol.finish();
}

#[test]
fn case02_send_to_offline_peer_with_server_gone_exits() {
    let mut server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);

    bob.send("dereg Bob");
    bob.expect(BYE);
    alice.expect(TABLE);

    stop_server(&mut server);

    alice.send("send Bob Hello");
    alice.expect_lines(&[
        ">>> [Bob is offline, message sent to server.]",
        ">>> [Server not responding]",
        ">>> [Exiting]",
    ]);
    alice.expect_exit(1);

    bob.finish();
}

#[test]
fn case03_channel_message_reaches_every_other_client() {
    let server = Server::start();
    let [mut alice, mut bob, mut carol] = Client::join_all(&server, ["Alice", "Bob", "Carol"]);

    alice.send("send_all Welcome to Channel");
    alice.expect(">>> [Message received by Server.]");
    bob.expect(">>> [Channel_Message Alice: Welcome to Channel]");
    carol.expect(">>> [Channel_Message Alice: Welcome to Channel]");

    alice.finish();
    bob.finish();
    carol.finish();
}

#[test]
fn case04_channel_and_direct_mail_for_offline_client() {
    let server = Server::start();
    let [mut alice, mut bob, mut carol] = Client::join_all(&server, ["Alice", "Bob", "Carol"]);

    alice.send("dereg Alice");
    alice.expect(BYE);
    bob.expect(TABLE);
    carol.expect(TABLE);

    bob.send("send_all Welcome to Channel");
    bob.expect(">>> [Message received by Server.]");
    carol.expect(">>> [Channel_Message Bob: Welcome to Channel]");

    send_to_offline(&mut bob, "Alice", "Hello");
    send_to_offline(&mut carol, "Alice", "Hello!!");

    alice.send("reg Alice");
    alice.expect_lines(&[
        MAIL,
        ">>> Channel_Message Bob: <ts> Welcome to Channel",
        ">>> Bob: <ts> Hello",
        ">>> Carol: <ts> Hello!!",
        TABLE,
    ]);
    bob.expect(TABLE);
    carol.expect(TABLE);

    alice.finish();
    bob.finish();
    carol.finish();
}

#[test]
fn case05_four_clients_mail_interleaved_on_log_back() {
    let server = Server::start();
    let [mut alice, mut bob, mut carol, mut dave] =
        Client::join_all(&server, ["Alice", "Bob", "Carol", "Dave"]);

    alice.send("dereg Alice");
    alice.expect(BYE);
    bob.expect(TABLE);
    carol.expect(TABLE);
    dave.expect(TABLE);

    bob.send("dereg Bob");
    bob.expect(BYE);
    carol.expect(TABLE);
    dave.expect(TABLE);

    send_to_offline(&mut carol, "Alice", "Hello");

    carol.send("dereg Carol");
    carol.expect(BYE);
    dave.expect(TABLE);

    // Nobody else is online: the channel message is only stored.
    dave.send("send_all Welcome to Channel");
    dave.expect(">>> [Message received by Server.]");
    send_to_offline(&mut dave, "Alice", "Hello!!");
    send_to_offline(&mut dave, "Bob", "Hello!!");

    alice.send("reg Alice");
    alice.expect_lines(&[
        MAIL,
        ">>> Carol: <ts> Hello",
        ">>> Channel_Message Dave: <ts> Welcome to Channel",
        ">>> Dave: <ts> Hello!!",
        TABLE,
    ]);
    dave.expect(TABLE);

    bob.send("reg Bob");
    bob.expect_lines(&[
        MAIL,
        ">>> Channel_Message Dave: <ts> Welcome to Channel",
        ">>> Dave: <ts> Hello!!",
        TABLE,
    ]);
    alice.expect(TABLE);
    dave.expect(TABLE);

    send_to_offline(&mut bob, "Carol", "Hi");

    carol.send("reg Carol");
    carol.expect_lines(&[
        MAIL,
        ">>> Channel_Message Dave: <ts> Welcome to Channel",
        ">>> Bob: <ts> Hi",
        TABLE,
    ]);
    alice.expect(TABLE);
    bob.expect(TABLE);
    dave.expect(TABLE);

    alice.finish();
    bob.finish();
    carol.finish();
    dave.finish();
}

#[test]
fn case06_message_to_self_is_shown_and_acked() {
    let server = Server::start();
    let [mut alice] = Client::join_all(&server, ["Alice"]);

    alice.send("send Alice Hello, Alice!");
    alice.expect_lines(&[
        ">>> Alice: Hello, Alice!",
        ">>> [Message received by Alice.]",
    ]);

    alice.finish();
}

#[test]
fn case07_dereg_of_another_name_is_refused() {
    let server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);

    alice.send("dereg Bob");
    alice.expect(">>> [Error: dereg takes your own name (Alice).]");
    // Had anyone been deregistered, Alice would see the table change.
    alice.expect_quiet(QUIET);

    // Her script had a failing command.
    alice.finish_failed();
    bob.finish();
}

#[test]
fn case08_duplicate_live_name_is_rejected() {
    let server = Server::start();
    let [mut holder] = Client::join_all(&server, ["Alice"]);

    let mut newcomer = Client::start("Alice", server.port());
    newcomer.expect(">>> [Registration rejected: name Alice is already in use.]");
    newcomer.expect_exit(1);

    // The holder answered the probe and prints nothing about it.
    holder.finish();
}

#[test]
fn case09_dereg_with_server_gone_exits_while_peers_keep_chatting() {
    let mut server = Server::start();
    let [mut alice, mut bob, mut carol] = Client::join_all(&server, ["Alice", "Bob", "Carol"]);

    stop_server(&mut server);

    alice.send("dereg Alice");
    chat(&mut bob, &mut carol, "Hello");
    alice.expect_lines(&[">>> [Server not responding]", ">>> [Exiting]"]);
    alice.expect_exit(1);

    bob.finish();
    carol.finish();
}

#[test]
fn case10_channel_message_with_server_gone_keeps_client_up() {
    let mut server = Server::start();
    let [mut alice, mut bob, mut carol] = Client::join_all(&server, ["Alice", "Bob", "Carol"]);

    stop_server(&mut server);

    alice.send("send_all Welcome to Channel");
    alice.expect(">>> [Server not responding.]");

    alice.finish_failed();
    bob.finish();
    carol.finish();
}

#[test]
fn case11_send_to_silently_left_client_falls_back_to_server() {
    let server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);

    leave_silently(&mut bob, libc::SIGINT);

    alice.send("send Bob Hello");
    alice.expect_lines(&[
        ">>> [No ACK from Bob, message sent to server.]",
        TABLE,
        SAVED,
    ]);

    alice.finish();
    // Ctrl+C ends Bob at once, with nothing more printed.
    bob.expect_end();
}

#[test]
fn case12_peers_chat_after_a_client_closed_its_terminal() {
    let server = Server::start();
    let [mut alice, mut bob, mut carol] = Client::join_all(&server, ["Alice", "Bob", "Carol"]);

    leave_silently(&mut alice, libc::SIGHUP);

    chat(&mut bob, &mut carol, "Hello");

    bob.finish();
    carol.finish();
    alice.expect_end();
}

#[test]
fn silent_holder_is_taken_over_after_probe() {
    let server = Server::start();
    let [mut first] = Client::join_all(&server, ["Alice"]);
    leave_silently(&mut first, libc::SIGKILL);
    first.expect_end();

    // Same name, another port: the server probes the silent holder, gets no
    // answer and lets the newcomer have the name.
    // Keep the dead client's port out of the kernel's hands so the newcomer
    // cannot draw it (that would be a re-registration from the same address
    // instead); a failed bind means someone else holds it, which does too.
    // Whatever the server's probe sends there goes unanswered.
    let _old_port = UdpSocket::bind(("0.0.0.0", first.port())).ok();
    let mut alice = Client::start("Alice", server.port());
    assert_ne!(alice.port(), first.port());
    alice.expect_lines(&[WELCOME, TABLE]);

    // Bob's table must carry the new address, in both directions.
    let mut bob = Client::start("Bob", server.port());
    bob.expect_lines(&[WELCOME, TABLE]);
    alice.expect(TABLE);
    chat(&mut bob, &mut alice, "who is there?");
    chat(&mut alice, &mut bob, "the new Alice");

    alice.finish();
    bob.finish();
}

#[test]
fn end_of_input_waits_for_the_fallback() {
    let server = Server::start();
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);

    leave_silently(&mut bob, libc::SIGKILL);

    // End of input right behind the command: the ack timeout, the fallback
    // and the save must still run to completion before the client exits.
    alice.send("send Bob x");
    alice.close_stdin();
    alice.expect_lines(&[
        ">>> [No ACK from Bob, message sent to server.]",
        TABLE,
        SAVED,
    ]);
    alice.expect_exit(0);
    alice.assert_stderr_empty();
}
