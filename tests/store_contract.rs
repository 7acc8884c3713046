//! One storage contract, every store: the same cases run against
//! `MemoryStore`, `SqliteStore` and `PgStore` (a real PostgreSQL primary
//! with two synchronous standbys, see `common::pg`). Each case starts from
//! an empty store; a batch applied twice (a COMMIT whose outcome was lost
//! with its connection is replayed) must leave what one application does.

mod common;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::pg::Cluster;
use udpchat::crypto::PublicKey;
use udpchat::driver::postgres::PgStore;
use udpchat::driver::sqlite::SqliteStore;
use udpchat::store::{
    Body, ChannelMail, ClientRecord, Loaded, MailboxLimits, MemoryStore, Outcome, Store, StoreOp,
    StoredMail,
};
use udpchat::wire::{MailId, MsgId, Name};

/// splitmix64: every run makes the same batches.
struct TestRng(u64);

impl TestRng {
    fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % bound.max(1)
    }
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn mail(mail: u64, to: &str, from: &str, id: u64, text: &str) -> StoredMail {
    StoredMail {
        mail: MailId(mail),
        to: name(to),
        from: name(from),
        channel: false,
        stored_at: 1_700_000_000 + mail as i64,
        id: MsgId(id),
        // The store keeps bodies as they come: any bytes will do.
        body: Body::Sealed {
            key: PublicKey([7; 32]),
            sealed: text.as_bytes().to_vec(),
        },
    }
}

fn channel(mail: u64, from: &str, to: &[&str], text: &str) -> ChannelMail {
    ChannelMail {
        mail: MailId(mail),
        from: name(from),
        stored_at: 1_700_000_000,
        id: MsgId(mail * 10),
        body: text.as_bytes().to_vec().into(),
        to: to.iter().map(|n| name(n)).collect(),
    }
}

fn record(n: &str, port: u16, key: Option<u8>, seen_at: Option<i64>) -> ClientRecord {
    ClientRecord {
        name: name(n),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        key: key.map(|k| PublicKey([k; 32])),
        seen_at,
    }
}

fn delete(to: &str, mail: u64) -> StoreOp {
    StoreOp::Delete {
        to: name(to),
        mail: MailId(mail),
    }
}

fn names(loaded: &Loaded) -> Vec<(String, u64)> {
    (loaded.mail.iter())
        .map(|m| (m.to.to_string(), m.mail.0))
        .collect()
}

