//! The pgweir binary: argument parsing, logging and the runtime. Everything else is in the
//! library so tests can run the proxy in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use pgweir::config::Config;

/// pgweir: a transaction-mode PostgreSQL connection pooler.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). See config/example.toml.
    #[arg(long, short, env = "PGWEIR_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start a throwaway PostgreSQL (initdb in a temp dir) with pgweir in front of it.
    Demo {
        /// Where pgweir listens; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
    },
    /// Validate a configuration file and print every problem found.
    Check,
    /// Print the pools table (like PgBouncer's SHOW POOLS) from a running pgweir's admin API.
    Status {
        /// Admin API address; default: [admin] addr from --config, else 127.0.0.1:6433.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Exit 0 when a running pgweir answers GET /health (or /ready with --ready): for container
    /// HEALTHCHECKs on images without curl.
    Health {
        /// Admin API address; default: [admin] addr from --config, else 127.0.0.1:6433.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Ask /ready (pools reachable, not paused, not draining) instead of /health.
        #[arg(long)]
        ready: bool,
    },
    /// Make a running pgweir report not-ready (POST /api/drain) so a load balancer stops sending
    /// it new clients, then wait; for a Kubernetes preStop hook. SIGTERM then drains the rest.
    Drain {
        /// Admin API address; default: [admin] addr from --config, else 127.0.0.1:6433.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// File holding the admin bearer token (e.g. a mounted Secret).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// How long to wait after the drain request, e.g. "10s".
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

/// EX_USAGE / EX_CONFIG from sysexits.h, so scripts can tell a bad config from a crash.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGWEIR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgweir: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Some(Command::Demo { listen }) => demo(listen),
        Some(Command::Status { admin }) => {
            print!("{}", status(admin_addr(admin, cli.config.as_deref())?)?);
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Health { admin, ready }) => {
            let addr = admin_addr(admin, cli.config.as_deref())?;
            let path = if ready { "/ready" } else { "/health" };
            match http(addr, "GET", path, None) {
                Ok((200, _)) => Ok(ExitCode::SUCCESS),
                Ok((code, body)) => {
                    eprintln!("pgweir at {addr}: {path} answered {code}: {body}");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    eprintln!("pgweir at {addr}: {e:#}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Some(Command::Drain {
            admin,
            token_file,
            wait,
        }) => {
            let addr = admin_addr(admin, cli.config.as_deref())?;
            let token = match token_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("cannot read {}", f.display()))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            match http(addr, "POST", "/api/drain", token.as_deref())? {
                (200, _) => eprintln!("pgweir at {addr} is draining; waiting {wait:?}"),
                (code, body) => anyhow::bail!("POST /api/drain answered {code}: {body}"),
            }
            std::thread::sleep(wait);
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Check) => {
            let path = cli.config.context("pgweir check needs --config FILE")?;
            match Config::load(&path) {
                Ok(_) => {
                    println!("{}: OK", path.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    Ok(ExitCode::from(EXIT_CONFIG))
                }
            }
        }
        None => {
            let path = cli
                .config
                .context("no configuration: run `pgweir --config FILE` (see config/example.toml) or `pgweir demo`")?;
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("pgweir: invalid configuration {}:\n{e}", path.display());
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
            runtime(config.listen.worker_threads())?.block_on(pgweir::app::run_until_signal(config, Some(path)))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The admin API address: given, else from --config, else the default.
fn admin_addr(admin: Option<SocketAddr>, config: Option<&std::path::Path>) -> anyhow::Result<SocketAddr> {
    Ok(match (admin, config) {
        (Some(a), _) => a,
        (None, Some(path)) => Config::load(path)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .admin
            .addr
            .context("the admin API is disabled in that config ([admin] addr = \"\")")?,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 6433)),
    })
}

/// One HTTP/1.1 request to the admin API; returns (status code, body). axum answers with a
/// Content-Length body (no chunking), so reading to the end is enough.
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .with_context(|| format!("cannot reach the admin API at {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: pgweir\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP status line")?;
    Ok((code, body.to_owned()))
}

/// Fetches /api/pools and renders it as a table.
fn status(addr: SocketAddr) -> anyhow::Result<String> {
    let (code, body) = http(addr, "GET", "/api/pools", None)?;
    if code != 200 {
        anyhow::bail!("admin API answered {code}: {body}");
    }
    let pools: serde_json::Value = serde_json::from_str(&body).context("admin API returned invalid JSON")?;
    let mut out = format!(
        "{:<20} {:<16} {:<11} {:>5} {:>7} {:>5} {:>8} {:>7} {:>9} {:>7}\n",
        "database", "user", "mode", "size", "active", "idle", "waiting", "util%", "timeouts", "paused"
    );
    for p in pools.as_array().map(Vec::as_slice).unwrap_or_default() {
        out.push_str(&format!(
            "{:<20} {:<16} {:<11} {:>5} {:>7} {:>5} {:>8} {:>7} {:>9} {:>7}\n",
            p["database"].as_str().unwrap_or(""),
            p["user"].as_str().unwrap_or(""),
            p["mode"].as_str().unwrap_or(""),
            p["size"],
            p["servers"]["active"],
            p["servers"]["idle"],
            p["clients"]["waiting"],
            p["utilisation_percent"],
            p["acquire_timeouts"],
            p["paused"],
        ));
    }
    Ok(out)
}

/// `workers = 1` gets tokio's current-thread scheduler: one event loop like PgBouncer's, with
/// no work stealing, no cross-thread wake-ups and no scheduler atomics. On a small machine
/// shared with PostgreSQL that costs about a fifth less CPU per transaction than a
/// multi-threaded runtime (docs/performance.md); more workers are for more cores.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all();
    builder.build().context("could not start the tokio runtime")
}

fn demo(listen: SocketAddr) -> anyhow::Result<ExitCode> {
    eprintln!("pgweir demo: starting a throwaway PostgreSQL (initdb into a temp dir)…");
    let pg = pgweir::embedded_pg::EmbeddedPostgres::start(Default::default())
        .context("could not start the embedded PostgreSQL")?;
    let rt = runtime(pgweir::config::auto_workers())?;
    rt.block_on(async {
        let listener_addr = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l.local_addr()?,
            Err(e) if listen.port() != 0 => {
                eprintln!("pgweir demo: {listen} is busy ({e}); using a free port instead");
                SocketAddr::new(listen.ip(), 0)
            }
            Err(e) => return Err(e.into()),
        };
        let config = pgweir::demo::demo_config(&pg, listener_addr);
        let proxy = pgweir::app::Proxy::start(config).await?;
        let addr = proxy.local_addr();
        let (user, password) = pgweir::embedded_pg::roles::SCRAM;
        println!();
        println!("pgweir is pooling PostgreSQL {}:{} (data in {}).", pg.host(), pg.port(), pg.data_dir().display());
        println!("Connect through pgweir with:");
        println!();
        println!("    psql \"postgresql://{user}:{password}@{}:{}/app\"", addr.ip(), addr.port());
        println!();
        println!("Try many clients at once (pool_size is 5):");
        println!(
            "    PGPASSWORD={password} pgbench -h {} -p {} -U {user} -i app && PGPASSWORD={password} pgbench -h {} -p {} -U {user} -c 50 -T 10 app",
            addr.ip(),
            addr.port(),
            addr.ip(),
            addr.port()
        );
        println!();
        println!("Press Ctrl-C to stop; the throwaway cluster is deleted.");
        pgweir::shutdown::wait_for_signal().await;
        proxy.shutdown(std::time::Duration::from_secs(5)).await;
        anyhow::Ok(())
    })?;
    drop(pg);
    Ok(ExitCode::SUCCESS)
}
