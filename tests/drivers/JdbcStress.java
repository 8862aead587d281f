// pgJDBC through pgweir (transaction mode): server-side prepared statements after
// prepareThreshold executions (named S_n statements reused across transactions that may land on
// other servers), autocommit off transactions, batches, fetch-size cursors. Each thread checks
// results against values unique to it. Connects with the libpq environment variables (PGHOST,
// PGPORT, PGUSER, PGPASSWORD, PGDATABASE); DRIVER_CLIENTS and DRIVER_ROUNDS set the load.
// Exits 1 on any wrong result or error.
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.*;

public class JdbcStress {
    static String env(String name, String dflt) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? dflt : v;
    }

    public static void main(String[] args) throws Exception {
        int n = Integer.parseInt(env("DRIVER_CLIENTS", "50"));
        int rounds = Integer.parseInt(env("DRIVER_ROUNDS", "10"));
        String url = "jdbc:postgresql://" + env("PGHOST", "127.0.0.1") + ":" + env("PGPORT", "6432") + "/"
            + env("PGDATABASE", "postgres") + "?prepareThreshold=2&sslmode=" + env("PGSSLMODE", "prefer")
            + (env("PGSSLROOTCERT", "").isEmpty() ? "" : "&sslrootcert=" + env("PGSSLROOTCERT", ""));
        Properties props = new Properties();
        props.setProperty("user", env("PGUSER", "postgres"));
        props.setProperty("password", env("PGPASSWORD", ""));
        List<String> errors = Collections.synchronizedList(new ArrayList<>());
        ExecutorService ex = Executors.newFixedThreadPool(n);
        long t = System.currentTimeMillis();
        List<Future<?>> fs = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            final int id = i;
            fs.add(ex.submit(() -> {
                try (Connection c = DriverManager.getConnection(url, props)) {
                    PreparedStatement ps = c.prepareStatement("select ?::int * 1000 + ?::int");
                    for (int r = 0; r < rounds; r++) {
                        ps.setInt(1, id); ps.setInt(2, r);
                        try (ResultSet rs = ps.executeQuery()) {
                            rs.next();
                            if (rs.getInt(1) != id * 1000 + r) errors.add("prepared " + id + " " + r + " " + rs.getInt(1));
                        }
                        c.setAutoCommit(false);
                        try (Statement st = c.createStatement()) {
                            st.execute("create temp table t (a int, b text) on commit drop");
                        }
                        try (PreparedStatement ins = c.prepareStatement("insert into t values (?, ?)")) {
                            for (int k = 0; k < 10; k++) { ins.setInt(1, k); ins.setString(2, "w" + id); ins.addBatch(); }
                            ins.executeBatch();
                        }
                        try (PreparedStatement q = c.prepareStatement("select a, b from t order by a")) {
                            q.setFetchSize(3);
                            try (ResultSet rs = q.executeQuery()) {
                                int k = 0;
                                while (rs.next()) {
                                    if (rs.getInt(1) != k || !rs.getString(2).equals("w" + id)) errors.add("tx " + id + " " + r);
                                    k++;
                                }
                                if (k != 10) errors.add("rows " + id + " " + r + " " + k);
                            }
                        }
                        c.commit();
                        c.setAutoCommit(true);
                    }
                } catch (Exception e) {
                    errors.add("exception " + id + " " + e);
                }
            }));
        }
        for (Future<?> f : fs) f.get();
        ex.shutdown();
        System.out.printf("pgJDBC %s: %d connections x %d rounds in %.1fs; errors: %d%n",
            org.postgresql.util.DriverInfo.DRIVER_VERSION, n, rounds, (System.currentTimeMillis() - t) / 1000.0, errors.size());
        errors.stream().limit(20).forEach(e -> System.out.println("   " + e));
        System.exit(errors.isEmpty() ? 0 : 1);
    }
}
