#!/usr/bin/env bash
# pgweir vs PgBouncer under pgbench, on one machine. Run by hand (not in CI):
#
#   benches/pgbench_compare.sh                 # full matrix, 10 s per cell
#   QUICK=1 benches/pgbench_compare.sh         # 3 s per cell, 100 clients only
#   DURATION=20 MODES="select" PROTOCOLS="simple extended" CLIENTS="10 100 500 2000" benches/pgbench_compare.sh
#   CALLGRIND=1 MODES=select PROTOCOLS="simple extended" CLIENTS=100 benches/pgbench_compare.sh
#
# FLOOR=1 adds a third target, examples/floor.rs: a bare single-threaded epoll loop with
# PgBouncer's hand-off and none of a real pooler's work (no auth, TLS, statement tracking,
# timeouts or metrics), as the yardstick of what the event loop and syscalls alone cost on this
# machine. Not for -M prepared (it tracks no statements).
#
# CALLGRIND=1 runs both proxies under valgrind's callgrind and reports user-space instructions
# per transaction instead of CPU time: a count that does not move with the machine's load
# (CPU µs per transaction on a shared 2-core VM vary by ±10 % run to run), for tracking the
# hot path between commits. Each cell is TXS transactions (default 40000) with counters zeroed
# just before pgbench starts, so the clients' logins are included; TPS and latency under
# valgrind mean nothing and are not reported.
#
# Starts a throwaway PostgreSQL 15 (fsync off) in a temp dir, `pgbench -i -s 10`, then PgBouncer
# (transaction mode) and pgweir in front of it, both with pools of 20 and no server TLS, and runs
# every (script, protocol, clients) cell against each proxy in turn, PgBouncer first. For every
# run it records TPS, mean and p99 latency (from pgbench's per-transaction log; p99 also without
# each client's first three transactions, the start-up waves) and the proxy's CPU time per
# transaction (utime+stime from /proc/PID/stat). Writes a markdown table to
# benches/results/<UTC date-time>.md and prints it. Everything it started is stopped on exit.
#
# Environment: DURATION (s, default 10; QUICK=1 → 3), CLIENTS (default "10 100 500 2000";
# QUICK=1 → "100"), MODES ("select tpcb"; also "connect": -S -C, a login per transaction),
# PROTOCOLS ("simple extended prepared"),
# WORKERS (pgweir listen.workers, default 1 = one event-loop thread, like PgBouncer; 0 = one
# worker per core), EVENT_LOOP (pgweir listen.event_loop: 1 = true, 0 = false,
# unset = the binary's default, which is true since 2026-12-04 and the task path before),
# REPEAT (runs per cell and proxy, alternating; the table shows medians, and below it each
# pair's TPS and CPU ratios in run order; default 1), PGBIN (/usr/lib/postgresql/15/bin),
# PGBOUNCER (/usr/sbin/pgbouncer), PGWEIR (target/release/pgweir), SCALE (10), CALLGRIND (0),
# TXS (40000; CALLGRIND=1 only), CG_KEEP (a directory to keep each cell's callgrind dump in,
# for callgrind_annotate; CALLGRIND=1 only), FLOOR (0), TRANSPORT ("tcp": pgbench → proxy →
# PostgreSQL over loopback TCP; "unix": over Unix-domain sockets on both hops, for both
# proxies — PgBouncer's unix_socket_dir and host=<dir>, pgweir's listen.unix_socket_dir and
# host = "<dir>" — the usual set-up when the proxy runs on the database host; not with FLOOR=1),
# RESULTS_DIR (where the table is written, default benches/results).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    DURATION=${DURATION:-3}
    CLIENTS=${CLIENTS:-100}
else
    DURATION=${DURATION:-10}
    CLIENTS=${CLIENTS:-10 100 500 2000}
fi
MODES=${MODES:-select tpcb}

# pgbench's script arguments for a mode: select (-S), connect (-S with a new connection per
# transaction: a login, one select and a disconnect each, as a PHP-style client does; not in
# the default MODES) or tpcb (tpcb-like).
script_for() {
    case $1 in
        select) echo "-S" ;;
        connect) echo "-S -C" ;;
        tpcb) echo "-b tpcb-like" ;;
        *) echo "unknown mode $1 (select, connect or tpcb)" >&2; exit 2 ;;
    esac
}