/// A case: what it checks, and the check on an empty store.
type Case = (&'static str, fn(&mut dyn Store));

const CASES: &[Case] = &[
    ("a round trip", round_trip),
    ("a put is idempotent", put_is_idempotent),
    (
        "a delete takes only the acked mail",
        delete_takes_only_the_acked_mail,
    ),
    ("a client row is an upsert", client_row_is_an_upsert),
    (
        "a channel message goes with its last recipient",
        channel_goes_with_the_last,
    ),
    (
        "a fetch answers only the recipient",
        fetch_answers_only_the_recipient,
    ),
    ("a bad batch leaves nothing", a_bad_batch_leaves_nothing),
    ("a replayed batch counts once", a_replayed_batch_counts_once),
    ("forget and rewrite", forget_and_rewrite),
    (
        "random batches match the memory store",
        random_batches_match_the_model,
    ),
];

fn round_trip(store: &mut dyn Store) {
    let ops = vec![
        StoreOp::Client(record("Alice", 2000, Some(1), Some(5))),
        StoreOp::Client(record("Bob", 2001, None, None)),
        StoreOp::Put(mail(1, "Bob", "Alice", 11, "hello")),
        StoreOp::Channel(channel(2, "Alice", &["Bob", "Carol"], "to all")),
        StoreOp::Put(mail(3, "Alice", "Bob", u64::MAX, "max id")),
    ];
    store.commit(&ops).unwrap();
    let loaded = store.load().unwrap();
    let clients: Vec<&str> = loaded.clients.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(clients, ["Alice", "Bob"]);
    assert_eq!(loaded.clients[0], record("Alice", 2000, Some(1), Some(5)));
    assert_eq!(loaded.clients[1], record("Bob", 2001, None, None));
    assert_eq!(
        names(&loaded),
        [
            ("Bob".into(), 1),
            ("Bob".into(), 2),
            ("Carol".into(), 2),
            ("Alice".into(), 3)
        ]
    );
    assert_eq!(loaded.mail[0], mail(1, "Bob", "Alice", 11, "hello"));
    assert_eq!(loaded.mail[3].id, MsgId(u64::MAX));
    let copies: Vec<StoredMail> = channel(2, "Alice", &["Bob", "Carol"], "to all")
        .copies()
        .collect();
    assert_eq!(loaded.mail[1..3], copies[..]);
}

fn put_is_idempotent(store: &mut dyn Store) {
    let m = mail(1, "Bob", "Alice", 7, "once");
    store.commit(&[StoreOp::Put(m.clone())]).unwrap();
    store.commit(&[StoreOp::Put(m.clone())]).unwrap();
    // The same (recipient, sender, id) under a new mail id: a retry.
    let mut again = mail(2, "Bob", "Alice", 7, "once");
    again.stored_at += 9;
    store.commit(&[StoreOp::Put(again)]).unwrap();
    assert_eq!(store.load().unwrap().mail, std::slice::from_ref(&m));
    // Twice in one batch: the first is kept.
    let first = mail(5, "Carol", "Alice", 9, "first");
    let second = mail(6, "Carol", "Alice", 9, "second");
    store
        .commit(&[StoreOp::Put(first.clone()), StoreOp::Put(second)])
        .unwrap();
    assert_eq!(store.load().unwrap().mail, [m, first]);
}

fn delete_takes_only_the_acked_mail(store: &mut dyn Store) {
    store
        .commit(&[
            StoreOp::Put(mail(1, "Bob", "Alice", 1, "a")),
            StoreOp::Put(mail(2, "Bob", "Alice", 2, "b")),
            StoreOp::Put(mail(3, "Carol", "Alice", 3, "c")),
        ])
        .unwrap();
    // Another recipient's id, and one never stored, delete nothing.
    store
        .commit(&[delete("Bob", 2), delete("Bob", 3), delete("Bob", 99)])
        .unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(names(&loaded), [("Bob".into(), 1), ("Carol".into(), 3)]);
    assert_eq!(store.fetch(&name("Bob"), MailId(2)).unwrap(), None);
    // Acked, then stored again by its id: a new message (not a retry).
    store
        .commit(&[StoreOp::Put(mail(4, "Bob", "Alice", 2, "b"))])
        .unwrap();
    assert_eq!(store.load().unwrap().mail.len(), 3);
}

fn client_row_is_an_upsert(store: &mut dyn Store) {
    store
        .commit(&[
            StoreOp::Client(record("Alice", 2000, None, Some(5))),
            StoreOp::Client(record("Bob", 2001, Some(2), Some(5))),
        ])
        .unwrap();
    // A new address; a name's key is bound once (from none), never
    // replaced; a row written without a time keeps the one stored.
    store
        .commit(&[
            StoreOp::Client(record("Alice", 3000, Some(1), None)),
            StoreOp::Client(record("Bob", 3001, Some(9), Some(8))),
            StoreOp::Client(record("Alice", 3002, Some(3), None)),
        ])
        .unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(
        loaded.clients,
        [
            record("Alice", 3002, Some(1), Some(5)),
            record("Bob", 3001, Some(2), Some(8)),
        ]
    );
}

fn channel_goes_with_the_last(store: &mut dyn Store) {
    let c = channel(5, "Alice", &["Bob", "Carol", "Dave"], "all");
    store.commit(&[StoreOp::Channel(c.clone())]).unwrap();
    store.commit(&[delete("Bob", 5)]).unwrap();
    // An ack twice, and one from a name it was never stored for, count
    // for nothing.
    store
        .commit(&[delete("Bob", 5), delete("Eve", 5), delete("Carol", 5)])
        .unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(names(&loaded), [("Dave".into(), 5)]);
    assert_eq!(store.fetch(&name("Bob"), MailId(5)).unwrap(), None);
    assert_eq!(
        store.fetch(&name("Dave"), MailId(5)).unwrap(),
        Some(Body::Channel(c.body.clone()))
    );
    store.commit(&[delete("Dave", 5)]).unwrap();
    assert!(store.load().unwrap().mail.is_empty());
    assert_eq!(store.fetch(&name("Dave"), MailId(5)).unwrap(), None);
    // Stored again under its id (the store forgot it): the acks of the
    // first are not this one's.
    store.commit(&[StoreOp::Channel(c)]).unwrap();
    assert_eq!(store.load().unwrap().mail.len(), 3);
}

fn fetch_answers_only_the_recipient(store: &mut dyn Store) {
    let m = mail(1, "Bob", "Alice", 1, "for Bob");
    store.commit(&[StoreOp::Put(m.clone())]).unwrap();
    assert_eq!(store.fetch(&name("Bob"), MailId(1)).unwrap(), Some(m.body));
    assert_eq!(store.fetch(&name("Carol"), MailId(1)).unwrap(), None);
    assert_eq!(store.fetch(&name("Bob"), MailId(2)).unwrap(), None);
}

fn a_bad_batch_leaves_nothing(store: &mut dyn Store) {
    let mut bad = mail(2, "Bob", "Alice", 2, "x");
    bad.body = Body::Sealed {
        key: PublicKey([7; 32]),
        sealed: vec![1; 5000],
    };
    let err = store
        .commit(&[
            StoreOp::Client(record("Alice", 2000, Some(1), None)),
            StoreOp::Put(mail(1, "Bob", "Alice", 1, "fine")),
            StoreOp::Put(bad),
        ])
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert_eq!(store.load().unwrap(), Loaded::default());
}

fn a_replayed_batch_counts_once(store: &mut dyn Store) {
    store
        .commit(&[StoreOp::Channel(channel(
            1,
            "Alice",
            &["Bob", "Carol"],
            "c",
        ))])
        .unwrap();
    let batch = [
        StoreOp::Client(record("Bob", 2000, Some(2), Some(9))),
        StoreOp::Put(mail(2, "Carol", "Bob", 1, "direct")),
        delete("Bob", 1),
        StoreOp::Channel(channel(3, "Bob", &["Alice", "Carol"], "c2")),
        delete("Alice", 3),
    ];
    store.commit(&batch).unwrap();
    let once = store.load().unwrap();
    // The COMMIT went through but its answer was lost: the batch again.
    store.commit(&batch).unwrap();
    assert_eq!(store.load().unwrap(), once);
    // Carol still owes both channel messages: each one's count is right.
    store
        .commit(&[delete("Carol", 1), delete("Carol", 3)])
        .unwrap();
    assert_eq!(names(&store.load().unwrap()), [("Carol".into(), 2)]);
}

fn forget_and_rewrite(store: &mut dyn Store) {
    store
        .commit(&[
            StoreOp::Client(record("Alice", 2000, Some(1), None)),
            StoreOp::Client(record("Bob", 2001, Some(2), None)),
            StoreOp::Put(mail(1, "Bob", "Alice", 1, "old")),
        ])
        .unwrap();
    let body = Body::AtRest(b"new body".to_vec());
    store
        .commit(&[
            StoreOp::Forget(name("Alice")),
            StoreOp::Rewrite {
                mail: MailId(1),
                body: body.clone(),
            },
        ])
        .unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.clients, [record("Bob", 2001, Some(2), None)]);
    assert_eq!(loaded.mail[0].body, body);
    // A forgotten name registers afresh, last in order, with a new key.
    store
        .commit(&[StoreOp::Client(record("Alice", 2002, Some(3), None))])
        .unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.clients[1], record("Alice", 2002, Some(3), None));
}

