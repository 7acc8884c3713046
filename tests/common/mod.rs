//! Harness for the end-to-end tests: runs the real `udpchat` binary on
//! loopback and checks what it prints, line by line.
//!
//! Every wait here is for a condition (a line, an exit, end of output) with a
//! generous deadline, because CI is a noisy two-core machine; the one
//! exception is [`Client::expect_quiet`], where the absence of output over a
//! short window is itself the condition under test.

// Each test crate uses a different part of the harness.
#![allow(dead_code)]

pub mod pg;
pub mod stream;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long any single condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The window for [`Client::expect_quiet`]: longer than one ack timeout
/// (500 ms), so a wrongly triggered exchange would show up inside it.
pub const QUIET: Duration = Duration::from_millis(700);

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_udpchat");

/// How many times a start is retried when the chosen port was taken between
/// picking it and the binary binding it.
pub const PORT_RETRIES: usize = 10;

/// `client` deregisters; every client in `others` sees the table change.
#[track_caller]
pub fn dereg(client: &mut Client, others: &mut [&mut Client]) {
    let name = client.name().to_owned();
    client.send(&format!("dereg {name}"));
    client.expect(BYE);
    for other in others {
        other.expect(TABLE);
    }
}

/// `>>> [Welcome, You are registered.]`
pub const WELCOME: &str = ">>> [Welcome, You are registered.]";
/// `>>> [Client table updated.]`
pub const TABLE: &str = ">>> [Client table updated.]";
/// `>>> [Messages received by the server and saved]`
pub const SAVED: &str = ">>> [Messages received by the server and saved]";
/// `>>> [You Have Messages]`
pub const MAIL: &str = ">>> [You Have Messages]";
/// `>>> [You are Offline. Bye.]`
pub const BYE: &str = ">>> [You are Offline. Bye.]";

/// A UDP port that was free a moment ago: bound on 127.0.0.1:0 and released.
/// The kernel hands these out from the ephemeral range, so they are >= 1024.
pub fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = socket.local_addr().expect("local_addr").port();
    assert!(port >= 1024, "ephemeral port {port} below 1024");
    port
}

/// The exact stderr text the binary prints when its port is taken.
pub fn port_in_use_error(port: u16) -> String {
    format!("error: port {port} is already in use")
}

/// Seconds since the epoch when the harness first started a server; stored
/// timestamps must not be older than this.
fn harness_start() -> i64 {
    static START: OnceLock<i64> = OnceLock::new();
    *START.get_or_init(epoch_now)
}

fn epoch_now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_secs()).expect("time fits i64")
}

// ---------------------------------------------------------------------------
// Captured output of a child process.

enum Chunk {
    Out(String),
    Err(String),
    OutEnd,
    ErrEnd,
}

/// Lines a child wrote, gathered by one reader thread per stream so the
/// child never blocks on a full pipe.
struct Captured {
    rx: Receiver<Chunk>,
    stdout: Vec<String>,
    stderr: Vec<String>,
    out_done: bool,
    err_done: bool,
}

impl Captured {
    fn take(child: &mut Child) -> Captured {
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout piped");
        let err = child.stderr.take().expect("stderr piped");
        spawn_reader(out, tx.clone(), Chunk::Out, Chunk::OutEnd);
        spawn_reader(err, tx, Chunk::Err, Chunk::ErrEnd);
        Captured {
            rx,
            stdout: Vec::new(),
            stderr: Vec::new(),
            out_done: false,
            err_done: false,
        }
    }

    fn record(&mut self, chunk: Chunk) {
        match chunk {
            Chunk::Out(line) => self.stdout.push(line),
            Chunk::Err(line) => self.stderr.push(line),
            Chunk::OutEnd => self.out_done = true,
            Chunk::ErrEnd => self.err_done = true,
        }
    }

    /// Takes in whatever has arrived, without waiting.
    fn drain(&mut self) {
        while let Ok(chunk) = self.rx.try_recv() {
            self.record(chunk);
        }
    }

    /// Takes in output until `done` holds or `deadline` passes; returns
    /// whether `done` holds.
    fn pump_until(&mut self, deadline: Instant, done: impl Fn(&Captured) -> bool) -> bool {
        self.drain();
        loop {
            if done(self) {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.record(chunk),
                Err(RecvTimeoutError::Timeout) => return done(self),
                // Both readers are gone, so nothing more can arrive.
                Err(RecvTimeoutError::Disconnected) => return done(self),
            }
        }
    }

    fn ended(&self) -> bool {
        self.out_done && self.err_done
    }

