//! A throwaway PostgreSQL cluster in a temp dir, for `pgweir demo` and the integration tests.
//!
//! Everything here is synchronous std code driving the PostgreSQL binaries (`initdb`, `pg_ctl`,
//! `psql`) with [`std::process::Command`]; it never touches the wire protocol.
//!
//! # Speed: one template per process
//!
//! Dozens of tests each want a fresh cluster on a small CI box, and `initdb` plus creating the
//! roles costs over a second. So the first cluster a process asks for builds a *template*:
//! initdb, start it once (Unix socket only), create the roles and database listed in [`roles`],
//! stop it cleanly. Every cluster, including the first, is then a recursive copy of the
//! template's data dir plus `pg_ctl start`. The template is the one process-wide cache (the
//! `TEMPLATE` static); it is not shared across processes because a half-built or stale copy
//! would be hard to detect. Statics are never dropped, so the template dir outlives its process:
//! the next process to build a template sweeps the dirs of dead processes (including clusters of
//! a test binary killed before its destructors ran, whose servers it stops first).
//!
//! A start is then mostly creating the ~1300 files of a data dir. That costs about 1 ms per file
//! on some VM disks but ~50 µs on tmpfs, so clusters go to `/dev/shm` when it is a tmpfs of at
//! least 1 GiB (they are deleted on drop, so they hold memory only while in use), else next to
//! the template; `PGWEIR_EMBEDDED_DIR` overrides. The template itself stays on disk.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When the effective uid is 0 (read from
//! `/proc/self/status`, since the crate forbids `unsafe` and has no libc dependency), `initdb`,
//! `pg_ctl` and the server run as `postgres` (or `nobody`) through the safe
//! [`CommandExt::uid`]/[`CommandExt::gid`], and every dir we create is chowned to that user.
//! The template then lives directly under `/tmp` (not `$TMPDIR`), so that user can traverse
//! every parent; `/dev/shm` is world-traversable too. `psql` runs as the caller: root may use
//! the socket of a 0700 dir it does not own.
//!
//! # Layout of one cluster
//!
//! ```text
//! /dev/shm/pgweir-pg-<pidns>-<pid>-<n>/  0700, owned by the PostgreSQL user; the socket dir
//!     data/                             PGDATA (copy of the template's)
//!     data/pgweir.conf                  included by postgresql.conf; rewritten before each start
//!     postgres.log                      server log (pg_ctl -l)
//! ```

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The roles (and passwords) every embedded cluster has. Each login role may connect to `app`
/// and `postgres` and has CREATE on database `app` and on its schema `public`.
pub mod roles {
    /// The bootstrap superuser: trusted over the Unix socket, SCRAM over TCP.
    pub const SUPERUSER: (&str, &str) = ("postgres", "postgres");
    /// Password stored as a SCRAM-SHA-256 verifier; TCP logins use `scram-sha-256`.
    pub const SCRAM: (&str, &str) = ("app_scram", "scram_pw");
    /// Password stored as an md5 hash; TCP logins use `md5`.
    pub const MD5: (&str, &str) = ("app_md5", "md5_pw");
    /// TCP logins use `password` (cleartext on the wire); stored as SCRAM.
    pub const PLAIN: (&str, &str) = ("app_plain", "plain_pw");
    /// No password; TCP logins use `trust`.
    pub const TRUST: &str = "app_trust";
    /// The database the login roles may create objects in (owner: the superuser).
    pub const DATABASE: &str = "app";
}

/// SQL run once in the template. `password_encryption` is set per role so `app_md5` really is
/// stored as md5 (the default is SCRAM).
const SETUP_SQL: &str = "\
SET password_encryption = 'scram-sha-256';
ALTER ROLE postgres PASSWORD 'postgres';
CREATE ROLE app_scram LOGIN PASSWORD 'scram_pw';
CREATE ROLE app_plain LOGIN PASSWORD 'plain_pw';
CREATE ROLE app_trust LOGIN;
SET password_encryption = 'md5';
CREATE ROLE app_md5 LOGIN PASSWORD 'md5_pw';
RESET password_encryption;
CREATE DATABASE app OWNER postgres;
GRANT CREATE ON DATABASE app TO app_scram, app_md5, app_plain, app_trust;
\\connect app
GRANT CREATE ON SCHEMA public TO app_scram, app_md5, app_plain, app_trust;
";

