//! Acked direct messages per second through two real clients on loopback:
//! a server and the clients Alice and Bob run as separate processes, Alice
//! gets `send Bob m<i>` lines piped into her stdin as fast as she finishes
//! them (see the window below), and the figure is how many `[Message
//! received by Bob.]` lines come back out of her stdout per second, timed
//! from the first line written to the last outcome read. It measures what a user of the binary
//! sees (console parsing, the poll loops, the sockets, the protocol), not the
//! state machines alone (that is `cargo bench --bench core`).
//!
//! It compares two binaries side by side in one run: the binary under test
//! and a baseline, which is any earlier build, e.g. main before the change.
//! Rounds alternate between them (baseline, new, baseline, new, …) so that
//! whatever else the machine is doing hits both alike; the bench prints every
//! round, the median of each binary and the ratio new/baseline. Build the
//! baseline in its own worktree (it has its own `target/`), then the binary
//! under test, then run the bench:
//!
//! ```sh
//! git worktree add /tmp/udpchat-base <baseline revision>
//! cargo build --release --manifest-path /tmp/udpchat-base/Cargo.toml
//! cargo build --release
//! UDPCHAT_BASELINE=/tmp/udpchat-base/target/release/udpchat cargo bench --bench loopback
//! ```
//!
//! (`git worktree remove /tmp/udpchat-base` cleans up afterwards.)
//!
//! Environment:
//! - `UDPCHAT_BASELINE`: the baseline binary; unset, only the binary under
//!   test is measured.
//! - `UDPCHAT_BIN`: the binary under test; by default the `udpchat` that
//!   cargo built for this bench (`target/release/udpchat`).
//! - `UDPCHAT_LOOPBACK_MESSAGES`: messages per round (default 2000).
//! - `UDPCHAT_LOOPBACK_ROUNDS`: rounds per binary (default 5).
//! - `UDPCHAT_LOOPBACK_WINDOW`: most messages written to Alice and not yet
//!   finished (acked, saved or failed), default 64; each outcome read lets
//!   one more line be written. 0 writes every line at once.
//! - `UDPCHAT_LOOPBACK_MODE=latency`: instead of throughput, what one user
//!   waits for, durably: Bob deregisters, then Alice sends him
//!   `UDPCHAT_LOOPBACK_MESSAGES` messages one at a time (each timed from
//!   the line written to `[Messages received by the server and saved]`
//!   read), then as many `send_all` (to `[Message received by Server.]`;
//!   Bob's copy is stored). Prints the median and p99 of each, per binary.
//!
//! Why a window: the client sends a direct message as soon as it reads the
//! line, with no limit on how many await their ack. With every line written
//! at once, main (4950eb4) loses about a third of 2000 messages on loopback
//! (a burst that large overflows the receiving socket's buffer), each loss
//! costs the 500 ms ack timeout, so a round takes a multiple of 500 ms and
//! the figure measures overload, not throughput; at 5000 the fallbacks swamp
//! the server and Alice exits with `[Server not responding]`. A window of 64
//! (a paste of a few dozen lines) loses nothing and keeps the pipeline full.
//! Absolute figures swing widely between runs on a busy 2-core machine; the
//! ratio of one run is what to compare, and more messages
//! (`UDPCHAT_LOOPBACK_MESSAGES=20000`) steady it.
//!
//! Each round has fresh ports, a fresh temporary directory (server data,
//! and `XDG_CONFIG_HOME` and `HOME` for every process, so that a version
//! that creates key files keeps them there) and fresh processes. A message
//! that ends otherwise than acked (`[No ACK from Bob…`, `[Error: …`, saved by
//! the server) is counted and printed: it is loss, and the figure counts only
//! acked messages. Every wait has a deadline; on a timeout or a child that
//! dies, the bench says which and stops with exit status 1, never hangs.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest wait for any one step of a round (the server's listening line, a
/// registration); far above what a healthy run needs, even on a loaded
/// 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// Added to [`DEADLINE`] per message for the send phase, so that a large
/// `UDPCHAT_LOOPBACK_MESSAGES` with some loss (each lost message costs the
/// 500 ms ack timeout and a fallback) still finishes, while a hang is caught.
const PER_MESSAGE: Duration = Duration::from_millis(10);

