//! LiteRT 2.1 prints `INFO: [...]` / `WARNING: [...]` lines on stderr while it registers
//! accelerators and compiles a model (about ten per load), and exports no call to change its log
//! level. Around those calls fd 2 is sent through a pipe: LiteRT's own lines become `log`
//! records under the `litert` target (info, so `-v` shows them; warn for its errors), and anything
//! else written meanwhile — another thread's log output — goes on to the real stderr unchanged.
//!
//! With debug logging for `litert` (`-vv`) nothing is redirected and LiteRT prints as it likes.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

/// One redirection at a time: fd 2 is process-wide.
static REDIRECT: Mutex<()> = Mutex::new(());

const STDERR: i32 = 2;

/// Run `f` with LiteRT's stderr chatter turned into `log` records.
pub(crate) fn quietly<T>(f: impl FnOnce() -> T) -> T {
    if log::log_enabled!(target: "litert", log::Level::Debug) {
        return f();
    }
    let _one_at_a_time = REDIRECT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some(redirect) = Redirect::start() else {
        return f();
    };
    let result = f();
    redirect.finish();
    result
}

/// fd 2 pointed at a pipe whose reader thread sorts the lines; restored by `finish` (or drop).
struct Redirect {
    saved: Option<OwnedFd>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Redirect {
    fn start() -> Option<Self> {
        let (read, write) = std::io::pipe().ok()?;
        // SAFETY: dup of fd 2, which is open for the life of the process; the result, when not
        // -1, is a fresh descriptor owned by the `OwnedFd`.
        let saved = unsafe { libc::dup(STDERR) };
        if saved < 0 {
            return None;
        }
        // SAFETY: `saved` was just returned by dup and is owned by nothing else.
        let saved = unsafe { OwnedFd::from_raw_fd(saved) };
        let passthrough = saved.try_clone().ok()?;
        let reader = std::thread::Builder::new()
            .name("litert-log".into())
            .spawn(move || sort_lines(read, passthrough))
            .ok()?;
        // SAFETY: both descriptors are open; dup2 atomically makes fd 2 a copy of the pipe's
        // write end (`write` is closed when dropped below, leaving fd 2 its only writer).
        if unsafe { libc::dup2(write.as_raw_fd(), STDERR) } < 0 {
            drop(write);
            // The reader ends at EOF now that the only write end is closed.
            let _ = reader.join();
            return None;
        }
        drop(write);
        Some(Self {
            saved: Some(saved),
            reader: Some(reader),
        })
    }

    fn finish(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        if let Some(saved) = self.saved.take() {
            // SAFETY: `saved` is the original stderr, open; dup2 points fd 2 back at it, which
            // closes the pipe's last write end so the reader sees end of file.
            unsafe { libc::dup2(saved.as_raw_fd(), STDERR) };
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        self.restore();
    }
}

/// LiteRT's loggers write `SEVERITY: [file:line] message` or, for TF Lite's, `SEVERITY: message`.
fn litert_severity(line: &str) -> Option<log::Level> {
    let (severity, _) = line.split_once(": ")?;
    match severity {
        "VERBOSE" | "DEBUG" => Some(log::Level::Debug),
        "INFO" | "WARNING" => Some(log::Level::Info),
        "ERROR" | "FATAL" => Some(log::Level::Warn),
        _ => None,
    }
}

fn sort_lines(read: std::io::PipeReader, passthrough: OwnedFd) {
    let mut passthrough = std::fs::File::from(passthrough);
    for line in BufReader::new(read).split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line);
        match litert_severity(&text) {
            Some(level) => log::log!(target: "litert", level, "{text}"),
            None => {
                let _ = passthrough.write_all(&line);
                let _ = passthrough.write_all(b"\n");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn litert_lines_are_recognised_and_others_pass_through() {
        let info = "INFO: [auto_registration.cc:325] CPU accelerator registered.";
        let warning = "WARNING: [auto_registration.cc:308] GPU accelerator could not be loaded.";
        let error = "ERROR: [compiled_model.cc:1] failed";
        let tflite = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.";
        assert_eq!(litert_severity(tflite), Some(log::Level::Info));
        assert_eq!(litert_severity(info), Some(log::Level::Info));
        assert_eq!(litert_severity(warning), Some(log::Level::Info));
        assert_eq!(litert_severity(error), Some(log::Level::Warn));
        for other in [
            "[2026-11-30T16:00:00Z WARN dermedge] queue full",
            "error: no such file",
            "Info: mixed case is not LiteRT's",
            "",
        ] {
            assert_eq!(litert_severity(other), None, "{other}");
        }
    }
}
