"""DNS wire format, as much of it as pairing queries with answers needs: the header, the
question's name (compression pointers followed safely), and whether some bytes are a DNS
message at all (whole, in a UDP datagram, or behind a TCP 2-byte length). RFC 1035 §4.

Nothing here raises on input or loops on it: pointers must jump backwards, each before the
previous jump, and names stop at 255 bytes as on the wire.
"""

from __future__ import annotations

import struct

MIN_MESSAGE = 17  # header + root name + type + class

QTYPE_NAMES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 11: "WKS", 12: "PTR", 13: "HINFO",
    15: "MX", 16: "TXT", 17: "RP", 18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC",
    33: "SRV", 35: "NAPTR", 36: "KX", 37: "CERT", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS",
    44: "SSHFP", 45: "IPSECKEY", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID",
    50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA", 53: "SMIMEA", 55: "HIP", 59: "CDS",
    60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD", 64: "SVCB", 65: "HTTPS",
    99: "SPF", 108: "EUI48", 109: "EUI64", 249: "TKEY", 250: "TSIG", 251: "IXFR", 252: "AXFR",
    255: "ANY", 256: "URI", 257: "CAA",
}  # fmt: skip
RCODE_NAMES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 11: "DSOTYPENI",
}  # fmt: skip
_CLASSES = frozenset({1, 3, 4, 254, 255})  # IN, CH, HS, NONE, ANY

HEADER = struct.Struct("!6H")  # id, flags, QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT
U16 = struct.Struct("!H")
_PLAIN = bytes(b for b in range(0x21, 0x7F) if b not in b".\\")  # kept as is in names


def read_name(msg: bytes, pos: int) -> tuple[str | None, int]:
    """(name, index just past it) of the name at ``pos``; (None, -1) if malformed or cut.

    Compression pointers are followed only backwards, each to before the previous jump, so a
    pointer loop cannot run forever; the name is at most 255 bytes as on the wire.
    """
    end = len(msg)
    labels: list[str] = []
    after = -1
    limit = pos  # a pointer must land before the name, then before each earlier jump
    wire = 1
    while True:
        if pos >= end:
            return None, -1
        n = msg[pos]
        if n >= 0xC0:
            if pos + 1 >= end:
                return None, -1
            target = ((n & 0x3F) << 8) | msg[pos + 1]
            if after < 0:
                after = pos + 2
            if not 12 <= target < limit:
                return None, -1
            pos = limit = target
            continue
        if n >= 0x40:  # extended and binary labels: obsolete, never valid in a question
            return None, -1
        if n == 0:
            break
        wire += n + 1
        if wire > 255 or pos + 1 + n > end:
            return None, -1
        label = msg[pos + 1 : pos + 1 + n].lower()
        if label.translate(None, _PLAIN):  # dots, backslashes, non-printable bytes: escaped
            labels.append("".join(_escape(b) for b in label))
        else:
            labels.append(label.decode("ascii"))
        pos += 1 + n
    return (".".join(labels) or "."), (after if after >= 0 else pos + 1)


def _escape(byte: int) -> str:
    """A name's byte as dig prints it: "\\." inside a label, "\\000" for non-printables."""
    if byte in _PLAIN:
        return chr(byte)
    return f"\\{chr(byte)}" if byte in b".\\" else f"\\{byte:03d}"


def skip_name(msg: bytes, pos: int) -> int:
    """Index just past the name at ``pos`` without following pointers; -1 if malformed."""
    end = len(msg)
    start = pos
    while pos < end:
        n = msg[pos]
        if n >= 0xC0:
            if pos + 1 >= end or not 12 <= (((n & 0x3F) << 8) | msg[pos + 1]) < start:
                return -1
            return pos + 2
        if n >= 0x40:
            return -1
        if n == 0:
            return pos + 1
        pos += 1 + n
        if pos - start > 255:
            return -1
    return -1


def header_ok(buf: bytes | bytearray, pos: int) -> bool:
    """A header a real peer would send: opcode QUERY, Z clear, at most one question."""
    flags = (buf[pos + 2] << 8) | buf[pos + 3]
    return flags & 0x7840 == 0 and buf[pos + 4] == 0 and buf[pos + 5] <= 1


def plausible(msg: bytes, whole: bool) -> bool:
    """A message with one question whose counts fit: every record parses to exactly its end
    when ``whole``; only the question when the message is cut short."""
    if len(msg) < MIN_MESSAGE or not header_ok(msg, 0):
        return False
    _id, flags, qd, an, ns, ar = HEADER.unpack_from(msg)
    if qd != 1:
        return False
    if not flags & 0x8000 and (flags & 0x000F or an or ns > 1 or ar > 2):
        return False  # a query carries no answers; at most an OPT and a TSIG record
    pos = skip_name(msg, 12)
    if pos < 0 or pos + 4 > len(msg) or U16.unpack_from(msg, pos + 2)[0] not in _CLASSES:
        return False
    pos += 4
    if not whole:
        return True
    end = len(msg)
    records = an + ns + ar
    if records * 11 > end - pos:
        return False
    for _ in range(records):
        pos = skip_name(msg, pos)
        if pos < 0 or pos + 10 > end:
            return False
        pos += 10 + U16.unpack_from(msg, pos + 8)[0]
    return pos == end


def frame(buf: bytes) -> bool:
    """Whether ``buf`` starts with a length-prefixed message (TCP): whole, with every record
    parsed, or at least its question when the message goes on beyond ``buf``."""
    if len(buf) < 2 + MIN_MESSAGE:
        return False
    length = U16.unpack_from(buf)[0]
    if length < MIN_MESSAGE:
        return False
    msg = buf[2 : 2 + length]
    return plausible(msg, whole=len(msg) == length)


def frame_start(buf: bytes, size: int) -> bool:
    """Whether ``buf`` may be the first bytes of a length-prefixed message, too few to show
    its question: a length (beyond ``buf`` if the event is whole) and the header so far."""
    if not 2 <= len(buf) < 2 + 12 + 255 + 4:
        return False
    length = U16.unpack_from(buf)[0]
    if length < MIN_MESSAGE or (size == len(buf) and length + 2 <= len(buf)):
        return False
    return len(buf) < 14 or header_ok(buf, 2)


def qtype_name(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode) or f"RCODE{rcode}"