/// pg_hba.conf of every cluster: first match wins, so the per-role lines precede the catch-all.
const PG_HBA: &str = "\
# Written by pgweir's embedded_pg. Loopback only.
local all all                  trust
host  all app_md5   127.0.0.1/32 md5
host  all app_plain 127.0.0.1/32 password
host  all app_trust 127.0.0.1/32 trust
host  all all       127.0.0.1/32 scram-sha-256
";

/// Name of our config file inside the data dir, included from postgresql.conf.
const CONF_FILE: &str = "pgweir.conf";
/// How many fresh ports `start` tries when the one it picked was taken in the meantime.
const PORT_ATTEMPTS: u32 = 5;
/// `pg_ctl -t`: seconds to wait for start/stop.
const PG_CTL_TIMEOUT: &str = "30";
/// Prefix of every dir we create under the temp dir; the sweep only touches these.
const DIR_PREFIX: &str = "pgweir-pg-";

/// Options for [`EmbeddedPostgres::start`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// `max_connections` of the server (default 200).
    pub max_connections: u32,
    /// Serve TLS (`ssl = on`) with this certificate chain and key (PEM).
    pub tls: Option<EmbeddedTls>,
    /// Extra postgresql.conf lines, appended last so they override our defaults.
    pub extra_conf: Vec<String>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            max_connections: 200,
            tls: None,
            extra_conf: Vec::new(),
        }
    }
}

/// Certificate and key the embedded server presents to TLS clients.
#[derive(Debug, Clone)]
pub struct EmbeddedTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Why an embedded cluster could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The PostgreSQL server binaries are not installed (or not where `PG_BIN_DIR` says).
    #[error(
        "PostgreSQL server binaries not found ({0}); install them with `apt-get install -y postgresql` \
         (Debian/Ubuntu) or set PG_BIN_DIR to the directory containing initdb"
    )]
    NotFound(String),
    /// A PostgreSQL tool failed; `output` holds its stdout, stderr and, for the server, the log.
    #[error("{what} failed:\n{output}")]
    Command {
        /// What we were doing, e.g. `pg_ctl start (port 5433)`.
        what: String,
        /// The tool's output.
        output: String,
    },
    /// Running as root but there is no unprivileged user to run PostgreSQL as.
    #[error("running as root and neither `postgres` nor `nobody` is in /etc/passwd; PostgreSQL refuses to run as root")]
    NoUnprivilegedUser,
    /// File-system or process error with the path involved.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// What we were doing.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Any other I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Attaches a path and a verb to an I/O error.
fn at(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EmbeddedError {
    let path = path.to_path_buf();
    move |source| EmbeddedError::File { what, path, source }
}

/// The unprivileged account the server runs as when we are root.
#[derive(Debug, Clone)]
struct PgUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// A running (or stopped, or killed) throwaway PostgreSQL cluster. Dropping it stops the server
/// (`-m immediate`) and deletes its directory.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    /// Temp dir holding data dir, socket and log.
    root: PathBuf,
    data: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<PgUser>,
    port: u16,
    /// `''` for the template (socket only), `127.0.0.1` otherwise.
    listen_addresses: &'static str,
    opts: EmbeddedOptions,
    /// Whether we believe the postmaster is up (set by start, cleared by stop/kill).
    running: bool,
}

/// The process-wide template (see the module docs). `None` until the first cluster is asked
/// for; a failed build leaves it `None` so the next caller retries and gets the real error.
static TEMPLATE: Mutex<Option<Arc<EmbeddedPostgres>>> = Mutex::new(None);

/// Distinguishes the dirs of one process.
static DIR_COUNTER: AtomicU32 = AtomicU32::new(0);