    fn stderr_text(&self) -> String {
        self.stderr.join("\n")
    }
}

fn spawn_reader<R: Read + Send + 'static>(
    pipe: R,
    tx: Sender<Chunk>,
    line: fn(String) -> Chunk,
    end: Chunk,
) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    // Lossy so that bad UTF-8 shows up in a failure message
                    // instead of killing the reader.
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if tx.send(line(text)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(end);
    });
}

/// Polls `child` for an exit until `deadline`.
fn wait_child(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("try_wait failed: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        // A poll interval, not a stand-in for a condition: the loop ends on
        // the exit itself.
        thread::sleep(Duration::from_millis(10));
    }
}

fn send_signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own
    // child, which is not reaped until we wait on it, so it cannot have been
    // reused by an unrelated process.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
}

fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------
// Matching expected lines.

/// Checks `line` against `pattern`: exact text, except that each `<ts>` in the
/// pattern matches a local-time timestamp `YYYY-MM-DD HH:MM:SS` taken while
/// the test ran. On mismatch says why.
pub fn line_matches(pattern: &str, line: &str) -> Result<(), String> {
    if !pattern.contains("<ts>") {
        return if line == pattern {
            Ok(())
        } else {
            Err("the text differs".to_owned())
        };
    }
    let mut pieces = pattern.split("<ts>");
    let first = pieces.next().unwrap_or("");
    let mut rest = line
        .strip_prefix(first)
        .ok_or_else(|| format!("does not start with {first:?}"))?;
    for literal in pieces {
        let (stamp, after) = split_timestamp(rest)
            .ok_or_else(|| format!("no YYYY-MM-DD HH:MM:SS timestamp at {rest:?}"))?;
        check_timestamp(stamp)?;
        rest = after
            .strip_prefix(literal)
            .ok_or_else(|| format!("after the timestamp, {after:?} is not {literal:?}"))?;
    }
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected trailing text {rest:?}"))
    }
}

const STAMP_SHAPE: &[u8; 19] = b"0000-00-00 00:00:00";

fn split_timestamp(s: &str) -> Option<(&str, &str)> {
    let bytes = s.as_bytes().get(..STAMP_SHAPE.len())?;
    let shaped = bytes
        .iter()
        .zip(STAMP_SHAPE)
        .all(|(&b, &shape)| match shape {
            b'0' => b.is_ascii_digit(),
            other => b == other,
        });
    // All 19 bytes are ASCII, so 19 is a char boundary.
    shaped.then(|| s.split_at(STAMP_SHAPE.len()))
}

/// The timestamp is when the server stored the message, in local time, so it
/// must fall between the start of the test run and now (a little slack for
/// whole-second rounding).
fn check_timestamp(stamp: &str) -> Result<(), String> {
    let field = |range: std::ops::Range<usize>| -> libc::c_int {
        stamp[range]
            .parse()
            .expect("digits checked by split_timestamp")
    };
    let (year, month, day) = (field(0..4), field(5..7), field(8..10));
    let (hour, minute, second) = (field(11..13), field(14..16), field(17..19));
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(format!("timestamp {stamp:?} is not a valid date and time"));
    }
    // SAFETY: an all-zero `tm` is a valid value (integers, and a null zone
    // pointer that mktime never reads).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = year - 1900;
    tm.tm_mon = month - 1;
    tm.tm_mday = day;
    tm.tm_hour = hour;
    tm.tm_min = minute;
    tm.tm_sec = second;
    // Let the C library decide whether daylight saving applies.
    tm.tm_isdst = -1;
    // SAFETY: `tm` is a valid, exclusively borrowed struct for the call.
    let time = unsafe { libc::mktime(&mut tm) };
    // time_t is narrower than i64 on some targets.
    #[allow(clippy::useless_conversion)]
    let epoch = i64::from(time);
    let (earliest, latest) = (harness_start() - 2, epoch_now() + 2);
    if (earliest..=latest).contains(&epoch) {
        Ok(())
    } else {
        Err(format!(
            "timestamp {stamp:?} (epoch {epoch}) is not local time during the test \
             (expected epoch within {earliest}..={latest})"
        ))
    }
}

// ---------------------------------------------------------------------------
// The server.

/// A running `udpchat -s <port>`; killed on drop.
pub struct Server {
    child: Child,
    port: u16,
    output: Captured,
    dir: TempDir,
    /// Flags after `-s <port>`, kept so that [`Server::restart`] starts the
    /// same server again.
    extra: Vec<String>,
    /// The network namespace it runs in, if not the test's own.
    netns: Option<String>,
}

