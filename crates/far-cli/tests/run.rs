//! `far run` as a user runs it: a real microVM (QEMU, software emulation here) booted from the
//! guest images of `scripts/build-guest`, the agent's image pulled from a real registry on
//! loopback (Debian's docker-registry), the agent's output on stdout/stderr, its exit code
//! as far's, and nothing left behind, also after Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use far_testkit::http::ask;
use far_testkit::registry::Registry;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A test's own registry holding the stand-in agent image (the tree `scripts/build-guest` made),
/// and a working directory with its image cache.
struct Fixture {
    registry: Registry,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let registry = Registry::start();
        let tree = repo().join("target/guest/agent-root");
        let reference = format!("{}/tiffany:dev", registry.addr());
        let config = far_oci::RegistryConfig {
            plain_http_loopback: true,
            ..far_oci::RegistryConfig::default()
        };
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(far_oci::push::push_dir(&tree, &reference, config))
            .unwrap();
        Self {
            registry,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `far run` of a FarAgent naming `far.test/tiffany:dev`, pulled through the registry as a
    /// mirror of far.test.
    fn far_run(&self, args: &str) -> Command {
        self.far_run_image("far.test/tiffany:dev", args)
    }

    fn far_run_image(&self, image: &str, args: &str) -> Command {
        self.far_run_manifest(&format!(
            "apiVersion: tiffany.dev/v1\nkind: FarAgent\nmetadata:\n  name: test-agent\nspec:\n  image: {image}\n  memory: 256Mi\n  cpu: 1\n  entrypoint: /usr/local/bin/tiffany\n  args: [{args}]\n  env:\n    - {{name: MODE, value: test}}\n"
        ))
    }

    /// `far run` of the manifest `text`.
    fn far_run_manifest(&self, text: &str) -> Command {
        let path = self.dir.path().join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_far"));
        command
            .current_dir(repo())
            // The default accelerator: the KVM verdict is probed and kept in this cache.
            .env("XDG_CACHE_HOME", self.dir.path())
            .args(["run", "--plain-http-loopback"])
            .arg("--registry-mirror")
            .arg(format!("far.test={}", self.registry.addr()))
            .arg("--image-cache")
            .arg(self.dir.path().join("images"))
            .arg(path);
        command
    }
}

/// The QEMU processes started by process `parent`: (pid, command line).
fn qemus_of(parent: u32) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline =
                String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?)
                    .replace('\0', " ");
            (ppid == parent && cmdline.contains("qemu-system")).then_some((pid, cmdline))
        })
        .collect()
}

/// far's lines and its components' log events read alike: no colour codes (stderr is not a
/// terminal here), no time stamps or module paths.
fn one_voice(stderr: &str) {
    assert!(!stderr.contains('\x1b'), "{stderr}");
    for line in stderr.lines() {
        assert!(
            !line.contains("far_host::") && !line.starts_with("20"),
            "a raw log line: {line}"
        );
    }
}

#[test]
fn the_agents_output_and_exit_code_become_fars() {
    let fixture = Fixture::new();
    let out = fixture
        .far_run("--task, fail, --exit-code, '3'")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("failing on purpose with exit code 3"),
        "{stderr}"
    );
    assert!(
        stderr.contains("far: test-agent: VM of 256 MiB and 1 vCPU on host local"),
        "{stderr}"
    );
    assert!(
        stderr.contains("far: test-agent: far.test/tiffany:dev ready after"),
        "{stderr}"
    );
    assert!(
        stderr.contains("far: test-agent: agent running")
            && stderr.contains("s after far run started"),
        "{stderr}"
    );
    assert!(
        stderr.contains("far: test-agent: agent exited with code 3"),
        "{stderr}"
    );

    one_voice(&stderr);
    let kvm_probed = Path::new("/dev/kvm").exists();
    if kvm_probed {
        let kept = fixture.dir.path().join("far/accel.json");
        assert!(
            kept.is_file(),
            "the KVM verdict is kept in {}",
            kept.display()
        );
    }

    let out = fixture.far_run("--task, embedder").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    one_voice(&stderr);
    assert!(
        !stderr.contains("KVM cannot run guests"),
        "the kept verdict is used, not probed again: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(
        stdout.lines().all(|l| l.starts_with("embedding ")),
        "{stdout}"
    );
}

/// An agent naming a pool, with the pool in the same file: the VM is the pool's template (its
/// image, size and entrypoint), the task the agent's own arguments.
#[test]
fn an_agent_of_a_pool_boots_the_pools_template_with_its_own_task() {
    let fixture = Fixture::new();
    let out = fixture
        .far_run_manifest(
            "apiVersion: tiffany.dev/v1\nkind: FarAgentPool\nmetadata:\n  name: warm\nspec:\n  maxSize: 2\n  template:\n    image: far.test/tiffany:dev\n    memory: 192Mi\n    cpu: 1\n    entrypoint: /usr/local/bin/tiffany\n    args: [--task, fail, --exit-code, '5']\n---\napiVersion: tiffany.dev/v1\nkind: FarAgent\nmetadata:\n  name: pooled\nspec:\n  poolRef: {name: warm}\n  args: [--task, fail, --exit-code, '4']\n",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("far: pooled: VM of 192 MiB and 1 vCPU on host local"),
        "{stderr}"
    );
    assert!(
        stderr.contains("far: pooled: far.test/tiffany:dev ready after"),
        "{stderr}"
    );
}