for mode in $MODES; do
    script_for "$mode" >/dev/null
done
PROTOCOLS=${PROTOCOLS:-simple extended prepared}
WORKERS=${WORKERS:-1}
EVENT_LOOP=${EVENT_LOOP:-}
REPEAT=${REPEAT:-1}
SCALE=${SCALE:-10}
CALLGRIND=${CALLGRIND:-0}
FLOOR=${FLOOR:-0}
FLOOR_BIN=$ROOT/target/release/examples/floor
TXS=${TXS:-40000}
CG_KEEP=${CG_KEEP:-}
TRANSPORT=${TRANSPORT:-tcp}
RESULTS_DIR=${RESULTS_DIR:-benches/results}
case $TRANSPORT in
tcp | unix) ;;
*)
    echo "TRANSPORT must be tcp or unix, got $TRANSPORT" >&2
    exit 2
    ;;
esac
if [[ $TRANSPORT == unix && $FLOOR == 1 ]]; then
    echo "FLOOR=1 needs TRANSPORT=tcp (examples/floor.rs speaks TCP only)" >&2
    exit 2
fi
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
PGWEIR=${PGWEIR:-$ROOT/target/release/pgweir}
PGBENCH=${PGBENCH:-$(command -v pgbench || echo "$PGBIN/pgbench")}
CLK_TCK=$(getconf CLK_TCK)

ulimit -n 100000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# The checkout's own binary is built every time (a no-op when it is current): the table names
# it by `git describe`, which a binary left from an earlier commit would belie.
if [[ $PGWEIR == "$ROOT/target/release/pgweir" ]]; then
    echo "building $PGWEIR" >&2
    cargo build --release
elif [[ ! -x $PGWEIR ]]; then
    echo "no executable at PGWEIR=$PGWEIR" >&2
    exit 1
fi
if [[ $FLOOR == 1 ]]; then
    cargo build --release --example floor
fi

