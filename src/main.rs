#![forbid(unsafe_code)]
#![deny(clippy::too_many_lines)]
//! The `portcullis` binary: parse arguments, set up tracing, call the library.

use clap::Parser;
use portcullis::cli::{self, Cli, Command, LogFormat, exit};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the system allocator: under load the store pages
/// nodes in and out of its cache, and glibc's allocator kept the freed
/// memory (RSS grew to 1.5 GB at a million leases with a 128 MiB cache);
/// it also spent ~15% of the broker's CPU. See docs/benchmarks.md.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // tokio-postgres logs statements and their parameters at debug: a
    // database login's SCRAM verifier among them. Never below warn.
    let filter = match "tokio_postgres=warn".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    // Colour only for a person at a terminal: a file, a pipe or journald
    // gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn main() {
    // No transparent huge pages for this process: the store and mimalloc
    // touch memory a little at a time, and with huge pages each first
    // touch brought in and cleared 2 MiB. Off, RSS is lower and bulk
    // revocations faster, grants/s unchanged (docs/benchmarks.md, "Issue
    // 22, fifth session"). Best effort: a kernel that refuses keeps them.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(exit::FAILURE);
        }
    };
    let code = runtime.block_on(async move {
        match &cli.command {
            Command::Serve(args) => {
                init_tracing(cli.log_format, "info");
                serve(args).await
            }
            _ => {
                init_tracing(cli.log_format, "warn");
                match cli::run_client(cli).await {
                    Ok(code) => code,
                    Err(f) => {
                        eprintln!("error: {}", f.message);
                        f.code
                    }
                }
            }
        }
    });
    std::process::exit(code);
}

async fn serve(args: &cli::ServeArgs) -> i32 {
    let (cfg, dev) = match cli::serve_config(args) {
        Ok(c) => c,
        Err(f) => {
            eprintln!("error: {}", f.message);
            return f.code;
        }
    };
    // Held until the process exits: a second broker on the same directory
    // stops here, naming this one.
    let _lock = match cli::lock_data_dir(&cfg, dev.as_ref()) {
        Ok(l) => l,
        Err(f) => {
            eprintln!("error: {}", f.message);
            return f.code;
        }
    };
    let running = match portcullis::server::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
    };
    if let Some(dir) = &dev {
        let endpoints = portcullis::dev::Endpoints {
            grpc: running.grpc_addr,
            http: running.http_addr,
            federation: running.federation_addr,
        };
        if let Err(e) = dir.write_endpoints(&endpoints) {
            eprintln!("error: {e}");
            running.shutdown().await;
            return exit::FAILURE;
        }
        eprintln!(
            "{}",
            cli::dev_banner(
                dir,
                running.grpc_addr,
                running.http_addr,
                running.console_url.as_deref(),
            )
        );
    } else {
        let http = running
            .http_addr
            .map_or_else(|| "off".to_owned(), |a| a.to_string());
        eprintln!(
            "portcullis listening: gRPC {}, HTTP {http}",
            running.grpc_addr
        );
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    exit::OK
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