/// A directory removed on drop, also when a test panics.
pub struct TempDir(PathBuf);

impl TempDir {
    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, empty working directory for one server. The server keeps its
/// durable data under its working directory by default, so tests running in
/// parallel (or a previous run) must not share one: a stale mailbox would
/// show up as mail nobody sent in this test.
fn fresh_dir() -> TempDir {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("udpchat-e2e-{}-{n}", std::process::id()));
    // Left over from a crashed run whose pid was reused.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create server working directory");
    TempDir(dir)
}

/// A fresh, empty directory for a test's own files (a data directory to
/// damage, a file to pass where a directory belongs); removed on drop.
pub fn scratch_dir() -> TempDir {
    fresh_dir()
}

/// Where clients of the server on a port keep their keys and
/// `known_servers` (`XDG_CONFIG_HOME`): inside that server's directory, so
/// a client started again under the same name has the same key, and no
/// test ever touches the real `~/.config` or meets another test's server
/// on a reused port.
fn config_homes() -> &'static Mutex<HashMap<u16, PathBuf>> {
    static HOMES: OnceLock<Mutex<HashMap<u16, PathBuf>>> = OnceLock::new();
    HOMES.get_or_init(Default::default)
}

/// The config home of clients of `server_port` (a fresh one if no harness
/// server runs there).
pub fn config_home(server_port: u16) -> PathBuf {
    let mut homes = config_homes().lock().unwrap_or_else(|e| e.into_inner());
    homes
        .entry(server_port)
        .or_insert_with(|| {
            // No server of ours: a directory of its own, kept for the run.
            let dir = fresh_dir();
            let path = dir.0.join("config");
            std::mem::forget(dir);
            path
        })
        .clone()
}

/// The key file of client `name` of the server on `server_port`.
pub fn key_file(server_port: u16, name: &str) -> PathBuf {
    config_home(server_port)
        .join("udpchat")
        .join(format!("{name}.key"))
}

/// The command that runs the binary, in the network namespace `netns` if
/// given (`ip netns exec` execs it, so the child is the binary itself and
/// signals reach it).
fn binary(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, BIN]);
            command
        }
        None => Command::new(BIN),
    }
}

/// Spawns `udpchat -s <port> <extra…>` in `dir` with its output captured.
fn spawn_server(dir: &Path, port: u16, extra: &[String], netns: Option<&str>) -> (Child, Captured) {
    let mut child = binary(netns)
        .arg("-s")
        .arg(port.to_string())
        // `{port}` in a flag is the port chosen (`--advertise 127.0.0.1:{port}`).
        .args(extra.iter().map(|a| a.replace("{port}", &port.to_string())))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn udpchat server");
    let output = Captured::take(&mut child);
    (child, output)
}

/// Whether `stdout` holds the line a server on `port` prints once it
/// listens (on `[::]` by default, `0.0.0.0` where the host has no IPv6,
/// or the `--bind` address).
fn says_listening(stdout: &[String], port: u16) -> bool {
    let port = format!(":{port}");
    stdout.iter().any(|l| {
        unstamped(l)
            .strip_prefix("udpchat server listening on ")
            .is_some_and(|at| at.ends_with(&port))
    })
}

/// Whether `line` is the first line of `list`: `[Client table: N of M
/// online.]`.
pub fn is_list_header(line: &str) -> bool {
    line.starts_with(">>> [Client table: ") && line.ends_with(" online.]")
}

/// Reads the first line of `list` at `client`; returns how many of how many
/// clients it says are online.
#[track_caller]
pub fn list_header(client: &mut Client) -> (usize, usize) {
    let Some(line) = client.next_line(DEADLINE) else {
        client.fail("list printed nothing");
    };
    let counts = line
        .strip_prefix(">>> [Client table: ")
        .and_then(|l| l.strip_suffix(" online.]"))
        .and_then(|l| l.split_once(" of "))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    counts.unwrap_or_else(|| client.fail(&format!("{line:?} is not list's header")))
}

/// Whether `line` names a client that came or went (after a table update).
pub fn is_presence(line: &str) -> bool {
    line.strip_prefix(">>> [").is_some_and(|rest| {
        rest.ends_with(" is online.]")
            || rest.ends_with(" is offline.]")
            || rest.ends_with(" more clients came or went; type list to see them.]")
    })
}

