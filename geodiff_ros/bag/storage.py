"""ROS 2 bags without rosbag2: read (mcap, sqlite3) and write them with the ``rosbags`` library.

Intact bags are read by ``rosbags.rosbag2.Reader`` (bag directory with ``metadata.yaml``, or a bare ``.mcap`` /
``.db3`` file). A bag that ``rosbags`` refuses (truncated by a crash or a full disk, recording never closed,
corrupt bytes) is read by a salvage reader instead, which returns every message stored before the damage and
says where it stopped (:attr:`Bag.damage`):

* MCAP: records are scanned front to back; a chunk cut off in the middle still gives its complete messages
  (uncompressed chunks, the rosbags and rosbag2 default).
* SQLite: a temporary copy whose header lets SQLite size the database from the file is read row by row; rows
  whose pages were lost are skipped and counted.

No rclpy here: the offline ``process`` command and the tests use this module without a ROS install.
Message types come from the Jazzy type store, extended with any definitions the bag carries for other types.
"""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
import struct
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from rosbags.interfaces import MessageDefinition, MessageDefinitionFormat, Qos
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

__all__ = [
    "Bag",
    "BagError",
    "BagWriter",
    "RawMessage",
    "TopicMeta",
    "camera_info_topic_for",
    "image_topic_is_compressed",
    "jazzy_typestore",
    "open_bag",
]

LOG = logging.getLogger(__name__)

_MCAP_MAGIC = b"\x89MCAP0\r\n"
_STORAGE_SUFFIX = {".mcap": "mcap", ".db3": "sqlite3"}
_PROBE_MISSES = 1000  # salvage of a SQLite bag whose row index is lost: stop after this many missing ids


class BagError(Exception):
    """A bag cannot be used as asked (missing, not a bag, unknown type, missing topic, output exists)."""


class RawMessage(NamedTuple):
    """One serialized message as stored in the bag."""

    topic: str
    msgtype: str
    timestamp: int  # ns, the bag's (receive) time
    data: bytes | memoryview


@dataclass
class TopicMeta:
    """What a bag says about one topic."""

    name: str
    msgtype: str
    count: int  # messages stored; -1 if the damaged file does not say
    qos: list[Qos] = field(default_factory=list)  # offered QoS recorded with the topic (may be empty)
    msgdef: MessageDefinition | None = None
    digest: str = ""  # RIHS01 type hash, when the bag stores it
    serialization_format: str = "cdr"


def jazzy_typestore() -> Any:
    """A fresh Jazzy type store (own copy: registering bag types never leaks between bags)."""
    return get_typestore(Stores.ROS2_JAZZY)


class _Damage(Exception):
    """Raised by a backend when reading cannot go on; the text says where and why."""


# ---------------------------------------------------------------------------------------------- backends


class _RosbagsBackend:
    """Intact bags through ``rosbags.rosbag2.Reader``."""

    def __init__(self, target: Path) -> None:
        self.reader = Reader(target)
        self.reader.open()
        self.storage = _storage_of_reader(target)

    def topics(self) -> list[TopicMeta]:
        out: dict[str, TopicMeta] = {}
        for conn in self.reader.connections:
            ext = conn.ext
            meta = out.get(conn.topic)
            if meta is None:
                out[conn.topic] = TopicMeta(
                    conn.topic, conn.msgtype, int(conn.msgcount), list(getattr(ext, "offered_qos_profiles", [])),
                    conn.msgdef if conn.msgdef.format != MessageDefinitionFormat.NONE else None,
                    conn.digest or "", getattr(ext, "serialization_format", "cdr"))
            elif meta.msgtype == conn.msgtype:
                meta.count += int(conn.msgcount)  # several recorded publishers of one topic
            else:
                LOG.warning("topic %s is stored with two types (%s, %s); using %s", conn.topic, meta.msgtype,
                            conn.msgtype, meta.msgtype)
        return list(out.values())

    def messages(self, topics: set[str]) -> Iterator[RawMessage]:
        conns = [c for c in self.reader.connections if c.topic in topics]
        if not conns:
            return
        types = {c.topic: c.msgtype for c in reversed(conns)}
        it = self.reader.messages(connections=conns)
        while True:
            try:
                conn, stamp, data = next(it)
            except StopIteration:
                return
            except Exception as err:
                raise _Damage(f"{type(err).__name__}: {err}") from err
            if conn.msgtype == types[conn.topic]:
                yield RawMessage(conn.topic, conn.msgtype, int(stamp), data)

    def close(self) -> None:
        self.reader.close()


