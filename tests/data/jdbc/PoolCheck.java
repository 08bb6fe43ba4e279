import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;

/**
 * Opens a JDBC connection N times in a row with the same URL; each prints
 * "pid|search_path|prepared statements|current_user", then leaves things
 * behind (a SET, a server-side prepared statement, an open transaction) and
 * closes. Run: java -cp postgresql.jar PoolCheck.java URL N PAUSE_MS
 */
public class PoolCheck {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        int n = Integer.parseInt(args[1]);
        long pause = Long.parseLong(args[2]);
        for (int i = 0; i < n; i++) {
            try (Connection c = DriverManager.getConnection(url, "someone-else", "")) {
                try (Statement s = c.createStatement();
                     ResultSet r = s.executeQuery(
                         "SELECT pg_backend_pid(), current_setting('search_path'),"
                         + " (SELECT count(*) FROM pg_prepared_statements), current_user")) {
                    r.next();
                    System.out.println(r.getInt(1) + "|" + r.getString(2) + "|" + r.getLong(3)
                        + "|" + r.getString(4));
                }
                try (Statement s = c.createStatement()) {
                    s.execute("SET search_path = nowhere");
                }
                try (PreparedStatement p = c.prepareStatement("SELECT ?::int")) {
                    for (int k = 0; k < 8; k++) {  // past prepareThreshold: a named statement
                        p.setInt(1, k);
                        p.executeQuery().close();
                    }
                }
                c.setAutoCommit(false);
                try (Statement s = c.createStatement()) {
                    s.execute("SELECT 1");  // leaves the transaction open at close
                }
            }
            Thread.sleep(pause);
        }
    }
}
