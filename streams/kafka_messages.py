"""What Kafka's messages look like: API keys, versions, error codes and response layouts.

The tables come from Apache Kafka 3.9.1's own ``ApiKeys`` and ``Errors`` (clients jar); keys 88-92
are the later 4.x additions. ``response_error`` finds the error a response reports by walking its
body with a small layout of each response (``RESPONSES``): only the fields up to, and around, the
error codes, each with the versions it exists in, the way Kafka's JSON message specs describe
them. Flexible versions (KIP-482) use compact strings/arrays (unsigned varint lengths + 1) and end
every structure with tagged fields, which are skipped. Layouts were checked against bodies the
Kafka library serialised itself for every version (tests/streams/fixtures/kafka/library_bodies.txt).
"""

from __future__ import annotations

from dataclasses import dataclass

# api_key → (name, highest version known, first flexible version). Every API starts at version 0.
_NEVER = 1 << 15
APIS: dict[int, tuple[str, int, int]] = {
    0: ("Produce", 11, 9),
    1: ("Fetch", 17, 12),
    2: ("ListOffsets", 9, 6),
    3: ("Metadata", 12, 9),
    4: ("LeaderAndIsr", 7, 4),
    5: ("StopReplica", 4, 2),
    6: ("UpdateMetadata", 8, 6),
    7: ("ControlledShutdown", 3, 3),
    8: ("OffsetCommit", 9, 8),
    9: ("OffsetFetch", 9, 6),
    10: ("FindCoordinator", 6, 3),
    11: ("JoinGroup", 9, 6),
    12: ("Heartbeat", 4, 4),
    13: ("LeaveGroup", 5, 4),
    14: ("SyncGroup", 5, 4),
    15: ("DescribeGroups", 5, 5),
    16: ("ListGroups", 5, 3),
    17: ("SaslHandshake", 1, _NEVER),
    18: ("ApiVersions", 4, 3),
    19: ("CreateTopics", 7, 5),
    20: ("DeleteTopics", 6, 4),
    21: ("DeleteRecords", 2, 2),
    22: ("InitProducerId", 5, 2),
    23: ("OffsetForLeaderEpoch", 4, 4),
    24: ("AddPartitionsToTxn", 5, 3),
    25: ("AddOffsetsToTxn", 4, 3),
    26: ("EndTxn", 4, 3),
    27: ("WriteTxnMarkers", 1, 1),
    28: ("TxnOffsetCommit", 4, 3),
    29: ("DescribeAcls", 3, 2),
    30: ("CreateAcls", 3, 2),
    31: ("DeleteAcls", 3, 2),
    32: ("DescribeConfigs", 4, 4),
    33: ("AlterConfigs", 2, 2),
    34: ("AlterReplicaLogDirs", 2, 2),
    35: ("DescribeLogDirs", 4, 2),
    36: ("SaslAuthenticate", 2, 2),
    37: ("CreatePartitions", 3, 2),
    38: ("CreateDelegationToken", 3, 2),
    39: ("RenewDelegationToken", 2, 2),
    40: ("ExpireDelegationToken", 2, 2),
    41: ("DescribeDelegationToken", 3, 2),
    42: ("DeleteGroups", 2, 2),
    43: ("ElectLeaders", 2, 2),
    44: ("IncrementalAlterConfigs", 1, 1),
    45: ("AlterPartitionReassignments", 0, 0),
    46: ("ListPartitionReassignments", 0, 0),
    47: ("OffsetDelete", 0, _NEVER),
    48: ("DescribeClientQuotas", 1, 1),
    49: ("AlterClientQuotas", 1, 1),
    50: ("DescribeUserScramCredentials", 0, 0),
    51: ("AlterUserScramCredentials", 0, 0),
    52: ("Vote", 1, 0),
    53: ("BeginQuorumEpoch", 1, 1),
    54: ("EndQuorumEpoch", 1, 1),
    55: ("DescribeQuorum", 2, 0),
    56: ("AlterPartition", 3, 0),
    57: ("UpdateFeatures", 1, 0),
    58: ("Envelope", 0, 0),
    59: ("FetchSnapshot", 1, 0),
    60: ("DescribeCluster", 1, 0),
    61: ("DescribeProducers", 0, 0),
    62: ("BrokerRegistration", 4, 0),
    63: ("BrokerHeartbeat", 1, 0),
    64: ("UnregisterBroker", 0, 0),
    65: ("DescribeTransactions", 0, 0),
    66: ("ListTransactions", 1, 0),
    67: ("AllocateProducerIds", 0, 0),
    68: ("ConsumerGroupHeartbeat", 0, 0),
    69: ("ConsumerGroupDescribe", 0, 0),
    70: ("ControllerRegistration", 0, 0),
    71: ("GetTelemetrySubscriptions", 0, 0),
    72: ("PushTelemetry", 0, 0),
    73: ("AssignReplicasToDirs", 0, 0),
    74: ("ListClientMetricsResources", 0, 0),
    75: ("DescribeTopicPartitions", 0, 0),
    76: ("ShareGroupHeartbeat", 0, 0),
    77: ("ShareGroupDescribe", 0, 0),
    78: ("ShareFetch", 0, 0),
    79: ("ShareAcknowledge", 0, 0),
    80: ("AddRaftVoter", 0, 0),
    81: ("RemoveRaftVoter", 0, 0),
    82: ("UpdateRaftVoter", 0, 0),
    83: ("InitializeShareGroupState", 0, 0),
    84: ("ReadShareGroupState", 0, 0),
    85: ("WriteShareGroupState", 0, 0),
    86: ("DeleteShareGroupState", 0, 0),
    87: ("ReadShareGroupStateSummary", 0, 0),
    88: ("StreamsGroupHeartbeat", 0, 0),
    89: ("StreamsGroupDescribe", 0, 0),
    90: ("DescribeShareGroupOffsets", 0, 0),
    91: ("AlterShareGroupOffsets", 0, 0),
    92: ("DeleteShareGroupOffsets", 0, 0),
}
# Clients newer than this table may speak a version or two beyond it: such requests are still
# framed and named, but their response bodies are not read (the layout may have changed).
VERSION_HEADROOM = 2