/// A server log line without its time stamp (`2026-12-06T21:15:03.042Z `).
pub fn unstamped(line: &str) -> &str {
    match line.split_once(' ') {
        Some((stamp, rest)) if stamp.len() == 24 && stamp.ends_with('Z') => rest,
        _ => line,
    }
}

impl Server {
    /// Starts a server on a free port and waits until it says it listens.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts `udpchat -s <port> <extra…>` on a free port, in a fresh working
    /// directory (so a relative `--data-dir` lands inside it, as does the
    /// default one), and waits until it says it listens.
    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_in(None, extra)
    }

    /// [`Server::start_with`] in the network namespace `netns` (if given).
    pub fn start_in(netns: Option<&str>, extra: &[&str]) -> Server {
        harness_start();
        let dir = fresh_dir();
        let mut extra: Vec<String> = extra.iter().map(|&a| a.to_owned()).collect();
        // No periodic summary unless a test asks: tests that compare the
        // log before and after an attack would see one fall in between.
        if !extra.iter().any(|a| a == "--summary-every") {
            extra.extend(["--summary-every".to_owned(), "never".to_owned()]);
        }
        let mut last_failure = String::new();
        for _ in 0..PORT_RETRIES {
            let port = free_udp_port();
            let (mut child, mut output) = spawn_server(&dir.0, port, &extra, netns);
            let deadline = Instant::now() + DEADLINE;
            let listening =
                output.pump_until(deadline, |o| says_listening(&o.stdout, port) || o.ended());
            if says_listening(&output.stdout, port) {
                config_homes()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(port, dir.0.join("config"));
                return Server {
                    child,
                    port,
                    output,
                    dir,
                    extra,
                    netns: netns.map(str::to_owned),
                };
            }
            if !listening {
                reap(&mut child);
                panic!(
                    "server on port {port} did not say it listens within {DEADLINE:?}\n\
                     stdout: {:#?}\nstderr: {:#?}",
                    output.stdout, output.stderr
                );
            }
            let status = wait_child(&mut child, deadline);
            if status.and_then(|s| s.code()) == Some(1)
                && output.stderr_text() == port_in_use_error(port)
            {
                last_failure = output.stderr_text();
                continue;
            }
            reap(&mut child);
            panic!(
                "server on port {port} ended without listening: {status:?}\n\
                 stdout: {:#?}\nstderr: {:#?}",
                output.stdout, output.stderr
            );
        }
        panic!("no free server port after {PORT_RETRIES} tries; last: {last_failure}");
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's working directory (fresh for each server, removed on
    /// drop); its default data directory lives inside.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Starts the server again on the same port, in the same working
    /// directory and with the same flags (so with the same data directory),
    /// and waits until it says it listens. The running process, if any, is
    /// killed with SIGKILL and reaped first; call [`Server::kill`] before to
    /// choose the moment of the crash. The output captured so far is
    /// replaced by the new process's.
    #[track_caller]
    pub fn restart(&mut self) {
        // Once reaped, the old process's socket is closed, so the port is
        // free for the new one.
        reap(&mut self.child);
        let netns = self.netns.as_deref();
        let (child, output) = spawn_server(&self.dir.0, self.port, &self.extra, netns);
        self.child = child;
        self.output = output;
        let port = self.port;
        let deadline = Instant::now() + DEADLINE;
        self.output
            .pump_until(deadline, |o| says_listening(&o.stdout, port) || o.ended());
        if !says_listening(&self.output.stdout, port) {
            let status = wait_child(&mut self.child, Instant::now());
            panic!(
                "restarted server on port {} did not say it listens within {DEADLINE:?} \
                 (exit: {status:?})\nstdout: {:#?}\nstderr: {:#?}",
                self.port, self.output.stdout, self.output.stderr
            );
        }
    }

    /// Sends SIGINT, as Ctrl+C in its terminal would.
    pub fn interrupt(&mut self) {
        send_signal(&self.child, libc::SIGINT);
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        send_signal(&self.child, libc::SIGKILL);
    }

    /// Waits up to `timeout` for the server to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, Instant::now() + timeout)
    }

    /// Everything the server printed on stdout so far.
    pub fn stdout(&mut self) -> Vec<String> {
        self.output.drain();
        self.output.stdout.clone()
    }

    /// Waits (up to [`DEADLINE`]) for a stdout line containing `text`;
    /// panics with the output if none comes.
    #[track_caller]
    pub fn expect_stdout(&mut self, text: &str) {
        let deadline = Instant::now() + DEADLINE;
        self.output.pump_until(deadline, |o| {
            o.stdout.iter().any(|l| l.contains(text)) || o.ended()
        });
        assert!(
            self.output.stdout.iter().any(|l| l.contains(text)),
            "the server never printed {text:?}\nstdout: {:#?}\nstderr: {:#?}",
            self.output.stdout,
            self.output.stderr
        );
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the server printed on stderr so far.
    pub fn stderr(&mut self) -> Vec<String> {
        self.output.drain();
        self.output.stderr.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The directory goes afterwards, with the field.
        reap(&mut self.child);
        config_homes()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.port);
    }
}

