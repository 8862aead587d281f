#!/usr/bin/env python3
"""Soak test: pgbench through pgweir while a killer SIGKILLs clients mid-transaction.

Run by hand (not part of `cargo test`):

    cargo build                      # or --release, then pass --pgweir target/release/pgweir
    python3 benches/soak.py          # 10 minutes
    python3 benches/soak.py --minutes 1
    python3 benches/soak.py --task-path     # with listen.event_loop = false
    python3 benches/soak.py --unix          # clients and PostgreSQL over Unix-domain sockets

It starts a throwaway PostgreSQL (initdb into a temp dir, loopback, free ports; as the
`postgres` user when run as root), pgweir in front of it with the admin API on, and then for the
given time runs:

* pgbench (TPC-B-like, extended protocol, many clients) through pgweir, for the whole time;
* a killer: psql clients that open a transaction which *breaks* the balance invariant (money
  added to an account only) and are SIGKILLed before they commit, plus short pgbench runs that
  are SIGKILLed as a whole (many clients dying mid-transaction at once).

At the end it checks, and exits non-zero if any check fails:

* every pool is back to idle: no active server, no waiting or active client, open == idle,
  open <= pool_size (admin API /api/pools, /api/servers);
* PostgreSQL has no backend idle in transaction, and every backend of the pool is idle;
* zero wrong results: sum(abalance) == sum(tbalance) == sum(bbalance) == sum(history.delta),
  so no killed transaction leaked a partial write and no committed one was lost;
* pgweir's RSS at the start (after warm-up) and the end are printed; the run fails if it grew
  by more than --max-rss-growth-mb.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "soak", "soak_pw"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin_dir():
    if os.environ.get("PG_BIN_DIR"):
        return Path(os.environ["PG_BIN_DIR"])
    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if dirs:
        return dirs[-1]
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    sys.exit("PostgreSQL server binaries not found: apt-get install postgresql, or set PG_BIN_DIR")


class Soak:
    def __init__(self, args):
        self.args = args
        self.bin = pg_bin_dir()
        self.tmp = Path(tempfile.mkdtemp(prefix="pgweir-soak-"))
        self.as_pg = []
        if os.geteuid() == 0:
            # initdb refuses to run as root.
            self.as_pg = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.tmp, "postgres", "postgres")
        self.pg_port = free_port()
        self.port = free_port()
        self.admin_port = free_port()
        self.procs = []
        self.pgweir = None
        self.failures = []
        # Where clients reach pgweir and pgweir reaches PostgreSQL: loopback TCP, or the work
        # dir holding both Unix sockets (each named after its port).
        self.host = str(self.tmp) if args.unix else "127.0.0.1"

    # ---- setup -------------------------------------------------------------------------------

    def pg(self, tool, *args, check=True, **kw):
        return subprocess.run(self.as_pg + [str(self.bin / tool), *args], check=check, **kw)

    def start_postgres(self):
        data = self.tmp / "data"
        self.pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync",
                stdout=subprocess.DEVNULL)
        conf = (
            f"listen_addresses = '127.0.0.1'\nport = {self.pg_port}\n"
            f"unix_socket_directories = '{self.tmp}'\nmax_connections = 200\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
        with open(data / "postgresql.conf", "a") as f:
            f.write(conf)
        self.pg("pg_ctl", "-D", str(data), "-l", str(self.tmp / "postgres.log"), "-w", "start",
                stdout=subprocess.DEVNULL)
        self.psql_direct("postgres", f"create role {USER} login password '{PASSWORD}'")
        self.psql_direct("postgres", f"create database app owner {USER}")

    def psql_direct(self, db, sql):
        out = subprocess.run(
            [str(self.bin / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", "-d", db, "-c", sql],
            capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {out.stderr.strip()}")
        return out.stdout.strip()

    def start_pgweir(self):
        config = self.tmp / "pgweir.toml"
        config.write_text(f"""
[listen]
addr = "127.0.0.1:{self.port}"
unix_socket_dir = "{self.tmp if self.args.unix else ''}"
max_client_conn = 2000
client_login_timeout = "10s"
event_loop = {"false" if self.args.task_path else "true"}

[admin]
addr = "127.0.0.1:{self.admin_port}"

