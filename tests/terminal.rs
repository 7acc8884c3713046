//! Terminal mode through a real pseudo-terminal: the prompt, a line arriving
//! while the user types (printed above, the input redrawn intact), editing
//! keys, Ctrl+C as a silent leave, and the terminal restored afterwards.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

use common::{BIN, Client, DEADLINE, Server, TABLE, free_udp_port};

/// A client whose stdin, stdout and stderr are a pseudo-terminal.
struct PtyClient {
    child: Child,
    master: File,
    slave: OwnedFd,
    output: Receiver<Vec<u8>>,
    /// Everything read so far, with carriage returns removed (the tty's
    /// output processing turns "\n" into "\r\n", so "\r" carries no meaning
    /// a test could rely on).
    seen: String,
    /// What a terminal (`vt100`, as xterm) shows of everything read so far.
    screen: vt100::Parser,
}

impl PtyClient {
    /// [`PtyClient::start_sized`] in an 80×24 terminal.
    fn start(name: &str, server_port: u16) -> PtyClient {
        PtyClient::start_sized(name, server_port, 80, 24)
    }

    /// A client in a terminal `cols` wide and `rows` tall.
    fn start_sized(name: &str, server_port: u16, cols: u16, rows: u16) -> PtyClient {
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two new descriptors into the two ints and
        // only reads the winsize; the null name and termios are allowed.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty failed");
        // SAFETY: both descriptors were just created and are owned here only.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let port = free_udp_port().to_string();
        let home = common::config_home(server_port);
        let child = Command::new(BIN)
            .args(["-c", name, "127.0.0.1", &server_port.to_string(), &port])
            .env("XDG_CONFIG_HOME", &home)
            .env("HOME", home.join("home"))
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()))
            .spawn()
            .unwrap();
        let mut reader = File::from(master.try_clone().unwrap());
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child is gone and no one else holds the slave
            // open for writing: the thread simply ends.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let nz = |n: u16| std::num::NonZeroU16::new(n).expect("a real size");
        PtyClient {
            child,
            master: File::from(master),
            slave,
            output,
            seen: String::new(),
            screen: vt100::Parser::new(nz(rows), nz(cols), 0),
        }
    }

    /// Takes what the client wrote so far, waiting up to `left` for more.
    fn read(&mut self, left: std::time::Duration) -> bool {
        match self.output.recv_timeout(left) {
            Ok(bytes) => {
                self.screen.process(&bytes);
                self.seen
                    .push_str(&String::from_utf8_lossy(&bytes).replace('\r', ""));
                true
            }
            Err(_) => false,
        }
    }

    /// The screen's rows, trailing blanks cut, blank rows at the bottom
    /// left out.
    fn rows(&self) -> Vec<String> {
        let cols = self.screen.screen().size().1.get();
        let mut rows: Vec<String> = self
            .screen
            .screen()
            .rows(0, cols)
            .map(|r| r.trim_end().to_string())
            .collect();
        while rows.last().is_some_and(String::is_empty) {
            rows.pop();
        }
        rows
    }

    /// Waits until the screen's rows satisfy `ok`; panics with them if they
    /// never do.
    #[track_caller]
    fn wait_screen(&mut self, what: &str, ok: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let rows = self.rows();
            if ok(&rows) {
                return rows;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.read(left) {
                panic!("the screen never showed {what}; it shows:\n{rows:#?}");
            }
        }
    }

    fn type_keys(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
        self.master.flush().unwrap();
    }

    /// Waits until the output read so far contains `want` (after `from`).
    fn expect(&mut self, from: usize, want: &str) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(at) = self.seen[from..].find(want) {
                return from + at + want.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.read(left) {
                panic!(
                    "terminal never showed {want:?}; it showed:\n{:?}",
                    &self.seen[from..]
                );
            }
        }
    }

    fn local_flags(&self) -> libc::tcflag_t {
        // SAFETY: tcgetattr fills a termios for a descriptor we hold open.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.slave.as_raw_fd(), &mut t), 0);
            t.c_lflag
        }
    }
}

impl Drop for PtyClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn incoming_line_is_printed_above_and_the_half_typed_input_redrawn() {
    let server = Server::start();
    let mut alice = PtyClient::start("Alice", server.port());
    let at = alice.expect(0, ">>> [Welcome, You are registered.]");
    let at = alice.expect(at, TABLE);
    // Raw mode is on: no canonical input, no echo by the tty itself.
    assert_eq!(alice.local_flags() & (libc::ICANON | libc::ECHO), 0);

    let mut bob = Client::start("Bob", server.port());
    bob.expect_lines(&[">>> [Welcome, You are registered.]", TABLE]);
    let at = alice.expect(at, TABLE);

    // Half a command, with a typo fixed by backspace and the cursor moved.
    alice.type_keys("send Bob helx\x7f");
    let _ = at;
    alice.wait_screen("the half-typed input", |rows| {
        rows.last().is_some_and(|r| r == ">>> send Bob hel")
    });
    bob.send("send Alice hi there");
    bob.expect(">>> [Message received by Alice.]");
    // The message above, then the prompt with the input intact.
    alice.wait_screen("the message above the input", |rows| {
        rows.ends_with(&[">>> Bob: hi there".into(), ">>> send Bob hel".into()])
    });

