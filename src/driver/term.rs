//! The client's terminal: a line editor that keeps the half-typed input intact
//! while lines arrive, and a guard that holds the terminal in raw mode.
//!
//! [`LineEditor`] is pure logic: bytes read from the terminal go in, bytes to
//! write back and completed [`EditorEvent`]s come out, so every key is tested
//! without a terminal. [`RawMode`] is the only part that touches the terminal.
//!
//! The prompt and the input may take any number of rows: the editor knows
//! the terminal's width ([`LineEditor::set_width`]), lays the text out as
//! the terminal wraps it (a wide character that does not fit at the end of
//! a row goes to the next), and redraws from the first row of the edit area
//! down, so a line printed above, a key that changes the input or a resize
//! leaves every row intact. Known limits: an input taller than the window
//! cannot be redrawn whole (the rows above the window are out of reach);
//! the cursor moves one `char` at a time, so a combining mark or an emoji
//! sequence joined with U+200D takes several presses to cross.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;

use unicode_width::UnicodeWidthChar;

/// Most bytes the input line may hold; further input is refused with a bell.
pub const MAX_INPUT: usize = 4096;
/// Most lines kept in the history; the oldest goes first.
pub const MAX_HISTORY: usize = 100;
/// Most bytes of one escape sequence kept while it is incomplete, `ESC [`
/// included. A longer one is still swallowed whole, just not remembered.
const MAX_ESCAPE: usize = 16;
/// Room for a CSI sequence's parameter and intermediate bytes.
const MAX_CSI_PARAMS: usize = MAX_ESCAPE - 2;

const BEL: u8 = 0x07;
const ESC: u8 = 0x1b;
/// Erase from the cursor to the end of the screen.
const CLEAR_BELOW: &[u8] = b"\x1b[J";
/// Move to the top left corner and erase the screen (Ctrl+L).
const CLEAR_SCREEN: &[u8] = b"\x1b[H\x1b[2J";
/// The width assumed until the driver tells the real one.
const DEFAULT_WIDTH: usize = 80;

/// What the user finished doing at the keyboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditorEvent {
    /// Enter was pressed; the line as typed, possibly empty.
    Line(String),
    /// Ctrl+C: leave at once.
    Interrupt,
    /// Ctrl+D on an empty line: end of input.
    Eof,
}

/// A key decoded from the terminal's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Char(char),
    Enter,
    Backspace,
    Delete,
    KillBefore,
    /// Ctrl+K.
    KillAfter,
    /// Ctrl+W.
    KillWord,
    /// Ctrl+L.
    Clear,
    Tab,
    Left,
    Right,
    Home,
    End,
    Up,
    Down,
    CtrlC,
    CtrlD,
}

/// Where the decoder is inside a multi-byte input (UTF-8 or an escape
/// sequence); everything here survives from one `feed` to the next.
#[derive(Debug, Clone, Copy)]
enum Decode {
    Ground,
    /// A UTF-8 character of `need` bytes, `len` of them seen.
    Utf8 {
        bytes: [u8; 4],
        len: u8,
        need: u8,
    },
    /// `ESC` seen.
    Esc,
    /// `ESC [` and `len` parameter bytes seen.
    Csi {
        params: [u8; MAX_CSI_PARAMS],
        len: u8,
    },
    /// A CSI sequence too long to keep: dropped up to its final byte.
    CsiSkip,
    /// `ESC O` seen.
    Ss3,
}

/// What one byte did to the decoder.
enum Step {
    /// Nothing complete yet, or the byte was ignored.
    Pending,
    Key(Key),
    /// The byte broke off a sequence in progress (now dropped) and must be
    /// read again from the ground state.
    Again,
}

/// An interactive line editor: turns raw terminal bytes into lines and keeps
/// the prompt and the half-typed input on the bottom row.
///
/// It writes `"\r\n"` itself, so it expects the terminal's output
/// post-processing (`OPOST`) on, as [`RawMode`] leaves it. After
/// [`EditorEvent::Interrupt`] or [`EditorEvent::Eof`] the editor is closed:
/// it ignores further input and prints lines without a prompt, so the last
/// status lines before exit do not leave a stray `>>> ` behind.
///
/// ```
/// use udpchat::driver::term::{EditorEvent, LineEditor};
///
/// let mut editor = LineEditor::new(">>> ");
/// let mut out = Vec::new();
/// let events = editor.feed(b"list\r", &mut out);
/// assert_eq!(events, [EditorEvent::Line("list".to_string())]);
/// ```
#[derive(Debug)]
pub struct LineEditor {
    prompt: String,
    input: String,
    /// Byte offset into `input`, always on a char boundary.
    cursor: usize,
    history: VecDeque<String>,
    /// The history entry on show, while browsing with Up/Down.
    browsing: Option<usize>,
    /// What was typed before Up was first pressed, for Down to bring back.
    draft: String,
    decode: Decode,
    /// The last byte was `\r`, so a `\n` right after it ends no second line.
    after_cr: bool,
    closed: bool,
    /// The row no longer shows the state; redraw once the feed is done.
    dirty: bool,
    /// Input was refused; ring once for the whole feed.
    bell: bool,
    /// The terminal's width in columns.
    width: usize,
    /// The row the terminal's cursor is on, counted from the first row of
    /// the edit area (where the prompt starts), as last drawn.
    row: usize,
    /// What Tab completes the first word to.
    commands: Vec<String>,
    /// What Tab completes a later word to.
    names: Vec<String>,
}

impl LineEditor {
    /// An editor showing `prompt` in front of the input.
    pub fn new(prompt: &str) -> Self {
        LineEditor {
            prompt: prompt.to_string(),
            input: String::new(),
            cursor: 0,
            history: VecDeque::new(),
            browsing: None,
            draft: String::new(),
            decode: Decode::Ground,
            after_cr: false,
            closed: false,
            dirty: false,
            bell: false,
            width: DEFAULT_WIDTH,
            row: 0,
            commands: Vec::new(),
            names: Vec::new(),
        }
    }

    /// What Tab completes: the first word of a line to one of `commands`,
    /// a later word to one of `names`.
    pub fn set_completions(&mut self, commands: &[&str], names: Vec<String>) {
        self.commands = commands.iter().map(|c| c.to_string()).collect();
        self.names = names;
    }

    /// Tab: the word before the cursor completed, as far as it goes the
    /// same way in every candidate (a space after a whole one); a bell when
    /// nothing is added.
    fn complete(&mut self) {
        let before = &self.input[..self.cursor];
        let start = before.rfind(' ').map_or(0, |i| i + 1);
        let word = &before[start..];
        let first = before[..start].trim().is_empty();
        let pool = if first { &self.commands } else { &self.names };
        let mut matches = pool.iter().filter(|c| c.starts_with(word));
        let Some(head) = matches.next() else {
            self.bell = true;
            return;
        };
        let mut common = head.as_str();
        let mut several = false;
        for other in matches {
            several = true;
            let same = common
                .char_indices()
                .zip(other.chars())
                .find(|((_, a), b)| a != b)
                .map_or(common.len().min(other.len()), |((i, _), _)| i);
            common = &common[..same];
        }
        let mut add = common[word.len()..].to_string();
        if !several {
            add.push(' ');
        }
        if add.is_empty() || self.input.len() + add.len() > MAX_INPUT {
            self.bell = true;
            return;
        }
        self.input.insert_str(self.cursor, &add);
        self.cursor += add.len();
        self.dirty = true;
    }