// ---------------------------------------------------------------------------
// A client.

/// A running `udpchat -c <name> 127.0.0.1 <server-port> <client-port>` in pipe
/// mode; killed on drop.
pub struct Client {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    port: u16,
    output: Captured,
    /// Index of the next stdout line `expect` will look at.
    cursor: usize,
    /// What the test typed, for failure messages.
    typed: Vec<String>,
}

impl Client {
    /// Starts a client on a free port and waits for its first stdout line
    /// (which stays unread, for the test to `expect`).
    pub fn start(name: &str, server_port: u16) -> Client {
        Client::start_with(name, server_port, &[])
    }

    /// [`Client::start`] with `extra` flags after the four positional
    /// arguments (`--heartbeat 0.2`…).
    pub fn start_with(name: &str, server_port: u16, extra: &[&str]) -> Client {
        Client::start_on(name, "127.0.0.1", server_port, extra)
    }

    /// [`Client::start_with`] given the server as `host` (an address of
    /// either family, or a host name).
    pub fn start_on(name: &str, host: &str, server_port: u16, extra: &[&str]) -> Client {
        Client::start_in(None, name, host, server_port, extra)
    }

    /// [`Client::start_on`] in the network namespace `netns` (if given).
    pub fn start_in(
        netns: Option<&str>,
        name: &str,
        host: &str,
        server_port: u16,
        extra: &[&str],
    ) -> Client {
        let mut last_failure = String::new();
        for _ in 0..PORT_RETRIES {
            let port = free_udp_port();
            let home = config_home(server_port);
            let mut child = binary(netns)
                .arg("-c")
                .arg(name)
                .arg(host)
                .arg(server_port.to_string())
                .arg(port.to_string())
                .args(extra)
                .env("XDG_CONFIG_HOME", &home)
                .env("HOME", home.join("home"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn udpchat client");
            let stdin = child.stdin.take();
            let output = Captured::take(&mut child);
            let mut client = Client {
                name: name.to_owned(),
                child,
                stdin,
                port,
                output,
                cursor: 0,
                typed: Vec::new(),
            };
            let deadline = Instant::now() + DEADLINE;
            let spoke = client
                .output
                .pump_until(deadline, |o| !o.stdout.is_empty() || o.ended());
            if !spoke {
                client.fail(&format!("printed nothing within {DEADLINE:?} of starting"));
            }
            if !client.output.stdout.is_empty() {
                return client;
            }
            let status = wait_child(&mut client.child, deadline);
            if status.and_then(|s| s.code()) == Some(1)
                && client.output.stderr_text() == port_in_use_error(port)
            {
                last_failure = client.output.stderr_text();
                continue;
            }
            // Let the test's own expectations report it, with the transcript.
            return client;
        }
        panic!("no free client port for {name} after {PORT_RETRIES} tries; last: {last_failure}");
    }

    /// Starts `names` one after another on `server`. Each newcomer must print
    /// the welcome and its table line, and every earlier client its
    /// table-updated line for the join, before the next one starts, so every
    /// client's count of table lines is deterministic.
    #[track_caller]
    pub fn join_all<const N: usize>(server: &Server, names: [&str; N]) -> [Client; N] {
        Client::join_all_with(server, names, &[])
    }

    /// [`Client::join_all`] with `extra` flags for every client.
    #[track_caller]
    pub fn join_all_with<const N: usize>(
        server: &Server,
        names: [&str; N],
        extra: &[&str],
    ) -> [Client; N] {
        let mut clients: Vec<Client> = Vec::with_capacity(N);
        for name in names {
            let mut newcomer = Client::start_with(name, server.port(), extra);
            newcomer.expect_lines(&[WELCOME, TABLE]);
            for earlier in &mut clients {
                earlier.expect(TABLE);
            }
            clients.push(newcomer);
        }
        let Ok(clients) = <[Client; N]>::try_from(clients) else {
            unreachable!("exactly N clients were pushed")
        };
        clients
    }

    /// The client's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client's own UDP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client's process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Types `line` (a newline is added) and flushes it.
    #[track_caller]
    pub fn send(&mut self, line: &str) {
        self.typed.push(line.to_owned());
        let result = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| stdin.flush()),
            None => {
                self.fail(&format!("send({line:?}) after close_stdin"));
            }
        };
        if let Err(e) = result {
            self.fail(&format!("writing {line:?} to stdin failed: {e}"));
        }
    }

