//! Key files and the known-servers file: the only long-lived state a client
//! keeps, and the server's identity across restarts.
//!
//! A key file *is* an identity: losing it or replacing it silently would make
//! a user someone else, so nothing here ever overwrites, truncates, renames or
//! deletes an existing key file. Anything wrong with one is reported as one
//! line saying what to do, and left for the operator to decide. The files are
//! text, so an operator who finds one knows what it is.
//!
//! The known-servers file pins each server's key the first time it is met
//! (trust on first use, as SSH's `known_hosts`): after that, a different key
//! at that address is an attacker or a reinstalled server, and only the user
//! can tell which.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::Fatal;
use crate::crypto::{KEY_LEN, Keypair, PublicKey, unhex};
use crate::wire::Name;

/// The first line of every key file: whoever opens it learns what it is and
/// that it must not be shared.
const KEY_HEADER: &str =
    "# udpchat static key (X25519). Keep it secret: whoever holds this file is this user.";

/// The first line of a known-servers file, so that whoever opens it knows
/// how to accept a server's new key deliberately.
const KNOWN_HEADER: &str = "# udpchat: the key each server presented the first time \
                            (as ssh's known_hosts). Delete a line to accept a server's new key.";

/// A real key file is under 300 bytes; reading is capped so that pointing
/// `--key` at something huge fails fast instead of filling memory.
const MAX_KEY_FILE: u64 = 4096;

/// The name of the file beside the key file.
const KNOWN_SERVERS: &str = "known_servers";

/// Where a client keeps its key when `--key` names none.
pub fn default_key_path(name: &Name) -> Result<PathBuf, Fatal> {
    key_path_from(name, |k| std::env::var_os(k))
}

/// [`default_key_path`] with the environment passed in, so tests need not
/// mutate the process-global environment (which races with other threads).
///
/// An empty `XDG_CONFIG_HOME`, or a relative one, counts as unset: the XDG
/// Base Directory spec says to ignore both, and a relative one would put the
/// key wherever the client happened to be started.
pub fn key_path_from(
    name: &Name,
    var: impl Fn(&str) -> Option<OsString>,
) -> Result<PathBuf, Fatal> {
    // A name may contain '/', which would turn the file name into a path
    // (another directory, or `..` out of this one).
    if name.as_str().contains('/') {
        return Err(Fatal(format!(
            "error: the name {name} contains '/', so it cannot name a key file; \
             choose one with --key FILE"
        )));
    }
    let set = |key: &str| var(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    let config = match set("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        Some(xdg) => xdg,
        None => match set("HOME") {
            Some(home) => home.join(".config"),
            None => {
                return Err(Fatal(
                    "error: neither XDG_CONFIG_HOME nor HOME is set, so there is no place \
                     for the key file; choose one with --key FILE"
                        .to_string(),
                ));
            }
        },
    };
    Ok(config.join("udpchat").join(format!("{name}.key")))
}

/// Loads the key at `path`, or makes one there on first start. A file that
/// exists is only ever read: if it is wrong in any way the answer is an
/// error, never a fresh key in its place.
///
/// Returns whether the key was created here, so the caller can say so.
pub fn load_or_create(
    path: &Path,
    fresh: impl FnOnce() -> Keypair,
) -> Result<(Keypair, bool), Fatal> {
    if let Some(keys) = read_key(path)? {
        return Ok((keys, false));
    }
    let keys = fresh();
    if create_key(path, &keys)? {
        return Ok((keys, true));
    }
    // Another process created it between our read and our link: its key is
    // the one that counts, since it may already be in use.
    match read_key(path)? {
        Some(theirs) => Ok((theirs, false)),
        // `link` saw something at `path` that `open` cannot find: a symbolic
        // link to nothing, or a file deleted again at once.
        None => Err(Fatal(format!(
            "error: key file {} exists but cannot be opened (a broken symbolic link?); \
             fix or remove it, or choose another with --key FILE",
            path.display()
        ))),
    }
}

/// The key in the file at `path`; `None` if there is no such file.
fn read_key(path: &Path) -> Result<Option<Keypair>, Fatal> {
    let shown = path.display();
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait forever
    // for a writer, before we could see that it is not a regular file.
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Fatal(format!("error: cannot open key file {shown}: {e}")));
        }
    };
    // The checks use the opened file, not the path, so what is checked is
    // what is read.
    let meta = file
        .metadata()
        .map_err(|e| Fatal(format!("error: cannot inspect key file {shown}: {e}")))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Fatal(format!(
            "error: key file {shown} is {what}; remove it or choose another with --key FILE"
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        let how = if mode & 0o044 != 0 {
            "readable"
        } else if mode & 0o022 != 0 {
            "writable"
        } else {
            "accessible"
        };
        return Err(Fatal(format!(
            "error: key file {shown} is {how} by others (mode {mode:04o}); run chmod 600 {shown}"
        )));
    }
    let mut text = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|e| Fatal(format!("error: cannot read key file {shown}: {e}")))?;
    let damaged = |why: &str| {
        Fatal(format!(
            "error: key file {shown} is damaged ({why}); restore it from a backup, \
             or move it aside to create a new key"
        ))
    };
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(damaged("too large to be a key file"));
    }
    let text = std::str::from_utf8(&text).map_err(|_| damaged("not text"))?;
    let (secret, public) = parse_key(text).map_err(damaged)?;
    let keys = Keypair::from_secret(secret);
    if keys.public().0 != public {
        return Err(damaged("its public key does not match its private key"));
    }
    Ok(Some(keys))
}

