package ferry.peers;

import java.io.File;
import java.lang.reflect.InvocationTargetException;
import java.net.URL;
import java.net.URLClassLoader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * Runs Apache Kafka's MirrorMaker 2 from another Kafka version's jars, in a class loader
 * of its own, for an install where Maven Central serves no connect-mirror at the
 * broker's version (Kafka 4.4.0: connect-mirror stops at 4.3.1, and 4.3.1's classes do
 * not link against 4.4.0's kafka-clients). Written into classes.env as MM2_MAIN by
 * scripts/peers/install-kafka-fallback.sh, so shared/peers/mm2-up.sh works unchanged.
 *
 * The jar this class lives in sits in KAFKA_HOME/libs; KAFKA_HOME/mirror.libs names the
 * directory with the full jar set of the Kafka version that MirrorMaker 2 comes from.
 * None of the broker's jars are visible to that loader (its parent is the platform loader).
 */
public final class Mm2Launcher {
    private static final String MAIN = "org.apache.kafka.connect.mirror.MirrorMaker";

    private Mm2Launcher() {}

    public static void main(String[] args) throws Throwable {
        Path self = Path.of(Mm2Launcher.class.getProtectionDomain().getCodeSource().getLocation().toURI());
        Path home = self.getParent().getParent();
        Path pointer = home.resolve("mirror.libs");
        String dir = System.getenv("FERRY_MM2_LIBS");
        if (dir == null || dir.isEmpty()) {
            dir = Files.readString(pointer, StandardCharsets.UTF_8).trim();
        }
        File[] jars = new File(dir).listFiles((d, n) -> n.endsWith(".jar"));
        if (jars == null || jars.length == 0) {
            throw new IllegalStateException("no MirrorMaker 2 jars in '" + dir + "' (named by " + pointer + ")");
        }
        Arrays.sort(jars);
        List<URL> urls = new ArrayList<>();
        StringBuilder cp = new StringBuilder();
        for (File j : jars) {
            urls.add(j.toURI().toURL());
            if (cp.length() > 0) cp.append(File.pathSeparatorChar);
            cp.append(j.getAbsolutePath());
        }
        System.err.println("[peers] MirrorMaker 2 from " + dir + " (isolated class loader, " + jars.length + " jars)");
        // Connect's plugin scan reads java.class.path: show it the MirrorMaker jars only.
        System.setProperty("java.class.path", cp.toString());
        ClassLoader loader = new URLClassLoader("ferry-mm2", urls.toArray(new URL[0]), ClassLoader.getPlatformClassLoader());
        Thread.currentThread().setContextClassLoader(loader);
        Class<?> main = Class.forName(MAIN, true, loader);
        try {
            main.getMethod("main", String[].class).invoke(null, (Object) args);
        } catch (InvocationTargetException e) {
            throw e.getCause();
        }
    }
}