    /// Waits for the next unread stdout line and asserts it matches `pattern`
    /// (exact text; `<ts>` matches a `YYYY-MM-DD HH:MM:SS` timestamp).
    #[track_caller]
    pub fn expect(&mut self, pattern: &str) {
        if !is_presence(pattern) {
            self.skip_presence(Instant::now() + DEADLINE);
        }
        let want = self.cursor + 1;
        let deadline = Instant::now() + DEADLINE;
        self.output
            .pump_until(deadline, |o| o.stdout.len() >= want || o.out_done);
        let Some(line) = self.output.stdout.get(self.cursor).cloned() else {
            let why = if self.output.out_done {
                "stdout closed"
            } else {
                "timed out"
            };
            self.fail(&format!(
                "{why} while waiting for line {} matching {pattern:?}",
                self.cursor + 1
            ));
        };
        if let Err(why) = line_matches(pattern, &line) {
            self.fail(&format!(
                "line {} is {line:?}, expected {pattern:?}: {why}",
                self.cursor + 1
            ));
        }
        self.cursor += 1;
    }

    /// [`Client::expect`], passing over table updates first: where the
    /// table changes on other servers (a cluster), their deltas arrive
    /// when the store's feed brings them, not in step with this client's
    /// own lines.
    #[track_caller]
    pub fn expect_amid_updates(&mut self, pattern: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.skip_presence(deadline);
            let want = self.cursor + 1;
            self.output
                .pump_until(deadline, |o| o.stdout.len() >= want || o.out_done);
            match self.output.stdout.get(self.cursor) {
                Some(line) if line == TABLE && pattern != TABLE => self.cursor += 1,
                _ => break,
            }
        }
        self.expect(pattern);
    }

    /// Types `list` until its header says `header` (the table converges
    /// as other servers' changes arrive), within [`DEADLINE`]: again after
    /// each `[Client table updated.]`.
    #[track_caller]
    pub fn await_list(&mut self, header: &str) {
        let deadline = Instant::now() + DEADLINE;
        let left = || deadline.saturating_duration_since(Instant::now());
        let mut last = String::new();
        while Instant::now() < deadline {
            self.send("list");
            while let Some(line) = self.next_line(left()) {
                if is_list_header(&line) || line == ">>> The client table is empty." {
                    last = line;
                    break;
                }
            }
            // Its rows, read too: the next expectation starts after them.
            let rows = last.split(" of ").nth(1).and_then(|r| r.split(' ').next());
            for _ in 0..rows.and_then(|r| r.parse::<usize>().ok()).unwrap_or(0) {
                self.next_line(left());
            }
            if last == header {
                return;
            }
            // Listed again once the table changes (a delta, or the sync
            // a heartbeat starts when it finds the table behind).
            match self.next_line(left()) {
                Some(line) if line == TABLE => {}
                Some(line) => self.fail(&format!(
                    "{line:?} while waiting for the list to say {header:?}"
                )),
                None => self.fail(&format!("the list never said {header:?}; last {last:?}")),
            }
        }
        self.fail(&format!("the list never said {header:?}; last {last:?}"));
    }

    /// The next unread stdout line, if one arrives within `within`; it
    /// counts as read. `None` when none arrived in time or stdout closed
    /// with every line read (see [`Client::stdout_closed`]). For tests that
    /// take whichever of several outcomes comes; [`Client::expect`] is for a
    /// line known in advance.
    pub fn next_line(&mut self, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        self.skip_presence(deadline);
        let want = self.cursor + 1;
        self.output
            .pump_until(deadline, |o| o.stdout.len() >= want || o.out_done);
        let line = self.output.stdout.get(self.cursor).cloned()?;
        self.cursor += 1;
        Some(line)
    }

    /// Passes over the presence lines (`[Bob is online.]`…) next in line:
    /// they follow table updates, and only the tests about them read them
    /// (in [`Client::transcript`], or by expecting one).
    fn skip_presence(&mut self, deadline: Instant) {
        loop {
            let want = self.cursor + 1;
            self.output
                .pump_until(deadline, |o| o.stdout.len() >= want || o.out_done);
            match self.output.stdout.get(self.cursor) {
                Some(line) if is_presence(line) => self.cursor += 1,
                _ => return,
            }
        }
    }

    /// True once the process closed its stdout (it ended) and every line it
    /// wrote has been read.
    pub fn stdout_closed(&mut self) -> bool {
        self.output.drain();
        self.output.out_done && self.output.stdout.len() <= self.cursor
    }

    /// [`Client::expect`] for each pattern in order.
    #[track_caller]
    pub fn expect_lines(&mut self, patterns: &[&str]) {
        for pattern in patterns {
            self.expect(pattern);
        }
    }

    /// Asserts that no stdout line beyond those already expected arrives
    /// within `for_`. Only for places where the spec says nothing must
    /// happen; keep `for_` short ([`QUIET`]).
    #[track_caller]
    pub fn expect_quiet(&mut self, for_: Duration) {
        let deadline = Instant::now() + for_;
        loop {
            // Presence lines are not output a test waits for (see
            // `skip_presence`); anything else ends the wait, and fails.
            self.skip_presence(Instant::now());
            let have = self.cursor;
            if self.output.stdout.len() > have {
                break;
            }
            let more = self
                .output
                .pump_until(deadline, |o| o.stdout.len() > have || o.out_done);
            if !more || self.output.stdout.len() <= have {
                break;
            }
        }
        if self.output.stdout.len() > self.cursor {
            self.fail(&format!(
                "expected no new output for {for_:?}, got line {}",
                self.cursor + 1
            ));
        }
    }

    /// Asserts that stdout was closed (the process ended) with every line
    /// already matched by an `expect`.
    #[track_caller]
    pub fn expect_end(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        if !self.output.pump_until(deadline, |o| o.out_done) {
            self.fail("stdout still open; the process should have ended");
        }
        self.skip_presence(Instant::now());
        if self.output.stdout.len() > self.cursor {
            self.fail(&format!(
                "unexpected output from line {} on",
                self.cursor + 1
            ));
        }
    }

    /// Closes stdin: the client sees end of input.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `timeout` for the client to exit; panics on timeout.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match wait_child(&mut self.child, Instant::now() + timeout) {
            Some(status) => status,
            None => self.fail(&format!("did not exit within {timeout:?}")),
        }
    }

    /// Sends a signal (SIGINT, SIGHUP, SIGKILL…) to the client.
    pub fn signal(&mut self, sig: libc::c_int) {
        send_signal(&self.child, sig);
    }

    /// Every stdout line so far.
    pub fn transcript(&mut self) -> Vec<String> {
        self.output.drain();
        self.output.stdout.clone()
    }

    /// Every stderr line so far.
    pub fn stderr(&mut self) -> Vec<String> {
        self.output.drain();
        self.output.stderr.clone()
    }

    /// Waits for the process to exit by itself with `code` (no input is
    /// closed), then asserts every stdout line was expected and nothing
    /// panicked.
    #[track_caller]
    pub fn expect_exit(&mut self, code: i32) {
        let status = self.wait_exit(DEADLINE);
        if status.code() != Some(code) {
            self.fail(&format!("exited with {status}, expected code {code}"));
        }
        self.expect_end();
        self.assert_no_panic();
    }

    /// The normal end of a test for a surviving client: close stdin, expect
    /// exit status 0, no unexpected stdout line and an empty stderr.
    #[track_caller]
    pub fn finish(&mut self) {
        self.finish_with(0);
    }

    /// [`Client::finish`] for a script that had a failing command: exit
    /// status 3.
    #[track_caller]
    pub fn finish_failed(&mut self) {
        self.finish_with(3);
    }

    #[track_caller]
    fn finish_with(&mut self, code: i32) {
        self.close_stdin();
        self.expect_exit(code);
        self.assert_stderr_empty();
    }

    /// Waits for stderr to close and asserts it stayed empty.
    #[track_caller]
    pub fn assert_stderr_empty(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        self.output.pump_until(deadline, |o| o.err_done);
        if !self.output.stderr.is_empty() {
            self.fail("stderr is not empty");
        }
    }

    #[track_caller]
    fn assert_no_panic(&mut self) {
        self.output.drain();
        let all = self.output.stdout.iter().chain(&self.output.stderr);
        if all.clone().any(|l| l.contains("panicked")) {
            self.fail("the process panicked");
        }
    }

    /// Panics with `what`, the whole transcript, what was typed, and stderr.
    #[track_caller]
    pub fn fail(&mut self, what: &str) -> ! {
        self.output.drain();
        let mut report = format!(
            "client {} (port {}): {what}\n--- stdout ---\n",
            self.name, self.port
        );
        for (i, line) in self.output.stdout.iter().enumerate() {
            let mark = if i == self.cursor { "=>" } else { "  " };
            report.push_str(&format!("{mark}{:3} {line:?}\n", i + 1));
        }
        if !self.output.out_done {
            report.push_str("  (stdout still open)\n");
        }
        report.push_str("--- typed ---\n");
        for line in &self.typed {
            report.push_str(&format!("     {line:?}\n"));
        }
        report.push_str("--- stderr ---\n");
        for line in &self.output.stderr {
            report.push_str(&format!("     {line:?}\n"));
        }
        panic!("{report}");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// One-shot runs, for the command-line checks.

/// What a finished one-shot run printed.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Run {
    /// True when neither stream mentions a panic or a backtrace.
    pub fn no_panic(&self) -> bool {
        self.stdout
            .iter()
            .chain(&self.stderr)
            .all(|l| !l.contains("panicked") && !l.contains("RUST_BACKTRACE"))
    }
}

