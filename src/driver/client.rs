//! The client's poll loop: the socket, stdin (a terminal with a line editor,
//! or a pipe read line by line) and signals.

use std::io::{self, IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};

use std::path::PathBuf;

use super::keys::{self, KnownServers};
use signal_hook::consts::SIGWINCH;

use super::term::{self, EditorEvent, LineEditor, RawMode};
use super::{
    Fatal, RECV_BUF, SIGNALS, bind, io_fatal, listen, local_time, on_wire, random_seed, read_burst,
    wait,
};
use crate::console;
use crate::crypto::Keypair;
use crate::wire::Name;
use crate::{Client, ClientConfig, Event};

const STDIN: Token = Token(2);
const STDIN_FD: RawFd = 0;
const STDOUT_FD: RawFd = 1;
/// A piped line longer than this is refused whole (no command is longer:
/// a 1000-byte message plus the command and a 32-byte name).
const MAX_LINE: usize = 4096;

/// What the command line chose for a client.
#[derive(Debug, Clone)]
pub struct Options {
    /// The name to register.
    pub name: Name,
    /// The server's addresses, as the resolver gave them (a literal is
    /// one): tried in turn until one answers.
    pub servers: Vec<SocketAddr>,
    /// The server as typed (`host:port`): its line in `known_servers`.
    pub server_text: String,
    /// `--server`: other servers of the same cluster (the same key).
    pub others: Vec<SocketAddr>,
    /// The local port.
    pub port: u16,
    /// The heartbeat interval.
    pub heartbeat: Duration,
    /// `--key FILE`, or the default key file of the name.
    pub key: Option<PathBuf>,
    /// `--timestamps`: live lines start with the local time.
    pub timestamps: bool,
}

