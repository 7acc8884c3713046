//! Issue 11: three udpchat servers on one replicated PostgreSQL (a real
//! primary with two synchronous standbys, see `common::pg`), each started
//! with `--store URL --advertise 127.0.0.1:<port>` and one shared
//! `server.key`. Names are spread over the servers by rendezvous hashing;
//! clients are given every server and pointed at the first.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::pg::Cluster;
use common::stream::{self, Feed};
use common::{
    BYE, Client, MAIL, Server, TABLE, TempDir, WELCOME, key_file, scratch_dir, send_to_offline,
};
use udpchat::wire::Name;

/// Three servers sharing `cluster`'s database `db` and one data directory
/// (so one `server.key`), each knowing the other two are live.
struct Three {
    servers: Vec<Server>,
    _data: TempDir,
}

impl Three {
    fn start(cluster: &Cluster, db: &str) -> Three {
        let url = cluster.database(db);
        let data = scratch_dir();
        let dir = data.path().join("shared").display().to_string();
        let mut flags = vec![
            "--store",
            url.as_str(),
            "--data-dir",
            dir.as_str(),
            "--advertise",
            "127.0.0.1:{port}",
            "--heartbeat",
            "1",
        ];
        flags.extend(stream::SERVER_FLAGS);
        let mut servers: Vec<Server> = Vec::new();
        for n in 1..=3 {
            // One after another: the first creates the key the others load.
            let mut server = Server::start_with(&flags);
            server.expect_stdout(&format!("one of {n} servers on the store"));
            servers.push(server);
        }
        for server in &mut servers[..2] {
            server.expect_stdout("3 servers live");
        }
        Three {
            servers,
            _data: data,
        }
    }

    /// Every server as clients reach it.
    fn live(&self) -> Vec<SocketAddr> {
        (self.servers.iter())
            .map(|s| SocketAddr::from(([127, 0, 0, 1], s.port())))
            .collect()
    }

    /// A name (`prefix` and a number) whose home is server `i`.
    fn homed_at(&self, prefix: &str, i: usize) -> String {
        let live = self.live();
        (0..10_000)
            .map(|n| format!("{prefix}{n}"))
            .find(|n| udpchat::server::home(&Name::new(n).unwrap(), &live) == Some(live[i]))
            .expect("some name lands on every server")
    }

    /// `--server` flags for every server but `first`, and a heartbeat of a
    /// second (a dead server is noticed within seconds).
    fn client_flags(&self, first: usize) -> Vec<String> {
        let mut flags = vec!["--heartbeat".to_string(), "1".to_string()];
        for (i, s) in self.servers.iter().enumerate() {
            if i != first {
                flags.push("--server".to_string());
                flags.push(format!("127.0.0.1:{}", s.port()));
            }
        }
        flags
    }

