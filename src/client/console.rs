//! The console adapter: the commands a user types (`send Bob hi`, `list`,
//! …) carried out on a [`Client`] through its public calls, and the exact
//! line each [`Event`] shows as (SPEC's console table). The core has no
//! text of its own but [`CommandError`]'s and a refusal's explanation; the
//! binary, the simulations and any embedder with a text console use this.

use std::collections::VecDeque;
use std::time::Instant;

use unicode_width::UnicodeWidthStr;

use super::{Client, CommandError, Event, Path};
use crate::packet;
use crate::wire::Name;

/// The commands, for `help` and Tab completion.
pub const COMMANDS: [&str; 7] = ["send", "send_all", "dereg", "reg", "list", "help", "quit"];

/// What `help` shows.
pub const HELP: [&str; 13] = [
    "send <name> <message>   direct message to a client (yourself included)",
    "send_all <message>      message to every other online client",
    "dereg <your name>       leave (you stay offline until reg)",
    "reg <your name>         log back in after dereg",
    "list                    show the client table",
    "help                    show this list",
    "quit                    leave (the server is told), then exit",
    "keys: Left/Right, Home/End (Ctrl+A, Ctrl+E), Up/Down for earlier lines,",
    "      Backspace, Delete, Ctrl+U / Ctrl+K erase before / after the cursor,",
    "      Ctrl+W the word before it, Ctrl+L clear the screen,",
    "      Tab completes a command or a name",
    "Ctrl+D                  on an empty line: exit without telling the server",
    "Ctrl+C                  quit without telling the server",
];

/// Lines a person typed that wait for the first registration; one more
/// is refused, said so.
const HELD_TYPED: usize = 64;

/// Lines typed or piped in, held until the client can take them and run
/// one at a time: a driver shows the client's events, then runs the next
/// line ([`Console::run_next`]), then shows what it brought, and so on, so
/// every reply comes after what happened before it (a `list` after the
/// table's update).
#[derive(Debug)]
pub struct Console {
    held: VecDeque<String>,
    script: bool,
}

impl Console {
    /// `script`: the lines come from a script (a pipe, a file), not a
    /// person. A script's line waits until [`Client::wants_input`], so
    /// none is refused for want of room and none overtakes another (the
    /// driver stops reading while lines are held, which bounds them);
    /// a typed line waits only for the first registration.
    pub fn new(script: bool) -> Console {
        Console {
            held: VecDeque::new(),
            script,
        }
    }

    /// Takes a line to run when the client can. A person's line past 64
    /// held while the first registration is under way is refused: the
    /// reply says so.
    pub fn push(&mut self, client: &Client, line: String) -> Option<Reply> {
        if !self.script && !client.is_ready() && self.held.len() >= HELD_TYPED {
            return Some(Reply::error("still registering; try again in a moment."));
        }
        self.held.push_back(line);
        None
    }

    /// Runs the next held line if the client can take it now, giving its
    /// reply; `None` when nothing ran.
    pub fn run_next(&mut self, client: &mut Client, now: Instant) -> Option<Reply> {
        let next = self.held.front()?;
        let ready = if self.script {
            client.wants_input()
        } else {
            // What needs no registration (`quit`, `help`, `list`) a
            // person gets at once.
            client.is_ready() || !needs_registration(next)
        };
        if !ready {
            return None;
        }
        let line = self.held.pop_front()?;
        Some(command(client, now, &line))
    }

    /// No line is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// What a command line gives back at once; what it starts reports later,
/// as the client's events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Lines to show now: `list` or `help` output, or why the command was
    /// not carried out.
    pub lines: Vec<String>,
    /// The command was not carried out (a script's exit status says so).
    pub failed: bool,
}

impl Reply {
    fn error(text: impl std::fmt::Display) -> Reply {
        Reply {
            lines: vec![format!(">>> [Error: {text}]")],
            failed: true,
        }
    }

    fn of(result: Result<(), CommandError>) -> Reply {
        match result {
            // An exited client says nothing more.
            Ok(()) | Err(CommandError::Exited) => Reply::default(),
            Err(e) => Reply::error(e),
        }
    }
}

