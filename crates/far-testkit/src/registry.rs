//! A real OCI registry on loopback: Debian's `docker-registry` (CNCF distribution), started for
//! a test and stopped when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running registry with its own storage.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    addr: String,
    _storage: tempfile::TempDir,
}

/// Where Debian installs the registry.
const BINARY: &str = "docker-registry";

impl Registry {
    /// Starts a registry on a free loopback port and waits until it answers.
    ///
    /// # Panics
    /// When `docker-registry` is not installed (`./scripts/install-deps` installs it) or does
    /// not come up: a test that needs a registry must not pass without one.
    pub fn start() -> Self {
        let storage = tempfile::tempdir().expect("registry storage");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = storage.path().join("config.yml");
        let data: PathBuf = storage.path().join("data");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                data.display()
            ),
        )
        .expect("registry config");
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {BINARY} ({e}): run ./scripts/install-deps to install it")
            });
        let registry = Self {
            child,
            addr,
            _storage: storage,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "{BINARY} did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// `127.0.0.1:PORT`, the registry part of references to it.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
