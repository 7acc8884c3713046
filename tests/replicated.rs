//! Issue 11: a udpchat server on a replicated PostgreSQL (`--store`), a
//! real primary with two synchronous standbys from the distribution's
//! packages (see `common::pg`). What it acked survives the death of the
//! primary: kill -9 of every process of it in the middle of a save stream,
//! a standby promoted, and every message reported saved is delivered
//! exactly once.

mod common;

use std::time::{Duration, Instant};

use common::pg::Cluster;
use common::stream::{self, Feed, Stage};
use common::{Client, DEADLINE, MAIL, Server, TABLE, dereg, run, send_to_offline};

fn server_on(cluster: &Cluster, db: &str) -> Server {
    let url = cluster.database(db);
    let mut flags = vec!["--store", url.as_str()];
    flags.extend(stream::SERVER_FLAGS);
    Server::start_with(&flags)
}

#[test]
fn a_server_on_postgres_keeps_mail_across_a_restart() {
    let test = "a_server_on_postgres_keeps_mail_across_a_restart";
    let Some(cluster) = Cluster::start(test, 2) else {
        return;
    };
    let mut server = server_on(&cluster, "restart");
    server.expect_stdout("(PostgreSQL)");
    // The data directory holds the server's key only: no SQLite database.
    let data = server.dir().join("udpchat-data");
    assert!(data.join("server.key").is_file());
    assert!(!data.join("udpchat.db").exists());

    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    dereg(&mut bob, &mut [&mut alice]);
    send_to_offline(&mut alice, "Bob", "kept by PostgreSQL");
    server.restart();
    bob.send("reg Bob");
    bob.expect(MAIL);
    bob.expect(">>> Alice: <ts> kept by PostgreSQL");
    bob.expect(TABLE);
    // Stored once, delivered once: acked and deleted.
    let rows = cluster.psql(cluster.primary, "restart", "SELECT count(*) FROM mail");
    assert_eq!(rows, "0");
}

/// `--release NAME --store URL` frees a name in PostgreSQL as it does in
/// a data directory: its key is forgotten and its mail, direct and
/// channel, deleted.
#[test]
fn an_operator_release_works_on_postgres() {
    let test = "an_operator_release_works_on_postgres";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    let url = cluster.database("release");
    let mut server = Server::start_with(&["--store", &url]);
    let [mut alice, mut bob] = Client::join_all(&server, ["Alice", "Bob"]);
    dereg(&mut alice, &mut [&mut bob]);
    send_to_offline(&mut bob, "Alice", "for the old Alice only");
    bob.send("send_all to everyone");
    bob.expect(">>> [Message received by Server.]");
    let sql = |q: &str| cluster.psql(cluster.primary, "release", q);
    assert_eq!(sql("SELECT count(*) FROM mail"), "1");
    assert_eq!(sql("SELECT count(*) FROM channel"), "1");
    server.interrupt();
    assert!(
        server.wait_exit(DEADLINE).is_some(),
        "the server did not stop"
    );

    let out = run(&["--release", "Alice", "--store", &url]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{:?} {:?}",
        out.stdout,
        out.stderr
    );
    assert_eq!(
        out.stdout,
        [
            "released Alice: the next key to register it owns it; 2 stored messages for it were deleted"
        ]
    );
    assert_eq!(
        sql("SELECT key IS NULL FROM clients WHERE name = 'Alice'"),
        "t"
    );
    assert_eq!(
        sql("SELECT key IS NULL FROM clients WHERE name = 'Bob'"),
        "f"
    );
    assert_eq!(sql("SELECT count(*) FROM mail"), "0");
    assert_eq!(sql("SELECT count(*) FROM channel"), "0");
    // A name nobody registered: a clear error, nothing changed.
    let out = run(&["--release", "Nobody", "--store", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("no client named Nobody")),
        "{:?}",
        out.stderr
    );
}