WORK=$(mktemp -d /tmp/pgweir-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
PG_STARTED=0

as_pg() {
    if [[ $(id -u) == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    # A graceful stop, up to 5 s (benches/pgo_build.sh's instrumented pgweir writes its profile
    # as it exits), then whatever is left is killed.
    for _ in $(seq 1 50); do
        local alive=0
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null
    done
    if [[ $PG_STARTED == 1 ]]; then
        as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m immediate stop >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    local port=$1
    for _ in $(seq 1 200); do
        if "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d bench 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "nothing answered on port $port" >&2
    return 1
}

# utime + stime of a process (all threads), in clock ticks. The command name may contain
# spaces, so fields are counted after the closing parenthesis (field 3 = state).
cpu_ticks() {
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

PG_PORT=$(free_port)
BOUNCER_PORT=$(free_port)
WEIR_PORT=$(free_port)
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)

echo "PostgreSQL on $PG_PORT, PgBouncer on $BOUNCER_PORT, pgweir on $WEIR_PORT; work dir $WORK" >&2
if [[ $(id -u) == 0 ]]; then
    chown postgres "$WORK"
fi
as_pg "$PGBIN/initdb" -D "$WORK/pgdata" -U postgres -A trust --no-sync >/dev/null
cat >>"$WORK/pgdata/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
EOF
as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pg.log" -w start >/dev/null
PG_STARTED=1
as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench >"$WORK/init.log" 2>&1

# Where pgbench finds the proxies and the proxies find PostgreSQL: 127.0.0.1, or the work dir
# holding every Unix socket (each named after its own port).
if [[ $TRANSPORT == unix ]]; then
    HOST=$WORK SOCKET_DIR=$WORK
else
    HOST=127.0.0.1 SOCKET_DIR=
fi
cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
bench = host=$HOST port=$PG_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir = $SOCKET_DIR
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 5000
server_tls_sslmode = disable
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
echo '"postgres" ""' >"$WORK/userlist.txt"
if [[ $(id -u) == 0 ]]; then
    chown postgres "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
fi
# runuser starts with the default soft limit of 1024 descriptors: raise it to the hard limit, or
# PgBouncer refuses connections ("accept() failed: Too many open files") at 2,000 clients.
# Under CALLGRIND=1 both proxies run inside valgrind (same pid, so pidfiles and /proc still
# name the proxy).
VALGRIND=()
if [[ $CALLGRIND == 1 ]]; then
    VALGRIND=(valgrind -q --tool=callgrind --compress-strings=no "--callgrind-out-file=$WORK/callgrind.%p")
fi
as_pg sh -c 'ulimit -n "$(ulimit -Hn)"; exec "$@"' sh "${VALGRIND[@]}" "$PGBOUNCER" -q "$WORK/pgbouncer.ini" &
BOUNCER_PID=$!
# `as_pg … &` forks a subshell, then runuser, then PgBouncer: take PgBouncer's own pid from
# its pidfile so its CPU time is measured and it is stopped on exit.
PIDS+=("$BOUNCER_PID")
for _ in $(seq 1 400); do
    [[ -s $WORK/pgbouncer.pid ]] && break
    sleep 0.05
done
BOUNCER_PID=$(cat "$WORK/pgbouncer.pid")
PIDS+=("$BOUNCER_PID")

cat >"$WORK/pgweir.toml" <<EOF
[listen]
addr = "127.0.0.1:$WEIR_PORT"
unix_socket_dir = "$SOCKET_DIR"
auth_type = "trust"
max_client_conn = 5000
workers = $WORKERS
$(case $EVENT_LOOP in 1) echo "event_loop = true" ;; 0) echo "event_loop = false" ;; esac)
[admin]
addr = ""
[pool]
pool_size = 20
[server_tls]
mode = "disable"
[databases.bench]
host = "$HOST"
port = $PG_PORT
max_prepared_statements = 100
EOF
PGWEIR_LOG=warn "${VALGRIND[@]}" "$PGWEIR" --config "$WORK/pgweir.toml" 2>"$WORK/pgweir.log" &
WEIR_PID=$!
PIDS+=("$WEIR_PID")

FLOOR_PORT="" FLOOR_PID=""
if [[ $FLOOR == 1 ]]; then
    FLOOR_PORT=$(free_port)
    "${VALGRIND[@]}" "$FLOOR_BIN" "$FLOOR_PORT" "$PG_PORT" 20 bench postgres 2>"$WORK/floor.log" &
    FLOOR_PID=$!
    PIDS+=("$FLOOR_PID")
fi

wait_port "$BOUNCER_PORT"
wait_port "$WEIR_PORT"
[[ $FLOOR == 1 ]] && wait_port "$FLOOR_PORT"

# One pgbench run. Prints: tps avg_ms p99_ms cpu_us_per_tx steady_p99_ms (or "failed" fields).
# The steady p99 leaves out each client's first three transactions (pgbench numbers them from
# 1): pgbench starts every client at once, so those run as waves of all clients together, and
# at 2,000 clients pgweir serves the first two on its per-client tasks before the sessions move
# to the event loop; in a 10 s run they are ~2 % of the transactions, enough to decide a p99.
run_cell() {
    local port=$1 pid=$2 mode=$3 proto=$4 clients=$5
    local dir="$WORK/run.$RANDOM$RANDOM"
    mkdir "$dir"
    local script_args
    read -r -a script_args <<<"$(script_for "$mode")"
    local before after
    before=$(cpu_ticks "$pid")
    # Own process group: a Ctrl-C or a hung client never takes the script's shell with it.
    # Bounded: a proxy that stops answering must not hang the whole matrix.
    if ! (cd "$dir" && setsid timeout $((DURATION * 3 + 120)) "$PGBENCH" -h "$HOST" -p "$port" -U postgres -n \
        "${script_args[@]}" -M "$proto" -c "$clients" -j 2 -T "$DURATION" \
        -l --log-prefix=tx bench >"$dir/out" 2>"$dir/err"); then
        echo "failed - - - -"
        tail -n 3 "$dir/err" >&2
        return
    fi
    after=$(cpu_ticks "$pid")
    local tps txs
    tps=$(awk '/^tps = / {printf "%.0f", $3}' "$dir/out")
    txs=$(awk '/number of transactions actually processed/ {split($NF, a, "/"); print a[1]}' "$dir/out")
    # pgbench log line: client_id tx_no latency_us script_no epoch_s epoch_us. One sort by
    # latency serves both p99s: the steady one reads the same order, skipping early transactions.
    local avg p99 steady
    read -r avg p99 steady < <(cat "$dir"/tx.* | awk '{print $3, $2}' | sort -n | awk '
        { a[NR] = $1; s += $1; if ($2 > 3) b[++m] = $1 }
        END {
            if (NR == 0) { print "- - -"; exit }
            i = int(NR * 0.99); if (i < 1) i = 1;
            j = int(m * 0.99); if (j < 1) j = 1;
            printf "%.2f %.2f %s\n", s / NR / 1000, a[i] / 1000, m ? sprintf("%.2f", b[j] / 1000) : "-" }')
    local cpu
    cpu=$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v n="$txs" \
        'BEGIN { if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print "-" }')
    echo "$tps $avg $p99 $cpu $steady"
    rm -rf "$dir"
}

# CALLGRIND=1: one pgbench run of TXS transactions. Prints "- - - instructions_per_tx -" (the
# proxy's user-space instructions, counted from zero just before pgbench starts).
run_cell_callgrind() {
    local port=$1 pid=$2 mode=$3 proto=$4 clients=$5 as=$6
    local script_args
    read -r -a script_args <<<"$(script_for "$mode")"
    local per_client=$(((TXS + clients - 1) / clients))
    # callgrind_control talks to the process through files only its owner may use.
    (cd "$WORK" && $as callgrind_control -z "$pid" >/dev/null)
    local out
    if ! out=$(setsid timeout 1800 "$PGBENCH" -h "$HOST" -p "$port" -U postgres -n "${script_args[@]}" \
        -M "$proto" -c "$clients" -j 2 -t "$per_client" bench 2>&1); then
        echo "failed - - - -"
        echo "$out" | tail -n 3 >&2
        return
    fi
    (cd "$WORK" && $as callgrind_control -d "$pid" >/dev/null)
    local txs dump ir
    txs=$(echo "$out" | awk '/number of transactions actually processed/ {split($NF, a, "/"); print a[1]}')
    dump=$(ls -t "$WORK/callgrind.$pid".* 2>/dev/null | head -n 1)
    ir=$(awk '/^totals:/ {print $2}' "$dump" 2>/dev/null)
    if [[ -n $CG_KEEP && -n $dump ]]; then
        mkdir -p "$CG_KEEP"
        cp "$dump" "$CG_KEEP/port$port-$mode-$proto-$clients.callgrind"
    fi
    if [[ -z $ir || -z $txs || $txs == 0 ]]; then
        echo "failed - - - -"
        return
    fi
    echo "- - - $((ir / txs)) -"
}

# Column-wise medians of "tps avg p99 cpu steady_p99" lines (one per repeat); "n/a"/"failed"
# pass through when no run of that column produced a number.
medians() {
    printf '%s\n' "$@" | awk '
        { for (i = 1; i <= 5; i++) if ($i ~ /^[0-9.]+$/) v[i, ++n[i]] = $i; else bad[i] = $i }
        END {
            for (i = 1; i <= 5; i++) {
                if (n[i] == 0) { out = out (i > 1 ? " " : "") (bad[i] == "" ? "-" : bad[i]); continue }
                for (a = 1; a <= n[i]; a++) for (b = a + 1; b <= n[i]; b++)
                    if (v[i, b] + 0 < v[i, a] + 0) { t = v[i, a]; v[i, a] = v[i, b]; v[i, b] = t }
                m = v[i, int((n[i] + 1) / 2)]
                out = out (i > 1 ? " " : "") m
            }
            print out
        }'
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "-" }'
}

