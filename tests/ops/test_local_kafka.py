import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from ops.local_kafka import LocalKafka, LocalKafkaCluster, free_port
from core.topics import create_topics
from tests.conftest import base_settings

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]

# A command that starts a broker in a scratch directory the way `liber bench` and
# `liber chaos` do, says where, and then waits to be ended.
CHILD = """
import sys, time
from ops.local_kafka import LocalKafka, Scratch, free_port
scratch = Scratch("liber-test-owner-")
try:
    broker = LocalKafka(sys.argv[1], scratch.path / "kafka", port=free_port(), heap="256m")
    broker.start(log=lambda m: None)
    try:
        print(broker.pid(), scratch.path, flush=True)
        time.sleep(600)
    finally:
        broker.stop(log=lambda m: None)
finally:
    scratch.close()
"""


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that does not reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _until(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.2)
    return predicate()


def _owner(home) -> tuple[subprocess.Popen, int, Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(home)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2:
        proc.kill()
        raise AssertionError(f"the owner did not start its broker: {proc.communicate()[1][-3000:]}")
    pid, path = int(line[0]), Path(line[1])
    assert _alive(pid) and path.is_dir()
    return proc, pid, path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_broker_and_scratch_dir_do_not_outlive_their_command(sig):
    owner, broker_pid, scratch = _owner(base_settings().home)
    try:
        owner.send_signal(sig)
        code = owner.wait(120)
    finally:
        if owner.poll() is None:
            owner.kill()
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 143)
    assert _until(lambda: not _alive(broker_pid)), f"broker pid {broker_pid} outlived its command"
    assert _until(lambda: not scratch.exists()), f"{scratch} left behind"


def test_broker_restarts_with_its_data_and_stops_by_pid(tmp_path, kafka):
    broker = LocalKafka(kafka.home, tmp_path / "b", port=free_port())
    broker.start(log=lambda m: None)
    # the broker does not create topics on first use (as in docker-compose.yml)
    create_topics(base_settings(bootstrap_servers=broker.bootstrap, topic_partitions=1),
                  ["keep"], log=lambda m: None)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    producer.send("keep", key=b"k", value=b"v1").get(timeout=30)
    producer.close()
    pid = broker.pid()
    broker.stop(log=lambda m: None)
    assert not broker.running() and not broker.pid_file.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    broker.start(log=lambda m: None)  # same data directory: the record is still there
    try:
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=10000)
        consumer.assign([TopicPartition("keep", 0)])
        consumer.seek_to_beginning()
        assert [r.value for r in consumer][:1] == [b"v1"]
        consumer.close()
    finally:
        broker.stop(log=lambda m: None)


def test_stale_pid_file_is_not_mistaken_for_a_broker(tmp_path, kafka):
    broker = LocalKafka(kafka.home, tmp_path / "c", port=free_port())
    broker.data_dir.mkdir(parents=True)
    broker.pid_file.write_text(str(os.getpid()))  # a live process, but not a broker
    assert not broker.running()
    broker.stop(log=lambda m: None)  # must not signal the unrelated process
    assert not broker.pid_file.exists()


def test_cluster_keeps_acknowledged_records_through_a_broker_sigkill(tmp_path):
    from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
    cluster = LocalKafkaCluster(base_settings().home, tmp_path / "cluster", heap="256m")
    cluster.start(log=lambda m: None)
    try:
        admin = cluster._admin()
        admin.create_topics([NewTopic("keep", 2, 3)])
        cluster.wait_in_sync()  # every node knows the topic before it is described
        for _ in range(40):  # a node that has not applied the topic yet answers without it
            configs = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, "keep",
                                configs={"min.insync.replicas": None})], config_filter="all")
            by_name = next(iter(configs.values()))  # keyed by resource type, then name
            if "min.insync.replicas" in by_name.get("keep", {}):
                break
            time.sleep(0.5)
        admin.close()
        assert by_name["keep"]["min.insync.replicas"]["value"] == "2"
        producer = KafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all", retries=20)
        for i in range(40):
            producer.send("keep", key=b"k%d" % (i % 2), value=b"%d" % i).get(timeout=60)
        leader = cluster.leaders(["keep"])
        victim = max((n for n in leader if n > 0), key=leader.get)
        pid = cluster.node(victim).pid()
        cluster.node(victim).kill(log=lambda m: None)
        assert not _alive(pid)
        for i in range(40, 80):  # two replicas left: min.insync.replicas still met
            producer.send("keep", key=b"k%d" % (i % 2), value=b"%d" % i).get(timeout=60)
        producer.close()
        assert victim not in cluster.leaders(["keep"])
        cluster.restart(victim, log=lambda m: None)  # returns once it is back in every ISR
        assert all(len(p["isr"]) == 3 for p in cluster.partitions(["keep"]))
        consumer = KafkaConsumer(bootstrap_servers=cluster.bootstrap, consumer_timeout_ms=15000,
                                 auto_offset_reset="earliest", enable_auto_commit=False)
        consumer.assign([TopicPartition("keep", p) for p in (0, 1)])
        values = sorted(int(r.value) for r in consumer)
        consumer.close()
        assert values == list(range(80))
    finally:
        cluster.stop(log=lambda m: None)