/// Runs a client until it exits. Returns the exit status.
pub fn run(options: Options) -> Result<i32, Fatal> {
    let Options {
        name,
        servers,
        server_text,
        others,
        port,
        heartbeat,
        key,
        timestamps,
    } = options;
    let Some((&server, alternates)) = servers.split_first() else {
        return Err(Fatal(format!("error: {server_text}: no address")));
    };
    // The port first: a client that cannot run must not create a key.
    // Dual-stack, so that peers of either family can be reached (a
    // dual-stack server's table holds both).
    let socket = bind(SocketAddr::from(([0u16; 8], port)))?;
    let key_path = match key {
        Some(path) => path,
        None => keys::default_key_path(&name)?,
    };
    let secret = random_seed()?;
    let (key, _) = keys::load_or_create(&key_path, || Keypair::from_secret(secret))?;
    let known = KnownServers::beside(&key_path);
    let pinned = known.lookup(&server_text)?;
    let (socket, mut poll, mut signals) = listen(socket)?;
    // A resized terminal: the line editor lays its rows out again.
    signals.add_signal(SIGWINCH).map_err(io_fatal)?;
    let v6 = socket.local_addr().map_err(io_fatal)?.is_ipv6();

    let mut stdio = Stdio::new()?;
    // A regular file or /dev/null cannot be polled (epoll says EPERM): it
    // is always readable, so it is read on every turn instead.
    let stdin_polled = poll
        .registry()
        .register(&mut SourceFd(&STDIN_FD), STDIN, Interest::READABLE)
        .is_ok();

    let now = Instant::now();
    let mut config = ClientConfig::new(name, server, random_seed()?, key, pinned.map(|p| p.0));
    config.heartbeat = heartbeat;
    config.alternates = alternates.to_vec();
    // The cluster's other servers: tried in turn, and turned to when the
    // one in use goes silent. They share its key, pinned under the first.
    config.failover = !others.is_empty();
    for other in others {
        if other != server && !config.alternates.contains(&other) {
            config.alternates.push(other);
        }
    }
    let mut client = Client::new(config, now);
    let mut events = Events::with_capacity(16);
    let mut buf = [0u8; RECV_BUF];
    let mut backlog = false;
    // Lines read but not yet run, each run once the client can take it and
    // what came before it is shown. A script's exit status says whether
    // every command succeeded.
    let mut lines = console::Console::new(!stdio.is_terminal());
    let mut failed = false;
    // epoll reports input already waiting when stdin is registered; an
    // unpolled stdin (a regular file) is read on every turn.
    let mut stdin_ready = !stdin_polled;
    loop {
        // Show first, then send: the acks among the datagrams promise the
        // server that these lines are on the screen.
        let mut exit = None;
        while let Some(event) = client.poll_event() {
            if let Some(code) = console::exit_status(&event) {
                exit = Some(code);
                break;
            }
            match event {
                // First contact: remember the key, as ssh does.
                Event::ServerKeyLearned(key) => known.remember(&server_text, &key)?,
                Event::ServerKeyChanged {
                    pinned: old,
                    presented,
                } => {
                    let line = pinned.map_or(0, |p| p.1);
                    stdio.show(&format!(
                        ">>> [Error: the server at {server_text} presented key {}, not the key {} \
                         remembered in {} (line {line}); if its key changed on purpose, delete \
                         that line and start again.]",
                        presented.fingerprint(),
                        old.fingerprint(),
                        known.path().display()
                    ));
                }
                other => {
                    failed |= other.is_failure();
                    // Tab completes names from the table: taken afresh
                    // when a Tab comes after a change.
                    stdio.names_stale |= other == Event::TableUpdated;
                    if let Some(line) = console::render(&other, local_time) {
                        stdio.show(&stamped(line, &other, timestamps));
                    }
                }
            }
        }
        // Then the datagrams those lines released (the last acks before
        // an exit too).
        while let Some(t) = client.poll_transmit() {
            // A full send buffer is one more loss; retransmissions cover it.
            let _ = socket.send_to(&t.payload, on_wire(t.to, v6));
        }
        let done = stdio.eof && lines.is_empty() && client.is_idle();
        if let Some(code) = exit.or(done.then_some(0)) {
            // A script one of whose commands failed says so, whether it
            // ended with its input or with `quit`.
            failed |= stdio.skipped;
            let failed = failed && !stdio.is_terminal();
            return Ok(if code == 0 && failed {
                SCRIPT_FAILED
            } else {
                code
            });
        }

        if let Some(reply) = lines.run_next(&mut client, Instant::now()) {
            failed |= reply.failed;
            stdio.show_all(&reply_lines(reply, timestamps));
            continue;
        }

        // A script is not read while lines of it wait (the writer waits on
        // the full pipe); a terminal always is (Ctrl+C comes that way).
        let readable = stdio.is_terminal() || lines.is_empty();
        let read_more = stdin_ready && !stdio.eof && readable;
        let busy = backlog || (read_more && !stdin_polled);
        wait(&mut poll, &mut events, client.poll_timeout(), busy)?;
        for event in events.iter() {
            match event.token() {
                // Ctrl+C (outside raw mode), a closed terminal, kill: a silent
                // leave — the server is not told.
                SIGNALS => {
                    for sig in signals.pending() {
                        if sig == SIGWINCH {
                            stdio.resized();
                        } else {
                            return Ok(128 + sig);
                        }
                    }
                }
                STDIN => stdin_ready = true,
                _ => {}
            }
        }

        let now = Instant::now();
        backlog = read_burst(&socket, &mut buf, |from, data| {
            client.handle_datagram(now, from, data)
        });
        if stdin_ready && !stdio.eof && readable {
            stdin_ready = !stdin_polled;
            for input in stdio.read(&client)? {
                match input {
                    Input::Line(line) => {
                        if let Some(refused) = lines.push(&client, line) {
                            stdio.show_all(&reply_lines(refused, timestamps));
                        }
                    }
                    Input::Interrupt => return Ok(130),
                }
            }
        }
        client.handle_timeout(now);
    }
}

