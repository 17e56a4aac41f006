"""Reading and writing bags with geodiff_ros.bag.storage: both storage formats, damaged files, clear errors.

No DDS here. Damaged bags are made the way they happen: a copy of a finished bag cut short (crash, full disk),
a recording whose metadata.yaml was never written, bytes overwritten in the middle.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.typesys import get_types_from_msg

from geodiff_ros.bag.cli import main as bag_main
from geodiff_ros.bag.storage import BagError, BagWriter, jazzy_typestore, open_bag
from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag
from geodiff_ros.ros.conversions import depth_to_metres, image_to_rgb8

CUSTOM = "geodiff_test_msgs/msg/Blob"
CUSTOM_DEF = "uint32 a\nstring b\n"
BEST_EFFORT = Qos(QosHistory.KEEP_LAST, 5, QosReliability.BEST_EFFORT, QosDurability.VOLATILE, QosTime(0, 0),
                  QosTime(0, 0), QosLiveliness.AUTOMATIC, QosTime(0, 0), False)


def _all(bag_path: Path) -> list[tuple[str, int, bytes]]:
    with open_bag(bag_path) as bag:
        out = [(m.topic, m.timestamp, bytes(m.data)) for m in bag.messages()]
        assert bag.damage is None
    return out


def _storage_file(bag_dir: Path) -> Path:
    return next(p for p in bag_dir.iterdir() if p.suffix in (".mcap", ".db3"))


def _cut_copy(src: Path, dst: Path, fraction: float) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    f = _storage_file(dst)
    with f.open("r+b") as fh:
        fh.truncate(int(f.stat().st_size * fraction))
    return dst


@pytest.fixture(scope="module")
def long_bags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic 25-frame bags (~2.5 MB, several MCAP chunks) in both storage formats."""
    root = tmp_path_factory.mktemp("bags")
    return {s: write_synthetic_bag(root / s, frames=25, storage=s) for s in ("mcap", "sqlite3")}


# ------------------------------------------------------------------------------------------------ intact bags


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_shared_tum_bag_reads_and_decodes(shared_data: Path, storage: str) -> None:
    with open_bag(shared_data / "bags" / f"tum_fr2_desk_rgbd_{storage}") as bag:
        assert bag.storage == storage and bag.salvaged is None
        assert {t: m.count for t, m in bag.topics.items()} == {
            IMAGE_TOPIC: 2, INFO_TOPIC: 2, DEPTH_TOPIC: 2, "/camera/aligned_depth_to_color/camera_info": 2}
        images = [bag.deserialize(m) for m in bag.messages([IMAGE_TOPIC, DEPTH_TOPIC])]
    rgb = image_to_rgb8(images[0])  # the node's duck-typed conversion works on rosbags messages
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8 and rgb.std() > 10
    depth = depth_to_metres(next(m for m in images if m.encoding == "16UC1"))
    valid = np.isfinite(depth)
    assert 0.5 < valid.mean() < 0.9 and 0.5 < np.median(depth[valid]) < 3.0  # a desk scene in metres


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_write_read_roundtrip_keeps_bytes_qos_and_custom_types(tmp_path: Path, storage: str) -> None:
    store = jazzy_typestore()
    store.register(get_types_from_msg(CUSTOM_DEF, CUSTOM))
    blob_t = store.types[CUSTOM]
    src = write_synthetic_bag(tmp_path / "src", frames=2, storage=storage)
    out = tmp_path / "out"
    with open_bag(src) as bag, BagWriter(out, storage=storage, typestore=store) as writer:
        for meta in bag.topics.values():
            writer.add_topic(meta.name, meta.msgtype, qos=[BEST_EFFORT])
        for m in bag.messages():
            writer.write(m.topic, m.timestamp, m.data)
        writer.write_msg("/blob", 5, blob_t(a=7, b="seven"))
    with open_bag(out) as bag:
        assert bag.storage == storage
        assert bag.topics[IMAGE_TOPIC].qos[0].reliability == QosReliability.BEST_EFFORT
        assert bag.topics["/blob"].msgtype == CUSTOM
        assert bag.type_problem(CUSTOM) is None  # its definition travelled in the bag
        blob = bag.deserialize(next(iter(bag.messages(["/blob"]))))
        assert (blob.a, blob.b) == (7, "seven")
    assert [x for x in _all(out) if x[0] != "/blob"] == _all(src)


def test_storage_file_without_metadata_is_read_directly(long_bags: dict[str, Path], tmp_path: Path) -> None:
    for storage, src in long_bags.items():
        dst = tmp_path / storage
        shutil.copytree(src, dst)
        (dst / "metadata.yaml").unlink()  # a recording that was killed before it wrote its metadata
        assert _all(dst) == _all(src)
        assert _all(_storage_file(src)) == _all(src)  # a bare .mcap / .db3 file works as well


# ------------------------------------------------------------------------------------------------ errors


def test_missing_topic_names_what_the_bag_has(long_bags: dict[str, Path]) -> None:
    with open_bag(long_bags["mcap"]) as bag, pytest.raises(BagError, match=r"/nope.*not in bag.*" + IMAGE_TOPIC):
        list(bag.messages(["/nope"]))


def test_not_a_bag_errors(tmp_path: Path) -> None:
    with pytest.raises(BagError, match="does not exist"):
        open_bag(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagError, match="not a ROS 2 bag"):
        open_bag(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BagError, match=r"not a bag file"):
        open_bag(tmp_path / "notes.txt")
    (tmp_path / "fake.mcap").write_bytes(b"this is not an mcap file" * 10)
    with pytest.raises(BagError, match="not an MCAP file"):
        open_bag(tmp_path / "fake.mcap")