ERRORS: dict[int, str] = {
    -1: "UNKNOWN_SERVER_ERROR", 0: "NONE", 1: "OFFSET_OUT_OF_RANGE", 2: "CORRUPT_MESSAGE",
    3: "UNKNOWN_TOPIC_OR_PARTITION", 4: "INVALID_FETCH_SIZE", 5: "LEADER_NOT_AVAILABLE",
    6: "NOT_LEADER_OR_FOLLOWER", 7: "REQUEST_TIMED_OUT", 8: "BROKER_NOT_AVAILABLE",
    9: "REPLICA_NOT_AVAILABLE", 10: "MESSAGE_TOO_LARGE", 11: "STALE_CONTROLLER_EPOCH",
    12: "OFFSET_METADATA_TOO_LARGE", 13: "NETWORK_EXCEPTION", 14: "COORDINATOR_LOAD_IN_PROGRESS",
    15: "COORDINATOR_NOT_AVAILABLE", 16: "NOT_COORDINATOR", 17: "INVALID_TOPIC_EXCEPTION",
    18: "RECORD_LIST_TOO_LARGE", 19: "NOT_ENOUGH_REPLICAS", 20: "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
    21: "INVALID_REQUIRED_ACKS", 22: "ILLEGAL_GENERATION", 23: "INCONSISTENT_GROUP_PROTOCOL",
    24: "INVALID_GROUP_ID", 25: "UNKNOWN_MEMBER_ID", 26: "INVALID_SESSION_TIMEOUT",
    27: "REBALANCE_IN_PROGRESS", 28: "INVALID_COMMIT_OFFSET_SIZE",
    29: "TOPIC_AUTHORIZATION_FAILED", 30: "GROUP_AUTHORIZATION_FAILED",
    31: "CLUSTER_AUTHORIZATION_FAILED", 32: "INVALID_TIMESTAMP", 33: "UNSUPPORTED_SASL_MECHANISM",
    34: "ILLEGAL_SASL_STATE", 35: "UNSUPPORTED_VERSION", 36: "TOPIC_ALREADY_EXISTS",
    37: "INVALID_PARTITIONS", 38: "INVALID_REPLICATION_FACTOR", 39: "INVALID_REPLICA_ASSIGNMENT",
    40: "INVALID_CONFIG", 41: "NOT_CONTROLLER", 42: "INVALID_REQUEST",
    43: "UNSUPPORTED_FOR_MESSAGE_FORMAT", 44: "POLICY_VIOLATION",
    45: "OUT_OF_ORDER_SEQUENCE_NUMBER", 46: "DUPLICATE_SEQUENCE_NUMBER",
    47: "INVALID_PRODUCER_EPOCH", 48: "INVALID_TXN_STATE", 49: "INVALID_PRODUCER_ID_MAPPING",
    50: "INVALID_TRANSACTION_TIMEOUT", 51: "CONCURRENT_TRANSACTIONS",
    52: "TRANSACTION_COORDINATOR_FENCED", 53: "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    54: "SECURITY_DISABLED", 55: "OPERATION_NOT_ATTEMPTED", 56: "KAFKA_STORAGE_ERROR",
    57: "LOG_DIR_NOT_FOUND", 58: "SASL_AUTHENTICATION_FAILED", 59: "UNKNOWN_PRODUCER_ID",
    60: "REASSIGNMENT_IN_PROGRESS", 61: "DELEGATION_TOKEN_AUTH_DISABLED",
    62: "DELEGATION_TOKEN_NOT_FOUND", 63: "DELEGATION_TOKEN_OWNER_MISMATCH",
    64: "DELEGATION_TOKEN_REQUEST_NOT_ALLOWED", 65: "DELEGATION_TOKEN_AUTHORIZATION_FAILED",
    66: "DELEGATION_TOKEN_EXPIRED", 67: "INVALID_PRINCIPAL_TYPE", 68: "NON_EMPTY_GROUP",
    69: "GROUP_ID_NOT_FOUND", 70: "FETCH_SESSION_ID_NOT_FOUND", 71: "INVALID_FETCH_SESSION_EPOCH",
    72: "LISTENER_NOT_FOUND", 73: "TOPIC_DELETION_DISABLED", 74: "FENCED_LEADER_EPOCH",
    75: "UNKNOWN_LEADER_EPOCH", 76: "UNSUPPORTED_COMPRESSION_TYPE", 77: "STALE_BROKER_EPOCH",
    78: "OFFSET_NOT_AVAILABLE", 79: "MEMBER_ID_REQUIRED", 80: "PREFERRED_LEADER_NOT_AVAILABLE",
    81: "GROUP_MAX_SIZE_REACHED", 82: "FENCED_INSTANCE_ID", 83: "ELIGIBLE_LEADERS_NOT_AVAILABLE",
    84: "ELECTION_NOT_NEEDED", 85: "NO_REASSIGNMENT_IN_PROGRESS", 86: "GROUP_SUBSCRIBED_TO_TOPIC",
    87: "INVALID_RECORD", 88: "UNSTABLE_OFFSET_COMMIT", 89: "THROTTLING_QUOTA_EXCEEDED",
    90: "PRODUCER_FENCED", 91: "RESOURCE_NOT_FOUND", 92: "DUPLICATE_RESOURCE",
    93: "UNACCEPTABLE_CREDENTIAL", 94: "INCONSISTENT_VOTER_SET", 95: "INVALID_UPDATE_VERSION",
    96: "FEATURE_UPDATE_FAILED", 97: "PRINCIPAL_DESERIALIZATION_FAILURE", 98: "SNAPSHOT_NOT_FOUND",
    99: "POSITION_OUT_OF_RANGE", 100: "UNKNOWN_TOPIC_ID", 101: "DUPLICATE_BROKER_REGISTRATION",
    102: "BROKER_ID_NOT_REGISTERED", 103: "INCONSISTENT_TOPIC_ID", 104: "INCONSISTENT_CLUSTER_ID",
    105: "TRANSACTIONAL_ID_NOT_FOUND", 106: "FETCH_SESSION_TOPIC_ID_ERROR",
    107: "INELIGIBLE_REPLICA", 108: "NEW_LEADER_ELECTED", 109: "OFFSET_MOVED_TO_TIERED_STORAGE",
    110: "FENCED_MEMBER_EPOCH", 111: "UNRELEASED_INSTANCE_ID", 112: "UNSUPPORTED_ASSIGNOR",
    113: "STALE_MEMBER_EPOCH", 114: "MISMATCHED_ENDPOINT_TYPE", 115: "UNSUPPORTED_ENDPOINT_TYPE",
    116: "UNKNOWN_CONTROLLER_ID", 117: "UNKNOWN_SUBSCRIPTION_ID", 118: "TELEMETRY_TOO_LARGE",
    119: "INVALID_REGISTRATION", 120: "TRANSACTION_ABORTABLE", 121: "INVALID_RECORD_STATE",
    122: "SHARE_SESSION_NOT_FOUND", 123: "INVALID_SHARE_SESSION_EPOCH", 124: "FENCED_STATE_EPOCH",
    125: "INVALID_VOTER_KEY", 126: "DUPLICATE_VOTER", 127: "VOTER_NOT_FOUND",
}


