//! Process-level conventions shared by the Nanofleet binaries (`nanofleet-agent`,
//! `nanofleet`): logging, stop signals, error reports and exit codes.

use std::io::IsTerminal as _;

/// Exit code for invalid configuration or usage (BSD `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// Logs to stderr, filtered by `RUST_LOG` (else `default`), in colour only on a terminal.
pub fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()),
        )
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr)
        .init();
}

/// Parses the command line; a usage error prints clap's message and exits 64, `--help`
/// and `--version` print and exit 0.
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    }
}

/// Prints `program: message` for invalid configuration and exits 64.
pub fn usage_error(program: &str, msg: impl std::fmt::Display) -> ! {
    eprintln!("{program}: {msg}");
    std::process::exit(EXIT_USAGE);
}

/// Runs `main` on a multi-threaded runtime; an error is reported on one line and
/// exits 1.
pub fn run_main<F>(program: &str, main: F)
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(main) {
        eprintln!("{program}: {}", report(e.as_ref()));
        std::process::exit(1);
    }
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM: both stop a Nanofleet process in order.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// An error and its causes on one line, without repeating a cause that the message
/// before it already quotes.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("mqtt listener on 127.0.0.1:7883: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let e =
            Outer { source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use") };
        assert_eq!(super::report(&e), "mqtt listener on 127.0.0.1:7883: Address already in use");
    }
}