/// (Attacker reading the server's log, or a user's terminal.) A password
/// in the connection string is never printed: not in the log of a running
/// server, nor in the error of one that cannot connect.
#[test]
fn a_password_in_the_connection_string_is_never_printed() {
    let test = "a_password_in_the_connection_string_is_never_printed";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    const SECRET: &str = "hunter2-never-shown";
    // Trust authentication on loopback: the password is carried, unused.
    let url = cluster
        .database("secret")
        .replacen("udpchat@", &format!("udpchat:{SECRET}@"), 1);
    assert!(url.contains(SECRET));
    let mut server = Server::start_with(&["--store", &url]);
    server.expect_stdout("(PostgreSQL)");
    let [mut alice] = Client::join_all(&server, ["Alice"]);
    alice.finish();
    server.interrupt();
    assert!(
        server.wait_exit(DEADLINE).is_some(),
        "the server did not stop"
    );
    let said: Vec<String> = server.stdout().into_iter().chain(server.stderr()).collect();
    assert!(
        said.iter().any(|l| l.contains("store postgres://udpchat@")),
        "{said:#?}"
    );
    assert!(!said.iter().any(|l| l.contains(SECRET)), "{said:#?}");
    // A host where nothing listens: the error names it, not the password.
    let port = common::pg::free_tcp_port();
    let bad = format!("postgres://udpchat:{SECRET}@127.0.0.1:{port}/secret");
    let out = run(&["-s", &common::free_udp_port().to_string(), "--store", &bad]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{:?} {:?}",
        out.stdout,
        out.stderr
    );
    let said: Vec<&String> = out.stdout.iter().chain(&out.stderr).collect();
    assert!(
        said.iter()
            .any(|l| l.contains(&format!("127.0.0.1:{port}"))),
        "{said:#?}"
    );
    assert!(!said.iter().any(|l| l.contains(SECRET)), "{said:#?}");
}

/// The recipient of the crash test; offline throughout.
const RECIPIENT: &str = "R";
/// Messages a sender sends at most.
const PER_SENDER: usize = 3000;
/// The kill comes this many milliseconds into the stream.
const KILL_AFTER_MS: [u64; 3] = [150, 600, 1100];

/// Kill -9 of the PostgreSQL primary at a moment of a stream of saves from
/// three senders, then the standby with the most WAL promoted (what a
/// failover tool does): the server finds the new primary by itself, every
/// message reported saved is shown to the recipient exactly once, and the
/// server saves on afterwards.
#[test]
fn saved_messages_survive_the_primary_killed_mid_stream() {
    for (round, ms) in KILL_AFTER_MS.into_iter().enumerate() {
        eprintln!("round {round}: kill -9 the primary {ms} ms into the stream");
        let test = "saved_messages_survive_the_primary_killed_mid_stream";
        let Some(mut cluster) = Cluster::start(test, 2) else {
            return;
        };
        let server = server_on(&cluster, "crash");
        let [mut r, s1, s2, s3] = Client::join_all(&server, [RECIPIENT, "S1", "S2", "S3"]);
        let mut feeds = [s1, s2, s3].map(|c| Feed::new(c, RECIPIENT, PER_SENDER));
        {
            let [f1, f2, f3] = &mut feeds;
            dereg(
                &mut r,
                &mut [&mut f1.client, &mut f2.client, &mut f3.client],
            );
        }
        stream::run_until(&mut feeds, Instant::now() + Duration::from_millis(ms));
        let before: usize = feeds.iter().map(|f| f.confirmed).sum();
        cluster.kill_primary();
        let failover = Instant::now();
        let new = cluster.promote_best_standby();
        eprintln!(
            "  {before} saved before the kill; standby {new} promoted in {:?}",
            failover.elapsed()
        );
        // The stream goes on through the failover; a sender whose request
        // outlived its retries (2.5 s) gives up and exits, as it should.
        stream::run_until(&mut feeds, Instant::now() + Duration::from_millis(1500));
        for feed in &mut feeds {
            feed.wait_for_give_up();
        }
        let after: usize = feeds.iter().map(|f| f.confirmed).sum();
        eprintln!("  {after} saved in all");
        // The server saves on the new primary: a fresh sender is told so.
        let mut late = Feed::new(Client::start("S4", server.port()), RECIPIENT, 1);
        late.client.expect_lines(&[common::WELCOME, TABLE]);
        stream::run_until(
            std::slice::from_mut(&mut late),
            Instant::now() + common::DEADLINE,
        );
        assert_eq!(
            (late.stage, late.confirmed),
            (Stage::Idle, 1),
            "S4: {:#?}",
            late.client.transcript()
        );
        let mut all: Vec<Feed> = feeds.into_iter().collect();
        all.push(late);
        stream::check_delivered_once(&mut r, &all);
        r.finish();
        let mut server = server;
        // The operator reads what happened.
        server.expect_stdout("lost the database connection");
        server.expect_stdout("connected to a read-write server of postgres://udpchat@");
        let stderr = server.stderr();
        assert!(
            stderr.iter().all(|l| !l.contains("panicked")),
            "server panicked: {stderr:#?}"
        );
    }
}