    /// Starts `name` pointed at server `first` (with the key it had with
    /// server 0's clients, if any).
    fn client(&self, name: &str, first: usize) -> Client {
        let key = key_file(self.servers[0].port(), name).display().to_string();
        let mut flags = self.client_flags(first);
        if first != 0 {
            flags.extend(["--key".to_string(), key]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Client::start_with(name, self.servers[first].port(), &flags)
    }
}

/// `line`, a message kept for `client`, after its log back in: announced
/// with `[You Have Messages]`, or (saved at another server moments before
/// the registration, before its home read the store's feed) delivered
/// live just after the welcome. Shown once either way.
fn expect_kept(client: &mut Client, line: &str) {
    let mut next = String::new();
    while let Some(l) = client.next_line(common::DEADLINE) {
        if l != TABLE {
            next = l;
            break;
        }
    }
    if next == MAIL {
        client.expect(line);
    } else if let Err(why) = common::line_matches(line, &next) {
        panic!("{next:?} is neither {MAIL:?} nor {line:?}: {why}");
    }
}

/// Whether server `s` logged `name` registering.
fn registered_at(s: &mut Server, name: &str) -> bool {
    let said = format!("{name} registered from");
    s.stdout().iter().any(|l| l.contains(&said))
}

#[test]
fn three_servers_serve_one_chat() {
    let test = "three_servers_serve_one_chat";
    let Some(cluster) = Cluster::start(test, 2) else {
        return;
    };
    let mut three = Three::start(&cluster, "three");
    let names: Vec<String> = (0..3).map(|i| three.homed_at("user", i)).collect();
    // All pointed at the first server: the others are redirected home.
    let mut clients: Vec<Client> = Vec::new();
    for name in &names {
        let mut newcomer = three.client(name, 0);
        newcomer.expect_lines(&[WELCOME, TABLE]);
        clients.push(newcomer);
    }
    for (i, name) in names.iter().enumerate() {
        // Its home's log line awaited (read apart from the consoles), then
        // no other server's.
        three.servers[i].expect_stdout(&format!("{name} registered from"));
        for (j, server) in three.servers.iter_mut().enumerate() {
            assert_eq!(registered_at(server, name), i == j, "{name} at server {j}");
        }
    }
    let [a, b, c] = &mut clients[..] else {
        unreachable!()
    };
    // One table: everyone online everywhere.
    for client in [&mut *a, &mut *b, &mut *c] {
        client.await_list(">>> [Client table: 3 of 3 online.]");
    }
    // Direct, across servers.
    c.send(&format!("send {} straight across", names[0]));
    a.expect_amid_updates(&format!(">>> {}: straight across", names[2]));
    c.expect_amid_updates(&format!(">>> [Message received by {}.]", names[0]));
    // Saved at the first server, delivered by the third when it is back.
    c.send(&format!("dereg {}", names[2]));
    c.expect_amid_updates(BYE);
    a.await_list(">>> [Client table: 2 of 3 online.]");
    send_to_offline(a, &names[2], "kept for you");
    c.send(&format!("reg {}", names[2]));
    expect_kept(c, &format!(">>> {}: <ts> kept for you", names[0]));
    // The channel reaches the clients of every server. (Both see it back
    // first, so the offline awaited below is the next dereg's, not a table
    // not yet told of this registration.)
    for client in [&mut *a, &mut *b] {
        client.await_list(">>> [Client table: 3 of 3 online.]");
    }
    b.send("send_all hello all servers");
    b.expect_amid_updates(">>> [Message received by Server.]");
    for client in [&mut *a, &mut *c] {
        let line = format!(">>> [Channel_Message {}: hello all servers]", names[1]);
        client.expect_amid_updates(&line);
    }
    // A message saved for it while it is away, then a log back in through
    // a server that is not its home: redirected there, mail and all.
    c.send(&format!("dereg {}", names[2]));
    c.expect_amid_updates(BYE);
    a.await_list(">>> [Client table: 2 of 3 online.]");
    send_to_offline(a, &names[2], "through any door");
    c.finish();
    drop(clients);
    let mut back = three.client(&names[2], 1);
    back.expect(WELCOME);
    expect_kept(
        &mut back,
        &format!(">>> {}: <ts> through any door", names[0]),
    );
    back.await_list(">>> [Client table: 3 of 3 online.]");
    assert_eq!(
        back.transcript()
            .iter()
            .filter(|l| l.contains("door"))
            .count(),
        1
    );
    // Acked at its home: nothing left in the store.
    let left = cluster.psql(cluster.primary, "three", "SELECT count(*) FROM mail");
    assert_eq!(left, "0");
}

#[test]
fn a_killed_server_s_clients_move_on_and_get_their_mail_once() {
    let test = "a_killed_server_s_clients_move_on_and_get_their_mail_once";
    let Some(cluster) = Cluster::start(test, 2) else {
        return;
    };
    let mut three = Three::start(&cluster, "killed");
    let a_name = three.homed_at("anna", 0);
    let b_name = three.homed_at("bert", 1);
    let mut a = three.client(&a_name, 0);
    a.expect_lines(&[WELCOME, TABLE]);
    let mut b = three.client(&b_name, 0);
    b.expect_lines(&[WELCOME, TABLE]);
    three.servers[1].expect_stdout(&format!("{b_name} registered from"));
    // A message kept for it and delivered (acked) before the kill.
    b.send(&format!("dereg {b_name}"));
    b.expect_amid_updates(BYE);
    a.await_list(">>> [Client table: 1 of 2 online.]");
    send_to_offline(&mut a, &b_name, "before the kill");
    b.send(&format!("reg {b_name}"));
    expect_kept(&mut b, &format!(">>> {a_name}: <ts> before the kill"));
    a.await_list(">>> [Client table: 2 of 2 online.]");

    // kill -9 of its home server.
    three.servers[1].kill();
    three.servers[1].wait_exit(common::DEADLINE);
    // Stored for it while it has no server: a channel message.
    a.send("send_all after the kill");
    a.expect_amid_updates(">>> [Message received by Server.]");
    // It notices the silence, registers at the next home by itself and
    // gets the channel message there, once.
    b.expect_amid_updates(">>> [Reconnected to server.]");
    b.expect_amid_updates(MAIL);
    b.expect(&format!(
        ">>> Channel_Message {a_name}: <ts> after the kill"
    ));
    let live = [three.live()[0], three.live()[2]];
    let next = udpchat::server::home(&Name::new(&b_name).unwrap(), &live).unwrap();
    let next = three.live().iter().position(|&s| s == next).unwrap();
    // Awaited: the server's log is read apart from the client's console.
    three.servers[next].expect_stdout(&format!("{b_name} registered from"));
    b.await_list(">>> [Client table: 2 of 2 online.]");
    // Nothing shown twice: the first message was acked before the kill.
    let transcript = b.transcript();
    let once = |text: &str| transcript.iter().filter(|l| l.contains(text)).count();
    assert_eq!(once("before the kill"), 1, "{transcript:#?}");
    assert_eq!(once("after the kill"), 1, "{transcript:#?}");
    let left = cluster.psql(cluster.primary, "killed", "SELECT count(*) FROM mail");
    assert_eq!(left, "0");
}

#[test]
fn a_server_without_advertise_is_refused_beside_running_servers() {
    let test = "a_server_without_advertise_is_refused_beside_running_servers";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    let url = cluster.database("beside");
    let mut first = Server::start_with(&["--store", &url, "--advertise", "127.0.0.1:{port}"]);
    first.expect_stdout("one of 1 servers");
    let port = common::free_udp_port().to_string();
    let out = common::run(&["-s", &port, "--store", &url, "--data-dir", "/nonexistent/x"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", out.stderr);
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("start this one with --advertise too")),
        "{:?}",
        out.stderr
    );
    // Nor is a name released under them.
    let out = common::run(&["--release", "anyone", "--store", &url]);
    assert_eq!(out.status.code(), Some(1), "{:?}", out.stderr);
    assert!(
        out.stderr.iter().any(|l| l.contains("stop them first")),
        "{:?}",
        out.stderr
    );
}

/// A server frozen (SIGSTOP) past its lease is taken for dead; the others
/// carry on. Woken, it finds its lease had run out, says so, reads what
/// it missed from the feed and serves on.
#[test]
fn a_server_frozen_past_its_lease_catches_up_when_woken() {
    let test = "a_server_frozen_past_its_lease_catches_up_when_woken";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    let mut three = Three::start(&cluster, "frozen");
    let frozen = three.servers[2].pid();
    let signal = |sig| {
        // SAFETY: kill(2) on our own child's pid, with a valid signal.
        let rc = unsafe { libc::kill(frozen as libc::pid_t, sig) };
        assert_eq!(rc, 0);
    };
    signal(libc::SIGSTOP);
    three.servers[0].expect_stdout("2 servers live");
    // A change while it is frozen: a registration elsewhere.
    let late = three.homed_at("late", 0);
    let mut early = three.client(&late, 0);
    early.expect_lines(&[WELCOME, TABLE]);
    signal(libc::SIGCONT);
    three.servers[2].expect_stdout("its clients are announced again");
    three.servers[0].expect_stdout("3 servers live");
    // It serves on, and knows the name registered while it was frozen.
    let mut here = three.client(&three.homed_at("here", 2), 0);
    here.expect_lines(&[WELCOME, TABLE]);
    here.await_list(">>> [Client table: 2 of 2 online.]");
    assert!(three.servers[2].running());
}

/// (An operator who forgot to copy `server.key`.) A server whose key is
/// not the running servers' is refused: clients pin one key, and channel
/// mail is sealed with it.
#[test]
fn a_server_with_another_key_is_refused_by_the_cluster() {
    let test = "a_server_with_another_key_is_refused_by_the_cluster";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    let url = cluster.database("otherkey");
    let mut first = Server::start_with(&["--store", &url, "--advertise", "127.0.0.1:{port}"]);
    first.expect_stdout("one of 1 servers");
    let dir = scratch_dir();
    let data = dir.path().join("data").display().to_string();
    let port = common::free_udp_port().to_string();
    let advertise = format!("127.0.0.1:{port}");
    let out = common::run(&[
        "-s",
        &port,
        "--store",
        &url,
        "--advertise",
        &advertise,
        "--data-dir",
        &data,
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", out.stderr);
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("give every server of the cluster the same server.key")),
        "{:?}",
        out.stderr
    );
    assert!(first.running());
}

/// Two servers' stores joined to one cluster on database `db`: a at port
/// 5000, b at 5001, with what each learned when it joined.
fn two_members(
    cluster: &Cluster,
    db: &str,
) -> (
    udpchat::driver::postgres::PgStore,
    udpchat::driver::cluster::Joined,
    udpchat::driver::postgres::PgStore,
    udpchat::driver::cluster::Joined,
) {
    use udpchat::driver::postgres::PgStore;
    let url = cluster.database(db);
    let key = udpchat::crypto::Keypair::from_secret([5; 32]).public();
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut a = PgStore::open(&url).unwrap();
    let joined_a = a.join(at(5000), &key).unwrap();
    let mut b = PgStore::open(&url).unwrap();
    let joined_b = b.join(at(5001), &key).unwrap();
    (a, joined_a, b, joined_b)
}

/// What the last commit of `store` kept of another server's instead of
/// this one's messages: this server's id, and the store's row.
fn kept_instead(
    store: &mut udpchat::driver::postgres::PgStore,
) -> Vec<(udpchat::wire::MailId, udpchat::store::StoredMail)> {
    use udpchat::store::{Outcome, Store};
    (store.outcomes().into_iter())
        .filter_map(|o| match o {
            Outcome::Kept { ours, row } => Some((ours, row)),
            Outcome::Full { .. } => None,
        })
        .collect()
}

/// The doorbell: a server hears another's commit, never its own, and a
/// new connection reads the feed whatever rang.
#[test]
fn another_server_s_commit_rings_the_doorbell_and_its_own_does_not() {
    use udpchat::driver::postgres::PgStore;
    use udpchat::store::{ClientRecord, Store, StoreOp};

    let test = "another_server_s_commit_rings_the_doorbell_and_its_own_does_not";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    let (mut a, _, mut b, _) = two_members(&cluster, "bell");
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let record = |n: &str| {
        [StoreOp::Client(ClientRecord {
            name: Name::new(n).unwrap(),
            addr: at(6000),
            key: None,
            seen_at: None,
        })]
    };
    // A new connection may have missed rings: the feed is read.
    assert_eq!(b.news_rung(true), Some(true));
    b.news().unwrap().unwrap();
    assert_eq!(b.news_rung(true), Some(false));
    // Its own commit rings on its own connection too, and is passed over.
    b.commit(&record("bob")).unwrap();
    assert_eq!(b.news_rung(true), Some(false));
    // The other's is heard (delivered at its COMMIT; awaited, it travels).
    a.commit(&record("ann")).unwrap();
    let deadline = Instant::now() + common::DEADLINE;
    while b.news_rung(true) != Some(true) {
        assert!(Instant::now() < deadline, "b never heard a's commit");
        std::thread::sleep(Duration::from_millis(5));
    }
    let changes = b.news().unwrap().unwrap().changes;
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, udpchat::Remote::Client(r) if r.name.as_str() == "ann")),
        "{changes:#?}"
    );
    assert_eq!(b.news_rung(true), Some(false));
    // A store of one server has no doorbell.
    let mut alone = PgStore::open(&cluster.database("alone")).unwrap();
    assert_eq!(alone.news_rung(true), None);
}