/// Carries out one console line (`send Bob hi`, `list`, …) on `client`.
pub fn command(client: &mut Client, now: Instant, line: &str) -> Reply {
    let line = line.trim_end_matches(['\r', '\n']);
    let (command, rest) = split_word(line);
    match command {
        "" => Reply::default(),
        "help" => Reply {
            lines: HELP.iter().map(|l| format!(">>> {l}")).collect(),
            failed: false,
        },
        "list" => Reply {
            lines: list(client),
            failed: false,
        },
        "quit" if rest.trim().is_empty() => {
            client.quit(now);
            Reply::default()
        }
        // Before the first table is there, a name could not be told from
        // an unknown one: say so rather than refuse it for a wrong reason.
        _ if !client.is_ready() && client.is_online() => Reply::of(Err(CommandError::Registering)),
        "send" => {
            let (to, text) = split_word(rest);
            if to.is_empty() || text.is_empty() {
                return Reply::error("usage: send <name> <message>");
            }
            // A name that cannot be one is no client of the table.
            Reply::of(match Name::new(to) {
                Ok(name) => client.send_message(now, &name, text).map(drop),
                Err(_) => Err(CommandError::UnknownClient(to.to_string())),
            })
        }
        "send_all" if rest.is_empty() => Reply::error("usage: send_all <message>"),
        "send_all" => Reply::of(client.send_all(now, rest).map(drop)),
        "dereg" | "reg" if rest.trim() != client.name().as_str() => {
            let name = client.name();
            Reply::error(format_args!("{command} takes your own name ({name})."))
        }
        "dereg" => Reply::of(client.dereg(now)),
        "reg" => Reply::of(client.reg(now)),
        other => Reply::error(format_args!(
            "unknown command {other}; type help for the commands."
        )),
    }
}

/// `list`: the local client table under a header, one line a client,
/// columns aligned by display width (a CJK name takes two columns a
/// character), your own row as you are and marked `(you)`, a peer's path
/// once one is known. Console lines, `>>> ` included.
pub fn list(client: &Client) -> Vec<String> {
    let table = client.table();
    if table.is_empty() {
        return vec![">>> The client table is empty.".to_string()];
    }
    // Our own row as we know ourselves (after a dereg the table, which no
    // delta updates any more, would still say online).
    let me = client.name();
    let online = |name: &Name, listed: bool| {
        if name == me {
            client.is_online()
        } else {
            listed
        }
    };
    let width = table.iter().map(|e| e.name.as_str().width()).max();
    let width = width.unwrap_or(0);
    let count = table.iter().filter(|e| online(&e.name, e.online)).count();
    let mut lines = vec![format!(
        ">>> [Client table: {count} of {} online.]",
        table.len()
    )];
    lines.extend(table.iter().map(|e| {
        let status = if online(&e.name, e.online) {
            "online"
        } else {
            "offline"
        };
        let pad = " ".repeat(width - e.name.as_str().width());
        let row = format!(">>> {}{pad}  {:<21}  {status}", e.name, e.addr.to_string());
        // Then who it is, or how our messages reach it (see `Path`).
        let tail = if e.name == *me {
            Some("(you)")
        } else {
            client.path(&e.name).map(Path::as_str)
        };
        match tail {
            Some(tail) => format!("{row}{}  {tail}", " ".repeat(7 - status.len())),
            None => row,
        }
    }));
    lines
}