    /// The terminal is `columns` wide (at start, and after each resize):
    /// the edit area is drawn again for it. Where the cursor now is depends
    /// on the terminal: one that reflows its rows (most do) has it where
    /// the new width puts it, one that does not (xterm) where the old one
    /// did. The redraw starts from the nearer of the two rows, so it never
    /// reaches above the edit area into the lines printed before it; the
    /// price is that on one kind of terminal a row or two of the input may
    /// stay behind above it.
    pub fn set_width(&mut self, columns: usize, out: &mut Vec<u8>) {
        let columns = columns.max(2);
        if columns == self.width {
            return;
        }
        let before = self.row;
        self.width = columns;
        self.row = before.min(self.at(self.cursor).0);
        self.redraw(out);
    }

    /// Feeds raw bytes read from the terminal. UTF-8 characters and escape
    /// sequences may be split across calls. Appends the bytes to echo to
    /// `out` and returns the completed events in order.
    ///
    /// Enter (`\r` or `\n`; `\r\n` counts once) yields a line, Ctrl+C an
    /// interrupt, Ctrl+D on an empty line the end of input. Editing keys:
    /// Backspace, Delete, Ctrl+D on a non-empty line, Ctrl+U (erase before
    /// the cursor), Ctrl+K (after it), Ctrl+W (the word before it), Ctrl+L
    /// (clear the screen), Left/Right, Home/End (also Ctrl+A/Ctrl+E),
    /// Up/Down through the history. Unknown
    /// escape sequences and other control bytes are ignored. A recalled
    /// history line may be edited and sent; the edit is lost if Up/Down moves
    /// on before Enter (the entry itself never changes).
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Vec<EditorEvent> {
        let mut events = Vec::new();
        for &byte in bytes {
            if self.closed {
                break;
            }
            let mut step = self.decode_byte(byte);
            if let Step::Again = step {
                // The decoder is back in the ground state, where a byte is
                // never read again, so this happens at most once per byte.
                step = self.decode_byte(byte);
            }
            if let Step::Key(key) = step {
                self.apply(key, out, &mut events);
            }
        }
        self.flush(out);
        events
    }