/// How long a child may take to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

/// Lines kept from each child's stdout and stderr, to say what it was doing
/// when a wait failed.
const KEPT_LINES: usize = 8;

const WELCOME: &str = ">>> [Welcome, You are registered.]";
const TABLE: &str = ">>> [Client table updated.]";
const ACKED: &str = ">>> [Message received by Bob.]";
const NO_ACK: &str = ">>> [No ACK from Bob";
const SAVED: &str = ">>> [Messages received by the server and saved]";
const ERROR: &str = ">>> [Error:";
const LISTENING: &str = "udpchat server listening";
const BYE: &str = ">>> [You are Offline. Bye.]";
const CHANNEL_ACKED: &str = ">>> [Message received by Server.]";

fn main() {
    if let Err(e) = run() {
        eprintln!("loopback bench: {e}");
        std::process::exit(1);
    }
}

/// What to measure, from the environment.
struct Config {
    /// (label, binary), in the order the rounds take them.
    binaries: Vec<(&'static str, PathBuf)>,
    messages: usize,
    /// Most messages written and not yet finished; 0 for no limit.
    window: usize,
    rounds: usize,
    /// Latency of single durable saves and channel messages, not
    /// throughput.
    latency: bool,
}

/// One round's outcome as Alice reported it.
struct RoundResult {
    acked: usize,
    no_ack: usize,
    errors: usize,
    saved: usize,
    elapsed: Duration,
}

impl RoundResult {
    fn rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64()
    }
}

fn run() -> Result<(), String> {
    let config = config()?;
    if config.latency {
        return latency(&config);
    }
    println!(
        "loopback: {} messages per round, window {}, {} rounds per binary",
        config.messages,
        match config.window {
            0 => "unlimited".to_string(),
            w => w.to_string(),
        },
        config.rounds
    );
    for (label, bin) in &config.binaries {
        println!("  {label}: {}", bin.display());
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); config.binaries.len()];
    for round in 1..=config.rounds {
        for ((label, bin), rates) in config.binaries.iter().zip(&mut rates) {
            let result = measure(bin, config.messages, config.window)
                .map_err(|e| format!("{label} round {round}: {e}"))?;
            let mut line = format!(
                "loopback direct messages, acked: {label} round {round}: {} in {:.3} s = {:.0} msgs/s",
                result.acked,
                result.elapsed.as_secs_f64(),
                result.rate()
            );
            if result.no_ack + result.errors + result.saved > 0 {
                line.push_str(&format!(
                    " (loss: {} no-ack, {} errors, {} saved by the server)",
                    result.no_ack, result.errors, result.saved
                ));
            }
            println!("{line}");
            rates.push(result.rate());
        }
    }
    let mut medians = Vec::new();
    for ((label, _), rates) in config.binaries.iter().zip(&mut rates) {
        rates.sort_by(f64::total_cmp);
        let median = median(rates);
        println!(
            "{label}: median {median:.0} msgs/s (min {:.0}, max {:.0}, {} rounds)",
            rates[0],
            rates[rates.len() - 1],
            rates.len()
        );
        medians.push(median);
    }
    if let [baseline, new] = medians[..] {
        println!("ratio new/baseline = {:.2}", new / baseline);
    }
    Ok(())
}

/// Reads the environment; a bad value is an error that names the variable.
fn config() -> Result<Config, String> {
    let new = match std::env::var_os("UDPCHAT_BIN") {
        Some(path) => PathBuf::from(path),
        // Under `cargo bench` cargo names the binary it built for us;
        // compiled any other way, fall back to the release build.
        None => PathBuf::from(option_env!("CARGO_BIN_EXE_udpchat").unwrap_or(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/release/udpchat"
        ))),
    };
    let mut binaries = Vec::new();
    if let Some(base) = std::env::var_os("UDPCHAT_BASELINE") {
        binaries.push(("baseline", PathBuf::from(base)));
    }
    binaries.push(("new", new));
    for (label, bin) in &binaries {
        if !bin.is_file() {
            return Err(format!(
                "the {label} binary {} does not exist; build it with `cargo build --release` \
                 (see the top of benches/loopback.rs)",
                bin.display()
            ));
        }
    }
    Ok(Config {
        binaries,
        messages: positive("UDPCHAT_LOOPBACK_MESSAGES", 2000)?,
        window: count("UDPCHAT_LOOPBACK_WINDOW", 64)?,
        rounds: positive("UDPCHAT_LOOPBACK_ROUNDS", 5)?,
        latency: match std::env::var("UDPCHAT_LOOPBACK_MODE").as_deref() {
            Err(_) | Ok("throughput") => false,
            Ok("latency") => true,
            Ok(other) => {
                return Err(format!(
                    "UDPCHAT_LOOPBACK_MODE must be throughput or latency, got `{other}`"
                ));
            }
        },
    })
}