/// Runs `udpchat <args>` with stdin null and waits (up to [`DEADLINE`]) for it
/// to exit and close its output; panics if it does not.
pub fn run(args: &[&str]) -> Run {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    run_os(&args)
}

/// [`run`] with arguments that need not be UTF-8.
pub fn run_os(args: &[&OsStr]) -> Run {
    let home = config_home(0);
    run_command(
        Command::new(BIN)
            .args(args)
            .env("XDG_CONFIG_HOME", &home)
            .env("HOME", home.join("home")),
        args,
    )
}

/// [`run`] with `dir` as the working directory, so that nothing the binary
/// writes by default lands in the crate.
pub fn run_in(dir: &Path, args: &[&str]) -> Run {
    let home = config_home(0);
    run_command(
        Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .env("XDG_CONFIG_HOME", &home)
            .env("HOME", home.join("home")),
        args,
    )
}

fn run_command(command: &mut Command, args: &[impl std::fmt::Debug]) -> Run {
    run_with_input(command, args, None, DEADLINE)
}

/// Client `name` of the server on `server_port` running `script` piped in
/// at once (written from another thread, as a shell pipe would, then
/// closed), within `deadline`; returns how it ended and everything it
/// printed.
pub fn run_script(name: &str, server_port: u16, script: String, deadline: Duration) -> Run {
    let home = config_home(server_port);
    let port = free_udp_port().to_string();
    let server = server_port.to_string();
    let args = ["-c", name, "127.0.0.1", &server, &port];
    run_with_input(
        Command::new(BIN)
            .args(args)
            .env("XDG_CONFIG_HOME", &home)
            .env("HOME", home.join("home")),
        &args,
        Some(script),
        deadline,
    )
}