    /// Prints `line` above the prompt: erases the edit area (every row of
    /// it), writes `line` and `"\r\n"`, then draws the prompt and the
    /// half-typed input again below it, with the cursor where it was.
    /// Control characters in `line` (which may come from the network) are
    /// shown as U+FFFD so they cannot drive the terminal. Once the editor
    /// is closed the line is written alone.
    pub fn print_above(&mut self, line: &str, out: &mut Vec<u8>) {
        if !self.closed {
            self.to_top(out);
            out.extend_from_slice(CLEAR_BELOW);
        }
        let mut utf8 = [0; 4];
        for c in line.chars() {
            let shown = if c.is_control() { '\u{fffd}' } else { c };
            out.extend_from_slice(shown.encode_utf8(&mut utf8).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        self.row = 0;
        self.redraw(out);
    }

    /// Draws the prompt and the input over the edit area: from its first
    /// row, `"\r\x1b[J"` (erase to the end of the screen), the prompt, the
    /// input, then the moves that put the cursor back where it is in the
    /// input. Writes nothing once the editor is closed.
    pub fn redraw(&mut self, out: &mut Vec<u8>) {
        if self.closed {
            return;
        }
        self.to_top(out);
        out.extend_from_slice(CLEAR_BELOW);
        out.extend_from_slice(self.prompt.as_bytes());
        out.extend_from_slice(self.input.as_bytes());
        // Where the terminal's cursor is now: after the text, or at the
        // start of the next row if the text fills its last row (the
        // terminal would hold it in that row's last column until the next
        // character; a new row makes where it is certain).
        let (mut row, mut col) = self.at(self.input.len());
        if col == self.width {
            out.extend_from_slice(b"\r\n");
            (row, col) = (row + 1, 0);
        }
        // Where it belongs: after `input[..cursor]` (never below the end).
        let (mut to_row, mut to_col) = self.at(self.cursor);
        if to_col == self.width {
            (to_row, to_col) = (to_row + 1, 0);
        }
        if (to_row, to_col) != (row, col) {
            if row > to_row {
                out.extend_from_slice(format!("\x1b[{}A", row - to_row).as_bytes());
            }
            out.push(b'\r');
            if to_col > 0 {
                // `ESC [ 0 C` moves one column on most terminals: guarded.
                out.extend_from_slice(format!("\x1b[{to_col}C").as_bytes());
            }
        }
        self.row = to_row;
    }

    /// Moves the cursor to the start of the edit area's first row.
    fn to_top(&self, out: &mut Vec<u8>) {
        if self.row > 0 {
            out.extend_from_slice(format!("\x1b[{}A", self.row).as_bytes());
        }
        out.push(b'\r');
    }

    /// Where the prompt and `input[..upto]` end on screen, as the terminal
    /// wraps them: (row from the edit area's first, column). A column equal
    /// to the width means the row is full (the next character wraps).
    fn at(&self, upto: usize) -> (usize, usize) {
        let text = self.prompt.chars().chain(self.input[..upto].chars());
        let (mut row, mut col) = (0, 0);
        for c in text {
            let w = c.width().unwrap_or(0);
            if col + w > self.width {
                (row, col) = (row + 1, 0);
            }
            col += w;
        }
        (row, col)
    }

    /// Moves the cursor below the last row of the text, to a fresh row: the
    /// edit area is left as it is, for the scrollback.
    fn leave(&mut self, out: &mut Vec<u8>) {
        let (last, _) = self.at(self.input.len());
        if last > self.row {
            out.extend_from_slice(format!("\x1b[{}B", last - self.row).as_bytes());
        } else if self.row > last {
            out.extend_from_slice(format!("\x1b[{}A", self.row - last).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        self.row = 0;
    }

    /// The half-typed input.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Whether Ctrl+C or Ctrl+D on an empty line has ended the input.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Runs one byte through the decoder.
    fn decode_byte(&mut self, byte: u8) -> Step {
        match self.decode {
            Decode::Ground => self.ground(byte),
            Decode::Utf8 {
                mut bytes,
                len,
                need,
            } => {
                if byte & 0xc0 != 0x80 {
                    self.decode = Decode::Ground;
                    return Step::Again;
                }
                bytes[usize::from(len)] = byte;
                let len = len + 1;
                if len < need {
                    self.decode = Decode::Utf8 { bytes, len, need };
                    return Step::Pending;
                }
                self.decode = Decode::Ground;
                // Overlong forms and surrogates fail here and are dropped.
                match std::str::from_utf8(&bytes[..usize::from(len)]) {
                    Ok(s) => s.chars().next().map_or(Step::Pending, char_key),
                    Err(_) => Step::Pending,
                }
            }
            Decode::Esc => match byte {
                b'[' => {
                    self.decode = Decode::Csi {
                        params: [0; MAX_CSI_PARAMS],
                        len: 0,
                    };
                    Step::Pending
                }
                b'O' => {
                    self.decode = Decode::Ss3;
                    Step::Pending
                }
                // Alt+key: the pair means nothing here and is dropped whole.
                0x20..=0x7f => {
                    self.decode = Decode::Ground;
                    Step::Pending
                }
                _ => {
                    self.decode = Decode::Ground;
                    Step::Again
                }
            },
            Decode::Csi { mut params, len } => match byte {
                0x20..=0x3f => {
                    if usize::from(len) < MAX_CSI_PARAMS {
                        params[usize::from(len)] = byte;
                        self.decode = Decode::Csi {
                            params,
                            len: len + 1,
                        };
                    } else {
                        self.decode = Decode::CsiSkip;
                    }
                    Step::Pending
                }
                0x40..=0x7e => {
                    self.decode = Decode::Ground;
                    csi_key(&params[..usize::from(len)], byte).map_or(Step::Pending, Step::Key)
                }
                _ => {
                    self.decode = Decode::Ground;
                    Step::Again
                }
            },
            Decode::CsiSkip => match byte {
                0x20..=0x3f => Step::Pending,
                0x40..=0x7e => {
                    self.decode = Decode::Ground;
                    Step::Pending
                }
                _ => {
                    self.decode = Decode::Ground;
                    Step::Again
                }
            },
            Decode::Ss3 => match byte {
                0x40..=0x7e => {
                    self.decode = Decode::Ground;
                    ss3_key(byte).map_or(Step::Pending, Step::Key)
                }
                _ => {
                    self.decode = Decode::Ground;
                    Step::Again
                }
            },
        }
    }

    /// Decodes a byte that starts something: a key, a UTF-8 lead byte or ESC.
    fn ground(&mut self, byte: u8) -> Step {
        let after_cr = std::mem::replace(&mut self.after_cr, false);
        let key = match byte {
            b'\r' => {
                self.after_cr = true;
                Key::Enter
            }
            b'\n' if after_cr => return Step::Pending,
            b'\n' => Key::Enter,
            0x01 => Key::Home,
            0x03 => Key::CtrlC,
            0x04 => Key::CtrlD,
            0x05 => Key::End,
            0x08 | 0x7f => Key::Backspace,
            0x09 => Key::Tab,
            0x0b => Key::KillAfter,
            0x0c => Key::Clear,
            0x15 => Key::KillBefore,
            0x17 => Key::KillWord,
            ESC => {
                self.decode = Decode::Esc;
                return Step::Pending;
            }
            0x20..=0x7e => Key::Char(char::from(byte)),
            0xc2..=0xf4 => {
                let need = match byte {
                    0xc2..=0xdf => 2,
                    0xe0..=0xef => 3,
                    _ => 4,
                };
                self.decode = Decode::Utf8 {
                    bytes: [byte, 0, 0, 0],
                    len: 1,
                    need,
                };
                return Step::Pending;
            }
            // Other control bytes, stray continuation bytes, bytes never
            // valid in UTF-8.
            _ => return Step::Pending,
        };
        Step::Key(key)
    }

    /// Carries out one key.
    fn apply(&mut self, key: Key, out: &mut Vec<u8>, events: &mut Vec<EditorEvent>) {
        match key {
            Key::Char(c) => {
                if self.input.len() + c.len_utf8() > MAX_INPUT {
                    self.bell = true;
                } else {
                    self.input.insert(self.cursor, c);
                    self.cursor += c.len_utf8();
                    self.dirty = true;
                }
            }
            Key::Enter => {
                self.flush(out);
                self.leave(out);
                let line = std::mem::take(&mut self.input);
                self.cursor = 0;
                self.browsing = None;
                self.draft.clear();
                if !line.is_empty() && self.history.back() != Some(&line) {
                    if self.history.len() == MAX_HISTORY {
                        self.history.pop_front();
                    }
                    self.history.push_back(line.clone());
                }
                // The fresh prompt, drawn like any (it may wrap too).
                self.redraw(out);
                events.push(EditorEvent::Line(line));
            }
            Key::CtrlC => self.close(EditorEvent::Interrupt, out, events),
            Key::CtrlD if self.input.is_empty() => self.close(EditorEvent::Eof, out, events),
            Key::CtrlD | Key::Delete => {
                if let Some(c) = self.input[self.cursor..].chars().next() {
                    self.input.drain(self.cursor..self.cursor + c.len_utf8());
                    self.dirty = true;
                }
            }
            Key::Backspace => {
                if let Some(c) = self.input[..self.cursor].chars().next_back() {
                    self.cursor -= c.len_utf8();
                    self.input.drain(self.cursor..self.cursor + c.len_utf8());
                    self.dirty = true;
                }
            }
            Key::KillBefore => {
                if self.cursor > 0 {
                    self.input.drain(..self.cursor);
                    self.cursor = 0;
                    self.dirty = true;
                }
            }
            Key::KillAfter => {
                if self.cursor < self.input.len() {
                    self.input.truncate(self.cursor);
                    self.dirty = true;
                }
            }
            Key::KillWord => {
                // The word before the cursor and the spaces after it, as a
                // shell's Ctrl+W.
                let before = &self.input[..self.cursor];
                let word_end = before.trim_end().len();
                let start = before[..word_end]
                    .rfind(char::is_whitespace)
                    .map_or(0, |i| {
                        i + before[i..].chars().next().map_or(1, char::len_utf8)
                    });
                if start < self.cursor {
                    self.input.drain(start..self.cursor);
                    self.cursor = start;
                    self.dirty = true;
                }
            }
            Key::Clear => {
                out.extend_from_slice(CLEAR_SCREEN);
                self.row = 0;
                self.dirty = true;
            }
            Key::Tab => self.complete(),
            Key::Left => {
                if let Some(c) = self.input[..self.cursor].chars().next_back() {
                    self.cursor -= c.len_utf8();
                    self.dirty = true;
                }
            }
            Key::Right => {
                if let Some(c) = self.input[self.cursor..].chars().next() {
                    self.cursor += c.len_utf8();
                    self.dirty = true;
                }
            }
            Key::Home => self.move_to(0),
            Key::End => self.move_to(self.input.len()),
            Key::Up => {
                let shown = match self.browsing {
                    None if !self.history.is_empty() => {
                        self.draft = std::mem::take(&mut self.input);
                        self.history.len() - 1
                    }
                    Some(i) if i > 0 => i - 1,
                    _ => return,
                };
                self.browsing = Some(shown);
                self.show_history(shown);
            }
            Key::Down => match self.browsing {
                Some(i) if i + 1 < self.history.len() => {
                    self.browsing = Some(i + 1);
                    self.show_history(i + 1);
                }
                Some(_) => {
                    self.browsing = None;
                    self.input = std::mem::take(&mut self.draft);
                    self.cursor = self.input.len();
                    self.dirty = true;
                }
                None => {}
            },
        }
    }

    /// Replaces the input with history entry `index`, cursor at its end.
    fn show_history(&mut self, index: usize) {
        if let Some(entry) = self.history.get(index) {
            self.input.clone_from(entry);
            self.cursor = self.input.len();
            self.dirty = true;
        }
    }

    fn move_to(&mut self, cursor: usize) {
        if self.cursor != cursor {
            self.cursor = cursor;
            self.dirty = true;
        }
    }

    /// Ends the input: the row is left as typed and the cursor goes to a
    /// fresh line for whatever the driver prints on its way out.
    fn close(&mut self, event: EditorEvent, out: &mut Vec<u8>, events: &mut Vec<EditorEvent>) {
        self.flush(out);
        self.leave(out);
        self.input.clear();
        self.cursor = 0;
        self.closed = true;
        events.push(event);
    }

    /// Writes what the keys so far left owing: the bell, then the redraw.
    fn flush(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.bell) {
            out.push(BEL);
        }
        if std::mem::take(&mut self.dirty) {
            self.redraw(out);
        }
    }
}

/// The key for a decoded character; control characters (C1 included) are
/// dropped.
fn char_key(c: char) -> Step {
    if c.is_control() {
        Step::Pending
    } else {
        Step::Key(Key::Char(c))
    }
}

/// The key for `ESC [ params final`, if it is one the editor knows. Keys with
/// modifiers (`ESC [ 1 ; 5 D`) are not known.
fn csi_key(params: &[u8], last: u8) -> Option<Key> {
    match (params, last) {
        (b"", b'A') => Some(Key::Up),
        (b"", b'B') => Some(Key::Down),
        (b"", b'C') => Some(Key::Right),
        (b"", b'D') => Some(Key::Left),
        (b"", b'H') | (b"1" | b"7", b'~') => Some(Key::Home),
        (b"", b'F') | (b"4" | b"8", b'~') => Some(Key::End),
        (b"3", b'~') => Some(Key::Delete),
        _ => None,
    }
}

/// The key for `ESC O final` (arrows in application cursor mode).
fn ss3_key(last: u8) -> Option<Key> {
    match last {
        b'A' => Some(Key::Up),
        b'B' => Some(Key::Down),
        b'C' => Some(Key::Right),
        b'D' => Some(Key::Left),
        b'H' => Some(Key::Home),
        b'F' => Some(Key::End),
        _ => None,
    }
}

/// Holds a terminal in raw-ish mode and puts the saved settings back when
/// dropped.
///
/// Drop does not run on `std::process::exit`, on `panic = "abort"` or when a
/// signal kills the process: a driver leaving that way calls
/// [`restore`](Self::restore) first. The guard does not own `fd`, which must
/// stay open while the guard lives.
#[derive(Debug)]
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// Puts the terminal `fd` into raw-ish mode: no line editing (`ICANON`),
    /// no echo (`ECHO`), no signal keys (`ISIG`, so Ctrl+C arrives as byte 3),
    /// no `IEXTEN`, no flow control (`IXON`), no input CR/NL translation
    /// (`ICRNL`, `INLCR`, `IGNCR`) and no eighth-bit stripping (`ISTRIP`,
    /// which would break UTF-8); reads return after one byte (`VMIN` 1,
    /// `VTIME` 0). Output post-processing (`OPOST`) stays on, so `"\n"`
    /// written still starts a new line at the left edge.
    ///
    /// Fails if `fd` is not a terminal.
    pub fn enable(fd: RawFd) -> io::Result<RawMode> {
        let saved = get_attr(fd)?;
        let mut raw = saved;
        raw.c_iflag &= !(libc::ICRNL | libc::INLCR | libc::IGNCR | libc::IXON | libc::ISTRIP);
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        set_attr(fd, &raw)?;
        Ok(RawMode { fd, saved })
    }

    /// Puts back the settings saved by [`enable`](Self::enable). Safe to call
    /// any number of times; an error is ignored because there is nothing left
    /// to do about it on the way out.
    pub fn restore(&self) {
        let _ = set_attr(self.fd, &self.saved);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The width in columns of the terminal `fd`, if it is one that says.
pub fn width(fd: RawFd) -> Option<usize> {
    let mut size = MaybeUninit::<libc::winsize>::uninit();
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which is
    // valid for that; on a descriptor that is no terminal it fails instead.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, size.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: the ioctl returned 0, so it filled in the whole struct.
    let size = unsafe { size.assume_init() };
    (size.ws_col > 0).then_some(usize::from(size.ws_col))
}

fn get_attr(fd: RawFd) -> io::Result<libc::termios> {
    let mut attr = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: `attr` is valid for writes of one `termios`; tcgetattr only
    // writes through the pointer, and an unknown fd makes it fail, not crash.
    if unsafe { libc::tcgetattr(fd, attr.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: tcgetattr returned 0, so it filled in the whole struct.
    Ok(unsafe { attr.assume_init() })
}

fn set_attr(fd: RawFd, attr: &libc::termios) -> io::Result<()> {
    loop {
        // SAFETY: `attr` points to a live, initialised `termios` that
        // tcsetattr only reads.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, attr) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMPT: &str = ">>> ";

    /// Feeds `bytes` and returns the events and the echoed bytes as text.
    fn feed(editor: &mut LineEditor, bytes: &[u8]) -> (Vec<EditorEvent>, String) {
        let mut out = Vec::new();
        let events = editor.feed(bytes, &mut out);
        (
            events,
            String::from_utf8(out).expect("editor output is UTF-8"),
        )
    }

    /// The redraw the editor must emit for `input` (on one row) with `after`
    /// the part of it behind the cursor.
    fn redraw_of(input: &str, after: &str) -> String {
        use unicode_width::UnicodeWidthStr;
        let mv = if after.is_empty() {
            String::new()
        } else {
            let col = PROMPT.width() + input.width() - after.width();
            format!("\r\x1b[{col}C")
        };
        format!("\r\x1b[J{PROMPT}{input}{mv}")
    }

    fn line(s: &str) -> EditorEvent {
        EditorEvent::Line(s.to_string())
    }

    /// An editor holding `input` with the cursor `left` chars from the end.
    fn editor_with(input: &str, left: usize) -> LineEditor {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, input.as_bytes());
        for _ in 0..left {
            feed(&mut editor, b"\x1b[D");
        }
        editor
    }

    #[test]
    fn redraw_at_start_shows_prompt() {
        let mut editor = LineEditor::new(PROMPT);
        let mut out = Vec::new();
        editor.redraw(&mut out);
        assert_eq!(out, b"\r\x1b[J>>> ");
    }

    #[test]
    fn typing_inserts_and_redraws_once_per_feed() {
        let mut editor = LineEditor::new(PROMPT);
        let (events, out) = feed(&mut editor, "héllo 世界".as_bytes());
        assert!(events.is_empty());
        assert_eq!(editor.input(), "héllo 世界");
        assert_eq!(out, redraw_of("héllo 世界", ""));
    }

    #[test]
    fn enter_emits_line_and_fresh_prompt() {
        for enter in [b'\r', b'\n'] {
            let mut editor = LineEditor::new(PROMPT);
            let (events, out) = feed(&mut editor, &[b'h', b'i', enter]);
            assert_eq!(events, [line("hi")]);
            assert_eq!(
                out,
                format!("{}\r\n{}", redraw_of("hi", ""), redraw_of("", ""))
            );
            assert_eq!(editor.input(), "");
        }
    }

    #[test]
    fn enter_with_cursor_mid_line_sends_whole_line() {
        let mut editor = editor_with("send bob hi", 3);
        let (events, _) = feed(&mut editor, b"\r");
        assert_eq!(events, [line("send bob hi")]);
    }

    #[test]
    fn crlf_is_one_enter_but_two_crs_are_two() {
        let mut editor = LineEditor::new(PROMPT);
        let (events, _) = feed(&mut editor, b"a\r\nb\r");
        assert_eq!(events, [line("a"), line("b")]);
        // Split across feeds, the LF is still swallowed.
        let (events, _) = feed(&mut editor, b"\nc\n\n");
        assert_eq!(events, [line("c"), line("")]);
        let (events, _) = feed(&mut editor, b"\r\r");
        assert_eq!(events, [line(""), line("")]);
    }

    #[test]
    fn several_lines_in_one_feed_come_in_order() {
        let mut editor = LineEditor::new(PROMPT);
        let (events, out) = feed(&mut editor, b"one\rtwo\rthr");
        assert_eq!(events, [line("one"), line("two")]);
        assert_eq!(editor.input(), "thr");
        let expected = format!(
            "{}\r\n{}{}\r\n{}{}",
            redraw_of("one", ""),
            redraw_of("", ""),
            redraw_of("two", ""),
            redraw_of("", ""),
            redraw_of("thr", "")
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn backspace_both_codes_remove_whole_chars() {
        for bs in [0x7f, 0x08] {
            let mut editor = LineEditor::new(PROMPT);
            feed(&mut editor, "a世🙂".as_bytes());
            let (_, out) = feed(&mut editor, &[bs]);
            assert_eq!(editor.input(), "a世");
            assert_eq!(out, redraw_of("a世", ""));
            feed(&mut editor, &[bs, bs]);
            assert_eq!(editor.input(), "");
            let (_, out) = feed(&mut editor, &[bs]);
            assert_eq!(out, "", "backspace on an empty line changes nothing");
        }
    }

    #[test]
    fn backspace_mid_line_removes_char_before_cursor() {
        let mut editor = editor_with("abcd", 1);
        let (_, out) = feed(&mut editor, b"\x7f");
        assert_eq!(editor.input(), "abd");
        assert_eq!(out, redraw_of("abd", "d"));
    }

    #[test]
    fn ctrl_u_kills_before_cursor() {
        let mut editor = editor_with("hello world", 5);
        let (_, out) = feed(&mut editor, b"\x15");
        assert_eq!(editor.input(), "world");
        assert_eq!(out, redraw_of("world", "world"));
        let (_, out) = feed(&mut editor, b"\x15");
        assert_eq!(out, "", "nothing before the cursor to kill");
    }

    #[test]
    fn left_right_move_and_insert_in_the_middle() {
        for (left, right) in [(&b"\x1b[D"[..], &b"\x1b[C"[..]), (b"\x1bOD", b"\x1bOC")] {
            let mut editor = LineEditor::new(PROMPT);
            feed(&mut editor, "a世b".as_bytes());
            let (_, out) = feed(&mut editor, left);
            assert_eq!(out, redraw_of("a世b", "b"));
            let (_, out) = feed(&mut editor, left);
            assert_eq!(out, redraw_of("a世b", "世b"));
            feed(&mut editor, b"X");
            assert_eq!(editor.input(), "aX世b");
            feed(&mut editor, right);
            feed(&mut editor, b"Y");
            assert_eq!(editor.input(), "aX世Yb");
            feed(&mut editor, right);
            let (_, out) = feed(&mut editor, right);
            assert_eq!(out, "", "right at the end changes nothing");
            for _ in 0..6 {
                feed(&mut editor, left);
            }
            let (_, out) = feed(&mut editor, left);
            assert_eq!(out, "", "left at the start changes nothing");
            feed(&mut editor, b"Z");
            assert_eq!(editor.input(), "ZaX世Yb");
        }
    }

    #[test]
    fn home_and_end_in_every_spelling() {
        let homes: [&[u8]; 5] = [b"\x1b[H", b"\x01", b"\x1bOH", b"\x1b[1~", b"\x1b[7~"];
        let ends: [&[u8]; 5] = [b"\x1b[F", b"\x05", b"\x1bOF", b"\x1b[4~", b"\x1b[8~"];
        for (home, end) in homes.into_iter().zip(ends) {
            let mut editor = LineEditor::new(PROMPT);
            feed(&mut editor, "ab世".as_bytes());
            let (_, out) = feed(&mut editor, home);
            assert_eq!(out, redraw_of("ab世", "ab世"));
            feed(&mut editor, b"<");
            let (_, out) = feed(&mut editor, end);
            assert_eq!(out, redraw_of("<ab世", ""));
            feed(&mut editor, b">");
            assert_eq!(editor.input(), "<ab世>");
        }
    }

    #[test]
    fn delete_removes_char_under_cursor() {
        let mut editor = editor_with("a世b", 2);
        let (_, out) = feed(&mut editor, b"\x1b[3~");
        assert_eq!(editor.input(), "ab");
        assert_eq!(out, redraw_of("ab", "b"));
        feed(&mut editor, b"\x1b[3~");
        let (_, out) = feed(&mut editor, b"\x1b[3~");
        assert_eq!(editor.input(), "a");
        assert_eq!(out, "", "delete at the end changes nothing");
    }

    #[test]
    fn ctrl_d_deletes_on_a_non_empty_line() {
        let mut editor = editor_with("abc", 2);
        let (events, _) = feed(&mut editor, b"\x04");
        assert!(events.is_empty());
        assert_eq!(editor.input(), "ac");
        feed(&mut editor, b"\x05");
        let (events, out) = feed(&mut editor, b"\x04");
        assert!(events.is_empty(), "Ctrl+D at the end of a line is not EOF");
        assert_eq!(out, "");
        assert!(!editor.is_closed());
    }

    #[test]
    fn ctrl_d_on_empty_line_is_eof_and_closes() {
        let mut editor = LineEditor::new(PROMPT);
        let (events, out) = feed(&mut editor, b"x\x7f\x04more\r");
        assert_eq!(events, [EditorEvent::Eof]);
        assert_eq!(out, format!("{}\r\n", redraw_of("", "")));
        assert!(editor.is_closed());
        let (events, out) = feed(&mut editor, b"late\r");
        assert!(events.is_empty());
        assert_eq!(out, "");
    }

    #[test]
    fn ctrl_c_interrupts_with_text_typed() {
        let mut editor = LineEditor::new(PROMPT);
        let (events, out) = feed(&mut editor, b"half\x03rest\r");
        assert_eq!(events, [EditorEvent::Interrupt]);
        assert_eq!(out, format!("{}\r\n", redraw_of("half", "")));
        assert!(editor.is_closed());
        assert_eq!(editor.input(), "");
    }

    #[test]
    fn closed_editor_prints_lines_without_prompt() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, b"\x03");
        let mut out = Vec::new();
        editor.print_above(">>> [You are Offline. Bye.]", &mut out);
        assert_eq!(out, b">>> [You are Offline. Bye.]\r\n");
        out.clear();
        editor.redraw(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn history_up_down_keeps_the_draft() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, b"first\rsecond\rdraft");
        let (_, out) = feed(&mut editor, b"\x1b[A");
        assert_eq!(editor.input(), "second");
        assert_eq!(out, redraw_of("second", ""));
        feed(&mut editor, b"\x1b[A");
        assert_eq!(editor.input(), "first");
        let (_, out) = feed(&mut editor, b"\x1b[A");
        assert_eq!(editor.input(), "first");
        assert_eq!(out, "", "up at the oldest entry changes nothing");
        feed(&mut editor, b"\x1bOB");
        assert_eq!(editor.input(), "second");
        let (_, out) = feed(&mut editor, b"\x1b[B");
        assert_eq!(editor.input(), "draft");
        assert_eq!(out, redraw_of("draft", ""));
        let (_, out) = feed(&mut editor, b"\x1b[B");
        assert_eq!(out, "", "down past the draft changes nothing");
        assert_eq!(editor.input(), "draft");
    }

    #[test]
    fn recalled_line_can_be_edited_and_sent() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, b"send bob hi\r");
        let (events, _) = feed(&mut editor, b"\x1bOA!\r");
        assert_eq!(events, [line("send bob hi!")]);
        // The edit is a new entry; the one it came from is unchanged.
        feed(&mut editor, b"\x1b[A\x1b[A");
        assert_eq!(editor.input(), "send bob hi");
        // Enter ends browsing: Up starts again from the newest entry.
        feed(&mut editor, b"\x15\r\x1b[A");
        assert_eq!(editor.input(), "send bob hi!");
    }

    #[test]
    fn history_skips_empty_and_repeated_lines() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, b"a\r\ra\rb\ra\r");
        let mut seen = Vec::new();
        for _ in 0..5 {
            feed(&mut editor, b"\x1b[A");
            seen.push(editor.input().to_string());
        }
        assert_eq!(seen, ["a", "b", "a", "a", "a"]);
    }

    #[test]
    fn history_with_empty_input_and_nothing_stored() {
        let mut editor = LineEditor::new(PROMPT);
        let (_, out) = feed(&mut editor, b"\x1b[A\x1b[B");
        assert_eq!(out, "");
        assert_eq!(editor.input(), "");
    }

    #[test]
    fn history_keeps_the_newest_hundred() {
        let mut editor = LineEditor::new(PROMPT);
        let total = MAX_HISTORY + 5;
        for i in 0..total {
            feed(&mut editor, format!("line {i}\r").as_bytes());
        }
        for _ in 0..total {
            feed(&mut editor, b"\x1b[A");
        }
        assert_eq!(editor.input(), format!("line {}", total - MAX_HISTORY));
    }

    #[test]
    fn utf8_split_across_feeds() {
        let mut editor = LineEditor::new(PROMPT);
        let text = "世🙂é";
        for &b in text.as_bytes() {
            feed(&mut editor, &[b]);
        }
        assert_eq!(editor.input(), text);
        let bytes = "🙂".as_bytes();
        let (_, out) = feed(&mut editor, &bytes[..3]);
        assert_eq!(out, "", "half a character draws nothing");
        feed(&mut editor, &bytes[3..]);
        assert_eq!(editor.input(), "世🙂é🙂");
    }

    #[test]
    fn escape_split_across_feeds() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, b"ab");
        feed(&mut editor, b"\x1b");
        feed(&mut editor, b"[");
        feed(&mut editor, b"D");
        feed(&mut editor, b"\x1b[3");
        feed(&mut editor, b"~");
        assert_eq!(editor.input(), "a");
        feed(&mut editor, b"\x1bO");
        feed(&mut editor, b"H");
        feed(&mut editor, b"X");
        assert_eq!(editor.input(), "Xa");
    }

