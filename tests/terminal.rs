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
}

impl PtyClient {
    fn start(name: &str, server_port: u16) -> PtyClient {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two new descriptors into the two ints; the
        // null name, termios and winsize pointers are allowed.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
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
        PtyClient {
            child,
            master: File::from(master),
            slave,
            output,
            seen: String::new(),
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
            match self.output.recv_timeout(left) {
                Ok(bytes) => self
                    .seen
                    .push_str(&String::from_utf8_lossy(&bytes).replace('\r', "")),
                Err(_) => panic!(
                    "terminal never showed {want:?}; it showed:\n{:?}",
                    &self.seen[from..]
                ),
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
    let at = alice.expect(at, ">>> send Bob hel\x1b[K");
    bob.send("send Alice hi there");
    bob.expect(">>> [Message received by Alice.]");
    // Cleared line, the message, then the prompt with the input intact.
    let at = alice.expect(at, "\x1b[K>>> Bob: hi there");
    let at = alice.expect(at, "\n>>> send Bob hel\x1b[K");

    // Finish the line: it is the command as typed, not garbled.
    alice.type_keys("lo\r");
    bob.expect(">>> Alice: hello");
    let at = alice.expect(at, ">>> [Message received by Bob.]");

    // Up recalls it; Ctrl+U clears it; the history came back intact.
    alice.type_keys("\x1b[A");
    let at = alice.expect(at, ">>> send Bob hello\x1b[K");
    alice.type_keys("\x15");
    alice.expect(at, ">>> \x1b[K");

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
