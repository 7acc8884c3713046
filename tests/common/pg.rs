//! A real PostgreSQL cluster for the tests: one primary and two synchronous
//! standbys (`synchronous_standby_names = 'ANY 1 (s1, s2)'`), from the
//! distribution's packages, on loopback ports, in a temporary directory,
//! run as a non-root user (`postgres` when the tests run as root). Stopped
//! and removed on drop, also when a test panics.
//!
//! Where PostgreSQL is not installed a test that asks for a cluster gets
//! `None` and prints one `SKIPPED` line; with `UDPCHAT_PG_TESTS=required`
//! (as `.ci/run` sets) it fails instead.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a cluster may take to start, or a standby to catch up.
const START: Duration = Duration::from_secs(60);

/// The database and role the tests use (trust authentication on loopback).
pub const USER: &str = "udpchat";

/// One PostgreSQL instance of the cluster.
pub struct Node {
    /// Its name, also its `cluster_name` and so its replication
    /// `application_name`.
    pub name: String,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its loopback TCP port.
    pub port: u16,
    /// Stopped (or killed): not to be stopped again on drop.
    down: bool,
}

/// A primary and its standbys; `nodes[primary]` takes writes.
pub struct Cluster {
    root: PathBuf,
    bin: PathBuf,
    /// Run as this user (`None`: as ourselves, not root).
    user: Option<String>,
    pub nodes: Vec<Node>,
    pub primary: usize,
}

/// Says that `test` is skipped and why, past the test harness's capture.
pub fn skip(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// The newest installed PostgreSQL's programs (`/usr/lib/postgresql/N/bin`).
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A loopback TCP port nothing listens on (bound and let go).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback TCP port")
}