/// The feed, store to store: what one server commits, another's `news`
/// brings, in order and as the tables have it when read (a message acked
/// meanwhile is gone); a server's own commits are not brought back to it;
/// a batch committed twice (a replay) is harmless to apply twice.
#[test]
fn the_feed_brings_one_server_what_another_committed() {
    use udpchat::Remote;
    use udpchat::crypto::PublicKey;
    use udpchat::store::{Body, ChannelMail, ClientRecord, Store, StoreOp, StoredMail};
    use udpchat::wire::{MailId, MsgId};

    let test = "the_feed_brings_one_server_what_another_committed";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    let (mut a, joined_a, mut b, joined_b) = two_members(&cluster, "feed");
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    assert_ne!(joined_a.instance, joined_b.instance);
    assert_eq!(joined_b.live.len(), 2);
    let name = |s: &str| Name::new(s).unwrap();
    let record = |n: &str, port| {
        StoreOp::Client(ClientRecord {
            name: name(n),
            addr: at(port),
            key: Some(PublicKey([port as u8; 32])),
            seen_at: None,
        })
    };
    let put = |id: u64, text: &str| {
        StoreOp::Put(StoredMail {
            mail: MailId(id << 16 | u64::from(joined_a.instance)),
            to: name("bob"),
            from: name("ann"),
            channel: false,
            stored_at: 1_700_000_000,
            id: MsgId(id),
            body: Body::Sealed {
                key: PublicKey([7; 32]),
                sealed: text.as_bytes().to_vec(),
            },
        })
    };
    let online = StoreOp::Presence {
        name: name("ann"),
        addr: at(6000),
        online: true,
        epoch: 1,
    };
    let batch = [
        record("ann", 6000),
        record("bob", 6001),
        online,
        put(1, "one"),
        put(2, "two"),
    ];
    a.commit(&batch).unwrap();
    a.commit(&batch).unwrap();
    let news = b.news().expect("a member has news").unwrap();
    let changes = news.changes;
    let mails: Vec<u64> = (changes.iter())
        .filter_map(|c| match c {
            Remote::Mail(m) => Some(m.id.0),
            _ => None,
        })
        .collect();
    // In commit order, once each though the batch was committed twice.
    assert_eq!(mails, [1, 2], "{changes:#?}");
    assert!(changes.iter().any(|c| matches!(c,
        Remote::Presence { name: n, server, epoch: 1, online: true, .. }
            if n.as_str() == "ann" && *server == at(5000))));
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Remote::Client(r) if r.name.as_str() == "bob"))
    );
    // Nothing new: read on from where it stopped.
    assert!(b.news().unwrap().unwrap().changes.is_empty());
    // A put acked before it is read is not brought at all; the ack is.
    let MailId(first) = match &batch[3] {
        StoreOp::Put(m) => m.mail,
        _ => unreachable!(),
    };
    a.commit(&[put(3, "three")]).unwrap();
    let three = match put(3, "three") {
        StoreOp::Put(m) => m.mail,
        _ => unreachable!(),
    };
    a.commit(&[StoreOp::Delete {
        to: name("bob"),
        mail: three,
    }])
    .unwrap();
    let changes = b.news().unwrap().unwrap().changes;
    assert!(
        !changes.iter().any(|c| matches!(c, Remote::Mail(_))),
        "{changes:#?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Remote::Deleted { mail, .. } if *mail == three))
    );
    // What b commits, a hears; a never hears its own.
    b.commit(&[StoreOp::Delete {
        to: name("bob"),
        mail: MailId(first),
    }])
    .unwrap();
    let changes = a.news().unwrap().unwrap().changes;
    assert_eq!(changes.len(), 1, "{changes:#?}");
    assert!(matches!(&changes[0], Remote::Deleted { mail, .. } if mail.0 == first));
    // The same message through b under b's own id: the store keeps a's,
    // and says so.
    let (StoreOp::Put(theirs), StoreOp::Put(mut again)) = (put(2, "two"), put(2, "two")) else {
        unreachable!()
    };
    again.mail = MailId(9 << 16 | u64::from(joined_b.instance));
    b.commit(&[StoreOp::Put(again.clone())]).unwrap();
    assert_eq!(kept_instead(&mut b), [(again.mail, theirs)]);
    // A batch whose messages are all new, or already its own, keeps none.
    b.commit(&[record("bob", 6001)]).unwrap();
    assert!(kept_instead(&mut b).is_empty());
    // A channel message sent again through b (to one more recipient, who
    // registered meanwhile): stored once, as a stored it, and a's row
    // gains dan; b is told the copies its recipients hold, dan's too, and
    // the message is not stored anew.
    let channel = |mail: u64, to: &[&str]| ChannelMail {
        mail: MailId(mail),
        from: name("ann"),
        stored_at: 1_700_000_000,
        id: MsgId(77),
        body: vec![3; 40].into(),
        to: to.iter().map(|n| name(n)).collect(),
    };
    let first = channel(20 << 16 | u64::from(joined_a.instance), &["bob", "cal"]);
    a.commit(&[StoreOp::Channel(first.clone())]).unwrap();
    assert!(kept_instead(&mut a).is_empty());
    a.commit(&[StoreOp::Delete {
        to: name("cal"),
        mail: first.mail,
    }])
    .unwrap();
    let again = channel(
        21 << 16 | u64::from(joined_b.instance),
        &["bob", "cal", "dan"],
    );
    b.commit(&[StoreOp::Channel(again.clone())]).unwrap();
    let grown = ChannelMail {
        to: vec![name("bob"), name("dan")],
        ..first.clone()
    };
    let copies: Vec<_> = grown.copies().map(|m| (again.mail, m)).collect();
    let mut kept = kept_instead(&mut b);
    kept.sort_by(|x, y| x.1.to.cmp(&y.1.to));
    assert_eq!(kept, copies, "cal acked it: no copy of its own");
    // The others hear of dan's copy, under the id it is kept under.
    let changes = a.news().unwrap().unwrap().changes;
    assert!(
        changes.iter().any(|c| matches!(c, Remote::Channel(c)
            if c.mail == first.mail && c.to.contains(&name("dan")))),
        "{changes:#?}"
    );
    let stored: Vec<_> = (b
        .mailboxes(&[name("bob"), name("cal"), name("dan")])
        .unwrap())
    .into_iter()
    .filter(|m| m.channel)
    .map(|m| (m.mail, m.to.as_str().to_string()))
    .collect();
    let mut stored: Vec<_> = stored;
    stored.sort();
    assert_eq!(
        stored,
        [
            (first.mail, "bob".to_string()),
            (first.mail, "dan".to_string())
        ]
    );
    // Committed again (a replay after a lost COMMIT): nothing kept instead.
    a.commit(&[StoreOp::Channel(first.clone())]).unwrap();
    assert!(kept_instead(&mut a).is_empty());
    // Sent again once more: nobody new, nothing stored, the same copies.
    b.commit(&[StoreOp::Channel(again.clone())]).unwrap();
    let mut kept = kept_instead(&mut b);
    kept.sort_by(|x, y| x.1.to.cmp(&y.1.to));
    assert_eq!(kept, copies);
}