fn run_with_input(
    command: &mut Command,
    args: &[impl std::fmt::Debug],
    input: Option<String>,
    within: Duration,
) -> Run {
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = command
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn udpchat");
    if let (Some(input), Some(mut pipe)) = (input, child.stdin.take()) {
        // The client reads as it can take commands: the writer waits.
        thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    let mut output = Captured::take(&mut child);
    let deadline = Instant::now() + within;
    let Some(status) = wait_child(&mut child, deadline) else {
        reap(&mut child);
        output.drain();
        panic!(
            "udpchat {args:?} did not exit within {within:?}\nstdout: {:#?}\nstderr: {:#?}",
            output.stdout, output.stderr
        );
    };
    if !output.pump_until(deadline, Captured::ended) {
        panic!("udpchat {args:?} exited but its output stayed open");
    }
    Run {
        status,
        stdout: output.stdout,
        stderr: output.stderr,
    }
}

/// `from` sends `text` to the online `to`, which shows it and acks.
#[track_caller]
pub fn chat(from: &mut Client, to: &mut Client, text: &str) {
    let to_name = to.name().to_owned();
    let from_name = from.name().to_owned();
    from.send(&format!("send {to_name} {text}"));
    to.expect(&format!(">>> {from_name}: {text}"));
    from.expect(&format!(">>> [Message received by {to_name}.]"));
}

/// `from` sends to `to_name`, whom its table already shows offline: the
/// message goes to the server, which stores it.
#[track_caller]
pub fn send_to_offline(from: &mut Client, to_name: &str, text: &str) {
    from.send(&format!("send {to_name} {text}"));
    from.expect_lines(&[
        &format!(">>> [{to_name} is offline, message sent to server.]"),
        SAVED,
    ]);
}