/// Random batches of every operation, each sometimes committed twice,
/// against the memory store as the model: loads and fetches agree.
fn random_batches_match_the_model(store: &mut dyn Store) {
    random_batches_match(store, MemoryStore::new(), 0x5eed);
}

/// [`random_batches_match_the_model`] for a store that enforces
/// [`LIMITS`], against a memory store that does: the same messages are
/// refused, in the same order.
fn random_batches_match_the_limited_model(store: &mut dyn Store) {
    let refusals = random_batches_match(store, MemoryStore::with_limits(LIMITS), 0x11_4175);
    assert!(
        refusals > 20,
        "only {refusals} refused: the case tests little"
    );
}

/// What the last commit of `store` refused.
fn refused(store: &mut dyn Store) -> Vec<Outcome> {
    (store.outcomes().into_iter())
        .filter(|o| matches!(o, Outcome::Full { .. }))
        .collect()
}

/// Returns how many messages were refused.
fn random_batches_match(store: &mut dyn Store, mut model: MemoryStore, seed: u64) -> usize {
    const NAMES: [&str; 5] = ["Alice", "Bob", "Carol", "Dave", "Eve"];
    let mut rng = TestRng::new(seed);
    let mut refusals = 0;
    let mut next = 1u64;
    for _ in 0..40 {
        let mut batch = Vec::new();
        for _ in 0..rng.below(6) + 1 {
            let who = NAMES[rng.below(5) as usize];
            let other = NAMES[rng.below(5) as usize];
            let op = match rng.below(6) {
                0 => StoreOp::Client(record(
                    who,
                    2000 + rng.below(50) as u16,
                    (rng.below(2) == 0).then_some(rng.below(3) as u8),
                    (rng.below(2) == 0).then_some(rng.below(100) as i64),
                )),
                1 | 2 => {
                    next += 1;
                    let id = rng.below(8);
                    // Now and then a long one (a mailbox's bytes fill up).
                    let text = match rng.below(4) {
                        0 => "x".repeat(300),
                        _ => format!("m{next}"),
                    };
                    StoreOp::Put(mail(next, who, other, id, &text))
                }
                3 => {
                    next += 1;
                    let to: Vec<&str> = NAMES
                        .iter()
                        .copied()
                        .filter(|_| rng.below(2) == 0)
                        .collect();
                    if to.is_empty() {
                        continue;
                    }
                    StoreOp::Channel(channel(next, who, &to, &format!("c{next}")))
                }
                4 => delete(who, rng.below(next + 1)),
                _ => StoreOp::Forget(name(who)),
            };
            batch.push(op);
        }
        let replays = if rng.below(3) == 0 { 2 } else { 1 };
        for _ in 0..replays {
            store.commit(&batch).unwrap();
            model.commit(&batch).unwrap();
            let want = refused(&mut model);
            assert_eq!(refused(store), want, "refused of {batch:?}");
            refusals += want.len();
        }
        let (got, want) = (store.load().unwrap(), model.load().unwrap());
        assert_eq!(got.mail, want.mail, "after {batch:?}");
        // Two names' mailboxes, as one of several servers fetches them.
        let asked = [
            name(NAMES[rng.below(5) as usize]),
            name(NAMES[rng.below(5) as usize]),
        ];
        assert_eq!(
            store.mailboxes(&asked).unwrap(),
            model.mailboxes(&asked).unwrap(),
            "mailboxes of {asked:?} after {batch:?}"
        );
        assert_eq!(got.clients, want.clients, "after {batch:?}");
        for m in &want.mail {
            assert_eq!(
                store.fetch(&m.to, m.mail).unwrap(),
                Some(m.body.clone()),
                "fetch {} {}",
                m.to,
                m.mail.0
            );
        }
    }
    refusals
}