/// `far run --ui`: the controller's web UI, fed by the run. Over real HTTP while a real VM
/// runs: the agent's row turns Running, its page shows its conditions and guest figures, its
/// log follows live; no env value reaches any of it, nor far's stderr.
#[test]
fn far_run_ui_shows_the_run_live() {
    let fixture = Fixture::new();
    let mut child = fixture
        .far_run_manifest(
            "apiVersion: tiffany.dev/v1\nkind: FarAgent\nmetadata:\n  name: watched\nspec:\n  image: far.test/tiffany:dev\n  memory: 256Mi\n  cpu: 1\n  entrypoint: /usr/local/bin/tiffany\n  args: [--task, sleep, --seconds, '6']\n  env:\n    - {name: API_KEY, value: sk-far-run-ui-4a1c}\n",
        )
        .arg("--ui=127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, said) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line.unwrap();
            let _ = lines.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let address = loop {
        let line = said
            .recv_timeout(Duration::from_secs(120))
            .expect("far run says where its UI is");
        if let Some(url) = line.split("web UI at http://").nth(1) {
            break url.trim_end_matches("/ui/").to_owned();
        }
    };

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (page, running, detail, log) = runtime.block_on(async {
        let page = ask(&address, "GET", "/ui/", "</html>").await;
        // The snapshot, then changes until the row is Running (the guest boots meanwhile).
        let mut running = String::new();
        for _ in 0..12 {
            running = ask(&address, "GET", "/ui/api/stream", r#""phase":"Running""#).await;
            if running.contains(r#""phase":"Running""#) {
                break;
            }
        }
        // Read to the end: JSON holds no NUL.
        let detail = ask(&address, "GET", "/ui/api/agents/default/watched", "\0").await;
        let log = ask(
            &address,
            "GET",
            "/v1/namespaces/default/faragents/watched/logs?follow=true",
            "working: 2/6 s",
        )
        .await;
        (page, running, detail, log)
    });
    // Waited for before anything is asserted, so a failure leaves no far run behind.
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        page.contains("200 OK") && page.contains("</html>"),
        "{page}"
    );
    assert!(page.contains("content-security-policy"), "{page}");
    assert!(running.contains(r#""key":"default/watched""#), "{running}");
    assert!(running.contains(r#""phase":"Running""#), "{running}");
    assert!(running.contains(r#""name":"local""#), "the host: {running}");
    let body = detail.split("\r\n\r\n").nth(1).unwrap_or_default();
    let detail: serde_json::Value = serde_json::from_str(body).expect(&detail);
    let conditions: Vec<_> = detail["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        conditions,
        [
            ("Scheduled", "True"),
            ("VMCreated", "True"),
            ("AgentReady", "True")
        ],
        "{detail}"
    );
    assert!(
        detail["status"]["guest"]["memoryTotalMiB"].as_u64() > Some(0),
        "{detail}"
    );
    assert!(
        log.contains("working: 1/6 s") && log.contains("working: 2/6 s"),
        "{log}"
    );
    for (what, text) in [
        ("page", &page),
        ("stream", &running),
        ("log", &log),
        ("stderr", &stderr),
    ] {
        assert!(
            !text.contains("sk-far-run-ui"),
            "an env value in the {what}: {text}"
        );
    }
    assert!(!detail.to_string().contains("sk-far-run-ui"), "{detail}");
}

#[test]
fn an_image_that_cannot_be_pulled_is_a_clear_error_before_any_vm() {
    let fixture = Fixture::new();
    let out = fixture
        .far_run_image("far.test/nothing:1", "--task, sleep")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let expected = format!(
        "Error: spec.image: far.test/nothing:1\n\nCaused by:\n    image {}/nothing:1 not found in its registry",
        fixture.registry.addr()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(!stderr.contains("created; booting"), "{stderr}");
}

#[test]
fn ctrl_c_stops_the_vm_and_leaves_nothing_behind() {
    let fixture = Fixture::new();
    let mut child = fixture
        .far_run("--task, sleep, --seconds, '600'")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the agent runs: its progress line reaches stdout.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the agent never printed");
    assert!(first.starts_with("working: 0/600"), "{first}");
    let vms = qemus_of(pid);
    assert_eq!(vms.len(), 1, "one VM for this far run: {vms:?}");
    let (qemu, cmdline) = vms[0].clone();
    // The working directory: the far-run-* directory named in QEMU's command line.
    let start = cmdline
        .find("/far-run-")
        .expect("a far-run working directory");
    let dir_end = cmdline[start + 1..]
        .find('/')
        .map_or(cmdline.len(), |i| start + 1 + i);
    let working_dir =
        PathBuf::from(&cmdline[cmdline[..start].rfind(['=', ' ']).map_or(0, |i| i + 1)..dir_end]);
    assert!(working_dir.is_dir(), "{}", working_dir.display());

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let started = Instant::now();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        !Path::new(&format!("/proc/{qemu}")).exists(),
        "the VM process is gone"
    );
    assert!(!working_dir.exists(), "the working directory is removed");
}