impl EmbeddedPostgres {
    /// Starts a fresh cluster (copy of the process's template, which is built on first use) on a
    /// free loopback port. Fails with [`EmbeddedError::NotFound`] when PostgreSQL is not installed.
    pub fn start(opts: EmbeddedOptions) -> Result<Self, EmbeddedError> {
        let template = template()?;
        let began = Instant::now();
        let root = create_cluster_dir(&cluster_base(), template.run_as.as_ref())?;
        let mut pg = EmbeddedPostgres {
            data: root.join("data"),
            root,
            bin_dir: template.bin_dir.clone(),
            run_as: template.run_as.clone(),
            port: 0,
            listen_addresses: "127.0.0.1",
            opts,
            running: false,
        };
        // From here on an early return drops `pg`, which deletes the dir.
        let owner = pg.run_as.as_ref().map(|u| (u.uid, u.gid));
        copy_tree(&template.data, &pg.data, owner)?;
        let copied = began.elapsed();
        let mut attempt = 1;
        loop {
            pg.port = free_port()?;
            match pg.start_server() {
                Ok(()) => {
                    tracing::debug!(
                        port = pg.port,
                        copy_ms = copied.as_millis() as u64,
                        total_ms = began.elapsed().as_millis() as u64,
                        "embedded PostgreSQL started"
                    );
                    return Ok(pg);
                }
                Err(e) if attempt < PORT_ATTEMPTS && port_taken(&e) => {
                    tracing::debug!(port = pg.port, "port taken before the server bound it; trying another");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// TCP port the server listens on (on [`host`](Self::host)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always `127.0.0.1`: the server listens on loopback only.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// Directory holding `initdb`, `pg_ctl`, `psql`, `pgbench`.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The cluster's data directory (PGDATA).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Directory of the server's Unix socket (usable as `host` by libpq clients).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The server log file.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// Path of a PostgreSQL tool: from [`bin_dir`](Self::bin_dir) if it is there, else the bare
    /// name (looked up on PATH), because some packagings put client tools elsewhere.
    pub fn tool(&self, name: &str) -> PathBuf {
        tool_path(&self.bin_dir, name)
    }

    /// A `psql` command connected as the superuser over the Unix socket to `dbname`: `-X -A -t
    /// -q`, `ON_ERROR_STOP`, never prompting, with the caller's `PG*` environment removed.
    pub fn psql_command(&self, dbname: &str) -> Command {
        let mut cmd = Command::new(self.tool("psql"));
        clean_env(&mut cmd);
        cmd.current_dir(&self.root)
            .args(["-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.root)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", roles::SUPERUSER.0, "-d", dbname]);
        cmd
    }

    /// Runs `sql` (a script: statements run one by one, stopping at the first error) as the
    /// superuser via psql over the Unix socket and returns its `-At` output without the final
    /// newline. Fails with psql's stderr.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, EmbeddedError> {
        let mut cmd = self.psql_command(dbname);
        cmd.args(["-f", "-"]);
        let what = format!("psql -d {dbname} (port {})", self.port);
        let out = run_with_stdin(&mut cmd, &what, sql)?;
        Ok(out.trim_end_matches('\n').to_owned())
    }

    /// Stops the server (`pg_ctl stop -m fast`). A no-op when it is not running.
    pub fn stop(&mut self) -> Result<(), EmbeddedError> {
        if !self.running {
            return Ok(());
        }
        self.pg_ctl_stop("fast")?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again on the same data dir and port (after [`stop`](Self::stop) or
    /// [`kill`](Self::kill)). A no-op when it is running.
    pub fn start_again(&mut self) -> Result<(), EmbeddedError> {
        if self.running {
            return Ok(());
        }
        // The port was free a moment ago and nobody else is told about it, so a clash is a
        // short-lived accident (e.g. an outgoing connection's ephemeral port): retry briefly.
        let mut attempt = 1;
        loop {
            match self.start_server() {
                Err(e) if attempt < PORT_ATTEMPTS && port_taken(&e) => {
                    std::thread::sleep(Duration::from_millis(200));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again): same port, same data.
    pub fn restart(&mut self) -> Result<(), EmbeddedError> {
        self.stop()?;
        self.start_again()
    }

    /// SIGKILLs the postmaster, as a crash would, and waits until it and its children are gone.
    /// The data dir stays; [`start_again`](Self::start_again) runs crash recovery.
    pub fn kill(&mut self) -> Result<(), EmbeddedError> {
        let Some(pid) = self.postmaster_pid() else {
            return Err(EmbeddedError::Command {
                what: "kill the embedded postmaster".to_owned(),
                output: "the server is not running".to_owned(),
            });
        };
        // Children get reparented once the postmaster dies, so list them first: the next start
        // refuses to run while any of them still holds the old shared memory.
        let children = child_pids(pid);
        let mut cmd = self.pg_command("pg_ctl");
        cmd.args(["kill", "KILL", &pid.to_string()]);
        run(&mut cmd, "pg_ctl kill KILL")?;
        self.running = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        while process_alive(pid) || children.iter().any(|&c| process_alive(c)) {
            if Instant::now() > deadline {
                return Err(EmbeddedError::Command {
                    what: "kill the embedded postmaster".to_owned(),
                    output: format!(
                        "postmaster {pid} or one of its children {children:?} still runs 30s after SIGKILL"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // If nobody reaps the dead postmaster (a container whose PID 1 does not), it lingers as
        // a zombie, which PostgreSQL's lock-file checks take for a live postmaster. It is dead,
        // so its lock files (data dir and socket) are stale.
        if Path::new(&format!("/proc/{pid}")).exists() {
            let socket_lock = self.root.join(format!(".s.PGSQL.{}.lock", self.port));
            for lock in [self.data.join("postmaster.pid"), socket_lock] {
                match fs::remove_file(&lock) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(at("remove", &lock)(e));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// PID of the running postmaster, from `postmaster.pid`; `None` when stopped or killed.
    pub fn postmaster_pid(&self) -> Option<u32> {
        if !self.running {
            return None;
        }
        read_lock_pid(&self.data)
    }

    /// The server log, for failure messages.
    pub fn log_contents(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Writes `pgweir.conf` for the current port and options, then `pg_ctl start -w`.
    fn start_server(&mut self) -> Result<(), EmbeddedError> {
        self.write_conf()?;
        let log = self.log_path();
        let log_offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.pg_command("pg_ctl");
        cmd.args(["start", "-w", "-s", "-t", PG_CTL_TIMEOUT, "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&log);
        let what = format!("pg_ctl start (port {}, data dir {})", self.port, self.data.display());
        match run(&mut cmd, &what) {
            Ok(_) => {
                self.running = true;
                Ok(())
            }
            Err(EmbeddedError::Command { what, mut output }) => {
                // pg_ctl only says "examine the log"; the reason is in the log.
                let _ = write!(
                    output,
                    "\n--- server log ({}) ---\n{}",
                    log.display(),
                    read_from(&log, log_offset)
                );
                Err(EmbeddedError::Command { what, output })
            }
            Err(e) => Err(e),
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), EmbeddedError> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.args(["stop", "-w", "-s", "-t", PG_CTL_TIMEOUT, "-m", mode, "-D"])
            .arg(&self.data);
        run(&mut cmd, &format!("pg_ctl stop -m {mode} (port {})", self.port)).map(drop)
    }

    fn write_conf(&self) -> Result<(), EmbeddedError> {
        let mut conf = String::from("# Written by pgweir's embedded_pg before every start.\n");
        let _ = writeln!(conf, "listen_addresses = '{}'", self.listen_addresses);
        let _ = writeln!(conf, "port = {}", self.port);
        let _ = writeln!(conf, "unix_socket_directories = '{}'", conf_quote(&self.root));
        let _ = writeln!(conf, "max_connections = {}", self.opts.max_connections);
        // A throwaway cluster needs no durability: skip every flush.
        conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        conf.push_str("shared_buffers = 32MB\n");
        conf.push_str("logging_collector = off\nlog_destination = 'stderr'\n");
        conf.push_str("log_line_prefix = '%m [%p] %q%u@%d '\n");
        if let Some(tls) = &self.opts.tls {
            // PostgreSQL refuses a key file others can read.
            for (name, pem, mode) in [
                ("server.crt", &tls.cert_pem, 0o644),
                ("server.key", &tls.key_pem, 0o600),
            ] {
                let path = self.data.join(name);
                fs::write(&path, pem).map_err(at("write", &path))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(at("chmod", &path))?;
                chown_to(&path, self.run_as.as_ref())?;
            }
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        for line in &self.opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let path = self.data.join(CONF_FILE);
        fs::write(&path, conf).map_err(at("write", &path))?;
        chown_to(&path, self.run_as.as_ref())
    }

    /// A command for a server-side tool, run as the PostgreSQL user when we are root.
    fn pg_command(&self, name: &str) -> Command {
        pg_command(&tool_path(&self.bin_dir, name), &self.root, self.run_as.as_ref())
    }

    /// Stops a server whose postmaster is alive, ignoring errors (used by `Drop` and the sweep).
    fn stop_immediately(&self) {
        if read_lock_pid(&self.data).is_some_and(process_alive)
            && let Err(e) = self.pg_ctl_stop("immediate")
        {
            tracing::warn!(error = %e, "could not stop the embedded PostgreSQL");
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop_immediately();
        if let Err(e) = fs::remove_dir_all(&self.root)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.root.display(), error = %e, "could not remove the embedded PostgreSQL dir");
        }
    }
}

/// The process's template, built on first use. Holding the lock while building makes
/// concurrent first callers wait for one build instead of racing.
fn template() -> Result<Arc<EmbeddedPostgres>, EmbeddedError> {
    let mut slot = TEMPLATE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(t) = slot.as_ref() {
        return Ok(Arc::clone(t));
    }
    let t = Arc::new(build_template()?);
    *slot = Some(Arc::clone(&t));
    Ok(t)
}

/// initdb, start with the socket only, create roles and database, stop cleanly.
fn build_template() -> Result<EmbeddedPostgres, EmbeddedError> {
    let began = Instant::now();
    let bin_dir = find_bin_dir()?;
    let run_as = if is_root() { Some(unprivileged_user()?) } else { None };
    sweep_stale_dirs();
    let root = create_cluster_dir(&temp_base(), run_as.as_ref())?;
    let mut tpl = EmbeddedPostgres {
        data: root.join("data"),
        root,
        bin_dir,
        run_as,
        port: free_port()?,
        listen_addresses: "",
        opts: EmbeddedOptions::default(),
        running: false,
    };
    let mut initdb = tpl.pg_command("initdb");
    initdb
        .arg("-D")
        .arg(&tpl.data)
        .args([
            "-U",
            roles::SUPERUSER.0,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ])
        .args(["-E", "UTF8", "--locale=C", "--no-sync"]);
    run(&mut initdb, "initdb")?;
    let hba = tpl.data.join("pg_hba.conf");
    fs::write(&hba, PG_HBA).map_err(at("write", &hba))?;
    let conf = tpl.data.join("postgresql.conf");
    let mut main_conf = fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(at("open", &conf))?;
    writeln!(
        main_conf,
        "\n# pgweir: per-cluster settings (port, socket dir, options)\ninclude '{CONF_FILE}'"
    )
    .map_err(at("write", &conf))?;
    let initialised = began.elapsed();
    tpl.start_server()?;
    tpl.psql("postgres", SETUP_SQL)?;
    tpl.stop()?;
    tracing::debug!(
        dir = %tpl.root.display(),
        initdb_ms = initialised.as_millis() as u64,
        total_ms = began.elapsed().as_millis() as u64,
        "embedded PostgreSQL template ready"
    );
    Ok(tpl)
}

/// `PG_BIN_DIR`, else `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`, else
/// the directory of `initdb` on PATH.
fn find_bin_dir() -> Result<PathBuf, EmbeddedError> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
        return Err(EmbeddedError::NotFound(format!(
            "PG_BIN_DIR={} has no initdb",
            dir.display()
        )));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").stdin(Stdio::null()).output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // pg_config may come from libpq-dev alone, without the server.
        if out.status.success() && dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    if let Some(dir) = newest_debian_bin_dir(Path::new("/usr/lib/postgresql")) {
        return Ok(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                // Resolve symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin)
                // so pg_ctl, psql and pgbench are looked up next to the real binary.
                let real = fs::canonicalize(&initdb).unwrap_or(initdb);
                return Ok(real.parent().map_or(dir, Path::to_path_buf));
            }
        }
    }
    Err(EmbeddedError::NotFound(
        "no PG_BIN_DIR, no pg_config --bindir with initdb, no /usr/lib/postgresql/*/bin/initdb, no initdb on PATH"
            .to_owned(),
    ))
}

/// Debian/Ubuntu install each major version under `/usr/lib/postgresql/<major>/bin`.
fn newest_debian_bin_dir(base: &Path) -> Option<PathBuf> {
    fs::read_dir(base)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = version_key(&e.file_name().to_string_lossy())?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// `"9.6"` → `[9, 6]`, `"15"` → `[15]`: numeric so 10 sorts above 9.6.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|p| p.parse().ok()).collect()
}

fn tool_path(bin_dir: &Path, name: &str) -> PathBuf {
    let p = bin_dir.join(name);
    if p.is_file() { p } else { PathBuf::from(name) }
}

/// Removes the caller's libpq environment (PGHOST, PGPASSWORD, PGSERVICE, PGOPTIONS…) so only
/// our arguments decide where tools connect, and pins the C locale so messages we search for
/// ("Address already in use") are in English.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("LC_ALL", "C").env("LANG", "C").env("PGCONNECT_TIMEOUT", "10");
}

fn pg_command(program: &Path, cwd: &Path, run_as: Option<&PgUser>) -> Command {
    let mut cmd = Command::new(program);
    clean_env(&mut cmd);
    // The caller's cwd may be unreadable by the PostgreSQL user; initdb and pg_ctl need one.
    cmd.current_dir(cwd);
    if let Some(user) = run_as {
        // std drops supplementary groups when switching uid as root.
        cmd.uid(user.uid)
            .gid(user.gid)
            .env("HOME", cwd)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    cmd
}

/// Runs to completion; `Err(Command)` with stdout and stderr unless it exits 0.
fn run(cmd: &mut Command, what: &str) -> Result<String, EmbeddedError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, what, e))?;
    finish(what, out)
}

/// Like [`run`], feeding `input` on stdin from a thread so a large script cannot deadlock
/// against a full stdout pipe.
fn run_with_stdin(cmd: &mut Command, what: &str, input: &str) -> Result<String, EmbeddedError> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, what, e))?;
    let writer = child.stdin.take().map(|mut stdin| {
        let input = input.to_owned();
        // A write error means psql exited early; its exit status and stderr tell why.
        std::thread::spawn(move || drop(stdin.write_all(input.as_bytes())))
    });
    let out = child.wait_with_output()?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    finish(what, out)
}

fn spawn_error(cmd: &Command, what: &str, e: io::Error) -> EmbeddedError {
    EmbeddedError::Command {
        what: what.to_owned(),
        output: format!("could not run {}: {e}", Path::new(cmd.get_program()).display()),
    }
}

fn finish(what: &str, out: std::process::Output) -> Result<String, EmbeddedError> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(EmbeddedError::Command {
        what: what.to_owned(),
        output: format!("{}\n{stdout}{stderr}", out.status).trim_end().to_owned(),
    })
}

/// Whether a start failed because another socket got our port first.
fn port_taken(e: &EmbeddedError) -> bool {
    matches!(e, EmbeddedError::Command { output, .. }
        if output.contains("Address already in use") || output.contains("could not bind IPv4 address"))
}

/// A port the kernel just handed out on loopback. It is released before the server binds it,
/// so callers retry when the server then finds it taken.
fn free_port() -> Result<u16, EmbeddedError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Base for the template: `/tmp` when root (every parent must be traversable by the PostgreSQL
/// user, which `$TMPDIR` may not be) or when `$TMPDIR` is long (the socket path must fit in
/// 107 bytes); `$TMPDIR` otherwise.
fn temp_base() -> PathBuf {
    let tmp = std::env::temp_dir();
    if is_root() || tmp.as_os_str().len() > 40 {
        PathBuf::from("/tmp")
    } else {
        tmp
    }
}

/// Base for the clusters: `$PGWEIR_EMBEDDED_DIR` if set, else `/dev/shm` when it is a tmpfs of
/// at least [`MIN_SHM_BYTES`], else [`temp_base`]. A cluster start is mostly creating the ~1300
/// files of a data dir, which costs ~1 ms per file on some VM disks and ~50 µs on tmpfs;
/// clusters are deleted on drop, so they hold memory only while a test runs. (The template,
/// which outlives its process, stays on disk.)
fn cluster_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGWEIR_EMBEDDED_DIR") {
        return PathBuf::from(dir);
    }
    let shm_ok = fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        let mem_total = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| mem_total_bytes(&m));
        tmpfs_size(&mounts, "/dev/shm", mem_total).is_some_and(|size| size >= MIN_SHM_BYTES)
    });
    if shm_ok { PathBuf::from("/dev/shm") } else { temp_base() }
}

/// Below this, `/dev/shm` (Docker's default is 64 MiB) could fill up under a pgbench test.
const MIN_SHM_BYTES: u64 = 1 << 30;

/// Size of the tmpfs mounted at `mount_point`, from `/proc/mounts` text: its `size=` option
/// (bytes with optional k/m/g/t suffix, or a percentage of RAM), or tmpfs's default of half the
/// RAM. `None` when it is not a tmpfs or the size is unknown.
fn tmpfs_size(mounts: &str, mount_point: &str, mem_total: Option<u64>) -> Option<u64> {
    let options = mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype, options) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
        (target == mount_point && fstype == "tmpfs").then_some(options)
    })?;
    let Some(size) = options.split(',').find_map(|o| o.strip_prefix("size=")) else {
        return mem_total.map(|m| m / 2);
    };
    if let Some(pct) = size.strip_suffix('%') {
        return Some(mem_total? / 100 * pct.parse::<u64>().ok()?);
    }
    let (digits, shift) = match size.as_bytes().last()? {
        b'k' | b'K' => (&size[..size.len() - 1], 10),
        b'm' | b'M' => (&size[..size.len() - 1], 20),
        b'g' | b'G' => (&size[..size.len() - 1], 30),
        b't' | b'T' => (&size[..size.len() - 1], 40),
        _ => (size, 0),
    };
    digits.parse::<u64>().ok()?.checked_shl(shift)
}

/// `MemTotal:  16318480 kB` from `/proc/meminfo`, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Our pid namespace's inode number: it keeps the sweep from mistaking a live process of another
/// container sharing /tmp for a dead one of ours.
fn pid_namespace() -> String {
    fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("pid:[")?.strip_suffix(']').map(str::to_owned)
        })
        .unwrap_or_else(|| "0".to_owned())
}

/// `pgweir-pg-<pidns>-`: prefix of every dir made by a process of our pid namespace.
fn namespace_prefix() -> String {
    format!("{DIR_PREFIX}{}-", pid_namespace())
}

/// A new 0700 dir under `base`, owned by the PostgreSQL user.
fn create_cluster_dir(base: &Path, run_as: Option<&PgUser>) -> Result<PathBuf, EmbeddedError> {
    let tag = format!("{}{}-", namespace_prefix(), std::process::id());
    loop {
        let n = DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{tag}{n}"));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                chown_to(&dir, run_as)?;
                return Ok(dir);
            }
            // Left behind by an earlier process with our pid; take the next number.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(at("create", &dir)(e)),
        }
    }
}

