//! A swtpm (the TPM 2.0 simulator of Debian's `swtpm`) for tests: started on two free local
//! ports (commands, control) with its state in a temporary directory, killed on drop. Shared by
//! the TPM tests of several crates, which include this file with `#[path]`.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Ports swtpm must never take on a shared machine (other services' defaults).
const AVOID: [u16; 7] = [5432, 6379, 1883, 4222, 5672, 3306, 8883];

/// Whether `tool` is an executable on PATH.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// Two consecutive free local ports (server, control), from the kernel's ephemeral range.
pub fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else { continue };
        let Ok(addr) = l.local_addr() else { continue };
        let port = addr.port();
        if port < 1024 || port == u16::MAX || AVOID.contains(&port) || AVOID.contains(&(port + 1)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free local ports found");
}

/// A running swtpm.
pub struct Swtpm {
    child: Child,
    /// Its command port (the control port is the next one).
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Swtpm {
    /// Starts one with a fresh state (a new EK); panics when it will not start.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("state directory");
        for attempt in 0..5 {
            let port = free_port_pair();
            let args = [
                "socket".to_string(),
                "--tpm2".into(),
                "--server".into(),
                format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                "--ctrl".into(),
                format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                "--tpmstate".into(),
                format!("dir={}", state.display()),
                "--flags".into(),
                "not-need-init,startup-clear".into(),
            ];
            eprintln!("$ swtpm {}", args.join(" "));
            let mut child = Command::new("swtpm")
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("swtpm starts");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { child, port, dir };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    eprintln!("swtpm exited with {status} (attempt {attempt}); trying other ports");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("swtpm did not listen on 127.0.0.1:{port} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("swtpm would not start");
    }

    /// The TCTI string for tpm2-tss and tpm2-tools (`TPM2TOOLS_TCTI`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// A scratch directory of its own (beside its state).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A file in [`Swtpm::dir`].
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
