"""psycopg 3 through pgweir (transaction mode): automatic server-side prepare (prepare_threshold),
pipeline mode, COPY in and out, named (server-side) cursors, async connections. Results are
checked against values unique to each connection. Connects with the libpq environment
(PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE); DRIVER_CLIENTS and DRIVER_ROUNDS set the load.
Exits 1 on any wrong result or error."""
import asyncio, os, sys, time
import psycopg

DSN = ""  # libpq reads the PG* environment
N = int(os.environ.get("DRIVER_CLIENTS", "50"))
ROUNDS = int(os.environ.get("DRIVER_ROUNDS", "10"))
errors = []

async def worker(i):
    try:
        async with await psycopg.AsyncConnection.connect(DSN, prepare_threshold=2, autocommit=True) as conn:
            for r in range(ROUNDS):
                cur = await conn.execute("select %s::int * 1000 + %s::int", (i, r))
                v = (await cur.fetchone())[0]
                if v != i * 1000 + r: errors.append(("prepared", i, r, v))
                async with conn.pipeline():
                    c1 = await conn.execute("select %s::text", (f"p{i}",))
                    c2 = await conn.execute("select %s::int + 1", (r,))
                    a, b = (await c1.fetchone())[0], (await c2.fetchone())[0]
                if (a, b) != (f"p{i}", r + 1): errors.append(("pipeline", i, r, a, b))
                async with conn.transaction():
                    await conn.execute("create temp table t (a int, b text) on commit drop")
                    async with conn.cursor().copy("copy t from stdin") as cp:
                        for k in range(5):
                            await cp.write_row((k, f"w{i}"))
                    out = []
                    async with conn.cursor().copy("copy (select a, b from t order by a) to stdout") as cp:
                        async for row in cp.rows():
                            out.append(row)
                    if out != [(str(k), f"w{i}") for k in range(5)]:
                        errors.append(("copy", i, r, out[:2]))
                    async with conn.cursor(name=f"cur{i}") as named:
                        await named.execute("select g from generate_series(1, 100) g")
                        total = 0
                        while rows := await named.fetchmany(13):
                            total += sum(x[0] for x in rows)
                    if total != 5050: errors.append(("named cursor", i, r, total))
    except Exception as e:
        errors.append(("exception", i, repr(e)))

def sync_checks():
    with psycopg.connect(DSN, prepare_threshold=0) as conn:
        for r in range(50):
            v = conn.execute("select %s::int", (r,)).fetchone()[0]
            if v != r: errors.append(("sync", r, v))
        conn.commit()
        # executemany with prepared statements inside one transaction
        with conn.transaction():
            conn.execute("create temp table m (a int) on commit drop")
            conn.cursor().executemany("insert into m values (%s)", [(k,) for k in range(100)])
            s = conn.execute("select sum(a) from m").fetchone()[0]
            if s != 4950: errors.append(("executemany", s))

async def main():
    t = time.time()
    await asyncio.gather(*(worker(i) for i in range(N)))
    sync_checks()
    print(f"psycopg {psycopg.__version__}: {N} async connections x {ROUNDS} rounds + sync checks in {time.time()-t:.1f}s; errors: {len(errors)}")
    for e in errors[:20]: print("  ", e)
    sys.exit(1 if errors else 0)

asyncio.run(main())
