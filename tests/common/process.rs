//! Child processes of a test: `spike` servers, `spike dev`, HAProxy, nginx. One wrapper for all
//! of them, killed and reaped on drop, so a failing assertion never leaves a process behind.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where a child's stdout goes; stderr always goes to its log file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stdout {
    /// Into the log file, after stderr's lines as they come.
    Log,
    /// Collected line by line, for [`Process::stdout`] (the ready lines of `spike dev`).
    Capture,
}

/// A running child process with its log file; killed and reaped on drop.
pub struct Process {
    pub name: String,
    /// stderr (and stdout with [`Stdout::Log`]), appended to across restarts.
    pub log: PathBuf,
    child: Option<Child>,
    /// The captured stdout and the thread reading it (ends at EOF, when the child exits).
    stdout: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Process {
    /// Spawns `cmd` (its stdin closed) with its output in `dir/<name>.log`.
    pub fn spawn(name: &str, dir: &Path, cmd: &mut Command, stdout: Stdout) -> Process {
        let log = dir.join(format!("{name}.log"));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdin(Stdio::null()).stderr(file.try_clone().unwrap());
        match stdout {
            Stdout::Log => cmd.stdout(file),
            Stdout::Capture => cmd.stdout(Stdio::piped()),
        };
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} (./test installs what it needs): {e}"));
        let captured = Arc::new(Mutex::new(String::new()));
        let reader = child.stdout.take().map(|pipe| {
            let sink = Arc::clone(&captured);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut out = sink.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            })
        });
        Process {
            name: name.to_string(),
            log,
            child: Some(child),
            stdout: captured,
            reader,
        }
    }

    /// The log file's whole text.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log under a header naming the process, for failure messages.
    pub fn dump(&self) -> String {
        format!("===== {} =====\n{}", self.name, self.logs())
    }

    /// What the child printed on stdout so far ([`Stdout::Capture`] only).
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The exit status if the child has exited (it is then reaped), else `None`.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        self.join_reader();
        Some(status)
    }

    /// Waits (bounded) for the child to exit by itself; returns its exit code (`-1` for a
    /// signal), or `None` if it is still running after `limit`. Once it returns, everything the
    /// child printed on stdout is in [`Process::stdout`].
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        self.child.as_ref()?;
        loop {
            if let Some(status) = self.exited() {
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` (a name for kill(1): TERM, STOP, CONT...).
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.join_reader();
    }

    /// The stdout reader ends at EOF, which the child's exit brings.
    fn join_reader(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kill -SIG PID`; fails the test if kill(1) fails.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// How long [`output_within`]'s callers let a command that should end run.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// Runs `cmd` (stdin closed) to completion, as `Command::output` does, but kills it and fails
/// the test if it is still running after `limit`: a command that should have stopped (a server
/// given bad input) must fail the test, not hang it.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the command");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("collect the command's output"),
        Err(_) => {
            signal(pid, "KILL");
            let out = rx.recv().ok().and_then(Result::ok);
            let stderr = out.map_or_else(String::new, |o| {
                String::from_utf8_lossy(&o.stderr).into_owned()
            });
            panic!("{cmd:?} was still running after {limit:?}; killed. Its stderr:\n{stderr}");
        }
    }
}

/// Processes held with SIGSTOP. SIGCONT on [`Frozen::thaw`], or on drop when an assertion fails
/// first: a server left stopped would hang its own cleanup (and PostgreSQL's `pg_ctl stop`).
pub struct Frozen(Vec<u32>);

impl Frozen {
    pub fn freeze(pids: Vec<u32>) -> Frozen {
        for &pid in &pids {
            signal(pid, "STOP");
        }
        Frozen(pids)
    }

    pub fn thaw(mut self) {
        for pid in std::mem::take(&mut self.0) {
            signal(pid, "CONT");
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

/// `pid` and its direct children, from /proc.
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    pids.extend(
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|child| {
                // "pid (comm) state ppid ...": comm may hold spaces, so parse after the last ')'.
                fs::read_to_string(format!("/proc/{child}/stat"))
                    .ok()
                    .and_then(|s| {
                        let ppid = s.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                        ppid.parse::<u32>().ok()
                    })
                    == Some(pid)
            }),
    );
    pids
}