/// The console line of `event`, `>>> ` included; `local_time` renders a
/// Unix time as `YYYY-MM-DD HH:MM:SS`. `None` for what is not a line
/// ([`Event::ServerKeyLearned`], [`Event::Closed`]).
pub fn render(event: &Event, local_time: impl Fn(i64) -> String) -> Option<String> {
    let body = match event {
        Event::Welcome => "[Welcome, You are registered.]".to_string(),
        Event::TableUpdated => "[Client table updated.]".to_string(),
        Event::Presence { name, online: true } => format!("[{name} is online.]"),
        Event::Presence {
            name,
            online: false,
        } => format!("[{name} is offline.]"),
        Event::PresenceMore(n) => {
            format!("[and {n} more clients came or went; type list to see them.]")
        }
        Event::ReceivedBy { to, .. } => format!("[Message received by {to}.]"),
        Event::NoAck { to, .. } => format!("[No ACK from {to}, message sent to server.]"),
        Event::PeerOffline { to, .. } => format!("[{to} is offline, message sent to server.]"),
        Event::Saved { .. } => "[Messages received by the server and saved]".to_string(),
        Event::Exists { to, .. } => format!("[Client {to} exists!!]"),
        Event::Bye => "[You are Offline. Bye.]".to_string(),
        Event::ServerNotResponding => "[Server not responding]".to_string(),
        Event::Exiting => "[Exiting]".to_string(),
        Event::ChannelNotResponding { .. } => "[Server not responding.]".to_string(),
        Event::HaveMessages => "[You Have Messages]".to_string(),
        Event::Stored {
            from,
            channel,
            verified,
            stored_at,
            text,
        } => {
            let unverified = if *verified { "" } else { " (unverified)" };
            let channel = if *channel { "Channel_Message " } else { "" };
            let at = local_time(*stored_at);
            format!("{channel}{from}: {at} {text}{unverified}")
        }
        Event::Direct { from, text } => format!("{from}: {text}"),
        Event::ChannelAcked { .. } => "[Message received by Server.]".to_string(),
        Event::Channel { from, text } => format!("[Channel_Message {from}: {text}]"),
        Event::Rejected(n) => format!("[Registration rejected: name {n} is already in use.]"),
        Event::RejectedKey(n) => {
            format!("[Registration rejected: name {n} belongs to another key.]")
        }
        Event::ServerKeyChanged { pinned, presented } => format!(
            "[Error: the server presented key {}, not the key {} remembered for it; \
             not connecting.]",
            presented.fingerprint(),
            pinned.fingerprint()
        ),
        Event::VersionMismatch(v) => format!(
            "[Error: server speaks protocol version {v}; this client speaks {}.]",
            packet::VERSION
        ),
        Event::Reconnected => "[Reconnected to server.]".to_string(),
        Event::MailboxFull { to, .. } => {
            format!("[Error: mailbox of {to} is full, message not saved.]")
        }
        Event::Refused { why, .. } | Event::Error(why) => format!("[Error: {why}]"),
        Event::Unverifiable(from) => format!(
            "[Error: a stored message from {from} could not be verified (not sealed by its \
             key for yours); it was dropped.]"
        ),
        Event::ServerKeyLearned(_) | Event::Closed { .. } => return None,
    };
    Some(format!(">>> {body}"))
}

/// The process's exit status once `event` says the client is done: 0 after
/// `quit`, 1 when it ended on a failure (SPEC's exit statuses).
pub fn exit_status(event: &Event) -> Option<i32> {
    match event {
        Event::Closed { failed } => Some(i32::from(*failed)),
        _ => None,
    }
}

/// Whether `line` is a command that waits for the first registration.
fn needs_registration(line: &str) -> bool {
    !matches!(split_word(line).0, "" | "help" | "list" | "quit")
}

/// Splits off the first whitespace-separated word; the rest keeps its inner
/// spacing (a message is the rest of the line as typed).
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => {
            let rest = &s[i..];
            let sep = rest.chars().next().map_or(0, char::len_utf8);
            (&s[..i], &rest[sep..])
        }
        None => (s, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_keeps_its_inner_spacing() {
        assert_eq!(
            split_word("  send  Bob  hi  there "),
            ("send", " Bob  hi  there ")
        );
        assert_eq!(split_word("send\tBob"), ("send", "Bob"));
        assert_eq!(split_word("list"), ("list", ""));
        assert_eq!(split_word("   "), ("", ""));
    }

    #[test]
    fn every_command_is_in_help() {
        for command in COMMANDS {
            assert!(
                HELP.iter().any(|l| l.starts_with(command)),
                "{command} is not in help"
            );
        }
    }
}
