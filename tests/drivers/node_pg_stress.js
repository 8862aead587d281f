// node-postgres through pgweir (transaction mode): named prepared statements (the driver
// prepares a name once per connection and then only binds it), unnamed parameterized queries,
// transactions, pg.Pool. Results are checked against values unique to each client.
// Connects with the libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE), which
// node-postgres reads; DRIVER_CLIENTS and DRIVER_ROUNDS set the load. Exits 1 on any error.
const { Client, Pool } = require('pg');
const cfg = {};
const N = +(process.env.DRIVER_CLIENTS || 50), ROUNDS = +(process.env.DRIVER_ROUNDS || 10);
const errors = [];

async function worker(i) {
  const c = new Client(cfg);
  await c.connect();
  try {
    for (let r = 0; r < ROUNDS; r++) {
      let res = await c.query({ name: 'mul', text: 'select $1::int * 1000 + $2::int as v', values: [i, r] });
      if (res.rows[0].v !== i * 1000 + r) errors.push(['named', i, r, res.rows[0].v]);
      res = await c.query({ name: `own${i % 7}`, text: `select ${i % 7}::int + $1::int as v`, values: [r] });
      if (res.rows[0].v !== (i % 7) + r) errors.push(['named2', i, r, res.rows[0].v]);
      res = await c.query('select $1::text as t', [`n${i}`]);
      if (res.rows[0].t !== `n${i}`) errors.push(['unnamed', i, r, res.rows[0].t]);
      await c.query('begin');
      await c.query('create temp table t (a int) on commit drop');
      await c.query('insert into t select g from generate_series(1, $1::int) g', [i % 10 + 1]);
      res = await c.query({ name: 'cnt', text: 'select count(*)::int as n from t' });
      await c.query('commit');
      if (res.rows[0].n !== i % 10 + 1) errors.push(['tx', i, r, res.rows[0].n]);
    }
  } catch (e) { errors.push(['exception', i, String(e)]); }
  await c.end();
}

async function pooled() {
  const pool = new Pool({ ...cfg, max: 30 });
  await Promise.all([...Array(N * 10).keys()].map(async (i) => {
    const res = await pool.query({ name: 'p', text: 'select $1::int as v', values: [i] });
    if (res.rows[0].v !== i) errors.push(['pool', i, res.rows[0].v]);
  }));
  await pool.end();
}

(async () => {
  const t = Date.now();
  await Promise.all([...Array(N).keys()].map(worker));
  await pooled();
  console.log(`node-postgres: ${N} clients x ${ROUNDS} rounds + pool of 30 x ${N * 10} in ${((Date.now() - t) / 1000).toFixed(1)}s; errors: ${errors.length}`);
  errors.slice(0, 20).forEach((e) => console.log('  ', JSON.stringify(e)));
  process.exit(errors.length ? 1 : 0);
})();