# Each cell's pgweir/PgBouncer TPS and CPU ratios per alternating pair of runs, in run order: a
# median hides how far one host swings from pair to pair; this list, under the table, shows it.
PAIRS=()

mkdir -p "$RESULTS_DIR"
OUT="$RESULTS_DIR/$(date -u +%Y-%m-%dT%H%M).md"
# Two short runs can start in the same minute: the second must not overwrite the first.
[[ -e $OUT ]] && OUT="$RESULTS_DIR/$(date -u +%Y-%m-%dT%H%M%S).md"
{
    echo "# pgbench: pgweir vs PgBouncer ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "- machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)," \
        "$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "- load average at start: $LOAD_AT_START (1/5/15 min); at end: LOAD_AT_END"
    echo "- PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') (fsync off), pgbench -s $SCALE," \
        "$("$PGBOUNCER" --version | head -1), pgweir $(
            # The checkout describes the binary only when the binary is the checkout's build.
            if [[ $PGWEIR == "$ROOT/target/release/pgweir" ]]; then
                git describe --always --dirty 2>/dev/null || echo '?'
            else
                echo "binary $PGWEIR"
            fi
        )" \
        "(workers = $WORKERS, event_loop = $(case $EVENT_LOOP in 1) echo true ;; 0) echo false ;; *) echo default ;; esac))"
    echo "- transport: $([[ $TRANSPORT == unix ]] && echo "Unix-domain sockets, pgbench → proxy → PostgreSQL" ||
        echo "loopback TCP, pgbench → proxy → PostgreSQL")"
    echo "- pool size 20 on both, transaction mode, no TLS, trust auth; pgbench -j 2," \
        "$([[ $CALLGRIND == 1 ]] && echo "$TXS transactions" || echo "$DURATION s") per run," \
        "$REPEAT run(s) per cell and proxy alternating (medians shown);" \
        "pgbench, both proxies and PostgreSQL share the machine"
    if [[ $FLOOR == 1 ]]; then
        echo "- floor: examples/floor.rs, a bare one-thread epoll loop with PgBouncer's hand-off and none of a" \
            "pooler's work (no auth, TLS, statement tracking, timeouts, metrics), pool 20, run after the other two"
    fi
    if [[ $CALLGRIND == 1 ]]; then
        echo "- CALLGRIND=1: both proxies under valgrind --tool=callgrind; instructions = the proxy's" \
            "user-space instructions per transaction over $TXS transactions (logins included)"
        echo
        if [[ $FLOOR == 1 ]]; then
            echo "| script | protocol | clients | PgBouncer instructions/tx | pgweir instructions/tx | ratio | floor instructions/tx |"
            echo "|---|---|---:|---:|---:|---:|---:|"
        else
            echo "| script | protocol | clients | PgBouncer instructions/tx | pgweir instructions/tx | ratio |"
            echo "|---|---|---:|---:|---:|---:|"
        fi
    else
        echo "- latency in ms (pgbench per-transaction log; steady p99 leaves out each client's first three" \
            "transactions); CPU = proxy utime+stime per transaction, µs"
        echo
        if [[ $FLOOR == 1 ]]; then
            echo "| script | protocol | clients | PgBouncer TPS | pgweir TPS | TPS ratio | PgBouncer avg / p99 / steady p99 ms | pgweir avg / p99 / steady p99 ms | PgBouncer CPU µs/tx | pgweir CPU µs/tx | CPU ratio | floor TPS | floor CPU µs/tx | floor CPU ratio |"
            echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        else
            echo "| script | protocol | clients | PgBouncer TPS | pgweir TPS | TPS ratio | PgBouncer avg / p99 / steady p99 ms | pgweir avg / p99 / steady p99 ms | PgBouncer CPU µs/tx | pgweir CPU µs/tx | CPU ratio |"
            echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        fi
    fi
} >"$OUT.tmp"