/// Removes dirs of dead processes of our pid namespace, stopping any server still running in
/// them (a test binary killed by a timeout never runs its destructors). Best effort.
fn sweep_stale_dirs() {
    // Without /proc every process would look dead, live ones included.
    if !Path::new("/proc/self/stat").exists() {
        return;
    }
    let mut bases = vec![temp_base(), cluster_base()];
    bases.dedup();
    let ns_prefix = namespace_prefix();
    let entries = bases.iter().filter_map(|b| fs::read_dir(b).ok()).flatten();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&ns_prefix)
            .and_then(|rest| rest.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let root = entry.path();
        let data = root.join("data");
        if let Some(postmaster) = read_lock_pid(&data).filter(|&p| process_alive(p)) {
            tracing::info!(dir = %root.display(), postmaster, "stopping a PostgreSQL left by a dead process");
            let bin_dir = find_bin_dir().unwrap_or_default();
            let run_as = fs::metadata(&data).ok().map(|m| PgUser {
                name: String::new(),
                uid: m.uid(),
                gid: m.gid(),
            });
            let run_as = run_as.filter(|_| is_root());
            let mut cmd = pg_command(&tool_path(&bin_dir, "pg_ctl"), &root, run_as.as_ref());
            cmd.args(["stop", "-w", "-s", "-t", PG_CTL_TIMEOUT, "-m", "immediate", "-D"])
                .arg(&data);
            let _ = run(&mut cmd, "pg_ctl stop");
        }
        tracing::debug!(dir = %root.display(), "removing a stale embedded PostgreSQL dir");
        let _ = fs::remove_dir_all(&root);
    }
}