/// The two halves of a key file's text. The error says what is wrong in
/// words, never quoting the file: its lines hold the private key.
fn parse_key(text: &str) -> Result<([u8; KEY_LEN], [u8; KEY_LEN]), &'static str> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let mut field = |label: &str, missing, bad| {
        let line = lines.next().ok_or(missing)?;
        let value = line
            .strip_prefix(label)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or(bad)?;
        unhex(value.trim_start()).ok_or(bad)
    };
    let secret = field(
        "private",
        "no private key line",
        "the private key line is not `private` and 64 hex digits",
    )?;
    let public = field(
        "public",
        "no public key line",
        "the public key line is not `public` and 64 hex digits",
    )?;
    if lines.next().is_some() {
        return Err("unexpected lines after the public key");
    }
    Ok((secret, public))
}

/// Writes `keys` to a new file at `path` without ever letting `path` hold a
/// partial key: the complete file is made under a temporary name and then
/// linked into place, and `link`, unlike `rename`, fails rather than replace
/// a file that appeared meanwhile.
///
/// Returns false if something was at `path` by the time of the link.
fn create_key(path: &Path, keys: &Keypair) -> Result<bool, Fatal> {
    let shown = path.display();
    let cannot = |e: io::Error| Fatal(format!("error: cannot create key file {shown}: {e}"));
    let Some(file_name) = path.file_name() else {
        return Err(Fatal(format!(
            "error: key file {shown} does not name a file; choose one with --key FILE"
        )));
    };
    let dir = parent_dir(path);
    create_dirs(dir).map_err(cannot)?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let create = || new_private_file(&tmp, OpenOptions::new().write(true));
    let mut file = match create() {
        // Our pid is ours alone, so a file under this name is the leftover
        // of a crashed process that had the same pid: nobody else owns it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp).map_err(cannot)?;
            create()
        }
        other => other,
    }
    .map_err(cannot)?;
    let text = format!(
        "{KEY_HEADER}\nprivate {}\npublic {}\n",
        hex(keys.secret()),
        keys.public().to_hex()
    );
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all());
    drop(file);
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    // The temporary name has done its job whatever happened; only `path`
    // may keep the key.
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(dir);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(cannot(e)),
    }
}