/// kill -9 of the PostgreSQL primary in the middle of a save stream from
/// senders homed on all three servers, a standby promoted: every message
/// reported saved is shown to its recipient exactly once when it logs
/// back in, and the servers carry on (leases, feed and all).
#[test]
fn three_servers_keep_every_saved_message_across_a_failover_of_the_primary() {
    let test = "three_servers_keep_every_saved_message_across_a_failover_of_the_primary";
    let Some(mut cluster) = Cluster::start(test, 2) else {
        return;
    };
    let three = Three::start(&cluster, "failover");
    let recipient = three.homed_at("rcpt", 0);
    let mut r = three.client(&recipient, 0);
    r.expect_lines(&[WELCOME, TABLE]);
    let mut senders = Vec::new();
    for i in 0..3 {
        let mut c = three.client(&three.homed_at(&format!("snd{i}x"), i), i);
        c.expect_lines(&[WELCOME, TABLE]);
        senders.push(c);
    }
    r.send(&format!("dereg {recipient}"));
    r.expect_amid_updates(BYE);
    for c in &mut senders {
        c.await_list(">>> [Client table: 3 of 4 online.]");
    }
    let mut feeds: Vec<Feed> = (senders.into_iter())
        .map(|c| Feed::new(c, &recipient, 3000))
        .collect();
    stream::run_until(&mut feeds, Instant::now() + Duration::from_millis(600));
    let before: usize = feeds.iter().map(|f| f.confirmed).sum();
    cluster.kill_primary();
    let failover = Instant::now();
    let new = cluster.promote_best_standby();
    eprintln!(
        "{before} saved before the kill; standby {new} promoted in {:?}",
        failover.elapsed()
    );
    stream::run_until(&mut feeds, Instant::now() + Duration::from_millis(1500));
    for feed in &mut feeds {
        feed.wait_for_give_up();
    }
    let after: usize = feeds.iter().map(|f| f.confirmed).sum();
    eprintln!("{after} saved in all");
    assert!(after > before, "nothing saved after the failover");
    stream::check_delivered_once_across_servers(&mut r, &feeds);
}