/// The limits of [`LIMITED_CASES`]: three messages, 1000 bytes (six
/// small messages' worth, each counted with `MAIL_OVERHEAD`, 160).
const LIMITS: MailboxLimits = MailboxLimits {
    messages: 3,
    bytes: 1000,
    ttl: None,
};

/// [`LIMITS`] with a mail time to live of a minute.
const LIMITS_TTL: MailboxLimits = MailboxLimits {
    ttl: Some(std::time::Duration::from_secs(60)),
    ..LIMITS
};

/// A message stored a minute and a second before [`mail`]'s.
fn old_put(id: u64, to: &str) -> StoreOp {
    let mut m = mail(id, to, "Alice", id, "old");
    m.stored_at -= 61;
    StoreOp::Put(m)
}

/// With [`LIMITS_TTL`]: messages past the time to live do not count,
/// deleted or not (nobody expires a mailbox nobody holds), and their
/// late deletes do not make room twice.
fn expired_messages_do_not_count(store: &mut dyn Store) {
    let old: Vec<StoreOp> = (1..=3).map(|i| old_put(i, "Hal")).collect();
    assert_eq!(commit(store, &old), []);
    let mut old_channel = channel(4, "Alice", &["Ivy"], "old");
    old_channel.stored_at -= 61;
    assert_eq!(commit(store, &[StoreOp::Channel(old_channel)]), []);
    // A full mailbox of expired messages takes new ones: Hal's, up to
    // the limit of live ones; the expired ones' deletes in the same
    // batch count once.
    let batch = [
        put(5, "Hal", "new"),
        put(6, "Hal", "new"),
        delete("Hal", 1),
        put(7, "Hal", "new"),
        put(8, "Hal", "new"),
    ];
    assert_eq!(commit(store, &batch), [full("Hal", 8)]);
    assert_eq!(mailbox(store, "Hal"), [2, 3, 5, 6, 7]);
    assert_eq!(commit(store, &[put(9, "Hal", "new")]), [full("Hal", 9)]);
    // An expired channel copy does not count either.
    let batch: Vec<StoreOp> = (10..14).map(|i| put(i, "Ivy", "new")).collect();
    assert_eq!(commit(store, &batch), [full("Ivy", 13)]);
    assert_eq!(mailbox(store, "Ivy"), [4, 10, 11, 12]);
}