def test_unknown_type_without_definition_is_reported(tmp_path: Path) -> None:
    store = jazzy_typestore()
    store.register(get_types_from_msg(CUSTOM_DEF, CUSTOM))
    with BagWriter(tmp_path / "b", storage="sqlite3", typestore=store) as writer:
        writer.write_msg("/blob", 1, store.types[CUSTOM](a=1, b="x"))
    # sqlite3 bags of rosbag2 before Jazzy carry no definitions: simulate by dropping them from the database
    import sqlite3

    db = _storage_file(tmp_path / "b")
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM message_definitions")
    with open_bag(tmp_path / "b") as bag:
        problem = bag.type_problem(CUSTOM)
        assert problem is not None and "no .msg definition" in problem
        with pytest.raises(BagError, match=f"cannot decode /blob: type {CUSTOM}"):
            bag.deserialize(next(iter(bag.messages())))


def test_writer_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(BagError, match="exists; choose a new path"):
        BagWriter(tmp_path / "out")


# ------------------------------------------------------------------------------------------------ damaged bags


@pytest.mark.parametrize("fraction", [0.35, 0.7, 0.97])
def test_truncated_mcap_gives_the_intact_prefix_and_says_where(long_bags: dict[str, Path], tmp_path: Path,
                                                               fraction: float) -> None:
    full = _all(long_bags["mcap"])
    cut = _cut_copy(long_bags["mcap"], tmp_path / "cut", fraction)
    with open_bag(cut) as bag:
        assert bag.salvaged and "magic" in bag.salvaged  # rosbags refuses the file; the salvage reader takes over
        got = [(m.topic, m.timestamp, bytes(m.data)) for m in bag.messages()]
        damage = bag.damage
    assert damage is not None and "stopped at byte" in damage and "truncated" in damage
    assert got == full[:len(got)]  # nothing invented, nothing reordered
    # the complete records of a cut chunk are kept too, so we lose less than one chunk (~1 MB of ~2.5 MB)
    assert len(got) >= int((fraction - 0.45) * len(full))


def test_truncated_shared_mcap_bag(shared_data: Path, tmp_path: Path) -> None:
    cut = tmp_path / "tum"
    shutil.copytree(shared_data / "bags" / "tum_fr2_desk_rgbd_mcap", cut)
    f = _storage_file(cut)
    f.chmod(0o644)
    with f.open("r+b") as fh:
        fh.truncate(2_000_000)  # inside the second frame's chunk
    with open_bag(cut) as bag:
        got = list(bag.messages())
        assert [m.topic for m in got] == [IMAGE_TOPIC, INFO_TOPIC, DEPTH_TOPIC,
                                          "/camera/aligned_depth_to_color/camera_info"]
        assert "stopped at byte 1538225 of 2000000" in bag.damage


def test_truncated_sqlite3_gives_the_readable_rows(long_bags: dict[str, Path], tmp_path: Path) -> None:
    full = _all(long_bags["sqlite3"])
    cut = _cut_copy(long_bags["sqlite3"], tmp_path / "cut", 0.6)
    with open_bag(cut) as bag:
        assert bag.salvaged and "malformed" in bag.salvaged
        got = [(m.topic, m.timestamp, bytes(m.data)) for m in bag.messages()]
        assert bag.damage is not None and "rows are unreadable" in bag.damage
    assert 0.3 * len(full) < len(got) < len(full)
    assert got == full[:len(got)]
    assert (cut / "metadata.yaml").is_file() and _storage_file(cut).stat().st_size < 0.61 * _storage_file(
        long_bags["sqlite3"]).stat().st_size  # the input file was left alone (salvage reads a temporary copy)


def test_corrupt_mcap_record_stops_there(long_bags: dict[str, Path], tmp_path: Path) -> None:
    full = _all(long_bags["mcap"])
    bad = tmp_path / "bad"
    shutil.copytree(long_bags["mcap"], bad)
    f = _storage_file(bad)
    f.chmod(0o644)
    data = bytearray(f.read_bytes())
    chunks, pos = [], 8
    while data[pos] != 0x02:  # top-level MCAP records (opcode u8, length u64) up to the footer
        if data[pos] == 0x06:
            chunks.append(pos)
        pos += 9 + int.from_bytes(data[pos + 1:pos + 9], "little")
    assert len(chunks) >= 2
    second_chunk = chunks[1]
    data[second_chunk] = 0x00  # garbage opcode
    data[-8:] = b"\x00" * 8  # and no valid end magic, so rosbags refuses the file
    f.write_bytes(bytes(data))
    with open_bag(bad) as bag:
        got = list(bag.messages())
        assert f"stopped at byte {second_chunk}" in bag.damage and "corrupt record (opcode 0x00)" in bag.damage
    assert 0 < len(got) < len(full)


def test_info_cli_flags_damage(long_bags: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bag_main(["info", str(long_bags["sqlite3"])]) == 0
    out = capsys.readouterr().out
    assert IMAGE_TOPIC in out and "sensor_msgs/msg/Image" in out and " 25 " in out
    cut = _cut_copy(long_bags["mcap"], tmp_path / "cut", 0.5)
    assert bag_main(["info", str(cut)]) == 3
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "stopped at byte" in out
    assert bag_main(["info", str(tmp_path / "nothing")]) == 2