/// `line` as shown: with `--timestamps`, a line of what happens now (not
/// a stored message, which has its own time) gets the local time after its
/// `>>> `.
fn stamped(line: String, event: &Event, timestamps: bool) -> String {
    if matches!(event, Event::Stored { .. }) {
        return line;
    }
    stamp(line, timestamps)
}

/// A command's reply as shown: its error line is a line of what happens
/// now (stamped), `list` and `help` output is not.
fn reply_lines(reply: console::Reply, timestamps: bool) -> Vec<String> {
    if !reply.failed {
        return reply.lines;
    }
    let stamp = |line| stamp(line, timestamps);
    reply.lines.into_iter().map(stamp).collect()
}

/// With `--timestamps`, the local time of day after `line`'s `>>> `.
fn stamp(line: String, timestamps: bool) -> String {
    if !timestamps {
        return line;
    }
    let time = local_time(super::unix_now());
    // `YYYY-MM-DD HH:MM:SS`: the time of day is enough on a live line.
    let clock = time.get(11..).unwrap_or(&time);
    match line.strip_prefix(">>> ") {
        Some(rest) => format!(">>> {clock} {rest}"),
        None => line,
    }
}

/// The exit status of a script (stdin not a terminal) one of whose commands
/// failed (`[Error: …]`, a full mailbox, a server that did not answer a
/// channel message); every other line of it was still carried out.
pub const SCRIPT_FAILED: i32 = 3;

enum Input {
    Line(String),
    /// Ctrl+C typed in raw mode.
    Interrupt,
}

/// Stdin and stdout: a terminal with a prompt and line editor, or plain
/// lines. Restores the terminal when dropped (every return path of `run`).
struct Stdio {
    editor: Option<(LineEditor, RawMode)>,
    nonblocking: Option<NonBlocking>,
    /// Read buffer: large, so that one read takes a whole paste on a
    /// terminal, where only one read per readiness is safe.
    buf: Vec<u8>,
    pending: Vec<u8>,
    /// Discarding the rest of an over-long piped line.
    skipping: bool,
    /// An over-long line was ignored (a command of the script not run).
    skipped: bool,
    eof: bool,
    /// The table changed since Tab last took its names.
    names_stale: bool,
}

impl Stdio {
    fn new() -> Result<Stdio, Fatal> {
        let stdin = io::stdin();
        let editor = if stdin.is_terminal() && io::stdout().is_terminal() {
            let raw = RawMode::enable(STDIN_FD).map_err(io_fatal)?;
            let mut editor = LineEditor::new(">>> ");
            let mut out = Vec::new();
            if let Some(columns) = term::width(STDOUT_FD) {
                editor.set_width(columns, &mut out);
            }
            editor.redraw(&mut out);
            write_all(&out);
            Some((editor, raw))
        } else {
            None
        };
        // Never on a terminal: its open file is shared with stdout, whose
        // writes would then fail with EAGAIN when the terminal is slow.
        let nonblocking = if stdin.is_terminal() {
            None
        } else {
            NonBlocking::enable(STDIN_FD)
        };
        Ok(Stdio {
            editor,
            nonblocking,
            buf: vec![0; 1 << 16],
            pending: Vec::new(),
            skipping: false,
            skipped: false,
            eof: false,
            names_stale: true,
        })
    }

    /// The terminal changed size: the edit area is drawn for its width.
    fn resized(&mut self) {
        if let (Some((editor, _)), Some(columns)) = (&mut self.editor, term::width(STDOUT_FD)) {
            let mut out = Vec::new();
            editor.set_width(columns, &mut out);
            write_all(&out);
        }
    }

    /// A person at a terminal, not a script.
    fn is_terminal(&self) -> bool {
        self.editor.is_some()
    }

    /// Shows one output line (above the prompt on a terminal).
    fn show_all(&mut self, lines: &[String]) {
        for line in lines {
            self.show(line);
        }
    }