def error_name(code: int) -> str:
    return ERRORS.get(code, str(code))


def api_known(api_key: int, version: int) -> bool:
    api = APIS.get(api_key)
    return api is not None and 0 <= version <= api[1] + VERSION_HEADROOM


def flexible(api_key: int, version: int) -> bool:
    """Whether this request version uses compact encodings and tagged fields (KIP-482)."""
    api = APIS.get(api_key)
    return api is not None and version >= api[2]


# -- response layouts ----------------------------------------------------------------------------
I8, I16, I32, I64, UUID, STR, BYTES, ERR, INTS, LONGS, ARRAY, FIRST = range(12)
_FIXED = {I8: 1, I16: 2, I32: 4, I64: 8, UUID: 16}
_ANY = _NEVER


@dataclass(frozen=True, slots=True)
class Field:
    kind: int
    since: int = 0
    until: int = _ANY
    items: tuple[Field, ...] = ()


def _f(kind: int, since: int = 0, until: int = _ANY) -> Field:
    return Field(kind, since, until)


def _array(*items: Field, since: int = 0, until: int = _ANY) -> Field:
    return Field(ARRAY, since, until, items)


def _first(*items: Field, since: int = 0, until: int = _ANY) -> Field:
    """An array of which only the first element's leading fields are read; the walk ends there."""
    return Field(FIRST, since, until, items)


