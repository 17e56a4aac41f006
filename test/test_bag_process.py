"""``geodiff_bag process``: the engine run offline over a bag, written to a new bag with the original topics.

Most tests use a stand-in engine whose relative depth is a known affine map of the true depth,
``relative = (depth - t) / s``; the metric output must then come back as the true depth, which checks the
alignment, the stamps, the cloud and the copy of the inputs without model weights. One test runs the real engine
with ``--tiny`` checkpoints through the CLI, and one shows the model-loading error a user sees without weights.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rosbags.typesys import get_types_from_msg

from geodiff_ros.bag.cli import main as bag_main
from geodiff_ros.bag.process import ProcessOptions, process_bag
from geodiff_ros.bag.storage import BagError, BagWriter, jazzy_typestore, open_bag
from geodiff_ros.geometry import PinholeIntrinsics, backproject
from geodiff_ros.ros.conversions import depth_to_metres, image_to_numpy, image_to_rgb8
from geodiff_ros.ros.demo import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag
from geodiff_ros.ros.pointcloud import read_cloud

S, T = 3.0, 0.5  # relative = (depth - T) / S: the metric fit must find S and T
OUT_TOPICS = ('/depth/relative', '/depth/image', '/depth/camera_info', '/normals/image', '/points')


def _key(rgb: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest()


class AffineEngine:
    """Stand-in for GeoDiffEngine: relative depth = (true depth - T) / S for the images of a known bag."""

    tasks = ('depth', 'normals')

    def __init__(self, bag_path: Path) -> None:
        self.relative: dict[str, np.ndarray] = {}
        self.true_depth: dict[str, np.ndarray] = {}
        with open_bag(bag_path) as bag:
            depth_by_stamp = {}
            images = []
            for raw in bag.messages([IMAGE_TOPIC, DEPTH_TOPIC]):
                msg = bag.deserialize(raw)
                if raw.topic == DEPTH_TOPIC:
                    depth_by_stamp[msg.header.stamp.sec, msg.header.stamp.nanosec] = depth_to_metres(msg)
                else:
                    images.append(msg)
        for img in images:
            depth = depth_by_stamp[img.header.stamp.sec, img.header.stamp.nanosec]  # [H,W] m, NaN = dropout
            filled = np.where(np.isfinite(depth), depth, np.nanmedian(depth))
            key = _key(image_to_rgb8(img))
            self.relative[key] = ((filled - T) / S).astype(np.float32)
            self.true_depth[key] = depth
        self.calls = 0

    def predict(self, images: list[np.ndarray]) -> SimpleNamespace:
        self.calls += 1
        depth = [self.relative[_key(im)] for im in images]
        normals = [np.broadcast_to(np.array([0, 0, -1], np.float32), (*im.shape[:2], 3)).copy() for im in images]
        return SimpleNamespace(depth=depth, normals=normals)


def _read(path: Path) -> dict[str, list[tuple[int, object]]]:
    out: dict[str, list[tuple[int, object]]] = {}
    with open_bag(path) as bag:
        for raw in bag.messages():
            out.setdefault(raw.topic, []).append((raw.timestamp, bag.deserialize(raw)))
    return out


@pytest.fixture(scope='module')
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_bag(tmp_path_factory.mktemp('in') / 'synth', frames=3)


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_outputs_are_metric_in_sync_and_inputs_copied(synth: Path, tmp_path: Path, storage: str) -> None:
    src = synth
    if storage == 'sqlite3':  # the same bag in the other storage format
        src = tmp_path / 'in_sqlite3'
        with open_bag(synth) as bag, BagWriter(src, storage='sqlite3') as w:
            for m in bag.messages():
                w.add_topic(m.topic, m.msgtype)
                w.write(m.topic, m.timestamp, m.data)
    engine = AffineEngine(src)
    out = tmp_path / 'out'
    with open_bag(src) as bag, BagWriter(out, storage=storage, typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, engine, ProcessOptions(image_topic=IMAGE_TOPIC, sparse_topic=DEPTH_TOPIC,
                                                                  batch_size=2))
    assert (summary.frames_in, summary.frames_out, summary.frames_metric, summary.frames_failed) == (3, 3, 3, 0)
    assert summary.camera_info_topic == INFO_TOPIC  # found as the image topic's sibling
    assert np.allclose(summary.scales, S, rtol=2e-3)
    assert engine.calls == 2  # batches of 2 + 1

    inp, res = _read(src), _read(out)
    for topic in inp:  # originals copied unchanged
        assert [(t, str(m)) for t, m in res[topic]] == [(t, str(m)) for t, m in inp[topic]]
    images = inp[IMAGE_TOPIC]
    for topic in OUT_TOPICS:
        assert len(res[topic]) == 3, topic
        for (t_out, m_out), (t_in, m_in) in zip(res[topic], images, strict=True):
            assert t_out == t_in  # stored at the input's bag time
            assert m_out.header == m_in.header  # same stamp and optical frame_id as the input image
    assert {m.encoding for _, m in res['/depth/relative'] + res['/depth/image']} == {'32FC1'}
    assert {m.encoding for _, m in res['/normals/image']} == {'32FC3'}

    info = inp[INFO_TOPIC][0][1]
    assert np.array_equal(res['/depth/camera_info'][0][1].p, info.p)
    for (_, img), (_, depth_msg), (_, cloud) in zip(images, res['/depth/image'], res['/points'], strict=True):
        truth = engine.true_depth[_key(image_to_rgb8(img))]
        metric = image_to_numpy(depth_msg)
        ok = np.isfinite(truth)
        assert np.allclose(metric[ok], truth[ok], rtol=2e-3)  # metric depth = the sensor's depth
        assert (cloud.height, cloud.width) == (img.height, img.width)  # organized, stride 1
        pts = read_cloud(cloud)
        assert pts.dtype.names == ('x', 'y', 'z', 'rgb', 'normal_x', 'normal_y', 'normal_z')
        intr = PinholeIntrinsics(info.p[0], info.p[5], info.p[2], info.p[6], img.width, img.height)
        xyz = backproject(metric, intr)
        assert np.allclose(pts['x'], xyz[..., 0], equal_nan=True) and np.allclose(pts['z'], metric, equal_nan=True)


def test_sparse_fraction_measures_held_out_error(synth: Path, tmp_path: Path) -> None:
    with open_bag(synth) as bag, BagWriter(tmp_path / 'o', typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, AffineEngine(synth), ProcessOptions(
            image_topic=IMAGE_TOPIC, sparse_topic=DEPTH_TOPIC, sparse_fraction=0.02, visualize=True))
    assert summary.frames_metric == 3 and len(summary.absrel_heldout) == 3
    assert max(summary.absrel_heldout) < 0.01  # fitted on 2 % of the pixels, right on the other 98 %
    assert summary.outputs['/depth/image_vis'] == summary.outputs['/normals/image_vis'] == 3


def test_without_camera_info_no_cloud_but_depth(synth: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with open_bag(synth) as bag, BagWriter(tmp_path / 'o', typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, AffineEngine(synth), ProcessOptions(
            image_topic=IMAGE_TOPIC, camera_info_topic='', sparse_topic=DEPTH_TOPIC, output_namespace='geodiff'))
    assert set(summary.outputs) == {'/geodiff/depth/relative', '/geodiff/depth/image', '/geodiff/normals/image'}


def test_without_sparse_depth_relative_only(synth: Path, tmp_path: Path) -> None:
    with open_bag(synth) as bag, BagWriter(tmp_path / 'o', typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, AffineEngine(synth), ProcessOptions(image_topic=IMAGE_TOPIC))
    assert summary.frames_metric == 0  # never metric output without a fit (ros-anchors 3.4)
    assert set(summary.outputs) == {'/depth/relative', '/depth/camera_info', '/normals/image'}


def test_bad_topics_are_clear_errors(synth: Path, tmp_path: Path) -> None:
    engine = AffineEngine(synth)
    cases = [
        (ProcessOptions(image_topic='/nope'), r'/nope.*not in bag'),
        (ProcessOptions(image_topic=INFO_TOPIC), r'has type sensor_msgs/msg/CameraInfo; it must be'),
        (ProcessOptions(image_topic=IMAGE_TOPIC, sparse_topic=INFO_TOPIC), r'--sparse-topic .* must be a depth'),
        (ProcessOptions(image_topic=IMAGE_TOPIC, camera_info_topic=DEPTH_TOPIC), r'expected sensor_msgs/msg/Camera'),
        (ProcessOptions(image_topic=IMAGE_TOPIC, output_namespace='camera/color/..'), None),
    ]
    for i, (opts, pattern) in enumerate(cases):
        with open_bag(synth) as bag, BagWriter(tmp_path / f'o{i}', typestore=bag.typestore) as writer:
            if pattern is None:
                process_bag(bag, writer, engine, opts)  # odd but legal namespace
                continue
            with pytest.raises(BagError, match=pattern):
                process_bag(bag, writer, engine, opts)
    processed = tmp_path / 'o0_again'
    with open_bag(synth) as bag, BagWriter(processed, typestore=bag.typestore) as writer:
        process_bag(bag, writer, engine, ProcessOptions(image_topic=IMAGE_TOPIC))
    with open_bag(processed) as bag, BagWriter(tmp_path / 'twice', typestore=bag.typestore) as writer, \
            pytest.raises(BagError, match='already has output topic.*--output-namespace'):
        process_bag(bag, writer, engine, ProcessOptions(image_topic=IMAGE_TOPIC))


def test_custom_types_are_copied(synth: Path, tmp_path: Path) -> None:
    store = jazzy_typestore()
    store.register(get_types_from_msg('uint32 a\nstring b\n', 'geodiff_test_msgs/msg/Blob'))
    src = tmp_path / 'with_blob'
    with open_bag(synth) as bag, BagWriter(src, typestore=store) as w:
        for m in bag.messages():
            w.add_topic(m.topic, m.msgtype)
            w.write(m.topic, m.timestamp, m.data)
        w.write_msg('/blob', 1_700_000_000_050_000_000, store.types['geodiff_test_msgs/msg/Blob'](a=3, b='c'))
    with open_bag(src) as bag, BagWriter(tmp_path / 'o', typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, AffineEngine(synth), ProcessOptions(image_topic=IMAGE_TOPIC))
    assert summary.passthrough['/blob'] == 1 and not summary.skipped_topics
    with open_bag(tmp_path / 'o') as bag:
        blob = bag.deserialize(next(iter(bag.messages(['/blob']))))
        assert (blob.a, blob.b) == (3, 'c')


def test_truncated_input_is_processed_up_to_the_damage(tmp_path: Path) -> None:
    src = write_synthetic_bag(tmp_path / 'long', frames=20)
    engine = AffineEngine(src)
    cut = tmp_path / 'cut'
    shutil.copytree(src, cut)
    f = next(cut.glob('*.mcap'))
    f.chmod(0o644)
    with f.open('r+b') as fh:
        fh.truncate(f.stat().st_size // 2)
    with open_bag(cut) as bag, BagWriter(tmp_path / 'o', typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, engine, ProcessOptions(image_topic=IMAGE_TOPIC, sparse_topic=DEPTH_TOPIC))
    assert summary.damage is not None and 'stopped at byte' in summary.damage
    assert 5 <= summary.frames_out < 20 and summary.frames_out == summary.frames_in
    res = _read(tmp_path / 'o')  # the output bag is complete and readable
    assert len(res['/depth/image']) == summary.frames_out


# ------------------------------------------------------------------------------------------------ CLI, real engine


def test_cli_tiny_on_a_recorded_bag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shared = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'bags' / 'tum_fr2_desk_rgbd_mcap'
    src = shared if shared.is_dir() else write_synthetic_bag(tmp_path / 'synth', frames=2)
    out = tmp_path / 'out'
    code = bag_main(['process', str(src), str(out), '--image-topic', IMAGE_TOPIC, '--sparse-topic', DEPTH_TOPIC,
                     '--sparse-fraction', '0.05', '--tiny', '--processing-res', '64', '--storage', 'sqlite3'])
    text = capsys.readouterr().out
    assert code == 0, text
    assert 'frames: 2 in, 2 out' in text and f'bag: {out}' in text
    res = _read(out)
    assert len(res['/depth/relative']) == 2 and len(res[IMAGE_TOPIC]) == 2
    rel = image_to_numpy(res['/depth/relative'][0][1])
    img = res[IMAGE_TOPIC][0][1]
    assert rel.shape == (img.height, img.width) and np.nanmin(rel) >= 0 and np.nanmax(rel) <= 1


def test_cli_missing_weights_says_how_to_fix(synth: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    code = bag_main(['process', str(synth), str(tmp_path / 'o'), '--image-topic', IMAGE_TOPIC, '--depth-model',
                     str(tmp_path / 'no_such_model'), '--normals-model', '', '--device', 'cpu',
                     '--local-files-only'])
    assert code == 1
    assert 'cannot load the model' in caplog.text and 'no_such_model' in caplog.text


def test_cli_input_errors_exit_2_and_damage_exits_3(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> None:
    assert bag_main(['process', str(synth), str(tmp_path / 'o'), '--image-topic', '/nope', '--tiny']) == 2
    (tmp_path / 'exists').mkdir()
    assert bag_main(['process', str(synth), str(tmp_path / 'exists'), '--image-topic', IMAGE_TOPIC]) == 2
    cut = tmp_path / 'cut'
    shutil.copytree(synth, cut)
    f = next(cut.glob('*.mcap'))
    f.chmod(0o644)
    with f.open('r+b') as fh:
        fh.truncate(int(f.stat().st_size * 0.8))
    capsys.readouterr()
    code = bag_main(['process', str(cut), str(tmp_path / 'o2'), '--image-topic', IMAGE_TOPIC, '--depth-model',
                     str(tiny_depth_ckpt), '--normals-model', str(tiny_normals_ckpt), '--device', 'cpu',
                     '--dtype', 'fp32', '--processing-res', '64'])
    out = capsys.readouterr().out
    assert code == 3 and 'input bag damaged, processed up to there: stopped at byte' in out
