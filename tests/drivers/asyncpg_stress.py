"""asyncpg through pgweir (transaction mode): named prepared statements, statement cache,
explicit prepare, transactions, cursors, executemany, asyncpg.Pool. Every result is checked
against values unique to the connection, so a misrouted reply shows up as a wrong value.
Connects with the libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE);
DRIVER_CLIENTS and DRIVER_ROUNDS set the load. Exits 1 on any wrong result or error."""
import asyncio, os, random, sys, time
import asyncpg

DSN = None  # asyncpg reads the PG* environment
N = int(os.environ.get("DRIVER_CLIENTS", "50"))
ROUNDS = int(os.environ.get("DRIVER_ROUNDS", "10"))
errors = []

async def worker(i):
    conn = await asyncpg.connect(DSN)
    try:
        ps = await conn.prepare("select $1::int * 1000 + $2::int")
        for r in range(ROUNDS):
            v = await conn.fetchval("select $1::int + $2::int", i, r)
            if v != i + r: errors.append(("fetchval", i, r, v))
            v = await ps.fetchval(i, r)
            if v != i * 1000 + r: errors.append(("prepared", i, r, v))
            rows = await conn.fetch("select g, $1::text from generate_series(1, $2::int) g", f"c{i}", 5 + r % 7)
            if [tuple(x) for x in rows] != [(g, f"c{i}") for g in range(1, 6 + r % 7)]:
                errors.append(("fetch", i, r, rows[:2]))
            async with conn.transaction():
                await conn.execute("create temp table if not exists t (a int, b text) on commit drop")
                await conn.executemany("insert into t values ($1, $2)", [(k, f"w{i}") for k in range(3)])
                got = await conn.fetch("select a, b from t order by a")
                if [tuple(x) for x in got] != [(k, f"w{i}") for k in range(3)]:
                    errors.append(("tx", i, r, got))
                n = 0
                async for rec in conn.cursor("select g from generate_series(1, 50) g", prefetch=7):
                    n += rec["g"]
                if n != 1275: errors.append(("cursor", i, r, n))
            # A statement prepared once, used after many other connections' transactions.
            s2 = await conn.prepare(f"select '{i}'::text || $1::text")
            if await s2.fetchval(str(r)) != f"{i}{r}": errors.append(("adhoc", i, r))
            if r % 5 == 0:
                await asyncio.sleep(random.random() * 0.01)
    except Exception as e:
        errors.append(("exception", i, repr(e)))
    finally:
        await conn.close()

async def pooled():
    pool = await asyncpg.create_pool(DSN, min_size=5, max_size=30)
    async def job(i):
        async with pool.acquire() as c:
            v = await c.fetchval("select $1::int", i)
            if v != i: errors.append(("pool", i, v))
            async with c.transaction():
                v = await c.fetchval("select $1::bigint * 2", i)
                if v != 2 * i: errors.append(("pool-tx", i, v))
    await asyncio.gather(*(job(i) for i in range(N * 10)))
    await pool.close()

async def main():
    t = time.time()
    await asyncio.gather(*(worker(i) for i in range(N)))
    await pooled()
    print(f"asyncpg {asyncpg.__version__}: {N} connections x {ROUNDS} rounds + pool of 30 x {N * 10} jobs in {time.time()-t:.1f}s; errors: {len(errors)}")
    for e in errors[:20]: print("  ", e)
    sys.exit(1 if errors else 0)

asyncio.run(main())