/// The positive integer in env `name`, or `default` when it is unset.
fn positive(name: &str, default: usize) -> Result<usize, String> {
    match count(name, default)? {
        0 => Err(format!("{name} must be a positive integer, got 0")),
        n => Ok(n),
    }
}

/// The non-negative integer in env `name`, or `default` when it is unset.
fn count(name: &str, default: usize) -> Result<usize, String> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(std::env::VarError::NotUnicode(raw)) => {
            Err(format!("{name} must be an integer, got {raw:?}"))
        }
        Ok(text) => text
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("{name} must be an integer, got `{text}`")),
    }
}

/// The median of sorted, non-empty `values`.
fn median(values: &[f64]) -> f64 {
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The latency mode: rounds alternate between the binaries as for
/// throughput; each round's samples join its binary's.
fn latency(config: &Config) -> Result<(), String> {
    println!(
        "loopback latency: {} saves and {} channel messages per round, one at a time, {} rounds per binary",
        config.messages, config.messages, config.rounds
    );
    let mut samples: Vec<(Vec<Duration>, Vec<Duration>)> =
        vec![(Vec::new(), Vec::new()); config.binaries.len()];
    for round in 1..=config.rounds {
        for ((label, bin), (saves, channel)) in config.binaries.iter().zip(&mut samples) {
            let (s, c) = measure_latency(bin, config.messages)
                .map_err(|e| format!("{label} round {round}: {e}"))?;
            saves.extend(s);
            channel.extend(c);
        }
    }
    for ((label, _), (saves, channel)) in config.binaries.iter().zip(&mut samples) {
        for (what, v) in [
            ("offline save to \"saved\"", saves),
            ("send_all to the server's ack", channel),
        ] {
            v.sort_unstable();
            let at = |q: f64| {
                let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
                v[i].as_secs_f64() * 1e3
            };
            println!(
                "{label}: {what}: median {:.3} ms, p99 {:.3} ms ({} samples)",
                at(0.5),
                at(0.99),
                v.len()
            );
        }
    }
    Ok(())
}

/// One latency round: server, Bob and Alice of `bin`; Bob deregisters; then
/// Alice's `messages` offline saves and `messages` channel messages, each
/// timed from its line written to its outcome read.
fn measure_latency(bin: &Path, messages: usize) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let room = (2 * messages + 10).to_string();
    // Kept whole: its fields drop processes first, the directory last.
    let mut trio = Trio::start(bin, &["--mailbox-messages".into(), room])?;
    let Trio { alice, bob, .. } = &mut trio;
    write_line(bob, "dereg Bob")?;
    bob.wait_for(BYE, |line| line == BYE)?;
    alice.wait_for("the table line that shows Bob offline", |line| {
        line == TABLE
    })?;

    let timed = |alice: &mut Proc, line: &str, outcome: &str| -> Result<Duration, String> {
        let start = Instant::now();
        write_line(alice, line)?;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = alice.next_line(deadline, outcome)?;
            if got == outcome {
                return Ok(start.elapsed());
            }
            if got.starts_with(ERROR) {
                return Err(format!("`{line}` ended in `{got}`"));
            }
        }
    };
    let mut saves = Vec::with_capacity(messages);
    for i in 0..messages {
        saves.push(timed(alice, &format!("send Bob s{i}"), SAVED)?);
    }
    let mut channel = Vec::with_capacity(messages);
    for i in 0..messages {
        channel.push(timed(alice, &format!("send_all c{i}"), CHANNEL_ACKED)?);
    }
    trio.stop();
    Ok((saves, channel))
}

