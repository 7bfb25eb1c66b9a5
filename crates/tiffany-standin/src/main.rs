//! `tiffany`: a stand-in for the real agent, with real work to do.
//!
//! - `--task embedder [--input FILE]`: embeds each non-empty line of the input (a built-in
//!   sample when none is given) as a deterministic 16-dimension vector (feature hashing of
//!   words, L2-normalised) and prints one line per input: `embedding <n> <vector> <text>`.
//! - `--task sleep [--seconds N]`: works for N seconds (default 1), printing progress.
//! - `--task fail [--exit-code N]`: prints why on stderr and exits with N (default 1).
//! - `--task survey`: prints what a task can see of the VM it runs in (see [`survey`]).
//! - `--task litter`: leaves traces for whatever runs next in the VM (files in every writable
//!   place, a process that outlives it; whether the root takes a file), then surveys.
//!
//! Every task ends with `--exit-code N` when given (default 0, or 1 for `fail`).

use std::process::ExitCode;
use std::time::Duration;

const SAMPLE: &str = "FAR runs each agent in its own microVM.\n\
Agents are declared as Kubernetes resources.\n\
Flintlock creates the VMs.\n";

/// Dimensions of an embedding.
const DIMENSIONS: usize = 16;

#[derive(Debug, PartialEq)]
struct Args {
    task: String,
    input: Option<String>,
    seconds: f64,
    exit_code: Option<u8>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut parsed = Args {
        task: "embedder".into(),
        input: None,
        seconds: 1.0,
        exit_code: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--task" => parsed.task = value("--task")?,
            "--input" => parsed.input = Some(value("--input")?),
            "--seconds" => {
                let v = value("--seconds")?;
                parsed.seconds = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or(format!("--seconds {v:?}: not a number of seconds"))?;
            }
            "--exit-code" => {
                let v = value("--exit-code")?;
                parsed.exit_code = Some(
                    v.parse()
                        .map_err(|_| format!("--exit-code {v:?}: use 0 to 255"))?,
                );
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}: use --task embedder|sleep|fail, --input, --seconds, --exit-code"
                ));
            }
        }
    }
    Ok(parsed)
}

/// FNV-1a: stable across platforms and releases.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Feature hashing of lower-cased words with a sign bit, L2-normalised.
fn embed(text: &str) -> [f32; DIMENSIONS] {
    let mut v = [0f32; DIMENSIONS];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let h = fnv1a(word.to_lowercase().as_bytes());
        let slot = (h % DIMENSIONS as u64) as usize;
        v[slot] += if h & (1 << 63) == 0 { 1.0 } else { -1.0 };
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn run(args: &Args) -> Result<u8, String> {
    match args.task.as_str() {
        "embedder" => {
            let text = match &args.input {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| format!("reading --input {path}: {e}"))?,
                None => SAMPLE.to_owned(),
            };
            for (n, line) in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .enumerate()
            {
                let v: Vec<String> = embed(line).iter().map(|x| format!("{x:.4}")).collect();
                println!("embedding {n} [{}] {line}", v.join(","));
            }
            Ok(args.exit_code.unwrap_or(0))
        }
        "sleep" => {
            let whole = args.seconds.floor() as u64;
            for s in 0..whole {
                println!("working: {s}/{whole} s");
                std::thread::sleep(Duration::from_secs(1));
            }
            std::thread::sleep(Duration::from_secs_f64(args.seconds - whole as f64));
            println!("done after {} s", args.seconds);
            Ok(args.exit_code.unwrap_or(0))
        }
        "fail" => {
            let code = args.exit_code.unwrap_or(1);
            eprintln!("failing on purpose with exit code {code}");
            Ok(code)
        }
        "survey" => {
            survey();
            Ok(args.exit_code.unwrap_or(0))
        }
        "litter" => {
            for path in [
                "/tmp/litter",
                "/run/litter",
                "/dev/shm/litter",
                "/dev/litter",
            ] {
                std::fs::write(path, "left behind").map_err(|e| format!("writing {path}: {e}"))?;
            }
            println!("root writable: {}", std::fs::write("/litter", "x").is_ok());
            let me = std::env::current_exe().map_err(|e| format!("finding myself: {e}"))?;
            std::process::Command::new(me)
                .args(["--task", "sleep", "--seconds", "3600"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("starting the process left behind: {e}"))?;
            survey();
            Ok(args.exit_code.unwrap_or(0))
        }
        other => Err(format!(
            "unknown task {other:?}: use embedder, sleep, fail, survey or litter"
        )),
    }
}

/// Prints, a line each, what this task can see that another could have left: the names of its
/// environment variables (`survey: env NAME`), every file under `/tmp`, `/run` and `/dev/shm`
/// and every regular file in `/dev` (`survey: file PATH`), and every other process but PID 1
/// and the kernel's threads (`survey: process PID NAME`).
fn survey() {
    for (name, _) in std::env::vars_os() {
        println!("survey: env {}", name.to_string_lossy());
    }
    let mut todo: Vec<std::path::PathBuf> = ["/tmp", "/run", "/dev/shm"].map(Into::into).into();
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => todo.push(entry.path()),
                _ => println!("survey: file {}", entry.path().display()),
            }
        }
    }
    for entry in std::fs::read_dir("/dev").into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            println!("survey: file {}", entry.path().display());
        }
    }
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Kernel threads carry PF_KTHREAD (0x200000) in the flags, the 9th field.
        let kernel = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok())
            .is_none_or(|flags| flags & 0x0020_0000 != 0);
        if pid == 1 || pid == me || kernel {
            continue;
        }
        let name = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map_or("?", |(name, _)| name);
        println!("survey: process {pid} {name}");
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match parse(&argv).and_then(|a| run(&a)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tiffany: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn embeddings_are_deterministic_normalised_and_tell_texts_apart() {
        let a = embed("FAR runs agents");
        assert_eq!(
            a,
            embed("far RUNS agents!"),
            "case and punctuation do not matter"
        );
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        assert_ne!(a, embed("Flintlock creates VMs"));
        assert_eq!(embed(""), [0.0; DIMENSIONS]);
    }

    #[test]
    fn arguments_parse_and_bad_ones_name_the_fix() {
        assert_eq!(
            parse(&args("--task sleep --seconds 2.5 --exit-code 3")).unwrap(),
            Args {
                task: "sleep".into(),
                input: None,
                seconds: 2.5,
                exit_code: Some(3)
            }
        );
        assert!(
            parse(&args("--exit-code 300"))
                .unwrap_err()
                .contains("0 to 255")
        );
        assert!(
            parse(&args("--seconds"))
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            parse(&args("--bogus"))
                .unwrap_err()
                .contains("--task embedder|sleep|fail")
        );
        assert_eq!(
            run(&parse(&args("--task fail --exit-code 3")).unwrap()),
            Ok(3)
        );
        assert!(run(&parse(&args("--task dance")).unwrap()).is_err());
    }
}
