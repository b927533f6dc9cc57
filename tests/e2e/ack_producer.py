"""Continuous idempotent producer for test_durability (run as a subprocess).

usage: ack_producer.py BOOTSTRAP TOPIC ACK_FILE STOP_FILE

Produces values v-000000000, v-000000001, ... to partition 0 (acks=all, idempotence on), about
2000/s. Each acknowledged record is appended to ACK_FILE as "partition offset value" and flushed
as its delivery report arrives. Errors go to stderr as "ERROR ..." / "FATAL ...". When STOP_FILE
appears it flushes (60 s max), prints "DONE produced=N" and exits.
"""
import os
import sys
import time

from confluent_kafka import Producer


def main():
    bootstrap, topic, ack_path, stop_path = sys.argv[1:5]
    fatal = []

    def on_error(err):
        print(f"{'FATAL' if err.fatal() else 'ERROR'} {err}", file=sys.stderr, flush=True)
        if err.fatal():
            fatal.append(err)

    p = Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
        "linger.ms": 5, "message.timeout.ms": 120000, "retry.backoff.ms": 100,
        "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 500, "socket.timeout.ms": 10000,
        "error_cb": on_error,
    })
    acks = open(ack_path, "a", buffering=1)

    def on_delivery(err, msg):
        if err is not None:
            print(f"ERROR delivery {msg.value().decode()}: {err}", file=sys.stderr, flush=True)
            return
        acks.write(f"{msg.partition()} {msg.offset()} {msg.value().decode()}\n")
        acks.flush()

    i = 0
    while not os.path.exists(stop_path) and not fatal:
        for _ in range(20):
            try:
                p.produce(topic, value=f"v-{i:09d}".encode(), partition=0, on_delivery=on_delivery)
                i += 1
            except BufferError:
                break
        p.poll(0.01)
    left = p.flush(60)
    acks.close()
    print(f"DONE produced={i} undelivered={left} fatal={len(fatal)}", flush=True)
    sys.exit(1 if fatal or left else 0)


if __name__ == "__main__":
    main()