/// Creates a file only its owner can read or write. The mode is set again
/// after creation because the umask may have taken bits away from it (it
/// cannot add any, so the file is never more open than 0600).
fn new_private_file(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options.create_new(true).mode(0o600).open(path)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Creates `dir` and any missing ancestors, mode 0700 whatever the umask:
/// they hold private keys. Directories that already exist are left as they
/// are, since they may be shared with other programs.
fn create_dirs(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && fs::symlink_metadata(d).is_err())
        .collect();
    for d in missing.into_iter().rev() {
        match DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {
                fs::set_permissions(d, fs::Permissions::from_mode(0o700))?;
                // So the new directory is still there after a crash, with
                // the key that will be created in it.
                sync_dir(parent_dir(d));
            }
            // Another process made it meanwhile: it is theirs to set up.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The directory holding `path`: `.` for a bare file name, whose parent is
/// the empty path.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes a new directory entry durable. Best effort: some filesystems refuse
/// to sync a directory, and the file itself is already synced.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The servers a client has met and the key each presented the first time.
/// It lives beside the key file because it belongs to that identity: a
/// different `--key` is a different user with different trust decisions.
#[derive(Debug, Clone)]
pub struct KnownServers {
    path: PathBuf,
}

impl KnownServers {
    /// The known-servers file of the identity in `key_file`.
    pub fn beside(key_file: &Path) -> KnownServers {
        KnownServers {
            path: parent_dir(key_file).join(KNOWN_SERVERS),
        }
    }

    /// Where the file is, so an error can tell the user which line to delete.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key pinned for `server`, with its line number so the user can be
    /// told exactly which line to delete to accept a new key. `server` is
    /// the address as the user typed it: a name that resolves elsewhere
    /// later is still the server the user meant.
    ///
    /// If a hand-edited file lists `server` twice, the first entry counts.
    /// The whole file is checked even after a match, so a damaged line is
    /// reported whichever server is looked up, not only for some.
    pub fn lookup(&self, server: &str) -> Result<Option<(PublicKey, usize)>, Fatal> {
        let shown = self.path.display();
        let text = match fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Fatal(format!("error: cannot read {shown}: {e}"))),
        };
        let mut found = None;
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            let number = i + 1;
            let damaged = || {
                Fatal(format!(
                    "error: line {number} of {shown} is damaged (expected a server address \
                     and 64 hex digits); fix or delete that line"
                ))
            };
            let line = std::str::from_utf8(line).map_err(|_| damaged())?.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(addr), Some(hex), None) = (words.next(), words.next(), words.next()) else {
                return Err(damaged());
            };
            let key = PublicKey::from_hex(hex).ok_or_else(damaged)?;
            if found.is_none() && addr == server {
                found = Some((key, number));
            }
        }
        Ok(found)
    }

    /// Pins `key` for `server`. Appending (O_APPEND) never rewrites what is
    /// there, so a crash mid-write can cost at most this entry, and two
    /// clients sharing the file cannot erase each other's lines.
    pub fn remember(&self, server: &str, key: &PublicKey) -> Result<(), Fatal> {
        let shown = self.path.display();
        if server.is_empty()
            || server.starts_with('#')
            || server.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            // It would be written as a line that `lookup` then calls damaged.
            return Err(Fatal(format!(
                "error: cannot remember server address {server:?} in {shown}: \
                 it must be one word"
            )));
        }
        let cannot = |e: io::Error| Fatal(format!("error: cannot write {shown}: {e}"));
        let dir = parent_dir(&self.path);
        create_dirs(dir).map_err(cannot)?;
        // Appending even to the file we create: another client may append
        // to it between our create and our write, and must not be overwritten.
        let mut options = OpenOptions::new();
        options.read(true).append(true);
        let (mut file, created) = match new_private_file(&self.path, &mut options.clone()) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                (options.open(&self.path).map_err(cannot)?, false)
            }
            Err(e) => return Err(cannot(e)),
        };
        let mut entry = String::new();
        if created {
            entry.push_str(KNOWN_HEADER);
            entry.push('\n');
        }
        // A hand edit may have dropped the final newline; appending straight
        // after it would merge this entry into that line and damage both.
        let len = file.metadata().map_err(cannot)?.len();
        if len > 0 {
            let mut last = [0];
            file.read_exact_at(&mut last, len - 1).map_err(cannot)?;
            if last[0] != b'\n' {
                entry.push('\n');
            }
        }
        entry.push_str(&format!("{server} {}\n", key.to_hex()));
        // One write, so a concurrent appender's line cannot land inside ours.
        file.write_all(entry.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(cannot)?;
        if created {
            sync_dir(dir);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory of its own per test, removed when the test ends (passed
    /// or not), so tests can run in parallel and never touch $HOME.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("udpchat-keys-{}-{test}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir(&dir).unwrap();
            Scratch(dir)
        }

        fn join(&self, p: impl AsRef<Path>) -> PathBuf {
            self.0.join(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn keys(n: u8) -> Keypair {
        Keypair::from_secret([n; 32])
    }

    /// Every secret the tests write anywhere, to check no error shows one.
    fn secrets() -> Vec<String> {
        let mut all = Vec::new();
        for n in 0..=8u8 {
            let h = hex(keys(n).secret());
            all.push(h.to_uppercase());
            all.push(h);
        }
        all.push(hex(&flipped_secret()));
        all
    }

    /// `keys(1)`'s secret with one hex digit changed.
    fn flipped_secret() -> [u8; 32] {
        let mut s = *keys(1).secret();
        s[5] ^= 0x10;
        s
    }

    fn key_text(k: &Keypair) -> String {
        format!(
            "{KEY_HEADER}\nprivate {}\npublic {}\n",
            hex(k.secret()),
            k.public().to_hex()
        )
    }

    fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
        fs::write(path, bytes).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    /// Checks an error is one line, says it is one, names no secret.
    fn check_line(Fatal(msg): &Fatal) -> String {
        assert!(msg.starts_with("error: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        for s in secrets() {
            assert!(!msg.contains(&s), "secret shown: {msg}");
        }
        msg.clone()
    }

    /// Loads a file that must be refused, and checks it was left alone.
    fn refused(path: &Path) -> String {
        // Reading a FIFO would wait for a writer: compare only real files.
        let contents = |p: &Path| {
            fs::symlink_metadata(p)
                .is_ok_and(|m| m.is_file())
                .then(|| fs::read(p).unwrap())
        };
        let before = contents(path);
        let mode_before = mode(path);
        let err = load_or_create(path, || panic!("made a key in place of {}", path.display()))
            .unwrap_err();
        assert_eq!(contents(path), before, "{} changed", path.display());
        assert_eq!(mode(path), mode_before);
        check_line(&err)
    }

    fn no_temp_files(dir: &Path) {
        for e in fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name();
            assert!(
                !name.as_bytes().windows(5).any(|w| w == b".tmp-"),
                "left behind: {name:?}"
            );
        }
    }

    #[test]
    fn a_created_key_loads_back_the_same_and_stays_private() {
        let t = Scratch::new("create");
        let path = t.join("a/b/Alice.key");
        let scratch_mode = mode(&t.0);
        let (made, created) = load_or_create(&path, || keys(1)).unwrap();
        assert!(created);
        assert_eq!(made, keys(1));
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&t.join("a")), 0o700);
        assert_eq!(mode(&t.join("a/b")), 0o700);
        // The scratch dir existed already: not ours to change.
        assert_eq!(mode(&t.0), scratch_mode);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, key_text(&keys(1)));
        no_temp_files(&t.join("a/b"));
        let (again, created) = load_or_create(&path, || panic!("made a second key")).unwrap();
        assert!(!created);
        assert_eq!(again, made);
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn a_key_file_tolerates_comments_and_a_missing_final_newline() {
        let t = Scratch::new("tolerant");
        let path = t.join("k.key");
        let k = keys(2);
        let text = format!(
            "# mine\n\nprivate {}\r\n# note\npublic {}",
            hex(k.secret()),
            k.public().to_hex().to_uppercase()
        );
        write_mode(&path, text.as_bytes(), 0o600);
        assert_eq!(load_or_create(&path, || panic!()).unwrap(), (k, false));
        // 0400 is fine too: only the owner can read it.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_or_create(&path, || panic!()).is_ok());
    }

    #[test]
    fn a_key_file_others_can_reach_is_refused_and_left_alone() {
        let t = Scratch::new("mode");
        let path = t.join("Alice.key");
        for (m, how) in [
            (0o644, "readable"),
            (0o640, "readable"),
            (0o604, "readable"),
            (0o620, "writable"),
            (0o602, "writable"),
            (0o610, "accessible"),
            (0o601, "accessible"),
        ] {
            write_mode(&path, key_text(&keys(1)).as_bytes(), m);
            let msg = refused(&path);
            let p = path.display();
            assert_eq!(
                msg,
                format!("error: key file {p} is {how} by others (mode {m:04o}); run chmod 600 {p}")
            );
        }
    }

    #[test]
    fn a_damaged_key_file_is_refused_and_left_alone() {
        let t = Scratch::new("damaged");
        let path = t.join("Alice.key");
        let good = key_text(&keys(1));
        // Every truncation that loses more than the final newline.
        for n in 0..good.len() - 1 {
            write_mode(&path, &good.as_bytes()[..n], 0o600);
            assert!(refused(&path).contains("is damaged"), "cut at {n}");
        }
        let flipped = format!(
            "{KEY_HEADER}\nprivate {}\npublic {}\n",
            hex(&flipped_secret()),
            keys(1).public().to_hex()
        );
        let swapped = format!(
            "public {}\nprivate {}\n",
            keys(1).public().to_hex(),
            hex(keys(1).secret())
        );
        let mut not_text = good.clone().into_bytes();
        not_text[0] = 0xff;
        let variants: Vec<(Vec<u8>, &str)> = vec![
            (flipped.into_bytes(), "does not match"),
            (format!("{good}garbage\n").into_bytes(), "unexpected lines"),
            (format!("{good}{good}").into_bytes(), "unexpected lines"),
            (
                good.replace("private ", "private  x").into_bytes(),
                "private key line",
            ),
            (
                good.replace("private ", "secret ").into_bytes(),
                "private key line",
            ),
            (
                good.replace("public ", "public:").into_bytes(),
                "public key line",
            ),
            (
                good.replace("\npublic", "\n#public").into_bytes(),
                "no public",
            ),
            (swapped.into_bytes(), "private key line"),
            (not_text, "not text"),
            (vec![b'#'; 5000], "too large"),
            (b"\0\0\0\0".to_vec(), "private key line"),
        ];
        for (bytes, why) in variants {
            write_mode(&path, &bytes, 0o600);
            let msg = refused(&path);
            assert!(msg.contains("is damaged") && msg.contains(why), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
    }

    #[test]
    fn a_key_path_that_is_not_a_regular_file_is_refused() {
        let t = Scratch::new("notfile");
        let dir = t.join("Alice.key");
        fs::create_dir(&dir).unwrap();
        let msg = refused(&dir);
        assert!(msg.contains("is a directory"), "{msg}");
        assert!(dir.is_dir());

        // A FIFO must be refused at once, not wait for a writer.
        let fifo = t.join("fifo.key");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(refused(&fifo).contains("not a regular file"));

        // A symbolic link to nothing: `link` cannot replace it either.
        let dangling = t.join("dangling.key");
        std::os::unix::fs::symlink(t.join("nowhere"), &dangling).unwrap();
        let err = load_or_create(&dangling, || keys(1)).unwrap_err();
        assert!(check_line(&err).contains("cannot be opened"));
        assert!(fs::symlink_metadata(&dangling).unwrap().is_symlink());
        assert!(!t.join("nowhere").exists());
        no_temp_files(&t.0);

        // A symbolic link to a good key file is that key file.
        let real = t.join("real.key");
        write_mode(&real, key_text(&keys(3)).as_bytes(), 0o600);
        let link = t.join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(
            load_or_create(&link, || panic!()).unwrap(),
            (keys(3), false)
        );
    }

    #[test]
    fn losing_the_creation_race_keeps_the_winners_key() {
        let t = Scratch::new("race");
        let path = t.join("Alice.key");
        let winner = keys(4);
        let (got, created) = load_or_create(&path, || {
            // Another process finishes first, while we generate.
            write_mode(&path, key_text(&winner).as_bytes(), 0o600);
            keys(5)
        })
        .unwrap();
        assert_eq!((got, created), (winner.clone(), false));
        assert_eq!(fs::read_to_string(&path).unwrap(), key_text(&winner));
        no_temp_files(&t.0);
    }

    #[test]
    fn a_stale_temporary_file_does_not_block_creation() {
        let t = Scratch::new("stale");
        let path = t.join("Alice.key");
        let stale = t.join(format!(".Alice.key.tmp-{}", std::process::id()));
        write_mode(&stale, b"half a key", 0o600);
        assert_eq!(load_or_create(&path, || keys(6)).unwrap(), (keys(6), true));
        assert!(!stale.exists());
        assert_eq!(
            load_or_create(&path, || panic!()).unwrap(),
            (keys(6), false)
        );
    }

    #[test]
    fn the_default_key_path_follows_xdg_then_home() {
        let alice = Name::new("Alice").unwrap();
        let env = |xdg: Option<&'static str>, home: Option<&'static str>| {
            move |k: &str| match k {
                "XDG_CONFIG_HOME" => xdg.map(OsString::from),
                "HOME" => home.map(OsString::from),
                _ => panic!("asked for {k}"),
            }
        };
        let path = |xdg, home| key_path_from(&alice, env(xdg, home));
        assert_eq!(
            path(Some("/xdg"), Some("/home/a")).unwrap(),
            Path::new("/xdg/udpchat/Alice.key")
        );
        let home = Path::new("/home/a/.config/udpchat/Alice.key");
        assert_eq!(path(Some(""), Some("/home/a")).unwrap(), home);
        assert_eq!(path(None, Some("/home/a")).unwrap(), home);
        assert_eq!(path(Some("rel/dir"), Some("/home/a")).unwrap(), home);
        for (xdg, h) in [
            (None, None),
            (Some(""), Some("")),
            (None, Some("")),
            (Some("x"), None),
        ] {
            let msg = check_line(&path(xdg, h).unwrap_err());
            assert!(msg.contains("--key"), "{msg}");
        }
        let slash = Name::new("../x").unwrap();
        let err = key_path_from(&slash, env(Some("/xdg"), None)).unwrap_err();
        assert!(check_line(&err).contains("'/'"));
    }

    #[test]
    fn known_servers_remembers_each_server_once_by_line() {
        let t = Scratch::new("known");
        let known = KnownServers::beside(&t.join("Alice.key"));
        assert_eq!(known.path(), t.join("known_servers"));
        assert_eq!(
            KnownServers::beside(Path::new("Alice.key")).path(),
            Path::new("./known_servers")
        );
        assert_eq!(known.lookup("127.0.0.1:5000").unwrap(), None);
        known.remember("127.0.0.1:5000", &keys(1).public()).unwrap();
        assert_eq!(mode(known.path()), 0o600);
        let text = fs::read_to_string(known.path()).unwrap();
        assert!(text.starts_with(&format!("{KNOWN_HEADER}\n")), "{text}");
        known.remember("[::1]:5000", &keys(2).public()).unwrap();
        let one = Some((keys(1).public(), 2));
        assert_eq!(known.lookup("127.0.0.1:5000").unwrap(), one);
        assert_eq!(
            known.lookup("[::1]:5000").unwrap(),
            Some((keys(2).public(), 3))
        );
        assert_eq!(known.lookup("localhost:5000").unwrap(), None);
        assert_eq!(known.lookup("127.0.0.1").unwrap(), None);
        // Only one header, however many entries.
        let text = fs::read_to_string(known.path()).unwrap();
        assert_eq!(text.matches(KNOWN_HEADER).count(), 1);

        // A hand edit: a comment, a blank line, no final newline.
        let mut f = OpenOptions::new().append(true).open(known.path()).unwrap();
        write!(f, "\n# office\nh:1 {}", keys(3).public().to_hex()).unwrap();
        drop(f);
        assert_eq!(known.lookup("h:1").unwrap(), Some((keys(3).public(), 6)));
        known.remember("h:2", &keys(4).public()).unwrap();
        assert_eq!(known.lookup("h:1").unwrap(), Some((keys(3).public(), 6)));
        assert_eq!(known.lookup("h:2").unwrap(), Some((keys(4).public(), 7)));
        // A second entry for a server does not displace the first.
        known.remember("h:1", &keys(5).public()).unwrap();
        assert_eq!(known.lookup("h:1").unwrap(), Some((keys(3).public(), 6)));

        for bad in ["", "#x", "a b", "a\nb"] {
            let err = known.remember(bad, &keys(1).public()).unwrap_err();
            check_line(&err);
        }
        assert_eq!(known.lookup("h:2").unwrap(), Some((keys(4).public(), 7)));
    }

    #[test]
    fn a_damaged_known_servers_line_is_named() {
        let t = Scratch::new("knownbad");
        let known = KnownServers::beside(&t.join("Alice.key"));
        let good = format!("# c\n\nh:1 {}\n", keys(1).public().to_hex());
        for (line, bad) in [
            "h:2",
            "h:2 zz",
            "h:2 0123",
            "h:2 {key} extra",
            "{key}",
            "h:2 {key}{key}",
        ]
        .iter()
        .enumerate()
        {
            let bad = bad.replace("{key}", &keys(2).public().to_hex());
            let text = format!("{good}{}{bad}\n", "# pad\n".repeat(line));
            write_mode(known.path(), text.as_bytes(), 0o600);
            let err = known.lookup("h:1").unwrap_err();
            let msg = check_line(&err);
            let n = 4 + line;
            assert_eq!(
                msg,
                format!(
                    "error: line {n} of {} is damaged (expected a server address \
                     and 64 hex digits); fix or delete that line",
                    known.path().display()
                )
            );
            assert_eq!(fs::read_to_string(known.path()).unwrap(), text);
        }
        write_mode(known.path(), b"h:1 \xff\n", 0o600);
        assert!(check_line(&known.lookup("x").unwrap_err()).contains("line 1 "));
    }

    #[test]
    fn no_error_shows_the_private_key() {
        // The refusals above go through `check_line`; this one puts the
        // secret in every position a careless message might quote.
        let t = Scratch::new("secret");
        let path = t.join("Alice.key");
        let s = hex(keys(1).secret());
        for text in [
            format!("private {s}\n"),
            format!("private {s}\npublic {s}\n"),
            format!("private {s}x\npublic {s}\n"),
            format!("{s}\n"),
            format!("private {s}\npublic {}\n{s}\n", keys(1).public().to_hex()),
        ] {
            write_mode(&path, text.as_bytes(), 0o600);
            refused(&path);
            write_mode(&path, text.as_bytes(), 0o644);
            refused(&path);
        }
    }
}