    fn show(&mut self, line: &str) {
        match &mut self.editor {
            Some((editor, _)) => {
                let mut out = Vec::new();
                editor.print_above(line, &mut out);
                write_all(&out);
            }
            None => {
                let mut text = line.as_bytes().to_vec();
                text.push(b'\n');
                write_all(&text);
            }
        }
    }

    /// Reads what stdin has now (`client`: where Tab finds names).
    fn read(&mut self, client: &Client) -> Result<Vec<Input>, Fatal> {
        let mut inputs = Vec::new();
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.read_into(&mut buf, &mut inputs, client);
        self.buf = buf;
        result.map(|()| inputs)
    }

    fn read_into(
        &mut self,
        buf: &mut [u8],
        inputs: &mut Vec<Input>,
        client: &Client,
    ) -> Result<(), Fatal> {
        loop {
            let n = match io::stdin().lock().read(buf) {
                Ok(0) => {
                    self.end_of_input(inputs);
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_fatal(e)),
            };
            match &mut self.editor {
                Some((editor, _)) => {
                    if buf[..n].contains(&b'\t') && std::mem::take(&mut self.names_stale) {
                        let names = client.table().iter().map(|e| e.name.to_string());
                        editor.set_completions(&console::COMMANDS, names.collect());
                    }
                    let mut out = Vec::new();
                    for event in editor.feed(&buf[..n], &mut out) {
                        match event {
                            EditorEvent::Line(line) => inputs.push(Input::Line(line)),
                            EditorEvent::Interrupt => inputs.push(Input::Interrupt),
                            // Ctrl+D: end of input, like a pipe's.
                            EditorEvent::Eof => self.eof = true,
                        }
                    }
                    write_all(&out);
                    if self.eof {
                        return Ok(());
                    }
                }
                None => self.split_lines(&buf[..n], inputs),
            }
            // Without O_NONBLOCK one read is all that is safe.
            if self.nonblocking.is_none() {
                return Ok(());
            }
        }
    }

    fn split_lines(&mut self, bytes: &[u8], inputs: &mut Vec<Input>) {
        for &b in bytes {
            if b == b'\n' {
                if !std::mem::take(&mut self.skipping) {
                    let line = String::from_utf8_lossy(&self.pending).into_owned();
                    inputs.push(Input::Line(line));
                }
                self.pending.clear();
            } else if self.skipping {
                continue;
            } else if self.pending.len() == MAX_LINE {
                self.pending.clear();
                self.skipping = true;
                self.skipped = true;
                let msg = format!(">>> [Error: line longer than {MAX_LINE} bytes ignored.]");
                self.show(&msg);
            } else {
                self.pending.push(b);
            }
        }
    }

    fn end_of_input(&mut self, inputs: &mut Vec<Input>) {
        if !self.pending.is_empty() && !self.skipping {
            let line = String::from_utf8_lossy(&self.pending).into_owned();
            inputs.push(Input::Line(line));
        }
        self.pending.clear();
        self.eof = true;
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        if let Some((_, raw)) = &self.editor {
            // Leave the cursor on a fresh line for the shell.
            write_all(b"\r\n");
            raw.restore();
        }
    }
}

/// O_NONBLOCK on stdin for the life of the client, so reads can drain it
/// (mio's readiness is edge-triggered). The old flags come back on drop.
struct NonBlocking {
    fd: RawFd,
    flags: libc::c_int,
}

impl NonBlocking {
    fn enable(fd: RawFd) -> Option<NonBlocking> {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we do not own only change
        // its status flags; std offers no way to set O_NONBLOCK on stdin.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return None;
        }
        // SAFETY: as above.
        let set = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        (set == 0).then_some(NonBlocking { fd, flags })
    }
}

impl Drop for NonBlocking {
    fn drop(&mut self) {
        // SAFETY: restores the flags read in `enable` on the same descriptor.
        unsafe {
            libc::fcntl(self.fd, libc::F_SETFL, self.flags);
        }
    }
}

/// Writes and flushes; a closed stdout (terminal gone) is ignored — the
/// signal that comes with it ends the client.
fn write_all(bytes: &[u8]) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}