/// A database of schema 2 (written by an earlier build) is brought up to
/// schema 3, and on to this build's, when a server opens it: the index one of several servers uses
/// to fetch a mailbox is made, a channel message stored twice is kept
/// once (its first copy) under the new (sender, message id) key, and what
/// else was stored stays.
#[test]
fn a_schema_2_database_is_brought_up_to_schema_3() {
    use udpchat::driver::postgres::{PgStore, SCHEMA_VERSION};
    use udpchat::store::{ChannelMail, Store, StoreOp};
    use udpchat::wire::{MailId, MsgId};

    let test = "a_schema_2_database_is_brought_up_to_schema_3";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    let url = cluster.database("upgrade");
    let name = |s: &str| Name::new(s).unwrap();
    let kept = ChannelMail {
        mail: MailId(7),
        from: name("ann"),
        stored_at: 1_700_000_000,
        id: MsgId(1),
        body: vec![9; 40].into(),
        to: vec![name("bob"), name("cal")],
    };
    let mut old = PgStore::open(&url).unwrap();
    old.commit(&[StoreOp::Channel(kept.clone())]).unwrap();
    let indexes = "SELECT count(*) FROM pg_indexes
                   WHERE indexname IN ('channel_pending', 'channel_message')";
    let version = "SELECT version FROM udpchat_schema";
    assert_eq!(cluster.psql(0, "upgrade", indexes), "2");
    // As the previous build left it: no indexes, and the same message
    // stored twice (sent again through a second server).
    cluster.psql(0, "upgrade", "DROP INDEX channel_pending");
    cluster.psql(0, "upgrade", "DROP INDEX channel_message");
    cluster.psql(0, "upgrade", "DROP TABLE mailbox");
    cluster.psql(0, "upgrade", "UPDATE udpchat_schema SET version = 2");
    // (Written as that build wrote it: this one's statement needs the
    // index.)
    cluster.psql(
        0,
        "upgrade",
        "INSERT INTO channel (id, sender, stored_at, msg_id, body, pending, owed)
         SELECT 8, sender, stored_at, msg_id, body, pending, owed FROM channel WHERE id = 7",
    );
    let rows = "SELECT string_agg(id::text, ',') FROM channel";
    assert_eq!(cluster.psql(0, "upgrade", rows), "7,8");
    let mut store = PgStore::open(&url).unwrap();
    assert_eq!(cluster.psql(0, "upgrade", indexes), "2");
    assert_eq!(
        cluster.psql(0, "upgrade", rows),
        "7",
        "kept once, the first"
    );
    assert_eq!(
        cluster.psql(0, "upgrade", version),
        SCHEMA_VERSION.to_string()
    );
    let bob: Vec<_> = kept.copies().filter(|m| m.to == name("bob")).collect();
    assert_eq!(store.mailboxes(&[name("bob")]).unwrap(), bob);
    // On to schema 4 in the same start: the copy kept counted once each.
    assert_eq!(
        cluster.psql(
            0,
            "upgrade",
            "SELECT string_agg(name || ':' || messages || ':' || bytes, ',' ORDER BY name)
             FROM mailbox"
        ),
        "bob:1:200,cal:1:200"
    );
}