def _throttle_then_error(throttle_since: int = 0, error_since: int = 0) -> tuple[Field, ...]:
    return (_f(I32, throttle_since), _f(ERR, error_since))


_ERROR_FIRST = (_f(ERR),)
_TOP = _throttle_then_error()

# Fields in order up to the last error code of interest. A layout that stops early is fine: the
# walk reads no further than it describes.
RESPONSES: dict[int, tuple[Field, ...]] = {
    0: (  # Produce
        _array(_f(STR), _array(_f(I32), _f(ERR), _f(I64), _f(I64, 2), _f(I64, 5),
                               _array(_f(I32), _f(STR), since=8), _f(STR, 8))),
        _f(I32, 1)),
    1: (  # Fetch
        _f(I32, 1), _f(ERR, 7), _f(I32, 7),
        _array(_f(STR, 0, 12), _f(UUID, 13),
               _array(_f(I32), _f(ERR), _f(I64), _f(I64, 4), _f(I64, 5),
                      _array(_f(I64), _f(I64), since=4), _f(I32, 11), _f(BYTES)))),
    2: (  # ListOffsets
        _f(I32, 2),
        _array(_f(STR), _array(_f(I32), _f(ERR), _f(LONGS, 0, 0), _f(I64, 1), _f(I64, 1),
                               _f(I32, 4)))),
    3: (  # Metadata
        _f(I32, 3), _array(_f(I32), _f(STR), _f(I32), _f(STR, 1)), _f(STR, 2), _f(I32, 1),
        _array(_f(ERR), _f(STR), _f(UUID, 10), _f(I8, 1),
               _array(_f(ERR), _f(I32), _f(I32), _f(I32, 7), _f(INTS), _f(INTS), _f(INTS, 5)),
               _f(I32, 8)),
        _f(I32, 8, 10)),
    4: _ERROR_FIRST, 5: _ERROR_FIRST, 6: _ERROR_FIRST, 7: _ERROR_FIRST,  # inter-broker
    8: (_f(I32, 3), _array(_f(STR), _array(_f(I32), _f(ERR)))),  # OffsetCommit
    9: (  # OffsetFetch: per partition and top-level up to v7, per group from v8
        _f(I32, 3),
        _array(_f(STR), _array(_f(I32), _f(I64), _f(I32, 5), _f(STR), _f(ERR)), until=7),
        _f(ERR, 2, 7),
        _array(_f(STR), _array(_f(STR), _array(_f(I32), _f(I64), _f(I32), _f(STR), _f(ERR))),
               _f(ERR), since=8)),
    10: (  # FindCoordinator: one coordinator up to v3, a batch from v4
        _f(I32, 1), _f(ERR, 0, 3), _f(STR, 1, 3), _f(I32, 0, 3), _f(STR, 0, 3), _f(I32, 0, 3),
        _array(_f(STR), _f(I32), _f(STR), _f(I32), _f(ERR), _f(STR), since=4)),
    11: _throttle_then_error(2),  # JoinGroup
    12: _throttle_then_error(1), 13: _throttle_then_error(1), 14: _throttle_then_error(1),
    15: (  # DescribeGroups
        _f(I32, 1),
        _array(_f(ERR), _f(STR), _f(STR), _f(STR), _f(STR),
               _array(_f(STR), _f(STR, 4), _f(STR), _f(STR), _f(BYTES), _f(BYTES)), _f(I32, 3))),
    16: _throttle_then_error(1),  # ListGroups
    17: _ERROR_FIRST, 18: _ERROR_FIRST,  # SaslHandshake, ApiVersions
    19: (  # CreateTopics
        _f(I32, 2),
        _array(_f(STR), _f(UUID, 7), _f(ERR), _f(STR, 1), _f(I32, 5), _f(I16, 5),
               _array(_f(STR), _f(STR), _f(I8), _f(I8), _f(I8), since=5))),
    20: (_f(I32, 1), _array(_f(STR), _f(UUID, 6), _f(ERR), _f(STR, 5))),  # DeleteTopics
    21: (_f(I32), _array(_f(STR), _array(_f(I32), _f(I64), _f(ERR)))),  # DeleteRecords
    22: _TOP,  # InitProducerId
    23: (_f(I32, 2), _array(_f(STR), _array(_f(ERR), _f(I32), _f(I32, 1), _f(I64)))),
    24: (_f(I32), _f(ERR, 4), _array(_f(STR), _array(_f(I32), _f(ERR)), until=3)),
    25: _TOP, 26: _TOP,  # AddOffsetsToTxn, EndTxn
    27: (_array(_f(I64), _array(_f(STR), _array(_f(I32), _f(ERR)))),),  # WriteTxnMarkers
    28: (_f(I32), _array(_f(STR), _array(_f(I32), _f(ERR)))),  # TxnOffsetCommit
    29: _TOP,  # DescribeAcls
    30: (_f(I32), _array(_f(ERR), _f(STR))),  # CreateAcls
    31: (_f(I32), _first(_f(ERR))), 32: (_f(I32), _first(_f(ERR))),
    33: (_f(I32), _array(_f(ERR), _f(STR), _f(I8), _f(STR))),  # AlterConfigs
    34: (_f(I32), _array(_f(STR), _array(_f(I32), _f(ERR)))),  # AlterReplicaLogDirs
    35: (_f(I32), _f(ERR, 3), _first(_f(ERR), until=2)),  # DescribeLogDirs
    36: _ERROR_FIRST,  # SaslAuthenticate
    37: (_f(I32), _array(_f(STR), _f(ERR), _f(STR))),  # CreatePartitions
    38: _ERROR_FIRST, 39: _ERROR_FIRST, 40: _ERROR_FIRST, 41: _ERROR_FIRST,  # delegation tokens
    42: (_f(I32), _array(_f(STR), _f(ERR))),  # DeleteGroups
    43: (_f(I32), _f(ERR, 1), _array(_f(STR), _array(_f(I32), _f(ERR), _f(STR)))),
    44: (_f(I32), _array(_f(ERR), _f(STR), _f(I8), _f(STR))),  # IncrementalAlterConfigs
    45: _TOP, 46: _TOP,
    47: _ERROR_FIRST,  # OffsetDelete
    48: _TOP, 49: (_f(I32), _first(_f(ERR))),
    50: _TOP, 51: (_f(I32), _array(_f(STR), _f(ERR), _f(STR))),
    52: _ERROR_FIRST, 53: _ERROR_FIRST, 54: _ERROR_FIRST, 55: _ERROR_FIRST,  # KRaft quorum
    56: _TOP, 57: _TOP,
    58: (_f(BYTES), _f(ERR)),  # Envelope
    59: _TOP, 60: _TOP,
    61: (_f(I32), _first(_f(STR), _first(_f(I32), _f(ERR)))),  # DescribeProducers
    62: _TOP, 63: _TOP, 64: _TOP,
    65: (_f(I32), _first(_f(ERR))),  # DescribeTransactions
    66: _TOP, 67: _TOP, 68: _TOP,
    69: (_f(I32), _first(_f(ERR))),  # ConsumerGroupDescribe
    70: _TOP, 71: _TOP, 72: _TOP, 73: _TOP, 74: _TOP,
    75: (_f(I32), _first(_f(ERR))),  # DescribeTopicPartitions
    76: _TOP, 77: (_f(I32), _first(_f(ERR))),
    78: _TOP, 79: _TOP, 80: _TOP, 81: _TOP, 82: _TOP,
    # Share-group state (broker to share coordinator): per topic, per partition.
    83: (_first(_f(UUID), _first(_f(I32), _f(ERR))),),
    84: (_first(_f(UUID), _first(_f(I32), _f(ERR))),),
    85: (_first(_f(UUID), _first(_f(I32), _f(ERR))),),
    86: (_first(_f(UUID), _first(_f(I32), _f(ERR))),),
    87: (_first(_f(UUID), _first(_f(I32), _f(ERR))),),
}