/// The cases of a store that enforces [`LIMITS`] (one shared by several
/// servers; a store of one server never refuses: its server does).
const LIMITED_CASES: &[Case] = &[
    ("a full mailbox refuses", a_full_mailbox_refuses),
    (
        "random batches match the memory store with limits",
        random_batches_match_the_limited_model,
    ),
];

fn full(to: &str, mail: u64) -> Outcome {
    Outcome::Full {
        to: name(to),
        mail: MailId(mail),
    }
}

/// Commits `ops`, and what it refused.
fn commit(store: &mut dyn Store, ops: &[StoreOp]) -> Vec<Outcome> {
    store.commit(ops).unwrap();
    refused(store)
}

/// The mail ids in `to`'s mailbox.
fn mailbox(store: &mut dyn Store, to: &str) -> Vec<u64> {
    (store.mailboxes(&[name(to)]).unwrap().iter())
        .map(|m| m.mail.0)
        .collect()
}

fn put(id: u64, to: &str, text: &str) -> StoreOp {
    StoreOp::Put(mail(id, to, "Alice", id, text))
}

fn a_full_mailbox_refuses(store: &mut dyn Store) {
    // Up to the limit: stored.
    for i in 1..=3 {
        assert_eq!(commit(store, &[put(i, "Bob", "hi")]), []);
    }
    // The next is refused, and found nowhere.
    assert_eq!(commit(store, &[put(4, "Bob", "hi")]), [full("Bob", 4)]);
    assert_eq!(mailbox(store, "Bob"), [1, 2, 3]);
    assert_eq!(store.fetch(&name("Bob"), MailId(4)).unwrap(), None);
    // A delete makes room (in the same batch, before the message).
    assert_eq!(commit(store, &[delete("Bob", 1), put(5, "Bob", "hi")]), []);
    assert_eq!(mailbox(store, "Bob"), [2, 3, 5]);
    // A channel message to a full and a non-full mailbox: pending only
    // for the latter.
    let to_both = StoreOp::Channel(channel(6, "Alice", &["Bob", "Carol"], "to all"));
    assert_eq!(commit(store, &[to_both]), [full("Bob", 6)]);
    assert_eq!(mailbox(store, "Bob"), [2, 3, 5]);
    assert_eq!(mailbox(store, "Carol"), [6]);
    assert_eq!(store.fetch(&name("Bob"), MailId(6)).unwrap(), None);
    assert!(store.fetch(&name("Carol"), MailId(6)).unwrap().is_some());
    // To full mailboxes only: kept for nobody.
    let to_bob = StoreOp::Channel(channel(7, "Alice", &["Bob"], "to Bob"));
    assert_eq!(
        commit(store, std::slice::from_ref(&to_bob)),
        [full("Bob", 7)]
    );
    assert!(store.load().unwrap().mail.iter().all(|m| m.mail.0 != 7));
    // Sent again once there is room: stored.
    assert_eq!(commit(store, &[delete("Bob", 2)]), []);
    assert_eq!(commit(store, &[to_bob]), []);
    assert_eq!(mailbox(store, "Bob"), [3, 5, 7]);
    // A replayed batch whose messages were stored reports nothing, and
    // changes nothing (Carol then holds 8 and 9, room for one more).
    let batch = [
        put(8, "Carol", "a"),
        StoreOp::Channel(channel(9, "Alice", &["Carol", "Dave"], "b")),
        delete("Carol", 6),
    ];
    assert_eq!(commit(store, &batch), []);
    let once = store.load().unwrap();
    assert_eq!(commit(store, &batch), []);
    assert_eq!(store.load().unwrap(), once);
    assert_eq!(
        commit(store, &[put(10, "Carol", "c"), put(11, "Carol", "d")]),
        [full("Carol", 11)]
    );
    // Several messages to one mailbox in one batch: the first ones are
    // kept, in batch order.
    let batch: Vec<StoreOp> = (20..25).map(|i| put(i, "Eve", "e")).collect();
    assert_eq!(commit(store, &batch), [full("Eve", 23), full("Eve", 24)]);
    assert_eq!(mailbox(store, "Eve"), [20, 21, 22]);
    // Bytes: a long message takes the room of several; a shorter one
    // after a refused one may still fit.
    let batch = [
        put(30, "Frank", &"x".repeat(600)),
        put(31, "Frank", &"y".repeat(300)),
        put(32, "Frank", &"z".repeat(50)),
    ];
    assert_eq!(commit(store, &batch), [full("Frank", 31)]);
    assert_eq!(mailbox(store, "Frank"), [30, 32]);
    // One longer than a mailbox holds: refused into an empty one.
    assert_eq!(
        commit(store, &[put(40, "Gus", &"g".repeat(900))]),
        [full("Gus", 40)]
    );
    assert_eq!(mailbox(store, "Gus"), Vec::<u64>::new());
}