/// Recursive copy keeping permission bits (PostgreSQL insists on a 0700 data dir) and, when
/// `owner` is given, chowning every entry (we copy as root for the PostgreSQL user).
fn copy_tree(src: &Path, dst: &Path, owner: Option<(u32, u32)>) -> Result<(), EmbeddedError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dst)
        .map_err(at("create", dst))?;
    for entry in fs::read_dir(src).map_err(at("read", src))? {
        let entry = entry.map_err(at("read", src))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let kind = entry.file_type().map_err(at("stat", &from))?;
        if kind.is_dir() {
            copy_tree(&from, &to, owner)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&from).map_err(at("read link", &from))?;
            std::os::unix::fs::symlink(target, &to).map_err(at("create link", &to))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(&to, Some(uid), Some(gid)).map_err(at("chown", &to))?;
            }
        } else {
            fs::copy(&from, &to).map_err(at("copy to", &to))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&to, Some(uid), Some(gid)).map_err(at("chown", &to))?;
            }
        }
    }
    let mode = fs::metadata(src).map_err(at("stat", src))?.permissions().mode();
    fs::set_permissions(dst, fs::Permissions::from_mode(mode)).map_err(at("chmod", dst))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dst, Some(uid), Some(gid)).map_err(at("chown", dst))?;
    }
    Ok(())
}