/// A database of schema 3 (written by the previous build) is brought up to
/// schema 4 when a server opens it: each mailbox's counters are computed
/// from its rows (direct messages, and channel messages pending for it
/// that it has not acked), the same as the counters a store of this build
/// kept while it wrote those rows; an ack of a recipient a channel message
/// was never pending for is dropped.
#[test]
fn a_schema_3_database_is_brought_up_to_schema_4_with_its_mailboxes_counted() {
    use udpchat::crypto::PublicKey;
    use udpchat::driver::postgres::{PgStore, SCHEMA_VERSION};
    use udpchat::store::{Body, ChannelMail, Store, StoreOp, StoredMail};
    use udpchat::wire::{MailId, MsgId};

    let test = "a_schema_3_database_is_brought_up_to_schema_4_with_its_mailboxes_counted";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    let url = cluster.database("upgrade4");
    let name = |s: &str| Name::new(s).unwrap();
    let direct = |mail: u64, to: &str, len: usize| {
        StoreOp::Put(StoredMail {
            mail: MailId(mail),
            to: name(to),
            from: name("ann"),
            channel: false,
            stored_at: 1_700_000_000,
            id: MsgId(mail),
            body: Body::Sealed {
                key: PublicKey([7; 32]),
                sealed: vec![1; len],
            },
        })
    };
    let channel = |mail: u64, to: &[&str], len: usize| {
        StoreOp::Channel(ChannelMail {
            mail: MailId(mail),
            from: name("ann"),
            stored_at: 1_700_000_000,
            id: MsgId(mail),
            body: vec![9; len].into(),
            to: to.iter().map(|n| name(n)).collect(),
        })
    };
    let delete = |to: &str, mail: u64| StoreOp::Delete {
        to: name(to),
        mail: MailId(mail),
    };
    let mut old = PgStore::open(&url).unwrap();
    old.commit(&[
        direct(1, "bob", 10),
        direct(2, "bob", 20),
        direct(3, "cal", 30),
        channel(4, &["bob", "cal", "dan"], 40),
        channel(5, &["cal"], 50),
    ])
    .unwrap();
    old.commit(&[delete("cal", 3), delete("cal", 4), delete("dan", 4)])
        .unwrap();
    // Every mailbox owed something, as the store counted it: bob 1, 2
    // and 4; cal 5; dan nothing.
    let counters = "SELECT string_agg(name || ':' || messages || ':' || bytes, ',' ORDER BY name)
                    FROM mailbox WHERE messages > 0";
    let counted = cluster.psql(0, "upgrade4", counters);
    assert_eq!(counted, "bob:3:550,cal:1:210");
    drop(old);
    // As the previous build left it: no counters, and an ack of a
    // recipient message 4 was never pending for.
    cluster.psql(0, "upgrade4", "DROP TABLE mailbox");
    cluster.psql(0, "upgrade4", "UPDATE udpchat_schema SET version = 3");
    cluster.psql(
        0,
        "upgrade4",
        "INSERT INTO channel_acked (mail, recipient) VALUES (4, 'eve')",
    );
    let mut store = PgStore::open(&url).unwrap();
    assert_eq!(
        cluster.psql(0, "upgrade4", "SELECT version FROM udpchat_schema"),
        SCHEMA_VERSION.to_string()
    );
    assert_eq!(cluster.psql(0, "upgrade4", counters), counted);
    let strays = "SELECT count(*) FROM channel_acked WHERE recipient = 'eve'";
    assert_eq!(cluster.psql(0, "upgrade4", strays), "0");
    // And counted on from there: eve, gaining message 4, is owed it.
    let gained = StoreOp::Channel(ChannelMail {
        mail: MailId(6),
        from: name("ann"),
        stored_at: 1_700_000_000,
        id: MsgId(4),
        body: vec![9; 40].into(),
        to: vec![name("eve")],
    });
    store.commit(&[gained, delete("bob", 1)]).unwrap();
    assert_eq!(
        cluster.psql(0, "upgrade4", counters),
        "bob:2:380,cal:1:210,eve:1:200"
    );
    assert_eq!(store.mailboxes(&[name("eve")]).unwrap().len(), 1);
}