/// Writes one line to the child's stdin and flushes it.
fn write_line(proc: &mut Proc, line: &str) -> Result<(), String> {
    let stdin = proc
        .stdin
        .as_mut()
        .ok_or("stdin is not a pipe (a bug in the bench)")?;
    stdin
        .write_all(format!("{line}\n").as_bytes())
        .and_then(|()| stdin.flush())
        .map_err(|e| format!("writing to {}'s stdin: {e}", proc.name))
}

/// One round: a server and two clients of `bin`, `messages` direct messages
/// from Alice to Bob, timed from the first byte written to the last outcome
/// read. Every process is stopped and the directory removed on every path,
/// errors included (by [`Trio`]'s drops).
fn measure(bin: &Path, messages: usize, window: usize) -> Result<RoundResult, String> {
    let mut trio = Trio::start(bin, &[])?;
    let result = send_all(&mut trio.alice, messages, window)?;
    trio.stop();
    Ok(result)
}

/// A round's processes: a server and the clients Bob and Alice, each
/// registered with a table holding both, in a fresh directory. Fields drop
/// in this order, so on any error every process is stopped before the
/// directory is removed.
struct Trio {
    alice: Proc,
    bob: Proc,
    server: Proc,
    _dir: TempDir,
}

impl Trio {
    /// Starts the three of `bin` on fresh ports, the server with `extra`
    /// arguments, and waits until both clients know each other.
    fn start(bin: &Path, extra: &[String]) -> Result<Trio, String> {
        let dir = TempDir::create()?;
        let [server_port, bob_port, alice_port] = free_ports()?;
        let data = dir.path().join("data");
        let mut args = vec![
            "-s".into(),
            server_port.to_string(),
            "--data-dir".into(),
            path_arg(&data)?,
        ];
        args.extend_from_slice(extra);
        let mut server = Proc::spawn(bin, "server", &args, dir.path(), false)?;
        // A later server stamps its log lines (RFC 3339 first): either way.
        let listening = |line: &str| {
            let unstamped = line.split_once(' ').map_or(line, |(_, rest)| rest);
            line.starts_with(LISTENING) || unstamped.starts_with(LISTENING)
        };
        server.wait_for(LISTENING, listening)?;

        // Bob first, so that Alice's first table already holds him; then
        // Bob's second table line says he knows Alice too, and both
        // directions are ready before the clock starts.
        let client_args = |name: &str, port: u16| -> Vec<String> {
            vec![
                "-c".into(),
                name.into(),
                "127.0.0.1".into(),
                server_port.to_string(),
                port.to_string(),
            ]
        };
        let mut bob = Proc::spawn(bin, "Bob", &client_args("Bob", bob_port), dir.path(), true)?;
        bob.wait_for(WELCOME, |line| line == WELCOME)?;
        bob.wait_for(TABLE, |line| line == TABLE)?;
        let mut alice = Proc::spawn(
            bin,
            "Alice",
            &client_args("Alice", alice_port),
            dir.path(),
            true,
        )?;
        alice.wait_for(WELCOME, |line| line == WELCOME)?;
        alice.wait_for(TABLE, |line| line == TABLE)?;
        bob.wait_for("the table line that adds Alice", |line| line == TABLE)?;
        Ok(Trio {
            alice,
            bob,
            server,
            _dir: dir,
        })
    }

    /// Closes the clients' stdin first, so they see the end of their
    /// input, then tells each process to stop.
    fn stop(&mut self) {
        self.alice.stdin.take();
        self.bob.stdin.take();
        self.alice.stop();
        self.bob.stop();
        self.server.stop();
    }
}