class Truncated(Exception):
    """The captured bytes ended before what was asked for (or they are not Kafka's)."""


class _Found(Exception):
    """The walk is over: a non-zero error code, or a FIRST element was read (code 0)."""

    def __init__(self, code: int) -> None:
        self.code = code


class Cursor:
    """Reads Kafka's primitive types from captured bytes; raises ``Truncated`` when they end.
    ``flex``: compact lengths and tagged fields (KIP-482)."""

    __slots__ = ("buf", "pos", "flex", "version", "seen")

    def __init__(self, buf: bytes, pos: int, flex: bool, version: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.flex = flex
        self.version = version
        self.seen = False  # a response walk has read an error code

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > len(self.buf):
            raise Truncated

    def int_(self, n: int) -> int:
        start = self.pos
        self.skip(n)
        return int.from_bytes(self.buf[start : self.pos], "big", signed=True)

    def uvarint(self) -> int:
        value = shift = 0
        while shift < 35:
            if self.pos >= len(self.buf):
                raise Truncated
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise Truncated  # longer than any int32 varint: not Kafka's

    def length(self, wide: bool = False) -> int:
        """A string/array/bytes length, -1 for null: compact (varint of length + 1) in flexible
        versions, else int16 for strings and int32 (``wide``) for arrays and bytes."""
        if self.flex:
            return self.uvarint() - 1
        return self.int_(4 if wide else 2)

    def string(self, limit: int = 256) -> str | None:
        n = self.length()
        if n < 0:
            return None
        start = self.pos
        self.skip(n)
        return self.buf[start : start + min(n, limit)].decode("utf-8", "replace")

    def tagged_fields(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self.skip(self.uvarint())

    def fields(self, fields: tuple[Field, ...]) -> None:
        version = self.version
        for field in fields:
            if not field.since <= version <= field.until:
                continue
            kind = field.kind
            if kind == ERR:
                code = self.int_(2)
                self.seen = True
                if code:
                    raise _Found(code)
            elif kind in _FIXED:
                self.skip(_FIXED[kind])
            elif kind == STR:
                self.skip(max(0, self.length()))
            elif kind == BYTES:
                self.skip(max(0, self.length(wide=True)))
            elif kind in (INTS, LONGS):
                self.skip(max(0, self.length(wide=True)) * (4 if kind == INTS else 8))
            else:  # ARRAY, FIRST
                for _ in range(max(0, self.length(wide=True))):
                    before = self.pos
                    self.fields(field.items)
                    if self.flex:
                        self.tagged_fields()
                    if kind == FIRST or self.pos == before:  # (an element of no bytes: garbage)
                        raise _Found(0)


def walk_response(api_key: int, version: int, body: bytes, pos: int = 0) -> tuple[int | None, int]:
    """(error, end) for a response body ``body[pos:]`` (header already skipped): the first
    non-zero error code; 0 if every error code read was zero (or the layout was read to its end
    without meeting one: empty arrays); None if none could be read (no layout for this
    API/version, or the bytes end before the first); ``end`` is where the walk stopped."""
    layout = RESPONSES.get(api_key)
    api = APIS.get(api_key)
    if layout is None or api is None or version > api[1]:
        return None, pos
    cursor = Cursor(body, pos, version >= api[2], version)
    try:
        cursor.fields(layout)
        if cursor.flex:
            cursor.tagged_fields()
    except _Found as found:
        if found.code:
            return found.code, cursor.pos
    except Truncated:
        return (0 if cursor.seen else None), cursor.pos
    return 0, cursor.pos  # read to the end of its layout: no error reported


def response_error(api_key: int, version: int, body: bytes, pos: int = 0) -> int | None:
    return walk_response(api_key, version, body, pos)[0]
