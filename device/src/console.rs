//! Printing that never panics: `println!` and `eprintln!` panic when the reader of a pipe
//! has gone (`ma-device run | head`, a journal that stopped reading), which killed `run`
//! with status 101 after its records were saved.
//!
//! [`errln!`](crate::errln) writes one line to stderr and drops it if stderr is closed: a
//! message nobody can read must not stop the device loop or change an exit status. It
//! also escapes control characters (a file name with a newline or a terminal escape
//! sequence cannot forge log lines or reprogram the terminal). [`outln!`](crate::outln)
//! writes to stdout and returns the error, so a caller can stop printing on a closed
//! pipe ([`is_broken_pipe`]) and decide what else to do.

use std::fmt::{self, Write as _};
use std::io::{self, Write};

/// Like `eprintln!`, through [`err_line`]: control characters escaped, errors ignored.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::console::err_line(format_args!($($arg)*))
    };
}

/// Like `println!`, through [`out_line`]: returns the `io::Result` instead of panicking.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::console::out_line(format_args!($($arg)*))
    };
}

/// Writes `args` and a newline to stderr in one call, with control characters escaped.
/// A failed write (closed pipe, full disk behind a redirect) is ignored: there is nowhere
/// left to report it.
pub fn err_line(args: fmt::Arguments) {
    let mut line = escape_controls(&args.to_string());
    line.push('\n');
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// Writes `args` and a newline to stdout and flushes; the error (e.g. a broken pipe) is
/// returned, never a panic.
pub fn out_line(args: fmt::Arguments) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{args}").and_then(|()| out.flush())
}

/// `s` with every control character (newline, tab, ESC, DEL, C1) written as a Rust
/// escape (`\n`, `\t`, `\u{1b}`), so it stays one harmless line on a terminal or in a log.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// True when `e` (or an error in its chain) is a closed pipe: the reader stopped early
/// (`| head`), which is not a failure of the command.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            escape_controls("a\nb\tc\u{1b}[31md\u{7f}é/\\"),
            "a\\nb\\tc\\u{1b}[31md\\u{7f}é/\\"
        );
        assert_eq!(escape_controls("plain name.png"), "plain name.png");
    }

    #[test]
    fn broken_pipe_is_found_in_the_chain() {
        let e = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&e));
        let e = anyhow::Error::new(io::Error::from(io::ErrorKind::StorageFull));
        assert!(!is_broken_pipe(&e));
    }
}
