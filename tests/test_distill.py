"""The distillation run end to end on the bundled digits: outputs, resume, refusals."""

import json
import signal

import numpy as np
import pytest
from tiny_run import run as _run
from tiny_run import start as _start
from tiny_run import wait_for_checkpoint as _wait_for_checkpoint


@pytest.fixture
def env(run_env):
    return run_env


def test_run_writes_images_labels_and_pngs(reference):
    z = np.load(reference / "synthetic.npz")
    assert z["images"].shape == (10, 4, 4, 3) and z["images"].dtype == np.uint8
    np.testing.assert_array_equal(z["labels"], np.arange(10))
    assert int(z["step"]) == 10
    assert str(z["dataset"]) == "mnist_demo" and str(z["backbone"]) == "dinov2_tiny"
    assert len(list((reference / "images").glob("class_*.png"))) == 10
    assert (reference / "images" / "final.png").exists()
    assert (reference / "config.json").exists()
    assert list(reference.glob("events.out.tfevents.*"))
    result = json.loads((reference / "eval" / "dinov2_tiny" / "eval.json").read_text())
    assert len(result["top1"]["per_seed"]) == 2 and 0 <= result["top1"]["mean"] <= 100


def _events(workdir):
    """Every TensorBoard event the run wrote (its records read directly, no TensorFlow)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in workdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + n])
            out.append(event)
            pos += 12 + n + 4
    return out


def test_tensorboard_gets_the_grid_and_the_config(reference):
    values = [(e.step, v) for e in _events(reference) for v in e.summary.value]
    images = [(step, v.image) for step, v in values if v.tag == "synthetic"]
    assert [step for step, _ in images] == [5, 10]  # every image_every steps
    assert images[0][1].height > 0 and images[0][1].encoded_image_string[:4] == b"\x89PNG"
    assert (reference / "images" / "step_000005.png").exists()
    texts = [v for _, v in values if v.tag.startswith("config")]
    assert texts and b"mnist_demo" in texts[0].SerializeToString()
    assert any(v.tag == "loss" for _, v in values)


def test_run_profiles_the_steps_asked_for(reference):
    p = json.loads((reference / "profile" / "summary.json").read_text())
    assert p["steps"] == 2 and p["unmatched_op_s_per_step"] == 0
    assert 0 < p["busy_s_per_step"] <= p["wall_s_per_step"]
    # The demo backbone on 2 devices: each phase of the step ran, and the real images too.
    for phase in ("real_features/backbone", "syn_features/backbone", "syn_backward/backbone"):
        assert p["by_phase"].get(phase, 0) > 0, (phase, p["by_phase"])
    assert (reference / "profile" / "step.hlo.txt.gz").exists()
    assert list((reference / "profile").glob("plugins/profile/*/perfetto_trace.json.gz"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_images(reference, env, tmp_path, sig):
    proc = _start(tmp_path, env)
    _wait_for_checkpoint(tmp_path, 4, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig != signal.SIGKILL:  # a clean stop: a checkpoint at the step it reached
        want = {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
        assert proc.returncode in (want, -sig), out
    assert not (tmp_path / "synthetic.npz").exists() or proc.returncode == 0
    rc, out = _run(tmp_path, env)
    assert rc == 0, out
    assert "resumed from step" in out
    want, got = np.load(reference / "synthetic.npz"), np.load(tmp_path / "synthetic.npz")
    np.testing.assert_array_equal(got["images"], want["images"])


def test_workdir_of_another_run_is_refused(reference, env, tmp_path):
    import shutil

    shutil.copytree(reference, tmp_path / "w")
    rc, out = _run(tmp_path / "w", env, "--config.syn_res=8")
    assert rc == 2, out
    assert "different run" in out and "syn_res" in out


def test_unknown_config_key_and_backbone_are_refused(env, tmp_path):
    rc, out = _run(tmp_path, env, "--config.learning_rate=1")
    assert rc == 2 and "unknown config key" in out and "learning_rate" in out
    rc, out = _run(tmp_path, env, "--config.backbone=dinov9")
    assert rc == 2 and "backbone='dinov9' (allowed: dinov2_vits" in out


def test_class_sharded_state_resumes_into_the_replicated_layout(reference, env, tmp_path):
    # Half the images' pyramid rows and Adam moments on each of the 2 devices, through a growth
    # (step 4); killed after the checkpoint at 6 and finished with replicated state.
    proc = _start(tmp_path, env, "--config.state_sharding=class")
    _wait_for_checkpoint(tmp_path, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    rc, out = _run(tmp_path, env)
    assert rc == 0, out
    assert "resumed from step 6" in out or "resumed from step 8" in out
    want = np.load(reference / "synthetic.npz")["images"].astype(int)
    got = np.load(tmp_path / "synthetic.npz")["images"].astype(int)
    # The same steps up to the order of float32 sums (measured: identical uint8 images).
    assert np.abs(got - want).max() <= 1


def test_class_sharding_that_does_not_divide_is_refused(env, tmp_path):
    env3 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    rc, out = _run(tmp_path, env3, "--config.state_sharding=class", "--config.aug_rounds=2")
    assert rc == 2 and "state_sharding='class' needs the 10 synthetic images" in out, out


def test_persistent_non_finite_loss_stops_and_keeps_the_checkpoints(env, tmp_path):
    rc, out = _run(tmp_path, env, "--config.steps=3")
    assert rc == 0, out
    first = (tmp_path / "synthetic.npz").read_bytes()
    # Resumed at step 4 with NaN noise in every augmented image: every update is skipped; the
    # third in a row stops the run before another checkpoint is written.
    rc, out = _run(
        tmp_path,
        env,
        "--config.augment.noise_std=nan",
        "--config.augment.noise_p=1.0",
        "--config.max_nonfinite=3",
    )
    assert rc == 3, out
    assert "non-finite for 3 steps in a row (up to step 6)" in out
    assert "step 4: non-finite meta-loss, update skipped" in out
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6, steps  # written after two skipped steps, none after the third
    assert (tmp_path / "synthetic.npz").read_bytes() == first  # the finished export is untouched
