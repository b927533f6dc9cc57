// A consume-transform-produce loop with Kafka's Java client, exactly once: each input record
// read with read_committed becomes one output record (key "partition-offset", value upper-cased),
// written in a transaction together with the consumer's offsets (sendOffsetsToTransaction).
// Transactions hold up to BATCH records and are spread over time so a SIGKILL lands inside one.
// Exits after IDLE_MS without input once it has copied something (START_MS before that: a
// restarted member waits for the group to drop its killed predecessor). Args: bootstrap input
// output group transactional.id
package ferry.e2e;

import java.time.Duration;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class TxnCopier {
    static final int BATCH = 50;
    static final long IDLE_MS = 10000;
    static final long START_MS = 60000;

    public static void main(String[] args) throws Exception {
        String bootstrap = args[0], input = args[1], output = args[2], group = args[3], txnId = args[4];
        Properties cp = new Properties();
        cp.put("bootstrap.servers", bootstrap);
        cp.put("group.id", group);
        cp.put("enable.auto.commit", "false");
        cp.put("isolation.level", "read_committed");
        cp.put("auto.offset.reset", "earliest");
        cp.put("max.poll.records", String.valueOf(BATCH));
        cp.put("session.timeout.ms", "6000");
        cp.put("heartbeat.interval.ms", "1000");
        cp.put("key.deserializer", StringDeserializer.class.getName());
        cp.put("value.deserializer", StringDeserializer.class.getName());
        Properties pp = new Properties();
        pp.put("bootstrap.servers", bootstrap);
        pp.put("transactional.id", txnId);
        pp.put("transaction.timeout.ms", "30000");
        pp.put("delivery.timeout.ms", "120000");
        pp.put("max.block.ms", "120000");
        pp.put("key.serializer", StringSerializer.class.getName());
        pp.put("value.serializer", StringSerializer.class.getName());
        long copied = 0;
        try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(cp);
             KafkaProducer<String, String> producer = new KafkaProducer<>(pp)) {
            producer.initTransactions();
            consumer.subscribe(List.of(input));
            long lastInput = System.currentTimeMillis();
            while (System.currentTimeMillis() - lastInput < (copied == 0 ? START_MS : IDLE_MS)) {
                ConsumerRecords<String, String> records = consumer.poll(Duration.ofMillis(500));
                if (records.isEmpty()) {
                    continue;
                }
                lastInput = System.currentTimeMillis();
                producer.beginTransaction();
                Map<TopicPartition, OffsetAndMetadata> offsets = new HashMap<>();
                int i = 0;
                for (ConsumerRecord<String, String> r : records) {
                    producer.send(new ProducerRecord<>(output, r.partition() + "-" + r.offset(), r.value().toUpperCase()));
                    offsets.put(new TopicPartition(r.topic(), r.partition()), new OffsetAndMetadata(r.offset() + 1));
                    if (++i % 10 == 0) {
                        Thread.sleep(5);
                    }
                }
                producer.sendOffsetsToTransaction(offsets, consumer.groupMetadata());
                producer.commitTransaction();
                copied += records.count();
                System.out.println("committed " + copied);
                System.out.flush();
            }
        }
        System.out.println("idle, done after " + copied);
    }
}