/// Two servers store messages for one mailbox at the same moment, each
/// through its own connection: the database's limit holds across them
/// (the mailbox ends with exactly its limit, and exactly that many of
/// their messages were not refused).
#[test]
fn two_servers_filling_one_mailbox_at_once_stop_at_its_limit() {
    use udpchat::crypto::PublicKey;
    use udpchat::store::{Body, MailboxLimits, Outcome, Store, StoreOp, StoredMail};
    use udpchat::wire::{MailId, MsgId};

    let test = "two_servers_filling_one_mailbox_at_once_stop_at_its_limit";
    let Some(cluster) = Cluster::start(test, 0) else {
        return;
    };
    const LIMIT: usize = 50;
    let (mut a, _, mut b, _) = two_members(&cluster, "race");
    for store in [&mut a, &mut b] {
        store.limit_mailboxes(MailboxLimits {
            messages: LIMIT,
            bytes: 1 << 20,
            ttl: None,
        });
    }
    let barrier = std::sync::Barrier::new(2);
    // Each server: batches of 4 messages to bob (its own ids and sender),
    // 120 in all; returns how many were stored.
    let fill = |store: &mut udpchat::driver::postgres::PgStore, from: &str, base: u64| {
        barrier.wait();
        let mut stored = 0;
        for batch in 0..30u64 {
            let ops: Vec<StoreOp> = (0..4u64)
                .map(|i| {
                    let n = batch * 4 + i + 1;
                    StoreOp::Put(StoredMail {
                        mail: MailId(base + n),
                        to: Name::new("bob").unwrap(),
                        from: Name::new(from).unwrap(),
                        channel: false,
                        stored_at: 1_700_000_000,
                        id: MsgId(n),
                        body: Body::Sealed {
                            key: PublicKey([7; 32]),
                            sealed: vec![1; 64],
                        },
                    })
                })
                .collect();
            store.commit(&ops).unwrap();
            let refused = (store.outcomes().iter())
                .filter(|o| matches!(o, Outcome::Full { .. }))
                .count();
            stored += ops.len() - refused;
        }
        stored
    };
    let (stored_a, stored_b) = std::thread::scope(|s| {
        let by_a = s.spawn(|| fill(&mut a, "ann", 1_000_000));
        let by_b = s.spawn(|| fill(&mut b, "cal", 2_000_000));
        (by_a.join().unwrap(), by_b.join().unwrap())
    });
    let rows = a.mailboxes(&[Name::new("bob").unwrap()]).unwrap();
    assert_eq!(rows.len(), LIMIT, "bob's mailbox");
    assert_eq!(
        stored_a + stored_b,
        LIMIT,
        "a stored {stored_a}, b {stored_b}"
    );
    assert_eq!(
        cluster.psql(0, "race", "SELECT messages FROM mailbox WHERE name = 'bob'"),
        LIMIT.to_string()
    );
}