    #[test]
    fn unknown_escapes_are_ignored_whole() {
        let unknown: [&[u8]; 8] = [
            b"\x1b[1;5D",  // Ctrl+Left
            b"\x1b[200~",  // bracketed paste start
            b"\x1b[15~",   // F5
            b"\x1bOP",     // F1
            b"\x1bx",      // Alt+x
            b"\x1b[?25h",  // private mode
            b"\x1b[Z",     // Shift+Tab
            b"\x1b\x1b[C", // ESC then Right: the first ESC is dropped
        ];
        for seq in unknown {
            let mut editor = LineEditor::new(PROMPT);
            feed(&mut editor, b"ab\x1b[D");
            feed(&mut editor, seq);
            feed(&mut editor, b"!");
            let expected = if seq == b"\x1b\x1b[C" { "ab!" } else { "a!b" };
            assert_eq!(editor.input(), expected, "after {seq:?}");
        }
    }

    #[test]
    fn overlong_escape_is_dropped_to_its_end() {
        let mut editor = LineEditor::new(PROMPT);
        let mut seq = b"\x1b[".to_vec();
        seq.extend(std::iter::repeat_n(b'1', 40));
        seq.push(b'D');
        feed(&mut editor, b"ab");
        let (_, out) = feed(&mut editor, &seq);
        assert_eq!(out, "");
        feed(&mut editor, b"c");
        assert_eq!(editor.input(), "abc");
    }