/// Writes `messages` send commands into Alice's stdin from a thread (so the
/// pipes can never deadlock), at most `window` (0: all) ahead of the
/// outcomes, and reads her stdout until every message has an outcome.
fn send_all(alice: &mut Proc, messages: usize, window: usize) -> Result<RoundResult, String> {
    let mut stdin = alice
        .stdin
        .take()
        .ok_or("Alice's stdin is not a pipe (a bug in the bench)")?;
    let deadline =
        Instant::now() + DEADLINE + PER_MESSAGE * u32::try_from(messages).unwrap_or(u32::MAX);
    let window = if window == 0 {
        messages
    } else {
        window.min(messages)
    };
    // One credit per outcome read: the writer may then write one more line.
    let (credits, credit_rx) = mpsc::channel::<usize>();

    let start = Instant::now();
    // The writer hands stdin back, so that it stays open until every outcome
    // is in: at end of input a client may exit.
    let writer = thread::spawn(move || {
        let mut next = 1;
        let mut allowed = window;
        let mut lines = String::new();
        loop {
            lines.clear();
            while next <= allowed.min(messages) {
                let _ = writeln!(lines, "send Bob m{next}");
                next += 1;
            }
            stdin.write_all(lines.as_bytes())?;
            stdin.flush()?;
            if next > messages {
                break;
            }
            // The reader gave up when the channel closes; stop writing.
            let Ok(more) = credit_rx.recv() else { break };
            allowed += more + credit_rx.try_iter().sum::<usize>();
        }
        Ok::<ChildStdin, std::io::Error>(stdin)
    });
    let mut result = RoundResult {
        acked: 0,
        no_ack: 0,
        errors: 0,
        saved: 0,
        elapsed: Duration::ZERO,
    };
    // The final outcomes of a send: acked, saved by the server, or an error.
    // `[No ACK …]` is only a step on the way to one of them.
    while result.acked + result.errors + result.saved < messages {
        let done = result.acked + result.errors + result.saved;
        let line = alice.next_line(
            deadline,
            &format!("the outcome of message {} of {messages}", done + 1),
        )?;
        let finished = if line == ACKED {
            result.acked += 1;
            true
        } else if line.starts_with(ERROR) {
            result.errors += 1;
            true
        } else if line == SAVED {
            result.saved += 1;
            true
        } else {
            if line.starts_with(NO_ACK) {
                result.no_ack += 1;
            }
            false
        };
        if finished {
            // Fails only if the writer is gone, which the join below reports.
            let _ = credits.send(1);
        }
    }
    result.elapsed = start.elapsed();

    // Alice has answered every line, so she has read them all and the writer
    // is done or about to be; still, wait for it with a deadline.
    while !writer.is_finished() {
        if Instant::now() >= deadline {
            return Err("timed out waiting for the writer of Alice's stdin".into());
        }
        thread::sleep(Duration::from_millis(1));
    }
    match writer.join() {
        Ok(Ok(stdin)) => alice.stdin = Some(stdin),
        Ok(Err(e)) => return Err(format!("writing to Alice's stdin: {e}")),
        Err(_) => return Err("the writer of Alice's stdin panicked".into()),
    }
    Ok(result)
}

/// Three distinct UDP ports that were free a moment ago: bound together on
/// 127.0.0.1:0 (so the kernel cannot hand out one twice) and released.
/// Ephemeral ports are far above 1024, the lowest the binary accepts.
fn free_ports() -> Result<[u16; 3], String> {
    let bind = || {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| format!("binding a free UDP port on 127.0.0.1: {e}"))
    };
    let sockets = [bind()?, bind()?, bind()?];
    let mut ports = [0; 3];
    for (port, socket) in ports.iter_mut().zip(&sockets) {
        *port = socket
            .local_addr()
            .map_err(|e| format!("local address of a bound socket: {e}"))?
            .port();
        if *port < 1024 {
            return Err(format!("the kernel handed out port {port}, below 1024"));
        }
    }
    Ok(ports)
}

/// A path as a command-line argument; the bench's own paths are UTF-8
/// unless the temp dir is not.
fn path_arg(path: &Path) -> Result<String, String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("the path {} is not UTF-8", path.display()))
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<TempDir, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path =
            std::env::temp_dir().join(format!("udpchat-loopback-{}-{nanos}", std::process::id()));
        // `create_dir`, not `create_dir_all`: an existing directory of that
        // name is someone else's.
        std::fs::create_dir(&path)
            .map_err(|e| format!("creating the temp dir {}: {e}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("loopback bench: could not remove {}: {e}", self.0.display());
        }
    }
}

