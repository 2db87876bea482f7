//! What the CLI writes for people to read: standard output that a closed pipe cannot
//! crash, and text from a node or another organisation that cannot drive the terminal.

use std::borrow::Cow;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

/// The first error writing to standard output; once set, later output is dropped.
static STDOUT_FAILURE: Mutex<Option<std::io::Error>> = Mutex::new(None);

/// Set once the terminal is known to be gone (SIGHUP): no one is left to read.
static TERMINAL_CLOSED: AtomicBool = AtomicBool::new(false);

/// Records that the terminal closed: output that then fails to reach it (EIO) is not
/// an error, as with a reader that closed its pipe.
pub fn terminal_closed() {
    TERMINAL_CLOSED.store(true, Ordering::Relaxed);
}

/// Writes to standard output, as `print!` does, but never panics: after a failed write
/// (a reader such as `head` that stopped reading, a full disk) the rest of the output is
/// dropped and the command carries on, so it still finishes its work and cleans up (the
/// demo stops its nodes). [`finish_stdout`] says at the end whether that matters.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut failure = STDOUT_FAILURE
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if failure.is_none()
        && let Err(e) = std::io::stdout().lock().write_fmt(args)
    {
        *failure = Some(e);
    }
}

/// Flushes standard output. A reader that closed the pipe early wanted no more, as with
/// `corridor inbox | head -3`: that is success. Any other failure is an error.
pub fn finish_stdout() -> Result<(), String> {
    let mut failure = STDOUT_FAILURE
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if failure.is_none()
        && let Err(e) = std::io::stdout().lock().flush()
    {
        *failure = Some(e);
    }
    match failure.take() {
        Some(e) if matters(&e, TERMINAL_CLOSED.load(Ordering::Relaxed)) => {
            Err(format!("cannot write to standard output: {e}"))
        }
        _ => Ok(()),
    }
}

/// Whether failing to write standard output is an error: not when no one is left to
/// read it (a closed pipe, or the terminal that closed, which answers EIO).
fn matters(failure: &std::io::Error, terminal_closed: bool) -> bool {
    const EIO: i32 = 5;
    let unread = failure.kind() == std::io::ErrorKind::BrokenPipe
        || (terminal_closed && failure.raw_os_error() == Some(EIO));
    !unread
}

/// Writes to standard error, as `eprint!` does, but ignores failure: there is nowhere
/// left to report it.
pub fn write_stderr(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `print!` through [`write_stdout`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::terminal::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` through [`write_stdout`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::terminal::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::terminal::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` through [`write_stderr`].
#[macro_export]
macro_rules! errln {
    () => {
        $crate::terminal::write_stderr(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::terminal::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Text from a node or another organisation, made safe to show on a terminal: control
/// characters (which could move the cursor, forge a line or recolour the screen) and
/// the invisible characters that reorder or break a line are shown as Rust escapes
/// (`\n`, `\u{1b}`, `\u{202e}`); every other character, Khmer script and emoji
/// included, is kept. JSON output needs none of this: it escapes on its own.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(drives_the_terminal) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if drives_the_terminal(c) {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

fn drives_the_terminal(c: char) -> bool {
    c.is_control()
        // Bidirectional embeddings, overrides and isolates: they reorder what follows.
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        // Line and paragraph separators.
        || matches!(c, '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_no_one_can_read_is_no_error() {
        let eio = std::io::Error::from_raw_os_error(5);
        let closed_pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert!(!matters(&closed_pipe, false));
        assert!(matters(&eio, false) && matters(&full, false));
        assert!(!matters(&eio, true));
        // Output redirected to a full disk still fails, terminal or not.
        assert!(matters(&full, true));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape_controls("Srey\n  consent:  FORGED\u{1b}[31mRED"),
            "Srey\\n  consent:  FORGED\\u{1b}[31mRED"
        );
        assert_eq!(
            escape_controls("a\tb\rc\0d\u{7f}e"),
            "a\\tb\\rc\\0d\\u{7f}e"
        );
        // C1 controls, such as the single-byte CSI.
        assert_eq!(escape_controls("x\u{9b}31m"), "x\\u{9b}31m");
    }

    #[test]
    fn reordering_and_line_breaking_characters_are_escaped() {
        assert_eq!(escape_controls("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(
            escape_controls("a\u{2066}b\u{2069}"),
            "a\\u{2066}b\\u{2069}"
        );
        assert_eq!(escape_controls("a\u{2028}b"), "a\\u{2028}b");
    }

    #[test]
    fn other_text_is_kept_as_it_is() {
        for text in [
            "",
            "Srey Mom",
            "ស្រី មុំ",
            // A zero-width space between Khmer words, and an emoji joined by ZWJ.
            "ភាសា\u{200b}ខ្មែរ",
            "👩\u{200d}👧 café — naïve",
            "C:\\path\\with\\backslashes",
            "quotes \" and ' stay",
        ] {
            assert!(matches!(escape_controls(text), Cow::Borrowed(t) if t == text));
        }
    }

    #[test]
    fn escaping_twice_changes_nothing_more() {
        let once = escape_controls("a\nb\u{1b}c").into_owned();
        assert_eq!(escape_controls(&once), once);
    }
}