    #[test]
    fn escape_broken_by_a_control_byte_lets_it_through() {
        let mut editor = LineEditor::new(PROMPT);
        let (events, _) = feed(&mut editor, b"hi\x1b\r");
        assert_eq!(events, [line("hi")]);
        let (events, _) = feed(&mut editor, b"yo\x1b[1\r");
        assert_eq!(events, [line("yo")]);
        let (events, _) = feed(&mut editor, b"\x1bO\x03");
        assert_eq!(events, [EditorEvent::Interrupt]);
    }

    #[test]
    fn escape_broken_by_utf8_keeps_the_character() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, "\x1b世".as_bytes());
        assert_eq!(editor.input(), "世");
    }

    #[test]
    fn invalid_utf8_is_dropped() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, b"\xff\xfe\x80a");
        feed(&mut editor, b"\xc0\xafb"); // overlong '/'
        feed(&mut editor, b"\xed\xa0\x80c"); // surrogate
        feed(&mut editor, b"\xe4\xb8d"); // truncated, then ASCII
        feed(&mut editor, b"\xc2\x9be"); // C1 control U+009B
        assert_eq!(editor.input(), "abcde");
    }

    #[test]
    fn other_control_bytes_are_ignored() {
        let mut editor = LineEditor::new(PROMPT);
        let controls: Vec<u8> = (0u8..0x20)
            .filter(|b| {
                ![
                    0x01, 0x03, 0x04, 0x05, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x15, 0x17, 0x1b,
                ]
                .contains(b)
            })
            .collect();
        feed(&mut editor, b"ab");
        let (events, out) = feed(&mut editor, &controls);
        assert!(events.is_empty());
        assert_eq!(out, "");
        assert_eq!(editor.input(), "ab");
    }

    #[test]
    fn input_is_capped_with_a_bell() {
        let mut editor = LineEditor::new(PROMPT);
        let full = "a".repeat(MAX_INPUT - 1);
        let (_, out) = feed(&mut editor, full.as_bytes());
        assert!(!out.contains('\x07'));
        // A 3-byte character no longer fits in the one byte left.
        let (_, out) = feed(&mut editor, "世".as_bytes());
        assert_eq!(out, "\x07");
        let (_, out) = feed(&mut editor, b"bcd");
        // The bell, then the input (many rows) drawn again with the b.
        assert!(out.starts_with('\x07'), "{out:?}");
        assert!(out.ends_with(&format!("{full}b")), "{out:?}");
        assert_eq!(editor.input().len(), MAX_INPUT);
        let (events, _) = feed(&mut editor, b"\r");
        assert_eq!(events, [line(&format!("{full}b"))]);
    }

    #[test]
    fn print_above_keeps_input_and_cursor() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, "a世界🙂b".as_bytes());
        for _ in 0..3 {
            feed(&mut editor, b"\x1b[D");
        }
        let mut out = Vec::new();
        editor.print_above(">>> bob: 你好", &mut out);
        // The cursor after ">>> a世": 4 + 1 + 2 columns.
        let expected = "\r\x1b[J>>> bob: 你好\r\n\r\x1b[J>>> a世界🙂b\r\x1b[7C";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        // Typing carries on where the cursor was.
        feed(&mut editor, b"-");
        assert_eq!(editor.input(), "a世-界🙂b");
    }

    #[test]
    fn print_above_with_cursor_at_end_does_not_move_back() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, b"send");
        let mut out = Vec::new();
        editor.print_above(">>> [Client table updated.]", &mut out);
        assert_eq!(
            out,
            b"\r\x1b[J>>> [Client table updated.]\r\n\r\x1b[J>>> send"
        );
    }

    #[test]
    fn print_above_defuses_control_characters() {
        let mut editor = LineEditor::new(PROMPT);
        let mut out = Vec::new();
        editor.print_above(">>> eve: \x1b[2J\r\nx\u{9b}", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "\r\x1b[J>>> eve: \u{fffd}[2J\u{fffd}\u{fffd}x\u{fffd}\r\n\r\x1b[J>>> "
        );
    }

    fn nz(n: u16) -> std::num::NonZeroU16 {
        std::num::NonZeroU16::new(n).expect("not zero")
    }

    /// A terminal model (`vt100`, what xterm does with the bytes) `cols`
    /// wide and tall enough never to scroll, showing an editor.
    struct Screen {
        parser: vt100::Parser,
        editor: LineEditor,
        cols: u16,
        /// The lines printed above the prompt so far.
        printed: Vec<String>,
    }

    impl Screen {
        fn new(cols: u16) -> Screen {
            let mut editor = LineEditor::new(PROMPT);
            let mut out = Vec::new();
            editor.set_width(usize::from(cols), &mut out);
            editor.redraw(&mut out);
            let mut parser = vt100::Parser::new(nz(400), nz(cols), 0);
            parser.process(&out);
            Screen {
                parser,
                editor,
                cols,
                printed: Vec::new(),
            }
        }

        fn keys(&mut self, bytes: &[u8]) -> Vec<EditorEvent> {
            let mut out = Vec::new();
            let events = self.editor.feed(bytes, &mut out);
            self.parser.process(&out);
            // A line sent stays on the screen above the new prompt.
            for event in &events {
                if let EditorEvent::Line(line) = event {
                    self.printed.push(format!("{PROMPT}{line}"));
                }
            }
            events
        }

        fn print(&mut self, line: &str) {
            let mut out = Vec::new();
            self.editor.print_above(line, &mut out);
            self.parser.process(&out);
            self.printed.push(line.to_string());
        }

        fn resize(&mut self, cols: u16) {
            self.cols = cols;
            self.parser.screen_mut().set_size(nz(400), nz(cols));
            let mut out = Vec::new();
            self.editor.set_width(usize::from(cols), &mut out);
            self.parser.process(&out);
        }

        /// The screen's rows, trailing blanks and blank rows at the end cut.
        fn rows(&self) -> Vec<String> {
            let mut rows: Vec<String> = self
                .parser
                .screen()
                .rows(0, self.cols)
                .map(|r| r.trim_end().to_string())
                .collect();
            while rows.last().is_some_and(String::is_empty) {
                rows.pop();
            }
            rows
        }

        /// `text` as a terminal `cols` wide wraps it: rows of whole
        /// characters, a wide one that does not fit going to the next row.
        fn wrap(&self, text: &str) -> Vec<String> {
            use unicode_width::UnicodeWidthChar;
            let mut rows = vec![String::new()];
            let mut col = 0;
            for c in text.chars() {
                let w = c.width().unwrap_or(0);
                if col + w > usize::from(self.cols) {
                    rows.push(String::new());
                    col = 0;
                }
                rows.last_mut().unwrap().push(c);
                col += w;
            }
            rows
        }

        /// Asserts the screen shows every printed line, then the prompt and
        /// the input, each wrapped, and the cursor at the input's cursor.
        #[track_caller]
        fn assert_intact(&self) {
            let mut want: Vec<String> = Vec::new();
            for line in &self.printed {
                want.extend(self.wrap(line));
            }
            let edit = self.wrap(&format!("{PROMPT}{}", self.editor.input()));
            let top = want.len();
            want.extend(edit);
            let rows = self.rows();
            let got: Vec<&str> = rows.iter().map(|r| r.as_str()).collect();
            let want_trimmed: Vec<String> = want.iter().map(|r| r.trim_end().to_string()).collect();
            let mut want_rows: Vec<&str> = want_trimmed.iter().map(|r| r.as_str()).collect();
            while want_rows.last().is_some_and(|r| r.is_empty()) {
                want_rows.pop();
            }
            assert_eq!(got, want_rows, "the screen at width {}", self.cols);
            // The cursor: after the prompt and the input before it.
            let before = format!("{PROMPT}{}", &self.editor.input()[..self.editor.cursor]);
            let wrapped = self.wrap(&before);
            let mut row = top + wrapped.len() - 1;
            let mut col = {
                use unicode_width::UnicodeWidthStr;
                wrapped.last().unwrap().width()
            };
            if col == usize::from(self.cols) {
                (row, col) = (row + 1, 0);
            }
            let (r, c) = self.parser.screen().cursor_position();
            assert_eq!(
                (usize::from(r), usize::from(c)),
                (row, col),
                "the cursor at width {}",
                self.cols
            );
        }
    }

    #[test]
    fn a_long_input_wraps_and_lines_arriving_leave_it_intact() {
        let mut screen = Screen::new(40);
        // 300 characters: eight rows at 40 columns, typed in bits while
        // messages arrive.
        let text: String = (0..300)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        for (k, chunk) in text.as_bytes().chunks(37).enumerate() {
            screen.keys(chunk);
            screen.assert_intact();
            screen.print(&format!(
                ">>> Bob: message {k}, long enough to wrap past the forty columns"
            ));
            screen.assert_intact();
        }
        assert_eq!(screen.editor.input(), text);
        // Backspace across a row boundary, Left into an upper row, typing
        // there, and the whole line on Enter.
        for _ in 0..40 {
            screen.keys(b"\x7f");
            screen.assert_intact();
        }
        for _ in 0..50 {
            screen.keys(b"\x1b[D");
        }
        screen.assert_intact();
        screen.keys(b"XYZ");
        screen.print(">>> [Client table updated.]");
        screen.assert_intact();
        let events = screen.keys(b"\r");
        assert_eq!(events.len(), 1);
        screen.assert_intact();
    }

    #[test]
    fn an_input_that_fills_its_rows_exactly_keeps_the_cursor_right() {
        for cols in [20u16, 21] {
            let mut screen = Screen::new(cols);
            // The prompt and input fill the row to its last column.
            let fill = "x".repeat(usize::from(cols) - PROMPT.len());
            screen.keys(fill.as_bytes());
            screen.assert_intact();
            screen.print(">>> hello");
            screen.assert_intact();
            screen.keys(b"y");
            screen.assert_intact();
            screen.keys(b"\x7f\x7f");
            screen.assert_intact();
        }
    }

    #[test]
    fn wide_characters_that_do_not_fit_go_to_the_next_row() {
        let mut screen = Screen::new(11);
        // ">>> " + "ab" + "世界你" = 4 + 2 + 6 = 12 columns: the last wide
        // character does not fit the 11th column and wraps.
        screen.keys("ab世界你好🙂x".as_bytes());
        screen.assert_intact();
        screen.print(">>> 你好你好你好");
        screen.assert_intact();
        for _ in 0..4 {
            screen.keys(b"\x1b[D");
            screen.assert_intact();
        }
        screen.keys("中".as_bytes());
        screen.assert_intact();
    }

    #[test]
    fn recalled_long_entries_and_kills_redraw_every_row() {
        let mut screen = Screen::new(30);
        let long = "send Bob ".to_string() + &"z".repeat(100);
        screen.keys(format!("{long}\rshort").as_bytes());
        screen.assert_intact();
        screen.keys(b"\x1b[A");
        assert_eq!(screen.editor.input(), long);
        screen.assert_intact();
        screen.keys(b"\x1b[B");
        assert_eq!(screen.editor.input(), "short");
        screen.assert_intact();
        screen.keys(b"\x1b[A\x1b[D\x1b[D");
        // Ctrl+U from the middle of a long line, then Ctrl+K, Ctrl+W.
        screen.keys(b"\x15");
        assert_eq!(screen.editor.input(), "zz");
        screen.assert_intact();
        screen.keys(b"\x05\x15");
        screen.keys(long.as_bytes());
        screen.keys(b"\x01\x1b[C\x1b[C\x1b[C\x1b[C\x0b");
        assert_eq!(screen.editor.input(), "send");
        screen.assert_intact();
        screen.keys(b" to Bob  \x17");
        assert_eq!(screen.editor.input(), "send to ");
        screen.assert_intact();
        screen.keys(b"\x17\x17\x17");
        assert_eq!(screen.editor.input(), "");
        screen.assert_intact();
    }

    #[test]
    fn any_mix_of_keys_and_lines_leaves_the_screen_intact() {
        // A small seeded generator: the same runs every time.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let pieces: [&[u8]; 14] = [
            b"a",
            b"word ",
            "世".as_bytes(),
            "🙂".as_bytes(),
            b"\x1b[D",
            b"\x1b[C",
            b"\x01",
            b"\x05",
            b"\x7f",
            b"\x1b[3~",
            b"\x15",
            b"\x0b",
            b"\x17",
            b"\x1b[A",
        ];
        for run in 0..60 {
            let cols = 7 + next(50) as u16;
            let mut screen = Screen::new(cols);
            for step in 0..150 {
                match next(20) {
                    0 => screen.print(&format!(">>> Bob: {}", "m".repeat(next(90) as usize))),
                    1 if run % 3 == 0 => {
                        screen.keys(b"\r");
                    }
                    _ => {
                        let piece = pieces[next(pieces.len() as u64) as usize];
                        for _ in 0..1 + next(4) {
                            screen.keys(piece);
                        }
                    }
                }
                if step % 5 == 0 {
                    screen.assert_intact();
                }
            }
            screen.assert_intact();
        }
    }

    #[test]
    fn tab_completes_commands_then_names() {
        let mut editor = LineEditor::new(PROMPT);
        let names = ["Alice", "Albert", "Bob", "李雷"]
            .map(String::from)
            .to_vec();
        editor.set_completions(&["send", "send_all", "dereg", "reg", "list"], names);
        // A whole command, and a space after it.
        feed(&mut editor, b"li\t");
        assert_eq!(editor.input(), "list ");
        feed(&mut editor, b"\x15");
        // "send" and "send_all" share "send": that much, no space, then
        // the rest once it is told apart.
        feed(&mut editor, b"se\t");
        assert_eq!(editor.input(), "send");
        feed(&mut editor, b" B\t");
        assert_eq!(editor.input(), "send Bob ");
        feed(&mut editor, b"\x15send Al\t");
        assert_eq!(editor.input(), "send Al");
        feed(&mut editor, b"i\t");
        assert_eq!(editor.input(), "send Alice ");
        feed(&mut editor, "\x15dereg 李\t".as_bytes());
        assert_eq!(editor.input(), "dereg 李雷 ");
        // Nothing to add: a bell, the input as it was.
        feed(&mut editor, b"\x15send Zed");
        let (_, out) = feed(&mut editor, b"\t");
        assert_eq!(out, "\x07");
        assert_eq!(editor.input(), "send Zed");
    }

    #[test]
    fn ctrl_w_erases_one_word_and_the_spaces_after_it() {
        let mut editor = LineEditor::new(PROMPT);
        feed(&mut editor, "send Bob 你好 there  ".as_bytes());
        feed(&mut editor, b"\x17");
        assert_eq!(editor.input(), "send Bob 你好 ");
        feed(&mut editor, b"\x17");
        assert_eq!(editor.input(), "send Bob ");
        // From the middle: only what is before the cursor.
        feed(&mut editor, b"x\x1b[D\x17");
        assert_eq!(editor.input(), "send x");
        feed(&mut editor, b"\x01");
        let (_, out) = feed(&mut editor, b"\x17");
        assert_eq!(out, "", "nothing before the cursor to erase");
    }

    #[test]
    fn ctrl_l_clears_the_screen_and_keeps_the_input() {
        let mut screen = Screen::new(30);
        screen.print(">>> old line");
        screen.keys(b"typing");
        screen.keys(b"\x0c");
        screen.printed.clear();
        screen.assert_intact();
        assert_eq!(screen.rows(), [">>> typing"]);
    }

    #[test]
    fn a_resize_never_erases_the_lines_printed_above() {
        // The model, like xterm, does not reflow: the rows stay as drawn.
        for (from, to) in [(60u16, 25u16), (25, 60)] {
            let mut screen = Screen::new(from);
            for k in 0..4 {
                screen.print(&format!(">>> Bob: line {k}"));
            }
            screen.keys("x".repeat(100).as_bytes());
            screen.keys(b"\x1b[D\x1b[D");
            screen.assert_intact();
            screen.resize(to);
            let rows = screen.rows();
            for k in 0..4 {
                let line = format!(">>> Bob: line {k}");
                assert!(
                    rows.contains(&line),
                    "{line} erased at {from}->{to}: {rows:#?}"
                );
            }
            // From now on the input is laid out for the new width.
            screen.print(">>> after the resize");
            let rows = screen.rows();
            let at = rows
                .iter()
                .rposition(|r| r == ">>> after the resize")
                .expect("the line printed after the resize");
            let edit: Vec<String> = rows[at + 1..].to_vec();
            assert_eq!(edit, screen.wrap(&format!("{PROMPT}{}", "x".repeat(100))));
            screen.keys(b"yy");
            assert_eq!(
                screen.editor.input(),
                format!("{}yy{}", "x".repeat(98), "xx")
            );
        }
    }

    #[test]
    fn a_prompt_wider_than_the_terminal_still_redraws_right() {
        for cols in 2u16..=5 {
            let mut screen = Screen::new(cols);
            screen.assert_intact();
            screen.keys(b"ab");
            screen.assert_intact();
            screen.print(">>> hi");
            screen.assert_intact();
            screen.keys(b"\r");
            screen.assert_intact();
            screen.keys(b"c\x1b[D");
            screen.print(">>> there");
            screen.assert_intact();
        }
    }

    /// A pseudo-terminal pair: (master, slave).
    fn pty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: the two out-pointers are valid; null name, termios and
        // winsize ask for none of those.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: openpty succeeded, so both are fresh fds nobody else owns.
        unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(master),
                std::os::fd::OwnedFd::from_raw_fd(slave),
            )
        }
    }

    /// Reads exactly `n` bytes from `fd`, failing the test if they take more
    /// than five seconds to come.
    fn read_n(fd: RawFd, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(ready, 1, "no data within 5 s, got {got:?}");
            let mut buf = [0u8; 64];
            // SAFETY: `buf` is valid for writes of its length.
            let len = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            assert!(len > 0, "read: {}", io::Error::last_os_error());
            got.extend_from_slice(&buf[..len as usize]);
        }
        got
    }

    fn write_all(fd: RawFd, bytes: &[u8]) {
        // SAFETY: `bytes` is valid for reads of its length.
        let len = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(len, bytes.len() as isize);
    }

    #[test]
    fn raw_mode_sets_flags_and_drop_restores_them() {
        use std::os::fd::AsRawFd;
        let (_master, slave) = pty();
        let fd = slave.as_raw_fd();
        let before = get_attr(fd).unwrap();
        assert_ne!(
            before.c_lflag & libc::ICANON,
            0,
            "a new pty starts canonical"
        );
        {
            let guard = RawMode::enable(fd).unwrap();
            let raw = get_attr(fd).unwrap();
            for flag in [libc::ICANON, libc::ECHO, libc::ISIG, libc::IEXTEN] {
                assert_eq!(raw.c_lflag & flag, 0, "lflag {flag:#x} still set");
            }
            for flag in [libc::IXON, libc::ICRNL, libc::INLCR, libc::IGNCR] {
                assert_eq!(raw.c_iflag & flag, 0, "iflag {flag:#x} still set");
            }
            assert_ne!(raw.c_oflag & libc::OPOST, 0, "OPOST must stay on");
            assert_eq!(raw.c_cc[libc::VMIN], 1);
            assert_eq!(raw.c_cc[libc::VTIME], 0);
            // Calling restore early and then dropping is fine.
            guard.restore();
            assert_eq!(get_attr(fd).unwrap().c_lflag, before.c_lflag);
        }
        let after = get_attr(fd).unwrap();
        assert_eq!(after.c_lflag, before.c_lflag);
        assert_eq!(after.c_iflag, before.c_iflag);
        assert_eq!(after.c_oflag, before.c_oflag);
        assert_eq!(after.c_cc, before.c_cc);
    }

    #[test]
    fn raw_mode_passes_keys_through_and_keeps_output_processing() {
        use std::os::fd::AsRawFd;
        let (master, slave) = pty();
        let _guard = RawMode::enable(slave.as_raw_fd()).unwrap();
        // Ctrl+C, Enter and Ctrl+S reach the program as plain bytes.
        write_all(master.as_raw_fd(), b"\x03\r\x13");
        assert_eq!(read_n(slave.as_raw_fd(), 3), b"\x03\r\x13");
        // OPOST is on: a bare "\n" written becomes "\r\n" on the screen.
        write_all(slave.as_raw_fd(), b"x\n");
        assert_eq!(read_n(master.as_raw_fd(), 3), b"x\r\n");
    }

    #[test]
    fn raw_mode_refuses_what_is_not_a_terminal() {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = RawMode::enable(file.as_raw_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
    }
}