CELL=(run_cell)
[[ $CALLGRIND == 1 ]] && CELL=(run_cell_callgrind)
# Who may send callgrind_control requests to PgBouncer (it runs as postgres under root).
BOUNCER_AS=""
[[ $(id -u) == 0 ]] && BOUNCER_AS="runuser -u postgres --"

for mode in $MODES; do
    for proto in $PROTOCOLS; do
        for clients in $CLIENTS; do
            echo "== $mode $proto $clients clients" >&2
            b_runs=() w_runs=() f_runs=() tps_pairs=() cpu_pairs=()
            for _ in $(seq 1 "$REPEAT"); do
                if [[ $proto == prepared ]] && "$PGBOUNCER" --version | head -1 | grep -qE ' 1\.(1[0-9]|20)\.'; then
                    # PgBouncer < 1.21 does not track protocol-level prepared statements in
                    # transaction mode: pgbench -M prepared fails there by design.
                    b_runs+=("n/a n/a n/a n/a n/a")
                else
                    b_runs+=("$("${CELL[@]}" "$BOUNCER_PORT" "$BOUNCER_PID" "$mode" "$proto" "$clients" "$BOUNCER_AS")")
                fi
                w_runs+=("$("${CELL[@]}" "$WEIR_PORT" "$WEIR_PID" "$mode" "$proto" "$clients" "")")
                read -r pb_tps _ _ pb_cpu _ <<<"${b_runs[-1]}"
                read -r pw_tps _ _ pw_cpu _ <<<"${w_runs[-1]}"
                tps_pairs+=("$(ratio "$pw_tps" "$pb_tps")")
                cpu_pairs+=("$(ratio "$pw_cpu" "$pb_cpu")")
                if [[ $FLOOR == 1 && $proto != prepared ]]; then
                    f_runs+=("$("${CELL[@]}" "$FLOOR_PORT" "$FLOOR_PID" "$mode" "$proto" "$clients" "")")
                else
                    f_runs+=("n/a n/a n/a n/a n/a")
                fi
            done
            # Not for -M prepared against a PgBouncer that cannot run it (no ratio to show).
            if [[ $REPEAT -gt 1 && $CALLGRIND != 1 && ${b_runs[0]} != n/a* ]]; then
                PAIRS+=("$mode $proto $clients: ${tps_pairs[*]} | ${cpu_pairs[*]}")
            fi
            read -r b_tps b_avg b_p99 b_cpu b_p99s <<<"$(medians "${b_runs[@]}")"
            read -r w_tps w_avg w_p99 w_cpu w_p99s <<<"$(medians "${w_runs[@]}")"
            read -r f_tps _ _ f_cpu _ <<<"$(medians "${f_runs[@]}")"
            floor_cols=""
            if [[ $CALLGRIND == 1 ]]; then
                [[ $FLOOR == 1 ]] && floor_cols=" $f_cpu |"
                echo "   PgBouncer $b_cpu instructions/tx; pgweir $w_cpu; floor $f_cpu" >&2
                echo "| $mode | $proto | $clients | $b_cpu | $w_cpu | $(ratio "$w_cpu" "$b_cpu") |$floor_cols" >>"$OUT.tmp"
                continue
            fi
            [[ $FLOOR == 1 ]] && floor_cols=" $f_tps | $f_cpu | $(ratio "$f_cpu" "$b_cpu") |"
            echo "   PgBouncer $b_tps tps $b_avg/$b_p99/$b_p99s ms $b_cpu µs; pgweir $w_tps tps $w_avg/$w_p99/$w_p99s ms $w_cpu µs; floor $f_tps tps $f_cpu µs" >&2
            echo "| $mode | $proto | $clients | $b_tps | $w_tps | $(ratio "$w_tps" "$b_tps") | $b_avg / $b_p99 / $b_p99s | $w_avg / $w_p99 / $w_p99s | $b_cpu | $w_cpu | $(ratio "$w_cpu" "$b_cpu") |$floor_cols" >>"$OUT.tmp"
        done
    done
done

if [[ ${#PAIRS[@]} -gt 0 ]]; then
    {
        echo
        echo "Each pair's ratios, pgweir/PgBouncer, in run order (TPS | CPU per transaction):"
        echo
        for line in "${PAIRS[@]}"; do
            echo "- $line"
        done
    } >>"$OUT.tmp"
fi
sed "s|LOAD_AT_END|$(cut -d' ' -f1-3 /proc/loadavg)|" "$OUT.tmp" >"$OUT"
rm -f "$OUT.tmp"
echo >&2
cat "$OUT"
echo >&2
echo "written to $OUT" >&2