fn chown_to(path: &Path, run_as: Option<&PgUser>) -> Result<(), EmbeddedError> {
    match run_as {
        Some(u) => std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)).map_err(at("chown", path)),
        None => Ok(()),
    }
}

/// Effective uid 0, read from `/proc/self/status` (no libc, no unsafe).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| effective_uid(&s) == Some(0))
}

/// The second field of the `Uid:` line (real, effective, saved, fs).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `postgres` if it exists (the distro packages create it), else `nobody`.
fn unprivileged_user() -> Result<PgUser, EmbeddedError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(at("read", Path::new("/etc/passwd")))?;
    ["postgres", "nobody"]
        .into_iter()
        .find_map(|name| passwd_entry(&passwd, name))
        .ok_or(EmbeddedError::NoUnprivilegedUser)
}

fn passwd_entry(passwd: &str, name: &str) -> Option<PgUser> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        // Switching to uid 0 would defeat the purpose.
        (uid != 0).then(|| PgUser {
            name: name.to_owned(),
            uid,
            gid,
        })
    })
}

/// First line of `postmaster.pid`.
fn read_lock_pid(data: &Path) -> Option<u32> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// From `/proc/<pid>/stat`: exists and is not a zombie (`Z`) or dead (`X`).
fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_state_and_ppid(&s))
        .is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// `pid (comm) S ppid …`: comm may contain spaces and parentheses, so parse after the last `)`.