    // Finish the line: it is the command as typed, not garbled.
    alice.type_keys("lo\r");
    bob.expect(">>> Alice: hello");
    alice.wait_screen("the outcome", |rows| {
        rows.iter().any(|r| r == ">>> [Message received by Bob.]")
    });

    // Up recalls it; Ctrl+U clears it; the history came back intact.
    alice.type_keys("\x1b[A");
    alice.wait_screen("the recalled line", |rows| {
        rows.last().is_some_and(|r| r == ">>> send Bob hello")
    });
    alice.type_keys("\x15");
    alice.wait_screen("an empty prompt", |rows| {
        rows.last().is_some_and(|r| r == ">>>")
    });

    // Ctrl+C: silent leave, terminal restored.
    alice.type_keys("\x03");
    let status = alice.child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let flags = alice.local_flags();
    assert_ne!(flags & libc::ICANON, 0, "canonical mode not restored");
    assert_ne!(flags & libc::ECHO, 0, "echo not restored");
    // The server was not told: Bob sees no table change.
    bob.expect_quiet(std::time::Duration::from_millis(700));
    bob.close_stdin();
    bob.expect_exit(0);
}

#[test]
fn ctrl_d_on_an_empty_line_exits_and_restores_the_terminal() {
    let server = Server::start();
    let mut alice = PtyClient::start("Alice", server.port());
    alice.expect(0, TABLE);
    alice.type_keys("\x04");
    let status = alice.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_ne!(alice.local_flags() & libc::ICANON, 0);
}

/// The issue's case: a 300-character line typed at 40 columns (eight rows)
/// while messages arrive. After each redraw the terminal shows every
/// message, in order, above the prompt, and the input whole below them,
/// with the cursor at its end; Enter sends exactly what was typed.
#[test]
fn a_long_line_at_forty_columns_stays_intact_while_messages_arrive() {
    const COLS: usize = 40;
    let server = Server::start();
    let mut alice = PtyClient::start_sized("Alice", server.port(), COLS as u16, 24);
    alice.expect(0, TABLE);
    let mut bob = Client::start("Bob", server.port());
    bob.expect_lines(&[">>> [Welcome, You are registered.]", TABLE]);
    let text: String = (0..291)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let line = format!("send Bob {text}");
    assert_eq!(line.len(), 300);
    let wrap = |s: &str| -> Vec<String> {
        s.as_bytes()
            .chunks(COLS)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect()
    };
    let mut messages: Vec<String> = Vec::new();
    for (k, chunk) in line.as_bytes().chunks(30).enumerate() {
        alice.type_keys(std::str::from_utf8(chunk).unwrap());
        let typed = &line[..(k + 1) * 30];
        let edit = wrap(&format!(">>> {typed}"));
        alice.wait_screen("the input typed so far", |rows| rows.ends_with(&edit));
        bob.send(&format!("send Alice message {k} to read while typing"));
        bob.expect(">>> [Message received by Alice.]");
        messages.push(format!(">>> Bob: message {k} to read while typing"));
        let rows = alice.wait_screen("the message above the input", |rows| {
            rows.ends_with(&edit) && rows.len() > edit.len() && {
                let above = &rows[..rows.len() - edit.len()];
                above.last() == messages.last()
            }
        });
        // Every message so far, in order, none garbled or repeated.
        let shown: Vec<&String> = rows.iter().filter(|r| r.starts_with(">>> Bob: ")).collect();
        assert_eq!(shown, messages.iter().collect::<Vec<_>>(), "{rows:#?}");
        // The cursor at the end of the input.
        let (row, col) = alice.screen.screen().cursor_position();
        let end = 4 + typed.len();
        assert_eq!(
            (usize::from(row), usize::from(col)),
            (rows.len() - 1 + end / COLS - (edit.len() - 1), end % COLS),
            "{rows:#?}"
        );
    }
    alice.type_keys("\r");
    bob.expect(&format!(">>> Alice: {text}"));
    alice.wait_screen("the outcome", |rows| {
        rows.last().is_some_and(|r| r == ">>>")
            && rows.iter().any(|r| r == ">>> [Message received by Bob.]")
    });
    alice.type_keys("\x04");
    assert_eq!(alice.child.wait().unwrap().code(), Some(0));
    bob.close_stdin();
    bob.expect_exit(0);
}

/// Tab completes a command, then a name from the client table.
#[test]
fn tab_completes_commands_and_names_from_the_table() {
    let server = Server::start();
    let mut alice = PtyClient::start("Alice", server.port());
    alice.expect(0, TABLE);
    let mut bob = Client::start("Bob", server.port());
    bob.expect_lines(&[">>> [Welcome, You are registered.]", TABLE]);
    alice.wait_screen("Bob's arrival", |rows| {
        rows.iter().any(|r| r == ">>> [Bob is online.]")
    });
    alice.type_keys("send_\t");
    alice.wait_screen("the command completed", |rows| {
        rows.last().is_some_and(|r| r == ">>> send_all")
    });
    alice.type_keys("\x15send B\t");
    alice.wait_screen("the name completed", |rows| {
        rows.last().is_some_and(|r| r == ">>> send Bob")
    });
    alice.type_keys("tabbed\r");
    bob.expect(">>> Alice: tabbed");
    alice.type_keys("\x04");
    assert_eq!(alice.child.wait().unwrap().code(), Some(0));
    bob.close_stdin();
    bob.expect_exit(0);
}
