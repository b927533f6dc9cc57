package ferry.e2e;

import java.util.Arrays;
import java.util.Locale;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * Word count with exactly-once processing (tests/e2e/test_streams.py).
 *
 * <p>Lines from the input topic are split into lower-case words, re-keyed by word through a
 * repartition topic ({@code <application.id>-words-repartition}), counted in a persistent
 * RocksDB key-value store {@code counts} backed by a changelog topic
 * ({@code <application.id>-counts-changelog}), and every updated count goes to the output topic
 * (key: the word as a string, value: the count as an 8-byte big-endian long). There is no
 * record cache, so each input word makes one output record: a word's committed counts in the
 * output are 1, 2, 3, ... with none missing or repeated.
 * {@code processing.guarantee=exactly_once_v2}: one transactional producer per stream thread, the
 * input offsets committed in the same transaction as the output and changelog records.
 *
 * <p>Usage: {@code WordCountEos BOOTSTRAP APPLICATION_ID INPUT_TOPIC OUTPUT_TOPIC STATE_DIR
 * [COMMIT_INTERVAL_MS [THREADS [WORD_DELAY_MS]]]}; WORD_DELAY_MS (default 0) makes each counted
 * word take that long after its count is updated (in the counting sub-topology, before its output
 * record is sent), so that a test can kill something while a wave of input is half counted:
 * transactions open with output and changelog records in them, part of the wave committed.
 *
 * <p>Prints to stdout (one line each, flushed): {@code STATE OLD -> NEW} on every state change,
 * {@code RUNNING} when the instance reaches RUNNING, {@code UNCAUGHT thread: exception} when a
 * stream thread dies (it is replaced), and {@code EXIT n} before exiting on ERROR.
 */
public final class WordCountEos {
    private WordCountEos() { }

    static Topology topology(String input, String output, long wordDelayMs) {
        StreamsBuilder builder = new StreamsBuilder();
        builder.stream(input, Consumed.with(Serdes.String(), Serdes.String()))
            .flatMapValues(line -> Arrays.asList(line.toLowerCase(Locale.ROOT).split("\\W+")))
            .filter((key, word) -> !word.isEmpty())
            .groupBy((key, word) -> word, Grouped.with("words", Serdes.String(), Serdes.String()))
            .count(Materialized.<String, Long, KeyValueStore<Bytes, byte[]>>as("counts")
                .withKeySerde(Serdes.String())
                .withValueSerde(Serdes.Long()))
            .toStream()
            .peek((word, count) -> pause(wordDelayMs))
            .to(output, Produced.with(Serdes.String(), Serdes.Long()));
        return builder.build();
    }

    static void pause(long ms) {
        if (ms <= 0) return;
        try {
            Thread.sleep(ms);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    static void say(String line) {
        synchronized (System.out) {
            System.out.println(line);
            System.out.flush();
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 5) {
            System.err.println("usage: WordCountEos BOOTSTRAP APPLICATION_ID INPUT_TOPIC OUTPUT_TOPIC STATE_DIR"
                               + " [COMMIT_INTERVAL_MS [THREADS [WORD_DELAY_MS]]]");
            System.exit(2);
        }
        String bootstrap = args[0], appId = args[1], input = args[2], output = args[3], stateDir = args[4];
        String commitMs = args.length > 5 ? args[5] : "200";
        String threads = args.length > 6 ? args[6] : "1";
        long wordDelayMs = args.length > 7 ? Long.parseLong(args[7]) : 0;

        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir);
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, commitMs);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, threads);
        p.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, "1");
        // No record cache: every update of a count is sent (output and changelog) as it happens,
        // so the committed output of a word is exactly 1, 2, 3, ... and a transaction cut short
        // leaves records that must stay invisible to read_committed.
        p.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG, "0");
        // Consumed repartition records are deleted (DeleteRecords) after the commit at least every second.
        p.put(StreamsConfig.REPARTITION_PURGE_INTERVAL_MS_CONFIG, "1000");
        // The classic consumer group protocol (JoinGroup/SyncGroup); not KIP-848/KIP-1071.
        p.put(StreamsConfig.GROUP_PROTOCOL_CONFIG, "classic");
        p.put(StreamsConfig.DEFAULT_KEY_SERDE_CLASS_CONFIG, Serdes.StringSerde.class.getName());
        p.put(StreamsConfig.DEFAULT_VALUE_SERDE_CLASS_CONFIG, Serdes.StringSerde.class.getName());
        // A killed instance leaves the group within seconds, not 45 s.
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG), "10000");
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG), "1000");
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");
        // A killed broker is back within seconds: keep retrying rather than failing the task.
        p.put(StreamsConfig.producerPrefix(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG), "120000");
        p.put(StreamsConfig.producerPrefix(ProducerConfig.MAX_BLOCK_MS_CONFIG), "120000");
        p.put(StreamsConfig.TASK_TIMEOUT_MS_CONFIG, "300000");

        KafkaStreams streams = new KafkaStreams(topology(input, output, wordDelayMs), p);
        CountDownLatch done = new CountDownLatch(1);
        streams.setStateListener((now, old) -> {
            say("STATE " + old + " -> " + now);
            if (now == KafkaStreams.State.RUNNING) {
                say("RUNNING");
            }
            if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
                done.countDown();
            }
        });
        streams.setUncaughtExceptionHandler(e -> {
            say("UNCAUGHT " + Thread.currentThread().getName() + ": " + e);
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.REPLACE_THREAD;
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close();
            done.countDown();
        }, "shutdown"));

        say(topology(input, output, wordDelayMs).describe().toString().trim());
        streams.start();
        done.await();
        KafkaStreams.State last = streams.state();
        int code = last == KafkaStreams.State.ERROR ? 1 : 0;
        say("EXIT " + code + " (" + last + ")");
        streams.close();
        System.exit(code);
    }
}
