"""Kafka's wire format, as far as the test proxy (kafka_proxy) reads and writes it: the
API keys, a request's header and the body fields it records, an OffsetCommit answered in the
broker's place, and a Fetch answer whose partitions are failed with an error code."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

PRODUCE, FETCH, LIST_OFFSETS, METADATA, OFFSET_COMMIT, FIND_COORDINATOR = 0, 1, 2, 3, 8, 10
INIT_PRODUCER_ID, ADD_OFFSETS_TO_TXN, END_TXN, TXN_OFFSET_COMMIT = 22, 25, 26, 28
DESCRIBE_CLUSTER = 60
JOIN_GROUP, HEARTBEAT, LEAVE_GROUP, SYNC_GROUP, CONSUMER_GROUP_HEARTBEAT = 11, 12, 13, 14, 68
API_NAMES = {
    0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit",
    9: "OffsetFetch", 10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat",
    13: "LeaveGroup", 14: "SyncGroup", 15: "DescribeGroups", 16: "ListGroups",
    18: "ApiVersions", 19: "CreateTopics", 21: "DeleteRecords", 22: "InitProducerId",
    23: "OffsetForLeaderEpoch", 24: "AddPartitionsToTxn", 25: "AddOffsetsToTxn",
    26: "EndTxn", 28: "TxnOffsetCommit", 32: "DescribeConfigs", 36: "SaslAuthenticate",
    60: "DescribeCluster", 68: "ConsumerGroupHeartbeat",
}
# First flexible version (compact strings, tagged fields) of the requests whose body is read.
_FLEXIBLE_FROM = {PRODUCE: 9, OFFSET_COMMIT: 8, INIT_PRODUCER_ID: 2}
# First flexible version of the Fetch response (KIP-482), and the first naming topics by id.
_FETCH_FLEXIBLE_FROM, _FETCH_TOPIC_IDS_FROM = 12, 13
# A refused OffsetCommit is answered in the broker's place with OFFSET_METADATA_TOO_LARGE for
# every partition: final to clients (no retry, no rejoin as after ILLEGAL_GENERATION).
REFUSAL_ERROR = 12
# A partition error librdkafka hands to the application (poll() returns it as a message whose
# error() it is) and then recovers from, fetching again after a backoff (5 s for this code).
TOPIC_AUTHORIZATION_FAILED = 29


@dataclass(frozen=True)
class KafkaRequest:
    """One request a client sent through the proxy, as it arrived."""

    api_key: int
    api_version: int
    correlation_id: int
    connection: int        # the proxy's number for the client's TCP connection
    client_id: str | None
    at: float              # time.monotonic() at arrival
    acks: int | None = None               # Produce: 0, 1 or -1 (all)
    transactional_id: str | None = None   # Produce v3+, InitProducerId: the transaction's
                                          # producer (None: not transactional)

    @property
    def name(self) -> str:
        return API_NAMES.get(self.api_key, f"api {self.api_key}")


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip_tags(data: bytes, pos: int) -> int:
    count, pos = _uvarint(data, pos)
    for _ in range(count):
        _tag, pos = _uvarint(data, pos)
        size, pos = _uvarint(data, pos)
        pos += size
    return pos


def _string(data: bytes, pos: int, compact: bool) -> tuple[str | None, int]:
    if compact:
        size, pos = _uvarint(data, pos)
        size -= 1
    else:
        (size,) = struct.unpack_from(">h", data, pos)
        pos += 2
    if size < 0:
        return None, pos
    return data[pos:pos + size].decode(errors="replace"), pos + size


def parse_request(frame: bytes, connection: int) -> tuple[KafkaRequest, int]:
    """A request frame (size included) -> the request and where its body starts."""
    api_key, version, correlation = struct.unpack_from(">hhi", frame, 4)
    client_id, pos = _string(frame, 12, compact=False)  # a header's client_id never is
    flexible = version >= _FLEXIBLE_FROM.get(api_key, 1 << 15)
    if flexible:
        pos = _skip_tags(frame, pos)
    acks = txn = None
    if api_key == PRODUCE:
        body = pos
        if version >= 3:
            txn, body = _string(frame, body, compact=flexible)
        (acks,) = struct.unpack_from(">h", frame, body)
    elif api_key == INIT_PRODUCER_ID:  # its first field in every version
        txn, _ = _string(frame, pos, compact=flexible)
    return KafkaRequest(api_key, version, correlation, connection, client_id,
                        time.monotonic(), acks, txn), pos


def _count(data: bytes, pos: int, compact: bool) -> tuple[int, int]:
    if compact:
        count, pos = _uvarint(data, pos)
        return count - 1, pos
    (count,) = struct.unpack_from(">i", data, pos)
    return count, pos + 4


def _put_count(count: int, compact: bool) -> bytes:
    if not compact:
        return struct.pack(">i", count)
    value, out = count + 1, bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def offset_commit_refusal(frame: bytes, body: int, version: int,
                          error: int = REFUSAL_ERROR) -> bytes:
    """The answer to an OffsetCommit request (v2-v9) refusing every partition it names
    with ``error``: the frame the broker would send, built from the request."""
    flexible = version >= _FLEXIBLE_FROM[OFFSET_COMMIT]
    tags = b"\0" if flexible else b""
    _group, pos = _string(frame, body, flexible)
    _member, pos = _string(frame, pos + 4, flexible)  # after the generation
    if version >= 7:
        _instance, pos = _string(frame, pos, flexible)
    if version <= 4:
        pos += 8  # retention_time_ms
    out = bytearray(frame[8:12]) + tags  # the correlation id (+ the header's tags)
    if version >= 3:
        out += bytes(4)  # throttle_time_ms
    topics, pos = _count(frame, pos, flexible)
    out += _put_count(topics, flexible)
    for _ in range(topics):
        start = pos
        _name, pos = _string(frame, pos, flexible)
        out += frame[start:pos]
        partitions, pos = _count(frame, pos, flexible)
        out += _put_count(partitions, flexible)
        for _ in range(partitions):
            out += frame[pos:pos + 4] + struct.pack(">h", error) + tags
            pos += 12 + (4 if version >= 6 else 0)  # index, offset, leader epoch
            _metadata, pos = _string(frame, pos, flexible)
            if flexible:
                pos = _skip_tags(frame, pos)
        if flexible:
            pos = _skip_tags(frame, pos)
        out += tags
    out += tags
    return struct.pack(">i", len(out)) + bytes(out)


def fetch_failure(frame: bytes, version: int, error: int) -> bytes | None:
    """A Fetch answer (v4-v17, size included) with every partition that carries records
    answered ``error`` instead, its records emptied - as a broker refusing the partition
    answers (high watermark, last stable offset and the rest as they were); None if no
    partition of it carries records (nothing to fail). Only sizes of records change, and
    none of the frame's other fields counts bytes: the frame is rebuilt around them."""
    if not 4 <= version <= 17:
        raise ValueError(f"Fetch v{version} is not read (v4-v17 are)")
    flexible = version >= _FETCH_FLEXIBLE_FROM
    pos, failed = 8, False  # past the size and the correlation id
    if flexible:
        pos = _skip_tags(frame, pos)  # the response header's
    pos += 4 + (6 if version >= 7 else 0)  # throttle time; error code and session id
    topics, pos = _count(frame, pos, flexible)
    for _ in range(topics):
        if version >= _FETCH_TOPIC_IDS_FROM:
            pos += 16
        else:
            _name, pos = _string(frame, pos, flexible)
        partitions, pos = _count(frame, pos, flexible)
        for _ in range(partitions):
            error_at = pos + 4  # after the partition index
            pos += 4 + 2 + 8 + 8 + (8 if version >= 5 else 0)  # .. last stable, log start
            aborted, pos = _count(frame, pos, flexible)
            for _ in range(max(aborted, 0)):
                pos += 16  # producer id, first offset
                if flexible:
                    pos = _skip_tags(frame, pos)
            if version >= 11:
                pos += 4  # preferred read replica
            records_at = pos
            size, pos = _count(frame, pos, flexible)   # nullable bytes: a length read as one
            if size > 0:  # failed: the error in, the records out (empty, not null)
                empty = _put_count(0, flexible)
                frame = (frame[:error_at] + struct.pack(">h", error)
                         + frame[error_at + 2:records_at] + empty + frame[pos + size:])
                pos, failed = records_at + len(empty), True
            else:
                pos += max(size, 0)
            if flexible:
                pos = _skip_tags(frame, pos)
        if flexible:
            pos = _skip_tags(frame, pos)
    if flexible:
        pos = _skip_tags(frame, pos)
    if pos != len(frame):
        raise ValueError(f"Fetch v{version} answer read to byte {pos} of {len(frame)}")
    if not failed:
        return None
    return struct.pack(">i", len(frame) - 4) + frame[4:]