/// A line a child wrote, from one of the two reader threads.
enum Output {
    Stdout(String),
    Stderr(String),
}

/// A running child with one reader thread per output stream feeding a
/// channel, so neither pipe ever fills however long the bench looks away.
struct Proc {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    output: Receiver<Output>,
    /// The last stdout and stderr lines, for error messages.
    recent: VecDeque<String>,
    stderr: VecDeque<String>,
    stopped: bool,
}

impl Proc {
    /// Starts `bin args` with its config and home inside `dir`; stdin is a
    /// pipe (kept open until [`Proc::stop`]) when `piped_stdin`, else empty.
    fn spawn(
        bin: &Path,
        name: &'static str,
        args: &[String],
        dir: &Path,
        piped_stdin: bool,
    ) -> Result<Proc, String> {
        let config = dir.join(format!("config-{name}"));
        let home = dir.join("home");
        for d in [&config, &home] {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let mut child = Command::new(bin)
            .args(args)
            .env("XDG_CONFIG_HOME", &config)
            .env("HOME", &home)
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {name} ({}): {e}", bin.display()))?;
        let (tx, output) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            spawn_reader(out, tx.clone(), Output::Stdout);
        }
        if let Some(err) = child.stderr.take() {
            spawn_reader(err, tx, Output::Stderr);
        }
        Ok(Proc {
            name,
            stdin: child.stdin.take(),
            child,
            output,
            recent: VecDeque::new(),
            stderr: VecDeque::new(),
            stopped: false,
        })
    }

    /// The next stdout line, or an error that says what was awaited when
    /// `deadline` passed or the child closed its output.
    fn next_line(&mut self, deadline: Instant, awaited: &str) -> Result<String, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(Output::Stdout(line)) => {
                    keep(&mut self.recent, &line);
                    return Ok(line);
                }
                Ok(Output::Stderr(line)) => keep(&mut self.stderr, &line),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!("timed out waiting for {awaited}")));
                }
                // Both reader threads ended: the child closed its output.
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.failure(&format!("exited while we waited for {awaited}")));
                }
            }
        }
    }

    /// Reads stdout until a line satisfies `wanted`, within [`DEADLINE`].
    fn wait_for(&mut self, awaited: &str, wanted: impl Fn(&str) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        let awaited = format!("`{awaited}`");
        while !wanted(&self.next_line(deadline, &awaited)?) {}
        Ok(())
    }

    /// `what` went wrong with this child, with its exit status and last
    /// lines.
    fn failure(&mut self, what: &str) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!(" ({status})"),
            _ => String::new(),
        };
        let mut text = format!("{}{status}: {what}", self.name);
        for (label, lines) in [("stdout", &self.recent), ("stderr", &self.stderr)] {
            if !lines.is_empty() {
                text.push_str(&format!("\n  last lines on {label}:"));
                for line in lines {
                    text.push_str(&format!("\n    {line}"));
                }
            }
        }
        text
    }

    /// Closes stdin, sends SIGTERM, and kills the child if it has not exited
    /// within [`GRACE`]; reaps it in every case.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.stdin.take();
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // std can only SIGKILL; SIGTERM lets the binary leave as on Ctrl+C.
        // The child is not reaped yet, so its pid cannot have been reused.
        let termed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if termed {
            let deadline = Instant::now() + GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Appends `line` to `lines`, keeping only the last [`KEPT_LINES`].
fn keep(lines: &mut VecDeque<String>, line: &str) {
    if lines.len() == KEPT_LINES {
        lines.pop_front();
    }
    lines.push_back(line.to_owned());
}

/// Forwards every line of `pipe` to `tx` until the pipe closes or the
/// receiver is gone.
fn spawn_reader<R: Read + Send + 'static>(pipe: R, tx: Sender<Output>, wrap: fn(String) -> Output) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    // Lossy, so that odd bytes show up in an error message
                    // instead of ending the reader.
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    if tx.send(wrap(line)).is_err() {
                        return;
                    }
                }
            }
        }
    });
}