impl Cluster {
    /// Starts a primary with `standbys` synchronous standbys (a COMMIT
    /// returns once any one of them has flushed it), or `None` where
    /// PostgreSQL is not installed (see the module's text).
    pub fn start(test: &str, standbys: usize) -> Option<Cluster> {
        let required = std::env::var("UDPCHAT_PG_TESTS").is_ok_and(|v| v == "required");
        let Some(bin) = bin_dir() else {
            let why = "PostgreSQL is not installed (Debian package postgresql)";
            assert!(!required, "{why}: UDPCHAT_PG_TESTS=required");
            skip(test, why);
            return None;
        };
        // PostgreSQL refuses to run as root: root runs it as the
        // package's own `postgres` user.
        let user = is_root().then(|| "postgres".to_string());
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("udpchat-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        let mut cluster = Cluster {
            root: dir,
            bin,
            user,
            nodes: Vec::new(),
            primary: 0,
        };
        cluster.chown(&cluster.root.clone());
        let names: Vec<String> = (1..=standbys).map(|i| format!("s{i}")).collect();
        let primary = cluster.new_node("p0");
        cluster.run(
            "initdb",
            &[
                "-D",
                path(&primary.dir),
                "-U",
                USER,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let sync = if names.is_empty() {
            String::new()
        } else {
            format!("ANY 1 ({})", names.join(", "))
        };
        // Synchronous only once the standbys stream: a COMMIT before that
        // (CREATE DATABASE) would wait for them for ever.
        cluster.configure(&primary, "");
        cluster.nodes.push(primary);
        cluster.pg_ctl(0, "start");
        cluster.psql(0, "postgres", &format!("CREATE DATABASE {USER}"));
        for name in &names {
            let node = cluster.new_node(name);
            let port = cluster.nodes[0].port.to_string();
            cluster.run(
                "pg_basebackup",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    USER,
                    "-D",
                    path(&node.dir),
                    "-R",
                    // An immediate checkpoint: a spread one takes minutes.
                    "-c",
                    "fast",
                    "--no-sync",
                    "-X",
                    "stream",
                ],
            );
            cluster.configure(&node, &sync);
            cluster.nodes.push(node);
            let i = cluster.nodes.len() - 1;
            cluster.pg_ctl(i, "start");
        }
        cluster.await_standbys(standbys, false);
        if !sync.is_empty() {
            let set = format!("ALTER SYSTEM SET synchronous_standby_names = '{sync}'");
            cluster.psql(0, "postgres", &set);
            cluster.psql(0, "postgres", "SELECT pg_reload_conf()");
            cluster.await_standbys(standbys, true);
        }
        Some(cluster)
    }

    /// A node on a free port (its directory is made by initdb or
    /// pg_basebackup).
    fn new_node(&self, name: &str) -> Node {
        let dir = self.root.join(name);
        Node {
            name: name.to_string(),
            dir,
            port: free_tcp_port(),
            down: false,
        }
    }

    /// Its settings: loopback only, small, replication on, and the quorum
    /// of standbys a COMMIT waits for.
    fn configure(&self, node: &Node, sync: &str) {
        let conf = format!(
            "\n# udpchat tests\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             cluster_name = '{}'\n\
             shared_buffers = 16MB\n\
             max_connections = 40\n\
             wal_level = replica\n\
             max_wal_senders = 8\n\
             wal_keep_size = 64MB\n\
             synchronous_standby_names = '{sync}'\n\
             hot_standby = on\n\
             logging_collector = off\n",
            node.port,
            self.root.display(),
            node.name,
        );
        append(&node.dir.join("postgresql.conf"), &conf);
        append(
            &node.dir.join("pg_hba.conf"),
            "host replication all 127.0.0.1/32 trust\n",
        );
    }

    /// `host:port` of every node, primary first.
    pub fn hosts(&self) -> Vec<String> {
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        order.sort_by_key(|&i| i != self.primary);
        order
            .into_iter()
            .map(|i| format!("127.0.0.1:{}", self.nodes[i].port))
            .collect()
    }

    /// The connection string a udpchat server gets: every node, and only a
    /// read-write one will do.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}@{}/{db}?target_session_attrs=read-write&connect_timeout=2",
            self.hosts().join(",")
        )
    }

    /// A fresh database on the cluster, for one test's store.
    pub fn database(&self, name: &str) -> String {
        self.psql(self.primary, "postgres", &format!("CREATE DATABASE {name}"));
        self.url(name)
    }

    /// Runs `sql` on node `i` and gives its unaligned output.
    pub fn psql(&self, i: usize, db: &str, sql: &str) -> String {
        let port = self.nodes[i].port.to_string();
        let out = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                USER,
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until `count` standbys stream from the primary (and count
    /// for its synchronous quorum, if `sync`).
    fn await_standbys(&self, count: usize, sync: bool) {
        let deadline = Instant::now() + START;
        let sql = "SELECT count(*) FROM pg_stat_replication \
                   WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')";
        let sql = if sync {
            sql
        } else {
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        };
        loop {
            let got: usize = self
                .psql(self.primary, "postgres", sql)
                .parse()
                .unwrap_or(0);
            if got >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{got} of {count} standbys streaming after {START:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills every process of the primary with SIGKILL, as a dying machine
    /// would: no shutdown checkpoint, no goodbye to clients.
    pub fn kill_primary(&mut self) {
        let i = self.primary;
        let pid_file = self.nodes[i].dir.join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
            .and_then(|l| l.trim().parse::<i32>().ok())
            .expect("the primary's postmaster.pid");
        // Its children first (they would notice the postmaster's death,
        // but a machine's death does not wait for them to).
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &pid.to_string()])
            .output();
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .output();
        assert!(
            killed.as_ref().is_ok_and(|o| o.status.success()),
            "kill -KILL {pid}: {killed:?}"
        );
        // Gone (or a zombie, no longer serving) before the failover begins.
        let deadline = Instant::now() + START;
        let stat = format!("/proc/{pid}/stat");
        while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
            assert!(
                Instant::now() < deadline,
                "the primary {pid} outlived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.nodes[i].down = true;
    }

    /// Promotes the standby that received the most WAL (what a failover
    /// tool does: it holds every commit that was acknowledged), and points
    /// the others at it. Returns the new primary's index.
    pub fn promote_best_standby(&mut self) -> usize {
        let mut best: Option<(u64, usize)> = None;
        for i in (0..self.nodes.len()).filter(|&i| !self.nodes[i].down) {
            let lsn = self.psql(
                i,
                "postgres",
                "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint",
            );
            let lsn: u64 = lsn.parse().unwrap_or(0);
            if best.is_none_or(|(b, _)| lsn > b) {
                best = Some((lsn, i));
            }
        }
        let (_, new) = best.expect("a standby left to promote");
        self.pg_ctl(new, "promote");
        self.primary = new;
        let conninfo = format!("host=127.0.0.1 port={} user={USER}", self.nodes[new].port);
        for i in (0..self.nodes.len()).filter(|&i| i != new && !self.nodes[i].down) {
            self.psql(
                i,
                "postgres",
                &format!("ALTER SYSTEM SET primary_conninfo = '{conninfo}'"),
            );
            self.psql(i, "postgres", "SELECT pg_reload_conf()");
        }
        let standbys = self.nodes.iter().filter(|n| !n.down).count() - 1;
        self.await_standbys(standbys, true);
        new
    }

    fn pg_ctl(&self, i: usize, what: &str) {
        let log = self.root.join(format!("{}.log", self.nodes[i].name));
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&self.nodes[i].dir),
                "-l",
                path(&log),
                "-w",
                "-t",
                "60",
                what,
            ],
        );
    }

    /// Runs one of PostgreSQL's programs as the cluster's user; a failure
    /// fails the test with what it printed.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program)
            .args(args)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `program` from the PostgreSQL installation, to run as the
    /// cluster's user.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn chown(&self, dir: &Path) {
        if let Some(user) = &self.user {
            let out = Command::new("chown")
                .args([&format!("{user}:"), path(dir)])
                .output()
                .expect("chown");
            assert!(out.status.success(), "chown {}: {:?}", dir.display(), out);
        }
    }
}

/// Whether this process runs as root (`id -u`: no unsafe libc call).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Adds `text` to the end of the file at `file`.
fn append(file: &Path, text: &str) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(file)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.iter().filter(|n| !n.down) {
            let _ = self
                .command("pg_ctl")
                .args(["-D", path(&node.dir), "-m", "immediate", "-w", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