fn stat_state_and_ppid(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Live processes whose parent is `pid`.
fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| stat_state_and_ppid(&s))
                .is_some_and(|(_, ppid)| ppid == pid)
        })
        .collect()
}

/// The part of a file written after `offset` (the log of this start attempt), at most 8 KiB.
fn read_from(path: &Path, offset: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let mut buf = Vec::new();
    if io::Seek::seek(&mut f, io::SeekFrom::Start(offset)).is_err() || f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let start = buf.len().saturating_sub(8192);
    String::from_utf8_lossy(&buf[start..]).into_owned()
}

/// A path as a single-quoted postgresql.conf value.
fn conf_quote(path: &Path) -> String {
    path.display().to_string().replace('\'', "''")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        let pg = passwd_entry(passwd, "postgres").expect("postgres");
        assert_eq!((pg.uid, pg.gid), (101, 104));
        assert!(passwd_entry(passwd, "root").is_none(), "uid 0 is never used");
        assert!(passwd_entry(passwd, "post").is_none());
    }

    #[test]
    fn versions_sort_numerically() {
        assert!(version_key("10") > version_key("9.6"));
        assert!(version_key("16") > version_key("15"));
        assert_eq!(version_key("main"), None);
    }

    #[test]
    fn stat_parsing_survives_odd_comm() {
        assert_eq!(stat_state_and_ppid("42 (post gres) x) S 7 42 42 0"), Some(('S', 7)));
        assert_eq!(stat_state_and_ppid("42 (z) Z 1 0"), Some(('Z', 1)));
    }

    #[test]
    fn tmpfs_sizes() {
        let mounts = "/dev/vda / ext4 rw 0 0\nshm /dev/shm tmpfs rw,nosuid,nodev,size=65536k 0 0\n\
                      tmpfs /run tmpfs rw,size=10% 0 0\ntmpfs /big tmpfs rw,size=2g 0 0\ntmpfs /dflt tmpfs rw 0 0\n";
        let ram = Some(8 << 30);
        assert_eq!(tmpfs_size(mounts, "/dev/shm", ram), Some(64 << 20));
        assert_eq!(tmpfs_size(mounts, "/run", ram), Some((8 << 30) / 100 * 10));
        assert_eq!(tmpfs_size(mounts, "/big", ram), Some(2 << 30));
        assert_eq!(tmpfs_size(mounts, "/dflt", ram), Some(4 << 30));
        assert_eq!(tmpfs_size(mounts, "/", ram), None, "not a tmpfs");
        assert_eq!(tmpfs_size(mounts, "/nowhere", ram), None);
        assert_eq!(
            mem_total_bytes("MemTotal:       16318480 kB\nMemFree: 1 kB\n"),
            Some(16318480 * 1024)
        );
    }
}