/// Runs every case on a fresh store from `fresh`, naming the one that
/// failed.
fn run_cases(store_kind: &str, cases: &[Case], mut fresh: impl FnMut(usize) -> Box<dyn Store>) {
    for (i, (what, case)) in cases.iter().enumerate() {
        let mut store = fresh(i);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            case(store.as_mut());
        }));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{store_kind}: {what}: {msg}");
        }
    }
}

#[test]
fn the_memory_store_keeps_the_contract() {
    run_cases("MemoryStore", CASES, |_| Box::new(MemoryStore::new()));
}

#[test]
fn the_memory_store_with_limits_refuses_what_has_no_room() {
    run_cases("MemoryStore::with_limits", LIMITED_CASES, |_| {
        Box::new(MemoryStore::with_limits(LIMITS))
    });
}

#[test]
fn the_memory_store_with_a_mail_ttl_does_not_count_expired_mail() {
    let mut store = MemoryStore::with_limits(LIMITS_TTL);
    expired_messages_do_not_count(&mut store);
}

#[test]
fn the_sqlite_store_keeps_the_contract() {
    let dir = common::scratch_dir();
    run_cases("SqliteStore", CASES, |i| {
        Box::new(SqliteStore::open(&dir.path().join(format!("case-{i}"))).unwrap())
    });
}

#[test]
fn the_postgres_store_keeps_the_contract() {
    let Some(cluster) = Cluster::start("the_postgres_store_keeps_the_contract", 2) else {
        return;
    };
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    run_cases("PgStore", CASES, |i| {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let url = cluster.database(&format!("contract_{i}_{n}"));
        Box::new(PgStore::open(&url).unwrap())
    });
    // One cluster for both: each start takes seconds.
    run_cases("PgStore with limits", LIMITED_CASES, |i| {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let url = cluster.database(&format!("limited_{i}_{n}"));
        let mut store = PgStore::open(&url).unwrap();
        store.limit_mailboxes(LIMITS);
        Box::new(store)
    });
    let mut store = PgStore::open(&cluster.database("limited_ttl")).unwrap();
    store.limit_mailboxes(LIMITS_TTL);
    expired_messages_do_not_count(&mut store);
}