def _storage_of_reader(target: Path) -> str:
    if target.is_dir():
        text = (target / "metadata.yaml").read_text(errors="replace")
        found = re.search(r"storage_identifier:\s*(\S+)", text)
        return found.group(1) if found else "unknown"
    return _STORAGE_SUFFIX.get(target.suffix, "unknown")


def _read_str(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<I", buf, pos)
    end = pos + 4 + n
    if end > len(buf):
        raise struct.error("string runs past its record")
    return bytes(buf[pos + 4:end]).decode(), end


class _McapSalvage:
    """Front-to-back scan of one MCAP file that stops cleanly at the first damaged record.

    Record layout (MCAP spec): opcode u8, length u64, content. Used here: Schema 0x03, Channel 0x04, Message 0x05,
    Chunk 0x06 (holding Schema/Channel/Message records, optionally compressed), DataEnd 0x0F, Footer 0x02.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        with path.open("rb") as f:
            if f.read(8) != _MCAP_MAGIC:
                msg = f"{path} is not an MCAP file (bad magic bytes); it may be another format or overwritten"
                raise BagError(msg)
        self.schemas: dict[int, tuple[str, str, str]] = {}
        self.channels: dict[int, TopicMeta] = {}
        self.counts: dict[int, int] = {}
        self.problem: str | None = None
        for item in self._scan(keep_data=False):  # index pass: topics and counts, and where the file breaks
            if item[0] == "msg":
                self.counts[item[1]] = self.counts.get(item[1], 0) + 1
        for cid, meta in self.channels.items():
            meta.count = self.counts.get(cid, 0)
        self.storage = "mcap"

    def topics(self) -> list[TopicMeta]:
        by_topic: dict[str, TopicMeta] = {}
        for meta in self.channels.values():
            if meta.name in by_topic:
                by_topic[meta.name].count += meta.count
            else:
                by_topic[meta.name] = TopicMeta(meta.name, meta.msgtype, meta.count, meta.qos, meta.msgdef)
        return list(by_topic.values())

    def messages(self, topics: set[str]) -> Iterator[RawMessage]:
        for item in self._scan(keep_data=True):
            if item[0] == "msg":
                _, cid, stamp, data = item
                meta = self.channels.get(cid)
                if meta is not None and meta.name in topics:
                    yield RawMessage(meta.name, meta.msgtype, stamp, data)
        if self.problem:
            raise _Damage(self.problem)

    def close(self) -> None:
        pass

    # -- scanning

    def _record(self, op: int, content: memoryview, keep_data: bool) -> tuple | None:
        if op == 0x03:
            (sid,) = struct.unpack_from("<H", content, 0)
            name, pos = _read_str(content, 2)
            encoding, pos = _read_str(content, pos)
            (n,) = struct.unpack_from("<I", content, pos)
            self.schemas[sid] = (name, encoding, bytes(content[pos + 4:pos + 4 + n]).decode(errors="replace"))
        elif op == 0x04:
            cid, sid = struct.unpack_from("<HH", content, 0)
            topic, pos = _read_str(content, 4)
            _encoding, pos = _read_str(content, pos)
            (map_len,) = struct.unpack_from("<I", content, pos)
            pos += 4
            end = pos + map_len
            qos: list[Qos] = []
            while pos < end:
                key, pos = _read_str(content, pos)
                value, pos = _read_str(content, pos)
                if key == "offered_qos_profiles":
                    qos = _parse_qos(value)
            name, enc, text = self.schemas.get(sid, ("", "", ""))
            fmt = {"ros2msg": MessageDefinitionFormat.MSG, "ros2idl": MessageDefinitionFormat.IDL,
                   "omgidl": MessageDefinitionFormat.IDL}.get(enc)
            msgdef = MessageDefinition(fmt, text) if fmt is not None and text else None
            if cid not in self.channels:
                self.channels[cid] = TopicMeta(topic, name or "unknown/msg/Unknown", 0, qos, msgdef)
        elif op == 0x05:
            cid, _seq, log_time, _pub = struct.unpack_from("<HIQQ", content, 0)
            return ("msg", cid, log_time, bytes(content[22:]) if keep_data else None)
        return None

    def _inner(self, data: memoryview, keep_data: bool, chunk_at: int, cut: bool) -> Iterator[tuple]:
        """Records inside a chunk; in a ``cut`` chunk (truncated file) it ends quietly at the first partial one."""
        pos = 0
        while pos + 9 <= len(data):
            op, length = struct.unpack_from("<BQ", data, pos)
            if pos + 9 + length > len(data):
                if cut:
                    return
                msg = f"record 0x{op:02x} at chunk offset {pos} runs past the end of its chunk"
                raise _Damage(msg)
            item = self._record(op, data[pos + 9:pos + 9 + length], keep_data)
            if item is not None:
                yield item
            pos += 9 + length
        if pos != len(data) and not cut:
            msg = f"{len(data) - pos} stray bytes at the end of the chunk at byte {chunk_at}"
            raise _Damage(msg)

    def _scan(self, keep_data: bool) -> Iterator[tuple]:
        """Yield ('msg', channel_id, log_time, data) in file order; set ``self.problem`` where reading stopped."""
        self.problem = None
        n_msgs = 0
        with self.path.open("rb") as f:
            pos = 8
            f.seek(pos)
            while True:
                head = f.read(9)
                if not head:
                    self.problem = (f"file ends at byte {pos} without the MCAP footer (recording not closed); "
                                    f"{n_msgs} messages before it are intact")
                    return
                where = f"byte {pos} of {self.size} ({self.path.name})"
                if len(head) < 9:
                    self.problem = f"stopped at {where}: file cut inside a record header after {n_msgs} messages"
                    return
                op, length = struct.unpack("<BQ", head)
                if op == 0x00 or 0x10 <= op < 0x80:
                    self.problem = (f"stopped at {where}: corrupt record (opcode 0x{op:02x}) after {n_msgs} "
                                    "messages; the bytes after it cannot be trusted")
                    return
                if op in (0x02, 0x0F):  # Footer / DataEnd: the data section is complete
                    return
                avail = self.size - pos - 9
                if op != 0x06:
                    if length > avail:
                        self.problem = (f"stopped at {where}: record 0x{op:02x} needs {length} B but the file has "
                                        f"{avail} B left (truncated) after {n_msgs} messages")
                        return
                    if op in (0x03, 0x04, 0x05):
                        try:
                            item = self._record(op, memoryview(f.read(length)), keep_data)
                        except (struct.error, UnicodeDecodeError) as err:
                            self.problem = f"stopped at {where}: corrupt record 0x{op:02x} ({err})"
                            return
                        if item is not None:
                            n_msgs += 1
                            yield item
                    else:
                        f.seek(length, 1)
                    pos += 9 + length
                    continue
                # Chunk: start u64, end u64, uncompressed size u64, crc u32, compression str, records (u64 + bytes)
                body = memoryview(f.read(min(length, avail)))
                try:
                    _start, _end, usize, crc = struct.unpack_from("<QQQI", body, 0)
                    compression, cpos = _read_str(body, 28)
                    (rec_len,) = struct.unpack_from("<Q", body, cpos)
                except (struct.error, UnicodeDecodeError):
                    self.problem = f"stopped at {where}: chunk header cut off or corrupt after {n_msgs} messages"
                    return
                records = body[cpos + 8:cpos + 8 + rec_len]
                complete = length <= avail and len(records) == rec_len
                if complete:
                    try:
                        raw = _decompress(bytes(records), compression, usize)
                    except Exception as err:  # noqa: BLE001 - zstd / lz4 raise their own types
                        self.problem = f"stopped at {where}: chunk does not decompress ({err})"
                        return
                    if crc and zlib.crc32(raw) != crc:
                        self.problem = f"stopped at {where}: chunk checksum mismatch (corrupt data)"
                        return
                    data = memoryview(raw)
                elif compression == "":
                    data = records  # cut chunk, uncompressed: its complete records are still usable
                else:
                    self.problem = (f"stopped at {where}: {compression} chunk cut off (truncated file) after "
                                    f"{n_msgs} messages; a compressed chunk cannot be read in part")
                    return
                try:
                    for item in self._inner(data, keep_data, pos, cut=not complete):
                        n_msgs += 1
                        yield item
                except (_Damage, struct.error, UnicodeDecodeError) as err:
                    self.problem = f"stopped at {where}: {err}; {n_msgs} messages read before it"
                    return
                if not complete:
                    self.problem = (f"stopped at {where}: file truncated inside a chunk ({len(body)} of {length} B "
                                    f"present); {n_msgs} messages read, the rest of the bag is missing")
                    return
                pos += 9 + length
                f.seek(pos)


def _decompress(data: bytes, compression: str, size: int) -> bytes:
    if compression == "":
        return data
    if compression == "zstd":
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
        except ImportError:
            from backports import zstd  # rosbags dependency
        return zstd.decompress(data)
    if compression == "lz4":
        import lz4.frame

        return lz4.frame.decompress(data)
    msg = f"unsupported chunk compression {compression!r}"
    raise ValueError(msg)


def _parse_qos(text: str) -> list[Qos]:
    try:
        from rosbags.rosbag2.metadata import parse_qos

        return parse_qos(text)
    except Exception:  # noqa: BLE001 - QoS metadata is informative only
        return []


class _SqliteSalvage:
    """Row-by-row read of a damaged rosbag2 SQLite file (through a temporary, header-patched copy)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.storage = "sqlite3"
        with path.open("rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                msg = f"{path} is not an SQLite database (bad header); it may be another format or overwritten"
                raise BagError(msg)
        self._tmpdir = tempfile.mkdtemp(prefix="geodiff_bag_salvage_")
        copy = Path(self._tmpdir) / path.name
        shutil.copyfile(path, copy)
        with copy.open("r+b") as f:
            # Offset 92 "version-valid-for": when it differs from the change counter, SQLite takes the database
            # size from the file length instead of the header, so the pages still present can be read.
            f.seek(92)
            f.write(b"\xff\xff\xff\xff")
        self.con = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        self.problem: str | None = None
        try:
            cols = {row[1] for row in self.con.execute("PRAGMA table_info(topics)")}
            qos_col = "offered_qos_profiles" if "offered_qos_profiles" in cols else "''"
            self._topics = {
                int(tid): TopicMeta(str(name), str(typ), -1, _parse_qos(qos or ""), None, "", fmt or "cdr")
                for tid, name, typ, fmt, qos in self.con.execute(
                    f"SELECT id, name, type, serialization_format, {qos_col} FROM topics")}
        except sqlite3.DatabaseError as err:
            self.close()
            msg = f"{path}: the topic table is unreadable ({err}); nothing can be salvaged"
            raise BagError(msg) from err
        try:  # any order: SQLite may answer from the timestamp index when table pages are lost
            self._ids: list[int] | None = sorted(int(r[0]) for r in self.con.execute("SELECT id FROM messages"))
        except sqlite3.DatabaseError:
            self._ids = None  # probe ids one by one (rosbag2 numbers rows 1, 2, ... and never deletes)
        try:
            for tid, n in self.con.execute("SELECT topic_id, count(*) FROM messages GROUP BY topic_id"):
                if int(tid) in self._topics:
                    self._topics[int(tid)].count = int(n)
        except sqlite3.DatabaseError:
            pass  # counts stay unknown (-1)

    def topics(self) -> list[TopicMeta]:
        return list(self._topics.values())

    def messages(self, topics: set[str]) -> Iterator[RawMessage]:
        wanted = {tid for tid, meta in self._topics.items() if meta.name in topics}
        bad: list[int] = []
        last_good = None
        for mid in self._row_ids():
            try:
                row = self.con.execute("SELECT topic_id, timestamp, data FROM messages WHERE id = ?",
                                       (mid,)).fetchone()
            except sqlite3.DatabaseError:
                bad.append(mid)
                continue
            if row is None:
                continue
            last_good = mid
            if int(row[0]) in wanted:
                meta = self._topics[int(row[0])]
                yield RawMessage(meta.name, meta.msgtype, int(row[1]), row[2])
        if self._ids is None:
            self.problem = (f"the message table of {self.path.name} is damaged; rows read up to id {last_good}, "
                            f"then {_PROBE_MISSES} ids in a row were unreadable or missing (truncated or corrupt file)")
            raise _Damage(self.problem)
        if bad:
            self.problem = (f"{len(bad)} of {len(self._ids)} message rows are unreadable (first bad row id {bad[0]}, "
                            f"last good row id {last_good}) in {self.path.name}: the file is truncated or corrupt")
            raise _Damage(self.problem)

    def _row_ids(self) -> Iterator[int]:
        if self._ids is not None:
            yield from self._ids
            return
        mid, misses = 1, 0
        while misses < _PROBE_MISSES:
            try:
                found = self.con.execute("SELECT 1 FROM messages WHERE id = ?", (mid,)).fetchone() is not None
            except sqlite3.DatabaseError:
                found = False
            misses = 0 if found else misses + 1
            if found:
                yield mid
            mid += 1

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- public API


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _storage_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix in _STORAGE_SUFFIX and p.is_file()]
    return sorted(files, key=_natural_key)


class Bag:
    """An open bag: its topics, its messages in bag order, and where reading stopped if the file is damaged.

    Use :func:`open_bag`. ``damage`` is None until a read stops early; then it says where and why. ``salvaged``
    holds the reason the salvage reader is used (None for an intact bag).
    """

    def __init__(self, path: Path, backends: list[Any], salvaged: str | None) -> None:
        self.path = path
        self._backends = backends
        self.salvaged = salvaged
        self.damage: str | None = None
        self.storage = backends[0].storage
        self.topics: dict[str, TopicMeta] = {}
        for backend in backends:
            for meta in backend.topics():
                if meta.name in self.topics:
                    if self.topics[meta.name].count >= 0 and meta.count >= 0:
                        self.topics[meta.name].count += meta.count
                else:
                    self.topics[meta.name] = meta
        self._typestore: Any = None
        self._type_problems: dict[str, str] = {}

    # -- context manager
    def __enter__(self) -> Bag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the files (and a salvage copy)."""
        for backend in self._backends:
            backend.close()
        self._backends = []

    def select(self, names: Iterable[str] | None) -> list[str]:
        """Validate requested topic names (None = all); BagError names the missing ones and what the bag has."""
        if names is None:
            return list(self.topics)
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in self.topics]
        if missing:
            have = ", ".join(f"{t.name} ({t.msgtype})" for t in self.topics.values()) or "no topics"
            msg = (f'topic(s) {", ".join(missing)} not in bag {self.path}; it has: {have}. '
                   'Pick from these (geodiff_bag info BAG lists them)')
            raise BagError(msg)
        return names

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[RawMessage]:
        """Serialized messages of ``topics`` (None = all) in bag order.

        On damage the iteration ends early instead of raising: ``self.damage`` then says where it stopped, and
        everything before that point has been yielded.
        """
        wanted = set(self.select(topics))
        self.damage = None
        n = 0
        last = None
        for backend in self._backends:
            try:
                for msg in backend.messages(wanted):
                    n += 1
                    last = msg.timestamp
                    yield msg
            except _Damage as err:
                at = f"bag time {last * 1e-9:.6f} s" if last is not None else "the start"
                self.damage = f"{err} [read {n} selected messages, up to {at}]"
                LOG.warning("%s: reading stopped early: %s", self.path, self.damage)
                return

    @property
    def typestore(self) -> Any:
        """Jazzy type store plus the bag's own definitions of types Jazzy does not have."""
        if self._typestore is None:
            store = jazzy_typestore()
            for meta in self.topics.values():
                if meta.msgtype in store.types:
                    continue
                if meta.msgdef is None or meta.msgdef.format != MessageDefinitionFormat.MSG:
                    self._type_problems[meta.msgtype] = "not a Jazzy type and the bag stores no .msg definition"
                    continue
                try:
                    store.register(get_types_from_msg(meta.msgdef.data, meta.msgtype))
                except Exception as err:  # noqa: BLE001 - rosbags parser errors
                    self._type_problems[meta.msgtype] = f"its definition in the bag does not parse ({err})"
            self._typestore = store
        return self._typestore

    def type_problem(self, msgtype: str) -> str | None:
        """Why messages of ``msgtype`` cannot be (de)serialized here, or None if they can."""
        store = self.typestore
        if msgtype in store.types:
            return None
        return self._type_problems.get(msgtype, "unknown message type")

    def deserialize(self, msg: RawMessage) -> Any:
        """Deserialize a stored message with the type store (rosbags dataclass; ``data`` fields are numpy)."""
        problem = self.type_problem(msg.msgtype)
        if problem:
            raise BagError(f"cannot decode {msg.topic}: type {msg.msgtype}: {problem}")
        return self.typestore.deserialize_cdr(msg.data, msg.msgtype)


def open_bag(path: str | Path) -> Bag:
    """Open a bag directory (``metadata.yaml`` + storage files) or a single ``.mcap`` / ``.db3`` file.

    Raises:
        BagError: the path does not exist, is not a bag, or is too damaged to give anything back.
    """
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"bag {p} does not exist; pass a bag directory (with metadata.yaml) or its .mcap / .db3 file"
        raise BagError(msg)
    if p.is_dir():
        files = _storage_files(p)
        if (p / "metadata.yaml").is_file():
            targets = [p]
        elif files:
            LOG.warning("%s has no metadata.yaml (recording not closed?); reading its storage files directly", p)
            targets = files
        else:
            msg = f"{p} is not a ROS 2 bag: no metadata.yaml and no .mcap or .db3 file in it"
            raise BagError(msg)
    else:
        if p.suffix not in _STORAGE_SUFFIX:
            msg = f"{p} is not a bag file: expected a bag directory or a .mcap / .db3 file"
            raise BagError(msg)
        files = [p]
        targets = [p]
    try:
        return Bag(p, [_RosbagsBackend(t) for t in targets], None)
    except Exception as err:  # noqa: BLE001 - rosbags raises many types for damaged files
        reason = f"{type(err).__name__}: {err}"
    if not files:
        msg = f"cannot read bag {p} ({reason}) and it holds no .mcap or .db3 file to salvage"
        raise BagError(msg)
    LOG.warning("%s: %s; the bag is damaged or was not closed, salvaging what is readable", p, reason)
    backends: list[Any] = []
    try:
        for f in files:
            backends.append(_McapSalvage(f) if f.suffix == ".mcap" else _SqliteSalvage(f))
    except BagError as err:
        for b in backends:
            b.close()
        msg = f"cannot read bag {p}: {reason}; salvage failed too: {err}"
        raise BagError(msg) from None
    return Bag(p, backends, reason)


# ---------------------------------------------------------------------------------------------- writing


class BagWriter:
    """A new rosbag2 bag (version 9, mcap by default) written with the Jazzy type store.

    Topics are registered once with their type, definition, RIHS01 hash and offered QoS, as rosbag2 does, so
    ``ros2 bag info/play`` and rosbags read the result. Never overwrites: rosbags refuses existing paths.
    """

    def __init__(self, path: str | Path, storage: str = "mcap", typestore: Any = None) -> None:
        self.path = Path(path).expanduser()
        if self.path.exists():
            msg = f"output bag {self.path} exists; choose a new path or delete it first (bags are never overwritten)"
            raise BagError(msg)
        plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
        if storage not in plugins:
            msg = f"storage {storage!r} unknown; use mcap or sqlite3"
            raise BagError(msg)
        self.storage = storage
        self.typestore = typestore if typestore is not None else jazzy_typestore()
        self._writer = Writer(self.path, version=9, storage_plugin=plugins[storage])
        self._writer.open()
        self._conns: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.types: dict[str, str] = {}

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_topic(self, name: str) -> bool:
        return name in self._conns

    def add_topic(self, name: str, msgtype: str, qos: Sequence[Qos] = (), msgdef: MessageDefinition | None = None,
                  digest: str = "") -> None:
        """Register ``name`` with ``msgtype``; types outside the store need the bag's ``msgdef`` and ``digest``."""
        if name in self._conns:
            return
        if msgtype in self.typestore.types:
            conn = self._writer.add_connection(name, msgtype, typestore=self.typestore, offered_qos_profiles=qos)
        elif msgdef is not None and msgdef.data and digest:
            conn = self._writer.add_connection(name, msgtype, msgdef=msgdef.data, rihs01=digest,
                                               offered_qos_profiles=qos)
        else:
            msg = (f"cannot write {name}: type {msgtype} is not a Jazzy type and no definition is known; "
                   "leave the topic out")
            raise BagError(msg)
        self._conns[name] = conn
        self.counts[name] = 0
        self.types[name] = msgtype

    def write(self, topic: str, timestamp: int, data: bytes | memoryview) -> None:
        """Store serialized bytes on a registered topic at ``timestamp`` (ns)."""
        self._writer.write(self._conns[topic], int(timestamp), data)
        self.counts[topic] += 1

    def write_msg(self, topic: str, timestamp: int, msg: Any) -> None:
        """Serialize a rosbags message (its ``__msgtype__``) and store it, registering the topic on first use."""
        msgtype = msg.__msgtype__
        if topic not in self._conns:
            self.add_topic(topic, msgtype)
        self.write(topic, timestamp, self.typestore.serialize_cdr(msg, msgtype))

    def close(self) -> None:
        """Finish the file and write metadata.yaml (safe to call twice)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
_IMAGE = "sensor_msgs/msg/Image"
_COMPRESSED = "sensor_msgs/msg/CompressedImage"


def image_topic_is_compressed(bag: Bag, topic: str) -> bool:
    """Whether the colour topic ``topic`` holds CompressedImage (else Image).

    Raises:
        BagError: the topic is missing or is neither.
    """
    bag.select([topic])
    msgtype = bag.topics[topic].msgtype
    if msgtype not in (_IMAGE, _COMPRESSED):
        msg = f"--image-topic {topic} has type {msgtype}; it must be {_IMAGE} or {_COMPRESSED} (a colour camera stream)"
        raise BagError(msg)
    return msgtype == _COMPRESSED


def camera_info_topic_for(bag: Bag, image_topic: str, given: str | None) -> str:
    """The CameraInfo topic of ``image_topic``: ``given`` when set ('' = none), else the sibling
    ``<image namespace>/camera_info`` if the bag has it (image_transport's camera convention), else ''.

    Raises:
        BagError: the topic is missing or is not a CameraInfo.
    """
    topic = given
    if topic is None:
        sibling = image_topic.rsplit("/", 1)[0] + "/camera_info"
        topic = sibling if sibling in bag.topics else ""
    if topic:
        bag.select([topic])
        if bag.topics[topic].msgtype != _CAMERA_INFO:
            msg = f"camera_info topic {topic} has type {bag.topics[topic].msgtype}, expected {_CAMERA_INFO}"
            raise BagError(msg)
    return topic