[pool]
pool_size = {self.args.pool_size}
min_pool_size = 2
acquire_timeout = "30s"
idle_transaction_timeout = "30s"
server_check_delay = "1s"

[databases.app]
host = "{self.host}"
port = {self.pg_port}
dbname = "app"

[users.{USER}]
password = "{PASSWORD}"
""")
        log = open(self.tmp / "pgweir.log", "w")
        self.pgweir = subprocess.Popen([self.args.pgweir, "--config", str(config)],
                                       stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                self.admin("/health")
                return
            except OSError:
                time.sleep(0.1)
        sys.exit(f"pgweir did not come up; see {self.tmp / 'pgweir.log'}")

    # ---- helpers -----------------------------------------------------------------------------

    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as r:
            return json.loads(r.read() or b"null")

    def env(self):
        return dict(os.environ, PGPASSWORD=PASSWORD)

    def pgbench(self, *args, **kw):
        cmd = [str(self.bin / "pgbench"), "-h", self.host, "-p", str(self.port), "-U", USER, *args, "app"]
        return subprocess.Popen(cmd, env=self.env(), **kw)

    def rss_kb(self):
        for line in Path(f"/proc/{self.pgweir.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def check(self, ok, what):
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            self.failures.append(what)

    # ---- the run -----------------------------------------------------------------------------

    def killer(self, until, stats):
        """Until `until`: open invariant-breaking transactions through pgweir and SIGKILL them."""
        psql = str(self.bin / "psql")
        conn = f"host={self.host} port={self.port} user={USER} dbname=app"
        while time.time() < until:
            if random.random() < 0.1:
                # A whole pgbench run of 10 clients, SIGKILLed mid-flight.
                p = self.pgbench("-c", "10", "-j", "1", "-T", "30", "-M", "prepared", "-n",
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(random.uniform(0.5, 3))
                p.send_signal(signal.SIGKILL)
                p.wait()
                stats["pgbench_killed"] += 1
                continue
            aid = random.randint(1, 100000 * self.args.scale)
            # Money appears in one account only: committed, it would break the invariant.
            sql = (f"begin; update pgbench_accounts set abalance = abalance + 1000000 where aid = {aid}; "
                   "select pg_sleep(30); commit;")
            p = subprocess.Popen([psql, "-X", "-q", conn, "-c", sql], env=self.env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(random.uniform(0.05, 1.5))
            p.send_signal(signal.SIGKILL)
            p.wait()
            stats["psql_killed"] += 1

    def run(self):
        a = self.args
        print(f"soak: {a.minutes} min, pgbench -c {a.clients}, pool_size {a.pool_size}, work dir {self.tmp}",
              flush=True)
        self.start_postgres()
        self.start_pgweir()
        init = self.pgbench("-i", "-q", "-s", str(a.scale), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = init.communicate()
        if init.returncode != 0:
            sys.exit(f"pgbench -i failed: {err.decode()}")
        # Warm-up, so the start RSS includes the steady-state buffers of every pool.
        warm = self.pgbench("-c", str(a.clients), "-j", "2", "-T", "10", "-M", "extended", "-n",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        warm.wait()
        rss_start = self.rss_kb()
        print(f"RSS after warm-up: {rss_start} kB", flush=True)

        seconds = int(a.minutes * 60)
        until = time.time() + seconds
        bench_log = open(self.tmp / "pgbench.log", "w")
        bench = self.pgbench("-c", str(a.clients), "-j", "2", "-T", str(seconds), "-M", "extended", "-n",
                             "-P", "60", stdout=bench_log, stderr=subprocess.STDOUT)
        stats = {"psql_killed": 0, "pgbench_killed": 0}
        rss_samples = []
        import threading
        t = threading.Thread(target=self.killer, args=(until, stats), daemon=True)
        t.start()
        while time.time() < until:
            time.sleep(min(30, max(0.1, until - time.time())))
            rss_samples.append(self.rss_kb())
        t.join()
        bench.wait()
        bench_log.close()
        rss_end = self.rss_kb()
        out = (self.tmp / "pgbench.log").read_text()
        print(out, flush=True)
        self.check(bench.returncode == 0, f"pgbench exited with {bench.returncode}")
        print(f"killed: {stats['psql_killed']} psql clients mid-transaction, "
              f"{stats['pgbench_killed']} pgbench runs of 10 clients", flush=True)

        # Let sessions of killed clients be noticed and their servers cleaned or closed.
        settled = False
        deadline = time.time() + 30
        while time.time() < deadline and not settled:
            pools = self.admin("/api/pools")
            pools = pools.get("pools", pools) if isinstance(pools, dict) else pools
            # Killed clients' servers were closed; min_pool_size is refilled by maintenance.
            settled = all(p["servers"]["active"] == 0 and p["clients"]["active"] == 0
                          and p["clients"]["waiting"] == 0
                          and p["servers"]["open"] >= min(p["min_pool_size"], p["size"]) for p in pools)
            if not settled:
                time.sleep(0.5)
        print("pools:", json.dumps(pools), flush=True)
        for p in pools:
            s = p["servers"]
            self.check(s["active"] == 0 and p["clients"]["active"] == 0 and p["clients"]["waiting"] == 0,
                       f"pool {p['database']}/{p['user']}: nothing active or waiting")
            self.check(min(p["min_pool_size"], p["size"]) <= s["open"] == s["idle"] <= p["size"],
                       f"pool {p['database']}/{p['user']}: min_pool_size {p['min_pool_size']} <= "
                       f"open {s['open']} == idle {s['idle']} <= size {p['size']}")
        servers = self.admin("/api/servers")
        servers = servers.get("servers", servers) if isinstance(servers, dict) else servers
        self.check(all(s["state"] == "idle" for s in servers), f"/api/servers all idle ({len(servers)})")
        idle_pids = sorted(s["pid"] for s in servers)
        backend_rows = self.psql_direct(
            "postgres",
            f"select pid || ':' || coalesce(state, '') from pg_stat_activity where usename = '{USER}' order by pid")
        backends = dict(r.split(":", 1) for r in backend_rows.splitlines() if r)
        self.check(sorted(int(p) for p in backends) == idle_pids,
                   f"PostgreSQL backends of the pool {sorted(backends)} == pgweir's idle servers {idle_pids}")
        in_tx = self.psql_direct("postgres",
                                 "select count(*) from pg_stat_activity where state like 'idle in transaction%'")
        self.check(in_tx == "0", f"no backend idle in transaction ({in_tx})")

        sums = self.psql_direct(
            "app",
            "select (select sum(abalance) from pgbench_accounts) || ' ' || (select sum(tbalance) from pgbench_tellers)"
            " || ' ' || (select sum(bbalance) from pgbench_branches) || ' ' || "
            "(select coalesce(sum(delta), 0) from pgbench_history)")
        self.check(len(set(sums.split())) == 1,
                   f"balances agree (accounts tellers branches history): {sums}")
        big = self.psql_direct("app", "select count(*) from pgbench_accounts where abalance >= 500000")
        self.check(big == "0", f"no killed transaction's write is visible ({big} accounts)")

        growth_mb = (rss_end - rss_start) / 1024
        print(f"RSS start {rss_start} kB, end {rss_end} kB, growth {growth_mb:.1f} MB; "
              f"samples every 30 s: {rss_samples}", flush=True)
        self.check(growth_mb <= a.max_rss_growth_mb, f"RSS growth {growth_mb:.1f} MB <= {a.max_rss_growth_mb} MB")
        return not self.failures

    def cleanup(self):
        for p in [self.pgweir]:
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
        data = self.tmp / "data"
        if data.exists():
            self.pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop", check=False,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pool-size", type=int, default=10)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--max-rss-growth-mb", type=float, default=20)
    ap.add_argument("--pgweir", default=str(ROOT / "target" / "debug" / "pgweir"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, data)")
    ap.add_argument("--task-path", action="store_true",
                    help="serve every client from its own task (listen.event_loop = false)")
    ap.add_argument("--unix", action="store_true",
                    help="clients to pgweir and pgweir to PostgreSQL over Unix-domain sockets")
    args = ap.parse_args()
    if not Path(args.pgweir).exists():
        sys.exit(f"{args.pgweir} not found: run `cargo build` first (or pass --pgweir)")
    soak = Soak(args)
    try:
        ok = soak.run()
    finally:
        soak.cleanup()
    print("soak: PASS" if ok else f"soak: FAIL ({len(soak.failures)} checks)", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
